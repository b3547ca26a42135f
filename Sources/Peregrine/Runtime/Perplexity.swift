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

    public init(model: LanguageModel, context: Int = 512, batch: Int = 512) throws {
        guard context >= 4 else { throw PeregrineError.invalidArgument("context must be at least 4 tokens, not \(context)") }
        guard batch >= 1 else { throw PeregrineError.invalidArgument("batch must be at least 1, not \(batch)") }
        guard context <= model.config.maxPositions else {
            throw PeregrineError.invalidArgument("context \(context) is longer than the model's \(model.config.maxPositions) positions")
        }
        self.model = model
        self.context = context
        self.batch = min(batch, context)
    }

    /// Scores `tokens` (the whole text, tokenized with BOS when the tokenizer adds one).
    /// `maxChunks` limits the work; `progress` is called after each chunk.
    public func evaluate(tokens: [Int], bos: Int?, maxChunks: Int? = nil,
                         progress: (Progress) -> Void = { _ in }) throws -> Result {
        let available = tokens.count / context
        guard tokens.count >= 2 * context else {
            throw PeregrineError.invalidArgument(
                "the text has \(tokens.count) tokens; perplexity at context \(context) needs at least \(2 * context)")
        }
        let chunks = min(available, maxChunks ?? available)
        let vocab = model.config.vocabSize
        let first = context / 2
        let cache = try PagedKVCache(model: model, slots: 1, capacity: context)
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
                if scoredFrom > pos { plan.append(tokens: chunk[pos..<min(scoredFrom, pos + n)], slot: 0, position: pos, logits: .none) }
                if scoredFrom < pos + n {
                    plan.append(tokens: chunk[scoredFrom..<(pos + n)], slot: 0, position: scoredFrom, logits: .all)
                }
                // The last position predicts nothing inside the chunk.
                if pos + n == context, !plan.logitRows.isEmpty { plan.logitRows.removeLast() }
                try cache.prepare(&plan)
                try logits.withUnsafeMutableBufferPointer { buf in
                    try model.forward(plan, kv: cache.memory, logits: buf)
                }
                try cache.advance(0, by: n)
                if scoredFrom < scoredTo {
                    logits.withUnsafeBufferPointer { buf in
                        for (r, p) in (scoredFrom..<scoredTo).enumerated() {
                            let loss = PerplexityEvaluator.negativeLogLikelihood(
                                UnsafeBufferPointer(rebasing: buf[(r * vocab)..<((r + 1) * vocab)]), target: chunk[p + 1])
                            nll += loss
                            nll2 += loss * loss
                            count += 1
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
