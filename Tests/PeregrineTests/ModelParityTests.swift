import XCTest
@testable import Peregrine

/// Logits and greedy tokens equal transformers' on tiny models of every supported architecture.
final class ModelParityTests: XCTestCase {
    static let f32Models = ["llama", "llama2", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "mixtral", "qwen2_moe",
                            "qwen2_moe-dense-layer", "qwen3_moe"]
    static let phi3Models = ["phi4", "phi3-partial", "phi3.5-longrope"]

    /// One forward pass over prompt + continuation, every row's logits checked.
    func checkBatchedLogits(_ name: String, tolerance: Float, logitsFile: String = "reference_logits.bin",
                            backend: CPUBackend = CPUBackend()) throws {
        let ref = try Reference(model: name, logitsFile: logitsFile)
        let model = try ModelRegistry.load(directory: Fixtures.model(name), backend: backend)
        XCTAssertEqual(model.config.vocabSize, ref.vocab)
        let seq = ref.promptIds + ref.greedyIds
        XCTAssertEqual(seq.count, ref.rows)
        let logits = try allLogits(model, seq)
        let diff = maxAbsDiff(logits, ref.logits)
        XCTAssertLessThan(diff, tolerance, "\(name): max |logit difference| \(diff)")
    }

    /// Prompt in one pass, then the continuation one token at a time through the KV cache.
    func checkIncrementalLogits(_ name: String, tolerance: Float, logitsFile: String = "reference_logits.bin") throws {
        let ref = try Reference(model: name, logitsFile: logitsFile)
        let model = try ModelRegistry.load(directory: Fixtures.model(name))
        let cache = try PagedKVCache(model: model, slots: 1, capacity: ref.rows)
        var logits = [Float](repeating: 0, count: ref.vocab)
        var plan = BatchPlan()
        plan.append(tokens: ref.promptIds, slot: 0, position: 0, logits: .last)
        try cache.prepare(&plan)
        try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
        try cache.advance(0, by: ref.promptIds.count)
        var worst = maxAbsDiff(logits, ref.row(ref.promptIds.count - 1))
        for (i, t) in ref.greedyIds.enumerated() {
            plan.removeAll()
            plan.append(tokens: [t], slot: 0, position: cache.length(of: 0), logits: .last)
            try cache.prepare(&plan)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            try cache.advance(0, by: 1)
            worst = max(worst, maxAbsDiff(logits, ref.row(ref.promptIds.count + i)))
        }
        XCTAssertLessThan(worst, tolerance, "\(name): max |logit difference| \(worst) while decoding")
    }

    func checkGreedy(_ name: String, expected: [Int]? = nil, backend: CPUBackend = CPUBackend()) throws {
        let ref = try Reference(model: name)
        let dir = Fixtures.model(name)
        let model = try ModelRegistry.load(directory: dir, backend: backend)
        let tokenizer = try Tokenizer(directory: dir)
        let prompt = try XCTUnwrap(ref.json["prompt"]?.string)
        XCTAssertEqual(tokenizer.encode(prompt), ref.promptIds, "\(name): prompt tokens")
        var options = GenerationOptions()
        options.sampling = .greedy
        options.maxTokens = ref.greedyIds.count
        let result = try Generator(model: model, tokenizer: tokenizer).generate(prompt: prompt, options: options)
        var want = expected ?? ref.greedyIds
        // Generation stops at EOS, which the reference loop did not.
        let eos = Set(tokenizer.eosTokenIds + model.config.eosTokenIds)
        if let cut = want.firstIndex(where: { eos.contains($0) }) { want = Array(want[..<cut]) }
        XCTAssertEqual(result.tokens, want, "\(name): greedy tokens")
        // Random weights emit arbitrary bytes; where they form valid text, the stream equals the decode.
        let full = tokenizer.decode(want, skipSpecialTokens: true)
        if !full.unicodeScalars.contains("\u{FFFD}") { XCTAssertEqual(result.text, full) }
    }

    /// Phi-3 (fused projections): plain (Phi-4), partial rotary with a sliding window, and
    /// LongRoPE whose original context ends inside the continuation. transformers' own
    /// generation through its cache is the incremental reference: with LongRoPE the prompt's keys
    /// keep the short factors' rotation there, while one pass over the whole sequence uses the
    /// long factors everywhere.
    func testPhi3MatchesTransformers() throws {
        for name in Self.phi3Models {
            try checkBatchedLogits(name, tolerance: 1e-4)
            try checkIncrementalLogits(name, tolerance: 1e-4, logitsFile: "reference_logits_incremental.bin")
            try checkGreedy(name)
        }
    }

    func testF32LogitsMatchTransformers() throws {
        for name in Self.f32Models { try checkBatchedLogits(name, tolerance: 1e-4) }
    }

    func testIncrementalDecodeMatchesTransformers() throws {
        for name in Self.f32Models { try checkIncrementalLogits(name, tolerance: 1e-4) }
    }

    func testGreedyTokensMatchTransformers() throws {
        for name in Self.f32Models { try checkGreedy(name) }
    }

    /// 16-bit weights: exact against f32 compute on the same rounded weights; within the
    /// format's precision against transformers computing natively in 16 bits. Where the CPU has
    /// AVX-512 BF16, BF16 products round their activations to BF16 too (`vdpbf16ps`): both
    /// ways are checked, the rounded one within BF16's precision of both references.
    func test16BitWeights() throws {
        for name in ["llama-bf16", "llama-f16"] {
            try checkBatchedLogits(name, tolerance: 1e-4, backend: CPUBackend(pool: .shared, bf16Pairs: false))
            let ref = try Reference(model: name, logitsFile: "reference_logits_native.bin")
            let scale = ref.logits.reduce(0) { max($0, abs($1)) }
            try checkBatchedLogits(name, tolerance: (name == "llama-bf16" ? 0.1 : 0.02) * scale,
                                   logitsFile: "reference_logits_native.bin")
            let rounded = try Fixtures.json(Fixtures.model(name) + "/reference.json")["greedy_ids_rounded_weights"]?.array?.compactMap(\.int)
            try checkGreedy(name, expected: rounded, backend: CPUBackend(pool: .shared, bf16Pairs: false))
            if name == "llama-bf16" && CPUFeatures.useBF16Pairs {
                try checkBatchedLogits(name, tolerance: 0.05 * scale)
                try checkGreedy(name, expected: rounded)
            }
        }
    }

    /// Sequences of different lengths in one batch give the logits each gives alone.
    func testMixedBatchEqualsSeparateRuns() throws {
        let ref = try Reference(model: "qwen2")
        let model = try ModelRegistry.load(directory: Fixtures.model("qwen2"))
        let a = Array(ref.promptIds.prefix(23)), b = Array(ref.promptIds.suffix(9)), c = [ref.promptIds[5]]
        let cache = try PagedKVCache(model: model, slots: 3, capacity: 64)
        var plan = BatchPlan()
        plan.append(tokens: a, slot: 0, position: 0, logits: .all)
        plan.append(tokens: b, slot: 1, position: 0, logits: .last)
        plan.append(tokens: c, slot: 2, position: 0, logits: .last)
        let v = ref.vocab
        var batched = [Float](repeating: 0, count: (a.count + 2) * v)
        try cache.prepare(&plan)
        try batched.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
        for (slot, seq, rows) in [(0, a, Array(0..<a.count)), (1, b, [b.count - 1]), (2, c, [0])] {
            let solo = try PagedKVCache(model: model, slots: 1, capacity: 64)
            var p = BatchPlan()
            p.append(tokens: seq, slot: 0, position: 0, logits: .all)
            var l = [Float](repeating: 0, count: seq.count * v)
            try solo.prepare(&p)
            try l.withUnsafeMutableBufferPointer { try model.forward(p, kv: solo.memory, logits: $0) }
            let offset = slot == 0 ? 0 : (slot == 1 ? a.count : a.count + 1)
            for (i, r) in rows.enumerated() {
                let d = maxAbsDiff(batched[((offset + i) * v)..<((offset + i + 1) * v)], l[(r * v)..<((r + 1) * v)])
                XCTAssertEqual(d, 0, "slot \(slot) row \(r): a row must not depend on its batch")
            }
        }
    }

    /// Trimming the cache and decoding again reproduces the same logits (speculative rollback);
    /// a copied prefix continues like the original (prefix reuse).
    func testCacheTrimAndCopy() throws {
        let ref = try Reference(model: "llama")
        let model = try ModelRegistry.load(directory: Fixtures.model("llama"))
        let cache = try PagedKVCache(model: model, slots: 2, capacity: ref.rows)
        var logits = [Float](repeating: 0, count: ref.vocab)
        func step(_ tokens: [Int], slot: Int) throws {
            var plan = BatchPlan()
            plan.append(tokens: tokens, slot: slot, position: cache.length(of: slot), logits: .last)
            try cache.prepare(&plan)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            try cache.advance(slot, by: tokens.count)
        }
        let n = ref.promptIds.count
        try step(ref.promptIds, slot: 0)
        try step([7, 8, 9], slot: 0)  // a rejected draft
        try cache.trim(0, to: n)
        try step([ref.greedyIds[0]], slot: 0)
        XCTAssertLessThan(maxAbsDiff(logits, ref.row(n)), 1e-4)
        try cache.copyPrefix(from: 0, to: 1, count: n)
        try step([ref.greedyIds[0]], slot: 1)
        XCTAssertLessThan(maxAbsDiff(logits, ref.row(n)), 1e-4)
        XCTAssertThrowsError(try cache.trim(0, to: n + 5))
    }
}
