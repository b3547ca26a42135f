import Foundation

/// Perplexity by llama.cpp's `llama-perplexity` method, so the two engines' figures compare:
/// the text is cut into non-overlapping chunks of `context` tokens, each evaluated from an empty
/// cache (its first token replaced by BOS when the tokenizer adds one), and only the second
/// half of each chunk is scored, so every scored token sees at least context/2 tokens before it.
public struct PerplexityEvaluator {
    public struct Progress: Sendable {
        public let chunk: Int
        public let chunks: Int
        /// The estimate over the chunks so far.
        public let perplexity: Double
        public let seconds: Double
    }

    public struct Result: Sendable {
        public let perplexity: Double
        /// One standard error of the estimate (from the spread of the per-token losses).
        public let uncertainty: Double
        public let chunks: Int
        public let scoredTokens: Int
        public let seconds: Double
        /// Mean negative log-likelihood per scored token, in nats.
        public let meanNLL: Double
    }

    public let model: LanguageModel
    public let context: Int
    public let batch: Int
    /// How the chunks' keys and values are stored: the one asked for, else the backend's
    /// (F16 on a GPU, as llama-perplexity's default cache; f32 on the CPU).
    public let cacheType: KVCacheType

    public init(model: LanguageModel, context: Int = 512, batch: Int = 512, cacheType: KVCacheType? = nil) throws {
        guard context >= 4 else { throw PeregrineError.invalidArgument("context must be at least 4 tokens, not \(context)") }
        guard batch >= 1 else { throw PeregrineError.invalidArgument("batch must be at least 1, not \(batch)") }
        guard context <= model.config.maxPositions else {
            throw PeregrineError.invalidArgument("context \(context) is longer than the model's \(model.config.maxPositions) positions")
        }
        self.model = model
        self.context = context
        self.batch = min(batch, context)
        self.cacheType = cacheType ?? model.preferredKVCacheType
    }

    /// A scored position: the logits at `position` of chunk `chunk`, which predict `target`.
    public struct ScoredRow {
        public let chunk: Int
        public let position: Int
        public let logits: UnsafeBufferPointer<Float>
        public let target: Int
    }

    /// Scores `tokens` (the whole text, tokenized with BOS when the tokenizer adds one).
    /// `maxChunks` limits the work; `scored` sees each scored row's logits, in order;
    /// `progress` is called after each chunk. With `logitsOfEveryPosition` the output
    /// projection runs on every position of a chunk, not only the scored ones (so that an
    /// observer of the products sees it as llama.cpp's imatrix tool does). A text must hold
    /// `minimumChunks` chunks (two, as llama-perplexity asks of a text).
    public func evaluate(tokens: [Int], bos: Int?, maxChunks: Int? = nil, logitsOfEveryPosition: Bool = false,
                         minimumChunks: Int = 2, scored: ((ScoredRow) throws -> Void)? = nil,
                         progress: (Progress) -> Void = { _ in }) throws -> Result {
        let available = tokens.count / context
        guard tokens.count >= max(1, minimumChunks) * context else {
            throw PeregrineError.invalidArgument(
                "the text has \(tokens.count) tokens; perplexity at context \(context) needs at least \(max(1, minimumChunks) * context)")
        }
        let chunks = min(available, maxChunks ?? available)
        let vocab = model.config.vocabSize
        let first = context / 2
        let cache = try PagedKVCache(model: model, slots: 1, capacity: context, type: cacheType)
        var logits = [Float](repeating: 0, count: batch * vocab)
        var nll = 0.0, nll2 = 0.0, count = 0
        let start = Date()
        var plan = BatchPlan()
        for c in 0..<chunks {
            var chunk = Array(tokens[(c * context)..<((c + 1) * context)])
            if let bos { chunk[0] = bos }
            try cache.trim(0, to: 0)
            var pos = 0
            while pos < context {
                let n = min(batch, context - pos)
                plan.removeAll()
                // Logits only where they are scored: positions first ..< context - 1 predict
                // the token after them.
                let scoredFrom = max(pos, first), scoredTo = min(pos + n, context - 1)
                if logitsOfEveryPosition {
                    plan.append(tokens: chunk[pos..<(pos + n)], slot: 0, position: pos, logits: .all)
                } else {
                    if scoredFrom > pos { plan.append(tokens: chunk[pos..<min(scoredFrom, pos + n)], slot: 0, position: pos, logits: .none) }
                    if scoredFrom < pos + n {
                        plan.append(tokens: chunk[scoredFrom..<(pos + n)], slot: 0, position: scoredFrom, logits: .all)
                    }
                    // The last position predicts nothing inside the chunk.
                    if pos + n == context, !plan.logitRows.isEmpty { plan.logitRows.removeLast() }
                }
                // The row holding the logits of position `scoredFrom`.
                let firstScoredRow = logitsOfEveryPosition ? scoredFrom - pos : 0
                try cache.prepare(&plan)
                try logits.withUnsafeMutableBufferPointer { buf in
                    try model.forward(plan, kv: cache.memory, logits: buf)
                }
                try cache.advance(0, by: n)
                if scoredFrom < scoredTo {
                    try logits.withUnsafeBufferPointer { buf in
                        for (i, p) in (scoredFrom..<scoredTo).enumerated() {
                            let r = firstScoredRow + i
                            let row = UnsafeBufferPointer(rebasing: buf[(r * vocab)..<((r + 1) * vocab)])
                            let loss = PerplexityEvaluator.negativeLogLikelihood(row, target: chunk[p + 1])
                            nll += loss
                            nll2 += loss * loss
                            count += 1
                            try scored?(ScoredRow(chunk: c, position: p, logits: row, target: chunk[p + 1]))
                        }
                    }
                }
                pos += n
            }
            progress(Progress(chunk: c + 1, chunks: chunks, perplexity: exp(nll / Double(count)),
                              seconds: Date().timeIntervalSince(start)))
        }
        let mean = nll / Double(count)
        let variance = nll2 / Double(count) - mean * mean
        let stderr = count > 1 && variance > 0 ? (variance / Double(count - 1)).squareRoot() : 0
        let ppl = exp(mean)
        return Result(perplexity: ppl, uncertainty: stderr * ppl, chunks: chunks, scoredTokens: count,
                      seconds: Date().timeIntervalSince(start), meanNLL: mean)
    }

    /// -log softmax(logits)[target], computed in double from the row's maximum.
    static func negativeLogLikelihood(_ logits: UnsafeBufferPointer<Float>, target: Int) -> Double {
        var m = -Float.infinity
        for v in logits where v > m { m = v }
        var sum = 0.0
        for v in logits { sum += Foundation.exp(Double(v - m)) }
        return log(sum) - Double(logits[target] - m)
    }
}
