/// A loaded causal language model, whatever its architecture and backend. The runtime drives
/// models only through this protocol.
public protocol LanguageModel: AnyObject {
    var config: ModelConfig { get }
    var backendName: String { get }
    /// The KV cache type an engine or generator uses when none is asked for (the backend's).
    var preferredKVCacheType: KVCacheType { get }
    /// Bytes of weights read by one decode step (for bandwidth figures); for a mixture of
    /// experts, the active parameters' (k experts a layer).
    var weightBytes: Int { get }
    /// Bytes of weights the forward passes so far have read, each routed expert counted in the
    /// passes that chose it; nil where the model does not count them.
    var weightBytesRead: Int? { get }
    /// Free memory of the device the model runs on; nil on the CPU.
    var freeDeviceMemory: Int? { get }
    /// The backend's time per kernel, when it measures it (PEREGRINE_KERNEL_PROFILE on CUDA).
    var kernelProfile: String? { get }
    /// Key/value memory: `blocks` blocks of `blockSize` positions, sequences of up to `capacity`
    /// positions each.
    func makeKVMemory(blocks: Int, blockSize: Int, capacity: Int, type: KVCacheType) throws -> KVMemory
    /// Runs the batch: writes every token's keys and values into `kv` and computes the logits of
    /// `plan.logitRows`, leaving them where they were computed (in GPU memory on the CUDA backend).
    func forward(_ plan: BatchPlan, kv: KVMemory) throws -> LogitRows
    /// Copies whole KV blocks, `pairs[i].from` to `pairs[i].to` (copy on write of a shared block).
    func copyKVBlocks(_ kv: KVMemory, _ pairs: [(from: Int32, to: Int32)]) throws
    /// The same model with these layers skipped, sharing the weights (self-speculation).
    func skippingLayers(_ layers: Set<Int>) throws -> LanguageModel
}

extension LanguageModel {
    public var weightBytesRead: Int? { nil }

    /// Runs the batch and copies the logits of `plan.logitRows` (row after row of vocabSize
    /// floats) into `logits`.
    public func forward(_ plan: BatchPlan, kv: KVMemory, logits: UnsafeMutableBufferPointer<Float>) throws {
        let v = config.vocabSize
        guard logits.count >= plan.logitRows.count * v else { throw PeregrineError.invalidArgument("logits buffer too small") }
        let rows = try forward(plan, kv: kv)
        for r in 0..<rows.count { try rows.read(row: r, into: UnsafeMutableBufferPointer(rebasing: logits[(r * v)..<((r + 1) * v)])) }
    }
}

/// The logits of a model's last forward pass, one row per `plan.logitRows` entry, kept where they
/// were computed and valid until the model's next pass. Sampling asks for only what it needs
/// (the best id, the k largest), so a GPU copies back a few values instead of whole rows.
public protocol LogitRows: AnyObject {
    var count: Int { get }
    var vocabulary: Int { get }
    func read(row: Int, into values: UnsafeMutableBufferPointer<Float>) throws
    /// The largest logit's id (the first one on ties).
    func argmax(row: Int) throws -> Int
    /// The largest logit's id of each of these rows (one read back for all of them on a GPU).
    func argmax(rows: [Int]) throws -> [Int]
    /// The `k` largest logits and their ids, in no particular order.
    func top(row: Int, k: Int, values: UnsafeMutableBufferPointer<Float>, ids: UnsafeMutableBufferPointer<Int32>) throws
    /// Applies a repetition penalty to the row in place (`ids` distinct).
    func penalize(row: Int, ids: UnsafeBufferPointer<Int32>, penalty: Float) throws
    /// Σ exp((logit - shift) * scale) over the row (the normalizer top-p needs).
    func expSum(row: Int, shift: Float, scale: Float) throws -> Float
    /// Whether `sample(rows:draws:)` draws every row where the logits are, in one pass.
    var samplesRows: Bool { get }
    /// A token for each of these rows (see `ComputeBackend.sampleRows`).
    func sample(rows: [Int], draws: [SamplingDraw]) throws -> [(token: Int, drew: Bool)]
    /// Whether `queueGreedy` works, and the model's next pass takes a token -1 - i as row i's
    /// choice: the engine may queue the next decode step before it reads these rows' tokens.
    var chainsGreedy: Bool { get }
    /// Whether chaining pays: passes return before the device has run them (a GPU), so the host
    /// prepares the next step while this one runs.
    var runsAhead: Bool { get }
    /// The most rows `queueGreedy` takes, and the backend's last ticket (see
    /// `ComputeBackend.lastGreedyTicket`).
    var chainableRows: Int { get }
    var lastGreedyTicket: Int { get }
    /// `ComputeBackend.greedyChainOwner`.
    var chainOwner: ObjectIdentifier? { get set }
    /// Queues the greedy choice of rows 0..<rows without waiting; `takeGreedy(ticket)` reads them.
    func queueGreedy(rows: Int) throws -> Int
    func takeGreedy(_ ticket: Int, rows: Int) throws -> [Int]
}

extension LogitRows {
    public var chainsGreedy: Bool { false }
    public var runsAhead: Bool { false }
    public var chainableRows: Int { 0 }
    public var lastGreedyTicket: Int { -1 }
    public var chainOwner: ObjectIdentifier? {
        get { nil }
        set {}
    }
    public func queueGreedy(rows: Int) throws -> Int { throw PeregrineError.unsupported("these logits do not chain decode steps") }
    public func takeGreedy(_ ticket: Int, rows: Int) throws -> [Int] { throw PeregrineError.unsupported("these logits do not chain decode steps") }
    public var samplesRows: Bool { false }
    public func sample(rows: [Int], draws: [SamplingDraw]) throws -> [(token: Int, drew: Bool)] {
        throw PeregrineError.unsupported("these logits are not sampled where they are")
    }
}

/// Logit rows in a backend's buffer.
final class BackendLogitRows<B: ComputeBackend>: LogitRows {
    let backend: B
    var buffer: B.Buffer?
    var count = 0
    let vocabulary: Int

    init(backend: B, vocabulary: Int) {
        self.backend = backend
        self.vocabulary = vocabulary
    }

    private func check(_ row: Int) throws -> B.Buffer {
        guard let buffer, row >= 0, row < count else { throw PeregrineError.invalidArgument("logit row \(row) does not exist (\(count) rows)") }
        return buffer
    }

    func read(row: Int, into values: UnsafeMutableBufferPointer<Float>) throws {
        let b = try check(row)
        guard values.count >= vocabulary else { throw PeregrineError.invalidArgument("logits buffer too small") }
        backend.read(b, offset: row * vocabulary, into: UnsafeMutableBufferPointer(rebasing: values[0..<vocabulary]))
        try backend.synchronize()
    }

    func argmax(row: Int) throws -> Int { try backend.argmax(try check(row), row: row, cols: vocabulary) }

    func argmax(rows: [Int]) throws -> [Int] {
        guard let buffer, rows.allSatisfy({ $0 >= 0 && $0 < count }) else { throw PeregrineError.invalidArgument("logit rows out of range") }
        return try backend.argmax(buffer, rows: rows, cols: vocabulary)
    }

    func top(row: Int, k: Int, values: UnsafeMutableBufferPointer<Float>, ids: UnsafeMutableBufferPointer<Int32>) throws {
        let b = try check(row)
        guard k > 0, k <= vocabulary, values.count >= k, ids.count >= k else { throw PeregrineError.invalidArgument("top-\(k) of \(vocabulary) logits") }
        try backend.topK(b, row: row, cols: vocabulary, k: k, values: values, indices: ids)
    }

    func expSum(row: Int, shift: Float, scale: Float) throws -> Float {
        try backend.expSum(try check(row), row: row, cols: vocabulary, shift: shift, scale: scale)
    }

    func penalize(row: Int, ids: UnsafeBufferPointer<Int32>, penalty: Float) throws {
        backend.penalize(try check(row), row: row, cols: vocabulary, ids: ids, penalty: penalty)
    }

    var samplesRows: Bool { backend.samplesRows }
    var chainsGreedy: Bool { backend.chainsGreedyTokens }
    var runsAhead: Bool { backend.queuesWork }
    var chainableRows: Int { backend.chainableRows }
    var lastGreedyTicket: Int { backend.lastGreedyTicket }
    var chainOwner: ObjectIdentifier? {
        get { backend.greedyChainOwner }
        set { backend.greedyChainOwner = newValue }
    }

    func queueGreedy(rows: Int) throws -> Int {
        guard let buffer, rows > 0, rows <= count else { throw PeregrineError.invalidArgument("logit rows out of range") }
        return try backend.queueGreedy(buffer, rows: rows, cols: vocabulary)
    }

    func takeGreedy(_ ticket: Int, rows: Int) throws -> [Int] { try backend.takeGreedy(ticket, rows: rows, cols: vocabulary) }

    func sample(rows: [Int], draws: [SamplingDraw]) throws -> [(token: Int, drew: Bool)] {
        guard let buffer, rows.count == draws.count, rows.allSatisfy({ $0 >= 0 && $0 < count }) else {
            throw PeregrineError.invalidArgument("logit rows out of range")
        }
        return try backend.sampleRows(buffer, rows: rows, cols: vocabulary, draws: draws)
    }
}

/// Key/value memory of some backend; see `KVStorage`.
open class KVMemory {
    public let blocks: Int
    public let blockSize: Int
    /// The most positions one sequence may hold (its block table's width times the block size).
    public let capacity: Int

    public init(blocks: Int, blockSize: Int, capacity: Int) {
        self.blocks = blocks
        self.blockSize = blockSize
        self.capacity = capacity
    }

    /// Entries of a block table row.
    public var tableWidth: Int { (capacity + blockSize - 1) / blockSize }
}

/// The model families Peregrine can run. Each family is one model definition that reads every
/// architecture listed for it, switched by its config.
public enum ModelFamily: String, CaseIterable, Sendable {
    case llama
    case phi3
    case mixtureOfExperts
    case gemma

    /// From config.json's `architectures` entry (GGUF's `general.architecture` is read into the
    /// same names by `ModelConfig(gguf:)`: llama, qwen2, qwen3, gemma2, gemma3).
    public static let architectures: [String: ModelFamily] = [
        "LlamaForCausalLM": .llama,
        "MistralForCausalLM": .llama,
        "Qwen2ForCausalLM": .llama,
        "Qwen3ForCausalLM": .llama,
        "Phi3ForCausalLM": .phi3,
        "MixtralForCausalLM": .mixtureOfExperts,
        "Qwen2MoeForCausalLM": .mixtureOfExperts,
        "Qwen3MoeForCausalLM": .mixtureOfExperts,
        "Gemma2ForCausalLM": .gemma,
        "Gemma3ForCausalLM": .gemma,
        // Its text model: ModelConfig reads the text_config as a Gemma3ForCausalLM config.
        "Gemma3ForConditionalGeneration": .gemma,
    ]
}

public enum ModelRegistry {
    /// Reads a Hugging Face model directory (config.json and safetensors weights) or a GGUF file.
    public static func load<B: ComputeBackend>(directory: String, backend: B) throws -> LanguageModel {
        if FileSystem.isGGUFFile(directory) {
            let g = try GGUFFile(path: directory)
            return try model(config: try ModelConfig(gguf: g), weights: GGUFWeights(g), backend: backend)
        }
        guard FileSystem.isDirectory(directory) else {
            guard FileSystem.exists(directory) else { throw PeregrineError.io("\(directory): not a model directory") }
            throw PeregrineError.io("\(directory): neither a model directory nor a GGUF file")
        }
        let configPath = FileSystem.join(directory, "config.json")
        guard FileSystem.exists(configPath) else { throw PeregrineError.io("\(directory): no config.json") }
        let config = try ModelConfig(json: try FileSystem.readJSON(configPath), source: configPath)
        let store = try WeightStore(directory: directory)
        return try model(config: config, weights: config.weightsUnderLanguageModel ? LanguageModelWeights(store) : store, backend: backend)
    }

    /// The family's model definition for a config, whatever file the weights came from.
    static func model<B: ComputeBackend>(config: ModelConfig, weights: WeightSource, backend: B) throws -> LanguageModel {
        guard let family = ModelFamily.architectures[config.architecture] else {
            throw PeregrineError.unsupported("unsupported architecture \(config.architecture)")
        }
        switch family {
        case .llama: return try LlamaModel(config: config, weights: weights, backend: backend)
        case .phi3: return try Phi3.model(config: config, weights: weights, backend: backend)
        case .mixtureOfExperts: return try MoEModel(config: config, weights: weights, backend: backend)
        case .gemma: return try GemmaModel(config: config, weights: weights, backend: backend)
        }
    }

    public static func load(directory: String) throws -> LanguageModel {
        try load(directory: directory, backend: CPUBackend())
    }
}
