import Foundation

/// A Hugging Face model directory described as llama.cpp's converter would write it: GGUF
/// metadata (hyperparameters and the byte-level BPE tokenizer) and the tensors under their GGUF
/// names. Llama q/k rows are reordered for llama.cpp's adjacent-pair RoPE, as its converter does;
/// each projection of a layer's experts becomes one stacked tensor (`ffn_*_exps`), as there;
/// Phi-3 keeps its fused projections (attn_qkv, ffn_up holding gate over up) and LongRoPE's factors
/// as tensors, as llama.cpp's converter writes them. Gemma 2 and 3 store their norm weights with
/// the 1 their RMSNorm adds already added, and the soft-caps, sliding window and local RoPE base as
/// metadata (llama.cpp derives the attention scale and the layer pattern from the sizes).
struct HFToGGUF {
    let config: ModelConfig
    var writer = GGUFWriter()
    /// Each tensor's GGUF name, dimensions (innermost first) and data: one view, or one per
    /// expert of a stacked tensor, in order.
    var tensors: [(name: String, dims: [Int], parts: [TensorView])] = []
    private let store: WeightStore

    init(directory: String) throws {
        let configPath = FileSystem.join(directory, "config.json")
        guard FileSystem.isDirectory(directory), FileSystem.exists(configPath) else {
            throw PeregrineError.io("\(directory): neither a GGUF file nor a model directory with config.json")
        }
        let c = try ModelConfig(json: try FileSystem.readJSON(configPath), source: configPath)
        config = c
        store = try WeightStore(directory: directory)
        let arch: String
        switch c.architecture {
        case "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM": arch = "llama"
        case "Qwen2ForCausalLM": arch = "qwen2"
        case "Qwen3ForCausalLM": arch = "qwen3"
        case "Qwen2MoeForCausalLM": arch = "qwen2moe"
        case "Qwen3MoeForCausalLM": arch = "qwen3moe"
        case "Phi3ForCausalLM": arch = "phi3"
        case "Gemma2ForCausalLM": arch = "gemma2"
        case "Gemma3ForCausalLM": arch = "gemma3"
        default: throw PeregrineError.unsupported("unsupported architecture \(c.architecture) for GGUF output")
        }
        let gemma = arch == "gemma2" || arch == "gemma3"
        if gemma { try HFToGGUF.checkGemmaFitsGGUF(c, arch: arch, directory: directory) }
        if arch == "llama" && c.qkNorm {
            throw PeregrineError.unsupported("\(directory): a llama model with q/k norms cannot be written as a llama GGUF")
        }
        var w = GGUFWriter()
        w.set("general.architecture", .string(arch))
        w.set("general.name", .string(URL(fileURLWithPath: directory).lastPathComponent))
        func u32(_ key: String, _ v: Int) { w.set("\(arch).\(key)", .u32(UInt32(v))) }
        u32("vocab_size", c.vocabSize)
        u32("context_length", c.maxPositions)
        u32("embedding_length", c.hiddenSize)
        u32("block_count", c.layerCount)
        u32("feed_forward_length", c.intermediateSize)
        u32("attention.head_count", c.headCount)
        u32("attention.head_count_kv", c.kvHeadCount)
        u32("attention.key_length", c.headDim)
        u32("attention.value_length", c.headDim)
        u32("rope.dimension_count", c.rotaryDim)
        w.set("\(arch).attention.layer_norm_rms_epsilon", .f32(c.rmsNormEps))
        w.set("\(arch).rope.freq_base", .f32(Float(c.ropeTheta)))
        if gemma {
            if let cap = c.attentionSoftCap { w.set("\(arch).attn_logit_softcapping", .f32(cap)) }
            if let cap = c.finalLogitSoftCap { w.set("\(arch).final_logit_softcapping", .f32(cap)) }
            if arch == "gemma3" { w.set("\(arch).rope.freq_base_swa", .f32(Float((c.slidingRope ?? c.rope).theta))) }
        }
        if let window = c.slidingWindow.compactMap({ $0 }).first {
            u32("attention.sliding_window", window)
        } else if arch == "phi3" {
            u32("attention.sliding_window", 0)  // none, as llama.cpp's converter says it
        }
        if let e = c.experts {
            u32("expert_count", e.count)
            u32("expert_used_count", e.used)
            if arch != "llama" { u32("expert_feed_forward_length", e.intermediateSize) }
            if let s = e.sharedIntermediateSize { u32("expert_shared_feed_forward_length", s) }
            // llama.cpp normalizes the chosen weights for every architecture but qwen2moe; the
            // key is written only where the config disagrees.
            if e.normalizeWeights != (arch != "qwen2moe") { w.set("\(arch).expert_weights_norm", .bool(e.normalizeWeights)) }
        }
        var ropeFactors: [Float]?
        var longRoPE: LongRoPE?
        switch c.ropeScaling {
        case .none: break
        case .linear(let f):
            w.set("\(arch).rope.scaling.type", .string("linear"))
            w.set("\(arch).rope.scaling.factor", .f32(Float(f)))
        case .llama3:
            // Stored as per-pair frequency divisors (llama.cpp's rope_freqs tensor).
            var plain = c
            plain.ropeScaling = .none
            let base = plain.ropeInverseFrequencies(), scaled = c.ropeInverseFrequencies()
            ropeFactors = zip(base, scaled).map { $0 / $1 }
        case .longrope(let l):
            guard arch == "phi3" else { throw PeregrineError.unsupported("\(directory): LongRoPE cannot be written as a \(arch) GGUF") }
            u32("rope.scaling.original_context_length", l.originalMaxPositions)
            w.set("\(arch).rope.scaling.attn_factor", .f32(Float(l.attentionFactor)))
            longRoPE = l
        }
        try HFToGGUF.addTokenizer(directory: directory, config: c, to: &w)
        writer = w

        func vector(_ name: String, _ values: [Float]) -> (name: String, dims: [Int], parts: [TensorView]) {
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4 * max(values.count, 1), alignment: 16)
            for (i, f) in values.enumerated() { buffer.storeBytes(of: f, toByteOffset: 4 * i, as: Float.self) }
            owned.append(buffer)
            return (name, [values.count], [TensorView(name: name, dtype: .f32, shape: [values.count],
                                                      data: UnsafeRawPointer(buffer.baseAddress!), byteCount: 4 * values.count)])
        }

        // Tensors, in llama.cpp's order: embeddings, layers, output norm, output.
        var names = ["model.embed_tokens.weight"]
        var stacked: [String: [TensorView]] = [:]
        for i in 0..<c.layerCount where arch == "phi3" {
            let p = "model.layers.\(i)."
            names += ["input_layernorm.weight", "self_attn.qkv_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
                      "mlp.gate_up_proj.weight", "mlp.down_proj.weight"].map { p + $0 }
        }
        for i in 0..<c.layerCount where arch != "phi3" {
            let p = "model.layers.\(i)."
            names += ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                      "self_attn.o_proj.weight", "post_attention_layernorm.weight"].map { p + $0 }
            if gemma { names += ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"].map { p + $0 } }
            if let e = c.experts, e.sparseLayers[i] {
                let n = ExpertTensorNames(architecture: c.architecture, layer: i)
                names.append(n.router)
                for proj in ExpertTensorNames.Projection.allCases {
                    stacked[n.stacked(proj)] = try n.views(store, proj, experts: e.count, hidden: c.hiddenSize, intermediate: e.intermediateSize)
                    names.append(n.stacked(proj))
                }
                if let shared = n.shared, e.sharedIntermediateSize != nil {
                    names += [shared + "_gate.weight", shared + ".gate_proj.weight", shared + ".up_proj.weight", shared + ".down_proj.weight"]
                }
            } else {
                names += ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"].map { p + $0 }
            }
            for opt in ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
                        "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.bias", "mlp.up_proj.bias",
                        "mlp.down_proj.bias"] where store.contains(p + opt) {
                names.append(p + opt)
            }
        }
        names.append("model.norm.weight")
        if !c.tieWordEmbeddings && store.contains("lm_head.weight") { names.append("lm_head.weight") }
        for name in names {
            if let experts = stacked[name] {
                // [experts, rows, cols] outermost first: GGUF dims cols, rows, experts.
                tensors.append((GGUFWeights.ggufName(name), Array(experts[0].shape.reversed()) + [experts.count], experts))
                continue
            }
            guard let v = store.tensor(name) else { throw PeregrineError.format(store.missingReason(name)) }
            let ggufName = GGUFWeights.ggufName(name, layerNames: gemma ? GGUFWeights.gemmaLayerNames : [:])
            if gemma && ggufName.hasSuffix("norm.weight") {
                // Gemma's RMSNorm multiplies by (1 + weight); GGUF files hold the sum, in f32.
                tensors.append(vector(ggufName, v.toFloat().map { $0 + c.normWeightOffset }))
                continue
            }
            var view = v
            if arch == "llama", name.hasSuffix("q_proj.weight") || name.hasSuffix("k_proj.weight")
                || name.hasSuffix("q_proj.bias") || name.hasSuffix("k_proj.bias") {
                view = try HFToGGUF.pairRows(v, heads: name.contains("q_proj") ? c.headCount : c.kvHeadCount, owner: &owned)
            }
            tensors.append((ggufName, view.shape.reversed(), [view]))
        }
        if let ropeFactors { tensors.insert(vector("rope_freqs.weight", ropeFactors), at: 0) }
        if let l = longRoPE {
            tensors.insert(contentsOf: [vector("rope_factors_long.weight", l.longFactors), vector("rope_factors_short.weight", l.shortFactors)],
                           at: 0)
        }
    }

    /// What a Gemma GGUF cannot say: llama.cpp takes the attention scale from the sizes (1 /
    /// sqrt(head size), or hidden / heads for the 27B models) and the sliding layers from a fixed
    /// pattern (every second layer global for Gemma 2, every sixth for Gemma 3), and Gemma 3's
    /// local layers are unscaled. A config that differs would run differently from the file.
    static func checkGemmaFitsGGUF(_ c: ModelConfig, arch: String, directory: String) throws {
        let gemma3 = arch == "gemma3"
        let big = c.layerCount == (gemma3 ? 62 : 46)
        let derived = 1 / Float(big ? c.hiddenSize / c.headCount : c.headDim).squareRoot()
        if let scale = c.attentionScale, abs(scale - derived) > 1e-6 * derived {
            throw PeregrineError.unsupported("\(directory): query_pre_attn_scalar gives an attention scale of \(scale); a \(arch) GGUF implies \(derived)")
        }
        let n = gemma3 ? 6 : 2
        let window = c.slidingWindow.compactMap { $0 }.first
        for (i, w) in c.slidingWindow.enumerated() where w != (i % n < n - 1 ? window : nil) {
            throw PeregrineError.unsupported("\(directory): layer \(i)'s attention window differs from the \(arch) GGUF pattern (every \(n)th layer global)")
        }
        if gemma3, let local = c.slidingRope, local.scaling != .none {
            throw PeregrineError.unsupported("\(directory): scaled RoPE on the sliding layers cannot be written as a gemma3 GGUF")
        }
        if !gemma3, c.slidingRope != nil {
            throw PeregrineError.unsupported("\(directory): a second RoPE variant cannot be written as a gemma2 GGUF")
        }
    }

    /// Buffers of reordered tensors; they live as long as the conversion (freed by `release`).
    var owned: [UnsafeMutableRawBufferPointer] = []

    func release() { for b in owned { b.deallocate() } }

    /// Reorders the rows of each head (or a bias's values) from halves (i, i + d/2) to adjacent
    /// pairs (2i, 2i + 1).
    static func pairRows(_ t: TensorView, heads: Int, owner: inout [UnsafeMutableRawBufferPointer]) throws -> TensorView {
        guard t.dtype.isFloat, t.shape.count <= 2, t.shape[0] % (2 * heads) == 0 else {
            throw PeregrineError.format("tensor '\(t.name)' cannot be split into \(heads) heads")
        }
        let rowBytes = t.byteCount / t.shape[0], headDim = t.shape[0] / heads, half = headDim / 2
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: t.byteCount, alignment: 64)
        owner.append(buffer)
        for h in 0..<heads {
            for i in 0..<half {
                for j in 0..<2 {
                    let to = h * headDim + 2 * i + j, from = h * headDim + j * half + i
                    (buffer.baseAddress! + to * rowBytes).copyMemory(from: t.data + from * rowBytes, byteCount: rowBytes)
                }
            }
        }
        return TensorView(name: t.name, dtype: t.dtype, shape: t.shape, data: UnsafeRawPointer(buffer.baseAddress!), byteCount: t.byteCount)
    }

    /// tokenizer.json's BPE as a GGUF tokenizer: byte-level BPE as "gpt2" (tokens, types,
    /// merges), SentencePiece-style BPE with byte fallback as "llama" (tokens, types and scores:
    /// each token scores minus the rank of the merge that makes it, so merging by score is
    /// merging by rank).
    static func addTokenizer(directory: String, config c: ModelConfig, to w: inout GGUFWriter) throws {
        let path = FileSystem.join(directory, "tokenizer.json")
        // A special token's id as GGUF stores it: one of the vocabulary's.
        func tokenId(_ id: Int, _ name: String) throws -> UInt32 {
            guard id >= 0, id < c.vocabSize, let stored = UInt32(exactly: id) else {
                throw PeregrineError.format("\(directory): the \(name) token id \(id) is not in the vocabulary of \(c.vocabSize) tokens")
            }
            return stored
        }
        let json = try FileSystem.readJSON(path)
        guard json["model"]?["type"]?.string == "BPE", let vocab = json["model"]?["vocab"]?.object else {
            throw PeregrineError.unsupported("\(path): only BPE tokenizers can be written to GGUF")
        }
        let sentencePiece = json["model"]?["byte_fallback"]?.bool == true
        var tokens = [String?](repeating: nil, count: c.vocabSize)
        var types = [Int32](repeating: 1, count: c.vocabSize)
        for (token, id) in vocab.pairs {
            guard let i = id.int, i >= 0 else { throw PeregrineError.format("\(path): bad id for token '\(token)'") }
            guard i < c.vocabSize else { throw PeregrineError.format("\(path): token id \(i) is outside the model's \(c.vocabSize) embeddings") }
            tokens[i] = token
            if sentencePiece, token.count == 6, token.hasPrefix("<0x"), token.hasSuffix(">") { types[i] = 6 }
        }
        if sentencePiece, let unk = json["model"]?["unk_token"]?.string, let id = vocab[unk]?.int, id < c.vocabSize { types[id] = 2 }
        for added in json["added_tokens"]?.array ?? [] {
            guard let i = added["id"]?.int, let content = added["content"]?.string, i >= 0, i < c.vocabSize else { continue }
            tokens[i] = content
            if types[i] != 2 { types[i] = added["special"]?.bool == true ? 3 : 4 }
        }
        for i in 0..<c.vocabSize where tokens[i] == nil {
            tokens[i] = "[PAD\(i)]"
            types[i] = 5  // unused: rows of the embedding beyond the tokenizer's vocabulary
        }
        let merges: [String] = (json["model"]?["merges"]?.array ?? []).map { m in
            if let s = m.string { return s }
            return (m.array ?? []).compactMap(\.string).joined(separator: " ")
        }
        let tokenizer = try Tokenizer(directory: directory)
        if sentencePiece {
            var scores = [Float](repeating: 0, count: c.vocabSize)
            var made = Set<String>()
            for (rank, m) in merges.enumerated() {
                let joined = m.replacingOccurrences(of: " ", with: "")
                guard !made.contains(joined), let id = vocab[joined]?.int, id < c.vocabSize else { continue }
                made.insert(joined)
                scores[id] = -Float(rank + 1)
            }
            let prepends = json["normalizer"].map { "\($0)".contains("Prepend") } ?? false
            w.set("tokenizer.ggml.model", .string("llama"))
            w.set("tokenizer.ggml.pre", .string("default"))
            w.set("tokenizer.ggml.tokens", .strings(tokens.map { $0! }))
            w.set("tokenizer.ggml.scores", .f32s(scores))
            w.set("tokenizer.ggml.token_type", .i32s(types))
            w.set("tokenizer.ggml.add_space_prefix", .bool(prepends))
            if let unk = json["model"]?["unk_token"]?.string, let id = vocab[unk]?.int { w.set("tokenizer.ggml.unknown_token_id", .u32(try tokenId(id, "unk"))) }
        } else {
            w.set("tokenizer.ggml.model", .string("gpt2"))
            w.set("tokenizer.ggml.pre", .string(try preTokenizerName(json["pre_tokenizer"], path: path)))
            w.set("tokenizer.ggml.tokens", .strings(tokens.map { $0! }))
            w.set("tokenizer.ggml.token_type", .i32s(types))
            w.set("tokenizer.ggml.merges", .strings(merges))
        }
        if let bos = tokenizer.bosTokenId ?? c.bosTokenId { w.set("tokenizer.ggml.bos_token_id", .u32(try tokenId(bos, "bos"))) }
        if let eos = c.eosTokenIds.first ?? tokenizer.eosTokenIds.first { w.set("tokenizer.ggml.eos_token_id", .u32(try tokenId(eos, "eos"))) }
        w.set("tokenizer.ggml.add_bos_token", .bool(tokenizer.addedBOS != nil))
        let tc = FileSystem.join(directory, "tokenizer_config.json")
        if FileSystem.exists(tc), let template = try FileSystem.readJSON(tc)["chat_template"]?.string {
            w.set("tokenizer.chat_template", .string(template))
        }
    }

    /// llama.cpp's name for the pre-tokenizer: the split pattern decides it.
    static func preTokenizerName(_ pre: JSONValue?, path: String) throws -> String {
        var patterns: [String] = []
        var byteLevelRegex = false
        func walk(_ v: JSONValue?) {
            guard let v else { return }
            if v["type"]?.string == "Split", let p = v["pattern"]?["Regex"]?.string { patterns.append(p) }
            if v["type"]?.string == "ByteLevel", v["use_regex"]?.bool ?? true { byteLevelRegex = true }
            for p in v["pretokenizers"]?.array ?? [] { walk(p) }
        }
        walk(pre)
        if patterns == [ScalarRegex.llama3Pattern] { return "llama-bpe" }
        if patterns == [ScalarRegex.qwen2Pattern] { return "qwen2" }
        if patterns.isEmpty && byteLevelRegex { return "gpt-2" }
        throw PeregrineError.unsupported("\(path): a pre-tokenizer GGUF has no name for (supported: Llama 3, Qwen2 and GPT-2 patterns)")
    }
}
