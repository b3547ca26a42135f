import ArgumentParser
import Foundation
import Peregrine

struct Perplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Perplexity of a model on a text file, and KL divergence from a base model, by llama-perplexity's method.",
        discussion: """
            The text is tokenized (with BOS when the tokenizer adds one) and cut into non-overlapping \
            chunks of --ctx tokens; each chunk is evaluated from an empty cache with its first token \
            replaced by BOS, and the second half of each chunk is scored. Progress goes to stderr as \
            [chunk]estimate; the result is the estimate and its standard error.

            KL divergence, in two runs: first the full-precision model with --kl-divergence-base FILE \
            writes its token distributions over the text to FILE (llama-perplexity's file layout: either \
            engine reads the other's); then a quantized model with --kl-divergence-base FILE \
            --kl-divergence is run over the same tokens (read from FILE; -f is not needed) and reports \
            both perplexities, their ratio and difference, the mean KL divergence and its percentiles, \
            the change in the next token's probability, and how often both put the same token first.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .shortAndLong, help: "The text file to score (not needed with --kl-divergence).")
    var file: String?

    @Option(name: [.customShort("c"), .long], help: "Tokens per chunk (with --kl-divergence: the base file's).")
    var ctx: Int = 512

    @Option(name: .shortAndLong, help: "Tokens per forward pass (at most --ctx).")
    var batch: Int = 512

    @Option(help: "Score at most this many chunks (default: all).")
    var chunks: Int?

    @Option(help: "The token distributions file: written from this model, or read with --kl-divergence.")
    var klDivergenceBase: String?

    @Flag(help: "Compare the model with the distributions in --kl-divergence-base.")
    var klDivergence = false

    @Option(help: KVCacheType.optionHelp)
    var kvCacheType: KVCacheType?

    @Flag(help: "Print the result as one JSON object.")
    var json = false

    func validate() throws {
        if ctx < 4 || ctx > 1 << 20 { throw ValidationError("--ctx must be between 4 and 1048576") }
        if batch < 1 { throw ValidationError("--batch must be >= 1") }
        if let c = chunks, c < 1 { throw ValidationError("--chunks must be >= 1") }
        if klDivergence, klDivergenceBase == nil { throw ValidationError("--kl-divergence needs --kl-divergence-base FILE") }
        if !klDivergence, file == nil { throw ValidationError("--file is required (the text to score)") }
    }

    func run() throws {
        try reportingErrors {
            if klDivergence { try compare() } else { try score() }
        }
    }

    private func score() throws {
        let file = self.file!
        guard let data = FileManager.default.contents(atPath: file) else { throw PeregrineError.io("\(file): cannot read the file") }
        guard let text = String(data: data, encoding: .utf8) else { throw PeregrineError.format("\(file): not UTF-8 text") }
        let model = try modelOptions.load()
        let tokenizer = try Tokenizer(directory: modelOptions.model)
        let tokens = tokenizer.encode(text)
        let evaluator = try PerplexityEvaluator(model: model, context: ctx, batch: batch, cacheType: kvCacheType)
        let err = FileHandle.standardError
        let chunkCount = min(tokens.count / ctx, chunks ?? .max)
        err.write(Data("\(file): \(tokens.count) tokens; \(chunkCount) chunks of \(ctx), batch \(evaluator.batch), \(model.backendName), \(evaluator.cacheType.rawValue.uppercased()) KV cache\n".utf8))
        var base: KLDivergenceBaseWriter?
        if let path = klDivergenceBase, tokens.count >= 2 * ctx {
            base = try KLDivergenceBaseWriter(path: path, context: ctx, vocabulary: model.config.vocabSize, chunks: chunkCount,
                                              tokens: tokens[0..<(chunkCount * ctx)])
        }
        let result = try evaluator.evaluate(tokens: tokens, bos: tokenizer.addedBOS, maxChunks: chunks,
                                            scored: base.map { b in { row in try b.append(row.logits, target: row.target) } }) { p in
            err.write(Data(String(format: "[%d]%.4f,", p.chunk, p.perplexity).utf8))
            if p.chunk == 1 {
                err.write(Data(String(format: " (%.2f s a chunk)", p.seconds).utf8))
            }
        }
        err.write(Data("\n".utf8))
        try base?.finish()
        if let path = klDivergenceBase { err.write(Data("token distributions of \(result.scoredTokens) positions written to \(path)\n".utf8)) }
        if json {
            print(JSONWriter.write(.object(JSONObject([
                ("model", .string(modelOptions.model)), ("file", .string(file)), ("ctx", .number(Double(ctx))),
                ("kv_cache_type", .string(evaluator.cacheType.rawValue)),
                ("chunks", .number(Double(result.chunks))), ("scored_tokens", .number(Double(result.scoredTokens))),
                ("perplexity", .number(result.perplexity)), ("uncertainty", .number(result.uncertainty)),
                ("seconds", .number(result.seconds)),
            ]))))
        } else {
            print(String(format: "Final estimate: PPL = %.4f +/- %.5f  (%d chunks, %d tokens scored, %.1f s)",
                         result.perplexity, result.uncertainty, result.chunks, result.scoredTokens, result.seconds))
        }
    }

    private func compare() throws {
        let path = klDivergenceBase!
        let base = try KLDivergenceBase(path: path)
        let model = try modelOptions.load()
        let tokenizer = try Tokenizer(directory: modelOptions.model)
        let err = FileHandle.standardError
        let chunkCount = min(base.chunks, chunks ?? .max)
        let evaluator = KLDivergenceEvaluator(model: model, batch: batch, cacheType: kvCacheType)
        err.write(Data("\(path): \(chunkCount) chunks of \(base.context) tokens, vocabulary \(base.vocabulary), batch \(min(batch, base.context)), \(model.backendName), \(evaluator.cacheType.rawValue.uppercased()) KV cache\n".utf8))
        err.write(Data("chunk             PPL          ln(PPL(Q)/PPL(base))       KL divergence            Δp RMS           same top p\n".utf8))
        let start = Date()
        let s = try evaluator.evaluate(base: base, bos: tokenizer.addedBOS, maxChunks: chunks) { p in
            let st = p.statistics
            let ppl = st.perplexity, ratio = st.logPerplexityRatio, kld = st.meanDivergence, rms = st.rmsProbabilityChange, top = st.sameTopFraction
            err.write(Data(String(format: "%4d  %9.4f ± %9.4f  %10.5f ± %10.5f  %10.5f ± %10.5f  %6.3f ± %6.3f %%  %6.3f ± %6.3f %%\n",
                                  p.chunk, ppl.value, ppl.uncertainty, ratio.value, ratio.uncertainty, kld.value, kld.uncertainty,
                                  100 * rms.value, 100 * rms.uncertainty, 100 * top.value, 100 * top.uncertainty).utf8))
        }
        let seconds = Date().timeIntervalSince(start)
        let kld = s.divergencePercentiles(), dp = s.probabilityChangePercentiles()
        func name(_ f: Double) -> String {
            f == 1 ? "max" : f == 0 ? "min" : f == 0.5 ? "median" : String(format: "p%g", 100 * f)
        }
        if json {
            func estimate(_ e: KLDivergenceStatistics.Estimate) -> JSONValue {
                .object(JSONObject([("value", .number(e.value)), ("uncertainty", .number(e.uncertainty))]))
            }
            print(JSONWriter.write(.object(JSONObject([
                ("model", .string(modelOptions.model)), ("base", .string(path)), ("ctx", .number(Double(base.context))),
                ("kv_cache_type", .string(evaluator.cacheType.rawValue)),
                ("chunks", .number(Double(chunkCount))), ("scored_tokens", .number(Double(s.count))),
                ("perplexity", estimate(s.perplexity)), ("base_perplexity", estimate(s.basePerplexity)),
                ("log_perplexity_correlation", .number(s.logPerplexityCorrelation)),
                ("log_perplexity_ratio", estimate(s.logPerplexityRatio)), ("perplexity_ratio", estimate(s.perplexityRatio)),
                ("perplexity_difference", estimate(s.perplexityDifference)),
                ("kl_divergence", estimate(s.meanDivergence)),
                ("kl_divergence_percentiles", .object(JSONObject(kld.map { (name($0.fraction), .number($0.value)) }))),
                ("delta_p", estimate(s.meanProbabilityChange)),
                ("delta_p_percentiles", .object(JSONObject(dp.map { (name($0.fraction), .number($0.value)) }))),
                ("delta_p_rms", estimate(s.rmsProbabilityChange)), ("same_top_p", estimate(s.sameTopFraction)),
                ("seconds", .number(seconds)),
            ]))))
            return
        }
        var lines: [String] = []
        func line(_ s: String) { lines.append(s) }
        func pm(_ e: KLDivergenceStatistics.Estimate, scale: Double = 1, _ format: String = "%10.6f") -> String {
            String(format: "\(format) ± \(format)", scale * e.value, scale * e.uncertainty)
        }
        line("====== Perplexity statistics ======")
        line("Mean PPL(Q)                   : " + pm(s.perplexity))
        line("Mean PPL(base)                : " + pm(s.basePerplexity))
        line(String(format: "Cor(ln(PPL(Q)), ln(PPL(base))): %6.2f%%", 100 * s.logPerplexityCorrelation))
        line("Mean ln(PPL(Q)/PPL(base))     : " + pm(s.logPerplexityRatio))
        line("Mean PPL(Q)/PPL(base)         : " + pm(s.perplexityRatio))
        line("Mean PPL(Q)-PPL(base)         : " + pm(s.perplexityDifference))
        line("")
        line("====== KL divergence statistics ======")
        line("Mean    KLD: " + pm(s.meanDivergence))
        let kldNames = ["Maximum KLD", "99.9%   KLD", "99.0%   KLD", "95.0%   KLD", "90.0%   KLD", "Median  KLD", "10.0%   KLD",
                        " 5.0%   KLD", " 1.0%   KLD", " 0.1%   KLD", "Minimum KLD"]
        for (n, v) in zip(kldNames, kld) { line(String(format: "%@: %10.6f", n, v.value)) }
        line("")
        line("====== Token probability statistics ======")
        line("Mean    Δp: " + pm(s.meanProbabilityChange, scale: 100, "%6.3f") + " %")
        let dpNames = ["Maximum Δp", "99.9%   Δp", "99.0%   Δp", "95.0%   Δp", "90.0%   Δp", "75.0%   Δp", "Median  Δp", "25.0%   Δp",
                       "10.0%   Δp", " 5.0%   Δp", " 1.0%   Δp", " 0.1%   Δp", "Minimum Δp"]
        for (n, v) in zip(dpNames, dp) { line(String(format: "%@: %6.3f%%", n, 100 * v.value)) }
        line("RMS Δp    : " + pm(s.rmsProbabilityChange, scale: 100, "%6.3f") + " %")
        line("Same top p: " + pm(s.sameTopFraction, scale: 100, "%6.3f") + " %")
        line(String(format: "(%d chunks of %d, %d positions, %.1f s)", chunkCount, base.context, s.count, seconds))
        print(lines.joined(separator: "\n"))
    }
}
