// A prompt's BF16 products (GEMM) of the Llama-3-8B shape through cuBLAS, against the dense
// BF16 rate cuBLAS reaches on an 8192-cubed product in the same run (#14's yardstick: prompt
// products at 70% or more of it). Each product as the CUDA backend calls it (cublasGemmEx,
// BF16 in, f32 accumulation, f32 out, the default algorithm), then every algorithm cuBLASLt's
// heuristic offers for the same product (up to 16), each timed, to see whether a search over
// them would pay. Times are medians of 20 launches after 5 warm-ups, in us; TFLOP/s.
// Run on the GPU machine, from the checkout:
//   nvcc -O3 -arch=sm_90a -std=c++17 -o gemm_lab scripts/gemm_lab.cu -lcublas -lcublasLt && ./gemm_lab
#include <algorithm>
#include <cstdio>
#include <vector>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); exit(1); } } while (0)
#define CB(x) do { int status_ = (int)(x); if (status_ != 0) { printf("%s:%d cublas status %d\n", __FILE__, __LINE__, status_); exit(1); } } while (0)

__global__ void fill(__nv_bfloat16* p, size_t n, unsigned seed) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        unsigned h = (unsigned)i * 2654435761u ^ seed;
        p[i] = __float2bfloat16(((h >> 8) & 0xffff) / 65536.f - 0.5f);
    }
}

template <class F> static float median_us(F&& run) {
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    for (int i = 0; i < 5; i++) run();
    std::vector<float> t;
    for (int i = 0; i < 20; i++) {
        CK(cudaEventRecord(a)); run(); CK(cudaEventRecord(b)); CK(cudaEventSynchronize(b));
        float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms * 1000);
    }
    std::sort(t.begin(), t.end());
    return t[t.size() / 2];
}

int main() {
    cublasHandle_t h; CB(cublasCreate(&h));
    cublasLtHandle_t lt; CB(cublasLtCreate(&lt));
    size_t wsBytes = 64 << 20; void* ws; CK(cudaMalloc(&ws, wsBytes));
    // cublasGemmEx keeps cuBLAS's own default workspace, as the backend does.
    // (rows, outDim, k): tokens x weight rows x weight columns. Y^T = W X^T as the backend computes it.
    struct Shape { const char* name; int rows, out, k; };
    std::vector<Shape> shapes = {
        {"dense 8192^3", 8192, 8192, 8192},
        {"q/k/v 512", 512, 6144, 4096}, {"output proj 512", 512, 4096, 4096},
        {"gate+up 512", 512, 28672, 4096}, {"down 512", 512, 4096, 14336},
        {"q/k/v 2048", 2048, 6144, 4096}, {"gate 2048", 2048, 14336, 4096}, {"down 2048", 2048, 4096, 14336},
    };
    size_t maxA = 0, maxB = 0, maxC = 0;
    for (auto& s : shapes) {
        maxA = std::max(maxA, (size_t)s.out * s.k); maxB = std::max(maxB, (size_t)s.rows * s.k);
        maxC = std::max(maxC, (size_t)s.rows * s.out);
    }
    __nv_bfloat16 *A, *B; float* C;
    CK(cudaMalloc(&A, maxA * 2)); CK(cudaMalloc(&B, maxB * 2)); CK(cudaMalloc(&C, maxC * 4));
    fill<<<1024, 256>>>(A, maxA, 1); fill<<<1024, 256>>>(B, maxB, 2); CK(cudaDeviceSynchronize());
    float dense = 0;
    printf("| product | rows x out x k | cublasGemmEx us | TFLOP/s | of dense | best of cuBLASLt's candidates us | TFLOP/s | candidates |\n");
    printf("|---|---|---|---|---|---|---|---|\n");
    for (auto& s : shapes) {
        double flop = 2.0 * s.rows * s.out * s.k;
        float alpha = 1, beta = 0;
        float ex = median_us([&] {
            CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, s.out, s.rows, s.k, &alpha, A, CUDA_R_16BF, s.k, B, CUDA_R_16BF, s.k,
                            &beta, C, CUDA_R_32F, s.out, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        });
        double tf = flop / ex / 1e6;
        if (dense == 0) dense = tf;
        // cuBLASLt: the same product, every heuristic candidate.
        cublasLtMatmulDesc_t op; CB(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
        CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
        CB(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
        cublasLtMatrixLayout_t la, lb, lc;
        CB(cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, s.k, s.out, s.k));
        CB(cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, s.k, s.rows, s.k));
        CB(cublasLtMatrixLayoutCreate(&lc, CUDA_R_32F, s.out, s.rows, s.out));
        cublasLtMatmulPreference_t pref; CB(cublasLtMatmulPreferenceCreate(&pref));
        CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wsBytes, sizeof(wsBytes)));
        cublasLtMatmulHeuristicResult_t res[16]; int found = 0;
        CB(cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 16, res, &found));
        float best = 1e30f; int bestIndex = -1;
        for (int i = 0; i < found; i++) {
            float t = median_us([&] {
                CB(cublasLtMatmul(lt, op, &alpha, A, la, B, lb, &beta, C, lc, C, lc, &res[i].algo, ws, wsBytes, 0));
            });
            if (t < best) { best = t; bestIndex = i; }
        }
        printf("| %s | %d x %d x %d | %.1f | %.0f | %.0f%% | %.1f (candidate %d) | %.0f | %d |\n", s.name, s.rows, s.out, s.k, ex, tf,
               100 * tf / dense, best, bestIndex, flop / best / 1e6, found);
        cublasLtMatmulPreferenceDestroy(pref); cublasLtMatrixLayoutDestroy(la); cublasLtMatrixLayoutDestroy(lb);
        cublasLtMatrixLayoutDestroy(lc); cublasLtMatmulDescDestroy(op);
    }
    return 0;
}
