import ArgumentParser
import Foundation
import Peregrine

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure prompt processing and token generation speed, in the manner of llama-bench.",
        discussion: """
        pp<N>: N prompt tokens in one batch into an empty cache. tg<N>: N tokens generated one at a \
        time from an empty cache. With -d D, each test runs after D positions of context (llama-bench's \
        "pp512 @ d4096"): a prompt of D tokens read once, untimed, which every timed run finds in the \
        prefix cache. Each test runs once to warm up, then --repetitions times; the \
        table gives the median tokens/s and the standard deviation. --kernels measures the CPU \
        kernels and this machine's memory bandwidth and peak FLOP rate (and, with AVX-512 VNNI, \
        its 8-bit dot-product rate) instead.

        --batched prints llama-batched-bench's table: for each B of --npl, B sequences each read a \
        prompt of --npp tokens, then generate --ntg tokens together, on the serving engine. \
        --throughput runs --requests requests at once (prompt and output lengths fixed or drawn \
        with --range-ratio from a fixed seed; --shared-prefix gives them a common system prompt) \
        and reports requests/s, tokens/s, time to first token, inter-token latency, peak KV blocks \
        and the prefix-cache hit rate.
        """)

    @Option(name: .shortAndLong, help: "Model directories (repeatable).")
    var model: [String] = [Defaults.model]

    @Option(name: [.customShort("p"), .customLong("n-prompt")], parsing: .upToNextOption, help: "Prompt lengths (0: skip).")
    var prompt: [Int] = [512]

    @Option(name: [.customShort("n"), .customLong("n-gen")], parsing: .upToNextOption, help: "Generation lengths (0: skip).")
    var gen: [Int] = [128]

    @Option(name: [.customShort("d"), .customLong("n-depth")], parsing: .upToNextOption,
            help: "Depths: positions of context read (untimed) before each pp and tg test, multiples of 16.")
    var depth: [Int] = [0]

    @Option(name: .shortAndLong, parsing: .upToNextOption, help: "Thread counts (default: all cores).")
    var threads: [Int] = []

    @Option(name: [.customShort("r"), .long], help: "Timed repetitions of each test.")
    var repetitions: Int = 5

    @Option(name: [.customShort("b"), .customLong("batch-size")], help: "Most tokens per forward pass in prompt processing.")
    var batchSize: Int = 512

    @Flag(help: "Print JSON lines instead of a table.")
    var json = false

    @Option(help: "Where the model runs: cpu or cuda.")
    var device: Device = .cpu

    @Flag(help: "GPU: batch-invariant kernels (slower); the CPU always is.")
    var deterministic = false

    @Flag(help: "Measure the CPU kernels, memory bandwidth and peak FLOP (and 8-bit dot-product) rates.")
    var kernels = false

    @Option(help: "With a speculative flag: the prompt (a text file) to generate from, greedily, with and without speculation.")
    var promptFile: String?

    @OptionGroup(title: "Speculative decoding") var speculation: SpeculationOptions

    @Flag(help: "llama-batched-bench's table on the serving engine.")
    var batched = false

    @Option(parsing: .upToNextOption, help: "--batched: prompt lengths.")
    var npp: [Int] = [128]

    @Option(parsing: .upToNextOption, help: "--batched: generated tokens per sequence.")
    var ntg: [Int] = [128]

    @Option(parsing: .upToNextOption, help: "--batched: numbers of parallel sequences.")
    var npl: [Int] = [1, 2, 4, 8, 16, 32, 64]

    @Option(help: "--batched: every sequence samples at this temperature (top-k 40, top-p 0.95, min-p 0.05, a seed each); 0: greedy.")
    var temperature: Float = 0

    @Flag(help: "Offline throughput of many requests on the serving engine.")
    var throughput = false

    @Option(help: "--throughput: requests.")
    var requests: Int = 64

    @Option(help: "--throughput: prompt tokens per request (random ids).")
    var inputLen: Int = 256

    @Option(help: "--throughput: generated tokens per request.")
    var outputLen: Int = 128

    @Option(help: "--throughput: lengths drawn from [len x (1 - r), len x (1 + r)]; 0 keeps them fixed.")
    var rangeRatio: Double = 0

    @Option(help: "--throughput: tokens of a system prompt every request starts with.")
    var sharedPrefix: Int = 0

    @Option(help: "--throughput: seed of the drawn prompts and lengths.")
    var seed: UInt64 = 0

    @OptionGroup(title: "Serving engine") var engineOptions: EngineOptions

    func validate() throws {
        if prompt.contains(where: { $0 < 0 }) || gen.contains(where: { $0 < 0 }) { throw ValidationError("lengths must be >= 0") }
        if depth.contains(where: { $0 < 0 || $0 % 16 != 0 }) { throw ValidationError("depths must be >= 0 and multiples of 16 (the KV block size)") }
        if threads.contains(where: { $0 < 1 || $0 > 1024 }) { throw ValidationError("--threads must be between 1 and 1024") }
        if repetitions < 1 || repetitions > 1000 { throw ValidationError("--repetitions must be between 1 and 1000") }
        if batchSize < 1 { throw ValidationError("--batch-size must be >= 1") }
        let limit = TokenCounts.limit
        if (prompt + gen + depth + npp + ntg + [inputLen, outputLen, sharedPrefix]).contains(where: { $0 > limit }) {
            throw ValidationError("token counts must be at most \(limit)")
        }
        if npl.contains(where: { $0 > 65536 }) || requests > 1_000_000 {
            throw ValidationError("--npl must be at most 65536 and --requests at most 1000000")
        }
    }

    func run() throws {
        try reportingErrors {
            let threadCounts = threads.isEmpty ? [ThreadPool.defaultThreadCount] : threads
            if kernels {
                try runKernels(threadCounts)
                return
            }
            if speculation.draft != nil || speculation.lookup || speculation.skipLayers != nil {
                try runSpeculative(threadCounts)
                return
            }
            if batched || throughput {
                try runServing(threadCounts)
                return
            }
            if !json {
                print("| model | size | params | type | backend | threads | test | t/s | load s | peak RSS |")
                print("|---|---|---|---|---|---|---|---|---|---|")
            }
            for path in model {
                for t in threadCounts {
                    let t0 = Date()
                    let lm = try device.load(path, threads: t, deterministic: deterministic)
                    let load = Date().timeIntervalSince(t0)
                    let info = ModelInfo(directory: path, model: lm)
                    var samples: [Benchmark.Sample] = []
                    for d in depth {
                        for p in prompt where p > 0 {
                            guard d + p <= lm.config.maxPositions else {
                                throw PeregrineError.invalidArgument("pp\(p) at depth \(d) exceeds the model's context of \(lm.config.maxPositions)")
                            }
                            samples.append(try Benchmark.promptProcessing(lm, tokens: p, depth: d, batch: batchSize, repetitions: repetitions,
                                                                         cacheType: engineOptions.kvCacheType))
                        }
                        for n in gen where n > 0 {
                            guard d + n < lm.config.maxPositions else {
                                throw PeregrineError.invalidArgument("tg\(n) at depth \(d) exceeds the model's context of \(lm.config.maxPositions)")
                            }
                            samples.append(try Benchmark.tokenGeneration(lm, tokens: n, depth: d, repetitions: repetitions,
                                                                        cacheType: engineOptions.kvCacheType))
                        }
                    }
                    for s in samples {
                        let rss = Benchmark.peakResidentBytes()
                        if json {
                            let obj = JSONObject([
                                ("model", .string(info.name)), ("size_bytes", .number(Double(info.bytes))),
                                ("params", .number(Double(info.parameters))), ("type", .string(info.type)),
                                ("backend", .string(device.rawValue)), ("device", .string(lm.backendName)), ("threads", .number(Double(t))), ("test", .string(s.test)),
                                ("tokens_per_second", .number(s.median)), ("stddev", .number(s.standardDeviation)),
                                ("samples", .array(s.tokensPerSecond.map { .number($0) })),
                                ("load_seconds", .number(load)), ("peak_rss_bytes", .number(Double(rss))),
                                ("decode_bytes_per_token", .number(Double(lm.weightBytes))),
                                ("kv_cache_type", .string((engineOptions.kvCacheType ?? lm.preferredKVCacheType).rawValue)),
                            ])
                            var out = obj
                            if let read = s.weightBytesPerToken { out["decode_bytes_read_per_token"] = .number(read) }
                            print(JSONWriter.write(.object(out)))
                        } else {
                            print(String(format: "| %@ | %@ | %@ | %@ | %@ | %d | %@ | %.2f ± %.2f | %.3f | %@ |",
                                         info.name, formatBytes(info.bytes), formatCount(info.parameters), info.type, lm.backendName, t, s.test,
                                         s.median, s.standardDeviation, load, formatBytes(rss)))
                            if let read = s.weightBytesPerToken, lm.config.experts != nil {
                                // A mixture of experts reads the experts its tokens chose.
                                print("| \(info.name) | | | | | | \(s.test) weights read/token | \(formatBytes(Int(read))) (active: \(formatBytes(lm.weightBytes))) | | |")
                            }
                        }
                        fflush(stdout)
                    }
                }
            }
            if let steps = StepProfile.shared?.report { print(steps) }
        }
    }

    /// The serving engine's benchmarks (--batched, --throughput).
    func runServing(_ threadCounts: [Int]) throws {
        if npp.contains(where: { $0 < 1 }) || ntg.contains(where: { $0 < 1 }) || npl.contains(where: { $0 < 1 }) {
            throw PeregrineError.invalidArgument("--npp, --ntg and --npl must be >= 1")
        }
        guard requests >= 1, inputLen >= 1, outputLen >= 1, sharedPrefix >= 0, rangeRatio >= 0, rangeRatio < 1 else {
            throw PeregrineError.invalidArgument("--requests, --input-len and --output-len must be >= 1, --range-ratio in [0, 1)")
        }
        for path in model {
            for t in threadCounts {
                let lm = try device.load(path, threads: t, deterministic: deterministic)
                let tokenizer = try? Tokenizer(directory: path)
                print("model \(ModelInfo(directory: path, model: lm).name), \(lm.backendName)")
                if batched { try runBatched(lm) }
                if throughput { try runThroughput(lm, tokenizer) }
                if let profile = lm.kernelProfile { print(profile) }
                if let steps = StepProfile.shared?.report { print(steps) }
            }
        }
    }

    func runBatched(_ lm: LanguageModel) throws {
        let most = npl.max() ?? 1
        let longest = (npp.max() ?? 0) + (ntg.max() ?? 0) + 1
        var config = try engineOptions.config(contextLength: longest)
        config.maxSequences = max(config.maxSequences, most)
        config.prefixCaching = false
        if config.kvBlocks == nil && config.kvMemoryBytes == nil {
            config.kvBlocks = most * ((longest + config.blockSize - 1) / config.blockSize + 1)
        }
        // --batch-tokens, or the engine's default for the device (-b is the pp tests' batch).
        config.maxBatchTokens = engineOptions.batchTokens
        let engine = try Engine(model: lm, tokenizer: nil, config: config)
        if !json {
            print("|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |")
            print("|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|")
        }
        // One untimed run first, so the first row does not pay for warming up.
        _ = try ServingBenchmark.batched(engine, promptTokens: min(npp[0], 32), generatedTokens: 4, batch: 1, seed: 99)
        var seed: UInt64 = 1
        for pp in npp {
            for tg in ntg {
                for b in npl {
                    var sampling = SamplingParameters.greedy
                    if temperature > 0 {
                        sampling = SamplingParameters()
                        sampling.temperature = temperature
                    }
                    let r = try ServingBenchmark.batched(engine, promptTokens: pp, generatedTokens: tg, batch: b, seed: seed, sampling: sampling)
                    seed += 1
                    if json {
                        print(JSONWriter.write(.object(JSONObject([
                            ("pp", .number(Double(pp))), ("tg", .number(Double(tg))), ("b", .number(Double(b))),
                            ("n_kv", .number(Double(r.kvPositions))), ("t_pp", .number(r.promptSeconds)),
                            ("speed_pp", .number(r.promptTokensPerSecond)), ("t_tg", .number(r.generationSeconds)),
                            ("speed_tg", .number(r.generationTokensPerSecond)), ("t", .number(r.totalSeconds)),
                            ("speed", .number(r.totalTokensPerSecond)),
                        ]))))
                    } else {
                        print(String(format: "| %5d | %6d | %4d | %6d | %8.3f | %8.2f | %8.3f | %8.2f | %8.3f | %8.2f |", pp, tg, b,
                                     r.kvPositions, r.promptSeconds, r.promptTokensPerSecond, r.generationSeconds,
                                     r.generationTokensPerSecond, r.totalSeconds, r.totalTokensPerSecond))
                    }
                    fflush(stdout)
                }
            }
        }
    }

    func runThroughput(_ lm: LanguageModel, _ tokenizer: Tokenizer?) throws {
        var w = ServingBenchmark.Workload()
        w.requests = requests
        w.inputTokens = inputLen
        w.outputTokens = outputLen
        w.rangeRatio = rangeRatio
        w.sharedPrefix = sharedPrefix
        w.seed = seed
        let reqs = w.makeRequests(vocabulary: lm.config.vocabSize)
        let longest = reqs.reduce(0) { max($0, $1.promptTokens.count + $1.maxTokens) } + 1
        let config = try engineOptions.config(contextLength: max(longest, min(lm.config.maxPositions, 4096)))
        let engine = try Engine(model: lm, tokenizer: tokenizer, config: config)
        // Warm up on a request of its own prompt (so it leaves no useful prefix behind).
        _ = try engine.generate(prompts: [EngineRequest(promptTokens: [1, 2, 3], maxTokens: 4)])
        let r = try ServingBenchmark.throughput(engine, reqs)
        func ms(_ xs: [Double], _ q: Double) -> Double { ServingBenchmark.percentile(xs, q) * 1000 }
        if json {
            print(JSONWriter.write(.object(JSONObject([
                ("requests", .number(Double(r.requests))), ("seconds", .number(r.seconds)),
                ("requests_per_second", .number(r.requestsPerSecond)), ("output_tokens_per_second", .number(r.outputTokensPerSecond)),
                ("total_tokens_per_second", .number(r.totalTokensPerSecond)),
                ("ttft_ms_p50", .number(ms(r.timeToFirstToken, 0.5))), ("ttft_ms_p90", .number(ms(r.timeToFirstToken, 0.9))),
                ("ttft_ms_p99", .number(ms(r.timeToFirstToken, 0.99))),
                ("itl_ms_p50", .number(ms(r.interTokenLatency, 0.5))), ("itl_ms_p90", .number(ms(r.interTokenLatency, 0.9))),
                ("itl_ms_p99", .number(ms(r.interTokenLatency, 0.99))),
                ("peak_kv_blocks", .number(Double(r.peakKVBlocks))), ("kv_blocks", .number(Double(r.kvBlocks))),
                ("prefix_cache_hit_rate", .number(r.prefixCacheHitRate)), ("preemptions", .number(Double(r.preemptions))),
            ]))))
        } else {
            print(String(format: "requests %d in %.2f s: %.2f requests/s, output %.1f tok/s, total %.1f tok/s",
                         r.requests, r.seconds, r.requestsPerSecond, r.outputTokensPerSecond, r.totalTokensPerSecond))
            print(String(format: "time to first token ms: p50 %.1f  p90 %.1f  p99 %.1f", ms(r.timeToFirstToken, 0.5),
                         ms(r.timeToFirstToken, 0.9), ms(r.timeToFirstToken, 0.99)))
            print(String(format: "inter-token latency ms: p50 %.2f  p90 %.2f  p99 %.2f", ms(r.interTokenLatency, 0.5),
                         ms(r.interTokenLatency, 0.9), ms(r.interTokenLatency, 0.99)))
            print(String(format: "KV blocks: peak %d of %d | prefix cache hit rate %.1f%% | preemptions %d", r.peakKVBlocks, r.kvBlocks,
                         r.prefixCacheHitRate * 100, r.preemptions))
        }
        if sharedPrefix > 0 {
            // Time to first token of a request whose shared prefix is cached, against one whose is not.
            let probe = ServingBenchmark.Workload.probe(prefix: Array(reqs[0].promptTokens.prefix(sharedPrefix)), vocabulary: lm.config.vocabSize)
            let cold = try Engine(model: lm, tokenizer: tokenizer, config: config)
            _ = try cold.generate(prompts: [EngineRequest(promptTokens: [1, 2, 3], maxTokens: 2)])
            let coldTTFT = try cold.generate(prompts: [probe]).first?.firstTokenSeconds ?? 0
            let warmTTFT = try engine.generate(prompts: [probe]).first?.firstTokenSeconds ?? 0
            print(String(format: "prefix of %d tokens: first token in %.1f ms uncached, %.1f ms cached (%.1fx)", sharedPrefix,
                         coldTTFT * 1000, warmTTFT * 1000, coldTTFT / max(warmTTFT, 1e-9)))
        }
    }

    /// Plain and speculative greedy generation of the same prompt, alternating; checks that both
    /// produce the same tokens.
    func runSpeculative(_ threadCounts: [Int]) throws {
        guard let promptFile else { throw PeregrineError.invalidArgument("speculative benchmarks need --prompt-file") }
        guard let prompt = try? String(contentsOfFile: promptFile, encoding: .utf8), !prompt.isEmpty else {
            throw PeregrineError.io("cannot read a prompt from \(promptFile)")
        }
        let n = gen.first { $0 > 0 } ?? 128
        if !json {
            print("| model | threads | drafter | K | adaptive | prompt | tokens | plain t/s | speculative t/s | speedup | acceptance | tokens/pass | same output |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        }
        for path in model {
            for t in threadCounts {
                let backend = try device.backend(threads: t, deterministic: deterministic)
                let lm = try ModelRegistry.load(directory: path, backend: backend)
                let tokenizer = try Tokenizer(directory: path)
                guard let spec = try speculation.make(target: lm, tokenizer: tokenizer, backend: backend) else { return }
                let generator = Generator(model: lm, tokenizer: tokenizer)
                var options = GenerationOptions()
                options.sampling = .greedy
                options.maxTokens = n
                var specOptions = options
                specOptions.speculative = spec
                var plain: [Double] = [], fast: [Double] = []
                var stats = SpeculationStats()
                var same = true
                var promptTokens = 0, generated = 0
                for rep in 0...repetitions {
                    let a = try generator.generate(prompt: prompt, options: options)
                    let b = try generator.generate(prompt: prompt, options: specOptions)
                    same = same && a.tokens == b.tokens
                    promptTokens = a.promptTokens.count
                    generated = a.tokens.count
                    if rep == 0 { continue }  // warm-up
                    plain.append(Double(a.tokens.count) / a.decodeSeconds)
                    fast.append(Double(b.tokens.count) / b.decodeSeconds)
                    if let s = b.speculation {
                        stats.verifications += s.verifications
                        stats.proposed += s.proposed
                        stats.accepted += s.accepted
                    }
                }
                let mp = Benchmark.median(plain), mf = Benchmark.median(fast)
                let name = URL(fileURLWithPath: path).lastPathComponent
                if json {
                    print(JSONWriter.write(.object(JSONObject([
                        ("model", .string(name)), ("threads", .number(Double(t))), ("drafter", .string(spec.drafter.name)),
                        ("draft_tokens", .number(Double(spec.draftTokens))), ("adaptive", .bool(spec.adaptive)),
                        ("prompt_tokens", .number(Double(promptTokens))), ("generated", .number(Double(generated))),
                        ("plain_tokens_per_second", .number(mp)), ("speculative_tokens_per_second", .number(mf)),
                        ("speedup", .number(mf / mp)), ("acceptance", .number(stats.acceptanceRate)),
                        ("tokens_per_verification", .number(stats.tokensPerVerification)), ("identical", .bool(same)),
                    ]))))
                } else {
                    print(String(format: "| %@ | %d | %@ | %d | %@ | %d | %d | %.1f | %.1f | %.2fx | %.1f%% | %.2f | %@ |",
                                 name, t, spec.drafter.name, spec.draftTokens, spec.adaptive ? "yes" : "no", promptTokens, generated,
                                 mp, mf, mf / mp, 100 * stats.acceptanceRate, stats.tokensPerVerification, same ? "yes" : "NO"))
                }
                fflush(stdout)
            }
        }
    }

    func runKernels(_ threadCounts: [Int]) throws {
        for t in threadCounts {
            let pool = ThreadPool(threadCount: t)
            let bandwidth = KernelBenchmarks.memoryReadBandwidth(pool: pool)
            let flops = KernelBenchmarks.peakFlops(pool: pool)
            let intOps = KernelBenchmarks.peakInt8Ops(pool: pool)
            let rows = try KernelBenchmarks.run(backend: CPUBackend(pool: pool))
            if json {
                for r in rows {
                    print(JSONWriter.write(.object(JSONObject([
                        ("threads", .number(Double(t))), ("kernel", .string(r.kernel)), ("shape", .string(r.shape)),
                        ("microseconds", .number(r.microseconds)), ("gflops", r.gflops.map { .number($0) } ?? .null),
                        ("gbps", r.gigabytesPerSecond.map { .number($0) } ?? .null),
                        ("machine_read_gbps", .number(bandwidth)), ("machine_peak_gflops", .number(flops)),
                        ("machine_peak_int8_gops", intOps.map { .number($0) } ?? .null),
                    ]))))
                }
                continue
            }
            let int8 = intOps.map { String(format: ", peak int8 dot (vpdpbusd) %.1f GOP/s", $0) } ?? ""
            print(String(format: "threads %d: memory read bandwidth %.1f GB/s, peak f32 FMA %.1f GFLOP/s", t, bandwidth, flops) + int8 + "\n")
            print("| kernel | shape | µs | GFLOP/s | % peak | GB/s | % bandwidth |")
            print("|---|---|---|---|---|---|---|")
            for r in rows {
                // The block types' products run on 8-bit integers: their peak is the dot
                // instruction's where it was measured.
                let peak = r.integer ? intOps ?? flops : flops
                let g = r.gflops.map { String(format: "%.1f | %.0f%%", $0, 100 * $0 / peak) } ?? "- | -"
                let b = r.gigabytesPerSecond.map { String(format: "%.1f | %.0f%%", $0, 100 * $0 / bandwidth) } ?? "- | -"
                print("| \(r.kernel) | \(r.shape) | \(String(format: "%.1f", r.microseconds)) | \(g) | \(b) |")
            }
        }
    }
}

/// What the bench table says about a model.
struct ModelInfo {
    let name: String
    let bytes: Int
    let parameters: Int
    let type: String

    init(directory: String, model: LanguageModel) {
        name = URL(fileURLWithPath: directory).lastPathComponent
        var bytes = 0, params = 0
        var types = Set<String>()
        if FileSystem.isGGUFFile(directory), let g = try? GGUFFile(path: directory) {
            for t in g.tensors {
                bytes += t.byteCount
                params += t.elementCount
                types.insert("\(t.type)".uppercased())
            }
        } else if let store = try? WeightStore(directory: directory) {
            for n in store.tensorNames {
                if let t = store.tensor(n) {
                    bytes += t.byteCount
                    params += t.elementCount
                    types.insert(t.dtype.rawValue)
                }
            }
        }
        self.bytes = bytes
        parameters = params
        type = types.sorted().joined(separator: "+")
    }
}

func formatBytes(_ n: Int) -> String {
    let d = Double(n)
    if d >= Double(1 << 30) { return String(format: "%.2f GiB", d / Double(1 << 30)) }
    return String(format: "%.1f MiB", d / Double(1 << 20))
}

func formatCount(_ n: Int) -> String {
    n >= 1_000_000_000 ? String(format: "%.2f B", Double(n) / 1e9) : String(format: "%.1f M", Double(n) / 1e6)
}
