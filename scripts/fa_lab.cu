// Prompt attention on tensor cores (Kernels.cu's attention_prefill_mma) alone, on the 8B shape's
// layer (32 query heads over 8 KV heads of 128, an F16 paged cache of 16-position blocks in
// shuffled order): the 16 chunks of 512 tokens that an 8,192-token prompt read 512 tokens a pass
// (llama-bench's pp8192) attends with, each variant timed on every chunk (median of 10 launches),
// summed: one layer's prompt attention of pp8192. Variants: m16 tiles a warp (MT: 1, 64 rows a
// block; 2, 128 rows), key tile size (KT), query heads a block (gq), and Hopper's warpgroup MMA
// (attention_prefill_wgmma; sm_90a). TFLOP/s counts the causal
// half of the scores. Each variant's output is checked against the first one's.
// Run on the GPU machine, from the checkout:
//   nvcc -O3 -gencode arch=compute_90a,code=sm_90a -std=c++17 --use_fast_math -o fa_lab scripts/fa_lab.cu && ./fa_lab
// (the -gencode form: with nvcc 13.0, -arch=sm_90a also ran a plain sm_90 pass, where the wgmma
// kernels compile empty)
// (-DFA_OLD='"file"' adds a kernel `fa_old` from that file, with the same parameters, first.)
// (`./fa_lab 15` runs each variant once on the last chunk only, for ncu; FA_VARIANT=i runs the
// first and the i-th only.)
#include "../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)

#define LAB_KERNEL(name, D, KT, MT)                                                                                           \
    extern "C" __global__ void __launch_bounds__(128) name(                                                                  \
        const float* q, const __half* kc, const __half* vc, float* out, const int* slots, const int* positions,              \
        const int* tiles, int heads, int kvHeads, const int* tables, int width, int bs, float scale, float softcap,          \
        int window, int gq) {                                                                                                \
        attention_prefill_mma<D, KT, MT>(q, kc, vc, out, slots, positions, tiles, heads, kvHeads, tables, width, bs, scale,  \
                                         softcap, window, gq);                                                               \
    }
LAB_KERNEL(fa_mt1_kt64, 128, 64, 1)
LAB_KERNEL(fa_mt1_kt32, 128, 32, 1)
LAB_KERNEL(fa_mt2_kt64, 128, 64, 2)
// Hopper's warpgroup MMA (attention_prefill_wgmma): Kernels.cu's attention_prefill_wgmma_128*
// are the backend's choices (kt128_wg2 its default); this one, 64 rows over 128-key tiles, only
// the lab's, made by Kernels.cu's own macro.
ATTENTION_PREFILL_WGMMA(fa_wgmma_kt128, 128, 1, false)

typedef void (*Kernel)(const float*, const __half*, const __half*, float*, const int*, const int*, const int*, int, int,
                       const int*, int, int, float, float, int, int);
#ifdef FA_OLD
#include FA_OLD  // a kernel to compare with, as fa_old (same parameters)
#endif


__global__ void fill_half(__half* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        p[i] = __float2half(((h >> 8) & 0xffff) / 32768.f - 1.f);
    }
}

__global__ void fill_float(float* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        p[i] = ((h >> 8) & 0xffff) / 16384.f - 2.f;
    }
}

int main(int argc, char** argv) {
    const int heads = 32, kvHeads = 8, D = 128, bs = 16, chunk = 512, chunks = 16, positions = chunk * chunks;
    const int blocks = positions / bs, width = blocks;
    int onlyChunk = argc > 1 ? atoi(argv[1]) : -1;
    size_t cacheElems = (size_t)blocks * bs * kvHeads * D;
    __half *kc, *vc; float *q, *out, *ref;
    CK(cudaMalloc(&kc, cacheElems * 2)); CK(cudaMalloc(&vc, cacheElems * 2));
    size_t qElems = (size_t)chunk * heads * D;
    CK(cudaMalloc(&q, qElems * 4)); CK(cudaMalloc(&out, qElems * 4)); CK(cudaMalloc(&ref, qElems * 4));
    fill_half<<<1024, 256>>>(kc, cacheElems, 1); fill_half<<<1024, 256>>>(vc, cacheElems, 2); fill_float<<<1024, 256>>>(q, qElems, 3);
    // The sequence's blocks in shuffled order, as a block manager hands them out.
    std::vector<int> table(blocks);
    for (int i = 0; i < blocks; i++) table[i] = i;
    srand(7);
    for (int i = blocks - 1; i > 0; i--) std::swap(table[i], table[rand() % (i + 1)]);
    int *dTable, *dSlots, *dPos, *dTiles;
    CK(cudaMalloc(&dTable, blocks * 4)); CK(cudaMalloc(&dSlots, chunk * 4)); CK(cudaMalloc(&dPos, chunk * 4)); CK(cudaMalloc(&dTiles, chunk * 8));
    CK(cudaMemcpy(dTable, table.data(), blocks * 4, cudaMemcpyHostToDevice));
    std::vector<int> zeros(chunk, 0);
    CK(cudaMemcpy(dSlots, zeros.data(), chunk * 4, cudaMemcpyHostToDevice));
    // shared: 0 for the mma kernel's; rows: a block's (64 MT for the mma kernel)
    struct Variant { const char* name; Kernel k; int kt, mt, gq; size_t shared = 0; int rows = 0; };
    // The wgmma kernel's shared memory: the queries and two buffers of keys and values unpadded, 1 KB of alignment, the
    // row offsets of three tiles.
    auto wgShared = [](int rows, int kt) { return (size_t)(rows + 4 * kt) * 256 + 1024 + 3 * kt * 8; };
    std::vector<Variant> variants = {
#ifdef FA_OLD
        {"fa_old, a head a block", fa_old, 64, 1, 1},
#endif
        {"MT 1, KT 64, a head a block", fa_mt1_kt64, 64, 1, 1},
        {"MT 1, KT 64, 4 heads a block (mma.sync's)", fa_mt1_kt64, 64, 1, 4},
        {"MT 1, KT 32, 4 heads a block", fa_mt1_kt32, 32, 1, 4},
        {"MT 2, KT 64, 4 heads a block", fa_mt2_kt64, 64, 2, 4},
        {"wgmma, KT 64, 4 heads a block (attention_prefill_wgmma_128)", attention_prefill_wgmma_128, 64, 1, 4, wgShared(64, 64), 64},
        {"wgmma, KT 64, a head a block", attention_prefill_wgmma_128, 64, 1, 1, wgShared(64, 64), 64},
        {"wgmma, KT 128, 4 heads a block", fa_wgmma_kt128, 128, 1, 4, wgShared(64, 128), 64},
        {"wgmma, 2 warpgroups, KT 64, 4 heads a block (_wg2)", attention_prefill_wgmma_128_wg2, 64, 1, 4, wgShared(128, 64), 128},
        {"wgmma, 2 warpgroups, KT 128, 4 heads a block (_kt128_wg2, the backend's)", attention_prefill_wgmma_128_kt128_wg2, 128, 1, 4,
         wgShared(128, 128), 128},
        {"wgmma, overlapped, KT 64, 4 heads a block (_overlap)", attention_prefill_wgmma_128_overlap, 64, 1, 4, wgShared(64, 64), 64},
        {"wgmma, overlapped, 2 warpgroups, KT 64, 4 heads a block (_wg2_overlap)", attention_prefill_wgmma_128_wg2_overlap, 64, 1, 4,
         wgShared(128, 64), 128},
        {"wgmma, overlapped, 2 warpgroups, KT 128, 4 heads a block (_kt128_wg2_overlap)", attention_prefill_wgmma_128_kt128_wg2_overlap,
         128, 1, 4, wgShared(128, 128), 128},
    };
    float scale = 1.f / sqrtf((float)D);
    cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    printf("| variant | chunk 4 (keys to 2,048) us | chunk 8 (4,096) us | chunk 16 (8,192) us | pp8192's 16 chunks ms | TFLOP/s | max diff |\n");
    printf("|---|---|---|---|---|---|---|\n");
    // FA_VARIANT=i runs the first variant (the reference of max diff) and the i-th only, so a
    // kernel that faults takes no other's result with it: `for i in 1 2 ...; do FA_VARIANT=$i ./fa_lab; done`.
    const char* only = getenv("FA_VARIANT");
    if (only && (atoi(only) < 1 || atoi(only) >= (int)variants.size())) { printf("FA_VARIANT: 1 to %zu\n", variants.size() - 1); return 2; }
    for (size_t vi = 0; vi < variants.size(); vi++) {
        if (only && vi != 0 && (int)vi != atoi(only)) continue;
        auto& v = variants[vi];
        int rowsPerBlock = v.rows ? v.rows : 64 * v.mt, P = rowsPerBlock / v.gq;
        size_t shared = v.shared ? v.shared : (size_t)(rowsPerBlock + 4 * v.kt) * (D + 8) * 2 + 2 * v.kt * 8;
        CK(cudaFuncSetAttribute(v.k, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shared));
        std::vector<int> tiles;
        for (int t = 0; t < chunk; t += P) { tiles.push_back(t); tiles.push_back(std::min(P, chunk - t)); }
        int nTiles = (int)tiles.size() / 2;
        CK(cudaMemcpy(dTiles, tiles.data(), tiles.size() * 4, cudaMemcpyHostToDevice));
        double total = 0, flop = 0, maxDiff = 0;
        float at[3] = {0, 0, 0};
        for (int c = 0; c < chunks; c++) {
            if (onlyChunk >= 0 && c != onlyChunk) continue;
            std::vector<int> pos(chunk);
            for (int i = 0; i < chunk; i++) pos[i] = c * chunk + i;
            CK(cudaMemcpy(dPos, pos.data(), chunk * 4, cudaMemcpyHostToDevice));
            auto run = [&] {
                v.k<<<dim3(nTiles, heads / v.gq), v.rows ? 2 * v.rows : 128, shared>>>(q, kc, vc, out, dSlots, dPos, dTiles, heads, kvHeads, dTable, width, bs,
                                                                 scale, 0.f, 0, v.gq);
            };
            if (onlyChunk >= 0) { run(); CK(cudaDeviceSynchronize()); continue; }
            CK(cudaMemset(out, 0xff, qElems * 4));  // NaNs: rows a kernel does not write show in max diff
            run(); CK(cudaGetLastError());
            std::vector<float> t;
            for (int i = 0; i < 10; i++) {
                CK(cudaEventRecord(a)); run(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
                float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms);
            }
            std::sort(t.begin(), t.end());
            total += t[5];
            if (c == 3) at[0] = t[5] * 1000; if (c == 7) at[1] = t[5] * 1000; if (c == 15) at[2] = t[5] * 1000;
            // Causal scores: query i of the chunk sees c * chunk + i + 1 keys; QK^T and PV, 2 flops a product.
            for (int i = 0; i < chunk; i++) flop += 4.0 * (c * chunk + i + 1) * D * heads;
            if (c == 15) {
                std::vector<float> h(qElems), r(qElems);
                CK(cudaMemcpy(h.data(), out, qElems * 4, cudaMemcpyDeviceToHost));
                if (vi == 0) CK(cudaMemcpy(ref, out, qElems * 4, cudaMemcpyDeviceToDevice));
                CK(cudaMemcpy(r.data(), ref, qElems * 4, cudaMemcpyDeviceToHost));
                for (size_t i = 0; i < qElems; i++) {
                    double d = fabsf(h[i] - r[i]);
                    if (!(d <= maxDiff)) maxDiff = d;  // a NaN stays
                }
            }
        }
        if (onlyChunk < 0)
            printf("| %s | %.1f | %.1f | %.1f | %.2f | %.0f | %.2g |\n", v.name, at[0], at[1], at[2], total, flop / (total * 1e-3) / 1e12, maxDiff);
    }
    return 0;
}
