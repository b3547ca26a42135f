/// The activation applied to the gate product of a gated MLP.
enum GatedActivation: Sendable {
    /// silu(gate) * up (Llama, Mistral, Qwen).
    case silu
}

/// A gated MLP of one layer: down(act(gate(x)) * up(x)) of the RMS-normalized input, added to
/// the residual stream; gate, up and down may carry biases.
struct GatedMLP<B: ComputeBackend> {
    let gate, up, down: B.Weight
    let gateBias, upBias, downBias: B.Weight?
    let activation: GatedActivation
    let eps: Float

    /// `<prefix>gate_proj.weight` and so on (prefix "model.layers.N.mlp."), shaped by the config.
    init(_ w: WeightLoader<B>, prefix p: String, config c: ModelConfig, activation: GatedActivation) throws {
        let d = c.hiddenSize, ff = c.intermediateSize
        gate = try w.load(p + "gate_proj.weight", [ff, d])
        up = try w.load(p + "up_proj.weight", [ff, d])
        down = try w.load(p + "down_proj.weight", [d, ff])
        gateBias = try w.load(p + "gate_proj.bias", [ff], if: c.mlpBias)
        upBias = try w.load(p + "up_proj.bias", [ff], if: c.mlpBias)
        downBias = try w.load(p + "down_proj.bias", [d], if: c.mlpBias)
        self.activation = activation
        eps = c.rmsNormEps
    }

    /// residual += down(act(gate(norm(residual))) * up(norm(residual))).
    func callAsFunction(_ pass: DecoderPass<B>, norm: B.Weight) {
        let b = pass.backend, w = pass.workspace, n = pass.rows
        switch activation {
        case .silu:
            b.normGatedProduct(w.x, norm: norm, eps: eps, dim: pass.hidden, normed: w.h, rows: n, gate: gate,
                               gateBias: gateBias, up: up, upBias: upBias, out: w.gate, scratch: w.up)
        }
        b.matmulAdd(w.gate, rows: n, weight: down, bias: downBias, residual: w.x, scratch: w.tmp)
    }
}
