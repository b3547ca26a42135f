// Helpers of the emulator's tests: random data, host-side 16-bit rounding written independently
// of the emulator's, ggml's block formats and their host dequantization, error bookkeeping.
#pragma once
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <vector>

namespace test {

struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {  // splitmix64
        uint64_t z = (s += 0x9e3779b97f4a7c15ull);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        return z ^ (z >> 31);
    }
    float uniform(float lo, float hi) { return lo + (hi - lo) * (float)((next() >> 40) * 0x1p-24); }
    int below(int n) { return (int)(next() % (uint64_t)n); }
    unsigned char byte() { return (unsigned char)next(); }
};

inline uint32_t fbits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float ffrom(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

// The host compiler's _Float16 rounds to nearest even; the reference for f16.
inline unsigned short to_f16(float f) {
    _Float16 h = (_Float16)f;
    unsigned short b;
    memcpy(&b, &h, 2);
    return b;
}
inline float from_f16(unsigned short b) {
    _Float16 h;
    memcpy(&h, &b, 2);
    return (float)h;
}

// BF16 by comparing the two neighbours (not the emulator's carry trick).
inline unsigned short to_bf16(float f) {
    if (isnan(f)) return 0x7fff;
    uint32_t u = fbits(f);
    uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
    double dlo = fabs((double)ffrom(lo) - f), dhi = isinf(ffrom(hi)) && !isinf(f) ? fabs(ldexp(1.0, 128) * (f < 0 ? -1 : 1) - f)
                                                                                  : fabs((double)ffrom(hi) - f);
    if (dlo < dhi) return (unsigned short)(lo >> 16);
    if (dhi < dlo) return (unsigned short)(hi >> 16);
    return (unsigned short)(((lo >> 16) & 1) ? hi >> 16 : lo >> 16);
}
inline float from_bf16(unsigned short b) { return ffrom((uint32_t)b << 16); }

// ggml's block formats (raw, before repack_quantized): Q8_0, Q4_0, Q4_K, Q6_K, Q5_K (11), Q5_0 (12).
inline int block_bytes(int dtype) {
    return dtype == 3 ? 34 : dtype == 4 ? 18 : dtype == 5 ? 144 : dtype == 11 ? 176 : dtype == 12 ? 22 : 210;
}
inline int block_values(int dtype) { return dtype == 3 || dtype == 4 || dtype == 12 ? 32 : 256; }

inline void put_f16(unsigned char* p, float v) { unsigned short b = to_f16(v); memcpy(p, &b, 2); }
inline float get_f16(const unsigned char* p) { unsigned short b; memcpy(&b, p, 2); return from_f16(b); }

// Random blocks with moderate scales: values of order 1.
inline std::vector<unsigned char> random_blocks(int dtype, long blocks, Rng& rng) {
    int bytes = block_bytes(dtype);
    std::vector<unsigned char> raw(blocks * bytes);
    for (auto& b : raw) b = rng.byte();
    for (long i = 0; i < blocks; i++) {
        unsigned char* p = raw.data() + i * bytes;
        if (dtype == 3) put_f16(p, rng.uniform(-0.02f, 0.02f));
        else if (dtype == 4) put_f16(p, rng.uniform(-0.2f, 0.2f));
        else if (dtype == 12) put_f16(p, rng.uniform(-0.1f, 0.1f));
        else if (dtype == 5) { put_f16(p, rng.uniform(0.0f, 0.004f)); put_f16(p + 2, rng.uniform(0.0f, 0.004f)); }
        else if (dtype == 11) { put_f16(p, rng.uniform(0.0f, 0.002f)); put_f16(p + 2, rng.uniform(0.0f, 0.004f)); }
        else put_f16(p + 208, rng.uniform(-0.002f, 0.002f));
    }
    return raw;
}

// Block i's values as f32, in ggml's order and arithmetic.
inline void dequantize_block(int dtype, const unsigned char* p, float* y) {
    if (dtype == 3) {
        float d = get_f16(p);
        for (int j = 0; j < 32; j++) y[j] = d * (float)(signed char)p[2 + j];
    } else if (dtype == 4) {
        float d = get_f16(p);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((p[2 + j] & 15) - 8);
            y[j + 16] = d * (float)((p[2 + j] >> 4) - 8);
        }
    } else if (dtype == 12) {  // Q5_0: f16 d, qh[4] (bit j: value j's fifth bit), qs[16]
        float d = get_f16(p);
        uint32_t qh;
        memcpy(&qh, p + 2, 4);
        for (int j = 0; j < 16; j++) {
            y[j] = d * (float)((int)((p[6 + j] & 15) | (((qh >> j) & 1) << 4)) - 16);
            y[j + 16] = d * (float)((int)((p[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
    } else if (dtype == 5 || dtype == 11) {
        // Q5_K: Q4_K's header, then qh[32] (bit 2j of byte l: value 64j + l's fifth bit, bit
        // 2j + 1: value 64j + 32 + l's), then the nibbles.
        float d = get_f16(p), dmin = get_f16(p + 2);
        const unsigned char* sc = p + 4;
        const unsigned char* qh = p + 16;
        const unsigned char* q = p + (dtype == 11 ? 48 : 16);
        auto fifth = [&](int l, int bit) { return dtype == 11 && (qh[l] >> bit) & 1 ? 16 : 0; };
        auto scale_min = [&](int j, int& s, int& m) {
            if (j < 4) { s = sc[j] & 63; m = sc[j + 4] & 63; }
            else { s = (sc[j + 4] & 15) | ((sc[j - 4] >> 6) << 4); m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4); }
        };
        for (int j = 0; j < 4; j++) {
            int s1, m1, s2, m2;
            scale_min(2 * j, s1, m1);
            scale_min(2 * j + 1, s2, m2);
            float d1 = d * s1, o1 = dmin * m1, d2 = d * s2, o2 = dmin * m2;
            for (int l = 0; l < 32; l++) {
                y[64 * j + l] = d1 * ((q[32 * j + l] & 15) + fifth(l, 2 * j)) - o1;
                y[64 * j + 32 + l] = d2 * ((q[32 * j + l] >> 4) + fifth(l, 2 * j + 1)) - o2;
            }
        }
    } else {
        const unsigned char* ql = p;
        const unsigned char* qh = p + 128;
        const signed char* sc = (const signed char*)p + 192;
        float d = get_f16(p + 208);
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8, y += 128)
            for (int l = 0; l < 32; l++) {
                int is = l / 16;
                int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * sc[is] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
    }
}

// The largest error of a comparison, against a tolerance that scales with each value's size.
struct Errors {
    const char* name;
    double maxAbs = 0, maxRel = 0, tol;
    long bad = 0, count = 0;
    Errors(const char* n, double t) : name(n), tol(t) {}
    // got vs want, where `scale` is the size the error is relative to (e.g. a sum of |terms|).
    void add(double got, double want, double scale) {
        double e = fabs(got - want);
        if (!(e == e) || isinf(got) != isinf(want)) e = INFINITY;
        maxAbs = e > maxAbs ? e : maxAbs;
        double rel = e / (scale > 1e-30 ? scale : 1e-30);
        maxRel = rel > maxRel ? rel : maxRel;
        if (!(rel <= tol)) {
            if (bad < 5) fprintf(stderr, "  %s [%ld]: got %.9g, want %.9g\n", name, count, got, want);
            bad++;
        }
        count++;
    }
    bool report() const {
        printf("%-48s %8ld values  max abs error %.3g  max rel error %.3g  %s\n", name, count, maxAbs, maxRel, bad ? "FAIL" : "ok");
        return bad == 0;
    }
};

// The reference attention of one query, in doubles: a softmax over positions lo ..< pos + 1 of
// the scores q . key(j) (D floats each), scaled, then soft-capped when cap > 0, weighting
// value(j) into out (D values).
template <class Key, class Value>
inline void attend_reference(const float* q, int D, int lo, int pos, float scale, float cap, Key key, Value value, double* out) {
    std::vector<double> s(pos + 1 - lo);
    double mx = -INFINITY, sum = 0;
    for (int j = lo; j <= pos; j++) {
        const float* k = key(j);
        double dot = 0;
        for (int d = 0; d < D; d++) dot += (double)q[d] * k[d];
        dot *= scale;
        if (cap > 0) dot = cap * tanh(dot / cap);
        s[j - lo] = dot;
        mx = std::max(mx, dot);
    }
    for (int d = 0; d < D; d++) out[d] = 0;
    for (int j = lo; j <= pos; j++) {
        double w = exp(s[j - lo] - mx);
        sum += w;
        const float* v = value(j);
        for (int d = 0; d < D; d++) out[d] += w * v[d];
    }
    for (int d = 0; d < D; d++) out[d] /= sum;
}

// The split kernels' merge counters after a launch: every one back at zero, ready for the next
// launch (the merging block resets its own); prints why not.
inline bool counters_reset(const std::vector<unsigned>& counters) {
    for (unsigned u : counters)
        if (u) {
            printf("  the counters were not all reset for the next launch\n");
            return false;
        }
    return true;
}

}  // namespace test
