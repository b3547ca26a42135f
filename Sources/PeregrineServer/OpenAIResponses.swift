import Peregrine

/// Builds response objects in OpenAI's shapes.
enum OpenAIResponses {
    static func object(_ pairs: [(String, JSONValue)]) -> JSONValue { .object(JSONObject(pairs)) }

    /// A finite JSON number (a token the sampler could never pick has logprob -inf, which JSON
    /// cannot carry; vLLM writes -9999 for it).
    static func number(_ x: Float) -> JSONValue { .number(x.isFinite ? Double(x) : -9999) }

    static func usage(_ u: Usage) -> JSONValue {
        var pairs: [(String, JSONValue)] = [
            ("prompt_tokens", .number(Double(u.promptTokens))),
            ("completion_tokens", .number(Double(u.completionTokens))),
            ("total_tokens", .number(Double(u.promptTokens + u.completionTokens))),
        ]
        if u.cachedPromptTokens > 0 {
            pairs.append(("prompt_tokens_details", object([("cached_tokens", .number(Double(u.cachedPromptTokens)))])))
        }
        return object(pairs)
    }

    static func header(id: String, object kind: String, created: Int, model: String) -> [(String, JSONValue)] {
        [("id", .string(id)), ("object", .string(kind)), ("created", .number(Double(created))), ("model", .string(model))]
    }

    // MARK: /v1/completions

    static func completion(id: String, created: Int, model: String, choices: [ChoiceResult], usage u: Usage) -> JSONValue {
        object(header(id: id, object: "text_completion", created: created, model: model) + [
            ("choices", .array(choices.map { c in
                object([("index", .number(Double(c.index))), ("text", .string(c.text)), ("logprobs", c.logprobs ?? .null),
                        ("finish_reason", c.finishReason.map(JSONValue.string) ?? .null)])
            })),
            ("usage", usage(u)),
        ])
    }

    static func completionChunk(id: String, created: Int, model: String, index: Int, text: String, logprobs: JSONValue?,
                                finishReason: String?, withUsageField: Bool) -> JSONValue {
        var pairs = header(id: id, object: "text_completion", created: created, model: model) + [
            ("choices", .array([object([("index", .number(Double(index))), ("text", .string(text)), ("logprobs", logprobs ?? .null),
                                        ("finish_reason", finishReason.map(JSONValue.string) ?? .null)])])),
        ]
        if withUsageField { pairs.append(("usage", .null)) }
        return object(pairs)
    }

    /// The last streamed chunk when `stream_options.include_usage` is set: no choices, the usage.
    static func usageChunk(id: String, object kind: String, created: Int, model: String, usage u: Usage) -> JSONValue {
        object(header(id: id, object: kind, created: created, model: model) + [("choices", .array([])), ("usage", usage(u))])
    }

    /// Completions' logprobs: parallel lists, `text_offset` counted in Unicode scalars (Python's
    /// characters) of the choice's text.
    static func completionLogprobs(_ entries: [TokenLogprob], tokenizer: Tokenizer, textOffset: inout Int) -> JSONValue {
        var parts = CompletionLogprobs()
        parts.append(entries, tokenizer: tokenizer, textOffset: &textOffset)
        return parts.json
    }

    /// The echoed prompt's part of completions' logprobs: the first token has no logprob and no
    /// alternatives (null), each other token its logprob given the tokens before it. A token's
    /// offset is where the text decoded from the tokens before it ends, in `echo`, the prompt's
    /// text: a special token counts its text only where `echo` has it there (a BOS the tokenizer
    /// added to a text prompt is not in it; the decoded text of a token prompt is), so the
    /// offsets point into `echo` whenever it decodes back from the tokens; they never point past
    /// its end.
    static func promptLogprobs(_ tokens: [Int], _ entries: [TokenLogprob], echo: String, tokenizer: Tokenizer) -> CompletionLogprobs {
        var parts = CompletionLogprobs()
        let text = Array(echo.unicodeScalars)
        var decoder = tokenizer.makeStreamingDecoder(skipSpecialTokens: true)
        var decoded = 0
        for (i, t) in tokens.enumerated() {
            let piece = tokenizer.decode([t])
            parts.tokens.append(.string(piece))
            parts.offsets.append(.number(Double(min(decoded, text.count))))
            if tokenizer.isSpecial(t) {
                let content = Array(piece.unicodeScalars)
                if decoded + content.count <= text.count && text[decoded..<(decoded + content.count)].elementsEqual(content) {
                    decoded += content.count
                }
            }
            if i > 0 && i - 1 < entries.count {
                let e = entries[i - 1]
                parts.logprobs.append(number(e.logprob))
                parts.tops.append(top(e, tokenizer: tokenizer))
            } else {
                parts.logprobs.append(.null)
                parts.tops.append(.null)
            }
            decoded += decoder.append(t).unicodeScalars.count
        }
        return parts
    }

    /// A token's top_logprobs object: the token itself and its alternatives.
    static func top(_ e: TokenLogprob, tokenizer: Tokenizer) -> JSONValue {
        var top = JSONObject()
        top[tokenizer.decode([e.token])] = number(e.logprob)
        for alt in e.top { top[tokenizer.decode([alt.token])] = number(alt.logprob) }
        return .object(top)
    }

    // MARK: /v1/chat/completions

    static func chatCompletion(id: String, created: Int, model: String, choices: [ChoiceResult], usage u: Usage) -> JSONValue {
        object(header(id: id, object: "chat.completion", created: created, model: model) + [
            ("choices", .array(choices.map { c in
                object([("index", .number(Double(c.index))),
                        ("message", object([("role", .string("assistant")), ("content", .string(c.text))])),
                        ("logprobs", c.logprobs ?? .null),
                        ("finish_reason", c.finishReason.map(JSONValue.string) ?? .null)])
            })),
            ("usage", usage(u)),
        ])
    }

    static func chatChunk(id: String, created: Int, model: String, index: Int, delta: JSONValue, logprobs: JSONValue?,
                          finishReason: String?, withUsageField: Bool) -> JSONValue {
        var pairs = header(id: id, object: "chat.completion.chunk", created: created, model: model) + [
            ("choices", .array([object([("index", .number(Double(index))), ("delta", delta), ("logprobs", logprobs ?? .null),
                                        ("finish_reason", finishReason.map(JSONValue.string) ?? .null)])])),
        ]
        if withUsageField { pairs.append(("usage", .null)) }
        return object(pairs)
    }

    /// Chat's logprobs: one entry per token with its bytes and the top alternatives.
    static func chatLogprobs(_ entries: [TokenLogprob], tokenizer: Tokenizer) -> JSONValue {
        func entry(_ token: Int, _ lp: Float) -> [(String, JSONValue)] {
            let piece = tokenizer.decode([token])
            return [("token", .string(piece)), ("logprob", number(lp)), ("bytes", .array(piece.utf8.map { .number(Double($0)) }))]
        }
        let content: [JSONValue] = entries.map { e in
            object(entry(e.token, e.logprob) + [("top_logprobs", .array(e.top.map { object(entry($0.token, $0.logprob)) }))])
        }
        return object([("content", .array(content)), ("refusal", .null)])
    }

    // MARK: /v1/models

    static func models(_ names: [String], created: Int) -> JSONValue {
        object([("object", .string("list")), ("data", .array(names.map { name in
            object([("id", .string(name)), ("object", .string("model")), ("created", .number(Double(created))),
                    ("owned_by", .string("peregrine"))])
        }))])
    }
}

struct Usage: Sendable {
    var promptTokens = 0
    var completionTokens = 0
    var cachedPromptTokens = 0
}

/// One finished choice of a non-streamed response.
struct ChoiceResult: Sendable {
    var index: Int
    var text = ""
    var logprobs: JSONValue?
    var finishReason: String?
}

/// The lists of a completion choice's logprobs object, built in token order.
struct CompletionLogprobs {
    var tokens: [JSONValue] = []
    var logprobs: [JSONValue] = []
    var tops: [JSONValue] = []
    var offsets: [JSONValue] = []

    /// Generated tokens, each at `textOffset`, which moves past its text.
    mutating func append(_ entries: [TokenLogprob], tokenizer: Tokenizer, textOffset: inout Int) {
        for e in entries {
            let piece = tokenizer.decode([e.token])
            tokens.append(.string(piece))
            logprobs.append(OpenAIResponses.number(e.logprob))
            tops.append(OpenAIResponses.top(e, tokenizer: tokenizer))
            offsets.append(.number(Double(textOffset)))
            textOffset += piece.unicodeScalars.count
        }
    }

    var json: JSONValue {
        OpenAIResponses.object([("tokens", .array(tokens)), ("token_logprobs", .array(logprobs)), ("top_logprobs", .array(tops)),
                                ("text_offset", .array(offsets))])
    }
}
