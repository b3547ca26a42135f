import Foundation
import XCTest
@testable import Peregrine

/// The chat-template interpreter against Python's jinja2 (scripts/make_chat_template_fixtures.py
/// renders the expected text): published templates of many model families on a set of
/// conversations, and small templates for each language construct.
final class ChatTemplateTests: XCTestCase {
    static let root = Fixtures.root + "/chat_templates"
    /// The moment the fixture script's strftime_now reads.
    static let fixedNow = ChatTemplate.Timestamp(year: 2024, month: 7, day: 26, hour: 9, minute: 5, second: 3)

    static func expected() throws -> JSONValue { try Fixtures.json(root + "/expected.json") }

    /// What jinja2 did with a case: its output, or the error it raised (the message matters
    /// only for raise_exception, whose message is the template's own).
    enum Outcome {
        case output(String)
        case raised(String)
        case failed(String)

        init(_ json: JSONValue) {
            if let text = json["output"]?.string { self = .output(text); return }
            let message = json["error"]?.string ?? ""
            self = json["kind"]?.string == "TemplateError" ? .raised(message) : .failed(message)
        }
    }

    /// Compares one rendering with jinja2's outcome; returns whether it matched.
    @discardableResult
    func check(_ label: String, _ outcome: Outcome, _ render: () throws -> String) -> Bool {
        switch outcome {
        case .output(let want):
            do {
                let got = try render()
                XCTAssertEqual(got, want, label)
                return got == want
            } catch {
                XCTFail("\(label): threw \(error), jinja2 rendered \(want.debugDescription)")
                return false
            }
        case .raised(let message):
            do {
                let got = try render()
                XCTFail("\(label): rendered \(got.debugDescription), jinja2 raised \(message.debugDescription)")
                return false
            } catch let e as ChatTemplateError {
                XCTAssertEqual(e.kind, .raised, label)
                XCTAssertEqual(e.message, message, label)
                return e.kind == .raised && e.message == message
            } catch {
                XCTFail("\(label): unexpected error \(error)")
                return false
            }
        case .failed(let message):
            do {
                let got = try render()
                XCTFail("\(label): rendered \(got.debugDescription), jinja2 failed with \(message.debugDescription)")
                return false
            } catch {
                return true
            }
        }
    }

    func testPublishedTemplatesMatchJinja2() throws {
        let expected = try ChatTemplateTests.expected()
        let conversations = try Fixtures.json(ChatTemplateTests.root + "/conversations.json").array ?? []
        let bos = expected["bos_token"]?.string ?? "", eos = expected["eos_token"]?.string ?? ""
        guard let templates = expected["templates"]?.object else { return XCTFail("expected.json has no templates") }
        XCTAssertGreaterThanOrEqual(templates.count, 30)
        var matched = 0, total = 0, renderedText = 0
        for (name, results) in templates.pairs {
            let source = String(decoding: try FileSystem.read(ChatTemplateTests.root + "/templates/\(name).jinja"), as: UTF8.self)
            let template: ChatTemplate
            do { template = try ChatTemplate(source: source) } catch {
                // Refused at parse time: jinja2 must have failed on every conversation too.
                for (id, result) in results.object?.pairs.map({ ($0, $1) }) ?? [] {
                    total += 1
                    if case .failed = Outcome(result) { matched += 1 } else { XCTFail("\(name) / \(id): \(error)") }
                }
                continue
            }
            for conversation in conversations {
                guard let id = conversation["id"]?.string, let result = results[id] else { continue }
                total += 1
                let outcome = Outcome(result)
                if case .output = outcome { renderedText += 1 }
                let ok = check("\(name) / \(id)", outcome) {
                    try template.render(messages: conversation["messages"]?.array ?? [], tools: conversation["tools"]?.array,
                                        addGenerationPrompt: conversation["add_generation_prompt"]?.bool ?? false,
                                        bosToken: bos, eosToken: eos, extra: conversation["extra"]?.object.map { o in
                                            Dictionary(uniqueKeysWithValues: o.pairs.map { ($0, $1) })
                                        } ?? [:], now: ChatTemplateTests.fixedNow)
                }
                if ok { matched += 1 }
            }
        }
        print("chat templates: \(matched) of \(total) renderings agree with jinja2 (\(renderedText) texts, \(total - renderedText) errors), \(templates.count) templates")
        XCTAssertEqual(matched, total)
    }

    func testLanguageConstructsMatchJinja2() throws {
        let units = try ChatTemplateTests.expected()["units"]?.array ?? []
        XCTAssertGreaterThan(units.count, 100)
        for unit in units {
            let name = unit["name"]?.string ?? "?"
            let source = unit["template"]?.string ?? ""
            let context = unit["context"]?.object.map { o in Dictionary(uniqueKeysWithValues: o.pairs.map { ($0, $1) }) } ?? [:]
            check(name, Outcome(unit)) {
                try ChatTemplate(source: source).render(context: context, now: ChatTemplateTests.fixedNow)
            }
        }
    }

    /// Seeded random expressions and statement mixes (whitespace control with every block tag),
    /// rendered by jinja2 in the fixture script.
    func testRandomTemplatesMatchJinja2() throws {
        let random = try ChatTemplateTests.expected()["random"]
        let cases = random?["cases"]?.array ?? []
        XCTAssertGreaterThan(cases.count, 300)
        var matched = 0
        for (i, entry) in cases.enumerated() {
            let source = entry["template"]?.string ?? ""
            let contextName = entry["context"]?.string ?? ""
            let context = random?["contexts"]?[contextName]?.object.map { o in
                Dictionary(uniqueKeysWithValues: o.pairs.map { ($0, $1) })
            } ?? [:]
            if check("random case \(i): \(source)", Outcome(entry), {
                try ChatTemplate(source: source).render(context: context, now: ChatTemplateTests.fixedNow)
            }) { matched += 1 }
        }
        XCTAssertEqual(matched, cases.count)
    }

    // MARK: Errors

    func parseError(_ source: String) -> ChatTemplateError? {
        do {
            _ = try ChatTemplate(source: source)
            return nil
        } catch let e as ChatTemplateError {
            return e
        } catch {
            XCTFail("unexpected error type \(error)")
            return nil
        }
    }

    func testUnsupportedConstructsAreNamedAtParseTime() {
        let filter = parseError("line one\n{{ x }}\n{{ x | frobnicate }}")
        XCTAssertEqual(filter?.kind, .syntax)
        XCTAssertEqual(filter?.description, "unsupported filter 'frobnicate' at line 3")
        XCTAssertEqual(parseError("{% frobnicate %}")?.description, "unsupported tag 'frobnicate' at line 1")
        XCTAssertEqual(parseError("{% include 'other.jinja' %}")?.description, "unsupported tag 'include' at line 1")
        XCTAssertEqual(parseError("{{ x is frobnicated }}")?.description, "unsupported test 'frobnicated' at line 1")
        XCTAssertEqual(parseError("{% for x in y recursive %}{% endfor %}")?.message, "unsupported loop modifier 'recursive'")
    }

    func testMalformedTemplatesThrow() {
        let bad = ["{% if true %}never closed", "{{ x ", "{{ 1 + }}", "{% for x in y %}{% endif %}", "{% break %}",
                   "{% endfor %}", "{# no end", "{{ 'unterminated }}", "{{ (1, 2 }}", "{{ [1, 2 }}", "{{ {'a': } }}",
                   "{% set %}", "{% macro %}{% endmacro %}", "{% for in x %}{% endfor %}", "{{ a[:::] }}", "{{ ) }}",
                   "{% if %}{% endif %}", "{% raw %}no end", "{{ x | }}", "{{ x is }}", "{{ 99999999999999999999 }}",
                   "{{ '\\u12' }}", "{% else %}", "{% elif x %}", "{{ }}"]
        for source in bad {
            XCTAssertNotNil(parseError(source), source)
        }
    }

    func testRaiseExceptionSurfacesItsMessage() throws {
        let t = try ChatTemplate(source: "{% if messages[0]['role'] != 'user' %}{{ raise_exception('First message must be from the user, got ' + messages[0]['role']) }}{% endif %}ok")
        XCTAssertEqual(try t.render(messages: [.object(JSONObject([("role", .string("user"))]))], addGenerationPrompt: false), "ok")
        XCTAssertThrowsError(try t.render(messages: [.object(JSONObject([("role", .string("bot"))]))], addGenerationPrompt: false)) { e in
            XCTAssertEqual((e as? ChatTemplateError)?.kind, .raised)
            XCTAssertEqual("\(e)", "First message must be from the user, got bot")
        }
    }

    func testRenderErrorsNameTheLine() throws {
        let t = try ChatTemplate(source: "a\nb\n{{ 'x' + 1 }}")
        XCTAssertThrowsError(try t.render(context: [:])) { e in
            XCTAssertEqual((e as? ChatTemplateError)?.line, 3)
        }
    }

    // MARK: Limits

    func testHostileTemplatesHitLimitsInsteadOfHanging() throws {
        let limits = ChatTemplateLimits(maxOutputBytes: 1 << 20, maxLoopIterations: 100_000, maxCallDepth: 32, maxListLength: 100_000)
        let hostile = [
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
            "{{ 'x' * 100000000000 }}",
            "{{ range(1000000000) | length }}",
            "{{ [1] * 1000000000 }}",
            "{% for i in range(1000000) %}{{ 'text ' * 10 }}{% endfor %}",
            "{{ 2 ** 200 }}",
            "{% set ns = namespace(l=[1]) %}{% for i in range(40) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
            "{{ '{:>1000000000}'.format('x') }}",
        ]
        for source in hostile {
            let t = try ChatTemplate(source: source)
            let clock = ContinuousClock()
            let start = clock.now
            XCTAssertThrowsError(try t.render(context: [:], limits: limits), source)
            XCTAssertLessThan(clock.now - start, .seconds(5), source)
        }
        let deep = String(repeating: "(", count: 10_000) + "1" + String(repeating: ")", count: 10_000)
        XCTAssertNotNil(parseError("{{ \(deep) }}"))
        XCTAssertNotNil(parseError(String(repeating: "{% if true %}", count: 10_000)))
        XCTAssertNotNil(parseError("{{ " + String(repeating: "not ", count: 10_000) + "x }}"))
        XCTAssertNotNil(parseError("{{ " + String(repeating: "-", count: 10_000) + "x }}"))
    }

    /// Deep nesting fails with an error on a thread with a small stack (a server's worker),
    /// rather than overflowing it.
    func testDeepNestingStaysWithinASmallThreadStack() throws {
        let nestedMacro = "{% macro f(n) %}" + String(repeating: "{% if true %}", count: 150) + "{{ f(n + 1) }}"
            + String(repeating: "{% endif %}", count: 150) + "{% endmacro %}{{ f(0) }}"
        let nestedExpression = "{{ " + String(repeating: "(", count: 150) + "1" + String(repeating: ")", count: 150) + " }}"
        let sources = [nestedMacro, nestedExpression, String(repeating: "{% for x in [1] %}", count: 190) + "x"
                       + String(repeating: "{% endfor %}", count: 190)]
        // Written by the thread, read after it signals.
        final class Outcomes: @unchecked Sendable { var list: [String] = [] }
        let results = Outcomes()
        let done = DispatchSemaphore(value: 0)
        let thread = Thread {
            for source in sources {
                do {
                    let t = try ChatTemplate(source: source)
                    results.list.append("rendered \(try t.render(context: [:]).count)")
                } catch {
                    results.list.append("\(error)")
                }
            }
            done.signal()
        }
        thread.stackSize = 512 << 10
        thread.start()
        done.wait()
        let outcomes = results.list
        XCTAssertEqual(outcomes.count, sources.count)
        XCTAssertTrue(outcomes[0].contains("nested too deeply") || outcomes[0].contains("macro calls nested"), outcomes[0])
    }

    /// Macros and their scopes refer to each other; a rendering must still free them all.
    func testRenderingFreesItsScopes() throws {
        weak var root: Scope?
        weak var namespace: Namespace?
        try {
            let scope = Scope(parent: nil)
            root = scope
            let nodes = try TemplateParser.parse("{% set ns = namespace(v=1) %}{% macro m() %}{{ ns.v }}{% endmacro %}"
                + "{% for i in [1, 2] %}{% macro inner() %}{{ i }}{% endmacro %}{{ inner() }}{{ m() }}"
                + "{% set ns.me = ns %}{% set ns.loop = loop %}{{ loop.changed(loop) }}{% endfor %}")
            let interp = Interpreter(limits: ChatTemplateLimits(), now: ChatTemplateTests.fixedNow)
            XCTAssertEqual(try interp.render(nodes, scope: scope), "11True21False")
            if case .namespace(let ns)? = scope.vars["ns"] { namespace = ns }
        }()
        XCTAssertNil(root)
        XCTAssertNil(namespace)
    }

    // MARK: Loading

    func testLoadFindsTheTemplateOfADirectory() throws {
        let dir = try Fixtures.tempDirectory(self)
        XCTAssertNil(try ChatTemplate.load(model: dir))
        let config = """
        {"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
         "chat_template": [{"name": "default", "template": "D{{ messages | length }}"}, {"name": "tool_use", "template": "T"}]}
        """
        try config.write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        XCTAssertEqual(try ChatTemplate.load(model: dir)?.source, "D{{ messages | length }}")
        XCTAssertEqual(try ChatTemplate.load(model: dir, name: "tool_use")?.source, "T")
        XCTAssertThrowsError(try ChatTemplate.load(model: dir, name: "missing"))
        let tokens = ChatTemplate.specialTokens(model: dir)
        XCTAssertEqual(tokens.bos, "<s>")
        XCTAssertEqual(tokens.eos, "</s>")

        try #"{"chat_template": "S{{ bos_token }}"}"#.write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        XCTAssertEqual(try ChatTemplate.load(model: dir)?.source, "S{{ bos_token }}")
        // chat_template.jinja wins over tokenizer_config.json.
        try "J".write(toFile: dir + "/chat_template.jinja", atomically: true, encoding: .utf8)
        XCTAssertEqual(try ChatTemplate.load(model: dir)?.source, "J")

        try FileManager.default.createDirectory(atPath: dir + "/additional_chat_templates", withIntermediateDirectories: true)
        try "R".write(toFile: dir + "/additional_chat_templates/rag.jinja", atomically: true, encoding: .utf8)
        XCTAssertEqual(try ChatTemplate.load(model: dir, name: "rag")?.source, "R")
        XCTAssertThrowsError(try ChatTemplate.load(model: dir, name: "missing"))

        try #"{"chat_template": "{{ x | nosuchfilter }}"}"#.write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        try FileManager.default.removeItem(atPath: dir + "/chat_template.jinja")
        XCTAssertThrowsError(try ChatTemplate.load(model: dir))

        // A list of templates without a default is an error naming them; chat_template.json is
        // read when tokenizer_config.json has none.
        try #"{"chat_template": [{"name": "a", "template": "A"}, {"name": "b", "template": "B"}]}"#
            .write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        XCTAssertThrowsError(try ChatTemplate.load(model: dir)) { e in XCTAssertTrue("\(e)".contains("'a', 'b'")) }
        XCTAssertEqual(try ChatTemplate.load(model: dir, name: "b")?.source, "B")
        try #"{"bos_token": "<s>"}"#.write(toFile: dir + "/tokenizer_config.json", atomically: true, encoding: .utf8)
        try #"{"chat_template": "P"}"#.write(toFile: dir + "/chat_template.json", atomically: true, encoding: .utf8)
        XCTAssertEqual(try ChatTemplate.load(model: dir)?.source, "P")
    }

    func testLoadReadsGGUFMetadata() throws {
        let dir = try Fixtures.tempDirectory(self)
        var w = GGUFWriter()
        w.set("general.architecture", .string("llama"))
        w.set("tokenizer.chat_template", .string("{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"))
        w.set("tokenizer.ggml.tokens", .strings(["<unk>", "<s>", "</s>"]))
        w.set("tokenizer.ggml.bos_token_id", .u32(1))
        w.set("tokenizer.ggml.eos_token_id", .u32(2))
        let path = dir + "/model.gguf"
        try w.write(to: path)
        let t = try XCTUnwrap(try ChatTemplate.load(model: path))
        let tokens = ChatTemplate.specialTokens(model: path)
        XCTAssertEqual(tokens.bos, "<s>")
        XCTAssertEqual(tokens.eos, "</s>")
        let text = try t.render(messages: [.object(JSONObject([("role", .string("user")), ("content", .string("hi"))]))],
                                addGenerationPrompt: true, bosToken: tokens.bos)
        XCTAssertEqual(text, "<s>hi")
    }

    func testMessagesArePreparedAsTransformersDoes() throws {
        let t = try ChatTemplate(source: "{{ messages[0] | tojson }}|{{ tools }}|{{ messages[0].content is defined }}")
        let message = JSONValue.object(JSONObject([("role", .string("assistant")), ("content", .null),
                                                   ("reasoning_content", .string("think"))]))
        XCTAssertEqual(try t.render(messages: [message], addGenerationPrompt: false),
                       #"{"thinking": "think", "role": "assistant", "reasoning_content": "think"}|None|False"#)
        // Extra variables may replace the special tokens (as transformers' kwargs do) but not
        // the variables transformers sets itself.
        let tokens = try ChatTemplate(source: "{{ bos_token }}{{ enable_thinking }}")
        XCTAssertEqual(try tokens.render(messages: [], addGenerationPrompt: false, bosToken: "<s>",
                                         extra: ["bos_token": .string("[B]"), "enable_thinking": .bool(false)]), "[B]False")
        XCTAssertThrowsError(try tokens.render(messages: [], addGenerationPrompt: false, extra: ["messages": .array([])]))
        // A tokenizer without a BOS token leaves bos_token undefined, as transformers does.
        let defined = try ChatTemplate(source: "{{ bos_token is defined }} {{ eos_token is defined }}")
        XCTAssertEqual(try defined.render(messages: [], addGenerationPrompt: false, eosToken: "</s>"), "False True")
    }

    func testStrftimeNowReadsTheGivenClock() throws {
        let t = try ChatTemplate(source: "{{ strftime_now('%d %b %Y %H:%M') }}")
        XCTAssertEqual(try t.render(messages: [], addGenerationPrompt: false, now: ChatTemplateTests.fixedNow), "26 Jul 2024 09:05")
        XCTAssertFalse(try t.render(messages: [], addGenerationPrompt: false).isEmpty)
    }

    // MARK: Fuzzing

    /// Mutated real templates and random text: the parser and renderer must give a template, an
    /// output or an error, never a trap or a hang.
    func testFuzzParserAndRenderer() throws {
        let dir = ChatTemplateTests.root + "/templates"
        let names = try FileManager.default.contentsOfDirectory(atPath: dir).filter { $0.hasSuffix(".jinja") }.sorted()
        var corpus = try names.map { Array(try FileSystem.read(dir + "/" + $0)) }
        corpus += (try ChatTemplateTests.expected()["units"]?.array ?? []).compactMap { $0["template"]?.string.map { Array($0.utf8) } }
        let conversations = try Fixtures.json(ChatTemplateTests.root + "/conversations.json").array ?? []
        let limits = ChatTemplateLimits(maxOutputBytes: 1 << 18, maxLoopIterations: 20_000, maxCallDepth: 16, maxListLength: 20_000)
        let fragments = ["{{", "}}", "{%", "%}", "{#", "#}", "-", "|", "(", ")", "[", "]", "'", "\"", " for ", " if ", " endfor ",
                         " endif ", " in ", " is ", "loop.", ".items()", " not ", " else ", "{% set x = ", "~", "*", "\\", "\n"]
        var rng = SeededGenerator(seed: 11)
        let clock = ContinuousClock()
        let start = clock.now
        var runs = 0, parsed = 0
        while clock.now - start < .seconds(2.5) {
            var bytes: [UInt8]
            if rng.next() % 8 == 0 {
                bytes = (0..<Int(rng.next() % 200)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            } else {
                bytes = corpus[Int(rng.next() % UInt64(corpus.count))]
                for _ in 0..<(1 + Int(rng.next() % 6)) {
                    guard !bytes.isEmpty else { break }
                    let i = Int(rng.next() % UInt64(bytes.count))
                    switch rng.next() % 5 {
                    case 0: bytes[i] = UInt8(truncatingIfNeeded: rng.next())
                    case 1: bytes.removeSubrange(i..<min(bytes.count, i + 1 + Int(rng.next() % 8)))
                    case 2: bytes.insert(contentsOf: Array(fragments[Int(rng.next() % UInt64(fragments.count))].utf8), at: i)
                    case 3: bytes = Array(bytes.prefix(i))
                    default: bytes.insert(contentsOf: bytes[i..<min(bytes.count, i + 32)], at: i)
                    }
                }
            }
            runs += 1
            guard let template = try? ChatTemplate(source: String(decoding: bytes, as: UTF8.self)) else { continue }
            parsed += 1
            let c = conversations[Int(rng.next() % UInt64(conversations.count))]
            _ = try? template.render(messages: c["messages"]?.array ?? [], tools: c["tools"]?.array, addGenerationPrompt: true,
                                     bosToken: "<s>", eosToken: "</s>", now: ChatTemplateTests.fixedNow, limits: limits)
        }
        XCTAssertGreaterThan(runs, 100)
        XCTAssertGreaterThan(parsed, 10)
    }
}
