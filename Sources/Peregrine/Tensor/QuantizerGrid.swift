import Foundation
import PeregrineInt8

/// A quantized block's grid: every value of a block type is `scale * level + offset`, with an
/// integer level in `levels` and a scale and offset that the block's header fixes per value
/// (per block, or per sub-block for the k-quants). For the IQ4 types a level is an index into
/// a fixed table of uneven steps (`table`): the value is `scale * table[level]`. Methods that
/// choose the levels themselves (GPTQ) let a type's own quantizer fix the header, read the grid
/// back, and store their levels in its place, so the block stays a standard block of the type.
public struct BlockGrid {
    public var scales: [Float]
    public var offsets: [Float]
    public let levels: ClosedRange<Int>
    /// The value of each level before scaling (ascending), for the table types; nil when the
    /// levels are evenly spaced.
    public let table: [Float]?

    public init(scales: [Float], offsets: [Float], levels: ClosedRange<Int>, table: [Float]? = nil) {
        self.scales = scales
        self.offsets = offsets
        self.levels = levels
        self.table = table
    }

    /// The level nearest `x` on value `i`'s grid (the lowest level where the scale is zero).
    @inline(__always) public func level(_ x: Float, at i: Int) -> Int {
        let s = scales[i]
        guard s != 0 else { return levels.lowerBound }
        let t = (x - offsets[i]) / s
        guard let table else { return max(levels.lowerBound, min(levels.upperBound, Int(t.rounded()))) }
        // The table is ascending: the first level whose midpoint with the next lies above t.
        var level = 0
        while level + 1 < table.count && t > 0.5 * (table[level] + table[level + 1]) { level += 1 }
        return level
    }

    @inline(__always) public func value(_ level: Int, at i: Int) -> Float {
        scales[i] * (table.map { $0[level] } ?? Float(level)) + offsets[i]
    }
}

extension Quantizer {
    /// The values the IQ4 types' 4-bit indices select before scaling (ascending); nil for the
    /// types whose levels are evenly spaced.
    public static func levelTable(_ type: DType) -> [Float]? {
        type == .iq4_nl || type == .iq4_xs ? iq4Levels : nil
    }

    /// IQ4's table as floats, made once: GPTQ reads a grid for every block of every row.
    private static let iq4Levels = IQ4.levels.map(Float.init)

    /// The integer levels a block type stores (Q8_0 as signed bytes; the others unsigned; the
    /// IQ4 types' indices into `levelTable`).
    public static func levelRange(_ type: DType) -> ClosedRange<Int> {
        switch type {
        case .iq4_nl, .iq4_xs: return 0...15
        case .q8_0: return -127...127
        case .q2_K: return 0...3
        case .q3_K: return 0...7
        case .q4_0, .q4_1, .q4_K: return 0...15
        case .q5_0, .q5_1, .q5_K: return 0...31
        case .q6_K: return 0...63
        case .f32, .f16, .bf16: preconditionFailure("\(type.rawValue) has no evenly spaced levels")
        }
    }

    /// Overwrites the levels of one block of `type` at `block` with `levels` (`type.blockSize`
    /// of them, within `levelRange(type)`), leaving its scales as they are.
    public static func storeLevels(_ type: DType, _ levels: [Int], into block: UnsafeMutableRawPointer) {
        precondition(levels.count == type.blockSize)
        switch type {
        case .q8_0: for j in 0..<32 { block.storeBytes(of: Int8(levels[j]), toByteOffset: 2 + j, as: Int8.self) }
        case .q4_0: packNibbles(levels, block, qs: 2, qh: nil)
        case .q5_0: packNibbles(levels, block, qs: 6, qh: 2)
        case .q4_1: packNibbles(levels, block, qs: 4, qh: nil)
        case .q5_1: packNibbles(levels, block, qs: 8, qh: 4)
        case .q4_K, .q5_K: packKQuant(levels, block, five: type == .q5_K)
        case .q6_K: packQ6K(levels, block)
        case .q3_K, .q2_K:
            // Value 128h + 32s + l: its low 2 bits at bits 2s of byte 32h + l of the 2-bit
            // values (Q3_K: at 32, Q2_K: at 16), Q3_K's third bit at bit 4h + s of mask byte l.
            let qs = type == .q3_K ? 32 : 16
            for i in 0..<256 {
                let h = i / 128, s = (i % 128) / 32, l = i % 32, v = levels[i]
                let at = qs + 32 * h + l, shift = 2 * s
                let byte = block.load(fromByteOffset: at, as: UInt8.self) & ~UInt8(3 << shift) | UInt8((v & 3) << shift)
                block.storeBytes(of: byte, toByteOffset: at, as: UInt8.self)
                if type == .q3_K {
                    let bit = 4 * h + s
                    let mask = block.load(fromByteOffset: l, as: UInt8.self) & ~UInt8(1 << bit) | UInt8(((v >> 2) & 1) << bit)
                    block.storeBytes(of: mask, toByteOffset: l, as: UInt8.self)
                }
            }
        case .iq4_nl, .iq4_xs:
            // Per 32 values (after IQ4_XS's 8-byte header, IQ4_NL's 2-byte scale): byte j holds
            // value j's index low and value j + 16's high.
            let header = type == .iq4_nl ? 2 : 8, stride = type == .iq4_nl ? 18 : 16
            for s in 0..<(levels.count / 32) {
                for j in 0..<16 {
                    block.storeBytes(of: UInt8(levels[32 * s + j] | levels[32 * s + j + 16] << 4), toByteOffset: header + stride * s + j, as: UInt8.self)
                }
            }
        case .f32, .f16, .bf16: preconditionFailure("\(type.rawValue) has no levels")
        }
    }

    /// The grid of one block of `type` at `block`, read through the type's own dequantizer (so
    /// it is what every reader of the block computes): every level at its lowest gives the
    /// offsets, one level up the scales. A table type's scales are its top level's values over
    /// the table's top entry (no offsets).
    public static func grid(_ type: DType, block: UnsafeRawPointer) -> BlockGrid {
        let n = type.blockSize, range = levelRange(type)
        let copy = UnsafeMutableRawPointer.allocate(byteCount: type.blockBytes, alignment: 16)
        defer { copy.deallocate() }
        copy.copyMemory(from: block, byteCount: type.blockBytes)
        if let table = levelTable(type) {
            var top = [Float](repeating: 0, count: n)
            storeLevels(type, [Int](repeating: range.upperBound, count: n), into: copy)
            type.dequantize(copy, count: n, into: &top)
            return BlockGrid(scales: top.map { $0 / table[range.upperBound] }, offsets: [Float](repeating: 0, count: n), levels: range, table: table)
        }
        var low = [Float](repeating: 0, count: n), high = [Float](repeating: 0, count: n)
        storeLevels(type, [Int](repeating: range.lowerBound, count: n), into: copy)
        type.dequantize(copy, count: n, into: &low)
        storeLevels(type, [Int](repeating: range.lowerBound + 1, count: n), into: copy)
        type.dequantize(copy, count: n, into: &high)
        let scales = (0..<n).map { high[$0] - low[$0] }
        let offsets = (0..<n).map { low[$0] - scales[$0] * Float(range.lowerBound) }
        return BlockGrid(scales: scales, offsets: offsets, levels: range)
    }

    /// Quantizes one block's values `x` against the scales already in `block` (of `type`):
    /// each value rounded to its nearest level, the header kept.
    public static func quantize(_ type: DType, _ x: UnsafePointer<Float>, withScalesOf block: UnsafeMutableRawPointer) {
        let g = grid(type, block: block)
        storeLevels(type, (0..<type.blockSize).map { g.level(x[$0], at: $0) }, into: block)
    }
}
