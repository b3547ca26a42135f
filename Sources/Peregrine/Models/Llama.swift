/// The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3 (and Phi-3, see `Phi3`), one definition switched by
/// config (grouped-query attention, q/k/v biases, q/k norms, sliding windows, RoPE scaling, tied
/// embeddings). Written against `ComputeBackend` over the shared layers, so the same code runs on
/// every backend.
public final class LlamaModel<B: ComputeBackend>: DecoderModel {
    public let config: ModelConfig
    public let backend: B
    public let weightBytes: Int

    struct Layer {
        let inputNorm: B.Weight
        let attention: Attention<B>
        let postNorm: B.Weight
        let mlp: GatedMLP<B>
    }

    private let embedTokens: B.Weight
    private let layers: [Layer]
    private let head: OutputHead<B>
    private let rope: RotaryEmbedding<B>
    /// Layers this instance passes over (self-speculative drafting shares the weights).
    public let skippedLayers: Set<Int>
    let runner: DecoderRunner<B>
    private let weights: WeightSource  // keeps the mapped files alive

    public init(config c: ModelConfig, weights: WeightSource, backend: B) throws {
        config = c
        self.backend = backend
        self.weights = weights
        skippedLayers = []
        // Weights are bound by their Hugging Face names.
        let w = WeightLoader(weights, backend: backend)
        let d = c.hiddenSize
        embedTokens = try w.load("model.embed_tokens.weight", [c.vocabSize, d])
        let embedBytes = w.bytes
        layers = try (0..<c.layerCount).map { i in
            let p = "model.layers.\(i)."
            return Layer(inputNorm: try w.load(p + "input_layernorm.weight", [d]),
                         attention: try Attention(w, prefix: p + "self_attn.", config: c),
                         postNorm: try w.load(p + "post_attention_layernorm.weight", [d]),
                         mlp: try GatedMLP(w, prefix: p + "mlp.", config: c, activation: c.hiddenActivation))
        }
        head = OutputHead(norm: try w.load("model.norm.weight", [d]),
                          projection: try w.outputProjection(embedding: embedTokens, vocabulary: c.vocabSize, hidden: d,
                                                             tied: c.tieWordEmbeddings),
                          eps: c.rmsNormEps)
        // A decode step reads one embedding row but the whole output projection.
        weightBytes = c.tieWordEmbeddings ? w.bytes : w.bytes - embedBytes
        rope = RotaryEmbedding(c.rope, headDim: c.headDim, interleaved: c.ropeInterleaved)
        runner = DecoderRunner(backend: backend, config: c, shape: ActivationShape(c))
    }

    /// The same weights with some layers skipped: a cheaper model of the same vocabulary.
    private init(sharing m: LlamaModel, skipping: Set<Int>) {
        config = m.config
        backend = m.backend
        weights = m.weights
        weightBytes = m.weightBytes
        embedTokens = m.embedTokens
        layers = m.layers
        head = m.head
        rope = RotaryEmbedding(m.config.rope, headDim: m.config.headDim, interleaved: m.config.ropeInterleaved)
        runner = DecoderRunner(backend: m.backend, config: m.config, shape: m.runner.shape)
        skippedLayers = skipping
    }

    public func skippingLayers(_ skip: Set<Int>) throws -> LanguageModel {
        try checkSkippable(skip, layerCount: config.layerCount)
        return LlamaModel(sharing: self, skipping: skip)
    }

    public func forward(_ plan: BatchPlan, kv: KVMemory) throws -> LogitRows {
        try runner.forward(plan, kv: kv, skippedLayers: skippedLayers) { pass in
            rope.fill(pass)
            pass.embed(embedTokens)
            for (i, L) in layers.enumerated() where !skippedLayers.contains(i) && !pass.replaying {
                L.attention(layer: i, pass, norm: L.inputNorm, rope: rope, window: config.slidingWindow[i])
                L.mlp(pass, norm: L.postNorm)
            }
            return head(pass)
        }
    }
}
