import Peregrine

// The batching engine's request and output types, as its API is published. They are replaced by
// Peregrine's own definitions when the engine is part of the library.

public struct EngineRequest: Sendable {
    public var promptTokens: [Int]
    public var sampling: SamplingParameters
    public var presencePenalty: Float = 0
    public var frequencyPenalty: Float = 0
    public var logitBias: [Int: Float] = [:]
    public var maxTokens: Int
    public var stopStrings: [String] = []
    public var stopTokenIds: [Int] = []
    public var ignoreEOS = false
    public var n = 1
    public var priority = 0
    public var logprobs: Int?
    public init(promptTokens: [Int], maxTokens: Int, sampling: SamplingParameters = .greedy) {
        self.promptTokens = promptTokens
        self.maxTokens = maxTokens
        self.sampling = sampling
    }
}

public enum FinishReason: String, Sendable { case stop, length, cancelled }

public struct TokenLogprob: Sendable, Equatable {
    public var token: Int
    public var logprob: Float
    public var top: [Alternative]
    public struct Alternative: Sendable, Equatable {
        public var token: Int
        public var logprob: Float
    }
}

public struct EngineOutput: Sendable {
    public var requestId: Int
    public var index: Int
    public var tokens: [Int] = []
    public var text = ""
    public var logprobs: [TokenLogprob] = []
    public var finishReason: FinishReason?
    public var promptTokenCount = 0
    public var cachedPromptTokens = 0
}

public struct EngineStats: Sendable {
    public var running = 0, waiting = 0, kvBlocksUsed = 0, kvBlocksTotal = 0
    public var prefixCacheQueries = 0, prefixCacheHits = 0
    public init() {}
}
