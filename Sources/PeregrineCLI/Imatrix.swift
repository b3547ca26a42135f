import ArgumentParser
import Foundation
import Peregrine

struct Imatrix: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Collect an importance matrix over a calibration text, for `peregrine quantize --imatrix`.",
        discussion: """
            For every input column of each layer's matrix products (q/k/v/o, gate/up/down), the mean \
            squared activation over the text, in llama.cpp's imatrix format: GGUF (the default, as \
            llama-imatrix writes it) or the legacy .dat format, so files work in either engine. The \
            text is cut as llama-imatrix cuts it: chunks of --ctx tokens, each from an empty cache with \
            its first token replaced by BOS; every token of every chunk is counted. The perplexity of \
            the chunks' second halves is reported on the way. The activations are watched on the CPU \
            backend (CUDA is not supported for collection). Keep the calibration text apart from the \
            text you evaluate on.
            """)

    @OptionGroup var modelOptions: ModelOptions

    @Option(name: .shortAndLong, help: "The calibration text file.")
    var file: String

    @Option(name: .shortAndLong, help: "The output file.")
    var out: String = "imatrix.gguf"

    @Option(help: "gguf (llama.cpp's default) or dat (llama.cpp's legacy format).")
    var outputFormat: String = "gguf"

    @Option(name: [.customShort("c"), .long], help: "Tokens per chunk.")
    var ctx: Int = 512

    @Option(name: .shortAndLong, help: "Tokens per forward pass (at most --ctx).")
    var batch: Int = 512

    @Option(help: "Use at most this many chunks (default: all).")
    var chunks: Int?

    @Flag(help: "Collect output.weight too (llama-imatrix's --process-output; never the tied embedding).")
    var processOutput = false

    func validate() throws {
        if ctx < 4 || ctx > 1 << 20 { throw ValidationError("--ctx must be between 4 and 1048576") }
        if batch < 1 { throw ValidationError("--batch must be >= 1") }
        if let c = chunks, c < 1 { throw ValidationError("--chunks must be >= 1") }
        guard ImportanceMatrix.FileFormat(rawValue: outputFormat) != nil else { throw ValidationError("--output-format must be gguf or dat") }
        if modelOptions.device != .cpu {
            throw ValidationError("the importance matrix is collected on the CPU backend; run without --device \(modelOptions.device.rawValue)")
        }
    }

    func run() throws {
        try reportingErrors {
            guard let data = FileManager.default.contents(atPath: file) else { throw PeregrineError.io("\(file): cannot read the file") }
            guard let text = String(data: data, encoding: .utf8) else { throw PeregrineError.format("\(file): not UTF-8 text") }
            let backend = modelOptions.cpuBackend()
            let model = try ModelRegistry.load(directory: modelOptions.model, backend: backend)
            let tokenizer = try Tokenizer(directory: modelOptions.model)
            let tokens = tokenizer.encode(text)
            let run = ImportanceMatrixRun(model: model, backend: backend, context: ctx, batch: batch, includeOutput: processOutput)
            let err = FileHandle.standardError
            err.write(Data("\(file): \(tokens.count) tokens; \(min(tokens.count / ctx, chunks ?? .max)) chunks of \(ctx), batch \(min(batch, ctx)), \(model.backendName)\n".utf8))
            let (matrix, ppl) = try run.collect(tokens: tokens, bos: tokenizer.addedBOS, maxChunks: chunks, dataset: file) { p in
                let left = p.secondsLeft.isFinite ? Int(min(p.secondsLeft, 1e9).rounded()) : 0
                err.write(Data(String(format: "[%d/%d] %.1f tok/s, %d:%02d left, PPL %.4f\n", p.chunk, p.chunks, p.tokensPerSecond,
                                      left / 60, left % 60, p.perplexity).utf8))
            }
            let format = ImportanceMatrix.FileFormat(rawValue: outputFormat)!
            if format == .gguf, !out.hasSuffix(".gguf") {
                err.write(Data("note: writing GGUF to \(out), a name without .gguf (--output-format dat writes the legacy format)\n".utf8))
            }
            try matrix.write(to: out, format: format)
            print(String(format: "%@: %d entries over %d chunks of %d tokens (%@); PPL = %.4f +/- %.5f, %.1f s",
                         out, matrix.entries.count, matrix.chunkCount, matrix.chunkSize, format.rawValue, ppl.perplexity,
                         ppl.uncertainty, ppl.seconds))
        }
    }
}
