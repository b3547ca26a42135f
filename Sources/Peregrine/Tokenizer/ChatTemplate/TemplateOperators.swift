import Foundation

// Python's arithmetic, comparison and membership on template values. Integers are 64-bit: where
// Python would grow a big integer, rendering fails with an overflow error instead.

enum Operators {
    static func undefinedError(_ a: TemplateValue, _ b: TemplateValue) -> ChatTemplateError? {
        if case .undefined(let u) = a { return renderError(u.hint) }
        if case .undefined(let u) = b { return renderError(u.hint) }
        return nil
    }

    static func unsupported(_ op: String, _ a: TemplateValue, _ b: TemplateValue) -> ChatTemplateError {
        undefinedError(a, b) ?? renderError("unsupported operand type(s) for \(op): '\(a.typeName)' and '\(b.typeName)'")
    }

    static func overflow() -> ChatTemplateError { renderError("integer overflow") }

    static func unary(_ op: String, _ v: TemplateValue) throws -> TemplateValue {
        switch v {
        case .int(let i):
            if op == "+" { return .int(i) }
            guard i != .min else { throw overflow() }
            return .int(-i)
        case .bool(let b): return .int(op == "-" ? (b ? -1 : 0) : (b ? 1 : 0))
        case .float(let d): return .float(op == "-" ? -d : d)
        case .undefined(let u): throw renderError(u.hint)
        default: throw renderError("bad operand type for unary \(op): '\(v.typeName)'")
        }
    }

    static func binary(_ op: String, _ lhs: TemplateValue, _ rhs: TemplateValue, _ interp: Interpreter) throws -> TemplateValue {
        // `str % undefined` formats the undefined value (as ""), like any other argument.
        if op == "%", case .string(let fmt) = lhs.plain, rhs.isUndefined {
            return try interp.checkString(try StringFormat.percent(fmt, rhs))
        }
        if let e = undefinedError(lhs, rhs) { throw e }
        if op == "+" || op == "*", let m = try markupArithmetic(op, lhs, rhs, interp) { return m }
        let a = lhs.plain, b = rhs.plain
        switch op {
        case "+": return try add(a, b, interp)
        case "-":
            if let x = a.integer, let y = b.integer {
                let (r, o) = x.subtractingReportingOverflow(y)
                if o { throw overflow() }
                return .int(r)
            }
            if let x = a.number, let y = b.number { return .float(x - y) }
            throw unsupported("-", a, b)
        case "*": return try multiply(a, b, interp)
        case "/":
            guard let x = a.number, let y = b.number else { throw unsupported("/", a, b) }
            guard y != 0 else { throw renderError("division by zero") }
            return .float(x / y)
        case "//":
            if let x = a.integer, let y = b.integer {
                guard y != 0 else { throw renderError("integer division or modulo by zero") }
                if x == .min && y == -1 { throw overflow() }
                var q = x / y
                if (x % y != 0) && ((x < 0) != (y < 0)) { q -= 1 }
                return .int(q)
            }
            guard let x = a.number, let y = b.number else { throw unsupported("//", a, b) }
            guard y != 0 else { throw renderError("float floor division by zero") }
            return .float(floatDivMod(x, y).div)
        case "%":
            if case .string(let fmt) = a { return try interp.checkString(try StringFormat.percent(fmt, b)) }
            if let x = a.integer, let y = b.integer {
                guard y != 0 else { throw renderError("integer division or modulo by zero") }
                if y == -1 { return .int(0) }
                var r = x % y
                if r != 0 && ((r < 0) != (y < 0)) { r += y }
                return .int(r)
            }
            guard let x = a.number, let y = b.number else { throw unsupported("%", a, b) }
            guard y != 0 else { throw renderError("float modulo") }
            return .float(floatDivMod(x, y).mod)
        case "**":
            if let x = a.integer, let y = b.integer {
                if y < 0 {
                    guard x != 0 else { throw renderError("0.0 cannot be raised to a negative power") }
                    return .float(Foundation.pow(Double(x), Double(y)))
                }
                var result = 1
                var base = x
                var e = y
                while e > 0 {
                    if e & 1 == 1 {
                        let (r, o) = result.multipliedReportingOverflow(by: base)
                        if o { throw overflow() }
                        result = r
                    }
                    e >>= 1
                    if e > 0 {
                        let (sq, o) = base.multipliedReportingOverflow(by: base)
                        if o { throw overflow() }
                        base = sq
                    }
                }
                return .int(result)
            }
            guard let x = a.number, let y = b.number else { throw unsupported("** or pow()", a, b) }
            guard x != 0 || y >= 0 else { throw renderError("0.0 cannot be raised to a negative power") }
            return .float(Foundation.pow(x, y))
        default:
            throw renderError("unknown operator '\(op)'")
        }
    }

    /// Python's float divmod: the remainder takes the divisor's sign (zero included), and the
    /// quotient is computed from it, so 1 // 0.1 is 9.0 as in Python.
    static func floatDivMod(_ x: Double, _ y: Double) -> (div: Double, mod: Double) {
        var mod = fmod(x, y)
        var div = (x - mod) / y
        if mod != 0 {
            if (y < 0) != (mod < 0) {
                mod += y
                div -= 1
            }
        } else {
            mod = Double(signOf: y, magnitudeOf: 0)
        }
        var floorDiv: Double
        if div != 0 {
            floorDiv = div.rounded(.down)
            if div - floorDiv > 0.5 { floorDiv += 1 }
        } else {
            floorDiv = Double(signOf: x / y, magnitudeOf: 0)
        }
        return (floorDiv, mod)
    }

    /// Markup plus a str escapes the str; Markup repeated stays Markup.
    static func markupArithmetic(_ op: String, _ a: TemplateValue, _ b: TemplateValue, _ interp: Interpreter) throws -> TemplateValue? {
        switch (op, a, b) {
        case ("+", .markup(let x), .markup(let y)): return .markup(try interp.checkString(x + y).str())
        case ("+", .markup(let x), .string(let y)): return .markup(try interp.checkString(x + Builtins.htmlEscape(y)).str())
        case ("+", .string(let x), .markup(let y)): return .markup(try interp.checkString(Builtins.htmlEscape(x) + y).str())
        case ("*", .markup, _), ("*", _, .markup):
            if case .string(let s) = try multiply(a.plain, b.plain, interp) { return .markup(s) }
            return nil
        default: return nil
        }
    }

    static func add(_ a: TemplateValue, _ b: TemplateValue, _ interp: Interpreter) throws -> TemplateValue {
        switch (a, b) {
        case (.string(let x), .string(let y)): return try interp.checkString(x + y)
        case (.list(let x), .list(let y)):
            try interp.checkList(x.count + y.count)
            return .list(x + y)
        case (.tuple(let x), .tuple(let y)):
            try interp.checkList(x.count + y.count)
            return .tuple(x + y)
        default:
            if let x = a.integer, let y = b.integer {
                let (r, o) = x.addingReportingOverflow(y)
                if o { throw overflow() }
                return .int(r)
            }
            if let x = a.number, let y = b.number { return .float(x + y) }
            if case .string = a { throw renderError("can only concatenate str (not \"\(b.typeName)\") to str") }
            if case .list = a { throw renderError("can only concatenate list (not \"\(b.typeName)\") to list") }
            throw unsupported("+", a, b)
        }
    }

    static func multiply(_ a: TemplateValue, _ b: TemplateValue, _ interp: Interpreter) throws -> TemplateValue {
        func repeatCount(_ n: Int, _ unit: Int, _ limit: Int) throws -> Int {
            let count = max(0, n)
            let (total, o) = count.multipliedReportingOverflow(by: max(unit, 1))
            if o || total > limit { throw interp.error("a repeated value exceeds the size limit") }
            return count
        }
        switch (a, b) {
        case (.string(let s), _) where b.integer != nil:
            let n = try repeatCount(b.integer ?? 0, s.utf8.count, interp.limits.maxOutputBytes)
            return .string(String(repeating: s, count: n))
        case (_, .string(let s)) where a.integer != nil:
            let n = try repeatCount(a.integer ?? 0, s.utf8.count, interp.limits.maxOutputBytes)
            return .string(String(repeating: s, count: n))
        case (.list(let l), _) where b.integer != nil:
            let n = try repeatCount(b.integer ?? 0, l.count, interp.limits.maxListLength)
            return .list(Array([[TemplateValue]](repeating: l, count: n).joined()))
        case (.tuple(let l), _) where b.integer != nil:
            let n = try repeatCount(b.integer ?? 0, l.count, interp.limits.maxListLength)
            return .tuple(Array([[TemplateValue]](repeating: l, count: n).joined()))
        default:
            if let x = a.integer, let y = b.integer {
                let (r, o) = x.multipliedReportingOverflow(by: y)
                if o { throw overflow() }
                return .int(r)
            }
            if let x = a.number, let y = b.number { return .float(x * y) }
            if case .string = a { throw renderError("can't multiply sequence by non-int of type '\(b.typeName)'") }
            throw unsupported("*", a, b)
        }
    }

    static func compare(_ op: String, _ lhs: TemplateValue, _ rhs: TemplateValue) throws -> Bool {
        let a = lhs.plain, b = rhs.plain
        switch op {
        case "==": return a.pyEquals(b)
        case "!=": return !a.pyEquals(b)
        case "<": return try a.pyCompare(b, op) < 0
        case ">": return try a.pyCompare(b, op) > 0
        case "<=": return try a.pyCompare(b, op) <= 0
        case ">=": return try a.pyCompare(b, op) >= 0
        case "in": return try contains(b, a)
        case "notin": return try !contains(b, a)
        default: throw renderError("unknown comparison '\(op)'")
        }
    }

    /// Python's `item in container`.
    static func contains(_ containerValue: TemplateValue, _ itemValue: TemplateValue) throws -> Bool {
        let container = containerValue.plain, item = itemValue.plain
        switch container {
        case .string(let s):
            guard case .string(let needle) = item else {
                if case .undefined(let u) = item { throw renderError(u.hint) }
                throw renderError("'in <string>' requires string as left operand, not \(item.typeName)")
            }
            return needle.isEmpty || StringOps.find(Array(s.unicodeScalars), Array(needle.unicodeScalars), from: 0) != nil
        case .list(let a), .tuple(let a), .iterator(let a), .view(_, let a): return a.contains { $0.pyEquals(item) }
        case .dict(let d):
            if case .list = item { throw renderError("unhashable type: 'list'") }
            if case .dict = item { throw renderError("unhashable type: 'dict'") }
            return d.get(item) != nil
        case .undefined: return false
        case .failingIterator(let message): throw renderError(message)
        case .namespace(let ns): return ns.attributes.get(item) != nil
        default: throw renderError("argument of type '\(container.typeName)' is not iterable")
        }
    }
}
