/// Owns the KV pool's blocks: which are free, how many sequences use each, and which full blocks
/// hold a known run of tokens (the prefix cache).
///
/// A full block is named by a hash chained over its tokens and its predecessor's hash, so equal
/// hashes mean equal prefixes up to and including the block; the tokens and the parent hash are
/// kept beside it and compared on lookup, so a hash collision cannot map the wrong keys. A block
/// no sequence uses but whose contents are known stays cached, and is the first to be reused
/// when it is the least recently used of them (LRU). Not thread-safe: the engine's scheduler
/// owns it.
public final class BlockManager {
    public let blockCount: Int
    public let blockSize: Int

    private var refCounts: [Int32]
    /// Blocks holding nothing worth keeping.
    private var free: [Int32]
    /// Per block: the chained hash of its contents when registered.
    private var hashes: [UInt64?]
    private var parents: [UInt64]
    private var contents: [[Int32]]
    private var byHash: [UInt64: Int32] = [:]
    /// Unused registered blocks in least-recently-used order: a doubly linked list over block ids.
    private var lruPrev: [Int32]
    private var lruNext: [Int32]
    private var lruHead: Int32 = -1
    private var lruTail: Int32 = -1
    public private(set) var evictableCount = 0

    public init(blocks: Int, blockSize: Int) {
        blockCount = blocks
        self.blockSize = blockSize
        refCounts = [Int32](repeating: 0, count: blocks)
        free = (0..<Int32(blocks)).reversed()
        hashes = [UInt64?](repeating: nil, count: blocks)
        parents = [UInt64](repeating: 0, count: blocks)
        contents = [[Int32]](repeating: [], count: blocks)
        lruPrev = [Int32](repeating: -1, count: blocks)
        lruNext = [Int32](repeating: -1, count: blocks)
    }

    /// Blocks a new allocation can take (free ones and cached ones nobody uses).
    public var availableCount: Int { free.count + evictableCount }
    /// Blocks some sequence holds.
    public var usedCount: Int { blockCount - availableCount }
    /// Blocks whose contents are registered for reuse.
    public var cachedCount: Int { byHash.count }

    public func references(_ block: Int32) -> Int { Int(refCounts[Int(block)]) }

    /// A block for one owner; an unused cached block is evicted (least recently used first) when
    /// no free one is left. nil when every block is in use.
    public func allocate() -> Int32? {
        let b: Int32
        if let f = free.popLast() {
            b = f
        } else if lruHead >= 0 {
            b = lruHead
            unlink(b)
            forget(b)
        } else {
            return nil
        }
        refCounts[Int(b)] = 1
        return b
    }

    /// One more owner of a block (a sequence mapping a cached prefix, or a fork).
    public func retain(_ b: Int32) {
        if refCounts[Int(b)] == 0 && hashes[Int(b)] != nil { unlink(b) }
        refCounts[Int(b)] += 1
    }

    /// One owner fewer; a block nobody holds is kept for reuse if registered, else freed.
    public func release(_ b: Int32) {
        let i = Int(b)
        precondition(refCounts[i] > 0, "KV block \(b) released more often than held")
        refCounts[i] -= 1
        guard refCounts[i] == 0 else { return }
        if hashes[i] != nil { append(b) } else { free.append(b) }
    }

    /// The chained hash of a full block of `tokens` following a block whose hash is `parent`
    /// (0 for the first block): FNV-1a over the parent and the tokens, then a final mix.
    public static func hash(parent: UInt64, tokens: some Collection<Int32>) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ v: UInt64) {
            for shift in stride(from: 0, to: 64, by: 8) {
                h ^= (v >> UInt64(shift)) & 0xff
                h = h &* 0x0000_0100_0000_01b3
            }
        }
        mix(parent)
        for t in tokens { mix(UInt64(UInt32(bitPattern: t))) }
        h ^= h >> 33
        h = h &* 0xff51_afd7_ed55_8ccd
        h ^= h >> 33
        return h
    }

    /// The cached block holding exactly these tokens after `parent`, not yet retained.
    public func lookup(hash: UInt64, parent: UInt64, tokens: some Collection<Int32>) -> Int32? {
        guard let b = byHash[hash], parents[Int(b)] == parent, contents[Int(b)].elementsEqual(tokens) else { return nil }
        return b
    }

    /// Records a full block's contents so later sequences may map it. A block with the same
    /// contents already registered stays the one found.
    public func register(_ b: Int32, hash: UInt64, parent: UInt64, tokens: some Collection<Int32>) {
        guard hashes[Int(b)] == nil, byHash[hash] == nil else { return }
        hashes[Int(b)] = hash
        parents[Int(b)] = parent
        contents[Int(b)] = Array(tokens)
        byHash[hash] = b
    }

    public func isRegistered(_ b: Int32) -> Bool { hashes[Int(b)] != nil }

    /// Its contents are about to change: no later sequence may find it.
    public func unregister(_ b: Int32) {
        guard hashes[Int(b)] != nil else { return }
        if refCounts[Int(b)] == 0 { unlink(b); free.append(b) }
        forget(b)
    }

    /// Drops every unused cached block (all blocks become free or stay with their owners).
    public func clearCache() {
        while lruHead >= 0 {
            let b = lruHead
            unlink(b)
            forget(b)
            free.append(b)
        }
    }

    private func forget(_ b: Int32) {
        if let h = hashes[Int(b)], byHash[h] == b { byHash[h] = nil }
        hashes[Int(b)] = nil
        contents[Int(b)] = []
    }

    private func append(_ b: Int32) {
        lruPrev[Int(b)] = lruTail
        lruNext[Int(b)] = -1
        if lruTail >= 0 { lruNext[Int(lruTail)] = b } else { lruHead = b }
        lruTail = b
        evictableCount += 1
    }

    private func unlink(_ b: Int32) {
        let p = lruPrev[Int(b)], n = lruNext[Int(b)]
        if p >= 0 { lruNext[Int(p)] = n } else { lruHead = n }
        if n >= 0 { lruPrev[Int(n)] = p } else { lruTail = p }
        lruPrev[Int(b)] = -1
        lruNext[Int(b)] = -1
        evictableCount -= 1
    }
}

/// One sequence's KV blocks, in position order, and the chained hashes of its leading full
/// blocks (those registered in, or mapped from, the prefix cache).
public struct BlockTable: Sendable {
    public internal(set) var blocks: [Int32] = []
    var hashes: [UInt64] = []
    /// The parent hash of the first block: sequences whose keys and values differ for the same
    /// tokens (LongRoPE's long factors, taken for a long prompt) share blocks only among
    /// themselves.
    public var root: UInt64 = 0

    public init() {}
}

extension BlockManager {
    /// Gives the table blocks for `positions` positions; false (and nothing taken) when the pool
    /// has too few available.
    public func reserve(_ t: inout BlockTable, positions: Int) -> Bool {
        let need = (positions + blockSize - 1) / blockSize - t.blocks.count
        guard need > 0 else { return true }
        guard need <= availableCount else { return false }
        for _ in 0..<need {
            guard let b = allocate() else { return false }  // cannot happen: counted above
            t.blocks.append(b)
        }
        return true
    }

    /// Blocks `reserve` would need to take for `positions`, counting a copy of a shared block
    /// written at `writeFrom`.
    public func blocksNeeded(_ t: BlockTable, positions: Int, writeFrom: Int) -> Int {
        var need = max(0, (positions + blockSize - 1) / blockSize - t.blocks.count)
        let first = writeFrom / blockSize
        if first < t.blocks.count && references(t.blocks[first]) > 1 { need += 1 }
        return need
    }

    /// Makes the blocks that positions `from..<to` are written to the table's own: a block shared
    /// with another sequence is copied first (copy on write; the copy is appended to `copies` for
    /// the caller to perform before the write), and a registered block is taken out of the prefix
    /// cache. False when no block is left for a copy.
    public func prepareWrite(_ t: inout BlockTable, from: Int, to: Int, copies: inout [(from: Int32, to: Int32)]) -> Bool {
        guard from < to else { return true }
        let first = from / blockSize, last = min((to - 1) / blockSize, t.blocks.count - 1)
        guard first <= last else { return true }
        if t.hashes.count > first { t.hashes.removeLast(t.hashes.count - first) }
        for i in first...last {
            let b = t.blocks[i]
            if references(b) > 1 {
                guard let fresh = allocate() else { return false }
                copies.append((b, fresh))
                release(b)
                t.blocks[i] = fresh
            } else if isRegistered(b) {
                unregister(b)
            }
        }
        return true
    }

    /// Registers the full blocks among the first `length` positions of `tokens` (the sequence's
    /// tokens, written to the cache) that are not yet registered.
    public func commit(_ t: inout BlockTable, tokens: [Int32], length: Int) {
        let full = min(length / blockSize, t.blocks.count)
        while t.hashes.count < full {
            let i = t.hashes.count
            let parent = i == 0 ? t.root : t.hashes[i - 1]
            let run = tokens[(i * blockSize)..<((i + 1) * blockSize)]
            let h = BlockManager.hash(parent: parent, tokens: run)
            register(t.blocks[i], hash: h, parent: parent, tokens: run)
            t.hashes.append(h)
        }
    }

    /// Maps the cached blocks that hold a prefix of `tokens`, at most `maxBlocks` of them, into an
    /// empty table; returns the positions they cover.
    public func mapCachedPrefix(_ t: inout BlockTable, tokens: [Int32], maxBlocks: Int) -> Int {
        precondition(t.blocks.isEmpty, "a cached prefix maps into an empty table")
        var parent = t.root
        while t.blocks.count < maxBlocks {
            let i = t.blocks.count
            guard (i + 1) * blockSize <= tokens.count else { break }
            let run = tokens[(i * blockSize)..<((i + 1) * blockSize)]
            let h = BlockManager.hash(parent: parent, tokens: run)
            guard let b = lookup(hash: h, parent: parent, tokens: run) else { break }
            retain(b)
            t.blocks.append(b)
            t.hashes.append(h)
            parent = h
        }
        return t.blocks.count * blockSize
    }

    /// Keeps the blocks of the first `length` positions, releasing the rest.
    public func truncate(_ t: inout BlockTable, to length: Int) {
        let keep = (length + blockSize - 1) / blockSize
        while t.blocks.count > keep { release(t.blocks.removeLast()) }
        let full = length / blockSize
        if t.hashes.count > full { t.hashes.removeLast(t.hashes.count - full) }
    }

    /// A second table sharing every block of `t` (each written block is copied on write).
    public func fork(_ t: BlockTable) -> BlockTable {
        for b in t.blocks { retain(b) }
        return t
    }

    public func releaseAll(_ t: inout BlockTable) { truncate(&t, to: 0) }
}
