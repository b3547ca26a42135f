import XCTest
@testable import Peregrine

/// `PerplexityEvaluator` against llama-perplexity on the same files (Tests/Fixtures/gguf/
/// perplexity.json, made by scripts/make_gguf_fixture.py).
final class PerplexityTests: XCTestCase {
    func evaluate(_ name: String, ctx: Int = 128, batch: Int = 128, cacheType: KVCacheType? = nil) throws -> PerplexityEvaluator.Result {
        let path = Fixtures.root + "/gguf/\(name).gguf"
        let model = try ModelRegistry.load(directory: path)
        let tokenizer = try Tokenizer(directory: path)
        let text = try String(contentsOfFile: Fixtures.root + "/gguf/perplexity.txt", encoding: .utf8)
        return try PerplexityEvaluator(model: model, context: ctx, batch: batch, cacheType: cacheType)
            .evaluate(tokens: tokenizer.encode(text), bos: tokenizer.addedBOS)
    }

    func testMatchesLlamaPerplexity() throws {
        let ref = try Fixtures.json(Fixtures.root + "/gguf/perplexity.json")
        // Measured: F32 0.007%, Q4_K_M 0.006%, Q6_K 0.06%, Q8_0 0.12% apart. Peregrine rounds
        // activations to 8 bits for its quantized products as llama.cpp does, so mostly the
        // summation order differs (llama-perplexity batches four chunks at once).
        for name in ["llama-f32", "llama-q8_0", "llama256-q4_k_m", "llama256-q6_k"] {
            let tolerance = 0.003
            let expected = try XCTUnwrap(ref["llama.cpp"]?[name]?["perplexity"]?.double)
            let expectedError = try XCTUnwrap(ref["llama.cpp"]?[name]?["uncertainty"]?.double)
            let r = try evaluate(name)
            XCTAssertEqual(r.chunks, 9, name)
            XCTAssertEqual(r.scoredTokens, 9 * 63, name)
            XCTAssertEqual(r.perplexity, expected, accuracy: expected * tolerance, name)
            XCTAssertEqual(r.uncertainty, expectedError, accuracy: expectedError * 0.02, name)
        }
    }

    func testBatchSizeDoesNotChangeTheResult() throws {
        let whole = try evaluate("llama-f32", batch: 128), pieces = try evaluate("llama-f32", batch: 24)
        XCTAssertEqual(whole.perplexity, pieces.perplexity, accuracy: whole.perplexity * 1e-5)
    }

    /// The cache follows the backend unless one is asked for (f32 on the CPU), and an F16 cache
    /// is the one the chunks are read from: its rounded keys and values move the estimate, by
    /// little.
    func testCacheTypeDefaultsToTheBackendsAndCanBeAsked() throws {
        let model = try ModelRegistry.load(directory: Fixtures.root + "/gguf/llama-f32.gguf")
        XCTAssertEqual(try PerplexityEvaluator(model: model, context: 128).cacheType, .f32)
        XCTAssertEqual(try PerplexityEvaluator(model: model, context: 128, cacheType: .f16).cacheType, .f16)
        let f32 = try evaluate("llama-f32"), f16 = try evaluate("llama-f32", cacheType: .f16)
        XCTAssertEqual(f32.perplexity, try evaluate("llama-f32", cacheType: .f32).perplexity)
        XCTAssertNotEqual(f16.perplexity, f32.perplexity)
        XCTAssertEqual(f16.perplexity, f32.perplexity, accuracy: f32.perplexity * 1e-3)
    }

    func testTooShortTextIsAnError() throws {
        let model = try ModelRegistry.load(directory: Fixtures.root + "/gguf/llama-f32.gguf")
        XCTAssertThrowsError(try PerplexityEvaluator(model: model, context: 128).evaluate(tokens: Array(0..<200), bos: nil)) { e in
            XCTAssertTrue("\(e)".contains("needs at least 256"), "\(e)")
        }
        XCTAssertThrowsError(try PerplexityEvaluator(model: model, context: 4096))
    }
}
