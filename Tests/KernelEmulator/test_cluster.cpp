// The emulator's clusters (blocks launched together that read and write each other's shared memory
// and arrive on each other's mbarriers), on two small kernels written here (Kernels.cu has none
// that uses them yet): an exchange of values between the two blocks of each cluster around a
// cluster barrier, and a pipeline in which each block's producer warp fills every other chunk's
// buffer in both blocks, so that each chunk is made once for two blocks of consumers (the pattern
// of a product whose decoded weight tiles serve two blocks of tokens). Each must give the host's
// sums; with a wait left out each must fail: wrong sums, or the emulator stopping (an arrival on
// a barrier not yet initialized, memory of a block that has exited), which a forked child shows.
#include "cuda_emulator.h"
#include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
#include "test_util.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

using namespace test;

constexpr int THREADS = 128, STAGES = 4, COLUMNS = 128;
constexpr int PIPE_SHARED = STAGES * COLUMNS * 4 + 2 * STAGES * 8;

// Thread t of each block writes rank * 1000 + t into the other block's word t; after the cluster
// barrier each reads its own word t (the other block's value) into out (skip: no barrier between
// the writes and the reads).
static __global__ void exchange(float* out, int skip) {
    extern __shared__ __align__(16) unsigned char fa_shared[];
    float* words = (float*)fa_shared;
    const unsigned t = threadIdx.x, rank = cluster_rank(), other = rank ^ 1;
    cluster_store(cluster_map((unsigned)__cvta_generic_to_shared(&words[t]), other), fbits((float)(rank * 1000 + t)));
    if (!skip) cluster_sync();
    out[blockIdx.x * THREADS + t] = words[t];
    // No block leaves while the other may still write its memory.
    cluster_sync();
}

// 160 threads a block, clusters of two: chunk c (COLUMNS floats of `in`, a row per chunk) is made
// by warp 4 of block c % 2 (rank), which writes it into buffer c % STAGES of both blocks (plain
// stores here, remote ones there) and arrives on both blocks' full[s]; warps 0-3 of each block wait
// for full[s], add their column, and arrive on empty[s] of the block that made it (4 warps of each
// block: 8 arrivals), which that producer waits for before refilling the buffer in both blocks.
// STAGES is even, so a buffer's chunks are all made by one block. Each block writes its consumers'
// sums times (rank + 1). Leaving out: skip 1, the consumers' wait for full; 2, the cluster barrier
// after the barriers' init; 3, the one before the blocks exit.
static __global__ void shared_pipeline(const float* in, float* out, int chunks, int skip) {
    extern __shared__ __align__(16) unsigned char fa_shared[];
    float (*buf)[COLUMNS] = (float (*)[COLUMNS])fa_shared;
    unsigned long long* full = (unsigned long long*)(fa_shared + STAGES * COLUMNS * 4);
    unsigned long long* empty = full + STAGES;
    const int t = threadIdx.x;
    const unsigned rank = cluster_rank(), other = rank ^ 1;
    if (t == 0)
        for (int s = 0; s < STAGES; s++) {
            mbarrier_init(&full[s], 32);
            mbarrier_init(&empty[s], 8);
        }
    __syncthreads();
    // The other block's barriers are initialized before this one arrives on them.
    if (skip != 2) cluster_sync();
    auto remote = [&](const void* p) { return cluster_map((unsigned)__cvta_generic_to_shared(p), other); };
    if (t >= 128) {
        const int lane = t - 128;
        for (int c = (int)rank; c < chunks; c += 2) {
            const int s = c % STAGES;
            if (c >= STAGES) mbarrier_wait(&empty[s], (c / STAGES - 1) & 1);
            for (int i = 0; i < 4; i++) {
                float v = in[(long)c * COLUMNS + 4 * lane + i];
                buf[s][4 * lane + i] = v;
                cluster_store(remote(&buf[s][4 * lane + i]), fbits(v));
            }
            mbarrier_arrive(&full[s]);
            mbarrier_arrive_cluster(remote(&full[s]));
        }
    } else {
        float sum = 0.f;
        for (int c = 0; c < chunks; c++) {
            const int s = c % STAGES;
            if (skip != 1) mbarrier_wait(&full[s], (c / STAGES) & 1);
            sum += buf[s][t];
            __syncwarp();
            if ((t & 31) == 0) {
                if ((unsigned)(c % 2) == rank) mbarrier_arrive(&empty[s]);
                else mbarrier_arrive_cluster(remote(&empty[s]));
            }
        }
        out[blockIdx.x * COLUMNS + t] = sum * (float)(rank + 1);
    }
    if (skip != 3) cluster_sync();
}

// Whether fn stops the emulator (abort) in a child process; its messages go nowhere.
template <class F> static bool stops(F fn) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        freopen("/dev/null", "w", stderr);
        fn();
        _exit(0);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    return WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT;
}

int main() {
    bool ok = true;
    auto report = [&](bool pass, const char* what) {
        printf("%s %s\n", pass ? "ok  " : "FAIL", what);
        ok &= pass;
    };

    // The exchange, over two clusters (blocks 0-1 and 2-3).
    for (int skip : {0, 1}) {
        std::vector<float> out(4 * THREADS, NAN);
        emu::launch_cluster(exchange, dim3(4), 2, dim3(THREADS), THREADS * 4, out.data(), skip);
        bool right = true;
        for (int b = 0; b < 4; b++)
            for (int t = 0; t < THREADS; t++) right &= out[b * THREADS + t] == (float)(((b % 2) ^ 1) * 1000 + t);
        report(right == !skip, skip ? "exchange without the cluster barrier: wrong values" : "exchange: each block reads the other's values");
    }

    // The pipeline, over chunk counts that end on either block and refill each buffer.
    Rng rng(7);
    for (int chunks : {1, 2, 9, 16}) {
        std::vector<float> in((size_t)chunks * COLUMNS);
        for (auto& v : in) v = rng.uniform(-1, 1);
        std::vector<double> want(COLUMNS, 0.0);
        for (int c = 0; c < chunks; c++)
            for (int i = 0; i < COLUMNS; i++) want[i] += in[(size_t)c * COLUMNS + i];
        auto run = [&](int skip) {
            std::vector<float> out(4 * COLUMNS, NAN);
            emu::launch_cluster(shared_pipeline, dim3(4), 2, dim3(160), PIPE_SHARED, in.data(), out.data(), chunks, skip);
            return out;
        };
        auto right = [&](const std::vector<float>& out) {
            double worst = 0;
            for (int b = 0; b < 4; b++)
                for (int i = 0; i < COLUMNS; i++) {
                    double e = fabs(out[b * COLUMNS + i] - want[i] * (b % 2 + 1));
                    worst = e == e ? std::max(worst, e) : INFINITY;
                }
            return worst <= 1e-4;
        };
        char what[128];
        snprintf(what, sizeof what, "shared pipeline, %d chunks: each block's sums", chunks);
        report(right(run(0)), what);
        // Each kind of warp behind the others, in both blocks: the consumers, then the producers.
        for (auto lag : {std::pair{0, 127}, std::pair{128, 159}}) {
            emu::Lagging behind(lag.first, lag.second);
            snprintf(what, sizeof what, "shared pipeline, %d chunks, the %s behind: each block's sums", chunks, lag.first ? "producers" : "consumers");
            report(right(run(0)), what);
        }
        if (chunks > STAGES) continue;  // left-out waits past a refill deadlock instead (as on the hardware)
        snprintf(what, sizeof what, "shared pipeline, %d chunks, no wait for full: wrong sums", chunks);
        report(!right(run(1)), what);
        snprintf(what, sizeof what, "shared pipeline, %d chunks, no cluster barrier after init: the emulator stops", chunks);
        report(stops([&] { run(2); }), what);
    }
    // A block that exits while the other still arrives on its barriers: with the second block's
    // consumers held back, the first block finishes first.
    {
        emu::Lagging behind(0, 127, 1);
        std::vector<float> in(16 * COLUMNS, 0.5f);
        report(stops([&] {
                   std::vector<float> out(4 * COLUMNS);
                   emu::launch_cluster(shared_pipeline, dim3(2), 2, dim3(160), PIPE_SHARED, in.data(), out.data(), 16, 3);
               }),
               "shared pipeline, no cluster barrier before exit: the emulator stops");
    }
    printf(ok ? "cluster: all passed\n" : "cluster: FAILED\n");
    return ok ? 0 : 1;
}
