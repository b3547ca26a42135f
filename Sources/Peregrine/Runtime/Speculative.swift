/// Proposes tokens to follow the sequence so far, for the target model to verify in one pass.
public protocol Drafter: AnyObject {
    var name: String { get }
    /// Up to `maxTokens` proposed continuations of `context` (the whole sequence: prompt and
    /// accepted tokens). With `sampling` (temperature > 0) a model drafter samples with those
    /// parameters and returns the distribution each token came from; with nil it drafts greedily.
    /// Deterministic drafters return no distributions (a point mass on each token).
    func propose(context: [Int], maxTokens: Int, sampling: SamplingParameters?) throws -> Draft
    /// Only the first `length` tokens of the sequence were kept.
    func rollBack(to length: Int) throws
}

public struct Draft {
    public var tokens: [Int] = []
    public var distributions: [TokenDistribution]?

    public init(tokens: [Int] = [], distributions: [TokenDistribution]? = nil) {
        self.tokens = tokens
        self.distributions = distributions
    }
}

/// Drafts with a smaller model of the same vocabulary (or the target itself with layers
/// skipped), keeping its own KV cache in step with the accepted sequence.
public final class ModelDrafter: Drafter {
    public let name: String
    let model: LanguageModel
    private var cache: PagedKVCache
    /// Stop drafting when the drafter's own probability of its token falls below this.
    public var confidenceThreshold: Float
    /// A drafted row's logits on the host: read back only to sample (greedy drafting picks the
    /// token where the logits are, so a GPU copies back one id, not the vocabulary's floats).
    private var logits: [Float] = []
    private var plan = BatchPlan()
    private var greedy = Sampler(.greedy)
    private var sampler: Sampler?
    /// The drafter's own cache type: the one asked for, else its backend's.
    let cacheType: KVCacheType

    public init(model: LanguageModel, name: String, capacity: Int = 1024, confidenceThreshold: Float = 0,
                cacheType: KVCacheType? = nil) throws {
        self.model = model
        self.name = name
        self.confidenceThreshold = confidenceThreshold
        self.cacheType = cacheType ?? model.preferredKVCacheType
        cache = try PagedKVCache(model: model, slots: 1, capacity: capacity, type: self.cacheType)
    }

    public func propose(context: [Int], maxTokens: Int, sampling: SamplingParameters?) throws -> Draft {
        if let sampling, sampler?.parameters != sampling {
            var p = sampling
            p.seed = sampling.seed &+ 0x5EED  // its own stream, independent of the verifier's
            sampler = Sampler(p)
        }
        if sampling == nil { sampler = nil }
        var draft = Draft(tokens: [], distributions: sampler == nil ? nil : [])
        guard maxTokens > 0 else { return draft }
        if context.count + maxTokens > cache.capacity {
            // A longer sequence than planned: a larger cache, filled again from the start.
            cache = try PagedKVCache(model: model, slots: 1, capacity: max(2 * cache.capacity, context.count + maxTokens), type: cacheType)
        }
        // Catch up on the tokens accepted since the last proposal.
        var pending = Array(context[cache.length(of: 0)...])
        var ctx32 = context.map { Int32($0) }
        for i in 0..<maxTokens {
            plan.removeAll()
            plan.append(tokens: pending, slot: 0, position: cache.length(of: 0), logits: .last)
            try cache.prepare(&plan)
            let rows = try model.forward(plan, kv: cache.memory)
            try cache.advance(0, by: pending.count)
            let next: Int
            let p: Float
            if sampler != nil {
                if logits.count != rows.vocabulary { logits = [Float](repeating: 0, count: rows.vocabulary) }
                try logits.withUnsafeMutableBufferPointer { try rows.read(row: 0, into: $0) }
                let d = logits.withUnsafeMutableBufferPointer { l in ctx32.withUnsafeBufferPointer { sampler!.distribution(l, context: $0) } }
                next = sampler!.draw(d)
                p = d.probability(of: next)
                draft.distributions?.append(d)
            } else {
                next = try ctx32.withUnsafeBufferPointer { try greedy.sample(rows, row: 0, context: $0) }
                p = confidenceThreshold > 0 ? try Self.probabilityOfBest(rows) : 1
            }
            // A drafted token the drafter itself doubts is unlikely to be accepted: stop here.
            if i > 0 && p < confidenceThreshold { break }
            draft.tokens.append(next)
            ctx32.append(Int32(next))
            pending = [next]
        }
        return draft
    }

    public func rollBack(to length: Int) throws {
        if cache.length(of: 0) > length { try cache.trim(0, to: length) }
    }

    /// The softmax probability (temperature 1, no filtering) of row 0's best token, from its
    /// largest logit m and the row's Σ exp(l - m), both computed where the logits are.
    static func probabilityOfBest(_ rows: LogitRows) throws -> Float {
        var value: Float = 0, id: Int32 = 0
        try withUnsafeMutablePointer(to: &value) { v in
            try withUnsafeMutablePointer(to: &id) {
                try rows.top(row: 0, k: 1, values: UnsafeMutableBufferPointer(start: v, count: 1), ids: UnsafeMutableBufferPointer(start: $0, count: 1))
            }
        }
        guard value.isFinite else { return 0 }
        return 1 / (try rows.expSum(row: 0, shift: value, scale: 1))
    }
}

/// Prompt lookup (LLMA): finds the latest earlier occurrence of the sequence's last n tokens and
/// proposes what followed it. No model; suits output that copies its input.
public final class PromptLookupDrafter: Drafter {
    public let name = "prompt lookup"
    public let maxNgram: Int
    public let minNgram: Int

    public init(maxNgram: Int = 3, minNgram: Int = 1) {
        self.maxNgram = max(1, maxNgram)
        self.minNgram = max(1, min(minNgram, maxNgram))
    }

    public func propose(context: [Int], maxTokens: Int, sampling: SamplingParameters?) throws -> Draft {
        let n = context.count
        for size in stride(from: min(maxNgram, n - 1), through: minNgram, by: -1) where size > 0 {
            let tail = context[(n - size)...]
            var start = n - size - 1
            while start >= 0 {
                if context[start..<(start + size)].elementsEqual(tail) {
                    let from = start + size
                    let to = min(n, from + maxTokens)
                    if to > from { return Draft(tokens: Array(context[from..<to]), distributions: nil) }
                }
                start -= 1
            }
        }
        return Draft()
    }

    public func rollBack(to length: Int) throws {}
}

/// How many tokens to draft: grows by one after a fully accepted draft, shrinks to one past the
/// accepted count after a rejection.
public struct DraftLength: Sendable {
    public let maximum: Int
    public let adaptive: Bool
    public private(set) var current: Int

    public init(maximum: Int, adaptive: Bool) {
        self.maximum = max(1, maximum)
        self.adaptive = adaptive
        current = self.maximum
    }

    public mutating func update(proposed: Int, accepted: Int) {
        guard adaptive, proposed > 0 else { return }
        current = accepted == proposed ? min(maximum, current + 1) : max(1, accepted + 1)
    }
}

/// Counts for reporting acceptance.
public struct SpeculationStats: Sendable {
    public init() {}
    public var verifications = 0
    public var proposed = 0
    public var accepted = 0

    public var acceptanceRate: Double { proposed > 0 ? Double(accepted) / Double(proposed) : 0 }
    /// Tokens gained per target pass: accepted drafts plus the token the pass itself yields.
    public var tokensPerVerification: Double { verifications > 0 ? Double(accepted + verifications) / Double(verifications) : 0 }
}

/// The speculative configuration of a generation.
public struct SpeculativeOptions: @unchecked Sendable {
    public var drafter: Drafter
    public var draftTokens: Int
    public var adaptive: Bool
    /// Testing hook: a verifier that accepts every draft token. Its output follows the drafter's
    /// distribution, not the model's; the statistical test must catch it.
    public var acceptEverythingForTesting = false

    public init(drafter: Drafter, draftTokens: Int = 3, adaptive: Bool = false) {
        self.drafter = drafter
        self.draftTokens = draftTokens
        self.adaptive = adaptive
    }
}

enum SpeculativeVerifier {
    /// Chooses accepted tokens from the target's distributions `p` (one per draft position plus
    /// one) and the drafter's `q`: greedy equality at temperature 0; otherwise the rejection
    /// sampling of Leviathan et al. / Chen et al., which keeps the target's distribution exactly.
    /// Returns the number of draft tokens accepted and the token that follows them.
    static func verify(draft: Draft, p: [TokenDistribution], sampler: inout Sampler, greedy: Bool,
                       acceptEverything: Bool) -> (accepted: Int, next: Int) {
        for (i, x) in draft.tokens.enumerated() {
            if acceptEverything { continue }
            if greedy {
                if x != p[i].mode { return (i, p[i].mode) }
                continue
            }
            let q = draft.distributions?[i] ?? .pointMass(x)
            let px = p[i].probability(of: x), qx = q.probability(of: x)
            if qx > 0, sampler.uniform() < min(1, px / qx) { continue }
            // Rejected: draw from the residual max(0, p - q), renormalised.
            var ids: [Int32] = [], probs: [Float] = []
            var total: Float = 0
            for (j, id) in p[i].ids.enumerated() {
                let r = max(0, p[i].probabilities[j] - q.probability(of: Int(id)))
                if r > 0 { ids.append(id); probs.append(r); total += r }
            }
            if total <= 0 { return (i, sampler.draw(p[i])) }
            return (i, sampler.draw(TokenDistribution(ids: ids, probabilities: probs.map { $0 / total })))
        }
        let last = p[draft.tokens.count]
        return (draft.tokens.count, greedy ? last.mode : sampler.draw(last))
    }
}

extension ModelDrafter {
    /// A draft model from a directory (or GGUF file), loaded on `backend` (the target's, where the
    /// CLI loads it), checked to share the target's vocabulary: the same tokenizer entries (before
    /// the weights are read) and the same number of logits.
    public static func load<B: ComputeBackend>(directory: String, target: LanguageModel, tokenizer: Tokenizer,
                                               backend: B, confidenceThreshold: Float = 0) throws -> ModelDrafter {
        if let id = tokenizer.firstDifference(from: try Tokenizer(directory: directory)) {
            throw PeregrineError.invalidArgument(
                "the draft model's tokenizer differs from the target's (first at token id \(id)); speculative decoding needs the same vocabulary")
        }
        let draft = try ModelRegistry.load(directory: directory, backend: backend)
        guard draft.config.vocabSize == target.config.vocabSize else {
            throw PeregrineError.invalidArgument(
                "the draft model's vocabulary (\(draft.config.vocabSize) logits) differs from the target's (\(target.config.vocabSize))")
        }
        return try ModelDrafter(model: draft, name: "draft model", confidenceThreshold: confidenceThreshold)
    }
}
