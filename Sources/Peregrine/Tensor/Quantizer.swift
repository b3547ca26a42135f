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
    /// 21 stretches of the grid and refit scale and offset by least squares on each.
    static func scaleAndOffset(_ x: ArraySlice<Float>, weights w: [Float], top: Int) -> (scale: Float, offset: Float) {
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
        func grid(_ iscale: Float) -> [Int] { (0..<n).map { max(0, min(top, Int((iscale * (x[base + $0] - lo)).rounded()))) } }
        var bestScale = (hi - lo) / Float(top), bestOffset = lo
        var best = error(bestScale, bestOffset, grid(Float(top) / (hi - lo)))
        for step in 0...20 {
            let q = grid((-1 + 0.1 * Float(step) + Float(top)) / (hi - lo))
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
            if e < best { best = e; bestScale = s; bestOffset = m }
        }
        return (bestScale, bestOffset)
    }

    /// Q4_K / Q5_K: eight sub-blocks of 32, each with a scale and min quantized to 6 bits.
    static func kQuant(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer, five: Bool) {
        let top = five ? 31 : 15
        let xs = Array(UnsafeBufferPointer(start: x, count: 256))
        var scales = [Float](repeating: 0, count: 8), mins = [Float](repeating: 0, count: 8)
        for j in 0..<8 {
            let sub = xs[(32 * j)..<(32 * j + 32)]
            let rms = (sub.reduce(0) { $0 + $1 * $1 } / 32).squareRoot()
            let (s, m) = scaleAndOffset(sub, weights: sub.map { rms + abs($0) }, top: top)
            scales[j] = max(0, s)
            mins[j] = -m
        }
        let maxScale = scales.max()!, maxMin = mins.max()!
        let invScale: Float = maxScale > 0 ? 63 / maxScale : 0, invMin: Float = maxMin > 0 ? 63 / maxMin : 0
        let ls = scales.map { min(63, Int(($0 * invScale).rounded())) }, lm = mins.map { min(63, Int(($0 * invMin).rounded())) }
        storeHalf(maxScale / 63, out, 0)
        storeHalf(maxMin / 63, out, 2)
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
        let d = asHalf(maxScale / 63), dmin = asHalf(maxMin / 63)
        var q = [Int](repeating: 0, count: 256)
        for j in 0..<8 {
            let sd = d * Float(ls[j]), sm = dmin * Float(lm[j])
            guard sd > 0 else { continue }
            for l in 0..<32 { q[32 * j + l] = max(0, min(top, Int(((xs[32 * j + l] + sm) / sd).rounded()))) }
        }
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
        var amax: Float = 0, extreme: Float = 0
        for v in x where abs(v) > amax { amax = abs(v); extreme = v }
        guard amax > 1e-30 else { return 0 }
        func fit(_ iscale: Float) -> (Float, Float) {
            var sxl: Float = 0, sl2: Float = 0
            for v in x {
                let l = Float(max(-top, min(top - 1, Int((iscale * v).rounded()))))
                let w = v * v
                sxl += w * v * l; sl2 += w * l * l
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

    /// Q6_K: sixteen sub-blocks of 16 with int8 scales against one f16 scale.
    static func q6_K(_ x: UnsafePointer<Float>, _ out: UnsafeMutableRawPointer) {
        let xs = Array(UnsafeBufferPointer(start: x, count: 256))
        let scales = (0..<16).map { symmetricScale(xs[(16 * $0)..<(16 * $0 + 16)], top: 32) }
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
