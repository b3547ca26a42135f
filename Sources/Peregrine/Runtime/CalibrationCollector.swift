import Foundation

/// What the calibration-based quantizers (GPTQ, AWQ) know of a layer weight's inputs over a
/// calibration text: X^T X (the Hessian of the product's squared error, up to a factor 2), the
/// sum of |x| per column, and the rows seen. Sums are in double precision.
public final class InputStatistics {
    public let columns: Int
    /// X^T X, `columns` x `columns`, row-major; only the upper triangle is summed while
    /// collecting (`finish` mirrors it).
    public internal(set) var xtx: [Double]
    public internal(set) var absoluteSums: [Double]
    public internal(set) var rows = 0

    init(columns: Int) {
        self.columns = columns
        xtx = [Double](repeating: 0, count: columns * columns)
        absoluteSums = [Double](repeating: 0, count: columns)
    }

    /// Statistics made from known inputs (tests, and inputs gathered elsewhere): `x` is `rows` x `columns`.
    public convenience init(inputs x: [Float], rows: Int, columns: Int, pool: ThreadPool = .shared) {
        self.init(columns: columns)
        x.withUnsafeBufferPointer { add($0.baseAddress!, rows: rows, pool: pool) }
        finish()
    }

    /// Mean |x| per column.
    public var meanMagnitudes: [Double] { absoluteSums.map { $0 / Double(max(rows, 1)) } }

    /// The mean squared input per column: what an importance matrix holds.
    public var meanSquares: [Float] { (0..<columns).map { Float(xtx[$0 * columns + $0] / Double(max(rows, 1))) } }

    /// Adds `rows` input rows: the upper triangle of X^T X from X transposed into doubles,
    /// in tiles of 4 x 2 columns (rows padded to a multiple of 4 with zeros), spread over the pool.
    func add(_ x: UnsafePointer<Float>, rows n: Int, pool: ThreadPool) {
        let cols = columns, stride = (n + 3) & ~3
        let xt = UnsafeMutablePointer<Double>.allocate(capacity: cols * stride)
        defer { xt.deallocate() }
        xt.initialize(repeating: 0, count: cols * stride)
        for r in 0..<n {
            let row = x + r * cols
            for j in 0..<cols {
                let v = Double(row[j])
                xt[j * stride + r] = v
                absoluteSums[j] += abs(v)
            }
        }
        rows += n
        let tiles = (cols + 3) / 4
        xtx.withUnsafeMutableBufferPointer { h in
            let h = h.baseAddress!
            // Tile t covers columns 4t..4t+3 against every column from 4t on: tiles are of
            // unequal work, so hand them out one at a time.
            pool.parallelFor(tiles) { t in
                let i0 = 4 * t, iCount = min(4, cols - i0)
                var j = i0
                while j < cols {
                    let jCount = min(2, cols - j)
                    var acc = (SIMD4<Double>(), SIMD4<Double>(), SIMD4<Double>(), SIMD4<Double>(),
                               SIMD4<Double>(), SIMD4<Double>(), SIMD4<Double>(), SIMD4<Double>())
                    let a0 = xt + i0 * stride, a1 = xt + min(i0 + 1, cols - 1) * stride
                    let a2 = xt + min(i0 + 2, cols - 1) * stride, a3 = xt + min(i0 + 3, cols - 1) * stride
                    let b0 = xt + j * stride, b1 = xt + min(j + 1, cols - 1) * stride
                    var r = 0
                    while r < stride {
                        let x0 = UnsafeRawPointer(a0 + r).loadUnaligned(as: SIMD4<Double>.self)
                        let x1 = UnsafeRawPointer(a1 + r).loadUnaligned(as: SIMD4<Double>.self)
                        let x2 = UnsafeRawPointer(a2 + r).loadUnaligned(as: SIMD4<Double>.self)
                        let x3 = UnsafeRawPointer(a3 + r).loadUnaligned(as: SIMD4<Double>.self)
                        let y0 = UnsafeRawPointer(b0 + r).loadUnaligned(as: SIMD4<Double>.self)
                        let y1 = UnsafeRawPointer(b1 + r).loadUnaligned(as: SIMD4<Double>.self)
                        acc.0 += x0 * y0; acc.1 += x1 * y0; acc.2 += x2 * y0; acc.3 += x3 * y0
                        acc.4 += x0 * y1; acc.5 += x1 * y1; acc.6 += x2 * y1; acc.7 += x3 * y1
                        r += 4
                    }
                    let sums = [acc.0.sum(), acc.1.sum(), acc.2.sum(), acc.3.sum(), acc.4.sum(), acc.5.sum(), acc.6.sum(), acc.7.sum()]
                    for b in 0..<jCount {
                        for a in 0..<iCount where i0 + a <= j + b { h[(i0 + a) * cols + j + b] += sums[4 * b + a] }
                    }
                    j += 2
                }
            }
        }
    }

    /// Mirrors the upper triangle into the lower one.
    func finish() {
        let n = columns
        for i in 0..<n { for j in 0..<i { xtx[i * n + j] = xtx[j * n + i] } }
    }
}

/// Collects `InputStatistics` for every layer weight while a model runs, as a `ProductObserver`
/// of the CPU backend (weights `blk.*`, named as in GGUF files whatever file the model came
/// from). Weights that read the same input (q/k/v, gate/up) share one set of statistics: a
/// weight first seen with exactly the input of the product before it is tied to that
/// product's statistics, and checked to see the same input every time after. Products of
/// routed experts are not collected (their weights are quantized without calibration).
public final class CalibrationCollector: ProductObserver {
    let pool: ThreadPool
    private var statistics: [String: InputStatistics] = [:]
    /// Weights tied to the statistics of the weight named here.
    private var sharedWith: [String: String] = [:]
    private var names: [String: String?] = [:]
    private var last: (name: String, input: [Float], rows: Int, cols: Int)?
    private(set) var failure: PeregrineError?

    public init(pool: ThreadPool = .shared) {
        self.pool = pool
    }

    private func collectedName(_ stored: String) -> String? {
        if let known = names[stored] { return known }
        let g = GGUFWeights.ggufName(stored)
        let name = g.hasPrefix("blk.") ? g : nil
        names[stored] = name
        return name
    }

    private func sameAsLast(_ input: UnsafePointer<Float>, rows: Int, cols: Int) -> Bool {
        guard let last, last.rows == rows, last.cols == cols else { return false }
        return last.input.withUnsafeBufferPointer { memcmp($0.baseAddress!, input, rows * cols * 4) == 0 }
    }

    public func observe(weight: String, expert: Int, of experts: Int, input: UnsafePointer<Float>, rows: Int, cols: Int) {
        guard rows > 0, experts == 1, failure == nil, let name = collectedName(weight) else { return }
        if let owner = sharedWith[name] {
            if last?.name != owner || !sameAsLast(input, rows: rows, cols: cols) {
                failure = .backend("'\(name)' was first seen with the input of '\(owner)', later with another")
            }
            return
        }
        if statistics[name] == nil, let previous = last, sameAsLast(input, rows: rows, cols: cols) {
            sharedWith[name] = previous.name
            return
        }
        let s = statistics[name] ?? InputStatistics(columns: cols)
        statistics[name] = s
        guard s.columns == cols else {
            failure = .backend("'\(name)' was seen with \(cols) columns, before with \(s.columns)")
            return
        }
        s.add(input, rows: rows, pool: pool)
        if s.absoluteSums.contains(where: { !$0.isFinite }) {
            failure = .backend("the inputs of '\(name)' are not finite")
        }
        last = (name, Array(UnsafeBufferPointer(start: input, count: rows * cols)), rows, cols)
    }

    /// Throws the first inconsistency seen.
    public func check() throws {
        if let failure { throw failure }
    }

    /// The statistics of each weight (GGUF names; weights sharing an input share the object).
    public func result() throws -> [String: InputStatistics] {
        try check()
        for s in statistics.values { s.finish() }
        var all = statistics
        for (name, owner) in sharedWith { all[name] = statistics[owner] }
        return all
    }
}

/// A calibration pass: the model runs over a text cut into chunks as `peregrine imatrix` cuts
/// it (non-overlapping chunks of `context` tokens, each from an empty cache with its first
/// token replaced by BOS) while a `CalibrationCollector` watches its products on the CPU backend.
public struct CalibrationRun {
    public let model: LanguageModel
    public let backend: CPUBackend
    public let context: Int

    public init(model: LanguageModel, backend: CPUBackend, context: Int = 512) {
        self.model = model
        self.backend = backend
        self.context = context
    }

    /// The statistics over `tokens` (at most `maxChunks` chunks). A text shorter than one
    /// chunk is an error.
    public func collect(tokens: [Int], bos: Int?, maxChunks: Int? = nil,
                        progress: (PerplexityEvaluator.Progress) -> Void = { _ in }) throws -> (statistics: [String: InputStatistics], chunks: Int) {
        guard tokens.count >= context else {
            throw PeregrineError.invalidArgument(
                "the calibration text has \(tokens.count) tokens, fewer than one chunk of \(context); give a longer text or a smaller --calibration-ctx")
        }
        let evaluator = try PerplexityEvaluator(model: model, context: context, batch: context)
        let collector = CalibrationCollector(pool: backend.pool)
        let previous = backend.productObserver
        backend.productObserver = collector
        defer { backend.productObserver = previous }
        let result = try evaluator.evaluate(tokens: tokens, bos: bos, maxChunks: maxChunks, minimumChunks: 1,
                                            scored: { _ in try collector.check() }, progress: progress)
        let statistics = try collector.result()
        guard !statistics.isEmpty else {
            throw PeregrineError.unsupported("no matrix products of the model's layers were seen; calibration runs on the CPU backend")
        }
        return (statistics, result.chunks)
    }
}

extension CalibrationRun {
    /// Loads the model at `source` (a model directory or GGUF file) on the CPU backend and
    /// collects the statistics of its layer weights' inputs over `text`.
    public static func statistics(source: String, text: String, context: Int = 512, maxChunks: Int? = nil, pool: ThreadPool = .shared,
                                  progress: (PerplexityEvaluator.Progress) -> Void = { _ in })
        throws -> (statistics: [String: InputStatistics], chunks: Int, tokens: Int) {
        let backend = CPUBackend(pool: pool)
        let model = try ModelRegistry.load(directory: source, backend: backend)
        let tokenizer = try Tokenizer(directory: source)
        let tokens = tokenizer.encode(text)
        let run = CalibrationRun(model: model, backend: backend, context: context)
        let (statistics, chunks) = try run.collect(tokens: tokens, bos: tokenizer.addedBOS, maxChunks: maxChunks, progress: progress)
        return (statistics, chunks, tokens.count)
    }
}
