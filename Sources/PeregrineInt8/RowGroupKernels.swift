#if arch(x86_64)
import Builtin
import _Builtin_intrinsics.intel

/// Products of weights in row groups (`RowGroups`) with activations rounded to 8 bits: each
/// 32-bit lane is one of the group's eight rows, so a token's four activation bytes, broadcast,
/// go through one multiply-accumulate for eight rows (`RowGroupDot`: AVX-512 VNNI's `vpdpbusd`,
/// or AVX2's `maddubs` summed in 16 bits), and a block's scales, offset and conversion to float
/// are paid once per eight rows. Activations come as from
/// `Int8Kernels.quantizeActivations(..., integerSums: RowGroups.integerSums(type))`. Every token goes through the same
/// arithmetic whatever the batch, so a row's result does not depend on the batch it came in; the
/// integer sums are exact, so both instructions give the same bits.
public enum RowGroupKernels {
    /// y[t, 8g + r] = dot(row 8g + r, token t) (+ bias) for the groups `groups`.
    @inlinable
    public static func groups<D: RowGroupDot>(_ type: Int8WeightType, dot: D.Type, w: UnsafeRawPointer, k: Int, a: UnsafeRawPointer,
                                              stride: Int, tokens: Int, groups: Range<Int>, bias: UnsafePointer<Float>?,
                                              y: UnsafeMutablePointer<Float>, ldy: Int) {
        // Groups in runs of about 256 KB, each run taken through all the tokens before the next:
        // a run stays in the core's L2 while every tile of eight tokens passes over it.
        let bytes = k / RowGroups.blockValues(type) * RowGroups.blockBytes(type)
        let run = max(1, (256 << 10) / bytes)
        var g = groups.lowerBound
        while g < groups.upperBound {
            let part = g..<min(groups.upperBound, g &+ run)
            switch type {
            case .q8_0: tile(Q8_0Group.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .q4_0: tile(Q4_0Group.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .iq4_nl: tile(IQ4_NLGroup.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .q5_0: tile(Q5_0Group.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .q4_K: superBlocks(Q4_KGroup.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .q5_K: superBlocks(Q5_KGroup.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .q6_K: superBlocks(Q6_KGroup.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .q3_K: superBlocks(Q3_KGroup.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .q2_K: superBlocks(Q2_KGroup.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            case .iq4_xs: superBlocks(IQ4_XSGroup.self, D.self, w, k, a, stride, tokens, part, bias, y, ldy)
            default: preconditionFailure("no row-group kernel for \(type)")
            }
            g = part.upperBound
        }
    }

    /// One token's product with a group's block: the eight rows' exact integer sums, less the
    /// offset times the activations' sum, scaled by each row's scale times the token's.
    @inline(__always) @inlinable
    static func accumulate<D: RowGroupDot>(_: D.Type, _ q: Int8Kernels.Vectors8, _ bits: Int, _ dw: __m256, _ shift: Int32,
                                           _ x: UnsafeRawPointer, _ acc: inout __m256) {
        let s = D.dot(q, x + 8, bits: bits)
        let offset = _mm256_set1_epi32(x.load(fromByteOffset: 4, as: Int32.self) << shift)
        let scale = _mm256_mul_ps(dw, _mm256_set1_ps(x.load(as: Float.self)))
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s, offset)), scale, acc)
    }

    @inlinable @inline(never)
    static func tile<G: RowGroupBlock, D: RowGroupDot>(_: G.Type, _: D.Type, _ w: UnsafeRawPointer, _ k: Int, _ a: UnsafeRawPointer, _ stride: Int, _ tokens: Int,
                                       _ groups: Range<Int>, _ bias: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let blocks = k / 32, gb = G.bytes, shift = G.shift, bits = G.bits
        var t = 0
        // Eight tokens at a time: a block's unpacked values serve all eight.
        while t &+ 8 <= tokens {
            let a0 = a + t &* stride
            for g in groups {
                let wg = w + g &* blocks &* gb
                var c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0
                for b in 0..<blocks {
                    let p = wg + b &* gb
                    let q = G.unpack(p + 16)
                    let dw = _mm256_cvtph_ps(p.loadUnaligned(as: __m128i.self))
                    let x = a0 + b &* 40
                    accumulate(D.self, q, bits, dw, shift, x, &c0)
                    accumulate(D.self, q, bits, dw, shift, x + stride, &c1)
                    accumulate(D.self, q, bits, dw, shift, x + 2 &* stride, &c2)
                    accumulate(D.self, q, bits, dw, shift, x + 3 &* stride, &c3)
                    accumulate(D.self, q, bits, dw, shift, x + 4 &* stride, &c4)
                    accumulate(D.self, q, bits, dw, shift, x + 5 &* stride, &c5)
                    accumulate(D.self, q, bits, dw, shift, x + 6 &* stride, &c6)
                    accumulate(D.self, q, bits, dw, shift, x + 7 &* stride, &c7)
                }
                store(c0, t, g, bias, y, ldy); store(c1, t &+ 1, g, bias, y, ldy)
                store(c2, t &+ 2, g, bias, y, ldy); store(c3, t &+ 3, g, bias, y, ldy)
                store(c4, t &+ 4, g, bias, y, ldy); store(c5, t &+ 5, g, bias, y, ldy)
                store(c6, t &+ 6, g, bias, y, ldy); store(c7, t &+ 7, g, bias, y, ldy)
            }
            t &+= 8
        }
        while t < tokens {
            let at = a + t &* stride
            for g in groups {
                let wg = w + g &* blocks &* gb
                var c = _mm256_setzero_ps()
                for b in 0..<blocks {
                    let p = wg + b &* gb
                    accumulate(D.self, G.unpack(p + 16), bits, _mm256_cvtph_ps(p.loadUnaligned(as: __m128i.self)), shift, at + b &* 40, &c)
                }
                store(c, t, g, bias, y, ldy)
            }
            t &+= 1
        }
    }
}

extension RowGroupKernels {
    /// Chunk u's four activation bytes, from x + 4u, in every int32 lane.
    @inline(__always) @inlinable
    public static func broadcast(_ x: UnsafeRawPointer, _ u: Int) -> __m256i {
        _mm256_set1_epi32(x.loadUnaligned(fromByteOffset: 4 &* u, as: Int32.self))
    }

    @inline(__always) @inlinable
    static func store(_ acc: __m256, _ t: Int, _ g: Int, _ bias: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let o = 8 &* g
        let v = bias.map { _mm256_add_ps(acc, UnsafeRawPointer($0 + o).loadUnaligned(as: __m256.self)) } ?? acc
        let out: UnsafeMutablePointer<Float> = y + (t &* ldy &+ o)
        UnsafeMutableRawPointer(out).storeBytes(of: v, as: __m256.self)
    }

    /// Bit u of each byte of `h` at bit 4 (16-bit shifts: what crosses a byte is masked away):
    /// the fifth bits of Q5_0 and Q5_K values.
    @inline(__always) @inlinable
    static func fifthBit(_ h: __m256i, _ u: Int32) -> __m256i {
        _mm256_and_si256(u <= 4 ? _mm256_slli_epi16(h, 4 &- u) : _mm256_srli_epi16(h, u &- 4), _mm256_set1_epi8(0x10))
    }

    /// Asks for a cache line ahead of the loads. One token's Q6_K product reads a group block in
    /// three interleaved streams, which the hardware prefetcher did not keep up with: decode
    /// measured 380-410 tok/s without this and 810-1,330 with it on the reference model (the
    /// same prefetch measured no gain for Q4_K and a loss for Q8_0, which read one stream).
    /// Q3_K's blocks, read in two streams the same way, take it too.
    @inline(__always) @inlinable
    static func prefetch(_ p: UnsafeRawPointer) {
        Builtin.int_prefetch_RawPointer(p._rawValue, Int32(0)._value, Int32(3)._value, Int32(1)._value)
    }

    public typealias Vectors4 = (__m256i, __m256i, __m256i, __m256i)

    /// A 256-value type's products, sub-block by sub-block: a sub-block's values are unpacked
    /// once for eight tokens, each token's integer sums gathered over the block, then finished
    /// in float.
    @inlinable @inline(never)
    static func superBlocks<G: SuperBlockGroup, D: RowGroupDot>(_: G.Type, _: D.Type, _ w: UnsafeRawPointer, _ k: Int, _ a: UnsafeRawPointer, _ stride: Int,
                                                _ tokens: Int, _ groups: Range<Int>, _ bias: UnsafePointer<Float>?,
                                                _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let blocks = k / 256, gb = G.bytes, xb = 292
        var t = 0
        while t &+ 8 <= tokens {
            let a0 = a + t &* stride
            for g in groups {
                let wg = w + g &* blocks &* gb
                var c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0
                for b in 0..<blocks {
                    let p = wg + b &* gb, x = a0 + b &* xb
                    var s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0
                    for j in 0..<G.subBlocks {
                        let q = G.values(p, j), sc = G.scales(p, j)
                        G.subBlock(D.self, q, sc, x, j, &s0)
                        G.subBlock(D.self, q, sc, x + stride, j, &s1)
                        G.subBlock(D.self, q, sc, x + 2 &* stride, j, &s2)
                        G.subBlock(D.self, q, sc, x + 3 &* stride, j, &s3)
                        G.subBlock(D.self, q, sc, x + 4 &* stride, j, &s4)
                        G.subBlock(D.self, q, sc, x + 5 &* stride, j, &s5)
                        G.subBlock(D.self, q, sc, x + 6 &* stride, j, &s6)
                        G.subBlock(D.self, q, sc, x + 7 &* stride, j, &s7)
                    }
                    G.finish(p, s0, x, &c0)
                    G.finish(p, s1, x + stride, &c1)
                    G.finish(p, s2, x + 2 &* stride, &c2)
                    G.finish(p, s3, x + 3 &* stride, &c3)
                    G.finish(p, s4, x + 4 &* stride, &c4)
                    G.finish(p, s5, x + 5 &* stride, &c5)
                    G.finish(p, s6, x + 6 &* stride, &c6)
                    G.finish(p, s7, x + 7 &* stride, &c7)
                }
                store(c0, t, g, bias, y, ldy); store(c1, t &+ 1, g, bias, y, ldy)
                store(c2, t &+ 2, g, bias, y, ldy); store(c3, t &+ 3, g, bias, y, ldy)
                store(c4, t &+ 4, g, bias, y, ldy); store(c5, t &+ 5, g, bias, y, ldy)
                store(c6, t &+ 6, g, bias, y, ldy); store(c7, t &+ 7, g, bias, y, ldy)
            }
            t &+= 8
        }
        while t < tokens {
            let at = a + t &* stride
            for g in groups {
                let wg = w + g &* blocks &* gb
                var c = _mm256_setzero_ps()
                for b in 0..<blocks {
                    let p = wg + b &* gb, x = at + b &* xb
                    var s = _mm256_setzero_si256()
                    for j in 0..<G.subBlocks {
                        if G.prefetches {
                            prefetch(p + (2 &* gb &+ 128 &* j))
                            prefetch(p + (2 &* gb &+ 128 &* j &+ 64))
                        }
                        G.subBlock(D.self, G.values(p, j), G.scales(p, j), x, j, &s)
                    }
                    G.finish(p, s, x, &c)
                }
                store(c, t, g, bias, y, ldy)
            }
            t &+= 1
        }
    }
}

/// The multiply-accumulate of the row-group kernels: the eight rows' exact int32 sums of chunks
/// of four unsigned values (dword r of a vector is row r's) against a token's activation bytes,
/// chunk u's four bytes broadcast from x + 4u. `bits`: the values are below 2^bits, a constant
/// at every call, which AVX2 needs to know how long its 16-bit sums cannot overflow.
public protocol RowGroupDot {
    static func dot(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer, bits: Int) -> __m256i
    static func dot(_ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer, bits: Int) -> __m256i
    /// `dot` times each row's scale (`scales`: int32 lanes within -128...127), as a k-quant
    /// sub-block takes it.
    static func scaledDot(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer, bits: Int, scales: __m256i) -> __m256i
    static func scaledDot(_ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer, bits: Int, scales: __m256i) -> __m256i
}

extension RowGroupDot {
    @inline(__always) @inlinable
    public static func scaledDot(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer, bits: Int, scales: __m256i) -> __m256i {
        _mm256_mullo_epi32(dot(q, x, bits: bits), scales)
    }

    @inline(__always) @inlinable
    public static func scaledDot(_ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer, bits: Int, scales: __m256i) -> __m256i {
        _mm256_mullo_epi32(dot(q, x, bits: bits), scales)
    }
}

/// AVX2 has no four-byte multiply-accumulate: `maddubs` multiplies unsigned by signed bytes and
/// adds pairs into 16-bit lanes, which then go to 32 bits by `madd` with ones. A pair is at most
/// 2 x (2^bits - 1) x 128 in magnitude, so several chunks' pairs are added in 16 bits before one
/// `madd`: all eight for 4-bit values (at most 30,720), four for 5-bit, two for 6-bit. Eight-bit
/// values (Q8_0's and the IQ4 levels, offset to unsigned) would overflow a pair, so they go as
/// two nibbles, each summed like 4-bit values, the high sum taken 16 times.
public enum AVX2RowGroupDot: RowGroupDot {
    /// Each chunk's pairs in 16 bits, added by twos: chunks 0-1, 2-3, 4-5 and 6-7.
    @inline(__always) @inlinable
    static func pairSums(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer) -> (__m256i, __m256i, __m256i, __m256i) {
        @inline(__always) func p(_ v: __m256i, _ c: Int) -> __m256i { _mm256_maddubs_epi16(v, RowGroupKernels.broadcast(x, c)) }
        return (_mm256_add_epi16(p(q.0, 0), p(q.1, 1)), _mm256_add_epi16(p(q.2, 2), p(q.3, 3)),
                _mm256_add_epi16(p(q.4, 4), p(q.5, 5)), _mm256_add_epi16(p(q.6, 6), p(q.7, 7)))
    }

    /// The eight chunks' sums of values of at most 6 bits, taken to 32 bits by `madd` with `m`
    /// (int16 pairs: ones, or each row's scale).
    @inline(__always) @inlinable
    static func sums(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer, bits: Int, _ m: __m256i) -> __m256i {
        @inline(__always) func wide(_ v: __m256i) -> __m256i { _mm256_madd_epi16(v, m) }
        let s = pairSums(q, x)
        switch bits {
        case ...4: return wide(_mm256_add_epi16(_mm256_add_epi16(s.0, s.1), _mm256_add_epi16(s.2, s.3)))
        case 5: return _mm256_add_epi32(wide(_mm256_add_epi16(s.0, s.1)), wide(_mm256_add_epi16(s.2, s.3)))
        default:
            precondition(bits <= 6, "AVX2 row-group sums in 16 bits take values of at most 6 bits")
            return _mm256_add_epi32(_mm256_add_epi32(wide(s.0), wide(s.1)), _mm256_add_epi32(wide(s.2), wide(s.3)))
        }
    }

    /// The same over four chunks.
    @inline(__always) @inlinable
    static func sums(_ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer, bits: Int, _ m: __m256i) -> __m256i {
        @inline(__always) func p(_ v: __m256i, _ c: Int) -> __m256i { _mm256_maddubs_epi16(v, RowGroupKernels.broadcast(x, c)) }
        let a = _mm256_add_epi16(p(q.0, 0), p(q.1, 1)), b = _mm256_add_epi16(p(q.2, 2), p(q.3, 3))
        if bits <= 5 { return _mm256_madd_epi16(_mm256_add_epi16(a, b), m) }
        precondition(bits <= 6, "four chunks of AVX2 row-group products take values of at most 6 bits")
        return _mm256_add_epi32(_mm256_madd_epi16(a, m), _mm256_madd_epi16(b, m))
    }

    @inline(__always) @inlinable
    public static func dot(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer, bits: Int) -> __m256i {
        let ones = Int8Kernels.ones16
        if bits <= 6 { return sums(q, x, bits: bits, ones) }
        let low = Int8Kernels.lowNibbles
        @inline(__always) func lo(_ v: __m256i) -> __m256i { _mm256_and_si256(v, low) }
        @inline(__always) func hi(_ v: __m256i) -> __m256i { _mm256_and_si256(_mm256_srli_epi16(v, 4), low) }
        let l = sums((lo(q.0), lo(q.1), lo(q.2), lo(q.3), lo(q.4), lo(q.5), lo(q.6), lo(q.7)), x, bits: 4, ones)
        let h = sums((hi(q.0), hi(q.1), hi(q.2), hi(q.3), hi(q.4), hi(q.5), hi(q.6), hi(q.7)), x, bits: 4, _mm256_set1_epi16(16))
        return _mm256_add_epi32(h, l)
    }

    @inline(__always) @inlinable
    public static func dot(_ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer, bits: Int) -> __m256i {
        sums(q, x, bits: bits, Int8Kernels.ones16)
    }

    /// The scale as int16 in both halves of each int32 lane: `madd` with it takes the 16-bit
    /// sums to 32 bits already scaled, instead of `madd` with ones and a 32-bit multiply. A
    /// 16-bit sum is at most 32,767 in magnitude and a scale 128, so a lane's two products fit.
    @inline(__always) @inlinable static func pairScales(_ scales: __m256i) -> __m256i {
        _mm256_or_si256(_mm256_and_si256(scales, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(scales, 16))
    }

    @inline(__always) @inlinable
    public static func scaledDot(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer, bits: Int, scales: __m256i) -> __m256i {
        bits <= 6 ? sums(q, x, bits: bits, pairScales(scales)) : _mm256_mullo_epi32(dot(q, x, bits: bits), scales)
    }

    @inline(__always) @inlinable
    public static func scaledDot(_ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer, bits: Int, scales: __m256i) -> __m256i {
        sums(q, x, bits: bits, pairScales(scales))
    }
}

/// A 256-value type's group block (`RowGroups` has the layouts), for `superBlocks`; x is a
/// token's 256-value activation block.
public protocol SuperBlockGroup {
    associatedtype Values
    static var bytes: Int { get }
    static var subBlocks: Int { get }
    /// Whether one token's product prefetches two blocks ahead (`RowGroupKernels.prefetch`).
    static var prefetches: Bool { get }
    /// Sub-block j's values as unsigned bytes.
    static func values(_ p: UnsafeRawPointer, _ j: Int) -> Values
    /// Sub-block j's scales, one int32 lane per row.
    static func scales(_ p: UnsafeRawPointer, _ j: Int) -> __m256i
    /// The values are below 2^bits.
    static var bits: Int { get }
    /// Where sub-block j's activation bytes start in a token's block.
    static func activations(_ j: Int) -> Int
    /// What a token's integer sum over sub-block j carries from the values' offset, taken back
    /// before the sub-block's scale (IQ4_XS: 128 times the activations' sum; the other types
    /// take their offsets back in `finish`, so 0).
    static func subBlockOffset(_ x: UnsafeRawPointer, _ j: Int) -> Int32
    /// One token's integer sum over sub-block j, times each row's scale, added to `total`: the
    /// values' exact sums against the token's bytes at `activations(j)`, less
    /// `subBlockOffset`, times `scales(p, j)` (PeregrineVNNI's 512-bit kernels compute it from
    /// those pieces, so a type must not do anything else here).
    static func subBlock<D: RowGroupDot>(_: D.Type, _ q: Values, _ scales: __m256i, _ x: UnsafeRawPointer, _ j: Int, _ total: inout __m256i)
    /// The block's int16 pair vectors taken from the integer total before the float finish
    /// (their products with the activations' int16 sum pairs, shifted), if any.
    static var offsetPairs: FinishPairs? { get }
    /// The block's int16 pair vectors of mins, whose products with the activations' sum pairs,
    /// times dmin (f16 at 16) and the token's scale, come off after it, if any.
    static var minPairs: FinishPairs? { get }
}

/// Int16 pair vectors of a group's block for its float finish: `count` of them from byte `at`,
/// 32 bytes apart, vector i paired with the token's int32 at 4 + 4i (two int16 sums).
public struct FinishPairs: Sendable {
    public let at: Int
    public let count: Int
    public let shift: Int32
    @inlinable public init(at: Int, count: Int, shift: Int32 = 0) { self.at = at; self.count = count; self.shift = shift }
}

extension SuperBlockGroup {
    /// The exact sum of the pair vectors' products with the token's sum pairs.
    @inline(__always) @inlinable
    public static func pairSums(_ p: UnsafeRawPointer, _ f: FinishPairs, _ x: UnsafeRawPointer) -> __m256i {
        @inline(__always) func m(_ i: Int) -> __m256i {
            _mm256_madd_epi16(p.loadUnaligned(fromByteOffset: f.at &+ 32 &* i, as: __m256i.self),
                              _mm256_set1_epi32(x.loadUnaligned(fromByteOffset: 4 &+ 4 &* i, as: Int32.self)))
        }
        var s = m(0)
        for i in 1..<f.count { s = _mm256_add_epi32(s, m(i)) }
        return s
    }

    /// A token's block done in float: (the total less the offset) times d (f16 at 0) times the
    /// token's scale, less the mins' sums times dmin times the token's scale. PeregrineVNNI's
    /// 512-bit kernels do the same per lane.
    @inline(__always) @inlinable
    public static func finish(_ p: UnsafeRawPointer, _ total: __m256i, _ x: UnsafeRawPointer, _ acc: inout __m256) {
        var t = total
        if let o = offsetPairs { t = _mm256_sub_epi32(t, _mm256_sll_epi32(pairSums(p, o, x), _mm_cvtsi32_si128(o.shift))) }
        let dy = _mm256_set1_ps(x.load(as: Float.self))
        let d = _mm256_mul_ps(_mm256_cvtph_ps(p.loadUnaligned(as: __m128i.self)), dy)
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), d, acc)
        if let m = minPairs {
            let dmin = _mm256_mul_ps(_mm256_cvtph_ps(p.loadUnaligned(fromByteOffset: 16, as: __m128i.self)), dy)
            acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(pairSums(p, m, x)), dmin, acc)
        }
    }
}

/// Q4_K, and Q5_K (`five`): sub-blocks of 32 with unsigned 6-bit scales and mins.
public protocol KQuantGroup: SuperBlockGroup where Values == Int8Kernels.Vectors8 {
    static var five: Bool { get }
}

extension KQuantGroup {
    @inlinable public static var bytes: Int { five ? 1504 : 1248 }
    @inlinable public static var subBlocks: Int { 8 }
    @inlinable public static var prefetches: Bool { false }
    @inlinable public static var bits: Int { five ? 5 : 4 }
    /// The mins, as int16 pairs of sub-blocks 2i and 2i + 1.
    @inlinable public static var offsetPairs: FinishPairs? { nil }
    @inlinable public static var minPairs: FinishPairs? { FinishPairs(at: 96, count: 4) }
    @inline(__always) @inlinable public static func activations(_ j: Int) -> Int { 36 &+ 32 &* j }
    @inline(__always) @inlinable public static func subBlockOffset(_ x: UnsafeRawPointer, _ j: Int) -> Int32 { 0 }

    /// Unsigned nibbles, with Q5_K's fifth bits from the vector at 1248 + 32j: bit u of byte b
    /// of row r is value 4u + b's.
    @inline(__always) @inlinable public static func values(_ p: UnsafeRawPointer, _ j: Int) -> Int8Kernels.Vectors8 {
        let base = p + (224 &+ 256 &* (j >> 1)), low = Int8Kernels.lowNibbles
        let h = five ? p.loadUnaligned(fromByteOffset: 1248 &+ 32 &* j, as: __m256i.self) : _mm256_setzero_si256()
        @inline(__always) func v(_ u: Int) -> __m256i {
            let raw = base.loadUnaligned(fromByteOffset: 32 &* u, as: __m256i.self)
            let q = _mm256_and_si256(j & 1 == 0 ? raw : _mm256_srli_epi16(raw, 4), low)
            return five ? _mm256_or_si256(q, RowGroupKernels.fifthBit(h, Int32(u))) : q
        }
        return (v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7))
    }

    @inline(__always) @inlinable public static func scales(_ p: UnsafeRawPointer, _ j: Int) -> __m256i {
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(p.loadUnaligned(fromByteOffset: 32 &+ 8 &* j, as: Int64.self)))
    }

    @inline(__always) @inlinable
    public static func subBlock<D: RowGroupDot>(_: D.Type, _ q: Int8Kernels.Vectors8, _ scales: __m256i, _ x: UnsafeRawPointer, _ j: Int,
                                                _ total: inout __m256i) {
        total = _mm256_add_epi32(total, D.scaledDot(q, x + activations(j), bits: bits, scales: scales))
    }

}

public enum Q4_KGroup: KQuantGroup { @inlinable public static var five: Bool { false } }
public enum Q5_KGroup: KQuantGroup { @inlinable public static var five: Bool { true } }

/// Q6_K, and Q3_K (`three`): sub-blocks of 16 with signed scales (as int16 pairs at 16) and an
/// offset of 32 (Q6_K) or 4 (Q3_K) taken back through the activations' 16-value sums.
public protocol SixteensGroup: SuperBlockGroup where Values == RowGroupKernels.Vectors4 {
    static var three: Bool { get }
}

extension SixteensGroup {
    @inlinable public static var bytes: Int { three ? 1040 : 1808 }
    @inlinable public static var subBlocks: Int { 16 }
    @inlinable public static var prefetches: Bool { true }
    @inlinable public static var bits: Int { three ? 3 : 6 }
    /// The offset (32 for Q6_K, 4 for Q3_K) taken back through the scales times the
    /// activations' 16-value sums.
    @inlinable public static var offsetPairs: FinishPairs? { FinishPairs(at: 16, count: 8, shift: three ? 2 : 5) }
    @inlinable public static var minPairs: FinishPairs? { nil }
    @inline(__always) @inlinable public static func activations(_ s: Int) -> Int { 36 &+ 16 &* s }
    @inline(__always) @inlinable public static func subBlockOffset(_ x: UnsafeRawPointer, _ s: Int) -> Int32 { 0 }

    @inline(__always) @inlinable public static func values(_ p: UnsafeRawPointer, _ s: Int) -> RowGroupKernels.Vectors4 {
        three ? q3_KValues(p, s) : q6_KValues(p, s)
    }

    /// Q3_K: the low two bits of chunk k at bits 2k of the sub-block's vector, the third at bit
    /// k + 4 (s & 1) of its pair's vector (the 16-bit shifts' spill across bytes is masked away).
    @inline(__always) @inlinable static func q3_KValues(_ p: UnsafeRawPointer, _ s: Int) -> RowGroupKernels.Vectors4 {
        let low = p.loadUnaligned(fromByteOffset: 272 &+ 32 &* s, as: __m256i.self)
        let h = p.loadUnaligned(fromByteOffset: 784 &+ 32 &* (s >> 1), as: __m256i.self)
        let two = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4)
        @inline(__always) func v(_ c: Int32) -> __m256i {
            let at = c &+ 4 &* Int32(s & 1)
            let third = at >= 2 ? _mm256_srli_epi16(h, at &- 2) : _mm256_slli_epi16(h, 2 &- at)
            return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(low, 2 &* c), two), _mm256_and_si256(third, four))
        }
        return (v(0), v(1), v(2), v(3))
    }

    /// Q6_K: two vectors of low nibbles and one of top bits per sub-block.
    @inline(__always) @inlinable static func q6_KValues(_ p: UnsafeRawPointer, _ s: Int) -> RowGroupKernels.Vectors4 {
        let low = Int8Kernels.lowNibbles, top = _mm256_set1_epi8(0x30)
        let a = p.loadUnaligned(fromByteOffset: 272 &+ 64 &* s, as: __m256i.self)
        let b = p.loadUnaligned(fromByteOffset: 304 &+ 64 &* s, as: __m256i.self)
        let h = p.loadUnaligned(fromByteOffset: 1296 &+ 32 &* s, as: __m256i.self)
        return (_mm256_or_si256(_mm256_and_si256(a, low), _mm256_and_si256(_mm256_slli_epi16(h, 4), top)),
                _mm256_or_si256(_mm256_and_si256(b, low), _mm256_and_si256(_mm256_slli_epi16(h, 2), top)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low), _mm256_and_si256(h, top)),
                _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low), _mm256_and_si256(_mm256_srli_epi16(h, 2), top)))
    }

    /// Sub-block s's signed scales as int32 lanes (from the int16 pairs).
    @inline(__always) @inlinable public static func scales(_ p: UnsafeRawPointer, _ s: Int) -> __m256i {
        let pair = p.loadUnaligned(fromByteOffset: 16 &+ 32 &* (s >> 1), as: __m256i.self)
        return s & 1 == 0 ? _mm256_srai_epi32(_mm256_slli_epi32(pair, 16), 16) : _mm256_srai_epi32(pair, 16)
    }

    @inline(__always) @inlinable
    public static func subBlock<D: RowGroupDot>(_: D.Type, _ q: RowGroupKernels.Vectors4, _ scales: __m256i, _ x: UnsafeRawPointer, _ s: Int,
                                                _ total: inout __m256i) {
        total = _mm256_add_epi32(total, D.scaledDot(q, x + activations(s), bits: bits, scales: scales))
    }

}

public enum Q6_KGroup: SixteensGroup { @inlinable public static var three: Bool { false } }
public enum Q3_KGroup: SixteensGroup { @inlinable public static var three: Bool { true } }

/// Q2_K: sub-blocks of 16 with unsigned 4-bit scales (int16 pairs at 32) and mins (at 288),
/// the mins taken off through the activations' 16-value sums.
public enum Q2_KGroup: SuperBlockGroup {
    @inlinable public static var bytes: Int { 1056 }
    @inlinable public static var subBlocks: Int { 16 }
    @inlinable public static var prefetches: Bool { true }
    @inlinable public static var bits: Int { 2 }
    @inlinable public static var offsetPairs: FinishPairs? { nil }
    @inlinable public static var minPairs: FinishPairs? { FinishPairs(at: 288, count: 8) }
    @inline(__always) @inlinable public static func activations(_ s: Int) -> Int { 36 &+ 16 &* s }
    @inline(__always) @inlinable public static func subBlockOffset(_ x: UnsafeRawPointer, _ s: Int) -> Int32 { 0 }

    /// Chunk c's two bits at bits 2c of each byte of the sub-block's vector.
    @inline(__always) @inlinable public static func values(_ p: UnsafeRawPointer, _ s: Int) -> RowGroupKernels.Vectors4 {
        let v = p.loadUnaligned(fromByteOffset: 544 &+ 32 &* s, as: __m256i.self), three = _mm256_set1_epi8(3)
        return (_mm256_and_si256(v, three), _mm256_and_si256(_mm256_srli_epi16(v, 2), three),
                _mm256_and_si256(_mm256_srli_epi16(v, 4), three), _mm256_and_si256(_mm256_srli_epi16(v, 6), three))
    }

    @inline(__always) @inlinable public static func scales(_ p: UnsafeRawPointer, _ s: Int) -> __m256i {
        let pair = p.loadUnaligned(fromByteOffset: 32 &+ 32 &* (s >> 1), as: __m256i.self)
        return s & 1 == 0 ? _mm256_and_si256(pair, _mm256_set1_epi32(0xFFFF)) : _mm256_srli_epi32(pair, 16)
    }

    @inline(__always) @inlinable
    public static func subBlock<D: RowGroupDot>(_: D.Type, _ q: RowGroupKernels.Vectors4, _ scales: __m256i, _ x: UnsafeRawPointer, _ s: Int,
                                                _ total: inout __m256i) {
        total = _mm256_add_epi32(total, D.scaledDot(q, x + activations(s), bits: bits, scales: scales))
    }

}

/// IQ4_XS: IQ4_NL's nibble vectors per sub-block of 32, signed scales as bytes at 16.
public enum IQ4_XSGroup: SuperBlockGroup {
    @inlinable public static var bytes: Int { 1104 }
    @inlinable public static var subBlocks: Int { 8 }
    @inlinable public static var prefetches: Bool { false }
    @inlinable public static var bits: Int { 8 }
    /// The levels' offset of 128 comes off per sub-block (`subBlockOffset`); no mins.
    @inlinable public static var offsetPairs: FinishPairs? { nil }
    @inlinable public static var minPairs: FinishPairs? { nil }
    @inline(__always) @inlinable public static func activations(_ j: Int) -> Int { 36 &+ 32 &* j }
    @inline(__always) @inlinable public static func subBlockOffset(_ x: UnsafeRawPointer, _ j: Int) -> Int32 {
        Int32(x.load(fromByteOffset: 4 &+ 2 &* j, as: Int16.self)) << 7
    }

    @inline(__always) @inlinable public static func values(_ p: UnsafeRawPointer, _ j: Int) -> Int8Kernels.Vectors8 {
        IQ4_NLGroup.unpack(p + (80 &+ 128 &* j))
    }

    @inline(__always) @inlinable public static func scales(_ p: UnsafeRawPointer, _ j: Int) -> __m256i {
        _mm256_cvtepi8_epi32(_mm_cvtsi64_si128(p.loadUnaligned(fromByteOffset: 16 &+ 8 &* j, as: Int64.self)))
    }

    /// The levels plus 128 against the activations, less 128 times their 32-value sum, times
    /// each row's scale.
    @inline(__always) @inlinable
    public static func subBlock<D: RowGroupDot>(_: D.Type, _ q: Int8Kernels.Vectors8, _ scales: __m256i, _ x: UnsafeRawPointer, _ j: Int,
                                                _ total: inout __m256i) {
        let offset = _mm256_set1_epi32(subBlockOffset(x, j))
        let s = D.dot(q, x + activations(j), bits: bits)
        total = _mm256_add_epi32(total, _mm256_mullo_epi32(_mm256_sub_epi32(s, offset), scales))
    }

}

/// A row-group block's values as unsigned bytes: eight vectors, vector c holding values
/// 4c..<4c+4 of each row in its dword.
public protocol RowGroupBlock {
    static var bytes: Int { get }
    /// log2 of the offset the values carry.
    static var shift: Int32 { get }
    /// The values are below 2^bits.
    static var bits: Int { get }
    static func unpack(_ p: UnsafeRawPointer) -> Int8Kernels.Vectors8
}

public enum Q8_0Group: RowGroupBlock {
    @inlinable public static var bytes: Int { 272 }
    @inlinable public static var shift: Int32 { 7 }
    @inlinable public static var bits: Int { 8 }
    @inline(__always) @inlinable public static func unpack(_ p: UnsafeRawPointer) -> Int8Kernels.Vectors8 {
        @inline(__always) func v(_ c: Int) -> __m256i { p.loadUnaligned(fromByteOffset: 32 &* c, as: __m256i.self) }
        return (v(0), v(1), v(2), v(3), v(4), v(5), v(6), v(7))
    }
}

/// Nibble bytes: vector j's low nibbles are values 4j..<4j+4, its high nibbles 16+4j..<16+4j+4.
@inline(__always) @inlinable
func nibbleVectors(_ p: UnsafeRawPointer, _ map: (__m256i) -> __m256i) -> Int8Kernels.Vectors8 {
    let low = Int8Kernels.lowNibbles
    @inline(__always) func v(_ j: Int) -> __m256i { p.loadUnaligned(fromByteOffset: 32 &* j, as: __m256i.self) }
    let v0 = v(0), v1 = v(1), v2 = v(2), v3 = v(3)
    @inline(__always) func lo(_ x: __m256i) -> __m256i { map(_mm256_and_si256(x, low)) }
    @inline(__always) func hi(_ x: __m256i) -> __m256i { map(_mm256_and_si256(_mm256_srli_epi16(x, 4), low)) }
    return (lo(v0), lo(v1), lo(v2), lo(v3), hi(v0), hi(v1), hi(v2), hi(v3))
}

public enum Q4_0Group: RowGroupBlock {
    @inlinable public static var bytes: Int { 144 }
    @inlinable public static var shift: Int32 { 3 }
    @inlinable public static var bits: Int { 4 }
    @inline(__always) @inlinable public static func unpack(_ p: UnsafeRawPointer) -> Int8Kernels.Vectors8 {
        nibbleVectors(p) { $0 }
    }
}

public enum Q5_0Group: RowGroupBlock {
    @inlinable public static var bytes: Int { 176 }
    @inlinable public static var shift: Int32 { 4 }
    @inlinable public static var bits: Int { 5 }
    /// Q4_0's nibble vectors with the fifth bits of the vector after them: bit u of byte b of row
    /// r is value 4u + b's.
    @inline(__always) @inlinable public static func unpack(_ p: UnsafeRawPointer) -> Int8Kernels.Vectors8 {
        let n = nibbleVectors(p) { $0 }
        let h = p.loadUnaligned(fromByteOffset: 128, as: __m256i.self)
        @inline(__always) func five(_ q: __m256i, _ u: Int32) -> __m256i { _mm256_or_si256(q, RowGroupKernels.fifthBit(h, u)) }
        return (five(n.0, 0), five(n.1, 1), five(n.2, 2), five(n.3, 3), five(n.4, 4), five(n.5, 5), five(n.6, 6), five(n.7, 7))
    }
}

public enum IQ4_NLGroup: RowGroupBlock {
    @inlinable public static var bytes: Int { 144 }
    @inlinable public static var shift: Int32 { 7 }
    @inlinable public static var bits: Int { 8 }
    @inline(__always) @inlinable public static func unpack(_ p: UnsafeRawPointer) -> Int8Kernels.Vectors8 {
        // The levels plus 128: the table's signed bytes with their top bit flipped.
        let table = _mm256_xor_si256(IQ4.table, _mm256_set1_epi8(-128))
        return nibbleVectors(p) { _mm256_shuffle_epi8(table, $0) }
    }
}
#endif
