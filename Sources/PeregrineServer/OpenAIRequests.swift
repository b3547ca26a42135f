import Peregrine

/// Parameters shared by /v1/completions and /v1/chat/completions, decoded and range-checked.
/// Defaults follow vLLM's OpenAI server: temperature 1, top_p 1, no top-k or min-p, no
/// penalties, one choice. A missing max_tokens is 16 for completions (OpenAI's legacy default)
/// and whatever the context leaves after the prompt for chat.
struct SamplingRequest: Sendable {
    var model: String?
    var maxTokens: Int?
    var temperature: Float = 1
    var topP: Float = 1
    var topK = 0
    var minP: Float = 0
    var repetitionPenalty: Float = 1
    var presencePenalty: Float = 0
    var frequencyPenalty: Float = 0
    var seed: UInt64?
    var stop: [String] = []
    var stopTokenIds: [Int] = []
    var n = 1
    var logitBias: [Int: Float] = [:]
    var ignoreEOS = false
    var stream = false
    var includeUsage = false
    /// nil: no logprobs; k: the chosen token's plus the k most likely.
    var logprobs: Int?
    /// nil: none; k: the prompt tokens' logprobs too (completions' echo with logprobs).
    var promptLogprobs: Int?

    static let maxChoices = 64
    static let maxStops = 16
    static let maxTopLogprobs = 20

    /// Reads everything but the prompt and the logprobs, whose shapes differ between endpoints.
    /// `zeroTokens`: a max_tokens of 0 is allowed (completions' echo, which answers the prompt).
    init(_ p: RequestParameters, maxTokensKeys: [String], zeroTokens: Bool = false) throws {
        model = try p.string("model")
        for key in maxTokensKeys {
            if let m = try p.int(key, in: (zeroTokens ? 0 : 1)...Int(Int32.max)) { maxTokens = m }
        }
        temperature = try p.float("temperature", in: 0...2) ?? 1
        topP = try p.float("top_p", in: 0...1, openBelow: true) ?? 1
        // vLLM takes -1 (and 0) for "no top-k".
        topK = max(0, try p.int("top_k", in: -1...Int(Int32.max)) ?? 0)
        minP = try p.float("min_p", in: 0...1, openAbove: true) ?? 0
        repetitionPenalty = try p.float("repetition_penalty", in: 0...10, openBelow: true) ?? 1
        presencePenalty = try p.float("presence_penalty", in: -2...2) ?? 0
        frequencyPenalty = try p.float("frequency_penalty", in: -2...2) ?? 0
        if let s = try p.int("seed", in: -9_000_000_000_000_000...9_000_000_000_000_000) { seed = UInt64(bitPattern: Int64(s)) }
        stop = (try p.strings("stop", maxCount: Self.maxStops) ?? []).filter { !$0.isEmpty }
        stopTokenIds = try p.ints("stop_token_ids", maxCount: 1024, in: 0...Int(Int32.max)) ?? []
        n = try p.int("n", in: 1...Self.maxChoices) ?? 1
        if let bestOf = try p.int("best_of", in: 1...Self.maxChoices), bestOf != n {
            throw APIError.invalid("'best_of' other than n is not supported", param: "best_of", code: "unsupported_parameter")
        }
        ignoreEOS = try p.bool("ignore_eos") ?? false
        stream = try p.bool("stream") ?? false
        if let options = p.value("stream_options") {
            guard stream else {
                throw APIError.invalid("'stream_options' is only allowed when 'stream' is true", param: "stream_options")
            }
            let o = try RequestParameters(options)
            guard options.object != nil else { throw APIError.wrongType("stream_options", "an object") }
            includeUsage = try o.bool("include_usage") ?? false
        }
        if let bias = p.value("logit_bias") {
            guard let o = bias.object else { throw APIError.wrongType("logit_bias", "an object mapping token ids to biases") }
            guard o.count <= 4096 else { throw APIError.outOfRange("logit_bias", "an object of at most 4096 entries") }
            for (key, value) in o.pairs {
                guard let id = Int(key), id >= 0 else {
                    throw APIError.invalid("'logit_bias' keys must be token ids (got '\(key)')", param: "logit_bias", code: "invalid_value")
                }
                guard let b = value.double, b.isFinite else { throw APIError.wrongType("logit_bias", "an object whose values are numbers") }
                guard b >= -100, b <= 100 else { throw APIError.outOfRange("logit_bias", "an object whose values lie between -100 and 100") }
                logitBias[id] = Float(b)
            }
        }
    }

    /// The engine's request for one prompt, checked against the model (vocabulary, context).
    func engineRequest(prompt: [Int], defaultMaxTokens: Int?, limits: ModelLimits, promptParam: String) throws -> EngineRequest {
        guard !prompt.isEmpty else { throw APIError.invalid("The prompt is empty.", param: promptParam) }
        guard n <= limits.maxSamples else { throw APIError.outOfRange("n", "at most \(limits.maxSamples) on this server") }
        if let bad = prompt.first(where: { $0 < 0 || $0 >= limits.vocabularySize }) {
            throw APIError.invalid("Token id \(bad) is outside the model's vocabulary of \(limits.vocabularySize).", param: promptParam,
                                   code: "invalid_value")
        }
        for id in logitBias.keys where id >= limits.vocabularySize {
            throw APIError.invalid("'logit_bias' names token \(id), outside the vocabulary of \(limits.vocabularySize).",
                                   param: "logit_bias", code: "invalid_value")
        }
        for id in stopTokenIds where id >= limits.vocabularySize {
            throw APIError.invalid("'stop_token_ids' names token \(id), outside the vocabulary of \(limits.vocabularySize).",
                                   param: "stop_token_ids", code: "invalid_value")
        }
        let context = limits.contextLength
        guard prompt.count < context else {
            throw APIError.invalid("This model's maximum context length is \(context) tokens, but the prompt is \(prompt.count) tokens.",
                                   param: promptParam, code: "context_length_exceeded")
        }
        let maxTokens = maxTokens ?? defaultMaxTokens ?? (context - prompt.count)
        guard prompt.count + maxTokens <= context else {
            throw APIError.invalid(
                "This model's maximum context length is \(context) tokens. However, you requested \(prompt.count + maxTokens) tokens (\(prompt.count) in the prompt, \(maxTokens) for the completion). Please reduce the prompt or max_tokens.",
                param: "max_tokens", code: "context_length_exceeded")
        }
        var r = EngineRequest(promptTokens: prompt, maxTokens: maxTokens)
        var s = SamplingParameters()
        s.temperature = temperature
        s.topP = topP
        s.topK = topK
        s.minP = minP
        s.repetitionPenalty = repetitionPenalty
        s.repetitionWindow = 0
        s.seed = seed ?? UInt64.random(in: 0...UInt64.max)
        r.sampling = s
        r.presencePenalty = presencePenalty
        r.frequencyPenalty = frequencyPenalty
        r.logitBias = logitBias
        r.stopStrings = stop
        r.stopTokenIds = stopTokenIds
        r.ignoreEOS = ignoreEOS
        r.n = n
        r.logprobs = logprobs
        r.promptLogprobs = promptLogprobs
        return r
    }
}

/// What requests are checked against.
struct ModelLimits: Sendable {
    var vocabularySize: Int
    var contextLength: Int
    /// Most samples of one prompt (the engine runs them side by side).
    var maxSamples = SamplingRequest.maxChoices
}

/// A prompt as the client sent it.
enum PromptInput: Sendable, Equatable {
    case text(String)
    case tokens([Int])
}

/// POST /v1/completions.
struct CompletionRequest: Sendable {
    var sampling: SamplingRequest
    var prompts: [PromptInput]
    var echo = false

    static let maxPrompts = 64

    init(json: JSONValue) throws {
        let p = try RequestParameters(json)
        echo = try p.bool("echo") ?? false
        // With echo, max_tokens 0 answers the prompt alone (with logprobs: scores it).
        sampling = try SamplingRequest(p, maxTokensKeys: ["max_tokens"], zeroTokens: echo)
        sampling.logprobs = try p.int("logprobs", in: 0...SamplingRequest.maxTopLogprobs)
        if echo { sampling.promptLogprobs = sampling.logprobs }
        if p.value("suffix") != nil {
            throw APIError.invalid("'suffix' is not supported", param: "suffix", code: "unsupported_parameter")
        }
        prompts = try Self.prompts(p.value("prompt"))
        guard prompts.count * sampling.n <= SamplingRequest.maxChoices * 4 else {
            throw APIError.outOfRange("n", "such that prompts x n is at most \(SamplingRequest.maxChoices * 4)")
        }
    }

    /// A string, a list of strings, a list of token ids, or a list of token-id lists.
    static func prompts(_ value: JSONValue?) throws -> [PromptInput] {
        let expected = "a string, a list of strings, a list of token ids or a list of token-id lists"
        guard let value else { throw APIError.invalid("'prompt' is required", param: "prompt", code: "missing_parameter") }
        if let s = value.string { return [.text(s)] }
        guard let items = value.array else { throw APIError.wrongType("prompt", expected) }
        guard !items.isEmpty else { throw APIError.invalid("'prompt' is an empty list", param: "prompt") }
        switch items[0] {
        case .string:
            guard items.count <= maxPrompts else { throw APIError.outOfRange("prompt", "a list of at most \(maxPrompts) prompts") }
            return try items.map {
                guard let s = $0.string else { throw APIError.wrongType("prompt", expected) }
                return .text(s)
            }
        case .number:
            return [.tokens(try tokenList(items, expected))]
        case .array:
            guard items.count <= maxPrompts else { throw APIError.outOfRange("prompt", "a list of at most \(maxPrompts) prompts") }
            return try items.map {
                guard let a = $0.array else { throw APIError.wrongType("prompt", expected) }
                return .tokens(try tokenList(a, expected))
            }
        default:
            throw APIError.wrongType("prompt", expected)
        }
    }

    static func tokenList(_ items: [JSONValue], _ expected: String) throws -> [Int] {
        try items.map {
            guard $0.double != nil else { throw APIError.wrongType("prompt", expected) }
            return try RequestParameters.int($0, "prompt", in: 0...Int(Int32.max))
        }
    }
}

/// POST /v1/chat/completions.
struct ChatRequest: Sendable {
    var sampling: SamplingRequest
    /// Messages with their content made plain text, as chat templates expect.
    var messages: [JSONValue]
    var tools: [JSONValue]?
    var addGenerationPrompt = true
    var templateArguments: [String: JSONValue] = [:]

    static let roles: Set<String> = ["system", "developer", "user", "assistant", "tool", "function"]
    static let maxMessages = 4096

    init(json: JSONValue) throws {
        let p = try RequestParameters(json)
        // max_completion_tokens is OpenAI's newer name; it wins when both are given.
        sampling = try SamplingRequest(p, maxTokensKeys: ["max_tokens", "max_completion_tokens"])
        let wantLogprobs = try p.bool("logprobs") ?? false
        let top = try p.int("top_logprobs", in: 0...SamplingRequest.maxTopLogprobs)
        if top != nil && !wantLogprobs {
            throw APIError.invalid("'top_logprobs' needs 'logprobs' set to true", param: "top_logprobs")
        }
        sampling.logprobs = wantLogprobs ? (top ?? 0) : nil
        guard let m = p.value("messages") else {
            throw APIError.invalid("'messages' is required", param: "messages", code: "missing_parameter")
        }
        guard let list = m.array else { throw APIError.wrongType("messages", "a list of message objects") }
        guard !list.isEmpty else { throw APIError.invalid("'messages' must not be empty", param: "messages") }
        guard list.count <= Self.maxMessages else { throw APIError.outOfRange("messages", "a list of at most \(Self.maxMessages) messages") }
        messages = try list.enumerated().map { try Self.message($1, at: $0) }
        if let t = p.value("tools") {
            guard let a = t.array, a.allSatisfy({ $0.object != nil }) else { throw APIError.wrongType("tools", "a list of tool objects") }
            tools = a.isEmpty ? nil : a
        }
        addGenerationPrompt = try p.bool("add_generation_prompt") ?? true
        if let k = p.value("chat_template_kwargs") {
            guard let o = k.object else { throw APIError.wrongType("chat_template_kwargs", "an object") }
            for (key, value) in o.pairs { templateArguments[key] = value }
        }
    }

    /// Checks one message and flattens a list of text parts into one string.
    static func message(_ value: JSONValue, at i: Int) throws -> JSONValue {
        let param = "messages[\(i)]"
        guard var o = value.object else { throw APIError.wrongType(param, "a message object") }
        guard let role = o["role"]?.string else { throw APIError.wrongType("\(param).role", "a string") }
        guard roles.contains(role) else {
            throw APIError.invalid("'\(param).role' must be one of \(roles.sorted().joined(separator: ", ")) (got '\(role)')",
                                   param: "\(param).role", code: "invalid_value")
        }
        switch o["content"] {
        case nil, .null?:
            // Only an assistant message that calls tools may come without content.
            guard role == "assistant" else { throw APIError.invalid("'\(param).content' is required", param: "\(param).content") }
        case .string?:
            break
        case .array(let parts)?:
            var text: [String] = []
            for (j, part) in parts.enumerated() {
                guard let type = part["type"]?.string else { throw APIError.wrongType("\(param).content[\(j)].type", "a string") }
                guard type == "text" else {
                    throw APIError.invalid("Only text content is supported (got '\(type)')", param: "\(param).content[\(j)].type",
                                           code: "unsupported_content")
                }
                guard let t = part["text"]?.string else { throw APIError.wrongType("\(param).content[\(j)].text", "a string") }
                text.append(t)
            }
            o["content"] = .string(text.joined(separator: "\n"))
        default:
            throw APIError.wrongType("\(param).content", "a string or a list of content parts")
        }
        if let name = o["name"], !name.isNull, name.string == nil { throw APIError.wrongType("\(param).name", "a string") }
        return .object(o)
    }
}

/// POST /tokenize, as llama-server has it.
struct TokenizeRequest {
    var content: String
    var addSpecial: Bool

    init(json: JSONValue) throws {
        let p = try RequestParameters(json)
        guard let c = try p.string("content") else { throw APIError.invalid("'content' is required", param: "content", code: "missing_parameter") }
        content = c
        addSpecial = try p.bool("add_special") ?? false
    }
}

/// POST /detokenize.
struct DetokenizeRequest {
    var tokens: [Int]

    init(json: JSONValue, vocabularySize: Int) throws {
        let p = try RequestParameters(json)
        guard let t = try p.ints("tokens", maxCount: 1 << 20, in: 0...Int(Int32.max)) else {
            throw APIError.invalid("'tokens' is required", param: "tokens", code: "missing_parameter")
        }
        if let bad = t.first(where: { $0 >= vocabularySize }) {
            throw APIError.invalid("Token id \(bad) is outside the vocabulary of \(vocabularySize).", param: "tokens", code: "invalid_value")
        }
        tokens = t
    }
}
