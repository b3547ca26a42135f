/// Turns chat messages into the prompt text the model was trained on (its chat template).
public protocol ChatPromptRenderer: Sendable {
    func render(messages: [JSONValue], tools: [JSONValue]?, addGenerationPrompt: Bool, extra: [String: JSONValue]) throws -> String
}

/// A Jinja chat template with the model's BOS and EOS strings. Rendering reads only the parsed
/// template, so one instance serves concurrent requests.
struct JinjaChatPrompt: ChatPromptRenderer, @unchecked Sendable {
    let template: ChatTemplate
    let bos: String
    let eos: String

    func render(messages: [JSONValue], tools: [JSONValue]?, addGenerationPrompt: Bool, extra: [String: JSONValue]) throws -> String {
        try template.render(messages: messages, tools: tools, addGenerationPrompt: addGenerationPrompt, bosToken: bos, eosToken: eos,
                            extra: extra)
    }
}

public enum ChatTemplates {
    /// The chat template to use: `file` when given, else the model's own (chat_template.jinja,
    /// tokenizer_config.json, or a GGUF file's tokenizer.chat_template); nil when there is none.
    public static func load(model: String, file: String?, tokenizer: Tokenizer) throws -> ChatPromptRenderer? {
        let template: ChatTemplate
        if let file {
            guard FileSystem.exists(file) else { throw PeregrineError.io("\(file): no such chat template file") }
            let bytes = try FileSystem.read(file)
            guard let source = String(validating: bytes, as: UTF8.self) else { throw PeregrineError.format("\(file): not UTF-8 text") }
            template = try ChatTemplate(source: source)
        } else if let t = try ChatTemplate.load(model: model) {
            template = t
        } else {
            return nil
        }
        // The strings the template writes for BOS and EOS: the model's own, else the tokenizer's.
        var (bos, eos) = ChatTemplate.specialTokens(model: model)
        if bos.isEmpty, let id = tokenizer.bosTokenId { bos = tokenizer.decode([id]) }
        if eos.isEmpty, let id = tokenizer.eosTokenIds.first { eos = tokenizer.decode([id]) }
        return JinjaChatPrompt(template: template, bos: bos, eos: eos)
    }
}

extension Tokenizer {
    /// The ids of a prompt a chat template rendered. Templates write their special tokens as
    /// text, so the text is encoded without adding any; `bos` (the tokenizer's `addedBOS`, which
    /// callers keep because finding it encodes twice) is put first only if the template left it
    /// out, so a model that expects BOS gets exactly one.
    public func encodeChatPrompt(_ text: String, bos: Int?) -> [Int] {
        var ids = encode(text, addSpecialTokens: false)
        if let bos, ids.first != bos { ids.insert(bos, at: 0) }
        return ids
    }
}
