// Integer kernels for llama.cpp's block types, generic over the multiply-accumulate
// instruction: Peregrine specializes them for AVX2 (this module's baseline) and PeregrineVNNI
// for AVX-512 VNNI, in a module built for it. Everything is @inlinable so each specialization
// is compiled with its own module's target.

/// Shared pieces of the k-quant layouts.
public enum KQuant {
    /// Sub-block j's 6-bit scale and min from the 12 packed bytes of Q4_K and Q5_K: sub-blocks
    /// 0-3 use the low 6 bits of bytes j and j + 4; 4-7 take 4 bits from byte j + 4 and their
    /// top 2 bits from the spare bits of bytes j - 4 and j.
    @inlinable @inline(__always)
    public static func scaleMin(_ q: UnsafeRawPointer, _ j: Int) -> (Int, Int) {
        @inline(__always) func b(_ i: Int) -> Int { Int(q.load(fromByteOffset: i, as: UInt8.self)) }
        if j < 4 { return (b(j) & 63, b(j + 4) & 63) }
        return ((b(j + 4) & 0x0F) | ((b(j - 4) >> 6) << 4), (b(j + 4) >> 4) | ((b(j) >> 6) << 4))
    }

    /// Sub-block j's signed scale (-32...31) from the 12 packed bytes of Q3_K: its low 4 bits
    /// are the low (j < 8) or high nibble of byte j % 8, its top 2 bits are bits 2 (j / 4) of
    /// byte 8 + j % 4; stored offset by 32.
    @inlinable @inline(__always)
    public static func q3Scale(_ q: UnsafeRawPointer, _ j: Int) -> Int {
        @inline(__always) func b(_ i: Int) -> Int { Int(q.load(fromByteOffset: i, as: UInt8.self)) }
        let low = j < 8 ? b(j) & 0x0F : b(j - 8) >> 4
        return (low | ((b(8 + j % 4) >> (2 * (j / 4))) & 3) << 4) - 32
    }
}

/// Shared pieces of the IQ4 layouts (IQ4_NL, IQ4_XS).
public enum IQ4 {
    /// The 16 levels a 4-bit index selects (ggml's table): uneven steps, finest near zero.
    public static let levels: [Int8] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]

    /// The levels as one little-endian 128-bit pattern (bytes 0-15), for table lookups in registers.
    public static let levelsLow: UInt64 = 0xF6EA_DDCF_BFAD_9881
    public static let levelsHigh: UInt64 = 0x7159_4535_2619_0D01

    /// Sub-block s's signed 6-bit scale of an IQ4_XS block: the low 4 bits from nibble s of the
    /// 4 bytes at offset 4, the top 2 from bits 2s, 2s + 1 of the 16-bit word at offset 2,
    /// stored offset by 32.
    @inlinable @inline(__always)
    public static func subScale(_ block: UnsafeRawPointer, _ s: Int) -> Int {
        let low = Int(block.load(fromByteOffset: 4 &+ s >> 1, as: UInt8.self) >> UInt8(4 &* (s & 1))) & 0x0F
        let high = Int(block.loadUnaligned(fromByteOffset: 2, as: UInt16.self) >> UInt16(2 &* s)) & 3
        return (low | high << 4) &- 32
    }
}

#if arch(x86_64)
import _Builtin_intrinsics.intel

/// Integer dot products of quantized weights with activations rounded to 8 bits, as llama.cpp
/// computes them: per 32 values (one f32 scale and the sum of the values) for the 32-value
/// types, per 256 values (one scale, sums of each 16) for the k-quants. Products of 8-bit
/// integers are summed exactly in 16 and 32 bits (AVX2's maddubs/madd) and scaled once per
/// block. The activations are rounded once per token and reused by every row.
public enum Int8Kernels {
    /// Bytes of one row of `k` activations in the layout a weight type's products take.
    @inlinable public static func activationBytes(_ type: Int8WeightType, k: Int) -> Int {
        type.superBlocks ? k / 256 * kBlockBytes : k / 32 * blockBytes
    }

    /// Per 32 values: the scale, the scale times the sum of the values (both f16 values held as
    /// f32), 32 int8.
    @inlinable public static var blockBytes: Int { 40 }
    /// Per 256 values: f32 scale, 16 int16 sums of 16 values, 256 int8.
    @inlinable public static var kBlockBytes: Int { 292 }

    @inline(__always) @inlinable public static func f16(_ p: UnsafeRawPointer, _ offset: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: offset, as: Float16.self))
    }


    /// Rounds 32 floats to int8 (nearest, ties to even) with scale `id`, in order.
    @inline(__always) @inlinable
    public static func round32(_ x: UnsafePointer<Float>, _ id: Float, into out: UnsafeMutableRawPointer) {
        let s = _mm256_set1_ps(id)
        @inline(__always) func r(_ i: Int) -> __m256i {
            _mm256_cvtps_epi32(_mm256_mul_ps(UnsafeRawPointer(x + i).loadUnaligned(as: __m256.self), s))
        }
        let a = _mm256_packs_epi32(r(0), r(8)), b = _mm256_packs_epi32(r(16), r(24))
        // packs interleaves the 128-bit lanes; restore element order.
        let packed = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
        out.storeBytes(of: packed, as: __m256i.self)
    }

    /// The largest magnitude of `n` (a multiple of 8) floats. Written on the intrinsics: the
    /// generic SIMD `pointwiseMax` is not inlined across modules and cost a call per 8 values.
    @inline(__always) @inlinable public static func absMax(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF))
        var m = _mm256_setzero_ps()
        var i = 0
        while i < n {
            m = _mm256_max_ps(m, _mm256_and_ps(UnsafeRawPointer(x + i).loadUnaligned(as: __m256.self), magnitude))
            i &+= 8
        }
        return horizontalMax(m)
    }

    // Reductions across lanes by lane permutations (the shuffles that take an immediate are
    // macros in clang's headers, which Swift does not import).
    @inline(__always) @inlinable static func swapped(_ v: __m256, _ a: Int32, _ b: Int32, _ c: Int32, _ d: Int32) -> __m256 {
        _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(a, b, c, d, a, b, c, d))
    }

    @inline(__always) @inlinable public static func horizontalMax(_ v: __m256) -> Float {
        let h = _mm256_max_ps(v, _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3)))
        let q = _mm256_max_ps(h, swapped(h, 2, 3, 0, 1))
        return _mm256_cvtss_f32(_mm256_max_ps(q, swapped(q, 1, 0, 3, 2)))
    }

    @inline(__always) @inlinable public static func horizontalMin(_ v: __m256) -> Float {
        let h = _mm256_min_ps(v, _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3)))
        let q = _mm256_min_ps(h, swapped(h, 2, 3, 0, 1))
        return _mm256_cvtss_f32(_mm256_min_ps(q, swapped(q, 1, 0, 3, 2)))
    }

    /// Sums of each four bytes of 32 signed bytes, as eight int32 lanes.
    @inline(__always) @inlinable static func quadSums(_ q: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), q), _mm256_set1_epi16(1))
    }

    /// The int32 sum of 32 signed bytes.
    @inline(__always) @inlinable public static func byteSum(_ q: __m256i) -> Int32 {
        let v = quadSums(q)
        let h = _mm256_add_epi32(v, _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3)))
        let p = _mm256_add_epi32(h, _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(2, 3, 0, 1, 2, 3, 0, 1)))
        return _mm256_cvtsi256_si32(_mm256_add_epi32(p, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(1, 0, 3, 2, 1, 0, 3, 2))))
    }

    /// The sums of the first and the last 16 of 32 signed bytes.
    @inline(__always) @inlinable public static func halfSums(_ q: __m256i) -> (Int16, Int16) {
        // Lanes 0-3 hold the first 16 bytes' quads, lanes 4-7 the last 16's.
        let v = quadSums(q)
        let p = _mm256_add_epi32(v, _mm256_permutevar8x32_epi32(v, _mm256_setr_epi32(2, 3, 0, 1, 6, 7, 4, 5)))
        let s = unsafeBitCast(_mm256_add_epi32(p, _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6))), to: SIMD8<Int32>.self)
        return (Int16(truncatingIfNeeded: s[0]), Int16(truncatingIfNeeded: s[4]))
    }

    /// Rounds one token's `k` activations for the products of weight type `type`. With
    /// `integerSums` (the row-group kernels' layout) a 32-value block holds the exact int32 sum
    /// of its values where it would hold the scaled sum, and a 256-value block the int16 sums of
    /// each 32 values (bytes 4..<20) where it would hold those of each 16.
    @inlinable public static func quantizeActivations(_ type: Int8WeightType, _ x: UnsafePointer<Float>, k: Int, into out: UnsafeMutableRawPointer,
                                                      integerSums: Bool = false) {
        switch type.superBlocks {
        case true:
            for b in 0..<(k / 256) {
                let xb = x + 256 &* b, ob = out + kBlockBytes &* b
                // The value of largest magnitude maps to -127 (llama.cpp's Q8_K). Where +a and -a
                // both occur, either gives the same products: the rounded values and the scale
                // both change sign.
                var hi = _mm256_loadu_ps(xb), lo = hi
                for i in Swift.stride(from: 8, to: 256, by: 8) {
                    let v = UnsafeRawPointer(xb + i).loadUnaligned(as: __m256.self)
                    hi = _mm256_max_ps(hi, v)
                    lo = _mm256_min_ps(lo, v)
                }
                let top = horizontalMax(hi), bottom = horizontalMin(lo)
                let extreme = -bottom > top ? bottom : top
                if extreme == 0 {
                    (ob).initializeMemory(as: UInt8.self, repeating: 0, count: kBlockBytes)
                    continue
                }
                let iscale = -127 / extreme
                ob.storeBytes(of: 1 / iscale, as: Float.self)
                for c in 0..<8 {
                    round32(xb + 32 &* c, iscale, into: ob + (36 &+ 32 &* c))
                    let (a, b) = halfSums(ob.loadUnaligned(fromByteOffset: 36 &+ 32 &* c, as: __m256i.self))
                    if integerSums {
                        ob.storeBytes(of: a &+ b, toByteOffset: 4 &+ 2 &* c, as: Int16.self)
                    } else {
                        ob.storeBytes(of: a, toByteOffset: 4 &+ 4 &* c, as: Int16.self)
                        ob.storeBytes(of: b, toByteOffset: 6 &+ 4 &* c, as: Int16.self)
                    }
                }
            }
        case false:
            for b in 0..<(k / 32) {
                let xb = x + 32 &* b, ob = out + blockBytes &* b
                // llama.cpp keeps these scales (and the scaled sum) in f16.
                let amax = absMax(xb, 32), d = amax / 127
                round32(xb, amax > 0 ? 127 / amax : 0, into: ob + 8)
                let sum = byteSum(ob.loadUnaligned(fromByteOffset: 8, as: __m256i.self))
                ob.storeBytes(of: Float(Float16(d)), as: Float.self)
                if integerSums {
                    ob.storeBytes(of: sum, toByteOffset: 4, as: Int32.self)
                } else {
                    ob.storeBytes(of: Float(Float16(d * Float(sum))), toByteOffset: 4, as: Float.self)
                }
            }
        }
    }

    @inlinable public static var ones16: __m256i { _mm256_set1_epi16(1) }
    @inlinable public static var lowNibbles: __m256i { _mm256_set1_epi8(0x0F) }

    /// Sum of products of signed bytes, as 8 int32 lanes (the sign moves onto y so maddubs,
    /// unsigned x signed, can take it).
    @inline(__always) @inlinable public static func dotSigned(_ x: __m256i, _ y: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x)), _mm256_set1_epi16(1))
    }

    /// Unsigned bytes x signed bytes, pairs summed in int16, then times `scales` (int16) and
    /// pairs summed in int32.
    @inline(__always) @inlinable public static func dotUnsigned(_ x: __m256i, _ y: __m256i, _ scales: __m256i) -> __m256i {
        _mm256_madd_epi16(_mm256_maddubs_epi16(x, y), scales)
    }

    /// 32 four-bit values of a 16-byte Q4 layout in element order (low nibbles, then high).
    @inline(__always) @inlinable public static func nibbles(_ p: UnsafeRawPointer) -> __m256i {
        let raw = p.loadUnaligned(as: __m128i.self)
        return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F))
    }

    /// 0x10 in byte i where bit i of the 32-bit mask is set: the fifth bits of Q5_0 / Q5_1.
    @inline(__always) @inlinable public static func fifthBits(_ p: UnsafeRawPointer) -> __m256i {
        let m = _mm256_set1_epi32(Int32(bitPattern: p.loadUnaligned(as: UInt32.self)))
        let spread = _mm256_shuffle_epi8(m, _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                                             2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3))
        let bit = _mm256_set1_epi64x(Int64(bitPattern: 0x8040_2010_0804_0201))
        return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit), _mm256_set1_epi8(0x10))
    }

    public typealias Vectors8 = (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i)

    /// Eight 32-value groups of unsigned bytes against the k-quant activation block's values
    /// (group j at byte 36 + 32 j), each times its scale, summed per int32 lane: the integer
    /// part of a Q4_K, Q5_K or Q6_K block's product.
    @inline(__always) @inlinable
    public static func scaledSum<D: Int8Dot>(_ q: Vectors8, _ scales: Vectors8, _ y: UnsafeRawPointer, _: D.Type) -> __m256i {
        @inline(__always) func p(_ q: __m256i, _ j: Int, _ sc: __m256i) -> __m256i {
            D.unsigned(q, y.loadUnaligned(fromByteOffset: 36 &+ 32 &* j, as: __m256i.self), sc)
        }
        return _mm256_add_epi32(
            _mm256_add_epi32(_mm256_add_epi32(p(q.0, 0, scales.0), p(q.1, 1, scales.1)),
                             _mm256_add_epi32(p(q.2, 2, scales.2), p(q.3, 3, scales.3))),
            _mm256_add_epi32(_mm256_add_epi32(p(q.4, 4, scales.4), p(q.5, 5, scales.5)),
                             _mm256_add_epi32(p(q.6, 6, scales.6), p(q.7, 7, scales.7))))
    }

    @inline(__always) @inlinable public static func hsum(_ x: __m256) -> Float { unsafeBitCast(x, to: SIMD8<Float>.self).sum() }

    /// y[t, o] = dot(W[o, :], activations of token t) for the rows `rows`, eight or four tokens
    /// at a time where there are that many: each weight block is unpacked once for all of them. The same
    /// per-token arithmetic either way, so results do not depend on the batch.
    @inline(__always) @inlinable
    public static func rows<D: Int8Dot>(_ type: Int8WeightType, dot: D.Type, w: UnsafeRawPointer, rowBytes: Int, a: UnsafeRawPointer,
                                        stride: Int, k: Int, tokens: Int, rows: Range<Int>, bias: UnsafePointer<Float>?,
                                        y: UnsafeMutablePointer<Float>, ldy: Int) {
        switch type {
        case .q8_0: tile(Q8_0Block.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q4_0: tile(Q4_0Block.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q5_0: tile(Q5_0Block.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q4_1: tile(Q4_1Block.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q5_1: tile(Q5_1Block.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q4_K: tile(Q4_KBlock.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q5_K: tile(Q5_KBlock.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q6_K: tile(Q6_KBlock.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .iq4_nl: tile(IQ4_NLBlock.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .iq4_xs: tile(IQ4_XSBlock.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q3_K: tile(Q3_KBlock.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        case .q2_K: tile(Q2_KBlock.self, D.self, w, rowBytes, a, stride, k, tokens, rows, bias, y, ldy)
        }
    }

    /// One row against one token (tests use it; the same arithmetic as `rows`).
    @inlinable public static func rowDot<D: Int8Dot>(_ type: Int8WeightType, dot: D.Type, _ row: UnsafeRawPointer, _ a: UnsafeRawPointer,
                                                     _ k: Int) -> Float {
        var out: Float = 0
        rows(type, dot: D.self, w: row, rowBytes: 0, a: a, stride: 0, k: k, tokens: 1, rows: 0..<1, bias: nil, y: &out, ldy: 1)
        return out
    }

    @inlinable @inline(never)
    public static func tile<K: Int8Block, D: Int8Dot>(_: K.Type, _: D.Type, _ w: UnsafeRawPointer, _ rowBytes: Int, _ a: UnsafeRawPointer, _ stride: Int, _ k: Int,
                                   _ tokens: Int, _ rows: Range<Int>, _ bias: UnsafePointer<Float>?,
                                   _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let blocks = k / K.values
        var t = 0
        while t &+ 8 <= tokens {
            let a0 = a + t &* stride
            for o in rows {
                let row = w + o &* rowBytes
                var c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0
                var s0: Float = 0, s1: Float = 0, s2: Float = 0, s3: Float = 0, s4: Float = 0, s5: Float = 0, s6: Float = 0, s7: Float = 0
                for b in 0..<blocks {
                    let d = K.decode(row + b &* K.weightBytes)
                    let p = a0 + b &* K.activationBytes
                    K.accumulate(d, p, &c0, &s0, D.self)
                    K.accumulate(d, p + stride, &c1, &s1, D.self)
                    K.accumulate(d, p + 2 &* stride, &c2, &s2, D.self)
                    K.accumulate(d, p + 3 &* stride, &c3, &s3, D.self)
                    K.accumulate(d, p + 4 &* stride, &c4, &s4, D.self)
                    K.accumulate(d, p + 5 &* stride, &c5, &s5, D.self)
                    K.accumulate(d, p + 6 &* stride, &c6, &s6, D.self)
                    K.accumulate(d, p + 7 &* stride, &c7, &s7, D.self)
                }
                let bo = bias?[o] ?? 0
                y[t &* ldy &+ o] = hsum(c0) + s0 + bo
                y[(t &+ 1) &* ldy &+ o] = hsum(c1) + s1 + bo
                y[(t &+ 2) &* ldy &+ o] = hsum(c2) + s2 + bo
                y[(t &+ 3) &* ldy &+ o] = hsum(c3) + s3 + bo
                y[(t &+ 4) &* ldy &+ o] = hsum(c4) + s4 + bo
                y[(t &+ 5) &* ldy &+ o] = hsum(c5) + s5 + bo
                y[(t &+ 6) &* ldy &+ o] = hsum(c6) + s6 + bo
                y[(t &+ 7) &* ldy &+ o] = hsum(c7) + s7 + bo
            }
            t &+= 8
        }
        while t &+ 4 <= tokens {
            let a0 = a + t &* stride
            for o in rows {
                let row = w + o &* rowBytes
                var c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0
                var s0: Float = 0, s1: Float = 0, s2: Float = 0, s3: Float = 0
                for b in 0..<blocks {
                    let d = K.decode(row + b &* K.weightBytes)
                    let p = a0 + b &* K.activationBytes
                    K.accumulate(d, p, &c0, &s0, D.self)
                    K.accumulate(d, p + stride, &c1, &s1, D.self)
                    K.accumulate(d, p + 2 &* stride, &c2, &s2, D.self)
                    K.accumulate(d, p + 3 &* stride, &c3, &s3, D.self)
                }
                let bo = bias?[o] ?? 0
                y[t &* ldy &+ o] = hsum(c0) + s0 + bo
                y[(t &+ 1) &* ldy &+ o] = hsum(c1) + s1 + bo
                y[(t &+ 2) &* ldy &+ o] = hsum(c2) + s2 + bo
                y[(t &+ 3) &* ldy &+ o] = hsum(c3) + s3 + bo
            }
            t &+= 4
        }
        while t < tokens {
            let at = a + t &* stride
            for o in rows {
                let row = w + o &* rowBytes
                var c = _mm256_setzero_ps()
                var s: Float = 0
                for b in 0..<blocks { K.accumulate(K.decode(row + b &* K.weightBytes), at + b &* K.activationBytes, &c, &s, D.self) }
                y[t &* ldy &+ o] = hsum(c) + s + (bias?[o] ?? 0)
            }
            t &+= 1
        }
    }
}

/// One block type's integer product: unpack a weight block once, then add its products with
/// one token's activation block into a vector accumulator and a scalar one.
public protocol Int8Block {
    associatedtype Decoded
    static var values: Int { get }
    static var weightBytes: Int { get }
    static var activationBytes: Int { get }
    static func decode(_ w: UnsafeRawPointer) -> Decoded
    static func accumulate<D: Int8Dot>(_ d: Decoded, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type)
}

extension Int8Block {
    @inlinable public static var activationBytes: Int { values == 256 ? Int8Kernels.kBlockBytes : Int8Kernels.blockBytes }
}

/// The integer multiply-accumulate the kernels are built on: AVX2's maddubs/madd here, VNNI's
/// vpdpbusd in PeregrineVNNI. Both give each int32 lane the same exact sum.
public protocol Int8Dot {
    /// Sum of products of signed bytes, four per int32 lane.
    static func signed(_ x: __m256i, _ y: __m256i) -> __m256i
    /// Unsigned bytes x signed bytes, four per int32 lane, times `scales` (int16 lanes holding the
    /// same value in both halves of each int32 lane).
    static func unsigned(_ x: __m256i, _ y: __m256i, _ scales: __m256i) -> __m256i
}

public enum AVX2Dot: Int8Dot {
    @inlinable @inline(__always) public static func signed(_ x: __m256i, _ y: __m256i) -> __m256i { Int8Kernels.dotSigned(x, y) }
    @inlinable @inline(__always) public static func unsigned(_ x: __m256i, _ y: __m256i, _ scales: __m256i) -> __m256i {
        Int8Kernels.dotUnsigned(x, y, scales)
    }
}

/// The weight types with integer kernels.
public enum Int8WeightType: Int, Sendable {
    case q8_0, q4_0, q5_0, q4_1, q5_1, q4_K, q5_K, q6_K, q3_K, q2_K
    case iq4_nl, iq4_xs
    @inlinable public var isKQuant: Bool { self == .q4_K || self == .q5_K || self == .q6_K || self == .q3_K || self == .q2_K }
    /// Products on activations in 256-value blocks (llama.cpp's Q8_K) rather than 32-value ones.
    @inlinable public var superBlocks: Bool { isKQuant || self == .iq4_xs }
}

/// The 32-value types: values as bytes (signed when `signed`), the block scale, and the min
/// for the types that have one.
@frozen public struct Block32 {
    public let q: __m256i
    public let d: Float
    public let m: Float
    @inlinable public init(q: __m256i, d: Float, m: Float) { self.q = q; self.d = d; self.m = m }
}

extension Int8Block where Decoded == Block32 {
    @inlinable public static var values: Int { 32 }
}

public enum Q8_0Block: Int8Block {
    @inlinable public static var weightBytes: Int { 34 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> Block32 {
        Block32(q: w.loadUnaligned(fromByteOffset: 2, as: __m256i.self), d: Int8Kernels.f16(w, 0), m: 0)
    }
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: Block32, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        let p = D.signed(d.q, y.loadUnaligned(fromByteOffset: 8, as: __m256i.self))
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d.d * y.load(as: Float.self)), _mm256_cvtepi32_ps(p), acc)
    }
}

public enum Q4_0Block: Int8Block {
    @inlinable public static var weightBytes: Int { 18 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> Block32 {
        Block32(q: _mm256_sub_epi8(Int8Kernels.nibbles(w + 2), _mm256_set1_epi8(8)), d: Int8Kernels.f16(w, 0), m: 0)
    }
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: Block32, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        Q8_0Block.accumulate(d, y, &acc, &s, D.self)
    }
}

public enum Q5_0Block: Int8Block {
    @inlinable public static var weightBytes: Int { 22 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> Block32 {
        let q = _mm256_or_si256(Int8Kernels.nibbles(w + 6), Int8Kernels.fifthBits(w + 2))
        return Block32(q: _mm256_sub_epi8(q, _mm256_set1_epi8(16)), d: Int8Kernels.f16(w, 0), m: 0)
    }
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: Block32, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        Q8_0Block.accumulate(d, y, &acc, &s, D.self)
    }
}

public enum Q4_1Block: Int8Block {
    @inlinable public static var weightBytes: Int { 20 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> Block32 {
        Block32(q: Int8Kernels.nibbles(w + 4), d: Int8Kernels.f16(w, 0), m: Int8Kernels.f16(w, 2))
    }
    /// Unsigned values: d * dy * sum(q y) + m * (dy * sum(y)).
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: Block32, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        let p = D.unsigned(d.q, y.loadUnaligned(fromByteOffset: 8, as: __m256i.self), Int8Kernels.ones16)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d.d * y.load(as: Float.self)), _mm256_cvtepi32_ps(p), acc)
        s += d.m * y.load(fromByteOffset: 4, as: Float.self)
    }
}

public enum Q5_1Block: Int8Block {
    @inlinable public static var weightBytes: Int { 24 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> Block32 {
        Block32(q: _mm256_or_si256(Int8Kernels.nibbles(w + 8), Int8Kernels.fifthBits(w + 4)), d: Int8Kernels.f16(w, 0), m: Int8Kernels.f16(w, 2))
    }
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: Block32, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        Q4_1Block.accumulate(d, y, &acc, &s, D.self)
    }
}

/// Q4_K / Q5_K unpacked: eight sub-blocks of 32 values as bytes, their 6-bit scales
/// broadcast as int16 vectors (for madd) and their mins as one int16 vector.
@frozen public struct BlockK {
    public var q: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i)
    public var scales: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i)
    public var mins: __m128i
    public var d: Float
    public var dmin: Float
    @inlinable public init(q: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i),
                           scales: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i), mins: __m128i, d: Float, dmin: Float) {
        self.q = q; self.scales = scales; self.mins = mins; self.d = d; self.dmin = dmin
    }
}

public enum KQuantBlocks {
    @inlinable @inline(__always)
    public static func decode(_ w: UnsafeRawPointer, five: Bool) -> BlockK {
        let qs = five ? 48 : 16
        let low = Int8Kernels.lowNibbles, one = _mm256_set1_epi8(1)
        var hb = five ? w.loadUnaligned(fromByteOffset: 16, as: __m256i.self) : _mm256_setzero_si256()
        @inline(__always) func pair(_ c: Int) -> (__m256i, __m256i) {
            let q = w.loadUnaligned(fromByteOffset: qs &+ 32 &* c, as: __m256i.self)
            var lo = _mm256_and_si256(q, low), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low)
            if five {
                lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(hb, one), 4))
                hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 1), one), 4))
                hb = _mm256_srli_epi16(hb, 2)
            }
            return (lo, hi)
        }
        let (q0, q1) = pair(0), (q2, q3) = pair(1), (q4, q5) = pair(2), (q6, q7) = pair(3)
        @inline(__always) func sm(_ j: Int) -> (__m256i, Int16) {
            let (s, m) = KQuant.scaleMin(w + 4, j)
            return (_mm256_set1_epi16(Int16(s)), Int16(m))
        }
        let (s0, m0) = sm(0), (s1, m1) = sm(1), (s2, m2) = sm(2), (s3, m3) = sm(3)
        let (s4, m4) = sm(4), (s5, m5) = sm(5), (s6, m6) = sm(6), (s7, m7) = sm(7)
        return BlockK(q: (q0, q1, q2, q3, q4, q5, q6, q7), scales: (s0, s1, s2, s3, s4, s5, s6, s7),
                      mins: _mm_setr_epi16(m0, m1, m2, m3, m4, m5, m6, m7), d: Int8Kernels.f16(w, 0), dmin: Int8Kernels.f16(w, 2))
    }

    @inlinable @inline(__always)
    public static func accumulate<D: Int8Dot>(_ d: BlockK, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        let sumi = Int8Kernels.scaledSum(d.q, d.scales, y, D.self)
        // Sums of 32 activations (pairs of the stored 16-value sums) times the mins, in the
        // low four lanes.
        let pairs = _mm_hadd_epi16(y.loadUnaligned(fromByteOffset: 4, as: __m128i.self), y.loadUnaligned(fromByteOffset: 20, as: __m128i.self))
        let summ = _mm256_zextsi128_si256(_mm_madd_epi16(d.mins, pairs))
        let dy = y.load(as: Float.self)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d.d * dy), _mm256_cvtepi32_ps(sumi), acc)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(-d.dmin * dy), _mm256_cvtepi32_ps(summ), acc)
    }
}

public enum Q4_KBlock: Int8Block {
    @inlinable public static var values: Int { 256 }
    @inlinable public static var weightBytes: Int { 144 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> BlockK { KQuantBlocks.decode(w, five: false) }
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: BlockK, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        KQuantBlocks.accumulate(d, y, &acc, &s, D.self)
    }
}

public enum Q5_KBlock: Int8Block {
    @inlinable public static var values: Int { 256 }
    @inlinable public static var weightBytes: Int { 176 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> BlockK { KQuantBlocks.decode(w, five: true) }
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: BlockK, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        KQuantBlocks.accumulate(d, y, &acc, &s, D.self)
    }
}

/// Q6_K unpacked: eight groups of 32 values (0...63) and, per group, its two int8 scales as
/// an int16 vector (low half, high half).
@frozen public struct Block6 {
    public var q: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i)
    public var scales: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i)
    /// The 16 scales as int16.
    public var allScales: __m256i
    public var d: Float
    @inlinable public init(q: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i),
                           scales: (__m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i, __m256i), allScales: __m256i, d: Float) {
        self.q = q; self.scales = scales; self.allScales = allScales; self.d = d
    }
}

public enum Q6_KBlock: Int8Block {
    @inlinable public static var values: Int { 256 }
    @inlinable public static var weightBytes: Int { 210 }

    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> Block6 {
        let low = Int8Kernels.lowNibbles, m3 = _mm256_set1_epi8(3)
        @inline(__always) func half(_ h: Int) -> (__m256i, __m256i, __m256i, __m256i) {
            let qlA = w.loadUnaligned(fromByteOffset: 64 &* h, as: __m256i.self)
            let qlB = w.loadUnaligned(fromByteOffset: 64 &* h &+ 32, as: __m256i.self)
            let qh = w.loadUnaligned(fromByteOffset: 128 &+ 32 &* h, as: __m256i.self)
            return (_mm256_or_si256(_mm256_and_si256(qlA, low), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4)),
                    _mm256_or_si256(_mm256_and_si256(qlB, low), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), m3), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlA, 4), low), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), m3), 4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlB, 4), low), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), m3), 4)))
        }
        @inline(__always) func sc(_ g: Int) -> __m256i {
            let s0 = Int16(w.load(fromByteOffset: 192 &+ 2 &* g, as: Int8.self)), s1 = Int16(w.load(fromByteOffset: 193 &+ 2 &* g, as: Int8.self))
            return _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0))
        }
        let (a0, a1, a2, a3) = half(0), (b0, b1, b2, b3) = half(1)
        return Block6(q: (a0, a1, a2, a3, b0, b1, b2, b3), scales: (sc(0), sc(1), sc(2), sc(3), sc(4), sc(5), sc(6), sc(7)),
                      allScales: _mm256_cvtepi8_epi16(w.loadUnaligned(fromByteOffset: 192, as: __m128i.self)), d: Int8Kernels.f16(w, 208))
    }

    /// sum over groups of scale * sum((q - 32) y): the offset comes off through the
    /// activations' 16-value sums.
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: Block6, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        let sumi = Int8Kernels.scaledSum(d.q, d.scales, y, D.self)
        // The offset of 32: scales times the activations' 16-value sums.
        let offset = _mm256_madd_epi16(d.allScales, y.loadUnaligned(fromByteOffset: 4, as: __m256i.self))
        let dd = d.d * y.load(as: Float.self)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(sumi), acc)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(-32 * dd), _mm256_cvtepi32_ps(offset), acc)
    }
}

extension IQ4 {
    /// The 16 levels in each 128-bit lane, for `_mm256_shuffle_epi8` lookups.
    @inlinable @inline(__always) public static var table: __m256i {
        _mm256_broadcastsi128_si256(_mm_set_epi64x(Int64(bitPattern: levelsHigh), Int64(bitPattern: levelsLow)))
    }

    /// 32 values of a 16-byte nibble layout (element j low in byte j, j + 16 high) as their int8 levels.
    @inlinable @inline(__always) public static func values(_ p: UnsafeRawPointer, _ table: __m256i) -> __m256i {
        _mm256_shuffle_epi8(table, Int8Kernels.nibbles(p))
    }
}

/// IQ4_NL: the table's levels as signed bytes, then Q8_0's product.
public enum IQ4_NLBlock: Int8Block {
    @inlinable public static var weightBytes: Int { 18 }
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> Block32 {
        Block32(q: IQ4.values(w + 2, IQ4.table), d: Int8Kernels.f16(w, 0), m: 0)
    }
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: Block32, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        Q8_0Block.accumulate(d, y, &acc, &s, D.self)
    }
}

/// IQ4_XS unpacked: eight sub-blocks of 32 levels as their magnitudes (unsigned bytes) and
/// signs, and each sub-block's signed 6-bit scale broadcast as int16.
@frozen public struct BlockXS {
    public var magnitudes: Int8Kernels.Vectors8
    public var signs: Int8Kernels.Vectors8
    public var scales: Int8Kernels.Vectors8
    public var d: Float
    @inlinable public init(magnitudes: Int8Kernels.Vectors8, signs: Int8Kernels.Vectors8, scales: Int8Kernels.Vectors8, d: Float) {
        self.magnitudes = magnitudes; self.signs = signs; self.scales = scales; self.d = d
    }
}

public enum IQ4_XSBlock: Int8Block {
    @inlinable public static var values: Int { 256 }
    @inlinable public static var weightBytes: Int { 136 }

    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> BlockXS {
        let table = IQ4.table
        @inline(__always) func q(_ s: Int) -> __m256i { IQ4.values(w + (8 &+ 16 &* s), table) }
        @inline(__always) func sc(_ s: Int) -> __m256i { _mm256_set1_epi16(Int16(IQ4.subScale(w, s))) }
        let q0 = q(0), q1 = q(1), q2 = q(2), q3 = q(3), q4 = q(4), q5 = q(5), q6 = q(6), q7 = q(7)
        @inline(__always) func m(_ v: __m256i) -> __m256i { _mm256_sign_epi8(v, v) }
        return BlockXS(magnitudes: (m(q0), m(q1), m(q2), m(q3), m(q4), m(q5), m(q6), m(q7)), signs: (q0, q1, q2, q3, q4, q5, q6, q7),
                       scales: (sc(0), sc(1), sc(2), sc(3), sc(4), sc(5), sc(6), sc(7)), d: Int8Kernels.f16(w, 0))
    }

    /// Each sub-block's signed product as |q| x (y with q's sign), unsigned times signed bytes,
    /// times its scale; summed exactly in int32 and scaled once by d times the activations' scale.
    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: BlockXS, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        @inline(__always) func p(_ m: __m256i, _ q: __m256i, _ j: Int, _ sc: __m256i) -> __m256i {
            D.unsigned(m, _mm256_sign_epi8(y.loadUnaligned(fromByteOffset: 36 &+ 32 &* j, as: __m256i.self), q), sc)
        }
        let sumi = _mm256_add_epi32(
            _mm256_add_epi32(_mm256_add_epi32(p(d.magnitudes.0, d.signs.0, 0, d.scales.0), p(d.magnitudes.1, d.signs.1, 1, d.scales.1)),
                             _mm256_add_epi32(p(d.magnitudes.2, d.signs.2, 2, d.scales.2), p(d.magnitudes.3, d.signs.3, 3, d.scales.3))),
            _mm256_add_epi32(_mm256_add_epi32(p(d.magnitudes.4, d.signs.4, 4, d.scales.4), p(d.magnitudes.5, d.signs.5, 5, d.scales.5)),
                             _mm256_add_epi32(p(d.magnitudes.6, d.signs.6, 6, d.scales.6), p(d.magnitudes.7, d.signs.7, 7, d.scales.7))))
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d.d * y.load(as: Float.self)), _mm256_cvtepi32_ps(sumi), acc)
    }
}

/// Q3_K and Q2_K unpacked: eight groups of 32 unsigned values (0...7 or 0...3), per group its
/// two 16-value scales as an int16 vector (low half, high half), and the 16 int16 multipliers
/// of the activations' 16-value sums that take off the offset (Q3_K: its scales, for the
/// offset of 4) or the mins (Q2_K), with the float scales of the two parts.
@frozen public struct BlockSixteen {
    public var q: Int8Kernels.Vectors8
    public var scales: Int8Kernels.Vectors8
    public var sums: __m256i
    public var d: Float
    public var dSums: Float
    @inlinable public init(q: Int8Kernels.Vectors8, scales: Int8Kernels.Vectors8, sums: __m256i, d: Float, dSums: Float) {
        self.q = q; self.scales = scales; self.sums = sums; self.d = d; self.dSums = dSums
    }

    /// Group j's two scales (sub-blocks 2j and 2j + 1, of the 16 int16 in `s`) as madd
    /// multipliers: the 32-bit lane holding both, broadcast, then each 128-bit half takes one.
    @inline(__always) @inlinable public static func pair(_ s: __m256i, _ j: Int) -> __m256i {
        let both = _mm256_permutevar8x32_epi32(s, _mm256_set1_epi32(Int32(j)))
        return _mm256_shuffle_epi8(both, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3))
    }

    /// (p(0), ..., p(7)) for the 16 int16 scales `s`.
    @inline(__always) @inlinable public static func pairs(_ s: __m256i) -> Int8Kernels.Vectors8 {
        (pair(s, 0), pair(s, 1), pair(s, 2), pair(s, 3), pair(s, 4), pair(s, 5), pair(s, 6), pair(s, 7))
    }

    /// The low bits of group j (values 32j ..< 32j + 32): bits 2 (j % 4) of the 32 bytes for its half.
    @inline(__always) @inlinable public static func twoBits(_ halves: (__m256i, __m256i), _ j: Int) -> __m256i {
        let v = j < 4 ? halves.0 : halves.1
        return _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(Int32(2 &* (j & 3)))), _mm256_set1_epi8(3))
    }

    /// d dy sum(scale q y) + dSums dy sum(multiplier x 16-value sum of y).
    @inline(__always) @inlinable
    public static func accumulate<D: Int8Dot>(_ d: BlockSixteen, _ y: UnsafeRawPointer, _ acc: inout __m256, _ dot: D.Type) {
        let sumi = Int8Kernels.scaledSum(d.q, d.scales, y, D.self)
        let offset = _mm256_madd_epi16(d.sums, y.loadUnaligned(fromByteOffset: 4, as: __m256i.self))
        let dy = y.load(as: Float.self)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d.d * dy), _mm256_cvtepi32_ps(sumi), acc)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d.dSums * dy), _mm256_cvtepi32_ps(offset), acc)
    }
}

public enum Q3_KBlock: Int8Block {
    @inlinable public static var values: Int { 256 }
    @inlinable public static var weightBytes: Int { 110 }

    /// Values (q - 4 stored as q = low 2 bits | third bit << 2) as 0...7; the offset of 4 comes off
    /// through the activations' sums times the scales.
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> BlockSixteen {
        let halves = (w.loadUnaligned(fromByteOffset: 32, as: __m256i.self), w.loadUnaligned(fromByteOffset: 64, as: __m256i.self))
        let mask = w.loadUnaligned(as: __m256i.self), one = _mm256_set1_epi8(1)
        @inline(__always) func group(_ j: Int) -> __m256i {
            let high = _mm256_and_si256(_mm256_srl_epi16(mask, _mm_cvtsi32_si128(Int32(j))), one)
            return _mm256_or_si256(BlockSixteen.twoBits(halves, j), _mm256_slli_epi16(high, 2))
        }
        let s = scales(w + 96)
        let d = Int8Kernels.f16(w, 108)
        return BlockSixteen(q: (group(0), group(1), group(2), group(3), group(4), group(5), group(6), group(7)),
                            scales: BlockSixteen.pairs(s), sums: s, d: d, dSums: -4 * d)
    }

    /// The 16 signed 6-bit scales (see `KQuant.q3Scale`) as int16, unpacked eight at a time:
    /// low 4 bits from the nibbles of bytes 0-7, top 2 bits from bytes 8-11 (bits 2(j / 4) of
    /// byte 8 + j % 4), less 32.
    @inline(__always) @inlinable public static func scales(_ p: UnsafeRawPointer) -> __m256i {
        let low = p.loadUnaligned(as: UInt64.self), top = UInt64(p.loadUnaligned(fromByteOffset: 8, as: UInt32.self))
        let nibbles: UInt64 = 0x0F0F_0F0F_0F0F_0F0F, twoBits: UInt64 = 0x0303_0303
        let first = (low & nibbles) | ((top & twoBits) | ((top >> 2) & twoBits) << 32) << 4
        let second = ((low >> 4) & nibbles) | (((top >> 4) & twoBits) | ((top >> 6) & twoBits) << 32) << 4
        let bytes = _mm_sub_epi8(_mm_set_epi64x(Int64(bitPattern: second), Int64(bitPattern: first)), _mm_set1_epi8(32))
        return _mm256_cvtepi8_epi16(bytes)
    }

    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: BlockSixteen, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        BlockSixteen.accumulate(d, y, &acc, D.self)
    }
}

public enum Q2_KBlock: Int8Block {
    @inlinable public static var values: Int { 256 }
    @inlinable public static var weightBytes: Int { 84 }

    /// Values 0...3 with 4-bit scales; the mins come off through the activations' sums.
    @inline(__always) @inlinable public static func decode(_ w: UnsafeRawPointer) -> BlockSixteen {
        let halves = (w.loadUnaligned(fromByteOffset: 16, as: __m256i.self), w.loadUnaligned(fromByteOffset: 48, as: __m256i.self))
        let packed = _mm256_cvtepu8_epi16(w.loadUnaligned(as: __m128i.self))
        let s = _mm256_and_si256(packed, _mm256_set1_epi16(15))
        return BlockSixteen(q: (BlockSixteen.twoBits(halves, 0), BlockSixteen.twoBits(halves, 1), BlockSixteen.twoBits(halves, 2),
                                BlockSixteen.twoBits(halves, 3), BlockSixteen.twoBits(halves, 4), BlockSixteen.twoBits(halves, 5),
                                BlockSixteen.twoBits(halves, 6), BlockSixteen.twoBits(halves, 7)),
                            scales: BlockSixteen.pairs(s),
                            sums: _mm256_srli_epi16(packed, 4), d: Int8Kernels.f16(w, 80), dSums: -Int8Kernels.f16(w, 82))
    }

    @inline(__always) @inlinable public static func accumulate<D: Int8Dot>(_ d: BlockSixteen, _ y: UnsafeRawPointer, _ acc: inout __m256, _ s: inout Float, _ dot: D.Type) {
        BlockSixteen.accumulate(d, y, &acc, D.self)
    }
}
#endif
