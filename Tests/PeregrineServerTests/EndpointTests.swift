import Foundation
import Peregrine
@testable import PeregrineServer
import XCTest

/// Every endpoint over real loopback HTTP, streamed and not, against the shipped model.
final class EndpointTests: XCTestCase {
    func server() async throws -> TestServer { try await SharedServer.instance.get() }

    func testHealthModelsAndMetrics() async throws {
        let c = try await server().client
        let health = try await c.get("/health")
        XCTAssertEqual(health.status, 200)
        XCTAssertEqual(health.json?["status"]?.string, "ok")

        let models = try await c.get("/v1/models")
        XCTAssertEqual(models.status, 200)
        XCTAssertEqual(models.json?["object"]?.string, "list")
        XCTAssertEqual(models.json?["data"]?.array?.first?["id"]?.string, "target")
        XCTAssertEqual(models.json?["data"]?.array?.first?["object"]?.string, "model")

        _ = try await c.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 3, "temperature": 0}"#)
        let metrics = try await c.get("/metrics")
        XCTAssertEqual(metrics.status, 200)
        XCTAssertTrue(metrics.headers["content-type"]?.hasPrefix("text/plain") ?? false)
        for series in ["peregrine_requests_total{endpoint=\"completions\",outcome=\"success\"}", "peregrine_prompt_tokens_total",
                       "peregrine_generation_tokens_total", "peregrine_time_to_first_token_seconds_bucket",
                       "peregrine_inter_token_latency_seconds_count", "peregrine_requests_running", "peregrine_requests_waiting",
                       "peregrine_kv_blocks_used", "peregrine_prefix_cache_hits_total"] {
            XCTAssertTrue(metrics.text.contains(series), "missing \(series)")
        }
        let success = metrics.text.split(separator: "\n").first { $0.hasPrefix("peregrine_requests_total{endpoint=\"completions\",outcome=\"success\"}") }
        XCTAssertGreaterThan(Int(success?.split(separator: " ").last ?? "0") ?? 0, 0)
        // Three tokens: the prompt's pass gives the first, two decode passes the others.
        let steps = metrics.text.split(separator: "\n").first { $0.hasPrefix("peregrine_engine_steps_total ") }
        XCTAssertGreaterThanOrEqual(Int(steps?.split(separator: " ").last ?? "0") ?? 0, 3)
        XCTAssertTrue(metrics.text.contains("peregrine_preemptions_total 0"))
    }

    func testCompletion() async throws {
        let s = try await server()
        let r = try await s.client.post("/v1/completions", #"{"model": "target", "prompt": "And God said", "max_tokens": 8, "temperature": 0}"#)
        XCTAssertEqual(r.status, 200, r.text)
        let j = try XCTUnwrap(r.json)
        XCTAssertTrue(j["id"]?.string?.hasPrefix("cmpl-") ?? false)
        XCTAssertEqual(j["object"]?.string, "text_completion")
        XCTAssertEqual(j["model"]?.string, "target")
        XCTAssertNotNil(j["created"]?.int)
        let choice = try XCTUnwrap(j["choices"]?.array?.first)
        XCTAssertEqual(choice["index"]?.int, 0)
        XCTAssertEqual(choice["finish_reason"]?.string, "length")
        XCTAssertTrue(choice["logprobs"]?.isNull ?? false)
        let text = try XCTUnwrap(choice["text"]?.string)
        XCTAssertFalse(text.isEmpty)
        let promptTokens = s.tokenizer.encode("And God said").count
        XCTAssertEqual(j["usage"]?["prompt_tokens"]?.int, promptTokens)
        XCTAssertEqual(j["usage"]?["completion_tokens"]?.int, 8)
        XCTAssertEqual(j["usage"]?["total_tokens"]?.int, promptTokens + 8)

        // The same text as single-sequence greedy decoding gives.
        var options = GenerationOptions()
        options.maxTokens = 8
        options.sampling = .greedy
        let alone = try Generator(model: try TestServer.model.get(), tokenizer: s.tokenizer).generate(prompt: "And God said", options: options)
        XCTAssertEqual(text, alone.text)
    }

    func testCompletionStreamMatchesWhole() async throws {
        let c = try await server().client
        let body = #"{"prompt": "In the beginning", "max_tokens": 12, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}"#
        let r = try await c.post("/v1/completions", body)
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.headers["content-type"], "text/event-stream")
        let events = r.events
        XCTAssertEqual(events.last, "[DONE]")
        let chunks = events.dropLast().compactMap { try? JSON.parse($0) }
        XCTAssertEqual(chunks.count, events.count - 1, "every event but [DONE] is JSON")
        var text = ""
        for chunk in chunks.dropLast() {
            XCTAssertEqual(chunk["object"]?.string, "text_completion")
            XCTAssertTrue(chunk["usage"]?.isNull ?? false, "usage is null before the last chunk")
            text += chunk["choices"]?.array?.first?["text"]?.string ?? ""
        }
        XCTAssertEqual(chunks.dropLast().last?["choices"]?.array?.first?["finish_reason"]?.string, "length")
        let usage = try XCTUnwrap(chunks.last)
        XCTAssertEqual(usage["choices"]?.array?.count, 0)
        XCTAssertEqual(usage["usage"]?["completion_tokens"]?.int, 12)

        let whole = try await c.post("/v1/completions", #"{"prompt": "In the beginning", "max_tokens": 12, "temperature": 0}"#)
        XCTAssertEqual(text, whole.json?["choices"]?.array?.first?["text"]?.string)
    }

    func testPromptShapesNAndSeed() async throws {
        let s = try await server()
        let c = s.client
        // A list of strings: one choice per prompt, in order.
        let two = try await c.post("/v1/completions", #"{"prompt": ["And God said", "In the beginning"], "max_tokens": 4, "temperature": 0}"#)
        XCTAssertEqual(two.status, 200, two.text)
        let choices = try XCTUnwrap(two.json?["choices"]?.array)
        XCTAssertEqual(choices.map { $0["index"]?.int }, [0, 1])
        let single = try await c.post("/v1/completions", #"{"prompt": "In the beginning", "max_tokens": 4, "temperature": 0}"#)
        XCTAssertEqual(choices[1]["text"]?.string, single.json?["choices"]?.array?.first?["text"]?.string)

        // Token ids, and a list of token-id lists.
        let ids = s.tokenizer.encode("And God said")
        let idList = "[" + ids.map(String.init).joined(separator: ",") + "]"
        let byIds = try await c.post("/v1/completions", #"{"prompt": \#(idList), "max_tokens": 4, "temperature": 0}"#)
        XCTAssertEqual(byIds.json?["choices"]?.array?.first?["text"]?.string, choices[0]["text"]?.string)
        let lists = try await c.post("/v1/completions", #"{"prompt": [\#(idList), \#(idList)], "max_tokens": 4, "temperature": 0}"#)
        XCTAssertEqual(lists.json?["choices"]?.array?.count, 2)

        // n samples with a seed: three choices, the same again with the same seed.
        let body = #"{"prompt": "And God said", "max_tokens": 6, "n": 3, "seed": 7, "temperature": 1.0, "top_p": 0.9}"#
        let a = try await c.post("/v1/completions", body), b = try await c.post("/v1/completions", body)
        let ta = a.json?["choices"]?.array?.map { $0["text"]?.string ?? "" } ?? []
        XCTAssertEqual(ta.count, 3)
        XCTAssertEqual(a.json?["choices"]?.array?.compactMap { $0["index"]?.int }.sorted(), [0, 1, 2])
        XCTAssertEqual(ta, b.json?["choices"]?.array?.map { $0["text"]?.string ?? "" })
        XCTAssertEqual(a.json?["usage"]?["completion_tokens"]?.int, 18)
    }

    func testEchoStopAndLogprobs() async throws {
        let c = try await server().client
        let echo = try await c.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 4, "temperature": 0, "echo": true}"#)
        XCTAssertTrue(echo.json?["choices"]?.array?.first?["text"]?.string?.hasPrefix("And God said") ?? false, echo.text)

        let free = try await c.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 20, "temperature": 0}"#)
        let text = try XCTUnwrap(free.json?["choices"]?.array?.first?["text"]?.string)
        let words = text.split(separator: " ")
        let stopWord = String(try XCTUnwrap(words.dropFirst().first))
        let stopped = try await c.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 20, "temperature": 0, "stop": [\#(JSONWriter.write(.string(stopWord)))]}"#)
        let choice = try XCTUnwrap(stopped.json?["choices"]?.array?.first)
        XCTAssertEqual(choice["finish_reason"]?.string, "stop")
        XCTAssertFalse(choice["text"]?.string?.contains(stopWord) ?? true)

        let lp = try await c.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 3, "temperature": 0, "logprobs": 2}"#)
        let logprobs = try XCTUnwrap(lp.json?["choices"]?.array?.first?["logprobs"])
        XCTAssertEqual(logprobs["tokens"]?.array?.count, 3)
        XCTAssertEqual(logprobs["token_logprobs"]?.array?.count, 3)
        XCTAssertEqual(logprobs["text_offset"]?.array?.first?.int, 0)
        let top = try XCTUnwrap(logprobs["top_logprobs"]?.array?.first?.object)
        XCTAssertGreaterThanOrEqual(top.count, 2)
        XCTAssertLessThanOrEqual(logprobs["token_logprobs"]?.array?.first?.double ?? 1, 0)
    }

    func testChatCompletion() async throws {
        let s = try await server()
        let body = #"{"model": "target", "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "And God said"}], "max_tokens": 6, "temperature": 0, "logprobs": true, "top_logprobs": 2}"#
        let r = try await s.client.post("/v1/chat/completions", body)
        XCTAssertEqual(r.status, 200, r.text)
        let j = try XCTUnwrap(r.json)
        XCTAssertTrue(j["id"]?.string?.hasPrefix("chatcmpl-") ?? false)
        XCTAssertEqual(j["object"]?.string, "chat.completion")
        let choice = try XCTUnwrap(j["choices"]?.array?.first)
        XCTAssertEqual(choice["message"]?["role"]?.string, "assistant")
        let content = try XCTUnwrap(choice["message"]?["content"]?.string)
        XCTAssertNotNil(choice["finish_reason"]?.string)
        let entries = try XCTUnwrap(choice["logprobs"]?["content"]?.array)
        XCTAssertEqual(entries.count, j["usage"]?["completion_tokens"]?.int)
        XCTAssertEqual(entries.first?["top_logprobs"]?.array?.count, 2)

        let streamed = try await s.client.post("/v1/chat/completions", body.replacingOccurrences(of: #""temperature": 0"#, with: #""temperature": 0, "stream": true"#))
        let chunks = streamed.events.dropLast().compactMap { try? JSON.parse($0) }
        XCTAssertEqual(streamed.events.last, "[DONE]")
        XCTAssertEqual(chunks.first?["object"]?.string, "chat.completion.chunk")
        XCTAssertEqual(chunks.first?["choices"]?.array?.first?["delta"]?["role"]?.string, "assistant")
        XCTAssertNotNil(chunks.last?["choices"]?.array?.first?["finish_reason"]?.string)
        let deltas = chunks.map { $0["choices"]?.array?.first?["delta"]?["content"]?.string ?? "" }.joined()
        XCTAssertEqual(deltas, content)
    }

    func testChatWithoutTemplateIs400() async throws {
        let s = try await TestServer.start(chatTemplate: false)
        let r = try await s.client.post("/v1/chat/completions", #"{"messages": [{"role": "user", "content": "hi"}]}"#)
        try await s.stop()
        XCTAssertEqual(r.status, 400)
        XCTAssertEqual(r.errorCode, "no_chat_template")
        XCTAssertTrue(r.json?["error"]?["message"]?.string?.contains("--chat-template") ?? false)
    }

    func testTokenizeAndDetokenize() async throws {
        let s = try await server()
        let t = try await s.client.post("/tokenize", #"{"content": "And God said", "add_special": true}"#)
        let ids = try XCTUnwrap(t.json?["tokens"]?.array?.compactMap(\.int))
        XCTAssertEqual(ids, s.tokenizer.encode("And God said", addSpecialTokens: true))
        let plain = try await s.client.post("/tokenize", #"{"content": "And God said"}"#)
        XCTAssertEqual(plain.json?["tokens"]?.array?.compactMap(\.int), s.tokenizer.encode("And God said", addSpecialTokens: false))
        let d = try await s.client.post("/detokenize", #"{"tokens": \#(JSONWriter.write(.array(plain.json?["tokens"]?.array ?? [])))}"#)
        XCTAssertEqual(d.json?["content"]?.string, "And God said")
    }
}
