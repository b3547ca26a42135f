import Foundation
import XCTest
@testable import Peregrine
import PeregrineInt8

/// The quantizers' scale searches run several grids (or sub-blocks) at once, one to a SIMD lane.
/// Each lane must give the bits of the one-at-a-time search it replaced, so that files keep their
/// bytes: these tests hold the lane forms against scalar searches written out here the plain way.
final class QuantizerSearchTests: XCTestCase {
    /// Finite values at the edges of f32 quantize in every type, with and without importance
    /// (also importance near f32's largest), where the conversions to levels trapped on the NaN
    /// and infinities their arithmetic makes: a block of subnormals (its scale's inverse
    /// overflows; it reads back as zeros) and values near f32's largest (their range overflows).
    func testExtremeFiniteValuesQuantize() {
        let n = 256
        let tiny = [Float](repeating: 1e-40, count: n), huge = (0..<n).map { $0 % 2 == 0 ? Float(3.39e38) : -3.39e38 }
        let importances: [[Float]?] = [nil, [Float](repeating: 1, count: n), [Float](repeating: 3e38, count: n)]
        for type in [DType.q8_0, .q4_0, .q4_1, .q5_0, .q5_1, .q4_K, .q5_K, .q6_K, .iq4_nl, .iq4_xs, .q3_K, .q2_K] {
            for (name, x) in [("subnormal", tiny), ("huge", huge)] {
                for importance in importances {
                    var bytes = [UInt8](repeating: 0, count: type.byteCount(elements: n))
                    x.withUnsafeBufferPointer { xp in
                        bytes.withUnsafeMutableBytes { out in
                            if let importance {
                                importance.withUnsafeBufferPointer {
                                    Quantizer.quantize(type, xp.baseAddress!, count: n, importance: $0.baseAddress!, into: out.baseAddress!)
                                }
                            } else {
                                Quantizer.quantize(type, xp.baseAddress!, count: n, into: out.baseAddress!)
                            }
                        }
                    }
                    guard name == "subnormal" else { continue }
                    var back = [Float](repeating: 1, count: n)
                    bytes.withUnsafeBytes { raw in back.withUnsafeMutableBufferPointer { type.dequantize(raw.baseAddress!, count: n, into: $0.baseAddress!) } }
                    XCTAssertTrue(back.allSatisfy { abs($0) <= 1e-30 }, "\(type) \(name) importance \(importance?.first ?? 0)")
                }
            }
        }
    }

    /// Sub-blocks of every kind the searches branch on: random spreads, all positive, all
    /// negative, constant, zeros, one outlier, tiny and large magnitudes.
    static func subBlocks(_ n: Int, count: Int, seed: UInt64) -> [[Float]] {
        var rng = SeededGenerator(seed: seed)
        var blocks: [[Float]] = [
            [Float](repeating: 0, count: n), [Float](repeating: 0.25, count: n), [Float](repeating: -3, count: n),
            (0..<n).map { Float($0) * 0.01 + 0.5 }, (0..<n).map { -Float($0) * 0.02 - 0.1 },
            (0..<n).map { $0 == 3 ? 40 : Float($0 % 5) * 0.1 - 0.2 }, (0..<n).map { Float($0 % 7) * 1e-20 - 2e-20 },
            (0..<n).map { Float($0 % 9) * 1e5 - 4e5 },
        ]
        while blocks.count < count {
            let spread = Float(0.01 + 10 * rng.nextUnit()), shift = Float(rng.nextUnit() - 0.3) * spread
            blocks.append((0..<n).map { _ in (Float(rng.nextUnit()) - 0.5) * spread + shift })
        }
        return blocks
    }

    static func weights(_ x: [Float], seed: UInt64) -> [Float] {
        var rng = SeededGenerator(seed: seed)
        return x.map { abs($0) + Float(rng.nextUnit()) * 0.5 }
    }

    /// Q4_K's and Q5_K's search without an importance matrix, against the grid-by-grid search.
    func testIndependentGridsMatchTheScalarSearch() {
        for (b, x) in Self.subBlocks(32, count: 300, seed: 1).enumerated() {
            let w = Self.weights(x, seed: UInt64(b))
            for top in [15, 31] {
                let lanes = x.withUnsafeBufferPointer { xp in
                    w.withUnsafeBufferPointer { Quantizer.scaleAndOffset(xp.baseAddress!, 32, weights: $0.baseAddress!, top: top) }
                }
                let scalar = Self.scalarScaleAndOffset(x, w, top: top, from: -1, by: 0.1, steps: 20)
                XCTAssertEqual(lanes.scale.bitPattern, scalar.scale.bitPattern, "block \(b), top \(top)")
                XCTAssertEqual(lanes.offset.bitPattern, scalar.offset.bitPattern, "block \(b), top \(top)")
            }
        }
    }

    /// The importance search (each grid from the best offset so far), eight sub-blocks to the
    /// lanes, against the scalar search sub-block by sub-block.
    func testSubBlocksInLanesMatchTheScalarSearch() {
        let blocks = Self.subBlocks(32, count: 296, seed: 2)
        for group in stride(from: 0, to: blocks.count, by: 8) {
            let xs = Array(blocks[group..<(group + 8)]), ws = xs.enumerated().map { Self.weights($1, seed: UInt64(100 + $0)) }
            for top in [15, 31] {
                var xt = [SIMD8<Float>](repeating: .zero, count: 32), wt = xt
                for j in 0..<8 {
                    for l in 0..<32 { xt[l][j] = xs[j][l]; wt[l][j] = ws[j][l] }
                }
                let (s, m) = xt.withUnsafeBufferPointer { xp in
                    wt.withUnsafeBufferPointer {
                        Quantizer.offsetsFollowingBest(xp.baseAddress!, weights: $0.baseAddress!, top: top, stretches: -0.9, by: 0.05, steps: 36)
                    }
                }
                for j in 0..<8 {
                    let scalar = Self.scalarScaleAndOffset(xs[j], ws[j], top: top, from: -0.9, by: 0.05, steps: 36, followingBest: true)
                    XCTAssertEqual(s[j].bitPattern, scalar.scale.bitPattern, "block \(group + j), top \(top)")
                    XCTAssertEqual(m[j].bitPattern, scalar.offset.bitPattern, "block \(group + j), top \(top)")
                }
            }
        }
    }

    /// Q6_K's (and the weighted Q8_0/Q4_0/Q5_0) symmetric search against the grid-by-grid one.
    func testSymmetricScaleMatchesTheScalarSearch() {
        for (b, x) in (Self.subBlocks(16, count: 200, seed: 3) + Self.subBlocks(32, count: 100, seed: 4)).enumerated() {
            let w = Self.weights(x, seed: UInt64(b))
            for (top, highest) in [(32, 31), (8, 7), (127, 127)] {
                let lanes = x.withUnsafeBufferPointer { xp in
                    w.withUnsafeBufferPointer { Quantizer.symmetricScale(xp.baseAddress!, x.count, weights: $0.baseAddress!, top: top, highest: highest) }
                }
                XCTAssertEqual(lanes.bitPattern, Self.scalarSymmetricScale(x, w, top: top, highest: highest).bitPattern, "block \(b), top \(top)")
            }
        }
    }

    /// IQ4's level search in lanes picks the level `nearestLevel` picks, midpoints and ends included.
    func testNearestLevelValuesMatchNearestLevel() {
        let table = IQ4.levels.map(Float.init)
        var values: [Float] = [-1000, -127.5, -127, -126.9, 113, 113.5, 1000, 0, -0.0, .nan, .infinity, -.infinity]
        for k in 0..<15 {
            let mid = (table[k] + table[k + 1]) / 2
            values += [table[k], mid, mid.nextDown, mid.nextUp]
        }
        var rng = SeededGenerator(seed: 5)
        values += (0..<4000).map { _ in Float(rng.nextUnit() - 0.5) * 300 }
        while values.count % 8 != 0 { values.append(0) }
        for i in stride(from: 0, to: values.count, by: 8) {
            var v = SIMD8<Float>()
            for k in 0..<8 { v[k] = values[i + k] }
            let q = Quantizer.nearestLevelValues(v)
            for k in 0..<8 {
                XCTAssertEqual(q[k], table[Quantizer.nearestLevel(v[k])], "value \(v[k])")
            }
        }
    }

    // The searches one grid at a time, as they were written before the lane forms.

    static func scalarScaleAndOffset(_ x: [Float], _ w: [Float], top: Int, from: Float, by: Float, steps: Int,
                                     followingBest: Bool = false) -> (scale: Float, offset: Float) {
        var lo = x.min()!
        let hi = x.max()!
        if lo > 0 { lo = 0 }
        if hi <= lo { return (0, lo) }
        let n = x.count
        func error(_ s: Float, _ m: Float, _ q: [Int]) -> Float {
            var e: Float = 0
            for i in 0..<n { let d = s * Float(q[i]) + m - x[i]; e += w[i] * d * d }
            return e
        }
        var origin = lo
        func grid(_ iscale: Float) -> [Int] { (0..<n).map { max(0, min(top, Int((iscale * (x[$0] - origin)).rounded()))) } }
        var bestScale = (hi - lo) / Float(top), bestOffset = lo
        var best = error(bestScale, bestOffset, grid(Float(top) / (hi - lo)))
        for step in 0...steps {
            let q = grid((from + by * Float(step) + Float(top)) / (hi - origin))
            var sw: Float = 0, sl: Float = 0, sl2: Float = 0, sxl: Float = 0, sx: Float = 0
            for i in 0..<n {
                let l = Float(q[i]), wi = w[i], xi = x[i]
                sw += wi; sl += wi * l; sl2 += wi * l * l; sxl += wi * l * xi; sx += wi * xi
            }
            let det = sw * sl2 - sl * sl
            guard det > 0 else { continue }
            var s = (sw * sxl - sx * sl) / det, m = (sl2 * sx - sl * sxl) / det
            if m > 0 { m = 0; s = sxl / sl2 }
            let e = error(s, m, q)
            if e < best {
                best = e; bestScale = s; bestOffset = m
                if followingBest { origin = m }
            }
        }
        return (bestScale, bestOffset)
    }

    static func scalarSymmetricScale(_ x: [Float], _ w: [Float], top: Int, highest: Int) -> Float {
        var amax: Float = 0, extreme: Float = 0
        for v in x where abs(v) > amax { amax = abs(v); extreme = v }
        guard amax > 1e-30 else { return 0 }
        func fit(_ iscale: Float) -> (Float, Float) {
            var sxl: Float = 0, sl2: Float = 0
            for (i, v) in x.enumerated() {
                let l = Float(max(-top, min(highest, Int((iscale * v).rounded()))))
                sxl += w[i] * v * l; sl2 += w[i] * l * l
            }
            return (sxl, sl2)
        }
        var (sxl, sl2) = fit(-Float(top) / extreme)
        var scale = sl2 > 0 ? sxl / sl2 : 0, best = scale * sxl
        for step in -9...9 where step != 0 {
            let (a, b) = fit(-(Float(top) + 0.1 * Float(step)) / extreme)
            if b > 0, a * a > best * b { sxl = a; sl2 = b; scale = a / b; best = scale * a }
        }
        return scale
    }
}
