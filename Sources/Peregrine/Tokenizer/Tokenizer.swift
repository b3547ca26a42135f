/// A tokenizer read from a Hugging Face tokenizer.json: byte-level BPE (GPT-2, Llama 3, Qwen2) and
/// SentencePiece-style BPE (Llama 2, Mistral: metaspace, byte fallback), with added and special
/// tokens. Encoding and decoding follow the `tokenizers` library.
public final class Tokenizer: @unchecked Sendable {
    public struct AddedToken {
        public let id: Int
        public let content: String
        public let special: Bool
        let scalars: [Unicode.Scalar]
        let lstrip: Bool
        let rstrip: Bool
        let singleWord: Bool
    }

    private let model: BPEModel
    private let normalizer: Normalizer?
    private let preTokenizer: PreTokenizer?
    private let decoder: TokenDecoder?
    private let postProcessor: PostProcessor
    public let addedTokens: [AddedToken]
    private let addedByFirstScalar: [Unicode.Scalar: [AddedToken]]
    private let addedById: [Int: AddedToken]
    private var cache: [[Unicode.Scalar]: [Int]] = [:]
    private let cacheLock = Lock()

    public let bosTokenId: Int?
    public let eosTokenIds: [Int]

    /// Loads tokenizer.json from a model directory, with tokenizer_config.json and
    /// generation_config.json when present.
    public convenience init(directory: String) throws {
        if FileSystem.isGGUFFile(directory) {
            try self.init(gguf: try GGUFFile(path: directory))
            return
        }
        let path = FileSystem.join(directory, "tokenizer.json")
        guard FileSystem.exists(path) else { throw PeregrineError.io("\(directory): no tokenizer.json") }
        let json = try FileSystem.readJSON(path)
        let cfgPath = FileSystem.join(directory, "tokenizer_config.json")
        let cfg = FileSystem.exists(cfgPath) ? try FileSystem.readJSON(cfgPath) : nil
        let genPath = FileSystem.join(directory, "generation_config.json")
        let gen = FileSystem.exists(genPath) ? try FileSystem.readJSON(genPath) : nil
        try self.init(json: json, config: cfg, generationConfig: gen)
    }

    public init(json: JSONValue, config: JSONValue? = nil, generationConfig: JSONValue? = nil) throws {
        guard json.object != nil else { throw PeregrineError.format("tokenizer.json: not a JSON object") }
        guard let m = json["model"] else { throw PeregrineError.format("tokenizer.json: no model") }
        let model = try BPEModel(json: m)
        self.model = model
        normalizer = try Normalizer(json: json["normalizer"])
        preTokenizer = try PreTokenizer(json: json["pre_tokenizer"])
        decoder = try TokenDecoder(json: json["decoder"])
        postProcessor = try PostProcessor(json: json["post_processor"])

        var added: [AddedToken] = []
        for t in json["added_tokens"]?.array ?? [] {
            guard let id = t["id"]?.int, let content = t["content"]?.string, !content.isEmpty else {
                throw PeregrineError.format("tokenizer.json: invalid added token")
            }
            added.append(AddedToken(id: id, content: content, special: t["special"]?.bool ?? false,
                                    scalars: Array(content.unicodeScalars), lstrip: t["lstrip"]?.bool ?? false,
                                    rstrip: t["rstrip"]?.bool ?? false, singleWord: t["single_word"]?.bool ?? false))
        }
        addedTokens = added
        var byFirst: [Unicode.Scalar: [AddedToken]] = [:]
        for a in added { byFirst[a.scalars[0], default: []].append(a) }
        for k in byFirst.keys { byFirst[k]!.sort { $0.scalars.count > $1.scalars.count } }
        addedByFirstScalar = byFirst
        addedById = Dictionary(added.map { ($0.id, $0) }, uniquingKeysWith: { a, _ in a })
        model.extend(with: added.map { ($0.content, $0.id) })

        // BOS from the post-processor template's leading special token or tokenizer_config;
        // EOS from generation_config, then tokenizer_config.
        func tokenId(_ v: JSONValue?) -> Int? {
            guard let v else { return nil }
            let s = v.string ?? v["content"]?.string
            return s.flatMap { model.id(of: $0) }
        }
        if case .template(let pieces) = postProcessor, case .special(let ids)? = pieces.first {
            bosTokenId = ids.first
        } else {
            bosTokenId = tokenId(config?["bos_token"])
        }
        var eos = ModelConfig.tokenIds(generationConfig?["eos_token_id"])
        if let e = tokenId(config?["eos_token"]), !eos.contains(e) { eos.append(e) }
        eosTokenIds = eos
    }

    public var vocabularySize: Int { model.size }

    /// The BOS id when encoding with special tokens puts it first (what the post-processor or
    /// GGUF's add_bos_token says), else nil.
    public var addedBOS: Int? {
        guard let bos = bosTokenId else { return nil }
        let with = encode("a", addSpecialTokens: true), without = encode("a", addSpecialTokens: false)
        return with.count > without.count && with.first == bos ? bos : nil
    }

    public func id(of token: String) -> Int? { model.id(of: token) }

    public func token(of id: Int) -> String? { model.token(of: id) }

    public func isSpecial(_ id: Int) -> Bool { addedById[id]?.special ?? false }

    /// The first id whose token differs between two tokenizers (nil: the same vocabulary).
    public func firstDifference(from other: Tokenizer) -> Int? {
        let n = max(vocabularySize, other.vocabularySize)
        for id in 0..<n {
            let a = token(of: id), b = other.token(of: id)
            if (a == nil) != (b == nil) { return id }
            if let a, let b, !a.utf8.elementsEqual(b.utf8) { return id }
        }
        return nil
    }

    // MARK: Encoding

    public func encode(_ text: String, addSpecialTokens: Bool = true) -> [Int] {
        let scalars = Array(text.unicodeScalars)
        var ids: [Int] = []
        for seg in splitOnAddedTokens(scalars) {
            switch seg {
            case .added(let id):
                ids.append(id)
            case .text(let r):
                var s = String.UnicodeScalarView()
                s.append(contentsOf: scalars[r])
                var normalized = String(s)
                if let normalizer { normalized = normalizer.apply(normalized) }
                var pieces = [Array(normalized.unicodeScalars)]
                if let preTokenizer { pieces = preTokenizer.apply(pieces, atStart: r.lowerBound == 0) }
                for p in pieces where !p.isEmpty { ids += encodePiece(p) }
            }
        }
        return addSpecialTokens ? postProcessor.apply(ids) : ids
    }

    private func encodePiece(_ p: [Unicode.Scalar]) -> [Int] {
        cacheLock.lock()
        let hit = cache[p]
        cacheLock.unlock()
        if let hit { return hit }
        let ids = model.encode(p)
        cacheLock.lock()
        if cache.count > 100_000 { cache.removeAll(keepingCapacity: true) }
        cache[p] = ids
        cacheLock.unlock()
        return ids
    }

    enum Segment { case text(Range<Int>), added(Int) }

    /// Leftmost-longest matching of added tokens in the raw text, with their strip and
    /// single-word rules.
    private func splitOnAddedTokens(_ s: [Unicode.Scalar]) -> [Segment] {
        guard !addedTokens.isEmpty else { return s.isEmpty ? [] : [.text(0..<s.count)] }
        var out: [Segment] = []
        var textStart = 0
        var i = 0
        func isWordChar(_ c: Unicode.Scalar) -> Bool {
            c == "_" || c.properties.isAlphabetic || c.isNumberCategory
        }
        while i < s.count {
            var matched: AddedToken?
            if let cands = addedByFirstScalar[s[i]] {
                for a in cands where i + a.scalars.count <= s.count {
                    var ok = true
                    for j in 1..<a.scalars.count where s[i + j] != a.scalars[j] { ok = false; break }
                    if ok && a.singleWord {
                        if i > 0 && isWordChar(s[i - 1]) { ok = false }
                        let e = i + a.scalars.count
                        if e < s.count && isWordChar(s[e]) { ok = false }
                    }
                    if ok { matched = a; break }
                }
            }
            guard let a = matched else { i += 1; continue }
            var lo = i
            var hi = i + a.scalars.count
            if a.lstrip { while lo > textStart, s[lo - 1].properties.isWhitespace { lo -= 1 } }
            if a.rstrip { while hi < s.count, s[hi].properties.isWhitespace { hi += 1 } }
            if lo > textStart { out.append(.text(textStart..<lo)) }
            out.append(.added(a.id))
            i = hi
            textStart = hi
        }
        if textStart < s.count { out.append(.text(textStart..<s.count)) }
        return out
    }

    // MARK: Decoding

    /// Like the tokenizers library: every token (added ones too) goes through the decoder chain;
    /// without a decoder, tokens are joined by spaces.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        var tokens: [String] = []
        tokens.reserveCapacity(ids.count)
        for id in ids {
            if let a = addedById[id] {
                if skipSpecialTokens && a.special { continue }
                tokens.append(a.content)
            } else if let t = model.token(of: id) {
                tokens.append(t)
            }
        }
        guard let decoder else { return tokens.joined(separator: " ") }
        return decoder.apply(tokens).joined()
    }

    public func makeStreamingDecoder(skipSpecialTokens: Bool = true) -> StreamingDecoder {
        StreamingDecoder(tokenizer: self, skipSpecialTokens: skipSpecialTokens)
    }
}

/// Turns a growing list of token ids into text chunks that are always whole UTF-8 characters.
/// It re-decodes a short window (so decoders that depend on neighbours stay exact) and holds back
/// text while it ends in an incomplete character.
public struct StreamingDecoder {
    let tokenizer: Tokenizer
    let skipSpecialTokens: Bool
    private var ids: [Int] = []
    private var prefixOffset = 0
    private var readOffset = 0

    init(tokenizer: Tokenizer, skipSpecialTokens: Bool) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
    }

    /// Adds a token and returns the newly completed text (possibly empty).
    public mutating func append(_ id: Int) -> String {
        ids.append(id)
        let prefix = tokenizer.decode(Array(ids[prefixOffset..<readOffset]), skipSpecialTokens: skipSpecialTokens)
        let full = tokenizer.decode(Array(ids[prefixOffset...]), skipSpecialTokens: skipSpecialTokens)
        guard full.unicodeScalars.count > prefix.unicodeScalars.count, full.unicodeScalars.last != "\u{FFFD}" else { return "" }
        let new = String(String.UnicodeScalarView(full.unicodeScalars.dropFirst(prefix.unicodeScalars.count)))
        prefixOffset = readOffset
        readOffset = ids.count
        return new
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    public mutating func flush() -> String {
        let prefix = tokenizer.decode(Array(ids[prefixOffset..<readOffset]), skipSpecialTokens: skipSpecialTokens)
        let full = tokenizer.decode(Array(ids[prefixOffset...]), skipSpecialTokens: skipSpecialTokens)
        readOffset = ids.count
        prefixOffset = readOffset
        guard full.unicodeScalars.count > prefix.unicodeScalars.count else { return "" }
        return String(String.UnicodeScalarView(full.unicodeScalars.dropFirst(prefix.unicodeScalars.count)))
    }
}
