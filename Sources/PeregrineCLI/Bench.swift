import ArgumentParser
import Foundation
import Peregrine

struct Bench: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure prompt processing and token generation speed, in the manner of llama-bench.",
        discussion: """
        pp<N>: N prompt tokens in one batch into an empty cache. tg<N>: N tokens generated one at a \
        time from an empty cache. Each test runs once to warm up, then --repetitions times; the \
        table gives the median tokens/s and the standard deviation. --kernels measures the CPU \
        kernels and this machine's memory bandwidth and peak FLOP rate instead.
        """)

    @Option(name: .shortAndLong, help: "Model directories (repeatable).")
    var model: [String] = [Defaults.model]

    @Option(name: [.customShort("p"), .customLong("n-prompt")], parsing: .upToNextOption, help: "Prompt lengths (0: skip).")
    var prompt: [Int] = [512]

    @Option(name: [.customShort("n"), .customLong("n-gen")], parsing: .upToNextOption, help: "Generation lengths (0: skip).")
    var gen: [Int] = [128]

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

    @Flag(help: "Measure the CPU kernels, memory bandwidth and peak FLOP rate.")
    var kernels = false

    @Option(help: "With a speculative flag: the prompt (a text file) to generate from, greedily, with and without speculation.")
    var promptFile: String?

    @OptionGroup(title: "Speculative decoding") var speculation: SpeculationOptions

    func validate() throws {
        if prompt.contains(where: { $0 < 0 }) || gen.contains(where: { $0 < 0 }) { throw ValidationError("lengths must be >= 0") }
        if threads.contains(where: { $0 < 1 || $0 > 1024 }) { throw ValidationError("--threads must be between 1 and 1024") }
        if repetitions < 1 || repetitions > 1000 { throw ValidationError("--repetitions must be between 1 and 1000") }
        if batchSize < 1 { throw ValidationError("--batch-size must be >= 1") }
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
            if !json {
                print("| model | size | params | type | backend | threads | test | t/s | load s | peak RSS |")
                print("|---|---|---|---|---|---|---|---|---|---|")
            }
            for path in model {
                for t in threadCounts {
                    let t0 = Date()
                    let lm = try device.load(path, threads: t)
                    let load = Date().timeIntervalSince(t0)
                    let info = ModelInfo(directory: path, model: lm)
                    var samples: [Benchmark.Sample] = []
                    for p in prompt where p > 0 {
                        guard p <= lm.config.maxPositions else {
                            throw PeregrineError.invalidArgument("pp\(p) exceeds the model's context of \(lm.config.maxPositions)")
                        }
                        samples.append(try Benchmark.promptProcessing(lm, tokens: p, batch: batchSize, repetitions: repetitions))
                    }
                    for n in gen where n > 0 {
                        guard n < lm.config.maxPositions else {
                            throw PeregrineError.invalidArgument("tg\(n) exceeds the model's context of \(lm.config.maxPositions)")
                        }
                        samples.append(try Benchmark.tokenGeneration(lm, tokens: n, repetitions: repetitions))
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
                            ])
                            print(JSONWriter.write(.object(obj)))
                        } else {
                            print(String(format: "| %@ | %@ | %@ | %@ | %@ | %d | %@ | %.2f ± %.2f | %.3f | %@ |",
                                         info.name, formatBytes(info.bytes), formatCount(info.parameters), info.type, lm.backendName, t, s.test,
                                         s.median, s.standardDeviation, load, formatBytes(rss)))
                        }
                        fflush(stdout)
                    }
                }
            }
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
                let lm = try ModelRegistry.load(directory: path, backend: CPUBackend(pool: ThreadPool(threadCount: t)))
                let tokenizer = try Tokenizer(directory: path)
                guard let spec = try speculation.make(target: lm, tokenizer: tokenizer) else { return }
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
            let rows = try KernelBenchmarks.run(backend: CPUBackend(pool: pool))
            if json {
                for r in rows {
                    print(JSONWriter.write(.object(JSONObject([
                        ("threads", .number(Double(t))), ("kernel", .string(r.kernel)), ("shape", .string(r.shape)),
                        ("microseconds", .number(r.microseconds)), ("gflops", r.gflops.map { .number($0) } ?? .null),
                        ("gbps", r.gigabytesPerSecond.map { .number($0) } ?? .null),
                        ("machine_read_gbps", .number(bandwidth)), ("machine_peak_gflops", .number(flops)),
                    ]))))
                }
                continue
            }
            print(String(format: "threads %d: memory read bandwidth %.1f GB/s, peak f32 FMA %.1f GFLOP/s\n", t, bandwidth, flops))
            print("| kernel | shape | µs | GFLOP/s | % peak | GB/s | % bandwidth |")
            print("|---|---|---|---|---|---|---|")
            for r in rows {
                let g = r.gflops.map { String(format: "%.1f | %.0f%%", $0, 100 * $0 / flops) } ?? "- | -"
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
