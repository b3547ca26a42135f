/// The sizes of a decoder's activations, from which its workspace is allocated.
struct ActivationShape {
    var hidden: Int
    /// Query and attention-output rows: heads x head size.
    var query: Int
    /// Key and value rows: KV heads x head size.
    var keyValue: Int
    var intermediate: Int
    /// Rotary pairs a head (head size / 2).
    var rotaryPairs: Int
    /// RoPE variants whose cos/sin tables a pass fills (see `RotaryEmbedding.table`).
    var rotaryTables: Int
    var vocabulary: Int
    /// Routed experts, whose router logits and routes the workspace holds (nil: a dense model).
    var experts: ExpertConfig?

    init(_ c: ModelConfig, rotaryTables: Int = 1) {
        hidden = c.hiddenSize
        query = c.headCount * c.headDim
        keyValue = c.kvHeadCount * c.headDim
        intermediate = c.intermediateSize
        rotaryPairs = c.headDim / 2
        self.rotaryTables = rotaryTables
        vocabulary = c.vocabSize
    }
}

/// Activation memory for up to `capacity` tokens and `logitCapacity` logit rows, allocated
/// before a pass begins and reused by every pass that fits.
struct DecoderWorkspace<B: ComputeBackend> {
    let capacity: Int
    let logitCapacity: Int
    /// The residual stream.
    let x: B.Buffer
    /// The normalized input of a projection.
    let h: B.Buffer
    let q, k, v, attn: B.Buffer
    let gate, up: B.Buffer
    /// A product before it is added to the residual, where the backend does not fuse the add.
    let tmp: B.Buffer
    /// cos/sin of each RoPE variant, [tokens, rotaryPairs] each.
    let cos, sin: [B.Buffer]
    /// The rows whose logits are wanted, before and after the final norm, and their logits.
    let last, lastNormed, logits: B.Buffer
    /// A mixture of experts' router logits and routes.
    let experts: MixtureOfExperts<B>.Buffers?

    init(backend b: B, shape s: ActivationShape, tokens n: Int, logitRows l: Int) throws {
        capacity = n
        logitCapacity = l
        x = try b.buffer(n * s.hidden)
        h = try b.buffer(n * s.hidden)
        q = try b.buffer(n * s.query)
        k = try b.buffer(n * s.keyValue)
        v = try b.buffer(n * s.keyValue)
        attn = try b.buffer(n * s.query)
        gate = try b.buffer(n * s.intermediate)
        up = try b.buffer(n * s.intermediate)
        tmp = try b.buffer(n * s.hidden)
        cos = try (0..<s.rotaryTables).map { _ in try b.buffer(n * s.rotaryPairs) }
        sin = try (0..<s.rotaryTables).map { _ in try b.buffer(n * s.rotaryPairs) }
        last = try b.buffer(l * s.hidden)
        lastNormed = try b.buffer(l * s.hidden)
        logits = try b.buffer(l * s.vocabulary)
        experts = try s.experts.map { try MixtureOfExperts<B>.Buffers(backend: b, tokens: n, config: $0) }
    }
}

/// One forward pass as its layers see it: the backend, the checked batch, the KV memory and the
/// activations.
struct DecoderPass<B: ComputeBackend> {
    let backend: B
    let plan: BatchPlan
    let cache: KVStorage<B>
    let workspace: DecoderWorkspace<B>
    let shape: ActivationShape
    var hidden: Int { shape.hidden }
    var rows: Int { plan.count }
    /// The backend replays a recording of this step: the layers' kernels are in it, so a family
    /// walks only what stages the step's inputs (RoPE tables, embeddings, the head's rows), not
    /// its layers, whose host work (a fifteenth of a 256-sequence decode step of the 8B shape on
    /// an H200) would leave the device idle.
    let replaying: Bool

    /// x = the embedding rows of the batch's tokens.
    func embed(_ table: B.Weight) {
        StepProfile.shared?.mark(.rope)
        plan.tokens.withUnsafeBufferPointer { backend.embed(tokens: $0, table: table, out: workspace.x) }
        StepProfile.shared?.mark(.embed)
    }
}

/// The final RMSNorm and the output projection, applied to the rows whose logits are wanted, the
/// logits soft-capped where `softCap` is set (Gemma 2).
struct OutputHead<B: ComputeBackend> {
    let norm: B.Weight
    let projection: B.Weight
    let eps: Float
    var softCap: Float? = nil

    /// The logits of `plan.logitRows` in the workspace's `logits`, or nil when none are wanted.
    func callAsFunction(_ pass: DecoderPass<B>) -> B.Buffer? {
        let rows = pass.plan.logitRows.count, w = pass.workspace, b = pass.backend
        guard rows > 0 else { return nil }
        // Every row's logits in order (a decode step): the rows are where they are, and nothing
        // comes between the last residual product and the norm, which a backend may carry.
        let inPlace = rows == pass.rows && pass.plan.logitRows.enumerated().allSatisfy { $0.offset == Int($0.element) }
        if !inPlace { pass.plan.logitRows.withUnsafeBufferPointer { b.gatherRows(w.x, rows: $0, dim: pass.hidden, out: w.last) } }
        b.normMatmul(inPlace ? w.x : w.last, norm: norm, eps: eps, dim: pass.hidden, normed: w.lastNormed, rows: rows,
                     weight: projection, out: w.logits)
        if let softCap { b.softCap(w.logits, count: rows * pass.shape.vocabulary, cap: softCap) }
        return w.logits
    }
}

/// A family whose passes a `DecoderRunner` runs on one backend (every family here): what the
/// runtime asks of a model besides its forward pass is the runner's or the backend's, written once.
protocol DecoderModel: LanguageModel {
    associatedtype Backend: ComputeBackend
    var backend: Backend { get }
    var runner: DecoderRunner<Backend> { get }
}

extension DecoderModel {
    public var backendName: String { backend.name }
    public var preferredKVCacheType: KVCacheType { backend.preferredKVCacheType }
    public var freeDeviceMemory: Int? { backend.freeDeviceMemory }
    public var kernelProfile: String? { backend.kernelProfile }

    public func makeKVMemory(blocks: Int, blockSize: Int, capacity: Int, type: KVCacheType) throws -> KVMemory {
        try runner.makeKVMemory(blocks: blocks, blockSize: blockSize, capacity: capacity, type: type)
    }

    public func copyKVBlocks(_ kv: KVMemory, _ pairs: [(from: Int32, to: Int32)]) throws {
        try runner.copyKVBlocks(kv, pairs)
    }
}

/// What every decoder-only family does around its layers: KV memory of the model's shape, the
/// checks of a batch plan against it, decode steps padded to the backend's recorded batch sizes
/// with the keys under which a backend records them, the workspace, and the returned logit rows.
final class DecoderRunner<B: ComputeBackend> {
    let backend: B
    let shape: ActivationShape
    let layerCount: Int
    let kvHeads: Int
    let headDim: Int
    let logitRows: BackendLogitRows<B>
    private var workspace: DecoderWorkspace<B>?
    /// A decode step's plan with its padding rows (see `decodeGraphRows`), reused.
    private var paddedPlan = BatchPlan()

    init(backend: B, config c: ModelConfig, shape: ActivationShape) {
        self.backend = backend
        self.shape = shape
        layerCount = c.layerCount
        kvHeads = c.kvHeadCount
        headDim = c.headDim
        logitRows = BackendLogitRows(backend: backend, vocabulary: c.vocabSize)
    }

    func makeKVMemory(blocks: Int, blockSize: Int, capacity: Int, type: KVCacheType) throws -> KVMemory {
        guard blocks > 0, blockSize > 0, capacity > 0 else { throw PeregrineError.invalidArgument("KV memory needs at least one block and position") }
        return try KVStorage(backend: backend, layers: layerCount, blocks: blocks, blockSize: blockSize, capacity: capacity,
                             kvHeads: kvHeads, headDim: headDim, type: type)
    }

    func copyKVBlocks(_ kv: KVMemory, _ pairs: [(from: Int32, to: Int32)]) throws {
        guard let kv = kv as? KVStorage<B> else { throw PeregrineError.backend("KV memory belongs to another backend") }
        let n = kv.blockStride
        for (from, to) in pairs {
            guard from >= 0, Int(from) < kv.blocks, to >= 0, Int(to) < kv.blocks else { throw PeregrineError.invalidArgument("KV block out of range") }
            for l in 0..<layerCount {
                backend.copy(kv.keys[l], offset: Int(from) * n, to: kv.keys[l], offset: Int(to) * n, count: n)
                backend.copy(kv.values[l], offset: Int(from) * n, to: kv.values[l], offset: Int(to) * n, count: n)
            }
        }
    }

    /// Checks the plan, then runs `layers` over it (a decode step padded and keyed for the
    /// backend to record) and returns the logit rows it computed. `layers` fills the pass's
    /// activations from its embeddings to its logits and returns the logits buffer, nil when
    /// no rows are wanted. `skippedLayers` is part of a recorded step's identity.
    func forward(_ plan: BatchPlan, kv: KVMemory, skippedLayers: Set<Int>,
                 _ layers: (DecoderPass<B>) throws -> B.Buffer?) throws -> LogitRows {
        let n = plan.count
        logitRows.count = 0
        guard n > 0 else { return logitRows }
        guard let cache = kv as? KVStorage<B> else { throw PeregrineError.backend("KV memory belongs to another backend") }
        try check(plan, cache: cache)
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
            paddedPlan.promptLengths.append(contentsOf: plan.promptLengths)
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
            return try run(paddedPlan, cache: cache, stepKey: key.finalize(), returnedRows: n, layers)
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
        return try run(plan, cache: cache, stepKey: stepKey, returnedRows: plan.logitRows.count, layers)
    }

    /// Every token in the vocabulary and the KV memory, the block tables of the memory's width.
    private func check(_ plan: BatchPlan, cache: KVStorage<B>) throws {
        let n = plan.count
        guard plan.positions.count == n, plan.slots.count == n else { throw PeregrineError.invalidArgument("inconsistent batch plan") }
        guard plan.tableWidth == cache.tableWidth, plan.blockTables.count % max(plan.tableWidth, 1) == 0 else {
            throw PeregrineError.invalidArgument("block tables of \(plan.tableWidth) entries a row, the KV memory has \(cache.tableWidth)")
        }
        let chained = backend.chainedTokenRows
        for t in 0..<n {
            // A token below 0 names a greedy choice the step before left on the device (chained steps).
            guard plan.tokens[t] >= 0 ? Int(plan.tokens[t]) < shape.vocabulary : Int(-1 - plan.tokens[t]) < chained else {
                throw PeregrineError.invalidArgument("token id \(plan.tokens[t]) is outside the vocabulary (\(shape.vocabulary))")
            }
            guard plan.slots[t] >= 0, Int(plan.slots[t]) < plan.tableRows, plan.positions[t] >= 0, Int(plan.positions[t]) < cache.capacity else {
                throw PeregrineError.invalidArgument("position \(plan.positions[t]) is beyond the KV cache (\(cache.capacity) positions)")
            }
            let block = plan.blockTables[Int(plan.slots[t]) * plan.tableWidth + Int(plan.positions[t]) / cache.blockSize]
            guard block >= 0, Int(block) < cache.blocks else { throw PeregrineError.invalidArgument("KV block \(block) does not exist") }
        }
        for r in plan.logitRows where r < 0 || Int(r) >= n { throw PeregrineError.invalidArgument("logit row \(r) is not in the batch") }
    }

    /// Every row a single token of its own sequence (row t in block-table row t), every row
    /// sampled in order: the shape a backend can record once per batch size.
    private func isDecodeStep(_ plan: BatchPlan) -> Bool {
        let n = plan.count
        guard plan.logitRows.count == n, plan.tableRows == n else { return false }
        for t in 0..<n where plan.slots[t] != Int32(t) || plan.logitRows[t] != Int32(t) { return false }
        return true
    }

    /// The pass over a checked plan; `stepKey` marks a step the backend may record. The first
    /// `returnedRows` logit rows are returned.
    private func run(_ plan: BatchPlan, cache: KVStorage<B>, stepKey: Int?, returnedRows: Int,
                     _ layers: (DecoderPass<B>) throws -> B.Buffer?) throws -> LogitRows {
        // Allocation happens before the step begins: a backend recording the step must not see it.
        let w = try activations(tokens: plan.count, logitRows: plan.logitRows.count)
        let profile = StepProfile.shared
        profile?.mark(.check)
        if let stepKey { backend.beginStep(key: stepKey) }
        backend.beginPass(plan)
        profile?.mark(.stage)
        let replaying = backend.replayingStep
        if replaying { profile?.noteReplay() }
        let logits = try layers(DecoderPass(backend: backend, plan: plan, cache: cache, workspace: w, shape: shape, replaying: replaying))
        profile?.mark(.walk)
        // Logits are read next, and every read waits: the sampling's launches may queue behind
        // the step instead of after a round trip to the host (where the backend chains steps).
        if logits != nil && returnedRows > 0 { try backend.submit() } else { try backend.synchronize() }
        profile?.mark(.wait)
        guard let logits else { return logitRows }
        logitRows.buffer = logits
        logitRows.count = returnedRows
        return logitRows
    }

    private func activations(tokens: Int, logitRows: Int) throws -> DecoderWorkspace<B> {
        if let workspace, workspace.capacity >= tokens, workspace.logitCapacity >= logitRows { return workspace }
        let w = try DecoderWorkspace(backend: backend, shape: shape, tokens: max(tokens, workspace?.capacity ?? 0),
                                     logitRows: max(logitRows, workspace?.logitCapacity ?? 0, 1))
        workspace = w
        return w
    }
}

/// Refuses a set of layers to skip that names a layer the model lacks or every layer.
func checkSkippable(_ skip: Set<Int>, layerCount: Int) throws {
    if let bad = skip.first(where: { $0 < 0 || $0 >= layerCount }) {
        throw PeregrineError.invalidArgument("layer \(bad) does not exist (the model has \(layerCount) layers, 0-\(layerCount - 1))")
    }
    guard skip.count < layerCount else { throw PeregrineError.invalidArgument("cannot skip every layer") }
}
