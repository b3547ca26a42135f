/// A safetensors file, memory-mapped. The header is validated against the file before any tensor
/// is handed out: known dtypes, shapes that match byte lengths, offsets inside the data section,
/// and no two tensors sharing bytes.
public final class SafeTensorsFile: @unchecked Sendable {
    public struct Entry {
        public let dtype: DType
        public let shape: [Int]
        public let begin: Int
        public let end: Int
    }

    public let path: String
    public let file: MappedFile
    public let entries: [String: Entry]
    public let names: [String]
    public let metadata: [String: String]
    private let dataStart: Int

    static let maxHeaderBytes = 100 << 20

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        let bytes = file.bytes
        func bad(_ m: String) -> PeregrineError { .format("\(path): invalid safetensors file: \(m)") }
        guard bytes.count >= 8 else { throw bad("file is \(bytes.count) bytes, shorter than the 8-byte header length") }
        let headerLen = bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
        guard headerLen <= UInt64(SafeTensorsFile.maxHeaderBytes) else { throw bad("header length \(headerLen) is implausibly large") }
        guard Int(headerLen) <= bytes.count - 8 else {
            throw bad("header length \(headerLen) runs past the end of the file (\(bytes.count) bytes)")
        }
        dataStart = 8 + Int(headerLen)
        let header: JSONValue
        do { header = try JSON.parse(UnsafeRawBufferPointer(rebasing: bytes[8..<dataStart])) } catch let e as JSONError {
            throw bad("header: \(e.description)")
        }
        guard let obj = header.object else { throw bad("header is not a JSON object") }
        let dataSize = bytes.count - dataStart
        var entries: [String: Entry] = [:]
        var names: [String] = []
        var metadata: [String: String] = [:]
        for (name, value) in obj.pairs {
            if name == "__metadata__" {
                if let m = value.object { for (k, v) in m.pairs { if let s = v.string { metadata[k] = s } } }
                continue
            }
            guard let t = value.object else { throw bad("tensor '\(name)' is not an object") }
            guard let dtName = t["dtype"]?.string else { throw bad("tensor '\(name)' has no dtype") }
            guard let dtype = DType(rawValue: dtName), dtype.isFloat else {
                throw bad("tensor '\(name)' has unsupported dtype \(dtName) (supported: F32, F16, BF16)")
            }
            guard let shapeArr = t["shape"]?.array else { throw bad("tensor '\(name)' has no shape") }
            var shape: [Int] = []
            var count = 1
            for d in shapeArr {
                guard let n = d.int, n >= 0, n < (1 << 40) else { throw bad("tensor '\(name)' has an invalid shape") }
                shape.append(n)
                let (m, o) = count.multipliedReportingOverflow(by: n)
                guard !o, m < (1 << 48) else { throw bad("tensor '\(name)' shape is too large") }
                count = m
            }
            guard let offs = t["data_offsets"]?.array, offs.count == 2, let b = offs[0].int, let e = offs[1].int else {
                throw bad("tensor '\(name)' has no valid data_offsets")
            }
            guard b >= 0, e >= b, e <= dataSize else {
                throw bad("tensor '\(name)' data [\(b), \(e)) lies outside the \(dataSize)-byte data section")
            }
            guard e - b == count * dtype.byteSize else {
                throw bad("tensor '\(name)' has shape \(shape) of \(dtName) (\(count * dtype.byteSize) bytes) but \(e - b) bytes of data")
            }
            entries[name] = Entry(dtype: dtype, shape: shape, begin: b, end: e)
            names.append(name)
        }
        let sorted = entries.sorted { $0.value.begin < $1.value.begin }
        for i in sorted.indices.dropFirst() where sorted[i].value.begin < sorted[i - 1].value.end {
            throw bad("tensors '\(sorted[i - 1].key)' and '\(sorted[i].key)' overlap")
        }
        self.entries = entries
        self.names = names
        self.metadata = metadata
    }

    public func tensor(_ name: String) -> TensorView? {
        guard let e = entries[name], let base = file.base else {
            if let e = entries[name], e.end == e.begin {
                // Zero-sized tensor in a file with no data: give a valid dangling pointer.
                return TensorView(name: name, dtype: e.dtype, shape: e.shape, data: UnsafeRawPointer(bitPattern: 16)!, byteCount: 0)
            }
            return nil
        }
        return TensorView(name: name, dtype: e.dtype, shape: e.shape, data: base + dataStart + e.begin, byteCount: e.end - e.begin)
    }
}

/// Where a model's tensors come from, by Hugging Face name.
public protocol WeightSource: AnyObject {
    func tensor(_ name: String) -> TensorView?
    /// The name the file itself uses for a tensor, for error messages.
    func storedName(_ name: String) -> String
    /// Why a tensor the model needs is not available, for error messages.
    func missingReason(_ name: String) -> String
    func contains(_ name: String) -> Bool
}

extension WeightSource {
    public func storedName(_ name: String) -> String { name }
    public func missingReason(_ name: String) -> String { "missing tensor '\(storedName(name))'" }

    public func contains(_ name: String) -> Bool { tensor(name) != nil }

    /// A tensor that must exist with the given shape (outermost dimension first).
    public func require(_ name: String, shape: [Int]) throws -> TensorView {
        guard let t = tensor(name) else { throw PeregrineError.format(missingReason(name)) }
        guard t.shape == shape else {
            throw PeregrineError.format("tensor '\(storedName(name))' has shape \(t.shape), expected \(shape)")
        }
        return t
    }
}

/// All the weights of a model directory: model.safetensors, or shards listed by
/// model.safetensors.index.json.
public final class WeightStore: WeightSource, @unchecked Sendable {
    public let files: [SafeTensorsFile]
    private var location: [String: Int] = [:]

    public init(directory: String) throws {
        let single = FileSystem.join(directory, "model.safetensors")
        let index = FileSystem.join(directory, "model.safetensors.index.json")
        var paths: [String] = []
        if FileSystem.exists(index) {
            let json = try FileSystem.readJSON(index)
            guard let map = json["weight_map"]?.object else {
                throw PeregrineError.format("\(index): no weight_map object")
            }
            var seen = Set<String>()
            for (_, v) in map.pairs {
                guard let f = v.string, !f.contains("/") else { throw PeregrineError.format("\(index): invalid shard name") }
                if seen.insert(f).inserted { paths.append(FileSystem.join(directory, f)) }
            }
        } else if FileSystem.exists(single) {
            paths = [single]
        } else {
            throw PeregrineError.io("\(directory): no model.safetensors or model.safetensors.index.json")
        }
        files = try paths.map { try SafeTensorsFile(path: $0) }
        for (i, f) in files.enumerated() {
            for n in f.names where location[n] == nil { location[n] = i }
        }
    }

    public var tensorNames: [String] { Array(location.keys) }

    public func tensor(_ name: String) -> TensorView? {
        guard let i = location[name] else { return nil }
        return files[i].tensor(name)
    }
}

/// The text model's weights inside a vision-language checkpoint, under the names a text-only
/// checkpoint gives them: "model.X" is "model.language_model.X" as transformers 5 saves it, or
/// "language_model.model.X" as earlier versions did; "lm_head.weight" likewise.
public final class LanguageModelWeights: WeightSource, @unchecked Sendable {
    let base: WeightSource

    public init(_ base: WeightSource) { self.base = base }

    func candidates(_ name: String) -> [String] {
        if name.hasPrefix("model.") {
            let rest = name.dropFirst("model.".count)
            return ["model.language_model." + rest, "language_model.model." + rest]
        }
        return [name, "language_model." + name]
    }

    public func tensor(_ name: String) -> TensorView? {
        for n in candidates(name) { if let t = base.tensor(n) { return t } }
        return nil
    }

    public func storedName(_ name: String) -> String {
        candidates(name).first { base.contains($0) } ?? candidates(name)[0]
    }

    public func contains(_ name: String) -> Bool { candidates(name).contains { base.contains($0) } }
}
