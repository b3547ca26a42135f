import Foundation
import Peregrine

/// The server's counters and histograms, written in Prometheus' text exposition format by
/// /metrics. Hand-written: a handful of series does not need a metrics library.
public final class ServerMetrics: @unchecked Sendable {
    /// How a generation request ended.
    public enum Outcome: String, CaseIterable, Sendable {
        case success, cancelled, clientError = "client_error", rejected, serverError = "server_error"
    }

    private let lock = NSLock()
    private var requests: [String: Int] = [:]  // "endpoint|outcome"
    private var promptTokens = 0
    private var generatedTokens = 0
    private let timeToFirstToken = Histogram(bounds: [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
    private let interTokenLatency = Histogram(bounds: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5])
    private let requestDuration = Histogram(bounds: [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])

    public init() {}

    func record(endpoint: String, outcome: Outcome, seconds: Double) {
        lock.lock()
        defer { lock.unlock() }
        requests["\(endpoint)|\(outcome.rawValue)", default: 0] += 1
        requestDuration.observe(seconds)
    }

    func countTokens(prompt: Int, generated: Int) {
        lock.lock()
        defer { lock.unlock() }
        promptTokens += prompt
        generatedTokens += generated
    }

    func observeFirstToken(_ seconds: Double) {
        lock.lock()
        defer { lock.unlock() }
        timeToFirstToken.observe(seconds)
    }

    /// `tokens` arrived together `seconds` after the previous ones: each is counted at its share.
    func observeTokenGap(_ seconds: Double, tokens: Int) {
        guard tokens > 0 else { return }
        lock.lock()
        defer { lock.unlock() }
        for _ in 0..<tokens { interTokenLatency.observe(seconds / Double(tokens)) }
    }

    public func requestCount(endpoint: String, outcome: Outcome) -> Int {
        lock.lock()
        defer { lock.unlock() }
        return requests["\(endpoint)|\(outcome.rawValue)"] ?? 0
    }

    /// The exposition text, with the engine's gauges read now.
    func exposition(engine: EngineStats, endpoints: [String]) -> String {
        lock.lock()
        defer { lock.unlock() }
        var out = ""
        func header(_ name: String, _ type: String, _ help: String) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
        }
        header("peregrine_requests_total", "counter", "Generation requests by endpoint and outcome.")
        for e in endpoints {
            for o in Outcome.allCases {
                out += "peregrine_requests_total{endpoint=\"\(e)\",outcome=\"\(o.rawValue)\"} \(requests["\(e)|\(o.rawValue)"] ?? 0)\n"
            }
        }
        header("peregrine_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.")
        out += "peregrine_prompt_tokens_total \(promptTokens)\n"
        header("peregrine_generation_tokens_total", "counter", "Tokens generated.")
        out += "peregrine_generation_tokens_total \(generatedTokens)\n"
        timeToFirstToken.write("peregrine_time_to_first_token_seconds", "Time from a request's arrival to its first generated token.", into: &out)
        interTokenLatency.write("peregrine_inter_token_latency_seconds", "Time between successive generated tokens of a sequence.", into: &out)
        requestDuration.write("peregrine_request_duration_seconds", "Time from a generation request's arrival to its end.", into: &out)
        header("peregrine_requests_running", "gauge", "Requests the engine is generating for.")
        out += "peregrine_requests_running \(engine.running)\n"
        header("peregrine_requests_waiting", "gauge", "Requests queued in the engine.")
        out += "peregrine_requests_waiting \(engine.waiting)\n"
        header("peregrine_kv_blocks_used", "gauge", "KV-cache blocks in use.")
        out += "peregrine_kv_blocks_used \(engine.kvBlocksUsed)\n"
        header("peregrine_kv_blocks_total", "gauge", "KV-cache blocks in all.")
        out += "peregrine_kv_blocks_total \(engine.kvBlocksTotal)\n"
        header("peregrine_prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.")
        out += "peregrine_prefix_cache_queries_total \(engine.prefixCacheQueries)\n"
        header("peregrine_prefix_cache_hits_total", "counter", "Prompt tokens found in the prefix cache.")
        out += "peregrine_prefix_cache_hits_total \(engine.prefixCacheHits)\n"
        header("peregrine_engine_steps_total", "counter", "Forward passes the engine ran (each mixes decode tokens and prompt chunks).")
        out += "peregrine_engine_steps_total \(engine.steps)\n"
        header("peregrine_preemptions_total", "counter", "Sequences preempted for KV blocks (recomputed later).")
        out += "peregrine_preemptions_total \(engine.preemptions)\n"
        return out
    }
}

/// A cumulative histogram with fixed bucket bounds (callers hold the metrics' lock).
final class Histogram {
    let bounds: [Double]
    private var counts: [Int]
    private var sum = 0.0
    private var count = 0

    init(bounds: [Double]) {
        self.bounds = bounds
        counts = Array(repeating: 0, count: bounds.count)
    }

    func observe(_ x: Double) {
        guard x.isFinite else { return }
        for (i, b) in bounds.enumerated() where x <= b { counts[i] += 1 }
        sum += x
        count += 1
    }

    func write(_ name: String, _ help: String, into out: inout String) {
        out += "# HELP \(name) \(help)\n# TYPE \(name) histogram\n"
        for (i, b) in bounds.enumerated() { out += "\(name)_bucket{le=\"\(b)\"} \(counts[i])\n" }
        out += "\(name)_bucket{le=\"+Inf\"} \(count)\n\(name)_sum \(sum)\n\(name)_count \(count)\n"
    }
}
