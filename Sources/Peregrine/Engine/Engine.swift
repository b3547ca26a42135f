import Foundation

/// The serving engine: a running batch of sequences over a paged KV cache with prefix caching.
/// Requests join and leave the batch at every step; each step is one forward pass mixing the
/// decode tokens of running sequences with chunks of waiting prompts.
///
/// Thread safety: `add`, `cancel`, `stream`, `stats` and `shutdown` may be called from any
/// thread. `step` and `generate(prompts:)` run the model and take the engine's step lock, so
/// concurrent callers take turns; outputs of a request go to its stream (if it was added with
/// `stream`) and are also returned by the `step` call that produced them. `start` runs a
/// background thread that steps while there is work; `stream` starts it.
public final class Engine: @unchecked Sendable {
    public let model: LanguageModel
    /// nil: outputs carry tokens only, and stop strings cannot be used.
    public let tokenizer: Tokenizer?
    public let config: EngineConfig
    /// Longest prompt plus generation of one sequence.
    public let contextLength: Int
    /// How the KV blocks store keys and values (the config's, or the model's backend's preference).
    public var kvCacheType: KVCacheType { config.kvCacheType ?? model.preferredKVCacheType }
    public let eosTokenIds: Set<Int>
    let blocks: BlockManager
    let kv: KVMemory
    private let scheduler: Scheduler
    private let runner: ModelRunner

    private struct Pending {
        var sequences: [Sequence]
        var sink: ((EngineOutput) -> Void)?
        var failure: ((Error) -> Void)?
    }
    /// Guards `inbox`, `cancellations`, `sinks`, `nextId`, `snapshot` and the loop flags.
    private let lock = NSCondition()
    private let stepLock = NSLock()
    private var inbox: [Pending] = []
    private var cancellations: [Int] = []
    private var sinks: [Int: (output: (EngineOutput) -> Void, failure: (Error) -> Void)] = [:]
    /// Requests the stepping thread knows: their live sequences.
    private var live: [Int: [Sequence]] = [:]
    private var nextId = 1
    private var arrivals = 0
    private var snapshot = EngineStats()
    private var loopRunning = false
    private var stopping = false
    private var greedyRows: [Int] = []
    /// Forward passes run (steps with work). Caller holds the step lock.
    private var forwardPasses = 0
    /// Rows of a step drawn together where the logits are (`Sampler.deviceDraw`), and their draws.
    private var drawnRows: [Int] = []
    private var draws: [SamplingDraw] = []
    /// A step queued whose greedy tokens are not read yet (chained steps, `chainDecodeSteps`).
    private struct QueuedStep {
        let work: [Scheduler.Work]
        let logits: LogitRows
        let ticket: Int
    }
    /// While a step is queued, this engine owns the backend's chain (`greedyChainOwner`).
    private var queued: QueuedStep? {
        didSet {
            if let q = queued {
                q.logits.chainOwner = ObjectIdentifier(self)
            } else if let old = oldValue, old.logits.chainOwner == ObjectIdentifier(self) {
                old.logits.chainOwner = nil
            }
        }
    }
    /// Steps queued chained so far (for tests).
    private(set) var chainedSteps = 0

    public init(model: LanguageModel, tokenizer: Tokenizer?, config requested: EngineConfig = EngineConfig()) throws {
        var config = requested
        config.maxBatchTokens = requested.maxBatchTokens ?? (model.freeDeviceMemory == nil ? 512 : 8192)
        config.maxPromptLogitRows = requested.maxPromptLogitRows ?? max(16, (64 << 20) / (4 * max(model.config.vocabSize, 1)))
        let kvCacheType = requested.kvCacheType ?? model.preferredKVCacheType
        config.kvCacheType = kvCacheType
        guard config.blockSize > 0, (config.maxBatchTokens ?? 0) > 0, config.maxSequences > 0, (config.maxPromptLogitRows ?? 0) > 0 else {
            throw PeregrineError.invalidArgument("block size, batch tokens, prompt logit rows and sequences must be > 0")
        }
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        let context = config.contextLength ?? model.config.maxPositions
        guard context > 1 else { throw PeregrineError.invalidArgument("context length must be > 1") }
        contextLength = context
        eosTokenIds = Set((tokenizer?.eosTokenIds ?? []) + model.config.eosTokenIds)
        let perPosition = PagedKVCache.bytesPerPosition(model.config, type: kvCacheType)
        let count: Int
        if let n = config.kvBlocks {
            count = n
        } else if let bytes = config.kvMemoryBytes {
            count = bytes / (perPosition * config.blockSize)
        } else if let free = model.freeDeviceMemory {
            // The GPU: a fraction of what is free once the weights are in (activations and
            // scratch take the rest).
            count = Int(Double(free) * config.gpuMemoryFraction) / (perPosition * config.blockSize)
        } else {
            let physical = Int(sysconf(Int32(_SC_PHYS_PAGES))) * Int(sysconf(Int32(_SC_PAGESIZE)))
            let want = (context + config.blockSize - 1) / config.blockSize * min(config.maxSequences, 16)
            count = max(1, min(want, physical / 4 / (perPosition * config.blockSize)))
        }
        guard count > 0 else {
            throw PeregrineError.invalidArgument("the KV memory holds no block of \(config.blockSize) positions (\(perPosition * config.blockSize) bytes)")
        }
        if model.freeDeviceMemory == nil {
            try PagedKVCache.checkFits(model.config, positions: count * config.blockSize, type: kvCacheType)
        }
        kv = try model.makeKVMemory(blocks: count, blockSize: config.blockSize, capacity: context, type: kvCacheType)
        blocks = BlockManager(blocks: count, blockSize: config.blockSize)
        var longPromptFrom: Int?
        if case .longrope(let l) = model.config.ropeScaling { longPromptFrom = l.originalMaxPositions }
        scheduler = Scheduler(config: config, blocks: blocks, longPromptFrom: longPromptFrom)
        runner = ModelRunner(model: model, kv: kv)
        snapshot.kvBlocksTotal = count
        if config.warmUp ?? (model.freeDeviceMemory != nil) {
            try runner.warmUp(tokens: config.maxBatchTokens ?? 1, sequences: config.maxSequences)
        }
    }

    /// The background thread holds the engine only while it steps, so an engine nobody else
    /// holds goes away; its streams end with an error instead of waiting forever.
    deinit {
        lock.lock()
        stopping = true
        let failures = sinks.values.map(\.failure)
        sinks.removeAll()
        lock.broadcast()
        lock.unlock()
        for f in failures { f(PeregrineError.invalidArgument("the engine was released")) }
        // Gives the backend's chain back to other engines on the model.
        if let q = queued, q.logits.chainOwner == ObjectIdentifier(self) { q.logits.chainOwner = nil }
    }

    // MARK: Requests

    /// Queues a request; its outputs come from `step` (and its stream). Throws for a request the
    /// engine can never serve: bad parameters, an empty prompt or one beyond the context, more
    /// blocks than the whole pool.
    @discardableResult
    public func add(_ request: EngineRequest) throws -> Int {
        try add(request, sink: nil, failure: nil)
    }

    private func add(_ r: EngineRequest, sink: ((EngineOutput) -> Void)?, failure: ((Error) -> Void)?) throws -> Int {
        try validate(r)
        lock.lock()
        defer { lock.unlock() }
        guard !stopping else { throw PeregrineError.invalidArgument("the engine is shutting down") }
        let id = nextId
        nextId += 1
        arrivals += 1
        let seqs = (0..<r.n).map {
            Sequence(requestId: id, index: $0, request: r, arrival: arrivals, tokenizer: tokenizer, eos: eosTokenIds)
        }
        inbox.append(Pending(sequences: seqs, sink: sink, failure: failure))
        if let sink, let failure { sinks[id] = (sink, failure) }
        lock.signal()
        return id
    }

    private func validate(_ r: EngineRequest) throws {
        try r.sampling.validate()
        let vocab = model.config.vocabSize
        guard !r.promptTokens.isEmpty else { throw PeregrineError.invalidArgument("the prompt is empty (no tokens to start from)") }
        if let bad = r.promptTokens.first(where: { $0 < 0 || $0 >= vocab }) {
            throw PeregrineError.invalidArgument("prompt token \(bad) is outside the model's vocabulary of \(vocab)")
        }
        guard tokenizer != nil || r.stopStrings.isEmpty else { throw PeregrineError.invalidArgument("stop strings need a tokenizer") }
        guard r.maxTokens >= 0 else { throw PeregrineError.invalidArgument("max tokens must be >= 0 (got \(r.maxTokens))") }
        guard r.promptTokens.count < contextLength else {
            throw PeregrineError.invalidArgument("the prompt is \(r.promptTokens.count) tokens, but the context length is \(contextLength)")
        }
        guard r.n >= 1, r.n <= config.maxSequences else {
            throw PeregrineError.invalidArgument("n must be between 1 and \(config.maxSequences) (got \(r.n))")
        }
        if let k = r.logprobs { guard k >= 0, k <= 20 else { throw PeregrineError.invalidArgument("logprobs must be between 0 and 20 (got \(k))") } }
        if let k = r.promptLogprobs {
            guard k >= 0, k <= 20 else { throw PeregrineError.invalidArgument("prompt logprobs must be between 0 and 20 (got \(k))") }
        }
        guard r.presencePenalty.isFinite, r.frequencyPenalty.isFinite, r.logitBias.values.allSatisfy(\.isFinite) else {
            throw PeregrineError.invalidArgument("penalties and logit biases must be finite numbers")
        }
        // One sequence alone must fit in the pool, or preemption could never make room for it.
        let longest = min(r.promptTokens.count + r.maxTokens, contextLength)
        let need = (longest + config.blockSize - 1) / config.blockSize + 1
        guard need <= blocks.blockCount else {
            throw PeregrineError.invalidArgument(
                "the request needs up to \(need) KV blocks of \(config.blockSize) positions, more than the pool's \(blocks.blockCount)")
        }
    }

    /// Stops a request wherever it is; its blocks are freed at once if the engine is not in the
    /// middle of a step, else when that step ends.
    public func cancel(_ id: Int) {
        lock.lock()
        cancellations.append(id)
        lock.signal()
        lock.unlock()
        if stepLock.try() {
            var outputs: [EngineOutput] = []
            intake(&outputs)
            stepLock.unlock()
            deliver(outputs)
        }
    }

    public var stats: EngineStats {
        lock.lock()
        defer { lock.unlock() }
        return snapshot
    }

    // MARK: Stepping

    /// Runs one forward pass of the running batch and returns what each sequence produced.
    /// Returns nothing when there is no work.
    @discardableResult
    public func step() throws -> [EngineOutput] {
        stepLock.lock()
        var outputs: [EngineOutput] = []
        do {
            intake(&outputs)
            try runStep(&outputs)
            publish()
            stepLock.unlock()
        } catch {
            // A failed pass fails every request it held; the engine stays usable.
            queued = nil
            let failed = scheduler.running + scheduler.waiting
            for s in failed { s.finish(.cancelled); scheduler.remove(s) }
            let ids = Set(failed.map(\.requestId))
            for id in ids { live[id] = nil }
            publish()
            stepLock.unlock()
            lock.lock()
            let toFail = ids.compactMap { sinks.removeValue(forKey: $0)?.failure }
            lock.unlock()
            for f in toFail { f(error) }
            throw error
        }
        deliver(outputs)
        return outputs
    }

    /// Takes new requests and cancellations from the inbox. Caller holds the step lock.
    private func intake(_ outputs: inout [EngineOutput]) {
        lock.lock()
        let newOnes = inbox
        let cancelled = cancellations
        inbox.removeAll()
        cancellations.removeAll()
        lock.unlock()
        for p in newOnes {
            guard let first = p.sequences.first else { continue }
            live[first.requestId] = p.sequences
            if first.request.maxTokens == 0 && first.request.promptLogprobs == nil {
                for s in p.sequences { s.finish(.length); outputs.append(s.takeOutput()) }
                live[first.requestId] = nil
                continue
            }
            first.forks = Array(p.sequences.dropFirst())
            scheduler.add(first)
        }
        for id in cancelled {
            guard let seqs = live.removeValue(forKey: id) else { continue }
            for s in seqs where !s.isFinished {
                scheduler.remove(s)
                s.finish(.cancelled)
                outputs.append(s.takeOutput())
            }
        }
        if let q = queued, q.work.allSatisfy({ $0.sequence.isFinished }) { queued = nil }
        if !cancelled.isEmpty { publish() }
    }

    private func runStep(_ outputs: inout [EngineOutput]) throws {
        let profile = StepProfile.shared
        profile?.beginStep()
        if let q = queued {
            queued = nil
            try takeChained(q, &outputs)
            return
        }
        let work = scheduler.schedule()
        guard !work.isEmpty else { return }
        profile?.mark(.schedule)
        let logits = try runner.run(work, copies: scheduler.copies)
        forwardPasses += 1
        if let logits, chains(work, logits) {
            try takeChained(QueuedStep(work: work, logits: logits, ticket: try logits.queueGreedy(rows: work.count)), &outputs)
            return
        }
        // Plain greedy rows are chosen together (one read back on a GPU); the rest one by one.
        greedyRows.removeAll(keepingCapacity: true)
        var row = 0
        for w in work where w.samples && w.sequence.request.maxTokens > 0 {
            if w.sequence.sampler.isPlainGreedy && w.sequence.request.logprobs == nil { greedyRows.append(row) }
            row += 1
        }
        let greedy = greedyRows.isEmpty ? [] : try logits.map { try $0.argmax(rows: greedyRows) } ?? []
        // Sampled rows whose parameters the backend covers are drawn together too (one launch and
        // one read back on a GPU), each with its own sequence's stream.
        drawnRows.removeAll(keepingCapacity: true)
        draws.removeAll(keepingCapacity: true)
        if let logits, logits.samplesRows {
            row = 0
            var g = 0
            for w in work where w.samples && w.sequence.request.maxTokens > 0 {
                if g < greedyRows.count && greedyRows[g] == row {
                    g += 1
                } else if w.sequence.request.logprobs == nil,
                          let d = try w.sequence.tokens.withUnsafeBufferPointer({ try w.sequence.sampler.deviceDraw(logits, row: row, context: $0) }) {
                    drawnRows.append(row)
                    draws.append(d)
                }
                row += 1
            }
        }
        let drawn = drawnRows.isEmpty ? [] : try logits?.sample(rows: drawnRows, draws: draws) ?? []
        profile?.mark(.sample)
        row = 0
        var g = 0, d = 0
        for (i, w) in work.enumerated() {
            let s = w.sequence
            if let logits { try runner.collectPromptLogprobs(s, item: i, logits: logits) }
            scheduler.advance(w)
            if s.request.maxTokens == 0 {
                // Read for its prompt log probabilities only: done once the prompt is.
                if s.computed == s.promptCount { finishUnsampled(s, &outputs) }
                continue
            }
            guard w.samples, let logits else { continue }
            if s.computed == s.promptCount { scheduler.releaseForks(of: s) }
            let token: Int
            if g < greedyRows.count && greedyRows[g] == row {
                token = greedy[g]
                g += 1
            } else if d < drawnRows.count && drawnRows[d] == row {
                token = drawn[d].token
                s.sampler.settle(drew: drawn[d].drew)
                d += 1
            } else {
                token = try runner.sample(s, logits: logits, row: row)
            }
            row += 1
            give(token, to: s, &outputs)
        }
        if let profile {
            profile.mark(.advance)
            profile.endStep(decode: work.allSatisfy { $0.count == 1 && $0.start + 1 > $0.sequence.promptCount })
        }
    }

    /// Whether the step's tokens are taken as a chained step's: chaining is on, and every item is
    /// one decode token of a sequence whose next token is its greedy choice and nothing else
    /// (no log probabilities, no samples waiting to fork).
    private func chains(_ work: [Scheduler.Work], _ logits: LogitRows) -> Bool {
        guard logits.chainsGreedy, config.chainDecodeSteps ?? logits.runsAhead, logits.count >= work.count,
              work.count <= logits.chainableRows, logits.chainOwner.map({ $0 == ObjectIdentifier(self) }) ?? true else { return false }
        for w in work {
            let s = w.sequence
            guard w.count == 1, w.samples, s.request.maxTokens > 0, s.sampler.isPlainGreedy, s.request.logprobs == nil,
                  s.request.promptLogprobs == nil, s.forks.isEmpty else { return false }
        }
        return true
    }

    /// Takes the tokens of a queued step. First, where the step after it is plainly the next one
    /// (the same sequences, one token each, none stopping for its length, no request waiting),
    /// that step is queued reading these tokens where they are, so the device runs it while the
    /// host reads them and takes them; it stays queued for the next call.
    private func takeChained(_ q: QueuedStep, _ outputs: inout [EngineOutput]) throws {
        let profile = StepProfile.shared
        var next: QueuedStep?
        lock.lock()
        let quiet = inbox.isEmpty && cancellations.isEmpty
        lock.unlock()
        // Only on choices still the backend's last: another engine on the same model may have
        // queued its own since, and the next step's embedding would read those.
        if quiet, q.logits.lastGreedyTicket == q.ticket, q.work.allSatisfy({ continues($0.sequence) }),
           let ahead = scheduler.chainAhead(q.work) {
            profile?.mark(.schedule)
            if let logits = try runner.run(ahead, copies: [], chained: true) {
                forwardPasses += 1
                chainedSteps += 1
                next = QueuedStep(work: ahead, logits: logits, ticket: try logits.queueGreedy(rows: ahead.count))
            }
        }
        let tokens = try q.logits.takeGreedy(q.ticket, rows: q.work.count)
        profile?.mark(.sample)
        for (i, w) in q.work.enumerated() {
            let s = w.sequence
            // Ended (cancelled, or stopped at the token before) after this step was queued.
            guard !s.isFinished else { continue }
            scheduler.advance(w)
            give(tokens[i], to: s, &outputs)
        }
        // A step queued for sequences that all stopped at these tokens is thrown away now (its
        // writes go to freed blocks, ahead of any later use on the device's stream).
        queued = next.flatMap { n in n.work.contains { !$0.sequence.isFinished } ? n : nil }
        if let profile {
            profile.mark(.advance)
            profile.endStep(decode: true)
        }
    }

    /// Gives a sequence its next token: a token that ends it (a stop, its length, the context)
    /// takes it off the schedule, and a request whose samples all ended is no longer live.
    private func give(_ token: Int, to s: Sequence, _ outputs: inout [EngineOutput]) {
        if !s.accept(token, contextLimit: contextLength) { scheduler.remove(s) }
        outputs.append(s.takeOutput())
        if s.isFinished, let seqs = live[s.requestId], seqs.allSatisfy(\.isFinished) { live[s.requestId] = nil }
    }

    /// Whether a running sequence goes on past the token being chosen, as far as its length
    /// tells: one more token within its limit and the context.
    private func continues(_ s: Sequence) -> Bool {
        s.status == .running && s.generatedCount + 2 <= s.request.maxTokens && s.tokens.count + 2 <= contextLength
    }

    /// Ends a request of 0 tokens whose prompt was read: each sample gets the prompt's log
    /// probabilities (the other samples never ran; they would read the same prompt).
    private func finishUnsampled(_ s: Sequence, _ outputs: inout [EngineOutput]) {
        let forks = s.forks
        scheduler.remove(s)
        s.forks.removeAll()
        for f in [s] + forks {
            f.promptLogprobs = s.promptLogprobs
            f.finish(.length)
            outputs.append(f.takeOutput())
        }
        live[s.requestId] = nil
    }

    /// Updates the stats callers read. Caller holds the step lock.
    private func publish() {
        lock.lock()
        snapshot.running = scheduler.running.count
        snapshot.waiting = scheduler.waiting.count + scheduler.running.reduce(0) { $0 + $1.forks.count }
        snapshot.kvBlocksUsed = blocks.usedCount
        snapshot.kvBlocksCached = blocks.cachedCount
        snapshot.kvBlocksPeak = max(snapshot.kvBlocksPeak, blocks.usedCount)
        snapshot.prefixCacheQueries = scheduler.prefixQueries
        snapshot.prefixCacheHits = scheduler.prefixHits
        snapshot.preemptions = scheduler.preemptions
        snapshot.steps = forwardPasses
        lock.unlock()
    }

    private func deliver(_ outputs: [EngineOutput]) {
        guard !outputs.isEmpty else { return }
        lock.lock()
        var calls: [((EngineOutput) -> Void, EngineOutput)] = []
        for o in outputs {
            guard let sink = sinks[o.requestId] else { continue }
            calls.append((sink.output, o))
        }
        lock.unlock()
        for (f, o) in calls { f(o) }
    }

    /// Drops the stream sink of a request all of whose sequences ended.
    private func closeSink(_ id: Int) {
        lock.lock()
        sinks[id] = nil
        lock.unlock()
    }

    // MARK: Background loop and streams

    /// Starts the background thread that steps while there is work (idempotent).
    public func start() {
        lock.lock()
        defer { lock.unlock() }
        guard !loopRunning, !stopping else { return }
        loopRunning = true
        // The thread takes the engine anew for each round, so it never keeps it alive by itself.
        let t = Thread { [weak self] in
            while let engine = self, engine.loopRound() {}
        }
        t.name = "peregrine-engine"
        t.start()
    }

    /// One round of the background thread: waits a while for work, then steps. False once the
    /// engine is shutting down.
    private func loopRound() -> Bool {
        lock.lock()
        var idle: Bool { inbox.isEmpty && cancellations.isEmpty && snapshot.running + snapshot.waiting == 0 }
        if !stopping && idle { _ = lock.wait(until: Date(timeIntervalSinceNow: 0.25)) }
        if stopping {
            loopRunning = false
            lock.broadcast()
            lock.unlock()
            return false
        }
        let work = !idle
        lock.unlock()
        if work { do { try step() } catch { /* the failed requests were told; keep serving */ } }
        return true
    }

    /// Queues a request and returns its outputs as they are produced; ending the iteration early
    /// (a client that goes away) cancels the request.
    public func stream(_ request: EngineRequest) throws -> (id: Int, outputs: AsyncThrowingStream<EngineOutput, Error>) {
        let (stream, continuation) = AsyncThrowingStream<EngineOutput, Error>.makeStream()
        var remaining = request.n
        let box = IdBox()
        let id = try add(request, sink: { [weak self] o in
            continuation.yield(o)
            if o.finishReason != nil {
                remaining -= 1
                if remaining == 0 {
                    self?.closeSink(o.requestId)
                    continuation.finish()
                }
            }
        }, failure: { continuation.finish(throwing: $0) })
        box.id = id
        continuation.onTermination = { [weak self] reason in
            // Not here and now: the stream may call this while it is yielding this request's output.
            guard case .cancelled = reason, let engine = self else { return }
            DispatchQueue.global().async { engine.cancel(box.id) }
        }
        start()
        return (id, stream)
    }

    private final class IdBox: @unchecked Sendable { var id = 0 }

    /// Runs a batch of requests to the end and returns every sample's result, in request order
    /// then sample order. Steps the engine itself unless the background thread runs.
    public func generate(prompts: [EngineRequest]) throws -> [EngineResult] {
        struct Track {
            var result: EngineResult
            var added: Double
            var last = 0.0
        }
        let collect = NSLock()
        var tracks: [Int: [Track]] = [:]
        var open = 0
        var failure: Error?
        let done = DispatchSemaphore(value: 0)
        var ids: [Int] = []
        defer { for id in ids { closeSink(id) } }
        for r in prompts {
            // The sink may run before `add` returns (on the background thread), so the request's
            // slot is made under the same lock first and filled in with the id after.
            collect.lock()
            let added = Result { try add(r, sink: { o in
                let now = Benchmark.now()
                collect.lock()
                defer { collect.unlock() }
                guard var t = tracks[o.requestId]?[o.index] else { return }
                if !o.tokens.isEmpty {
                    if t.result.tokens.isEmpty { t.result.firstTokenSeconds = now - t.added } else { t.result.interTokenSeconds.append(now - t.last) }
                    t.last = now
                }
                t.result.tokens += o.tokens
                t.result.text += o.text
                t.result.logprobs += o.logprobs
                if let p = o.promptLogprobs { t.result.promptLogprobs = p }
                t.result.promptTokenCount = o.promptTokenCount
                t.result.cachedPromptTokens = o.cachedPromptTokens
                if let f = o.finishReason {
                    t.result.finishReason = f
                    t.result.totalSeconds = now - t.added
                }
                tracks[o.requestId]?[o.index] = t
                if o.finishReason != nil {
                    open -= 1
                    if open == 0 { done.signal() }
                }
            }, failure: { error in
                collect.lock()
                failure = failure ?? error
                collect.unlock()
                done.signal()
            }) }
            guard case .success(let id) = added else {
                collect.unlock()
                for id in ids { cancel(id) }
                _ = try added.get()
                return []
            }
            let now = Benchmark.now()
            tracks[id] = (0..<r.n).map { Track(result: EngineResult(requestId: id, index: $0), added: now) }
            open += r.n
            collect.unlock()
            ids.append(id)
        }
        lock.lock()
        let background = loopRunning
        lock.unlock()
        if background {
            if !ids.isEmpty { done.wait() }
        } else {
            while true {
                collect.lock()
                let finished = open == 0 || failure != nil
                collect.unlock()
                if finished { break }
                try step()
            }
        }
        collect.lock()
        defer { collect.unlock() }
        if let failure { throw failure }
        return ids.flatMap { tracks[$0]?.map(\.result) ?? [] }
    }

    /// Stops the background thread after cancelling every request.
    public func shutdown() {
        lock.lock()
        let ids = Array(Set(sinks.keys))
        lock.unlock()
        for id in ids { cancel(id) }
        lock.lock()
        stopping = true
        lock.broadcast()
        while loopRunning { lock.wait() }
        lock.unlock()
    }
}
