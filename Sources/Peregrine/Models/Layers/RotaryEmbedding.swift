#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How positions are turned into rotation frequencies.
public enum RopeScaling: Equatable, Sendable {
    case none
    case linear(factor: Double)
    /// Llama 3.1's frequency-dependent scaling.
    case llama3(factor: Double, lowFreqFactor: Double, highFreqFactor: Double, originalMaxPositions: Int)
    /// LongRoPE (Phi-3, Phi-3.5, Phi-4-mini): two sets of per-frequency divisors, chosen by the
    /// sequence's length, and a scale of cos and sin.
    case longrope(LongRoPE)
}

/// LongRoPE's parameters. A forward pass rotates a sequence's tokens with the short factors while
/// the sequence, up to the pass's last token, stays within `originalMaxPositions`, and with the
/// long factors past it, as transformers chooses by the length of the positions it is given.
/// Keys already in the KV memory keep the rotation they were written with, as in transformers'
/// generation through its cache: a prompt that crosses the original context and is read in
/// several passes (chunked prefill, a reused cached prefix) keeps the short factors for the keys
/// of the passes that stayed within it, where one pass over the whole prompt uses the long ones.
public struct LongRoPE: Equatable, Sendable {
    /// Divisors of the rotation frequencies, one per rotary pair.
    public var shortFactors: [Float]
    public var longFactors: [Float]
    /// The context the model was trained with; longer sequences take the long factors.
    public var originalMaxPositions: Int
    /// What cos and sin are multiplied by (for both sets).
    public var attentionFactor: Double

    public init(shortFactors: [Float], longFactors: [Float], originalMaxPositions: Int, attentionFactor: Double) {
        self.shortFactors = shortFactors
        self.longFactors = longFactors
        self.originalMaxPositions = originalMaxPositions
        self.attentionFactor = attentionFactor
    }

    /// The attention factor transformers derives when a config gives none: sqrt(1 + ln s /
    /// ln original) for a context scaled by s = max positions / original, 1 when not scaled.
    public static func defaultAttentionFactor(scale: Double, originalMaxPositions: Int) -> Double {
        scale <= 1 ? 1 : (1 + log(scale) / log(Double(originalMaxPositions))).squareRoot()
    }
}

/// One RoPE variant: its base, its scaling, per-frequency divisors and how much of a head it
/// rotates. A model may rotate different layers with different variants.
public struct RopeParameters: Equatable, Sendable {
    public var theta: Double
    public var scaling: RopeScaling
    /// Per-frequency divisors (GGUF `rope_freqs`, Llama 3.1 scaling).
    public var frequencyFactors: [Float]?
    /// Partial rotary: only the first `rotaryDim` dimensions of each head are rotated (pairs
    /// within them), the rest pass unchanged; nil rotates the whole head.
    public var rotaryDim: Int?

    public init(theta: Double, scaling: RopeScaling = .none, frequencyFactors: [Float]? = nil, rotaryDim: Int? = nil) {
        self.theta = theta
        self.scaling = scaling
        self.frequencyFactors = frequencyFactors
        self.rotaryDim = rotaryDim
    }

    /// The inverse frequency of each rotary pair of a head of `headDim` (of its first
    /// `rotaryDim` dimensions when set), after scaling; for LongRoPE, with its short factors, or
    /// with its long ones when `long`.
    public func inverseFrequencies(headDim: Int, long: Bool = false) -> [Float] {
        let dim = rotaryDim ?? headDim
        let half = dim / 2
        var inv = (0..<half).map { 1.0 / pow(theta, Double(2 * $0) / Double(dim)) }
        if let factors = frequencyFactors {
            for i in 0..<half { inv[i] /= Double(factors[i]) }
        }
        switch scaling {
        case .none:
            break
        case .longrope(let l):
            let factors = long ? l.longFactors : l.shortFactors
            for i in 0..<half { inv[i] /= Double(factors[i]) }
        case .linear(let f):
            inv = inv.map { $0 / f }
        case .llama3(let factor, let lowF, let highF, let orig):
            let lowWavelen = Double(orig) / lowF
            let highWavelen = Double(orig) / highF
            inv = inv.map { f in
                let wavelen = 2 * Double.pi / f
                if wavelen < highWavelen { return f }
                if wavelen > lowWavelen { return f / factor }
                let smooth = (Double(orig) / wavelen - lowF) / (highF - lowF)
                return (1 - smooth) * f / factor + smooth * f
            }
        }
        return inv.map { Float($0) }
    }
}

/// The rotation of one RoPE variant: each token's cos/sin, written to one of the workspace's
/// rotary tables (`table`) at the start of a pass for the layers that use it, [tokens,
/// rotaryDim / 2] each.
final class RotaryEmbedding<B: ComputeBackend> {
    let inverseFrequencies: [Float]
    /// LongRoPE: the frequencies of a sequence that reaches past `longFrom` positions.
    let longInverseFrequencies: [Float]?
    let longFrom: Int
    /// cos and sin are multiplied by it (LongRoPE's attention factor; 1 otherwise).
    let scale: Float
    /// The dimensions of each head that are rotated, the first ones.
    let rotaryDim: Int
    /// Adjacent pairs (GGUF llama files) instead of halves.
    let interleaved: Bool
    /// Which of the workspace's cos/sin tables this variant fills.
    let table: Int
    private var cosHost: [Float] = []
    private var sinHost: [Float] = []
    /// Each position's cos then sin row, by frequency set (0: `inverseFrequencies`, 1: the long
    /// ones), computed the first time a position is seen: a pass copies its rows instead of
    /// taking two trigonometric functions per rotary pair and token (for a decode step of 256
    /// sequences, 32,768 of them, a large share of the host's time in a step).
    private var rowsByPosition: [[Float]] = [[], []]
    /// Positions whose rows are kept (32 MiB a set for 64 rotary pairs); later ones are computed
    /// each pass, as they were before.
    static var keptPositions: Int { 1 << 16 }
    /// For LongRoPE, each sequence's (block-table row's) length below which its positions take
    /// the short factors: its prompt's length, or the end of the pass when the plan gives none.
    private var sequenceEnds: [Int32] = []

    init(_ parameters: RopeParameters, headDim: Int, interleaved: Bool, table: Int = 0) {
        inverseFrequencies = parameters.inverseFrequencies(headDim: headDim)
        if case .longrope(let l) = parameters.scaling {
            longInverseFrequencies = parameters.inverseFrequencies(headDim: headDim, long: true)
            longFrom = l.originalMaxPositions
            scale = Float(l.attentionFactor)
        } else {
            longInverseFrequencies = nil
            longFrom = .max
            scale = 1
        }
        rotaryDim = parameters.rotaryDim ?? headDim
        self.interleaved = interleaved
        self.table = table
    }

    /// cos/sin of every token's rotation angles, computed in f32 as the reference does.
    func fill(_ pass: DecoderPass<B>) {
        let half = inverseFrequencies.count, n = pass.rows * half, plan = pass.plan
        if cosHost.count < n {
            cosHost = [Float](repeating: 0, count: pass.workspace.capacity * half)
            sinHost = cosHost
        }
        if longInverseFrequencies != nil {
            // transformers takes the long factors when the sequence it is given reaches past the
            // original context: a prompt read in one pass uses them at every position if it is
            // longer, and generation switches to them at the first position past it (keeping the
            // keys cached before). Taking the prompt's length, not the pass's, gives the same
            // rotations however the prompt is cut into passes, and after a preempted sequence is
            // read again.
            if sequenceEnds.count < plan.tableRows { sequenceEnds = [Int32](repeating: 0, count: max(plan.tableRows, 2 * sequenceEnds.count)) }
            for s in 0..<plan.tableRows { sequenceEnds[s] = 0 }
            for t in 0..<pass.rows { sequenceEnds[Int(plan.slots[t])] = max(sequenceEnds[Int(plan.slots[t])], plan.positions[t] + 1) }
            for s in 0..<min(plan.tableRows, plan.promptLengths.count) { sequenceEnds[s] = plan.promptLengths[s] }
        }
        for t in 0..<pass.rows where half > 0 {
            let position = Int(plan.positions[t])
            let set = longInverseFrequencies != nil && max(Int(sequenceEnds[Int(plan.slots[t])]), position + 1) > longFrom ? 1 : 0
            guard position < RotaryEmbedding.keptPositions else {
                cosHost.withUnsafeMutableBufferPointer { c in
                    sinHost.withUnsafeMutableBufferPointer { s in
                        rotation(set, position, cosines: c.baseAddress! + t * half, sines: s.baseAddress! + t * half)
                    }
                }
                continue
            }
            if rowsByPosition[set].count < (position + 1) * 2 * half { computeRows(set, through: position) }
            rowsByPosition[set].withUnsafeBufferPointer { rows in
                let row = rows.baseAddress! + position * 2 * half
                cosHost.withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: t * half).update(from: row, count: half) }
                sinHost.withUnsafeMutableBufferPointer { $0.baseAddress!.advanced(by: t * half).update(from: row + half, count: half) }
            }
        }
        let w = pass.workspace
        cosHost.withUnsafeBufferPointer { pass.backend.write(UnsafeBufferPointer(rebasing: $0[0..<n]), to: w.cos[table], offset: 0) }
        sinHost.withUnsafeBufferPointer { pass.backend.write(UnsafeBufferPointer(rebasing: $0[0..<n]), to: w.sin[table], offset: 0) }
    }

    /// The rows of frequency set `set` up to `position` (the rows a pass copies are these exactly).
    private func computeRows(_ set: Int, through position: Int) {
        let half = inverseFrequencies.count, first = rowsByPosition[set].count / (2 * half)
        let needed = (position + 1) * 2 * half
        if rowsByPosition[set].capacity < needed { rowsByPosition[set].reserveCapacity(max(needed, 2 * rowsByPosition[set].capacity)) }
        rowsByPosition[set].append(contentsOf: repeatElement(0, count: needed - rowsByPosition[set].count))
        rowsByPosition[set].withUnsafeMutableBufferPointer { rows in
            for p in first...position {
                let row = rows.baseAddress! + p * 2 * half
                rotation(set, p, cosines: row, sines: row + half)
            }
        }
    }

    /// Position `position`'s cos and sin of frequency set `set` (times `scale`), one value per
    /// rotary pair each, in f32 angles and double trigonometry as the reference computes them.
    private func rotation(_ set: Int, _ position: Int, cosines: UnsafeMutablePointer<Float>, sines: UnsafeMutablePointer<Float>) {
        let inv = set == 1 ? longInverseFrequencies ?? inverseFrequencies : inverseFrequencies, pos = Float(position)
        for i in 0..<inv.count {
            let angle = Double(inv[i] * pos)
            cosines[i] = Float(cos(angle)) * scale
            sines[i] = Float(sin(angle)) * scale
        }
    }
}
