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
            of its columns.
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

    func validate() throws {
        guard QuantizationMix(name: type) != nil else {
            throw ValidationError("--type must be one of \(QuantizationMix.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        if let t = threads, t < 1 || t > 1024 { throw ValidationError("--threads must be between 1 and 1024") }
        if URL(fileURLWithPath: out).standardizedFileURL == URL(fileURLWithPath: model).standardizedFileURL {
            throw ValidationError("--out must differ from --model")
        }
    }

    func run() throws {
        try reportingErrors {
            let mix = QuantizationMix(name: type)!
            let pool = threads.map { ThreadPool(threadCount: $0) } ?? .shared
            let err = FileHandle.standardError
            let importance = try imatrix.map { try ImportanceMatrix(path: $0) }
            let quantizer = ModelQuantizer(mix: mix, pure: pure, pool: pool, importance: importance, importanceFile: imatrix)
            let summary = try quantizer.quantize(source: model, output: out) { i, n, name, dtype in
                err.write(Data(String(format: "[%4d/%4d] %-32@ %@\n", i + 1, n, name, dtype.rawValue).utf8))
            }
            let types = summary.typeCounts.sorted { $0.key < $1.key }.map { "\($0.key): \($0.value)" }.joined(separator: ", ")
            print(String(format: "%@: %@, %d tensors (%@), %.1f MiB -> %.1f MiB, %.2f bits per weight, %.1f s",
                         out, mix.rawValue, summary.tensors, types, Double(summary.sourceBytes) / 1048576,
                         Double(summary.outputBytes) / 1048576, summary.bitsPerWeight, summary.seconds))
            if let importance {
                print("importance matrix \(imatrix!): \(importance.entries.count) entries, \(importance.chunkCount) chunks; weighted \(summary.weightedTensors) tensors")
            }
        }
    }
}
