/// The mixture-of-experts part of a config (Mixtral, Qwen2-MoE, Qwen3-MoE): in each sparse
/// layer a router picks `used` of `count` gated MLPs per token, whose outputs are summed with
/// the router's weights; other layers keep a dense MLP of the config's intermediate size.
public struct ExpertConfig: Equatable, Sendable {
    /// Routed experts in a sparse layer.
    public var count: Int
    /// Experts each token is routed to (top-k).
    public var used: Int
    /// Intermediate size of each routed expert.
    public var intermediateSize: Int
    /// Divide the chosen experts' probabilities by their sum (Mixtral, Qwen3-MoE's
    /// `norm_topk_prob`); otherwise they are the softmax's own.
    public var normalizeWeights: Bool
    /// A shared expert of this intermediate size that every token goes through, scaled by the
    /// sigmoid of its own one-row gate (Qwen2-MoE).
    public var sharedIntermediateSize: Int?
    /// Per layer: routed experts (true) or the dense MLP.
    public var sparseLayers: [Bool]

    /// Most experts a layer may have, and the most a token may use: real models have up to a
    /// few hundred and use up to a few dozen.
    static let maxExperts = 4096

    public init(count: Int, used: Int, intermediateSize: Int, normalizeWeights: Bool, sharedIntermediateSize: Int? = nil,
                sparseLayers: [Bool]) {
        self.count = count
        self.used = used
        self.intermediateSize = intermediateSize
        self.normalizeWeights = normalizeWeights
        self.sharedIntermediateSize = sharedIntermediateSize
        self.sparseLayers = sparseLayers
    }

    /// Checks the counts against each other.
    func validate(_ bad: (String) -> PeregrineError) throws {
        guard count >= 1, count <= ExpertConfig.maxExperts else { throw bad("expert count \(count) must be between 1 and \(ExpertConfig.maxExperts)") }
        guard used >= 1, used <= count else { throw bad("experts used per token (\(used)) must be between 1 and the expert count (\(count))") }
        guard intermediateSize >= 1 else { throw bad("expert intermediate size must be positive") }
        if let s = sharedIntermediateSize, s < 1 { throw bad("shared expert intermediate size must be positive") }
    }

    /// From config.json: Mixtral's `num_local_experts` experts of `intermediate_size`, or
    /// Qwen-MoE's `num_experts` experts of `moe_intermediate_size` (with Qwen2-MoE's shared
    /// expert), sparse in every `decoder_sparse_step`-th layer not listed in `mlp_only_layers`.
    /// Nil for architectures without experts.
    init?(json: JSONValue, architecture: String, layers: Int, intermediateSize: Int, bad: (String) -> PeregrineError) throws {
        func int(_ keys: [String], _ fallback: Int? = nil) throws -> Int {
            for key in keys {
                guard let v = json[key], !v.isNull else { continue }
                guard let i = v.int, i >= 0, i <= 1 << 24 else { throw bad("'\(key)' must be a non-negative integer") }
                return i
            }
            if let fallback { return fallback }
            throw bad("missing '\(keys[0])'")
        }
        switch architecture {
        case "MixtralForCausalLM":
            count = try int(["num_local_experts"])
            used = try int(["num_experts_per_tok"], 2)
            self.intermediateSize = intermediateSize
            normalizeWeights = true
            sharedIntermediateSize = nil
            sparseLayers = [Bool](repeating: true, count: layers)
        case "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM":
            count = try int(["num_experts", "num_local_experts"])
            used = try int(["num_experts_per_tok"])
            self.intermediateSize = try int(["moe_intermediate_size"])
            normalizeWeights = json["norm_topk_prob"]?.bool ?? false
            // Required: transformers would otherwise build a shared expert of its default size.
            let shared = architecture == "Qwen2MoeForCausalLM" ? try int(["shared_expert_intermediate_size"]) : 0
            sharedIntermediateSize = shared > 0 ? shared : nil
            let step = try int(["decoder_sparse_step"], 1)
            guard step >= 1 else { throw bad("'decoder_sparse_step' must be at least 1") }
            guard json["mlp_only_layers"].map({ $0.isNull || $0.array != nil }) ?? true else { throw bad("'mlp_only_layers' must be a list") }
            var dense = Set<Int>()
            for v in json["mlp_only_layers"]?.array ?? [] {
                guard let i = v.int, i >= 0, i < layers else { throw bad("'mlp_only_layers' lists a layer outside 0..<\(layers)") }
                dense.insert(i)
            }
            sparseLayers = (0..<layers).map { !dense.contains($0) && ($0 + 1) % step == 0 }
        default:
            return nil
        }
        try validate(bad)
    }

    /// From GGUF metadata: `<arch>.expert_count` and `expert_used_count`, the experts' size in
    /// `expert_feed_forward_length` (the dense size where absent: llama files of Mixtral), the
    /// shared expert's in `expert_shared_feed_forward_length` (Qwen2-MoE; the dense size where
    /// absent, as llama.cpp reads it). A layer is sparse where it has a router or stacked experts
    /// (`blk.N.ffn_gate_inp.weight`, `blk.N.ffn_*_exps.weight`). The chosen weights are normalized as llama.cpp does for
    /// the architecture (all but qwen2moe), unless `expert_weights_norm` says otherwise. Nil when
    /// the file has no expert count.
    init?(gguf g: GGUFFile, architecture arch: String, layers: Int, intermediateSize: Int, bad: (String) -> PeregrineError) throws {
        guard g.metadata["\(arch).expert_count"] != nil else { return nil }
        func int(_ key: String, _ fallback: Int? = nil) throws -> Int {
            guard let v = g.metadata["\(arch).\(key)"] else {
                if let fallback { return fallback }
                throw bad("missing \(arch).\(key)")
            }
            guard let i = v.int, i >= 0, i <= 1 << 24 else { throw bad("\(arch).\(key) must be a non-negative integer") }
            return i
        }
        count = try int("expert_count")
        used = try int("expert_used_count")
        self.intermediateSize = try int("expert_feed_forward_length", intermediateSize)
        normalizeWeights = g.metadata["\(arch).expert_weights_norm"]?.bool ?? (arch != "qwen2moe")
        if let f = g.metadata["\(arch).expert_gating_func"] {
            // llama.cpp's gating functions: 1 softmax, 2 sigmoid.
            guard f.int == 1 else { throw PeregrineError.unsupported("\(g.path): expert gating function \(f) (only softmax is supported)") }
        }
        if let s = g.metadata["\(arch).expert_weights_scale"]?.double, s != 1 {
            throw PeregrineError.unsupported("\(g.path): expert weights scaled by \(s) (only 1 is supported)")
        }
        if g.info("blk.0.ffn_gate_inp_shexp.weight") != nil || g.info("blk.0.ffn_up_shexp.weight") != nil {
            sharedIntermediateSize = try int("expert_shared_feed_forward_length", intermediateSize)
        } else {
            sharedIntermediateSize = nil
        }
        sparseLayers = (0..<layers).map { i in
            ["ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"].contains { g.info("blk.\(i).\($0).weight") != nil }
        }
        guard count > 0 else { return nil }
        try validate(bad)
    }
}
