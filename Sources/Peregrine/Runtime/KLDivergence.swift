import Foundation

/// How far a model's next-token distributions are from a base model's (usually the same model
/// before quantization) over the same text, with llama-perplexity's `--kl-divergence`
/// statistics: each scored position's KL divergence KL(base || model), the change in the
/// probability of the text's next token (Δp), how often both put the same token first, and both
/// perplexities with the uncertainty of their ratio and difference.
public struct KLDivergenceStatistics: Sendable {
    public private(set) var count = 0
    var sumNLL = 0.0, sumNLL2 = 0.0
    var sumBaseNLL = 0.0, sumBaseNLL2 = 0.0, sumNLLBaseNLL = 0.0
    var sumKLD = 0.0, sumKLD2 = 0.0
    var sumPDiff = 0.0, sumPDiff2 = 0.0, sumPDiff4 = 0.0
    public private(set) var sameTop = 0
    /// Each position's KL divergence and Δp, in order.
    public private(set) var divergences: [Float] = []
    public private(set) var probabilityChanges: [Float] = []

    public init() {}

    /// Adds one position: the model's logits, the base's stored row, the text's next token.
    /// Terms of base log-probability -16 or less are left out of the divergence (as llama.cpp does).
    public mutating func add(_ logits: UnsafeBufferPointer<Float>, base: KLDivergenceBase.EncodedRow, target: Int) {
        let n = logits.count
        var hi = logits[0], best = 0
        for i in 1..<n where logits[i] > hi { hi = logits[i]; best = i }
        var sum = 0.0
        for v in logits { sum += Double(Foundation.exp(v - hi)) }
        let logSum = Float(Foundation.log(sum))
        let nll = hi + logSum - logits[target]
        let baseNLL = -base.logProbability(target)
        sumNLL += Double(nll); sumNLL2 += Double(nll) * Double(nll)
        sumBaseNLL += Double(baseNLL); sumBaseNLL2 += Double(baseNLL) * Double(baseNLL)
        sumNLLBaseNLL += Double(nll) * Double(baseNLL)
        let shift = hi + logSum
        var kld = 0.0, baseBest = 0
        var baseHigh = -Float.infinity
        for i in 0..<n {
            let lp = base.logProbability(i)
            if i == 0 || lp > baseHigh { baseHigh = lp; baseBest = i }
            if lp > -16 { kld += Double(Foundation.exp(lp) * (lp - logits[i] + shift)) }
        }
        sumKLD += kld; sumKLD2 += kld * kld
        count += 1
        if best == baseBest { sameTop += 1 }
        let pDiff = Foundation.exp(-nll) - Foundation.exp(-baseNLL)
        sumPDiff += Double(pDiff)
        let p2 = Double(pDiff) * Double(pDiff)
        sumPDiff2 += p2; sumPDiff4 += p2 * p2
        divergences.append(Float(kld))
        probabilityChanges.append(pDiff)
    }

    /// A mean and its standard error.
    public struct Estimate: Sendable, Equatable {
        public let value: Double
        public let uncertainty: Double
    }

    /// Mean of values whose sum and sum of squares are given, with the standard error of the mean
    /// (0 for 10 values or fewer, as llama.cpp).
    func mean(_ sum: Double, _ sum2: Double) -> Estimate {
        guard count > 0 else { return Estimate(value: 0, uncertainty: 0) }
        let f = sum / Double(count)
        let v = sum2 / Double(count) - f * f
        return Estimate(value: f, uncertainty: v > 0 && count > 10 ? (v / Double(count - 1)).squareRoot() : 0)
    }

    /// The covariance of the two mean log-likelihoods (0 below 10 values).
    var logPerplexityCovariance: Double {
        guard count >= 10 else { return 0 }
        let n = Double(count)
        return (sumNLLBaseNLL / n - (sumNLL / n) * (sumBaseNLL / n)) / (n - 1)
    }

    public var logPerplexity: Estimate { mean(sumNLL, sumNLL2) }
    public var baseLogPerplexity: Estimate { mean(sumBaseNLL, sumBaseNLL2) }

    public var perplexity: Estimate {
        let l = logPerplexity, p = exp(l.value)
        return Estimate(value: p, uncertainty: p * l.uncertainty)
    }

    public var basePerplexity: Estimate {
        let l = baseLogPerplexity, p = exp(l.value)
        return Estimate(value: p, uncertainty: p * l.uncertainty)
    }

    /// Correlation of the two log-perplexity estimates.
    public var logPerplexityCorrelation: Double {
        logPerplexityCovariance / (logPerplexity.uncertainty * baseLogPerplexity.uncertainty)
    }

    /// ln(PPL / PPL(base)), its uncertainty from both and their covariance.
    public var logPerplexityRatio: Estimate {
        let a = logPerplexity, b = baseLogPerplexity
        let v = a.uncertainty * a.uncertainty + b.uncertainty * b.uncertainty - 2 * logPerplexityCovariance
        return Estimate(value: a.value - b.value, uncertainty: max(0, v).squareRoot())
    }

    public var perplexityRatio: Estimate {
        let l = logPerplexityRatio, r = exp(l.value)
        return Estimate(value: r, uncertainty: r * l.uncertainty)
    }

    public var perplexityDifference: Estimate {
        let a = perplexity, b = basePerplexity
        let covariance = a.value * b.value * logPerplexityCovariance
        let v = a.uncertainty * a.uncertainty + b.uncertainty * b.uncertainty - 2 * covariance
        return Estimate(value: a.value - b.value, uncertainty: max(0, v).squareRoot())
    }

    public var meanDivergence: Estimate { mean(sumKLD, sumKLD2) }

    /// Mean Δp (the model's probability of the next token minus the base's).
    public var meanProbabilityChange: Estimate { mean(sumPDiff, sumPDiff2) }

    /// Root mean square of Δp, with its uncertainty.
    public var rmsProbabilityChange: Estimate {
        let m = mean(sumPDiff2, sumPDiff4)
        let r = m.value.squareRoot()
        return Estimate(value: r, uncertainty: r > 0 ? 0.5 / r * m.uncertainty : 0)
    }

    /// The fraction of positions where both models' most likely token is the same.
    public var sameTopFraction: Estimate {
        guard count > 0 else { return Estimate(value: 0, uncertainty: 0) }
        let p = Double(sameTop) / Double(count)
        return Estimate(value: p, uncertainty: count > 1 ? (p * (1 - p) / Double(count - 1)).squareRoot() : 0)
    }

    /// The value at `fraction` of the sorted values, linearly interpolated (llama.cpp's percentile;
    /// 0.5 gives the median, the mean of the middle two for an even count).
    public static func percentile(_ sorted: [Float], _ fraction: Double) -> Double {
        guard let first = sorted.first, let last = sorted.last else { return 0 }
        if fraction <= 0 { return Double(first) }
        if fraction >= 1 { return Double(last) }
        let p = fraction * Double(sorted.count - 1)
        let i = Int(p), f = p - Double(i)
        return (1 - f) * Double(sorted[i]) + f * Double(sorted[min(i + 1, sorted.count - 1)])
    }

    /// The fractions `percentiles` reports: maximum, 99.9% ... 0.1%, minimum.
    public static let reportedFractions: [Double] = [1, 0.999, 0.99, 0.95, 0.90, 0.5, 0.10, 0.05, 0.01, 0.001, 0]

    public func divergencePercentiles() -> [(fraction: Double, value: Double)] {
        let sorted = divergences.sorted()
        return Self.reportedFractions.map { ($0, Self.percentile(sorted, $0)) }
    }

    public func probabilityChangePercentiles() -> [(fraction: Double, value: Double)] {
        let sorted = probabilityChanges.sorted()
        return [1, 0.999, 0.99, 0.95, 0.90, 0.75, 0.5, 0.25, 0.10, 0.05, 0.01, 0.001, 0].map { ($0, Self.percentile(sorted, $0)) }
    }
}

/// Runs a model over the text of a `KLDivergenceBase` as llama-perplexity's `--kl-divergence`
/// does (the base's chunks, each from an empty cache with its first token replaced by BOS,
/// the second half scored) and compares each scored position with the base's row.
public struct KLDivergenceEvaluator {
    public struct Progress {
        public let chunk: Int
        public let chunks: Int
        public let statistics: KLDivergenceStatistics
    }

    public let model: LanguageModel
    public let batch: Int
    /// The cache's type: the one asked for, else the backend's, as `PerplexityEvaluator`'s.
    public let cacheType: KVCacheType

    public init(model: LanguageModel, batch: Int = 512, cacheType: KVCacheType? = nil) {
        self.model = model
        self.batch = batch
        self.cacheType = cacheType ?? model.preferredKVCacheType
    }

    public func evaluate(base: KLDivergenceBase, bos: Int?, maxChunks: Int? = nil,
                         progress: (Progress) -> Void = { _ in }) throws -> KLDivergenceStatistics {
        guard base.vocabulary == model.config.vocabSize else {
            throw PeregrineError.invalidArgument(
                "\(base.path) holds distributions over \(base.vocabulary) tokens; the model's vocabulary has \(model.config.vocabSize)")
        }
        let evaluator = try PerplexityEvaluator(model: model, context: base.context, batch: batch, cacheType: cacheType)
        var statistics = KLDivergenceStatistics()
        let first = base.context / 2
        _ = try evaluator.evaluate(tokens: base.tokens, bos: bos, maxChunks: min(base.chunks, maxChunks ?? base.chunks),
                                   minimumChunks: 1, scored: { row in
            statistics.add(row.logits, base: base.row(chunk: row.chunk, index: row.position - first), target: row.target)
        }) { p in
            progress(Progress(chunk: p.chunk, chunks: p.chunks, statistics: statistics))
        }
        return statistics
    }
}
