import Foundation
import Hummingbird
import Logging
import NIOCore
import Peregrine
import ServiceLifecycle

/// How the server listens and what it allows.
public struct ServerConfiguration: Sendable {
    /// Loopback only unless told otherwise.
    public var host = "127.0.0.1"
    /// 0 picks a free port (reported by `run`'s `onListening`).
    public var port = 8080
    /// When set, every route but /health wants `Authorization: Bearer KEY`.
    public var apiKey: String?
    /// Generation requests allowed to wait beyond those the engine runs at once.
    public var maxQueue = 64
    /// Generation requests the engine runs at once (its batch).
    public var maxRunning = 8
    /// The names /v1/models lists and requests may give as `model`; the first is the one answered.
    public var modelNames: [String]
    /// The path the model was loaded from, also accepted as a model name.
    public var modelPath: String
    public var maxBodyBytes = 8 << 20
    /// How long a shutdown lets running requests finish before cancelling them.
    public var shutdownGracePeriod: Duration = .seconds(30)

    public init(modelNames: [String], modelPath: String) {
        self.modelNames = modelNames.isEmpty ? ["model"] : modelNames
        self.modelPath = modelPath
    }
}

/// The OpenAI-compatible server: one model, one engine, Hummingbird for HTTP.
public final class OpenAIServer: @unchecked Sendable {
    public let configuration: ServerConfiguration
    public let metrics = ServerMetrics()
    let state: ServerState
    let routes: Routes
    let logger: Logger
    private let lock = NSLock()
    private var group: ServiceGroup?
    private var shutdownRequests = 0

    /// - Parameters:
    ///   - contextLength: the longest prompt plus completion a request may ask for.
    ///   - chatTemplate: renders /v1/chat/completions' messages; without one, chat requests get a 400.
    public init(engine: CompletionEngine, tokenizer: Tokenizer, vocabularySize: Int, contextLength: Int,
                chatTemplate: ChatPromptRenderer?, configuration: ServerConfiguration, logger: Logger) {
        self.configuration = configuration
        self.logger = logger
        state = ServerState(admissionLimit: max(1, configuration.maxRunning) + max(0, configuration.maxQueue))
        routes = Routes(engine: engine, tokenizer: tokenizer, limits: ModelLimits(vocabularySize: vocabularySize, contextLength: contextLength,
                                                                       maxSamples: max(1, configuration.maxRunning)),
                        chatTemplate: chatTemplate, configuration: configuration, metrics: metrics, state: state, logger: logger)
    }

    func makeRouter() -> Router<ServerContext> {
        let router = Router(context: ServerContext.self)
        router.add(middleware: AccessLogMiddleware(logger: logger))
        router.add(middleware: ErrorMiddleware(logger: logger))
        if let key = configuration.apiKey { router.add(middleware: AuthMiddleware(key: Array(key.utf8))) }
        routes.register(on: router)
        return router
    }

    /// Serves until `shutdown()` has drained the requests in flight. `onListening` gets the bound port.
    public func run(onListening: @escaping @Sendable (Int) -> Void = { _ in }) async throws {
        var accessLogger = logger
        accessLogger.logLevel = .warning  // Hummingbird's own per-request logs; the access log is ours
        let app = Application(
            router: makeRouter(),
            configuration: .init(address: .hostname(configuration.host, port: configuration.port), serverName: "peregrine"),
            onServerRunning: { channel in onListening(channel.localAddress?.port ?? 0) },
            logger: accessLogger)
        let group = ServiceGroup(configuration: .init(services: [app], gracefulShutdownSignals: [], cancellationSignals: [], logger: logger))
        let early = lock.withLock {
            self.group = group
            return shutdownRequests > 0
        }
        if early { await group.triggerGracefulShutdown() }
        try await group.run()
    }

    /// Stops accepting connections and lets running requests finish, cancelling those still running
    /// after the grace period; a second call cancels them at once. `run` returns when all are done.
    public func shutdown() {
        lock.lock()
        shutdownRequests += 1
        let n = shutdownRequests
        let group = self.group
        lock.unlock()
        state.beginDraining()
        if n == 1 {
            logger.info("shutting down: finishing \(state.activeCount) running request(s)")
            if let group { Task { await group.triggerGracefulShutdown() } }
            let grace = configuration.shutdownGracePeriod
            Task { [state] in
                try? await Task.sleep(for: grace)
                state.cancelAll()
            }
        } else {
            state.cancelAll()
        }
    }

    /// Requests in the engine now.
    public var activeRequests: Int { state.activeCount }
}
