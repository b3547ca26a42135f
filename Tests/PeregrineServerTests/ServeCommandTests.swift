import Foundation
import Peregrine
import XCTest

/// `peregrine serve` as a process: it listens, answers the official openai client, and exits 0
/// on SIGTERM.
final class ServeCommandTests: XCTestCase {
    /// A started `peregrine serve`, its stderr collected line by line.
    final class ServeProcess: @unchecked Sendable {
        let process = Process()
        private let lock = NSLock()
        private var lines: [String] = []

        init(_ args: [String]) throws {
            let exe = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("peregrine")
            guard FileManager.default.isExecutableFile(atPath: exe.path) else {
                throw XCTSkip("peregrine executable not built next to the tests (\(exe.path))")
            }
            process.executableURL = exe
            process.arguments = ["serve", "--port", "0"] + args
            process.currentDirectoryURL = URL(fileURLWithPath: TestServer.repo)
            let err = Pipe()
            process.standardError = err
            process.standardOutput = FileHandle.nullDevice
            try process.run()
            let handle = err.fileHandleForReading
            let t = Thread { [self] in
                var pending = Data()
                while true {
                    let d = handle.availableData
                    if d.isEmpty { break }
                    pending += d
                    while let nl = pending.firstIndex(of: 0x0A) {
                        let line = String(decoding: pending[pending.startIndex..<nl], as: UTF8.self)
                        pending = Data(pending[(nl + 1)...])
                        lock.withLock { lines.append(line) }
                    }
                }
            }
            t.start()
        }

        var output: [String] { lock.withLock { lines } }

        /// The port from the "listening on" line.
        func port(timeout: Double = 60) throws -> Int {
            let deadline = Date().addingTimeInterval(timeout)
            while Date() < deadline && process.isRunning {
                if let line = output.first(where: { $0.contains("listening on http://") }),
                   let port = line.split(separator: ":").last.flatMap({ Int($0) }) {
                    return port
                }
                Thread.sleep(forTimeInterval: 0.05)
            }
            throw TestClientError.io("serve did not start: \(output.joined(separator: "\n"))")
        }

        /// Sends SIGTERM and waits for the exit status.
        func terminate() -> Int32 {
            kill(process.processIdentifier, SIGTERM)
            process.waitUntilExit()
            return process.terminationStatus
        }
    }

    func testOpenAIPythonClient() async throws {
        let serve = try ServeProcess(["--api-key", "test-key", "--served-model-name", "target"] + Self.chatArguments())
        defer { if serve.process.isRunning { serve.process.terminate() } }
        let port = try serve.port()
        let script = Process()
        script.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        script.arguments = ["python3", "scripts/openai_client_test.py", "http://127.0.0.1:\(port)", "target",
                            Self.chatArguments().isEmpty ? "nochat" : "chat"]
        script.currentDirectoryURL = URL(fileURLWithPath: TestServer.repo)
        var env = ProcessInfo.processInfo.environment
        env["OPENAI_API_KEY"] = "test-key"
        script.environment = env
        let out = Pipe()
        script.standardOutput = out
        script.standardError = out
        try script.run()
        let text = try await onThread { String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self) }
        script.waitUntilExit()
        if script.terminationStatus == 77 {
            _ = serve.terminate()
            throw XCTSkip(text.trimmingCharacters(in: .whitespacesAndNewlines))
        }
        XCTAssertEqual(script.terminationStatus, 0, text)
        XCTAssertTrue(text.contains("checks passed"), text)
        XCTAssertEqual(serve.terminate(), 0, serve.output.joined(separator: "\n"))
        // The access log has a line per request with its status and tokens.
        XCTAssertTrue(serve.output.contains { $0.contains("POST /v1/completions 200") && $0.contains("completion_tokens=8") },
                      serve.output.joined(separator: "\n"))
        XCTAssertTrue(serve.output.contains { $0.contains("GET /v1/models 401") })
    }

    /// SIGTERM during a streamed request: the stream is finished or cancelled, and the exit status is 0.
    func testSIGTERMExitsZero() async throws {
        let serve = try ServeProcess(["--shutdown-timeout", "1"])
        defer { if serve.process.isRunning { serve.process.terminate() } }
        let port = try serve.port()
        let c = try TestConnection(port: port)
        try c.sendRequest(method: "POST", path: "/v1/completions",
                          body: Array(#"{"prompt": "And God said", "max_tokens": 1000, "ignore_eos": true, "stream": true}"#.utf8))
        XCTAssertEqual(try c.readHead().status, 200)
        XCTAssertNotNil(try c.readChunk())
        let status = try await onThread { serve.terminate() }
        XCTAssertEqual(status, 0, serve.output.joined(separator: "\n"))
        XCTAssertTrue(serve.output.contains { $0.contains("shutting down") })
    }

    static func chatArguments() -> [String] { ["--chat-template", "Tests/Fixtures/server/chatml.jinja"] }
}
