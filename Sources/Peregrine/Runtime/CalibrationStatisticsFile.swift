import Foundation

/// Calibration statistics kept in a file, so that quantizing one model to several types (or
/// with other GPTQ/AWQ settings) runs the model over the calibration text once. The file is
/// tied to the text and the chunking it came from: loading it with other ones is an error.
///
/// Layout (little-endian): the magic `PGCALIB1`; the text's 64-bit FNV-1a hash; the context,
/// the chunk limit asked for (0: none), the chunks and tokens read (u32 each); the number of
/// groups (u32). Each group is one set of statistics and the weights that share it: the number
/// of names (u32), each name as a u32 length and UTF-8 bytes; the columns (u32) and rows (u64);
/// the per-column sums of |x| (f64 each); the upper triangle of X^T X row by row (f64 each).
public enum CalibrationStatisticsFile {
    static let magic = Array("PGCALIB1".utf8)

    /// What the statistics were made from; a file is used only for the same.
    public struct Origin: Equatable, Sendable {
        public var textHash: UInt64
        public var context: Int
        public var maxChunks: Int?

        public init(text: String, context: Int, maxChunks: Int?) {
            var h: UInt64 = 0xcbf2_9ce4_8422_2325
            for b in text.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
            textHash = h
            self.context = context
            self.maxChunks = maxChunks
        }
    }

    public struct Contents {
        public var origin: Origin
        public var chunks: Int
        public var tokens: Int
        public var statistics: [String: InputStatistics]
    }

    public static func write(_ statistics: [String: InputStatistics], origin: Origin, chunks: Int, tokens: Int, to path: String) throws {
        var out = Data(magic)
        func u32(_ v: Int) { var x = UInt32(truncatingIfNeeded: v).littleEndian; withUnsafeBytes(of: &x) { out.append(contentsOf: $0) } }
        func u64(_ v: UInt64) { var x = v.littleEndian; withUnsafeBytes(of: &x) { out.append(contentsOf: $0) } }
        u64(origin.textHash)
        u32(origin.context); u32(origin.maxChunks ?? 0); u32(chunks); u32(tokens)
        // One group per shared object, names sorted so the file does not depend on hashing order.
        var groups: [ObjectIdentifier: (InputStatistics, [String])] = [:]
        for (name, s) in statistics { groups[ObjectIdentifier(s), default: (s, [])].1.append(name) }
        let ordered = groups.values.map { ($0.0, $0.1.sorted()) }.sorted { $0.1[0] < $1.1[0] }
        u32(ordered.count)
        for (s, names) in ordered {
            u32(names.count)
            for n in names { let b = Array(n.utf8); u32(b.count); out.append(contentsOf: b) }
            u32(s.columns); u64(UInt64(s.rows))
            s.absoluteSums.withUnsafeBytes { out.append(contentsOf: $0) }
            var triangle = [Double](); triangle.reserveCapacity(s.columns * (s.columns + 1) / 2)
            for i in 0..<s.columns { triangle.append(contentsOf: s.xtx[(i * s.columns + i)..<((i + 1) * s.columns)]) }
            triangle.withUnsafeBytes { out.append(contentsOf: $0) }
        }
        do { try out.write(to: URL(fileURLWithPath: path), options: .atomic) } catch {
            throw PeregrineError.io("\(path): cannot write the calibration statistics (\(error.localizedDescription))")
        }
    }

    public static func read(_ path: String) throws -> Contents {
        guard let data = FileManager.default.contents(atPath: path) else { throw PeregrineError.io("\(path): cannot read the file") }
        return try parse([UInt8](data), path: path)
    }

    /// Reads the file's bytes; every count is checked against the bytes left before anything is
    /// allocated for it.
    public static func parse(_ bytes: [UInt8], path: String) throws -> Contents {
        var at = 0
        func fail(_ why: String) -> PeregrineError { .format("\(path): not a calibration statistics file of this version (\(why))") }
        func take(_ n: Int) throws -> ArraySlice<UInt8> {
            guard n >= 0, n <= bytes.count - at else { throw fail("it ends early") }
            defer { at += n }
            return bytes[at..<(at + n)]
        }
        func u32() throws -> Int { try take(4).reversed().reduce(0) { $0 << 8 | Int($1) } }
        func u64() throws -> UInt64 { try take(8).reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } }
        func doubles(_ n: Int) throws -> [Double] {
            guard n >= 0, n <= (bytes.count - at) / 8 else { throw fail("it ends early") }
            let slice = try take(8 * n)
            return slice.withUnsafeBytes { raw in (0..<n).map { Double(bitPattern: UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: 8 * $0, as: UInt64.self))) } }
        }
        guard Array(try take(magic.count)) == magic else { throw fail("no PGCALIB1 magic") }
        let hash = try u64()
        let context = try u32(), maxChunks = try u32(), chunks = try u32(), tokens = try u32()
        let groupCount = try u32()
        var statistics: [String: InputStatistics] = [:]
        for _ in 0..<min(groupCount, bytes.count) {
            let nameCount = try u32()
            guard nameCount >= 1, nameCount <= 64 else { throw fail("a group of \(nameCount) weights") }
            var names: [String] = []
            for _ in 0..<nameCount {
                let length = try u32()
                guard length >= 1, length <= 4096, let name = String(bytes: try take(length), encoding: .utf8) else { throw fail("a bad weight name") }
                guard statistics[name] == nil, !names.contains(name) else { throw fail("'\(name)' twice") }
                names.append(name)
            }
            let columns = try u32(), rows = try u64()
            guard columns >= 1, columns <= 1 << 17, rows <= 1 << 40 else { throw fail("\(columns) columns, \(rows) rows") }
            guard columns * (columns + 3) / 2 <= (bytes.count - at) / 8 else { throw fail("it ends early") }
            let s = InputStatistics(columns: columns)
            s.absoluteSums = try doubles(columns)
            let triangle = try doubles(columns * (columns + 1) / 2)
            var k = 0
            for i in 0..<columns {
                for j in i..<columns { s.xtx[i * columns + j] = triangle[k]; k += 1 }
            }
            s.finish()
            s.rows = Int(rows)
            for n in names { statistics[n] = s }
        }
        guard statistics.count > 0 || groupCount == 0 else { throw fail("no groups") }
        guard at == bytes.count else { throw fail("\(bytes.count - at) bytes after the last group") }
        var origin = Origin(text: "", context: context, maxChunks: maxChunks == 0 ? nil : maxChunks)
        origin.textHash = hash
        return Contents(origin: origin, chunks: chunks, tokens: tokens, statistics: statistics)
    }
}
