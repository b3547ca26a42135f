import Foundation
#if canImport(Glibc)
import Glibc
#endif
#if arch(x86_64)
import PeregrineAVX512
import PeregrineBF16
#endif

/// f32 activation memory on the host.
public final class CPUBuffer: @unchecked Sendable {
    public let pointer: UnsafeMutablePointer<Float>
    public let count: Int

    init(count: Int) {
        self.count = count
        pointer = UnsafeMutablePointer<Float>.allocate(capacity: max(count, 1))
        pointer.initialize(repeating: 0, count: max(count, 1))
    }

    deinit { pointer.deallocate() }
}

/// A weight used in place: a matrix [rows, cols] (or a vector: rows == 1) of its stored type.
/// Vectors (norm weights, biases) are widened to f32 once, at load.
public struct CPUWeight: @unchecked Sendable {
    /// The tensor's name in the model's file (what a `ProductObserver` is told).
    public let name: String
    public let dtype: DType
    public let rows: Int
    public let cols: Int
    public let data: UnsafeRawPointer
    let f32: CPUBuffer?
    /// The matrix repacked in groups of eight rows for the row-group kernels, where the CPU and
    /// the type have them (nil: products read `data`).
    let rowGroups: RowGroupMatrix?
    /// An F16 or BF16 matrix's panel copy for the AVX-512 products (nil: they read `data`).
    let panels: PanelMatrix?

    var floats: UnsafePointer<Float> { UnsafePointer(f32?.pointer ?? UnsafeMutablePointer(mutating: data.assumingMemoryBound(to: Float.self))) }
}

/// Runs every kernel on the host's cores with SIMD code and a persistent thread pool.
public final class CPUBackend: ComputeBackend {
    public typealias Buffer = CPUBuffer
    public typealias Weight = CPUWeight

    public let pool: ThreadPool
    public var name: String { "cpu (\(pool.threadCount) threads)" }
    /// Shown the input of every matrix product before it runs (nil: nothing is watched).
    public var productObserver: ProductObserver?
    /// Attention scores, one region per task slot, grown when a longer sequence arrives (never
    /// per token).
    private var scratch: UnsafeMutablePointer<Float>
    private var scratchCapacity = 0

    /// Activations rounded to 8 bits for quantized products (or interleaved for the F16
    /// panels' products, or rounded to BF16 pairs for the BF16 ones), grown like `scratch`.
    private var activationScratch = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 64)
    private var activationCapacity = 64

    /// The rows of a pass grouped by expert, and their products (see `CPUExperts.swift`).
    let expertScratch = ExpertScratch()

    /// Whether BF16 weights go into pair panels for `vdpbf16ps` (activations rounded to BF16).
    let bf16Pairs: Bool

    /// Whether attention's scores and value sums run on AVX-512 (`AVX512Attention`).
    let wideAttention: Bool

    public convenience init(pool: ThreadPool = .shared) {
        self.init(pool: pool, bf16Pairs: CPUFeatures.useBF16Pairs)
    }

    /// `bf16Pairs: false` keeps BF16 products in f32 on a CPU that has AVX-512 BF16;
    /// `wideAttention: false` keeps attention on 8-lane vectors (tests compare the two).
    init(pool: ThreadPool, bf16Pairs: Bool, wideAttention: Bool = CPUFeatures.useAVX512) {
        self.pool = pool
        self.bf16Pairs = bf16Pairs && CPUFeatures.useBF16Pairs
        self.wideAttention = wideAttention && CPUFeatures.useAVX512
        scratch = UnsafeMutablePointer<Float>.allocate(capacity: 1)
    }

    deinit {
        scratch.deallocate()
        activationScratch.deallocate()
    }

    private func ensureScratch(_ count: Int) {
        guard count > scratchCapacity else { return }
        scratch.deallocate()
        scratchCapacity = max(count, 2 * scratchCapacity)
        scratch = UnsafeMutablePointer<Float>.allocate(capacity: scratchCapacity)
    }

    private func ensureActivationScratch(_ bytes: Int) {
        guard bytes > activationCapacity else { return }
        activationScratch.deallocate()
        activationCapacity = max(bytes, 2 * activationCapacity)
        activationScratch = UnsafeMutableRawPointer.allocate(byteCount: activationCapacity, alignment: 64)
    }

    public func weight(_ t: TensorView) throws -> CPUWeight {
        let rows = t.shape.count >= 2 ? t.shape[0] : 1
        let cols = t.shape.count >= 2 ? t.shape.dropFirst().reduce(1, *) : t.elementCount
        guard t.dtype.isFloat || cols % t.dtype.blockSize == 0 else {
            throw PeregrineError.format("tensor '\(t.name)': rows of \(cols) values do not divide into \(t.dtype.rawValue) blocks")
        }
        var f32: CPUBuffer?
        if t.shape.count == 1 {
            let b = CPUBuffer(count: t.elementCount)
            t.toFloat().withUnsafeBufferPointer { b.pointer.update(from: $0.baseAddress!, count: t.elementCount) }
            f32 = b
        }
        let groups = t.shape.count == 2 ? RowGroupMatrix(t.dtype, data: t.data, rows: rows, cols: cols, pool: pool) : nil
        // BF16 takes panels only for the pair products: panels widened to f32 measured faster
        // decode but slower prefill (BENCHMARKS.md).
        let layout: PanelMatrix.Layout? = t.shape.count != 2 ? nil
            : t.dtype == .f16 && CPUFeatures.useHalfPanels ? .halves
            : t.dtype == .bf16 && bf16Pairs ? .bf16Pairs : nil
        let panels = layout.map { PanelMatrix(t.data, rows: rows, k: cols, layout: $0) }
        return CPUWeight(name: t.name, dtype: t.dtype, rows: rows, cols: cols, data: t.data, f32: f32, rowGroups: groups, panels: panels)
    }

    public func outputSize(_ w: CPUWeight) -> Int { w.rows }

    public func buffer(_ count: Int) throws -> CPUBuffer { CPUBuffer(count: count) }

    public func write(_ values: UnsafeBufferPointer<Float>, to buffer: CPUBuffer, offset: Int) {
        (buffer.pointer + offset).update(from: values.baseAddress!, count: values.count)
    }

    public func read(_ buffer: CPUBuffer, offset: Int, into values: UnsafeMutableBufferPointer<Float>) {
        values.baseAddress!.update(from: buffer.pointer + offset, count: values.count)
    }

    public func argmax(_ x: CPUBuffer, row: Int, cols: Int) throws -> Int {
        Sampler.argmax(UnsafeBufferPointer(start: x.pointer + row * cols, count: cols))
    }

    public func topK(_ x: CPUBuffer, row: Int, cols: Int, k: Int, values: UnsafeMutableBufferPointer<Float>,
                     indices: UnsafeMutableBufferPointer<Int32>) throws {
        LogitCandidates.largest(k, of: UnsafeBufferPointer(start: x.pointer + row * cols, count: cols), values: values, indices: indices)
    }

    public func expSum(_ x: CPUBuffer, row: Int, cols: Int, shift: Float, scale: Float) throws -> Float {
        Sampler.expSum(UnsafeBufferPointer(start: x.pointer + row * cols, count: cols), shift: shift, scale: scale)
    }

    public func penalize(_ x: CPUBuffer, row: Int, cols: Int, ids: UnsafeBufferPointer<Int32>, penalty: Float) {
        RepetitionPenalty.apply(penalty, to: UnsafeMutableBufferPointer(start: x.pointer + row * cols, count: cols), ids: ids)
    }

    public func copy(_ src: CPUBuffer, offset srcOffset: Int, to dst: CPUBuffer, offset dstOffset: Int, count: Int) {
        (dst.pointer + dstOffset).update(from: src.pointer + srcOffset, count: count)
    }

    public func embed(tokens: UnsafeBufferPointer<Int32>, table: CPUWeight, out: CPUBuffer) {
        let d = table.cols
        let rowBytes = d / table.dtype.blockSize * table.dtype.blockBytes
        let chosen = lastChosen
        for (t, token) in tokens.enumerated() {
            var id = Int(token)
            if id < 0 {
                let i = -1 - id
                id = i < chosen.count ? chosen[i] : 0
            }
            table.dtype.dequantize(table.data + id * rowBytes, count: d, into: out.pointer + t * d)
        }
    }

    // Chained decode steps: nothing runs ahead on the CPU, so the engine chains them only when
    // asked (its tests do, to check the chaining against steps one at a time).
    private var chosen: [[Int]] = [[], []]
    private var greedyTickets = 0
    /// The choices of the last queued ticket, the ones a chained step's embedding reads.
    private var lastChosen: [Int] { greedyTickets > 0 ? chosen[(greedyTickets - 1) & 1] : [] }
    public var chainsGreedyTokens: Bool { true }
    public var chainedTokenRows: Int { lastChosen.count }
    public var chainableRows: Int { Int.max }
    public var lastGreedyTicket: Int { greedyTickets - 1 }
    public var greedyChainOwner: ObjectIdentifier?

    public func queueGreedy(_ x: CPUBuffer, rows: Int, cols: Int) throws -> Int {
        guard rows > 0 else { throw PeregrineError.invalidArgument("no rows to choose from") }
        let ticket = greedyTickets
        chosen[ticket & 1] = (0..<rows).map { r in Sampler.argmax(UnsafeBufferPointer(start: x.pointer + r * cols, count: cols)) }
        greedyTickets += 1
        return ticket
    }

    public func takeGreedy(_ ticket: Int, rows: Int, cols: Int) throws -> [Int] {
        guard ticket >= 0, ticket < greedyTickets, ticket + 2 >= greedyTickets, chosen[ticket & 1].count == rows else {
            throw PeregrineError.invalidArgument("no greedy choices queued as \(ticket) for \(rows) rows")
        }
        return chosen[ticket & 1]
    }

    public func rmsNorm(_ x: CPUBuffer, weight: CPUWeight, eps: Float, rows: Int, dim: Int, out: CPUBuffer) {
        let w = weight.floats
        let body = { (r: Int) in
            CPUKernels.rmsNorm(x: x.pointer + r * dim, w: w, eps: eps, dim: dim, out: out.pointer + r * dim)
        }
        if rows * dim < 1 << 15 { for r in 0..<rows { body(r) } } else { pool.parallelFor(rows, body) }
    }

    public func matmul(_ x: CPUBuffer, rows: Int, weight: CPUWeight, bias: CPUWeight?, out: CPUBuffer) {
        productObserver?.observe(weight: weight.name, expert: 0, of: 1, input: x.pointer, rows: rows, cols: weight.cols)
        product(x.pointer, rows: rows, weight: weight, bias: bias.map { $0.floats }, out: out.pointer)
    }

    /// out[t, :] = x[t, :] @ weight^T (+ bias) on raw rows (a product over part of a buffer).
    func product(_ x: UnsafePointer<Float>, rows: Int, weight: CPUWeight, bias b: UnsafePointer<Float>?, out: UnsafeMutablePointer<Float>) {
        switch weight.dtype {
        case .f32:
            CPUKernels.matmul(F32Element.self, x: x, tokens: rows, w: weight.data, outDim: weight.rows, k: weight.cols, bias: b, y: out, pool: pool)
        case .f16:
            #if arch(x86_64)
            if let panels = weight.panels {
                ensureActivationScratch(rows * weight.cols * 4)
                CPUKernels.matmulHalfPanels(panels.panels(pool: pool), x: x, tokens: rows, outDim: weight.rows, k: weight.cols, bias: b,
                                            y: out, scratch: activationScratch.assumingMemoryBound(to: Float.self), pool: pool)
                return
            }
            #endif
            CPUKernels.matmul(F16Element.self, x: x, tokens: rows, w: weight.data, outDim: weight.rows, k: weight.cols, bias: b, y: out, pool: pool)
        case .bf16:
            #if arch(x86_64)
            if let panels = weight.panels {
                ensureActivationScratch(rows * BF16PairPanels.pairs(k: weight.cols) * 4)
                CPUKernels.matmulBF16Pairs(panels.panels(pool: pool), x: x, tokens: rows, outDim: weight.rows, k: weight.cols, bias: b,
                                           y: out, scratch: activationScratch.assumingMemoryBound(to: UInt32.self), pool: pool)
                return
            }
            #endif
            CPUKernels.matmul(BF16Element.self, x: x, tokens: rows, w: weight.data, outDim: weight.rows, k: weight.cols, bias: b, y: out, pool: pool)
        case .q8_0, .q4_0, .q4_1, .q5_0, .q5_1, .q4_K, .q5_K, .q6_K, .iq4_nl, .iq4_xs, .q3_K, .q2_K:
            ensureActivationScratch(CPUKernels.activationScratchBytes(weight.dtype, tokens: rows, k: weight.cols))
            if let groups = weight.rowGroups {
                CPUKernels.matmulRowGroups(groups, x: x, tokens: rows, bias: b, y: out, scratch: activationScratch, pool: pool)
            } else {
                CPUKernels.matmulBlocks(weight.dtype, x: x, tokens: rows, w: weight.data, outDim: weight.rows, k: weight.cols,
                                        bias: b, y: out, scratch: activationScratch, pool: pool)
            }
        }
    }

    public func rope(_ x: CPUBuffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: CPUBuffer, sin: CPUBuffer, interleaved: Bool) {
        let half = rotaryDim / 2
        let (stride, offset) = interleaved ? (2, 1) : (1, half)
        for r in 0..<rows {
            let c = cos.pointer + r * half, s = sin.pointer + r * half
            for h in 0..<heads {
                let p = x.pointer + (r * heads + h) * headDim
                for i in 0..<half {
                    let j = i * stride
                    let a = p[j], b = p[j + offset]
                    p[j] = a * c[i] - b * s[i]
                    p[j + offset] = b * c[i] + a * s[i]
                }
            }
        }
    }

    public func storeKV(layer: Int, k: CPUBuffer, v: CPUBuffer, rows: Int, plan: BatchPlan, cache: KVStorage<CPUBackend>) {
        let row = cache.rowSize, bs = cache.blockSize
        let kd = UnsafeMutableRawPointer(cache.keys[layer].pointer), vd = UnsafeMutableRawPointer(cache.values[layer].pointer)
        for t in 0..<rows {
            let at = plan.kvRow(token: t, blockSize: bs)
            switch cache.type {
            case .f32:
                PagedAttention.store(F32Element.self, key: k.pointer + t * row, value: v.pointer + t * row, keys: kd, values: vd,
                                     block: at / bs, offset: at % bs, kvHeads: cache.kvHeads, headDim: cache.headDim, blockSize: bs)
            case .f16:
                PagedAttention.store(F16Element.self, key: k.pointer + t * row, value: v.pointer + t * row, keys: kd, values: vd,
                                     block: at / bs, offset: at % bs, kvHeads: cache.kvHeads, headDim: cache.headDim, blockSize: bs)
            }
        }
    }

    public func attention(layer: Int, q: CPUBuffer, rows: Int, plan: BatchPlan, cache: KVStorage<CPUBackend>,
                          heads: Int, window: Int?, scoring: AttentionScoring, out: CPUBuffer) {
        let hd = cache.headDim
        let kvHeads = cache.kvHeads
        let group = heads / kvHeads
        let row = cache.rowSize
        let scale = scoring.scale, cap = scoring.softCap
        let kd = UnsafeRawPointer(cache.keys[layer].pointer), vd = UnsafeRawPointer(cache.values[layer].pointer)
        let f16 = cache.type == .f16, wide = wideAttention
        var longest = 0
        for t in 0..<rows { longest = max(longest, Int(plan.positions[t]) + 1) }
        if let window { longest = min(longest, window) }
        // Work is (token, KV head) pairs: the group's query heads share each key and value block
        // while it is in cache. Each of a fixed number of tasks takes every tasks-th pair and
        // uses its own scratch region.
        let pairs = rows * kvHeads
        let tasks = min(pairs, pool.threadCount * 4)
        let bs = cache.blockSize, width = plan.tableWidth
        let perTask = PagedAttention.scratchFloats(positions: longest, group: group, blockSize: bs)
        ensureScratch(perTask * tasks)
        let scratchBase = scratch
        plan.positions.withUnsafeBufferPointer { positions in
            plan.slots.withUnsafeBufferPointer { slots in
              plan.blockTables.withUnsafeBufferPointer { tables in
                pool.parallelFor(tasks) { task in
                    var pair = task
                    while pair < pairs {
                        let t = pair / kvHeads, kvh = pair % kvHeads
                        pair += tasks
                        let pos = Int(positions[t])
                        let lo = window.map { max(0, pos - $0 + 1) } ?? 0
                        let head = (t * heads + kvh * group) * hd
                        let table = tables.baseAddress! + Int(slots[t]) * width, sc = scratchBase + task * perTask
                        if f16 {
                            PagedAttention.attend(F16Element.self, wide: wide, q: q.pointer + head, group: group, hd: hd, scale: scale, softCap: cap, kvHead: kvh,
                                                  keys: kd, values: vd, rowSize: row, blockSize: bs, table: table, lo: lo, pos: pos,
                                                  scratch: sc, out: out.pointer + head)
                        } else {
                            PagedAttention.attend(F32Element.self, wide: wide, q: q.pointer + head, group: group, hd: hd, scale: scale, softCap: cap, kvHead: kvh,
                                                  keys: kd, values: vd, rowSize: row, blockSize: bs, table: table, lo: lo, pos: pos,
                                                  scratch: sc, out: out.pointer + head)
                        }
                    }
                }
              }
            }
        }
    }

    public func siluMul(gate: CPUBuffer, up: CPUBuffer, count: Int, out: CPUBuffer) {
        let g = gate.pointer, u = up.pointer, o = out.pointer
        pool.parallelRanges(count, grain: 1 << 14) { r in CPUKernels.siluMul(g, u, o, r) }
    }

    public func geluTanhMul(gate: CPUBuffer, up: CPUBuffer, count: Int, out: CPUBuffer) {
        let g = gate.pointer, u = up.pointer, o = out.pointer
        pool.parallelRanges(count, grain: 1 << 14) { r in CPUKernels.geluTanhMul(g, u, o, r) }
    }

    public func scale(_ x: CPUBuffer, count: Int, by factor: Float) {
        let p = x.pointer
        pool.parallelRanges(count, grain: 1 << 15) { r in CPUKernels.scale(p, factor, r) }
    }

    public func softCap(_ x: CPUBuffer, count: Int, cap: Float) {
        let p = x.pointer
        pool.parallelRanges(count, grain: 1 << 14) { r in CPUKernels.softCap(p, cap, r) }
    }

    public func add(_ x: CPUBuffer, _ y: CPUBuffer, count: Int) {
        let a = x.pointer, b = y.pointer
        for i in 0..<count { a[i] += b[i] }
    }

    public func gatherRows(_ x: CPUBuffer, rows: UnsafeBufferPointer<Int32>, dim: Int, out: CPUBuffer) {
        for (i, r) in rows.enumerated() {
            (out.pointer + i * dim).update(from: x.pointer + Int(r) * dim, count: dim)
        }
    }

    public func synchronize() throws {}
}

/// An F16 or BF16 matrix repacked into panels of 16 rows for the AVX-512 products, made the first
/// time a product reads the matrix (so an embedding table that is only looked up never is).
/// F16 goes into `HalfPanels`: the panel kernel multiplies each row with broadcast activations,
/// one chain of fused multiply-adds over k per (row, token), where the row-major kernel keeps
/// 16-lane partial sums that a tile of 4 rows by 6 tokens must reduce at its end (a quarter of
/// its instructions at k = 512). BF16 goes into `BF16PairPanels` for `vdpbf16ps`, where the CPU
/// has AVX-512 BF16. Once copied, the stored matrix's pages are handed back (as the row groups'
/// are), so the process holds one copy. PEREGRINE_NO_PANELS=1 keeps the row-major kernel for
/// F16; PEREGRINE_NO_BF16_PAIRS=1 for BF16.
final class PanelMatrix: @unchecked Sendable {
    enum Layout { case halves, bf16Pairs }
    let source: UnsafeRawPointer
    let rows, k: Int
    let layout: Layout
    private var storage: UnsafeMutableRawPointer?
    private let lock = NSLock()

    init(_ source: UnsafeRawPointer, rows: Int, k: Int, layout: Layout) {
        self.source = source
        self.rows = rows
        self.k = k
        self.layout = layout
    }

    deinit { storage?.deallocate() }

    /// The panels, repacked by `pool`'s threads on the first call.
    func panels(pool: ThreadPool) -> UnsafeRawPointer {
        lock.lock()
        defer { lock.unlock() }
        if let storage { return UnsafeRawPointer(storage) }
        #if arch(x86_64)
        let (source, rows, k) = (self.source, self.rows, self.k)
        let out: UnsafeMutableRawPointer
        switch layout {
        case .halves:
            out = UnsafeMutableRawPointer.allocate(byteCount: HalfPanels.byteCount(rows: rows, k: k), alignment: 64)
            pool.parallelRanges(HalfPanels.panels(rows: rows)) { range in HalfPanels.repack(source, rows: rows, k: k, panels: range, into: out) }
        case .bf16Pairs:
            out = UnsafeMutableRawPointer.allocate(byteCount: BF16PairPanels.byteCount(rows: rows, k: k), alignment: 64)
            pool.parallelRanges(BF16PairPanels.panels(rows: rows)) { range in
                BF16PairPanels.repack(source, rows: rows, k: k, panels: range, into: out)
            }
        }
        RowGroupMatrix.release(source, bytes: rows * k * 2)
        storage = out
        return UnsafeRawPointer(out)
        #else
        preconditionFailure("panels exist only on x86-64")
        #endif
    }
}
