import Foundation
import Hummingbird
import Logging
import NIOCore
import Peregrine

/// Per-request state shared by the middleware and the route.
public struct ServerContext: RequestContext {
    public var coreContext: CoreRequestContextStorage
    let channel: any Channel
    let notes = RequestNotes()

    public init(source: ApplicationRequestContextSource) {
        coreContext = .init(source: source)
        channel = source.channel
    }
}

/// What a route tells the access log: token counts, and whether the client went away.
final class RequestNotes: @unchecked Sendable {
    private let lock = NSLock()
    private var prompt = 0, completion = 0
    private var disconnected = false

    func tokens(prompt: Int, completion: Int) {
        lock.lock()
        self.prompt = prompt
        self.completion = completion
        lock.unlock()
    }

    func markDisconnected() {
        lock.lock()
        disconnected = true
        lock.unlock()
    }

    var summary: String {
        lock.lock()
        defer { lock.unlock() }
        var s = ""
        if prompt > 0 || completion > 0 { s += " prompt_tokens=\(prompt) completion_tokens=\(completion)" }
        if disconnected { s += " client_disconnected" }
        return s
    }
}

/// One log line per request: method, path, status, duration and tokens. A streamed response is
/// logged when its last byte is written, so its duration and tokens are the whole stream's.
struct AccessLogMiddleware: RouterMiddleware {
    typealias Context = ServerContext
    let logger: Logger

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let start = ContinuousClock.now
        let method = request.method.rawValue, path = request.uri.path
        let notes = context.notes
        let logger = self.logger
        @Sendable func log(_ status: Int) {
            let d = String(format: "%.3f", seconds(ContinuousClock.now - start))
            logger.info("\(method) \(path) \(status) \(d)s\(notes.summary)")
        }
        var response = try await next(request, context)
        let status = response.status.code
        if response.headers[.contentType] == SSE.headers[.contentType] {
            let body = response.body
            response.body = ResponseBody { writer in
                do {
                    try await body.write(writer)
                    log(status)
                } catch {
                    log(status)
                    throw error
                }
            }
        } else {
            log(status)
        }
        return response
    }
}

/// Turns every error into OpenAI's error object, with the right status.
struct ErrorMiddleware: RouterMiddleware {
    typealias Context = ServerContext
    let logger: Logger

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        do {
            return try await next(request, context)
        } catch let e as APIError {
            return Self.response(e)
        } catch let e as HTTPError {
            let status = e.status
            let message = e.body ?? (status == .notFound ? "No route for \(request.method.rawValue) \(request.uri.path)." : status.reasonPhrase)
            let type = status.code >= 500 ? "server_error" : "invalid_request_error"
            let code = status == .notFound ? "not_found" : status == .methodNotAllowed ? "method_not_allowed" : nil
            return Self.response(APIError(status: status, message: message, type: type, code: code))
        } catch {
            logger.error("\(request.method.rawValue) \(request.uri.path): \(error)")
            return Self.response(APIError.server("Internal error: \(error)"))
        }
    }

    static func response(_ e: APIError) -> Response {
        var headers: HTTPFields = [.contentType: "application/json"]
        if e.status == .unauthorized { headers[.wwwAuthenticate] = "Bearer" }
        return Response(status: e.status, headers: headers, body: .init(byteBuffer: ByteBuffer(string: JSONWriter.write(e.json))))
    }
}

/// With an API key, every route but /health wants `Authorization: Bearer KEY`.
struct AuthMiddleware: RouterMiddleware {
    typealias Context = ServerContext
    let key: [UInt8]

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        if request.uri.path != "/health" {
            let header = request.headers[.authorization] ?? ""
            let prefix = "Bearer "
            guard header.hasPrefix(prefix), Self.constantTimeEqual(Array(header.utf8.dropFirst(prefix.utf8.count)), key) else {
                throw APIError.unauthorized
            }
        }
        return try await next(request, context)
    }

    /// Compares without an early exit, so the time taken does not tell how much of a guess was
    /// right. Only the length can leak, and the loop runs over the longer of the two.
    static func constantTimeEqual(_ a: [UInt8], _ b: [UInt8]) -> Bool {
        var diff = UInt8(truncatingIfNeeded: a.count ^ b.count) | UInt8(a.count == b.count ? 0 : 1)
        let n = max(a.count, b.count)
        for i in 0..<n {
            let x = i < a.count ? a[i] : 0
            let y = i < b.count ? b[i] : 0
            diff |= x ^ y
        }
        return diff == 0
    }
}
