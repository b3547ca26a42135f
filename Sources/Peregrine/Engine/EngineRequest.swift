/// What a caller asks of the engine: a prompt, how to choose tokens, when to stop.
public struct EngineRequest: Sendable {
    public var promptTokens: [Int]
    public var sampling: SamplingParameters
    /// OpenAI's penalties over the generated tokens: minus `presencePenalty` for each token
    /// generated at least once, minus `frequencyPenalty` times its count.
    public var presencePenalty: Float = 0
    public var frequencyPenalty: Float = 0
    /// Added to a token's logit before sampling.
    public var logitBias: [Int: Float] = [:]
    public var maxTokens: Int
    public var stopStrings: [String] = []
    /// Tokens that end the sequence like EOS (not part of the output).
    public var stopTokenIds: [Int] = []
    /// Keep generating past the model's EOS tokens.
    public var ignoreEOS = false
    /// Samples of the prompt; they share its KV blocks.
    public var n = 1
    /// With `SchedulingPolicy.priority`, lower values are served first and preempted last.
    public var priority = 0
    /// nil: no log probabilities; k: each token's log probability under the model and the k
    /// most likely tokens with theirs.
    public var logprobs: Int?
    /// nil: none; k: each prompt token's log probability given the tokens before it, with the k
    /// most likely tokens at that position (OpenAI's echo with logprobs, vLLM's prompt_logprobs).
    /// With `maxTokens` 0 the prompt is still read, to score it.
    public var promptLogprobs: Int?

    public init(promptTokens: [Int], maxTokens: Int, sampling: SamplingParameters = .greedy) {
        self.promptTokens = promptTokens
        self.maxTokens = maxTokens
        self.sampling = sampling
    }
}

public enum FinishReason: String, Sendable {
    /// EOS, a stop token or a stop string.
    case stop
    /// The token budget or the context.
    case length
    case cancelled
}

public struct TokenLogprob: Sendable, Equatable {
    public var token: Int
    public var logprob: Float
    public var top: [Alternative]

    public struct Alternative: Sendable, Equatable {
        public var token: Int
        public var logprob: Float
    }
}

/// What one sequence produced in one step.
public struct EngineOutput: Sendable {
    public var requestId: Int
    /// Which of the request's `n` samples.
    public var index: Int
    /// New tokens (stop and EOS tokens excluded).
    public var tokens: [Int] = []
    /// New text: complete UTF-8 only; text that may begin a stop string is held back, a stop
    /// string itself never appears.
    public var text = ""
    public var logprobs: [TokenLogprob] = []
    /// With `EngineRequest.promptLogprobs`: prompt tokens 1..<count (the first has nothing before
    /// it), given once, in the output of the step that finished reading the prompt.
    public var promptLogprobs: [TokenLogprob]?
    public var finishReason: FinishReason?
    /// Why it stopped, in more detail than `finishReason`.
    public var stopReason: StopReason?
    public var promptTokenCount = 0
    /// Prompt tokens whose keys and values came from the prefix cache.
    public var cachedPromptTokens = 0
}

/// Everything one request produced, for `Engine.generate(prompts:)`.
public struct EngineResult: Sendable {
    public var requestId: Int
    public var index: Int
    public var tokens: [Int] = []
    public var text = ""
    public var logprobs: [TokenLogprob] = []
    /// See `EngineOutput.promptLogprobs`.
    public var promptLogprobs: [TokenLogprob]?
    public var finishReason: FinishReason = .length
    public var promptTokenCount = 0
    public var cachedPromptTokens = 0
    /// Seconds from `add` to the first token and to the last.
    public var firstTokenSeconds = 0.0
    public var totalSeconds = 0.0
    /// Seconds between consecutive tokens.
    public var interTokenSeconds: [Double] = []
}

public enum SchedulingPolicy: String, Sendable {
    /// First come, first served.
    case fcfs
    /// By `EngineRequest.priority` (lower first), then arrival.
    case priority
}

public struct EngineConfig: Sendable {
    /// Positions per KV block.
    public var blockSize = 16
    /// KV blocks in the pool; when nil, as many as `kvMemoryBytes` holds.
    public var kvBlocks: Int?
    /// Bytes for the KV pool; when nil, enough for `maxSequences` full contexts, at most a quarter
    /// of the machine's memory (on a GPU: `gpuMemoryFraction` of the free device memory).
    public var kvMemoryBytes: Int?
    public var gpuMemoryFraction = 0.9
    /// How keys and values are stored (F32, or F16: half the bytes); nil: the model's backend's
    /// preference (F16 on CUDA, F32 on the CPU). The engine's `kvCacheType` says which it took.
    public var kvCacheType: KVCacheType?
    /// Tokens per forward pass: decode tokens of running sequences plus prompt chunks (nil: 512
    /// on the CPU, 8192 on a GPU, where a pass of 512 tokens leaves most of the chip idle).
    public var maxBatchTokens: Int?
    /// Logit rows a step computes for prompt log probabilities (nil: as many as 64 MiB of f32
    /// logits hold, at least 16): each is a whole vocabulary row, so a long prompt is scored over
    /// several steps instead of holding a row per token at once.
    public var maxPromptLogitRows: Int?
    /// Sequences running at once.
    public var maxSequences = 256
    /// Longest prompt plus generation of one sequence (default: the model's).
    public var contextLength: Int?
    public var prefixCaching = true
    public var policy = SchedulingPolicy.fcfs
    /// Whether the engine runs a warm-up pass when it is made (`ModelRunner.warmUp`: a prefill of
    /// `maxBatchTokens` tokens and a decode step of each CUDA-graph batch size up to
    /// `maxSequences`, into blocks no sequence holds yet, its results dropped); nil: on a GPU only,
    /// where it settles allocation, kernel loading and cuBLAS's choices before the first request.
    public var warmUp: Bool?
    /// Whether a decode step of greedy sequences is queued before the tokens of the step before
    /// it are read (its tokens stay on the device until then), so the device runs it while the
    /// host takes that step's tokens and prepares the next; nil: where passes run ahead of the
    /// host (a GPU) and the backend chains steps (CUDA, unless PEREGRINE_CHAINED_STEPS=0). Where
    /// a sequence stops, the step queued after its last token is thrown away. The backend must
    /// chain (`ComputeBackend.chainsGreedyTokens`).
    public var chainDecodeSteps: Bool?

    public init() {}
}

/// The engine's state, for metrics.
public struct EngineStats: Sendable {
    public var running = 0
    public var waiting = 0
    public var kvBlocksUsed = 0
    public var kvBlocksTotal = 0
    public var kvBlocksCached = 0
    /// Most blocks in use at once since the engine started.
    public var kvBlocksPeak = 0
    /// Prompt tokens looked up in the prefix cache, and those found.
    public var prefixCacheQueries = 0
    public var prefixCacheHits = 0
    public var preemptions = 0
    /// Forward passes run since the engine started.
    public var steps = 0
}
