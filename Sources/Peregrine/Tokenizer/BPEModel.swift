#if canImport(Glibc)
import Glibc
#endif

/// Token strings -> ids, keyed by UTF-8 bytes in one open-addressing table. Byte keys are what
/// tokens are (Swift's String equality is canonical equivalence, "é" == "e\u{301}", and hashing a
/// non-ASCII String normalizes it first), and looking up a byte slice needs no String: loading a
/// 150k-entry vocabulary and its merges stays well under a tenth of a second.
struct VocabularyTable {
    private struct Entry { var offset: Int32; var length: Int32; var id: Int32 }
    private var storage: [UInt8] = []
    private var entries: [Entry] = []
    /// Each slot: the key's hash in the high 32 bits, its entry index + 1 in the low (0: empty).
    /// Probes compare hashes first, so a miss rarely touches the entries.
    private var slots: [UInt64]
    private var mask: Int

    init(capacity: Int) {
        var n = 16
        while n < capacity * 2 { n <<= 1 }
        slots = [UInt64](repeating: 0, count: n)
        mask = n - 1
        entries.reserveCapacity(capacity)
    }

    var count: Int { entries.count }

    @inline(__always) static func hash(_ b: UnsafeBufferPointer<UInt8>) -> Int {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        for x in b { h = (h ^ UInt64(x)) &* 0x100_0000_01b3 }
        h ^= h >> 32
        h &*= 0xd6e8_feb8_6659_fd93
        return Int(truncatingIfNeeded: h ^ (h >> 32))
    }

    private func find(_ key: UnsafeBufferPointer<UInt8>) -> (slot: Int, entry: Int?) {
        let h = VocabularyTable.hash(key)
        let tag = UInt64(UInt32(truncatingIfNeeded: h >> 32))
        var i = h & mask
        while true {
            let s = slots[i]
            if s == 0 { return (i, nil) }
            if s >> 32 == tag {
                let e = Int(s & 0xFFFF_FFFF) - 1
                let entry = entries[e]
                if Int(entry.length) == key.count {
                    let equal = storage.withUnsafeBufferPointer { st in
                        key.count == 0 || memcmp(st.baseAddress! + Int(entry.offset), key.baseAddress!, key.count) == 0
                    }
                    if equal { return (i, e) }
                }
            }
            i = (i + 1) & mask
        }
    }

    func id(_ key: UnsafeBufferPointer<UInt8>) -> Int? {
        find(key).entry.map { Int(entries[$0].id) }
    }

    func id(_ s: String) -> Int? {
        var s = s
        return s.withUTF8 { id($0) }
    }

    /// Adds or replaces an entry.
    mutating func set(_ s: String, _ id: Int) {
        var s = s
        s.withUTF8 { key in
            let (slot, entry) = find(key)
            if let entry {
                entries[entry].id = Int32(id)
                return
            }
            let tag = UInt64(UInt32(truncatingIfNeeded: VocabularyTable.hash(key) >> 32))
            slots[slot] = tag << 32 | UInt64(entries.count + 1)
            entries.append(Entry(offset: Int32(storage.count), length: Int32(key.count), id: Int32(id)))
            storage.append(contentsOf: key)
        }
        if entries.count * 2 > slots.count { grow() }
    }

    private mutating func grow() {
        slots = [UInt64](repeating: 0, count: slots.count * 2)
        mask = slots.count - 1
        storage.withUnsafeBufferPointer { st in
            for (e, entry) in entries.enumerated() {
                let key = UnsafeBufferPointer(rebasing: st[Int(entry.offset)..<Int(entry.offset + entry.length)])
                let h = VocabularyTable.hash(key)
                var i = h & mask
                while slots[i] != 0 { i = (i + 1) & mask }
                slots[i] = UInt64(UInt32(truncatingIfNeeded: h >> 32)) << 32 | UInt64(e + 1)
            }
        }
    }
}

/// The BPE model of tokenizer.json: a vocabulary, ranked merges, and byte fallback.
final class BPEModel: @unchecked Sendable {
    private var vocab: VocabularyTable
    private var tokens: [String?]
    /// (left id << 32 | right id) -> (rank, merged id)
    private let merges: [UInt64: (rank: Int32, id: Int32)]
    private let unkId: Int?
    private let fuseUnk: Bool
    private let byteFallback: Bool
    private let ignoreMerges: Bool
    private var byteIds: [Int?] = []

    init(json: JSONValue) throws {
        let type = json["type"]?.string ?? "BPE"
        guard type == "BPE" else {
            throw PeregrineError.unsupported("tokenizer.json: unsupported model type '\(type)' (supported: BPE)")
        }
        if let p = json["continuing_subword_prefix"], !p.isNull, p.string != "" {
            throw PeregrineError.unsupported("tokenizer.json: BPE continuing_subword_prefix is not supported")
        }
        if let p = json["end_of_word_suffix"], !p.isNull, p.string != "" {
            throw PeregrineError.unsupported("tokenizer.json: BPE end_of_word_suffix is not supported")
        }
        guard let v = json["vocab"]?.object else { throw PeregrineError.format("tokenizer.json: model has no vocab") }
        var vocab = VocabularyTable(capacity: v.count + 1024)
        var maxId = -1
        for (tok, idv) in v.pairs {
            guard let id = idv.int, id >= 0, id < 1 << 24 else {
                throw PeregrineError.format("tokenizer.json: vocab entry '\(tok)' has an invalid id")
            }
            vocab.set(tok, id)
            maxId = max(maxId, id)
        }
        var tokens = [String?](repeating: nil, count: maxId + 1)
        for (tok, idv) in v.pairs { if let id = idv.int { tokens[id] = tok } }

        var merges: [UInt64: (rank: Int32, id: Int32)] = [:]
        let mergeList = json["merges"]?.array ?? []
        merges.reserveCapacity(mergeList.count)
        var scratch = [UInt8](repeating: 0, count: 256)
        for (rank, m) in mergeList.enumerated() {
            // The pair's ids and the merged token's id, looked up by bytes: no Strings made.
            var ia: Int?, ib: Int?, im: Int?
            func lookUp(_ a: UnsafeBufferPointer<UInt8>, _ b: UnsafeBufferPointer<UInt8>) {
                ia = vocab.id(a)
                ib = vocab.id(b)
                if scratch.count < a.count + b.count { scratch = [UInt8](repeating: 0, count: a.count + b.count) }
                scratch.withUnsafeMutableBufferPointer { sc in
                    if a.count > 0 { (sc.baseAddress!).update(from: a.baseAddress!, count: a.count) }
                    if b.count > 0 { (sc.baseAddress! + a.count).update(from: b.baseAddress!, count: b.count) }
                    im = vocab.id(UnsafeBufferPointer(rebasing: sc[0..<(a.count + b.count)]))
                }
            }
            if var s = m.string {
                let ok = s.withUTF8 { u -> Bool in
                    guard let sp = u.firstIndex(of: UInt8(ascii: " ")) else { return false }
                    lookUp(UnsafeBufferPointer(rebasing: u[..<sp]), UnsafeBufferPointer(rebasing: u[(sp + 1)...]))
                    return true
                }
                guard ok else { throw PeregrineError.format("tokenizer.json: merge '\(s)' is not a pair") }
            } else if let arr = m.array, arr.count == 2, var x = arr[0].string, var y = arr[1].string {
                x.withUTF8 { a in y.withUTF8 { b in lookUp(a, b) } }
            } else {
                throw PeregrineError.format("tokenizer.json: merge \(rank) is not a pair")
            }
            guard let ia, let ib else {
                throw PeregrineError.format("tokenizer.json: merge \(rank) uses a token missing from the vocab")
            }
            guard let im else {
                throw PeregrineError.format("tokenizer.json: merge \(rank) makes a token missing from the vocab")
            }
            let key = UInt64(ia) << 32 | UInt64(ib)
            if merges[key] == nil { merges[key] = (Int32(rank), Int32(im)) }
        }
        self.merges = merges
        self.vocab = vocab
        self.tokens = tokens
        if let u = json["unk_token"]?.string {
            unkId = vocab.id(u)
        } else {
            unkId = nil
        }
        fuseUnk = json["fuse_unk"]?.bool ?? false
        byteFallback = json["byte_fallback"]?.bool ?? false
        ignoreMerges = json["ignore_merges"]?.bool ?? false
        if byteFallback {
            byteIds = (0..<256).map { vocab.id("<0x" + hex2(UInt8($0)) + ">") }
        }
    }

    /// Added tokens extend the id -> string table (they may lie outside the model vocab).
    func extend(with added: [(String, Int)]) {
        for (s, id) in added where id >= 0 && id < 1 << 24 {
            if id >= tokens.count { tokens += [String?](repeating: nil, count: id + 1 - tokens.count) }
            if tokens[id] == nil { tokens[id] = s }
            if vocab.id(s) == nil { vocab.set(s, id) }
        }
    }

    var size: Int { tokens.count }

    func id(of token: String) -> Int? { vocab.id(token) }

    func token(of id: Int) -> String? { id >= 0 && id < tokens.count ? tokens[id] : nil }

    func encode(_ piece: [Unicode.Scalar]) -> [Int] {
        if ignoreMerges {
            var s = String.UnicodeScalarView()
            s.append(contentsOf: piece)
            if let id = vocab.id(String(s)) { return [id] }
        }
        // Initial symbols: one per scalar, or its bytes, or unk.
        var ids: [Int32] = []
        ids.reserveCapacity(piece.count)
        var lastWasUnk = false
        for c in piece {
            if let id = vocab.id(String(c)) {
                ids.append(Int32(id)); lastWasUnk = false
                continue
            }
            if byteFallback {
                let bytes = Array(String(c).utf8)
                let bids = bytes.compactMap { byteIds[Int($0)] }
                if bids.count == bytes.count {
                    ids += bids.map { Int32($0) }; lastWasUnk = false
                    continue
                }
            }
            if let u = unkId {
                if !(fuseUnk && lastWasUnk) { ids.append(Int32(u)) }
                lastWasUnk = true
            }
        }
        if ids.count < 2 { return ids.map(Int.init) }
        return applyMerges(ids)
    }

    /// Merges the lowest-ranked adjacent pair (leftmost on ties) until none applies.
    private func applyMerges(_ start: [Int32]) -> [Int] {
        let n = start.count
        var id = start
        var prev = [Int32](unsafeUninitializedCapacity: n) { b, c in for i in 0..<n { b[i] = Int32(i - 1) }; c = n }
        var next = [Int32](unsafeUninitializedCapacity: n) { b, c in for i in 0..<n { b[i] = i + 1 < n ? Int32(i + 1) : -1 }; c = n }
        var alive = [Bool](repeating: true, count: n)
        var heap = MergeHeap()
        func push(_ i: Int) {
            let j = Int(next[i])
            guard j >= 0, let m = merges[UInt64(UInt32(id[i])) << 32 | UInt64(UInt32(id[j]))] else { return }
            heap.push(MergeCandidate(rank: m.rank, pos: Int32(i), newId: m.id))
        }
        for i in 0..<(n - 1) { push(i) }
        while let top = heap.pop() {
            let i = Int(top.pos)
            guard alive[i] else { continue }
            let j = Int(next[i])
            guard j >= 0, let m = merges[UInt64(UInt32(id[i])) << 32 | UInt64(UInt32(id[j]))], m.id == top.newId else { continue }
            id[i] = top.newId
            alive[j] = false
            next[i] = next[j]
            if next[j] >= 0 { prev[Int(next[j])] = Int32(i) }
            if prev[i] >= 0 { push(Int(prev[i])) }
            push(i)
        }
        var out: [Int] = []
        var i = 0
        while i >= 0 && i < n { out.append(Int(id[i])); i = Int(next[i]) }
        return out
    }
}

struct MergeCandidate {
    var rank: Int32
    var pos: Int32
    var newId: Int32
    @inline(__always) static func < (a: MergeCandidate, b: MergeCandidate) -> Bool {
        a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos
    }
}

/// A binary min-heap ordered by (rank, position).
struct MergeHeap {
    private var items: [MergeCandidate] = []

    mutating func push(_ x: MergeCandidate) {
        items.append(x)
        var i = items.count - 1
        while i > 0 {
            let p = (i - 1) / 2
            if items[i] < items[p] { items.swapAt(i, p); i = p } else { break }
        }
    }

    mutating func pop() -> MergeCandidate? {
        guard let first = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < items.count && items[l] < items[m] { m = l }
                if r < items.count && items[r] < items[m] { m = r }
                if m == i { break }
                items.swapAt(i, m)
                i = m
            }
        }
        return first
    }
}

func hex2(_ b: UInt8) -> String {
    let digits = Array("0123456789ABCDEF")
    return String([digits[Int(b >> 4)], digits[Int(b & 15)]])
}

/// A plain mutex for short critical sections.
final class Lock: @unchecked Sendable {
    private var m = pthread_mutex_t()
    init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    @inline(__always) func lock() { pthread_mutex_lock(&m) }
    @inline(__always) func unlock() { pthread_mutex_unlock(&m) }
}
