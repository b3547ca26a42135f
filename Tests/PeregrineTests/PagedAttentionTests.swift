import XCTest
@testable import Peregrine

/// The CPU's paged attention (keys transposed inside blocks) against a direct softmax(qK)V over
/// the same keys and values, for block sizes on and off its 16-position path, GQA groups of 1-8,
/// head sizes with and without a tail of 8, scattered block tables and sliding windows; where the
/// CPU has AVX-512, its kernels against the 8-lane ones bit for bit.
final class PagedAttentionTests: XCTestCase {
    func testMatchesDirectAttention() throws { try check(.f32) }

    /// F16 keys and values: the direct attention over the same values rounded to half precision.
    func testF16CacheMatchesDirectAttentionOverRoundedValues() throws { try check(.f16) }

    func check(_ type: KVCacheType) throws {
        let backend = CPUBackend(pool: ThreadPool(threadCount: 2))
        var rng = SplitMix(seed: 5)
        func value() -> Float { Float(Int(rng.next() % 2001) - 1000) / 1000 }
        for (bs, kvHeads, group, hd, window) in [(16, 2, 4, 64, nil), (32, 1, 8, 128, nil), (8, 2, 1, 64, nil),
                                                   (16, 3, 5, 40, 21), (48, 1, 2, 16, nil), (4, 1, 3, 12, 6),
                                                   (16, 1, 6, 24, nil), (16, 1, 7, 44, 9), (32, 2, 2, 20, nil), (16, 1, 4, 36, nil),
                                                   (8, 1, 3, 40, nil)] as [(Int, Int, Int, Int, Int?)] {
            let heads = kvHeads * group, row = kvHeads * hd
            let lengths = [1, 7, bs + 3, 3 * bs, 70]
            let blocks = lengths.reduce(0) { $0 + ($1 + bs - 1) / bs } + 3
            let kv = try KVStorage(backend: backend, layers: 1, blocks: blocks, blockSize: bs, capacity: 128, kvHeads: kvHeads, headDim: hd,
                                   type: type)
            // Unwritten positions of the pool hold NaN: attention must never read them.
            kv.keys[0].pointer.update(repeating: .nan, count: blocks * kv.blockStride)
            kv.values[0].pointer.update(repeating: .nan, count: blocks * kv.blockStride)
            // Each sequence gets blocks from the end of the pool backwards, so tables are not in order.
            var plan = BatchPlan()
            plan.tableWidth = (lengths.max()! + bs - 1) / bs
            var next = blocks - 1
            var keys: [[Float]] = [], values: [[Float]] = []
            for (s, n) in lengths.enumerated() {
                var table: [Int32] = []
                for _ in 0..<((n + bs - 1) / bs) { table.append(Int32(next)); next -= 1 }
                plan.appendBlockTable(table)
                plan.append(tokens: Array(repeating: 0, count: n), slot: s, position: 0, logits: .none)
                keys.append((0..<(n * row)).map { _ in value() })
                values.append((0..<(n * row)).map { _ in value() })
            }
            let total = plan.count
            let k = try backend.buffer(total * row), v = try backend.buffer(total * row)
            var at = 0
            for s in lengths.indices {
                for (i, x) in keys[s].enumerated() { k.pointer[at * row + i] = x }
                for (i, x) in values[s].enumerated() { v.pointer[at * row + i] = x }
                at += lengths[s]
            }
            backend.storeKV(layer: 0, k: k, v: v, rows: total, plan: plan, cache: kv)
            if type == .f16 {
                keys = keys.map { $0.map { Float(Float16($0)) } }
                values = values.map { $0.map { Float(Float16($0)) } }
            }
            let q = try backend.buffer(total * heads * hd), out = try backend.buffer(total * heads * hd)
            for i in 0..<(total * heads * hd) { q.pointer[i] = value() }
            backend.attention(layer: 0, q: q, rows: total, plan: plan, cache: kv, heads: heads, window: window, out: out)
            if CPUFeatures.useAVX512 {
                // The AVX-512 scores and value sums do each lane's arithmetic of the 8-lane loops:
                // the same bits.
                let narrow = CPUBackend(pool: ThreadPool(threadCount: 2), bf16Pairs: false, wideAttention: false)
                let eight = try narrow.buffer(total * heads * hd)
                narrow.attention(layer: 0, q: q, rows: total, plan: plan, cache: kv, heads: heads, window: window, out: eight)
                XCTAssertEqual(Array(UnsafeBufferPointer(start: out.pointer, count: total * heads * hd)),
                               Array(UnsafeBufferPointer(start: eight.pointer, count: total * heads * hd)),
                               "\(type) block \(bs) group \(group) hd \(hd): 16-lane and 8-lane attention")
            }
            // Every token of every sequence attends to its own prefix (within the window).
            var t = 0
            for s in lengths.indices {
                for p in 0..<lengths[s] {
                    let lo = window.map { max(0, p - $0 + 1) } ?? 0
                    for h in 0..<heads {
                        let kvh = h / group
                        let qp = q.pointer + (t * heads + h) * hd
                        var scores = (lo...p).map { j -> Double in
                            var d = 0.0
                            for i in 0..<hd { d += Double(qp[i]) * Double(keys[s][j * row + kvh * hd + i]) }
                            return d / Double(hd).squareRoot()
                        }
                        let m = scores.max()!
                        scores = scores.map { exp($0 - m) }
                        let z = scores.reduce(0, +)
                        for i in 0..<hd {
                            var o = 0.0
                            for (n, j) in (lo...p).enumerated() { o += scores[n] / z * Double(values[s][j * row + kvh * hd + i]) }
                            XCTAssertEqual(Double(out.pointer[(t * heads + h) * hd + i]), o, accuracy: 1e-5,
                                           "\(type) block \(bs) group \(group) hd \(hd) window \(String(describing: window)) seq \(s) pos \(p) head \(h) dim \(i)")
                        }
                    }
                    t += 1
                }
            }
        }
    }
}
