import ArgumentParser
import Foundation
import Peregrine

@main
struct PeregrineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "peregrine",
        abstract: "Run large language models on the CPU: Hugging Face safetensors directories of the Llama family.",
        subcommands: [Generate.self, Chat.self, Tokenize.self, Bench.self, Perplexity.self, Imatrix.self, Quantize.self, Serve.self],
        defaultSubcommand: Generate.self)
}

/// The model that runs when no --model is given: the reference model the repository ships
/// (relative to the repository root, where the README runs it).
enum Defaults {
    static let model = "models/target"
}

struct ModelOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: "A Hugging Face model directory (config.json, *.safetensors, tokenizer.json) or a GGUF file.")
    var model: String = Defaults.model

    @Option(name: .shortAndLong, help: "Worker threads (default: all cores).")
    var threads: Int?

    @Option(help: "Where the model runs: cpu, or cuda (an NVIDIA GPU, through the driver and NVRTC found at run time).")
    var device: Device = .cpu

    @Flag(help: "GPU: batch-invariant kernels (a sequence's output does not depend on its batch; slower). The CPU always is.")
    var deterministic = false

    func validate() throws {
        if let t = threads, t < 1 || t > 1024 { throw ValidationError("--threads must be between 1 and 1024") }
    }

    /// The CPU backend on --threads workers (for commands that run on the CPU only).
    func cpuBackend() -> CPUBackend { Device.cpuBackend(threads: threads) }

    /// The backend of --device, --threads and --deterministic.
    func backend() throws -> any ComputeBackend { try device.backend(threads: threads, deterministic: deterministic) }

    func load() throws -> LanguageModel {
        try device.load(model, threads: threads, deterministic: deterministic)
    }
}

enum Device: String, ExpressibleByArgument, CaseIterable {
    case cpu, cuda

    /// A CPU backend on `threads` workers (nil: the shared pool, one worker a core).
    static func cpuBackend(threads: Int?) -> CPUBackend {
        threads.map { CPUBackend(pool: ThreadPool(threadCount: $0)) } ?? CPUBackend()
    }

    /// The backend a command's models run on. A draft model is loaded on its target's: one thread
    /// pool (whose idle workers would otherwise spin beside the other model's) or one GPU stream.
    func backend(threads: Int?, deterministic: Bool) throws -> any ComputeBackend {
        switch self {
        case .cpu: return Device.cpuBackend(threads: threads)
        case .cuda: return try CUDABackend(deterministic: deterministic)
        }
    }

    func load(_ path: String, threads: Int?, deterministic: Bool) throws -> LanguageModel {
        try ModelRegistry.load(directory: path, backend: try backend(threads: threads, deterministic: deterministic))
    }
}

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text from a prompt, streaming it to stdout; speeds go to stderr.")

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .shortAndLong, help: "The prompt text.")
    var prompt: String = "Once upon a time"

    @Option(name: [.customShort("n"), .long], help: "Most tokens to generate.")
    var maxTokens: Int = 128

    @OptionGroup var samplingOptions: SamplingOptions

    @Option(name: [.customShort("c"), .long], help: "Context length: prompt plus generation (default: the model's).")
    var ctxSize: Int?

    @Flag(help: "Do not add the tokenizer's special tokens (BOS) to the prompt.")
    var noSpecial = false

    @Option(help: KVCacheType.optionHelp)
    var kvCacheType: KVCacheType?

    @OptionGroup(title: "Speculative decoding") var speculation: SpeculationOptions

    func validate() throws {
        if maxTokens < 0 || maxTokens > TokenCounts.limit { throw ValidationError("--max-tokens must be between 0 and \(TokenCounts.limit)") }
        if let c = ctxSize, c < 1 || c > TokenCounts.limit { throw ValidationError("--ctx-size must be between 1 and \(TokenCounts.limit)") }
    }

    func run() throws {
        try reportingErrors {
            var options = GenerationOptions()
            options.maxTokens = maxTokens
            options.stopStrings = samplingOptions.stops
            options.addSpecialTokens = !noSpecial
            options.contextLength = ctxSize
            options.sampling = try samplingOptions.parameters()
            options.kvCacheType = kvCacheType
            let seed = options.sampling.seed

            let clock = ContinuousClock()
            let start = clock.now
            let backend = try modelOptions.backend()
            let model = try ModelRegistry.load(directory: modelOptions.model, backend: backend)
            let tokenizer = try Tokenizer(directory: modelOptions.model)
            options.speculative = try speculation.make(target: model, tokenizer: tokenizer, backend: backend)
            let loaded = clock.now - start
            let generator = Generator(model: model, tokenizer: tokenizer)
            let out = FileHandle.standardOutput
            let result = try generator.generate(prompt: prompt, options: options) { piece in
                out.write(Data(piece.utf8))
                return true
            }
            out.write(Data("\n".utf8))
            let msg = String(format: "\nload %.2f s | prompt %d tokens, %.1f tok/s | generation %d tokens, %.1f tok/s | stop: %@ | seed %llu | %@\n",
                             Double(loaded.components.seconds) + Double(loaded.components.attoseconds) * 1e-18,
                             result.promptTokens.count, result.prefillTokensPerSecond, result.tokens.count,
                             result.decodeTokensPerSecond, result.stopReason.rawValue, seed, model.backendName)
            FileHandle.standardError.write(Data(msg.utf8))
            if let s = result.speculation, let spec = options.speculative {
                FileHandle.standardError.write(Data(String(
                    format: "speculative (%@, %d draft tokens%@): %d verifications, %d of %d drafted tokens accepted (%.1f%%), %.2f tokens per verification\n",
                    spec.drafter.name, spec.draftTokens, spec.adaptive ? ", adaptive" : "", s.verifications, s.accepted,
                    s.proposed, 100 * s.acceptanceRate, s.tokensPerVerification).utf8))
            }
        }
    }
}

/// How tokens are chosen, shared by generate and chat.
struct SamplingOptions: ParsableArguments {
    @Option(help: "Sampling temperature; 0 is greedy decoding.")
    var temperature: Float = 0.8

    @Option(help: "Keep only the k most likely tokens (0: off).")
    var topK: Int = 40

    @Option(help: "Keep the smallest set of tokens whose probability reaches p (1: off).")
    var topP: Float = 0.95

    @Option(help: "Drop tokens less likely than min-p times the most likely one (0: off).")
    var minP: Float = 0.05

    @Option(help: "Penalise tokens already in the context (1: off).")
    var repeatPenalty: Float = 1.0

    @Option(help: "How many recent tokens the repetition penalty looks at (0: all).")
    var repeatLastN: Int = 64

    @Option(help: "Random seed (default: a new one each run, printed).")
    var seed: UInt64?

    @Option(name: .customLong("stop"), help: "Stop when this text is generated (repeatable).")
    var stops: [String] = []

    /// The parameters, checked; without --seed, a random seed (which callers print, so a run
    /// can be repeated).
    func parameters() throws -> SamplingParameters {
        var p = SamplingParameters()
        p.temperature = temperature
        p.topK = topK
        p.topP = topP
        p.minP = minP
        p.repetitionPenalty = repeatPenalty
        p.repetitionWindow = repeatLastN
        p.seed = seed ?? UInt64.random(in: 0..<(1 << 32))
        try p.validate()
        return p
    }
}

/// Flags that turn on speculative decoding, shared by generate and bench.
struct SpeculationOptions: ParsableArguments {
    @Option(help: "A draft model (directory or GGUF file) with the same tokenizer: it drafts on the model's device, the model verifies.")
    var draft: String?

    @Flag(help: "Draft by prompt lookup: copy what followed the latest earlier match of the last tokens.")
    var lookup = false

    @Option(help: "Longest n-gram prompt lookup matches.")
    var lookupNgram: Int = 3

    @Option(help: "Self-speculation: draft with the model itself, these layers skipped (e.g. 2,4,6).")
    var skipLayers: String?

    @Option(help: "Tokens drafted per verification pass.")
    var draftTokens: Int = 3

    @Flag(help: "Adapt the draft length to the recent acceptance.")
    var adaptive = false

    @Option(help: "Model drafters stop when their own probability of a token falls below this.")
    var draftConfidence: Float = 0

    func validate() throws {
        let chosen = [draft != nil, lookup, skipLayers != nil].filter { $0 }.count
        if chosen > 1 { throw ValidationError("choose one of --draft, --lookup and --skip-layers") }
        if draftTokens < 1 || draftTokens > 64 { throw ValidationError("--draft-tokens must be between 1 and 64") }
        if lookupNgram < 1 || lookupNgram > 16 { throw ValidationError("--lookup-ngram must be between 1 and 16") }
        if !(0...1).contains(draftConfidence) { throw ValidationError("--draft-confidence must be between 0 and 1") }
    }

    /// The drafter these flags ask for; a draft model is loaded on `backend`, the target's, so that
    /// a GPU target's drafts are not computed on the CPU.
    func make(target: LanguageModel, tokenizer: Tokenizer, backend: any ComputeBackend) throws -> SpeculativeOptions? {
        let drafter: Drafter
        if let draft {
            drafter = try ModelDrafter.load(directory: draft, target: target, tokenizer: tokenizer, backend: backend,
                                            confidenceThreshold: draftConfidence)
        } else if lookup {
            drafter = PromptLookupDrafter(maxNgram: lookupNgram)
        } else if let skipLayers {
            var layers = Set<Int>()
            for part in skipLayers.split(separator: ",") {
                guard let i = Int(part.trimmingCharacters(in: .whitespaces)) else {
                    throw PeregrineError.invalidArgument("--skip-layers takes layer numbers separated by commas, got '\(skipLayers)'")
                }
                layers.insert(i)
            }
            drafter = try ModelDrafter(model: try target.skippingLayers(layers), name: "self, skipping layers \(layers.sorted())",
                                       confidenceThreshold: draftConfidence)
        } else {
            return nil
        }
        return SpeculativeOptions(drafter: drafter, draftTokens: draftTokens, adaptive: adaptive)
    }
}

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the token ids and pieces of a text.")

    @Option(name: .shortAndLong, help: "A model directory holding tokenizer.json.")
    var model: String = Defaults.model

    @Flag(help: "Do not add the tokenizer's special tokens (BOS).")
    var noSpecial = false

    @Flag(help: "Print only the ids, space-separated.")
    var idsOnly = false

    @Argument(help: "The text to tokenize.")
    var text: String

    func run() throws {
        try reportingErrors {
            let tokenizer = try Tokenizer(directory: model)
            let ids = tokenizer.encode(text, addSpecialTokens: !noSpecial)
            if idsOnly {
                print(ids.map(String.init).joined(separator: " "))
                return
            }
            for id in ids {
                let piece = tokenizer.token(of: id) ?? "?"
                let text = tokenizer.decode([id])
                print("\(id)\t\(piece.debugDescription)\t\(text.debugDescription)")
            }
            FileHandle.standardError.write(Data("\(ids.count) tokens\n".utf8))
        }
    }
}

/// Prints a user-caused error as one line and exits non-zero.
func reportingErrors(_ body: () throws -> Void) throws {
    do {
        try body()
    } catch let e as PeregrineError {
        FileHandle.standardError.write(Data("error: \(e.description)\n".utf8))
        throw ExitCode(1)
    }
}

extension KVCacheType: ExpressibleByArgument {
    /// --kv-cache-type's help, the same for every command that takes it.
    static let optionHelp = ArgumentHelp(
        "How keys and values are stored: f32, or f16 (half the memory and the bytes attention reads; on the GPU, prompts and long contexts attend on tensor cores). Default: f16 on the GPU, f32 on the CPU.")
}

/// How the serving engine is sized: shared by the commands that run it.
struct EngineOptions: ParsableArguments {
    @Option(help: "Positions per KV block.")
    var blockSize: Int = 16

    @Option(help: "Bytes for the KV block pool (suffixes K, M, G), e.g. 2G (default: enough for the batch, at most a quarter of memory).")
    var kvMemory: String?

    @Option(help: "KV blocks in the pool (instead of --kv-memory).")
    var kvBlocks: Int?

    @Option(help: KVCacheType.optionHelp)
    var kvCacheType: KVCacheType?

    @Option(help: "Sequences running at once.")
    var maxSequences: Int = 256

    @Option(help: "Tokens per engine step (decode tokens plus prompt chunks).")
    var batchTokens: Int?

    @Flag(help: "Do not reuse the KV blocks of prompt prefixes seen before.")
    var noPrefixCache = false

    @Flag(help: "Serve the waiting requests by their priority instead of in arrival order.")
    var priority = false

    @Flag(help: "GPU: skip the warm-up pass when the engine starts (the first requests then pay for allocating scratch, loading kernels and choosing cuBLAS algorithms).")
    var noWarmup = false

    func config(contextLength: Int?) throws -> EngineConfig {
        var c = EngineConfig()
        guard blockSize >= 1, blockSize <= 1024 else { throw PeregrineError.invalidArgument("--block-size must be between 1 and 1024") }
        guard maxSequences >= 1 else { throw PeregrineError.invalidArgument("--max-sequences must be >= 1") }
        c.blockSize = blockSize
        c.maxSequences = maxSequences
        c.contextLength = contextLength
        c.prefixCaching = !noPrefixCache
        c.policy = priority ? .priority : .fcfs
        if noWarmup { c.warmUp = false }
        c.kvCacheType = kvCacheType
        if let b = batchTokens {
            guard b >= 1 else { throw PeregrineError.invalidArgument("--batch-tokens must be >= 1") }
            c.maxBatchTokens = b
        }
        if let n = kvBlocks {
            guard n >= 1 else { throw PeregrineError.invalidArgument("--kv-blocks must be >= 1") }
            c.kvBlocks = n
        }
        if let m = kvMemory { c.kvMemoryBytes = try EngineOptions.bytes(m) }
        return c
    }

    /// "2G", "512M", "1048576": a byte count.
    static func bytes(_ text: String) throws -> Int {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40]
        var digits = text.uppercased()
        var scale = 1
        if digits.hasSuffix("B") { digits.removeLast() }
        if let u = digits.last, let s = units[u] { scale = s; digits.removeLast() }
        guard let v = Double(digits), v.isFinite, v > 0, v * Double(scale) < 1e15 else {
            throw PeregrineError.invalidArgument("'\(text)' is not a size in bytes (e.g. 2G, 512M)")
        }
        return Int(v * Double(scale))
    }
}

/// The most tokens a length flag (--ctx-size, --max-tokens, bench's lengths) takes: past any
/// model's context, and small enough that sums of them and the buffers they size cannot overflow.
enum TokenCounts {
    static let limit = 1 << 24
}
