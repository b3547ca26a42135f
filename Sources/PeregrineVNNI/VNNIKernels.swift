#if arch(x86_64)
import Builtin
import PeregrineInt8
import _Builtin_intrinsics.intel

/// AVX-512 VNNI's vpdpbusd (unsigned bytes x signed bytes, four products summed into each int32
/// lane) for the integer kernels. It gives each lane the same exact sum as AVX2's maddubs + madd.
public enum VNNIDot: Int8Dot {
    @inlinable @inline(__always)
    static func dpbusd(_ acc: __m256i, _ a: __m256i, _ b: __m256i) -> __m256i {
        let x = unsafeBitCast(acc, to: SIMD8<Int32>.self), y = unsafeBitCast(a, to: SIMD8<Int32>.self)
        let z = unsafeBitCast(b, to: SIMD8<Int32>.self)
        var s = SIMD8<Int32>()
        s._storage._value = Builtin.int_x86_avx512_vpdpbusd_256(x._storage._value, y._storage._value, z._storage._value)
        return unsafeBitCast(s, to: __m256i.self)
    }

    @inlinable @inline(__always)
    public static func signed(_ x: __m256i, _ y: __m256i) -> __m256i {
        dpbusd(_mm256_setzero_si256(), _mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
    }

    @inlinable @inline(__always)
    public static func unsigned(_ x: __m256i, _ y: __m256i, _ scales: __m256i) -> __m256i {
        // The int16 scale repeated in both halves of a lane, as an int32.
        let scale = _mm256_srai_epi32(_mm256_slli_epi32(scales, 16), 16)
        return _mm256_mullo_epi32(dpbusd(_mm256_setzero_si256(), x, y), scale)
    }
}

extension VNNIDot: RowGroupDot {
    /// One `vpdpbusd` a chunk, whatever the values' width: it sums in 32 bits.
    @inlinable @inline(__always)
    public static func dot(_ q: Int8Kernels.Vectors8, _ x: UnsafeRawPointer, bits: Int) -> __m256i {
        chain(chain(_mm256_setzero_si256(), (q.0, q.1, q.2, q.3), x), (q.4, q.5, q.6, q.7), x + 16)
    }

    @inlinable @inline(__always)
    public static func dot(_ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer, bits: Int) -> __m256i {
        chain(_mm256_setzero_si256(), q, x)
    }

    /// Four chunks added to `s` in order.
    @inlinable @inline(__always)
    static func chain(_ s: __m256i, _ q: RowGroupKernels.Vectors4, _ x: UnsafeRawPointer) -> __m256i {
        @inline(__always) func b(_ u: Int) -> __m256i { RowGroupKernels.broadcast(x, u) }
        return dpbusd(dpbusd(dpbusd(dpbusd(s, q.0, b(0)), q.1, b(1)), q.2, b(2)), q.3, b(3))
    }
}

public enum VNNIKernels {
    /// `Int8Kernels.rows` with VNNI products; call only where the CPU has AVX-512 VNNI and VL.
    public static func rows(_ type: Int8WeightType, w: UnsafeRawPointer, rowBytes: Int, a: UnsafeRawPointer, stride: Int, k: Int,
                            tokens: Int, rows: Range<Int>, bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, ldy: Int) {
        Int8Kernels.rows(type, dot: VNNIDot.self, w: w, rowBytes: rowBytes, a: a, stride: stride, k: k, tokens: tokens, rows: rows,
                         bias: bias, y: y, ldy: ldy)
    }

    /// `RowGroupKernels.groups` with VNNI products; `wide`: tiles of eight tokens on pairs of
    /// groups go through the 512-bit kernels (`WideRowGroupKernels`, the same bits).
    public static func groups(_ type: Int8WeightType, w: UnsafeRawPointer, k: Int, a: UnsafeRawPointer, stride: Int, tokens: Int,
                              groups: Range<Int>, bias: UnsafePointer<Float>?, y: UnsafeMutablePointer<Float>, ldy: Int, wide: Bool) {
        let tiled = wide && groups.count >= 2 ? tokens & ~7 : 0
        if tiled > 0 {
            WideRowGroupKernels.groups(type, w: w, k: k, a: a, stride: stride, tokens: tiled, groups: groups, bias: bias, y: y, ldy: ldy)
        }
        if tiled < tokens {
            RowGroupKernels.groups(type, dot: VNNIDot.self, w: w, k: k, a: a + tiled &* stride, stride: stride, tokens: tokens &- tiled,
                                   groups: groups, bias: bias, y: y + tiled &* ldy, ldy: ldy)
        }
    }

    public static func rowDot(_ type: Int8WeightType, _ row: UnsafeRawPointer, _ a: UnsafeRawPointer, _ k: Int) -> Float {
        Int8Kernels.rowDot(type, dot: VNNIDot.self, row, a, k)
    }
}
#endif
