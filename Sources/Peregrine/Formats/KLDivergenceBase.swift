import Foundation

/// A model's token distributions over a text, kept to compare another model against (the file
/// `--kl-divergence-base` names), in llama-perplexity's layout so files go both ways:
///
/// - the 8 bytes `_logits_`; u32 context (tokens per chunk); i32 vocabulary; i32 chunks;
/// - the text's tokens, chunks x context i32 (as tokenized; each chunk's first token is replaced
///   by BOS when evaluated);
/// - for each chunk, for each scored position (context/2 ... context - 2, predicting the next
///   token), one row of 2 x ceil(vocabulary / 2) + 4 u16: two f32 (scale, least log-probability)
///   in the first four, then each token's log-probability as log p = scale x q + least, q in
///   0...65535; log-probabilities more than 16 below the largest logit's are stored as the least.
public final class KLDivergenceBase {
    public let path: String
    public let context: Int
    public let vocabulary: Int
    public let chunks: Int
    public let tokens: [Int]
    private let file: MappedFile
    private let rowsStart: Int

    static let magic = Array("_logits_".utf8)

    /// Scored positions of a chunk (and rows stored for it).
    public static func rowsPerChunk(context: Int) -> Int { context - 1 - context / 2 }
    /// u16 values of a row: the header's two floats and the vocabulary rounded up to even.
    public static func rowValues(vocabulary: Int) -> Int { 2 * ((vocabulary + 1) / 2) + 4 }

    public var rowsPerChunk: Int { Self.rowsPerChunk(context: context) }

    public init(path: String) throws {
        self.path = path
        file = try MappedFile(path: path)
        var r = BinaryReader(file.bytes, what: "\(path): not a file of token distributions (llama-perplexity --kl-divergence-base)")
        let head = try r.take(8)
        guard Array(file.bytes[head..<(head + 8)]) == Self.magic else { throw r.error("it does not start with _logits_") }
        let context = Int(try r.u32()), vocabulary = Int(try r.i32()), chunks = Int(try r.i32())
        guard context >= 4, context <= 1 << 20, vocabulary >= 1, vocabulary <= 1 << 24, chunks >= 1 else {
            throw r.error("context \(context), vocabulary \(vocabulary), \(chunks) chunks")
        }
        let tokenCount = context * chunks
        guard tokenCount <= r.remaining / 4 else { throw r.error("\(tokenCount) tokens do not fit in the file") }
        let start = try r.take(4 * tokenCount)
        var tokens: [Int] = []
        tokens.reserveCapacity(tokenCount)
        for i in 0..<tokenCount {
            let t = Int(Int32(littleEndian: file.bytes.loadUnaligned(fromByteOffset: start + 4 * i, as: Int32.self)))
            guard t >= 0, t < vocabulary else { throw r.error("token \(t) at \(i) is outside the vocabulary of \(vocabulary)") }
            tokens.append(t)
        }
        let rowBytes = 2 * Self.rowValues(vocabulary: vocabulary)
        let expected = chunks * Self.rowsPerChunk(context: context) * rowBytes
        guard r.remaining == expected else {
            throw r.error("\(r.remaining) bytes of distributions where \(chunks) chunks of \(Self.rowsPerChunk(context: context)) rows take \(expected)")
        }
        self.context = context
        self.vocabulary = vocabulary
        self.chunks = chunks
        self.tokens = tokens
        rowsStart = r.pos
    }

    /// The stored row of scored position `index` (0 is position context/2) of chunk `chunk`.
    public func row(chunk: Int, index: Int) -> EncodedRow {
        precondition(chunk >= 0 && chunk < chunks && index >= 0 && index < rowsPerChunk)
        let n = Self.rowValues(vocabulary: vocabulary)
        let p = file.base! + rowsStart + 2 * n * (chunk * rowsPerChunk + index)
        return EncodedRow(values: UnsafeBufferPointer(start: p.assumingMemoryBound(to: UInt16.self), count: n), vocabulary: vocabulary)
    }

    /// One row: its scale and least log-probability, and a u16 per token.
    public struct EncodedRow {
        /// The whole row, header included (u16, little-endian as on every machine Peregrine runs on).
        public let values: UnsafeBufferPointer<UInt16>
        public let vocabulary: Int

        public var scale: Float { Float(bitPattern: UInt32(values[0]) | UInt32(values[1]) << 16) }
        public var least: Float { Float(bitPattern: UInt32(values[2]) | UInt32(values[3]) << 16) }
        @inline(__always) public func logProbability(_ token: Int) -> Float { scale * Float(values[4 + token]) + least }
    }

    /// Encodes a row of logits into `out` (`rowValues(vocabulary:)` u16): log-probabilities
    /// from the largest logit down to 16 below it in 65536 steps. Returns -log p of `target`
    /// computed from the logits.
    @discardableResult
    public static func encode(_ logits: UnsafeBufferPointer<Float>, target: Int, into out: UnsafeMutablePointer<UInt16>) -> Double {
        var hi = logits[0], lo = logits[0]
        for v in logits { hi = max(hi, v); lo = min(lo, v) }
        lo = max(lo, hi - 16)
        var sum = 0.0
        for v in logits { sum += Double(Foundation.exp(v - hi)) }
        let logSum = Float(Foundation.log(sum))
        let least = lo - hi - logSum
        let scale = (hi - lo) / 65535
        let s = scale.bitPattern, l = least.bitPattern
        out[0] = UInt16(truncatingIfNeeded: s); out[1] = UInt16(truncatingIfNeeded: s >> 16)
        out[2] = UInt16(truncatingIfNeeded: l); out[3] = UInt16(truncatingIfNeeded: l >> 16)
        let n = rowValues(vocabulary: logits.count)
        if scale > 0 {
            let inverse = 1 / scale
            for (i, v) in logits.enumerated() {
                out[4 + i] = v > lo ? UInt16(min(65535, max(0, (inverse * (v - lo)).rounded(.toNearestOrEven)))) : 0
            }
        } else {
            for i in 0..<logits.count { out[4 + i] = 0 }
        }
        for i in (4 + logits.count)..<n { out[i] = 0 }
        return Double(hi + logSum - logits[target])
    }
}

/// Writes a `KLDivergenceBase` file row by row as a text is scored; `finish()` checks that
/// every row came and moves the file into place.
public final class KLDivergenceBaseWriter {
    public let context: Int
    public let vocabulary: Int
    public let chunks: Int
    private let file: OutputFile
    private var row: [UInt16]
    private var rowsWritten = 0

    /// `tokens`: the text's first chunks x context tokens, as tokenized.
    public init(path: String, context: Int, vocabulary: Int, chunks: Int, tokens: ArraySlice<Int>) throws {
        guard tokens.count == context * chunks else {
            throw PeregrineError.invalidArgument("\(tokens.count) tokens for \(chunks) chunks of \(context)")
        }
        self.context = context
        self.vocabulary = vocabulary
        self.chunks = chunks
        file = try OutputFile(path: path)
        row = [UInt16](repeating: 0, count: KLDivergenceBase.rowValues(vocabulary: vocabulary))
        var header = KLDivergenceBase.magic
        for v in [UInt32(context), UInt32(vocabulary), UInt32(chunks)] { withUnsafeBytes(of: v.littleEndian) { header.append(contentsOf: $0) } }
        for t in tokens { withUnsafeBytes(of: Int32(t).littleEndian) { header.append(contentsOf: $0) } }
        try file.write(header)
    }

    /// The next scored row's logits.
    public func append(_ logits: UnsafeBufferPointer<Float>, target: Int) throws {
        guard logits.count == vocabulary else { throw PeregrineError.invalidArgument("a row of \(logits.count) logits, the vocabulary has \(vocabulary)") }
        guard rowsWritten < chunks * KLDivergenceBase.rowsPerChunk(context: context) else {
            throw PeregrineError.invalidArgument("more rows than \(chunks) chunks hold")
        }
        row.withUnsafeMutableBufferPointer { _ = KLDivergenceBase.encode(logits, target: target, into: $0.baseAddress!) }
        try row.withUnsafeBufferPointer { try file.write($0) }
        rowsWritten += 1
    }

    public func finish() throws {
        let expected = chunks * KLDivergenceBase.rowsPerChunk(context: context)
        guard rowsWritten == expected else { throw PeregrineError.invalidArgument("\(rowsWritten) rows written of \(expected)") }
        try file.finish()
    }
}
