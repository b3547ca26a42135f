extension Tokenizer {
    /// The tokenizer stored in a GGUF file's metadata: GPT-2-style byte-level BPE (tokens,
    /// merges, token types, special ids) with the pre-tokenizer its `tokenizer.ggml.pre` names,
    /// or SentencePiece's BPE ("llama": tokens with scores, byte fallback).
    public convenience init(gguf g: GGUFFile) throws {
        func bad(_ m: String) -> PeregrineError { .format("\(g.path): \(m)") }
        let model = g.metadata["tokenizer.ggml.model"]?.string ?? "none"
        if model == "llama" {
            try self.init(sentencePieceGGUF: g)
            return
        }
        guard model == "gpt2" else {
            throw PeregrineError.unsupported("\(g.path): unsupported GGUF tokenizer model '\(model)' (supported: gpt2, llama)")
        }
        guard let tokens = g.metadata["tokenizer.ggml.tokens"]?.array?.map({ $0.string }), !tokens.isEmpty else {
            throw bad("no tokenizer.ggml.tokens")
        }
        let types = g.metadata["tokenizer.ggml.token_type"]?.array?.map { $0.int ?? 1 } ?? []
        let merges = (g.metadata["tokenizer.ggml.merges"]?.array ?? []).map { JSONValue.string($0.string ?? "") }
        let pre = g.metadata["tokenizer.ggml.pre"]?.string ?? "default"
        let pattern: String
        // Whether a word found whole in the vocabulary is one token without its merges: llama.cpp
        // sets it for the Llama 3 names, not for GPT-2's or dbrx's.
        var ignoreMerges = true
        switch pre {
        case "llama-bpe", "llama3", "llama-v3": pattern = ScalarRegex.llama3Pattern
        case "qwen2": pattern = ScalarRegex.qwen2Pattern
        case "gpt-2", "default":
            pattern = ScalarRegex.gpt2Pattern
            ignoreMerges = false
        case "dbrx", "smaug-bpe":
            // cl100k's split (Llama 3's pattern), llama.cpp's name for it in Phi-4's files among others.
            pattern = ScalarRegex.llama3Pattern
            ignoreMerges = false
        default:
            throw PeregrineError.unsupported("\(g.path): unsupported GGUF pre-tokenizer '\(pre)' (supported: llama-bpe, qwen2, gpt-2, dbrx)")
        }
        var vocab = JSONObject()
        var added: [JSONValue] = []
        for (id, t) in tokens.enumerated() {
            guard let t else { throw bad("token \(id) is not a string") }
            let type = id < types.count ? types[id] : 1
            if type == 3 || type == 4 {  // control, user-defined: matched whole in text
                added.append(.object(JSONObject([("id", .number(Double(id))), ("content", .string(t)), ("special", .bool(type == 3))])))
            } else {
                vocab.append(t, .number(Double(id)))
            }
        }
        var json = JSONObject()
        json["model"] = .object(JSONObject([("type", .string("BPE")), ("vocab", .object(vocab)), ("merges", .array(merges)),
                                            ("ignore_merges", .bool(ignoreMerges))]))
        json["added_tokens"] = .array(added)
        json["pre_tokenizer"] = .object(JSONObject([("type", .string("Sequence")), ("pretokenizers", .array([
            .object(JSONObject([("type", .string("Split")), ("pattern", .object(JSONObject([("Regex", .string(pattern))]))),
                                ("behavior", .string("Isolated")), ("invert", .bool(false))])),
            .object(JSONObject([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)), ("use_regex", .bool(false))])),
        ]))]))
        json["decoder"] = .object(JSONObject([("type", .string("ByteLevel"))]))
        let bos = g.metadata["tokenizer.ggml.bos_token_id"]?.int
        if let bos, g.metadata["tokenizer.ggml.add_bos_token"]?.bool ?? false, bos >= 0, bos < tokens.count, let name = tokens[bos] {
            json["post_processor"] = .object(JSONObject([
                ("type", .string("TemplateProcessing")),
                ("single", .array([.object(JSONObject([("SpecialToken", .object(JSONObject([("id", .string(name))])))])),
                                   .object(JSONObject([("Sequence", .object(JSONObject([("id", .string("A"))])))]))])),
                ("special_tokens", .object(JSONObject([(name, .object(JSONObject([("ids", .array([.number(Double(bos))]))])))]))),
            ]))
        }
        var generation = JSONObject()
        if let eos = g.metadata["tokenizer.ggml.eos_token_id"]?.int { generation["eos_token_id"] = .number(Double(eos)) }
        try self.init(json: .object(json), config: nil, generationConfig: .object(generation))
    }

    /// SentencePiece BPE as llama.cpp stores it: no merge list, but a score per token; the pair
    /// whose joined piece scores highest merges first. The same merges as a ranked list (every
    /// split of every piece into two pieces, by the joined piece's score) run through the BPE
    /// model, with spaces as "▁", a "▁" prefix and unknown characters as <0xNN> byte tokens.
    convenience init(sentencePieceGGUF g: GGUFFile) throws {
        func bad(_ m: String) -> PeregrineError { .format("\(g.path): \(m)") }
        guard let tokens = g.metadata["tokenizer.ggml.tokens"]?.array?.map({ $0.string }), !tokens.isEmpty else {
            throw bad("no tokenizer.ggml.tokens")
        }
        let scores = g.metadata["tokenizer.ggml.scores"]?.array?.map { $0.double ?? 0 } ?? []
        guard scores.count == tokens.count else { throw bad("tokenizer.ggml.scores has \(scores.count) values for \(tokens.count) tokens") }
        let types = g.metadata["tokenizer.ggml.token_type"]?.array?.map { $0.int ?? 1 } ?? []
        var vocab = JSONObject()
        var added: [JSONValue] = []
        var ids: [String: Int] = [:]
        var unk: String?
        for (id, t) in tokens.enumerated() {
            guard let t else { throw bad("token \(id) is not a string") }
            let type = id < types.count ? types[id] : 1
            // Control, user-defined and the unknown token are matched whole in text, as
            // llama.cpp does when it parses special tokens.
            if type == 2 || type == 3 || type == 4 {
                added.append(.object(JSONObject([("id", .number(Double(id))), ("content", .string(t)), ("special", .bool(type != 4))])))
            }
            if type == 2 { unk = t }
            if type != 3 && type != 4 {
                vocab.append(t, .number(Double(id)))
                if ids[t] == nil { ids[t] = id }
            }
        }
        var merges: [(left: String, right: String, score: Double, id: Int)] = []
        for (id, t) in tokens.enumerated() {
            let type = id < types.count ? types[id] : 1
            guard let t, type == 1 else { continue }
            let scalars = Array(t.unicodeScalars)
            guard scalars.count > 1 else { continue }
            for i in 1..<scalars.count {
                let l = String(String.UnicodeScalarView(scalars[..<i])), r = String(String.UnicodeScalarView(scalars[i...]))
                if ids[l] != nil, ids[r] != nil { merges.append((l, r, scores[id], id)) }
            }
        }
        merges.sort { a, b in
            if a.score != b.score { return a.score > b.score }
            if a.id != b.id { return a.id < b.id }
            return ids[a.left]! < ids[b.left]!
        }
        let prefix = g.metadata["tokenizer.ggml.add_space_prefix"]?.bool ?? true
        var json = JSONObject()
        var bpe = JSONObject([("type", .string("BPE")), ("vocab", .object(vocab)),
                              ("merges", .array(merges.map { .string($0.left + " " + $0.right) })),
                              ("byte_fallback", .bool(true)), ("fuse_unk", .bool(true))])
        if let unk { bpe["unk_token"] = .string(unk) }
        json["model"] = .object(bpe)
        json["added_tokens"] = .array(added)
        var normalizers: [JSONValue] = []
        if prefix { normalizers.append(.object(JSONObject([("type", .string("Prepend")), ("prepend", .string("\u{2581}"))]))) }
        normalizers.append(.object(JSONObject([("type", .string("Replace")), ("pattern", .object(JSONObject([("String", .string(" "))]))),
                                               ("content", .string("\u{2581}"))])))
        json["normalizer"] = .object(JSONObject([("type", .string("Sequence")), ("normalizers", .array(normalizers))]))
        var decoders: [JSONValue] = [
            .object(JSONObject([("type", .string("Replace")), ("pattern", .object(JSONObject([("String", .string("\u{2581}"))]))),
                                ("content", .string(" "))])),
            .object(JSONObject([("type", .string("ByteFallback"))])),
            .object(JSONObject([("type", .string("Fuse"))])),
        ]
        if prefix {
            decoders.append(.object(JSONObject([("type", .string("Strip")), ("content", .string(" ")), ("start", .number(1)), ("stop", .number(0))])))
        }
        json["decoder"] = .object(JSONObject([("type", .string("Sequence")), ("decoders", .array(decoders))]))
        var single: [JSONValue] = []
        var specials = JSONObject()
        func special(_ key: String) -> (String, Int)? {
            guard let id = g.metadata["tokenizer.ggml.\(key)_token_id"]?.int, id >= 0, id < tokens.count, let name = tokens[id] else { return nil }
            return (name, id)
        }
        if g.metadata["tokenizer.ggml.add_bos_token"]?.bool ?? true, let (name, id) = special("bos") {
            single.append(.object(JSONObject([("SpecialToken", .object(JSONObject([("id", .string(name))])))])))
            specials[name] = .object(JSONObject([("ids", .array([.number(Double(id))]))]))
        }
        single.append(.object(JSONObject([("Sequence", .object(JSONObject([("id", .string("A"))])))])))
        if g.metadata["tokenizer.ggml.add_eos_token"]?.bool ?? false, let (name, id) = special("eos") {
            single.append(.object(JSONObject([("SpecialToken", .object(JSONObject([("id", .string(name))])))])))
            specials[name] = .object(JSONObject([("ids", .array([.number(Double(id))]))]))
        }
        json["post_processor"] = .object(JSONObject([("type", .string("TemplateProcessing")), ("single", .array(single)),
                                                     ("special_tokens", .object(specials))]))
        var generation = JSONObject()
        if let (_, eos) = special("eos") { generation["eos_token_id"] = .number(Double(eos)) }
        try self.init(json: .object(json), config: nil, generationConfig: .object(generation))
    }
}
