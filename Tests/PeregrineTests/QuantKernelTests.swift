import XCTest
@testable import Peregrine
import PeregrineInt8
#if arch(x86_64)
import PeregrineVNNI
#endif

/// Every quantized type's SIMD row product against its scalar dequantization, on random blocks.
final class QuantKernelTests: XCTestCase {
    /// Random blocks whose f16 scale fields hold small finite values.
    func randomRow(_ type: DType, blocks: Int, rng: inout SplitMix) -> [UInt8] {
        var bytes = (0..<(blocks * type.blockBytes)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        let halfOffsets: [Int]
        switch type {
        case .q8_0, .q4_0, .q5_0: halfOffsets = [0]
        case .q4_1, .q5_1, .q4_K, .q5_K: halfOffsets = [0, 2]
        case .q6_K: halfOffsets = [208]
        case .iq4_nl, .iq4_xs: halfOffsets = [0]
        case .q3_K: halfOffsets = [108]
        case .q2_K: halfOffsets = [80, 82]
        default: halfOffsets = []
        }
        for b in 0..<blocks {
            for o in halfOffsets {
                let h = Half.floatToF16(Float(rng.next() % 1000) / 1000 * 0.02 - 0.005).littleEndian
                bytes[b * type.blockBytes + o] = UInt8(h & 0xFF)
                bytes[b * type.blockBytes + o + 1] = UInt8(h >> 8)
            }
        }
        return bytes
    }

    func testRowProductsMatchDequantization() {
        var rng = SplitMix(seed: 7)
        for type in DType.allCases where !type.isFloat {
            let k = 4 * 256
            let x = (0..<k).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            let row = randomRow(type, blocks: k / type.blockSize, rng: &rng)
            var w = [Float](repeating: 0, count: k)
            row.withUnsafeBytes { type.dequantize($0.baseAddress!, count: k, into: &w) }
            let expected = zip(w, x).reduce(0) { $0 + Double($1.0) * Double($1.1) }
            let got = row.withUnsafeBytes { raw in x.withUnsafeBufferPointer { CPUKernels.rowDot(type, raw.baseAddress!, $0.baseAddress!, k) } }
            let magnitude = zip(w, x).reduce(0) { $0 + abs(Double($1.0) * Double($1.1)) }
            XCTAssertEqual(Double(got), expected, accuracy: 1e-5 * magnitude + 1e-6, "\(type)")
        }
    }
}

#if arch(x86_64)
extension QuantKernelTests {
    /// The integer products (activations rounded to 8 bits) against the f32 reference: close to
    /// within the rounding of the activations.
    func testInt8ProductsMatchF32Products() {
        var rng = SplitMix(seed: 11)
        for type in DType.allCases where !type.isFloat {
            let k = 4 * 256
            let x = (0..<k).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            var worst = 0.0
            for _ in 0..<8 {
                let row = randomRow(type, blocks: k / type.blockSize, rng: &rng)
                var w = [Float](repeating: 0, count: k)
                row.withUnsafeBytes { type.dequantize($0.baseAddress!, count: k, into: &w) }
                let kind = Int8WeightType(type)!
                var act = [UInt8](repeating: 0, count: Int8Kernels.activationBytes(kind, k: k))
                x.withUnsafeBufferPointer { xs in act.withUnsafeMutableBytes { Int8Kernels.quantizeActivations(kind, xs.baseAddress!, k: k, into: $0.baseAddress!) } }
                let got = row.withUnsafeBytes { r in act.withUnsafeBytes { Int8Kernels.rowDot(kind, dot: AVX2Dot.self, r.baseAddress!, $0.baseAddress!, k) } }
                // The VNNI products sum the same integers: the same result to the bit.
                if CPUFeatures.useVNNI {
                    let vnni = row.withUnsafeBytes { r in act.withUnsafeBytes { VNNIKernels.rowDot(kind, r.baseAddress!, $0.baseAddress!, k) } }
                    XCTAssertEqual(vnni, got, "\(type): VNNI")
                }
                let expected = zip(w, x).reduce(0) { $0 + Double($1.0) * Double($1.1) }
                let magnitude = zip(w, x).reduce(0) { $0 + abs(Double($1.0) * Double($1.1)) }
                worst = max(worst, abs(Double(got) - expected) / magnitude)
            }
            // 8-bit activations: each product is off by at most half a step of 1/127 of the
            // block's largest value; relative to the sum of magnitudes that is below 1%.
            XCTAssertLessThan(worst, 0.01, "\(type)")
        }
    }

    /// Products over many tokens (the prefill path: tiles of eight and four tokens, then one at a
    /// time, rows spread over threads) give each token exactly its single-token result, and that
    /// result is the dequantized row's product within the activations' rounding.
    func testBatchedProductsMatchSingleTokens() {
        var rng = SplitMix(seed: 19)
        let k = 2 * 256, rows = 37, tokens = 13
        for type in DType.allCases where !type.isFloat {
            let x = (0..<(tokens * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            let w = (0..<rows).flatMap { _ in randomRow(type, blocks: k / type.blockSize, rng: &rng) }
            let bias = (0..<rows).map { Float($0) / 100 }
            var y = [Float](repeating: 0, count: tokens * rows)
            let scratch = UnsafeMutableRawPointer.allocate(byteCount: CPUKernels.activationScratchBytes(type, tokens: tokens, k: k), alignment: 64)
            defer { scratch.deallocate() }
            w.withUnsafeBytes { wp in
                CPUKernels.matmulBlocks(type, x: x, tokens: tokens, w: wp.baseAddress!, outDim: rows, k: k, bias: bias, y: &y,
                                        scratch: scratch, pool: .shared)
            }
            let rowBytes = type.byteCount(elements: k)
            var worst = 0.0
            for t in 0..<tokens {
                var one = [Float](repeating: 0, count: rows)
                w.withUnsafeBytes { wp in
                    CPUKernels.matmulBlocks(type, x: Array(x[(t * k)..<((t + 1) * k)]), tokens: 1, w: wp.baseAddress!, outDim: rows, k: k,
                                            bias: bias, y: &one, scratch: scratch, pool: .shared)
                }
                XCTAssertEqual(Array(y[(t * rows)..<((t + 1) * rows)]), one, "\(type): token \(t)")
                for o in 0..<rows {
                    var wf = [Float](repeating: 0, count: k)
                    w.withUnsafeBytes { type.dequantize($0.baseAddress! + o * rowBytes, count: k, into: &wf) }
                    let expected = (0..<k).reduce(0.0) { $0 + Double(wf[$1]) * Double(x[t * k + $1]) } + Double(bias[o])
                    let magnitude = (0..<k).reduce(0.0) { $0 + abs(Double(wf[$1]) * Double(x[t * k + $1])) }
                    worst = max(worst, abs(Double(y[t * rows + o]) - expected) / magnitude)
                }
            }
            XCTAssertLessThan(worst, 0.01, "\(type)")
        }
    }

    /// The products over many tokens (tiles of 8, 4 and 1 tokens, rows spread over the pool, as a
    /// prefill runs them) give each token exactly its single-row product.
    func testMultiTokenProductsMatchRowProducts() {
        var rng = SplitMix(seed: 13)
        let k = 2 * 256, rows = 5, tokens = 13
        let pool = ThreadPool(threadCount: 2)
        for type in DType.allCases where !type.isFloat {
            let w = (0..<rows).flatMap { _ in randomRow(type, blocks: k / type.blockSize, rng: &rng) }
            let x = (0..<(tokens * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            var y = [Float](repeating: .nan, count: tokens * rows)
            let kind = Int8WeightType(type)!
            let stride = Int8Kernels.activationBytes(kind, k: k)
            let scratch = UnsafeMutableRawPointer.allocate(byteCount: CPUKernels.activationScratchBytes(type, tokens: tokens, k: k), alignment: 64)
            defer { scratch.deallocate() }
            w.withUnsafeBytes { wb in
                x.withUnsafeBufferPointer { xb in
                    CPUKernels.matmulBlocks(type, x: xb.baseAddress!, tokens: tokens, w: wb.baseAddress!, outDim: rows, k: k, bias: nil,
                                            y: &y, scratch: scratch, pool: pool)
                }
            }
            let rowBytes = type.byteCount(elements: k)
            for t in 0..<tokens {
                var act = [UInt8](repeating: 0, count: stride)
                x.withUnsafeBufferPointer { xb in act.withUnsafeMutableBytes { Int8Kernels.quantizeActivations(kind, xb.baseAddress! + t * k, k: k, into: $0.baseAddress!) } }
                for o in 0..<rows {
                    let one = w.withUnsafeBytes { r in act.withUnsafeBytes { Int8Kernels.rowDot(kind, dot: AVX2Dot.self, r.baseAddress! + o * rowBytes, $0.baseAddress!, k) } }
                    XCTAssertEqual(y[t * rows + o], one, "\(type) token \(t) row \(o)")
                }
            }
        }
    }

    /// Weights repacked in groups of eight rows (the row-group kernels) give each token what the
    /// row kernels give it, to float rounding (the same exact integer sums per block, summed in
    /// another order), and each token of a batch exactly its result alone. Where the CPU has
    /// VNNI, its kernels and AVX2's give the same bits.
    func testRowGroupProductsMatchRowProducts() throws {
        var rng = SplitMix(seed: 23)
        let k = 3 * 256, rows = 24, tokens = 13
        let pool = ThreadPool(threadCount: 2)
        for type in [DType.q8_0, .q4_0, .q5_0, .iq4_nl, .q4_K, .q5_K, .q6_K, .q3_K, .q2_K, .iq4_xs] {
            let w = (0..<rows).flatMap { _ in randomRow(type, blocks: k / type.blockSize, rng: &rng) }
            let x = (0..<(tokens * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            let bias = (0..<rows).map { Float($0) / 100 - 0.1 }
            let scratch = UnsafeMutableRawPointer.allocate(byteCount: CPUKernels.activationScratchBytes(type, tokens: tokens, k: k), alignment: 64)
            defer { scratch.deallocate() }
            var expected = [Float](repeating: .nan, count: tokens * rows), got = expected
            try w.withUnsafeBytes { wb in
                let groups = try XCTUnwrap(RowGroupMatrix(type, data: wb.baseAddress!, rows: rows, cols: k, pool: pool, force: true))
                CPUKernels.matmulBlocks(type, x: x, tokens: tokens, w: wb.baseAddress!, outDim: rows, k: k, bias: bias, y: &expected,
                                        scratch: scratch, pool: pool)
                CPUKernels.matmulRowGroups(groups, x: x, tokens: tokens, bias: bias, y: &got, scratch: scratch, pool: pool)
                if CPUFeatures.useVNNI {
                    // The activations matmulRowGroups left in the scratch, through AVX2's kernels.
                    let kind = try XCTUnwrap(Int8WeightType(type))
                    var avx2 = [Float](repeating: .nan, count: tokens * rows)
                    bias.withUnsafeBufferPointer { b in
                        RowGroupKernels.groups(kind, dot: AVX2RowGroupDot.self, w: groups.bytes, k: k, a: scratch,
                                               stride: Int8Kernels.activationBytes(kind, k: k), tokens: tokens, groups: 0..<(rows / 8),
                                               bias: b.baseAddress, y: &avx2, ldy: rows)
                    }
                    XCTAssertEqual(avx2, got, "\(type): AVX2 and VNNI row groups")
                    // All three groups in one call, with and without the 512-bit pairs (the
                    // first two groups' tile of eight tokens on 512 bits, the rest on 256).
                    for wide in [true, false] {
                        var vnni = [Float](repeating: .nan, count: tokens * rows)
                        bias.withUnsafeBufferPointer { b in
                            VNNIKernels.groups(kind, w: groups.bytes, k: k, a: scratch, stride: Int8Kernels.activationBytes(kind, k: k),
                                               tokens: tokens, groups: 0..<(rows / 8), bias: b.baseAddress, y: &vnni, ldy: rows, wide: wide)
                        }
                        XCTAssertEqual(avx2, vnni, "\(type): AVX2 and VNNI row groups, wide \(wide)")
                    }
                }
                for t in 0..<tokens {
                    var one = [Float](repeating: .nan, count: rows)
                    CPUKernels.matmulRowGroups(groups, x: Array(x[(t * k)..<((t + 1) * k)]), tokens: 1, bias: bias, y: &one,
                                               scratch: scratch, pool: pool)
                    XCTAssertEqual(Array(got[(t * rows)..<((t + 1) * rows)]), one, "\(type): token \(t) alone")
                }
            }
            // Float rounding of a different order of the same sums: within a millionth of the
            // products' magnitudes (a wrong value, scale or offset would miss by orders more).
            let rowBytes = type.byteCount(elements: k)
            for o in 0..<rows {
                var wf = [Float](repeating: 0, count: k)
                w.withUnsafeBytes { type.dequantize($0.baseAddress! + o * rowBytes, count: k, into: &wf) }
                for t in 0..<tokens {
                    let magnitude = (0..<k).reduce(0.0) { $0 + abs(Double(wf[$1]) * Double(x[t * k + $1])) }
                    XCTAssertEqual(Double(got[t * rows + o]), Double(expected[t * rows + o]), accuracy: 1e-6 * magnitude + 1e-6,
                                   "\(type): token \(t) row \(o)")
                }
            }
        }
    }
}
#endif

/// A small deterministic generator for test data.
struct SplitMix {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// A uniform value in [-1, 1), from the top 24 bits of the next number.
    mutating func signedUnit() -> Float { Float(next() >> 40) / Float(1 << 24) * 2 - 1 }
}

/// The quantizers: dequantize(quantize(x)) close to x, by each type's precision.
final class QuantizerTests: XCTestCase {
    func testRoundTripError() {
        var rng = SplitMix(seed: 3)
        let n = 64 * 256
        // Gaussian-ish values (sum of uniforms) with a few outliers, like weight rows.
        let x: [Float] = (0..<n).map { i in
            let u = (0..<4).reduce(Float(0)) { a, _ in a + Float(rng.next() % 10000) / 10000 - 0.5 }
            return i % 97 == 0 ? 4 * u : u
        }
        let rms = (x.reduce(0) { $0 + $1 * $1 } / Float(n)).squareRoot()
        for type in DType.allCases where !type.isFloat {
            var bytes = [UInt8](repeating: 0, count: type.byteCount(elements: n))
            var back = [Float](repeating: 0, count: n)
            x.withUnsafeBufferPointer { src in bytes.withUnsafeMutableBytes { Quantizer.quantize(type, src.baseAddress!, count: n, into: $0.baseAddress!) } }
            bytes.withUnsafeBytes { type.dequantize($0.baseAddress!, count: n, into: &back) }
            let err = (zip(x, back).reduce(0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) } / Float(n)).squareRoot() / rms
            // Bounds about 1.3x what each type measures here (Q8_0 0.006 ... Q4_0 0.098; IQ4_NL 0.083,
            // IQ4_XS 0.085; Q3_K 0.164, Q2_K 0.306).
            let bound: [DType: Float] = [.q8_0: 0.008, .q6_K: 0.026, .q5_K: 0.05, .q5_1: 0.052, .q5_0: 0.065, .q4_K: 0.1,
                                         .q4_1: 0.11, .q4_0: 0.13, .iq4_nl: 0.11, .iq4_xs: 0.11, .q3_K: 0.21, .q2_K: 0.4]
            XCTAssertLessThan(err, bound[type]!, "\(type) relative RMS error")
        }
    }
}

extension QuantizerTests {
    /// Our quantizer's error against llama.cpp's on the same weights: for every tensor that
    /// llama.cpp quantized in the fixture files, quantize the F16 source here and compare the
    /// squared errors.
    func testErrorComparableToLlamaCpp() throws {
        let files = ["llama-q8_0", "llama-q4_0"].map { ("llama-f32", $0) }
            + ["q4_1", "q5_0", "q5_1", "q4_k_m", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs"].map { ("llama256-f16", "llama256-" + $0) }
        for (sourceName, name) in files {
            let source = try GGUFFile(path: Fixtures.root + "/gguf/\(sourceName).gguf")
            let theirs = try GGUFFile(path: Fixtures.root + "/gguf/\(name).gguf")
            var ours2 = [DType: Double](), their2 = [DType: Double]()
            for t in theirs.tensors where t.dims.count == 2 {
                guard let type = t.type.dtype, !type.isFloat, let src = source.view(t.name), let q = theirs.view(t.name) else { continue }
                let x = src.toFloat(), n = x.count
                var bytes = [UInt8](repeating: 0, count: type.byteCount(elements: n))
                var back = [Float](repeating: 0, count: n)
                x.withUnsafeBufferPointer { s in bytes.withUnsafeMutableBytes { Quantizer.quantize(type, s.baseAddress!, count: n, into: $0.baseAddress!) } }
                bytes.withUnsafeBytes { type.dequantize($0.baseAddress!, count: n, into: &back) }
                let llama = q.toFloat()
                ours2[type, default: 0] += zip(x, back).reduce(0) { $0 + Double(($1.0 - $1.1) * ($1.0 - $1.1)) }
                their2[type, default: 0] += zip(x, llama).reduce(0) { $0 + Double(($1.0 - $1.1) * ($1.0 - $1.1)) }
            }
            // Measured: 1.0 for the 32-value types, 0.99-1.012 for the k-quants.
            XCTAssertFalse(ours2.isEmpty)
            for (type, e) in ours2 {
                XCTAssertLessThan(e / their2[type]!, 1.03, "\(name) \(type): squared error \(e) against llama.cpp's \(their2[type]!)")
            }
        }
    }
}
