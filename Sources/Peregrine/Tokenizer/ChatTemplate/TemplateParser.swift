// A recursive-descent parser for the jinja2 language, with jinja2's operator precedence (lowest
// first): conditional expression, `or`, `and`, `not`, comparisons and `in`, `+`/`-`, `~`,
// `*`/`/`/`//`/`%`, `**`, unary `-`/`+`, then postfix access, filters and tests.
//
// Names of filters and tests are checked here, so a template that uses one the interpreter lacks
// is refused when it is loaded, not halfway through a request. As in jinja2 (3.0 and later), an
// unknown name inside an `if` statement or an inline `... if ... else ...` is an error only when
// that code runs: templates guard optional features that way.

struct TemplateParser {
    private let tokens: [Token]
    private var pos = 0
    /// Nesting of loops the current body sits in (`break` outside one is an error), reset inside
    /// macro and call bodies as jinja2 does.
    private var loopDepth = 0
    /// Names read inside the macro bodies being parsed, to know which take varargs/kwargs.
    private var macroNameUses: [Set<String>] = []
    private var expressionDepth = 0
    /// Inside an `if` (not nested in a loop or macro body), where unknown names are tolerated.
    private var conditional = false
    /// Unknown filter and test names met so far, and whether each sat in conditional code.
    private var unknownNames: [(message: String, line: Int, conditional: Bool)] = []
    private var statementDepth = 0
    static let maxNesting = 200
    /// Machine stack the recursive descent may use, so a pathologically nested template is
    /// refused on any thread instead of overflowing its stack.
    static let maxStackBytes = 192 << 10
    private let stackBase = Interpreter.stackAddress()

    private func checkStack() throws {
        if stackBase - Interpreter.stackAddress() > TemplateParser.maxStackBytes { throw error("template nested too deeply") }
    }

    static func parse(_ source: String) throws -> [Node] {
        var p = TemplateParser(tokens: try TemplateLexer.tokenize(source))
        let body = try p.parseBody(until: [])
        if let unknown = p.unknownNames.first(where: { !$0.conditional }) {
            throw ChatTemplateError(.syntax, unknown.message, line: unknown.line)
        }
        return body
    }

    private init(tokens: [Token]) {
        self.tokens = tokens
    }

    // MARK: Token helpers

    private var current: Token { pos < tokens.count ? tokens[pos] : Token(kind: .end, line: tokens.last?.line ?? 1) }
    private var line: Int { current.line }

    private func error(_ m: String, line: Int? = nil) -> ChatTemplateError {
        ChatTemplateError(.syntax, m, line: line ?? self.line)
    }

    private mutating func next() -> Token {
        let t = current
        if pos < tokens.count { pos += 1 }
        return t
    }

    private func isOp(_ op: String) -> Bool { current.kind == .op(op) }
    private func isName(_ n: String) -> Bool { current.kind == .name(n) }

    private mutating func skipOp(_ op: String) -> Bool {
        if isOp(op) { pos += 1; return true }
        return false
    }

    private mutating func skipName(_ n: String) -> Bool {
        if isName(n) { pos += 1; return true }
        return false
    }

    private mutating func expectOp(_ op: String) throws {
        guard skipOp(op) else { throw error("expected '\(op)', got \(describe(current.kind))") }
    }

    private mutating func expectName() throws -> String {
        guard case .name(let n) = current.kind else { throw error("expected a name, got \(describe(current.kind))") }
        pos += 1
        return n
    }

    private mutating func expectBlockEnd() throws {
        guard current.kind == .blockEnd else { throw error("expected end of statement block, got \(describe(current.kind))") }
        pos += 1
    }

    private func describe(_ k: TokenKind) -> String {
        switch k {
        case .text: return "template text"
        case .variableBegin: return "'{{'"
        case .variableEnd: return "end of print statement"
        case .blockBegin: return "'{%'"
        case .blockEnd: return "end of statement block"
        case .name(let n): return "'\(n)'"
        case .string: return "a string"
        case .integer, .float: return "a number"
        case .op(let o): return "'\(o)'"
        case .end: return "end of template"
        }
    }

    // MARK: Statements

    /// Parses nodes until a block tag named in `endTags` (left unconsumed, with its `{%`
    /// consumed) or the end of the template when `endTags` is empty.
    private mutating func parseBody(until endTags: Set<String>) throws -> [Node] {
        try checkStack()
        statementDepth += 1
        defer { statementDepth -= 1 }
        guard statementDepth < TemplateParser.maxNesting else { throw error("blocks nested too deeply") }
        var nodes: [Node] = []
        while true {
            let t = current
            switch t.kind {
            case .end:
                if endTags.isEmpty { return nodes }
                throw error("unexpected end of template; expected " + endTags.sorted().map { "'\($0)'" }.joined(separator: " or "))
            case .text(let s):
                pos += 1
                nodes.append(.text(s))
            case .variableBegin:
                pos += 1
                let e = try parseTuple()
                guard current.kind == .variableEnd else { throw error("expected end of print statement, got \(describe(current.kind))") }
                pos += 1
                nodes.append(.output(e, line: t.line))
            case .blockBegin:
                pos += 1
                guard case .name(let tag) = current.kind else { throw error("expected a tag name, got \(describe(current.kind))") }
                if endTags.contains(tag) { return nodes }
                pos += 1
                nodes.append(try parseStatement(tag, line: t.line, enclosing: endTags))
            default:
                throw error("unexpected \(describe(t.kind))")
            }
        }
    }

    private static let unsupportedTags: Set<String> = ["include", "extends", "import", "from", "block", "do", "autoescape", "trans"]

    private mutating func parseStatement(_ tag: String, line: Int, enclosing: Set<String>) throws -> Node {
        switch tag {
        case "if": return try parseIf()
        case "for": return try parseFor(line: line)
        case "set": return try parseSet(line: line)
        case "macro": return try parseMacro(line: line)
        case "call": return try parseCallBlock(line: line)
        case "filter":
            let filters = try parseFilterChain()
            try expectBlockEnd()
            let body = try parseBody(until: ["endfilter"])
            try closeTag("endfilter")
            return .filterBlock(filters, body: body)
        case "with":
            var assignments: [(Target, Expr)] = []
            while current.kind != .blockEnd {
                if !assignments.isEmpty { try expectOp(",") }
                let target = try parseAssignTarget(allowNamespace: false)
                try expectOp("=")
                assignments.append((target, try parseExpression()))
            }
            try expectBlockEnd()
            let body = try parseBody(until: ["endwith"])
            try closeTag("endwith")
            return .with(assignments, body: body, line: line)
        case "generation":
            // transformers marks assistant text with this tag; it renders its body unchanged.
            try expectBlockEnd()
            let body = try parseBody(until: ["endgeneration"])
            try closeTag("endgeneration")
            return .filterBlock([], body: body)
        case "break", "continue":
            guard loopDepth > 0 else { throw error("'\(tag)' outside loop", line: line) }
            try expectBlockEnd()
            return tag == "break" ? .loopBreak : .loopContinue
        default:
            if TemplateParser.unsupportedTags.contains(tag) {
                throw error("unsupported tag '\(tag)'", line: line)
            }
            if tag.hasPrefix("end") || tag == "else" || tag == "elif" {
                let expected = enclosing.isEmpty ? "" : "; expected " + enclosing.sorted().map { "'\($0)'" }.joined(separator: " or ")
                throw error("unexpected tag '\(tag)'\(expected)", line: line)
            }
            throw error("unsupported tag '\(tag)'", line: line)
        }
    }

    /// Consumes `name %}` of a closing tag whose `{%` was consumed by parseBody.
    private mutating func closeTag(_ name: String) throws {
        guard skipName(name) else { throw error("expected '\(name)'") }
        try expectBlockEnd()
    }

    private mutating func parseIf() throws -> Node {
        let saved = conditional
        conditional = true
        defer { conditional = saved }
        var branches: [(Expr, [Node])] = []
        var otherwise: [Node] = []
        // As in jinja2, an if statement's test is not itself an inline if (parenthesise one).
        var condition = try parseTuple(allowConditional: false)
        try expectBlockEnd()
        while true {
            let body = try parseBody(until: ["elif", "else", "endif"])
            branches.append((condition, body))
            let tag = try expectName()
            if tag == "elif" {
                condition = try parseTuple(allowConditional: false)
                try expectBlockEnd()
                continue
            }
            if tag == "else" {
                try expectBlockEnd()
                otherwise = try parseBody(until: ["endif"])
                try closeTag("endif")
            } else {
                try expectBlockEnd()
            }
            return .conditional(branches, otherwise: otherwise)
        }
    }

    private mutating func parseFor(line: Int) throws -> Node {
        let target = try parseAssignTarget(allowNamespace: false)
        guard skipName("in") else { throw error("expected 'in' in for loop") }
        // The iterable is parsed without conditional expressions, so that `if` starts the filter.
        let iterable = try parseTuple(allowConditional: false, endNames: ["if", "recursive"])
        var condition: Expr?
        if skipName("if") { condition = try parseExpression() }
        if isName("recursive") { throw error("unsupported loop modifier 'recursive'") }
        try expectBlockEnd()
        let saved = conditional
        conditional = false
        defer { conditional = saved }
        loopDepth += 1
        let body = try parseBody(until: ["endfor", "else"])
        loopDepth -= 1
        var otherwise: [Node] = []
        if skipName("else") {
            try expectBlockEnd()
            otherwise = try parseBody(until: ["endfor"])
        }
        try closeTag("endfor")
        return .forLoop(target: target, iterable: iterable, condition: condition, body: body, otherwise: otherwise, line: line)
    }

    private mutating func parseSet(line: Int) throws -> Node {
        let target = try parseAssignTarget(allowNamespace: true)
        if skipOp("=") {
            let value = try parseTuple()
            try expectBlockEnd()
            return .set(target, value, line: line)
        }
        var filters: [FilterCall] = []
        if isOp("|") { filters = try parseFilterChain() }
        try expectBlockEnd()
        let body = try parseBody(until: ["endset"])
        try closeTag("endset")
        return .setBlock(target, body: body, filters: filters, line: line)
    }

    /// `name | f(args) | g`, as a filter block or block set has.
    private mutating func parseFilterChain() throws -> [FilterCall] {
        var filters: [FilterCall] = []
        _ = skipOp("|")
        repeat {
            filters.append(try parseFilterCall())
        } while skipOp("|")
        return filters
    }

    private mutating func parseMacroParameters() throws -> [MacroParameter] {
        var params: [MacroParameter] = []
        try expectOp("(")
        while !skipOp(")") {
            if !params.isEmpty { try expectOp(",") }
            if skipOp(")") { break }
            let name = try expectName()
            var dflt: Expr?
            if skipOp("=") { dflt = try parseExpression() }
            else if params.last?.defaultValue != nil { throw error("non-default argument '\(name)' follows default argument") }
            params.append(MacroParameter(name: name, defaultValue: dflt))
        }
        return params
    }

    private mutating func parseMacro(line: Int) throws -> Node {
        let name = try expectName()
        let params = try parseMacroParameters()
        try expectBlockEnd()
        let savedLoops = loopDepth
        loopDepth = 0
        let savedConditional = conditional
        conditional = false
        defer { conditional = savedConditional }
        macroNameUses.append([])
        let body = try parseBody(until: ["endmacro"])
        let uses = macroNameUses.removeLast()
        loopDepth = savedLoops
        guard skipName("endmacro") else { throw error("expected 'endmacro'") }
        if case .name = current.kind { pos += 1 }  // `{% endmacro name %}`
        try expectBlockEnd()
        return .macro(MacroDefinition(name: name, parameters: params, body: body,
                                      takesVarargs: uses.contains("varargs"), takesKwargs: uses.contains("kwargs")))
    }

    private mutating func parseCallBlock(line: Int) throws -> Node {
        var params: [MacroParameter] = []
        if isOp("(") { params = try parseMacroParameters() }
        let call = try parseExpression()
        guard case .call = call else { throw error("expected a call after 'call'", line: line) }
        try expectBlockEnd()
        let savedLoops = loopDepth
        loopDepth = 0
        let savedConditional = conditional
        conditional = false
        defer { conditional = savedConditional }
        let body = try parseBody(until: ["endcall"])
        loopDepth = savedLoops
        try closeTag("endcall")
        return .callBlock(call: call, parameters: params, body: body, line: line)
    }

    private mutating func parseAssignTarget(allowNamespace: Bool) throws -> Target {
        var targets: [Target] = []
        var sawComma = false
        let parenthesized = skipOp("(")
        while true {
            let name = try expectName()
            if allowNamespace, targets.isEmpty, skipOp(".") {
                let attr = try expectName()
                return .attribute(name, attr)
            }
            if ["true", "false", "none", "True", "False", "None"].contains(name) {
                throw error("cannot assign to '\(name)'")
            }
            targets.append(.name(name))
            if skipOp(",") {
                sawComma = true
                if case .name = current.kind { continue }
            }
            break
        }
        if parenthesized { try expectOp(")") }
        if targets.count == 1 && !sawComma { return targets[0] }
        return .tuple(targets)
    }

    // MARK: Expressions

    private mutating func enter() throws {
        try checkStack()
        expressionDepth += 1
        guard expressionDepth < TemplateParser.maxNesting else { throw error("expression nested too deeply") }
    }

    /// Comma-separated expressions, a tuple when there is a comma (`{{ a, b }}`, `set x = 1, 2`).
    private mutating func parseTuple(allowConditional: Bool = true, endNames: Set<String> = []) throws -> Expr {
        var items: [Expr] = []
        var sawComma = false
        while true {
            if !items.isEmpty {
                guard skipOp(",") else { break }
                sawComma = true
            }
            if tupleEnds(endNames) { break }
            items.append(allowConditional ? try parseExpression() : try parseOr())
        }
        if items.isEmpty {
            if sawComma { throw error("expected an expression") }
            throw error("expected an expression, got \(describe(current.kind))")
        }
        if items.count == 1 && !sawComma { return items[0] }
        return .tuple(items)
    }

    private func tupleEnds(_ endNames: Set<String>) -> Bool {
        switch current.kind {
        case .variableEnd, .blockEnd, .end: return true
        case .op(let o): return o == ")" || o == "]" || o == "}"
        case .name(let n): return endNames.contains(n)
        default: return false
        }
    }

    private mutating func parseExpression() throws -> Expr {
        try enter()
        defer { expressionDepth -= 1 }
        let unknownsBefore = unknownNames.count
        var e = try parseOr()
        while isName("if") {
            // The whole inline if, its first operand included, is conditional code.
            for i in unknownsBefore..<unknownNames.count { unknownNames[i].conditional = true }
            let saved = conditional
            conditional = true
            defer { conditional = saved }
            pos += 1
            let test = try parseOr()
            var otherwise: Expr?
            if skipName("else") { otherwise = try parseExpression() }
            e = .conditional(test: test, then: e, otherwise: otherwise)
        }
        return e
    }

    private mutating func parseOr() throws -> Expr {
        var e = try parseAnd()
        while skipName("or") { e = .or(e, try parseAnd()) }
        return e
    }

    private mutating func parseAnd() throws -> Expr {
        var e = try parseNot()
        while skipName("and") { e = .and(e, try parseNot()) }
        return e
    }

    private mutating func parseNot() throws -> Expr {
        if skipName("not") {
            try enter()
            defer { expressionDepth -= 1 }
            return .not(try parseNot())
        }
        return try parseCompare()
    }

    private static let comparisonOps: Set<String> = ["==", "!=", "<", ">", "<=", ">="]

    private mutating func parseCompare() throws -> Expr {
        let line = self.line
        let first = try parseMath1()
        var ops: [(String, Expr)] = []
        while true {
            if case .op(let o) = current.kind, TemplateParser.comparisonOps.contains(o) {
                pos += 1
                ops.append((o, try parseMath1()))
            } else if skipName("in") {
                ops.append(("in", try parseMath1()))
            } else if isName("not"), pos + 1 < tokens.count, tokens[pos + 1].kind == .name("in") {
                pos += 2
                ops.append(("notin", try parseMath1()))
            } else {
                break
            }
        }
        return ops.isEmpty ? first : .compare(first, ops, line: line)
    }

    private mutating func parseMath1() throws -> Expr {
        var e = try parseConcat()
        while case .op(let o) = current.kind, o == "+" || o == "-" {
            let line = self.line
            pos += 1
            e = .binary(o, e, try parseConcat(), line: line)
        }
        return e
    }

    private mutating func parseConcat() throws -> Expr {
        var items = [try parseMath2()]
        while skipOp("~") { items.append(try parseMath2()) }
        return items.count == 1 ? items[0] : .concat(items)
    }

    private mutating func parseMath2() throws -> Expr {
        var e = try parsePow()
        while case .op(let o) = current.kind, o == "*" || o == "/" || o == "//" || o == "%" {
            let line = self.line
            pos += 1
            e = .binary(o, e, try parsePow(), line: line)
        }
        return e
    }

    private mutating func parsePow() throws -> Expr {
        var e = try parseUnary(withFilter: true)
        while isOp("**") {
            let line = self.line
            pos += 1
            e = .binary("**", e, try parseUnary(withFilter: true), line: line)
        }
        return e
    }

    private mutating func parseUnary(withFilter: Bool) throws -> Expr {
        try enter()
        defer { expressionDepth -= 1 }
        var e: Expr
        if case .op(let o) = current.kind, o == "-" || o == "+" {
            pos += 1
            e = .unary(o, try parseUnary(withFilter: false))
        } else {
            e = try parsePrimary()
        }
        e = try parsePostfix(e)
        if withFilter { e = try parseFilterExpr(e) }
        return e
    }

    private mutating func parsePrimary() throws -> Expr {
        let t = next()
        switch t.kind {
        case .name(let n):
            switch n {
            case "true", "True": return .literal(.bool(true))
            case "false", "False": return .literal(.bool(false))
            case "none", "None": return .literal(.none)
            default:
                if !macroNameUses.isEmpty { macroNameUses[macroNameUses.count - 1].insert(n) }
                return .name(n)
            }
        case .string(var s):
            // Adjacent literals concatenate, as in Python.
            while case .string(let more) = current.kind { s += more; pos += 1 }
            return .literal(.string(s))
        case .integer(let i): return .literal(.int(i))
        case .float(let d): return .literal(.float(d))
        case .op("("):
            if skipOp(")") { return .tuple([]) }
            var items: [Expr] = []
            var sawComma = false
            while true {
                items.append(try parseExpression())
                if skipOp(",") {
                    sawComma = true
                    if skipOp(")") { break }
                    continue
                }
                try expectOp(")")
                break
            }
            return (items.count == 1 && !sawComma) ? items[0] : .tuple(items)
        case .op("["):
            var items: [Expr] = []
            while !skipOp("]") {
                if !items.isEmpty {
                    try expectOp(",")
                    if skipOp("]") { break }
                }
                items.append(try parseExpression())
            }
            return .list(items)
        case .op("{"):
            var pairs: [(Expr, Expr)] = []
            while !skipOp("}") {
                if !pairs.isEmpty {
                    try expectOp(",")
                    if skipOp("}") { break }
                }
                let k = try parseExpression()
                try expectOp(":")
                pairs.append((k, try parseExpression()))
            }
            return .dict(pairs)
        default:
            throw error("unexpected \(describe(t.kind))", line: t.line)
        }
    }

    private mutating func parsePostfix(_ base: Expr) throws -> Expr {
        var e = base
        while true {
            if skipOp(".") {
                switch next().kind {
                case .name(let n): e = .attribute(e, n)
                case .integer(let i): e = .item(e, .literal(.int(i)))
                default: throw error("expected an attribute name after '.'")
                }
            } else if isOp("[") {
                pos += 1
                e = try parseSubscript(e)
            } else if isOp("(") {
                e = try parseCall(e)
            } else {
                return e
            }
        }
    }

    private mutating func parseSubscript(_ base: Expr) throws -> Expr {
        // `[a]`, `[a:b]`, `[a:b:c]`, each part optional in a slice.
        var parts: [Expr?] = []
        var isSlice = false
        var currentPart: Expr?
        while true {
            if skipOp("]") { parts.append(currentPart); break }
            if skipOp(":") {
                isSlice = true
                parts.append(currentPart)
                currentPart = nil
                guard parts.count <= 2 else { throw error("too many ':' in a slice") }
                continue
            }
            guard currentPart == nil else { throw error("expected ']' or ':' in subscript") }
            currentPart = try parseTuple()
        }
        if !isSlice {
            // `x[]` looks up the empty tuple, as jinja2 reads it.
            return .item(base, (parts.first ?? nil) ?? .tuple([]))
        }
        while parts.count < 3 { parts.append(nil) }
        return .slice(base, parts[0], parts[1], parts[2])
    }

    private mutating func parseCallArguments() throws -> ([Expr], [(String, Expr)]) {
        try expectOp("(")
        var args: [Expr] = []
        var kwargs: [(String, Expr)] = []
        while !skipOp(")") {
            if !(args.isEmpty && kwargs.isEmpty) {
                try expectOp(",")
                if skipOp(")") { break }
            }
            if isOp("*") || isOp("**") { throw error("unsupported argument unpacking ('*' in a call)") }
            if case .name(let n) = current.kind, pos + 1 < tokens.count, tokens[pos + 1].kind == .op("=") {
                pos += 2
                kwargs.append((n, try parseExpression()))
            } else {
                guard kwargs.isEmpty else { throw error("positional argument follows keyword argument") }
                args.append(try parseExpression())
            }
        }
        return (args, kwargs)
    }

    private mutating func parseCall(_ callee: Expr) throws -> Expr {
        let line = self.line
        let (args, kwargs) = try parseCallArguments()
        return .call(callee, args, kwargs, line: line)
    }

    private mutating func parseFilterCall() throws -> FilterCall {
        let line = self.line
        var name = try expectName()
        while skipOp(".") { name += "." + (try expectName()) }
        if !Builtins.filterNames.contains(name) {
            unknownNames.append(("unsupported filter '\(name)'", line, conditional))
        }
        var args: [Expr] = []
        var kwargs: [(String, Expr)] = []
        if isOp("(") { (args, kwargs) = try parseCallArguments() }
        return FilterCall(name: name, args: args, kwargs: kwargs, line: line)
    }

    private mutating func parseFilterExpr(_ base: Expr) throws -> Expr {
        var e = base
        while true {
            if skipOp("|") {
                e = .filter(e, try parseFilterCall())
            } else if isName("is") {
                let line = self.line
                pos += 1
                let negated = skipName("not")
                var name = try expectName()
                while skipOp(".") { name += "." + (try expectName()) }
                if !Builtins.testNames.contains(name) {
                    unknownNames.append(("unsupported test '\(name)'", line, conditional))
                }
                var args: [Expr] = []
                if isOp("(") {
                    let (a, kw) = try parseCallArguments()
                    guard kw.isEmpty else { throw error("tests take no keyword arguments") }
                    args = a
                } else if startsTestArgument() {
                    if isName("is") { throw error("cannot chain multiple tests with 'is'") }
                    args = [try parsePostfix(try parsePrimary())]
                }
                e = .test(e, name: name, args: args, negated: negated, line: line)
            } else if isOp("(") {
                e = try parseCall(e)
            } else {
                return e
            }
        }
    }

    /// jinja2 reads one argument without parentheses (`x is divisibleby 3`) when the next token
    /// could start one and is not `else`, `or` or `and`.
    private func startsTestArgument() -> Bool {
        switch current.kind {
        case .name(let n): return !["else", "or", "and"].contains(n)
        case .string, .integer, .float: return true
        case .op(let o): return o == "(" || o == "[" || o == "{"
        default: return false
        }
    }
}
