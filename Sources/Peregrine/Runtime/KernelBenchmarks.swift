#if canImport(Glibc)
import Glibc
#endif
#if arch(x86_64)
import PeregrineAVX512
import PeregrineVNNI
#endif

/// The machine's limits, measured with the same thread pool the kernels use, and each CPU kernel
/// measured against them.
public enum KernelBenchmarks {
    public struct Row: Sendable {
        public var kernel: String
        public var shape: String
        public var microseconds: Double
        public var gflops: Double?
        public var gigabytesPerSecond: Double?
        /// A product of a block type, on 8-bit integers.
        public var integer = false
    }

    /// Best of `repetitions` timings of `body`, in seconds.
    static func time(repetitions: Int = 7, _ body: () -> Void) -> Double {
        body()
        var best = Double.infinity
        for _ in 0..<repetitions {
            let t0 = Benchmark.now()
            body()
            best = min(best, Benchmark.now() - t0)
        }
        return best
    }

    /// Read bandwidth: every thread sums its share of a buffer far larger than the caches.
    public static func memoryReadBandwidth(pool: ThreadPool, bytes: Int = 1 << 30) -> Double {
        let n = bytes / 4
        let buf = UnsafeMutablePointer<Float>.allocate(capacity: n)
        defer { buf.deallocate() }
        pool.parallelRanges(n, grain: 1 << 20) { r in for i in r { buf[i] = 1 } }
        let parts = pool.threadCount
        var sink = [Float](repeating: 0, count: parts)
        let t = time(repetitions: 5) {
            sink.withUnsafeMutableBufferPointer { out in
                pool.parallelFor(parts) { p in
                    let lo = n / parts * p, hi = p == parts - 1 ? n : n / parts * (p + 1)
                    var a0 = SIMD8<Float>(), a1 = SIMD8<Float>(), a2 = SIMD8<Float>(), a3 = SIMD8<Float>()
                    var i = lo
                    while i + 32 <= hi {
                        let q = UnsafeRawPointer(buf + i)
                        a0 += q.loadUnaligned(as: SIMD8<Float>.self)
                        a1 += q.loadUnaligned(fromByteOffset: 32, as: SIMD8<Float>.self)
                        a2 += q.loadUnaligned(fromByteOffset: 64, as: SIMD8<Float>.self)
                        a3 += q.loadUnaligned(fromByteOffset: 96, as: SIMD8<Float>.self)
                        i += 32
                    }
                    out[p] = (a0 + a1 + a2 + a3).sum()
                }
            }
        }
        return Double(bytes) / t / 1e9
    }

    /// Peak f32 FMA rate: independent accumulator chains in registers on every thread, 8 lanes
    /// wide, and 16 where the CPU has AVX-512 (the larger: some cores run a 512-bit FMA as two
    /// halves, others have two 512-bit units, twice the 8-lane rate).
    public static func peakFlops(pool: ThreadPool) -> Double {
        var best = chainRate(pool: pool, lanes: 8, fmaChains8)
        #if arch(x86_64)
        if CPUFeatures.useAVX512 { best = max(best, chainRate(pool: pool, lanes: 16, AVX512Products.fmaChains)) }
        #endif
        return best
    }

    /// Peak integer dot-product rate where the CPU has AVX-512 VNNI: 512-bit `vpdpbusd` chains
    /// on every thread (64 multiply-adds an instruction, counted as 128 operations, as the
    /// f32 rate counts an FMA's two). nil elsewhere.
    public static func peakInt8Ops(pool: ThreadPool) -> Double? {
        #if arch(x86_64)
        guard CPUFeatures.useVNNI else { return nil }
        return chainRate(pool: pool, lanes: 64) { Float(WideRowGroupKernels.dotChains(iterations: $0, seed: Int32($1))) }
        #else
        return nil
        #endif
    }

    /// Operations/s of `chains` (12 instructions of `lanes` multiply-adds an iteration) run on
    /// every thread at once.
    static func chainRate(pool: ThreadPool, lanes: Int, _ chains: (_ iterations: Int, _ seed: Float) -> Float) -> Double {
        let iterations = 2_000_000
        let parts = pool.threadCount
        var sink = [Float](repeating: 0, count: parts)
        let t = time(repetitions: 3) {
            sink.withUnsafeMutableBufferPointer { out in
                pool.parallelFor(parts) { p in out[p] = chains(iterations, Float(p)) }
            }
        }
        return Double(parts * iterations * 12 * lanes * 2) / t / 1e9
    }

    /// 12 independent 8-lane FMA chains (`AVX512Products.fmaChains` is the 16-lane twin, in the
    /// module built for AVX-512: this one must run on AVX2-only CPUs).
    static func fmaChains8(iterations: Int, seed: Float) -> Float {
        // Values grow to infinity, which costs nothing extra (denormals would).
        let m = SIMD8<Float>(repeating: 0.999999)
        var a0 = SIMD8<Float>(repeating: seed), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0
        var a8 = a0, a9 = a0, a10 = a0, a11 = a0
        for _ in 0..<iterations {
            a0 = a0.addingProduct(a0, m); a1 = a1.addingProduct(a1, m)
            a2 = a2.addingProduct(a2, m); a3 = a3.addingProduct(a3, m)
            a4 = a4.addingProduct(a4, m); a5 = a5.addingProduct(a5, m)
            a6 = a6.addingProduct(a6, m); a7 = a7.addingProduct(a7, m)
            a8 = a8.addingProduct(a8, m); a9 = a9.addingProduct(a9, m)
            a10 = a10.addingProduct(a10, m); a11 = a11.addingProduct(a11, m)
        }
        return (a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7 + a8 + a9 + a10 + a11).sum()
    }

    /// Matrix products on stored weight types, the shapes of a Llama-3.2-1B-sized layer. The
    /// block types' "GFLOP/s" count their multiply-adds as the float types' do.
    public static func run(backend: CPUBackend) throws -> [Row] {
        var rows: [Row] = []
        for dtype in [DType.f32, .f16, .bf16, .q8_0, .q4_0, .q4_K, .q6_K] {
            // Decode reads a matrix far larger than the caches; prefill reuses one layer's.
            for (tokens, k, outDim) in [(1, 4096, 16384), (512, 2048, 2048)] {
                let rowBytes = dtype.byteCount(elements: k), bytes = outDim * rowBytes
                let raw = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
                defer { raw.deallocate() }
                // 64 random rows, rounded once and repeated: the k-quants' search would take
                // longer than the products over the whole matrix.
                var rng = SeededGenerator(seed: 7)
                let pattern = (0..<(64 * k)).map { _ in Float(rng.nextUnit()) - 0.5 }
                pattern.withUnsafeBufferPointer { Quantizer.quantize(dtype, $0.baseAddress!, count: 64 * k, into: raw) }
                for r in 64..<outDim { (raw + r * rowBytes).copyMemory(from: raw + (r % 64) * rowBytes, byteCount: rowBytes) }
                let w = try backend.weight(TensorView(name: "w", dtype: dtype, shape: [outDim, k], data: UnsafeRawPointer(raw), byteCount: bytes))
                let x = try backend.buffer(tokens * k), y = try backend.buffer(tokens * outDim)
                for i in 0..<(tokens * k) { x.pointer[i] = Float(i % 7) * 0.1 }
                let t = time { backend.matmul(x, rows: tokens, weight: w, bias: nil, out: y) }
                let flops = 2.0 * Double(tokens * k * outDim)
                rows.append(Row(kernel: tokens == 1 ? "gemv \(dtype.rawValue)" : "gemm \(dtype.rawValue)",
                                shape: "\(tokens)x\(k) * \(outDim)x\(k)", microseconds: t * 1e6, gflops: flops / t / 1e9,
                                gigabytesPerSecond: Double(bytes + tokens * (k + outDim) * 4) / t / 1e9, integer: !dtype.isFloat))
            }
        }
        // Elementwise and attention kernels at decode and prefill sizes.
        let d = 2048
        // The norm weight's memory outlives the benchmark (a backend may use it in place).
        let ones = UnsafeMutablePointer<Float>.allocate(capacity: d)
        ones.initialize(repeating: 1, count: d)
        defer { ones.deallocate() }
        let ln = try backend.weight(TensorView(name: "ln", dtype: .f32, shape: [d], data: UnsafeRawPointer(ones), byteCount: d * 4))
        for tokens in [1, 512] {
            let x = try backend.buffer(tokens * d), y = try backend.buffer(tokens * d)
            for i in 0..<(tokens * d) { x.pointer[i] = Float(i % 13) * 0.01 }
            var t = time { backend.rmsNorm(x, weight: ln, eps: 1e-5, rows: tokens, dim: d, out: y) }
            rows.append(Row(kernel: "rmsnorm", shape: "\(tokens)x\(d)", microseconds: t * 1e6, gflops: nil,
                            gigabytesPerSecond: Double(tokens * d * 8) / t / 1e9))
            let ff = 8192
            let g = try backend.buffer(tokens * ff), u = try backend.buffer(tokens * ff)
            t = time { backend.siluMul(gate: g, up: u, count: tokens * ff, out: g) }
            rows.append(Row(kernel: "silu*up", shape: "\(tokens)x\(ff)", microseconds: t * 1e6, gflops: nil,
                            gigabytesPerSecond: Double(tokens * ff * 12) / t / 1e9))
            let heads = 32, hd = 64
            let cos = try backend.buffer(tokens * hd / 2), sin = try backend.buffer(tokens * hd / 2)
            let q = try backend.buffer(tokens * heads * hd)
            t = time { backend.rope(q, rows: tokens, heads: heads, headDim: hd, rotaryDim: hd, cos: cos, sin: sin, interleaved: false) }
            rows.append(Row(kernel: "rope", shape: "\(tokens)x\(heads)x\(hd)", microseconds: t * 1e6, gflops: nil,
                            gigabytesPerSecond: Double(tokens * heads * hd * 8) / t / 1e9))
        }
        // Attention of one query over a 2048-position cache (GQA 32/8, head 64), and of 512 queries.
        let model = AttentionBench(backend: backend)
        for (tokens, context) in [(1, 2048), (512, 512)] {
            let (t, bytes, flops) = try model.run(tokens: tokens, context: context)
            rows.append(Row(kernel: "attention", shape: "\(tokens) q over \(context) kv, 32/8 heads x 64", microseconds: t * 1e6,
                            gflops: flops / t / 1e9, gigabytesPerSecond: bytes / t / 1e9))
        }
        // Sampling over a 152k vocabulary.
        var logits = [Float](repeating: 0, count: 151_936)
        var rng = SeededGenerator(seed: 3)
        for i in logits.indices { logits[i] = rng.nextUnit() * 20 }
        var p = SamplingParameters()
        p.temperature = 0.8
        var sampler = Sampler(p)
        let tokens: [Int32] = []
        var scratch = logits
        let t = time {
            scratch = logits
            _ = scratch.withUnsafeMutableBufferPointer { l in tokens.withUnsafeBufferPointer { sampler.sample(l, context: $0) } }
        }
        rows.append(Row(kernel: "sample top-k/p/min-p", shape: "151936 logits", microseconds: t * 1e6, gflops: nil,
                        gigabytesPerSecond: Double(logits.count * 8) / t / 1e9))
        var picked = 0
        let tg = time { picked &+= logits.withUnsafeBufferPointer { Sampler.argmax($0) } }
        if picked < 0 { print(picked) }  // keeps the timed work observable
        rows.append(Row(kernel: "sample greedy", shape: "151936 logits", microseconds: tg * 1e6, gflops: nil,
                        gigabytesPerSecond: Double(logits.count * 4) / tg / 1e9))
        return rows
    }
}

/// Attention through the backend's KV storage, for the kernel table.
struct AttentionBench {
    let backend: CPUBackend

    func run(tokens: Int, context: Int) throws -> (Double, Double, Double) {
        let heads = 32, kvHeads = 8, hd = 64
        let blockSize = 16, blocks = (context + blockSize - 1) / blockSize
        let cache = try KVStorage(backend: backend, layers: 1, blocks: blocks, blockSize: blockSize, capacity: blocks * blockSize,
                                  kvHeads: kvHeads, headDim: hd)
        for i in 0..<(context * kvHeads * hd) {
            cache.keys[0].pointer[i] = Float(i % 17) * 0.01
            cache.values[0].pointer[i] = Float(i % 11) * 0.01
        }
        var plan = BatchPlan()
        plan.append(tokens: [Int](repeating: 0, count: tokens), slot: 0, position: context - tokens, logits: .none)
        plan.tableWidth = cache.tableWidth
        plan.appendBlockTable((0..<Int32(blocks)).reversed())  // pages out of order, as a busy pool hands them out
        let q = try backend.buffer(tokens * heads * hd), out = try backend.buffer(tokens * heads * hd)
        for i in 0..<(tokens * heads * hd) { q.pointer[i] = Float(i % 5) * 0.1 }
        let t = KernelBenchmarks.time {
            backend.attention(layer: 0, q: q, rows: tokens, plan: plan, cache: cache, heads: heads, window: nil, out: out)
        }
        // Keys and values read per query row (causal), two flops per multiply-add, QK and PV.
        var pairs = 0.0
        for r in 0..<tokens { pairs += Double(context - tokens + r + 1) }
        let flops = pairs * Double(heads * hd) * 4
        let bytes = Double(tokens == 1 ? context * kvHeads * hd * 8 : context * kvHeads * hd * 8)
        return (t, bytes, flops)
    }
}
