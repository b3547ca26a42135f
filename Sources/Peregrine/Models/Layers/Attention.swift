/// Grouped-query self-attention of one layer: q/k/v projections of the RMS-normalized input
/// (with optional biases), optional per-head RMSNorm of queries and keys, RoPE, paged attention
/// over the layer's KV memory (scores scaled and optionally soft-capped), and the output
/// projection, optionally RMS-normalized, added to the residual stream.
struct Attention<B: ComputeBackend> {
    let q, k, v, o: B.Weight
    let qBias, kBias, vBias, oBias: B.Weight?
    let qNorm, kNorm: B.Weight?
    let heads: Int
    let kvHeads: Int
    let headDim: Int
    let eps: Float
    let scoring: AttentionScoring

    /// `<prefix>q_proj.weight` and so on (prefix "model.layers.N.self_attn."), shaped by the config.
    init(_ w: WeightLoader<B>, prefix p: String, config c: ModelConfig) throws {
        let d = c.hiddenSize, hd = c.headDim, qd = c.headCount * hd, kvd = c.kvHeadCount * hd
        let qkv = try w.load(together: [(p + "q_proj.weight", [qd, d]), (p + "k_proj.weight", [kvd, d]), (p + "v_proj.weight", [kvd, d])])
        (q, k, v) = (qkv[0], qkv[1], qkv[2])
        o = try w.load(p + "o_proj.weight", [d, qd])
        qBias = try w.load(p + "q_proj.bias", [qd], if: c.qkvBias)
        kBias = try w.load(p + "k_proj.bias", [kvd], if: c.qkvBias)
        vBias = try w.load(p + "v_proj.bias", [kvd], if: c.qkvBias)
        oBias = try w.load(p + "o_proj.bias", [d], if: c.outputBias)
        qNorm = c.qkNorm ? try w.loadNorm(p + "q_norm.weight", hd, offset: c.normWeightOffset) : nil
        kNorm = c.qkNorm ? try w.loadNorm(p + "k_norm.weight", hd, offset: c.normWeightOffset) : nil
        heads = c.headCount
        kvHeads = c.kvHeadCount
        headDim = hd
        eps = c.rmsNormEps
        scoring = AttentionScoring(scale: c.attentionScale ?? AttentionScoring(headDim: hd).scale, softCap: c.attentionSoftCap)
    }

    /// residual += o(attention(rope(q, k), v)) of norm(residual), keys and values of the batch
    /// written to layer `layer`'s KV memory; `window` limits how far back a query looks;
    /// `outputNorm` normalizes o(...) before the add (Gemma).
    func callAsFunction(layer: Int, _ pass: DecoderPass<B>, norm: B.Weight, rope: RotaryEmbedding<B>, window: Int?,
                        outputNorm: B.Weight? = nil) {
        let b = pass.backend, w = pass.workspace, n = pass.rows
        b.normMatmul3(w.x, norm: norm, eps: eps, dim: pass.hidden, normed: w.h, rows: n,
                      (q, qBias, w.q), (k, kBias, w.k), (v, vBias, w.v))
        if let qNorm, let kNorm {
            b.rmsNormPair((w.q, qNorm, n * heads), (w.k, kNorm, n * kvHeads), eps: eps, dim: headDim)
        }
        b.ropeAttention(layer: layer, q: w.q, k: w.k, v: w.v, rows: n, heads: heads, headDim: headDim, rotaryDim: rope.rotaryDim,
                        cos: w.cos[rope.table], sin: w.sin[rope.table], interleaved: rope.interleaved,
                        plan: pass.plan, cache: pass.cache, window: window, scoring: scoring, out: w.attn)
        if let outputNorm {
            b.matmul(w.attn, rows: n, weight: o, bias: oBias, out: w.tmp)
            b.rmsNorm(w.tmp, weight: outputNorm, eps: eps, rows: n, dim: pass.hidden, out: w.tmp)
            b.add(w.x, w.tmp, count: n * pass.hidden)
        } else {
            b.matmulAdd(w.attn, rows: n, weight: o, bias: oBias, residual: w.x, scratch: w.tmp)
        }
    }
}
