import Foundation
import Peregrine
@testable import PeregrineServer
import XCTest

/// Where the server's chat template comes from.
final class ChatPromptTests: XCTestCase {
    let messages: [JSONValue] = [.object(JSONObject([("role", .string("user")), ("content", .string("hi"))]))]

    func testTemplateFile() throws {
        let tokenizer = try TestServer.tokenizer.get()
        let chat = try XCTUnwrap(try ChatTemplates.load(model: TestServer.modelPath, file: TestServer.chatTemplatePath, tokenizer: tokenizer))
        XCTAssertEqual(try chat.render(messages: messages, tools: nil, addGenerationPrompt: true, extra: [:]),
                       "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
        // The shipped model has none of its own.
        XCTAssertNil(try ChatTemplates.load(model: TestServer.modelPath, file: nil, tokenizer: tokenizer))
        XCTAssertThrowsError(try ChatTemplates.load(model: TestServer.modelPath, file: "/nonexistent.jinja", tokenizer: tokenizer))
    }

    /// A GGUF file's tokenizer.chat_template, with BOS written from its vocabulary.
    func testTemplateFromGGUF() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("peregrine-chat-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/chat.gguf"
        var w = GGUFWriter()
        w.set("general.architecture", .string("llama"))
        w.set("tokenizer.ggml.tokens", .strings(["<s>", "</s>", "a"]))
        w.set("tokenizer.ggml.bos_token_id", .u32(0))
        w.set("tokenizer.ggml.eos_token_id", .u32(1))
        w.set("tokenizer.chat_template", .string("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"))
        try w.write(to: path)
        let chat = try XCTUnwrap(try ChatTemplates.load(model: path, file: nil, tokenizer: try TestServer.tokenizer.get()))
        XCTAssertEqual(try chat.render(messages: messages, tools: nil, addGenerationPrompt: true, extra: [:]), "<s>[user] hi</s>")
    }
}
