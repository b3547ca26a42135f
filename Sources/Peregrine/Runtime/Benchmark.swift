#if canImport(Glibc)
import Glibc
#endif

/// Measurements in the manner of llama-bench: prompt processing (one batch of `p` tokens) and
/// token generation (`n` tokens one at a time), into an empty cache or after a depth of context,
/// repeated.
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

    static func now() -> Double { StepProfile.now() }

    /// Deterministic token ids in the vocabulary (llama-bench also feeds arbitrary tokens).
    static func tokens(_ n: Int, vocab: Int, seed: UInt64) -> [Int] {
        var rng = SeededGenerator(seed: seed)
        return (0..<n).map { _ in Int(rng.next() % UInt64(vocab)) }
    }

    /// An engine for one sequence of up to `positions` positions, reading prompts `batch` tokens
    /// a pass, without prefix caching (repetitions must not find the last one's blocks).
    static func singleSequenceEngine(_ model: LanguageModel, positions: Int, batch: Int, cacheType: KVCacheType? = nil) throws -> Engine {
        var config = EngineConfig()
        config.kvCacheType = cacheType
        config.kvBlocks = (positions + config.blockSize - 1) / config.blockSize + 1
        config.contextLength = positions + 1
        config.maxBatchTokens = batch
        config.maxSequences = 1
        config.prefixCaching = false
        return try Engine(model: model, tokenizer: nil, config: config)
    }

    /// A test's engine and the context its timed runs start from. At depth 0 the cache is empty.
    /// At a depth (llama-bench's `-d`), a prompt of `depth` tokens is read once, untimed, and stays
    /// in the prefix cache: every timed run starts with that prompt, maps its blocks and computes
    /// only its own tokens, with `depth` positions of context before them.
    private struct DepthContext {
        let engine: Engine
        let prefix: [Int]

        init(_ model: LanguageModel, depth: Int, tokens n: Int, batch: Int, repetitions: Int, cacheType: KVCacheType?) throws {
            guard depth > 0 else {
                engine = try singleSequenceEngine(model, positions: n + 1, batch: batch, cacheType: cacheType)
                prefix = []
                return
            }
            var config = EngineConfig()
            config.kvCacheType = cacheType
            guard depth % config.blockSize == 0 else {
                throw PeregrineError.invalidArgument("a depth must be a multiple of the KV block size (\(config.blockSize)); \(depth) is not")
            }
            guard depth + n + 1 <= model.config.maxPositions else {
                throw PeregrineError.invalidArgument("depth \(depth) plus \(n) tokens exceeds the model's context of \(model.config.maxPositions)")
            }
            // The depth's blocks, and room for every run's own blocks so that none evicts them.
            let perRun = (n + 1 + config.blockSize - 1) / config.blockSize + 1
            config.kvBlocks = depth / config.blockSize + (repetitions + 2) * perRun
            config.contextLength = depth + n + 1
            config.maxBatchTokens = batch
            config.maxSequences = 1
            config.prefixCaching = true
            engine = try Engine(model: model, tokenizer: nil, config: config)
            prefix = Benchmark.tokens(depth, vocab: model.config.vocabSize, seed: 7)
            var fill = EngineRequest(promptTokens: prefix, maxTokens: 1)
            fill.ignoreEOS = true
            _ = try engine.generate(prompts: [fill])
        }

        /// Runs a request that continues the context with `tokens`, and checks that its depth came
        /// from the cache (a timed run must not read it again).
        func run(_ tokens: [Int], maxTokens: Int) throws {
            var request = EngineRequest(promptTokens: prefix + tokens, maxTokens: maxTokens)
            request.ignoreEOS = true
            let results = try engine.generate(prompts: [request])
            guard prefix.isEmpty || results.first?.cachedPromptTokens == prefix.count else {
                throw PeregrineError.invalidArgument("the depth's \(prefix.count) tokens were not found in the prefix cache")
            }
        }

        var label: String { prefix.isEmpty ? "" : " @ d\(prefix.count)" }
    }

    /// Prompt processing: `tokens` prompt tokens as one batch (chunked by `batch`), `repetitions`
    /// times after one warm-up run, on the serving engine (a batch of one), after `depth`
    /// positions of context, keys and values stored as `cacheType` (llama-bench's -ctk/-ctv; nil: the backend's preference).
    public static func promptProcessing(_ model: LanguageModel, tokens n: Int, depth: Int = 0, batch: Int = 512, repetitions: Int,
                                        cacheType: KVCacheType? = nil) throws -> Sample {
        let context = try DepthContext(model, depth: depth, tokens: n, batch: batch, repetitions: repetitions, cacheType: cacheType)
        var times: [Double] = []
        for rep in 0...repetitions {
            // Each run its own tokens at a depth, so that none finds the last one's blocks.
            let prompt = tokens(n, vocab: model.config.vocabSize, seed: depth == 0 ? 1 : 100 + UInt64(rep))
            let t0 = now()
            try context.run(prompt, maxTokens: 1)
            if rep > 0 { times.append(now() - t0) }
        }
        return Sample(test: "pp\(n)" + context.label, tokens: n, seconds: times)
    }

    /// Token generation: `tokens` single-token steps, each feeding back the greedy token,
    /// `repetitions` times after one warm-up run, on the serving engine, from an empty cache or
    /// after `depth` positions of context.
    public static func tokenGeneration(_ model: LanguageModel, tokens n: Int, depth: Int = 0, repetitions: Int,
                                       cacheType: KVCacheType? = nil) throws -> Sample {
        let context = try DepthContext(model, depth: depth, tokens: n, batch: 512, repetitions: repetitions, cacheType: cacheType)
        var times: [Double] = []
        var read: Int?
        for rep in 0...repetitions {
            if rep == 1 { read = model.weightBytesRead }
            let first = depth == 0 ? 1 : Int(1 + rep) % model.config.vocabSize
            let t0 = now()
            try context.run([first], maxTokens: n)
            if rep > 0 { times.append(now() - t0) }
        }
        // Each run is n passes of one token (the one-token prompt, then n - 1 decode steps).
        var perToken: Double?
        if let before = read, let after = model.weightBytesRead { perToken = Double(after - before) / Double(repetitions * n) }
        return Sample(test: "tg\(n)" + context.label, tokens: n, seconds: times, weightBytesPerToken: perToken)
    }

    /// Peak resident memory of this process, in bytes.
    public static func peakResidentBytes() -> Int {
        var usage = rusage()
        getrusage(RUSAGE_SELF.rawValue, &usage)
        return Int(usage.ru_maxrss) * 1024
    }
}
