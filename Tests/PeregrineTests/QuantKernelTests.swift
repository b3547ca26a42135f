import XCTest
@testable import Peregrine

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
}
