import Foundation
import Peregrine
import XCTest

/// `peregrine chat` as a process, fed through a pipe: its replies are the engine's greedy
/// answers to the conversation rendered through the chat template.
final class ChatCommandTests: XCTestCase {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    static let modelPath = repo.appendingPathComponent("models/target").path
    /// The ChatML template the server tests use too; the shipped model has none of its own.
    static let templatePath = repo.appendingPathComponent("Tests/Fixtures/server/chatml.jinja").path

    /// A running `peregrine chat`: stdin is a pipe the test writes to, stdout and stderr are
    /// collected as they come.
    final class ChatProcess: @unchecked Sendable {
        let process = Process()
        private let input = Pipe()
        private let lock = NSLock()
        private var out = Data()
        private var err = Data()
        private var readers: [Thread] = []

        init(_ args: [String]) throws {
            let exe = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("peregrine")
            guard FileManager.default.isExecutableFile(atPath: exe.path) else {
                throw XCTSkip("peregrine executable not built next to the tests (\(exe.path))")
            }
            process.executableURL = exe
            process.arguments = ["chat"] + args
            process.currentDirectoryURL = ChatCommandTests.repo
            let o = Pipe(), e = Pipe()
            process.standardInput = input
            process.standardOutput = o
            process.standardError = e
            try process.run()
            for (handle, toOut) in [(o.fileHandleForReading, true), (e.fileHandleForReading, false)] {
                let t = Thread { [self] in
                    while true {
                        let d = handle.availableData
                        if d.isEmpty { break }
                        lock.withLock { if toOut { out += d } else { err += d } }
                    }
                }
                t.start()
                readers.append(t)
            }
        }

        var stdout: String { lock.withLock { String(decoding: out, as: UTF8.self) } }
        var stderr: String { lock.withLock { String(decoding: err, as: UTF8.self) } }

        func send(_ text: String) { input.fileHandleForWriting.write(Data(text.utf8)) }
        func closeInput() { try? input.fileHandleForWriting.close() }

        /// Waits until `condition` holds; fails the test (and stops the process) after `seconds`.
        func wait(_ what: String, seconds: Double = 60, file: StaticString = #filePath, line: UInt = #line,
                  until condition: () -> Bool) -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                if condition() { return true }
                Thread.sleep(forTimeInterval: 0.01)
            }
            XCTFail("timed out waiting for \(what); stderr: \(stderr)", file: file, line: line)
            process.terminate()
            return false
        }

        /// The exit status, once the process ends and its output is read; nil after `seconds`.
        func exitStatus(seconds: Double = 60) -> Int32? {
            let deadline = Date().addingTimeInterval(seconds)
            while process.isRunning && Date() < deadline { Thread.sleep(forTimeInterval: 0.01) }
            guard !process.isRunning else {
                process.terminate()
                return nil
            }
            // The pipes close when the process ends; the readers then take what is left.
            while readers.contains(where: { !$0.isFinished }) && Date() < deadline + 5 { Thread.sleep(forTimeInterval: 0.01) }
            return process.terminationStatus
        }
    }

    /// Runs a whole conversation from `input` and returns (status, stdout, stderr).
    func chat(_ args: [String], input: String) throws -> (Int32?, String, String) {
        let p = try ChatProcess(args)
        p.send(input)
        p.closeInput()
        let status = p.exitStatus(seconds: 300)
        return (status, p.stdout, p.stderr)
    }

    /// What the engine answers greedily to `messages` (role, content) rendered through the
    /// template, as the chat command should send them.
    final class Expected {
        let tokenizer: Tokenizer
        let template: ChatTemplate
        let engine: Engine
        let maxTokens: Int

        init(context: Int, maxTokens: Int) throws {
            tokenizer = try Tokenizer(directory: ChatCommandTests.modelPath)
            let source = try String(contentsOfFile: ChatCommandTests.templatePath, encoding: .utf8)
            template = try ChatTemplate(source: source)
            var config = EngineConfig()
            config.maxSequences = 1
            config.contextLength = context
            engine = try Engine(model: try ModelRegistry.load(directory: ChatCommandTests.modelPath), tokenizer: tokenizer, config: config)
            self.maxTokens = maxTokens
        }

        func prompt(_ messages: [(String, String)]) throws -> [Int] {
            let json = messages.map { JSONValue.object(JSONObject([("role", .string($0.0)), ("content", .string($0.1))])) }
            let text = try template.render(messages: json, addGenerationPrompt: true)
            // The template writes no BOS; the model's tokenizer adds one to plain prompts.
            var ids = tokenizer.encode(text, addSpecialTokens: false)
            if let bos = tokenizer.addedBOS, ids.first != bos { ids.insert(bos, at: 0) }
            return ids
        }

        func reply(_ messages: [(String, String)]) throws -> String {
            let request = EngineRequest(promptTokens: try prompt(messages), maxTokens: maxTokens, sampling: .greedy)
            return try XCTUnwrap(engine.generate(prompts: [request]).first).text
        }
    }

    /// Two turns, a continued line, /reset, a pasted block, /exit: every reply is the greedy
    /// answer to the whole conversation so far, the system message included.
    func testConversationMatchesEngine() throws {
        let system = "You are a helpful assistant."
        let (status, out, err) = try chat(["--chat-template", Self.templatePath, "--system", system, "-n", "12", "--temperature", "0"],
                                          input: "And God said\nIn the \\\nbeginning\n/reset\n\"\"\"\nHello\nworld\n\"\"\"\n/exit\nnot sent\n")
        XCTAssertEqual(status, 0, err)
        let e = try Expected(context: 1024, maxTokens: 12)
        let r1 = try e.reply([("system", system), ("user", "And God said")])
        let r2 = try e.reply([("system", system), ("user", "And God said"), ("assistant", r1), ("user", "In the \nbeginning")])
        let r3 = try e.reply([("system", system), ("user", "Hello\nworld")])
        XCTAssertFalse(r1.isEmpty)
        XCTAssertEqual(out, r1 + "\n" + r2 + "\n" + r3 + "\n")
        XCTAssertTrue(err.contains("[conversation cleared; the system message stays]"), err)
        XCTAssertFalse(err.contains("error"), err)
    }

    /// With a small context the oldest turns go, with a notice, and the answers are those to
    /// what is left; a message too long even alone is refused and the chat goes on.
    func testHistoryDroppedToFitContext() throws {
        let context = 64, n = 16
        let long = Array(repeating: "word", count: 80).joined(separator: " ")
        let messages = ["And God said", "Let there be light", long, "Who are you?"]
        let (status, out, err) = try chat(["--chat-template", Self.templatePath, "-n", "\(n)", "--temperature", "0", "-c", "\(context)"],
                                          input: messages.joined(separator: "\n") + "\n")
        XCTAssertEqual(status, 0, err)
        XCTAssertTrue(err.contains("[not sent: the message makes a prompt of"), err)

        // The same rule, worked out here: keep the latest turns whose prompt leaves room for n tokens.
        let e = try Expected(context: context, maxTokens: n)
        var turns: [(String, String)] = []
        var expected = ""
        var dropped: [Int] = []
        for m in messages {
            var kept = turns
            var prompt = try e.prompt(kept.flatMap { [("user", $0.0), ("assistant", $0.1)] } + [("user", m)])
            while prompt.count + n > context && !kept.isEmpty {
                kept.removeFirst()
                prompt = try e.prompt(kept.flatMap { [("user", $0.0), ("assistant", $0.1)] } + [("user", m)])
            }
            guard prompt.count + n <= context else { continue }
            if kept.count < turns.count { dropped.append(turns.count - kept.count) }
            let r = try e.reply(kept.flatMap { [("user", $0.0), ("assistant", $0.1)] } + [("user", m)])
            turns = kept + [(m, r)]
            expected += r + "\n"
        }
        XCTAssertFalse(dropped.isEmpty, "the test conversation should overflow a context of \(context)")
        XCTAssertEqual(out, expected)
        for d in dropped {
            let what = d == 1 ? "the oldest turn" : "the \(d) oldest turns"
            XCTAssertTrue(err.contains("[dropped \(what) of the conversation to fit the context of \(context) tokens]"), err)
        }
    }

    func testNoTemplateIsOneError() throws {
        let (status, out, err) = try chat(["-n", "4"], input: "hello\n")
        XCTAssertNotNil(status)
        XCTAssertNotEqual(status, 0)
        XCTAssertEqual(out, "")
        XCTAssertEqual(err, "error: models/target has no chat template; give one with --chat-template FILE\n")
        let (s2, _, e2) = try chat(["--chat-template", "/nonexistent.jinja"], input: "")
        XCTAssertEqual(s2, 1)
        XCTAssertEqual(e2, "error: /nonexistent.jinja: no such chat template file\n")
        let (s3, _, e3) = try chat(["--chat-template", Self.templatePath, "-n", "64", "-c", "64"], input: "")
        XCTAssertEqual(s3, 1)
        XCTAssertTrue(e3.hasPrefix("error: -n 64 leaves no room for a message"), e3)
    }

    /// Ctrl-C while a long reply streams stops it, not the program; at the prompt it discards
    /// the input, and a second one in a row quits. Both endings exit 0.
    func testInterruptStopsReply() throws {
        for quitWithCtrlC in [false, true] {
            let p = try ChatProcess(["--chat-template", Self.templatePath, "-n", "900", "--temperature", "0"])
            defer { if p.process.isRunning { p.process.terminate() } }
            guard p.wait("the banner", until: { p.stderr.contains("/exit or Ctrl-D quits") }) else { return }
            p.send("Tell me a long story\n")
            guard p.wait("the reply to start", until: { !p.stdout.isEmpty }) else { return }
            let start = Date()
            kill(p.process.processIdentifier, SIGINT)
            guard p.wait("the interrupt notice", seconds: 30, until: { p.stderr.contains("[interrupted; the reply so far stays") }) else { return }
            // Well before 900 tokens could have been generated.
            XCTAssertLessThan(Date().timeIntervalSince(start), 10)
            // The newline goes to stdout before the notice goes to stderr, but the two pipes are
            // read on separate threads, so the newline may arrive here a moment later.
            XCTAssertTrue(p.wait("the reply's closing newline", seconds: 10, until: { p.stdout.hasSuffix("\n") }))
            kill(p.process.processIdentifier, SIGINT)
            guard p.wait("the prompt's Ctrl-C notice", seconds: 30, until: { p.stderr.contains("[input discarded") }) else { return }
            if quitWithCtrlC {
                kill(p.process.processIdentifier, SIGINT)
            } else {
                p.send("/exit\n")
            }
            XCTAssertEqual(p.exitStatus(seconds: 30), 0, p.stderr)
            XCTAssertTrue(p.process.terminationReason == .exit)
        }
    }
}

/// The conversation the chat command keeps, without a process.
final class ChatConversationTests: XCTestCase {
    func testDropsOldestTurnsNeverTheSystem() throws {
        let tokenizer = try Tokenizer(directory: ChatCommandTests.modelPath)
        let renderer = try XCTUnwrap(try ChatTemplates.load(model: ChatCommandTests.modelPath, file: ChatCommandTests.templatePath,
                                                             tokenizer: tokenizer))
        let bos = tokenizer.addedBOS
        var c = ChatConversation(system: "Be brief.")
        for i in 0..<6 { c.append(user: "question \(i)", assistant: "answer number \(i) is long enough") }
        let all = tokenizer.encodeChatPrompt(try renderer.render(messages: c.messages(adding: "last"), tools: nil, addGenerationPrompt: true,
                                                                 extra: [:]), bos: bos)
        // Everything fits: nothing dropped.
        var same = c
        XCTAssertEqual(try same.prompt(for: "last", renderer: renderer, tokenizer: tokenizer, bos: bos, replyTokens: 10, context: all.count + 10),
                       .fits(tokens: all, droppedTurns: 0))
        XCTAssertEqual(same.turns.count, 6)
        // One token short: the oldest turn goes, the system message stays first.
        guard case .fits(let ids, let dropped) = try c.prompt(for: "last", renderer: renderer, tokenizer: tokenizer, bos: bos,
                                                              replyTokens: 10, context: all.count + 9) else {
            return XCTFail("should fit without the oldest turn")
        }
        XCTAssertEqual(dropped, 1)
        XCTAssertEqual(c.turns.first?.user, "question 1")
        XCTAssertTrue(tokenizer.decode(ids).contains("<|im_start|>system\nBe brief.<|im_end|>"))
        // Not even the system message and the new one fit: refused, the history kept.
        guard case .tooLong = try c.prompt(for: "last", renderer: renderer, tokenizer: tokenizer, bos: bos, replyTokens: 10, context: 12) else {
            return XCTFail("should not fit")
        }
        XCTAssertEqual(c.turns.count, 5)
        c.reset()
        XCTAssertTrue(c.turns.isEmpty)
        XCTAssertEqual(c.messages(adding: nil).count, 1)
    }
}
