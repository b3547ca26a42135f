// The decode step's small kernels against host references: rms_norm (float4 and scalar rows, the
// 16-bit copy, a second tensor normalized in place in the same launch), rope_store_kv and
// rope_store_kv_stacked (RoPE, half and interleaved, over all or part of a head; the KV rows
// written into a paged F16 or f32 cache whose other entries stay untouched), silu_mul (and its
// 16-bit copies), argmax_rows (ties to the first index, NaNs passed over, several blocks a row),
// topk_rows (the k largest, ties at the k-th included as needed), and sample_rows given the
// uniform numbers it takes (the host Sampler's arithmetic, redone here in the same order, picks
// the same token; the same inputs give the same tokens again), and zero_floats (three ranges).
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

#include <algorithm>
#include <numeric>

using namespace test;

namespace {

int failures = 0;

void verdict(bool ok, const char* label, double worst, double bound) {
    printf("%s %-64s max error %.3g (bound %.3g)\n", ok ? "ok  " : "FAIL", label, worst, bound);
    if (!ok) failures++;
}

void verdict(bool ok, const char* label) {
    printf("%s %-64s exact\n", ok ? "ok  " : "FAIL", label);
    if (!ok) failures++;
}

std::vector<float> uniform(long n, Rng& rng, float lo = -1.f, float hi = 1.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = rng.uniform(lo, hi);
    return v;
}

// rms_norm of `rows` rows (and, with `rows2`, a second tensor's rows normalized in place), with
// a 16-bit copy of the first tensor's output when halfType is 1 (F16) or 2 (BF16).
void rms_norm_case(int rows, int dim, int halfType, int rows2, Rng& rng) {
    const float eps = 1e-6f;
    std::vector<float> x = uniform((long)rows * dim, rng, -3.f, 3.f), w = uniform(dim, rng, 0.5f, 1.5f);
    std::vector<float> out((long)rows * dim + 8, 7.f);
    std::vector<float> x2 = uniform((long)rows2 * dim, rng), w2 = uniform(dim, rng, 0.5f, 1.5f), x2in = x2;
    std::vector<unsigned short> half((long)rows * dim + 8, 0x1234);
    int lanes = dim % 4 == 0 ? dim / 4 : dim;
    emu::launch(rms_norm, dim3(rows + rows2), dim3(std::min(256, std::max(32, (lanes + 31) / 32 * 32))), 0, x.data(), w.data(),
                out.data(), dim, eps, halfType ? half.data() : nullptr, halfType, rows2 ? x2.data() : nullptr,
                rows2 ? w2.data() : nullptr, rows2 ? x2.data() : nullptr, rows);
    double worst = 0;
    bool ok = true;
    auto check = [&](const float* in, const float* g, const float* got, int r) {
        double s = 0;
        for (int i = 0; i < dim; i++) s += (double)in[(long)r * dim + i] * in[(long)r * dim + i];
        double scale = 1 / sqrt(s / dim + eps);
        for (int i = 0; i < dim; i++) {
            double want = in[(long)r * dim + i] * scale * g[i], e = fabs(got[(long)r * dim + i] - want) / (fabs(want) + 1e-3);
            worst = std::max(worst, e == e ? e : INFINITY);
        }
    };
    for (int r = 0; r < rows; r++) check(x.data(), w.data(), out.data(), r);
    for (int r = 0; r < rows2; r++) check(x2in.data(), w2.data(), x2.data(), r);
    ok &= worst <= 4e-6;
    for (int i = 0; i < 8; i++) ok &= out[(long)rows * dim + i] == 7.f && half[(long)rows * dim + i] == 0x1234;
    for (long i = 0; i < (long)rows * dim && halfType; i++)  // the copy: the f32 output rounded
        ok &= half[i] == (halfType == 1 ? to_f16(out[i]) : to_bf16(out[i]));
    for (long i = 0; i < (long)rows * dim && !halfType; i++) ok &= half[i] == 0x1234;
    char label[128];
    snprintf(label, sizeof label, "rms_norm %d x %d%s%s", rows, dim, halfType == 1 ? ", F16 copy" : halfType == 2 ? ", BF16 copy" : "",
             rows2 ? ", a second tensor in place" : "");
    verdict(ok, label, worst, 4e-6);
}

// A paged cache: `seqs` sequences of table rows `width` blocks of `bs` positions, their blocks
// shuffled over the pool.
struct Paged {
    int width, bs, blocks;
    std::vector<int> tables;
    Paged(int seqs, int width_, int bs_, Rng& rng) : width(width_), bs(bs_), blocks(seqs * width_) {
        tables.resize(blocks);
        std::iota(tables.begin(), tables.end(), 0);
        for (int i = blocks - 1; i > 0; i--) std::swap(tables[i], tables[rng.below(i + 1)]);
    }
    long row(int slot, int pos, int rowSize) const { return ((long)tables[slot * width + pos / bs] * bs + pos % bs) * rowSize; }
};

// RoPE of one head's values (rotDim of headDim rotated: pairs (i, i + rotDim / 2) or, interleaved,
// (2i, 2i + 1)), in doubles.
std::vector<double> rotate(const float* x, const float* c, const float* s, int headDim, int rotDim, bool interleaved) {
    std::vector<double> y(x, x + headDim);
    int half = rotDim / 2;
    for (int i = 0; i < half; i++) {
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        y[a] = (double)x[a] * c[i] - (double)x[b] * s[i];
        y[b] = (double)x[b] * c[i] + (double)x[a] * s[i];
    }
    return y;
}

// rope_store_kv (stacked: rope_store_kv_stacked) for a few tokens of two sequences.
void rope_case(bool stacked, int heads, int kvHeads, int headDim, int rotDim, bool interleaved, bool kvHalf, Rng& rng) {
    const int tokens = 4, bs = 16, width = 4, rowSize = kvHeads * headDim, half = rotDim / 2;
    Paged pool(2, width, bs, rng);
    const int slots[tokens] = {0, 1, 1, 0}, positions[tokens] = {5, 17, 18, 63};
    std::vector<float> cosT(tokens * half), sinT(tokens * half);
    for (int t = 0; t < tokens; t++)
        for (int i = 0; i < half; i++) {
            double angle = positions[t] * pow(10000.0, -2.0 * i / rotDim);
            cosT[t * half + i] = (float)cos(angle);
            sinT[t * half + i] = (float)sin(angle);
        }
    long cacheValues = (long)pool.blocks * bs * rowSize;
    const unsigned short fill16 = 0x7e00;
    std::vector<unsigned short> kc16(cacheValues, fill16), vc16(cacheValues, fill16);
    std::vector<float> kc32(cacheValues, -999.f), vc32(cacheValues, -999.f);
    void* kc = kvHalf ? (void*)kc16.data() : (void*)kc32.data();
    void* vc = kvHalf ? (void*)vc16.data() : (void*)vc32.data();
    int qn = heads * headDim, kn = kvHeads * headDim;
    std::vector<float> src = uniform((long)tokens * (qn + 2 * kn), rng), q((long)tokens * qn), k((long)tokens * kn), v((long)tokens * kn);
    for (int t = 0; t < tokens; t++) {
        const float* r = src.data() + (long)t * (qn + 2 * kn);
        std::copy(r, r + qn, q.begin() + (long)t * qn);
        std::copy(r + qn, r + qn + kn, k.begin() + (long)t * kn);
        std::copy(r + qn + kn, r + qn + 2 * kn, v.begin() + (long)t * kn);
    }
    std::vector<float> q0 = q, k0 = k, v0 = v;
    if (stacked) {
        std::fill(q.begin(), q.end(), 0.f); std::fill(k.begin(), k.end(), 0.f); std::fill(v.begin(), v.end(), 0.f);
        emu::launch(rope_store_kv_stacked, dim3(tokens, (heads + kvHeads + ROPE_HEADS - 1) / ROPE_HEADS), dim3(256), 0, src.data(),
                    q.data(), k.data(), v.data(), kc, vc, cosT.data(), sinT.data(), slots, positions, heads, kvHeads, headDim, rotDim,
                    pool.tables.data(), width, bs, (int)interleaved, (int)kvHalf);
    } else {
        emu::launch(rope_store_kv, dim3(tokens, heads + kvHeads), dim3(std::min(256, std::max(32, (headDim / 2 + 31) / 32 * 32))), 0,
                    q.data(), k.data(), v.data(), kc, vc, cosT.data(), sinT.data(), slots, positions, heads, kvHeads, headDim, rotDim,
                    pool.tables.data(), width, bs, (int)interleaved, (int)kvHalf);
    }
    double worst = 0;
    bool ok = true;
    auto cmp = [&](float got, double want) {
        double e = fabs(got - want);
        worst = std::max(worst, e == e ? e : INFINITY);
    };
    // The cache as the host expects it: the tokens' rotated keys and values at their rows.
    std::vector<double> kw(cacheValues, NAN), vw(cacheValues, NAN);
    for (int t = 0; t < tokens; t++) {
        const float* c = cosT.data() + t * half;
        const float* s = sinT.data() + t * half;
        for (int h = 0; h < heads; h++) {
            auto y = rotate(q0.data() + ((long)t * heads + h) * headDim, c, s, headDim, rotDim, interleaved);
            for (int d = 0; d < headDim; d++) cmp(q[((long)t * heads + h) * headDim + d], y[d]);
        }
        long at = pool.row(slots[t], positions[t], rowSize);
        for (int h = 0; h < kvHeads; h++) {
            long e = ((long)t * kvHeads + h) * headDim;
            auto y = rotate(k0.data() + e, c, s, headDim, rotDim, interleaved);
            for (int d = 0; d < headDim; d++) {
                kw[at + h * headDim + d] = y[d];
                vw[at + h * headDim + d] = v0[e + d];
                // Stacked: k and v parted out as computed (k not rotated); otherwise left as they were.
                ok &= k[e + d] == k0[e + d] && v[e + d] == v0[e + d];
            }
        }
    }
    for (long i = 0; i < cacheValues; i++) {
        if (kw[i] != kw[i]) {  // not a token's row: untouched
            ok &= kvHalf ? kc16[i] == fill16 && vc16[i] == fill16 : kc32[i] == -999.f && vc32[i] == -999.f;
            continue;
        }
        if (kvHalf) {  // stored rounded to f16: within half an f16 step of the exact value
            double kg = from_f16(kc16[i]), vg = from_f16(vc16[i]);
            ok &= fabs(kg - kw[i]) <= fabs(kw[i]) * 0x1p-11 + 1e-6 && vc16[i] == to_f16((float)vw[i]);
            cmp((float)kg, kw[i]);
        } else {
            cmp(kc32[i], kw[i]);
            ok &= vc32[i] == (float)vw[i];
        }
    }
    double bound = kvHalf ? 2e-3 : 1e-6;
    ok &= worst <= bound;
    char label[128];
    snprintf(label, sizeof label, "%s %d/%d heads of %d, rotating %d%s, %s cache", stacked ? "rope_store_kv_stacked" : "rope_store_kv",
             heads, kvHeads, headDim, rotDim, interleaved ? " interleaved" : "", kvHalf ? "F16" : "f32");
    verdict(ok, label, worst, bound);
}

void silu_mul_case(long n, int halfType, Rng& rng) {
    std::vector<float> g = uniform(n, rng, -8.f, 8.f), u = uniform(n, rng, -2.f, 2.f), o(n + 8, 5.f);
    std::vector<unsigned short> half(n + 8, 0x1234);
    emu::launch(silu_mul, dim3((unsigned)((n + 255) / 256)), dim3(256), 0, g.data(), u.data(), o.data(), n,
                halfType ? half.data() : nullptr, halfType);
    double worst = 0;
    bool ok = true;
    for (long i = 0; i < n; i++) {
        double want = g[i] / (1 + exp(-(double)g[i])) * u[i], e = fabs(o[i] - want) / (fabs(want) + 1e-6);
        worst = std::max(worst, e == e ? e : INFINITY);
        if (halfType) ok &= half[i] == (halfType == 1 ? to_f16(o[i]) : to_bf16(o[i]));
    }
    for (long i = n; i < n + 8; i++) ok &= o[i] == 5.f && half[i] == 0x1234;
    ok &= worst <= 1e-6;
    char label[96];
    snprintf(label, sizeof label, "silu_mul %ld values%s", n, halfType == 1 ? ", F16 copy" : halfType == 2 ? ", BF16 copy" : "");
    verdict(ok, label, worst, 1e-6);
}

// argmax_rows over rows with ties (the first index wins), NaNs, all-negative values, and a row of
// NaNs only (its word stays 0).
void argmax_case(int rows, int cols, int parts, Rng& rng) {
    std::vector<float> x = uniform((long)rows * cols, rng, -50.f, 50.f);
    std::vector<int> want(rows);
    for (int r = 0; r < rows; r++) {
        float* row = x.data() + (long)r * cols;
        if (r % 4 == 1)
            for (int i = 0; i < cols; i++) row[i] = -100.f - fabsf(row[i]);
        for (int j = 0; j < 20; j++) row[rng.below(cols)] = NAN;
        if (r % 4 == 3) {
            for (int i = 0; i < cols; i++) row[i] = NAN;
            want[r] = -1;
            continue;
        }
        int a = rng.below(cols), b = rng.below(cols);  // a tie for the largest value
        row[a] = row[b] = 60.f - (r % 4 == 1 ? 200.f : 0.f);
        int best = -1;
        for (int i = 0; i < cols; i++)
            if (row[i] == row[i] && (best < 0 || row[i] > row[best])) best = i;
        want[r] = best;
    }
    std::vector<unsigned long long> out(rows + 1, 0);
    emu::launch(argmax_rows, dim3(parts, rows), dim3(256), 0, x.data(), cols, out.data());
    bool ok = out[rows] == 0;
    for (int r = 0; r < rows; r++) {
        int got = out[r] == 0 ? -1 : (int)(0xffffffffu - (unsigned)(out[r] & 0xffffffffu));
        if (got != want[r]) {
            printf("  argmax_rows row %d: %d, not %d\n", r, got, want[r]);
            ok = false;
        }
    }
    char label[96];
    snprintf(label, sizeof label, "argmax_rows %d rows of %d, %d blocks a row", rows, cols, parts);
    verdict(ok, label);
}

// topk_rows: the k largest of each row (in any order), with values equal to the k-th beyond it
// (only as many of them taken as fill k).
void topk_case(int rows, int cols, int k, Rng& rng) {
    std::vector<float> x = uniform((long)rows * cols, rng, -10.f, 10.f);
    for (int r = 0; r < rows; r++) {
        float* row = x.data() + (long)r * cols;
        std::vector<float> sorted(row, row + cols);
        std::sort(sorted.begin(), sorted.end(), std::greater<float>());
        for (int j = 0; j < 6; j++) row[rng.below(cols)] = sorted[k - 1];
    }
    std::vector<float> values((long)rows * k + 1, -1e30f);
    std::vector<int> indices((long)rows * k + 1, -7);
    emu::launch(topk_rows, dim3(rows), dim3(1024), 0, x.data(), cols, k, values.data(), indices.data());
    bool ok = values[(long)rows * k] == -1e30f && indices[(long)rows * k] == -7;
    for (int r = 0; r < rows && ok; r++) {
        const float* row = x.data() + (long)r * cols;
        std::vector<float> sorted(row, row + cols), got(values.begin() + (long)r * k, values.begin() + (long)(r + 1) * k);
        std::sort(sorted.begin(), sorted.end(), std::greater<float>());
        std::sort(got.begin(), got.end(), std::greater<float>());
        ok &= std::equal(got.begin(), got.end(), sorted.begin());  // the k largest values
        std::vector<int> ids(indices.begin() + (long)r * k, indices.begin() + (long)(r + 1) * k);
        for (int j = 0; j < k; j++) ok &= ids[j] >= 0 && ids[j] < cols && row[ids[j]] == values[(long)r * k + j];
        std::sort(ids.begin(), ids.end());
        ok &= std::adjacent_find(ids.begin(), ids.end()) == ids.end();  // distinct
    }
    char label[96];
    snprintf(label, sizeof label, "topk_rows %d rows of %d, k %d", rows, cols, k);
    verdict(ok, label);
}

// The host Sampler's choice as sample_rows documents it, in the same f32 operations and order.
struct Draw {
    int row, k;
    float invT, cutOffset, topP, u;
};

std::pair<int, int> host_sample(const float* r, int cols, const Draw& d) {
    std::vector<int> order(cols);
    std::iota(order.begin(), order.end(), 0);
    auto before = [&](int a, int b) { return r[a] > r[b] || (r[a] == r[b] && a < b); };
    std::stable_sort(order.begin(), order.end(), before);
    order.resize(d.k);
    float m = r[order[0]];
    if (!std::isfinite(m)) return {order[0], 0};
    float cut = m + d.cutOffset;
    std::vector<float> weight;
    for (int i : order) {
        if (!(r[i] >= cut && r[i] > -INFINITY)) break;
        weight.push_back((float)exp((double)((r[i] - m) * d.invT)));
    }
    int n = (int)weight.size(), keep = n;
    float sum = 0;
    for (int i = 0; i < n; i++) sum += weight[i];
    if (d.topP < 1) {
        float cum = 0;
        for (int i = 0; i < n; i++) {
            cum += weight[i] / sum;
            if (cum >= d.topP) { keep = i + 1; break; }
        }
    }
    float total = 0;
    for (int i = 0; i < keep; i++) total += weight[i];
    float target = d.u * total, acc = 0;
    for (int i = 0; i < keep; i++) {
        acc += weight[i];
        if (target < acc) return {order[i], 1};
    }
    return {order[keep - 1], 1};
}

void sample_case(Rng& rng) {
    const int rows = 4, cols = 3000;
    // Distinct logits (which of several equal ones at the k-th place is kept is not fixed).
    std::vector<float> x((long)rows * cols);
    for (int r = 0; r < rows; r++) {
        std::vector<int> perm(cols);
        std::iota(perm.begin(), perm.end(), 0);
        for (int i = cols - 1; i > 0; i--) std::swap(perm[i], perm[rng.below(i + 1)]);
        for (int i = 0; i < cols; i++) x[(long)r * cols + i] = (perm[i] - cols / 2) * 0.004f * (r + 1);
    }
    x[(long)2 * cols + 77] = INFINITY;  // row 2's maximum is not finite: the best token, no draw
    // Row 3: row 0 with its five largest equal (sorted by id among themselves).
    std::copy(x.begin(), x.begin() + cols, x.begin() + 3L * cols);
    {
        std::vector<int> order(cols);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int a, int b) { return x[a] > x[b]; });
        for (int j = 1; j < 5; j++) x[3L * cols + order[j]] = x[order[0]];
    }
    std::vector<Draw> draws;
    const float us[] = {0.f, 0.13f, 0.5f, 0.87f, 0.9999f};
    for (float u : us) {
        draws.push_back({0, 40, 1 / 0.7f, -INFINITY, 1.f, u});
        draws.push_back({1, 1024, 1.f, 0.7f * logf(0.05f), 0.9f, u});
        draws.push_back({0, 200, 2.f, -INFINITY, 0.5f, u});
        draws.push_back({1, 1, 1.f, -INFINITY, 1.f, u});
        draws.push_back({1, 300, 1 / 1.3f, 1.3f * logf(0.01f), 1.f, u});
    }
    draws.push_back({2, 50, 1.f, -INFINITY, 1.f, 0.5f});
    for (float u : {0.f, 0.3f, 0.5f, 0.75f}) draws.push_back({3, 40, 1.f, -INFINITY, 1.f, u});
    int n = (int)draws.size();
    std::vector<int> rowOf(n), ks(n), out(2 * n, -1), again(2 * n, -2);
    std::vector<float> params(4 * n);
    for (int i = 0; i < n; i++) {
        rowOf[i] = draws[i].row;
        ks[i] = draws[i].k;
        params[4 * i] = draws[i].invT; params[4 * i + 1] = draws[i].cutOffset; params[4 * i + 2] = draws[i].topP; params[4 * i + 3] = draws[i].u;
    }
    emu::launch(sample_rows, dim3(n), dim3(1024), 0, x.data(), cols, rowOf.data(), params.data(), ks.data(), out.data());
    emu::launch(sample_rows, dim3(n), dim3(1024), 0, x.data(), cols, rowOf.data(), params.data(), ks.data(), again.data());
    bool ok = out == again;
    std::vector<int> distinct;
    for (int i = 0; i < n; i++) {
        auto want = host_sample(x.data() + (long)draws[i].row * cols, cols, draws[i]);
        if (out[2 * i] != want.first || out[2 * i + 1] != want.second) {
            printf("  sample_rows draw %d: token %d (drew %d), not %d (%d)\n", i, out[2 * i], out[2 * i + 1], want.first, want.second);
            ok = false;
        }
        distinct.push_back(out[2 * i]);
    }
    std::sort(distinct.begin(), distinct.end());
    int kinds = (int)(std::unique(distinct.begin(), distinct.end()) - distinct.begin());
    ok &= kinds > n / 2;  // the draws do choose different tokens
    char label[96];
    snprintf(label, sizeof label, "sample_rows %d draws over %d rows of %d (%d tokens), twice", n, rows, cols, kinds);
    verdict(ok, label);
}

}  // namespace

// zero_floats over three ranges (the last possibly empty) in one launch: each range zeroed, the
// floats around them untouched.
void zero_case(long n0, long n1, long n2) {
    std::vector<float> y(n0 + n1 + n2 + 4, 7.f);
    float* y0 = y.data() + 1;
    float* y1 = y0 + n0 + 1;
    float* y2 = y1 + n1 + 1;
    long total = n0 + n1 + n2;
    emu::launch(zero_floats, dim3((unsigned)((total + 255) / 256)), dim3(256), 0, y0, n0, y1, n1, y2, n2);
    bool ok = y[0] == 7.f && y0[n0] == 7.f && y1[n1] == 7.f && y2[n2] == 7.f;
    for (long i = 0; i < n0; i++) ok = ok && y0[i] == 0.f;
    for (long i = 0; i < n1; i++) ok = ok && y1[i] == 0.f;
    for (long i = 0; i < n2; i++) ok = ok && y2[i] == 0.f;
    char label[96];
    snprintf(label, sizeof label, "zero_floats, ranges of %ld, %ld and %ld", n0, n1, n2);
    verdict(ok, label);
}

int main() {
    Rng rng(23);
    zero_case(300, 72, 41);
    zero_case(1000, 513, 0);
    zero_case(256, 0, 0);
    rms_norm_case(3, 4096, 2, 0, rng);
    rms_norm_case(2, 1000, 1, 0, rng);
    rms_norm_case(3, 998, 0, 0, rng);
    rms_norm_case(5 * 8, 128, 0, 5 * 2, rng);
    for (int stacked = 0; stacked < 2; stacked++)
        for (int kvHalf = 0; kvHalf < 2; kvHalf++) {
            rope_case(stacked, 6, 2, 128, 128, false, kvHalf, rng);
            rope_case(stacked, 4, 2, 64, 32, true, kvHalf, rng);
            rope_case(stacked, 5, 1, 96, 64, false, kvHalf, rng);
        }
    silu_mul_case(1000, 0, rng);
    silu_mul_case(777, 1, rng);
    silu_mul_case(300, 2, rng);
    argmax_case(8, 50000, 4, rng);
    argmax_case(4, 3001, 1, rng);
    topk_case(2, 5000, 50, rng);
    topk_case(1, 3000, 1, rng);
    topk_case(1, 2000, 1024, rng);
    sample_case(rng);
    printf(failures ? "%d FAILED\n" : "small kernels: all passed\n", failures);
    return failures ? 1 : 0;
}
