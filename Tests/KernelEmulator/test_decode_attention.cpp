// Single-query attention on tensor cores (attention_decode_mma_D: two warps; _w4: four; _w4s3:
// four warps and three tile buffers) over an F16 paged KV cache against a host reference: a
// batch of decode rows of different depths, one split (the block writes the output) and several
// (partial results merged by the group's last block through the counters), query-head groups of
// 4 and of 16 (two blocks a group), with a sliding window and soft-capping, and for head size 128
// with the older keys' tiles copied before the wait (`fused` 2); and with RoPE and the cache
// write fused (`fused` 1: each row's query and key rotated, rotations whole and partial,
// interleaved pairs or halves, the row's own cache row holding NaN until the kernel writes it,
// then checked bit for bit). Queries and probabilities are rounded to f16, so the bound is f16's.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

using namespace test;

typedef void (*DecodeKernel)(SPLIT_PARAMS(void));

struct Problem {
    int heads, kvHeads, hd = 128, bs = 16, width = 64, blocks;
    std::vector<int> slots, positions, tables;
    std::vector<float> q;
    std::vector<unsigned short> kc, vc;
    std::vector<float> kf, vf;
};

static long cache_at(const Problem& p, int slot, int pos) {
    return ((long)p.tables[slot * p.width + pos / p.bs] * p.bs + pos % p.bs) * p.kvHeads * p.hd;
}

static Problem make_problem(int heads, int kvHeads, Rng& rng, int hd = 128) {
    Problem p;
    p.heads = heads;
    p.kvHeads = kvHeads;
    p.hd = hd;
    const int depths[4] = {700, 37, 1000, 129};  // each row's position (its sequence's keys 0 ... position cached)
    int rows = 4;
    p.blocks = rows * p.width;
    p.tables.resize(p.blocks);
    for (int i = 0; i < p.blocks; i++) p.tables[i] = i;
    for (int i = p.blocks - 1; i > 0; i--) std::swap(p.tables[i], p.tables[rng.below(i + 1)]);
    long size = (long)p.blocks * p.bs * kvHeads * p.hd;
    p.kc.assign(size, 0x7e00);
    p.vc.assign(size, 0x7e00);
    for (int r = 0; r < rows; r++) {
        p.slots.push_back(r);
        p.positions.push_back(depths[r]);
        for (int pos = 0; pos <= depths[r]; pos++)
            for (int i = 0; i < kvHeads * p.hd; i++) {
                p.kc[cache_at(p, r, pos) + i] = to_f16(rng.uniform(-2, 2));
                p.vc[cache_at(p, r, pos) + i] = to_f16(rng.uniform(-1, 1));
            }
    }
    p.kf.resize(size);
    p.vf.resize(size);
    for (long i = 0; i < size; i++) { p.kf[i] = from_f16(p.kc[i]); p.vf[i] = from_f16(p.vc[i]); }
    p.q.resize((size_t)rows * heads * p.hd);
    for (auto& v : p.q) v = rng.uniform(-2, 2);
    return p;
}

static std::vector<double> reference(const Problem& p, float scale, float cap, int window) {
    int rows = (int)p.slots.size(), D = p.hd, group = p.heads / p.kvHeads;
    std::vector<double> out((size_t)rows * p.heads * D);
    for (int t = 0; t < rows; t++)
        for (int h = 0; h < p.heads; h++) {
            int pos = p.positions[t], kvh = h / group, lo = window > 0 ? std::max(0, pos - window + 1) : 0;
            auto at = [&](int j) { return cache_at(p, p.slots[t], j) + kvh * D; };
            attend_reference(&p.q[((size_t)t * p.heads + h) * D], D, lo, pos, scale, cap, [&](int j) { return &p.kf[at(j)]; },
                             [&](int j) { return &p.vf[at(j)]; }, &out[((size_t)t * p.heads + h) * D]);
        }
    return out;
}

// `fused` 1: the kernel takes each row's query and key unrotated with its cos/sin rows, and its
// own position's cache row holds NaN (no kernel may read it); the reference attends with the
// query rotated and that row's key rotated and value, both rounded to f16, which the kernel must
// also leave in the cache.
static bool fused_case(const char* name, DecodeKernel kernel, int warps, int stages, int heads, int kvHeads, int D, int rotDim,
                       bool interleaved, int splits, Rng& rng) {
    Problem p = make_problem(heads, kvHeads, rng, D);
    int rows = (int)p.slots.size(), group = heads / kvHeads, parts = (group + SPLIT_GROUP - 1) / SPLIT_GROUP, half = rotDim / 2;
    std::vector<float> kin((size_t)rows * kvHeads * D), vin(kin.size()), cosT((size_t)rows * half), sinT(cosT.size());
    for (auto& x : kin) x = rng.uniform(-2, 2);
    for (auto& x : vin) x = rng.uniform(-1, 1);
    for (size_t i = 0; i < cosT.size(); i++) { float a = rng.uniform(-3, 3); cosT[i] = cosf(a); sinT[i] = sinf(a); }
    auto rotate = [&](const float* x, int t, float* out) {
        for (int d = 0; d < D; d++) out[d] = x[d];
        for (int i = 0; i < half; i++) {
            int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
            float c = cosT[(size_t)t * half + i], s = sinT[(size_t)t * half + i];
            out[a] = x[a] * c - x[b] * s;
            out[b] = x[b] * c + x[a] * s;
        }
    };
    Problem want = p;
    std::vector<unsigned short> wantRows;  // each row's (key, value) cache row as it must be written
    for (int t = 0; t < rows; t++) {
        for (int h = 0; h < heads; h++) rotate(&p.q[((size_t)t * heads + h) * D], t, &want.q[((size_t)t * heads + h) * D]);
        long at = cache_at(p, p.slots[t], p.positions[t]);
        for (int kh = 0; kh < kvHeads; kh++) {
            std::vector<float> k(D);
            rotate(&kin[((size_t)t * kvHeads + kh) * D], t, k.data());
            for (int d = 0; d < D; d++) {
                long i = at + kh * D + d;
                want.kc[i] = to_f16(k[d]);
                want.vc[i] = to_f16(vin[((size_t)t * kvHeads + kh) * D + d]);
                want.kf[i] = from_f16(want.kc[i]);
                want.vf[i] = from_f16(want.vc[i]);
                p.kc[i] = p.vc[i] = 0x7e00;
            }
        }
    }
    float scale = 1 / sqrtf((float)D);
    auto expected = reference(want, scale, 0, 0);
    int keys = 16 * warps;
    size_t shared = (size_t)stages * 2 * keys * (D + 8) * 2 + stages * keys * 8 + 2 * D * 2 + SPLIT_GROUP * D * 4;
    std::vector<float> out((size_t)rows * heads * D, NAN), partial((size_t)rows * heads * splits * D, NAN),
        stats((size_t)rows * heads * splits * 2, NAN);
    std::vector<unsigned> counters((size_t)rows * heads, 0);
    emu::launch(kernel, dim3(rows, kvHeads * parts, splits), dim3(32 * warps), shared, p.q.data(), (void*)p.kc.data(), (void*)p.vc.data(),
                partial.data(), stats.data(), p.slots.data(), p.positions.data(), heads, kvHeads, D, p.tables.data(), p.width, p.bs,
                scale, 0.f, 0, splits, out.data(), counters.data(), 1, (const float*)kin.data(), (const float*)vin.data(),
                (const float*)cosT.data(), (const float*)sinT.data(), rotDim, interleaved ? 1 : 0, (const int*)nullptr);
    char label[160];
    snprintf(label, sizeof label, "%s %d/%d, %d split%s, RoPE fused (%d of %d rotated%s)", name, heads, kvHeads, splits,
             splits > 1 ? "s" : "", rotDim, D, interleaved ? ", interleaved" : "");
    Errors e(label, 4e-3);
    for (size_t i = 0; i < out.size(); i++) e.add(out[i], expected[i], 1);
    bool ok = e.report();
    long wrong = 0;
    for (size_t i = 0; i < p.kc.size(); i++) wrong += p.kc[i] != want.kc[i] || p.vc[i] != want.vc[i];
    if (wrong) {
        printf("  %ld cache values differ from the rotated, rounded key and value rows\n", wrong);
        ok = false;
    }
    return counters_reset(counters) && ok;
}

int main() {
    Rng rng(11);
    bool ok = true;
    struct Kernel { const char* name; DecodeKernel kernel; int warps, stages, hd; } kernels[] = {
        {"attention_decode_mma_128", attention_decode_mma_128, 2, 2, 128},
        {"attention_decode_mma_128_w4", attention_decode_mma_128_w4, 4, 2, 128},
        {"attention_decode_mma_128_w4s3", attention_decode_mma_128_w4s3, 4, 3, 128},
    };
    // The other head sizes the backend compiles (CUDABackend.tensorCoreDecodeDims), each kernel
    // once on the smaller problem, plain and capped.
    struct Other { int hd; Kernel k[3]; } others[] = {
#define OTHER(D)                                                                                  \
    {D,                                                                                           \
     {{"attention_decode_mma_" #D, attention_decode_mma_##D, 2, 2, D},                            \
      {"attention_decode_mma_" #D "_w4", attention_decode_mma_##D##_w4, 4, 2, D},                 \
      {"attention_decode_mma_" #D "_w4s3", attention_decode_mma_##D##_w4s3, 4, 3, D}}}
        OTHER(16), OTHER(32), OTHER(64), OTHER(96),
#undef OTHER
    };
    const float caps[3] = {0, 0, 30};
    const int windows[3] = {0, 100, 0};
    struct Run { int heads, kvHeads, hd; std::vector<Kernel> kernels; std::vector<int> cases; };
    std::vector<Run> runs = {{8, 2, 128, {kernels, kernels + 3}, {0, 1, 2}}, {32, 2, 128, {kernels, kernels + 3}, {0, 1, 2}}};
    for (const Other& o : others) runs.push_back({8, 2, o.hd, {o.k, o.k + 3}, {0, 2}});
    for (const Run& run : runs) {
        int heads = run.heads, kvHeads = run.kvHeads;
        Problem p = make_problem(heads, kvHeads, rng, run.hd);
        int rows = (int)p.slots.size(), D = p.hd, group = heads / kvHeads, parts = (group + SPLIT_GROUP - 1) / SPLIT_GROUP;
        for (int c : run.cases) {
            float scale = 1 / sqrtf((float)D) * (caps[c] > 0 ? 8 : 1);
            auto want = reference(p, scale, caps[c], windows[c]);
            for (auto& k : run.kernels)
                for (int splits : {1, 7})
                for (int early : {0, 2}) {
                    if (early && run.hd != 128) continue;
                    int keys = 16 * k.warps;
                    size_t shared = (size_t)k.stages * 2 * keys * (D + 8) * 2 + k.stages * keys * 8;
                    std::vector<float> out((size_t)rows * heads * D, NAN), partial((size_t)rows * heads * splits * D, NAN),
                        stats((size_t)rows * heads * splits * 2, NAN);
                    std::vector<unsigned> counters((size_t)rows * heads, 0);
                    emu::launch(k.kernel, dim3(rows, kvHeads * parts, splits), dim3(32 * k.warps), shared, p.q.data(), (void*)p.kc.data(),
                                (void*)p.vc.data(), partial.data(), stats.data(), p.slots.data(), p.positions.data(), heads, kvHeads, D,
                                p.tables.data(), p.width, p.bs, scale, caps[c], windows[c], splits, out.data(), counters.data(), early,
                                (const float*)nullptr, (const float*)nullptr, (const float*)nullptr, (const float*)nullptr, D, 0,
                                (const int*)nullptr);
                    char label[128];
                    snprintf(label, sizeof label, "%s %d/%d, %d split%s%s%s%s", k.name, heads, kvHeads, splits, splits > 1 ? "s" : "",
                             windows[c] ? ", window 100" : "", caps[c] > 0 ? ", cap 30" : "", early ? ", old keys early" : "");
                    Errors e(label, caps[c] > 0 ? 1.5e-2 : 4e-3);
                    for (size_t i = 0; i < out.size(); i++) e.add(out[i], want[i], 1);
                    ok &= e.report();
                    ok &= counters_reset(counters);
                }
        }
    }
    ok &= fused_case("attention_decode_mma_128_w4s3", attention_decode_mma_128_w4s3, 4, 3, 32, 8, 128, 128, false, 7, rng);
    // More splits than the merge reads at once (eight), as at depth.
    ok &= fused_case("attention_decode_mma_128_w4s3", attention_decode_mma_128_w4s3, 4, 3, 32, 8, 128, 128, false, 20, rng);
    ok &= fused_case("attention_decode_mma_128_w4s3", attention_decode_mma_128_w4s3, 4, 3, 8, 2, 128, 64, true, 1, rng);
    ok &= fused_case("attention_decode_mma_128_w4", attention_decode_mma_128_w4, 4, 2, 32, 2, 128, 128, false, 3, rng);
    ok &= fused_case("attention_decode_mma_64_w4s3", attention_decode_mma_64_w4s3, 4, 3, 8, 2, 64, 64, true, 5, rng);
    printf(ok ? "decode attention: all passed\n" : "decode attention: FAILED\n");
    return ok ? 0 : 1;
}
