import Foundation

/// GPTQ: a weight matrix quantized one input column at a time, each column's rounding error
/// pushed onto the columns not yet quantized so that the product with the calibration inputs
/// changes least. With H = 2 X^T X over the calibration inputs X of the product (the factor
/// cancels) and U the upper Cholesky factor of H^-1 (in the order columns are processed),
/// column i's error e = (w_i - q_i) / U[i,i] moves the later columns by -e U[i, later]. Updates
/// are applied at once within a block of `blockSize` columns and to the rest of the matrix
/// after each block (the same arithmetic, fewer passes over memory).
///
/// The values are those of a GGUF block type, so the file is a standard one: each block's
/// scales (and mins) come from the type's own quantizer (`Quantizer.quantize`, importance-
/// weighted when given) run on the block's values as they stand when its first column comes
/// up, i.e. after the errors of every column processed before it were pushed onto them. That
/// way the scales fit the values actually rounded (which the compensation moves, sometimes
/// past the original extremes) rather than the original ones. Each column is then rounded to
/// the nearest level of those scales (for the IQ4 types, the nearest of the table's uneven
/// levels under the block's scale). With act-order the columns are processed by decreasing
/// H[i,i] (the inputs that matter most first, while there are the most columns left to take
/// their error); blocks are still runs of 32 or 256 consecutive columns of the stored row, and
/// a block's scales are fixed when the first of its columns comes up in that order.
public struct GPTQ: Sendable {
    /// Added to H's diagonal, as a fraction of the diagonal's mean (regularizes columns the
    /// calibration barely exercises).
    public var damp: Double
    public var actOrder: Bool
    public var blockSize: Int

    public init(damp: Double = 0.01, actOrder: Bool = false, blockSize: Int = 128) {
        self.damp = damp
        self.actOrder = actOrder
        self.blockSize = blockSize
    }

    /// Quantizes `rows` x `cols` weights `w` (row-major, f32) to `type` into `out` (the rows'
    /// blocks one after another, as a GGUF tensor stores them). `xtx` is X^T X (`cols` x
    /// `cols`, double). `importance` (one per column) weights the block quantizer's choice of
    /// scales.
    public func quantize(_ w: UnsafePointer<Float>, rows: Int, cols: Int, xtx: [Double], type: DType, importance: [Float]? = nil,
                         into out: UnsafeMutableRawPointer, pool: ThreadPool = .shared) throws {
        precondition(!type.isFloat && cols % type.blockSize == 0 && xtx.count == cols * cols)
        // Processing order: the stored order, or by decreasing diagonal.
        let order = actOrder ? (0..<cols).sorted { (xtx[$0 * cols + $0], $1) > (xtx[$1 * cols + $1], $0) } : Array(0..<cols)
        let u = try inverseCholeskyFactor(xtx, order: order, n: cols, pool: pool)
        try u.withUnsafeBufferPointer { u in
            try quantizeRows(w, rows: rows, cols: cols, order: order, u: u.baseAddress!, type: type, importance: importance, into: out, pool: pool)
        }
    }

    /// U, upper triangular with H^-1 = U^T U, for H = X^T X with its rows and columns in
    /// `order`, dampened (columns with no input get 1 on the diagonal). As f32, row-major.
    func inverseCholeskyFactor(_ xtx: [Double], order: [Int], n: Int, pool: ThreadPool) throws -> [Float] {
        var diagonalMean = 0.0
        for i in 0..<n { diagonalMean += xtx[i * n + i] }
        diagonalMean /= Double(n)
        if diagonalMean <= 0 || !diagonalMean.isFinite { diagonalMean = 1 }
        // A matrix that the damping leaves singular in double precision is retried with more.
        var damp = self.damp
        for _ in 0..<4 {
            // H in reversed processing order: its lower Cholesky factor M gives H = V V^T with
            // V = J M J upper (J the reversal), so U = V^-1 = J M^-1 J.
            var h = [Double](repeating: 0, count: n * n)
            for a in 0..<n {
                let i = order[n - 1 - a]
                for b in 0..<n { h[a * n + b] = xtx[i * n + order[n - 1 - b]] }
                if h[a * n + a] <= 0 { h[a * n + a] = 1 }
                h[a * n + a] += damp * diagonalMean
            }
            if LinearAlgebra.choleskyLower(&h, n: n, pool: pool) {
                let inverse = LinearAlgebra.invertLower(h, n: n, pool: pool)
                var u = [Float](repeating: 0, count: n * n)
                for a in 0..<n {
                    for b in a..<n { u[a * n + b] = Float(inverse[(n - 1 - a) * n + (n - 1 - b)]) }
                }
                return u
            }
            damp = max(damp * 10, 1e-3)
        }
        throw PeregrineError.invalidArgument("the calibration inputs' X^T X is not positive definite even with damping \(damp / 10)")
    }

    /// The column loop, rows in tiles spread over the pool (rows are independent given U).
    func quantizeRows(_ w: UnsafePointer<Float>, rows: Int, cols: Int, order: [Int], u: UnsafePointer<Float>, type: DType,
                      importance: [Float]?, into out: UnsafeMutableRawPointer, pool: ThreadPool) throws {
        let group = type.blockSize, groups = cols / group, blockBytes = type.blockBytes, rowBytes = groups * blockBytes
        var position = [Int](repeating: 0, count: cols)
        for (k, c) in order.enumerated() { position[c] = k }
        let tileRows = 16, span = max(1, blockSize)
        pool.parallelFor((rows + tileRows - 1) / tileRows) { tile in
            let r0 = tile * tileRows, nr = min(tileRows, rows - r0)
            // The tile's weights in processing order, updated as columns are quantized.
            var x = [Float](repeating: 0, count: nr * cols)
            for r in 0..<nr { for k in 0..<cols { x[r * cols + k] = w[(r0 + r) * cols + order[k]] } }
            var errors = [Float](repeating: 0, count: nr * span)
            var grids = [BlockGrid?](repeating: nil, count: nr * groups)
            var levels = [Int](repeating: 0, count: nr * cols)
            var values = [Float](repeating: 0, count: group)
            x.withUnsafeMutableBufferPointer { xb in
                let x = xb.baseAddress!
                var start = 0
                while start < cols {
                    let end = min(cols, start + span)
                    for k in start..<end {
                        let c = order[k], g = c / group
                        if grids[g] == nil {  // row 0's grid: set for every row of the tile at once
                            // The block's first column: its scales from its values as they stand
                            // now, the updates pending from this span's columns included.
                            for r in 0..<nr {
                                for j in 0..<group {
                                    let p = position[g * group + j]
                                    var v = x[r * cols + p]
                                    if p >= end { for q in start..<k { v -= errors[r * span + q - start] * u[q * cols + p] } }
                                    values[j] = v
                                }
                                let block = out + (r0 + r) * rowBytes + g * blockBytes
                                values.withUnsafeBufferPointer { v in
                                    importance.map { imp in
                                        imp.withUnsafeBufferPointer { Quantizer.quantize(type, v.baseAddress!, count: group, importance: $0.baseAddress! + g * group, into: block) }
                                    } ?? Quantizer.quantize(type, v.baseAddress!, count: group, into: block)
                                }
                                grids[r * groups + g] = Quantizer.grid(type, block: block)
                            }
                        }
                        let d = u[k * cols + k]
                        for r in 0..<nr {
                            let grid = grids[r * groups + g]!
                            let v = x[r * cols + k]
                            let level = grid.level(v, at: c - g * group)
                            levels[r * cols + c] = level
                            let e = (v - grid.value(level, at: c - g * group)) / d
                            errors[r * span + k - start] = e
                            let row = x + r * cols, uk = u + k * cols
                            for j in (k + 1)..<max(k + 1, end) { row[j] -= e * uk[j] }
                        }
                    }
                    // The span's errors onto every later column.
                    if end < cols {
                        for r in 0..<nr {
                            let row = x + r * cols
                            for q in start..<end {
                                let e = errors[r * span + q - start], uq = u + q * cols
                                if e == 0 { continue }
                                for j in end..<cols { row[j] -= e * uq[j] }
                            }
                        }
                    }
                    start = end
                }
            }
            for r in 0..<nr {
                for g in 0..<groups {
                    Quantizer.storeLevels(type, Array(levels[(r * cols + g * group)..<(r * cols + (g + 1) * group)]),
                                          into: out + (r0 + r) * rowBytes + g * blockBytes)
                }
            }
        }
    }
}

/// Dense double-precision factorizations for the calibration methods (matrices of a layer's
/// input width: thousands of columns, not more).
enum LinearAlgebra {
    /// In place, the lower Cholesky factor L of the symmetric positive definite `a` (n x n,
    /// row-major; H = L L^T); false when a pivot is not positive. The upper triangle is left
    /// as it was.
    static func choleskyLower(_ a: inout [Double], n: Int, pool: ThreadPool) -> Bool {
        var ok = true
        a.withUnsafeMutableBufferPointer { ab in
            let a = ab.baseAddress!
            for j in 0..<n {
                let rj = a + j * n
                var s = rj[j]
                for k in 0..<j { s -= rj[k] * rj[k] }
                guard s > 0, s.isFinite else { ok = false; return }
                let pivot = s.squareRoot()
                rj[j] = pivot
                let below = n - j - 1
                guard below > 0 else { continue }
                // Row i's entry in column j: a dot product of rows i and j over the first j columns.
                let body = { (i: Int) in
                    let ri = a + i * n
                    var t = ri[j]
                    for k in 0..<j { t -= ri[k] * rj[k] }
                    ri[j] = t / pivot
                }
                if below * j < 1 << 14 {
                    for i in (j + 1)..<n { body(i) }
                } else {
                    pool.parallelRanges(below, grain: max(1, (1 << 13) / max(j, 1))) { range in
                        for i in range { body(j + 1 + i) }
                    }
                }
            }
        }
        return ok
    }

    /// The inverse of the lower triangular `l` (n x n, row-major, only the lower triangle read),
    /// lower triangular, row-major: each column solved by forward substitution.
    static func invertLower(_ l: [Double], n: Int, pool: ThreadPool) -> [Double] {
        var inverse = [Double](repeating: 0, count: n * n)
        l.withUnsafeBufferPointer { lb in
            inverse.withUnsafeMutableBufferPointer { ib in
                let l = lb.baseAddress!, inv = ib.baseAddress!
                pool.parallelFor(n) { c in
                    var x = [Double](repeating: 0, count: n)
                    x[c] = 1 / l[c * n + c]
                    inv[c * n + c] = x[c]
                    if c + 1 < n {
                        for i in (c + 1)..<n {
                            let ri = l + i * n
                            var s = 0.0
                            for m in c..<i { s += ri[m] * x[m] }
                            x[i] = -s / ri[i]
                            inv[i * n + c] = x[i]
                        }
                    }
                }
            }
        }
        return inverse
    }
}
