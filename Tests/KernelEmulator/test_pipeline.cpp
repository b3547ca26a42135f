// The emulator's synchronisation for warp-specialized kernels, on two small producer/consumer
// pipelines written here: named barriers (bar.sync and bar.arrive, producer warps filling
// shared-memory buffers with plain stores), and mbarriers
// with cp.async (a producer warp's copies bound to a buffer's "full" barrier by
// cp.async.mbarrier.arrive.noinc, consumers arriving on its "empty" barrier). Each consumer sums
// its column over every chunk, against the host. Each pipeline also runs with the consumers' wait
// for a full buffer left out, which must give wrong sums (the consumers, threads 0-127, run first
// and read shared memory the producers have not filled: the emulator's NaN fill, or a copy's
// poison), so the tests show the emulator catches a missing wait rather than passing by luck
// (over at most STAGES chunks: past them the broken counts deadlock, which the emulator reports
// and stops on). Then the TMA's 2-D tile copy (quant_gemm_ws's activations): a box of a tensor
// into shared memory with the 128-byte swizzle, against the pattern the hardware documents (the
// 16-byte piece j of row r at piece j ^ (r % 8) of its 128-byte row) and zeros past the
// tensor's rows, and with the wait left out (which must differ).
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

using namespace test;

constexpr int STAGES = 2, COLUMNS = 128, SHARED = STAGES * COLUMNS * 4 + 2 * STAGES * 8;

// 256 threads: warps 4-7 produce (chunk c's row of COLUMNS values, scaled, into buffer c %
// STAGES), warps 0-3 consume (thread t adds column t). Barriers 1 + s: buffer s full; 1 + STAGES
// + s: buffer s empty.
static __global__ void named_pipeline(const float* in, float* out, int chunks, int skip) {
    extern __shared__ __align__(16) unsigned char fa_shared[];  // the dynamic arena, NaNs at the block's start
    float (*buf)[COLUMNS] = (float (*)[COLUMNS])fa_shared;
    int t = threadIdx.x;
    if (t >= 128) {
        for (int c = 0; c < chunks; c++) {
            int s = c % STAGES;
            if (c >= STAGES) named_barrier_sync(1 + STAGES + s, 256);
            buf[s][t - 128] = 2.f * in[(long)c * COLUMNS + t - 128];
            named_barrier_arrive(1 + s, 256);
        }
    } else {
        float sum = 0.f;
        for (int c = 0; c < chunks; c++) {
            int s = c % STAGES;
            if (!skip) named_barrier_sync(1 + s, 256);
            sum += buf[s][t];
            named_barrier_arrive(1 + STAGES + s, 256);
        }
        out[t] = sum;
    }
}

// 160 threads: warp 4 copies chunk c (COLUMNS floats, 16 bytes a lane) into buffer c % STAGES
// with cp.async and binds the copies to full[s]; warps 0-3 wait for full[s], each thread adds its
// column, then arrives on empty[s]; the producer waits for empty[s] before refilling it.
static __global__ void mbarrier_pipeline(const float* in, float* out, int chunks, int skip) {
    extern __shared__ __align__(16) unsigned char fa_shared[];
    float (*buf)[COLUMNS] = (float (*)[COLUMNS])fa_shared;
    unsigned long long* full = (unsigned long long*)(fa_shared + STAGES * COLUMNS * 4);
    unsigned long long* empty = full + STAGES;
    int t = threadIdx.x;
    if (t == 0)
        for (int s = 0; s < STAGES; s++) {
            mbarrier_init(&full[s], 32);
            mbarrier_init(&empty[s], 128);
        }
    __syncthreads();
    if (t >= 128) {
        int lane = t - 128;
        for (int c = 0; c < chunks; c++) {
            int s = c % STAGES;
            if (c >= STAGES) mbarrier_wait(&empty[s], (c / STAGES - 1) & 1);
            copy16_async(&buf[s][4 * lane], in + (long)c * COLUMNS + 4 * lane, true);
            copy_arrive(&full[s]);
        }
    } else {
        float sum = 0.f;
        for (int c = 0; c < chunks; c++) {
            int s = c % STAGES;
            if (!skip) mbarrier_wait(&full[s], (c / STAGES) & 1);
            sum += buf[s][t];
            mbarrier_arrive(&empty[s]);
        }
        out[t] = sum;
    }
}

// 128 threads: thread 0 initializes the barrier (two arrivals), then copies the box of TMA_ROWS
// rows by 64 16-bit values at (c0, c1) with the TMA, its arrival expecting the box's bytes, and
// thread 1 arrives; every thread waits for the phase and writes its share of the box out,
// unswizzled. With `skip` nobody waits and thread 1 arrives only after its reads, so the phase
// cannot complete before them: the box is read before it lands.
constexpr int TMA_ROWS = 256, TMA_SHARED = TMA_ROWS * 128 + 16;
static __global__ void tma_box(const TensorMap map, unsigned short* out, int c0, int c1, int skip) {
    extern __shared__ __align__(16) unsigned char fa_shared[];
    unsigned long long* bar = (unsigned long long*)(fa_shared + TMA_ROWS * 128);
    int t = threadIdx.x;
    if (t == 0) {
        mbarrier_init(bar, 2);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (t == 0) {
        mbarrier_arrive_expect_tx(bar, TMA_ROWS * 128);
        tma_load_2d(fa_shared, &map, c0, c1, bar);
    }
    if (t == 1 && !skip) mbarrier_arrive(bar);
    if (!skip) mbarrier_wait(bar, 0);
    for (int i = t; i < TMA_ROWS * 64; i += blockDim.x) {
        int r = i / 64, e = i % 64;
        memcpy(&out[i], fa_shared + r * 128 + (((e / 8) ^ (r & 7)) << 4) + 2 * (e % 8), 2);
    }
    if (t == 1 && skip) mbarrier_arrive(bar);
}

static bool check(const char* label, const std::vector<float>& got, const std::vector<double>& want, bool expectRight) {
    double worst = 0;
    for (int i = 0; i < COLUMNS; i++) {
        double e = fabs(got[i] - want[i]);
        worst = e == e ? std::max(worst, e) : INFINITY;
    }
    bool right = worst <= 1e-4;
    bool ok = right == expectRight;
    printf("%s %-64s max error %.3g (%s)\n", ok ? "ok  " : "FAIL", label, worst, expectRight ? "must match" : "must not");
    return ok;
}

int main() {
    Rng rng(3);
    bool ok = true;
    for (int chunks : {1, 2, 7}) {
        std::vector<float> in((size_t)chunks * COLUMNS);
        for (auto& v : in) v = rng.uniform(-1, 1);
        std::vector<double> want(COLUMNS, 0.0), want2(COLUMNS, 0.0);
        for (int c = 0; c < chunks; c++)
            for (int i = 0; i < COLUMNS; i++) {
                want[i] += in[(size_t)c * COLUMNS + i];
                want2[i] += 2.0 * in[(size_t)c * COLUMNS + i];
            }
        char label[96];
        for (int skip : {0, 1}) {
            // Without the consumers' waits, the counts run ahead of the producers (a deadlock,
            // as on the hardware) once a buffer is refilled: the broken runs stop short of that.
            if (skip && chunks > STAGES) continue;
            std::vector<float> out(COLUMNS, NAN);
            emu::launch(named_pipeline, dim3(1), dim3(256), SHARED, in.data(), out.data(), chunks, skip);
            snprintf(label, sizeof label, "named barriers, %d chunk%s%s", chunks, chunks > 1 ? "s" : "", skip ? ", no wait for full" : "");
            ok &= check(label, out, want2, !skip);
            out.assign(COLUMNS, NAN);
            emu::launch(mbarrier_pipeline, dim3(1), dim3(160), SHARED, in.data(), out.data(), chunks, skip);
            snprintf(label, sizeof label, "mbarriers and cp.async, %d chunk%s%s", chunks, chunks > 1 ? "s" : "", skip ? ", no wait for full" : "");
            ok &= check(label, out, want, !skip);
        }
    }
    // A tensor of 300 rows by 192 values: a box inside it, and one whose last 100 rows lie past it.
    {
        const int rows = 300, cols = 192;
        std::vector<unsigned short> tensor((size_t)rows * cols);
        for (size_t i = 0; i < tensor.size(); i++) tensor[i] = (unsigned short)(i * 2654435761u >> 16 | 1);
        TensorMap map;
        emu_encode_tensor_map_2d(&map, tensor.data(), cols, rows, 2 * cols, 64, TMA_ROWS, 2, 128);
        // The last with the wait left out: the values must differ.
        const struct { int c0, c1, skip; const char* what; } boxes[] = {
            {64, 0, 0, "inside the tensor"}, {128, 200, 0, "100 rows past its end"}, {64, 0, 1, "no wait for the copy"}};
        for (const auto& b : boxes) {
            std::vector<unsigned short> out((size_t)TMA_ROWS * 64, 0xffff);
            emu::launch(tma_box, dim3(1), dim3(128), TMA_SHARED, map, out.data(), b.c0, b.c1, b.skip);
            long wrong = 0;
            for (int r = 0; r < TMA_ROWS; r++)
                for (int e = 0; e < 64; e++) {
                    unsigned short want = b.c1 + r < rows ? tensor[(size_t)(b.c1 + r) * cols + b.c0 + e] : 0;
                    wrong += out[(size_t)r * 64 + e] != want;
                }
            bool right = (wrong == 0) == !b.skip;
            printf("%s TMA box of %d rows by 64 values at (%d, %d), %s: %ld values differ (%s)\n", right ? "ok  " : "FAIL", TMA_ROWS, b.c0, b.c1,
                   b.what, wrong, b.skip ? "must" : "must not");
            ok &= right;
        }
    }
    printf(ok ? "pipeline: all passed\n" : "pipeline: FAILED\n");
    return ok ? 0 : 1;
}
