// The mixture-of-experts kernels against host references, launched as the backend's MoE path
// launches them: moe_route (experts held in registers, 4 or 8 a lane, or read again each round;
// ties to the lower index; a row of -inf logits gets valid indices of weight 0; normalized or
// not), moe_router (RMSNorm, router logits and routing in one launch, the 8-bit copy, its
// counters left at zero), moe_group (counts, starts, a permutation of places, the rows gathered,
// the chosen experts, reads, expert_gemm's tiles; empty experts, more routes than threads),
// moe_products (plain and gated, an expert with more rows than a warp's tokens at once, an empty
// one, F16, BF16 and quantized weights against 8-bit activations), moe_combine (grouped and in
// route order, columns past a block's 256, the sum in expert order: exact), every moe_down_*
// kernel (routes' rows laid end to end, outputs that end inside a block), dequantize_experts_bf16
// and add_sigmoid_gated.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

#include <numeric>

using namespace test;

namespace {

bool allOk = true;

void verdict(bool ok, const char* label) {
    printf("%s %-64s exact\n", ok ? "ok  " : "FAIL", label);
    allOk &= ok;
}

std::vector<float> uniform(long n, Rng& rng, float lo = -1.f, float hi = 1.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = rng.uniform(lo, hi);
    return v;
}

float int_bits(int e) { float f; memcpy(&f, &e, 4); return f; }
int expert_of(float f) { int e; memcpy(&e, &f, 4); return e; }

// The routing moe_route documents, on the host: softmax in doubles, then the k most probable
// (ties to the lower index), the weights divided by their sum when normalizing; a row whose
// probabilities are not numbers gets experts j % experts of weight 0.
std::vector<std::pair<double, int>> host_route(const float* l, int experts, int k, bool normalize) {
    double m = -INFINITY, s = 0;
    for (int e = 0; e < experts; e++) m = std::max(m, (double)l[e]);
    std::vector<double> p(experts);
    for (int e = 0; e < experts; e++) s += exp(l[e] - m);
    for (int e = 0; e < experts; e++) p[e] = exp(l[e] - m) / s;
    std::vector<int> order(experts);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    std::vector<std::pair<double, int>> r;
    double chosen = 0;
    for (int j = 0; j < k; j++) {
        if (!(p[order[j]] == p[order[j]])) r.push_back({0.0, j % experts});
        else r.push_back({p[order[j]], order[j]});
        chosen += r.back().first;
    }
    if (normalize && chosen > 0)
        for (auto& x : r) x.first /= chosen;
    return r;
}

// Compares a launch's routes with the host's: the same experts in the same order, weights to f32's rounding.
bool same_routes(const float* got, const float* logits, int rows, int experts, int k, bool normalize, Errors& e) {
    bool ok = true;
    for (int t = 0; t < rows; t++) {
        auto want = host_route(logits + (long)t * experts, experts, k, normalize);
        for (int j = 0; j < k; j++) {
            int ge = expert_of(got[2 * ((long)t * k + j) + 1]);
            if (ge != want[j].second) {
                if (ok) printf("  row %d route %d: expert %d, not %d\n", t, j, ge, want[j].second);
                ok = false;
            }
            e.add(got[2 * ((long)t * k + j)], want[j].first, std::max(want[j].first, 1e-3));
        }
    }
    return ok;
}

// Logits with a few exact ties (the lower index comes first) and, in row 1, all -inf.
std::vector<float> router_logits(int rows, int experts, Rng& rng) {
    std::vector<float> l = uniform((long)rows * experts, rng, -4.f, 4.f);
    for (int t = 0; t < rows; t++) {
        float* r = l.data() + (long)t * experts;
        int a = rng.below(experts), b = rng.below(experts);
        r[a] = r[b] = 4.5f;  // a tie at the top
        r[rng.below(experts)] = r[rng.below(experts)];
    }
    if (rows > 1)
        for (int e = 0; e < experts; e++) l[experts + e] = -INFINITY;
    return l;
}

void route_case(int rows, int experts, int k, bool normalize, Rng& rng) {
    std::vector<float> l = router_logits(rows, experts, rng), routes((long)rows * 2 * k + 2, 5.f);
    emu::launch(moe_route, dim3((rows * 32 + 255) / 256), dim3(256), 0, l.data(), rows, experts, k, (int)normalize, routes.data());
    char label[96];
    snprintf(label, sizeof label, "moe_route %d rows, %d experts, k %d%s", rows, experts, k, normalize ? ", normalized" : "");
    Errors e(label, 1e-6);
    bool ok = same_routes(routes.data(), l.data(), rows, experts, k, normalize, e);
    ok &= routes[(long)rows * 2 * k] == 5.f && routes[(long)rows * 2 * k + 1] == 5.f;
    ok &= e.report();
    if (!ok) printf("FAIL %s: experts or the words past the routes\n", label);
    allOk &= ok;
}

// moe_router as normRoute launches it: block (row, expert), the routing by each row's last block.
void router_case(int rows, int d, int experts, int k, bool normalize, bool q8, Rng& rng) {
    const float eps = 1e-6f;
    std::vector<float> x = uniform((long)rows * d, rng, -2.f, 2.f), g = uniform(d, rng, 0.5f, 1.5f), w = uniform((long)experts * d, rng, -0.2f, 0.2f);
    std::vector<float> h((long)rows * d, NAN), logits((long)rows * experts, NAN), routes((long)rows * 2 * k, NAN), hs((long)rows * d / 32, NAN);
    std::vector<signed char> hq((long)rows * d, 99);
    std::vector<int> counters(rows, 0);
    // Twice: the counters the first launch leaves serve the second.
    for (int pass = 0; pass < 2; pass++)
        emu::launch(moe_router, dim3(rows, experts), dim3(256), 0, x.data(), g.data(), eps, d, w.data(), experts, k, (int)normalize, h.data(),
                    logits.data(), routes.data(), counters.data(), q8 ? hq.data() : nullptr, q8 ? hs.data() : nullptr);
    char label[96];
    snprintf(label, sizeof label, "moe_router %d rows x %d, %d experts, k %d%s", rows, d, experts, k, q8 ? ", 8-bit copy" : "");
    Errors eh("  its normalized rows", 2e-6), el(label, 2e-6), er("  its routes' weights", 1e-6);
    bool ok = true;
    for (int t = 0; t < rows; t++) {
        double ss = 0;
        for (int i = 0; i < d; i++) ss += (double)x[(long)t * d + i] * x[(long)t * d + i];
        double scale = 1 / sqrt(ss / d + eps);
        for (int i = 0; i < d; i++) {
            double v = x[(long)t * d + i] * scale * g[i];
            eh.add(h[(long)t * d + i], v, fabs(v) + 1e-3);
        }
        for (int e = 0; e < experts; e++) {
            double dot = 0, mag = 0;
            for (int i = 0; i < d; i++) {
                double p = x[(long)t * d + i] * scale * g[i] * w[(long)e * d + i];
                dot += p;
                mag += fabs(p);
            }
            el.add(logits[(long)t * experts + e], dot, mag);
        }
        // The 8-bit copy: the kernel's own normalized row rounded per 32 values.
        for (int b = 0; q8 && b < d / 32; b++) {
            float m = 0;
            for (int i = 0; i < 32; i++) m = std::max(m, fabsf(h[(long)t * d + 32 * b + i]));
            ok &= hs[(long)t * d / 32 + b] == m / 127.f;
            for (int i = 0; i < 32; i++) {
                float v = h[(long)t * d + 32 * b + i];
                ok &= hq[(long)t * d + 32 * b + i] == (signed char)(m > 0 ? (int)rintf(v / (m / 127.f)) : 0);
            }
        }
    }
    if (!q8) for (auto c : hq) ok &= c == 99;
    // The routing given the kernel's logits (whose rounding decides near ties).
    ok &= same_routes(routes.data(), logits.data(), rows, experts, k, normalize, er);
    for (int c : counters) ok &= c == 0;
    ok &= el.report();
    ok &= eh.report();
    ok &= er.report();
    if (!ok) printf("FAIL %s: the 8-bit copy, the routes or the counters\n", label);
    allOk &= ok;
}

// Routes of `rows` rows, k each, over `experts` experts of which those in `unused` are chosen by none.
std::vector<float> random_routes(int rows, int k, int experts, const std::vector<int>& unused, Rng& rng) {
    std::vector<int> pool;
    for (int e = 0; e < experts; e++)
        if (std::find(unused.begin(), unused.end(), e) == unused.end()) pool.push_back(e);
    std::vector<float> r((long)rows * 2 * k);
    for (int t = 0; t < rows; t++) {
        std::vector<int> p = pool;
        for (int j = 0; j < k; j++) {
            std::swap(p[j], p[j + rng.below((int)p.size() - j)]);
            r[2 * ((long)t * k + j)] = rng.uniform(0.05f, 1.f);
            r[2 * ((long)t * k + j) + 1] = int_bits(p[j]);
        }
    }
    return r;
}

struct Groups {
    std::vector<int> counts, starts, place, rowOf, active, reads, tiles;
};

Groups group(const std::vector<float>& routes, int rows, int k, int experts, int tileRows, bool withTiles) {
    int total = rows * k;
    Groups g;
    g.counts.assign(experts, -1);
    g.starts.assign(experts, -1);
    g.place.assign(total, -1);
    g.rowOf.assign(total, -1);
    g.active.assign(experts + 1, -1);
    g.reads.assign(experts, 3);
    g.tiles.assign(1 + 3 * (total + experts), -1);
    emu::launch(moe_group, dim3(1), dim3(1024), 0, routes.data(), total, k, experts, g.counts.data(), g.starts.data(), g.place.data(),
                g.rowOf.data(), g.active.data(), g.reads.data(), withTiles ? g.tiles.data() : nullptr, tileRows);
    return g;
}

void group_case(int rows, int k, int experts, const std::vector<int>& unused, int tileRows, bool withTiles, Rng& rng) {
    int total = rows * k;
    auto routes = random_routes(rows, k, experts, unused, rng);
    Groups g = group(routes, rows, k, experts, tileRows, withTiles);
    std::vector<int> count(experts, 0);
    for (int r = 0; r < total; r++) count[expert_of(routes[2 * r + 1])]++;
    bool ok = true;
    int at = 0, a = 0;
    std::vector<int> tiles = {0};
    for (int e = 0; e < experts; e++) {
        ok &= g.counts[e] == count[e] && g.starts[e] == at;
        ok &= g.reads[e] == 3 + (count[e] > 0);
        if (count[e] > 0) ok &= g.active[a++] == e;
        for (int r = 0; r < count[e]; r += tileRows) {
            tiles.insert(tiles.end(), {e, at + r, std::min(tileRows, count[e] - r)});
            tiles[0]++;
        }
        at += count[e];
    }
    ok &= g.active[experts] == a;
    // Places: a permutation, each route within its expert's group, its row gathered there.
    std::vector<int> seen(total, 0);
    for (int r = 0; r < total; r++) {
        int p = g.place[r], e = expert_of(routes[2 * r + 1]);
        ok &= p >= g.starts[e] && p < g.starts[e] + count[e] && g.rowOf[p] == r / k;
        if (p >= 0 && p < total) seen[p]++;
    }
    for (int s : seen) ok &= s == 1;
    if (withTiles) ok &= std::equal(tiles.begin(), tiles.end(), g.tiles.begin());
    else ok &= g.tiles[0] == -1;
    char label[96];
    snprintf(label, sizeof label, "moe_group %d routes, %d experts (%d unused)%s", total, experts, (int)unused.size(),
             withTiles ? ", tiles" : "");
    verdict(ok, label);
}

// Expert weights in the planar device layout, their values as ggml's blocks give them.
int layout_bytes(int dtype, long total) {
    return dtype == 1 || dtype == 2 ? total * 2 : dtype == 3 ? total + total / 16 : dtype == 4 || dtype == 7 ? total / 2 + total / 16
         : dtype == 5 ? total / 2 + total / 16 : total / 256 * 210;
}

const int kIq4Levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

struct Weight {
    std::vector<unsigned char> bytes;
    std::vector<float> v;
};

Weight make_weight(int dtype, int n, int k, Rng& rng) {
    long total = (long)n * k;
    Weight w{std::vector<unsigned char>(layout_bytes(dtype, total) + 64), std::vector<float>(total)};
    if (dtype <= 2) {
        for (long i = 0; i < total; i++) {
            float f = rng.uniform(-1.f, 1.f);
            unsigned short b = dtype == 1 ? to_f16(f) : to_bf16(f);
            memcpy(&w.bytes[2 * i], &b, 2);
            w.v[i] = dtype == 1 ? from_f16(b) : from_bf16(b);
        }
    } else if (dtype <= 6 || dtype == 11 || dtype == 12) {
        long blocks = total / block_values(dtype);
        auto raw = random_blocks(dtype, blocks, rng);
        emu::launch(repack_quantized, dim3((unsigned)((blocks + 127) / 128)), dim3(128), 0, raw.data(), dtype, w.bytes.data(), blocks);
        for (long b = 0; b < blocks; b++) dequantize_block(dtype, raw.data() + b * block_bytes(dtype), w.v.data() + b * block_values(dtype));
    } else {  // IQ4_NL: 16 bytes of level indices a 32-value block (value j low nibble, j + 16 high), then f16 scales
        for (long i = 0; i < total / 2; i++) w.bytes[i] = rng.byte();
        for (long b = 0; b < total / 32; b++) {
            put_f16(&w.bytes[total / 2 + 2 * b], rng.uniform(0.002f, 0.02f));
            float d = get_f16(&w.bytes[total / 2 + 2 * b]);
            for (int j = 0; j < 16; j++) {
                w.v[32 * b + j] = d * kIq4Levels[w.bytes[16 * b + j] & 15];
                w.v[32 * b + j + 16] = d * kIq4Levels[w.bytes[16 * b + j] >> 4];
            }
        }
    }
    return w;
}

// Random activations of `rows` rows of k for products of `dtype`: x, and for the quantized types
// whose row products read 8-bit x (Q8_0 to IQ4_NL, Q5_K and Q5_0) x rounded to 8 bits as those
// products read it (quantize_q8, checked in
// test_matvec); xe the values the products multiply (x itself, or what the 8-bit copy stands for).
struct Activations {
    std::vector<float> x;
    std::vector<signed char> xq;
    std::vector<float> xs;
    std::vector<double> xe;
    bool quantized;
    const signed char* q8() const { return quantized ? xq.data() : nullptr; }
    const float* scales() const { return quantized ? xs.data() : nullptr; }
};

Activations activations(int dtype, int rows, int k, Rng& rng) {
    Activations a;
    a.x = uniform((long)rows * k, rng);
    a.xe.assign(a.x.begin(), a.x.end());
    a.quantized = dtype >= 3 && dtype <= 7 || dtype == 11 || dtype == 12;
    if (a.quantized) {
        a.xq.assign((size_t)rows * k, 0);
        a.xs.assign((size_t)rows * k / 32, 0);
        emu::launch(quantize_q8, dim3(rows, (k + 255) / 256), dim3(256), 0, a.x.data(), (const float*)nullptr, 0.f, a.xq.data(),
                    a.xs.data(), k);
        for (size_t i = 0; i < a.xe.size(); i++) a.xe[i] = a.xq[i] * (double)a.xs[i / 32];
    }
    return a;
}

// moe_products over grouped rows as expertRowProducts launches it (one route per row: x holds
// the grouped rows themselves), gated (gate and up of `dtype`) or not.
void products_case(int dtype, bool gated, Rng& rng) {
    const int experts = 5, rows = 10, k = 2, n = 40, kk = 256, total = rows * k;
    // Every row takes expert 1 (10 rows: two passes of TOKENS), its second expert one of 0, 2
    // and 4; expert 3 is chosen by none.
    std::vector<float> routes((long)total * 2);
    for (int t = 0; t < rows; t++) {
        routes[4 * t] = 0.5f; routes[4 * t + 1] = int_bits(1);
        routes[4 * t + 2] = 0.5f; routes[4 * t + 3] = int_bits(2 * (t % 3));
    }
    Groups g = group(routes, rows, k, experts, 64, false);
    Activations a = activations(dtype, total, kk, rng);
    std::vector<Weight> w, u;
    std::vector<unsigned long long> wt, ut;
    for (int e = 0; e < experts; e++) {
        w.push_back(make_weight(dtype, n, kk, rng));
        if (gated) u.push_back(make_weight(dtype, n, kk, rng));
    }
    for (int e = 0; e < experts; e++) {
        wt.push_back((unsigned long long)w[e].bytes.data());
        if (gated) ut.push_back((unsigned long long)u[e].bytes.data());
    }
    int slots = std::min(experts, total);
    std::vector<float> y((long)total * n + 8, -5.f);
    emu::launch(moe_products, dim3((slots * n * 32 + 255) / 256), dim3(256), 0, wt.data(), gated ? ut.data() : nullptr, dtype, dtype, n, kk,
                a.x.data(), a.q8(), a.scales(), g.counts.data(), g.starts.data(), g.active.data(), experts,
                slots, y.data());
    char label[96];
    snprintf(label, sizeof label, "moe_products type %d%s, %d routes over %d experts", dtype, gated ? " gated" : "", total, experts);
    Errors err(label, 2e-6);
    for (int e = 0; e < experts; e++)
        for (int p = g.starts[e]; p < g.starts[e] + g.counts[e]; p++)
            for (int o = 0; o < n; o++) {
                double s[2] = {0, 0}, mag[2] = {0, 0};
                for (int m = 0; m < (gated ? 2 : 1); m++)
                    for (int i = 0; i < kk; i++) {
                        double prod = a.xe[(long)p * kk + i] * (m ? u[e] : w[e]).v[(long)o * kk + i];
                        s[m] += prod;
                        mag[m] += fabs(prod);
                    }
                double want = gated ? s[0] / (1 + exp(-s[0])) * s[1] : s[0];
                double scale = gated ? mag[0] * fabs(s[1]) + fabs(s[0]) * mag[1] + 1e-3 : mag[0];
                err.add(y[(long)p * n + o], want, scale);
            }
    bool ok = err.report();
    for (int i = 0; i < 8; i++) ok &= y[(long)total * n + i] == -5.f;
    if (!ok) printf("FAIL %s (or past the outputs)\n", label);
    allOk &= ok;
}

// moe_combine: grouped (place) or the routes' own rows (no place, reads counted). The sum is the
// documented one: in order of expert index, in f32, then added to out.
void combine_case(bool grouped, int rows, int k, int experts, int d, Rng& rng) {
    auto routes = random_routes(rows, k, experts, {}, rng);
    int total = rows * k;
    std::vector<int> place(total);
    std::iota(place.begin(), place.end(), 0);
    for (int i = total - 1; i > 0; i--) std::swap(place[i], place[rng.below(i + 1)]);
    std::vector<float> y = uniform((long)total * d, rng), out = uniform((long)rows * d + 8, rng), start = out;
    std::vector<int> reads(experts, 2);
    emu::launch(moe_combine, dim3(rows, (d + 255) / 256), dim3(256), 0, routes.data(), grouped ? place.data() : nullptr, k, y.data(),
                out.data(), d, grouped ? nullptr : reads.data());
    bool ok = true;
    std::vector<int> count(experts, 0);
    for (int t = 0; t < rows; t++) {
        std::vector<int> order(k);
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int a, int b) { return expert_of(routes[2 * (t * k + a) + 1]) < expert_of(routes[2 * (t * k + b) + 1]); });
        for (int j = 0; j < k; j++) count[expert_of(routes[2 * (t * k + j) + 1])]++;
        for (int i = 0; i < d; i++) {
            float s = 0;
            for (int j : order) {
                int qr = t * k + j;
                s += routes[2 * qr] * y[(long)(grouped ? place[qr] : qr) * d + i];
            }
            ok &= out[(long)t * d + i] == start[(long)t * d + i] + s;
        }
    }
    for (int i = 0; i < 8; i++) ok &= out[(long)rows * d + i] == start[(long)rows * d + i];
    for (int e = 0; e < experts; e++) ok &= reads[e] == (grouped ? 2 : 2 + count[e]);
    char label[96];
    snprintf(label, sizeof label, "moe_combine %d rows x %d, k %d%s", rows, d, k, grouped ? ", grouped" : ", route order, reads");
    verdict(ok, label);
}

// moe_down_<type> as expertMatvecs launches it: block (output group, row), the row's `used`
// routes' hidden rows (f32, or their 8-bit copy for quantized types) against each route's
// expert's down matrix, weighted and added to the residual.
void down_case(const char* name, void (*kernel)(const unsigned long long*, int, int, const float*, int, const float*, const signed char*,
                                                 const float*, float*, int*),
               int dtype, int d, int ff, Rng& rng) {
    const int experts = 6, rows = 2, used = 3, total = rows * used;
    auto routes = random_routes(rows, used, experts, {4}, rng);
    std::vector<Weight> w;
    std::vector<unsigned long long> table;
    for (int e = 0; e < experts; e++) w.push_back(make_weight(dtype, d, ff, rng));
    for (auto& m : w) table.push_back((unsigned long long)m.bytes.data());
    Activations a = activations(dtype, total, ff, rng);
    std::vector<float> res = uniform((long)rows * d + 8, rng), start = res;
    std::vector<int> reads(experts, 1);
    emu::launch(kernel, dim3((d + 7) / 8, rows), dim3(256), 0, table.data(), d, ff, routes.data(), used, a.quantized ? nullptr : a.x.data(),
                a.q8(), a.scales(), res.data(), reads.data());
    char label[96];
    snprintf(label, sizeof label, "moe_down_%s %d rows x %d routes, %d x %d", name, rows, used, d, ff);
    Errors err(label, 2e-6);
    std::vector<int> count(experts, 0);
    for (int t = 0; t < rows; t++) {
        for (int j = 0; j < used; j++) count[expert_of(routes[2 * (t * used + j) + 1])]++;
        for (int o = 0; o < d; o++) {
            double s = start[(long)t * d + o], mag = fabs(s);
            for (int j = 0; j < used; j++) {
                int e = expert_of(routes[2 * (t * used + j) + 1]);
                double rw = routes[2 * (t * used + j)];
                for (int i = 0; i < ff; i++) {
                    double p = rw * a.xe[(long)(t * used + j) * ff + i] * w[e].v[(long)o * ff + i];
                    s += p;
                    mag += fabs(p);
                }
            }
            err.add(res[(long)t * d + o], s, mag);
        }
    }
    bool ok = err.report();
    for (int i = 0; i < 8; i++) ok &= res[(long)rows * d + i] == start[(long)rows * d + i];
    for (int e = 0; e < experts; e++) ok &= reads[e] == 1 + count[e];
    if (!ok) printf("FAIL %s: past the outputs or the reads\n", label);
    allOk &= ok;
}

// dequantize_experts_bf16 over the chosen experts moe_group lists (one block row more than
// chosen: it writes nothing).
void dequantize_experts_case(int dtype, Rng& rng) {
    const int experts = 5, n = 32, k = 256;
    long size = (long)n * k;
    std::vector<Weight> w;
    std::vector<unsigned long long> table;
    for (int e = 0; e < experts; e++) w.push_back(make_weight(dtype, n, k, rng));
    for (auto& m : w) table.push_back((unsigned long long)m.bytes.data());
    std::vector<int> active = {1, 3, 4, -1, -1, 3};  // three chosen (active[experts])
    int chosen = 3;
    std::vector<unsigned short> out((chosen + 1) * size, 0xbeef);
    emu::launch(dequantize_experts_bf16, dim3((unsigned)((size / 8 + 255) / 256), chosen + 1), dim3(256), 0, table.data(), active.data(),
                experts, dtype, size, (__nv_bfloat16*)out.data());
    char label[96];
    snprintf(label, sizeof label, "dequantize_experts_bf16 type %d, %d of %d experts", dtype, chosen, experts);
    Errors e(label, 0);
    for (int a = 0; a < chosen; a++)
        for (long i = 0; i < size; i++) {
            float want = from_bf16(to_bf16(w[active[a]].v[i]));
            e.add(from_bf16(out[a * size + i]), want, fabs(want) * 0x1p-8 + 1e-30);
        }
    bool ok = e.report();
    for (long i = chosen * size; i < (chosen + 1) * size; i++) ok &= out[i] == 0xbeef;
    if (!ok) printf("FAIL %s: past the chosen experts\n", label);
    allOk &= ok;
}

void sigmoid_gated_case(int rows, int dim, Rng& rng) {
    long n = (long)rows * dim;
    std::vector<float> y = uniform(n, rng, -2.f, 2.f), gate = uniform(rows, rng, -6.f, 6.f), res = uniform(n + 8, rng), start = res;
    emu::launch(add_sigmoid_gated, dim3((unsigned)((n + 255) / 256)), dim3(256), 0, y.data(), gate.data(), res.data(), dim, n);
    char label[96];
    snprintf(label, sizeof label, "add_sigmoid_gated %d rows x %d", rows, dim);
    Errors e(label, 1e-6);
    for (long i = 0; i < n; i++) {
        double want = start[i] + y[i] / (1 + exp(-(double)gate[i / dim]));
        e.add(res[i], want, fabs(start[i]) + fabs(y[i]));
    }
    bool ok = e.report();
    for (long i = n; i < n + 8; i++) ok &= res[i] == start[i];
    allOk &= ok;
}

}  // namespace

int main() {
    Rng rng(57);
    route_case(3, 8, 2, true, rng);
    route_case(5, 128, 8, true, rng);
    route_case(9, 200, 4, false, rng);
    route_case(3, 300, 6, true, rng);
    route_case(2, 260, 3, false, rng);
    route_case(2, 64, 1, false, rng);
    router_case(3, 256, 40, 4, true, true, rng);
    router_case(2, 384, 130, 8, false, false, rng);
    group_case(13, 3, 10, {2, 7, 9}, 4, true, rng);
    group_case(300, 4, 64, {0, 63}, 64, true, rng);
    group_case(5, 2, 6, {}, 64, false, rng);
    for (int dtype : {1, 2, 3, 4, 5, 6, 11, 12}) products_case(dtype, dtype % 2 == 1, rng);
    combine_case(true, 3, 4, 9, 300, rng);
    combine_case(false, 2, 8, 16, 600, rng);
    down_case("f16", moe_down_f16, 1, 100, 768, rng);
    down_case("bf16", moe_down_bf16, 2, 100, 256, rng);
    down_case("q8_0", moe_down_q8_0, 3, 100, 768, rng);
    down_case("q4_0", moe_down_q4_0, 4, 36, 256, rng);
    down_case("q4_K", moe_down_q4_K, 5, 100, 768, rng);
    down_case("q6_K", moe_down_q6_K, 6, 44, 768, rng);
    down_case("iq4_nl", moe_down_iq4_nl, 7, 100, 512, rng);
    for (int dtype : {3, 4, 5, 6}) dequantize_experts_case(dtype, rng);
    sigmoid_gated_case(3, 333, rng);
    printf(allOk ? "moe: all passed\n" : "moe: FAILED\n");
    return allOk ? 0 : 1;
}
