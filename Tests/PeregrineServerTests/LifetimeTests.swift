import Foundation
import Peregrine
@testable import PeregrineServer
import XCTest

/// Concurrency and lifetime: disconnects cancel, requests share the engine without changing each
/// other's results, the queue is bounded, shutdown drains.
final class LifetimeTests: XCTestCase {
    /// Sends a long streamed request, reads its first event, and hangs up.
    func testDisconnectCancelsStream() async throws {
        let s = try await SharedServer.instance.get()
        let before = s.server.metrics.requestCount(endpoint: "completions", outcome: .cancelled)
        let port = s.port
        let first = try await onThread { () -> String in
            let c = try TestConnection(port: port)
            try c.sendRequest(method: "POST", path: "/v1/completions",
                              body: Array(#"{"prompt": "And God said", "max_tokens": 1000, "ignore_eos": true, "stream": true}"#.utf8))
            let head = try c.readHead()
            guard head.status == 200 else { return "status \(head.status)" }
            return String(decoding: try c.readChunk() ?? [], as: UTF8.self)
            // The connection closes here, in the middle of the stream.
        }
        XCTAssertTrue(first.hasPrefix("data: {"), first)
        let stats = try await s.waitUntilIdle()
        XCTAssertEqual(stats.kvBlocksUsed, 0)
        XCTAssertEqual(stats.running, 0)
        XCTAssertEqual(s.server.metrics.requestCount(endpoint: "completions", outcome: .cancelled), before + 1)
    }

    /// A client waiting for a whole answer hangs up while it is being generated.
    func testDisconnectCancelsWholeRequest() async throws {
        let s = try await SharedServer.instance.get()
        let c = try TestConnection(port: s.port)
        try c.sendRequest(method: "POST", path: "/v1/completions",
                          body: Array(#"{"prompt": "And God said", "max_tokens": 1000, "ignore_eos": true}"#.utf8))
        let deadline = Date().addingTimeInterval(20)
        while s.engine.stats.running == 0 && Date() < deadline { try await Task.sleep(for: .milliseconds(10)) }
        XCTAssertGreaterThan(s.engine.stats.kvBlocksUsed, 0)
        shutdown(c.fd, Int32(SHUT_RDWR))
        let stats = try await s.waitUntilIdle()
        XCTAssertEqual(stats.kvBlocksUsed, 0)
        XCTAssertEqual(stats.running, 0)
    }

    /// Eight requests at once give each the greedy text it gets alone.
    func testConcurrentRequestsMatchSequential() async throws {
        let s = try await SharedServer.instance.get()
        let prompts = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the", "Let there be",
                       "And it came to pass", "Thou shalt not", "Unto the"]
        func body(_ p: String) -> String { #"{"prompt": "\#(p)", "max_tokens": 16, "temperature": 0, "ignore_eos": true}"# }
        var alone: [String] = []
        for p in prompts {
            let r = try await s.client.post("/v1/completions", body(p))
            alone.append(r.json?["choices"]?.array?.first?["text"]?.string ?? "error \(r.text)")
        }
        let client = s.client
        let together = try await withThrowingTaskGroup(of: (Int, String).self) { group in
            for (i, p) in prompts.enumerated() {
                group.addTask {
                    let r = try await client.post("/v1/completions", body(p))
                    return (i, r.json?["choices"]?.array?.first?["text"]?.string ?? "error \(r.text)")
                }
            }
            var out = Array(repeating: "", count: prompts.count)
            for try await (i, t) in group { out[i] = t }
            return out
        }
        XCTAssertEqual(together, alone)
        let stats = try await s.waitUntilIdle()
        XCTAssertEqual(stats.kvBlocksUsed, 0)
    }

    /// With one running request and no queue, the next one is turned away with 503.
    func testQueueFullIs503() async throws {
        let s = try await TestServer.start(chatTemplate: false, configure: { $0.maxQueue = 0; $0.maxRunning = 1 },
                                           engineConfig: { $0.maxSequences = 1 })
        let port = s.port
        let long = TestConnection.self
        let c = try long.init(port: port)
        try c.sendRequest(method: "POST", path: "/v1/completions",
                          body: Array(#"{"prompt": "And God said", "max_tokens": 1000, "ignore_eos": true, "stream": true}"#.utf8))
        XCTAssertEqual(try c.readHead().status, 200)
        let r = try await s.client.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 2}"#)
        XCTAssertEqual(r.status, 503)
        XCTAssertEqual(r.errorCode, "queue_full")
        XCTAssertEqual(r.json?["error"]?["type"]?.string, "server_error")
        shutdown(c.fd, Int32(SHUT_RDWR))
        _ = try await s.waitUntilIdle()
        let after = try await s.client.post("/v1/completions", #"{"prompt": "And God said", "max_tokens": 2}"#)
        XCTAssertEqual(after.status, 200)
        XCTAssertEqual(s.server.metrics.requestCount(endpoint: "completions", outcome: .rejected), 1)
        try await s.stop()
    }

    /// Shutdown lets a short request finish, cancels a long one after the grace period, and returns.
    func testShutdownDrains() async throws {
        let s = try await TestServer.start(chatTemplate: false, configure: { $0.shutdownGracePeriod = .milliseconds(500) })
        let port = s.port
        let streamed = Task {
            try await onThread { () -> HTTPResult in
                let c = try TestConnection(port: port)
                try c.sendRequest(method: "POST", path: "/v1/completions",
                                  body: Array(#"{"prompt": "And God said", "max_tokens": 1000, "ignore_eos": true, "stream": true}"#.utf8))
                return try c.readResponse()
            }
        }
        let deadline = Date().addingTimeInterval(20)
        while s.engine.stats.running == 0 && Date() < deadline { try await Task.sleep(for: .milliseconds(10)) }
        let started = Date()
        try await s.stop()
        XCTAssertLessThan(Date().timeIntervalSince(started), 15)
        let r = try await streamed.value
        XCTAssertEqual(r.status, 200)
        XCTAssertEqual(r.events.last, "[DONE]")
        XCTAssertTrue(r.text.contains("shutting_down"), r.text)
        XCTAssertThrowsError(try TestConnection(port: port), "the listener is closed")
    }
}
