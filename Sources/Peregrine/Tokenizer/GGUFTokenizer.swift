extension Tokenizer {
    /// The tokenizer stored in a GGUF file's metadata: GPT-2-style byte-level BPE (tokens,
    /// merges, token types, special ids) with the pre-tokenizer its `tokenizer.ggml.pre` names.
    public convenience init(gguf g: GGUFFile) throws {
        func bad(_ m: String) -> PeregrineError { .format("\(g.path): \(m)") }
        let model = g.metadata["tokenizer.ggml.model"]?.string ?? "none"
        guard model == "gpt2" else {
            throw PeregrineError.unsupported("\(g.path): unsupported GGUF tokenizer model '\(model)' (supported: gpt2)")
        }
        guard let tokens = g.metadata["tokenizer.ggml.tokens"]?.array?.map({ $0.string }), !tokens.isEmpty else {
            throw bad("no tokenizer.ggml.tokens")
        }
        let types = g.metadata["tokenizer.ggml.token_type"]?.array?.map { $0.int ?? 1 } ?? []
        let merges = (g.metadata["tokenizer.ggml.merges"]?.array ?? []).map { JSONValue.string($0.string ?? "") }
        let pre = g.metadata["tokenizer.ggml.pre"]?.string ?? "default"
        let pattern: String
        switch pre {
        case "llama-bpe", "llama3", "llama-v3": pattern = ScalarRegex.llama3Pattern
        case "qwen2": pattern = ScalarRegex.qwen2Pattern
        case "gpt-2", "default": pattern = ScalarRegex.gpt2Pattern
        default: throw PeregrineError.unsupported("\(g.path): unsupported GGUF pre-tokenizer '\(pre)' (supported: llama-bpe, qwen2, gpt-2)")
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
                                            ("ignore_merges", .bool(pre != "gpt-2" && pre != "default"))]))
        json["added_tokens"] = .array(added)
        json["pre_tokenizer"] = .object(JSONObject([("type", .string("Sequence")), ("pretokenizers", .array([
            .object(JSONObject([("type", .string("Split")), ("pattern", .object(JSONObject([("Regex", .string(pattern))]))),
                                ("behavior", .string("Isolated")), ("invert", .bool(false))])),
            .object(JSONObject([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)), ("use_regex", .bool(false))])),
        ]))]))
        json["decoder"] = .object(JSONObject([("type", .string("ByteLevel"))]))
        let bos = g.metadata["tokenizer.ggml.bos_token_id"]?.int
        if let bos, g.metadata["tokenizer.ggml.add_bos_token"]?.bool ?? false, bos < tokens.count, let name = tokens[bos] {
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
}
