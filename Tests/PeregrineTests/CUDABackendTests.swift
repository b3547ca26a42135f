import XCTest
@testable import Peregrine

/// The CUDA backend against the CPU backend on the same models. Without an NVIDIA GPU (and its
/// driver, NVRTC and cuBLAS) these skip, saying why.
final class CUDABackendTests: XCTestCase {
    func backend() throws -> CUDABackend {
        switch CUDADriver.shared {
        case .failure(let e): throw XCTSkip("no CUDA: \(e)")
        case .success: return try CUDABackend()
        }
    }

    /// Host side, no GPU needed: the caching allocator's size classes.
    func testPoolSizeClasses() {
        XCTAssertEqual(DeviceMemoryPool.sizeClass(1), 256)
        XCTAssertEqual(DeviceMemoryPool.sizeClass(257), 512)
        XCTAssertEqual(DeviceMemoryPool.sizeClass(600_000), 1 << 20)
        XCTAssertEqual(DeviceMemoryPool.sizeClass((1 << 20) + 1), 2 << 20)
        XCTAssertEqual(DeviceMemoryPool.sizeClass(5 << 20), 5 << 20)
    }

    /// The kernels are embedded in the library, whatever machine it was built on.
    func testKernelSourceIsEmbedded() {
        let source = String(decoding: PackageResources.Kernels_cu, as: UTF8.self)
        for kernel in ["matmul_rows", "attention_split", "attention_merge", "quantize_q8", "rms_norm"] {
            XCTAssertTrue(source.contains("__global__ void \(kernel)("), kernel)
        }
    }

    /// Every fixture architecture (F32 weights): logits of a prompt (one batch, cuBLAS) and of
    /// single-token steps (the GEMV kernel) against transformers' reference.
    func testFixtureModelsMatchReference() throws {
        let gpu = try backend()
        for name in ["llama", "llama2", "mistral", "qwen2", "qwen3", "llama-bf16"] {
            let ref = try Reference(model: name)
            let model = try ModelRegistry.load(directory: Fixtures.model(name), backend: gpu)
            let seq = ref.promptIds + ref.greedyIds
            let logits = try allLogits(model, seq)
            XCTAssertLessThan(maxAbsDiff(logits, ref.logits), 1e-3, name)
        }
    }

    /// The shipped BF16 model: the same greedy tokens as the CPU backend, logits within BF16
    /// rounding of the activations cuBLAS sees.
    func testReferenceModelMatchesCPU() throws {
        let gpu = try backend()
        let dir = CLITests.repo.appendingPathComponent("models/target").path
        let cpu = try ModelRegistry.load(directory: dir), cuda = try ModelRegistry.load(directory: dir, backend: gpu)
        let tokenizer = try Tokenizer(directory: dir)
        let prompt = tokenizer.encode("And God said unto Moses")
        let a = try allLogits(cpu, prompt), b = try allLogits(cuda, prompt)
        let scale = a.reduce(0) { max($0, abs($1)) }
        XCTAssertLessThan(maxAbsDiff(a, b), 0.02 * scale)
        var options = GenerationOptions()
        options.maxTokens = 32
        options.sampling.temperature = 0
        let x = try Generator(model: cpu, tokenizer: tokenizer).generate(prompt: "And God said", options: options) { _ in true }
        let y = try Generator(model: cuda, tokenizer: tokenizer).generate(prompt: "And God said", options: options) { _ in true }
        XCTAssertEqual(x.tokens, y.tokens)
    }
}
