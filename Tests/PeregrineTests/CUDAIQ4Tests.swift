import XCTest
@testable import Peregrine

extension CUDABackendTests {
    /// IQ4_NL and IQ4_XS on the GPU (repacked, levels looked up in registers, 8-bit activations
    /// and dp4a for one token; widened to BF16 for cuBLAS over many) against the CPU's integer
    /// kernels on the same files: the reference model quantized by each mix (with its Q5_K, Q5_1
    /// and Q6_K tensors) and with --pure, logits over a prompt and the greedy text of one token
    /// at a time. Without a GPU this skips.
    func testIQ4ModelsMatchCPU() throws {
        let gpu = try backend()
        let dir = CLITests.repo.appendingPathComponent("models/target").path
        let tokenizer = try Tokenizer(directory: dir)
        let prompt = tokenizer.encode("And God said, Let there be light: and there was light. And God saw the light, that it was good")
        for mix in [QuantizationMix.iq4_nl, .iq4_xs] {
            for pure in [false, true] {
                let name = "\(mix.rawValue)\(pure ? " --pure" : "")"
                let out = FileManager.default.temporaryDirectory.appendingPathComponent("peregrine-cuda-\(mix.rawValue)-\(pure).gguf").path
                defer { try? FileManager.default.removeItem(atPath: out) }
                _ = try ModelQuantizer(mix: mix, pure: pure).quantize(source: dir, output: out)
                let cpu = try ModelRegistry.load(directory: out), cuda = try ModelRegistry.load(directory: out, backend: gpu)
                let a = try allLogits(cpu, prompt), b = try allLogits(cuda, prompt)
                let scale = a.reduce(0) { max($0, abs($1)) }
                XCTAssertLessThan(maxAbsDiff(a, b), 0.05 * scale, name)
                var options = GenerationOptions()
                options.maxTokens = 24
                options.sampling.temperature = 0
                let y = try Generator(model: cuda, tokenizer: tokenizer).generate(prompt: "And God said", options: options) { _ in true }
                // The CPU rounds IQ4_XS's activations per 256 values and the GPU per 32, and the
                // GPU's prefill products run on BF16 weights, so a near tie may go either way:
                // every GPU choice must be within 1% of the logit scale of the best under the
                // CPU's logits for the same text.
                let start = tokenizer.encode("And God said", addSpecialTokens: options.addSpecialTokens)
                let v = cpu.config.vocabSize
                let logits = try allLogits(cpu, start + y.tokens)
                for (i, token) in y.tokens.enumerated() {
                    let row = logits[((start.count - 1 + i) * v)..<((start.count + i) * v)]
                    XCTAssertLessThan(row.max()! - row[row.startIndex + token], 0.01 * scale, "\(name) token \(i)")
                }
            }
        }
    }
}
