import Peregrine

/// Turns chat messages into the prompt text the model was trained on (its chat template).
public protocol ChatPromptRenderer: Sendable {
    func render(messages: [JSONValue], tools: [JSONValue]?, addGenerationPrompt: Bool, extra: [String: JSONValue]) throws -> String
}
