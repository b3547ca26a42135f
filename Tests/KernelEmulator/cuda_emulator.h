// A host emulator for the subset of CUDA that Sources/Peregrine/Backend/CUDA/Kernels.cu uses, so
// that a C++ program can include Kernels.cu and run its kernels on the CPU to check their logic
// (indexing, masking, fragment and shared-memory layouts) without a GPU:
//
//     #include "cuda_emulator.h"
//     #include "../../Sources/Peregrine/Backend/CUDA/Kernels.cu"
//     ...
//     emu::launch(attention_prefill_mma_128, dim3(tiles, heads), dim3(128), sharedBytes, q, kc, ...);
//
// A block's threads are fibers of one OS thread, each run until it reaches a collective (block
// barrier, warp shuffle or vote, ldmatrix, mma, wgmma); a collective completes, executed by the
// last thread to arrive, once every thread that takes part has arrived. The schedule is
// deterministic. Blocks run one after another, a cluster's blocks together (launch_cluster;
// EMU_THREADS=n: on n OS threads, each with its own shared memory). Tensor-core instructions are executed as the PTX ISA defines their operands'
// layouts, at issue; timing, the memory model's races and the overlap of asynchronous copies and
// wgmma with other work are not emulated (see README.md).
#pragma once

#define PEREGRINE_CUDA_EMULATOR 1
#define __CUDA_ARCH__ 900
#define __CUDA_ARCH_FEAT_SM90_ALL 1

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <map>
#include <atomic>
#include <deque>
#include <mutex>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__
#define __restrict__ __restrict
// Shared variables are static (thread_local: one copy per OS thread running blocks, and
// `extern __shared__` stays a valid declaration); dynamic shared memory is below.
#define __shared__ thread_local

// ---------------------------------------------------------------------------------------------
// Vector types.

struct uint3 { unsigned x, y, z; };
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(4))) char4 { signed char x, y, z, w; };
struct __attribute__((aligned(4))) uchar4 { unsigned char x, y, z, w; };

inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline char4 make_char4(signed char x, signed char y, signed char z, signed char w) { return {x, y, z, w}; }
inline uchar4 make_uchar4(unsigned char x, unsigned char y, unsigned char z, unsigned char w) { return {x, y, z, w}; }

constexpr int warpSize = 32;

// ---------------------------------------------------------------------------------------------
// Bit casts and the 16-bit float types, rounding as the hardware's cvt.rn does (to nearest, ties
// to even; NaN to the canonical 0x7fff).

namespace emu {
template <class To, class From> inline To bits(const From& f) {
    static_assert(sizeof(To) == sizeof(From));
    To t;
    memcpy(&t, &f, sizeof t);
    return t;
}

inline unsigned short float_to_half_bits(float f) {
    uint32_t x = bits<uint32_t>(f), sign = (x >> 16) & 0x8000;
    x &= 0x7fffffff;
    if (x > 0x7f800000) return 0x7fff;
    if (x >= 0x477ff000) return (unsigned short)(sign | 0x7c00);  // 65520 and up (ties to even): inf
    if (x <= 0x33000000) return (unsigned short)sign;              // 2^-25 and below: zero
    uint32_t e = x >> 23, m = x & 0x7fffff;
    if (e < 113) {  // a subnormal half: units of 2^-24
        m |= 0x800000;
        uint32_t shift = 126 - e, r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (unsigned short)(sign | r);
    }
    uint32_t h = ((e - 112) << 10) | (m >> 13), rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++;
    return (unsigned short)(sign | h);
}

inline float half_bits_to_float(unsigned short h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 0x3ff;
    if (e == 31) return bits<float>(sign | 0x7f800000 | (m << 13));
    if (e == 0) {
        float v = (float)m * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits<float>(sign | ((e + 112) << 23) | (m << 13));
}

inline unsigned short float_to_bf16_bits(float f) {
    uint32_t x = bits<uint32_t>(f);
    if ((x & 0x7fffffff) > 0x7f800000) return 0x7fff;
    return (unsigned short)((x + 0x7fff + ((x >> 16) & 1)) >> 16);
}

inline float bf16_bits_to_float(unsigned short b) { return bits<float>((uint32_t)b << 16); }
}  // namespace emu

struct __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(emu::float_to_half_bits(f)) {}
    operator float() const { return emu::half_bits_to_float(__x); }
};
struct __attribute__((aligned(4))) __half2 { __half x, y; };
struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(emu::float_to_bf16_bits(f)) {}
    operator float() const { return emu::bf16_bits_to_float(__x); }
};
struct __attribute__((aligned(4))) __nv_bfloat162 { __nv_bfloat16 x, y; };
typedef __half half;
typedef __half2 half2;

inline __half emu_half(unsigned short b) { __half h; h.__x = b; return h; }
inline __nv_bfloat16 emu_bf16(unsigned short b) { __nv_bfloat16 h; h.__x = b; return h; }
inline float __half2float(__half h) { return emu::half_bits_to_float(h.__x); }
inline __half __float2half(float f) { return emu_half(emu::float_to_half_bits(f)); }
inline __half __float2half_rn(float f) { return emu_half(emu::float_to_half_bits(f)); }
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }
inline __half2 __float2half2_rn(float f) { return {__float2half_rn(f), __float2half_rn(f)}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half __ushort_as_half(unsigned short b) { return emu_half(b); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline float __bfloat162float(__nv_bfloat16 b) { return emu::bf16_bits_to_float(b.__x); }
inline __nv_bfloat16 __float2bfloat16(float f) { return emu_bf16(emu::float_to_bf16_bits(f)); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return emu_bf16(emu::float_to_bf16_bits(f)); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) { return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {__bfloat162float(b.x), __bfloat162float(b.y)}; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return emu_bf16(b); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }

// ---------------------------------------------------------------------------------------------
// Scalar intrinsics. --use_fast_math's approximations (__expf, exp2f, division) are taken as
// the host's correctly rounded functions.

inline float __int_as_float(int i) { return emu::bits<float>(i); }
inline int __float_as_int(float f) { return emu::bits<int>(f); }
inline float __uint_as_float(unsigned i) { return emu::bits<float>(i); }
inline unsigned __float_as_uint(float f) { return emu::bits<unsigned>(f); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __saturatef(float x) { return x < 0.f ? 0.f : x > 1.f ? 1.f : x; }
inline int __float2int_rn(float x) { return (int)rintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x ? __builtin_clz((unsigned)x) : 32; }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __dp4a(int a, int b, int c) {
    for (int i = 0; i < 4; i++) c += (int)(signed char)(a >> 8 * i) * (int)(signed char)(b >> 8 * i);
    return c;
}
inline unsigned __dp4a(unsigned a, unsigned b, unsigned c) {
    for (int i = 0; i < 4; i++) c += ((a >> 8 * i) & 255) * ((b >> 8 * i) & 255);
    return c;
}
inline unsigned __vsub4(unsigned a, unsigned b) {
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= ((((a >> 8 * i) & 255) - ((b >> 8 * i) & 255)) & 255) << 8 * i;
    return r;
}
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
    uint64_t v = ((uint64_t)y << 32) | x;
    unsigned r = 0;
    for (int i = 0; i < 4; i++) r |= (unsigned)((v >> 8 * ((s >> 4 * i) & 7)) & 255) << 8 * i;
    return r;
}
template <class A, class B> inline auto min(A a, B b) -> std::common_type_t<A, B> { return b < a ? b : a; }
template <class A, class B> inline auto max(A a, B b) -> std::common_type_t<A, B> { return a < b ? b : a; }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }

// Global memory: blocks may run on several OS threads, so atomics are the host's.
template <class T, class = std::enable_if_t<std::is_integral_v<T>>> inline T atomicAdd(T* p, T v) {
    return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
template <class F> inline F emu_atomic_add_float(F* p, F v) {
    F old, next;
    __atomic_load(p, &old, __ATOMIC_SEQ_CST);
    do next = old + v;
    while (!__atomic_compare_exchange(p, &old, &next, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
    return old;
}
inline float atomicAdd(float* p, float v) { return emu_atomic_add_float(p, v); }
inline double atomicAdd(double* p, double v) { return emu_atomic_add_float(p, v); }
template <class T> inline T atomicSub(T* p, T v) { return __atomic_fetch_sub(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicExch(T* p, T v) { return __atomic_exchange_n(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicCAS(T* p, T expected, T v) {
    __atomic_compare_exchange_n(p, &expected, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
    return expected;
}
template <class T> inline T atomicMax(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (old < v && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
template <class T> inline T atomicMin(T* p, T v) {
    T old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
    while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {}
    return old;
}
template <class T> inline T atomicOr(T* p, T v) { return __atomic_fetch_or(p, v, __ATOMIC_SEQ_CST); }
template <class T> inline T atomicAnd(T* p, T v) { return __atomic_fetch_and(p, v, __ATOMIC_SEQ_CST); }
inline void __threadfence() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
inline void __threadfence_block() { __atomic_thread_fence(__ATOMIC_SEQ_CST); }

// ---------------------------------------------------------------------------------------------
// Dynamic shared memory: `extern __shared__ T name[]` in a kernel names a symbol, so the names
// Kernels.cu declares are one thread-local arena, defined in assembly so that every declaration,
// whatever its type, is the same storage (a kernel that declares a new name needs it added here,
// with its length). Each name gets an empty TLS initializer (_ZTH, the length, the name): the
// compilers may call one for an extern thread-local object defined elsewhere (for shared4, of
// class type, always; GCC for xsh, a float array, too, through a PLT entry that a missing weak
// definition leaves at address 0).

#define EMU_SHARED_BYTES 262144  // wgmma descriptors address 256 KB (18 bits)
#define EMU_SHARED_NAMES(X) X(fa_shared, 9) X(xsh, 3) X(shared4, 7) X(sh, 2)
#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
#define EMU_SHARED_DECL(n, len) ".globl " #n "\n.type " #n ",@object\n.size " #n ", " EMU_STR(EMU_SHARED_BYTES) "\n" #n ":\n"
#define EMU_SHARED_INIT(n, len) ".weak _ZTH" #len #n "\n.type _ZTH" #len #n ",@function\n_ZTH" #len #n ":\nret\n"
asm(".pushsection .tbss,\"awT\",@nobits\n.balign 1024\n" EMU_SHARED_NAMES(EMU_SHARED_DECL) ".zero " EMU_STR(EMU_SHARED_BYTES) "\n.popsection\n"
    ".pushsection .text\n" EMU_SHARED_NAMES(EMU_SHARED_INIT) ".popsection\n");
extern "C" {
extern thread_local unsigned char fa_shared[];
}

inline size_t __cvta_generic_to_shared(const void* p) {
    size_t o = (size_t)((const unsigned char*)p - fa_shared);
    if (o >= EMU_SHARED_BYTES) {
        fprintf(stderr, "emu: the shared address of %p, which is not in dynamic shared memory\n", p);
        abort();
    }
    return o;
}

// ---------------------------------------------------------------------------------------------
// Threads, blocks and collectives.

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;
namespace emu {
inline thread_local size_t dynamicShared = 0;  // the running launch's dynamic shared memory
}

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer in *from, resumes the context at `to`.
asm(".pushsection .text\n.globl emu_switch_context\n.type emu_switch_context,@function\nemu_switch_context:\n"
    "pushq %rbp\npushq %rbx\npushq %r12\npushq %r13\npushq %r14\npushq %r15\nmovq %rsp, (%rdi)\nmovq %rsi, %rsp\n"
    "popq %r15\npopq %r14\npopq %r13\npopq %r12\npopq %rbx\npopq %rbp\nret\n.popsection\n");
extern "C" void emu_switch_context(void** from, void* to);
#endif

namespace emu {

[[noreturn]] inline void die(const char* what) {
    fprintf(stderr, "emu: block (%u, %u, %u) thread (%u, %u, %u): %s\n", blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
            threadIdx.z, what);
    abort();
}

struct Fiber {
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t context;
#endif
    bool done = false;
    const unsigned* waitOn = nullptr;  // runnable once *waitOn != waitFor
    unsigned waitFor = 0;
    uint3 tid{};
    // The thread's cp.async copies in flight: those not yet committed, then its committed groups,
    // oldest first. They land in shared memory only when a copy_wait lets them (see copy16_).
    struct Copy {
        unsigned char* dst;
        unsigned char bytes[16];
    };
    std::vector<Copy> openCopies;
    std::deque<std::vector<Copy>> copyGroups;
    unsigned clusterPhase = 0;  // the cluster barrier's phase the thread last arrived in
};

// A warpgroup's wgmma instructions in flight: issued but not committed, then committed groups,
// oldest first. Each runs (reading shared memory and the A registers, writing the accumulators)
// only when a wgmma_wait lets it (see wgmma_issue_op_).
struct PendingWgmma {
    void (*run)(const PendingWgmma&);
    unsigned long long a, b;
    int accumulate;
    const unsigned* aRegs[128];
    float* d[128];
};
struct WgmmaQueue {
    std::vector<PendingWgmma> open;
    std::deque<std::vector<PendingWgmma>> groups;
};

// A collective of a set of threads (a warp's lanes, a warpgroup, the block): each arriving thread
// leaves a pointer to its operands (on its stack, alive while it waits) and the last one runs
// `op` over all of them, which writes every thread's results.
struct Collective {
    bool warp = false;
    int size = 0, base = 0;  // threads base ..< base + size
    int live = 0, arrived = 0;
    unsigned mask = 0;       // warps: the lanes taking part (of those alive)
    unsigned liveMask = 0, arrivedMask = 0;
    unsigned gen = 0;
    void (*op)(Collective&) = nullptr;
    const char* name = nullptr;
    void* args[128];
};

// An mbarrier (a 64-bit object in shared memory, tracked here by its address): the arrivals its
// current phase still expects, its transaction count (bytes expected by arrive.expect_tx less
// those of the TMA copies bound to it: the phase completes once both are zero), and the copies
// (cp.async's, the TMA's) that land when the phase completes.
struct Mbarrier {
    unsigned expected = 0, pending = 0, phase = 0;
    long tx = 0;
    std::vector<Fiber::Copy> copies;
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<Collective> warps, groups;
    std::vector<WgmmaQueue> wgmmas;  // one a warpgroup
    Collective barrier;
    Collective named[16];  // bar.sync / bar.arrive 1-15 (0 is __syncthreads' barrier in hardware)
    std::map<const void*, Mbarrier> mbarriers;
    int current = 0, threads = 0;
    int rank = 0, exited = 0;  // its rank in its cluster; how many of its threads have finished
    uint3 idx{};               // its blockIdx
#if defined(__x86_64__)
    void* scheduler = nullptr;
#else
    ucontext_t scheduler;
#endif
    void (*body)(void*) = nullptr;
    void* bodyArg = nullptr;
};

inline thread_local Block* block_ = nullptr;

// A cluster's blocks, run together (one block alone is a cluster of one). Only the running
// block's shared memory is in the arena (fa_shared, where its pointers point); the others' is
// saved beside it and swapped in when one of their threads runs, so a block reads and writes
// another's through arena_(rank) (distributed shared memory). barrier.cluster counts the arrivals
// of the cluster's threads that have not exited.
struct Cluster {
    std::vector<Block> blocks;
    std::vector<std::vector<unsigned char>> saved;
    size_t bytes = 0;
    int current = 0;
    unsigned arrivals = 0, phase = 0, live = 0;
};
inline thread_local Cluster* cluster_ = nullptr;

// Block `rank`'s shared memory, wherever it is now.
inline unsigned char* arena_(int rank) {
    return rank == cluster_->current ? fa_shared : cluster_->saved[rank].data();
}

// Puts block `rank`'s shared memory in the arena.
inline void enter_(int rank) {
    Cluster& c = *cluster_;
    if (rank == c.current) return;
    memcpy(c.saved[c.current].data(), fa_shared, c.bytes);
    memcpy(fa_shared, c.saved[rank].data(), c.bytes);
    c.current = rank;
}
constexpr size_t STACK_BYTES = 256 * 1024, GUARD_BYTES = 4096;

// The fibers' stacks, kept for the OS thread's next blocks and unmapped when it ends.
struct Stacks {
    std::vector<void*> all;
    ~Stacks() {
        for (void* p : all) munmap(p, STACK_BYTES + GUARD_BYTES);
    }
};
inline thread_local Stacks stacks_;

inline void* stack_(int i) {
    while ((int)stacks_.all.size() <= i) {
        void* p = mmap(nullptr, STACK_BYTES + GUARD_BYTES, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (p == MAP_FAILED) die("mmap of a thread's stack failed");
        mprotect(p, GUARD_BYTES, PROT_NONE);  // an overflow faults
        stacks_.all.push_back(p);
    }
    return stacks_.all[i];
}

inline void yield_() {
    Block& b = *block_;
#if defined(__x86_64__)
    emu_switch_context(&b.fibers[b.current].sp, b.scheduler);
#else
    swapcontext(&b.fibers[b.current].context, &b.scheduler);
#endif
}

inline bool complete_(const Collective& c) {
    if (c.warp) return c.arrivedMask && (c.arrivedMask & c.mask & c.liveMask) == (c.mask & c.liveMask);
    return c.arrived > 0 && c.arrived == c.live;
}

inline void finish_(Collective& c) {
    c.op(c);
    c.arrived = 0;
    c.arrivedMask = 0;
    c.op = nullptr;
    c.gen++;
}

// Arrives at collective c with this thread's operands; returns once it has completed.
inline void arrive_(Collective& c, void (*op)(Collective&), const char* name, void* args, unsigned mask = 0xffffffff) {
    Block& b = *block_;
    int i = b.current - c.base;
    if (c.op && c.op != op) {
        char msg[160];
        snprintf(msg, sizeof msg, "reached %s while others of its %s wait at %s", name, c.warp ? "warp" : "group", c.name);
        die(msg);
    }
    if (c.warp && c.arrivedMask && mask != c.mask) die("a warp collective with lanes of different masks");
    if (c.warp && !((mask >> i) & 1)) die("a warp collective whose mask leaves out the calling lane");
    c.op = op;
    c.name = name;
    c.mask = mask;
    if (args) {
        if (i >= 128) die("a collective with operands over more than 128 threads");
        c.args[i] = args;
    }
    c.arrived++;
    c.arrivedMask |= 1u << (i & 31);
    if (complete_(c)) {
        finish_(c);
        return;
    }
    Fiber& f = b.fibers[b.current];
    f.waitOn = &c.gen;
    f.waitFor = c.gen;
    yield_();
}

// Copies land in the shared memory of the block that issued them (`rank`; a remote arrival may
// complete the phase they are bound to while another block's memory is in the arena).
inline void land_copies_(std::vector<Fiber::Copy>& copies, int rank = -1) {
    unsigned char* arena = rank < 0 ? fa_shared : arena_(rank);
    for (const Fiber::Copy& c : copies) memcpy(arena + (c.dst - fa_shared), c.bytes, 16);
    copies.clear();
}

inline void exit_thread_() {
    Block& b = *block_;
    int t = b.current;
    // Copies still in flight land (the thread reads nothing more, others may).
    for (auto& g : b.fibers[t].copyGroups) land_copies_(g);
    b.fibers[t].copyGroups.clear();
    land_copies_(b.fibers[t].openCopies);
    b.fibers[t].done = true;
    b.exited++;
    Cluster& cl = *cluster_;
    if (--cl.live > 0 && cl.arrivals == cl.live) {  // the cluster barrier waited only for this thread
        cl.arrivals = 0;
        cl.phase++;
    }
    Collective* cs[3] = {&b.warps[t / 32], b.groups.empty() ? nullptr : &b.groups[t / 128], &b.barrier};
    for (Collective* c : cs) {
        if (!c) continue;
        c->live--;
        c->liveMask &= ~(1u << ((t - c->base) & 31));
        if (c->op && complete_(*c)) finish_(*c);
    }
    yield_();
    die("a finished thread resumed");
}

inline void fiber_entry_() {
    block_->body(block_->bodyArg);
    exit_thread_();
}

#if !defined(__x86_64__)
inline void fiber_entry_uc_() { fiber_entry_(); }
#endif

// Runs one block of `body` (threadIdx.x fastest, then y, then z; warps of 32 consecutive threads).
// Threads laggingFrom ... laggingTo of each block (none by default; of a cluster's block of rank
// laggingRank only, if it is not -1) run only when no other thread can, so the others get as far
// ahead of them as their waits allow: a test sets them to check that a warp-specialized kernel's
// waits hold when one kind of warp falls behind (the round-robin order otherwise keeps every
// thread within a few steps of the others).
inline int laggingFrom = -1, laggingTo = -2, laggingRank = -1;

// Holds threads from ... to (of the block of rank `rank` only, if it is not -1) back for the
// launches made while it lives.
struct Lagging {
    Lagging(int from, int to, int rank = -1) {
        laggingFrom = from;
        laggingTo = to;
        laggingRank = rank;
    }
    ~Lagging() {
        laggingFrom = -1;
        laggingTo = -2;
        laggingRank = -1;
    }
    Lagging(const Lagging&) = delete;
    Lagging& operator=(const Lagging&) = delete;
};

// Shared memory is filled with this byte at each block's start (0xff: f16/f32 NaNs, so a read of
// what the block never wrote shows); EMU_SHARED_FILL=0 zeros it.
inline int shared_fill_() {
    static int fill = [] {
        const char* e = getenv("EMU_SHARED_FILL");
        return e ? atoi(e) : 0xff;
    }();
    return fill;
}

// Sets up block b's threads, warps, warpgroups and fibers (its rank-th place among the stacks).
inline void setup_block_(Block& b, dim3 block, void (*body)(void*), void* arg) {
    b.threads = (int)(block.x * block.y * block.z);
    b.body = body;
    b.bodyArg = arg;
    b.fibers.resize(b.threads);
    int nw = (b.threads + 31) / 32;
    b.warps.resize(nw);
    for (int w = 0; w < nw; w++) {
        Collective& c = b.warps[w];
        c.warp = true;
        c.size = 32;
        c.base = 32 * w;
        c.live = std::min(32, b.threads - 32 * w);
        c.liveMask = c.live == 32 ? 0xffffffffu : (1u << c.live) - 1;
    }
    if (b.threads % 128 == 0) {
        b.groups.resize(b.threads / 128);
        b.wgmmas.resize(b.threads / 128);
        for (size_t g = 0; g < b.groups.size(); g++) {
            b.groups[g].size = 128;
            b.groups[g].base = 128 * (int)g;
            b.groups[g].live = 128;
        }
    }
    b.barrier.size = b.threads;
    b.barrier.live = b.threads;
    for (int t = 0; t < b.threads; t++) {
        Fiber& f = b.fibers[t];
        f.tid = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
        char* lo = (char*)stack_(b.rank * b.threads + t) + GUARD_BYTES;
#if defined(__x86_64__)
        uintptr_t top = ((uintptr_t)(lo + STACK_BYTES)) & ~(uintptr_t)15;
        void** sp = (void**)top;
        *--sp = nullptr;                      // the entry's return address (it never returns)
        *--sp = (void*)&fiber_entry_;         // where the first switch's `ret` goes
        for (int r = 0; r < 6; r++) *--sp = nullptr;  // rbp, rbx, r12-r15
        f.sp = sp;
#else
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = lo;
        f.context.uc_stack.ss_size = STACK_BYTES;
        f.context.uc_link = nullptr;
        makecontext(&f.context, fiber_entry_uc_, 0);
#endif
    }
}

// Runs a cluster of blocks (blockIdx `idx[r]` for rank r; one block alone is a cluster of one)
// together: passes over every block's threads in rank order, so a thread waiting for another
// block's (a remote mbarrier arrival, barrier.cluster) waits as for its own block's.
inline void run_cluster_(dim3 block, void (*body)(void*), void* arg, const std::vector<uint3>& idx) {
    Cluster cl;
    cluster_ = &cl;
    cl.blocks.resize(idx.size());
    cl.bytes = std::max<size_t>(dynamicShared, 1024);
    cl.saved.assign(idx.size(), std::vector<unsigned char>(cl.bytes, (unsigned char)shared_fill_()));
    memset(fa_shared, shared_fill_(), cl.bytes);
    for (size_t r = 0; r < idx.size(); r++) {
        cl.blocks[r].rank = (int)r;
        cl.blocks[r].idx = idx[r];
        setup_block_(cl.blocks[r], block, body, arg);
        cl.live += cl.blocks[r].threads;
    }
    int done = 0, total = (int)cl.live;
    while (done < total) {
        // One pass over the threads (the lagging ones, or the others), each runnable one run
        // until it waits; whether any ran.
        auto pass = [&](bool lagging) {
            bool ran = false;
            for (Block& b : cl.blocks)
                for (int t = 0; t < b.threads; t++) {
                    Fiber& f = b.fibers[t];
                    const bool lags = t >= laggingFrom && t <= laggingTo && (laggingRank < 0 || laggingRank == b.rank);
                    if (lags != lagging) continue;
                    if (f.done || (f.waitOn && *f.waitOn == f.waitFor)) continue;
                    f.waitOn = nullptr;
                    block_ = &b;
                    enter_(b.rank);
                    blockIdx = b.idx;
                    b.current = t;
                    threadIdx = f.tid;
                    ran = true;
#if defined(__x86_64__)
                    emu_switch_context(&b.scheduler, f.sp);
#else
                    swapcontext(&b.scheduler, &f.context);
#endif
                    if (f.done) done++;
                }
            return ran;
        };
        bool ran = pass(false) || pass(true);
        if (!ran) {
            for (Block& b : cl.blocks) {
                auto where = [&](int t) {
                    const Fiber& f = b.fibers[t];
                    if (f.done) return "(finished)";
                    for (auto* cs : {&b.warps, &b.groups})
                        for (auto& c : *cs)
                            if (f.waitOn == &c.gen) return c.name;
                    for (auto& c : b.named)
                        if (f.waitOn == &c.gen) return c.name;
                    for (auto& [at, m] : b.mbarriers)
                        if (f.waitOn == &m.phase) return "an mbarrier's phase";
                    if (f.waitOn == &cl.phase) return "barrier.cluster";
                    return f.waitOn == &b.barrier.gen ? b.barrier.name : "?";
                };
                for (int t = 0, u; t < b.threads; t = u) {  // runs of threads at the same place
                    for (u = t + 1; u < b.threads && !strcmp(where(u), where(t)); u++) {}
                    if (cl.blocks.size() > 1) fprintf(stderr, "emu: block rank %d, threads %d-%d: %s\n", b.rank, t, u - 1, where(t));
                    else fprintf(stderr, "emu: threads %d-%d: %s\n", t, u - 1, where(t));
                }
            }
            threadIdx = {0, 0, 0};
            die("deadlock: every thread left waits at a collective the others do not reach");
        }
    }
    for (Block& b : cl.blocks) {
        block_ = &b;
        blockIdx = b.idx;
        for (const WgmmaQueue& q : b.wgmmas)
            if (!q.open.empty() || !q.groups.empty()) die("a block ended with wgmma instructions never waited for");
        for (auto& [at, m] : b.mbarriers) {
            if (!m.copies.empty()) die("a block ended with copies whose mbarrier phase never completed");
            if (m.tx != 0) die("a block ended with an mbarrier whose expected transaction bytes and TMA copies differ");
        }
    }
    block_ = nullptr;
    cluster_ = nullptr;
}

// Runs the grid's clusters (of clusterX blocks along x; 1: each block alone) a few at a time.
inline void run_grid_(dim3 grid, dim3 block, size_t shared, void (*body)(void*), void* arg, unsigned clusterX = 1) {
    if (shared > EMU_SHARED_BYTES) die("more dynamic shared memory than the emulator's arena");
    if (block.x * block.y * block.z > 1024) die("more than 1024 threads a block");
    if (clusterX < 1 || clusterX > 8 || grid.x % clusterX) die("a cluster of 1 to 8 blocks along x, dividing the grid's x");
    long blocks = (long)grid.x * grid.y * grid.z / clusterX;
    static int workers = [] {
        const char* e = getenv("EMU_THREADS");
        return e ? std::max(1, atoi(e)) : 1;
    }();
    std::atomic<long> next{0};
    auto work = [&] {
        gridDim = grid;
        blockDim = block;
        dynamicShared = shared;
        for (long u; (u = next.fetch_add(1)) < blocks;) {
            std::vector<uint3> idx;
            for (unsigned r = 0; r < clusterX; r++) {
                long i = u * clusterX + r;
                idx.push_back({(unsigned)(i % grid.x), (unsigned)((i / grid.x) % grid.y), (unsigned)(i / ((long)grid.x * grid.y))});
            }
            run_cluster_(block, body, arg, idx);
        }
    };
    if (workers == 1 || blocks == 1) {
        work();
        return;
    }
    std::vector<std::thread> pool;
    for (int w = 0; w < std::min<long>(workers, blocks); w++) pool.emplace_back(work);
    for (auto& t : pool) t.join();
}

// Runs kernel over grid x block threads with `shared` bytes of dynamic shared memory, in clusters
// of clusterX blocks along x (a launch with cudaLaunchAttributeClusterDimension); the arguments are
// converted to the kernel's parameter types as a launch would.
template <class... P, class... A>
void launch_cluster(void (*kernel)(P...), dim3 grid, unsigned clusterX, dim3 block, size_t shared, A... args) {
    static_assert(sizeof...(P) == sizeof...(A), "the kernel's argument count");
    struct Call {
        void (*kernel)(P...);
        std::tuple<P...> args;
    } call{kernel, std::tuple<P...>((P)args...)};
    run_grid_(grid, block, shared, [](void* c) {
        Call* call = (Call*)c;
        std::apply(call->kernel, call->args);
    }, &call, clusterX);
}

template <class... P, class... A> void launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t shared, A... args) {
    launch_cluster(kernel, grid, 1, block, shared, args...);
}

inline Collective& warp_() { return block_->warps[block_->current / 32]; }
inline int lane_() { return block_->current & 31; }

// Shuffles and votes: each lane leaves its value and the lane it reads.
struct Shuffle {
    uint64_t value, result;
    int src;
};

inline void shuffle_op_(Collective& c) {
    uint64_t v[32];
    for (int l = 0; l < 32; l++)
        if ((c.arrivedMask >> l) & 1) v[l] = ((Shuffle*)c.args[l])->value;
    for (int l = 0; l < 32; l++) {
        if (!((c.arrivedMask >> l) & 1)) continue;
        Shuffle* s = (Shuffle*)c.args[l];
        s->result = ((c.arrivedMask >> s->src) & 1) ? v[s->src] : s->value;  // an absent source: the lane's own value
    }
}

template <class T> inline T shuffle_(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= 8);
    Shuffle s{0, 0, src};
    memcpy(&s.value, &v, sizeof v);
    arrive_(warp_(), shuffle_op_, "a shuffle", &s, mask);
    T r;
    memcpy(&r, &s.result, sizeof r);
    return r;
}

inline void vote_op_(Collective& c) {
    uint64_t ballot = 0;
    for (int l = 0; l < 32; l++)
        if ((c.arrivedMask >> l) & 1) ballot |= (uint64_t)(((Shuffle*)c.args[l])->value != 0) << l;
    for (int l = 0; l < 32; l++)
        if ((c.arrivedMask >> l) & 1) ((Shuffle*)c.args[l])->result = ballot;
}

inline unsigned ballot_(unsigned mask, int p) {
    Shuffle s{(uint64_t)(p != 0), 0, 0};
    arrive_(warp_(), vote_op_, "a vote", &s, mask);
    return (unsigned)s.result & mask;
}

inline void nothing_op_(Collective&) {}
}  // namespace emu

template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int l = emu::lane_();
    return emu::shuffle_(mask, v, (l & ~(width - 1)) + (src & (width - 1)));
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    int l = emu::lane_(), s = l ^ m;
    return emu::shuffle_(mask, v, s >= (l & ~(width - 1)) + width ? l : s);
}
template <class T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    int l = emu::lane_();
    return emu::shuffle_(mask, v, (l & (width - 1)) >= (int)d ? l - (int)d : l);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    int l = emu::lane_();
    return emu::shuffle_(mask, v, (l & (width - 1)) + (int)d < width ? l + (int)d : l);
}
inline unsigned __ballot_sync(unsigned mask, int p) { return emu::ballot_(mask, p); }
inline int __any_sync(unsigned mask, int p) { return emu::ballot_(mask, p) != 0; }
inline int __all_sync(unsigned mask, int p) { return emu::ballot_(mask, p) == (mask & emu::warp_().liveMask); }
inline void __syncwarp(unsigned mask = 0xffffffff) { emu::arrive_(emu::warp_(), emu::nothing_op_, "__syncwarp", nullptr, mask); }
inline void __syncthreads() { emu::arrive_(emu::block_->barrier, emu::nothing_op_, "__syncthreads", nullptr); }

// ---------------------------------------------------------------------------------------------
// Tensor-core instructions (PTX ISA: ldmatrix, mma.sync m16n8k16, wgmma.mma_async m64nNk16).

namespace emu {
enum class Type { f16, bf16 };

inline float widen_(unsigned short v, Type t) { return t == Type::f16 ? half_bits_to_float(v) : bf16_bits_to_float(v); }
inline unsigned short lo16_(unsigned r) { return (unsigned short)(r & 0xffff); }
inline unsigned short hi16_(unsigned r) { return (unsigned short)(r >> 16); }

// ldmatrix.sync.aligned.m8n8.x4(.trans).shared.b16: lane l gives the address of row l % 8 of
// matrix l / 8 (16 bytes); register j of lane l gets matrix j's elements (row l / 4, columns
// 2 (l % 4) and + 1), or with .trans (rows 2 (l % 4) and + 1, column l / 4), the lower column
// (row) in the low half.
struct LdMatrix {
    const unsigned char* p;
    unsigned* r;
    bool trans;
};

inline void ldmatrix_op_(Collective& c) {
    if (c.arrivedMask != 0xffffffffu) die("ldmatrix without all 32 lanes");
    unsigned short m[4][8][8];
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 8; i++) {
            const unsigned char* p = ((LdMatrix*)c.args[8 * j + i])->p;
            if ((uintptr_t)p & 15) die("ldmatrix: a row address not 16-byte aligned");
            memcpy(m[j][i], p, 16);
        }
    for (int l = 0; l < 32; l++) {
        LdMatrix* a = (LdMatrix*)c.args[l];
        for (int j = 0; j < 4; j++) {
            unsigned short x, y;
            if (!a->trans) { x = m[j][l / 4][2 * (l % 4)]; y = m[j][l / 4][2 * (l % 4) + 1]; }
            else { x = m[j][2 * (l % 4)][l / 4]; y = m[j][2 * (l % 4) + 1][l / 4]; }
            a->r[j] = x | ((unsigned)y << 16);
        }
    }
}

inline void ldmatrix_x4_(unsigned (&r)[4], const void* p, bool trans) {
    LdMatrix a{(const unsigned char*)p, r, trans};
    Collective& w = warp_();
    arrive_(w, ldmatrix_op_, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", &a);
}

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32, with g = lane / 4 and c = lane % 4: A (16 x 16)
// a0 (g, 2c..2c+1), a1 (g+8, 2c..), a2 (g, 2c+8..), a3 (g+8, 2c+8..); B (16 x 8) b0 (k 2c..2c+1,
// n g), b1 (k 2c+8.., n g); C and D (16 x 8) c0, c1 (g, 2c..2c+1), c2, c3 (g+8, 2c..2c+1).
// Products (exact in f32) are summed in double, rounded once to f32 with C added.
struct Mma {
    const unsigned* a;
    unsigned b0, b1;
    float* c;
};

template <Type T> inline void mma_op_(Collective& c) {
    if (c.arrivedMask != 0xffffffffu) die("mma.sync without all 32 lanes");
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; l++) {
        Mma* m = (Mma*)c.args[l];
        int g = l / 4, q = l % 4;
        for (int h = 0; h < 2; h++) {
            A[g][2 * q + h] = widen_(h ? hi16_(m->a[0]) : lo16_(m->a[0]), T);
            A[g + 8][2 * q + h] = widen_(h ? hi16_(m->a[1]) : lo16_(m->a[1]), T);
            A[g][2 * q + 8 + h] = widen_(h ? hi16_(m->a[2]) : lo16_(m->a[2]), T);
            A[g + 8][2 * q + 8 + h] = widen_(h ? hi16_(m->a[3]) : lo16_(m->a[3]), T);
            B[2 * q + h][g] = widen_(h ? hi16_(m->b0) : lo16_(m->b0), T);
            B[2 * q + 8 + h][g] = widen_(h ? hi16_(m->b1) : lo16_(m->b1), T);
            C[g][2 * q + h] = m->c[h];
            C[g + 8][2 * q + h] = m->c[2 + h];
        }
    }
    for (int l = 0; l < 32; l++) {
        Mma* m = (Mma*)c.args[l];
        int g = l / 4, q = l % 4;
        for (int e = 0; e < 4; e++) {
            int row = g + 8 * (e >> 1), col = 2 * q + (e & 1);
            double s = 0;
            for (int k = 0; k < 16; k++) s += (double)(A[row][k] * B[k][col]);
            m->c[e] = (float)(C[row][col] + s);
        }
    }
}

template <Type T> inline void mma_(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    Mma m{a, b0, b1, c};
    arrive_(warp_(), mma_op_<T>, T == Type::f16 ? "mma.sync.f16" : "mma.sync.bf16", &m);
}

// wgmma's shared-memory matrix descriptor: start address (bits 0-13), leading (16-29) and
// stride (32-45) byte offsets, all in 16-byte units; base offset (49-51); swizzle (62-63: 0
// none, 1 128-byte, 2 64-byte, 3 32-byte). The byte address of element (mn, k) of a 16-bit
// operand tile (mn along M or N, k along K, k < 16):
// - K-major (no transpose): eight-row groups along MN `stride` apart. Without swizzling a row's
//   8-element core-matrix rows are 16 bytes, the two along K `leading` apart; swizzled, a row is
//   one line of the swizzle's width (its 16 values contiguous).
// - MN-major (transpose): without swizzling 8-element columns of MN, their 8-column groups
//   `stride` apart, eight k rows 16 bytes apart, 8-k groups `leading` apart; swizzled, each k is
//   a line of the swizzle's width of consecutive MN values, lines `leading` apart along MN and
//   8-k groups `stride` apart.
// Swizzling XORs the address's bits 4-6 (128-byte: three, 64-byte: two, 32-byte: one of them)
// with bits 7-9, on the shared address itself: a tile must start on the pattern's period for the
// rows to match it, which is why the start may move within a line (k steps) and the base offset
// is left 0 (the emulator stops otherwise).
inline const unsigned char* desc_element_(unsigned long long desc, int mn, int k, bool mnMajor) {
    unsigned start = (unsigned)(desc & 0x3FFF) << 4, leading = (unsigned)((desc >> 16) & 0x3FFF) << 4,
             stride = (unsigned)((desc >> 32) & 0x3FFF) << 4;
    int base = (int)((desc >> 49) & 7), mode = (int)(desc >> 62);
    if (base) die("wgmma: a descriptor with a base offset, which the emulator does not take");
    unsigned width = mode == 1 ? 128 : mode == 2 ? 64 : mode == 3 ? 32 : 0, off;
    if (!mnMajor) {
        off = width ? (mn / 8) * stride + (mn % 8) * width + 2 * k : (mn / 8) * stride + (mn % 8) * 16 + (k / 8) * leading + (k % 8) * 2;
    } else if (width) {
        unsigned line = width / 2;  // MN values a line
        off = (mn / line) * leading + (mn % line) * 2 + (k / 8) * stride + (k % 8) * width;
    } else {
        off = (mn / 8) * stride + (mn % 8) * 2 + (k / 8) * leading + (k % 8) * 16;
    }
    unsigned a = start + off;
    if (width) a ^= ((a >> 7) & (width / 16 - 1)) << 4;
    if (a + 2 > EMU_SHARED_BYTES) die("wgmma: an operand outside shared memory");
    return fa_shared + a;
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.T.T: D (64 x N, f32) = A (64 x 16) * B (16 x N)
// (+ D when scale-d). A from a descriptor (`aRegs` null) or from registers (warp w of the
// warpgroup holding rows 16w ..< 16w + 16 in mma.sync's A layout); B from a descriptor. The
// accumulator: register i of a thread is d[i / 4][i % 4], d[n][e] at row 16w + lane / 4 + 8 (e >> 1),
// column 8n + 2 (lane & 3) + (e & 1). Queued once the warpgroup's 128 threads have all issued it,
// and run (reading shared memory and the A registers then) when a wgmma_wait completes its group.
struct Wgmma {
    unsigned long long a, b;
    const unsigned* aRegs;
    float* d;
    int accumulate;
};

// Whether asynchronous work (cp.async, wgmma) happens at issue instead of when its wait lets it
// (EMU_EAGER_ASYNC=1): the late completion is the default because it is the strictest order the
// hardware allows, so a missing or short wait, a buffer refilled while a wgmma still reads it, or
// registers changed before the wait show as wrong results.
inline bool eager_async_() {
    static bool eager = [] {
        const char* e = getenv("EMU_EAGER_ASYNC");
        return e && atoi(e) != 0;
    }();
    return eager;
}

// Runs a wgmma: A from its descriptor or the threads' registers, B from its descriptor, as they
// are now; the threads' accumulators read (scale-d) and written.
template <int N, Type T, bool TransA, bool TransB, int ScaleA, int ScaleB> inline void wgmma_run_(const PendingWgmma& w) {
    static thread_local float A[64][16], B[N][16];  // B by column: the sums read both rows contiguously
    static thread_local double D[64][N];
    bool regs = w.aRegs[0] != nullptr;
    for (int t = 0; regs && t < 128; t++) {
        const unsigned* a = w.aRegs[t];
        int l = t & 31, r = 16 * (t >> 5) + l / 4, q = l % 4;
        for (int h = 0; h < 2; h++) {
            A[r][2 * q + h] = widen_(h ? hi16_(a[0]) : lo16_(a[0]), T) * ScaleA;
            A[r + 8][2 * q + h] = widen_(h ? hi16_(a[1]) : lo16_(a[1]), T) * ScaleA;
            A[r][2 * q + 8 + h] = widen_(h ? hi16_(a[2]) : lo16_(a[2]), T) * ScaleA;
            A[r + 8][2 * q + 8 + h] = widen_(h ? hi16_(a[3]) : lo16_(a[3]), T) * ScaleA;
        }
    }
    unsigned short v;
    if (!regs)
        for (int m = 0; m < 64; m++)
            for (int k = 0; k < 16; k++) {
                memcpy(&v, desc_element_(w.a, m, k, TransA), 2);
                A[m][k] = widen_(v, T) * ScaleA;
            }
    for (int k = 0; k < 16; k++)
        for (int n = 0; n < N; n++) {
            memcpy(&v, desc_element_(w.b, n, k, TransB), 2);
            B[n][k] = widen_(v, T) * ScaleB;
        }
    // 16-bit products are exact in f32; their sum is taken in double, rounded once with D added.
    for (int m = 0; m < 64; m++)
        for (int n = 0; n < N; n++) {
            double s = 0;
            for (int k = 0; k < 16; k++) s += (double)(A[m][k] * B[n][k]);
            D[m][n] = s;
        }
    for (int t = 0; t < 128; t++) {
        float* d = w.d[t];
        int l = t & 31, r = 16 * (t >> 5) + l / 4, q = l % 4;
        for (int n = 0; n < N / 8; n++)
            for (int e = 0; e < 4; e++) {
                int row = r + 8 * (e >> 1), col = 8 * n + 2 * q + (e & 1);
                d[4 * n + e] = (float)((w.accumulate ? d[4 * n + e] : 0.0) + D[row][col]);
            }
    }
}

// The last of the warpgroup's 128 threads to issue a wgmma queues it for the group's next
// commit (or runs it, eagerly).
template <int N, Type T, bool TransA, bool TransB, int ScaleA, int ScaleB> inline void wgmma_issue_op_(Collective& c) {
    if (c.arrived != 128) die("wgmma without the warpgroup's 128 threads");
    const Wgmma& w0 = *(const Wgmma*)c.args[0];
    PendingWgmma p;
    p.run = wgmma_run_<N, T, TransA, TransB, ScaleA, ScaleB>;
    p.a = w0.a;
    p.b = w0.b;
    p.accumulate = w0.accumulate;
    for (int t = 0; t < 128; t++) {
        const Wgmma& w = *(const Wgmma*)c.args[t];
        if ((!w0.aRegs && w.a != w0.a) || w.b != w0.b || w.accumulate != w0.accumulate || !w.aRegs != !w0.aRegs)
            die("wgmma: the warpgroup's threads gave different descriptors or scale-d");
        p.aRegs[t] = w.aRegs;
        p.d[t] = w.d;
    }
    if (eager_async_()) p.run(p);
    else block_->wgmmas[c.base / 128].open.push_back(p);
}

inline void wgmma_commit_op_(Collective& c) {
    WgmmaQueue& q = block_->wgmmas[c.base / 128];
    q.groups.push_back(std::move(q.open));
    q.open.clear();
}

// wgmma.wait_group N: every committed group but the newest N completes, oldest first.
template <int N> inline void wgmma_wait_op_(Collective& c) {
    WgmmaQueue& q = block_->wgmmas[c.base / 128];
    while (q.groups.size() > (size_t)N) {
        for (const PendingWgmma& p : q.groups.front()) p.run(p);
        q.groups.pop_front();
    }
}

inline Collective& group_() {
    Block& b = *block_;
    if (b.groups.empty()) die("wgmma in a block whose threads are not whole warpgroups");
    return b.groups[b.current / 128];
}

// The generic wgmma: A from a descriptor (TransA: MN-major) or registers (aRegs), B from a
// descriptor (TransB: MN-major); ScaleA and ScaleB are the instruction's imm-scale-a/b (1 or -1).
template <int N, Type T, bool TransA, bool TransB, int ScaleA = 1, int ScaleB = 1>
inline void wgmma(float (&d)[N / 8][4], unsigned long long a, const unsigned* aRegs, unsigned long long b, int accumulate) {
    static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma's N: a multiple of 8 up to 256");
    Wgmma w{a, b, aRegs, &d[0][0], accumulate != 0};
    arrive_(group_(), wgmma_issue_op_<N, T, TransA, TransB, ScaleA, ScaleB>, "wgmma.mma_async", &w);
}

inline void wgmma_commit_() { arrive_(group_(), wgmma_commit_op_, "wgmma.commit_group", nullptr); }
template <int N> inline void wgmma_wait_() { arrive_(group_(), wgmma_wait_op_<N>, "wgmma.wait_group", nullptr); }

// cp.async.cg.shared.global, 16 bytes (zeros when !in): the source read at issue, the bytes
// landing when a copy_wait lets the group holding them complete (or at issue, eagerly).
inline void copy16_(void* dst, const void* src, bool in) {
    if (((uintptr_t)dst | (in ? (uintptr_t)src : 0)) & 15) die("cp.async: an address not 16-byte aligned");
    Fiber::Copy c;
    c.dst = (unsigned char*)dst;
    if (in) memcpy(c.bytes, src, 16);
    else memset(c.bytes, 0, 16);
    if (eager_async_()) {
        memcpy(c.dst, c.bytes, 16);
    } else {
        // Until the copy lands, its destination holds neither what it held nor what is coming, so
        // a read before the wait, or a refill of a buffer that an issued wgmma has yet to read,
        // shows as NaNs (the wgmma runs at its wait, after the refill was issued).
        memset(c.dst, 0xff, 16);
        block_->fibers[block_->current].openCopies.push_back(c);
    }
}

inline void copy_commit_() {
    Fiber& f = block_->fibers[block_->current];
    f.copyGroups.push_back(std::move(f.openCopies));
    f.openCopies.clear();
}

// cp.async.wait_group N: the thread's committed groups but the newest N land, oldest first.
template <int N> inline void copy_wait_() {
    Fiber& f = block_->fibers[block_->current];
    while (f.copyGroups.size() > (size_t)N) {
        land_copies_(f.copyGroups.front());
        f.copyGroups.pop_front();
    }
}

// Named barriers (bar.sync / bar.arrive id, threads): `threads` (a multiple of 32) arrivals
// complete one; bar.sync waits for that, bar.arrive does not.
inline Collective& named_(int id, int threads) {
    Block& b = *block_;
    if (id < 1 || id > 15) die("a named barrier's id outside 1-15");
    if (threads <= 0 || threads % 32 || threads > b.threads) die("a named barrier's thread count: a multiple of 32, at most the block's");
    Collective& c = b.named[id];
    if (c.arrived == 0) {
        c.size = b.threads;
        c.live = threads;
    } else if (c.live != threads) {
        die("a named barrier reached with different thread counts");
    }
    return c;
}

inline void named_sync_(int id, int threads) { arrive_(named_(id, threads), nothing_op_, "bar.sync", nullptr); }

inline void named_arrive_(int id, int threads) {
    Collective& c = named_(id, threads);
    if (c.op && c.op != nothing_op_) die("bar.arrive at a barrier others wait at for something else");
    c.op = nothing_op_;
    c.name = "bar.sync";
    if (++c.arrived == c.live) finish_(c);
}

// mbarriers: init sets the arrivals a phase expects; the last of them completes the phase, once
// its transaction bytes are in too (complete_if_done_: the copies bound to it land, the phase
// count goes up); a wait for parity p returns once the phase
// of that parity has completed, i.e. while the current phase's parity is p it waits.
inline Mbarrier& mbarrier_(const void* bar) {
    auto it = block_->mbarriers.find(bar);
    if (it == block_->mbarriers.end()) die("an mbarrier used before mbarrier.init");
    return it->second;
}

inline void mbarrier_init_(unsigned long long* bar, unsigned count) {
    if ((uintptr_t)bar & 7) die("an mbarrier not 8-byte aligned");
    if (count == 0) die("mbarrier.init with a count of 0");
    Mbarrier& m = block_->mbarriers[bar];
    if (!m.copies.empty()) die("mbarrier.init over copies still bound to it");
    m = Mbarrier{count, count, 0, 0, {}};
    *bar = 0;
}

// Completes m's phase (block `rank`'s barrier) once its arrivals are in and its transaction
// bytes have landed: the copies bound to it land, the phase count goes up.
inline void complete_if_done_(Mbarrier& m, int rank) {
    if (m.pending == 0 && m.tx == 0) {
        land_copies_(m.copies, rank);
        m.phase++;
        m.pending = m.expected;
    }
}

// An arrival on m, block `rank`'s barrier.
inline void arrive_on_(Mbarrier& m, int rank) {
    if (m.pending == 0) die("an mbarrier arrival its phase does not expect");
    m.pending--;
    complete_if_done_(m, rank);
}

inline void mbarrier_arrive_(const void* bar) { arrive_on_(mbarrier_(bar), block_->rank); }

inline void mbarrier_wait_(const void* bar, unsigned parity) {
    Mbarrier& m = mbarrier_(bar);
    while ((m.phase & 1) == (parity & 1)) {
        Fiber& f = block_->fibers[block_->current];
        f.waitOn = &m.phase;
        f.waitFor = m.phase;
        yield_();
    }
}

// cp.async.mbarrier.arrive.noinc: every cp.async the thread has issued and not yet seen land is
// bound to the barrier's phase (landing when it completes), and the thread arrives once.
inline void copy_arrive_(const void* bar) {
    Mbarrier& m = mbarrier_(bar);
    Fiber& f = block_->fibers[block_->current];
    for (auto& g : f.copyGroups) {
        m.copies.insert(m.copies.end(), g.begin(), g.end());
        g.clear();
    }
    m.copies.insert(m.copies.end(), f.openCopies.begin(), f.openCopies.end());
    f.openCopies.clear();
    mbarrier_arrive_(bar);
}

// mbarrier.arrive.expect_tx: the phase expects `bytes` more transaction bytes, then the thread
// arrives.
inline void arrive_expect_tx_(const void* bar, unsigned bytes) {
    Mbarrier& m = mbarrier_(bar);
    m.tx += bytes;
    arrive_on_(m, block_->rank);
}

// A 2-D tensor map as the emulator keeps it in CUtensorMap's 128 bytes (emu_encode_tensor_map_2d
// makes it as cuTensorMapEncodeTiled would the driver's): the tensor's address, its dimensions
// (elements, innermost first), the stride of its rows in bytes, the box, the element's bytes and
// the swizzle's span in bytes (0: none).
struct TensorMap2D {
    unsigned long long magic;
    const unsigned char* address;
    unsigned long long dim0, dim1, stride1, box0, box1, elementBytes, swizzle;
};
constexpr unsigned long long TENSOR_MAP_MAGIC = 0x3250414d524f534eull;

// cp.async.bulk.tensor.2d...tile.mbarrier::complete_tx::bytes: the box whose first element is
// (c0, c1), elements outside the tensor as zeros, written as the hardware does: row r of the box
// at r times its row's bytes, and with the 128-byte swizzle each 16-byte piece's index (address
// bits 4-6) XORed with the address's bits 7-9, so a destination not 1,024-byte aligned shows as
// a different layout. The bytes land when the barrier's phase completes (or at issue, eagerly)
// and count against its transaction bytes; until then the destination reads as NaNs.
inline void tma_load_2d_(void* dst, const void* mapBytes, int c0, int c1, const void* bar) {
    TensorMap2D map;
    memcpy(&map, mapBytes, sizeof map);
    if (map.magic != TENSOR_MAP_MAGIC) die("a TMA copy through a tensor map that emu_encode_tensor_map_2d did not make");
    if ((uintptr_t)mapBytes % 64) die("a tensor map not 64-byte aligned");
    size_t at = __cvta_generic_to_shared(dst);
    if (at % 128) die("a TMA copy to shared memory not 128-byte aligned");
    const unsigned long long rowBytes = map.box0 * map.elementBytes, perPiece = 16 / map.elementBytes;
    if (at + map.box1 * rowBytes > dynamicShared) die("a TMA copy past the launch's shared memory");
    Mbarrier& m = mbarrier_(bar);
    for (unsigned long long r = 0; r < map.box1; r++)
        for (unsigned long long j = 0; j < rowBytes / 16; j++) {
            Fiber::Copy c;
            for (unsigned long long i = 0; i < perPiece; i++) {
                long long e = (long long)c0 + (long long)(j * perPiece + i), row = (long long)c1 + (long long)r;
                unsigned char* to = c.bytes + i * map.elementBytes;
                if (e >= 0 && row >= 0 && (unsigned long long)e < map.dim0 && (unsigned long long)row < map.dim1)
                    memcpy(to, map.address + row * map.stride1 + e * map.elementBytes, map.elementBytes);
                else
                    memset(to, 0, map.elementBytes);
            }
            size_t a = at + r * rowBytes + 16 * j;
            if (map.swizzle == 128) a ^= ((a >> 7) & 7) << 4;
            c.dst = fa_shared + a;
            if (eager_async_()) {
                memcpy(c.dst, c.bytes, 16);
            } else {
                memset(c.dst, 0xff, 16);
                m.copies.push_back(c);
            }
        }
    m.tx -= (long)(map.box1 * rowBytes);
    complete_if_done_(m, block_->rank);
}

// Clusters (distributed shared memory). A shared::cluster address (mapa's result) is, here,
// (rank + 1) << 20 | the shared address in block `rank`.
inline unsigned cluster_map_(unsigned address, unsigned rank) {
    if (rank >= cluster_->blocks.size()) die("mapa: a rank outside the cluster");
    if (address >= (1u << 20)) die("mapa: not a shared-memory address");
    return (rank + 1) << 20 | address;
}

// Block `rank` and the bytes at a shared::cluster address, checked: in the cluster, aligned, within
// the launch's shared memory, of a block that has not exited.
inline unsigned char* cluster_bytes_(unsigned address, unsigned bytes, int* rankOut = nullptr) {
    Cluster& cl = *cluster_;
    int rank = (int)(address >> 20) - 1;
    unsigned at = address & ((1u << 20) - 1);
    if (rank < 0 || rank >= (int)cl.blocks.size()) die("a shared::cluster address of no block in the cluster");
    if (at % bytes) die("a shared::cluster access not aligned to its size");
    if (at + bytes > cl.bytes) die("a shared::cluster access past the launch's shared memory");
    if (cl.blocks[rank].exited == cl.blocks[rank].threads) die("distributed shared memory of a block whose threads have all exited");
    if (rankOut) *rankOut = rank;
    return arena_(rank) + at;
}

inline void cluster_arrive_() {
    Cluster& cl = *cluster_;
    block_->fibers[block_->current].clusterPhase = cl.phase;
    if (++cl.arrivals == cl.live) {
        cl.arrivals = 0;
        cl.phase++;
    }
}

inline void cluster_wait_() {
    Cluster& cl = *cluster_;
    Fiber& f = block_->fibers[block_->current];
    while (cl.phase == f.clusterPhase) {
        f.waitOn = &cl.phase;
        f.waitFor = f.clusterPhase;
        yield_();
    }
}

// mbarrier.arrive on a barrier of any block of the cluster.
inline void mbarrier_arrive_cluster_(unsigned address) {
    int rank;
    unsigned char* p = cluster_bytes_(address, 8, &rank);
    Block& b = cluster_->blocks[rank];
    auto it = b.mbarriers.find(fa_shared + (p - arena_(rank)));
    if (it == b.mbarriers.end()) die("a remote mbarrier arrival before its mbarrier.init");
    arrive_on_(it->second, rank);
}
}  // namespace emu

// ---------------------------------------------------------------------------------------------
// Kernels.cu's inline-assembly helpers (left out of it under PEREGRINE_CUDA_EMULATOR), with the
// same names and signatures. A new helper's wrapper is a line over emu::wgmma or emu::mma_.

inline void copy16_async(void* dst, const void* src, bool in) { emu::copy16_(dst, src, in); }
inline void copy_commit() { emu::copy_commit_(); }
template <int N> inline void copy_wait() { emu::copy_wait_<N>(); }
// bar.sync id, threads / bar.arrive id, threads.
inline void named_barrier_sync(int id, int threads) { emu::named_sync_(id, threads); }
inline void named_barrier_arrive(int id, int threads) { emu::named_arrive_(id, threads); }
// mbarrier.init.shared::cta.b64, mbarrier.arrive.shared::cta.b64, a loop of
// mbarrier.try_wait.parity.shared::cta.b64, and cp.async.mbarrier.arrive.noinc.shared::cta.b64.
inline void mbarrier_init(unsigned long long* bar, unsigned count) { emu::mbarrier_init_(bar, count); }
inline void mbarrier_arrive(unsigned long long* bar) { emu::mbarrier_arrive_(bar); }
inline void mbarrier_wait(unsigned long long* bar, unsigned parity) { emu::mbarrier_wait_(bar, parity); }
inline void copy_arrive(unsigned long long* bar) { emu::copy_arrive_(bar); }
// fence.mbarrier_init (nothing to order here), mbarrier.arrive.expect_tx.shared::cta.b64 and the
// TMA's 2-D tile copy (cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes).
inline void fence_mbarrier_init() {}
inline void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) { emu::arrive_expect_tx_(bar, bytes); }
inline void tma_load_2d(void* dst, const void* map, int c0, int c1, unsigned long long* bar) { emu::tma_load_2d_(dst, map, c0, c1, bar); }
// The emulator's cuTensorMapEncodeTiled for a 2-D tensor (rank 2, element strides 1, no
// interleave), with the driver's checks on what it is given; swizzle in bytes (0, 32, 64, 128).
inline void emu_encode_tensor_map_2d(void* map, const void* address, unsigned long long dim0, unsigned long long dim1, unsigned long long stride1,
                                     unsigned box0, unsigned box1, unsigned elementBytes, unsigned swizzle) {
    if ((uintptr_t)map % 64) emu::die("a tensor map not 64-byte aligned");
    if ((uintptr_t)address % 16) emu::die("a tensor map's address not 16-byte aligned");
    if (stride1 % 16 || stride1 < dim0 * elementBytes) emu::die("a tensor map's row stride not a multiple of 16 bytes, or shorter than a row");
    if (box0 == 0 || box1 == 0 || box0 > 256 || box1 > 256) emu::die("a tensor map's box dimension outside 1-256");
    if ((box0 * elementBytes) % 16) emu::die("a tensor map's inner box not a multiple of 16 bytes");
    if (swizzle != 0 && swizzle != 32 && swizzle != 64 && swizzle != 128) emu::die("a tensor map's swizzle not 0, 32, 64 or 128 bytes");
    if (swizzle && box0 * elementBytes > swizzle) emu::die("a tensor map's inner box wider than its swizzle's span");
    if (swizzle && swizzle != 128) emu::die("the emulator models the 128-byte swizzle only");
    if (swizzle == 128 && box0 * elementBytes != 128) emu::die("the emulator models the 128-byte swizzle over 128-byte rows only");
    emu::TensorMap2D m{emu::TENSOR_MAP_MAGIC, (const unsigned char*)address, dim0, dim1, stride1, box0, box1, elementBytes, swizzle};
    memset(map, 0, 128);
    memcpy(map, &m, sizeof m);
}
// cp.async.bulk.global.shared::cta.bulk_group and cp.reduce.async.bulk...add.f32 (done at once,
// the sum of each float atomic as in L2), cp.async.bulk.commit_group and wait_group.read 0.
namespace emu {
inline void bulk_check_(const void* dst, const void* src, unsigned bytes) {
    if (bytes % 16 || (uintptr_t)dst % 16 || (uintptr_t)src % 16) die("a bulk copy of a size or at an address not a multiple of 16");
}
}  // namespace emu
inline void bulk_store(void* dst, const void* src, unsigned bytes) {
    emu::bulk_check_(dst, src, bytes);
    memcpy(dst, src, bytes);
}
inline void bulk_reduce_add(float* dst, const float* src, unsigned bytes) {
    emu::bulk_check_(dst, src, bytes);
    for (unsigned i = 0; i < bytes / 4; i++) atomicAdd(dst + i, src[i]);
}
inline void bulk_commit() {}
inline void bulk_wait_read() {}
// setmaxnreg.dec / .inc: registers are not modelled.
template <int N> inline void registers_down() { static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg's range"); }
template <int N> inline void registers_up() { static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg's range"); }
// Clusters (no kernel of Kernels.cu uses them now; its helpers would wrap the PTX named here):
// %cluster_ctarank and %cluster_nctarank; barrier.cluster.arrive.release and
// barrier.cluster.wait.acquire; mapa.shared::cluster.u32; st.shared::cluster.u32 and .v4.u32,
// ld.shared::cluster.u32; mbarrier.arrive.release.cluster.shared::cluster.b64 (an arrival on
// another block's barrier, completing its phase and landing the copies bound to it there).
inline unsigned cluster_rank() { return (unsigned)emu::block_->rank; }
inline unsigned cluster_blocks() { return (unsigned)emu::cluster_->blocks.size(); }
inline void cluster_arrive() { emu::cluster_arrive_(); }
inline void cluster_wait() { emu::cluster_wait_(); }
inline void cluster_sync() {
    emu::cluster_arrive_();
    emu::cluster_wait_();
}
inline unsigned cluster_map(unsigned address, unsigned rank) { return emu::cluster_map_(address, rank); }
inline void cluster_store(unsigned address, unsigned v) { memcpy(emu::cluster_bytes_(address, 4), &v, 4); }
inline void cluster_store(unsigned address, uint4 v) { memcpy(emu::cluster_bytes_(address, 16), &v, 16); }
inline unsigned cluster_load(unsigned address) {
    unsigned v;
    memcpy(&v, emu::cluster_bytes_(address, 4), 4);
    return v;
}
inline void mbarrier_arrive_cluster(unsigned address) { emu::mbarrier_arrive_cluster_(address); }

inline void ldmatrix_x4(unsigned (&r)[4], const void* p) { emu::ldmatrix_x4_(r, p, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) { emu::ldmatrix_x4_(r, p, true); }
inline void mma_f16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) { emu::mma_<emu::Type::f16>(c, a, b0, b1); }
template <bool HALF> inline void mma16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    emu::mma_<HALF ? emu::Type::f16 : emu::Type::bf16>(c, a, b0, b1);
}

using emu::Type;
// SS: A and B K-major descriptors; RS: A in registers.
inline void wgmma_ss_n64(float (&d)[8][4], unsigned long long a, unsigned long long b, int accumulate) {
    emu::wgmma<64, Type::f16, false, false>(d, a, nullptr, b, accumulate);
}
inline void wgmma_ss_n128(float (&d)[16][4], unsigned long long a, unsigned long long b, int accumulate) {
    emu::wgmma<128, Type::f16, false, false>(d, a, nullptr, b, accumulate);
}
// B MN-major.
inline void wgmma_rs_n128(float (&d)[16][4], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    emu::wgmma<128, Type::f16, false, true>(d, 0, a, b, accumulate);
}
// BF16, B K-major (quant_gemm).
inline void wgmma_rs_bf16_n128(float (&d)[16][4], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    emu::wgmma<128, Type::bf16, false, false>(d, 0, a, b, accumulate);
}
inline void wgmma_rs_bf16_n256(float (&d)[32][4], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    emu::wgmma<256, Type::bf16, false, false>(d, 0, a, b, accumulate);
}
inline void wgmma_fence() {}
inline void wgmma_commit() { emu::wgmma_commit_(); }
template <int N> inline void wgmma_wait() { emu::wgmma_wait_<N>(); }
inline void fence_proxy_async() {}
inline unsigned dynamic_shared_bytes() { return (unsigned)emu::dynamicShared; }
inline void __trap() { emu::die("__trap"); }
inline void hold(float&) {}
inline void hold(unsigned&) {}
