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

    /// Transformers' fused layout (each layer's experts as one gate_up_proj [experts, 2 x
    /// intermediate, hidden] and one down_proj [experts, hidden, intermediate]) reads as the
    /// per-expert tensors do.
    func testFusedExpertLayout() throws {
        let src = Fixtures.model("qwen3_moe"), dir = try Fixtures.tempDirectory(self)
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            try FileManager.default.copyItem(atPath: src + "/" + f, toPath: dir + "/" + f)
        }
        let file = try SafeTensorsFile(path: src + "/model.safetensors")
        let e = try XCTUnwrap(try ModelRegistry.load(directory: src).config.experts)
        var tensors: [(String, [Int], [Float])] = []
        for name in file.names where !name.contains(".mlp.experts.") {
            let t = try XCTUnwrap(file.tensor(name))
            tensors.append((name, t.shape, t.toFloat()))
        }
        for layer in 0..<e.sparseLayers.count {
            let p = "model.layers.\(layer).mlp.experts."
            func values(_ x: Int, _ proj: String) throws -> [Float] { try XCTUnwrap(file.tensor(p + "\(x).\(proj).weight")).toFloat() }
            let gateUp = try (0..<e.count).flatMap { try values($0, "gate_proj") + values($0, "up_proj") }
            let down = try (0..<e.count).flatMap { try values($0, "down_proj") }
            tensors.append((p + "gate_up_proj", [e.count, 2 * e.intermediateSize, 64], gateUp))
            tensors.append((p + "down_proj", [e.count, 64, e.intermediateSize], down))
        }
        var header: [(String, JSONValue)] = [], data: [Float] = []
        for (name, shape, v) in tensors {
            header.append((name, .object(JSONObject([("dtype", .string("F32")), ("shape", .array(shape.map { .number(Double($0)) })),
                                                     ("data_offsets", .array([.number(Double(4 * data.count)), .number(Double(4 * (data.count + v.count)))]))]))))
            data += v
        }
        let json = Array(JSONWriter.write(.object(JSONObject(header))).utf8)
        var bytes = withUnsafeBytes(of: UInt64(json.count).littleEndian) { Array($0) } + json
        data.withUnsafeBytes { bytes += $0 }
        try Data(bytes).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
        let ref = try Reference(model: "qwen3_moe")
        let fused = try allLogits(try ModelRegistry.load(directory: dir), ref.promptIds + ref.greedyIds)
        XCTAssertEqual(fused, try allLogits(try ModelRegistry.load(directory: src), ref.promptIds + ref.greedyIds))
    }

    /// Files whose experts disagree with their config: one clear error each.
    func testInconsistentExpertsAreRefused() throws {
        func check(_ edit: (inout [String: JSONValue]) -> Void, _ message: String, model: String = "mixtral",
                   file: StaticString = #filePath, line: UInt = #line) throws {
            let dir = try Fixtures.tempDirectory(self)
            let src = Fixtures.model(model)
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
        try check({ $0["shared_expert_intermediate_size"] = nil }, "missing 'shared_expert_intermediate_size'", model: "qwen2_moe")
        try check({ $0["shared_expert_intermediate_size"] = .number(32) }, "has shape [64, 64], expected [32, 64]", model: "qwen2_moe")
        try check({ $0["mlp_only_layers"] = .array([.number(5)]) }, "'mlp_only_layers' lists a layer outside 0..<2", model: "qwen2_moe")
        try check({ $0["mlp_only_layers"] = .array([.number(1)]) }, "missing tensor 'model.layers.1.mlp.gate_proj.weight'", model: "qwen2_moe")
        try check({ $0["moe_intermediate_size"] = .number(16) }, "has shape [8, 64], expected [16, 64]", model: "qwen3_moe")
    }
}

/// Mixture-of-experts GGUF files: llama.cpp's converter's layout (stacked `ffn_*_exps`, routers,
/// Qwen2-MoE's shared expert) against llama.cpp's logits on the same files
/// (scripts/make_gguf_fixture.py --moe-only), quantized experts, and files `peregrine quantize`
/// writes.
final class MixtureOfExpertsGGUFTests: XCTestCase {
    func testF32FilesMatchLlamaCppAndTransformers() throws {
        for name in ["mixtral", "qwen2_moe", "qwen3_moe"] {
            let path = Fixtures.root + "/gguf/\(name)-f32.gguf"
            let g = try GGUFFile(path: path)
            XCTAssertNotNil(g.info("blk.0.ffn_gate_exps.weight"), name)
            let model = try ModelRegistry.load(directory: path)
            XCTAssertEqual(model.config.experts?.count, try ModelRegistry.load(directory: Fixtures.model(name)).config.experts?.count)
            let ref = try Reference(model: name)
            let logits = try allLogits(model, ref.promptIds + ref.greedyIds)
            let llamacpp = try Fixtures.floats(Fixtures.root + "/gguf/\(name)-f32.llamacpp_logits.bin")
            XCTAssertEqual(llamacpp.count, logits.count)
            // Measured: 3e-6 to 2.5e-5 from llama.cpp, 5e-6 to 4.5e-5 from transformers.
            let vsLlama = maxAbsDiff(logits, llamacpp), vsHF = maxAbsDiff(logits, ref.logits)
            XCTAssertLessThan(vsLlama, 1e-4, "\(name): GGUF logits differ from llama.cpp's on the same file by \(vsLlama)")
            XCTAssertLessThan(vsHF, 1e-4, "\(name): GGUF logits differ from transformers' by \(vsHF)")
            // The tokenizer from the file's metadata encodes the prompt as transformers' did.
            let tokenizer = try Tokenizer(directory: path)
            XCTAssertEqual(tokenizer.encode(try XCTUnwrap(ref.json["prompt"]?.string)), ref.promptIds)
        }
    }

    /// Q8_0 and Q4_0 experts (llama-quantize's files) through the quantized products, against
    /// llama.cpp on the same files, and row for row the same alone as in a batch.
    func testQuantizedExpertsMatchLlamaCpp() throws {
        let ref = try Reference(model: "mixtral")
        let seq = ref.promptIds + ref.greedyIds
        for (name, type) in [("mixtral-q8_0", GGUFFile.TensorType.q8_0), ("mixtral-q4_0", .q4_0)] {
            let path = Fixtures.root + "/gguf/\(name).gguf"
            XCTAssertEqual(try GGUFFile(path: path).info("blk.0.ffn_down_exps.weight")?.type, type)
            let model = try ModelRegistry.load(directory: path)
            let logits = try allLogits(model, seq)
            let llamacpp = try Fixtures.floats(Fixtures.root + "/gguf/\(name).llamacpp_logits.bin")
            let scale = llamacpp.reduce(0) { max($0, abs($1)) }
            // Measured at logit scale 8.2 (Q8_0) and 7.4 (Q4_0): 1e-6 from llama.cpp (the same
            // 8-bit activations, the same routing); both engines 2.65 (Q8_0) and 8.04 (Q4_0) from
            // the F32 model, whose routing the rounding changes.
            let vsLlama = maxAbsDiff(logits, llamacpp), vsF32 = maxAbsDiff(logits, ref.logits), llamaVsF32 = maxAbsDiff(llamacpp, ref.logits)
            XCTAssertLessThan(vsLlama, 0.02 * scale, "\(name) logits vs llama.cpp: \(vsLlama) (scale \(scale))")
            XCTAssertLessThanOrEqual(vsF32, llamaVsF32 * 1.05, "\(name) vs the f32 model: \(vsF32); llama.cpp's: \(llamaVsF32)")
            try assertOneTokenAtATime(model, seq, give: logits, name)
        }
    }

    /// `peregrine quantize` of the Mixtral directory to Q4_0: llama.cpp's tensor names and types
    /// (routers kept F32; with 8 experts, attention's k and v in Q8_0), and llama.cpp's logits
    /// on the file written here.
    func testQuantizedMixtralDirectoryMatchesLlamaCpp() throws {
        let out = try Fixtures.tempDirectory(self) + "/mixtral-q4_0.gguf"
        _ = try ModelQuantizer(mix: .q4_0).quantize(source: Fixtures.model("mixtral"), output: out)
        let ours = try GGUFFile(path: out), theirs = try GGUFFile(path: Fixtures.root + "/gguf/mixtral-q4_0.gguf")
        XCTAssertEqual(ours.tensors.map(\.name).sorted(), theirs.tensors.map(\.name).sorted())
        for t in theirs.tensors {
            XCTAssertEqual(ours.info(t.name)?.type, t.type, t.name)
            XCTAssertEqual(ours.info(t.name)?.dims, t.dims, t.name)
        }
        for key in ["llama.expert_count", "llama.expert_used_count"] { XCTAssertEqual(ours.metadata[key]?.int, theirs.metadata[key]?.int, key) }
        let ref = try Reference(model: "mixtral")
        let logits = try allLogits(try ModelRegistry.load(directory: out), ref.promptIds + ref.greedyIds)
        let llamacpp = try Fixtures.floats(Fixtures.root + "/gguf/peregrine-mixtral-q4_0.llamacpp_logits.bin")
        let scale = llamacpp.reduce(0) { max($0, abs($1)) }
        // Measured: 1e-6 at logit scale 7.4.
        XCTAssertLessThan(maxAbsDiff(logits, llamacpp), 0.02 * scale)
    }

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

/// A random qwen3moe GGUF file of F32 weights whose rows are whole k-quant blocks (256 wide):
/// 2 layers, 8 experts of 256 with 2 a token (or `experts` of `ff`), 4 query heads over 2 KV heads
/// of 64, q/k norms, a vocabulary of 300. For the quantized expert paths the tiny transformers
/// fixtures cannot take. With the default seed and shape no router decision of the test prompt is
/// near a tie once activations are rounded to 8 bits (with other seeds a few are, for some type:
/// a flipped choice moves that row's logits by up to 40% of their scale, measured).
func writeRandomMoEGGUF(_ path: String, seed: UInt64 = 13, ff: Int = 256, experts: Int = 8) throws {
    let d = 256, vocab = 300, layers = 2, hd = 64
    var w = GGUFWriter()
    let arch = "qwen3moe"
    w.set("general.architecture", .string(arch))
    for (k, v) in [("vocab_size", vocab), ("context_length", 256), ("embedding_length", d), ("block_count", layers),
                   ("feed_forward_length", 512), ("attention.head_count", 4), ("attention.head_count_kv", 2),
                   ("attention.key_length", hd), ("attention.value_length", hd), ("expert_count", experts),
                   ("expert_used_count", 2), ("expert_feed_forward_length", ff)] {
        w.set("\(arch).\(k)", .u32(UInt32(v)))
    }
    w.set("\(arch).attention.layer_norm_rms_epsilon", .f32(1e-6))
    w.set("\(arch).rope.freq_base", .f32(1_000_000))
    var rng = SeededGenerator(seed: seed)
    func tensor(_ name: String, _ dims: [Int], scale: Float, around: Float = 0) {
        let n = dims.reduce(1, *)
        var values = [Float](repeating: 0, count: n)
        for i in 0..<n { values[i] = around + scale * (rng.nextUnit() * 2 - 1) }
        w.tensors.append(GGUFWriter.Tensor(name: name, dims: dims, type: .f32) { out in
            values.withUnsafeBytes { out.copyMemory(from: $0) }
        })
    }
    tensor("token_embd.weight", [d, vocab], scale: 1)
    for i in 0..<layers {
        let p = "blk.\(i)."
        tensor(p + "attn_norm.weight", [d], scale: 0.1, around: 1)
        tensor(p + "attn_q.weight", [d, 4 * hd], scale: 0.1)
        tensor(p + "attn_k.weight", [d, 2 * hd], scale: 0.1)
        tensor(p + "attn_v.weight", [d, 2 * hd], scale: 0.1)
        tensor(p + "attn_output.weight", [4 * hd, d], scale: 0.1)
        tensor(p + "attn_q_norm.weight", [hd], scale: 0.1, around: 1)
        tensor(p + "attn_k_norm.weight", [hd], scale: 0.1, around: 1)
        tensor(p + "ffn_norm.weight", [d], scale: 0.1, around: 1)
        tensor(p + "ffn_gate_inp.weight", [d, experts], scale: 0.3)
        tensor(p + "ffn_gate_exps.weight", [d, ff, experts], scale: 0.1)
        tensor(p + "ffn_up_exps.weight", [d, ff, experts], scale: 0.1)
        tensor(p + "ffn_down_exps.weight", [ff, d, experts], scale: 0.1)
    }
    tensor("output_norm.weight", [d], scale: 0.1, around: 1)
    tensor("output.weight", [d, vocab], scale: 0.1)
    try w.write(to: path)
}

/// A GGUF file with every tensor widened to F32 (the same values a quantized file holds).
func writeDequantizedCopy(of path: String, to out: String) throws {
    let g = try GGUFFile(path: path)
    var w = GGUFWriter()
    for key in g.metadataKeys {
        guard let range = g.rawMetadata[key], let base = g.file.base else { continue }
        w.metadata.append((key, .raw(Array(UnsafeRawBufferPointer(start: base + range.lowerBound, count: range.count)))))
    }
    for t in g.tensors {
        let values = try XCTUnwrap(g.view(t.name)).toFloat()
        w.tensors.append(GGUFWriter.Tensor(name: t.name, dims: t.dims, type: .f32) { o in values.withUnsafeBytes { o.copyMemory(from: $0) } })
    }
    try w.write(to: out)
    withExtendedLifetime(g) {}
}

/// Quantized experts of every type the products take, on a random MoE with 256-wide rows.
final class QuantizedExpertTests: XCTestCase {
    /// Each mix's experts in their type, within the rounding of 8-bit activations of the same
    /// weights widened to F32, and each row the same alone as in a batch of other sequences.
    func testQuantizedExperts() throws {
        let dir = try Fixtures.tempDirectory(self)
        let source = dir + "/moe-f32.gguf"
        try writeRandomMoEGGUF(source)
        let tokens = (0..<40).map { ($0 * 37 + 11) % 300 }
        for (mix, type) in [(QuantizationMix.q8_0, GGUFFile.TensorType.q8_0), (.q4_0, .q4_0), (.q4_K_M, .q4_K), (.q6_K, .q6_K)] {
            let out = dir + "/moe-\(mix.rawValue).gguf", widened = dir + "/moe-\(mix.rawValue)-f32.gguf"
            _ = try ModelQuantizer(mix: mix, pure: true).quantize(source: source, output: out)
            XCTAssertEqual(try GGUFFile(path: out).info("blk.1.ffn_up_exps.weight")?.type, type)
            try writeDequantizedCopy(of: out, to: widened)
            let model = try ModelRegistry.load(directory: out)
            let logits = try allLogits(model, tokens), exact = try allLogits(try ModelRegistry.load(directory: widened), tokens)
            let scale = exact.reduce(0) { max($0, abs($1)) }
            // Measured: 1.4-1.9% of the logit scale for every type.
            XCTAssertLessThan(maxAbsDiff(logits, exact), 0.03 * scale, mix.rawValue)
            // The same rows beside another sequence in one batch.
            let other = Array(tokens.reversed().prefix(17))
            let cache = try PagedKVCache(model: model, slots: 2, capacity: 64)
            var plan = BatchPlan()
            plan.append(tokens: other, slot: 0, position: 0, logits: .none)
            plan.append(tokens: tokens, slot: 1, position: 0, logits: .all)
            var batched = [Float](repeating: 0, count: tokens.count * 300)
            try cache.prepare(&plan)
            try batched.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            XCTAssertEqual(batched, logits, "\(mix.rawValue): rows beside another sequence")
        }
    }
}
