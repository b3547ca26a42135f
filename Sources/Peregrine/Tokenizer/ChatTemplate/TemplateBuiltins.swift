import Foundation

// Attribute and item access, globals, tests and the methods of strings, dicts and lists, as
// jinja2's sandboxed environment exposes them to chat templates.

/// Positional and keyword arguments of a builtin, read by position or name as Python binds them.
struct Arguments {
    let name: String
    let positional: [TemplateValue]
    let keywords: [(String, TemplateValue)]

    init(_ name: String, _ positional: [TemplateValue], _ keywords: [(String, TemplateValue)]) {
        self.name = name
        self.positional = positional
        self.keywords = keywords
    }

    /// The argument at `index` or named `key`, nil when absent.
    func get(_ index: Int, _ key: String) -> TemplateValue? {
        if index >= 0 && index < positional.count { return positional[index] }
        return keywords.first { $0.0 == key }?.1
    }

    /// Refuses more arguments than the builtin takes, or names it does not know.
    func check(max: Int, names: [String]) throws {
        if positional.count > max { throw renderError("\(name)() takes at most \(max) argument(s) (\(positional.count) given)") }
        for (k, _) in keywords where !names.contains(k) {
            throw renderError("\(name)() got an unexpected keyword argument '\(k)'")
        }
    }

    func string(_ index: Int, _ key: String) throws -> String? {
        guard let v = get(index, key), !v.isNone else { return nil }
        guard case .string(let s) = v else { throw renderError("\(name)(): argument '\(key)' must be str, not \(v.typeName)") }
        return s
    }

    func int(_ index: Int, _ key: String) throws -> Int? {
        guard let v = get(index, key), !v.isNone else { return nil }
        guard let i = v.integer else { throw renderError("\(name)(): argument '\(key)' must be int, not \(v.typeName)") }
        return i
    }

    func bool(_ index: Int, _ key: String, _ dflt: Bool) -> Bool {
        get(index, key)?.truthy ?? dflt
    }
}

enum Builtins {
    // MARK: Globals

    static func global(_ name: String) -> TemplateValue? {
        switch name {
        case "range": return .callable(TemplateCallable("range", range))
        case "namespace": return .callable(TemplateCallable("namespace") { interp, args, kwargs in
            var attrs = PyDict()
            for a in args {
                guard case .dict(let d) = a else { throw renderError("namespace() takes a mapping, not \(a.typeName)") }
                for (k, v) in d.pairs { try attrs.set(k, v) }
            }
            for (k, v) in kwargs { try attrs.set(.string(k), v) }
            for k in attrs.keys {
                if case .string(let s) = k, s.hasPrefix("_") {
                    throw renderError("namespace attribute '\(s)' starts with an underscore")
                }
            }
            let ns = Namespace(attrs)
            interp.namespaces.append(ns)
            return .namespace(ns)
        })
        case "dict": return .callable(TemplateCallable("dict") { interp, args, kwargs in
            var d = PyDict()
            if let first = args.first {
                switch first {
                case .dict(let src): d = src
                default:
                    for pair in try interp.iterate(first) {
                        let kv = try interp.iterate(pair)
                        guard kv.count == 2 else { throw renderError("dictionary update sequence element has length \(kv.count); 2 is required") }
                        try d.set(kv[0], kv[1])
                    }
                }
            }
            for (k, v) in kwargs { try d.set(.string(k), v) }
            return .dict(d)
        })
        case "raise_exception": return .callable(TemplateCallable("raise_exception") { _, args, _ in
            let message = try args.first?.str() ?? ""
            throw ChatTemplateError(.raised, message)
        })
        case "strftime_now": return .callable(TemplateCallable("strftime_now") { interp, args, _ in
            guard case .string(let fmt)? = args.first else { throw renderError("strftime_now() takes a format string") }
            return .string(interp.now.format(fmt))
        })
        default: return nil
        }
    }

    static func range(_ interp: Interpreter, _ args: [TemplateValue], _ kwargs: [(String, TemplateValue)]) throws -> TemplateValue {
        guard kwargs.isEmpty else { throw renderError("range() takes no keyword arguments") }
        let ints = try args.map { v -> Int in
            guard let i = v.integer else { throw renderError("'\(v.typeName)' object cannot be interpreted as an integer") }
            return i
        }
        var start = 0, stop = 0, step = 1
        switch ints.count {
        case 1: stop = ints[0]
        case 2: start = ints[0]; stop = ints[1]
        case 3: start = ints[0]; stop = ints[1]; step = ints[2]
        default: throw renderError("range expected 1 to 3 arguments, got \(ints.count)")
        }
        guard step != 0 else { throw renderError("range() arg 3 must not be zero") }
        let count: Int
        if step > 0 { count = stop > start ? (stop - start - 1) / step + 1 : 0 }
        else { count = start > stop ? (start - stop - 1) / (-step) + 1 : 0 }
        try interp.checkList(count)
        return .list((0..<count).map { .int(start + $0 * step) })
    }

    // MARK: Attribute and item access

    static let mutatingListMethods: Set<String> = ["append", "extend", "insert", "pop", "remove", "clear", "sort", "reverse"]
    static let mutatingDictMethods: Set<String> = ["update", "pop", "popitem", "setdefault", "clear"]

    /// `value.name`: jinja2 tries the Python attribute first, then the item.
    static func getAttribute(_ original: TemplateValue, _ name: String, _ interp: Interpreter) throws -> TemplateValue {
        let value = original.plain
        switch value {
        case .undefined(let u):
            throw renderError(u.hint)
        case .string(let s):
            if let m = stringMethod(s, name) { return m }
        case .dict(let d):
            if let m = dictMethod(d, name) { return m }
            if mutatingDictMethods.contains(name) { return unsafe(name, value) }
            if let v = d.get(name) { return v }
        case .list(let l), .tuple(let l):
            if mutatingListMethods.contains(name), case .list = value { return unsafe(name, value) }
            if let m = listMethod(l, name) { return m }
        case .namespace(let ns):
            if let v = ns.attributes.get(name) { return v }
        case .loop(let state):
            if let v = loopAttribute(state, name) { return v }
        case .int, .bool:
            if name == "real" { return .int(value.integer ?? 0) }
            if name == "imag" { return .int(0) }
        case .float(let d):
            if name == "real" { return .float(d) }
            if name == "imag" { return .float(0) }
            if name == "is_integer" { return .callable(TemplateCallable("is_integer") { _, _, _ in .bool(d.rounded() == d) }) }
        default:
            break
        }
        return .undefined("'\(describe(value))' has no attribute '\(name)'")
    }

    static func unsafe(_ name: String, _ value: TemplateValue) -> TemplateValue {
        .undefined("access to attribute '\(name)' of '\(value.typeName)' object is unsafe.")
    }

    /// How jinja2 names a value in "has no attribute" messages.
    static func describe(_ v: TemplateValue) -> String {
        switch v {
        case .dict: return "dict object"
        case .list: return "list object"
        case .tuple: return "tuple object"
        case .string: return "str object"
        case .none: return "None"
        case .int: return "int object"
        case .float: return "float object"
        case .bool: return "bool object"
        default: return "\(v.typeName) object"
        }
    }

    /// `value[key]`: jinja2 tries the item first, then the attribute named by a string key.
    static func getItem(_ original: TemplateValue, _ keyValue: TemplateValue, _ interp: Interpreter) throws -> TemplateValue {
        let value = original.plain, key = keyValue.plain
        switch value {
        case .undefined(let u):
            throw renderError(u.hint)
        case .dict(let d):
            if case .list = key { throw renderError("unhashable type: 'list'") }
            if case .dict = key { throw renderError("unhashable type: 'dict'") }
            if let v = d.get(key) { return v }
        case .list(let a), .tuple(let a):
            if let i = key.integer {
                let j = i < 0 ? i + a.count : i
                if j >= 0 && j < a.count { return a[j] }
                return .undefined("'\(describe(value))' has no element \(i)")
            }
        case .string(let s):
            if let i = key.integer {
                let a = StringOps.scalars(s)
                let j = i < 0 ? i + a.count : i
                if j >= 0 && j < a.count { return .string(String(a[j])) }
                return .undefined("'\(describe(value))' has no element \(i)")
            }
        default:
            break
        }
        if case .string(let name) = key {
            return try getAttribute(value, name, interp)
        }
        return .undefined("'\(describe(value))' has no element \((try? key.repr()) ?? "")")
    }

    static func slice(_ value: TemplateValue, _ start: TemplateValue?, _ stop: TemplateValue?, _ step: TemplateValue?,
                      _ interp: Interpreter) throws -> TemplateValue {
        let value = value.plain
        if case .undefined(let u) = value { throw renderError(u.hint) }
        func bound(_ v: TemplateValue?) throws -> Int? {
            guard let v, !v.isNone else { return nil }
            guard let i = v.integer else { throw renderError("slice indices must be integers or None") }
            return i
        }
        let stepValue = try bound(step) ?? 1
        guard stepValue != 0 else { throw renderError("slice step cannot be zero") }
        func indices(_ n: Int) throws -> [Int] {
            var lo = try bound(start), hi = try bound(stop)
            if stepValue > 0 {
                var a = lo ?? 0, b = hi ?? n
                if a < 0 { a = max(0, a + n) }
                if b < 0 { b = max(0, b + n) }
                a = min(a, n); b = min(b, n)
                return a < b ? Array(stride(from: a, to: b, by: stepValue)) : []
            }
            if var l = lo { if l < 0 { l += n }; lo = min(max(l, -1), n - 1) }
            if var h = hi { if h < 0 { h += n }; hi = min(max(h, -1), n - 1) }
            let a = lo ?? n - 1, b = hi ?? -1
            return a > b ? Array(stride(from: a, to: b, by: stepValue)) : []
        }
        switch value {
        case .list(let a): return .list(try indices(a.count).map { a[$0] })
        case .tuple(let a): return .tuple(try indices(a.count).map { a[$0] })
        case .string(let s):
            let a = StringOps.scalars(s)
            return .string(StringOps.string(try indices(a.count).map { a[$0] }))
        case .dict:
            throw renderError("unhashable type: 'slice'")
        default:
            // jinja2 slices with Python's own subscript, so this fails rather than giving an
            // undefined value as a bad index does.
            throw renderError("'\(value.typeName)' object is not subscriptable")
        }
    }

    static func loopAttribute(_ l: LoopState, _ name: String) -> TemplateValue? {
        let n = l.items.count
        switch name {
        case "index": return .int(l.index0 + 1)
        case "index0": return .int(l.index0)
        case "revindex": return .int(n - l.index0)
        case "revindex0": return .int(n - l.index0 - 1)
        case "first": return .bool(l.index0 == 0)
        case "last": return .bool(l.index0 == n - 1)
        case "length": return .int(n)
        case "depth": return .int(1)
        case "depth0": return .int(0)
        case "previtem": return l.index0 > 0 ? l.items[l.index0 - 1] : .undefined("there is no previous item")
        case "nextitem": return l.index0 + 1 < n ? l.items[l.index0 + 1] : .undefined("there is no next item")
        case "cycle":
            return .callable(TemplateCallable("cycle") { _, args, _ in
                guard !args.isEmpty else { throw renderError("no items for cycling given") }
                return args[l.index0 % args.count]
            })
        case "changed":
            return .callable(TemplateCallable("changed") { _, args, _ in
                let v = TemplateValue.tuple(args)
                defer { l.lastChanged = v }
                guard let last = l.lastChanged else { return .bool(true) }
                return .bool(!last.pyEquals(v))
            })
        default: return nil
        }
    }

    // MARK: Methods

    static func method(_ name: String, _ body: @escaping (Arguments, Interpreter) throws -> TemplateValue) -> TemplateValue {
        .callable(TemplateCallable(name) { interp, args, kwargs in
            try body(Arguments(name, args, kwargs), interp)
        })
    }

    static func dictMethod(_ d: PyDict, _ name: String) -> TemplateValue? {
        switch name {
        case "get":
            return method(name) { a, _ in
                try a.check(max: 2, names: [])
                guard let key = a.get(0, "key") else { throw renderError("get expected at least 1 argument, got 0") }
                return d.get(key) ?? a.get(1, "default") ?? TemplateValue.none
            }
        case "items":
            return method(name) { a, _ in
                try a.check(max: 0, names: [])
                return .view("dict_items", d.pairs.map { .tuple([$0, $1]) })
            }
        case "keys": return method(name) { a, _ in try a.check(max: 0, names: []); return .view("dict_keys", d.keys) }
        case "values": return method(name) { a, _ in try a.check(max: 0, names: []); return .view("dict_values", d.values) }
        case "copy": return method(name) { _, _ in .dict(d) }
        default: return nil
        }
    }

    static func listMethod(_ l: [TemplateValue], _ name: String) -> TemplateValue? {
        switch name {
        case "index":
            return method(name) { a, _ in
                guard let x = a.get(0, "value") else { throw renderError("index expected 1 argument") }
                guard let i = l.firstIndex(where: { $0.pyEquals(x) }) else { throw renderError("\((try? x.repr()) ?? "") is not in list") }
                return .int(i)
            }
        case "count":
            return method(name) { a, _ in
                guard let x = a.get(0, "value") else { throw renderError("count expected 1 argument") }
                return .int(l.filter { $0.pyEquals(x) }.count)
            }
        case "copy": return method(name) { _, _ in .list(l) }
        default: return nil
        }
    }

    static func stringMethod(_ s: String, _ name: String) -> TemplateValue? {
        func str(_ a: Arguments, _ i: Int, _ k: String) throws -> String {
            guard let v = try a.string(i, k) else { throw renderError("\(name)() missing required argument '\(k)'") }
            return v
        }
        switch name {
        case "strip", "lstrip", "rstrip":
            return method(name) { a, _ in
                try a.check(max: 1, names: [])
                return .string(StringOps.strip(s, try a.string(0, "chars"), left: name != "rstrip", right: name != "lstrip"))
            }
        case "split", "rsplit":
            return method(name) { a, interp in
                try a.check(max: 2, names: ["sep", "maxsplit"])
                let parts = name == "split" ? try StringOps.split(s, try a.string(0, "sep"), try a.int(1, "maxsplit") ?? -1)
                                            : try StringOps.rsplit(s, try a.string(0, "sep"), try a.int(1, "maxsplit") ?? -1)
                try interp.checkList(parts.count)
                return .list(parts.map { .string($0) })
            }
        case "splitlines":
            return method(name) { a, _ in
                .list(StringOps.splitlines(s, keepends: a.bool(0, "keepends", false)).map { .string($0) })
            }
        case "startswith", "endswith":
            return method(name) { a, _ in
                guard let arg = a.get(0, "prefix") else { throw renderError("\(name)() takes at least 1 argument (0 given)") }
                var text = StringOps.scalars(s)
                let n = text.count
                var lo = try a.int(1, "start") ?? 0, hi = try a.int(2, "end") ?? n
                if lo < 0 { lo = max(0, lo + n) }
                if hi < 0 { hi = max(0, hi + n) }
                lo = min(lo, n); hi = min(hi, n)
                text = lo <= hi ? Array(text[lo..<hi]) : []
                let candidates: [TemplateValue]
                if case .tuple(let items) = arg { candidates = items } else { candidates = [arg] }
                for c in candidates {
                    guard case .string(let p) = c else {
                        throw renderError("\(name) first arg must be str or a tuple of str, not \(c.typeName)")
                    }
                    let ps = StringOps.scalars(p)
                    guard lo <= hi || ps.isEmpty else { continue }
                    if name == "startswith" ? text.starts(with: ps) : text.reversed().starts(with: ps.reversed()) { return .bool(true) }
                }
                return .bool(false)
            }
        case "replace":
            return method(name) { a, interp in
                try a.check(max: 3, names: ["count"])
                let r = StringOps.replace(s, try str(a, 0, "old"), try str(a, 1, "new"), count: try a.int(2, "count") ?? -1)
                return try interp.checkString(r)
            }
        case "upper": return method(name) { a, _ in try a.check(max: 0, names: []); return .string(s.uppercased()) }
        case "lower": return method(name) { a, _ in try a.check(max: 0, names: []); return .string(s.lowercased()) }
        case "casefold": return method(name) { a, _ in try a.check(max: 0, names: []); return .string(s.lowercased()) }
        case "title": return method(name) { a, _ in try a.check(max: 0, names: []); return .string(StringOps.title(s)) }
        case "capitalize": return method(name) { a, _ in try a.check(max: 0, names: []); return .string(StringOps.capitalize(s)) }
        case "swapcase": return method(name) { a, _ in try a.check(max: 0, names: []); return .string(StringOps.swapcase(s)) }
        case "find", "index", "rfind", "rindex", "count":
            return method(name) { a, _ in
                let hay = StringOps.scalars(s)
                let needle = StringOps.scalars(try str(a, 0, "sub"))
                var lo = try a.int(1, "start") ?? 0, hi = try a.int(2, "end") ?? hay.count
                if lo < 0 { lo = max(0, lo + hay.count) }
                if hi < 0 { hi = max(0, hi + hay.count) }
                lo = min(lo, hay.count); hi = min(hi, hay.count)
                let window = lo <= hi ? Array(hay[lo..<hi]) : []
                if name == "count" { return .int(lo <= hi ? StringOps.count(window, needle) : 0) }
                let found = (name == "find" || name == "index") ? StringOps.find(window, needle, from: 0) : StringOps.rfind(window, needle)
                guard let f = found, lo <= hi else {
                    if name == "index" || name == "rindex" { throw renderError("substring not found") }
                    return .int(-1)
                }
                return .int(f + lo)
            }
        case "join":
            return method(name) { a, interp in
                guard let it = a.get(0, "iterable") else { throw renderError("join() takes exactly one argument") }
                var parts: [String] = []
                for item in try interp.iterate(it) {
                    guard case .string(let p) = item else { throw renderError("sequence item \(parts.count): expected str instance, \(item.typeName) found") }
                    parts.append(p)
                }
                return try interp.checkString(parts.joined(separator: s))
            }
        case "format":
            return .callable(TemplateCallable(name) { interp, args, kwargs in
                .string(try StringFormat.format(s, args, kwargs, interp))
            })
        case "isdigit", "isdecimal", "isnumeric":
            return method(name) { a, _ in try a.check(max: 0, names: []); return .bool(!s.isEmpty && s.unicodeScalars.allSatisfy { $0.properties.numericType != nil }) }
        case "isalpha": return method(name) { a, _ in try a.check(max: 0, names: []); return .bool(!s.isEmpty && s.unicodeScalars.allSatisfy { $0.properties.isAlphabetic }) }
        case "isalnum":
            return method(name) { _, _ in
                .bool(!s.isEmpty && s.unicodeScalars.allSatisfy { $0.properties.isAlphabetic || $0.properties.numericType != nil })
            }
        case "isspace": return method(name) { a, _ in try a.check(max: 0, names: []); return .bool(!s.isEmpty && s.unicodeScalars.allSatisfy(StringOps.isSpace)) }
        case "islower": return method(name) { a, _ in try a.check(max: 0, names: []); return .bool(StringOps.isLower(s)) }
        case "isupper": return method(name) { a, _ in try a.check(max: 0, names: []); return .bool(StringOps.isUpper(s)) }
        case "istitle": return method(name) { a, _ in try a.check(max: 0, names: []); return .bool(!s.isEmpty && StringOps.title(s) == s && s.unicodeScalars.contains(where: StringOps.isCased)) }
        case "center", "ljust", "rjust":
            return method(name) { a, interp in
                guard let width = try a.int(0, "width") else { throw renderError("\(name)() takes at least 1 argument") }
                let fill = try a.string(1, "fillchar") ?? " "
                guard fill.unicodeScalars.count == 1 else { throw renderError("The fill character must be exactly one character long") }
                guard width <= interp.limits.maxOutputBytes else { throw interp.error("a string exceeds the size limit") }
                let pad = max(0, width - s.unicodeScalars.count)
                switch name {
                case "center": return .string(StringOps.center(s, width, fill))
                case "ljust": return .string(s + String(repeating: fill, count: pad))
                default: return .string(String(repeating: fill, count: pad) + s)
                }
            }
        case "zfill":
            return method(name) { a, interp in
                guard let width = try a.int(0, "width") else { throw renderError("zfill() takes exactly one argument") }
                guard width <= interp.limits.maxOutputBytes else { throw interp.error("a string exceeds the size limit") }
                let pad = max(0, width - s.unicodeScalars.count)
                if s.hasPrefix("-") || s.hasPrefix("+") {
                    return .string(String(s.prefix(1)) + String(repeating: "0", count: pad) + s.dropFirst())
                }
                return .string(String(repeating: "0", count: pad) + s)
            }
        case "partition", "rpartition":
            return method(name) { a, _ in
                let sep = StringOps.scalars(try str(a, 0, "sep"))
                guard !sep.isEmpty else { throw renderError("empty separator") }
                let hay = StringOps.scalars(s)
                let found = name == "partition" ? StringOps.find(hay, sep, from: 0) : StringOps.rfind(hay, sep)
                guard let i = found else {
                    return name == "partition" ? .tuple([.string(s), .string(""), .string("")]) : .tuple([.string(""), .string(""), .string(s)])
                }
                return .tuple([.string(StringOps.string(hay[..<i])), .string(StringOps.string(sep)),
                               .string(StringOps.string(hay[(i + sep.count)...]))])
            }
        case "removeprefix", "removesuffix":
            return method(name) { a, _ in
                let affix = StringOps.scalars(try str(a, 0, name == "removeprefix" ? "prefix" : "suffix"))
                let hay = StringOps.scalars(s)
                if name == "removeprefix", hay.starts(with: affix) { return .string(StringOps.string(hay.dropFirst(affix.count))) }
                if name == "removesuffix", !affix.isEmpty, hay.reversed().starts(with: affix.reversed()) {
                    return .string(StringOps.string(hay.dropLast(affix.count)))
                }
                return .string(s)
            }
        default:
            return nil
        }
    }

    // MARK: Tests

    static let testNames: Set<String> = [
        "defined", "undefined", "none", "string", "number", "integer", "float", "mapping", "iterable", "sequence",
        "boolean", "true", "false", "equalto", "eq", "ne", "lt", "gt", "ge", "le", "lessthan", "greaterthan",
        "odd", "even", "divisibleby", "in", "callable", "sameas", "lower", "upper", "escaped", "filter", "test",
    ]

    static func test(_ name: String, _ value: TemplateValue, _ args: [TemplateValue], _ interp: Interpreter) throws -> Bool {
        let v = value.plain
        func arg() throws -> TemplateValue {
            guard let a = args.first, args.count == 1 else { throw renderError("test '\(name)' takes one argument (\(args.count) given)") }
            return a
        }
        let takesArgument: Set<String> = ["equalto", "eq", "ne", "lt", "gt", "ge", "le", "lessthan", "greaterthan", "divisibleby", "in", "sameas"]
        if !takesArgument.contains(name) && !args.isEmpty {
            throw renderError("test '\(name)' takes no arguments (\(args.count) given)")
        }
        switch name {
        case "defined": return !v.isUndefined
        case "undefined": return v.isUndefined
        case "none": return v.isNone
        case "string": if case .string = v { return true }; return false
        case "number": return v.isNumber
        case "integer": if case .int = v { return true }; return false
        case "float": if case .float = v { return true }; return false
        case "boolean": if case .bool = v { return true }; return false
        case "true": if case .bool(true) = v { return true }; return false
        case "false": if case .bool(false) = v { return true }; return false
        case "mapping": if case .dict = v { return true }; return false
        case "iterable":
            switch v {
            case .string, .list, .tuple, .dict, .undefined, .iterator, .failingIterator, .view: return true
            default: return false
            }
        case "sequence":
            switch v {
            case .string, .list, .tuple, .dict, .undefined: return true
            default: return false
            }
        case "callable":
            switch v {
            case .callable, .undefined: return true
            default: return false
            }
        case "equalto", "eq": return try Operators.compare("==", v, try arg())
        case "ne": return try Operators.compare("!=", v, try arg())
        case "lt", "lessthan": return try Operators.compare("<", v, try arg())
        case "gt", "greaterthan": return try Operators.compare(">", v, try arg())
        case "ge": return try Operators.compare(">=", v, try arg())
        case "le": return try Operators.compare("<=", v, try arg())
        case "odd", "even":
            let r = try Operators.binary("%", v, .int(2), interp)
            return name == "odd" ? r.pyEquals(.int(1)) : r.pyEquals(.int(0))
        case "divisibleby": return try Operators.binary("%", v, try arg(), interp).pyEquals(.int(0))
        case "in": return try Operators.contains(try arg(), v)
        case "sameas":
            let other = try arg()
            switch (v, other) {
            case (.none, .none): return true
            case (.bool(let a), .bool(let b)): return a == b
            case (.int(let a), .int(let b)): return a == b && a >= -5 && a <= 256
            case (.namespace(let a), .namespace(let b)): return a === b
            case (.callable(let a), .callable(let b)): return a === b
            default: return false
            }
        case "lower": return StringOps.isLower(try v.str())
        case "upper": return StringOps.isUpper(try v.str())
        case "escaped": return false
        case "filter": if case .string(let s) = v { return filterNames.contains(s) }; return false
        case "test": if case .string(let s) = v { return testNames.contains(s) }; return false
        default: throw renderError("unsupported test '\(name)'")
        }
    }
}
