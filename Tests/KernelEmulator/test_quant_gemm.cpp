// quant_gemm (quantized prompt products decoded into wgmma's register operands) against the
// widening it replaces: random weights in each type's planar device layout, widened by the
// dequantize_bf16 kernel (checked on GPUs), multiplied on the host in doubles by BF16
// activations, against quant_gemm's sums; both token tiles and the warp-specialized form, weight
// rows and tokens that are no multiple of a block's, odd and even chunk counts, plain, with a bias,
// added to y, BF16 output, and two or three matrices in one launch.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"

#include <random>

namespace {

unsigned short bf16_bits(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return (unsigned short)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

float bf16_value(unsigned short b) {
    unsigned u = (unsigned)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

unsigned short f16_bits(float f) {  // normal values only, which the scales here are
    unsigned u;
    memcpy(&u, &f, 4);
    int e = (int)((u >> 23) & 0xff) - 127 + 15;
    unsigned m = u & 0x7fffff, r = m >> 13, rest = m & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (r & 1))) r++;
    unsigned bits = ((u >> 16) & 0x8000) | ((unsigned)e << 10);
    return (unsigned short)(bits + r);
}

struct Case {
    int dtype;
    const char* name;
    int k;
};

// Bytes of a matrix of `total` values of the type in the device's planar layout.
size_t layout_bytes(int dtype, long total) {
    switch (dtype) {
    case 3: return total + total / 32 * 2;
    case 4:
    case 7: return total / 2 + total / 32 * 2;
    case 5: return total / 2 + total / 256 * 16;
    case 8: return total / 2 + total / 256 * 8;
    case 9: return total / 256 * 110;
    case 10: return total / 256 * 84;
    case 11: return total / 2 + total / 256 * 48;
    case 12: return total / 2 + total / 32 * 6;
    default: return total / 256 * 210;
    }
}

// Random values and scales: the scales small normal f16 values (random bytes could be NaN).
void fill(int dtype, long total, unsigned char* w, std::mt19937& rng) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> scale(0.002f, 0.02f);
    size_t size = layout_bytes(dtype, total);
    for (size_t i = 0; i < size; i++) w[i] = (unsigned char)byte(rng);
    auto put16 = [&](size_t at, unsigned short v) { memcpy(w + at, &v, 2); };
    if (dtype == 3 || dtype == 4 || dtype == 7) {
        size_t s = dtype == 3 ? total : total / 2;
        for (long b = 0; b < total / 32; b++) put16(s + 2 * b, f16_bits(scale(rng)));
    } else if (dtype == 12) {
        for (long b = 0; b < total / 32; b++) put16(total / 2 + total / 8 + 2 * b, f16_bits(scale(rng)));
    } else if (dtype == 5 || dtype == 11) {
        for (long b = 0; b < total / 256; b++) {
            put16(total / 2 + 16 * b, f16_bits(scale(rng)));
            put16(total / 2 + 16 * b + 2, f16_bits(scale(rng)));
        }
    } else if (dtype == 8) {
        for (long b = 0; b < total / 256; b++) put16(total / 2 + 8 * b, f16_bits(scale(rng)));
    } else if (dtype == 9) {
        long blocks = total / 256;
        for (long b = 0; b < blocks; b++) put16(blocks * 108 + 2 * b, f16_bits(scale(rng)));
    } else if (dtype == 10) {
        long blocks = total / 256;
        for (long b = 0; b < blocks; b++) {
            put16(blocks * 80 + 4 * b, f16_bits(scale(rng)));
            put16(blocks * 80 + 4 * b + 2, f16_bits(scale(rng)));
        }
    } else {
        long blocks = total / 256;
        for (long b = 0; b < blocks; b++) put16(blocks * 208 + 2 * b, f16_bits(scale(rng)));
    }
}

// One matrix of a launch: its weights in the device layout, their widening, x times them in
// doubles, a bias, and what y holds before the launch.
struct Matrix {
    int n;
    std::vector<unsigned char> w;
    std::vector<unsigned short> wide;  // dequantize_bf16's values
    std::vector<double> expected;
    std::vector<float> bias, start;
};

Matrix make_matrix(int dtype, int n, int k, const std::vector<unsigned short>& x, int rows, std::mt19937& rng) {
    Matrix m;
    m.n = n;
    long total = (long)n * k;
    m.w.resize(layout_bytes(dtype, total) + 32);  // the backend's padding
    fill(dtype, total, m.w.data(), rng);
    std::vector<unsigned short>& wide = m.wide;
    wide.resize(total);
    emu::launch(dequantize_bf16, dim3((unsigned)((total / 8 + 255) / 256)), dim3(256), 0, (const void*)m.w.data(), dtype,
                (__nv_bfloat16*)wide.data(), total);
    m.expected.resize((size_t)rows * n);
    for (int t = 0; t < rows; t++)
        for (int o = 0; o < n; o++) {
            double s = 0;
            for (int i = 0; i < k; i++) s += (double)bf16_value(x[(size_t)t * k + i]) * bf16_value(wide[(size_t)o * k + i]);
            m.expected[(size_t)t * n + o] = s;
        }
    std::uniform_real_distribution<float> uniform(-1.f, 1.f);
    m.bias.resize(n);
    m.start.resize((size_t)rows * n);
    for (auto& v : m.bias) v = uniform(rng);
    for (auto& v : m.start) v = uniform(rng);
    return m;
}

using QuantGemm = void (*)(const void*, const float*, void*, int, const void*, const float*, void*, int, const void*, const float*, void*,
                           int, const unsigned short*, int, int, int, int);
// The warp-specialized form's: the same, then the tensor map of x its TMA copies read.
using QuantGemmWs = void (*)(const void*, const float*, void*, int, const void*, const float*, void*, int, const void*, const float*, void*,
                             int, const unsigned short*, int, int, int, int, TensorMap);

// A kernel under test: `f` (the forms of 128 and 256 tokens) or `ws` (the warp-specialized one),
// the tokens a block takes, its shared memory and threads.
struct Kernel {
    QuantGemm f = nullptr;
    int nt = 0;
    size_t shared = 0;
    int threads = 256;
    QuantGemmWs ws = nullptr;
};

// One launch over `ms` (one to three matrices), each checked against its reference; `slices` of
// k (split-K) add into outputs that hold zeros before (or the residual, accumulating), as the
// backend prepares them.
int check(const char* label, const Kernel& kernel, std::vector<const Matrix*> ms, const unsigned short* x, int rows, int k, bool biased,
          int accumulate, int halfOut, int slices = 1, std::vector<float>* firstOut = nullptr) {
    const int nt = kernel.nt;
    std::vector<std::vector<float>> ys;
    int tiles = 0;
    for (const Matrix* m : ms) {
        ys.push_back(m->start);
        if (slices > 1 && !accumulate) std::fill(ys.back().begin(), ys.back().begin() + (long)rows * m->n, 0.f);
        // BF16 output added to: y starts as the BF16 roundings of `start`.
        if (halfOut && accumulate)
            for (long i = 0; i < (long)rows * m->n; i++) ((unsigned short*)ys.back().data())[i] = bf16_bits(m->start[i]);
        tiles += (m->n + QG_ROWS - 1) / QG_ROWS;
    }
    const void* w[3] = {};
    const float* b[3] = {};
    void* y[3] = {};
    int n[3] = {};
    for (size_t i = 0; i < ms.size(); i++) {
        w[i] = ms[i]->w.data();
        b[i] = biased ? ms[i]->bias.data() : nullptr;
        y[i] = ys[i].data();
        n[i] = ms[i]->n;
    }
    const dim3 grid((rows + nt - 1) / nt, tiles, slices);
    if (kernel.ws) {
        // x as the backend's map gives it: rows of k BF16 values, boxes of 64 values by 256 rows
        // with the 128-byte swizzle.
        TensorMap xMap;
        emu_encode_tensor_map_2d(&xMap, x, (unsigned long long)k, (unsigned long long)rows, 2ull * k, QG_K, 256, 2, 128);
        emu::launch(kernel.ws, grid, dim3(kernel.threads), kernel.shared, w[0], b[0], y[0], n[0], w[1], b[1], y[1], n[1], w[2], b[2], y[2], n[2], x,
                    rows, k, accumulate, halfOut, xMap);
    } else {
        emu::launch(kernel.f, grid, dim3(kernel.threads), kernel.shared, w[0], b[0], y[0], n[0], w[1], b[1], y[1], n[1], w[2], b[2], y[2], n[2], x,
                    rows, k, accumulate, halfOut);
    }
    if (firstOut) *firstOut = ys[0];
    int failures = 0;
    for (size_t m = 0; m < ms.size(); m++) {
        const Matrix& mat = *ms[m];
        const std::vector<float>& out = ys[m];
        double scale = 0, worst = 0;
        for (long i = 0; i < (long)rows * mat.n; i++) {
            int o = (int)(i % mat.n);
            double before = halfOut ? bf16_value(bf16_bits(mat.start[i])) : mat.start[i];
            double want = mat.expected[i] + (accumulate ? before : 0) + (biased ? mat.bias[o] : 0);
            double got = halfOut ? bf16_value(((const unsigned short*)out.data())[i]) : out[i];
            scale = std::max(scale, fabs(want));
            double e = fabs(got - want);
            if (!(e <= worst)) worst = e;  // a NaN stays
        }
        // Untouched past the output (BF16 output: the second half of y's bytes).
        if (halfOut && !accumulate)
            for (long i = (long)rows * mat.n / 2 + 1; i < (long)rows * mat.n; i++)
                if (memcmp(&out[i], &mat.start[i], 4) != 0) {
                    printf("FAIL %s, matrix %zu: wrote past the BF16 output at %ld\n", label, m, i);
                    return failures + 1;
                }
        double bound = (halfOut ? 8e-3 : 1e-5) * scale;
        bool ok = worst <= bound && scale > 0;
        printf("%s %s, matrix %zu of %zu: max error %.3g (bound %.3g, largest %.3g)\n", ok ? "ok  " : "FAIL", label, m, ms.size(), worst,
               bound, scale);
        failures += ok ? 0 : 1;
    }
    return failures;
}

// Whether two launches' outputs are the same bits, printed as a check; 1 if not.
int same_bits(const char* what, const std::vector<float>& got, const std::vector<float>& want) {
    bool same = got.size() == want.size() && memcmp(got.data(), want.data(), got.size() * 4) == 0;
    printf("%s %s\n", same ? "ok  " : "FAIL", what);
    return same ? 0 : 1;
}

// Every A fragment QuantChunk<DT> decodes from a row's pieces (as load copies them) against
// the widening's BF16 bits: the decoding must give the same values to the bit (a zero's sign
// aside: Q6_K's two-step sum makes +0 where scale times 0 is -0 for a negative scale, which no
// sum can tell apart).
template <int DT> int decode_case(const char* name, const Matrix& m, int k) {
    using Q = QuantChunk<DT>;
    long total = (long)m.n * k;
    alignas(16) unsigned char row[Q::STRIDE];
    long wrong = 0, checked = 0;
    for (int o = 0; o < m.n; o++)
        for (int k0 = 0; k0 < k; k0 += QG_K) {
            unsigned long i = (unsigned long)o * k + k0;
            for (int p = 0; p < Q::PIECES; p++) memcpy(row + 16 * p, Q::piece(m.w.data(), total, i, k0, p), 16);
            for (int c = 0; c < 4; c++) {
                unsigned lo[4], hi[4];
                Q::fragment(row, total, i, k0, c, lo, hi);
                for (int j = 0; j < 4; j++) {
                    const unsigned short* want = m.wide.data() + (long)o * k + k0 + 16 * j + 2 * c;
                    unsigned got[4] = {lo[j] & 0xffff, lo[j] >> 16, hi[j] & 0xffff, hi[j] >> 16};
                    unsigned expect[4] = {want[0], want[1], want[8], want[9]};
                    for (int e = 0; e < 4; e++, checked++)
                        if (got[e] != expect[e] && ((got[e] | expect[e]) & 0x7fff) != 0 && wrong++ < 3)
                            printf("     %s row %d, k %d: decoded %04x, widened %04x\n", name, o, k0 + 16 * j + 2 * c + (e & 1) + 8 * (e >> 1),
                                   got[e], expect[e]);
                }
            }
        }
    printf("%s %s: %ld decoded values, %ld differ from the widening's bits\n", wrong ? "FAIL" : "ok  ", name, checked, wrong);
    return wrong ? 1 : 0;
}

int decode_check(int dtype, const char* name, const Matrix& m, int k) {
    switch (dtype) {
    case 3: return decode_case<3>(name, m, k);
    case 4: return decode_case<4>(name, m, k);
    case 5: return decode_case<5>(name, m, k);
    case 6: return decode_case<6>(name, m, k);
    case 7: return decode_case<7>(name, m, k);
    case 8: return decode_case<8>(name, m, k);
    case 9: return decode_case<9>(name, m, k);
    case 11: return decode_case<11>(name, m, k);
    case 12: return decode_case<12>(name, m, k);
    default: return decode_case<10>(name, m, k);
    }
}

}  // namespace

int main() {
    std::mt19937 rng(5);
    const int rows = 150;
    const Case cases[] = {{3, "Q8_0", 320}, {4, "Q4_0", 320}, {7, "IQ4_NL", 320}, {8, "IQ4_XS", 512},
                          {5, "Q4_K", 512},  {6, "Q6_K", 512}, {9, "Q3_K", 512},   {10, "Q2_K", 512},
                          {11, "Q5_K", 512}, {12, "Q5_0", 320}};
    int failures = 0;
    for (const Case& c : cases) {
        std::uniform_real_distribution<float> uniform(-1.f, 1.f);
        std::vector<unsigned short> x((size_t)rows * c.k);
        for (auto& v : x) v = bf16_bits(uniform(rng));
        // A matrix of 200 rows alone; three of 200, 72 and 41 rows in one launch (q, k and v; 41
        // rows end the scales mid-way through a 16-byte piece, which the copies read whole: the
        // backend pads its planar weights by 32 bytes, as make_matrix does).
        Matrix big = make_matrix(c.dtype, 200, c.k, x, rows, rng), mid = make_matrix(c.dtype, 72, c.k, x, rows, rng),
               small = make_matrix(c.dtype, 41, c.k, x, rows, rng);
        failures += decode_check(c.dtype, c.name, big, c.k);
        Kernel kernels[3];
        switch (c.dtype) {
        case 3: kernels[0] = {quant_gemm_q8_0, 128, quant_gemm_shared<3, 128, 4>()}; kernels[1] = {quant_gemm_q8_0_t256, 256, quant_gemm_shared<3, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<3, 5>(), QGW_THREADS, quant_gemm_q8_0_ws}; break;
        case 4: kernels[0] = {quant_gemm_q4_0, 128, quant_gemm_shared<4, 128, 4>()}; kernels[1] = {quant_gemm_q4_0_t256, 256, quant_gemm_shared<4, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<4, 5>(), QGW_THREADS, quant_gemm_q4_0_ws}; break;
        case 7: kernels[0] = {quant_gemm_iq4_nl, 128, quant_gemm_shared<7, 128, 4>()}; kernels[1] = {quant_gemm_iq4_nl_t256, 256, quant_gemm_shared<7, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<7, 5>(), QGW_THREADS, quant_gemm_iq4_nl_ws}; break;
        case 8: kernels[0] = {quant_gemm_iq4_xs, 128, quant_gemm_shared<8, 128, 4>()}; kernels[1] = {quant_gemm_iq4_xs_t256, 256, quant_gemm_shared<8, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<8, 5>(), QGW_THREADS, quant_gemm_iq4_xs_ws}; break;
        case 9: kernels[0] = {quant_gemm_q3_K, 128, quant_gemm_shared<9, 128, 3>()}; kernels[1] = {quant_gemm_q3_K_t256, 256, quant_gemm_shared<9, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<9, 4>(), QGW_THREADS, quant_gemm_q3_K_ws}; break;
        case 10: kernels[0] = {quant_gemm_q2_K, 128, quant_gemm_shared<10, 128, 4>()}; kernels[1] = {quant_gemm_q2_K_t256, 256, quant_gemm_shared<10, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<10, 5>(), QGW_THREADS, quant_gemm_q2_K_ws}; break;
        case 12: kernels[0] = {quant_gemm_q5_0, 128, quant_gemm_shared<12, 128, 4>()}; kernels[1] = {quant_gemm_q5_0_t256, 256, quant_gemm_shared<12, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<12, 5>(), QGW_THREADS, quant_gemm_q5_0_ws}; break;
        case 11: kernels[0] = {quant_gemm_q5_K, 128, quant_gemm_shared<11, 128, 4>()}; kernels[1] = {quant_gemm_q5_K_t256, 256, quant_gemm_shared<11, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<11, 5>(), QGW_THREADS, quant_gemm_q5_K_ws}; break;
        case 5: kernels[0] = {quant_gemm_q4_K, 128, quant_gemm_shared<5, 128, 4>()}; kernels[1] = {quant_gemm_q4_K_t256, 256, quant_gemm_shared<5, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<5, 5>(), QGW_THREADS, quant_gemm_q4_K_ws}; break;
        default: kernels[0] = {quant_gemm_q6_K, 128, quant_gemm_shared<6, 128, 3>()}; kernels[1] = {quant_gemm_q6_K_t256, 256, quant_gemm_shared<6, 256, 4>()}; kernels[2] = {nullptr, 256, quant_gemm_ws_shared<6, 4>(), QGW_THREADS, quant_gemm_q6_K_ws}; break;
        }
        for (const Kernel& kk : kernels) {
            char label[128];
            const char* ws = kk.threads == QGW_THREADS ? " (warp-specialized)" : "";
            const char* modes[] = {"plain", "bias", "added, bias", "BF16 out", "BF16 out, added"};
            for (int m = 0; m < 5; m++) {
                snprintf(label, sizeof label, "%s k %d, %d tokens a block%s, %s", c.name, c.k, kk.nt, ws, modes[m]);
                failures += check(label, kk, {&big}, x.data(), rows, c.k, m == 1 || m == 2, m == 2 || m == 4, m >= 3);
            }
            snprintf(label, sizeof label, "%s k %d, %d tokens a block%s, three matrices, bias", c.name, c.k, kk.nt, ws);
            failures += check(label, kk, {&big, &mid, &small}, x.data(), rows, c.k, true, 0, 0);
            snprintf(label, sizeof label, "%s k %d, %d tokens a block%s, two matrices", c.name, c.k, kk.nt, ws);
            failures += check(label, kk, {&small, &mid}, x.data(), rows, c.k, false, 0, 0);
            // k in slices: 2 (of 5 chunks, 2 + 3, for Q8_0, Q4_0 and IQ4_NL; of 8, 4 + 4, for the
            // others) and one a chunk; plain, and added to with a bias; 9 tokens, as a batch of
            // decode steps. (The emulator runs a launch's blocks a few at a time, so a plain add
            // in place of the atomic one may pass here; the GPU test would not.)
            for (int slices : {2, c.k / QG_K}) {
                snprintf(label, sizeof label, "%s k %d, %d tokens a block%s, %d slices of k, three matrices", c.name, c.k, kk.nt, ws, slices);
                failures += check(label, kk, {&big, &mid, &small}, x.data(), 9, c.k, false, 0, 0, slices);
                snprintf(label, sizeof label, "%s k %d, %d tokens a block%s, %d slices of k, added, bias", c.name, c.k, kk.nt, ws, slices);
                failures += check(label, kk, {&big}, x.data(), rows, c.k, true, 1, 0, slices);
            }
        }
        // The warp-specialized form over many more chunks than it has buffers (17 or 24: each
        // buffer refilled at least twice, so both parities of its barriers are waited on)
        // and two tiles of tokens (300), plain, added to with a bias, and BF16 out.
        {
            const int kl = c.k == 320 ? 1088 : 1536, rl = 300;
            std::vector<unsigned short> xl((size_t)rl * kl);
            for (auto& v : xl) v = bf16_bits(uniform(rng));
            Matrix longm = make_matrix(c.dtype, 136, kl, xl, rl, rng);
            const Kernel& kk = kernels[2];
            char label[128];
            snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block (warp-specialized), plain", c.name, kl, rl);
            std::vector<float> plain;
            failures += check(label, kk, {&longm}, xl.data(), rl, kl, false, 0, 0, 1, &plain);
            // The consuming warpgroups, then the copying one, falling behind the others (the
            // emulator runs them only when no other thread can), so that the others get as far
            // ahead as their waits let them: a missing wait then reads a buffer not yet filled
            // or refills one not yet read. The sums must not change.
            const struct { int from, to; const char* who; } lags[] = {{0, 255, "consuming"}, {256, 383, "copying"}};
            for (const auto& lag : lags) {
                emu::Lagging behind(lag.from, lag.to);
                std::vector<float> out;
                snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block (warp-specialized, the %s warps behind)", c.name, kl, rl,
                         lag.who);
                failures += check(label, kk, {&longm}, xl.data(), rl, kl, false, 0, 0, 1, &out);
                snprintf(label, sizeof label, "%s k %d, %d tokens, the %s warps behind: the same bits", c.name, kl, rl, lag.who);
                failures += same_bits(label, out, plain);
            }
            snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block (warp-specialized), added, bias", c.name, kl, rl);
            failures += check(label, kk, {&longm}, xl.data(), rl, kl, true, 1, 0);
            // Its outputs go out through shared memory and the copy engine (f32 written or added
            // to y, and BF16); the other form stores from registers: the same bits for each.
            const Kernel& other = kernels[1];
            auto sameAsRegisters = [&](const char* mode, int accumulate, int halfOut, const std::vector<float>& staged) {
                std::vector<float> fromRegisters;
                snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block, %s", c.name, kl, rl, mode);
                int failed = check(label, other, {&longm}, xl.data(), rl, kl, false, accumulate, halfOut,
                                   1, &fromRegisters);
                snprintf(label, sizeof label, "%s k %d, %d tokens, %s: staged and from registers, the same bits", c.name, kl, rl, mode);
                return failed + same_bits(label, staged, fromRegisters);
            };
            failures += sameAsRegisters("plain", 0, 0, plain);
            std::vector<float> added, half;
            snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block (warp-specialized), added", c.name, kl, rl);
            failures += check(label, kk, {&longm}, xl.data(), rl, kl, false, 1, 0, 1, &added);
            failures += sameAsRegisters("added", 1, 0, added);
            snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block (warp-specialized), BF16 out", c.name, kl, rl);
            failures += check(label, kk, {&longm}, xl.data(), rl, kl, false, 0, 1, 1, &half);
            failures += sameAsRegisters("BF16 out", 0, 1, half);
            // Two matrices in one launch writing BF16 (the gating's gate and up), and one of 200
            // rows beside one of 44 (no multiple of 8: its blocks store from registers, the
            // other's through the copy engine).
            Matrix gatem = make_matrix(c.dtype, 200, kl, xl, rl, rng), oddm = make_matrix(c.dtype, 44, kl, xl, rl, rng);
            snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block (warp-specialized), two matrices, BF16 out", c.name, kl, rl);
            failures += check(label, kk, {&gatem, &longm}, xl.data(), rl, kl, false, 0, 1);
            snprintf(label, sizeof label, "%s k %d, %d tokens, 256 tokens a block (warp-specialized), 200 and 44 rows, BF16 out", c.name, kl,
                     rl);
            failures += check(label, kk, {&gatem, &oddm}, xl.data(), rl, kl, false, 0, 1);
        }
    }
    printf(failures ? "%d FAILED\n" : "all passed\n", failures);
    return failures ? 1 : 0;
}
