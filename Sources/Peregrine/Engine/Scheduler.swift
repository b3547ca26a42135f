/// Decides, every step, which sequences run and how many of their tokens: the decode token of
/// every running sequence first, then chunks of waiting prompts, under a per-step token budget
/// (chunked prefill). Admits waiting sequences while blocks allow, mapping their cached prefix
/// blocks first; when blocks run out it preempts the most recently admitted sequences, which
/// give back their blocks and later read their tokens again (recomputation). Not thread-safe:
/// the engine calls it from its stepping thread.
final class Scheduler {
    struct Work {
        let sequence: Sequence
        /// First position read this step, and how many.
        let start: Int
        let count: Int
        /// Reads the sequence's last token, so a new one is sampled from it.
        var samples: Bool { start + count == sequence.tokens.count }
    }

    let config: EngineConfig
    let blocks: BlockManager
    private(set) var waiting: [Sequence] = []
    private(set) var running: [Sequence] = []
    private var admissions = 0
    private(set) var preemptions = 0
    private(set) var prefixQueries = 0
    private(set) var prefixHits = 0
    /// Copies of shared blocks the next pass must make before writing (copy on write).
    var copies: [(from: Int32, to: Int32)] = []

    /// LongRoPE's original context: a longer prompt takes the long factors at every position, so
    /// its blocks hold other keys than a shorter prompt's for the same tokens.
    let longPromptFrom: Int?
    static let longPromptRoot: UInt64 = 0x4C6F_6E67_526F_5045

    init(config: EngineConfig, blocks: BlockManager, longPromptFrom: Int? = nil) {
        self.config = config
        self.blocks = blocks
        self.longPromptFrom = longPromptFrom
    }

    var hasWork: Bool { !waiting.isEmpty || !running.isEmpty }

    func add(_ s: Sequence) {
        if let limit = longPromptFrom, s.promptCount > limit { s.table.root = Scheduler.longPromptRoot }
        insertWaiting(s)
    }

    /// Waiting sequences in service order: by arrival, or by priority then arrival.
    private func insertWaiting(_ s: Sequence) {
        s.status = .waiting
        let i = waiting.firstIndex { before(s, $0) } ?? waiting.endIndex
        waiting.insert(s, at: i)
    }

    private func before(_ a: Sequence, _ b: Sequence) -> Bool {
        if config.policy == .priority && a.request.priority != b.request.priority { return a.request.priority < b.request.priority }
        return a.arrival < b.arrival || (a.arrival == b.arrival && a.index < b.index)
    }

    /// The running sequence preemption takes first: the latest admitted (of the lowest priority).
    private func victim() -> Int? {
        running.indices.max { a, b in
            let x = running[a], y = running[b]
            if config.policy == .priority && x.request.priority != y.request.priority { return x.request.priority < y.request.priority }
            return x.admission < y.admission
        }
    }

    /// This step's work. `copies` holds the block copies to make first.
    func schedule() -> [Work] {
        copies.removeAll(keepingCapacity: true)
        var work: [Work] = []
        var budget = config.maxBatchTokens ?? 512
        var promptRows = config.maxPromptLogitRows ?? 256
        var preempted = false
        var i = 0
        while i < running.count && budget > 0 {
            let s = running[i]
            let n = chunk(s, budget: budget, promptRows: &promptRows)
            guard n > 0 else { i += 1; continue }
            var placed = false
            while true {
                if blocks.blocksNeeded(s.table, positions: s.computed + n, writeFrom: s.computed) <= blocks.availableCount {
                    placed = true
                    break
                }
                guard let v = victim() else { break }
                let victimIsSelf = running[v] === s
                preempt(at: v)
                preempted = true
                if v < i { i -= 1 }
                if victimIsSelf { break }
            }
            guard placed else { continue }  // s itself was preempted; `i` now names the next one
            take(s, n)
            work.append(Work(sequence: s, start: s.computed, count: n))
            budget -= n
            i += 1
        }
        // New sequences only when nothing had to be preempted (they would take the blocks back).
        while !preempted && budget > 0 && running.count < config.maxSequences, let s = waiting.first {
            if s.computed == 0 && s.table.blocks.isEmpty && config.prefixCaching {
                // At least the last prompt token is read again, for the logits of the next one.
                // Prompt log probabilities need the last layer's output at every prompt position,
                // which the cache does not keep: cached blocks are mapped only up to the first
                // position still to be scored (none for a new request), so those positions are
                // computed rather than mapped and then computed again into shared blocks (copies).
                // The blocks such a request writes are registered as usual for later requests.
                let limit = s.request.promptLogprobs == nil ? s.tokens.count - 1 : min(s.tokens.count - 1, s.promptRowsWanted.lowerBound)
                let mapped = blocks.mapCachedPrefix(&s.table, tokens: s.tokens, maxBlocks: limit / blocks.blockSize)
                s.computed = mapped
                if s.generatedCount == 0 {
                    prefixQueries += s.promptCount
                    prefixHits += mapped
                    s.cachedPromptTokens = mapped
                }
            }
            var rowsLeft = promptRows
            let n = chunk(s, budget: budget, promptRows: &rowsLeft)
            guard n > 0, blocks.blocksNeeded(s.table, positions: s.computed + n, writeFrom: s.computed) <= blocks.availableCount else {
                // Keep the mapped prefix only while it waits at the head of the line.
                break
            }
            promptRows = rowsLeft
            waiting.removeFirst()
            s.status = .running
            admissions += 1
            s.admission = admissions
            running.append(s)
            take(s, n)
            work.append(Work(sequence: s, start: s.computed, count: n))
            budget -= n
        }
        return work
    }

    /// The decode step after `work`, to be queued before `work`'s tokens are read (a chained
    /// step): each sequence's next position, whose token is the one `work` is choosing, with its
    /// blocks taken as `schedule` would take them. Nil where that step is not plainly the one
    /// `schedule` would choose next: a sequence waits, `work` is not one token of every running
    /// sequence, a block would have to be copied, or one is missing (`schedule` would preempt).
    func chainAhead(_ work: [Work]) -> [Work]? {
        guard waiting.isEmpty, work.count == running.count, work.count <= config.maxBatchTokens ?? 512 else { return nil }
        var need = 0
        for w in work {
            let s = w.sequence, at = w.start + 1, block = at / blocks.blockSize
            guard w.count == 1, s.status == .running, w.samples else { return nil }
            if block < s.table.blocks.count && (blocks.references(s.table.blocks[block]) > 1 || blocks.isRegistered(s.table.blocks[block])) {
                return nil
            }
            need += blocks.blocksNeeded(s.table, positions: at + 1, writeFrom: at)
        }
        guard need <= blocks.availableCount else { return nil }
        return work.map { w in
            let s = w.sequence
            let ok = blocks.reserve(&s.table, positions: w.start + 2)
            precondition(ok, "blocks were counted before they were taken")
            return Work(sequence: s, start: w.start + 1, count: 1)
        }
    }

    /// Tokens of `s` to read this step: what is left, within the token budget and, for a
    /// sequence scored for prompt log probabilities, within the step's logit rows left for those
    /// (each position read from the first one still unscored takes a row), which it uses up.
    private func chunk(_ s: Sequence, budget: Int, promptRows: inout Int) -> Int {
        var n = min(s.uncomputed, budget)
        let wanted = s.promptRowsWanted
        if !wanted.isEmpty {
            // Positions before the first wanted row were scored before a preemption: no rows.
            n = min(n, max(0, wanted.lowerBound + promptRows - s.computed))
            promptRows -= wanted.clamped(to: s.computed..<(s.computed + n)).count
        }
        return n
    }

    /// Reserves the blocks positions computed..<computed+n are written to.
    private func take(_ s: Sequence, _ n: Int) {
        let ok = blocks.prepareWrite(&s.table, from: s.computed, to: s.computed + n, copies: &copies)
            && blocks.reserve(&s.table, positions: s.computed + n)
        precondition(ok, "blocks were counted before they were taken")
    }

    /// Gives back a running sequence's blocks and puts it back in line; it reads all its tokens
    /// again when admitted (its registered blocks may still be found in the prefix cache).
    private func preempt(at i: Int) {
        let s = running.remove(at: i)
        blocks.releaseAll(&s.table)
        s.computed = 0
        preemptions += 1
        insertWaiting(s)
    }

    /// After the pass: positions are written, full blocks registered.
    func advance(_ w: Work) {
        let s = w.sequence
        s.computed = w.start + w.count
        if config.prefixCaching { blocks.commit(&s.table, tokens: s.tokens, length: s.computed) }
    }

    /// Sample 0 has read the prompt: the other samples take its blocks (sharing them) and read
    /// only the last prompt token again, which copies the shared last block when written.
    func releaseForks(of s: Sequence) {
        guard !s.forks.isEmpty else { return }
        for f in s.forks {
            f.table = blocks.fork(s.table)
            f.computed = s.promptCount - 1
            f.cachedPromptTokens = s.cachedPromptTokens
            f.promptLogprobs = s.promptLogprobs
            insertWaiting(f)
        }
        s.forks.removeAll()
    }

    /// Ends a sequence wherever it is, freeing its blocks at once.
    func remove(_ s: Sequence) {
        if let i = running.firstIndex(where: { $0 === s }) { running.remove(at: i) }
        if let i = waiting.firstIndex(where: { $0 === s }) { waiting.remove(at: i) }
        blocks.releaseAll(&s.table)
        for f in s.forks { blocks.releaseAll(&f.table) }
    }
}
