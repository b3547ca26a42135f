import XCTest
@testable import Peregrine

extension CUDABackendTests {
    /// IQ4_NL and IQ4_XS on the GPU (repacked, levels looked up in registers, 8-bit activations
    /// and dp4a for one token; widened to BF16 for cuBLAS over many) against the CPU's integer
    /// kernels on the same files: the 256-wide fixture model quantized by each mix (with its
    /// Q5_K, Q5_1 and Q6_K tensors) and with --pure, a prompt's logits and decode steps. The CPU
    /// rounds IQ4_XS's activations per 256 values and the GPU per 32, and the GPU's prompt
    /// products run on BF16 activations, on a random model that amplifies such differences: 8%
    /// of the logit scale, as for the k-quants. Without a GPU this skips.
    func testIQ4ModelsMatchCPU() throws {
        let gpu = try backend()
        let dir = try Fixtures.tempDirectory(self)
        for mix in [QuantizationMix.iq4_nl, .iq4_xs] {
            for pure in [false, true] {
                let out = dir + "/\(mix.rawValue)-\(pure).gguf"
                _ = try ModelQuantizer(mix: mix, pure: pure).quantize(source: LowBitKQuantTests.source, output: out)
                try assertMatchesCPU(out, gpu, tolerance: 0.08)
            }
        }
    }
}
