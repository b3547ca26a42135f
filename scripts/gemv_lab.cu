// One token's BF16 products (GEMV) of the Llama-3-8B shape, each kernel alone: Kernels.cu's
// matvec_bf16 / matvec_bf16_gated against lab variants, 100 launches one after another with the
// weights rotated through 3 GB so L2 holds none, in us a launch and TB/s; and a device-to-device
// copy for the rate to compare with. The lab kernels fix the row length at compile time:
//   gemv_oneset: a lane's row in chunks of U loads, each chunk loaded then used (the structure of
//                the 16-bit matvec kernels before matvec_half_body);
//   gemv_pipe:   two sets of U loads, the next chunk issued before the current one is used;
//   gemv_splitk: each row over S warps, their sums added atomically.
// Kernels.cu's own fixed-length kernels (matvec_bf16[_gated]_kK) are timed beside them. Last,
// an L2 prefetch test: an 8 us kernel that leaves the memory idle (as one token's attention
// does) before the output projection, with and without asking L2 for the projection's weights
// by Hopper's bulk prefetch.
// Run on the GPU machine, from the checkout:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o gemv_lab scripts/gemv_lab.cu && ./gemv_lab
// BENCHMARKS.md ("One token's 16-bit products: two sets of loads") has its figures; in a decode
// step the kernels overlap, which a lab of one kernel at a time does not show.
#include "../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include <cstdio>
#include <vector>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

__device__ __forceinline__ uint4 ld_hint(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

__device__ __forceinline__ float dot8(uint4 q, const float* xv, int i) {
    float4 a = *(const float4*)(xv + i * 8), c = *(const float4*)(xv + i * 8 + 4);
    const __nv_bfloat162* p = (const __nv_bfloat162*)&q;
    float2 t0 = __bfloat1622float2(p[0]), t1 = __bfloat1622float2(p[1]), t2 = __bfloat1622float2(p[2]), t3 = __bfloat1622float2(p[3]);
    return t0.x * a.x + t0.y * a.y + t1.x * a.z + t1.y * a.w + t2.x * c.x + t2.y * c.y + t3.x * c.z + t3.y * c.w;
}

// A lane's row in chunks of U loads, each chunk loaded, then used.
template <int K, int U, int MINB>
__global__ void __launch_bounds__(256, MINB) gemv_oneset(const uint4* W, const float* x, float* y, int n) {
    constexpr int units = K / 8;
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    if (warp >= n) return;
    const uint4* base = W + (long)warp * units;
    float acc = 0;
    for (int u0 = lane; u0 < units; u0 += 32 * U) {
        uint4 q[U];
#pragma unroll
        for (int u = 0; u < U; u++) if (u0 + u * 32 < units) q[u] = __ldcs(base + u0 + u * 32);
#pragma unroll
        for (int u = 0; u < U; u++) if (u0 + u * 32 < units) acc += dot8(q[u], x, u0 + u * 32);
    }
    acc = warp_sum(acc);
    if (lane == 0) y[warp] = acc;
}

// All of a lane's loads for a row in chunks of U, the next chunk issued before the current is used.
// HINT: 0 __ldcs, 1 L2::256B, 2 __ldg. RPW rows per warp (interleaved).
template <int K, int U, int HINT, int RPW, int MINB>
__global__ void __launch_bounds__(256, MINB) gemv_pipe(const uint4* W, const float* x, float* y, int n) {
    constexpr int units = K / 8, per = units / 32, chunks = per / U;
    static_assert(per % U == 0, "chunks");
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    int row0 = warp * RPW;
    if (row0 >= n) return;
    const uint4* base[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) base[r] = W + (long)min(row0 + r, n - 1) * units + lane;
    auto ld = [&](const uint4* p) { return HINT == 0 ? __ldcs(p) : HINT == 1 ? ld_hint(p) : __ldg(p); };
    uint4 qa[RPW][U], qb[RPW][U];
    float acc[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        acc[r] = 0;
#pragma unroll
        for (int u = 0; u < U; u++) qa[r][u] = ld(base[r] + u * 32);
    }
#pragma unroll
    for (int c = 0; c < chunks; c++) {
        if (c + 1 < chunks) {
#pragma unroll
            for (int r = 0; r < RPW; r++)
#pragma unroll
                for (int u = 0; u < U; u++) {
                    if (c % 2 == 0) qb[r][u] = ld(base[r] + ((c + 1) * U + u) * 32);
                    else qa[r][u] = ld(base[r] + ((c + 1) * U + u) * 32);
                }
        }
#pragma unroll
        for (int r = 0; r < RPW; r++)
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = lane + (c * U + u) * 32;
                acc[r] += dot8(c % 2 == 0 ? qa[r][u] : qb[r][u], x, i);
            }
    }
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        float s = warp_sum(acc[r]);
        if (lane == 0 && row0 + r < n) y[row0 + r] = s;
    }
}

// Each row over S warps, each taking a K / S slice, the sums added atomically (the lab times
// the loads; y is not zeroed first).
template <int K, int S, int U, int MINB>
__global__ void __launch_bounds__(256, MINB) gemv_splitk(const uint4* W, const float* x, float* y, int n) {
    constexpr int units = K / 8, slice = units / S, per = slice / 32;
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    int row = warp / S, s = warp % S;
    if (row >= n) return;
    const uint4* base = W + (long)row * units + s * slice + lane;
    float acc = 0;
#pragma unroll
    for (int c = 0; c < per; c += U) {
        uint4 q[U];
#pragma unroll
        for (int u = 0; u < U; u++) if (c + u < per) q[u] = __ldcs(base + (c + u) * 32);
#pragma unroll
        for (int u = 0; u < U; u++) if (c + u < per) acc += dot8(q[u], x, s * slice + lane + (c + u) * 32);
    }
    acc = warp_sum(acc);
    if (lane == 0) atomicAdd(y + row, acc);
}

// A kernel that waits `cycles` (about 8 us at 1,980 MHz), first asking L2 for [p, p + n), lane i
// of each block's first warp taking 64 KB pieces i, i + 32 x blocks, ...
__global__ void idle_then(long cycles, const char* p, long n) {
    if (p && threadIdx.x < 32) {
        const long piece = 64 << 10;
        for (long at = ((long)blockIdx.x * 32 + threadIdx.x) * piece; at < n; at += (long)gridDim.x * 32 * piece) {
            unsigned size = (unsigned)(min(piece, n - at) & ~15L);
            asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p + at), "r"(size) : "memory");
        }
    }
    long t0 = clock64();
    while (clock64() - t0 < cycles) {}
}

struct Shape { const char* name; int n, k; bool gated; };

int main() {
    cudaDeviceProp prop; CK(cudaGetDeviceProperties(&prop, 0));
    printf("%s SMs %d L2 %d MB\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize >> 20);
    const long pool = 3L << 30;
    void* big; CK(cudaMalloc(&big, pool));
    CK(cudaMemset(big, 0x3c, pool));
    float *x, *y, *y1; CK(cudaMalloc(&x, 64 << 10)); CK(cudaMalloc(&y, 4 << 20)); CK(cudaMalloc(&y1, 4 << 20));
    std::vector<float> hx(16384, 0.01f); CK(cudaMemcpy(x, hx.data(), hx.size() * 4, cudaMemcpyHostToDevice));
    cudaEvent_t e0, e1; cudaEventCreate(&e0); cudaEventCreate(&e1);
    // copy rate
    {
        long half = pool / 2;
        for (int i = 0; i < 2; i++) CK(cudaMemcpyAsync((char*)big + half, big, half, cudaMemcpyDeviceToDevice));
        cudaEventRecord(e0);
        for (int i = 0; i < 5; i++) CK(cudaMemcpyAsync((char*)big + half, big, half, cudaMemcpyDeviceToDevice));
        cudaEventRecord(e1); cudaEventSynchronize(e1);
        float ms; cudaEventElapsedTime(&ms, e0, e1);
        printf("copy: %.2f TB/s (read+written)\n", 2.0 * half * 5 / (ms * 1e-3) / 1e12);
    }
    Shape shapes[] = {{"qkv", 6144, 4096, false}, {"o", 4096, 4096, false}, {"gateup", 14336, 4096, true}, {"down", 4096, 14336, false},
                      {"head", 128256, 4096, false}};
    for (auto& s : shapes) {
        long bytes = (long)s.n * s.k * 2 * (s.gated ? 2 : 1);
        int copies = (int)(pool / bytes); if (copies > 64) copies = 64;
        auto W = [&](int i) { return (const uint4*)((char*)big + (long)(i % copies) * bytes); };
        const int reps = 100;
        auto time = [&](const char* label, auto launch) {
            for (int i = 0; i < 3; i++) launch(i);
            CK(cudaDeviceSynchronize());
            float best = 1e30f;
            for (int t = 0; t < 3; t++) {
                cudaEventRecord(e0);
                for (int i = 0; i < reps; i++) launch(i);
                cudaEventRecord(e1); cudaEventSynchronize(e1);
                float ms; cudaEventElapsedTime(&ms, e0, e1); if (ms < best) best = ms;
            }
            CK(cudaGetLastError());
            double us = best * 1e3 / reps;
            printf("%-7s %-34s %8.2f us %6.2f TB/s\n", s.name, label, us, bytes / (us * 1e-6) / 1e12);
        };
        int warps = s.n, blocks = (warps * 32 + 255) / 256;
        const float* nul = nullptr;
        if (s.gated) {
            long half = (long)s.n * s.k;
            time("matvec_bf16_gated (Kernels.cu)", [&](int i) {
                const __nv_bfloat16* w = (const __nv_bfloat16*)W(i);
                matvec_bf16_gated<<<blocks, 256>>>(w, nul, y, s.n, w + half, nul, y1, s.n, nullptr, nul, nullptr, 0, x, nul, 0.f,
                                                   nullptr, nul, s.k, 2, nul, 0);
            });
            time("matvec_bf16_gated_k4096", [&](int i) {
                const __nv_bfloat16* w = (const __nv_bfloat16*)W(i);
                matvec_bf16_gated_k4096<<<blocks, 256>>>(w, nul, y, s.n, w + half, nul, y1, s.n, nullptr, nul, nullptr, 0, x, nul, 0.f,
                                                            nullptr, nul, s.k, 2, nul, 0);
            });
            // gated as two plain rows-sets
            time("oneset U8 minb4 (2n rows)", [&](int i) { gemv_oneset<4096, 8, 4><<<(2 * s.n * 32 + 255) / 256, 256>>>(W(i), x, y, 2 * s.n); });  // 2n rows of one matrix
            time("pipe U4 ldcs RPW2 (2n rows)", [&](int i) { gemv_pipe<4096, 4, 0, 2, 2><<<(2 * s.n / 2 * 32 + 255) / 256, 256>>>(W(i), x, y, 2 * s.n); });
            time("pipe U8 ldcs RPW1 (2n rows)", [&](int i) { gemv_pipe<4096, 8, 0, 1, 2><<<(2 * s.n * 32 + 255) / 256, 256>>>(W(i), x, y, 2 * s.n); });
            time("pipe U4 ldcs RPW1 (2n rows)", [&](int i) { gemv_pipe<4096, 4, 0, 1, 3><<<(2 * s.n * 32 + 255) / 256, 256>>>(W(i), x, y, 2 * s.n); });
            time("pipe U8 hint RPW1 (2n rows)", [&](int i) { gemv_pipe<4096, 8, 1, 1, 2><<<(2 * s.n * 32 + 255) / 256, 256>>>(W(i), x, y, 2 * s.n); });
            time("pipe U16 ldcs RPW1 1chunk", [&](int i) { gemv_pipe<4096, 16, 0, 1, 2><<<(2 * s.n * 32 + 255) / 256, 256>>>(W(i), x, y, 2 * s.n); });
            continue;
        }
        time("matvec_bf16 (Kernels.cu)", [&](int i) {
            matvec_bf16<<<blocks, 256>>>(W(i), nul, y, s.n, nullptr, nul, nullptr, 0, nullptr, nul, nullptr, 0, x, nul, 0.f, nullptr, nul,
                                         s.k, 0, nul, 0);
        });
#define FIXED(KN)                                                                                                           \
        time(#KN, [&](int i) {                                                                                              \
            KN<<<blocks, 256>>>(W(i), nul, y, s.n, nullptr, nul, nullptr, 0, nullptr, nul, nullptr, 0, x, nul, 0.f, nullptr, nul, s.k, 0, nul, 0); \
        });
        if (s.k == 4096) { FIXED(matvec_bf16_k4096) } else { FIXED(matvec_bf16_k14336) }
        if (bytes <= prop.l2CacheSize && !s.gated && s.k == 4096 && s.n == 4096) {
            const int idle = 16000;
            auto product = [&](int i) { matvec_bf16_k4096<<<blocks, 256>>>(W(i), nul, y, s.n, nullptr, nul, nullptr, 0, nullptr, nul, nullptr, 0, x, nul, 0.f, nullptr, nul, s.k, 0, nul, 0); };
            time("idle 8 us alone", [&](int i) { idle_then<<<32, 128>>>(idle, nullptr, 0); });
            time("idle 8 us, then the product", [&](int i) { idle_then<<<32, 128>>>(idle, nullptr, 0); product(i); });
            time("idle 8 us prefetching, then the product", [&](int i) { idle_then<<<32, 128>>>(idle, (const char*)W(i), bytes); product(i); });
        }
        if (s.k == 4096) {
            time("oneset U8 minb4", [&](int i) { gemv_oneset<4096, 8, 4><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U8 ldcs RPW1", [&](int i) { gemv_pipe<4096, 8, 0, 1, 2><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U4 ldcs RPW1 minb3", [&](int i) { gemv_pipe<4096, 4, 0, 1, 3><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U8 hint RPW1", [&](int i) { gemv_pipe<4096, 8, 1, 1, 2><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U8 ldg RPW1", [&](int i) { gemv_pipe<4096, 8, 2, 1, 2><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U16 ldcs RPW1 1chunk", [&](int i) { gemv_pipe<4096, 16, 0, 1, 2><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U4 ldcs RPW2", [&](int i) { gemv_pipe<4096, 4, 0, 2, 2><<<(s.n / 2 * 32 + 255) / 256, 256>>>(W(i), x, y, s.n); });
            time("splitk S2 U8", [&](int i) { gemv_splitk<4096, 2, 8, 3><<<(s.n * 2 * 32 + 255) / 256, 256>>>(W(i), x, y, s.n); });
            time("splitk S4 U4", [&](int i) { gemv_splitk<4096, 4, 4, 4><<<(s.n * 4 * 32 + 255) / 256, 256>>>(W(i), x, y, s.n); });
        } else {
            time("oneset U8 minb4", [&](int i) { gemv_oneset<14336, 8, 4><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U8 ldcs RPW1", [&](int i) { gemv_pipe<14336, 8, 0, 1, 2><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U4 ldcs RPW1 minb3", [&](int i) { gemv_pipe<14336, 4, 0, 1, 3><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U8 hint RPW1", [&](int i) { gemv_pipe<14336, 8, 1, 1, 2><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("pipe U7 ldcs RPW1", [&](int i) { gemv_pipe<14336, 7, 0, 1, 2><<<blocks, 256>>>(W(i), x, y, s.n); });
            time("splitk S2 U7", [&](int i) { gemv_splitk<14336, 2, 7, 3><<<(s.n * 2 * 32 + 255) / 256, 256>>>(W(i), x, y, s.n); });
            time("splitk S4 U7", [&](int i) { gemv_splitk<14336, 4, 7, 4><<<(s.n * 4 * 32 + 255) / 256, 256>>>(W(i), x, y, s.n); });
            time("splitk S7 U8", [&](int i) { gemv_splitk<14336, 7, 8, 4><<<(s.n * 7 * 32 + 255) / 256, 256>>>(W(i), x, y, s.n); });
        }
    }
    return 0;
}
