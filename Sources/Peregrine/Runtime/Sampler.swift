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

/// One row's draw made where its logits are, beside other rows' (`LogitRows.sample(rows:draws:)`):
/// what `Sampler.sample` uses with top-k, and the number it would take from the row's stream.
public struct SamplingDraw: Sendable, Equatable {
    public var inverseTemperature: Float
    /// temperature x log(min-p): the min-p cut below the best logit (-infinity without min-p).
    public var cutOffset: Float
    /// 1 ... `Sampler.maxDeviceTopK`, at most the vocabulary.
    public var topK: Int
    public var topP: Float
    public var uniform: Float

    public init(inverseTemperature: Float, cutOffset: Float, topK: Int, topP: Float, uniform: Float) {
        self.inverseTemperature = inverseTemperature
        self.cutOffset = cutOffset
        self.topK = topK
        self.topP = topP
        self.uniform = uniform
    }
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
    private var ids: [Int32] = []

    public init(penalty: Float, window: Int) {
        self.penalty = penalty
        self.window = window
    }

    public mutating func process(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>) {
        var ids: [Int32] = []
        swap(&ids, &self.ids)  // the kept buffer, moved out so `tokens` can fill it
        tokens(context, vocabulary: logits.count, into: &ids)
        ids.withUnsafeBufferPointer { RepetitionPenalty.apply(penalty, to: logits, ids: $0) }
        swap(&ids, &self.ids)
    }

    /// The distinct tokens of the window that `process` changes, for a penalty applied elsewhere.
    public mutating func tokens(_ context: UnsafeBufferPointer<Int32>, vocabulary: Int, into ids: inout [Int32]) {
        ids.removeAll(keepingCapacity: true)
        guard penalty != 1 else { return }
        seen.removeAll(keepingCapacity: true)
        let start = window > 0 ? max(0, context.count - window) : 0
        for i in start..<context.count where context[i] >= 0 && Int(context[i]) < vocabulary && seen.insert(context[i]).inserted {
            ids.append(context[i])
        }
    }

    /// The penalty on one row of logits at `ids` (distinct; those outside the row are passed over).
    public static func apply(_ penalty: Float, to logits: UnsafeMutableBufferPointer<Float>, ids: UnsafeBufferPointer<Int32>) {
        for id in ids where id >= 0 && Int(id) < logits.count {
            let l = logits[Int(id)]
            logits[Int(id)] = l > 0 ? l / penalty : l * penalty
        }
    }
}

public enum LogitCandidates {
    /// The k largest of `values` (the first ones on ties) and their indices, kept as a min-heap in
    /// the output buffers: nothing is allocated.
    public static func largest(_ k: Int, of all: UnsafeBufferPointer<Float>, values: UnsafeMutableBufferPointer<Float>,
                               indices: UnsafeMutableBufferPointer<Int32>) {
        let k = min(k, all.count, values.count, indices.count)
        guard k > 0 else { return }
        func siftDown(_ start: Int) {
            var i = start
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < k && less(l, m) { m = l }
                if r < k && less(r, m) { m = r }
                if m == i { return }
                values.swapAt(i, m)
                indices.swapAt(i, m)
                i = m
            }
        }
        // Heap order: smaller value first; on equal values the later index counts as smaller, so
        // it is the one replaced.
        func less(_ a: Int, _ b: Int) -> Bool { values[a] < values[b] || (values[a] == values[b] && indices[a] > indices[b]) }
        for i in 0..<k {
            values[i] = all[i]
            indices[i] = Int32(i)
        }
        for i in stride(from: k / 2 - 1, through: 0, by: -1) { siftDown(i) }
        for i in k..<all.count where all[i] > values[0] {
            values[0] = all[i]
            indices[0] = Int32(i)
            siftDown(0)
        }
    }
}

/// Chooses tokens from logits: the logit processors, then greedy or temperature with top-k,
/// top-p and min-p filtering. Buffers are kept between calls, so sampling allocates nothing.
public struct Sampler {
    public let parameters: SamplingParameters
    public var processors: [any LogitProcessor]
    private var rng: SeededGenerator
    /// The stream before `deviceDraw` took its number, until `settle`.
    private var beforeDraw: SeededGenerator?
    /// Candidate tokens and their logits; after `filter`, sorted by logit, largest first.
    private var pairs: [(id: Int32, logit: Float)] = []
    private var probs: [Float] = []
    // Buffers for logits kept on the device.
    private var topValues: [Float] = []
    private var topIds: [Int32] = []
    private var penalized: [Int32] = []
    private var row: [Float] = []

    /// Logits fetched from the device when min-p alone bounds the candidates, and the most
    /// fetched for top-k; beyond either the whole row is read.
    public static let deviceCandidates = 256
    public static let maxDeviceTopK = 1024

    public init(_ parameters: SamplingParameters) {
        self.parameters = parameters
        rng = SeededGenerator(seed: parameters.seed)
        processors = []
        if parameters.repetitionPenalty != 1 {
            processors.append(RepetitionPenalty(penalty: parameters.repetitionPenalty, window: parameters.repetitionWindow))
        }
    }

    /// Greedy with nothing changing the logits: the best id is the whole answer.
    public var isPlainGreedy: Bool { parameters.temperature == 0 && processors.isEmpty }

    /// The first index of the largest logit (NaNs passed over; 0 where no logit is above
    /// -infinity). The largest value is found eight lanes at a time, then its first index the
    /// same way: a 152k vocabulary's scalar loop of compares and branches took 91 us a token,
    /// this 8.5 (`bench --kernels`, "sample greedy").
    public static func argmax(_ logits: UnsafeBufferPointer<Float>) -> Int {
        guard let base = logits.baseAddress else { return 0 }
        let n = logits.count, top = largest(logits)
        guard top > -.infinity else { return 0 }
        var j = 0
        let t = SIMD8<Float>(repeating: top)
        while j &+ 8 <= n, !any(CPUKernels.load8(base, j) .== t) { j &+= 8 }
        while base[j] != top { j &+= 1 }
        return j
    }

    /// The largest logit, NaNs passed over (-infinity where there is nothing else).
    static func largest(_ logits: UnsafeBufferPointer<Float>) -> Float {
        guard let base = logits.baseAddress else { return -.infinity }
        return CPUKernels.maximum(base, logits.count)
    }

    /// Σ exp((logit - shift) * scale), in index order.
    public static func expSum(_ logits: UnsafeBufferPointer<Float>, shift: Float, scale: Float) -> Float {
        var sum: Float = 0
        for l in logits { sum += expf((l - shift) * scale) }
        return sum
    }

    /// Picks the next token. `logits` may be modified. Draws as
    /// `draw(distribution(...))` does (up to rounding) without building a distribution, so nothing
    /// is allocated per token.
    public mutating func sample(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>) -> Int {
        for i in processors.indices { processors[i].process(logits, context: context) }
        return choose(logits)
    }

    /// Picks the next token from logits kept where the model computed them, reading back only
    /// what the parameters need: the best id (greedy), the top-k logits, or the 256 largest when
    /// min-p or top-p alone bound the candidates (top-p with the row's softmax normalizer, summed
    /// where the logits are). The whole row is read only when those 256 do not hold every
    /// candidate, for top-k over 1024, plain temperature sampling, or a processor other than the
    /// repetition penalty. Chooses as `sample` does on the whole row, with the same random stream.
    public mutating func sample(_ logits: LogitRows, row r: Int, context: UnsafeBufferPointer<Int32>) throws -> Int {
        let vocab = logits.vocabulary
        guard processors.allSatisfy({ $0 is RepetitionPenalty }) else {
            return try withWholeRow(logits, r) { s, b in s.sample(b, context: context) }
        }
        for i in processors.indices {
            guard var penalty = processors[i] as? RepetitionPenalty else { continue }
            penalty.tokens(context, vocabulary: vocab, into: &penalized)
            processors[i] = penalty
            if !penalized.isEmpty { try penalized.withUnsafeBufferPointer { try logits.penalize(row: r, ids: $0, penalty: penalty.penalty) } }
        }
        let p = parameters
        if p.temperature == 0 { return try logits.argmax(row: r) }
        let k = min(vocab, p.topK > 0 ? p.topK : p.minP > 0 || p.topP < 1 ? Sampler.deviceCandidates : 0)
        if k > 0 && k <= Sampler.maxDeviceTopK {
            if topValues.count < k {
                topValues = [Float](repeating: 0, count: k)
                topIds = [Int32](repeating: 0, count: k)
            }
            try topValues.withUnsafeMutableBufferPointer { v in
                try topIds.withUnsafeMutableBufferPointer { try logits.top(row: r, k: k, values: v, ids: $0) }
            }
            var maxLogit = -Float.infinity, smallest = Float.infinity
            for i in 0..<k {
                maxLogit = max(maxLogit, topValues[i])
                smallest = min(smallest, topValues[i])
            }
            let cut = minLogit(maxLogit)
            pairs.removeAll(keepingCapacity: true)
            probs.removeAll(keepingCapacity: true)
            if !maxLogit.isFinite {
                var best = 0
                for i in 0..<k where topValues[i] > topValues[best] || (topValues[i] == topValues[best] && topIds[i] < topIds[best]) { best = i }
                return Int(topIds[best])
            }
            for i in 0..<k where topValues[i] >= cut && topValues[i] > -Float.infinity { pairs.append((topIds[i], topValues[i])) }
            // With min-p alone, every candidate is among these only if one of them falls below the cut.
            if p.topK > 0 || k == vocab || smallest < cut { return draw(keep: finish(maxLogit)!) }
            // Top-p alone: exact if the nucleus ends among these, measured against every token.
            if p.minP == 0, p.topP < 1 {
                let total = try logits.expSum(row: r, shift: maxLogit, scale: 1 / p.temperature)
                if let keep = finish(maxLogit, total: total) { return draw(keep: keep) }
            }
        }
        return try withWholeRow(logits, r) { s, b in s.choose(b) }
    }

    /// A draw for the backend to make with other rows' in one pass (`LogitRows.sample(rows:draws:)`),
    /// where `sample(_:row:context:)` would take the top-k path: temperature above 0, top-k of 1
    /// to 1024, no processor but the repetition penalty (applied here, where the logits are).
    /// Takes the number `sample` would take from the stream; pass the backend's `drew` to
    /// `settle`. nil where the parameters need `sample`.
    public mutating func deviceDraw(_ logits: LogitRows, row r: Int, context: UnsafeBufferPointer<Int32>) throws -> SamplingDraw? {
        let p = parameters, vocab = logits.vocabulary
        guard logits.samplesRows, p.temperature > 0, p.topK > 0, min(p.topK, vocab) <= Sampler.maxDeviceTopK,
              processors.allSatisfy({ $0 is RepetitionPenalty }) else { return nil }
        for i in processors.indices {
            guard var penalty = processors[i] as? RepetitionPenalty else { continue }
            penalty.tokens(context, vocabulary: vocab, into: &penalized)
            processors[i] = penalty
            if !penalized.isEmpty { try penalized.withUnsafeBufferPointer { try logits.penalize(row: r, ids: $0, penalty: penalty.penalty) } }
        }
        beforeDraw = rng
        return SamplingDraw(inverseTemperature: 1 / p.temperature, cutOffset: p.minP > 0 ? p.temperature * logf(p.minP) : -Float.infinity,
                            topK: min(p.topK, vocab), topP: p.topP, uniform: rng.nextUnit())
    }

    /// After a `deviceDraw`: gives its number back to the stream when the backend chose without
    /// it (a row whose best logit was not finite, where `sample` takes the best token undrawn).
    public mutating func settle(drew: Bool) {
        if !drew, let b = beforeDraw { rng = b }
        beforeDraw = nil
    }

    /// Reads the whole row into the kept buffer (moved out, not copied, so self can change while
    /// `body` uses it) and hands both to `body`.
    private mutating func withWholeRow(_ logits: LogitRows, _ r: Int,
                                       _ body: (inout Sampler, UnsafeMutableBufferPointer<Float>) -> Int) throws -> Int {
        var buffer: [Float] = []
        swap(&buffer, &row)
        defer { row = buffer }
        if buffer.count != logits.vocabulary { buffer = [Float](repeating: 0, count: logits.vocabulary) }
        return try buffer.withUnsafeMutableBufferPointer { b in
            try logits.read(row: r, into: b)
            return body(&self, b)
        }
    }

    /// Greedy, or a draw from the filtered distribution; the processors have run.
    private mutating func choose(_ logits: UnsafeMutableBufferPointer<Float>) -> Int {
        if parameters.temperature == 0 { return Sampler.argmax(UnsafeBufferPointer(logits)) }
        return draw(keep: filter(logits))
    }

    private mutating func draw(keep: Int) -> Int {
        var total: Float = 0
        for i in 0..<keep { total += probs[i] }
        let r = rng.nextUnit() * total
        var acc: Float = 0
        for i in 0..<keep {
            acc += probs[i]
            if r < acc { return Int(pairs[i].id) }
        }
        return Int(pairs[keep - 1].id)
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
        return TokenDistribution(ids: pairs[0..<keep].map(\.id), probabilities: probs[0..<keep].map { $0 / total })
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

    /// Logits below this are cut by min-p (min-p in probability space, relative to the best).
    private func minLogit(_ maxLogit: Float) -> Float {
        parameters.minP > 0 ? maxLogit + parameters.temperature * logf(parameters.minP) : -Float.infinity
    }

    /// Fills `pairs` (sorted by logit, descending) and their unnormalised probabilities in
    /// `probs`; returns how many survive top-p.
    private mutating func filter(_ logits: UnsafeMutableBufferPointer<Float>) -> Int {
        let n = logits.count
        let maxLogit = Sampler.largest(UnsafeBufferPointer(logits))
        pairs.removeAll(keepingCapacity: true)
        probs.removeAll(keepingCapacity: true)
        if !maxLogit.isFinite {
            pairs.append((Int32(Sampler.argmax(UnsafeBufferPointer(logits))), maxLogit))
            probs.append(1)
            return 1
        }
        // Candidates: everything above min-p of the best, which is cheap to find and usually
        // leaves few tokens to sort.
        let cut = minLogit(maxLogit)
        // Eight logits at a time, passing over the eights with no candidate (most of them, for
        // a model's logits); the candidates in index order.
        var i = 0
        if let base = UnsafePointer(logits.baseAddress) {
            let c = SIMD8<Float>(repeating: cut), floor = SIMD8<Float>(repeating: -.infinity)
            while i &+ 8 <= n {
                let w = CPUKernels.load8(base, i)
                if any((w .>= c) .& (w .> floor)) {
                    for j in i..<(i &+ 8) where base[j] >= cut && base[j] > -Float.infinity { pairs.append((Int32(j), base[j])) }
                }
                i &+= 8
            }
        }
        while i < n { if logits[i] >= cut && logits[i] > -Float.infinity { pairs.append((Int32(i), logits[i])) }; i &+= 1 }
        return finish(maxLogit)!
    }

    /// Top-k, the sort, the probabilities and top-p over the candidates in `pairs`. `total`, when
    /// given, is the probability mass of all candidates, of which `pairs` holds the largest; nil
    /// if top-p is not reached within them.
    private mutating func finish(_ maxLogit: Float, total: Float? = nil) -> Int? {
        let p = parameters
        if p.topK > 0 && pairs.count > p.topK { selectLargest(p.topK) }
        pairs.sort { $0.logit > $1.logit }
        let invT = 1 / p.temperature
        var sum: Float = 0
        for c in pairs {
            let e = expf((c.logit - maxLogit) * invT)
            probs.append(e)
            sum += e
        }
        if let total { sum = total }
        var keep = pairs.count
        if p.topP < 1 {
            var cum: Float = 0
            var reached = false
            for i in 0..<pairs.count {
                cum += probs[i] / sum
                if cum >= p.topP { keep = i + 1; reached = true; break }
            }
            if total != nil && !reached { return nil }
        }
        return keep
    }

    /// Reorders `pairs` so its first k hold the k largest logits, and drops the rest.
    private mutating func selectLargest(_ k: Int) {
        var lo = 0, hi = pairs.count - 1
        while lo < hi {
            let pivot = pairs[(lo + hi) / 2].logit
            var i = lo, j = hi
            while i <= j {
                while pairs[i].logit > pivot { i += 1 }
                while pairs[j].logit < pivot { j -= 1 }
                if i <= j { pairs.swapAt(i, j); i += 1; j -= 1 }
            }
            if k - 1 <= j { hi = j } else if k - 1 >= i { lo = i } else { break }
        }
        pairs.removeLast(pairs.count - k)
    }
}
