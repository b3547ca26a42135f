// Matrix products for CPUs with AVX-512 (F, BW, DQ, VL), compiled for that instruction set on
// their own and called only after a run-time check. Sixteen-lane loads halve the instructions
// per byte of weights; 32 registers hold a 4 x 4 tile of (weight row, token) accumulators. Each
// accumulator runs over k in the same order whatever the tile, so a token's result does not
// depend on how many tokens share the batch (speculative verification relies on it).

/// Element types of weights, as the caller numbers them.
public enum AVX512WeightType: Int32 {
    case f32 = 0, f16 = 1, bf16 = 2
}

@inline(__always)
func load16(_ t: AVX512WeightType, _ p: UnsafeRawPointer, _ i: Int) -> SIMD16<Float> {
    switch t {
    case .f32: return p.loadUnaligned(fromByteOffset: i &* 4, as: SIMD16<Float>.self)
    case .f16: return SIMD16<Float>(p.loadUnaligned(fromByteOffset: i &* 2, as: SIMD16<Float16>.self))
    case .bf16:
        let u = SIMD16<UInt32>(truncatingIfNeeded: p.loadUnaligned(fromByteOffset: i &* 2, as: SIMD16<UInt16>.self))
        return unsafeBitCast(u &<< 16, to: SIMD16<Float>.self)
    }
}

@inline(__always)
func load1(_ t: AVX512WeightType, _ p: UnsafeRawPointer, _ i: Int) -> Float {
    switch t {
    case .f32: return p.loadUnaligned(fromByteOffset: i &* 4, as: Float.self)
    case .f16: return Float(p.loadUnaligned(fromByteOffset: i &* 2, as: Float16.self))
    case .bf16: return Float(bitPattern: UInt32(p.loadUnaligned(fromByteOffset: i &* 2, as: UInt16.self)) << 16)
    }
}

@inline(__always)
func x16(_ x: UnsafePointer<Float>, _ i: Int) -> SIMD16<Float> {
    UnsafeRawPointer(x + i).loadUnaligned(as: SIMD16<Float>.self)
}

/// Lane sum by halves: four vector adds instead of fifteen dependent scalar ones.
@inline(__always)
func treeSum(_ a: SIMD16<Float>) -> Float {
    let h = a.lowHalf + a.highHalf
    let q = h.lowHalf + h.highHalf
    let r = q.lowHalf + q.highHalf
    return r[0] + r[1]
}

/// Writes one output: the accumulator's lane sum plus the scalar tail of k.
@inline(__always)
func finish(_ acc: SIMD16<Float>, _ type: AVX512WeightType, _ w: UnsafeRawPointer, _ base: Int, _ k16: Int, _ k: Int,
            _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>) {
    var s = treeSum(acc)
    var i = k16
    while i < k { s += load1(type, w, base &+ i) * x[i]; i &+= 1 }
    y.pointee = s
}

@inline(__always)
func single(_ type: AVX512WeightType, _ w: UnsafeRawPointer, _ o: Int, _ k: Int, _ k16: Int, _ x: UnsafePointer<Float>,
            _ y: UnsafeMutablePointer<Float>) {
    let b = o &* k
    var a = SIMD16<Float>()
    var i = 0
    while i < k16 { a = a.addingProduct(load16(type, w, b &+ i), x16(x, i)); i &+= 16 }
    finish(a, type, w, b, k16, k, x, y)
}

@inline(__always)
func kernel(_ type: AVX512WeightType, w: UnsafeRawPointer, k: Int, x: UnsafePointer<Float>,
            rows: Range<Int>, tokens: Int, y: UnsafeMutablePointer<Float>, ldy: Int) {
    let k16 = k & ~15
    var t = 0
    while t &+ 4 <= tokens {
        let x0 = x + t &* k, x1 = x0 + k, x2 = x1 + k, x3 = x2 + k
        let y0 = y + t &* ldy, y1 = y0 + ldy, y2 = y1 + ldy, y3 = y2 + ldy
        var o = rows.lowerBound
        while o &+ 4 <= rows.upperBound {
            let b0 = o &* k, b1 = b0 &+ k, b2 = b1 &+ k, b3 = b2 &+ k
            var a00 = SIMD16<Float>(), a01 = SIMD16<Float>(), a02 = SIMD16<Float>(), a03 = SIMD16<Float>()
            var a10 = SIMD16<Float>(), a11 = SIMD16<Float>(), a12 = SIMD16<Float>(), a13 = SIMD16<Float>()
            var a20 = SIMD16<Float>(), a21 = SIMD16<Float>(), a22 = SIMD16<Float>(), a23 = SIMD16<Float>()
            var a30 = SIMD16<Float>(), a31 = SIMD16<Float>(), a32 = SIMD16<Float>(), a33 = SIMD16<Float>()
            var i = 0
            while i < k16 {
                let v0 = x16(x0, i), v1 = x16(x1, i), v2 = x16(x2, i), v3 = x16(x3, i)
                let w0 = load16(type, w, b0 &+ i)
                a00 = a00.addingProduct(w0, v0); a01 = a01.addingProduct(w0, v1); a02 = a02.addingProduct(w0, v2); a03 = a03.addingProduct(w0, v3)
                let w1 = load16(type, w, b1 &+ i)
                a10 = a10.addingProduct(w1, v0); a11 = a11.addingProduct(w1, v1); a12 = a12.addingProduct(w1, v2); a13 = a13.addingProduct(w1, v3)
                let w2 = load16(type, w, b2 &+ i)
                a20 = a20.addingProduct(w2, v0); a21 = a21.addingProduct(w2, v1); a22 = a22.addingProduct(w2, v2); a23 = a23.addingProduct(w2, v3)
                let w3 = load16(type, w, b3 &+ i)
                a30 = a30.addingProduct(w3, v0); a31 = a31.addingProduct(w3, v1); a32 = a32.addingProduct(w3, v2); a33 = a33.addingProduct(w3, v3)
                i &+= 16
            }
            finish(a00, type, w, b0, k16, k, x0, y0 + o); finish(a01, type, w, b0, k16, k, x1, y1 + o)
            finish(a02, type, w, b0, k16, k, x2, y2 + o); finish(a03, type, w, b0, k16, k, x3, y3 + o)
            finish(a10, type, w, b1, k16, k, x0, y0 + o + 1); finish(a11, type, w, b1, k16, k, x1, y1 + o + 1)
            finish(a12, type, w, b1, k16, k, x2, y2 + o + 1); finish(a13, type, w, b1, k16, k, x3, y3 + o + 1)
            finish(a20, type, w, b2, k16, k, x0, y0 + o + 2); finish(a21, type, w, b2, k16, k, x1, y1 + o + 2)
            finish(a22, type, w, b2, k16, k, x2, y2 + o + 2); finish(a23, type, w, b2, k16, k, x3, y3 + o + 2)
            finish(a30, type, w, b3, k16, k, x0, y0 + o + 3); finish(a31, type, w, b3, k16, k, x1, y1 + o + 3)
            finish(a32, type, w, b3, k16, k, x2, y2 + o + 3); finish(a33, type, w, b3, k16, k, x3, y3 + o + 3)
            o &+= 4
        }
        for r in o..<rows.upperBound {
            for j in 0..<4 { single(type, w, r, k, k16, x + (t &+ j) &* k, y + (t &+ j) &* ldy + r) }
        }
        t &+= 4
    }
    while t < tokens {
        let x0 = x + t &* k, y0 = y + t &* ldy
        var o = rows.lowerBound
        while o &+ 4 <= rows.upperBound {
            let b0 = o &* k, b1 = b0 &+ k, b2 = b1 &+ k, b3 = b2 &+ k
            var a0 = SIMD16<Float>(), a1 = SIMD16<Float>(), a2 = SIMD16<Float>(), a3 = SIMD16<Float>()
            var i = 0
            while i < k16 {
                let v = x16(x0, i)
                a0 = a0.addingProduct(load16(type, w, b0 &+ i), v)
                a1 = a1.addingProduct(load16(type, w, b1 &+ i), v)
                a2 = a2.addingProduct(load16(type, w, b2 &+ i), v)
                a3 = a3.addingProduct(load16(type, w, b3 &+ i), v)
                i &+= 16
            }
            finish(a0, type, w, b0, k16, k, x0, y0 + o)
            finish(a1, type, w, b1, k16, k, x0, y0 + o + 1)
            finish(a2, type, w, b2, k16, k, x0, y0 + o + 2)
            finish(a3, type, w, b3, k16, k, x0, y0 + o + 3)
            o &+= 4
        }
        for r in o..<rows.upperBound { single(type, w, r, k, k16, x0, y0 + r) }
        t &+= 1
    }
}

/// Y[t, o] = X[t, :] . W[o, :] for o in `rows` and every token; weights [outDim, k] of `type`.
public func avx512Matmul(type: AVX512WeightType, w: UnsafeRawPointer, k: Int, x: UnsafePointer<Float>, tokens: Int,
                         rows: Range<Int>, y: UnsafeMutablePointer<Float>, ldy: Int) {
    switch type {
    case .f32: kernel(.f32, w: w, k: k, x: x, rows: rows, tokens: tokens, y: y, ldy: ldy)
    case .f16: kernel(.f16, w: w, k: k, x: x, rows: rows, tokens: tokens, y: y, ldy: ldy)
    case .bf16: kernel(.bf16, w: w, k: k, x: x, rows: rows, tokens: tokens, y: y, ldy: ldy)
    }
}
