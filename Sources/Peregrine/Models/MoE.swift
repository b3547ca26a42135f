/// The mixture-of-experts family: Mixtral, Qwen2-MoE and Qwen3-MoE, one definition switched by
/// config. Attention is the Llama family's (grouped-query, Qwen2-MoE's q/k/v biases, Qwen3-MoE's
/// q/k norms, sliding windows); each sparse layer's MLP is a `MixtureOfExperts` (top-k of a
/// softmax router, Mixtral's and Qwen3-MoE's weights renormalized, Qwen2-MoE's shared expert
/// under a sigmoid gate), and the layers a Qwen config lists as MLP-only keep a dense
/// `GatedMLP`. Written against `ComputeBackend` over the shared layers.
public final class MoEModel<B: ComputeBackend>: DecoderModel {
    public let config: ModelConfig
    public let backend: B
    /// A decode step's weights: everything but the embedding table (unless tied) and the
    /// experts no token chose, k experts a sparse layer.
    public let weightBytes: Int

    enum FeedForward {
        case dense(GatedMLP<B>)
        case experts(MixtureOfExperts<B>)
    }

    struct Layer {
        let inputNorm: B.Weight
        let attention: Attention<B>
        let postNorm: B.Weight
        let feedForward: FeedForward
    }

    private let embedTokens: B.Weight
    private let layers: [Layer]
    private let head: OutputHead<B>
    private let rope: RotaryEmbedding<B>
    /// Layers this instance passes over (self-speculative drafting shares the weights).
    public let skippedLayers: Set<Int>
    let runner: DecoderRunner<B>
    private let weights: WeightSource  // keeps the mapped files alive
    /// Bytes every pass reads whichever experts it chose, and the passes run.
    private let alwaysReadBytes: Int
    private var passes = 0

    public init(config c: ModelConfig, weights: WeightSource, backend: B) throws {
        guard let e = c.experts else { throw PeregrineError.format("\(c.architecture): the config has no experts") }
        config = c
        self.backend = backend
        self.weights = weights
        skippedLayers = []
        let w = WeightLoader(weights, backend: backend)
        let d = c.hiddenSize
        embedTokens = try w.load("model.embed_tokens.weight", [c.vocabSize, d])
        let embedBytes = w.bytes
        layers = try (0..<c.layerCount).map { i in
            let p = "model.layers.\(i)."
            let feedForward: FeedForward = e.sparseLayers[i]
                ? .experts(try MixtureOfExperts(w, names: ExpertTensorNames(architecture: c.architecture, layer: i), config: c, experts: e))
                : .dense(try GatedMLP(w, prefix: p + "mlp.", config: c, activation: .silu))
            return Layer(inputNorm: try w.load(p + "input_layernorm.weight", [d]),
                         attention: try Attention(w, prefix: p + "self_attn.", config: c),
                         postNorm: try w.load(p + "post_attention_layernorm.weight", [d]),
                         feedForward: feedForward)
        }
        head = OutputHead(norm: try w.load("model.norm.weight", [d]),
                          projection: try w.outputProjection(embedding: embedTokens, vocabulary: c.vocabSize, hidden: d,
                                                             tied: c.tieWordEmbeddings),
                          eps: c.rmsNormEps)
        // A decode step reads one embedding row but the whole output projection, and k experts a layer.
        let all = c.tieWordEmbeddings ? w.bytes : w.bytes - embedBytes
        var routed = 0, active = 0
        for case .experts(let m) in layers.map(\.feedForward) {
            routed += m.count * m.bytesPerExpert + m.alwaysReadBytes
            active += m.activeBytes
        }
        alwaysReadBytes = all - routed
        weightBytes = alwaysReadBytes + active
        rope = RotaryEmbedding(c.rope, headDim: c.headDim, interleaved: c.ropeInterleaved)
        var shape = ActivationShape(c)
        shape.intermediate = max(c.intermediateSize, e.sharedIntermediateSize ?? 0)
        shape.experts = e
        runner = DecoderRunner(backend: backend, config: c, shape: shape)
    }

    /// The same weights with some layers skipped: a cheaper model of the same vocabulary.
    private init(sharing m: MoEModel, skipping: Set<Int>) {
        config = m.config
        backend = m.backend
        weights = m.weights
        weightBytes = m.weightBytes
        alwaysReadBytes = m.alwaysReadBytes
        embedTokens = m.embedTokens
        layers = m.layers
        head = m.head
        rope = RotaryEmbedding(m.config.rope, headDim: m.config.headDim, interleaved: m.config.ropeInterleaved)
        runner = DecoderRunner(backend: m.backend, config: m.config, shape: m.runner.shape)
        skippedLayers = skipping
    }

    public func skippingLayers(_ skip: Set<Int>) throws -> LanguageModel {
        try checkSkippable(skip, layerCount: config.layerCount)
        return MoEModel(sharing: self, skipping: skip)
    }

    /// Bytes of weights the passes so far read: the dense weights every pass, each routed expert
    /// in the passes that chose it (counted by the backend).
    public var weightBytesRead: Int? {
        var total = passes * alwaysReadBytes
        for case .experts(let m) in layers.map(\.feedForward) {
            guard let read = try? m.bytesRead(backend, passes: passes) else { return nil }
            total += read
        }
        return total
    }

    public func forward(_ plan: BatchPlan, kv: KVMemory) throws -> LogitRows {
        try runner.forward(plan, kv: kv, skippedLayers: skippedLayers) { pass in
            passes += 1
            rope.fill(pass)
            pass.embed(embedTokens)
            for (i, L) in layers.enumerated() where !skippedLayers.contains(i) && !pass.replaying {
                L.attention(layer: i, pass, norm: L.inputNorm, rope: rope, window: config.slidingWindow[i])
                switch L.feedForward {
                case .dense(let mlp): mlp(pass, norm: L.postNorm)
                case .experts(let moe): moe(pass, norm: L.postNorm)
                }
            }
            return head(pass)
        }
    }
}
