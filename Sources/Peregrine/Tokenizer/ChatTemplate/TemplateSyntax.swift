// The syntax tree of a template.

indirect enum Expr {
    case literal(TemplateValue)
    case name(String)
    case list([Expr])
    case tuple([Expr])
    case dict([(Expr, Expr)])
    case attribute(Expr, String)
    case item(Expr, Expr)
    case slice(Expr, Expr?, Expr?, Expr?)
    case call(Expr, [Expr], [(String, Expr)], line: Int)
    case filter(Expr, FilterCall)
    case test(Expr, name: String, args: [Expr], negated: Bool, line: Int)
    case unary(String, Expr)
    case not(Expr)
    case and(Expr, Expr)
    case or(Expr, Expr)
    case binary(String, Expr, Expr, line: Int)
    case compare(Expr, [(String, Expr)], line: Int)
    case concat([Expr])
    case conditional(test: Expr, then: Expr, otherwise: Expr?)
}

struct FilterCall {
    let name: String
    let args: [Expr]
    let kwargs: [(String, Expr)]
    let line: Int
}

/// Where `set` and `for` store values.
indirect enum Target {
    case name(String)
    case tuple([Target])
    /// `ns.attr`, assignable only on a namespace.
    case attribute(String, String)
}

struct MacroParameter {
    let name: String
    let defaultValue: Expr?
}

final class MacroDefinition {
    let name: String
    let parameters: [MacroParameter]
    let body: [Node]
    /// Whether the body reads `varargs` or `kwargs`; jinja2 only accepts extra arguments then.
    let takesVarargs: Bool
    let takesKwargs: Bool

    init(name: String, parameters: [MacroParameter], body: [Node], takesVarargs: Bool, takesKwargs: Bool) {
        self.name = name
        self.parameters = parameters
        self.body = body
        self.takesVarargs = takesVarargs
        self.takesKwargs = takesKwargs
    }
}

indirect enum Node {
    case text(String)
    case output(Expr, line: Int)
    case conditional([(Expr, [Node])], otherwise: [Node])
    case forLoop(target: Target, iterable: Expr, condition: Expr?, body: [Node], otherwise: [Node], line: Int)
    case set(Target, Expr, line: Int)
    case setBlock(Target, body: [Node], filters: [FilterCall], line: Int)
    case macro(MacroDefinition)
    case callBlock(call: Expr, parameters: [MacroParameter], body: [Node], line: Int)
    case filterBlock([FilterCall], body: [Node])
    case with([(Target, Expr)], body: [Node], line: Int)
    case loopBreak
    case loopContinue
}
