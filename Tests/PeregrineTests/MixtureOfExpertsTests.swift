import XCTest
@testable import Peregrine

/// Mixture-of-experts models (Mixtral, Qwen2-MoE with its shared expert and a dense layer,
/// Qwen3-MoE) against transformers, batch invariance of the grouped expert products, the bytes
/// a decode step reads, and refusals of inconsistent files.
final class MixtureOfExpertsTests: XCTestCase {
    static let models = ["mixtral", "qwen2_moe", "qwen2_moe-dense-layer", "qwen3_moe"]

    func testConfigsReadTheExperts() throws {
        let mixtral = try XCTUnwrap(try ModelRegistry.load(directory: Fixtures.model("mixtral")).config.experts)
        XCTAssertEqual(mixtral, ExpertConfig(count: 8, used: 2, intermediateSize: 32, normalizeWeights: true, sparseLayers: [true, true]))
        let qwen2 = try XCTUnwrap(try ModelRegistry.load(directory: Fixtures.model("qwen2_moe")).config.experts)
        XCTAssertEqual(qwen2, ExpertConfig(count: 4, used: 2, intermediateSize: 32, normalizeWeights: false, sharedIntermediateSize: 64,
                                           sparseLayers: [true, true]))
        let dense = try XCTUnwrap(try ModelRegistry.load(directory: Fixtures.model("qwen2_moe-dense-layer")).config.experts)
        XCTAssertEqual(dense.sparseLayers, [true, false])
        XCTAssertTrue(dense.normalizeWeights)
        let qwen3 = try ModelRegistry.load(directory: Fixtures.model("qwen3_moe")).config
        XCTAssertEqual(qwen3.experts?.count, 16)
        XCTAssertEqual(qwen3.experts?.used, 8)
        XCTAssertTrue(qwen3.qkNorm)
    }

    /// Sequences of different lengths in one batch give, row for row, exactly the logits each
    /// gives alone: grouping a batch's rows by expert changes no row's arithmetic.
    func testBatchedSequencesEqualSeparateRuns() throws {
        for name in Self.models {
            let ref = try Reference(model: name)
            let model = try ModelRegistry.load(directory: Fixtures.model(name))
            let seqs = [Array(ref.promptIds.prefix(23)), Array(ref.promptIds.suffix(9)), [ref.promptIds[5]], Array(ref.greedyIds.prefix(4))]
            let cache = try PagedKVCache(model: model, slots: seqs.count, capacity: 64)
            var plan = BatchPlan()
            for (s, seq) in seqs.enumerated() { plan.append(tokens: seq, slot: s, position: 0, logits: .all) }
            let v = ref.vocab, rows = seqs.reduce(0) { $0 + $1.count }
            var batched = [Float](repeating: 0, count: rows * v)
            try cache.prepare(&plan)
            try batched.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            var offset = 0
            for (s, seq) in seqs.enumerated() {
                let alone = try allLogits(model, seq)
                for r in 0..<seq.count {
                    let d = maxAbsDiff(batched[((offset + r) * v)..<((offset + r + 1) * v)], alone[(r * v)..<((r + 1) * v)])
                    XCTAssertEqual(d, 0, "\(name) sequence \(s) row \(r): a row must not depend on its batch")
                }
                offset += seq.count
            }
        }
    }

    /// Requests run together on the serving engine give, each, the tokens it gives alone.
    func testEngineBatchEqualsEachAlone() throws {
        for name in ["mixtral", "qwen3_moe"] {
            let ref = try Reference(model: name)
            let model = try ModelRegistry.load(directory: Fixtures.model(name))
            let requests = (0..<8).map { i -> EngineRequest in
                var r = EngineRequest(promptTokens: Array(ref.promptIds.prefix(5 + 6 * i)), maxTokens: 10)
                r.ignoreEOS = true
                return r
            }
            let together = try Engine(model: model, tokenizer: nil, config: EngineConfig()).generate(prompts: requests)
            for (i, r) in requests.enumerated() {
                let alone = try XCTUnwrap(try Engine(model: model, tokenizer: nil, config: EngineConfig()).generate(prompts: [r]).first)
                XCTAssertEqual(together[i].tokens, alone.tokens, "\(name) request \(i)")
            }
        }
    }

    /// A prompt's pass reads each chosen expert once; a decode step reads the chosen experts only:
    /// its bytes are the dense weights plus k of the experts per sparse layer (the active parameters).
    func testDecodeReadsOnlyChosenExperts() throws {
        let model = try ModelRegistry.load(directory: Fixtures.model("qwen3_moe"))
        let ref = try Reference(model: "qwen3_moe")
        let file = try SafeTensorsFile(path: Fixtures.model("qwen3_moe") + "/model.safetensors")
        let all = file.entries.values.reduce(0) { $0 + $1.end - $1.begin }
        // 16 experts of three 8 x 64 f32 projections in each of 2 layers; a token uses 8.
        let expertBytes = 3 * 8 * 64 * 4
        let cache = try PagedKVCache(model: model, slots: 1, capacity: 64)
        var plan = BatchPlan()
        plan.append(tokens: ref.promptIds, slot: 0, position: 0, logits: .last)
        try cache.prepare(&plan)
        _ = try model.forward(plan, kv: cache.memory)
        try cache.advance(0, by: ref.promptIds.count)
        let prefill = try XCTUnwrap(model.weightBytesRead)
        XCTAssertEqual(prefill, all, "59 tokens choose every expert, each read once")
        let steps = 5
        for i in 0..<steps {
            plan.removeAll()
            plan.append(tokens: [ref.greedyIds[i]], slot: 0, position: cache.length(of: 0), logits: .last)
            try cache.prepare(&plan)
            _ = try model.forward(plan, kv: cache.memory)
            try cache.advance(0, by: 1)
        }
        let perToken = (try XCTUnwrap(model.weightBytesRead) - prefill) / steps
        XCTAssertEqual(perToken, all - 2 * 8 * expertBytes, "one token reads 8 of 16 experts a layer")
        XCTAssertEqual(perToken, model.weightBytes, "the active parameters")
    }

    /// Files whose experts disagree with their config: one clear error each.
    func testInconsistentExpertsAreRefused() throws {
        func check(_ edit: (inout [String: JSONValue]) -> Void, _ message: String, file: StaticString = #filePath, line: UInt = #line) throws {
            let dir = try Fixtures.tempDirectory(self)
            let src = Fixtures.model("mixtral")
            for f in ["model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
                try FileManager.default.copyItem(atPath: src + "/" + f, toPath: dir + "/" + f)
            }
            var config = try XCTUnwrap(Fixtures.json(src + "/config.json").object).pairs.reduce(into: [String: JSONValue]()) { $0[$1.0] = $1.1 }
            edit(&config)
            try JSONWriter.write(.object(JSONObject(config.sorted { $0.key < $1.key }.map { ($0.key, $0.value) })))
                .write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try ModelRegistry.load(directory: dir), file: file, line: line) { e in
                XCTAssertTrue("\(e)".contains(message), "'\(e)' lacks '\(message)'", file: file, line: line)
            }
        }
        try check({ $0["num_local_experts"] = .number(4) }, "has shape [8, 64], expected [4, 64]")
        try check({ $0["num_experts_per_tok"] = .number(9) }, "experts used per token (9) must be between 1 and the expert count (8)")
        try check({ $0["num_local_experts"] = .number(16) }, "has shape [8, 64], expected [16, 64]")
        try check({ $0["intermediate_size"] = .number(64) }, "expected [64, 64]")
        try check({ $0["num_local_experts"] = nil }, "missing 'num_local_experts'")
    }
}

/// Mixture-of-experts GGUF files written by `peregrine quantize`.
final class MixtureOfExpertsGGUFTests: XCTestCase {
    /// Every MoE directory written as an F32 GGUF here (stacked experts, the shared expert and its
    /// gate, a dense layer, the weight-normalization key) runs as the directory does.
    func testDirectoriesConvertedToGGUFKeepTheirLogits() throws {
        for name in MixtureOfExpertsTests.models {
            let out = try Fixtures.tempDirectory(self) + "/\(name).gguf"
            _ = try ModelQuantizer(mix: .f32).quantize(source: Fixtures.model(name), output: out)
            let model = try ModelRegistry.load(directory: out)
            XCTAssertEqual(model.config.experts, try ModelRegistry.load(directory: Fixtures.model(name)).config.experts, name)
            let ref = try Reference(model: name)
            let d = maxAbsDiff(try allLogits(model, ref.promptIds + ref.greedyIds), ref.logits)
            XCTAssertLessThan(d, 1e-4, "\(name): \(d)")
        }
    }
}
