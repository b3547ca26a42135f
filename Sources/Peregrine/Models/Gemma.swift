/// The Gemma family, Gemma 2 and Gemma 3 (text), one definition switched by config: RMSNorm with
/// (1 + weight), token embeddings scaled by sqrt(hidden size), norms before and after both the
/// attention and the GELU-tanh gated MLP (the post norms applied to the block's output before the
/// residual add), q/k norms (Gemma 3), soft-capped attention scores and final logits (Gemma 2),
/// the attention scale from query_pre_attn_scalar, sliding-window layers interleaved with global
/// ones, each kind with its own RoPE (Gemma 3: local base, global scaling), tied embeddings.
public final class GemmaModel<B: ComputeBackend>: DecoderModel {
    public let config: ModelConfig
    public let backend: B
    public let weightBytes: Int

    struct Layer {
        let inputNorm: B.Weight
        let attention: Attention<B>
        let postAttentionNorm: B.Weight
        let preFeedforwardNorm: B.Weight
        let mlp: GatedMLP<B>
        let postFeedforwardNorm: B.Weight
        /// Sliding-window layers rotate with `localRope` where the model has one.
        let rope: RotaryEmbedding<B>
    }

    private let embedTokens: B.Weight
    /// sqrt(hidden size), as the reference multiplies the embeddings by it.
    private let embeddingScale: Float
    private let layers: [Layer]
    private let head: OutputHead<B>
    /// Layers this instance passes over (self-speculative drafting shares the weights).
    public let skippedLayers: Set<Int>
    private let globalRope: RotaryEmbedding<B>
    private let localRope: RotaryEmbedding<B>?
    let runner: DecoderRunner<B>
    private let weights: WeightSource  // keeps the mapped files alive

    public init(config c: ModelConfig, weights: WeightSource, backend: B) throws {
        guard let scale = c.embeddingScale else { throw PeregrineError.format("\(c.architecture): no embedding scale in the config") }
        config = c
        self.backend = backend
        self.weights = weights
        skippedLayers = []
        let w = WeightLoader(weights, backend: backend)
        let d = c.hiddenSize
        embedTokens = try w.load("model.embed_tokens.weight", [c.vocabSize, d])
        // transformers multiplies by the scale rounded to the embedding's type (sqrt(3072) = 55.43
        // becomes 55.5 in bf16); llama.cpp, whose GGUF files this also reads, by the f32 value.
        switch weights is GGUFWeights ? nil : weights.tensor("model.embed_tokens.weight")?.dtype {
        case .bf16?: embeddingScale = Half.bf16ToFloat(Half.floatToBF16(scale))
        case .f16?: embeddingScale = Half.f16ToFloat(Half.floatToF16(scale))
        default: embeddingScale = scale
        }
        let embedBytes = w.bytes
        (globalRope, localRope) = GemmaModel.rotaryEmbeddings(c)
        let offset = c.normWeightOffset
        layers = try (0..<c.layerCount).map { [globalRope, localRope] i in
            let p = "model.layers.\(i)."
            return Layer(inputNorm: try w.loadNorm(p + "input_layernorm.weight", d, offset: offset),
                         attention: try Attention(w, prefix: p + "self_attn.", config: c),
                         postAttentionNorm: try w.loadNorm(p + "post_attention_layernorm.weight", d, offset: offset),
                         preFeedforwardNorm: try w.loadNorm(p + "pre_feedforward_layernorm.weight", d, offset: offset),
                         mlp: try GatedMLP(w, prefix: p + "mlp.", config: c, activation: c.hiddenActivation),
                         postFeedforwardNorm: try w.loadNorm(p + "post_feedforward_layernorm.weight", d, offset: offset),
                         rope: c.slidingWindow[i] != nil ? localRope ?? globalRope : globalRope)
        }
        head = OutputHead(norm: try w.loadNorm("model.norm.weight", d, offset: offset),
                          projection: try w.outputProjection(embedding: embedTokens, vocabulary: c.vocabSize, hidden: d,
                                                             tied: c.tieWordEmbeddings),
                          eps: c.rmsNormEps, softCap: c.finalLogitSoftCap)
        // A decode step reads one embedding row but the whole output projection.
        weightBytes = c.tieWordEmbeddings ? w.bytes : w.bytes - embedBytes
        runner = DecoderRunner(backend: backend, config: c, shape: ActivationShape(c, rotaryTables: localRope == nil ? 1 : 2))
    }

    /// The global layers' RoPE (table 0) and, where it differs, the local layers' (table 1).
    private static func rotaryEmbeddings(_ c: ModelConfig) -> (RotaryEmbedding<B>, RotaryEmbedding<B>?) {
        let global = RotaryEmbedding<B>(c.rope, headDim: c.headDim, interleaved: c.ropeInterleaved, table: 0)
        let local = c.slidingRope.map { RotaryEmbedding<B>($0, headDim: c.headDim, interleaved: c.ropeInterleaved, table: 1) }
        return (global, local)
    }

    /// The same weights with some layers skipped: a cheaper model of the same vocabulary.
    private init(sharing m: GemmaModel, skipping: Set<Int>) {
        config = m.config
        backend = m.backend
        weights = m.weights
        weightBytes = m.weightBytes
        embedTokens = m.embedTokens
        embeddingScale = m.embeddingScale
        (globalRope, localRope) = GemmaModel.rotaryEmbeddings(m.config)
        layers = zip(m.layers, m.config.slidingWindow).map { [globalRope, localRope] L, window in
            Layer(inputNorm: L.inputNorm, attention: L.attention, postAttentionNorm: L.postAttentionNorm,
                  preFeedforwardNorm: L.preFeedforwardNorm, mlp: L.mlp, postFeedforwardNorm: L.postFeedforwardNorm,
                  rope: window != nil ? localRope ?? globalRope : globalRope)
        }
        head = m.head
        runner = DecoderRunner(backend: m.backend, config: m.config, shape: m.runner.shape)
        skippedLayers = skipping
    }

    public func skippingLayers(_ skip: Set<Int>) throws -> LanguageModel {
        try checkSkippable(skip, layerCount: config.layerCount)
        return GemmaModel(sharing: self, skipping: skip)
    }

    public func forward(_ plan: BatchPlan, kv: KVMemory) throws -> LogitRows {
        try runner.forward(plan, kv: kv, skippedLayers: skippedLayers) { pass in
            globalRope.fill(pass)
            localRope?.fill(pass)
            pass.embed(embedTokens)
            backend.scale(pass.workspace.x, count: pass.rows * pass.hidden, by: embeddingScale)
            for (i, L) in layers.enumerated() where !skippedLayers.contains(i) && !pass.replaying {
                L.attention(layer: i, pass, norm: L.inputNorm, rope: L.rope, window: config.slidingWindow[i],
                            outputNorm: L.postAttentionNorm)
                L.mlp(pass, norm: L.preFeedforwardNorm, outputNorm: L.postFeedforwardNorm)
            }
            return head(pass)
        }
    }
}
