import Foundation
import Peregrine
@testable import PeregrineServer
import XCTest

/// The request decoder alone: shapes, defaults, and a seeded fuzz run.
final class RequestDecodingTests: XCTestCase {
    let limits = ModelLimits(vocabularySize: 8192, contextLength: 1024)

    func decode(_ text: String) throws -> CompletionRequest { try CompletionRequest(json: try JSON.parse(text)) }

    func param(_ text: String, chat: Bool = false) -> String? {
        do {
            let json = try JSON.parse(text)
            if chat { _ = try ChatRequest(json: json) } else { _ = try CompletionRequest(json: json) }
            return "no error"
        } catch let e as APIError {
            return e.param
        } catch {
            return "\(error)"
        }
    }

    func testDefaultsFollowVLLM() throws {
        let r = try decode(#"{"prompt": "hi"}"#)
        XCTAssertEqual(r.prompts, [.text("hi")])
        XCTAssertEqual(r.sampling.temperature, 1)
        XCTAssertEqual(r.sampling.topP, 1)
        XCTAssertEqual(r.sampling.topK, 0)
        XCTAssertEqual(r.sampling.n, 1)
        XCTAssertNil(r.sampling.logprobs)
        let e = try r.sampling.engineRequest(prompt: [1, 2, 3], defaultMaxTokens: 16, limits: limits, promptParam: "prompt")
        XCTAssertEqual(e.maxTokens, 16)
        XCTAssertEqual(e.sampling.minP, 0)
        XCTAssertEqual(e.sampling.repetitionPenalty, 1)
        // Chat's default fills the context.
        let c = try ChatRequest(json: try JSON.parse(#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}"#))
        XCTAssertEqual(c.messages.first?["content"]?.string, "a\nb")
        let ce = try c.sampling.engineRequest(prompt: [1, 2, 3], defaultMaxTokens: nil, limits: limits, promptParam: "messages")
        XCTAssertEqual(ce.maxTokens, 1021)
    }

    func testParametersAreRead() throws {
        let r = try decode(#"{"prompt": [[1, 2], [3]], "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "top_k": -1, "min_p": 0.1, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5, "seed": -3, "stop": "x", "n": 2, "logprobs": 3, "logit_bias": {"7": -100, "9": 5}, "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}, "unknown_field": {"anything": [1]}, "user": "u"}"#)
        XCTAssertEqual(r.prompts, [.tokens([1, 2]), .tokens([3])])
        XCTAssertEqual(r.sampling.stop, ["x"])
        XCTAssertTrue(r.sampling.includeUsage)
        let e = try r.sampling.engineRequest(prompt: [1, 2], defaultMaxTokens: 16, limits: limits, promptParam: "prompt")
        XCTAssertEqual(e.maxTokens, 5)
        XCTAssertEqual(e.sampling.temperature, 0.5)
        XCTAssertEqual(e.sampling.topK, 0)
        XCTAssertEqual(e.sampling.seed, UInt64(bitPattern: -3))
        XCTAssertEqual(e.presencePenalty, 0.5)
        XCTAssertEqual(e.frequencyPenalty, -0.5)
        XCTAssertEqual(e.logitBias, [7: -100, 9: 5])
        XCTAssertEqual(e.n, 2)
        XCTAssertEqual(e.logprobs, 3)
        XCTAssertNil(e.promptLogprobs, "no echo, no prompt logprobs")
        // Echo with logprobs scores the prompt too, and may ask for no tokens at all.
        let echo = try CompletionRequest(json: try JSON.parse(#"{"prompt": "x", "echo": true, "logprobs": 2, "max_tokens": 0}"#))
        XCTAssertEqual(echo.sampling.maxTokens, 0)
        let scored = try echo.sampling.engineRequest(prompt: [1, 2], defaultMaxTokens: 16, limits: limits, promptParam: "prompt")
        XCTAssertEqual(scored.promptLogprobs, 2)
        XCTAssertEqual(scored.logprobs, 2)
        XCTAssertEqual(scored.maxTokens, 0)
        XCTAssertTrue(e.ignoreEOS)
        let chat = try ChatRequest(json: try JSON.parse(#"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 9, "logprobs": true, "top_logprobs": 4}"#))
        XCTAssertEqual(chat.sampling.maxTokens, 9)
        XCTAssertEqual(chat.sampling.logprobs, 4)
        XCTAssertEqual(try ChatRequest(json: try JSON.parse(#"{"messages": [{"role": "user", "content": "x"}], "logprobs": true}"#)).sampling.logprobs, 0)
        XCTAssertNil(try ChatRequest(json: try JSON.parse(#"{"messages": [{"role": "user", "content": "x"}], "logprobs": false}"#)).sampling.logprobs)
    }

    func testErrorsNameTheParameter() {
        XCTAssertEqual(param(#"{"prompt": "x", "temperature": "1"}"#), "temperature")
        XCTAssertEqual(param(#"{"prompt": "x", "n": 65}"#), "n")
        XCTAssertEqual(param(#"{"prompt": "x", "best_of": 3}"#), "best_of")
        XCTAssertEqual(param(#"{"prompt": "x", "suffix": "y"}"#), "suffix")
        XCTAssertEqual(param(#"{"prompt": "x", "max_tokens": 0}"#), "max_tokens")
        XCTAssertEqual(param(#"{"prompt": "x", "max_tokens": 0, "echo": false}"#), "max_tokens")
        XCTAssertEqual(param(#"{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}"#), "stop")
        XCTAssertEqual(param(#"{"prompt": "x", "temperature": NaN}"#), "temperature")
        XCTAssertEqual(param(#"{"prompt": "x", "max_tokens": Infinity}"#), "max_tokens")
        XCTAssertEqual(param(#"{"messages": [{"role": "user", "content": "x", "name": 3}]}"#, chat: true), "messages[0].name")
        XCTAssertEqual(param(#"{"messages": [{"role": "user", "content": "x"}], "tools": {}}"#, chat: true), "tools")
        XCTAssertEqual(param(#"{"messages": [{"role": "user"}]}"#, chat: true), "messages[0].content")
        XCTAssertEqual(param(#"{"messages": [{"role": "assistant", "content": null}]}"#, chat: true), "no error")
        XCTAssertThrowsError(try SamplingRequest(RequestParameters(.object(JSONObject())), maxTokensKeys: [])
            .engineRequest(prompt: [], defaultMaxTokens: 1, limits: limits, promptParam: "prompt"))
    }

    /// Random and mutated request bodies never crash the decoder, and each failure is an
    /// APIError. Seeded, and bounded in count and time.
    func testFuzzDecoder() throws {
        var rng = SeededGenerator(seed: 0x5EED)
        let seeds = [
            #"{"prompt": "And God said", "max_tokens": 5, "temperature": 0.7, "stop": ["\n"], "n": 2, "logit_bias": {"5": 1}}"#,
            #"{"prompt": [[1,2,3],[4]], "logprobs": 2, "echo": false, "stream": true, "stream_options": {"include_usage": true}}"#,
            #"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "top_logprobs": 2, "logprobs": true}"#,
            #"{"content": "text", "add_special": true, "tokens": [1, 2, 3]}"#,
        ]
        let alphabet = Array(#"{}[]":,0123456789.-eE truefalsnul\"#.utf8) + [0xFF, 0xC3, 0x00, 0x0A]
        let deadline = Date().addingTimeInterval(4)
        var runs = 0
        while runs < 200_000 && Date() < deadline {
            var bytes = Array(seeds[Int(rng.next() % UInt64(seeds.count))].utf8)
            for _ in 0..<(1 + Int(rng.next() % 4)) {
                let i = Int(rng.next() % UInt64(bytes.count + 1))
                switch rng.next() % 3 {
                case 0: if i < bytes.count { bytes.remove(at: i) }
                case 1: bytes.insert(alphabet[Int(rng.next() % UInt64(alphabet.count))], at: i)
                default: if i < bytes.count { bytes[i] = alphabet[Int(rng.next() % UInt64(alphabet.count))] }
                }
            }
            guard let json = try? JSON.parse(bytes) else { runs += 1; continue }
            for decode in [{ _ = try CompletionRequest(json: json) }, { _ = try ChatRequest(json: json) },
                           { _ = try TokenizeRequest(json: json) }, { _ = try DetokenizeRequest(json: json, vocabularySize: 8192) }] {
                do {
                    try decode()
                } catch is APIError {
                } catch {
                    XCTFail("not an APIError: \(error) for \(String(decoding: bytes, as: UTF8.self))")
                }
            }
            if let r = try? CompletionRequest(json: json) {
                for p in r.prompts {
                    guard case .tokens(let t) = p else { continue }
                    do {
                        _ = try r.sampling.engineRequest(prompt: t, defaultMaxTokens: 16, limits: limits, promptParam: "prompt")
                    } catch is APIError {
                    } catch {
                        XCTFail("not an APIError: \(error)")
                    }
                }
            }
            runs += 1
        }
        XCTAssertGreaterThan(runs, 1000)
    }
}
