import Foundation
import Peregrine
@testable import PeregrineServer
import XCTest

/// /v1/completions with echo and logprobs (prompt logprobs) over loopback HTTP: the answer's text
/// is prompt then completion, its logprobs cover both, streamed as whole, and max_tokens 0 scores
/// the prompt alone.
final class EchoLogprobsTests: XCTestCase {
    func server() async throws -> TestServer { try await SharedServer.instance.get() }

    struct Logprobs {
        var tokens: [String]
        var logprobs: [Double?]
        var tops: [JSONObject?]
        var offsets: [Int]

        init(_ v: JSONValue?, file: StaticString = #filePath, line: UInt = #line) throws {
            let v = try XCTUnwrap(v, "no logprobs object", file: file, line: line)
            tokens = try XCTUnwrap(v["tokens"]?.array, file: file, line: line).map { try XCTUnwrap($0.string) }
            logprobs = try XCTUnwrap(v["token_logprobs"]?.array, file: file, line: line).map { $0.isNull ? nil : $0.double }
            tops = try XCTUnwrap(v["top_logprobs"]?.array, file: file, line: line).map(\.object)
            offsets = try XCTUnwrap(v["text_offset"]?.array, file: file, line: line).map { try XCTUnwrap($0.int) }
            XCTAssertEqual([logprobs.count, tops.count, offsets.count], [tokens.count, tokens.count, tokens.count], "parallel lists",
                           file: file, line: line)
        }

        static func + (a: Logprobs, b: Logprobs) -> Logprobs {
            var c = a
            c.tokens += b.tokens
            c.logprobs += b.logprobs
            c.tops += b.tops
            c.offsets += b.offsets
            return c
        }
    }

    /// Each token's offset is where its text starts in the choice's text (special tokens, which
    /// the text leaves out, sit where the text they precede starts).
    func assertOffsets(_ lp: Logprobs, text: String, tokenizer: Tokenizer, promptTokens: [Int], file: StaticString = #filePath, line: UInt = #line) {
        let scalars = Array(text.unicodeScalars)
        XCTAssertEqual(lp.offsets.first, 0, file: file, line: line)
        XCTAssertEqual(lp.offsets, lp.offsets.sorted(), "offsets never go back", file: file, line: line)
        for (i, (piece, offset)) in zip(lp.tokens, lp.offsets).enumerated() {
            if i < promptTokens.count && tokenizer.isSpecial(promptTokens[i]) { continue }
            let at = String(String.UnicodeScalarView(scalars[min(offset, scalars.count)...]))
            XCTAssertTrue(at.hasPrefix(piece), "token \(i) \(piece.debugDescription) at \(offset) of \(text.debugDescription)",
                          file: file, line: line)
        }
    }

    func testEchoWithLogprobs() async throws {
        let s = try await server()
        let c = s.client
        let prompt = "And God said unto Moses"
        let ids = s.tokenizer.encode(prompt)
        let r = try await c.post("/v1/completions", #"{"prompt": "\#(prompt)", "max_tokens": 4, "temperature": 0, "echo": true, "logprobs": 2}"#)
        XCTAssertEqual(r.status, 200, r.text)
        let choice = try XCTUnwrap(r.json?["choices"]?.array?.first)
        let text = try XCTUnwrap(choice["text"]?.string)
        let lp = try Logprobs(choice["logprobs"])
        XCTAssertEqual(lp.tokens.count, ids.count + 4)
        XCTAssertEqual(lp.tokens.prefix(ids.count).map { $0 }, ids.map { s.tokenizer.decode([$0]) })
        XCTAssertNil(lp.logprobs[0], "the first prompt token has nothing before it")
        XCTAssertNil(lp.tops[0])
        for i in 1..<lp.tokens.count {
            let l = try XCTUnwrap(lp.logprobs[i], "token \(i)")
            XCTAssertLessThanOrEqual(l, 0)
            let top = try XCTUnwrap(lp.tops[i], "token \(i)")
            XCTAssertGreaterThanOrEqual(top.count, 2)
            XCTAssertEqual(top[lp.tokens[i]]?.double ?? 1, l, accuracy: 1e-6, "the token is among its alternatives")
        }
        assertOffsets(lp, text: text, tokenizer: s.tokenizer, promptTokens: ids)
        XCTAssertEqual(r.json?["usage"]?["completion_tokens"]?.int, 4)
        XCTAssertEqual(r.json?["usage"]?["prompt_tokens"]?.int, ids.count)

        // Without echo: the same completion, and the same logprobs for its tokens.
        let plain = try await c.post("/v1/completions", #"{"prompt": "\#(prompt)", "max_tokens": 4, "temperature": 0, "logprobs": 2}"#)
        let plainChoice = try XCTUnwrap(plain.json?["choices"]?.array?.first)
        XCTAssertEqual(text, prompt + (plainChoice["text"]?.string ?? "?"))
        let plainLp = try Logprobs(plainChoice["logprobs"])
        XCTAssertEqual(Array(lp.tokens.suffix(4)), plainLp.tokens)
        for (a, b) in zip(lp.logprobs.suffix(4), plainLp.logprobs) { XCTAssertEqual(a ?? 1, b ?? 2, accuracy: 1e-4) }
        XCTAssertEqual(Array(lp.offsets.suffix(4)), plainLp.offsets.map { $0 + prompt.unicodeScalars.count })

        // max_tokens 0 scores the prompt alone: the same prompt logprobs, no completion.
        let scored = try await c.post("/v1/completions", #"{"prompt": "\#(prompt)", "max_tokens": 0, "echo": true, "logprobs": 2}"#)
        XCTAssertEqual(scored.status, 200, scored.text)
        let only = try XCTUnwrap(scored.json?["choices"]?.array?.first)
        XCTAssertEqual(only["text"]?.string, prompt)
        XCTAssertEqual(only["finish_reason"]?.string, "length")
        let onlyLp = try Logprobs(only["logprobs"])
        XCTAssertEqual(onlyLp.tokens, Array(lp.tokens.prefix(ids.count)))
        XCTAssertEqual(onlyLp.offsets, Array(lp.offsets.prefix(ids.count)))
        for (a, b) in zip(onlyLp.logprobs, lp.logprobs) { XCTAssertEqual(a ?? 1, b ?? 1, accuracy: 1e-4) }
        XCTAssertEqual(scored.json?["usage"]?["completion_tokens"]?.int, 0)

        // max_tokens 0 with echo and no logprobs: the prompt back.
        let echoed = try await c.post("/v1/completions", #"{"prompt": "\#(prompt)", "max_tokens": 0, "echo": true}"#)
        XCTAssertEqual(echoed.json?["choices"]?.array?.first?["text"]?.string, prompt, echoed.text)
        XCTAssertTrue(echoed.json?["choices"]?.array?.first?["logprobs"]?.isNull ?? false)
    }

    /// Several prompts (text and token ids) with n samples each: every choice has its own
    /// prompt's logprobs.
    func testEchoLogprobsManyChoices() async throws {
        let s = try await server()
        let second = s.tokenizer.encode("In the beginning God created")
        let body = #"{"prompt": [\#(JSONWriter.write(.array(s.tokenizer.encode("And God said").map { .number(Double($0)) }))), \#(JSONWriter.write(.array(second.map { .number(Double($0)) })))], "n": 2, "max_tokens": 3, "temperature": 0, "echo": true, "logprobs": 0}"#
        let r = try await s.client.post("/v1/completions", body)
        XCTAssertEqual(r.status, 200, r.text)
        let choices = try XCTUnwrap(r.json?["choices"]?.array)
        XCTAssertEqual(choices.count, 4)
        let lps = try choices.map { try Logprobs($0["logprobs"]) }
        let first = s.tokenizer.encode("And God said")
        for (i, lp) in lps.enumerated() {
            let ids = i < 2 ? first : second
            XCTAssertEqual(lp.tokens.count, ids.count + 3, "choice \(i)")
            XCTAssertEqual(Array(lp.tokens.prefix(ids.count)), ids.map { s.tokenizer.decode([$0]) }, "choice \(i)")
            XCTAssertNil(lp.logprobs[0])
            XCTAssertTrue(lp.logprobs.dropFirst().allSatisfy { $0 != nil }, "choice \(i)")
            XCTAssertEqual(lp.tops[1]?.count, 1, "logprobs 0: the token alone")
            let text = try XCTUnwrap(choices[i]["text"]?.string)
            XCTAssertTrue(text.hasPrefix(s.tokenizer.decode(ids)), "choice \(i)")
            assertOffsets(lp, text: text, tokenizer: s.tokenizer, promptTokens: ids)
        }
        XCTAssertEqual(lps[0].tokens, lps[1].tokens, "greedy samples agree")
        for (a, b) in zip(lps[0].logprobs, lps[1].logprobs) { XCTAssertEqual(a ?? 1, b ?? 1, accuracy: 1e-4) }
        // Scoring n samples of a prompt: each has the prompt's logprobs.
        let zero = try await s.client.post("/v1/completions", body.replacingOccurrences(of: #""max_tokens": 3"#, with: #""max_tokens": 0"#))
        let zeroChoices = try XCTUnwrap(zero.json?["choices"]?.array, zero.text)
        XCTAssertEqual(zeroChoices.count, 4)
        for (i, ch) in zeroChoices.enumerated() {
            let lp = try Logprobs(ch["logprobs"])
            XCTAssertEqual(lp.tokens, Array(lps[i].tokens.prefix(lp.tokens.count)))
            XCTAssertEqual(lp.tokens.count, (i < 2 ? first : second).count)
        }
    }

    /// Streamed: each choice's first chunk is the prompt with its logprobs, then the completion's
    /// chunks; together they equal the whole answer.
    func testEchoLogprobsStreamed() async throws {
        let s = try await server()
        let body = #"{"prompt": "In the beginning", "max_tokens": 5, "temperature": 0, "echo": true, "logprobs": 1, "n": 2}"#
        let whole = try await s.client.post("/v1/completions", body)
        let wholeChoices = try XCTUnwrap(whole.json?["choices"]?.array, whole.text)
        let streamed = try await s.client.post("/v1/completions", body.replacingOccurrences(of: "{", with: #"{"stream": true, "#))
        XCTAssertEqual(streamed.events.last, "[DONE]")
        let chunks = streamed.events.dropLast().compactMap { try? JSON.parse($0) }
        let ids = s.tokenizer.encode("In the beginning")
        for i in 0..<2 {
            let mine = chunks.compactMap { $0["choices"]?.array?.first }.filter { $0["index"]?.int == i }
            let firstChunk = try XCTUnwrap(mine.first)
            XCTAssertEqual(firstChunk["text"]?.string, "In the beginning")
            let promptLp = try Logprobs(firstChunk["logprobs"])
            XCTAssertEqual(promptLp.tokens.count, ids.count)
            XCTAssertNil(promptLp.logprobs[0])
            var text = "", lp: Logprobs?
            for ch in mine {
                text += ch["text"]?.string ?? ""
                if let l = ch["logprobs"], !l.isNull { lp = try lp.map { try $0 + Logprobs(l) } ?? Logprobs(l) }
            }
            XCTAssertEqual(text, wholeChoices[i]["text"]?.string)
            let wholeLp = try Logprobs(wholeChoices[i]["logprobs"])
            XCTAssertEqual(lp?.tokens, wholeLp.tokens)
            XCTAssertEqual(lp?.offsets, wholeLp.offsets)
            for (a, b) in zip(lp?.logprobs ?? [], wholeLp.logprobs) { XCTAssertEqual(a ?? 1, b ?? 1, accuracy: 1e-4) }
            XCTAssertEqual(mine.last?["finish_reason"]?.string, "length")
        }
        // 0 tokens streamed: the prompt chunk with its logprobs, then the finish.
        let zero = try await s.client.post("/v1/completions",
                                           #"{"stream": true, "prompt": "In the beginning", "max_tokens": 0, "echo": true, "logprobs": 1}"#)
        let zc = zero.events.dropLast().compactMap { try? JSON.parse($0) }.compactMap { $0["choices"]?.array?.first }
        XCTAssertEqual(zc.first?["text"]?.string, "In the beginning", zero.text)
        XCTAssertEqual(try Logprobs(zc.first?["logprobs"]).tokens.count, ids.count)
        XCTAssertEqual(zc.last?["finish_reason"]?.string, "length")
        XCTAssertEqual(zc.map { $0["text"]?.string ?? "" }.joined(), "In the beginning")
    }

    /// What stays refused: max_tokens 0 without echo, and out-of-range values with echo.
    func testEchoRefusals() async throws {
        let c = try await server().client
        let cases: [(String, String)] = [
            (#""max_tokens": 0, "logprobs": 1"#, "max_tokens"),
            (#""max_tokens": -1, "echo": true"#, "max_tokens"),
            (#""echo": true, "logprobs": 21"#, "logprobs"),
            (#""echo": "yes", "logprobs": 1"#, "echo"),
        ]
        for (field, param) in cases {
            let r = try await c.post("/v1/completions", #"{"prompt": "And God said", \#(field)}"#)
            XCTAssertEqual(r.status, 400, "\(field): \(r.text)")
            XCTAssertEqual(r.errorParam, param, field)
        }
        let chat = try await c.post("/v1/chat/completions", #"{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0, "echo": true}"#)
        XCTAssertEqual(chat.status, 400, chat.text)
        XCTAssertEqual(chat.errorParam, "max_tokens")
    }
}
