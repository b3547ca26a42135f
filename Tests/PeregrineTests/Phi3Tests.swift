import Foundation
import XCTest
@testable import Peregrine

/// Phi-3's configs (partial rotary, LongRoPE, sliding window, in transformers' current and older
/// layouts), its fused weights, and LongRoPE's choice of factors per sequence.
final class Phi3Tests: XCTestCase {
    /// A Phi-3 config.json from its fields, written with single quotes for readability.
    func config(_ fields: String) throws -> ModelConfig {
        let sizes = "'vocab_size': 100, 'hidden_size': 64, 'intermediate_size': 128, 'num_hidden_layers': 2, 'num_attention_heads': 4"
        let text = "{'architectures': ['Phi3ForCausalLM'], 'model_type': 'phi3', \(sizes), \(fields)}"
        return try ModelConfig(json: try JSON.parse(text.replacingOccurrences(of: "'", with: "\"")))
    }

    func testFixtureConfigs() throws {
        let plain = try ModelRegistry.load(directory: Fixtures.model("phi4")).config
        XCTAssertEqual(plain.architecture, "Phi3ForCausalLM")
        XCTAssertEqual(plain.rotaryDim, 16)
        XCTAssertEqual(plain.ropeScaling, .none)
        XCTAssertEqual(plain.slidingWindow, [nil, nil])
        let partial = try ModelRegistry.load(directory: Fixtures.model("phi3-partial")).config
        XCTAssertEqual(partial.rotaryDim, 8)
        XCTAssertEqual(partial.ropeInverseFrequencies().count, 4)
        XCTAssertEqual(partial.slidingWindow, [16, 16])
        let long = try ModelRegistry.load(directory: Fixtures.model("phi3.5-longrope")).config
        guard case .longrope(let l) = long.ropeScaling else { return XCTFail("not LongRoPE: \(long.ropeScaling)") }
        XCTAssertEqual(l.originalMaxPositions, 64)
        XCTAssertEqual(l.shortFactors.count, 8)
        XCTAssertEqual(l.longFactors[1], 3.5)
        // 256 positions over 64: sqrt(1 + ln 4 / ln 64) = sqrt(4/3).
        XCTAssertEqual(l.attentionFactor, (4.0 / 3).squareRoot(), accuracy: 1e-12)
    }

    /// config.json as the Phi-3/3.5 and Phi-4-mini checkpoints ship it: rope_scaling with "type",
    /// original_max_position_embeddings and partial_rotary_factor at the top level.
    func testCheckpointLayouts() throws {
        let short = [String](repeating: "1.0", count: 8).joined(separator: ", ")
        let long = [String](repeating: "4.0", count: 8).joined(separator: ", ")
        let factors = "'short_factor': [\(short)], 'long_factor': [\(long)]"
        for type in ["longrope", "su", "yarn"] {
            let c = try config("""
                'num_key_value_heads': 2, 'max_position_embeddings': 131072, 'original_max_position_embeddings': 4096,
                'rope_theta': 10000.0, 'sliding_window': 262144, 'rope_scaling': {'type': '\(type)', \(factors)}
                """)
            guard case .longrope(let l) = c.ropeScaling else { return XCTFail("\(type): not LongRoPE") }
            XCTAssertEqual(l.originalMaxPositions, 4096)
            XCTAssertEqual(l.attentionFactor, (1 + log(32.0) / log(4096.0)).squareRoot(), accuracy: 1e-12)
            XCTAssertEqual(l.longFactors, [Float](repeating: 4, count: 8))
            XCTAssertEqual(c.slidingWindow, [262144, 262144])
        }
        // Phi-3's default pretraining context when the config gives none at the top level.
        let d = try config("""
            'max_position_embeddings': 8192,
            'rope_scaling': {'type': 'longrope', \(factors), 'original_max_position_embeddings': 100}
            """)
        guard case .longrope(let dl) = d.ropeScaling else { return XCTFail("not LongRoPE") }
        XCTAssertEqual(dl.originalMaxPositions, 4096)
        // An explicit attention factor wins over the derived one.
        let e = try config("""
            'max_position_embeddings': 8192, 'original_max_position_embeddings': 1024,
            'rope_scaling': {'type': 'longrope', \(factors), 'attention_factor': 1.25}
            """)
        guard case .longrope(let el) = e.ropeScaling else { return XCTFail("not LongRoPE") }
        XCTAssertEqual(el.attentionFactor, 1.25)
        // Phi-4-mini: 3/4 of each head rotated (96 of 128), factors for its 48 pairs.
        let pairs = [String](repeating: "1.5", count: 48).joined(separator: ", ")
        let mini = try ModelConfig(json: try JSON.parse("""
            {"architectures": ["Phi3ForCausalLM"], "vocab_size": 100, "hidden_size": 3072, "intermediate_size": 8192,
             "num_hidden_layers": 1, "num_attention_heads": 24, "num_key_value_heads": 8, "partial_rotary_factor": 0.75,
             "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
             "rope_scaling": {"type": "longrope", "short_factor": [\(pairs)], "long_factor": [\(pairs)]}}
            """))
        XCTAssertEqual(mini.headDim, 128)
        XCTAssertEqual(mini.rotaryDim, 96)
        XCTAssertEqual(mini.rope.rotaryDim, 96)
        XCTAssertEqual(mini.ropeInverseFrequencies().count, 48)
        // No biases, whatever the config says.
        let biased = try config("'attention_bias': true")
        XCTAssertFalse(biased.qkvBias || biased.outputBias)
    }

    func testBadConfigs() throws {
        let base = try String(contentsOfFile: Fixtures.model("phi3.5-longrope") + "/config.json", encoding: .utf8)
        let partial = try String(contentsOfFile: Fixtures.model("phi3-partial") + "/config.json", encoding: .utf8)
        let shortList = try XCTUnwrap(base.range(of: #""short_factor": \[[^\]]*\]"#, options: .regularExpression))
        let cases: [(String, String)] = [
            (base.replacingCharacters(in: shortList, with: #""short_factor": [1.0, 2.0]"#),
             "rope_scaling 'short_factor' has 2 values, expected 8 (one per rotary pair)"),
            (base.replacingCharacters(in: shortList, with: #""short_factor": [1, 1, 1, 1, 1, 1, 1, "x"]"#),
             "'short_factor' values must be positive numbers"),
            (base.replacingCharacters(in: shortList, with: #""short_factor": [1, 1, 1, 1, 1, 1, 1, -2]"#),
             "'short_factor' values must be positive numbers"),
            (base.replacingCharacters(in: shortList, with: #""short_factor": 3"#), "needs 'short_factor', a list of 8 numbers"),
            (base.replacingOccurrences(of: #""original_max_position_embeddings": 64,"#, with: #""original_max_position_embeddings": 1,"#),
             "original_max_position_embeddings must be greater than 1"),
            (partial.replacingOccurrences(of: #""partial_rotary_factor": 0.5,"#, with: #""partial_rotary_factor": 1.5,"#),
             "'partial_rotary_factor' must be a number in (0, 1]"),
            (partial.replacingOccurrences(of: #""partial_rotary_factor": 0.5,"#, with: #""partial_rotary_factor": 0.2,"#),
             "partial_rotary_factor 0.2 rotates 3 of the head's 16 dimensions"),
            (partial.replacingOccurrences(of: #""partial_rotary_factor": 0.5,"#, with: #""partial_rotary_factor": 0.1,"#),
             "RoPE needs an even number, at least 2"),
            (base.replacingOccurrences(of: #""rope_type": "longrope""#, with: #""rope_type": "dynamic""#), "unsupported rope_scaling type 'dynamic'"),
        ]
        for (text, message) in cases {
            let dir = try Fixtures.tempDirectory(self) + "/model"
            try FileManager.default.copyItem(atPath: Fixtures.model("phi3.5-longrope"), toPath: dir)
            try text.write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
            XCTAssertThrowsError(try ModelRegistry.load(directory: dir), message) { e in
                let d = "\(e)"
                XCTAssertTrue(d.contains(message), "'\(d)' lacks '\(message)'")
                XCTAssertFalse(d.contains("\n"))
            }
        }
    }

    /// A fused matrix of the wrong shape, or missing, is named in the error.
    func testFusedWeightErrors() throws {
        let src = try SafeTensorsFile(path: Fixtures.model("phi4") + "/model.safetensors")
        for mode in ["drop", "reshape"] {
            let dir = try Fixtures.tempDirectory(self) + "/model"
            try FileManager.default.copyItem(atPath: Fixtures.model("phi4"), toPath: dir)
            var header = JSONObject()
            var data: [UInt8] = []
            for name in src.names.sorted() {
                let t = try XCTUnwrap(src.tensor(name))
                var shape = t.shape
                if name == "model.layers.1.self_attn.qkv_proj.weight" {
                    if mode == "drop" { continue }
                    shape = [shape[0] / 2, shape[1] * 2]
                }
                header[name] = .object(JSONObject([("dtype", .string(t.dtype.rawValue)), ("shape", .array(shape.map { .number(Double($0)) })),
                                                   ("data_offsets", .array([.number(Double(data.count)), .number(Double(data.count + t.byteCount))]))]))
                data += Array(UnsafeRawBufferPointer(start: t.data, count: t.byteCount))
            }
            var bytes = withUnsafeBytes(of: UInt64(JSONWriter.write(.object(header)).utf8.count).littleEndian) { Array($0) }
            bytes += Array(JSONWriter.write(.object(header)).utf8) + data
            try Data(bytes).write(to: URL(fileURLWithPath: dir + "/model.safetensors"))
            XCTAssertThrowsError(try ModelRegistry.load(directory: dir)) { e in
                let want = mode == "drop" ? "missing tensor 'model.layers.1.self_attn.qkv_proj.weight'"
                    : "tensor 'model.layers.1.self_attn.qkv_proj.weight' has shape [64, 128], expected [128, 64]"
                XCTAssertTrue("\(e)".contains(want), "\(e)")
            }
        }
    }

    /// Each sequence of a batch takes LongRoPE's factors by its own length: a sequence past the
    /// original context (long factors) beside one within it (short factors) gives each one's
    /// logits alone.
    func testLongRoPEFactorsPerSequence() throws {
        let name = "phi3.5-longrope"
        let full = try Reference(model: name), incremental = try Reference(model: name, logitsFile: "reference_logits_incremental.bin")
        let model = try ModelRegistry.load(directory: Fixtures.model(name))
        let long = full.promptIds + full.greedyIds, short = Array(full.promptIds.prefix(30))
        let cache = try PagedKVCache(model: model, slots: 2, capacity: long.count)
        var plan = BatchPlan()
        plan.append(tokens: short, slot: 0, position: 0, logits: .all)
        plan.append(tokens: long, slot: 1, position: 0, logits: .all)
        try cache.prepare(&plan)
        let v = full.vocab
        var logits = [Float](repeating: 0, count: (short.count + long.count) * v)
        try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
        // The short sequence's rows are the prompt pass's (short factors) of transformers' generation.
        let shortDiff = maxAbsDiff(logits[0..<(short.count * v)], incremental.logits[0..<(short.count * v)])
        XCTAssertLessThan(shortDiff, 1e-4)
        // The long one's are one pass over the whole sequence (long factors at every position).
        let longDiff = maxAbsDiff(logits[(short.count * v)...], full.logits)
        XCTAssertLessThan(longDiff, 1e-4)
        // And the two references differ where the factors do.
        XCTAssertGreaterThan(maxAbsDiff(full.logits[0..<(short.count * v)], incremental.logits[0..<(short.count * v)]), 0.01)
    }

    /// Logits of `sequence` read in passes of `cuts`, each pass with the sequence's prompt
    /// length `promptLength` (nil: none in the plan, the pass decides).
    func logitsInPasses(_ model: LanguageModel, _ sequence: [Int], cuts: [Int], promptLength: Int?) throws -> [Float] {
        let cache = try PagedKVCache(model: model, slots: 1, capacity: sequence.count)
        var out: [Float] = []
        var start = 0
        for end in cuts + [sequence.count] where end > start {
            var plan = BatchPlan()
            plan.append(tokens: sequence[start..<end], slot: 0, position: start, logits: .all)
            if let promptLength { plan.promptLengths = [Int32(promptLength)] }
            try cache.prepare(&plan)
            var logits = [Float](repeating: 0, count: (end - start) * model.config.vocabSize)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            out += logits
            start = end
        }
        return out
    }

    /// A prompt past LongRoPE's original context (64) takes the long factors at every position
    /// however many passes read it: in passes of 40 and 32 tokens, the logits of one pass over it
    /// (transformers'). A prompt within it (60 tokens) then generated one token at a time switches
    /// to the long factors at position 64, as transformers' generation through its cache does.
    func testLongRoPEPromptInPassesAndGeneration() throws {
        let name = "phi3.5-longrope"
        let full = try Reference(model: name), incremental = try Reference(model: name, logitsFile: "reference_logits_incremental.bin")
        let model = try ModelRegistry.load(directory: Fixtures.model(name))
        let sequence = full.promptIds + full.greedyIds
        XCTAssertEqual(sequence.count, 72)
        let chunked = try logitsInPasses(model, sequence, cuts: [40], promptLength: sequence.count)
        XCTAssertLessThan(maxAbsDiff(chunked, full.logits), 1e-4)
        // Deciding by the pass alone, the first pass would take the short factors.
        let byPass = try logitsInPasses(model, sequence, cuts: [40], promptLength: nil)
        XCTAssertGreaterThan(maxAbsDiff(byPass[0..<(40 * full.vocab)], full.logits[0..<(40 * full.vocab)]), 0.01)
        let generated = try logitsInPasses(model, sequence, cuts: Array(full.promptIds.count..<sequence.count), promptLength: full.promptIds.count)
        XCTAssertLessThan(maxAbsDiff(generated, incremental.logits), 1e-4)
    }

    /// Through the engine: a long prompt read in chunks of 16 scores its tokens as one pass over
    /// it does, and a short prompt's cached blocks (short factors) are not mapped into a long
    /// prompt with the same first tokens.
    func testLongRoPEInTheEngine() throws {
        let name = "phi3.5-longrope"
        let full = try Reference(model: name)
        let model = try ModelRegistry.load(directory: Fixtures.model(name))
        let tokenizer = try Tokenizer(directory: Fixtures.model(name))
        let sequence = full.promptIds + full.greedyIds, v = full.vocab
        var config = EngineConfig()
        config.maxBatchTokens = 16
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        var short = EngineRequest(promptTokens: Array(sequence.prefix(40)), maxTokens: 1, sampling: .greedy)
        short.ignoreEOS = true
        _ = try engine.generate(prompts: [short])
        var long = EngineRequest(promptTokens: sequence, maxTokens: 1, sampling: .greedy)
        long.ignoreEOS = true
        long.promptLogprobs = 0
        let result = try XCTUnwrap(engine.generate(prompts: [long]).first)
        XCTAssertEqual(result.cachedPromptTokens, 0, "blocks of a prompt within the original context")
        let scored = try XCTUnwrap(result.promptLogprobs)
        XCTAssertEqual(scored.count, sequence.count - 1)
        for (i, s) in scored.enumerated() {
            let row = full.logits[(i * v)..<((i + 1) * v)]
            let m = row.max()!, z = row.reduce(0) { $0 + exp($1 - m) }
            XCTAssertEqual(s.token, sequence[i + 1])
            XCTAssertEqual(s.logprob, row[row.startIndex + sequence[i + 1]] - m - log(z), accuracy: 1e-3, "position \(i + 1)")
        }
        // The same long prompt again maps its own blocks.
        XCTAssertEqual(try XCTUnwrap(engine.generate(prompts: [long]).first).cachedPromptTokens, 0, "scored prompts map no blocks")
        long.promptLogprobs = nil
        XCTAssertGreaterThan(try XCTUnwrap(engine.generate(prompts: [long]).first).cachedPromptTokens, 0)
    }

    /// The fixtures converted by llama.cpp's converter (fused attn_qkv and ffn_up, LongRoPE's
    /// factors as tensors, partial rotary as rope.dimension_count): llama.cpp's logits on the
    /// same files, and transformers'. llama.cpp runs Phi-3 without its sliding window, which this
    /// GGUF path applies as transformers does: for the windowed model the two agree on the
    /// positions the window does not yet cut (the first 16).
    func testGGUFMatchesLlamaCppAndTransformers() throws {
        for name in ModelParityTests.phi3Models {
            let path = Fixtures.root + "/gguf/\(name)-f32.gguf"
            let ref = try Reference(model: name)
            let gguf = try ModelRegistry.load(directory: path)
            let hf = try ModelRegistry.load(directory: Fixtures.model(name))
            XCTAssertEqual(gguf.config.rotaryDim, hf.config.rotaryDim, name)
            XCTAssertEqual(gguf.config.slidingWindow, hf.config.slidingWindow, name)
            XCTAssertFalse(gguf.config.ropeInterleaved)
            if case .longrope(let h) = hf.config.ropeScaling {
                guard case .longrope(let g) = gguf.config.ropeScaling else { return XCTFail("\(name): no LongRoPE in the GGUF") }
                XCTAssertEqual(g.shortFactors, h.shortFactors)
                XCTAssertEqual(g.longFactors, h.longFactors)
                XCTAssertEqual(g.originalMaxPositions, h.originalMaxPositions)
                XCTAssertEqual(g.attentionFactor, h.attentionFactor, accuracy: 1e-6)  // stored as f32
            }
            let seq = ref.promptIds + ref.greedyIds
            let logits = try allLogits(gguf, seq)
            let d = maxAbsDiff(logits, ref.logits)
            XCTAssertLessThan(d, 1e-4, "\(name): GGUF logits differ from transformers' by \(d)")
            let llamacpp = try Fixtures.floats(Fixtures.root + "/gguf/\(name)-f32.llamacpp_logits.bin")
            XCTAssertEqual(llamacpp.count, logits.count)
            let rows = hf.config.slidingWindow[0] ?? seq.count, v = ref.vocab
            let e = maxAbsDiff(logits[0..<(rows * v)], llamacpp[0..<(rows * v)])
            XCTAssertLessThan(e, 1e-4, "\(name): GGUF logits differ from llama.cpp's on the same file by \(e) (first \(rows) rows)")
            // The GGUF's own tokenizer and the greedy continuation.
            let tok = try Tokenizer(directory: path)
            let prompt = try XCTUnwrap(ref.json["prompt"]?.string)
            XCTAssertEqual(tok.encode(prompt), ref.promptIds)
            var options = GenerationOptions()
            options.sampling = .greedy
            options.maxTokens = ref.greedyIds.count
            let result = try Generator(model: gguf, tokenizer: tok).generate(prompt: prompt, options: options)
            let eos = Set(tok.eosTokenIds + gguf.config.eosTokenIds)
            XCTAssertEqual(result.tokens, Array(ref.greedyIds.prefix { !eos.contains($0) }), "\(name): greedy tokens")
        }
    }
}
