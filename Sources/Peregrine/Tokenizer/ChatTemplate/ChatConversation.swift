/// A conversation as an interactive chat keeps it: an optional system message and the
/// user/assistant turns so far. Each new message is sent with the whole conversation rendered
/// through the chat template, so the model sees it as it was trained to; when that prompt and
/// the reply's token budget would not fit the context, the oldest turns are dropped (the system
/// message never is, since it sets up every answer).
public struct ChatConversation: Sendable {
    public struct Turn: Sendable, Equatable {
        public var user: String
        public var assistant: String

        public init(user: String, assistant: String) {
            self.user = user
            self.assistant = assistant
        }
    }

    public var system: String?
    public private(set) var turns: [Turn] = []

    public init(system: String? = nil) {
        self.system = system
    }

    /// A prompt ready to send, or why there is none.
    public enum Prompt: Equatable {
        /// The ids to send, and how many of the oldest turns had to be dropped for them to fit
        /// (they are gone from the conversation).
        case fits(tokens: [Int], droppedTurns: Int)
        /// Even with no earlier turn, the prompt (this many tokens) and the reply budget exceed
        /// the context; the conversation is unchanged.
        case tooLong(tokens: Int)
    }

    /// The messages the template sees: system, the turns, then `user` when given.
    public func messages(adding user: String?) -> [JSONValue] {
        var out: [JSONValue] = []
        if let system { out.append(Self.message("system", system)) }
        for t in turns {
            out.append(Self.message("user", t.user))
            out.append(Self.message("assistant", t.assistant))
        }
        if let user { out.append(Self.message("user", user)) }
        return out
    }

    /// The prompt for a new user message: the conversation rendered with a generation prompt and
    /// encoded, with as many of the latest turns as fit `prompt + replyTokens <= context`.
    /// Drops the turns it leaves out; does not add `user` (that happens with the reply, in
    /// `append`, so a message that is never answered leaves no trace).
    public mutating func prompt(for user: String, renderer: ChatPromptRenderer, tokenizer: Tokenizer, bos: Int?,
                                replyTokens: Int, context: Int) throws -> Prompt {
        var candidate = self
        var dropped = 0
        while true {
            let text = try renderer.render(messages: candidate.messages(adding: user), tools: nil, addGenerationPrompt: true, extra: [:])
            let ids = tokenizer.encodeChatPrompt(text, bos: bos)
            if ids.count + replyTokens <= context {
                self = candidate
                return .fits(tokens: ids, droppedTurns: dropped)
            }
            // Dropping one turn at a time keeps as much history as fits; a render per turn is
            // cheap next to generating a reply.
            guard !candidate.turns.isEmpty else { return .tooLong(tokens: ids.count) }
            candidate.turns.removeFirst()
            dropped += 1
        }
    }

    /// Records an answered message (an interrupted reply is kept as far as it went).
    public mutating func append(user: String, assistant: String) {
        turns.append(Turn(user: user, assistant: assistant))
    }

    /// Forgets the turns; the system message stays.
    public mutating func reset() {
        turns.removeAll()
    }

    static func message(_ role: String, _ content: String) -> JSONValue {
        .object(JSONObject([("role", .string(role)), ("content", .string(content))]))
    }
}
