#if canImport(Glibc)
import Glibc
#endif

/// How the next token is chosen. Temperature 0 is greedy decoding.
public struct SamplingParameters: Sendable, Equatable {
    public var temperature: Float = 0.8
    public var topK: Int = 40
    public var topP: Float = 0.95
    public var minP: Float = 0.05
    public var repetitionPenalty: Float = 1.0
    /// How many recent tokens the repetition penalty looks at (0: the whole context).
    public var repetitionWindow: Int = 64
    public var seed: UInt64 = 0

    public init() {}

    public static var greedy: SamplingParameters {
        var p = SamplingParameters()
        p.temperature = 0
        return p
    }

    /// Checks every value and names the first bad one.
    public func validate() throws {
        guard temperature.isFinite, temperature >= 0 else { throw PeregrineError.invalidArgument("temperature must be >= 0 (got \(temperature))") }
        guard topK >= 0 else { throw PeregrineError.invalidArgument("top-k must be >= 0 (got \(topK))") }
        guard topP.isFinite, topP > 0, topP <= 1 else { throw PeregrineError.invalidArgument("top-p must be in (0, 1] (got \(topP))") }
        guard minP.isFinite, minP >= 0, minP < 1 else { throw PeregrineError.invalidArgument("min-p must be in [0, 1) (got \(minP))") }
        guard repetitionPenalty.isFinite, repetitionPenalty > 0 else {
            throw PeregrineError.invalidArgument("repetition penalty must be > 0 (got \(repetitionPenalty))")
        }
        guard repetitionWindow >= 0 else { throw PeregrineError.invalidArgument("repetition window must be >= 0") }
    }
}

/// xoshiro256** seeded by splitmix64: fast, and the same seed gives the same stream everywhere.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var x = seed
        func next() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s = (next(), next(), next(), next())
    }

    public mutating func next() -> UInt64 {
        let result = rotl(s.1 &* 5, 7) &* 9
        let t = s.1 << 17
        s.2 ^= s.0; s.3 ^= s.1; s.1 ^= s.2; s.0 ^= s.3
        s.2 ^= t
        s.3 = rotl(s.3, 45)
        return result
    }

    private func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }

    /// A uniform float in [0, 1).
    public mutating func nextUnit() -> Float { Float(next() >> 40) * (1.0 / Float(1 << 24)) }
}

/// A next-token distribution over a few token ids (probabilities sum to 1).
public struct TokenDistribution: Sendable, Equatable {
    public var ids: [Int32]
    public var probabilities: [Float]

    public init(ids: [Int32], probabilities: [Float]) {
        self.ids = ids
        self.probabilities = probabilities
    }

    public static func pointMass(_ id: Int) -> TokenDistribution { TokenDistribution(ids: [Int32(id)], probabilities: [1]) }

    public func probability(of id: Int) -> Float {
        guard let i = ids.firstIndex(of: Int32(id)) else { return 0 }
        return probabilities[i]
    }

    /// The most likely token.
    public var mode: Int { Int(ids[probabilities.indices.max { probabilities[$0] < probabilities[$1] } ?? 0]) }
}

/// Changes logits before a token is chosen. Processors compose in order.
public protocol LogitProcessor {
    mutating func process(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>)
}

/// Divides positive logits (multiplies negative ones) of tokens already in the context by the
/// penalty, as the transformers library does.
public struct RepetitionPenalty: LogitProcessor {
    public let penalty: Float
    public let window: Int
    private var seen: Set<Int32> = []

    public init(penalty: Float, window: Int) {
        self.penalty = penalty
        self.window = window
    }

    public mutating func process(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>) {
        guard penalty != 1 else { return }
        seen.removeAll(keepingCapacity: true)
        let start = window > 0 ? max(0, context.count - window) : 0
        for i in start..<context.count {
            let t = context[i]
            guard t >= 0, Int(t) < logits.count, seen.insert(t).inserted else { continue }
            let l = logits[Int(t)]
            logits[Int(t)] = l > 0 ? l / penalty : l * penalty
        }
    }
}

/// Chooses tokens from logits: the logit processors, then greedy or temperature with top-k,
/// top-p and min-p filtering. Buffers are kept between calls, so sampling allocates nothing.
public struct Sampler {
    public let parameters: SamplingParameters
    public var processors: [any LogitProcessor]
    private var rng: SeededGenerator
    private var candidates: [Int32] = []
    private var probs: [Float] = []

    public init(_ parameters: SamplingParameters) {
        self.parameters = parameters
        rng = SeededGenerator(seed: parameters.seed)
        processors = []
        if parameters.repetitionPenalty != 1 {
            processors.append(RepetitionPenalty(penalty: parameters.repetitionPenalty, window: parameters.repetitionWindow))
        }
    }

    public static func argmax(_ logits: UnsafeBufferPointer<Float>) -> Int {
        var best = 0
        var bestValue = -Float.infinity
        for i in 0..<logits.count where logits[i] > bestValue {
            bestValue = logits[i]
            best = i
        }
        return best
    }

    /// The model's own probability (softmax at temperature 1, no filtering) of one token.
    public static func softmaxProbability(of id: Int, in logits: UnsafeBufferPointer<Float>) -> Float {
        var m = -Float.infinity
        for l in logits { m = max(m, l) }
        var sum: Float = 0
        for l in logits { sum += expf(l - m) }
        return expf(logits[id] - m) / sum
    }

    /// Picks the next token. `logits` may be modified. Draws as
    /// `draw(distribution(...))` does (up to rounding) without building a distribution, so nothing
    /// is allocated per token.
    public mutating func sample(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>) -> Int {
        for i in processors.indices { processors[i].process(logits, context: context) }
        if parameters.temperature == 0 { return Sampler.argmax(UnsafeBufferPointer(logits)) }
        let keep = filter(logits)
        var total: Float = 0
        for i in 0..<keep { total += probs[i] }
        let r = rng.nextUnit() * total
        var acc: Float = 0
        for i in 0..<keep {
            acc += probs[i]
            if r < acc { return Int(candidates[i]) }
        }
        return Int(candidates[keep - 1])
    }

    /// The distribution `sample` draws from: processors, temperature, min-p, top-k, top-p; a
    /// point mass on the best token at temperature 0. Speculative decoding compares these.
    public mutating func distribution(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>) -> TokenDistribution {
        for i in processors.indices { processors[i].process(logits, context: context) }
        if parameters.temperature == 0 {
            return TokenDistribution(ids: [Int32(Sampler.argmax(UnsafeBufferPointer(logits)))], probabilities: [1])
        }
        let keep = filter(logits)
        var total: Float = 0
        for i in 0..<keep { total += probs[i] }
        return TokenDistribution(ids: Array(candidates[0..<keep]), probabilities: probs[0..<keep].map { $0 / total })
    }

    /// Draws from a distribution with this sampler's random stream.
    public mutating func draw(_ d: TokenDistribution) -> Int {
        let r = rng.nextUnit()
        var acc: Float = 0
        for (i, p) in d.probabilities.enumerated() {
            acc += p
            if r < acc { return Int(d.ids[i]) }
        }
        return Int(d.ids.last ?? 0)
    }

    /// A uniform number in [0, 1) from this sampler's stream (for acceptance tests).
    public mutating func uniform() -> Float { rng.nextUnit() }

    /// Fills `candidates` (sorted by logit, descending) and their unnormalised probabilities in
    /// `probs`; returns how many survive top-p.
    private mutating func filter(_ logits: UnsafeMutableBufferPointer<Float>) -> Int {
        let p = parameters
        let n = logits.count
        let invT = 1 / p.temperature
        var maxLogit = -Float.infinity
        for i in 0..<n { maxLogit = max(maxLogit, logits[i]) }
        candidates.removeAll(keepingCapacity: true)
        probs.removeAll(keepingCapacity: true)
        if !maxLogit.isFinite {
            candidates.append(Int32(Sampler.argmax(UnsafeBufferPointer(logits))))
            probs.append(1)
            return 1
        }
        // Candidates: everything above min-p of the best (min-p in probability space), which
        // is cheap to find and usually leaves few tokens to sort.
        let minLogit = p.minP > 0 ? maxLogit + p.temperature * logf(p.minP) : -Float.infinity
        for i in 0..<n where logits[i] >= minLogit && logits[i] > -Float.infinity { candidates.append(Int32(i)) }
        if p.topK > 0 && candidates.count > p.topK { selectLargest(p.topK, logits: logits) }
        candidates.sort { logits[Int($0)] > logits[Int($1)] }
        var sum: Float = 0
        for c in candidates {
            let e = expf((logits[Int(c)] - maxLogit) * invT)
            probs.append(e)
            sum += e
        }
        var keep = candidates.count
        if p.topP < 1 {
            var cum: Float = 0
            for i in 0..<candidates.count {
                cum += probs[i] / sum
                if cum >= p.topP { keep = i + 1; break }
            }
        }
        return keep
    }

    /// Reorders `candidates` so its first k hold the k largest logits, and drops the rest.
    private mutating func selectLargest(_ k: Int, logits: UnsafeMutableBufferPointer<Float>) {
        var lo = 0, hi = candidates.count - 1
        while lo < hi {
            let pivot = logits[Int(candidates[(lo + hi) / 2])]
            var i = lo, j = hi
            while i <= j {
                while logits[Int(candidates[i])] > pivot { i += 1 }
                while logits[Int(candidates[j])] < pivot { j -= 1 }
                if i <= j { candidates.swapAt(i, j); i += 1; j -= 1 }
            }
            if k - 1 <= j { hi = j } else if k - 1 >= i { lo = i } else { break }
        }
        candidates.removeLast(candidates.count - k)
    }
}
