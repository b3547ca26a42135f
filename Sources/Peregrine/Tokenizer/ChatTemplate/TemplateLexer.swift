// Splits a template into text and tag tokens, applying the whitespace rules of the environment
// Hugging Face renders chat templates in: trim_blocks (a block or comment tag eats the newline
// after it), lstrip_blocks (indentation before a block or comment tag on its own line is
// dropped), `-` markers that strip all whitespace on their side, `+` markers that keep it, and a
// single trailing newline of the template dropped.

enum TokenKind: Equatable {
    case text(String)
    case variableBegin, variableEnd
    case blockBegin, blockEnd
    case name(String)
    case string(String)
    case integer(Int)
    case float(Double)
    case op(String)
    case end
}

struct Token {
    let kind: TokenKind
    let line: Int
}

struct TemplateLexer {
    private let s: [Unicode.Scalar]
    private var pos = 0
    private var line = 1
    private var tokens: [Token] = []
    /// Whether the text about to be read starts a line (lstrip_blocks only applies there).
    private var lineStarting = true

    static func tokenize(_ source: String) throws -> [Token] {
        var lexer = TemplateLexer(source: source)
        try lexer.run()
        return lexer.tokens
    }

    private init(source: String) {
        s = TemplateLexer.normalizeNewlines(source)
    }

    /// jinja2 splits the source into lines (at every line boundary Python's splitlines knows)
    /// and joins them with "\n", which also drops one trailing newline.
    static func normalizeNewlines(_ source: String) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(source.unicodeScalars.count)
        var it = source.unicodeScalars.makeIterator()
        var pendingCR = false
        while let u = it.next() {
            if pendingCR {
                pendingCR = false
                if u == "\n" { continue }
            }
            if u == "\r" {
                out.append("\n")
                pendingCR = true
            } else if isLineBreak(u) {
                out.append("\n")
            } else {
                out.append(u)
            }
        }
        if out.last == "\n" { out.removeLast() }
        return out
    }

    static func isLineBreak(_ u: Unicode.Scalar) -> Bool {
        switch u.value {
        case 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029: return true
        default: return false
        }
    }

    /// Python's str.isspace, which jinja2's `\s` and rstrip() follow.
    static func isSpace(_ u: Unicode.Scalar) -> Bool {
        switch u.value {
        case 0x09...0x0D, 0x1C...0x20, 0x85, 0xA0: return true
        case 0..<0x80: return false
        default: return u.properties.isWhitespace
        }
    }

    private func peek(_ offset: Int = 0) -> Unicode.Scalar? {
        let i = pos + offset
        return i < s.count ? s[i] : nil
    }

    private func matches(_ text: String, at i: Int) -> Bool {
        var j = i
        for u in text.unicodeScalars {
            guard j < s.count, s[j] == u else { return false }
            j += 1
        }
        return true
    }

    private func error(_ m: String) -> ChatTemplateError { ChatTemplateError(.syntax, m, line: line) }

    private mutating func emit(_ kind: TokenKind) { tokens.append(Token(kind: kind, line: line)) }

    private mutating func advance(to end: Int) {
        while pos < end {
            if s[pos] == "\n" { line += 1 }
            pos += 1
        }
    }

    /// Emits text, applying the strip rules the following tag asks for.
    private mutating func emitText(_ start: Int, _ end: Int, tagKind: Unicode.Scalar?, sign: Unicode.Scalar?) {
        var stop = end
        if sign == "-" {
            while stop > start && TemplateLexer.isSpace(s[stop - 1]) { stop -= 1 }
        } else if sign != "+", let tagKind, tagKind != "{" {
            // lstrip_blocks: drop spaces and tabs between the line start and a block or comment.
            var lineStart = stop
            while lineStart > start && s[lineStart - 1] != "\n" { lineStart -= 1 }
            if lineStart > start || lineStarting {
                if s[lineStart..<stop].allSatisfy({ $0 == " " || $0 == "\t" }) { stop = lineStart }
            }
        }
        let lineBefore = line
        if stop > start {
            var text = String.UnicodeScalarView()
            text.append(contentsOf: s[start..<stop])
            tokens.append(Token(kind: .text(String(text)), line: lineBefore))
        }
        advance(to: end)
    }

    private mutating func run() throws {
        while pos < s.count {
            // Find the next tag opening.
            var i = pos
            var found = false
            while i + 1 < s.count {
                if s[i] == "{", s[i + 1] == "{" || s[i + 1] == "%" || s[i + 1] == "#" { found = true; break }
                i += 1
            }
            guard found else {
                emitText(pos, s.count, tagKind: nil, sign: nil)
                return
            }
            let kind = s[i + 1]
            let sign: Unicode.Scalar? = (i + 2 < s.count && (s[i + 2] == "-" || s[i + 2] == "+")) ? s[i + 2] : nil
            if kind == "%", let raw = rawBlockEnd(at: i) {
                emitText(pos, i, tagKind: kind, sign: sign)
                advance(to: raw.bodyStart)
                try lexRawBody()
                continue
            }
            emitText(pos, i, tagKind: kind, sign: sign)
            advance(to: i + 2 + (sign == nil ? 0 : 1))
            switch kind {
            case "#": try lexComment()
            case "{":
                emit(.variableBegin)
                try lexTagContents(block: false)
            default:
                emit(.blockBegin)
                try lexTagContents(block: true)
            }
        }
    }

    /// If a `{% raw %}` tag starts at i, where its body starts.
    private func rawBlockEnd(at i: Int) -> (bodyStart: Int, Void)? {
        var j = i + 2
        if j < s.count, s[j] == "-" || s[j] == "+" { j += 1 }
        while j < s.count, TemplateLexer.isSpace(s[j]) { j += 1 }
        guard matches("raw", at: j) else { return nil }
        j += 3
        while j < s.count, TemplateLexer.isSpace(s[j]) { j += 1 }
        if matches("-%}", at: j) {
            j += 3
            while j < s.count, TemplateLexer.isSpace(s[j]) { j += 1 }
            return (j, ())
        }
        // Unlike other block tags, `{% raw %}` keeps the newline after it.
        if matches("%}", at: j) { return (j + 2, ()) }
        return nil
    }

    private mutating func lexRawBody() throws {
        var i = pos
        while i + 1 < s.count {
            if s[i] == "{", s[i + 1] == "%" {
                var j = i + 2
                var sign: Unicode.Scalar?
                if j < s.count, s[j] == "-" || s[j] == "+" { sign = s[j]; j += 1 }
                while j < s.count, TemplateLexer.isSpace(s[j]) { j += 1 }
                if matches("endraw", at: j) {
                    j += 6
                    while j < s.count, TemplateLexer.isSpace(s[j]) { j += 1 }
                    var end: Int?
                    if matches("-%}", at: j) {
                        end = j + 3
                        while let e = end, e < s.count, TemplateLexer.isSpace(s[e]) { end = e + 1 }
                    } else if matches("+%}", at: j) {
                        end = j + 3
                    } else if matches("%}", at: j) {
                        end = j + 2
                        if let e = end, e < s.count, s[e] == "\n" { end = e + 1 }
                    }
                    if let end {
                        emitText(pos, i, tagKind: "%", sign: sign)
                        advance(to: end)
                        lineStarting = s[end - 1] == "\n"
                        return
                    }
                }
            }
            i += 1
        }
        throw error("missing end of raw directive")
    }

    private mutating func lexComment() throws {
        var i = pos
        while i + 1 < s.count {
            if s[i] == "-" || s[i] == "+", i + 2 < s.count, s[i + 1] == "#", s[i + 2] == "}" {
                var end = i + 3
                if s[i] == "-" { while end < s.count, TemplateLexer.isSpace(s[end]) { end += 1 } }
                advance(to: end)
                lineStarting = s[end - 1] == "\n"
                return
            }
            if s[i] == "#", s[i + 1] == "}" {
                var end = i + 2
                if end < s.count, s[end] == "\n" { end += 1 }
                advance(to: end)
                lineStarting = s[end - 1] == "\n"
                return
            }
            i += 1
        }
        throw error("missing end of comment tag")
    }

    private static let twoCharOps: Set<String> = ["//", "**", "==", "!=", ">=", "<="]
    private static let oneCharOps: Set<Unicode.Scalar> = ["+", "-", "/", "*", "%", "~", "[", "]", "(", ")", "{", "}",
                                                        "<", ">", "=", ".", ":", "|", ",", ";"]

    private mutating func lexTagContents(block: Bool) throws {
        var depth = 0
        while true {
            while let u = peek(), TemplateLexer.isSpace(u) { advance(to: pos + 1) }
            guard let u = peek() else {
                throw error(block ? "unexpected end of template, expected end of statement block"
                                  : "unexpected end of template, expected end of print statement")
            }
            if depth == 0 {
                if block {
                    if matches("-%}", at: pos) || matches("+%}", at: pos) || matches("%}", at: pos) {
                        emit(.blockEnd)
                        let minus = u == "-"
                        advance(to: pos + (u == "%" ? 2 : 3))
                        if minus {
                            while let w = peek(), TemplateLexer.isSpace(w) { advance(to: pos + 1) }
                        } else if u == "%", peek() == "\n" {
                            advance(to: pos + 1)
                        }
                        lineStarting = pos > 0 && s[pos - 1] == "\n"
                        return
                    }
                } else if matches("-}}", at: pos) || matches("}}", at: pos) {
                    emit(.variableEnd)
                    advance(to: pos + (u == "-" ? 3 : 2))
                    if u == "-" { while let w = peek(), TemplateLexer.isSpace(w) { advance(to: pos + 1) } }
                    lineStarting = pos > 0 && s[pos - 1] == "\n"
                    return
                }
            }
            if u == "_" || u.properties.isAlphabetic {
                var j = pos
                while j < s.count, s[j] == "_" || s[j].properties.isAlphabetic || ("0"..."9").contains(s[j]) { j += 1 }
                emit(.name(String(String.UnicodeScalarView(s[pos..<j]))))
                advance(to: j)
            } else if ("0"..."9").contains(u) {
                try lexNumber()
            } else if u == "'" || u == "\"" {
                try lexString(quote: u)
            } else if pos + 1 < s.count, TemplateLexer.twoCharOps.contains(String(String.UnicodeScalarView([u, s[pos + 1]]))) {
                emit(.op(String(String.UnicodeScalarView([u, s[pos + 1]]))))
                advance(to: pos + 2)
            } else if TemplateLexer.oneCharOps.contains(u) {
                if u == "(" || u == "[" || u == "{" { depth += 1 }
                if u == ")" || u == "]" || u == "}" {
                    guard depth > 0 else { throw error("unexpected '\(u)'") }
                    depth -= 1
                }
                emit(.op(String(u)))
                advance(to: pos + 1)
            } else {
                throw error("unexpected character '\(u)'")
            }
        }
    }

    private func digitRun(from i: Int) -> Int {
        // Digits with single underscores between them, as in 1_000.
        var j = i
        while j < s.count {
            if ("0"..."9").contains(s[j]) { j += 1; continue }
            if s[j] == "_", j > i, j + 1 < s.count, ("0"..."9").contains(s[j + 1]) { j += 1; continue }
            break
        }
        return j
    }

    /// Numbers as jinja2 reads them: floats like 1.5, 1e3 and 1_000.5; integers in decimal
    /// (no leading zeros except 0 itself), 0x, 0o and 0b forms, with single underscores.
    private mutating func lexNumber() throws {
        let start = pos
        // After a '.', a number is an index (`items.0`), never a float.
        let afterDot = tokens.last?.kind == .op(".")
        var j = digitRun(from: pos)
        var isFloat = false
        if !afterDot {
            if j + 1 < s.count, s[j] == ".", ("0"..."9").contains(s[j + 1]) {
                j = digitRun(from: j + 1)
                isFloat = true
            }
            if j < s.count, s[j] == "e" || s[j] == "E" {
                var k = j + 1
                if k < s.count, s[k] == "+" || s[k] == "-" { k += 1 }
                if k < s.count, ("0"..."9").contains(s[k]) {
                    j = digitRun(from: k)
                    isFloat = true
                }
            }
        }
        if isFloat {
            let text = String(String.UnicodeScalarView(s[start..<j].filter { $0 != "_" }))
            guard let d = Double(text) else { throw error("invalid number '\(text)'") }
            emit(.float(d))
            advance(to: j)
            return
        }
        var radix = 10
        var digitsStart = start
        if s[start] == "0", start + 1 < s.count {
            switch s[start + 1] {
            case "x", "X": radix = 16
            case "o", "O": radix = 8
            case "b", "B": radix = 2
            default: break
            }
        }
        func isDigit(_ u: Unicode.Scalar) -> Bool {
            switch radix {
            case 16: return ("0"..."9").contains(u) || ("a"..."f").contains(u) || ("A"..."F").contains(u)
            case 8: return ("0"..."7").contains(u)
            case 2: return u == "0" || u == "1"
            default: return ("0"..."9").contains(u)
            }
        }
        if radix != 10 {
            // 0x followed by digits, each optionally after one underscore.
            digitsStart = start + 2
            j = digitsStart
            while j < s.count {
                if isDigit(s[j]) { j += 1; continue }
                if s[j] == "_", j + 1 < s.count, isDigit(s[j + 1]) { j += 2; continue }
                break
            }
            if j == digitsStart {
                radix = 10
                digitsStart = start
                j = start + 1
            }
        } else if s[start] == "0" {
            // A decimal integer starting with 0 is only zeros; "07" is 0 then 7, as in jinja2.
            j = start + 1
            while j < s.count {
                if s[j] == "0" { j += 1; continue }
                if s[j] == "_", j + 1 < s.count, s[j + 1] == "0" { j += 2; continue }
                break
            }
        }
        let text = String(String.UnicodeScalarView(s[digitsStart..<j].filter { $0 != "_" }))
        guard let i = Int(text, radix: radix) else { throw error("integer literal '\(text)' is too large") }
        emit(.integer(i))
        advance(to: j)
    }

    /// A string literal, with Python's backslash escapes (unknown ones stay as written).
    private mutating func lexString(quote: Unicode.Scalar) throws {
        var j = pos + 1
        var out = String.UnicodeScalarView()
        while true {
            guard j < s.count else { throw error("unterminated string") }
            let c = s[j]
            if c == quote { break }
            if c != "\\" { out.append(c); j += 1; continue }
            guard j + 1 < s.count else { throw error("unterminated string") }
            let e = s[j + 1]
            j += 2
            switch e {
            case "\n": break
            case "\\": out.append("\\")
            case "'": out.append("'")
            case "\"": out.append("\"")
            case "a": out.append("\u{07}")
            case "b": out.append("\u{08}")
            case "f": out.append("\u{0C}")
            case "n": out.append("\n")
            case "r": out.append("\r")
            case "t": out.append("\t")
            case "v": out.append("\u{0B}")
            case "0"..."7":
                var v = e.value - 48
                var n = 1
                while n < 3, j < s.count, ("0"..."7").contains(s[j]) { v = v * 8 + s[j].value - 48; j += 1; n += 1 }
                out.append(Unicode.Scalar(v) ?? "\u{FFFD}")
            case "x", "u", "U":
                let width = e == "x" ? 2 : (e == "u" ? 4 : 8)
                guard j + width <= s.count, let v = UInt32(String(String.UnicodeScalarView(s[j..<(j + width)])), radix: 16) else {
                    throw error("truncated \\\(e) escape in string")
                }
                guard let scalar = Unicode.Scalar(v) else { throw error("invalid code point in \\\(e) escape") }
                out.append(scalar)
                j += width
            default:
                out.append("\\")
                out.append(e)
            }
        }
        emit(.string(String(out)))
        advance(to: j + 1)
    }
}
