import XCTest
@testable import Peregrine

/// Encode and decode equal the `tokenizers` library's on the committed test strings.
final class TokenizerParityTests: XCTestCase {
    static let kinds = ["llama3", "qwen2", "gpt2", "llama2", "metaspace", "digits"]

    func testEncodeAndDecodeMatchReference() throws {
        let all = try Fixtures.json(Fixtures.root + "/tokenizer_cases.json")
        for kind in Self.kinds {
            let tok = try Tokenizer(directory: Fixtures.tokenizer(kind))
            let cases = try XCTUnwrap(all[kind]?["cases"]?.array)
            XCTAssertGreaterThan(cases.count, 20)
            for c in cases {
                let text = try XCTUnwrap(c["text"]?.string)
                let ids = c["ids"]?.array?.compactMap(\.int) ?? []
                let raw = c["ids_no_special"]?.array?.compactMap(\.int) ?? []
                XCTAssertEqual(tok.encode(text), ids, "\(kind) encode \(text.debugDescription)")
                XCTAssertEqual(tok.encode(text, addSpecialTokens: false), raw, "\(kind) encode raw \(text.debugDescription)")
                XCTAssertEqual(tok.decode(ids), c["decoded"]?.string, "\(kind) decode \(text.debugDescription)")
                XCTAssertEqual(tok.decode(ids, skipSpecialTokens: true), c["decoded_skip_special"]?.string,
                               "\(kind) decode skipping specials \(text.debugDescription)")
            }
            for d in try XCTUnwrap(all[kind]?["decodes"]?.array) {
                let ids = d["ids"]?.array?.compactMap(\.int) ?? []
                XCTAssertEqual(tok.decode(ids), d["decoded"]?.string, "\(kind) decode \(ids)")
                XCTAssertEqual(tok.decode(ids, skipSpecialTokens: true), d["decoded_skip_special"]?.string, "\(kind) decode \(ids)")
            }
        }
    }

    /// Streaming decode yields the full decode, chunk by chunk, never a broken character.
    func testStreamingDecodeEqualsFullDecode() throws {
        let all = try Fixtures.json(Fixtures.root + "/tokenizer_cases.json")
        for kind in Self.kinds {
            let tok = try Tokenizer(directory: Fixtures.tokenizer(kind))
            for c in try XCTUnwrap(all[kind]?["cases"]?.array) {
                let ids = c["ids"]?.array?.compactMap(\.int) ?? []
                var stream = tok.makeStreamingDecoder(skipSpecialTokens: true)
                var text = ""
                for id in ids {
                    let piece = stream.append(id)
                    XCTAssertFalse(piece.unicodeScalars.contains("\u{FFFD}"), "\(kind): broken character streamed")
                    text += piece
                }
                text += stream.flush()
                XCTAssertEqual(text, tok.decode(ids, skipSpecialTokens: true), "\(kind) stream \(ids)")
            }
        }
    }

    func testSpecialTokenIds() throws {
        let llama3 = try Tokenizer(directory: Fixtures.tokenizer("llama3"))
        XCTAssertEqual(llama3.bosTokenId, llama3.id(of: "<|begin_of_text|>"))
        XCTAssertTrue(llama3.eosTokenIds.contains(try XCTUnwrap(llama3.id(of: "<|end_of_text|>"))))
        let qwen = try Tokenizer(directory: Fixtures.tokenizer("qwen2"))
        XCTAssertNil(qwen.bosTokenId)
        XCTAssertEqual(qwen.encode("hi", addSpecialTokens: true), qwen.encode("hi", addSpecialTokens: false))
    }

    /// Tokens are byte strings: canonically equivalent spellings are different tokens.
    func testCanonicallyEquivalentTokensStayDistinct() throws {
        let json = try JSON.parse(#"{"model": {"type": "BPE", "vocab": {"e": 0, "\u0301": 1, "\u00e9": 2, "e\u0301": 3}, "merges": ["e \u0301"]}}"#)
        let tok = try Tokenizer(json: json)
        XCTAssertEqual(tok.encode("\u{e9}"), [2])
        XCTAssertEqual(tok.encode("e\u{301}"), [3])
        XCTAssertEqual(tok.id(of: "e\u{301}"), 3)
        XCTAssertEqual(tok.id(of: "\u{e9}"), 2)
    }
}
