/// A GGUF file (version 2 or 3, as llama.cpp writes it), memory-mapped. The header, metadata and
/// tensor infos are read and checked against the file before anything is handed out: known value
/// and tensor types, lengths and counts that fit in the file, shapes whose byte size does not
/// overflow, aligned tensor data inside the data section, and no two tensors sharing bytes.
public final class GGUFFile: @unchecked Sendable {
    public enum Value: Equatable, Sendable {
        case uint(UInt64)
        case int(Int64)
        case float(Double)
        case bool(Bool)
        case string(String)
        case array([Value])

        public var int: Int? {
            switch self {
            case .uint(let v): return v <= UInt64(Int.max) ? Int(v) : nil
            case .int(let v): return Int(v)
            default: return nil
            }
        }
        public var double: Double? {
            switch self {
            case .float(let v): return v
            case .uint, .int: return int.map(Double.init)
            default: return nil
            }
        }
        public var string: String? { if case .string(let s) = self { return s }; return nil }
        public var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
        public var array: [Value]? { if case .array(let a) = self { return a }; return nil }
    }

    /// The tensor element types of ggml, with their block size and bytes per block.
    public enum TensorType: UInt32, Sendable, CaseIterable {
        case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9
        case q2_K = 10, q3_K = 11, q4_K = 12, q5_K = 13, q6_K = 14, q8_K = 15, bf16 = 30
        case iq4_nl = 20, iq4_xs = 23

        public var blockSize: Int {
            switch self {
            case .f32, .f16, .bf16: return 1
            case .q4_0, .q4_1, .q5_0, .q5_1, .q8_0, .q8_1: return 32
            case .q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .q8_K: return 256
            case .iq4_nl: return 32
            case .iq4_xs: return 256
            }
        }

        public var bytesPerBlock: Int {
            switch self {
            case .f32: return 4
            case .f16, .bf16: return 2
            case .q4_0: return 18
            case .q4_1: return 20
            case .q5_0: return 22
            case .q5_1: return 24
            case .q8_0: return 34
            case .q8_1: return 36
            case .q2_K: return 84
            case .q3_K: return 110
            case .q4_K: return 144
            case .q5_K: return 176
            case .q6_K: return 210
            case .q8_K: return 292
            case .iq4_nl: return 18
            case .iq4_xs: return 136
            }
        }
    }

    public struct TensorInfo: Sendable {
        public let name: String
        /// Dimensions in ggml order: dims[0] is the innermost (contiguous) one.
        public let dims: [Int]
        public let type: TensorType
        /// Offset of the data from the start of the file.
        public let offset: Int
        public let byteCount: Int

        public var elementCount: Int { dims.reduce(1, *) }
    }

    public let path: String
    public let file: MappedFile
    public let version: UInt32
    public let alignment: Int
    public let metadata: [String: Value]
    public let metadataKeys: [String]
    /// Where each key's value (its type tag and bytes) lies in the file, so a writer can copy
    /// it with its exact width.
    public let rawMetadata: [String: Range<Int>]
    public let tensors: [TensorInfo]
    private let byName: [String: Int]

    static let maxStringBytes = 1 << 24
    static let maxArrayCount = 1 << 26

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        var r = BinaryReader(file.bytes, what: "\(path): invalid GGUF file")
        guard file.size >= 24 else { throw r.error("file is \(file.size) bytes, shorter than a GGUF header") }
        guard try r.u32() == 0x4655_4747 else { throw r.error("not a GGUF file (bad magic)") }
        version = try r.u32()
        guard version == 2 || version == 3 else { throw r.error("unsupported GGUF version \(version) (supported: 2, 3)") }
        let tensorCount = try r.u64()
        let kvCount = try r.u64()
        // Every tensor info and key/value takes well over 8 bytes: larger counts are lies.
        guard tensorCount <= UInt64(file.size / 8), kvCount <= UInt64(file.size / 8) else {
            throw r.error("tensor count \(tensorCount) or metadata count \(kvCount) cannot fit in the file")
        }
        var metadata: [String: Value] = [:]
        var rawMetadata: [String: Range<Int>] = [:]
        var keys: [String] = []
        for _ in 0..<Int(kvCount) {
            let key = try r.ggufString()
            let start = r.pos
            let type = try r.u32()
            let value = try r.ggufValue(type: type, depth: 0)
            if metadata.updateValue(value, forKey: key) == nil { keys.append(key) }
            rawMetadata[key] = start..<r.pos
        }
        self.metadata = metadata
        self.rawMetadata = rawMetadata
        metadataKeys = keys
        var alignment = 32
        if let a = metadata["general.alignment"] {
            guard let v = a.int, v > 0, v <= 1 << 20, v & (v - 1) == 0 else {
                throw r.error("general.alignment must be a power of two")
            }
            alignment = v
        }
        self.alignment = alignment
        var infos: [(String, [Int], TensorType, UInt64)] = []
        for _ in 0..<Int(tensorCount) {
            let name = try r.ggufString()
            let nDims = try r.u32()
            guard nDims >= 1, nDims <= 4 else { throw r.error("tensor '\(name)' has \(nDims) dimensions (1 to 4 allowed)") }
            var dims: [Int] = []
            for _ in 0..<nDims {
                let d = try r.u64()
                guard d > 0, d < 1 << 40 else { throw r.error("tensor '\(name)' has an invalid dimension \(d)") }
                dims.append(Int(d))
            }
            let rawType = try r.u32()
            guard let type = TensorType(rawValue: rawType) else {
                throw r.error("tensor '\(name)' has unsupported type \(rawType)")
            }
            let offset = try r.u64()
            infos.append((name, dims, type, offset))
        }
        let dataStart = (r.pos + alignment - 1) / alignment * alignment
        var tensors: [TensorInfo] = []
        var byName: [String: Int] = [:]
        for (name, dims, type, offset) in infos {
            func bad(_ m: String) -> PeregrineError { .format("\(path): invalid GGUF file: tensor '\(name)' \(m)") }
            var count = 1
            for d in dims {
                let (m, o) = count.multipliedReportingOverflow(by: d)
                guard !o, m < 1 << 48 else { throw bad("is too large") }
                count = m
            }
            guard dims[0] % type.blockSize == 0 else {
                throw bad("has a first dimension \(dims[0]) that is not a multiple of its block size \(type.blockSize)")
            }
            let bytes = count / type.blockSize * type.bytesPerBlock
            guard offset % UInt64(alignment) == 0 else { throw bad("data offset \(offset) is not aligned to \(alignment)") }
            guard offset <= UInt64(file.size), dataStart + Int(offset) + bytes <= file.size else {
                throw bad("data [\(offset), \(offset + UInt64(bytes))) runs past the end of the file")
            }
            guard byName[name] == nil else { throw bad("appears twice") }
            byName[name] = tensors.count
            tensors.append(TensorInfo(name: name, dims: dims, type: type, offset: dataStart + Int(offset), byteCount: bytes))
        }
        let sorted = tensors.sorted { $0.offset < $1.offset }
        for i in sorted.indices.dropFirst() where sorted[i].offset < sorted[i - 1].offset + sorted[i - 1].byteCount {
            throw PeregrineError.format("\(path): invalid GGUF file: tensors '\(sorted[i - 1].name)' and '\(sorted[i].name)' overlap")
        }
        self.tensors = tensors
        self.byName = byName
    }

    public func info(_ name: String) -> TensorInfo? { byName[name].map { tensors[$0] } }

    /// The bytes of a tensor, in place in the mapped file.
    public func data(_ name: String) -> UnsafeRawBufferPointer? {
        guard let t = info(name), let base = file.base else { return nil }
        return UnsafeRawBufferPointer(start: base + t.offset, count: t.byteCount)
    }

    /// A tensor of a type Peregrine computes with (every type but Q2_K, Q3_K and the activation
    /// formats Q8_1, Q8_K) as a `TensorView` (row-major shape, outermost first).
    public func view(_ name: String) -> TensorView? {
        guard let t = info(name), let base = file.base, let dtype = t.type.dtype else { return nil }
        return TensorView(name: name, dtype: dtype, shape: t.dims.reversed(), data: base + t.offset, byteCount: t.byteCount)
    }
}

extension GGUFFile.TensorType {
    /// The `DType` with the same layout, where Peregrine has kernels for it.
    public var dtype: DType? {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .q8_0: return .q8_0
        case .q4_0: return .q4_0
        case .q4_1: return .q4_1
        case .q5_0: return .q5_0
        case .q5_1: return .q5_1
        case .q4_K: return .q4_K
        case .q5_K: return .q5_K
        case .q6_K: return .q6_K
        case .iq4_nl: return .iq4_nl
        case .iq4_xs: return .iq4_xs
        case .q3_K: return .q3_K
        case .q2_K: return .q2_K
        case .q8_1, .q8_K: return nil
        }
    }

    public var name: String { String(describing: self).uppercased() }

    public init?(_ dtype: DType) {
        guard let t = Self.allCases.first(where: { $0.dtype == dtype }) else { return nil }
        self = t
    }
}

/// GGUF's strings and metadata values, read from the mapped header.
extension BinaryReader {
    mutating func ggufString() throws -> String {
        let n = try u64()
        guard n <= UInt64(GGUFFile.maxStringBytes), n <= UInt64(bytes.count - pos) else { throw error("string of \(n) bytes at byte \(pos)") }
        let start = try take(Int(n))
        return String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<(start + Int(n))]), as: UTF8.self)
    }

    mutating func ggufValue(type: UInt32, depth: Int) throws -> GGUFFile.Value {
        switch type {
        case 0: return .uint(UInt64(try u8()))
        case 1: return .int(Int64(Int8(bitPattern: try u8())))
        case 2: return .uint(UInt64(try u16()))
        case 3: return .int(Int64(Int16(bitPattern: try u16())))
        case 4: return .uint(UInt64(try u32()))
        case 5: return .int(Int64(Int32(bitPattern: try u32())))
        case 6: return .float(Double(Float(bitPattern: try u32())))
        case 7:
            let b = try u8()
            guard b <= 1 else { throw error("bool value \(b)") }
            return .bool(b == 1)
        case 8: return .string(try ggufString())
        case 9:
            guard depth < 4 else { throw error("arrays nested too deeply") }
            let elementType = try u32()
            let count = try u64()
            guard count <= UInt64(GGUFFile.maxArrayCount), count <= UInt64(bytes.count - pos) else {
                throw error("array of \(count) values at byte \(pos)")
            }
            var out: [GGUFFile.Value] = []
            out.reserveCapacity(Int(count))
            for _ in 0..<Int(count) { out.append(try ggufValue(type: elementType, depth: depth + 1)) }
            return .array(out)
        case 10: return .uint(try u64())
        case 11: return .int(Int64(bitPattern: try u64()))
        case 12: return .float(Double(bitPattern: try u64()))
        default: throw error("unknown metadata value type \(type)")
        }
    }
}

/// The tensors of a GGUF file under their Hugging Face names, so the same model definition
/// binds them. GGUF stores dimensions innermost first; views give them outermost first.
public final class GGUFWeights: WeightSource, @unchecked Sendable {
    public let file: GGUFFile

    /// Layer tensors whose llama.cpp name depends on the architecture.
    let layerNames: [String: String]

    public init(_ file: GGUFFile) {
        self.file = file
        switch file.metadata["general.architecture"]?.string {
        case "gemma2", "gemma3": layerNames = GGUFWeights.gemmaLayerNames
        default: layerNames = [:]
        }
    }

    /// Gemma normalizes the attention's and the MLP's outputs too: its post_attention_layernorm
    /// is an output norm, the MLP's input norm is pre_feedforward_layernorm.
    static let gemmaLayerNames = [
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "pre_feedforward_layernorm.weight": "ffn_norm.weight",
        "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    ]

    func ggufName(_ hf: String) -> String { GGUFWeights.ggufName(hf, layerNames: layerNames) }

    /// The family's one name-mapping step: Hugging Face name -> llama.cpp name (`layerNames`
    /// first for the parts of a layer's tensor names).
    static func ggufName(_ hf: String, layerNames: [String: String] = [:]) -> String {
        switch hf {
        case "model.embed_tokens.weight": return "token_embd.weight"
        case "model.norm.weight": return "output_norm.weight"
        case "lm_head.weight": return "output.weight"
        default: break
        }
        guard hf.hasPrefix("model.layers.") else { return hf }
        let rest = hf.dropFirst("model.layers.".count)
        guard let dot = rest.firstIndex(of: ".") else { return hf }
        let layer = rest[..<dot], part = String(rest[rest.index(after: dot)...])
        let map = [
            "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
            "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
            "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
            "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
            "self_attn.v_proj.bias": "attn_v.bias", "self_attn.o_proj.bias": "attn_output.bias",
            "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight",
            "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
            "mlp.down_proj.weight": "ffn_down.weight", "mlp.gate_proj.bias": "ffn_gate.bias",
            "mlp.up_proj.bias": "ffn_up.bias", "mlp.down_proj.bias": "ffn_down.bias",
            // Fused projections (Phi-3): q/k/v in one matrix; gate over up in llama.cpp's ffn_up.
            "self_attn.qkv_proj.weight": "attn_qkv.weight", "mlp.gate_up_proj.weight": "ffn_up.weight",
            // Mixture of experts: the router, each projection of every expert stacked in one
            // tensor, and Qwen2-MoE's shared expert with its gate.
            "mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
            "mlp.experts.gate_proj.weight": "ffn_gate_exps.weight", "mlp.experts.up_proj.weight": "ffn_up_exps.weight",
            "mlp.experts.down_proj.weight": "ffn_down_exps.weight",
            "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight", "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
            "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight", "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
        ]
        guard let g = layerNames[part] ?? map[part] else { return hf }
        return "blk.\(layer).\(g)"
    }

    public func tensor(_ name: String) -> TensorView? {
        file.view(ggufName(name))
    }

    public func storedName(_ name: String) -> String { ggufName(name) }

    /// Present in the file, whether or not its type is computable (so an output matrix of an
    /// unsupported type is an error, not silently replaced by the tied embedding).
    public func contains(_ name: String) -> Bool { file.info(ggufName(name)) != nil }

    public func missingReason(_ name: String) -> String {
        let stored = ggufName(name)
        if let t = file.info(stored), t.type.dtype == nil {
            let supported = DType.allCases.map(\.rawValue).joined(separator: ", ")
            return "tensor '\(stored)' has type \(t.type.name), which Peregrine cannot compute with (supported: \(supported))"
        }
        return "missing tensor '\(stored)'"
    }
}
