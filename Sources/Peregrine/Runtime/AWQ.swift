import Foundation

/// AWQ (activation-aware scaling): before rounding, each input column c of the weights that
/// read one input is multiplied by s_c and the input divided by it, folded into the op that
/// makes the input, so the float model computes the same function while the columns that
/// carry large activations are rounded more finely. s = m^alpha, m the mean |x| of each input
/// column over the calibration text (normalized so that max(s) min(s) = 1), with alpha the
/// point of a grid in [0, 1] that minimises the group's product error after rounding to each
/// weight's block type: sum over rows of dW H dW^T, dW = W - Q(W diag(s)) diag(s)^-1, H = X^T X
/// (so no activations need keeping, only their statistics). alpha = 0 is plain rounding, so
/// the search never chooses worse than it by that measure.
///
/// Per layer, in this order (each fold exact in float):
/// - q, k, v (the attention norm's output): the attention norm's weight divided by s;
/// - the attention output (the values' heads): v's rows divided by s; with grouped-query
///   attention the q heads that read one kv head share its scales, taken from their mean m;
/// - gate and up (the MLP norm's output): the MLP norm's weight divided by s;
/// - down (silu(gate) * up): up's rows divided by s.
public struct AWQ: Sendable {
    /// Points of the alpha grid: 0, 1/(n-1), ..., 1.
    public var gridPoints: Int
    /// Searches as if every matrix were quantized to this type (the fold can then be checked in
    /// a float file); nil: each matrix's own type.
    public var searchType: DType?

    public init(gridPoints: Int = 20, searchType: DType? = nil) {
        self.gridPoints = max(2, gridPoints)
        self.searchType = searchType
    }

    /// One group's result: the weights scaled, the alpha chosen, the error at alpha = 0 and at it.
    public struct Choice: Sendable {
        public let weights: [String]
        public let alpha: Double
        public let plainError: Double
        public let error: Double
    }

    /// Float copies of a model's tensors, by GGUF name, changed in place by the fold, with the
    /// importance of each matrix's columns (an importance matrix's entry) where there is one:
    /// a column scaled by s sees inputs divided by s, so its importance is divided by s^2.
    public final class Tensors {
        public var values: [String: [Float]] = [:]
        public var dims: [String: [Int]] = [:]
        public var importance: [String: [Float]] = [:]
        public init() {}
    }

    /// The layout the folds need: heads of the attention output's input.
    public struct Layout: Sendable {
        public let layers: Int
        public let heads: Int
        public let kvHeads: Int
        public let headDim: Int

        public init(layers: Int, heads: Int, kvHeads: Int, headDim: Int) {
            self.layers = layers
            self.heads = heads
            self.kvHeads = kvHeads
            self.headDim = headDim
        }
    }

    /// Searches and folds every layer's scales into `tensors` (which must hold each layer's
    /// norms and projections). `types` gives each matrix's block type; the tensors' importance
    /// weights the rounding as with an importance matrix.
    public func apply(to tensors: Tensors, layout: Layout, statistics: [String: InputStatistics], types: [String: DType],
                      pool: ThreadPool = .shared) throws -> [Choice] {
        let importance = tensors.importance
        var choices: [Choice] = []
        for i in 0..<layout.layers {
            let p = "blk.\(i)."
            func has(_ names: [String]) -> Bool { names.allSatisfy { tensors.values[p + $0] != nil } }
            if has(["attn_norm.weight", "attn_q.weight", "attn_k.weight", "attn_v.weight"]) {
                if let c = try search(["attn_q.weight", "attn_k.weight", "attn_v.weight"].map { p + $0 }, tensors, statistics, types, importance,
                                      shared: nil, pool: pool) {
                    fold(c.scales, columnsOf: c.choice.weights, tensors)
                    divide(p + "attn_norm.weight", elementsBy: c.scales, tensors)
                    choices.append(c.choice)
                }
            }
            if has(["attn_v.weight", "attn_output.weight"]), layout.heads % max(layout.kvHeads, 1) == 0,
               tensors.dims[p + "attn_output.weight"]?.first == layout.heads * layout.headDim,
               tensors.dims[p + "attn_v.weight"]?.last == layout.kvHeads * layout.headDim {
                let shared = (heads: layout.heads, kvHeads: layout.kvHeads, headDim: layout.headDim)
                if let c = try search([p + "attn_output.weight"], tensors, statistics, types, importance, shared: shared, pool: pool) {
                    fold(c.scales, columnsOf: c.choice.weights, tensors)
                    // Input column h * headDim + d comes from v's row (h / group) * headDim + d.
                    let group = layout.heads / layout.kvHeads
                    let vScales = (0..<(layout.kvHeads * layout.headDim)).map { r in c.scales[(r / layout.headDim) * group * layout.headDim + r % layout.headDim] }
                    divide(rowsOf: p + "attn_v.weight", by: vScales, tensors)
                    if tensors.values[p + "attn_v.bias"] != nil { divide(p + "attn_v.bias", elementsBy: vScales, tensors) }
                    choices.append(c.choice)
                }
            }
            if has(["ffn_norm.weight", "ffn_gate.weight", "ffn_up.weight"]) {
                if let c = try search(["ffn_gate.weight", "ffn_up.weight"].map { p + $0 }, tensors, statistics, types, importance,
                                      shared: nil, pool: pool) {
                    fold(c.scales, columnsOf: c.choice.weights, tensors)
                    divide(p + "ffn_norm.weight", elementsBy: c.scales, tensors)
                    choices.append(c.choice)
                }
            }
            if has(["ffn_up.weight", "ffn_down.weight"]) {
                if let c = try search([p + "ffn_down.weight"], tensors, statistics, types, importance, shared: nil, pool: pool) {
                    fold(c.scales, columnsOf: c.choice.weights, tensors)
                    divide(rowsOf: p + "ffn_up.weight", by: c.scales, tensors)
                    if tensors.values[p + "ffn_up.bias"] != nil { divide(p + "ffn_up.bias", elementsBy: c.scales, tensors) }
                    choices.append(c.choice)
                }
            }
        }
        return choices
    }

    /// The best scales for weights that read one input (nil when their statistics are missing
    /// or none of them is quantized). `shared` ties the columns of q heads that read one kv head.
    func search(_ names: [String], _ tensors: Tensors, _ statistics: [String: InputStatistics], _ types: [String: DType],
                _ importance: [String: [Float]], shared: (heads: Int, kvHeads: Int, headDim: Int)?,
                pool: ThreadPool) throws -> (scales: [Float], choice: Choice)? {
        guard let stats = statistics[names[0]], stats.rows > 0,
              names.allSatisfy({ statistics[$0] === stats && tensors.dims[$0]?.first == stats.columns }) else { return nil }
        let cols = stats.columns
        let members = names.map { (name: $0, type: searchType ?? types[$0] ?? .f32) }
            .filter { !$0.type.isFloat && cols % $0.type.blockSize == 0 }
        guard !members.isEmpty else { return nil }
        var magnitude = stats.meanMagnitudes
        if let s = shared {
            let group = s.heads / s.kvHeads
            for kv in 0..<s.kvHeads {
                for d in 0..<s.headDim {
                    let columns = (0..<group).map { (kv * group + $0) * s.headDim + d }
                    let mean = columns.reduce(0) { $0 + magnitude[$1] } / Double(group)
                    for c in columns { magnitude[c] = mean }
                }
            }
        }
        let floor = max(magnitude.max() ?? 0, 1e-30) * 1e-6
        magnitude = magnitude.map { max($0, floor) }
        let h = stats.xtx.map { Float($0) }
        var best: (alpha: Double, error: Double, scales: [Float])?
        var plain = 0.0
        for point in 0..<gridPoints {
            let alpha = Double(point) / Double(gridPoints - 1)
            var s = magnitude.map { pow($0, alpha) }
            let norm = ((s.max() ?? 1) * (s.min() ?? 1)).squareRoot()
            s = s.map { $0 / norm }
            let scales = s.map { Float($0) }
            var error = 0.0
            for m in members {
                error += productError(tensors.values[m.name]!, cols: cols, scales: scales, type: m.type,
                                      importance: importance[m.name], h: h, pool: pool)
            }
            if point == 0 { plain = error }
            if best == nil || error < best!.error { best = (alpha, error, scales) }
        }
        guard let best else { return nil }
        return (best.scales, Choice(weights: members.map(\.name), alpha: best.alpha, plainError: plain, error: best.error))
    }

    /// sum over rows of dW H dW^T for W's rows rounded to `type` after scaling its columns by `scales`.
    func productError(_ w: [Float], cols: Int, scales: [Float], type: DType, importance: [Float]?, h: [Float], pool: ThreadPool) -> Double {
        let rows = w.count / cols
        let rowBytes = type.byteCount(elements: cols)
        let scaledImportance = importance.map { imp in (0..<cols).map { imp[$0] / (scales[$0] * scales[$0]) } }
        var rowErrors = [Double](repeating: 0, count: rows)
        w.withUnsafeBufferPointer { wb in
            h.withUnsafeBufferPointer { hb in
                rowErrors.withUnsafeMutableBufferPointer { eb in
                    let w = wb.baseAddress!, h = hb.baseAddress!, errors = eb.baseAddress!
                    pool.parallelRanges(rows, grain: 4) { range in
                        var scaled = [Float](repeating: 0, count: cols), back = [Float](repeating: 0, count: cols)
                        var diff = [Float](repeating: 0, count: cols)
                        let block = UnsafeMutableRawPointer.allocate(byteCount: rowBytes, alignment: 16)
                        defer { block.deallocate() }
                        for r in range {
                            for c in 0..<cols { scaled[c] = w[r * cols + c] * scales[c] }
                            scaled.withUnsafeBufferPointer { x in
                                if let imp = scaledImportance {
                                    imp.withUnsafeBufferPointer { Quantizer.quantize(type, x.baseAddress!, count: cols, importance: $0.baseAddress!, into: block) }
                                } else {
                                    Quantizer.quantize(type, x.baseAddress!, count: cols, into: block)
                                }
                            }
                            type.dequantize(block, count: cols, into: &back)
                            for c in 0..<cols { diff[c] = w[r * cols + c] - back[c] / scales[c] }
                            var e: Double = 0
                            diff.withUnsafeBufferPointer { d in
                                let d = d.baseAddress!
                                for i in 0..<cols where d[i] != 0 {
                                    let hi = h + i * cols
                                    var t: Float = 0
                                    for j in 0..<cols { t += hi[j] * d[j] }
                                    e += Double(t * d[i])
                                }
                            }
                            errors[r] = e
                        }
                    }
                }
            }
        }
        return rowErrors.reduce(0, +)
    }

    func fold(_ scales: [Float], columnsOf names: [String], _ tensors: Tensors) {
        for name in names {
            if let imp = tensors.importance[name], imp.count == scales.count {
                tensors.importance[name] = (0..<imp.count).map { imp[$0] / (scales[$0] * scales[$0]) }
            }
            guard var w = tensors.values.removeValue(forKey: name) else { continue }
            let cols = scales.count
            for i in 0..<w.count { w[i] *= scales[i % cols] }
            tensors.values[name] = w
        }
    }

    func divide(_ name: String, elementsBy scales: [Float], _ tensors: Tensors) {
        guard var v = tensors.values.removeValue(forKey: name) else { return }
        for i in 0..<min(v.count, scales.count) { v[i] /= scales[i] }
        tensors.values[name] = v
    }

    func divide(rowsOf name: String, by scales: [Float], _ tensors: Tensors) {
        guard var w = tensors.values.removeValue(forKey: name) else { return }
        let cols = w.count / scales.count
        for r in 0..<scales.count { for c in 0..<cols { w[r * cols + c] /= scales[r] } }
        tensors.values[name] = w
    }
}
