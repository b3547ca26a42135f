/// The hyperparameters of a decoder-only transformer of the Llama family, read from a Hugging Face
/// config.json (or, later, GGUF metadata). One struct serves Llama, Mistral, Qwen2 and Qwen3: the
/// families differ only in switches.
public struct ModelConfig: Equatable, Sendable {
    public var architecture: String
    public var modelType: String
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layerCount: Int
    public var headCount: Int
    public var kvHeadCount: Int
    public var headDim: Int
    public var rmsNormEps: Float
    public var ropeTheta: Double
    public var ropeScaling: RopeScaling
    public var maxPositions: Int
    public var tieWordEmbeddings: Bool
    /// Biases on the q, k and v projections (Qwen2, or Llama with attention_bias).
    public var qkvBias: Bool
    /// Bias on the output projection (Llama with attention_bias).
    public var outputBias: Bool
    public var mlpBias: Bool
    /// Per-head RMSNorm on queries and keys before RoPE (Qwen3).
    public var qkNorm: Bool
    /// Per layer: attend only to the last `window` positions (nil: full attention).
    public var slidingWindow: [Int?]
    public var torchDType: DType?
    public var bosTokenId: Int?
    public var eosTokenIds: [Int]
    /// RoPE on adjacent pairs (GGUF llama files) instead of halves.
    public var ropeInterleaved = false
    /// Per-frequency divisors of the rotation frequencies (GGUF `rope_freqs`, Llama 3.1 scaling).
    public var ropeFrequencyFactors: [Float]?

    /// Architectures whose config.json this struct reads (the model registry maps each to code).
    public static let supportedArchitectures = [
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    ]

    public init(json: JSONValue, source: String = "config.json") throws {
        func bad(_ m: String) -> PeregrineError { .format("\(source): \(m)") }
        guard json.object != nil else { throw bad("not a JSON object") }
        // Sizes beyond any real model are refused before anything is allocated from them.
        let limit = 1 << 24
        func int(_ key: String) throws -> Int {
            guard let v = json[key] else { throw bad("missing '\(key)'") }
            guard let i = v.int, i > 0, i <= limit else { throw bad("'\(key)' must be a positive integer up to \(limit)") }
            return i
        }
        func optInt(_ key: String) throws -> Int? {
            guard let v = json[key], !v.isNull else { return nil }
            guard let i = v.int, i > 0, i <= limit else { throw bad("'\(key)' must be a positive integer up to \(limit)") }
            return i
        }
        let archs = json["architectures"]?.array?.compactMap(\.string) ?? []
        let modelType = json["model_type"]?.string ?? ""
        guard let arch = archs.first ?? ModelConfig.architecture(forModelType: modelType) else {
            throw bad("no 'architectures' or known 'model_type'")
        }
        guard ModelConfig.supportedArchitectures.contains(arch) else {
            throw PeregrineError.unsupported(
                "unsupported architecture \(arch); supported: \(ModelConfig.supportedArchitectures.joined(separator: ", "))")
        }
        architecture = arch
        self.modelType = modelType
        vocabSize = try int("vocab_size")
        hiddenSize = try int("hidden_size")
        intermediateSize = try int("intermediate_size")
        layerCount = try int("num_hidden_layers")
        headCount = try int("num_attention_heads")
        kvHeadCount = try optInt("num_key_value_heads") ?? headCount
        guard headCount % kvHeadCount == 0 else {
            throw bad("num_attention_heads (\(headCount)) is not a multiple of num_key_value_heads (\(kvHeadCount))")
        }
        if let hd = try optInt("head_dim") {
            headDim = hd
        } else {
            guard hiddenSize % headCount == 0 else { throw bad("hidden_size is not a multiple of num_attention_heads") }
            headDim = hiddenSize / headCount
        }
        guard headDim % 2 == 0 else { throw bad("head_dim must be even for rotary embeddings") }
        let eps = json["rms_norm_eps"]?.double ?? 1e-6
        guard eps > 0, eps < 1 else { throw bad("'rms_norm_eps' out of range") }
        rmsNormEps = Float(eps)
        let theta = json["rope_theta"]?.double ?? json["rope_parameters"]?["rope_theta"]?.double ?? 10000
        guard theta > 1 else { throw bad("'rope_theta' must be greater than 1") }
        ropeTheta = theta
        maxPositions = try optInt("max_position_embeddings") ?? 2048
        tieWordEmbeddings = json["tie_word_embeddings"]?.bool ?? false
        ropeScaling = try ModelConfig.parseRopeScaling(json["rope_scaling"] ?? json["rope_parameters"], bad: bad)

        let attentionBias = json["attention_bias"]?.bool ?? false
        switch arch {
        case "Qwen2ForCausalLM":
            qkvBias = true
            outputBias = false
        default:
            qkvBias = attentionBias
            outputBias = attentionBias
        }
        mlpBias = json["mlp_bias"]?.bool ?? false
        qkNorm = arch == "Qwen3ForCausalLM"

        let window = try optInt("sliding_window")
        var windows = [Int?](repeating: nil, count: layerCount)
        if let window {
            switch arch {
            case "MistralForCausalLM":
                windows = [Int?](repeating: window, count: layerCount)
            case "Qwen2ForCausalLM", "Qwen3ForCausalLM":
                // Qwen applies the window only when asked, and only from max_window_layers on.
                if json["use_sliding_window"]?.bool == true {
                    let from = json["max_window_layers"]?.int ?? layerCount
                    for i in 0..<layerCount where i >= from { windows[i] = window }
                }
            default:
                break
            }
        }
        if let types = json["layer_types"]?.array, types.count == layerCount {
            for (i, t) in types.enumerated() { windows[i] = t.string == "sliding_attention" ? window : nil }
        }
        slidingWindow = windows
        torchDType = (json["torch_dtype"]?.string ?? json["dtype"]?.string).flatMap(DType.init(torchName:))
        bosTokenId = json["bos_token_id"]?.int
        eosTokenIds = ModelConfig.tokenIds(json["eos_token_id"])
    }

    static func tokenIds(_ v: JSONValue?) -> [Int] {
        guard let v else { return [] }
        if let i = v.int { return [i] }
        return v.array?.compactMap(\.int) ?? []
    }

    static func architecture(forModelType t: String) -> String? {
        switch t {
        case "llama": return "LlamaForCausalLM"
        case "mistral": return "MistralForCausalLM"
        case "qwen2": return "Qwen2ForCausalLM"
        case "qwen3": return "Qwen3ForCausalLM"
        default: return nil
        }
    }

    static func parseRopeScaling(_ v: JSONValue?, bad: (String) -> PeregrineError) throws -> RopeScaling {
        guard let v, let o = v.object else { return .none }
        let type = o["rope_type"]?.string ?? o["type"]?.string ?? "default"
        switch type {
        case "default":
            return .none
        case "linear":
            guard let f = o["factor"]?.double, f > 0 else { throw bad("rope_scaling of type linear needs a positive factor") }
            return .linear(factor: f)
        case "llama3":
            guard let f = o["factor"]?.double, f > 0,
                  let lo = o["low_freq_factor"]?.double, let hi = o["high_freq_factor"]?.double, hi > lo,
                  let orig = o["original_max_position_embeddings"]?.int, orig > 0
            else { throw bad("rope_scaling of type llama3 needs factor, low_freq_factor < high_freq_factor and original_max_position_embeddings") }
            return .llama3(factor: f, lowFreqFactor: lo, highFreqFactor: hi, originalMaxPositions: orig)
        default:
            throw PeregrineError.unsupported("unsupported rope_scaling type '\(type)' (supported: linear, llama3)")
        }
    }

    /// From the metadata of a GGUF file (architectures llama, qwen2, qwen3). Which optional
    /// weights exist (biases, q/k norms, an output matrix) is read from the tensors.
    public init(gguf g: GGUFFile) throws {
        func bad(_ m: String) -> PeregrineError { .format("\(g.path): \(m)") }
        guard let arch = g.metadata["general.architecture"]?.string else { throw bad("no general.architecture") }
        let archs = ["llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"]
        guard let hf = archs[arch] else {
            throw PeregrineError.unsupported("unsupported GGUF architecture \(arch); supported: \(archs.keys.sorted().joined(separator: ", "))")
        }
        let limit = 1 << 24
        func int(_ key: String, _ fallback: Int? = nil) throws -> Int {
            guard let v = g.metadata["\(arch).\(key)"] else {
                if let fallback { return fallback }
                throw bad("missing \(arch).\(key)")
            }
            guard let i = v.int, i > 0, i <= limit else { throw bad("\(arch).\(key) must be a positive integer up to \(limit)") }
            return i
        }
        architecture = hf
        modelType = arch
        hiddenSize = try int("embedding_length")
        intermediateSize = try int("feed_forward_length")
        layerCount = try int("block_count")
        headCount = try int("attention.head_count")
        kvHeadCount = try int("attention.head_count_kv", headCount)
        guard headCount % kvHeadCount == 0 else { throw bad("head_count is not a multiple of head_count_kv") }
        headDim = try int("attention.key_length", hiddenSize / headCount)
        guard headDim % 2 == 0 else { throw bad("head dimension must be even") }
        let tokens = g.metadata["tokenizer.ggml.tokens"]?.array?.count
        vocabSize = try int("vocab_size", tokens ?? g.info("token_embd.weight")?.dims.last ?? 0)
        maxPositions = try int("context_length", 2048)
        let eps = g.metadata["\(arch).attention.layer_norm_rms_epsilon"]?.double ?? 1e-6
        guard eps > 0, eps < 1 else { throw bad("layer_norm_rms_epsilon out of range") }
        rmsNormEps = Float(eps)
        ropeTheta = g.metadata["\(arch).rope.freq_base"]?.double ?? 10000
        guard ropeTheta > 1 else { throw bad("rope.freq_base must be greater than 1") }
        switch g.metadata["\(arch).rope.scaling.type"]?.string {
        case nil, "none": ropeScaling = .none
        case "linear":
            guard let f = g.metadata["\(arch).rope.scaling.factor"]?.double, f > 0 else { throw bad("linear RoPE scaling needs a factor") }
            ropeScaling = .linear(factor: f)
        case let t?: throw PeregrineError.unsupported("unsupported GGUF rope scaling '\(t)'")
        }
        tieWordEmbeddings = g.info("output.weight") == nil
        qkvBias = g.info("blk.0.attn_q.bias") != nil
        outputBias = g.info("blk.0.attn_output.bias") != nil
        mlpBias = g.info("blk.0.ffn_up.bias") != nil
        qkNorm = g.info("blk.0.attn_q_norm.weight") != nil
        let window = g.metadata["\(arch).attention.sliding_window"]?.int
        slidingWindow = [Int?](repeating: window, count: layerCount)
        torchDType = nil
        bosTokenId = g.metadata["tokenizer.ggml.bos_token_id"]?.int
        eosTokenIds = g.metadata["tokenizer.ggml.eos_token_id"]?.int.map { [$0] } ?? []
        // llama.cpp's converter permutes llama q/k rows for its adjacent-pair RoPE; Qwen files
        // keep the halves convention.
        ropeInterleaved = arch == "llama"
        if let f = g.view("rope_freqs.weight") {
            guard f.elementCount == headDim / 2 else { throw bad("rope_freqs has \(f.elementCount) values, expected \(headDim / 2)") }
            ropeFrequencyFactors = f.toFloat()
        }
    }

    /// The RoPE variant of every layer.
    public var rope: RopeParameters {
        RopeParameters(theta: ropeTheta, scaling: ropeScaling, frequencyFactors: ropeFrequencyFactors)
    }

    /// The inverse frequency of each rotary pair, after scaling.
    public func ropeInverseFrequencies() -> [Float] { rope.inverseFrequencies(headDim: headDim) }
}
