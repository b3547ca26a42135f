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

    /// A weight the config says exists, or nil when it says none does.
    func load(_ name: String, _ shape: [Int], if present: Bool) throws -> B.Weight? {
        present ? try load(name, shape) : nil
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
