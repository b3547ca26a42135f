/// Binds a family's weights by their Hugging Face names (a GGUF source maps them to its own),
/// checking each shape, and counts the bytes they occupy.
final class WeightLoader<B: ComputeBackend> {
    let source: WeightSource
    let backend: B
    /// Bytes of every weight loaded so far, in their stored types.
    private(set) var bytes = 0

    init(_ source: WeightSource, backend: B) {
        self.source = source
        self.backend = backend
    }

    /// A weight that must exist with this shape (outermost dimension first).
    func load(_ name: String, _ shape: [Int]) throws -> B.Weight {
        let t = try source.require(name, shape: shape)
        bytes += t.byteCount
        return try backend.weight(t)
    }

    /// Weights that must exist with these shapes and that products take over one input (see
    /// `ComputeBackend.weights`).
    func load(together parts: [(name: String, shape: [Int])]) throws -> [B.Weight] {
        let ts = try parts.map { try source.require($0.name, shape: $0.shape) }
        bytes += ts.reduce(0) { $0 + $1.byteCount }
        return try backend.weights(ts)
    }

    /// A weight from a view already taken from the source (reshaped, or a slice), checked
    /// against `shape` and named `name` in errors.
    func view(_ t: TensorView, name: String, shape: [Int]) throws -> B.Weight {
        guard t.shape == shape else { throw PeregrineError.format("tensor '\(source.storedName(name))' has shape \(t.shape), expected \(shape)") }
        bytes += t.byteCount
        return try backend.weight(t)
    }

    /// A layer's routed experts from their tensors (see `ComputeBackend.experts`).
    func experts(gate: [TensorView], up: [TensorView], down: [TensorView]) throws -> B.Experts {
        bytes += (gate + up + down).reduce(0) { $0 + $1.byteCount }
        return try backend.experts(gate: gate, up: up, down: down)
    }

    /// A weight the config says exists, or nil when it says none does.
    func load(_ name: String, _ shape: [Int], if present: Bool) throws -> B.Weight? {
        present ? try load(name, shape) : nil
    }

    /// An RMSNorm weight of `dim`, with `offset` added to every value where the config asks
    /// (Gemma's (1 + weight)); the sum is taken in f32, as the reference computes it.
    func loadNorm(_ name: String, _ dim: Int, offset: Float) throws -> B.Weight {
        guard offset != 0 else { return try load(name, [dim]) }
        let t = try source.require(name, shape: [dim])
        bytes += t.byteCount
        // Vector weights are copied by every backend at load, so the sum need not outlive this call.
        return try t.toFloat().map { $0 + offset }.withUnsafeBytes { sum in
            try backend.weight(TensorView(name: t.name, dtype: .f32, shape: [dim], data: sum.baseAddress!, byteCount: sum.count))
        }
    }

    /// The output projection: `lm_head.weight`, or the embedding table when the config ties them.
    /// A file without `lm_head.weight` whose config does not say so is refused rather than tied.
    func outputProjection(embedding: B.Weight, vocabulary: Int, hidden: Int, tied: Bool) throws -> B.Weight {
        if tied || !source.contains("lm_head.weight") {
            guard tied else { throw PeregrineError.format("missing tensor 'lm_head.weight'") }
            return embedding
        }
        return try load("lm_head.weight", [vocabulary, hidden])
    }
}
