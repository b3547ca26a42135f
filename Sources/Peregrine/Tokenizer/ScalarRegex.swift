// Pre-tokenizer patterns. The three patterns that GPT-2, Llama 3 and Qwen2 tokenizers use are
// matched by hand-written scanners that follow the backtracking regex semantics of the reference
// (Oniguruma) exactly and run in linear time; any other pattern falls back to Swift's Regex, matched
// over unicode scalars as the reference does.

enum ScalarClass: UInt8 {
    case letter, number, space, newline, other  // newline: \r or \n (also whitespace)

    @inline(__always) var isSpace: Bool { self == .space || self == .newline }

    init(_ s: Unicode.Scalar) {
        let v = s.value
        if v < 128 {
            switch v {
            case 0x0A, 0x0D: self = .newline
            case 0x09, 0x0B, 0x0C, 0x20: self = .space
            case 0x30...0x39: self = .number
            case 0x41...0x5A, 0x61...0x7A: self = .letter
            default: self = .other
            }
            return
        }
        switch s.properties.generalCategory {
        case .uppercaseLetter, .lowercaseLetter, .titlecaseLetter, .modifierLetter, .otherLetter: self = .letter
        case .decimalNumber, .letterNumber, .otherNumber: self = .number
        default: self = s.properties.isWhitespace ? .space : .other
        }
    }
}

final class ScalarRegex: @unchecked Sendable {
    enum Kind { case gpt2, llama3, qwen2, generic(Regex<AnyRegexOutput>) }
    let kind: Kind

    static let gpt2Pattern = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let llama3Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    static let gpt2 = ScalarRegex(kind: .gpt2)

    private init(kind: Kind) { self.kind = kind }

    init(_ pattern: String) throws {
        switch pattern {
        case ScalarRegex.gpt2Pattern: kind = .gpt2
        case ScalarRegex.llama3Pattern: kind = .llama3
        case ScalarRegex.qwen2Pattern: kind = .qwen2
        default:
            do {
                kind = .generic(try Regex(pattern).matchingSemantics(.unicodeScalar))
            } catch {
                throw PeregrineError.unsupported("tokenizer.json: cannot compile pre-tokenizer pattern \(pattern): \(error)")
            }
        }
    }

    func matches(in s: [Unicode.Scalar]) -> [Range<Int>] {
        switch kind {
        case .generic(let re):
            var str = String.UnicodeScalarView()
            str.append(contentsOf: s)
            let text = String(str)
            var out: [Range<Int>] = []
            for m in text.matches(of: re) {
                let lo = text.unicodeScalars.distance(from: text.unicodeScalars.startIndex, to: m.range.lowerBound)
                let hi = lo + text.unicodeScalars.distance(from: m.range.lowerBound, to: m.range.upperBound)
                if hi > lo { out.append(lo..<hi) }
            }
            return out
        case .gpt2, .llama3, .qwen2:
            let cls = s.map(ScalarClass.init)
            var out: [Range<Int>] = []
            var i = 0
            while i < s.count {
                let e: Int
                switch kind {
                case .gpt2: e = gpt2Match(s, cls, i)
                case .llama3: e = llamaMatch(s, cls, i, maxDigits: 3)
                default: e = llamaMatch(s, cls, i, maxDigits: 1)
                }
                out.append(i..<e)
                i = e
            }
            return out
        }
    }

    // Contractions: 's 't 're 've 'm 'll 'd, optionally case-insensitive.
    private func contraction(_ s: [Unicode.Scalar], _ i: Int, caseInsensitive: Bool) -> Int? {
        guard s[i] == "'", i + 1 < s.count else { return nil }
        func low(_ c: Unicode.Scalar) -> Unicode.Scalar {
            guard caseInsensitive else { return c }
            if c.value == 0x17F { return "s" }  // LATIN SMALL LETTER LONG S folds to s
            if c.value >= 0x41 && c.value <= 0x5A { return Unicode.Scalar(c.value + 32)! }
            return c
        }
        let a = low(s[i + 1])
        if a == "s" || a == "t" || a == "m" || a == "d" { return i + 2 }
        if i + 2 < s.count {
            let b = low(s[i + 2])
            if (a == "r" && b == "e") || (a == "v" && b == "e") || (a == "l" && b == "l") { return i + 3 }
        }
        return nil
    }

    @inline(__always) private func run(_ cls: [ScalarClass], from i: Int, _ pred: (ScalarClass) -> Bool) -> Int {
        var j = i
        while j < cls.count, pred(cls[j]) { j += 1 }
        return j
    }

    /// `\s+(?!\S)|\s+` at a whitespace position.
    private func whitespace(_ cls: [ScalarClass], _ i: Int) -> Int {
        let j = run(cls, from: i) { $0.isSpace }
        if j == cls.count { return j }
        return j - 1 > i ? j - 1 : j
    }

    private func gpt2Match(_ s: [Unicode.Scalar], _ cls: [ScalarClass], _ i: Int) -> Int {
        if let e = contraction(s, i, caseInsensitive: false) { return e }
        let spaced = s[i] == " " && i + 1 < s.count
        let start = spaced ? i + 1 : i
        for c in [ScalarClass.letter, .number] {
            if cls[i] == c { return run(cls, from: i) { $0 == c } }
            if spaced, cls[start] == c { return run(cls, from: start) { $0 == c } }
        }
        if cls[i] == .other { return run(cls, from: i) { $0 == .other } }
        if spaced, cls[start] == .other { return run(cls, from: start) { $0 == .other } }
        return whitespace(cls, i)
    }

    private func llamaMatch(_ s: [Unicode.Scalar], _ cls: [ScalarClass], _ i: Int, maxDigits: Int) -> Int {
        if let e = contraction(s, i, caseInsensitive: true) { return e }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if cls[i] == .letter { return run(cls, from: i) { $0 == .letter } }
        if cls[i] != .newline, cls[i] != .number, i + 1 < s.count, cls[i + 1] == .letter {
            return run(cls, from: i + 1) { $0 == .letter }
        }
        // \p{N}{1,maxDigits}
        if cls[i] == .number {
            var j = i + 1
            while j < s.count, j - i < maxDigits, cls[j] == .number { j += 1 }
            return j
        }
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        let start = (s[i] == " " && i + 1 < s.count && cls[i + 1] == .other) ? i + 1 : i
        if cls[start] == .other {
            let j = run(cls, from: start) { $0 == .other }
            return run(cls, from: j) { $0 == .newline }
        }
        // \s*[\r\n]+ : the whitespace run up to and including its last newline.
        let j = run(cls, from: i) { $0.isSpace }
        var lastNewline = -1
        for k in i..<j where cls[k] == .newline { lastNewline = k }
        if lastNewline >= 0 { return lastNewline + 1 }
        return whitespace(cls, i)
    }
}
