import Foundation

// The stages around the BPE model, as tokenizer.json describes them: normalizers, pre-tokenizers,
// decoders and post-processors. Each is parsed once into an enum and applied with plain code.

func unsupportedComponent(_ kind: String, _ type: String) -> PeregrineError {
    .unsupported("tokenizer.json: unsupported \(kind) type '\(type)'")
}

/// A pattern as tokenizer.json writes it: `{"String": "..."}` or `{"Regex": "..."}`.
enum TextPattern {
    case literal(String)
    case regex(ScalarRegex)

    init(json: JSONValue?) throws {
        if let s = json?["String"]?.string {
            self = .literal(s)
        } else if let r = json?["Regex"]?.string {
            self = .regex(try ScalarRegex(r))
        } else {
            throw PeregrineError.format("tokenizer.json: pattern is neither String nor Regex")
        }
    }

    /// Non-overlapping matches as ranges of unicode-scalar offsets.
    func matches(in scalars: [Unicode.Scalar]) -> [Range<Int>] {
        switch self {
        case .regex(let r):
            return r.matches(in: scalars)
        case .literal(let s):
            let pat = Array(s.unicodeScalars)
            guard !pat.isEmpty, pat.count <= scalars.count else { return [] }
            var out: [Range<Int>] = []
            var i = 0
            while i + pat.count <= scalars.count {
                var ok = true
                for j in 0..<pat.count where scalars[i + j] != pat[j] { ok = false; break }
                if ok { out.append(i..<(i + pat.count)); i += pat.count } else { i += 1 }
            }
            return out
        }
    }

    func replacingAll(in text: String, with content: String) -> String {
        let scalars = Array(text.unicodeScalars)
        let ms = matches(in: scalars)
        if ms.isEmpty { return text }
        var out = String.UnicodeScalarView()
        var last = 0
        for m in ms {
            out.append(contentsOf: scalars[last..<m.lowerBound])
            out.append(contentsOf: content.unicodeScalars)
            last = m.upperBound
        }
        out.append(contentsOf: scalars[last...])
        return String(out)
    }
}

indirect enum Normalizer {
    case sequence([Normalizer])
    case prepend(String)
    case replace(TextPattern, String)
    case nfc, nfd, nfkc, nfkd
    case lowercase
    case strip(left: Bool, right: Bool)

    init?(json: JSONValue?) throws {
        guard let json, !json.isNull else { return nil }
        let type = json["type"]?.string ?? ""
        switch type {
        case "Sequence":
            self = .sequence(try (json["normalizers"]?.array ?? []).compactMap { try Normalizer(json: $0) })
        case "Prepend":
            self = .prepend(json["prepend"]?.string ?? "")
        case "Replace":
            self = .replace(try TextPattern(json: json["pattern"]), json["content"]?.string ?? "")
        case "NFC": self = .nfc
        case "NFD": self = .nfd
        case "NFKC": self = .nfkc
        case "NFKD": self = .nfkd
        case "Lowercase": self = .lowercase
        case "Strip": self = .strip(left: json["strip_left"]?.bool ?? true, right: json["strip_right"]?.bool ?? true)
        default: throw unsupportedComponent("normalizer", type)
        }
    }

    func apply(_ s: String) -> String {
        switch self {
        case .sequence(let ns): return ns.reduce(s) { $1.apply($0) }
        case .prepend(let p): return s.isEmpty ? s : p + s
        case .replace(let pat, let content): return pat.replacingAll(in: s, with: content)
        case .nfc: return s.precomposedStringWithCanonicalMapping
        case .nfd: return s.decomposedStringWithCanonicalMapping
        case .nfkc: return s.precomposedStringWithCompatibilityMapping
        case .nfkd: return s.decomposedStringWithCompatibilityMapping
        case .lowercase: return s.lowercased()
        case .strip(let l, let r):
            var sc = Substring(s)
            if l { while let f = sc.unicodeScalars.first, f.properties.isWhitespace { sc = Substring(sc.unicodeScalars.dropFirst()) } }
            if r { while let f = sc.unicodeScalars.last, f.properties.isWhitespace { sc = Substring(sc.unicodeScalars.dropLast()) } }
            return String(sc)
        }
    }
}

enum SplitBehavior: String {
    case removed = "Removed", isolated = "Isolated", mergedWithPrevious = "MergedWithPrevious"
    case mergedWithNext = "MergedWithNext", contiguous = "Contiguous"
}

/// Splits `scalars` at pattern matches the way the tokenizers library's SplitDelimiterBehavior does.
func splitScalars(_ scalars: [Unicode.Scalar], matches: [Range<Int>], behavior: SplitBehavior, invert: Bool) -> [[Unicode.Scalar]] {
    // Mark each stretch as (range, isMatch).
    var parts: [(Range<Int>, Bool)] = []
    var last = 0
    for m in matches where !m.isEmpty {
        if m.lowerBound > last { parts.append((last..<m.lowerBound, invert)) }
        parts.append((m, !invert))
        last = m.upperBound
    }
    if last < scalars.count { parts.append((last..<scalars.count, invert)) }
    var out: [Range<Int>] = []
    switch behavior {
    case .isolated:
        out = parts.map(\.0)
    case .removed:
        out = parts.filter { !$0.1 }.map(\.0)
    case .mergedWithPrevious:
        var previousMatch = false
        for (r, isMatch) in parts {
            if isMatch, !previousMatch, let prev = out.last {
                out[out.count - 1] = prev.lowerBound..<r.upperBound
            } else {
                out.append(r)
            }
            previousMatch = isMatch
        }
    case .mergedWithNext:
        var nextMatch = false
        for (r, isMatch) in parts.reversed() {
            if isMatch, !nextMatch, let next = out.last {
                out[out.count - 1] = r.lowerBound..<next.upperBound
            } else {
                out.append(r)
            }
            nextMatch = isMatch
        }
        out.reverse()
    case .contiguous:
        var previousMatch = false
        for (r, isMatch) in parts {
            if isMatch == previousMatch, let prev = out.last {
                out[out.count - 1] = prev.lowerBound..<r.upperBound
            } else {
                out.append(r)
            }
            previousMatch = isMatch
        }
    }
    return out.filter { !$0.isEmpty }.map { Array(scalars[$0]) }
}

indirect enum PreTokenizer {
    case sequence([PreTokenizer])
    case byteLevel(addPrefixSpace: Bool, useRegex: Bool)
    case split(TextPattern, SplitBehavior, invert: Bool)
    case metaspace(replacement: Unicode.Scalar, prepend: PrependScheme, split: Bool)
    case digits(individual: Bool)
    case whitespaceSplit

    enum PrependScheme: String { case always, first, never }

    init?(json: JSONValue?) throws {
        guard let json, !json.isNull else { return nil }
        let type = json["type"]?.string ?? ""
        switch type {
        case "Sequence":
            self = .sequence(try (json["pretokenizers"]?.array ?? []).compactMap { try PreTokenizer(json: $0) })
        case "ByteLevel":
            self = .byteLevel(addPrefixSpace: json["add_prefix_space"]?.bool ?? true, useRegex: json["use_regex"]?.bool ?? true)
        case "Split":
            guard let b = SplitBehavior(rawValue: json["behavior"]?.string ?? "") else {
                throw PeregrineError.unsupported("tokenizer.json: unsupported Split behavior")
            }
            self = .split(try TextPattern(json: json["pattern"]), b, invert: json["invert"]?.bool ?? false)
        case "Metaspace":
            let rep = json["replacement"]?.string?.unicodeScalars.first ?? "\u{2581}"
            var scheme = PrependScheme(rawValue: json["prepend_scheme"]?.string ?? "") ?? .always
            if json["prepend_scheme"] == nil, json["add_prefix_space"]?.bool == false { scheme = .never }
            self = .metaspace(replacement: rep, prepend: scheme, split: json["split"]?.bool ?? true)
        case "Digits":
            self = .digits(individual: json["individual_digits"]?.bool ?? false)
        case "WhitespaceSplit":
            self = .whitespaceSplit
        default:
            throw unsupportedComponent("pre_tokenizer", type)
        }
    }

    /// The pieces of one segment. `atStart` says whether the segment begins the input
    /// (Metaspace's "first" scheme prepends only there).
    func apply(_ pieces: [[Unicode.Scalar]], atStart: Bool) -> [[Unicode.Scalar]] {
        switch self {
        case .sequence(let ps):
            return ps.reduce(pieces) { $1.apply($0, atStart: atStart) }
        case .byteLevel(let addPrefix, let useRegex):
            return pieces.flatMap { p -> [[Unicode.Scalar]] in
                var p = p
                if addPrefix, p.first != " " { p.insert(" ", at: 0) }
                let split = useRegex ? splitScalars(p, matches: ScalarRegex.gpt2.matches(in: p), behavior: .isolated, invert: false) : [p]
                return split.map(ByteLevel.encode)
            }
        case .split(let pat, let behavior, let invert):
            return pieces.flatMap { splitScalars($0, matches: pat.matches(in: $0), behavior: behavior, invert: invert) }
        case .metaspace(let rep, let scheme, let split):
            return pieces.enumerated().flatMap { (i, p) -> [[Unicode.Scalar]] in
                var p = p.map { $0 == " " ? rep : $0 }
                let prepend = scheme == .always || (scheme == .first && atStart && i == 0)
                if prepend, p.first != rep { p.insert(rep, at: 0) }
                guard split else { return [p] }
                let ms = p.indices.filter { p[$0] == rep }.map { $0..<($0 + 1) }
                return splitScalars(p, matches: ms, behavior: .mergedWithNext, invert: false)
            }
        case .digits(let individual):
            return pieces.flatMap { p -> [[Unicode.Scalar]] in
                var ms: [Range<Int>] = []
                var i = 0
                while i < p.count {
                    if p[i].isNumberCategory {
                        var j = i + 1
                        if !individual { while j < p.count, p[j].isNumberCategory { j += 1 } }
                        ms.append(i..<j)
                        i = j
                    } else { i += 1 }
                }
                return splitScalars(p, matches: ms, behavior: .isolated, invert: false)
            }
        case .whitespaceSplit:
            return pieces.flatMap { p -> [[Unicode.Scalar]] in
                let ms = p.indices.filter { p[$0].properties.isWhitespace }.map { $0..<($0 + 1) }
                return splitScalars(p, matches: ms, behavior: .removed, invert: false)
            }
        }
    }
}

extension Unicode.Scalar {
    /// A number by its general category (Nd, Nl, No), as the reference decides it (Rust's
    /// `char::is_numeric`). Having a numeric value is not enough: CJK numerals such as 零 carry
    /// one but are letters (Lo).
    var isNumberCategory: Bool {
        switch properties.generalCategory {
        case .decimalNumber, .letterNumber, .otherNumber: return true
        default: return false
        }
    }
}

/// GPT-2's reversible map from bytes to printable unicode scalars.
enum ByteLevel {
    static let byteToScalar: [Unicode.Scalar] = {
        var table = [Unicode.Scalar](repeating: " ", count: 256)
        var n: UInt32 = 0
        for b in 0..<256 {
            let printable = (33...126).contains(b) || (161...172).contains(b) || (174...255).contains(b)
            if printable { table[b] = Unicode.Scalar(UInt32(b))! } else { table[b] = Unicode.Scalar(256 + n)!; n += 1 }
        }
        return table
    }()

    static let scalarToByte: [UInt32: UInt8] = {
        var d: [UInt32: UInt8] = [:]
        for (b, s) in byteToScalar.enumerated() { d[s.value] = UInt8(b) }
        return d
    }()

    static func encode(_ piece: [Unicode.Scalar]) -> [Unicode.Scalar] {
        var out: [Unicode.Scalar] = []
        out.reserveCapacity(piece.count)
        for s in piece { for b in String(s).utf8 { out.append(byteToScalar[Int(b)]) } }
        return out
    }

    /// Bytes of a byte-level token; a token with any scalar outside the alphabet passes through
    /// as its own UTF-8.
    static func decode(_ token: String, into bytes: inout [UInt8]) {
        let start = bytes.count
        for s in token.unicodeScalars {
            guard let b = scalarToByte[s.value] else {
                bytes.removeLast(bytes.count - start)
                bytes.append(contentsOf: token.utf8)
                return
            }
            bytes.append(b)
        }
    }
}

indirect enum TokenDecoder {
    case sequence([TokenDecoder])
    case byteLevel
    case metaspace(replacement: Unicode.Scalar, stripFirst: Bool)
    case replace(TextPattern, String)
    case byteFallback
    case fuse
    case strip(content: Unicode.Scalar, start: Int, stop: Int)

    init?(json: JSONValue?) throws {
        guard let json, !json.isNull else { return nil }
        let type = json["type"]?.string ?? ""
        switch type {
        case "Sequence":
            self = .sequence(try (json["decoders"]?.array ?? []).compactMap { try TokenDecoder(json: $0) })
        case "ByteLevel":
            self = .byteLevel
        case "Metaspace":
            let rep = json["replacement"]?.string?.unicodeScalars.first ?? "\u{2581}"
            var scheme = json["prepend_scheme"]?.string ?? "always"
            if json["prepend_scheme"] == nil, json["add_prefix_space"]?.bool == false { scheme = "never" }
            self = .metaspace(replacement: rep, stripFirst: scheme != "never")
        case "Replace":
            self = .replace(try TextPattern(json: json["pattern"]), json["content"]?.string ?? "")
        case "ByteFallback":
            self = .byteFallback
        case "Fuse":
            self = .fuse
        case "Strip":
            self = .strip(content: json["content"]?.string?.unicodeScalars.first ?? " ", start: json["start"]?.int ?? 0, stop: json["stop"]?.int ?? 0)
        default:
            throw unsupportedComponent("decoder", type)
        }
    }

    /// Transforms the token strings, like the tokenizers library's `decode_chain`.
    func apply(_ tokens: [String]) -> [String] {
        switch self {
        case .sequence(let ds):
            return ds.reduce(tokens) { $1.apply($0) }
        case .byteLevel:
            var bytes: [UInt8] = []
            for t in tokens { ByteLevel.decode(t, into: &bytes) }
            return [String(decoding: bytes, as: UTF8.self)]
        case .metaspace(let rep, let stripFirst):
            // The first token loses every replacement character; later ones turn them into spaces.
            return tokens.enumerated().map { i, t in
                var s = String.UnicodeScalarView()
                for c in t.unicodeScalars {
                    if c == rep {
                        if !(stripFirst && i == 0) { s.append(" ") }
                    } else {
                        s.append(c)
                    }
                }
                return String(s)
            }
        case .replace(let pat, let content):
            return tokens.map { pat.replacingAll(in: $0, with: content) }
        case .byteFallback:
            var out: [String] = []
            var pending: [UInt8] = []
            func flush() {
                guard !pending.isEmpty else { return }
                if let s = String(validatingUTF8Bytes: pending) { out.append(s) } else {
                    out.append(contentsOf: repeatElement("\u{FFFD}", count: pending.count))
                }
                pending.removeAll()
            }
            for t in tokens {
                if let b = byteFallbackValue(t) { pending.append(b) } else { flush(); out.append(t) }
            }
            flush()
            return out
        case .fuse:
            return [tokens.joined()]
        case .strip(let c, let start, let stop):
            return tokens.map { t in
                var s = Substring(t).unicodeScalars
                var n = 0
                while n < start, s.first == c { s.removeFirst(); n += 1 }
                n = 0
                while n < stop, s.last == c { s.removeLast(); n += 1 }
                return String(s)
            }
        }
    }
}

/// `<0x41>` -> 0x41.
func byteFallbackValue(_ t: String) -> UInt8? {
    let u = Array(t.utf8)
    guard u.count == 6, u[0] == UInt8(ascii: "<"), u[1] == UInt8(ascii: "0"), u[2] == UInt8(ascii: "x"), u[5] == UInt8(ascii: ">") else { return nil }
    return UInt8(String(decoding: u[3..<5], as: UTF8.self), radix: 16)
}

extension String {
    init?(validatingUTF8Bytes bytes: [UInt8]) {
        var it = bytes.makeIterator()
        var utf8 = UTF8()
        var s = String.UnicodeScalarView()
        loop: while true {
            switch utf8.decode(&it) {
            case .scalarValue(let v): s.append(v)
            case .emptyInput: break loop
            case .error: return nil
            }
        }
        self = String(s)
    }
}

enum PostProcessor {
    case template(single: [TemplatePiece])
    case none

    enum TemplatePiece {
        case special([Int])
        case sequence
    }

    init(json: JSONValue?) throws {
        guard let json, !json.isNull else { self = .none; return }
        switch json["type"]?.string ?? "" {
        case "TemplateProcessing":
            var pieces: [TemplatePiece] = []
            let specials = json["special_tokens"]?.object
            for item in json["single"]?.array ?? [] {
                if let sp = item["SpecialToken"], let id = sp["id"]?.string {
                    guard let ids = specials?[id]?["ids"]?.array?.compactMap(\.int) else {
                        throw PeregrineError.format("tokenizer.json: post_processor names unknown special token \(id)")
                    }
                    pieces.append(.special(ids))
                } else if item["Sequence"] != nil {
                    pieces.append(.sequence)
                }
            }
            self = .template(single: pieces)
        case "ByteLevel":
            self = .none  // offsets only
        case "Sequence":
            // Only the template matters for ids; keep the first one found.
            let subs = try (json["processors"]?.array ?? []).map { try PostProcessor(json: $0) }
            self = subs.first { if case .template = $0 { return true }; return false } ?? .none
        case let t:
            throw unsupportedComponent("post_processor", t)
        }
    }

    func apply(_ ids: [Int]) -> [Int] {
        switch self {
        case .none: return ids
        case .template(let pieces):
            var out: [Int] = []
            for p in pieces {
                switch p {
                case .special(let s): out += s
                case .sequence: out += ids
                }
            }
            return out
        }
    }
}
