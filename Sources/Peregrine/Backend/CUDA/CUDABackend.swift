import Foundation

/// Device memory for activations, caches and scratch, kept for reuse when freed: a forward
/// pass that grows a workspace, or a new KV cache per request, then costs no cuMemAlloc (which
/// synchronizes the device). Sizes are rounded up to a power of two below 1 MiB and to whole
/// MiB above. All work runs on one stream, so memory freed there is safe to hand out again.
final class DeviceMemoryPool: @unchecked Sendable {
    private let driver: CUDADriver
    private var free: [Int: [CUDADriver.DevicePointer]] = [:]
    private let lock = NSLock()

    init(driver: CUDADriver) { self.driver = driver }

    deinit { trim() }

    static func sizeClass(_ bytes: Int) -> Int {
        if bytes >= 1 << 20 { return ((bytes + (1 << 20) - 1) >> 20) << 20 }
        var n = 256
        while n < bytes { n <<= 1 }
        return n
    }

    func allocate(_ bytes: Int) throws -> (CUDADriver.DevicePointer, Int) {
        let size = DeviceMemoryPool.sizeClass(bytes)
        lock.lock()
        if let p = free[size]?.popLast() {
            lock.unlock()
            return (p, size)
        }
        lock.unlock()
        var p: CUDADriver.DevicePointer = 0
        if driver.cuMemAlloc(&p, size) != 0 {
            // Out of memory: give the cached blocks back and try once more.
            trim()
            try driver.check(driver.cuMemAlloc(&p, size), "cuMemAlloc(\(size) bytes)")
        }
        return (p, size)
    }

    func release(_ p: CUDADriver.DevicePointer, size: Int) {
        lock.lock()
        free[size, default: []].append(p)
        lock.unlock()
    }

    func trim() {
        lock.lock()
        let all = free.values.flatMap { $0 }
        free.removeAll()
        lock.unlock()
        for p in all { _ = driver.cuMemFree(p) }
    }
}

/// f32 activations in device memory (or a weight's bytes), from the pool or, for weights, allocated exactly.
public final class CUDABuffer: @unchecked Sendable {
    public let pointer: CUDADriver.DevicePointer
    public let count: Int
    private let driver: CUDADriver
    private let pool: DeviceMemoryPool?
    private let size: Int

    init(driver: CUDADriver, count: Int, pool: DeviceMemoryPool? = nil) throws {
        let bytes = max(count, 1) * 4
        if let pool {
            (pointer, size) = try pool.allocate(bytes)
        } else {
            var p: CUDADriver.DevicePointer = 0
            try driver.check(driver.cuMemAlloc(&p, bytes), "cuMemAlloc(\(bytes) bytes)")
            (pointer, size) = (p, bytes)
        }
        self.count = count
        self.driver = driver
        self.pool = pool
    }

    deinit {
        if let pool { pool.release(pointer, size: size) } else { _ = driver.cuMemFree(pointer) }
    }
}

/// A weight in device memory, in its stored type (vectors widened to f32).
public struct CUDAWeight: @unchecked Sendable {
    public let dtype: DType
    public let rows: Int
    public let cols: Int
    let storage: CUDABuffer
    /// Where it starts in `storage` (weights placed together by `weights`).
    var byteOffset: UInt64 = 0
    var pointer: CUDADriver.DevicePointer { storage.pointer + byteOffset }
}

/// A layer's routed experts in device memory: each expert's projections as loaded weights,
/// tables of their device addresses (for the grouped kernels), and per-expert read counts.
public final class CUDAExperts: @unchecked Sendable {
    static let maxExperts = 4096
    static let maxUsed = 64
    let gate, up, down: [CUDAWeight]
    let gateTable, upTable, downTable: CUDABuffer
    /// Passes that read each expert (Int32 counters, kept on the device).
    let reads: CUDABuffer
    let hidden: Int
    let intermediate: Int
    var count: Int { gate.count }

    init(gate: [CUDAWeight], up: [CUDAWeight], down: [CUDAWeight], gateTable: CUDABuffer, upTable: CUDABuffer, downTable: CUDABuffer,
         reads: CUDABuffer, hidden: Int, intermediate: Int) {
        self.gate = gate
        self.up = up
        self.down = down
        self.gateTable = gateTable
        self.upTable = upTable
        self.downTable = downTable
        self.reads = reads
        self.hidden = hidden
        self.intermediate = intermediate
    }
}

/// Runs the model on an NVIDIA GPU: kernels from Kernels.cu compiled by NVRTC for the device,
/// cuBLAS for products over many tokens, one stream. Errors from launches are kept and thrown
/// by `synchronize` (or `submit`), which every forward pass ends with.
public final class CUDABackend: ComputeBackend {
    public typealias Buffer = CUDABuffer
    public typealias Weight = CUDAWeight
    public typealias Experts = CUDAExperts

    let driver: CUDADriver
    let pool: DeviceMemoryPool
    let stream: OpaquePointer?
    let cublas: OpaquePointer?
    private var functions: [String: OpaquePointer?] = [:]
    private var firstError: PeregrineError?
    private let args = UnsafeMutableRawPointer.allocate(byteCount: 32 * 8, alignment: 8)
    private let params = UnsafeMutablePointer<UnsafeMutableRawPointer?>.allocate(capacity: 32)

    // Device copies of the batch's token ids, slots, positions and gathered rows (grown, reused).
    private var tokenInts: CUDABuffer
    private var planInts: CUDABuffer
    private var rowInts: CUDABuffer
    private var tileInts: CUDABuffer
    /// Tiles (first row, count) of a step whose every row is one query of its own, row t in tile t,
    /// for up to the largest recorded batch: a --deterministic decode step's attention reads them
    /// from here, not from a copy staged in every layer (a replayed step stages its inputs only).
    private let singleRowTiles: CUDABuffer
    /// Rows of a mixed batch sent to the split attention kernel.
    private var mapInts: CUDABuffer
    private var singleRows: [Int32] = []
    private var sampleInts: CUDABuffer
    /// Chained decode steps (`queueGreedy`): each row's greedy choice as argmax_rows leaves it (a
    /// 64-bit word), where the next step's embedding reads it.
    private var greedyWords: CUDABuffer
    /// Rows the last `queueGreedy` chose, and how many calls there were (tickets).
    private(set) public var chainedTokenRows = 0
    private var greedyTickets = 0
    /// Pinned memory the choices come back to: two slots (a ticket's parity), each behind an
    /// event, so the host reads one step's while the next step's are still to come.
    private var chosenHost: UnsafeMutableRawPointer?
    private static let chosenCapacity = 4096
    private var chosenEvents: [OpaquePointer?] = [nil, nil]
    /// One counter per (token, head) for the split attention's last-block merge; each merge resets its own.
    private let attentionCounters: CUDABuffer
    private static let attentionCounterCount = 64 * 256
    private var hostInts: [Int32] = []
    private var planRows = -1
    /// The pass is one sequence shorter than `groupedAttentionFrom` positions, set first in
    /// `beginPass`: a one-sequence graph step's key is this, so a graph holds the kernels chosen by it.
    var shortSequencePass = false
    private var scratch: CUDABuffer
    private var halfScratch: CUDABuffer
    /// What `halfScratch` holds: the 16-bit rounding (`type`, the kernels' code: 1 F16, 2 BF16) of
    /// `count` values at `source`, written beside them by the kernel that computed them, or by
    /// `to_half`. The products that share an input (q/k/v, gate/up) then round it once, and a
    /// norm's or a gated activation's output is never rounded in a pass of its own. Every other
    /// launch or copy forgets it (`launch`, `copy`, `write`, a product writing over it), so a
    /// product never reads a stale rounding; the launches known to leave both untouched (a
    /// weight's widening, a bias added to another buffer) keep it.
    private var halfHolds: (source: CUDADriver.DevicePointer, count: Int, type: Int32)?
    private var dequantScratch: CUDABuffer
    /// A product over stacked weights: q, k and v (`matmul3`) before `partStackedRows` or RoPE
    /// parts its rows, or gate and up (`gatedProduct`) in BF16 for the gating.
    private var stackedOut: CUDABuffer
    private var activationScratch: CUDABuffer
    /// The 8-bit copy (int8 values, then a scale per 32) of a MoE layer's normalized input that
    /// moe_router wrote into `routedQ8` beside `source`, for the quantized experts' products
    /// that follow it; forgotten as `halfHolds` is.
    private var q8Holds: (source: CUDADriver.DevicePointer, rows: Int, k: Int)?
    /// Forgets what `halfScratch` and `routedQ8` hold (any launch or copy may overwrite a source).
    private func forgetCopies() {
        halfHolds = nil
        q8Holds = nil
    }
    private var routedQ8: CUDABuffer
    /// One counter per row for moe_router's last-block routing; the routing block resets its own.
    private let routerCounters: CUDABuffer
    /// A MoE layer's pass: its routes grouped by expert (counts, starts, chosen experts, places,
    /// gathered rows), the gathered rows, the gated products and the experts' outputs.
    private var moeInts: CUDABuffer
    private var moeRows: CUDABuffer
    private var moeHidden: CUDABuffer
    /// The up projections' outputs where the experts' products run through cuBLAS.
    private var moeUp: CUDABuffer
    /// The gated products' outputs in 16 bits where expert_gemm runs them (the down products' input).
    private var moeHalf: CUDABuffer
    private var moeOut: CUDABuffer

    public var name: String { "cuda (\(driver.deviceName))" }
    /// F16, as llama.cpp's default: half the memory and the bytes decode attention reads, and the
    /// form the tensor-core attention kernels take (prompts, grouped decode).
    public var preferredKVCacheType: KVCacheType { .f16 }
    /// Dynamic shared memory a kernel of ours may ask for: the device's limit less room for static arrays.
    private var dynamicSharedLimit: Int { CUDABackend.dynamicSharedLimit(driver) }
    /// The device's limit less 12 KB for the static arrays our kernels hold beside their dynamic
    /// memory (attention_split's merge weights, SPLIT_GROUP x SPLIT_MAX floats, and its other
    /// arrays take 8.3 KB).
    private static func dynamicSharedLimit(_ driver: CUDADriver) -> Int { driver.maxSharedPerBlock - 12288 }

    // Decode steps as CUDA graphs: a step key seen once runs eagerly (allocating what it needs),
    // the second time it is captured, then replayed. Host inputs of a step go through pinned
    // staging memory at the same offsets every time, read by the graph's copy nodes. Any
    // allocation that could move a pointer a graph holds drops the graphs. A step's key is the
    // model's (`beginStep`) and, for a batch, the power of two its longest sequence rounds up to,
    // which fixes the attention's split count (`splitBasis`); the key is settled in `beginPass`.
    // Batches of decode tokens are padded by the model to the next of `captureSizes`
    // (`decodeGraphRows`), vLLM's way: a graph per size, not per batch.
    private enum StepMode { case eager, capturing(Int), replaying(OpaquePointer?, Int) }
    private var mode = StepMode.eager
    private var graphs: [Int: OpaquePointer?] = [:]
    /// Bytes each recorded step staged: a replay stages as much, in the same order, or its
    /// inputs would land where the recording does not read them.
    private var stagedBytes: [Int: Int] = [:]
    /// Recorded steps whose layers staged nothing (attention's tiles or row maps are staged in
    /// every layer of a mixed step): only those are replayed without walking the layers
    /// (`replayingStep`); the rest are walked, restaging what they staged.
    private var inputsOnly: Set<Int> = []
    /// Some layer of the step being recorded staged values.
    private var layersStaged = false
    private var seen: [Int: Int] = [:]
    private var pendingKey: Int?
    /// Steps replayed from a graph so far, and steps captured as one (for tests).
    private(set) var graphReplays = 0
    private(set) var graphCaptures = 0
    private let graphsEnabled = ProcessInfo.processInfo.environment["PEREGRINE_NO_CUDA_GRAPHS"] == nil
        && ProcessInfo.processInfo.environment["PEREGRINE_KERNEL_PROFILE"] == nil
    static let captureSizes = recordedDecodeBatchSizes
    private var pinned: UnsafeMutableRawPointer?
    /// Enough for a 256-row step's tokens, positions, rotations and block tables of 2,048 entries a row.
    private let pinnedBytes = 8 << 20
    private var pinnedCursor = 0
    /// Where steps chain, graph steps take the two halves of the staging memory in turn (the
    /// half is part of a step's key, since its copies read that half), and each half's last step
    /// records an event: a step stages its inputs while the step before it may still run, and
    /// waits only for the one before that (`submit` does not wait; the engine reads a step's
    /// tokens after it has queued the next step).
    private var pinnedHalf = 0
    private var nextHalf = 0
    /// Decode steps may be chained (asked for, and the events for it made): passes are submitted
    /// without waiting and graph steps take the staging halves in turn; otherwise every pass
    /// waits for the device and stages into the first half.
    private let chaining: Bool
    private var chainsDecodeSteps: Bool { chaining && chosenHost != nil }
    private var halfEvents: [OpaquePointer?] = [nil, nil]
    private var halfRecorded = [false, false]

    // Programmatic dependent launches (Hopper and later): each kernel may start while the one
    // before it drains, and streams its weights before waiting for its inputs (gdc_wait in
    // Kernels.cu). PEREGRINE_NO_PDL=1 turns them off, PEREGRINE_NO_EARLY_TRIGGER=1 lets a kernel
    // start only as the previous one's blocks exit; PEREGRINE_NO_FUSED_NORM=1 runs the RMSNorm
    // before a single-token product of quantized weights as its own kernel (see `fusesNorm`).
    private let pdl: Bool
    /// Set from `beginStep` to the end of the pass: only decode steps launch programmatically
    /// dependent (a prefill's large grids waiting early on the SMs would slow the kernel before them).
    private var pdlStep = false
    private let fusedNorm = ProcessInfo.processInfo.environment["PEREGRINE_NO_FUSED_NORM"] == nil
    /// PEREGRINE_FUSED_HALF_NORM=1: 16-bit products normalize their input in every block too.
    private let fusedHalfNorm = ProcessInfo.processInfo.environment["PEREGRINE_FUSED_HALF_NORM"] != nil

    /// Whether a single-token product of `w` takes the RMSNorm of its input in the same launch.
    /// Quantized weights: yes, in the launch that rounds the input to 8 bits (quantize_q8), which
    /// runs once. 16-bit weights: no, although matvec_half_body can: each of its blocks then
    /// normalizes the row into shared memory before its first product, a wait every wave of
    /// blocks pays (the gate/up product has 3.4 waves on an H200). The 8B shape's BF16 decode,
    /// tg128 on an H200, same binary and run, two rounds: 202.5 / 203.9 tok/s fused, 218.1 /
    /// 215.5 with an rms_norm launch before the product.
    private func fusesNorm(_ w: CUDAWeight) -> Bool { fusedNorm && (!w.dtype.isFloat || fusedHalfNorm) }
    /// Batch-invariant arithmetic: every product over any number of tokens runs the same per-row
    /// kernel and every attention the same per-query kernel, so a sequence's logits do not depend
    /// on what else is in its batch (for every weight type but F32, whose products over more than
    /// 64 tokens still go to cuBLAS). Slower: no tensor cores, no fused decode step.
    public let deterministic: Bool
    /// Most tokens a product runs as a per-row kernel before cuBLAS takes it: for 16-bit weights
    /// cuBLAS from two tokens on (measured 4x faster at 8 decode tokens on an H200); for the
    /// quantized types, whose cuBLAS path widens the whole matrix first, up to eight
    /// (PEREGRINE_ROW_KERNEL_TOKENS overrides both).
    private let rowKernelOverride = Int(ProcessInfo.processInfo.environment["PEREGRINE_ROW_KERNEL_TOKENS"] ?? "")
    private func rowKernelTokens(_ t: DType) -> Int { rowKernelOverride ?? (t == .f16 || t == .bf16 ? 1 : 8) }
    /// Fewest blocks (rows x KV heads) a decode attention runs as attention_split, one block per
    /// KV head and its query heads; below, attention_split_heads, one per query head (more blocks
    /// for a small batch: measured faster up to four sequences of the Llama-3-8B shape, 32/8
    /// heads, on an H200, and no slower at eight). Tests set it to run either kernel;
    /// PEREGRINE_GROUPED_ATTENTION_BLOCKS sets it for measuring.
    var groupedAttentionBlocks = Int(ProcessInfo.processInfo.environment["PEREGRINE_GROUPED_ATTENTION_BLOCKS"] ?? "") ?? 64
    /// Positions from which one sequence's decode attention runs grouped all the same
    /// (attention_split, or attention_decode_mma over an F16 cache): its blocks (8 KV heads x
    /// splits for the 8B shape) are fewer, but each reads a KV head once for its group with
    /// 16-byte asynchronous copies, which pays once the keys outweigh the block's fixed work
    /// (H200, attention_split: 134 against 100 tok/s at depth 16,384, 175 against 192 at depth
    /// 0; attention_decode_mma: 162 at depth 16,384, 186 at 1,024). PEREGRINE_GROUPED_ATTENTION_FROM
    /// sets it for measuring.
    var groupedAttentionFrom = Int(ProcessInfo.processInfo.environment["PEREGRINE_GROUPED_ATTENTION_FROM"] ?? "") ?? 1024
    /// Whether grouped decode attention over an F16 cache runs on tensor cores
    /// (attention_decode_mma_D) rather than attention_split (see `tensorCoreDecode`);
    /// PEREGRINE_NO_TENSOR_CORE_DECODE=1 keeps attention_split, for measuring. Tests set it to
    /// run either kernel. (Like `tensorCoreDecodeWarps` and `decodeSplits`, it is not part of a
    /// recorded step's key: set it before the steps it is for, or with graphs off.)
    var tensorCoreDecodeAllowed = ProcessInfo.processInfo.environment["PEREGRINE_NO_TENSOR_CORE_DECODE"] == nil
    /// Head dimensions attention_decode_mma_D is compiled for.
    static let tensorCoreDecodeDims = [16, 32, 64, 96, 128]
    /// Warps a block of attention_decode_mma: 2 (tiles of 32 keys) or 4 (tiles of 64, the `_w4`
    /// kernels). nil: 2 in a batch (H200, 256 sequences of PP 128 / TG 128: 25,505 and 26,054
    /// total tok/s in two rounds against 24,543 and 25,160 with 4), 4 for one sequence, whose
    /// blocks are few and long (a split of 128 positions is two 64-key tiles, both in flight at
    /// once, where two warps wait for four 32-key tiles one after another). PEREGRINE_DECODE_WARPS
    /// (2 or 4) sets it for measuring; tests run four warps with three buffers and with two, and two warps.
    var tensorCoreDecodeWarps: Int? = CUDABackend.measuringChoice("PEREGRINE_DECODE_WARPS", CUDABackend.decodeWarpChoices)
    static let decodeWarpChoices = [2, 4]
    /// Buffers of key/value tiles a block of attention_decode_mma with four warps keeps: 2, or 3
    /// (the `_w4s3` kernels: two tiles in flight while the warps work on a third). nil: 3 for one
    /// sequence, 2 otherwise; PEREGRINE_DECODE_STAGES (2 or 3) sets it for measuring. Two warps
    /// always take 2.
    var tensorCoreDecodeStages: Int? = CUDABackend.measuringChoice("PEREGRINE_DECODE_STAGES", CUDABackend.decodeStageChoices)
    static let decodeStageChoices = [2, 3]
    /// PEREGRINE_EARLY_DECODE_KEYS=0: one token's tensor-core decode attention after
    /// rope_store_kv (PEREGRINE_FUSED_DEPTH_ROPE=0) copies no keys before the kernel before it
    /// ends (attention_decode_mma's `fused` 2), for measuring; with RoPE fused (the default) the
    /// older keys' tiles are always copied early.
    var earlyDecodeKeys = ProcessInfo.processInfo.environment["PEREGRINE_EARLY_DECODE_KEYS"] != "0"
    /// One token's RoPE and KV-cache write inside its tensor-core decode attention
    /// (attention_decode_mma's `fused` 1) rather than in rope_store_kv before it;
    /// PEREGRINE_FUSED_DEPTH_ROPE=0 keeps the two launches, for measuring.
    var fusedDepthRope = ProcessInfo.processInfo.environment["PEREGRINE_FUSED_DEPTH_ROPE"] != "0"
    /// Positions a decode split takes in a long cache (fewer splits than fill the GPU are never
    /// used, more than 128 never; one sequence on the tensor cores has its own rule, in
    /// `attention`): on an H200 at depth 16,384, 256 (66 splits of one sequence's
    /// grouped kernel) measured 142 tok/s against 133 for 128 or 64. PEREGRINE_SPLIT_POSITIONS
    /// sets it for measuring; the tests set it to reach the merge's largest split counts.
    var splitPositions = max(32, Int(ProcessInfo.processInfo.environment["PEREGRINE_SPLIT_POSITIONS"] ?? "") ?? 256)
    /// Tests set it to give a decode attention exactly this many splits (at most 128), the one
    /// split that a large batch takes on a large GPU included; PEREGRINE_DECODE_SPLITS sets it
    /// for measuring.
    var decodeSplits: Int? = Int(ProcessInfo.processInfo.environment["PEREGRINE_DECODE_SPLITS"] ?? "")
    /// Prompt attention on tensor cores where `tensorCoreAttention` allows it (tests turn it off
    /// to compare the two kernels on one cache).
    var tensorCoreAttentionAllowed = ProcessInfo.processInfo.environment["PEREGRINE_NO_TENSOR_CORE_ATTENTION"] == nil
    /// Several query heads a block in prompt attention on tensor cores (`promptHeadGroup`); tests
    /// turn it off to compare.
    var groupedPromptAttention = ProcessInfo.processInfo.environment["PEREGRINE_NO_GROUPED_PROMPT_ATTENTION"] == nil
    /// Prompt attention of 128-wide heads on Hopper's warpgroup MMA (one of
    /// `warpgroupAttentionKernels`) instead of mma.sync where `warpgroupAttention` allows it: by
    /// default `kt128_wg2` (blocks of 128 query rows over 128-key tiles), the fastest of them on
    /// an H200 (BENCHMARKS.md). PEREGRINE_WGMMA_PROMPT_ATTENTION picks another for measuring (the
    /// part of its name after attention_prefill_wgmma_128_, or 1 for the first), 0 keeps mma.sync;
    /// tests go through all of them.
    var warpgroupPromptAttention: WarpgroupAttentionKernel? = {
        let choice = ProcessInfo.processInfo.environment["PEREGRINE_WGMMA_PROMPT_ATTENTION"] ?? "kt128_wg2"
        if choice == "0" { return nil }
        return CUDABackend.warpgroupAttentionKernels.first { choice == "1" ? true : $0.name == "attention_prefill_wgmma_128_" + choice }
    }()
    /// The chosen experts' products of many rows by expert_gemm (tensor cores, one launch a
    /// projection); PEREGRINE_NO_EXPERT_GEMM=1 keeps the cuBLAS products an expert for measuring.
    var expertGEMMAllowed = ProcessInfo.processInfo.environment["PEREGRINE_NO_EXPERT_GEMM"] == nil
    /// Row lengths whose one-token 16-bit products have kernels of their own (`matvec_half_fixed`
    /// in Kernels.cu: the length fixed at compile time).
    /// Hidden and intermediate sizes of common families: Llama 3 (2,048 / 8,192, 3,072 / 8,192,
    /// 4,096 / 14,336, 8,192 / 28,672), Llama 2 (4,096 / 11,008), Qwen 2.5 (3,584 / 18,944, 5,120
    /// / 13,824), Qwen 3 (2,560 / 9,728, 4,096 / 12,288), Gemma 2 (3,584 / 14,336), Mistral.
    static let fixedMatvecLengths = [2048, 2560, 3072, 3584, 4096, 5120, 8192, 9728, 11008, 12288, 13824, 14336, 18944, 28672]
    /// Whether those products take them; PEREGRINE_FIXED_MATVEC=0 keeps the general kernel, for
    /// measuring.
    var fixedMatvecs = ProcessInfo.processInfo.environment["PEREGRINE_FIXED_MATVEC"] != "0"
    /// Whether one-token products of `dtype` rows of k values take a fixed-length kernel
    /// (`matvec_<type>[_gated]_k<k>`, and the `_carry` ones).
    private func hasFixedMatvec(_ dtype: DType, k: Int) -> Bool {
        fixedMatvecs && (dtype == .f16 || dtype == .bf16) && CUDABackend.fixedMatvecLengths.contains(k)
    }
    /// One token as `matvec` kernels (fused norms, RoPE inside attention): not in deterministic mode.
    private var oneToken: Int { deterministic ? -1 : 1 }
    private let launchConfig = UnsafeMutableRawPointer.allocate(byteCount: 64, alignment: 8)
    private let launchAttribute = UnsafeMutableRawPointer.allocate(byteCount: 72, alignment: 8)
    /// A kernel's tensor-map argument (CUtensorMap: 128 bytes, 64-byte aligned), which a launch
    /// copies, so one serves every launch.
    private let tensorMapArgument = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 64)

    /// `chainsSteps`: whether decode steps may be chained (`queueGreedy`); nil: unless
    /// PEREGRINE_CHAINED_STEPS=0 (on by default: 0.6% faster BF16 tg128 and 1.7-1.8% faster
    /// batched decode on an H100, BENCHMARKS.md).
    public init(deterministic: Bool = false, chainsSteps: Bool? = nil) throws {
        try CUDABackend.checkMeasuringSwitches(ProcessInfo.processInfo.environment)
        self.deterministic = deterministic
        chaining = chainsSteps ?? (ProcessInfo.processInfo.environment["PEREGRINE_CHAINED_STEPS"] != "0")
        let driver = try CUDADriver.shared.get()
        try driver.makeCurrent()
        self.driver = driver
        pool = DeviceMemoryPool(driver: driver)
        var s: OpaquePointer?
        try driver.check(driver.cuStreamCreate(&s, 1), "cuStreamCreate")
        stream = s
        var handle: OpaquePointer?
        guard driver.cublasCreate(&handle) == 0 else { throw PeregrineError.backend("cublasCreate failed") }
        _ = driver.cublasSetStream(handle, s)
        cublas = handle
        let source = String(decoding: PackageResources.Kernels_cu, as: UTF8.self)
        let early = ProcessInfo.processInfo.environment["PEREGRINE_NO_EARLY_TRIGGER"] == nil
        let module = try driver.compile(source, name: "peregrine-kernels", defines: early ? [] : ["PEREGRINE_NO_EARLY_TRIGGER"])
        let matvecs = ["f16", "bf16", "q8_0", "q4_0", "q5_0", "q4_K", "q5_K", "q6_K", "iq4_nl", "iq4_xs", "q3_K", "q2_K"].flatMap { ["matvec_" + $0, "matvec_" + $0 + "_gated"] }
        let fixedMatvecs = ["f16", "bf16", "f16_gated", "bf16_gated"].flatMap { t in
            CUDABackend.fixedMatvecLengths.map { "matvec_\(t)_k\($0)" }
        } + ["f16", "bf16", "f16_gated", "bf16_gated"].flatMap { t in CUDABackend.fixedMatvecLengths.map { "matvec_\(t)_k\($0)_carry" } }
        let prefillMMA = CUDABackend.tensorCoreAttentionDims.map { "attention_prefill_mma_\($0)" } + CUDABackend.warpgroupAttentionKernels.map(\.name)
        let quantGemms = CUDABackend.quantGemmKernels.values.flatMap { $0.map(\.name) }
        let decodeMMA = CUDABackend.tensorCoreDecodeDims.flatMap { ["attention_decode_mma_\($0)", "attention_decode_mma_\($0)_w4", "attention_decode_mma_\($0)_w4s3"] }
        for name in (["embed_rows", "rms_norm", "matmul_rows", "to_half", "add_bias", "rope", "store_kv", "attention_split", "attention_split_heads",
                     "silu_mul", "gelu_tanh_mul", "scale_inplace", "zero_floats", "soft_cap_inplace", "add_inplace", "gather_rows", "dequantize_bf16",
                     "quantize_q8", "rope_store_kv", "repack_quantized", "attention_prefill", "argmax_rows", "topk_rows",
                     "repetition_penalty", "exp_sum_rows", "sample_rows", "split_columns", "silu_mul_16", "rope_store_kv_stacked",
                     "moe_route", "moe_router", "moe_group", "moe_products", "moe_combine", "add_sigmoid_gated", "dequantize_experts_bf16",
                     "expert_gemm_bf16", "expert_gemm_f16", "scatter_staged"]
                     + matvecs + fixedMatvecs + CUDABackend.expertDownTypes.values.map { "moe_down_" + $0 } + prefillMMA + decodeMMA + quantGemms) {
            var f: OpaquePointer?
            try driver.check(driver.cuModuleGetFunction(&f, module, name), "cuModuleGetFunction(\(name))")
            functions[name] = f
        }
        // Kernels whose dynamic shared memory may pass 48 KB (the normalized input of a product,
        // a prefill attention tile) ask for what the device allows.
        for name in matvecs + ["attention_prefill", "attention_split"] + prefillMMA + decodeMMA + quantGemms {
            // CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, as dynamicSharedLimit (the kernel's
            // static shared memory counts against the device's limit)
            try driver.check(driver.cuFuncSetAttribute(functions[name] ?? nil, 8, Int32(CUDABackend.dynamicSharedLimit(driver))), "cuFuncSetAttribute(\(name))")
        }
        pdl = driver.cuLaunchKernelEx != nil && driver.computeCapability.major >= 9
            && ProcessInfo.processInfo.environment["PEREGRINE_NO_PDL"] == nil
        launchAttribute.initializeMemory(as: UInt8.self, repeating: 0, count: 72)
        launchAttribute.storeBytes(of: Int32(6), as: Int32.self)  // CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
        launchAttribute.storeBytes(of: Int32(1), toByteOffset: 8, as: Int32.self)
        tokenInts = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        planInts = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        rowInts = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        tileInts = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        mapInts = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        sampleInts = try CUDABuffer(driver: driver, count: 2048, pool: pool)
        greedyWords = try CUDABuffer(driver: driver, count: 512, pool: pool)
        attentionCounters = try CUDABuffer(driver: driver, count: CUDABackend.attentionCounterCount)
        try driver.check(driver.cuMemsetD8Async(attentionCounters.pointer, 0, CUDABackend.attentionCounterCount * 4, s), "cuMemsetD8Async")
        normCarryArea = try CUDABuffer(driver: driver, count: 64 + CUDABackend.normCarryBlocks)
        try driver.check(driver.cuMemsetD8Async(normCarryArea.pointer, 0, 64 * 4, s), "cuMemsetD8Async")
        scratch = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        let tileRows = CUDABackend.captureSizes.last ?? 1
        let tileBuffer = try CUDABuffer(driver: driver, count: 2 * tileRows)
        // (first row, count) of each single-row tile. Typed: an untyped `[Int32($0), 1]` makes
        // flatMap the deprecated optional-returning one, and the buffer a copy of array references.
        let tiles: [Int32] = (0..<tileRows).flatMap { (r: Int) -> [Int32] in [Int32(r), 1] }
        try tiles.withUnsafeBytes { try driver.check(driver.cuMemcpyHtoDAsync(tileBuffer.pointer, $0.baseAddress!, $0.count, s), "cuMemcpyHtoDAsync") }
        singleRowTiles = tileBuffer
        try driver.check(driver.cuStreamSynchronize(s), "cuStreamSynchronize")
        halfScratch = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        stackedOut = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        dequantScratch = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        activationScratch = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        routedQ8 = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        routerCounters = try CUDABuffer(driver: driver, count: CUDABackend.routerRows)
        try driver.check(driver.cuMemsetD8Async(routerCounters.pointer, 0, CUDABackend.routerRows * 4, s), "cuMemsetD8Async")
        moeInts = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        moeRows = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        moeHidden = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        moeOut = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        moeUp = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        moeHalf = try CUDABuffer(driver: driver, count: 1024, pool: pool)
        for i in 0..<32 { params[i] = args + 8 * i }
        var host: UnsafeMutableRawPointer?
        // Two halves of staging memory, then the two slots of greedy choices.
        if driver.cuMemAllocHost(&host, 2 * pinnedBytes + 2 * 8 * CUDABackend.chosenCapacity) == 0, let host {
            pinned = host
            let events = !chaining || driver.cuEventRecord == nil || driver.cuEventSynchronize == nil ? []
                : (0..<4).compactMap { _ -> OpaquePointer? in
                    var e: OpaquePointer?
                    return driver.cuEventCreate?(&e, 2) == 0 ? e : nil  // CU_EVENT_DISABLE_TIMING
                }
            if events.count == 4 {
                chosenHost = host + 2 * pinnedBytes
                halfEvents = [events[0], events[1]]
                chosenEvents = [events[2], events[3]]
            }
        }
    }

    deinit {
        args.deallocate()
        params.deallocate()
        launchConfig.deallocate()
        launchAttribute.deallocate()
        tensorMapArgument.deallocate()
        piecesArgument.deallocate()
        dropGraphs()
        for e in halfEvents + chosenEvents where e != nil { _ = driver.cuEventDestroy?(e) }
    }

    private var inGraphStep: Bool { if case .eager = mode { return false }; return true }

    private func dropGraphs() {
        for (_, g) in graphs { _ = driver.cuGraphExecDestroy(g) }
        graphs.removeAll()
        seen.removeAll()
        stagedBytes.removeAll()
        inputsOnly.removeAll()
    }

    public func beginStep(key: Int) {
        bindContext()
        mode = .eager
        pinnedCursor = 0
        pendingPieces.removeAll(keepingCapacity: true)
        serializeNextLaunch = false
        layersStaged = false
        forgetCopies()
        pdlStep = pdl
        pendingKey = key
    }

    public var replayingStep: Bool { if case .replaying(_, let key) = mode { return inputsOnly.contains(key) }; return false }

    public func decodeGraphRows(_ rows: Int) -> Int? {
        guard graphsEnabled, pinned != nil else { return nil }
        return CUDABackend.captureSizes.first { $0 >= rows }
    }

    /// The positions a batch's attention splits are fixed by: its longest sequence (window-limited)
    /// rounded up to a power of two, at least 32. Within one such range a batch's kernels, and
    /// a graph of them, are the same whatever the lengths.
    static func splitBasis(_ longest: Int) -> Int {
        var b = 32
        while b < longest { b <<= 1 }
        return b
    }

    /// Replays the graph of a step whose key was given to `beginStep`, or captures it the second
    /// time the key is seen; the first time (or when its inputs would not fit the staging
    /// memory) the step runs eagerly.
    private func beginGraphStep(_ plan: BatchPlan) {
        guard let base = pendingKey else { return }
        pendingKey = nil
        guard graphsEnabled, pinned != nil, firstError == nil,
              (2 * plan.count + plan.blockTables.count) * 4 <= pinnedBytes / 2 else { return }
        var key = base
        var longest = 0
        for p in plan.positions { longest = max(longest, Int(p) + 1) }
        var h = Hasher()
        h.combine(base)
        // A batch's split count follows its longest sequence; one sequence's splits follow the
        // cache's capacity, and its kernel the sequence's length (`groupedAttentionFrom`).
        h.combine(plan.count > 1 ? CUDABackend.splitBasis(longest) : shortSequencePass ? 0 : 1)
        let half = chainsDecodeSteps ? nextHalf : 0
        if chainsDecodeSteps { h.combine(half) }
        key = h.finalize()
        if let g = graphs[key] {
            takeHalf(half)
            mode = .replaying(g, key)
            return
        }
        seen[key, default: 0] += 1
        guard seen[key]! >= 2 else { return }
        takeHalf(half)
        if driver.cuStreamBeginCapture(stream, 2) == 0 { mode = .capturing(key) }  // relaxed mode
    }

    /// This graph step stages into `half`, once the last step that read it is done.
    private func takeHalf(_ half: Int) {
        pinnedHalf = half
        guard chainsDecodeSteps else { return }
        nextHalf = 1 - half
        if halfRecorded[half] {
            halfRecorded[half] = false
            record(driver.cuEventSynchronize?(halfEvents[half]) ?? 1, "cuEventSynchronize")
        }
    }

    /// Host values to the device inside a graph step: through pinned memory at this step's next
    /// offset; the copy is recorded when capturing and already in the graph when replaying.
    private func stage(_ source: UnsafeRawPointer, bytes: Int, to destination: CUDADriver.DevicePointer) {
        guard let pinned, pinnedCursor + bytes <= pinnedBytes else {
            if firstError == nil { firstError = .backend("decode-step inputs exceed the pinned staging memory") }
            return
        }
        let at = pinned + pinnedHalf * pinnedBytes + pinnedCursor
        at.copyMemory(from: source, byteCount: bytes)
        if case .capturing = mode {
            if scattersInputs, bytes <= CUDABackend.scatteredBytes, bytes % 4 == 0 {
                if pendingPieces.count == CUDABackend.stagedPieces { partStackedRows() }
                pendingPieces.append((pinnedCursor, bytes / 4, destination))
            } else {
                record(driver.cuMemcpyHtoDAsync(destination, UnsafeRawPointer(at), bytes, stream), "cuMemcpyHtoDAsync")
            }
        }
        pinnedCursor += (bytes + 255) / 256 * 256
    }

    /// Small staged inputs of a captured step go to their places by one `scatter_staged`
    /// launch before the next launch, copy or read of the step, in place of a copy node each: a
    /// kernel trace of BF16 decode on an H200 had one 10-50 us gap with no kernel running at the
    /// start of every step, where those copies run. Larger ones (a batch's block tables) are
    /// still copied, which moves them faster than a kernel reading host memory. On H100s, BF16
    /// tg128 of the 8B shape gained 0.09-0.18% in three runs, the same tokens (BENCHMARKS.md);
    /// PEREGRINE_INPUT_SCATTER=0 copies each, for measuring.
    lazy var scattersInputs = driver.unifiedAddressing && functions["scatter_staged"] != nil
        && ProcessInfo.processInfo.environment["PEREGRINE_INPUT_SCATTER"] != "0"
    /// `scatter_staged` launches recorded so far (for tests).
    private(set) var scatterLaunches = 0
    static let scatteredBytes = 16 << 10
    /// Pieces one launch takes (STAGED_PIECES in Kernels.cu).
    static let stagedPieces = 8
    /// Staged pieces of the step being captured not yet launched: (offset in the half, words, destination).
    private var pendingPieces: [(offset: Int, words: Int, destination: CUDADriver.DevicePointer)] = []
    /// The next kernel waits for all of the last one (a scatter) before it starts.
    private var serializeNextLaunch = false
    /// StagedPieces, the kernel's by-value argument (128 bytes).
    private let piecesArgument = UnsafeMutableRawPointer.allocate(byteCount: 128, alignment: 64)

    private func scatterStaged() {
        guard !pendingPieces.isEmpty, let pinned else { return }
        defer { pendingPieces.removeAll(keepingCapacity: true) }
        guard case .capturing = mode else { return }
        piecesArgument.initializeMemory(as: UInt8.self, repeating: 0, count: 128)
        for (i, p) in pendingPieces.enumerated() {
            piecesArgument.storeBytes(of: p.destination, toByteOffset: 8 * i, as: UInt64.self)
            piecesArgument.storeBytes(of: UInt32(p.offset), toByteOffset: 64 + 4 * i, as: UInt32.self)
            piecesArgument.storeBytes(of: UInt32(p.words), toByteOffset: 96 + 4 * i, as: UInt32.self)
        }
        let host = UInt64(UInt(bitPattern: pinned + pinnedHalf * pinnedBytes))
        launchNow("scatter_staged", grid: (pendingPieces.count, 1, 1), block: 256, shared: 0, dependent: true) { a in
            a.ptr(host); a.byValue(piecesArgument)
        }
        scatterLaunches += 1
        // Kernels read host-staged inputs before gdc_wait (copies are complete before any kernel
        // after them starts), but a programmatically dependent kernel sees another kernel's writes
        // only after its own wait: the next launch is ordered after the scatter in full.
        serializeNextLaunch = true
    }


    // MARK: launching

    struct Arguments {
        let base: UnsafeMutableRawPointer
        let params: UnsafeMutablePointer<UnsafeMutableRawPointer?>
        var count = 0
        /// The parameter that is a tensor map, if any (its slot points at the map, not at `base`).
        var mapSlot: Int?
        // 32 slots of 8 bytes (see `args`); kernels here take at most 28 parameters.
        mutating func ptr(_ p: CUDADriver.DevicePointer) { base.storeBytes(of: p, toByteOffset: 8 * count, as: UInt64.self); count += 1 }
        mutating func ptr(_ b: CUDABuffer) { ptr(b.pointer) }
        mutating func i32(_ v: Int) { base.storeBytes(of: Int32(v), toByteOffset: 8 * count, as: Int32.self); count += 1 }
        mutating func i64(_ v: Int) { base.storeBytes(of: Int64(v), toByteOffset: 8 * count, as: Int64.self); count += 1 }
        mutating func f32(_ v: Float) { base.storeBytes(of: v, toByteOffset: 8 * count, as: Float.self); count += 1 }
        /// A tensor map (128 bytes at `map`, made by `encodeActivationMap`), passed by value.
        mutating func tensorMap(_ map: UnsafeMutableRawPointer) { byValue(map) }
        /// A struct passed by value (a tensor map, staged pieces): its slot points at its bytes.
        mutating func byValue(_ bytes: UnsafeMutableRawPointer) { params[count] = bytes; mapSlot = count; count += 1 }
        /// The (weights, bias, output, rows) of the product kernels' up to three matrices: `count`
        /// of them from `product`, the rest null.
        mutating func products(_ count: Int,
                               _ product: (Int) -> (weight: CUDADriver.DevicePointer, bias: CUDADriver.DevicePointer, out: CUDADriver.DevicePointer, rows: Int)) {
            for i in 0..<3 {
                if i < count {
                    let q = product(i)
                    ptr(q.weight); ptr(q.bias); ptr(q.out); i32(q.rows)
                } else {
                    ptr(0); ptr(0); ptr(0); i32(0)
                }
            }
        }
    }

    private func record(_ status: CUDADriver.Result, _ call: String) {
        if status != 0, firstError == nil {
            firstError = .backend("\(call) failed: \(CUDADriver.name(of: status, driver.cuGetErrorName))")
        }
    }

    /// Queues a kernel; `dependent` kernels (all of Kernels.cu but the load-time repacking) are
    /// launched programmatically dependent where the device allows.
    /// With PEREGRINE_KERNEL_PROFILE set, every launch is timed alone (the stream synchronized
    /// around it; no graphs) and `kernelProfile` sums the times by kernel.
    private let profiling = ProcessInfo.processInfo.environment["PEREGRINE_KERNEL_PROFILE"] != nil
    private var profile: [String: (count: Int, seconds: Double)] = [:]
    private var profileStart = 0.0

    private func profiled(_ name: String, _ body: () -> Void) {
        guard profiling else { body(); return }
        _ = driver.cuStreamSynchronize(stream)
        let t0 = Date().timeIntervalSince1970
        if profileStart == 0 { profileStart = t0 }
        body()
        _ = driver.cuStreamSynchronize(stream)
        let p = profile[name] ?? (0, 0)
        profile[name] = (p.count + 1, p.seconds + Date().timeIntervalSince1970 - t0)
    }

    public var kernelProfile: String? {
        guard profiling else { return nil }
        let total = profile.values.reduce(0) { $0 + $1.seconds }
        let wall = Date().timeIntervalSince1970 - profileStart
        var lines = [String(format: "GPU work %.3f s of %.3f s since the first launch (the rest is the host)", total, wall)]
        for (name, p) in profile.sorted(by: { $0.value.seconds > $1.value.seconds }) {
            lines.append(String(format: "%-28@ %8d calls %9.3f s %5.1f%%", name as NSString, p.count, p.seconds, 100 * p.seconds / max(total, 1e-9)))
        }
        return lines.joined(separator: "\n")
    }

    private func launch(_ name: String, grid: (Int, Int, Int), block: Int, shared: Int = 0, dependent: Bool = true,
                        _ fill: (inout Arguments) -> Void) {
        partStackedRows()
        forgetCopies()
        if case .replaying = mode { return }
        if profiling {
            profiled(name) { launchNow(name, grid: grid, block: block, shared: shared, dependent: dependent, fill) }
            return
        }
        launchNow(name, grid: grid, block: block, shared: shared, dependent: dependent, fill)
    }

    private func launchNow(_ name: String, grid: (Int, Int, Int), block: Int, shared: Int, dependent: Bool,
                           _ fill: (inout Arguments) -> Void) {
        var a = Arguments(base: args, params: params)
        fill(&a)
        defer { if let i = a.mapSlot { params[i] = args + 8 * i } }
        let f = functions[name] ?? nil
        let programmatic = pdlStep && dependent && !serializeNextLaunch
        serializeNextLaunch = false
        if programmatic, let launchEx = driver.cuLaunchKernelEx {
            let c = launchConfig
            c.storeBytes(of: UInt32(grid.0), toByteOffset: 0, as: UInt32.self)
            c.storeBytes(of: UInt32(grid.1), toByteOffset: 4, as: UInt32.self)
            c.storeBytes(of: UInt32(grid.2), toByteOffset: 8, as: UInt32.self)
            c.storeBytes(of: UInt32(block), toByteOffset: 12, as: UInt32.self)
            c.storeBytes(of: UInt32(1), toByteOffset: 16, as: UInt32.self)
            c.storeBytes(of: UInt32(1), toByteOffset: 20, as: UInt32.self)
            c.storeBytes(of: UInt32(shared), toByteOffset: 24, as: UInt32.self)
            c.storeBytes(of: stream, toByteOffset: 32, as: OpaquePointer?.self)
            c.storeBytes(of: UnsafeRawPointer(launchAttribute), toByteOffset: 40, as: UnsafeRawPointer.self)
            c.storeBytes(of: UInt32(1), toByteOffset: 48, as: UInt32.self)
            record(launchEx(UnsafeRawPointer(c), f, params, nil), "cuLaunchKernelEx(\(name))")
            return
        }
        record(driver.cuLaunchKernel(f, UInt32(grid.0), UInt32(grid.1), UInt32(grid.2), UInt32(block), 1, 1, UInt32(shared), stream, params, nil),
               "cuLaunchKernel(\(name))")
    }

    private func blocks(_ n: Int, _ size: Int = 256) -> (Int, Int, Int) { (max(1, (n + size - 1) / size), 1, 1) }

    /// Copies host ints into a device staging buffer (grown when needed). Copies from pageable
    /// memory are ordered in the stream, and the host array may be reused once the call returns.
    private func upload(_ values: UnsafeBufferPointer<Int32>, into buffer: inout CUDABuffer) -> CUDADriver.DevicePointer {
        guard ensure(&buffer, values.count) else { return buffer.pointer }
        guard values.count > 0 else { return buffer.pointer }
        if inGraphStep {
            stage(values.baseAddress!, bytes: values.count * 4, to: buffer.pointer)
        } else {
            record(driver.cuMemcpyHtoDAsync(buffer.pointer, values.baseAddress!, values.count * 4, stream), "cuMemcpyHtoDAsync")
        }
        return buffer.pointer
    }

    /// The plan's slots, positions and block tables to the device once a pass (staged on a graph
    /// step), for every layer's kernels.
    /// A CUDA context is current per thread: the engine may step on a thread other than the one
    /// that made the backend (a server's background loop), so each entry point makes it current
    /// there first (a thread-local write, once per thread change).
    private var boundThread: pthread_t?
    private func bindContext() {
        let me = pthread_self()
        if let b = boundThread, pthread_equal(b, me) != 0 { return }
        if (try? driver.makeCurrent()) != nil { boundThread = me }
    }

    public func beginPass(_ plan: BatchPlan) {
        bindContext()
        shortSequencePass = plan.count == 1 && plan.positions.allSatisfy { Int($0) + 1 < groupedAttentionFrom }
        beginGraphStep(plan)
        hostInts.removeAll(keepingCapacity: true)
        hostInts.append(contentsOf: plan.slots)
        hostInts.append(contentsOf: plan.positions)
        hostInts.append(contentsOf: plan.blockTables)
        _ = hostInts.withUnsafeBufferPointer { upload($0, into: &planInts) }
        planRows = plan.count
    }

    private func planPointers(_ plan: BatchPlan, rows: Int)
        -> (slots: CUDADriver.DevicePointer, positions: CUDADriver.DevicePointer, tables: CUDADriver.DevicePointer) {
        if planRows != plan.count, firstError == nil { firstError = .backend("internal: a batch plan used before beginPass") }
        return (planInts.pointer, planInts.pointer + UInt64(plan.count * 4), planInts.pointer + UInt64(2 * plan.count * 4))
    }

    private func ensure(_ buffer: inout CUDABuffer, _ count: Int) -> Bool {
        guard buffer.count < count else { return true }
        partStackedRows()  // before `stackedOut` (or any scratch) may be replaced
        if inGraphStep {
            // A graph step must not move memory; the key is run eagerly again next time.
            if firstError == nil { firstError = .backend("internal: scratch grew during a graph step") }
            return false
        }
        dropGraphs()
        _ = driver.cuStreamSynchronize(stream)
        guard let b = try? CUDABuffer(driver: driver, count: count, pool: pool) else {
            if firstError == nil { firstError = .backend("out of GPU memory for \(count) scratch values") }
            return false
        }
        buffer = b
        return true
    }

    // MARK: ComputeBackend

    public func weight(_ t: TensorView) throws -> CUDAWeight {
        bindContext()
        let rows = t.shape.count >= 2 ? t.shape[0] : 1
        let cols = t.shape.count >= 2 ? t.shape.dropFirst().reduce(1, *) : t.elementCount
        if t.shape.count == 1 || t.dtype == .f32 {
            let b = try t.toFloat().withUnsafeBytes { try deviceCopy(of: $0.baseAddress!, bytes: $0.count) }
            return CUDAWeight(dtype: .f32, rows: rows, cols: cols, storage: b)
        }
        guard [.f16, .bf16, .q8_0, .q4_0, .q5_0, .iq4_nl].contains(t.dtype) || [.q4_K, .q5_K, .q6_K, .iq4_xs, .q3_K, .q2_K].contains(t.dtype) && cols % 256 == 0 else {
            // Types without GPU kernels (Q4_1, Q5_1) are widened to BF16 at load: the
            // file runs, at BF16's size and speed for those tensors.
            let b = try t.toFloat().map { Half.floatToBF16($0) }.withUnsafeBytes { try deviceCopy(of: $0.baseAddress!, bytes: $0.count) }
            return CUDAWeight(dtype: .bf16, rows: rows, cols: cols, storage: b)
        }
        let b = try deviceCopy(of: t.data, bytes: t.byteCount)
        if [.q8_0, .q4_0, .q5_0, .q4_K, .q5_K, .q6_K, .iq4_nl, .iq4_xs, .q3_K, .q2_K].contains(t.dtype) {
            // Planar on the device (values, then scales): 16-byte-aligned blocks for the kernels,
            // and 32 bytes past the end, which quant_gemm's 16-byte copies of the pieces holding
            // the last scales may reach (Q3_K's 12 scale bytes take two).
            guard cols % t.dtype.blockSize == 0 else { throw PeregrineError.format("tensor '\(t.name)': rows of \(cols) values are not whole blocks") }
            let planar = try CUDABuffer(driver: driver, count: (t.byteCount + 3) / 4 + 8)
            let blocks = rows * cols / t.dtype.blockSize
            launch("repack_quantized", grid: self.blocks(blocks), block: 256, dependent: false) { a in
                a.ptr(b); a.i32(code(t.dtype)); a.ptr(planar); a.i64(blocks)
            }
            try driver.check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
            try throwFirstError()
            return CUDAWeight(dtype: t.dtype, rows: rows, cols: cols, storage: planar)
        }
        return CUDAWeight(dtype: t.dtype, rows: rows, cols: cols, storage: b)
    }

    /// 16-bit matrices of one width, of at least eight columns (rows 16-byte aligned), go one
    /// under another in one allocation: `matmul3` and `gatedProduct` run them as one product
    /// when many tokens take them. Anything else is loaded as `weight` loads it.
    public func weights(_ ts: [TensorView]) throws -> [CUDAWeight] {
        guard ts.count > 1, let first = ts.first, first.dtype == .f16 || first.dtype == .bf16, first.shape.count == 2,
              first.shape[1] % 8 == 0, ts.allSatisfy({ $0.dtype == first.dtype && $0.shape.count == 2 && $0.shape[1] == first.shape[1] })
        else { return try ts.map { try weight($0) } }
        bindContext()
        let total = ts.reduce(0) { $0 + $1.byteCount }
        let b = try CUDABuffer(driver: driver, count: (total + 3) / 4)
        var offset = 0
        var placed: [CUDAWeight] = []
        for t in ts {
            try driver.check(driver.cuMemcpyHtoDAsync(b.pointer + UInt64(offset), t.data, t.byteCount, stream), "cuMemcpyHtoDAsync")
            placed.append(CUDAWeight(dtype: t.dtype, rows: t.shape[0], cols: t.shape[1], storage: b, byteOffset: UInt64(offset)))
            offset += t.byteCount
        }
        try driver.check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
        return placed
    }

    /// Device memory (allocated exactly) holding `bytes` from the host, the copy complete.
    private func deviceCopy(of source: UnsafeRawPointer, bytes: Int) throws -> CUDABuffer {
        let b = try CUDABuffer(driver: driver, count: (bytes + 3) / 4)
        try driver.check(driver.cuMemcpyHtoDAsync(b.pointer, source, bytes, stream), "cuMemcpyHtoDAsync")
        try driver.check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
        return b
    }

    private func code(_ d: DType) -> Int {
        switch d {
        case .f16: return 1
        case .bf16: return 2
        case .q8_0: return 3
        case .q4_0: return 4
        case .q4_K: return 5
        case .q6_K: return 6
        case .iq4_nl: return 7
        case .iq4_xs: return 8
        case .q3_K: return 9
        case .q2_K: return 10
        case .q5_K: return 11
        case .q5_0: return 12
        default: return 0
        }
    }

    public func buffer(_ count: Int) throws -> CUDABuffer {
        bindContext()
        forgetCopies()
        dropGraphs()
        let b = try CUDABuffer(driver: driver, count: count, pool: pool)
        try driver.check(driver.cuMemsetD8Async(b.pointer, 0, max(count, 1) * 4, stream), "cuMemsetD8Async")
        return b
    }

    public func write(_ values: UnsafeBufferPointer<Float>, to buffer: CUDABuffer, offset: Int) {
        bindContext()
        // A graph step's write only stages: pieces staged before it may wait for the same scatter.
        partStackedRows(scatteringStaged: !inGraphStep)
        forgetCopies()
        guard values.count > 0 else { return }
        if inGraphStep {
            stage(values.baseAddress!, bytes: values.count * 4, to: buffer.pointer + UInt64(offset * 4))
            return
        }
        record(driver.cuMemcpyHtoDAsync(buffer.pointer + UInt64(offset * 4), values.baseAddress!, values.count * 4, stream), "cuMemcpyHtoDAsync")
    }

    public func read(_ buffer: CUDABuffer, offset: Int, into values: UnsafeMutableBufferPointer<Float>) {
        bindContext()
        partStackedRows()
        guard values.count > 0 else { return }
        record(driver.cuMemcpyDtoHAsync(values.baseAddress!, buffer.pointer + UInt64(offset * 4), values.count * 4, stream), "cuMemcpyDtoHAsync")
        record(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
    }

    public func embed(tokens: UnsafeBufferPointer<Int32>, table: CUDAWeight, out: CUDABuffer) {
        let ids = upload(tokens, into: &tokenInts)
        launch("embed_rows", grid: (tokens.count, 1, 1), block: 256) { a in
            a.ptr(table.pointer); a.i32(code(table.dtype)); a.i64(table.rows * table.cols); a.ptr(ids); a.ptr(greedyWords)
            a.ptr(out); a.i32(table.cols)
        }
    }

    public func rmsNorm(_ x: CUDABuffer, weight: CUDAWeight, eps: Float, rows: Int, dim: Int, out: CUDABuffer) {
        rmsNorm(x, weight: weight, eps: eps, rows: rows, dim: dim, out: out, for: nil)
    }

    /// The RMSNorm, with the 16-bit copy of its output that a cuBLAS product of `consumer` reads
    /// written beside it (see `halfHolds`).
    /// With `second`, the same launch normalizes that tensor's rows in place after these.
    private func rmsNorm(_ x: CUDABuffer, weight: CUDAWeight, eps: Float, rows: Int, dim: Int, out: CUDABuffer, for consumer: CUDAWeight?,
                         second: (x: CUDABuffer, weight: CUDAWeight, rows: Int)? = nil) {
        let half = halfTwin(of: out, count: rows * dim, rows: rows, consumer: consumer)
        // A float4 of the row at a time where the row is whole float4s (see rms_norm); blocks of
        // at most 256 threads, so that eight fit on a multiprocessor: a 256-row decode step of
        // the 8B shape took 10.5 us a norm with 1,024-thread blocks.
        let lanes = dim % 4 == 0 ? dim / 4 : dim
        launch("rms_norm", grid: (rows + (second?.rows ?? 0), 1, 1), block: min(256, max(32, (lanes + 31) / 32 * 32))) { a in
            a.ptr(x); a.ptr(weight.pointer); a.ptr(out); a.i32(dim); a.f32(eps); a.ptr(half?.pointer ?? 0); a.i32(Int(half?.code ?? 0))
            a.ptr(second?.x.pointer ?? 0); a.ptr(second?.weight.pointer ?? 0); a.ptr(second?.x.pointer ?? 0); a.i32(rows)
        }
        if let half { halfHolds = (out.pointer, rows * dim, half.code) }
    }

    public func rmsNormPair(_ a: (x: CUDABuffer, weight: CUDAWeight, rows: Int), _ b: (x: CUDABuffer, weight: CUDAWeight, rows: Int),
                            eps: Float, dim: Int) {
        rmsNorm(a.x, weight: a.weight, eps: eps, rows: a.rows, dim: dim, out: a.x, for: nil, second: b)
    }

    /// Where a kernel writing `count` values into `out` should write their 16-bit copy: when the
    /// next product, of `consumer` over `rows` tokens, goes through cuBLAS on a rounded input.
    private func halfTwin(of out: CUDABuffer, count: Int, rows: Int, consumer: CUDAWeight?)
        -> (pointer: CUDADriver.DevicePointer, code: Int32)? {
        guard let w = consumer, rows != oneToken, w.dtype != .f32, !usesRowKernel(rows, w),
              ensure(&halfScratch, (count + 1) / 2) else { return nil }
        return (halfScratch.pointer, w.dtype == .f16 ? 1 : 2)
    }

    public func outputSize(_ w: CUDAWeight) -> Int { w.rows }

    /// Products over few tokens run as warp-per-row kernels (reading the weights once); over many,
    /// as cuBLAS matrix products. IQ4_XS, Q3_K and Q2_K rows are read value by value there, so
    /// they take it only when --deterministic asks every product to be the same per-row kernel.
    private func usesRowKernel(_ rows: Int, _ w: CUDAWeight) -> Bool {
        if w.dtype == .f32 { return rows <= 64 }
        return deterministic || rows <= rowKernelTokens(w.dtype) && ![.iq4_xs, .q3_K, .q2_K].contains(w.dtype)
    }

    private typealias Product = (weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer)

    private func rowKernel(_ x: CUDABuffer, rows: Int, _ p: [Product], mode: Int) {
        let n = p.map(\.weight.rows), warps = mode == 2 ? n[0] : n.reduce(0, +)
        let k = p[0].weight.cols
        var xq: CUDADriver.DevicePointer = 0, xs: CUDADriver.DevicePointer = 0
        if !p[0].weight.dtype.isFloat {
            guard let q = quantizeActivations(x, rows: rows, k: k, norm: nil) else { return }
            (xq, xs) = q
        }
        launch("matmul_rows", grid: blocks(warps * 32), block: 256) { a in
            a.products(p.count) { i in (p[i].weight.pointer, p[i].bias?.pointer ?? 0, p[i].out.pointer, mode == 2 && i == 1 ? 0 : n[i]) }
            a.i32(code(p[0].weight.dtype)); a.ptr(x); a.ptr(xq); a.ptr(xs); a.i32(k); a.i32(rows); a.i32(mode)
        }
    }

    /// Activations rounded to 8 bits once for all rows of a quantized product (int8 values, then
    /// one scale per 32), RMS-normalized first with `norm`.
    private func quantizeActivations(_ x: CUDABuffer, rows: Int, k: Int, norm: (weight: CUDAWeight, eps: Float)?)
        -> (CUDADriver.DevicePointer, CUDADriver.DevicePointer)? {
        guard ensure(&activationScratch, rows * k / 4 + rows * k / 32) else { return nil }
        let xq = activationScratch.pointer, xs = activationScratch.pointer + UInt64(rows * k)
        launch("quantize_q8", grid: (rows, (k + 255) / 256, 1), block: 256) { a in
            a.ptr(x); a.ptr(norm?.weight.pointer ?? 0); a.f32(norm?.eps ?? 0); a.ptr(xq); a.ptr(xs); a.i32(k)
        }
        return (xq, xs)
    }

    /// One token's products (up to three matrices of one type, or gate and up with mode 2) as a
    /// `matvec` kernel, with the RMSNorm of x fused when `norm` is given. False when the weights
    /// do not suit it (f32, mixed types, odd sizes).
    /// `q8`: x already rounded to 8 bits (quantizeActivations) for quantized weights.
    private func matvecKernel(_ x: CUDABuffer, _ p: [Product], mode: Int, norm: (weight: CUDAWeight, eps: Float)?,
                              q8: (CUDADriver.DevicePointer, CUDADriver.DevicePointer)? = nil) -> Bool {
        let dtype = p[0].weight.dtype, k = p[0].weight.cols
        guard let suffix = Self.matvecSuffix(dtype) else { return false }
        let quantized = !dtype.isFloat
        guard p.allSatisfy({ $0.weight.dtype == dtype && $0.weight.cols == k }), k % (quantized ? dtype.blockSize : 8) == 0 else { return false }
        if let norm, !quantized, norm.weight.rows * norm.weight.cols != k || k * 4 > dynamicSharedLimit { return false }
        var xq: CUDADriver.DevicePointer = 0, xs: CUDADriver.DevicePointer = 0
        if quantized, let q8 {
            (xq, xs) = q8
        } else if quantized {
            guard let q = quantizeActivations(x, rows: 1, k: k, norm: norm) else { return true }
            (xq, xs) = q
        }
        let n = p.map(\.weight.rows), warps = matvecWarps(mode == 2 ? n[0] : n.reduce(0, +), dtype, k: k, gated: mode == 2)
        let normPointer = quantized ? 0 : norm?.weight.pointer ?? 0
        let shared = normPointer != 0 ? k * 4 : 0
        let fixed = normPointer == 0 && hasFixedMatvec(dtype, k: k)
        let kernel = "matvec_" + suffix + (mode == 2 ? "_gated" : "") + (fixed ? "_k\(k)" : "")
        launch(kernel, grid: blocks(warps * 32), block: 256, shared: shared) { a in
            a.products(p.count) { i in (p[i].weight.pointer, p[i].bias?.pointer ?? 0, p[i].out.pointer, mode == 2 && i == 1 ? 0 : n[i]) }
            a.ptr(x); a.ptr(normPointer); a.f32(norm?.eps ?? 0); a.ptr(xq); a.ptr(xs); a.i32(k); a.i32(mode); a.ptr(0); a.i32(1)
        }
        return true
    }

    /// Warps a matvec launch has for `rows` output rows of length k: one a row, but a Q6_K row of
    /// 2,048 values fills one load a lane, so there a warp that is not gated takes two
    /// (matvec_q6k_body's `paired`).
    private func matvecWarps(_ rows: Int, _ dtype: DType, k: Int, gated: Bool) -> Int {
        dtype == .q6_K && !gated && k == 2048 ? (rows + 1) / 2 : rows
    }

    /// The `matvec` kernel of a weight type, when there is one that takes rows of any length the
    /// type's blocks divide.
    private static func matvecSuffix(_ dtype: DType) -> String? {
        switch dtype {
        case .f16: return "f16"
        case .bf16: return "bf16"
        case .q8_0: return "q8_0"
        case .q4_0: return "q4_0"
        case .q4_K: return "q4_K"
        case .q6_K: return "q6_K"
        case .iq4_nl: return "iq4_nl"
        case .iq4_xs: return "iq4_xs"
        case .q3_K: return "q3_K"
        case .q2_K: return "q2_K"
        case .q5_K: return "q5_K"
        case .q5_0: return "q5_0"
        default: return nil
        }
    }

    /// out (+)= x @ W^T through cuBLAS (see `cublasProduct`), the bias added after.
    /// `outPointer` places the output inside `out` (at its start by default); `halfOut` writes it
    /// in the 16-bit type the product runs in (the weight's, or BF16 for a quantized one; no bias).
    private func gemm(_ x: CUDABuffer, rows: Int, weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer,
                      outPointer: CUDADriver.DevicePointer? = nil, accumulate: Bool, halfOut: Bool = false) {
        let outDim = weight.rows, k = weight.cols
        if quantGemm(x, rows: rows, [(weight, bias, outPointer ?? out.pointer)], accumulate: accumulate, halfOut: halfOut && bias == nil) {
            return
        }
        guard let (a, type) = gemmWeight(weight), let b = gemmInput(x.pointer, count: rows * k, for: weight.dtype) else { return }
        cublasProduct(a, b, type: type, outDim: outDim, rows: rows, k: k, out: outPointer ?? out.pointer, accumulate: accumulate,
                      outType: halfOut && bias == nil && type != 0 ? type : 0)
        if let bias {
            let held = halfHolds  // still valid: cublasProduct forgot it if `out` overlaps its source
            launch("add_bias", grid: blocks(rows * outDim), block: 256) { a in
                a.ptr(outPointer ?? out.pointer); a.ptr(bias.pointer); a.i32(outDim); a.i64(rows * outDim)
            }
            halfHolds = held
        }
    }

    /// A weight as cuBLAS takes it, with its cudaDataType: 16-bit and f32 weights in place;
    /// quantized ones widened to BF16 for the tensor cores (into `dequantScratch`, valid until
    /// the next widening).
    private func gemmWeight(_ weight: CUDAWeight) -> (CUDADriver.DevicePointer, Int32)? {
        switch weight.dtype {
        case .f32: return (weight.pointer, 0)
        case .f16: return (weight.pointer, 2)
        case .bf16: return (weight.pointer, 14)
        default:
            let n = weight.rows * weight.cols
            guard ensure(&dequantScratch, (n + 1) / 2) else { return nil }
            let held = halfHolds  // the widening writes only dequantScratch
            launch("dequantize_bf16", grid: blocks((n + 7) / 8), block: 256) { a in
                a.ptr(weight.pointer); a.i32(code(weight.dtype)); a.ptr(dequantScratch); a.i64(n)
            }
            halfHolds = held
            return (dequantScratch.pointer, 14)
        }
    }

    /// `count` activations in the type `gemmWeight` gives a weight of `dtype`: f32 in place, else
    /// rounded into `halfScratch` (valid until the next rounding).
    private func gemmInput(_ x: CUDADriver.DevicePointer, count: Int, for dtype: DType) -> CUDADriver.DevicePointer? {
        guard dtype != .f32 else { return x }
        let code: Int32 = dtype == .f16 ? 1 : 2
        if let h = halfHolds, h.source == x, h.count >= count, h.type == code { return halfScratch.pointer }
        guard ensure(&halfScratch, (count + 1) / 2) else { return nil }
        launch("to_half", grid: blocks((count + 3) / 4), block: 256) { a in
            a.ptr(x); a.ptr(halfScratch); a.i32(Int(code)); a.i64(count)
        }
        halfHolds = (x, count, code)
        return halfScratch.pointer
    }

    /// out (+)= b @ a^T through cuBLAS: Y^T (outDim x rows, column-major) = A^T(k x outDim)^T B^T(k x rows),
    /// both of cudaDataType `type`, f32 accumulation and output, beta 1 to accumulate.
    private func cublasProduct(_ a: CUDADriver.DevicePointer, _ b: CUDADriver.DevicePointer, type: Int32, outDim: Int, rows: Int, k: Int,
                               out: CUDADriver.DevicePointer, accumulate: Bool, outType: Int32 = 0) {
        partStackedRows()
        var alpha: Float = 1, beta: Float = accumulate ? 1 : 0
        var status: Int32 = 0
        productWrites(out, count: outDim * rows)
        if case .replaying = mode { return }  // the product is in the graph (as every launch is)
        profiled("cublasGemmEx") {
            status = driver.cublasGemmEx(cublas, 1, 0, Int32(outDim), Int32(rows), Int32(k), &alpha,
                                         UnsafeRawPointer(bitPattern: UInt(a)), type, Int32(k),
                                         UnsafeRawPointer(bitPattern: UInt(b)), type, Int32(k), &beta,
                                         UnsafeMutableRawPointer(bitPattern: UInt(out)), outType, Int32(outDim), 68, -1)
        }
        if status != 0, firstError == nil { firstError = .backend("cublasGemmEx failed (\(status))") }
    }

    /// What a product writing `count` f32 values at `out` makes stale: the 16-bit copy of its
    /// input if `out` overlaps that input, and the 8-bit one.
    private func productWrites(_ out: CUDADriver.DevicePointer, count: Int) {
        if let h = halfHolds, out < h.source + UInt64(h.count * 4), h.source < out + UInt64(count * 4) { halfHolds = nil }
        q8Holds = nil
    }

    /// Weight rows a block of quant_gemm takes (QG_ROWS in Kernels.cu).
    static let quantGemmRows = 128
    /// A quant_gemm kernel: its name, the tokens a block takes, its buffers, the bytes a weight
    /// row takes in one (QuantChunk's STRIDE), and whether it is the warp-specialized form
    /// (quant_gemm_ws: 384 threads, a copying warpgroup and two that multiply).
    struct QuantGemmKernel {
        let name: String, tokens: Int, stages: Int, rowBytes: Int
        var warpSpecialized = false
        var threads: Int { warpSpecialized ? 384 : 256 }
        /// quant_gemm_shared in Kernels.cu: each buffer's activations (`tokens` rows of 128
        /// bytes) and weight rows rounded up to 1,024 bytes, and 1,024 to align the first;
        /// quant_gemm_ws_shared adds two 8-byte mbarriers a buffer.
        var shared: Int {
            stages * (tokens * 128 + (CUDABackend.quantGemmRows * rowBytes + 1023) / 1024 * 1024) + 1024 + (warpSpecialized ? 16 * stages : 0)
        }
    }
    /// The kernels of each weight type, named by its matvec suffix: 128 tokens a block, 256
    /// (QUANT_GEMM in Kernels.cu), and the warp-specialized form at 256 (QUANT_GEMM_WS): the
    /// bytes a weight row takes in a buffer (QuantChunk's STRIDE), the buffers at 128 tokens (256
    /// take four), and the warp-specialized form's.
    static let quantGemmKernels: [DType: [QuantGemmKernel]] = Dictionary(uniqueKeysWithValues: [
        (DType.q8_0, 80, 4, 5), (.q4_0, 48, 4, 5), (.iq4_nl, 48, 4, 5), (.iq4_xs, 48, 4, 5), (.q3_K, 112, 3, 4), (.q2_K, 80, 4, 5),
        (.q4_K, 48, 4, 5), (.q5_K, 80, 4, 5), (.q6_K, 144, 3, 4), (.q5_0, 80, 4, 5),
    ].map { type, rowBytes, stages, wsStages in
        let name = "quant_gemm_" + (matvecSuffix(type) ?? "")
        return (type, [QuantGemmKernel(name: name, tokens: 128, stages: stages, rowBytes: rowBytes),
                       QuantGemmKernel(name: name + "_t256", tokens: 256, stages: 4, rowBytes: rowBytes),
                       QuantGemmKernel(name: name + "_ws", tokens: 256, stages: wsStages, rowBytes: rowBytes, warpSpecialized: true)])
    })
    /// The kernel of `type` for blocks of `tokens` tokens (128 or 256), warp-specialized or not.
    static func quantGemmKernel(_ type: DType, tokens: Int, warpSpecialized: Bool) -> QuantGemmKernel? {
        quantGemmKernels[type]?.first { $0.tokens == tokens && $0.warpSpecialized == warpSpecialized }
    }
    /// Most tokens for which a quantized product decodes its weights on the fly into the tensor
    /// cores' operands (quant_gemm) rather than widening the whole matrix to BF16 for cuBLAS
    /// first (checked on the kernel emulator and on GPUs); nil: the type's own limit
    /// (`quantGemmDefaultTokenLimit`). PEREGRINE_QUANT_GEMM=1 takes quant_gemm for every count,
    /// =0 for none. Tests set it.
    var quantGemmTokenLimit: Int? = {
        switch ProcessInfo.processInfo.environment["PEREGRINE_QUANT_GEMM"] {
        case "1": return .max
        case "0": return 0
        default: return nil
        }
    }()
    /// The default limit of a weight type. Over the few tokens of a decode step the widening
    /// costs more than the product; over long prompts it is paid once for many tokens, and
    /// cuBLAS's product beats quant_gemm's, whose decoding leaves the tensor cores idle part of
    /// the time. Measured on an H100 with 8 layers of the 8B shape, quant_gemm against the
    /// widening in the same run (BENCHMARKS.md, SERVING.md): in Q4_K_M, prompts of 16, 64 and
    /// 256 tokens 1.64x, 1.56x and 1.20x, batched decode steps of 16 to 256 sequences 1.8x down to
    /// 1.2x. With its outputs through the copy engine and the gating's in BF16, each file in one
    /// type, steps of 512 / 1,024 / 2,048 / 4,096 tokens: Q8_0 1.06x / 0.92x / 0.92x / 0.84x, Q4_0
    /// 1.10x / 0.96x / 0.98x / 0.91x, IQ4_NL 1.11x / 0.95x / 0.97x / 0.90x, IQ4_XS 1.60x / 1.21x /
    /// 1.11x / 0.95x, Q2_K 1.63x / 1.24x / 1.10x / 0.92x, Q3_K 1.62x / 1.19x / 1.05x / 0.84x, Q6_K
    /// 0.82x / 0.71x / 0.75x / 0.68x (its decoding takes the most instructions); the widening of
    /// IQ4_XS, Q2_K and Q3_K is the slowest. With the activations copied by the TMA, on an H200,
    /// the same picture (Q4_K_M 1.02x / 0.93x / 0.87x at 512 / 2,048 / 4,096; BENCHMARKS.md).
    /// Q5_K, whose decoding is Q4_K's and one more bit a value, takes Q4_K's limit (512 measured
    /// best of the three ways on an H100, BENCHMARKS.md); Q5_0 takes Q4_0's (not measured).
    static func quantGemmDefaultTokenLimit(_ type: DType) -> Int {
        switch type {
        case .q6_K: return 256
        case .iq4_xs, .q2_K, .q3_K: return 2048
        default: return 512
        }
    }
    /// Tokens a block of quant_gemm takes (128 or 256); nil: 256 for more than 128 tokens where
    /// that still gives every multiprocessor a block, else 128. PEREGRINE_QUANT_GEMM_TOKENS sets
    /// it for measuring; tests run both.
    var quantGemmTokens: Int? = CUDABackend.measuringChoice("PEREGRINE_QUANT_GEMM_TOKENS", CUDABackend.quantGemmTokenChoices)
    static let quantGemmTokenChoices = [128, 256]
    /// Whether blocks of 256 tokens take the warp-specialized form (quant_gemm_ws); nil: they do.
    /// On an H100 (8 layers of the 8B shape in Q4_K_M, every product at 256 tokens a block) it
    /// measured 4-9% ahead of the form whose warps all copy and meet at a barrier each chunk
    /// (BENCHMARKS.md). PEREGRINE_QUANT_GEMM_WS=0 keeps that form, for measuring; tests run both.
    var quantGemmWarpSpecialized: Bool? = CUDABackend.measuringChoice("PEREGRINE_QUANT_GEMM_WS", [0, 1]).map { $0 == 1 }
    /// Slices of k a quant_gemm launch takes (split-K); nil: the rule in `quantGemm`. Tests set it.
    var quantGemmSlices: Int?
    /// quant_gemm launches the host has asked for (a graph step replayed by walking the layers
    /// counts its own too), of those the ones in more than one slice of k, and the
    /// warp-specialized ones (their tensor map made), for tests.
    private(set) var quantGemmLaunches = 0, quantGemmSplitLaunches = 0, quantGemmWarpSpecializedLaunches = 0

    /// How quant_gemm would take products of `weights` over `rows` tokens (nil: it would not): no
    /// more tokens than `quantGemmTokenLimit` (by default the type's), too many for the row
    /// kernel (which --deterministic keeps for every count), a compute capability 9.0 device
    /// (wgmma), one type with kernels, rows of one length, a multiple of the kernels' chunk of 64
    /// values, and the kernel's shared memory within the device's. `tiles` counts the blocks of
    /// one slice of k; `slices` is what the rule below gives (or `quantGemmSlices`).
    private func quantGemmPlan(rows: Int, _ weights: [CUDAWeight])
        -> (kernel: QuantGemmKernel, tokenTiles: Int, rowTiles: Int, tiles: Int, slices: Int)? {
        let w = weights[0], k = w.cols
        guard rows <= quantGemmTokenLimit ?? CUDABackend.quantGemmDefaultTokenLimit(w.dtype), !usesRowKernel(rows, w), driver.computeCapability == (9, 0), k > 0, k % 64 == 0, weights.count <= 3,
              weights.allSatisfy({ $0.dtype == w.dtype && $0.cols == k }) else { return nil }
        let rowTiles = weights.reduce(0) { $0 + ($1.rows + CUDABackend.quantGemmRows - 1) / CUDABackend.quantGemmRows }
        let tokens = quantGemmTokens ?? (rows > 128 && (rows + 255) / 256 * rowTiles >= driver.multiprocessors ? 256 : 128)
        let warpSpecialized = tokens == 256 && (quantGemmWarpSpecialized ?? true)
        guard let kernel = CUDABackend.quantGemmKernel(w.dtype, tokens: tokens, warpSpecialized: warpSpecialized),
              kernel.shared <= CUDABackend.dynamicSharedLimit(driver) else { return nil }
        // Few tokens make few tiles (a decode step of 16 sequences: 32 for the 8B shape's down
        // projection, on 132 multiprocessors that each hold two), so each tile's k is parted
        // among slices, as many as bring the blocks to what the GPU holds at once, of at least
        // four chunks each; their sums are added into outputs zeroed first (or the residual).
        let tokenTiles = (rows + kernel.tokens - 1) / kernel.tokens, tiles = tokenTiles * rowTiles
        let chunks = k / 64, resident = (kernel.tokens == 128 ? 2 : 1) * driver.multiprocessors
        let slices = max(1, quantGemmSlices.map { min($0, chunks) } ?? min(chunks / 4, (resident + tiles - 1) / tiles))
        return (kernel, tokenTiles, rowTiles, tiles, slices)
    }

    /// Up to three products of quantized weights over the same `rows` tokens of x in one
    /// quant_gemm launch, if one takes them (false: no product launched; see `quantGemmPlan`). Split
    /// into slices of k, the outputs are zeroed first (`zero_floats`) unless added to. `halfOut`
    /// writes BF16 outputs (no bias; never split, as the slices' sums are added in f32).
    private func quantGemm(_ x: CUDABuffer, rows: Int, _ p: [(weight: CUDAWeight, bias: CUDAWeight?, out: CUDADriver.DevicePointer)],
                           accumulate: Bool, halfOut: Bool = false) -> Bool {
        let k = p[0].weight.cols
        guard let plan = quantGemmPlan(rows: rows, p.map(\.weight)),
              let b = gemmInput(x.pointer, count: rows * k, for: p[0].weight.dtype) else { return false }
        var kernel = plan.kernel
        let slices = halfOut ? 1 : plan.slices
        if kernel.warpSpecialized, !encodeActivationMap(b, rows: rows, k: k) {
            // The same tiles, the activations copied by every warp (no more shared memory than
            // the warp-specialized form's, which the plan checked).
            guard let other = CUDABackend.quantGemmKernel(p[0].weight.dtype, tokens: kernel.tokens, warpSpecialized: false) else { return false }
            kernel = other
        }
        for q in p { productWrites(q.out, count: q.weight.rows * rows) }
        if slices > 1, !accumulate {
            let counts = p.map { $0.weight.rows * rows }
            launch("zero_floats", grid: blocks(counts.reduce(0, +)), block: 256) { a in
                for i in 0..<3 {
                    a.ptr(i < p.count ? p[i].out : 0)
                    a.i64(i < p.count ? counts[i] : 0)
                }
            }
        }
        quantGemmLaunches += 1
        if slices > 1 { quantGemmSplitLaunches += 1 }
        if kernel.warpSpecialized { quantGemmWarpSpecializedLaunches += 1 }
        launch(kernel.name, grid: (plan.tokenTiles, plan.rowTiles, slices), block: kernel.threads, shared: kernel.shared) { a in
            a.products(p.count) { i in (p[i].weight.pointer, p[i].bias?.pointer ?? 0, p[i].out, p[i].weight.rows) }
            a.ptr(b); a.i32(rows); a.i32(k); a.i32(accumulate ? 1 : 0); a.i32(halfOut ? 1 : 0)
            if kernel.warpSpecialized { a.tensorMap(tensorMapArgument) }
        }
        return true
    }

    /// The tensor map quant_gemm_ws's TMA copies read x (`rows` rows of k BF16 values at `x`)
    /// through, into `tensorMapArgument`: boxes of 64 values by 256 rows (a chunk of a block's
    /// tokens), with the 128-byte swizzle wgmma reads them in; rows past the end come as zeros.
    /// False if the driver has no cuTensorMapEncodeTiled or refuses the map.
    private func encodeActivationMap(_ x: CUDADriver.DevicePointer, rows: Int, k: Int) -> Bool {
        guard let encode = driver.cuTensorMapEncodeTiled, x % 16 == 0, rows > 0 else { return false }
        let dims: [UInt64] = [UInt64(k), UInt64(rows)], strides: [UInt64] = [UInt64(2 * k)]
        let box: [UInt32] = [64, 256], steps: [UInt32] = [1, 1]
        // CU_TENSOR_MAP_DATA_TYPE_UINT16 (the copies move bits; zeros past the end are BF16
        // zeros too), no interleave, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        // CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE (zeros).
        return encode(tensorMapArgument, 1, 2, UnsafeMutableRawPointer(bitPattern: UInt(x)), dims, strides, box, steps, 0, 3, 3, 0) == 0
    }

    public func matmul(_ x: CUDABuffer, rows: Int, weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer) {
        if rows == oneToken, matvecKernel(x, [(weight, bias, out)], mode: 0, norm: nil) { return }
        if usesRowKernel(rows, weight) { rowKernel(x, rows: rows, [(weight, bias, out)], mode: 0) } else {
            gemm(x, rows: rows, weight: weight, bias: bias, out: out, accumulate: false)
        }
    }

    /// One token's products of quantized weights of more than one type over one input (a
    /// Q4_K_M layer's q and k in Q4_K, v in Q6_K): the input rounded to 8 bits once (normalized
    /// first with `norm`), then a matvec launch per run of one type. False (nothing launched)
    /// when some weight has no such kernel.
    private func mixedQuantizedMatvecs(_ x: CUDABuffer, _ p: [Product], norm: (weight: CUDAWeight, eps: Float)?) -> Bool {
        let k = p[0].weight.cols
        guard p.allSatisfy({ !$0.weight.dtype.isFloat && Self.matvecSuffix($0.weight.dtype) != nil && $0.weight.cols == k
                             && k % $0.weight.dtype.blockSize == 0 }),
              Set(p.map(\.weight.dtype)).count > 1 else { return false }
        guard let q8 = quantizeActivations(x, rows: 1, k: k, norm: norm) else { return true }
        var i = 0
        while i < p.count {
            var j = i + 1
            while j < p.count, p[j].weight.dtype == p[i].weight.dtype { j += 1 }
            _ = matvecKernel(x, Array(p[i..<j]), mode: 0, norm: nil, q8: q8)
            i = j
        }
        return true
    }

    public func matmul3(_ x: CUDABuffer, rows: Int, _ a: (weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer),
                        _ b: (weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer), _ c: (weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer)) {
        if rows == oneToken, matvecKernel(x, [a, b, c], mode: 0, norm: nil) || mixedQuantizedMatvecs(x, [a, b, c], norm: nil) { return }
        if usesRowKernel(rows, a.weight), a.weight.dtype == b.weight.dtype, b.weight.dtype == c.weight.dtype {
            rowKernel(x, rows: rows, [a, b, c], mode: 0)
        } else if a.bias == nil, b.bias == nil, c.bias == nil, stacked([a.weight, b.weight, c.weight]) {
            // One product over the three matrices as one (placed together by `weights`), its rows
            // then parted: the 8B shape's q, k and v at 64 tokens took three cuBLAS products (two
            // of them split-K, with their reductions) and 29 us a layer on an H200.
            let n = a.weight.rows + b.weight.rows + c.weight.rows
            guard ensure(&stackedOut, rows * n) else { return }
            gemm(x, rows: rows, weight: CUDAWeight(dtype: a.weight.dtype, rows: n, cols: a.weight.cols, storage: a.weight.storage,
                                                   byteOffset: a.weight.byteOffset), bias: nil, out: stackedOut, accumulate: false)
            // Parted when the next launch, product or copy comes, unless that is RoPE over these
            // q, k and v, which parts the rows itself (rope_store_kv_stacked).
            pendingSplit = (stackedOut.pointer, rows, a.out, b.out, c.out, a.weight.rows, b.weight.rows, c.weight.rows)
        } else if quantGemm(x, rows: rows, [a, b, c].map { ($0.weight, $0.bias, $0.out.pointer) }, accumulate: false) {
            // q, k and v in one launch: k's and v's few weight-row tiles alone would leave most
            // of the GPU idle.
        } else if quantGemm(x, rows: rows, [a, b].map { ($0.weight, $0.bias, $0.out.pointer) }, accumulate: false) {
            matmul(x, rows: rows, weight: c.weight, bias: c.bias, out: c.out)  // Q4_K_M's v, in Q6_K where q and k are Q4_K
        } else {
            matmul(x, rows: rows, weight: a.weight, bias: a.bias, out: a.out)
            matmul(x, rows: rows, weight: b.weight, bias: b.bias, out: b.out)
            matmul(x, rows: rows, weight: c.weight, bias: c.bias, out: c.out)
        }
    }

    /// Tokens up to which a stacked gate and up run as one product (their output, twice the
    /// intermediate size a token, goes to `stackedOut`): decode steps, where the product reads
    /// the weights once for few rows.
    private static let stackedGateUpRows = 512
    /// BF16 and quantized gate and up products with BF16 outputs for the gating (see
    /// `gatedProduct`). PEREGRINE_NO_FUSED_GATE_UP=1 keeps f32 outputs, to measure against.
    private let fusedGateUp = ProcessInfo.processInfo.environment["PEREGRINE_NO_FUSED_GATE_UP"] == nil

    /// A stacked q/k/v product's rows (in `stackedOut`) not yet parted into their outputs, and
    /// the widths of the three parts.
    /// (`source` is `stackedOut`'s memory when the split was recorded: parting may happen inside
    /// `ensure(&stackedOut, ...)`, which must not read the buffer it is replacing.)
    private var pendingSplit: (source: CUDADriver.DevicePointer, rows: Int, a: CUDABuffer, b: CUDABuffer, c: CUDABuffer,
                               na: Int, nb: Int, nc: Int)?

    /// Launches a held residual product (`pendingResidual`) and parts the pending stacked rows
    /// into their three outputs (split_columns). Every launch, product, copy and read comes here
    /// first, so no one reads the outputs before they hold them.
    private func partStackedRows(scatteringStaged: Bool = true) {
        if scatteringStaged, !pendingPieces.isEmpty { scatterStaged() }
        if let p = pendingResidual {
            pendingResidual = nil
            if !matvecKernel(p.x, [(p.weight, p.bias, p.residual)], mode: 1, norm: nil), firstError == nil {
                firstError = .backend("internal: a held residual product has no kernel")
            }
        }
        guard let p = pendingSplit else { return }
        pendingSplit = nil
        launch("split_columns", grid: (p.rows, 1, 1), block: 256) { a in
            a.ptr(p.source); a.ptr(p.a); a.ptr(p.b); a.ptr(p.c); a.i32(p.na); a.i32(p.nb); a.i32(p.nc)
        }
    }

    /// A one-token residual product (`matmulAdd`) held back until the next call: if that is the
    /// RMSNorm and 16-bit q/k/v product after it (`normMatmul3`), or in a short pass the norm and
    /// gate/up (`normGatedProduct`), the two carry the norm between them (NormCarry in
    /// Kernels.cu) and no norm kernel runs; any other launch, copy or read launches it first, as
    /// it was (`partStackedRows`). Measured on an H100 (the 8B shape in BF16, BENCHMARKS.md),
    /// carried before q/k/v tg128 gained 1.0-1.6% at depths 0, 1,024 and 4,096 (0.5-1.0% to
    /// 16,384 on another H100), while carried before gate/up too it gained 2.6% at depth 0 but
    /// lost 0.5% at 1,024 and 2.3% at 4,096 (before gate/up alone: +1.3%, -1.6%, -2.6%): hence
    /// before gate/up only below `groupedAttentionFrom` positions (`carriedNormBeforeGate`).
    private var pendingResidual: (x: CUDABuffer, weight: CUDAWeight, bias: CUDAWeight?, residual: CUDABuffer)?
    /// NormCarry's `area`: the sum of squares, the count, then a partial sum a block.
    private let normCarryArea: CUDABuffer
    static let normCarryBlocks = 8192
    /// PEREGRINE_CARRIED_NORM=0 runs the norm between a residual product and the q/k/v product as
    /// its own kernel, for measuring.
    var carriedNorm = ProcessInfo.processInfo.environment["PEREGRINE_CARRIED_NORM"] != "0"
    /// The norm before gate/up carried too, in passes of one sequence shorter than
    /// `groupedAttentionFrom` (`shortSequencePass`), where the attention before the output
    /// projection is not the tensor-core one: carried everywhere it gained 2.6% at depth 0 and
    /// lost from 1,024 positions on; carried only there, tg128 gained 1.1% on an H100
    /// (BENCHMARKS.md). PEREGRINE_CARRIED_NORM=qkv carries it before q/k/v only, for measuring.
    var carriedNormBeforeGate = ProcessInfo.processInfo.environment["PEREGRINE_CARRIED_NORM"].map { $0 != "0" && $0 != "qkv" } ?? true

    /// The norm before the output head carried from the last layer's residual product
    /// (`normMatmul`), with PEREGRINE_CARRIED_HEAD=1: on an H100, BF16 tg128 of the 8B shape ran
    /// at the same speed with and without it (BENCHMARKS.md), so it stays off.
    var carriedHead = ProcessInfo.processInfo.environment["PEREGRINE_CARRIED_HEAD"] == "1"

    /// Whether a one-token residual product of `w` can produce a carried norm: a fixed-length
    /// 16-bit kernel whose rows, the next product's row length, have one too.
    private func carriesNorm(_ w: CUDAWeight) -> Bool {
        hasFixedMatvec(w.dtype, k: w.cols) && CUDABackend.fixedMatvecLengths.contains(w.rows) && w.rows / 8 <= CUDABackend.normCarryBlocks
    }

    /// The held residual product into `x` with the RMSNorm of its result by `norm` carried into
    /// the products `p` of `dim`-long rows (q, k and v; or, `gated`, gate and up, whose output is
    /// silu(gate) up in gate's `out`): false (nothing launched, the product still held) when they
    /// do not suit it.
    private func carryNorm(into x: CUDABuffer, norm: CUDAWeight, eps: Float, dim: Int, normed: CUDABuffer, _ p: [Product],
                           gated: Bool = false) -> Bool {
        guard let r = pendingResidual, r.residual === x, r.weight.rows == dim, norm.rows * norm.cols == dim,
              hasFixedMatvec(p[0].weight.dtype, k: dim), p.allSatisfy({ $0.weight.dtype == p[0].weight.dtype && $0.weight.cols == dim }),
              !gated || p.count == 2 && p[1].weight.rows == p[0].weight.rows,
              let suffix = Self.matvecSuffix(p[0].weight.dtype), let rSuffix = Self.matvecSuffix(r.weight.dtype) else { return false }
        pendingResidual = nil
        let area = normCarryArea.pointer
        launch("matvec_\(rSuffix)_k\(r.weight.cols)_carry", grid: blocks(r.weight.rows * 32), block: 256) { a in
            a.products(1) { _ in (r.weight.pointer, r.bias?.pointer ?? 0, r.residual.pointer, r.weight.rows) }
            a.ptr(r.x); a.i32(1); a.f32(0); a.ptr(norm.pointer); a.ptr(normed); a.ptr(area); a.i32(2)
        }
        // Gated (gate and up, the output silu(gate) up): a warp takes a row of each, as matvecKernel's mode 2.
        let n = gated ? [p[0].weight.rows, 0] : p.map(\.weight.rows)
        launch("matvec_" + suffix + (gated ? "_gated" : "") + "_k\(dim)_carry", grid: blocks(n.reduce(0, +) * 32), block: 256) { a in
            a.products(p.count) { i in (p[i].weight.pointer, p[i].bias?.pointer ?? 0, p[i].out.pointer, n[i]) }
            a.ptr(normed); a.i32(gated ? 2 : 0); a.f32(eps); a.ptr(0); a.ptr(0); a.ptr(area); a.i32(1)
        }
        return true
    }

    /// 16-bit matrices of one width, each right under the one before it in one allocation.
    private func stacked(_ ws: [CUDAWeight]) -> Bool {
        guard let first = ws.first, first.dtype == .f16 || first.dtype == .bf16 else { return false }
        var end = first.byteOffset
        for w in ws {
            guard w.storage === first.storage, w.dtype == first.dtype, w.cols == first.cols, w.byteOffset == end else { return false }
            end += UInt64(w.rows * w.cols * 2)
        }
        return true
    }

    public func matmulAdd(_ x: CUDABuffer, rows: Int, weight: CUDAWeight, bias: CUDAWeight?, residual: CUDABuffer, scratch: CUDABuffer) {
        if rows == oneToken, carriedNorm, carriesNorm(weight) {
            partStackedRows()
            pendingResidual = (x, weight, bias, residual)
            return
        }
        if rows == oneToken, matvecKernel(x, [(weight, bias, residual)], mode: 1, norm: nil) { return }
        if usesRowKernel(rows, weight) { rowKernel(x, rows: rows, [(weight, bias, residual)], mode: 1) } else {
            gemm(x, rows: rows, weight: weight, bias: bias, out: residual, accumulate: true)
        }
    }

    public func gatedProduct(_ x: CUDABuffer, rows: Int, gate: CUDAWeight, gateBias: CUDAWeight?, up: CUDAWeight, upBias: CUDAWeight?,
                             activation: GatedActivation, out: CUDABuffer, scratch: CUDABuffer) {
        guard activation == .silu else {
            // The fused products apply silu; other activations run after two plain products.
            matmul(x, rows: rows, weight: gate, bias: gateBias, out: out)
            matmul(x, rows: rows, weight: up, bias: upBias, out: scratch)
            gatedActivation(activation, gate: out, up: scratch, count: rows * up.rows, out: out)
            return
        }
        if rows == oneToken, up.rows == gate.rows, matvecKernel(x, [(gate, gateBias, out), (up, upBias, scratch)], mode: 2, norm: nil) { return }
        if usesRowKernel(rows, gate), gate.dtype == up.dtype {
            rowKernel(x, rows: rows, [(gate, gateBias, out), (up, upBias, scratch)], mode: 2)
        } else if fusedGateUp, gateBias == nil, upBias == nil, gate.rows == up.rows, gate.dtype == up.dtype,
                  gate.dtype == .bf16 || !gate.dtype.isFloat && halfGatingPays(rows: rows, gate, up) {
            // The products write BF16 values (cuBLAS and quant_gemm round their f32 sums), which
            // the gating reads: half the bytes of f32 each way (a 8192-token step of the 8B shape
            // wrote and read 2.6 GB a layer for it). Up to `stackedGateUpRows` tokens, BF16 gate
            // and up are one product over the two matrices where `weights` placed them together
            // (one cuBLAS product fewer a layer in a decode step), its rows [gate | up]; past
            // that, and for quantized weights (one quant_gemm launch for both, or each widened
            // to BF16 for cuBLAS), two products into the two halves of `scratch`. Not F16
            // weights: a gate past 65,504 would become infinite there, and its gating NaN, where
            // f32 keeps it finite.
            let ff = gate.rows
            let g: CUDADriver.DevicePointer, u: CUDADriver.DevicePointer, stride: Int
            if rows <= CUDABackend.stackedGateUpRows, stacked([gate, up]) {
                guard ensure(&stackedOut, rows * ff) else { return }  // rows x 2ff 16-bit values
                gemm(x, rows: rows, weight: CUDAWeight(dtype: gate.dtype, rows: 2 * ff, cols: gate.cols, storage: gate.storage,
                                                       byteOffset: gate.byteOffset), bias: nil, out: stackedOut, accumulate: false, halfOut: true)
                (g, u, stride) = (stackedOut.pointer, stackedOut.pointer + UInt64(2 * ff), 2 * ff)
            } else {
                let upOut = scratch.pointer + UInt64(2 * rows * ff)
                if gate.dtype.isFloat || !quantGemm(x, rows: rows, [(gate, nil, scratch.pointer), (up, nil, upOut)], accumulate: false,
                                                    halfOut: true) {
                    gemm(x, rows: rows, weight: gate, bias: nil, out: scratch, accumulate: false, halfOut: true)
                    gemm(x, rows: rows, weight: up, bias: nil, out: scratch, outPointer: upOut, accumulate: false, halfOut: true)
                }
                (g, u, stride) = (scratch.pointer, upOut, ff)
            }
            // The down projection that reads `out` is of the gate's type in the families we load;
            // `out` is written in f32 too, for any other reader.
            let half = halfTwin(of: out, count: rows * ff, rows: rows, consumer: gate)
            launch("silu_mul_16", grid: blocks(rows * ff), block: 256) { a in
                a.ptr(g); a.ptr(u); a.i32(ff); a.i32(stride); a.ptr(out); a.i64(rows * ff)
                a.ptr(half?.pointer ?? 0); a.i32(Int(half?.code ?? 0))
            }
            if let half { halfHolds = (out.pointer, rows * ff, half.code) }
        } else {
            if !quantGemm(x, rows: rows, [(gate, gateBias, out.pointer), (up, upBias, scratch.pointer)], accumulate: false) {
                matmul(x, rows: rows, weight: gate, bias: gateBias, out: out)
                matmul(x, rows: rows, weight: up, bias: upBias, out: scratch)
            }
            // The down projection that reads `out` is of the gate's type in the families we load.
            siluMul(gate: out, up: scratch, count: rows * up.rows, out: out, rows: rows, for: gate)
        }
    }

    /// Whether quantized gate and up should write BF16 for the gating: unless quant_gemm would
    /// part k among slices for a launch whose tiles alone do not fill the GPU (a small model's
    /// few tokens), as BF16 outputs are never split. With tiles enough (the 8B shape's 224 at 16
    /// to 256 tokens) one slice writing BF16 measured as fast as two in f32 at 16 sequences, and
    /// 3-6% faster at 64 and 256 (BENCHMARKS.md).
    private func halfGatingPays(rows: Int, _ gate: CUDAWeight, _ up: CUDAWeight) -> Bool {
        guard let plan = quantGemmPlan(rows: rows, [gate, up]) else { return true }
        return plan.slices == 1 || plan.tiles >= driver.multiprocessors
    }

    public func normMatmul3(_ x: CUDABuffer, norm: CUDAWeight, eps: Float, dim: Int, normed: CUDABuffer, rows: Int,
                            _ a: (weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer), _ b: (weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer),
                            _ c: (weight: CUDAWeight, bias: CUDAWeight?, out: CUDABuffer)) {
        if rows == oneToken, carryNorm(into: x, norm: norm, eps: eps, dim: dim, normed: normed, [a, b, c]) { return }
        if rows == oneToken, fusesNorm(a.weight),
           matvecKernel(x, [a, b, c], mode: 0, norm: (norm, eps)) || mixedQuantizedMatvecs(x, [a, b, c], norm: (norm, eps)) { return }
        rmsNorm(x, weight: norm, eps: eps, rows: rows, dim: dim, out: normed, for: a.weight)
        matmul3(normed, rows: rows, a, b, c)
    }

    /// The output head of a one-token pass; with PEREGRINE_CARRIED_HEAD=1 the norm is carried from
    /// the last layer's held residual product, so it runs as no kernel of its own (`carriedHead`:
    /// no faster on an H100, so off).
    public func normMatmul(_ x: CUDABuffer, norm: CUDAWeight, eps: Float, dim: Int, normed: CUDABuffer, rows: Int, weight: CUDAWeight,
                           out: CUDABuffer) {
        if rows == oneToken, carriedNorm, carriedHead, carryNorm(into: x, norm: norm, eps: eps, dim: dim, normed: normed, [(weight, nil, out)]) {
            return
        }
        rmsNorm(x, weight: norm, eps: eps, rows: rows, dim: dim, out: normed, for: weight)
        matmul(normed, rows: rows, weight: weight, bias: nil, out: out)
    }

    public func normGatedProduct(_ x: CUDABuffer, norm: CUDAWeight, eps: Float, dim: Int, normed: CUDABuffer, rows: Int, gate: CUDAWeight,
                                 gateBias: CUDAWeight?, up: CUDAWeight, upBias: CUDAWeight?, activation: GatedActivation,
                                 out: CUDABuffer, scratch: CUDABuffer) {
        if rows == oneToken, carriedNorm, carriedNormBeforeGate, shortSequencePass, activation == .silu,
           carryNorm(into: x, norm: norm, eps: eps, dim: dim, normed: normed, [(gate, gateBias, out), (up, upBias, scratch)], gated: true) {
            return
        }
        if rows == oneToken, fusesNorm(gate), activation == .silu, up.rows == gate.rows,
           matvecKernel(x, [(gate, gateBias, out), (up, upBias, scratch)], mode: 2, norm: (norm, eps)) { return }
        rmsNorm(x, weight: norm, eps: eps, rows: rows, dim: dim, out: normed, for: gate)
        gatedProduct(normed, rows: rows, gate: gate, gateBias: gateBias, up: up, upBias: upBias, activation: activation,
                     out: out, scratch: scratch)
    }

    public func rope(_ x: CUDABuffer, rows: Int, heads: Int, headDim: Int, rotaryDim: Int, cos: CUDABuffer, sin: CUDABuffer,
                     interleaved: Bool) {
        launch("rope", grid: blocks(rows * heads * rotaryDim / 2), block: 256) { a in
            a.ptr(x); a.ptr(cos); a.ptr(sin); a.i32(rows); a.i32(heads); a.i32(headDim); a.i32(rotaryDim); a.i32(interleaved ? 1 : 0)
        }
    }

    public func storeKV(layer: Int, k: CUDABuffer, v: CUDABuffer, rows: Int, plan: BatchPlan, cache: KVStorage<CUDABackend>) {
        let (slots, positions, tables) = planPointers(plan, rows: rows)
        launch("store_kv", grid: (rows, 1, 1), block: 128) { a in
            a.ptr(k); a.ptr(v); a.ptr(cache.keys[layer]); a.ptr(cache.values[layer]); a.ptr(slots); a.ptr(positions)
            a.i32(cache.rowSize); a.ptr(tables); a.i32(plan.tableWidth); a.i32(cache.blockSize); a.i32(cache.halfPrecision)
        }
    }

    public func ropeStoreKV(layer: Int, q: CUDABuffer, k: CUDABuffer, v: CUDABuffer, rows: Int, heads: Int, headDim: Int,
                            rotaryDim: Int, cos: CUDABuffer, sin: CUDABuffer, interleaved: Bool, plan: BatchPlan,
                            cache: KVStorage<CUDABackend>) {
        let (slots, positions, tables) = planPointers(plan, rows: rows)
        if let p = pendingSplit, p.a === q, p.b === k, p.c === v, p.rows == rows, p.na == heads * headDim, p.nb == cache.kvHeads * headDim,
           p.nc == p.nb {
            // q, k and v are still one product's stacked rows: parted here, with RoPE and the cache write.
            pendingSplit = nil
            launch("rope_store_kv_stacked", grid: (rows, (heads + cache.kvHeads + 3) / 4, 1), block: 256) { a in  // ROPE_HEADS
                a.ptr(p.source); a.ptr(q); a.ptr(k); a.ptr(v); a.ptr(cache.keys[layer]); a.ptr(cache.values[layer]); a.ptr(cos)
                a.ptr(sin); a.ptr(slots); a.ptr(positions); a.i32(heads); a.i32(cache.kvHeads); a.i32(headDim); a.i32(rotaryDim)
                a.ptr(tables); a.i32(plan.tableWidth); a.i32(cache.blockSize); a.i32(interleaved ? 1 : 0); a.i32(cache.halfPrecision)
            }
            return
        }
        launch("rope_store_kv", grid: (rows, heads + cache.kvHeads, 1), block: min(256, max(32, (headDim / 2 + 31) / 32 * 32))) { a in
            a.ptr(q); a.ptr(k); a.ptr(v); a.ptr(cache.keys[layer]); a.ptr(cache.values[layer]); a.ptr(cos); a.ptr(sin); a.ptr(slots)
            a.ptr(positions); a.i32(heads); a.i32(cache.kvHeads); a.i32(headDim); a.i32(rotaryDim); a.ptr(tables); a.i32(plan.tableWidth)
            a.i32(cache.blockSize); a.i32(interleaved ? 1 : 0); a.i32(cache.halfPrecision)
        }
    }

    /// One token: RoPE and the KV-cache write happen inside the attention kernel (one launch),
    /// its grouped attention on tensor cores (from `groupedAttentionFrom` positions, an F16
    /// cache) too, unless PEREGRINE_FUSED_DEPTH_ROPE=0 has rope_store_kv do them first.
    public func ropeAttention(layer: Int, q: CUDABuffer, k: CUDABuffer, v: CUDABuffer, rows: Int, heads: Int, headDim: Int,
                              rotaryDim: Int, cos: CUDABuffer, sin: CUDABuffer, interleaved: Bool, plan: BatchPlan,
                              cache: KVStorage<CUDABackend>, window: Int?, scoring: AttentionScoring, out: CUDABuffer) {
        let longest = rows == 1 ? min(Int(plan.positions[0]) + 1, window ?? Int.max) : 0
        if rows == oneToken, fusedDepthRope || !(heads > cache.kvHeads && longest >= groupedAttentionFrom && tensorCoreDecode(cache)) {
            attention(layer: layer, q: q, rows: rows, plan: plan, cache: cache, heads: heads, window: window, scoring: scoring, out: out,
                      rope: (k, v, cos, sin, rotaryDim, interleaved))
            return
        }
        ropeStoreKV(layer: layer, q: q, k: k, v: v, rows: rows, heads: heads, headDim: headDim, rotaryDim: rotaryDim, cos: cos, sin: sin,
                    interleaved: interleaved, plan: plan, cache: cache)
        attention(layer: layer, q: q, rows: rows, plan: plan, cache: cache, heads: heads, window: window, scoring: scoring, out: out)
    }

    public func attention(layer: Int, q: CUDABuffer, rows: Int, plan: BatchPlan, cache: KVStorage<CUDABackend>,
                          heads: Int, window: Int?, scoring: AttentionScoring, out: CUDABuffer) {
        attention(layer: layer, q: q, rows: rows, plan: plan, cache: cache, heads: heads, window: window, scoring: scoring, out: out,
                  rope: nil)
    }

    private func attention(layer: Int, q: CUDABuffer, rows: Int, plan: BatchPlan, cache: KVStorage<CUDABackend>, heads: Int,
                           window: Int?, scoring: AttentionScoring, out: CUDABuffer,
                           rope: (k: CUDABuffer, v: CUDABuffer, cos: CUDABuffer, sin: CUDABuffer, rotaryDim: Int, interleaved: Bool)?) {
        let hd = cache.headDim
        guard hd <= 256, hd % 4 == 0, heads % cache.kvHeads == 0 else {
            if firstError == nil {
                firstError = .unsupported("the CUDA attention kernels take head dimensions up to 256, multiples of 4, and whole query-head groups (this model: \(hd), \(heads) / \(cache.kvHeads) heads)")
            }
            return
        }
        let (slots, positions, tables) = planPointers(plan, rows: rows)
        let scale = scoring.scale, softCap = scoring.softCap ?? 0
        var rowMap: CUDADriver.DevicePointer = 0, splitRows = rows
        if rows > 16 || deterministic {
            // Tiles of consecutive positions of one sequence: up to 64 rows for the tensor-core
            // kernel (its query heads a block times positions), 32 for the f32 one.
            let tileRows = tensorCoreAttention(cache) ? (warpgroupAttention(cache)?.rows ?? 64) / promptHeadGroup(heads: heads, kvHeads: cache.kvHeads) : 32
            hostInts.removeAll(keepingCapacity: true)
            var t = 0
            while t < rows {
                var count = 1
                while count < tileRows, t + count < rows, plan.slots[t + count] == plan.slots[t],
                      plan.positions[t + count] == plan.positions[t + count - 1] + 1 { count += 1 }
                hostInts.append(Int32(t))
                hostInts.append(Int32(count))
                t += count
            }
            let tiles = hostInts.count / 2
            if deterministic {
                prefillAttention(layer: layer, q: q, cache: cache, plan: plan, heads: heads, scale: scale, softCap: softCap, window: window, out: out,
                                 slots: slots, positions: positions, tables: tables, tiles: tiles)
                return
            }
            // Single queries (decode tokens, one a sequence) go to the split kernel below, which
            // spreads each query's keys over the GPU; runs of a prompt to flash attention by tiles.
            singleRows.removeAll(keepingCapacity: true)
            var kept = 0
            for i in 0..<tiles {
                let first = hostInts[2 * i], count = hostInts[2 * i + 1]
                if count == 1 { singleRows.append(first) } else {
                    hostInts[2 * kept] = first
                    hostInts[2 * kept + 1] = count
                    kept += 1
                }
            }
            if kept > 0 {
                hostInts.removeLast(hostInts.count - 2 * kept)
                prefillAttention(layer: layer, q: q, cache: cache, plan: plan, heads: heads, scale: scale, softCap: softCap, window: window, out: out,
                                 slots: slots, positions: positions, tables: tables, tiles: kept)
            }
            if singleRows.isEmpty { return }
            guard singleRows.count * heads <= CUDABackend.attentionCounterCount else {
                // More single queries than the split kernel has counters for: flash attention for them too.
                hostInts.removeAll(keepingCapacity: true)
                for r in singleRows { hostInts.append(r); hostInts.append(1) }
                prefillAttention(layer: layer, q: q, cache: cache, plan: plan, heads: heads, scale: scale, softCap: softCap, window: window, out: out,
                                 slots: slots, positions: positions, tables: tables, tiles: singleRows.count)
                return
            }
            // A decode step's rows are all single queries, in order: no map (and no copy of one
            // into every layer of its graph).
            if singleRows.count < rows {
                rowMap = singleRows.withUnsafeBufferPointer { upload($0, into: &mapInts) }
                layersStaged = true
            }
            splitRows = singleRows.count
        }
        var longest = 0
        for t in 0..<rows { longest = max(longest, Int(plan.positions[t]) + 1) }
        if let window { longest = min(longest, window) }
        // A decode step splits by the cache's capacity, not the sequence's length, so its work
        // (and a graph of it) is the same at every position; each split's share of the positions
        // is worked out on the device from the length. Enough (token, head, split) blocks to fill
        // the GPU, more for long caches (`splitPositions` a split), none under 32 positions.
        // attention_split: a block takes one KV head and up to eight of its query heads
        // (SPLIT_GROUP in Kernels.cu), reading the KV head once for all of them, so a split has
        // rows x kvHeads x parts blocks; about four a multiprocessor keep the memory busy while
        // each block alternates between loading a tile and working on it. When that is too few
        // blocks to spread a small batch's keys over the GPU (or with one query head a KV head),
        // attention_split_heads: a block per query head, each reading its KV head; but one
        // sequence from `groupedAttentionFrom` positions on takes attention_split all the same.
        let basis = rows == 1 ? min(window ?? cache.capacity, cache.capacity) : CUDABackend.splitBasis(longest)
        let group = heads / cache.kvHeads, parts = (group + 7) / 8
        // attention_split copies rows in 16-byte pieces: 8 f16 or 4 f32 values.
        let rowBytes = hd * cache.type.bytes
        let grouped = group > 1 && rowBytes % 16 == 0
            && (splitRows * cache.kvHeads * parts >= groupedAttentionBlocks || splitRows == 1 && longest >= groupedAttentionFrom)
        let blocksPerSplit = grouped ? splitRows * cache.kvHeads * parts : splitRows * heads
        // Grouped attention over an F16 cache on tensor cores: in a large batch, attention_split
        // is bound by its arithmetic (H200, 256 sequences of 192 positions on average, the 8B
        // shape: 162 us a layer, a quarter of the copy rate; attention_decode_mma with four warps
        // a block: 75 us). One token's RoPE and cache write are fused here too (`fused` 1).
        let tensorCores = grouped && tensorCoreDecode(cache)
        // The tensor-core kernel's blocks take more shared memory, and each split costs a merge:
        // half as many blocks. H200, 8B shape, 64 sequences of 128-256 positions (512 blocks a
        // split), total tok/s of PP 128 / TG 128 with 1, 2 and 4 splits: 16,721, 16,443, 16,150.
        let fill = ((tensorCores ? 2 : grouped ? 4 : 2) * driver.multiprocessors + blocksPerSplit - 1) / blocksPerSplit
        // One sequence on the tensor cores: splits of at least 128 positions, at most 64 (32 with
        // four warps a block, below). The
        // last block of a KV head's group merges every split's partial rows of its query heads,
        // so many splits of a few positions cost more in the merge than they save. H200, a
        // Qwen3-30B-A3B-shaped layer (4 KV heads, 8 query heads each) at depth 4,096, tg64 tok/s
        // by splits (8, 16, 32, 64, 128): BF16 670, 756, 746, 749, 665; Q4_K_M 769, 822, 881,
        // 843, 775 (128 had been the rule's: enough blocks to fill the GPU four times). The 8B
        // shape at depth 16,384 measured 66 splits faster than 128 too (see `splitPositions`).
        // With four warps a block (one sequence), at most 32 splits: H200, 8B shape, one run, tg64
        // tok/s by splits (default, 16, 32, 64, 128) at depth 16,384: two warps 176.0, 159.7, 175.2,
        // 173.7, 168.3; four 172.4 (64 splits), 175.2, 178.1, 175.1, 168.6.
        let warps = tensorCoreDecodeWarps ?? (splitRows == 1 ? 4 : 2)
        let splits = decodeSplits.map { max(1, min($0, 128)) }
            ?? (splitRows == 1 && tensorCores ? max(1, min((basis + 127) / 128, warps == 4 ? 32 : 64))
                : max(1, min((basis + 31) / 32, max(fill, (basis + splitPositions - 1) / splitPositions), 128)))  // SPLIT_MAX
        guard splitRows * heads <= CUDABackend.attentionCounterCount else {
            if firstError == nil { firstError = .unsupported("\(rows) tokens x \(heads) heads is past the attention kernel's counters") }
            return
        }
        guard ensure(&scratch, splitRows * heads * splits * (hd + 2)) else { return }
        let stats = scratch.pointer + UInt64(splitRows * heads * splits * hd * 4)
        // attention_split: two buffers of a tile's 32 key rows (padded by 16 bytes) and value rows
        // as stored, the group's queries and the token's key as float4s; then the tile's
        // probabilities (8 x 32 floats) and the two tiles' key offsets (SPLIT_KEYS, SPLIT_GROUP
        // in Kernels.cu). attention_decode_mma: `stages` buffers of 16 x warps key and value rows
        // (DT_KEYS), padded by 16 bytes, and their keys' offsets; three only where they fit (104 KB
        // for D = 128: not on GPUs with 99 KB a block).
        let quads = hd / 4, chunks = rowBytes / 16, tileKeys = 16 * warps
        let tiles = { (stages: Int) in stages * 2 * tileKeys * (hd + 8) * 2 + stages * tileKeys * 8 }
        // With RoPE fused: the token's key and value in f16 and its query heads in f32 after them.
        let ropeRows = tensorCores && rope != nil ? 2 * hd * 2 + 8 * hd * 4 : 0  // SPLIT_GROUP
        let wanted = warps == 4 ? tensorCoreDecodeStages ?? (splitRows == 1 ? 3 : 2) : 2
        let stages = wanted == 3 && tiles(3) + ropeRows > CUDABackend.dynamicSharedLimit(driver) ? 2 : wanted
        let shared = tensorCores ? tiles(stages) + ropeRows
            : grouped ? 16 * (2 * 32 * (chunks + 1) + 2 * 32 * chunks + 8 * quads + quads) + 4 * 8 * 32 + 8 * 2 * 32 : 0
        let kernel = tensorCores ? "attention_decode_mma_\(hd)" + (warps == 4 ? stages == 3 ? "_w4s3" : "_w4" : "") : grouped ? "attention_split" : "attention_split_heads"
        // One sequence's one token: every key but its own was written before this step, so the
        // tensor-core kernel copies tiles of older keys before waiting for rope_store_kv.
        let oldKeysEarly = tensorCores && rope == nil && rows == oneToken && earlyDecodeKeys
        launch(kernel, grid: (splitRows, grouped ? cache.kvHeads * parts : heads, splits), block: tensorCores ? 32 * warps : 128,
               shared: shared) { a in
            a.ptr(q); a.ptr(cache.keys[layer]); a.ptr(cache.values[layer]); a.ptr(scratch); a.ptr(stats); a.ptr(slots); a.ptr(positions)
            a.i32(heads); a.i32(cache.kvHeads); a.i32(hd); a.ptr(tables); a.i32(plan.tableWidth); a.i32(cache.blockSize)
            a.f32(scale); a.f32(softCap); a.i32(window ?? 0); a.i32(splits)
            a.ptr(out); a.ptr(attentionCounters); a.i32(rope != nil ? 1 : oldKeysEarly ? 2 : 0)
            a.ptr(rope?.k.pointer ?? 0); a.ptr(rope?.v.pointer ?? 0)
            a.ptr(rope?.cos.pointer ?? 0); a.ptr(rope?.sin.pointer ?? 0); a.i32(rope?.rotaryDim ?? hd); a.i32(rope?.interleaved == true ? 1 : 0)
            a.ptr(rowMap)
            if !tensorCores { a.i32(cache.halfPrecision) }
        }
    }

    /// Head dimensions the tensor-core prompt attention is compiled for (`attention_prefill_mma_D`).
    static let tensorCoreAttentionDims = [64, 96, 128, 256]

    /// Query heads of one KV head that a block of attention_prefill_mma takes together (`gq` in
    /// Kernels.cu), at 64 / gq positions each: the largest power of two up to 16 that divides the
    /// group, so a key/value tile copied from L2 serves that many heads instead of one.
    /// PEREGRINE_NO_GROUPED_PROMPT_ATTENTION=1 keeps one head a block, for measuring.
    func promptHeadGroup(heads: Int, kvHeads: Int) -> Int {
        guard groupedPromptAttention, kvHeads > 0 else { return 1 }
        let group = heads / kvHeads
        var gq = 1
        while gq < 16 && group % (2 * gq) == 0 { gq *= 2 }
        return gq
    }

    /// Whether single queries that take the grouped decode attention run on tensor cores: an F16
    /// cache, Ampere or later, a head dimension attention_decode_mma is compiled for, and not
    /// --deterministic.
    func tensorCoreDecode(_ cache: KVStorage<CUDABackend>) -> Bool {
        cache.type == .f16 && !deterministic && driver.computeCapability.major >= 8 && tensorCoreDecodeAllowed
            && CUDABackend.tensorCoreDecodeDims.contains(cache.headDim)
    }

    /// Whether prompts attend on tensor cores: an F16 cache (whose keys and values are already
    /// what the f16 products take), Ampere or later, a head dimension it is compiled for whose
    /// tiles fit the device's shared memory (256-wide heads do not on GPUs with 99 KB a block),
    /// and not --deterministic (whose one kernel for every query keeps f32 scores).
    /// PEREGRINE_NO_TENSOR_CORE_ATTENTION=1 keeps the f32 kernel.
    func tensorCoreAttention(_ cache: KVStorage<CUDABackend>) -> Bool {
        cache.type == .f16 && !deterministic && driver.computeCapability.major >= 8 && tensorCoreAttentionAllowed
            && CUDABackend.tensorCoreAttentionDims.contains(cache.headDim)
            && CUDABackend.promptAttentionShared(headDim: cache.headDim) <= CUDABackend.dynamicSharedLimit(driver)
    }

    /// One of the warpgroup-MMA prompt attention kernels (attention_prefill_wgmma in Kernels.cu):
    /// blocks of `warpgroups` x 64 query rows over key tiles of `keys` positions, a tile's softmax
    /// overlapped with the last one's P V or not (the kernel's name says).
    public struct WarpgroupAttentionKernel: Sendable {
        public let name: String
        let keys: Int
        let warpgroups: Int
        var rows: Int { 64 * warpgroups }
        var threads: Int { 128 * warpgroups }
        /// The queries and two buffers of keys and values (128-wide f16 rows, unpadded), 1 KB to
        /// align them to 1,024 bytes (the swizzle pattern's period), and three tiles' row offsets.
        var shared: Int { (rows + 4 * keys) * 128 * 2 + 1024 + 3 * keys * 8 }
    }

    /// The measuring switches that take a value (the properties above read them), checked before
    /// anything runs: a mistyped value would otherwise fall back to the default without a word,
    /// and a measurement would compare the default with itself. An empty value counts as unset.
    static func checkMeasuringSwitches(_ env: [String: String]) throws {
        func check(_ name: String, _ accepted: String, _ valid: (String) -> Bool) throws {
            // Empty is unset, as a shell's `NAME= command` means.
            guard let value = env[name], !value.isEmpty, !valid(value) else { return }
            throw PeregrineError.invalidArgument("\(name)=\(value): expected \(accepted)")
        }
        func number(_ v: String, _ range: ClosedRange<Int>) -> Bool { Int(v).map(range.contains) ?? false }
        func choice(_ name: String, _ choices: [Int]) throws {
            try check(name, choices.map(String.init).joined(separator: " or ")) { v in Int(v).map(choices.contains) ?? false }
        }
        // A switch that is on or off: exactly "0" or "1".
        func flag(_ name: String) throws { try check(name, "0 or 1") { $0 == "0" || $0 == "1" } }
        try check("PEREGRINE_ROW_KERNEL_TOKENS", "a number of tokens (0 or more)") { number($0, 0...Int.max) }
        try check("PEREGRINE_GROUPED_ATTENTION_BLOCKS", "a number of blocks (1 or more)") { number($0, 1...Int.max) }
        try check("PEREGRINE_GROUPED_ATTENTION_FROM", "a position (0 or more)") { number($0, 0...Int.max) }
        try choice("PEREGRINE_DECODE_WARPS", decodeWarpChoices)
        try choice("PEREGRINE_DECODE_STAGES", decodeStageChoices)
        try check("PEREGRINE_SPLIT_POSITIONS", "a number of positions (1 or more)") { number($0, 1...Int.max) }
        try check("PEREGRINE_DECODE_SPLITS", "a number of splits from 1 to 128") { number($0, 1...128) }
        try flag("PEREGRINE_QUANT_GEMM")
        try choice("PEREGRINE_QUANT_GEMM_TOKENS", quantGemmTokenChoices)
        try flag("PEREGRINE_QUANT_GEMM_WS")
        try flag("PEREGRINE_FIXED_MATVEC")
        try check("PEREGRINE_CARRIED_NORM", "0, 1 or qkv") { $0 == "0" || $0 == "1" || $0 == "qkv" }
        try flag("PEREGRINE_EARLY_DECODE_KEYS")
        try flag("PEREGRINE_FUSED_DEPTH_ROPE")
        try flag("PEREGRINE_CHAINED_STEPS")
        try flag("PEREGRINE_INPUT_SCATTER")
        try flag("PEREGRINE_CARRIED_HEAD")
        let kernels = warpgroupAttentionKernels.map { $0.name.replacingOccurrences(of: "attention_prefill_wgmma_128_", with: "") }
            .filter { !$0.hasPrefix("attention_") }
        try check("PEREGRINE_WGMMA_PROMPT_ATTENTION", "0 (mma.sync), 1 (the first kernel) or one of " + kernels.joined(separator: ", ")) {
            $0 == "0" || $0 == "1" || kernels.contains($0)
        }
    }

    /// The value of a measuring switch among `choices`; nil where it is unset (or names none of
    /// them, which checkMeasuringSwitches refuses when the backend starts).
    static func measuringChoice(_ name: String, _ choices: [Int]) -> Int? {
        choices.first { $0 == Int(ProcessInfo.processInfo.environment[name] ?? "") }
    }

    /// The warpgroup-MMA prompt attention kernels Kernels.cu compiles (ATTENTION_PREFILL_WGMMA).
    public static let warpgroupAttentionKernels = [
        WarpgroupAttentionKernel(name: "attention_prefill_wgmma_128", keys: 64, warpgroups: 1),
        WarpgroupAttentionKernel(name: "attention_prefill_wgmma_128_overlap", keys: 64, warpgroups: 1),
        WarpgroupAttentionKernel(name: "attention_prefill_wgmma_128_wg2", keys: 64, warpgroups: 2),
        WarpgroupAttentionKernel(name: "attention_prefill_wgmma_128_wg2_overlap", keys: 64, warpgroups: 2),
        WarpgroupAttentionKernel(name: "attention_prefill_wgmma_128_kt128_wg2_overlap", keys: 128, warpgroups: 2),
        WarpgroupAttentionKernel(name: "attention_prefill_wgmma_128_kt128_wg2", keys: 128, warpgroups: 2),
    ]

    /// The warpgroup-MMA kernel a prompt's tensor-core attention takes, if any: one chosen, a
    /// compute capability 9.0 device (the kernels use sm_90a's wgmma), 128-wide heads, and its
    /// shared memory within the device's.
    func warpgroupAttention(_ cache: KVStorage<CUDABackend>) -> WarpgroupAttentionKernel? {
        guard let kernel = warpgroupPromptAttention, driver.computeCapability == (9, 0), cache.headDim == 128,
              kernel.shared <= CUDABackend.dynamicSharedLimit(driver) else { return nil }
        return kernel
    }

    /// attention_prefill_mma's shared memory: the queries (64 rows) and two buffers of keys and
    /// values (64 positions, 32 for 256-wide heads), f16 rows padded by 8, and the two tiles' row
    /// offsets (FA_ROWS and KT in Kernels.cu).
    static func promptAttentionShared(headDim hd: Int) -> Int {
        let keys = hd > 128 ? 32 : 64
        return (64 + 4 * keys) * (hd + 8) * 2 + 2 * keys * 8
    }

    /// Flash attention over the tiles in `hostInts` (first row, count; consecutive positions of one sequence).
    private func prefillAttention(layer: Int, q: CUDABuffer, cache: KVStorage<CUDABackend>, plan: BatchPlan, heads: Int, scale: Float,
                                  softCap: Float, window: Int?, out: CUDABuffer, slots: CUDADriver.DevicePointer, positions: CUDADriver.DevicePointer,
                                  tables: CUDADriver.DevicePointer, tiles: Int) {
        let hd = cache.headDim
        var table = singleRowTiles.pointer
        if tiles != plan.count || tiles > singleRowTiles.count / 2 {
            table = hostInts.withUnsafeBufferPointer { upload($0, into: &tileInts) }
            layersStaged = true
        }
        if tensorCoreAttention(cache) {
            let gq = promptHeadGroup(heads: heads, kvHeads: cache.kvHeads)
            let warpgroup = warpgroupAttention(cache)
            launch(warpgroup?.name ?? "attention_prefill_mma_\(hd)", grid: (tiles, heads / gq, 1), block: warpgroup?.threads ?? 128,
                   shared: warpgroup?.shared ?? CUDABackend.promptAttentionShared(headDim: hd)) { a in
                a.ptr(q); a.ptr(cache.keys[layer]); a.ptr(cache.values[layer]); a.ptr(out); a.ptr(slots); a.ptr(positions); a.ptr(table)
                a.i32(heads); a.i32(cache.kvHeads); a.ptr(tables); a.i32(plan.tableWidth); a.i32(cache.blockSize)
                a.f32(scale); a.f32(softCap); a.i32(window ?? 0); a.i32(gq)
            }
            return
        }
        let shared = (32 * hd + 32 * (hd + 1) + 32 * hd + 4 * 8 * 32) * 4
        launch("attention_prefill", grid: (tiles, heads, 1), block: 128, shared: shared) { a in
            a.ptr(q); a.ptr(cache.keys[layer]); a.ptr(cache.values[layer]); a.ptr(out); a.ptr(slots); a.ptr(positions); a.ptr(table)
            a.i32(heads); a.i32(cache.kvHeads); a.i32(hd); a.ptr(tables); a.i32(plan.tableWidth); a.i32(cache.blockSize)
            a.f32(scale); a.f32(softCap); a.i32(window ?? 0); a.i32(cache.halfPrecision)
        }
    }

    public func siluMul(gate: CUDABuffer, up: CUDABuffer, count: Int, out: CUDABuffer) {
        siluMul(gate: gate, up: up, count: count, out: out, rows: 0, for: nil)
    }

    /// silu(gate) * up, with the 16-bit copy a cuBLAS product of `consumer` over `rows` tokens reads.
    private func siluMul(gate: CUDABuffer, up: CUDABuffer, count: Int, out: CUDABuffer, rows: Int, for consumer: CUDAWeight?) {
        let half = halfTwin(of: out, count: count, rows: rows, consumer: consumer)
        launch("silu_mul", grid: blocks(count), block: 256) { a in
            a.ptr(gate); a.ptr(up); a.ptr(out); a.i64(count); a.ptr(half?.pointer ?? 0); a.i32(Int(half?.code ?? 0))
        }
        if let half { halfHolds = (out.pointer, count, half.code) }
    }

    public func geluTanhMul(gate: CUDABuffer, up: CUDABuffer, count: Int, out: CUDABuffer) {
        launch("gelu_tanh_mul", grid: blocks(count), block: 256) { a in a.ptr(gate); a.ptr(up); a.ptr(out); a.i64(count) }
    }

    public func scale(_ x: CUDABuffer, count: Int, by factor: Float) {
        launch("scale_inplace", grid: blocks(count), block: 256) { a in a.ptr(x); a.f32(factor); a.i64(count) }
    }

    public func softCap(_ x: CUDABuffer, count: Int, cap: Float) {
        launch("soft_cap_inplace", grid: blocks(count), block: 256) { a in a.ptr(x); a.f32(cap); a.i64(count) }
    }

    public func add(_ x: CUDABuffer, _ y: CUDABuffer, count: Int) {
        launch("add_inplace", grid: blocks(count), block: 256) { a in a.ptr(x); a.ptr(y); a.i64(count) }
    }

    public func gatherRows(_ x: CUDABuffer, rows: UnsafeBufferPointer<Int32>, dim: Int, out: CUDABuffer) {
        let r = upload(rows, into: &rowInts)
        launch("gather_rows", grid: (rows.count, 1, 1), block: 256) { a in a.ptr(x); a.ptr(r); a.ptr(out); a.i32(dim) }
    }

    public func copy(_ src: CUDABuffer, offset srcOffset: Int, to dst: CUDABuffer, offset dstOffset: Int, count: Int) {
        bindContext()
        partStackedRows()
        forgetCopies()
        guard count > 0 else { return }
        record(driver.cuMemcpyDtoDAsync(dst.pointer + UInt64(dstOffset * 4), src.pointer + UInt64(srcOffset * 4), count * 4, stream),
               "cuMemcpyDtoDAsync")
    }

    // MARK: mixture of experts

    public func experts(gate: [TensorView], up: [TensorView], down: [TensorView]) throws -> CUDAExperts {
        bindContext()
        let (d, ff) = try checkExpertTensors(gate: gate, up: up, down: down)
        guard gate.count <= CUDAExperts.maxExperts else {
            throw PeregrineError.unsupported("\(gate.count) experts a layer; the CUDA backend groups at most \(CUDAExperts.maxExperts)")
        }
        let g = try gate.map(weight), u = try up.map(weight), dn = try down.map(weight)
        func table(_ w: [CUDAWeight]) throws -> CUDABuffer {
            try w.map { UInt64($0.pointer) }.withUnsafeBytes { try deviceCopy(of: $0.baseAddress!, bytes: $0.count) }
        }
        let reads = try CUDABuffer(driver: driver, count: gate.count)
        try driver.check(driver.cuMemsetD8Async(reads.pointer, 0, gate.count * 4, stream), "cuMemsetD8Async")
        try driver.check(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
        return CUDAExperts(gate: g, up: u, down: dn, gateTable: try table(g), upTable: try table(u), downTable: try table(dn),
                           reads: reads, hidden: d, intermediate: ff)
    }

    public func routeTopK(_ logits: CUDABuffer, rows: Int, experts: Int, k: Int, normalize: Bool, routes: CUDABuffer) {
        launch("moe_route", grid: blocks(rows * 32), block: 256) { a in
            a.ptr(logits); a.i32(rows); a.i32(experts); a.i32(k); a.i32(normalize ? 1 : 0); a.ptr(routes)
        }
    }

    /// Rows a decode step may have for a MoE layer's norm, router product and routing to run as
    /// one moe_router launch.
    private static let routerRows = 64
    /// PEREGRINE_NO_FUSED_ROUTER=1 keeps the three launches (to measure the fusion against).
    private let fusedRouter = ProcessInfo.processInfo.environment["PEREGRINE_NO_FUSED_ROUTER"] == nil

    public func normRoute(_ x: CUDABuffer, norm: CUDAWeight, eps: Float, rows: Int, dim: Int, router: CUDAWeight, experts: CUDAExperts,
                          count: Int, k: Int, normalize: Bool, normed: CUDABuffer, logits: CUDABuffer, routes: CUDABuffer) {
        // Not --deterministic: the fused kernel's sums are ordered otherwise than the three
        // kernels', and a row's result must not depend on how many rows the step has.
        guard fusedRouter, rows * k <= expertMatvecRoutes, rows <= CUDABackend.routerRows, !deterministic, router.dtype == .f32,
              dim % 128 == 0, count <= 65535, k >= 1, k <= min(count, CUDAExperts.maxUsed) else {
            normRouteInSteps(x, norm: norm, eps: eps, rows: rows, dim: dim, router: router, count: count, k: k, normalize: normalize,
                             normed: normed, logits: logits, routes: routes)
            return
        }
        // The gate/up products of quantized experts (expertMatvecs) read the input's 8-bit copy.
        let quantizedExperts = expertMatvecKernels(experts) != nil && !experts.gate[0].dtype.isFloat
        var hq: CUDADriver.DevicePointer = 0, hs: CUDADriver.DevicePointer = 0
        if quantizedExperts {
            guard ensure(&routedQ8, rows * dim / 4 + rows * dim / 32) else { return }
            (hq, hs) = (routedQ8.pointer, routedQ8.pointer + UInt64(rows * dim))
        }
        launch("moe_router", grid: (rows, count, 1), block: 256) { a in
            a.ptr(x); a.ptr(norm.pointer); a.f32(eps); a.i32(dim); a.ptr(router.pointer); a.i32(count); a.i32(k); a.i32(normalize ? 1 : 0)
            a.ptr(normed); a.ptr(logits); a.ptr(routes); a.ptr(routerCounters); a.ptr(hq); a.ptr(hs)
        }
        if quantizedExperts { q8Holds = (normed.pointer, rows, dim) }
    }

    public func expertProducts(_ x: CUDABuffer, rows: Int, routes: CUDABuffer, k: Int, experts: CUDAExperts, residual: CUDABuffer) {
        guard k >= 1, k <= CUDAExperts.maxUsed else {
            if firstError == nil { firstError = .unsupported("\(k) experts a token; the CUDA backend takes at most \(CUDAExperts.maxUsed)") }
            return
        }
        let n = experts.count, d = experts.hidden, ff = experts.intermediate, total = rows * k
        if total <= expertMatvecRoutes, !deterministic, expertMatvecs(x, rows: rows, routes: routes, k: k, experts: experts, residual: residual) {
            return
        }
        let maxTiles = (total + expertTileRows - 1) / expertTileRows + min(n, total)
        // expert_gemm's 16-bit type (nil: it does not take this pass).
        let tensorCoreHalf = deterministic || maxTiles > 65_535 ? nil : expertGEMMHalf(experts)
        let tensorCores = tensorCoreHalf != nil
        // Ints: counts, starts and the chosen experts (n + 1) per expert, then each route's place
        // and each place's row, then expert_gemm's tiles.
        guard ensure(&moeInts, 3 * n + 1 + 2 * total + 1 + 3 * maxTiles), ensure(&moeOut, total * d),
              tensorCores || (ensure(&moeRows, total * d) && ensure(&moeHidden, total * ff)) else { return }
        let ints = moeInts.pointer
        let counts = ints, starts = ints + UInt64(4 * n), active = ints + UInt64(8 * n)
        let place = ints + UInt64(4 * (3 * n + 1)), rowOf = place + UInt64(4 * total), tiles = rowOf + UInt64(4 * total)
        launch("moe_group", grid: (1, 1, 1), block: 1024) { a in
            a.ptr(routes); a.i32(total); a.i32(k); a.i32(n); a.ptr(counts); a.ptr(starts); a.ptr(place); a.ptr(rowOf); a.ptr(active)
            a.ptr(experts.reads); a.ptr(tensorCores ? tiles : 0); a.i32(expertTileRows)
        }
        if let half = tensorCoreHalf {
            expertTensorCoreProducts(x, experts, half: half, total: total, rowOf: rowOf, tiles: tiles, maxTiles: maxTiles)
        } else {
            launch("gather_rows", grid: (total, 1, 1), block: 256) { a in a.ptr(x); a.ptr(rowOf); a.ptr(moeRows); a.i32(d) }
            if total >= expertGEMMRoutes, !inGraphStep, !deterministic {
                expertGEMMs(experts, total: total, counts: counts, active: active)
            } else {
                expertRowProducts(experts, total: total)
            }
        }
        launch("moe_combine", grid: (rows, (d + 255) / 256, 1), block: 256) { a in
            a.ptr(routes); a.ptr(place); a.i32(k); a.ptr(moeOut); a.ptr(residual); a.i32(d); a.ptr(0)
        }
    }

    /// Rows of one expert a block of expert_gemm takes (EG_ROWS in Kernels.cu); its outputs
    /// (EG_OUTS) and the slice of k it decodes at a time (EG_K).
    private let expertTileRows = 64, expertTileOutputs = 64, expertTileK = 64

    /// Whether expert_gemm takes these experts (nil: it does not), and then whether its products
    /// run in F16 (F16 weights) or BF16 (the rest, quantized ones decoded to BF16). Gate and up
    /// must share a type, and down multiply in the same 16 bits as them (it reads their output
    /// rounded so); f32 weights keep cuBLAS.
    private func expertGEMMHalf(_ experts: CUDAExperts) -> Bool? {
        let gate = experts.gate[0].dtype, down = experts.down[0].dtype
        guard expertGEMMAllowed, driver.computeCapability.major >= 8, gate == experts.up[0].dtype, gate != .f32, down != .f32,
              (gate == .f16) == (down == .f16), experts.hidden % expertTileK == 0, experts.intermediate % expertTileK == 0 else { return nil }
        return gate == .f16
    }

    /// The chosen experts' products on the tensor cores, a launch a stage: gate and up with the
    /// SiLU gating from the layer's rows (read through rowOf, rounded to 16 bits as they are
    /// staged) into moeHalf, then down from moeHalf into moeOut, in F16 (`half`) or BF16 as
    /// `expertGEMMHalf` chose. No group size comes back to the host, so a recorded decode step
    /// may hold it too.
    private func expertTensorCoreProducts(_ x: CUDABuffer, _ experts: CUDAExperts, half: Bool, total: Int, rowOf: CUDADriver.DevicePointer,
                                          tiles: CUDADriver.DevicePointer, maxTiles: Int) {
        let d = experts.hidden, ff = experts.intermediate
        guard ensure(&moeHalf, (total * ff + 1) / 2) else { return }
        let kernel = half ? "expert_gemm_f16" : "expert_gemm_bf16"
        func product(_ weights: CUDABuffer, _ ups: CUDABuffer?, _ type: DType, n: Int, k: Int, x: CUDADriver.DevicePointer, xHalf: Bool,
                     rowOf: CUDADriver.DevicePointer, y: CUDADriver.DevicePointer, yh: CUDADriver.DevicePointer) {
            launch(kernel, grid: ((n + expertTileOutputs - 1) / expertTileOutputs, maxTiles, 1), block: 128) { a in
                a.ptr(weights); a.ptr(ups?.pointer ?? 0); a.i32(code(type)); a.i32(n); a.i32(k); a.ptr(x); a.i32(xHalf ? 1 : 0)
                a.ptr(rowOf); a.ptr(tiles); a.ptr(y); a.ptr(yh)
            }
        }
        product(experts.gateTable, experts.upTable, experts.gate[0].dtype, n: ff, k: d, x: x.pointer, xHalf: false, rowOf: rowOf,
                y: 0, yh: moeHalf.pointer)
        product(experts.downTable, nil, experts.down[0].dtype, n: d, k: ff, x: moeHalf.pointer, xHalf: true, rowOf: 0,
                y: moeOut.pointer, yh: 0)
    }

    /// Routes a pass may have for its experts' products to run as the matvec kernels' expert
    /// mode, each route one token's product with one expert's weights, no grouping: a decode
    /// step of a few sequences. An expert two of the rows chose is read twice, which costs less
    /// than grouping does until many rows share experts (128 experts, 8 a token: 64 routes
    /// choose about 50 distinct experts).
    private let expertMatvecRoutes = 64

    /// The matvec kernels (gate/up, down) of the experts' expert mode, when their types and
    /// sizes have them.
    private func expertMatvecKernels(_ experts: CUDAExperts) -> (gateUp: String, down: String)? {
        let d = experts.hidden, ff = experts.intermediate
        let gateType = experts.gate[0].dtype, downType = experts.down[0].dtype
        guard gateType == experts.up[0].dtype, let gateKernel = Self.matvecSuffix(gateType), let downKernel = Self.matvecSuffix(downType),
              d % gateType.blockSize == 0, d % 8 == 0, ff % downType.blockSize == 0, ff % 8 == 0 else { return nil }
        return (gateKernel, downKernel)
    }

    /// The experts' products of a few rows as the matvec kernels' expert mode: gate and up with
    /// the SiLU gating for every route in one launch, then down and each row's weighted sum added
    /// to the residual in another (moe_down, counting each route's read; for down types it does
    /// not take, down in the expert mode and the sum in moe_combine). False when the weights'
    /// types have no such kernel (the grouped kernels take them). Qwen3-30B-A3B-shaped layers on
    /// an H200 (4 layers, Q4_K_M, tg128 tok/s, one run, two rounds): 2,565 / 2,644 with moe_down,
    /// 2,426 / 2,326 without.
    private func expertMatvecs(_ x: CUDABuffer, rows: Int, routes: CUDABuffer, k: Int, experts: CUDAExperts, residual: CUDABuffer) -> Bool {
        let d = experts.hidden, ff = experts.intermediate, total = rows * k
        let gateType = experts.gate[0].dtype, downType = experts.down[0].dtype
        guard let (gateKernel, downKernel) = expertMatvecKernels(experts) else { return false }
        guard ensure(&moeHidden, total * ff) else { return true }
        // A product's input rounded to 8 bits for quantized weights (the routed rows' copy where it
        // holds this input), (0, 0) for 16-bit ones; nil when its scratch could not be had.
        func roundedInput(_ input: CUDABuffer, rows inputRows: Int, cols: Int, _ type: DType)
            -> (CUDADriver.DevicePointer, CUDADriver.DevicePointer)? {
            if type.isFloat { return (0, 0) }
            if let h = q8Holds, h.source == input.pointer, h.rows == inputRows, h.k == cols {
                return (routedQ8.pointer, routedQ8.pointer + UInt64(inputRows * cols))
            }
            return quantizeActivations(input, rows: inputRows, k: cols, norm: nil)
        }
        func product(_ kernel: String, _ type: DType, tables: (CUDABuffer, CUDABuffer?), input: CUDABuffer, inputRows: Int, cols: Int,
                     outputs: Int, routeDiv: Int, out: CUDABuffer) {
            guard let (xq, xs) = roundedInput(input, rows: inputRows, cols: cols, type) else { return }
            let gated = tables.1 != nil
            let warps = matvecWarps(outputs, type, k: cols, gated: gated)
            launch("matvec_" + kernel + (gated ? "_gated" : ""), grid: (blocks(warps * 32).0, total, 1), block: 256) { a in
                a.ptr(tables.0); a.ptr(0); a.ptr(out); a.i32(outputs)
                a.ptr(tables.1?.pointer ?? 0); a.ptr(0); a.ptr(0); a.i32(0)
                a.ptr(0); a.ptr(0); a.ptr(0); a.i32(0)
                a.ptr(input); a.ptr(0); a.f32(0); a.ptr(xq); a.ptr(xs); a.i32(cols); a.i32(gated ? 2 : 0); a.ptr(routes); a.i32(routeDiv)
            }
        }
        product(gateKernel, gateType, tables: (experts.gateTable, experts.upTable), input: x, inputRows: rows, cols: d, outputs: ff,
                routeDiv: k, out: moeHidden)
        if fusedExpertDown, let suffix = CUDABackend.expertDownTypes[downType] {
            guard let (xq, xs) = roundedInput(moeHidden, rows: total, cols: ff, downType) else { return true }
            launch("moe_down_" + suffix, grid: ((d + 7) / 8, rows, 1), block: 256) { a in
                a.ptr(experts.downTable); a.i32(d); a.i32(ff); a.ptr(routes); a.i32(k); a.ptr(downType.isFloat ? moeHidden.pointer : 0)
                a.ptr(xq); a.ptr(xs); a.ptr(residual); a.ptr(experts.reads)
            }
            return true
        }
        guard ensure(&moeOut, total * d) else { return true }
        product(downKernel, downType, tables: (experts.downTable, nil), input: moeHidden, inputRows: total, cols: ff, outputs: d,
                routeDiv: 1, out: moeOut)
        launch("moe_combine", grid: (rows, (d + 255) / 256, 1), block: 256) { a in
            a.ptr(routes); a.ptr(0); a.i32(k); a.ptr(moeOut); a.ptr(residual); a.i32(d); a.ptr(experts.reads)
        }
        return true
    }

    /// Down weight types whose expert-mode product and weighted sum run as one launch
    /// (`moe_down_<suffix>`): a warp per output of a row over all its routes, so short expert rows
    /// keep every lane busy (Kernels.cu). PEREGRINE_NO_FUSED_EXPERT_DOWN=1 keeps the matvec
    /// kernel's expert mode and moe_combine, to measure against.
    static let expertDownTypes: [DType: String] = [.f16: "f16", .bf16: "bf16", .q8_0: "q8_0", .q4_0: "q4_0", .q4_K: "q4_K",
                                                   .q6_K: "q6_K", .iq4_nl: "iq4_nl"]
    private let fusedExpertDown = ProcessInfo.processInfo.environment["PEREGRINE_NO_FUSED_EXPERT_DOWN"] == nil

    /// Routes a pass needs for the chosen experts' products to run as cuBLAS products, one an
    /// expert and projection on the tensor cores: a prompt's pass, where each expert gets many
    /// rows. Fewer (decode steps) take the warp-per-row kernels, which read each chosen expert's
    /// weights once for all its rows.
    private let expertGEMMRoutes = 64

    /// The chosen experts' products over their grouped rows (moeRows -> moeHidden -> moeOut) as
    /// cuBLAS products: the group sizes read back (so never in a graph step), the rows rounded to
    /// the weights' 16-bit type once a projection, a quantized projection's chosen experts
    /// widened to BF16 in one launch.
    private func expertGEMMs(_ experts: CUDAExperts, total: Int, counts: CUDADriver.DevicePointer, active: CUDADriver.DevicePointer) {
        let n = experts.count, d = experts.hidden, ff = experts.intermediate
        guard ensure(&moeUp, total * ff) else { return }
        var sizes = [Int32](repeating: 0, count: n)
        sizes.withUnsafeMutableBytes { record(driver.cuMemcpyDtoHAsync($0.baseAddress!, counts, $0.count, stream), "cuMemcpyDtoHAsync") }
        record(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
        guard sizes.reduce(0, { $0 + Int($1) }) == total else {
            if firstError == nil { firstError = .backend("internal: expert groups do not add up to the pass's routes") }
            return
        }
        let chosen = sizes.filter { $0 > 0 }.count
        func stage(_ input: CUDABuffer, k: Int, _ products: [(weights: [CUDAWeight], table: CUDABuffer, out: CUDABuffer)]) {
            // The input rounded to the 16-bit type of a projection's products (none for f32),
            // kept for the next projection when it takes the same (gate and up may be stored in
            // different types; quantized ones are all widened to BF16).
            var rounded: (half: Int, pointer: CUDADriver.DevicePointer)?
            for (weights, table, out) in products {
                let dtype = weights[0].dtype, rows = weights[0].rows, size = rows * k
                let half = dtype == .f32 ? 0 : dtype == .f16 ? 1 : 2
                let xh: CUDADriver.DevicePointer
                if let r = rounded, r.half == half { xh = r.pointer } else {
                    guard let p = gemmInput(input.pointer, count: total * k, for: dtype) else { return }
                    xh = p
                    rounded = (half, p)
                }
                let inputBytes = dtype == .f32 ? 4 : 2
                var widened: CUDADriver.DevicePointer?
                if ![DType.f32, .f16, .bf16].contains(dtype) {
                    guard ensure(&dequantScratch, (chosen * size + 1) / 2) else { return }
                    launch("dequantize_experts_bf16", grid: (blocks((size + 7) / 8).0, chosen, 1), block: 256) { a in
                        a.ptr(table); a.ptr(active); a.i32(n); a.i32(code(dtype)); a.i64(size); a.ptr(dequantScratch)
                    }
                    widened = dequantScratch.pointer
                }
                var start = 0, index = 0
                for e in 0..<n where sizes[e] > 0 {
                    let m = Int(sizes[e])
                    let (a, type): (CUDADriver.DevicePointer, Int32)
                    if let widened { (a, type) = (widened + UInt64(index * size * 2), 14) } else {
                        guard let w = gemmWeight(weights[e]) else { return }
                        (a, type) = w
                    }
                    cublasProduct(a, xh + UInt64(start * k * inputBytes), type: type, outDim: rows, rows: m, k: k,
                                  out: out.pointer + UInt64(start * rows * 4), accumulate: false)
                    start += m
                    index += 1
                }
            }
        }
        stage(moeRows, k: d, [(experts.gate, experts.gateTable, moeHidden), (experts.up, experts.upTable, moeUp)])
        siluMul(gate: moeHidden, up: moeUp, count: total * ff, out: moeHidden)
        stage(moeHidden, k: ff, [(experts.down, experts.downTable, moeOut)])
    }

    /// The chosen experts' products by the warp-per-row kernels (moe_products).
    private func expertRowProducts(_ experts: CUDAExperts, total: Int) {
        let n = experts.count, d = experts.hidden, ff = experts.intermediate
        let ints = moeInts.pointer
        let counts = ints, starts = ints + UInt64(4 * n), active = ints + UInt64(8 * n)
        // At most one group per route: the grid covers min(experts, routes) chosen experts.
        let slots = min(n, total)
        func products(_ input: CUDABuffer, _ w: CUDABuffer, _ type: DType, _ u: CUDABuffer?, _ upType: DType, outputs: Int, k: Int,
                      _ y: CUDABuffer) {
            var xq: CUDADriver.DevicePointer = 0, xs: CUDADriver.DevicePointer = 0
            // The types whose row_dot reads 8-bit activations (rounded per 32 values); the others
            // (IQ4_XS, Q3_K, Q2_K) read the f32 ones.
            let eightBit: [DType] = [.q8_0, .q4_0, .q5_0, .iq4_nl, .q4_K, .q5_K, .q6_K]
            if eightBit.contains(type) || eightBit.contains(upType) {
                guard let q = quantizeActivations(input, rows: total, k: k, norm: nil) else { return }
                (xq, xs) = q
            }
            launch("moe_products", grid: blocks(slots * outputs * 32), block: 256) { a in
                a.ptr(w); a.ptr(u?.pointer ?? 0); a.i32(code(type)); a.i32(code(upType)); a.i32(outputs); a.i32(k); a.ptr(input)
                a.ptr(xq); a.ptr(xs); a.ptr(counts); a.ptr(starts); a.ptr(active); a.i32(n); a.i32(slots); a.ptr(y)
            }
        }
        products(moeRows, experts.gateTable, experts.gate[0].dtype, experts.upTable, experts.up[0].dtype, outputs: ff, k: d, moeHidden)
        products(moeHidden, experts.downTable, experts.down[0].dtype, nil, experts.down[0].dtype, outputs: d, k: ff, moeOut)
    }

    public func expertReads(_ experts: CUDAExperts) throws -> [Int] {
        bindContext()
        var counts = [Int32](repeating: 0, count: experts.count)
        counts.withUnsafeMutableBytes { record(driver.cuMemcpyDtoHAsync($0.baseAddress!, experts.reads.pointer, $0.count, stream), "cuMemcpyDtoHAsync") }
        try synchronize()
        return counts.map(Int.init)
    }

    public func addSigmoidGated(_ y: CUDABuffer, gate: CUDABuffer, rows: Int, dim: Int, residual: CUDABuffer) {
        launch("add_sigmoid_gated", grid: blocks(rows * dim), block: 256) { a in
            a.ptr(y); a.ptr(gate); a.ptr(residual); a.i32(dim); a.i64(rows * dim)
        }
    }

    // MARK: choosing tokens on the device

    private func rowPointer(_ x: CUDABuffer, _ row: Int, _ cols: Int) -> CUDADriver.DevicePointer { x.pointer + UInt64(row * cols * 4) }

    public func argmax(_ x: CUDABuffer, row: Int, cols: Int) throws -> Int {
        bindContext()
        var word: UInt64 = 0
        record(driver.cuMemsetD8Async(sampleInts.pointer, 0, 8, stream), "cuMemsetD8Async")
        let parts = max(1, min(2 * driver.multiprocessors, (cols + 2047) / 2048))
        launch("argmax_rows", grid: (parts, 1, 1), block: 256) { a in a.ptr(rowPointer(x, row, cols)); a.i32(cols); a.ptr(sampleInts) }
        record(driver.cuMemcpyDtoHAsync(&word, sampleInts.pointer, 8, stream), "cuMemcpyDtoHAsync")
        try synchronize()
        return CUDABackend.argmaxIndex(word, cols: cols)
    }

    /// The index an argmax_rows word names: its low word holds the inverted index; zero (nothing
    /// but NaNs) means index 0.
    private static func argmaxIndex(_ word: UInt64, cols: Int) -> Int {
        let id = 0xffff_ffff - Int(word & 0xffff_ffff)
        return word == 0 || id >= cols ? 0 : id
    }

    /// argmax_rows over rows 0..<n of x into `words` (zeroed first), one word a row: about eight
    /// blocks a multiprocessor, so many rows are read at the memory's rate (one block a row read
    /// 256 rows of the 8B shape's vocabulary at a sixth of it).
    private func launchArgmax(_ x: CUDABuffer, rows n: Int, cols: Int, into words: CUDADriver.DevicePointer) {
        record(driver.cuMemsetD8Async(words, 0, 8 * n, stream), "cuMemsetD8Async")
        let parts = max(1, min((8 * driver.multiprocessors + n - 1) / n, (cols + 2047) / 2048))
        launch("argmax_rows", grid: (parts, n, 1), block: 256) { a in a.ptr(x); a.i32(cols); a.ptr(words) }
    }

    public var freeDeviceMemory: Int? {
        var free = 0, total = 0
        return driver.cuMemGetInfo(&free, &total) == 0 ? free : nil
    }

    /// Every row from 0 to the last one asked for in one launch, one read back.
    public func argmax(_ x: CUDABuffer, rows: [Int], cols: Int) throws -> [Int] {
        bindContext()
        guard let last = rows.max() else { return [] }
        let n = last + 1
        guard ensure(&sampleInts, 2 * n) else { try synchronize(); return [] }
        var words = [UInt64](repeating: 0, count: n)
        launchArgmax(x, rows: n, cols: cols, into: sampleInts.pointer)
        words.withUnsafeMutableBytes { record(driver.cuMemcpyDtoHAsync($0.baseAddress!, sampleInts.pointer, 8 * n, stream), "cuMemcpyDtoHAsync") }
        try synchronize()
        return rows.map { CUDABackend.argmaxIndex(words[$0], cols: cols) }
    }

    public func topK(_ x: CUDABuffer, row: Int, cols: Int, k: Int, values: UnsafeMutableBufferPointer<Float>,
                     indices: UnsafeMutableBufferPointer<Int32>) throws {
        bindContext()
        let k = min(k, cols, values.count, indices.count)
        guard k > 0 else { return }
        guard ensure(&sampleInts, 2 * k) else { try synchronize(); return }
        let ids = sampleInts.pointer + UInt64(k * 4)
        launch("topk_rows", grid: (1, 1, 1), block: 1024) { a in
            a.ptr(rowPointer(x, row, cols)); a.i32(cols); a.i32(k); a.ptr(sampleInts); a.ptr(ids)
        }
        record(driver.cuMemcpyDtoHAsync(values.baseAddress!, sampleInts.pointer, k * 4, stream), "cuMemcpyDtoHAsync")
        record(driver.cuMemcpyDtoHAsync(indices.baseAddress!, ids, k * 4, stream), "cuMemcpyDtoHAsync")
        try synchronize()
    }

    public func expSum(_ x: CUDABuffer, row: Int, cols: Int, shift: Float, scale: Float) throws -> Float {
        bindContext()
        var sum: Float = 0
        launch("exp_sum_rows", grid: (1, 1, 1), block: 1024) { a in
            a.ptr(rowPointer(x, row, cols)); a.i32(cols); a.f32(shift); a.f32(scale); a.ptr(sampleInts)
        }
        record(driver.cuMemcpyDtoHAsync(&sum, sampleInts.pointer, 4, stream), "cuMemcpyDtoHAsync")
        try synchronize()
        return sum
    }

    /// PEREGRINE_NO_DEVICE_SAMPLING=1: sampled rows are chosen one by one (a top-k read back each).
    private let deviceSampling = ProcessInfo.processInfo.environment["PEREGRINE_NO_DEVICE_SAMPLING"] == nil
    public var samplesRows: Bool { deviceSampling }

    /// Every row's token in one launch (sample_rows: a block per row) and one read back.
    public func sampleRows(_ x: CUDABuffer, rows: [Int], cols: Int, draws: [SamplingDraw]) throws -> [(token: Int, drew: Bool)] {
        bindContext()
        let n = rows.count
        guard n > 0 else { return [] }
        guard draws.count == n, draws.allSatisfy({ $0.topK >= 1 && $0.topK <= min(1024, cols) }) else {
            throw PeregrineError.invalidArgument("sampling on the device takes top-k from 1 to 1024")
        }
        // Inputs (row, k, four parameters) and outputs (token, drew) in one staging buffer.
        hostInts.removeAll(keepingCapacity: true)
        for r in rows { hostInts.append(Int32(r)) }
        for d in draws { hostInts.append(Int32(d.topK)) }
        for d in draws {
            for v in [d.inverseTemperature, d.cutOffset, d.topP, d.uniform] { hostInts.append(Int32(bitPattern: v.bitPattern)) }
        }
        guard ensure(&sampleInts, 8 * n) else {
            try synchronize()
            throw PeregrineError.backend("no GPU memory for sampling \(n) rows")
        }
        _ = hostInts.withUnsafeBufferPointer { upload($0, into: &sampleInts) }
        let base = sampleInts.pointer, results = base + UInt64(6 * n * 4)
        launch("sample_rows", grid: (n, 1, 1), block: 1024) { a in
            a.ptr(x); a.i32(cols); a.ptr(base); a.ptr(base + UInt64(2 * n * 4)); a.ptr(base + UInt64(n * 4)); a.ptr(results)
        }
        var out = [Int32](repeating: 0, count: 2 * n)
        out.withUnsafeMutableBytes { record(driver.cuMemcpyDtoHAsync($0.baseAddress!, results, 8 * n, stream), "cuMemcpyDtoHAsync") }
        try synchronize()
        return (0..<n).map { i in (Int(out[2 * i]), out[2 * i + 1] != 0) }
    }

    public func penalize(_ x: CUDABuffer, row: Int, cols: Int, ids: UnsafeBufferPointer<Int32>, penalty: Float) {
        bindContext()
        guard ids.count > 0 else { return }
        let list = upload(ids, into: &rowInts)
        launch("repetition_penalty", grid: blocks(ids.count), block: 256) { a in
            a.ptr(rowPointer(x, row, cols)); a.ptr(list); a.i32(ids.count); a.f32(penalty)
        }
    }

    public func synchronize() throws { try endPass(waiting: true) }

    /// Where steps may be chained, returns without waiting: the step's sampling queues behind it
    /// and waits once, so the device runs it as soon as the step ends instead of after a round
    /// trip to the host (or the engine queues the next step first; see `queueGreedy`). Without
    /// chaining the next pass may stage while this one runs, so it waits as `synchronize` does.
    public func submit() throws { try endPass(waiting: !chainsDecodeSteps) }

    /// Queues what the pass holds back (a recorded step's capture or replay, a held residual
    /// product), waits for the device if asked, and throws the first error kept since.
    private func endPass(waiting: Bool) throws {
        bindContext()
        partStackedRows()
        switch mode {
        case .eager: break
        case .capturing(let key):
            var graph: OpaquePointer?
            let ended = driver.cuStreamEndCapture(stream, &graph)
            var exec: OpaquePointer?
            if ended == 0, firstError == nil, driver.cuGraphInstantiate(&exec, graph, 0) == 0 {
                graphs[key] = exec
                graphCaptures += 1
                stagedBytes[key] = pinnedCursor
                if !layersStaged { inputsOnly.insert(key) }
                record(driver.cuGraphLaunch(exec, stream), "cuGraphLaunch")
                halfRead()
            } else {
                record(ended != 0 ? ended : 1, "capturing a decode step")
            }
            if graph != nil { _ = driver.cuGraphDestroy(graph) }
        case .replaying(let exec, let key):
            if pinnedCursor != stagedBytes[key] {
                // Its inputs are not where the recording reads them: not launched, the step fails.
                if firstError == nil {
                    firstError = .backend("internal: a replayed step staged \(pinnedCursor) bytes, its recording \(stagedBytes[key] ?? 0)")
                }
            } else {
                record(driver.cuGraphLaunch(exec, stream), "cuGraphLaunch")
                graphReplays += 1
                halfRead()
            }
        }
        mode = .eager
        pdlStep = false
        if waiting { record(driver.cuStreamSynchronize(stream), "cuStreamSynchronize") }
        try throwFirstError()
    }

    /// Throws (and clears) the first error a launch or copy kept since the last throw.
    private func throwFirstError() throws {
        if let e = firstError {
            firstError = nil
            throw e
        }
    }

    /// Marks the staging half the launched graph reads: the next step to stage into it waits.
    private func halfRead() {
        guard chainsDecodeSteps else { return }
        if driver.cuEventRecord?(halfEvents[pinnedHalf], stream) == 0 {
            halfRecorded[pinnedHalf] = true
        } else {
            // Without the event, wait here: the half must not be written while it is read.
            record(driver.cuStreamSynchronize(stream), "cuStreamSynchronize")
        }
    }

    public var queuesWork: Bool { true }
    public var chainsGreedyTokens: Bool { chainsDecodeSteps }
    public var chainableRows: Int { chainsDecodeSteps ? CUDABackend.chosenCapacity : 0 }
    public var lastGreedyTicket: Int { greedyTickets - 1 }
    public var greedyChainOwner: ObjectIdentifier?

    public func queueGreedy(_ x: CUDABuffer, rows n: Int, cols: Int) throws -> Int {
        bindContext()
        guard let host = chosenHost, n > 0, n <= CUDABackend.chosenCapacity else {
            throw PeregrineError.invalidArgument("greedy choices of \(n) rows cannot be chained")
        }
        guard ensure(&greedyWords, 2 * n) else {
            try synchronize()
            throw PeregrineError.backend("no GPU memory for \(n) greedy choices")
        }
        let ticket = greedyTickets
        greedyTickets += 1
        let slot = ticket & 1
        launchArgmax(x, rows: n, cols: cols, into: greedyWords.pointer)
        record(driver.cuMemcpyDtoHAsync(host + slot * 8 * CUDABackend.chosenCapacity, greedyWords.pointer, 8 * n, stream),
               "cuMemcpyDtoHAsync")
        record(driver.cuEventRecord?(chosenEvents[slot], stream) ?? 1, "cuEventRecord")
        chainedTokenRows = firstError == nil ? n : 0
        try throwFirstError()
        return ticket
    }

    public func takeGreedy(_ ticket: Int, rows n: Int, cols: Int) throws -> [Int] {
        bindContext()
        guard let host = chosenHost, ticket >= 0, ticket < greedyTickets, ticket + 2 >= greedyTickets,
              n > 0, n <= CUDABackend.chosenCapacity else {
            throw PeregrineError.invalidArgument("no greedy choices queued as \(ticket) for \(n) rows")
        }
        let slot = ticket & 1
        record(driver.cuEventSynchronize?(chosenEvents[slot]) ?? 1, "cuEventSynchronize")
        try throwFirstError()
        let words = UnsafeRawPointer(host + slot * 8 * CUDABackend.chosenCapacity).assumingMemoryBound(to: UInt64.self)
        return (0..<n).map { CUDABackend.argmaxIndex(words[$0], cols: cols) }
    }
}

extension KVStorage where B == CUDABackend {
    /// The kernels' `kvHalf` argument: 1 when keys and values are stored as f16.
    var halfPrecision: Int { type == .f16 ? 1 : 0 }
}
