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
        guard promptTokens.count + options.maxTokens <= context else {
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

    /// Reads `tokens` into the cache in chunks; returns the logits of the last one.
    @discardableResult
    private func prefill(_ tokens: ArraySlice<Int>, cache: ContiguousKVCache, chunk: Int) throws -> LogitRows? {
        var plan = BatchPlan()
        var done = tokens.startIndex
        var rows: LogitRows?
        while done < tokens.endIndex {
            let end = min(tokens.endIndex, done + chunk)
            plan.removeAll()
            plan.append(tokens: tokens[done..<end], slot: 0, position: done, logits: end == tokens.endIndex ? .last : .none)
            rows = try model.forward(plan, kv: cache.memory)
            try cache.advance(0, by: end - done)
            done = end
        }
        return rows
    }

    /// One token per forward pass.
    private func decode(_ prompt: [Int], _ options: GenerationOptions, _ emitter: inout Emitter, _ result: inout GenerationResult) throws {
        let cache = try ContiguousKVCache(model: model, slots: 1, capacity: prompt.count + options.maxTokens)
        var sampler = Sampler(options.sampling)
        var plan = BatchPlan()
        var context32 = prompt.map { Int32($0) }
        context32.reserveCapacity(prompt.count + options.maxTokens)
        let t0 = Benchmark.now()
        guard var logits = try prefill(prompt[...], cache: cache, chunk: options.prefillChunk) else {
            throw PeregrineError.invalidArgument("empty prompt")
        }
        let t1 = Benchmark.now()
        result.prefillSeconds = t1 - t0
        while true {
            // Sampling reads back only what it needs of the logits (on a GPU, an id or the top-k).
            let next = try context32.withUnsafeBufferPointer { try sampler.sample(logits, row: 0, context: $0) }
            if !emitter.emit(next) { break }
            context32.append(Int32(next))
            plan.removeAll()
            plan.append(tokens: CollectionOfOne(next), slot: 0, position: cache.length(of: 0), logits: .last)
            logits = try model.forward(plan, kv: cache.memory)
            try cache.advance(0, by: 1)
        }
        emitter.finish()
        result.decodeSeconds = Benchmark.now() - t1
    }

    /// Draft K tokens, verify them in one forward pass of K + 1 rows, keep the accepted prefix
    /// and the token the pass yields after it, roll both caches back past it.
    private func decodeSpeculatively(_ prompt: [Int], _ options: GenerationOptions, _ spec: SpeculativeOptions,
                                     _ emitter: inout Emitter, _ result: inout GenerationResult) throws {
        let k = max(1, spec.draftTokens)
        let vocab = model.config.vocabSize
        let cache = try ContiguousKVCache(model: model, slots: 1, capacity: prompt.count + options.maxTokens + k + 1)
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

/// Turns accepted tokens into streamed text and decides when to stop: EOS, a stop string, the
/// token budget, or the caller.
struct Emitter {
    let tokenizer: Tokenizer
    var stops: StopStringMatcher
    let eos: Set<Int>
    let maxTokens: Int
    let onText: (String) -> Bool
    var stream: StreamingDecoder
    var tokens: [Int] = []
    var text = ""
    var stopReason: StopReason?

    init(tokenizer: Tokenizer, stops: [String], eos: Set<Int>, maxTokens: Int, onText: @escaping (String) -> Bool) {
        self.tokenizer = tokenizer
        self.stops = StopStringMatcher(stops)
        self.eos = eos
        self.maxTokens = maxTokens
        self.onText = onText
        stream = tokenizer.makeStreamingDecoder()
        tokens.reserveCapacity(min(maxTokens, 4096))
    }

    /// Takes the next token; false once generation must stop.
    mutating func emit(_ token: Int) -> Bool {
        if eos.contains(token) { stopReason = .endOfSequence; return false }
        tokens.append(token)
        let (out, hit) = stops.feed(stream.append(token))
        if !out.isEmpty {
            text += out
            if !onText(out) { stopReason = .cancelled; return false }
        }
        if hit { stopReason = .stopString; return false }
        if tokens.count >= maxTokens { stopReason = .maxTokens; return false }
        return true
    }

    /// Flushes held-back text unless a stop string or the caller ended generation.
    mutating func finish() {
        guard stopReason != .stopString && stopReason != .cancelled else { return }
        let (out, _) = stops.feed(stream.flush(), final: true)
        if !out.isEmpty {
            text += out
            _ = onText(out)
        }
    }
}

/// Finds stop strings in streamed text. Text that might be the start of a stop string is held
/// back until it is known not to be.
struct StopStringMatcher {
    let stops: [String]
    private var pending = ""

    init(_ stops: [String]) { self.stops = stops.filter { !$0.isEmpty } }

    /// Returns the text safe to emit and whether a stop string was hit (text before it is emitted).
    mutating func feed(_ piece: String, final: Bool = false) -> (String, Bool) {
        guard !stops.isEmpty else { return (piece, false) }
        pending += piece
        var first: Range<String.Index>?
        for s in stops {
            if let r = pending.range(of: s), first == nil || r.lowerBound < first!.lowerBound { first = r }
        }
        if let r = first {
            let out = String(pending[..<r.lowerBound])
            pending = ""
            return (out, true)
        }
        if final {
            defer { pending = "" }
            return (pending, false)
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        var hold = 0
        for s in stops {
            var n = min(s.count, pending.count)
            while n > 0 {
                if s.hasPrefix(pending.suffix(n)) { hold = max(hold, n); break }
                n -= 1
            }
        }
        let cut = pending.index(pending.endIndex, offsetBy: -hold)
        let out = String(pending[..<cut])
        pending = String(pending[cut...])
        return (out, false)
    }
}
