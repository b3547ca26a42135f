#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A model's chat template (the Jinja template Hugging Face models ship to turn a conversation
/// into a prompt), rendered as transformers' `apply_chat_template` renders it with Python's
/// jinja2, byte for byte.
///
/// What the template sees follows transformers: `messages` (with keys whose value is null
/// dropped, and reasoning under `reasoning_content`, `thinking` or `reasoning` copied to both
/// `thinking` and `reasoning_content`), `tools` (None when not given), `documents` (None),
/// `add_generation_prompt`, `bos_token` and `eos_token` (when the tokenizer has them) and the
/// `extra` variables.
///
/// Limitations: JSON numbers are doubles here, so a whole number written with a fraction in the
/// request (`1.0`) reaches the template as the int 1; integers are 64-bit (Python's grow);
/// filters that give lazy iterators in jinja2 (map, select, reverse, ...) give lists, which print
/// as lists where jinja2 would print a generator's address.
public struct ChatTemplate: @unchecked Sendable {
    // Unchecked: the parsed tree is never mutated after init, and every rendering builds its own
    // interpreter state, so one template may render on many threads at once.
    public let source: String
    let nodes: [Node]

    /// Parses the template; a construct the interpreter lacks is a thrown error naming it (e.g.
    /// "unsupported filter 'xyz' at line 3").
    public init(source: String) throws {
        self.source = source
        self.nodes = try TemplateParser.parse(source)
    }

    /// The template of a model: `chat_template.jinja` in the directory, else
    /// tokenizer_config.json's `chat_template` (a string, or the list of {name, template} where
    /// "default" is chosen, or `name` when given), else `chat_template.json`'s; a named template
    /// may also be `additional_chat_templates/<name>.jinja`. For a GGUF file path, the
    /// `tokenizer.chat_template` metadata (or `tokenizer.chat_template.<name>`). Returns nil when
    /// the model has none; a name the model lacks is an error.
    public static func load(model path: String, name: String? = nil) throws -> ChatTemplate? {
        func missing(_ name: String) -> PeregrineError {
            .invalidArgument("\(path) has no chat template named '\(name)'")
        }
        func file(_ p: String) throws -> ChatTemplate {
            try ChatTemplate(source: String(decoding: try FileSystem.read(p), as: UTF8.self))
        }
        if FileSystem.isGGUFFile(path) {
            let gguf = try GGUFFile(path: path)
            let key = name.map { "tokenizer.chat_template.\($0)" } ?? "tokenizer.chat_template"
            guard let text = gguf.metadata[key]?.string else {
                if let name { throw missing(name) }
                return nil
            }
            return try ChatTemplate(source: text)
        }
        if let name, name != "default" {
            let named = FileSystem.join(path, "additional_chat_templates/\(name).jinja")
            if FileSystem.exists(named) { return try file(named) }
        } else {
            let jinjaPath = FileSystem.join(path, "chat_template.jinja")
            if FileSystem.exists(jinjaPath) { return try file(jinjaPath) }
        }
        for configName in ["tokenizer_config.json", "chat_template.json"] {
            let configPath = FileSystem.join(path, configName)
            guard FileSystem.exists(configPath) else { continue }
            switch try FileSystem.readJSON(configPath)["chat_template"] {
            case .string(let text)?:
                if let name, name != "default" { throw missing(name) }
                return try ChatTemplate(source: text)
            case .array(let entries)?:
                // Named templates; "default" unless a name is asked for.
                let wanted = name ?? "default"
                for entry in entries where entry["name"]?.string == wanted {
                    guard let text = entry["template"]?.string else {
                        throw PeregrineError.format("\(configPath): chat template '\(wanted)' has no template text")
                    }
                    return try ChatTemplate(source: text)
                }
                if let name { throw missing(name) }
                let names = entries.compactMap { $0["name"]?.string }.map { "'\($0)'" }.joined(separator: ", ")
                throw PeregrineError.invalidArgument("\(path) has several chat templates (\(names)) and none named 'default'; choose one by name")
            case nil, .null?:
                continue
            default:
                throw PeregrineError.format("\(configPath): chat_template is neither a string nor a list")
            }
        }
        if let name, name != "default" { throw missing(name) }
        return nil
    }

    /// The BOS and EOS token strings of a model directory's tokenizer_config.json (each a string
    /// or an {"content": ...} object), or of a GGUF file's vocabulary; "" where absent.
    public static func specialTokens(model path: String) -> (bos: String, eos: String) {
        if FileSystem.isGGUFFile(path) {
            guard let file = try? GGUFFile(path: path), let tokens = file.metadata["tokenizer.ggml.tokens"]?.array else { return ("", "") }
            func token(_ key: String) -> String {
                guard let id = file.metadata[key]?.int, id >= 0, id < tokens.count else { return "" }
                return tokens[id].string ?? ""
            }
            return (token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id"))
        }
        guard let config = try? FileSystem.readJSON(FileSystem.join(path, "tokenizer_config.json")) else { return ("", "") }
        func token(_ v: JSONValue?) -> String {
            if let s = v?.string { return s }
            return v?["content"]?.string ?? ""
        }
        return (token(config["bos_token"]), token(config["eos_token"]))
    }

    /// Renders messages (each a JSON object: role, content (string, null, or a list of
    /// {type:"text", text} parts), optional tool_calls, name, tool_call_id, reasoning_content...).
    /// `tools` is handed to the template as `tools` (None when nil, as transformers passes it).
    /// `bosToken`/`eosToken` are the tokenizer's special-token strings ("" when it has none: the
    /// template then sees them undefined, as with transformers). `extra` adds further
    /// variables (e.g. enable_thinking, date_string). `now` is the clock `strftime_now` reads
    /// (the local time when nil).
    public func render(messages: [JSONValue], tools: [JSONValue]? = nil, addGenerationPrompt: Bool,
                       bosToken: String = "", eosToken: String = "", extra: [String: JSONValue] = [:],
                       now: Timestamp? = nil, limits: ChatTemplateLimits = ChatTemplateLimits()) throws -> String {
        let root = Scope(parent: nil)
        root.vars["messages"] = .list(try messages.map(ChatTemplate.prepare))
        root.vars["tools"] = tools.map { .list($0.map(TemplateValue.init(json:))) } ?? TemplateValue.none
        root.vars["documents"] = TemplateValue.none
        root.vars["add_generation_prompt"] = .bool(addGenerationPrompt)
        // transformers passes only the special tokens the tokenizer has; "" stands for none.
        if !bosToken.isEmpty { root.vars["bos_token"] = .string(bosToken) }
        if !eosToken.isEmpty { root.vars["eos_token"] = .string(eosToken) }
        for (k, v) in extra {
            // transformers passes these itself; Python refuses a second value for them.
            if ["messages", "tools", "documents", "add_generation_prompt"].contains(k) {
                throw PeregrineError.invalidArgument("the chat template variable '\(k)' cannot be set through extra variables")
            }
            root.vars[k] = TemplateValue(json: v)
        }
        return try render(scope: root, now: now, limits: limits)
    }

    /// Renders with arbitrary variables, as jinja2's Template.render(**context) does.
    public func render(context: [String: JSONValue], now: Timestamp? = nil,
                       limits: ChatTemplateLimits = ChatTemplateLimits()) throws -> String {
        let root = Scope(parent: nil)
        for (k, v) in context { root.vars[k] = TemplateValue(json: v) }
        return try render(scope: root, now: now, limits: limits)
    }

    private func render(scope: Scope, now: Timestamp?, limits: ChatTemplateLimits) throws -> String {
        let interp = Interpreter(limits: limits, now: now ?? Timestamp.now())
        return try interp.render(nodes, scope: scope)
    }

    /// A message as transformers hands it to the template.
    static func prepare(_ message: JSONValue) throws -> TemplateValue {
        guard case .object(let o) = message else {
            throw PeregrineError.invalidArgument("a chat message must be a JSON object")
        }
        var d = PyDict()
        for (k, v) in o.pairs where !v.isNull { try d.set(.string(k), TemplateValue(json: v)) }
        let reasoning = ["reasoning_content", "thinking", "reasoning"].lazy.compactMap { d.get($0) }.first
        guard let reasoning else { return .dict(d) }
        var aliased = PyDict()
        try aliased.set(.string("thinking"), reasoning)
        for (k, v) in d.pairs { try aliased.set(k, v) }
        try aliased.set(.string("thinking"), reasoning)
        try aliased.set(.string("reasoning_content"), reasoning)
        // transformers builds {"thinking": r, **message, "reasoning_content": r}: the message's
        // own `thinking` value is replaced, its position kept first.
        return .dict(aliased)
    }

    /// A wall-clock moment for `strftime_now`, broken down as the local time.
    public struct Timestamp: Sendable, Equatable {
        public var year, month, day, hour, minute, second: Int

        public init(year: Int, month: Int, day: Int, hour: Int = 0, minute: Int = 0, second: Int = 0) {
            self.year = year
            self.month = month
            self.day = day
            self.hour = hour
            self.minute = minute
            self.second = second
        }

        public static func now() -> Timestamp {
            var t = time(nil)
            var parts = tm()
            localtime_r(&t, &parts)
            return Timestamp(year: Int(parts.tm_year) + 1900, month: Int(parts.tm_mon) + 1, day: Int(parts.tm_mday),
                             hour: Int(parts.tm_hour), minute: Int(parts.tm_min), second: Int(parts.tm_sec))
        }

        /// Python's datetime.strftime on a naive datetime: C's strftime, with %f giving
        /// microseconds and %z/%Z empty.
        public func format(_ fmt: String) -> String {
            var parts = tm()
            parts.tm_year = Int32(clamping: year - 1900)
            parts.tm_mon = Int32(clamping: month - 1)
            parts.tm_mday = Int32(clamping: day)
            parts.tm_hour = Int32(clamping: hour)
            parts.tm_min = Int32(clamping: minute)
            parts.tm_sec = Int32(clamping: second)
            // timegm fills in the weekday and day of the year.
            var copy = parts
            _ = timegm(&copy)
            parts.tm_wday = copy.tm_wday
            parts.tm_yday = copy.tm_yday
            var pattern = ""
            var it = fmt.makeIterator()
            while let c = it.next() {
                guard c == "%" else { pattern.append(c); continue }
                guard let d = it.next() else { pattern.append("%"); break }
                switch d {
                case "f": pattern += "000000"
                case "z", "Z": break
                default: pattern.append("%"); pattern.append(d)
                }
            }
            guard !pattern.isEmpty else { return "" }
            var size = 256
            while size <= 1 << 20 {
                var buffer = [CChar](repeating: 0, count: size)
                let n = strftime(&buffer, size, pattern, &parts)
                if n > 0 { return String(decoding: buffer[..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) }
                size *= 4
            }
            return ""
        }
    }
}
