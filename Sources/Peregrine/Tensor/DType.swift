import PeregrineInt8

/// Element types of stored tensors: floats, and llama.cpp's quantized blocks. The 32-value
/// blocks share an f16 scale (and, for the `_1` types, an f16 offset); the k-quants pack 256
/// values into sub-blocks whose scales are themselves quantized against f16 super-block scales.
/// The IQ4 types store 4-bit indices into a fixed table of 16 unevenly spaced levels (denser
/// near zero, where trained weights cluster) instead of evenly spaced integers.
/// Layouts are ggml's byte for byte, so GGUF tensor data is used in place.
public enum DType: String, Sendable, CaseIterable {
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"
    case q8_0 = "Q8_0"
    case q4_0 = "Q4_0"
    case q4_1 = "Q4_1"
    case q5_0 = "Q5_0"
    case q5_1 = "Q5_1"
    case q4_K = "Q4_K"
    case q5_K = "Q5_K"
    case q6_K = "Q6_K"
    case iq4_nl = "IQ4_NL"
    case iq4_xs = "IQ4_XS"
    case q3_K = "Q3_K"
    case q2_K = "Q2_K"

    /// Bytes per element of a float type (safetensors holds only these).
    public var byteSize: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        default: return 0
        }
    }

    public var isFloat: Bool { self == .f32 || self == .f16 || self == .bf16 }

    /// Elements per block and bytes per block.
    public var blockSize: Int {
        switch self {
        case .f32, .f16, .bf16: return 1
        case .q8_0, .q4_0, .q4_1, .q5_0, .q5_1: return 32
        case .q4_K, .q5_K, .q6_K: return 256
        case .iq4_nl: return 32
        case .iq4_xs: return 256
        case .q3_K, .q2_K: return 256
        }
    }

    public var blockBytes: Int {
        switch self {
        case .f32, .f16, .bf16: return byteSize
        case .q8_0: return 34
        case .q4_0: return 18
        case .q4_1: return 20
        case .q5_0: return 22
        case .q5_1: return 24
        case .q4_K: return 144
        case .q5_K: return 176
        case .q6_K: return 210
        case .iq4_nl: return 18
        case .iq4_xs: return 136
        case .q3_K: return 110
        case .q2_K: return 84
        }
    }

    /// Bits of storage per weight.
    public var bitsPerWeight: Double { Double(blockBytes * 8) / Double(blockSize) }

    /// Bytes of `count` values (a whole number of blocks).
    public func byteCount(elements count: Int) -> Int { count / blockSize * blockBytes }

    /// Widens `n` stored values (a whole number of blocks for the quantized types) to f32. The
    /// reference for the SIMD kernels, and the path for embedding rows.
    public func dequantize(_ src: UnsafeRawPointer, count n: Int, into out: UnsafeMutablePointer<Float>) {
        @inline(__always) func f16(_ p: UnsafeRawPointer, _ o: Int) -> Float { Half.f16ToFloat(p.loadUnaligned(fromByteOffset: o, as: UInt16.self)) }
        @inline(__always) func u8(_ p: UnsafeRawPointer, _ o: Int) -> Int { Int(p.load(fromByteOffset: o, as: UInt8.self)) }
        switch self {
        case .f32: for i in 0..<n { out[i] = src.loadUnaligned(fromByteOffset: 4 * i, as: Float.self) }
        case .f16: for i in 0..<n { out[i] = f16(src, 2 * i) }
        case .bf16: for i in 0..<n { out[i] = Half.bf16ToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .q8_0:
            for b in 0..<(n / 32) {
                let block = src + 34 * b
                let d = f16(block, 0)
                for j in 0..<32 { out[32 * b + j] = d * Float(block.load(fromByteOffset: 2 + j, as: Int8.self)) }
            }
        case .q4_0, .q4_1, .q5_0, .q5_1:
            // Byte j of the 16 holds element j in its low nibble and element j + 16 in its high
            // one; the 5-bit types keep each element's fifth bit in a 32-bit mask.
            let bytes = blockBytes
            let hasMin = self == .q4_1 || self == .q5_1
            let five = self == .q5_0 || self == .q5_1
            let qsOffset = (hasMin ? 4 : 2) + (five ? 4 : 0)
            for b in 0..<(n / 32) {
                let block = src + bytes * b
                let d = f16(block, 0)
                let m = hasMin ? f16(block, 2) : 0
                let qh = five ? Int(block.loadUnaligned(fromByteOffset: hasMin ? 4 : 2, as: UInt32.self)) : 0
                let offset = hasMin ? 0 : (five ? 16 : 8)
                for j in 0..<16 {
                    let q = u8(block, qsOffset + j)
                    let lo = (q & 0x0F) | (((qh >> j) & 1) << 4)
                    let hi = (q >> 4) | (((qh >> (j + 16)) & 1) << 4)
                    out[32 * b + j] = d * Float(lo - offset) + m
                    out[32 * b + j + 16] = d * Float(hi - offset) + m
                }
            }
        case .q4_K, .q5_K:
            // Eight sub-blocks of 32, each with a 6-bit scale and min; 64 values per 32 bytes
            // of nibbles (the low nibbles are one sub-block, the high nibbles the next).
            let five = self == .q5_K
            for b in 0..<(n / 256) {
                let block = src + blockBytes * b
                let d = f16(block, 0), dmin = f16(block, 2)
                let qs = five ? 48 : 16
                for c in 0..<4 {
                    let (sc0, m0) = KQuant.scaleMin(block + 4, 2 * c)
                    let (sc1, m1) = KQuant.scaleMin(block + 4, 2 * c + 1)
                    for l in 0..<32 {
                        let q = u8(block, qs + 32 * c + l)
                        let h = five ? u8(block, 16 + l) >> (2 * c) : 0
                        let lo = (q & 0x0F) | ((h & 1) << 4), hi = (q >> 4) | ((h & 2) << 3)
                        out[256 * b + 64 * c + l] = d * Float(sc0) * Float(lo) - dmin * Float(m0)
                        out[256 * b + 64 * c + 32 + l] = d * Float(sc1) * Float(hi) - dmin * Float(m1)
                    }
                }
            }
        case .q6_K:
            // 16 sub-blocks of 16 with int8 scales; each value's low 4 bits in ql, high 2 in qh.
            for b in 0..<(n / 256) {
                let block = src + 210 * b
                let d = f16(block, 208)
                for half in 0..<2 {
                    let ql = 64 * half, qh = 128 + 32 * half, sc = 192 + 8 * half
                    for l in 0..<32 {
                        let h = u8(block, qh + l)
                        let q0 = (u8(block, ql + l) & 0x0F) | ((h & 3) << 4)
                        let q1 = (u8(block, ql + l + 32) & 0x0F) | (((h >> 2) & 3) << 4)
                        let q2 = (u8(block, ql + l) >> 4) | (((h >> 4) & 3) << 4)
                        let q3 = (u8(block, ql + l + 32) >> 4) | (((h >> 6) & 3) << 4)
                        let s = { (i: Int) in Float(block.load(fromByteOffset: sc + i, as: Int8.self)) }
                        let base = 256 * b + 128 * half + l
                        out[base] = d * s(l / 16) * Float(q0 - 32)
                        out[base + 32] = d * s(l / 16 + 2) * Float(q1 - 32)
                        out[base + 64] = d * s(l / 16 + 4) * Float(q2 - 32)
                        out[base + 96] = d * s(l / 16 + 6) * Float(q3 - 32)
                    }
                }
            }
        case .iq4_nl:
            // f16 scale, then byte j: element j's table index low, element j + 16's high.
            for b in 0..<(n / 32) {
                let block = src + 18 * b
                let d = f16(block, 0)
                for j in 0..<16 {
                    let q = u8(block, 2 + j)
                    out[32 * b + j] = d * Float(IQ4.levels[q & 0x0F])
                    out[32 * b + j + 16] = d * Float(IQ4.levels[q >> 4])
                }
            }
        case .iq4_xs:
            // f16 d, then eight 6-bit sub-block scales (offset by 32), then the IQ4_NL nibble
            // layout for each sub-block of 32.
            for b in 0..<(n / 256) {
                let block = src + 136 * b
                let d = f16(block, 0)
                for s in 0..<8 {
                    let dl = d * Float(IQ4.subScale(block, s))
                    for j in 0..<16 {
                        let q = u8(block, 8 + 16 * s + j)
                        out[256 * b + 32 * s + j] = dl * Float(IQ4.levels[q & 0x0F])
                        out[256 * b + 32 * s + j + 16] = dl * Float(IQ4.levels[q >> 4])
                    }
                }
            }
        case .q3_K:
            // 16 sub-blocks of 16 with signed 6-bit scales; each value's low 2 bits in qs (byte
            // 32h + l holds values 128h + 32s + l at bits 2s), its third bit in hmask (byte l,
            // bit 4h + s), stored offset by 4.
            for b in 0..<(n / 256) {
                let block = src + 110 * b
                let d = f16(block, 108)
                for h in 0..<2 {
                    for s in 0..<4 {
                        for l in 0..<32 {
                            let low = (u8(block, 32 + 32 * h + l) >> (2 * s)) & 3
                            let high = (u8(block, l) >> (4 * h + s)) & 1
                            let scale = d * Float(KQuant.q3Scale(block + 96, 8 * h + 2 * s + l / 16))
                            out[256 * b + 128 * h + 32 * s + l] = scale * Float((low | high << 2) - 4)
                        }
                    }
                }
            }
        case .q2_K:
            // 16 sub-blocks of 16, each with a 4-bit scale (low nibble) and min (high nibble);
            // 2-bit values laid out as Q3_K's low bits.
            for b in 0..<(n / 256) {
                let block = src + 84 * b
                let d = f16(block, 80), dmin = f16(block, 82)
                for h in 0..<2 {
                    for s in 0..<4 {
                        for l in 0..<32 {
                            let q = (u8(block, 16 + 32 * h + l) >> (2 * s)) & 3
                            let sm = u8(block, 8 * h + 2 * s + l / 16)
                            out[256 * b + 128 * h + 32 * s + l] = d * Float(sm & 15) * Float(q) - dmin * Float(sm >> 4)
                        }
                    }
                }
            }
        }
    }

    /// The name torch and transformers use in config.json's `torch_dtype`.
    public init?(torchName: String) {
        switch torchName {
        case "float32": self = .f32
        case "float16": self = .f16
        case "bfloat16": self = .bf16
        default: return nil
        }
    }
}

/// Scalar conversions for the 16-bit formats. BF16 is the top half of an IEEE f32, rounded to
/// nearest-even when narrowing.
public enum Half {
    @inline(__always) public static func bf16ToFloat(_ b: UInt16) -> Float {
        Float(bitPattern: UInt32(b) << 16)
    }

    @inline(__always) public static func floatToBF16(_ f: Float) -> UInt16 {
        let bits = f.bitPattern
        if f.isNaN { return UInt16(bits >> 16) | 0x40 }
        let rounding = ((bits >> 16) & 1) &+ 0x7FFF
        return UInt16((bits &+ rounding) >> 16)
    }

    @inline(__always) public static func f16ToFloat(_ h: UInt16) -> Float {
        Float(Float16(bitPattern: h))
    }

    @inline(__always) public static func floatToF16(_ f: Float) -> UInt16 {
        Float16(f).bitPattern
    }
}

/// A typed view of tensor bytes that lives elsewhere (in a mapped file or an owned buffer).
public struct TensorView: @unchecked Sendable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    public let data: UnsafeRawPointer
    public let byteCount: Int

    public var elementCount: Int { shape.reduce(1, *) }

    /// Copies the tensor out as f32 (used for small tensors: norms, biases; and in tests).
    public func toFloat() -> [Float] {
        let n = elementCount
        return [Float](unsafeUninitializedCapacity: n) { buf, count in
            dtype.dequantize(data, count: n, into: buf.baseAddress!)
            count = n
        }
    }
    /// Rows `range` of a matrix (outermost dimension first) as a view of the same bytes: a
    /// matrix's rows lie one after another in every stored type, whole blocks included. Nil when
    /// the rows do not split the tensor's bytes evenly (a row not of whole blocks).
    public func rows(_ range: Range<Int>, name: String) -> TensorView? {
        guard shape.count == 2, range.lowerBound >= 0, range.upperBound <= shape[0], shape[1] % dtype.blockSize == 0,
              dtype.byteCount(elements: shape[1]) * shape[0] == byteCount else { return nil }
        let rowBytes = dtype.byteCount(elements: shape[1])
        return TensorView(name: name, dtype: dtype, shape: [range.count, shape[1]], data: data + range.lowerBound * rowBytes,
                          byteCount: range.count * rowBytes)
    }
}
