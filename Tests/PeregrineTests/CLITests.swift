import Foundation
import XCTest
@testable import Peregrine

/// The `peregrine` command: bad flags and inputs give one error line and a non-zero exit.
final class CLITests: XCTestCase {
    static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    func run(_ args: [String]) throws -> (Int32, String, String) {
        let exe = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("peregrine")
        guard FileManager.default.isExecutableFile(atPath: exe.path) else {
            throw XCTSkip("peregrine executable not built next to the tests (\(exe.path))")
        }
        let p = Process()
        p.executableURL = exe
        p.arguments = args
        p.currentDirectoryURL = Self.repo
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let o = out.fileHandleForReading.readDataToEndOfFile(), e = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        return (p.terminationStatus, String(decoding: o, as: UTF8.self), String(decoding: e, as: UTF8.self))
    }

    func assertFails(_ args: [String], _ message: String, file: StaticString = #filePath, line: UInt = #line) throws {
        let (code, _, err) = try run(args)
        XCTAssertNotEqual(code, 0, "\(args) succeeded", file: file, line: line)
        XCTAssertTrue(err.contains(message), "\(args): stderr '\(err)' lacks '\(message)'", file: file, line: line)
        XCTAssertFalse(err.contains("Fatal error"), file: file, line: line)
    }

    func testGenerateAndTokenize() throws {
        let (code, out, err) = try run(["generate", "--prompt", "And God said", "-n", "8", "--temperature", "0"])
        XCTAssertEqual(code, 0, err)
        XCTAssertFalse(out.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty)
        XCTAssertTrue(err.contains("generation 8 tokens"), err)
        // An F16 cache (greedy: the same 8 tokens on the reference model), and a type there is not.
        let (c16, out16, err16) = try run(["generate", "--prompt", "And God said", "-n", "8", "--temperature", "0", "--kv-cache-type", "f16"])
        XCTAssertEqual(c16, 0, err16)
        XCTAssertEqual(out16, out)
        try assertFails(["generate", "-n", "2", "--kv-cache-type", "q4"], "kv-cache-type")
        let (c2, ids, _) = try run(["tokenize", "--ids-only", "Hello"])
        XCTAssertEqual(c2, 0)
        XCTAssertEqual(ids.split(separator: " ").first, "8189")
    }

    /// A draft model loaded by the CLI (on the model's device, here the CPU) keeps the plain
    /// greedy text, in generate and in bench's speculative mode.
    func testDraftModelFlags() throws {
        let plainArgs = ["generate", "--prompt", "And God said", "-n", "12", "--temperature", "0"]
        let (code, plain, err) = try run(plainArgs)
        XCTAssertEqual(code, 0, err)
        let (c2, fast, err2) = try run(plainArgs + ["--draft", "models/draft", "--draft-tokens", "3"])
        XCTAssertEqual(c2, 0, err2)
        XCTAssertEqual(fast, plain)
        XCTAssertTrue(err2.contains("speculative (draft model, 3 draft tokens)"), err2)
        let (c3, table, err3) = try run(["bench", "--draft", "models/draft", "--prompt-file", "bench/prompts/open.txt", "-n", "12", "-r", "1",
                                         "-t", "2"])
        XCTAssertEqual(c3, 0, err3)
        XCTAssertTrue(table.contains("| draft model | 3 | no |") && table.hasSuffix("| yes |\n"), table)
    }

    func testPerplexity() throws {
        let (code, out, err) = try run(["perplexity", "-m", "Tests/Fixtures/gguf/llama-f32.gguf", "-f", "Tests/Fixtures/gguf/perplexity.txt",
                                        "-c", "128", "--json"])
        XCTAssertEqual(code, 0, err)
        XCTAssertTrue(err.contains("[9]2012."), err)
        XCTAssertTrue(err.contains("cpu") && err.contains("F32 KV cache"), err)
        XCTAssertTrue(out.contains("\"perplexity\":2012."), out)
        XCTAssertTrue(out.contains("\"kv_cache_type\":\"f32\""), out)
        let (c16, out16, err16) = try run(["perplexity", "-m", "Tests/Fixtures/gguf/llama-f32.gguf", "-f", "Tests/Fixtures/gguf/perplexity.txt",
                                           "-c", "128", "--kv-cache-type", "f16", "--json"])
        XCTAssertEqual(c16, 0, err16)
        XCTAssertTrue(err16.contains("F16 KV cache"), err16)
        XCTAssertTrue(out16.contains("\"kv_cache_type\":\"f16\""), out16)
        try assertFails(["perplexity", "-f", "Tests/Fixtures/gguf/perplexity.txt", "--kv-cache-type", "q8"], "--kv-cache-type")
    }

    func testBenchAtDepth() throws {
        let (code, out, err) = try run(["bench", "-p", "16", "-n", "4", "-d", "0", "32", "-r", "1", "--json"])
        XCTAssertEqual(code, 0, err)
        let tests = out.split(separator: "\n").compactMap { line -> String? in
            guard let r = line.range(of: "\"test\":\"") else { return nil }
            return String(line[r.upperBound...].prefix { $0 != "\"" })
        }
        XCTAssertEqual(tests, ["pp16", "tg4", "pp16 @ d32", "tg4 @ d32"], out)
        try assertFails(["bench", "-d", "17"], "multiples of 16")
        try assertFails(["bench", "-p", "32", "-n", "0", "-d", "1008"], "pp32 at depth 1008 exceeds the model's context of 1024")
    }

    /// A GGUF file is one by its magic, whatever its name; a .gguf name on another file is an error.
    func testGGUFDetectedByMagic() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("peregrine-cli-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let renamed = dir + "/tiny-llama.bin"
        try FileManager.default.copyItem(atPath: Self.repo.path + "/Tests/Fixtures/gguf/llama-f32.gguf", toPath: renamed)
        let (code, out, err) = try run(["generate", "--model", renamed, "--prompt", "The quick brown fox", "-n", "4", "--temperature", "0"])
        XCTAssertEqual(code, 0, err)
        XCTAssertFalse(out.isEmpty)
        let fake = dir + "/fake.gguf"
        try Data("plain text, long enough for a GGUF header".utf8).write(to: URL(fileURLWithPath: fake))
        try assertFails(["generate", "--model", fake], "not a GGUF file (bad magic)")
        let other = dir + "/notes.txt"
        try Data("plain text".utf8).write(to: URL(fileURLWithPath: other))
        try assertFails(["generate", "--model", other], "neither a model directory nor a GGUF file")
    }

    /// An importance matrix collected, used by quantize, and the quantized file compared with the
    /// source's token distributions.
    func testImatrixQuantizeAndKLDivergence() throws {
        let dir = try Fixtures.tempDirectory(self)
        let f16 = "Tests/Fixtures/gguf/llama256-f16.gguf", text = "Tests/Fixtures/gguf/perplexity.txt"
        var (code, out, err) = try run(["imatrix", "-m", f16, "-f", text, "-c", "128", "-o", dir + "/m.gguf"])
        XCTAssertEqual(code, 0, err)
        XCTAssertTrue(err.contains("[9/9]") && err.contains("tok/s") && err.contains("left"), err)
        XCTAssertTrue(out.contains("14 entries over 9 chunks of 128 tokens (gguf)"), out)
        (code, out, err) = try run(["quantize", "-m", f16, "--type", "Q4_K_M", "-o", dir + "/q.gguf", "--imatrix", dir + "/m.gguf"])
        XCTAssertEqual(code, 0, err)
        XCTAssertTrue(out.contains("weighted 14 tensors"), out)
        (code, out, err) = try run(["perplexity", "-m", f16, "-f", text, "-c", "128", "--kl-divergence-base", dir + "/base.kld"])
        XCTAssertEqual(code, 0, err)
        XCTAssertTrue(err.contains("token distributions of 567 positions written"), err)
        (code, out, err) = try run(["perplexity", "-m", dir + "/q.gguf", "--kl-divergence-base", dir + "/base.kld", "--kl-divergence", "--json"])
        XCTAssertEqual(code, 0, err)
        XCTAssertTrue(err.contains("F32 KV cache"), err)
        let result = try JSON.parse(Array(out.utf8))
        XCTAssertEqual(result["kv_cache_type"]?.string, "f32")
        XCTAssertEqual(result["scored_tokens"]?.int, 567)
        XCTAssertGreaterThan(try XCTUnwrap(result["kl_divergence"]?["value"]?.double), 0)
        XCTAssertNotNil(result["kl_divergence_percentiles"]?["p99"]?.double)
        XCTAssertNotNil(result["same_top_p"]?["value"]?.double)
        (code, out, err) = try run(["perplexity", "-m", dir + "/q.gguf", "--kl-divergence-base", dir + "/base.kld", "--kl-divergence"])
        XCTAssertEqual(code, 0, err)
        for line in ["Mean PPL(Q)/PPL(base)", "Mean PPL(Q)-PPL(base)", "Mean    KLD", "99.0%   KLD", "Median  KLD", "Same top p"] {
            XCTAssertTrue(out.contains(line), "\(line) missing from \(out)")
        }
    }

    /// quantize --method gptq / awq from a calibration text.
    func testQuantizeWithCalibration() throws {
        let dir = try Fixtures.tempDirectory(self)
        let f16 = "Tests/Fixtures/gguf/llama256-f16.gguf", text = "Tests/Fixtures/gguf/perplexity.txt"
        var (code, out, err) = try run(["quantize", "-m", f16, "--type", "Q4_K_M", "-o", dir + "/g.gguf", "--method", "gptq", "--calibration", text,
                                        "--calibration-ctx", "128", "--act-order"])
        XCTAssertEqual(code, 0, err)
        XCTAssertTrue(err.contains("calibration [9/9]") && err.contains("9 chunks of 128, 14 weights"), err)
        XCTAssertTrue(out.contains("gptq: 14 tensors, damp 0.01, act-order"), out)
        (code, out, err) = try run(["quantize", "-m", f16, "--type", "Q4_0", "-o", dir + "/a.gguf", "--method", "awq", "--calibration", text,
                                    "--calibration-ctx", "128", "--calibration-chunks", "2"])
        XCTAssertEqual(code, 0, err)
        XCTAssertTrue(out.contains("awq: 8 groups scaled"), out)
        // Statistics kept in a file: the second run reads them instead of running the model, and
        // writes the same bytes; another context is refused.
        let stats = dir + "/stats.calib"
        for (i, name) in ["k1.gguf", "k2.gguf"].enumerated() {
            (code, out, err) = try run(["quantize", "-m", f16, "--type", "IQ4_NL", "-o", dir + "/" + name, "--method", "gptq", "--calibration", text,
                                        "--calibration-ctx", "128", "--calibration-chunks", "2", "--calibration-statistics", stats])
            XCTAssertEqual(code, 0, err)
            XCTAssertTrue(err.contains(i == 0 ? "calibration statistics written to" : "calibration statistics read from"), err)
            XCTAssertEqual(err.contains("calibration [1/2]"), i == 0, err)
        }
        XCTAssertEqual(try FileSystem.read(dir + "/k1.gguf"), try FileSystem.read(dir + "/k2.gguf"))
        (code, out, err) = try run(["quantize", "-m", f16, "--type", "IQ4_NL", "-o", dir + "/k3.gguf", "--method", "gptq", "--calibration", text,
                                    "--calibration-ctx", "64", "--calibration-chunks", "2", "--calibration-statistics", stats])
        XCTAssertNotEqual(code, 0)
        XCTAssertTrue(err.contains("holds statistics of another calibration text"), err)
    }

    func testBadInputs() throws {
        try assertFails(["generate", "--prompt", ""], "error: the prompt is empty")
        try assertFails(["generate", "--temperature=-1"], "error: temperature must be >= 0")
        try assertFails(["generate", "--top-p", "2"], "error: top-p must be in (0, 1]")
        try assertFails(["generate", "--top-k", "many"], "Error:")
        try assertFails(["generate", "--max-tokens=-3"], "--max-tokens must be between 0 and 16777216")
        // Counts whose sums overflowed (a trap) before they reached a check of their own.
        try assertFails(["generate", "-n", "9223372036854775807"], "--max-tokens must be between 0 and 16777216")
        try assertFails(["generate", "-c", "9223372036854775807"], "--ctx-size must be between 1 and 16777216")
        try assertFails(["chat", "-c", "9223372036854775807"], "--ctx-size must be between 2 and 16777216")
        try assertFails(["serve", "-c", "9223372036854775807"], "--ctx-size must be between 2 and 16777216")
        try assertFails(["serve", "--shutdown-timeout", "1e300"], "--shutdown-timeout must be between 0 and 86400 seconds")
        try assertFails(["bench", "-p", "9223372036854775807", "-d", "16"], "token counts must be at most 16777216")
        try assertFails(["bench", "--throughput", "--input-len", "9223372036854775807"], "token counts must be at most 16777216")
        try assertFails(["bench", "--batched", "--npl", "4611686018427387904"], "--npl must be at most 65536")
        try assertFails(["generate", "--model", "/nonexistent"], "error: /nonexistent: not a model directory")
        try assertFails(["generate", "-c", "4", "--prompt", "a prompt longer than four tokens"], "context length is 4")
        try assertFails(["generate", "--threads", "0"], "--threads must be between 1 and 1024")
        try assertFails(["generate", "--draft", "Tests/Fixtures/models/llama"], "vocabulary")
        try assertFails(["generate", "--skip-layers", "1,x"], "--skip-layers takes layer numbers")
        try assertFails(["generate", "--lookup", "--draft", "models/draft"], "choose one of")
        try assertFails(["tokenize", "--model", "models", "x"], "no tokenizer.json")
        try assertFails(["bench", "-r", "0"], "--repetitions must be between 1 and 1000")
        try assertFails(["bench", "-p", "5000"], "exceeds the model's context of 1024")
        try assertFails(["perplexity", "-f", "/nonexistent.txt"], "error: /nonexistent.txt: cannot read the file")
        try assertFails(["perplexity", "-f", "Tests/Fixtures/gguf/perplexity.txt", "-c", "2"], "--ctx must be between")
        try assertFails(["perplexity", "-f", "Tests/Fixtures/gguf/perplexity.txt"], "needs at least 1024")
        try assertFails(["perplexity", "-f", "Tests/Fixtures/gguf/perplexity.txt", "-c", "4096"], "longer than the model's 1024 positions")
        try assertFails(["quantize", "--type", "Q3_X", "-o", "/tmp/x.gguf"], "--type must be one of")
        try assertFails(["quantize", "--type", "Q8_0", "-m", "Tests/Fixtures/gguf/llama256-q6_k.gguf", "-o", "Tests/Fixtures/gguf/llama256-q6_k.gguf"],
                        "--out must differ from --model")
        try assertFails(["quantize", "--type", "Q4_0", "-m", "Tests/Fixtures/gguf/llama256-q6_k.gguf", "-o", "/nonexistent/x.gguf"],
                        "error: Tests/Fixtures/gguf/llama256-q6_k.gguf: tensor")
        if ProcessInfo.processInfo.environment["LD_LIBRARY_PATH"]?.contains("cuda") != true,
           !FileManager.default.fileExists(atPath: "/usr/local/cuda/lib64/libnvrtc.so") {
            try assertFails(["generate", "--device", "cuda", "-n", "2"], "error: CUDA is not available")
        }
        try assertFails(["imatrix", "-f", "Tests/Fixtures/gguf/perplexity.txt", "--device", "cuda"], "collected on the CPU backend")
        try assertFails(["imatrix", "-f", "Tests/Fixtures/gguf/perplexity.txt", "--output-format", "xml"], "--output-format must be gguf or dat")
        try assertFails(["imatrix", "-f", "Tests/Fixtures/gguf/perplexity.txt"], "needs at least 1024")
        try assertFails(["perplexity", "--kl-divergence"], "--kl-divergence needs --kl-divergence-base")
        try assertFails(["perplexity", "--kl-divergence", "--kl-divergence-base", "/nonexistent.kld"], "error: cannot open /nonexistent.kld")
        try assertFails(["perplexity"], "--file is required")
        try assertFails(["quantize", "--type", "Q4_0", "-m", "Tests/Fixtures/gguf/llama256-f16.gguf", "-o", "/tmp/x.gguf", "--imatrix", "/nonexistent"],
                        "error: cannot open /nonexistent")
        let f16 = "Tests/Fixtures/gguf/llama256-f16.gguf", text = "Tests/Fixtures/gguf/perplexity.txt"
        try assertFails(["quantize", "--type", "Q4_0", "-m", f16, "-o", "/tmp/x.gguf", "--method", "hqq"], "--method must be round, gptq or awq")
        try assertFails(["quantize", "--type", "Q4_0", "-m", f16, "-o", "/tmp/x.gguf", "--method", "gptq"], "--method gptq needs a calibration text")
        try assertFails(["quantize", "--type", "Q4_0", "-m", f16, "-o", "/tmp/x.gguf", "--method", "awq", "--calibration", "/nonexistent.txt"],
                        "--calibration /nonexistent.txt: no such readable file")
        try assertFails(["quantize", "--type", "Q4_0", "-m", f16, "-o", "/tmp/x.gguf", "--calibration", text], "--calibration and --calibration-statistics are used by --method gptq or awq")
        try assertFails(["quantize", "--type", "Q4_0", "-m", f16, "-o", "/tmp/x.gguf", "--method", "gptq", "--calibration", text,
                         "--calibration-ctx", "4096"], "error: the calibration text has 1171 tokens, fewer than one chunk of 4096")
        try assertFails(["quantize", "--type", "Q4_0", "-m", f16, "-o", "/tmp/x.gguf", "--method", "gptq", "--calibration", text, "--damp=-1"],
                        "--damp must be between 0 and 10")
        try assertFails(["generate", "--device", "tpu"], "Error:")
        try assertFails(["frobnicate"], "Error:")
    }
}
