import Peregrine

/// What the HTTP layer needs of an engine: submit a request and read its outputs, cancel it,
/// and read the scheduler's figures for /metrics and admission. Peregrine's `Engine` conforms;
/// the protocol keeps routes and request handling independent of how generation is scheduled.
public protocol CompletionEngine: AnyObject, Sendable {
    /// Starts generating; throws on a request the engine cannot take (a prompt beyond its context).
    func stream(_ request: EngineRequest) throws -> (id: Int, outputs: AsyncThrowingStream<EngineOutput, Error>)
    /// Stops a request and frees its KV blocks; its stream then ends.
    func cancel(_ id: Int)
    var stats: EngineStats { get }
}

extension Engine: CompletionEngine {}
