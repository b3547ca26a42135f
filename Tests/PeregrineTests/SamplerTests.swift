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

    /// The vectorized argmax gives the first index of the largest value, passing NaNs over, as a
    /// plain loop does: ties, NaNs, infinities, all -infinity, lengths around the vector width.
    func testArgmaxIsTheFirstLargest() {
        func plain(_ x: [Float]) -> Int {
            var best = 0, value = -Float.infinity
            for i in x.indices where x[i] > value { value = x[i]; best = i }
            return best
        }
        var rng = SplitMix(seed: 11)
        for n in [0, 1, 7, 8, 9, 16, 23, 100, 1000] {
            for trial in 0..<20 {
                // Few distinct values, so ties are common; some NaNs and infinities.
                var x = (0..<n).map { _ in Float(Int(rng.next() % 7)) - 3 }
                for i in x.indices where rng.next() % 10 == 0 {
                    x[i] = [Float.nan, -.infinity, .infinity, -0.0][Int(rng.next() % 4)]
                }
                if trial == 0 { x = x.map { _ in -.infinity } }
                if trial == 1 { x = x.map { _ in .nan } }
                let got = x.withUnsafeBufferPointer { Sampler.argmax($0) }
                XCTAssertEqual(got, plain(x), "n \(n) trial \(trial): \(x)")
            }
        }
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

    /// Logit rows on the CPU backend that count whole-row reads.
    final class CountingRows: LogitRows {
        let inner: BackendLogitRows<CPUBackend>
        var reads = 0
        init(_ rows: [[Float]]) throws {
            let cpu = CPUBackend()
            let v = rows[0].count
            inner = BackendLogitRows(backend: cpu, vocabulary: v)
            let b = try cpu.buffer(rows.count * v)
            for (r, row) in rows.enumerated() { row.withUnsafeBufferPointer { cpu.write($0, to: b, offset: r * v) } }
            inner.buffer = b
            inner.count = rows.count
        }
        var count: Int { inner.count }
        var vocabulary: Int { inner.vocabulary }
        func read(row: Int, into values: UnsafeMutableBufferPointer<Float>) throws { reads += 1; try inner.read(row: row, into: values) }
        func argmax(row: Int) throws -> Int { try inner.argmax(row: row) }
        func argmax(rows: [Int]) throws -> [Int] { try inner.argmax(rows: rows) }
        func top(row: Int, k: Int, values: UnsafeMutableBufferPointer<Float>, ids: UnsafeMutableBufferPointer<Int32>) throws {
            try inner.top(row: row, k: k, values: values, ids: ids)
        }
        func penalize(row: Int, ids: UnsafeBufferPointer<Int32>, penalty: Float) throws { try inner.penalize(row: row, ids: ids, penalty: penalty) }
        func expSum(row: Int, shift: Float, scale: Float) throws -> Float { try inner.expSum(row: row, shift: shift, scale: scale) }
    }

    /// Sampling from logits left on the backend (the best id, the top-k, or the whole row only
    /// when the parameters need it) chooses exactly the tokens that sampling the whole row does,
    /// with the same random stream.
    func testSamplingFromKeptLogitsMatchesWholeRows() throws {
        var rng = SeededGenerator(seed: 7)
        let vocab = 1000
        let rows = (0..<40).map { _ in (0..<vocab).map { _ in (rng.nextUnit() - 0.5) * 8 } }
        let context: [Int32] = (0..<30).map { Int32($0 * 17 % vocab) }
        func params(_ t: Float, _ k: Int, _ p: Float, _ minP: Float, _ penalty: Float = 1) -> SamplingParameters {
            var s = SamplingParameters()
            s.temperature = t; s.topK = k; s.topP = p; s.minP = minP; s.repetitionPenalty = penalty; s.seed = 11
            return s
        }
        // (parameters, whether the whole row may be read)
        let cases: [(SamplingParameters, Bool)] = [
            (params(0, 40, 0.95, 0.05), false), (params(0, 0, 1, 0, 1.3), false), (params(0.8, 40, 0.95, 0.05), false),
            (params(1.2, 5, 1, 0), false), (params(0.7, 30, 0.9, 0, 1.3), false), (params(1, 0, 1, 0.02), true),
            (params(1, 0, 1, 0.3), false), (params(1, 0, 0.9, 0), true), (params(0.3, 0, 0.9, 0), false), (params(0.3, 0, 0.95, 0, 1.2), false),
            (params(1, 0, 1, 0), true), (params(1, 1000, 1, 0), false), (params(1, 1500, 1, 0), false),
        ]
        for (p, mayRead) in cases {
            var host = Sampler(p), kept = Sampler(p)
            var reads = 0
            for row in rows {
                var l = row
                let a = l.withUnsafeMutableBufferPointer { lb in context.withUnsafeBufferPointer { host.sample(lb, context: $0) } }
                let device = try CountingRows([row])
                let b = try context.withUnsafeBufferPointer { try kept.sample(device, row: 0, context: $0) }
                XCTAssertEqual(a, b, "\(p)")
                reads += device.reads
            }
            if !mayRead { XCTAssertEqual(reads, 0, "\(p)") }
        }
    }

    /// A greedy drafter's confidence in its token comes from the largest logit and the row's
    /// normalizer, computed where the logits are: the softmax probability of the best token,
    /// without reading the row back.
    func testDrafterConfidenceIsTheBestTokensProbability() throws {
        var rng = SeededGenerator(seed: 3)
        let wide = (0..<500).map { _ in (rng.nextUnit() - 0.5) * 10 }
        var peaked = wide
        peaked[123] = 40
        let ninf = [Float](repeating: -.infinity, count: 8)
        for row in [wide, peaked, [2, 2, 2, 2], [0.5]] {
            let rows = try CountingRows([row])
            let m = row.max()!
            let expected = 1 / row.reduce(Float(0)) { $0 + expf($1 - m) }
            let p = try ModelDrafter.probabilityOfBest(rows)
            XCTAssertEqual(p, expected, accuracy: 1e-6 * max(1, expected))
            XCTAssertEqual(rows.reads, 0, "the row was read back")
        }
        XCTAssertEqual(try ModelDrafter.probabilityOfBest(try CountingRows([peaked])), 1, accuracy: 1e-6)
        XCTAssertEqual(try ModelDrafter.probabilityOfBest(try CountingRows([[2, 2, 2, 2]])), 0.25, accuracy: 1e-7)
        XCTAssertEqual(try ModelDrafter.probabilityOfBest(try CountingRows([ninf])), 0)
    }

    func testLargestLogits() {
        var rng = SeededGenerator(seed: 3)
        let values = (0..<5000).map { _ in Float(Int(rng.next() % 300)) }  // many ties
        for k in [1, 7, 64, 300] {
            var v = [Float](repeating: 0, count: k), ids = [Int32](repeating: 0, count: k)
            values.withUnsafeBufferPointer { all in
                v.withUnsafeMutableBufferPointer { vb in ids.withUnsafeMutableBufferPointer { LogitCandidates.largest(k, of: all, values: vb, indices: $0) } }
            }
            let expected = values.enumerated().sorted { $0.element > $1.element || ($0.element == $1.element && $0.offset < $1.offset) }.prefix(k)
            XCTAssertEqual(Set(ids.map { Int($0) }), Set(expected.map(\.offset)), "k = \(k)")
            for (i, id) in ids.enumerated() { XCTAssertEqual(v[i], values[Int(id)]) }
        }
    }
}
