// The CUDA-core attention kernels over paged f32 and F16 caches against a host reference in
// doubles: attention_split (a block per KV head and up to SPLIT_GROUP of its query heads, tiles
// copied with cp.async) and attention_split_heads (a block per query head) for a batch of decode
// rows of different depths (one key, a few, hundreds), one split and several (the partial results
// merged by the last block, the counters left at zero for the next launch; more splits than a
// short row has keys, so some splits are empty), query-head groups of 1, 4 and 10 (two blocks a
// group, the second one partial), head dimensions 128, 80 (lanes past the head masked) and 256,
// a sliding window, soft-capping, and a row map (a mixed batch's single queries: the other rows
// untouched); attention_prefill over prompt runs of 1 to 32 rows (a prompt of its own, one that
// continues a cached sequence, a lone row) with the same variations. Both caches are read as
// stored, and every kernel's arithmetic is f32, so the bounds are f32's.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

#include <numeric>

using namespace test;

namespace {

bool allOk = true;

// A paged cache of `seqs` sequences, each `width` blocks of bs positions (blocks shuffled over
// the pool), positions 0 ..< len[s] of sequence s filled; the rest NaN, so that a read of a key
// the kernel should not see shows.
struct Cache {
    bool half;
    int kvHeads, hd, bs = 16, width, blocks;
    std::vector<int> tables;
    std::vector<float> k32, v32, kf, vf;  // kf, vf: the values as stored, widened
    std::vector<unsigned short> k16, v16;
    Cache(bool half_, int seqs, int width_, int kvHeads_, int hd_, const std::vector<int>& len, Rng& rng)
        : half(half_), kvHeads(kvHeads_), hd(hd_), width(width_), blocks(seqs * width_) {
        tables.resize(blocks);
        std::iota(tables.begin(), tables.end(), 0);
        for (int i = blocks - 1; i > 0; i--) std::swap(tables[i], tables[rng.below(i + 1)]);
        long size = (long)blocks * bs * kvHeads * hd;
        kf.assign(size, NAN);
        vf.assign(size, NAN);
        for (int s = 0; s < seqs; s++)
            for (int pos = 0; pos < len[s]; pos++)
                for (int i = 0; i < kvHeads * hd; i++) {
                    kf[at(s, pos) + i] = rng.uniform(-2, 2);
                    vf[at(s, pos) + i] = rng.uniform(-1, 1);
                }
        if (half) {
            k16.resize(size);
            v16.resize(size);
            for (long i = 0; i < size; i++) {
                k16[i] = to_f16(kf[i]);
                v16[i] = to_f16(vf[i]);
                kf[i] = from_f16(k16[i]);
                vf[i] = from_f16(v16[i]);
            }
        } else {
            k32 = kf;
            v32 = vf;
        }
    }
    long at(int slot, int pos) const { return ((long)tables[slot * width + pos / bs] * bs + pos % bs) * kvHeads * hd; }
    void* keys() { return half ? (void*)k16.data() : (void*)k32.data(); }
    void* values() { return half ? (void*)v16.data() : (void*)v32.data(); }
};

// One query (head h of `heads`) at position pos of the sequence in `slot`: softmax over the
// keys the window leaves (all up to pos without one), scores scaled then soft-capped.
std::vector<double> attend(const Cache& c, const float* q, int heads, int h, int slot, int pos, float scale, float cap, int window) {
    int D = c.hd, kvh = h / (heads / c.kvHeads), lo = window > 0 ? std::max(0, pos - window + 1) : 0;
    std::vector<double> out(D);
    attend_reference(q, D, lo, pos, scale, cap, [&](int j) { return &c.kf[c.at(slot, j) + kvh * D]; },
                     [&](int j) { return &c.vf[c.at(slot, j) + kvh * D]; }, out.data());
    return out;
}

const float kUntouched = -777.f;

// attention_split's dynamic shared memory, as the backend's attention() sizes it (its tiles'
// key and value rows, queries and key; then the tile's probabilities and key offsets);
// attention_split_heads takes none.
size_t split_shared(bool grouped, bool half, int hd) {
    int chunks = hd * (half ? 2 : 4) / 16, quads = hd / 4;
    return grouped ? 16 * (2 * 32 * (chunks + 1) + 2 * 32 * chunks + 8 * quads + quads) + 4 * 8 * 32 + 8 * 2 * 32 : 0;
}

// A decode step: rows at positions 300, 37, 3 and 0 of four sequences (slots shuffled), through
// attention_split (grouped) or attention_split_heads, launched as the backend's attention() does.
// With `map`, only rows 3 and 1 are single queries (rowMap), the others left alone.
void decode_case(bool grouped, bool half, int heads, int kvHeads, int hd, int splits, float cap, int window, bool map, Rng& rng) {
    const int rows = 4, positions[rows] = {300, 37, 3, 0}, slots[rows] = {2, 0, 3, 1};
    std::vector<int> len(rows);
    for (int r = 0; r < rows; r++) len[slots[r]] = positions[r] + 1;
    Cache c(half, rows, 20, kvHeads, hd, len, rng);
    std::vector<float> q((size_t)rows * heads * hd);
    for (auto& v : q) v = rng.uniform(-2, 2);
    float scale = 1 / sqrtf((float)hd) * (cap > 0 ? 8 : 1);
    std::vector<int> rowMap = {3, 1};
    int units = map ? (int)rowMap.size() : rows;
    int group = heads / kvHeads, parts = (group + SPLIT_GROUP - 1) / SPLIT_GROUP;
    std::vector<float> out, partial, stats;
    std::vector<unsigned> counters((size_t)units * heads, 0);
    size_t shared = split_shared(grouped, half, hd);
    // Twice: the second launch runs on the counters the first leaves. The scratch is NaN again
    // for it, so that a merge that reads a split before it is written shows.
    for (int pass = 0; pass < 2; pass++) {
        out.assign((size_t)rows * heads * hd, kUntouched);
        partial.assign((size_t)units * heads * splits * hd, NAN);
        stats.assign((size_t)units * heads * splits * 2, NAN);
        emu::launch(grouped ? attention_split : attention_split_heads, dim3(units, grouped ? kvHeads * parts : heads, splits), dim3(128),
                    shared, q.data(), c.keys(), c.values(), partial.data(), stats.data(), slots, positions, heads, kvHeads, hd,
                    c.tables.data(), c.width, c.bs, scale, cap, window, splits, out.data(), counters.data(), 0, (const float*)nullptr,
                    (const float*)nullptr, (const float*)nullptr, (const float*)nullptr, hd, 0, map ? rowMap.data() : (const int*)nullptr,
                    (int)half);
        char label[160];
        snprintf(label, sizeof label, "%s %s %d/%d x %d, %d split%s%s%s%s%s", grouped ? "attention_split" : "attention_split_heads",
                 half ? "F16" : "f32", heads, kvHeads, hd, splits, splits > 1 ? "s" : "", window ? ", window 100" : "",
                 cap > 0 ? ", cap 30" : "", map ? ", row map" : "", pass ? ", again" : "");
        Errors e(label, cap > 0 ? 2e-5 : 2e-6);
        bool untouched = true;
        for (int t = 0; t < rows; t++) {
            bool mapped = !map || std::find(rowMap.begin(), rowMap.end(), t) != rowMap.end();
            for (int h = 0; h < heads; h++) {
                const float* got = &out[((size_t)t * heads + h) * hd];
                if (!mapped) {
                    for (int d = 0; d < hd; d++) untouched &= got[d] == kUntouched;
                    continue;
                }
                auto want = attend(c, &q[((size_t)t * heads + h) * hd], heads, h, slots[t], positions[t], scale, cap, window);
                for (int d = 0; d < hd; d++) e.add(got[d], want[d], 1);
            }
        }
        bool ok = e.report();
        if (!untouched) printf("  rows outside the row map were written\n");
        bool reset = counters_reset(counters);
        allOk &= ok && untouched && reset;
    }
}

// One sequence's one token with RoPE and the cache write fused (the `fused` of
// attention_split_heads, and of attention_split when `grouped`, as the backend's ropeAttention
// launches them): the query and key unrotated, the token's key and value not yet in the cache
// (its row NaN), cos/sin of the token's position; against the host's rotation of the same f32
// values, the rounded key and value in the cache row, and attention over the keys before it and
// its own.
void fused_case(bool grouped, bool half, int heads, int kvHeads, int hd, int rotDim, bool interleaved, int splits, int pos, Rng& rng) {
    const int slots[1] = {1}, positions[1] = {pos};
    std::vector<int> len = {5, pos};  // the token's own row (at pos) is left NaN
    Cache c(half, 2, 24, kvHeads, hd, len, rng);
    const int half_ = rotDim / 2;
    std::vector<float> q((size_t)heads * hd), k((size_t)kvHeads * hd), v((size_t)kvHeads * hd), cosT(half_), sinT(half_);
    for (auto& x : q) x = rng.uniform(-2, 2);
    for (auto& x : k) x = rng.uniform(-2, 2);
    for (auto& x : v) x = rng.uniform(-1, 1);
    for (int i = 0; i < half_; i++) {
        float a = pos * powf(10000.f, -2.f * i / rotDim);
        cosT[i] = cosf(a);
        sinT[i] = sinf(a);
    }
    auto rotate = [&](const float* x, float* out) {
        for (int d = 0; d < hd; d++) {
            out[d] = x[d];
            if (d >= rotDim) continue;
            bool first = interleaved ? (d & 1) == 0 : d < half_;
            int other = interleaved ? d ^ 1 : (first ? d + half_ : d - half_), i = interleaved ? d / 2 : (first ? d : d - half_);
            out[d] = first ? x[d] * cosT[i] - x[other] * sinT[i] : x[d] * cosT[i] + x[other] * sinT[i];
        }
    };
    auto stored = [&](float x) { return half ? from_f16(to_f16(x)) : x; };
    std::vector<float> qr(q.size()), kr(k.size());
    for (int h = 0; h < heads; h++) rotate(&q[(size_t)h * hd], &qr[(size_t)h * hd]);
    for (int h = 0; h < kvHeads; h++) rotate(&k[(size_t)h * hd], &kr[(size_t)h * hd]);
    float scale = 1 / sqrtf((float)hd);
    std::vector<float> out((size_t)heads * hd, kUntouched), partial((size_t)heads * splits * hd, NAN), stats((size_t)heads * splits * 2, NAN);
    std::vector<unsigned> counters(heads, 0);
    int parts = (heads / kvHeads + SPLIT_GROUP - 1) / SPLIT_GROUP;
    emu::launch(grouped ? attention_split : attention_split_heads, dim3(1, grouped ? kvHeads * parts : heads, splits), dim3(128),
                split_shared(grouped, half, hd),
                q.data(), c.keys(), c.values(), partial.data(),
                stats.data(), slots, positions, heads, kvHeads, hd, c.tables.data(), c.width, c.bs, scale, 0.f, 0, splits, out.data(),
                counters.data(), 1, k.data(), v.data(), cosT.data(), sinT.data(), rotDim, (int)interleaved, (const int*)nullptr, (int)half);
    // The cache row the kernel wrote, as stored, then the reference over it.
    bool written = true;
    long row = c.at(slots[0], pos);
    for (int i = 0; i < kvHeads * hd; i++) {
        float gk = half ? from_f16(c.k16[row + i]) : c.k32[row + i], gv = half ? from_f16(c.v16[row + i]) : c.v32[row + i];
        written &= gk == stored(kr[i]) && gv == stored(v[i]);
        c.kf[row + i] = stored(kr[i]);
        c.vf[row + i] = stored(v[i]);
    }
    char label[160];
    snprintf(label, sizeof label, "%s %s fused RoPE%s %d/%d x %d, rotary %d, %d split%s, position %d",
             grouped ? "attention_split" : "attention_split_heads", half ? "F16" : "f32",
             interleaved ? " (interleaved)" : "", heads, kvHeads, hd, rotDim, splits, splits > 1 ? "s" : "", pos);
    Errors e(label, 2e-6);
    for (int h = 0; h < heads; h++) {
        auto want = attend(c, &qr[(size_t)h * hd], heads, h, slots[0], pos, scale, 0.f, 0);
        for (int d = 0; d < hd; d++) e.add(out[(size_t)h * hd + d], want[d], 1);
    }
    bool ok = e.report();
    if (!written) printf("  the token's key and value in the cache are not the rotated, rounded ones\n");
    bool reset = counters_reset(counters);
    allOk &= ok && written && reset;
}

// Prompt runs as the backend tiles them (first row, count; consecutive positions of one
// sequence, at most 32): a 45-token prompt from position 0 (32 + 13), 20 tokens continuing a
// sequence from position 100, and a lone row at position 7.
void prefill_case(bool half, int heads, int kvHeads, int hd, float cap, int window, Rng& rng) {
    struct Run { int slot, p0, count; } runs[] = {{1, 0, 32}, {1, 32, 13}, {0, 100, 20}, {2, 7, 1}};
    std::vector<int> len = {120, 45, 8}, slots, positions, tiles;
    for (auto& r : runs) {
        tiles.push_back((int)slots.size());
        tiles.push_back(r.count);
        for (int i = 0; i < r.count; i++) { slots.push_back(r.slot); positions.push_back(r.p0 + i); }
    }
    int rows = (int)slots.size(), nTiles = (int)tiles.size() / 2;
    Cache c(half, 3, 8, kvHeads, hd, len, rng);
    std::vector<float> q((size_t)rows * heads * hd), out((size_t)rows * heads * hd, kUntouched);
    for (auto& v : q) v = rng.uniform(-2, 2);
    float scale = 1 / sqrtf((float)hd) * (cap > 0 ? 8 : 1);
    size_t shared = (32 * hd + 32 * (hd + 1) + 32 * hd + 4 * 8 * 32) * 4;
    emu::launch(attention_prefill, dim3(nTiles, heads), dim3(128), shared, q.data(), (const void*)c.keys(), (const void*)c.values(),
                out.data(), slots.data(), positions.data(), tiles.data(), heads, kvHeads, hd, c.tables.data(), c.width, c.bs, scale, cap,
                window, (int)half);
    char label[160];
    snprintf(label, sizeof label, "attention_prefill %s %d/%d x %d%s%s", half ? "F16" : "f32", heads, kvHeads, hd,
             window ? ", window 16" : "", cap > 0 ? ", cap 30" : "");
    Errors e(label, cap > 0 ? 2e-5 : 2e-6);
    for (int t = 0; t < rows; t++)
        for (int h = 0; h < heads; h++) {
            auto want = attend(c, &q[((size_t)t * heads + h) * hd], heads, h, slots[t], positions[t], scale, cap, window);
            for (int d = 0; d < hd; d++) e.add(out[((size_t)t * heads + h) * hd + d], want[d], 1);
        }
    allOk &= e.report();
}

}  // namespace

int main() {
    Rng rng(31);
    for (int half = 0; half < 2; half++) {
        decode_case(true, half, 8, 2, 128, 1, 0, 0, false, rng);
        decode_case(true, half, 8, 2, 128, 7, 0, 0, false, rng);
        decode_case(true, half, 20, 2, 80, 5, 0, 100, false, rng);
        decode_case(true, half, 8, 2, 128, 3, 30, 0, true, rng);
        decode_case(false, half, 4, 4, 128, 1, 0, 0, false, rng);
        decode_case(false, half, 8, 2, 80, 7, 0, 0, false, rng);
        decode_case(false, half, 8, 2, 256, 5, 0, 100, false, rng);
        decode_case(false, half, 4, 1, 128, 3, 30, 0, true, rng);
        for (int grouped = 0; grouped < 2; grouped++) {
            fused_case(grouped, half, 8, 2, 128, 128, false, 7, 37, rng);
            fused_case(grouped, half, 8, 2, 128, 64, true, 3, 300, rng);
            fused_case(grouped, half, 4, 2, 256, 256, false, 16, 100, rng);
        }
        fused_case(false, half, 4, 4, 80, 80, false, 1, 0, rng);
        fused_case(true, half, 20, 2, 80, 80, false, 5, 60, rng);  // a group of 10: two blocks a KV head
        prefill_case(half, 4, 2, 128, 0, 0, rng);
        prefill_case(half, 2, 1, 80, 0, 16, rng);
        prefill_case(half, 4, 4, 64, 30, 0, rng);
    }
    prefill_case(true, 2, 2, 256, 0, 0, rng);
    printf(allOk ? "split attention: all passed\n" : "split attention: FAILED\n");
    return allOk ? 0 : 1;
}
