import Foundation
import XCTest
@testable import Peregrine

/// Every kind of bad input gives one clear error, never a crash.
final class BadInputTests: XCTestCase {
    /// Writes a safetensors file from a header object and a data section.
    func writeSafetensors(_ path: String, header: String, data: [UInt8]) throws {
        var bytes = withUnsafeBytes(of: UInt64(header.utf8.count).littleEndian) { Array($0) }
        bytes += Array(header.utf8) + data
        try Data(bytes).write(to: URL(fileURLWithPath: path))
    }

    func assertFormatError(_ body: () throws -> Void, contains: String, file: StaticString = #filePath, line: UInt = #line) {
        XCTAssertThrowsError(try body(), file: file, line: line) { e in
            guard let e = e as? PeregrineError else { return XCTFail("not a PeregrineError: \(e)", file: file, line: line) }
            XCTAssertTrue(e.description.contains(contains), "'\(e.description)' lacks '\(contains)'", file: file, line: line)
            XCTAssertFalse(e.description.contains("\n"), "error spans lines", file: file, line: line)
        }
    }

    func testSafetensorsHeaderLies() throws {
        let dir = try Fixtures.tempDirectory(self)
        let p = dir + "/model.safetensors"
        let cases: [(String, [UInt8], String)] = [
            (#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#, [UInt8](repeating: 0, count: 8), "outside"),
            (#"{"a":{"dtype":"Q9","shape":[4],"data_offsets":[0,16]}}"#, [UInt8](repeating: 0, count: 16), "unsupported dtype"),
            (#"{"a":{"dtype":"F32","shape":[5],"data_offsets":[0,16]}}"#, [UInt8](repeating: 0, count: 20), "bytes of data"),
            (#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}}"#,
             [UInt8](repeating: 0, count: 24), "overlap"),
            (#"{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,16]}}"#, [UInt8](repeating: 0, count: 16), "invalid shape"),
            (#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[16,0]}}"#, [UInt8](repeating: 0, count: 16), "outside"),
            (#"{"a":{"dtype":"F32","shape":[4]}}"#, [UInt8](repeating: 0, count: 16), "data_offsets"),
            (#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}"#, [UInt8](repeating: 0, count: 16), "invalid JSON"),
            (#"[1,2]"#, [], "not a JSON object"),
            (#"{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,16]}}"#, [UInt8](repeating: 0, count: 16), "shape"),
        ]
        for (header, data, message) in cases {
            try writeSafetensors(p, header: header, data: data)
            assertFormatError({ _ = try SafeTensorsFile(path: p) }, contains: message)
        }
        // Header length past the end, and a file shorter than the length field.
        try Data(withUnsafeBytes(of: UInt64(1000).littleEndian) { Array($0) } + [0x7B]).write(to: URL(fileURLWithPath: p))
        assertFormatError({ _ = try SafeTensorsFile(path: p) }, contains: "past the end")
        try Data([1, 2, 3]).write(to: URL(fileURLWithPath: p))
        assertFormatError({ _ = try SafeTensorsFile(path: p) }, contains: "shorter")
        try Data().write(to: URL(fileURLWithPath: p))
        assertFormatError({ _ = try SafeTensorsFile(path: p) }, contains: "shorter")
        assertFormatError({ _ = try SafeTensorsFile(path: dir + "/missing.safetensors") }, contains: "cannot open")
        assertFormatError({ _ = try SafeTensorsFile(path: dir) }, contains: "not a regular file")
    }

    /// Copies a fixture model so one file can be damaged.
    func copyModel(_ name: String = "llama") throws -> String {
        let dir = try Fixtures.tempDirectory(self) + "/model"
        try FileManager.default.copyItem(atPath: Fixtures.model(name), toPath: dir)
        return dir
    }

    func testTruncatedWeights() throws {
        let dir = try copyModel()
        let p = dir + "/model.safetensors"
        let data = try Data(contentsOf: URL(fileURLWithPath: p))
        try data.prefix(data.count - 100).write(to: URL(fileURLWithPath: p))
        assertFormatError({ _ = try ModelRegistry.load(directory: dir) }, contains: "outside")
    }

    func testMissingFiles() throws {
        let dir = try copyModel()
        try FileManager.default.removeItem(atPath: dir + "/model.safetensors")
        assertFormatError({ _ = try ModelRegistry.load(directory: dir) }, contains: "no model.safetensors")
        try FileManager.default.removeItem(atPath: dir + "/config.json")
        assertFormatError({ _ = try ModelRegistry.load(directory: dir) }, contains: "no config.json")
        try FileManager.default.removeItem(atPath: dir + "/tokenizer.json")
        assertFormatError({ _ = try Tokenizer(directory: dir) }, contains: "no tokenizer.json")
        assertFormatError({ _ = try ModelRegistry.load(directory: dir + "/nope") }, contains: "not a model directory")
    }

    func testMissingTensorAndWrongShape() throws {
        let src = try SafeTensorsFile(path: Fixtures.model("llama") + "/model.safetensors")
        // Rewrite the weights without one tensor, then with one tensor of the wrong shape.
        for mode in ["drop", "reshape"] {
            let dir = try copyModel()
            var header = JSONObject()
            var data: [UInt8] = []
            for name in src.names.sorted() {
                let t = src.tensor(name)!
                if mode == "drop" && name == "model.layers.1.mlp.up_proj.weight" { continue }
                var shape = t.shape
                if mode == "reshape" && name == "model.layers.0.self_attn.k_proj.weight" { shape = [shape[1], shape[0]] }
                header[name] = .object(JSONObject([("dtype", .string(t.dtype.rawValue)), ("shape", .array(shape.map { .number(Double($0)) })),
                                                   ("data_offsets", .array([.number(Double(data.count)), .number(Double(data.count + t.byteCount))]))]))
                data += Array(UnsafeRawBufferPointer(start: t.data, count: t.byteCount))
            }
            try writeSafetensors(dir + "/model.safetensors", header: JSONWriter.write(.object(header)), data: data)
            if mode == "drop" {
                assertFormatError({ _ = try ModelRegistry.load(directory: dir) }, contains: "missing tensor 'model.layers.1.mlp.up_proj.weight'")
            } else {
                assertFormatError({ _ = try ModelRegistry.load(directory: dir) }, contains: "has shape [64, 32], expected [32, 64]")
            }
        }
    }

    func testBadConfigs() throws {
        let base = try String(contentsOfFile: Fixtures.model("llama") + "/config.json", encoding: .utf8)
        let cases: [(String, String)] = [
            (base.replacingOccurrences(of: "LlamaForCausalLM", with: "GPTNeoXForCausalLM"), "unsupported architecture GPTNeoXForCausalLM; supported: LlamaForCausalLM"),
            (base.replacingOccurrences(of: "\"hidden_size\": 64", with: "\"hidden_size\": -64"), "'hidden_size' must be a positive integer"),
            (base.replacingOccurrences(of: "\"num_hidden_layers\": 2", with: "\"num_hidden_layers\": 1000000000000"), "'num_hidden_layers' must be a positive integer up to"),
            (base.replacingOccurrences(of: "\"num_key_value_heads\": 2", with: "\"num_key_value_heads\": 3"), "not a multiple"),
            (base.replacingOccurrences(of: "\"num_hidden_layers\": 2,", with: ""), "missing 'num_hidden_layers'"),
            (base.replacingOccurrences(of: "\"rope_type\": \"llama3\"", with: "\"rope_type\": \"yarn-ish\""), "unsupported rope_scaling type"),
            (String(base.prefix(100)), "invalid JSON"),
            ("[]", "not a JSON object"),
            ("", "invalid JSON"),
        ]
        for (text, message) in cases {
            let dir = try copyModel()
            try text.write(toFile: dir + "/config.json", atomically: true, encoding: .utf8)
            assertFormatError({ _ = try ModelRegistry.load(directory: dir) }, contains: message)
        }
    }

    func testBadTokenizers() throws {
        let base = try String(contentsOfFile: Fixtures.tokenizer("llama3") + "/tokenizer.json", encoding: .utf8)
        let cases: [(String, String)] = [
            (String(base.prefix(base.count / 2)), "invalid JSON"),
            (base.replacingOccurrences(of: "\"type\": \"BPE\"", with: "\"type\": \"Unigram\""), "unsupported model type 'Unigram'"),
            (base.replacingOccurrences(of: "\"type\": \"ByteLevel\"", with: "\"type\": \"Mystery\""), "unsupported"),
            ("{}", "no model"),
            ("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [\"a b\"]}}", "missing from the vocab"),
            ("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": -3}, \"merges\": []}}", "invalid id"),
            ("{\"model\": {\"type\": \"BPE\", \"vocab\": {\"a\": 0}, \"merges\": [7]}}", "not a pair"),
        ]
        for (text, message) in cases {
            let dir = try Fixtures.tempDirectory(self)
            try text.write(toFile: dir + "/tokenizer.json", atomically: true, encoding: .utf8)
            assertFormatError({ _ = try Tokenizer(directory: dir) }, contains: message)
        }
    }

    func testBadGenerationRequests() throws {
        let dir = Fixtures.model("llama")
        let gen = Generator(model: try ModelRegistry.load(directory: dir), tokenizer: try Tokenizer(directory: dir))
        var o = GenerationOptions()
        o.maxTokens = 4
        assertFormatError({ try gen.generate(prompt: "", options: o) }, contains: "the prompt is empty")
        assertFormatError({ try gen.generate(promptTokens: [], options: o) }, contains: "the prompt is empty")
        assertFormatError({ try gen.generate(promptTokens: [100_000], options: o) }, contains: "outside the model's vocabulary")
        let long = String(repeating: "word ", count: 400)
        assertFormatError({ try gen.generate(prompt: long, options: o) }, contains: "context length is 256")
        o.maxTokens = 250
        assertFormatError({ try gen.generate(prompt: "Hello there", options: o) }, contains: "exceeds the context length (256)")
        o.maxTokens = 4
        o.contextLength = 1 << 40
        o.maxTokens = 1 << 39
        assertFormatError({ try gen.generate(prompt: "Hello", options: o) }, contains: "more than this machine's memory")
        o = GenerationOptions()
        for (change, message) in [({ (p: inout SamplingParameters) in p.temperature = -1 }, "temperature"),
                                  ({ $0.topP = 0 }, "top-p"), ({ $0.topP = 1.5 }, "top-p"), ({ $0.minP = 1 }, "min-p"),
                                  ({ $0.topK = -2 }, "top-k"), ({ $0.repetitionPenalty = 0 }, "repetition penalty"),
                                  ({ $0.temperature = .nan }, "temperature")] as [((inout SamplingParameters) -> Void, String)] {
            var opts = GenerationOptions()
            change(&opts.sampling)
            assertFormatError({ try gen.generate(prompt: "Hi", options: opts) }, contains: message)
        }
    }

    /// Weights split over shards listed by model.safetensors.index.json load like one file;
    /// an index naming a missing shard is an error.
    func testShardedWeights() throws {
        let src = try SafeTensorsFile(path: Fixtures.model("qwen2") + "/model.safetensors")
        let dir = try copyModel("qwen2")
        try FileManager.default.removeItem(atPath: dir + "/model.safetensors")
        var map = JSONObject()
        for shard in 0..<2 {
            var header = JSONObject()
            var data: [UInt8] = []
            let file = "model-0000\(shard + 1)-of-00002.safetensors"
            for (i, name) in src.names.sorted().enumerated() where i % 2 == shard {
                let t = src.tensor(name)!
                header[name] = .object(JSONObject([("dtype", .string(t.dtype.rawValue)), ("shape", .array(t.shape.map { .number(Double($0)) })),
                                                   ("data_offsets", .array([.number(Double(data.count)), .number(Double(data.count + t.byteCount))]))]))
                data += Array(UnsafeRawBufferPointer(start: t.data, count: t.byteCount))
                map[name] = .string(file)
            }
            try writeSafetensors(dir + "/" + file, header: JSONWriter.write(.object(header)), data: data)
        }
        let index = JSONWriter.write(.object(JSONObject([("metadata", .object(JSONObject())), ("weight_map", .object(map))])))
        try index.write(toFile: dir + "/model.safetensors.index.json", atomically: true, encoding: .utf8)
        let sharded = try ModelRegistry.load(directory: dir)
        let whole = try ModelRegistry.load(directory: Fixtures.model("qwen2"))
        let ref = try Reference(model: "qwen2")
        var a = [Float](repeating: 0, count: ref.vocab), b = a
        for (m, out) in [(sharded, 0), (whole, 1)] {
            let cache = try PagedKVCache(model: m, slots: 1, capacity: 64)
            var plan = BatchPlan()
            plan.append(tokens: ref.promptIds, slot: 0, position: 0, logits: .last)
            try cache.prepare(&plan)
            if out == 0 { try a.withUnsafeMutableBufferPointer { try m.forward(plan, kv: cache.memory, logits: $0) } }
            else { try b.withUnsafeMutableBufferPointer { try m.forward(plan, kv: cache.memory, logits: $0) } }
        }
        XCTAssertEqual(a, b)
        try FileManager.default.removeItem(atPath: dir + "/model-00002-of-00002.safetensors")
        assertFormatError({ _ = try ModelRegistry.load(directory: dir) }, contains: "cannot open")
    }
}
