import XCTest
@testable import Peregrine
import PeregrineInt8

/// The non-uniform 4-bit types IQ4_NL and IQ4_XS: the layout as ggml defines it, quantization
/// byte for byte as llama-quantize writes it, llama.cpp's mix rules for the file types of the
/// same names, and logits against llama.cpp on files from either quantizer (fixtures from
/// scripts/make_gguf_fixture.py --iq4-only).
final class IQ4Tests: XCTestCase {
    static let mixes: [(QuantizationMix, String, DType)] = [(.iq4_nl, "iq4_nl", .iq4_nl), (.iq4_xs, "iq4_xs", .iq4_xs)]

    /// Hand-built blocks: IQ4_NL's scale times the levels its nibbles select; IQ4_XS's 6-bit
    /// sub-block scales from the high-bit word and the low nibbles.
    func testLayout() {
        var nl = [UInt8](repeating: 0, count: 18)
        let half = Half.floatToF16(0.5)
        nl[0] = UInt8(half & 0xFF); nl[1] = UInt8(half >> 8)
        for j in 0..<16 { nl[2 + j] = UInt8(j | (15 - j) << 4) }
        var out = [Float](repeating: 0, count: 32)
        DType.iq4_nl.dequantize(nl, count: 32, into: &out)
        for j in 0..<16 {
            XCTAssertEqual(out[j], 0.5 * Float(IQ4.levels[j]))
            XCTAssertEqual(out[16 + j], 0.5 * Float(IQ4.levels[15 - j]))
        }
        XCTAssertEqual(IQ4.levels.first, -127)
        XCTAssertEqual(IQ4.levels.last, 113)

        // Sub-block s stores 32 + scale(s) with scale(s) = 4s - 13: low nibble in byte 4 + s/2
        // (low half for even s), top two bits at bits 2s of the word at byte 2.
        var xs = [UInt8](repeating: 0, count: 136)
        let one = Half.floatToF16(1)
        xs[0] = UInt8(one & 0xFF); xs[1] = UInt8(one >> 8)
        var high: UInt16 = 0
        for s in 0..<8 {
            let stored = 32 + 4 * s - 13
            xs[4 + s / 2] |= UInt8(stored & 15) << (4 * (s % 2))
            high |= UInt16(stored >> 4) << (2 * s)
        }
        xs[2] = UInt8(high & 0xFF); xs[3] = UInt8(high >> 8)
        for i in 0..<128 { xs[8 + i] = 0x9F }  // every low nibble level 15 (113), every high one level 9 (13)
        var wide = [Float](repeating: 0, count: 256)
        DType.iq4_xs.dequantize(xs, count: 256, into: &wide)
        for s in 0..<8 {
            XCTAssertEqual(xs.withUnsafeBytes { IQ4.subScale($0.baseAddress!, s) }, 4 * s - 13)
            XCTAssertEqual(wide[32 * s], Float(4 * s - 13) * 113, "sub-block \(s)")
            XCTAssertEqual(wide[32 * s + 16], Float(4 * s - 13) * 13, "sub-block \(s)")
        }
        XCTAssertEqual(GGUFFile.TensorType(rawValue: 20)?.dtype, .iq4_nl)
        XCTAssertEqual(GGUFFile.TensorType(rawValue: 23)?.dtype, .iq4_xs)
        XCTAssertEqual(DType.iq4_nl.bitsPerWeight, 4.5)
        XCTAssertEqual(DType.iq4_xs.bitsPerWeight, 4.25)
    }

    /// Without an importance matrix, `peregrine quantize` gives the fixture model llama.cpp's
    /// tensor types and, for every IQ4 tensor, llama-quantize's bytes exactly.
    func testQuantizedBytesEqualLlamaQuantize() throws {
        for (mix, name, type) in Self.mixes {
            let out = try Fixtures.tempDirectory(self) + "/\(name).gguf"
            _ = try ModelQuantizer(mix: mix).quantize(source: Fixtures.root + "/gguf/llama256-f16.gguf", output: out)
            let ours = try GGUFFile(path: out), theirs = try GGUFFile(path: Fixtures.root + "/gguf/llama256-\(name).gguf")
            XCTAssertEqual(ours.metadata["general.file_type"], theirs.metadata["general.file_type"])
            XCTAssertEqual(ours.tensors.map(\.name).sorted(), theirs.tensors.map(\.name).sorted())
            var compared = 0
            for t in theirs.tensors {
                XCTAssertEqual(ours.info(t.name)?.type, t.type, t.name)
                guard t.type.dtype == type, let a = ours.view(t.name), let b = theirs.view(t.name) else { continue }
                XCTAssertEqual(a.byteCount, b.byteCount)
                XCTAssertTrue(memcmp(a.data, b.data, b.byteCount) == 0, "\(name): \(t.name) differs from llama-quantize's")
                compared += 1
            }
            XCTAssertEqual(compared, 15, name)  // the embedding and every layer matrix
        }
    }

    /// llama.cpp's files run here with llama.cpp's logits (the same 8-bit activation products,
    /// summed in another order), and as close to the F16 model as llama.cpp is; and llama.cpp's
    /// logits on the files written here match ours.
    func testLogitsMatchLlamaCpp() throws {
        let ref = try Reference(model: "llama")
        let seq = ref.promptIds + ref.greedyIds
        let f16 = try Fixtures.floats(Fixtures.root + "/gguf/llama256-f16.llamacpp_logits.bin")
        let scale = f16.reduce(0) { max($0, abs($1)) }
        for (mix, name, type) in Self.mixes {
            let path = Fixtures.root + "/gguf/llama256-\(name).gguf"
            XCTAssertEqual(try GGUFFile(path: path).info("blk.0.attn_q.weight")?.type.dtype, type)
            let logits = try allLogits(try ModelRegistry.load(directory: path), seq)
            let llamacpp = try Fixtures.floats(Fixtures.root + "/gguf/llama256-\(name).llamacpp_logits.bin")
            let vsLlama = maxAbsDiff(logits, llamacpp), vsF16 = maxAbsDiff(logits, f16), llamaVsF16 = maxAbsDiff(llamacpp, f16)
            print("\(name): \(vsLlama) from llama.cpp's logits on its file (scale \(scale)); \(vsF16) from F16, llama.cpp \(llamaVsF16)")
            XCTAssertLessThan(vsLlama, 0.05 * scale, "\(name) logits vs llama.cpp: \(vsLlama) (scale \(scale))")
            XCTAssertLessThanOrEqual(vsF16, llamaVsF16 * 1.1, "\(name) logits vs the F16 model: \(vsF16); llama.cpp's: \(llamaVsF16)")

            let out = try Fixtures.tempDirectory(self) + "/\(name).gguf"
            _ = try ModelQuantizer(mix: mix).quantize(source: Fixtures.root + "/gguf/llama256-f16.gguf", output: out)
            let ours = try allLogits(try ModelRegistry.load(directory: out), seq)
            let llamaOnOurs = try Fixtures.floats(Fixtures.root + "/gguf/peregrine-llama256-\(name).llamacpp_logits.bin")
            let vsLlamaOnOurs = maxAbsDiff(ours, llamaOnOurs)
            print("\(name): our file \(vsLlamaOnOurs) from llama.cpp's logits on it")
            XCTAssertLessThan(vsLlamaOnOurs, 0.05 * scale, "\(name) on our file vs llama.cpp on it: \(vsLlamaOnOurs)")
        }
    }

    /// llama.cpp's rules for its IQ4_NL and IQ4_XS file types.
    func testMixRules() {
        for mix in [QuantizationMix.iq4_nl, .iq4_xs] {
            func type(_ name: String, cols: Int = 512, layers: Int = 16, tied: Bool = false, experts: Int = 0, importance: Bool = false,
                      gqa: Int = 1) -> DType {
                mix.type(of: name, cols: cols, isMatrix: true, layers: layers, tied: tied, experts: experts, importance: importance, gqa: gqa)
            }
            XCTAssertEqual(type("blk.3.attn_q.weight"), mix.base)
            XCTAssertEqual(type("token_embd.weight"), mix.base)
            XCTAssertEqual(type("output.weight"), .q6_K)
            XCTAssertEqual(type("token_embd.weight", tied: true), .q6_K)
            XCTAssertEqual(type("output.weight", cols: 96), .q8_0)
            // Four or more query heads per key/value head: attention's v gets Q5_K.
            XCTAssertEqual(type("blk.3.attn_v.weight", gqa: 2), mix.base)
            XCTAssertEqual(type("blk.3.attn_v.weight", gqa: 4), .q5_K)
            // The first eighth of the layers' ffn_down: Q5_K, unless an importance matrix weighs them.
            XCTAssertEqual(type("blk.1.ffn_down.weight"), .q5_K)
            XCTAssertEqual(type("blk.2.ffn_down.weight"), mix.base)
            XCTAssertEqual(type("blk.1.ffn_down.weight", importance: true), mix.base)
            // Eight experts: k and v in Q8_0, attention output Q5_K.
            XCTAssertEqual(type("blk.3.attn_v.weight", experts: 8, gqa: 4), .q8_0)
            XCTAssertEqual(type("blk.3.attn_k.weight", experts: 8), .q8_0)
            XCTAssertEqual(type("blk.3.attn_output.weight", experts: 8), .q5_K)
            // Rows not of whole blocks: IQ4_XS falls back to IQ4_NL, Q5_K to Q5_1, then F16.
            XCTAssertEqual(type("blk.3.ffn_up.weight", cols: 96), .iq4_nl)
            XCTAssertEqual(type("blk.1.ffn_down.weight", cols: 96), .q5_1)
            XCTAssertEqual(type("blk.3.ffn_up.weight", cols: 40), .f16)
            XCTAssertEqual(mix.type(of: "blk.3.ffn_up.weight", cols: 96, isMatrix: true, layers: 16, tied: false, pure: true), .iq4_nl)
        }
        XCTAssertEqual(QuantizationMix.iq4_nl.fileType, 25)
        XCTAssertEqual(QuantizationMix.iq4_xs.fileType, 30)
        XCTAssertEqual(QuantizationMix(name: "iq4_xs"), .iq4_xs)
    }

    /// Blocks of zeros and of one value repeated give ggml's bytes (checked against
    /// ggml_quantize_chunk): a zero super-block stores -0 as its scale and every index points at
    /// level 8, the one nearest zero; 32 equal values all take level 15 (113) at scale x / 113.
    func testDegenerateBlocksMatchGGML() {
        var zeros = [UInt8](repeating: 0x55, count: 136)
        Quantizer.quantize(.iq4_xs, [Float](repeating: 0, count: 256), count: 256, into: &zeros)
        XCTAssertEqual(Array(zeros[0..<2]), [0x00, 0x80])
        // Each sub-block stores scale 0 as 32: high bits 2 (0xAAAA), low nibbles 0.
        XCTAssertEqual(Array(zeros[2..<8]), [0xAA, 0xAA, 0, 0, 0, 0])
        XCTAssertTrue(zeros[8...].allSatisfy { $0 == 0x88 })
        var nl = [UInt8](repeating: 0, count: 18)
        Quantizer.quantize(.iq4_nl, [Float](repeating: 0.25, count: 32), count: 32, into: &nl)
        XCTAssertEqual(nl, [0x88, 0x18] + [UInt8](repeating: 0xFF, count: 16))
        var back = [Float](repeating: 0, count: 32)
        DType.iq4_nl.dequantize(nl, count: 32, into: &back)
        for v in back { XCTAssertEqual(v, 0.25, accuracy: 0.25 / 1000) }
    }
}
