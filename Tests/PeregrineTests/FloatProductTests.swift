import XCTest
@testable import Peregrine

/// The CPU's F32/F16/BF16 matrix products (AVX-512 tiles where the CPU has them, AVX2 otherwise):
/// right against a double-precision sum, and each token's result the same bit for bit whatever
/// number of tokens share the product.
final class FloatProductTests: XCTestCase {
    func stored(_ values: [Float], _ dtype: DType) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: values.count * dtype.byteSize)
        bytes.withUnsafeMutableBytes { raw in
            for (i, v) in values.enumerated() {
                switch dtype {
                case .f32: raw.storeBytes(of: v, toByteOffset: 4 * i, as: Float.self)
                case .f16: raw.storeBytes(of: Half.floatToF16(v), toByteOffset: 2 * i, as: UInt16.self)
                default: raw.storeBytes(of: Half.floatToBF16(v), toByteOffset: 2 * i, as: UInt16.self)
                }
            }
        }
        return bytes
    }

    func product(_ dtype: DType, _ w: [UInt8], outDim: Int, k: Int, _ x: [Float], tokens: Int, pool: ThreadPool) -> [Float] {
        var y = [Float](repeating: .nan, count: tokens * outDim)
        w.withUnsafeBytes { wr in
            x.withUnsafeBufferPointer { xp in
                y.withUnsafeMutableBufferPointer { yp in
                    switch dtype {
                    case .f32: CPUKernels.matmul(F32Element.self, x: xp.baseAddress!, tokens: tokens, w: wr.baseAddress!, outDim: outDim, k: k, bias: nil, y: yp.baseAddress!, pool: pool)
                    case .f16: CPUKernels.matmul(F16Element.self, x: xp.baseAddress!, tokens: tokens, w: wr.baseAddress!, outDim: outDim, k: k, bias: nil, y: yp.baseAddress!, pool: pool)
                    default: CPUKernels.matmul(BF16Element.self, x: xp.baseAddress!, tokens: tokens, w: wr.baseAddress!, outDim: outDim, k: k, bias: nil, y: yp.baseAddress!, pool: pool)
                    }
                }
            }
        }
        return y
    }

    func testProductsMatchDoubleSumsAndDoNotDependOnTokenCount() {
        let pool = ThreadPool(threadCount: 2)
        var rng = SplitMix(seed: 11)
        // Row counts that are and are not multiples of four; k with and without a tail of 16.
        for (outDim, k) in [(37, 200), (64, 512), (6, 17)] {
            let wf = (0..<(outDim * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            let tokens = 53  // more than one run of 48 tokens
            let x = (0..<(tokens * k)).map { _ in Float(Int(rng.next() % 2001) - 1000) / 1000 }
            for dtype in [DType.f32, .f16, .bf16] {
                let w = stored(wf, dtype)
                // What the stored weights are, for the reference.
                var wq = [Float](repeating: 0, count: outDim * k)
                w.withUnsafeBytes { dtype.dequantize($0.baseAddress!, count: outDim * k, into: &wq) }
                let all = product(dtype, w, outDim: outDim, k: k, x, tokens: tokens, pool: pool)
                for t in 0..<tokens {
                    for o in 0..<outDim {
                        var s = 0.0, m = 0.0
                        for i in 0..<k { s += Double(wq[o * k + i]) * Double(x[t * k + i]); m += abs(Double(wq[o * k + i]) * Double(x[t * k + i])) }
                        XCTAssertEqual(Double(all[t * outDim + o]), s, accuracy: 1e-5 * m + 1e-6, "\(dtype) \(outDim)x\(k) row \(o) token \(t)")
                    }
                }
                // Every prefix of the tokens, and every token alone, gives the same bits.
                for n in [1, 2, 3, 5, 6, 7, 12, 48, 50] {
                    let part = product(dtype, w, outDim: outDim, k: k, Array(x[0..<(n * k)]), tokens: n, pool: pool)
                    XCTAssertEqual(part.map(\.bitPattern), all[0..<(n * outDim)].map(\.bitPattern), "\(dtype) \(outDim)x\(k), \(n) tokens")
                }
                for t in 0..<tokens {
                    let one = product(dtype, w, outDim: outDim, k: k, Array(x[(t * k)..<((t + 1) * k)]), tokens: 1, pool: pool)
                    XCTAssertEqual(one.map(\.bitPattern), all[(t * outDim)..<((t + 1) * outDim)].map(\.bitPattern), "\(dtype) token \(t) alone")
                }
            }
        }
    }
}
