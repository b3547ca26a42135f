import Foundation

// jinja2's filters, with transformers' `tojson` in place of jinja2's own (no HTML escaping, and
// json.dumps' keyword arguments).

extension Builtins {
    static let filterNames: Set<String> = [
        "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e", "escape", "first",
        "float", "forceescape", "format", "indent", "int", "items", "join", "last", "length", "list", "lower", "map",
        "max", "min", "pprint", "reject", "rejectattr", "replace", "reverse", "round", "safe", "select", "selectattr",
        "slice", "sort", "string", "striptags", "sum", "title", "tojson", "trim", "truncate", "unique", "upper",
        "wordcount", "wordwrap",
    ]

    static func filter(_ name: String, _ value: TemplateValue, _ positional: [TemplateValue], _ keywords: [(String, TemplateValue)],
                       _ interp: Interpreter) throws -> TemplateValue {
        switch (name, value) {
        case ("safe", _): return .markup(try value.str())
        case ("e", .markup), ("escape", .markup), ("string", .markup): return value
        case ("e", _), ("escape", _), ("forceescape", _): return .markup(htmlEscape(try value.str()))
        default: break
        }
        let v = value.plain
        if Builtins.generatorFilters.contains(name) {
            // jinja2 runs these lazily: whatever goes wrong while producing the items (an input
            // that cannot be walked, a test that fails on an item) fails only when the result is
            // walked, so the result stands as a value until then.
            do {
                return try eagerFilter(name, v, positional, keywords, interp)
            } catch let e as ChatTemplateError where e.kind == .render {
                return .failingIterator(e.message)
            }
        }
        return try eagerFilter(name, v, positional, keywords, interp)
    }

    static let generatorFilters: Set<String> = ["map", "select", "reject", "selectattr", "rejectattr", "unique", "batch", "slice", "items"]

    private static func eagerFilter(_ name: String, _ v: TemplateValue, _ positional: [TemplateValue], _ keywords: [(String, TemplateValue)],
                                    _ interp: Interpreter) throws -> TemplateValue {
        let a = Arguments(name, positional, keywords)
        // Filters that read the value as text (trim, upper, ...) take str() of it.
        func text() throws -> String { try v.str() }
        switch name {
        case "trim":
            try a.check(max: 1, names: ["chars"])
            return .string(StringOps.strip(try text(), try a.string(0, "chars"), left: true, right: true))
        case "upper": return .string(try text().uppercased())
        case "lower": return .string(try text().lowercased())
        case "capitalize": return .string(StringOps.capitalize(try text()))
        case "title": return .string(titleFilter(try text()))
        case "string": return .string(try text())
        case "striptags": return .string(stripTags(try text()))
        case "length", "count":
            switch v {
            case .string(let s): return .int(s.unicodeScalars.count)
            case .list(let l), .tuple(let l), .view(_, let l): return .int(l.count)
            case .dict(let d): return .int(d.count)
            case .undefined: return .int(0)
            case .namespace(let ns): return .int(ns.attributes.count)
            case .iterator, .failingIterator: throw renderError("object of type 'generator' has no len()")
            default: throw renderError("object of type '\(v.typeName)' has no len()")
            }
        case "wordcount":
            var count = 0
            var inWord = false
            for u in try text().unicodeScalars {
                let word = u == "_" || u.properties.isAlphabetic || u.properties.numericType != nil
                if word && !inWord { count += 1 }
                inWord = word
            }
            return .int(count)
        case "default", "d":
            try a.check(max: 2, names: ["default_value", "boolean"])
            let fallback = a.get(0, "default_value") ?? .string("")
            if v.isUndefined || (a.bool(1, "boolean", false) && !v.truthy) { return fallback }
            return v
        case "join":
            try a.check(max: 2, names: ["d", "attribute"])
            let sep = try a.get(0, "d")?.str() ?? ""
            var items = try interp.iterate(v)
            if let attr = a.get(1, "attribute") { items = try items.map { try attributeOf($0, attr, interp) } }
            return try interp.checkString(try items.map { try $0.str() }.joined(separator: sep))
        case "first":
            let items = try interp.iterate(v)
            return items.first ?? .undefined("No first item, sequence was empty.")
        case "last":
            if case .iterator = v { throw renderError("'generator' object is not reversible") }
            let items = try interp.iterate(v)
            return items.last ?? .undefined("No last item, sequence was empty.")
        case "list": return .list(try interp.iterate(v))
        case "items":
            switch v {
            case .dict(let d): return .iterator(d.pairs.map { .tuple([$0, $1]) })
            case .undefined: return .iterator([])
            default: return .failingIterator("Can only get item pairs from a mapping.")
            }
        case "reverse":
            if case .string(let s) = v { return .string(StringOps.string(s.unicodeScalars.reversed())) }
            // A list reverses into an iterator; an iterator (which Python cannot reverse) into a
            // list, as jinja2's fallback makes.
            if case .iterator = v { return .list(try interp.iterate(v).reversed()) }
            return .iterator(try interp.iterate(v).reversed())
        case "unique":
            try a.check(max: 2, names: ["case_sensitive", "attribute"])
            let caseSensitive = a.bool(0, "case_sensitive", false)
            var seen: [TemplateValue] = []
            var out: [TemplateValue] = []
            for item in try interp.iterate(v) {
                var key = item
                if let attr = a.get(1, "attribute") { key = try attributeOf(item, attr, interp) }
                if !caseSensitive, case .string(let s) = key { key = .string(s.lowercased()) }
                if !seen.contains(where: { $0.pyEquals(key) }) {
                    seen.append(key)
                    out.append(item)
                }
            }
            return .iterator(out)
        case "sort":
            try a.check(max: 3, names: ["reverse", "case_sensitive", "attribute"])
            let reverse = a.bool(0, "reverse", false)
            let caseSensitive = a.bool(1, "case_sensitive", false)
            let items = try interp.iterate(v)
            let keys = try items.map { item -> TemplateValue in
                var key = item
                if let attr = a.get(2, "attribute") { key = try attributeOf(item, attr, interp) }
                if !caseSensitive, case .string(let s) = key { key = .string(s.lowercased()) }
                return key
            }
            return .list(try stableSort(items, keys: keys, reverse: reverse))
        case "dictsort":
            try a.check(max: 3, names: ["case_sensitive", "by", "reverse"])
            guard case .dict(let d) = v else {
                if case .undefined(let u) = v { throw renderError(u.hint) }
                throw renderError("dictsort: '\(v.typeName)' object has no attribute 'items'")
            }
            let caseSensitive = a.bool(0, "case_sensitive", false)
            let by = try a.string(1, "by") ?? "key"
            guard by == "key" || by == "value" else { throw renderError("You can only sort by either \"key\" or \"value\"") }
            let pairs = d.pairs.map { TemplateValue.tuple([$0, $1]) }
            let keys = d.pairs.map { k, val -> TemplateValue in
                let key = by == "key" ? k : val
                if !caseSensitive, case .string(let s) = key { return .string(s.lowercased()) }
                return key
            }
            return .list(try stableSort(pairs, keys: keys, reverse: a.bool(2, "reverse", false)))
        case "min", "max":
            try a.check(max: 2, names: ["case_sensitive", "attribute"])
            let items = try interp.iterate(v)
            guard !items.isEmpty else { return .undefined("No aggregated item, sequence was empty.") }
            let caseSensitive = a.bool(0, "case_sensitive", false)
            var best = items[0]
            var bestKey = TemplateValue.none
            for (i, item) in items.enumerated() {
                var key = item
                if let attr = a.get(1, "attribute") { key = try attributeOf(item, attr, interp) }
                if !caseSensitive, case .string(let s) = key { key = .string(s.lowercased()) }
                if i == 0 { bestKey = key; continue }
                let c = try key.pyCompare(bestKey, "<")
                if name == "min" ? c < 0 : c > 0 { best = item; bestKey = key }
            }
            return best
        case "sum":
            try a.check(max: 2, names: ["attribute", "start"])
            var total = a.get(1, "start") ?? .int(0)
            for item in try interp.iterate(v) {
                var x = item
                if let attr = a.get(0, "attribute") { x = try attributeOf(item, attr, interp) }
                total = try Operators.add(total, x, interp)
            }
            return total
        case "abs":
            switch v {
            case .int(let i):
                guard i != .min else { throw Operators.overflow() }
                return .int(abs(i))
            case .bool(let b): return .int(b ? 1 : 0)
            case .float(let d): return .float(abs(d))
            case .undefined(let u): throw renderError(u.hint)
            default: throw renderError("bad operand type for abs(): '\(v.typeName)'")
            }
        case "round":
            try a.check(max: 2, names: ["precision", "method"])
            let precision = try a.int(0, "precision") ?? 0
            let method = try a.string(1, "method") ?? "common"
            guard let x = v.number else {
                if case .undefined(let u) = v { throw renderError(u.hint) }
                throw renderError("type \(v.typeName) doesn't define __round__ method")
            }
            switch method {
            case "common":
                if case .float = v { return .float(roundHalfEven(x, precision)) }
                guard let i = v.integer else { return v }
                guard precision < 0 else { return .int(i) }
                // Python rounds ints to tens, hundreds... exactly, ties to even.
                guard precision > -19 else { return .int(0) }
                var scale = 1
                for _ in 0..<(-precision) { scale *= 10 }
                var q = i / scale, r = i % scale
                if r < 0 { q -= 1; r += scale }
                if 2 * r > scale || (2 * r == scale && q % 2 != 0) { q += 1 }
                let (rounded, overflow) = q.multipliedReportingOverflow(by: scale)
                if overflow { throw Operators.overflow() }
                return .int(rounded)
            case "ceil", "floor":
                let scale = Foundation.pow(10.0, Double(precision))
                let y = method == "ceil" ? (x * scale).rounded(.up) : (x * scale).rounded(.down)
                return .float(y / scale)
            default:
                throw renderError("method must be common, ceil or floor")
            }
        case "int":
            try a.check(max: 2, names: ["default", "base"])
            let dflt = a.get(0, "default") ?? .int(0)
            let base = try a.int(1, "base") ?? 10
            if case .undefined(let u) = v { throw renderError(u.hint) }
            return toInt(v, base: base) ?? dflt
        case "float":
            try a.check(max: 1, names: ["default"])
            let dflt = a.get(0, "default") ?? .float(0)
            switch v {
            case .float: return v
            case .int(let i): return .float(Double(i))
            case .bool(let b): return .float(b ? 1 : 0)
            case .string(let s):
                let t = StringOps.strip(s, nil, left: true, right: true).replacingOccurrences(of: "_", with: "")
                if let d = Double(t) { return .float(d) }
                switch t.lowercased() {
                case "inf", "+inf", "infinity", "+infinity": return .float(.infinity)
                case "-inf", "-infinity": return .float(-.infinity)
                case "nan", "+nan", "-nan": return .float(.nan)
                default: return dflt
                }
            case .undefined(let u): throw renderError(u.hint)
            default: return dflt
            }
        case "replace":
            try a.check(max: 3, names: ["old", "new", "count"])
            guard let old = a.get(0, "old"), let new = a.get(1, "new") else { throw renderError("replace() needs old and new") }
            let r = StringOps.replace(try text(), try old.str(), try new.str(), count: try a.int(2, "count") ?? -1)
            return try interp.checkString(r)
        case "indent":
            try a.check(max: 3, names: ["width", "first", "blank"])
            // jinja2 appends a newline to the value first, which only a str allows.
            guard case .string = v else {
                if case .undefined(let u) = v { throw renderError(u.hint) }
                throw renderError("unsupported operand type(s) for +=: '\(v.typeName)' and 'str'")
            }
            var indentation = "    "
            if let w = a.get(0, "width") {
                if case .string(let s) = w { indentation = s }
                else if let n = w.integer {
                    guard n <= interp.limits.maxOutputBytes else { throw interp.error("a string exceeds the size limit") }
                    indentation = String(repeating: " ", count: max(0, n))
                } else { throw renderError("indent width must be an int or a string") }
            }
            return try interp.checkString(indent(try text(), indentation, first: a.bool(1, "first", false), blank: a.bool(2, "blank", false)))
        case "center":
            try a.check(max: 1, names: ["width"])
            let width = try a.int(0, "width") ?? 80
            guard width <= interp.limits.maxOutputBytes else { throw interp.error("a string exceeds the size limit") }
            return .string(StringOps.center(try text(), width, " "))
        case "batch":
            try a.check(max: 2, names: ["linecount", "fill_with"])
            guard let size = try a.int(0, "linecount"), size > 0 else { throw renderError("batch size must be a positive integer") }
            let items = try interp.iterate(v)
            var out: [TemplateValue] = []
            var i = 0
            while i < items.count {
                var chunk = Array(items[i..<min(i + size, items.count)])
                if chunk.count < size, let fill = a.get(1, "fill_with"), !fill.isNone {
                    chunk += Array(repeating: fill, count: size - chunk.count)
                }
                out.append(.list(chunk))
                i += size
            }
            return .iterator(out)
        case "slice":
            try a.check(max: 2, names: ["slices", "fill_with"])
            guard let n = try a.int(0, "slices"), n > 0 else { throw renderError("slice count must be a positive integer") }
            let items = try interp.iterate(v)
            let per = items.count / n, extra = items.count % n
            var out: [TemplateValue] = []
            var offset = 0
            for i in 0..<min(n, interp.limits.maxListLength) {
                let len = per + (i < extra ? 1 : 0)
                var chunk = Array(items[offset..<(offset + len)])
                offset += len
                if i >= extra, extra > 0, let fill = a.get(1, "fill_with"), !fill.isNone { chunk.append(fill) }
                out.append(.list(chunk))
            }
            return .iterator(out)
        case "map":
            // jinja2 looks nothing up for a falsy input: it just yields nothing.
            guard v.truthy else { return .iterator([]) }
            let items = try interp.iterate(v)
            if a.positional.isEmpty, let attr = a.keywords.first(where: { $0.0 == "attribute" })?.1 {
                let dflt = a.keywords.first { $0.0 == "default" }?.1
                return .iterator(try items.map { item in
                    let x = try attributeOf(item, attr, interp)
                    if x.isUndefined, let dflt { return dflt }
                    return x
                })
            }
            guard case .string(let filterName)? = a.positional.first else { throw renderError("map requires a filter name or attribute=") }
            guard filterNames.contains(filterName) else { throw renderError("unsupported filter '\(filterName)'") }
            let rest = Array(a.positional.dropFirst())
            return .iterator(try items.map { try filter(filterName, $0, rest, a.keywords, interp) })
        case "select", "reject":
            guard v.truthy else { return .iterator([]) }
            let items = try interp.iterate(v)
            let keep = name == "select"
            guard let testName = a.positional.first else { return .iterator(items.filter { $0.truthy == keep }) }
            guard case .string(let t) = testName, testNames.contains(t) else { throw renderError("unsupported test '\((try? testName.str()) ?? "")'") }
            let rest = Array(a.positional.dropFirst())
            return .iterator(try items.filter { try test(t, $0, rest, interp) == keep })
        case "selectattr", "rejectattr":
            guard v.truthy else { return .iterator([]) }
            let items = try interp.iterate(v)
            let keep = name == "selectattr"
            guard let attr = a.positional.first else { throw renderError("\(name) requires an attribute name") }
            let values = try items.map { try attributeOf($0, attr, interp) }
            var out: [TemplateValue] = []
            if a.positional.count < 2 {
                for (item, x) in zip(items, values) where x.truthy == keep { out.append(item) }
                return .iterator(out)
            }
            guard case .string(let t) = a.positional[1], testNames.contains(t) else {
                throw renderError("unsupported test '\((try? a.positional[1].str()) ?? "")'")
            }
            let rest = Array(a.positional.dropFirst(2))
            for (item, x) in zip(items, values) where try test(t, x, rest, interp) == keep { out.append(item) }
            return .iterator(out)
        case "attr":
            guard case .string(let n)? = a.positional.first else { throw renderError("attr requires a name") }
            return try getAttribute(v, n, interp)
        case "tojson":
            try a.check(max: 4, names: ["ensure_ascii", "indent", "separators", "sort_keys"])
            var options = JSONDumper.Options()
            options.ensureASCII = a.bool(0, "ensure_ascii", false)
            if let ind = a.get(1, "indent"), !ind.isNone {
                switch ind {
                case .string(let s): options.indent = s
                default:
                    guard let n = ind.integer else { throw renderError("indent must be an int or a string") }
                    guard n <= 4096 else { throw interp.error("indent too large") }
                    options.indent = String(repeating: " ", count: max(0, n))
                }
            }
            if let sep = a.get(2, "separators"), !sep.isNone {
                let parts = try interp.iterate(sep)
                guard parts.count == 2, case .string(let item) = parts[0], case .string(let key) = parts[1] else {
                    throw renderError("separators must be a pair of strings")
                }
                options.itemSeparator = item
                options.keySeparator = key
            } else if options.indent != nil {
                options.itemSeparator = ","
            }
            options.sortKeys = a.bool(3, "sort_keys", false)
            var dumper = JSONDumper(options: options, budget: PrintBudget(remaining: interp.limits.maxOutputBytes))
            try dumper.dump(v, level: 0)
            return .string(dumper.out)
        case "format":
            let fmt = try text()
            if !a.keywords.isEmpty { return .string(try StringFormat.percent(fmt, .dict(try PyDict(a.keywords.map { (.string($0.0), $0.1) })))) }
            return .string(try StringFormat.percent(fmt, .tuple(a.positional)))
        case "pprint": return .string(try v.repr())
        case "truncate":
            try a.check(max: 4, names: ["length", "killwords", "end", "leeway"])
            let length = try a.int(0, "length") ?? 255
            guard case .string(let text) = v else {
                // jinja2 measures the value as it is: an undefined value has length 0 and comes
                // back as it is, as do short containers; anything else fails.
                let count: Int
                switch v {
                case .undefined: return v
                case .list(let l), .tuple(let l): count = l.count
                case .dict(let d): count = d.count
                default: throw renderError("object of type '\(v.typeName)' has no len()")
                }
                if count <= length + (try a.int(3, "leeway") ?? 5) { return v }
                throw renderError("truncate needs a string")
            }
            let s = StringOps.scalars(text)
            let killwords = a.bool(1, "killwords", false)
            let end = try a.string(2, "end") ?? "..."
            let leeway = try a.int(3, "leeway") ?? 5
            if s.count <= length + leeway { return .string(StringOps.string(s)) }
            let cut = max(0, length - end.unicodeScalars.count)
            var kept = Array(s.prefix(cut))
            if !killwords {
                if let space = kept.lastIndex(of: " ") { kept = Array(kept[..<space]) }
            }
            return .string(StringOps.string(kept) + end)
        case "wordwrap":
            throw renderError("unsupported filter 'wordwrap'")
        default:
            throw renderError("unsupported filter '\(name)'")
        }
    }

    /// jinja2's attribute getter for filters: `a.b` paths, integer parts as indexes.
    static func attributeOf(_ item: TemplateValue, _ attr: TemplateValue, _ interp: Interpreter) throws -> TemplateValue {
        if let i = attr.integer { return try getItem(item, .int(i), interp) }
        let path = try attr.str()
        var v = item
        for part in path.split(separator: ".", omittingEmptySubsequences: false) {
            if let i = Int(part) { v = try getItem(v, .int(i), interp) } else { v = try getItem(v, .string(String(part)), interp) }
        }
        return v
    }

    static func stableSort(_ items: [TemplateValue], keys: [TemplateValue], reverse: Bool) throws -> [TemplateValue] {
        // Merge sort, since comparisons can throw and Swift's sort cannot propagate errors.
        var order = Array(items.indices)
        var buffer = order
        func less(_ i: Int, _ j: Int) throws -> Bool {
            let c = try keys[i].pyCompare(keys[j], "<")
            return reverse ? c > 0 : c < 0
        }
        var width = 1
        while width < order.count {
            var start = 0
            while start < order.count {
                let mid = min(start + width, order.count), end = min(start + 2 * width, order.count)
                var i = start, j = mid, k = start
                while i < mid && j < end {
                    // Take from the right only when strictly smaller, to stay stable.
                    if try less(order[j], order[i]) { buffer[k] = order[j]; j += 1 } else { buffer[k] = order[i]; i += 1 }
                    k += 1
                }
                while i < mid { buffer[k] = order[i]; i += 1; k += 1 }
                while j < end { buffer[k] = order[j]; j += 1; k += 1 }
                start += 2 * width
            }
            swap(&order, &buffer)
            width *= 2
        }
        return order.map { items[$0] }
    }

    /// jinja2's `title` filter capitalises after spaces, dashes and opening brackets only (so
    /// "they're" stays "They're", unlike Python's str.title).
    static func titleFilter(_ s: String) -> String {
        var out = ""
        var atWordStart = true
        for u in s.unicodeScalars {
            let boundary = u == "-" || u == "(" || u == "{" || u == "[" || u == "<" || StringOps.isSpace(u)
            if boundary {
                out.unicodeScalars.append(u)
                atWordStart = true
            } else if atWordStart {
                out += String(u).uppercased()
                atWordStart = false
            } else {
                out += String(u).lowercased()
            }
        }
        return out
    }

    static func htmlEscape(_ s: String) -> String {
        var out = ""
        for u in s.unicodeScalars {
            switch u {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&#34;"
            case "'": out += "&#39;"
            default: out.unicodeScalars.append(u)
            }
        }
        return out
    }

    /// markupsafe's striptags: comments, then tags, removed; whitespace collapsed; entities
    /// decoded.
    static func stripTags(_ s: String) -> String {
        func remove(_ text: Scalars, open: String, close: String) -> Scalars {
            let o = StringOps.scalars(open), c = StringOps.scalars(close)
            var out: Scalars = []
            var i = 0
            while i < text.count {
                if text[i] == o[0], text[i...].starts(with: o) {
                    // The end mark is searched from the opening itself, as markupsafe does.
                    guard let end = StringOps.find(text, c, from: i + 1) else {
                        out += text[i...]
                        break
                    }
                    i = end + c.count
                    continue
                }
                out.append(text[i])
                i += 1
            }
            return out
        }
        let text = remove(remove(StringOps.scalars(s), open: "<!--", close: "-->"), open: "<", close: ">")
        let collapsed = (try? StringOps.split(StringOps.string(text), nil, -1))?.joined(separator: " ") ?? ""
        return unescapeEntities(collapsed)
    }

    /// HTML entities back to characters, as Python's html.unescape reads them: numeric ones
    /// (the semicolon optional) and the common named ones (those of them HTML allows without a
    /// semicolon also without one).
    static func unescapeEntities(_ s: String) -> String {
        guard s.contains("&") else { return s }
        let named: [(String, String, Bool)] = [("amp", "&", true), ("lt", "<", true), ("gt", ">", true),
                                               ("quot", "\"", true), ("nbsp", "\u{A0}", true), ("apos", "'", false)]
        let a = StringOps.scalars(s)
        var out = String.UnicodeScalarView()
        var i = 0
        func isHex(_ u: Unicode.Scalar) -> Bool { ("0"..."9").contains(u) || ("a"..."f").contains(u) || ("A"..."F").contains(u) }
        while i < a.count {
            guard a[i] == "&", i + 1 < a.count else { out.append(a[i]); i += 1; continue }
            if a[i + 1] == "#" {
                var j = i + 2
                var radix: UInt32 = 10
                if j < a.count, a[j] == "x" || a[j] == "X" { radix = 16; j += 1 }
                let digitsStart = j
                while j < a.count, radix == 16 ? isHex(a[j]) : ("0"..."9").contains(a[j]) { j += 1 }
                if j > digitsStart {
                    var value: UInt32 = 0
                    for u in a[digitsStart..<j] {
                        let d = UInt32(String(u), radix: Int(radix)) ?? 0
                        value = value > 0x10FFFF ? value : value &* radix &+ d
                    }
                    // Python maps invalid code points to U+FFFD.
                    let scalar = (value == 0 || value > 0x10FFFF) ? "\u{FFFD}" : (Unicode.Scalar(value) ?? "\u{FFFD}")
                    out.append(scalar)
                    i = j < a.count && a[j] == ";" ? j + 1 : j
                    continue
                }
            } else {
                var matched = false
                for (name, text, legacy) in named {
                    let n = StringOps.scalars(name)
                    guard a[(i + 1)...].starts(with: n) else { continue }
                    let end = i + 1 + n.count
                    if end < a.count, a[end] == ";" {
                        out.append(contentsOf: text.unicodeScalars)
                        i = end + 1
                        matched = true
                    } else if legacy {
                        out.append(contentsOf: text.unicodeScalars)
                        i = end
                        matched = true
                    }
                    if matched { break }
                }
                if matched { continue }
            }
            out.append(a[i])
            i += 1
        }
        return String(out)
    }

    /// jinja2's indent: the text gets a trailing newline before it is split into lines, so a
    /// text ending in a newline keeps it.
    static func indent(_ s: String, _ indentation: String, first: Bool, blank: Bool) -> String {
        let lines = StringOps.splitlines(s + "\n")
        var rv: String
        if blank {
            rv = lines.joined(separator: "\n" + indentation)
        } else {
            rv = lines.first ?? ""
            if lines.count > 1 {
                rv += "\n" + lines.dropFirst().map { $0.isEmpty ? $0 : indentation + $0 }.joined(separator: "\n")
            }
        }
        return first ? indentation + rv : rv
    }

    /// Python's round(x, n) on a float: correctly rounded, ties to even.
    static func roundHalfEven(_ x: Double, _ n: Int) -> Double {
        if !x.isFinite { return x }
        if n == 0 { return x.rounded(.toNearestOrEven) }
        guard n > 0, n < 300 else {
            if n <= 0 {
                let scale = Foundation.pow(10.0, Double(-n))
                return (x / scale).rounded(.toNearestOrEven) * scale
            }
            return x
        }
        // printf rounds the exact binary value, ties to even, as Python does.
        return Double(String(format: "%.\(n)f", x)) ?? x
    }

    static func toInt(_ v: TemplateValue, base: Int) -> TemplateValue? {
        switch v {
        case .int: return v
        case .bool(let b): return .int(b ? 1 : 0)
        case .float(let d):
            guard d.isFinite, abs(d) < 9.2e18 else { return nil }
            return .int(Int(d.rounded(.towardZero)))
        case .string(let s):
            var t = StringOps.strip(s, nil, left: true, right: true).replacingOccurrences(of: "_", with: "")
            var negative = false
            if t.hasPrefix("-") { negative = true; t.removeFirst() } else if t.hasPrefix("+") { t.removeFirst() }
            var radix = base
            let lower = t.lowercased()
            if base == 0 || base == 16, lower.hasPrefix("0x") { radix = 16; t.removeFirst(2) }
            else if base == 0 || base == 8, lower.hasPrefix("0o") { radix = 8; t.removeFirst(2) }
            else if base == 0 || base == 2, lower.hasPrefix("0b") { radix = 2; t.removeFirst(2) }
            else if base == 0 { radix = 10 }
            if radix >= 2, radix <= 36, !t.isEmpty, let i = Int(t, radix: radix) { return .int(negative ? -i : i) }
            // jinja2 falls back to int(float(value)).
            if base == 10, let d = Double(StringOps.strip(s, nil, left: true, right: true)), d.isFinite, abs(d) < 9.2e18 {
                return .int(Int(d.rounded(.towardZero)))
            }
            return nil
        default:
            return nil
        }
    }
}

/// Python's json.dumps, as transformers' tojson calls it.
struct JSONDumper {
    struct Options {
        var ensureASCII = false
        var indent: String?
        var itemSeparator = ", "
        var keySeparator = ": "
        var sortKeys = false
    }

    let options: Options
    var budget: PrintBudget
    var out = ""

    init(options: Options, budget: PrintBudget) {
        self.options = options
        self.budget = budget
    }

    mutating func put(_ s: String) throws {
        try budget.spend(s)
        out += s
    }

    mutating func newline(_ level: Int) throws {
        guard let ind = options.indent else { return }
        try put("\n" + String(repeating: ind, count: level))
    }

    mutating func dump(_ value: TemplateValue, level: Int) throws {
        let v = value.plain
        guard level < 512 else { throw renderError("structure nested too deeply for tojson") }
        switch v {
        case .none: try put("null")
        case .bool(let b): try put(b ? "true" : "false")
        case .int(let i): try put(String(i))
        case .float(let d): try put(JSONDumper.float(d))
        case .string(let s): try put(quote(s))
        case .list(let items), .tuple(let items):
            if items.isEmpty { try put("[]"); return }
            try put("[")
            for (i, x) in items.enumerated() {
                if i > 0 { try put(options.itemSeparator) }
                try newline(level + 1)
                try dump(x, level: level + 1)
            }
            try newline(level)
            try put("]")
        case .dict(let d):
            if d.count == 0 { try put("{}"); return }
            var pairs: [(String, TemplateValue)] = []
            for (k, x) in d.pairs { pairs.append((try key(k), x)) }
            if options.sortKeys {
                pairs = pairs.enumerated().sorted {
                    let c = TemplateValue.compareScalars($0.element.0, $1.element.0)
                    return c != 0 ? c < 0 : $0.offset < $1.offset
                }.map(\.element)
            }
            try put("{")
            for (i, (k, x)) in pairs.enumerated() {
                if i > 0 { try put(options.itemSeparator) }
                try newline(level + 1)
                try put(quote(k))
                try put(options.keySeparator)
                try dump(x, level: level + 1)
            }
            try newline(level)
            try put("}")
        case .namespace, .callable, .loop, .undefined, .iterator, .failingIterator, .markup, .view:
            throw renderError("Object of type \(v.typeName) is not JSON serializable")
        }
    }

    func key(_ k: TemplateValue) throws -> String {
        switch k {
        case .string(let s): return s
        case .int(let i): return String(i)
        case .float(let d): return JSONDumper.float(d)
        case .bool(let b): return b ? "true" : "false"
        case .none: return "null"
        default: throw renderError("keys must be str, int, float, bool or None, not \(k.typeName)")
        }
    }

    static func float(_ d: Double) -> String {
        if d.isNaN { return "NaN" }
        if d.isInfinite { return d < 0 ? "-Infinity" : "Infinity" }
        return PyFormat.float(d)
    }

    func quote(_ s: String) -> String {
        var out = "\""
        for u in s.unicodeScalars {
            switch u {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if u.value < 0x20 || (options.ensureASCII && u.value > 0x7E) {
                    if u.value > 0xFFFF {
                        let v = u.value - 0x10000
                        out += "\\u" + PyFormat.hex(0xD800 + (v >> 10), 4) + "\\u" + PyFormat.hex(0xDC00 + (v & 0x3FF), 4)
                    } else {
                        out += "\\u" + PyFormat.hex(u.value, 4)
                    }
                } else {
                    out.unicodeScalars.append(u)
                }
            }
        }
        return out + "\""
    }
}
