import Foundation

/// What to generate and when to stop.
public struct GenerationOptions: Sendable {
    public var maxTokens = 128
    public var stopStrings: [String] = []
    public var sampling = SamplingParameters()
    /// Add the tokenizer's special tokens (BOS) around the prompt.
    public var addSpecialTokens = true
    /// Longest prompt plus generation allowed (default: the model's max_position_embeddings).
    public var contextLength: Int?
    /// Tokens per forward pass while reading the prompt.
    public var prefillChunk = 512
    /// Draft and verify (speculative decoding); nil decodes one token per pass.
    public var speculative: SpeculativeOptions?
    /// How the KV cache stores keys and values (the target model's, with speculation); nil: the
    /// model's backend's preference (F16 on CUDA, F32 on the CPU).
    public var kvCacheType: KVCacheType?

    public init() {}
}

public enum StopReason: String, Sendable {
    case endOfSequence = "eos"
    case stopString = "stop string"
    case maxTokens = "max tokens"
    case cancelled
}

public struct GenerationResult: Sendable {
    public var text = ""
    public var promptTokens: [Int] = []
    public var tokens: [Int] = []
    public var stopReason = StopReason.maxTokens
    public var prefillSeconds = 0.0
    public var decodeSeconds = 0.0
    public var speculation: SpeculationStats?

    public var prefillTokensPerSecond: Double { prefillSeconds > 0 ? Double(promptTokens.count) / prefillSeconds : 0 }
    /// Generation speed: the first token comes from the prefill pass, so it is not counted.
    public var decodeTokensPerSecond: Double { decodeSeconds > 0 ? Double(max(tokens.count - 1, 0)) / decodeSeconds : 0 }
}

/// Generates text from one prompt: prefill in chunks, then one token per forward pass, streaming
/// complete UTF-8 text and stopping on EOS, a stop string or the token budget.
public final class Generator {
    public let model: LanguageModel
    public let tokenizer: Tokenizer
    public let eosTokenIds: Set<Int>

    public init(model: LanguageModel, tokenizer: Tokenizer) {
        self.model = model
        self.tokenizer = tokenizer
        eosTokenIds = Set(tokenizer.eosTokenIds + model.config.eosTokenIds)
    }

    /// Generates from text; `onText` receives each new piece and returns false to stop.
    @discardableResult
    public func generate(prompt: String, options: GenerationOptions, onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        guard !prompt.isEmpty else { throw PeregrineError.invalidArgument("the prompt is empty") }
        let ids = tokenizer.encode(prompt, addSpecialTokens: options.addSpecialTokens)
        return try generate(promptTokens: ids, options: options, onText: onText)
    }

    @discardableResult
    public func generate(promptTokens: [Int], options: GenerationOptions, onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        try options.sampling.validate()
        let vocab = model.config.vocabSize
        guard !promptTokens.isEmpty else { throw PeregrineError.invalidArgument("the prompt is empty (no tokens to start from)") }
        guard options.maxTokens >= 0 else { throw PeregrineError.invalidArgument("max tokens must be >= 0") }
        guard options.prefillChunk > 0 else { throw PeregrineError.invalidArgument("prefill chunk must be > 0") }
        if let bad = promptTokens.first(where: { $0 < 0 || $0 >= vocab }) {
            throw PeregrineError.invalidArgument("prompt token \(bad) is outside the model's vocabulary of \(vocab)")
        }
        let context = options.contextLength ?? model.config.maxPositions
        guard context > 0 else { throw PeregrineError.invalidArgument("context length must be > 0") }
        guard promptTokens.count < context else {
            throw PeregrineError.invalidArgument("the prompt is \(promptTokens.count) tokens, but the context length is \(context)")
        }
        guard options.maxTokens <= context - promptTokens.count else {
            throw PeregrineError.invalidArgument(
                "the prompt (\(promptTokens.count) tokens) plus max tokens (\(options.maxTokens)) exceeds the context length (\(context))")
        }
        var result = GenerationResult()
        result.promptTokens = promptTokens
        if options.maxTokens == 0 { return result }
        return try withoutActuallyEscaping(onText) { onText in
            var emitter = Emitter(tokenizer: tokenizer, stops: options.stopStrings, eos: eosTokenIds,
                                  maxTokens: options.maxTokens, onText: onText)
            if let spec = options.speculative {
                try decodeSpeculatively(promptTokens, options, spec, &emitter, &result)
            } else {
                try decode(promptTokens, options, &emitter, &result)
            }
            result.text = emitter.text
            result.tokens = emitter.tokens
            result.stopReason = emitter.stopReason ?? .maxTokens
            return result
        }
    }

    /// Reads `tokens` into slot 0 of the cache in chunks; returns the logits of the last one.
    @discardableResult
    private func prefill(_ tokens: ArraySlice<Int>, cache: PagedKVCache, chunk: Int) throws -> LogitRows? {
        var plan = BatchPlan()
        var done = tokens.startIndex
        var rows: LogitRows?
        while done < tokens.endIndex {
            let end = min(tokens.endIndex, done + chunk)
            plan.removeAll()
            plan.append(tokens: tokens[done..<end], slot: 0, position: done, logits: end == tokens.endIndex ? .last : .none)
            try cache.prepare(&plan)
            rows = try model.forward(plan, kv: cache.memory)
            try cache.advance(0, by: end - done)
            done = end
        }
        return rows
    }

    /// A batch of one on the serving engine: a pool of blocks just large enough for this
    /// sequence, prompt chunks of `prefillChunk` tokens, then one token per step.
    private func decode(_ prompt: [Int], _ options: GenerationOptions, _ emitter: inout Emitter, _ result: inout GenerationResult) throws {
        var config = EngineConfig()
        let longest = prompt.count + options.maxTokens
        config.kvBlocks = (longest + config.blockSize - 1) / config.blockSize + 1
        config.contextLength = longest + 1
        config.maxBatchTokens = options.prefillChunk
        config.maxSequences = 1
        config.prefixCaching = false
        config.kvCacheType = options.kvCacheType
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        var request = EngineRequest(promptTokens: prompt, maxTokens: options.maxTokens, sampling: options.sampling)
        request.stopStrings = options.stopStrings
        let id = try engine.add(request)
        let t0 = Benchmark.now()
        var t1: Double?
        var cancelled = false
        stepping: while true {
            for o in try engine.step() {
                if !o.tokens.isEmpty && t1 == nil { t1 = Benchmark.now() }
                emitter.tokens += o.tokens
                if !o.text.isEmpty {
                    emitter.text += o.text
                    if !cancelled && !emitter.onText(o.text) {
                        cancelled = true
                        engine.cancel(id)
                        emitter.stopReason = .cancelled
                    }
                }
                if let reason = o.stopReason {
                    if !cancelled { emitter.stopReason = reason }
                    if t1 == nil { t1 = Benchmark.now() }
                    break stepping
                }
            }
        }
        result.prefillSeconds = (t1 ?? t0) - t0
        result.decodeSeconds = Benchmark.now() - (t1 ?? t0)
    }

    /// Draft K tokens, verify them in one forward pass of K + 1 rows, keep the accepted prefix
    /// and the token the pass yields after it, roll both caches back past it.
    private func decodeSpeculatively(_ prompt: [Int], _ options: GenerationOptions, _ spec: SpeculativeOptions,
                                     _ emitter: inout Emitter, _ result: inout GenerationResult) throws {
        let k = max(1, spec.draftTokens)
        let vocab = model.config.vocabSize
        let cache = try PagedKVCache(model: model, slots: 1, capacity: prompt.count + options.maxTokens + k + 1,
                                     type: options.kvCacheType ?? model.preferredKVCacheType)
        var sampler = Sampler(options.sampling)
        let greedy = options.sampling.temperature == 0
        var length = DraftLength(maximum: k, adaptive: spec.adaptive)
        var stats = SpeculationStats()
        var plan = BatchPlan()
        var logits = [Float](repeating: 0, count: (k + 1) * vocab)
        var context = prompt
        // The cache holds every token but the last, which each verification pass starts with.
        let t0 = Benchmark.now()
        try prefill(prompt.dropLast(), cache: cache, chunk: options.prefillChunk)
        let t1 = Benchmark.now()
        result.prefillSeconds = t1 - t0
        try spec.drafter.rollBack(to: 0)
        decoding: while true {
            let budget = min(length.current, options.maxTokens - emitter.tokens.count - 1)
            let draft = budget > 0
                ? try spec.drafter.propose(context: context, maxTokens: budget, sampling: greedy ? nil : options.sampling)
                : Draft()
            let d = draft.tokens.count
            let start = context.count - 1
            plan.removeAll()
            plan.append(tokens: [context[start]] + draft.tokens, slot: 0, position: start, logits: .all)
            try cache.prepare(&plan)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            try cache.advance(0, by: d + 1)
            var ctx32 = context.map { Int32($0) }
            var p: [TokenDistribution] = []
            for i in 0...d {
                p.append(logits.withUnsafeMutableBufferPointer { l in
                    ctx32.withUnsafeBufferPointer { c in
                        sampler.distribution(UnsafeMutableBufferPointer(rebasing: l[(i * vocab)..<((i + 1) * vocab)]), context: c)
                    }
                })
                if i < d { ctx32.append(Int32(draft.tokens[i])) }
            }
            let (accepted, next) = SpeculativeVerifier.verify(draft: draft, p: p, sampler: &sampler, greedy: greedy,
                                                              acceptEverything: spec.acceptEverythingForTesting)
            stats.verifications += 1
            stats.proposed += d
            stats.accepted += accepted
            length.update(proposed: d, accepted: accepted)
            try cache.trim(0, to: start + 1 + accepted)
            try spec.drafter.rollBack(to: start + 1 + accepted)
            for t in draft.tokens[..<accepted] + [next] {
                if !emitter.emit(t) { break decoding }
                context.append(t)
            }
        }
        emitter.finish()
        result.decodeSeconds = Benchmark.now() - t1
        result.speculation = stats
    }

    /// The library's streaming API: text pieces as they are generated.
    public func stream(prompt: String, options: GenerationOptions) -> AsyncThrowingStream<String, Error> {
        AsyncThrowingStream { continuation in
            let worker = Thread { [self] in
                do {
                    try self.generate(prompt: prompt, options: options) { piece in
                        if case .terminated = continuation.yield(piece) { return false }
                        return true
                    }
                    continuation.finish()
                } catch {
                    continuation.finish(throwing: error)
                }
            }
            worker.start()
        }
    }
}

