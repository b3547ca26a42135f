/// Element types of stored tensors.
public enum DType: String, Sendable, CaseIterable {
    case f32 = "F32"
    case f16 = "F16"
    case bf16 = "BF16"

    public var byteSize: Int {
        switch self {
        case .f32: return 4
        case .f16, .bf16: return 2
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
        var out = [Float](repeating: 0, count: n)
        switch dtype {
        case .f32:
            out.withUnsafeMutableBytes { $0.copyMemory(from: UnsafeRawBufferPointer(start: data, count: n * 4)) }
        case .f16:
            for i in 0..<n { out[i] = Half.f16ToFloat(data.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        case .bf16:
            for i in 0..<n { out[i] = Half.bf16ToFloat(data.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self)) }
        }
        return out
    }
}
