import Foundation
#if arch(x86_64)
import PeregrineInt8
import PeregrineVNNI
#else
import PeregrineInt8
#endif

/// Products of block-quantized weights (llama.cpp's layouts). On x86 they run on activations
/// rounded to 8 bits (QuantKernelsX86.swift), as llama.cpp's do; these f32-activation kernels
/// are the portable path and the reference the integer ones are tested against. Each row is
/// dequantized in registers, block by block: the integer values of a sub-block are widened to
/// f32 lanes, multiplied with the activations and summed, and the sum is scaled by the
/// sub-block's scale (less its min times the activations' sum, for the types with an offset).
/// Every token goes through the same function in the same order, so a row's result does not
/// depend on the batch it came in (speculative verification relies on that).
extension CPUKernels {
    /// Bytes of scratch `matmulBlocks` needs for `tokens` rows of `k` activations.
    static func activationScratchBytes(_ type: DType, tokens: Int, k: Int) -> Int {
        #if arch(x86_64)
        return tokens * Int8Kernels.activationBytes(Int8WeightType(type)!, k: k)
        #else
        return 0
        #endif
    }

    static func matmulBlocks(_ type: DType, x: UnsafePointer<Float>, tokens: Int, w: UnsafeRawPointer, outDim: Int, k: Int,
                             bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, scratch: UnsafeMutableRawPointer,
                             pool: ThreadPool) {
        let rowBytes = type.byteCount(elements: k)
        let grain = max(4, 65536 / max(1, tokens * k))
        #if arch(x86_64)
        // Activations rounded to 8 bits once per token, then integer products for every row.
        let kind = Int8WeightType(type)!
        let stride = Int8Kernels.activationBytes(kind, k: k)
        if tokens == 1 {
            Int8Kernels.quantizeActivations(kind, x, k: k, into: scratch)
        } else {
            pool.parallelFor(tokens) { t in Int8Kernels.quantizeActivations(kind, x + t &* k, k: k, into: scratch + t &* stride) }
        }
        let vnni = CPUFeatures.useVNNI
        pool.parallelRanges(outDim, grain: grain) { rows in
            if vnni {
                VNNIKernels.rows(kind, w: w, rowBytes: rowBytes, a: scratch, stride: stride, k: k, tokens: tokens, rows: rows,
                                 bias: bias, y: y, ldy: outDim)
            } else {
                Int8Kernels.rows(kind, dot: AVX2Dot.self, w: w, rowBytes: rowBytes, a: scratch, stride: stride, k: k, tokens: tokens,
                                 rows: rows, bias: bias, y: y, ldy: outDim)
            }
        }
        #else
        pool.parallelRanges(outDim, grain: grain) { rows in
            for t in 0..<tokens {
                let xt = x + t &* k
                for o in rows {
                    y[t &* outDim &+ o] = rowDot(type, w + o &* rowBytes, xt, k) + (bias?[o] ?? 0)
                }
            }
        }
        #endif
    }

    /// `matmulBlocks` on a matrix in row groups (the same integer sums per block, so results agree
    /// with it to float rounding).
    static func matmulRowGroups(_ m: RowGroupMatrix, x: UnsafePointer<Float>, tokens: Int, bias: UnsafePointer<Float>?,
                                y: UnsafeMutablePointer<Float>, scratch: UnsafeMutableRawPointer, pool: ThreadPool) {
        #if arch(x86_64)
        let k = m.cols, kind = m.kind
        let stride = Int8Kernels.activationBytes(kind, k: k), sums = RowGroups.integerSums(kind)
        if tokens == 1 {
            Int8Kernels.quantizeActivations(kind, x, k: k, into: scratch, integerSums: sums)
        } else {
            pool.parallelFor(tokens) { t in
                Int8Kernels.quantizeActivations(kind, x + t &* k, k: k, into: scratch + t &* stride, integerSums: sums)
            }
        }
        let outDim = m.rows, w = UnsafeRawPointer(m.bytes)
        let grain = max(1, 8192 / max(1, tokens * k))
        let vnni = CPUFeatures.useVNNI, wide = CPUFeatures.useWideRowGroups
        pool.parallelRanges(outDim / RowGroups.rows, grain: grain) { groups in
            if vnni {
                VNNIKernels.groups(kind, w: w, k: k, a: scratch, stride: stride, tokens: tokens, groups: groups, bias: bias, y: y, ldy: outDim,
                                   wide: wide)
            } else {
                RowGroupKernels.groups(kind, dot: AVX2RowGroupDot.self, w: w, k: k, a: scratch, stride: stride, tokens: tokens, groups: groups,
                                       bias: bias, y: y, ldy: outDim)
            }
        }
        #else
        preconditionFailure("row groups are built only on x86")
        #endif
    }

    /// dot(row, x) for one quantized row of k values.
    @inline(__always)
    static func rowDot(_ type: DType, _ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ k: Int) -> Float {
        switch type {
        case .q8_0: return q8_0Dot(row, x, k / 32).sum()
        case .q4_0: return q4_0Dot(row, x, k / 32).sum()
        case .q4_1: return q4_1Dot(row, x, k / 32).sum()
        case .q5_0: return q5Dot(row, x, k / 32, hasMin: false).sum()
        case .q5_1: return q5Dot(row, x, k / 32, hasMin: true).sum()
        case .q4_K: return q4_KDot(row, x, k / 256).sum()
        case .q5_K: return q5_KDot(row, x, k / 256).sum()
        case .q6_K: return q6_KDot(row, x, k / 256).sum()
        case .iq4_nl: return iq4_nlDot(row, x, k / 32).sum()
        case .iq4_xs: return iq4_xsDot(row, x, k / 256).sum()
        case .q3_K: return q3_KDot(row, x, k / 256).sum()
        case .q2_K: return q2_KDot(row, x, k / 256).sum()
        case .f32, .f16, .bf16: preconditionFailure("rowDot is for quantized types")
        }
    }

    /// Eight int8 values as f32 lanes (sign-extend, convert).
    @inline(__always)
    static func widen(_ p: UnsafeRawPointer, _ offset: Int) -> SIMD8<Float> {
        // Lane by lane: the generic SIMD conversions are not inlined here, and these become
        // one sign-extension and one conversion instruction.
        let v = p.loadUnaligned(fromByteOffset: offset, as: SIMD8<Int8>.self)
        return SIMD8<Float>(Float(v[0]), Float(v[1]), Float(v[2]), Float(v[3]), Float(v[4]), Float(v[5]), Float(v[6]), Float(v[7]))
    }

    /// Eight small unsigned values as f32 lanes.
    @inline(__always)
    static func floats(_ v: SIMD8<UInt8>) -> SIMD8<Float> {
        SIMD8<Float>(Float(v[0]), Float(v[1]), Float(v[2]), Float(v[3]), Float(v[4]), Float(v[5]), Float(v[6]), Float(v[7]))
    }

    @inline(__always)
    static func load8(_ x: UnsafePointer<Float>, _ i: Int) -> SIMD8<Float> {
        UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
    }

    @inline(__always)
    static func f16(_ p: UnsafeRawPointer, _ offset: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: offset, as: Float16.self))
    }

    static let nibbleMask = SIMD8<UInt8>(repeating: 0x0F)
    static let laneBits = SIMD8<UInt8>(1, 2, 4, 8, 16, 32, 64, 128)

    /// 16 in the lanes whose bit is set in `byte` (lane i: bit i), else 0: the fifth bits of
    /// Q5_0/Q5_1 values.
    @inline(__always)
    static func fifthBits(_ byte: UInt8) -> SIMD8<UInt8> {
        SIMD8<UInt8>(repeating: 0).replacing(with: 16, where: (SIMD8(repeating: byte) & laneBits) .!= 0)
    }

    /// Q8_0: 32 int8 values and an f16 scale.
    @inline(never)
    static func q8_0Dot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        for b in 0..<blocks {
            let blk = row + b &* 34
            let xb = b &* 32
            var s = widen(blk, 2) * load8(x, xb)
            s = s.addingProduct(widen(blk, 10), load8(x, xb &+ 8))
            s = s.addingProduct(widen(blk, 18), load8(x, xb &+ 16))
            s = s.addingProduct(widen(blk, 26), load8(x, xb &+ 24))
            acc = acc.addingProduct(SIMD8(repeating: f16(blk, 0)), s)
        }
        return acc
    }

    /// Q4_0: 4-bit values offset by 8 (byte j: element j low, element j + 16 high).
    @inline(never)
    static func q4_0Dot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        let eight = SIMD8<Float>(repeating: 8)
        for b in 0..<blocks {
            let blk = row + b &* 18
            let lo = blk.loadUnaligned(fromByteOffset: 2, as: SIMD8<UInt8>.self)
            let hi = blk.loadUnaligned(fromByteOffset: 10, as: SIMD8<UInt8>.self)
            let xb = b &* 32
            var s = (floats(lo & nibbleMask) - eight) * load8(x, xb)
            s = s.addingProduct(floats(hi & nibbleMask) - eight, load8(x, xb &+ 8))
            s = s.addingProduct(floats(lo &>> 4) - eight, load8(x, xb &+ 16))
            s = s.addingProduct(floats(hi &>> 4) - eight, load8(x, xb &+ 24))
            acc = acc.addingProduct(SIMD8(repeating: f16(blk, 0)), s)
        }
        return acc
    }

    /// Q4_1: 4-bit values times a scale plus a min.
    @inline(never)
    static func q4_1Dot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        for b in 0..<blocks {
            let blk = row + b &* 20
            let lo = blk.loadUnaligned(fromByteOffset: 4, as: SIMD8<UInt8>.self)
            let hi = blk.loadUnaligned(fromByteOffset: 12, as: SIMD8<UInt8>.self)
            let xb = b &* 32
            let x0 = load8(x, xb), x1 = load8(x, xb &+ 8), x2 = load8(x, xb &+ 16), x3 = load8(x, xb &+ 24)
            var s = floats(lo & nibbleMask) * x0
            s = s.addingProduct(floats(hi & nibbleMask), x1)
            s = s.addingProduct(floats(lo &>> 4), x2)
            s = s.addingProduct(floats(hi &>> 4), x3)
            acc = acc.addingProduct(SIMD8(repeating: f16(blk, 0)), s)
            acc = acc.addingProduct(SIMD8(repeating: f16(blk, 2)), (x0 + x1) + (x2 + x3))
        }
        return acc
    }

    /// Q5_0 (values offset by 16) and Q5_1 (scale and min): the 4-bit layout of Q4_0 plus each
    /// value's fifth bit in a 32-bit mask (bit j for element j).
    @inline(never)
    static func q5Dot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int, hasMin: Bool) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        let bytes = hasMin ? 24 : 22, qh = hasMin ? 4 : 2, qs = qh &+ 4
        let offset = SIMD8<Float>(repeating: hasMin ? 0 : 16)
        for b in 0..<blocks {
            let blk = row + b &* bytes
            let lo = blk.loadUnaligned(fromByteOffset: qs, as: SIMD8<UInt8>.self)
            let hi = blk.loadUnaligned(fromByteOffset: qs &+ 8, as: SIMD8<UInt8>.self)
            let h = blk.loadUnaligned(fromByteOffset: qh, as: SIMD4<UInt8>.self)
            let xb = b &* 32
            let x0 = load8(x, xb), x1 = load8(x, xb &+ 8), x2 = load8(x, xb &+ 16), x3 = load8(x, xb &+ 24)
            var s = (floats((lo & nibbleMask) | fifthBits(h[0])) - offset) * x0
            s = s.addingProduct(floats((hi & nibbleMask) | fifthBits(h[1])) - offset, x1)
            s = s.addingProduct(floats((lo &>> 4) | fifthBits(h[2])) - offset, x2)
            s = s.addingProduct(floats((hi &>> 4) | fifthBits(h[3])) - offset, x3)
            acc = acc.addingProduct(SIMD8(repeating: f16(blk, 0)), s)
            if hasMin { acc = acc.addingProduct(SIMD8(repeating: f16(blk, 2)), (x0 + x1) + (x2 + x3)) }
        }
        return acc
    }

    /// Q4_K: 256 values in 8 sub-blocks of 32 with 6-bit scales and mins.
    @inline(never)
    static func q4_KDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        kQuantDot(row, x, blocks, fifthBit: false)
    }

    /// Q5_K: Q4_K's layout plus a fifth bit per value (32 bytes, bit 2c/2c+1 for chunk c).
    @inline(never)
    static func q5_KDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        kQuantDot(row, x, blocks, fifthBit: true)
    }

    @inline(__always)
    static func kQuantDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int, fifthBit: Bool) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        let bytes = fifthBit ? 176 : 144, qs = fifthBit ? 48 : 16
        let zero = SIMD8<UInt8>(repeating: 0), sixteen = SIMD8<UInt8>(repeating: 16)
        for b in 0..<blocks {
            let blk = row + b &* bytes
            let d = f16(blk, 0), dmin = f16(blk, 2)
            let xb = x + b &* 256
            for c in 0..<4 {
                let (sc0, m0) = KQuant.scaleMin(blk + 4, 2 &* c)
                let (sc1, m1) = KQuant.scaleMin(blk + 4, 2 &* c &+ 1)
                var s0 = SIMD8<Float>(), s1 = SIMD8<Float>(), sx0 = SIMD8<Float>(), sx1 = SIMD8<Float>()
                let u0 = SIMD8<UInt8>(repeating: UInt8(1) << (2 &* c)), u1 = u0 &<< 1
                for i in 0..<4 {
                    let q = blk.loadUnaligned(fromByteOffset: qs &+ 32 &* c &+ 8 &* i, as: SIMD8<UInt8>.self)
                    var lo = q & nibbleMask, hi = q &>> 4
                    if fifthBit {
                        let h = blk.loadUnaligned(fromByteOffset: 16 &+ 8 &* i, as: SIMD8<UInt8>.self)
                        lo |= zero.replacing(with: sixteen, where: (h & u0) .!= 0)
                        hi |= zero.replacing(with: sixteen, where: (h & u1) .!= 0)
                    }
                    let xa = load8(xb, 64 &* c &+ 8 &* i), xh = load8(xb, 64 &* c &+ 32 &+ 8 &* i)
                    s0 = s0.addingProduct(floats(lo), xa)
                    s1 = s1.addingProduct(floats(hi), xh)
                    sx0 += xa
                    sx1 += xh
                }
                acc = acc.addingProduct(SIMD8(repeating: d * Float(sc0)), s0)
                acc = acc.addingProduct(SIMD8(repeating: d * Float(sc1)), s1)
                acc = acc.addingProduct(SIMD8(repeating: -dmin * Float(m0)), sx0)
                acc = acc.addingProduct(SIMD8(repeating: -dmin * Float(m1)), sx1)
            }
        }
        return acc
    }

    /// Q6_K: 256 values in 16 sub-blocks of 16 with int8 scales; each value's low 4 bits in
    /// `ql`, its high 2 bits in `qh`, offset by 32.
    @inline(never)
    static func q6_KDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        let three = SIMD8<UInt8>(repeating: 3), offset = SIMD8<Float>(repeating: 32)
        for b in 0..<blocks {
            let blk = row + b &* 210
            let d = f16(blk, 208)
            let xb = x + b &* 256
            for half in 0..<2 {
                let ql = 64 &* half, qh = 128 &+ 32 &* half, sc = 192 &+ 8 &* half, xh = 128 &* half
                for g in 0..<2 {  // sub-blocks of 16: lanes 16g ..< 16g + 16 of each quarter
                    var s0 = SIMD8<Float>(), s1 = SIMD8<Float>(), s2 = SIMD8<Float>(), s3 = SIMD8<Float>()
                    for i in (2 &* g)..<(2 &* g &+ 2) {
                        let a = blk.loadUnaligned(fromByteOffset: ql &+ 8 &* i, as: SIMD8<UInt8>.self)
                        let c = blk.loadUnaligned(fromByteOffset: ql &+ 32 &+ 8 &* i, as: SIMD8<UInt8>.self)
                        let h = blk.loadUnaligned(fromByteOffset: qh &+ 8 &* i, as: SIMD8<UInt8>.self)
                        let q0 = (a & nibbleMask) | ((h & three) &<< 4)
                        let q1 = (c & nibbleMask) | (((h &>> 2) & three) &<< 4)
                        let q2 = (a &>> 4) | (((h &>> 4) & three) &<< 4)
                        let q3 = (c &>> 4) | ((h &>> 6) &<< 4)
                        let l = xh &+ 8 &* i
                        s0 = s0.addingProduct(floats(q0) - offset, load8(xb, l))
                        s1 = s1.addingProduct(floats(q1) - offset, load8(xb, l &+ 32))
                        s2 = s2.addingProduct(floats(q2) - offset, load8(xb, l &+ 64))
                        s3 = s3.addingProduct(floats(q3) - offset, load8(xb, l &+ 96))
                    }
                    @inline(__always) func scale(_ j: Int) -> SIMD8<Float> {
                        SIMD8(repeating: d * Float(blk.load(fromByteOffset: sc &+ g &+ j, as: Int8.self)))
                    }
                    acc = acc.addingProduct(scale(0), s0)
                    acc = acc.addingProduct(scale(2), s1)
                    acc = acc.addingProduct(scale(4), s2)
                    acc = acc.addingProduct(scale(6), s3)
                }
            }
        }
        return acc
    }
}

extension CPUKernels {
    /// The IQ4 levels as f32, for the portable products.
    static let iq4Levels: [Float] = IQ4.levels.map { Float($0) }

    /// Eight 4-bit indices (low nibbles of `v`, or high with `high`) as their IQ4 levels.
    @inline(__always)
    static func iq4Floats(_ v: SIMD8<UInt8>, _ levels: UnsafePointer<Float>) -> SIMD8<Float> {
        let i = SIMD8<Int>(truncatingIfNeeded: v & nibbleMask)
        return SIMD8<Float>(levels[i[0]], levels[i[1]], levels[i[2]], levels[i[3]], levels[i[4]], levels[i[5]], levels[i[6]], levels[i[7]])
    }

    /// The 32 values of one IQ4 nibble layout (16 bytes at `qs`) against x[0..<32], unscaled.
    @inline(__always)
    static func iq4Sum(_ blk: UnsafeRawPointer, _ qs: Int, _ x: UnsafePointer<Float>, _ levels: UnsafePointer<Float>) -> SIMD8<Float> {
        let lo = blk.loadUnaligned(fromByteOffset: qs, as: SIMD8<UInt8>.self)
        let hi = blk.loadUnaligned(fromByteOffset: qs &+ 8, as: SIMD8<UInt8>.self)
        var s = iq4Floats(lo, levels) * load8(x, 0)
        s = s.addingProduct(iq4Floats(hi, levels), load8(x, 8))
        s = s.addingProduct(iq4Floats(lo &>> 4, levels), load8(x, 16))
        return s.addingProduct(iq4Floats(hi &>> 4, levels), load8(x, 24))
    }

    /// IQ4_NL: 4-bit indices into the IQ4 levels, one f16 scale per 32.
    @inline(never)
    static func iq4_nlDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        iq4Levels.withUnsafeBufferPointer { levels in
            var acc = SIMD8<Float>()
            for b in 0..<blocks {
                let blk = row + b &* 18
                acc = acc.addingProduct(SIMD8(repeating: f16(blk, 0)), iq4Sum(blk, 2, x + b &* 32, levels.baseAddress!))
            }
            return acc
        }
    }

    /// IQ4_XS: IQ4_NL's indices in eight sub-blocks of 32 per 256, each with a signed 6-bit scale
    /// times the f16 super-block scale.
    @inline(never)
    static func iq4_xsDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        iq4Levels.withUnsafeBufferPointer { levels in
            var acc = SIMD8<Float>()
            for b in 0..<blocks {
                let blk = row + b &* 136
                let d = f16(blk, 0)
                for s in 0..<8 {
                    let sum = iq4Sum(blk, 8 &+ 16 &* s, x + (b &* 256 &+ 32 &* s), levels.baseAddress!)
                    acc = acc.addingProduct(SIMD8(repeating: d * Float(IQ4.subScale(blk, s))), sum)
                }
            }
            return acc
        }
    }

    /// Q3_K: 256 values in 16 sub-blocks of 16 with signed 6-bit scales; each value's low 2
    /// bits in `qs` (byte 32h + l, bits 2s for value 128h + 32s + l), its third bit in `hmask`
    /// (byte l, bit 4h + s), offset by 4.
    @inline(never)
    static func q3_KDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        let three = SIMD8<UInt8>(repeating: 3), one = SIMD8<UInt8>(repeating: 1), four = SIMD8<Float>(repeating: 4)
        for b in 0..<blocks {
            let blk = row + b &* 110
            let d = f16(blk, 108)
            let xb = x + b &* 256
            for h in 0..<2 {
                for s in 0..<4 {
                    for g in 0..<2 {  // the two sub-blocks of 16 in values 128h + 32s ..< + 32
                        var sum = SIMD8<Float>()
                        for i in 0..<2 {
                            let l = 16 &* g &+ 8 &* i
                            let q = blk.loadUnaligned(fromByteOffset: 32 &+ 32 &* h &+ l, as: SIMD8<UInt8>.self)
                            let m = blk.loadUnaligned(fromByteOffset: l, as: SIMD8<UInt8>.self)
                            let v = ((q &>> UInt8(2 &* s)) & three) | (((m &>> UInt8(4 &* h &+ s)) & one) &<< 2)
                            sum = sum.addingProduct(floats(v) - four, load8(xb, 128 &* h &+ 32 &* s &+ l))
                        }
                        let scale = Float(KQuant.q3Scale(blk + 96, 8 &* h &+ 2 &* s &+ g))
                        acc = acc.addingProduct(SIMD8(repeating: d * scale), sum)
                    }
                }
            }
        }
        return acc
    }

    /// Q2_K: 256 values of 2 bits (Q3_K's low-bit layout) in 16 sub-blocks of 16, each with a
    /// 4-bit scale and a 4-bit min.
    @inline(never)
    static func q2_KDot(_ row: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ blocks: Int) -> SIMD8<Float> {
        var acc = SIMD8<Float>()
        let three = SIMD8<UInt8>(repeating: 3)
        for b in 0..<blocks {
            let blk = row + b &* 84
            let d = f16(blk, 80), dmin = f16(blk, 82)
            let xb = x + b &* 256
            for h in 0..<2 {
                for s in 0..<4 {
                    for g in 0..<2 {
                        var sum = SIMD8<Float>(), sx = SIMD8<Float>()
                        for i in 0..<2 {
                            let l = 16 &* g &+ 8 &* i
                            let q = blk.loadUnaligned(fromByteOffset: 16 &+ 32 &* h &+ l, as: SIMD8<UInt8>.self)
                            let xv = load8(xb, 128 &* h &+ 32 &* s &+ l)
                            sum = sum.addingProduct(floats((q &>> UInt8(2 &* s)) & three), xv)
                            sx += xv
                        }
                        let sm = blk.load(fromByteOffset: 8 &* h &+ 2 &* s &+ g, as: UInt8.self)
                        acc = acc.addingProduct(SIMD8(repeating: d * Float(sm & 15)), sum)
                        acc = acc.addingProduct(SIMD8(repeating: -dmin * Float(sm >> 4)), sx)
                    }
                }
            }
        }
        return acc
    }
}

extension Int8WeightType {
    /// The integer-kernel type of a quantized DType (nil for the float types).
    init?(_ type: DType) {
        switch type {
        case .q8_0: self = .q8_0
        case .q4_0: self = .q4_0
        case .q5_0: self = .q5_0
        case .q4_1: self = .q4_1
        case .q5_1: self = .q5_1
        case .q4_K: self = .q4_K
        case .q5_K: self = .q5_K
        case .q6_K: self = .q6_K
        case .iq4_nl: self = .iq4_nl
        case .iq4_xs: self = .iq4_xs
        case .q3_K: self = .q3_K
        case .q2_K: self = .q2_K
        case .f32, .f16, .bf16: return nil
        }
    }
}

/// A matrix of a block type repacked at load in groups of eight rows (`RowGroups`) for the
/// row-group kernels (AVX-512 VNNI's where the CPU has it, else AVX2's). Made on x86 where the
/// type has the layout and the rows divide into groups; PEREGRINE_NO_REPACK=1 keeps every
/// matrix as stored.
final class RowGroupMatrix: @unchecked Sendable {
    let kind: Int8WeightType
    let rows: Int
    let cols: Int
    let bytes: UnsafeMutableRawPointer

    static let enabled: Bool = ProcessInfo.processInfo.environment["PEREGRINE_NO_REPACK"] == nil

    init?(_ type: DType, data: UnsafeRawPointer, rows: Int, cols: Int, pool: ThreadPool, force: Bool = false) {
        #if arch(x86_64)
        guard force || Self.enabled, let kind = Int8WeightType(type), RowGroups.supports(kind),
              rows % RowGroups.rows == 0, cols % RowGroups.blockValues(kind) == 0, rows > 0 else { return nil }
        self.kind = kind
        self.rows = rows
        self.cols = cols
        bytes = UnsafeMutableRawPointer.allocate(byteCount: RowGroups.byteCount(kind, rows: rows, k: cols), alignment: 64)
        let rowBytes = type.byteCount(elements: cols), out = bytes
        pool.parallelRanges(rows / RowGroups.rows, grain: 16) { groups in
            RowGroups.repack(kind, data, rowBytes: rowBytes, k: cols, groups: groups, into: out)
        }
        Self.release(data, bytes: rows * rowBytes)
        #else
        return nil
        #endif
    }

    deinit { bytes.deallocate() }

    /// Hands the stored matrix's whole pages back to the kernel (MADV_PAGEOUT) once repacked, so
    /// the process does not hold both copies: a file mapping's pages are dropped and read again
    /// if something (a tied embedding's rows) still uses them; other memory keeps its contents.
    static func release(_ data: UnsafeRawPointer, bytes: Int) {
        #if os(Linux)
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = (Int(bitPattern: data) + page - 1) / page * page
        let end = (Int(bitPattern: data) + bytes) / page * page
        guard end > start, let p = UnsafeMutableRawPointer(bitPattern: start) else { return }
        _ = madvise(p, end - start, 21)  // MADV_PAGEOUT (Linux 5.4); refused where unknown, harmlessly
        #endif
    }
}

/// What the CPU offers beyond the AVX2/FMA baseline, read once from /proc/cpuinfo.
enum CPUFeatures {
    static let flags: Set<Substring> = {
        guard let text = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
              let line = text.split(separator: "\n").first(where: { $0.hasPrefix("flags") }) else { return [] }
        return Set(line.split(separator: " "))
    }()

    /// AVX-512 with the instruction groups of `PeregrineAVX512`'s target (cascadelake) for the
    /// f32/F16/BF16 products; PEREGRINE_NO_AVX512=1 turns it off.
    static let useAVX512: Bool = {
        #if arch(x86_64)
        if ProcessInfo.processInfo.environment["PEREGRINE_NO_AVX512"] != nil { return false }
        return ["avx512f", "avx512vl", "avx512bw", "avx512dq", "avx512cd"].allSatisfy { flags.contains(Substring($0)) }
        #else
        return false
        #endif
    }()

    /// F16 products over panels (`PanelMatrix`), where AVX-512 is used; PEREGRINE_NO_PANELS=1
    /// keeps the row-major kernel.
    static let useHalfPanels = useAVX512 && ProcessInfo.processInfo.environment["PEREGRINE_NO_PANELS"] == nil

    /// BF16 products on AVX-512 BF16's `vdpbf16ps` (`PeregrineBF16`), with activations rounded to
    /// BF16; PEREGRINE_NO_BF16_PAIRS=1 keeps the f32 products on widened weights.
    static let useBF16Pairs: Bool = {
        #if arch(x86_64)
        if ProcessInfo.processInfo.environment["PEREGRINE_NO_BF16_PAIRS"] != nil { return false }
        return useAVX512 && flags.contains("avx512_bf16")
        #else
        return false
        #endif
    }()

    /// AVX-512 VNNI with 256-bit forms (VL) and byte/word ops (BW); PEREGRINE_NO_VNNI=1 turns it off.
    static let useVNNI: Bool = {
        #if arch(x86_64)
        if ProcessInfo.processInfo.environment["PEREGRINE_NO_VNNI"] != nil { return false }
        return flags.contains("avx512_vnni") && flags.contains("avx512vl") && flags.contains("avx512bw")
        #else
        return false
        #endif
    }()

    /// Prompt products on row groups with 512-bit `vpdpbusd`, two groups a vector
    /// (`WideRowGroupKernels`), where VNNI is used; PEREGRINE_NO_WIDE_GROUPS=1 keeps the 256-bit
    /// kernels (PEREGRINE_NO_AVX512 is about the float products; PEREGRINE_NO_VNNI turns off
    /// both integer paths).
    static let useWideRowGroups = useVNNI && ProcessInfo.processInfo.environment["PEREGRINE_NO_WIDE_GROUPS"] == nil
}
