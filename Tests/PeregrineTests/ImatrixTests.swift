import XCTest
@testable import Peregrine

/// Importance matrices: collected as a reference pass sees the products' inputs (transformers'
/// layers, llama.cpp's llama-imatrix on the same files), and read and written in both of
/// llama.cpp's formats (Tests/Fixtures/imatrix, made by scripts/make_imatrix_fixture.py).
final class ImatrixTests: XCTestCase {
    static let text = Fixtures.root + "/gguf/perplexity.txt"
    static let dir = Fixtures.root + "/imatrix"

    func collect(_ path: String, ctx: Int = 128, batch: Int = 128, includeOutput: Bool = false,
                 chunks: Int? = nil) throws -> (matrix: ImportanceMatrix, perplexity: PerplexityEvaluator.Result) {
        let backend = CPUBackend()
        let model = try ModelRegistry.load(directory: path, backend: backend)
        let tokenizer = try Tokenizer(directory: path)
        let text = try String(contentsOfFile: Self.text, encoding: .utf8)
        let run = ImportanceMatrixRun(model: model, backend: backend, context: ctx, batch: batch, includeOutput: includeOutput)
        return try run.collect(tokens: tokenizer.encode(text), bos: tokenizer.addedBOS, maxChunks: chunks, dataset: "perplexity.txt")
    }

    /// Each column's sum within `relative` of the reference's, or within `relative` of the entry's
    /// largest sum for columns whose sums are small.
    func assertClose(_ ours: ImportanceMatrix.Entry, _ sums: [Double], count: Int? = nil, counts: [Int]? = nil, relative: Double,
                     _ name: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertEqual(ours.counts, counts ?? count.map { [$0] } ?? [], name, file: file, line: line)
        XCTAssertEqual(ours.sums.count, sums.count, name, file: file, line: line)
        let largest = sums.max() ?? 0
        var worst = 0.0
        for (a, b) in zip(ours.sums, sums) { worst = max(worst, abs(Double(a) - b) / max(b, 0.01 * largest)) }
        XCTAssertLessThan(worst, relative, "\(name): columns differ by up to \(worst) (relative)", file: file, line: line)
    }

    /// The tiny Llama's Hugging Face directory against sums of the squared inputs of each of
    /// transformers' q/k/v/o and gate/up/down projections over the same chunks.
    func testMatchesTransformersInputs() throws {
        let ref = try Fixtures.json(Self.dir + "/llama.transformers.json")
        let (m, _) = try collect(Fixtures.model("llama"))
        let object = try XCTUnwrap(ref["entries"]?.object)
        let entries = zip(object.keys, object.values)
        XCTAssertEqual(Set(m.entries.keys), Set(entries.map(\.0)))
        XCTAssertEqual(m.entries.count, 14)
        for (name, e) in entries {
            let sums = try XCTUnwrap(e["sums"]?.array).compactMap(\.double)
            let ours = try XCTUnwrap(m.entries[name], name)
            // Measured: 1.1e-6 at most (f32 products summed in another order).
            assertClose(ours, sums, count: try XCTUnwrap(e["count"]?.int), relative: 1e-4, name)
        }
        XCTAssertEqual(m.chunkCount, 9)
        XCTAssertEqual(m.chunkSize, 128)
        XCTAssertEqual(m.datasets, ["perplexity.txt"])
    }

    /// The GGUF files against llama-imatrix's matrices of the same files, read from its GGUF
    /// output (the Mixtral file's routed experts counted per expert); its legacy output holds the
    /// same means.
    func testMatchesLlamaImatrix() throws {
        for name in ["llama-f32", "llama256-f16", "mixtral-f32"] {
            let theirs = try ImportanceMatrix(path: Self.dir + "/\(name).imatrix.gguf")
            let (ours, _) = try collect(Fixtures.root + "/gguf/\(name).gguf")
            XCTAssertEqual(Set(ours.entries.keys), Set(theirs.entries.keys), name)
            XCTAssertEqual(theirs.chunkCount, 9)
            XCTAssertEqual(theirs.chunkSize, 128)
            XCTAssertFalse(theirs.isLegacy)
            for (tensor, e) in theirs.entries {
                // Measured: 3.4e-6 at most for llama-f32 (llama.cpp sums in f32, 9 chunks a
                // batch), 8.6e-4 for llama256-f16 (its F16 products round activations to f16).
                assertClose(try XCTUnwrap(ours.entries[tensor], tensor), e.sums.map(Double.init), counts: e.counts,
                            relative: name == "llama256-f16" ? 3e-3 : 1e-4, "\(name) \(tensor)")
            }
        }
        let gguf = try ImportanceMatrix(path: Self.dir + "/llama-f32.imatrix.gguf")
        let legacy = try ImportanceMatrix(path: Self.dir + "/llama-f32.imatrix.dat")
        XCTAssertTrue(legacy.isLegacy)
        XCTAssertEqual(legacy.chunkCount, 9)
        XCTAssertEqual(Set(legacy.entries.keys), Set(gguf.entries.keys))
        for (name, e) in gguf.entries {
            let a = e.means, b = try XCTUnwrap(legacy.entries[name]).means
            XCTAssertEqual(legacy.entries[name]?.counts, [9], name)
            for (x, y) in zip(a, b) { XCTAssertEqual(x, y, accuracy: 1e-6 * max(abs(x), 1e-3), name) }
        }
    }

    /// A mixture of experts from its Hugging Face directory (one tensor per expert) names and
    /// counts its experts as the GGUF file stacks them, with the same sums; quantizing the GGUF
    /// with the matrix weights the stacked experts too.
    func testExpertsFromEitherFile() throws {
        let (hf, _) = try collect(Fixtures.model("mixtral"))
        let (gguf, _) = try collect(Fixtures.root + "/gguf/mixtral-f32.gguf")
        XCTAssertEqual(Set(hf.entries.keys), Set(gguf.entries.keys))
        XCTAssertEqual(hf.entries["blk.1.ffn_down_exps.weight"]?.counts.count, 8)
        for (name, e) in gguf.entries {
            assertClose(try XCTUnwrap(hf.entries[name], name), e.sums.map(Double.init), counts: e.counts, relative: 1e-4, name)
        }
        let dir = try Fixtures.tempDirectory(self)
        let summary = try ModelQuantizer(mix: .q4_0, importance: gguf)
            .quantize(source: Fixtures.root + "/gguf/mixtral-f32.gguf", output: dir + "/w.gguf")
        // Per layer: q, k, v, output and the three stacked experts (the router stays F32).
        XCTAssertEqual(summary.weightedTensors, 2 * 7)
    }

    /// Ours written and read back, in both formats.
    func testRoundTrip() throws {
        let (m, _) = try collect(Fixtures.root + "/gguf/llama-f32.gguf", chunks: 3)
        let dir = try Fixtures.tempDirectory(self)
        try m.write(to: dir + "/m.gguf", format: .gguf)
        XCTAssertEqual(try ImportanceMatrix(path: dir + "/m.gguf"), m)
        let g = try GGUFFile(path: dir + "/m.gguf")
        XCTAssertEqual(g.metadata["general.type"], .string("imatrix"))
        XCTAssertEqual(g.metadata["imatrix.chunk_count"], .uint(3))
        XCTAssertEqual(g.info("blk.0.ffn_down.weight.in_sum2")?.dims, [128, 1])
        XCTAssertEqual(g.info("blk.0.ffn_down.weight.counts")?.dims, [1, 1])

        try m.write(to: dir + "/m.dat", format: .dat)
        let legacy = try ImportanceMatrix(path: dir + "/m.dat")
        XCTAssertTrue(legacy.isLegacy)
        XCTAssertEqual(legacy.chunkCount, 3)
        XCTAssertEqual(legacy.datasets, ["perplexity.txt"])
        for (name, e) in m.entries {
            XCTAssertEqual(legacy.entries[name]?.counts, [3])
            for (x, y) in zip(e.means, try XCTUnwrap(legacy.entries[name]).means) { XCTAssertEqual(x, y, accuracy: 1e-6 * max(abs(x), 1e-6)) }
        }
        // A legacy matrix written again is the same file.
        try legacy.write(to: dir + "/again.dat", format: .dat)
        XCTAssertEqual(try FileSystem.read(dir + "/again.dat"), try FileSystem.read(dir + "/m.dat"))
    }

    /// Per-expert counts: an expert's rows go to its own block and count.
    func testExpertsCountSeparately() throws {
        let c = ImportanceCollector()
        let rows: [Float] = [1, 2, 3, 4, 5, 6]
        rows.withUnsafeBufferPointer { p in
            c.observe(weight: "blk.0.ffn_down_exps.weight", expert: 2, of: 3, input: p.baseAddress!, rows: 2, cols: 3)
            c.observe(weight: "blk.0.ffn_down_exps.weight", expert: 0, of: 3, input: p.baseAddress!, rows: 1, cols: 3)
        }
        let m = try c.matrix(datasets: [], chunks: 1, chunkSize: 512)
        let e = try XCTUnwrap(m.entries["blk.0.ffn_down_exps.weight"])
        XCTAssertEqual(e.counts, [1, 0, 2])
        XCTAssertEqual(e.sums, [1, 4, 9, 0, 0, 0, 17, 29, 45])
        XCTAssertEqual(e.means, [1, 4, 9, 1, 1, 1, 8.5, 14.5, 22.5])
        let dir = try Fixtures.tempDirectory(self)
        try m.write(to: dir + "/e.gguf")
        XCTAssertEqual(try ImportanceMatrix(path: dir + "/e.gguf"), m)
        XCTAssertEqual(try GGUFFile(path: dir + "/e.gguf").info("blk.0.ffn_down_exps.weight.in_sum2")?.dims, [3, 3])
        XCTAssertEqual(try m.importance(of: "blk.0.ffn_down_exps.weight", columns: 3, experts: 3), e.means)
        XCTAssertThrowsError(try m.importance(of: "blk.0.ffn_down_exps.weight", columns: 3))
    }

    /// Watching the products changes nothing; splitting a chunk into batches changes only the
    /// order of the sums; the output matrix is collected only when asked, over every position.
    func testCollectionDoesNotChangeTheModel() throws {
        let path = Fixtures.root + "/gguf/llama-f32.gguf"
        let backend = CPUBackend()
        let model = try ModelRegistry.load(directory: path, backend: backend)
        let seq = Array(0..<40)
        let plain = try allLogits(model, seq)
        backend.productObserver = ImportanceCollector()
        XCTAssertEqual(try allLogits(model, seq), plain)

        let whole = try collect(path, chunks: 2), pieces = try collect(path, batch: 24, chunks: 2)
        XCTAssertEqual(whole.perplexity.perplexity, pieces.perplexity.perplexity, accuracy: 1e-4 * whole.perplexity.perplexity)
        for (name, e) in whole.matrix.entries {
            assertClose(try XCTUnwrap(pieces.matrix.entries[name]), e.sums.map(Double.init), count: 256, relative: 1e-4, name)
        }
        XCTAssertNil(whole.matrix.entries["output.weight"])
        let output = try collect(path, includeOutput: true, chunks: 2).matrix
        XCTAssertEqual(output.entries["output.weight"]?.counts, [256])
        XCTAssertEqual(output.entries.count, whole.matrix.entries.count + 1)
    }

    func testBadFiles() throws {
        let dir = try Fixtures.tempDirectory(self)
        func fails(_ bytes: [UInt8], _ message: String, file: StaticString = #filePath, line: UInt = #line) {
            let path = dir + "/bad"
            _ = FileManager.default.createFile(atPath: path, contents: Data(bytes))
            XCTAssertThrowsError(try ImportanceMatrix(path: path), file: file, line: line) { e in
                XCTAssertTrue("\(e)".contains(message), "'\(e)' lacks '\(message)'", file: file, line: line)
            }
        }
        func i32(_ v: Int32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        let legacy = try FileSystem.read(Self.dir + "/llama-f32.imatrix.dat")
        fails([], "truncated")
        fails(i32(0) + i32(0), "0 entries")
        fails(i32(1_000_000), "1000000 entries")
        fails(Array(legacy.prefix(1000)), "truncated")
        fails(Array(legacy.prefix(100)), "14 entries")
        fails(i32(1) + i32(5) + Array("abcde".utf8) + i32(1) + i32(-4) + [UInt8](repeating: 0, count: 16), "has -4 values")
        fails(i32(1) + i32(-7) + [UInt8](repeating: 0, count: 16), "name of -7 bytes")
        fails(i32(1) + i32(1) + Array("a".utf8) + i32(1) + i32(1) + i32(Int32(bitPattern: Float.nan.bitPattern)), "not finite")
        // A GGUF file that is not an importance matrix.
        XCTAssertThrowsError(try ImportanceMatrix(path: Fixtures.root + "/gguf/llama-q4_0.gguf")) { e in
            XCTAssertTrue("\(e)".contains("not an importance matrix"), "\(e)")
        }
        // A matrix of another model.
        let m = try ImportanceMatrix(path: Self.dir + "/llama-f32.imatrix.gguf")
        XCTAssertThrowsError(try ModelQuantizer(mix: .q4_0, importance: m).quantize(source: Fixtures.root + "/gguf/llama256-f16.gguf",
                                                                                    output: dir + "/x.gguf")) { e in
            XCTAssertTrue("\(e)".contains("collected on another model"), "\(e)")
        }
        XCTAssertFalse(FileManager.default.fileExists(atPath: dir + "/x.gguf"))
    }

    /// A file quantized with a matrix records it as llama.cpp's quantizer does, and the weights
    /// it weighted are closer to the source under that weighting.
    func testQuantizeRecordsTheMatrix() throws {
        let dir = try Fixtures.tempDirectory(self)
        let path = Self.dir + "/llama256-f16.imatrix.gguf"
        let m = try ImportanceMatrix(path: path)
        let summary = try ModelQuantizer(mix: .q4_K_M, importance: m, importanceFile: path)
            .quantize(source: Fixtures.root + "/gguf/llama256-f16.gguf", output: dir + "/w.gguf")
        XCTAssertEqual(summary.weightedTensors, 14)
        let g = try GGUFFile(path: dir + "/w.gguf")
        XCTAssertEqual(g.metadata["quantize.imatrix.file"], .string(path))
        XCTAssertEqual(g.metadata["quantize.imatrix.entries_count"], .uint(14))
        XCTAssertEqual(g.metadata["quantize.imatrix.chunks_count"], .uint(9))
        XCTAssertNotNil(g.metadata["quantize.imatrix.dataset"])
    }
}
