/// One sample being generated: its tokens, how many of them have keys and values in the cache,
/// its blocks, and its own sampler and text state. A request with `n` samples has `n` sequences.
final class Sequence {
    enum Status { case waiting, running, finished }

    let requestId: Int
    let index: Int
    let request: EngineRequest
    /// Prompt and generated tokens.
    var tokens: [Int32]
    let promptCount: Int
    /// Leading positions whose keys and values are in the cache.
    var computed = 0
    var table = BlockTable()
    var status = Status.waiting
    /// Order of arrival, and of the latest admission to the running batch (preemption takes the
    /// latest first).
    let arrival: Int
    var admission = 0
    var cachedPromptTokens = 0
    /// Samples 1..<n of a request wait here until sample 0 has read the prompt, then share its
    /// blocks.
    var forks: [Sequence] = []
    var sampler: Sampler
    var emitter: Emitter
    var finishReason: FinishReason?
    /// What this step produced, handed out with the step's outputs.
    var newTokens: [Int] = []
    var newLogprobs: [TokenLogprob] = []
    /// Log probabilities of prompt tokens 1...promptLogprobs.count, filled in prompt order (a row
    /// read again after preemption is not taken twice), and whether they were handed out.
    var promptLogprobs: [TokenLogprob] = []
    var promptLogprobsSent = false

    init(requestId: Int, index: Int, request: EngineRequest, arrival: Int, tokenizer: Tokenizer?, eos: Set<Int>) {
        self.requestId = requestId
        self.index = index
        self.request = request
        self.arrival = arrival
        tokens = request.promptTokens.map { Int32($0) }
        tokens.reserveCapacity(request.promptTokens.count + min(request.maxTokens, 4096))
        promptCount = request.promptTokens.count
        var p = request.sampling
        p.seed = p.seed &+ UInt64(index)  // each sample its own stream
        sampler = Sampler(p)
        if request.presencePenalty != 0 || request.frequencyPenalty != 0 {
            sampler.processors.append(OutputPenalty(presence: request.presencePenalty, frequency: request.frequencyPenalty,
                                                    promptLength: request.promptTokens.count))
        }
        if !request.logitBias.isEmpty { sampler.processors.append(LogitBias(request.logitBias)) }
        let stops = Set(request.stopTokenIds).union(request.ignoreEOS ? [] : eos)
        emitter = Emitter(tokenizer: tokenizer, stops: request.stopStrings, eos: stops, maxTokens: request.maxTokens,
                          onText: { _ in true })
    }

    var generatedCount: Int { tokens.count - promptCount }
    /// Tokens still to be read before the next one can be sampled.
    var uncomputed: Int { tokens.count - computed }
    var isFinished: Bool { status == .finished }
    /// Prompt positions whose logit rows are still wanted for prompt log probabilities: the row of
    /// position p scores prompt token p + 1.
    var promptRowsWanted: Range<Int> {
        request.promptLogprobs == nil ? 0..<0 : promptLogprobs.count..<max(promptLogprobs.count, promptCount - 1)
    }

    /// Takes the sampled token; false once the sequence is done.
    func accept(_ token: Int, contextLimit: Int) -> Bool {
        let more = emitter.emit(token)
        if emitter.tokens.count > generatedCount {
            tokens.append(Int32(token))
            newTokens.append(token)
        }
        if !more {
            finish(emitter.stopReason == .maxTokens ? .length : .stop)
            return false
        }
        if tokens.count >= contextLimit {
            finish(.length)
            return false
        }
        return true
    }

    func finish(_ reason: FinishReason) {
        guard finishReason == nil else { return }
        finishReason = reason
        if reason != .cancelled { emitter.finish() }
        status = .finished
    }

    /// This step's output, clearing what it hands out.
    func takeOutput() -> EngineOutput {
        var o = EngineOutput(requestId: requestId, index: index)
        o.tokens = newTokens
        o.text = emitter.takePending()
        o.logprobs = newLogprobs
        if request.promptLogprobs != nil && !promptLogprobsSent && promptRowsWanted.isEmpty {
            o.promptLogprobs = promptLogprobs
            promptLogprobsSent = true
        }
        o.finishReason = finishReason
        if finishReason != nil { o.stopReason = finishReason == .cancelled ? .cancelled : emitter.stopReason ?? .maxTokens }
        o.promptTokenCount = promptCount
        o.cachedPromptTokens = cachedPromptTokens
        newTokens.removeAll(keepingCapacity: true)
        newLogprobs.removeAll(keepingCapacity: true)
        return o
    }
}

/// OpenAI's presence and frequency penalties over the generated tokens.
struct OutputPenalty: LogitProcessor {
    let presence: Float
    let frequency: Float
    let promptLength: Int
    private var counts: [Int32: Int] = [:]

    init(presence: Float, frequency: Float, promptLength: Int) {
        self.presence = presence
        self.frequency = frequency
        self.promptLength = promptLength
    }

    mutating func process(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>) {
        counts.removeAll(keepingCapacity: true)
        guard context.count > promptLength else { return }
        for i in promptLength..<context.count { counts[context[i], default: 0] += 1 }
        for (id, c) in counts where id >= 0 && Int(id) < logits.count {
            logits[Int(id)] -= presence + frequency * Float(c)
        }
    }
}

/// Adds a fixed bias to some tokens' logits.
struct LogitBias: LogitProcessor {
    let bias: [(Int, Float)]

    init(_ bias: [Int: Float]) { self.bias = bias.sorted { $0.key < $1.key } }

    mutating func process(_ logits: UnsafeMutableBufferPointer<Float>, context: UnsafeBufferPointer<Int32>) {
        for (id, b) in bias where id >= 0 && id < logits.count { logits[id] += b }
    }
}
