#if canImport(Glibc)
import Glibc
#endif

/// A layer's routed experts on the CPU: each expert's three projections used in place (a slice
/// of a stacked GGUF tensor, or a tensor of its own), and how many passes read each expert.
public final class CPUExperts: @unchecked Sendable {
    public let gate, up, down: [CPUWeight]
    public let hidden: Int
    public let intermediate: Int
    var reads: [Int]

    init(gate: [CPUWeight], up: [CPUWeight], down: [CPUWeight], hidden: Int, intermediate: Int) {
        self.gate = gate
        self.up = up
        self.down = down
        self.hidden = hidden
        self.intermediate = intermediate
        reads = [Int](repeating: 0, count: gate.count)
    }

    public var count: Int { gate.count }

    /// The stacked tensors the experts' gate, up and down weights are slices of: expert 0's
    /// names without the `[0]` the model's loader appends (what a `ProductObserver` is told,
    /// with the expert's index).
    lazy var stackNames: (gate: String, up: String, down: String) = {
        func stack(_ w: CPUWeight) -> String {
            guard w.name.hasSuffix("]"), let open = w.name.lastIndex(of: "[") else { return w.name }
            return String(w.name[..<open])
        }
        return (stack(gate[0]), stack(up[0]), stack(down[0]))
    }()
}

/// Host memory grown on demand and kept: the decode loop allocates nothing once it has seen its
/// largest batch.
final class GrowingFloats {
    private(set) var pointer = UnsafeMutablePointer<Float>.allocate(capacity: 1)
    private var capacity = 1

    func ensure(_ count: Int) {
        guard count > capacity else { return }
        pointer.deallocate()
        capacity = max(count, 2 * capacity)
        pointer = UnsafeMutablePointer<Float>.allocate(capacity: capacity)
    }

    deinit { pointer.deallocate() }
}

/// The CPU backend's memory for one MoE layer's pass: router probabilities, the pass's routes
/// grouped by expert, the gathered rows and their products.
final class ExpertScratch {
    let probabilities = GrowingFloats()
    /// Rows in grouped order (all of expert 0's routes, then expert 1's, ...), and each stage's
    /// product of them.
    let rows = GrowingFloats(), gate = GrowingFloats(), up = GrowingFloats(), down = GrowingFloats()
    /// Routes per expert, and where each expert's group starts.
    var counts: [Int] = []
    var starts: [Int] = []
    /// For route r (row r / k, its (r % k)-th choice): its place in grouped order.
    var place: [Int] = []
    /// For row t: its k routes in order of expert index (indices into the row's routes).
    var order: [Int] = []
}

extension CPUBackend {
    public typealias Experts = CPUExperts

    public func experts(gate: [TensorView], up: [TensorView], down: [TensorView]) throws -> CPUExperts {
        let (d, ff) = try checkExpertTensors(gate: gate, up: up, down: down)
        return CPUExperts(gate: try gate.map(weight), up: try up.map(weight), down: try down.map(weight), hidden: d, intermediate: ff)
    }

    public func routeTopK(_ logits: CPUBuffer, rows: Int, experts n: Int, k: Int, normalize: Bool, routes: CPUBuffer) {
        precondition(k >= 1 && k <= n, "top-\(k) of \(n) experts")
        let s = expertScratch
        s.probabilities.ensure(n)
        let p = s.probabilities.pointer
        for t in 0..<rows {
            let l = logits.pointer + t * n
            var m = -Float.infinity
            for e in 0..<n { m = max(m, l[e]) }
            var sum: Float = 0
            for e in 0..<n {
                p[e] = expf(l[e] - m)
                sum += p[e]
            }
            for e in 0..<n { p[e] /= sum }
            let r = routes.pointer + 2 * k * t
            var chosen: Float = 0
            for j in 0..<k {
                // Probabilities are >= 0: a taken expert is marked -1.
                var best = 0
                for e in 1..<n where p[e] > p[best] { best = e }
                r[2 * j] = p[best]
                r[2 * j + 1] = Float(bitPattern: UInt32(best))
                chosen += p[best]
                p[best] = -1
            }
            if normalize {
                for j in 0..<k { r[2 * j] /= chosen }
            }
        }
    }

    public func expertProducts(_ x: CPUBuffer, rows: Int, routes: CPUBuffer, k: Int, experts: CPUExperts, residual: CPUBuffer) {
        let s = expertScratch
        let n = experts.count, d = experts.hidden, ff = experts.intermediate, total = rows * k
        @inline(__always) func expert(_ r: Int) -> Int {
            let e = Int(routes.pointer[2 * r + 1].bitPattern)
            precondition(e < n, "route to expert \(e) of \(n)")
            return e
        }
        // Group the routes by expert: counts, then each group's start, then each route's place
        // (a group keeps its rows in batch order).
        s.counts.removeAll(keepingCapacity: true)
        s.counts.append(contentsOf: repeatElement(0, count: n))
        for r in 0..<total { s.counts[expert(r)] += 1 }
        s.starts.removeAll(keepingCapacity: true)
        var at = 0
        for e in 0..<n {
            s.starts.append(at)
            at += s.counts[e]
        }
        s.rows.ensure(total * d)
        s.gate.ensure(total * ff)
        s.up.ensure(total * ff)
        s.down.ensure(total * d)
        let xs = s.rows.pointer, gs = s.gate.pointer, us = s.up.pointer, ds = s.down.pointer
        s.place.removeAll(keepingCapacity: true)
        var next = s.starts
        for r in 0..<total {
            let e = expert(r)
            s.place.append(next[e])
            (xs + next[e] * d).update(from: x.pointer + (r / k) * d, count: d)
            next[e] += 1
        }
        // Each chosen expert's weights once, over all of its rows.
        for e in 0..<n where s.counts[e] > 0 {
            experts.reads[e] += 1
            let m = s.counts[e], first = s.starts[e]
            if let observer = productObserver {
                observer.observe(weight: experts.stackNames.gate, expert: e, of: n, input: xs + first * d, rows: m, cols: d)
                observer.observe(weight: experts.stackNames.up, expert: e, of: n, input: xs + first * d, rows: m, cols: d)
            }
            product(xs + first * d, rows: m, weight: experts.gate[e], bias: nil, out: gs + first * ff)
            product(xs + first * d, rows: m, weight: experts.up[e], bias: nil, out: us + first * ff)
            let g = gs + first * ff, u = us + first * ff
            pool.parallelRanges(m * ff, grain: 1 << 14) { range in CPUKernels.siluMul(g, u, g, range) }
            productObserver?.observe(weight: experts.stackNames.down, expert: e, of: n, input: g, rows: m, cols: ff)
            product(gs + first * ff, rows: m, weight: experts.down[e], bias: nil, out: ds + first * d)
        }
        // Each row's weighted sum, its experts taken in index order whatever the batch.
        s.order.removeAll(keepingCapacity: true)
        for t in 0..<rows {
            let base = s.order.count
            for j in 0..<k {
                var i = base + j
                s.order.append(j)
                while i > base, expert(t * k + s.order[i - 1]) > expert(t * k + j) {
                    s.order[i] = s.order[i - 1]
                    i -= 1
                }
                s.order[i] = j
            }
        }
        s.place.withUnsafeBufferPointer { place in
            s.order.withUnsafeBufferPointer { order in
                let body = { (range: Range<Int>) in
                    // The sum in a row of `rows` (free once the products are done), then added.
                    for t in range {
                        let o = xs + t * d
                        o.update(repeating: 0, count: d)
                        for i in 0..<k {
                            let r = t * k + order[t * k + i]
                            CPUKernels.axpy(routes.pointer[2 * r], ds + place[r] * d, o, d)
                        }
                        CPUKernels.axpy(1, o, residual.pointer + t * d, d)
                    }
                }
                if rows * k * d < 1 << 15 { body(0..<rows) } else { pool.parallelRanges(rows, body) }
            }
        }
    }

    public func expertReads(_ experts: CPUExperts) throws -> [Int] { experts.reads }

    public func addSigmoidGated(_ y: CPUBuffer, gate: CPUBuffer, rows: Int, dim: Int, residual: CPUBuffer) {
        for t in 0..<rows {
            let s = 1 / (1 + expf(-gate.pointer[t]))
            CPUKernels.axpy(s, y.pointer + t * dim, residual.pointer + t * dim, dim)
        }
    }
}
