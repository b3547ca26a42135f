/// An importance matrix: for each input column of each weight's matrix products, the squared
/// activations summed over calibration text and how many rows (tokens) were summed, as
/// llama.cpp's `llama-imatrix` computes them. Files are llama.cpp's, both ways, in either of its
/// two formats:
///
/// - GGUF (llama.cpp's default): metadata `general.type` = "imatrix", `imatrix.datasets`
///   (strings), `imatrix.chunk_count` and `imatrix.chunk_size` (u32); per weight, in name
///   order, an F32 tensor `<weight>.in_sum2` [columns, experts] of sums and an F32 tensor
///   `<weight>.counts` [1, experts] of rows summed.
/// - Legacy binary (`.dat`): i32 entry count; per entry i32 name length, the name, i32 chunk
///   count c, i32 value count, then the values as f32 means times c; after the entries an i32
///   chunk count and an i32-length dataset name. Sums here are those scaled means and counts
///   [c], so that sums / counts is the mean in both formats.
///
/// Weights are named as in GGUF files (`blk.0.attn_q.weight`); a layer's routed experts share
/// one entry with a count per expert.
public struct ImportanceMatrix: Equatable, Sendable {
    public struct Entry: Equatable, Sendable {
        /// Expert after expert, `columns` values each: the summed squares.
        public var sums: [Float]
        /// Rows summed for each expert (one count for a dense weight).
        public var counts: [Int]

        public init(sums: [Float], counts: [Int]) {
            self.sums = sums
            self.counts = counts
        }

        /// The mean squared activation of each column, expert after expert; an expert that saw no
        /// rows gets 1 everywhere (every column equally important), as llama.cpp's quantizer does.
        /// A legacy file's single count applies to every expert.
        public var means: [Float] {
            guard !counts.isEmpty, sums.count % counts.count == 0 else { return [] }
            let block = sums.count / counts.count
            return sums.indices.map { i in
                let c = counts[i / block]
                return c > 0 ? sums[i] / Float(c) : 1
            }
        }
    }

    public enum FileFormat: String, Sendable, CaseIterable {
        case gguf, dat
    }

    public var entries: [String: Entry]
    /// The calibration texts, as the collecting command was given them.
    public var datasets: [String]
    /// Chunks of `chunkSize` tokens the sums cover.
    public var chunkCount: Int
    /// Tokens per chunk (0 when a legacy file was read: it does not say).
    public var chunkSize: Int
    /// Read from a legacy file: sums are scaled means and counts are chunk counts.
    public var isLegacy: Bool

    public init(entries: [String: Entry] = [:], datasets: [String] = [], chunkCount: Int = 0, chunkSize: Int = 0, isLegacy: Bool = false) {
        self.entries = entries
        self.datasets = datasets
        self.chunkCount = chunkCount
        self.chunkSize = chunkSize
        self.isLegacy = isLegacy
    }

    /// Per-column importance of a weight whose rows hold `columns` values (times `experts` for
    /// stacked experts): the entry's means. Nil when the matrix has no entry for it; an entry of
    /// another size is an error (the matrix was collected on another model).
    public func importance(of weight: String, columns: Int, experts: Int = 1) throws -> [Float]? {
        guard let e = entries[weight] else { return nil }
        guard e.sums.count == columns * experts else {
            throw PeregrineError.invalidArgument(
                "the importance matrix has \(e.sums.count) values for '\(weight)', whose rows have \(columns * experts): it was collected on another model")
        }
        return e.means
    }

    // MARK: Reading

    /// Reads either format: GGUF when the file starts with GGUF's magic, the legacy one otherwise.
    public init(path: String) throws {
        let file = try MappedFile(path: path)
        if file.size >= 4, file.bytes.loadUnaligned(as: UInt32.self) == UInt32(0x4655_4747).littleEndian {
            try self.init(gguf: try GGUFFile(path: path))
        } else {
            try self.init(legacy: file.bytes, path: path)
        }
    }

    init(gguf g: GGUFFile) throws {
        func bad(_ m: String) -> PeregrineError { .format("\(g.path): not an importance matrix: \(m)") }
        var sums: [String: GGUFFile.TensorInfo] = [:], counts: [String: GGUFFile.TensorInfo] = [:]
        for t in g.tensors {
            if t.name.hasSuffix(".in_sum2") {
                sums[String(t.name.dropLast(".in_sum2".count))] = t
            } else if t.name.hasSuffix(".counts") {
                counts[String(t.name.dropLast(".counts".count))] = t
            }
        }
        guard !sums.isEmpty || !counts.isEmpty else { throw bad("no <weight>.in_sum2 and <weight>.counts tensors") }
        var entries: [String: Entry] = [:]
        for name in Set(sums.keys).union(counts.keys) {
            guard let s = sums[name], let c = counts[name] else { throw bad("'\(name)' lacks its sums or its counts") }
            guard s.type == .f32, c.type == .f32 else { throw bad("the sums and counts of '\(name)' must be F32") }
            guard c.elementCount >= 1, s.elementCount % c.elementCount == 0 else {
                throw bad("'\(name)' has \(s.elementCount) sums for \(c.elementCount) counts")
            }
            let sumValues = Self.floats(g, s), countValues = Self.floats(g, c)
            guard sumValues.allSatisfy(\.isFinite) else { throw bad("'\(name)' has sums that are not finite") }
            guard countValues.allSatisfy({ $0.isFinite && $0 >= 0 && $0 < 1e15 }) else { throw bad("'\(name)' has invalid counts") }
            entries[name] = Entry(sums: sumValues, counts: countValues.map { Int($0.rounded()) })
        }
        func count(_ key: String) throws -> Int {
            guard let v = g.metadata[key] else { return 0 }
            guard let n = v.int, n >= 0 else { throw bad("\(key) is not a count") }
            return n
        }
        let datasets = g.metadata["imatrix.datasets"]?.array?.compactMap(\.string) ?? []
        self.init(entries: entries, datasets: datasets, chunkCount: try count("imatrix.chunk_count"),
                  chunkSize: try count("imatrix.chunk_size"))
    }

    private static func floats(_ g: GGUFFile, _ t: GGUFFile.TensorInfo) -> [Float] {
        guard let data = g.data(t.name) else { return [] }
        return (0..<t.elementCount).map { Float(bitPattern: UInt32(littleEndian: data.loadUnaligned(fromByteOffset: 4 * $0, as: UInt32.self))) }
    }

    init(legacy bytes: UnsafeRawBufferPointer, path: String) throws {
        var r = BinaryReader(bytes, what: "\(path): not an importance matrix (GGUF or llama.cpp's legacy format)")
        let n = Int(try r.i32())
        // Each entry takes at least 16 bytes.
        guard n >= 1, n <= r.remaining / 16 else { throw r.error("\(n) entries") }
        var entries: [String: Entry] = [:]
        for _ in 0..<n {
            let length = Int(try r.i32())
            guard length >= 1, length <= 4096 else { throw r.error("a weight name of \(length) bytes at byte \(r.pos - 4)") }
            let name = try r.string(length)
            let calls = Int(try r.i32())
            let count = Int(try r.i32())
            guard calls >= 0 else { throw r.error("'\(name)' has a negative chunk count") }
            guard count >= 1 else { throw r.error("'\(name)' has \(count) values") }
            let values = try r.floats(count)
            guard values.allSatisfy(\.isFinite) else { throw r.error("'\(name)' has values that are not finite") }
            guard entries.updateValue(Entry(sums: values, counts: [calls]), forKey: name) == nil else {
                throw r.error("'\(name)' appears twice")
            }
        }
        var chunks = 0, datasets: [String] = []
        // The chunk count and dataset name after the entries are optional.
        if r.remaining >= 4 {
            chunks = max(0, Int(try r.i32()))
            if r.remaining >= 4 {
                let length = Int(try r.i32())
                if length > 0, length <= r.remaining { datasets.append(try r.string(length)) }
            }
        }
        self.init(entries: entries, datasets: datasets, chunkCount: chunks, chunkSize: 0, isLegacy: true)
    }

    // MARK: Writing

    /// Writes the matrix in `format` (llama.cpp writes GGUF unless asked for the legacy format).
    public func write(to path: String, format: FileFormat = .gguf) throws {
        switch format {
        case .gguf: try writeGGUF(to: path)
        case .dat: try writeLegacy(to: path)
        }
    }

    private func writeGGUF(to path: String) throws {
        var w = GGUFWriter()
        w.padsLastTensor = true
        w.set("general.type", .string("imatrix"))
        w.set("imatrix.datasets", .strings(datasets))
        w.set("imatrix.chunk_count", .u32(UInt32(clamping: chunkCount)))
        w.set("imatrix.chunk_size", .u32(UInt32(clamping: chunkSize)))
        for name in entries.keys.sorted() {
            let e = entries[name]!
            guard !e.counts.isEmpty, !e.sums.isEmpty, e.sums.count % e.counts.count == 0 else { continue }
            let experts = e.counts.count
            w.tensors.append(GGUFWriter.Tensor(name: name + ".in_sum2", dims: [e.sums.count / experts, experts], type: .f32) { out in
                e.sums.withUnsafeBytes { out.copyMemory(from: $0) }
            })
            w.tensors.append(GGUFWriter.Tensor(name: name + ".counts", dims: [1, experts], type: .f32) { out in
                e.counts.map { Float($0) }.withUnsafeBytes { out.copyMemory(from: $0) }
            })
        }
        try w.write(to: path)
    }

    /// llama.cpp's legacy layout: per entry the means times c, c = the entry's largest count in
    /// chunks, rounded up (the chunk count itself for a legacy matrix); entries that saw no rows
    /// are left out, and an expert that saw none is stored as 1s.
    private func writeLegacy(to path: String) throws {
        var bytes = ByteWriter()
        var stored: [(String, Entry)] = []
        for name in entries.keys.sorted() {
            let e = entries[name]!
            guard !e.counts.isEmpty, e.counts.contains(where: { $0 > 0 }), !e.sums.isEmpty, e.sums.count % e.counts.count == 0 else { continue }
            stored.append((name, e))
        }
        bytes.u32(UInt32(stored.count))
        for (name, e) in stored {
            let most = e.counts.max()!
            let calls = isLegacy || chunkSize <= 0 ? most : (most + chunkSize - 1) / chunkSize
            bytes.u32(UInt32(name.utf8.count))
            bytes.bytes.append(contentsOf: name.utf8)
            bytes.u32(UInt32(clamping: calls))
            bytes.u32(UInt32(e.sums.count))
            let block = e.sums.count / e.counts.count
            for (i, s) in e.sums.enumerated() {
                let c = e.counts[i / block]
                let mean: Float = c > 0 ? s / Float(c) : 1
                bytes.u32((mean * Float(calls)).bitPattern)
            }
        }
        bytes.u32(UInt32(clamping: chunkCount))
        let dataset = datasets.last ?? ""
        bytes.u32(UInt32(dataset.utf8.count))
        bytes.bytes.append(contentsOf: dataset.utf8)
        let f = try OutputFile(path: path)
        try f.write(bytes.bytes)
        try f.finish()
    }
}
