import Foundation

/// Operations every KV cache offers the runtime: how long each sequence is, dropping its tail
/// (speculative rollback) and sharing a prefix with another sequence (prefix reuse).
public protocol KVCacheProtocol: AnyObject {
    var memory: KVMemory { get }
    var capacity: Int { get }
    func length(of slot: Int) -> Int
    /// Gives every sequence of the plan the blocks its tokens are written to (copying shared ones
    /// first) and fills the plan's block tables; call before the forward pass.
    func prepare(_ plan: inout BatchPlan) throws
    /// Marks `count` more positions of `slot` as written (after a forward pass wrote them).
    func advance(_ slot: Int, by count: Int) throws
    /// Keeps only the first `length` positions of `slot`.
    func trim(_ slot: Int, to length: Int) throws
    /// Makes `destination` hold the first `count` positions of `source`.
    func copyPrefix(from source: Int, to destination: Int, count: Int) throws
}

/// A paged KV cache for a fixed set of sequence slots, each up to `capacity` positions: the
/// block pool of the serving engine used by one caller directly (speculative decoding, the
/// perplexity tool, benchmarks). Blocks are taken as positions are written; `copyPrefix` shares
/// blocks instead of copying them, and a shared block is copied only when it is written.
public final class PagedKVCache: KVCacheProtocol {
    public let memory: KVMemory
    public let blocks: BlockManager
    private let model: LanguageModel
    private var tables: [BlockTable]
    private var lengths: [Int]
    private var copies: [(from: Int32, to: Int32)] = []

    public init(model: LanguageModel, slots: Int, capacity: Int, blockSize: Int = 16, type: KVCacheType = .f32) throws {
        guard slots > 0, capacity > 0, blockSize > 0 else { throw PeregrineError.invalidArgument("KV cache needs at least one slot and position") }
        let perSlot = (capacity + blockSize - 1) / blockSize
        // One block more a slot, for a copy on write of a shared partial block.
        let count = slots * (perSlot + 1)
        try PagedKVCache.checkFits(model.config, positions: count * blockSize, type: type)
        memory = try model.makeKVMemory(blocks: count, blockSize: blockSize, capacity: perSlot * blockSize, type: type)
        blocks = BlockManager(blocks: count, blockSize: blockSize)
        self.model = model
        tables = [BlockTable](repeating: BlockTable(), count: slots)
        lengths = [Int](repeating: 0, count: slots)
    }

    /// Bytes of keys and values one position takes (every layer).
    public static func bytesPerPosition(_ c: ModelConfig, type: KVCacheType = .f32) -> Int {
        c.layerCount * 2 * c.kvHeadCount * c.headDim * type.bytes
    }

    /// Refuses a pool larger than most of this machine's memory, with the numbers.
    static func checkFits(_ c: ModelConfig, positions: Int, type: KVCacheType) throws {
        let bytes = Double(positions) * Double(bytesPerPosition(c, type: type))
        let available = Double(sysconf(Int32(_SC_PHYS_PAGES))) * Double(sysconf(Int32(_SC_PAGESIZE)))
        guard bytes < available * 0.8 else {
            throw PeregrineError.invalidArgument(String(
                format: "a KV cache of %ld positions needs %.1f GiB, more than this machine's memory (%.1f GiB); use a smaller context",
                positions, bytes / 1073741824, available / 1073741824))
        }
    }

    public var capacity: Int { memory.capacity }
    public var slots: Int { tables.count }

    public func length(of slot: Int) -> Int { lengths[slot] }

    public func prepare(_ plan: inout BatchPlan) throws {
        copies.removeAll(keepingCapacity: true)
        var t = 0
        while t < plan.count {
            let slot = Int(plan.slots[t])
            guard slot >= 0, slot < tables.count else { throw PeregrineError.invalidArgument("slot \(slot) does not exist") }
            var lo = Int(plan.positions[t]), hi = lo + 1
            t += 1
            while t < plan.count && Int(plan.slots[t]) == slot {
                lo = min(lo, Int(plan.positions[t]))
                hi = max(hi, Int(plan.positions[t]) + 1)
                t += 1
            }
            guard hi <= capacity else {
                throw PeregrineError.invalidArgument("sequence would exceed the KV cache capacity of \(capacity) positions")
            }
            guard blocks.prepareWrite(&tables[slot], from: lo, to: hi, copies: &copies),
                  blocks.reserve(&tables[slot], positions: hi) else {
                throw PeregrineError.invalidArgument("the KV cache has no free block left")
            }
        }
        if !copies.isEmpty { try model.copyKVBlocks(memory, copies) }
        plan.tableWidth = memory.tableWidth
        plan.blockTables.removeAll(keepingCapacity: true)
        for table in tables { plan.appendBlockTable(table.blocks) }
    }

    public func advance(_ slot: Int, by count: Int) throws {
        guard lengths[slot] + count <= capacity else {
            throw PeregrineError.invalidArgument("sequence would exceed the KV cache capacity of \(capacity) positions")
        }
        lengths[slot] += count
    }

    public func trim(_ slot: Int, to length: Int) throws {
        guard length >= 0, length <= lengths[slot] else {
            throw PeregrineError.invalidArgument("cannot trim slot \(slot) of length \(lengths[slot]) to \(length)")
        }
        blocks.truncate(&tables[slot], to: length)
        lengths[slot] = length
    }

    public func copyPrefix(from source: Int, to destination: Int, count: Int) throws {
        guard count <= lengths[source] else { throw PeregrineError.invalidArgument("prefix longer than the source sequence") }
        if source != destination {
            blocks.releaseAll(&tables[destination])
            var shared = blocks.fork(tables[source])
            blocks.truncate(&shared, to: count)
            tables[destination] = shared
        } else {
            blocks.truncate(&tables[destination], to: count)
        }
        lengths[destination] = count
    }
}
