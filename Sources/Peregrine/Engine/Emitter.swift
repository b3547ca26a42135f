/// Turns accepted tokens into streamed text and decides when to stop: EOS, a stop string, the
/// token budget, or the caller.
struct Emitter {
    var stops: StopStringMatcher
    let eos: Set<Int>
    let maxTokens: Int
    let onText: (String) -> Bool
    /// nil: tokens only, no text (an engine without a tokenizer).
    var stream: StreamingDecoder?
    var tokens: [Int] = []
    var text = ""
    /// Text emitted since the caller last took it (`takePending`).
    var pending = ""
    var stopReason: StopReason?

    init(tokenizer: Tokenizer?, stops: [String], eos: Set<Int>, maxTokens: Int, onText: @escaping (String) -> Bool) {
        self.stops = StopStringMatcher(stops)
        self.eos = eos
        self.maxTokens = maxTokens
        self.onText = onText
        stream = tokenizer?.makeStreamingDecoder()
        tokens.reserveCapacity(min(maxTokens, 4096))
    }

    /// Takes the next token; false once generation must stop.
    mutating func emit(_ token: Int) -> Bool {
        if eos.contains(token) { stopReason = .endOfSequence; return false }
        tokens.append(token)
        let (out, hit) = stops.feed(stream?.append(token) ?? "")
        if !out.isEmpty {
            text += out
            pending += out
            if !onText(out) { stopReason = .cancelled; return false }
        }
        if hit { stopReason = .stopString; return false }
        if tokens.count >= maxTokens { stopReason = .maxTokens; return false }
        return true
    }

    /// Flushes held-back text unless a stop string or the caller ended generation.
    mutating func finish() {
        guard stopReason != .stopString && stopReason != .cancelled else { return }
        let (out, _) = stops.feed(stream?.flush() ?? "", final: true)
        if !out.isEmpty {
            text += out
            pending += out
            _ = onText(out)
        }
    }

    mutating func takePending() -> String {
        defer { pending = "" }
        return pending
    }
}

/// Finds stop strings in streamed text. Text that might be the start of a stop string is held
/// back until it is known not to be.
struct StopStringMatcher {
    let stops: [String]
    private var pending = ""

    init(_ stops: [String]) { self.stops = stops.filter { !$0.isEmpty } }

    /// Returns the text safe to emit and whether a stop string was hit (text before it is emitted).
    mutating func feed(_ piece: String, final: Bool = false) -> (String, Bool) {
        guard !stops.isEmpty else { return (piece, false) }
        pending += piece
        var first: Range<String.Index>?
        for s in stops {
            if let r = pending.range(of: s), first == nil || r.lowerBound < first!.lowerBound { first = r }
        }
        if let r = first {
            let out = String(pending[..<r.lowerBound])
            pending = ""
            return (out, true)
        }
        if final {
            defer { pending = "" }
            return (pending, false)
        }
        // Hold back the longest suffix that is a prefix of some stop string.
        var hold = 0
        for s in stops {
            var n = min(s.count, pending.count)
            while n > 0 {
                if s.hasPrefix(pending.suffix(n)) { hold = max(hold, n); break }
                n -= 1
            }
        }
        let cut = pending.index(pending.endIndex, offsetBy: -hold)
        let out = String(pending[..<cut])
        pending = String(pending[cut...])
        return (out, false)
    }
}
