#if arch(x86_64)
import Builtin
import PeregrineAVX512
#endif

/// Attention of one query token over a sequence's KV blocks, for the query heads of one KV head
/// (a GQA group), on the CPU.
///
/// Keys are stored transposed inside each block, [block, kvHead, headDim, offset]: a vector load
/// then holds one dimension of 8 consecutive positions, and the scores of a block are
/// accumulated dimension by dimension (a broadcast query value times a row of keys), with no
/// horizontal sum per position. Values stay [block, offset, kvHead, headDim]; each head's output
/// is accumulated in registers over the positions. Keys and values are stored as f32 or F16 (`E`,
/// widened as they are loaded). The arithmetic for a query does not depend on anything else in
/// the batch.
enum PagedAttention {
    /// Offset of key (position `offset` in its block, dimension 0) of `kvHead` in `block`.
    @inline(__always)
    static func keyBase(block: Int, kvHead: Int, blockSize: Int, headDim: Int, rowSize: Int) -> Int {
        block &* blockSize &* rowSize &+ kvHead &* headDim &* blockSize
    }

    /// Writes one token's keys (all KV heads, transposed) and values into position `offset` of `block`.
    @inline(__always)
    static func store<E: KVElement>(_: E.Type, key k: UnsafePointer<Float>, value v: UnsafePointer<Float>,
                                    keys kd: UnsafeMutableRawPointer, values vd: UnsafeMutableRawPointer,
                                    block: Int, offset: Int, kvHeads: Int, headDim: Int, blockSize: Int) {
        let row = kvHeads &* headDim
        for h in 0..<kvHeads {
            let base = keyBase(block: block, kvHead: h, blockSize: blockSize, headDim: headDim, rowSize: row) &+ offset
            let src = k + h &* headDim
            for d in 0..<headDim { E.store(src[d], kd, base &+ d &* blockSize) }
        }
        let at = (block &* blockSize &+ offset) &* row
        for i in 0..<row { E.store(v[i], vd, at &+ i) }
    }

    /// Scratch floats `attend` needs for a sequence of up to `positions` positions.
    static func scratchFloats(positions: Int, group: Int, blockSize: Int) -> Int {
        group * (positions + 2 * max(blockSize, 16))
    }

    /// out[g * hd ..< (g + 1) * hd] = softmax(cap(q_g . K * scale)) V for the `group` query heads
    /// at `q` (head after head), over positions lo...pos of the sequence whose block table is
    /// `table`; cap(s) = softCap * tanh(s / softCap) where `softCap` is set, else s.
    static func attend<E: KVElement>(_: E.Type, wide: Bool, q: UnsafePointer<Float>, group: Int, hd: Int, scale: Float, softCap: Float?, kvHead: Int,
                       keys kd: UnsafeRawPointer, values vd: UnsafeRawPointer, rowSize row: Int, blockSize bs: Int,
                       table: UnsafePointer<Int32>, lo: Int, pos: Int, scratch: UnsafeMutablePointer<Float>,
                       out: UnsafeMutablePointer<Float>) {
        // Scores are indexed from the start of lo's block, so whole blocks are written; `stride`
        // floats per head.
        let first = lo / bs, last = pos / bs
        let base = first &* bs
        let span = (last &- first &+ 1) &* bs
        let stride = span
        let fast = bs % 16 == 0
        #if arch(x86_64)
        // `wide` (where the CPU has AVX-512): the scores and value sums run on 16-lane vectors,
        // each lane the same arithmetic as here (`AVX512Attention`).
        let f16 = E.dtype == .f16
        #endif
        for b in first...last {
            let block = Int(table[b])
            let kb = keyBase(block: block, kvHead: kvHead, blockSize: bs, headDim: hd, rowSize: row)
            // Blocks lie anywhere in the pool, where the hardware prefetcher cannot follow: ask
            // for the next block's keys while this one's are used.
            if b < last {
                let next = keyBase(block: Int(table[b &+ 1]), kvHead: kvHead, blockSize: bs, headDim: hd, rowSize: row)
                prefetch(kd + next &* E.bytes, bytes: hd &* bs &* E.bytes)
            }
            let s = scratch + (b &- first) &* bs
            if fast && wide {
                #if arch(x86_64)
                AVX512Attention.blockScores(f16: f16, heads: group, q: q, hd: hd, keys: kd, k: kb, bs: bs, scale: scale, out: s, stride: stride)
                #endif
            } else if fast {
                var c = 0
                while c < bs {
                    var g = 0
                    while g < group {
                        switch group &- g {
                        case 1: scores16(E.self, Count1.self, q: q + g &* hd, hd: hd, keys: kd, k: kb &+ c, bs: bs, scale: scale, out: s + g &* stride + c, stride: stride)
                        case 2: scores16(E.self, Count2.self, q: q + g &* hd, hd: hd, keys: kd, k: kb &+ c, bs: bs, scale: scale, out: s + g &* stride + c, stride: stride)
                        case 3: scores16(E.self, Count3.self, q: q + g &* hd, hd: hd, keys: kd, k: kb &+ c, bs: bs, scale: scale, out: s + g &* stride + c, stride: stride)
                        default: scores16(E.self, Count4.self, q: q + g &* hd, hd: hd, keys: kd, k: kb &+ c, bs: bs, scale: scale, out: s + g &* stride + c, stride: stride)
                        }
                        g &+= 4
                    }
                    c &+= 16
                }
            } else {
                for g in 0..<group {
                    let qg = q + g &* hd
                    for i in 0..<bs {
                        var acc: Float = 0
                        for d in 0..<hd { acc = acc.addingProduct(qg[d], E.load1(kd, kb &+ d &* bs &+ i)) }
                        s[g &* stride &+ i] = acc * scale
                    }
                }
            }
        }
        // Positions before lo and after pos are outside the window: their lanes hold whatever the
        // block held, and take no part.
        let from = lo &- base, to = pos &- base &+ 1
        let n = to &- from
        for g in 0..<group {
            let s = scratch + g &* stride + from
            if let softCap { CPUKernels.softCap(s, softCap, 0..<n) }
            let inv = 1 / CPUKernels.expShiftSum(s, n, CPUKernels.maximum(s, n))
            for j in 0..<n { s[j] *= inv }
        }
        // Values: each row a value chunk is read for up to four of the group's heads at once
        // (16 columns each), or for one head 64 columns at a time. Every output element is the
        // same chain of FMAs over the positions in order either way.
        var g = 0
        while g < group {
            let h = min(4, group &- g), p = scratch + g &* stride + from, o = out + g &* hd
            var c = 0
            #if arch(x86_64)
            if wide {
                c = AVX512Attention.valueSums(f16: f16, heads: h, p: p, pStride: stride, lo: lo, n: n, hd: hd, kvHead: kvHead, values: vd,
                                              rowSize: row, blockSize: bs, table: table, out: o)
            }
            #endif
            if h == 1 {
                while c &+ 64 <= hd {
                    valueChunk(E.self, Count1.self, Count8.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                    c &+= 64
                }
                switch (hd &- c) / 8 {
                case 1: valueChunk(E.self, Count1.self, Count1.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                case 2: valueChunk(E.self, Count1.self, Count2.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                case 3: valueChunk(E.self, Count1.self, Count3.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                case 4: valueChunk(E.self, Count1.self, Count4.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                case 5: valueChunk(E.self, Count1.self, Count5.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                case 6: valueChunk(E.self, Count1.self, Count6.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                case 7: valueChunk(E.self, Count1.self, Count7.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                default: break
                }
            } else {
                while c &+ 16 <= hd {
                    switch h {
                    case 2: valueChunk(E.self, Count2.self, Count2.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                    case 3: valueChunk(E.self, Count3.self, Count2.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                    default: valueChunk(E.self, Count4.self, Count2.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                    }
                    c &+= 16
                }
                if c &+ 8 <= hd {
                    switch h {
                    case 2: valueChunk(E.self, Count2.self, Count1.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                    case 3: valueChunk(E.self, Count3.self, Count1.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                    default: valueChunk(E.self, Count4.self, Count1.self, p: p, pStride: stride, lo: lo, n: n, hd: hd, c: c, kvHead: kvHead, values: vd, rowSize: row, blockSize: bs, table: table, out: o)
                    }
                }
            }
            // A head size that is not a multiple of 8: the last columns one at a time.
            for i in 0..<h {
                let ph = p + i &* stride, oh = o + i &* hd
                var c = hd & ~7
                while c < hd {
                    var acc: Float = 0
                    for j in 0..<n {
                        let at = lo &+ j
                        let rowIndex: Int = Int(table[at / bs]) &* bs &+ at % bs
                        acc = acc.addingProduct(ph[j], E.load1(vd, rowIndex &* row &+ kvHead &* hd &+ c))
                    }
                    oh[c] = acc
                    c &+= 1
                }
            }
            g &+= 4
        }
    }

    /// Asks for the cache lines of `bytes` bytes at `p` without waiting for them.
    @inline(__always) static func prefetch(_ p: UnsafeRawPointer, bytes: Int) {
        #if arch(x86_64)
        var line = 0
        while line < bytes {
            Builtin.int_prefetch_RawPointer((p + line)._rawValue, Int32(0)._value, Int32(3)._value, Int32(1)._value)
            line &+= 64
        }
        #endif
    }

    @inline(__always) static func v8(_ p: UnsafePointer<Float>) -> SIMD8<Float> { UnsafeRawPointer(p).loadUnaligned(as: SIMD8<Float>.self) }
    @inline(__always) static func put8(_ v: SIMD8<Float>, _ p: UnsafeMutablePointer<Float>) {
        UnsafeMutableRawPointer(p).storeBytes(of: v, as: SIMD8<Float>.self)
    }

    /// Scores of 16 consecutive positions of a block for H (1-4) query heads: per dimension, two
    /// vectors of keys times each head's query value.
    @inline(__always)
    static func scores16<E: KVElement, H: FixedCount>(_: E.Type, _: H.Type, q: UnsafePointer<Float>, hd: Int, keys: UnsafeRawPointer,
                                                     k: Int, bs: Int, scale: Float, out: UnsafeMutablePointer<Float>, stride: Int) {
        let h = H.n
        let q0 = q, q1 = q0 + hd, q2 = q1 + hd, q3 = q2 + hd
        var a0 = SIMD8<Float>(), b0 = a0, a1 = a0, b1 = a0, a2 = a0, b2 = a0, a3 = a0, b3 = a0
        var kp = k
        for d in 0..<hd {
            let lo = E.load8(keys, kp), hi = E.load8(keys, kp &+ 8)
            var w = SIMD8<Float>(repeating: q0[d])
            a0 = a0.addingProduct(w, lo); b0 = b0.addingProduct(w, hi)
            if h > 1 { w = SIMD8(repeating: q1[d]); a1 = a1.addingProduct(w, lo); b1 = b1.addingProduct(w, hi) }
            if h > 2 { w = SIMD8(repeating: q2[d]); a2 = a2.addingProduct(w, lo); b2 = b2.addingProduct(w, hi) }
            if h > 3 { w = SIMD8(repeating: q3[d]); a3 = a3.addingProduct(w, lo); b3 = b3.addingProduct(w, hi) }
            kp &+= bs
        }
        let sc = SIMD8<Float>(repeating: scale)
        put8(a0 * sc, out); put8(b0 * sc, out + 8)
        if h > 1 { put8(a1 * sc, out + stride); put8(b1 * sc, out + stride + 8) }
        if h > 2 { put8(a2 * sc, out + 2 &* stride); put8(b2 * sc, out + 2 &* stride + 8) }
        if h > 3 { put8(a3 * sc, out + 3 &* stride); put8(b3 * sc, out + 3 &* stride + 8) }
    }

    /// out[i * hd + c ..< i * hd + c + 8 L] = sum over positions j of p[i * pStride + j] *
    /// V[lo + j][c ..< c + 8 L] for the H heads i of a group, the H x L vectors of the sums kept
    /// in registers (at most eight): each value vector read once for the H heads.
    @inline(__always)
    static func valueChunk<E: KVElement, H: FixedCount, L: FixedCount>(_: E.Type, _: H.Type, _: L.Type, p: UnsafePointer<Float>, pStride: Int,
                                                                      lo: Int, n: Int, hd: Int, c: Int, kvHead: Int, values vd: UnsafeRawPointer,
                                                                      rowSize row: Int, blockSize bs: Int, table: UnsafePointer<Int32>,
                                                                      out: UnsafeMutablePointer<Float>) {
        let h = H.n, l = L.n
        // Head i's vector u is a[i * l + u] (l is 1 or 2 where h > 1).
        var a0 = SIMD8<Float>(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0
        let p0 = p, p1 = p0 + pStride, p2 = p1 + pStride, p3 = p2 + pStride
        var j = 0
        while j < n {
            let at = lo &+ j, inBlock = at % bs, count = min(n &- j, bs &- inBlock)
            let block = Int(table[at / bs])
            let rowIndex: Int = block &* bs &+ inBlock
            var v: Int = rowIndex &* row &+ kvHead &* hd &+ c
            if j &+ count < n {
                // The next block's rows of this chunk, while this block's are summed.
                let nextRow: Int = Int(table[(at &+ count) / bs]) &* bs
                var r: Int = nextRow &* row &+ kvHead &* hd &+ c
                for _ in 0..<bs {
                    prefetch(vd + r &* E.bytes, bytes: l &* 8 &* E.bytes)
                    r &+= row
                }
            }
            for i in 0..<count {
                let x = j &+ i
                if h == 1 {
                    let w = SIMD8<Float>(repeating: p0[x])
                    a0 = a0.addingProduct(w, E.load8(vd, v))
                    if l > 1 { a1 = a1.addingProduct(w, E.load8(vd, v &+ 8)) }
                    if l > 2 { a2 = a2.addingProduct(w, E.load8(vd, v &+ 16)) }
                    if l > 3 { a3 = a3.addingProduct(w, E.load8(vd, v &+ 24)) }
                    if l > 4 { a4 = a4.addingProduct(w, E.load8(vd, v &+ 32)) }
                    if l > 5 { a5 = a5.addingProduct(w, E.load8(vd, v &+ 40)) }
                    if l > 6 { a6 = a6.addingProduct(w, E.load8(vd, v &+ 48)) }
                    if l > 7 { a7 = a7.addingProduct(w, E.load8(vd, v &+ 56)) }
                } else {
                    let v0 = E.load8(vd, v), v1 = l > 1 ? E.load8(vd, v &+ 8) : v0
                    var w = SIMD8<Float>(repeating: p0[x])
                    a0 = a0.addingProduct(w, v0); if l > 1 { a1 = a1.addingProduct(w, v1) }
                    w = SIMD8(repeating: p1[x])
                    if l > 1 { a2 = a2.addingProduct(w, v0); a3 = a3.addingProduct(w, v1) } else { a1 = a1.addingProduct(w, v0) }
                    if h > 2 {
                        w = SIMD8(repeating: p2[x])
                        if l > 1 { a4 = a4.addingProduct(w, v0); a5 = a5.addingProduct(w, v1) } else { a2 = a2.addingProduct(w, v0) }
                    }
                    if h > 3 {
                        w = SIMD8(repeating: p3[x])
                        if l > 1 { a6 = a6.addingProduct(w, v0); a7 = a7.addingProduct(w, v1) } else { a3 = a3.addingProduct(w, v0) }
                    }
                }
                v &+= row
            }
            j &+= count
        }
        let o = out + c
        if h == 1 {
            put8(a0, o)
            if l > 1 { put8(a1, o + 8) }
            if l > 2 { put8(a2, o + 16) }
            if l > 3 { put8(a3, o + 24) }
            if l > 4 { put8(a4, o + 32) }
            if l > 5 { put8(a5, o + 40) }
            if l > 6 { put8(a6, o + 48) }
            if l > 7 { put8(a7, o + 56) }
        } else if l > 1 {
            put8(a0, o); put8(a1, o + 8); put8(a2, o + hd); put8(a3, o + hd + 8)
            if h > 2 { put8(a4, o + 2 &* hd); put8(a5, o + 2 &* hd + 8) }
            if h > 3 { put8(a6, o + 3 &* hd); put8(a7, o + 3 &* hd + 8) }
        } else {
            put8(a0, o); put8(a1, o + hd)
            if h > 2 { put8(a2, o + 2 &* hd) }
            if h > 3 { put8(a3, o + 3 &* hd) }
        }
    }
}

/// How keys and values are stored: read like weights (8 or 1 values at a time as f32), written
/// from f32.
protocol KVElement: WeightElement {
    static func store(_ v: Float, _ p: UnsafeMutableRawPointer, _ i: Int)
}

extension KVElement {
    @inline(__always) static var bytes: Int { dtype.byteSize }
}

extension F32Element: KVElement {
    @inline(__always) static func store(_ v: Float, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: v, toByteOffset: i &* 4, as: Float.self)
    }
}

/// IEEE half precision, rounded to nearest even when stored (as llama.cpp's default F16 cache).
extension F16Element: KVElement {
    @inline(__always) static func store(_ v: Float, _ p: UnsafeMutableRawPointer, _ i: Int) {
        p.storeBytes(of: Float16(v), toByteOffset: i &* 2, as: Float16.self)
    }
}

/// Compile-time counts (heads of a score tile, vectors of a value chunk), so unused registers vanish.
protocol FixedCount { static var n: Int { get } }
enum Count1: FixedCount { @inline(__always) static var n: Int { 1 } }
enum Count2: FixedCount { @inline(__always) static var n: Int { 2 } }
enum Count3: FixedCount { @inline(__always) static var n: Int { 3 } }
enum Count4: FixedCount { @inline(__always) static var n: Int { 4 } }
enum Count5: FixedCount { @inline(__always) static var n: Int { 5 } }
enum Count6: FixedCount { @inline(__always) static var n: Int { 6 } }
enum Count7: FixedCount { @inline(__always) static var n: Int { 7 } }
enum Count8: FixedCount { @inline(__always) static var n: Int { 8 } }
