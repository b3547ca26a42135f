import Foundation
import Logging
import Peregrine
@testable import PeregrineServer
import XCTest

/// A server on an ephemeral loopback port, serving the shipped model through the real engine.
final class TestServer: @unchecked Sendable {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path
    static let modelPath = repo + "/models/target"
    static let chatTemplatePath = repo + "/Tests/Fixtures/server/chatml.jinja"

    static let model: Result<LanguageModel, Error> = Result { try ModelRegistry.load(directory: modelPath) }
    static let tokenizer: Result<Tokenizer, Error> = Result { try Tokenizer(directory: modelPath) }

    let engine: Engine
    let server: OpenAIServer
    let port: Int
    let tokenizer: Tokenizer
    private let task: Task<Void, Error>

    var client: TestClient { TestClient(port: port, apiKey: server.configuration.apiKey) }

    private init(engine: Engine, server: OpenAIServer, port: Int, tokenizer: Tokenizer, task: Task<Void, Error>) {
        self.engine = engine
        self.server = server
        self.port = port
        self.tokenizer = tokenizer
        self.task = task
    }

    static func start(chatTemplate: Bool = true, configure: (inout ServerConfiguration) -> Void = { _ in },
                      engineConfig: (inout EngineConfig) -> Void = { _ in }) async throws -> TestServer {
        let model = try Self.model.get(), tokenizer = try Self.tokenizer.get()
        var ec = EngineConfig()
        ec.maxSequences = 16
        engineConfig(&ec)
        let engine = try Engine(model: model, tokenizer: tokenizer, config: ec)
        var config = ServerConfiguration(modelNames: ["target"], modelPath: modelPath)
        config.port = 0
        config.maxRunning = ec.maxSequences
        config.shutdownGracePeriod = .seconds(5)
        configure(&config)
        let template = chatTemplate ? try ChatTemplates.load(model: modelPath, file: chatTemplatePath, tokenizer: tokenizer) : nil
        var logger = Logger(label: "peregrine-test")
        logger.logLevel = .warning
        let server = OpenAIServer(engine: engine, tokenizer: tokenizer, vocabularySize: model.config.vocabSize,
                                  contextLength: engine.contextLength, chatTemplate: template, configuration: config, logger: logger)
        let (ports, continuation) = AsyncStream<Int>.makeStream()
        let task = Task { try await server.run(onListening: { continuation.yield($0) }) }
        var iterator = ports.makeAsyncIterator()
        guard let port = await iterator.next(), port > 0 else { throw TestClientError.io("the server did not start") }
        return TestServer(engine: engine, server: server, port: port, tokenizer: tokenizer, task: task)
    }

    func stop() async throws {
        server.shutdown()
        try await task.value
        engine.shutdown()
    }

    /// Waits until the engine holds no sequence and no KV block (a cancelled request is freed
    /// when the engine's current step ends).
    func waitUntilIdle(seconds: Double = 20) async throws -> EngineStats {
        let deadline = Date().addingTimeInterval(seconds)
        var s = engine.stats
        while Date() < deadline {
            s = engine.stats
            if s.running == 0 && s.waiting == 0 && s.kvBlocksUsed == 0 && server.activeRequests == 0 { return s }
            try await Task.sleep(for: .milliseconds(20))
        }
        return s
    }
}

/// One server for the tests that need no special configuration.
actor SharedServer {
    static let instance = SharedServer()
    private var server: TestServer?

    func get() async throws -> TestServer {
        if let server { return server }
        let s = try await TestServer.start()
        server = s
        return s
    }
}
