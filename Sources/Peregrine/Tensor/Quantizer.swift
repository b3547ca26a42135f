import Foundation
import PeregrineInt8

/// Rounds f32 values into the block types, the inverse of `DType.dequantize`. The 32-value types
/// take a scale from each block's extreme value; the k-quants search, per sub-block, for the
/// scale (and min) that minimise a weighted squared error, then quantize those scales against
/// a super-block scale and round the values again with the scales as stored.
public enum Quantizer {
    /// Quantizes `n` values (a whole number of blocks) into `out` (`type.byteCount(elements: n)`).
    public static func quantize(_ type: DType, _ x: UnsafePointer<Float>, count n: Int, into out: UnsafeMutableRawPointer) {
        precondition(n % type.blockSize == 0, "quantize takes whole blocks")
        switch type {
        case .f32: for i in 0..<n { out.storeBytes(of: x[i], toByteOffset: 4 * i, as: Float.self) }
        case .f16: for i in 0..<n { out.storeBytes(of: Half.floatToF16(x[i]), toByteOffset: 2 * i, as: UInt16.self) }
        case .bf16: for i in 0..<n { out.storeBytes(of: Half.floatToBF16(x[i]), toByteOffset: 2 * i, as: UInt16.self) }
        case .q8_0: for b in 0..<(n / 32) { q8_0(x + 32 * b, out + 34 * b) }
        case .q4_0, .q5_0: for b in 0..<(n / 32) { symmetric(x + 32 * b, out + type.blockBytes * b, five: type == .q5_0) }
        case .q4_1, .q5_1: for b in 0..<(n / 32) { withMin(x + 32 * b, out + type.blockBytes * b, five: type == .q5_1) }
        case .q4_K, .q5_K: for b in 0..<(n / 256) { kQuant(x + 256 * b, out + type.blockBytes * b, five: type == .q5_K) }
        case .q6_K: for b in 0..<(n / 256) { q6_K(x + 256 * b, out + 210 * b) }
        case .iq4_nl: for b in 0..<(n / 32) { iq4(x + 32 * b, count: 32, out + 18 * b) }
        case .iq4_xs: for b in 0..<(n / 256) { iq4(x + 256 * b, count: 256, out + 136 * b) }
        case .q3_K: for b in 0..<(n / 256) { q3_K(x + 256 * b, out + 110 * b) }
        case .q2_K: for b in 0..<(n / 256) { q2_K(x + 256 * b, out + 84 * b) }
        }
    }

    /// Quantizes one row of `n` values (a whole number of blocks) minimising the squared error
    /// weighted by `importance`, one value per column (an importance matrix's mean squared
    /// activations): the error a product of the row with typical inputs makes. As llama.cpp's
    /// quantizers do with an importance matrix, each value's weight also grows with its magnitude
    /// against the row's spread (importance x sqrt(σ² + x²), σ² the mean square of the row, twice
    /// that of the 256-value block for Q4_K/Q5_K; Q6_K takes the importance alone), each block's
    /// scale (and min) is searched for the least weighted error over stretches of the grid, and
    /// the k-quants' scales are fitted as weighted values too. Q8_0 is searched the same way
    /// (llama.cpp keeps plain rounding there). A block whose importance is all zero is weighted
    /// as if every column mattered equally. Without importance this is `quantize(_:_:count:into:)`.
    public static func quantize(_ type: DType, _ x: UnsafePointer<Float>, count n: Int, importance: UnsafePointer<Float>?,
                                into out: UnsafeMutableRawPointer) {
        guard let importance, !type.isFloat else { return quantize(type, x, count: n, into: out) }
        precondition(n % type.blockSize == 0, "quantize takes whole blocks")
        var sumSquares: Float = 0
        for i in 0..<n { sumSquares += x[i] * x[i] }
        let sigma2 = sumSquares / Float(n)
        switch type {
        case .f32, .f16, .bf16: break
        case .q8_0, .q4_0, .q5_0:
            let (top, highest) = type == .q8_0 ? (127, 127) : type == .q4_0 ? (8, 7) : (16, 15)
            for b in 0..<(n / 32) {
                weightedSymmetric(type, x + 32 * b, blockImportance(importance + 32 * b, 32), sigma2: sigma2, top: top, highest: highest,
                                  out + type.blockBytes * b)
            }
        case .q4_1, .q5_1: weightedWithMin(x, count: n, importance: importance, sigma2: sigma2, out, five: type == .q5_1)
        case .q4_K, .q5_K:
            for b in 0..<(n / 256) { kQuant(x + 256 * b, out + type.blockBytes * b, five: type == .q5_K, importance: importance + 256 * b) }
        case .q6_K:
            for b in 0..<(n / 256) { q6_K(x + 256 * b, out + 210 * b, importance: importance + 256 * b) }
        case .iq4_nl:
            for b in 0..<(n / 32) { iq4(x + 32 * b, count: 32, out + 18 * b, importance: importance + 32 * b) }
        case .iq4_xs:
            for b in 0..<(n / 256) { iq4(x + 256 * b, count: 256, out + 136 * b, importance: importance + 256 * b) }
        case .q3_K:
            for b in 0..<(n / 256) { q3_K(x + 256 * b, out + 110 * b, importance: importance + 256 * b) }
        case .q2_K:
            for b in 0..<(n / 256) { q2_K(x + 256 * b, out + 84 * b, importance: importance + 256 * b) }
        }
    }

    /// `Int(v.rounded(rule))` clamped to lo...hi, as the searches round a value to its level
    /// (to nearest, ties away from zero; ggml's scales ties to even; Q4_0/Q5_0/Q4_1/Q5_1's plain
    /// rounding truncates v + 0.5). The clamp comes first, so a value that is NaN or infinite (a
    /// block of subnormals, whose scale's inverse overflows; values near f32's largest, whose
    /// range does) gives lo (NaN) or lo/hi where the conversion would trap; every other value
    /// gives what the clamped conversion gives.
    @inline(__always) static func level(_ v: Float, _ lo: Int, _ hi: Int,
                                        _ rule: FloatingPointRoundingRule = .toNearestOrAwayFromZero) -> Int {
        guard v >= Float(lo) else { return lo }
        guard v <= Float(hi) else { return hi }
        return Int(v.rounded(rule))
    }

    /// `n` importance values, or ones where they are all zero (nothing to weigh by).
    static func blockImportance(_ p: UnsafePointer<Float>, _ n: Int) -> [Float] {
        weighs(p, n) ? Array(UnsafeBufferPointer(start: p, count: n)) : [Float](repeating: 1, count: n)
    }

    /// Whether a block's importance values weigh anything: a block whose values are all zero is
    /// weighted as if every column mattered equally.
    @inline(__always) static func weighs(_ p: UnsafePointer<Float>, _ n: Int) -> Bool {
        for i in 0..<n where p[i] > 0 { return true }
        return false
    }

    /// Q8_0, Q4_0 or Q5_0 with the scale of least weighted error, values then rounded against the
    /// stored (f16) scale.
    static func weightedSymmetric(_ type: DType, _ x: UnsafePointer<Float>, _ importance: [Float], sigma2: Float, top: Int, highest: Int,
                                  _ out: UnsafeMutableRawPointer) {
        let xs = Array(UnsafeBufferPointer(start: x, count: 32))
        let w = (0..<32).map { importance[$0] * (sigma2 + xs[$0] * xs[$0]).squareRoot() }
        let scale = w.withUnsafeBufferPointer { symmetricScale(x, 32, weights: $0.baseAddress!, top: top, highest: highest) }
        storeHalf(scale, out, 0)
        let d = asHalf(scale), id: Float = d != 0 ? 1 / d : 0
        let q = xs.map { level($0 * id, -top, highest) }
        if type == .q8_0 {
            for j in 0..<32 { out.storeBytes(of: Int8(q[j]), toByteOffset: 2 + j, as: Int8.self) }
        } else {
            let five = type == .q5_0
            packNibbles(q.map { $0 + top }, out, qs: five ? 6 : 2, qh: five ? 2 : nil)
        }
    }

    /// Q4_1 or Q5_1 with the scale and (non-positive) min of least weighted error, values then
    /// rounded against the stored (f16) scale and min. The blocks' searches run eight at a time,
    /// one to a SIMD lane (`offsetsFollowingBest`); lanes past a row's last block repeat it and
    /// are dropped.
    static func weightedWithMin(_ x: UnsafePointer<Float>, count n: Int, importance: UnsafePointer<Float>, sigma2: Float,
                                _ out: UnsafeMutableRawPointer, five: Bool) {
        let top = five ? 31 : 15, blocks = n / 32, bytes = five ? 24 : 20
        withUnsafeTemporaryAllocation(of: SIMD8<Float>.self, capacity: 64) { buffer in
            let xt = buffer.baseAddress!, wt = xt + 32
            for first in stride(from: 0, to: blocks, by: 8) {
                for j in 0..<8 {
                    let block = x + 32 * min(first + j, blocks - 1), imp = importance + 32 * min(first + j, blocks - 1)
                    let any = weighs(imp, 32)
                    for l in 0..<32 {
                        xt[l][j] = block[l]
                        wt[l][j] = (any ? imp[l] : 1) * (sigma2 + block[l] * block[l]).squareRoot()
                    }
                }
                let (s, m) = offsetsFollowingBest(xt, weights: wt, top: top, stretches: -0.9, by: 0.05, steps: 36)
                for j in 0..<min(8, blocks - first) {
                    let block = x + 32 * (first + j), o = out + bytes * (first + j)
                    storeHalf(s[j], o, 0)
                    storeHalf(m[j], o, 2)
                    let d = asHalf(s[j]), offset = asHalf(m[j]), id: Float = d != 0 ? 1 / d : 0
                    let q = (0..<32).map { level((block[$0] - offset) * id, 0, top) }
                    packNibbles(q, o, qs: five ? 8 : 4, qh: five ? 4 : nil)
                }
            }
        }
    }

    /// A k-quant's sub-block scales (or mins), all >= 0, as integers 0...top times one scale:
    /// the scale minimising sum w (v - scale q)^2 over 9 stretches of the grid that maps the
    /// largest value to top, then a few passes that move single levels while that improves the
    /// least-squares fit.
    static func positiveScales(_ v: [Float], weights w: [Float], top: Int) -> (scale: Float, levels: [Int]) {
        let n = v.count
        let largest = v.max() ?? 0
        guard largest > 1e-15 else { return (0, [Int](repeating: 0, count: n)) }
        func levels(_ iscale: Float) -> [Int] { v.map { level($0 * iscale, 0, top) } }
        func error(_ iscale: Float) -> Float {
            let q = levels(iscale), s = 1 / iscale
            var e: Float = 0
            for i in 0..<n { let d = v[i] - s * Float(q[i]); e += w[i] * d * d }
            return e
        }
        var iscale = Float(top) / largest, best = error(iscale)
        for step in -4...4 where step != 0 {
            let candidate = (0.1 * Float(step) + Float(top)) / largest
            let e = error(candidate)
            if e < best { best = e; iscale = candidate }
        }
        var q = levels(iscale)
        var sxl: Float = 0, sl2: Float = 0
        for i in 0..<n { sxl += w[i] * v[i] * Float(q[i]); sl2 += w[i] * Float(q[i] * q[i]) }
        for _ in 0..<5 {
            var changed = false
            for i in 0..<n {
                let l = Float(q[i])
                var a = sxl - w[i] * v[i] * l, b = sl2 - w[i] * l * l
                guard a > 0, b > 0 else { continue }
                let candidate = level(v[i] * b / a, 0, top)
                guard candidate != q[i] else { continue }
                a += w[i] * v[i] * Float(candidate)
                b += w[i] * Float(candidate * candidate)
                // The fitted scale a/b explains a^2/b of the weighted sum of squares: keep the larger.
                if a * a * sl2 > sxl * sxl * b { q[i] = candidate; sxl = a; sl2 = b; changed = true }
            }
            if !changed { break }
        }
        return (sl2 > 0 ? sxl / sl2 : 0, q)
    }

    @inline(__always) static func storeHalf(_ v: Float, _ p: UnsafeMutableRawPointer, _ offset: Int) {
        p.storeBytes(of: Half.floatToF16(v), toByteOffset: offset, as: UInt16.self)
    }

    /// The f16-rounded value, as the reader will see it.
    @inline(__always) static func asHalf(_ v: Float) -> Float { Half.f16ToFloat(Half.floatToF16(v)) }

    static func q8_0(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer) {
        var amax: Float = 0
        for j in 0..<32 { amax = max(amax, abs(x[j])) }
        let d = amax / 127, id: Float = d > 0 ? 1 / d : 0
        storeHalf(d, out, 0)
        for j in 0..<32 { out.storeBytes(of: Int8(level(x[j] * id, -127, 127)), toByteOffset: 2 + j, as: Int8.self) }
    }

    /// Packs 32 values of 0...15 (or 0...31) as Q4_0/Q5_0 store them: element j in the low nibble
    /// of byte j, element j + 16 in the high one, fifth bits in a 32-bit mask.
    static func packNibbles(_ q: [Int], _ out: UnsafeMutableRawPointer, qs: Int, qh: Int?) {
        var mask: UInt32 = 0
        for j in 0..<16 {
            out.storeBytes(of: UInt8((q[j] & 15) | ((q[j + 16] & 15) << 4)), toByteOffset: qs + j, as: UInt8.self)
            mask |= UInt32((q[j] >> 4) & 1) << j | UInt32((q[j + 16] >> 4) & 1) << (j + 16)
        }
        if let qh { out.storeBytes(of: mask.littleEndian, toByteOffset: qh, as: UInt32.self) }
    }

    /// Q4_0 / Q5_0: the value of largest magnitude maps to -8 (-16), so both signs use the range.
    static func symmetric(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, five: Bool) {
        var amax: Float = 0, extreme: Float = 0
        for j in 0..<32 where abs(x[j]) > amax { amax = abs(x[j]); extreme = x[j] }
        let levels: Float = five ? 16 : 8
        let d = extreme / -levels, id: Float = d != 0 ? 1 / d : 0
        storeHalf(d, out, 0)
        let top = five ? 31 : 15
        let q = (0..<32).map { j in level(x[j] * id + levels + 0.5, 0, top, .towardZero) }
        packNibbles(q, out, qs: five ? 6 : 2, qh: five ? 2 : nil)
    }

    /// Q4_1 / Q5_1: min to max over 16 (32) levels.
    static func withMin(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, five: Bool) {
        var lo = x[0], hi = x[0]
        for j in 1..<32 { lo = min(lo, x[j]); hi = max(hi, x[j]) }
        let top = five ? 31 : 15
        let d = (hi - lo) / Float(top), id: Float = d != 0 ? 1 / d : 0
        storeHalf(d, out, 0)
        storeHalf(lo, out, 2)
        let q = (0..<32).map { j in level((x[j] - lo) * id + 0.5, 0, top, .towardZero) }
        packNibbles(q, out, qs: five ? 8 : 4, qh: five ? 4 : nil)
    }

    /// For one sub-block, the scale and (non-positive) offset with x ~ scale * q + offset,
    /// q in 0...top, minimising sum w (x - scale q - offset)^2: starting from min-to-max, try
    /// `steps + 1` stretches of the grid (top + stretch levels over the range, stretch = `from`,
    /// `from + by`, ...) and refit scale and offset by least squares on each (`independentGrids`).
    /// `offsetsFollowingBest` is the search whose grids start from the best offset so far.
    static func scaleAndOffset(_ x: UnsafePointer<Float>, _ n: Int, weights w: UnsafePointer<Float>, top: Int, stretches from: Float = -1,
                               by: Float = 0.1, steps: Int = 20) -> (scale: Float, offset: Float) {
        precondition(n > 0 && n <= 32, "a sub-block of 1 to 32 values")
        var lo = x[0], hi = x[0]
        for i in 1..<n {
            if x[i] < lo { lo = x[i] }
            if x[i] > hi { hi = x[i] }
        }
        if lo > 0 { lo = 0 }
        if hi <= lo { return (0, lo) }
        return independentGrids(x, n, weights: w, top: top, lo: lo, hi: hi, from: from, by: by, steps: steps)
    }

    /// `scaleAndOffset` where every grid starts from the minimum: the grids do not depend on each
    /// other, so eight are fitted at once, one to a SIMD lane (lane 0 of the first eight is the
    /// min-to-max grid, whose error sets the first `best`). Each lane's sums run over the values
    /// in the scalar search's order with its operations, so the result is the same bit for bit;
    /// then the lanes are compared in the scalar search's order.
    static func independentGrids(_ x: UnsafePointer<Float>, _ n: Int, weights w: UnsafePointer<Float>, top: Int, lo: Float, hi: Float,
                                 from: Float, by: Float, steps: Int) -> (scale: Float, offset: Float) {
        let ceiling = Float(top)
        var sw: Float = 0, sx: Float = 0
        for i in 0..<n { sw += w[i]; sx += w[i] * x[i] }
        var bestScale = (hi - lo) / ceiling, bestOffset = lo, best: Float = 0
        let grids = steps + 2
        for first in stride(from: 0, to: grids, by: 8) {
            var iscale = SIMD8<Float>()
            for k in 0..<8 where first + k < grids {
                let step = first + k - 1
                iscale[k] = step < 0 ? ceiling / (hi - lo) : (from + by * Float(step) + ceiling) / (hi - lo)
            }
            var sl = SIMD8<Float>(), sl2 = SIMD8<Float>(), sxl = SIMD8<Float>()
            for i in 0..<n {
                let l = levels(iscale * (x[i] - lo), 0, ceiling), wl = w[i] * l
                sl += wl; sl2 += wl * l; sxl += wl * x[i]
            }
            let fit = refit(sw: SIMD8(repeating: sw), sx: SIMD8(repeating: sx), sl: sl, sl2: sl2, sxl: sxl)
            let det = fit.det
            var s = fit.scale, m = fit.offset
            if first == 0 { s[0] = bestScale; m[0] = bestOffset }
            var e = SIMD8<Float>()
            for i in 0..<n {
                let l = levels(iscale * (x[i] - lo), 0, ceiling)
                let d = s * l + m - x[i]
                e += w[i] * d * d
            }
            for k in 0..<8 where first + k < grids {
                if first + k == 0 {
                    best = e[0]
                } else if det[k] > 0 && e[k] < best {
                    best = e[k]; bestScale = s[k]; bestOffset = m[k]
                }
            }
        }
        return (bestScale, bestOffset)
    }

    /// The search of `scaleAndOffset` with each grid starting from the best offset found so far
    /// (llama.cpp's search with an importance matrix), for eight sub-blocks of 32 at once, one to
    /// a SIMD lane (`x[l]` and `w[l]` hold value l of each): each lane runs a scalar search's
    /// steps with the same operations in the same order, so each lane's result is that search's
    /// bit for bit (QuantizerSearchTests keeps the scalar form).
    static func offsetsFollowingBest(_ x: UnsafePointer<SIMD8<Float>>, weights w: UnsafePointer<SIMD8<Float>>, top: Int,
                                     stretches from: Float, by: Float, steps: Int) -> (scale: SIMD8<Float>, offset: SIMD8<Float>) {
        let n = 32, ceiling = Float(top)
        var lo = x[0], hi = x[0]
        for i in 1..<n {
            lo.replace(with: x[i], where: x[i] .< lo)
            hi.replace(with: x[i], where: x[i] .> hi)
        }
        lo.replace(with: 0, where: lo .> 0)
        let flat = hi .<= lo
        var sw = SIMD8<Float>(), sx = SIMD8<Float>()
        for i in 0..<n { sw += w[i]; sx += w[i] * x[i] }
        func error(_ s: SIMD8<Float>, _ m: SIMD8<Float>, _ iscale: SIMD8<Float>, _ origin: SIMD8<Float>) -> SIMD8<Float> {
            var e = SIMD8<Float>()
            for i in 0..<n {
                let d = s * levels(iscale * (x[i] - origin), 0, ceiling) + m - x[i]
                e += w[i] * d * d
            }
            return e
        }
        var origin = lo
        var bestScale = (hi - lo) / ceiling, bestOffset = lo
        var best = error(bestScale, bestOffset, ceiling / (hi - lo), origin)
        for step in 0...steps {
            let iscale = (from + by * Float(step) + ceiling) / (hi - origin)
            var sl = SIMD8<Float>(), sl2 = SIMD8<Float>(), sxl = SIMD8<Float>()
            for i in 0..<n {
                let l = levels(iscale * (x[i] - origin), 0, ceiling), wl = w[i] * l
                sl += wl; sl2 += wl * l; sxl += wl * x[i]
            }
            let (det, s, m) = refit(sw: sw, sx: sx, sl: sl, sl2: sl2, sxl: sxl)
            let e = error(s, m, iscale, origin)
            let better = (det .> 0) .& (e .< best)
            best.replace(with: e, where: better)
            bestScale.replace(with: s, where: better)
            bestOffset.replace(with: m, where: better)
            origin.replace(with: m, where: better)
        }
        bestScale.replace(with: 0, where: flat)
        bestOffset.replace(with: lo, where: flat)
        return (bestScale, bestOffset)
    }

    /// Eight grids' least-squares scale and (non-positive) offset from their weighted sums
    /// (Σw, Σwx, Σwl, Σwl², Σwlx), as the scalar search computes them; `det` <= 0 marks a grid
    /// that cannot be fitted.
    @inline(__always) static func refit(sw: SIMD8<Float>, sx: SIMD8<Float>, sl: SIMD8<Float>, sl2: SIMD8<Float>,
                                        sxl: SIMD8<Float>) -> (det: SIMD8<Float>, scale: SIMD8<Float>, offset: SIMD8<Float>) {
        let det = sw * sl2 - sl * sl
        var s = (sw * sxl - sx * sl) / det, m = (sl2 * sx - sl * sxl) / det
        let positive = m .> 0
        s.replace(with: sxl / sl2, where: positive)
        m.replace(with: 0, where: positive)
        return (det, s, m)
    }

    /// Eight grid levels: rounded to nearest (ties away from zero, as `Float.rounded()`) and
    /// clamped to lowest...highest, as the scalar searches' `Int(v.rounded())` clamped; a NaN
    /// (which that conversion traps on) becomes `lowest`, and -0 becomes 0.
    @inline(__always) static func levels(_ v: SIMD8<Float>, _ lowest: Float, _ highest: Float) -> SIMD8<Float> {
        var r = v.rounded(.toNearestOrAwayFromZero)
        r.replace(with: lowest, where: .!(r .>= lowest))
        r.replace(with: highest, where: r .> highest)
        return r + 0
    }

    /// Q4_K / Q5_K: eight sub-blocks of 32, each with a scale and min quantized to 6 bits.
    /// Without importance each value's error weighs rms + |x| (rms of its sub-block) and the
    /// 6-bit scales are taken against the largest; with it (see `quantize(_:_:count:importance:into:)`)
    /// the weights are importance x sqrt(σ² + x²), σ² twice the block's mean square, the search is
    /// finer, and the 6-bit scales and mins are fitted to the sub-blocks' scales and mins
    /// weighted by each sub-block's total weight.
    static func kQuant(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, five: Bool, importance: UnsafePointer<Float>? = nil) {
        let top = five ? 31 : 15
        var scales = [Float](repeating: 0, count: 8), mins = [Float](repeating: 0, count: 8)
        var subWeights = [Float](repeating: 0, count: 8)
        var sumSquares: Float = 0
        for i in 0..<256 { sumSquares += x[i] * x[i] }
        let sigma2 = 2 * sumSquares / 256
        if let importance {
            // The sub-blocks' searches, one to a SIMD lane: values and weights transposed so
            // that row l holds value l of each sub-block.
            withUnsafeTemporaryAllocation(of: SIMD8<Float>.self, capacity: 64) { buffer in
                let xt = buffer.baseAddress!, wt = xt + 32
                for j in 0..<8 {
                    let sub = x + 32 * j, imp = importance + 32 * j, any = weighs(imp, 32)
                    var total: Float = 0
                    for l in 0..<32 {
                        let w = (any ? imp[l] : 1) * (sigma2 + sub[l] * sub[l]).squareRoot()
                        total += w
                        xt[l][j] = sub[l]
                        wt[l][j] = w
                    }
                    subWeights[j] = total
                }
                let (s, m) = offsetsFollowingBest(xt, weights: wt, top: top, stretches: -0.9, by: 0.05, steps: 36)
                for j in 0..<8 {
                    scales[j] = max(0, s[j])
                    mins[j] = -m[j]
                }
            }
        } else {
            withUnsafeTemporaryAllocation(of: Float.self, capacity: 32) { w in
                let w = w.baseAddress!
                for j in 0..<8 {
                    let sub = x + 32 * j
                    var squares: Float = 0
                    for l in 0..<32 { squares += sub[l] * sub[l] }
                    let rms = (squares / 32).squareRoot()
                    for l in 0..<32 { w[l] = rms + abs(sub[l]) }
                    let (s, m) = scaleAndOffset(sub, 32, weights: w, top: top)
                    scales[j] = max(0, s)
                    mins[j] = -m
                }
            }
        }
        let ls: [Int], lm: [Int], dScale: Float, dMin: Float
        if importance != nil {
            (dScale, ls) = positiveScales(scales, weights: subWeights, top: 63)
            (dMin, lm) = positiveScales(mins, weights: subWeights, top: 63)
        } else {
            let maxScale = scales.max()!, maxMin = mins.max()!
            let invScale: Float = maxScale > 0 ? 63 / maxScale : 0, invMin: Float = maxMin > 0 ? 63 / maxMin : 0
            ls = scales.map { level($0 * invScale, 0, 63) }
            lm = mins.map { level($0 * invMin, 0, 63) }
            dScale = maxScale / 63
            dMin = maxMin / 63
        }
        storeHalf(dScale, out, 0)
        storeHalf(dMin, out, 2)
        var packed = [UInt8](repeating: 0, count: 12)
        for j in 0..<8 {
            if j < 4 {
                packed[j] = UInt8(ls[j]); packed[j + 4] = UInt8(lm[j])
            } else {
                packed[j + 4] = UInt8((ls[j] & 15) | ((lm[j] & 15) << 4))
                packed[j - 4] |= UInt8((ls[j] >> 4) << 6)
                packed[j] |= UInt8((lm[j] >> 4) << 6)
            }
        }
        for (i, b) in packed.enumerated() { out.storeBytes(of: b, toByteOffset: 4 + i, as: UInt8.self) }
        let d = asHalf(dScale), dmin = asHalf(dMin)
        var q = [Int](repeating: 0, count: 256)
        for j in 0..<8 {
            let sd = d * Float(ls[j]), sm = dmin * Float(lm[j])
            guard sd > 0 else { continue }
            for l in 0..<32 { q[32 * j + l] = level((x[32 * j + l] + sm) / sd, 0, top) }
        }
        packKQuant(q, out, five: five)
    }

    /// Stores Q4_K/Q5_K's 256 levels (0...15 or 0...31) after the block's scales: pairs of
    /// 32-value sub-blocks share bytes (low nibbles the first), fifth bits in 32 bytes before.
    static func packKQuant(_ q: [Int], _ out: UnsafeMutableRawPointer, five: Bool) {
        let qs = five ? 48 : 16
        for c in 0..<4 {
            for l in 0..<32 {
                let a = q[64 * c + l], b = q[64 * c + 32 + l]
                out.storeBytes(of: UInt8((a & 15) | ((b & 15) << 4)), toByteOffset: qs + 32 * c + l, as: UInt8.self)
            }
        }
        if five {
            for l in 0..<32 {
                var h = 0
                for c in 0..<4 { h |= ((q[64 * c + l] >> 4) & 1) << (2 * c) | ((q[64 * c + 32 + l] >> 4) & 1) << (2 * c + 1) }
                out.storeBytes(of: UInt8(h), toByteOffset: 16 + l, as: UInt8.self)
            }
        }
    }

    /// The scale minimising sum w (x - scale q)^2, q in -top...highest: the grid that maps the
    /// extreme value to -top and 18 stretches of it (top ± 0.1 ... 0.9 levels), each refitted by
    /// least squares. The grids do not depend on each other: eight are fitted at once, one to a
    /// SIMD lane, each lane's sums in the order of the values, then compared in order of stretch.
    static func symmetricScale(_ x: UnsafePointer<Float>, _ n: Int, weights w: UnsafePointer<Float>, top: Int, highest: Int) -> Float {
        var amax: Float = 0, extreme: Float = 0
        for i in 0..<n where abs(x[i]) > amax { amax = abs(x[i]); extreme = x[i] }
        guard amax > 1e-30 else { return 0 }
        // Grid 0 maps the extreme to -top; grids 1...18 stretch it by -0.9...-0.1, 0.1...0.9 levels.
        var scale: Float = 0, best: Float = 0
        for first in stride(from: 0, to: 19, by: 8) {
            var iscale = SIMD8<Float>()
            for k in 0..<8 where first + k < 19 {
                let g = first + k, step = g <= 9 ? g - 10 : g - 9
                iscale[k] = g == 0 ? -Float(top) / extreme : -(Float(top) + 0.1 * Float(step)) / extreme
            }
            var sxl = SIMD8<Float>(), sl2 = SIMD8<Float>()
            for i in 0..<n {
                let v = x[i], l = levels(iscale * v, -Float(top), Float(highest))
                sxl += w[i] * v * l; sl2 += w[i] * l * l
            }
            for k in 0..<8 where first + k < 19 {
                let a = sxl[k], b = sl2[k]
                if first + k == 0 {
                    scale = b > 0 ? a / b : 0
                    best = scale * a
                } else if b > 0, a * a > best * b {
                    scale = a / b; best = scale * a
                }
            }
        }
        return scale
    }

    /// Q6_K: sixteen sub-blocks of 16 with int8 scales against one f16 scale. Each sub-block's
    /// scale minimises its squared error weighted by x^2, or by the importance alone when given.
    static func q6_K(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, importance: UnsafePointer<Float>? = nil) {
        var scales = [Float](repeating: 0, count: 16)
        withUnsafeTemporaryAllocation(of: Float.self, capacity: 16) { w in
            let w = w.baseAddress!
            for j in 0..<16 {
                let sub = x + 16 * j
                if let importance {
                    let imp = importance + 16 * j, any = weighs(imp, 16)
                    for l in 0..<16 { w[l] = any ? imp[l] : 1 }
                    scales[j] = symmetricScale(sub, 16, weights: w, top: 32, highest: 31)
                } else {
                    for l in 0..<16 { w[l] = sub[l] * sub[l] }
                    scales[j] = symmetricScale(sub, 16, weights: w, top: 32, highest: 31)
                }
            }
        }
        var extreme: Float = 0
        for s in scales where abs(s) > abs(extreme) { extreme = s }
        var q = [Int](repeating: 32, count: 256)
        if extreme == 0 {
            for i in 0..<210 { out.storeBytes(of: UInt8(0), toByteOffset: i, as: UInt8.self) }
            return
        }
        let iscale = -128 / extreme
        storeHalf(1 / iscale, out, 208)
        let d = asHalf(1 / iscale)
        for j in 0..<16 {
            let sc = level(iscale * scales[j], -128, 127)
            out.storeBytes(of: Int8(sc), toByteOffset: 192 + j, as: Int8.self)
            let sd = d * Float(sc)
            guard sd != 0 else { continue }
            for l in 0..<16 { q[16 * j + l] = level(x[16 * j + l] / sd, -32, 31) + 32 }
        }
        packQ6K(q, out)
    }

    /// Stores Q6_K's 256 levels (0...63): low four bits in 128 bytes, high two in 64.
    static func packQ6K(_ q: [Int], _ out: UnsafeMutableRawPointer) {
        for half in 0..<2 {
            for l in 0..<32 {
                let b = 128 * half + l
                out.storeBytes(of: UInt8((q[b] & 15) | ((q[b + 64] & 15) << 4)), toByteOffset: 64 * half + l, as: UInt8.self)
                out.storeBytes(of: UInt8((q[b + 32] & 15) | ((q[b + 96] & 15) << 4)), toByteOffset: 64 * half + 32 + l, as: UInt8.self)
                let h = (q[b] >> 4) | ((q[b + 32] >> 4) << 2) | ((q[b + 64] >> 4) << 4) | ((q[b + 96] >> 4) << 6)
                out.storeBytes(of: UInt8(h), toByteOffset: 128 + 32 * half + l, as: UInt8.self)
            }
        }
    }

    /// The index of the IQ4 level nearest to `v` (the upper one on a tie, as ggml rounds).
    @inline(__always) static func nearestLevel(_ v: Float) -> Int {
        let levels = IQ4.levels
        if v <= Float(levels[0]) { return 0 }
        if v >= Float(levels[15]) { return 15 }
        var upper = 1
        while Float(levels[upper]) <= v { upper += 1 }
        return v - Float(levels[upper - 1]) < Float(levels[upper]) - v ? upper - 1 : upper
    }

    /// The IQ4 level (its value) nearest to each of eight values, as `nearestLevel` chooses:
    /// the outermost level beyond the table's ends, else the lower of the two levels around the
    /// value where it is strictly nearer.
    @inline(__always) static func nearestLevelValues(_ v: SIMD8<Float>) -> SIMD8<Float> {
        let table = IQ4.levels
        var lower = SIMD8<Float>(repeating: Float(table[0])), upper = SIMD8<Float>(repeating: Float(table[1]))
        for k in 1..<15 {
            let at = v .>= Float(table[k])
            lower.replace(with: Float(table[k]), where: at)
            upper.replace(with: Float(table[k + 1]), where: at)
        }
        var q = upper
        q.replace(with: lower, where: v - lower .< upper - v)
        q.replace(with: Float(table[0]), where: v .<= Float(table[0]))
        q.replace(with: Float(table[15]), where: v .>= Float(table[15]))
        return q
    }

    /// IQ4_NL (`count` 32: one block, its f16 scale) and IQ4_XS (`count` 256: eight sub-blocks
    /// of 32 whose scales are 6-bit integers times an f16 super-block scale), as ggml's quantizer
    /// computes them, step for step and in the same float operations, so a file matches
    /// llama-quantize's byte for byte. Each sub-block's scale is searched for the least weighted
    /// squared error: first the grid that puts the value of largest magnitude on the table's
    /// outermost level (127), refitted by least squares, then the grids that put it on 120...134
    /// (each refitted too), keeping the best. Values are weighted by x² without importance; with
    /// it (one value per column) by importance × sqrt(σ² + x²), σ² twice the mean square of the
    /// `count` values, a sub-block whose importance is all zero weighted as if every column
    /// mattered equally. The values are then matched to the nearest level at the scale as stored
    /// (IQ4_XS: the sub-block's 6-bit scale times the super-block scale before f16 rounding, as
    /// ggml does).
    static func iq4(_ x: UnsafePointer<Float>, count n: Int, _ out: UnsafeMutableRawPointer, importance: UnsafePointer<Float>? = nil) {
        var sigma2: Float = 0
        for j in 0..<n { sigma2 += x[j] * x[j] }
        sigma2 *= 2 / Float(n)
        let subBlocks = n / 32
        var scales = [Float](repeating: 0, count: subBlocks)
        var largest: Float = 0, extremeScale: Float = 0
        var w = [Float](repeating: 0, count: 32)
        for s in 0..<subBlocks {
            let xb = x + 32 * s
            if let importance {
                let imp = blockImportance(importance + 32 * s, 32)
                for j in 0..<32 { w[j] = imp[j] * (sigma2 + xb[j] * xb[j]).squareRoot() }
            } else {
                for j in 0..<32 { w[j] = xb[j] * xb[j] }
            }
            var amax: Float = 0, extreme: Float = 0
            for j in 0..<32 where abs(xb[j]) > amax { amax = abs(xb[j]); extreme = xb[j] }
            guard amax >= 1e-15 else { continue }
            // Σ w q x and Σ w q² for the levels the values take at eight inverse scales, one to a
            // lane, each lane's sums in the order of the values.
            func fit(_ id: SIMD8<Float>) -> (SIMD8<Float>, SIMD8<Float>) {
                var sqx = SIMD8<Float>(), sq2 = SIMD8<Float>()
                for j in 0..<32 {
                    let q = nearestLevelValues(id * xb[j])
                    sqx += w[j] * q * xb[j]
                    sq2 += w[j] * q * q
                }
                return (sqx, sq2)
            }
            // The grid with the extreme on level 127, then the ones putting it on 120...134, in
            // that order: lane 0 of the first eight, then stretches -7...7.
            var first = SIMD8<Float>(), second = SIMD8<Float>()
            first[0] = 1 / (-extreme / -127)
            for k in 1..<8 { first[k] = Float(k - 8 - 127) / extreme }
            for k in 0..<8 { second[k] = Float(k - 127) / extreme }
            let (ax, a2) = fit(first), (bx, b2) = fit(second)
            var d: Float = a2[0] > 0 ? ax[0] / a2[0] : 0
            var best = d * ax[0]
            for g in 1..<16 {
                let sqx = g < 8 ? ax[g] : bx[g - 8], sq2 = g < 8 ? a2[g] : b2[g - 8]
                if sq2 > 0 && sqx * sqx > best * sq2 { d = sqx / sq2; best = d * sqx }
            }
            scales[s] = d
            if abs(d) > largest { largest = abs(d); extremeScale = d }
        }
        var levels = [Int](repeating: 0, count: n)
        if subBlocks == 1 {
            storeHalf(scales[0], out, 0)
            let id: Float = scales[0] != 0 ? 1 / scales[0] : 0
            for j in 0..<32 { levels[j] = nearestLevel(id * x[j]) }
        } else {
            // The largest sub-block scale maps to -32, the end of the 6-bit range with more room.
            let d = -extremeScale / 32
            storeHalf(d, out, 0)
            let id: Float = d != 0 ? 1 / d : 0
            var high: UInt16 = 0
            var low = [UInt8](repeating: 0, count: 4)
            for s in 0..<subBlocks {
                let l = level(id * scales[s], -32, 31, .toNearestOrEven)
                let dl = d * Float(l), idl: Float = dl != 0 ? 1 / dl : 0
                for j in 0..<32 { levels[32 * s + j] = nearestLevel(idl * x[32 * s + j]) }
                let stored = l + 32
                low[s / 2] |= UInt8(stored & 15) << (4 * (s % 2))
                high |= UInt16(stored >> 4) << (2 * s)
            }
            out.storeBytes(of: high.littleEndian, toByteOffset: 2, as: UInt16.self)
            for i in 0..<4 { out.storeBytes(of: low[i], toByteOffset: 4 + i, as: UInt8.self) }
        }
        let qs = subBlocks == 1 ? 2 : 8
        for s in 0..<subBlocks {
            for j in 0..<16 {
                let b = UInt8(levels[32 * s + j] | levels[32 * s + 16 + j] << 4)
                out.storeBytes(of: b, toByteOffset: qs + 16 * s + j, as: UInt8.self)
            }
        }
    }
}

/// Q3_K and Q2_K. Their fits follow llama.cpp's reference quantizers step for step (the same
/// searches, the same order of float operations, rounding to nearest with ties to even), so
/// plain rounding gives llama-quantize's bytes; the other k-quants above use fits of their own.
extension Quantizer {
    /// Nearest integer, ties to even; non-finite values give 0.
    @inline(__always) static func nearest(_ v: Float) -> Int {
        guard v.isFinite else { return 0 }
        return Int(max(-4_194_303, min(4_194_303, v)).rounded(.toNearestOrEven))
    }

    /// The value of largest magnitude, sign kept (the first of equal magnitudes).
    @inline(__always) static func extreme(_ x: UnsafePointer<Float>, _ n: Int) -> (value: Float, magnitude: Float) {
        var amax: Float = 0, value: Float = 0
        for i in 0..<n where abs(x[i]) > amax { amax = abs(x[i]); value = x[i] }
        return (value, amax)
    }

    /// A symmetric sub-block's scale, levels -top...top-1 weighted by x² (Q3_K without importance):
    /// the grid that maps the extreme value to -top, then up to five passes that move single
    /// levels where that improves the least-squares fit. `levels` gets q + top.
    static func symmetricLevels(_ x: UnsafePointer<Float>, _ n: Int, top: Int, _ levels: UnsafeMutablePointer<Int>) -> Float {
        let (peak, amax) = extreme(x, n)
        guard amax >= 1e-15 else {
            for i in 0..<n { levels[i] = 0 }
            return 0
        }
        let iscale = -Float(top) / peak
        var sumlx: Float = 0, suml2: Float = 0
        for i in 0..<n {
            let l = max(-top, min(top - 1, nearest(iscale * x[i])))
            levels[i] = l
            let w = x[i] * x[i]
            sumlx += w * x[i] * Float(l)
            suml2 += w * Float(l) * Float(l)
        }
        for _ in 0..<5 {
            var changed = false
            for i in 0..<n {
                let w = x[i] * x[i]
                var slx = sumlx - w * x[i] * Float(levels[i])
                guard slx > 0 else { continue }
                var sl2 = suml2 - w * Float(levels[i]) * Float(levels[i])
                let candidate = max(-top, min(top - 1, nearest(x[i] * sl2 / slx)))
                guard candidate != levels[i] else { continue }
                slx += w * x[i] * Float(candidate)
                sl2 += w * Float(candidate) * Float(candidate)
                if sl2 > 0, slx * slx * suml2 > sumlx * sumlx * sl2 {
                    levels[i] = candidate; sumlx = slx; suml2 = sl2; changed = true
                }
            }
            if !changed { break }
        }
        for i in 0..<n { levels[i] += top }
        return suml2 > 0 ? sumlx / suml2 : 0
    }

    /// The scale minimising sum w (x - scale q)², q in -top...top-1: the grid mapping the extreme
    /// value to -top and 18 stretches of it, each refitted by least squares. `levels` gets q + top
    /// of the best grid (all 0 when x is).
    static func weightedSymmetricLevels(_ x: UnsafePointer<Float>, _ n: Int, top: Int, weights w: UnsafePointer<Float>,
                                        _ levels: UnsafeMutablePointer<Int>) -> Float {
        let (peak, amax) = extreme(x, n)
        guard amax >= 1e-15 else {
            for i in 0..<n { levels[i] = 0 }
            return 0
        }
        func fit(_ iscale: Float) -> (Float, Float) {
            var sumlx: Float = 0, suml2: Float = 0
            for i in 0..<n {
                let l = Float(max(-top, min(top - 1, nearest(iscale * x[i]))))
                sumlx += w[i] * x[i] * l
                suml2 += w[i] * l * l
            }
            return (sumlx, suml2)
        }
        func setLevels(_ iscale: Float) { for i in 0..<n { levels[i] = top + max(-top, min(top - 1, nearest(iscale * x[i]))) } }
        var iscale = -Float(top) / peak
        setLevels(iscale)
        let (sumlx, suml2) = fit(iscale)
        var scale: Float = suml2 != 0 ? sumlx / suml2 : 0
        var best = scale * sumlx
        for step in -9...9 where step != 0 {
            iscale = -(Float(top) + 0.1 * Float(step)) / peak
            let (a, b) = fit(iscale)
            if b > 0, a * a > best * b {
                setLevels(iscale)
                scale = a / b
                best = scale * a
            }
        }
        return scale
    }

    /// A sub-block of 16 as scale * q - min, q in 0...top, min >= 0 (Q2_K): from min-to-max,
    /// `steps + 1` stretches of the grid (top + from + by i levels over the range), each refitted
    /// for scale and min by weighted least squares, the best (by summed weighted absolute error
    /// with `absolute`, else squared) kept and the next grid taken from its min. `levels` gets q.
    static func offsetLevels(_ x: UnsafePointer<Float>, _ n: Int, top: Int, weights w: UnsafePointer<Float>, from: Float, by: Float,
                             steps: Int, absolute: Bool, _ levels: UnsafeMutablePointer<Int>) -> (scale: Float, min: Float) {
        var lo = x[0], hi = x[0]
        var sumW = w[0], sumX = sumW * x[0]
        for i in 1..<n {
            if x[i] < lo { lo = x[i] }
            if x[i] > hi { hi = x[i] }
            sumW += w[i]
            sumX += w[i] * x[i]
        }
        if lo > 0 { lo = 0 }
        if hi == lo {
            for i in 0..<n { levels[i] = 0 }
            return (0, -lo)
        }
        @inline(__always) func cost(_ d: Float) -> Float { absolute ? abs(d) : d * d }
        var iscale = Float(top) / (hi - lo)
        var scale = 1 / iscale
        var bestError: Float = 0
        for i in 0..<n {
            levels[i] = max(0, min(top, nearest(iscale * (x[i] - lo))))
            bestError += w[i] * cost(scale * Float(levels[i]) + lo - x[i])
        }
        var trial = [Int](repeating: 0, count: n)
        for step in 0...steps {
            iscale = (from + by * Float(step) + Float(top)) / (hi - lo)
            var sumL: Float = 0, sumL2: Float = 0, sumXL: Float = 0
            for i in 0..<n {
                let l = max(0, min(top, nearest(iscale * (x[i] - lo))))
                trial[i] = l
                sumL += w[i] * Float(l)
                sumL2 += w[i] * Float(l) * Float(l)
                sumXL += w[i] * Float(l) * x[i]
            }
            let det = sumW * sumL2 - sumL * sumL
            guard det > 0 else { continue }
            var s = (sumW * sumXL - sumX * sumL) / det
            var m = (sumL2 * sumX - sumL * sumXL) / det
            if m > 0 {
                m = 0
                s = sumXL / sumL2
            }
            var error: Float = 0
            for i in 0..<n { error += w[i] * cost(s * Float(trial[i]) + m - x[i]) }
            if error < bestError {
                for i in 0..<n { levels[i] = trial[i] }
                bestError = error
                scale = s
                lo = m
            }
        }
        return (scale, -lo)
    }

    /// Non-negative values as levels 0...top (stored as bytes, as the reference keeps them) times
    /// one scale, weighted: the best of nine stretches of the grid mapping the largest value to
    /// top, then up to five passes moving single levels while the least-squares fit improves.
    static func positiveLevels(_ x: [Float], top: Int, weights w: [Float]) -> (scale: Float, levels: [UInt8]) {
        let n = x.count
        var largest: Float = 0
        for v in x { largest = max(largest, v) }
        guard largest >= 1e-15 else { return (0, [UInt8](repeating: 0, count: n)) }
        var iscale = Float(top) / largest
        var levels = x.map { UInt8(truncatingIfNeeded: nearest(iscale * $0)) }
        let scale = 1 / iscale
        var bestError: Float = 0
        for i in 0..<n {
            let d = x[i] - scale * Float(levels[i])
            bestError += w[i] * d * d
        }
        for step in -4...4 where step != 0 {
            let candidate = (0.1 * Float(step) + Float(top)) / largest, s = 1 / candidate
            var error: Float = 0
            for i in 0..<n {
                let d = x[i] - s * Float(min(top, nearest(candidate * x[i])))
                error += w[i] * d * d
            }
            if error < bestError { bestError = error; iscale = candidate }
        }
        var sumlx: Float = 0, suml2: Float = 0
        for i in 0..<n {
            let l = min(top, nearest(iscale * x[i]))
            levels[i] = UInt8(truncatingIfNeeded: l)
            sumlx += w[i] * x[i] * Float(l)
            suml2 += w[i] * Float(l) * Float(l)
        }
        for _ in 0..<5 {
            var changed = false
            for i in 0..<n {
                let li = Float(levels[i])
                var slx = sumlx - w[i] * x[i] * li, sl2 = suml2 - w[i] * li * li
                guard slx > 0, sl2 > 0 else { continue }
                let candidate = min(top, nearest(x[i] * sl2 / slx))
                guard candidate != Int(levels[i]) else { continue }
                slx += w[i] * x[i] * Float(candidate)
                sl2 += w[i] * Float(candidate) * Float(candidate)
                if slx * slx * suml2 > sumlx * sumlx * sl2 {
                    levels[i] = UInt8(truncatingIfNeeded: candidate); sumlx = slx; suml2 = sl2; changed = true
                }
            }
            if !changed { break }
        }
        return (suml2 > 0 ? sumlx / suml2 : 0, levels)
    }

    /// 256 values of 0...3 as Q2_K and Q3_K store their low bits: byte 32h + l holds values
    /// 128h + l + 32s at bits 2s.
    static func packTwoBits(_ q: UnsafePointer<Int>, _ out: UnsafeMutableRawPointer) {
        for h in 0..<2 {
            for l in 0..<32 {
                let b = 128 * h + l
                out.storeBytes(of: UInt8(truncatingIfNeeded: q[b] | q[b + 32] << 2 | q[b + 64] << 4 | q[b + 96] << 6),
                               toByteOffset: 32 * h + l, as: UInt8.self)
            }
        }
    }

    /// Q3_K: sixteen sub-blocks of 16 values -4...3 with 6-bit signed scales against one f16
    /// scale. Without importance each sub-block's scale minimises its error weighted by x² and
    /// the scales are rounded against the largest; with it, the weights are
    /// importance x sqrt(σ² + x²) (σ² twice the block's mean square) and the 6-bit scales are
    /// fitted weighted by each sub-block's total weight. Values are then rounded again against
    /// the scales as stored.
    static func q3_K(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, importance: UnsafePointer<Float>? = nil) {
        withUnsafeTemporaryAllocation(of: Int.self, capacity: 256) { buffer in
            let q = buffer.baseAddress!
            var stored = [Int](repeating: 0, count: 16)  // 6-bit scales, offset by 32
            var d: Float = 0
            if let importance {
                var sumSquares: Float = 0
                for i in 0..<256 { sumSquares += x[i] * x[i] }
                let sigma2 = 2 * sumSquares / 256
                var scales = [Float](repeating: 0, count: 16), subWeights = [Float](repeating: 0, count: 16)
                for j in 0..<16 {
                    let imp = blockImportance(importance + 16 * j, 16)
                    let w = (0..<16).map { imp[$0] * (sigma2 + x[16 * j + $0] * x[16 * j + $0]).squareRoot() }
                    subWeights[j] = w.reduce(0, +)
                    scales[j] = weightedSymmetricLevels(x + 16 * j, 16, top: 4, weights: w, q + 16 * j)
                }
                d = weightedSymmetricLevels(scales, 16, top: 32, weights: subWeights, &stored)
            } else {
                var scales = [Float](repeating: 0, count: 16)
                for j in 0..<16 { scales[j] = symmetricLevels(x + 16 * j, 16, top: 4, q + 16 * j) }
                let peak = extreme(scales, 16).value
                if peak != 0 {
                    let iscale = -32 / peak
                    for j in 0..<16 { stored[j] = max(-32, min(31, nearest(iscale * scales[j]))) + 32 }
                    d = 1 / iscale
                }
            }
            var packed = [UInt8](repeating: 0, count: 12)
            for j in 0..<16 {
                let l = stored[j]
                packed[j % 8] |= UInt8(truncatingIfNeeded: (l & 0xF) << (j < 8 ? 0 : 4))
                packed[8 + j % 4] |= UInt8(truncatingIfNeeded: (l >> 4) << (2 * (j / 4)))
            }
            for (i, b) in packed.enumerated() { out.storeBytes(of: b, toByteOffset: 96 + i, as: UInt8.self) }
            storeHalf(d, out, 108)
            let dd = asHalf(d)
            for j in 0..<16 {
                let scale = packed.withUnsafeBytes { dd * Float(KQuant.q3Scale($0.baseAddress!, j)) }
                guard scale != 0 else { continue }
                for i in 0..<16 { q[16 * j + i] = max(-4, min(3, nearest(x[16 * j + i] / scale))) + 4 }
            }
            var mask = [UInt8](repeating: 0, count: 32)
            for i in 0..<256 where q[i] > 3 {
                mask[i % 32] |= UInt8(1) << (i / 32)
                q[i] -= 4
            }
            for (i, b) in mask.enumerated() { out.storeBytes(of: b, toByteOffset: i, as: UInt8.self) }
            packTwoBits(q, out + 32)
        }
    }

    /// Q2_K: sixteen sub-blocks of 16 values 0...3, each with a 4-bit scale and a 4-bit min
    /// against f16 super-block scales. Without importance each sub-block's scale and min
    /// minimise its absolute error weighted by |x| and are rounded against the largest; with
    /// it, the squared error weighted by importance x sqrt(σ² + x²) (σ² the block's mean square)
    /// over a finer search, and the 4-bit scales and mins are fitted weighted by each sub-block's
    /// total weight. Values are then rounded again against the scales and mins as stored.
    static func q2_K(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, importance: UnsafePointer<Float>? = nil) {
        withUnsafeTemporaryAllocation(of: Int.self, capacity: 256) { buffer in
            let q = buffer.baseAddress!
            var scales = [Float](repeating: 0, count: 16), mins = [Float](repeating: 0, count: 16)
            var packed = [UInt8](repeating: 0, count: 16)
            var d: Float = 0, dmin: Float = 0
            if let importance {
                var sumSquares: Float = 0
                for i in 0..<256 { sumSquares += x[i] * x[i] }
                let sigma2 = sumSquares / 256
                var subWeights = [Float](repeating: 0, count: 16)
                for j in 0..<16 {
                    let imp = blockImportance(importance + 16 * j, 16)
                    let w = (0..<16).map { imp[$0] * (sigma2 + x[16 * j + $0] * x[16 * j + $0]).squareRoot() }
                    subWeights[j] = w.reduce(0, +)
                    (scales[j], mins[j]) = offsetLevels(x + 16 * j, 16, top: 3, weights: w, from: -0.9, by: 0.05, steps: 36,
                                                        absolute: false, q + 16 * j)
                }
                let (ds, ls) = positiveLevels(scales, top: 15, weights: subWeights)
                let (dm, lm) = positiveLevels(mins, top: 15, weights: subWeights)
                d = ds; dmin = dm
                for j in 0..<16 { packed[j] = ls[j] | lm[j] << 4 }
            } else {
                var maxScale: Float = 0, maxMin: Float = 0
                for j in 0..<16 {
                    let w = (0..<16).map { abs(x[16 * j + $0]) }
                    (scales[j], mins[j]) = offsetLevels(x + 16 * j, 16, top: 3, weights: w, from: -0.5, by: 0.1, steps: 15,
                                                        absolute: true, q + 16 * j)
                    if scales[j] > maxScale { maxScale = scales[j] }
                    if mins[j] > maxMin { maxMin = mins[j] }
                }
                if maxScale > 0 {
                    let iscale = 15 / maxScale
                    for j in 0..<16 { packed[j] = UInt8(truncatingIfNeeded: nearest(iscale * scales[j])) }
                    d = maxScale / 15
                }
                if maxMin > 0 {
                    let iscale = 15 / maxMin
                    for j in 0..<16 { packed[j] |= UInt8(truncatingIfNeeded: nearest(iscale * mins[j]) << 4) }
                    dmin = maxMin / 15
                }
            }
            for (i, b) in packed.enumerated() { out.storeBytes(of: b, toByteOffset: i, as: UInt8.self) }
            storeHalf(d, out, 80)
            storeHalf(dmin, out, 82)
            let dd = asHalf(d), dm = asHalf(dmin)
            for j in 0..<16 {
                let scale = dd * Float(packed[j] & 0xF)
                guard scale != 0 else { continue }
                let m = dm * Float(packed[j] >> 4)
                for i in 0..<16 { q[16 * j + i] = max(0, min(3, nearest((x[16 * j + i] + m) / scale))) }
            }
            packTwoBits(q, out + 16)
        }
    }
}
