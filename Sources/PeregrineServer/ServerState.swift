import Foundation

/// Requests in flight, admission, and whether the server is draining for shutdown.
final class ServerState: @unchecked Sendable {
    private let lock = NSLock()
    private var runs: [ObjectIdentifier: GenerationRun] = [:]
    private var draining = false
    /// Most generation requests in the engine at once: what it runs plus the queue allowed.
    let admissionLimit: Int

    init(admissionLimit: Int) {
        self.admissionLimit = admissionLimit
    }

    /// Starts a run unless the server is draining or full (503 either way).
    func admit(_ start: () throws -> GenerationRun) throws -> GenerationRun {
        lock.lock()
        defer { lock.unlock() }
        guard !draining else { throw APIError.shuttingDown }
        guard runs.count < admissionLimit else { throw APIError.queueFull }
        let run = try start()
        runs[ObjectIdentifier(run)] = run
        return run
    }

    func finish(_ run: GenerationRun) {
        lock.lock()
        runs[ObjectIdentifier(run)] = nil
        lock.unlock()
    }

    var isDraining: Bool {
        lock.lock()
        defer { lock.unlock() }
        return draining
    }

    var activeCount: Int {
        lock.lock()
        defer { lock.unlock() }
        return runs.count
    }

    func beginDraining() {
        lock.lock()
        draining = true
        lock.unlock()
    }

    /// Cancels every run still going (the end of a shutdown's grace period).
    func cancelAll() {
        lock.lock()
        let all = Array(runs.values)
        lock.unlock()
        for r in all { r.cancel(.shutdown) }
    }
}
