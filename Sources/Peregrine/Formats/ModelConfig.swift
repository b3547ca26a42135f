/// The hyperparameters of a decoder-only transformer, read from a Hugging Face config.json or GGUF
/// metadata. One struct serves Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3 and the
/// mixture-of-experts families: they differ only in switches.
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
    /// The dimensions of each head that RoPE rotates, the first ones: `headDim`, or fewer with
    /// a partial rotary factor (the rest pass unrotated).
    public var rotaryDim: Int

    /// Routed experts in place of the dense MLP (Mixtral, Qwen2-MoE, Qwen3-MoE); nil for a dense model.
    public var experts: ExpertConfig?

    /// The RoPE of the layers with a sliding window, where it differs from `rope` (Gemma 3's
    /// local layers: their own base, no scaling).
    public var slidingRope: RopeParameters?
    /// What every RMSNorm weight is offset by: Gemma's norms multiply by (1 + weight) in the
    /// Hugging Face layout (llama.cpp's converter stores the sum, so its GGUF files say 0).
    public var normWeightOffset: Float = 0
    /// The activation of the gated MLP.
    public var hiddenActivation: GatedActivation = .silu
    /// The factor the token embeddings are multiplied by (Gemma: sqrt(hidden size)).
    public var embeddingScale: Float?
    /// The attention scale where it is not 1 / sqrt(head size) (Gemma: query_pre_attn_scalar^-0.5).
    public var attentionScale: Float?
    /// Soft-capping of attention scores and of the final logits: cap * tanh(x / cap) (Gemma 2).
    public var attentionSoftCap: Float?
    public var finalLogitSoftCap: Float?
    /// The text model of a vision-language checkpoint (Gemma3ForConditionalGeneration): its
    /// weights are named under the language model (see `LanguageModelWeights`).
    public var weightsUnderLanguageModel = false

    /// Architectures whose config.json this struct reads (the model registry maps each to code).
    public static let supportedArchitectures = [
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM",
        "Gemma3ForConditionalGeneration",
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
        if arch == "Gemma3ForConditionalGeneration" {
            self = try ModelConfig(gemma3TextOf: json, source: source)
            return
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
        let ropeJSON = json["rope_scaling"] ?? json["rope_parameters"]
        // The rope dictionary's partial_rotary_factor wins over the top-level one, as transformers
        // merges them; transformers rotates int(head_dim * factor) dimensions.
        let partialKey = ropeJSON?["partial_rotary_factor"] != nil ? ropeJSON?["partial_rotary_factor"] : json["partial_rotary_factor"]
        rotaryDim = headDim
        if let partialKey, !partialKey.isNull {
            guard let f = partialKey.double, f > 0, f <= 1 else { throw bad("'partial_rotary_factor' must be a number in (0, 1]") }
            let dims = Int((Double(headDim) * f).rounded(.down))
            guard dims >= 2, dims % 2 == 0 else {
                throw bad("partial_rotary_factor \(f) rotates \(dims) of the head's \(headDim) dimensions; RoPE needs an even number, at least 2")
            }
            rotaryDim = dims
        }
        // Phi-3's config keeps the pretraining context at the top level (4096 when absent), and
        // transformers prefers it to the rope dictionary's; other families take the rope
        // dictionary's, then max_position_embeddings.
        let originalMax = try optInt("original_max_position_embeddings")
            ?? (arch == "Phi3ForCausalLM" ? 4096 : nil)
        ropeScaling = try ModelConfig.parseRopeScaling(ropeJSON, bad: bad, rotaryPairs: rotaryDim / 2, maxPositions: maxPositions,
                                                       originalMaxPositions: originalMax,
                                                       longropeAliases: arch == "Phi3ForCausalLM" ? ["su", "yarn"] : [])

        let attentionBias = json["attention_bias"]?.bool ?? false
        switch arch {
        case "Qwen2ForCausalLM":
            qkvBias = true
            outputBias = false
        case "Qwen2MoeForCausalLM":
            qkvBias = json["qkv_bias"]?.bool ?? true
            outputBias = false
        default:
            qkvBias = attentionBias
            outputBias = attentionBias
        }
        mlpBias = json["mlp_bias"]?.bool ?? false
        qkNorm = arch == "Qwen3ForCausalLM" || arch == "Qwen3MoeForCausalLM"
        if arch == "Phi3ForCausalLM" {
            // transformers' Phi-3 has no biases, whatever the config says.
            qkvBias = false
            outputBias = false
            mlpBias = false
        }

        // Qwen2-MoE's configs write a window of 0 when sliding windows are off.
        let window = json["sliding_window"]?.int == 0 ? nil : try optInt("sliding_window")
        var windows = [Int?](repeating: nil, count: layerCount)
        if let window {
            switch arch {
            case "MistralForCausalLM", "Phi3ForCausalLM", "MixtralForCausalLM":
                windows = [Int?](repeating: window, count: layerCount)
            case "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM":
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
        experts = try ExpertConfig(json: json, architecture: arch, layers: layerCount, intermediateSize: intermediateSize, bad: bad)
        if arch == "Gemma2ForCausalLM" || arch == "Gemma3ForCausalLM" { try readGemma(json, bad: bad) }
    }

    /// The text model of a Gemma 3 vision-language checkpoint: its text_config, read as a
    /// Gemma3ForCausalLM config with Gemma3TextConfig's defaults for what the Hub's configs leave
    /// out (they list little beyond the sizes that differ); the images are not read.
    private init(gemma3TextOf json: JSONValue, source: String) throws {
        guard let text = json["text_config"]?.object else {
            throw PeregrineError.format("\(source): Gemma3ForConditionalGeneration without a text_config object")
        }
        var o = text
        o["architectures"] = .array([.string("Gemma3ForCausalLM")])
        o["model_type"] = .string("gemma3_text")
        let defaults: [(String, JSONValue)] = [
            ("vocab_size", .number(262_208)), ("hidden_size", .number(2304)), ("intermediate_size", .number(9216)),
            ("num_hidden_layers", .number(26)), ("num_attention_heads", .number(8)), ("num_key_value_heads", .number(4)),
            ("max_position_embeddings", .number(131_072)),
        ]
        for (k, v) in defaults where o[k] == nil { o[k] = v }
        for k in ["bos_token_id", "eos_token_id", "tie_word_embeddings", "torch_dtype", "dtype"] where o[k] == nil {
            if let v = json[k] { o[k] = v }
        }
        try self.init(json: .object(o), source: source)
        weightsUnderLanguageModel = true
    }

    /// Gemma 2 and 3 (text): what their config.json adds, with transformers' defaults for what a
    /// saved config leaves out (it omits values equal to its class's defaults).
    private mutating func readGemma(_ json: JSONValue, bad: (String) -> PeregrineError) throws {
        let gemma3 = architecture == "Gemma3ForCausalLM"
        func positive(_ key: String, _ fallback: Double?) throws -> Double? {
            guard let v = json[key], !v.isNull else { return fallback }
            guard let d = v.double, d > 0, d.isFinite else { throw bad("'\(key)' must be a positive number") }
            return d
        }
        if json["use_bidirectional_attention"]?.bool == true {
            throw PeregrineError.unsupported("\(architecture) with use_bidirectional_attention (an encoder) is not supported")
        }
        if json["head_dim"] == nil {
            headDim = 256  // the class default, independent of hidden size / heads
            rotaryDim = headDim
        }
        guard headDim % 2 == 0 else { throw bad("head_dim must be even for rotary embeddings") }
        if json["rms_norm_eps"] == nil { rmsNormEps = 1e-6 }
        if json["tie_word_embeddings"] == nil { tieWordEmbeddings = true }
        let act = json["hidden_activation"]?.string ?? json["hidden_act"]?.string ?? "gelu_pytorch_tanh"
        guard act == "gelu_pytorch_tanh" || act == "gelu_tanh" else {
            throw PeregrineError.unsupported("\(architecture) with hidden_activation '\(act)' is not supported (gelu_pytorch_tanh is)")
        }
        hiddenActivation = .geluTanh
        normWeightOffset = 1
        qkNorm = gemma3
        embeddingScale = Float(Double(hiddenSize).squareRoot())
        let scalar = try positive("query_pre_attn_scalar", 256)!
        attentionScale = Float(1 / scalar.squareRoot())
        // Gemma 3 keeps the key in its config but applies no attention soft-capping.
        attentionSoftCap = gemma3 ? nil : try positive("attn_logit_softcapping", json["attn_logit_softcapping"]?.isNull == true ? nil : 50).map(Float.init)
        finalLogitSoftCap = try positive("final_logit_softcapping", gemma3 || json["final_logit_softcapping"]?.isNull == true ? nil : 30).map(Float.init)
        let window: Int?
        if let v = json["sliding_window"], !v.isNull {
            guard let w = v.int, w > 0 else { throw bad("'sliding_window' must be a positive integer") }
            window = w
        } else {
            window = json["sliding_window"] == nil ? 4096 : nil
        }
        var windows = [Int?](repeating: nil, count: layerCount)
        if let types = json["layer_types"] {
            guard let list = types.array, list.count == layerCount else { throw bad("'layer_types' must list one type per layer (\(layerCount))") }
            for (i, t) in list.enumerated() {
                switch t.string {
                case "sliding_attention": windows[i] = window
                case "full_attention": windows[i] = nil
                default: throw bad("layer_types[\(i)]: unknown layer type \(t)")
                }
            }
        } else {
            // Gemma 2 alternates (sliding first); Gemma 3 makes every `sliding_window_pattern`-th layer global.
            let pattern = gemma3 ? (json["sliding_window_pattern"]?.int ?? 6) : 2
            guard pattern > 0 else { throw bad("'sliding_window_pattern' must be a positive integer") }
            for i in 0..<layerCount where (i + 1) % pattern != 0 { windows[i] = window }
        }
        slidingWindow = windows
        // RoPE: Gemma 2 one variant; Gemma 3 its global layers' (rope_theta, rope_scaling) and its
        // local layers' (rope_local_base_freq, unscaled), or both under rope_parameters by layer type.
        if let params = json["rope_parameters"]?.object, params["full_attention"] != nil || params["sliding_attention"] != nil {
            func variant(_ v: JSONValue?, theta fallback: Double) throws -> RopeParameters {
                let theta = v?["rope_theta"]?.double ?? fallback
                guard theta > 1 else { throw bad("'rope_theta' must be greater than 1") }
                return RopeParameters(theta: theta, scaling: try ModelConfig.parseRopeScaling(v, bad: bad, rotaryPairs: rotaryDim / 2,
                                                                                             maxPositions: maxPositions, originalMaxPositions: nil))
            }
            let global = try variant(params["full_attention"], theta: gemma3 ? 1_000_000 : 10000)
            ropeTheta = global.theta
            ropeScaling = global.scaling
            slidingRope = try variant(params["sliding_attention"], theta: gemma3 ? 10000 : global.theta)
        } else {
            if json["rope_theta"] == nil, json["rope_parameters"]?["rope_theta"] == nil { ropeTheta = gemma3 ? 1_000_000 : 10000 }
            if gemma3 {
                let local = try positive("rope_local_base_freq", 10000)!
                guard local > 1 else { throw bad("'rope_local_base_freq' must be greater than 1") }
                slidingRope = RopeParameters(theta: local)
            }
        }
        if slidingRope == rope { slidingRope = nil }
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
        case "phi3": return "Phi3ForCausalLM"
        case "mixtral": return "MixtralForCausalLM"
        case "qwen2_moe": return "Qwen2MoeForCausalLM"
        case "qwen3_moe": return "Qwen3MoeForCausalLM"
        case "gemma2": return "Gemma2ForCausalLM"
        case "gemma3_text": return "Gemma3ForCausalLM"
        case "gemma3": return "Gemma3ForConditionalGeneration"
        default: return nil
        }
    }

    /// rope_scaling (or rope_parameters). LongRoPE needs `rotaryPairs` factors in each list; its
    /// pretraining context is `originalMaxPositions` when the config gives one at the top level,
    /// else the dictionary's, else `maxPositions`. `longropeAliases`: older names of LongRoPE
    /// that a family's config may still carry (Phi-3: "su", "yarn").
    static func parseRopeScaling(_ v: JSONValue?, bad: (String) -> PeregrineError, rotaryPairs: Int, maxPositions: Int,
                                 originalMaxPositions: Int?, longropeAliases: Set<String> = []) throws -> RopeScaling {
        guard let v, let o = v.object else { return .none }
        var type = o["rope_type"]?.string ?? o["type"]?.string ?? "default"
        if longropeAliases.contains(type) { type = "longrope" }
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
        case "longrope":
            func factors(_ key: String) throws -> [Float] {
                guard let list = o[key]?.array else { throw bad("rope_scaling of type longrope needs '\(key)', a list of \(rotaryPairs) numbers") }
                guard list.count == rotaryPairs else {
                    throw bad("rope_scaling '\(key)' has \(list.count) values, expected \(rotaryPairs) (one per rotary pair)")
                }
                return try list.map {
                    guard let d = $0.double, d.isFinite, d > 0 else { throw bad("rope_scaling '\(key)' values must be positive numbers") }
                    return Float(d)
                }
            }
            let short = try factors("short_factor"), long = try factors("long_factor")
            let dictOrig = o["original_max_position_embeddings"]
            if let dictOrig, dictOrig.int == nil { throw bad("rope_scaling 'original_max_position_embeddings' must be an integer") }
            let orig = originalMaxPositions ?? dictOrig?.int ?? maxPositions
            guard orig > 1 else { throw bad("LongRoPE's original_max_position_embeddings must be greater than 1") }
            let scale: Double
            if let f = o["factor"], !f.isNull {
                guard let d = f.double, d.isFinite, d > 0 else { throw bad("rope_scaling 'factor' must be a positive number") }
                scale = d
            } else {
                scale = Double(maxPositions) / Double(orig)
            }
            var attention = LongRoPE.defaultAttentionFactor(scale: scale, originalMaxPositions: orig)
            if let a = o["attention_factor"], !a.isNull {
                guard let d = a.double, d.isFinite, d > 0 else { throw bad("rope_scaling 'attention_factor' must be a positive number") }
                attention = d
            }
            return .longrope(LongRoPE(shortFactors: short, longFactors: long, originalMaxPositions: orig, attentionFactor: attention))
        default:
            throw PeregrineError.unsupported("unsupported rope_scaling type '\(type)' (supported: linear, llama3, longrope)")
        }
    }

    /// From the metadata of a GGUF file (architectures llama, with or without experts, qwen2,
    /// qwen3, qwen2moe, qwen3moe). Which optional weights exist (biases, q/k norms, an output
    /// matrix, a layer's router) is read from the tensors.
    public init(gguf g: GGUFFile) throws {
        func bad(_ m: String) -> PeregrineError { .format("\(g.path): \(m)") }
        guard let arch = g.metadata["general.architecture"]?.string else { throw bad("no general.architecture") }
        // Family by family, in the order the error lists them.
        let archs = [("gemma2", "Gemma2ForCausalLM"), ("gemma3", "Gemma3ForCausalLM"), ("llama", "LlamaForCausalLM"),
                     ("phi3", "Phi3ForCausalLM"), ("qwen2", "Qwen2ForCausalLM"), ("qwen2moe", "Qwen2MoeForCausalLM"),
                     ("qwen3", "Qwen3ForCausalLM"), ("qwen3moe", "Qwen3MoeForCausalLM")]
        guard let hf = archs.first(where: { $0.0 == arch })?.1 else {
            throw PeregrineError.unsupported("unsupported GGUF architecture \(arch); supported: \(archs.map(\.0).joined(separator: ", "))")
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
        // 0 says there is none (llama.cpp's converter writes 0 for Phi-4).
        let window = g.metadata["\(arch).attention.sliding_window"]?.int.flatMap { $0 > 0 ? $0 : nil }
        slidingWindow = [Int?](repeating: window, count: layerCount)
        torchDType = nil
        bosTokenId = g.metadata["tokenizer.ggml.bos_token_id"]?.int
        eosTokenIds = g.metadata["tokenizer.ggml.eos_token_id"]?.int.map { [$0] } ?? []
        // llama.cpp's converter permutes llama q/k rows for its adjacent-pair RoPE; Qwen and Phi-3
        // files keep the halves convention.
        ropeInterleaved = arch == "llama"
        rotaryDim = try int("rope.dimension_count", headDim)
        guard rotaryDim % 2 == 0, rotaryDim <= headDim else {
            throw bad("rope.dimension_count \(rotaryDim) must be even and at most the head dimension \(headDim)")
        }
        // LongRoPE: both factor lists as tensors, llama.cpp's names; the pretraining context and
        // the attention factor in the metadata.
        let long = g.view("rope_factors_long.weight"), short = g.view("rope_factors_short.weight")
        if long != nil || short != nil {
            guard let long, let short else { throw bad("rope_factors_long and rope_factors_short come together; one is missing") }
            for f in [long, short] where f.elementCount != rotaryDim / 2 || f.shape.count != 1 {
                throw bad("\(f.name) has shape \(f.shape), expected [\(rotaryDim / 2)] (one value per rotary pair)")
            }
            let orig = try int("rope.scaling.original_context_length", maxPositions)
            guard orig > 1 else { throw bad("rope.scaling.original_context_length must be greater than 1") }
            let attention = g.metadata["\(arch).rope.scaling.attn_factor"]?.double ?? 1
            guard attention.isFinite, attention > 0 else { throw bad("rope.scaling.attn_factor must be a positive number") }
            let factors = [long.toFloat(), short.toFloat()]
            guard factors.joined().allSatisfy({ $0.isFinite && $0 > 0 }) else { throw bad("RoPE factors must be positive numbers") }
            guard ropeScaling == .none else { throw bad("LongRoPE factors beside another RoPE scaling") }
            ropeScaling = .longrope(LongRoPE(shortFactors: factors[1], longFactors: factors[0], originalMaxPositions: orig,
                                             attentionFactor: attention))
        }
        if let f = g.view("rope_freqs.weight") {
            guard f.elementCount == rotaryDim / 2 else { throw bad("rope_freqs has \(f.elementCount) values, expected \(rotaryDim / 2)") }
            ropeFrequencyFactors = f.toFloat()
        }
        experts = try ExpertConfig(gguf: g, architecture: arch, layers: layerCount, intermediateSize: intermediateSize, bad: bad)
        if arch == "qwen2moe" || arch == "qwen3moe" {
            guard experts != nil else { throw bad("missing \(arch).expert_count") }
        }
        // A llama file with experts is Mixtral.
        if arch == "llama" && experts != nil { architecture = "MixtralForCausalLM" }
        if arch == "gemma2" || arch == "gemma3" { try readGemma(g, arch: arch, bad: bad) }
    }

    /// Gemma 2 and 3 as llama.cpp reads them: the converter stores norm weights with the 1 added,
    /// the attention scale follows from the sizes, and what the metadata leaves out takes
    /// llama.cpp's defaults (a sliding window of 4096 and both soft-caps for Gemma 2; Gemma 3's
    /// local layers at base 10000, unscaled).
    private mutating func readGemma(_ g: GGUFFile, arch: String, bad: (String) -> PeregrineError) throws {
        let gemma3 = arch == "gemma3"
        func number(_ key: String) throws -> Double? {
            guard let v = g.metadata["\(arch).\(key)"] else { return nil }
            guard let d = v.double, d.isFinite, d >= 0 else { throw bad("\(arch).\(key) must be a non-negative number") }
            return d
        }
        hiddenActivation = .geluTanh
        normWeightOffset = 0
        embeddingScale = Float(hiddenSize).squareRoot()
        // llama.cpp's rule: 1 / sqrt(head size), but hidden / heads for the 27B models (46 layers
        // of Gemma 2, 62 of Gemma 3), whose query_pre_attn_scalar is that.
        let bigModel = layerCount == (gemma3 ? 62 : 46)
        attentionScale = 1 / Float(bigModel ? hiddenSize / headCount : headDim).squareRoot()
        if !gemma3 {
            let cap = try number("attn_logit_softcapping") ?? 50
            guard cap > 0 else { throw bad("\(arch).attn_logit_softcapping must be positive") }
            attentionSoftCap = Float(cap)
        }
        // A final cap of 0 is none (Gemma 3); Gemma 2 always caps.
        let finalCap = try number("final_logit_softcapping") ?? (gemma3 ? 0 : 30)
        guard finalCap > 0 || gemma3 else { throw bad("\(arch).final_logit_softcapping must be positive") }
        finalLogitSoftCap = finalCap > 0 ? Float(finalCap) : nil
        let window = try g.metadata["\(arch).attention.sliding_window"].map { v -> Int in
            guard let w = v.int, w >= 0 else { throw bad("\(arch).attention.sliding_window must be a non-negative integer") }
            return w
        } ?? (gemma3 ? 0 : 4096)
        var windows = [Int?](repeating: nil, count: layerCount)
        if window > 0 {
            if let pattern = g.metadata["\(arch).attention.sliding_window_pattern"] {
                if let flags = pattern.array {
                    guard flags.count == layerCount else { throw bad("\(arch).attention.sliding_window_pattern has \(flags.count) entries for \(layerCount) layers") }
                    for (i, f) in flags.enumerated() where f.bool == true { windows[i] = window }
                } else {
                    guard let n = pattern.int, n >= 0 else { throw bad("\(arch).attention.sliding_window_pattern must be a count or per-layer flags") }
                    // Every n-th layer global (n 0: every layer sliding).
                    for i in 0..<layerCount where n == 0 || i % n < n - 1 { windows[i] = window }
                }
            } else {
                let n = gemma3 ? 6 : 2
                for i in 0..<layerCount where i % n < n - 1 { windows[i] = window }
            }
        }
        slidingWindow = windows
        let localBase = try number("rope.freq_base_swa") ?? (gemma3 ? 10000 : ropeTheta)
        slidingRope = RopeParameters(theta: localBase, scaling: gemma3 ? .none : ropeScaling)
        if slidingRope == rope { slidingRope = nil }
    }

    /// The RoPE variant of every layer.
    public var rope: RopeParameters {
        RopeParameters(theta: ropeTheta, scaling: ropeScaling, frequencyFactors: ropeFrequencyFactors,
                       rotaryDim: rotaryDim == headDim ? nil : rotaryDim)
    }

    /// The inverse frequency of each rotary pair, after scaling.
    public func ropeInverseFrequencies() -> [Float] { rope.inverseFrequencies(headDim: headDim) }
}
