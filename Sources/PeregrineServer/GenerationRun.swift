import Foundation
import Peregrine

/// One HTTP generation request in the engine: an engine request per prompt (each with its n
/// samples), their outputs merged into one stream in arrival order. Cancelling it cancels every
/// engine request, which frees their KV blocks.
final class GenerationRun: @unchecked Sendable {
    struct Event: Sendable {
        var prompt: Int
        var output: EngineOutput
    }

    enum CancelReason: Sendable { case disconnected, shutdown }

    let engine: CompletionEngine
    let ids: [Int]
    let outputs: AsyncThrowingStream<Event, Error>
    private let lock = NSLock()
    private var reason: CancelReason?
    private var forwarders: [Task<Void, Never>] = []

    /// Submits every request; if one is refused, those already submitted are cancelled.
    init(engine: CompletionEngine, requests: [EngineRequest]) throws {
        self.engine = engine
        var ids: [Int] = []
        var streams: [AsyncThrowingStream<EngineOutput, Error>] = []
        do {
            for r in requests {
                let s = try engine.stream(r)
                ids.append(s.id)
                streams.append(s.outputs)
            }
        } catch {
            for id in ids { engine.cancel(id) }
            throw error
        }
        self.ids = ids
        let (merged, continuation) = AsyncThrowingStream<Event, Error>.makeStream()
        outputs = merged
        let remaining = Countdown(streams.count)
        var tasks: [Task<Void, Never>] = []
        for (i, s) in streams.enumerated() {
            tasks.append(Task {
                do {
                    for try await o in s { continuation.yield(Event(prompt: i, output: o)) }
                    if remaining.decrement() { continuation.finish() }
                } catch {
                    continuation.finish(throwing: error)
                }
            })
        }
        forwarders = tasks
        // A consumer that stops reading (its task cancelled) must not leave sequences running.
        continuation.onTermination = { [weak self] termination in
            if case .cancelled = termination { self?.cancel(.disconnected) }
        }
    }

    /// Why the run was cancelled, if it was.
    var cancelReason: CancelReason? {
        lock.lock()
        defer { lock.unlock() }
        return reason
    }

    func cancel(_ why: CancelReason) {
        lock.lock()
        guard reason == nil else { lock.unlock(); return }
        reason = why
        lock.unlock()
        for id in ids { engine.cancel(id) }
    }
}

/// Counts finished streams; true for the one that finishes last.
private final class Countdown: @unchecked Sendable {
    private let lock = NSLock()
    private var left: Int

    init(_ n: Int) { left = n }

    func decrement() -> Bool {
        lock.lock()
        defer { lock.unlock() }
        left -= 1
        return left == 0
    }
}

/// Per-sequence timing for the latency histograms.
struct TokenTimer {
    let arrival: ContinuousClock.Instant
    private var last: [Int: ContinuousClock.Instant] = [:]  // key: prompt * maxChoices + index

    init(arrival: ContinuousClock.Instant) { self.arrival = arrival }

    mutating func observe(_ e: GenerationRun.Event, metrics: ServerMetrics) {
        guard !e.output.tokens.isEmpty else { return }
        let now = ContinuousClock.now
        let key = e.prompt * 1024 + e.output.index
        if let previous = last[key] {
            metrics.observeTokenGap(seconds(now - previous), tokens: e.output.tokens.count)
        } else {
            metrics.observeFirstToken(seconds(now - arrival))
            if e.output.tokens.count > 1 { metrics.observeTokenGap(0, tokens: e.output.tokens.count - 1) }
        }
        last[key] = now
    }
}

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) * 1e-18
}
