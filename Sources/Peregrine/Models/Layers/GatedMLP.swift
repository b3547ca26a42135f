/// A gated MLP of one layer: down(act(gate(x)) * up(x)) of the RMS-normalized input, optionally
/// RMS-normalized itself, added to the residual stream; gate, up and down may carry biases.
struct GatedMLP<B: ComputeBackend> {
    let gate, up, down: B.Weight
    let gateBias, upBias, downBias: B.Weight?
    let activation: GatedActivation
    let eps: Float

    /// `<prefix>gate_proj.weight` and so on (prefix "model.layers.N.mlp."), shaped by the config.
    init(_ w: WeightLoader<B>, prefix p: String, config c: ModelConfig, activation: GatedActivation) throws {
        let d = c.hiddenSize, ff = c.intermediateSize
        let gateUp = try w.load(together: [(p + "gate_proj.weight", [ff, d]), (p + "up_proj.weight", [ff, d])])
        (gate, up) = (gateUp[0], gateUp[1])
        down = try w.load(p + "down_proj.weight", [d, ff])
        gateBias = try w.load(p + "gate_proj.bias", [ff], if: c.mlpBias)
        upBias = try w.load(p + "up_proj.bias", [ff], if: c.mlpBias)
        downBias = try w.load(p + "down_proj.bias", [d], if: c.mlpBias)
        self.activation = activation
        eps = c.rmsNormEps
    }

    /// residual += down(act(gate(norm(residual))) * up(norm(residual))), the sum normalized by
    /// `outputNorm` before the add where one is given (Gemma).
    func callAsFunction(_ pass: DecoderPass<B>, norm: B.Weight, outputNorm: B.Weight? = nil) {
        let b = pass.backend, w = pass.workspace, n = pass.rows
        b.normGatedProduct(w.x, norm: norm, eps: eps, dim: pass.hidden, normed: w.h, rows: n, gate: gate,
                           gateBias: gateBias, up: up, upBias: upBias, activation: activation, out: w.gate, scratch: w.up)
        if let outputNorm {
            b.matmul(w.gate, rows: n, weight: down, bias: downBias, out: w.tmp)
            b.rmsNorm(w.tmp, weight: outputNorm, eps: eps, rows: n, dim: pass.hidden, out: w.tmp)
            b.add(w.x, w.tmp, count: n * pass.hidden)
        } else {
            b.matmulAdd(w.gate, rows: n, weight: down, bias: downBias, residual: w.x, scratch: w.tmp)
        }
    }
}
