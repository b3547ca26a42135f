/// A mixture-of-experts MLP of one layer: a router scores every expert for each token, the
/// top-k experts' gated MLPs (SiLU) run on the token and their outputs are summed with the
/// routing weights; a shared expert, when there is one, runs on every token, scaled by the
/// sigmoid of its own gate (Qwen2-MoE). Written once against `ComputeBackend`: the backend
/// groups a batch's tokens by expert, so each chosen expert's weights are read once a pass and
/// the others' not at all.
struct MixtureOfExperts<B: ComputeBackend> {
    /// [experts, hidden]: one logit per expert.
    let router: B.Weight
    let experts: B.Experts
    let shared: SharedExpert?
    let count: Int
    let used: Int
    let normalize: Bool
    /// Bytes of one routed expert's three projections (read only when a token chose it).
    let bytesPerExpert: Int
    /// Bytes every pass reads: the router and the shared expert.
    let alwaysReadBytes: Int
    let eps: Float

    struct SharedExpert {
        let gate, up, down: B.Weight
        /// [1, hidden]: the logit of the shared expert's sigmoid gate.
        let gateInput: B.Weight
        let intermediate: Int
    }

    /// The layer's router, experts and shared expert, named by `names`, shaped by the config.
    init(_ w: WeightLoader<B>, names: ExpertTensorNames, config c: ModelConfig, experts e: ExpertConfig) throws {
        let d = c.hiddenSize, ff = e.intermediateSize
        count = e.count
        used = e.used
        normalize = e.normalizeWeights
        eps = c.rmsNormEps
        let before = w.bytes
        router = try w.load(names.router, [count, d])
        var views: [ExpertTensorNames.Projection: [TensorView]] = [:]
        for proj in ExpertTensorNames.Projection.allCases {
            views[proj] = try names.views(w.source, proj, experts: count, hidden: d, intermediate: ff)
        }
        let gate = views[.gate]!, up = views[.up]!, down = views[.down]!
        bytesPerExpert = gate[0].byteCount + up[0].byteCount + down[0].byteCount
        experts = try w.experts(gate: gate, up: up, down: down)
        if let s = e.sharedIntermediateSize {
            guard let p = names.shared else { throw PeregrineError.format("\(c.architecture) has no shared expert") }
            // A one-row matrix; GGUF files may store it as a vector.
            let gateName = p + "_gate.weight"
            let g: B.Weight
            if let t = w.source.tensor(gateName), t.shape == [d] {
                g = try w.view(t.reshaped([1, d]), name: gateName, shape: [1, d])
            } else {
                g = try w.load(gateName, [1, d])
            }
            shared = SharedExpert(gate: try w.load(p + ".gate_proj.weight", [s, d]), up: try w.load(p + ".up_proj.weight", [s, d]),
                                  down: try w.load(p + ".down_proj.weight", [d, s]), gateInput: g, intermediate: s)
        } else {
            shared = nil
        }
        alwaysReadBytes = w.bytes - before - count * bytesPerExpert
    }

    /// Bytes a token reads: the router, the shared expert and k experts.
    var activeBytes: Int { alwaysReadBytes + used * bytesPerExpert }

    /// Activation memory of the block beyond the decoder's (router logits and routes).
    struct Buffers {
        /// [tokens, experts]
        let logits: B.Buffer
        /// [tokens, 2 x used]: (weight, expert) pairs.
        let routes: B.Buffer
        /// [tokens]: the shared expert's gate logit.
        let sharedGate: B.Buffer

        init(backend: B, tokens n: Int, config e: ExpertConfig) throws {
            logits = try backend.buffer(n * e.count)
            routes = try backend.buffer(n * 2 * e.used)
            sharedGate = try backend.buffer(n)
        }
    }

    /// residual += experts(h) (+ sigmoid(gate · h) * shared(h)), h = norm(residual): the
    /// workspace's `h` holds h, `tmp` the shared expert's output, `gate` and `up` its products.
    func callAsFunction(_ pass: DecoderPass<B>, norm: B.Weight) {
        let b = pass.backend, w = pass.workspace, n = pass.rows, d = pass.hidden
        guard let buffers = w.experts else { preconditionFailure("a workspace without expert buffers") }
        b.normRoute(w.x, norm: norm, eps: eps, rows: n, dim: d, router: router, experts: experts, count: count, k: used,
                    normalize: normalize, normed: w.h, logits: buffers.logits, routes: buffers.routes)
        b.expertProducts(w.h, rows: n, routes: buffers.routes, k: used, experts: experts, residual: w.x)
        if let s = shared {
            b.gatedProduct(w.h, rows: n, gate: s.gate, gateBias: nil, up: s.up, upBias: nil, out: w.gate, scratch: w.up)
            b.matmul(w.gate, rows: n, weight: s.down, bias: nil, out: w.tmp)
            b.matmul(w.h, rows: n, weight: s.gateInput, bias: nil, out: buffers.sharedGate)
            b.addSigmoidGated(w.tmp, gate: buffers.sharedGate, rows: n, dim: d, residual: w.x)
        }
    }

    /// Bytes of weights the passes so far read: the router and shared expert every pass, each
    /// routed expert in the passes that chose it.
    func bytesRead(_ b: B, passes: Int) throws -> Int {
        try b.expertReads(experts).reduce(0, +) * bytesPerExpert + passes * alwaysReadBytes
    }
}

extension TensorView {
    /// A stacked tensor [experts, rows, cols] as one view per expert.
    func experts(_ count: Int) throws -> [TensorView] {
        guard shape.count == 3, shape[0] == count, byteCount % count == 0 else {
            throw PeregrineError.format("tensor '\(name)' of shape \(shape) does not hold \(count) experts")
        }
        let bytes = byteCount / count
        return (0..<count).map { e in
            TensorView(name: "\(name)[\(e)]", dtype: dtype, shape: Array(shape.dropFirst()), data: data + e * bytes, byteCount: bytes)
        }
    }

    /// Rows `range` of a matrix, as a view of the same memory.
    func rows(_ range: Range<Int>) throws -> TensorView {
        guard shape.count == 2, range.lowerBound >= 0, range.upperBound <= shape[0], byteCount % shape[0] == 0 else {
            throw PeregrineError.format("tensor '\(name)' of shape \(shape) has no rows \(range)")
        }
        let rowBytes = byteCount / shape[0]
        return TensorView(name: name, dtype: dtype, shape: [range.count, shape[1]], data: data + range.lowerBound * rowBytes,
                          byteCount: range.count * rowBytes)
    }

    /// The same data under another shape of as many elements.
    func reshaped(_ newShape: [Int]) -> TensorView {
        precondition(newShape.reduce(1, *) == elementCount)
        return TensorView(name: name, dtype: dtype, shape: newShape, data: data, byteCount: byteCount)
    }
}

/// How a checkpoint names a layer's experts. Hugging Face files hold one tensor per expert and
/// projection; GGUF files (and fused Hugging Face layouts) one stacked tensor [experts, rows,
/// cols] per projection, read here under `stacked` names (which `GGUFWeights` maps to llama.cpp's
/// `ffn_*_exps`).
struct ExpertTensorNames {
    let router: String
    let expert: (Int, Projection) -> String
    let stacked: (Projection) -> String
    /// Transformers' fused layout: gate and up in one tensor [experts, 2 x intermediate, hidden],
    /// gate first, and the down projections in one [experts, hidden, intermediate].
    let stackedGateUp: String
    let stackedDown: String
    /// The shared expert's prefix (`<prefix>.gate_proj.weight`, its gate `<prefix>_gate.weight`).
    let shared: String?

    enum Projection: CaseIterable {
        case gate, up, down

        var hfName: String {
            switch self {
            case .gate: return "gate_proj"
            case .up: return "up_proj"
            case .down: return "down_proj"
            }
        }
    }

    /// The names of the architecture's layer `layer`.
    init(architecture: String, layer: Int) {
        let p = "model.layers.\(layer)."
        stacked = { proj in p + "mlp.experts.\(proj.hfName).weight" }
        stackedGateUp = p + "mlp.experts.gate_up_proj"
        stackedDown = p + "mlp.experts.down_proj"
        if architecture == "MixtralForCausalLM" {
            // block_sparse_moe.gate and experts.E.w1 / w3 / w2 (gate, up, down).
            router = p + "block_sparse_moe.gate.weight"
            expert = { e, proj in p + "block_sparse_moe.experts.\(e).\(proj == .gate ? "w1" : proj == .up ? "w3" : "w2").weight" }
            shared = nil
        } else {
            // Qwen2-MoE, Qwen3-MoE: mlp.gate, mlp.experts.E.gate_proj / up_proj / down_proj, mlp.shared_expert.
            router = p + "mlp.gate.weight"
            expert = { e, proj in p + "mlp.experts.\(e).\(proj.hfName).weight" }
            shared = p + "mlp.shared_expert"
        }
    }

    /// One projection of every expert, each checked to be [intermediate, hidden] (gate, up) or
    /// [hidden, intermediate] (down): from per-expert tensors, a stacked one, or the fused layout.
    func views(_ source: WeightSource, _ proj: Projection, experts count: Int, hidden d: Int, intermediate ff: Int) throws -> [TensorView] {
        // Each expert's view is named as a slice of the stacked tensor's name in the file (what a
        // `ProductObserver` is told, so an importance matrix names the experts as GGUF stacks them).
        let stack = source.storedName(stacked(proj))
        return try found(source, proj, experts: count, hidden: d, intermediate: ff).enumerated().map { e, v in
            TensorView(name: "\(stack)[\(e)]", dtype: v.dtype, shape: v.shape, data: v.data, byteCount: v.byteCount)
        }
    }

    private func found(_ source: WeightSource, _ proj: Projection, experts count: Int, hidden d: Int, intermediate ff: Int) throws -> [TensorView] {
        let shape = proj == .down ? [d, ff] : [ff, d]
        if source.contains(expert(0, proj)) {
            return try (0..<count).map { try source.require(expert($0, proj), shape: shape) }
        }
        if source.contains(stacked(proj)) {
            return try source.require(stacked(proj), shape: [count] + shape).experts(count)
        }
        if proj == .down, source.contains(stackedDown) {
            return try source.require(stackedDown, shape: [count] + shape).experts(count)
        }
        if proj != .down, source.contains(stackedGateUp) {
            let both = try source.require(stackedGateUp, shape: [count, 2 * ff, d]).experts(count)
            return try both.map { try $0.rows(proj == .gate ? 0..<ff : ff..<(2 * ff)) }
        }
        // Named as the file would name it: one tensor per expert in safetensors, stacked in GGUF.
        let name = stacked(proj)
        throw PeregrineError.format(source.storedName(name) != name ? source.missingReason(name) : source.missingReason(expert(0, proj)))
    }
}
