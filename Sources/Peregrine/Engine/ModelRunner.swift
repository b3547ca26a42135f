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

    /// For each work item, the rows of its prompt positions wanted for prompt log probabilities.
    private(set) var promptRows: [(first: Int, positions: Range<Int>)] = []
    private var extraRows: [Int32] = []

    /// Runs the work; returns the logit rows: first one for each work item that samples (in work
    /// order), then those `promptRows` index. A chained step (`chained`: one decode token each)
    /// reads as item i's token the greedy choice of row i of the step before, which the
    /// sequences do not hold yet.
    func run(_ work: [Scheduler.Work], copies: [(from: Int32, to: Int32)], chained: Bool = false) throws -> LogitRows? {
        if !copies.isEmpty { try model.copyKVBlocks(kv, copies) }
        plan.removeAll()
        plan.tableWidth = kv.tableWidth
        promptRows.removeAll(keepingCapacity: true)
        extraRows.removeAll(keepingCapacity: true)
        for (slot, w) in work.enumerated() {
            let s = w.sequence
            let base = plan.count
            // A request for 0 tokens reads its prompt only for its log probabilities.
            if chained {
                plan.append(tokens: CollectionOfOne(-1 - slot), slot: slot, position: w.start, logits: .last)
            } else {
                plan.append(tokens: s.tokens[w.start..<(w.start + w.count)].lazy.map { Int($0) }, slot: slot,
                            position: w.start, logits: w.samples && s.request.maxTokens > 0 ? .last : .none)
            }
            plan.appendBlockTable(s.table.blocks)
            plan.promptLengths.append(Int32(s.promptCount))
            let wanted = s.promptRowsWanted.clamped(to: w.start..<(w.start + w.count))
            promptRows.append((extraRows.count, wanted))
            for p in wanted { extraRows.append(Int32(base + p - w.start)) }
        }
        // The prompt rows go after the sampled ones, so those keep their places (row i: the i-th
        // work item that samples).
        for i in promptRows.indices { promptRows[i].first += plan.logitRows.count }
        plan.logitRows += extraRows
        guard plan.count > 0 else { return nil }
        StepProfile.shared?.mark(.plan)
        return try model.forward(plan, kv: kv)
    }

    /// A prefill pass over about `tokens` tokens as up to `sequences` prompts of equal length,
    /// each sampling its last token, then a decode step of each of `recordedDecodeBatchSizes` up to
    /// `sequences` rows; all of them write into the pool's first blocks, which every sequence
    /// shares: called before any sequence holds a block, so nothing is overwritten, and the
    /// results are dropped. On a GPU the largest step's activations and scratch are allocated
    /// here, its kernels loaded and its products chosen (as llama.cpp reserves its compute
    /// buffers and vLLM runs a profiling pass and captures its graphs when they start), not
    /// inside the first requests' steps: on an H200, the 8B shape's first 256-sequence decode
    /// steps took about 12 ms of host time each for that.
    func warmUp(tokens: Int, sequences: Int) throws {
        let count = max(1, min(sequences, tokens))
        let length = min(tokens / count, kv.capacity - 1, kv.blocks * kv.blockSize - 1)
        guard length >= 1 else { return }
        let table = (0..<(length / kv.blockSize + 1)).map { Int32($0) }
        func pass(rows: Int, tokens n: Int, position: Int) throws {
            plan.removeAll()
            plan.tableWidth = kv.tableWidth
            for slot in 0..<rows {
                plan.append(tokens: repeatElement(0, count: n), slot: slot, position: position, logits: .last)
                plan.appendBlockTable(table)
                plan.promptLengths.append(Int32(length))
            }
            // Read one choice, so that the pass has run (and failed here, if it fails) before
            // requests come, also where passes are submitted without waiting.
            let rows = try model.forward(plan, kv: kv)
            if rows.count > 0 { _ = try rows.argmax(row: 0) }
        }
        try pass(rows: count, tokens: length, position: 0)
        for rows in recordedDecodeBatchSizes where rows <= sequences { try pass(rows: rows, tokens: 1, position: length) }
    }

    /// Takes the prompt log probabilities the work's rows give (rows of positions already scored
    /// before a preemption are skipped).
    func collectPromptLogprobs(_ s: Sequence, item i: Int, logits: LogitRows) throws {
        guard let k = s.request.promptLogprobs else { return }
        let (first, positions) = promptRows[i]
        let vocab = logits.vocabulary
        if row.count != vocab { row = [Float](repeating: 0, count: vocab) }
        for (j, p) in positions.enumerated() where p == s.promptLogprobs.count {
            try row.withUnsafeMutableBufferPointer { try logits.read(row: first + j, into: $0) }
            let next = Int(s.tokens[p + 1])
            s.promptLogprobs.append(row.withUnsafeBufferPointer { ModelRunner.logprobs(of: next, top: k, in: $0) })
        }
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
        let m = Sampler.largest(logits)
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
