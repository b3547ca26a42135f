import NIOCore

/// Tells a request that its client went away: the connection closed, or the client shut down its
/// sending side (a client that disconnects may only have half-closed). Added at the front of the
/// connection's pipeline for the life of one generation request, so an abandoned request is
/// cancelled at once, even while its prompt is still being read and nothing is being written.
final class DisconnectWatcher: ChannelInboundHandler, RemovableChannelHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer

    // Touched only on the channel's event loop.
    private var onDisconnect: (@Sendable () -> Void)?

    init(_ onDisconnect: @escaping @Sendable () -> Void) {
        self.onDisconnect = onDisconnect
    }

    private func fire() {
        let f = onDisconnect
        onDisconnect = nil
        f?()
    }

    func channelInactive(context: ChannelHandlerContext) {
        fire()
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? ChannelEvent, e == .inputClosed { fire() }
        context.fireUserInboundEventTriggered(event)
    }

    /// Watches `channel` until `body` returns; `onDisconnect` runs at most once.
    static func watching<T>(_ channel: any Channel, onDisconnect: @escaping @Sendable () -> Void,
                            _ body: () async throws -> T) async throws -> T {
        let watcher = DisconnectWatcher(onDisconnect)
        let added: Bool
        do {
            try await channel.pipeline.addHandler(watcher, position: .first).get()
            added = true
        } catch {
            added = false
        }
        if !channel.isActive { onDisconnect() }
        defer {
            if added { channel.pipeline.removeHandler(watcher, promise: nil) }
        }
        return try await body()
    }
}
