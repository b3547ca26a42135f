import Hummingbird
import Peregrine

/// An error answered as OpenAI's error object: `{"error": {"message", "type", "param", "code"}}`.
public struct APIError: Error, CustomStringConvertible, Sendable {
    public var status: HTTPResponse.Status
    public var message: String
    public var type: String
    public var param: String?
    public var code: String?

    public init(status: HTTPResponse.Status, message: String, type: String, param: String? = nil, code: String? = nil) {
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
    }

    public var description: String { "\(status.code) \(message)" }

    /// A 400 naming the parameter at fault.
    static func invalid(_ message: String, param: String? = nil, code: String? = nil) -> APIError {
        APIError(status: .badRequest, message: message, type: "invalid_request_error", param: param, code: code)
    }

    static func wrongType(_ param: String, _ expected: String) -> APIError {
        invalid("'\(param)' must be \(expected)", param: param, code: "invalid_type")
    }

    static func outOfRange(_ param: String, _ rule: String) -> APIError {
        invalid("'\(param)' must be \(rule)", param: param, code: "invalid_value")
    }

    static let unauthorized = APIError(status: .unauthorized, message: "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                                       type: "invalid_request_error", code: "invalid_api_key")

    static func tooLarge(_ limit: Int) -> APIError {
        APIError(status: .contentTooLarge, message: "The request body is larger than the server's limit of \(limit) bytes.",
                 type: "invalid_request_error", code: "request_too_large")
    }

    static func modelNotFound(_ name: String) -> APIError {
        APIError(status: .notFound, message: "The model '\(name)' does not exist: this server serves one model (see /v1/models).",
                 type: "invalid_request_error", param: "model", code: "model_not_found")
    }

    static let queueFull = APIError(status: .serviceUnavailable, message: "The server is at capacity: too many requests are waiting. Retry later.",
                                    type: "server_error", code: "queue_full")

    static let shuttingDown = APIError(status: .serviceUnavailable, message: "The server is shutting down.",
                                       type: "server_error", code: "shutting_down")

    static func server(_ message: String) -> APIError {
        APIError(status: .internalServerError, message: message, type: "server_error")
    }

    var json: JSONValue {
        .object(JSONObject([("error", .object(JSONObject([
            ("message", .string(message)),
            ("type", .string(type)),
            ("param", param.map(JSONValue.string) ?? .null),
            ("code", code.map(JSONValue.string) ?? .null),
        ])))]))
    }
}
