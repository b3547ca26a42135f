#if arch(x86_64)
import Builtin

// Floating-point matrix products on AVX-512, built for a CPU that has it (cascadelake); Peregrine
// calls them only where /proc/cpuinfo shows avx512f. With 32 vector registers a tile of 4 weight
// rows by 6 tokens keeps 24 accumulators, 4 weight vectors and a token vector in registers, which
// the 16 registers of AVX2 cannot. F16 and BF16 weights are widened in registers as they are read
// (one vcvtph2ps, or a zero-extend and shift, per 16 values).
//
// Every (row, token) product is the same arithmetic whatever tile computes it: 16-lane partial
// sums over k in steps of 16, reduced in a fixed order, then the tail of k one element at a time.
// So a token's result does not depend on how many other tokens share the product (batch
// invariance).

/// Reads 16 stored weights as f32 lanes.
public protocol WideWeight {
    static var bytes: Int { get }
    static func load16(_ p: UnsafeRawPointer, _ i: Int) -> SIMD16<Float>
    static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float
}

public enum WideF32: WideWeight {
    @inline(__always) public static var bytes: Int { 4 }
    @inline(__always) public static func load16(_ p: UnsafeRawPointer, _ i: Int) -> SIMD16<Float> {
        p.loadUnaligned(fromByteOffset: i &* 4, as: SIMD16<Float>.self)
    }
    @inline(__always) public static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        p.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)
    }
}

public enum WideF16: WideWeight {
    @inline(__always) public static var bytes: Int { 2 }
    // One vcvtph2ps on a 512-bit register: Swift's own Float16 vector conversion goes 4 lanes at a time.
    @inline(__always) public static func load16(_ p: UnsafeRawPointer, _ i: Int) -> SIMD16<Float> {
        let h = p.loadUnaligned(fromByteOffset: i &* 2, as: SIMD16<UInt16>.self)
        let f = Builtin.fpext_Vec16xFPIEEE16_Vec16xFPIEEE32(unsafeBitCast(h, to: Builtin.Vec16xFPIEEE16.self))
        return unsafeBitCast(f, to: SIMD16<Float>.self)
    }
    @inline(__always) public static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(p.loadUnaligned(fromByteOffset: i &* 2, as: Float16.self))
    }
}

public enum WideBF16: WideWeight {
    @inline(__always) public static var bytes: Int { 2 }
    @inline(__always) public static func load16(_ p: UnsafeRawPointer, _ i: Int) -> SIMD16<Float> {
        let h = p.loadUnaligned(fromByteOffset: i &* 2, as: SIMD16<UInt16>.self)
        let u = Builtin.zext_Vec16xInt16_Vec16xInt32(unsafeBitCast(h, to: Builtin.Vec16xInt16.self))
        return unsafeBitCast(unsafeBitCast(u, to: SIMD16<UInt32>.self) &<< 16, to: SIMD16<Float>.self)
    }
    @inline(__always) public static func load1(_ p: UnsafeRawPointer, _ i: Int) -> Float {
        Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: i &* 2, as: UInt16.self)) << 16)
    }
}

/// How many tokens a tile covers, fixed at compile time so unused accumulators vanish (public:
/// PeregrineBF16's tiles count their tokens with these too).
public protocol TileTokens { static var n: Int { get } }
public enum Tokens1: TileTokens { @inlinable @inline(__always) public static var n: Int { 1 } }
public enum Tokens2: TileTokens { @inlinable @inline(__always) public static var n: Int { 2 } }
public enum Tokens3: TileTokens { @inlinable @inline(__always) public static var n: Int { 3 } }
public enum Tokens4: TileTokens { @inlinable @inline(__always) public static var n: Int { 4 } }
public enum Tokens5: TileTokens { @inlinable @inline(__always) public static var n: Int { 5 } }
public enum Tokens6: TileTokens { @inlinable @inline(__always) public static var n: Int { 6 } }

public enum AVX512Products {
    @inline(__always) static func x16(_ p: UnsafePointer<Float>, _ i: Int) -> SIMD16<Float> {
        UnsafeRawPointer(p + i).loadUnaligned(as: SIMD16<Float>.self)
    }

    /// The one reduction order of 16 partial sums.
    @inline(__always) static func reduce(_ a: SIMD16<Float>) -> Float {
        let b = a.lowHalf + a.highHalf
        let c = b.lowHalf + b.highHalf
        let d = c.lowHalf + c.highHalf
        return d[0] + d[1]
    }

    /// The reduced partial sums plus the products of k's tail.
    @inline(__always)
    static func finish<W: WideWeight>(_: W.Type, _ a: SIMD16<Float>, _ w: UnsafeRawPointer, _ x: UnsafePointer<Float>,
                                      from: Int, to k: Int) -> Float {
        var s = reduce(a)
        var i = from
        while i < k { s = s.addingProduct(W.load1(w, i), x[i]); i &+= 1 }
        return s
    }

    /// One weight row (`w` at its first element) by one token.
    @inline(__always)
    static func dot<W: WideWeight>(_: W.Type, _ w: UnsafeRawPointer, _ x: UnsafePointer<Float>, _ k: Int) -> Float {
        let k16 = k & ~15
        var a = SIMD16<Float>()
        var i = 0
        while i < k16 { a = a.addingProduct(W.load16(w, i), x16(x, i)); i &+= 16 }
        return finish(W.self, a, w, x, from: k16, to: k)
    }

    /// Four weight rows (`w` at the first, `k` elements apart) by T tokens (`ldx` apart); results
    /// at y[t * ldy + r].
    @inline(__always)
    static func tile4<W: WideWeight, T: TileTokens>(_: W.Type, _: T.Type, w: UnsafeRawPointer, k: Int,
                                                    x: UnsafePointer<Float>, ldx: Int,
                                                    y: UnsafeMutablePointer<Float>, ldy: Int) {
        let n = T.n
        let rb = k &* W.bytes
        let w0 = w, w1 = w + rb, w2 = w1 + rb, w3 = w2 + rb
        let x0 = x, x1 = x0 + ldx, x2 = x1 + ldx, x3 = x2 + ldx, x4 = x3 + ldx, x5 = x4 + ldx
        let z = SIMD16<Float>()
        var a00 = z, a10 = z, a20 = z, a30 = z, a01 = z, a11 = z, a21 = z, a31 = z
        var a02 = z, a12 = z, a22 = z, a32 = z, a03 = z, a13 = z, a23 = z, a33 = z
        var a04 = z, a14 = z, a24 = z, a34 = z, a05 = z, a15 = z, a25 = z, a35 = z
        let k16 = k & ~15
        var i = 0
        while i < k16 {
            let v0 = W.load16(w0, i), v1 = W.load16(w1, i), v2 = W.load16(w2, i), v3 = W.load16(w3, i)
            var u = x16(x0, i)
            a00 = a00.addingProduct(v0, u); a10 = a10.addingProduct(v1, u); a20 = a20.addingProduct(v2, u); a30 = a30.addingProduct(v3, u)
            if n > 1 {
                u = x16(x1, i)
                a01 = a01.addingProduct(v0, u); a11 = a11.addingProduct(v1, u); a21 = a21.addingProduct(v2, u); a31 = a31.addingProduct(v3, u)
            }
            if n > 2 {
                u = x16(x2, i)
                a02 = a02.addingProduct(v0, u); a12 = a12.addingProduct(v1, u); a22 = a22.addingProduct(v2, u); a32 = a32.addingProduct(v3, u)
            }
            if n > 3 {
                u = x16(x3, i)
                a03 = a03.addingProduct(v0, u); a13 = a13.addingProduct(v1, u); a23 = a23.addingProduct(v2, u); a33 = a33.addingProduct(v3, u)
            }
            if n > 4 {
                u = x16(x4, i)
                a04 = a04.addingProduct(v0, u); a14 = a14.addingProduct(v1, u); a24 = a24.addingProduct(v2, u); a34 = a34.addingProduct(v3, u)
            }
            if n > 5 {
                u = x16(x5, i)
                a05 = a05.addingProduct(v0, u); a15 = a15.addingProduct(v1, u); a25 = a25.addingProduct(v2, u); a35 = a35.addingProduct(v3, u)
            }
            i &+= 16
        }
        @inline(__always) func put(_ t: Int, _ xt: UnsafePointer<Float>, _ c0: SIMD16<Float>, _ c1: SIMD16<Float>,
                                   _ c2: SIMD16<Float>, _ c3: SIMD16<Float>) {
            let yt = y + t &* ldy
            yt[0] = finish(W.self, c0, w0, xt, from: k16, to: k)
            yt[1] = finish(W.self, c1, w1, xt, from: k16, to: k)
            yt[2] = finish(W.self, c2, w2, xt, from: k16, to: k)
            yt[3] = finish(W.self, c3, w3, xt, from: k16, to: k)
        }
        put(0, x0, a00, a10, a20, a30)
        if n > 1 { put(1, x1, a01, a11, a21, a31) }
        if n > 2 { put(2, x2, a02, a12, a22, a32) }
        if n > 3 { put(3, x3, a03, a13, a23, a33) }
        if n > 4 { put(4, x4, a04, a14, a24, a34) }
        if n > 5 { put(5, x5, a05, a15, a25, a35) }
    }

    /// Four rows by any number of tokens: tiles of six, then one tile for the rest.
    @inline(__always)
    static func rows4<W: WideWeight>(_: W.Type, w: UnsafeRawPointer, k: Int, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                                     y: UnsafeMutablePointer<Float>, ldy: Int) {
        var t = 0
        while t &+ 6 <= tokens {
            tile4(W.self, Tokens6.self, w: w, k: k, x: x + t &* ldx, ldx: ldx, y: y + t &* ldy, ldy: ldy)
            t &+= 6
        }
        let xt = x + t &* ldx, yt = y + t &* ldy
        switch tokens &- t {
        case 1: tile4(W.self, Tokens1.self, w: w, k: k, x: xt, ldx: ldx, y: yt, ldy: ldy)
        case 2: tile4(W.self, Tokens2.self, w: w, k: k, x: xt, ldx: ldx, y: yt, ldy: ldy)
        case 3: tile4(W.self, Tokens3.self, w: w, k: k, x: xt, ldx: ldx, y: yt, ldy: ldy)
        case 4: tile4(W.self, Tokens4.self, w: w, k: k, x: xt, ldx: ldx, y: yt, ldy: ldy)
        case 5: tile4(W.self, Tokens5.self, w: w, k: k, x: xt, ldx: ldx, y: yt, ldy: ldy)
        default: break
        }
    }

    /// Asks for the cache lines of [from, to) into the core's L2 without waiting for them.
    @inline(__always) static func prefetch(_ from: UnsafeRawPointer, _ to: UnsafeRawPointer) {
        var p = from
        while p < to {
            Builtin.int_prefetch_RawPointer(p._rawValue, Int32(0)._value, Int32(2)._value, Int32(1)._value)
            p += 64
        }
    }

    @inline(__always)
    static func product<W: WideWeight>(_: W.Type, w: UnsafeRawPointer, k: Int, rows: Int, x: UnsafePointer<Float>, ldx: Int,
                                       tokens: Int, y: UnsafeMutablePointer<Float>, ldy: Int) {
        let rb = k &* W.bytes
        // Tokens go in runs of 48 so that a run's activations stay in the core's L2 while every
        // four rows pass over them (a prompt's whole activations would not).
        var t0 = 0
        while t0 < tokens {
            let tn = min(48, tokens &- t0)
            let xt = x + t0 &* ldx, yt = y + t0 &* ldy
            var r = 0
            while r &+ 4 <= rows {
                // The weights stream from memory: ask for rows well ahead, so more of them are on
                // their way than the hardware prefetcher keeps in flight (a run's later tiles of
                // the same four rows find them in L1).
                if t0 == 0, r &+ 16 < rows {
                    prefetch(w + (r &+ 16) &* rb, w + min(rows, r &+ 20) &* rb)
                }
                rows4(W.self, w: w + r &* rb, k: k, x: xt, ldx: ldx, tokens: tn, y: yt + r, ldy: ldy)
                r &+= 4
            }
            while r < rows {
                for t in 0..<tn { yt[t &* ldy &+ r] = dot(W.self, w + r &* rb, xt + t &* ldx, k) }
                r &+= 1
            }
            t0 &+= tn
        }
    }

    /// y[t * ldy + r] = dot(row r of `w`, x[t * ldx ..< t * ldx + k]) for r in 0..<rows and t in
    /// 0..<tokens; `w` holds `rows` rows of `k` f32 weights.
    public static func productF32(w: UnsafeRawPointer, k: Int, rows: Int, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                                  y: UnsafeMutablePointer<Float>, ldy: Int) {
        product(WideF32.self, w: w, k: k, rows: rows, x: x, ldx: ldx, tokens: tokens, y: y, ldy: ldy)
    }

    /// The same product with F16 weights, widened in registers as they are read.
    public static func productF16(w: UnsafeRawPointer, k: Int, rows: Int, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                                  y: UnsafeMutablePointer<Float>, ldy: Int) {
        product(WideF16.self, w: w, k: k, rows: rows, x: x, ldx: ldx, tokens: tokens, y: y, ldy: ldy)
    }

    /// The same product with BF16 weights read in place.
    public static func productBF16(w: UnsafeRawPointer, k: Int, rows: Int, x: UnsafePointer<Float>, ldx: Int, tokens: Int,
                                   y: UnsafeMutablePointer<Float>, ldy: Int) {
        product(WideBF16.self, w: w, k: k, rows: rows, x: x, ldx: ldx, tokens: tokens, y: y, ldy: ldy)
    }
}

extension AVX512Products {
    /// `iterations` rounds of 12 independent 16-lane FMA chains (seeded with `seed`), for the
    /// machine's peak: a core with two 512-bit FMA units runs twice the products of 8-lane ones.
    public static func fmaChains(iterations: Int, seed: Float) -> Float {
        let m = SIMD16<Float>(repeating: 0.999999)
        var a0 = SIMD16<Float>(repeating: seed), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0
        var a8 = a0, a9 = a0, a10 = a0, a11 = a0
        for _ in 0..<iterations {
            a0 = a0.addingProduct(a0, m); a1 = a1.addingProduct(a1, m)
            a2 = a2.addingProduct(a2, m); a3 = a3.addingProduct(a3, m)
            a4 = a4.addingProduct(a4, m); a5 = a5.addingProduct(a5, m)
            a6 = a6.addingProduct(a6, m); a7 = a7.addingProduct(a7, m)
            a8 = a8.addingProduct(a8, m); a9 = a9.addingProduct(a9, m)
            a10 = a10.addingProduct(a10, m); a11 = a11.addingProduct(a11, m)
        }
        return (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11).sum()
    }
}

/// 16-bit weights repacked for `AVX512Products.panelProductF16` (the kernel is generic over the
/// widening; F16 is the type that takes it): panels of 16 rows, each holding
/// the 16 rows' values at k = 0, 1, ... in turn (16 halves, 32 bytes: one vector widened per
/// k), the last panel padded with zero rows and the panel count with a zero panel to an even
/// number (the kernel takes two panels at a time).
public enum HalfPanels {
    public static func panels(rows: Int) -> Int { ((rows + 15) / 16 + 1) & ~1 }
    public static func byteCount(rows: Int, k: Int) -> Int { panels(rows: rows) * 16 * k * 2 }

    /// Writes panels `range` of the matrix `w` (`rows` rows of `k` F16 values) into `out`,
    /// which holds `byteCount(rows:k:)` bytes.
    public static func repack(_ w: UnsafeRawPointer, rows: Int, k: Int, panels range: Range<Int>, into out: UnsafeMutableRawPointer) {
        let src = w.assumingMemoryBound(to: UInt16.self), dst = out.assumingMemoryBound(to: UInt16.self)
        for p in range {
            let panel = dst + p &* k &* 16
            panel.update(repeating: 0, count: k &* 16)
            for l in 0..<16 {
                let r = p &* 16 &+ l
                guard r < rows else { break }
                let row = src + r &* k
                var i = 0
                while i < k { panel[i &* 16 &+ l] = row[i]; i &+= 1 }
            }
        }
    }
}

extension HalfPanels {
    /// Tokens the panel kernel takes in one tile.
    public static let tileTokens = 12

    /// The activations of `tokens` tokens (rows `ldx` apart, k values each) rewritten for
    /// `AVX512Products.panelProductF16(interleaved: true)` into `out` (tokens x k floats):
    /// tiles `tiles` of 12 tokens (the last may be shorter), tile j at out + 12 j k holding its
    /// tokens' values at k = 0, then at k = 1, and so on. Read in place, a tile's 12 rows lie
    /// k x 4 bytes apart, in one set of the L1 cache when that is a multiple of 4 KB (k = 1024,
    /// 2048, 8192), so its broadcasts missed L1; interleaved, they read consecutive floats.
    public static func interleave(_ x: UnsafePointer<Float>, ldx: Int, k: Int, tokens: Int, tiles: Range<Int>,
                                  into out: UnsafeMutablePointer<Float>) {
        for j in tiles {
            let t0 = j &* tileTokens, n = min(tileTokens, tokens &- t0)
            let dst = out + t0 &* k
            for t in 0..<n {
                let src = x + (t0 &+ t) &* ldx
                var i = 0, at = t
                while i < k { dst[at] = src[i]; i &+= 1; at &+= n }
            }
        }
    }
}

public enum Tokens7: TileTokens { @inlinable @inline(__always) public static var n: Int { 7 } }
public enum Tokens8: TileTokens { @inlinable @inline(__always) public static var n: Int { 8 } }
public enum Tokens9: TileTokens { @inlinable @inline(__always) public static var n: Int { 9 } }
public enum Tokens10: TileTokens { @inlinable @inline(__always) public static var n: Int { 10 } }
public enum Tokens11: TileTokens { @inlinable @inline(__always) public static var n: Int { 11 } }
public enum Tokens12: TileTokens { @inlinable @inline(__always) public static var n: Int { 12 } }

extension AVX512Products {
    /// One token's results of two 16-row panels (`a` rows 0-15, `b` rows 16-31) into `yt`, the
    /// first `valid` of them (the rest are padding rows). Shared with PeregrineBF16's tiles.
    @inlinable @inline(__always)
    public static func storeRows(_ a: SIMD16<Float>, _ b: SIMD16<Float>, valid: Int, to yt: UnsafeMutablePointer<Float>) {
        if valid >= 32 {
            UnsafeMutableRawPointer(yt).storeBytes(of: a, as: SIMD16<Float>.self)
            UnsafeMutableRawPointer(yt + 16).storeBytes(of: b, as: SIMD16<Float>.self)
        } else {
            for l in 0..<min(16, valid) { yt[l] = a[l] }
            if valid > 16 { for l in 0..<(valid &- 16) { yt[16 &+ l] = b[l] } }
        }
    }

    /// Two panels (32 rows, `p` at the first) by T tokens: 24 accumulators of 16 rows each, one
    /// widened weight vector per panel and k, each token's value broadcast. Every (row, token)
    /// result is one chain of fused multiply-adds over k in order, whatever the tile, so a
    /// token's result does not depend on the batch. Rows from `valid` on are padding. The
    /// tokens' activations are rows `ldx` apart, or (`interleaved`) the tile's T values at k = 0,
    /// then at k = 1, ... (`HalfPanels.interleave`).
    @inline(__always)
    static func panelTile<W: WideWeight, T: TileTokens>(_: W.Type, _: T.Type, p: UnsafeRawPointer, k: Int, valid: Int,
                                                         x: UnsafePointer<Float>, ldx: Int, interleaved: Bool,
                                                         y: UnsafeMutablePointer<Float>, ldy: Int) {
        let n = T.n
        let q = p + k &* 32
        // Token t's value at k = i is at x[i * ks + t * ts].
        let ts = interleaved ? 1 : ldx, ks = interleaved ? n : 1
        let x0 = x + 0 &* ts; let x1 = x + 1 &* ts; let x2 = x + 2 &* ts; let x3 = x + 3 &* ts; let x4 = x + 4 &* ts; let x5 = x + 5 &* ts; let x6 = x + 6 &* ts; let x7 = x + 7 &* ts; let x8 = x + 8 &* ts; let x9 = x + 9 &* ts; let x10 = x + 10 &* ts; let x11 = x + 11 &* ts
        let z = SIMD16<Float>()
        var a0 = z, b0 = z, a1 = z, b1 = z, a2 = z, b2 = z, a3 = z, b3 = z, a4 = z, b4 = z, a5 = z, b5 = z, a6 = z, b6 = z, a7 = z, b7 = z, a8 = z, b8 = z, a9 = z, b9 = z, a10 = z, b10 = z, a11 = z, b11 = z
        var i = 0, at = 0
        while i < k {
            let v = W.load16(p, i &* 16), w = W.load16(q, i &* 16)
            var u = SIMD16<Float>(repeating: x0[at])
            a0 = a0.addingProduct(v, u); b0 = b0.addingProduct(w, u)
            if n > 1 { u = SIMD16<Float>(repeating: x1[at]); a1 = a1.addingProduct(v, u); b1 = b1.addingProduct(w, u) }
            if n > 2 { u = SIMD16<Float>(repeating: x2[at]); a2 = a2.addingProduct(v, u); b2 = b2.addingProduct(w, u) }
            if n > 3 { u = SIMD16<Float>(repeating: x3[at]); a3 = a3.addingProduct(v, u); b3 = b3.addingProduct(w, u) }
            if n > 4 { u = SIMD16<Float>(repeating: x4[at]); a4 = a4.addingProduct(v, u); b4 = b4.addingProduct(w, u) }
            if n > 5 { u = SIMD16<Float>(repeating: x5[at]); a5 = a5.addingProduct(v, u); b5 = b5.addingProduct(w, u) }
            if n > 6 { u = SIMD16<Float>(repeating: x6[at]); a6 = a6.addingProduct(v, u); b6 = b6.addingProduct(w, u) }
            if n > 7 { u = SIMD16<Float>(repeating: x7[at]); a7 = a7.addingProduct(v, u); b7 = b7.addingProduct(w, u) }
            if n > 8 { u = SIMD16<Float>(repeating: x8[at]); a8 = a8.addingProduct(v, u); b8 = b8.addingProduct(w, u) }
            if n > 9 { u = SIMD16<Float>(repeating: x9[at]); a9 = a9.addingProduct(v, u); b9 = b9.addingProduct(w, u) }
            if n > 10 { u = SIMD16<Float>(repeating: x10[at]); a10 = a10.addingProduct(v, u); b10 = b10.addingProduct(w, u) }
            if n > 11 { u = SIMD16<Float>(repeating: x11[at]); a11 = a11.addingProduct(v, u); b11 = b11.addingProduct(w, u) }
            i &+= 1
            at &+= ks
        }
        @inline(__always) func put(_ t: Int, _ a: SIMD16<Float>, _ b: SIMD16<Float>) { storeRows(a, b, valid: valid, to: y + t &* ldy) }
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

    /// y[t * ldy + r] = dot(row r, x[t * ldx ..< t * ldx + k]) for the rows of panel pairs
    /// `pairs` (of a matrix repacked by `HalfPanels`, `rows` rows in all; y at the matrix's row 0)
    /// and `tokens` tokens: tokens in runs of 48 (the run's activations stay in L2 while the
    /// pairs pass over them), each pair's panels (64 bytes a k) reused from L1 by the run's
    /// tiles of 12 tokens.
    ///
    /// With `interleaved`, x holds the activations as `HalfPanels.interleave` lays them out:
    /// tiles of 12 tokens, each tile's values at k = 0, then at k = 1, ... (12 k floats a tile).
    public static func panelProductF16(panels w: UnsafeRawPointer, k: Int, rows: Int, pairs: Range<Int>, x: UnsafePointer<Float>,
                                       ldx: Int, interleaved: Bool, tokens: Int, y: UnsafeMutablePointer<Float>, ldy: Int) {
        if interleaved {
            panelProduct(WideF16.self, panels: w, k: k, rows: rows, pairs: pairs, x: x, ldx: k, interleaved: true, tokens: tokens, y: y, ldy: ldy)
        } else {
            panelProduct(WideF16.self, panels: w, k: k, rows: rows, pairs: pairs, x: x, ldx: ldx, interleaved: false, tokens: tokens, y: y, ldy: ldy)
        }
    }

    @inline(__always)
    static func panelProduct<W: WideWeight>(_: W.Type, panels w: UnsafeRawPointer, k: Int, rows: Int, pairs: Range<Int>,
                                            x: UnsafePointer<Float>, ldx: Int, interleaved: Bool, tokens: Int,
                                            y: UnsafeMutablePointer<Float>, ldy: Int) {
        var t0 = 0
        while t0 < tokens {
            let tn = min(48, tokens &- t0)
            for pair in pairs {
                let p = w + pair &* 2 &* k &* 32, r0 = pair &* 32, valid = min(32, rows &- r0)
                var t = t0
                while t &+ 12 <= t0 &+ tn {
                    panelTile(W.self, Tokens12.self, p: p, k: k, valid: valid, x: x + t &* ldx, ldx: ldx, interleaved: interleaved, y: y + t &* ldy + r0, ldy: ldy)
                    t &+= 12
                }
                let xt = x + t &* ldx, yt = y + t &* ldy + r0
                switch t0 &+ tn &- t {
                case 1: panelTile(W.self, Tokens1.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 2: panelTile(W.self, Tokens2.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 3: panelTile(W.self, Tokens3.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 4: panelTile(W.self, Tokens4.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 5: panelTile(W.self, Tokens5.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 6: panelTile(W.self, Tokens6.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 7: panelTile(W.self, Tokens7.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 8: panelTile(W.self, Tokens8.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 9: panelTile(W.self, Tokens9.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 10: panelTile(W.self, Tokens10.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                case 11: panelTile(W.self, Tokens11.self, p: p, k: k, valid: valid, x: xt, ldx: ldx, interleaved: interleaved, y: yt, ldy: ldy)
                default: break
                }
            }
            t0 &+= tn
        }
    }
}
#endif
