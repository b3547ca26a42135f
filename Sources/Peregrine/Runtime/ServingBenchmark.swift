/// Benchmarks of the serving engine: llama-batched-bench's table (B sequences, each a prompt of
/// PP tokens then TG generated tokens) and an offline throughput run over many requests.
public enum ServingBenchmark {
    /// One row of llama-batched-bench's table.
    public struct BatchedRow: Sendable {
        public var promptTokens: Int
        public var generatedTokens: Int
        public var batch: Int
        public var promptSeconds: Double
        public var generationSeconds: Double

        /// Positions in the KV cache at the end: B x (PP + TG).
        public var kvPositions: Int { batch * (promptTokens + generatedTokens) }
        public var promptTokensPerSecond: Double { Double(batch * promptTokens) / promptSeconds }
        public var generationTokensPerSecond: Double { Double(batch * generatedTokens) / generationSeconds }
        public var totalSeconds: Double { promptSeconds + generationSeconds }
        public var totalTokensPerSecond: Double { Double(kvPositions) / totalSeconds }
    }

    /// B distinct random prompts of PP tokens read together (in passes of the engine's token
    /// budget), then TG steps each decoding one token of every sequence, as llama-batched-bench
    /// does. The prompt time ends when every sequence has its first token. Sequence i samples with
    /// `sampling` and seed `seed` + i (greedy by default).
    public static func batched(_ engine: Engine, promptTokens pp: Int, generatedTokens tg: Int, batch b: Int, seed: UInt64,
                               sampling: SamplingParameters = .greedy) throws -> BatchedRow {
        let vocab = engine.model.config.vocabSize
        var rng = SeededGenerator(seed: seed)
        var ids: [Int] = []
        for _ in 0..<b {
            var r = EngineRequest(promptTokens: (0..<pp).map { _ in Int(rng.next() % UInt64(vocab)) }, maxTokens: tg + 1, sampling: sampling)
            r.sampling.seed = seed &+ UInt64(ids.count)
            r.ignoreEOS = true
            ids.append(try engine.add(r))
        }
        var started = Set<Int>()
        let t0 = Benchmark.now()
        var t1 = t0
        var open = b
        while open > 0 {
            let outputs = try engine.step()
            for o in outputs {
                if !o.tokens.isEmpty && started.insert(o.requestId).inserted && started.count == b { t1 = Benchmark.now() }
                if o.finishReason != nil { open -= 1 }
            }
            if outputs.isEmpty && open > 0 { throw PeregrineError.backend("the engine stopped with \(open) sequences unfinished") }
        }
        let t2 = Benchmark.now()
        return BatchedRow(promptTokens: pp, generatedTokens: tg, batch: b, promptSeconds: t1 - t0, generationSeconds: t2 - t1)
    }

    /// How requests of a throughput run look.
    public struct Workload: Sendable {
        public var requests = 64
        public var inputTokens = 256
        public var outputTokens = 128
        /// Lengths drawn uniformly from [len x (1 - ratio), len x (1 + ratio)] (vLLM's random
        /// range ratio); 0 gives fixed lengths.
        public var rangeRatio = 0.0
        /// Tokens of a system prompt every request starts with (0: none).
        public var sharedPrefix = 0
        public var seed: UInt64 = 0

        public init() {}

        /// The requests, greedy, ignoring EOS so each produces its drawn output length.
        public func makeRequests(vocabulary: Int) -> [EngineRequest] {
            var rng = SeededGenerator(seed: seed)
            func draw(_ n: Int) -> Int {
                guard rangeRatio > 0 else { return n }
                let lo = max(1, Int(Double(n) * (1 - rangeRatio))), hi = max(lo, Int(Double(n) * (1 + rangeRatio)))
                return lo + Int(rng.next() % UInt64(hi - lo + 1))
            }
            let prefix = (0..<sharedPrefix).map { _ in Int(rng.next() % UInt64(vocabulary)) }
            return (0..<requests).map { _ in
                let input = draw(inputTokens), output = draw(outputTokens)
                var r = EngineRequest(promptTokens: prefix + (0..<input).map { _ in Int(rng.next() % UInt64(vocabulary)) }, maxTokens: output)
                r.ignoreEOS = true
                return r
            }
        }

        /// A request of the prefix and a short suffix of its own, for the cached/uncached comparison.
        public static func probe(prefix: [Int], vocabulary: Int) -> EngineRequest {
            var rng = SeededGenerator(seed: 12345)
            var r = EngineRequest(promptTokens: prefix + (0..<16).map { _ in Int(rng.next() % UInt64(vocabulary)) }, maxTokens: 1)
            r.ignoreEOS = true
            return r
        }
    }

    public struct ThroughputReport: Sendable {
        public var requests = 0
        public var seconds = 0.0
        public var promptTokens = 0
        public var outputTokens = 0
        public var timeToFirstToken: [Double] = []
        public var interTokenLatency: [Double] = []
        public var peakKVBlocks = 0
        public var kvBlocks = 0
        public var prefixCacheHitRate = 0.0
        public var preemptions = 0

        public var requestsPerSecond: Double { Double(requests) / seconds }
        public var outputTokensPerSecond: Double { Double(outputTokens) / seconds }
        public var totalTokensPerSecond: Double { Double(promptTokens + outputTokens) / seconds }
    }

    /// Every request added at once, run to the end.
    public static func throughput(_ engine: Engine, _ requests: [EngineRequest]) throws -> ThroughputReport {
        let before = engine.stats
        let t0 = Benchmark.now()
        let results = try engine.generate(prompts: requests)
        var report = ThroughputReport()
        report.seconds = Benchmark.now() - t0
        report.requests = requests.count
        report.promptTokens = requests.reduce(0) { $0 + $1.promptTokens.count }
        report.outputTokens = results.reduce(0) { $0 + $1.tokens.count }
        report.timeToFirstToken = results.map(\.firstTokenSeconds)
        report.interTokenLatency = results.flatMap(\.interTokenSeconds)
        let after = engine.stats
        report.peakKVBlocks = after.kvBlocksPeak
        report.kvBlocks = after.kvBlocksTotal
        let queries = after.prefixCacheQueries - before.prefixCacheQueries
        report.prefixCacheHitRate = queries > 0 ? Double(after.prefixCacheHits - before.prefixCacheHits) / Double(queries) : 0
        report.preemptions = after.preemptions - before.preemptions
        return report
    }

    /// The q-th quantile (0...1) of the values, by linear interpolation.
    public static func percentile(_ xs: [Double], _ q: Double) -> Double {
        guard !xs.isEmpty else { return 0 }
        let s = xs.sorted()
        let x = q * Double(s.count - 1)
        let i = Int(x), f = x - Double(i)
        return i + 1 < s.count ? s[i] * (1 - f) + s[i + 1] * f : s[i]
    }
}
