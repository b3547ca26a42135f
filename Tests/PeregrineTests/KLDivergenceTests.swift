import XCTest
@testable import Peregrine

/// KL divergence from a base model's token distributions: zero against itself, equal to a direct
/// computation from both models' logits, and llama-perplexity's files and figures
/// (Tests/Fixtures/imatrix, made by scripts/make_imatrix_fixture.py).
final class KLDivergenceTests: XCTestCase {
    static let text = Fixtures.root + "/gguf/perplexity.txt"

    func tokens(_ path: String) throws -> (tokens: [Int], bos: Int?) {
        let tokenizer = try Tokenizer(directory: path)
        return (tokenizer.encode(try String(contentsOfFile: Self.text, encoding: .utf8)), tokenizer.addedBOS)
    }

    /// Writes the base file of the model at `path` (chunks of `ctx`).
    func writeBase(_ path: String, to out: String, ctx: Int = 128, chunks: Int = 3) throws -> PerplexityEvaluator.Result {
        let model = try ModelRegistry.load(directory: path)
        let (t, bos) = try tokens(path)
        let writer = try KLDivergenceBaseWriter(path: out, context: ctx, vocabulary: model.config.vocabSize, chunks: chunks,
                                                tokens: t[0..<(chunks * ctx)])
        let r = try PerplexityEvaluator(model: model, context: ctx, batch: ctx).evaluate(tokens: t, bos: bos, maxChunks: chunks,
                                                                                        scored: { try writer.append($0.logits, target: $0.target) })
        try writer.finish()
        return r
    }

    func compare(_ path: String, base: String, batch: Int = 128) throws -> KLDivergenceStatistics {
        let model = try ModelRegistry.load(directory: path)
        return try KLDivergenceEvaluator(model: model, batch: batch).evaluate(base: try KLDivergenceBase(path: base),
                                                                             bos: try Tokenizer(directory: path).addedBOS)
    }

    func testModelAgainstItself() throws {
        let dir = try Fixtures.tempDirectory(self)
        let path = Fixtures.root + "/gguf/llama-f32.gguf"
        let ppl = try writeBase(path, to: dir + "/base.kld")
        let s = try compare(path, base: dir + "/base.kld", batch: 40)
        XCTAssertEqual(s.count, 3 * 63)
        XCTAssertEqual(s.sameTopFraction.value, 1)
        // Only the base's 16-bit rounding of its log-probabilities (steps of up to 16/65535)
        // separates the two. Measured: mean 1.3e-6, largest 2.3e-5.
        XCTAssertLessThan(s.meanDivergence.value, 1e-5)
        XCTAssertLessThan(s.divergencePercentiles()[0].value, 1e-4)
        XCTAssertEqual(s.perplexity.value, ppl.perplexity, accuracy: 1e-6 * ppl.perplexity)
        XCTAssertEqual(s.perplexityRatio.value, 1, accuracy: 1e-4)
        XCTAssertEqual(s.rmsProbabilityChange.value, 0, accuracy: 1e-4)
    }

    /// A quantized model against the F32 one, beside KL(p || q), top-1 agreement and both
    /// perplexities computed here from both models' full logits of each chunk.
    func testMatchesDirectComputation() throws {
        let dir = try Fixtures.tempDirectory(self)
        let base = Fixtures.root + "/gguf/llama-f32.gguf", quantized = Fixtures.root + "/gguf/llama-q4_0.gguf"
        _ = try writeBase(base, to: dir + "/base.kld")
        let s = try compare(quantized, base: dir + "/base.kld")

        let p = try ModelRegistry.load(directory: base), q = try ModelRegistry.load(directory: quantized)
        let (t, bos) = try tokens(base)
        let v = p.config.vocabSize
        var kl: [Double] = [], same = 0, nllP = 0.0, nllQ = 0.0
        for c in 0..<3 {
            var chunk = Array(t[(128 * c)..<(128 * c + 128)])
            chunk[0] = try XCTUnwrap(bos)
            let lp = try allLogits(p, chunk), lq = try allLogits(q, chunk)
            for pos in 64..<127 {
                let a = logSoftmax(lp[(pos * v)..<((pos + 1) * v)]), b = logSoftmax(lq[(pos * v)..<((pos + 1) * v)])
                kl.append(zip(a, b).reduce(0) { $0 + exp($1.0) * ($1.0 - $1.1) })
                if a.firstIndex(of: a.max()!) == b.firstIndex(of: b.max()!) { same += 1 }
                nllP -= a[chunk[pos + 1]]
                nllQ -= b[chunk[pos + 1]]
            }
        }
        let mean = kl.reduce(0, +) / Double(kl.count)
        XCTAssertEqual(s.count, kl.count)
        // Measured: the base's 16-bit log-probabilities move the mean by 1e-6 of it.
        XCTAssertEqual(s.meanDivergence.value, mean, accuracy: 1e-3 * mean)
        XCTAssertGreaterThan(mean, 1e-4, "the quantized model differs")
        XCTAssertEqual(s.sameTop, same)
        XCTAssertEqual(s.basePerplexity.value, exp(nllP / Double(kl.count)), accuracy: 1e-4 * s.basePerplexity.value)
        XCTAssertEqual(s.perplexity.value, exp(nllQ / Double(kl.count)), accuracy: 1e-5 * s.perplexity.value)
        let sorted = kl.sorted()
        XCTAssertEqual(s.divergencePercentiles()[0].value, sorted.last!, accuracy: 1e-3 * sorted.last!)
        XCTAssertEqual(kl.count % 2, 1)
        XCTAssertEqual(s.divergencePercentiles()[5].value, sorted[kl.count / 2], accuracy: 1e-2 * mean, "median")
    }

    func logSoftmax(_ row: ArraySlice<Float>) -> [Double] {
        let m = Double(row.max()!)
        let lse = m + log(row.reduce(0.0) { $0 + exp(Double($1) - m) })
        return row.map { Double($0) - lse }
    }

    /// llama-perplexity's base file read here, and its statistics for the Q8_0 file against its
    /// own base and against ours.
    func testLlamaPerplexityFiles() throws {
        let fixtures = Fixtures.root + "/imatrix"
        let ref = try Fixtures.json(fixtures + "/kl-divergence.json")
        let theirs = try KLDivergenceBase(path: fixtures + "/llama-f32.kld")
        let path = Fixtures.root + "/gguf/llama-f32.gguf"
        XCTAssertEqual(theirs.context, 128)
        XCTAssertEqual(theirs.chunks, 3)
        XCTAssertEqual(theirs.tokens, Array(try tokens(path).tokens.prefix(3 * 128)))
        let dir = try Fixtures.tempDirectory(self)
        _ = try writeBase(path, to: dir + "/ours.kld")
        let ours = try KLDivergenceBase(path: dir + "/ours.kld")
        var worst: Float = 0
        for c in 0..<3 {
            for i in 0..<63 {
                let a = theirs.row(chunk: c, index: i), b = ours.row(chunk: c, index: i)
                for t in 0..<theirs.vocabulary where a.logProbability(t) > -16 { worst = max(worst, abs(a.logProbability(t) - b.logProbability(t))) }
            }
        }
        // Measured: 2.3e-4 (both engines' F32 logits, each rounded to 16 bits; llama.cpp without
        // flash attention, whose CPU kernel rounds to f16 inside).
        XCTAssertLessThan(worst, 1e-3)

        for (base, key) in [(theirs.path, "llama.cpp base"), (ours.path, "peregrine base")] {
            let s = try compare(Fixtures.root + "/gguf/llama-q8_0.gguf", base: base)
            let r = try XCTUnwrap(ref[key], key)
            let kld = try XCTUnwrap(r["mean_kld"]?.double), top = try XCTUnwrap(r["same_top_p"]?.double)
            let ppl = try XCTUnwrap(r["ppl"]?.double), basePPL = try XCTUnwrap(r["base_ppl"]?.double)
            print(String(format: "%@: KLD %.6f (llama-perplexity %.6f), same top %.3f%% (%.3f%%), PPL %.4f (%.4f), base PPL %.4f (%.4f)",
                         key, s.meanDivergence.value, kld, 100 * s.sameTopFraction.value, top, s.perplexity.value, ppl,
                         s.basePerplexity.value, basePPL))
            // Measured: KL 0.007191 against 0.007195, the same top token at the same 94.709% of
            // positions, PPL 0.008% apart (both engines' Q8_0 products: the same 8-bit
            // activations summed in another order); the base's PPL equal to 7 digits.
            XCTAssertEqual(s.meanDivergence.value, kld, accuracy: 0.01 * kld, key)
            XCTAssertEqual(100 * s.sameTopFraction.value, top, accuracy: 0.6, key)
            XCTAssertEqual(s.perplexity.value, ppl, accuracy: 0.001 * ppl, key)
            XCTAssertEqual(s.basePerplexity.value, basePPL, accuracy: 1e-5 * basePPL, key)
        }
    }

    func testBadFiles() throws {
        let dir = try Fixtures.tempDirectory(self)
        let good = try FileSystem.read(Fixtures.root + "/imatrix/llama-f32.kld")
        func fails(_ bytes: [UInt8], _ message: String, file: StaticString = #filePath, line: UInt = #line) {
            let path = dir + "/bad.kld"
            _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
            XCTAssertThrowsError(try KLDivergenceBase(path: path), file: file, line: line) { e in
                XCTAssertTrue("\(e)".contains(message), "'\(e)' lacks '\(message)'", file: file, line: line)
            }
        }
        fails([], "truncated")
        fails(Array("_logitz_".utf8) + Array(good.dropFirst(8)), "does not start with _logits_")
        fails(Array(good.dropLast(2)), "bytes of distributions")
        fails(good + [0, 0], "bytes of distributions")
        var lying = good
        lying[16] = 0xff; lying[17] = 0xff; lying[18] = 0xff  // chunks
        fails(lying, "tokens do not fit")
        var badToken = good
        badToken[20] = 0xff; badToken[21] = 0xff  // the first token, beyond the vocabulary
        fails(badToken, "outside the vocabulary")
        // Distributions over another vocabulary.
        XCTAssertThrowsError(try compare(Fixtures.model("llama2"), base: Fixtures.root + "/imatrix/llama-f32.kld")) { e in
            XCTAssertTrue("\(e)".contains("vocabulary"), "\(e)")
        }
    }
}
