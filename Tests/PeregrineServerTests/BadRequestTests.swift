import Foundation
import Peregrine
@testable import PeregrineServer
import XCTest

/// Bad input over HTTP: each is a 4xx with OpenAI's error object naming the parameter, and the
/// server keeps answering.
final class BadRequestTests: XCTestCase {
    func server() async throws -> TestServer { try await SharedServer.instance.get() }

    func assertError(_ r: HTTPResult, status: Int, param: String?, code: String? = nil, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(r.status, status, r.text, file: file, line: line)
        let e = r.json?["error"]
        XCTAssertNotNil(e?["message"]?.string, "no error object: \(r.text)", file: file, line: line)
        XCTAssertNotNil(e?["type"]?.string, file: file, line: line)
        XCTAssertEqual(e?["param"]?.string, param, r.text, file: file, line: line)
        if let code { XCTAssertEqual(e?["code"]?.string, code, r.text, file: file, line: line) }
    }

    func testMalformedBodies() async throws {
        let c = try await server().client
        assertError(try await c.post("/v1/completions", #"{"prompt": "x", "#), status: 400, param: nil, code: "invalid_json")
        assertError(try await c.post("/v1/completions", "[1, 2]"), status: 400, param: nil)
        assertError(try await c.post("/v1/completions", ""), status: 400, param: nil, code: "invalid_json")
        let invalidUTF8: [UInt8] = Array(#"{"prompt": ""#.utf8) + [0xC3, 0x28, 0xFF] + Array(#""}"#.utf8)
        assertError(try await c.request("POST", "/v1/completions", body: invalidUTF8), status: 400, param: nil, code: "invalid_encoding")
        assertError(try await c.post("/v1/chat/completions", "nul"), status: 400, param: nil, code: "invalid_json")
        assertError(try await c.post("/tokenize", #"{"content": 5}"#), status: 400, param: "content")
        assertError(try await c.post("/detokenize", #"{"tokens": [1, 99999999]}"#), status: 400, param: "tokens")
        assertError(try await c.post("/detokenize", #"{"tokens": "1"}"#), status: 400, param: "tokens")
        assertError(try await c.get("/v1/nothing"), status: 404, param: nil)
    }

    func testWrongTypesNameTheParameter() async throws {
        let c = try await server().client
        let cases: [(String, String)] = [
            (#""temperature": "hot""#, "temperature"), (#""max_tokens": 1.5"#, "max_tokens"), (#""top_p": [1]"#, "top_p"),
            (#""n": "2""#, "n"), (#""stop": 5"#, "stop"), (#""stop": ["a", 1]"#, "stop"), (#""seed": "x""#, "seed"),
            (#""logprobs": true"#, "logprobs"), (#""echo": 1"#, "echo"), (#""stream": "yes""#, "stream"),
            (#""logit_bias": [1]"#, "logit_bias"), (#""logit_bias": {"x": 1}"#, "logit_bias"), (#""ignore_eos": 0"#, "ignore_eos"),
            (#""top_k": 2.5"#, "top_k"), (#""presence_penalty": true"#, "presence_penalty"), (#""model": 3"#, "model"),
        ]
        for (field, param) in cases {
            assertError(try await c.post("/v1/completions", #"{"prompt": "And God said", \#(field)}"#), status: 400, param: param)
        }
        assertError(try await c.post("/v1/completions", #"{"prompt": {"text": "x"}}"#), status: 400, param: "prompt")
        assertError(try await c.post("/v1/completions", #"{"prompt": [1, "x"]}"#), status: 400, param: "prompt")
        assertError(try await c.post("/v1/completions", #"{"max_tokens": 3}"#), status: 400, param: "prompt")
        let chat: [(String, String)] = [
            (#""messages": "hi""#, "messages"), (#""messages": []"#, "messages"), (#""messages": [{"content": "x"}]"#, "messages[0].role"),
            (#""messages": [{"role": "wizard", "content": "x"}]"#, "messages[0].role"),
            (#""messages": [{"role": "user", "content": 5}]"#, "messages[0].content"),
            (#""messages": [{"role": "user", "content": "x"}], "logprobs": 3"#, "logprobs"),
            (#""messages": [{"role": "user", "content": "x"}], "top_logprobs": 2"#, "top_logprobs"),
            (#""messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]"#, "messages[0].content[0].type"),
        ]
        for (field, param) in chat {
            assertError(try await c.post("/v1/chat/completions", "{\(field)}"), status: 400, param: param)
        }
    }

    func testOutOfRangeValues() async throws {
        let s = try await server()
        let c = s.client
        let cases: [(String, String)] = [
            (#""temperature": -0.5"#, "temperature"), (#""temperature": 2.5"#, "temperature"), (#""top_p": 0"#, "top_p"),
            (#""top_p": 1.5"#, "top_p"), (#""n": 0"#, "n"), (#""n": 100000"#, "n"), (#""max_tokens": -5"#, "max_tokens"),
            (#""max_tokens": 0"#, "max_tokens"), (#""max_tokens": 1e300"#, "max_tokens"), (#""min_p": 1"#, "min_p"),
            (#""repetition_penalty": 0"#, "repetition_penalty"), (#""frequency_penalty": 3"#, "frequency_penalty"),
            (#""logprobs": 50"#, "logprobs"), (#""logit_bias": {"5": 500}"#, "logit_bias"), (#""logit_bias": {"999999": 1}"#, "logit_bias"),
            (#""top_k": -2"#, "top_k"), (#""stream_options": {"include_usage": true}"#, "stream_options"),
            (#""max_tokens": 5000"#, "max_tokens"),
        ]
        for (field, param) in cases {
            assertError(try await c.post("/v1/completions", #"{"prompt": "And God said", \#(field)}"#), status: 400, param: param)
        }
        // A prompt beyond the context, as text and as ids.
        let long = String(repeating: "And God said unto Moses, ", count: 300)
        assertError(try await c.post("/v1/completions", #"{"prompt": "\#(long)"}"#), status: 400, param: "prompt", code: "context_length_exceeded")
        let ids = "[" + Array(repeating: "300", count: 1100).joined(separator: ",") + "]"
        assertError(try await c.post("/v1/completions", #"{"prompt": \#(ids)}"#), status: 400, param: "prompt", code: "context_length_exceeded")
        assertError(try await c.post("/v1/completions", #"{"prompt": [8192]}"#), status: 400, param: "prompt")
        assertError(try await c.post("/v1/completions", #"{"prompt": [-1]}"#), status: 400, param: "prompt")
        assertError(try await c.post("/v1/completions", #"{"prompt": "x", "model": "gpt-4"}"#), status: 404, param: "model", code: "model_not_found")
        // Nothing was left running by any of them.
        let stats = try await s.waitUntilIdle()
        XCTAssertEqual(stats.kvBlocksUsed, 0)
        let health = try await c.get("/health")
        XCTAssertEqual(health.status, 200)
    }

    func testBodyLimit() async throws {
        let s = try await TestServer.start(chatTemplate: false) { $0.maxBodyBytes = 4096 }
        let big = #"{"prompt": ""# + String(repeating: "a", count: 10_000) + #""}"#
        let r = try await s.client.post("/v1/completions", big)
        let ok = try await s.client.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 2}"#)
        try await s.stop()
        assertError(r, status: 413, param: nil, code: "request_too_large")
        XCTAssertEqual(ok.status, 200)
    }

    func testAPIKey() async throws {
        let s = try await TestServer.start(chatTemplate: false) { $0.apiKey = "sekrit-key" }
        let anonymous = TestClient(port: s.port, apiKey: nil)
        let wrong = TestClient(port: s.port, apiKey: "sekrit-kez")
        let body = #"{"prompt": "And God said", "max_tokens": 2}"#
        let results = [
            try await anonymous.post("/v1/completions", body), try await wrong.post("/v1/completions", body),
            try await anonymous.get("/v1/models"), try await anonymous.get("/metrics"),
            try await TestClient(port: s.port, apiKey: "sekrit-key-longer").get("/v1/models"),
            try await anonymous.get("/v1/models", headers: ["Authorization": "Basic sekrit-key"]),
        ]
        let health = try await anonymous.get("/health")
        let right = try await s.client.post("/v1/completions", body)
        let models = try await s.client.get("/v1/models")
        try await s.stop()
        for r in results {
            assertError(r, status: 401, param: nil, code: "invalid_api_key")
        }
        XCTAssertEqual(health.status, 200)
        XCTAssertEqual(right.status, 200, right.text)
        XCTAssertEqual(models.status, 200)
        XCTAssertTrue(AuthMiddleware.constantTimeEqual(Array("abc".utf8), Array("abc".utf8)))
        XCTAssertFalse(AuthMiddleware.constantTimeEqual(Array("abc".utf8), Array("abcd".utf8)))
        XCTAssertFalse(AuthMiddleware.constantTimeEqual([], Array("a".utf8)))
    }
}
