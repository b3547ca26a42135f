import Foundation
import Peregrine
#if canImport(Glibc)
import Glibc
#endif

/// A raw HTTP/1.1 client over a loopback socket, so tests control every byte: malformed bodies,
/// reading part of a stream, and hanging up in the middle of one. Its calls block, so they run on
/// threads of their own, never on the concurrency pool the server shares.
final class TestConnection {
    let fd: Int32
    private var buffer: [UInt8] = []

    init(port: Int) throws {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { throw TestClientError.io("socket") }
        var addr = sockaddr_in()
        addr.sin_family = sa_family_t(AF_INET)
        addr.sin_port = in_port_t(UInt16(port).bigEndian)
        addr.sin_addr.s_addr = inet_addr("127.0.0.1")
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard r == 0 else { close(fd); throw TestClientError.io("connect") }
        var timeout = timeval(tv_sec: 120, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) throws {
        var sent = 0
        while sent < bytes.count {
            let n = bytes[sent...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            guard n > 0 else { throw TestClientError.io("send") }
            sent += n
        }
    }

    func sendRequest(method: String, path: String, body: [UInt8]?, headers: [String: String] = [:], keepAlive: Bool = false) throws {
        var head = "\(method) \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        if !keepAlive { head += "Connection: close\r\n" }
        for (k, v) in headers { head += "\(k): \(v)\r\n" }
        if let body { head += "Content-Type: application/json\r\nContent-Length: \(body.count)\r\n" }
        head += "\r\n"
        try send(Array(head.utf8) + (body ?? []))
    }

    /// Reads more bytes into the buffer; false at end of stream.
    private func fill() throws -> Bool {
        var chunk = [UInt8](repeating: 0, count: 65536)
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        if n < 0 { throw TestClientError.io("recv (errno \(errno))") }
        if n == 0 { return false }
        buffer += chunk[0..<n]
        return true
    }

    private func line() throws -> String {
        while true {
            if let i = buffer.firstIndex(of: 0x0A) {
                let l = String(decoding: buffer[..<i], as: UTF8.self).trimmingCharacters(in: ["\r"])
                buffer.removeSubrange(...i)
                return l
            }
            guard try fill() else { throw TestClientError.io("connection closed in a line") }
        }
    }

    private func bytes(_ n: Int) throws -> [UInt8] {
        while buffer.count < n { guard try fill() else { throw TestClientError.io("connection closed in a body") } }
        defer { buffer.removeSubrange(..<n) }
        return Array(buffer[..<n])
    }

    func readHead() throws -> (status: Int, headers: [String: String]) {
        let statusLine = try line()
        let parts = statusLine.split(separator: " ")
        guard parts.count >= 2, let status = Int(parts[1]) else { throw TestClientError.io("bad status line '\(statusLine)'") }
        var headers: [String: String] = [:]
        while true {
            let l = try line()
            if l.isEmpty { break }
            if let c = l.firstIndex(of: ":") {
                headers[l[..<c].lowercased()] = l[l.index(after: c)...].trimmingCharacters(in: .whitespaces)
            }
        }
        return (status, headers)
    }

    /// The next chunk of a chunked body (nil after the last).
    func readChunk() throws -> [UInt8]? {
        let sizeLine = try line()
        guard let size = Int(sizeLine.split(separator: ";")[0], radix: 16) else { throw TestClientError.io("bad chunk size '\(sizeLine)'") }
        if size == 0 {
            _ = try line()
            return nil
        }
        let data = try bytes(size)
        _ = try line()
        return data
    }

    func readResponse() throws -> HTTPResult {
        let (status, headers) = try readHead()
        var body: [UInt8] = []
        if headers["transfer-encoding"]?.lowercased() == "chunked" {
            while let c = try readChunk() { body += c }
        } else if let n = headers["content-length"].flatMap({ Int($0) }) {
            body = try bytes(n)
        } else {
            while try fill() {}
            body = buffer
            buffer = []
        }
        return HTTPResult(status: status, headers: headers, body: body)
    }
}

enum TestClientError: Error { case io(String) }

struct HTTPResult {
    var status: Int
    var headers: [String: String]
    var body: [UInt8]

    var text: String { String(decoding: body, as: UTF8.self) }
    var json: JSONValue? { try? JSON.parse(body) }
    var errorCode: String? { json?["error"]?["code"]?.string }
    var errorParam: String? { json?["error"]?["param"]?.string }

    /// The `data:` payloads of a server-sent-event body, `[DONE]` included.
    var events: [String] {
        text.components(separatedBy: "\n\n").compactMap { e in
            e.hasPrefix("data: ") ? String(e.dropFirst(6)) : nil
        }
    }
}

/// Runs blocking client code on a thread of its own.
func onThread<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
    try await withCheckedThrowingContinuation { continuation in
        let t = Thread {
            do { continuation.resume(returning: try body()) } catch { continuation.resume(throwing: error) }
        }
        t.stackSize = 1 << 20
        t.start()
    }
}

struct TestClient: Sendable {
    let port: Int
    var apiKey: String?

    func request(_ method: String, _ path: String, body: [UInt8]? = nil, headers: [String: String] = [:]) async throws -> HTTPResult {
        var headers = headers
        if let apiKey, headers["Authorization"] == nil { headers["Authorization"] = "Bearer \(apiKey)" }
        let h = headers
        return try await onThread {
            let c = try TestConnection(port: port)
            try c.sendRequest(method: method, path: path, body: body, headers: h)
            return try c.readResponse()
        }
    }

    func post(_ path: String, _ json: String, headers: [String: String] = [:]) async throws -> HTTPResult {
        try await request("POST", path, body: Array(json.utf8), headers: headers)
    }

    func get(_ path: String, headers: [String: String] = [:]) async throws -> HTTPResult {
        try await request("GET", path, headers: headers)
    }
}
