/// The Phi-3 family: Phi-3, Phi-3.5 and Phi-4 (Hugging Face `Phi3ForCausalLM`, GGUF `phi3`). Its
/// layers are Llama's (RMSNorm, grouped-query attention, SiLU-gated MLP, no biases) with the q/k/v
/// projections stored as one matrix and gate/up as another; these are split at load into views of
/// their rows (`FusedProjections`) under the separate projections' names, so the Llama family's
/// definition, and a backend's fused products, run them as they run separate projections. The
/// config switches partial rotary, LongRoPE and a sliding window.
enum Phi3 {
    /// The fused matrices of every layer, by their Hugging Face names, and the parts they hold.
    static func fusedLayouts(_ c: ModelConfig) -> [FusedProjections.Layout] {
        let d = c.hiddenSize, qd = c.headCount * c.headDim, kvd = c.kvHeadCount * c.headDim, ff = c.intermediateSize
        return (0..<c.layerCount).flatMap { i -> [FusedProjections.Layout] in
            let a = "model.layers.\(i).self_attn.", m = "model.layers.\(i).mlp."
            return [.init(fused: a + "qkv_proj.weight", columns: d,
                          parts: [(a + "q_proj.weight", qd), (a + "k_proj.weight", kvd), (a + "v_proj.weight", kvd)]),
                    .init(fused: m + "gate_up_proj.weight", columns: d, parts: [(m + "gate_proj.weight", ff), (m + "up_proj.weight", ff)])]
        }
    }

    static func model<B: ComputeBackend>(config c: ModelConfig, weights source: WeightSource, backend: B) throws -> LanguageModel {
        guard !c.qkvBias, !c.outputBias, !c.mlpBias, !c.qkNorm, c.hiddenActivation == .silu else {
            throw PeregrineError.unsupported("Phi-3 models have no projection biases or q/k norms, and gate with SiLU")
        }
        return try LlamaModel(config: c, weights: try FusedProjections(source, fusedLayouts(c)), backend: backend)
    }
}
