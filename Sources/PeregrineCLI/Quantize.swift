import ArgumentParser
import Foundation
import Peregrine

struct Quantize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write a quantized GGUF file from a Hugging Face model directory or an F32/F16/BF16 GGUF file.",
        discussion: """
            Types: \(QuantizationMix.allCases.map(\.rawValue).joined(separator: ", ")). Q2_K and the _K_S, _K_M \
            and _K_L mixes give some tensors more bits, by llama.cpp's rules (QUANTIZATION.md), and so do IQ4_NL \
            and IQ4_XS (4-bit indices into a fixed non-uniform table of levels; IQ4_XS with 6-bit scales per 32 \
            values under one per 256, 4.25 bits per weight); norms and expert routers stay \
            F32, and each projection of a layer's experts is one stacked tensor. \
            With --imatrix (a file of `peregrine imatrix` or llama.cpp's llama-imatrix, GGUF or legacy .dat), \
            each tensor with an entry there is quantized for the least error weighted by the importance \
            of its columns. \
            --method gptq or awq first runs the model over a calibration text (--calibration; chunks of \
            --calibration-ctx tokens, on the CPU) and collects X^T X of every layer weight's inputs. GPTQ \
            quantizes each layer weight column by column, pushing each column's rounding error onto the \
            columns not yet quantized (--damp, --act-order; for the IQ4 types, to the nearest of their table's levels); AWQ scales each weight's input columns by the \
            mean |x|^alpha that best preserves the product after rounding and folds the scales into the \
            preceding norm or projection. Either way the blocks are the type's own, so the file runs \
            anywhere GGUF does; with --imatrix the block scales are also fitted with the importance weights.
            """)

    @Option(name: .shortAndLong, help: "The source: a model directory or a .gguf file.")
    var model: String = Defaults.model

    @Option(name: .long, help: "The quantization type or mix.")
    var type: String

    @Option(name: .shortAndLong, help: "The output .gguf file.")
    var out: String

    @Option(name: .shortAndLong, help: "Worker threads (default: all cores).")
    var threads: Int?

    @Flag(help: "Give every matrix the type itself, output and embeddings included (llama.cpp's --pure).")
    var pure = false

    @Option(help: "An importance matrix file (peregrine imatrix, or llama.cpp's llama-imatrix: GGUF or legacy format).")
    var imatrix: String?

    @Option(help: "How values are chosen: round (each block by its type's quantizer), gptq or awq (both need --calibration).")
    var method: String = "round"

    @Option(help: "The calibration text file for --method gptq or awq (keep it apart from the text you evaluate on).")
    var calibration: String?

    @Option(help: "Tokens per calibration chunk.")
    var calibrationCtx: Int = 512

    @Option(help: "Use at most this many calibration chunks (default: all).")
    var calibrationChunks: Int?

    @Option(help: ArgumentHelp("Keep the calibration statistics in this file: read them from it when it exists (made from the same model, text, --calibration-ctx and --calibration-chunks), else collect them and write it; for several types or settings from one pass over the text.", valueName: "file"))
    var calibrationStatistics: String?

    @Option(help: "GPTQ: added to the diagonal of X^T X, as a fraction of its mean.")
    var damp: Double = 0.01

    @Flag(help: "GPTQ: quantize columns in order of decreasing input energy (blocks stay the stored ones).")
    var actOrder = false

    @Option(help: "AWQ: points of the grid of exponents alpha searched in [0, 1].")
    var awqGrid: Int = 20

    func validate() throws {
        guard QuantizationMix(name: type) != nil else {
            throw ValidationError("--type must be one of \(QuantizationMix.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let t = threads, t < 1 || t > 1024 { throw ValidationError("--threads must be between 1 and 1024") }
        if URL(fileURLWithPath: out).standardizedFileURL == URL(fileURLWithPath: model).standardizedFileURL {
            throw ValidationError("--out must differ from --model")
        }
        guard ["round", "gptq", "awq"].contains(method) else { throw ValidationError("--method must be round, gptq or awq, not '\(method)'") }
        if method == "round" {
            if calibration != nil || calibrationStatistics != nil { throw ValidationError("--calibration and --calibration-statistics are used by --method gptq or awq") }
        } else {
            guard let c = calibration else { throw ValidationError("--method \(method) needs a calibration text: --calibration FILE") }
            guard FileManager.default.isReadableFile(atPath: c) else { throw ValidationError("--calibration \(c): no such readable file") }
        }
        if calibrationCtx < 4 || calibrationCtx > 1 << 20 { throw ValidationError("--calibration-ctx must be between 4 and 1048576") }
        if let c = calibrationChunks, c < 1 { throw ValidationError("--calibration-chunks must be >= 1") }
        if !(damp >= 0 && damp <= 10) { throw ValidationError("--damp must be between 0 and 10") }
        if awqGrid < 2 || awqGrid > 1000 { throw ValidationError("--awq-grid must be between 2 and 1000") }
    }

    func run() throws {
        try reportingErrors {
            let mix = QuantizationMix(name: type)!
            let pool = threads.map { ThreadPool(threadCount: $0) } ?? .shared
            let err = FileHandle.standardError
            let importance = try imatrix.map { try ImportanceMatrix(path: $0) }
            var quantizationMethod = QuantizationMethod.rounding
            if let calibration {
                guard let data = FileManager.default.contents(atPath: calibration) else { throw PeregrineError.io("\(calibration): cannot read the file") }
                guard let text = String(data: data, encoding: .utf8) else { throw PeregrineError.format("\(calibration): not UTF-8 text") }
                let start = Date()
                let origin = CalibrationStatisticsFile.Origin(text: text, context: calibrationCtx, maxChunks: calibrationChunks)
                let statistics: [String: InputStatistics], chunks: Int, tokens: Int
                if let kept = calibrationStatistics, FileManager.default.fileExists(atPath: kept) {
                    let contents = try CalibrationStatisticsFile.read(kept)
                    guard contents.origin == origin else {
                        throw PeregrineError.invalidArgument("\(kept) holds statistics of another calibration text or --calibration-ctx/--calibration-chunks; remove it or name another file")
                    }
                    (statistics, chunks, tokens) = (contents.statistics, contents.chunks, contents.tokens)
                    err.write(Data("calibration statistics read from \(kept)\n".utf8))
                } else {
                    (statistics, chunks, tokens) = try CalibrationRun.statistics(source: model, text: text, context: calibrationCtx,
                                                                                 maxChunks: calibrationChunks, pool: pool) { p in
                        err.write(Data(String(format: "calibration [%d/%d] PPL %.4f, %.1f s\n", p.chunk, p.chunks, p.perplexity, p.seconds).utf8))
                    }
                    if let kept = calibrationStatistics {
                        try CalibrationStatisticsFile.write(statistics, origin: origin, chunks: chunks, tokens: tokens, to: kept)
                        err.write(Data("calibration statistics written to \(kept)\n".utf8))
                    }
                }
                err.write(Data(String(format: "calibration %@: %d tokens, %d chunks of %d, %d weights, %.1f s\n", calibration, tokens, chunks,
                                      calibrationCtx, statistics.count, Date().timeIntervalSince(start)).utf8))
                quantizationMethod = method == "gptq" ? .gptq(GPTQ(damp: damp, actOrder: actOrder), statistics)
                    : .awq(AWQ(gridPoints: awqGrid), statistics)
            }
            let quantizer = ModelQuantizer(mix: mix, pure: pure, pool: pool, importance: importance, importanceFile: imatrix,
                                           method: quantizationMethod)
            let summary = try quantizer.quantize(source: model, output: out) { i, n, name, dtype in
                err.write(Data(String(format: "[%4d/%4d] %-32@ %@\n", i + 1, n, name, dtype.rawValue).utf8))
            }
            let types = summary.typeCounts.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
            print(String(format: "%@: %@, %d tensors (%@), %.1f MiB -> %.1f MiB, %.2f bits per weight, %.1f s",
                         out, mix.rawValue, summary.tensors, types, Double(summary.sourceBytes) / 1048576,
                         Double(summary.outputBytes) / 1048576, summary.bitsPerWeight, summary.seconds))
            if summary.gptqTensors > 0 { print("gptq: \(summary.gptqTensors) tensors, damp \(damp)\(actOrder ? ", act-order" : "")") }
            if !summary.awqChoices.isEmpty {
                let alphas = summary.awqChoices.map { String(format: "%.2f", $0.alpha) }.joined(separator: " ")
                let gain = summary.awqChoices.reduce(0) { $0 + $1.error } / max(summary.awqChoices.reduce(0) { $0 + $1.plainError }, 1e-30)
                print(String(format: "awq: %d groups scaled (alpha %@); product error %.3fx plain rounding's", summary.awqChoices.count, alphas, gain))
            }
            if let importance {
                print("importance matrix \(imatrix!): \(importance.entries.count) entries, \(importance.chunkCount) chunks; weighted \(summary.weightedTensors) tensors")
            }
        }
    }
}
