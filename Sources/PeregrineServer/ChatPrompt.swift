import Peregrine

/// Turns chat messages into the prompt text the model was trained on (its chat template).
public protocol ChatPromptRenderer: Sendable {
    func render(messages: [JSONValue], tools: [JSONValue]?, addGenerationPrompt: Bool, extra: [String: JSONValue]) throws -> String
}

public enum ChatTemplates {
    /// The chat template to serve with: `file` when given, else the model's own (nil: none).
    public static func load(model: String, file: String?, tokenizer: Tokenizer) throws -> ChatPromptRenderer? {
        if let file { throw PeregrineError.unsupported("--chat-template \(file): no chat template interpreter is available") }
        return nil
    }
}
