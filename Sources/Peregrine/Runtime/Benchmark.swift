#if canImport(Glibc)
import Glibc
#endif

/// Measurements in the manner of llama-bench: prompt processing (one batch of `p` tokens into an
/// empty cache) and token generation (`n` tokens one at a time from an empty cache), repeated.
public enum Benchmark {
    public struct Sample: Sendable {
        public var test: String
        public var tokens: Int
        public var seconds: [Double]

        public var tokensPerSecond: [Double] { seconds.map { Double(tokens) / $0 } }
        public var median: Double { Benchmark.median(tokensPerSecond) }
        public var standardDeviation: Double { Benchmark.standardDeviation(tokensPerSecond) }
    }

    public static func median(_ xs: [Double]) -> Double {
        guard !xs.isEmpty else { return 0 }
        let s = xs.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    public static func standardDeviation(_ xs: [Double]) -> Double {
        guard xs.count > 1 else { return 0 }
        let m = xs.reduce(0, +) / Double(xs.count)
        return (xs.reduce(0) { $0 + ($1 - m) * ($1 - m) } / Double(xs.count - 1)).squareRoot()
    }

    static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    /// Deterministic token ids in the vocabulary (llama-bench also feeds arbitrary tokens).
    static func tokens(_ n: Int, vocab: Int, seed: UInt64) -> [Int] {
        var rng = SeededGenerator(seed: seed)
        return (0..<n).map { _ in Int(rng.next() % UInt64(vocab)) }
    }

    /// Prompt processing: `tokens` prompt tokens as one batch (chunked by `batch`), `repetitions`
    /// times after one warm-up run.
    public static func promptProcessing(_ model: LanguageModel, tokens n: Int, batch: Int = 512, repetitions: Int) throws -> Sample {
        let vocab = model.config.vocabSize
        let cache = try ContiguousKVCache(model: model, slots: 1, capacity: n)
        let prompt = tokens(n, vocab: vocab, seed: 1)
        var plan = BatchPlan()
        var times: [Double] = []
        for rep in 0...repetitions {
            try cache.trim(0, to: 0)
            let t0 = now()
            var done = 0
            while done < n {
                let end = min(n, done + batch)
                plan.removeAll()
                plan.append(tokens: prompt[done..<end], slot: 0, position: done, logits: end == n ? .last : .none)
                _ = try model.forward(plan, kv: cache.memory)
                try cache.advance(0, by: end - done)
                done = end
            }
            if rep > 0 { times.append(now() - t0) }
        }
        return Sample(test: "pp\(n)", tokens: n, seconds: times)
    }

    /// Token generation: `tokens` single-token steps from an empty cache, each feeding back the
    /// greedy token, `repetitions` times after one warm-up run.
    public static func tokenGeneration(_ model: LanguageModel, tokens n: Int, repetitions: Int) throws -> Sample {
        let cache = try ContiguousKVCache(model: model, slots: 1, capacity: n + 1)
        var plan = BatchPlan()
        var times: [Double] = []
        for rep in 0...repetitions {
            try cache.trim(0, to: 0)
            var next = 1
            let t0 = now()
            for i in 0..<n {
                plan.removeAll()
                plan.append(tokens: CollectionOfOne(next), slot: 0, position: i, logits: .last)
                let logits = try model.forward(plan, kv: cache.memory)
                try cache.advance(0, by: 1)
                next = try logits.argmax(row: 0)
            }
            if rep > 0 { times.append(now() - t0) }
        }
        return Sample(test: "tg\(n)", tokens: n, seconds: times)
    }

    /// Peak resident memory of this process, in bytes.
    public static func peakResidentBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Int(usage.ru_maxrss) * 1024
    }
}
