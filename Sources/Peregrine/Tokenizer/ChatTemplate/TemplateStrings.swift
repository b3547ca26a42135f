import Foundation

// Python's str methods, working on code points (Python indexes strings by code point, Swift by
// grapheme cluster, so every position here is a Unicode scalar offset).

typealias Scalars = [Unicode.Scalar]

enum StringOps {
    static func scalars(_ s: String) -> Scalars { Array(s.unicodeScalars) }
    static func string<C: Collection>(_ s: C) -> String where C.Element == Unicode.Scalar {
        var v = String.UnicodeScalarView()
        v.append(contentsOf: s)
        return String(v)
    }

    static func isSpace(_ u: Unicode.Scalar) -> Bool { TemplateLexer.isSpace(u) }

    static func find(_ hay: Scalars, _ needle: Scalars, from start: Int, to end: Int? = nil) -> Int? {
        let stop = min(end ?? hay.count, hay.count)
        if needle.isEmpty { return start <= stop ? start : nil }
        guard stop - needle.count >= start else { return nil }
        var i = max(0, start)
        while i + needle.count <= stop {
            if hay[i] == needle[0] && hay[i..<(i + needle.count)].elementsEqual(needle) { return i }
            i += 1
        }
        return nil
    }

    static func rfind(_ hay: Scalars, _ needle: Scalars) -> Int? {
        if needle.isEmpty { return hay.count }
        var i = hay.count - needle.count
        while i >= 0 {
            if hay[i..<(i + needle.count)].elementsEqual(needle) { return i }
            i -= 1
        }
        return nil
    }

    static func count(_ hay: Scalars, _ needle: Scalars) -> Int {
        if needle.isEmpty { return hay.count + 1 }
        var n = 0
        var i = 0
        while let j = find(hay, needle, from: i) { n += 1; i = j + needle.count }
        return n
    }

    static func strip(_ s: String, _ chars: String?, left: Bool, right: Bool) -> String {
        let a = scalars(s)
        let set = chars.map { Set($0.unicodeScalars) }
        func strippable(_ u: Unicode.Scalar) -> Bool { set?.contains(u) ?? isSpace(u) }
        var lo = 0, hi = a.count
        if left { while lo < hi && strippable(a[lo]) { lo += 1 } }
        if right { while hi > lo && strippable(a[hi - 1]) { hi -= 1 } }
        return string(a[lo..<hi])
    }

    static func replace(_ s: String, _ old: String, _ new: String, count limit: Int) -> String {
        let a = scalars(s), o = scalars(old), n = scalars(new)
        var out: Scalars = []
        var done = 0
        if o.isEmpty {
            // Python inserts the replacement between every character and at both ends.
            for u in a {
                if limit < 0 || done < limit { out += n; done += 1 }
                out.append(u)
            }
            if limit < 0 || done < limit { out += n }
            return string(out)
        }
        var i = 0
        while i < a.count {
            if (limit < 0 || done < limit), let j = find(a, o, from: i) {
                out += a[i..<j]
                out += n
                i = j + o.count
                done += 1
            } else {
                out += a[i...]
                break
            }
        }
        return string(out)
    }

    /// str.split(sep, maxsplit); with no separator, runs of whitespace split and ends are dropped.
    static func split(_ s: String, _ sep: String?, _ maxsplit: Int) throws -> [String] {
        let a = scalars(s)
        var parts: [String] = []
        if let sep {
            let p = scalars(sep)
            guard !p.isEmpty else { throw renderError("empty separator") }
            var i = 0
            while maxsplit < 0 || parts.count < maxsplit, let j = find(a, p, from: i) {
                parts.append(string(a[i..<j]))
                i = j + p.count
            }
            parts.append(string(a[i...]))
            return parts
        }
        var i = 0
        while i < a.count {
            while i < a.count && isSpace(a[i]) { i += 1 }
            if i == a.count { break }
            if maxsplit >= 0 && parts.count == maxsplit {
                var end = a.count
                while end > i && isSpace(a[end - 1]) { end -= 1 }
                parts.append(string(a[i..<end]))
                return parts
            }
            let start = i
            while i < a.count && !isSpace(a[i]) { i += 1 }
            parts.append(string(a[start..<i]))
        }
        return parts
    }

    static func rsplit(_ s: String, _ sep: String?, _ maxsplit: Int) throws -> [String] {
        if maxsplit < 0 { return try split(s, sep, maxsplit) }
        // Split from the right by reversing everything.
        let rev = string(scalars(s).reversed())
        let revSep = sep.map { string(scalars($0).reversed()) }
        return try split(rev, revSep, maxsplit).reversed().map { string(scalars($0).reversed()) }
    }

    static func splitlines(_ s: String, keepends: Bool = false) -> [String] {
        let a = scalars(s)
        var lines: [String] = []
        var start = 0
        var i = 0
        while i < a.count {
            if TemplateLexer.isLineBreak(a[i]) {
                var end = i + 1
                if a[i] == "\r", i + 1 < a.count, a[i + 1] == "\n" { end = i + 2 }
                lines.append(string(a[start..<(keepends ? end : i)]))
                start = end
                i = end
            } else {
                i += 1
            }
        }
        if start < a.count { lines.append(string(a[start...])) }
        return lines
    }

    static func isCased(_ u: Unicode.Scalar) -> Bool { u.properties.isLowercase || u.properties.isUppercase || u.properties.generalCategory == .titlecaseLetter }

    /// str.title(): a cased character after an uncased one starts a word.
    static func title(_ s: String) -> String {
        var out = ""
        var previousCased = false
        for u in s.unicodeScalars {
            if previousCased { out += String(u).lowercased() } else { out += u.properties.titlecaseMapping }
            previousCased = isCased(u)
        }
        return out
    }

    static func capitalize(_ s: String) -> String {
        var out = ""
        for (i, u) in s.unicodeScalars.enumerated() {
            out += i == 0 ? u.properties.titlecaseMapping : String(u).lowercased()
        }
        return out
    }

    static func swapcase(_ s: String) -> String {
        var out = ""
        for u in s.unicodeScalars {
            if u.properties.isUppercase { out += String(u).lowercased() }
            else if u.properties.isLowercase { out += String(u).uppercased() }
            else { out.unicodeScalars.append(u) }
        }
        return out
    }

    static func isLower(_ s: String) -> Bool {
        var cased = false
        for u in s.unicodeScalars {
            if u.properties.isUppercase || u.properties.generalCategory == .titlecaseLetter { return false }
            if u.properties.isLowercase { cased = true }
        }
        return cased
    }

    static func isUpper(_ s: String) -> Bool {
        var cased = false
        for u in s.unicodeScalars {
            if u.properties.isLowercase || u.properties.generalCategory == .titlecaseLetter { return false }
            if u.properties.isUppercase { cased = true }
        }
        return cased
    }

    /// Python's str.center, which puts the odd extra space on the left when the width is odd.
    static func center(_ s: String, _ width: Int, _ fill: String) -> String {
        let n = s.unicodeScalars.count
        guard width > n else { return s }
        let pad = width - n
        let left = pad / 2 + (pad & width & 1)
        return String(repeating: fill, count: left) + s + String(repeating: fill, count: pad - left)
    }
}

// MARK: - Formatting: str.format and the % operator

enum StringFormat {
    struct Spec {
        var fill: Character = " "
        var align: Character?
        var sign: Character?
        var zero = false
        var width = 0
        var grouping = false
        var precision: Int?
        var type: Character?
    }

    static func parseSpec(_ text: String) throws -> Spec {
        var spec = Spec()
        let chars = Array(text)
        var i = 0
        let aligns: Set<Character> = ["<", ">", "^", "="]
        if chars.count >= 2, aligns.contains(chars[1]) {
            spec.fill = chars[0]
            spec.align = chars[1]
            i = 2
        } else if let c = chars.first, aligns.contains(c) {
            spec.align = c
            i = 1
        }
        if i < chars.count, chars[i] == "+" || chars[i] == "-" || chars[i] == " " { spec.sign = chars[i]; i += 1 }
        if i < chars.count, chars[i] == "0" { spec.zero = true; i += 1 }
        var w = 0
        while i < chars.count, let d = chars[i].wholeNumberValue, chars[i].isASCII { w = w * 10 + d; i += 1 }
        spec.width = w
        if i < chars.count, chars[i] == "," { spec.grouping = true; i += 1 }
        if i < chars.count, chars[i] == "." {
            i += 1
            var p = 0
            var any = false
            while i < chars.count, let d = chars[i].wholeNumberValue, chars[i].isASCII { p = p * 10 + d; i += 1; any = true }
            guard any else { throw renderError("format specifier missing precision") }
            spec.precision = p
        }
        if i < chars.count { spec.type = chars[i]; i += 1 }
        guard i == chars.count else { throw renderError("invalid format specifier '\(text)'") }
        return spec
    }

    /// Thousands separators in the integer part of a formatted number.
    static func group(_ text: String) -> String {
        var digits = Substring(text)
        var sign = ""
        if digits.hasPrefix("-") { sign = "-"; digits = digits.dropFirst() }
        let intPart = digits.prefix { $0.isASCII && $0.isNumber }
        let rest = digits.dropFirst(intPart.count)
        var out = ""
        for (i, c) in intPart.enumerated() {
            if i > 0 && (intPart.count - i) % 3 == 0 { out.append(",") }
            out.append(c)
        }
        return sign + out + rest
    }

    static func fixed(_ d: Double, _ precision: Int) -> String {
        if d.isNaN { return "nan" }
        if d.isInfinite { return d < 0 ? "-inf" : "inf" }
        return String(format: "%.\(min(precision, 100))f", d)
    }

    static func apply(_ spec: Spec, to v: TemplateValue) throws -> String {
        var body: String
        var numeric = false
        switch spec.type {
        case "d":
            guard let i = v.integer else { throw renderError("unknown format code 'd' for object of type '\(v.typeName)'") }
            body = String(i)
            numeric = true
        case "f", "F":
            guard let d = v.number else { throw renderError("unknown format code 'f' for object of type '\(v.typeName)'") }
            body = fixed(d, spec.precision ?? 6)
            numeric = true
        case "e", "E", "g", "G", "%":
            guard let d = v.number else { throw renderError("unknown format code for object of type '\(v.typeName)'") }
            let p = spec.precision ?? 6
            switch spec.type {
            case "%": body = fixed(d * 100, p) + "%"
            case "e", "E":
                body = String(format: "%.\(min(p, 100))e", d)
                if spec.type == "E" { body = body.uppercased() }
            default:
                body = String(format: "%.\(min(max(p, 1), 100))g", d)
                if spec.type == "G" { body = body.uppercased() }
            }
            numeric = true
        case "x", "X", "o", "b":
            guard let i = v.integer else { throw renderError("unknown format code for object of type '\(v.typeName)'") }
            let radix = spec.type == "o" ? 8 : (spec.type == "b" ? 2 : 16)
            body = String(i, radix: radix, uppercase: spec.type == "X")
            numeric = true
        case "s", nil:
            if spec.type == nil, case .float(let d) = v, let p = spec.precision {
                body = String(format: "%.\(min(max(p, 1), 100))g", d)
                numeric = true
            } else {
                body = try v.str()
                if let p = spec.precision, spec.type == "s" || !v.isNumber {
                    body = StringOps.string(body.unicodeScalars.prefix(p))
                }
                numeric = v.isNumber
            }
        default:
            throw renderError("unsupported format code '\(spec.type.map(String.init) ?? "")'")
        }
        if spec.grouping, numeric, spec.type == "d" || spec.type == "f" || spec.type == "F" || (spec.type == nil && v.integer != nil) {
            body = group(body)
        }
        if numeric, let sign = spec.sign, !body.hasPrefix("-") {
            if sign == "+" { body = "+" + body } else if sign == " " { body = " " + body }
        }
        let length = body.unicodeScalars.count
        guard spec.width > length else { return body }
        guard spec.width <= Interpreter.printLimit else { throw renderError("format width exceeds the size limit") }
        let pad = spec.width - length
        let fill = spec.zero && spec.align == nil ? "0" : String(spec.fill)
        let align = spec.align ?? (spec.zero ? "=" : (numeric ? ">" : "<"))
        switch align {
        case "<": return body + String(repeating: fill, count: pad)
        case "^":
            let left = pad / 2
            return String(repeating: fill, count: left) + body + String(repeating: fill, count: pad - left)
        case "=":
            if body.hasPrefix("-") || body.hasPrefix("+") {
                return String(body.prefix(1)) + String(repeating: fill, count: pad) + body.dropFirst()
            }
            return String(repeating: fill, count: pad) + body
        default: return String(repeating: fill, count: pad) + body
        }
    }

    /// str.format with positional (`{}`, `{0}`) and named (`{name}`) fields, attribute and
    /// index access in field names, `!r`/`!s` conversions and format specs.
    static func format(_ template: String, _ args: [TemplateValue], _ kwargs: [(String, TemplateValue)],
                       _ interp: Interpreter) throws -> String {
        let chars = Array(template)
        var out = ""
        var auto = 0
        var i = 0
        while i < chars.count {
            let c = chars[i]
            if c == "}" {
                guard i + 1 < chars.count, chars[i + 1] == "}" else { throw renderError("Single '}' encountered in format string") }
                out.append("}")
                i += 2
                continue
            }
            if c != "{" { out.append(c); i += 1; continue }
            if i + 1 < chars.count, chars[i + 1] == "{" { out.append("{"); i += 2; continue }
            var j = i + 1
            var depth = 1
            while j < chars.count {
                if chars[j] == "{" { depth += 1 }
                if chars[j] == "}" { depth -= 1; if depth == 0 { break } }
                j += 1
            }
            guard j < chars.count else { throw renderError("Single '{' encountered in format string") }
            let field = String(chars[(i + 1)..<j])
            i = j + 1
            var name = field
            var specText = ""
            var conversion: Character?
            if let colon = field.firstIndex(of: ":") {
                name = String(field[..<colon])
                specText = String(field[field.index(after: colon)...])
            }
            if let bang = name.firstIndex(of: "!") {
                conversion = name[name.index(after: bang)...].first
                name = String(name[..<bang])
            }
            // The field's first part picks the argument; `.attr` and `[key]` follow.
            var head = name
            var rest = ""
            if let k = name.firstIndex(where: { $0 == "." || $0 == "[" }) {
                head = String(name[..<k])
                rest = String(name[k...])
            }
            var value: TemplateValue
            if head.isEmpty {
                guard auto < args.count else { throw renderError("Replacement index \(auto) out of range for positional args tuple") }
                value = args[auto]
                auto += 1
            } else if let n = Int(head) {
                guard n >= 0, n < args.count else { throw renderError("Replacement index \(n) out of range for positional args tuple") }
                value = args[n]
            } else {
                guard let kv = kwargs.first(where: { $0.0 == head }) else { throw renderError("KeyError: '\(head)'") }
                value = kv.1
            }
            var r = Substring(rest)
            while let first = r.first {
                if first == "." {
                    r = r.dropFirst()
                    let attr = r.prefix { $0 != "." && $0 != "[" }
                    r = r.dropFirst(attr.count)
                    value = try Builtins.getAttribute(value, String(attr), interp)
                } else if first == "[" {
                    guard let close = r.firstIndex(of: "]") else { throw renderError("Missing ']' in format string") }
                    let key = String(r[r.index(after: r.startIndex)..<close])
                    r = r[r.index(after: close)...]
                    value = try Builtins.getItem(value, Int(key).map { .int($0) } ?? .string(key), interp)
                } else {
                    throw renderError("invalid format field '\(name)'")
                }
            }
            if conversion == "r" { value = .string(try value.repr()) }
            else if conversion == "s" { value = .string(try value.str()) }
            out += try apply(try parseSpec(specText), to: value)
            if out.utf8.count > interp.limits.maxOutputBytes { throw interp.error("a string exceeds the size limit") }
        }
        return out
    }

    /// printf-style formatting: `'%s: %d' % (a, b)`.
    static func percent(_ template: String, _ arg: TemplateValue) throws -> String {
        var args: [TemplateValue]
        var mapping: PyDict?
        // Python treats any argument with item access (a dict, but also a list) as a possible
        // mapping, and then does not complain about arguments left unused.
        var mappingLike = false
        switch arg.plain {
        case .tuple(let items): args = items
        case .dict(let d): args = [arg]; mapping = d; mappingLike = true
        case .list, .undefined, .string: args = [arg]; mappingLike = arg.plain.isUndefined || { if case .list = arg.plain { return true }; return false }()
        default: args = [arg]
        }
        let chars = Array(template)
        var out = ""
        var next = 0
        var i = 0
        while i < chars.count {
            let c = chars[i]
            if c != "%" { out.append(c); i += 1; continue }
            i += 1
            guard i < chars.count else { throw renderError("incomplete format") }
            var value: TemplateValue?
            if chars[i] == "(" {
                guard let close = chars[i...].firstIndex(of: ")") else { throw renderError("incomplete format key") }
                let key = String(chars[(i + 1)..<close])
                guard let d = mapping, let v = d.get(key) else { throw renderError("KeyError: '\(key)'") }
                value = v
                i = close + 1
            }
            var specText = ""
            while i < chars.count, "-+ #0123456789.".contains(chars[i]) { specText.append(chars[i]); i += 1 }
            guard i < chars.count else { throw renderError("incomplete format") }
            let type = chars[i]
            i += 1
            if type == "%" { out.append("%"); continue }
            if value == nil {
                guard next < args.count else { throw renderError("not enough arguments for format string") }
                value = args[next]
                next += 1
            }
            guard let v = value else { continue }
            var spec = Spec()
            spec.align = ">"
            var flags = Substring(specText)
            var zeroPad = false
            while let f = flags.first, "-+ #0".contains(f) {
                switch f {
                case "-": spec.align = "<"
                case "+": spec.sign = "+"
                case " ": if spec.sign == nil { spec.sign = " " }
                case "0": zeroPad = true
                default: break
                }
                flags = flags.dropFirst()
            }
            if zeroPad && spec.align == ">" && type != "s" && type != "r" { spec.fill = "0"; spec.align = "=" }
            let parts = flags.split(separator: ".", omittingEmptySubsequences: false)
            spec.width = Int(parts.first ?? "") ?? 0
            if parts.count > 1 { spec.precision = Int(parts[1]) ?? 0 }
            switch type {
            case "s": spec.type = nil; out += try apply(spec, to: .string(try v.str()))
            case "r": spec.type = nil; out += try apply(spec, to: .string(try v.repr()))
            case "d", "i", "u":
                guard let d = v.number else { throw renderError("%d format: a number is required, not \(v.typeName)") }
                spec.type = "d"
                out += try apply(spec, to: .int(Int(d.rounded(.towardZero))))
            case "f", "F", "e", "E", "g", "G", "x", "X", "o":
                spec.type = type
                out += try apply(spec, to: v)
            default:
                throw renderError("unsupported format character '\(type)'")
            }
        }
        if next < args.count && !mappingLike { throw renderError("not all arguments converted during string formatting") }
        return out
    }
}
