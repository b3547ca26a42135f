import XCTest
@testable import Peregrine

/// The CPU the GPU is checked against: BF16 products keep f32 activations, as the GPU's decode
/// products do (on a CPU with AVX-512 BF16 the default rounds them to BF16 for `vdpbf16ps`).
func cpuReference() -> CPUBackend { CPUBackend(pool: .shared, bf16Pairs: false) }

/// The CUDA backend against the CPU backend on the same models. Without an NVIDIA GPU (and its
/// driver, NVRTC and cuBLAS) these skip, saying why.
final class CUDABackendTests: XCTestCase {
    /// A CUDA backend (batch-invariant kernels with `deterministic`), or a skip without CUDA.
    func backend(deterministic: Bool = false) throws -> CUDABackend {
        switch CUDADriver.shared {
        case .failure(let e): throw XCTSkip("no CUDA: \(e)")
        case .success: return try CUDABackend(deterministic: deterministic)
        }
    }

    /// A measuring switch with a value the backend does not know (a mistyped kernel name, a token
    /// count no kernel takes) stops the backend with one error naming it, before anything runs:
    /// no GPU needed. Known values, and switches that are absent or empty, pass.
    func testMistypedMeasuringSwitchesAreRefused() throws {
        XCTAssertNoThrow(try CUDABackend.checkMeasuringSwitches([:]))
        XCTAssertNoThrow(try CUDABackend.checkMeasuringSwitches([
            "PEREGRINE_WGMMA_PROMPT_ATTENTION": "kt128_wg2", "PEREGRINE_QUANT_GEMM": "1", "PEREGRINE_QUANT_GEMM_TOKENS": "256",
            "PEREGRINE_QUANT_GEMM_WS": "1", "PEREGRINE_DECODE_WARPS": "4", "PEREGRINE_DECODE_STAGES": "3", "PEREGRINE_DECODE_SPLITS": "128",
            "PEREGRINE_ROW_KERNEL_TOKENS": "0", "PEREGRINE_SPLIT_POSITIONS": "64", "PEREGRINE_GROUPED_ATTENTION_BLOCKS": "64",
            "PEREGRINE_GROUPED_ATTENTION_FROM": "0", "PEREGRINE_FIXED_MATVEC": "0", "PEREGRINE_CARRIED_NORM": "qkv",
            "PEREGRINE_CHAINED_STEPS": "1", "PEREGRINE_INPUT_SCATTER": "1", "PEREGRINE_CARRIED_HEAD": "0",
            "PEREGRINE_FUSED_DEPTH_ROPE": "0", "PEREGRINE_UNRELATED": "x",
        ]))
        XCTAssertNoThrow(try CUDABackend.checkMeasuringSwitches(["PEREGRINE_QUANT_GEMM_TOKENS": "", "PEREGRINE_DECODE_SPLITS": ""]))
        for value in ["0", "1"] + CUDABackend.warpgroupAttentionKernels.dropFirst().map({ String($0.name.dropFirst(28)) }) {
            XCTAssertNoThrow(try CUDABackend.checkMeasuringSwitches(["PEREGRINE_WGMMA_PROMPT_ATTENTION": value]), value)
        }
        let wrong = [("PEREGRINE_WGMMA_PROMPT_ATTENTION", "kt128-wg2"), ("PEREGRINE_QUANT_GEMM", "yes"),
                     ("PEREGRINE_QUANT_GEMM_TOKENS", "192"), ("PEREGRINE_DECODE_WARPS", "3"), ("PEREGRINE_DECODE_STAGES", "1"),
                     ("PEREGRINE_DECODE_SPLITS", "129"), ("PEREGRINE_ROW_KERNEL_TOKENS", "-1"), ("PEREGRINE_SPLIT_POSITIONS", "0"),
                     ("PEREGRINE_GROUPED_ATTENTION_BLOCKS", "many"), ("PEREGRINE_GROUPED_ATTENTION_FROM", "1k"),
                     ("PEREGRINE_FIXED_MATVEC", "off"), ("PEREGRINE_CARRIED_NORM", "no"), ("PEREGRINE_QUANT_GEMM_WS", "2"),
                     ("PEREGRINE_CHAINED_STEPS", "on"), ("PEREGRINE_INPUT_SCATTER", "yes"), ("PEREGRINE_CARRIED_HEAD", "2"),
                     ("PEREGRINE_FUSED_DEPTH_ROPE", "off")]
        for (name, value) in wrong {
            XCTAssertThrowsError(try CUDABackend.checkMeasuringSwitches([name: value]), "\(name)=\(value)") { error in
                XCTAssertTrue("\(error)".contains("\(name)=\(value)"), "\(error)")
            }
        }
    }

    /// The serving engine on the GPU (a BF16 fixture model): with --deterministic, 24 requests
    /// run together give each request's tokens alone (greedy, and sampled on the device), and so
    /// does a pool that forces preemption; by default, a batch's logits stay within BF16 tolerance of each sequence's alone.
    /// Chained decode steps (the default; `PEREGRINE_CHAINED_STEPS=0` turns them off: the next
    /// step queued before this one's tokens are read, its tokens taken where this one's choice
    /// left them, its inputs staged into the other half of the pinned memory while this one runs
    /// from CUDA graphs)
    /// give the tokens of steps one at a time: one sequence and a batch, stopping at their length
    /// and at a stop token.
    func testChainedStepsOnTheGPU() throws {
        switch CUDADriver.shared {
        case .failure(let e): throw XCTSkip("no CUDA: \(e)")
        case .success: break
        }
        let gpu = try CUDABackend(chainsSteps: true)
        let dir = Fixtures.model("llama-bf16")
        let tokenizer = try Tokenizer(directory: dir)
        let model = try ModelRegistry.load(directory: dir, backend: gpu)
        let prompts = (0..<6).map { i in tokenizer.encode(["And God said", "The kernel", "In the beginning"][i % 3])
            + Array(repeating: 11, count: i * 5) }
        var config = EngineConfig(), single = EngineConfig()
        config.kvBlocks = 256
        single.kvBlocks = 256
        single.chainDecodeSteps = false
        func request(_ p: [Int], _ n: Int, stop: Int? = nil) -> EngineRequest {
            var r = EngineRequest(promptTokens: p, maxTokens: n, sampling: .greedy)
            r.ignoreEOS = true
            if let stop { r.stopTokenIds = [stop] }
            return r
        }
        let long = try Engine(model: model, tokenizer: tokenizer, config: single).generate(prompts: [request(prompts[0], 40)])[0]
        let batches = [[request(prompts[0], 40)], [request(prompts[0], 40, stop: long.tokens[20])],
                       prompts.enumerated().map { i, p in request(p, 8 + 6 * i) }]
        for batch in batches {
            let chained = try Engine(model: model, tokenizer: tokenizer, config: config)
            let a = try chained.generate(prompts: batch)
            let b = try Engine(model: model, tokenizer: tokenizer, config: single).generate(prompts: batch)
            XCTAssertGreaterThan(chained.chainedSteps, 0)
            XCTAssertEqual(chained.stats.kvBlocksUsed, 0)
            for (x, y) in zip(a, b) {
                XCTAssertEqual(x.tokens, y.tokens)
                XCTAssertEqual(x.finishReason, y.finishReason)
            }
        }
    }

    /// With no cache type asked for, the GPU's engine and generator store F16 (as llama.cpp does,
    /// and what the tensor-core attention reads), giving the tokens of an F16 cache asked for;
    /// perplexity's and a drafter's caches are F16 there too.
    func testKVCacheDefaultsToF16OnTheGPU() throws {
        let gpu = try backend()
        let dir = Fixtures.model("llama-bf16")
        let tokenizer = try Tokenizer(directory: dir)
        let model = try ModelRegistry.load(directory: dir, backend: gpu)
        XCTAssertEqual(model.preferredKVCacheType, .f16)
        var config = EngineConfig()
        config.kvBlocks = 64
        var request = EngineRequest(promptTokens: tokenizer.encode("And God said"), maxTokens: 24, sampling: .greedy)
        request.ignoreEOS = true
        let plain = try Engine(model: model, tokenizer: tokenizer, config: config)
        XCTAssertEqual(plain.kvCacheType, .f16)
        let a = try plain.generate(prompts: [request])[0]
        config.kvCacheType = .f16
        let b = try Engine(model: model, tokenizer: tokenizer, config: config).generate(prompts: [request])[0]
        XCTAssertEqual(a.tokens, b.tokens)
        var options = GenerationOptions()
        options.maxTokens = 24
        options.sampling = .greedy
        let x = try Generator(model: model, tokenizer: tokenizer).generate(prompt: "And God said", options: options)
        options.kvCacheType = .f16
        let y = try Generator(model: model, tokenizer: tokenizer).generate(prompt: "And God said", options: options)
        XCTAssertEqual(x.tokens, y.tokens)
        XCTAssertFalse(x.tokens.isEmpty)
        // Perplexity and a drafter follow the backend too.
        XCTAssertEqual(try PerplexityEvaluator(model: model, context: 64).cacheType, .f16)
        XCTAssertEqual(try ModelDrafter(model: model, name: "draft").cacheType, .f16)
    }

    /// A draft model loaded on its target's GPU backend (as `generate --device cuda --deterministic
    /// --draft` does) drafts there, and speculation keeps the plain greedy tokens exactly: with
    /// batch-invariant kernels, the verifier's pass over several tokens gives each the logits a
    /// step of one would.
    func testDraftModelRunsOnTheGPU() throws {
        let gpu = try backend(deterministic: true)
        let dir = Fixtures.model("llama-bf16")
        let tokenizer = try Tokenizer(directory: dir)
        let model = try ModelRegistry.load(directory: dir, backend: gpu)
        let drafter = try ModelDrafter.load(directory: dir, target: model, tokenizer: tokenizer, backend: gpu)
        XCTAssertEqual(drafter.model.backendName, model.backendName)
        var options = GenerationOptions()
        options.maxTokens = 24
        options.sampling = .greedy
        let generator = Generator(model: model, tokenizer: tokenizer)
        let plain = try generator.generate(prompt: "In the beginning", options: options)
        options.speculative = SpeculativeOptions(drafter: drafter, draftTokens: 4, adaptive: false)
        let fast = try generator.generate(prompt: "In the beginning", options: options)
        XCTAssertEqual(plain.tokens, fast.tokens)
        XCTAssertGreaterThan(plain.tokens.count, 4)
        // The draft is the target itself: most of its tokens are accepted.
        XCTAssertGreaterThan(fast.speculation?.accepted ?? 0, plain.tokens.count / 2)
    }

    /// A step's small inputs scattered by one kernel (the default; PEREGRINE_INPUT_SCATTER=0
    /// copies each) give the same greedy tokens as a copy each, for one sequence (its steps
    /// replayed as graphs) and a batch (padded decode steps), chained and one step at a time.
    func testScatteredInputsGiveTheSameTokens() throws {
        let copying = try backend(), scattering = try backend()
        let dir = Fixtures.model("llama-bf16")
        let tokenizer = try Tokenizer(directory: dir)
        copying.scattersInputs = false
        scattering.scattersInputs = true
        let plain = try ModelRegistry.load(directory: dir, backend: copying)
        let model = try ModelRegistry.load(directory: dir, backend: scattering)
        let prompts = (0..<6).map { i in tokenizer.encode(["And God said", "The kernel", "In the beginning"][i % 3])
            + Array(repeating: 11, count: i * 5) }
        for chained in [true, false] {
            var config = EngineConfig()
            config.kvBlocks = 256
            config.chainDecodeSteps = chained
            for batch in [[prompts[0]], prompts] {
                let requests = batch.enumerated().map { i, p in
                    var r = EngineRequest(promptTokens: p, maxTokens: 30 + 3 * i, sampling: .greedy)
                    r.ignoreEOS = true
                    return r
                }
                let a = try Engine(model: model, tokenizer: tokenizer, config: config).generate(prompts: requests)
                let b = try Engine(model: plain, tokenizer: tokenizer, config: config).generate(prompts: requests)
                for (i, (x, y)) in zip(a, b).enumerated() {
                    XCTAssertEqual(x.tokens, y.tokens, "\(batch.count) sequences, chained \(chained), request \(i)")
                }
            }
        }
        XCTAssertGreaterThan(scattering.graphReplays, 0)
        // A decode step stages its plan, RoPE tables and tokens before its first kernel: one
        // scatter a captured step (the head's rows are not gathered, so not staged).
        XCTAssertGreaterThan(scattering.graphCaptures, 0)
        XCTAssertEqual(scattering.scatterLaunches, scattering.graphCaptures)
    }

    func testEngineBatchesOnTheGPU() throws {
        let dir = Fixtures.model("llama-bf16")
        let tokenizer = try Tokenizer(directory: dir)
        let model = try ModelRegistry.load(directory: dir, backend: try backend(deterministic: true))
        let prompts = (0..<24).map { i in tokenizer.encode(["And God said", "The kernel", "In the beginning", "Debian is"][i % 4])
            + Array(repeating: 11, count: i * 3) }
        // Every other request samples (top-k 40, its own seed): drawn on the device with the
        // step's other sampled rows, one launch, which must not depend on the batch either.
        let requests = prompts.enumerated().map { i, p -> EngineRequest in
            var r = EngineRequest(promptTokens: p, maxTokens: 24)
            r.ignoreEOS = true
            if i % 2 == 1 {
                r.sampling.temperature = 0.9
                r.sampling.topK = 40
                r.sampling.seed = UInt64(i)
            } else {
                r.sampling = .greedy
            }
            return r
        }
        var config = EngineConfig()
        config.maxBatchTokens = 128
        config.kvBlocks = 256  // not the default of most of the free device memory, once per engine
        let together = try Engine(model: model, tokenizer: tokenizer, config: config).generate(prompts: requests)
        var small = config
        small.kvBlocks = 16
        config.kvBlocks = 12
        let preempting = try Engine(model: model, tokenizer: tokenizer, config: config)
        let squeezed = try preempting.generate(prompts: requests)
        XCTAssertGreaterThan(preempting.stats.preemptions, 0)
        for (i, r) in requests.enumerated() {
            let alone = try Engine(model: model, tokenizer: tokenizer, config: small).generate(prompts: [r])[0]
            XCTAssertEqual(together[i].tokens, alone.tokens, "request \(i)")
            XCTAssertEqual(squeezed[i].tokens, alone.tokens, "request \(i), preempted")
        }
        // Default kernels: a decode batch's rows against each sequence alone, logits within tolerance.
        let gpu = try backend()
        let fast = try ModelRegistry.load(directory: dir, backend: gpu)
        let cache = try PagedKVCache(model: fast, slots: 4, capacity: 128)
        var plan = BatchPlan()
        for s in 0..<4 { plan.append(tokens: prompts[s * 5], slot: s, position: 0, logits: .last) }
        try cache.prepare(&plan)
        let v = fast.config.vocabSize
        var batched = [Float](repeating: 0, count: 4 * v)
        try batched.withUnsafeMutableBufferPointer { try fast.forward(plan, kv: cache.memory, logits: $0) }
        for s in 0..<4 {
            let solo = try allLogits(fast, prompts[s * 5])
            let last = solo[((prompts[s * 5].count - 1) * v)...]
            let scale = last.reduce(0) { max($0, abs($1)) }
            XCTAssertLessThan(maxAbsDiff(batched[(s * v)..<((s + 1) * v)], last), 0.02 * scale, "sequence \(s)")
        }
        // Decode through the block tables, one sequence (the fused RoPE/KV-write/attention kernel)
        // and three at once (the split kernel), against the CPU on the same tokens.
        let cpu = try ModelRegistry.load(directory: dir, backend: cpuReference())
        // Twenty at once: more than 16 rows, single queries through the split kernel's row map.
        // Three and twenty are decode batches padded to 4 and 24 rows and replayed as graphs
        // (unless PEREGRINE_NO_CUDA_GRAPHS is set), at positions of two split ranges (up to 32, 64).
        // Over an F16 cache the grouped kernel is the tensor-core one (attention_decode_mma), one
        // sequence included (RoPE and the cache write then in rope_store_kv).
        for (width, grouped, type) in [(1, false, .f32), (3, false, .f32), (20, false, .f32), (1, true, .f32), (3, true, .f32), (20, true, .f32),
                                       (1, true, .f16), (20, true, .f16)] as [(Int, Bool, KVCacheType)] {
            // Either split kernel (the fixture's 4/2 heads make too few blocks for the grouped one by default).
            gpu.groupedAttentionBlocks = grouped ? 0 : Int.max
            gpu.groupedAttentionFrom = grouped ? 0 : Int.max
            let replaysBefore = gpu.graphReplays
            let g = try PagedKVCache(model: fast, slots: width, capacity: 128, blockSize: 8, type: type)
            let c = try PagedKVCache(model: cpu, slots: width, capacity: 128, blockSize: 8, type: type)
            var gl = [Float](repeating: 0, count: width * v), cl = gl
            for step in 0..<40 {
                var p = BatchPlan()
                for s in 0..<width {
                    let seq = prompts[s % prompts.count]
                    p.append(tokens: [Int(seq[step % seq.count])], slot: s, position: step, logits: .last)
                }
                var q = p
                try g.prepare(&p)
                try c.prepare(&q)
                try gl.withUnsafeMutableBufferPointer { try fast.forward(p, kv: g.memory, logits: $0) }
                try cl.withUnsafeMutableBufferPointer { try cpu.forward(q, kv: c.memory, logits: $0) }
                for s in 0..<width { try g.advance(s, by: 1); try c.advance(s, by: 1) }
                let scale = cl.reduce(0) { max($0, abs($1)) }
                XCTAssertLessThan(maxAbsDiff(gl, cl), 0.02 * scale, "\(width) sequences, grouped \(grouped), \(type) cache, step \(step)")
            }
            if ProcessInfo.processInfo.environment["PEREGRINE_NO_CUDA_GRAPHS"] == nil {
                // Two keys (split bases 32 and 64), each run eagerly once and captured before it
                // replays; with chained steps each staging half has a graph of its own, so a key's
                // first two runs come twice. A few more may run while the first allocations drop graphs.
                let recorded = 2 * 2 * (gpu.chainsGreedyTokens ? 2 : 1)
                XCTAssertGreaterThan(gpu.graphReplays - replaysBefore, 40 - recorded - 6, "\(width) sequences, grouped \(grouped): steps replayed")
            }
            guard width == 20, type == .f32 else { continue }
            // A mixed step: a 24-token prompt chunk of a new sequence beside 19 decode tokens (flash
            // attention for the chunk, the split kernel for the single queries).
            var p = BatchPlan(), q = BatchPlan()
            for s in 0..<19 {
                p.append(tokens: [Int(prompts[s % prompts.count][0])], slot: s, position: 40, logits: .last)
                q.append(tokens: [Int(prompts[s % prompts.count][0])], slot: s, position: 40, logits: .last)
            }
            try g.trim(19, to: 0)
            try c.trim(19, to: 0)
            let chunk = (0..<24).map { Int(prompts[7][$0 % prompts[7].count]) }
            p.append(tokens: chunk, slot: 19, position: 0, logits: .all)
            q.append(tokens: chunk, slot: 19, position: 0, logits: .all)
            try g.prepare(&p)
            try c.prepare(&q)
            var gm = [Float](repeating: 0, count: (19 + 24) * v), cm = gm
            try gm.withUnsafeMutableBufferPointer { try fast.forward(p, kv: g.memory, logits: $0) }
            try cm.withUnsafeMutableBufferPointer { try cpu.forward(q, kv: c.memory, logits: $0) }
            let scale = cm.reduce(0) { max($0, abs($1)) }
            XCTAssertLessThan(maxAbsDiff(gm, cm), 0.02 * scale, "mixed prompt chunk and decode tokens")
        }
    }

    /// Decode attention against the CPU backend on the same cache and queries, through both split
    /// kernels (one block per KV head and its group of query heads, and one per query head): the
    /// Llama-3-8B layout (32 query heads on 8 KV heads of 128), a group of 16 (two blocks a KV
    /// head), multi-head attention and 256-dimension heads; one query (RoPE and the KV write
    /// fused into the kernel, several splits), five (splits by the longest), twenty (the row
    /// map); with and without a window. Each backend fills its cache through its own storeKV (the
    /// layout inside a block is the backend's), and a second pass of attention alone checks the
    /// keys and values the first one wrote. Both cache types: f32, and F16 (each backend rounding
    /// the token's own key and value as its cache holds them). Over an F16 cache the grouped
    /// case runs once more on tensor cores (attention_decode_mma; for one query with RoPE and the
    /// KV write fused into it too), within f16's bound.
    func testGroupedDecodeAttentionMatchesCPU() throws {
        let gpu = try backend()
        let cpu = cpuReference()
        var rng = SplitMix(seed: 42)
        // The capacity spans the whole pool, so one sequence's table can fill every block; 3,584
        // positions at 32 a split give one sequence 113 splits (the merge's lanes hold up to four).
        let blockSize = 16, blocks = 224, capacity = blocks * blockSize, width = blocks
        gpu.splitPositions = 32
        // attention_split here, and the tensor-core kernel once more over an F16 cache; the
        // tensor-core kernel's splits, warps and buffers are testTensorCoreDecodeAttentionMatchesCPU's.
        gpu.tensorCoreDecodeAllowed = false
        defer { gpu.tensorCoreDecodeAllowed = true }
        let positions = [511, 0, 7, 300, 31, 32, 100, 255, 64, 1]
        for (heads, kvHeads, hd) in [(32, 8, 128), (32, 2, 64), (4, 4, 16), (12, 4, 256), (16, 4, 96), (4, 2, 24)] {
            let keys = (0..<(blocks * blockSize * kvHeads * hd)).map { _ in rng.signedUnit() }
            let values = (0..<(blocks * blockSize * kvHeads * hd)).map { _ in rng.signedUnit() }
            for rows in [1, 5, 20] {
                var plan = BatchPlan()
                plan.tableWidth = width
                for r in 0..<rows {
                    // Block r holds row r's new position (no two rows write one place, none reads
                    // another's); the rest are drawn from blocks 20 and up, shared at random.
                    let position = positions[r % positions.count]
                    plan.append(tokens: [1], slot: r, position: position, logits: .last)
                    plan.appendBlockTable((0..<width).map { i in i == position / blockSize ? Int32(r) : Int32(20 + rng.next() % UInt64(blocks - 20)) })
                }
                let q = (0..<(rows * heads * hd)).map { _ in 2 * rng.signedUnit() }
                let k = (0..<(rows * kvHeads * hd)).map { _ in rng.signedUnit() }
                let v = (0..<(rows * kvHeads * hd)).map { _ in rng.signedUnit() }
                // Whole heads rotated, and half of each (partial rotary: the rest passes unrotated).
                for rotary in [hd, hd / 2] {
                    let angles = (0..<(rows * rotary / 2)).map { _ in 3 * rng.signedUnit() }
                    for (window, grouped) in [(nil, true), (48, true), (nil, false), (48, false)] as [(Int?, Bool)] {
                      for type in KVCacheType.allCases {
                       for tensorCores in type == .f16 && grouped ? [false, true] : [false] {
                        gpu.tensorCoreDecodeAllowed = tensorCores
                        gpu.groupedAttentionBlocks = grouped ? 0 : Int.max
                        gpu.groupedAttentionFrom = grouped ? 0 : Int.max
                        func run<B: ComputeBackend>(_ b: B) throws -> (out: [Float], again: [Float]) {
                            let cache = try KVStorage(backend: b, layers: 1, blocks: blocks, blockSize: blockSize, capacity: capacity,
                                                      kvHeads: kvHeads, headDim: hd, type: type)
                            func buffer(_ x: [Float]) throws -> B.Buffer {
                                let buf = try b.buffer(x.count)
                                x.withUnsafeBufferPointer { b.write($0, to: buf, offset: 0) }
                                return buf
                            }
                            // Position p of one sequence whose table is 0, 1, 2, ...: pool row p.
                            var fill = BatchPlan()
                            fill.tableWidth = width
                            fill.append(tokens: [Int](repeating: 1, count: blocks * blockSize), slot: 0, position: 0, logits: .none)
                            fill.appendBlockTable((0..<Int32(blocks)).map { $0 })
                            b.beginPass(fill)
                            b.storeKV(layer: 0, k: try buffer(keys), v: try buffer(values), rows: fill.count, plan: fill, cache: cache)
                            let out = try b.buffer(rows * heads * hd), again = try b.buffer(rows * heads * hd)
                            b.beginPass(plan)
                            b.ropeAttention(layer: 0, q: try buffer(q), k: try buffer(k), v: try buffer(v), rows: rows, heads: heads,
                                            headDim: hd, rotaryDim: rotary, cos: try buffer(angles.map { cosf($0) }),
                                            sin: try buffer(angles.map { sinf($0) }), interleaved: hd == 64, plan: plan,
                                            cache: cache, window: window, out: out)
                            // Attention alone (not fused) over the cache the pass above wrote into.
                            b.attention(layer: 0, q: try buffer(q), rows: rows, plan: plan, cache: cache, heads: heads, window: window, out: again)
                            try b.synchronize()
                            var o = [Float](repeating: 0, count: rows * heads * hd), o2 = o
                            o.withUnsafeMutableBufferPointer { b.read(out, offset: 0, into: $0) }
                            o2.withUnsafeMutableBufferPointer { b.read(again, offset: 0, into: $0) }
                            return (o, o2)
                        }
                        let (a, c) = (try run(cpu), try run(gpu))
                        let label = "\(heads)/\(kvHeads) heads of \(hd) (\(rotary) rotated), \(rows) rows, window \(window ?? 0), grouped \(grouped), \(type) cache"
                            + (tensorCores ? ", tensor cores" : "")
                        // Tensor cores take queries and probabilities rounded to f16.
                        let bound: Float = tensorCores ? 4e-3 : 1e-4
                        XCTAssertLessThan(maxAbsDiff(a.out, c.out), bound, label)
                        XCTAssertLessThan(maxAbsDiff(a.again, c.again), bound, label + ": over the keys and values it wrote")
                       }
                      }
                    }
                }
            }
        }
    }

    /// Quantized products on the GPU, for every quantized type it keeps. Over more tokens than
    /// the row kernels take, the matrix is widened to BF16 for cuBLAS (`dequantize_bf16`, eight
    /// values a thread, each block's scale decoded once), or on Hopper, by default up to 256
    /// tokens, decoded by quant_gemm (both are run): against the CPU's dequantized values
    /// with weights and activations rounded to BF16 as the GPU rounds them (a value decoded from
    /// the wrong bits moves a sum by the size of a weight, far past the bound). Over a few tokens
    /// the types with row kernels (Q4_K and Q6_K among them) read the weights once for all
    /// tokens: each token's row equals that token's one-token product within float rounding.
    /// Under --deterministic every type's product over many tokens gives each token's alone, bit
    /// for bit.
    func testQuantizedProductsMatchCPU() throws {
        let gpu = try backend(), deterministic = try CUDABackend(deterministic: true)
        let limit = gpu.quantGemmTokenLimit
        defer { gpu.quantGemmTokenLimit = limit }
        var rng = SplitMix(seed: 7)
        func bf16(_ x: Float) -> Float { Half.bf16ToFloat(Half.floatToBF16(x)) }
        func product(_ b: CUDABackend, _ w: CUDAWeight, _ x: ArraySlice<Float>, rows: Int) throws -> [Float] {
            let xb = try b.buffer(x.count), out = try b.buffer(rows * w.rows)
            Array(x).withUnsafeBufferPointer { b.write($0, to: xb, offset: 0) }
            b.matmul(xb, rows: rows, weight: w, bias: nil, out: out)
            try b.synchronize()
            var y = [Float](repeating: 0, count: rows * w.rows)
            y.withUnsafeMutableBufferPointer { b.read(out, offset: 0, into: $0) }
            return y
        }
        let n = 40, k = 768, tokens = 24, few = 5
        for type in [DType.q8_0, .q4_0, .q5_0, .q4_K, .q5_K, .q6_K, .iq4_nl, .iq4_xs, .q3_K, .q2_K] {
            let values = (0..<(n * k)).map { _ in rng.signedUnit() }
            let size = type.byteCount(elements: n * k)
            let bytes = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
            defer { bytes.deallocate() }
            values.withUnsafeBufferPointer { Quantizer.quantize(type, $0.baseAddress!, count: n * k, into: bytes) }
            let view = TensorView(name: "w", dtype: type, shape: [n, k], data: UnsafeRawPointer(bytes), byteCount: size)
            let w = view.toFloat().map(bf16)
            let x = (0..<(tokens * k)).map { _ in rng.signedUnit() }
            let weight = try gpu.weight(view)
            gpu.quantGemmTokenLimit = 0
            let widened = try product(gpu, weight, x[...], rows: tokens)
            gpu.quantGemmTokenLimit = nil
            let byDefault = try product(gpu, weight, x[...], rows: tokens)
            var expected = [Float](repeating: 0, count: tokens * n)
            for t in 0..<tokens {
                for o in 0..<n {
                    var sum = 0.0
                    for i in 0..<k { sum += Double(bf16(x[t * k + i])) * Double(w[o * k + i]) }
                    expected[t * n + o] = Float(sum)
                }
            }
            let scale = expected.reduce(0) { max($0, abs($1)) }
            XCTAssertLessThan(maxAbsDiff(widened, expected), 2e-3 * scale, "\(type), \(tokens) tokens, widened")
            XCTAssertLessThan(maxAbsDiff(byDefault, expected), 2e-3 * scale, "\(type), \(tokens) tokens, the default path")
            if [.q8_0, .q4_0, .q5_0, .q4_K, .q5_K, .q6_K, .iq4_nl].contains(type) {
                let rows = try product(gpu, weight, x[0..<(few * k)], rows: few)
                for t in 0..<few {
                    let alone = try product(gpu, weight, x[(t * k)..<((t + 1) * k)], rows: 1)
                    XCTAssertLessThan(maxAbsDiff(rows[(t * n)..<((t + 1) * n)], alone), 1e-4 * scale, "\(type), token \(t) of \(few)")
                }
            }
            let exact = try deterministic.weight(view)
            let all = try product(deterministic, exact, x[...], rows: tokens)
            for t in [0, 7, tokens - 1] {
                XCTAssertEqual(Array(all[(t * n)..<((t + 1) * n)]), try product(deterministic, exact, x[(t * k)..<((t + 1) * k)], rows: 1),
                               "\(type), token \(t), deterministic")
            }
        }
    }

    /// Prompt products of quantized weights decoded on the fly into wgmma's operands (quant_gemm,
    /// Hopper only) against the widened matrix through cuBLAS (the same BF16 values, summed in
    /// another order), for each type with kernels, both token tiles (128 and 256) and the
    /// warp-specialized form at 256: more weight
    /// rows and tokens than a block takes, neither a multiple of its tile; chunk counts odd (Q8_0,
    /// Q4_0, IQ4_NL) and even; plain, with a bias, added to a residual (with the bias after), q, k
    /// and v of three row counts in one launch (and Q4_K_M's mix: Q4_K q and k in one, a Q6_K v
    /// in another), and gate and up in one launch before the gating (writing BF16 in one slice).
    func testQuantGemmMatchesWidening() throws {
        let gpu = try backend()
        guard gpu.driver.computeCapability == (9, 0) else { throw XCTSkip("quant_gemm needs wgmma (compute capability 9.0)") }
        let before = (gpu.quantGemmTokenLimit, gpu.quantGemmTokens, gpu.quantGemmSlices, gpu.quantGemmWarpSpecialized)
        defer { (gpu.quantGemmTokenLimit, gpu.quantGemmTokens, gpu.quantGemmSlices, gpu.quantGemmWarpSpecialized) = before }
        var rng = SplitMix(seed: 23)
        func read(_ b: CUDABuffer, _ count: Int) throws -> [Float] { try gpu.values(b, count) }
        // 300 tokens (three tiles of 128; two of 256, the second one's rows starting at 256 and
        // running past the last, which the warp-specialized form's TMA copies fill with zeros)
        // and 16, a batch of decode steps. These few tiles take k in slices (split-K) by the
        // backend's rule, added into the outputs; each case also runs in one slice, as products
        // of many tiles do.
        let n = 296  // a multiple of 8, as quant_gemm_ws's stores through the copy engine need for BF16 outputs
        for tokens in [300, 16] {
            for (type, k) in [(DType.q8_0, 832), (.q4_0, 832), (.q5_0, 832), (.iq4_nl, 832), (.iq4_xs, 1024), (.q4_K, 1024), (.q5_K, 1024),
                              (.q6_K, 1024), (.q3_K, 1024), (.q2_K, 1024)] {
                var storage: [UnsafeMutableRawPointer] = []
                defer { storage.forEach { $0.deallocate() } }
                func matrix(_ rows: Int, _ t: DType? = nil) throws -> CUDAWeight {
                    let type = t ?? type
                    let values = (0..<(rows * k)).map { _ in rng.signedUnit() }
                    let size = type.byteCount(elements: rows * k)
                    let bytes = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
                    storage.append(bytes)
                    values.withUnsafeBufferPointer { Quantizer.quantize(type, $0.baseAddress!, count: rows * k, into: bytes) }
                    return try gpu.weight(TensorView(name: "w", dtype: type, shape: [rows, k], data: UnsafeRawPointer(bytes), byteCount: size))
                }
                // The product's matrix; k and v of a q/k/v launch; the up of a gated one; for Q4_K, a
                // v in Q6_K, as Q4_K_M files have (q and k in one launch, v in another).
                let weight = try matrix(n), kw = try matrix(72), vw = try matrix(40), up = try matrix(n)
                let mixedV = type == .q4_K ? try matrix(40, .q6_K) : nil
                let biasValues = (0..<n).map { _ in rng.signedUnit() }
                let bias = try biasValues.withUnsafeBytes {
                    try gpu.weight(TensorView(name: "b", dtype: .f32, shape: [n], data: $0.baseAddress!, byteCount: $0.count))
                }
                let x = (0..<(tokens * k)).map { _ in rng.signedUnit() }, residual = (0..<(tokens * n)).map { _ in rng.signedUnit() }
                let xb = try gpu.buffer(tokens * k), out = try gpu.buffer(tokens * n), scratch = try gpu.buffer(tokens * n)
                let kOut = try gpu.buffer(tokens * 72), vOut = try gpu.buffer(tokens * 40)
                x.withUnsafeBufferPointer { gpu.write($0, to: xb, offset: 0) }
                func run(fused: Bool, tokensABlock: Int? = nil, slices: Int? = nil, warpSpecialized: Bool = false) throws -> [[Float]] {
                    (gpu.quantGemmTokenLimit, gpu.quantGemmTokens, gpu.quantGemmSlices) = (fused ? .max : 0, tokensABlock, slices)
                    gpu.quantGemmWarpSpecialized = warpSpecialized
                    let before = gpu.quantGemmLaunches, splitBefore = gpu.quantGemmSplitLaunches, wsBefore = gpu.quantGemmWarpSpecializedLaunches
                    gpu.matmul(xb, rows: tokens, weight: weight, bias: nil, out: out)
                    let plain = try read(out, tokens * n)
                    gpu.matmul(xb, rows: tokens, weight: weight, bias: bias, out: out)
                    let biased = try read(out, tokens * n)
                    residual.withUnsafeBufferPointer { gpu.write($0, to: out, offset: 0) }
                    gpu.matmulAdd(xb, rows: tokens, weight: weight, bias: bias, residual: out, scratch: scratch)
                    let added = try read(out, tokens * n)
                    gpu.matmul3(xb, rows: tokens, (weight, bias, out), (kw, nil, kOut), (vw, nil, vOut))
                    let (q, kv, vv) = (try read(out, tokens * n), try read(kOut, tokens * 72), try read(vOut, tokens * 40))
                    // Whatever the gating does not write stays NaN (the run before wrote the
                    // same values to the same places).
                    let poison = [Float](repeating: .nan, count: tokens * n)
                    poison.withUnsafeBufferPointer { gpu.write($0, to: out, offset: 0); gpu.write($0, to: scratch, offset: 0) }
                    gpu.gatedProduct(xb, rows: tokens, gate: weight, gateBias: nil, up: up, upBias: nil, activation: .silu, out: out, scratch: scratch)
                    let gated = try read(out, tokens * n)
                    var mixed: [[Float]] = []
                    if let mixedV {
                        gpu.matmul3(xb, rows: tokens, (weight, bias, out), (kw, nil, kOut), (mixedV, nil, vOut))
                        mixed = [try read(out, tokens * n), try read(kOut, tokens * 72), try read(vOut, tokens * 40)]
                    }
                    let launches = fused ? (mixedV == nil ? 5 : 7) : 0
                    XCTAssertEqual(gpu.quantGemmLaunches - before, launches, "\(type): launches of quant_gemm")
                    // These few tiles split by the rule (every launch here; the gating's then keeps
                    // f32 outputs, as BF16 ones are never split), or not when told.
                    XCTAssertEqual(gpu.quantGemmSplitLaunches - splitBefore, slices == 1 ? 0 : launches, "\(type): launches in slices of k")
                    // The warp-specialized form when asked for (its activations' tensor map made,
                    // not the fallback to the other form).
                    XCTAssertEqual(gpu.quantGemmWarpSpecializedLaunches - wsBefore, warpSpecialized ? launches : 0, "\(type): quant_gemm_ws launches")
                    return [plain, biased, added, q, kv, vv, gated] + mixed
                }
                let widened = try run(fused: false)
                for (tokensABlock, slices, ws) in [(128, nil, false), (256, nil, false), (128, 1, false), (256, 1, false), (256, nil, true),
                                                   (256, 1, true)] as [(Int, Int?, Bool)] {
                    let fused = try run(fused: true, tokensABlock: tokensABlock, slices: slices, warpSpecialized: ws)
                    let names = ["plain", "with a bias", "added to a residual", "q", "k", "v", "gated", "q (v in Q6_K)", "k (v in Q6_K)", "v in Q6_K"]
                    for (i, name) in names.prefix(widened.count).enumerated() {
                        let scale = widened[i].reduce(0) { max($0, abs($1)) }
                        XCTAssertGreaterThan(scale, 0)
                        // The widening's gate and up are written in BF16, quant_gemm's in one
                        // slice too (in slices, f32): where two sums lie either side of a
                        // rounding boundary, gate or up differs by one BF16 step (2^-8 to 2^-7
                        // of it), which the gating may enlarge a little.
                        XCTAssertLessThan(maxAbsDiff(fused[i], widened[i]), (name == "gated" ? 0x1p-6 : 2e-5) * scale,
                                          "\(type), k \(k), \(tokens) tokens, \(tokensABlock) a block\(ws ? " (warp-specialized)" : ""), "
                                              + "\(slices == 1 ? "one slice" : "slices"): \(name)")
                    }
                }
            }
        }
    }

    /// Q6_K rows of 2,048 values, which matvec_q6k_body takes two a warp (`paired`): one token's
    /// products against the deterministic backend's row kernel (the same 8-bit input), plain with
    /// an odd row count, added to a residual, and as three matrices in one launch whose pairs of
    /// rows straddle them.
    func testPairedQ6KRowsMatchRowKernel() throws {
        let gpu = try backend(), deterministic = try CUDABackend(deterministic: true)
        var rng = SplitMix(seed: 17)
        let k = 2048
        var storage: [UnsafeMutableRawPointer] = []
        defer { storage.forEach { $0.deallocate() } }
        func matrix(_ rows: Int) -> TensorView {
            let values = (0..<(rows * k)).map { _ in rng.signedUnit() }
            let size = DType.q6_K.byteCount(elements: rows * k)
            let bytes = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
            storage.append(bytes)
            values.withUnsafeBufferPointer { Quantizer.quantize(.q6_K, $0.baseAddress!, count: rows * k, into: bytes) }
            return TensorView(name: "w", dtype: .q6_K, shape: [rows, k], data: UnsafeRawPointer(bytes), byteCount: size)
        }
        let big = matrix(41), parts = [matrix(5), matrix(7), matrix(3)]
        let x = (0..<k).map { _ in rng.signedUnit() }, residual = (0..<41).map { _ in rng.signedUnit() }
        func run(_ b: CUDABackend) throws -> [[Float]] {
            let w = try b.weight(big), ws = try parts.map { try b.weight($0) }
            let xb = try b.buffer(k), y = try b.buffer(41), r = try b.buffer(41), scratch = try b.buffer(41)
            let outs = try parts.map { try b.buffer($0.shape[0]) }
            x.withUnsafeBufferPointer { b.write($0, to: xb, offset: 0) }
            residual.withUnsafeBufferPointer { b.write($0, to: r, offset: 0) }
            b.matmul(xb, rows: 1, weight: w, bias: nil, out: y)
            b.matmulAdd(xb, rows: 1, weight: w, bias: nil, residual: r, scratch: scratch)
            b.matmul3(xb, rows: 1, (ws[0], nil, outs[0]), (ws[1], nil, outs[1]), (ws[2], nil, outs[2]))
            try b.synchronize()
            return ([(y, 41), (r, 41)] + zip(outs, parts.map { $0.shape[0] }).map { ($0, $1) }).map { buffer, count in
                var v = [Float](repeating: 0, count: count)
                v.withUnsafeMutableBufferPointer { b.read(buffer, offset: 0, into: $0) }
                return v
            }
        }
        let got = try run(gpu), expected = try run(deterministic)
        let scale = expected[0].reduce(0) { max($0, abs($1)) }
        XCTAssertGreaterThan(scale, 0)
        for (i, name) in ["plain", "added", "q", "k", "v"].enumerated() {
            XCTAssertLessThan(maxAbsDiff(got[i], expected[i]), 1e-4 * scale, name)
        }
    }

    /// One token's products of 16-bit weights (matvec_half_body, whose lanes read a row in chunks
    /// and load the next chunk before using the current one) against the CPU's sums in doubles:
    /// rows of one partial chunk, of chunks ending mid-way, and of lengths with kernels of their
    /// own (the length fixed at compile time, checked beside the general kernel): whole pairs of
    /// chunks (4,096 and 14,336), an odd number of chunks (3,072), a short last chunk (2,560).
    /// Matrices of 37, 37 and 13 rows, so that a block's last warps have no row and the q/k/v
    /// launch's matrices change inside a block; plain with and without a bias, added to a
    /// residual, the three matrices of q/k/v in one launch, and gated.
    func testHalfMatvecMatchesCPU() throws {
        let gpu = try backend()
        let fixedBefore = gpu.fixedMatvecs
        defer { gpu.fixedMatvecs = fixedBefore }
        var rng = SplitMix(seed: 11)
        func read(_ b: CUDABuffer, _ count: Int) throws -> [Float] { try gpu.values(b, count) }
        let rows = [37, 37, 13], n = rows[0]
        let biasValues = (0..<n).map { _ in rng.signedUnit() }, residualValues = (0..<n).map { _ in rng.signedUnit() }
        let bias = try biasValues.withUnsafeBytes {
            try gpu.weight(TensorView(name: "b", dtype: .f32, shape: [n], data: $0.baseAddress!, byteCount: $0.count))
        }
        for type in [DType.bf16, .f16] {
            for k in [808, 3000, 2560, 3072, 4096, 14336] {
                let x = (0..<k).map { _ in rng.signedUnit() }
                let xb = try gpu.buffer(k)
                x.withUnsafeBufferPointer { gpu.write($0, to: xb, offset: 0) }
                var views: [TensorView] = [], storage: [UnsafeMutableRawPointer] = []
                defer { storage.forEach { $0.deallocate() } }
                for r in rows {
                    let values = (0..<(r * k)).map { _ in rng.signedUnit() }
                    let size = type.byteCount(elements: r * k)
                    let bytes = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
                    storage.append(bytes)
                    values.withUnsafeBufferPointer { Quantizer.quantize(type, $0.baseAddress!, count: r * k, into: bytes) }
                    views.append(TensorView(name: "w", dtype: type, shape: [r, k], data: UnsafeRawPointer(bytes), byteCount: size))
                }
                let weights = try views.map { try gpu.weight($0) }
                let outs = try rows.map { try gpu.buffer($0) }
                let scratch = try gpu.buffer(n)
                var expected: [[Double]] = []
                for m in 0..<3 {
                    let w = views[m].toFloat()
                    expected.append((0..<rows[m]).map { o in (0..<k).reduce(0.0) { $0 + Double(x[$1]) * Double(w[o * k + $1]) } })
                }
                let scale = Float(expected.joined().reduce(0) { max($0, abs($1)) })
                let gated = (0..<n).map { o -> Float in
                    let g = expected[0][o], u = expected[1][o]
                    return Float(g / (1 + exp(-g)) * u)
                }
                let gatedScale = gated.reduce(0) { max($0, abs($1)) }
                let lengthHasKernel = CUDABackend.fixedMatvecLengths.contains(k)
                for fixed in lengthHasKernel ? [true, false] : [false] {
                    gpu.fixedMatvecs = fixed
                    let label = "\(type), k \(k), \(fixed ? "fixed-length" : "general") kernel"
                    gpu.matmul(xb, rows: 1, weight: weights[0], bias: nil, out: outs[0])
                    XCTAssertLessThan(maxAbsDiff(try read(outs[0], n), expected[0].map { Float($0) }), 1e-5 * scale, label + ", plain")
                    gpu.matmul(xb, rows: 1, weight: weights[0], bias: bias, out: outs[0])
                    XCTAssertLessThan(maxAbsDiff(try read(outs[0], n), (0..<n).map { Float(expected[0][$0]) + biasValues[$0] }), 1e-5 * scale,
                                      label + ", with a bias")
                    residualValues.withUnsafeBufferPointer { gpu.write($0, to: outs[0], offset: 0) }
                    gpu.matmulAdd(xb, rows: 1, weight: weights[0], bias: bias, residual: outs[0], scratch: scratch)
                    XCTAssertLessThan(maxAbsDiff(try read(outs[0], n), (0..<n).map { residualValues[$0] + Float(expected[0][$0]) + biasValues[$0] }),
                                      1e-5 * scale, label + ", added to a residual")
                    gpu.matmul3(xb, rows: 1, (weights[0], nil, outs[0]), (weights[1], nil, outs[1]), (weights[2], nil, outs[2]))
                    for m in 0..<3 {
                        XCTAssertLessThan(maxAbsDiff(try read(outs[m], rows[m]), expected[m].map { Float($0) }), 1e-5 * scale, label + ", q/k/v \(m)")
                    }
                    gpu.gatedProduct(xb, rows: 1, gate: weights[0], gateBias: nil, up: weights[1], upBias: nil, activation: .silu,
                                     out: outs[0], scratch: scratch)
                    XCTAssertLessThan(maxAbsDiff(try read(outs[0], n), gated), 1e-4 * gatedScale, label + ", gated")
                }
            }
        }
    }

    /// The RMSNorm between a one-token residual product and the q/k/v product after it, carried
    /// by the two (NormCarry in Kernels.cu), against the norm applied first, in doubles: output
    /// projections of 4,096 and 14,336 values a row into a residual of 4,096, then q/k/v (or
    /// gate/up) of it. Carried, the norm's output buffer holds the residual times the norm's
    /// weights; before gate/up in a pass of a sequence too long for it (`shortSequencePass`
    /// false), with a launch between the residual product and the next (an add), or with
    /// PEREGRINE_CARRIED_NORM's switch off, the norm runs first and writes the normalized row.
    func testCarriedNormMatchesNormFirst() throws {
        let gpu = try backend()
        let carriedBefore = gpu.carriedNorm, gateBefore = gpu.carriedNormBeforeGate, shortBefore = gpu.shortSequencePass
        let headBefore = gpu.carriedHead
        defer {
            gpu.carriedNorm = carriedBefore; gpu.carriedNormBeforeGate = gateBefore; gpu.shortSequencePass = shortBefore
            gpu.carriedHead = headBefore
        }
        gpu.carriedNormBeforeGate = true
        gpu.carriedHead = true
        var rng = SplitMix(seed: 5)
        var storage: [UnsafeMutableRawPointer] = []
        defer { storage.forEach { $0.deallocate() } }
        func matrix(_ n: Int, _ k: Int) throws -> (view: TensorView, weight: CUDAWeight) {
            let values = (0..<(n * k)).map { _ in rng.signedUnit() * 0.05 }
            let size = DType.bf16.byteCount(elements: n * k)
            let bytes = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 64)
            storage.append(bytes)
            values.withUnsafeBufferPointer { Quantizer.quantize(.bf16, $0.baseAddress!, count: n * k, into: bytes) }
            let view = TensorView(name: "w", dtype: .bf16, shape: [n, k], data: UnsafeRawPointer(bytes), byteCount: size)
            return (view, try gpu.weight(view))
        }
        let d = 4096, n = 24, eps: Float = 1e-5
        let g = (0..<d).map { _ in 0.5 + (rng.signedUnit() + 1) / 2 }
        let norm = try g.withUnsafeBytes { bytes in
            try gpu.weight(TensorView(name: "norm", dtype: .f32, shape: [d], data: bytes.baseAddress!, byteCount: bytes.count))
        }
        let consumers = try (0..<3).map { _ in try matrix(n, d) }
        let consumerValues = consumers.map { $0.view.toFloat() }
        let outs = try (0..<3).map { _ in try gpu.buffer(n) }
        let scratch = try gpu.buffer(n), normed = try gpu.buffer(d), other = try gpu.buffer(d)
        let x0 = (0..<d).map { _ in rng.signedUnit() }, added = (0..<d).map { _ in rng.signedUnit() }
        added.withUnsafeBufferPointer { gpu.write($0, to: other, offset: 0) }
        for k in [4096, 14336] {
            let producer = try matrix(d, k)
            let pv = producer.view.toFloat()
            let a = (0..<k).map { _ in rng.signedUnit() }
            let ab = try gpu.buffer(k), xb = try gpu.buffer(d)
            a.withUnsafeBufferPointer { gpu.write($0, to: ab, offset: 0) }
            let residual = pv.withUnsafeBufferPointer { w in
                (0..<d).map { o in
                    var s = Double(x0[o])
                    for i in 0..<k { s += Double(w[o * k + i]) * Double(a[i]) }
                    return s
                }
            }
            for (carried, addBetween) in [(true, false), (true, true), (false, false)] {
                gpu.carriedNorm = carried
                let label = "rows of \(k), \(carried ? "carried" : "switched off")\(addBetween ? ", an add between" : "")"
                // The residual after the product (and the add), normalized, in doubles.
                var h = residual
                if addBetween { for o in 0..<d { h[o] += Double(added[o]) } }
                let scale = 1 / (h.reduce(0) { $0 + $1 * $1 } / Double(d) + Double(eps)).squareRoot()
                let xn = (0..<d).map { h[$0] * scale * Double(g[$0]) }
                let want = consumerValues.map { w in (0..<n).map { o in (0..<d).reduce(0.0) { $0 + Double(w[o * d + $1]) * xn[$1] } } }
                let gated = (0..<n).map { o -> Float in Float(want[0][o] / (1 + exp(-want[0][o])) * want[1][o]) }
                let bound = 1e-5 * Float(want.joined().reduce(0) { max($0, abs($1)) })
                let gatedBound = 1e-4 * gated.reduce(0) { max($0, abs($1)) }
                // q/k/v; gate/up in a short pass and in a long one; one matrix alone (the output head).
                for (gatedCase, short, head) in [(false, false, false), (true, true, false), (true, false, false), (false, false, true)] {
                    gpu.shortSequencePass = short
                    x0.withUnsafeBufferPointer { gpu.write($0, to: xb, offset: 0) }
                    gpu.matmulAdd(ab, rows: 1, weight: producer.weight, bias: nil, residual: xb, scratch: scratch)
                    if addBetween { gpu.add(xb, other, count: d) }
                    if head {
                        gpu.normMatmul(xb, norm: norm, eps: eps, dim: d, normed: normed, rows: 1, weight: consumers[2].weight, out: outs[2])
                        XCTAssertLessThan(maxAbsDiff(try gpu.values(outs[2], n), want[2].map { Float($0) }), bound, label + ", head")
                    } else if gatedCase {
                        gpu.normGatedProduct(xb, norm: norm, eps: eps, dim: d, normed: normed, rows: 1, gate: consumers[0].weight,
                                             gateBias: nil, up: consumers[1].weight, upBias: nil, activation: .silu, out: outs[0], scratch: scratch)
                        XCTAssertLessThan(maxAbsDiff(try gpu.values(outs[0], n), gated), gatedBound,
                                          label + ", gate/up" + (short ? " (short)" : ""))
                    } else {
                        gpu.normMatmul3(xb, norm: norm, eps: eps, dim: d, normed: normed, rows: 1, (consumers[0].weight, nil, outs[0]),
                                        (consumers[1].weight, nil, outs[1]), (consumers[2].weight, nil, outs[2]))
                        for m in 0..<3 {
                            XCTAssertLessThan(maxAbsDiff(try gpu.values(outs[m], n), want[m].map { Float($0) }), bound, label + ", q/k/v \(m)")
                        }
                    }
                    let normedNow = try gpu.values(normed, d).map(Double.init)
                    let held = carried && !addBetween && (!gatedCase || short) ? (0..<d).map { h[$0] * Double(g[$0]) } : xn
                    let worst = zip(normedNow, held).reduce(0.0) { max($0, abs($1.0 - $1.1)) }
                    let part = head ? ", head" : gatedCase ? ", gate/up" + (short ? " (short)" : "") : ", q/k/v"
                    XCTAssertLessThan(worst, 1e-5 * held.reduce(0.0) { max($0, abs($1)) }, label + part + ": the norm's output buffer")
                }
            }
        }
    }

    /// Prompt attention over an F16 cache on the tensor cores against the CPU backend on the same
    /// cache: Llama-3-8B's layout, groups of 4, 3, 1, 8, 16 and 6 query heads a KV head (blocks of
    /// 4, 1, 1, 8, 16 and 2 heads; and with one head a block), head sizes 64, 96, 128 and 256 (128
    /// on each of Hopper's warpgroup-MMA kernels too, with groups of 4, 8 and 16); one launch
    /// holding three sequences' prompt chunks (one starting mid-sequence at a position that is no
    /// multiple of a tile, so its queries attend to keys cached before it; one short of a tile);
    /// with and without a sliding window and Gemma 2's soft-capping. Queries and probabilities
    /// are rounded to f16 on the GPU, so the bound is f16's; the f32 kernel on the same F16 cache
    /// (`tensorCoreAttentionAllowed` off) is held to 1e-4 (5e-4 with the larger capped scores). The chunks' blocks come from a shared
    /// pool in shuffled order, as the block manager hands them out.
    func testTensorCorePromptAttentionMatchesCPU() throws {
        let gpu = try backend()
        guard gpu.driver.computeCapability.major >= 8 else { throw XCTSkip("tensor-core attention needs compute capability 8.0 or later") }
        let warpgroupDefault = gpu.warpgroupPromptAttention
        defer { gpu.tensorCoreAttentionAllowed = true; gpu.groupedPromptAttention = true; gpu.warpgroupPromptAttention = warpgroupDefault }
        let cpu = cpuReference()
        var rng = SplitMix(seed: 7)
        let blockSize = 16, blocks = 64, width = 24
        // (slot, first position, rows): chunk of slot 0 from 37 (its keys 0 ..< 37 cached before).
        let chunks = [(0, 37, 150), (1, 0, 70), (2, 200, 17)]
        for (heads, kvHeads, hd) in [(32, 8, 128), (8, 2, 64), (12, 4, 256), (6, 6, 96), (16, 2, 128), (32, 2, 64), (12, 2, 64), (32, 2, 128)] {
            var order = Array(0..<Int32(blocks))
            for i in stride(from: order.count - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
            var plan = BatchPlan()
            plan.tableWidth = width
            for (c, (slot, start, rows)) in chunks.enumerated() {
                plan.append(tokens: [Int](repeating: 1, count: rows), slot: slot, position: start, logits: .all)
                plan.appendBlockTable(Array(order[(c * 20)..<(c * 20 + width)]))
            }
            let rows = plan.count
            // Keys and values of every position up to the chunks' ends (what earlier chunks stored too).
            var fill = BatchPlan()
            fill.tableWidth = width
            for (c, (slot, start, n)) in chunks.enumerated() {
                fill.append(tokens: [Int](repeating: 1, count: start + n), slot: slot, position: 0, logits: .none)
                fill.appendBlockTable(Array(order[(c * 20)..<(c * 20 + width)]))
            }
            let keys = (0..<(fill.count * kvHeads * hd)).map { _ in 2 * rng.signedUnit() }
            let values = (0..<(fill.count * kvHeads * hd)).map { _ in rng.signedUnit() }
            let q = (0..<(rows * heads * hd)).map { _ in 2 * rng.signedUnit() }
            for (window, cap) in [(nil, nil), (48, nil), (nil, 30)] as [(Int?, Float?)] {
                let scoring = AttentionScoring(scale: 1 / Float(hd).squareRoot() * (cap == nil ? 1 : 8), softCap: cap)
                func run<B: ComputeBackend>(_ b: B) throws -> [Float] {
                    try attentionOverF16Cache(b, fill: fill, keys: keys, values: values, plan: plan, q: q, heads: heads, kvHeads: kvHeads,
                                              headDim: hd, blocks: blocks, blockSize: blockSize, width: width, window: window, scoring: scoring)
                }
                let label = "\(heads)/\(kvHeads) heads of \(hd), window \(window ?? 0), cap \(cap ?? 0)"
                let expected = try run(cpu)
                gpu.tensorCoreAttentionAllowed = true
                gpu.warpgroupPromptAttention = nil  // mma.sync (Hopper's 128-wide heads take warpgroup MMA by default)
                let fast = try run(gpu)
                // Scores of 8x the scale (soft-capped) carry 8x the error of rounding the queries.
                XCTAssertLessThan(maxAbsDiff(fast, expected), cap == nil ? 4e-3 : 1.5e-2, label + ": tensor cores")
                gpu.groupedPromptAttention = false
                XCTAssertLessThan(maxAbsDiff(try run(gpu), expected), cap == nil ? 4e-3 : 1.5e-2, label + ": tensor cores, a head a block")
                gpu.groupedPromptAttention = true
                for kernel in CUDABackend.warpgroupAttentionKernels where gpu.driver.computeCapability == (9, 0) && hd == 128 {
                    gpu.warpgroupPromptAttention = kernel
                    XCTAssertLessThan(maxAbsDiff(try run(gpu), expected), cap == nil ? 4e-3 : 1.5e-2, label + ": " + kernel.name)
                    gpu.groupedPromptAttention = false
                    XCTAssertLessThan(maxAbsDiff(try run(gpu), expected), cap == nil ? 4e-3 : 1.5e-2, label + ": \(kernel.name), a head a block")
                    gpu.groupedPromptAttention = true
                }
                gpu.warpgroupPromptAttention = nil
                gpu.tensorCoreAttentionAllowed = false
                XCTAssertLessThan(maxAbsDiff(try run(gpu), expected), cap == nil ? 1e-4 : 5e-4, label + ": f32 kernel")
            }
        }
    }

    /// A batch's decode attention over an F16 cache on the tensor cores (attention_decode_mma)
    /// against the CPU backend on the same cache: 24 single queries of sequences from 1 to 700
    /// positions (and one query alone), their blocks from a shared pool in shuffled order; groups
    /// of 4, 4, 20, 2 and 4 query heads a KV head (20: three blocks of up to eight heads), head
    /// sizes 128, 64, 96, 16 and 32; one
    /// split a sequence, three, and forty (more than a short sequence has positions, so some
    /// splits are empty); with and without a
    /// sliding window and soft-capping; four warps a block with three tile buffers and with two,
    /// and two warps. The bound is f16's, as for the prompt kernel; attention_split on the same
    /// batch is held to 1e-4.
    func testTensorCoreDecodeAttentionMatchesCPU() throws {
        let gpu = try backend()
        guard gpu.driver.computeCapability.major >= 8 else { throw XCTSkip("tensor-core attention needs compute capability 8.0 or later") }
        gpu.groupedAttentionBlocks = 0
        defer { gpu.tensorCoreDecodeAllowed = true; gpu.groupedAttentionBlocks = 64; gpu.decodeSplits = nil; gpu.tensorCoreDecodeWarps = nil
                gpu.tensorCoreDecodeStages = nil }
        let cpu = cpuReference()
        var rng = SplitMix(seed: 11)
        let blockSize = 16, width = 48, blocks = 24 * width
        let all = (0..<24).map { r in [0, 1, 15, 16, 63, 64, 65, 200, 511, 699][r % 10] + (r / 10) * 3 }
        for (heads, kvHeads, hd, positions) in [(32, 8, 128, all), (8, 2, 64, all), (40, 2, 96, all), (32, 8, 128, [699]), (4, 2, 16, all),
                                                (16, 4, 32, all)] {
            let rows = positions.count
            var order = Array(0..<Int32(blocks))
            for i in stride(from: order.count - 1, to: 0, by: -1) { order.swapAt(i, Int(rng.next() % UInt64(i + 1))) }
            var plan = BatchPlan(), fill = BatchPlan()
            plan.tableWidth = width
            fill.tableWidth = width
            for (r, p) in positions.enumerated() {
                let table = Array(order[(r * width)..<((r + 1) * width)])
                plan.append(tokens: [1], slot: r, position: p, logits: .last)
                plan.appendBlockTable(table)
                fill.append(tokens: [Int](repeating: 1, count: p + 1), slot: r, position: 0, logits: .none)
                fill.appendBlockTable(table)
            }
            let keys = (0..<(fill.count * kvHeads * hd)).map { _ in 2 * rng.signedUnit() }
            let values = (0..<(fill.count * kvHeads * hd)).map { _ in rng.signedUnit() }
            let q = (0..<(rows * heads * hd)).map { _ in 2 * rng.signedUnit() }
            for (window, cap) in [(nil, nil), (48, nil), (nil, 30)] as [(Int?, Float?)] {
                let scoring = AttentionScoring(scale: 1 / Float(hd).squareRoot() * (cap == nil ? 1 : 8), softCap: cap)
                func run<B: ComputeBackend>(_ b: B) throws -> [Float] {
                    try attentionOverF16Cache(b, fill: fill, keys: keys, values: values, plan: plan, q: q, heads: heads, kvHeads: kvHeads,
                                              headDim: hd, blocks: blocks, blockSize: blockSize, width: width, window: window, scoring: scoring)
                }
                let expected = try run(cpu)
                for splits in [1, 3, 40] {
                    gpu.decodeSplits = splits
                    let label = "\(heads)/\(kvHeads) heads of \(hd), window \(window ?? 0), cap \(cap ?? 0), \(splits) splits"
                    gpu.tensorCoreDecodeAllowed = true
                    for (warps, stages) in [(4, 3), (4, 2), (2, 2)] {
                        gpu.tensorCoreDecodeWarps = warps
                        gpu.tensorCoreDecodeStages = stages
                        XCTAssertLessThan(maxAbsDiff(try run(gpu), expected), cap == nil ? 4e-3 : 1.5e-2,
                                          label + ": tensor cores, \(warps) warps, \(stages) buffers")
                    }
                    gpu.tensorCoreDecodeAllowed = false
                    XCTAssertLessThan(maxAbsDiff(try run(gpu), expected), cap == nil ? 1e-4 : 5e-4, label + ": attention_split")
                }
            }
        }
    }

    /// Attention of `plan`'s rows over an F16 cache that `fill` (one row per cached position)
    /// first stores `keys` and `values` into, on backend `b`: the output rows.
    private func attentionOverF16Cache<B: ComputeBackend>(_ b: B, fill: BatchPlan, keys: [Float], values: [Float], plan: BatchPlan,
                                                          q: [Float], heads: Int, kvHeads: Int, headDim hd: Int, blocks: Int,
                                                          blockSize: Int, width: Int, window: Int?, scoring: AttentionScoring) throws -> [Float] {
        let cache = try KVStorage(backend: b, layers: 1, blocks: blocks, blockSize: blockSize, capacity: width * blockSize,
                                  kvHeads: kvHeads, headDim: hd, type: .f16)
        func buffer(_ x: [Float]) throws -> B.Buffer {
            let buf = try b.buffer(x.count)
            x.withUnsafeBufferPointer { b.write($0, to: buf, offset: 0) }
            return buf
        }
        let rows = plan.count
        b.beginPass(fill)
        b.storeKV(layer: 0, k: try buffer(keys), v: try buffer(values), rows: fill.count, plan: fill, cache: cache)
        let out = try b.buffer(rows * heads * hd)
        b.beginPass(plan)
        b.attention(layer: 0, q: try buffer(q), rows: rows, plan: plan, cache: cache, heads: heads, window: window, scoring: scoring, out: out)
        try b.synchronize()
        var o = [Float](repeating: 0, count: rows * heads * hd)
        o.withUnsafeMutableBufferPointer { b.read(out, offset: 0, into: $0) }
        return o
    }

    /// Host side, no GPU needed: the caching allocator's size classes.
    func testPoolSizeClasses() {
        XCTAssertEqual(DeviceMemoryPool.sizeClass(1), 256)
        XCTAssertEqual(DeviceMemoryPool.sizeClass(257), 512)
        XCTAssertEqual(DeviceMemoryPool.sizeClass(600_000), 1 << 20)
        XCTAssertEqual(DeviceMemoryPool.sizeClass((1 << 20) + 1), 2 << 20)
        XCTAssertEqual(DeviceMemoryPool.sizeClass(5 << 20), 5 << 20)
    }

    /// The kernels are embedded in the library, whatever machine it was built on.
    func testKernelSourceIsEmbedded() {
        let source = String(decoding: PackageResources.Kernels_cu, as: UTF8.self)
        for kernel in ["matmul_rows", "attention_split", "attention_split_heads", "attention_prefill", "quantize_q8", "rms_norm",
                       "argmax_rows", "topk_rows", "sample_rows", "repetition_penalty", "repack_quantized"] {
            XCTAssertTrue(source.contains("__global__ void \(kernel)(") || source.contains(") \(kernel)("), kernel)
        }
    }

    /// Every fixture architecture: logits of a prompt in one batch against transformers'
    /// reference; F32 weights within 1e-3, BF16 weights (whose products over many tokens take
    /// BF16 activations in cuBLAS) within the 0.1 of the logit scale that the CPU test allows
    /// transformers computing natively in BF16 (it is 0.066 off there, this 0.04).
    func testFixtureModelsMatchReference() throws {
        let gpu = try backend()
        for name in ["llama", "llama2", "mistral", "qwen2", "qwen3", "llama-bf16"] + ModelParityTests.phi3Models {
            let ref = try Reference(model: name)
            let model = try ModelRegistry.load(directory: Fixtures.model(name), backend: gpu)
            let seq = ref.promptIds + ref.greedyIds
            let logits = try allLogits(model, seq)
            let scale = ref.logits.reduce(0) { max($0, abs($1)) }
            XCTAssertLessThan(maxAbsDiff(logits, ref.logits), name == "llama-bf16" ? 0.1 * scale : 1e-3, name)
        }
    }

    /// Phi-3 decoding a token at a time (RoPE, partial rotary and the KV write inside the
    /// attention kernel) against transformers' generation through its cache (LongRoPE switching
    /// to its long factors inside the continuation), and its greedy tokens.
    func testPhi3DecodeMatchesReference() throws {
        let gpu = try backend()
        for name in ModelParityTests.phi3Models {
            let ref = try Reference(model: name, logitsFile: "reference_logits_incremental.bin")
            let model = try ModelRegistry.load(directory: Fixtures.model(name), backend: gpu)
            let cache = try PagedKVCache(model: model, slots: 1, capacity: ref.rows)
            var logits = [Float](repeating: 0, count: ref.vocab)
            var plan = BatchPlan()
            plan.append(tokens: ref.promptIds, slot: 0, position: 0, logits: .last)
            try cache.prepare(&plan)
            try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
            try cache.advance(0, by: ref.promptIds.count)
            var worst = maxAbsDiff(logits, ref.row(ref.promptIds.count - 1))
            for (i, t) in ref.greedyIds.enumerated() {
                plan.removeAll()
                plan.append(tokens: [t], slot: 0, position: cache.length(of: 0), logits: .last)
                try cache.prepare(&plan)
                try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
                try cache.advance(0, by: 1)
                worst = max(worst, maxAbsDiff(logits, ref.row(ref.promptIds.count + i)))
            }
            XCTAssertLessThan(worst, 1e-3, "\(name): max |logit difference| \(worst) while decoding")
            let tokenizer = try Tokenizer(directory: Fixtures.model(name))
            var options = GenerationOptions()
            options.kvCacheType = .f32  // the reference ran in f32 throughout (the GPU defaults to F16)
            options.sampling = .greedy
            options.maxTokens = ref.greedyIds.count
            let prompt = try XCTUnwrap(ref.json["prompt"]?.string)
            let result = try Generator(model: model, tokenizer: tokenizer).generate(prompt: prompt, options: options)
            let eos = Set(tokenizer.eosTokenIds + model.config.eosTokenIds)
            let want = Array(ref.greedyIds.prefix { !eos.contains($0) })
            XCTAssertEqual(result.tokens, want, "\(name): greedy tokens")
        }
    }

    /// The shipped BF16 model: the same greedy tokens as the CPU backend, logits within BF16
    /// rounding of the activations cuBLAS sees.
    func testReferenceModelMatchesCPU() throws {
        let gpu = try backend()
        let dir = CLITests.repo.appendingPathComponent("models/target").path
        let cpu = try ModelRegistry.load(directory: dir, backend: cpuReference()), cuda = try ModelRegistry.load(directory: dir, backend: gpu)
        let tokenizer = try Tokenizer(directory: dir)
        let prompt = tokenizer.encode("And God said unto Moses")
        let a = try allLogits(cpu, prompt), b = try allLogits(cuda, prompt)
        let scale = a.reduce(0) { max($0, abs($1)) }
        XCTAssertLessThan(maxAbsDiff(a, b), 0.02 * scale)
        var options = GenerationOptions()
        options.kvCacheType = .f32  // the CPU's default, so both read the same cache values
        options.maxTokens = 32
        options.sampling.temperature = 0
        let x = try Generator(model: cpu, tokenizer: tokenizer).generate(prompt: "And God said", options: options) { _ in true }
        let y = try Generator(model: cuda, tokenizer: tokenizer).generate(prompt: "And God said", options: options) { _ in true }
        XCTAssertEqual(x.tokens, y.tokens)
    }

    /// A long prompt in one pass (the tiled flash-attention prefill kernel) and in chunks that
    /// attend to what earlier chunks cached, against the CPU backend; and over F16 caches on both
    /// (the tensor-core kernel on the GPU), in one pass and in chunks of 50.
    func testLongPromptPrefill() throws {
        let gpu = try backend()
        let dir = CLITests.repo.appendingPathComponent("models/target").path
        let cpu = try ModelRegistry.load(directory: dir, backend: cpuReference()), cuda = try ModelRegistry.load(directory: dir, backend: gpu)
        let tokenizer = try Tokenizer(directory: dir)
        let text = String(repeating: "In the beginning God created the heaven and the earth. And the earth was without form, and void. ", count: 6)
        let prompt = Array(tokenizer.encode(text).prefix(150))
        XCTAssertGreaterThan(prompt.count, 100)
        let a = try allLogits(cpu, prompt), b = try allLogits(cuda, prompt)
        let scale = a.reduce(0) { max($0, abs($1)) }
        XCTAssertLessThan(maxAbsDiff(a, b), 0.02 * scale)
        // In chunks of 50: the last row's logits.
        func lastInChunks(_ type: KVCacheType) throws -> [Float] {
            let cache = try PagedKVCache(model: cuda, slots: 1, capacity: prompt.count, type: type)
            var plan = BatchPlan()
            var last = [Float](repeating: 0, count: cuda.config.vocabSize)
            for start in stride(from: 0, to: prompt.count, by: 50) {
                let end = min(prompt.count, start + 50)
                plan.removeAll()
                plan.append(tokens: prompt[start..<end], slot: 0, position: start, logits: .last)
                try cache.prepare(&plan)
                try last.withUnsafeMutableBufferPointer { try cuda.forward(plan, kv: cache.memory, logits: $0) }
                try cache.advance(0, by: end - start)
            }
            return last
        }
        let v = cuda.config.vocabSize
        XCTAssertLessThan(maxAbsDiff(try lastInChunks(.f32), a[((prompt.count - 1) * v)...]), 0.02 * scale)
        let a16 = try allLogits(cpu, prompt, cacheType: .f16), b16 = try allLogits(cuda, prompt, cacheType: .f16)
        XCTAssertLessThan(maxAbsDiff(a16, b16), 0.02 * scale, "F16 cache")
        XCTAssertLessThan(maxAbsDiff(try lastInChunks(.f16), a16[((prompt.count - 1) * v)...]), 0.02 * scale, "F16 cache, in chunks")
    }

    /// The best id, the top-k and the repetition penalty computed on the GPU equal the host's on
    /// the same logits.
    func testSamplingOnTheDevice() throws {
        let gpu = try backend()
        let dir = CLITests.repo.appendingPathComponent("models/target").path
        let cuda = try ModelRegistry.load(directory: dir, backend: gpu)
        let tokenizer = try Tokenizer(directory: dir)
        let prompt = tokenizer.encode("And the LORD spake unto Moses, saying")
        let cache = try PagedKVCache(model: cuda, slots: 1, capacity: prompt.count)
        var plan = BatchPlan()
        plan.append(tokens: prompt, slot: 0, position: 0, logits: .all)
        try cache.prepare(&plan)
        let rows = try cuda.forward(plan, kv: cache.memory)
        let v = rows.vocabulary
        var host = [Float](repeating: 0, count: v)
        for r in 0..<rows.count {
            try host.withUnsafeMutableBufferPointer { try rows.read(row: r, into: $0) }
            XCTAssertEqual(try rows.argmax(row: r), host.withUnsafeBufferPointer { Sampler.argmax($0) })
            for k in [1, 40, 700] {
                var vals = [Float](repeating: 0, count: k), ids = [Int32](repeating: 0, count: k)
                try vals.withUnsafeMutableBufferPointer { vb in try ids.withUnsafeMutableBufferPointer { try rows.top(row: r, k: k, values: vb, ids: $0) } }
                var hv = vals, hi = ids
                host.withUnsafeBufferPointer { all in
                    hv.withUnsafeMutableBufferPointer { vb in hi.withUnsafeMutableBufferPointer { LogitCandidates.largest(k, of: all, values: vb, indices: $0) } }
                }
                XCTAssertEqual(vals.sorted(), hv.sorted(), "top-\(k)")
                for (i, id) in ids.enumerated() { XCTAssertEqual(vals[i], host[Int(id)]) }
            }
        }
        for r in 0..<rows.count {
            try host.withUnsafeMutableBufferPointer { try rows.read(row: r, into: $0) }
            let m = host.max()!
            let expected = host.withUnsafeBufferPointer { Sampler.expSum($0, shift: m, scale: 1 / 0.7) }
            XCTAssertEqual(try rows.expSum(row: r, shift: m, scale: 1 / 0.7), expected, accuracy: 1e-4 * expected)
        }
        let ids: [Int32] = [5, 17, 99, 1000]
        try ids.withUnsafeBufferPointer { try rows.penalize(row: 0, ids: $0, penalty: 1.5) }
        var after = [Float](repeating: 0, count: v)
        try after.withUnsafeMutableBufferPointer { try rows.read(row: 0, into: $0) }
        try host.withUnsafeMutableBufferPointer { try rows.read(row: 0, into: $0) }
        XCTAssertEqual(after, host)
    }

    /// Every row of a batch sampled on the device in one launch gives the token the host's
    /// Sampler draws from the same logits with the same stream (temperature, top-k, top-p and
    /// min-p varied per row, 40 seeds), and leaves each stream where the host's leaves it.
    func testBatchedSamplingOnTheDevice() throws {
        let gpu = try backend()
        let dir = CLITests.repo.appendingPathComponent("models/target").path
        let cuda = try ModelRegistry.load(directory: dir, backend: gpu)
        let tokenizer = try Tokenizer(directory: dir)
        let prompt = tokenizer.encode("And the LORD spake unto Moses, saying, Speak unto the children of Israel")
        let cache = try PagedKVCache(model: cuda, slots: 1, capacity: prompt.count)
        var plan = BatchPlan()
        plan.append(tokens: prompt, slot: 0, position: 0, logits: .all)
        try cache.prepare(&plan)
        let rows = try cuda.forward(plan, kv: cache.memory)
        XCTAssertTrue(rows.samplesRows)
        let v = rows.vocabulary
        var host = [[Float]](repeating: [Float](repeating: 0, count: v), count: rows.count)
        for r in 0..<rows.count { try host[r].withUnsafeMutableBufferPointer { try rows.read(row: r, into: $0) } }
        let temperatures: [Float] = [0.5, 0.8, 1.3, 2.0], topKs = [1, 40, 300, 1024], topPs: [Float] = [1, 0.95, 0.6], minPs: [Float] = [0, 0.05, 0.3]
        var compared = 0
        for seed in 0..<40 {
            var parameters: [SamplingParameters] = []
            for r in 0..<rows.count {
                var p = SamplingParameters()
                let i = seed * 7 + r
                p.temperature = temperatures[i % 4]
                p.topK = topKs[(i / 4) % 4]
                p.topP = topPs[(i / 3) % 3]
                p.minP = minPs[(i / 5) % 3]
                p.seed = UInt64(1000 * seed + r)
                parameters.append(p)
            }
            var device = parameters.map { Sampler($0) }
            var draws: [SamplingDraw] = []
            for r in 0..<rows.count {
                let d = try [Int32]().withUnsafeBufferPointer { try device[r].deviceDraw(rows, row: r, context: $0) }
                draws.append(try XCTUnwrap(d))
            }
            let chosen = try rows.sample(rows: Array(0..<rows.count), draws: draws)
            for r in 0..<rows.count {
                var sampler = Sampler(parameters[r])
                var copy = host[r]
                let expected = copy.withUnsafeMutableBufferPointer { b in [Int32]().withUnsafeBufferPointer { sampler.sample(b, context: $0) } }
                XCTAssertEqual(chosen[r].token, expected, "seed \(seed), row \(r), \(parameters[r])")
                XCTAssertTrue(chosen[r].drew)
                device[r].settle(drew: chosen[r].drew)
                XCTAssertEqual(device[r].uniform(), sampler.uniform(), "the streams after the draw")
                compared += 1
            }
        }
        XCTAssertEqual(compared, 40 * rows.count)
    }

    /// Q8_0, Q4_0, Q4_K, Q4_K_M (Q4_K and Q6_K) and Q6_K files (repacked on the GPU, 8-bit
    /// activations, dp4a) against the CPU's integer kernels on the same files: logits and
    /// greedy text.
    func testQuantizedModelsMatchCPU() throws {
        let gpu = try backend()
        let dir = CLITests.repo.appendingPathComponent("models/target").path
        let tokenizer = try Tokenizer(directory: dir)
        let prompt = tokenizer.encode("And God said, Let there be light: and there was light. And God saw the light, that it was good")
        for (type, pure) in [("Q8_0", true), ("Q4_0", true), ("Q4_K_M", true), ("Q4_K_M", false), ("Q6_K", true)] {
            let out = FileManager.default.temporaryDirectory.appendingPathComponent("peregrine-cuda-\(type)-\(pure).gguf").path
            defer { try? FileManager.default.removeItem(atPath: out) }
            _ = try ModelQuantizer(mix: QuantizationMix(name: type)!, pure: pure).quantize(source: dir, output: out)
            let cpu = try ModelRegistry.load(directory: out), cuda = try ModelRegistry.load(directory: out, backend: gpu)
            let a = try allLogits(cpu, prompt), b = try allLogits(cuda, prompt)
            let scale = a.reduce(0) { max($0, abs($1)) }
            XCTAssertLessThan(maxAbsDiff(a, b), 0.05 * scale, type)
            var options = GenerationOptions()
            options.kvCacheType = .f32  // the CPU's default, so both read the same cache values
            options.maxTokens = 24
            options.sampling.temperature = 0
            let x = try Generator(model: cpu, tokenizer: tokenizer).generate(prompt: "And God said", options: options) { _ in true }
            let y = try Generator(model: cuda, tokenizer: tokenizer).generate(prompt: "And God said", options: options) { _ in true }
            if !type.contains("_K") {
                XCTAssertEqual(x.tokens, y.tokens, type)
            } else {
                // The CPU rounds activations for k-quants per 256 values (llama.cpp's Q8_K), the GPU
                // per 32, so a near tie may go either way: every GPU choice must be within 1% of the
                // logit scale of the best under the CPU's logits for the same text.
                let start = tokenizer.encode("And God said", addSpecialTokens: options.addSpecialTokens)
                let v = cpu.config.vocabSize
                let logits = try allLogits(cpu, start + y.tokens)
                for (i, token) in y.tokens.enumerated() {
                    let row = logits[((start.count - 1 + i) * v)..<((start.count + i) * v)]
                    XCTAssertLessThan(row.max()! - row[row.startIndex + token], 0.01 * scale, "\(type) token \(i)")
                }
            }
        }
    }

    /// Mixture-of-experts models on the GPU (routing on the device, the chosen experts' grouped
    /// products): the F32 fixtures against transformers; with --deterministic, requests batched
    /// give each one's tokens alone, and a decode step reads only the chosen experts.
    func testMixtureOfExpertsMatchReference() throws {
        let gpu = try backend()
        for name in MixtureOfExpertsTests.models {
            let ref = try Reference(model: name)
            let model = try ModelRegistry.load(directory: Fixtures.model(name), backend: gpu)
            XCTAssertLessThan(maxAbsDiff(try allLogits(model, ref.promptIds + ref.greedyIds), ref.logits), 1e-3, name)
            // One token at a time through the cache (the one-token paths and recorded steps).
            let cpu = try ModelRegistry.load(directory: Fixtures.model(name), backend: cpuReference())
            var options = GenerationOptions()
            options.kvCacheType = .f32  // the CPU's default, so both read the same cache values
            options.maxTokens = ref.greedyIds.count
            options.sampling = .greedy
            let tokenizer = try Tokenizer(directory: Fixtures.model(name))
            let prompt = try XCTUnwrap(ref.json["prompt"]?.string)
            let x = try Generator(model: cpu, tokenizer: tokenizer).generate(prompt: prompt, options: options)
            let y = try Generator(model: model, tokenizer: tokenizer).generate(prompt: prompt, options: options)
            XCTAssertEqual(x.tokens, y.tokens, name)
        }
        let deterministic = try ModelRegistry.load(directory: Fixtures.model("qwen3_moe"), backend: try CUDABackend(deterministic: true))
        let ref = try Reference(model: "qwen3_moe")
        let requests = (0..<8).map { i -> EngineRequest in
            var r = EngineRequest(promptTokens: Array(ref.promptIds.prefix(5 + 6 * i)), maxTokens: 12)
            r.ignoreEOS = true
            return r
        }
        var config = EngineConfig()
        config.kvBlocks = 64
        let together = try Engine(model: deterministic, tokenizer: nil, config: config).generate(prompts: requests)
        for (i, r) in requests.enumerated() {
            let alone = try Engine(model: deterministic, tokenizer: nil, config: config).generate(prompts: [r])[0]
            XCTAssertEqual(together[i].tokens, alone.tokens, "request \(i)")
        }
        // The prompt's pass reads at most every weight once; the 11 decode steps the active
        // parameters each: counted by the grouped kernels (deterministic) and by the matvec
        // kernels' expert mode (a one-sequence decode step by default).
        let all = try SafeTensorsFile(path: Fixtures.model("qwen3_moe") + "/model.safetensors").entries.values.reduce(0) { $0 + $1.end - $1.begin }
        let bf16Path = try Fixtures.tempDirectory(self) + "/qwen3_moe-bf16.gguf"
        _ = try ModelQuantizer(mix: .bf16).quantize(source: Fixtures.model("qwen3_moe"), output: bf16Path)
        let bf16 = try ModelRegistry.load(directory: bf16Path, backend: gpu)
        for m in [deterministic, bf16] {
            // The engine is made first: a GPU engine's warm-up passes read the weights too.
            let engine = try Engine(model: m, tokenizer: nil, config: config)
            let before = try XCTUnwrap(m.weightBytesRead)
            _ = try engine.generate(prompts: [requests[0]])
            let read = try XCTUnwrap(m.weightBytesRead) - before
            XCTAssertLessThanOrEqual(read, all + 11 * m.weightBytes)
            XCTAssertGreaterThanOrEqual(read, 12 * m.weightBytes)
        }
    }

    /// Quantized and 16-bit experts on the GPU (Q4_K, Q6_K, Q8_0, Q4_0, IQ4_NL, BF16 and F16 on a
    /// random MoE with 256-wide rows; llama.cpp's Mixtral files are among the GGUF fixtures)
    /// against the CPU: decode steps of one and three sequences take the matvec kernels' expert
    /// mode for gate and up and moe_down for down and the weighted sum, the prompt's pass the
    /// grouped products.
    func testQuantizedExpertsMatchCPU() throws {
        let gpu = try backend()
        let dir = try Fixtures.tempDirectory(self)
        let source = dir + "/moe-f32.gguf"
        try writeRandomMoEGGUF(source)
        for mix in [QuantizationMix.q4_K_M, .q6_K, .q8_0, .q4_0, .iq4_nl, .bf16, .f16] {
            let out = dir + "/moe-\(mix.rawValue).gguf"
            _ = try ModelQuantizer(mix: mix, pure: true).quantize(source: source, output: out)
            try assertMatchesCPU(out, gpu)
            // --deterministic takes the warp-per-row expert products (moe_products) for every
            // step, which once gave IQ4_NL no 8-bit activations to read.
            if mix == .iq4_nl { try assertMatchesCPU(out, try CUDABackend(deterministic: true)) }
        }
    }

    /// The experts' down products of a decode step both ways, on experts of 2,048 values a row:
    /// `moe_down` (BF16: two rounds of loads a lane) and, with PEREGRINE_NO_FUSED_EXPERT_DOWN=1,
    /// the matvec kernels' expert mode (Q6_K rows of 2,048 values, two a warp) then moe_combine.
    /// BF16 both ways against the CPU; Q6_K the two ways against each other, since on this shape
    /// one router decision of the sixth decode step is near a tie once activations are rounded to
    /// 8 bits (both GPU paths measured 0.3354 of the logit scale off the CPU there, and as close
    /// as each other elsewhere).
    func testExpertDownPathsMatchCPU() throws {
        let gpu = try backend()
        setenv("PEREGRINE_NO_FUSED_EXPERT_DOWN", "1", 1)
        let unfused: CUDABackend
        do {
            defer { unsetenv("PEREGRINE_NO_FUSED_EXPERT_DOWN") }
            unfused = try CUDABackend()
        }
        let dir = try Fixtures.tempDirectory(self)
        let source = dir + "/moe-wide-f32.gguf"
        try writeRandomMoEGGUF(source, ff: 2048, experts: 4)
        let bf16 = dir + "/moe-wide-BF16.gguf", q6 = dir + "/moe-wide-Q6_K.gguf"
        _ = try ModelQuantizer(mix: .bf16, pure: true).quantize(source: source, output: bf16)
        _ = try ModelQuantizer(mix: .q6_K, pure: true).quantize(source: source, output: q6)
        try assertMatchesCPU(bf16, gpu)
        try assertMatchesCPU(bf16, unfused)
        try assertMatchesCPU(q6, gpu, reference: unfused, tolerance: 1e-3)
    }

    /// Every GGUF model fixture (llama.cpp's files of each family and type, small shapes whose
    /// rows hold one or two blocks) on the GPU against the CPU. These random models amplify any
    /// difference in rounding through their layers, and a mixture of experts then routes to
    /// other experts: products over many tokens, which round the activations to BF16 for cuBLAS
    /// where the CPU rounds them to 8 bits, move their logits by 7% (dense) to 75% (Mixtral) of
    /// the logit scale. So the GPU runs in its deterministic mode here, whose row kernels take
    /// 8-bit activations as the CPU does; the reference model's test covers the cuBLAS path.
    func testGGUFFixturesMatchCPU() throws {
        let gpu = try backend(deterministic: true)
        let dir = Fixtures.root + "/gguf"
        let files = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".gguf") }.sorted()
        var models = 0
        for f in files {
            let g = try GGUFFile(path: dir + "/" + f)
            guard g.info("token_embd.weight") != nil else { continue }  // a vocabulary alone
            // K-quant (and IQ4_XS) products over many tokens take cuBLAS in either mode, and the
            // CPU rounds their activations per 256 values (measured: up to 5.1% of the scale).
            let kQuant = g.tensors.contains { [DType.q2_K, .q3_K, .q4_K, .q5_K, .q6_K, .iq4_xs].contains($0.type.dtype) }
            try assertMatchesCPU(dir + "/" + f, gpu, tolerance: kQuant ? 0.08 : 0.05)
            models += 1
        }
        XCTAssertGreaterThan(models, 15)
    }

    /// A model file's logits on the GPU against the CPU's: a 40-token prompt in one pass, then
    /// decode steps (one sequence, then three at once) through the paged cache.
    /// (`reference`: the same against another CUDA backend instead of the CPU.)
    func assertMatchesCPU(_ path: String, _ gpu: CUDABackend, reference: CUDABackend? = nil, tolerance: Float = 0.05,
                          file: StaticString = #filePath, line: UInt = #line) throws {
        let cpu = try reference.map { try ModelRegistry.load(directory: path, backend: $0) } ?? ModelRegistry.load(directory: path, backend: cpuReference())
        let cuda = try ModelRegistry.load(directory: path, backend: gpu)
        let tokens = (0..<40).map { ($0 * 37 + 11) % min(300, cpu.config.vocabSize) }
        let a = try allLogits(cpu, tokens), b = try allLogits(cuda, tokens)
        let scale = a.reduce(0) { max($0, abs($1)) }
        if cpu.config.experts == nil {
            XCTAssertLessThan(maxAbsDiff(a, b), tolerance * scale, "\(path) prompt", file: file, line: line)
        } else {
            // A router's near tie may go the other way under another summation order (measured:
            // one of llama.cpp's Mixtral files, 6.2 at a 0.42 tolerance), and the positions after
            // it attend to that token: nine positions in ten must agree.
            let v = cpu.config.vocabSize
            let off = (0..<tokens.count).filter { t in
                maxAbsDiff(a[(t * v)..<((t + 1) * v)], b[(t * v)..<((t + 1) * v)]) >= tolerance * scale
            }
            XCTAssertLessThanOrEqual(off.count, tokens.count / 10, "\(path) prompt: positions \(off) differ", file: file, line: line)
            if !off.isEmpty { print("\(path): prompt positions \(off) differ by more than \(tolerance) of the logit scale") }
        }
        for width in [1, 3] {
            let cc = try PagedKVCache(model: cpu, slots: width, capacity: 64), gc = try PagedKVCache(model: cuda, slots: width, capacity: 64)
            for step in 0..<6 {
                var plan = BatchPlan()
                for s in 0..<width { plan.append(tokens: [tokens[(step * 7 + s * 5) % tokens.count]], slot: s, position: step, logits: .last) }
                var pc = plan, pg = plan
                try cc.prepare(&pc)
                try gc.prepare(&pg)
                let v = cpu.config.vocabSize
                var x = [Float](repeating: 0, count: width * v), y = x
                try x.withUnsafeMutableBufferPointer { try cpu.forward(pc, kv: cc.memory, logits: $0) }
                try y.withUnsafeMutableBufferPointer { try cuda.forward(pg, kv: gc.memory, logits: $0) }
                for s in 0..<width { try cc.advance(s, by: 1); try gc.advance(s, by: 1) }
                XCTAssertLessThan(maxAbsDiff(x, y), tolerance * scale, "\(path) width \(width) step \(step)", file: file, line: line)
            }
        }
    }
}

/// Gemma 2 and 3 on the GPU: the soft-capped, scaled attention kernels (prefill tiles, the split
/// decode kernels, the fused one-token kernel), GELU-tanh and the output soft-cap against
/// transformers' logits and the CPU's incremental decode. Skips without a GPU.
final class GemmaCUDATests: XCTestCase {
    func testGemmaFixturesMatchReferenceOnTheGPU() throws {
        switch CUDADriver.shared {
        case .failure(let e): throw XCTSkip("no CUDA: \(e)")
        case .success: break
        }
        let gpu = try CUDABackend()
        for name in ["gemma2", "gemma3"] {
            let ref = try Reference(model: name)
            let model = try ModelRegistry.load(directory: Fixtures.model(name), backend: gpu)
            let seq = ref.promptIds + ref.greedyIds
            XCTAssertLessThan(maxAbsDiff(try allLogits(model, seq), ref.logits), 1e-3, name)
            // Decode one token at a time after the prompt, as the CPU does.
            let cpu = try ModelRegistry.load(directory: Fixtures.model(name), backend: cpuReference())
            let a = try PagedKVCache(model: model, slots: 1, capacity: seq.count), b = try PagedKVCache(model: cpu, slots: 1, capacity: seq.count)
            var x = [Float](repeating: 0, count: ref.vocab), y = x
            for (i, t) in seq.enumerated() {
                for (m, c) in [(model, a), (cpu, b)] {
                    var plan = BatchPlan()
                    plan.append(tokens: [t], slot: 0, position: i, logits: .last)
                    try c.prepare(&plan)
                    if m === model {
                        try x.withUnsafeMutableBufferPointer { try m.forward(plan, kv: c.memory, logits: $0) }
                    } else {
                        try y.withUnsafeMutableBufferPointer { try m.forward(plan, kv: c.memory, logits: $0) }
                    }
                    try c.advance(0, by: 1)
                }
                XCTAssertLessThan(maxAbsDiff(x, y), 1e-3, "\(name) position \(i)")
            }
        }
    }
}

extension CUDABackend {
    /// The first `count` values of `b`, once the queued work is done.
    func values(_ b: CUDABuffer, _ count: Int) throws -> [Float] {
        try synchronize()
        var y = [Float](repeating: 0, count: count)
        y.withUnsafeMutableBufferPointer { read(b, offset: 0, into: $0) }
        return y
    }
}
