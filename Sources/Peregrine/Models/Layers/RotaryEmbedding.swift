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
}

/// One RoPE variant: its base, its scaling and per-frequency divisors. A model may rotate
/// different layers with different variants.
public struct RopeParameters: Equatable, Sendable {
    public var theta: Double
    public var scaling: RopeScaling
    /// Per-frequency divisors (GGUF `rope_freqs`, Llama 3.1 scaling).
    public var frequencyFactors: [Float]?

    public init(theta: Double, scaling: RopeScaling = .none, frequencyFactors: [Float]? = nil) {
        self.theta = theta
        self.scaling = scaling
        self.frequencyFactors = frequencyFactors
    }

    /// The inverse frequency of each rotary pair of a head of `headDim`, after scaling.
    public func inverseFrequencies(headDim: Int) -> [Float] {
        let half = headDim / 2
        var inv = (0..<half).map { 1.0 / pow(theta, Double(2 * $0) / Double(headDim)) }
        if let factors = frequencyFactors {
            for i in 0..<half { inv[i] /= Double(factors[i]) }
        }
        switch scaling {
        case .none:
            break
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
/// rotary tables (`table`) at the start of a pass for the layers that use it.
final class RotaryEmbedding<B: ComputeBackend> {
    let inverseFrequencies: [Float]
    /// Adjacent pairs (GGUF llama files) instead of halves.
    let interleaved: Bool
    /// Which of the workspace's cos/sin tables this variant fills.
    let table: Int
    private var cosHost: [Float] = []
    private var sinHost: [Float] = []

    init(_ parameters: RopeParameters, headDim: Int, interleaved: Bool, table: Int = 0) {
        inverseFrequencies = parameters.inverseFrequencies(headDim: headDim)
        self.interleaved = interleaved
        self.table = table
    }

    /// cos/sin of every token's rotation angles, computed in f32 as the reference does.
    func fill(_ pass: DecoderPass<B>) {
        let half = inverseFrequencies.count, n = pass.rows * half
        if cosHost.count < n {
            cosHost = [Float](repeating: 0, count: pass.workspace.capacity * half)
            sinHost = cosHost
        }
        for t in 0..<pass.rows {
            let pos = Float(pass.plan.positions[t])
            for i in 0..<half {
                let angle = Double(inverseFrequencies[i] * pos)
                cosHost[t * half + i] = Float(cos(angle))
                sinHost[t * half + i] = Float(sin(angle))
            }
        }
        let w = pass.workspace
        cosHost.withUnsafeBufferPointer { pass.backend.write(UnsafeBufferPointer(rebasing: $0[0..<n]), to: w.cos[table], offset: 0) }
        sinHost.withUnsafeBufferPointer { pass.backend.write(UnsafeBufferPointer(rebasing: $0[0..<n]), to: w.sin[table], offset: 0) }
    }
}
