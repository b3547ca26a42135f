import Foundation

/// Collects an importance matrix while a model runs: as a `ProductObserver` of the CPU backend
/// it sums, for every input column of each layer weight's products, the squares of the inputs,
/// and counts the rows, as llama.cpp's `llama-imatrix` does (layer weights `blk.*`, and the
/// output matrix `output.weight` when `includeOutput`; the tied embedding is never collected).
/// Weights are named as in GGUF files whatever file the model came from. Sums accumulate in
/// double precision.
public final class ImportanceCollector: ProductObserver {
    struct Accumulator {
        var sums: [Double]
        var counts: [Int]
        let columns: Int
    }

    public let includeOutput: Bool
    private var accumulators: [String: Accumulator] = [:]
    /// Stored weight name -> GGUF name, or nil for a weight that is not collected.
    private var names: [String: String?] = [:]
    private(set) var failure: PeregrineError?

    public init(includeOutput: Bool = false) {
        self.includeOutput = includeOutput
    }

    private func collectedName(_ stored: String) -> String? {
        if let known = names[stored] { return known }
        let g = GGUFWeights.ggufName(stored)
        let name = g.hasPrefix("blk.") || (includeOutput && g == "output.weight") ? g : nil
        names[stored] = name
        return name
    }

    public func observe(weight: String, expert: Int, of experts: Int, input: UnsafePointer<Float>, rows: Int, cols: Int) {
        guard rows > 0, let name = collectedName(weight) else { return }
        var a = accumulators.removeValue(forKey: name)
            ?? Accumulator(sums: [Double](repeating: 0, count: cols * experts), counts: [Int](repeating: 0, count: experts), columns: cols)
        defer { accumulators[name] = a }
        guard a.columns == cols, a.counts.count == experts, expert >= 0, expert < experts else {
            failure = failure ?? .backend("'\(name)' was seen with \(experts) experts of \(cols) columns, before with \(a.counts.count) of \(a.columns)")
            return
        }
        a.counts[expert] += rows
        a.sums.withUnsafeMutableBufferPointer { sums in
            let acc = sums.baseAddress! + expert * cols
            for r in 0..<rows {
                let x = input + r * cols
                for j in 0..<cols {
                    let v = Double(x[j])
                    acc[j] += v * v
                }
            }
            for j in 0..<cols where !acc[j].isFinite {
                failure = failure ?? .backend("the inputs of '\(name)' are not finite")
                return
            }
        }
    }

    /// Weights seen so far.
    public var weightCount: Int { accumulators.count }

    /// The matrix collected so far, `chunks` chunks of `chunkSize` tokens of `datasets`.
    public func matrix(datasets: [String], chunks: Int, chunkSize: Int) throws -> ImportanceMatrix {
        if let failure { throw failure }
        var entries: [String: ImportanceMatrix.Entry] = [:]
        for (name, a) in accumulators {
            entries[name] = ImportanceMatrix.Entry(sums: a.sums.map { Float($0) }, counts: a.counts)
        }
        return ImportanceMatrix(entries: entries, datasets: datasets, chunkCount: chunks, chunkSize: chunkSize)
    }

    /// Throws the first inconsistency seen (inputs that are not finite, a weight seen with two shapes).
    public func check() throws {
        if let failure { throw failure }
    }
}

/// `peregrine imatrix`: an importance matrix collected over a calibration text, cut into chunks
/// as llama-imatrix and llama-perplexity cut it (non-overlapping chunks of `context` tokens,
/// each from an empty cache with its first token replaced by BOS; every token of every chunk
/// goes through the model), with the perplexity of the chunks' second halves on the way.
public struct ImportanceMatrixRun {
    public struct Progress: Sendable {
        public let chunk: Int
        public let chunks: Int
        public let perplexity: Double
        public let tokensPerSecond: Double
        public let secondsLeft: Double
    }

    public let model: LanguageModel
    public let backend: CPUBackend
    public let context: Int
    public let batch: Int
    public let includeOutput: Bool

    /// `model` must run on `backend`: the products are watched there.
    public init(model: LanguageModel, backend: CPUBackend, context: Int = 512, batch: Int = 512, includeOutput: Bool = false) {
        self.model = model
        self.backend = backend
        self.context = context
        self.batch = batch
        self.includeOutput = includeOutput
    }

    /// The matrix over `tokens` (the text tokenized with BOS when the tokenizer adds one), at most
    /// `maxChunks` chunks; `dataset` names the text in the file.
    public func collect(tokens: [Int], bos: Int?, maxChunks: Int? = nil, dataset: String,
                        progress: (Progress) -> Void = { _ in }) throws -> (matrix: ImportanceMatrix, perplexity: PerplexityEvaluator.Result) {
        let evaluator = try PerplexityEvaluator(model: model, context: context, batch: batch)
        let collector = ImportanceCollector(includeOutput: includeOutput)
        let previous = backend.productObserver
        backend.productObserver = collector
        defer { backend.productObserver = previous }
        let result = try evaluator.evaluate(tokens: tokens, bos: bos, maxChunks: maxChunks, logitsOfEveryPosition: includeOutput,
                                            scored: { _ in try collector.check() }) { p in
            let rate = Double(p.chunk * context) / max(p.seconds, 1e-9)
            progress(Progress(chunk: p.chunk, chunks: p.chunks, perplexity: p.perplexity, tokensPerSecond: rate,
                              secondsLeft: Double((p.chunks - p.chunk) * context) / rate))
        }
        try collector.check()
        guard collector.weightCount > 0 else {
            throw PeregrineError.unsupported("no matrix products of the model's layers were seen; the imatrix is collected on the CPU backend")
        }
        return (try collector.matrix(datasets: [dataset], chunks: result.chunks, chunkSize: context), result)
    }
}
