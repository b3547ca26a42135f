#if canImport(Glibc)
import Glibc
#endif
#if arch(x86_64)
import PeregrineAVX512
import PeregrineBF16
#endif

/// Loads stored weights as f32 lanes. Generic kernels are specialised per element type.
protocol WeightElement {
    static func load8(_ p: UnsafeRawPointer, _ i: Int) -> SIMD8<Float>
    static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float
    static var dtype: DType { get }
}

enum F32Element: WeightElement {
    @inline(__always) static var dtype: DType { .f32 }
    @inline(__always) static func load8(_ p: UnsafeRawPointer, _ i: Int) -> SIMD8<Float> {
        p.loadUnaligned(fromByteOffset: i &* 4, as: SIMD8<Float>.self)
    }
    @inline(__always) static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        p.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)
    }
}

enum F16Element: WeightElement {
    @inline(__always) static var dtype: DType { .f16 }
    @inline(__always) static func load8(_ p: UnsafeRawPointer, _ i: Int) -> SIMD8<Float> {
        SIMD8<Float>(p.loadUnaligned(fromByteOffset: i &* 2, as: SIMD8<Float16>.self))
    }
    @inline(__always) static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: i &* 2, as: Float16.self))
    }
}

enum BF16Element: WeightElement {
    @inline(__always) static var dtype: DType { .bf16 }
    @inline(__always) static func load8(_ p: UnsafeRawPointer, _ i: Int) -> SIMD8<Float> {
        let u = SIMD8<UInt32>(truncatingIfNeeded: p.loadUnaligned(fromByteOffset: i &* 2, as: SIMD8<UInt16>.self))
        return unsafeBitCast(u &<< 16, to: SIMD8<Float>.self)
    }
    @inline(__always) static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Half.bf16ToFloat(p.loadUnaligned(fromByteOffset: i &* 2, as: UInt16.self))
    }
}

/// A buffer of floats for each thread, kept between calls (a batched decode step must not
/// allocate): the pool's threads live as long as the process, and a thread's buffer is freed
/// when the thread ends.
enum ThreadScratch {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        pthread_key_create(&key) { p in
            if let p { Unmanaged<GrowingFloats>.fromOpaque(p).release() }
        }
        return key
    }()

    /// At least `count` floats, this thread's only; valid until its next call.
    static func floats(_ count: Int) -> UnsafeMutablePointer<Float> {
        if let p = pthread_getspecific(key) {
            let buffer = Unmanaged<GrowingFloats>.fromOpaque(p).takeUnretainedValue()
            buffer.ensure(count)
            return buffer.pointer
        }
        let buffer = GrowingFloats()
        buffer.ensure(count)
        pthread_setspecific(key, Unmanaged.passRetained(buffer).toOpaque())
        return buffer.pointer
    }
}

enum CPUKernels {
    /// dot(a, b) over n f32 values.
    @inline(__always)
    static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc0 = SIMD8<Float>(), acc1 = SIMD8<Float>()
        var i = 0
        while i &+ 16 <= n {
            acc0 += UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self) * UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
            acc1 += UnsafeRawPointer(a + i + 8).loadUnaligned(as: SIMD8<Float>.self) * UnsafeRawPointer(b + i + 8).loadUnaligned(as: SIMD8<Float>.self)
            i &+= 16
        }
        while i &+ 8 <= n {
            acc0 += UnsafeRawPointer(a + i).loadUnaligned(as: SIMD8<Float>.self) * UnsafeRawPointer(b + i).loadUnaligned(as: SIMD8<Float>.self)
            i &+= 8
        }
        var s = (acc0 + acc1).sum()
        while i < n { s += a[i] * b[i]; i &+= 1 }
        return s
    }

    /// y[o] = dot(W[o, :], x) for rows o in `rows` of a [*, k] weight matrix, for one token.
    @inline(__always)
    static func gemvRows<E: WeightElement>(_: E.Type, w: UnsafeRawPointer, k: Int, x: UnsafePointer<Float>,
                                            rows: Range<Int>, y: UnsafeMutablePointer<Float>) {
        let k8 = k & ~7
        var o = rows.lowerBound
        while o &+ 4 <= rows.upperBound {
            let b0 = o &* k, b1 = b0 &+ k, b2 = b1 &+ k, b3 = b2 &+ k
            var a0 = SIMD8<Float>(), a1 = SIMD8<Float>(), a2 = SIMD8<Float>(), a3 = SIMD8<Float>()
            var i = 0
            while i < k8 {
                let xv = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
                a0 = a0.addingProduct(E.load8(w, b0 &+ i), xv)
                a1 = a1.addingProduct(E.load8(w, b1 &+ i), xv)
                a2 = a2.addingProduct(E.load8(w, b2 &+ i), xv)
                a3 = a3.addingProduct(E.load8(w, b3 &+ i), xv)
                i &+= 8
            }
            var s0 = a0.sum(), s1 = a1.sum(), s2 = a2.sum(), s3 = a3.sum()
            while i < k {
                s0 += E.load1(w, b0 &+ i) * x[i]; s1 += E.load1(w, b1 &+ i) * x[i]
                s2 += E.load1(w, b2 &+ i) * x[i]; s3 += E.load1(w, b3 &+ i) * x[i]
                i &+= 1
            }
            y[o] = s0; y[o &+ 1] = s1; y[o &+ 2] = s2; y[o &+ 3] = s3
            o &+= 4
        }
        while o < rows.upperBound {
            let b0 = o &* k
            var a0 = SIMD8<Float>()
            var i = 0
            while i < k8 { a0 = a0.addingProduct(E.load8(w, b0 &+ i), UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)); i &+= 8 }
            var s0 = a0.sum()
            while i < k { s0 += E.load1(w, b0 &+ i) * x[i]; i &+= 1 }
            y[o] = s0
            o &+= 1
        }
    }

    /// Y[t, o] = dot(W[o, :], X[t, :]) for 4 tokens at once over rows `rows`: each weight vector
    /// loaded is used for four tokens, so prefill reads weights a quarter as often.
    @inline(__always)
    static func gemm4Tokens<E: WeightElement>(_: E.Type, w: UnsafeRawPointer, k: Int, x: UnsafePointer<Float>,
                                               rows: Range<Int>, y: UnsafeMutablePointer<Float>, ldy: Int) {
        let k8 = k & ~7
        let x0 = x, x1 = x + k, x2 = x + 2 &* k, x3 = x + 3 &* k
        var o = rows.lowerBound
        // Three rows by four tokens: twelve accumulators, each x vector loaded once for three
        // weight vectors (sixteen registers in all).
        while o &+ 3 <= rows.upperBound {
            let b0 = o &* k, b1 = b0 &+ k, b2 = b1 &+ k
            var a00 = SIMD8<Float>(), a01 = SIMD8<Float>(), a02 = SIMD8<Float>(), a03 = SIMD8<Float>()
            var a10 = SIMD8<Float>(), a11 = SIMD8<Float>(), a12 = SIMD8<Float>(), a13 = SIMD8<Float>()
            var a20 = SIMD8<Float>(), a21 = SIMD8<Float>(), a22 = SIMD8<Float>(), a23 = SIMD8<Float>()
            var i = 0
            while i < k8 {
                let w0 = E.load8(w, b0 &+ i), w1 = E.load8(w, b1 &+ i), w2 = E.load8(w, b2 &+ i)
                var v = UnsafeRawPointer(x0 + i).loadUnaligned(as: SIMD8<Float>.self)
                a00 = a00.addingProduct(w0, v); a10 = a10.addingProduct(w1, v); a20 = a20.addingProduct(w2, v)
                v = UnsafeRawPointer(x1 + i).loadUnaligned(as: SIMD8<Float>.self)
                a01 = a01.addingProduct(w0, v); a11 = a11.addingProduct(w1, v); a21 = a21.addingProduct(w2, v)
                v = UnsafeRawPointer(x2 + i).loadUnaligned(as: SIMD8<Float>.self)
                a02 = a02.addingProduct(w0, v); a12 = a12.addingProduct(w1, v); a22 = a22.addingProduct(w2, v)
                v = UnsafeRawPointer(x3 + i).loadUnaligned(as: SIMD8<Float>.self)
                a03 = a03.addingProduct(w0, v); a13 = a13.addingProduct(w1, v); a23 = a23.addingProduct(w2, v)
                i &+= 8
            }
            var s00 = a00.sum(), s01 = a01.sum(), s02 = a02.sum(), s03 = a03.sum()
            var s10 = a10.sum(), s11 = a11.sum(), s12 = a12.sum(), s13 = a13.sum()
            var s20 = a20.sum(), s21 = a21.sum(), s22 = a22.sum(), s23 = a23.sum()
            while i < k {
                let w0 = E.load1(w, b0 &+ i), w1 = E.load1(w, b1 &+ i), w2 = E.load1(w, b2 &+ i)
                s00 += w0 * x0[i]; s01 += w0 * x1[i]; s02 += w0 * x2[i]; s03 += w0 * x3[i]
                s10 += w1 * x0[i]; s11 += w1 * x1[i]; s12 += w1 * x2[i]; s13 += w1 * x3[i]
                s20 += w2 * x0[i]; s21 += w2 * x1[i]; s22 += w2 * x2[i]; s23 += w2 * x3[i]
                i &+= 1
            }
            y[o] = s00; y[o &+ 1] = s10; y[o &+ 2] = s20
            y[ldy &+ o] = s01; y[ldy &+ o &+ 1] = s11; y[ldy &+ o &+ 2] = s21
            y[2 &* ldy &+ o] = s02; y[2 &* ldy &+ o &+ 1] = s12; y[2 &* ldy &+ o &+ 2] = s22
            y[3 &* ldy &+ o] = s03; y[3 &* ldy &+ o &+ 1] = s13; y[3 &* ldy &+ o &+ 2] = s23
            o &+= 3
        }
        while o &+ 2 <= rows.upperBound {
            let b0 = o &* k, b1 = b0 &+ k
            var a00 = SIMD8<Float>(), a01 = SIMD8<Float>(), a02 = SIMD8<Float>(), a03 = SIMD8<Float>()
            var a10 = SIMD8<Float>(), a11 = SIMD8<Float>(), a12 = SIMD8<Float>(), a13 = SIMD8<Float>()
            var i = 0
            while i < k8 {
                let w0 = E.load8(w, b0 &+ i), w1 = E.load8(w, b1 &+ i)
                let v0 = UnsafeRawPointer(x0 + i).loadUnaligned(as: SIMD8<Float>.self)
                let v1 = UnsafeRawPointer(x1 + i).loadUnaligned(as: SIMD8<Float>.self)
                let v2 = UnsafeRawPointer(x2 + i).loadUnaligned(as: SIMD8<Float>.self)
                let v3 = UnsafeRawPointer(x3 + i).loadUnaligned(as: SIMD8<Float>.self)
                a00 = a00.addingProduct(w0, v0); a01 = a01.addingProduct(w0, v1)
                a02 = a02.addingProduct(w0, v2); a03 = a03.addingProduct(w0, v3)
                a10 = a10.addingProduct(w1, v0); a11 = a11.addingProduct(w1, v1)
                a12 = a12.addingProduct(w1, v2); a13 = a13.addingProduct(w1, v3)
                i &+= 8
            }
            var s00 = a00.sum(), s01 = a01.sum(), s02 = a02.sum(), s03 = a03.sum()
            var s10 = a10.sum(), s11 = a11.sum(), s12 = a12.sum(), s13 = a13.sum()
            while i < k {
                let w0 = E.load1(w, b0 &+ i), w1 = E.load1(w, b1 &+ i)
                s00 += w0 * x0[i]; s01 += w0 * x1[i]; s02 += w0 * x2[i]; s03 += w0 * x3[i]
                s10 += w1 * x0[i]; s11 += w1 * x1[i]; s12 += w1 * x2[i]; s13 += w1 * x3[i]
                i &+= 1
            }
            y[o] = s00; y[o &+ 1] = s10
            y[ldy &+ o] = s01; y[ldy &+ o &+ 1] = s11
            y[2 &* ldy &+ o] = s02; y[2 &* ldy &+ o &+ 1] = s12
            y[3 &* ldy &+ o] = s03; y[3 &* ldy &+ o &+ 1] = s13
            o &+= 2
        }
        if o < rows.upperBound {
            for t in 0..<4 { gemvRows(E.self, w: w, k: k, x: x + t &* k, rows: o..<rows.upperBound, y: y + t &* ldy) }
        }
    }

    /// Row values from element `start` on, k of them, as f32 (exact for F16 and BF16).
    @inline(__always)
    static func widenRow<E: WeightElement>(_: E.Type, _ w: UnsafeRawPointer, _ start: Int, _ k: Int, into out: UnsafeMutablePointer<Float>) {
        var i = 0
        while i &+ 8 <= k {
            UnsafeMutableRawPointer(out + i).storeBytes(of: E.load8(w, start &+ i), as: SIMD8<Float>.self)
            i &+= 8
        }
        while i < k { out[i] = E.load1(w, start &+ i); i &+= 1 }
    }

    /// Y[t, o] for every token and the rows `rows`: four tokens at a time, then one by one.
    @inline(__always)
    static func tokenTiles<E: WeightElement>(_ e: E.Type, w: UnsafeRawPointer, k: Int, x: UnsafePointer<Float>, tokens: Int,
                                             rows: Range<Int>, y: UnsafeMutablePointer<Float>, ldy: Int) {
        var t = 0
        while t &+ 4 <= tokens {
            gemm4Tokens(e, w: w, k: k, x: x + t &* k, rows: rows, y: y + t &* ldy, ldy: ldy)
            t &+= 4
        }
        while t < tokens {
            gemvRows(e, w: w, k: k, x: x + t &* k, rows: rows, y: y + t &* ldy)
            t &+= 1
        }
    }

    /// y[t * ldy + o] += bias[o] for the output rows `rows` of `tokens` tokens (none without a bias).
    @inline(__always)
    static func addBias(_ bias: UnsafePointer<Float>?, rows: Range<Int>, tokens: Int, y: UnsafeMutablePointer<Float>, ldy: Int) {
        guard let bias else { return }
        for t in 0..<tokens { for o in rows { y[t &* ldy &+ o] += bias[o] } }
    }

    static func matmul<E: WeightElement>(_ e: E.Type, x: UnsafePointer<Float>, tokens: Int, w: UnsafeRawPointer,
                                          outDim: Int, k: Int, bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>,
                                          pool: ThreadPool) {
        #if arch(x86_64)
        if CPUFeatures.useAVX512 {
            matmulAVX512(E.dtype, x: x, tokens: tokens, w: w, outDim: outDim, k: k, bias: bias, y: y, pool: pool)
            return
        }
        #endif
        // Split output rows across threads. A chunk's rows go in runs of about 192 KB of f32
        // weights, each run taken through every token before the next, so a run is read from
        // memory once and then from L2 (a whole chunk, megabytes, was read again for every four
        // tokens). A chunk is at least ~64k multiply-adds, so decode-sized products still
        // spread over all threads.
        let grain = max(4, 65536 / max(1, tokens * k))
        let run = max(12, (192 << 10) / max(1, k * 4) / 12 * 12)
        // F16 and BF16 rows of a prompt's product are widened once per run into f32 (exactly),
        // instead of once per four tokens in registers, where the widening took FMA issue
        // slots: the same values in the same order, so every (row, token) gets the same bits as
        // a single token's product.
        let widen = E.dtype != .f32 && tokens >= 4
        pool.parallelRanges(outDim, grain: grain) { rows in
            let wide = widen ? ThreadScratch.floats(min(run, rows.count) * k) : nil
            var r = rows.lowerBound
            while r < rows.upperBound {
                let part = r..<min(rows.upperBound, r &+ run)
                if let wide {
                    for (i, o) in part.enumerated() { widenRow(E.self, w, o &* k, k, into: wide + i &* k) }
                    tokenTiles(F32Element.self, w: UnsafeRawPointer(wide), k: k, x: x, tokens: tokens, rows: 0..<part.count,
                               y: y + part.lowerBound, ldy: outDim)
                } else {
                    tokenTiles(e, w: w, k: k, x: x, tokens: tokens, rows: part, y: y, ldy: outDim)
                }
                r = part.upperBound
            }
            addBias(bias, rows: rows, tokens: tokens, y: y, ldy: outDim)
        }
    }

    #if arch(x86_64)
    /// The AVX-512 product (`PeregrineAVX512`): threads take runs of four rows and read the
    /// stored weights in place (F16/BF16 widened in registers), prefetching rows ahead.
    static func matmulAVX512(_ dtype: DType, x: UnsafePointer<Float>, tokens: Int, w: UnsafeRawPointer, outDim: Int, k: Int,
                             bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, pool: ThreadPool) {
        let rowBytes = k * dtype.byteSize
        let quads = (outDim + 3) / 4
        let grain = max(1, 16384 / max(1, tokens * k))
        pool.parallelRanges(quads, grain: grain) { q in
            let rows = (q.lowerBound * 4)..<min(outDim, q.upperBound * 4)
            let yr = y + rows.lowerBound, wr = w + rows.lowerBound * rowBytes
            switch dtype {
            case .f16: AVX512Products.productF16(w: wr, k: k, rows: rows.count, x: x, ldx: k, tokens: tokens, y: yr, ldy: outDim)
            case .bf16: AVX512Products.productBF16(w: wr, k: k, rows: rows.count, x: x, ldx: k, tokens: tokens, y: yr, ldy: outDim)
            default: AVX512Products.productF32(w: wr, k: k, rows: rows.count, x: x, ldx: k, tokens: tokens, y: yr, ldy: outDim)
            }
            addBias(bias, rows: rows, tokens: tokens, y: y, ldy: outDim)
        }
    }

    /// The AVX-512 product over an F16 matrix's panels (`PanelMatrix`): threads take pairs of
    /// panels (32 rows).
    /// More than one token's activations are first interleaved into `scratch` (tokens x k
    /// floats; `HalfPanels.interleave` says why), which moves no result.
    static func matmulHalfPanels(_ panels: UnsafeRawPointer, x: UnsafePointer<Float>, tokens: Int, outDim: Int, k: Int,
                                 bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<Float>,
                                 pool: ThreadPool) {
        let interleaved = tokens > 1
        if interleaved {
            pool.parallelRanges((tokens + HalfPanels.tileTokens - 1) / HalfPanels.tileTokens) { tiles in
                HalfPanels.interleave(x, ldx: k, k: k, tokens: tokens, tiles: tiles, into: scratch)
            }
        }
        let input = interleaved ? UnsafePointer(scratch) : x
        pool.parallelRanges(HalfPanels.panels(rows: outDim) / 2) { pairs in
            AVX512Products.panelProductF16(panels: panels, k: k, rows: outDim, pairs: pairs, x: input, ldx: k, interleaved: interleaved,
                                           tokens: tokens, y: y, ldy: outDim)
            addBias(bias, rows: (pairs.lowerBound * 32)..<min(outDim, pairs.upperBound * 32), tokens: tokens, y: y, ldy: outDim)
        }
    }

    /// The AVX-512 BF16 product over a BF16 matrix's pair panels (`PanelMatrix`): the activations
    /// are rounded to BF16 into `scratch` (tokens x pairs(k) words) in the layout
    /// `BF16PairProducts.product` reads, then threads take pairs of panels (32 rows).
    static func matmulBF16Pairs(_ panels: UnsafeRawPointer, x: UnsafePointer<Float>, tokens: Int, outDim: Int, k: Int,
                                bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<UInt32>,
                                pool: ThreadPool) {
        let tiles = (tokens + BF16PairPanels.tileTokens - 1) / BF16PairPanels.tileTokens
        pool.parallelRanges(tiles) { range in roundPairs(x, k: k, tokens: tokens, tiles: range, into: scratch) }
        pool.parallelRanges(BF16PairPanels.panels(rows: outDim) / 2) { pairs in
            BF16PairProducts.product(panels: panels, k: k, rows: outDim, pairs: pairs, x: scratch, tokens: tokens, y: y, ldy: outDim)
            addBias(bias, rows: (pairs.lowerBound * 32)..<min(outDim, pairs.upperBound * 32), tokens: tokens, y: y, ldy: outDim)
        }
    }

    /// The activations of `tokens` tokens (rows of k floats) rounded to BF16 (to nearest, ties to
    /// even) in the layout `BF16PairProducts.product` reads: pairs (k = 2i in a word's low half,
    /// 2i + 1 in its high half; an odd k's last word has a zero high half), written for tiles
    /// `tiles` of 12 tokens: tile j at out + 12 j pairs(k), holding its tokens' words of pair 0,
    /// then of pair 1, and so on.
    static func roundPairs(_ x: UnsafePointer<Float>, k: Int, tokens: Int, tiles: Range<Int>, into out: UnsafeMutablePointer<UInt32>) {
        let kp = BF16PairPanels.pairs(k: k), even = k & ~1
        for j in tiles {
            let t0 = j &* BF16PairPanels.tileTokens, n = min(BF16PairPanels.tileTokens, tokens &- t0)
            let dst = out + t0 &* kp
            for t in 0..<n {
                let src = x + (t0 &+ t) &* k
                var i = 0, at = t
                while i < even {
                    dst[at] = UInt32(Half.floatToBF16(src[i])) | UInt32(Half.floatToBF16(src[i &+ 1])) &<< 16
                    i &+= 2
                    at &+= n
                }
                if even < k { dst[at] = UInt32(Half.floatToBF16(src[even])) }
            }
        }
    }
    #endif

    static func rmsNorm(x: UnsafePointer<Float>, w: UnsafePointer<Float>, eps: Float, dim: Int, out: UnsafeMutablePointer<Float>) {
        let ss = dot(x, x, dim)
        let scale = 1 / (ss / Float(dim) + eps).squareRoot()
        for i in 0..<dim { out[i] = x[i] * scale * w[i] }
    }

    @inline(__always) static func silu(_ v: Float) -> Float { v / (1 + expf(-v)) }

    /// e^x on 8 lanes: range reduction by ln 2 and a degree-6 polynomial (Cephes' expf
    /// coefficients), within ~2 ulp of expf over the float range; underflows to 0.
    @inline(__always)
    static func exp8(_ x: SIMD8<Float>) -> SIMD8<Float> {
        // Clamped with masks: the standard library's pointwiseMin/Max stay calls here (not inlined).
        let hi: Float = 88.3762626647949, lo: Float = -87.3365447505531
        let xc = x.replacing(with: hi, where: x .> hi).replacing(with: lo, where: x .< lo)
        // Round x / ln 2 to an integer by adding 1.5 * 2^23: the integer lands in the low
        // mantissa bits, and subtracting the constant back gives it as a float.
        let magic = SIMD8<Float>(repeating: 12582912)
        let t = magic.addingProduct(xc, SIMD8(repeating: 1.442695040888963))
        let n = t - magic
        var r = xc.addingProduct(n, SIMD8(repeating: -0.693359375))
        r = r.addingProduct(n, SIMD8(repeating: 2.12194440e-4))
        var p = SIMD8<Float>(repeating: 1.9875691500e-4)
        p = SIMD8(repeating: 1.3981999507e-3).addingProduct(p, r)
        p = SIMD8(repeating: 8.3334519073e-3).addingProduct(p, r)
        p = SIMD8(repeating: 4.1665795894e-2).addingProduct(p, r)
        p = SIMD8(repeating: 1.6666665459e-1).addingProduct(p, r)
        p = SIMD8(repeating: 5.0000001201e-1).addingProduct(p, r)
        p = (p * (r * r)) + r + 1
        let k = unsafeBitCast(t, to: SIMD8<Int32>.self) &- 0x4B40_0000
        let scale = unsafeBitCast((k &+ 127) &<< 23, to: SIMD8<Float>.self)
        return p * scale
    }

    /// out[i] = silu(g[i]) * u[i]
    static func siluMul(_ g: UnsafePointer<Float>, _ u: UnsafePointer<Float>, _ o: UnsafeMutablePointer<Float>, _ range: Range<Int>) {
        var i = range.lowerBound
        while i + 8 <= range.upperBound {
            let gv = UnsafeRawPointer(g + i).loadUnaligned(as: SIMD8<Float>.self)
            let uv = UnsafeRawPointer(u + i).loadUnaligned(as: SIMD8<Float>.self)
            let s = gv / (1 + exp8(-gv))
            UnsafeMutableRawPointer(o + i).storeBytes(of: s * uv, as: SIMD8<Float>.self)
            i += 8
        }
        while i < range.upperBound { o[i] = silu(g[i]) * u[i]; i += 1 }
    }

    /// gelu_tanh(v) = 0.5 v (1 + tanh(u)) with u = sqrt(2 / pi) (v + 0.044715 v^3), written as
    /// v / (1 + e^(-2u)) (the same value: 1 + tanh(u) = 2 / (1 + e^(-2u))).
    @inline(__always) static func geluTanh(_ v: Float) -> Float {
        let u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return v / (1 + expf(-2 * u))
    }

    /// out[i] = gelu_tanh(g[i]) * u[i]
    static func geluTanhMul(_ g: UnsafePointer<Float>, _ u: UnsafePointer<Float>, _ o: UnsafeMutablePointer<Float>, _ range: Range<Int>) {
        var i = range.lowerBound
        let c = SIMD8<Float>(repeating: -2 * 0.7978845608028654), cubic = SIMD8<Float>(repeating: 0.044715)
        while i + 8 <= range.upperBound {
            let gv = UnsafeRawPointer(g + i).loadUnaligned(as: SIMD8<Float>.self)
            let uv = UnsafeRawPointer(u + i).loadUnaligned(as: SIMD8<Float>.self)
            let s = gv / (1 + exp8(c * gv.addingProduct(cubic * gv, gv * gv)))
            UnsafeMutableRawPointer(o + i).storeBytes(of: s * uv, as: SIMD8<Float>.self)
            i += 8
        }
        while i < range.upperBound { o[i] = geluTanh(g[i]) * u[i]; i += 1 }
    }

    /// x[i] *= f
    static func scale(_ x: UnsafeMutablePointer<Float>, _ f: Float, _ range: Range<Int>) {
        var i = range.lowerBound
        let fv = SIMD8<Float>(repeating: f)
        while i + 8 <= range.upperBound {
            let v = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(x + i).storeBytes(of: v * fv, as: SIMD8<Float>.self)
            i += 8
        }
        while i < range.upperBound { x[i] *= f; i += 1 }
    }

    /// x[i] = cap * tanh(x[i] / cap), as cap - 2 cap / (e^(2 x / cap) + 1) (e^ saturating, so
    /// large scores reach ±cap).
    static func softCap(_ x: UnsafeMutablePointer<Float>, _ cap: Float, _ range: Range<Int>) {
        var i = range.lowerBound
        let capv = SIMD8<Float>(repeating: cap), twoOverCap = SIMD8<Float>(repeating: 2 / cap)
        while i + 8 <= range.upperBound {
            let v = UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self)
            let t = capv - 2 * capv / (exp8(v * twoOverCap) + 1)
            UnsafeMutableRawPointer(x + i).storeBytes(of: t, as: SIMD8<Float>.self)
            i += 8
        }
        while i < range.upperBound { x[i] = cap * tanhf(x[i] / cap); i += 1 }
    }

    /// The largest of x[0..<n], NaNs passed over (as `max` passes them), -infinity where there is
    /// nothing else: four independent 8-lane compare-and-select chains (one would wait on itself).
    /// Softmax's shift, and the sampler's largest logit.
    static func maximum(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        var v0 = SIMD8<Float>(repeating: -.infinity), v1 = v0, v2 = v0, v3 = v0
        var i = 0
        while i &+ 32 <= n {
            let w0 = load8(x, i), w1 = load8(x, i &+ 8), w2 = load8(x, i &+ 16), w3 = load8(x, i &+ 24)
            v0 = v0.replacing(with: w0, where: w0 .> v0); v1 = v1.replacing(with: w1, where: w1 .> v1)
            v2 = v2.replacing(with: w2, where: w2 .> v2); v3 = v3.replacing(with: w3, where: w3 .> v3)
            i &+= 32
        }
        while i &+ 8 <= n { let w = load8(x, i); v0 = v0.replacing(with: w, where: w .> v0); i &+= 8 }
        v0 = v0.replacing(with: v1, where: v1 .> v0)
        v2 = v2.replacing(with: v3, where: v3 .> v2)
        v0 = v0.replacing(with: v2, where: v2 .> v0)
        var top = v0.max()
        while i < n { if x[i] > top { top = x[i] }; i &+= 1 }
        return top
    }

    /// Whether every x[0..<n] is finite: x * 0 is ±0 for a finite x and NaN for a NaN or an
    /// infinity, so the lanes' sums stay zero exactly when every value is finite.
    static func allFinite(_ x: UnsafePointer<Float>, _ n: Int) -> Bool {
        var acc = SIMD8<Float>()
        var i = 0
        while i &+ 8 <= n { acc += load8(x, i) * 0; i &+= 8 }
        var tail: Float = 0
        while i < n { tail += x[i] * 0; i &+= 1 }
        return acc.sum() + tail == 0
    }

    /// In place: x = exp(x - m), returning the sum.
    static func expShiftSum(_ x: UnsafeMutablePointer<Float>, _ n: Int, _ m: Float) -> Float {
        var acc = SIMD8<Float>()
        var i = 0
        let mv = SIMD8<Float>(repeating: m)
        while i + 8 <= n {
            let e = exp8(UnsafeRawPointer(x + i).loadUnaligned(as: SIMD8<Float>.self) - mv)
            UnsafeMutableRawPointer(x + i).storeBytes(of: e, as: SIMD8<Float>.self)
            acc += e
            i += 8
        }
        var s = acc.sum()
        while i < n { x[i] = expf(x[i] - m); s += x[i]; i += 1 }
        return s
    }

    /// acc[0..<hd] += p * v[0..<hd], hd a multiple of 8 or not.
    @inline(__always)
    static func axpy(_ p: Float, _ v: UnsafePointer<Float>, _ acc: UnsafeMutablePointer<Float>, _ hd: Int) {
        var i = 0
        let pv = SIMD8<Float>(repeating: p)
        while i + 8 <= hd {
            let a = UnsafeRawPointer(acc + i).loadUnaligned(as: SIMD8<Float>.self)
            let b = UnsafeRawPointer(v + i).loadUnaligned(as: SIMD8<Float>.self)
            UnsafeMutableRawPointer(acc + i).storeBytes(of: a.addingProduct(pv, b), as: SIMD8<Float>.self)
            i += 8
        }
        while i < hd { acc[i] += p * v[i]; i += 1 }
    }
}
