import Foundation
import Hummingbird
import Logging
import NIOCore
import Peregrine

/// The endpoints. Generation requests are decoded and checked here, run through the engine
/// (`GenerationRun`), and answered whole or as server-sent events.
final class Routes: @unchecked Sendable {
    let engine: CompletionEngine
    let tokenizer: Tokenizer
    let limits: ModelLimits
    let chatTemplate: ChatPromptRenderer?
    let configuration: ServerConfiguration
    let metrics: ServerMetrics
    let state: ServerState
    let logger: Logger
    /// The BOS a chat prompt must start with when the tokenizer adds one to plain prompts.
    let chatBOS: Int?
    let created = Int(Date().timeIntervalSince1970)

    static let endpoints = ["completions", "chat.completions"]

    init(engine: CompletionEngine, tokenizer: Tokenizer, limits: ModelLimits, chatTemplate: ChatPromptRenderer?,
         configuration: ServerConfiguration, metrics: ServerMetrics, state: ServerState, logger: Logger) {
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.chatTemplate = chatTemplate
        self.configuration = configuration
        self.metrics = metrics
        self.state = state
        self.logger = logger
        chatBOS = tokenizer.addedBOS
    }

    func register(on router: Router<ServerContext>) {
        router.get("/health") { [self] _, _ in
            json(.object(JSONObject([("status", .string(state.isDraining ? "shutting down" : "ok"))])),
                 status: state.isDraining ? .serviceUnavailable : .ok)
        }
        router.get("/v1/models") { [self] _, _ in
            json(OpenAIResponses.models(configuration.modelNames, created: created))
        }
        router.get("/metrics") { [self] _, _ in
            let text = metrics.exposition(engine: engine.stats, endpoints: Self.endpoints)
            return Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"],
                            body: .init(byteBuffer: ByteBuffer(string: text)))
        }
        router.post("/tokenize") { [self] request, _ in
            let r = try TokenizeRequest(json: try await body(request))
            let ids = tokenizer.encode(r.content, addSpecialTokens: r.addSpecial)
            return json(.object(JSONObject([("tokens", .array(ids.map { .number(Double($0)) }))])))
        }
        router.post("/detokenize") { [self] request, _ in
            let r = try DetokenizeRequest(json: try await body(request), vocabularySize: limits.vocabularySize)
            return json(.object(JSONObject([("content", .string(tokenizer.decode(r.tokens)))])))
        }
        router.post("/v1/completions") { [self] request, context in
            try await recordingFailures("completions") { try await completions(request, context) }
        }
        router.post("/v1/chat/completions") { [self] request, context in
            try await recordingFailures("chat.completions") { try await chatCompletions(request, context) }
        }
    }

    // MARK: Helpers

    func json(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "application/json"],
                 body: .init(byteBuffer: ByteBuffer(string: JSONWriter.write(value))))
    }

    /// The request body as JSON: within the size limit, valid UTF-8, well-formed.
    func body(_ request: Request) async throws -> JSONValue {
        let limit = configuration.maxBodyBytes
        if let declared = request.headers[.contentLength].flatMap({ Int($0) }), declared > limit { throw APIError.tooLarge(limit) }
        var request = request
        let buffer: ByteBuffer
        do {
            buffer = try await request.collectBody(upTo: limit)
        } catch let e as HTTPError where e.status == .contentTooLarge {
            throw APIError.tooLarge(limit)
        }
        let bytes = Array(buffer.readableBytesView)
        guard String(validating: bytes, as: UTF8.self) != nil else {
            throw APIError.invalid("The request body is not valid UTF-8.", code: "invalid_encoding")
        }
        do {
            return try JSON.parse(bytes)
        } catch let e as JSONError {
            throw APIError.invalid("The request body is not valid JSON: \(e.message) at byte \(e.offset).", code: "invalid_json")
        }
    }

    func checkModel(_ name: String?) throws {
        if let name, !configuration.modelNames.contains(name), name != configuration.modelPath { throw APIError.modelNotFound(name) }
    }

    /// Counts a request that failed before it reached the engine (or was refused by it).
    func recordingFailures(_ endpoint: String, _ body: () async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        do {
            return try await body()
        } catch let e as APIError {
            let outcome: ServerMetrics.Outcome = e.status == .serviceUnavailable ? .rejected : e.status.code >= 500 ? .serverError : .clientError
            metrics.record(endpoint: endpoint, outcome: outcome, seconds: seconds(ContinuousClock.now - start))
            throw e
        } catch {
            metrics.record(endpoint: endpoint, outcome: .serverError, seconds: seconds(ContinuousClock.now - start))
            throw error
        }
    }

    // MARK: Generation endpoints

    func completions(_ request: Request, _ context: ServerContext) async throws -> Response {
        let arrival = ContinuousClock.now
        let r = try CompletionRequest(json: try await body(request))
        try checkModel(r.sampling.model)
        let prompts: [[Int]] = r.prompts.map {
            switch $0 {
            case .text(let s): return tokenizer.encode(s, addSpecialTokens: true)
            case .tokens(let t): return t
            }
        }
        let requests = try prompts.map {
            try r.sampling.engineRequest(prompt: $0, defaultMaxTokens: 16, limits: limits, promptParam: "prompt")
        }
        let echo: [String]? = r.echo ? r.prompts.map {
            switch $0 {
            case .text(let s): return s
            case .tokens(let t): return tokenizer.decode(t)
            }
        } : nil
        let job = Job(endpoint: "completions", idPrefix: "cmpl-", chat: false, sampling: r.sampling, requests: requests, echo: echo,
                      arrival: arrival)
        return try await run(job, context)
    }

    func chatCompletions(_ request: Request, _ context: ServerContext) async throws -> Response {
        let arrival = ContinuousClock.now
        let r = try ChatRequest(json: try await body(request))
        try checkModel(r.sampling.model)
        guard let template = chatTemplate else {
            throw APIError.invalid("This model has no chat template: start the server with --chat-template FILE, or use /v1/completions.",
                                   param: "messages", code: "no_chat_template")
        }
        let text: String
        do {
            text = try template.render(messages: r.messages, tools: r.tools, addGenerationPrompt: r.addGenerationPrompt,
                                       extra: r.templateArguments)
        } catch {
            throw APIError.invalid("The chat template could not render these messages: \(error)", param: "messages",
                                   code: "chat_template_error")
        }
        let prompt = tokenizer.encodeChatPrompt(text, bos: chatBOS)
        let engineRequest = try r.sampling.engineRequest(prompt: prompt, defaultMaxTokens: nil, limits: limits, promptParam: "messages")
        let job = Job(endpoint: "chat.completions", idPrefix: "chatcmpl-", chat: true, sampling: r.sampling, requests: [engineRequest],
                      echo: nil, arrival: arrival)
        return try await run(job, context)
    }

    /// A decoded generation request, ready for the engine.
    struct Job: Sendable {
        var endpoint: String
        var idPrefix: String
        var chat: Bool
        var sampling: SamplingRequest
        var requests: [EngineRequest]
        var echo: [String]?
        var arrival: ContinuousClock.Instant

        var choiceCount: Int { requests.count * sampling.n }
        func choice(_ e: GenerationRun.Event) -> Int { e.prompt * sampling.n + e.output.index }
    }

    func start(_ job: Job) throws -> GenerationRun {
        try state.admit {
            do {
                return try GenerationRun(engine: engine, requests: job.requests)
            } catch let e as PeregrineError {
                // The engine refuses what the server's own checks let through only at its limits.
                throw APIError.invalid("The engine refused the request: \(e.description)", code: "invalid_request")
            }
        }
    }

    func run(_ job: Job, _ context: ServerContext) async throws -> Response {
        let run = try start(job)
        metrics.countTokens(prompt: job.requests.reduce(0) { $0 + $1.promptTokens.count }, generated: 0)
        let id = job.idPrefix + UUID().uuidString.replacingOccurrences(of: "-", with: "").lowercased()
        if job.sampling.stream {
            return Response(status: .ok, headers: SSE.headers, body: ResponseBody { [self] writer in
                try await self.stream(job, run: run, id: id, context: context, writer: &writer)
            })
        }
        defer { state.finish(run) }
        var acc = Accumulator(job: job, tokenizer: tokenizer)
        var timer = TokenTimer(arrival: job.arrival)
        let notes = context.notes
        do {
            try await DisconnectWatcher.watching(context.channel, onDisconnect: { run.cancel(.disconnected); notes.markDisconnected() }) {
                for try await e in run.outputs {
                    timer.observe(e, metrics: metrics)
                    acc.add(e)
                }
            }
        } catch {
            run.cancel(.disconnected)
            logger.error("generation failed: \(error)")
            throw APIError.server("Generation failed: \(error)")
        }
        acc.finishLogprobs()
        metrics.countTokens(prompt: 0, generated: acc.usage.completionTokens)
        notes.tokens(prompt: acc.usage.promptTokens, completion: acc.usage.completionTokens)
        let elapsed = seconds(ContinuousClock.now - job.arrival)
        switch run.cancelReason {
        case .shutdown?:
            metrics.record(endpoint: job.endpoint, outcome: .cancelled, seconds: elapsed)
            throw APIError.shuttingDown
        case .disconnected?:
            // Nobody is left to read an answer.
            metrics.record(endpoint: job.endpoint, outcome: .cancelled, seconds: elapsed)
            return Response(status: .noContent)
        case nil:
            metrics.record(endpoint: job.endpoint, outcome: .success, seconds: elapsed)
        }
        let created = Int(Date().timeIntervalSince1970)
        let model = configuration.modelNames[0]
        return json(job.chat
            ? OpenAIResponses.chatCompletion(id: id, created: created, model: model, choices: acc.choices, usage: acc.usage)
            : OpenAIResponses.completion(id: id, created: created, model: model, choices: acc.choices, usage: acc.usage))
    }

    /// Writes a run as server-sent events. A failed write means the client is gone: the run is
    /// cancelled and the error ends the response.
    func stream(_ job: Job, run: GenerationRun, id: String, context: ServerContext, writer: inout any ResponseBodyWriter) async throws {
        defer { state.finish(run) }
        let created = Int(Date().timeIntervalSince1970)
        let model = configuration.modelNames[0]
        let withUsage = job.sampling.includeUsage
        let notes = context.notes
        var acc = Accumulator(job: job, tokenizer: tokenizer)
        var timer = TokenTimer(arrival: job.arrival)
        var outcome = ServerMetrics.Outcome.success
        defer {
            metrics.countTokens(prompt: 0, generated: acc.usage.completionTokens)
            notes.tokens(prompt: acc.usage.promptTokens, completion: acc.usage.completionTokens)
            metrics.record(endpoint: job.endpoint, outcome: outcome, seconds: seconds(ContinuousClock.now - job.arrival))
        }
        func chunk(_ index: Int, text: String?, role: Bool = false, logprobs: JSONValue?, finish: String?) -> JSONValue {
            if job.chat {
                var delta = JSONObject()
                if role { delta["role"] = .string("assistant") }
                if let text { delta["content"] = .string(text) }
                return OpenAIResponses.chatChunk(id: id, created: created, model: model, index: index, delta: .object(delta),
                                                 logprobs: logprobs, finishReason: finish, withUsageField: withUsage)
            }
            return OpenAIResponses.completionChunk(id: id, created: created, model: model, index: index, text: text ?? "",
                                                   logprobs: logprobs, finishReason: finish, withUsageField: withUsage)
        }
        // Writes fail only when the client is gone; that is told apart from an engine failure.
        func send(_ buffer: ByteBuffer) async throws {
            do {
                try await writer.write(buffer)
            } catch {
                throw GenerationError(underlying: error)
            }
        }
        do {
            try await DisconnectWatcher.watching(context.channel, onDisconnect: { run.cancel(.disconnected); notes.markDisconnected() }) {
                // With prompt logprobs, a choice's echo waits for its first output, which has them.
                let scored = job.sampling.promptLogprobs != nil
                var echoPending = [Bool](repeating: job.echo != nil && scored, count: job.choiceCount)
                for i in 0..<job.choiceCount {
                    if job.chat {
                        try await send(SSE.event(chunk(i, text: "", role: true, logprobs: nil, finish: nil)))
                    } else if let echo = job.echo, !scored {
                        try await send(SSE.event(chunk(i, text: echo[i / job.sampling.n], logprobs: nil, finish: nil)))
                    }
                }
                for try await e in run.outputs {
                    timer.observe(e, metrics: metrics)
                    let i = job.choice(e)
                    if i >= 0 && i < echoPending.count && echoPending[i], let echo = job.echo {
                        echoPending[i] = false
                        try await send(SSE.event(chunk(i, text: echo[e.prompt], logprobs: acc.promptLogprobs(for: e)?.json, finish: nil)))
                    }
                    let logprobs = acc.logprobs(for: e)
                    acc.add(e)
                    let finish = e.output.finishReason.flatMap(Accumulator.finishName)
                    if job.chat {
                        if !e.output.text.isEmpty || logprobs != nil {
                            try await send(SSE.event(chunk(i, text: e.output.text, logprobs: logprobs, finish: nil)))
                        }
                        if let finish { try await send(SSE.event(chunk(i, text: nil, logprobs: nil, finish: finish))) }
                    } else if !e.output.text.isEmpty || logprobs != nil || finish != nil {
                        try await send(SSE.event(chunk(i, text: e.output.text, logprobs: logprobs, finish: finish)))
                    }
                }
            }
        } catch let e as GenerationError {
            run.cancel(.disconnected)
            notes.markDisconnected()
            outcome = .cancelled
            throw e.underlying
        } catch {
            // The engine failed (writes to a closed connection are rethrown above).
            run.cancel(.disconnected)
            outcome = .serverError
            logger.error("generation failed: \(error)")
            try await writer.write(SSE.event(APIError.server("Generation failed: \(error)").json))
            try await writer.write(SSE.done)
            try await writer.finish(nil)
            return
        }
        switch run.cancelReason {
        case .disconnected?:
            outcome = .cancelled
            return
        case .shutdown?:
            outcome = .cancelled
            try await writer.write(SSE.event(APIError.shuttingDown.json))
        case nil:
            if withUsage {
                try await writer.write(SSE.event(OpenAIResponses.usageChunk(
                    id: id, object: job.chat ? "chat.completion.chunk" : "text_completion", created: created, model: model, usage: acc.usage)))
            }
        }
        try await writer.write(SSE.done)
        try await writer.finish(nil)
    }
}

/// A write to the client failed.
struct GenerationError: Error {
    var underlying: Error
}

/// Collects outputs into choices and usage.
struct Accumulator {
    let job: Routes.Job
    let tokenizer: Tokenizer
    var choices: [ChoiceResult]
    var usage = Usage()
    private var logprobEntries: [[TokenLogprob]]
    private var promptEntries: [[TokenLogprob]?]
    private var textOffsets: [Int]
    private var cached: [Int]

    init(job: Routes.Job, tokenizer: Tokenizer) {
        self.job = job
        self.tokenizer = tokenizer
        let n = job.choiceCount
        choices = (0..<n).map { ChoiceResult(index: $0) }
        logprobEntries = Array(repeating: [], count: n)
        promptEntries = Array(repeating: nil, count: n)
        cached = Array(repeating: 0, count: job.requests.count)
        textOffsets = Array(repeating: 0, count: n)
        usage.promptTokens = job.requests.reduce(0) { $0 + $1.promptTokens.count }
        if let echo = job.echo {
            for i in 0..<n {
                choices[i].text = echo[i / job.sampling.n]
                textOffsets[i] = choices[i].text.unicodeScalars.count
            }
        }
    }

    static func finishName(_ r: FinishReason) -> String? {
        switch r {
        case .stop: return "stop"
        case .length: return "length"
        case .cancelled: return nil
        }
    }

    mutating func add(_ e: GenerationRun.Event) {
        let i = job.choice(e)
        guard i >= 0 && i < choices.count else { return }
        choices[i].text += e.output.text
        usage.completionTokens += e.output.tokens.count
        if e.output.cachedPromptTokens > cached[e.prompt] {
            usage.cachedPromptTokens += e.output.cachedPromptTokens - cached[e.prompt]
            cached[e.prompt] = e.output.cachedPromptTokens
        }
        if job.sampling.logprobs != nil { logprobEntries[i] += e.output.logprobs }
        if let p = e.output.promptLogprobs { promptEntries[i] = p }
        if let r = e.output.finishReason { choices[i].finishReason = Self.finishName(r) }
    }

    /// Sets each choice's logprobs object once all its tokens are in.
    mutating func finishLogprobs() {
        guard job.sampling.logprobs != nil else { return }
        for i in choices.indices {
            let prompt = i / job.sampling.n
            if job.chat {
                choices[i].logprobs = OpenAIResponses.chatLogprobs(logprobEntries[i], tokenizer: tokenizer)
                continue
            }
            var offset = job.echo.map { $0[prompt].unicodeScalars.count } ?? 0
            var parts = promptLogprobs(prompt: prompt, entries: promptEntries[i]) ?? CompletionLogprobs()
            parts.append(logprobEntries[i], tokenizer: tokenizer, textOffset: &offset)
            choices[i].logprobs = parts.json
        }
    }

    /// The echoed prompt's logprobs of an output that carries them (nil otherwise).
    func promptLogprobs(for e: GenerationRun.Event) -> CompletionLogprobs? {
        promptLogprobs(prompt: e.prompt, entries: e.output.promptLogprobs)
    }

    private func promptLogprobs(prompt: Int, entries: [TokenLogprob]?) -> CompletionLogprobs? {
        guard let entries, let echo = job.echo, prompt < echo.count else { return nil }
        return OpenAIResponses.promptLogprobs(job.requests[prompt].promptTokens, entries, echo: echo[prompt], tokenizer: tokenizer)
    }

    /// The logprobs object of one streamed output (nil when none were asked for).
    mutating func logprobs(for e: GenerationRun.Event) -> JSONValue? {
        guard job.sampling.logprobs != nil, !e.output.logprobs.isEmpty else { return nil }
        let i = job.choice(e)
        guard i >= 0 && i < choices.count else { return nil }
        if job.chat { return OpenAIResponses.chatLogprobs(e.output.logprobs, tokenizer: tokenizer) }
        return OpenAIResponses.completionLogprobs(e.output.logprobs, tokenizer: tokenizer, textOffset: &textOffsets[i])
    }
}
