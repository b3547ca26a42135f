// The decode step's products against host references: quantize_q8 (plain and with the RMSNorm
// fused) against the rounding it stands for; the one-token `matvec_<type>[_gated]` kernels and the
// fixed-length 16-bit ones (and those that carry an RMSNorm from a residual product to the next),
// and matmul_rows over several tokens, for every weight type they take.
// Weights: Q8_0, Q4_0, Q5_0, Q4_K, Q5_K and Q6_K as random ggml blocks repacked by repack_quantized, their
// values from the host's ggml dequantization; IQ4_NL, IQ4_XS, Q3_K and Q2_K as random bytes in the
// planar device layout (scales small normal f16 values), their values from host decoders of that
// layout (load_weight is checked against both); 16-bit weights random. The reference multiplies those values in doubles by the activations as the
// kernel sees them (for quantized weights, quantize_q8's int8 values times their scales), so the
// bound is f32 summation's. Cases: plain, with a bias, added to a residual (mode 1), gated
// (mode 2), three matrices in one launch, the fused norm, row counts that are no multiple of a
// block's rows, and rows that end inside a chunk of loads; outputs past each matrix's rows and the
// gated launch's second output stay untouched. The expert mode (routes) as a mixture-of-experts
// decode step launches it.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

using namespace test;

namespace {

typedef void (*Matvec)(const void*, const float*, float*, int, const void*, const float*, float*, int, const void*, const float*,
                       float*, int, const float*, const float*, float, const signed char*, const float*, int, int, const float*, int);

bool quantized(int dtype) { return dtype >= 3; }

// Bytes of n x k values of the type in the planar device layout.
size_t layout_bytes(int dtype, long total) {
    switch (dtype) {
    case 0: return total * 4;
    case 1:
    case 2: return total * 2;
    case 3: return total + total / 32 * 2;
    case 4:
    case 7: return total / 2 + total / 32 * 2;
    case 5: return total / 2 + total / 256 * 16;
    case 6: return total / 256 * 210;
    case 8: return total / 2 + total / 256 * 8;
    case 9: return total / 256 * 110;
    case 11: return total / 2 + total / 256 * 48;
    case 12: return total / 2 + total / 32 * 6;
    default: return total / 256 * 84;
    }
}

// ggml's IQ4_NL and IQ4_XS levels.
const int kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

// IQ4_NL, IQ4_XS, Q3_K and Q2_K values from their planar layout (ggml's blocks, split into
// regions: see repack_quantized), written from ggml's block formats, not from Kernels.cu.
void decode_planar(int dtype, const unsigned char* w, long total, float* y) {
    long blocks = total / 256;
    if (dtype == 7) {  // 16 bytes of indices per 32 values (value j low nibble, j + 16 high), then f16 scales
        for (long b = 0; b < total / 32; b++) {
            float d = get_f16(w + total / 2 + 2 * b);
            for (int j = 0; j < 16; j++) {
                y[32 * b + j] = d * kIq4Levels[w[16 * b + j] & 15];
                y[32 * b + j + 16] = d * kIq4Levels[w[16 * b + j] >> 4];
            }
        }
    } else if (dtype == 8) {  // the same indices, then 8 bytes a super-block: f16 d, scales_h (16 bits), scales_l[4]
        for (long sb = 0; sb < blocks; sb++) {
            const unsigned char* h = w + total / 2 + 8 * sb;
            float d = get_f16(h);
            unsigned scalesH = h[2] | (h[3] << 8);
            for (int ib = 0; ib < 8; ib++) {
                int ls = ((h[4 + ib / 2] >> (4 * (ib % 2))) & 15) | (((scalesH >> (2 * ib)) & 3) << 4);
                float dl = d * (ls - 32);
                const unsigned char* q = w + sb * 128 + 16 * ib;
                for (int j = 0; j < 16; j++) {
                    y[256 * sb + 32 * ib + j] = dl * kIq4Levels[q[j] & 15];
                    y[256 * sb + 32 * ib + j + 16] = dl * kIq4Levels[q[j] >> 4];
                }
            }
        }
    } else if (dtype == 9) {  // hmask[32] and qs[64] a super-block, then scales[12], then f16 d
        for (long sb = 0; sb < blocks; sb++) {
            const unsigned char* hm = w + sb * 96;
            const unsigned char* qs = hm + 32;
            const unsigned char* packed = w + blocks * 96 + sb * 12;
            float d = get_f16(w + blocks * 108 + 2 * sb);
            // Sixteen 6-bit scales: low nibbles from bytes 0-7 (low halves first), top bits from bytes 8-11.
            uint32_t aux[3];
            memcpy(aux, packed, 12);
            uint32_t words[4] = {(aux[0] & 0x0f0f0f0f) | ((aux[2] & 0x03030303) << 4), (aux[1] & 0x0f0f0f0f) | (((aux[2] >> 2) & 0x03030303) << 4),
                                 ((aux[0] >> 4) & 0x0f0f0f0f) | (((aux[2] >> 4) & 0x03030303) << 4),
                                 ((aux[1] >> 4) & 0x0f0f0f0f) | (((aux[2] >> 6) & 0x03030303) << 4)};
            signed char scales[16];
            memcpy(scales, words, 16);
            float* out = y + 256 * sb;
            int is = 0;
            for (int n = 0; n < 2; n++, qs += 32, out += 128)
                for (int j = 0; j < 4; j++)
                    for (int half = 0; half < 2; half++) {
                        float dl = d * (scales[is++] - 32);
                        for (int l = 16 * half; l < 16 * half + 16; l++)
                            out[32 * j + l] = dl * (((qs[l] >> (2 * j)) & 3) - ((hm[l] >> (4 * n + j)) & 1 ? 0 : 4));
                    }
        }
    } else {  // Q2_K: qs[64] a super-block, then scales[16] (scale low nibble, minimum high), then f16 d, dmin
        for (long sb = 0; sb < blocks; sb++) {
            const unsigned char* qs = w + sb * 64;
            const unsigned char* sc = w + blocks * 64 + sb * 16;
            float d = get_f16(w + blocks * 80 + 4 * sb), dmin = get_f16(w + blocks * 80 + 4 * sb + 2);
            float* out = y + 256 * sb;
            int is = 0;
            for (int n = 0; n < 2; n++, qs += 32, out += 128)
                for (int j = 0; j < 4; j++)
                    for (int half = 0; half < 2; half++, is++) {
                        float dl = d * (sc[is] & 15), ml = dmin * (sc[is] >> 4);
                        for (int l = 16 * half; l < 16 * half + 16; l++) out[32 * j + l] = dl * ((qs[l] >> (2 * j)) & 3) - ml;
                    }
        }
    }
}

struct Weight {
    int dtype, n, k;
    std::vector<unsigned char> bytes;
    std::vector<float> v;  // the values, n x k
};

int failures = 0;

Weight make_weight(int dtype, int n, int k, Rng& rng) {
    long total = (long)n * k;
    Weight w{dtype, n, k, std::vector<unsigned char>(layout_bytes(dtype, total) + 64), std::vector<float>(total)};
    auto put16 = [&](size_t at, unsigned short b) { memcpy(w.bytes.data() + at, &b, 2); };
    if (dtype <= 2) {
        for (long i = 0; i < total; i++) {
            float f = rng.uniform(-1.f, 1.f);
            if (dtype == 0) { memcpy(w.bytes.data() + 4 * i, &f, 4); w.v[i] = f; }
            else if (dtype == 1) { put16(2 * i, to_f16(f)); w.v[i] = from_f16(to_f16(f)); }
            else { put16(2 * i, to_bf16(f)); w.v[i] = from_bf16(to_bf16(f)); }
        }
    } else if (dtype <= 6 || dtype == 11 || dtype == 12) {
        long blocks = total / block_values(dtype);
        auto raw = random_blocks(dtype, blocks, rng);
        emu::launch(repack_quantized, dim3((unsigned)((blocks + 127) / 128)), dim3(128), 0, raw.data(), dtype, w.bytes.data(), blocks);
        for (long b = 0; b < blocks; b++) dequantize_block(dtype, raw.data() + b * block_bytes(dtype), w.v.data() + b * block_values(dtype));
    } else {
        for (size_t i = 0; i < layout_bytes(dtype, total); i++) w.bytes[i] = rng.byte();
        long blocks = total / 256;
        if (dtype == 7)
            for (long b = 0; b < total / 32; b++) put16(total / 2 + 2 * b, to_f16(rng.uniform(0.002f, 0.02f)));
        else if (dtype == 8)
            for (long b = 0; b < blocks; b++) put16(total / 2 + 8 * b, to_f16(rng.uniform(0.0005f, 0.005f)));
        else if (dtype == 9)
            for (long b = 0; b < blocks; b++) put16(blocks * 108 + 2 * b, to_f16(rng.uniform(0.002f, 0.02f)));
        else
            for (long b = 0; b < blocks; b++) {
                put16(blocks * 80 + 4 * b, to_f16(rng.uniform(0.002f, 0.02f)));
                put16(blocks * 80 + 4 * b + 2, to_f16(rng.uniform(0.002f, 0.02f)));
            }
        decode_planar(dtype, w.bytes.data(), total, w.v.data());
    }
    // The kernels' own decoding of one value (load_weight: embeddings, dequantize_bf16, the
    // value-by-value products) agrees with the host's.
    for (long i = 0; i < total; i++)
        if (fabsf(load_weight(w.bytes.data(), dtype, i, total) - w.v[i]) > 1e-6f * fabsf(w.v[i])) {
            printf("FAIL load_weight of type %d: value %ld is %.9g, not %.9g\n", dtype, i, load_weight(w.bytes.data(), dtype, i, total), w.v[i]);
            failures++;
            break;
        }
    return w;
}

// Activations of varying size from one 32-value block to the next (so their 8-bit scales differ).
std::vector<float> activations(long count, Rng& rng) {
    std::vector<float> x(count);
    float s = 1;
    for (long i = 0; i < count; i++) {
        if (i % 32 == 0) s = rng.uniform(0.05f, 2.f);
        x[i] = s * rng.uniform(-1.f, 1.f);
    }
    return x;
}

// x's rows as the products see them: RMS-normalized by `norm` (when given), in doubles.
std::vector<double> normalized(const std::vector<float>& x, int k, const float* norm, float eps) {
    std::vector<double> v(x.begin(), x.end());
    if (!norm) return v;
    for (size_t r = 0; r < x.size() / k; r++) {
        double s = 0;
        for (int i = 0; i < k; i++) s += (double)x[r * k + i] * x[r * k + i];
        double scale = 1 / sqrt(s / k + eps);
        for (int i = 0; i < k; i++) v[r * k + i] = x[r * k + i] * scale * norm[i];
    }
    return v;
}

void verdict(bool ok, const char* label, double worst, double bound, double largest) {
    printf("%s %-58s max error %.3g (bound %.3g, largest %.3g)\n", ok ? "ok  " : "FAIL", label, worst, bound, largest);
    if (!ok) failures++;
}

// quantize_q8 over `rows` rows of x (normalized by `norm` first when given), checked against the
// rounding it stands for: each 32-value block's scale max |v| / 127, each value within half a step
// of it. Its launches' worst errors (in steps) are reported once at the end.
struct Q8Stats {
    double worst = 0;
    long launches = 0, bad = 0;
} q8Stats[2];

void quantize(const std::vector<float>& x, int rows, int k, const float* norm, float eps, std::vector<signed char>& xq,
              std::vector<float>& xs) {
    xq.assign((size_t)rows * k, 0);
    xs.assign((size_t)rows * k / 32, -1.f);
    emu::launch(quantize_q8, dim3(rows, (k + 255) / 256), dim3(256), 0, x.data(), norm, eps, xq.data(), xs.data(), k);
    std::vector<double> v = normalized(x, k, norm, eps);
    Q8Stats& s = q8Stats[norm != nullptr];
    s.launches++;
    for (long b = 0; b < (long)rows * k / 32; b++) {
        double m = 0;
        for (int i = 0; i < 32; i++) m = std::max(m, fabs(v[b * 32 + i]));
        bool ok = fabs(xs[b] - m / 127) <= 1e-5 * m / 127;
        for (int i = 0; i < 32; i++) {
            double e = fabs(xq[b * 32 + i] * (double)xs[b] - v[b * 32 + i]) / xs[b];
            s.worst = std::max(s.worst, e == e ? e : INFINITY);
            ok &= e <= 0.5 + 1e-4 && abs(xq[b * 32 + i]) <= 127;
        }
        if (!ok && s.bad++ < 3) printf("  quantize_q8%s k %d: block %ld wrong\n", norm ? " with the norm" : "", k, b);
    }
}

struct Mat {
    const Weight* w;
    bool bias;
};

// One launch of a matvec kernel over up to three matrices (mode 0 or 1) or gate and up (mode 2),
// against the host's sums.
void matvec_case(const char* label, Matvec kernel, std::vector<Mat> mats, int mode, bool norm, Rng& rng, double tol = 2e-6) {
    const int dtype = mats[0].w->dtype, k = mats[0].w->k;
    const float eps = 1e-5f;
    std::vector<float> x = activations(k, rng), g(k);
    for (auto& v : g) v = rng.uniform(0.5f, 1.5f);
    std::vector<signed char> xq;
    std::vector<float> xs;
    std::vector<double> xe;
    if (quantized(dtype)) {
        quantize(x, 1, k, norm ? g.data() : nullptr, eps, xq, xs);
        xe.resize(k);
        for (int i = 0; i < k; i++) xe[i] = xq[i] * (double)xs[i / 32];
    } else {
        xe = normalized(x, k, norm ? g.data() : nullptr, eps);
    }
    // Outputs with 8 values past each matrix's rows, which must stay as they were.
    std::vector<std::vector<float>> y(3), start(3), bias(3);
    for (size_t m = 0; m < mats.size(); m++) {
        int n = mats[m].w->n;
        start[m] = activations(n + 8, rng);
        y[m] = start[m];
        if (mats[m].bias) bias[m] = activations(n, rng);
    }
    int n0 = mats[0].w->n, rows = 0;
    for (auto& m : mats) rows += m.w->n;
    int warps = mode == 2 ? n0 : rows;
    if (kernel == matvec_q6_K && k == 2048) warps = (warps + 1) / 2;  // matvec_q6k_body's paired rows
    auto W = [&](int m) { return m < (int)mats.size() ? (const void*)mats[m].w->bytes.data() : nullptr; };
    auto B = [&](int m) { return m < (int)mats.size() && mats[m].bias ? bias[m].data() : nullptr; };
    auto Y = [&](int m) { return m < (int)mats.size() ? y[m].data() : nullptr; };
    auto N = [&](int m) { return m < (int)mats.size() && !(mode == 2 && m == 1) ? mats[m].w->n : 0; };
    size_t shared = !quantized(dtype) && norm ? (size_t)k * 4 : 0;
    emu::launch(kernel, dim3((warps * 32 + 255) / 256), dim3(256), shared, W(0), B(0), Y(0), N(0), W(1), B(1), Y(1), N(1), W(2), B(2),
                Y(2), N(2), x.data(), norm ? g.data() : nullptr, eps, quantized(dtype) ? xq.data() : nullptr,
                quantized(dtype) ? xs.data() : nullptr, k, mode, nullptr, 1);
    auto dot = [&](const Weight& w, int o) {
        double s = 0;
        for (int i = 0; i < k; i++) s += (double)w.v[(long)o * k + i] * xe[i];
        return s;
    };
    double worst = 0, largest = 0;
    bool untouched = true;
    for (size_t m = 0; m < mats.size(); m++) {
        int n = mats[m].w->n;
        bool written = mode != 2 || m == 0;
        for (int o = 0; o < n + 8; o++) {
            if (!written || o >= n) {
                untouched &= memcmp(&y[m][o], &start[m][o], 4) == 0;
                continue;
            }
            double want;
            if (mode == 2) {
                double gate = dot(*mats[0].w, o) + (B(0) ? bias[0][o] : 0), up = dot(*mats[1].w, o) + (B(1) ? bias[1][o] : 0);
                want = gate / (1 + exp(-gate)) * up;
                // The gating's error follows the sums' (a few f32 roundings of |gate| and |up|), not
                // its own size: a negative gate makes silu(gate) * up small while its error stays.
                largest = std::max(largest, fabs(gate * up));
            } else {
                want = dot(*mats[m].w, o) + (B(m) ? bias[m][o] : 0) + (mode == 1 ? start[m][o] : 0);
            }
            largest = std::max(largest, fabs(want));
            double e = fabs(y[m][o] - want);
            worst = e == e ? std::max(worst, e) : INFINITY;
        }
    }
    double bound = tol * largest;
    bool ok = worst <= bound && largest > 0 && untouched;
    if (!untouched) printf("  %s: wrote outside its outputs\n", label);
    verdict(ok, label, worst, bound, largest);
}

struct MatvecType {
    int dtype;
    const char* name;
    Matvec plain, gated;
    int shortK, oddK;  // rows that end inside a chunk of loads
};

void matvec_type(const MatvecType& t, Rng& rng) {
    char label[128];
    auto L = [&](const char* what, int k) {
        snprintf(label, sizeof label, "matvec_%s %s, k %d", t.name, what, k);
        return label;
    };
    int d = t.dtype;
    Weight a = make_weight(d, 37, t.shortK, rng), b = make_weight(d, 13, t.shortK, rng), c = make_weight(d, 21, t.shortK, rng);
    matvec_case(L("plain, 37 rows", t.shortK), t.plain, {{&a, false}}, 0, false, rng);
    matvec_case(L("bias, added (mode 1)", t.shortK), t.plain, {{&a, true}}, 1, false, rng);
    matvec_case(L("q/k/v 37 + 13 + 21, two biases", t.shortK), t.plain, {{&a, true}, {&b, false}, {&c, true}}, 0, false, rng);
    Weight g = make_weight(d, 21, t.oddK, rng), u = make_weight(d, 21, t.oddK, rng);
    matvec_case(L("gated 21 rows, biases", t.oddK), t.gated, {{&g, true}, {&u, true}}, 2, false, rng);
    matvec_case(L("gated 21 rows, fused norm", t.oddK), t.gated, {{&g, false}, {&u, false}}, 2, true, rng);
    Weight q = make_weight(d, 19, 4096, rng), kk = make_weight(d, 5, 4096, rng), v = make_weight(d, 6, 4096, rng);
    matvec_case(L("q/k/v 19 + 5 + 6, fused norm, bias", 4096), t.plain, {{&q, true}, {&kk, false}, {&v, false}}, 0, true, rng);
    Weight gl = make_weight(d, 11, 4096, rng), ul = make_weight(d, 11, 4096, rng);
    matvec_case(L("gated 11 rows", 4096), t.gated, {{&gl, false}, {&ul, true}}, 2, false, rng);
    Weight down = make_weight(d, 9, 14336, rng);
    matvec_case(L("down 9 rows, added (mode 1)", 14336), t.plain, {{&down, false}}, 1, false, rng);
    if (d == 6) {  // rows of 2,048 values: two rows a warp
        Weight p = make_weight(d, 37, 2048, rng), p1 = make_weight(d, 13, 2048, rng), p2 = make_weight(d, 4, 2048, rng);
        matvec_case(L("paired, 37 rows, bias", 2048), t.plain, {{&p, true}}, 0, false, rng);
        matvec_case(L("paired, q/k/v 37 + 13 + 4, added", 2048), t.plain, {{&p, false}, {&p1, true}, {&p2, false}}, 1, false, rng);
        Weight pg = make_weight(d, 13, 2048, rng);
        matvec_case(L("gated 13 rows", 2048), t.gated, {{&pg, true}, {&p1, false}}, 2, false, rng);
    }
}

// The expert mode (routes given): a mixture-of-experts decode step of `tokens` tokens with `used`
// experts each. Gate and up (gated, tables of the experts' matrices, each route reading its
// token's row: routeDiv = used), then down over the routes' own rows (routeDiv = 1).
void matvec_experts(const MatvecType& t, int d, int ff, Rng& rng) {
    const int experts = 3, tokens = 2, used = 2, routes = tokens * used;
    const bool q = quantized(t.dtype);
    std::vector<Weight> gate, up, down;
    std::vector<unsigned long long> gates, ups, downs;
    for (int e = 0; e < experts; e++) {
        gate.push_back(make_weight(t.dtype, ff, d, rng));
        up.push_back(make_weight(t.dtype, ff, d, rng));
        down.push_back(make_weight(t.dtype, d, ff, rng));
    }
    for (int e = 0; e < experts; e++) {
        gates.push_back((unsigned long long)gate[e].bytes.data());
        ups.push_back((unsigned long long)up[e].bytes.data());
        downs.push_back((unsigned long long)down[e].bytes.data());
    }
    std::vector<float> route(2 * routes);
    const int chosen[routes] = {2, 0, 1, 2};
    for (int j = 0; j < routes; j++) {
        route[2 * j] = rng.uniform(0.1f, 1.f);
        int e = chosen[j];
        memcpy(&route[2 * j + 1], &e, 4);
    }
    auto run = [&](const char* what, Matvec kernel, const std::vector<unsigned long long>& w0, const std::vector<unsigned long long>* w1,
                   const std::vector<float>& x, int inRows, int k, int n, int routeDiv, std::vector<Weight>& w, std::vector<Weight>* u,
                   std::vector<float>& y) {
        std::vector<signed char> xq;
        std::vector<float> xs;
        std::vector<double> xe(x.begin(), x.end());
        if (q) {
            quantize(x, inRows, k, nullptr, 0, xq, xs);
            for (long i = 0; i < (long)inRows * k; i++) xe[i] = xq[i] * (double)xs[i / 32];
        }
        std::vector<float> start = activations((long)routes * n + 8, rng);
        y = start;
        int warps = kernel == matvec_q6_K && k == 2048 ? (n + 1) / 2 : n;
        emu::launch(kernel, dim3((warps * 32 + 255) / 256, routes), dim3(256), 0, (const void*)w0.data(), nullptr, y.data(), n,
                    w1 ? (const void*)w1->data() : nullptr, nullptr, nullptr, 0, nullptr, nullptr, nullptr, 0, x.data(), nullptr, 0.f,
                    q ? xq.data() : nullptr, q ? xs.data() : nullptr, k, u ? 2 : 0, route.data(), routeDiv);
        double worst = 0, largest = 0;
        bool untouched = true;
        for (int i = routes * n; i < routes * n + 8; i++) untouched &= memcmp(&y[i], &start[i], 4) == 0;
        for (int j = 0; j < routes; j++)
            for (int o = 0; o < n; o++) {
                const double* xr = xe.data() + (long)(j / routeDiv) * k;
                auto dot = [&](const Weight& m) {
                    double s = 0;
                    for (int i = 0; i < k; i++) s += (double)m.v[(long)o * k + i] * xr[i];
                    return s;
                };
                double g = dot(w[chosen[j]]), want = u ? g / (1 + exp(-g)) * dot((*u)[chosen[j]]) : g;
                largest = std::max(largest, fabs(want));
                double e = fabs(y[(long)j * n + o] - want);
                worst = e == e ? std::max(worst, e) : INFINITY;
            }
        double bound = 2e-6 * largest;
        char label[128];
        snprintf(label, sizeof label, "matvec_%s experts, %s, %d routes", t.name, what, routes);
        verdict(worst <= bound && largest > 0 && untouched, label, worst, bound, largest);
    };
    std::vector<float> x = activations((long)tokens * d, rng), hidden;
    run("gate/up", t.gated, gates, &ups, x, tokens, d, ff, used, gate, &up, hidden);
    std::vector<float> h(hidden.begin(), hidden.begin() + (long)routes * ff), out;
    run("down", t.plain, downs, nullptr, h, routes, ff, d, 1, down, nullptr, out);
}

// The fixed-length 16-bit kernels (rows of exactly K values).
void matvec_fixed(int dtype, const char* name, Matvec plain, Matvec gated, int k, Rng& rng) {
    char label[128];
    auto L = [&](const char* what) {
        snprintf(label, sizeof label, "matvec_%s[_gated]_k%d %s", name, k, what);
        return label;
    };
    Weight q = make_weight(dtype, 19, k, rng), kk = make_weight(dtype, 5, k, rng), v = make_weight(dtype, 6, k, rng);
    matvec_case(L("q/k/v 19 + 5 + 6, bias"), plain, {{&q, true}, {&kk, false}, {&v, false}}, 0, false, rng);
    matvec_case(L("added (mode 1), bias"), plain, {{&q, true}}, 1, false, rng);
    Weight up = make_weight(dtype, 6, k, rng);
    matvec_case(L("gated 6 rows, bias"), gated, {{&v, true}, {&up, false}}, 2, false, rng);
    matvec_case(L("gated 6 rows, biases"), gated, {{&up, true}, {&v, true}}, 2, false, rng);
}

typedef void (*MatvecCarry)(const void*, const float*, float*, int, const void*, const float*, float*, int, const void*, const float*,
                            float*, int, const float*, int, float, const float*, float*, float*, int);

// The RMSNorm carried between a residual product and the 16-bit products after it (NormCarry):
// the residual product (`producer`, rows of `pk` values; d rows: 4,096 makes 512 blocks count
// towards the last one, 20 a last block with idle warps) against the host's sums, r g beside each
// new residual value r (exactly), the sum of squares in area[0] and the count reset; then, with a
// `consumer` for rows of d, q/k/v (a bias on q) and one matrix alone (an output head) reading r g
// against the products of the normalized row; then the residual product again, whose sum must be
// the same bits (a fixed order of sums).
void carried_norm(int dtype, const char* name, MatvecCarry producer, int pk, int d, MatvecCarry consumer, Rng& rng,
                  MatvecCarry gatedConsumer = nullptr) {
    const float eps = 1e-5f;
    char label[128];
    Weight o = make_weight(dtype, d, pk, rng), q = make_weight(dtype, 19, d, rng), kk = make_weight(dtype, 5, d, rng),
           v = make_weight(dtype, 6, d, rng);
    std::vector<float> attn = activations(pk, rng), r0 = activations(d, rng), ob = activations(d, rng), g(d), qb = activations(19, rng);
    for (auto& x : g) x = rng.uniform(0.5f, 1.5f);
    std::vector<float> area(64 + 8192, -1.f), xg(d + 8, 7.f);
    area[1] = 0;
    std::vector<float> r = r0;
    auto produce = [&]() {
        emu::launch(producer, dim3((d * 32 + 255) / 256), dim3(256), 0, (const void*)o.bytes.data(), ob.data(), r.data(), d, nullptr, nullptr,
                    nullptr, 0, nullptr, nullptr, nullptr, 0, attn.data(), 1, 0.f, g.data(), xg.data(), area.data(), 2);
    };
    produce();
    double worst = 0, largest = 0, squares = 0;
    bool exact = true;
    for (int i = 0; i < d; i++) {
        double want = r0[i] + ob[i];
        for (int j = 0; j < pk; j++) want += (double)o.v[(long)i * pk + j] * attn[j];
        worst = std::max(worst, fabs(r[i] - want));
        largest = std::max(largest, fabs(want));
        exact &= xg[i] == r[i] * g[i];
        squares += (double)r[i] * r[i];
    }
    for (int i = d; i < d + 8; i++) exact &= xg[i] == 7.f;
    unsigned count;
    memcpy(&count, &area[1], 4);
    snprintf(label, sizeof label, "matvec_%s_k%d_carry: the residual product, %d rows", name, pk, d);
    verdict(worst <= 2e-6 * largest, label, worst, 2e-6 * largest, largest);
    snprintf(label, sizeof label, "matvec_%s_k%d_carry: r g, the squares, the count", name, pk);
    double se = fabs(area[0] - squares);
    verdict(exact && count == 0 && se <= 1e-5 * squares, label, se, 1e-5 * squares, squares);
    float first = area[0];
    if (consumer) {
    // The products of the normalized row, from r as the kernel wrote it.
    std::vector<double> xn(d);
    double scale = 1 / sqrt(squares / d + eps);
    for (int i = 0; i < d; i++) xn[i] = r[i] * scale * g[i];
    auto dot = [&](const Weight& w, int row) {
        double s = 0;
        for (int j = 0; j < d; j++) s += (double)w.v[(long)row * d + j] * xn[j];
        return s;
    };
    std::vector<float> yq(19 + 8, 3.f), yk(5 + 8, 3.f), yv(6 + 8, 3.f);
    emu::launch(consumer, dim3((30 * 32 + 255) / 256), dim3(256), 0, (const void*)q.bytes.data(), qb.data(), yq.data(), 19,
                (const void*)kk.bytes.data(), nullptr, yk.data(), 5, (const void*)v.bytes.data(), nullptr, yv.data(), 6, xg.data(), 0,
                eps, nullptr, nullptr, area.data(), 1);
    worst = 0, largest = 0;
    bool untouched = true;
    auto check = [&](const Weight& w, const std::vector<float>& y, const float* b) {
        for (int i = 0; i < w.n; i++) {
            double want = dot(w, i) + (b ? b[i] : 0);
            worst = std::max(worst, fabs(y[i] - want));
            largest = std::max(largest, fabs(want));
        }
        for (int i = w.n; i < w.n + 8; i++) untouched &= y[i] == 3.f;
    };
    check(q, yq, qb.data()); check(kk, yk, nullptr); check(v, yv, nullptr);
    snprintf(label, sizeof label, "matvec_%s_k%d_carry: q/k/v of the carried norm", name, d);
    verdict(untouched && worst <= 2e-6 * largest, label, worst, 2e-6 * largest, largest);
    {
        // One matrix (the output head, `normMatmul`): 37 rows, the other two products empty.
        Weight head = make_weight(dtype, 37, d, rng);
        std::vector<float> y(37 + 8, 3.f);
        emu::launch(consumer, dim3((37 * 32 + 255) / 256), dim3(256), 0, (const void*)head.bytes.data(), nullptr, y.data(), 37, nullptr,
                    nullptr, nullptr, 0, nullptr, nullptr, nullptr, 0, xg.data(), 0, eps, nullptr, nullptr, area.data(), 1);
        worst = 0, largest = 0;
        untouched = true;
        check(head, y, nullptr);
        snprintf(label, sizeof label, "matvec_%s_k%d_carry: one matrix (a head) of the carried norm", name, d);
        verdict(untouched && worst <= 2e-6 * largest, label, worst, 2e-6 * largest, largest);
    }
    if (gatedConsumer) {
        // Gate (q's rows, q's bias) and up (19 more rows) of the same carried norm:
        // silu(gate x + b) (up x), a warp a row of each.
        Weight up = make_weight(dtype, 19, d, rng);
        std::vector<float> y(19 + 8, 3.f), scratch(8, 5.f);
        emu::launch(gatedConsumer, dim3((19 * 32 + 255) / 256), dim3(256), 0, (const void*)q.bytes.data(), qb.data(), y.data(), 19,
                    (const void*)up.bytes.data(), nullptr, scratch.data(), 0, nullptr, nullptr, nullptr, 0, xg.data(), 2, eps, nullptr,
                    nullptr, area.data(), 1);
        worst = 0, largest = 0;
        untouched = true;
        for (int i = 0; i < 19; i++) {
            double gsum = dot(q, i) + qb[i], want = gsum / (1 + exp(-gsum)) * dot(up, i);
            worst = std::max(worst, fabs(y[i] - want));
            largest = std::max(largest, fabs(want));
        }
        for (int i = 19; i < 19 + 8; i++) untouched &= y[i] == 3.f;
        for (float v : scratch) untouched &= v == 5.f;
        snprintf(label, sizeof label, "matvec_%s_gated_k%d_carry: gate/up of the carried norm", name, d);
        verdict(untouched && worst <= 1e-5 * largest, label, worst, 1e-5 * largest, largest);
    }
    }
    r = r0;
    produce();
    memcpy(&count, &area[1], 4);
    snprintf(label, sizeof label, "matvec_%s_k%d_carry: again, the same sum", name, pk);
    verdict(memcmp(&first, &area[0], 4) == 0 && count == 0, label, fabs(area[0] - first), 0, first);
}

// matmul_rows over `tokens` tokens: three matrices (or gate and up), each token's products.
void matmul_rows_case(const char* label, std::vector<Mat> mats, int tokens, int mode, Rng& rng, double tol = 2e-6) {
    const int dtype = mats[0].w->dtype, k = mats[0].w->k;
    std::vector<float> x = activations((long)tokens * k, rng);
    std::vector<signed char> xq;
    std::vector<float> xs;
    // Q8_0, Q4_0, IQ4_NL, Q4_K, Q5_K and Q6_K take 8-bit activations; the other types f32 ones.
    bool q8 = dtype >= 3 && dtype <= 7 || dtype == 11 || dtype == 12;
    std::vector<double> xe(x.begin(), x.end());
    if (quantized(dtype)) {
        quantize(x, tokens, k, nullptr, 0, xq, xs);
        if (q8)
            for (long i = 0; i < (long)tokens * k; i++) xe[i] = xq[i] * (double)xs[i / 32];
    }
    std::vector<std::vector<float>> y(3), start(3), bias(3);
    for (size_t m = 0; m < mats.size(); m++) {
        int n = mats[m].w->n;
        start[m] = activations((long)tokens * n + 8, rng);
        y[m] = start[m];
        if (mats[m].bias) bias[m] = activations(n, rng);
    }
    int rows = 0;
    for (auto& m : mats) rows += m.w->n;
    int warps = mode == 2 ? mats[0].w->n : rows;
    auto W = [&](int m) { return m < (int)mats.size() ? (const void*)mats[m].w->bytes.data() : nullptr; };
    auto B = [&](int m) { return m < (int)mats.size() && mats[m].bias ? bias[m].data() : nullptr; };
    auto Y = [&](int m) { return m < (int)mats.size() ? y[m].data() : nullptr; };
    auto N = [&](int m) { return m < (int)mats.size() && !(mode == 2 && m == 1) ? mats[m].w->n : 0; };
    emu::launch(matmul_rows, dim3((warps * 32 + 255) / 256), dim3(256), 0, W(0), B(0), Y(0), N(0), W(1), B(1), Y(1), N(1), W(2), B(2),
                Y(2), N(2), dtype, x.data(), quantized(dtype) ? xq.data() : nullptr, quantized(dtype) ? xs.data() : nullptr, k,
                tokens, mode);
    auto dot = [&](const Weight& w, int o, int t) {
        double s = 0;
        for (int i = 0; i < k; i++) s += (double)w.v[(long)o * k + i] * xe[(long)t * k + i];
        return s;
    };
    double worst = 0, largest = 0;
    bool untouched = true;
    for (size_t m = 0; m < mats.size(); m++) {
        int n = mats[m].w->n;
        bool written = mode != 2 || m == 0;
        for (long i = 0; i < (long)tokens * n + 8; i++) {
            if (!written || i >= (long)tokens * n) {
                untouched &= memcmp(&y[m][i], &start[m][i], 4) == 0;
                continue;
            }
            int t = (int)(i / n), o = (int)(i % n);
            double want;
            if (mode == 2) {
                double gate = dot(*mats[0].w, o, t) + (B(0) ? bias[0][o] : 0), up = dot(*mats[1].w, o, t) + (B(1) ? bias[1][o] : 0);
                want = gate / (1 + exp(-gate)) * up;
            } else {
                want = dot(*mats[m].w, o, t) + (B(m) ? bias[m][o] : 0) + (mode == 1 ? start[m][i] : 0);
            }
            largest = std::max(largest, fabs(want));
            double e = fabs(y[m][i] - want);
            worst = e == e ? std::max(worst, e) : INFINITY;
        }
    }
    double bound = tol * largest;
    bool ok = worst <= bound && largest > 0 && untouched;
    if (!untouched) printf("  %s: wrote outside its outputs\n", label);
    verdict(ok, label, worst, bound, largest);
}

void matmul_rows_type(int dtype, const char* name, int k, Rng& rng) {
    char label[128];
    auto L = [&](const char* what) {
        snprintf(label, sizeof label, "matmul_rows %s k %d, %s", name, k, what);
        return label;
    };
    Weight a = make_weight(dtype, 21, k, rng), b = make_weight(dtype, 7, k, rng), c = make_weight(dtype, 5, k, rng);
    matmul_rows_case(L("q/k/v 21 + 7 + 5, bias, 5 tokens"), {{&a, true}, {&b, false}, {&c, false}}, 5, 0, rng);
    matmul_rows_case(L("added (mode 1), bias, 11 tokens"), {{&b, true}}, 11, 1, rng);
    Weight up = make_weight(dtype, 7, k, rng);
    matmul_rows_case(L("gated 7 rows, biases, 8 tokens"), {{&b, true}, {&up, true}}, 8, 2, rng);
}

}  // namespace

int main() {
    Rng rng(11);
    // Rows that end inside a chunk: 25 or 95 blocks of 32, 3 or 11 super-blocks, 101 or 375 loads.
    const MatvecType types[] = {
        {5, "q4_K", matvec_q4_K, matvec_q4_K_gated, 768, 2816},
        {11, "q5_K", matvec_q5_K, matvec_q5_K_gated, 768, 2816},
        {6, "q6_K", matvec_q6_K, matvec_q6_K_gated, 768, 2816},
        {3, "q8_0", matvec_q8_0, matvec_q8_0_gated, 800, 3040},
        {4, "q4_0", matvec_q4_0, matvec_q4_0_gated, 800, 3040},
        {12, "q5_0", matvec_q5_0, matvec_q5_0_gated, 800, 3040},
        {7, "iq4_nl", matvec_iq4_nl, matvec_iq4_nl_gated, 800, 3040},
        {8, "iq4_xs", matvec_iq4_xs, matvec_iq4_xs_gated, 768, 2816},
        {9, "q3_K", matvec_q3_K, matvec_q3_K_gated, 768, 2816},
        {10, "q2_K", matvec_q2_K, matvec_q2_K_gated, 768, 2816},
        {1, "f16", matvec_f16, matvec_f16_gated, 808, 3000},
        {2, "bf16", matvec_bf16, matvec_bf16_gated, 808, 3000},
    };
    for (const MatvecType& t : types) matvec_type(t, rng);
    for (const MatvecType& t : types) matvec_experts(t, t.shortK, 256, rng);
    // Every length CUDABackend.fixedMatvecLengths lists, in both 16-bit types.
#define FIXED(K)                                                                      \
    matvec_fixed(1, "f16", matvec_f16_k##K, matvec_f16_gated_k##K, K, rng);           \
    matvec_fixed(2, "bf16", matvec_bf16_k##K, matvec_bf16_gated_k##K, K, rng);
    FIXED(2048) FIXED(2560) FIXED(3072) FIXED(3584) FIXED(4096) FIXED(5120) FIXED(8192)
    FIXED(9728) FIXED(11008) FIXED(12288) FIXED(13824) FIXED(14336) FIXED(18944) FIXED(28672)
#undef FIXED
    carried_norm(1, "f16", matvec_f16_k4096_carry, 4096, 4096, matvec_f16_k4096_carry, rng, matvec_f16_gated_k4096_carry);
    carried_norm(2, "bf16", matvec_bf16_k4096_carry, 4096, 4096, matvec_bf16_k4096_carry, rng, matvec_bf16_gated_k4096_carry);
    // The other lengths' carry kernels as residual products (20 rows: a last block with idle warps).
#define CARRY(K)                                                                      \
    carried_norm(1, "f16", matvec_f16_k##K##_carry, K, 20, nullptr, rng);             \
    carried_norm(2, "bf16", matvec_bf16_k##K##_carry, K, 20, nullptr, rng);
    CARRY(2048) CARRY(2560) CARRY(3072) CARRY(3584) CARRY(5120) CARRY(8192)
    CARRY(9728) CARRY(11008) CARRY(12288) CARRY(13824) CARRY(14336) CARRY(18944) CARRY(28672)
#undef CARRY

    const struct { int dtype; const char* name; int k; } rowTypes[] = {
        {5, "Q4_K", 2816}, {6, "Q6_K", 2816}, {3, "Q8_0", 3040}, {4, "Q4_0", 3040}, {7, "IQ4_NL", 800}, {8, "IQ4_XS", 768},
        {9, "Q3_K", 768}, {10, "Q2_K", 768}, {11, "Q5_K", 768}, {12, "Q5_0", 3040}, {1, "F16", 3000}, {1, "F16", 804}, {2, "BF16", 808}, {0, "F32", 1000},
    };
    for (auto& r : rowTypes) matmul_rows_type(r.dtype, r.name, r.k, rng);
    for (int n = 0; n < 2; n++) {
        char label[96];
        snprintf(label, sizeof label, "quantize_q8%s, %ld launches (error in steps)", n ? " with the norm" : "", q8Stats[n].launches);
        verdict(q8Stats[n].bad == 0 && q8Stats[n].launches > 0, label, q8Stats[n].worst, 0.5, 127);
    }
    printf(failures ? "%d FAILED\n" : "matvec: all passed\n", failures);
    return failures ? 1 : 0;
}
