#if arch(x86_64)
import Builtin

/// The CPU paged attention's two inner loops on 16-lane vectors (Peregrine's `PagedAttention`
/// has the layouts and calls these where the CPU has AVX-512). Each lane does what the 8-lane
/// loops do for it: a position's score is one chain of FMAs over the dimensions in order, times
/// the scale; an output element is one chain of FMAs over the positions in order. So results
/// have the same bits on either path, and a query's do not depend on its batch.
public enum AVX512Attention {
    /// The scores of one block (`bs` a multiple of 16 positions, keys of the KV head from element
    /// `k`) for a group of `heads` query heads: head i's to out[i stride ..< i stride + bs].
    public static func blockScores(f16: Bool, heads: Int, q: UnsafePointer<Float>, hd: Int, keys: UnsafeRawPointer, k: Int, bs: Int,
                                   scale: Float, out: UnsafeMutablePointer<Float>, stride: Int) {
        if f16 {
            blockScores(WideF16.self, heads: heads, q: q, hd: hd, keys: keys, k: k, bs: bs, scale: scale, out: out, stride: stride)
        } else {
            blockScores(WideF32.self, heads: heads, q: q, hd: hd, keys: keys, k: k, bs: bs, scale: scale, out: out, stride: stride)
        }
    }

    @inline(__always)
    static func blockScores<W: WideWeight>(_: W.Type, heads: Int, q: UnsafePointer<Float>, hd: Int, keys: UnsafeRawPointer, k: Int, bs: Int,
                                           scale: Float, out: UnsafeMutablePointer<Float>, stride: Int) {
        var c = 0
        while c < bs {
            var g = 0
            while g < heads {
                let qg = q + g &* hd, o = out + (g &* stride &+ c)
                switch heads &- g {
                case 1: scores16(W.self, Tokens1.self, q: qg, hd: hd, keys: keys, k: k &+ c, bs: bs, scale: scale, out: o, stride: stride)
                case 2: scores16(W.self, Tokens2.self, q: qg, hd: hd, keys: keys, k: k &+ c, bs: bs, scale: scale, out: o, stride: stride)
                case 3: scores16(W.self, Tokens3.self, q: qg, hd: hd, keys: keys, k: k &+ c, bs: bs, scale: scale, out: o, stride: stride)
                default: scores16(W.self, Tokens4.self, q: qg, hd: hd, keys: keys, k: k &+ c, bs: bs, scale: scale, out: o, stride: stride)
                }
                g &+= 4
            }
            c &+= 16
        }
    }

    /// The value sums of a group of `heads` query heads (probabilities p[i pStride ..< i pStride + n]
    /// for positions lo ..< lo + n) for the columns 0 ..< hd & ~15 (returned), head i's to
    /// out[i hd ...]; the caller does the rest.
    public static func valueSums(f16: Bool, heads: Int, p: UnsafePointer<Float>, pStride: Int, lo: Int, n: Int, hd: Int, kvHead: Int,
                                 values: UnsafeRawPointer, rowSize: Int, blockSize: Int, table: UnsafePointer<Int32>,
                                 out: UnsafeMutablePointer<Float>) -> Int {
        if f16 {
            valueSums(WideF16.self, heads: heads, p: p, pStride: pStride, lo: lo, n: n, hd: hd, kvHead: kvHead, values: values, rowSize: rowSize,
                      blockSize: blockSize, table: table, out: out)
        } else {
            valueSums(WideF32.self, heads: heads, p: p, pStride: pStride, lo: lo, n: n, hd: hd, kvHead: kvHead, values: values, rowSize: rowSize,
                      blockSize: blockSize, table: table, out: out)
        }
        return hd & ~15
    }

    @inline(__always)
    static func valueSums<W: WideWeight>(_: W.Type, heads: Int, p: UnsafePointer<Float>, pStride: Int, lo: Int, n: Int, hd: Int, kvHead: Int,
                                         values vd: UnsafeRawPointer, rowSize row: Int, blockSize bs: Int, table: UnsafePointer<Int32>,
                                         out: UnsafeMutablePointer<Float>) {
        var g = 0
        while g < heads {
            let h = min(4, heads &- g), pg = p + g &* pStride, og = out + g &* hd
            var c = 0
            // Four heads by 64 columns a pass (16 sums), fewer columns for the rest.
            while c &+ 64 <= hd {
                switch h {
                case 1: values(W.self, Tokens1.self, Tokens4.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                case 2: values(W.self, Tokens2.self, Tokens4.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                case 3: values(W.self, Tokens3.self, Tokens4.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                default: values(W.self, Tokens4.self, Tokens4.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                }
                c &+= 64
            }
            while c &+ 16 <= hd {
                switch h {
                case 1: values(W.self, Tokens1.self, Tokens1.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                case 2: values(W.self, Tokens2.self, Tokens1.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                case 3: values(W.self, Tokens3.self, Tokens1.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                default: values(W.self, Tokens4.self, Tokens1.self, p: pg, pStride: pStride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: og)
                }
                c &+= 16
            }
            g &+= 4
        }
    }

    /// Scores of 16 consecutive positions of a block for H (1-4) query heads (`q`, `hd` apart):
    /// keys of dimension d at keys[k + d bs ..< k + d bs + 16] (`W`: f32 or F16); head i's
    /// scores to out[i stride ..< i stride + 16].
    @inline(__always)
    static func scores16<W: WideWeight, H: TileTokens>(_: W.Type, _: H.Type, q: UnsafePointer<Float>, hd: Int, keys: UnsafeRawPointer,
                                                              k: Int, bs: Int, scale: Float, out: UnsafeMutablePointer<Float>, stride: Int) {
        let h = H.n
        let q0 = q, q1 = q0 + hd, q2 = q1 + hd, q3 = q2 + hd
        var a0 = SIMD16<Float>(), a1 = a0, a2 = a0, a3 = a0
        var kp = k
        for d in 0..<hd {
            let key = W.load16(keys, kp)
            a0 = a0.addingProduct(SIMD16(repeating: q0[d]), key)
            if h > 1 { a1 = a1.addingProduct(SIMD16(repeating: q1[d]), key) }
            if h > 2 { a2 = a2.addingProduct(SIMD16(repeating: q2[d]), key) }
            if h > 3 { a3 = a3.addingProduct(SIMD16(repeating: q3[d]), key) }
            kp &+= bs
        }
        let sc = SIMD16<Float>(repeating: scale)
        put(a0 * sc, out)
        if h > 1 { put(a1 * sc, out + stride) }
        if h > 2 { put(a2 * sc, out + 2 &* stride) }
        if h > 3 { put(a3 * sc, out + 3 &* stride) }
    }

    /// out[i hd + c ..< i hd + c + 16 L] = sum over positions j of p[i pStride + j] x
    /// V[lo + j][c ..< c + 16 L] for H (1-4) heads, H x L (at most 16) sums in registers: a value
    /// vector is read once for the H heads. Values of position `at` at
    /// values[(table[at / bs] bs + at % bs) rowSize + kvHead hd + c ...].
    @inline(__always)
    static func values<W: WideWeight, H: TileTokens, L: TileTokens>(_: W.Type, _: H.Type, _: L.Type, p: UnsafePointer<Float>, pStride: Int,
                                                                          lo: Int, n: Int, hd: Int, c: Int, kvHead: Int, values vd: UnsafeRawPointer,
                                                                          rowSize row: Int, blockSize bs: Int, table: UnsafePointer<Int32>,
                                                                          out: UnsafeMutablePointer<Float>) {
        let h = H.n, l = L.n
        let z = SIMD16<Float>()
        // Head i's vector u in a{i}{u}.
        var a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z
        var a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z
        let p0 = p, p1 = p0 + pStride, p2 = p1 + pStride, p3 = p2 + pStride
        var j = 0
        while j < n {
            let at = lo &+ j, inBlock = at % bs, count = min(n &- j, bs &- inBlock)
            let block = Int(table[at / bs])
            var v: Int = (block &* bs &+ inBlock) &* row &+ kvHead &* hd &+ c
            if j &+ count < n {
                // The next block's rows of this chunk, while this block's are summed.
                var r: Int = Int(table[(at &+ count) / bs]) &* bs &* row &+ kvHead &* hd &+ c
                for _ in 0..<bs {
                    prefetch(vd + r &* W.bytes, bytes: l &* 16 &* W.bytes)
                    r &+= row
                }
            }
            for i in 0..<count {
                let x = j &+ i
                let v0 = W.load16(vd, v)
                let v1 = l > 1 ? W.load16(vd, v &+ 16) : z, v2 = l > 2 ? W.load16(vd, v &+ 32) : z, v3 = l > 3 ? W.load16(vd, v &+ 48) : z
                var w = SIMD16<Float>(repeating: p0[x])
                a00 = a00.addingProduct(w, v0)
                if l > 1 { a01 = a01.addingProduct(w, v1) }
                if l > 2 { a02 = a02.addingProduct(w, v2) }
                if l > 3 { a03 = a03.addingProduct(w, v3) }
                if h > 1 {
                    w = SIMD16(repeating: p1[x])
                    a10 = a10.addingProduct(w, v0)
                    if l > 1 { a11 = a11.addingProduct(w, v1) }
                    if l > 2 { a12 = a12.addingProduct(w, v2) }
                    if l > 3 { a13 = a13.addingProduct(w, v3) }
                }
                if h > 2 {
                    w = SIMD16(repeating: p2[x])
                    a20 = a20.addingProduct(w, v0)
                    if l > 1 { a21 = a21.addingProduct(w, v1) }
                    if l > 2 { a22 = a22.addingProduct(w, v2) }
                    if l > 3 { a23 = a23.addingProduct(w, v3) }
                }
                if h > 3 {
                    w = SIMD16(repeating: p3[x])
                    a30 = a30.addingProduct(w, v0)
                    if l > 1 { a31 = a31.addingProduct(w, v1) }
                    if l > 2 { a32 = a32.addingProduct(w, v2) }
                    if l > 3 { a33 = a33.addingProduct(w, v3) }
                }
                v &+= row
            }
            j &+= count
        }
        @inline(__always) func store(_ a0: SIMD16<Float>, _ a1: SIMD16<Float>, _ a2: SIMD16<Float>, _ a3: SIMD16<Float>, _ o: UnsafeMutablePointer<Float>) {
            put(a0, o)
            if l > 1 { put(a1, o + 16) }
            if l > 2 { put(a2, o + 32) }
            if l > 3 { put(a3, o + 48) }
        }
        let o = out + c
        store(a00, a01, a02, a03, o)
        if h > 1 { store(a10, a11, a12, a13, o + hd) }
        if h > 2 { store(a20, a21, a22, a23, o + 2 &* hd) }
        if h > 3 { store(a30, a31, a32, a33, o + 3 &* hd) }
    }

    @inline(__always) static func put(_ v: SIMD16<Float>, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD16<Float>.self)
    }

    /// Asks for the cache lines of `bytes` bytes at `p` without waiting for them.
    @inline(__always) static func prefetch(_ p: UnsafeRawPointer, bytes: Int) {
        var line = 0
        while line < bytes {
            Builtin.int_prefetch_RawPointer((p + line)._rawValue, Int32(0)._value, Int32(3)._value, Int32(1)._value)
            line &+= 64
        }
    }
}
#endif
