#if canImport(Glibc)
import Glibc
#endif

/// The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2 and Qwen3, one definition switched by
/// config (grouped-query attention, q/k/v biases, q/k norms, sliding windows, RoPE scaling, tied
/// embeddings). Written against `ComputeBackend`, so the same code runs on every backend.
public final class LlamaModel<B: ComputeBackend>: LanguageModel {
    public let config: ModelConfig
    public let backend: B
    public var backendName: String { backend.name }
    public var freeDeviceMemory: Int? { backend.freeDeviceMemory }
    public var kernelProfile: String? { backend.kernelProfile }
    public private(set) var weightBytes = 0
    /// Bytes every pass reads: all weights but the embedding table and the routed experts.
    private var alwaysReadBytes = 0
    private var passes = 0

    struct Layer {
        var inputNorm: B.Weight
        var q, k, v, o: B.Weight
        var qBias, kBias, vBias, oBias: B.Weight?
        var qNorm, kNorm: B.Weight?
        var postNorm: B.Weight
        var gate, up, down: B.Weight?
        var gateBias, upBias, downBias: B.Weight?
        var experts: MixtureOfExperts<B>?
    }

    private let embedTokens: B.Weight
    private let layers: [Layer]
    /// Layers this instance passes over (self-speculative drafting shares the weights).
    public let skippedLayers: Set<Int>
    private let norm: B.Weight
    private let lmHead: B.Weight
    private let inverseFrequencies: [Float]
    private let weights: WeightSource  // keeps the mapped files alive

    /// Activation memory for up to `capacity` tokens, reused across calls.
    private struct Workspace {
        var capacity = 0
        var logitCapacity = 0
        var x, h, q, k, v, attn, gate, up, tmp, cos, sin: B.Buffer
        var last, lastNormed, logits: B.Buffer
        var experts: MixtureOfExperts<B>.Buffers?
    }
    private var ws: Workspace?
    private let logitRows: BackendLogitRows<B>
    private var cosHost: [Float] = []
    private var sinHost: [Float] = []
    /// A decode step's plan with its padding rows (see `decodeGraphRows`), reused.
    private var paddedPlan = BatchPlan()

    public init(config c: ModelConfig, weights: WeightSource, backend: B) throws {
        config = c
        logitRows = BackendLogitRows(backend: backend, vocabulary: c.vocabSize)
        skippedLayers = []
        self.backend = backend
        self.weights = weights
        var bytes = 0
        // Weights are bound by their Hugging Face names.
        func load(_ n: String, _ shape: [Int]) throws -> B.Weight {
            let t = try weights.require(n, shape: shape)
            bytes += t.byteCount
            return try backend.weight(t)
        }
        func loadIf(_ present: Bool, _ n: String, _ shape: [Int]) throws -> B.Weight? {
            present ? try load(n, shape) : nil
        }
        let d = c.hiddenSize, hd = c.headDim, qd = c.headCount * hd, kvd = c.kvHeadCount * hd, ff = c.intermediateSize
        embedTokens = try load("model.embed_tokens.weight", [c.vocabSize, d])
        let embedBytes = bytes
        var layers: [Layer] = []
        for i in 0..<c.layerCount {
            let p = "model.layers.\(i)."
            let sparse = c.experts?.sparseLayers[i] ?? false
            var moe: MixtureOfExperts<B>?
            if let e = c.experts, sparse {
                let m = try MixtureOfExperts(weights, backend: backend, names: ExpertTensorNames(architecture: c.architecture, layer: i),
                                             hidden: d, config: e)
                moe = m
                bytes += m.alwaysReadBytes + e.used * m.bytesPerExpert
            }
            layers.append(Layer(
                inputNorm: try load(p + "input_layernorm.weight", [d]),
                q: try load(p + "self_attn.q_proj.weight", [qd, d]),
                k: try load(p + "self_attn.k_proj.weight", [kvd, d]),
                v: try load(p + "self_attn.v_proj.weight", [kvd, d]),
                o: try load(p + "self_attn.o_proj.weight", [d, qd]),
                qBias: try loadIf(c.qkvBias, p + "self_attn.q_proj.bias", [qd]),
                kBias: try loadIf(c.qkvBias, p + "self_attn.k_proj.bias", [kvd]),
                vBias: try loadIf(c.qkvBias, p + "self_attn.v_proj.bias", [kvd]),
                oBias: try loadIf(c.outputBias, p + "self_attn.o_proj.bias", [d]),
                qNorm: try loadIf(c.qkNorm, p + "self_attn.q_norm.weight", [hd]),
                kNorm: try loadIf(c.qkNorm, p + "self_attn.k_norm.weight", [hd]),
                postNorm: try load(p + "post_attention_layernorm.weight", [d]),
                gate: try loadIf(!sparse, p + "mlp.gate_proj.weight", [ff, d]),
                up: try loadIf(!sparse, p + "mlp.up_proj.weight", [ff, d]),
                down: try loadIf(!sparse, p + "mlp.down_proj.weight", [d, ff]),
                gateBias: try loadIf(c.mlpBias && !sparse, p + "mlp.gate_proj.bias", [ff]),
                upBias: try loadIf(c.mlpBias && !sparse, p + "mlp.up_proj.bias", [ff]),
                downBias: try loadIf(c.mlpBias && !sparse, p + "mlp.down_proj.bias", [d]),
                experts: moe))
        }
        self.layers = layers
        norm = try load("model.norm.weight", [d])
        if c.tieWordEmbeddings || !weights.contains("lm_head.weight") {
            guard c.tieWordEmbeddings else { throw PeregrineError.format("missing tensor 'lm_head.weight'") }
            lmHead = embedTokens
        } else {
            lmHead = try load("lm_head.weight", [c.vocabSize, d])
        }
        // A decode step reads one embedding row but the whole output projection.
        weightBytes = c.tieWordEmbeddings ? bytes : bytes - embedBytes
        alwaysReadBytes = weightBytes - layers.reduce(0) { $0 + ($1.experts.map { $0.used * $0.bytesPerExpert + $0.alwaysReadBytes } ?? 0) }
        inverseFrequencies = c.ropeInverseFrequencies()
    }

    /// The same weights with some layers skipped: a cheaper model of the same vocabulary.
    private init(sharing m: LlamaModel, skipping: Set<Int>) {
        config = m.config
        backend = m.backend
        logitRows = BackendLogitRows(backend: m.backend, vocabulary: m.config.vocabSize)
        weights = m.weights
        weightBytes = m.weightBytes
        alwaysReadBytes = m.alwaysReadBytes
        embedTokens = m.embedTokens
        layers = m.layers
        norm = m.norm
        lmHead = m.lmHead
        inverseFrequencies = m.inverseFrequencies
        skippedLayers = skipping
    }

    public var weightBytesRead: Int? {
        try? layers.reduce(passes * alwaysReadBytes) { $0 + (try $1.experts?.bytesRead(backend, passes: passes) ?? 0) }
    }

    public func skippingLayers(_ skip: Set<Int>) throws -> LanguageModel {
        guard let bad = skip.first(where: { $0 < 0 || $0 >= config.layerCount }) else {
            guard skip.count < config.layerCount else { throw PeregrineError.invalidArgument("cannot skip every layer") }
            return LlamaModel(sharing: self, skipping: skip)
        }
        throw PeregrineError.invalidArgument("layer \(bad) does not exist (the model has \(config.layerCount) layers, 0-\(config.layerCount - 1))")
    }

    public func makeKVMemory(blocks: Int, blockSize: Int, capacity: Int, type: KVCacheType) throws -> KVMemory {
        guard blocks > 0, blockSize > 0, capacity > 0 else { throw PeregrineError.invalidArgument("KV memory needs at least one block and position") }
        guard type == .f32 || backend is CPUBackend else {
            throw PeregrineError.unsupported("a \(type.rawValue) KV cache is implemented on the CPU only; on this device keys and values are f32")
        }
        return try KVStorage(backend: backend, layers: config.layerCount, blocks: blocks, blockSize: blockSize, capacity: capacity,
                             kvHeads: config.kvHeadCount, headDim: config.headDim, type: type)
    }

    public func copyKVBlocks(_ kv: KVMemory, _ pairs: [(from: Int32, to: Int32)]) throws {
        guard let kv = kv as? KVStorage<B> else { throw PeregrineError.backend("KV memory belongs to another backend") }
        let n = kv.blockStride
        for (from, to) in pairs {
            guard from >= 0, Int(from) < kv.blocks, to >= 0, Int(to) < kv.blocks else { throw PeregrineError.invalidArgument("KV block out of range") }
            for l in 0..<config.layerCount {
                backend.copy(kv.keys[l], offset: Int(from) * n, to: kv.keys[l], offset: Int(to) * n, count: n)
                backend.copy(kv.values[l], offset: Int(from) * n, to: kv.values[l], offset: Int(to) * n, count: n)
            }
        }
    }

    private func workspace(tokens: Int, logitRows: Int) throws -> Workspace {
        if let ws, ws.capacity >= tokens, ws.logitCapacity >= logitRows { return ws }
        let c = config
        let n = max(tokens, ws?.capacity ?? 0), l = max(logitRows, ws?.logitCapacity ?? 0, 1)
        let qd = c.headCount * c.headDim, kvd = c.kvHeadCount * c.headDim
        let ff = max(c.intermediateSize, c.experts?.sharedIntermediateSize ?? 0)
        let w = Workspace(
            capacity: n, logitCapacity: l,
            x: try backend.buffer(n * c.hiddenSize), h: try backend.buffer(n * c.hiddenSize),
            q: try backend.buffer(n * qd), k: try backend.buffer(n * kvd), v: try backend.buffer(n * kvd),
            attn: try backend.buffer(n * qd), gate: try backend.buffer(n * ff),
            up: try backend.buffer(n * ff), tmp: try backend.buffer(n * c.hiddenSize),
            cos: try backend.buffer(n * c.headDim / 2), sin: try backend.buffer(n * c.headDim / 2),
            last: try backend.buffer(l * c.hiddenSize), lastNormed: try backend.buffer(l * c.hiddenSize),
            logits: try backend.buffer(l * c.vocabSize),
            experts: try c.experts.map { try MixtureOfExperts<B>.Buffers(backend: backend, tokens: n, config: $0) })
        ws = w
        cosHost = [Float](repeating: 0, count: n * c.headDim / 2)
        sinHost = cosHost
        return w
    }

    /// cos/sin of every token's rotation angles, computed in f32 as the reference does.
    private func fillRotaryTables(_ plan: BatchPlan, _ w: Workspace) {
        let half = config.headDim / 2
        for t in 0..<plan.count {
            let pos = Float(plan.positions[t])
            for i in 0..<half {
                let angle = Double(inverseFrequencies[i] * pos)
                cosHost[t * half + i] = Float(Glibc.cos(angle))
                sinHost[t * half + i] = Float(Glibc.sin(angle))
            }
        }
        cosHost.withUnsafeBufferPointer { backend.write(UnsafeBufferPointer(rebasing: $0[0..<(plan.count * half)]), to: w.cos, offset: 0) }
        sinHost.withUnsafeBufferPointer { backend.write(UnsafeBufferPointer(rebasing: $0[0..<(plan.count * half)]), to: w.sin, offset: 0) }
    }

    public func forward(_ plan: BatchPlan, kv: KVMemory) throws -> LogitRows {
        let c = config
        let n = plan.count
        logitRows.count = 0
        guard n > 0 else { return logitRows }
        guard let cache = kv as? KVStorage<B> else { throw PeregrineError.backend("KV memory belongs to another backend") }
        guard plan.positions.count == n, plan.slots.count == n else { throw PeregrineError.invalidArgument("inconsistent batch plan") }
        guard plan.tableWidth == cache.tableWidth, plan.blockTables.count % max(plan.tableWidth, 1) == 0 else {
            throw PeregrineError.invalidArgument("block tables of \(plan.tableWidth) entries a row, the KV memory has \(cache.tableWidth)")
        }
        for t in 0..<n {
            guard plan.tokens[t] >= 0, Int(plan.tokens[t]) < c.vocabSize else {
                throw PeregrineError.invalidArgument("token id \(plan.tokens[t]) is outside the vocabulary (\(c.vocabSize))")
            }
            guard plan.slots[t] >= 0, Int(plan.slots[t]) < plan.tableRows, plan.positions[t] >= 0, Int(plan.positions[t]) < cache.capacity else {
                throw PeregrineError.invalidArgument("position \(plan.positions[t]) is beyond the KV cache (\(cache.capacity) positions)")
            }
            let block = plan.blockTables[Int(plan.slots[t]) * plan.tableWidth + Int(plan.positions[t]) / cache.blockSize]
            guard block >= 0, Int(block) < cache.blocks else { throw PeregrineError.invalidArgument("KV block \(block) does not exist") }
        }
        for r in plan.logitRows where r < 0 || Int(r) >= n { throw PeregrineError.invalidArgument("logit row \(r) is not in the batch") }
        if n > 1, let padded = backend.decodeGraphRows(n), padded >= n, isDecodeStep(plan) {
            // A decode step of n sequences, run as one of the backend's recorded batch sizes:
            // padding rows (token 0 at position 0 of a sequence of their own whose every block is
            // the scratch block) after the real ones; only the real rows' logits are returned.
            paddedPlan.removeAll()
            paddedPlan.tableWidth = plan.tableWidth
            paddedPlan.tokens.append(contentsOf: plan.tokens)
            paddedPlan.positions.append(contentsOf: plan.positions)
            paddedPlan.slots.append(contentsOf: plan.slots)
            paddedPlan.logitRows.append(contentsOf: plan.logitRows)
            paddedPlan.blockTables.append(contentsOf: plan.blockTables)
            for t in n..<padded {
                paddedPlan.tokens.append(0)
                paddedPlan.positions.append(0)
                paddedPlan.slots.append(Int32(t))
                paddedPlan.logitRows.append(Int32(t))
                for _ in 0..<plan.tableWidth { paddedPlan.blockTables.append(Int32(cache.scratchBlock)) }
            }
            var key = Hasher()
            key.combine(ObjectIdentifier(cache))
            key.combine(padded)
            key.combine(skippedLayers)
            return try run(paddedPlan, cache: cache, stepKey: key.finalize(), returnedRows: n)
        }
        var stepKey: Int?
        if n == 1 {
            // A decode step: the same work for the same cache, workspace and layers every token.
            var key = Hasher()
            key.combine(ObjectIdentifier(cache))
            key.combine(plan.logitRows.count)
            key.combine(skippedLayers)
            stepKey = key.finalize()
        }
        return try run(plan, cache: cache, stepKey: stepKey, returnedRows: plan.logitRows.count)
    }

    /// Every row a single token of its own sequence (row t in block-table row t), every row
    /// sampled in order: the shape a backend can record once per batch size.
    private func isDecodeStep(_ plan: BatchPlan) -> Bool {
        let n = plan.count
        guard plan.logitRows.count == n, plan.tableRows == n else { return false }
        for t in 0..<n where plan.slots[t] != Int32(t) || plan.logitRows[t] != Int32(t) { return false }
        return true
    }

    /// The forward pass of a checked plan; `stepKey` marks a step the backend may record. The
    /// first `returnedRows` logit rows are returned.
    private func run(_ plan: BatchPlan, cache: KVStorage<B>, stepKey: Int?, returnedRows: Int) throws -> LogitRows {
        let c = config
        let n = plan.count
        let w = try workspace(tokens: n, logitRows: plan.logitRows.count)
        let d = c.hiddenSize, hd = c.headDim
        if let stepKey { backend.beginStep(key: stepKey) }
        passes += 1
        backend.beginPass(plan)
        fillRotaryTables(plan, w)
        plan.tokens.withUnsafeBufferPointer { backend.embed(tokens: $0, table: embedTokens, out: w.x) }

        for (i, L) in layers.enumerated() where !skippedLayers.contains(i) {
            backend.normMatmul3(w.x, norm: L.inputNorm, eps: c.rmsNormEps, dim: d, normed: w.h, rows: n,
                                (L.q, L.qBias, w.q), (L.k, L.kBias, w.k), (L.v, L.vBias, w.v))
            if let qn = L.qNorm, let kn = L.kNorm {
                backend.rmsNorm(w.q, weight: qn, eps: c.rmsNormEps, rows: n * c.headCount, dim: hd, out: w.q)
                backend.rmsNorm(w.k, weight: kn, eps: c.rmsNormEps, rows: n * c.kvHeadCount, dim: hd, out: w.k)
            }
            backend.ropeAttention(layer: i, q: w.q, k: w.k, v: w.v, rows: n, heads: c.headCount, headDim: hd, cos: w.cos, sin: w.sin,
                                  interleaved: c.ropeInterleaved, plan: plan, cache: cache, window: c.slidingWindow[i], out: w.attn)
            backend.matmulAdd(w.attn, rows: n, weight: L.o, bias: L.oBias, residual: w.x, scratch: w.tmp)

            if let moe = L.experts, let buffers = w.experts {
                backend.rmsNorm(w.x, weight: L.postNorm, eps: c.rmsNormEps, rows: n, dim: d, out: w.h)
                moe(backend, h: w.h, rows: n, hidden: d, residual: w.x, buffers: buffers, out: w.tmp, gate: w.gate, up: w.up)
            } else if let gate = L.gate, let up = L.up, let down = L.down {
                backend.normGatedProduct(w.x, norm: L.postNorm, eps: c.rmsNormEps, dim: d, normed: w.h, rows: n, gate: gate,
                                         gateBias: L.gateBias, up: up, upBias: L.upBias, out: w.gate, scratch: w.up)
                backend.matmulAdd(w.gate, rows: n, weight: down, bias: L.downBias, residual: w.x, scratch: w.tmp)
            }
        }

        let rows = plan.logitRows.count
        guard rows > 0 else { try backend.synchronize(); return logitRows }
        plan.logitRows.withUnsafeBufferPointer { backend.gatherRows(w.x, rows: $0, dim: d, out: w.last) }
        backend.rmsNorm(w.last, weight: norm, eps: c.rmsNormEps, rows: rows, dim: d, out: w.lastNormed)
        backend.matmul(w.lastNormed, rows: rows, weight: lmHead, bias: nil, out: w.logits)
        try backend.synchronize()
        logitRows.buffer = w.logits
        logitRows.count = returnedRows
        return logitRows
    }
}
