import XCTest
@testable import Peregrine

/// The shipped reference model (models/target, BF16 weights) against transformers computing in f32
/// on the same weights: logits at every greedy step and the greedy text. Exact within f32 where
/// the products keep f32 activations; where the CPU has AVX-512 BF16 the default rounds the
/// products' activations to BF16 (`vdpbf16ps`), checked within BF16's precision, same text.
final class ReferenceModelTests: XCTestCase {
    static let modelDir = URL(fileURLWithPath: Fixtures.root).deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("models/target").path

    func testLogitsAndGreedyTextMatchTransformers() throws {
        try check(backend: CPUBackend(pool: .shared, bf16Pairs: false), tolerance: 1e-4)
        if CPUFeatures.useBF16Pairs { try check(backend: CPUBackend(), tolerance: 0.01, relative: true) }
    }

    /// `tolerance`: the largest |logit difference| allowed, or (`relative`) that fraction of the
    /// reference's largest |logit|.
    func check(backend: CPUBackend, tolerance: Float, relative: Bool = false) throws {
        let dir = Fixtures.root + "/reference-target"
        let ref = try Fixtures.json(dir + "/reference.json")
        let logitsRef = try Fixtures.floats(dir + "/reference_logits.bin")
        let promptIds = ref["prompt_ids"]?.array?.compactMap(\.int) ?? []
        let greedy = ref["greedy_ids"]?.array?.compactMap(\.int) ?? []
        let vocab = try XCTUnwrap(ref["vocab"]?.int)

        let model = try ModelRegistry.load(directory: Self.modelDir, backend: backend)
        let tokenizer = try Tokenizer(directory: Self.modelDir)
        let prompt = try XCTUnwrap(ref["prompt"]?.string)
        XCTAssertEqual(tokenizer.encode(prompt), promptIds)

        // Teacher-forced through the KV cache: row i is the logits after prompt + greedy[..<i].
        let cache = try PagedKVCache(model: model, slots: 1, capacity: promptIds.count + greedy.count)
        var logits = [Float](repeating: 0, count: vocab)
        var plan = BatchPlan()
        var next = promptIds
        var worst: Float = 0
        for i in 0..<greedy.count {
            plan.removeAll()
            plan.append(tokens: next, slot: 0, position: cache.length(of: 0), logits: .last)
            try cache.prepare(&plan)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            try cache.advance(0, by: next.count)
            worst = max(worst, maxAbsDiff(logits, logitsRef[(i * vocab)..<((i + 1) * vocab)]))
            next = [greedy[i]]
        }
        let bound = relative ? tolerance * logitsRef.reduce(0) { max($0, abs($1)) } : tolerance
        XCTAssertLessThan(worst, bound, "max |logit difference| \(worst)")

        var options = GenerationOptions()
        options.sampling = .greedy
        options.maxTokens = greedy.count
        let result = try Generator(model: model, tokenizer: tokenizer).generate(prompt: prompt, options: options)
        XCTAssertEqual(result.tokens, greedy)
        XCTAssertEqual(result.text, ref["greedy_text"]?.string)
    }
}
