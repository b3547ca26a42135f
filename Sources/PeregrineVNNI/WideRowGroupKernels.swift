#if arch(x86_64)
import Builtin
import PeregrineInt8
import _Builtin_intrinsics.intel

/// The row-group products (`RowGroupKernels`) two groups at a time on 512-bit `vpdpbusd`: a
/// 512-bit vector holds group g's eight rows in its low half and group g + 1's in its high half,
/// so one multiply-accumulate against a token's broadcast activation bytes serves sixteen rows.
/// A core with two 512-bit units does twice the integer products per cycle this way (the 256-bit
/// kernels fill half of each unit). The groups' layout is unchanged: each group's values are
/// unpacked as the 256-bit kernels unpack them and the two halves joined, once per block for a
/// tile of eight tokens.
///
/// Every lane goes through the 256-bit VNNI kernels' arithmetic: the same exact integer sums and
/// the same float operations in the same order. So a row's result has the same bits whichever kernel computes it, and a token's result
/// does not depend on its batch.
public enum WideRowGroupKernels {
    public typealias Wide = SIMD16<Int32>

    /// `RowGroupKernels.groups` for the tiles of eight tokens of `tokens` (a multiple of 8) and
    /// the pairs of `groups`; the last group of an odd count goes through the 256-bit kernels.
    public static func groups(_ type: Int8WeightType, w: UnsafeRawPointer, k: Int, a: UnsafeRawPointer, stride: Int, tokens: Int,
                              groups: Range<Int>, bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, ldy: Int) {
        precondition(tokens % 8 == 0, "the wide row-group kernels take tiles of eight tokens")
        // Pairs of groups in runs of about 256 KB, as the 256-bit kernels run single groups.
        let bytes = k / RowGroups.blockValues(type) * RowGroups.blockBytes(type)
        let run = max(2, (256 << 10) / bytes) & ~1
        var g = groups.lowerBound
        while g &+ 2 <= groups.upperBound {
            let pairs = min((groups.upperBound &- g) / 2, run / 2)
            switch type {
            case .q8_0: tile(Q8_0Group.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .q4_0: tile(Q4_0Group.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .iq4_nl: tile(IQ4_NLGroup.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .q5_0: tile(Q5_0Group.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .q4_K: superBlocks(Q4_KGroup.self, WideChunks8.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .q5_K: superBlocks(Q5_KGroup.self, WideChunks8.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .iq4_xs: superBlocks(IQ4_XSGroup.self, WideChunks8.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .q6_K: superBlocks(Q6_KGroup.self, WideChunks4.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .q3_K: superBlocks(Q3_KGroup.self, WideChunks4.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            case .q2_K: superBlocks(Q2_KGroup.self, WideChunks4.self, w, k, a, stride, tokens, g, pairs, bias, y, ldy)
            default: preconditionFailure("no row-group kernel for \(type)")
            }
            g &+= 2 &* pairs
        }
        if g < groups.upperBound {
            RowGroupKernels.groups(type, dot: VNNIDot.self, w: w, k: k, a: a, stride: stride, tokens: tokens, groups: g..<groups.upperBound,
                                   bias: bias, y: y, ldy: ldy)
        }
    }

    /// 12 independent chains of 512-bit `vpdpbusd` (the machine's integer dot-product peak for
    /// `bench --kernels`: 128 operations an instruction); returns a value that depends on all.
    public static func dotChains(iterations: Int, seed: Int32) -> Int32 {
        let m = Wide(repeating: 0x0101_0101), v = Wide(repeating: seed)
        var a0 = v, a1 = v &+ 1, a2 = v &+ 2, a3 = v &+ 3, a4 = v &+ 4, a5 = v &+ 5, a6 = v &+ 6, a7 = v &+ 7
        var a8 = v &+ 8, a9 = v &+ 9, a10 = v &+ 10, a11 = v &+ 11
        for _ in 0..<iterations {
            a0 = dpbusd(a0, m, a0); a1 = dpbusd(a1, m, a1); a2 = dpbusd(a2, m, a2); a3 = dpbusd(a3, m, a3)
            a4 = dpbusd(a4, m, a4); a5 = dpbusd(a5, m, a5); a6 = dpbusd(a6, m, a6); a7 = dpbusd(a7, m, a7)
            a8 = dpbusd(a8, m, a8); a9 = dpbusd(a9, m, a9); a10 = dpbusd(a10, m, a10); a11 = dpbusd(a11, m, a11)
        }
        return (a0 &+ a1 &+ a2 &+ a3 &+ a4 &+ a5 &+ a6 &+ a7 &+ a8 &+ a9 &+ a10 &+ a11).wrappedSum()
    }

    // MARK: 512-bit pieces

    /// Group g's vector in the low half, group g + 1's in the high half.
    @inline(__always) @inlinable
    public static func join(_ lo: __m256i, _ hi: __m256i) -> Wide {
        Wide(lowHalf: unsafeBitCast(lo, to: SIMD8<Int32>.self), highHalf: unsafeBitCast(hi, to: SIMD8<Int32>.self))
    }

    /// The two groups' sixteen f16 scales (the first 16 bytes of each group's block) as f32.
    @inline(__always) @inlinable
    static func scales(_ p0: UnsafeRawPointer, _ p1: UnsafeRawPointer) -> SIMD16<Float> {
        let h = SIMD16<UInt16>(lowHalf: p0.loadUnaligned(as: SIMD8<UInt16>.self), highHalf: p1.loadUnaligned(as: SIMD8<UInt16>.self))
        let f = Builtin.fpext_Vec16xFPIEEE16_Vec16xFPIEEE32(unsafeBitCast(h, to: Builtin.Vec16xFPIEEE16.self))
        return unsafeBitCast(f, to: SIMD16<Float>.self)
    }

    @inline(__always) @inlinable
    static func float(_ v: Wide) -> SIMD16<Float> {
        unsafeBitCast(Builtin.sitofp_Vec16xInt32_Vec16xFPIEEE32(v._storage._value), to: SIMD16<Float>.self)
    }

    @inline(__always) @inlinable
    public static func dpbusd(_ acc: Wide, _ a: Wide, _ b: Wide) -> Wide {
        var s = Wide()
        s._storage._value = Builtin.int_x86_avx512_vpdpbusd_512(acc._storage._value, a._storage._value, b._storage._value)
        return s
    }

    /// Chunk u's four activation bytes, from x + 4u, in every int32 lane.
    @inline(__always) @inlinable
    public static func broadcast(_ x: UnsafeRawPointer, _ u: Int) -> Wide {
        Wide(repeating: x.loadUnaligned(fromByteOffset: 4 &* u, as: Int32.self))
    }

    /// Token t's results for rows 8g..<8g + 16, plus their biases.
    @inline(__always) @inlinable
    static func store(_ acc: SIMD16<Float>, _ t: Int, _ g: Int, _ bias: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let o = 8 &* g
        let v = bias.map { acc + UnsafeRawPointer($0 + o).loadUnaligned(as: SIMD16<Float>.self) } ?? acc
        UnsafeMutableRawPointer(y + (t &* ldy &+ o)).storeBytes(of: v, as: SIMD16<Float>.self)
    }

    // MARK: 32-value blocks

    /// `RowGroupKernels.accumulate` on sixteen rows.
    @inline(__always) @inlinable
    static func accumulate(_ q: WideChunks8, _ dw: SIMD16<Float>, _ shift: Int32, _ x: UnsafeRawPointer, _ acc: inout SIMD16<Float>) {
        let s = q.dot(x + 8)
        let offset = Wide(repeating: x.load(fromByteOffset: 4, as: Int32.self) << shift)
        let scale = dw * SIMD16<Float>(repeating: x.load(as: Float.self))
        acc = acc.addingProduct(float(s &- offset), scale)
    }

    /// Groups g, g + 1, ... g + 2 pairs - 1 by tiles of eight tokens.
    @inlinable @inline(never)
    static func tile<G: RowGroupBlock>(_: G.Type, _ w: UnsafeRawPointer, _ k: Int, _ a: UnsafeRawPointer, _ stride: Int, _ tokens: Int,
                                       _ first: Int, _ pairs: Int, _ bias: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>, _ ldy: Int) {
        let blocks = k / 32, gb = G.bytes, shift = G.shift, groupBytes = blocks &* gb
        var t = 0
        while t &+ 8 <= tokens {
            let a0 = a + t &* stride
            for pair in 0..<pairs {
                let g = first &+ 2 &* pair
                let w0 = w + g &* groupBytes, w1 = w0 + groupBytes
                var c0 = SIMD16<Float>(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0
                for b in 0..<blocks {
                    let p0 = w0 + b &* gb, p1 = w1 + b &* gb
                    let q = WideChunks8(G.unpack(p0 + 16), G.unpack(p1 + 16))
                    let dw = scales(p0, p1)
                    let x = a0 + b &* 40
                    accumulate(q, dw, shift, x, &c0)
                    accumulate(q, dw, shift, x + stride, &c1)
                    accumulate(q, dw, shift, x + 2 &* stride, &c2)
                    accumulate(q, dw, shift, x + 3 &* stride, &c3)
                    accumulate(q, dw, shift, x + 4 &* stride, &c4)
                    accumulate(q, dw, shift, x + 5 &* stride, &c5)
                    accumulate(q, dw, shift, x + 6 &* stride, &c6)
                    accumulate(q, dw, shift, x + 7 &* stride, &c7)
                }
                store(c0, t, g, bias, y, ldy); store(c1, t &+ 1, g, bias, y, ldy)
                store(c2, t &+ 2, g, bias, y, ldy); store(c3, t &+ 3, g, bias, y, ldy)
                store(c4, t &+ 4, g, bias, y, ldy); store(c5, t &+ 5, g, bias, y, ldy)
                store(c6, t &+ 6, g, bias, y, ldy); store(c7, t &+ 7, g, bias, y, ldy)
            }
            t &+= 8
        }
    }

    // MARK: 256-value blocks

    /// One token's integer sum over sub-block j, as `SuperBlockGroup.subBlock` takes it with
    /// VNNI's products: (the sums less the offset) times each row's scale.
    @inline(__always) @inlinable
    static func subBlock<G: SuperBlockGroup>(_: G.Type, _ s: Wide, _ scales: Wide, _ x: UnsafeRawPointer, _ j: Int, _ total: inout Wide) {
        total &+= (s &- Wide(repeating: G.subBlockOffset(x, j))) &* scales
    }

    /// `SuperBlockGroup.finish` on sixteen rows, the same operations per lane: (the total less
    /// the offset) times d (`d`: the pair's, as f32) times the token's scale, less the mins' sums
    /// times dmin times the token's scale.
    @inline(__always) @inlinable
    static func finish<G: SuperBlockGroup>(_: G.Type, _ p0: UnsafeRawPointer, _ p1: UnsafeRawPointer, _ d: SIMD16<Float>, _ dmin: SIMD16<Float>,
                                           _ total: Wide, _ x: UnsafeRawPointer, _ acc: inout SIMD16<Float>) {
        var t = total
        if let o = G.offsetPairs { t &-= pairSums(p0, p1, o, x) &<< o.shift }
        let dy = SIMD16<Float>(repeating: x.load(as: Float.self))
        acc = acc.addingProduct(float(t), d * dy)
        if let m = G.minPairs { acc = acc.addingProduct(-float(pairSums(p0, p1, m, x)), dmin * dy) }
    }

    /// `SuperBlockGroup.pairSums` on the pair's joined vectors.
    @inline(__always) @inlinable
    static func pairSums(_ p0: UnsafeRawPointer, _ p1: UnsafeRawPointer, _ f: FinishPairs, _ x: UnsafeRawPointer) -> Wide {
        @inline(__always) func m(_ i: Int) -> Wide {
            let o = f.at &+ 32 &* i
            let v = join(p0.loadUnaligned(fromByteOffset: o, as: __m256i.self), p1.loadUnaligned(fromByteOffset: o, as: __m256i.self))
            return madd(v, Wide(repeating: x.loadUnaligned(fromByteOffset: 4 &+ 4 &* i, as: Int32.self)))
        }
        var s = m(0)
        for i in 1..<f.count { s &+= m(i) }
        return s
    }

    /// `vpmaddwd`: int16 pairs multiplied and each pair's two products added into its int32 lane.
    @inline(__always) @inlinable
    static func madd(_ a: Wide, _ b: Wide) -> Wide {
        let r = Builtin.int_x86_avx512_pmaddw_d_512(unsafeBitCast(a, to: SIMD32<Int16>.self)._storage._value,
                                                    unsafeBitCast(b, to: SIMD32<Int16>.self)._storage._value)
        var v = Wide()
        v._storage._value = r
        return v
    }

    /// `RowGroupKernels.superBlocks` on pairs of groups: a sub-block's values unpacked and joined
    /// (`C`) once for eight tokens.
    @inlinable @inline(never)
    static func superBlocks<G: SuperBlockGroup, C: WideChunks>(_: G.Type, _: C.Type, _ w: UnsafeRawPointer, _ k: Int, _ a: UnsafeRawPointer,
                                                               _ stride: Int, _ tokens: Int, _ first: Int, _ pairs: Int,
                                                               _ bias: UnsafePointer<Float>?, _ y: UnsafeMutablePointer<Float>, _ ldy: Int)
    where C.Narrow == G.Values {
        let blocks = k / 256, gb = G.bytes, xb = 292, groupBytes = blocks &* gb
        var t = 0
        while t &+ 8 <= tokens {
            let a0 = a + t &* stride
            for pair in 0..<pairs {
                let g = first &+ 2 &* pair
                let w0 = w + g &* groupBytes, w1 = w0 + groupBytes
                var c0 = SIMD16<Float>(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0, c6 = c0, c7 = c0
                for b in 0..<blocks {
                    let p0 = w0 + b &* gb, p1 = w1 + b &* gb, x = a0 + b &* xb
                    let d = scales(p0, p1), dmin = G.minPairs == nil ? d : scales(p0 + 16, p1 + 16)
                    var s0 = Wide(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0
                    for j in 0..<G.subBlocks {
                        let q = C(G.values(p0, j), G.values(p1, j)), sc = join(G.scales(p0, j), G.scales(p1, j)), o = G.activations(j)
                        subBlock(G.self, q.dot(x + o), sc, x, j, &s0)
                        subBlock(G.self, q.dot(x + (stride &+ o)), sc, x + stride, j, &s1)
                        subBlock(G.self, q.dot(x + (2 &* stride &+ o)), sc, x + 2 &* stride, j, &s2)
                        subBlock(G.self, q.dot(x + (3 &* stride &+ o)), sc, x + 3 &* stride, j, &s3)
                        subBlock(G.self, q.dot(x + (4 &* stride &+ o)), sc, x + 4 &* stride, j, &s4)
                        subBlock(G.self, q.dot(x + (5 &* stride &+ o)), sc, x + 5 &* stride, j, &s5)
                        subBlock(G.self, q.dot(x + (6 &* stride &+ o)), sc, x + 6 &* stride, j, &s6)
                        subBlock(G.self, q.dot(x + (7 &* stride &+ o)), sc, x + 7 &* stride, j, &s7)
                    }
                    finish(G.self, p0, p1, d, dmin, s0, x, &c0)
                    finish(G.self, p0, p1, d, dmin, s1, x + stride, &c1)
                    finish(G.self, p0, p1, d, dmin, s2, x + 2 &* stride, &c2)
                    finish(G.self, p0, p1, d, dmin, s3, x + 3 &* stride, &c3)
                    finish(G.self, p0, p1, d, dmin, s4, x + 4 &* stride, &c4)
                    finish(G.self, p0, p1, d, dmin, s5, x + 5 &* stride, &c5)
                    finish(G.self, p0, p1, d, dmin, s6, x + 6 &* stride, &c6)
                    finish(G.self, p0, p1, d, dmin, s7, x + 7 &* stride, &c7)
                }
                store(c0, t, g, bias, y, ldy); store(c1, t &+ 1, g, bias, y, ldy)
                store(c2, t &+ 2, g, bias, y, ldy); store(c3, t &+ 3, g, bias, y, ldy)
                store(c4, t &+ 4, g, bias, y, ldy); store(c5, t &+ 5, g, bias, y, ldy)
                store(c6, t &+ 6, g, bias, y, ldy); store(c7, t &+ 7, g, bias, y, ldy)
            }
            t &+= 8
        }
    }
}

/// A sub-block's (or block's) values of a pair of groups, joined: the first group's rows in the
/// low halves.
public protocol WideChunks {
    associatedtype Narrow
    init(_ first: Narrow, _ second: Narrow)
    /// The sixteen rows' exact sums of the chunks against a token's bytes at x (chunk u's four at
    /// x + 4u).
    func dot(_ x: UnsafeRawPointer) -> WideRowGroupKernels.Wide
}

public struct WideChunks8: WideChunks {
    public typealias Wide = WideRowGroupKernels.Wide
    public var q0, q1, q2, q3, q4, q5, q6, q7: Wide

    @inline(__always) @inlinable
    public init(_ a: Int8Kernels.Vectors8, _ b: Int8Kernels.Vectors8) {
        typealias K = WideRowGroupKernels
        q0 = K.join(a.0, b.0); q1 = K.join(a.1, b.1); q2 = K.join(a.2, b.2); q3 = K.join(a.3, b.3)
        q4 = K.join(a.4, b.4); q5 = K.join(a.5, b.5); q6 = K.join(a.6, b.6); q7 = K.join(a.7, b.7)
    }

    @inline(__always) @inlinable
    public func dot(_ x: UnsafeRawPointer) -> Wide {
        typealias K = WideRowGroupKernels
        @inline(__always) func b(_ u: Int) -> Wide { K.broadcast(x, u) }
        let s = K.dpbusd(K.dpbusd(K.dpbusd(K.dpbusd(Wide(), q0, b(0)), q1, b(1)), q2, b(2)), q3, b(3))
        return K.dpbusd(K.dpbusd(K.dpbusd(K.dpbusd(s, q4, b(4)), q5, b(5)), q6, b(6)), q7, b(7))
    }
}

public struct WideChunks4: WideChunks {
    public typealias Wide = WideRowGroupKernels.Wide
    public var q0, q1, q2, q3: Wide

    @inline(__always) @inlinable
    public init(_ a: RowGroupKernels.Vectors4, _ b: RowGroupKernels.Vectors4) {
        typealias K = WideRowGroupKernels
        q0 = K.join(a.0, b.0); q1 = K.join(a.1, b.1); q2 = K.join(a.2, b.2); q3 = K.join(a.3, b.3)
    }

    @inline(__always) @inlinable
    public func dot(_ x: UnsafeRawPointer) -> Wide {
        typealias K = WideRowGroupKernels
        @inline(__always) func b(_ u: Int) -> Wide { K.broadcast(x, u) }
        return K.dpbusd(K.dpbusd(K.dpbusd(K.dpbusd(Wide(), q0, b(0)), q1, b(1)), q2, b(2)), q3, b(3))
    }
}
#endif
