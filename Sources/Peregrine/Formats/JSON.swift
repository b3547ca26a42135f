// A small, strict JSON reader. Model directories carry several JSON files (config, tokenizer with
// 150k-entry vocabularies, safetensors headers); a parser of our own keeps loading fast and turns
// every malformed byte into a positioned error instead of a trap.

public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    case number(Double)
    case string(String)
    case array([JSONValue])
    case object(JSONObject)

    public subscript(key: String) -> JSONValue? {
        if case .object(let o) = self { return o[key] }
        return nil
    }

    public var string: String? { if case .string(let s) = self { return s }; return nil }
    public var double: Double? { if case .number(let d) = self { return d }; return nil }
    public var bool: Bool? { if case .bool(let b) = self { return b }; return nil }
    public var array: [JSONValue]? { if case .array(let a) = self { return a }; return nil }
    public var object: JSONObject? { if case .object(let o) = self { return o }; return nil }
    public var isNull: Bool { if case .null = self { return true }; return false }

    /// An integer value, only if the number is integral and fits.
    public var int: Int? {
        guard case .number(let d) = self, d.rounded() == d, abs(d) < 9.0e15 else { return nil }
        return Int(d)
    }
}

/// A JSON object that keeps its keys in file order (tokenizer vocabularies and safetensors headers
/// are read in order). Small objects are searched linearly; a large one builds its hash index on
/// the first lookup, so a 150k-entry vocabulary that is only iterated is never hashed twice.
public struct JSONObject: Equatable, Sendable {
    public private(set) var keys: [String] = []
    public private(set) var values: [JSONValue] = []
    private var index = LazyIndex()

    static let linearLimit = 16

    public init() {}

    public init(_ pairs: [(String, JSONValue)]) {
        for (k, v) in pairs { self[k] = v }
    }

    public static func == (a: JSONObject, b: JSONObject) -> Bool { a.keys == b.keys && a.values == b.values }

    private func position(of key: String) -> Int? {
        if keys.count <= JSONObject.linearLimit { return keys.lastIndex(of: key) }
        return index.lookup(key, keys: keys)
    }

    public subscript(key: String) -> JSONValue? {
        get { position(of: key).map { values[$0] } }
        set {
            if let i = position(of: key) {
                if let v = newValue { values[i] = v }
            } else if let v = newValue {
                append(key, v)
            }
        }
    }

    /// Appends without looking for an existing key (the parser keeps the last of duplicates by
    /// looking up only when asked).
    mutating func append(_ key: String, _ value: JSONValue) {
        if !isKnownUniquelyReferenced(&index) { index = LazyIndex() }
        index.invalidate()
        keys.append(key)
        values.append(value)
    }

    public var count: Int { keys.count }
    public var pairs: Zip2Sequence<[String], [JSONValue]> { zip(keys, values) }
}

/// The hash index of a large JSONObject, built on demand.
final class LazyIndex: @unchecked Sendable {
    private var map: [String: Int]?
    private let lock = Lock()

    func invalidate() {
        lock.lock()
        map = nil
        lock.unlock()
    }

    func lookup(_ key: String, keys: [String]) -> Int? {
        lock.lock()
        defer { lock.unlock() }
        if map == nil {
            var m = [String: Int](minimumCapacity: keys.count)
            // The last occurrence of a duplicated key wins, as in most JSON readers.
            for (i, k) in keys.enumerated() { m[k] = i }
            map = m
        }
        return map![key]
    }
}

public struct JSONError: Error, CustomStringConvertible {
    public let message: String
    public let offset: Int
    public var description: String { "invalid JSON at byte \(offset): \(message)" }
}

public enum JSON {
    /// Parses a complete JSON document.
    public static func parse(_ bytes: UnsafeRawBufferPointer) throws -> JSONValue {
        var p = JSONParser(bytes.bindMemory(to: UInt8.self))
        p.skipSpace()
        let v = try p.value(depth: 0)
        p.skipSpace()
        guard p.pos == p.end else { throw p.error("trailing characters after the document") }
        return v
    }

    public static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        try bytes.withUnsafeBytes { try parse($0) }
    }

    public static func parse(_ text: String) throws -> JSONValue {
        try parse(Array(text.utf8))
    }
}

private struct JSONParser {
    let buf: UnsafeBufferPointer<UInt8>
    var pos = 0
    let end: Int
    static let maxDepth = 512

    init(_ buf: UnsafeBufferPointer<UInt8>) {
        self.buf = buf
        self.end = buf.count
    }

    func error(_ m: String) -> JSONError { JSONError(message: m, offset: pos) }

    @inline(__always) mutating func skipSpace() {
        while pos < end {
            let c = buf[pos]
            if c == 0x20 || c == 0x0A || c == 0x0D || c == 0x09 { pos += 1 } else { break }
        }
    }

    mutating func value(depth: Int) throws -> JSONValue {
        guard depth < JSONParser.maxDepth else { throw error("nesting deeper than \(JSONParser.maxDepth)") }
        guard pos < end else { throw error("unexpected end of input") }
        switch buf[pos] {
        case UInt8(ascii: "{"): return try object(depth: depth)
        case UInt8(ascii: "["): return try array(depth: depth)
        case UInt8(ascii: "\""): return .string(try string())
        case UInt8(ascii: "t"): try literal("true"); return .bool(true)
        case UInt8(ascii: "f"): try literal("false"); return .bool(false)
        case UInt8(ascii: "n"): try literal("null"); return .null
        case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return .number(try number())
        case UInt8(ascii: "N"): try literal("NaN"); return .number(.nan)  // Python's json writes these
        case UInt8(ascii: "I"): try literal("Infinity"); return .number(.infinity)
        default: throw error("unexpected character '\(Character(Unicode.Scalar(buf[pos])))'")
        }
    }

    mutating func literal(_ word: StaticString) throws {
        let n = word.utf8CodeUnitCount
        guard end - pos >= n else { throw error("unexpected end of input") }
        let w = word.utf8Start
        for i in 0..<n where buf[pos + i] != w[i] { throw error("invalid literal") }
        pos += n
    }

    mutating func object(depth: Int) throws -> JSONValue {
        pos += 1
        var obj = JSONObject()
        skipSpace()
        if pos < end && buf[pos] == UInt8(ascii: "}") { pos += 1; return .object(obj) }
        while true {
            skipSpace()
            guard pos < end, buf[pos] == UInt8(ascii: "\"") else { throw error("expected a string key") }
            let key = try string()
            skipSpace()
            guard pos < end, buf[pos] == UInt8(ascii: ":") else { throw error("expected ':'") }
            pos += 1
            skipSpace()
            obj.append(key, try value(depth: depth + 1))
            skipSpace()
            guard pos < end else { throw error("unexpected end of input in object") }
            if buf[pos] == UInt8(ascii: ",") { pos += 1; continue }
            if buf[pos] == UInt8(ascii: "}") { pos += 1; return .object(obj) }
            throw error("expected ',' or '}'")
        }
    }

    mutating func array(depth: Int) throws -> JSONValue {
        pos += 1
        var arr: [JSONValue] = []
        skipSpace()
        if pos < end && buf[pos] == UInt8(ascii: "]") { pos += 1; return .array(arr) }
        while true {
            skipSpace()
            arr.append(try value(depth: depth + 1))
            skipSpace()
            guard pos < end else { throw error("unexpected end of input in array") }
            if buf[pos] == UInt8(ascii: ",") { pos += 1; continue }
            if buf[pos] == UInt8(ascii: "]") { pos += 1; return .array(arr) }
            throw error("expected ',' or ']'")
        }
    }

    mutating func hex4() throws -> UInt32 {
        guard end - pos >= 4 else { throw error("truncated \\u escape") }
        var v: UInt32 = 0
        for _ in 0..<4 {
            let c = buf[pos]
            let d: UInt32
            switch c {
            case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - UInt8(ascii: "0"))
            case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - UInt8(ascii: "a") + 10)
            case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - UInt8(ascii: "A") + 10)
            default: throw error("invalid hex digit in \\u escape")
            }
            v = v << 4 | d
            pos += 1
        }
        return v
    }

    mutating func string() throws -> String {
        pos += 1
        let start = pos
        // Fast path: no escapes.
        while pos < end {
            let c = buf[pos]
            if c == UInt8(ascii: "\"") {
                let s = String(decoding: UnsafeBufferPointer(rebasing: buf[start..<pos]), as: UTF8.self)
                pos += 1
                return s
            }
            if c == UInt8(ascii: "\\") { break }
            if c < 0x20 { throw error("control character in string") }
            pos += 1
        }
        var out = [UInt8](UnsafeBufferPointer(rebasing: buf[start..<pos]))
        while pos < end {
            let c = buf[pos]
            if c == UInt8(ascii: "\"") {
                pos += 1
                return String(decoding: out, as: UTF8.self)
            }
            if c < 0x20 { throw error("control character in string") }
            if c != UInt8(ascii: "\\") { out.append(c); pos += 1; continue }
            pos += 1
            guard pos < end else { break }
            let e = buf[pos]
            pos += 1
            switch e {
            case UInt8(ascii: "\""): out.append(0x22)
            case UInt8(ascii: "\\"): out.append(0x5C)
            case UInt8(ascii: "/"): out.append(0x2F)
            case UInt8(ascii: "b"): out.append(0x08)
            case UInt8(ascii: "f"): out.append(0x0C)
            case UInt8(ascii: "n"): out.append(0x0A)
            case UInt8(ascii: "r"): out.append(0x0D)
            case UInt8(ascii: "t"): out.append(0x09)
            case UInt8(ascii: "u"):
                var cp = try hex4()
                if cp >= 0xD800 && cp < 0xDC00 {
                    // A high surrogate should be followed by an escaped low surrogate.
                    if end - pos >= 6 && buf[pos] == UInt8(ascii: "\\") && buf[pos + 1] == UInt8(ascii: "u") {
                        let save = pos
                        pos += 2
                        let lo = try hex4()
                        if lo >= 0xDC00 && lo < 0xE000 {
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                        } else {
                            pos = save
                            cp = 0xFFFD
                        }
                    } else {
                        cp = 0xFFFD
                    }
                } else if cp >= 0xDC00 && cp < 0xE000 {
                    cp = 0xFFFD
                }
                let scalar = Unicode.Scalar(cp) ?? "\u{FFFD}"
                out.append(contentsOf: Array(String(Character(scalar)).utf8))
            default: throw error("invalid escape '\\\(Character(Unicode.Scalar(e)))'")
            }
        }
        throw error("unterminated string")
    }

    mutating func number() throws -> Double {
        let start = pos
        if buf[pos] == UInt8(ascii: "-") { pos += 1 }
        var intValue: Int64 = 0
        var digits = 0
        var simple = true
        while pos < end, buf[pos] >= 0x30, buf[pos] <= 0x39 {
            if digits < 18 { intValue = intValue * 10 + Int64(buf[pos] - 0x30) } else { simple = false }
            digits += 1
            pos += 1
        }
        guard digits > 0 else { throw error("invalid number") }
        if pos < end, buf[pos] == UInt8(ascii: ".") {
            simple = false
            pos += 1
            var frac = 0
            while pos < end, buf[pos] >= 0x30, buf[pos] <= 0x39 { pos += 1; frac += 1 }
            guard frac > 0 else { throw error("invalid number") }
        }
        if pos < end, buf[pos] == UInt8(ascii: "e") || buf[pos] == UInt8(ascii: "E") {
            simple = false
            pos += 1
            if pos < end, buf[pos] == UInt8(ascii: "+") || buf[pos] == UInt8(ascii: "-") { pos += 1 }
            var ed = 0
            while pos < end, buf[pos] >= 0x30, buf[pos] <= 0x39 { pos += 1; ed += 1 }
            guard ed > 0 else { throw error("invalid number") }
        }
        if simple {
            return buf[start] == UInt8(ascii: "-") ? -Double(intValue) : Double(intValue)
        }
        let text = String(decoding: UnsafeBufferPointer(rebasing: buf[start..<pos]), as: UTF8.self)
        guard let d = Double(text) else { throw error("invalid number") }
        return d
    }
}

/// Serialises JSON values (for safetensors headers and machine-readable output).
public enum JSONWriter {
    public static func write(_ v: JSONValue) -> String {
        var out = ""
        write(v, into: &out)
        return out
    }

    static func write(_ v: JSONValue, into out: inout String) {
        switch v {
        case .null: out += "null"
        case .bool(let b): out += b ? "true" : "false"
        case .number(let d):
            if d.rounded() == d && abs(d) < 1e15 { out += String(Int64(d)) } else { out += "\(d)" }
        case .string(let s): writeString(s, into: &out)
        case .array(let a):
            out += "["
            for (i, x) in a.enumerated() {
                if i > 0 { out += "," }
                write(x, into: &out)
            }
            out += "]"
        case .object(let o):
            out += "{"
            for (i, (k, x)) in o.pairs.enumerated() {
                if i > 0 { out += "," }
                writeString(k, into: &out)
                out += ":"
                write(x, into: &out)
            }
            out += "}"
        }
    }

    static func writeString(_ s: String, into out: inout String) {
        out += "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u.value < 0x20 {
                    let h = String(u.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - h.count) + h
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        out += "\""
    }
}
