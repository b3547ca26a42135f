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
        /// Bytes of weights read per token over the timed runs, where the model counts them
        /// (a mixture of experts reads only the experts its tokens chose).
        public var weightBytesPerToken: Double?

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

    /// An engine for one sequence of up to `positions` positions, reading prompts `batch` tokens
    /// a pass, without prefix caching (repetitions must not find the last one's blocks).
    static func singleSequenceEngine(_ model: LanguageModel, positions: Int, batch: Int) throws -> Engine {
        var config = EngineConfig()
        config.kvBlocks = (positions + config.blockSize - 1) / config.blockSize + 1
        config.contextLength = positions + 1
        config.maxBatchTokens = batch
        config.maxSequences = 1
        config.prefixCaching = false
        return try Engine(model: model, tokenizer: nil, config: config)
    }

    /// Prompt processing: `tokens` prompt tokens as one batch (chunked by `batch`), `repetitions`
    /// times after one warm-up run, on the serving engine (a batch of one).
    public static func promptProcessing(_ model: LanguageModel, tokens n: Int, batch: Int = 512, repetitions: Int) throws -> Sample {
        let engine = try singleSequenceEngine(model, positions: n + 1, batch: batch)
        var request = EngineRequest(promptTokens: tokens(n, vocab: model.config.vocabSize, seed: 1), maxTokens: 1)
        request.ignoreEOS = true
        var times: [Double] = []
        for rep in 0...repetitions {
            let t0 = now()
            _ = try engine.generate(prompts: [request])
            if rep > 0 { times.append(now() - t0) }
        }
        return Sample(test: "pp\(n)", tokens: n, seconds: times)
    }

    /// Token generation: `tokens` single-token steps from an empty cache, each feeding back the
    /// greedy token, `repetitions` times after one warm-up run, on the serving engine.
    public static func tokenGeneration(_ model: LanguageModel, tokens n: Int, repetitions: Int) throws -> Sample {
        let engine = try singleSequenceEngine(model, positions: n + 1, batch: 512)
        var request = EngineRequest(promptTokens: [1], maxTokens: n)
        request.ignoreEOS = true
        var times: [Double] = []
        var read: Int?
        for rep in 0...repetitions {
            if rep == 1 { read = model.weightBytesRead }
            let t0 = now()
            _ = try engine.generate(prompts: [request])
            if rep > 0 { times.append(now() - t0) }
        }
        // Each run is n passes of one token (the one-token prompt, then n - 1 decode steps).
        var perToken: Double?
        if let before = read, let after = model.weightBytesRead { perToken = Double(after - before) / Double(repetitions * n) }
        return Sample(test: "tg\(n)", tokens: n, seconds: times, weightBytesPerToken: perToken)
    }

    /// Peak resident memory of this process, in bytes.
    public static func peakResidentBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Int(usage.ru_maxrss) * 1024
    }
}
