// The BF16 wgmma wrappers quant_gemm uses (wgmma_rs_bf16_n128 and _n256: A from registers, B
// K-major with 128-byte swizzling), on a 64 x 64 by 64 x N product whose B is laid out as the
// prompt attention kernels lay out their keys (swizzled128, rows of 64 values in 128-byte lines,
// four k steps of 32 bytes along them), against a host product. The layout and instruction encoding
// are the GPU-tested F16 kernels'; only the type and N are new.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

using namespace test;

// d (64 x N) = a (64 x 64, row-major) * b^T (b: N x 64, row n holding column n of B), BF16.
template <int N>
__global__ void rs_bf16_product(const unsigned short* a, const unsigned short* b, float* d) {
    extern __shared__ __align__(16) unsigned char fa_shared[];
    unsigned char* Bs = fa_shared + ((1024 - (shared_address(fa_shared) & 1023)) & 1023);
    for (int c = threadIdx.x; c < N * 8; c += blockDim.x) *(uint4*)(Bs + swizzled128(c / 8, c % 8, N)) = *(const uint4*)(b + c * 8);
    __syncthreads();
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3, r = 16 * warp + g;
    float acc[N / 8][4];
    auto pair = [&](int row, int col) { return (unsigned)a[row * 64 + col] | ((unsigned)a[row * 64 + col + 1] << 16); };
    for (int kk = 0; kk < 4; kk++) {
        unsigned ar[4] = {pair(r, 16 * kk + 2 * q), pair(r + 8, 16 * kk + 2 * q), pair(r, 16 * kk + 2 * q + 8), pair(r + 8, 16 * kk + 2 * q + 8)};
        unsigned long long desc = wgmma_desc(shared_address(Bs) + kk * 32, 16, 1024);
        wgmma_fence();
        if constexpr (N == 128) wgmma_rs_bf16_n128(acc, ar, desc, kk > 0);
        else wgmma_rs_bf16_n256(acc, ar, desc, kk > 0);
        wgmma_commit();
        wgmma_wait<0>();
    }
    for (int n = 0; n < N / 8; n++)
        for (int e = 0; e < 4; e++) d[(r + 8 * (e >> 1)) * N + 8 * n + 2 * q + (e & 1)] = acc[n][e];
}

template <int N> static bool check(Rng& rng) {
    std::vector<unsigned short> a(64 * 64), b(N * 64);
    for (auto& v : a) v = to_bf16(rng.uniform(-1, 1));
    for (auto& v : b) v = to_bf16(rng.uniform(-1, 1));
    std::vector<float> d(64 * N, NAN);
    emu::launch(rs_bf16_product<N>, dim3(1), dim3(128), N * 128 + 1024, a.data(), b.data(), d.data());
    char label[64];
    snprintf(label, sizeof label, "wgmma_rs_bf16_n%d (K-major B, 128-byte swizzle)", N);
    Errors e(label, 1e-6);
    for (int m = 0; m < 64; m++)
        for (int n = 0; n < N; n++) {
            double s = 0, mag = 0;
            for (int k = 0; k < 64; k++) {
                double p = (double)from_bf16(a[m * 64 + k]) * from_bf16(b[n * 64 + k]);
                s += p;
                mag += fabs(p);
            }
            e.add(d[m * N + n], s, mag);
        }
    return e.report();
}

int main() {
    Rng rng(3);
    bool ok = check<128>(rng);
    ok &= check<256>(rng);
    printf(ok ? "wgmma: all passed\n" : "wgmma: FAILED\n");
    return ok ? 0 : 1;
}
