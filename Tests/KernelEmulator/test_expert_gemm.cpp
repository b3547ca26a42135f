// The emulator's 16-bit conversions, the quantized weights' repacking and dequantization, and
// expert_gemm (ldmatrix and mma.sync m16n8k16, F16 and BF16) against host references.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

using namespace test;

// Float to f16 and bf16 over a sweep of bit patterns (every exponent, dense near the subnormal,
// overflow and tie cases), exact.
static bool test_conversions() {
    Errors h("float -> f16 -> float (bits)", 0), b("float -> bf16 -> float (bits)", 0);
    auto check = [&](uint32_t u) {
        float f = ffrom(u);
        unsigned short want = to_f16(f), got = __half_as_ushort(__float2half_rn(f));
        if (isnan(f)) want = 0x7fff;
        h.add(got, want, 1);
        h.add(fbits(__half2float(emu_half(want))), fbits(from_f16(want)), 1);
        unsigned short wb = to_bf16(f), gb = __bfloat16_as_ushort(__float2bfloat16_rn(f));
        b.add(gb, wb, 1);
        b.add(fbits(__bfloat162float(emu_bf16(wb))), fbits(from_bf16(wb)), 1);
    };
    for (uint64_t u = 0; u < (1ull << 32); u += 4093) check((uint32_t)u);
    for (uint32_t e = 0; e < 256; e++)
        for (uint32_t m : {0u, 1u, 0xfffu, 0x1000u, 0x1001u, 0x2fffu, 0x3000u, 0x7fffu, 0x8000u, 0x8001u, 0x18000u, 0x7fffffu})
            for (uint32_t s : {0u, 0x80000000u}) check(s | (e << 23) | m);
    for (uint32_t u = 0x33000000u - 4096; u < 0x39000000u; u += 7) check(u);  // f16 subnormals
    for (uint32_t u = 0x477fe000u; u < 0x47801000u; u++) check(u);           // f16 overflow
    bool ok = h.report();
    return b.report() && ok;
}

// repack_quantized then dequantize_bf16 against ggml's dequantization rounded to BF16.
static std::vector<unsigned char> repacked(int dtype, const std::vector<unsigned char>& raw) {
    long blocks = (long)raw.size() / block_bytes(dtype);
    std::vector<unsigned char> out(raw.size() + 64);
    emu::launch(repack_quantized, dim3((blocks + 127) / 128), dim3(128), 0, raw.data(), dtype, out.data(), blocks);
    return out;
}

static std::vector<float> host_values(int dtype, const std::vector<unsigned char>& raw) {
    long blocks = (long)raw.size() / block_bytes(dtype);
    std::vector<float> v(blocks * block_values(dtype));
    for (long i = 0; i < blocks; i++) dequantize_block(dtype, raw.data() + i * block_bytes(dtype), v.data() + i * block_values(dtype));
    return v;
}

static bool test_dequantize(int dtype, const char* name, Rng& rng) {
    long n = 4 * 256 * 3;
    auto raw = random_blocks(dtype, n / block_values(dtype), rng);
    auto w = repacked(dtype, raw);
    auto want = host_values(dtype, raw);
    std::vector<unsigned short> out(n);
    emu::launch(dequantize_bf16, dim3((unsigned)((n / 8 + 255) / 256)), dim3(256), 0, (const void*)w.data(), dtype,
                (__nv_bfloat16*)out.data(), n);
    char label[64];
    snprintf(label, sizeof label, "dequantize_bf16 %s (bf16 ulps)", name);
    Errors e(label, 1);
    for (long i = 0; i < n; i++) e.add(from_bf16(out[i]), from_bf16(to_bf16(want[i])), fabs(from_bf16(to_bf16(want[i]))) * 0x1p-8 + 1e-30);
    return e.report();
}

// expert_gemm over three experts (one with no rows, one taking two tiles), n not a multiple of
// EG_OUTS, rows gathered through rowOf, gated or not.
static bool test_expert_gemm(bool half, int dtype, bool gated, const char* name, Rng& rng) {
    const int E = 3, n = 96, k = 192, R = 110;
    const int counts[E] = {80, 0, 30};
    std::vector<int> tiles = {0}, rowOf(R);
    for (int e = 0, r0 = 0; e < E; r0 += counts[e], e++)
        for (int r = 0; r < counts[e]; r += 64) {
            tiles.insert(tiles.end(), {e, r0 + r, std::min(64, counts[e] - r)});
            tiles[0]++;
        }
    for (int r = 0; r < R; r++) rowOf[r] = r;
    for (int r = R - 1; r > 0; r--) std::swap(rowOf[r], rowOf[rng.below(r + 1)]);
    std::vector<float> x((size_t)R * k);
    for (auto& v : x) v = rng.uniform(-1, 1);
    // Each expert's gate (and up) weights: stored bytes for the kernel, values as the kernel's 16 bits.
    std::vector<std::vector<unsigned char>> stored[2];
    std::vector<std::vector<float>> w16[2];
    std::vector<unsigned long long> table[2];
    for (int m = 0; m < (gated ? 2 : 1); m++)
        for (int e = 0; e < E; e++) {
            long total = (long)n * k;
            std::vector<float> v(total);
            std::vector<unsigned char> bytes;
            if (dtype == 1 || dtype == 2) {
                bytes.resize(total * 2);
                for (long i = 0; i < total; i++) {
                    unsigned short b = dtype == 1 ? to_f16(rng.uniform(-0.5f, 0.5f)) : to_bf16(rng.uniform(-0.5f, 0.5f));
                    memcpy(&bytes[2 * i], &b, 2);
                    v[i] = dtype == 1 ? from_f16(b) : from_bf16(b);
                }
            } else {
                auto raw = random_blocks(dtype, total / block_values(dtype), rng);
                bytes = repacked(dtype, raw);
                v = host_values(dtype, raw);
                for (auto& f : v) f = from_bf16(to_bf16(f));
            }
            stored[m].push_back(std::move(bytes));
            w16[m].push_back(std::move(v));
        }
    for (int m = 0; m < 2; m++)
        for (auto& b : stored[m]) table[m].push_back((unsigned long long)b.data());
    std::vector<float> y((size_t)R * n, -12345.f);
    std::vector<unsigned short> yh((size_t)R * n, 0xdead);
    int maxTiles = tiles[0] + 1;  // one block row past the tiles: it returns at once
    emu::launch(half ? expert_gemm_f16 : expert_gemm_bf16, dim3((n + 63) / 64, maxTiles), dim3(128), 0, table[0].data(),
                gated ? table[1].data() : nullptr, dtype, n, k, (const void*)x.data(), 0, rowOf.data(), tiles.data(), y.data(),
                yh.data());
    char label[96];
    snprintf(label, sizeof label, "expert_gemm_%s %s%s", half ? "f16" : "bf16", name, gated ? " gated" : "");
    Errors err(label, 2e-6), errh("  its 16-bit copy (ulps)", 1);
    auto round16 = [&](float f) { return half ? from_f16(to_f16(f)) : from_bf16(to_bf16(f)); };
    for (int e = 0, r0 = 0; e < E; r0 += counts[e], e++)
        for (int r = r0; r < r0 + counts[e]; r++)
            for (int o = 0; o < n; o++) {
                double s[2] = {0, 0}, mag[2] = {0, 0};
                for (int m = 0; m < (gated ? 2 : 1); m++)
                    for (int i = 0; i < k; i++) {
                        double p = (double)round16(x[(size_t)rowOf[r] * k + i]) * w16[m][e][(size_t)o * k + i];
                        s[m] += p;
                        mag[m] += fabs(p);
                    }
                double want = gated ? s[0] / (1 + exp(-s[0])) * s[1] : s[0];
                double scale = gated ? mag[0] * fabs(s[1]) + fabs(s[0]) * mag[1] + 1e-3 : mag[0];
                float got = y[(size_t)r * n + o];
                err.add(got, want, scale);
                float g16 = half ? from_f16(yh[(size_t)r * n + o]) : from_bf16(yh[(size_t)r * n + o]);
                errh.add(g16, round16(got), fabs(round16(got)) * (half ? 0x1p-11 : 0x1p-8) + 1e-30);
            }
    bool ok = err.report();
    return errh.report() && ok;
}

int main() {
    Rng rng(42);
    bool ok = test_conversions();
    ok &= test_dequantize(3, "Q8_0", rng);
    ok &= test_dequantize(4, "Q4_0", rng);
    ok &= test_dequantize(5, "Q4_K", rng);
    ok &= test_dequantize(6, "Q6_K", rng);
    ok &= test_dequantize(11, "Q5_K", rng);
    ok &= test_dequantize(12, "Q5_0", rng);
    ok &= test_expert_gemm(false, 2, false, "BF16", rng);
    ok &= test_expert_gemm(false, 2, true, "BF16", rng);
    ok &= test_expert_gemm(false, 3, false, "Q8_0", rng);
    ok &= test_expert_gemm(false, 5, true, "Q4_K", rng);
    ok &= test_expert_gemm(false, 6, false, "Q6_K", rng);
    ok &= test_expert_gemm(false, 4, false, "Q4_0", rng);
    ok &= test_expert_gemm(true, 1, false, "F16", rng);
    ok &= test_expert_gemm(true, 1, true, "F16", rng);
    printf(ok ? "expert_gemm: all passed\n" : "expert_gemm: FAILED\n");
    return ok ? 0 : 1;
}
