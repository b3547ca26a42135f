import XCTest
@testable import Peregrine

final class SamplerTests: XCTestCase {
    func sample(_ logits: [Float], _ p: SamplingParameters, context: [Int32] = [], times: Int = 1) -> [Int] {
        var s = Sampler(p)
        return (0..<times).map { _ in
            var l = logits
            return l.withUnsafeMutableBufferPointer { lb in context.withUnsafeBufferPointer { s.sample(lb, context: $0) } }
        }
    }

    func testGreedyAndTopK1PickTheMaximum() {
        let logits: [Float] = [0.1, 2.5, -1, 2.4, 0]
        XCTAssertEqual(sample(logits, .greedy), [1])
        var p = SamplingParameters()
        p.temperature = 1.5
        p.topK = 1
        XCTAssertEqual(Set(sample(logits, p, times: 50)), [1])
    }

    func testSameSeedSameTokens() {
        let logits = (0..<1000).map { Float(sin(Double($0))) * 3 }
        var p = SamplingParameters()
        p.temperature = 1
        p.topK = 0
        p.topP = 1
        p.minP = 0
        p.seed = 42
        let a = sample(logits, p, times: 100), b = sample(logits, p, times: 100)
        XCTAssertEqual(a, b)
        p.seed = 43
        XCTAssertNotEqual(a, sample(logits, p, times: 100))
    }

    /// With no filtering, sampled frequencies follow softmax(logits / T).
    func testFrequenciesFollowTheDistribution() {
        let logits: [Float] = [1, 2, 0, 3]
        var p = SamplingParameters()
        p.temperature = 0.7
        p.topK = 0; p.topP = 1; p.minP = 0; p.seed = 9
        let n = 40_000
        let counts = sample(logits, p, times: n).reduce(into: [Int](repeating: 0, count: 4)) { $0[$1] += 1 }
        let e = logits.map { exp(Double($0) / 0.7) }
        let z = e.reduce(0, +)
        var chi2 = 0.0
        for i in 0..<4 {
            let expected = Double(n) * e[i] / z
            chi2 += pow(Double(counts[i]) - expected, 2) / expected
        }
        XCTAssertLessThan(chi2, 16.27, "chi-square \(chi2) with 3 degrees of freedom (p = 0.001)")
    }

    func testTopPAndMinPCutTheTail() {
        let logits: [Float] = [5, 4.9, 0, -1, -2]
        var p = SamplingParameters()
        p.temperature = 1; p.topK = 0; p.topP = 0.6; p.minP = 0; p.seed = 1
        XCTAssertTrue(Set(sample(logits, p, times: 300)).isSubset(of: [0, 1]))
        p.topP = 1; p.minP = 0.5
        XCTAssertEqual(Set(sample(logits, p, times: 300)), [0, 1])
    }

    func testRepetitionPenalty() {
        var p = SamplingParameters.greedy
        p.repetitionPenalty = 2
        // Token 0 (logit 3) was seen: 3 / 2 = 1.5 < 2, so token 1 wins.
        XCTAssertEqual(sample([3, 2, -5], p, context: [0]), [1])
        XCTAssertEqual(sample([3, 2, -5], p, context: [2]), [0])
    }

    func testStopStringsAreHeldBackAndCut() {
        var m = StopStringMatcher(["END", "\n\n"])
        var out = ""
        var hit = false
        for piece in ["Hello E", "N", "o more", " text E", "ND tail"] {
            let (emit, h) = m.feed(piece)
            out += emit
            if h { hit = true; break }
        }
        XCTAssertTrue(hit)
        XCTAssertEqual(out, "Hello ENo more text ")
    }
}
