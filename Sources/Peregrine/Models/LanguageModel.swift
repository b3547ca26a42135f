/// A loaded causal language model, whatever its architecture and backend. The runtime drives
/// models only through this protocol.
public protocol LanguageModel: AnyObject {
    var config: ModelConfig { get }
    var backendName: String { get }
    /// Bytes of weights read by one decode step (for bandwidth figures).
    var weightBytes: Int { get }
    /// Key/value memory for `slots` sequences of up to `capacity` positions each.
    func makeKVMemory(slots: Int, capacity: Int) throws -> KVMemory
    /// Runs the batch: writes every token's keys and values into `kv` and the logits of
    /// `plan.logitRows` (row after row of vocabSize floats) into `logits`.
    func forward(_ plan: BatchPlan, kv: KVMemory, logits: UnsafeMutableBufferPointer<Float>) throws
    /// Copies positions 0..<count of one slot to another (prefix reuse, forking a sequence).
    func copyKV(_ kv: KVMemory, from: Int, to: Int, count: Int) throws
    /// The same model with these layers skipped, sharing the weights (self-speculation).
    func skippingLayers(_ layers: Set<Int>) throws -> LanguageModel
}

/// Key/value memory of some backend; see `KVStorage`.
open class KVMemory {
    public let slots: Int
    public let capacity: Int

    public init(slots: Int, capacity: Int) {
        self.slots = slots
        self.capacity = capacity
    }
}

/// The model families Peregrine can run. Each family is one model definition that reads every
/// architecture listed for it, switched by its config.
public enum ModelFamily: String, CaseIterable, Sendable {
    case llama

    /// From config.json's `architectures` entry.
    public static let architectures: [String: ModelFamily] = [
        "LlamaForCausalLM": .llama,
        "MistralForCausalLM": .llama,
        "Qwen2ForCausalLM": .llama,
        "Qwen3ForCausalLM": .llama,
    ]
}

public enum ModelRegistry {
    /// Reads a Hugging Face model directory (config.json and safetensors weights) or a GGUF file.
    public static func load<B: ComputeBackend>(directory: String, backend: B) throws -> LanguageModel {
        if FileSystem.isGGUFFile(directory) {
            let g = try GGUFFile(path: directory)
            return try model(config: try ModelConfig(gguf: g), weights: GGUFWeights(g), backend: backend)
        }
        guard FileSystem.isDirectory(directory) else { throw PeregrineError.io("\(directory): not a model directory") }
        let configPath = FileSystem.join(directory, "config.json")
        guard FileSystem.exists(configPath) else { throw PeregrineError.io("\(directory): no config.json") }
        let config = try ModelConfig(json: try FileSystem.readJSON(configPath), source: configPath)
        return try model(config: config, weights: try WeightStore(directory: directory), backend: backend)
    }

    /// The family's model definition for a config, whatever file the weights came from.
    static func model<B: ComputeBackend>(config: ModelConfig, weights: WeightSource, backend: B) throws -> LanguageModel {
        guard let family = ModelFamily.architectures[config.architecture] else {
            throw PeregrineError.unsupported("unsupported architecture \(config.architecture)")
        }
        switch family {
        case .llama: return try LlamaModel(config: config, weights: weights, backend: backend)
        }
    }

    public static func load(directory: String) throws -> LanguageModel {
        try load(directory: directory, backend: CPUBackend())
    }
}
