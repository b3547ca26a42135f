import Foundation

/// Operations every KV cache offers the runtime: how long each sequence is, dropping its tail
/// (speculative rollback) and copying a prefix into another sequence (prefix reuse).
public protocol KVCacheProtocol: AnyObject {
    var memory: KVMemory { get }
    var capacity: Int { get }
    func length(of slot: Int) -> Int
    /// Marks `count` more positions of `slot` as written (after a forward pass wrote them).
    func advance(_ slot: Int, by count: Int) throws
    /// Keeps only the first `length` positions of `slot`.
    func trim(_ slot: Int, to length: Int) throws
    /// Makes `destination` hold the first `count` positions of `source`.
    func copyPrefix(from source: Int, to destination: Int, count: Int) throws
}

/// A cache with one contiguous region of `capacity` positions per sequence slot.
public final class ContiguousKVCache: KVCacheProtocol {
    public let memory: KVMemory
    private let model: LanguageModel
    private var lengths: [Int]

    public init(model: LanguageModel, slots: Int, capacity: Int) throws {
        guard slots > 0, capacity > 0 else { throw PeregrineError.invalidArgument("KV cache needs at least one slot and position") }
        let c = model.config
        let bytes = Double(slots) * Double(capacity) * Double(c.layerCount * 2 * c.kvHeadCount * c.headDim * 4)
        let available = Double(sysconf(Int32(_SC_PHYS_PAGES))) * Double(sysconf(Int32(_SC_PAGESIZE)))
        guard bytes < available * 0.8 else {
            throw PeregrineError.invalidArgument(String(
                format: "a KV cache of %d positions needs %.1f GiB, more than this machine's memory (%.1f GiB); use a smaller context",
                slots * capacity, bytes / 1073741824, available / 1073741824))
        }
        memory = try model.makeKVMemory(slots: slots, capacity: capacity)
        self.model = model
        lengths = [Int](repeating: 0, count: slots)
    }

    public var capacity: Int { memory.capacity }
    public var slots: Int { memory.slots }

    public func length(of slot: Int) -> Int { lengths[slot] }

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
        lengths[slot] = length
    }

    public func copyPrefix(from source: Int, to destination: Int, count: Int) throws {
        guard count <= lengths[source] else { throw PeregrineError.invalidArgument("prefix longer than the source sequence") }
        if source != destination { try model.copyKV(memory, from: source, to: destination, count: count) }
        lengths[destination] = count
    }
}
