import XCTest
@testable import Peregrine

/// Quantization weighted by an importance matrix: lower weighted error than plain rounding for
/// every type, as low as llama.cpp's quantizers given the same matrix (Tests/Fixtures/imatrix,
/// made by scripts/make_imatrix_fixture.py), the mix rule it changes, and files without one
/// unchanged byte for byte.
final class ImportanceQuantizationTests: XCTestCase {
    static let types: [DType] = [.q8_0, .q4_0, .q4_1, .q5_0, .q5_1, .q4_K, .q5_K, .q6_K, .iq4_nl, .iq4_xs, .q3_K, .q2_K]

    /// Σ importance_j (x_ij - dequantized_ij)^2 over the rows.
    func weightedError(_ x: [Float], _ type: DType, cols: Int, importance: [Float], weighted: Bool) -> Double {
        let rows = x.count / cols
        var out = [UInt8](repeating: 0, count: type.byteCount(elements: cols))
        var back = [Float](repeating: 0, count: cols)
        var e = 0.0
        for r in 0..<rows {
            x.withUnsafeBufferPointer { xp in
                importance.withUnsafeBufferPointer { ip in
                    out.withUnsafeMutableBytes { o in
                        Quantizer.quantize(type, xp.baseAddress! + r * cols, count: cols, importance: weighted ? ip.baseAddress! : nil,
                                           into: o.baseAddress!)
                        type.dequantize(o.baseAddress!, count: cols, into: &back)
                    }
                }
            }
            for j in 0..<cols { let d = Double(x[r * cols + j] - back[j]); e += Double(importance[j]) * d * d }
        }
        return e
    }

    /// A deterministic generator (xorshift) of roughly normal values.
    struct Noise {
        var state: UInt64
        mutating func uniform() -> Float {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            return Float(state >> 40) / Float(1 << 24)
        }
        mutating func normal() -> Float {
            let u = max(uniform(), 1e-7), v = uniform()
            return (-2 * log(u)).squareRoot() * cos(2 * .pi * v)
        }
    }

    func testWeightedErrorIsLowerForEachType() {
        var noise = Noise(state: 0x9E37_79B9_7F4A_7C15)
        let rows = 16, cols = 512
        // Weights with a few outliers, as trained matrices have; importance spread over four
        // orders of magnitude, a few columns far above the rest (as real activations are).
        let x = (0..<(rows * cols)).map { _ in noise.normal() * (noise.uniform() < 0.02 ? 6 : 1) }
        let importance = (0..<cols).map { j in exp(2 * noise.normal()) * (j % 61 == 0 ? 100 : 1) }
        for type in Self.types {
            let plain = weightedError(x, type, cols: cols, importance: importance, weighted: false)
            let weighted = weightedError(x, type, cols: cols, importance: importance, weighted: true)
            // Measured ratios 0.04 (Q4_1) to 0.32 (Q4_0): where a few columns dominate a block's
            // weighted error the fitted scale places their values nearly on the grid.
            XCTAssertLessThan(weighted, 0.99 * plain, "\(type): \(weighted) against \(plain) without importance")
            print(String(format: "%@: weighted error %.4g, plain %.4g (%.3fx)", type.rawValue, weighted, plain, weighted / plain))
        }
    }

    /// A block whose importance is all zero weighs nothing; it is fitted as if every column mattered.
    func testAllZeroImportanceWeighsEveryColumn() {
        var noise = Noise(state: 42)
        let cols = 256
        let x = (0..<cols).map { _ in noise.normal() }
        for type in Self.types {
            var zero = [UInt8](repeating: 0, count: type.byteCount(elements: cols)), ones = zero
            Quantizer.quantize(type, x, count: cols, importance: [Float](repeating: 0, count: cols), into: &zero)
            Quantizer.quantize(type, x, count: cols, importance: [Float](repeating: 1, count: cols), into: &ones)
            XCTAssertEqual(zero, ones, "\(type)")
        }
    }

    /// With importance, llama.cpp moves the first eighth of the layers' ffn_down from Q4_0/Q5_0
    /// to Q4_1/Q5_1.
    func testMixRule() {
        for (mix, bumped) in [(QuantizationMix.q4_0, DType.q4_1), (.q5_0, .q5_1)] {
            XCTAssertEqual(mix.type(of: "blk.0.ffn_down.weight", cols: 512, isMatrix: true, layers: 8, tied: true, importance: true), bumped)
            XCTAssertEqual(mix.type(of: "blk.0.ffn_down.weight", cols: 512, isMatrix: true, layers: 8, tied: true), mix.base)
            XCTAssertEqual(mix.type(of: "blk.1.ffn_down.weight", cols: 512, isMatrix: true, layers: 8, tied: true, importance: true), mix.base)
            XCTAssertEqual(mix.type(of: "blk.0.ffn_up.weight", cols: 512, isMatrix: true, layers: 8, tied: true, importance: true), mix.base)
        }
        XCTAssertEqual(QuantizationMix.q4_1.type(of: "blk.0.ffn_down.weight", cols: 512, isMatrix: true, layers: 8, tied: true, importance: true), .q4_1)
    }

    /// FNV-1a of the files `peregrine quantize` wrote from llama256-f16.gguf before importance
    /// matrices existed: without one, every mix still writes them byte for byte.
    func testWithoutImportanceFilesAreUnchanged() throws {
        let expected: [QuantizationMix: UInt64] = [
            .q8_0: 0xec93_5590_8d8f_4617, .q4_0: 0x126a_b846_4e23_677f, .q4_1: 0x35be_e038_6830_09a2,
            .q5_0: 0xe2f5_2343_fd28_764a, .q5_1: 0xd21c_34b6_51dc_b9b8, .q4_K_M: 0x0b36_2af6_eafc_88c1,
            .q5_K_M: 0x5545_562f_d185_989b, .q6_K: 0xf2cb_b40c_c400_19cc,
        ]
        let dir = try Fixtures.tempDirectory(self)
        for (mix, hash) in expected.sorted(by: { $0.key.rawValue < $1.key.rawValue }) {
            let out = dir + "/\(mix.rawValue).gguf"
            _ = try ModelQuantizer(mix: mix).quantize(source: Fixtures.root + "/gguf/llama256-f16.gguf", output: out)
            XCTAssertEqual(fnv1a(try FileSystem.read(out)), hash, mix.rawValue)
        }
    }

    func fnv1a(_ bytes: [UInt8]) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for b in bytes { h = (h ^ UInt64(b)) &* 0x100_0000_01b3 }
        return h
    }

    /// The 256-wide fixture quantized to each type with llama.cpp's importance matrix of it, by
    /// llama.cpp (--pure) and here: the importance-weighted squared error of the layer matrices.
    func testAsCloseAsLlamaCppWithTheSameMatrix() throws {
        let dir = Fixtures.root + "/imatrix"
        let ref = try Fixtures.json(dir + "/llama256-weighted.json")
        let matrix = try ImportanceMatrix(path: dir + "/llama256-f16.imatrix.gguf")
        let source = try GGUFFile(path: Fixtures.root + "/gguf/llama256-f16.gguf")
        for type in Self.types {
            let theirs = try XCTUnwrap(ref["weighted_error"]?[type.rawValue]?.object, type.rawValue)
            var ours = 0.0, llama = 0.0
            for (name, value) in zip(theirs.keys, theirs.values) {
                let view = try XCTUnwrap(source.view(name))
                let cols = view.shape[1]
                let importance = try XCTUnwrap(try matrix.importance(of: name, columns: cols), name)
                ours += weightedError(view.toFloat(), type, cols: cols, importance: importance, weighted: true)
                llama += try XCTUnwrap(value.double)
            }
            // Measured: 0.998-1.000x llama.cpp's; Q8_0, which llama.cpp rounds plainly, 0.87x.
            XCTAssertLessThan(ours, 1.005 * llama, "\(type)")
            print(String(format: "%@: weighted error %.5g, llama.cpp %.5g (%.3fx)", type.rawValue, ours, llama, ours / llama))
        }
    }
}
