import XCTest
@testable import Peregrine
#if arch(x86_64)
import PeregrineBF16
#endif

/// The CPU's F32/F16/BF16 matrix products (AVX-512 tiles where the CPU has them, AVX2 otherwise):
/// right against a double-precision sum, and each token's result the same bit for bit whatever
/// number of tokens share the product.
final class FloatProductTests: XCTestCase {
    func stored(_ values: [Float], _ dtype: DType) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: values.count * dtype.byteSize)
        bytes.withUnsafeMutableBytes { raw in
            for (i, v) in values.enumerated() {
                switch dtype {
                case .f32: raw.storeBytes(of: v, toByteOffset: 4 * i, as: Float.self)
                case .f16: raw.storeBytes(of: Half.floatToF16(v), toByteOffset: 2 * i, as: UInt16.self)
                default: raw.storeBytes(of: Half.floatToBF16(v), toByteOffset: 2 * i, as: UInt16.self)
                }
            }
        }
        return bytes
    }

    func product(_ dtype: DType, _ w: [UInt8], outDim: Int, k: Int, _ x: [Float], tokens: Int, pool: ThreadPool) -> [Float] {
        var y = [Float](repeating: .nan, count: tokens * outDim)
        w.withUnsafeBytes { wr in
            x.withUnsafeBufferPointer { xp in
                y.withUnsafeMutableBufferPointer { yp in
                    switch dtype {
                    case .f32: CPUKernels.matmul(F32Element.self, x: xp.baseAddress!, tokens: tokens, w: wr.baseAddress!, outDim: outDim, k: k, bias: nil, y: yp.baseAddress!, pool: pool)
                    case .f16: CPUKernels.matmul(F16Element.self, x: xp.baseAddress!, tokens: tokens, w: wr.baseAddress!, outDim: outDim, k: k, bias: nil, y: yp.baseAddress!, pool: pool)
                    default: CPUKernels.matmul(BF16Element.self, x: xp.baseAddress!, tokens: tokens, w: wr.baseAddress!, outDim: outDim, k: k, bias: nil, y: yp.baseAddress!, pool: pool)
                    }
                }
            }
        }
        return y
    }

    /// A row gives the same bits whether it falls in a tile of four rows or in the remainder
    /// computed alone (the tiles reduce four accumulators at once, the remainder one).
    func testRowGivesSameBitsInATileOrAlone() {
        let pool = ThreadPool(threadCount: 1)
        var rng = SplitMix(seed: 3)
        let k = 256, tokens = 7
        let wf = (0..<(5 * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
        let x = (0..<(tokens * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
        // Rows 0-4; then row 4 moved first, into the tile.
        let rotated = Array(wf[(4 * k)...]) + Array(wf[..<(4 * k)])
        for dtype in [DType.f32, .f16] {
            let a = product(dtype, stored(wf, dtype), outDim: 5, k: k, x, tokens: tokens, pool: pool)
            let b = product(dtype, stored(rotated, dtype), outDim: 5, k: k, x, tokens: tokens, pool: pool)
            for t in 0..<tokens {
                XCTAssertEqual(a[t * 5 + 4].bitPattern, b[t * 5].bitPattern, "\(dtype) token \(t)")
                for r in 0..<4 { XCTAssertEqual(a[t * 5 + r].bitPattern, b[t * 5 + r + 1].bitPattern) }
            }
        }
    }

    func testProductsMatchDoubleSumsAndDoNotDependOnTokenCount() {
        let pool = ThreadPool(threadCount: 2)
        var rng = SplitMix(seed: 11)
        // Row counts that are and are not multiples of four; k with and without a tail of 16;
        // a k long enough that a chunk's rows go in several runs of 12 (AVX2's F16 and BF16
        // prompts widen each run to f32).
        for (outDim, k) in [(37, 200), (64, 512), (6, 17), (40, 4100)] {
            let wf = (0..<(outDim * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            let tokens = 53  // more than one run of 48 tokens
            let x = (0..<(tokens * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            for dtype in [DType.f32, .f16, .bf16] {
                let w = stored(wf, dtype)
                // What the stored weights are, for the reference.
                var wq = [Float](repeating: 0, count: outDim * k)
                w.withUnsafeBytes { dtype.dequantize($0.baseAddress!, count: outDim * k, into: &wq) }
                let all = product(dtype, w, outDim: outDim, k: k, x, tokens: tokens, pool: pool)
                for t in 0..<tokens {
                    for o in 0..<outDim {
                        var s = 0.0, m = 0.0
                        for i in 0..<k { s += Double(wq[o * k + i]) * Double(x[t * k + i]); m += abs(Double(wq[o * k + i]) * Double(x[t * k + i])) }
                        XCTAssertEqual(Double(all[t * outDim + o]), s, accuracy: 1e-5 * m + 1e-6, "\(dtype) \(outDim)x\(k) row \(o) token \(t)")
                    }
                }
                // Every prefix of the tokens, and every token alone, gives the same bits.
                for n in [1, 2, 3, 5, 6, 7, 12, 48, 50] {
                    let part = product(dtype, w, outDim: outDim, k: k, Array(x[0..<(n * k)]), tokens: n, pool: pool)
                    XCTAssertEqual(part.map(\.bitPattern), all[0..<(n * outDim)].map(\.bitPattern), "\(dtype) \(outDim)x\(k), \(n) tokens")
                }
                for t in 0..<tokens {
                    let one = product(dtype, w, outDim: outDim, k: k, Array(x[(t * k)..<((t + 1) * k)]), tokens: 1, pool: pool)
                    XCTAssertEqual(one.map(\.bitPattern), all[(t * outDim)..<((t + 1) * outDim)].map(\.bitPattern), "\(dtype) token \(t) alone")
                }
            }
        }
    }

    /// The AVX-512 product over F16 panels (what F16 weights take on such a CPU): right against a
    /// double-precision sum, each token's result the same bits in any batch (one token read in
    /// place, more interleaved by tiles of 12), rows past the last full panel (and the padding
    /// panel) handled, a bias added.
    func testF16PanelProductMatchesDoubleSumsAndDoesNotDependOnTokenCount() throws {
        #if arch(x86_64)
        guard CPUFeatures.useAVX512 else { throw XCTSkip("no AVX-512 on this CPU: the panel product is not used") }
        let pool = ThreadPool(threadCount: 2)
        checkPanelProduct(.f16, seed: 17, shapes: [(37, 200), (64, 512), (6, 17), (100, 64)]) { w, outDim, k, bias, xs, tokens in
            var y = [Float](repeating: .nan, count: tokens * outDim)
            // The activations interleaved here first (more than one token); NaN where nothing should be read.
            var scratch = [Float](repeating: .nan, count: tokens * k)
            let panels = PanelMatrix(w, rows: outDim, k: k, layout: .halves)
            xs.withUnsafeBufferPointer { xp in
                bias.withUnsafeBufferPointer { bp in
                    y.withUnsafeMutableBufferPointer { yp in
                        scratch.withUnsafeMutableBufferPointer { sp in
                            CPUKernels.matmulHalfPanels(panels.panels(pool: pool), x: xp.baseAddress!, tokens: tokens, outDim: outDim,
                                                       k: k, bias: bp.baseAddress!, y: yp.baseAddress!, scratch: sp.baseAddress!, pool: pool)
                        }
                    }
                }
            }
            return y
        }
        #else
        throw XCTSkip("the panel product is x86-64's")
        #endif
    }

    /// What the panel tests share: for each (rows, k) shape, random weights stored as `dtype` and
    /// 53 tokens' random activations; `product` (the kernel over the stored matrix `w`, a bias and
    /// `tokens` tokens' activations) against a double-precision sum of the stored weights and the
    /// activations as `activation` rounds them, and every prefix of the tokens, and some tokens
    /// alone, giving the same bits as the whole batch.
    func checkPanelProduct(_ dtype: DType, seed: UInt64, shapes: [(Int, Int)], activation: (Float) -> Float = { $0 },
                           product: (_ w: UnsafeRawPointer, _ outDim: Int, _ k: Int, _ bias: [Float], _ xs: [Float], _ tokens: Int) -> [Float]) {
        var rng = SplitMix(seed: seed)
        for (outDim, k) in shapes {
            let wf = (0..<(outDim * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            let bias = (0..<outDim).map { Float($0) / 8 }
            let tokens = 53
            let x = (0..<(tokens * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            let w = stored(wf, dtype)
            var wq = [Float](repeating: 0, count: outDim * k)
            w.withUnsafeBytes { dtype.dequantize($0.baseAddress!, count: outDim * k, into: &wq) }
            let xq = x.map(activation)
            func run(_ xs: [Float], _ n: Int) -> [Float] { w.withUnsafeBytes { product($0.baseAddress!, outDim, k, bias, xs, n) } }
            let all = run(x, tokens)
            for t in 0..<tokens {
                for o in 0..<outDim {
                    var s = Double(bias[o]), m = 0.0
                    for i in 0..<k { s += Double(wq[o * k + i]) * Double(xq[t * k + i]); m += abs(Double(wq[o * k + i]) * Double(xq[t * k + i])) }
                    XCTAssertEqual(Double(all[t * outDim + o]), s, accuracy: 1e-5 * m + 1e-6, "\(dtype) \(outDim)x\(k) row \(o) token \(t)")
                }
            }
            for n in [1, 2, 5, 11, 12, 13, 48, 50] {
                let part = run(Array(x[0..<(n * k)]), n)
                XCTAssertEqual(part.map(\.bitPattern), all[0..<(n * outDim)].map(\.bitPattern), "\(dtype) \(outDim)x\(k), \(n) tokens")
            }
            for t in [0, 13, 52] {
                let one = run(Array(x[(t * k)..<((t + 1) * k)]), 1)
                XCTAssertEqual(one.map(\.bitPattern), all[(t * outDim)..<((t + 1) * outDim)].map(\.bitPattern), "\(dtype) token \(t) alone")
            }
        }
    }

    /// The activations' rounding to BF16 pairs gives Half.floatToBF16's bits for every value (NaN,
    /// infinities, ties and subnormals included), in the tile layout the pair product reads, an
    /// odd k's last word with a zero high half.
    func testRoundPairsMatchesScalarRounding() throws {
        #if arch(x86_64)
        var rng = SplitMix(seed: 5)
        let special: [Float] = [.nan, -.nan, .infinity, -.infinity, 0, -0, .leastNonzeroMagnitude, -.leastNormalMagnitude,
                                .greatestFiniteMagnitude, Float(bitPattern: 0x3F80_8000), Float(bitPattern: 0x3F81_8000),
                                Float(bitPattern: 0x7F80_0001), Float(bitPattern: 0xFF7F_FFFF)]
        for k in [37, 64, 1] {
            let tokens = 13
            let x: [Float] = (0..<(tokens * k)).map { i in
                i % 5 == 0 ? special[(i / 5) % special.count] : Float(bitPattern: UInt32(truncatingIfNeeded: rng.next()))
            }
            let kp = BF16PairPanels.pairs(k: k)
            var out = [UInt32](repeating: 0xDEAD_BEEF, count: tokens * kp)
            x.withUnsafeBufferPointer { xp in
                out.withUnsafeMutableBufferPointer { CPUKernels.roundPairs(xp.baseAddress!, k: k, tokens: tokens, tiles: 0..<2, into: $0.baseAddress!) }
            }
            for t in 0..<tokens {
                let tile = t / 12, n = min(12, tokens - tile * 12), base = tile * 12 * kp
                for p in 0..<kp {
                    let lo = UInt32(Half.floatToBF16(x[t * k + 2 * p]))
                    let hi = 2 * p + 1 < k ? UInt32(Half.floatToBF16(x[t * k + 2 * p + 1])) : 0
                    XCTAssertEqual(out[base + p * n + (t - tile * 12)], lo | hi << 16, "k \(k) token \(t) pair \(p)")
                }
            }
        }
        #else
        throw XCTSkip("the pair product is x86-64's")
        #endif
    }

    /// The AVX-512 BF16 product over pair panels (what BF16 weights take on a CPU with
    /// avx512_bf16): against a double-precision sum of the BF16 weights and the activations
    /// rounded to BF16, each token's result the same bits in any batch, odd k (a half-empty last
    /// pair), rows past the last full panel, a bias added.
    func testBF16PairProductMatchesDoubleSumsAndDoesNotDependOnTokenCount() throws {
        #if arch(x86_64)
        // The CPU's flags, not useBF16Pairs: PEREGRINE_NO_BF16_PAIRS turns the models' use off, not this test.
        guard CPUFeatures.useAVX512 && CPUFeatures.flags.contains("avx512_bf16") else {
            throw XCTSkip("no AVX-512 BF16 on this CPU: the pair product is not used")
        }
        let pool = ThreadPool(threadCount: 2)
        checkPanelProduct(.bf16, seed: 23, shapes: [(37, 200), (64, 512), (6, 17), (100, 64), (33, 1)],
                          activation: { Half.bf16ToFloat(Half.floatToBF16($0)) }) { w, outDim, k, bias, xs, tokens in
            var y = [Float](repeating: .nan, count: tokens * outDim)
            var scratch = [UInt32](repeating: 0xFFFF_FFFF, count: tokens * BF16PairPanels.pairs(k: k))
            let panels = PanelMatrix(w, rows: outDim, k: k, layout: .bf16Pairs)
            xs.withUnsafeBufferPointer { xp in
                bias.withUnsafeBufferPointer { bp in
                    y.withUnsafeMutableBufferPointer { yp in
                        scratch.withUnsafeMutableBufferPointer { sp in
                            CPUKernels.matmulBF16Pairs(panels.panels(pool: pool), x: xp.baseAddress!, tokens: tokens, outDim: outDim,
                                                       k: k, bias: bp.baseAddress!, y: yp.baseAddress!, scratch: sp.baseAddress!, pool: pool)
                        }
                    }
                }
            }
            return y
        }
        #else
        throw XCTSkip("the pair product is x86-64's")
        #endif
    }
}
