import Foundation
import XCTest
@testable import Peregrine

/// Paths of the committed fixtures (made by scripts/make_fixtures.py).
enum Fixtures {
    static let root: String = {
        URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
            .appendingPathComponent("Fixtures").path
    }()

    static func model(_ name: String) -> String { root + "/models/" + name }
    static func tokenizer(_ kind: String) -> String { root + "/tokenizers/" + kind }

    static func json(_ path: String) throws -> JSONValue { try FileSystem.readJSON(path) }

    static func floats(_ path: String) throws -> [Float] {
        let bytes = try FileSystem.read(path)
        return bytes.withUnsafeBytes { raw in
            (0..<(bytes.count / 4)).map { raw.loadUnaligned(fromByteOffset: $0 * 4, as: Float.self) }
        }
    }

    /// A fresh temporary directory, removed at the end of the test.
    static func tempDirectory(_ test: XCTestCase) throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("peregrine-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        test.addTeardownBlock { try? FileManager.default.removeItem(atPath: dir) }
        return dir
    }
}

struct Reference {
    let promptIds: [Int]
    let greedyIds: [Int]
    let rows: Int
    let vocab: Int
    let logits: [Float]
    let json: JSONValue

    init(model name: String, logitsFile: String = "reference_logits.bin") throws {
        let dir = Fixtures.model(name)
        json = try Fixtures.json(dir + "/reference.json")
        promptIds = json["prompt_ids"]?.array?.compactMap(\.int) ?? []
        greedyIds = json["greedy_ids"]?.array?.compactMap(\.int) ?? []
        rows = json["rows"]?.int ?? 0
        vocab = json["vocab"]?.int ?? 0
        logits = try Fixtures.floats(dir + "/" + logitsFile)
    }

    func row(_ r: Int) -> ArraySlice<Float> { logits[(r * vocab)..<((r + 1) * vocab)] }
}

/// The logits of every position of `tokens`, run as one sequence in one forward pass.
func allLogits(_ model: LanguageModel, _ tokens: [Int], cacheType: KVCacheType = .f32) throws -> [Float] {
    let cache = try PagedKVCache(model: model, slots: 1, capacity: tokens.count, type: cacheType)
    var plan = BatchPlan()
    plan.append(tokens: tokens, slot: 0, position: 0, logits: .all)
    var logits = [Float](repeating: 0, count: tokens.count * model.config.vocabSize)
    try cache.prepare(&plan)
    try logits.withUnsafeMutableBufferPointer { try model.forward(plan, kv: cache.memory, logits: $0) }
    return logits
}

/// Each position of `tokens` decoded one at a time through a fresh cache gives exactly its row
/// of `logits`, the logits of the same tokens in one pass: a row must not depend on its batch.
func assertOneTokenAtATime(_ model: LanguageModel, _ tokens: [Int], give logits: [Float], _ name: String,
                           file: StaticString = #filePath, line: UInt = #line) throws {
    let v = model.config.vocabSize
    let solo = try PagedKVCache(model: model, slots: 1, capacity: tokens.count)
    var one = [Float](repeating: 0, count: v)
    for (i, t) in tokens.enumerated() {
        var p = BatchPlan()
        p.append(tokens: [t], slot: 0, position: i, logits: .last)
        try solo.prepare(&p)
        try one.withUnsafeMutableBufferPointer { try model.forward(p, kv: solo.memory, logits: $0) }
        XCTAssertEqual(one, Array(logits[(i * v)..<((i + 1) * v)]), "\(name) row \(i)", file: file, line: line)
    }
}

/// The largest |a - b|; NaN where any difference is NaN (Swift's max would pass a NaN over), and
/// infinity where the lengths differ.
func maxAbsDiff(_ a: some Collection<Float>, _ b: some Collection<Float>) -> Float {
    guard a.count == b.count else { return .infinity }
    return zip(a, b).reduce(0) { m, pair in
        let d = abs(pair.0 - pair.1)
        return d <= m ? m : d
    }
}
