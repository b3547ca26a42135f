/// Element types of stored tensors: floats, and llama.cpp's blocks of 32 values sharing an f16
/// scale: Q8_0 (int8 values, 34 bytes) and Q4_0 (4-bit values offset by 8, 18 bytes).
public enum DType: String, Sendable, CaseIterable {
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"
    case q8_0 = "Q8_0"
    case q4_0 = "Q4_0"

    /// Bytes per element of a float type (safetensors holds only these).
    public var byteSize: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
        case .q8_0, .q4_0: return 0
        }
    }

    public var isFloat: Bool { self == .f32 || self == .f16 || self == .bf16 }

    /// Elements per block and bytes per block.
    public var blockSize: Int { isFloat ? 1 : 32 }
    public var blockBytes: Int {
        switch self {
        case .q8_0: return 34
        case .q4_0: return 18
        default: return byteSize
        }
    }

    /// Widens `n` stored values (a whole number of blocks for the quantized types) to f32.
    public func dequantize(_ src: UnsafeRawPointer, count n: Int, into out: UnsafeMutablePointer<Float>) {
        switch self {
        case .f32: for i in 0..<n { out[i] = src.loadUnaligned(fromByteOffset: 4 * i, as: Float.self) }
        case .f16: for i in 0..<n { out[i] = Half.f16ToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .bf16: for i in 0..<n { out[i] = Half.bf16ToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .q8_0:
            for b in 0..<(n / 32) {
                let block = src + 34 * b
                let d = Half.f16ToFloat(block.loadUnaligned(as: UInt16.self))
                for j in 0..<32 { out[32 * b + j] = d * Float(block.load(fromByteOffset: 2 + j, as: Int8.self)) }
            }
        case .q4_0:
            // Byte j holds element j in its low nibble and element j + 16 in its high one.
            for b in 0..<(n / 32) {
                let block = src + 18 * b
                let d = Half.f16ToFloat(block.loadUnaligned(as: UInt16.self))
                for j in 0..<16 {
                    let q = block.load(fromByteOffset: 2 + j, as: UInt8.self)
                    out[32 * b + j] = d * Float(Int(q & 0x0F) - 8)
                    out[32 * b + j + 16] = d * Float(Int(q >> 4) - 8)
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
}
