import XCTest
@testable import Peregrine

/// The serving engine on the shipped reference model: batch invariance, preemption, prefix
/// caching, forked samples, cancellation and refusals, checked through outputs and the block
/// pool's counts.
final class EngineTests: XCTestCase {
    static var shared: (LanguageModel, Tokenizer)?

    func load() throws -> (LanguageModel, Tokenizer) {
        if let s = Self.shared { return s }
        let s = (try ModelRegistry.load(directory: ReferenceModelTests.modelDir), try Tokenizer(directory: ReferenceModelTests.modelDir))
        Self.shared = s
        return s
    }

    /// Prompts of different lengths from the corpus's opening words.
    func prompts(_ tokenizer: Tokenizer, count: Int) -> [[Int]] {
        let seeds = ["And God said", "In the beginning", "The LORD is my shepherd", "Python is a programming language",
                     "The kernel", "And it came to pass, when", "Debian is", "Blessed are the", "A hacker is",
                     "Now the serpent was more subtil than any beast of the field"]
        return (0..<count).map { i in
            var ids = tokenizer.encode(seeds[i % seeds.count])
            // Vary lengths past block boundaries, so tables of 1-4 blocks mix in one batch.
            ids += ids.prefix(i % 7) + Array(repeating: ids.last ?? 1, count: (i * 5) % 40)
            return ids
        }
    }

    func request(_ p: [Int], _ n: Int = 24, sampling: SamplingParameters = .greedy) -> EngineRequest {
        var r = EngineRequest(promptTokens: p, maxTokens: n, sampling: sampling)
        r.ignoreEOS = true
        return r
    }

    func alone(_ engineConfig: EngineConfig = EngineConfig(), _ r: EngineRequest) throws -> EngineResult {
        let (model, tokenizer) = try load()
        let e = try Engine(model: model, tokenizer: tokenizer, config: engineConfig)
        return try XCTUnwrap(e.generate(prompts: [r]).first)
    }

    /// 64 requests run together give, each, the tokens that request gives alone, greedy and sampled.
    func testBatchOf64EqualsEachAlone() throws {
        let (model, tokenizer) = try load()
        var sampled = SamplingParameters()
        sampled.seed = 7
        let ps = prompts(tokenizer, count: 64)
        let requests = ps.enumerated().map { i, p -> EngineRequest in
            var s = sampled
            s.seed = UInt64(i)
            return request(p, 20, sampling: i % 2 == 0 ? .greedy : s)
        }
        var config = EngineConfig()
        config.maxBatchTokens = 256  // prompts are read in chunks while others decode
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        let together = try engine.generate(prompts: requests)
        XCTAssertEqual(together.count, 64)
        for (i, r) in requests.enumerated() {
            let solo = try alone(EngineConfig(), r)
            XCTAssertEqual(together[i].tokens, solo.tokens, "request \(i)")
            XCTAssertEqual(together[i].text, solo.text, "request \(i)")
            XCTAssertEqual(together[i].tokens.count, 20)
        }
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0, "every block is back once all finished")
    }

    /// A pool too small for the batch preempts; every request still completes with the tokens it
    /// gives alone.
    func testPreemptionKeepsOutputs() throws {
        let (model, tokenizer) = try load()
        let ps = prompts(tokenizer, count: 12)
        let requests = ps.map { request($0, 40) }
        var config = EngineConfig()
        config.kvBlocks = 16  // 256 positions for 12 sequences of up to ~100
        config.prefixCaching = false
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        let together = try engine.generate(prompts: requests)
        XCTAssertGreaterThan(engine.stats.preemptions, 0, "the pool was meant to run out")
        for (i, r) in requests.enumerated() {
            XCTAssertEqual(together[i].tokens, try alone(EngineConfig(), r).tokens, "request \(i)")
            XCTAssertEqual(together[i].finishReason, .length)
        }
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
    }

    /// With no cache type asked for, an engine on the CPU stores F32 (the backend's preference);
    /// one asked for F16 stores F16, with half the bytes a block.
    func testKVCacheTypeDefaultsToTheBackendsPreference() throws {
        let (model, tokenizer) = try load()
        XCTAssertEqual(model.preferredKVCacheType, .f32)
        var config = EngineConfig()
        config.kvBlocks = 8
        let plain = try Engine(model: model, tokenizer: tokenizer, config: config)
        XCTAssertEqual(plain.kvCacheType, .f32)
        XCTAssertEqual(plain.config.kvCacheType, .f32)
        config.kvCacheType = .f16
        let half = try Engine(model: model, tokenizer: tokenizer, config: config)
        XCTAssertEqual(half.kvCacheType, .f16)
        XCTAssertEqual(PagedKVCache.bytesPerPosition(model.config, type: .f16) * 2,
                       PagedKVCache.bytesPerPosition(model.config, type: .f32))
    }

    /// An F16 KV cache: requests batched, preempted and hitting cached prefixes give the tokens
    /// each gives alone with the same cache, and its logits stay close to the f32 cache's.
    func testF16CacheIsBatchInvariantAndCloseToF32() throws {
        let (model, tokenizer) = try load()
        var f16 = EngineConfig()
        f16.kvCacheType = .f16
        let ps = prompts(tokenizer, count: 12)
        let shared = Array(ps[9].prefix(20))
        let requests = ps.map { request($0, 24) } + [request(shared + ps[0], 24), request(shared + ps[1], 24)]
        var small = f16
        small.kvBlocks = 20  // preemption for 14 sequences of up to ~100 positions
        let engine = try Engine(model: model, tokenizer: tokenizer, config: small)
        let together = try engine.generate(prompts: requests)
        XCTAssertGreaterThan(engine.stats.preemptions, 0, "the pool was meant to run out")
        XCTAssertGreaterThan(engine.stats.prefixCacheHits, 0, "cached blocks were mapped (and copied before a write)")
        for (i, r) in requests.enumerated() {
            XCTAssertEqual(together[i].tokens, try alone(f16, r).tokens, "request \(i)")
        }
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
        // Logits of one prompt through both caches: F16 rounding moves them little.
        var a = request(ps[3], 8)
        a.logprobs = 0
        let exact = try alone(EngineConfig(), a), half = try alone(f16, a)
        XCTAssertEqual(exact.tokens.prefix(4), half.tokens.prefix(4))
        for (x, y) in zip(exact.logprobs, half.logprobs) where x.token == y.token {
            XCTAssertEqual(x.logprob, y.logprob, accuracy: 0.02)
        }
    }

    /// With prefix caching, a second request over the same long prefix maps its blocks and gives
    /// the same tokens; shared blocks are never written.
    func testPrefixCacheHitGivesSameTokens() throws {
        let (model, tokenizer) = try load()
        let text = try String(contentsOfFile: ReferenceModelTests.modelDir + "/../corpus/test.txt", encoding: .utf8)
        let system = Array(tokenizer.encode(String(text.prefix(3000))).prefix(200))
        let a = request(system + tokenizer.encode(" And God said"), 16)
        let b = request(system + tokenizer.encode(" The kernel"), 16)
        let engine = try Engine(model: model, tokenizer: tokenizer)
        let first = try engine.generate(prompts: [a])[0]
        XCTAssertEqual(first.cachedPromptTokens, 0)
        let second = try engine.generate(prompts: [b])[0]
        XCTAssertEqual(second.cachedPromptTokens, 192, "the 12 full blocks of the shared 200 tokens")
        XCTAssertEqual(second.tokens, try alone(EngineConfig(), b).tokens)
        // The same prompt again: all but its last block is found, and the answer is unchanged.
        let again = try engine.generate(prompts: [a])[0]
        XCTAssertEqual(again.tokens, first.tokens)
        XCTAssertGreaterThanOrEqual(again.cachedPromptTokens, 192)
        XCTAssertGreaterThan(engine.stats.prefixCacheHits, 0)
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
        XCTAssertGreaterThan(engine.stats.kvBlocksCached, 0)
    }

    /// n samples of one prompt share its blocks; greedy samples all equal the single answer, and
    /// seeded samples each follow their own stream.
    func testSamplesShareThePromptBlocks() throws {
        let (model, tokenizer) = try load()
        let p = prompts(tokenizer, count: 10)[9] + prompts(tokenizer, count: 10)[3]
        var r = request(p, 12)
        r.n = 4
        let engine = try Engine(model: model, tokenizer: tokenizer)
        var peak = 0
        let id = try engine.add(r)
        var results = [[Int]](repeating: [], count: 4)
        while engine.stats.running + engine.stats.waiting > 0 || results[0].isEmpty {
            for o in try engine.step() where o.requestId == id { results[o.index] += o.tokens }
            peak = max(peak, engine.stats.kvBlocksUsed)
        }
        let single = try alone(EngineConfig(), request(p, 12)).tokens
        for i in 0..<4 { XCTAssertEqual(results[i], single, "sample \(i)") }
        // Separate sequences would hold 4 x ceil((prompt + 12) / 16) blocks.
        let separate = 4 * ((p.count + 12 + 15) / 16)
        XCTAssertLessThan(peak, separate, "the prompt's full blocks are held once")
        var sampled = SamplingParameters()
        sampled.seed = 3
        var s = request(p, 12, sampling: sampled)
        s.n = 3
        let outs = try engine.generate(prompts: [s])
        XCTAssertEqual(outs.map(\.index), [0, 1, 2])
        XCTAssertNotEqual(outs[1].tokens, outs[2].tokens, "each sample its own random stream")
        var one = s
        one.n = 1
        XCTAssertEqual(outs[0].tokens, try alone(EngineConfig(), one).tokens, "sample 0 is the request's own stream")
    }

    /// Cancelling in prefill or in decode frees the sequence's blocks at once; the others go on.
    func testCancelFreesBlocks() throws {
        let (model, tokenizer) = try load()
        var config = EngineConfig()
        config.maxBatchTokens = 32
        config.prefixCaching = false
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        let long = request(Array(repeating: 100, count: 300), 8)
        let keep = request(prompts(tokenizer, count: 1)[0], 30)
        let kept = try engine.add(keep)
        let id = try engine.add(long)
        var tokens: [Int] = []
        var reason: FinishReason?
        for _ in 0..<2 { for o in try engine.step() where o.requestId == kept { tokens += o.tokens } }
        XCTAssertGreaterThan(engine.stats.kvBlocksUsed, 2, "both hold blocks mid-prefill")
        let before = engine.stats.kvBlocksUsed
        engine.cancel(id)
        XCTAssertLessThan(engine.stats.kvBlocksUsed, before, "the cancelled prompt's blocks are free")
        while reason == nil {
            for o in try engine.step() where o.requestId == kept {
                tokens += o.tokens
                reason = o.finishReason
            }
        }
        XCTAssertEqual(tokens, try alone(EngineConfig(), keep).tokens)
        // In decode.
        let d = try engine.add(keep)
        for _ in 0..<5 { try engine.step() }
        XCTAssertGreaterThan(engine.stats.kvBlocksUsed, 0)
        engine.cancel(d)
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
        XCTAssertEqual(engine.stats.running, 0)
    }

    /// Chained decode steps (the next step queued before this one's tokens are read, its tokens
    /// taken where this one left them), asked for on the CPU: the same tokens, texts and finish
    /// reasons as steps one at a time, for greedy requests stopping at their length, at the end
    /// of sequence, at a stop string and when cancelled, beside sampled ones (whose steps are not
    /// chained); every block back at the end.
    func testChainedStepsGiveTheSameTokens() throws {
        let (model, tokenizer) = try load()
        let ps = prompts(tokenizer, count: 8)
        var sampled = SamplingParameters()
        sampled.seed = 3
        func mixed() -> [EngineRequest] {
            ps.enumerated().map { i, p in
                var r = request(p, 6 + 5 * i)
                if i % 3 == 1 { r.ignoreEOS = false }
                if i == 5 { r.sampling = sampled }
                return r
            }
        }
        let words = try alone(EngineConfig(), request(ps[0], 30)).text.split(separator: " ")
        guard words.count > 3 else { return XCTFail("too few words for a stop string: \(words)") }
        var stopping = request(ps[0], 30)
        stopping.stopStrings = [String(words[2])]
        var eos = request(ps[4], 40)
        eos.ignoreEOS = false
        eos.stopTokenIds = [try alone(EngineConfig(), request(ps[4], 40)).tokens[9]]  // stops at the tenth token
        var single = EngineConfig(), chained = EngineConfig()
        single.chainDecodeSteps = false
        chained.chainDecodeSteps = true
        for batch in [mixed(), mixed().filter { $0.sampling.temperature == 0 }, [stopping], [eos], [request(ps[1], 24)]] {
            let one = try Engine(model: model, tokenizer: tokenizer, config: single)
            let two = try Engine(model: model, tokenizer: tokenizer, config: chained)
            let a = try one.generate(prompts: batch), b = try two.generate(prompts: batch)
            XCTAssertEqual(a.count, b.count)
            for (x, y) in zip(a, b) {
                XCTAssertEqual(x.tokens, y.tokens)
                XCTAssertEqual(x.text, y.text)
                XCTAssertEqual(x.finishReason, y.finishReason)
            }
            XCTAssertEqual(one.chainedSteps, 0)
            XCTAssertGreaterThan(two.chainedSteps, 0)
            XCTAssertEqual(two.stats.kvBlocksUsed, 0)
        }
        // A request cancelled while a chained step is queued: its blocks are free at once, and
        // the next request gives the tokens it gives alone.
        let engine = try Engine(model: model, tokenizer: tokenizer, config: chained)
        let id = try engine.add(request(ps[3], 50))
        for _ in 0..<6 { try engine.step() }
        XCTAssertGreaterThan(engine.chainedSteps, 0)
        engine.cancel(id)
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
        XCTAssertEqual(engine.stats.running, 0)
        let after = try engine.generate(prompts: [request(ps[6], 12)])
        XCTAssertEqual(after.first?.tokens, try alone(single, request(ps[6], 12)).tokens)
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
        // Two engines on one model (one backend): one after the other after a stop that left a
        // step queued, and stepped in turns, each gives its own tokens.
        let a = try Engine(model: model, tokenizer: tokenizer, config: chained)
        let b = try Engine(model: model, tokenizer: tokenizer, config: chained)
        XCTAssertEqual(try a.generate(prompts: [eos]).first?.tokens, try alone(single, eos).tokens)
        XCTAssertEqual(try b.generate(prompts: [request(ps[1], 16)]).first?.tokens, try alone(single, request(ps[1], 16)).tokens)
        XCTAssertEqual(try a.generate(prompts: [request(ps[2], 16)]).first?.tokens, try alone(single, request(ps[2], 16)).tokens)
        let ia = try a.add(request(ps[5], 20)), ib = try b.add(request(ps[7], 20))
        var ta: [Int] = [], tb: [Int] = []
        var doneA = false, doneB = false
        for _ in 0..<100 where !(doneA && doneB) {
            for o in try a.step() where o.requestId == ia { ta += o.tokens; doneA = doneA || o.finishReason != nil }
            for o in try b.step() where o.requestId == ib { tb += o.tokens; doneB = doneB || o.finishReason != nil }
        }
        XCTAssertEqual(ta, try alone(single, request(ps[5], 20)).tokens)
        XCTAssertEqual(tb, try alone(single, request(ps[7], 20)).tokens)
    }

    /// Requests the engine can never serve are refused with a reason; the others run on.
    /// The warm-up pass (on a GPU by default, asked for here on the CPU) writes only into blocks
    /// no sequence holds and leaves nothing behind: the pool is empty after it, no step counted,
    /// and requests give the tokens they give without it.
    func testWarmUpLeavesPoolAndOutputsAlone() throws {
        let (model, tokenizer) = try load()
        var config = EngineConfig()
        config.maxBatchTokens = 64
        config.maxSequences = 8
        config.kvBlocks = 24
        config.warmUp = true
        let warmed = try Engine(model: model, tokenizer: tokenizer, config: config)
        XCTAssertEqual(warmed.stats.kvBlocksUsed, 0)
        XCTAssertEqual(warmed.stats.steps, 0)
        let requests = prompts(tokenizer, count: 6).map { request($0, 12) }
        let got = try warmed.generate(prompts: requests)
        config.warmUp = false
        let plain = try Engine(model: model, tokenizer: tokenizer, config: config)
        XCTAssertEqual(got.map(\.tokens), try plain.generate(prompts: requests).map(\.tokens))
        XCTAssertEqual(got.count, 6)
    }

    func testRefusals() throws {
        let (model, tokenizer) = try load()
        var config = EngineConfig()
        config.kvBlocks = 8
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        let ok = try engine.add(request(prompts(tokenizer, count: 1)[0], 10))
        func refused(_ r: EngineRequest, _ words: String) {
            XCTAssertThrowsError(try engine.add(r)) { XCTAssertTrue("\($0)".contains(words), "\($0)") }
        }
        refused(request(Array(repeating: 5, count: 1024), 4), "context length")
        refused(request(Array(repeating: 5, count: 200), 4), "more than the pool")
        refused(request([], 4), "empty")
        refused(request([99999], 4), "vocabulary")
        refused(request([5], -1), "max tokens")
        var bad = request([5], 4)
        bad.n = 0
        refused(bad, "n must be")
        bad = request([5], 4)
        bad.sampling.topP = 2
        refused(bad, "top-p")
        var tokens: [Int] = []
        var finished = false
        while !finished {
            for o in try engine.step() where o.requestId == ok {
                tokens += o.tokens
                finished = o.finishReason != nil
            }
        }
        XCTAssertEqual(tokens.count, 10)
    }

    /// The blocks in use stay within one block per sequence of the positions the sequences hold.
    func testBlocksInUseFollowPositions() throws {
        let (model, tokenizer) = try load()
        var config = EngineConfig()
        config.prefixCaching = false
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        let ps = prompts(tokenizer, count: 16)
        for p in ps { try engine.add(request(p, 30)) }
        var lengths = [Int: Int]()
        var steps = 0
        repeat {
            let outs = try engine.step()
            steps += 1
            for o in outs { lengths[o.requestId, default: 0] += o.tokens.count }
            let s = engine.stats
            // Positions held: each running sequence's prompt plus its tokens so far.
            let held = ps.indices.reduce(0) { acc, i in
                let made = lengths[i + 1] ?? 0
                return made > 0 && made < 30 ? acc + ps[i].count + made : acc
            }
            if s.waiting == 0 && s.running > 0 {
                XCTAssertLessThanOrEqual(s.kvBlocksUsed * 16, held + s.running * 16, "step \(steps)")
            }
        } while engine.stats.running + engine.stats.waiting > 0
    }

    /// Outputs through the async stream; stop strings cut the text.
    func testStreamAndStopString() async throws {
        let (model, tokenizer) = try load()
        let engine = try Engine(model: model, tokenizer: tokenizer)
        defer { engine.shutdown() }
        let p = tokenizer.encode("And God said")
        let full = try alone(EngineConfig(), request(p, 30))
        let words = full.text.split(separator: " ")
        XCTAssertGreaterThan(words.count, 3)
        var r = request(p, 30)
        r.stopStrings = [String(words[2])]
        var text = ""
        var reason: FinishReason?
        for try await o in try engine.stream(r).outputs {
            text += o.text
            reason = o.finishReason ?? reason
        }
        XCTAssertEqual(reason, .stop)
        XCTAssertTrue(full.text.hasPrefix(text))
        XCTAssertFalse(text.contains(String(words[2])))
        // A stream abandoned early cancels its request and frees its blocks.
        do {
            let (_, outputs) = try engine.stream(request(p, 500))
            var seen = 0
            for try await o in outputs {
                seen += o.tokens.count
                if seen >= 3 { break }
            }
        }
        for _ in 0..<200 where engine.stats.kvBlocksUsed > 0 { try await Task.sleep(nanoseconds: 10_000_000) }
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0, "\(engine.stats)")
    }

    /// An engine nobody holds goes away even while its background thread runs, and a stream it
    /// was serving ends with an error instead of waiting forever.
    func testReleasedEngineEndsItsStreams() async throws {
        let (model, tokenizer) = try load()
        var engine: Engine? = try Engine(model: model, tokenizer: tokenizer)
        weak let watcher = engine
        let p = tokenizer.encode("And God said")
        let (_, outputs) = try XCTUnwrap(engine).stream(request(p, 900))
        engine = nil
        var failed = false
        do { for try await _ in outputs {} } catch { failed = "\(error)".contains("released") }
        XCTAssertTrue(failed, "the stream ends with the engine's release")
        for _ in 0..<100 where watcher != nil { try await Task.sleep(nanoseconds: 10_000_000) }
        XCTAssertNil(watcher)
    }

    /// Log probabilities are the model's own: they sum to at most 1 and the chosen greedy token is
    /// the most likely.
    func testLogprobs() throws {
        var r = request(prompts(try load().1, count: 1)[0], 5)
        r.logprobs = 3
        let out = try alone(EngineConfig(), r)
        XCTAssertEqual(out.logprobs.count, 5)
        for (t, lp) in zip(out.tokens, out.logprobs) {
            XCTAssertEqual(lp.token, t)
            XCTAssertEqual(lp.top.count, 3)
            XCTAssertEqual(lp.top[0].token, t)
            XCTAssertEqual(lp.top[0].logprob, lp.logprob)
            XCTAssertLessThanOrEqual(lp.top.reduce(0) { $0 + exp($1.logprob) }, 1.0001)
        }
    }

    // MARK: Prompt log probabilities

    /// The reference: the prompt read one token at a time through the model, each position's
    /// logits scoring the next prompt token.
    func tokenByToken(_ prompt: [Int], top k: Int) throws -> [TokenLogprob] {
        let model = try load().0
        let cache = try PagedKVCache(model: model, slots: 1, capacity: prompt.count)
        var plan = BatchPlan()
        var row = [Float](repeating: 0, count: model.config.vocabSize)
        var out: [TokenLogprob] = []
        for p in 0..<(prompt.count - 1) {
            plan.removeAll()
            plan.append(tokens: [prompt[p]], slot: 0, position: p, logits: .last)
            try cache.prepare(&plan)
            let logits = try model.forward(plan, kv: cache.memory)
            try cache.advance(0, by: 1)
            try row.withUnsafeMutableBufferPointer { try logits.read(row: 0, into: $0) }
            out.append(row.withUnsafeBufferPointer { ModelRunner.logprobs(of: prompt[p + 1], top: k, in: $0) })
        }
        return out
    }

    func assertClose(_ got: [TokenLogprob]?, _ want: [TokenLogprob], _ what: String, file: StaticString = #filePath, line: UInt = #line) {
        guard let got else { return XCTFail("\(what): no prompt logprobs", file: file, line: line) }
        XCTAssertEqual(got.count, want.count, what, file: file, line: line)
        for (i, (a, b)) in zip(got, want).enumerated() {
            XCTAssertEqual(a.token, b.token, "\(what) token \(i)", file: file, line: line)
            XCTAssertEqual(a.logprob, b.logprob, accuracy: 1e-4, "\(what) token \(i)", file: file, line: line)
            XCTAssertEqual(a.top.count, b.top.count, "\(what) token \(i)", file: file, line: line)
            for (x, y) in zip(a.top, b.top) {
                // Near-ties may swap places between the two computations; the values may not move.
                XCTAssertEqual(x.logprob, y.logprob, accuracy: 1e-4, "\(what) token \(i) alternatives", file: file, line: line)
            }
            XCTAssertEqual(Set(a.top.map(\.token)), Set(b.top.map(\.token)), "\(what) token \(i) alternatives", file: file, line: line)
        }
    }

    /// A prompt several chunks long (small batch budget, fewer logit rows a step than tokens a
    /// chunk) is scored as reading it one token at a time scores it; the generated tokens are
    /// those the request gives without prompt logprobs, and 0 tokens scores the prompt only.
    func testPromptLogprobsMatchTokenByToken() throws {
        let (model, tokenizer) = try load()
        let text = try String(contentsOfFile: ReferenceModelTests.modelDir + "/../corpus/test.txt", encoding: .utf8)
        let prompt = Array(tokenizer.encode(String(text.prefix(2000))).prefix(150))
        XCTAssertEqual(prompt.count, 150)
        let want = try tokenByToken(prompt, top: 3)
        var config = EngineConfig()
        config.maxBatchTokens = 32
        config.maxPromptLogitRows = 20
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        var r = request(prompt, 6)
        r.promptLogprobs = 3
        r.logprobs = 2
        let id = try engine.add(r)
        var steps = 0, firstOutput: Int?
        var scored = EngineResult(requestId: id, index: 0)
        var finished = false
        while !finished {
            steps += 1
            for o in try engine.step() where o.requestId == id {
                firstOutput = firstOutput ?? steps
                scored.tokens += o.tokens
                scored.logprobs += o.logprobs
                if let p = o.promptLogprobs {
                    XCTAssertNil(scored.promptLogprobs, "given once")
                    scored.promptLogprobs = p
                }
                if let f = o.finishReason { scored.finishReason = f; finished = true }
            }
            guard steps < 100 else { return XCTFail("the request never finished") }
        }
        // Rows 0..<149 at most 20 a step: 8 steps (32-token chunks alone would take 5).
        XCTAssertEqual(firstOutput, 8)
        assertClose(scored.promptLogprobs, want, "chunked")
        var plain = request(prompt, 6)
        plain.logprobs = 2
        let unscored = try alone(EngineConfig(), plain)
        XCTAssertNil(unscored.promptLogprobs)
        XCTAssertEqual(scored.tokens, unscored.tokens)
        XCTAssertEqual(scored.logprobs.count, 6)
        for (a, b) in zip(scored.logprobs, unscored.logprobs) { XCTAssertEqual(a.logprob, b.logprob, accuracy: 1e-4) }

        // The whole prompt in one chunk, and the prompt only (0 tokens), in every sample.
        var only = request(prompt, 0)
        only.promptLogprobs = 3
        only.n = 3
        let outs = try engine.generate(prompts: [only])
        XCTAssertEqual(outs.count, 3)
        for o in outs {
            XCTAssertEqual(o.tokens, [])
            XCTAssertEqual(o.finishReason, .length)
            assertClose(o.promptLogprobs, want, "0 tokens, sample \(o.index)")
        }
        let whole = try alone(EngineConfig(), r)
        assertClose(whole.promptLogprobs, want, "one chunk")
        XCTAssertEqual(whole.tokens, unscored.tokens)
        // A prompt of one token has nothing to score.
        var one = request([prompt[0]], 2)
        one.promptLogprobs = 0
        XCTAssertEqual(try alone(EngineConfig(), one).promptLogprobs?.count, 0)
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
    }

    /// A prompt whose blocks are in the prefix cache is still scored at every position; its blocks
    /// serve later requests. Samples forked from a scored prompt each carry its log probabilities.
    func testPromptLogprobsWithCachedPrefix() throws {
        let (model, tokenizer) = try load()
        let text = try String(contentsOfFile: ReferenceModelTests.modelDir + "/../corpus/test.txt", encoding: .utf8)
        let prompt = Array(tokenizer.encode(String(text.prefix(1500))).prefix(100))
        let want = try tokenByToken(prompt, top: 1)
        let engine = try Engine(model: model, tokenizer: tokenizer)
        let warm = try engine.generate(prompts: [request(prompt, 4)])[0]
        var r = request(prompt, 4)
        r.promptLogprobs = 1
        r.n = 2
        let scored = try engine.generate(prompts: [r])
        for o in scored {
            assertClose(o.promptLogprobs, want, "cached prefix, sample \(o.index)")
            XCTAssertEqual(o.cachedPromptTokens, 0, "the cached blocks were not mapped")
            XCTAssertEqual(o.tokens, warm.tokens)
        }
        XCTAssertEqual(try engine.generate(prompts: [request(prompt, 4)])[0].cachedPromptTokens, 96)
        XCTAssertEqual(engine.stats.kvBlocksUsed, 0)
    }

    /// Scored prompts preempted mid-prefill by a pool too small for them all keep log
    /// probabilities equal to the reference (positions scored before are not taken twice).
    func testPromptLogprobsSurvivePreemption() throws {
        let (model, tokenizer) = try load()
        let text = try String(contentsOfFile: ReferenceModelTests.modelDir + "/../corpus/test.txt", encoding: .utf8)
        let ids = tokenizer.encode(String(text.prefix(6000)))
        let ps = (0..<4).map { Array(ids[($0 * 37)..<($0 * 37 + 90)]) }
        var config = EngineConfig()
        config.kvBlocks = 14  // 224 positions for 4 sequences of ~100
        config.maxBatchTokens = 48
        config.maxPromptLogitRows = 40
        let engine = try Engine(model: model, tokenizer: tokenizer, config: config)
        let requests = ps.map { p -> EngineRequest in
            var r = request(p, 12)
            r.promptLogprobs = 2
            return r
        }
        let outs = try engine.generate(prompts: requests)
        XCTAssertGreaterThan(engine.stats.preemptions, 0, "the pool was meant to run out")
        for (i, o) in outs.enumerated() {
            assertClose(o.promptLogprobs, try tokenByToken(ps[i], top: 2), "request \(i)")
            XCTAssertEqual(o.tokens.count, 12)
        }
        var bad = request(ps[0], 1)
        bad.promptLogprobs = 21
        XCTAssertThrowsError(try engine.add(bad))
    }
}

final class BlockManagerTests: XCTestCase {
    func testReferenceCountsAndLRU() {
        let m = BlockManager(blocks: 4, blockSize: 2)
        var a = BlockTable(), b = BlockTable()
        XCTAssertTrue(m.reserve(&a, positions: 4))
        XCTAssertEqual(m.usedCount, 2)
        m.commit(&a, tokens: [1, 2, 3, 4], length: 4)
        XCTAssertEqual(m.cachedCount, 2)
        // A second sequence with the same prefix maps both blocks (leaving one token to read).
        XCTAssertEqual(m.mapCachedPrefix(&b, tokens: [1, 2, 3, 4, 5], maxBlocks: 2), 4)
        XCTAssertEqual(m.references(a.blocks[0]), 2)
        m.releaseAll(&a)
        XCTAssertEqual(m.usedCount, 2, "still held by b")
        m.releaseAll(&b)
        XCTAssertEqual(m.usedCount, 0)
        XCTAssertEqual(m.evictableCount, 2, "kept for reuse")
        // Four allocations evict the cached blocks, least recently used first.
        var c = BlockTable()
        XCTAssertTrue(m.reserve(&c, positions: 8))
        XCTAssertFalse(m.reserve(&c, positions: 10), "the pool is full")
        XCTAssertEqual(c.blocks.count, 4)
        XCTAssertEqual(m.cachedCount, 0)
        var d = BlockTable()
        XCTAssertEqual(m.mapCachedPrefix(&d, tokens: [1, 2, 3, 4, 5], maxBlocks: 2), 0)
    }

    func testCopyOnWriteOfSharedBlock() {
        let m = BlockManager(blocks: 6, blockSize: 4)
        var a = BlockTable()
        XCTAssertTrue(m.reserve(&a, positions: 6))
        var b = m.fork(a)
        var copies: [(from: Int32, to: Int32)] = []
        // b writes position 6, in the shared second block: it gets its own copy.
        XCTAssertTrue(m.prepareWrite(&b, from: 6, to: 7, copies: &copies))
        XCTAssertEqual(copies.count, 1)
        XCTAssertEqual(copies[0].from, a.blocks[1])
        XCTAssertEqual(b.blocks[1], copies[0].to)
        XCTAssertEqual(b.blocks[0], a.blocks[0], "the untouched block stays shared")
        XCTAssertEqual(m.references(a.blocks[1]), 1)
        // A chained hash depends on the whole prefix.
        XCTAssertNotEqual(BlockManager.hash(parent: 0, tokens: [Int32(1), 2]), BlockManager.hash(parent: 1, tokens: [Int32(1), 2]))
    }
}
