import ArgumentParser
import Foundation
import Logging
import Peregrine
import PeregrineServer

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve one model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, ...).")

    @Option(name: .shortAndLong, help: "A Hugging Face model directory or a GGUF file.")
    var model: String = Defaults.model

    @Option(help: "Address to listen on (loopback by default; 0.0.0.0 for every interface).")
    var host = "127.0.0.1"

    @Option(help: "Port to listen on (0: any free port, printed at start).")
    var port = 8080

    @Option(help: "Require 'Authorization: Bearer KEY' on every route but /health (default: $PEREGRINE_API_KEY, if set).")
    var apiKey: String?

    @Option(help: "Where the model runs: cpu or cuda.")
    var device: Device = .cpu

    @Flag(help: "GPU: batch-invariant kernels, so a request's output does not depend on the others running (slower); the CPU always is.")
    var deterministic = false

    @Option(name: [.customShort("c"), .long], help: "Context length: prompt plus completion of one request (default: the model's).")
    var ctxSize: Int?

    @Option(help: "Requests allowed to wait beyond those running; more get 503.")
    var maxQueue = 64

    @Option(help: "Requests generated at once (the engine's batch of sequences).")
    var maxSequences = 16

    @Option(help: "Tokens per engine step: decode tokens plus prompt chunks (default: 512 on the CPU, 8192 on a GPU). Smaller cuts the inter-token stalls new prompts cause; larger reads prompts faster.")
    var batchTokens: Int?

    @Option(help: "The model's name in /v1/models and in requests (default: the model path's last component).")
    var servedModelName: String?

    @Option(help: "A Jinja chat template file, used instead of the model's own.")
    var chatTemplate: String?

    @Option(name: .shortAndLong, help: "Worker threads (default: all cores).")
    var threads: Int?

    @Option(help: "Bytes for the KV cache (K, M and G suffixes allowed; default: enough for the batch, at most a quarter of memory).")
    var kvMemory: String?

    @Option(help: KVCacheType.optionHelp)
    var kvCacheType: KVCacheType?

    @Option(help: "Largest request body accepted, in bytes; larger ones get 413.")
    var maxBodyBytes = 8 << 20

    @Option(help: "Seconds a shutdown lets running requests finish before cancelling them.")
    var shutdownTimeout: Double = 30

    func validate() throws {
        if let t = threads, t < 1 || t > 1024 { throw ValidationError("--threads must be between 1 and 1024") }
        if let b = batchTokens, b < 1 { throw ValidationError("--batch-tokens must be >= 1") }
        if !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535") }
        if let c = ctxSize, c < 2 || c > TokenCounts.limit { throw ValidationError("--ctx-size must be between 2 and \(TokenCounts.limit)") }
        if maxQueue < 0 { throw ValidationError("--max-queue must be >= 0") }
        if maxSequences < 1 || maxSequences > 4096 { throw ValidationError("--max-sequences must be between 1 and 4096") }
        if maxBodyBytes < 1024 { throw ValidationError("--max-body-bytes must be >= 1024") }
        if !(shutdownTimeout >= 0 && shutdownTimeout <= 86_400) { throw ValidationError("--shutdown-timeout must be between 0 and 86400 seconds") }
        if let k = kvMemory, Self.bytes(k) == nil { throw ValidationError("--kv-memory takes a byte count such as 268435456 or 256M") }
        if let name = servedModelName, name.isEmpty { throw ValidationError("--served-model-name must not be empty") }
    }

    /// "256M" -> 268435456.
    static func bytes(_ s: String) -> Int? {
        let units: [Character: Int] = ["K": 1 << 10, "M": 1 << 20, "G": 1 << 30]
        var text = s.uppercased()
        if text.hasSuffix("B") { text.removeLast() }
        var scale = 1
        if let u = text.last, let m = units[u] { scale = m; text.removeLast() }
        guard let n = Int(text), n > 0, n <= Int.max / scale else { return nil }
        return n * scale
    }

    func run() throws {
        try reportingErrors {
            LoggingSystem.bootstrap { label in
                var h = StreamLogHandler.standardError(label: label)
                h.logLevel = .info
                return h
            }
            let logger = Logger(label: "peregrine")
            let loaded = try device.load(model, threads: threads, deterministic: deterministic)
            let tokenizer = try Tokenizer(directory: model)
            var config = EngineConfig()
            config.contextLength = ctxSize
            config.maxSequences = maxSequences
            config.maxBatchTokens = batchTokens
            config.kvMemoryBytes = kvMemory.flatMap(Self.bytes)
            config.kvCacheType = kvCacheType
            let engine = try Engine(model: loaded, tokenizer: tokenizer, config: config)
            let template = try ChatTemplates.load(model: model, file: chatTemplate, tokenizer: tokenizer)

            let name = servedModelName ?? URL(fileURLWithPath: model).lastPathComponent
            var serverConfig = ServerConfiguration(modelNames: [name], modelPath: model)
            serverConfig.host = host
            serverConfig.port = port
            serverConfig.apiKey = apiKey ?? ProcessInfo.processInfo.environment["PEREGRINE_API_KEY"].flatMap { $0.isEmpty ? nil : $0 }
            serverConfig.maxQueue = maxQueue
            serverConfig.maxRunning = maxSequences
            serverConfig.maxBodyBytes = maxBodyBytes
            serverConfig.shutdownGracePeriod = .milliseconds(Int(shutdownTimeout * 1000))
            let server = OpenAIServer(engine: engine, tokenizer: tokenizer, vocabularySize: loaded.config.vocabSize,
                                      contextLength: engine.contextLength, chatTemplate: template, configuration: serverConfig,
                                      logger: logger)
            logger.info("model \(model) as '\(name)' on \(loaded.backendName), context \(engine.contextLength), \(engine.stats.kvBlocksTotal) \(engine.kvCacheType.rawValue.uppercased()) KV blocks of \(config.blockSize), chat template: \(template == nil ? "none" : "yes")")

            // SIGINT/SIGTERM start a graceful shutdown; a second one cancels what is still running.
            var sources: [DispatchSourceSignal] = []
            for sig in [SIGINT, SIGTERM] {
                signal(sig, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: sig, queue: .global())
                source.setEventHandler { server.shutdown() }
                source.resume()
                sources.append(source)
            }
            let done = DispatchSemaphore(value: 0)
            let failure = FailureBox()
            let host = self.host
            Task {
                do {
                    try await server.run(onListening: { port in logger.info("listening on http://\(host):\(port)") })
                } catch {
                    failure.error = error
                }
                done.signal()
            }
            done.wait()
            engine.shutdown()
            withExtendedLifetime(sources) {}
            if let e = failure.error { throw PeregrineError.io("the server stopped: \(e)") }
            logger.info("stopped")
        }
    }
}

private final class FailureBox: @unchecked Sendable {
    var error: Error?
}
