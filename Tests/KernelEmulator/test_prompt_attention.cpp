// The prompt attention kernels on tensor cores, over an F16 paged KV cache, against a host
// reference: attention_prefill_mma_D (ldmatrix, mma.sync) and the attention_prefill_wgmma_128
// family (wgmma SS n64 / n128 with K-major operands, RS n128 with an MN-major B, 128-byte
// swizzling). As CUDABackendTests' testTensorCorePromptAttentionMatchesCPU: one launch holds
// three sequences' chunks (one starting mid-sequence, after keys cached before it, at a position
// no multiple of a tile; one short of a tile), their cache blocks shuffled; causal, with a
// sliding window, and soft-capped; query heads grouped per block as the backend groups them, and
// one a block. Queries and probabilities are rounded to f16, so the bound is f16's (the GPU
// test's: 4e-3, 1.5e-2 with the soft cap's larger scores).
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

using namespace test;

typedef void (*PromptKernel)(const float*, const __half*, const __half*, float*, const int*, const int*, const int*, int, int, const int*,
                             int, int, float, float, int, int);

struct KernelCase {
    const char* name;
    PromptKernel kernel;
    int rows, threads;  // query rows a block (64 x warpgroups), threads a block
    size_t shared;
};

// The backend's shared sizes (CUDABackend.promptAttentionShared, WarpgroupAttentionKernel.shared).
static size_t mma_shared(int hd) {
    int keys = hd > 128 ? 32 : 64;
    return (size_t)(64 + 4 * keys) * (hd + 8) * 2 + 2 * keys * 8;
}
static size_t wgmma_shared(int keys, int warpgroups) { return (size_t)(64 * warpgroups + 4 * keys) * 128 * 2 + 1024 + 3 * keys * 8; }

struct Problem {
    int heads, kvHeads, hd, bs = 16, width = 16, blocks;
    std::vector<int> slots, positions, tables;
    std::vector<float> q;
    std::vector<unsigned short> kc, vc;  // [block][position in block][kvHeads][hd], f16
};

static long cache_at(const Problem& p, int slot, int pos) {
    return ((long)p.tables[slot * p.width + pos / p.bs] * p.bs + pos % p.bs) * p.kvHeads * p.hd;
}

static Problem make_problem(int heads, int kvHeads, int hd, Rng& rng) {
    Problem p;
    p.heads = heads;
    p.kvHeads = kvHeads;
    p.hd = hd;
    // (slot, first position, rows): slot 0's chunk starts at 37, after its cached keys 0 ..< 37.
    const int chunks[3][3] = {{0, 37, 150}, {1, 0, 70}, {2, 200, 17}};
    p.blocks = 3 * p.width;
    std::vector<int> order(p.blocks);
    for (int i = 0; i < p.blocks; i++) order[i] = i;
    for (int i = p.blocks - 1; i > 0; i--) std::swap(order[i], order[rng.below(i + 1)]);
    p.tables = order;  // slot s: blocks order[16 s ..< 16 s + 16]
    long cacheSize = (long)p.blocks * p.bs * kvHeads * hd;
    p.kc.assign(cacheSize, 0x7e00);  // NaN where nothing was stored: a read of it shows
    p.vc.assign(cacheSize, 0x7e00);
    for (auto& c : chunks) {
        for (int r = 0; r < c[2]; r++) {
            p.slots.push_back(c[0]);
            p.positions.push_back(c[1] + r);
        }
        for (int pos = 0; pos < c[1] + c[2]; pos++)
            for (int i = 0; i < kvHeads * hd; i++) {
                p.kc[cache_at(p, c[0], pos) + i] = to_f16(rng.uniform(-2, 2));
                p.vc[cache_at(p, c[0], pos) + i] = to_f16(rng.uniform(-1, 1));
            }
    }
    p.q.resize(p.slots.size() * heads * hd);
    for (auto& v : p.q) v = rng.uniform(-2, 2);
    return p;
}

// Tiles as the backend makes them: runs of up to `tileRows` consecutive positions of one sequence.
static std::vector<int> make_tiles(const Problem& p, int tileRows) {
    std::vector<int> tiles;
    int rows = (int)p.slots.size();
    for (int t = 0; t < rows;) {
        int count = 1;
        while (count < tileRows && t + count < rows && p.slots[t + count] == p.slots[t] && p.positions[t + count] == p.positions[t + count - 1] + 1)
            count++;
        tiles.push_back(t);
        tiles.push_back(count);
        t += count;
    }
    return tiles;
}

static std::vector<double> reference(const Problem& p, float scale, float cap, int window) {
    int rows = (int)p.slots.size(), D = p.hd, group = p.heads / p.kvHeads;
    std::vector<double> out((size_t)rows * p.heads * D);
    std::vector<float> kf(p.kc.size()), vf(p.vc.size());
    for (size_t i = 0; i < kf.size(); i++) { kf[i] = from_f16(p.kc[i]); vf[i] = from_f16(p.vc[i]); }
    for (int t = 0; t < rows; t++)
        for (int h = 0; h < p.heads; h++) {
            int pos = p.positions[t], kvh = h / group, lo = window > 0 ? std::max(0, pos - window + 1) : 0;
            auto at = [&](int j) { return cache_at(p, p.slots[t], j) + kvh * D; };
            attend_reference(&p.q[((size_t)t * p.heads + h) * D], D, lo, pos, scale, cap, [&](int j) { return &kf[at(j)]; },
                             [&](int j) { return &vf[at(j)]; }, &out[((size_t)t * p.heads + h) * D]);
        }
    return out;
}

// The backend's head group: the largest power of two up to 16 that divides heads / kvHeads.
static int head_group(int heads, int kvHeads) {
    int g = 1;
    while (g < 16 && (heads / kvHeads) % (2 * g) == 0) g *= 2;
    return g;
}

static bool run_case(const KernelCase& k, const Problem& p, bool grouped, const std::vector<std::vector<double>>& want) {
    const float caps[3] = {0, 0, 30};
    const int windows[3] = {0, 48, 0};
    int gq = grouped ? head_group(p.heads, p.kvHeads) : 1;
    auto tiles = make_tiles(p, k.rows / gq);
    int rows = (int)p.slots.size();
    bool ok = true;
    for (int c = 0; c < 3; c++) {
        float scale = 1 / sqrtf((float)p.hd) * (caps[c] > 0 ? 8 : 1);
        std::vector<float> out((size_t)rows * p.heads * p.hd, NAN);
        emu::launch(k.kernel, dim3((unsigned)tiles.size() / 2, p.heads / gq), dim3(k.threads), k.shared, p.q.data(),
                    (const __half*)p.kc.data(), (const __half*)p.vc.data(), out.data(), p.slots.data(), p.positions.data(), tiles.data(),
                    p.heads, p.kvHeads, p.tables.data(), p.width, p.bs, scale, caps[c], windows[c], gq);
        char label[128];
        snprintf(label, sizeof label, "%s %d/%d x %d%s%s%s", k.name, p.heads, p.kvHeads, p.hd, grouped ? "" : " a head a block",
                 windows[c] ? " window 48" : "", caps[c] > 0 ? " cap 30" : "");
        Errors e(label, caps[c] > 0 ? 1.5e-2 : 4e-3);
        for (size_t i = 0; i < out.size(); i++) e.add(out[i], want[c][i], 1);
        ok &= e.report();
    }
    return ok;
}

int main() {
    Rng rng(7);
    bool ok = true;
    const KernelCase wgmma[] = {
        {"attention_prefill_wgmma_128", attention_prefill_wgmma_128, 64, 128, wgmma_shared(64, 1)},
        {"attention_prefill_wgmma_128_overlap", attention_prefill_wgmma_128_overlap, 64, 128, wgmma_shared(64, 1)},
        {"attention_prefill_wgmma_128_wg2", attention_prefill_wgmma_128_wg2, 128, 256, wgmma_shared(64, 2)},
        {"attention_prefill_wgmma_128_wg2_overlap", attention_prefill_wgmma_128_wg2_overlap, 128, 256, wgmma_shared(64, 2)},
        {"attention_prefill_wgmma_128_kt128_wg2_overlap", attention_prefill_wgmma_128_kt128_wg2_overlap, 128, 256, wgmma_shared(128, 2)},
        {"attention_prefill_wgmma_128_kt128_wg2", attention_prefill_wgmma_128_kt128_wg2, 128, 256, wgmma_shared(128, 2)},
    };
    struct Shape { int heads, kvHeads, hd; } shapes[] = {{8, 2, 128}, {32, 2, 128}, {8, 2, 64}, {6, 6, 96}, {12, 4, 256}};
    for (auto& s : shapes) {
        Problem p = make_problem(s.heads, s.kvHeads, s.hd, rng);
        std::vector<std::vector<double>> want = {reference(p, 1 / sqrtf((float)s.hd), 0, 0), reference(p, 1 / sqrtf((float)s.hd), 0, 48),
                                                 reference(p, 8 / sqrtf((float)s.hd), 30, 0)};
        PromptKernel mma = s.hd == 64 ? attention_prefill_mma_64 : s.hd == 96 ? attention_prefill_mma_96 : s.hd == 128 ? attention_prefill_mma_128 : attention_prefill_mma_256;
        char name[64];
        snprintf(name, sizeof name, "attention_prefill_mma_%d", s.hd);
        KernelCase m{name, mma, 64, 128, mma_shared(s.hd)};
        for (bool grouped : {true, false}) {
            ok &= run_case(m, p, grouped, want);
            if (s.hd == 128)
                for (auto& k : wgmma) ok &= run_case(k, p, grouped, want);
        }
    }
    printf(ok ? "prompt attention: all passed\n" : "prompt attention: FAILED\n");
    return ok ? 0 : 1;
}
