#if arch(x86_64)
import CPeregrineBF16
import PeregrineAVX512

// BF16 matrix products on AVX-512 BF16 (`vdpbf16ps`), built for a CPU that has it (cooperlake:
// cascadelake plus AVX-512 BF16); Peregrine calls them only where /proc/cpuinfo shows
// avx512_bf16. One `vdpbf16ps` multiplies 32 pairs of BF16 values and adds each pair's sum into
// one of 16 f32 lanes: twice the products of a 16-lane FMA on widened weights, which is what the
// f32 kernels are limited by in a prompt. The activations are rounded to BF16 for it (as
// llama.cpp does for BF16 weights, and as a model computing natively in BF16 does).
//
// Every (row, token) result is one chain of `vdpbf16ps` over k's pairs in order, whatever tile
// computes it, so a token's result does not depend on how many tokens share the product.

/// BF16 weights repacked for `BF16PairProducts`: panels of 16 rows, each holding the 16 rows'
/// values at the pair of k = 2i and 2i + 1 in turn (one 32-bit word a row, the even value in its
/// low half; 64 bytes a pair), an odd k's last pair padded with zero, the last panel padded with
/// zero rows and the panel count with a zero panel to an even number (the kernel takes two panels
/// at a time).
public enum BF16PairPanels {
    public static func panels(rows: Int) -> Int { ((rows + 15) / 16 + 1) & ~1 }
    public static func pairs(k: Int) -> Int { (k + 1) / 2 }
    public static func byteCount(rows: Int, k: Int) -> Int { panels(rows: rows) * 16 * pairs(k: k) * 4 }

    /// Tokens the kernel takes in one tile (`BF16PairProducts.tile`'s largest case).
    public static let tileTokens = 12

    /// Writes panels `range` of the matrix `w` (`rows` rows of `k` BF16 values) into `out`,
    /// which holds `byteCount(rows:k:)` bytes.
    public static func repack(_ w: UnsafeRawPointer, rows: Int, k: Int, panels range: Range<Int>, into out: UnsafeMutableRawPointer) {
        let src = w.assumingMemoryBound(to: UInt16.self), dst = out.assumingMemoryBound(to: UInt32.self)
        let kp = pairs(k: k), even = k & ~1
        for p in range {
            let panel = dst + p &* kp &* 16
            panel.update(repeating: 0, count: kp &* 16)
            for l in 0..<16 {
                let r = p &* 16 &+ l
                guard r < rows else { break }
                let row = src + r &* k
                var i = 0
                while i < even {
                    panel[(i >> 1) &* 16 &+ l] = UInt32(row[i]) | UInt32(row[i &+ 1]) &<< 16
                    i &+= 2
                }
                if even < k { panel[(even >> 1) &* 16 &+ l] = UInt32(row[even]) }
            }
        }
    }
}

public enum BF16PairProducts {
    /// acc + the products of 16 rows' pairs `w` with the token's pair `x`, broadcast (the
    /// broadcast folds into the instruction's memory operand).
    @inline(__always) static func dot(_ acc: SIMD16<Float>, _ w: SIMD16<UInt32>, _ x: UInt32) -> SIMD16<Float> {
        peregrine_dpbf16(acc, unsafeBitCast(w, to: __m512i.self), unsafeBitCast(SIMD16<UInt32>(repeating: x), to: __m512i.self))
    }

    /// Two panels (32 rows, `p` at the first) by T tokens: 24 accumulators of 16 rows each, one
    /// weight vector per panel and pair. `x` holds the tile's rounded activations pair after
    /// pair: the T tokens' words of pair 0, then of pair 1, ... Rows from `valid` on are padding.
    @inline(__always)
    static func tile<T: TileTokens>(_: T.Type, p: UnsafeRawPointer, kp: Int, valid: Int, x: UnsafePointer<UInt32>,
                                        y: UnsafeMutablePointer<Float>, ldy: Int) {
        let n = T.n
        let q = p + kp &* 64
        let z = SIMD16<Float>()
        var a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z, a4 = z, b4 = z, a5 = z, b5 = z, a6 = z, b6 = z, a7 = z, b7 = z, a8 = z, b8 = z, a9 = z, b9 = z, a10 = z, b10 = z, a11 = z, b11 = z
        var i = 0, xi = x
        while i < kp {
            let v = p.loadUnaligned(fromByteOffset: i &* 64, as: SIMD16<UInt32>.self)
            let w = q.loadUnaligned(fromByteOffset: i &* 64, as: SIMD16<UInt32>.self)
            a0 = dot(a0, v, xi[0]); b0 = dot(b0, w, xi[0])
            if n > 1 { a1 = dot(a1, v, xi[1]); b1 = dot(b1, w, xi[1]) }
            if n > 2 { a2 = dot(a2, v, xi[2]); b2 = dot(b2, w, xi[2]) }
            if n > 3 { a3 = dot(a3, v, xi[3]); b3 = dot(b3, w, xi[3]) }
            if n > 4 { a4 = dot(a4, v, xi[4]); b4 = dot(b4, w, xi[4]) }
            if n > 5 { a5 = dot(a5, v, xi[5]); b5 = dot(b5, w, xi[5]) }
            if n > 6 { a6 = dot(a6, v, xi[6]); b6 = dot(b6, w, xi[6]) }
            if n > 7 { a7 = dot(a7, v, xi[7]); b7 = dot(b7, w, xi[7]) }
            if n > 8 { a8 = dot(a8, v, xi[8]); b8 = dot(b8, w, xi[8]) }
            if n > 9 { a9 = dot(a9, v, xi[9]); b9 = dot(b9, w, xi[9]) }
            if n > 10 { a10 = dot(a10, v, xi[10]); b10 = dot(b10, w, xi[10]) }
            if n > 11 { a11 = dot(a11, v, xi[11]); b11 = dot(b11, w, xi[11]) }
            i &+= 1
            xi += n
        }
        @inline(__always) func put(_ t: Int, _ a: SIMD16<Float>, _ b: SIMD16<Float>) {
            AVX512Products.storeRows(a, b, valid: valid, to: y + t &* ldy)
        }
        put(0, a0, b0)
        if n > 1 { put(1, a1, b1) }
        if n > 2 { put(2, a2, b2) }
        if n > 3 { put(3, a3, b3) }
        if n > 4 { put(4, a4, b4) }
        if n > 5 { put(5, a5, b5) }
        if n > 6 { put(6, a6, b6) }
        if n > 7 { put(7, a7, b7) }
        if n > 8 { put(8, a8, b8) }
        if n > 9 { put(9, a9, b9) }
        if n > 10 { put(10, a10, b10) }
        if n > 11 { put(11, a11, b11) }
    }

    /// y[t * ldy + r] = the product of row r and token t, for the rows of panel pairs `pairs` (of
    /// a matrix repacked by `BF16PairPanels`, `rows` rows of `k` values in all; y at the matrix's
    /// row 0) and `tokens` tokens, whose activations `x` holds rounded and laid out in tiles of
    /// 12 tokens (tile j at x + 12 j kp words, its tokens' words pair after pair; the last tile
    /// may be shorter). Tokens go in runs of 48 (the run's activations stay in L2 while the
    /// panel pairs pass over them), each pair's panels (128 bytes a pair of k) reused from L1 by
    /// the run's tiles.
    public static func product(panels w: UnsafeRawPointer, k: Int, rows: Int, pairs: Range<Int>, x: UnsafePointer<UInt32>,
                               tokens: Int, y: UnsafeMutablePointer<Float>, ldy: Int) {
        let kp = BF16PairPanels.pairs(k: k)
        // The tiles' layout (roundPairs in Peregrine writes it) has tileTokens a tile, and `tile`'s
        // largest case is 12; a run is whole tiles, so every tile starts at x + 12 j kp.
        let full = BF16PairPanels.tileTokens, run = 4 * full
        var t0 = 0
        while t0 < tokens {
            let tn = min(run, tokens &- t0)
            for pair in pairs {
                let p = w + pair &* 2 &* kp &* 64, r0 = pair &* 32, valid = min(32, rows &- r0)
                var t = t0
                while t &+ full <= t0 &+ tn {
                    tile(Tokens12.self, p: p, kp: kp, valid: valid, x: x + t &* kp, y: y + t &* ldy + r0, ldy: ldy)
                    t &+= full
                }
                let xt = x + t &* kp, yt = y + t &* ldy + r0
                switch t0 &+ tn &- t {
                case 1: tile(Tokens1.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 2: tile(Tokens2.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 3: tile(Tokens3.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 4: tile(Tokens4.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 5: tile(Tokens5.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 6: tile(Tokens6.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 7: tile(Tokens7.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 8: tile(Tokens8.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 9: tile(Tokens9.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 10: tile(Tokens10.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                case 11: tile(Tokens11.self, p: p, kp: kp, valid: valid, x: xt, y: yt, ldy: ldy)
                default: break
                }
            }
            t0 &+= tn
        }
    }
}
#endif
