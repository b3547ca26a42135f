import Foundation

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
        case .q4_1, .q5_1:
            for b in 0..<(n / 32) {
                weightedWithMin(x + 32 * b, blockImportance(importance + 32 * b, 32), sigma2: sigma2, out + type.blockBytes * b,
                                five: type == .q5_1)
            }
        case .q4_K, .q5_K:
            for b in 0..<(n / 256) { kQuant(x + 256 * b, out + type.blockBytes * b, five: type == .q5_K, importance: importance + 256 * b) }
        case .q6_K:
            for b in 0..<(n / 256) { q6_K(x + 256 * b, out + 210 * b, importance: importance + 256 * b) }
        }
    }

    /// `n` importance values, or ones where they are all zero (nothing to weigh by).
    static func blockImportance(_ p: UnsafePointer<Float>, _ n: Int) -> [Float] {
        let v = Array(UnsafeBufferPointer(start: p, count: n))
        return v.contains { $0 > 0 } ? v : [Float](repeating: 1, count: n)
    }

    /// Q8_0, Q4_0 or Q5_0 with the scale of least weighted error, values then rounded against the
    /// stored (f16) scale.
    static func weightedSymmetric(_ type: DType, _ x: UnsafePointer<Float>, _ importance: [Float], sigma2: Float, top: Int, highest: Int,
                                  _ out: UnsafeMutableRawPointer) {
        let xs = Array(UnsafeBufferPointer(start: x, count: 32))
        let w = (0..<32).map { importance[$0] * (sigma2 + xs[$0] * xs[$0]).squareRoot() }
        let scale = symmetricScale(xs, weights: w, top: top, highest: highest)
        storeHalf(scale, out, 0)
        let d = asHalf(scale), id: Float = d != 0 ? 1 / d : 0
        let q = xs.map { max(-top, min(highest, Int(($0 * id).rounded()))) }
        if type == .q8_0 {
            for j in 0..<32 { out.storeBytes(of: Int8(q[j]), toByteOffset: 2 + j, as: Int8.self) }
        } else {
            let five = type == .q5_0
            packNibbles(q.map { $0 + top }, out, qs: five ? 6 : 2, qh: five ? 2 : nil)
        }
    }

    /// Q4_1 or Q5_1 with the scale and (non-positive) min of least weighted error, values then
    /// rounded against the stored (f16) scale and min.
    static func weightedWithMin(_ x: UnsafePointer<Float>, _ importance: [Float], sigma2: Float, _ out: UnsafeMutableRawPointer, five: Bool) {
        let top = five ? 31 : 15
        let xs = Array(UnsafeBufferPointer(start: x, count: 32))
        let w = (0..<32).map { importance[$0] * (sigma2 + xs[$0] * xs[$0]).squareRoot() }
        let (scale, offset) = scaleAndOffset(xs[...], weights: w, top: top, stretches: -0.9, by: 0.05, steps: 36, followingBest: true)
        storeHalf(scale, out, 0)
        storeHalf(offset, out, 2)
        let d = asHalf(scale), m = asHalf(offset), id: Float = d != 0 ? 1 / d : 0
        let q = xs.map { max(0, min(top, Int((($0 - m) * id).rounded()))) }
        packNibbles(q, out, qs: five ? 8 : 4, qh: five ? 4 : nil)
    }

    /// A k-quant's sub-block scales (or mins), all >= 0, as integers 0...top times one scale:
    /// the scale minimising sum w (v - scale q)^2 over 9 stretches of the grid that maps the
    /// largest value to top, then a few passes that move single levels while that improves the
    /// least-squares fit.
    static func positiveScales(_ v: [Float], weights w: [Float], top: Int) -> (scale: Float, levels: [Int]) {
        let n = v.count
        let largest = v.max() ?? 0
        guard largest > 1e-15 else { return (0, [Int](repeating: 0, count: n)) }
        func levels(_ iscale: Float) -> [Int] { v.map { max(0, min(top, Int(($0 * iscale).rounded()))) } }
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
                let candidate = max(0, min(top, Int((v[i] * b / a).rounded())))
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
        for j in 0..<32 { out.storeBytes(of: Int8(max(-127, min(127, (x[j] * id).rounded()))), toByteOffset: 2 + j, as: Int8.self) }
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
        let q = (0..<32).map { j in max(0, min(top, Int(x[j] * id + levels + 0.5))) }
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
        let q = (0..<32).map { j in max(0, min(top, Int((x[j] - lo) * id + 0.5))) }
        packNibbles(q, out, qs: five ? 8 : 4, qh: five ? 4 : nil)
    }

    /// For one sub-block, the scale and (non-positive) offset with x ~ scale * q + offset,
    /// q in 0...top, minimising sum w (x - scale q - offset)^2: starting from min-to-max, try
    /// `steps + 1` stretches of the grid (top + stretch levels over the range, stretch = `from`,
    /// `from + by`, ...) and refit scale and offset by least squares on each. With
    /// `followingBest` each grid starts from the best offset found so far instead of the minimum.
    static func scaleAndOffset(_ x: ArraySlice<Float>, weights w: [Float], top: Int, stretches from: Float = -1, by: Float = 0.1,
                               steps: Int = 20, followingBest: Bool = false) -> (scale: Float, offset: Float) {
        let base = x.startIndex
        var lo = x.min()!, hi = x.max()!
        if lo > 0 { lo = 0 }
        if hi <= lo { return (0, lo) }
        let n = x.count
        func error(_ s: Float, _ m: Float, _ q: [Int]) -> Float {
            var e: Float = 0
            for i in 0..<n { let d = s * Float(q[i]) + m - x[base + i]; e += w[i] * d * d }
            return e
        }
        var origin = lo
        func grid(_ iscale: Float) -> [Int] { (0..<n).map { max(0, min(top, Int((iscale * (x[base + $0] - origin)).rounded()))) } }
        var bestScale = (hi - lo) / Float(top), bestOffset = lo
        var best = error(bestScale, bestOffset, grid(Float(top) / (hi - lo)))
        for step in 0...steps {
            let q = grid((from + by * Float(step) + Float(top)) / (hi - origin))
            var sw: Float = 0, sl: Float = 0, sl2: Float = 0, sxl: Float = 0, sx: Float = 0
            for i in 0..<n {
                let l = Float(q[i]), wi = w[i], xi = x[base + i]
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

    /// Q4_K / Q5_K: eight sub-blocks of 32, each with a scale and min quantized to 6 bits.
    /// Without importance each value's error weighs rms + |x| (rms of its sub-block) and the
    /// 6-bit scales are taken against the largest; with it (see `quantize(_:_:count:importance:into:)`)
    /// the weights are importance x sqrt(σ² + x²), σ² twice the block's mean square, the search is
    /// finer, and the 6-bit scales and mins are fitted to the sub-blocks' scales and mins
    /// weighted by each sub-block's total weight.
    static func kQuant(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, five: Bool, importance: UnsafePointer<Float>? = nil) {
        let top = five ? 31 : 15
        let xs = Array(UnsafeBufferPointer(start: x, count: 256))
        var scales = [Float](repeating: 0, count: 8), mins = [Float](repeating: 0, count: 8)
        var subWeights = [Float](repeating: 0, count: 8)
        let sigma2 = 2 * xs.reduce(0) { $0 + $1 * $1 } / 256
        for j in 0..<8 {
            let sub = xs[(32 * j)..<(32 * j + 32)]
            let s: Float, m: Float
            if let imp = importance.map({ blockImportance($0 + 32 * j, 32) }) {
                let w = (0..<32).map { imp[$0] * (sigma2 + xs[32 * j + $0] * xs[32 * j + $0]).squareRoot() }
                subWeights[j] = w.reduce(0, +)
                (s, m) = scaleAndOffset(sub, weights: w, top: top, stretches: -0.9, by: 0.05, steps: 36, followingBest: true)
            } else {
                let rms = (sub.reduce(0) { $0 + $1 * $1 } / 32).squareRoot()
                (s, m) = scaleAndOffset(sub, weights: sub.map { rms + abs($0) }, top: top)
            }
            scales[j] = max(0, s)
            mins[j] = -m
        }
        let ls: [Int], lm: [Int], dScale: Float, dMin: Float
        if importance != nil {
            (dScale, ls) = positiveScales(scales, weights: subWeights, top: 63)
            (dMin, lm) = positiveScales(mins, weights: subWeights, top: 63)
        } else {
            let maxScale = scales.max()!, maxMin = mins.max()!
            let invScale: Float = maxScale > 0 ? 63 / maxScale : 0, invMin: Float = maxMin > 0 ? 63 / maxMin : 0
            ls = scales.map { min(63, Int(($0 * invScale).rounded())) }
            lm = mins.map { min(63, Int(($0 * invMin).rounded())) }
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
            for l in 0..<32 { q[32 * j + l] = max(0, min(top, Int(((xs[32 * j + l] + sm) / sd).rounded()))) }
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

    /// The scale of a symmetric sub-block, q in -top...top-1, minimising sum x^2 (x - scale q)^2
    /// over 19 stretches of the grid around the one that maps the extreme value to -top.
    static func symmetricScale(_ x: ArraySlice<Float>, top: Int) -> Float {
        let v = Array(x)
        return symmetricScale(v, weights: v.map { $0 * $0 }, top: top, highest: top - 1)
    }

    /// The scale minimising sum w (x - scale q)^2, q in -top...highest: the grid that maps the
    /// extreme value to -top and 18 stretches of it (top ± 0.1 ... 0.9 levels), each refitted by
    /// least squares.
    static func symmetricScale(_ x: [Float], weights w: [Float], top: Int, highest: Int) -> Float {
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

    /// Q6_K: sixteen sub-blocks of 16 with int8 scales against one f16 scale. Each sub-block's
    /// scale minimises its squared error weighted by x^2, or by the importance alone when given.
    static func q6_K(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, importance: UnsafePointer<Float>? = nil) {
        let xs = Array(UnsafeBufferPointer(start: x, count: 256))
        let scales = (0..<16).map { j in
            guard let importance else { return symmetricScale(xs[(16 * j)..<(16 * j + 16)], top: 32) }
            return symmetricScale(Array(xs[(16 * j)..<(16 * j + 16)]), weights: blockImportance(importance + 16 * j, 16), top: 32, highest: 31)
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
            let sc = max(-128, min(127, Int((iscale * scales[j]).rounded())))
            out.storeBytes(of: Int8(sc), toByteOffset: 192 + j, as: Int8.self)
            let sd = d * Float(sc)
            guard sd != 0 else { continue }
            for l in 0..<16 { q[16 * j + l] = max(-32, min(31, Int((xs[16 * j + l] / sd).rounded()))) + 32 }
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
}
