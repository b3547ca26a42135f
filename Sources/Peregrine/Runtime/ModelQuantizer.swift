import Foundation

/// A quantization mix: which type each tensor of a model gets, by llama.cpp's rules for the
/// file type of the same name (so a Peregrine Q4_K_M file has the types llama.cpp's has).
public enum QuantizationMix: String, CaseIterable, Sendable {
    case f32 = "F32", f16 = "F16", bf16 = "BF16"
    case q8_0 = "Q8_0", q4_0 = "Q4_0", q4_1 = "Q4_1", q5_0 = "Q5_0", q5_1 = "Q5_1"
    case q4_K_S = "Q4_K_S", q4_K_M = "Q4_K_M", q5_K_S = "Q5_K_S", q5_K_M = "Q5_K_M", q6_K = "Q6_K"
    case iq4_nl = "IQ4_NL", iq4_xs = "IQ4_XS"
    case q2_K = "Q2_K", q3_K_S = "Q3_K_S", q3_K_M = "Q3_K_M", q3_K_L = "Q3_K_L"

    /// llama.cpp's `general.file_type` number for the mix.
    public var fileType: UInt32 {
        switch self {
        case .f32: return 0
        case .f16: return 1
        case .q4_0: return 2
        case .q4_1: return 3
        case .q8_0: return 7
        case .q5_0: return 8
        case .q5_1: return 9
        case .q4_K_S: return 14
        case .q4_K_M: return 15
        case .q5_K_S: return 16
        case .q5_K_M: return 17
        case .q6_K: return 18
        case .iq4_nl: return 25
        case .iq4_xs: return 30
        case .bf16: return 32
        case .q2_K: return 10
        case .q3_K_S: return 11
        case .q3_K_M: return 12
        case .q3_K_L: return 13
        }
    }

    /// The type most tensors get.
    public var base: DType {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        case .q8_0: return .q8_0
        case .q4_0: return .q4_0
        case .q4_1: return .q4_1
        case .q5_0: return .q5_0
        case .q5_1: return .q5_1
        case .q4_K_S, .q4_K_M: return .q4_K
        case .q5_K_S, .q5_K_M: return .q5_K
        case .q6_K: return .q6_K
        case .iq4_nl: return .iq4_nl
        case .iq4_xs: return .iq4_xs
        case .q2_K: return .q2_K
        case .q3_K_S, .q3_K_M, .q3_K_L: return .q3_K
        }
    }

    public init?(name: String) {
        guard let m = Self.allCases.first(where: { $0.rawValue.lowercased() == name.lowercased() }) else { return nil }
        self = m
    }

    /// The type of a tensor (GGUF name, `cols` values per row). Vectors (norms, biases, RoPE
    /// factors) are F32, as llama.cpp's converter writes them, and so are the experts' routers
    /// (`ffn_gate_inp`, `ffn_gate_inp_shexp`), which llama.cpp never quantizes. `layers` is the
    /// model's layer count; `tied` says the embedding table is also the output matrix;
    /// `experts` the routed experts a layer (0 for a dense model: with 8, llama.cpp keeps
    /// attention's k and v in Q8_0 and gives the K-quants' attention output Q5_K).
    /// `pure` gives every matrix the base type (llama.cpp's --pure), fallbacks aside.
    /// `importance` says the quantization is weighted by an importance matrix, which moves the
    /// first eighth of the layers' `ffn_down` from Q4_0/Q5_0 to Q4_1/Q5_1, as llama.cpp does (and
    /// keeps it at IQ4_NL/IQ4_XS, which take Q5_K there without one). `gqa` is the query heads per
    /// key/value head: with 4 or more, the IQ4 mixes give attention's v Q5_K (Q2_K: Q4_K).
    public func type(of name: String, cols: Int, isMatrix: Bool, layers: Int, tied: Bool, experts: Int = 0, pure: Bool = false,
                     importance: Bool = false, gqa: Int = 1) -> DType {
        guard isMatrix, !name.hasSuffix("_norm.weight") else { return .f32 }
        if name.hasSuffix(".ffn_gate_inp.weight") || name.hasSuffix(".ffn_gate_inp_shexp.weight") { return .f32 }
        var type = base
        guard !base.isFloat else { return base }
        if pure { return fallback(type, cols: cols) }
        let layer = name.hasPrefix("blk.") ? Int(name.dropFirst(4).prefix { $0 != "." }) : nil
        // The first and last eighth of the layers, and every third one between, get more bits.
        func moreBits(_ i: Int) -> Bool { i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2 }
        if name == "output.weight" || (tied && name == "token_embd.weight") {
            type = cols % 256 != 0 || base == .q8_0 ? .q8_0 : .q6_K
        } else if let i = layer, name.hasSuffix(".attn_v.weight") || name.hasSuffix(".attn_qkv.weight") {
            // llama.cpp gives a fused qkv matrix (Phi-3) the rules of attention's v.
            if (self == .q4_K_M || self == .q5_K_M) && moreBits(i) { type = .q6_K }
            if self == .q4_K_S && i < 4 { type = .q5_K }
            if (self == .iq4_nl || self == .iq4_xs) && gqa >= 4 { type = .q5_K }
            if let low = lowBitsAttentionV(layer: i, gqa: gqa) { type = low }
            if experts == 8 { type = .q8_0 }
        } else if layer != nil, name.hasSuffix(".attn_k.weight") {
            if experts == 8 { type = .q8_0 }
        } else if layer != nil, name.hasSuffix(".attn_output.weight") {
            if experts == 8 && (self == .q4_K_S || self == .q4_K_M || self == .iq4_nl || self == .iq4_xs) { type = .q5_K }
            if let low = lowBitsAttentionOutput(experts: experts) { type = low }
        } else if let i = layer, name.contains(".ffn_down") {
            // Every down projection (dense, the stacked experts', the shared expert's), by its layer.
            if (self == .q4_K_M || self == .q5_K_M) && moreBits(i) { type = .q6_K }
            if (self == .q4_K_S || self == .q5_K_S) && i < layers / 8 { type = .q5_K }
            if importance && (self == .q4_0 || self == .q5_0) && i < layers / 8 { type = self == .q4_0 ? .q4_1 : .q5_1 }
            if !importance && (self == .iq4_nl || self == .iq4_xs) && i < layers / 8 { type = .q5_K }
            if let low = lowBitsFeedForwardDown(layer: i, layers: layers) { type = low }
        }
        return fallback(type, cols: cols)
    }

    /// Q2_K and Q3_K mixes: attention's v (or fused qkv) matrix of layer `layer`. Nil for the other mixes.
    private func lowBitsAttentionV(layer i: Int, gqa: Int) -> DType? {
        switch self {
        case .q2_K: return gqa >= 4 ? .q4_K : .q3_K
        case .q3_K_M: return i < 2 ? .q5_K : .q4_K
        case .q3_K_L: return .q5_K
        default: return nil
        }
    }

    /// Q2_K and Q3_K mixes: attention's output matrix (Q5_K beside eight experts).
    private func lowBitsAttentionOutput(experts: Int) -> DType? {
        if experts == 8 { return [.q2_K, .q3_K_S, .q3_K_M].contains(self) ? .q5_K : nil }
        switch self {
        case .q2_K: return .q3_K
        case .q3_K_M: return .q4_K
        case .q3_K_L: return .q5_K
        default: return nil
        }
    }

    /// Q2_K and Q3_K mixes: a down projection of layer `layer` (Q3_K_M: Q5_K in the first sixteenth).
    private func lowBitsFeedForwardDown(layer i: Int, layers: Int) -> DType? {
        switch self {
        case .q2_K: return .q3_K
        case .q3_K_M: return i < layers / 16 ? .q5_K : .q4_K
        case .q3_K_L: return .q5_K
        default: return nil
        }
    }

    /// Rows that do not divide into 256-value blocks take a 32-value type of similar size; rows
    /// that do not divide into 32 either, F16.
    private func fallback(_ t: DType, cols: Int) -> DType {
        var type = t
        if cols % type.blockSize != 0 {
            switch type {
            case .q4_K: type = .q5_0
            case .q5_K: type = .q5_1
            case .q6_K: type = .q8_0
            case .iq4_xs: type = .iq4_nl
            case .q2_K, .q3_K: type = .q4_0
            default: break
            }
            if cols % type.blockSize != 0 { type = .f16 }
        }
        return type
    }
}

/// Writes a quantized GGUF file from an F32/F16/BF16 GGUF file or a Hugging Face directory.
public struct ModelQuantizer {
    public struct Summary: Sendable {
        public var tensors = 0
        public var sourceBytes = 0
        public var outputBytes = 0
        public var parameters = 0
        public var typeCounts: [String: Int] = [:]
        /// Quantized tensors whose error the importance matrix weighted.
        public var weightedTensors = 0
        /// Tensors quantized by GPTQ (the others are rounded).
        public var gptqTensors = 0
        /// AWQ's choice for each group of weights it scaled.
        public var awqChoices: [AWQ.Choice] = []
        public var seconds = 0.0

        public var bitsPerWeight: Double { Double(outputBytes * 8) / Double(max(parameters, 1)) }
    }

    public let mix: QuantizationMix
    public let pure: Bool
    public let pool: ThreadPool
    /// Weights each quantized tensor's error by the matrix's entry of the same name (GGUF names),
    /// where it has one.
    public let importance: ImportanceMatrix?
    /// What the output file records as the matrix's file (llama.cpp's `quantize.imatrix.file`).
    public let importanceFile: String?
    public let method: QuantizationMethod

    public init(mix: QuantizationMix, pure: Bool = false, pool: ThreadPool = .shared, importance: ImportanceMatrix? = nil,
                importanceFile: String? = nil, method: QuantizationMethod = .rounding) {
        self.mix = mix
        self.pure = pure
        self.pool = pool
        self.importance = importance
        self.importanceFile = importanceFile
        self.method = method
    }

    /// Quantizes `source` (a .gguf file or a model directory) into `output`.
    public func quantize(source: String, output: String,
                         progress: (Int, Int, String, DType) -> Void = { _, _, _, _ in }) throws -> Summary {
        let start = Date()
        var writer: GGUFWriter
        var inputs: [(name: String, dims: [Int], parts: [TensorView])]
        let layers: Int
        let experts: Int
        let config: ModelConfig
        var hfSource: HFToGGUF?
        defer { hfSource?.release() }
        // The mapped source outlives the writing (tensor views point into it).
        var ggufSource: GGUFFile?
        defer { withExtendedLifetime(ggufSource) {} }
        if FileSystem.isGGUFFile(source) {
            let g = try GGUFFile(path: source)
            ggufSource = g
            config = try ModelConfig(gguf: g)  // an architecture Peregrine runs, with sane hyperparameters
            writer = GGUFWriter()
            for key in g.metadataKeys {
                guard let range = g.rawMetadata[key], let base = g.file.base else { continue }
                writer.metadata.append((key, .raw(Array(UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count)))))
            }
            let arch = g.metadata["general.architecture"]?.string ?? ""
            layers = g.metadata["\(arch).block_count"]?.int ?? 0
            experts = g.metadata["\(arch).expert_count"]?.int ?? 0
            inputs = try g.tensors.map { t in
                guard let v = g.view(t.name) else {
                    throw PeregrineError.unsupported("\(source): tensor '\(t.name)' has type \(t.type.name), which cannot be read")
                }
                return (t.name, t.dims, [v])
            }
        } else {
            let hf = try HFToGGUF(directory: source)
            hfSource = hf
            writer = hf.writer
            inputs = hf.tensors
            layers = hf.config.layerCount
            experts = hf.config.experts?.count ?? 0
            config = hf.config
        }
        let tied = !inputs.contains { $0.name == "output.weight" }
        writer.set("general.file_type", .u32(mix.fileType))
        writer.set("general.quantization_version", .u32(2))
        if let m = importance {
            // The keys llama.cpp's quantizer writes, so a file says how it was made.
            if let f = importanceFile { writer.set("quantize.imatrix.file", .string(f)) }
            if let d = m.datasets.first { writer.set("quantize.imatrix.dataset", .string(d)) }
            writer.set("quantize.imatrix.entries_count", .u32(UInt32(clamping: m.entries.count)))
            if m.chunkCount > 0 { writer.set("quantize.imatrix.chunks_count", .u32(UInt32(clamping: m.chunkCount))) }
        }
        var summary = Summary()
        var plan: [(String, [Int], [TensorView], DType, [Float]?)] = []
        for (name, dims, parts) in inputs {
            // A matrix has a second dimension above 1 (llama.cpp's count of dimensions): a
            // one-row gate is a vector.
            let isMatrix = dims.dropFirst().contains { $0 > 1 }
            let target = mix.type(of: name, cols: dims[0], isMatrix: isMatrix, layers: layers, tied: tied, experts: experts, pure: pure,
                                  importance: importance != nil, gqa: config.headCount / max(1, config.kvHeadCount))
            for view in parts where view.dtype != target && !view.dtype.isFloat {
                throw PeregrineError.unsupported(
                    "\(source): tensor '\(name)' is already quantized (\(view.dtype.rawValue)); quantize from an F32, F16 or BF16 model")
            }
            // Stacked experts [experts, rows, cols] have an importance row per expert.
            var weights: [Float]?
            if let m = importance, !target.isFloat, isMatrix {
                do {
                    weights = try m.importance(of: name, columns: dims[0], experts: dims.count >= 3 ? dims[2] : 1)
                } catch where name == "token_embd.weight" {
                    // An embedding table's rows are not a product's input columns (llama.cpp ignores a mismatch there too).
                    weights = nil
                }
            }
            if weights != nil { summary.weightedTensors += 1 }
            if case .gptq(_, let statistics) = method, !target.isFloat, parts.count == 1, statistics[name]?.columns == dims[0] {
                summary.gptqTensors += 1
            }
            plan.append((name, dims, parts, target, weights))
            let elements = parts.reduce(0) { $0 + $1.elementCount }
            summary.tensors += 1
            summary.parameters += elements
            summary.sourceBytes += parts.reduce(0) { $0 + $1.byteCount }
            summary.outputBytes += target.byteCount(elements: elements)
            summary.typeCounts[target.rawValue, default: 0] += 1
        }
        if let m = importance, summary.weightedTensors == 0, plan.contains(where: { !$0.3.isFloat }) {
            let names = m.entries.keys.sorted().prefix(3).joined(separator: ", ")
            throw PeregrineError.invalidArgument("the importance matrix has no entry for any tensor of \(source) (it names \(names), ...)")
        }
        // AWQ: the scaled weights and the ops the scales fold into, as f32 copies.
        let folded = AWQ.Tensors()
        if case .awq(let awq, let statistics) = method {
            guard ModelFamily.architectures[config.architecture] == .llama, config.normWeightOffset == 0, config.experts == nil else {
                throw PeregrineError.unsupported("AWQ folds its scales into Llama-family layers (Llama, Mistral, Qwen2, Qwen3); not \(config.architecture)")
            }
            let folds = ["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_v.bias", "attn_output.weight",
                         "ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_up.bias", "ffn_down.weight"]
            var types: [String: DType] = [:]
            for (name, dims, parts, target, weights) in plan where name.hasPrefix("blk.") && parts.count == 1 {
                guard folds.contains(where: { name.hasSuffix("." + $0) }) else { continue }
                folded.values[name] = parts[0].toFloat()
                folded.dims[name] = dims
                types[name] = target
                if let weights, weights.count == dims[0] { folded.importance[name] = weights }
            }
            let layout = AWQ.Layout(layers: layers, heads: config.headCount, kvHeads: config.kvHeadCount, headDim: config.headDim)
            summary.awqChoices = try awq.apply(to: folded, layout: layout, statistics: statistics, types: types, pool: pool)
        }
        let pool = self.pool, method = self.method
        writer.tensors = plan.map { (name, dims, parts, target, weights) in
            GGUFWriter.Tensor(name: name, dims: dims, type: GGUFFile.TensorType(target)!) { out in
                if let values = folded.values[name] {
                    // An AWQ-scaled tensor (or a fold's target), rounded by its type's quantizer.
                    try values.withUnsafeBufferPointer { v in
                        let view = TensorView(name: name, dtype: .f32, shape: parts[0].shape, data: v.baseAddress!, byteCount: 4 * v.count)
                        try ModelQuantizer.convert(view, to: target, rowLength: dims[0], into: out, pool: pool,
                                                   importance: folded.importance[name] ?? weights,
                                                   gptq: method.gptq(for: name))
                    }
                    return
                }
                if parts.count == 1 {
                    try ModelQuantizer.convert(parts[0], to: target, rowLength: dims[0], into: out, pool: pool, importance: weights,
                                               gptq: method.gptq(for: name))
                    return
                }
                // A stacked tensor's experts one after another, each with its own importance row.
                var at = 0
                for (i, view) in parts.enumerated() {
                    let bytes = target.byteCount(elements: view.elementCount)
                    let own = weights.map { w in w.count == dims[0] * parts.count ? Array(w[(i * dims[0])..<((i + 1) * dims[0])]) : w }
                    try ModelQuantizer.convert(view, to: target, rowLength: dims[0],
                                               into: UnsafeMutableRawBufferPointer(rebasing: out[at..<(at + bytes)]), pool: pool, importance: own)
                    at += bytes
                }
            }
        }
        try writer.write(to: output) { i, t in progress(i, plan.count, t.name, plan[i].3) }
        summary.seconds = Date().timeIntervalSince(start)
        return summary
    }

    /// Converts a tensor by GPTQ where `gptq` gives the tensor's input statistics, else by
    /// rounding (`convert(_:to:rowLength:into:pool:importance:)`).
    static func convert(_ view: TensorView, to type: DType, rowLength: Int, into out: UnsafeMutableRawBufferPointer, pool: ThreadPool,
                        importance: [Float]?, gptq: (GPTQ, InputStatistics)?) throws {
        if let (gptq, s) = gptq, !type.isFloat, s.columns == rowLength, rowLength % type.blockSize == 0 {
            let w = view.toFloat()
            if let bad = w.firstIndex(where: { !$0.isFinite }) { throw nonFinite(view.name, row: bad / rowLength, type: type) }
            try w.withUnsafeBufferPointer {
                try gptq.quantize($0.baseAddress!, rows: w.count / rowLength, cols: rowLength, xtx: s.xtx, type: type, importance: importance,
                                  into: out.baseAddress!, pool: pool)
            }
            return
        }
        try convert(view, to: type, rowLength: rowLength, into: out, pool: pool, importance: importance)
    }

    /// A quantized type's scales cannot hold a NaN or an infinity (llama-quantize refuses such
    /// rows too): the file is not written.
    static func nonFinite(_ tensor: String, row: Int, type: DType) -> PeregrineError {
        .format("\(tensor): row \(row) holds a NaN or infinite value, which \(type.rawValue.uppercased()) cannot store")
    }

    /// The first row found holding a non-finite value, by whichever worker finds one.
    private final class BadRow: @unchecked Sendable {
        private let lock = NSLock()
        private(set) var row: Int?
        func record(_ r: Int) {
            lock.lock()
            row = min(row ?? r, r)
            lock.unlock()
        }
    }

    /// Converts a tensor row by row (widened to f32, then quantized), rows spread over threads.
    /// `importance` holds a value per column, for each expert in turn when the tensor stacks
    /// experts (the rows divide evenly among them).
    static func convert(_ view: TensorView, to type: DType, rowLength: Int, into out: UnsafeMutableRawBufferPointer, pool: ThreadPool,
                        importance: [Float]? = nil) throws {
        if view.dtype == type {
            out.copyMemory(from: UnsafeRawBufferPointer(start: view.data, count: view.byteCount))
            return
        }
        let rows = view.elementCount / rowLength
        let inBytes = view.dtype.byteCount(elements: rowLength), outBytes = type.byteCount(elements: rowLength)
        let experts = (importance?.count ?? 0) / rowLength, rowsPerExpert = experts > 0 ? max(1, rows / experts) : rows
        let importance = importance.map { v in
            let p = UnsafeMutablePointer<Float>.allocate(capacity: v.count)
            p.initialize(from: v, count: v.count)
            return p
        }
        defer { importance?.deallocate() }
        let bad = BadRow(), checked = !type.isFloat
        pool.parallelRanges(rows, grain: max(1, 16384 / rowLength)) { range in
            let row = UnsafeMutablePointer<Float>.allocate(capacity: rowLength)
            defer { row.deallocate() }
            for r in range {
                view.dtype.dequantize(view.data + r * inBytes, count: rowLength, into: row)
                if checked && !CPUKernels.allFinite(row, rowLength) {
                    bad.record(r)
                    continue
                }
                let weights = importance.map { $0 + min(r / rowsPerExpert, experts - 1) * rowLength }
                Quantizer.quantize(type, row, count: rowLength, importance: weights, into: out.baseAddress! + r * outBytes)
            }
        }
        if let r = bad.row { throw nonFinite(view.name, row: r, type: type) }
    }
}

/// How quantized values are chosen. `rounding`: each block rounded by its type's quantizer
/// (weighted by an importance matrix where given). `gptq` and `awq` use statistics of each
/// layer weight's inputs over a calibration text (`CalibrationRun`), by GGUF weight name.
public enum QuantizationMethod {
    case rounding
    case gptq(GPTQ, [String: InputStatistics])
    case awq(AWQ, [String: InputStatistics])

    /// GPTQ and the statistics of the tensor named `name`, when this is GPTQ and it has them.
    func gptq(for name: String) -> (GPTQ, InputStatistics)? {
        guard case .gptq(let g, let statistics) = self, let s = statistics[name] else { return nil }
        return (g, s)
    }

    public var name: String {
        switch self {
        case .rounding: return "rounding"
        case .gptq: return "gptq"
        case .awq: return "awq"
        }
    }
}
