/// What a model asks of the hardware. A model definition is written once against this protocol;
/// the CPU and CUDA backends implement it. Activations are f32 buffers laid out row-major, one row
/// per token of the batch; weights keep their stored type.
public protocol ComputeBackend: AnyObject {
    /// Device memory for f32 activations.
    associatedtype Buffer
    /// A weight tensor as the backend keeps it (a matrix [out, in] or a vector).
    associatedtype Weight

    var name: String { get }
    /// How a KV cache stores keys and values when the user does not say: what the backend's
    /// attention reads fastest.
    var preferredKVCacheType: KVCacheType { get }

    /// Makes a weight usable by the backend. The view's memory (a mapped file) outlives the model.
    func weight(_ t: TensorView) throws -> Weight
    /// Weights that products take together over one input (a layer's q, k and v): a backend may
    /// place them one under another in one allocation and run them as one product.
    func weights(_ ts: [TensorView]) throws -> [Weight]
    /// Rows of a matrix weight (the length of a product's output row).
    func outputSize(_ w: Weight) -> Int
    /// An f32 buffer of `count` elements, zeroed.
    func buffer(_ count: Int) throws -> Buffer
    func write(_ values: UnsafeBufferPointer<Float>, to buffer: Buffer, offset: Int)
    func read(_ buffer: Buffer, offset: Int, into values: UnsafeMutableBufferPointer<Float>)

    /// out[t, :] = table[tokens[t], :]; a token below 0 is a chained step's (`chainsGreedyTokens`).
    func embed(tokens: UnsafeBufferPointer<Int32>, table: Weight, out: Buffer)
    /// out[r, :] = x[r, :] / rms(x[r, :]) * weight, for `rows` rows of `dim`.
    func rmsNorm(_ x: Buffer, weight: Weight, eps: Float, rows: Int, dim: Int, out: Buffer)
    /// Two in-place RMSNorms over rows of one width (a layer's per-head query and key norms),
    /// as two `rmsNorm` calls give; a GPU runs them as one launch.
    func rmsNormPair(_ a: (x: Buffer, weight: Weight, rows: Int), _ b: (x: Buffer, weight: Weight, rows: Int), eps: Float, dim: Int)
    /// out[t, :] = x[t, :] @ weight^T (+ bias), weight is [outDim, inDim].
    func matmul(_ x: Buffer, rows: Int, weight: Weight, bias: Weight?, out: Buffer)
    /// Rotates the first `rotaryDim` dimensions of `heads` heads of `headDim` per row in place
    /// with cos/sin tables of [rows, rotaryDim / 2], leaving the rest of each head as it is
    /// (partial rotary; `rotaryDim` is `headDim` for most models): pair i is
    /// (i, i + rotaryDim/2) in the rotate-half convention of Hugging Face, (2i, 2i + 1) when
    /// `interleaved` (GGUF llama files, whose converter permuted the q/k rows to suit it).
    func rope(_ x: Buffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: Buffer, sin: Buffer, interleaved: Bool)
    /// Writes K and V rows [rows, kvDim] into the cache at each token's (slot, position).
    func storeKV(layer: Int, k: Buffer, v: Buffer, rows: Int, plan: BatchPlan, cache: KVStorage<Self>)
    /// Causal attention of each query row over its sequence's cache: softmax over the scores
    /// (q . k) * `scoring.scale`, each first soft-capped to cap * tanh(score / cap) where
    /// `scoring.softCap` is set.
    func attention(layer: Int, q: Buffer, rows: Int, plan: BatchPlan, cache: KVStorage<Self>,
                   heads: Int, window: Int?, scoring: AttentionScoring, out: Buffer)
    /// out = silu(gate) * up, elementwise over `count`.
    func siluMul(gate: Buffer, up: Buffer, count: Int, out: Buffer)
    /// out = gelu_tanh(gate) * up, elementwise over `count` (GELU with the tanh approximation).
    func geluTanhMul(gate: Buffer, up: Buffer, count: Int, out: Buffer)
    /// x *= factor, elementwise over `count`.
    func scale(_ x: Buffer, count: Int, by factor: Float)
    /// x = cap * tanh(x / cap), elementwise over `count` (logit soft-capping).
    func softCap(_ x: Buffer, count: Int, cap: Float)
    /// x += y, elementwise over `count`.
    func add(_ x: Buffer, _ y: Buffer, count: Int)
    /// out[i, :] = x[rows[i], :] for row vectors of `dim`.
    func gatherRows(_ x: Buffer, rows: UnsafeBufferPointer<Int32>, dim: Int, out: Buffer)
    /// dst[dstOffset ..< dstOffset + count] = src[srcOffset ..< srcOffset + count]
    func copy(_ src: Buffer, offset srcOffset: Int, to dst: Buffer, offset dstOffset: Int, count: Int)
    /// Makes the results of queued work visible to the host (a no-op on the CPU).
    func synchronize() throws
    /// Ends a forward pass like `synchronize`, where the backend chains steps without waiting
    /// for its work: whatever reads its results waits (every read of logits does), and inputs a
    /// later pass stages do not overwrite those this one is still to read.
    func submit() throws

    /// Free device memory in bytes, for sizing the KV pool; nil where memory is the host's.
    var freeDeviceMemory: Int? { get }
    /// Time spent per kernel, when the backend was asked to measure it.
    var kernelProfile: String? { get }

    /// Marks the start of a forward pass whose work is the same, pointers and all, every time
    /// it comes with this key (a decode step), so a backend may record it once and replay it.
    /// The pass ends with `synchronize` or `submit`.
    func beginStep(key: Int)
    /// Set from `beginPass` to `synchronize` when the pass replays a recording: its kernels are
    /// queued already, and only the values it stages (tokens, RoPE tables, logit rows) change.
    var replayingStep: Bool { get }
    /// The rows a decode step of `rows` sequences (one token each, every row sampled) is padded
    /// to so that the backend can record it once and replay it (the next of its capture sizes),
    /// or nil to run the step as it is. Padding rows write only the KV memory's scratch block and
    /// their logits are not returned.
    func decodeGraphRows(_ rows: Int) -> Int?
    /// The batch a forward pass runs (after `beginStep`), for a backend to move its positions and
    /// block tables to the device once instead of in every layer.
    func beginPass(_ plan: BatchPlan)

    // Fusions a backend may do in one pass; the defaults compose the operations above.

    /// Three products of the same input (the q, k and v projections).
    func matmul3(_ x: Buffer, rows: Int, _ a: (weight: Weight, bias: Weight?, out: Buffer),
                 _ b: (weight: Weight, bias: Weight?, out: Buffer), _ c: (weight: Weight, bias: Weight?, out: Buffer))
    /// residual += x @ weight^T (+ bias); `scratch` holds the product where it cannot be fused.
    func matmulAdd(_ x: Buffer, rows: Int, weight: Weight, bias: Weight?, residual: Buffer, scratch: Buffer)
    /// RoPE on the queries and keys, and the rotated keys and the values written to the cache.
    func ropeStoreKV(layer: Int, q: Buffer, k: Buffer, v: Buffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: Buffer,
                     sin: Buffer, interleaved: Bool, plan: BatchPlan, cache: KVStorage<Self>)
    /// `ropeStoreKV`, then `attention` of the rotated queries into `out`.
    func ropeAttention(layer: Int, q: Buffer, k: Buffer, v: Buffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: Buffer,
                       sin: Buffer, interleaved: Bool, plan: BatchPlan, cache: KVStorage<Self>, window: Int?, scoring: AttentionScoring,
                       out: Buffer)
    /// out = act(x @ gate^T + gateBias) * (x @ up^T + upBias); `scratch` holds the up product.
    func gatedProduct(_ x: Buffer, rows: Int, gate: Weight, gateBias: Weight?, up: Weight, upBias: Weight?,
                      activation: GatedActivation, out: Buffer, scratch: Buffer)
    /// `matmul3` of the RMS-normalized x; `normed` receives the normalized rows where the norm is not fused.
    func normMatmul3(_ x: Buffer, norm: Weight, eps: Float, dim: Int, normed: Buffer, rows: Int,
                     _ a: (weight: Weight, bias: Weight?, out: Buffer), _ b: (weight: Weight, bias: Weight?, out: Buffer),
                     _ c: (weight: Weight, bias: Weight?, out: Buffer))
    /// `matmul` of the RMS-normalized x (the output head); `normed` as in `normMatmul3`.
    func normMatmul(_ x: Buffer, norm: Weight, eps: Float, dim: Int, normed: Buffer, rows: Int, weight: Weight, out: Buffer)
    /// `gatedProduct` of the RMS-normalized x; `normed` as in `normMatmul3`.
    func normGatedProduct(_ x: Buffer, norm: Weight, eps: Float, dim: Int, normed: Buffer, rows: Int, gate: Weight, gateBias: Weight?,
                          up: Weight, upBias: Weight?, activation: GatedActivation, out: Buffer, scratch: Buffer)

    // Choosing tokens where the logits are, so a GPU need not copy whole rows back. The defaults
    // read the row.

    /// The index of the largest value of row `row` of x (rows of `cols`), the first one on ties.
    func argmax(_ x: Buffer, row: Int, cols: Int) throws -> Int
    /// `argmax` of several rows.
    func argmax(_ x: Buffer, rows: [Int], cols: Int) throws -> [Int]
    /// The `k` largest values of row `row` and their indices, in no particular order.
    func topK(_ x: Buffer, row: Int, cols: Int, k: Int, values: UnsafeMutableBufferPointer<Float>,
              indices: UnsafeMutableBufferPointer<Int32>) throws
    /// The repetition penalty on row `row`: positive values at `ids` (distinct) divided by it, negative ones multiplied.
    func penalize(_ x: Buffer, row: Int, cols: Int, ids: UnsafeBufferPointer<Int32>, penalty: Float)
    /// Σ exp((x - shift) * scale) over row `row`: a softmax's normalizer (top-p from the top-k).
    func expSum(_ x: Buffer, row: Int, cols: Int, shift: Float, scale: Float) throws -> Float
    /// Whether `sampleRows` draws where the logits are, all rows at once (a GPU); otherwise the
    /// engine samples row by row.
    var samplesRows: Bool { get }
    /// A token for each row of `rows` of x, drawn as `Sampler` draws with top-k (see
    /// `SamplingDraw`); `drew` is false where the row's best logit was not finite and the best
    /// token was taken without the draw's number.
    func sampleRows(_ x: Buffer, rows: [Int], cols: Int, draws: [SamplingDraw]) throws -> [(token: Int, drew: Bool)]

    // Chained decode steps: the engine queues a decode step whose tokens are the greedy choices
    // of the step before, still where that step left them, and reads those choices after.

    /// Whether a pass's calls return before the device has run them (a GPU), so that the host's
    /// work meanwhile is free.
    var queuesWork: Bool { get }
    /// Whether `queueGreedy` is there, and `embed` takes a token -1 - i as row i's choice of the
    /// last `queueGreedy`.
    var chainsGreedyTokens: Bool { get }
    /// Rows the last `queueGreedy` chose (tokens -1 - i name them); 0 before any.
    var chainedTokenRows: Int { get }
    /// The most rows one `queueGreedy` takes.
    var chainableRows: Int { get }
    /// The ticket of the last `queueGreedy` (-1 before any): an engine chains a step only on
    /// choices that are still the last ones queued, not another engine's on the same backend.
    var lastGreedyTicket: Int { get }
    /// The engine whose chained step is queued on this backend, if any: another engine on the
    /// same model then chooses its tokens without chaining, so that neither overwrites the
    /// other's choices.
    var greedyChainOwner: ObjectIdentifier? { get set }
    /// Queues the choice (argmax, the first on ties) of each of rows 0..<rows of x without waiting
    /// for it; returns the ticket `takeGreedy` reads them by (the last two calls' can be read).
    func queueGreedy(_ x: Buffer, rows: Int, cols: Int) throws -> Int
    /// The choices `queueGreedy` queued as `ticket`, once they are made.
    func takeGreedy(_ ticket: Int, rows: Int, cols: Int) throws -> [Int]

    // Mixture of experts: a router chooses k experts per token, each a gated MLP of its own.

    /// The routed experts of one layer as the backend keeps them.
    associatedtype Experts
    /// A layer's routed experts: expert e's gate and up projections ([intermediate, hidden]) and
    /// down projection ([hidden, intermediate]); every expert has the same shapes, and each of
    /// the three projections one stored type across the experts.
    func experts(gate: [TensorView], up: [TensorView], down: [TensorView]) throws -> Experts
    /// Top-k routing over a softmax: for each of `rows` rows of router logits [rows, experts], the
    /// `k` most probable experts (the lower index first on ties), in order of falling probability,
    /// with their probabilities, divided by their sum when `normalize`. `routes` receives
    /// [rows, k] pairs (weight, expert index as the bits of an Int32).
    func routeTopK(_ logits: Buffer, rows: Int, experts: Int, k: Int, normalize: Bool, routes: Buffer)
    /// A MoE layer's input and routes: normed = rmsNorm(x), logits = normed @ router^T, routes
    /// = routeTopK(logits), as those three calls give (within rounding: a GPU may run them as
    /// one launch, and prepare the input `experts` take from `normed`).
    func normRoute(_ x: Buffer, norm: Weight, eps: Float, rows: Int, dim: Int, router: Weight, experts: Experts, count: Int, k: Int,
                   normalize: Bool, normed: Buffer, logits: Buffer, routes: Buffer)
    /// residual[t] += Σ weight · down_e(silu(gate_e · x[t]) * up_e · x[t]) over the `k` routes
    /// (e, weight) of row t, summed in order of expert index, then added. Only the chosen
    /// experts' weights are read. Over many rows, the rows routed to an expert go through its
    /// weights together, so each is read once a pass; over a few a backend may run each route
    /// alone. A row's arithmetic does not depend on the other rows (on a GPU, under
    /// `deterministic`, nor on how many there are).
    func expertProducts(_ x: Buffer, rows: Int, routes: Buffer, k: Int, experts: Experts, residual: Buffer)
    /// For each expert, how many passes read its weights since the experts were made.
    func expertReads(_ experts: Experts) throws -> [Int]
    /// residual[t, :] += sigmoid(gate[t]) * y[t, :] for `rows` rows of `dim` (a shared expert
    /// scaled by its own gate).
    func addSigmoidGated(_ y: Buffer, gate: Buffer, rows: Int, dim: Int, residual: Buffer)
}

/// The decode batch sizes a backend that records steps records (vLLM's CUDA graph capture
/// sizes; other sizes are padded to the next), which a GPU engine warms up at start.
public let recordedDecodeBatchSizes = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256]

extension ComputeBackend {
    /// F32: the CPU's attention kernels read f32 keys and values without converting them.
    public var preferredKVCacheType: KVCacheType { .f32 }
    public func weights(_ ts: [TensorView]) throws -> [Weight] { try ts.map { try weight($0) } }
    public func beginStep(key: Int) {}
    public var replayingStep: Bool { false }
    public func decodeGraphRows(_ rows: Int) -> Int? { nil }
    public func beginPass(_ plan: BatchPlan) {}

    public var freeDeviceMemory: Int? { nil }
    public var kernelProfile: String? { nil }

    public func normRoute(_ x: Buffer, norm: Weight, eps: Float, rows: Int, dim: Int, router: Weight, experts: Experts, count: Int, k: Int,
                          normalize: Bool, normed: Buffer, logits: Buffer, routes: Buffer) {
        normRouteInSteps(x, norm: norm, eps: eps, rows: rows, dim: dim, router: router, count: count, k: k, normalize: normalize,
                         normed: normed, logits: logits, routes: routes)
    }

    /// `normRoute` as its three calls (what a backend that fuses them falls back to).
    func normRouteInSteps(_ x: Buffer, norm: Weight, eps: Float, rows: Int, dim: Int, router: Weight, count: Int, k: Int,
                          normalize: Bool, normed: Buffer, logits: Buffer, routes: Buffer) {
        rmsNorm(x, weight: norm, eps: eps, rows: rows, dim: dim, out: normed)
        matmul(normed, rows: rows, weight: router, bias: nil, out: logits)
        routeTopK(logits, rows: rows, experts: count, k: k, normalize: normalize, routes: routes)
    }

    public func rmsNormPair(_ a: (x: Buffer, weight: Weight, rows: Int), _ b: (x: Buffer, weight: Weight, rows: Int), eps: Float, dim: Int) {
        rmsNorm(a.x, weight: a.weight, eps: eps, rows: a.rows, dim: dim, out: a.x)
        rmsNorm(b.x, weight: b.weight, eps: eps, rows: b.rows, dim: dim, out: b.x)
    }

    public func matmul3(_ x: Buffer, rows: Int, _ a: (weight: Weight, bias: Weight?, out: Buffer),
                        _ b: (weight: Weight, bias: Weight?, out: Buffer), _ c: (weight: Weight, bias: Weight?, out: Buffer)) {
        matmul(x, rows: rows, weight: a.weight, bias: a.bias, out: a.out)
        matmul(x, rows: rows, weight: b.weight, bias: b.bias, out: b.out)
        matmul(x, rows: rows, weight: c.weight, bias: c.bias, out: c.out)
    }

    public func matmulAdd(_ x: Buffer, rows: Int, weight: Weight, bias: Weight?, residual: Buffer, scratch: Buffer) {
        matmul(x, rows: rows, weight: weight, bias: bias, out: scratch)
        add(residual, scratch, count: rows * outputSize(weight))
    }

    public func ropeStoreKV(layer: Int, q: Buffer, k: Buffer, v: Buffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: Buffer,
                            sin: Buffer, interleaved: Bool, plan: BatchPlan, cache: KVStorage<Self>) {
        rope(q, rows: rows, heads: heads, headDim: headDim, rotaryDim: rotaryDim, cos: cos, sin: sin, interleaved: interleaved)
        rope(k, rows: rows, heads: cache.kvHeads, headDim: headDim, rotaryDim: rotaryDim, cos: cos, sin: sin, interleaved: interleaved)
        storeKV(layer: layer, k: k, v: v, rows: rows, plan: plan, cache: cache)
    }

    public func ropeAttention(layer: Int, q: Buffer, k: Buffer, v: Buffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: Buffer,
                              sin: Buffer, interleaved: Bool, plan: BatchPlan, cache: KVStorage<Self>, window: Int?, scoring: AttentionScoring,
                              out: Buffer) {
        ropeStoreKV(layer: layer, q: q, k: k, v: v, rows: rows, heads: heads, headDim: headDim, rotaryDim: rotaryDim, cos: cos, sin: sin,
                    interleaved: interleaved, plan: plan, cache: cache)
        attention(layer: layer, q: q, rows: rows, plan: plan, cache: cache, heads: heads, window: window, scoring: scoring, out: out)
    }

    /// `attention` with the usual scale, 1 / sqrt(head size), and no soft-capping.
    public func attention(layer: Int, q: Buffer, rows: Int, plan: BatchPlan, cache: KVStorage<Self>,
                          heads: Int, window: Int?, out: Buffer) {
        attention(layer: layer, q: q, rows: rows, plan: plan, cache: cache, heads: heads, window: window,
                  scoring: AttentionScoring(headDim: cache.headDim), out: out)
    }

    /// `ropeAttention` with the usual scale, 1 / sqrt(head size), and no soft-capping.
    public func ropeAttention(layer: Int, q: Buffer, k: Buffer, v: Buffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: Buffer,
                              sin: Buffer, interleaved: Bool, plan: BatchPlan, cache: KVStorage<Self>, window: Int?, out: Buffer) {
        ropeAttention(layer: layer, q: q, k: k, v: v, rows: rows, heads: heads, headDim: headDim, rotaryDim: rotaryDim, cos: cos, sin: sin,
                      interleaved: interleaved, plan: plan, cache: cache, window: window,
                      scoring: AttentionScoring(headDim: headDim), out: out)
    }

    /// out = act(gate) * up with the activation given.
    public func gatedActivation(_ activation: GatedActivation, gate: Buffer, up: Buffer, count: Int, out: Buffer) {
        switch activation {
        case .silu: siluMul(gate: gate, up: up, count: count, out: out)
        case .geluTanh: geluTanhMul(gate: gate, up: up, count: count, out: out)
        }
    }

    public func gatedProduct(_ x: Buffer, rows: Int, gate: Weight, gateBias: Weight?, up: Weight, upBias: Weight?,
                             activation: GatedActivation, out: Buffer, scratch: Buffer) {
        matmul(x, rows: rows, weight: gate, bias: gateBias, out: out)
        matmul(x, rows: rows, weight: up, bias: upBias, out: scratch)
        gatedActivation(activation, gate: out, up: scratch, count: rows * outputSize(up), out: out)
    }

    /// `gatedProduct` with silu.
    public func gatedProduct(_ x: Buffer, rows: Int, gate: Weight, gateBias: Weight?, up: Weight, upBias: Weight?,
                             out: Buffer, scratch: Buffer) {
        gatedProduct(x, rows: rows, gate: gate, gateBias: gateBias, up: up, upBias: upBias, activation: .silu, out: out, scratch: scratch)
    }

    public func normMatmul3(_ x: Buffer, norm: Weight, eps: Float, dim: Int, normed: Buffer, rows: Int,
                            _ a: (weight: Weight, bias: Weight?, out: Buffer), _ b: (weight: Weight, bias: Weight?, out: Buffer),
                            _ c: (weight: Weight, bias: Weight?, out: Buffer)) {
        rmsNorm(x, weight: norm, eps: eps, rows: rows, dim: dim, out: normed)
        matmul3(normed, rows: rows, a, b, c)
    }

    public func normMatmul(_ x: Buffer, norm: Weight, eps: Float, dim: Int, normed: Buffer, rows: Int, weight: Weight, out: Buffer) {
        rmsNorm(x, weight: norm, eps: eps, rows: rows, dim: dim, out: normed)
        matmul(normed, rows: rows, weight: weight, bias: nil, out: out)
    }

    public func normGatedProduct(_ x: Buffer, norm: Weight, eps: Float, dim: Int, normed: Buffer, rows: Int, gate: Weight,
                                 gateBias: Weight?, up: Weight, upBias: Weight?, activation: GatedActivation, out: Buffer, scratch: Buffer) {
        rmsNorm(x, weight: norm, eps: eps, rows: rows, dim: dim, out: normed)
        gatedProduct(normed, rows: rows, gate: gate, gateBias: gateBias, up: up, upBias: upBias, activation: activation,
                     out: out, scratch: scratch)
    }

    /// Row `row` of x (rows of `cols`) copied to the host, for the defaults below.
    func hostRow(_ x: Buffer, row: Int, cols: Int) -> [Float] {
        var values = [Float](repeating: 0, count: cols)
        values.withUnsafeMutableBufferPointer { read(x, offset: row * cols, into: $0) }
        return values
    }

    public func argmax(_ x: Buffer, row: Int, cols: Int) throws -> Int {
        try synchronize()
        return hostRow(x, row: row, cols: cols).withUnsafeBufferPointer { Sampler.argmax($0) }
    }

    public func argmax(_ x: Buffer, rows: [Int], cols: Int) throws -> [Int] {
        try rows.map { try argmax(x, row: $0, cols: cols) }
    }

    public func topK(_ x: Buffer, row: Int, cols: Int, k: Int, values: UnsafeMutableBufferPointer<Float>,
                     indices: UnsafeMutableBufferPointer<Int32>) throws {
        try synchronize()
        hostRow(x, row: row, cols: cols).withUnsafeBufferPointer { LogitCandidates.largest(k, of: $0, values: values, indices: indices) }
    }

    public func expSum(_ x: Buffer, row: Int, cols: Int, shift: Float, scale: Float) throws -> Float {
        try synchronize()
        return hostRow(x, row: row, cols: cols).withUnsafeBufferPointer { Sampler.expSum($0, shift: shift, scale: scale) }
    }

    public func submit() throws { try synchronize() }

    public var queuesWork: Bool { false }
    public var chainsGreedyTokens: Bool { false }
    public var chainedTokenRows: Int { 0 }
    public var chainableRows: Int { 0 }
    public var lastGreedyTicket: Int { -1 }
    public var greedyChainOwner: ObjectIdentifier? {
        get { nil }
        set {}
    }
    public func queueGreedy(_ x: Buffer, rows: Int, cols: Int) throws -> Int {
        throw PeregrineError.invalidArgument("this backend does not chain decode steps")
    }
    public func takeGreedy(_ ticket: Int, rows: Int, cols: Int) throws -> [Int] {
        throw PeregrineError.invalidArgument("this backend does not chain decode steps")
    }

    public var samplesRows: Bool { false }

    public func sampleRows(_ x: Buffer, rows: [Int], cols: Int, draws: [SamplingDraw]) throws -> [(token: Int, drew: Bool)] {
        throw PeregrineError.unsupported("\(name) does not sample rows where the logits are")
    }

    public func penalize(_ x: Buffer, row: Int, cols: Int, ids: UnsafeBufferPointer<Int32>, penalty: Float) {
        var all = hostRow(x, row: row, cols: cols)
        all.withUnsafeMutableBufferPointer { RepetitionPenalty.apply(penalty, to: $0, ids: ids) }
        all.withUnsafeBufferPointer { write($0, to: x, offset: row * cols) }
    }
}

/// The activation of a gated MLP's gate product: act(gate) * up.
public enum GatedActivation: Sendable {
    /// silu(x) = x * sigmoid(x) (Llama, Mistral, Qwen).
    case silu
    /// GELU with the tanh approximation, 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (Gemma).
    case geluTanh
}

/// How attention scores are formed from q . k: multiplied by `scale`, then, where `softCap` is
/// set, soft-capped to softCap * tanh(score / softCap) (Gemma 2).
public struct AttentionScoring: Equatable, Sendable {
    public var scale: Float
    public var softCap: Float?

    public init(scale: Float, softCap: Float? = nil) {
        self.scale = scale
        self.softCap = softCap
    }

    /// The usual scale, 1 / sqrt(head size), and no cap.
    public init(headDim: Int) {
        self.init(scale: 1 / Float(headDim).squareRoot())
    }
}

/// Sees the input of a backend's matrix products as they run, without changing them: what
/// an importance matrix is collected from. A backend that takes an observer calls it once per
/// product with the product's input rows, before the product.
public protocol ProductObserver: AnyObject {
    /// `rows` rows of `cols` values at `input`: the input of a product with the weight stored
    /// as `weight` (its name in the model's file). A layer's routed experts report the rows
    /// routed to each expert separately, as expert `expert` of `experts`; a dense product is
    /// expert 0 of 1.
    func observe(weight: String, expert: Int, of experts: Int, input: UnsafePointer<Float>, rows: Int, cols: Int)
}

/// Where each token of a batch goes: its position in its sequence and its sequence's row of
/// block tables. Built by the runtime, read by the model and the backend.
public struct BatchPlan {
    public var tokens: [Int32] = []
    public var positions: [Int32] = []
    /// Each token's sequence: a row of `blockTables`.
    public var slots: [Int32] = []
    /// Rows (indices into tokens) whose logits are wanted, in output order.
    public var logitRows: [Int32] = []
    /// The KV blocks of each sequence of the batch, `tableWidth` entries a row: position p of the
    /// sequence in row s lives at offset p % blockSize of block blockTables[s * tableWidth + p / blockSize].
    public var blockTables: [Int32] = []
    public var tableWidth = 0
    /// The length of each sequence's prompt (by row of block tables; rows beyond the list: the
    /// last position the pass gives the sequence, plus one). It fixes what a position's rotation
    /// depends on besides the position: LongRoPE takes its long factors at every position of a
    /// prompt longer than the original context, however many passes read the prompt.
    public var promptLengths: [Int32] = []

    public init() {}

    public var count: Int { tokens.count }
    /// Sequences (rows of block tables) in the plan.
    public var tableRows: Int { tableWidth > 0 ? blockTables.count / tableWidth : 0 }

    public mutating func removeAll() {
        tokens.removeAll(keepingCapacity: true)
        positions.removeAll(keepingCapacity: true)
        slots.removeAll(keepingCapacity: true)
        logitRows.removeAll(keepingCapacity: true)
        blockTables.removeAll(keepingCapacity: true)
        promptLengths.removeAll(keepingCapacity: true)
    }

    /// Appends one sequence's new tokens, starting at `position`.
    public mutating func append(tokens new: some Collection<Int>, slot: Int, position: Int, logits: LogitSelection) {
        let start = tokens.count
        for (i, t) in new.enumerated() {
            tokens.append(Int32(truncatingIfNeeded: t))
            positions.append(Int32(position + i))
            slots.append(Int32(slot))
        }
        switch logits {
        case .none: break
        case .last: if tokens.count > start { logitRows.append(Int32(tokens.count - 1)) }
        case .all: for r in start..<tokens.count { logitRows.append(Int32(r)) }
        }
    }

    /// Appends a row of block tables (padded with block 0, which no valid position reads).
    public mutating func appendBlockTable(_ blocks: some Collection<Int32>) {
        blockTables.append(contentsOf: blocks.prefix(tableWidth))
        for _ in min(blocks.count, tableWidth)..<tableWidth { blockTables.append(0) }
    }

    /// Where token `t`'s keys and values live: its row index in the KV pool.
    @inline(__always)
    public func kvRow(token t: Int, blockSize: Int) -> Int {
        let p = Int(positions[t])
        return Int(blockTables[Int(slots[t]) * tableWidth + p / blockSize]) * blockSize + p % blockSize
    }

    public enum LogitSelection { case none, last, all }
}

/// The key/value memory of every layer: a pool of `blocks` blocks of `blockSize` positions each,
/// a sequence reaching up to `capacity` positions through its block table. Each layer's buffers
/// hold `blocks` blocks of `blockSize * kvHeads * headDim` values; the layout inside a block is
/// the backend's (values [offset, kvHead, headDim] on both; keys transposed to [kvHead, headDim,
/// offset] on the CPU, see `PagedAttention`). Which blocks a sequence holds is the runtime's
/// bookkeeping (`BlockManager`); this is only the storage.
public final class KVStorage<B: ComputeBackend>: KVMemory {
    public let keys: [B.Buffer]
    public let values: [B.Buffer]
    public let kvHeads: Int
    public let headDim: Int
    /// How keys and values are stored; an F16 buffer holds two values in each f32 slot.
    public let type: KVCacheType

    public init(backend: B, layers: Int, blocks: Int, blockSize: Int, capacity: Int, kvHeads: Int, headDim: Int,
                type: KVCacheType = .f32) throws {
        // One block past `blocks`: see `scratchBlock`.
        let n = (blocks + 1) * blockSize * kvHeads * headDim
        if type == .f16, (blockSize * kvHeads * headDim) % 2 != 0 {
            throw PeregrineError.invalidArgument("an F16 KV cache needs an even number of values per block (block size \(blockSize) x \(kvHeads) KV heads x head size \(headDim))")
        }
        let slots = type == .f32 ? n : n / 2
        keys = try (0..<layers).map { _ in try backend.buffer(slots) }
        values = try (0..<layers).map { _ in try backend.buffer(slots) }
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.type = type
        super.init(blocks: blocks, blockSize: blockSize, capacity: capacity)
    }

    public var rowSize: Int { kvHeads * headDim }
    /// One block past the pool's `blocks` is allocated too: this one, which no sequence holds,
    /// where the padding rows of a recorded decode step (`decodeGraphRows`) write their keys and values.
    public var scratchBlock: Int { blocks }
    /// One block of one layer, in the buffers' f32 slots.
    public var blockStride: Int { type == .f32 ? blockSize * rowSize : blockSize * rowSize / 2 }
}

/// The checks every backend's `experts(gate:up:down:)` makes of a layer's expert tensors (as
/// many of each, every expert's shapes and each projection's stored type the same); returns
/// the hidden and intermediate sizes.
func checkExpertTensors(gate: [TensorView], up: [TensorView], down: [TensorView]) throws -> (hidden: Int, intermediate: Int) {
    guard !gate.isEmpty, gate.count == up.count, gate.count == down.count else {
        throw PeregrineError.format("experts need as many gate, up and down projections (\(gate.count), \(up.count), \(down.count))")
    }
    let ff = gate[0].shape.first ?? 0, d = gate[0].shape.last ?? 0
    for e in gate.indices {
        for (t, shape) in [(gate[e], [ff, d]), (up[e], [ff, d]), (down[e], [d, ff])] where t.shape != shape {
            throw PeregrineError.format("expert tensor '\(t.name)' has shape \(t.shape), expected \(shape)")
        }
        for (t, first) in [(gate[e], gate[0]), (up[e], up[0]), (down[e], down[0])] where t.dtype != first.dtype {
            throw PeregrineError.format("expert tensor '\(t.name)' is \(t.dtype.rawValue), expert 0's is \(first.dtype.rawValue)")
        }
    }
    return (d, ff)
}

/// The element type of the KV cache: f32 (the default, exact against the f32 reference), or F16,
/// half the memory and half the bytes attention reads (llama.cpp's default); on the GPU, an F16 cache
/// also lets prompts attend on tensor cores (f16 products, f32 accumulation).
public enum KVCacheType: String, Sendable, CaseIterable {
    case f32, f16
    public var bytes: Int { self == .f32 ? 4 : 2 }
}
