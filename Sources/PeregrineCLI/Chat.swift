import ArgumentParser
import Foundation
import Peregrine

struct Chat: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Chat with a model in the terminal, through its chat template; replies stream to stdout.",
        discussion: """
            Type a message and press Enter. The reply streams to stdout; the prompt ("> ") and \
            notices (marked with [ ]) go to stderr, so replies can be piped.

            Multi-line input: end a line with a backslash to continue on the next line (as \
            llama.cpp does), or, for pasting, open a block with \"\"\" and end it with a line that \
            ends with \"\"\" (as Ollama does).

            Commands: /help lists them; /reset forgets the conversation (the --system message \
            stays); /exit, or Ctrl-D on an empty line, quits.

            Ctrl-C while a reply streams stops that reply; what was printed stays in the \
            conversation. At the prompt, Ctrl-C discards what was typed and a second Ctrl-C in a \
            row quits.

            Every message is sent with the whole conversation, rendered through the chat template \
            (the model's own or --chat-template). When that prompt plus -n tokens would not fit \
            the context, the oldest turns (a message and its reply) are dropped, never the \
            system message, with a notice; a message too long to fit even alone is not sent.

            When stdin is not a terminal, each line (or block) is one message and each reply is \
            followed by a newline on stdout.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(help: "A Jinja chat template file, used instead of the model's own.")
    var chatTemplate: String?

    @Option(help: "A system message, sent first in every prompt.")
    var system: String?

    @Option(name: [.customShort("n"), .long], help: "Most tokens in a reply.")
    var maxTokens: Int = 512

    @OptionGroup var samplingOptions: SamplingOptions

    @Option(name: [.customShort("c"), .long], help: "Context length: the conversation plus a reply (default: the model's).")
    var ctxSize: Int?

    func validate() throws {
        if maxTokens < 1 || maxTokens > TokenCounts.limit { throw ValidationError("--max-tokens must be between 1 and \(TokenCounts.limit)") }
        if let c = ctxSize, c < 2 || c > TokenCounts.limit { throw ValidationError("--ctx-size must be between 2 and \(TokenCounts.limit)") }
    }

    func run() throws {
        try reportingErrors {
            let sampling = try samplingOptions.parameters()
            let path = modelOptions.model
            let tokenizer = try Tokenizer(directory: path)
            // The template before the weights: a model without one is refused at once.
            guard let template = try ChatTemplates.load(model: path, file: chatTemplate, tokenizer: tokenizer) else {
                throw PeregrineError.invalidArgument("\(path) has no chat template; give one with --chat-template FILE")
            }
            let model = try modelOptions.load()
            let context = ctxSize ?? model.config.maxPositions
            guard maxTokens < context else {
                throw PeregrineError.invalidArgument("-n \(maxTokens) leaves no room for a message in a context of \(context) tokens")
            }
            let engine = try Engine(model: model, tokenizer: tokenizer, config: Self.engineConfig(model: model, context: context))
            defer { engine.shutdown() }
            // The engine takes a request only if one KV block beyond its tokens is free (so it
            // can always be scheduled); the conversation is kept within what the pool holds.
            let window = min(engine.contextLength, (engine.stats.kvBlocksTotal - 1) * engine.config.blockSize)
            guard maxTokens < window else {
                throw PeregrineError.invalidArgument("-n \(maxTokens) leaves no room for a message in the \(window) positions the KV cache holds")
            }
            let session = ChatSession(engine: engine, tokenizer: tokenizer, renderer: template, window: window,
                                      maxTokens: maxTokens, sampling: sampling, stops: samplingOptions.stops, system: system)
            session.run(banner: "chat with \(path) on \(model.backendName): context \(window) tokens, replies up to \(maxTokens), seed \(sampling.seed); /help lists the commands, /exit or Ctrl-D quits")
        }
    }

    /// One sequence at a time. The pool holds a whole context plus the block the engine keeps
    /// free, so any prompt that fits the context can be sent; on the CPU at most a quarter of
    /// memory (as the engine's own default), on a GPU what the engine takes from free memory.
    static func engineConfig(model: LanguageModel, context: Int) -> EngineConfig {
        var c = EngineConfig()
        c.maxSequences = 1
        c.contextLength = context
        if model.freeDeviceMemory == nil {
            let blockBytes = PagedKVCache.bytesPerPosition(model.config) * c.blockSize
            let physical = Int(sysconf(Int32(_SC_PHYS_PAGES))) * Int(sysconf(Int32(_SC_PAGESIZE)))
            c.kvBlocks = max(1, min((context + c.blockSize - 1) / c.blockSize + 1, physical / 4 / blockBytes))
        }
        return c
    }
}

/// The conversation loop: reads messages and commands, sends each message with the history
/// through the engine, streams the reply.
final class ChatSession {
    let engine: Engine
    let tokenizer: Tokenizer
    let renderer: ChatPromptRenderer
    let window: Int
    let maxTokens: Int
    let sampling: SamplingParameters
    let stops: [String]
    let bos: Int?
    var conversation: ChatConversation
    let interrupts = InterruptState()
    let interactive = isatty(STDIN_FILENO) == 1

    static let help = """
        /help    this list
        /reset   forget the conversation (the system message stays)
        /exit    quit (so does Ctrl-D on an empty line)
        A line ending with \\ continues on the next line; \"\"\" opens a block that ends with a line ending with \"\"\".
        Ctrl-C stops a streaming reply; at the prompt it discards the input, and twice in a row quits.
        """

    init(engine: Engine, tokenizer: Tokenizer, renderer: ChatPromptRenderer, window: Int, maxTokens: Int,
         sampling: SamplingParameters, stops: [String], system: String?) {
        self.engine = engine
        self.tokenizer = tokenizer
        self.renderer = renderer
        self.window = window
        self.maxTokens = maxTokens
        self.sampling = sampling
        self.stops = stops
        bos = tokenizer.addedBOS
        conversation = ChatConversation(system: system)
    }

    /// Runs until /exit or the end of the input. `banner` is shown once Ctrl-C is handled, so
    /// whoever waits for it knows an interrupt from then on reaches the chat, not the process.
    func run(banner: String) {
        // SIGINT is ignored as a signal and handled as an event, so Ctrl-C never kills the
        // process halfway through a reply and never interrupts a read.
        signal(SIGINT, SIG_IGN)
        let source = DispatchSource.makeSignalSource(signal: SIGINT, queue: DispatchQueue(label: "peregrine-chat-sigint"))
        source.setEventHandler { [interrupts, engine, interactive] in
            switch interrupts.interrupt() {
            case .cancel(let id):
                engine.cancel(id)
            case .cancelLater, .ignore:
                break
            case .discardInput:
                Terminal.notice("\n[input discarded; Ctrl-C again, /exit or Ctrl-D quits]")
                if interactive { Terminal.prompt("> ") }
            case .quit:
                Terminal.notice("")
                exit(0)
            }
        }
        source.resume()
        defer { source.cancel() }
        Terminal.notice(banner)

        let reader = LineReader(fd: STDIN_FILENO)
        var input = InputAssembler()
        while true {
            interrupts.enterPrompt()
            if interactive { Terminal.prompt(input.isContinuing ? "... " : "> ") }
            guard let line = reader.readLine() else {
                // End of input: an unfinished block or continued line is still a message.
                if interactive { Terminal.notice("") }
                if let text = input.finish() { send(text) }
                return
            }
            if interrupts.takeDiscard() { input = InputAssembler() }
            guard let entry = input.add(line) else { continue }
            switch entry {
            case .command(let name):
                switch name {
                case "exit": return
                case "help": Terminal.notice(Self.help)
                case "reset":
                    conversation.reset()
                    Terminal.notice(conversation.system == nil ? "[conversation cleared]" : "[conversation cleared; the system message stays]")
                default:
                    Terminal.notice("[unknown command /\(name); /help lists them. To send it as a message, start it with a space]")
                }
            case .message(let text):
                send(text)
            }
        }
    }

    /// Sends one message with the conversation, streams the reply to stdout, records the turn.
    func send(_ text: String) {
        guard !text.allSatisfy(\.isWhitespace) else { return }
        interrupts.enterGeneration()
        let prompt: ChatConversation.Prompt
        do {
            prompt = try conversation.prompt(for: text, renderer: renderer, tokenizer: tokenizer, bos: bos,
                                             replyTokens: maxTokens, context: window)
        } catch {
            Terminal.notice("[not sent: the chat template failed: \(error)]")
            return
        }
        let tokens: [Int]
        switch prompt {
        case .tooLong(let count):
            Terminal.notice("[not sent: the message makes a prompt of \(count) tokens, which with -n \(maxTokens) exceeds the context of \(window) tokens; a smaller -n leaves more room]")
            return
        case .fits(let ids, let dropped):
            if dropped > 0 {
                let what = dropped == 1 ? "the oldest turn" : "the \(dropped) oldest turns"
                Terminal.notice("[dropped \(what) of the conversation to fit the context of \(window) tokens]")
            }
            tokens = ids
        }
        var request = EngineRequest(promptTokens: tokens, maxTokens: maxTokens, sampling: sampling)
        request.stopStrings = stops
        let reply: Reply
        do {
            let (id, outputs) = try engine.stream(request)
            if interrupts.streaming(id) { engine.cancel(id) }
            reply = Self.collect(outputs)
            // From here a Ctrl-C concerns the next input, not this finished reply.
            interrupts.enterPrompt()
        } catch {
            Terminal.notice("[not sent: \(error)]")
            return
        }
        Terminal.write("\n")
        if let error = reply.error {
            Terminal.notice("[the reply failed: \(error)]")
            return
        }
        conversation.append(user: text, assistant: reply.text)
        if reply.finishReason == .cancelled {
            Terminal.notice("[interrupted; the reply so far stays in the conversation]")
        }
        if interactive { Terminal.notice("") }
    }

    struct Reply {
        var text = ""
        var finishReason: FinishReason?
        var error: Error?
    }

    /// Writes the reply's text as it comes and returns all of it. The stream is read on a task;
    /// this thread waits, so the loop stays plain synchronous code.
    static func collect(_ outputs: AsyncThrowingStream<EngineOutput, Error>) -> Reply {
        final class Box: @unchecked Sendable { var reply = Reply() }
        let box = Box()
        let done = DispatchSemaphore(value: 0)
        Task {
            do {
                for try await o in outputs {
                    if !o.text.isEmpty {
                        Terminal.write(o.text)
                        box.reply.text += o.text
                    }
                    if let f = o.finishReason { box.reply.finishReason = f }
                }
            } catch {
                box.reply.error = error
            }
            done.signal()
        }
        done.wait()
        return box.reply
    }
}

/// What Ctrl-C means at each moment: the signal handler and the loop share this.
final class InterruptState: @unchecked Sendable {
    enum Action { case cancel(Int), cancelLater, discardInput, quit, ignore }
    private enum Phase { case prompt, starting, streaming(Int) }

    private let lock = NSLock()
    private var phase = Phase.prompt
    /// Ctrl-C came at the prompt and no line was read since: the next one quits.
    private var armed = false
    private var discard = false
    private var cancelPending = false

    func interrupt() -> Action {
        lock.withLock {
            switch phase {
            case .streaming(let id):
                return .cancel(id)
            case .starting:
                // The request has no id yet; `streaming` cancels it as soon as it has.
                cancelPending = true
                return .cancelLater
            case .prompt:
                if armed { return .quit }
                armed = true
                discard = true
                return .discardInput
            }
        }
    }

    func enterPrompt() {
        lock.withLock { phase = .prompt }
    }

    /// A line arrived; true when Ctrl-C asked for what was typed before it to be discarded.
    func takeDiscard() -> Bool {
        lock.withLock {
            armed = false
            defer { discard = false }
            return discard
        }
    }

    func enterGeneration() {
        lock.withLock {
            phase = .starting
            cancelPending = false
        }
    }

    /// The request is in the engine; true when Ctrl-C came while it was being prepared.
    func streaming(_ id: Int) -> Bool {
        lock.withLock {
            phase = .streaming(id)
            return cancelPending
        }
    }
}

/// Turns lines into messages and commands: a trailing backslash continues a message on the
/// next line; a line starting with \"\"\" opens a block that the next line ending with \"\"\"
/// closes. Commands are single lines starting with "/".
struct InputAssembler {
    enum Entry: Equatable {
        case message(String)
        case command(String)
    }

    private var lines: [String] = []
    private var inBlock = false
    private var continued = false

    var isContinuing: Bool { inBlock || continued }

    mutating func add(_ raw: String) -> Entry? {
        // Text piped from Windows files ends its lines with \r\n.
        let line = raw.hasSuffix("\r") ? String(raw.dropLast()) : raw
        if inBlock {
            if line.hasSuffix("\"\"\"") {
                let last = String(line.dropLast(3))
                if !last.isEmpty { lines.append(last) }
                return take()
            }
            lines.append(line)
            return nil
        }
        if !continued, line.hasPrefix("\"\"\"") {
            let rest = String(line.dropFirst(3))
            if rest.count >= 3, rest.hasSuffix("\"\"\"") {
                lines.append(String(rest.dropLast(3)))
                return take()
            }
            inBlock = true
            if !rest.isEmpty { lines.append(rest) }
            return nil
        }
        if line.hasSuffix("\\") {
            lines.append(String(line.dropLast()))
            continued = true
            return nil
        }
        if !continued, line.hasPrefix("/") {
            let name = line.dropFirst().trimmingCharacters(in: .whitespaces)
            return .command(name)
        }
        lines.append(line)
        return take()
    }

    /// What is left at the end of the input, as a message.
    mutating func finish() -> String? {
        guard isContinuing, !lines.isEmpty else { return nil }
        guard case .message(let text)? = take() else { return nil }
        return text
    }

    private mutating func take() -> Entry? {
        let text = lines.joined(separator: "\n")
        lines.removeAll()
        inBlock = false
        continued = false
        return .message(text)
    }
}

/// Lines from a file descriptor, read with read(2) so that nothing but the end of the input
/// ends them (a signal arriving during the read is retried).
final class LineReader {
    private let fd: Int32
    private var buffer: [UInt8] = []
    private var atEnd = false

    init(fd: Int32) { self.fd = fd }

    /// The next line without its newline; nil at the end of the input. A last line without a
    /// newline is still a line.
    func readLine() -> String? {
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                let line = String(decoding: buffer[..<nl], as: UTF8.self)
                buffer.removeSubrange(...nl)
                return line
            }
            if atEnd {
                guard !buffer.isEmpty else { return nil }
                let line = String(decoding: buffer, as: UTF8.self)
                buffer.removeAll()
                return line
            }
            var chunk = [UInt8](repeating: 0, count: 4096)
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n > 0 {
                buffer += chunk[..<n]
            } else if n == 0 {
                atEnd = true
            } else if errno != EINTR {
                atEnd = true
            }
        }
    }
}

/// Unbuffered writes: reply text to stdout as it comes, everything else to stderr.
enum Terminal {
    static func write(_ s: String) { writeAll(STDOUT_FILENO, s) }

    /// A line for the person at the terminal (or a log), never mixed into the replies.
    static func notice(_ s: String) { writeAll(STDERR_FILENO, s + "\n") }

    static func prompt(_ s: String) { writeAll(STDERR_FILENO, s) }

    private static func writeAll(_ fd: Int32, _ s: String) {
        let bytes = Array(s.utf8)
        var offset = 0
        while offset < bytes.count {
            let n = bytes.withUnsafeBytes { raw -> Int in
                guard let base = raw.baseAddress else { return 0 }
                return Glibc.write(fd, base + offset, raw.count - offset)
            }
            if n < 0 && errno == EINTR { continue }
            // A closed stdout or stderr: nothing more can be shown there.
            if n <= 0 { return }
            offset += n
        }
    }
}
