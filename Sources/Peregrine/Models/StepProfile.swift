#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// Where the host's time goes in the engine's steps, when PEREGRINE_STEP_PROFILE is set: the
/// phases of a step summed over decode steps (every sequence one token) and the other steps
/// apart. On a GPU every phase but `wait` is time the device may sit idle between two steps,
/// unless the work before it is still running; a kernel trace's gaps (`scripts/kernel_trace.c`)
/// say which.
public final class StepProfile: @unchecked Sendable {
    public enum Phase: Int, CaseIterable, Sendable {
        /// The scheduler choosing the step's work.
        case schedule
        /// The batch plan built from the scheduled work.
        case plan
        /// The plan checked against the KV memory (a decode step padded to a recorded size).
        case check
        /// The plan's slots, positions and block tables staged for the device.
        case stage
        /// The RoPE tables filled and staged.
        case rope
        /// The tokens staged and their embeddings queued.
        case embed
        /// The model's layers and head walked: kernels queued (none on a replayed step).
        case walk
        /// Waiting for the device to finish the step (where steps chain, a step whose logits are
        /// read is submitted without waiting, and the device's time falls in `sample`).
        case wait
        /// Choosing tokens from the logits (a device launch and read back for greedy rows).
        case sample
        /// Each sequence taking its token, stop checks, outputs.
        case advance

        var label: String { ["schedule", "plan", "check", "stage", "rope", "embed", "walk", "wait", "sample", "advance"][rawValue] }
    }

    /// The one profile of the process, nil unless PEREGRINE_STEP_PROFILE is set.
    public static let shared: StepProfile? = ProcessInfo.processInfo.environment["PEREGRINE_STEP_PROFILE"] == nil ? nil : StepProfile()

    private let lock = NSLock()
    private var seconds = [[Double]](repeating: [Double](repeating: 0, count: Phase.allCases.count), count: 2)
    private var steps = [0, 0]
    /// Steps the backend replayed from a recording, by kind; whether the pending one is.
    private var replays = [0, 0]
    private var replaying = false
    /// The step being timed: its phases so far, and the last mark.
    private var pending = [Double](repeating: 0, count: Phase.allCases.count)
    private var started = 0.0

    /// Seconds on the monotonic clock (the benchmarks' clock too).
    public static func now() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    /// A step begins.
    public func beginStep() {
        lock.lock()
        for i in pending.indices { pending[i] = 0 }
        replaying = false
        started = StepProfile.now()
        lock.unlock()
    }

    /// The phase that ended now began at the last mark (or the step's start).
    public func mark(_ phase: Phase) {
        let t = StepProfile.now()
        lock.lock()
        pending[phase.rawValue] += t - started
        started = t
        lock.unlock()
    }

    /// The pending step replays a recording.
    public func noteReplay() {
        lock.lock()
        replaying = true
        lock.unlock()
    }

    /// The step ended; `decode`: every sequence in it read one token.
    public func endStep(decode: Bool) {
        lock.lock()
        let k = decode ? 0 : 1
        steps[k] += 1
        if replaying { replays[k] += 1 }
        for i in pending.indices { seconds[k][i] += pending[i] }
        lock.unlock()
    }

    /// The sums, a line per kind of step, in milliseconds a step.
    public var report: String {
        lock.lock()
        defer { lock.unlock() }
        var lines: [String] = []
        for (k, name) in ["decode steps", "other steps"].enumerated() where steps[k] > 0 {
            let n = Double(steps[k])
            let total = seconds[k].reduce(0, +)
            var line = String(format: "step profile, %@: %d steps (%d replayed), %.3f ms a step:", name, steps[k], replays[k], 1000 * total / n)
            for p in Phase.allCases { line += String(format: " %@ %.3f", p.label, 1000 * seconds[k][p.rawValue] / n) }
            lines.append(line)
        }
        return lines.joined(separator: "\n")
    }
}
