#if canImport(Glibc)
import Glibc
#endif

/// The BPE model of tokenizer.json: a vocabulary, ranked merges, and byte fallback.
final class BPEModel: @unchecked Sendable {
    private var vocab: [String: Int]
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
        var vocab: [String: Int] = [:]
        vocab.reserveCapacity(v.count)
        var maxId = -1
        for (tok, idv) in v.pairs {
            guard let id = idv.int, id >= 0, id < 1 << 24 else {
                throw PeregrineError.format("tokenizer.json: vocab entry '\(tok)' has an invalid id")
            }
            vocab[tok] = id
            maxId = max(maxId, id)
        }
        var tokens = [String?](repeating: nil, count: maxId + 1)
        for (t, id) in vocab { tokens[id] = t }

        var merges: [UInt64: (rank: Int32, id: Int32)] = [:]
        let mergeList = json["merges"]?.array ?? []
        merges.reserveCapacity(mergeList.count)
        for (rank, m) in mergeList.enumerated() {
            let a: String, b: String
            if let s = m.string {
                let parts = s.split(separator: " ", maxSplits: 1, omittingEmptySubsequences: false)
                guard parts.count == 2 else { throw PeregrineError.format("tokenizer.json: merge '\(s)' is not a pair") }
                a = String(parts[0]); b = String(parts[1])
            } else if let arr = m.array, arr.count == 2, let x = arr[0].string, let y = arr[1].string {
                a = x; b = y
            } else {
                throw PeregrineError.format("tokenizer.json: merge \(rank) is not a pair")
            }
            guard let ia = vocab[a], let ib = vocab[b] else {
                throw PeregrineError.format("tokenizer.json: merge \(rank) uses a token missing from the vocab")
            }
            guard let im = vocab[a + b] else {
                throw PeregrineError.format("tokenizer.json: merge \(rank) makes a token missing from the vocab")
            }
            let key = UInt64(ia) << 32 | UInt64(ib)
            if merges[key] == nil { merges[key] = (Int32(rank), Int32(im)) }
        }
        self.merges = merges
        self.vocab = vocab
        self.tokens = tokens
        if let u = json["unk_token"]?.string {
            unkId = vocab[u]
        } else {
            unkId = nil
        }
        fuseUnk = json["fuse_unk"]?.bool ?? false
        byteFallback = json["byte_fallback"]?.bool ?? false
        ignoreMerges = json["ignore_merges"]?.bool ?? false
        if byteFallback {
            byteIds = (0..<256).map { vocab["<0x" + hex2(UInt8($0)) + ">"] }
        }
    }

    /// Added tokens extend the id -> string table (they may lie outside the model vocab).
    func extend(with added: [(String, Int)]) {
        for (s, id) in added where id >= 0 && id < 1 << 24 {
            if id >= tokens.count { tokens += [String?](repeating: nil, count: id + 1 - tokens.count) }
            if tokens[id] == nil { tokens[id] = s }
            if vocab[s] == nil { vocab[s] = id }
        }
    }

    var size: Int { tokens.count }

    func id(of token: String) -> Int? { vocab[token] }

    func token(of id: Int) -> String? { id >= 0 && id < tokens.count ? tokens[id] : nil }

    func encode(_ piece: [Unicode.Scalar]) -> [Int] {
        if ignoreMerges {
            var s = String.UnicodeScalarView()
            s.append(contentsOf: piece)
            if let id = vocab[String(s)] { return [id] }
        }
        // Initial symbols: one per scalar, or its bytes, or unk.
        var ids: [Int32] = []
        ids.reserveCapacity(piece.count)
        var lastWasUnk = false
        for c in piece {
            if let id = vocab[String(c)] {
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
