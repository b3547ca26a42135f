// AVX-512 BF16's pair dot product for Swift. Swift's importer drops every intrinsic whose
// operands are `__m512bh` (vectors of `__bf16`, a type Swift has no counterpart for), and LLVM's
// intrinsic takes `<32 x bfloat>`, which the Builtin module cannot name either. This one inline
// function takes the same bits as integer vectors, so Swift can call it; clang inlines it into
// the Swift kernels of PeregrineBF16 as a single vdpbf16ps. Nothing else lives here: the kernels
// are Swift.
#ifndef CPEREGRINE_BF16_H
#define CPEREGRINE_BF16_H
#if defined(__x86_64__)
#include <immintrin.h>

/// acc[i] += a.bf16[2i] * b.bf16[2i] + a.bf16[2i+1] * b.bf16[2i+1] for the 16 f32 lanes.
static inline __attribute__((always_inline, target("avx512f,avx512bf16")))
__m512 peregrine_dpbf16(__m512 acc, __m512i a, __m512i b) {
    return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
#endif
#endif
