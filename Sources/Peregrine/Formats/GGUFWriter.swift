#if canImport(Glibc)
import Glibc
#endif

/// Writes a GGUF file (version 3) as llama.cpp reads it: metadata with explicit value types,
/// tensor infos, then each tensor's data aligned. Tensor data is produced one tensor at a time
/// (a model never has to be in memory at once), into a temporary file renamed into place at
/// the end, so a failure leaves no partial output.
public struct GGUFWriter {
    public enum Value {
        case u32(UInt32), i32(Int32), u64(UInt64), f32(Float), bool(Bool), string(String)
        case strings([String]), i32s([Int32]), f32s([Float])
        /// A value copied from another GGUF file: its type tag and bytes as stored.
        case raw([UInt8])
    }

    public struct Tensor {
        public let name: String
        /// Dimensions in ggml order (innermost first).
        public let dims: [Int]
        public let type: GGUFFile.TensorType
        /// Fills exactly `byteCount` bytes.
        public let fill: (UnsafeMutableRawBufferPointer) throws -> Void

        public init(name: String, dims: [Int], type: GGUFFile.TensorType, fill: @escaping (UnsafeMutableRawBufferPointer) throws -> Void) {
            self.name = name
            self.dims = dims
            self.type = type
            self.fill = fill
        }

        public var byteCount: Int { dims.reduce(1, *) / type.blockSize * type.bytesPerBlock }
    }

    public var metadata: [(String, Value)] = []
    public var tensors: [Tensor] = []
    public let alignment = 32
    /// Pads the last tensor's data to the alignment too. llama.cpp's reader needs it where it
    /// reads the data section into memory (an imatrix file) rather than mapping it; model files
    /// keep the layout they have always had.
    public var padsLastTensor = false

    public init() {}

    public mutating func set(_ key: String, _ value: Value) {
        if let i = metadata.firstIndex(where: { $0.0 == key }) { metadata[i].1 = value } else { metadata.append((key, value)) }
    }

    /// Writes the file; `progress` is called before each tensor is produced.
    public func write(to path: String, progress: (Int, Tensor) -> Void = { _, _ in }) throws {
        var header = ByteWriter()
        header.u32(0x4655_4747)
        header.u32(3)
        header.u64(UInt64(tensors.count))
        header.u64(UInt64(metadata.count))
        for (key, value) in metadata {
            header.string(key)
            header.value(value)
        }
        var offset = 0
        for t in tensors {
            guard t.dims[0] % t.type.blockSize == 0 else {
                throw PeregrineError.invalidArgument("tensor '\(t.name)': rows of \(t.dims[0]) values do not divide into \(t.type.name) blocks")
            }
            header.string(t.name)
            header.u32(UInt32(t.dims.count))
            for d in t.dims { header.u64(UInt64(d)) }
            header.u32(t.type.rawValue)
            header.u64(UInt64(offset))
            offset = (offset + t.byteCount + alignment - 1) / alignment * alignment
        }
        header.pad(to: alignment)

        let partial = path + ".partial"
        guard let f = fopen(partial, "wb") else { throw PeregrineError.io("\(path): cannot create the file (\(String(cString: strerror(errno))))") }
        var done = false
        defer {
            fclose(f)
            if !done { unlink(partial) }
        }
        func put(_ p: UnsafeRawPointer, _ n: Int) throws {
            guard n == 0 || fwrite(p, 1, n, f) == n else { throw PeregrineError.io("\(path): write failed (\(String(cString: strerror(errno))))") }
        }
        try header.bytes.withUnsafeBytes { try put($0.baseAddress!, $0.count) }
        let zeros = [UInt8](repeating: 0, count: alignment)
        for (i, t) in tensors.enumerated() {
            progress(i, t)
            let n = t.byteCount
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: max(n, 1), alignment: 64)
            defer { buffer.deallocate() }
            try t.fill(UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n]))
            try put(buffer.baseAddress!, n)
            let padding = (alignment - n % alignment) % alignment
            if i + 1 < tensors.count || padsLastTensor { try zeros.withUnsafeBytes { try put($0.baseAddress!, padding) } }
        }
        guard fflush(f) == 0 else { throw PeregrineError.io("\(path): write failed (\(String(cString: strerror(errno))))") }
        guard rename(partial, path) == 0 else { throw PeregrineError.io("\(path): cannot rename into place (\(String(cString: strerror(errno))))") }
        done = true
    }
}

/// Little-endian encoding of GGUF header fields.
struct ByteWriter {
    var bytes: [UInt8] = []

    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes.append(contentsOf: $0) } }
    mutating func string(_ s: String) {
        u64(UInt64(s.utf8.count))
        bytes.append(contentsOf: s.utf8)
    }
    mutating func pad(to alignment: Int) {
        while bytes.count % alignment != 0 { bytes.append(0) }
    }

    /// A value with its type tag (ggml's gguf_type numbers).
    mutating func value(_ v: GGUFWriter.Value) {
        switch v {
        case .u32(let x): u32(4); u32(x)
        case .i32(let x): u32(5); u32(UInt32(bitPattern: x))
        case .u64(let x): u32(10); u64(x)
        case .f32(let x): u32(6); u32(x.bitPattern)
        case .bool(let x): u32(7); bytes.append(x ? 1 : 0)
        case .string(let s): u32(8); string(s)
        case .strings(let a): u32(9); u32(8); u64(UInt64(a.count)); for s in a { string(s) }
        case .i32s(let a): u32(9); u32(5); u64(UInt64(a.count)); for x in a { u32(UInt32(bitPattern: x)) }
        case .f32s(let a): u32(9); u32(6); u64(UInt64(a.count)); for x in a { u32(x.bitPattern) }
        case .raw(let r): bytes.append(contentsOf: r)
        }
    }
}
