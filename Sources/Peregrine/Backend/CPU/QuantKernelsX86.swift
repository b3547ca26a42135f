#if arch(x86_64)
import _Builtin_intrinsics.intel

/// Integer dot products of quantized weights with activations rounded to 8 bits, as llama.cpp
/// computes them: per 32 values (one f32 scale and the sum of the values) for the 32-value
/// types, per 256 values (one scale, sums of each 16) for the k-quants. Products of 8-bit
/// integers are summed exactly in 16 and 32 bits (AVX2's maddubs/madd) and scaled once per
/// block. The activations are rounded once per token and reused by every row.
enum Int8Kernels {
    /// Bytes of one row of `k` activations in the layout `type`'s products take.
    static func activationBytes(_ type: DType, k: Int) -> Int {
        switch type {
        case .q4_K, .q5_K, .q6_K: return k / 256 * kBlockBytes
        default: return k / 32 * blockBytes
        }
    }

    /// Per 32 values: the scale, the scale times the sum of the values (both f16 values held as
    /// f32), 32 int8.
    static let blockBytes = 40
    /// Per 256 values: f32 scale, 16 int16 sums of 16 values, 256 int8.
    static let kBlockBytes = 292

    @inline(__always) static func f16(_ p: UnsafeRawPointer, _ offset: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: offset, as: Float16.self))
    }

    @inline(__always) static func v(_ x: __m256i) -> SIMD8<Int32> { unsafeBitCast(x, to: SIMD8<Int32>.self) }

    /// Rounds 32 floats to int8 (nearest, ties to even) with scale `id`, in order.
    @inline(__always)
    static func round32(_ x: UnsafePointer<Float>, _ id: Float, into out: UnsafeMutableRawPointer) {
        let s = _mm256_set1_ps(id)
        @inline(__always) func r(_ i: Int) -> __m256i {
            _mm256_cvtps_epi32(_mm256_mul_ps(UnsafeRawPointer(x + i).loadUnaligned(as: __m256.self), s))
        }
        let a = _mm256_packs_epi32(r(0), r(8)), b = _mm256_packs_epi32(r(16), r(24))
        // packs interleaves the 128-bit lanes; restore element order.
        let packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
        out.storeBytes(of: packed, as: __m256i.self)
    }

    @inline(__always) static func absMax(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var m = SIMD8<Float>()
        var i = 0
        while i < n {
            let v = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
            m = pointwiseMax(m, pointwiseMax(v, -v))
            i &+= 8
        }
        return m.max()
    }

    /// Rounds one token's `k` activations for the products of weight type `type`.
    static func quantizeActivations(_ type: DType, _ x: UnsafePointer<Float>, k: Int, into out: UnsafeMutableRawPointer) {
        switch type {
        case .q4_K, .q5_K, .q6_K:
            for b in 0..<(k / 256) {
                let xb = x + 256 &* b, ob = out + kBlockBytes &* b
                // The value of largest magnitude maps to -127 (llama.cpp's Q8_K).
                var amax: Float = 0, extreme: Float = 0
                for i in 0..<256 where abs(xb[i]) > amax { amax = abs(xb[i]); extreme = xb[i] }
                if amax == 0 {
                    (ob).initializeMemory(as: UInt8.self, repeating: 0, count: kBlockBytes)
                    continue
                }
                let iscale = -127 / extreme
                ob.storeBytes(of: 1 / iscale, as: Float.self)
                for c in 0..<8 { round32(xb + 32 &* c, iscale, into: ob + (36 &+ 32 &* c)) }
                for j in 0..<16 {
                    var s: Int16 = 0
                    for l in 0..<16 { s &+= Int16(ob.load(fromByteOffset: 36 &+ 16 &* j &+ l, as: Int8.self)) }
                    ob.storeBytes(of: s, toByteOffset: 4 &+ 2 &* j, as: Int16.self)
                }
            }
        default:
            for b in 0..<(k / 32) {
                let xb = x + 32 &* b, ob = out + blockBytes &* b
                // llama.cpp keeps these scales (and the scaled sum) in f16.
                let amax = absMax(xb, 32), d = amax / 127
                round32(xb, amax > 0 ? 127 / amax : 0, into: ob + 8)
                var sum: Int32 = 0
                for l in 0..<32 { sum &+= Int32(ob.load(fromByteOffset: 8 &+ l, as: Int8.self)) }
                ob.storeBytes(of: Float(Float16(d)), as: Float.self)
                ob.storeBytes(of: Float(Float16(d * Float(sum))), toByteOffset: 4, as: Float.self)
            }
        }
    }

    static let ones16 = _mm256_set1_epi16(1)
    static let lowNibbles = _mm256_set1_epi8(0x0F)

    /// Sum of products of signed bytes, as 8 int32 lanes (the sign moves onto y so maddubs,
    /// unsigned x signed, can take it).
    @inline(__always) static func dotSigned(_ x: __m256i, _ y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)), _mm256_set1_epi16(1))
    }

    /// Unsigned bytes x signed bytes, pairs summed in int16, then times `scales` (int16) and
    /// pairs summed in int32.
    @inline(__always) static func dotUnsigned(_ x: __m256i, _ y: __m256i, _ scales: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), scales)
    }

    /// 32 four-bit values of a 16-byte Q4 layout in element order (low nibbles, then high).
    @inline(__always) static func nibbles(_ p: UnsafeRawPointer) -> __m256i {
        let raw = p.loadUnaligned(as: __m128i.self)
        return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F))
    }

    /// 0x10 in byte i where bit i of the 32-bit mask is set: the fifth bits of Q5_0 / Q5_1.
    @inline(__always) static func fifthBits(_ p: UnsafeRawPointer) -> __m256i {
        let m = _mm256_set1_epi32(Int32(bitPattern: p.loadUnaligned(as: UInt32.self)))
        let spread = _mm256_shuffle_epi8(m, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3))
        let bit = _mm256_set1_epi64x(Int64(bitPattern: 0x8040_2010_0804_0201))
        return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10))
    }

    @inline(__always) static func hsum(_ x: __m256) -> Float { unsafeBitCast(x, to: SIMD8<Float>.self).sum() }

    /// dot(row, activations) for one weight row of k values; `a` is from quantizeActivations.
    @inline(__always)
    static func rowDot(_ type: DType, _ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ k: Int) -> Float {
        switch type {
        case .q8_0: return q8_0(row, a, k / 32)
        case .q4_0: return q4_0(row, a, k / 32)
        case .q5_0: return q5_0(row, a, k / 32)
        case .q4_1: return q4_1(row, a, k / 32)
        case .q5_1: return q5_1(row, a, k / 32)
        case .q4_K: return q4_K(row, a, k / 256)
        case .q5_K: return q5_K(row, a, k / 256)
        case .q6_K: return q6_K(row, a, k / 256)
        case .f32, .f16, .bf16: preconditionFailure("rowDot is for quantized types")
        }
    }

    @inline(never) static func q8_0(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        var acc = _mm256_setzero_ps()
        for b in 0..<blocks {
            let w = row + 34 &* b, y = a + blockBytes &* b
            let p = dotSigned(w.loadUnaligned(fromByteOffset: 2, as: __m256i.self), y.loadUnaligned(fromByteOffset: 8, as: __m256i.self))
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(w, 0) * y.load(as: Float.self)), _mm256_cvtepi32_ps(p), acc)
        }
        return hsum(acc)
    }

    @inline(never) static func q4_0(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        var acc = _mm256_setzero_ps()
        let eight = _mm256_set1_epi8(8)
        for b in 0..<blocks {
            let w = row + 18 &* b, y = a + blockBytes &* b
            let q = _mm256_sub_epi8(nibbles(w + 2), eight)
            let p = dotSigned(q, y.loadUnaligned(fromByteOffset: 8, as: __m256i.self))
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(w, 0) * y.load(as: Float.self)), _mm256_cvtepi32_ps(p), acc)
        }
        return hsum(acc)
    }

    @inline(never) static func q5_0(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        var acc = _mm256_setzero_ps()
        let sixteen = _mm256_set1_epi8(16)
        for b in 0..<blocks {
            let w = row + 22 &* b, y = a + blockBytes &* b
            let q = _mm256_sub_epi8(_mm256_or_si256(nibbles(w + 6), fifthBits(w + 2)), sixteen)
            let p = dotSigned(q, y.loadUnaligned(fromByteOffset: 8, as: __m256i.self))
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(w, 0) * y.load(as: Float.self)), _mm256_cvtepi32_ps(p), acc)
        }
        return hsum(acc)
    }

    @inline(never) static func q4_1(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        var acc = _mm256_setzero_ps()
        var mins: Float = 0
        for b in 0..<blocks {
            let w = row + 20 &* b, y = a + blockBytes &* b
            let p = dotUnsigned(nibbles(w + 4), y.loadUnaligned(fromByteOffset: 8, as: __m256i.self), ones16)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(w, 0) * y.load(as: Float.self)), _mm256_cvtepi32_ps(p), acc)
            mins += f16(w, 2) * y.load(fromByteOffset: 4, as: Float.self)
        }
        return hsum(acc) + mins
    }

    @inline(never) static func q5_1(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        var acc = _mm256_setzero_ps()
        var mins: Float = 0
        for b in 0..<blocks {
            let w = row + 24 &* b, y = a + blockBytes &* b
            let q = _mm256_or_si256(nibbles(w + 8), fifthBits(w + 4))
            let p = dotUnsigned(q, y.loadUnaligned(fromByteOffset: 8, as: __m256i.self), ones16)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(w, 0) * y.load(as: Float.self)), _mm256_cvtepi32_ps(p), acc)
            mins += f16(w, 2) * y.load(fromByteOffset: 4, as: Float.self)
        }
        return hsum(acc) + mins
    }

    /// Q4_K and Q5_K against 256-value activation blocks: per 32-value sub-block an integer sum
    /// times its 6-bit scale; the mins times the activations' 16-value sums.
    @inline(__always)
    static func kQuant(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int, five: Bool) -> Float {
        var acc = _mm256_setzero_ps()
        var mins: Float = 0
        let bytes = five ? 176 : 144, qs = five ? 48 : 16
        let one = _mm256_set1_epi8(1)
        for b in 0..<blocks {
            let w = row + bytes &* b, y = a + kBlockBytes &* b
            let dy = y.load(as: Float.self)
            var summ: Int32 = 0
            var sumi = _mm256_setzero_si256()
            var hb = five ? w.loadUnaligned(fromByteOffset: 16, as: __m256i.self) : _mm256_setzero_si256()
            for c in 0..<4 {
                let (sc0, m0) = KQuant.scaleMin(w + 4, 2 &* c)
                let (sc1, m1) = KQuant.scaleMin(w + 4, 2 &* c &+ 1)
                summ &+= Int32(m0) &* (Int32(y.load(fromByteOffset: 4 &+ 8 &* c, as: Int16.self)) &+ Int32(y.load(fromByteOffset: 6 &+ 8 &* c, as: Int16.self)))
                summ &+= Int32(m1) &* (Int32(y.load(fromByteOffset: 8 &+ 8 &* c, as: Int16.self)) &+ Int32(y.load(fromByteOffset: 10 &+ 8 &* c, as: Int16.self)))
                let q = w.loadUnaligned(fromByteOffset: qs &+ 32 &* c, as: __m256i.self)
                var lo = _mm256_and_si256(q, lowNibbles), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), lowNibbles)
                if five {
                    lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4))
                    hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4))
                    hb = _mm256_srli_epi16(hb, 2)
                }
                let p0 = dotUnsigned(lo, y.loadUnaligned(fromByteOffset: 36 &+ 64 &* c, as: __m256i.self), _mm256_set1_epi16(Int16(sc0)))
                let p1 = dotUnsigned(hi, y.loadUnaligned(fromByteOffset: 68 &+ 64 &* c, as: __m256i.self), _mm256_set1_epi16(Int16(sc1)))
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1))
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(f16(w, 0) * dy), _mm256_cvtepi32_ps(sumi), acc)
            mins -= f16(w, 2) * dy * Float(summ)
        }
        return hsum(acc) + mins
    }

    @inline(never) static func q4_K(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        kQuant(row, a, blocks, five: false)
    }

    @inline(never) static func q5_K(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        kQuant(row, a, blocks, five: true)
    }

    /// Q6_K: 6-bit values offset by 32 with int8 scales per 16; the offset comes off through
    /// the activations' 16-value sums.
    @inline(never) static func q6_K(_ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ blocks: Int) -> Float {
        var acc = _mm256_setzero_ps()
        var offsets: Float = 0
        let m3 = _mm256_set1_epi8(3)
        for b in 0..<blocks {
            let w = row + 210 &* b, y = a + kBlockBytes &* b
            var offset: Int32 = 0
            for j in 0..<16 {
                offset &+= Int32(w.load(fromByteOffset: 192 &+ j, as: Int8.self)) &* Int32(y.load(fromByteOffset: 4 &+ 2 &* j, as: Int16.self))
            }
            var sumi = _mm256_setzero_si256()
            for half in 0..<2 {
                let qlA = w.loadUnaligned(fromByteOffset: 64 &* half, as: __m256i.self)
                let qlB = w.loadUnaligned(fromByteOffset: 64 &* half &+ 32, as: __m256i.self)
                let qh = w.loadUnaligned(fromByteOffset: 128 &+ 32 &* half, as: __m256i.self)
                let q0 = _mm256_or_si256(_mm256_and_si256(qlA, lowNibbles), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4))
                let q1 = _mm256_or_si256(_mm256_and_si256(qlB, lowNibbles), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4))
                let q2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlA, 4), lowNibbles), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4))
                let q3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlB, 4), lowNibbles), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4))
                @inline(__always) func part(_ q: __m256i, _ i: Int) -> __m256i {
                    let s0 = Int16(w.load(fromByteOffset: 192 &+ 8 &* half &+ 2 &* i, as: Int8.self))
                    let s1 = Int16(w.load(fromByteOffset: 193 &+ 8 &* half &+ 2 &* i, as: Int8.self))
                    let yq = y.loadUnaligned(fromByteOffset: 36 &+ 128 &* half &+ 32 &* i, as: __m256i.self)
                    return dotUnsigned(q, yq, _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0)))
                }
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(_mm256_add_epi32(part(q0, 0), part(q1, 1)), _mm256_add_epi32(part(q2, 2), part(q3, 3))))
            }
            let d = f16(w, 208) * y.load(as: Float.self)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc)
            offsets -= d * 32 * Float(offset)
        }
        return hsum(acc) + offsets
    }
}
#endif
