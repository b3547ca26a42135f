import ArgumentParser
import Foundation
import Peregrine

struct Perplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Perplexity of a model on a text file, by llama-perplexity's method.",
        discussion: """
            The text is tokenized (with BOS when the tokenizer adds one) and cut into non-overlapping \
            chunks of --ctx tokens; each chunk is evaluated from an empty cache with its first token \
            replaced by BOS, and the second half of each chunk is scored. Progress goes to stderr as \
            [chunk]estimate; the result is the estimate and its standard error.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .shortAndLong, help: "The text file to score.")
    var file: String

    @Option(name: [.customShort("c"), .long], help: "Tokens per chunk.")
    var ctx: Int = 512

    @Option(name: .shortAndLong, help: "Tokens per forward pass (at most --ctx).")
    var batch: Int = 512

    @Option(help: "Score at most this many chunks (default: all).")
    var chunks: Int?

    @Flag(help: "Print the result as one JSON object.")
    var json = false

    func validate() throws {
        if ctx < 4 || ctx > 1 << 20 { throw ValidationError("--ctx must be between 4 and 1048576") }
        if batch < 1 { throw ValidationError("--batch must be >= 1") }
        if let c = chunks, c < 1 { throw ValidationError("--chunks must be >= 1") }
    }

    func run() throws {
        try reportingErrors {
            guard let data = FileManager.default.contents(atPath: file) else { throw PeregrineError.io("\(file): cannot read the file") }
            guard let text = String(data: data, encoding: .utf8) else { throw PeregrineError.format("\(file): not UTF-8 text") }
            let model = try modelOptions.load()
            let tokenizer = try Tokenizer(directory: modelOptions.model)
            let tokens = tokenizer.encode(text)
            let evaluator = try PerplexityEvaluator(model: model, context: ctx, batch: batch)
            let err = FileHandle.standardError
            err.write(Data("\(file): \(tokens.count) tokens; \(min(tokens.count / ctx, chunks ?? .max)) chunks of \(ctx), batch \(evaluator.batch), \(model.backendName)\n".utf8))
            let result = try evaluator.evaluate(tokens: tokens, bos: tokenizer.addedBOS, maxChunks: chunks) { p in
                err.write(Data(String(format: "[%d]%.4f,", p.chunk, p.perplexity).utf8))
                if p.chunk == 1 {
                    err.write(Data(String(format: " (%.2f s a chunk)", p.seconds).utf8))
                }
            }
            err.write(Data("\n".utf8))
            if json {
                print(JSONWriter.write(.object(JSONObject([
                    ("model", .string(modelOptions.model)), ("file", .string(file)), ("ctx", .number(Double(ctx))),
                    ("chunks", .number(Double(result.chunks))), ("scored_tokens", .number(Double(result.scoredTokens))),
                    ("perplexity", .number(result.perplexity)), ("uncertainty", .number(result.uncertainty)),
                    ("seconds", .number(result.seconds)),
                ]))))
            } else {
                print(String(format: "Final estimate: PPL = %.4f +/- %.5f  (%d chunks, %d tokens scored, %.1f s)",
                             result.perplexity, result.uncertainty, result.chunks, result.scoredTokens, result.seconds))
            }
        }
    }
}
