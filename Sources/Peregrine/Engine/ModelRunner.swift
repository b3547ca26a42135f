#if canImport(Glibc)
import Glibc
#endif

/// Runs one step's work through the model: one `BatchPlan` of every scheduled sequence's tokens
/// with its block table, then a token sampled for each sequence that read its last token. Its
/// buffers are kept between steps.
final class ModelRunner {
    let model: LanguageModel
    let kv: KVMemory
    private var plan = BatchPlan()
    private var row: [Float] = []

    init(model: LanguageModel, kv: KVMemory) {
        self.model = model
        self.kv = kv
    }

    /// Runs the work; returns, for each work item that samples, the logits row it reads.
    func run(_ work: [Scheduler.Work], copies: [(from: Int32, to: Int32)]) throws -> LogitRows? {
        if !copies.isEmpty { try model.copyKVBlocks(kv, copies) }
        plan.removeAll()
        plan.tableWidth = kv.tableWidth
        for (slot, w) in work.enumerated() {
            let s = w.sequence
            plan.append(tokens: s.tokens[w.start..<(w.start + w.count)].lazy.map { Int($0) }, slot: slot,
                        position: w.start, logits: w.samples ? .last : .none)
            plan.appendBlockTable(s.table.blocks)
        }
        guard plan.count > 0 else { return nil }
        return try model.forward(plan, kv: kv)
    }

    /// Chooses the next token of `s` from logits row `r` (and its log probabilities when asked).
    func sample(_ s: Sequence, logits: LogitRows, row r: Int) throws -> Int {
        if let k = s.request.logprobs {
            let vocab = logits.vocabulary
            if row.count != vocab { row = [Float](repeating: 0, count: vocab) }
            try row.withUnsafeMutableBufferPointer { try logits.read(row: r, into: $0) }
            let token = try s.tokens.withUnsafeBufferPointer { try s.sampler.sample(logits, row: r, context: $0) }
            s.newLogprobs.append(row.withUnsafeBufferPointer { ModelRunner.logprobs(of: token, top: k, in: $0) })
            return token
        }
        return try s.tokens.withUnsafeBufferPointer { try s.sampler.sample(logits, row: r, context: $0) }
    }

    /// The model's log probabilities (softmax of the raw logits) of a token and of the k most likely.
    static func logprobs(of token: Int, top k: Int, in logits: UnsafeBufferPointer<Float>) -> TokenLogprob {
        var m = -Float.infinity
        for l in logits { m = max(m, l) }
        var sum: Double = 0
        for l in logits { sum += Double(expf(l - m)) }
        let logZ = m + Float(log(sum))
        var top: [TokenLogprob.Alternative] = []
        if k > 0 {
            let n = min(k, logits.count)
            var values = [Float](repeating: 0, count: n), ids = [Int32](repeating: 0, count: n)
            values.withUnsafeMutableBufferPointer { v in ids.withUnsafeMutableBufferPointer { LogitCandidates.largest(n, of: logits, values: v, indices: $0) } }
            top = zip(ids, values).map { TokenLogprob.Alternative(token: Int($0.0), logprob: $0.1 - logZ) }
                .sorted { $0.logprob > $1.logprob || ($0.logprob == $1.logprob && $0.token < $1.token) }
        }
        return TokenLogprob(token: token, logprob: logits[token] - logZ, top: top)
    }
}
