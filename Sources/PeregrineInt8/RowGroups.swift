/// Weights of the block types repacked at load into groups of eight rows, the layout of the
/// row-group kernels (PeregrineVNNI's `RowGroupKernels`). In the layout as stored, a product
/// pays its per-block work (the sign trick of an unsigned-by-signed multiply, the int-to-float
/// conversion, the scale) for every row and token; with eight rows side by side, one 32-bit lane
/// per row, each token's four activation bytes are broadcast once and one multiply-accumulate
/// serves eight rows, and the per-block work is shared by the eight (as llama.cpp's repacked
/// CPU buffers do).
///
/// A group's block b holds, for its rows r = 0...7:
/// - bytes 0..<16: the eight rows' f16 scales;
/// - then the values as unsigned bytes in dwords, dword r of each 32-byte vector being row r's:
///   - Q8_0: eight vectors, vector c holding values 4c..<4c+4 plus 128 (the value xor 0x80);
///   - Q4_0 and IQ4_NL: four vectors, vector j holding the row's nibble bytes 4j..<4j+4 as
///     stored, whose low nibbles are values 4j..<4j+4 and high nibbles values 16+4j..<16+4j+4;
///   - Q5_0: Q4_0's four vectors, then one of fifth bits, byte b of row r holding at bit u the
///     fifth bit of value 4u + b.
/// Each type's unsigned values are its signed values plus an offset (128 for Q8_0 and IQ4_NL's
/// levels, 8 for Q4_0's nibbles, 16 for Q5_0's) that the kernel takes back with the activations' integer sum,
/// so every block's integer product is exact and the same as the row kernels'.
///
/// Q4_K has blocks of 256 values per row; a group's block holds the eight rows' d (f16, bytes
/// 0..<16) and dmin (16..<32); their 6-bit sub-block scales as bytes, sub-block j's eight at
/// 32 + 8j; their mins as int16 pairs, vector p (at 96 + 32p) holding row r's mins of sub-blocks
/// 2p and 2p + 1 in its dword r; then 32 vectors of nibble bytes (at 224), vector 8c + u holding
/// row r's bytes 32c + 4u..<32c + 4u + 4 as stored, whose low nibbles are values 4u..<4u + 4 of
/// sub-block 2c and high nibbles those of sub-block 2c + 1. Q5_K's blocks are Q4_K's followed by
/// eight vectors of fifth bits (at 1248), vector j's byte b of row r holding at bit u the fifth
/// bit of value 4u + b of sub-block j.
///
/// IQ4_XS (256 values, eight sub-blocks of 32 with signed 6-bit scales): a group's block holds
/// the rows' d (f16, bytes 0..<16); their sub-block scales as signed bytes, sub-block j's eight
/// at 16 + 8j; then per sub-block four vectors of nibble bytes (at 80 + 128j), vector u's dword
/// r holding row r's bytes 4u..<4u + 4 of the sub-block as stored (low nibbles: values
/// 4u..<4u + 4, high nibbles: 16 + 4u..<16 + 4u + 4). The kernel looks the levels up plus 128.
///
/// Q6_K (256 values, 16 sub-blocks of 16 with signed 8-bit scales, 6-bit values offset by 32): a
/// group's block holds the rows' d (f16, bytes 0..<16); their scales as int16 pairs, vector p (at
/// 16 + 32p) holding row r's scales of sub-blocks 2p and 2p + 1 in dword r; then per sub-block s
/// two vectors of low nibbles (at 272 + 64s), vector h's byte b of row r holding value 4h + b of
/// the sub-block in its low nibble and value 8 + 4h + b in its high one; then per sub-block one
/// vector of top bits (at 1296 + 32s), byte b of row r holding value 4k + b's two top bits at
/// bits 2k, 2k + 1 for k = 0...3.
///
/// Q3_K (the same sub-blocks, 3-bit values offset by 4, 6-bit signed scales) keeps Q6_K's first
/// 272 bytes (d, scale pairs); then per sub-block s one vector (at 272 + 32s) whose byte b of row
/// r holds value 4k + b's low two bits at bits 2k, 2k + 1; then per pair of sub-blocks one vector
/// (at 784 + 32p) whose byte b holds value 4k + b's third bit at bit k for sub-block 2p and bit
/// 4 + k for 2p + 1.
///
/// Q2_K (Q6_K's sub-blocks of 16, 2-bit values with no offset, unsigned 4-bit scales and mins): a
/// group's block holds the rows' d (f16, bytes 0..<16) and dmin (16..<32); their scales as int16
/// pairs, vector p (at 32 + 32p) holding row r's scales of sub-blocks 2p and 2p + 1 in dword r;
/// their mins the same way at 288 (taken off through the activations' 16-value sums); then per
/// sub-block s one vector (at 544 + 32s) laid out as Q3_K's low bits: byte b of row r holds value
/// 4k + b's two bits at bits 2k, 2k + 1.
public enum RowGroups {
    /// Rows per group.
    @inlinable public static var rows: Int { 8 }

    /// The types with a row-group layout.
    @inlinable public static func supports(_ type: Int8WeightType) -> Bool {
        type == .q8_0 || type == .q4_0 || type == .q5_0 || type == .iq4_nl || type == .q4_K || type == .q5_K || type == .q6_K || type == .q3_K || type == .q2_K || type == .iq4_xs
    }

    /// Whether the type's kernel takes activations with integer sums (`quantizeActivations`'
    /// `integerSums`); Q6_K, Q3_K and Q2_K take the sums of each 16 of the usual layout.
    @inlinable public static func integerSums(_ type: Int8WeightType) -> Bool { type != .q6_K && type != .q3_K && type != .q2_K }

    /// Values per row in one block.
    @inlinable public static func blockValues(_ type: Int8WeightType) -> Int { type.superBlocks ? 256 : 32 }

    /// Bytes of one group's block (`blockValues` values per row).
    @inlinable public static func blockBytes(_ type: Int8WeightType) -> Int {
        switch type {
        case .q8_0: return 16 + 256
        case .q4_K: return 32 + 64 + 128 + 1024
        case .q5_K: return 32 + 64 + 128 + 1024 + 256
        case .q6_K: return 16 + 256 + 1024 + 512
        case .q3_K: return 16 + 256 + 512 + 256
        case .q2_K: return 32 + 256 + 256 + 512
        case .q5_0: return 16 + 128 + 32
        case .iq4_xs: return 16 + 64 + 1024
        default: return 16 + 128
        }
    }

    /// Bytes of a matrix of `rows` (a multiple of 8) rows of `k` values in row groups.
    @inlinable public static func byteCount(_ type: Int8WeightType, rows: Int, k: Int) -> Int {
        rows / 8 * (k / blockValues(type)) * blockBytes(type)
    }

    /// Repacks the row groups `groups` of a matrix stored row after row (`rowBytes` apart) into
    /// `dst` (`byteCount` bytes in all): each group's block b takes block b of its eight rows.
    public static func repack(_ type: Int8WeightType, _ src: UnsafeRawPointer, rowBytes: Int, k: Int, groups: Range<Int>,
                              into dst: UnsafeMutableRawPointer) {
        precondition(supports(type), "no row-group layout for \(type)")
        let blocks = k / blockValues(type), gb = blockBytes(type), stored = rowBytes / blocks
        // Q6_K's and Q3_K's values of one row's block, in order.
        var values = [UInt8](repeating: 0, count: 256)
        for g in groups {
            for b in 0..<blocks {
                let out = dst + (g &* blocks &+ b) &* gb
                for r in 0..<8 {
                    let row: Int = (g &* 8 &+ r) &* rowBytes
                    let block: UnsafeRawPointer = src + (row &+ b &* stored)
                    switch type {
                    case .q8_0: packQ8_0(block, out, r)
                    case .q4_0, .iq4_nl: packNibbles(block, at: 2, out, r)
                    case .q5_0: packQ5_0(block, out, r)
                    case .q4_K, .q5_K: packKQuant(block, out, r, five: type == .q5_K)
                    case .q6_K: packQ6_K(block, out, r, &values)
                    case .q3_K: packQ3_K(block, out, r, &values)
                    case .q2_K: packQ2_K(block, out, r)
                    case .iq4_xs: packIQ4_XS(block, out, r)
                    default: preconditionFailure("no row-group layout for \(type)")
                    }
                }
            }
        }
    }

    // Each pack function writes row r's part of a group's block `out` from the row's stored block.

    static func packQ8_0(_ block: UnsafeRawPointer, _ out: UnsafeMutableRawPointer, _ r: Int) {
        out.storeBytes(of: block.loadUnaligned(as: UInt16.self), toByteOffset: 2 &* r, as: UInt16.self)
        for c in 0..<8 {
            let v = block.loadUnaligned(fromByteOffset: 2 &+ 4 &* c, as: UInt32.self) ^ 0x8080_8080
            out.storeBytes(of: v, toByteOffset: 16 &+ 32 &* c &+ 4 &* r, as: UInt32.self)
        }
    }

    /// The f16 scale at the block's start, and the 16 nibble bytes at offset `nibbles`.
    static func packNibbles(_ block: UnsafeRawPointer, at nibbles: Int, _ out: UnsafeMutableRawPointer, _ r: Int) {
        out.storeBytes(of: block.loadUnaligned(as: UInt16.self), toByteOffset: 2 &* r, as: UInt16.self)
        for j in 0..<4 {
            let v = block.loadUnaligned(fromByteOffset: nibbles &+ 4 &* j, as: UInt32.self)
            out.storeBytes(of: v, toByteOffset: 16 &+ 32 &* j &+ 4 &* r, as: UInt32.self)
        }
    }

    static func packQ5_0(_ block: UnsafeRawPointer, _ out: UnsafeMutableRawPointer, _ r: Int) {
        packNibbles(block, at: 6, out, r)
        let qh = block.loadUnaligned(fromByteOffset: 2, as: UInt32.self)
        for byte in 0..<4 {
            var bits: UInt8 = 0
            for u in 0..<8 { bits |= UInt8((qh >> UInt32(4 &* u &+ byte)) & 1) << UInt8(u) }
            out.storeBytes(of: bits, toByteOffset: 144 &+ 4 &* r &+ byte, as: UInt8.self)
        }
    }

    /// Q4_K, or Q5_K (`five`: 32 bytes of fifth bits between the scales and the nibbles, bit j
    /// of byte l being value l's of sub-block j).
    static func packKQuant(_ block: UnsafeRawPointer, _ out: UnsafeMutableRawPointer, _ r: Int, five: Bool) {
        out.storeBytes(of: block.loadUnaligned(as: UInt16.self), toByteOffset: 2 &* r, as: UInt16.self)
        out.storeBytes(of: block.loadUnaligned(fromByteOffset: 2, as: UInt16.self), toByteOffset: 16 &+ 2 &* r, as: UInt16.self)
        for j in 0..<8 {
            let (scale, min) = KQuant.scaleMin(block + 4, j)
            out.storeBytes(of: UInt8(scale), toByteOffset: 32 &+ 8 &* j &+ r, as: UInt8.self)
            out.storeBytes(of: Int16(min), toByteOffset: 96 &+ 32 &* (j >> 1) &+ 4 &* r &+ 2 &* (j & 1), as: Int16.self)
        }
        let qs = five ? 48 : 16
        for v in 0..<32 {
            let q = block.loadUnaligned(fromByteOffset: qs &+ 4 &* v, as: UInt32.self)
            out.storeBytes(of: q, toByteOffset: 224 &+ 32 &* v &+ 4 &* r, as: UInt32.self)
        }
        guard five else { return }
        for j in 0..<8 {
            for byte in 0..<4 {
                var bits: UInt8 = 0
                for u in 0..<8 {
                    let qh = block.load(fromByteOffset: 16 &+ 4 &* u &+ byte, as: UInt8.self)
                    bits |= ((qh >> UInt8(j)) & 1) << UInt8(u)
                }
                out.storeBytes(of: bits, toByteOffset: 1248 &+ 32 &* j &+ 4 &* r &+ byte, as: UInt8.self)
            }
        }
    }

    /// The d and int16 scale pairs Q6_K and Q3_K share.
    static func packSixteensHeader(_ d: UInt16, _ scale: (Int) -> Int, _ out: UnsafeMutableRawPointer, _ r: Int) {
        out.storeBytes(of: d, toByteOffset: 2 &* r, as: UInt16.self)
        for s in 0..<16 {
            out.storeBytes(of: Int16(scale(s)), toByteOffset: 16 &+ 32 &* (s >> 1) &+ 4 &* r &+ 2 &* (s & 1), as: Int16.self)
        }
    }

    static func packQ6_K(_ block: UnsafeRawPointer, _ out: UnsafeMutableRawPointer, _ r: Int, _ q: inout [UInt8]) {
        // The 6-bit values in order (ggml's layout: low nibbles in ql, top bits in qh).
        for half in 0..<2 {
            let ql = block + 64 &* half, qh = block + (128 &+ 32 &* half)
            for l in 0..<32 {
                let lo0 = ql.load(fromByteOffset: l, as: UInt8.self), lo1 = ql.load(fromByteOffset: l &+ 32, as: UInt8.self)
                let h = qh.load(fromByteOffset: l, as: UInt8.self)
                let e = 128 &* half &+ l
                q[e] = (lo0 & 0xF) | (h & 3) << 4
                q[e &+ 32] = (lo1 & 0xF) | ((h >> 2) & 3) << 4
                q[e &+ 64] = (lo0 >> 4) | ((h >> 4) & 3) << 4
                q[e &+ 96] = (lo1 >> 4) | ((h >> 6) & 3) << 4
            }
        }
        packSixteensHeader(block.loadUnaligned(fromByteOffset: 208, as: UInt16.self),
                           { Int(block.load(fromByteOffset: 192 &+ $0, as: Int8.self)) }, out, r)
        for s in 0..<16 {
            for byte in 0..<4 {
                for h in 0..<2 {
                    let v = q[16 &* s &+ 4 &* h &+ byte] & 0xF | (q[16 &* s &+ 8 &+ 4 &* h &+ byte] & 0xF) << 4
                    out.storeBytes(of: v, toByteOffset: 272 &+ 64 &* s &+ 32 &* h &+ 4 &* r &+ byte, as: UInt8.self)
                }
                var top: UInt8 = 0
                for c in 0..<4 { top |= (q[16 &* s &+ 4 &* c &+ byte] >> 4) << (2 &* c) }
                out.storeBytes(of: top, toByteOffset: 1296 &+ 32 &* s &+ 4 &* r &+ byte, as: UInt8.self)
            }
        }
    }

    static func packQ3_K(_ block: UnsafeRawPointer, _ out: UnsafeMutableRawPointer, _ r: Int, _ q: inout [UInt8]) {
        // The 3-bit values plus 4 in order (ggml's layout: two bits in qs, the third in hmask,
        // set where the value is not lowered by 4).
        var e = 0
        for half in 0..<2 {
            for j in 0..<4 {
                for second in 0..<2 {
                    for l in 0..<16 {
                        let i = 16 &* second &+ l
                        let two = (block.load(fromByteOffset: 32 &+ 32 &* half &+ i, as: UInt8.self) >> UInt8(2 &* j)) & 3
                        let third = (block.load(fromByteOffset: i, as: UInt8.self) >> UInt8(4 &* half &+ j)) & 1
                        q[e] = two | third << 2
                        e &+= 1
                    }
                }
            }
        }
        packSixteensHeader(block.loadUnaligned(fromByteOffset: 108, as: UInt16.self), { KQuant.q3Scale(block + 96, $0) }, out, r)
        for s in 0..<16 {
            for byte in 0..<4 {
                var low: UInt8 = 0
                var third: UInt8 = 0
                for c in 0..<4 {
                    let v = q[16 &* s &+ 4 &* c &+ byte]
                    low |= (v & 3) << UInt8(2 &* c)
                    third |= (v >> 2) << UInt8(c &+ 4 &* (s & 1))
                }
                out.storeBytes(of: low, toByteOffset: 272 &+ 32 &* s &+ 4 &* r &+ byte, as: UInt8.self)
                let at = 784 &+ 32 &* (s >> 1) &+ 4 &* r &+ byte
                let earlier = s & 1 == 0 ? 0 : out.load(fromByteOffset: at, as: UInt8.self)
                out.storeBytes(of: earlier | third, toByteOffset: at, as: UInt8.self)
            }
        }
    }

    static func packQ2_K(_ block: UnsafeRawPointer, _ out: UnsafeMutableRawPointer, _ r: Int) {
        // ggml's layout: scale (low nibble) and min (high) of sub-block s in byte s; value
        // 128h + 32j + l in bits 2j of qs byte 32h + l (qs at 16); d at 80, dmin at 82.
        out.storeBytes(of: block.loadUnaligned(fromByteOffset: 80, as: UInt16.self), toByteOffset: 2 &* r, as: UInt16.self)
        out.storeBytes(of: block.loadUnaligned(fromByteOffset: 82, as: UInt16.self), toByteOffset: 16 &+ 2 &* r, as: UInt16.self)
        @inline(__always) func value(_ i: Int) -> UInt8 {
            let h = i >> 7, j = (i >> 5) & 3, l = i & 31
            return (block.load(fromByteOffset: 16 &+ 32 &* h &+ l, as: UInt8.self) >> UInt8(2 &* j)) & 3
        }
        for s in 0..<16 {
            let sm = block.load(fromByteOffset: s, as: UInt8.self)
            let at = 32 &* (s >> 1) &+ 4 &* r &+ 2 &* (s & 1)
            out.storeBytes(of: Int16(sm & 15), toByteOffset: 32 &+ at, as: Int16.self)
            out.storeBytes(of: Int16(sm >> 4), toByteOffset: 288 &+ at, as: Int16.self)
            for byte in 0..<4 {
                var bits: UInt8 = 0
                for k in 0..<4 { bits |= value(16 &* s &+ 4 &* k &+ byte) << UInt8(2 &* k) }
                out.storeBytes(of: bits, toByteOffset: 544 &+ 32 &* s &+ 4 &* r &+ byte, as: UInt8.self)
            }
        }
    }

    static func packIQ4_XS(_ block: UnsafeRawPointer, _ out: UnsafeMutableRawPointer, _ r: Int) {
        out.storeBytes(of: block.loadUnaligned(as: UInt16.self), toByteOffset: 2 &* r, as: UInt16.self)
        for j in 0..<8 {
            out.storeBytes(of: Int8(IQ4.subScale(block, j)), toByteOffset: 16 &+ 8 &* j &+ r, as: Int8.self)
            for u in 0..<4 {
                let q = block.loadUnaligned(fromByteOffset: 8 &+ 16 &* j &+ 4 &* u, as: UInt32.self)
                out.storeBytes(of: q, toByteOffset: 80 &+ 128 &* j &+ 32 &* u &+ 4 &* r, as: UInt32.self)
            }
        }
    }
}
