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

        let cache = try ContiguousKVCache(model: model, slots: 1, capacity: promptTokens.count + options.maxTokens)
        var sampler = Sampler(options.sampling)
        var plan = BatchPlan()
        plan.tokens.reserveCapacity(options.prefillChunk)
        var logits = [Float](repeating: 0, count: vocab)
        var context32 = promptTokens.map { Int32($0) }
        context32.reserveCapacity(promptTokens.count + options.maxTokens)
        var stream = tokenizer.makeStreamingDecoder()
        var stops = StopStringMatcher(options.stopStrings)
        let clock = ContinuousClock()

        // Prefill.
        let t0 = clock.now
        var done = 0
        while done < promptTokens.count {
            let end = min(promptTokens.count, done + options.prefillChunk)
            plan.removeAll()
            plan.append(tokens: promptTokens[done..<end], slot: 0, position: done, logits: end == promptTokens.count ? .last : .none)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            try cache.advance(0, by: end - done)
            done = end
        }
        let t1 = clock.now
        result.prefillSeconds = seconds(t1 - t0)

        // Decode.
        var stopped: StopReason?
        while stopped == nil {
            let next = logits.withUnsafeMutableBufferPointer { l in
                context32.withUnsafeBufferPointer { sampler.sample(l, context: $0) }
            }
            if eosTokenIds.contains(next) { stopped = .endOfSequence; break }
            result.tokens.append(next)
            context32.append(Int32(next))
            let piece = stream.append(next)
            let (emit, hit) = stops.feed(piece)
            if !emit.isEmpty {
                result.text += emit
                if !onText(emit) { stopped = .cancelled; break }
            }
            if hit { stopped = .stopString; break }
            if result.tokens.count >= options.maxTokens { stopped = .maxTokens; break }
            plan.removeAll()
            plan.append(tokens: CollectionOfOne(next), slot: 0, position: cache.length(of: 0), logits: .last)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            try cache.advance(0, by: 1)
        }
        if stopped != .stopString && stopped != .cancelled {
            let (emit, _) = stops.feed(stream.flush(), final: true)
            if !emit.isEmpty {
                result.text += emit
                _ = onText(emit)
            }
        }
        result.stopReason = stopped ?? .maxTokens
        result.decodeSeconds = seconds(clock.now - t1)
        return result
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

func seconds(_ d: Duration) -> Double {
    let (s, a) = d.components
    return Double(s) + Double(a) * 1e-18
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

import Foundation
