// The backend's small kernels against host references, launched as CUDABackend launches them:
// embed_rows (f32, F16, BF16, Q8_0, Q4_K and Q6_K tables), gather_rows, scatter_staged, split_columns, to_half
// (F16 and BF16, from 16-byte-aligned starts and from others, counts no multiple of four),
// add_bias, add_inplace, scale_inplace, soft_cap_inplace, gelu_tanh_mul, silu_mul_16 (one
// product's rows [gate | up] and two products' rows, F16 and BF16 copies), rope (half and
// interleaved pairs, over all or part of a head), store_kv (paged f32 and F16 caches, other rows
// untouched), exp_sum_rows and repetition_penalty. Counts are no multiple of a block's threads,
// and the values past each output must stay as they were.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

#include <numeric>

using namespace test;

namespace {

bool allOk = true;

std::vector<float> uniform(long n, Rng& rng, float lo = -1.f, float hi = 1.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = rng.uniform(lo, hi);
    return v;
}

void verdict(bool ok, const char* label) {
    printf("%s %-64s exact\n", ok ? "ok  " : "FAIL", label);
    allOk &= ok;
}

unsigned grid(long n) { return (unsigned)std::max(1L, (n + 255) / 256); }

// An elementwise result: each value against the host's, relative to `scale` of it, and the 8
// values past the output untouched.
struct Check {
    Errors e;
    bool ok = true;
    Check(const char* label, double tol) : e(label, tol) {}
    void tail(const float* got, const float* start, long n) {
        for (long i = n; i < n + 8; i++) ok &= memcmp(&got[i], &start[i], 4) == 0;
    }
    void done() {
        ok &= e.report();
        if (!ok && e.bad == 0) printf("FAIL %s: values past the output written\n", e.name);
        allOk &= ok;
    }
};

void embed_case(int dtype, const char* name, Rng& rng) {
    const int vocab = 10, dim = dtype >= 3 ? 512 : 300, tokens = 7;
    // Tokens below 0 are a chained step's: -1 - id names a greedy choice argmax_rows left (its
    // word: the value's order key above, 0xffffffff - the index below; a word of 0 means id 0,
    // and an index past the vocabulary reads row 0 too).
    const int given[tokens] = {3, 0, -2, 3, -1, -3, -4};
    const unsigned long long chosen[4] = {(5ull << 32) | (0xffffffffu - 7), (9ull << 32) | (0xffffffffu - 9), 0,
                                          (1ull << 32) | (0xffffffffu - 10)};
    const int ids[tokens] = {3, 0, 9, 3, 7, 0, 0};
    long total = (long)vocab * dim;
    std::vector<float> values(total);
    std::vector<unsigned char> table;
    if (dtype <= 2) {
        table.resize(total * (dtype ? 2 : 4));
        for (long i = 0; i < total; i++) {
            float f = rng.uniform(-1, 1);
            unsigned short b = dtype == 1 ? to_f16(f) : to_bf16(f);
            if (dtype == 0) memcpy(&table[4 * i], &f, 4);
            else memcpy(&table[2 * i], &b, 2);
            values[i] = dtype == 0 ? f : dtype == 1 ? from_f16(b) : from_bf16(b);
        }
    } else {
        long blocks = total / block_values(dtype);
        auto raw = random_blocks(dtype, blocks, rng);
        table.resize(raw.size() + 64);
        emu::launch(repack_quantized, dim3((unsigned)((blocks + 127) / 128)), dim3(128), 0, raw.data(), dtype, table.data(), blocks);
        for (long b = 0; b < blocks; b++) dequantize_block(dtype, raw.data() + b * block_bytes(dtype), values.data() + b * block_values(dtype));
    }
    std::vector<float> out = uniform((long)tokens * dim + 8, rng), start = out;
    emu::launch(embed_rows, dim3(tokens), dim3(256), 0, (const void*)table.data(), dtype, total, given, chosen, out.data(), dim);
    char label[64];
    snprintf(label, sizeof label, "embed_rows %s, %d tokens x %d", name, tokens, dim);
    Check c(label, 1e-6);
    for (int t = 0; t < tokens; t++)
        for (int i = 0; i < dim; i++) c.e.add(out[(long)t * dim + i], values[(long)ids[t] * dim + i], fabs(values[(long)ids[t] * dim + i]) + 1e-30);
    c.tail(out.data(), start.data(), (long)tokens * dim);
    c.done();
}

void gather_case(Rng& rng) {
    const int rows = 6, dim = 300;
    std::vector<int> which = {4, 1, 1, 0, 7, 4};
    std::vector<float> x = uniform(8L * dim, rng), out = uniform((long)rows * dim + 8, rng), start = out;
    emu::launch(gather_rows, dim3(rows), dim3(256), 0, x.data(), which.data(), out.data(), dim);
    Check c("gather_rows 6 of 8 rows x 300", 0);
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < dim; i++) c.e.add(out[(long)r * dim + i], x[(long)which[r] * dim + i], 1);
    c.tail(out.data(), start.data(), (long)rows * dim);
    c.done();
}

// scatter_staged: pieces of a staging area (256-byte aligned, as the backend stages them) to their
// destinations, one of them longer than the words a thread reads before the wait and of no
// multiple of the block's threads; the words around each destination stay as they were.
void scatter_case(Rng& rng) {
    const int lengths[3] = {1, 300, 1500};
    std::vector<unsigned> staging(8 * 256);
    for (auto& w : staging) w = (unsigned)rng.next();
    std::vector<std::vector<unsigned>> outs;
    StagedPieces p = {};
    unsigned offset = 0;
    for (int i = 0; i < 3; i++) {
        outs.emplace_back(lengths[i] + 16);
        for (auto& w : outs[i]) w = 0xdeadbeefu + i;
        p.dst[i] = (unsigned long long)(outs[i].data() + 8);
        p.offset[i] = offset;
        p.words[i] = lengths[i];
        offset += (lengths[i] * 4 + 255) / 256 * 256;
    }
    emu::launch(scatter_staged, dim3(3), dim3(256), 0, (const unsigned*)staging.data(), p);
    bool ok = true;
    for (int i = 0; i < 3; i++)
        for (int j = 0; j < lengths[i] + 16; j++) {
            bool inside = j >= 8 && j < 8 + lengths[i];
            unsigned want = inside ? staging[p.offset[i] / 4 + j - 8] : 0xdeadbeefu + i;
            if (outs[i][j] != want) ok = false;
        }
    verdict(ok, "scatter_staged 3 pieces of 1, 300 and 1,500 words");
}

void split_case(Rng& rng) {
    const int rows = 3, na = 260, nb = 64, nc = 37, n = na + nb + nc;
    std::vector<float> x = uniform((long)rows * n, rng), a = uniform(rows * na + 8, rng), b = uniform(rows * nb + 8, rng),
                       c = uniform(rows * nc + 8, rng), a0 = a, b0 = b, c0 = c;
    emu::launch(split_columns, dim3(rows), dim3(256), 0, x.data(), a.data(), b.data(), c.data(), na, nb, nc);
    Check k("split_columns 3 rows of 260 + 64 + 37", 0);
    for (int t = 0; t < rows; t++)
        for (int i = 0; i < n; i++) {
            float got = i < na ? a[t * na + i] : i < na + nb ? b[t * nb + i - na] : c[t * nc + i - na - nb];
            k.e.add(got, x[(long)t * n + i], 1);
        }
    k.tail(a.data(), a0.data(), rows * na);
    k.tail(b.data(), b0.data(), rows * nb);
    k.tail(c.data(), c0.data(), rows * nc);
    k.done();
}

// to_half of n values from x + offset (offset 1: no 16-byte loads), as gemmInput launches it.
void to_half_case(int dtype, long n, int offset, Rng& rng) {
    std::vector<float> x = uniform(n + offset, rng, -70000.f, 70000.f);
    for (long i = 0; i < n + offset; i += 7) x[i] *= 1e-4f;  // small values too
    std::vector<unsigned short> out(n + 8, 0x1234);
    emu::launch(to_half, dim3(grid((n + 3) / 4)), dim3(256), 0, x.data() + offset, (void*)out.data(), dtype, n);
    bool ok = true;
    for (long i = 0; i < n; i++) ok &= out[i] == (dtype == 1 ? to_f16(x[offset + i]) : to_bf16(x[offset + i]));
    for (long i = n; i < n + 8; i++) ok &= out[i] == 0x1234;
    char label[96];
    snprintf(label, sizeof label, "to_half %s, %ld values from offset %d", dtype == 1 ? "F16" : "BF16", n, offset);
    verdict(ok, label);
}

void bias_case(Rng& rng) {
    const int rows = 3, outDim = 77;
    long n = (long)rows * outDim;
    std::vector<float> y = uniform(n + 8, rng), bias = uniform(outDim, rng), y0 = y;
    emu::launch(add_bias, dim3(grid(n)), dim3(256), 0, y.data(), bias.data(), outDim, n);
    Check c("add_bias 3 rows x 77", 0);
    for (long i = 0; i < n; i++) c.e.add(y[i], y0[i] + bias[i % outDim], 1);
    c.tail(y.data(), y0.data(), n);
    c.done();
}

// add_inplace, scale_inplace, soft_cap_inplace, gelu_tanh_mul: n values, one op each.
void pointwise_cases(long n, Rng& rng) {
    std::vector<float> x = uniform(n + 8, rng, -40.f, 40.f), y = uniform(n + 8, rng), x0 = x;
    emu::launch(add_inplace, dim3(grid(n)), dim3(256), 0, x.data(), y.data(), n);
    Check a("add_inplace", 0);
    for (long i = 0; i < n; i++) a.e.add(x[i], x0[i] + y[i], 1);
    a.tail(x.data(), x0.data(), n);
    a.done();

    x = x0;
    emu::launch(scale_inplace, dim3(grid(n)), dim3(256), 0, x.data(), -0.37f, n);
    Check s("scale_inplace", 0);
    for (long i = 0; i < n; i++) s.e.add(x[i], x0[i] * -0.37f, 1);
    s.tail(x.data(), x0.data(), n);
    s.done();

    x = x0;
    emu::launch(soft_cap_inplace, dim3(grid(n)), dim3(256), 0, x.data(), 15.f, n);
    Check c("soft_cap_inplace, cap 15", 1e-6);
    for (long i = 0; i < n; i++) {
        double want = 15 * tanh(x0[i] / 15.0);
        c.e.add(x[i], want, fabs(want) + 1e-30);
    }
    c.tail(x.data(), x0.data(), n);
    c.done();

    std::vector<float> g = uniform(n, rng, -6.f, 6.f), o = uniform(n + 8, rng), o0 = o;
    emu::launch(gelu_tanh_mul, dim3(grid(n)), dim3(256), 0, g.data(), y.data(), o.data(), n);
    Check gm("gelu_tanh_mul", 2e-6);
    for (long i = 0; i < n; i++) {
        double v = g[i], want = 0.5 * v * (1 + tanh(sqrt(2 / M_PI) * (v + 0.044715 * v * v * v))) * y[i];
        gm.e.add(o[i], want, fabs(want) + 1e-6);
    }
    gm.tail(o.data(), o0.data(), n);
    gm.done();
}

// silu_mul_16 over `rows` rows of ff values, gate and up `stride` apart in a row (one product
// [gate | up]: stride 2 ff, u = g + ff; two products: stride ff, u elsewhere).
void silu16_case(int rows, int ff, bool stacked, int halfType, Rng& rng) {
    int stride = stacked ? 2 * ff : ff;
    std::vector<unsigned short> gu((long)rows * 2 * ff);
    for (auto& b : gu) b = to_bf16(rng.uniform(-8.f, 8.f));
    const unsigned short* g = gu.data();
    const unsigned short* u = stacked ? gu.data() + ff : gu.data() + (long)rows * ff;
    long n = (long)rows * ff;
    std::vector<float> o = uniform(n + 8, rng), o0 = o;
    std::vector<unsigned short> half(n + 8, 0x1234);
    emu::launch(silu_mul_16, dim3(grid(n)), dim3(256), 0, (const __nv_bfloat16*)g, (const __nv_bfloat16*)u, ff, stride, o.data(), n,
                halfType ? (void*)half.data() : nullptr, halfType);
    char label[96];
    snprintf(label, sizeof label, "silu_mul_16 %d rows x %d, %s%s", rows, ff, stacked ? "[gate | up]" : "two products",
             halfType == 1 ? ", F16 copy" : halfType == 2 ? ", BF16 copy" : "");
    Check c(label, 1e-6);
    for (long i = 0; i < n; i++) {
        long r = i / ff, at = r * stride + i % ff;
        double gv = from_bf16(g[at]), want = gv / (1 + exp(-gv)) * from_bf16(u[at]);
        c.e.add(o[i], want, fabs(want) + 1e-6);
        if (halfType) c.ok &= half[i] == (halfType == 1 ? to_f16(o[i]) : to_bf16(o[i]));
    }
    for (long i = (halfType ? n : 0); i < n + 8; i++) c.ok &= half[i] == 0x1234;
    c.tail(o.data(), o0.data(), n);
    c.done();
}

void rope_case(int rows, int heads, int headDim, int rotDim, bool interleaved, Rng& rng) {
    int half = rotDim / 2;
    long n = (long)rows * heads * headDim;
    std::vector<float> x = uniform(n + 8, rng), x0 = x, cosT(rows * half), sinT(rows * half);
    for (int r = 0; r < rows; r++)
        for (int i = 0; i < half; i++) {
            double angle = (r + 3) * pow(10000.0, -2.0 * i / rotDim);
            cosT[r * half + i] = (float)cos(angle);
            sinT[r * half + i] = (float)sin(angle);
        }
    emu::launch(rope, dim3(grid((long)rows * heads * half)), dim3(256), 0, x.data(), cosT.data(), sinT.data(), rows, heads, headDim, rotDim,
                (int)interleaved);
    char label[96];
    snprintf(label, sizeof label, "rope %d rows x %d heads of %d, rotating %d%s", rows, heads, headDim, rotDim, interleaved ? " interleaved" : "");
    Check c(label, 1e-6);
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < heads; h++) {
            const float* in = &x0[((long)r * heads + h) * headDim];
            const float* got = &x[((long)r * heads + h) * headDim];
            std::vector<double> want(in, in + headDim);
            for (int i = 0; i < half; i++) {
                int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
                want[a] = (double)in[a] * cosT[r * half + i] - (double)in[b] * sinT[r * half + i];
                want[b] = (double)in[b] * cosT[r * half + i] + (double)in[a] * sinT[r * half + i];
            }
            for (int d = 0; d < headDim; d++) c.e.add(got[d], want[d], 1);
        }
    c.tail(x.data(), x0.data(), n);
    c.done();
}

// store_kv of 4 tokens of two sequences into a paged cache (blocks shuffled over the pool).
void store_kv_case(bool kvHalf, int rowSize, Rng& rng) {
    const int tokens = 4, bs = 16, width = 4, seqs = 2, blocks = seqs * width;
    const int slots[tokens] = {1, 0, 1, 0}, positions[tokens] = {0, 17, 63, 18};
    std::vector<int> tables(blocks);
    std::iota(tables.begin(), tables.end(), 0);
    for (int i = blocks - 1; i > 0; i--) std::swap(tables[i], tables[rng.below(i + 1)]);
    long size = (long)blocks * bs * rowSize;
    std::vector<float> k = uniform((long)tokens * rowSize, rng, -100.f, 100.f), v = uniform((long)tokens * rowSize, rng);
    std::vector<float> kc32(size, -999.f), vc32(size, -999.f);
    std::vector<unsigned short> kc16(size, 0x7e00), vc16(size, 0x7e00);
    emu::launch(store_kv, dim3(tokens), dim3(128), 0, k.data(), v.data(), kvHalf ? (void*)kc16.data() : (void*)kc32.data(),
                kvHalf ? (void*)vc16.data() : (void*)vc32.data(), slots, positions, rowSize, tables.data(), width, bs, (int)kvHalf);
    std::vector<long> owner(size, -1);
    for (int t = 0; t < tokens; t++) {
        long at = ((long)tables[slots[t] * width + positions[t] / bs] * bs + positions[t] % bs) * rowSize;
        for (int i = 0; i < rowSize; i++) owner[at + i] = (long)t * rowSize + i;
    }
    bool ok = true;
    for (long i = 0; i < size; i++) {
        long o = owner[i];
        if (kvHalf) ok &= o < 0 ? kc16[i] == 0x7e00 && vc16[i] == 0x7e00 : kc16[i] == to_f16(k[o]) && vc16[i] == to_f16(v[o]);
        else ok &= o < 0 ? kc32[i] == -999.f && vc32[i] == -999.f : kc32[i] == k[o] && vc32[i] == v[o];
    }
    char label[96];
    snprintf(label, sizeof label, "store_kv %s cache, rows of %d", kvHalf ? "F16" : "f32", rowSize);
    verdict(ok, label);
}

void exp_sum_case(int cols, Rng& rng) {
    std::vector<float> x = uniform(cols, rng, -20.f, 5.f);
    float out = -1, shift = 5.f, scale = 0.7f;
    emu::launch(exp_sum_rows, dim3(1), dim3(1024), 0, x.data(), cols, shift, scale, &out);
    double want = 0, mag = 0;
    for (int i = 0; i < cols; i++) want += exp(((double)x[i] - shift) * scale);
    mag = want;
    char label[64];
    snprintf(label, sizeof label, "exp_sum_rows %d columns", cols);
    Check c(label, 2e-6);
    c.e.add(out, want, mag);
    c.done();
}

void penalty_case(Rng& rng) {
    const int cols = 1000, count = 300;
    std::vector<float> x = uniform(cols, rng, -5.f, 5.f), x0 = x;
    std::vector<int> ids(cols);
    std::iota(ids.begin(), ids.end(), 0);
    for (int i = cols - 1; i > 0; i--) std::swap(ids[i], ids[rng.below(i + 1)]);
    ids.resize(count);
    const float penalty = 1.3f;
    emu::launch(repetition_penalty, dim3(grid(count)), dim3(256), 0, x.data(), ids.data(), count, penalty);
    std::vector<float> want = x0;
    for (int id : ids) want[id] = x0[id] > 0 ? x0[id] / penalty : x0[id] * penalty;
    bool ok = memcmp(x.data(), want.data(), cols * 4) == 0;
    char label[96];
    snprintf(label, sizeof label, "repetition_penalty %d of %d logits", count, cols);
    verdict(ok, label);
}

}  // namespace

int main() {
    Rng rng(77);
    embed_case(0, "f32", rng);
    embed_case(1, "F16", rng);
    embed_case(2, "BF16", rng);
    embed_case(3, "Q8_0", rng);
    embed_case(5, "Q4_K", rng);
    embed_case(6, "Q6_K", rng);
    embed_case(11, "Q5_K", rng);
    embed_case(12, "Q5_0", rng);
    gather_case(rng);
    scatter_case(rng);
    split_case(rng);
    to_half_case(1, 1001, 0, rng);
    to_half_case(2, 1001, 0, rng);
    to_half_case(1, 998, 1, rng);
    to_half_case(2, 1026, 3, rng);
    bias_case(rng);
    pointwise_cases(1001, rng);
    silu16_case(3, 300, true, 2, rng);
    silu16_case(2, 257, false, 1, rng);
    silu16_case(2, 64, true, 0, rng);
    rope_case(3, 5, 128, 128, false, rng);
    rope_case(2, 3, 96, 64, true, rng);
    rope_case(2, 4, 64, 32, false, rng);
    store_kv_case(false, 2 * 128, rng);
    store_kv_case(true, 3 * 80, rng);
    exp_sum_case(3000, rng);
    exp_sum_case(77, rng);
    penalty_case(rng);
    printf(allOk ? "elementwise: all passed\n" : "elementwise: FAILED\n");
    return allOk ? 0 : 1;
}
