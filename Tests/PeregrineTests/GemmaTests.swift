import Foundation
import XCTest
@testable import Peregrine

/// Gemma 2 and 3 from GGUF files made by llama.cpp's converter (Tests/Fixtures/gguf/gemma*, by
/// scripts/make_gguf_fixture.py --gemma-only) against llama.cpp's logits on the same files; the
/// Gemma config fields and their errors; the backend operations Gemma added, against direct
/// references. The transformers parity of the Hugging Face fixtures is in ModelParityTests.
final class GemmaGGUFTests: XCTestCase {
    func logits(_ file: String, reference: String) throws -> (ours: [Float], llamacpp: [Float], ref: Reference, model: LanguageModel) {
        let ref = try Reference(model: reference)
        let model = try ModelRegistry.load(directory: Fixtures.root + "/gguf/\(file).gguf")
        XCTAssertEqual(model.config.vocabSize, ref.vocab)
        let ours = try allLogits(model, ref.promptIds + ref.greedyIds)
        let llamacpp = try Fixtures.floats(Fixtures.root + "/gguf/\(file).llamacpp_logits.bin")
        XCTAssertEqual(llamacpp.count, ours.count)
        return (ours, llamacpp, ref, model)
    }

    /// Gemma 3 F32: the same numbers as transformers (the converter's folded norms, the local and
    /// global RoPE from metadata), and within 1e-2 of llama.cpp (measured 3.2e-3, llama.cpp's
    /// own distance from transformers on this file: its GELU is a table lookup).
    func testGemma3MatchesLlamaCpp() throws {
        let (ours, llamacpp, ref, model) = try logits("gemma3-f32", reference: "gemma3")
        XCTAssertEqual(model.config.slidingWindow, [6, 6, 6, 6, 6, nil])
        XCTAssertEqual(model.config.normWeightOffset, 0)
        XCTAssertLessThan(maxAbsDiff(ours, ref.logits), 1e-4)
        let d = maxAbsDiff(ours, llamacpp)
        XCTAssertLessThan(d, 1e-2, "gemma3 GGUF vs llama.cpp: \(d)")
        XCTAssertEqual(argmaxRows(ours, ref.vocab), argmaxRows(llamacpp, ref.vocab))
    }

    /// Gemma 2 F32: llama.cpp scales attention by 1 / sqrt(head size) whatever the config's
    /// query_pre_attn_scalar (12 here, head size 16), so its logits are not transformers'; the
    /// GGUF path follows llama.cpp's rule and matches its logits.
    func testGemma2MatchesLlamaCpp() throws {
        let (ours, llamacpp, ref, model) = try logits("gemma2-f32", reference: "gemma2")
        XCTAssertEqual(model.config.attentionScale, 0.25)
        XCTAssertEqual(model.config.attentionSoftCap, 6)
        XCTAssertEqual(model.config.finalLogitSoftCap, 4)
        XCTAssertEqual(model.config.slidingWindow, [8, nil, 8, nil])
        // Measured 4.0e-3 (llama.cpp's table GELU and its tanh).
        let d = maxAbsDiff(ours, llamacpp)
        XCTAssertLessThan(d, 1e-2, "gemma2 GGUF vs llama.cpp: \(d)")
        XCTAssertGreaterThan(maxAbsDiff(ours, ref.logits), 0.1, "the scales differ, so must the logits")
        XCTAssertEqual(argmaxRows(ours, ref.vocab), argmaxRows(llamacpp, ref.vocab))
    }

    /// Gemma 3 Q8_0 (the converter's 8-bit file, embeddings included): both engines round
    /// activations to 8 bits for the products. Measured at logit scale 6.6: 0.153 from llama.cpp
    /// (2.3%, its GELU and tanh approximations on top of the rounding), and 0.308 from the f32
    /// model against llama.cpp's 0.278 (1.11 times: rounding differences compound through six
    /// layers of this small random model, in either direction).
    func testGemma3Q8MatchesLlamaCpp() throws {
        let (ours, llamacpp, ref, _) = try logits("gemma3-q8_0", reference: "gemma3")
        let scale = llamacpp.reduce(0) { max($0, abs($1)) }
        let d = maxAbsDiff(ours, llamacpp)
        XCTAssertLessThan(d, 0.03 * scale, "gemma3 Q8_0 vs llama.cpp: \(d) (scale \(scale))")
        XCTAssertLessThan(maxAbsDiff(ours, ref.logits), maxAbsDiff(llamacpp, ref.logits) * 1.15)
    }

    /// The SentencePiece vocabulary from the GGUF metadata gives the ids of the Hugging Face
    /// tokenizer.json (Gemma's: no space prefix, byte fallback), and the special tokens. (The
    /// converter stores the fixture's <start_of_turn> as a normal piece, its config naming no
    /// added tokens, so text holding it is left out.)
    func testTokenizerFromGGUFMatchesTokenizerJSON() throws {
        let gguf = try Tokenizer(directory: Fixtures.root + "/gguf/gemma3-f32.gguf")
        let hf = try Tokenizer(directory: Fixtures.model("gemma3"))
        let ref = try Reference(model: "gemma3")
        XCTAssertEqual(hf.encode(try XCTUnwrap(ref.json["prompt"]?.string)), ref.promptIds)
        for text in ["Hello, world!", "  two  spaces\tand a tab\n", "Numbers: 0 12 345 6789", "café 日本 😀"] {
            XCTAssertEqual(gguf.encode(text), hf.encode(text), text.debugDescription)
            XCTAssertEqual(gguf.decode(hf.encode(text)), hf.decode(hf.encode(text)), text.debugDescription)
        }
        XCTAssertEqual(gguf.encode("")[0], 2)  // <bos>
        XCTAssertTrue(gguf.eosTokenIds.contains(1))
    }

    func argmaxRows(_ x: [Float], _ cols: Int) -> [Int] {
        (0..<(x.count / cols)).map { r in x[(r * cols)..<((r + 1) * cols)].indices.max { x[$0] < x[$1] }! - r * cols }
    }
}

/// Gemma's tokenizer.json (a Split on " " after the Replace normalizer, no prefix, byte
/// fallback) against the `tokenizers` library on the common test strings
/// (Tests/Fixtures/models/gemma3/tokenizer_cases.json, from scripts/make_fixtures.py --gemma).
final class GemmaTokenizerTests: XCTestCase {
    func testEncodeAndDecodeMatchReference() throws {
        let dir = Fixtures.model("gemma3")
        let tok = try Tokenizer(directory: dir)
        let all = try Fixtures.json(dir + "/tokenizer_cases.json")
        let cases = try XCTUnwrap(all["cases"]?.array)
        XCTAssertGreaterThan(cases.count, 20)
        for c in cases {
            let text = try XCTUnwrap(c["text"]?.string)
            XCTAssertEqual(tok.encode(text), c["ids"]?.array?.compactMap(\.int) ?? [], "encode \(text.debugDescription)")
            XCTAssertEqual(tok.encode(text, addSpecialTokens: false), c["ids_no_special"]?.array?.compactMap(\.int) ?? [],
                           "encode raw \(text.debugDescription)")
            let ids = c["ids"]?.array?.compactMap(\.int) ?? []
            XCTAssertEqual(tok.decode(ids), c["decoded"]?.string, "decode \(text.debugDescription)")
            XCTAssertEqual(tok.decode(ids, skipSpecialTokens: true), c["decoded_skip_special"]?.string, "decode \(text.debugDescription)")
        }
        for d in try XCTUnwrap(all["decodes"]?.array) {
            let ids = d["ids"]?.array?.compactMap(\.int) ?? []
            XCTAssertEqual(tok.decode(ids), d["decoded"]?.string, "decode \(ids)")
            XCTAssertEqual(tok.decode(ids, skipSpecialTokens: true), d["decoded_skip_special"]?.string, "decode \(ids)")
        }
        XCTAssertEqual(tok.bosTokenId, 2)
    }
}

final class GemmaConfigTests: XCTestCase {
    func config(_ edit: (inout JSONObject) -> Void, model: String = "gemma3") throws -> ModelConfig {
        guard case .object(var o) = try Fixtures.json(Fixtures.model(model) + "/config.json") else { throw XCTSkip("config") }
        edit(&o)
        return try ModelConfig(json: .object(o))
    }

    /// The object without these keys.
    func removing(_ keys: [String], from o: JSONObject) -> JSONObject {
        JSONObject(o.pairs.filter { !keys.contains($0.0) })
    }

    func expectError(_ message: String, model: String = "gemma3", _ edit: (inout JSONObject) -> Void,
                     file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try config(edit, model: model), file: file, line: line) { e in
            XCTAssertTrue("\(e)".contains(message), "'\(e)' lacks '\(message)'", file: file, line: line)
        }
    }

    /// Gemma 3 configs as the Hub has them (rope_theta, rope_scaling and rope_local_base_freq,
    /// sliding_window_pattern, no layer_types) read the same as transformers' newer form.
    func testOlderGemma3ConfigFormReadsTheSame() throws {
        let new = try config { _ in }
        XCTAssertEqual(new.ropeTheta, 100000)
        XCTAssertEqual(new.ropeScaling, .linear(factor: 4))
        XCTAssertEqual(new.slidingRope, RopeParameters(theta: 1000))
        XCTAssertEqual(new.attentionScale, 0.25)
        XCTAssertNil(new.attentionSoftCap)
        XCTAssertTrue(new.qkNorm)
        let old = try config { o in
            o = removing(["rope_parameters", "layer_types"], from: o)
            o["rope_theta"] = .number(100000)
            o["rope_scaling"] = .object(JSONObject([("rope_type", .string("linear")), ("factor", .number(4))]))
            o["rope_local_base_freq"] = .number(1000)
            o["sliding_window_pattern"] = .number(6)
        }
        XCTAssertEqual(old, new)
        // What a saved config leaves out takes transformers' class defaults.
        let bare = try config { o in
            o = removing(["rope_parameters", "layer_types", "query_pre_attn_scalar", "head_dim", "tie_word_embeddings", "hidden_activation",
                          "sliding_window", "rms_norm_eps", "final_logit_softcapping"], from: o)
        }
        XCTAssertEqual(bare.headDim, 256)
        XCTAssertEqual(bare.attentionScale, 1 / 16)
        XCTAssertEqual(bare.ropeTheta, 1_000_000)
        XCTAssertEqual(bare.slidingRope, RopeParameters(theta: 10000))
        XCTAssertEqual(bare.slidingWindow, [4096, 4096, 4096, 4096, 4096, nil])
        XCTAssertTrue(bare.tieWordEmbeddings)
        XCTAssertEqual(bare.rmsNormEps, 1e-6)
        let gemma2 = try config({ o in
            o = removing(["layer_types", "attn_logit_softcapping", "final_logit_softcapping"], from: o)
        }, model: "gemma2")
        XCTAssertEqual(gemma2.slidingWindow, [8, nil, 8, nil])
        XCTAssertEqual(gemma2.attentionSoftCap, 50)
        XCTAssertEqual(gemma2.finalLogitSoftCap, 30)
        XCTAssertNil(gemma2.slidingRope)
        let uncapped = try config({ o in o["attn_logit_softcapping"] = .null; o["final_logit_softcapping"] = .null }, model: "gemma2")
        XCTAssertNil(uncapped.attentionSoftCap)
        XCTAssertNil(uncapped.finalLogitSoftCap)
    }

    func testBadGemmaConfigs() {
        expectError("query_pre_attn_scalar") { $0["query_pre_attn_scalar"] = .number(-1) }
        expectError("final_logit_softcapping") { $0["final_logit_softcapping"] = .string("x") }
        expectError("unknown layer type") { $0["layer_types"] = .array((0..<6).map { _ in .string("chunked_attention") }) }
        expectError("one type per layer") { $0["layer_types"] = .array([.string("full_attention")]) }
        expectError("sliding_window") { $0["sliding_window"] = .number(0) }
        expectError("hidden_activation 'silu'") { $0["hidden_activation"] = .string("silu") }
        expectError("bidirectional") { $0["use_bidirectional_attention"] = .bool(true) }
        expectError("rope_scaling type 'yarn2'") { o in
            o["rope_parameters"] = .object(JSONObject([("full_attention", .object(JSONObject([("rope_type", .string("yarn2"))])))]))
        }
        expectError("without a text_config") { $0["architectures"] = .array([.string("Gemma3ForConditionalGeneration")]) }
        expectError("missing 'hidden_size'", model: "gemma2") { $0 = self.removing(["hidden_size"], from: $0) }
    }

    /// A Gemma3ForConditionalGeneration checkpoint runs its text model: the fixture's config
    /// nested as text_config (the sizes the Hub's configs leave out taking Gemma3TextConfig's
    /// defaults), its weights under the language model in either naming, a vision tensor beside
    /// them, gives the logits of the fixture as a Gemma3ForCausalLM.
    func testConditionalGenerationRunsItsTextModel() throws {
        let src = Fixtures.model("gemma3")
        guard case .object(let text) = try Fixtures.json(src + "/config.json") else { return XCTFail("config") }
        let ref = try Reference(model: "gemma3")
        let seq = ref.promptIds + ref.greedyIds
        let direct = try allLogits(try ModelRegistry.load(directory: src), seq)
        for prefix in ["model.language_model.", "language_model.model."] {
            let dir = try Fixtures.tempDirectory(self)
            try FileManager.default.copyItem(atPath: src + "/tokenizer.json", toPath: dir + "/tokenizer.json")
            let top = JSONObject([("architectures", .array([.string("Gemma3ForConditionalGeneration")])), ("model_type", .string("gemma3")),
                                  ("text_config", .object(removing(["architectures", "model_type", "max_position_embeddings"], from: text))),
                                  ("eos_token_id", .number(1))])
            try JSONWriter.write(.object(top)).write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
            let st = try SafeTensorsFile(path: src + "/model.safetensors")
            var tensors: [(String, TensorView)] = try st.names.sorted().map { n in
                (n.hasPrefix("model.") ? prefix + n.dropFirst("model.".count) : n, try XCTUnwrap(st.tensor(n)))
            }
            tensors.append(("vision_tower.patch_embedding.weight", try XCTUnwrap(st.tensor("model.norm.weight"))))
            try writeSafetensors(dir + "/model.safetensors", tensors)
            let model = try ModelRegistry.load(directory: dir)
            XCTAssertEqual(model.config.maxPositions, 131_072)
            XCTAssertEqual(try allLogits(model, seq), direct, prefix)
        }
    }

    func writeSafetensors(_ path: String, _ tensors: [(String, TensorView)]) throws {
        var header = JSONObject()
        var data: [UInt8] = []
        for (name, t) in tensors {
            header[name] = .object(JSONObject([("dtype", .string(t.dtype.rawValue)), ("shape", .array(t.shape.map { .number(Double($0)) })),
                                               ("data_offsets", .array([.number(Double(data.count)), .number(Double(data.count + t.byteCount))]))]))
            data += Array(UnsafeRawBufferPointer(start: t.data, count: t.byteCount))
        }
        let json = Array(JSONWriter.write(.object(header)).utf8)
        try Data(withUnsafeBytes(of: UInt64(json.count).littleEndian) { Array($0) } + json + data).write(to: URL(fileURLWithPath: path))
    }

    /// A Gemma directory missing one of its extra norms is refused by name.
    func testMissingPostNormIsNamed() throws {
        let dir = try Fixtures.tempDirectory(self)
        let src = Fixtures.model("gemma2")
        for f in ["config.json", "tokenizer.json"] { try FileManager.default.copyItem(atPath: src + "/" + f, toPath: dir + "/" + f) }
        let st = try SafeTensorsFile(path: src + "/model.safetensors")
        try writeSafetensors(dir + "/model.safetensors", try st.names.sorted().filter { $0 != "model.layers.1.post_feedforward_layernorm.weight" }
            .map { ($0, try XCTUnwrap(st.tensor($0))) })
        XCTAssertThrowsError(try ModelRegistry.load(directory: dir)) { e in
            XCTAssertTrue("\(e)".contains("model.layers.1.post_feedforward_layernorm.weight"), "\(e)")
        }
    }
}

/// The operations Gemma added to the backend, on the CPU, against straightforward references.
final class GemmaKernelTests: XCTestCase {
    let backend = CPUBackend(pool: ThreadPool(threadCount: 2))

    func buffer(_ v: [Float]) throws -> CPUBuffer {
        let b = try backend.buffer(v.count)
        v.withUnsafeBufferPointer { backend.write($0, to: b, offset: 0) }
        return b
    }

    func values(_ n: Int, seed: UInt64, spread: Float) -> [Float] {
        var rng = SplitMix(seed: seed)
        return (0..<n).map { _ in Float(Int(rng.next() % 20001) - 10000) / 10000 * spread }
    }

    func testGeluTanhMulScaleSoftCap() throws {
        let n = 100_003  // vector body, several pool ranges and a scalar tail
        let g = values(n, seed: 1, spread: 12), u = values(n, seed: 2, spread: 3)
        let out = try backend.buffer(n)
        backend.geluTanhMul(gate: try buffer(g), up: try buffer(u), count: n, out: out)
        var worst: Double = 0
        for i in 0..<n {
            let x = Double(g[i])
            let want = 0.5 * x * (1 + tanh((2 / Double.pi).squareRoot() * (x + 0.044715 * x * x * x))) * Double(u[i])
            worst = max(worst, abs(Double(out.pointer[i]) - want) / max(1, abs(want)))
        }
        XCTAssertLessThan(worst, 2e-6, "gelu_tanh * up")

        let x = try buffer(g)
        backend.scale(x, count: n, by: 1.75)
        for i in 0..<n { XCTAssertEqual(x.pointer[i], g[i] * 1.75) }

        let c = try buffer(g + [200, -200, 0])
        backend.softCap(c, count: n + 3, cap: 5)
        worst = 0
        for (i, v) in (g + [200, -200, 0]).enumerated() {
            worst = max(worst, abs(Double(c.pointer[i]) - 5 * tanh(Double(v) / 5)))
        }
        XCTAssertLessThan(worst, 2e-6, "soft cap")
        XCTAssertEqual(c.pointer[n], 5)
        XCTAssertEqual(c.pointer[n + 1], -5)
        XCTAssertEqual(c.pointer[n + 2], 0)
    }

    /// Attention with a scale other than 1 / sqrt(head size) and soft-capped scores against a
    /// direct softmax(cap(qK * scale))V, on block sizes on and off the 16-position path.
    func testScaledSoftCappedAttention() throws {
        for (bs, kvHeads, group, hd, window, scale, cap) in [(16, 1, 2, 16, 8, Float(0.3), Float?(2.5)), (4, 2, 2, 12, nil, 0.9, 1.5),
                                                              (16, 1, 4, 32, nil, 0.125, nil)] as [(Int, Int, Int, Int, Int?, Float, Float?)] {
            let heads = kvHeads * group, row = kvHeads * hd, n = 37
            let kv = try KVStorage(backend: backend, layers: 1, blocks: (n + bs - 1) / bs, blockSize: bs, capacity: 64,
                                   kvHeads: kvHeads, headDim: hd)
            var plan = BatchPlan()
            plan.tableWidth = (64 + bs - 1) / bs
            plan.appendBlockTable((0..<Int32((n + bs - 1) / bs)).reversed())
            plan.append(tokens: Array(repeating: 0, count: n), slot: 0, position: 0, logits: .none)
            let keys = values(n * row, seed: 3, spread: 2), vals = values(n * row, seed: 4, spread: 1)
            let q = values(n * heads * hd, seed: 5, spread: 2)
            backend.storeKV(layer: 0, k: try buffer(keys), v: try buffer(vals), rows: n, plan: plan, cache: kv)
            let out = try backend.buffer(n * heads * hd)
            backend.attention(layer: 0, q: try buffer(q), rows: n, plan: plan, cache: kv, heads: heads, window: window,
                              scoring: AttentionScoring(scale: scale, softCap: cap), out: out)
            var worst: Float = 0
            for t in 0..<n {
                for h in 0..<heads {
                    let kvh = h / group, lo = window.map { max(0, t - $0 + 1) } ?? 0
                    var s = (lo...t).map { j -> Double in
                        var dot: Double = 0
                        for d in 0..<hd { dot += Double(q[(t * heads + h) * hd + d]) * Double(keys[j * row + kvh * hd + d]) }
                        let x = dot * Double(scale)
                        return cap.map { Double($0) * tanh(x / Double($0)) } ?? x
                    }
                    let m = s.max()!
                    s = s.map { exp($0 - m) }
                    let z = s.reduce(0, +)
                    for d in 0..<hd {
                        var o: Double = 0
                        for (i, j) in (lo...t).enumerated() { o += s[i] / z * Double(vals[j * row + kvh * hd + d]) }
                        worst = max(worst, abs(out.pointer[(t * heads + h) * hd + d] - Float(o)))
                    }
                }
            }
            XCTAssertLessThan(worst, 1e-5, "block size \(bs), head size \(hd), cap \(String(describing: cap))")
        }
    }
}
