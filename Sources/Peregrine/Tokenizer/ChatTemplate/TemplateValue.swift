// The values a chat template computes with. Templates are written against Python's data model
// (jinja2 evaluates them in Python), and their output is compared byte for byte with Python's, so
// these values keep Python's distinctions and printing: ints and floats stay apart, `True` and
// `None` print capitalised, containers print as Python's repr, strings index by code point.

/// An error raised while parsing or rendering a chat template.
public struct ChatTemplateError: Error, CustomStringConvertible, Equatable {
    public enum Kind: Sendable, Equatable {
        /// The template is malformed, or uses a construct the interpreter lacks.
        case syntax
        /// Rendering failed (a type error, an undefined value used strictly, a limit reached).
        case render
        /// The template called `raise_exception(message)`; `message` is its argument.
        case raised
    }

    public let kind: Kind
    public let message: String
    /// The template line the error points at (1-based), when known.
    public let line: Int?

    public init(_ kind: Kind, _ message: String, line: Int? = nil) {
        self.kind = kind
        self.message = message
        self.line = line
    }

    public var description: String {
        switch kind {
        case .raised: return message
        case .syntax, .render:
            if let line { return "\(message) at line \(line)" }
            return message
        }
    }
}

func renderError(_ message: String) -> ChatTemplateError { ChatTemplateError(.render, message) }

/// A value of jinja2's default `Undefined`: printing it gives "", it is falsy and iterates as
/// empty, but arithmetic, attribute access, calls and ordering on it fail with `hint`.
struct UndefinedValue {
    let hint: String
}

/// A dict that keeps insertion order, as Python's does.
struct PyDict {
    private(set) var keys: [TemplateValue] = []
    private(set) var values: [TemplateValue] = []
    private var index: [HashKey: Int] = [:]

    init() {}

    init(_ pairs: [(TemplateValue, TemplateValue)]) throws {
        for (k, v) in pairs { try set(k, v) }
    }

    var count: Int { keys.count }
    var pairs: Zip2Sequence<[TemplateValue], [TemplateValue]> { zip(keys, values) }

    func get(_ key: TemplateValue) -> TemplateValue? {
        guard let h = try? HashKey(key), let i = index[h] else { return nil }
        return values[i]
    }

    func get(_ key: String) -> TemplateValue? { get(.string(key)) }

    mutating func set(_ key: TemplateValue, _ value: TemplateValue) throws {
        let h = try HashKey(key)
        if let i = index[h] {
            values[i] = value
        } else {
            index[h] = keys.count
            keys.append(key)
            values.append(value)
        }
    }
}

/// Python's hashing for dict keys: equal numbers (True, 1, 1.0) are one key; lists and dicts
/// are unhashable.
enum HashKey: Hashable {
    case none
    case number(Double)
    case bigInt(Int)
    case string([UInt8])
    case tuple([HashKey])

    init(_ v: TemplateValue) throws {
        switch v {
        case .none: self = .none
        case .bool(let b): self = .number(b ? 1 : 0)
        case .int(let i): self = abs(i) < (1 << 53) ? .number(Double(i)) : .bigInt(i)
        case .float(let d): self = .number(d)
        case .string(let s), .markup(let s): self = .string(Array(s.utf8))
        case .tuple(let items): self = .tuple(try items.map(HashKey.init))
        default: throw renderError("unhashable type: '\(v.typeName)'")
        }
    }
}

/// `namespace(...)`: the one mutable object a template can make; `{% set ns.x = ... %}` writes
/// through to every holder, so it is a reference.
final class Namespace {
    var attributes: PyDict
    init(_ attributes: PyDict) { self.attributes = attributes }
}

/// Anything a template can call: a macro, a global function, a bound method, `caller`.
final class TemplateCallable {
    let name: String
    let body: (Interpreter, [TemplateValue], [(String, TemplateValue)]) throws -> TemplateValue
    init(_ name: String, _ body: @escaping (Interpreter, [TemplateValue], [(String, TemplateValue)]) throws -> TemplateValue) {
        self.name = name
        self.body = body
    }
}

/// The `loop` variable of a for loop.
final class LoopState {
    let items: [TemplateValue]
    var index0 = 0
    var lastChanged: TemplateValue?
    init(items: [TemplateValue]) { self.items = items }
}

enum TemplateValue {
    case undefined(UndefinedValue)
    case none
    case bool(Bool)
    case int(Int)
    case float(Double)
    case string(String)
    case list([TemplateValue])
    case tuple([TemplateValue])
    case dict(PyDict)
    case namespace(Namespace)
    case callable(TemplateCallable)
    case loop(LoopState)
    /// A one-pass iterator, what jinja2's map, select, reverse, unique, items... return: always
    /// truthy, without a length, not JSON-serialisable; `|list` turns it into a list.
    case iterator([TemplateValue])
    /// A jinja2 generator over something that cannot be iterated: it only fails, with this
    /// message, when something walks it (`zero | unique` is a value until then).
    case failingIterator(String)
    /// What dict.keys(), .values() and .items() return ("dict_keys", ...): iterable and sized,
    /// but not indexable, and printed as `dict_keys([...])`.
    case view(String, [TemplateValue])
    /// Text marked safe (`|safe`, `|e`): adding a plain string to it HTML-escapes that string,
    /// as markupsafe's Markup does. Everywhere else it behaves as a str.
    case markup(String)

    /// The value with Markup read as a plain str, for the operations that do not tell them apart.
    var plain: TemplateValue {
        if case .markup(let s) = self { return .string(s) }
        return self
    }

    static func undefined(_ hint: String) -> TemplateValue { .undefined(UndefinedValue(hint: hint)) }

    /// The name Python gives the type, for error messages.
    var typeName: String {
        switch self {
        case .undefined: return "Undefined"
        case .none: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .float: return "float"
        case .string: return "str"
        case .list: return "list"
        case .tuple: return "tuple"
        case .dict: return "dict"
        case .namespace: return "Namespace"
        case .callable: return "function"
        case .loop: return "LoopContext"
        case .iterator, .failingIterator: return "generator"
        case .view(let kind, _): return kind
        case .markup: return "Markup"
        }
    }

    var isUndefined: Bool { if case .undefined = self { return true }; return false }
    var isNone: Bool { if case .none = self { return true }; return false }

    var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case .bool(let b): return b
        case .int(let i): return i != 0
        case .float(let d): return d != 0
        case .string(let s), .markup(let s): return !s.isEmpty
        case .list(let a), .tuple(let a), .view(_, let a): return !a.isEmpty
        case .dict(let d): return d.count > 0
        case .namespace, .callable, .loop, .iterator, .failingIterator: return true
        }
    }

    /// The value as a number, if it is one (bools count, as in Python).
    var number: Double? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return Double(i)
        case .float(let d): return d
        default: return nil
        }
    }

    /// The value as an integer, if it is an int or a bool.
    var integer: Int? {
        switch self {
        case .bool(let b): return b ? 1 : 0
        case .int(let i): return i
        default: return nil
        }
    }

    var isNumber: Bool { number != nil }
}

// MARK: - Conversion from and to JSON

extension TemplateValue {
    /// Message data arrives as JSON; integral numbers become ints, others floats, as Python's
    /// json.loads gives for JSON written without a fraction for whole numbers.
    init(json: JSONValue) {
        switch json {
        case .null: self = .none
        case .bool(let b): self = .bool(b)
        case .number(let d):
            if d.rounded() == d && abs(d) < 9.0e15 { self = .int(Int(d)) } else { self = .float(d) }
        case .string(let s): self = .string(s)
        case .array(let a): self = .list(a.map(TemplateValue.init(json:)))
        case .object(let o):
            var d = PyDict()
            // String keys are always hashable.
            for (k, v) in o.pairs { try? d.set(.string(k), TemplateValue(json: v)) }
            self = .dict(d)
        }
    }
}

// MARK: - Python's str() and repr()

/// Output budget shared by the printers, so printing a huge (or self-multiplying) structure
/// stops with an error instead of exhausting memory.
struct PrintBudget {
    var remaining: Int
    mutating func spend(_ s: String) throws {
        remaining -= s.utf8.count
        if remaining < 0 { throw renderError("output exceeds the size limit") }
    }
}

enum PyFormat {
    /// Python's repr of a float: the shortest digits that round-trip, in positional notation
    /// for exponents in [-4, 16), scientific otherwise, always with a '.0' or an exponent.
    static func float(_ d: Double) -> String {
        if d.isNaN { return "nan" }
        if d.isInfinite { return d < 0 ? "-inf" : "inf" }
        if d == 0 { return d.sign == .minus ? "-0.0" : "0.0" }
        let (digits, exponent) = shortestDigits(abs(d))
        let sign = d < 0 ? "-" : ""
        // `exponent` is the power of ten of the first digit.
        if exponent < -4 || exponent >= 16 {
            var m = String(digits.first ?? "0")
            if digits.count > 1 { m += "." + digits.dropFirst() }
            let e = abs(exponent)
            return sign + m + "e" + (exponent < 0 ? "-" : "+") + (e < 10 ? "0" : "") + String(e)
        }
        if exponent < 0 {
            return sign + "0." + String(repeating: "0", count: -exponent - 1) + digits
        }
        let intCount = exponent + 1
        if digits.count <= intCount {
            return sign + digits + String(repeating: "0", count: intCount - digits.count) + ".0"
        }
        let split = digits.index(digits.startIndex, offsetBy: intCount)
        return sign + digits[..<split] + "." + digits[split...]
    }

    /// The shortest round-trip decimal digits of a positive finite double and the power of ten
    /// of the first digit, read off Swift's own shortest representation.
    static func shortestDigits(_ d: Double) -> (String, Int) {
        let text = d.description  // e.g. "1.5", "1e-05", "1.2345e+20", "100.0"
        var mantissa = Substring(text)
        var exp = 0
        if let e = text.firstIndex(where: { $0 == "e" || $0 == "E" }) {
            mantissa = text[..<e]
            exp = Int(text[text.index(after: e)...]) ?? 0
        }
        var intPart = mantissa
        var fracPart: Substring = ""
        if let dot = mantissa.firstIndex(of: ".") {
            intPart = mantissa[..<dot]
            fracPart = mantissa[mantissa.index(after: dot)...]
        }
        var digits = String(intPart) + String(fracPart)
        var pointPos = intPart.count + exp  // digits before the decimal point
        while digits.hasPrefix("0") && digits.count > 1 {
            digits.removeFirst()
            pointPos -= 1
        }
        while digits.hasSuffix("0") && digits.count > 1 { digits.removeLast() }
        return (digits, pointPos - 1)
    }

    /// Python's repr of a str: single quotes unless the text has a single quote and no double.
    static func stringRepr(_ s: String) -> String {
        let useDouble = s.contains("'") && !s.contains("\"")
        let quote: Character = useDouble ? "\"" : "'"
        var out = String(quote)
        for u in s.unicodeScalars {
            switch u {
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if u == "'" && !useDouble { out += "\\'"; continue }
                if isPrintable(u) {
                    out.unicodeScalars.append(u)
                } else if u.value < 0x100 {
                    out += "\\x" + hex(u.value, 2)
                } else if u.value < 0x10000 {
                    out += "\\u" + hex(u.value, 4)
                } else {
                    out += "\\U" + hex(u.value, 8)
                }
            }
        }
        out.append(quote)
        return out
    }

    static func hex(_ v: UInt32, _ width: Int) -> String {
        let h = String(v, radix: 16)
        return String(repeating: "0", count: max(0, width - h.count)) + h
    }

    /// Python's str.isprintable for one character: everything but the "Other" and "Separator"
    /// categories, with the plain space allowed.
    static func isPrintable(_ u: Unicode.Scalar) -> Bool {
        if u == " " { return true }
        switch u.properties.generalCategory {
        case .control, .format, .surrogate, .privateUse, .unassigned,
             .lineSeparator, .paragraphSeparator, .spaceSeparator:
            return false
        default:
            return true
        }
    }
}

extension TemplateValue {
    /// Python's str(): what `{{ value }}` prints.
    func str() throws -> String {
        switch self {
        case .undefined: return ""
        case .string(let s), .markup(let s): return s
        default:
            var budget = PrintBudget(remaining: Interpreter.printLimit)
            var out = ""
            try writeRepr(into: &out, budget: &budget)
            return out
        }
    }

    /// Python's repr().
    func repr() throws -> String {
        var budget = PrintBudget(remaining: Interpreter.printLimit)
        var out = ""
        try writeRepr(into: &out, budget: &budget)
        return out
    }

    func writeRepr(into out: inout String, budget: inout PrintBudget, depth: Int = 0) throws {
        guard depth < 512 else { throw renderError("structure nested too deeply to print") }
        func put(_ s: String) throws {
            try budget.spend(s)
            out += s
        }
        switch self {
        case .undefined: try put("Undefined")
        case .none: try put("None")
        case .bool(let b): try put(b ? "True" : "False")
        case .int(let i): try put(String(i))
        case .float(let d): try put(PyFormat.float(d))
        case .string(let s): try put(PyFormat.stringRepr(s))
        case .list(let items):
            try put("[")
            for (i, x) in items.enumerated() {
                if i > 0 { try put(", ") }
                try x.writeRepr(into: &out, budget: &budget, depth: depth + 1)
            }
            try put("]")
        case .tuple(let items):
            try put("(")
            for (i, x) in items.enumerated() {
                if i > 0 { try put(", ") }
                try x.writeRepr(into: &out, budget: &budget, depth: depth + 1)
            }
            try put(items.count == 1 ? ",)" : ")")
        case .dict(let d):
            try put("{")
            for (i, (k, v)) in d.pairs.enumerated() {
                if i > 0 { try put(", ") }
                try k.writeRepr(into: &out, budget: &budget, depth: depth + 1)
                try put(": ")
                try v.writeRepr(into: &out, budget: &budget, depth: depth + 1)
            }
            try put("}")
        case .namespace(let ns):
            try put("<Namespace ")
            try TemplateValue.dict(ns.attributes).writeRepr(into: &out, budget: &budget, depth: depth + 1)
            try put(">")
        case .callable(let c): try put("<function \(c.name)>")
        case .loop(let l): try put("<LoopContext \(l.index0 + 1)/\(l.items.count)>")
        case .iterator, .failingIterator: try put("<generator object>")
        case .view(let kind, let items):
            try put(kind + "(")
            try TemplateValue.list(items).writeRepr(into: &out, budget: &budget, depth: depth + 1)
            try put(")")
        case .markup(let s): try put("Markup(" + PyFormat.stringRepr(s) + ")")
        }
    }
}

// MARK: - Equality and ordering, as Python's == and <

extension TemplateValue {
    func pyEquals(_ other: TemplateValue) -> Bool {
        switch (self.plain, other.plain) {
        case (.undefined, .undefined), (.none, .none): return true
        case (.string(let a), .string(let b)): return a.unicodeScalars.elementsEqual(b.unicodeScalars)
        case (.list(let a), .list(let b)), (.tuple(let a), .tuple(let b)):
            return a.count == b.count && zip(a, b).allSatisfy { $0.pyEquals($1) }
        case (.dict(let a), .dict(let b)):
            guard a.count == b.count else { return false }
            for (k, v) in a.pairs {
                guard let w = b.get(k), v.pyEquals(w) else { return false }
            }
            return true
        case (.namespace(let a), .namespace(let b)): return a === b
        case (.view(let k, let a), .view(let l, let b)):
            // Key and item views compare as sets; value views never equal another view.
            guard k == l, k != "dict_values", a.count == b.count else { return false }
            return a.allSatisfy { x in b.contains { x.pyEquals($0) } }
        case (.callable(let a), .callable(let b)): return a === b
        case (.loop(let a), .loop(let b)): return a === b
        default:
            if case .int(let a) = self, case .int(let b) = other { return a == b }
            if let a = number, let b = other.number { return a == b }
            return false
        }
    }

    /// Python's ordering: numbers with numbers, strings by code point, sequences of the same
    /// kind lexicographically; anything else is a TypeError.
    func pyCompare(_ other: TemplateValue, _ op: String) throws -> Int {
        switch (self.plain, other.plain) {
        case (.string(let a), .string(let b)):
            return TemplateValue.compareScalars(a, b)
        case (.list(let a), .list(let b)), (.tuple(let a), .tuple(let b)):
            for (x, y) in zip(a, b) where !x.pyEquals(y) {
                return try x.pyCompare(y, op)
            }
            return a.count < b.count ? -1 : (a.count > b.count ? 1 : 0)
        default:
            if case .int(let a) = self, case .int(let b) = other { return a < b ? -1 : (a > b ? 1 : 0) }
            if let a = number, let b = other.number {
                if a < b { return -1 }
                if a > b { return 1 }
                return 0
            }
            if case .undefined(let u) = self { throw renderError(u.hint) }
            if case .undefined(let u) = other { throw renderError(u.hint) }
            throw renderError("'\(op)' not supported between instances of '\(typeName)' and '\(other.typeName)'")
        }
    }

    static func compareScalars(_ a: String, _ b: String) -> Int {
        var i = a.unicodeScalars.makeIterator()
        var j = b.unicodeScalars.makeIterator()
        while true {
            switch (i.next(), j.next()) {
            case (nil, nil): return 0
            case (nil, _): return -1
            case (_, nil): return 1
            case (let x?, let y?):
                if x.value != y.value { return x.value < y.value ? -1 : 1 }
            }
        }
    }
}
