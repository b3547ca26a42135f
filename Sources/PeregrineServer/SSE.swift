import Hummingbird
import NIOCore
import Peregrine

/// Server-sent events as OpenAI streams them: each event one `data: JSON` line and a blank
/// line, the stream closed by `data: [DONE]`.
enum SSE {
    static func event(_ value: JSONValue) -> ByteBuffer {
        ByteBuffer(string: "data: " + JSONWriter.write(value) + "\n\n")
    }

    static let done = ByteBuffer(string: "data: [DONE]\n\n")

    static let headers: HTTPFields = [.contentType: "text/event-stream", .cacheControl: "no-cache"]
}
