import XCTest
@testable import Peregrine

/// Q2_K and Q3_K against llama.cpp (fixtures of scripts/make_gguf_fixture.py --low-k-only): the
/// tensor types of its Q2_K and Q3_K_S/M/L mixes, its quantizer's bytes from plain rounding, its
/// logits on its files and on the files written here.
final class LowBitKQuantTests: XCTestCase {
    static let source = Fixtures.root + "/gguf/llama256-f16.gguf"
    static let mixes: [QuantizationMix] = [.q2_K, .q3_K_S, .q3_K_M, .q3_K_L]

    func quantize(_ mix: QuantizationMix) throws -> String {
        let out = try Fixtures.tempDirectory(self) + "/\(mix.rawValue).gguf"
        _ = try ModelQuantizer(mix: mix).quantize(source: Self.source, output: out)
        return out
    }

    func testMixesGiveLlamaCppTensorTypes() throws {
        let types = try XCTUnwrap(Fixtures.json(Fixtures.root + "/gguf/llama256-low-k-types.json")["types"])
        for mix in Self.mixes {
            let ours = try GGUFFile(path: try quantize(mix))
            let expected = try XCTUnwrap(types[mix.rawValue]?.object, mix.rawValue)
            XCTAssertEqual(ours.tensors.count, expected.count, mix.rawValue)
            for (name, type) in zip(expected.keys, expected.values) {
                XCTAssertEqual(ours.info(name)?.type.name, type.string, "\(mix.rawValue): \(name)")
            }
            XCTAssertEqual(ours.metadata["general.file_type"], .uint(UInt64(mix.fileType)), mix.rawValue)
        }
    }

    /// Plain rounding gives llama-quantize's bytes for every Q2_K and Q3_K tensor of its files.
    func testPlainRoundingIsLlamaQuantizeByteForByte() throws {
        let source = try GGUFFile(path: Self.source)
        var compared = [DType: Int]()
        for name in ["q2_k", "q3_k_m"] {
            let theirs = try GGUFFile(path: Fixtures.root + "/gguf/llama256-\(name).gguf")
            for t in theirs.tensors {
                guard let type = t.type.dtype, type == .q2_K || type == .q3_K else { continue }
                let x = try XCTUnwrap(source.view(t.name)).toFloat(), q = try XCTUnwrap(theirs.view(t.name))
                var bytes = [UInt8](repeating: 0, count: type.byteCount(elements: x.count))
                x.withUnsafeBufferPointer { s in bytes.withUnsafeMutableBytes { Quantizer.quantize(type, s.baseAddress!, count: x.count, into: $0.baseAddress!) } }
                XCTAssertTrue(bytes == Array(UnsafeRawBufferPointer(start: q.data, count: q.byteCount)), "\(name): \(t.name)")
                compared[type, default: 0] += 1
            }
        }
        // Q2_K: 9 tensors of the Q2_K file; Q3_K: 6 of the Q2_K file's and 9 of the Q3_K_M file's.
        XCTAssertEqual(compared, [.q2_K: 9, .q3_K: 15])
    }

    /// Peregrine on llama.cpp's Q2_K and Q3_K_M files against llama.cpp's logits, and llama.cpp on
    /// the files written here (its logits committed) against Peregrine's on them.
    func testLogitsMatchLlamaCpp() throws {
        let ref = try Reference(model: "llama")
        let seq = ref.promptIds + ref.greedyIds
        let f16 = try Fixtures.floats(Fixtures.root + "/gguf/llama256-f16.llamacpp_logits.bin")
        let scale = f16.reduce(0) { max($0, abs($1)) }
        for mix in [QuantizationMix.q2_K, .q3_K_M] {
            let name = mix.rawValue.lowercased()
            let path = Fixtures.root + "/gguf/llama256-\(name).gguf"
            let theirs = try allLogits(try ModelRegistry.load(directory: path), seq)
            let llamaOnTheirs = try Fixtures.floats(Fixtures.root + "/gguf/llama256-\(name).llamacpp_logits.bin")
            let out = try quantize(mix)
            let ours = try allLogits(try ModelRegistry.load(directory: out), seq)
            let llamaOnOurs = try Fixtures.floats(Fixtures.root + "/gguf/peregrine-llama256-\(name).llamacpp_logits.bin")
            let a = maxAbsDiff(theirs, llamaOnTheirs), b = maxAbsDiff(ours, llamaOnOurs)
            print(String(format: "%@: llama.cpp's file %.4f apart, ours %.4f (scale %.2f); from F16: %.3f and %.3f", mix.rawValue, a, b, scale,
                         maxAbsDiff(llamaOnTheirs, f16), maxAbsDiff(llamaOnOurs, f16)))
            // The same 8-bit products summed in another order (tolerances of the other types).
            XCTAssertLessThan(a, 0.05 * scale, "\(mix.rawValue) on llama.cpp's file")
            XCTAssertLessThan(b, 0.05 * scale, "\(mix.rawValue) on our file")
            XCTAssertLessThanOrEqual(maxAbsDiff(llamaOnOurs, f16), 1.2 * maxAbsDiff(llamaOnTheirs, f16), mix.rawValue)
        }
    }

    /// llama.cpp's rules on a 32-layer model (llama-quant.cpp: Q2_K's v by grouped heads,
    /// Q3_K_M's first two v and first sixteenth of ffn_down, eight experts, fallbacks).
    func testMixRulesByLayer() {
        func type(_ mix: QuantizationMix, _ name: String, cols: Int = 4096, gqa: Int = 4, experts: Int = 0, tied: Bool = false) -> DType {
            mix.type(of: name, cols: cols, isMatrix: true, layers: 32, tied: tied, experts: experts, gqa: gqa)
        }
        XCTAssertEqual(type(.q2_K, "blk.5.attn_v.weight"), .q4_K)
        XCTAssertEqual(type(.q2_K, "blk.5.attn_v.weight", gqa: 2), .q3_K)
        XCTAssertEqual(type(.q2_K, "blk.5.attn_q.weight"), .q2_K)
        XCTAssertEqual(type(.q2_K, "blk.31.ffn_down.weight"), .q3_K)
        XCTAssertEqual(type(.q2_K, "blk.0.attn_output.weight"), .q3_K)
        XCTAssertEqual(type(.q2_K, "blk.0.attn_output.weight", experts: 8), .q5_K)
        XCTAssertEqual(type(.q2_K, "blk.0.attn_v.weight", experts: 8), .q8_0)
        XCTAssertEqual(type(.q2_K, "output.weight"), .q6_K)
        XCTAssertEqual(type(.q2_K, "token_embd.weight"), .q2_K)
        XCTAssertEqual(type(.q2_K, "token_embd.weight", tied: true), .q6_K)
        for (i, v, down) in [(0, DType.q5_K, DType.q5_K), (1, .q5_K, .q5_K), (2, .q4_K, .q4_K), (31, .q4_K, .q4_K)] {
            XCTAssertEqual(type(.q3_K_M, "blk.\(i).attn_v.weight"), v, "Q3_K_M attn_v \(i)")
            XCTAssertEqual(type(.q3_K_M, "blk.\(i).attn_qkv.weight"), v, "Q3_K_M attn_qkv \(i)")
            XCTAssertEqual(type(.q3_K_M, "blk.\(i).ffn_down.weight"), down, "Q3_K_M ffn_down \(i)")
        }
        XCTAssertEqual(type(.q3_K_M, "blk.3.attn_output.weight"), .q4_K)
        XCTAssertEqual(type(.q3_K_M, "blk.3.ffn_up.weight"), .q3_K)
        XCTAssertEqual(type(.q3_K_L, "blk.3.attn_v.weight"), .q5_K)
        XCTAssertEqual(type(.q3_K_L, "blk.3.ffn_down.weight"), .q5_K)
        XCTAssertEqual(type(.q3_K_L, "blk.3.attn_output.weight"), .q5_K)
        XCTAssertEqual(type(.q3_K_L, "blk.3.attn_output.weight", experts: 8), .q3_K)
        XCTAssertEqual(type(.q3_K_L, "blk.3.attn_k.weight"), .q3_K)
        XCTAssertEqual(type(.q3_K_S, "blk.0.attn_v.weight"), .q3_K)
        XCTAssertEqual(type(.q3_K_S, "blk.0.ffn_down.weight"), .q3_K)
        XCTAssertEqual(type(.q3_K_S, "blk.0.attn_output.weight", experts: 8), .q5_K)
        // Rows that are not whole 256-value blocks: Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1.
        XCTAssertEqual(type(.q3_K_S, "blk.3.ffn_down.weight", cols: 1408), .q4_0)
        XCTAssertEqual(type(.q3_K_M, "blk.3.ffn_down.weight", cols: 1408), .q5_0)
        XCTAssertEqual(type(.q3_K_L, "blk.3.ffn_down.weight", cols: 1408), .q5_1)
    }
}

extension CUDABackendTests {
    /// Q2_K and Q3_K files on the GPU (repacked at load, dequantized in registers for one token,
    /// widened to BF16 for cuBLAS over many) against the CPU's integer kernels on the same files:
    /// the reference model (real weights, as the other quantized GPU tests use) and a random MoE
    /// with 256-wide rows (the expert products), whose routers' near ties may go the other way
    /// under BF16 prompt products (`assertMatchesCPU` lets one position in ten differ there).
    /// Skips without a GPU.
    func testLowBitKQuantsMatchCPU() throws {
        let gpu = try backend()
        let dir = try Fixtures.tempDirectory(self)
        let moe = dir + "/moe-f32.gguf"
        try writeRandomMoEGGUF(moe)
        let target = CLITests.repo.appendingPathComponent("models/target").path
        for (i, (source, mix, pure)) in [(target, QuantizationMix.q3_K_S, true), (target, .q2_K, true), (target, .q3_K_M, false),
                                         (moe, .q3_K_S, true), (moe, .q2_K, true)].enumerated() {
            let out = dir + "/\(i)-\(mix.rawValue).gguf"
            _ = try ModelQuantizer(mix: mix, pure: pure).quantize(source: source, output: out)
            try assertMatchesCPU(out, gpu)
        }
    }
}
