import Foundation
import XCTest
@testable import Peregrine

/// Speculative decoding never changes what is generated: identical greedy tokens for every
/// drafter, and sampled tokens that follow the model's own distribution.
final class SpeculativeTests: XCTestCase {
    static let repo = URL(fileURLWithPath: Fixtures.root).deletingLastPathComponent().deletingLastPathComponent().path

    func testGreedyOutputIsUnchangedByEveryDrafter() throws {
        let dir = Self.repo + "/models/target"
        let model = try ModelRegistry.load(directory: dir)
        let tokenizer = try Tokenizer(directory: dir)
        // Input-grounded text, so prompt lookup finds matches too.
        let text = try String(contentsOfFile: Self.repo + "/models/corpus/test.txt", encoding: .utf8)
        let prompt = String(text.prefix(600)) + "\n\n" + String(text.prefix(80))
        var options = GenerationOptions()
        options.sampling = .greedy
        options.maxTokens = 40
        let generator = Generator(model: model, tokenizer: tokenizer)
        let plain = try generator.generate(prompt: prompt, options: options)
        XCTAssertEqual(plain.tokens.count, 40)
        let drafters: [(Drafter, Int, Bool)] = [
            (try ModelDrafter.load(directory: Self.repo + "/models/draft", target: model, tokenizer: tokenizer, backend: CPUBackend()), 4, false),
            (try ModelDrafter.load(directory: Self.repo + "/models/draft", target: model, tokenizer: tokenizer, backend: CPUBackend(), confidenceThreshold: 0.5), 6, true),
            (PromptLookupDrafter(maxNgram: 3), 5, false),
            (PromptLookupDrafter(maxNgram: 2), 3, true),
            (try ModelDrafter(model: try model.skippingLayers([2, 4, 6]), name: "self"), 3, false),
            (try ModelDrafter(model: try model.skippingLayers([2, 4, 6]), name: "self, F16 cache", cacheType: .f16), 3, false),
        ]
        // A drafter's cache is its backend's unless asked (f32 on the CPU).
        XCTAssertEqual((drafters[4].0 as? ModelDrafter)?.cacheType, .f32)
        XCTAssertEqual((drafters[5].0 as? ModelDrafter)?.cacheType, .f16)
        for (drafter, k, adaptive) in drafters {
            var o = options
            o.speculative = SpeculativeOptions(drafter: drafter, draftTokens: k, adaptive: adaptive)
            let r = try generator.generate(prompt: prompt, options: o)
            XCTAssertEqual(r.tokens, plain.tokens, "\(drafter.name), k \(k)")
            XCTAssertEqual(r.text, plain.text)
            let s = try XCTUnwrap(r.speculation)
            XCTAssertGreaterThan(s.accepted, 0, "\(drafter.name) accepted nothing")
            XCTAssertLessThan(s.verifications, 40, "\(drafter.name) saved no passes")
        }
    }

    func testDraftVocabularyMustMatch() throws {
        let dir = Self.repo + "/models/target"
        let model = try ModelRegistry.load(directory: dir)
        let tokenizer = try Tokenizer(directory: dir)
        XCTAssertThrowsError(try ModelDrafter.load(directory: Fixtures.model("llama"), target: model, tokenizer: tokenizer, backend: CPUBackend())) { e in
            XCTAssertTrue("\(e)".contains("vocabulary"), "\(e)")
        }
        XCTAssertThrowsError(try model.skippingLayers([99]))
        XCTAssertThrowsError(try model.skippingLayers(Set(0..<8)))
    }

    func testPromptLookupProposesWhatFollowedTheLatestMatch() throws {
        let d = PromptLookupDrafter(maxNgram: 2)
        let ctx = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3]
        XCTAssertEqual(try d.propose(context: ctx, maxTokens: 3, sampling: nil).tokens, [7, 8, 2])
        XCTAssertEqual(try d.propose(context: [5, 6, 7], maxTokens: 3, sampling: nil).tokens, [])
        var length = DraftLength(maximum: 6, adaptive: true)
        length.update(proposed: 6, accepted: 1)
        XCTAssertEqual(length.current, 2)
        length.update(proposed: 2, accepted: 2)
        XCTAssertEqual(length.current, 3)
    }

    /// The first token of many seeded speculative generations, counted against the model's own
    /// next-token distribution (top-5 at temperature 1). A chi-square test at p = 0.001 must pass
    /// for the exact verifier and fail for one that accepts every draft.
    func testSampledTokensFollowTheModelsDistribution() throws {
        let dir = Fixtures.model("llama")
        let model = try ModelRegistry.load(directory: dir)
        let tokenizer = try Tokenizer(directory: dir)
        let generator = Generator(model: model, tokenizer: tokenizer)
        let prompt = "The quick brown fox"
        var sampling = SamplingParameters()
        sampling.temperature = 1
        sampling.topK = 5
        sampling.topP = 1
        sampling.minP = 0
        // The model's distribution for the first generated token.
        let ids = tokenizer.encode(prompt)
        let cache = try PagedKVCache(model: model, slots: 1, capacity: 64)
        var plan = BatchPlan()
        plan.append(tokens: ids, slot: 0, position: 0, logits: .last)
        var logits = [Float](repeating: 0, count: model.config.vocabSize)
        try cache.prepare(&plan)
        try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
        var s = Sampler(sampling)
        let p = logits.withUnsafeMutableBufferPointer { l in s.distribution(l, context: UnsafeBufferPointer(start: nil, count: 0)) }
        XCTAssertEqual(p.ids.count, 5)

        func chiSquare(biased: Bool) throws -> Double {
            let drafter = try ModelDrafter(model: try model.skippingLayers([1]), name: "self")
            var counts = [Int32: Int]()
            let trials = 3000
            for t in 0..<trials {
                var o = GenerationOptions()
                o.sampling = sampling
                o.sampling.seed = UInt64(t)
                o.maxTokens = 2
                o.speculative = SpeculativeOptions(drafter: drafter, draftTokens: 1)
                o.speculative?.acceptEverythingForTesting = biased
                let r = try generator.generate(promptTokens: ids, options: o)
                counts[Int32(r.tokens[0]), default: 0] += 1
            }
            var chi2 = 0.0
            for (i, id) in p.ids.enumerated() {
                let expected = Double(trials) * Double(p.probabilities[i])
                chi2 += pow(Double(counts[id, default: 0]) - expected, 2) / expected
            }
            let outside = counts.filter { !p.ids.contains($0.key) }.values.reduce(0, +)
            return outside > 0 ? .infinity : chi2
        }
        let critical = 18.47  // 4 degrees of freedom, p = 0.001
        let exact = try chiSquare(biased: false)
        XCTAssertLessThan(exact, critical, "exact verifier: chi-square \(exact)")
        let biased = try chiSquare(biased: true)
        XCTAssertGreaterThan(biased, critical, "accept-everything verifier went unnoticed: chi-square \(biased)")
    }
}
