// Evaluates a parsed template. Scoping follows jinja2: `if` shares its scope, each loop
// iteration and each macro call gets a fresh one (so `set` inside a loop does not leak out, and
// does not carry to the next iteration), and namespaces are the way to carry state out.

/// Bounds on one rendering, so a hostile or broken template fails instead of hanging or
/// exhausting memory.
public struct ChatTemplateLimits: Sendable {
    /// Characters (UTF-8 bytes) of output, and of any one string or printed value.
    public var maxOutputBytes: Int
    /// Loop iterations over the whole rendering.
    public var maxLoopIterations: Int
    /// Nested macro and caller calls.
    public var maxCallDepth: Int
    /// Elements of a list made by range(), repetition or concatenation.
    public var maxListLength: Int
    /// Machine stack the interpreter's recursion may use. Nesting (of blocks, expressions and
    /// macro calls) is bounded by this rather than by counts, so rendering stays within the
    /// stack of whatever thread calls it.
    public var maxStackBytes: Int

    public init(maxOutputBytes: Int = 32 << 20, maxLoopIterations: Int = 2_000_000,
                maxCallDepth: Int = 64, maxListLength: Int = 1_000_000, maxStackBytes: Int = 256 << 10) {
        self.maxOutputBytes = maxOutputBytes
        self.maxLoopIterations = maxLoopIterations
        self.maxCallDepth = maxCallDepth
        self.maxListLength = maxListLength
        self.maxStackBytes = maxStackBytes
    }
}

final class Scope {
    var vars: [String: TemplateValue] = [:]
    let parent: Scope?

    init(parent: Scope?) { self.parent = parent }

    func lookup(_ name: String) -> TemplateValue? {
        var s: Scope? = self
        while let scope = s {
            if let v = scope.vars[name] { return v }
            s = scope.parent
        }
        return nil
    }
}

/// How a loop body ended.
private enum Flow {
    case normal, breakLoop, continueLoop
}

final class Interpreter {
    /// The most one printed container may take; structures that share themselves can print
    /// exponentially long, and this stops them.
    static let printLimit = 32 << 20

    let limits: ChatTemplateLimits
    let now: ChatTemplate.Timestamp
    private var iterations = 0
    private var callDepth = 0
    /// Every namespace made while rendering. A namespace can hold itself (or a loop that holds
    /// it), so they are emptied when rendering ends, which frees any such cycle.
    var namespaces: [Namespace] = []

    deinit {
        for ns in namespaces { ns.attributes = PyDict() }
    }
    var line = 0

    /// Where the stack was when rendering started, to measure how deep the recursion went.
    private let stackBase = Interpreter.stackAddress()
    /// The deepest stack use seen, in bytes.
    private(set) var stackUsed = 0

    init(limits: ChatTemplateLimits, now: ChatTemplate.Timestamp) {
        self.limits = limits
        self.now = now
    }

    @inline(never)
    static func stackAddress() -> Int {
        var marker: UInt8 = 0
        return withUnsafeMutablePointer(to: &marker) { Int(bitPattern: $0) }
    }

    /// Fails once the recursion has used the stack budget (stacks grow down on every platform
    /// Swift runs on).
    @inline(__always)
    private func checkStack() throws {
        let used = stackBase - Interpreter.stackAddress()
        if used > stackUsed {
            stackUsed = used
            if used > limits.maxStackBytes { throw error("template nested too deeply") }
        }
    }

    func error(_ m: String) -> ChatTemplateError { ChatTemplateError(.render, m, line: line > 0 ? line : nil) }

    /// Adds line information to errors thrown below it.
    func located<T>(_ body: () throws -> T) throws -> T {
        do { return try body() } catch let e as ChatTemplateError where e.kind == .render && e.line == nil {
            throw ChatTemplateError(.render, e.message, line: line > 0 ? line : nil)
        }
    }

    func checkString(_ s: String) throws -> TemplateValue {
        guard s.utf8.count <= limits.maxOutputBytes else { throw error("a string exceeds the size limit") }
        return .string(s)
    }

    func checkList(_ count: Int) throws {
        guard count <= limits.maxListLength else { throw error("a list exceeds the length limit") }
    }

    // MARK: Statements

    func render(_ nodes: [Node], scope: Scope) throws -> String {
        var out = ""
        let flow = try execute(nodes, scope: scope, into: &out)
        if flow != .normal { throw error("'break' or 'continue' outside a loop") }
        return out
    }

    private func append(_ s: String, to out: inout String) throws {
        out += s
        if out.utf8.count > limits.maxOutputBytes { throw error("output exceeds the size limit") }
    }

    private func execute(_ nodes: [Node], scope: Scope, into out: inout String) throws -> Flow {
        try checkStack()
        for node in nodes {
            switch node {
            case .text(let s):
                try append(s, to: &out)
            case .output(let e, let line):
                self.line = line
                let v = try located { try eval(e, scope) }
                try append(try located { try v.str() }, to: &out)
            case .conditional(let branches, let otherwise):
                var taken = false
                for (test, body) in branches where try eval(test, scope).truthy {
                    taken = true
                    let flow = try execute(body, scope: scope, into: &out)
                    if flow != .normal { return flow }
                    break
                }
                if !taken {
                    let flow = try execute(otherwise, scope: scope, into: &out)
                    if flow != .normal { return flow }
                }
            case .forLoop(let target, let iterable, let condition, let body, let otherwise, let line):
                self.line = line
                try runLoop(target: target, iterable: iterable, condition: condition, body: body, otherwise: otherwise,
                            scope: scope, into: &out)
            case .set(let target, let e, let line):
                self.line = line
                let v = try located { try eval(e, scope) }
                try located { try assign(target, v, scope) }
            case .setBlock(let target, let body, let filters, let line):
                var v = TemplateValue.string(try render(body, scope: Scope(parent: scope)))
                self.line = line
                for f in filters { v = try located { try applyFilter(f, to: v, scope) } }
                try located { try assign(target, v, scope) }
            case .macro(let def):
                scope.vars[def.name] = .callable(makeMacro(def, closure: scope))
            case .callBlock(let callExpr, let params, let body, let line):
                self.line = line
                guard case .call(let calleeExpr, let argExprs, let kwargExprs, _) = callExpr else { break }
                let caller = makeMacro(MacroDefinition(name: "caller", parameters: params, body: body,
                                                       takesVarargs: true, takesKwargs: true), closure: scope)
                let v = try located { () -> TemplateValue in
                    let callee = try eval(calleeExpr, scope)
                    let args = try argExprs.map { try eval($0, scope) }
                    var kwargs = try kwargExprs.map { ($0.0, try eval($0.1, scope)) }
                    kwargs.append(("caller", .callable(caller)))
                    return try call(callee, args, kwargs)
                }
                try append(try v.str(), to: &out)
            case .filterBlock(let filters, let body):
                var v = TemplateValue.string(try render(body, scope: Scope(parent: scope)))
                for f in filters { v = try located { try applyFilter(f, to: v, scope) } }
                try append(try v.str(), to: &out)
            case .with(let assignments, let body, let line):
                self.line = line
                let inner = Scope(parent: scope)
                for (target, e) in assignments {
                    let v = try located { try eval(e, scope) }
                    try located { try assign(target, v, inner) }
                }
                let flow = try execute(body, scope: inner, into: &out)
                if flow != .normal { return flow }
            case .loopBreak:
                return .breakLoop
            case .loopContinue:
                return .continueLoop
            }
        }
        return .normal
    }

    private func runLoop(target: Target, iterable: Expr, condition: Expr?, body: [Node], otherwise: [Node],
                         scope: Scope, into out: inout String) throws {
        let source = try located { try iterate(try eval(iterable, scope)) }
        var items = source
        if let condition {
            // The filter sees the loop variable but not `loop`; jinja2 counts loop.length and
            // loop.last over the filtered items, so they are chosen first.
            items = []
            for item in source {
                try tick()
                let s = Scope(parent: scope)
                try located { try assign(target, item, s) }
                if try located({ try eval(condition, s) }).truthy { items.append(item) }
            }
        }
        if items.isEmpty {
            // The else branch has a scope of its own too: what it sets stays there.
            let flow = try execute(otherwise, scope: Scope(parent: scope), into: &out)
            if flow != .normal { throw error("'break' or 'continue' outside a loop") }
            return
        }
        let state = LoopState(items: items)
        // loop.changed() may have been handed the loop itself; forget it so the two part.
        defer { state.lastChanged = nil }
        for (i, item) in items.enumerated() {
            try tick()
            state.index0 = i
            let s = Scope(parent: scope)
            s.vars["loop"] = .loop(state)
            try located { try assign(target, item, s) }
            if try execute(body, scope: s, into: &out) == .breakLoop { break }
        }
    }

    private func tick() throws {
        iterations += 1
        if iterations > limits.maxLoopIterations { throw error("loop iterations exceed the limit") }
    }

    func assign(_ target: Target, _ value: TemplateValue, _ scope: Scope) throws {
        switch target {
        case .name(let n):
            scope.vars[n] = value
        case .tuple(let targets):
            let items = try iterate(value)
            guard items.count == targets.count else {
                throw renderError(items.count > targets.count ? "too many values to unpack (expected \(targets.count))"
                                                              : "not enough values to unpack (expected \(targets.count), got \(items.count))")
            }
            for (t, v) in zip(targets, items) { try assign(t, v, scope) }
        case .attribute(let name, let attr):
            guard case .namespace(let ns)? = scope.lookup(name) else {
                throw renderError("cannot assign attribute on non-namespace object")
            }
            if attr.hasPrefix("_") { throw renderError("namespace attribute '\(attr)' starts with an underscore") }
            try ns.attributes.set(.string(attr), value)
        }
    }

    /// The items a for loop or a filter walks: list and tuple items, string characters, dict
    /// keys; nothing for undefined.
    func iterate(_ v: TemplateValue) throws -> [TemplateValue] {
        switch v.plain {
        case .list(let a), .tuple(let a), .iterator(let a), .view(_, let a): return a
        case .string(let s): return s.unicodeScalars.map { .string(String($0)) }
        case .dict(let d): return d.keys
        case .undefined: return []
        case .failingIterator(let message): throw renderError(message)
        case .namespace: throw renderError("'Namespace' object is not iterable")
        default: throw renderError("'\(v.typeName)' object is not iterable")
        }
    }

    // MARK: Macros and calls

    func makeMacro(_ def: MacroDefinition, closure: Scope) -> TemplateCallable {
        // The scope holds the macro and the macro its scope: held strongly, the pair would never
        // be freed. A macro called after its scope is gone (only possible by smuggling it out of
        // a loop through a namespace) sees the globals alone.
        TemplateCallable(def.name) { [weak closure] interp, args, kwargs in
            try interp.invokeMacro(def, closure: closure ?? Scope(parent: nil), args: args, kwargs: kwargs)
        }
    }

    private func invokeMacro(_ def: MacroDefinition, closure: Scope, args: [TemplateValue],
                             kwargs: [(String, TemplateValue)]) throws -> TemplateValue {
        callDepth += 1
        defer { callDepth -= 1 }
        guard callDepth <= limits.maxCallDepth else { throw error("macro calls nested deeper than \(limits.maxCallDepth)") }
        let s = Scope(parent: closure)
        var remaining = kwargs
        for (i, p) in def.parameters.enumerated() {
            if i < args.count {
                if remaining.contains(where: { $0.0 == p.name }) {
                    throw renderError("macro '\(def.name)' got multiple values for argument '\(p.name)'")
                }
                s.vars[p.name] = args[i]
            } else if let k = remaining.firstIndex(where: { $0.0 == p.name }) {
                s.vars[p.name] = remaining[k].1
                remaining.remove(at: k)
            } else if let d = p.defaultValue {
                s.vars[p.name] = try eval(d, s)
            } else {
                s.vars[p.name] = .undefined("parameter '\(p.name)' was not provided")
            }
        }
        if let k = remaining.firstIndex(where: { $0.0 == "caller" }) {
            s.vars["caller"] = remaining[k].1
            remaining.remove(at: k)
        }
        let extra = args.count > def.parameters.count ? Array(args[def.parameters.count...]) : []
        if !extra.isEmpty && !def.takesVarargs {
            throw renderError("macro '\(def.name)' takes not more than \(def.parameters.count) argument(s)")
        }
        if let first = remaining.first, !def.takesKwargs {
            throw renderError("macro '\(def.name)' takes no keyword argument '\(first.0)'")
        }
        s.vars["varargs"] = .tuple(extra)
        var kw = PyDict()
        for (k, v) in remaining { try kw.set(.string(k), v) }
        s.vars["kwargs"] = .dict(kw)
        let savedLine = line
        defer { line = savedLine }
        return .string(try render(def.body, scope: s))
    }

    func call(_ callee: TemplateValue, _ args: [TemplateValue], _ kwargs: [(String, TemplateValue)]) throws -> TemplateValue {
        switch callee {
        case .callable(let c):
            return try c.body(self, args, kwargs)
        case .undefined(let u):
            throw renderError(u.hint)
        default:
            throw renderError("'\(callee.typeName)' object is not callable")
        }
    }

    // MARK: Expressions

    func eval(_ e: Expr, _ scope: Scope) throws -> TemplateValue {
        try checkStack()
        switch e {
        case .literal(let v):
            return v
        case .name(let n):
            if let v = scope.lookup(n) { return v }
            if let g = Builtins.global(n) { return g }
            return .undefined("'\(n)' is undefined")
        case .list(let items):
            return .list(try items.map { try eval($0, scope) })
        case .tuple(let items):
            return .tuple(try items.map { try eval($0, scope) })
        case .dict(let pairs):
            var d = PyDict()
            for (k, v) in pairs { try d.set(try eval(k, scope), try eval(v, scope)) }
            return .dict(d)
        case .attribute(let base, let name):
            return try Builtins.getAttribute(try eval(base, scope), name, self)
        case .item(let base, let index):
            return try Builtins.getItem(try eval(base, scope), try eval(index, scope), self)
        case .slice(let base, let a, let b, let c):
            let v = try eval(base, scope)
            do {
                return try Builtins.slice(v, try a.map { try eval($0, scope) }, try b.map { try eval($0, scope) },
                                          try c.map { try eval($0, scope) }, self)
            } catch let error as ChatTemplateError where error.kind == .render {
                // jinja2 folds a slice of a literal when it compiles the template, through the
                // lookup that gives an undefined value instead of failing.
                if Interpreter.isConstant(base) { return .undefined("'\(Builtins.describe(v))' has no element slice") }
                throw error
            }
        case .call(let calleeExpr, let argExprs, let kwargExprs, let line):
            let callee = try eval(calleeExpr, scope)
            let args = try argExprs.map { try eval($0, scope) }
            let kwargs = try kwargExprs.map { ($0.0, try eval($0.1, scope)) }
            let saved = self.line
            self.line = line
            defer { self.line = saved }
            return try call(callee, args, kwargs)
        case .filter(let base, let f):
            return try applyFilter(f, to: try eval(base, scope), scope)
        case .test(let base, let name, let argExprs, let negated, _):
            let v = try eval(base, scope)
            let args = try argExprs.map { try eval($0, scope) }
            let r = try Builtins.test(name, v, args, self)
            return .bool(negated ? !r : r)
        case .unary(let op, let operand):
            let v = try eval(operand, scope)
            return try Operators.unary(op, v)
        case .not(let operand):
            return .bool(!(try eval(operand, scope).truthy))
        case .and(let a, let b):
            let l = try eval(a, scope)
            return l.truthy ? try eval(b, scope) : l
        case .or(let a, let b):
            let l = try eval(a, scope)
            return l.truthy ? l : try eval(b, scope)
        case .binary(let op, let a, let b, _):
            return try Operators.binary(op, try eval(a, scope), try eval(b, scope), self)
        case .compare(let first, let ops, _):
            var left = try eval(first, scope)
            for (op, expr) in ops {
                let right = try eval(expr, scope)
                guard try Operators.compare(op, left, right) else { return .bool(false) }
                left = right
            }
            return .bool(true)
        case .concat(let items):
            var s = ""
            for item in items { s += try eval(item, scope).str() }
            return try checkString(s)
        case .conditional(let test, let then, let otherwise):
            if try eval(test, scope).truthy { return try eval(then, scope) }
            if let otherwise { return try eval(otherwise, scope) }
            return .undefined("the inline if-expression evaluated to false and no else section was defined")
        }
    }

    /// A literal, or a list, tuple or dict display of literals: what jinja2 folds at compile time.
    static func isConstant(_ e: Expr) -> Bool {
        switch e {
        case .literal: return true
        case .list(let items), .tuple(let items): return items.allSatisfy(isConstant)
        case .dict(let pairs): return pairs.allSatisfy { isConstant($0.0) && isConstant($0.1) }
        default: return false
        }
    }

    func applyFilter(_ f: FilterCall, to v: TemplateValue, _ scope: Scope) throws -> TemplateValue {
        let args = try f.args.map { try eval($0, scope) }
        let kwargs = try f.kwargs.map { ($0.0, try eval($0.1, scope)) }
        return try Builtins.filter(f.name, v, args, kwargs, self)
    }
}
