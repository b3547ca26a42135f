// Peregrine's CUDA kernels, compiled at run time by NVRTC for the device's architecture.
// Activations are f32, row-major, one row per token; weights keep their stored type
// (0: f32, 1: f16, 2: bf16, 3: Q8_0, 4: Q4_0, 5: Q4_K, 6: Q6_K, 7: IQ4_NL, 8: IQ4_XS, 9: Q3_K,
// 10: Q2_K, 11: Q5_K, 12: Q5_0; the quantized ones repacked at load, see repack_quantized). The KV cache is f32 or
// f16 (the kernels that touch it take `kvHalf`), [block, position in block, kvHeads, headDim].
// PEREGRINE_CUDA_EMULATOR: compiled on the host by Tests/KernelEmulator, whose prelude defines the
// CUDA types and intrinsics, and the inline-assembly helpers left out below.
#ifndef PEREGRINE_CUDA_EMULATOR
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#endif

// Programmatic dependent launch (Hopper): a kernel launched with it may start while the one
// before it finishes; it reads nothing that kernel writes (and writes nothing it reads) before
// gdc_wait(), which returns once the previous kernel is complete and its writes are visible.
// Every kernel calls it before touching activations; weight loads may come first. Once past it,
// a kernel lets the next one launch (launch_dependents), so the next product's blocks take SMs
// as this one's retire and start streaming their weights. Because no kernel lets the next one
// launch before its own wait, a kernel that has not waited yet runs beside the one launched
// right before it at most, never beside an earlier one: what earlier kernels wrote may be read
// before the wait (attention_split_heads does).
__device__ __forceinline__ void gdc_wait() {
#if __CUDA_ARCH__ >= 900 && !defined(PEREGRINE_CUDA_EMULATOR)
    asm volatile("griddepcontrol.wait;" ::: "memory");
#ifndef PEREGRINE_NO_EARLY_TRIGGER
    asm volatile("griddepcontrol.launch_dependents;");
#endif
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Quantized weights of `total` values are kept planar: all values first (Q8_0: one int8 each;
// Q4_0: 16 bytes per 32-value block, byte j holding value j low and j + 16 high, offset by 8),
// then one f16 scale per 32 values. Every block's values then start 16-byte aligned. Q5_0: Q4_0's
// values, then each block's 32 fifth bits as a word (bit j: value j's, offset by 16), then the
// scales.
__device__ __forceinline__ const __half* quant_scales(const void* w, int dtype, long total) {
    return (const __half*)((const unsigned char*)w + (dtype == 3 ? total : dtype == 12 ? total / 2 + total / 8 : total / 2));
}

// Four fifth bits (bits 0-3 of h) to bit 4 of four bytes (bit i to byte i), as Q5_0's values take them.
__device__ __forceinline__ unsigned fifth_bits4(unsigned h) { return (((h & 0xFu) * 0x00204081u) & 0x01010101u) << 4; }

// A Q4_K super-block's header (f16 d, f16 dmin, twelve bytes of 6-bit scales and minimums for
// its eight sub-blocks, packed as ggml packs them): d, dmin and the scale and minimum of
// sub-blocks s and s + 1 (s even).
__device__ __forceinline__ int q4k_byte(uint4 h, int i) {
    unsigned w = i < 4 ? h.y : i < 8 ? h.z : h.w;  // scale bytes start after d and dmin (h.x)
    return (int)((w >> (8 * (i & 3))) & 0xff);
}

__device__ __forceinline__ void q4k_header(uint4 h, int s, float& d, float& dmin, int& s1, int& m1, int& s2, int& m2) {
    d = __half2float(__ushort_as_half((unsigned short)(h.x & 0xffff)));
    dmin = __half2float(__ushort_as_half((unsigned short)(h.x >> 16)));
#pragma unroll
    for (int t = 0; t < 2; t++) {
        int j = s + t, sc, m;
        if (j < 4) { sc = q4k_byte(h, j) & 63; m = q4k_byte(h, j + 4) & 63; }
        else {
            sc = (q4k_byte(h, j + 4) & 0xF) | ((q4k_byte(h, j - 4) >> 6) << 4);
            m = (q4k_byte(h, j + 4) >> 4) | ((q4k_byte(h, j) >> 6) << 4);
        }
        if (t == 0) { s1 = sc; m1 = m; } else { s2 = sc; m2 = m; }
    }
}

// The IQ4 types' 16 levels (ggml's table), four int8 per word: levels 4j..4j+3 in word j.
#define IQ4_LEVELS_0 0xBFAD9881u
#define IQ4_LEVELS_1 0xF6EADDCFu
#define IQ4_LEVELS_2 0x26190D01u
#define IQ4_LEVELS_3 0x71594535u

// Four 4-bit indices, one in the low nibble of each byte of v (the high nibbles ignored), to
// their four int8 levels: a byte permute picks from levels 0-7 and one from 8-15 by the low 3
// bits, and bit 3 chooses between them.
__device__ __forceinline__ int iq4_levels4(unsigned v) {
    unsigned idx = v & 0x0F0F0F0Fu, low3 = idx & 0x07070707u;
    unsigned sel = (low3 & 0x7u) | ((low3 >> 4) & 0x70u) | ((low3 >> 8) & 0x700u) | ((low3 >> 12) & 0x7000u);
    unsigned lo = __byte_perm(IQ4_LEVELS_0, IQ4_LEVELS_1, sel), hi = __byte_perm(IQ4_LEVELS_2, IQ4_LEVELS_3, sel);
    unsigned upper = ((idx >> 3) & 0x01010101u) * 0xFFu;
    return (int)((hi & upper) | (lo & ~upper));
}

__device__ __forceinline__ int iq4_level(int index) {
    unsigned word = index < 4 ? IQ4_LEVELS_0 : index < 8 ? IQ4_LEVELS_1 : index < 12 ? IQ4_LEVELS_2 : IQ4_LEVELS_3;
    return (int)(signed char)((word >> (8 * (index & 3))) & 0xff);
}

// An IQ4_XS super-block's 8-byte header (as two words: f16 d and the 16 bits of high scale
// bits; the 4 bytes of low scale nibbles): d times sub-block s's signed 6-bit scale.
__device__ __forceinline__ float iq4xs_scale(uint2 h, int s) {
    int ls = ((h.y >> (4 * s)) & 15) | (((h.x >> (16 + 2 * s)) & 3) << 4);
    return __half2float(__ushort_as_half((unsigned short)(h.x & 0xffff))) * (float)(ls - 32);
}

// Q3_K sub-block j's signed scale from its super-block's twelve scale bytes (ggml's packing: low
// 4 bits in byte j % 8, low nibble for j < 8; top 2 bits at bit 2 (j / 4) of byte 8 + j % 4).
__device__ __forceinline__ int q3k_scale(const unsigned char* sc, int j) {
    int low = j < 8 ? sc[j] & 15 : sc[j - 8] >> 4;
    return (low | (((sc[8 + (j & 3)] >> (2 * (j >> 2))) & 3) << 4)) - 32;
}

__device__ __forceinline__ float load_weight(const void* w, int dtype, long i, long total) {
    if (dtype == 2) return __bfloat162float(((const __nv_bfloat16*)w)[i]);
    if (dtype == 1) return __half2float(((const __half*)w)[i]);
    if (dtype == 3) return __half2float(quant_scales(w, 3, total)[i / 32]) * (float)((const signed char*)w)[i];
    if (dtype == 4 || dtype == 12) {
        unsigned char b = ((const unsigned char*)w)[(i / 32) * 16 + i % 16];
        int q = i % 32 < 16 ? (b & 15) : (b >> 4);
        if (dtype == 12) q |= ((((const unsigned*)((const unsigned char*)w + total / 2))[i / 32] >> (i % 32)) & 1) << 4;
        return __half2float(quant_scales(w, dtype, total)[i / 32]) * (float)(q - (dtype == 4 ? 8 : 16));
    }
    if (dtype == 5 || dtype == 11) {
        // Q4_K planar: 128 bytes of values per super-block, then the 16-byte headers. Q5_K: the
        // same, then 32 bytes of fifth bits per super-block (bit 2j + 1 of byte l of value
        // 64j + 32 + l, bit 2j of value 64j + l, as ggml has them).
        long sb = i / 256;
        int r = i % 256, j = r / 64, l = r % 64;
        unsigned char b = ((const unsigned char*)w)[sb * 128 + 32 * j + l % 32];
        int q = l < 32 ? (b & 15) : (b >> 4);
        if (dtype == 11) q |= ((((const unsigned char*)w)[total / 2 + total / 16 + sb * 32 + l % 32] >> (2 * j + l / 32)) & 1) << 4;
        uint4 h = ((const uint4*)((const unsigned char*)w + total / 2))[sb];
        float d, dmin;
        int s1, m1, s2, m2;
        q4k_header(h, 2 * j, d, dmin, s1, m1, s2, m2);
        // One rounding (fma) in a fixed form, which quant_gemm's decoding repeats to the bit.
        return l < 32 ? __fmaf_rn(d * s1, (float)q, -(dmin * m1)) : __fmaf_rn(d * s2, (float)q, -(dmin * m2));
    }
    if (dtype == 6) {
        // Q6_K planar: 192 bytes of values per super-block (ql then qh, as ggml has them), then
        // 16 int8 scales per super-block, then one f16 d per super-block.
        long sb = i / 256, blocks = total / 256;
        int r = i % 256, n = r / 128, qd = (r % 128) / 32, l = r % 32;
        const unsigned char* v = (const unsigned char*)w + sb * 192;
        unsigned char b = v[n * 64 + l + (qd & 1 ? 32 : 0)];
        int q = ((qd < 2 ? (b & 15) : (b >> 4)) | (((v[128 + n * 32 + l] >> (2 * qd)) & 3) << 4)) - 32;
        int sc = ((const signed char*)w + blocks * 192)[sb * 16 + n * 8 + l / 16 + 2 * qd];
        return __half2float(((const __half*)((const unsigned char*)w + blocks * 208))[sb]) * sc * q;
    }
    if (dtype == 7 || dtype == 8) {
        // IQ4_NL planar as Q4_0 (16 bytes of indices per 32 values, then f16 scales); IQ4_XS:
        // the same 16 bytes per sub-block of 32, then an 8-byte header per super-block.
        unsigned char b = ((const unsigned char*)w)[(i / 32) * 16 + i % 16];
        int q = iq4_level(i % 32 < 16 ? (b & 15) : (b >> 4));
        if (dtype == 7) return __half2float(quant_scales(w, 7, total)[i / 32]) * (float)q;
        uint2 h = ((const uint2*)((const unsigned char*)w + total / 2))[i / 256];
        return iq4xs_scale(h, (int)((i / 32) % 8)) * (float)q;
    }
    if (dtype == 9 || dtype == 10) {
        // Q3_K planar: 96 bytes of values per super-block (hmask, then qs), then 12 scale bytes
        // per super-block, then one f16 d per super-block. Q2_K planar: 64 bytes of qs per
        // super-block, then 16 scale bytes (scale low nibble, min high) each, then f16 d and dmin.
        // Value 128h + 32s + l: low bits at bits 2s of qs byte 32h + l, Q3_K's third bit at bit
        // 4h + s of hmask byte l; sub-block 8h + 2s + l / 16.
        long sb = i / 256, blocks = total / 256;
        int r = i % 256, h = r / 128, s = (r % 128) / 32, l = r % 32, j = 8 * h + 2 * s + l / 16;
        const unsigned char* base = (const unsigned char*)w;
        if (dtype == 9) {
            const unsigned char* v = base + sb * 96;
            int q = (((v[32 + 32 * h + l] >> (2 * s)) & 3) | (((v[l] >> (4 * h + s)) & 1) << 2)) - 4;
            float d = __half2float(((const __half*)(base + blocks * 108))[sb]);
            return d * q3k_scale(base + blocks * 96 + sb * 12, j) * q;
        }
        int q = (base[sb * 64 + 32 * h + l] >> (2 * s)) & 3;
        int sm = base[blocks * 64 + sb * 16 + j];
        const __half* dm = (const __half*)(base + blocks * 80) + 2 * sb;
        return __fmaf_rn(__half2float(dm[0]) * (sm & 15), (float)q, -(__half2float(dm[1]) * (sm >> 4)));
    }
    return ((const float*)w)[i];
}

// GGUF's interleaved blocks (Q8_0: 34 bytes, Q4_0: 18 bytes, each an f16 scale then the values;
// Q4_K: 144 bytes, a 16-byte header then 128 bytes of values) to the planar layouts above, one
// thread per block.
// Block b of `blocks` blocks of `bytes` bytes into planar regions: region k holds piece k
// (`length[k]` bytes from byte `from[k]` of the block) of every block in turn, so region k
// starts at blocks * (length[0] + ... + length[k - 1]).
__device__ __forceinline__ void repack_pieces(const unsigned char* raw, int bytes, const int* from, const int* length, int pieces,
                                              unsigned char* out, long blocks, long b) {
    const unsigned char* src = raw + b * bytes;
    long region = 0;
    for (int k = 0; k < pieces; k++) {
        for (int j = 0; j < length[k]; j++) out[region + b * length[k] + j] = src[from[k] + j];
        region += blocks * length[k];
    }
}

extern "C" __global__ void repack_quantized(const unsigned char* raw, int dtype, unsigned char* out, long blocks) {
    long b = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= blocks) return;
    if (dtype == 5) {
        // Q4_K: 144 bytes (16 of header, 128 of values) to the values, then the headers, in
        // 16-byte stores (144 = 9 x 16: blocks stay 16-byte aligned).
        const uint4* src = (const uint4*)(raw + b * 144);
        uint4* values = (uint4*)(out + b * 128);
        for (int j = 0; j < 8; j++) values[j] = src[1 + j];
        ((uint4*)(out + blocks * 128))[b] = src[0];
        return;
    }
    // Each type's block as (from, length) pieces in the order of its planar regions: the values
    // first, then the scales (and d, dmin where they are apart).
    if (dtype == 6) {  // Q6_K, 210 bytes: ql and qh, 16 scales, f16 d
        const int from[3] = {0, 192, 208}, length[3] = {192, 16, 2};
        repack_pieces(raw, 210, from, length, 3, out, blocks, b);
    } else if (dtype == 8) {  // IQ4_XS, 136 bytes: an 8-byte header, 128 bytes of indices
        const int from[2] = {8, 0}, length[2] = {128, 8};
        repack_pieces(raw, 136, from, length, 2, out, blocks, b);
    } else if (dtype == 9) {  // Q3_K, 110 bytes: hmask and qs, 12 scale bytes, f16 d
        const int from[3] = {0, 96, 108}, length[3] = {96, 12, 2};
        repack_pieces(raw, 110, from, length, 3, out, blocks, b);
    } else if (dtype == 10) {  // Q2_K, 84 bytes: 16 scale bytes, qs, f16 d and dmin
        const int from[3] = {16, 0, 80}, length[3] = {64, 16, 4};
        repack_pieces(raw, 84, from, length, 3, out, blocks, b);
    } else if (dtype == 12) {  // Q5_0, 22 bytes: an f16 scale, the fifth bits, the nibbles
        const int from[3] = {6, 2, 0}, length[3] = {16, 4, 2};
        repack_pieces(raw, 22, from, length, 3, out, blocks, b);
    } else if (dtype == 11) {  // Q5_K, 176 bytes: Q4_K's 16-byte header, 32 bytes of fifth bits, qs
        const int from[3] = {48, 0, 16}, length[3] = {128, 16, 32};
        repack_pieces(raw, 176, from, length, 3, out, blocks, b);
    } else {  // Q8_0 (34 bytes), Q4_0 and IQ4_NL (18): an f16 scale, then the values
        int size = dtype == 3 ? 32 : 16;
        const int from[2] = {2, 0}, length[2] = {size, 2};
        repack_pieces(raw, size + 2, from, length, 2, out, blocks, b);
    }
}

// Eight consecutive weights as f32 (i a multiple of 8; 16-byte loads for the 16-bit types).
__device__ __forceinline__ void load8(const void* w, int dtype, long i, float* out) {
    if (dtype == 2) {
        uint4 u = *(const uint4*)((const __nv_bfloat16*)w + i);
        const __nv_bfloat162* p = (const __nv_bfloat162*)&u;
        for (int j = 0; j < 4; j++) { float2 f = __bfloat1622float2(p[j]); out[2 * j] = f.x; out[2 * j + 1] = f.y; }
    } else if (dtype == 1) {
        uint4 u = *(const uint4*)((const __half*)w + i);
        const __half2* p = (const __half2*)&u;
        for (int j = 0; j < 4; j++) { float2 f = __half22float2(p[j]); out[2 * j] = f.x; out[2 * j + 1] = f.y; }
    } else {
        float4 a = *(const float4*)((const float*)w + i), b = *(const float4*)((const float*)w + i + 4);
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w; out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    }
}

// A token below 0 is a chained decode step's: -1 - id names the row of the step before whose
// greedy choice it is, still on the device as argmax_rows left it in `chosen`.
extern "C" __global__ void embed_rows(const void* table, int dtype, long total, const int* tokens,
                                      const unsigned long long* chosen, float* out, int dim) {
    gdc_wait();
    int t = blockIdx.x;
    int id = tokens[t];
    if (id < 0) {
        unsigned long long word = chosen[-1 - id];
        unsigned i = 0xffffffffu - (unsigned)(word & 0xffffffffu);
        id = word == 0 || (long)i * dim >= total ? 0 : (int)i;
    }
    long base = (long)id * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(long)t * dim + i] = load_weight(table, dtype, base + i, total);
}

// One block per row: out = x / rms(x) * w.
// 1 / rms of a row of k values, summed by the whole block: the RMSNorm scale (also fused into
// quantize_q8 and the matvec kernels).
// The sum of every thread's s over the block (warps' sums in order), returned to every thread.
__device__ __forceinline__ float block_sum(float s) {
    __shared__ float partial[32];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    s = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) s += partial[w];
    return s;
}

__device__ __forceinline__ float block_rms_scale(const float* x, int k, float eps) {
    float s = 0;
    for (int i = threadIdx.x; i < k; i += blockDim.x) s += x[i] * x[i];
    return rsqrtf(block_sum(s) / k + eps);
}

// Value i of a 16-bit copy of an activation (halfType 1: F16, 2: BF16), written beside the f32
// value by the kernel that computes it, so the cuBLAS product that reads it needs no rounding pass.
__device__ __forceinline__ void store_half(void* half, int halfType, long i, float v) {
    if (halfType == 2) ((__nv_bfloat16*)half)[i] = __float2bfloat16(v);
    else if (halfType == 1) ((__half*)half)[i] = __float2half(v);
}

// A block per row. With `x2`, blocks from `rows` on take rows of a second tensor (x2, w2, out2:
// a layer's key norms beside its query norms, one launch for both); the 16-bit copy is the
// first tensor's only.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int dim, float eps, void* half, int halfType,
                                    const float* x2, const float* w2, float* out2, int rows) {
    gdc_wait();
    long row = blockIdx.x;
    if (x2 && row >= rows) { row -= rows; x = x2; w = w2; out = out2; half = 0; halfType = 0; }
    const float* xr = x + row * dim;
    float* o = out + row * dim;
    if ((dim & 3) == 0 && (((unsigned long)xr | (unsigned long)o | (unsigned long)w) & 15) == 0) {
        // Rows of whole 16-byte pieces: a float4 a thread at a time (the block is sized for dim / 4).
        const float4* x4 = (const float4*)xr;
        const float4* w4 = (const float4*)w;
        int n4 = dim >> 2;
        float s = 0;
#pragma unroll 4
        for (int i = threadIdx.x; i < n4; i += blockDim.x) { float4 a = x4[i]; s += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w; }
        float scale = rsqrtf(block_sum(s) / dim + eps);
#pragma unroll 4
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 a = x4[i], g = w4[i];
            float4 v = make_float4(a.x * scale * g.x, a.y * scale * g.y, a.z * scale * g.z, a.w * scale * g.w);
            ((float4*)o)[i] = v;
            long at = row * dim + 4 * i;
            store_half(half, halfType, at, v.x); store_half(half, halfType, at + 1, v.y);
            store_half(half, halfType, at + 2, v.z); store_half(half, halfType, at + 3, v.w);
        }
        return;
    }
    float scale = block_rms_scale(xr, dim, eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = xr[i] * scale * w[i];
        o[i] = v;
        store_half(half, halfType, row * dim + i, v);
    }
}

// A quantized block's 32 values as eight words of four int8 each (values 4j..4j+3 in word j).
// (words_of: the same from a block's loaded bytes, a (and c, Q8_0's second 16 bytes, or Q5_0's
// fifth bits in c.x).)
__device__ __forceinline__ void words_of(uint4 a, uint4 c, int dtype, int* wq) {
    if (dtype == 12) {
        // Q5_0: c.x the block's fifth bits (value j's at bit j); offset by 16.
        unsigned v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            wq[j] = (int)__vsub4((v[j] & 0x0F0F0F0F) | fifth_bits4(c.x >> (4 * j)), 0x10101010);
            wq[j + 4] = (int)__vsub4(((v[j] >> 4) & 0x0F0F0F0F) | fifth_bits4(c.x >> (16 + 4 * j)), 0x10101010);
        }
    } else if (dtype == 3) {
        wq[0] = a.x; wq[1] = a.y; wq[2] = a.z; wq[3] = a.w; wq[4] = c.x; wq[5] = c.y; wq[6] = c.z; wq[7] = c.w;
    } else if (dtype == 7) {
        unsigned v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; j++) { wq[j] = iq4_levels4(v[j]); wq[j + 4] = iq4_levels4(v[j] >> 4); }
    } else {
        unsigned v[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            // Values 4j..4j+3 are low nibbles, 16+4j.. the high ones; subtract the offset of 8 per byte.
            wq[j] = (int)__vsub4(v[j] & 0x0F0F0F0F, 0x08080808);
            wq[j + 4] = (int)__vsub4((v[j] >> 4) & 0x0F0F0F0F, 0x08080808);
        }
    }
}

__device__ __forceinline__ void block_words(const void* w, int dtype, long total, long block, int* wq) {
    if (dtype == 3) {
        const uint4* q = (const uint4*)((const signed char*)w + block * 32);
        words_of(q[0], q[1], dtype, wq);
    } else if (dtype == 12) {
        unsigned h = ((const unsigned*)((const unsigned char*)w + total / 2))[block];
        words_of(*(const uint4*)((const unsigned char*)w + block * 16), make_uint4(h, 0, 0, 0), dtype, wq);
    } else {
        words_of(*(const uint4*)((const unsigned char*)w + block * 16), make_uint4(0, 0, 0, 0), dtype, wq);
    }
}

__device__ __forceinline__ int dot32(const int* wq, const signed char* x) {
    const int4* xp = (const int4*)x;
    int4 a = xp[0], c = xp[1];
    int sum = __dp4a(wq[0], a.x, 0);
    sum = __dp4a(wq[1], a.y, sum); sum = __dp4a(wq[2], a.z, sum); sum = __dp4a(wq[3], a.w, sum);
    sum = __dp4a(wq[4], c.x, sum); sum = __dp4a(wq[5], c.y, sum); sum = __dp4a(wq[6], c.z, sum); sum = __dp4a(wq[7], c.w, sum);
    return sum;
}

// One block of a quantized row against nt tokens' activations rounded to 8 bits (xq: int8,
// xs: one scale per 32), by one lane: 4-byte integer dot products (dp4a), one float multiply
// per block.
__device__ __forceinline__ void block_dot(const void* w, int dtype, long total, long row, long block, const signed char* xq,
                                          const float* xs, int k, int t0, int nt, float* acc) {
    int wq[8];
    long b = row / 32 + block;
    block_words(w, dtype, total, b, wq);
    float d = __half2float(quant_scales(w, dtype, total)[b]);
    for (int t = 0; t < nt; t++) {
        int sum = dot32(wq, xq + (long)(t0 + t) * k + block * 32);
        acc[t] += d * xs[(long)(t0 + t) * (k / 32) + block] * (float)sum;
    }
}

// Activations rounded to 8 bits per 32 values (scale = max |x| / 127): block (token, chunk)
// takes 256 values, a warp per 32. With `norm`, the row is RMS-normalized and multiplied by it
// first (the norm fused; each block sums the row's squares itself, so one launch does it all).
extern "C" __global__ void __launch_bounds__(256) quantize_q8(const float* x, const float* norm, float eps, signed char* xq,
                                                              float* xs, int k) {
    gdc_wait();
    const float* xr = x + (long)blockIdx.x * k;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float scale = norm ? block_rms_scale(xr, k, eps) : 1.f;
    int g = blockIdx.y * 8 + warp;
    if (g >= k / 32) return;
    int i = g * 32 + lane;
    float v = norm ? xr[i] * scale * norm[i] : xr[i];
    float d = warp_max(fabsf(v)) / 127.f;
    xq[(long)blockIdx.x * k + i] = (signed char)(d > 0 ? __float2int_rn(v / d) : 0);
    if (lane == 0) xs[(long)blockIdx.x * (k / 32) + g] = d;
}

// The output row a warp of a matvec kernel computes: row o of matrix 0, then 1, then 2 (or, gated,
// row o of gate (0) and up (1)), with its bias and output.
struct MatvecRow {
    const void* w;
    const float* b;
    float* y;
    int n, o;
    bool active;
};

// (matvec_row_at: output row `index` of the three matrices, for a warp that takes more than one.)
__device__ __forceinline__ MatvecRow matvec_row_at(int index, bool gated, const void* w0, const float* b0, float* y0, int n0,
                                                   const void* w1, const float* b1, float* y1, int n1, const void* w2,
                                                   const float* b2, float* y2, int n2) {
    MatvecRow m = {w0, b0, y0, n0, index, true};
    if (!gated && m.o >= n0) {
        m.o -= n0; m.w = w1; m.b = b1; m.y = y1; m.n = n1;
        if (m.o >= n1) { m.o -= n1; m.w = w2; m.b = b2; m.y = y2; m.n = n2; }
    }
    m.active = m.o < m.n;
    if (!m.active) m.o = 0;
    return m;
}

__device__ __forceinline__ MatvecRow matvec_row(bool gated, const void* w0, const float* b0, float* y0, int n0, const void* w1,
                                                const float* b1, float* y1, int n1, const void* w2, const float* b2, float* y2,
                                                int n2) {
    return matvec_row_at((int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5), gated, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);
}

// A warp's sums to its output: y = W x + b (mode 0), y += W x + b (mode 1), or gated,
// y = silu(gate x + b) * (up x + b1).
// `scale` multiplies the sums before the bias (a carried RMSNorm's, see NormCarry).
__device__ __forceinline__ void matvec_store(const MatvecRow& m, float acc, float up, bool gated, const float* b1, int mode,
                                             int lane, float scale = 1.f) {
    float g = warp_sum(acc) * scale + (m.b ? m.b[m.o] : 0.f);
    if (gated) {
        float u = warp_sum(up) * scale + (b1 ? b1[m.o] : 0.f);
        if (lane == 0) m.y[m.o] = g / (1.f + __expf(-g)) * u;
    } else if (lane == 0) {
        m.y[m.o] = mode == 1 ? m.y[m.o] + g : g;
    }
}

// Expert mode of the matvec kernels (routes != 0; a mixture-of-experts decode step): block row
// y takes route y of the pass's routes, [rows, k] (weight, expert) pairs. w0 (and w1, gated) are
// then tables of the experts' matrices, indexed by the route's expert; x and its 8-bit copy
// (xq, xs) are advanced to row y / routeDiv (the route's token for gate and up, routeDiv = k; the
// route's own row for down, routeDiv = 1), y0 to row y of the outputs. Each route is one
// token's product with one expert, computed as a dense product's row is, whatever else the
// batch holds. The expert is known only after the routing kernel, so this waits before the
// weights' first loads.
__device__ __forceinline__ void matvec_route(const float* routes, int routeDiv, int k, int n0, const void*& w0, const void*& w1,
                                             const float*& x, const signed char*& xq, const float*& xs, float*& y0) {
    if (!routes) return;
    gdc_wait();
    int j = blockIdx.y;
    int e = __float_as_int(routes[2 * j + 1]);
    w0 = (const void*)((const unsigned long long*)w0)[e];
    if (w1) w1 = (const void*)((const unsigned long long*)w1)[e];
    long row = j / routeDiv;
    if (x) x += row * k;
    if (xq) { xq += row * k; xs += row * (k / 32); }
    y0 += (long)j * n0;
}

// Eight 16-bit weights (DT 1: F16, 2: BF16) against x's a and b.
template <int DT>
__device__ __forceinline__ float half_dot8(const uint4& q, float4 a, float4 b) {
    float f[8];
    if (DT == 2) {
        const __nv_bfloat162* p = (const __nv_bfloat162*)&q;
#pragma unroll
        for (int j = 0; j < 4; j++) { float2 t = __bfloat1622float2(p[j]); f[2 * j] = t.x; f[2 * j + 1] = t.y; }
    } else {
        const __half2* p = (const __half2*)&q;
#pragma unroll
        for (int j = 0; j < 4; j++) { float2 t = __half22float2(p[j]); f[2 * j] = t.x; f[2 * j + 1] = t.y; }
    }
    return f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w + f[4] * b.x + f[5] * b.y + f[6] * b.z + f[7] * b.w;
}

// One token's products of 16-bit weights (DT 1: F16, 2: BF16), a warp per output row (R = 2:
// gate and up of the same output, mode 2), x read in place or, when `norm` is given,
// RMS-normalized into shared memory (the norm fused; the host asks for that only with
// PEREGRINE_FUSED_HALF_NORM, since every wave of blocks waits for it). A lane reads its row in
// chunks of U = 4 / R 16-byte loads per row and issues the next chunk's loads before it uses the
// current one's (two sets of registers, taken in turn), so a warp always has loads in flight;
// the first chunk is issued before gdc_wait, so a product's weights stream while the kernel
// before it finishes.
// Four blocks an SM (64 registers a thread; the kernels that are not gated spill 8 bytes), so
// the next kernel's blocks find room beside this one's.
// H200, the 8B shape's BF16 decode (tg128 / tg64 at depths 4,096 and 16,384, tok/s, one run,
// two rounds): one set of 8 / R loads (a chunk loaded, then used) 192.5, 190.3 / 180.5, 178.5 /
// 163.8, 161.7; two sets of 4 / R 196.8, 197.5 / 182.1, 183.6 / 162.3, 166.0; two sets of 8 / R
// at two blocks an SM (their 114 registers) 184.4, 184.9 / 162.0, 162.1 / 149.8, 148.6, though
// run alone, one product after another with the weights rotated beyond L2, that one was the
// fastest (q/k/v 21.7 -> 14.7 us, gate/up 59.3 -> 56.4, down 38.3 -> 30.4 against one set).
// Matrices and modes as matmul_rows.
template <int DT, int R>
__device__ __forceinline__ void matvec_half_body(const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1,
                                                 float* y1, int n1, const void* w2, const float* b2, float* y2, int n2,
                                                 const float* x, const float* norm, float eps, int k, int mode) {
    constexpr int U = 4 / R;
    extern __shared__ float xsh[];
    const int lane = threadIdx.x & 31;
    MatvecRow m = matvec_row(R == 2, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);
    const void* wr[2] = {m.w, w1};
    const int units = k / 8, chunks = (units + 32 * U - 1) / (32 * U);  // a unit: eight weights, one load
    const uint4* base[R];
#pragma unroll
    for (int r = 0; r < R; r++) base[r] = (const uint4*)wr[r] + (long)m.o * units + lane;
    uint4 qa[R][U], qb[R][U];
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    // Chunk c: the lane's units c * 32U + 32u + lane, u < U.
    auto load = [&](uint4 (&q)[R][U], int c) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = c * 32 * U + u * 32;
            if (i + lane < units) {
#pragma unroll
                for (int r = 0; r < R; r++) q[r][u] = __ldcs(base[r] + i);
            }
        }
    };
    const float* xv = x;
    auto use = [&](const uint4 (&q)[R][U], int c) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            int i = c * 32 * U + u * 32 + lane;
            if (i >= units) break;
            float4 a = *(const float4*)(xv + i * 8), b = *(const float4*)(xv + i * 8 + 4);
#pragma unroll
            for (int r = 0; r < R; r++) acc[r] += half_dot8<DT>(q[r][u], a, b);
        }
    };
    if (m.active) load(qa, 0);
    gdc_wait();
    if (norm) {
        float scale = block_rms_scale(x, k, eps);
        for (int i = threadIdx.x * 4; i < k; i += blockDim.x * 4) {
            float4 v = *(const float4*)(x + i), g = *(const float4*)(norm + i);
            *(float4*)(xsh + i) = make_float4(v.x * scale * g.x, v.y * scale * g.y, v.z * scale * g.z, v.w * scale * g.w);
        }
        __syncthreads();
        xv = xsh;
    }
    if (!m.active) return;
    for (int c = 0; c < chunks; c += 2) {
        if (c + 1 < chunks) load(qb, c + 1);
        use(qa, c);
        if (c + 2 < chunks) load(qa, c + 2);
        if (c + 1 < chunks) use(qb, c + 1);
    }
    matvec_store(m, acc[0], acc[R - 1], R == 2, b1, mode, lane);
}

// matvec_half_body for rows of exactly K values (a multiple of 256) and no fused norm (the host
// picks it only then; it ignores `norm`, `k` and `routes`), the row length fixed at compile
// time: every bound is known and a lane's loads are one base and constant offsets. The same two
// sets of 4 / R loads a row taken in turn, the next chunk issued before the current one is used;
// the sums are matvec_half_body's, in the same order. Where the row is not a whole number of
// pairs of chunks (3,072 values: three chunks of four loads a lane; 2,560: two and a half), the
// chunk's load count is worked out as it goes and the last chunk may be short.
// The chunk loop is not unrolled: unrolled, the compiler hoists later chunks' loads and spills.
// Alone on an H200 (scripts/gemv_lab.cu, weights beyond L2), the 8B shape's q/k/v 21.5 -> 17.4
// us, output projection 14.3 -> 12.0, down 35.0 -> 32.1, gate/up 59.6 -> 57.8, output matrix
// 271.6 -> 258.6; chunks of 8 / R loads each loaded then used, or three sets at three blocks an
// SM, lost in the decode step (BENCHMARKS.md).
// The RMSNorm between a residual product and the 16-bit product after it, carried by the two
// (the `_carry` kernels) instead of a launch of its own: the residual product (`produce`) writes
// beside each new residual value r its product with the norm's weight, r g, and sums the
// squares of its block's values into `area` (partials from area + 64 on; the block that counts
// last, area[1], sums them in order into area[0] and resets the count); the next product
// (`consume`) reads r g as its x and scales its sums by rsqrt(area[0] / k + eps) before the bias,
// which is the product of the normalized row. The same arithmetic up to the order of rounding.
struct NormCarry {
    const float* g;
    float* xg;
    float* area;
    float eps;
    bool consume;  // else produce
};

template <int DT, int R, int K, bool CARRY = false>
__device__ __forceinline__ void matvec_half_fixed(const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1,
                                                  float* y1, int n1, const void* w2, const float* b2, float* y2, int n2,
                                                  const float* x, int mode, NormCarry carry = {}) {
    constexpr int U = 4 / R, units = K / 8, per = units / 32, full = per / U, tail = per % U, chunks = full + (tail ? 1 : 0);
    static_assert(K % 256 == 0, "whole loads a lane");
    const int lane = threadIdx.x & 31;
    MatvecRow m = matvec_row(R == 2, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);
    const void* wr[2] = {m.w, w1};
    const uint4* base[R];
#pragma unroll
    for (int r = 0; r < R; r++) base[r] = (const uint4*)wr[r] + (long)m.o * units + lane;
    uint4 q[2][R][U];
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.f;
    // Chunk c into set s: the lane's units (cU + u) * 32 + lane, u < n (U, or the short last chunk's).
    auto load = [&](int s, int c, int n) {
#pragma unroll
        for (int u = 0; u < U; u++)
            if (u < n) {
#pragma unroll
                for (int r = 0; r < R; r++) q[s][r][u] = __ldcs(base[r] + (c * U + u) * 32);
            }
    };
    auto use = [&](int s, int c, int n) {
#pragma unroll
        for (int u = 0; u < U; u++)
            if (u < n) {
                int i = (c * U + u) * 32 + lane;
                float4 a = *(const float4*)(x + i * 8), b = *(const float4*)(x + i * 8 + 4);
#pragma unroll
                for (int r = 0; r < R; r++) acc[r] += half_dot8<DT>(q[s][r][u], a, b);
            }
    };
    if (m.active) load(0, 0, full > 0 ? U : tail);
    gdc_wait();
    if (!CARRY && !m.active) return;
    if (m.active) {
        if constexpr (tail == 0 && full % 2 == 0) {
#pragma unroll 1
            for (int c = 0; c < chunks; c += 2) {
                load(1, c + 1, U);
                use(0, c, U);
                if (c + 2 < chunks) load(0, c + 2, U);
                use(1, c + 1, U);
            }
        } else {
            auto count = [&](int c) { return c < full ? U : tail; };
#pragma unroll 1
            for (int c = 0; c < chunks; c += 2) {
                if (c + 1 < chunks) load(1, c + 1, count(c + 1));
                use(0, c, count(c));
                if (c + 1 >= chunks) break;
                if (c + 2 < chunks) load(0, c + 2, count(c + 2));
                use(1, c + 1, count(c + 1));
            }
        }
    }
    if (!CARRY) {
        matvec_store(m, acc[0], acc[R - 1], R == 2, b1, mode, lane);
        return;
    }
    if (carry.consume) {
        float scale = rsqrtf(carry.area[0] / K + carry.eps);
        if (m.active) matvec_store(m, acc[0], acc[R - 1], R == 2, b1, mode, lane, scale);
        return;
    }
    // The producer: a residual product (mode 1, one matrix), its rows the next norm's values.
    float sq = 0.f;
    float v = warp_sum(acc[0]) + (m.b ? m.b[m.o] : 0.f);
    if (m.active && lane == 0) {
        v += m.y[m.o];
        m.y[m.o] = v;
        carry.xg[m.o] = v * carry.g[m.o];
        sq = v * v;
    }
    __shared__ bool last;
    float b = block_sum(sq);  // the warps' squares (each its lane 0's) in order
    if (threadIdx.x == 0) {
        carry.area[64 + blockIdx.x] = b;
        __threadfence();
        unsigned* count = (unsigned*)(carry.area + 1);
        last = atomicAdd(count, 1u) == gridDim.x - 1;
        if (last) *count = 0;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    float t = 0.f;
    for (int i = threadIdx.x; i < (int)gridDim.x; i += blockDim.x) t += ((volatile float*)carry.area)[64 + i];
    t = block_sum(t);
    if (threadIdx.x == 0) carry.area[0] = t;
}

#define MATVEC_FIXED(name, DT, R, K)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256, 4) name(                                                               \
        const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1, float* y1, int n1, const void* w2, \
        const float* b2, float* y2, int n2, const float* x, const float* norm, float eps, const signed char* xq, const float* xs, \
        int k, int mode, const float* routes, int routeDiv) {                                                                \
        matvec_half_fixed<DT, R, K>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, x, mode);                                 \
    }
// The row lengths of CUDABackend.fixedMatvecLengths.
#define MATVEC_FIXED_ALL(K)                                                                                                  \
    MATVEC_FIXED(matvec_f16_k##K, 1, 1, K)                                                                                   \
    MATVEC_FIXED(matvec_f16_gated_k##K, 1, 2, K)                                                                             \
    MATVEC_FIXED(matvec_bf16_k##K, 2, 1, K)                                                                                  \
    MATVEC_FIXED(matvec_bf16_gated_k##K, 2, 2, K)
MATVEC_FIXED_ALL(2048)
MATVEC_FIXED_ALL(2560)
MATVEC_FIXED_ALL(3072)
MATVEC_FIXED_ALL(3584)
MATVEC_FIXED_ALL(4096)
MATVEC_FIXED_ALL(5120)
MATVEC_FIXED_ALL(8192)
MATVEC_FIXED_ALL(9728)
MATVEC_FIXED_ALL(11008)
MATVEC_FIXED_ALL(12288)
MATVEC_FIXED_ALL(13824)
MATVEC_FIXED_ALL(14336)
MATVEC_FIXED_ALL(18944)
MATVEC_FIXED_ALL(28672)
// The fixed-length kernels carrying an RMSNorm (NormCarry): `carry` 1 consumes one (x is r g;
// q/k/v, mode 0, or gate and up, mode 2, R = 2), 2 produces one (mode 1, R = 1); g, xg and area
// as NormCarry's.
#define MATVEC_CARRY(name, DT, R, K)                                                                                         \
    extern "C" __global__ void __launch_bounds__(256, 4) name(                                                               \
        const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1, float* y1, int n1, const void* w2, \
        const float* b2, float* y2, int n2, const float* x, int mode, float eps, const float* g, float* xg, float* area,       \
        int carry) {                                                                                                         \
        NormCarry c = {g, xg, area, eps, carry == 1};                                                                        \
        matvec_half_fixed<DT, R, K, true>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, x, mode, c);                      \
    }
#define MATVEC_CARRY_ALL(K)                                                                                                  \
    MATVEC_CARRY(matvec_f16_k##K##_carry, 1, 1, K)                                                                           \
    MATVEC_CARRY(matvec_bf16_k##K##_carry, 2, 1, K)                                                                          \
    MATVEC_CARRY(matvec_f16_gated_k##K##_carry, 1, 2, K)                                                                     \
    MATVEC_CARRY(matvec_bf16_gated_k##K##_carry, 2, 2, K)
MATVEC_CARRY_ALL(2048)
MATVEC_CARRY_ALL(2560)
MATVEC_CARRY_ALL(3072)
MATVEC_CARRY_ALL(3584)
MATVEC_CARRY_ALL(4096)
MATVEC_CARRY_ALL(5120)
MATVEC_CARRY_ALL(8192)
MATVEC_CARRY_ALL(9728)
MATVEC_CARRY_ALL(11008)
MATVEC_CARRY_ALL(12288)
MATVEC_CARRY_ALL(13824)
MATVEC_CARRY_ALL(14336)
MATVEC_CARRY_ALL(18944)
MATVEC_CARRY_ALL(28672)

// Unit i of a Q4_K row (16 bytes: super-block i / 8, 32-byte chunk j = (i % 8) / 2, half h =
// i % 2; its low nibbles are values 64j + 16h ... of sub-block 2j, its high nibbles 64j + 32 + 16h
// ... of sub-block 2j + 1) against 8-bit x: q4k_x reads x's two 16-value runs (a, c), their
// scales and the sums of their values once for all rows that share them; q4k_unit multiplies,
// value = d sc q - dmin m per sub-block, hq the super-block's header.
struct Q4KX { int4 a, c; float lo, hi; int sa, sc; };

__device__ __forceinline__ Q4KX q4k_x(const signed char* xq, const float* xs, int i) {
    int j = (i % 8) / 2, h = i % 2;
    long at = (long)(i / 8) * 256 + 64 * j + 16 * h;
    Q4KX x;
    x.a = *(const int4*)(xq + at);
    x.c = *(const int4*)(xq + at + 32);
    x.lo = xs[at / 32];
    x.hi = xs[at / 32 + 1];
    x.sa = __dp4a(0x01010101, x.a.x, 0); x.sa = __dp4a(0x01010101, x.a.y, x.sa); x.sa = __dp4a(0x01010101, x.a.z, x.sa); x.sa = __dp4a(0x01010101, x.a.w, x.sa);
    x.sc = __dp4a(0x01010101, x.c.x, 0); x.sc = __dp4a(0x01010101, x.c.y, x.sc); x.sc = __dp4a(0x01010101, x.c.z, x.sc); x.sc = __dp4a(0x01010101, x.c.w, x.sc);
    return x;
}

__device__ __forceinline__ float q4k_unit(uint4 q, uint4 hq, int i, const Q4KX& x) {
    unsigned v[4] = {q.x, q.y, q.z, q.w};
    int lo = __dp4a((int)(v[0] & 0x0F0F0F0F), x.a.x, 0);
    lo = __dp4a((int)(v[1] & 0x0F0F0F0F), x.a.y, lo); lo = __dp4a((int)(v[2] & 0x0F0F0F0F), x.a.z, lo);
    lo = __dp4a((int)(v[3] & 0x0F0F0F0F), x.a.w, lo);
    int hi = __dp4a((int)((v[0] >> 4) & 0x0F0F0F0F), x.c.x, 0);
    hi = __dp4a((int)((v[1] >> 4) & 0x0F0F0F0F), x.c.y, hi); hi = __dp4a((int)((v[2] >> 4) & 0x0F0F0F0F), x.c.z, hi);
    hi = __dp4a((int)((v[3] >> 4) & 0x0F0F0F0F), x.c.w, hi);
    float d, dmin;
    int s1, m1, s2, m2;
    q4k_header(hq, 2 * ((i % 8) / 2), d, dmin, s1, m1, s2, m2);
    return x.lo * (d * s1 * lo - dmin * m1 * x.sa) + x.hi * (d * s2 * hi - dmin * m2 * x.sc);
}

// Unit i of a Q5_K row: q4k_unit's with each value's fifth bit from qh, the 16 bytes of the
// super-block's fifth bits that hold this unit's (bytes 16h ... 16h + 15; bit 2j for the low
// nibbles' sub-block, 2j + 1 for the high nibbles').
__device__ __forceinline__ float q5k_unit(uint4 q, uint4 qh, uint4 hq, int i, const Q4KX& x) {
    unsigned v[4] = {q.x, q.y, q.z, q.w}, h[4] = {qh.x, qh.y, qh.z, qh.w};
    int xa[4] = {x.a.x, x.a.y, x.a.z, x.a.w}, xc[4] = {x.c.x, x.c.y, x.c.z, x.c.w};
    int j = (i % 8) / 2, lo = 0, hi = 0;
#pragma unroll
    for (int b = 0; b < 4; b++) {
        lo = __dp4a((int)((v[b] & 0x0F0F0F0F) | (((h[b] >> (2 * j)) & 0x01010101) << 4)), xa[b], lo);
        hi = __dp4a((int)(((v[b] >> 4) & 0x0F0F0F0F) | (((h[b] >> (2 * j + 1)) & 0x01010101) << 4)), xc[b], hi);
    }
    float d, dmin;
    int s1, m1, s2, m2;
    q4k_header(hq, 2 * j, d, dmin, s1, m1, s2, m2);
    return x.lo * (d * s1 * lo - dmin * m1 * x.sa) + x.hi * (d * s2 * hi - dmin * m2 * x.sc);
}

// Unit i of a Q6_K row (see matvec_q6k_body: 16 values of each quarter of half (i % 4) / 2 of
// super-block i / 4; qa, qb its low-nibble bytes, qh its high bits) against 8-bit x: q6k_x reads
// x's four 16-value runs and their scales; q6k_unit multiplies, sc the unit's first 16-value
// scale (the others every second byte), d the super-block's scale.
struct Q6KX { int4 a[4]; float d[4]; };

__device__ __forceinline__ Q6KX q6k_x(const signed char* xq, const float* xs, int i) {
    long p0 = (long)(i / 4) * 256 + (i % 4) / 2 * 128 + 16 * (i % 2);
    Q6KX x;
#pragma unroll
    for (int t = 0; t < 4; t++) { x.a[t] = *(const int4*)(xq + p0 + 32 * t); x.d[t] = xs[(p0 + 32 * t) / 32]; }
    return x;
}

__device__ __forceinline__ float q6k_unit(uint4 qa, uint4 qb, uint4 qh, const signed char* sc, __half d, const Q6KX& x) {
    unsigned A[4] = {qa.x, qa.y, qa.z, qa.w};
    unsigned B[4] = {qb.x, qb.y, qb.z, qb.w};
    unsigned H[4] = {qh.x, qh.y, qh.z, qh.w};
    int dot[4] = {0, 0, 0, 0};
#pragma unroll
    for (int j = 0; j < 4; j++) {
        int xj[4] = {j == 0 ? x.a[0].x : j == 1 ? x.a[0].y : j == 2 ? x.a[0].z : x.a[0].w,
                     j == 0 ? x.a[1].x : j == 1 ? x.a[1].y : j == 2 ? x.a[1].z : x.a[1].w,
                     j == 0 ? x.a[2].x : j == 1 ? x.a[2].y : j == 2 ? x.a[2].z : x.a[2].w,
                     j == 0 ? x.a[3].x : j == 1 ? x.a[3].y : j == 2 ? x.a[3].z : x.a[3].w};
        dot[0] = __dp4a((int)__vsub4((A[j] & 0x0F0F0F0F) | ((H[j] << 4) & 0x30303030), 0x20202020), xj[0], dot[0]);
        dot[1] = __dp4a((int)__vsub4((B[j] & 0x0F0F0F0F) | ((H[j] << 2) & 0x30303030), 0x20202020), xj[1], dot[1]);
        dot[2] = __dp4a((int)__vsub4(((A[j] >> 4) & 0x0F0F0F0F) | (H[j] & 0x30303030), 0x20202020), xj[2], dot[2]);
        dot[3] = __dp4a((int)__vsub4(((B[j] >> 4) & 0x0F0F0F0F) | ((H[j] >> 2) & 0x30303030), 0x20202020), xj[3], dot[3]);
    }
    float sum = sc[0] * x.d[0] * dot[0] + sc[2] * x.d[1] * dot[1] + sc[4] * x.d[2] * dot[2] + sc[6] * x.d[3] * dot[3];
    return __half2float(d) * sum;
}

// One token's products of quantized weights, a warp per output row, specialized per weight type
// DT and rows per warp R (R = 2: gate and up of the same output, mode 2). Each lane keeps 8 / R
// 16-byte weight loads per row in flight (4 / R for Q4_K and Q5_K, whose headers, and Q5_K's
// fifth bits, come with them), and the
// first ones are issued before gdc_wait, so a product's weights stream while the kernel before
// it finishes. x comes as xq/xs from quantize_q8 (one launch per product: rounding x in every
// block instead measured 37% slower on Q4_0). Matrices and modes as matmul_rows.
template <int DT, int R>
__device__ __forceinline__ void matvec_body(const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1,
                                            float* y1, int n1, const void* w2, const float* b2, float* y2, int n2,
                                            const signed char* xq, const float* xs, int k, int mode) {
    static_assert(DT >= 3, "16-bit weights take matvec_half_body");
    constexpr int U = (DT == 5 || DT == 11 ? 4 : 8) / R;
    int lane = threadIdx.x & 31;
    MatvecRow m = matvec_row(R == 2, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);
    const void* w = m.w; int n = m.n, o = m.o;
    bool active = m.active;
    const void* wr[2] = {w, w1};
    // A 16-byte load is half a Q8_0 block, a Q4_0 or IQ4_NL block, a sub-block of an IQ4_XS
    // super-block, or an eighth of a Q4_K or Q5_K super-block (whose 16-byte header, scales and
    // minimums, comes with it, and for Q5_K the 16 bytes of fifth bits of its values).
    const int units = DT == 3 ? k / 16 : k / 32;
    const long total = (long)n * k;
    const uint4* base[R];
    const __half* sc[R];
    const uint4* head[R];
    const uint2* xsHead[R];
    const uint4* fifth[R];
    const unsigned* fifthWords[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        base[r] = (const uint4*)wr[r] + (long)o * units;
        if (DT == 3 || DT == 4 || DT == 7 || DT == 12) sc[r] = quant_scales(wr[r], DT, total) + (long)o * (k / 32);
        if (DT == 12) fifthWords[r] = (const unsigned*)((const unsigned char*)wr[r] + total / 2) + (long)o * (k / 32);
        if (DT == 5 || DT == 11) head[r] = (const uint4*)((const unsigned char*)wr[r] + total / 2) + (long)o * (k / 256);
        if (DT == 11) fifth[r] = (const uint4*)((const unsigned char*)wr[r] + total / 2 + total / 16) + (long)o * (k / 256) * 2;
        if (DT == 8) xsHead[r] = (const uint2*)((const unsigned char*)wr[r] + total / 2) + (long)o * (k / 256);
    }
    uint4 q[R][U], hq[R][U], qh[R][U];
    unsigned hw[R][U];
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        acc[r] = 0;
#pragma unroll
        for (int u = 0; u < U; u++) if (active && lane + u * 32 < units) {
            q[r][u] = __ldcs(base[r] + lane + u * 32);
            if (DT == 5 || DT == 11) hq[r][u] = head[r][(lane + u * 32) / 8];
            if (DT == 11) qh[r][u] = fifth[r][(lane + u * 32) / 8 * 2 + (lane + u * 32) % 2];
            if (DT == 12) hw[r][u] = fifthWords[r][lane + u * 32];
        }
    }
    gdc_wait();
    if (active) {
        for (int u0 = lane; u0 < units; u0 += 32 * U) {
            if (u0 != lane) {
#pragma unroll
                for (int r = 0; r < R; r++)
#pragma unroll
                    for (int u = 0; u < U; u++) if (u0 + u * 32 < units) {
                        q[r][u] = __ldcs(base[r] + u0 + u * 32);
                        if (DT == 5 || DT == 11) hq[r][u] = head[r][(u0 + u * 32) / 8];
                        if (DT == 11) qh[r][u] = fifth[r][(u0 + u * 32) / 8 * 2 + (u0 + u * 32) % 2];
                        if (DT == 12) hw[r][u] = fifthWords[r][u0 + u * 32];
                    }
            }
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = u0 + u * 32;
                if (i >= units) break;
                if (DT == 5 || DT == 11) {
                    Q4KX xv = q4k_x(xq, xs, i);
#pragma unroll
                    for (int r = 0; r < R; r++)
                        acc[r] += DT == 5 ? q4k_unit(q[r][u], hq[r][u], i, xv) : q5k_unit(q[r][u], qh[r][u], hq[r][u], i, xv);
                } else {
                    int blk = DT == 3 ? i / 2 : i;
                    float xd = xs[blk];
                    int4 a = *(const int4*)(xq + (DT == 3 ? i * 16 : i * 32)), c = make_int4(0, 0, 0, 0);
                    if (DT != 3) c = *(const int4*)(xq + i * 32 + 16);
#pragma unroll
                    for (int r = 0; r < R; r++) {
                        int sum;
                        if (DT == 3) {
                            sum = __dp4a((int)q[r][u].x, a.x, 0); sum = __dp4a((int)q[r][u].y, a.y, sum);
                            sum = __dp4a((int)q[r][u].z, a.z, sum); sum = __dp4a((int)q[r][u].w, a.w, sum);
                        } else if (DT == 7 || DT == 8) {
                            unsigned v[4] = {q[r][u].x, q[r][u].y, q[r][u].z, q[r][u].w};
                            sum = __dp4a(iq4_levels4(v[0]), a.x, 0); sum = __dp4a(iq4_levels4(v[1]), a.y, sum);
                            sum = __dp4a(iq4_levels4(v[2]), a.z, sum); sum = __dp4a(iq4_levels4(v[3]), a.w, sum);
                            sum = __dp4a(iq4_levels4(v[0] >> 4), c.x, sum); sum = __dp4a(iq4_levels4(v[1] >> 4), c.y, sum);
                            sum = __dp4a(iq4_levels4(v[2] >> 4), c.z, sum); sum = __dp4a(iq4_levels4(v[3] >> 4), c.w, sum);
                        } else {
                            unsigned v[4] = {q[r][u].x, q[r][u].y, q[r][u].z, q[r][u].w};
                            int lo[4], hi[4];
#pragma unroll
                            for (int j = 0; j < 4; j++) {
                                if (DT == 12) {
                                    lo[j] = (int)__vsub4((v[j] & 0x0F0F0F0F) | fifth_bits4(hw[r][u] >> (4 * j)), 0x10101010);
                                    hi[j] = (int)__vsub4(((v[j] >> 4) & 0x0F0F0F0F) | fifth_bits4(hw[r][u] >> (16 + 4 * j)), 0x10101010);
                                } else {
                                    lo[j] = (int)__vsub4(v[j] & 0x0F0F0F0F, 0x08080808);
                                    hi[j] = (int)__vsub4((v[j] >> 4) & 0x0F0F0F0F, 0x08080808);
                                }
                            }
                            sum = __dp4a(lo[0], a.x, 0); sum = __dp4a(lo[1], a.y, sum); sum = __dp4a(lo[2], a.z, sum); sum = __dp4a(lo[3], a.w, sum);
                            sum = __dp4a(hi[0], c.x, sum); sum = __dp4a(hi[1], c.y, sum); sum = __dp4a(hi[2], c.z, sum); sum = __dp4a(hi[3], c.w, sum);
                        }
                        float scale = DT == 8 ? iq4xs_scale(xsHead[r][i / 8], i % 8) : __half2float(sc[r][blk]);
                        acc[r] += scale * xd * (float)sum;
                    }
                }
            }
        }
    }
    if (active) matvec_store(m, acc[0], acc[R - 1], R == 2, b1, mode, lane);
}

// One token's products for Q6_K weights, as matvec_body: a unit is 16 values of each quarter of
// one half (128 values) of a super-block, 48 bytes (its low-nibble bytes for quarters 0 and 2,
// for 1 and 3, and its high-bit bytes), so one 16-value scale per quarter. A lane has U = 2 / R
// units of a row in flight. A row of exactly 32 units (2,048 values) fills one unit a lane, so
// there a warp that is not gated takes two rows (`paired`: rows 2w and 2w + 1, one a set of
// loads; the host launches half the warps) and keeps as many loads in flight as on longer rows:
// the Qwen3-30B-A3B shape's output matrix (151,936 x 2,048) took 144 us a token on an H200 with
// one row a warp, 72 waves of blocks each waiting out one round trip.
template <int R>
__device__ __forceinline__ void matvec_q6k_body(const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1,
                                                float* y1, int n1, const void* w2, const float* b2, float* y2, int n2,
                                                const signed char* xq, const float* xs, int k, int mode) {
    constexpr int U = 2 / R;
    int lane = threadIdx.x & 31;
    const int units = k / 64, perRow = k / 256;
    const bool paired = R == 1 && units == 32;
    const int warpIndex = (int)((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
    // Slot u's row (the warp's row, or row 2w + u when paired) and, gated, up's row beside it.
    MatvecRow m[U];
#pragma unroll
    for (int u = 0; u < U; u++)
        m[u] = matvec_row_at(paired ? 2 * warpIndex + u : warpIndex, R == 2, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);
    const unsigned char* vals[U][R];
    const signed char* scl[U][R];
    const __half* dd[U][R];
#pragma unroll
    for (int u = 0; u < U; u++) {
        const void* wr[2] = {m[u].w, w1};
        const long blocks = (long)m[u].n * k / 256;
#pragma unroll
        for (int r = 0; r < R; r++) {
            const unsigned char* base = (const unsigned char*)wr[r];
            vals[u][r] = base + (long)m[u].o * perRow * 192;
            scl[u][r] = (const signed char*)base + blocks * 192 + (long)m[u].o * perRow * 16;
            dd[u][r] = (const __half*)(base + blocks * 208) + (long)m[u].o * perRow;
        }
    }
    uint4 qa[R][U], qb[R][U], qh[R][U];
    float acc[U][R];
#pragma unroll
    for (int u = 0; u < U; u++)
#pragma unroll
        for (int r = 0; r < R; r++) acc[u][r] = 0;
    // Slot u's unit for the round that starts at u0 (units u0, u0 + 32 of one row, or unit u0 of two).
    auto unitOf = [&](int u0, int u) { return paired ? u0 : u0 + u * 32; };
    auto live = [&](int u0, int u) { return m[u].active && unitOf(u0, u) < units; };
    auto load = [&](int u0) {
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int u = 0; u < U; u++) {
                if (!live(u0, u)) continue;
                int i = unitOf(u0, u);
                const unsigned char* v = vals[u][r] + (i / 4) * 192;
                int half = (i % 4) / 2, lh = i % 2;
                qa[r][u] = __ldcs((const uint4*)(v + half * 64 + 16 * lh));
                qb[r][u] = __ldcs((const uint4*)(v + half * 64 + 32 + 16 * lh));
                qh[r][u] = __ldcs((const uint4*)(v + 128 + half * 32 + 16 * lh));
            }
    };
    const int step = paired ? 32 : 32 * U;
    load(lane);  // weights stream before the wait, as in matvec_body
    gdc_wait();
    for (int u0 = lane; u0 < units; u0 += step) {
        if (u0 != lane) load(u0);
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (!live(u0, u)) continue;
            int i = unitOf(u0, u), sb = i / 4;
            Q6KX xv = q6k_x(xq, xs, i);
#pragma unroll
            for (int r = 0; r < R; r++) {
                float t = q6k_unit(qa[r][u], qb[r][u], qh[r][u], scl[u][r] + sb * 16 + (i % 4) / 2 * 8 + i % 2, dd[u][r][sb], xv);
                if (paired) acc[u][r] += t; else acc[0][r] += t;  // one row: its units summed in order
            }
        }
    }
    if (paired) {
#pragma unroll
        for (int u = 0; u < U; u++) if (m[u].active) matvec_store(m[u], acc[u][0], acc[u][0], false, nullptr, mode, lane);
    } else if (m[0].active) {
        matvec_store(m[0], acc[0][0], acc[0][R - 1], R == 2, b1, mode, lane);
    }
}

#define MATVEC_Q6K(name, R)                                                                                                  \
    extern "C" __global__ void __launch_bounds__(256) name(                                                                  \
        const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1, float* y1, int n1, const void* w2, \
        const float* b2, float* y2, int n2, const float* x, const float* norm, float eps, const signed char* xq, const float* xs, \
        int k, int mode, const float* routes, int routeDiv) {                                                                \
        matvec_route(routes, routeDiv, k, n0, w0, w1, x, xq, xs, y0);                                                        \
        matvec_q6k_body<R>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, xq, xs, k, mode);                                 \
    }
MATVEC_Q6K(matvec_q6_K, 1)
MATVEC_Q6K(matvec_q6_K_gated, 2)

#define MATVEC(name, DT, R, MIN_BLOCKS)                                                                                      \
    extern "C" __global__ void __launch_bounds__(256, MIN_BLOCKS) name(                                                      \
        const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1, float* y1, int n1, const void* w2, \
        const float* b2, float* y2, int n2, const float* x, const float* norm, float eps, const signed char* xq, const float* xs, \
        int k, int mode, const float* routes, int routeDiv) {                                                                \
        matvec_route(routes, routeDiv, k, n0, w0, w1, x, xq, xs, y0);                                                        \
        if constexpr (DT <= 2)                                                                                               \
            matvec_half_body<DT, R>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, x, norm, eps, k, mode);                  \
        else                                                                                                                 \
            matvec_body<DT, R>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, xq, xs, k, mode);                             \
    }
// Four blocks an SM (64 registers a thread) where that costs no spills (or, for the 16-bit
// kernels, 8 bytes): more rows in flight.
MATVEC(matvec_f16, 1, 1, 4)
MATVEC(matvec_f16_gated, 1, 2, 4)
MATVEC(matvec_bf16, 2, 1, 4)
MATVEC(matvec_bf16_gated, 2, 2, 4)
MATVEC(matvec_q8_0, 3, 1, 3)
MATVEC(matvec_q8_0_gated, 3, 2, 3)
MATVEC(matvec_q4_0, 4, 1, 4)
MATVEC(matvec_q4_0_gated, 4, 2, 4)
MATVEC(matvec_q5_0, 12, 1, 3)
MATVEC(matvec_q5_0_gated, 12, 2, 3)
MATVEC(matvec_q4_K, 5, 1, 3)
MATVEC(matvec_q4_K_gated, 5, 2, 3)
MATVEC(matvec_q5_K, 11, 1, 3)
MATVEC(matvec_q5_K_gated, 11, 2, 3)
MATVEC(matvec_iq4_nl, 7, 1, 4)
MATVEC(matvec_iq4_nl_gated, 7, 2, 4)
MATVEC(matvec_iq4_xs, 8, 1, 4)
MATVEC(matvec_iq4_xs_gated, 8, 2, 4)

// One token's products for Q3_K (DT 9) and Q2_K (DT 10) weights, as matvec_q6k_body: a unit is
// 16 values of each quarter of one half (128 values) of a super-block: 16 bytes of low bits
// (and for Q3_K 16 bytes of high bits), four 16-value sub-blocks, dequantized in registers
// four values a word and multiplied with the 8-bit activations by dp4a.
template <int DT, int R>
__device__ __forceinline__ void matvec_low_k_body(const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1,
                                                  float* y1, int n1, const void* w2, const float* b2, float* y2, int n2,
                                                  const signed char* xq, const float* xs, int k, int mode) {
    constexpr int U = 4 / R;
    constexpr int VB = DT == 9 ? 96 : 64, SB = DT == 9 ? 12 : 16;
    int lane = threadIdx.x & 31;
    MatvecRow m = matvec_row(R == 2, w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2);
    const void* w = m.w; int n = m.n, o = m.o;
    bool active = m.active;
    const void* wr[2] = {w, w1};
    const long blocks = (long)n * k / 256;
    const int units = k / 64, perRow = k / 256;
    const unsigned char* vals[R];
    const unsigned char* scl[R];
    const __half* dd[R];
#pragma unroll
    for (int r = 0; r < R; r++) {
        const unsigned char* base = (const unsigned char*)wr[r];
        vals[r] = base + (long)o * perRow * VB;
        scl[r] = base + blocks * VB + (long)o * perRow * SB;
        dd[r] = (const __half*)(base + blocks * (VB + SB)) + (long)o * perRow * (DT == 9 ? 1 : 2);
    }
    uint4 ql[R][U], qh[R][U];
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0;
    auto load = [&](int u0) {
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = u0 + u * 32;
                if (i >= units) break;
                const unsigned char* v = vals[r] + (i / 4) * VB;
                int half = (i % 4) / 2, lh = i % 2;
                ql[r][u] = __ldcs((const uint4*)(v + (DT == 9 ? 32 : 0) + half * 32 + 16 * lh));
                if (DT == 9) qh[r][u] = __ldcs((const uint4*)(v + 16 * lh));
            }
    };
    if (active) load(lane);  // weights stream before the wait, as in matvec_body
    gdc_wait();
    if (active) {
        for (int u0 = lane; u0 < units; u0 += 32 * U) {
            if (u0 != lane) load(u0);
#pragma unroll
            for (int u = 0; u < U; u++) {
                int i = u0 + u * 32;
                if (i >= units) break;
                int sb = i / 4, half = (i % 4) / 2, lh = i % 2;
                long p0 = (long)sb * 256 + half * 128 + 16 * lh;
                int xw[4][4], xsum[4];
                float xd[4];
#pragma unroll
                for (int t = 0; t < 4; t++) {
                    int4 a = *(const int4*)(xq + p0 + 32 * t);
                    xw[t][0] = a.x; xw[t][1] = a.y; xw[t][2] = a.z; xw[t][3] = a.w;
                    xd[t] = xs[(p0 + 32 * t) / 32];
                    xsum[t] = 0;
                    if (DT == 10) {
#pragma unroll
                        for (int j = 0; j < 4; j++) xsum[t] = __dp4a(0x01010101, xw[t][j], xsum[t]);
                    }
                }
#pragma unroll
                for (int r = 0; r < R; r++) {
                    unsigned L[4] = {ql[r][u].x, ql[r][u].y, ql[r][u].z, ql[r][u].w};
                    unsigned H[4] = {qh[r][u].x, qh[r][u].y, qh[r][u].z, qh[r][u].w};
                    const unsigned char* sc = scl[r] + sb * SB;
                    float sum = 0, mins = 0;
#pragma unroll
                    for (int t = 0; t < 4; t++) {
                        int dot = 0;
#pragma unroll
                        for (int j = 0; j < 4; j++) {
                            unsigned v = (L[j] >> (2 * t)) & 0x03030303;
                            if (DT == 9) v = __vsub4(v | (((H[j] >> (4 * half + t)) & 0x01010101) << 2), 0x04040404);
                            dot = __dp4a((int)v, xw[t][j], dot);
                        }
                        int sub = 8 * half + 2 * t + lh;
                        if (DT == 9) {
                            sum += q3k_scale(sc, sub) * xd[t] * dot;
                        } else {
                            sum += (sc[sub] & 15) * xd[t] * dot;
                            mins += (sc[sub] >> 4) * xd[t] * xsum[t];
                        }
                    }
                    if (DT == 9) acc[r] += __half2float(dd[r][sb]) * sum;
                    else acc[r] += __half2float(dd[r][2 * sb]) * sum - __half2float(dd[r][2 * sb + 1]) * mins;
                }
            }
        }
    }
    if (active) matvec_store(m, acc[0], acc[R - 1], R == 2, b1, mode, lane);
}

#define MATVEC_LOW_K(name, DT, R)                                                                                            \
    extern "C" __global__ void __launch_bounds__(256) name(                                                                  \
        const void* w0, const float* b0, float* y0, int n0, const void* w1, const float* b1, float* y1, int n1, const void* w2, \
        const float* b2, float* y2, int n2, const float* x, const float* norm, float eps, const signed char* xq, const float* xs, \
        int k, int mode, const float* routes, int routeDiv) {                                                                \
        matvec_route(routes, routeDiv, k, n0, w0, w1, x, xq, xs, y0);                                                        \
        matvec_low_k_body<DT, R>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, xq, xs, k, mode);                           \
    }
MATVEC_LOW_K(matvec_q3_K, 9, 1)
MATVEC_LOW_K(matvec_q3_K_gated, 9, 2)
MATVEC_LOW_K(matvec_q2_K, 10, 1)
MATVEC_LOW_K(matvec_q2_K_gated, 10, 2)

// acc[t] += dot(W[row, :], x[t0 + t, :]) for nt <= TOKENS tokens, by one warp: each lane
// reads 16 bytes of the row at a time, four loads in flight, so a decode step streams the
// weights once.
#define TOKENS 8
__device__ __forceinline__ void warp_row_dot(const void* w, int dtype, long total, long row, const float* x, const signed char* xq,
                                             const float* xs, int k, int t0, int nt, int lane, float* acc) {
    if (dtype >= 3) {
        // A lane per 32-value block: neighbouring lanes read neighbouring blocks.
        for (long b = lane; b < k / 32; b += 32) block_dot(w, dtype, total, row, b, xq, xs, k, t0, nt, acc);
    } else if ((k & 7) == 0) {
        for (int i0 = lane * 8; i0 < k; i0 += 1024) {
            float wv[4][8];
#pragma unroll
            for (int u = 0; u < 4; u++) if (i0 + u * 256 < k) load8(w, dtype, row + i0 + u * 256, wv[u]);
#pragma unroll
            for (int u = 0; u < 4; u++) {
                int i = i0 + u * 256;
                if (i >= k) break;
                for (int t = 0; t < nt; t++) {
                    const float4* xp = (const float4*)(x + (long)(t0 + t) * k + i);
                    float4 a = xp[0], b = xp[1];
                    acc[t] += wv[u][0] * a.x + wv[u][1] * a.y + wv[u][2] * a.z + wv[u][3] * a.w
                            + wv[u][4] * b.x + wv[u][5] * b.y + wv[u][6] * b.z + wv[u][7] * b.w;
                }
            }
        }
    } else {
        for (int i = lane; i < k; i += 32) {
            float wv = load_weight(w, dtype, row + i, total);
            for (int t = 0; t < nt; t++) acc[t] += wv * x[(long)(t0 + t) * k + i];
        }
    }
    for (int t = 0; t < nt; t++) acc[t] = warp_sum(acc[t]);
}

// acc[t] += dot(W[row, :], x[t0 + t, :]) for nt tokens of 8-bit x (xq, xs), by one warp, for a
// Q4_K row (`row` its first value): a lane per 16 bytes of values, 32 values of two sub-blocks,
// as matvec_body reads them, the weights read once for all nt tokens. FIFTH: a Q5_K row, each
// value's fifth bit from the super-block's 32 bytes of them (as q5k_unit).
template <bool FIFTH>
__device__ __forceinline__ void q4k_row_dot(const void* w, long total, long row, const signed char* xq, const float* xs, int k,
                                            int t0, int nt, int lane, float* acc) {
    const uint4* base = (const uint4*)w + row / 32;
    const uint4* head = (const uint4*)((const unsigned char*)w + total / 2) + row / 256;
    const uint4* fifth = (const uint4*)((const unsigned char*)w + total / 2 + total / 16) + row / 128;
    for (int i = lane; i < k / 32; i += 32) {
        uint4 qv = __ldg(base + i), h = head[i / 8];
        int j = (i % 8) / 2, half = i % 2;
        float d, dmin;
        int s1, m1, s2, m2;
        q4k_header(h, 2 * j, d, dmin, s1, m1, s2, m2);
        unsigned v[4] = {qv.x, qv.y, qv.z, qv.w};
        int lo4[4], hi4[4];
#pragma unroll
        for (int b = 0; b < 4; b++) { lo4[b] = (int)(v[b] & 0x0F0F0F0F); hi4[b] = (int)((v[b] >> 4) & 0x0F0F0F0F); }
        if (FIFTH) {
            uint4 hv = __ldg(fifth + (i / 8) * 2 + half);
            unsigned f[4] = {hv.x, hv.y, hv.z, hv.w};
#pragma unroll
            for (int b = 0; b < 4; b++) {
                lo4[b] |= (int)(((f[b] >> (2 * j)) & 0x01010101) << 4);
                hi4[b] |= (int)(((f[b] >> (2 * j + 1)) & 0x01010101) << 4);
            }
        }
        long at = (long)(i / 8) * 256 + 64 * j + 16 * half;
        for (int t = 0; t < nt; t++) {
            const signed char* xr = xq + (long)(t0 + t) * k;
            const float* sr = xs + (long)(t0 + t) * (k / 32);
            int4 a = *(const int4*)(xr + at), c = *(const int4*)(xr + at + 32);
            int sa = __dp4a(0x01010101, a.x, 0); sa = __dp4a(0x01010101, a.y, sa); sa = __dp4a(0x01010101, a.z, sa); sa = __dp4a(0x01010101, a.w, sa);
            int sc = __dp4a(0x01010101, c.x, 0); sc = __dp4a(0x01010101, c.y, sc); sc = __dp4a(0x01010101, c.z, sc); sc = __dp4a(0x01010101, c.w, sc);
            int lo = __dp4a(lo4[0], a.x, 0); lo = __dp4a(lo4[1], a.y, lo); lo = __dp4a(lo4[2], a.z, lo); lo = __dp4a(lo4[3], a.w, lo);
            int hi = __dp4a(hi4[0], c.x, 0); hi = __dp4a(hi4[1], c.y, hi); hi = __dp4a(hi4[2], c.z, hi); hi = __dp4a(hi4[3], c.w, hi);
            acc[t] += sr[at / 32] * (d * s1 * lo - dmin * m1 * sa) + sr[at / 32 + 1] * (d * s2 * hi - dmin * m2 * sc);
        }
    }
    for (int t = 0; t < nt; t++) acc[t] = warp_sum(acc[t]);
}

// The same for a Q6_K row: a lane per unit of matvec_q6k_body (16 values of each quarter of one
// half of a super-block, 48 bytes, four 16-value scales).
__device__ __forceinline__ void q6k_row_dot(const void* w, long total, long row, const signed char* xq, const float* xs, int k,
                                            int t0, int nt, int lane, float* acc) {
    const long blocks = total / 256;
    const unsigned char* vals = (const unsigned char*)w + (row / 256) * 192;
    const signed char* scl = (const signed char*)w + blocks * 192 + (row / 256) * 16;
    const __half* dd = (const __half*)((const unsigned char*)w + blocks * 208) + row / 256;
    for (int i = lane; i < k / 64; i += 32) {
        int sb = i / 4, half = (i % 4) / 2, lh = i % 2;
        const unsigned char* v = vals + sb * 192;
        uint4 qa = __ldg((const uint4*)(v + half * 64 + 16 * lh)), qb = __ldg((const uint4*)(v + half * 64 + 32 + 16 * lh));
        uint4 qh = __ldg((const uint4*)(v + 128 + half * 32 + 16 * lh));
        unsigned A[4] = {qa.x, qa.y, qa.z, qa.w}, B[4] = {qb.x, qb.y, qb.z, qb.w}, H[4] = {qh.x, qh.y, qh.z, qh.w};
        int q[4][4];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            q[0][j] = (int)__vsub4((A[j] & 0x0F0F0F0F) | ((H[j] << 4) & 0x30303030), 0x20202020);
            q[1][j] = (int)__vsub4((B[j] & 0x0F0F0F0F) | ((H[j] << 2) & 0x30303030), 0x20202020);
            q[2][j] = (int)__vsub4(((A[j] >> 4) & 0x0F0F0F0F) | (H[j] & 0x30303030), 0x20202020);
            q[3][j] = (int)__vsub4(((B[j] >> 4) & 0x0F0F0F0F) | ((H[j] >> 2) & 0x30303030), 0x20202020);
        }
        const signed char* sc = scl + sb * 16 + half * 8 + lh;
        float d = __half2float(dd[sb]);
        long p0 = (long)sb * 256 + half * 128 + 16 * lh;
        for (int t = 0; t < nt; t++) {
            const signed char* xr = xq + (long)(t0 + t) * k;
            const float* sr = xs + (long)(t0 + t) * (k / 32);
            float sum = 0;
#pragma unroll
            for (int quarter = 0; quarter < 4; quarter++) {
                int4 a = *(const int4*)(xr + p0 + 32 * quarter);
                int dot = __dp4a(q[quarter][0], a.x, 0);
                dot = __dp4a(q[quarter][1], a.y, dot); dot = __dp4a(q[quarter][2], a.z, dot); dot = __dp4a(q[quarter][3], a.w, dot);
                sum += sc[2 * quarter] * sr[(p0 + 32 * quarter) / 32] * dot;
            }
            acc[t] += d * sum;
        }
    }
    for (int t = 0; t < nt; t++) acc[t] = warp_sum(acc[t]);
}

// acc[t] += dot(W[row, :], x[t0 + t, :]) for nt tokens, by one warp, for every weight type (xq,
// xs: x rounded to 8 bits, for the quantized types): warp_row_dot for the float types, Q8_0,
// Q4_0 and IQ4_NL; Q4_K, Q5_K and Q6_K on 8-bit x with dp4a; the other types value by value on
// f32 x.
__device__ __forceinline__ void row_dot(const void* w, int dtype, long total, long row, const float* x, const signed char* xq,
                                        const float* xs, int k, int t0, int nt, int lane, float* acc) {
    if (dtype <= 4 || dtype == 7 || dtype == 12) {
        warp_row_dot(w, dtype, total, row, x, xq, xs, k, t0, nt, lane, acc);
    } else if (dtype == 5) {
        q4k_row_dot<false>(w, total, row, xq, xs, k, t0, nt, lane, acc);
    } else if (dtype == 11) {
        q4k_row_dot<true>(w, total, row, xq, xs, k, t0, nt, lane, acc);
    } else if (dtype == 6) {
        q6k_row_dot(w, total, row, xq, xs, k, t0, nt, lane, acc);
    } else {
        for (int i = lane; i < k; i += 32) {
            float wv = load_weight(w, dtype, row + i, total);
            for (int t = 0; t < nt; t++) acc[t] += wv * x[(long)(t0 + t) * k + i];
        }
        for (int t = 0; t < nt; t++) acc[t] = warp_sum(acc[t]);
    }
}

// Products of up to three weights with the same input, one warp per output row (rows of
// matrix 0, then 1, then 2). mode 0: y = W x + b; 1: y += W x + b (the residual add fused);
// 2: gated, y0 = silu(W0 x + b0) * (W1 x + b1), one warp computing both rows.
extern "C" __global__ void matmul_rows(const void* w0, const float* b0, float* y0, int n0,
                                       const void* w1, const float* b1, float* y1, int n1,
                                       const void* w2, const float* b2, float* y2, int n2,
                                       int dtype, const float* x, const signed char* xq, const float* xs, int k, int tokens,
                                       int mode) {
    gdc_wait();
    int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
    const void* w = w0; const float* b = b0; float* y = y0; int n = n0, o = warp;
    if (mode != 2 && o >= n0) {
        o -= n0; w = w1; b = b1; y = y1; n = n1;
        if (o >= n1) { o -= n1; w = w2; b = b2; y = y2; n = n2; }
    }
    if (o >= n) return;
    for (int t0 = 0; t0 < tokens; t0 += TOKENS) {
        int nt = min(TOKENS, tokens - t0);
        float acc[TOKENS];
        for (int t = 0; t < TOKENS; t++) acc[t] = 0;
        row_dot(w, dtype, (long)n * k, (long)o * k, x, xq, xs, k, t0, nt, lane, acc);
        if (mode == 2) {
            float up[TOKENS];
            for (int t = 0; t < TOKENS; t++) up[t] = 0;
            row_dot(w1, dtype, (long)n * k, (long)o * k, x, xq, xs, k, t0, nt, lane, up);
            if (lane == 0) {
                for (int t = 0; t < nt; t++) {
                    float g = acc[t] + (b0 ? b0[o] : 0.f), u = up[t] + (b1 ? b1[o] : 0.f);
                    y0[(long)(t0 + t) * n + o] = g / (1.f + __expf(-g)) * u;
                }
            }
        } else if (lane == 0) {
            for (int t = 0; t < nt; t++) {
                float v = acc[t] + (b ? b[o] : 0.f);
                long at = (long)(t0 + t) * n + o;
                y[at] = mode == 1 ? y[at] + v : v;
            }
        }
    }
}

// Values i0 ..< i0 + 8 of a quantized matrix of `total` values (i0 a multiple of 8) as BF16, each
// the value load_weight gives: the common types decode their block's scale (or Q4_K's header)
// once for the eight and read their bytes in one load, so widening a matrix is bound by its
// writes, not by decoding every value on its own.
__device__ __forceinline__ uint4 dequant8_bf16(const void* w, int dtype, long i0, long total) {
    float f[8];
    const unsigned char* base = (const unsigned char*)w;
    if (dtype == 3) {
        uint2 raw = *(const uint2*)(base + i0);
        float d = __half2float(quant_scales(w, 3, total)[i0 / 32]);
        const signed char* q = (const signed char*)&raw;
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = d * (float)q[e];
    } else if (dtype == 4 || dtype == 7 || dtype == 12) {
        // Values 0-15 of a 32-value block are its 16 bytes' low nibbles, 16-31 their high ones;
        // Q5_0's fifth bits: bit r of the block's word.
        int r = (int)(i0 % 32);
        uint2 raw = *(const uint2*)(base + (i0 / 32) * 16 + r % 16);
        const unsigned char* b = (const unsigned char*)&raw;
        unsigned h = dtype == 12 ? ((const unsigned*)(base + total / 2))[i0 / 32] >> r : 0;
        float d = __half2float(quant_scales(w, dtype, total)[i0 / 32]);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int q = r < 16 ? (b[e] & 15) : (b[e] >> 4);
            f[e] = dtype == 4 ? d * (float)(q - 8) : dtype == 12 ? d * (float)((q | (int)(((h >> e) & 1) << 4)) - 16) : d * (float)iq4_level(q);
        }
    } else if (dtype == 5 || dtype == 11) {
        long sb = i0 / 256;
        int r = (int)(i0 % 256), j = r / 64, l = r % 64;
        uint2 raw = *(const uint2*)(base + sb * 128 + 32 * j + l % 32);
        uint2 fifth = dtype == 11 ? *(const uint2*)(base + total / 2 + total / 16 + sb * 32 + l % 32) : make_uint2(0, 0);
        const unsigned char* b = (const unsigned char*)&raw;
        const unsigned char* hb = (const unsigned char*)&fifth;
        uint4 h = ((const uint4*)(base + total / 2))[sb];
        float d, dmin;
        int s1, m1, s2, m2;
        q4k_header(h, 2 * j, d, dmin, s1, m1, s2, m2);
        int sc = l < 32 ? s1 : s2, m = l < 32 ? m1 : m2;
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int q = (l < 32 ? (b[e] & 15) : (b[e] >> 4)) | (((hb[e] >> (2 * j + l / 32)) & 1) << 4);
            f[e] = __fmaf_rn(d * sc, (float)q, -(dmin * m));
        }
    } else if (dtype == 6) {
        long sb = i0 / 256, blocks = total / 256;
        int r = (int)(i0 % 256), n = r / 128, qd = (r % 128) / 32, l = r % 32;
        const unsigned char* v = base + sb * 192;
        uint2 lo = *(const uint2*)(v + n * 64 + l + (qd & 1 ? 32 : 0)), hi = *(const uint2*)(v + 128 + n * 32 + l);
        const unsigned char* bl = (const unsigned char*)&lo;
        const unsigned char* bh = (const unsigned char*)&hi;
        int sc = ((const signed char*)base + blocks * 192)[sb * 16 + n * 8 + l / 16 + 2 * qd];
        float d = __half2float(((const __half*)(base + blocks * 208))[sb]);
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int q = ((qd < 2 ? (bl[e] & 15) : (bl[e] >> 4)) | (((bh[e] >> (2 * qd)) & 3) << 4)) - 32;
            f[e] = d * sc * q;
        }
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) f[e] = load_weight(w, dtype, i0 + e, total);
    }
    uint4 out;
    unsigned* o = (unsigned*)&out;
#pragma unroll
    for (int e = 0; e < 4; e++) {
        __nv_bfloat162 pair = __floats2bfloat162_rn(f[2 * e], f[2 * e + 1]);
        o[e] = *(unsigned*)&pair;
    }
    return out;
}

// A quantized matrix of n values (a multiple of 8) widened to BF16 for cuBLAS products over many
// tokens, eight values a thread.
extern "C" __global__ void dequantize_bf16(const void* w, int dtype, __nv_bfloat16* out, long n) {
    gdc_wait();
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i < n) *(uint4*)(out + i) = dequant8_bf16(w, dtype, i, n);
}

// The chosen experts' weights of one projection widened to BF16 for cuBLAS: block row y takes
// the y-th chosen expert (active[0..<active[experts]], as moe_group lists them), n values each
// (a multiple of 8), eight a thread.
extern "C" __global__ void dequantize_experts_bf16(const unsigned long long* weights, const int* active, int experts, int dtype, long n,
                                                   __nv_bfloat16* out) {
    gdc_wait();
    int a = blockIdx.y;
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (a >= active[experts] || i >= n) return;
    *(uint4*)(out + (long)a * n + i) = dequant8_bf16((const void*)weights[active[a]], dtype, i, n);
}

// Values i0 ..< i0 + 32 (i0 a multiple of 32) of a quantized matrix of `total` values as BF16,
// each the value load_weight gives, into out: Q4_K, Q5_K, Q6_K, Q8_0 and Q4_0 decode their block's
// scales once for the 32 and read the bytes in 16-byte loads; the other types go eight at a time.
__device__ __forceinline__ void dequant32_bf16(const void* w, int dtype, long i0, long total, uint4 (&out)[4]) {
    const unsigned char* base = (const unsigned char*)w;
    float f[32];
    if (dtype == 5 || dtype == 11) {
        // Q4_K: the 32 bytes of the sub-block pair (values of sub-block 2j low, 2j + 1 high);
        // Q5_K: with the fifth bits (bit 2j + high of the super-block's 32 bytes of them).
        long sb = i0 / 256;
        int r = (int)(i0 % 256), j = r / 64, high = (r % 64) / 32;
        const uint4* q = (const uint4*)(base + sb * 128 + 32 * j);
        const uint4* qh = (const uint4*)(base + total / 2 + total / 16 + sb * 32);
        float d, dmin;
        int s1, m1, s2, m2;
        q4k_header(((const uint4*)(base + total / 2))[sb], 2 * j, d, dmin, s1, m1, s2, m2);
        float scale = d * (high ? s2 : s1), offset = dmin * (high ? m2 : m1);
#pragma unroll
        for (int c = 0; c < 2; c++) {
            uint4 v = q[c], hv = dtype == 11 ? qh[c] : make_uint4(0, 0, 0, 0);
            const unsigned char* b = (const unsigned char*)&v;
            const unsigned char* hb = (const unsigned char*)&hv;
#pragma unroll
            for (int e = 0; e < 16; e++)
                f[16 * c + e] = __fmaf_rn(scale, (float)((high ? b[e] >> 4 : b[e] & 15) | (((hb[e] >> (2 * j + high)) & 1) << 4)), -offset);
        }
    } else if (dtype == 6) {
        // Q6_K: low 4 bits from ql, high 2 from qh, a scale per 16 values.
        long sb = i0 / 256, blocks = total / 256;
        int r = (int)(i0 % 256), n = r / 128, qd = (r % 128) / 32;
        const unsigned char* v = base + sb * 192;
        const uint4* lo = (const uint4*)(v + n * 64 + (qd & 1 ? 32 : 0));
        const uint4* hi = (const uint4*)(v + 128 + n * 32);
        const signed char* sc = (const signed char*)base + blocks * 192 + sb * 16 + n * 8 + 2 * qd;
        float d = __half2float(((const __half*)(base + blocks * 208))[sb]);
#pragma unroll
        for (int c = 0; c < 2; c++) {
            uint4 l4 = lo[c], h4 = hi[c];
            const unsigned char* bl = (const unsigned char*)&l4;
            const unsigned char* bh = (const unsigned char*)&h4;
            float scale = d * sc[c];
#pragma unroll
            for (int e = 0; e < 16; e++)
                f[16 * c + e] = scale * (float)(((qd < 2 ? (bl[e] & 15) : (bl[e] >> 4)) | (((bh[e] >> (2 * qd)) & 3) << 4)) - 32);
        }
    } else if (dtype == 3 || dtype == 4) {
        float d = __half2float(quant_scales(w, dtype, total)[i0 / 32]);
        if (dtype == 3) {
#pragma unroll
            for (int c = 0; c < 2; c++) {
                uint4 v = ((const uint4*)(base + i0))[c];
                const signed char* q = (const signed char*)&v;
#pragma unroll
                for (int e = 0; e < 16; e++) f[16 * c + e] = d * (float)q[e];
            }
        } else {
            // Q4_0: values 0-15 the 16 bytes' low nibbles, 16-31 their high ones, offset by 8.
            uint4 v = *(const uint4*)(base + (i0 / 32) * 16);
            const unsigned char* b = (const unsigned char*)&v;
#pragma unroll
            for (int e = 0; e < 16; e++) {
                f[e] = d * (float)((b[e] & 15) - 8);
                f[16 + e] = d * (float)((b[e] >> 4) - 8);
            }
        }
    } else {
#pragma unroll
        for (int c = 0; c < 4; c++) out[c] = dequant8_bf16(w, dtype, i0 + 8 * c, total);
        return;
    }
#pragma unroll
    for (int c = 0; c < 4; c++) {
        unsigned* o = (unsigned*)&out[c];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            __nv_bfloat162 pair = __floats2bfloat162_rn(f[8 * c + 2 * e], f[8 * c + 2 * e + 1]);
            o[e] = *(unsigned*)&pair;
        }
    }
}

// Activations to the weights' 16-bit type, for cuBLAS products.
// A thread takes four values: one 16-byte load where x is so aligned.
extern "C" __global__ void to_half(const float* x, void* out, int dtype, long n) {
    gdc_wait();
    long i = ((long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i + 4 <= n && ((unsigned long)(x + i) & 15) == 0) {
        float4 v = *(const float4*)(x + i);
        store_half(out, dtype, i, v.x); store_half(out, dtype, i + 1, v.y);
        store_half(out, dtype, i + 2, v.z); store_half(out, dtype, i + 3, v.w);
    } else {
        for (long j = i; j < i + 4 && j < n; j++) store_half(out, dtype, j, x[j]);
    }
}

extern "C" __global__ void add_bias(float* y, const float* bias, int outDim, long n) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += bias[i % outDim];
}

// One thread per rotated pair of the first rotDim dimensions of each head (the rest are left as
// they are). Pair i is (i, i + rotDim/2), or (2i, 2i + 1) when interleaved.
extern "C" __global__ void rope(float* x, const float* cosT, const float* sinT, int rows, int heads, int headDim, int rotDim,
                                int interleaved) {
    gdc_wait();
    int half = rotDim / 2;
    long idx = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long)rows * heads * half) return;
    int i = idx % half;
    long rh = idx / half;
    int r = rh / heads;
    float* p = x + rh * headDim;
    int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
    float c = cosT[(long)r * half + i], s = sinT[(long)r * half + i];
    float u = p[a], v = p[b];
    p[a] = u * c - v * s;
    p[b] = v * c + u * s;
}

// Where position `pos` of the sequence in block-table row `slot` lives in a layer's KV pool: the
// offset of its row (blocks of `bs` positions, `width` table entries a row).
__device__ __forceinline__ long kv_at(const int* tables, int width, int bs, int slot, int pos, int row) {
    return ((long)tables[(long)slot * width + pos / bs] * bs + pos % bs) * row;
}

// The KV cache's elements are f32 or f16. The attention kernels are templates over the element
// type KV (their extern "C" entry points pick one by `kvHalf`), so their loads stay
// straight-line; the kernels that only write the cache take the flag (kv_store). KVBits<KV>:
// - load/load4: an element at offset i (or four, i a multiple of 4: one 16- or 8-byte load) as
//   its stored bits, widen/widen4 them to f32 after: f16 is loaded as 16-bit integers, which the
//   compiler predicates and issues together, where a load followed by its conversion (inline
//   assembly) would be branched around, one load at a time;
// - store: an f32 value written as the cache holds it; round: the same rounding, for the token's
//   own key or value used before it is read back;
// - widen_chunk: 16 stored bytes (perChunk elements: 4 f32 or 8 f16) as f32.
template <typename KV> struct KVBits;
template <> struct KVBits<float> {
    typedef float Stored;
    typedef float4 Stored4;
    static __device__ __forceinline__ Stored load(const float* p, long i) { return p[i]; }
    static __device__ __forceinline__ float widen(Stored x) { return x; }
    static __device__ __forceinline__ Stored4 load4(const float* p, long i) { return *(const float4*)(p + i); }
    static __device__ __forceinline__ float4 widen4(Stored4 x) { return x; }
    static __device__ __forceinline__ void store(float* p, long i, float v) { p[i] = v; }
    static __device__ __forceinline__ float round(float v) { return v; }
    static constexpr int perChunk = 4;
    static __device__ __forceinline__ void widen_chunk(uint4 raw, float* x) {
        x[0] = __uint_as_float(raw.x); x[1] = __uint_as_float(raw.y); x[2] = __uint_as_float(raw.z); x[3] = __uint_as_float(raw.w);
    }
};
template <> struct KVBits<__half> {
    typedef unsigned short Stored;
    typedef uint2 Stored4;
    static __device__ __forceinline__ Stored load(const __half* p, long i) { return ((const unsigned short*)p)[i]; }
    static __device__ __forceinline__ float widen(Stored x) { return __half2float(__ushort_as_half(x)); }
    static __device__ __forceinline__ Stored4 load4(const __half* p, long i) { return *(const uint2*)(p + i); }
    static __device__ __forceinline__ float4 widen4(Stored4 x) {
        float2 a = __half22float2(*(const __half2*)&x.x), b = __half22float2(*(const __half2*)&x.y);
        return make_float4(a.x, a.y, b.x, b.y);
    }
    static __device__ __forceinline__ void store(__half* p, long i, float v) { p[i] = __float2half_rn(v); }
    static __device__ __forceinline__ float round(float v) { return __half2float(__float2half_rn(v)); }
    static constexpr int perChunk = 8;
    static __device__ __forceinline__ void widen_chunk(uint4 raw, float* x) {
        unsigned w[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float2 f = __half22float2(*(const __half2*)&w[i]);
            x[2 * i] = f.x; x[2 * i + 1] = f.y;
        }
    }
};

__device__ __forceinline__ void kv_store(void* base, long i, float v, int kvHalf) {
    if (kvHalf) KVBits<__half>::store((__half*)base, i, v); else KVBits<float>::store((float*)base, i, v);
}

// RoPE on a token's query and key heads (their first rotDim dimensions), and its rotated key and
// value rows written to the cache at (slot, position): block (token, head) takes one query head,
// or one key/value head.
extern "C" __global__ void rope_store_kv(float* q, const float* k, const float* v, void* kc, void* vc, const float* cosT,
                                         const float* sinT, const int* slots, const int* positions, int heads, int kvHeads,
                                         int headDim, int rotDim, const int* tables, int width, int bs, int interleaved,
                                         int kvHalf) {
    gdc_wait();
    int t = blockIdx.x, h = blockIdx.y, half = rotDim / 2, row = kvHeads * headDim;
    const float* c = cosT + (long)t * half;
    const float* s = sinT + (long)t * half;
    long at = kv_at(tables, width, bs, slots[t], positions[t], row);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        int a = interleaved ? 2 * i : i, b = interleaved ? 2 * i + 1 : i + half;
        if (h < heads) {
            float* p = q + ((long)t * heads + h) * headDim;
            float u = p[a], w = p[b];
            p[a] = u * c[i] - w * s[i];
            p[b] = w * c[i] + u * s[i];
        } else {
            int kh = h - heads;
            const float* p = k + ((long)t * kvHeads + kh) * headDim;
            float u = p[a], w = p[b];
            kv_store(kc, at + kh * headDim + a, u * c[i] - w * s[i], kvHalf);
            kv_store(kc, at + kh * headDim + b, w * c[i] + u * s[i], kvHalf);
        }
    }
    if (h >= heads) {
        int kh = h - heads;
        const float* p = k + ((long)t * kvHeads + kh) * headDim;
        for (int i = rotDim + threadIdx.x; i < headDim; i += blockDim.x) kv_store(kc, at + kh * headDim + i, p[i], kvHalf);
        for (int i = threadIdx.x; i < headDim; i += blockDim.x)
            kv_store(vc, at + kh * headDim + i, v[((long)t * kvHeads + kh) * headDim + i], kvHalf);
    }
}

// rope_store_kv and split_columns in one: the token's row of a product over stacked q, k and v
// ([heads + 2 kvHeads] x headDim values) is parted into q (rotated), k and v (as computed), its
// rotated key and its value written to the cache. Block (token, c) takes ROPE_HEADS of the
// heads + kvHeads heads, a thread an element (reading its rotation partner too): a decode step's
// few values a token spread over enough blocks.
#define ROPE_HEADS 4
extern "C" __global__ void rope_store_kv_stacked(const float* src, float* q, float* k, float* v, void* kc, void* vc,
                                                 const float* cosT, const float* sinT, const int* slots, const int* positions,
                                                 int heads, int kvHeads, int headDim, int rotDim, const int* tables, int width,
                                                 int bs, int interleaved, int kvHalf) {
    gdc_wait();
    int t = blockIdx.x, half = rotDim / 2, row = kvHeads * headDim;
    const float* r = src + (long)t * (heads + 2 * kvHeads) * headDim;
    const float* c = cosT + (long)t * half;
    const float* s = sinT + (long)t * half;
    long at = kv_at(tables, width, bs, slots[t], positions[t], row);
    int h0 = blockIdx.y * ROPE_HEADS, h1 = min(h0 + ROPE_HEADS, heads + kvHeads);
    for (int i = threadIdx.x; i < (h1 - h0) * headDim; i += blockDim.x) {
        int h = h0 + i / headDim, d = i % headDim;
        const float* x = r + (long)h * headDim;  // q heads, then k heads: one after another in the row
        float value = x[d], rotated = value;
        if (d < rotDim) {
            int p = interleaved ? d >> 1 : d % half;
            bool first = interleaved ? (d & 1) == 0 : d < half;
            float partner = x[interleaved ? d ^ 1 : first ? d + half : d - half];
            rotated = first ? value * c[p] - partner * s[p] : value * c[p] + partner * s[p];
        }
        if (h < heads) {
            q[((long)t * heads + h) * headDim + d] = rotated;
        } else {
            int kh = h - heads;
            long e = ((long)t * kvHeads + kh) * headDim + d;
            float vv = r[(long)(heads + kvHeads + kh) * headDim + d];
            k[e] = value;
            v[e] = vv;
            kv_store(kc, at + kh * headDim + d, rotated, kvHalf);
            kv_store(vc, at + kh * headDim + d, vv, kvHalf);
        }
    }
}

extern "C" __global__ void store_kv(const float* k, const float* v, void* kc, void* vc, const int* slots, const int* positions,
                                    int rowSize, const int* tables, int width, int bs, int kvHalf) {
    gdc_wait();
    int t = blockIdx.x;
    long at = kv_at(tables, width, bs, slots[t], positions[t], rowSize);
    for (int i = threadIdx.x; i < rowSize; i += blockDim.x) {
        kv_store(kc, at + i, k[(long)t * rowSize + i], kvHalf);
        kv_store(vc, at + i, v[(long)t * rowSize + i], kvHalf);
    }
}

__device__ __forceinline__ unsigned shared_address(const void* p) { return (unsigned)__cvta_generic_to_shared(p); }

// A tensor map (the driver's CUtensorMap: 128 opaque bytes, 64-byte aligned) describing a tensor
// in global memory for the TMA's copies: made on the host (cuTensorMapEncodeTiled) and passed
// by value as a __grid_constant__ kernel parameter, whose address the copies take.
struct __align__(64) TensorMap {
    unsigned long long opaque[16];
};
// __grid_constant__ (a parameter read in place, so its address may be taken) exists from compute
// capability 7.0; the kernels that take a map run on 9.0 only, and older devices compile them as
// stubs.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 700
#define GRID_CONSTANT __grid_constant__
#else
#define GRID_CONSTANT
#endif

// 16 bytes from global to shared memory without passing through registers (Ampere and later;
// before, an ordinary load and store); zeros when !in. Copies are grouped by copy_commit, and
// copy_wait<N> waits until at most N of this thread's groups are still in flight.
#ifndef PEREGRINE_CUDA_EMULATOR
__device__ __forceinline__ void copy16_async(void* dst, const void* src, bool in) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(shared_address(dst)), "l"(src), "r"(in ? 16 : 0));
#else
    *(uint4*)dst = in ? *(const uint4*)src : make_uint4(0, 0, 0, 0);
#endif
}

__device__ __forceinline__ void copy_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;");
#endif
}

template <int N> __device__ __forceinline__ void copy_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory");
#endif
}

// Warp-specialized kernels' synchronisation (Hopper; quant_gemm_ws). An mbarrier is a 64-bit
// object in shared memory: init sets the arrivals each phase expects, and the last of them
// completes the phase (once the transaction bytes it was told to expect, if any, have landed:
// mbarrier_arrive_expect_tx, tma_load_2d). A wait for parity p returns once the phase of parity p has completed
// (a wait for a barrier's n-th phase, counting from 0, waits for parity n % 2). copy_arrive makes an
// arrival that happens when every cp.async the thread has issued has landed (.noinc: the arrival
// is one of those init counted).
#if __CUDA_ARCH__ >= 900
__device__ __forceinline__ void mbarrier_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(shared_address(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(unsigned long long* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(shared_address(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(unsigned long long* bar, unsigned parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" :: "r"(shared_address(bar)), "r"(parity) : "memory");
}
__device__ __forceinline__ void copy_arrive(unsigned long long* bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" :: "r"(shared_address(bar)) : "memory");
}
// Makes the block's mbarrier.init visible to the async proxy (the TMA's completions), before
// the barrier that publishes them to the other threads.
__device__ __forceinline__ void fence_mbarrier_init() { asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory"); }
// An arrival that also expects `bytes` more of the phase's transactions: the phase completes once
// its arrivals are all in and that many bytes have landed (tma_load_2d's copies count theirs).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(shared_address(bar)), "r"(bytes) : "memory");
}
// The tensor memory accelerator's copy of one box of a 2-D tensor (`map`, a __grid_constant__
// parameter, made on the host) whose first element is at column c0, row c1, into shared memory
// at dst, laid out and swizzled as the map says; elements past the tensor's ends are zeros. The
// box's bytes, all of them, count as transactions on `bar`.
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, int c0, int c1, unsigned long long* bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];"
                 :: "r"(shared_address(dst)), "l"(map), "r"(c0), "r"(c1), "r"(shared_address(bar)) : "memory");
}
// bar.sync id, threads: `threads` (a multiple of 32) of the block meet at barrier `id` (1-15).
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(threads) : "memory");
}
// Bulk copies from shared to global memory by the copy engine (Hopper): `bytes` (a multiple of 16,
// both addresses 16-byte aligned) written, or added as floats (an f32 reduction in L2), without
// passing through registers. They are grouped by bulk_commit; bulk_wait_read waits until every
// group has read its shared memory (the writes land on their own, before the grid completes).
__device__ __forceinline__ void bulk_store(void* dst, const void* src, unsigned bytes) {
    asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" :: "l"(dst), "r"(shared_address(src)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bulk_reduce_add(float* dst, const float* src, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" :: "l"(dst), "r"(shared_address(src)), "r"(bytes)
                 : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory"); }
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// setmaxnreg: a warpgroup gives back registers (down) or takes them (up), all of its warps
// together; N a multiple of 8 in 24-256.
template <int N> __device__ __forceinline__ void registers_down() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(N)); }
template <int N> __device__ __forceinline__ void registers_up() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(N)); }
#endif
#endif

// Most splits of one sequence (the host caps its count): a warp's lanes hold four each in the merge.
#define SPLIT_MAX 128
#define SPLIT_LANE (SPLIT_MAX / 32)

// The end of a split's block in a launch that merges splits: its writes made visible, then
// the split counted on `counter`; true in the block that counts the last one (the counter reset
// for the next launch), after a fence so that it sees the other splits' writes.
__device__ __forceinline__ bool last_split(unsigned* counter, int splits, bool* last) {
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        *last = atomicAdd(counter, 1u) == (unsigned)splits - 1;
        if (*last) *counter = 0;
    }
    __syncthreads();
    if (!*last) return false;
    __threadfence();
    return true;
}

// The splits' partial results of query heads h0 ..< h0 + nh of token t combined into attn, by
// the block of that group that finishes last (the others' writes made visible by the fence
// before the count). u: the block's row within the launch (its scratch and counter), t: the
// batch row written. One counter per (u, group), at the group's first head. Warp w first turns
// the (max, sum) of heads w and w + 4 into each split's weight (shared memory), then every
// thread sums four of its outputs' partials with them (16-byte loads, eight splits' loads
// issued together, so the merge's latency does not grow with the split count as fast).
__device__ __forceinline__ void merge_if_last(const float* partial, const float* stats, float* attn, unsigned* counters, int u,
                                              int t, int h0, int nh, int heads, int headDim, int splits, bool* last,
                                              float* weights /* [SPLIT_GROUP][SPLIT_MAX] */, float* inverse /* [SPLIT_GROUP] */) {
    if (!last_split(&counters[(long)u * heads + h0], splits, last)) return;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int hh = warp; hh < nh; hh += blockDim.x >> 5) {
        const float* st = stats + ((long)u * heads + h0 + hh) * splits * 2;
        float ms[SPLIT_LANE], ls[SPLIT_LANE];
        float m = -__int_as_float(0x7f800000), total = 0;
#pragma unroll
        for (int i = 0; i < SPLIT_LANE; i++) {
            int s = lane + 32 * i;
            ms[i] = s < splits ? __ldcg(st + 2 * s) : -__int_as_float(0x7f800000);
            ls[i] = s < splits ? __ldcg(st + 2 * s + 1) : 0.f;
            m = fmaxf(m, ms[i]);
        }
        m = warp_max(m);
#pragma unroll
        for (int i = 0; i < SPLIT_LANE; i++) {
            float f = ls[i] > 0 ? __expf(ms[i] - m) : 0.f;
            if (lane + 32 * i < splits) weights[hh * SPLIT_MAX + lane + 32 * i] = f;
            total += ls[i] * f;
        }
        total = warp_sum(total);
        if (lane == 0) inverse[hh] = 1.f / total;
    }
    __syncthreads();
    int quads = headDim / 4;  // headDim is a multiple of 4
    for (int i = threadIdx.x; i < nh * quads; i += blockDim.x) {
        int hh = i / quads, c = i % quads;
        const float4* pt = (const float4*)(partial + ((long)u * heads + h0 + hh) * splits * headDim) + c;
        const float* w = weights + hh * SPLIT_MAX;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll 8
        for (int s = 0; s < splits; s++) {
            float4 p = __ldcg(pt + (long)s * quads);
            float ws = w[s];
            acc.x += p.x * ws; acc.y += p.y * ws; acc.z += p.z * ws; acc.w += p.w * ws;
        }
        float inv = inverse[hh];
        *(float4*)(attn + ((long)t * heads + h0 + hh) * headDim + 4 * c) = make_float4(acc.x * inv, acc.y * inv, acc.z * inv, acc.w * inv);
    }
}

// The decode attention kernels' parameters, in the order the host's attention() passes them
// (the cache's keys and values as KV*; the entry points take void* and a kvHalf flag after
// them, and hand SPLIT_ARGS to the body for the cache's element type).
#define SPLIT_PARAMS(KV)                                                                                                    \
    const float* q, KV* kc, KV* vc, float* partial, float* stats, const int* slots, const int* positions, int heads,        \
        int kvHeads, int headDim, const int* tables, int width, int bs, float scale, float softcap, int window, int splits, \
        float* attn, unsigned* counters, int fused, const float* kin, const float* vin, const float* cosT,                 \
        const float* sinT, int rotDim, int interleaved, const int* rowMap
#define SPLIT_ARGS(KV)                                                                                                      \
    q, (KV*)kc, (KV*)vc, partial, stats, slots, positions, heads, kvHeads, headDim, tables, width, bs, scale, softcap,     \
        window, splits, attn, counters, fused, kin, vin, cosT, sinT, rotDim, interleaved, rowMap

// Keys a split's block stages in shared memory at a time.
#define SPLIT_KEYS 32
// Most query heads of one KV head a block takes (a larger group is cut into several blocks).
#define SPLIT_GROUP 8

// Split `split` of `splits`'s share [start, end) of the positions a query at `pos` attends to
// (the last `window` of them, or all): the split count is fixed at launch and the share follows
// the length read on the device, so a recorded decode step stays valid at every position.
__device__ __forceinline__ void split_range(int pos, int window, int splits, int split, int& start, int& end) {
    int lo = window > 0 ? max(0, pos - window + 1) : 0;
    int chunk = (pos + 1 - lo + splits - 1) / splits;
    start = lo + split * chunk;
    end = min(pos + 1, start + chunk);
}

// A grouped decode block's work (attention_split, attention_decode_mma; grid: rows, KV heads x
// parts, splits): its batch row t (through rowMap in a mixed batch), KV head, the query heads
// h0 ..< h0 + nh of its part of the group (at most SPLIT_GROUP), and its split's positions.
struct GroupedShare { int t, split, kvh, part, h0, nh, pos, slot, start, end; };

__device__ __forceinline__ GroupedShare grouped_share(const int* rowMap, const int* positions, const int* slots, int heads,
                                                      int kvHeads, int window, int splits) {
    GroupedShare s;
    s.t = rowMap ? rowMap[blockIdx.x] : blockIdx.x;
    s.split = blockIdx.z;
    int group = heads / kvHeads, parts = (group + SPLIT_GROUP - 1) / SPLIT_GROUP;
    s.kvh = blockIdx.y / parts;
    s.part = blockIdx.y % parts;
    s.h0 = s.kvh * group + s.part * SPLIT_GROUP;
    s.nh = min(SPLIT_GROUP, group - s.part * SPLIT_GROUP);
    s.pos = positions[s.t];
    s.slot = slots[s.t];
    split_range(s.pos, window, splits, s.split, s.start, s.end);
    return s;
}

// One token's RoPE for a grouped decode block (the fused modes): query heads h0 ..< h0 + nh of
// row t and its key of KV head kvh, rotated in their first rotDim dimensions (interleaved pairs
// or halves) with the row's cos/sin factors, the block's threads each taking elements;
// query(hh, d, value) and key(d, value) store them where the kernel keeps them.
template <typename Query, typename Key>
__device__ __forceinline__ void rotate_group(const float* q, const float* kin, const float* cosT, const float* sinT, int t,
                                             int heads, int kvHeads, int h0, int nh, int kvh, int headDim, int rotDim,
                                             int interleaved, Query query, Key key) {
    int half = rotDim / 2;
    const float* kp = kin + ((long)t * kvHeads + kvh) * headDim;
    for (int i = threadIdx.x; i < (nh + 1) * headDim; i += blockDim.x) {
        int hh = i / headDim, d = i % headDim;
        const float* src = hh < nh ? q + ((long)t * heads + h0 + hh) * headDim : kp;
        float r = src[d];  // dimensions past rotDim are not rotated
        if (d < rotDim) {
            bool first = interleaved ? (d & 1) == 0 : d < half;
            int other = interleaved ? d ^ 1 : (first ? d + half : d - half), f = interleaved ? d / 2 : (first ? d : d - half);
            float c = cosT[(long)t * half + f], sn = sinT[(long)t * half + f];
            r = first ? src[d] * c - src[other] * sn : src[d] * c + src[other] * sn;
        }
        if (hh < nh) query(hh, d, r); else key(d, r);
    }
}

// An attention score soft-capped to cap * tanh(s / cap) (Gemma 2); cap 0: the score as it is.
__device__ __forceinline__ float soft_cap(float s, float cap) { return cap > 0.f ? cap * tanhf(s / cap) : s; }

// Causal attention of single queries over their sequences, split across each sequence (flash
// decoding), one block per (token, KV head, split): the block takes the nh (<= SPLIT_GROUP)
// query heads of the KV head's group, so each key and value row is read from memory once for
// all of them (GQA), not once per query head. The split count is fixed at launch and each
// split's share of the positions follows the sequence's length read on the device, so a
// recorded decode step stays valid at every position. The block walks its share in tiles of
// SPLIT_KEYS keys, copied as stored (16-byte cp.async, no registers) into one of two shared
// buffers while the other tile is worked on: decode attention is bound by how many loads are in
// flight, and a tile loaded into registers and stored would keep one round trip per element.
// Warp w then takes query heads w and w + 4: lane j scores key j (its row read in 16-byte
// chunks, rows padded by 16 bytes against bank conflicts), the warp updates the head's online
// softmax, and lane l accumulates value dimensions 4l ..< 4l + 4 and 128 + 4l ..< 132 + 4l (head
// dimension at most 256, its rows a whole number of 16-byte pieces in the cache). With one split the block
// writes attn itself; otherwise each head's partial result and (max, sum) go to scratch and the
// group's last split to finish combines them, its counter reset for the next launch. With
// `fused` (one token), RoPE and the KV-cache write happen here too: the block rotates its query
// heads and the token's key in shared memory and puts the token's own key and value (rounded as
// the cache holds them) in the tile in place of the cache row, which split 0 of the group's
// first block writes (no block reads that cache row in this launch). Dynamic shared memory:
// see the host's attention().
template <typename KV>
__device__ __forceinline__ void attention_split_body(SPLIT_PARAMS(KV)) {
    gdc_wait();
    extern __shared__ float4 shared4[];
    constexpr int per = KVBits<KV>::perChunk;
    // rowMap: the rows of a mixed batch that are single queries (the others go to attention_prefill).
    GroupedShare sh = grouped_share(rowMap, positions, slots, heads, kvHeads, window, splits);
    int t = sh.t, split = sh.split, kvh = sh.kvh, part = sh.part, h0 = sh.h0, nh = sh.nh;
    int pos = sh.pos, slot = sh.slot, start = sh.start, end = sh.end;
    int row = kvHeads * headDim, quads = headDim / 4, chunks = headDim / per, kStride = chunks + 1;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    uint4* Kraw = (uint4*)shared4;                        // [2][SPLIT_KEYS][chunks + 1]: key rows as stored
    uint4* Vraw = Kraw + 2 * SPLIT_KEYS * kStride;        // [2][SPLIT_KEYS][chunks]: value rows as stored
    float4* Q = (float4*)(Vraw + 2 * SPLIT_KEYS * chunks);  // [nh][quads], scaled (and rotated when fused)
    float4* Knew = Q + SPLIT_GROUP * quads;               // the token's rotated key, rounded as stored (fused)
    float* P = (float*)(Knew + quads);                    // [SPLIT_GROUP][SPLIT_KEYS]: probabilities of the tile
    long* offsets = (long*)(P + SPLIT_GROUP * SPLIT_KEYS);  // [2][SPLIT_KEYS]: the tiles' keys' cache rows (offset_of)
    float* Qf = (float*)Q;
    float* Kf = (float*)Knew;
    const float* vnow = vin + ((long)t * kvHeads + kvh) * headDim;
    // Each key's cache row: -1 past the share, -2 the token's own (fused).
    auto offset_of = [&](int j) -> long {
        return j >= end ? -1L : fused && j == pos ? -2L : kv_at(tables, width, bs, slot, j, row);
    };
    if (threadIdx.x < SPLIT_KEYS) offsets[threadIdx.x] = offset_of(start + threadIdx.x);
    if (fused) {
        rotate_group(q, kin, cosT, sinT, t, heads, kvHeads, h0, nh, kvh, headDim, rotDim, interleaved,
                     [&](int hh, int d, float r) { Qf[hh * headDim + d] = r * scale; },
                     [&](int d, float r) { Kf[d] = KVBits<KV>::round(r); });
        __syncthreads();
        if (split == 0 && part == 0) {
            long at = kv_at(tables, width, bs, slot, pos, row) + kvh * headDim;
            for (int d = threadIdx.x; d < headDim; d += blockDim.x) { KVBits<KV>::store(kc, at + d, Kf[d]); KVBits<KV>::store(vc, at + d, vnow[d]); }
        }
    } else {
        for (int i = threadIdx.x; i < nh * headDim; i += blockDim.x)
            Qf[i] = q[((long)t * heads + h0) * headDim + i] * scale;
    }
    long kvOffset = kvh * headDim;
    // The (key, chunk) pairs a thread copies: threadIdx.x, then every blockDim.x-th, walked
    // without a division per element.
    int j0 = threadIdx.x / chunks, c0 = threadIdx.x % chunks, dj = blockDim.x / chunks, dc = blockDim.x % chunks;
    // Tile `buf` of the keys whose rows are in offsets[buf]: cache rows copied asynchronously,
    // zeros past the share, the token's own row written from shared memory.
    auto stage = [&](int buf) {
        const long* offs = offsets + buf * SPLIT_KEYS;
        uint4* kd = Kraw + buf * SPLIT_KEYS * kStride;
        uint4* vd = Vraw + buf * SPLIT_KEYS * chunks;
        for (int j = j0, c = c0; j < SPLIT_KEYS;) {
            long o = offs[j];
            if (o == -2) {
#pragma unroll
                for (int e = 0; e < per; e++) {
                    KVBits<KV>::store((KV*)(kd + j * kStride + c), e, Kf[c * per + e]);
                    KVBits<KV>::store((KV*)(vd + j * chunks + c), e, vnow[c * per + e]);
                }
            } else {
                long at = o >= 0 ? kvOffset + o + c * per : 0;
                copy16_async(kd + j * kStride + c, kc + at, o >= 0);
                copy16_async(vd + j * chunks + c, vc + at, o >= 0);
            }
            j += dj; c += dc;
            if (c >= chunks) { c -= chunks; j++; }
        }
        copy_commit();
    };
    // Warp w's heads: w and w + 4 (those below nh).
    bool has0 = warp < nh, has1 = warp + 4 < nh;
    float m[2] = {-__int_as_float(0x7f800000), -__int_as_float(0x7f800000)}, l[2] = {0, 0}, acc[2][8];
#pragma unroll
    for (int i = 0; i < 8; i++) { acc[0][i] = 0; acc[1][i] = 0; }
    int tiles = end > start ? (end - start + SPLIT_KEYS - 1) / SPLIT_KEYS : 0;
    __syncthreads();  // the first tile's offsets, Q and the token's key are written
    if (tiles > 0) stage(0);
    for (int n = 0; n < tiles; n++) {
        int k0 = start + n * SPLIT_KEYS, count = min(SPLIT_KEYS, end - k0), buf = n & 1;
        if (n + 1 < tiles) {
            if (threadIdx.x < SPLIT_KEYS) offsets[(buf ^ 1) * SPLIT_KEYS + threadIdx.x] = offset_of(k0 + SPLIT_KEYS + threadIdx.x);
            __syncthreads();  // the next tile's offsets are written, and the tile before this one is no longer read
            stage(buf ^ 1);
            copy_wait<1>();
        } else {
            copy_wait<0>();
        }
        __syncthreads();  // this tile is in shared memory, every thread's copies
        if (!has0) continue;
        // Scores: lane j against key j, for the warp's one or two heads (the key read once).
        float s0 = 0, s1 = 0;
        const uint4* kr = Kraw + (buf * SPLIT_KEYS + lane) * kStride;
        const float4* q0 = Q + warp * quads;
        const float4* q1 = Q + (has1 ? warp + 4 : warp) * quads;
        for (int c = 0; c < chunks; c++) {
            float x[per];
            KVBits<KV>::widen_chunk(kr[c], x);
#pragma unroll
            for (int e = 0; e < per; e += 4) {
                float4 a = q0[(c * per + e) / 4], b = q1[(c * per + e) / 4];
                s0 += a.x * x[e] + a.y * x[e + 1] + a.z * x[e + 2] + a.w * x[e + 3];
                s1 += b.x * x[e] + b.y * x[e + 1] + b.z * x[e + 2] + b.w * x[e + 3];
            }
        }
        bool valid = lane < count;
        float s[2] = {soft_cap(s0, softcap), soft_cap(s1, softcap)};
#pragma unroll
        for (int n2 = 0; n2 < 2; n2++) {
            if (n2 == 1 && !has1) break;
            float sv = valid ? s[n2] : -__int_as_float(0x7f800000);
            float mn = fmaxf(m[n2], warp_max(sv));  // finite: the tile has a valid key
            float corr = __expf(m[n2] - mn), p = valid ? __expf(sv - mn) : 0.f;
            l[n2] = l[n2] * corr + warp_sum(p);
            m[n2] = mn;
            P[(warp + 4 * n2) * SPLIT_KEYS + lane] = p;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[n2][i] *= corr;
        }
        __syncwarp();
        const KV* Vt = (const KV*)(Vraw + buf * SPLIT_KEYS * chunks);
        const float* P0 = P + warp * SPLIT_KEYS;
        const float* P1 = P + (has1 ? warp + 4 : warp) * SPLIT_KEYS;
#pragma unroll 2
        for (int j = 0; j < count; j++) {
            float p0 = P0[j], p1 = has1 ? P1[j] : 0.f;
#pragma unroll
            for (int i = 0; i < 2; i++) {
                int d = 4 * lane + 128 * i;
                if (d < headDim) {
                    float4 v = KVBits<KV>::widen4(KVBits<KV>::load4(Vt, (long)j * headDim + d));
                    acc[0][4 * i] += p0 * v.x; acc[0][4 * i + 1] += p0 * v.y; acc[0][4 * i + 2] += p0 * v.z; acc[0][4 * i + 3] += p0 * v.w;
                    acc[1][4 * i] += p1 * v.x; acc[1][4 * i + 1] += p1 * v.y; acc[1][4 * i + 2] += p1 * v.z; acc[1][4 * i + 3] += p1 * v.w;
                }
            }
        }
    }
    int u = blockIdx.x;
#pragma unroll
    for (int n = 0; n < 2; n++) {
        int hh = warp + 4 * n;
        if (hh >= nh) break;
        int h = h0 + hh;
        // Lane l's dimensions: 4l + 128i + e, its accumulator 4i + e.
        float inv = splits == 1 ? (l[n] > 0 ? 1.f / l[n] : 0.f) : 1.f;
        long th = ((long)u * heads + h) * splits + split;
        // With one split the whole sequence was this block's: the result directly (what the merge would give).
        float* dst = splits == 1 ? attn + ((long)t * heads + h) * headDim : partial + th * headDim;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            int d = 4 * lane + 128 * i;
            if (d < headDim)
                *(float4*)(dst + d) = make_float4(acc[n][4 * i] * inv, acc[n][4 * i + 1] * inv, acc[n][4 * i + 2] * inv, acc[n][4 * i + 3] * inv);
        }
        if (splits > 1 && lane == 0) { stats[2 * th] = m[n]; stats[2 * th + 1] = l[n]; }
    }
    if (splits == 1) return;
    __shared__ bool last;
    __shared__ float weights[SPLIT_GROUP * SPLIT_MAX], inverse[SPLIT_GROUP];
    merge_if_last(partial, stats, attn, counters, u, t, h0, nh, heads, headDim, splits, &last, weights, inverse);
}

extern "C" __global__ void __launch_bounds__(128) attention_split(SPLIT_PARAMS(void), int kvHalf) {
    if (kvHalf) attention_split_body<__half>(SPLIT_ARGS(__half));
    else attention_split_body<float>(SPLIT_ARGS(float));
}

// A 128-thread block's four warps' running (max m, sum l, row acc: dimensions lane + 32i) as
// one, through shared memory (wm, wl, wacc): the row to out (divided by the sum with
// `normalize`); returns the (max, sum).
__device__ __forceinline__ float2 combine_warps(float m, float l, const float (&acc)[8], float* wm, float* wl, float (*wacc)[256],
                                                int headDim, float* out, bool normalize) {
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) { wm[warp] = m; wl[warp] = l; }
#pragma unroll
    for (int i = 0; i < 8; i++) { int d = lane + 32 * i; if (d < headDim) wacc[warp][d] = acc[i]; }
    __syncthreads();
    float mm = fmaxf(fmaxf(wm[0], wm[1]), fmaxf(wm[2], wm[3]));
    float f[4], sum = 0.f;
    for (int w = 0; w < 4; w++) { f[w] = wl[w] > 0 ? __expf(wm[w] - mm) : 0.f; sum += wl[w] * f[w]; }
    float inv = normalize ? 1.f / sum : 1.f;
    for (int d = threadIdx.x; d < headDim; d += blockDim.x)
        out[d] = (wacc[0][d] * f[0] + wacc[1][d] * f[1] + wacc[2][d] * f[2] + wacc[3][d] * f[3]) * inv;
    return make_float2(mm, sum);
}

// merge_if_last for one query head (attention_split_heads, 128 threads): in the last split's
// block, warp w takes splits w, w + 4, ..., four of them at a time, and reads each one's (max,
// sum) and partial row together, so the merge waits for one round trip of loads where
// merge_if_last waits for the statistics and then the rows; each warp keeps a running max, sum
// and row as a block's warps do over their keys, and the four are combined as the block's own
// (combine_warps, through its `wm`, `wl` and `wacc`, free again by then).
__device__ __forceinline__ void merge_head_if_last(const float* partial, const float* stats, float* attn, unsigned* counters, int u,
                                                   int t, int h, int heads, int headDim, int splits, bool* last, float* wm, float* wl,
                                                   float (*wacc)[256]) {
    if (!last_split(&counters[(long)u * heads + h], splits, last)) return;
    const float inf = __int_as_float(0x7f800000);
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* st = stats + ((long)u * heads + h) * splits * 2;
    const float* pt = partial + ((long)u * heads + h) * splits * headDim;
    float m = -inf, l = 0.f, acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) acc[i] = 0.f;
    for (int s0 = warp; s0 < splits; s0 += 16) {
        float ms[4], ls[4], pv[4][8];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            int sp = s0 + 4 * k;
            bool in = sp < splits;
            ms[k] = in ? __ldcg(st + 2 * sp) : -inf;
            ls[k] = in ? __ldcg(st + 2 * sp + 1) : 0.f;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int d = lane + 32 * i;
                pv[k][i] = in && d < headDim ? __ldcg(pt + (long)sp * headDim + d) : 0.f;
            }
        }
        float bm = -inf;
#pragma unroll
        for (int k = 0; k < 4; k++) if (ls[k] > 0) bm = fmaxf(bm, ms[k]);
        if (bm == -inf) continue;  // none of the four splits had a key
        float mn = fmaxf(m, bm), corr = __expf(m - mn);
        l *= corr;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] *= corr;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            float f = ls[k] > 0 ? __expf(ms[k] - mn) : 0.f;
            l += ls[k] * f;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[i] += pv[k][i] * f;
        }
        m = mn;
    }
    combine_warps(m, l, acc, wm, wl, wacc, headDim, attn + ((long)t * heads + h) * headDim, true);
}

// Causal attention of single queries, one block per (token, query head, split): the kernel for
// small batches, where attention_split's blocks (one per KV head) would be too few to spread a
// step's keys over the GPU; each block then reads its KV head for one query head. Block
// (token, head, split) takes its share of the positions (the split count is fixed at launch, the
// share follows the sequence's length read on the device, so a recorded decode step stays
// valid at every position). Each warp runs an online softmax over every fourth key of the
// share, a lane holding head dimensions lane, lane + 32, ... (head dimension at most 256); the
// warps then combine, and the last split of a (token, head) to finish combines the splits
// (flash-decoding), its counter reset for the next launch. With `fused` (one token), RoPE and the
// KV-cache write happen here too: each block rotates its query head and the token's key head in
// shared memory and takes the token's own key and value from there and from vin, and one block
// per key/value head writes them to the cache (no block reads that cache row in this launch).
template <typename KV>
__device__ __forceinline__ void attention_split_heads_body(SPLIT_PARAMS(KV)) {
    typedef typename KVBits<KV>::Stored Stored;
    // rowMap: the rows of a mixed batch that are single queries (the others go to attention_prefill).
    // Before gdc_wait this reads only what copies from the host wrote (rowMap, positions, slots,
    // block tables) and, for one token whose RoPE and cache write are fused here, its warp's first
    // keys and values: cache rows that no kernel of this step writes, or the token's own row,
    // which this launch writes and whose values are then taken from shared memory instead. The
    // kernel still running beside this one can only be the one launched right before it (see
    // gdc_wait), the q/k/v product or the q/k norms. So those loads overlap its end.
    int t = rowMap ? rowMap[blockIdx.x] : blockIdx.x, h = blockIdx.y, split = blockIdx.z;
    int pos = positions[t];
    __shared__ float qs[256], ks[256];
    int start, end;
    split_range(pos, window, splits, split, start, end);
    int kvh = h / (heads / kvHeads);
    int row = kvHeads * headDim;
    int slot = slots[t];
    long kvOffset = kvh * headDim;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    // A warp's step: keys j and j + 4 (the warp takes j = start + warp, + 8, ...), loaded as
    // stored and widened after, so that the loads are plain predicated ones. The cache rows are
    // read even where the token's own row (not yet written) replaces them, and selected after:
    // a choice between a shared and a global source per load would branch around each.
    auto load = [&](int j, Stored (&k1)[8], Stored (&v1)[8], Stored (&k2)[8], Stored (&v2)[8]) {
        int j2 = j + 4;
        long o1 = kv_at(tables, width, bs, slot, j, row) + kvOffset, o2 = j2 < end ? kv_at(tables, width, bs, slot, j2, row) + kvOffset : o1;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            bool in = d < headDim;
            k1[i] = in ? KVBits<KV>::load(kc, o1 + d) : 0;
            v1[i] = in ? KVBits<KV>::load(vc, o1 + d) : 0;
            k2[i] = in ? KVBits<KV>::load(kc, o2 + d) : 0;
            v2[i] = in ? KVBits<KV>::load(vc, o2 + d) : 0;
        }
    };
    Stored ka1[8], va1[8], ka2[8], va2[8], kb1[8], vb1[8], kb2[8], vb2[8];
    int j = start + warp;
    bool early = fused && j < end;
    if (early) load(j, ka1, va1, ka2, va2);
    // Fused: a thread's dimensions d = threadIdx.x + 128n (the block is 128 threads; head
    // dimension at most 256), their RoPE factors read before the wait (the tables are staged
    // from the host before the step's first kernel), then the query's, key's and value's values
    // all read at once after it: one round trip to the L2, not three one after another. With
    // merge_head_if_last, H100, the 8B shape's BF16 decode at depth 0: the kernel 8.03 -> 7.04 us
    // (timed without programmatic dependent launch), tg128 1.005x (BENCHMARKS.md).
    const int half = rotDim / 2;
    float cf[2] = {1.f, 1.f}, sf[2] = {0.f, 0.f};
    if (fused) {
#pragma unroll
        for (int n = 0; n < 2; n++) {
            int d = threadIdx.x + 128 * n;
            if (d < rotDim) {
                int i = interleaved ? d / 2 : (d < half ? d : d - half);
                cf[n] = cosT[(long)t * half + i];
                sf[n] = sinT[(long)t * half + i];
            }
        }
    }
    gdc_wait();
    const float* qp = q + ((long)t * heads + h) * headDim;
    const float* vnow = vin + ((long)t * kvHeads + kvh) * headDim;
    __shared__ float vs[256];  // the token's value, rounded as the cache holds it (fused)
    if (fused) {
        const float* kp = kin + ((long)t * kvHeads + kvh) * headDim;
        float qa[2], qo[2], ka[2], ko[2], va[2];
#pragma unroll
        for (int n = 0; n < 2; n++) {
            int d = threadIdx.x + 128 * n;
            qa[n] = qo[n] = ka[n] = ko[n] = va[n] = 0.f;
            if (d < headDim) {
                int other = d >= rotDim ? d : interleaved ? d ^ 1 : (d < half ? d + half : d - half);
                qa[n] = qp[d]; qo[n] = qp[other]; ka[n] = kp[d]; ko[n] = kp[other]; va[n] = vnow[d];
            }
        }
#pragma unroll
        for (int n = 0; n < 2; n++) {
            int d = threadIdx.x + 128 * n;
            if (d >= headDim) continue;
            float qr = qa[n], kr = ka[n];
            if (d < rotDim) {
                bool first = interleaved ? (d & 1) == 0 : d < half;
                float c = cf[n], sn = sf[n];
                qr = first ? qa[n] * c - qo[n] * sn : qa[n] * c + qo[n] * sn;
                kr = first ? ka[n] * c - ko[n] * sn : ka[n] * c + ko[n] * sn;
            }
            qs[d] = qr;
            ks[d] = KVBits<KV>::round(kr);
            vs[d] = KVBits<KV>::round(va[n]);
        }
        __syncthreads();
        if (split == 0 && h % (heads / kvHeads) == 0) {
            long at = kv_at(tables, width, bs, slot, pos, row) + kvh * headDim;
            for (int d = threadIdx.x; d < headDim; d += blockDim.x) { KVBits<KV>::store(kc, at + d, ks[d]); KVBits<KV>::store(vc, at + d, vs[d]); }
        }
        qp = qs;
    }
    int u = blockIdx.x;
    float* out = partial + (((long)u * heads + h) * splits + split) * headDim;
    float* st = stats + (((long)u * heads + h) * splits + split) * 2;
    __shared__ bool last;
    __shared__ float wm[4], wl[4], wacc[4][256];
    if (start >= end) {
        for (int d = threadIdx.x; d < headDim; d += blockDim.x) out[d] = 0;
        if (threadIdx.x == 0) { st[0] = -__int_as_float(0x7f800000); st[1] = 0; }
        merge_head_if_last(partial, stats, attn, counters, u, t, h, heads, headDim, splits, &last, wm, wl, wacc);
        return;
    }
    float qv[8], acc[8];
#pragma unroll
    for (int i = 0; i < 8; i++) { int d = lane + 32 * i; qv[i] = d < headDim ? qp[d] * scale : 0.f; acc[i] = 0; }
    float m = -__int_as_float(0x7f800000), l = 0;
    auto step = [&](int j, const Stored (&rk1)[8], const Stored (&rv1)[8], const Stored (&rk2)[8], const Stored (&rv2)[8]) {
        int j2 = j + 4;
        bool two = j2 < end;
        bool own1 = fused && j == pos, own2 = fused && j2 == pos;  // the token's own key and value: from shared memory
        float ka[8], kb[8], va[8], vb[8];
#pragma unroll
        for (int i = 0; i < 8; i++) {
            ka[i] = KVBits<KV>::widen(rk1[i]); va[i] = KVBits<KV>::widen(rv1[i]);
            kb[i] = KVBits<KV>::widen(rk2[i]); vb[i] = KVBits<KV>::widen(rv2[i]);
        }
        if (own1 || own2) {
#pragma unroll
            for (int i = 0; i < 8; i++) {
                int d = lane + 32 * i;
                if (d >= headDim) continue;
                if (own1) { ka[i] = ks[d]; va[i] = vs[d]; }
                if (own2) { kb[i] = ks[d]; vb[i] = vs[d]; }
            }
        }
        if (!two) {
#pragma unroll
            for (int i = 0; i < 8; i++) { kb[i] = 0.f; vb[i] = 0.f; }
        }
        float s1 = 0, s2 = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) { s1 += qv[i] * ka[i]; s2 += qv[i] * kb[i]; }
        s1 = soft_cap(warp_sum(s1), softcap); s2 = soft_cap(warp_sum(s2), softcap);
        if (!two) s2 = -__int_as_float(0x7f800000);
        float mn = fmaxf(m, fmaxf(s1, s2));
        float corr = __expf(m - mn), p1 = __expf(s1 - mn), p2 = __expf(s2 - mn);
        l = l * corr + p1 + p2;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] = acc[i] * corr + p1 * va[i] + p2 * vb[i];
        m = mn;
    };
    // Two sets of registers taken in turn: a warp's next keys are in flight while it scores these.
    if (!early && j < end) load(j, ka1, va1, ka2, va2);
    for (; j < end; j += 16) {
        if (j + 8 < end) load(j + 8, kb1, vb1, kb2, vb2);
        step(j, ka1, va1, ka2, va2);
        if (j + 8 >= end) break;
        if (j + 16 < end) load(j + 16, ka1, va1, ka2, va2);
        step(j + 8, kb1, vb1, kb2, vb2);
    }
    float2 ms = combine_warps(m, l, acc, wm, wl, wacc, headDim, out, false);
    if (threadIdx.x == 0) { st[0] = ms.x; st[1] = ms.y; }
    merge_head_if_last(partial, stats, attn, counters, u, t, h, heads, headDim, splits, &last, wm, wl, wacc);
}

extern "C" __global__ void __launch_bounds__(128) attention_split_heads(SPLIT_PARAMS(void), int kvHalf) {
    if (kvHalf) attention_split_heads_body<__half>(SPLIT_ARGS(__half));
    else attention_split_heads_body<float>(SPLIT_ARGS(float));
}

// o = gelu_tanh(g) * u, GELU's tanh approximation written as g / (1 + e^(-2 sqrt(2/pi) (g + 0.044715 g^3))).
extern "C" __global__ void gelu_tanh_mul(const float* g, const float* u, float* o, long n) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float v = g[i]; o[i] = v / (1.f + expf(-1.5957691216057308f * (v + 0.044715f * v * v * v))) * u[i]; }
}

extern "C" __global__ void scale_inplace(float* x, float f, long n) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] *= f;
}

// y0, y1 and y2 (n0, n1 and n2 floats; n1 and n2 may be 0) = 0: the outputs a quant_gemm split
// over slices of k adds into, all of a launch's matrices in one.
extern "C" __global__ void zero_floats(float* y0, long n0, float* y1, long n1, float* y2, long n2) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n0) y0[i] = 0.f;
    else if (i < n0 + n1) y1[i - n0] = 0.f;
    else if (i < n0 + n1 + n2) y2[i - n0 - n1] = 0.f;
}

extern "C" __global__ void soft_cap_inplace(float* x, float cap, long n) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] = cap * tanhf(x[i] / cap);
}

extern "C" __global__ void silu_mul(const float* g, const float* u, float* o, long n, void* half, int halfType) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float v = g[i];
        v = v / (1.f + __expf(-v)) * u[i];
        o[i] = v;
        store_half(half, halfType, i, v);
    }
}

// silu(gate) * up from BF16 products (F16 ones could overflow; see gatedProduct): value j of
// row r at g[r * stride + j] and u[r * stride + j] (one product's rows [gate | up], or two
// products' rows), into f32 o (rows x ff) and its 16-bit copy.
extern "C" __global__ void silu_mul_16(const __nv_bfloat16* g, const __nv_bfloat16* u, int ff, int stride, float* o, long n,
                                       void* half, int halfType) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        long r = i / ff, at = r * stride + (i - r * ff);
        float gv = __bfloat162float(g[at]), uv = __bfloat162float(u[at]);
        float v = gv / (1.f + __expf(-gv)) * uv;
        o[i] = v;
        store_half(half, halfType, i, v);
    }
}

extern "C" __global__ void add_inplace(float* x, const float* y, long n) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// Row t of a product over three stacked matrices ([rows, na + nb + nc]) to the outputs each
// matrix's part belongs in.
extern "C" __global__ void split_columns(const float* x, float* a, float* b, float* c, int na, int nb, int nc) {
    gdc_wait();
    long t = blockIdx.x;
    int n = na + nb + nc;
    const float* r = x + t * n;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float v = r[i];
        if (i < na) a[t * na + i] = v;
        else if (i < na + nb) b[t * nb + i - na] = v;
        else c[t * nc + i - na - nb] = v;
    }
}

// A graph step's small host inputs to their places in one launch, in place of a copy each: the
// step stages them in pinned host memory, which the device reads in place (unified addressing),
// and block i copies piece i (`words` 4-byte words from byte `offset` of the staging memory to
// `dst`). A copy node in a graph costs a few microseconds with no kernel running, several a
// decode step. Each thread reads its first words before gdc_wait (the host wrote them before the
// launch), so the reads' latency overlaps the kernel before; it writes after the wait, as the
// kernel before may still read the old values. The kernel after it is launched without
// programmatic dependence (kernels read staged inputs before their own wait).
#define STAGED_PIECES 8
struct StagedPieces {
    unsigned long long dst[STAGED_PIECES];
    unsigned offset[STAGED_PIECES];
    unsigned words[STAGED_PIECES];
};

extern "C" __global__ void scatter_staged(const unsigned* host, StagedPieces p) {
    const unsigned* src = host + p.offset[blockIdx.x] / 4;
    unsigned* dst = (unsigned*)p.dst[blockIdx.x];
    unsigned n = p.words[blockIdx.x];
    unsigned first[4];
#pragma unroll
    for (int j = 0; j < 4; j++) {
        unsigned i = threadIdx.x + j * blockDim.x;
        if (i < n) first[j] = src[i];
    }
    gdc_wait();
#pragma unroll
    for (int j = 0; j < 4; j++) {
        unsigned i = threadIdx.x + j * blockDim.x;
        if (i < n) dst[i] = first[j];
    }
    for (unsigned i = threadIdx.x + 4 * blockDim.x; i < n; i += blockDim.x) dst[i] = src[i];
}

extern "C" __global__ void gather_rows(const float* x, const int* rows, float* out, int dim) {
    gdc_wait();
    int r = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(long)r * dim + i] = x[(long)rows[r] * dim + i];
}

// Causal attention over many queries (prefill) as flash attention: block (tile, head) takes up to
// FA_Q consecutive rows of one sequence (tiles: first row, count; positions consecutive) and walks
// that sequence's cache in tiles of FA_K positions staged in shared memory, keeping an online
// softmax per query. Warp w handles query rows w, w + 4, ...; for scores lane j takes key j of the
// tile, for values lane d takes dimensions d, d + 32, ... (head dimension at most 256).
#define FA_Q 32
#define FA_K 32
template <typename KV>
__device__ __forceinline__ void attention_prefill_body(const float* q, const KV* kc, const KV* vc, float* out,
                                                                    const int* slots, const int* positions, const int* tiles,
                                                                    int heads, int kvHeads, int headDim, const int* tables,
                                                                    int width, int bs, float scale,
                                                                    float softcap, int window) {
    gdc_wait();
    extern __shared__ float sh[];
    int hdp = headDim + 1;  // K rows padded: lanes reading different keys hit different banks
    float* Q = sh;
    float* K = Q + FA_Q * headDim;
    float* V = K + FA_K * hdp;
    float* P = V + FA_K * headDim;
    int first = tiles[2 * blockIdx.x], count = tiles[2 * blockIdx.x + 1], h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    int kvh = h / (heads / kvHeads), row = kvHeads * headDim;
    int p0 = positions[first], lastPos = p0 + count - 1;
    int slot = slots[first];
    long kvOffset = kvh * headDim;
    float* pw = P + warp * 8 * FA_K;
    for (int i = threadIdx.x; i < FA_Q * headDim; i += blockDim.x) {
        int r = i / headDim, d = i % headDim;
        Q[i] = r < count ? q[((long)(first + r) * heads + h) * headDim + d] * scale : 0.f;
    }
    float m[8], l[8], acc[8][8];
#pragma unroll
    for (int r = 0; r < 8; r++) {
        m[r] = -__int_as_float(0x7f800000); l[r] = 0;
#pragma unroll
        for (int i = 0; i < 8; i++) acc[r][i] = 0;
    }
    int lo = window > 0 ? max(0, p0 - window + 1) : 0;
    for (int k0 = lo; k0 <= lastPos; k0 += FA_K) {
        __syncthreads();
        for (int i = threadIdx.x; i < FA_K * headDim; i += blockDim.x) {
            int j = i / headDim, d = i % headDim, pos = k0 + j;
            bool in = pos <= lastPos;
            long o = in ? kv_at(tables, width, bs, slot, pos, row) + kvOffset : 0;
            K[j * hdp + d] = KVBits<KV>::widen(in ? KVBits<KV>::load(kc, o + d) : 0);
            V[j * headDim + d] = KVBits<KV>::widen(in ? KVBits<KV>::load(vc, o + d) : 0);
        }
        __syncthreads();
        float s[8];
#pragma unroll
        for (int r = 0; r < 8; r++) s[r] = 0;
        for (int d = 0; d < headDim; d++) {
            float kd = K[lane * hdp + d];
#pragma unroll
            for (int r = 0; r < 8; r++) s[r] += Q[(warp + 4 * r) * headDim + d] * kd;
        }
        int kpos = k0 + lane;
#pragma unroll
        for (int r = 0; r < 8; r++) {
            int qr = warp + 4 * r, qpos = p0 + qr;
            bool valid = qr < count && kpos <= qpos && (window <= 0 || kpos > qpos - window);
            float sv = valid ? soft_cap(s[r], softcap) : -__int_as_float(0x7f800000);
            float mn = fmaxf(m[r], warp_max(sv));
            float p = 0, corr = 1;
            if (mn != -__int_as_float(0x7f800000)) {
                p = valid ? __expf(sv - mn) : 0.f;
                corr = __expf(m[r] - mn);
                m[r] = mn;
            }
            l[r] = l[r] * corr + warp_sum(p);
            pw[r * FA_K + lane] = p;
#pragma unroll
            for (int i = 0; i < 8; i++) acc[r][i] *= corr;
        }
        __syncwarp();
        for (int j = 0; j < FA_K; j++) {
            float vd[8];
#pragma unroll
            for (int i = 0; i < 8; i++) { int d = lane + 32 * i; vd[i] = d < headDim ? V[j * headDim + d] : 0.f; }
#pragma unroll
            for (int r = 0; r < 8; r++) {
                float p = pw[r * FA_K + j];
#pragma unroll
                for (int i = 0; i < 8; i++) acc[r][i] += p * vd[i];
            }
        }
        __syncwarp();
    }
#pragma unroll
    for (int r = 0; r < 8; r++) {
        int qr = warp + 4 * r;
        if (qr >= count) continue;
        float inv = l[r] > 0 ? 1.f / l[r] : 0.f;
#pragma unroll
        for (int i = 0; i < 8; i++) {
            int d = lane + 32 * i;
            if (d < headDim) out[((long)(first + qr) * heads + h) * headDim + d] = acc[r][i] * inv;
        }
    }
}

extern "C" __global__ void __launch_bounds__(128) attention_prefill(const float* q, const void* kc, const void* vc, float* out,
                                                                    const int* slots, const int* positions, const int* tiles,
                                                                    int heads, int kvHeads, int headDim, const int* tables,
                                                                    int width, int bs, float scale,
                                                                    float softcap, int window, int kvHalf) {
    if (kvHalf) attention_prefill_body<__half>(q, (const __half*)kc, (const __half*)vc, out, slots, positions, tiles, heads, kvHeads, headDim, tables, width, bs, scale, softcap, window);
    else attention_prefill_body<float>(q, (const float*)kc, (const float*)vc, out, slots, positions, tiles, heads, kvHeads, headDim, tables, width, bs, scale, softcap, window);
}

// Prompt attention on tensor cores over an F16 KV cache (FlashAttention-2's scheme with
// mma.sync, Ampere and later), in blocks of 128 threads: block (tile, head group) takes gq query
// heads of one KV head (gq a power of two dividing FA_ROWS * MT) at up to P = FA_ROWS * MT / gq
// consecutive positions of one sequence (the host's tiles), so a key/value tile read from L2
// serves the gq heads that share it; warp w takes block rows 16 MT w ..< 16 MT (w + 1) (MT m16
// tiles a warp; the backend runs MT = 1, and scripts/fa_lab.cu compares), and the block walks
// the sequence's keys in tiles of KT positions, each tile's cache offsets looked up once (by KT
// threads, a tile ahead). A key/value tile is copied from the paged cache into shared memory
// with cp.async while the tile before it is worked on (two buffers). Scores are Q K^T as
// m16n8k16 products (f16 in, f32 out; Q pre-scaled and rounded to f16), soft-capped and masked
// in f32 (without soft-capping, a tile no row of a warp masks skips the mask), then an online
// softmax per row in log2 units (exp2), and the probabilities (rounded to f16, as llama.cpp
// does) multiply V on the tensor cores too, each row's sum kept in f32. In each m16 tile a
// thread holds rows lane / 4 and lane / 4 + 8 (mma's accumulator layout), so a row's max and
// sum take two shuffles. Key tiles start at multiples of KT whatever the first query, so a
// query's result does not depend on the tile it came in. Head dimension D: a multiple of 16;
// D * MT <= 128 keeps the queries' fragments in registers, otherwise they are read from shared
// memory for every key tile.
#define FA_ROWS 64

#ifndef PEREGRINE_CUDA_EMULATOR
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(shared_address(p)));
}

// c += a (16 x 16, row-major fragment) * b (16 x 8, column-major fragment), f16 in, f32 accumulated.
__device__ __forceinline__ void mma_f16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *(unsigned*)&h;
}

// What a block of the prompt kernels works on (tiles[]: runs of consecutive positions of one
// sequence, the longest, latest in their sequence, taken first): `count` queries from row `first`
// for query heads h0 ..< h0 + gq (block row r: head h0 + r / P at the run's position r % P), over
// KV head kvh, whose keys it reads in tiles of KT positions from `lo` (the window's first tile)
// to the run's last position.
struct PromptTile {
    int first, count, h0, P, kvh, row, p0, lastPos, slot, lo, nTiles;
    long kvOffset;
};

template <int D, int KT, int BR>
__device__ __forceinline__ PromptTile prompt_tile(const int* tiles, const int* positions, const int* slots, int heads, int kvHeads,
                                                  int window, int gq) {
    PromptTile t;
    int tile = gridDim.x - 1 - blockIdx.x;
    t.first = tiles[2 * tile];
    t.count = tiles[2 * tile + 1];
    t.h0 = blockIdx.y * gq;
    t.P = BR / gq;
    t.kvh = t.h0 / (heads / kvHeads);
    t.row = kvHeads * D;
    t.p0 = positions[t.first];
    t.lastPos = t.p0 + t.count - 1;
    t.slot = slots[t.first];
    t.kvOffset = (long)t.kvh * D;
    t.lo = window > 0 ? max(0, t.p0 - window + 1) / KT * KT : 0;
    t.nTiles = (t.lastPos - t.lo) / KT + 1;
    return t;
}

// The cache offset of key row i of key tile n (-1 past the run's last position): the kernels
// look a tile's rows up once, KT threads a row each, a tile ahead of its copies.
template <int KT>
__device__ __forceinline__ long prompt_key_row(const PromptTile& t, int n, int i, const int* tables, int width, int bs) {
    int pos = t.lo + n * KT + i;
    return pos <= t.lastPos ? kv_at(tables, width, bs, t.slot, pos, t.row) + t.kvOffset : -1;
}

// Piece c of a key (or value) tile, 16 bytes of row c / (D / 8) as the cache holds it: its
// offset in the cache (0 where the row is past the run, `in` false, the copy zero-filled).
template <int D>
__device__ __forceinline__ long prompt_piece(const long* rowAt, int c, bool& in) {
    long o = rowAt[c / (D / 8)];
    in = o >= 0;
    return in ? o + (c % (D / 8)) * 8 : 0;
}

// Piece i of the block's queries (row r = i / (D / 4), dimensions d ..< d + 4): scaled and
// rounded to f16, zeros for rows past the run.
template <int D>
__device__ __forceinline__ uint2 prompt_query(const float* q, int i, const PromptTile& t, int heads, float qscale, int& r, int& d) {
    r = i / (D / 4);
    d = 4 * (i % (D / 4));
    int pi = r % t.P;
    float4 v = pi < t.count ? *(const float4*)(q + ((long)(t.first + pi) * heads + t.h0 + r / t.P) * D + d) : make_float4(0.f, 0.f, 0.f, 0.f);
    return make_uint2(pack_half2(v.x * qscale, v.y * qscale), pack_half2(v.z * qscale, v.w * qscale));
}

// The prompt kernels' online softmax, one m16 tile's step for a thread's two rows r and r + 8
// (mma's accumulator layout: s[n][e] is key k0 + 8n + 2 (lane & 3) + (e & 1) of row r + 8 (e >> 1);
// block row r is position r % P of the tile). Soft-caps and masks the scores (a tile every row
// sees, `open`, takes no mask), updates the rows' maximum m and scales their sum l; mx is then
// what the probabilities are taken against, corr what the output so far is to be scaled by.
template <int NT>
__device__ __forceinline__ void prompt_softmax_max(float (&s)[NT][4], float (&m)[2], float (&l)[2], float (&mx)[2], float (&corr)[2],
                                                   bool open, int r, int P, int count, int k0, int p0, int lane, int window,
                                                   float softcap) {
    const float NEG = -__int_as_float(0x7f800000), LOG2E = 1.4426950408889634f;
    mx[0] = mx[1] = NEG;
    if (open) {
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) mx[e >> 1] = fmaxf(mx[e >> 1], s[n][e]);
        }
    } else {
#pragma unroll
        for (int n = 0; n < NT; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int pi = (r + (e >> 1) * 8) % P, key = k0 + 8 * n + 2 * (lane & 3) + (e & 1), qpos = p0 + pi;
                bool valid = pi < count && key <= qpos && (window <= 0 || key > qpos - window);
                float v = valid ? (softcap > 0.f ? soft_cap(s[n][e], softcap) * LOG2E : s[n][e]) : NEG;
                s[n][e] = v;
                mx[e >> 1] = fmaxf(mx[e >> 1], v);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffff, mx[i], 2));
        float mn = fmaxf(m[i], mx[i]);
        float base = mn == NEG ? 0.f : mn;  // a row with nothing valid yet: exp(-inf - 0) = 0
        corr[i] = exp2f(m[i] - base);
        m[i] = mn;
        mx[i] = base;
        l[i] *= corr[i];
    }
}

// The step's probabilities: the scores in place of exp2(s - mx), summed into l.
template <int NT>
__device__ __forceinline__ void prompt_softmax_exp(float (&s)[NT][4], const float (&mx)[2], float (&l)[2]) {
#pragma unroll
    for (int n = 0; n < NT; n++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            float p = exp2f(s[n][e] - mx[e >> 1]);
            s[n][e] = p;
            l[e >> 1] += p;
        }
    }
}

// Writes a thread's two rows r and r + 8 of one m16 output tile (o[n][e]: dimension 8n +
// 2 (lane & 3) + (e & 1) of row r + 8 (e >> 1)), divided by the rows' sums, which are first
// added over the four lanes that hold them; rows past the tile's count are not written.
template <int DT>
__device__ __forceinline__ void prompt_store_rows(const float (&o)[DT][4], float (&l)[2], int r, int P, int count, float* out,
                                                  int first, int heads, int h0, int lane) {
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int ri = r + 8 * i, pi = ri % P;
        if (pi >= count) continue;
        float inv = l[i] > 0 ? 1.f / l[i] : 0.f;
        float* dst = out + ((long)(first + pi) * heads + h0 + ri / P) * (8 * DT) + 2 * (lane & 3);
#pragma unroll
        for (int n = 0; n < DT; n++) *(float2*)(dst + 8 * n) = make_float2(o[n][2 * i] * inv, o[n][2 * i + 1] * inv);
    }
}

template <int D, int KT, int MT>
__device__ __forceinline__ void attention_prefill_mma(const float* q, const __half* kc, const __half* vc, float* out,
                                                      const int* slots, const int* positions, const int* tiles, int heads,
                                                      int kvHeads, const int* tables, int width, int bs, float scale,
                                                      float softcap, int window, int gq) {
#if __CUDA_ARCH__ >= 800
    gdc_wait();
    constexpr int BR = FA_ROWS * MT;    // block rows: 4 warps of MT m16 tiles
    constexpr int WR = 16 * MT;         // a warp's rows
    constexpr int LD = D + 8;           // shared rows padded by 16 bytes: ldmatrix's eight rows hit different banks
    constexpr int NT = KT / 8;          // score fragments a row of the warp holds (8 keys each)
    constexpr int DT = D / 8;           // output fragments (8 dimensions each)
    constexpr int KS = D / 16;          // k-steps of Q K^T
    constexpr bool QREG = D * MT <= 128;
    constexpr int CHUNKS = KT * D / 8;  // 16-byte pieces of a key (or value) tile
    extern __shared__ __align__(16) unsigned char fa_shared[];
    __half* Qs = (__half*)fa_shared;    // [BR][LD]
    __half* Ks = Qs + BR * LD;          // [2][KT][LD]
    __half* Vs = Ks + 2 * KT * LD;      // [2][KT][LD]
    long* rowAt = (long*)(Vs + 2 * KT * LD);  // [2][KT]: the cache offset of each key row of a tile
    const PromptTile pt = prompt_tile<D, KT, BR>(tiles, positions, slots, heads, kvHeads, window, gq);
    const int count = pt.count, P = pt.P, p0 = pt.p0, lo = pt.lo, nTiles = pt.nTiles;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    auto locate = [&](int t) {
        if (threadIdx.x < KT && t < nTiles) rowAt[(t & 1) * KT + threadIdx.x] = prompt_key_row<KT>(pt, t, threadIdx.x, tables, width, bs);
    };
    auto load_tile = [&](int t) {
        __half* kd = Ks + (t & 1) * KT * LD;
        __half* vd = Vs + (t & 1) * KT * LD;
        const long* at = rowAt + (t & 1) * KT;
#pragma unroll
        for (int c = threadIdx.x; c < CHUNKS; c += 128) {
            int j = c / (D / 8), part = c % (D / 8);
            bool in;
            long o = prompt_piece<D>(at, c, in);
            copy16_async(kd + j * LD + part * 8, kc + o, in);
            copy16_async(vd + j * LD + part * 8, vc + o, in);
        }
        copy_commit();
    };
    locate(0);
    locate(1);
    // Scores are kept in log2 units (exp2 below): the scale times log2(e) goes into the queries,
    // unless soft-capping, whose tanh takes the scores in natural units first.
    const float LOG2E = 1.4426950408889634f;
    const float qscale = softcap > 0.f ? scale : scale * LOG2E;
    for (int i = threadIdx.x; i < BR * D / 4; i += blockDim.x) {
        int r, d;
        uint2 v = prompt_query<D>(q, i, pt, heads, qscale, r, d);
        *(uint2*)(Qs + r * LD + d) = v;
    }
    __syncthreads();
    load_tile(0);
    // This lane's ldmatrix row of Q in m-tile mt: qw + mt * 16 * LD.
    const __half* qw = Qs + (warp * WR + (lane & 15)) * LD + (lane >> 4) * 8;
    unsigned qf[QREG ? MT : 1][QREG ? KS : 1][4];
    if constexpr (QREG) {
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int kk = 0; kk < KS; kk++) ldmatrix_x4(qf[mt][kk], qw + mt * 16 * LD + kk * 16);
    }
    float o[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < DT; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    const float NEG = -__int_as_float(0x7f800000);
    float m[MT][2], l[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) { m[mt][0] = m[mt][1] = NEG; l[mt][0] = l[mt][1] = 0.f; }
    int r0 = warp * WR + (lane >> 2);   // the thread's rows: r0 + 16 mt and r0 + 16 mt + 8
    // The positions of the warp's rows: WR consecutive ones of one head, or all P of WR / P heads.
    int posLo = P >= WR ? (warp * WR) % P : 0, posHi = P >= WR ? posLo + WR - 1 : P - 1;
    int warpFirst = p0 + posLo, warpLast = p0 + min(count - 1, posHi);
    for (int t = 0; t < nTiles; t++) {
        if (t + 1 < nTiles) {
            load_tile(t + 1);
            copy_wait<1>();
        } else {
            copy_wait<0>();
        }
        __syncthreads();
        int k0 = lo + t * KT;
        // Skip a tile every key of which is masked for all of the warp's rows.
        bool work = posLo < count && k0 <= warpLast && (window <= 0 || k0 + KT - 1 > warpFirst - window);
        // A tile every key of which every row of the warp sees takes no mask (most of a long prompt's).
        bool open = k0 + KT - 1 <= warpFirst && (window <= 0 || k0 > warpLast - window) && softcap <= 0.f;
        if (work) {
            const __half* kt = Ks + (t & 1) * KT * LD;
            const __half* vt = Vs + (t & 1) * KT * LD;
            float s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int n = 0; n < NT; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    if constexpr (QREG) { a[mt][0] = qf[mt][kk][0]; a[mt][1] = qf[mt][kk][1]; a[mt][2] = qf[mt][kk][2]; a[mt][3] = qf[mt][kk][3]; }
                    else ldmatrix_x4(a[mt], qw + mt * 16 * LD + kk * 16);
                }
#pragma unroll
                for (int j = 0; j < KT / 16; j++) {
                    unsigned b[4];
                    ldmatrix_x4(b, kt + (16 * j + (lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_f16(s[mt][2 * j], a[mt], b[0], b[1]);
                        mma_f16(s[mt][2 * j + 1], a[mt], b[2], b[3]);
                    }
                }
            }
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                // Soft-cap, mask, and the online softmax of rows r0 + 16 mt and r0 + 16 mt + 8.
                float mx[2], corr[2];
                prompt_softmax_max(s[mt], m[mt], l[mt], mx, corr, open, r0 + 16 * mt, P, count, k0, p0, lane, window, softcap);
#pragma unroll
                for (int i = 0; i < DT; i++) { o[mt][i][0] *= corr[0]; o[mt][i][1] *= corr[0]; o[mt][i][2] *= corr[1]; o[mt][i][3] *= corr[1]; }
                prompt_softmax_exp(s[mt], mx, l[mt]);
            }
            // O += P V: the scores' accumulator fragments of keys 16j ..< 16j + 16 are P's A fragment.
#pragma unroll
            for (int j = 0; j < KT / 16; j++) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    a[mt][0] = pack_half2(s[mt][2 * j][0], s[mt][2 * j][1]); a[mt][1] = pack_half2(s[mt][2 * j][2], s[mt][2 * j][3]);
                    a[mt][2] = pack_half2(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]); a[mt][3] = pack_half2(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
                }
#pragma unroll
                for (int i = 0; i < DT / 2; i++) {
                    unsigned b[4];
                    ldmatrix_x4_trans(b, vt + (16 * j + ((lane >> 3) & 1) * 8 + (lane & 7)) * LD + 16 * i + (lane >> 4) * 8);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma_f16(o[mt][2 * i], a[mt], b[0], b[1]);
                        mma_f16(o[mt][2 * i + 1], a[mt], b[2], b[3]);
                    }
                }
            }
        }
        locate(t + 2);  // rowAt[t & 1] was read by tile t's copies, issued before this one's wait
        __syncthreads();  // every warp is done with this buffer before the next load_tile refills it
    }
#pragma unroll
    for (int mt = 0; mt < MT; mt++) prompt_store_rows(o[mt], l[mt], r0 + 16 * mt, P, count, out, pt.first, heads, pt.h0, lane);
#endif
}

#define ATTENTION_PREFILL_MMA(D, KT)                                                                                          \
    extern "C" __global__ void __launch_bounds__(128) attention_prefill_mma_##D(                                            \
        const float* q, const __half* kc, const __half* vc, float* out, const int* slots, const int* positions,              \
        const int* tiles, int heads, int kvHeads, const int* tables, int width, int bs, float scale, float softcap,          \
        int window, int gq) {                                                                                                \
        attention_prefill_mma<D, KT, 1>(q, kc, vc, out, slots, positions, tiles, heads, kvHeads, tables, width, bs, scale,  \
                                        softcap, window, gq);                                                                \
    }
ATTENTION_PREFILL_MMA(64, 64)
ATTENTION_PREFILL_MMA(96, 64)
ATTENTION_PREFILL_MMA(128, 64)
ATTENTION_PREFILL_MMA(256, 32)

// Prompt attention on Hopper's warpgroup MMA (wgmma.mma_async, sm_90a only) over an F16 KV cache,
// 128-wide heads: the grid, tiles, head grouping, masking and online softmax of
// attention_prefill_mma (gq query heads of one KV head at BR / gq positions; warp w holds rows
// 16w ..< 16w + 16), since wgmma's accumulator gives each warp its 16 rows in mma.sync's layout.
// A block is WG warpgroups of 64 rows each (BR = 64 WG) sharing each key and value tile, and PIPE
// overlaps a tile's softmax with the tensor cores' work (below); scripts/fa_lab.cu compares. What differs is where the operands come from. The queries and each key and
// value tile sit in shared memory as wgmma reads them through a descriptor: each 64-dimension half
// of a row is one 128-byte line, its 16-byte pieces swizzled by the row's index mod 8 (so eight
// rows cover the 32 banks and no padding is needed). The four warps then multiply all 64 rows by
// 16 dimensions of a whole key tile in one asynchronous instruction (scores), and the
// probabilities, from registers, by 16 keys of the value tile read N-major (P V), with no
// ldmatrix. cp.async fills the tiles, so a proxy fence makes its writes visible to wgmma; the
// tensor cores' results are waited for before the registers holding them are read, and the
// probability registers are held until the products that read them are complete.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The wrappers' accumulators: d[i / 4][i % 4] is register i, for each warp its 16 rows in mma.sync's
// m16n8 fragment layout (d[n][e]: row lane / 4 + 8 (e >> 1), column 8n + 2 (lane & 3) + (e & 1)).
#ifndef PEREGRINE_CUDA_EMULATOR
// d (64 x 64, f32) = A (64 x 16: a K-major descriptor) * B (16 x 64: a K-major descriptor) (+ d when accumulate).
__device__ __forceinline__ void wgmma_ss_n64(float (&d)[8][4], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3])
                 : "l"(a), "l"(b), "r"(accumulate));
}

// d (64 x 128, f32) = A (64 x 16: a K-major descriptor) * B (16 x 128: a K-major descriptor) (+ d when accumulate).
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], unsigned long long a, unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, 0, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "l"(a), "l"(b), "r"(accumulate));
}

// d (64 x 128, f32) = A (64 x 16 in registers: each warp's 16 rows as mma.sync's A fragment) * B (16 x 128: an
// N-major descriptor) (+ d when accumulate).
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// The dynamic shared memory the launch gave the block.
__device__ __forceinline__ unsigned dynamic_shared_bytes() {
    unsigned n;
    asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(n));
    return n;
}
// Orders this thread's generic-proxy writes of shared memory (stores, cp.async) before the async
// proxy's reads (wgmma).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// The compiler sees an asynchronous wgmma's registers as read and written when it is issued; these
// keep their reads, and any reuse of the registers, after the wait that completes it.
__device__ __forceinline__ void hold(float& x) { asm volatile("" : "+f"(x) :: "memory"); }
__device__ __forceinline__ void hold(unsigned& x) { asm volatile("" : "+r"(x) :: "memory"); }
#endif
// A shared-memory matrix descriptor with 128-byte swizzling: the start address and the leading and
// stride byte offsets (all in 16-byte units).
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned address, unsigned leading, unsigned stride) {
    return (unsigned long long)((address & 0x3FFFF) >> 4) | ((unsigned long long)(leading >> 4) << 16)
           | ((unsigned long long)(stride >> 4) << 32) | (1ull << 62);
}
#endif

// The byte offset of 16-byte piece `part` of row r in a tile of `rows` rows kept as 64-element
// (128-byte) halves one after the other, swizzled as wgmma's 128-byte mode reads them (the
// tile's start 1024-byte aligned).
__device__ __forceinline__ int swizzled128(int r, int part, int rows) {
    return (part >> 3) * rows * 128 + r * 128 + (((part & 7) ^ (r & 7)) << 4);
}

template <int KT, int WG, bool PIPE>
__device__ __forceinline__ void attention_prefill_wgmma(const float* q, const __half* kc, const __half* vc, float* out,
                                                        const int* slots, const int* positions, const int* tiles, int heads,
                                                        int kvHeads, const int* tables, int width, int bs, float scale,
                                                        float softcap, int window, int gq) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    gdc_wait();
    constexpr int D = 128, BR = FA_ROWS * WG;  // block rows: WG warpgroups of 64
    constexpr int THREADS = 128 * WG;
    constexpr int NT = KT / 8;          // score fragments a thread holds per row pair (8 keys each)
    constexpr int DT = D / 8;           // output fragments (8 dimensions each)
    constexpr int KS = D / 16;          // k-steps of Q K^T
    constexpr int QB = 2 * BR * 128;    // bytes of the queries (a warpgroup's 64 rows: 2 x 64 x 128)
    constexpr int TB = 2 * KT * 128;    // of a key (or value) tile
    constexpr int CHUNKS = KT * D / 8;  // 16-byte pieces of a key (or value) tile
    static_assert(KT == 64 || KT == 128, "a key tile is one wgmma of 64 or 128 columns");
    static_assert(KT <= THREADS, "a tile's row offsets are looked up by a thread each");
    extern __shared__ __align__(16) unsigned char fa_shared[];
    unsigned char* Qs = fa_shared + ((1024 - (shared_address(fa_shared) & 1023)) & 1023);  // swizzled tiles start 1024-aligned
    unsigned char* Ks = Qs + QB;         // [2][TB]
    unsigned char* Vs = Ks + 2 * TB;     // [2][TB]
    long* rowAt = (long*)(Vs + 2 * TB);  // [3][KT]: the cache offset of each key row of a tile
    const PromptTile pt = prompt_tile<D, KT, BR>(tiles, positions, slots, heads, kvHeads, window, gq);
    const int count = pt.count, P = pt.P, p0 = pt.p0, lo = pt.lo, nTiles = pt.nTiles;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    auto locate = [&](int t) {
        if (threadIdx.x < KT && t < nTiles) rowAt[(t % 3) * KT + threadIdx.x] = prompt_key_row<KT>(pt, t, threadIdx.x, tables, width, bs);
    };
    // Copies the keys (K) and/or the values (V) of tile t into buffer t & 1 (no commit).
    auto load = [&](int t, bool K, bool V) {
        unsigned char* kd = Ks + (t & 1) * TB;
        unsigned char* vd = Vs + (t & 1) * TB;
        const long* at = rowAt + (t % 3) * KT;
#pragma unroll
        for (int c = threadIdx.x; c < CHUNKS; c += THREADS) {
            bool in;
            long o = prompt_piece<D>(at, c, in);
            int to = swizzled128(c / (D / 8), c % (D / 8), KT);
            if (K) copy16_async(kd + to, kc + o, in);
            if (V) copy16_async(vd + to, vc + o, in);
        }
    };
    auto load_tile = [&](int t) {
        load(t, true, true);
        copy_commit();
    };
    locate(0);
    locate(1);
    const float LOG2E = 1.4426950408889634f;
    const float qscale = softcap > 0.f ? scale : scale * LOG2E;
    for (int i = threadIdx.x; i < BR * D / 4; i += blockDim.x) {
        int r, d;
        uint2 v = prompt_query<D>(q, i, pt, heads, qscale, r, d);
        *(uint2*)(Qs + (r >> 6) * (2 * 64 * 128) + swizzled128(r & 63, d / 8, 64) + (d % 8) * 2) = v;
    }
    fence_proxy_async();
    __syncthreads();
    // This warpgroup's 64 query rows.
    const unsigned qAddr = shared_address(Qs) + (warp >> 2) * (2 * 64 * 128), kAddr = shared_address(Ks), vAddr = shared_address(Vs);
    float o[DT][4];  // wgmma's accumulator, in mma.sync's fragment layout
#pragma unroll
    for (int n = 0; n < DT; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    const float NEG = -__int_as_float(0x7f800000);
    float m[2] = {NEG, NEG}, l[2] = {0.f, 0.f};
    int r0 = warp * 16 + (lane >> 2);  // the thread's rows: r0 and r0 + 8
    int posLo = P >= 16 ? (warp * 16) % P : 0, posHi = P >= 16 ? posLo + 15 : P - 1;
    int warpFirst = p0 + posLo, warpLast = p0 + min(count - 1, posHi);
    // wgmma takes a warpgroup's four warps together, so no warp skips a tile: one whose rows it
    // all masks gets zero probabilities. (The block's tiles start at the window's first key, so
    // every tile has keys some row of the block sees.)
    // Issues S = Q K^T for key tile t (16 dimensions a wgmma: a 32-byte step along a 128-byte half line).
    auto scores = [&](float (&s)[NT][4], int t) {
        const unsigned kt = kAddr + (t & 1) * TB;
#pragma unroll
        for (int kk = 0; kk < KS; kk++) {
            unsigned long long a = wgmma_desc(qAddr + (kk >> 2) * (64 * 128) + (kk & 3) * 32, 16, 1024);
            unsigned long long b = wgmma_desc(kt + (kk >> 2) * (KT * 128) + (kk & 3) * 32, 16, 1024);
            if constexpr (KT == 64) wgmma_ss_n64(s, a, b, kk > 0);
            else wgmma_ss_n128(s, a, b, kk > 0);
        }
    };
    // Tile t's online softmax step (prompt_softmax_max and _exp); corr: what the output so far is
    // to be scaled by.
    auto softmax = [&](float (&s)[NT][4], int t, float (&corr)[2]) {
        int k0 = lo + t * KT;
        bool open = k0 + KT - 1 <= warpFirst && (window <= 0 || k0 > warpLast - window) && softcap <= 0.f && posLo < count;
        float mx[2];
        prompt_softmax_max(s, m, l, mx, corr, open, r0, P, count, k0, p0, lane, window, softcap);
        prompt_softmax_exp(s, mx, l);
    };
    auto rescale = [&](const float (&corr)[2]) {
#pragma unroll
        for (int n = 0; n < DT; n++) { o[n][0] *= corr[0]; o[n][1] *= corr[0]; o[n][2] *= corr[1]; o[n][3] *= corr[1]; }
    };
    // The probabilities of keys 16j ..< 16j + 16 (the scores' accumulator fragments) as P's A fragment.
    auto pack = [&](unsigned (&a)[KT / 16][4], const float (&s)[NT][4]) {
#pragma unroll
        for (int j = 0; j < KT / 16; j++) {
            a[j][0] = pack_half2(s[2 * j][0], s[2 * j][1]); a[j][1] = pack_half2(s[2 * j][2], s[2 * j][3]);
            a[j][2] = pack_half2(s[2 * j + 1][0], s[2 * j + 1][1]); a[j][3] = pack_half2(s[2 * j + 1][2], s[2 * j + 1][3]);
        }
    };
    // Issues O += P V for value tile t: 16 keys a wgmma, each of 2 x 64 dimensions (N-major: 8-row
    // groups 1024 bytes apart, the stride; the two 64-dimension halves KT * 128 bytes apart, the leading offset).
    auto values = [&](const unsigned (&a)[KT / 16][4], int t) {
        const unsigned vt = vAddr + (t & 1) * TB;
#pragma unroll
        for (int j = 0; j < KT / 16; j++) wgmma_rs_n128(o, a[j], wgmma_desc(vt + j * 16 * 128, KT * 128, 1024), 1);
    };
    auto hold_probabilities = [&](unsigned (&a)[KT / 16][4]) {
#pragma unroll
        for (int j = 0; j < KT / 16; j++) { hold(a[j][0]); hold(a[j][1]); hold(a[j][2]); hold(a[j][3]); }
    };
    auto hold_scores = [&](float (&s)[NT][4]) {
#pragma unroll
        for (int n = 0; n < NT; n++) { hold(s[n][0]); hold(s[n][1]); hold(s[n][2]); hold(s[n][3]); }
    };
    auto hold_output = [&] {
#pragma unroll
        for (int n = 0; n < DT; n++) { hold(o[n][0]); hold(o[n][1]); hold(o[n][2]); hold(o[n][3]); }
    };
    if constexpr (!PIPE) {
        // One tile at a time: its scores, softmax, then P V, while the next tile is copied.
        load_tile(0);
        for (int t = 0; t < nTiles; t++) {
            if (t + 1 < nTiles) {
                load_tile(t + 1);
                copy_wait<1>();
            } else {
                copy_wait<0>();
            }
            fence_proxy_async();
            __syncthreads();
            float s[NT][4];
            wgmma_fence();
            scores(s, t);
            wgmma_commit();
            wgmma_wait<0>();
            hold_scores(s);
            float corr[2];
            softmax(s, t, corr);
            rescale(corr);
            unsigned a[KT / 16][4];
            pack(a, s);
            hold_output();  // the rescaled output and P written before the fence, not sunk past it
            hold_probabilities(a);
            wgmma_fence();
            values(a, t);
            wgmma_commit();
            wgmma_wait<0>();
            hold_output();
            hold_probabilities(a);
            locate(t + 2);  // rowAt[(t + 2) % 3] was last read by tile t - 1's copies, before this one's wait
            __syncthreads();  // every warp is done with this buffer before the next load_tile refills it
        }
    } else {
        // FlashAttention-3's overlap within a warpgroup: tile t's scores and tile t - 1's P V are
        // issued together, and tile t's softmax runs while the tensor cores do P V. The values
        // are copied a tile behind the keys: iteration t reads keys t and values t - 1 while keys
        // t + 1 and values t are copied into the buffers that keys t - 1 and values t - 2 left.
        unsigned a[KT / 16][4] = {};
        load(0, true, false);
        copy_commit();
        for (int t = 0; t < nTiles; t++) {
            copy_wait<0>();  // keys t and values t - 1, the last copies issued
            fence_proxy_async();
            __syncthreads();  // visible to every warp, and every warp is done with iteration t - 1
            if (t + 1 < nTiles) load(t + 1, true, false);
            load(t, false, true);
            copy_commit();
            locate(t + 2);  // rowAt[(t + 2) % 3] was last read by iteration t - 1's copies
            float s[NT][4];
            hold_output();  // the rescaled output and P written before the fence, not sunk past it
            hold_probabilities(a);
            wgmma_fence();
            scores(s, t);
            wgmma_commit();
            if (t > 0) values(a, t - 1);
            wgmma_commit();
            wgmma_wait<1>();  // the scores (P V may still run)
            hold_scores(s);
            float corr[2];
            softmax(s, t, corr);
            wgmma_wait<0>();  // P V of tile t - 1: the output, and P's registers free again
            hold_output();
            hold_probabilities(a);
            rescale(corr);
            pack(a, s);
        }
        copy_wait<0>();  // the last tile's values
        fence_proxy_async();
        __syncthreads();
        hold_output();
        hold_probabilities(a);
        wgmma_fence();
        values(a, nTiles - 1);
        wgmma_commit();
        wgmma_wait<0>();
        hold_output();
        hold_probabilities(a);
    }
    prompt_store_rows(o, l, r0, P, count, out, pt.first, heads, pt.h0, lane);
#endif
}

// The backend's kernels (key tile, warpgroups a block, overlap); CUDABackend.warpgroupAttentionKernels
// mirrors the list, and PEREGRINE_WGMMA_PROMPT_ATTENTION picks one.
#define ATTENTION_PREFILL_WGMMA(name, KT, WG, PIPE)                                                                          \
    extern "C" __global__ void __launch_bounds__(128 * WG) name(                                                             \
        const float* q, const __half* kc, const __half* vc, float* out, const int* slots, const int* positions,              \
        const int* tiles, int heads, int kvHeads, const int* tables, int width, int bs, float scale, float softcap,          \
        int window, int gq) {                                                                                                \
        attention_prefill_wgmma<KT, WG, PIPE>(q, kc, vc, out, slots, positions, tiles, heads, kvHeads, tables, width, bs,    \
                                              scale, softcap, window, gq);                                                   \
    }
ATTENTION_PREFILL_WGMMA(attention_prefill_wgmma_128, 64, 1, false)
ATTENTION_PREFILL_WGMMA(attention_prefill_wgmma_128_overlap, 64, 1, true)
ATTENTION_PREFILL_WGMMA(attention_prefill_wgmma_128_wg2, 64, 2, false)
ATTENTION_PREFILL_WGMMA(attention_prefill_wgmma_128_wg2_overlap, 64, 2, true)
ATTENTION_PREFILL_WGMMA(attention_prefill_wgmma_128_kt128_wg2_overlap, 128, 2, true)
ATTENTION_PREFILL_WGMMA(attention_prefill_wgmma_128_kt128_wg2, 128, 2, false)

// Single queries of a batch (decode steps) on tensor cores, over an F16 cache: the grid and the
// scratch of attention_split (block: token, KV head and part of its group, split), the group's
// query heads as the rows of one 16-row mma tile (heads past the group are zero rows), so each
// key and value row is read once for all of them and the arithmetic that bounds attention_split
// in large batches becomes a few mma instructions a tile. The block copies tiles of DT_KEYS keys
// (16-byte cp.async, two buffers); warp w takes keys 16w ..< 16w + 16 of each with its own online
// softmax, as attention_prefill_mma does for its rows, and the warps' results are combined
// in shared memory at the end. With one split the block writes attn; otherwise the partial
// result and (max, sum) go to scratch for merge_if_last, as attention_split's do. W warps a
// block, tiles of 16W keys: two (the kernels attention_decode_mma_D; 35 KB of tiles for D = 128,
// six blocks a multiprocessor) measured up to 4% faster than four (`_w4`: 70 KB, three blocks)
// in a batch of 256 sequences on an H200. S buffers of tiles: S - 1 tiles are in flight while the
// warps work on one. One sequence's blocks are few and long (splits of 128 positions or more),
// so they take four warps and three buffers (`_w4s3`: 104 KB for D = 128, two blocks a
// multiprocessor on an H200); every copy group is committed, empty past the last tile, so that the wait
// for tile n is always "at most S - 1 groups in flight".
// `fused` 2 (the host's `oldKeysEarly`: each row its sequence's one new token, so only the row's
// own position was written in this step, by rope_store_kv just before): the block works out its
// keys' rows and starts copying its first tiles that hold only older positions before gdc_wait,
// so those copies overlap rope_store_kv; q, and a tile with the new key, are read after it. On an
// H100 (16 layers of the 8B shape in BF16, two rounds) tg64 gained 0.7% at depth 4,096 and
// nothing measurable at 16,384: rope_store_kv is short.
// `fused` 1 (one sequence's one token, RoPE and the cache write here, as attention_split's
// fused mode): the older keys' tiles are copied before gdc_wait as with 2; after it the block
// rotates its query heads and the token's key into shared memory (after the tiles' offsets:
// the query heads in f32, the key and value rounded to f16 as the cache holds them), the tile
// that holds the token's position takes its row from there (no block reads that cache row in
// this launch), and split 0 of the KV head's first part writes it to the cache. One launch a
// layer where rope_store_kv and this kernel were two.
template <int D, int W, int S>
__device__ __forceinline__ void attention_decode_mma(SPLIT_PARAMS(__half)) {
#if __CUDA_ARCH__ >= 800
    const bool rope = fused == 1, early = fused == 2 || rope;
    if (!early) gdc_wait();
    constexpr int LD = D + 8, DT = D / 8, KS = D / 16, CH = D / 8, DT_KEYS = 16 * W;
    static_assert((2 * W * SPLIT_GROUP + W * SPLIT_GROUP * D + SPLIT_GROUP * SPLIT_MAX + SPLIT_GROUP) * 4 <= 2 * S * DT_KEYS * LD * 2,
                  "the warps' results and the merge's weights fit in the tiles' memory");
    extern __shared__ __align__(16) unsigned char fa_shared[];
    __half* Ks = (__half*)fa_shared;     // [S][DT_KEYS][LD]
    __half* Vs = Ks + S * DT_KEYS * LD;  // [S][DT_KEYS][LD]
    long* offs = (long*)(Vs + S * DT_KEYS * LD);  // [S][DT_KEYS]: the S tiles' keys' cache rows, -1 past the share, -2 the token's own (rope)
    __half* Knew = (__half*)(offs + S * DT_KEYS);  // [D]: the token's rotated key (rope)
    __half* Vnew = Knew + D;                        // [D]: its value
    float* Qr = (float*)(Vnew + D);                 // [SPLIT_GROUP][D]: the rotated query heads
    GroupedShare sh = grouped_share(rowMap, positions, slots, heads, kvHeads, window, splits);
    int t = sh.t, split = sh.split, kvh = sh.kvh, h0 = sh.h0, nh = sh.nh, slot = sh.slot, start = sh.start, end = sh.end;
    int row = kvHeads * D, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    long kvOffset = (long)kvh * D;
    int nTiles = end > start ? (end - start + DT_KEYS - 1) / DT_KEYS : 0;
    // Tile n's keys' rows, one thread a key (the block-table lookups once a key, not once a piece).
    auto find_rows = [&](int n) {
        int p = start + n * DT_KEYS + threadIdx.x;
        if (threadIdx.x < DT_KEYS && n < nTiles)
            offs[(n % S) * DT_KEYS + threadIdx.x] = p >= end ? -1L : rope && p == sh.pos ? -2L : kv_at(tables, width, bs, slot, p, row) + kvOffset;
    };
    auto load_tile = [&](int n) {
        if (n < nTiles) {
            __half* kd = Ks + (n % S) * DT_KEYS * LD;
            __half* vd = Vs + (n % S) * DT_KEYS * LD;
            const long* rows = offs + (n % S) * DT_KEYS;
            for (int c = threadIdx.x; c < DT_KEYS * CH; c += blockDim.x) {
                int j = c / CH, piece = c % CH;
                long o = rows[j];
                if (o == -2) {
                    *(uint4*)(kd + j * LD + piece * 8) = *(const uint4*)(Knew + piece * 8);
                    *(uint4*)(vd + j * LD + piece * 8) = *(const uint4*)(Vnew + piece * 8);
                    continue;
                }
                bool in = o >= 0;
                o = in ? o + piece * 8 : 0;
                copy16_async(kd + j * LD + piece * 8, kc + o, in);
                copy16_async(vd + j * LD + piece * 8, vc + o, in);
            }
        }
        copy_commit();
    };
#pragma unroll
    for (int n = 0; n < S; n++) find_rows(n);
    __syncthreads();
    // Tiles before the first that may hold the row's own key (position sh.pos), in order, so the
    // copy groups stay one a tile.
    int first = 0;
    if (early) {
        while (first < S - 1 && min(end, start + (first + 1) * DT_KEYS) <= sh.pos) load_tile(first++);
        gdc_wait();
    }
    if (rope) {
        rotate_group(q, kin, cosT, sinT, t, heads, kvHeads, h0, nh, kvh, D, rotDim, interleaved,
                     [&](int hh, int d, float r) { Qr[hh * D + d] = r; }, [&](int d, float r) { Knew[d] = __float2half_rn(r); });
        const float* vp = vin + ((long)t * kvHeads + kvh) * D;
        for (int d = threadIdx.x; d < D; d += blockDim.x) Vnew[d] = __float2half_rn(vp[d]);
        __syncthreads();
        if (split == 0 && sh.part == 0) {
            long at = kv_at(tables, width, bs, slot, sh.pos, row) + kvOffset;
            for (int d = threadIdx.x; d < D; d += blockDim.x) { kc[at + d] = Knew[d]; vc[at + d] = Vnew[d]; }
        }
    }
#pragma unroll
    for (int n = 0; n < S - 1; n++)
        if (n >= first) load_tile(n);
    // The thread's query fragments (mma's A layout, row g = lane / 4): head h0 + g, scaled and
    // rounded to f16; rows g + 8 and heads past the part are zeros.
    int g = lane >> 2, c2 = 2 * (lane & 3);
    unsigned qf[KS][4];
    const float* qr = rope ? Qr + g * D : q + ((long)t * heads + h0 + g) * D;
#pragma unroll
    for (int kk = 0; kk < KS; kk++) {
        float2 x = g < nh ? *(const float2*)(qr + 16 * kk + c2) : make_float2(0.f, 0.f);
        float2 y = g < nh ? *(const float2*)(qr + 16 * kk + c2 + 8) : make_float2(0.f, 0.f);
        qf[kk][0] = pack_half2(x.x * scale, x.y * scale);
        qf[kk][1] = 0;
        qf[kk][2] = pack_half2(y.x * scale, y.y * scale);
        qf[kk][3] = 0;
    }
    const float NEG = -__int_as_float(0x7f800000);
    float o[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
    float m = NEG, l = 0.f;  // row g's running max and (this thread's share of the) sum
    for (int n = 0; n < nTiles; n++) {
        load_tile(n + S - 1);  // into the buffer tile n - 1 was read from
        copy_wait<S - 1>();
        __syncthreads();
        int kw = start + n * DT_KEYS + 16 * warp;  // the warp's first key
        if (kw < end) {
            const __half* kt = Ks + ((n % S) * DT_KEYS + 16 * warp) * LD;
            const __half* vt = Vs + ((n % S) * DT_KEYS + 16 * warp) * LD;
            float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
            for (int kk = 0; kk < KS; kk++) {
                unsigned b[4];
                ldmatrix_x4(b, kt + ((lane >> 4) * 8 + (lane & 7)) * LD + kk * 16 + ((lane >> 3) & 1) * 8);
                mma_f16(s[0], qf[kk], b[0], b[1]);
                mma_f16(s[1], qf[kk], b[2], b[3]);
            }
            // Row g's scores of keys kw + 8j + c2 + e (the accumulators' first two values).
            float mx = NEG;
#pragma unroll
            for (int j = 0; j < 2; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float v = kw + 8 * j + c2 + e < end ? soft_cap(s[j][e], softcap) : NEG;
                    s[j][e] = v;
                    mx = fmaxf(mx, v);
                }
            }
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 2));
            float mn = fmaxf(m, mx);  // finite: the warp's first key is valid
            float corr = __expf(m - mn);
            m = mn;
            l *= corr;
#pragma unroll
            for (int i = 0; i < DT; i++) { o[i][0] *= corr; o[i][1] *= corr; }
#pragma unroll
            for (int j = 0; j < 2; j++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    float p = __expf(s[j][e] - mn);
                    s[j][e] = p;
                    l += p;
                }
            }
            unsigned a[4] = {pack_half2(s[0][0], s[0][1]), 0u, pack_half2(s[1][0], s[1][1]), 0u};
#pragma unroll
            for (int i = 0; i < DT / 2; i++) {
                unsigned b[4];
                ldmatrix_x4_trans(b, vt + (((lane >> 3) & 1) * 8 + (lane & 7)) * LD + 16 * i + (lane >> 4) * 8);
                mma_f16(o[2 * i], a, b[0], b[1]);
                mma_f16(o[2 * i + 1], a, b[2], b[3]);
            }
        }
        find_rows(n + S);  // into tile n's slot, read by its load_tile before this iteration
        __syncthreads();  // every warp is done with this buffer before the next load_tile refills it
    }
    l += __shfl_xor_sync(0xffffffff, l, 1);
    l += __shfl_xor_sync(0xffffffff, l, 2);
    // The warps' results, combined: each row's (max, sum) by warp, then its outputs scaled to the
    // block's max (shared memory: the tiles are no longer read).
    float* ms = (float*)fa_shared;    // [W][SPLIT_GROUP]
    float* ls = ms + W * SPLIT_GROUP;  // [W][SPLIT_GROUP]
    float* os = ls + W * SPLIT_GROUP;  // [W][SPLIT_GROUP][D]
    if ((lane & 3) == 0 && g < SPLIT_GROUP) { ms[warp * SPLIT_GROUP + g] = m; ls[warp * SPLIT_GROUP + g] = l; }
    __syncthreads();
    if (g < nh) {
        float top = ms[g];
#pragma unroll
        for (int w = 1; w < W; w++) top = fmaxf(top, ms[w * SPLIT_GROUP + g]);
        float f = m == NEG ? 0.f : __expf(m - top);
        float* dst = os + (warp * SPLIT_GROUP + g) * D + c2;
#pragma unroll
        for (int i = 0; i < DT; i++) *(float2*)(dst + 8 * i) = make_float2(o[i][0] * f, o[i][1] * f);
    }
    __syncthreads();
    int u = blockIdx.x;
    for (int i = threadIdx.x; i < nh * D; i += blockDim.x) {
        int hh = i / D, d = i % D;
        float top = NEG;
#pragma unroll
        for (int w = 0; w < W; w++) top = fmaxf(top, ms[w * SPLIT_GROUP + hh]);
        float sum = 0.f, acc = 0.f;
#pragma unroll
        for (int w = 0; w < W; w++) {
            float mw = ms[w * SPLIT_GROUP + hh];
            sum += mw == NEG ? 0.f : ls[w * SPLIT_GROUP + hh] * __expf(mw - top);
            acc += os[(w * SPLIT_GROUP + hh) * D + d];
        }
        long th = ((long)u * heads + h0 + hh) * splits + split;
        if (splits == 1) {
            attn[((long)t * heads + h0 + hh) * D + d] = sum > 0 ? acc / sum : 0.f;
        } else {
            partial[th * D + d] = acc;
            if (d == 0) { stats[2 * th] = top; stats[2 * th + 1] = sum; }
        }
    }
    if (splits == 1) return;
    // The merge's weights after the warps' results, in the tiles' memory (static arrays would
    // cost every block their 4 KB, and a multiprocessor one resident block of two warps).
    __shared__ bool last;
    float* weights = os + W * SPLIT_GROUP * D;  // [SPLIT_GROUP][SPLIT_MAX]
    merge_if_last(partial, stats, attn, counters, u, t, h0, nh, heads, D, splits, &last, weights, weights + SPLIT_GROUP * SPLIT_MAX);
#endif
}

#define ATTENTION_DECODE_MMA(D)                                                                                               \
    extern "C" __global__ void __launch_bounds__(64) attention_decode_mma_##D(SPLIT_PARAMS(void)) {                        \
        attention_decode_mma<D, 2, 2>(SPLIT_ARGS(__half));                                                                    \
    }                                                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) attention_decode_mma_##D##_w4(SPLIT_PARAMS(void)) {                  \
        attention_decode_mma<D, 4, 2>(SPLIT_ARGS(__half));                                                                    \
    }                                                                                                                         \
    extern "C" __global__ void __launch_bounds__(128) attention_decode_mma_##D##_w4s3(SPLIT_PARAMS(void)) {                \
        attention_decode_mma<D, 4, 3>(SPLIT_ARGS(__half));                                                                    \
    }
ATTENTION_DECODE_MMA(16)
ATTENTION_DECODE_MMA(32)
ATTENTION_DECODE_MMA(64)
ATTENTION_DECODE_MMA(96)
ATTENTION_DECODE_MMA(128)

// Sampling on the device: only the chosen ids (greedy) or the k largest logits leave the GPU.

// Floats as unsigned keys in the same order.
__device__ __forceinline__ unsigned order_key(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// The largest value of each row and its first index (greedy decoding): blocks (part, row) reduce
// their share and combine with one 64-bit atomicMax of (value key, inverted index), so ties go to
// the first index. out (zeroed first) holds one such word per row; NaNs are passed over.
extern "C" __global__ void argmax_rows(const float* x, int cols, unsigned long long* out) {
    gdc_wait();
    const float* r = x + (long)blockIdx.y * cols;
    unsigned long long best = 0;
    const int stride = gridDim.x * blockDim.x;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    // Four loads in flight a thread before any compare: the loop is bound by memory latency.
    for (; i + 3 * stride < cols; i += 4 * stride) {
        float v[4] = {r[i], r[i + stride], r[i + 2 * stride], r[i + 3 * stride]};
        #pragma unroll
        for (int j = 0; j < 4; j++) {
            if (v[j] != v[j]) continue;
            unsigned long long key = ((unsigned long long)order_key(v[j]) << 32) | (0xffffffffu - (unsigned)(i + j * stride));
            if (key > best) best = key;
        }
    }
    for (; i < cols; i += stride) {
        float v = r[i];
        if (v != v) continue;
        unsigned long long key = ((unsigned long long)order_key(v) << 32) | (0xffffffffu - (unsigned)i);
        if (key > best) best = key;
    }
    for (int o = 16; o > 0; o >>= 1) {
        unsigned long long other = __shfl_xor_sync(0xffffffff, best, o);
        if (other > best) best = other;
    }
    __shared__ unsigned long long warps[32];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) warps[warp] = best;
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); w++) if (warps[w] > best) best = warps[w];
        atomicMax(out + blockIdx.y, best);
    }
}

// The k largest values of row r (in no particular order) and their indices, by one block: a
// radix select finds the k-th largest key 8 bits at a time (a 256-bin histogram per pass over
// the row), then one pass gathers everything above it and enough equal to it. vo and io may be
// global or shared memory; they are complete when it returns.
__device__ void select_largest(const float* r, int cols, int k, float* vo, int* io) {
    __shared__ unsigned hist[256];
    __shared__ unsigned chosen, left, taken, equal;
    unsigned prefix = 0, mask = 0, remaining = k;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int i = threadIdx.x; i < cols; i += blockDim.x) {
            unsigned key = order_key(r[i]);
            if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 255], 1u);
        }
        __syncthreads();
        if (warp == 0) {
            // Lane L holds digits 255 - 8L ... 248 - 8L (largest first); find the digit where the
            // count of larger keys reaches `remaining`.
            unsigned c[8], total = 0;
#pragma unroll
            for (int j = 0; j < 8; j++) { c[j] = hist[255 - (lane * 8 + j)]; total += c[j]; }
            unsigned incl = total;
            for (int o = 1; o < 32; o <<= 1) {
                unsigned v = __shfl_up_sync(0xffffffff, incl, o);
                if (lane >= o) incl += v;
            }
            unsigned before = incl - total;
            if (before < remaining && remaining <= incl) {
                unsigned cum = before;
                for (int j = 0; j < 8; j++) {
                    if (cum + c[j] >= remaining) { chosen = 255 - (lane * 8 + j); left = remaining - cum; break; }
                    cum += c[j];
                }
            }
        }
        __syncthreads();
        prefix |= chosen << shift;
        mask |= 255u << shift;
        remaining = left;
        __syncthreads();
    }
    if (threadIdx.x == 0) { taken = 0; equal = 0; }
    __syncthreads();
    for (int i = threadIdx.x; i < cols; i += blockDim.x) {
        float v = r[i];
        unsigned key = order_key(v);
        bool take = key > prefix;
        if (key == prefix) take = atomicAdd(&equal, 1u) < remaining;
        if (take) {
            unsigned at = atomicAdd(&taken, 1u);
            vo[at] = v;
            io[at] = i;
        }
    }
    __syncthreads();
}

// The k largest values of each row and their indices, one block per row (select_largest).
extern "C" __global__ void __launch_bounds__(1024) topk_rows(const float* x, int cols, int k, float* values, int* indices) {
    gdc_wait();
    select_largest(x + (long)blockIdx.x * cols, cols, k, values + (long)blockIdx.x * k, indices + (long)blockIdx.x * k);
}

// A token drawn for each of several rows in one launch, one block of 1024 threads per row, as
// the host's Sampler draws with top-k (1 ... 1024): the k largest logits (select_largest), their
// maximum m, those at or above the min-p cut m + cutOffset kept and sorted (largest first; ties
// by id), p_i = exp((l_i - m) * invT), top-p over p_i / sum, then the first kept token whose
// running sum passes u x (the kept sum), u being the row's number from its own stream. The sums
// run in the host's order, and the arithmetic is IEEE's (the _rn intrinsics and exp in double,
// rounded: this file is compiled with fast math), so the same u gives the host's token except
// where an exponential rounds differently in its last bit. params: [invT, cutOffset, topP, u]
// per row; out: [token, drew] per row, drew 0 when the row's maximum is not finite (the best
// token is taken, as the host does, and no number is used).
extern "C" __global__ void __launch_bounds__(1024) sample_rows(const float* x, int cols, const int* rows, const float* params,
                                                               const int* ks, int* out) {
    gdc_wait();
    __shared__ float value[1024], weight[1024];
    __shared__ int id[1024];
    __shared__ float reduce[32];
    int task = blockIdx.x, k = ks[task];
    const float* r = x + (long)rows[task] * cols;
    float invT = params[4 * task], cutOffset = params[4 * task + 1], topP = params[4 * task + 2], u = params[4 * task + 3];
    select_largest(r, cols, k, value, id);
    for (int i = k + threadIdx.x; i < 1024; i += blockDim.x) { value[i] = -__int_as_float(0x7f800000); id[i] = 0x7fffffff; }
    float m = -__int_as_float(0x7f800000);
    for (int i = threadIdx.x; i < k; i += blockDim.x) m = fmaxf(m, value[i]);
    m = warp_max(m);
    if ((threadIdx.x & 31) == 0) reduce[threadIdx.x >> 5] = m;
    __syncthreads();
    m = reduce[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) m = fmaxf(m, reduce[w]);
    if (!isfinite(m)) {
        if (threadIdx.x == 0) {
            int best = 0;
            for (int i = 1; i < k; i++) if (value[i] > value[best] || (value[i] == value[best] && id[i] < id[best])) best = i;
            out[2 * task] = id[best];
            out[2 * task + 1] = 0;
        }
        return;
    }
    // Bitonic sort of the 1024 slots: larger value first, then smaller id.
    for (int size = 2; size <= 1024; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            int i = threadIdx.x, j = i ^ stride;
            if (j > i) {
                bool before = value[i] > value[j] || (value[i] == value[j] && id[i] < id[j]);  // i belongs before j
                bool ascending = (i & size) == 0;
                if (before != ascending) {
                    float tv = value[i]; value[i] = value[j]; value[j] = tv;
                    int ti = id[i]; id[i] = id[j]; id[j] = ti;
                }
            }
        }
    }
    __syncthreads();
    float cut = __fadd_rn(m, cutOffset);
    for (int i = threadIdx.x; i < k; i += blockDim.x) {
        float l = value[i];
        weight[i] = l >= cut && l > -__int_as_float(0x7f800000) ? (float)exp((double)__fmul_rn(__fsub_rn(l, m), invT)) : -1.f;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    int n = 0;
    while (n < k && weight[n] >= 0) n++;  // the kept candidates are a prefix: the largest
    float sum = 0;
    for (int i = 0; i < n; i++) sum = __fadd_rn(sum, weight[i]);
    int keep = n;
    if (topP < 1) {
        float cum = 0;
        for (int i = 0; i < n; i++) {
            cum = __fadd_rn(cum, __fdiv_rn(weight[i], sum));
            if (cum >= topP) { keep = i + 1; break; }
        }
    }
    float total = 0;
    for (int i = 0; i < keep; i++) total = __fadd_rn(total, weight[i]);
    float target = __fmul_rn(u, total), acc = 0;
    int chosen = id[keep - 1];
    for (int i = 0; i < keep; i++) {
        acc = __fadd_rn(acc, weight[i]);
        if (target < acc) { chosen = id[i]; break; }
    }
    out[2 * task] = chosen;
    out[2 * task + 1] = 1;
}

// Σ exp((x - shift) * scale) over one row, in one block (a fixed order: the same sum every time).
extern "C" __global__ void __launch_bounds__(1024) exp_sum_rows(const float* x, int cols, float shift, float scale, float* out) {
    gdc_wait();
    float s = 0;
    for (int i = threadIdx.x; i < cols; i += blockDim.x) s += __expf((x[i] - shift) * scale);
    s = warp_sum(s);
    __shared__ float partial[32];
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x == 0) {
        float total = 0;
        for (int w = 0; w < (int)(blockDim.x >> 5); w++) total += partial[w];
        out[0] = total;
    }
}

// Repetition penalty on one row's logits, ids unique: positive logits divided, negative multiplied.
extern "C" __global__ void repetition_penalty(float* logits, const int* ids, int count, float penalty) {
    gdc_wait();
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= count) return;
    float l = logits[ids[i]];
    logits[ids[i]] = l > 0 ? l / penalty : l * penalty;
}

// ---- Mixture of experts ----
// A pass's routes are [rows, k] pairs (weight, expert index as int bits). They are grouped by
// expert on the device (moe_group), the routed rows gathered in that order (gather_rows), each
// chosen expert's gate/up and down products run over its rows (a warp per output row of each
// chosen expert: only the chosen experts' weights are read, each once a pass), and each row's
// outputs summed with its weights in order of expert index (moe_combine). Every row's
// arithmetic is its own, whatever else the batch holds.
#define MOE_MAX_EXPERTS 4096
#define MOE_MAX_USED 64

// Routing of one row of router logits `l` by one warp: the softmax, then k rounds of taking
// the most probable expert after the one taken last (falling probability, rising index on
// ties); the weights divided by their sum when `normalize`. The logits are read through L2
// (__ldcg): moe_router's routing block reads what other blocks of its grid wrote.
// The k rounds of choosing, given `best(lastP, lastE, bp, be)`: the lane's most probable expert
// among its own that comes after (lastP, lastE) in the order of choosing, into (bp, be).
template <typename Best>
__device__ __forceinline__ void route_rounds(int experts, int k, int normalize, float* r, int lane, Best best) {
    float lastP = __int_as_float(0x7f800000), chosen = 0;
    int lastE = -1;
    for (int j = 0; j < k; j++) {
        float bp = -1;
        int be = experts;
        best(lastP, lastE, bp, be);
        for (int o = 16; o > 0; o >>= 1) {
            float op = __shfl_xor_sync(0xffffffff, bp, o);
            int oe = __shfl_xor_sync(0xffffffff, be, o);
            if (op > bp || (op == bp && oe < be)) { bp = op; be = oe; }
        }
        if (be >= experts) { bp = 0; be = j % experts; }  // non-finite logits: a valid index, weight 0
        if (lane == 0) { r[2 * j] = bp; r[2 * j + 1] = __int_as_float(be); }
        chosen += bp;
        lastP = bp;
        lastE = be;
    }
    __syncwarp();
    if (normalize && chosen > 0)
        for (int j = lane; j < k; j += 32) r[2 * j] /= chosen;
}

// Up to 32 x PL experts: each lane holds its logits' probabilities in registers, so the k rounds
// read no memory (reading the logits again each round cost a trip to L2 per round: moe_router
// took 13.6 us a layer on an H200 for 128 experts, 8 chosen).
template <int PL>
__device__ __forceinline__ void route_row_held(const float* l, int experts, int k, int normalize, float* r, int lane) {
    float p[PL];
    float m = -__int_as_float(0x7f800000);
#pragma unroll
    for (int i = 0; i < PL; i++) {
        int e = lane + 32 * i;
        p[i] = e < experts ? __ldcg(l + e) : -__int_as_float(0x7f800000);
        m = fmaxf(m, p[i]);
    }
    m = warp_max(m);
    float s = 0;
#pragma unroll
    for (int i = 0; i < PL; i++) if (lane + 32 * i < experts) s += expf(p[i] - m);
    s = warp_sum(s);
#pragma unroll
    for (int i = 0; i < PL; i++) p[i] = lane + 32 * i < experts ? expf(p[i] - m) / s : -1.f;
    route_rounds(experts, k, normalize, r, lane, [&](float lastP, int lastE, float& bp, int& be) {
#pragma unroll
        for (int i = 0; i < PL; i++) {
            int e = lane + 32 * i;
            bool after = p[i] < lastP || (p[i] == lastP && e > lastE);
            if (e < experts && after && (p[i] > bp || (p[i] == bp && e < be))) { bp = p[i]; be = e; }
        }
    });
}

__device__ __forceinline__ void route_row(const float* l, int experts, int k, int normalize, float* r, int lane) {
    if (experts <= 128) { route_row_held<4>(l, experts, k, normalize, r, lane); return; }
    if (experts <= 256) { route_row_held<8>(l, experts, k, normalize, r, lane); return; }
    float m = -__int_as_float(0x7f800000);
    for (int e = lane; e < experts; e += 32) m = fmaxf(m, __ldcg(l + e));
    m = warp_max(m);
    float s = 0;
    for (int e = lane; e < experts; e += 32) s += expf(__ldcg(l + e) - m);
    s = warp_sum(s);
    route_rounds(experts, k, normalize, r, lane, [&](float lastP, int lastE, float& bp, int& be) {
        for (int e = lane; e < experts; e += 32) {
            float p = expf(__ldcg(l + e) - m) / s;
            bool after = p < lastP || (p == lastP && e > lastE);
            if (after && (p > bp || (p == bp && e < be))) { bp = p; be = e; }
        }
    });
}

// Routing: a warp per row (route_row).
extern "C" __global__ void moe_route(const float* logits, int rows, int experts, int k, int normalize, float* routes) {
    gdc_wait();
    int row = (int)(((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5), lane = threadIdx.x & 31;
    if (row >= rows) return;
    route_row(logits + (long)row * experts, experts, k, normalize, routes + (long)row * 2 * k, lane);
}

// A MoE layer's input and routing for a decode step of a few rows, in one launch (RMSNorm,
// router product and routing would be three). Block (t, e) computes router logit e of row t in
// one pass over x, the norm's weight and the router's row (float4 loads, all in flight at
// once): the sum of squares and the dot product together, the dot scaled after. Block (t, 0)
// writes the normalized row to h and, with hq, its 8-bit copy (hq, hs: as quantize_q8 rounds
// it) for quantized experts. The last block of row t to finish (counters[t], which it resets)
// routes the row. d is a multiple of 128, so every warp's lanes run the same iterations.
extern "C" __global__ void __launch_bounds__(256) moe_router(const float* x, const float* norm, float eps, int d, const float* router,
                                                             int experts, int k, int normalize, float* h, float* logits, float* routes,
                                                             int* counters, signed char* hq, float* hs) {
    gdc_wait();
    __shared__ float partial[2][8];
    __shared__ int last;
    int t = blockIdx.x, e = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* xr = x + (long)t * d;
    const float* wr = router + (long)e * d;
    float ss = 0, dot = 0;
    for (int i = threadIdx.x * 4; i < d; i += 1024) {
        float4 a = *(const float4*)(xr + i), g = *(const float4*)(norm + i), w = *(const float4*)(wr + i);
        ss += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
        dot += a.x * g.x * w.x + a.y * g.y * w.y + a.z * g.z * w.z + a.w * g.w * w.w;
    }
    ss = warp_sum(ss);
    dot = warp_sum(dot);
    if (lane == 0) { partial[0][warp] = ss; partial[1][warp] = dot; }
    __syncthreads();
    ss = 0;
    dot = 0;
    for (int w = 0; w < (int)(blockDim.x >> 5); w++) { ss += partial[0][w]; dot += partial[1][w]; }
    float scale = rsqrtf(ss / d + eps);
    if (threadIdx.x == 0) logits[(long)t * experts + e] = dot * scale;
    if (e == 0) {
        for (int i = threadIdx.x * 4; i < d; i += 1024) {
            float4 a = *(const float4*)(xr + i), g = *(const float4*)(norm + i);
            float4 v = make_float4(a.x * scale * g.x, a.y * scale * g.y, a.z * scale * g.z, a.w * scale * g.w);
            *(float4*)(h + (long)t * d + i) = v;
            if (hq) {
                // Lanes 8j .. 8j + 7 hold one 32-value block.
                float m = fmaxf(fmaxf(fabsf(v.x), fabsf(v.y)), fmaxf(fabsf(v.z), fabsf(v.w)));
                for (int o = 4; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, o));
                float dq = m / 127.f;
                char4 q = dq > 0 ? make_char4(__float2int_rn(v.x / dq), __float2int_rn(v.y / dq), __float2int_rn(v.z / dq),
                                              __float2int_rn(v.w / dq))
                                 : make_char4(0, 0, 0, 0);
                *(char4*)(hq + (long)t * d + i) = q;
                if ((lane & 7) == 0) hs[(long)t * (d / 32) + i / 32] = dq;
            }
        }
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(&counters[t], 1) == (int)gridDim.y - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    if (warp == 0) route_row(logits + (long)t * experts, experts, k, normalize, routes + (long)t * 2 * k, lane);
    if (threadIdx.x == 0) counters[t] = 0;
}

// Groups `total` routes by expert, one block: counts[e] and starts[e] of each expert's group,
// place[r] (route r's position in grouped order), rowOf[p] (the row gathered at position p),
// active[0..<a] the chosen experts in index order with a in active[experts], and reads[e] += 1
// for each chosen expert. With `tiles`, also the groups cut in tiles of up to tileRows rows for
// expert_gemm: their count, then expert, first row and rows of each. Within a group the order is
// whatever the atomics give: each row's products are computed alone, so it changes no result.
extern "C" __global__ void __launch_bounds__(1024) moe_group(const float* routes, int total, int k, int experts, int* counts,
                                                              int* starts, int* place, int* rowOf, int* active, int* reads,
                                                              int* tiles, int tileRows) {
    gdc_wait();
    __shared__ int n[MOE_MAX_EXPERTS];
    __shared__ int firstTile[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < experts; e += blockDim.x) n[e] = 0;
    __syncthreads();
    for (int r = threadIdx.x; r < total; r += blockDim.x) place[r] = atomicAdd(&n[__float_as_int(routes[2 * r + 1])], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int at = 0, a = 0, tile = 0;
        for (int e = 0; e < experts; e++) {
            int c = n[e];
            counts[e] = c;
            starts[e] = at;
            n[e] = at;
            firstTile[e] = tile;
            at += c;
            if (c > 0) { active[a++] = e; reads[e] += 1; }
            if (tiles) tile += (c + tileRows - 1) / tileRows;
        }
        active[experts] = a;
        if (tiles) tiles[0] = tile;
    }
    __syncthreads();
    if (tiles)
        for (int e = threadIdx.x; e < experts; e += blockDim.x)
            for (int r = 0, c = counts[e]; r < c; r += tileRows) {
                int* t = tiles + 1 + 3 * (firstTile[e] + r / tileRows);
                t[0] = e;
                t[1] = n[e] + r;
                t[2] = min(tileRows, c - r);
            }
    for (int r = threadIdx.x; r < total; r += blockDim.x) {
        int p = n[__float_as_int(routes[2 * r + 1])] + place[r];
        place[r] = p;
        rowOf[p] = r / k;
    }
}

// The chosen experts' products over their grouped rows: warp (a, o) takes output o of the a-th
// chosen expert (weights[e] its matrix of n x k). Gated (up != 0): y = silu(W x) * (U x).
extern "C" __global__ void moe_products(const unsigned long long* weights, const unsigned long long* ups, int dtype, int upType,
                                        int n, int k, const float* x, const signed char* xq, const float* xs, const int* counts,
                                        const int* starts, const int* active, int experts, int slots, float* y) {
    gdc_wait();
    long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    int a = (int)(warp / n), o = (int)(warp % n);
    if (a >= slots || a >= active[experts]) return;
    int e = active[a];
    const void* w = (const void*)weights[e];
    const void* u = ups ? (const void*)ups[e] : 0;
    long total = (long)n * k;
    for (int t0 = starts[e], end = starts[e] + counts[e]; t0 < end; t0 += TOKENS) {
        int nt = min(TOKENS, end - t0);
        float acc[TOKENS], up[TOKENS];
        for (int t = 0; t < TOKENS; t++) { acc[t] = 0; up[t] = 0; }
        row_dot(w, dtype, total, (long)o * k, x, xq, xs, k, t0, nt, lane, acc);
        if (u) row_dot(u, upType, total, (long)o * k, x, xq, xs, k, t0, nt, lane, up);
        if (lane == 0) {
            for (int t = 0; t < nt; t++) {
                float g = acc[t];
                y[(long)(t0 + t) * n + o] = u ? g / (1.f + __expf(-g)) * up[t] : g;
            }
        }
    }
}

// The chosen experts' products on the tensor cores, one launch for every expert (a prompt's
// pass, or a decode step of many rows): moe_group lists tiles of up to EG_ROWS grouped rows of
// one expert (tiles[0] of them, then expert, first row and rows for each), and block (o, t)
// computes outputs EG_OUTS o ..< EG_OUTS (o + 1) of tile t. Each EG_K-wide slice of the expert's
// weights is decoded into shared memory as 16-bit values (dequant8_bf16 for the quantized types,
// never a whole widened copy in memory) beside the tile's rows rounded to the same type, then
// multiplied by m16n8k16 products with f32 accumulation: warp w takes 16 outputs for all the
// tile's rows. A prompt's pass of 512 tokens gives 128 experts 32 rows each on average, so a
// tile of 64 decodes most experts' weights once. Gated (ups != 0): gate and up are decoded side by side and the block writes
// silu(gate) * up. x is f32 (xHalf 0) or already in the 16-bit type (xHalf 1), its grouped row
// p at row rowOf[p] (rowOf 0: row p); y gets f32 results, yh (if set) the same rounded to the
// 16-bit type, for the next product. A row's result depends on no other row of its tile, and
// its sums run over k in one order: the same whatever else the pass holds.
#define EG_ROWS 64
#define EG_OUTS 64
#define EG_K 64
#define EG_LD (EG_K + 8)  // shared rows padded by 16 bytes: ldmatrix's eight rows hit different banks

// Two values in the products' 16-bit type (F16 as the attention kernels pack them, or BF16),
// and the m16n8k16 product in it (F16: mma_f16).
template <bool HALF> __device__ __forceinline__ unsigned pack16(float lo, float hi) {
    if (HALF) return pack_half2(lo, hi);
    __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
    return *(unsigned*)&b;
}

#ifndef PEREGRINE_CUDA_EMULATOR
template <bool HALF> __device__ __forceinline__ void mma16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if (HALF)
        mma_f16(c, a, b0, b1);
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

template <bool HALF>
__device__ __forceinline__ void expert_gemm_body(const unsigned long long* weights, const unsigned long long* ups, int dtype, int n, int k,
                                                 const void* x, int xHalf, const int* rowOf, const int* tiles, float* y,
                                                 unsigned short* yh) {
#if __CUDA_ARCH__ >= 800
    gdc_wait();
    __shared__ __align__(16) unsigned short xs[EG_ROWS * EG_LD];
    __shared__ __align__(16) unsigned short ws[2 * EG_OUTS * EG_LD];
    int t = blockIdx.y;
    if (t >= tiles[0]) return;
    int e = tiles[1 + 3 * t], r0 = tiles[2 + 3 * t], rows = tiles[3 + 3 * t];
    int o0 = blockIdx.x * EG_OUTS, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    bool gated = ups != 0;
    const void* w = (const void*)weights[e];
    const void* u = gated ? (const void*)ups[e] : 0;
    long total = (long)n * k;
    int stored = HALF ? 1 : 2;  // weights already in the products' type
    constexpr int MT = EG_ROWS / 16;  // row tiles of 16
    float acc[MT][2][4], accu[MT][2][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < 2; j++)
#pragma unroll
            for (int c = 0; c < 4; c++) { acc[i][j][c] = 0; accu[i][j][c] = 0; }
    constexpr int PIECES = EG_K / 8;  // 16-byte pieces of a row's slice
    for (int k0 = 0; k0 < k; k0 += EG_K) {
        for (int p = threadIdx.x; p < EG_ROWS * PIECES; p += blockDim.x) {
            int r = p / PIECES, c = (p % PIECES) * 8;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < rows) {
                long row = rowOf ? rowOf[r0 + r] : r0 + r;
                if (xHalf) v = *(const uint4*)((const unsigned short*)x + row * k + k0 + c);
                else {
                    const float* f = (const float*)x + row * k + k0 + c;
                    float4 a = *(const float4*)f, b = *(const float4*)(f + 4);
                    v = make_uint4(pack16<HALF>(a.x, a.y), pack16<HALF>(a.z, a.w), pack16<HALF>(b.x, b.y), pack16<HALF>(b.z, b.w));
                }
            }
            *(uint4*)(xs + r * EG_LD + c) = v;
        }
        // The weights in runs of 32 values (a quantized block's scales decoded once for them).
        constexpr int RUNS = EG_K / 32;
        for (int p = threadIdx.x; p < (gated ? 2 : 1) * EG_OUTS * RUNS; p += blockDim.x) {
            int m = p / (EG_OUTS * RUNS), q = p % (EG_OUTS * RUNS);
            int o = q / RUNS, c = (q % RUNS) * 32;
            uint4 v[4] = {make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0), make_uint4(0, 0, 0, 0)};
            if (o0 + o < n) {
                const void* src = m ? u : w;
                long i = (long)(o0 + o) * k + k0 + c;
                if (dtype == stored) {
#pragma unroll
                    for (int j = 0; j < 4; j++) v[j] = ((const uint4*)((const unsigned short*)src + i))[j];
                } else dequant32_bf16(src, dtype, i, total, v);
            }
#pragma unroll
            for (int j = 0; j < 4; j++) *(uint4*)(ws + (m * EG_OUTS + o) * EG_LD + c + 8 * j) = v[j];
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < EG_K; kk += 16) {
            unsigned a[MT][4], b[4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) ldmatrix_x4(a[mt], xs + (mt * 16 + (lane & 15)) * EG_LD + kk + (lane >> 4) * 8);
            // Matrices (outputs 0-7, k 0-7), (0-7, 8-15), (8-15, 0-7), (8-15, 8-15): each 8-output
            // tile's two B registers.
            int bo = warp * 16 + (lane & 7) + ((lane >> 4) << 3), bk = kk + ((lane >> 3) & 1) * 8;
            ldmatrix_x4(b, ws + bo * EG_LD + bk);
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int nt = 0; nt < 2; nt++) mma16<HALF>(acc[mt][nt], a[mt], b[2 * nt], b[2 * nt + 1]);
            if (gated) {
                ldmatrix_x4(b, ws + (EG_OUTS + bo) * EG_LD + bk);
#pragma unroll
                for (int mt = 0; mt < MT; mt++)
#pragma unroll
                    for (int nt = 0; nt < 2; nt++) mma16<HALF>(accu[mt][nt], a[mt], b[2 * nt], b[2 * nt + 1]);
            }
        }
        __syncthreads();
    }
    // Accumulator c of tile (mt, nt): rows lane / 4 (c 0, 1) and lane / 4 + 8 (c 2, 3), outputs 2 (lane % 4) + {0, 1}.
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                int r = mt * 16 + (lane >> 2) + 8 * h, o = o0 + warp * 16 + nt * 8 + 2 * (lane & 3);
                if (r >= rows || o >= n) continue;
                float v0 = acc[mt][nt][2 * h], v1 = acc[mt][nt][2 * h + 1];
                if (gated) {
                    v0 = v0 / (1.f + __expf(-v0)) * accu[mt][nt][2 * h];
                    v1 = v1 / (1.f + __expf(-v1)) * accu[mt][nt][2 * h + 1];
                }
                long at = (long)(r0 + r) * n + o;
                if (y) *(float2*)(y + at) = make_float2(v0, v1);
                if (yh) *(unsigned*)(yh + at) = pack16<HALF>(v0, v1);
            }
#endif
}

extern "C" __global__ void __launch_bounds__(128) expert_gemm_bf16(const unsigned long long* weights, const unsigned long long* ups, int dtype,
                                                                  int n, int k, const void* x, int xHalf, const int* rowOf,
                                                                  const int* tiles, float* y, unsigned short* yh) {
    expert_gemm_body<false>(weights, ups, dtype, n, k, x, xHalf, rowOf, tiles, y, yh);
}

extern "C" __global__ void __launch_bounds__(128) expert_gemm_f16(const unsigned long long* weights, const unsigned long long* ups, int dtype,
                                                                 int n, int k, const void* x, int xHalf, const int* rowOf,
                                                                 const int* tiles, float* y, unsigned short* yh) {
    expert_gemm_body<true>(weights, ups, dtype, n, k, x, xHalf, rowOf, tiles, y, yh);
}

// ---------------------------------------------------------------------------------------------
// Products of quantized weights over many tokens (up to 256 by default: a short prompt, a batch of
// decode steps) on Hopper's tensor cores, without widening the matrix:
// y[t, o] (+)= Σ_k x[t, k] W[o, k] for W in any quantized type the backend keeps (Q8_0, Q4_0, IQ4_NL,
// IQ4_XS, Q4_K, Q6_K, Q3_K, Q2_K) and x already rounded to BF16.
// A block takes QG_ROWS weight rows (two warpgroups of 64) by NT tokens (128 or 256: a decoded
// value serves that many tokens, so the decoding's share of the instructions halves from 128 to
// 256, for twice the accumulator registers and half the blocks) and walks k in chunks of QG_K
// values through STAGES shared-memory buffers filled by cp.async: the chunk's
// activations, swizzled as wgmma's 128-byte mode reads a K-major B, and each weight row's raw
// bytes for the chunk (values, then the 16-byte pieces holding its scales) as they lie in memory.
// Each thread decodes its own rows' values straight into wgmma's A fragments (registers, the
// BF16 value dequantize_bf16 gives: load_weight's f32 arithmetic, then rounded), so a value is decoded
// once a block and never written back; the next chunk is decoded while the tensor cores multiply
// this one. Grid: x over token tiles (fastest, so a weight tile's token tiles run together and
// its bytes come from memory once), y over weight-row tiles, z over slices of k (split-K: a few
// tokens' products have too few tiles to fill the GPU, so each tile's chunks are parted among
// gridDim.z blocks, whose sums are added into y atomically: y holds zeros, or the residual when
// accumulating, before the launch, and only slice 0 adds the bias). K must be a multiple of QG_K
// (256 for the k-quants, as their blocks are).
#define QG_ROWS 128
#define QG_K 64
#define QG_THREADS 256

// One weight row's bytes for a chunk of QG_K values: PIECES 16-byte pieces (piece(...) gives
// each one's address), STRIDE bytes apart in shared memory (an odd number of pieces, so the
// eight rows a fragment load touches fall in different banks), and fragment(...), which turns
// them into the row's part of four k16 steps' A fragments: lo[j] the values 16j + 2c and
// 16j + 2c + 1, hi[j] 16j + 2c + 8 and 16j + 2c + 9, as BF16 pairs (c = lane % 4). Both take
// the matrix's value count `total`, the index i of the chunk's first value in it (o k + k0 for
// row o; unsigned, so that divisions by powers of two are shifts) and its column k0 (whose
// place in a super-block is i's, k being a multiple of 256 for the k-quants).
template <int DT> struct QuantChunk;

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) && !defined(PEREGRINE_CUDA_EMULATOR)
// d (64 x N, f32) = A (64 x 16 in registers, BF16: each warp's 16 rows as mma.sync's A fragment) * B (16 x N, BF16: a
// K-major descriptor) (+ d when accumulate), N = 128 or 256.
__device__ __forceinline__ void wgmma_rs_bf16_n128(float (&d)[16][4], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
__device__ __forceinline__ void wgmma_rs_bf16_n256(float (&d)[32][4], const unsigned (&a)[4], unsigned long long b, int accumulate) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %133, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]), "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]), "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]), "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]), "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]), "+f"(d[7][2]), "+f"(d[7][3]), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]), "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]), "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3]), "+f"(d[16][0]), "+f"(d[16][1]), "+f"(d[16][2]), "+f"(d[16][3]), "+f"(d[17][0]), "+f"(d[17][1]), "+f"(d[17][2]), "+f"(d[17][3]), "+f"(d[18][0]), "+f"(d[18][1]), "+f"(d[18][2]), "+f"(d[18][3]), "+f"(d[19][0]), "+f"(d[19][1]), "+f"(d[19][2]), "+f"(d[19][3]), "+f"(d[20][0]), "+f"(d[20][1]), "+f"(d[20][2]), "+f"(d[20][3]), "+f"(d[21][0]), "+f"(d[21][1]), "+f"(d[21][2]), "+f"(d[21][3]), "+f"(d[22][0]), "+f"(d[22][1]), "+f"(d[22][2]), "+f"(d[22][3]), "+f"(d[23][0]), "+f"(d[23][1]), "+f"(d[23][2]), "+f"(d[23][3]), "+f"(d[24][0]), "+f"(d[24][1]), "+f"(d[24][2]), "+f"(d[24][3]), "+f"(d[25][0]), "+f"(d[25][1]), "+f"(d[25][2]), "+f"(d[25][3]), "+f"(d[26][0]), "+f"(d[26][1]), "+f"(d[26][2]), "+f"(d[26][3]), "+f"(d[27][0]), "+f"(d[27][1]), "+f"(d[27][2]), "+f"(d[27][3]), "+f"(d[28][0]), "+f"(d[28][1]), "+f"(d[28][2]), "+f"(d[28][3]), "+f"(d[29][0]), "+f"(d[29][1]), "+f"(d[29][2]), "+f"(d[29][3]), "+f"(d[30][0]), "+f"(d[30][1]), "+f"(d[30][2]), "+f"(d[30][3]), "+f"(d[31][0]), "+f"(d[31][1]), "+f"(d[31][2]), "+f"(d[31][3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate));
}
#endif

// The two 16-bit pieces of a 16-byte group that lane c's fragments take: bytes 2c, 2c + 1 (lo)
// and 2c + 8, 2c + 9 (hi), each loaded alone, so the high 16 bits are zero and a value's bits
// lie at a constant place.
__device__ __forceinline__ void fragment_bytes(const unsigned char* group, int c, unsigned& lo, unsigned& hi) {
    lo = *(const unsigned short*)(group + 2 * c);
    hi = *(const unsigned short*)(group + 2 * c + 8);
}

// The decoders below turn integers into floats without a conversion instruction: an integer
// below 2^23 put into the low mantissa bits of 2^23 makes the float 2^23 + the integer, exactly.
// field_biased: the bits of w under `mask` (a field at bit p, below bit 23) as that float,
// 2^23 + field * 2^p, in one logic operation. For a field at bit 8 or above, fma(d 2^-p, this,
// -(d (m + 2^(23 - p)))) is d (field - m) rounded once, as fma(d 2^-p, field_value, -d m) is,
// when d m and d (m + 2^(23 - p)) are exact in f32 (an f16 d and m = 8: 13 and 9 bits of m + 2^15
// and m + 2^11 times d's 11), so the subtraction goes into the FMA's addend.
__device__ __forceinline__ float field_biased(unsigned w, unsigned mask) {
#ifdef PEREGRINE_CUDA_EMULATOR
    return __uint_as_float((w & mask) | 0x4B000000u);
#else
    // (w & mask) | 2^23's bits in one lop3: written in C, the compiler takes two, as its
    // instruction has room for one constant.
    unsigned bits;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(bits) : "r"(w), "r"(mask), "r"(0x4B000000u));
    return __uint_as_float(bits);
#endif
}

// The field as the float field * 2^p: field_biased and one subtraction; the caller's scale
// carries the 2^-p (a power of two, so the products round as the field's own would).
__device__ __forceinline__ float field_value(unsigned w, unsigned mask) { return field_biased(w, mask) - 8388608.f; }

// Byte i of w, u, as the float 32768 + u: the byte at bits 8-15 of 2^15's mantissa, one byte
// permute. 32896 d is exact for an f16 d (20 bits), so fma(d, byte_float(w, i), -32896 d) is
// d (u - 128) rounded once, as d times the integer would be.
__device__ __forceinline__ float byte_float(unsigned w, int i) {
    return __uint_as_float(__byte_perm(w, 0x47000000u, 0x7504u | (unsigned)(i << 4)));
}

// The piece of memory holding byte `at` (scales that share a piece with their neighbours).
__device__ __forceinline__ const void* piece_holding(const void* w, unsigned long at) {
    return (const unsigned char*)w + (at & ~15UL);
}

template <> struct QuantChunk<3> {  // Q8_0: 64 int8 values, then the piece holding the two blocks' f16 scales
    static constexpr int PIECES = 5, STRIDE = 80;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        return p < 4 ? (const void*)((const unsigned char*)w + i + 16 * p) : piece_holding(w, total + 2 * (i / 32));
    }
    // The two int8 of b (bytes 0 and 1), sign bits flipped (q + 128), times d: d q exactly.
    static __device__ __forceinline__ unsigned pair(unsigned b, float d, float offset) {
        b ^= 0x8080u;
        return pack16<false>(__fmaf_rn(d, byte_float(b, 0), offset), __fmaf_rn(d, byte_float(b, 1), offset));
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        const __half* s = (const __half*)(row + 64 + ((total + 2 * (i / 32)) & 15));
        float d[2] = {__half2float(s[0]), __half2float(s[1])};
        float offset[2] = {-32896.f * d[0], -32896.f * d[1]};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            unsigned a, b;
            fragment_bytes(row + 16 * j, c, a, b);
            lo[j] = pair(a, d[j / 2], offset[j / 2]);
            hi[j] = pair(b, d[j / 2], offset[j / 2]);
        }
    }
};

// The IQ4 levels plus 128, as unsigned bytes.
#define IQ4_BIASED(word) ((word) ^ 0x80808080u)

// Q4_0 (NL false) and IQ4_NL: two blocks of 16 bytes (value j in byte j's low nibble, j + 16 in its
// high one: Q4_0's offset by 8, IQ4_NL's an index into ggml's levels), then the scales' piece.
template <bool NL> struct Nibble32Chunk {
    static constexpr int PIECES = 3, STRIDE = 48;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        return p < 2 ? (const void*)((const unsigned char*)w + i / 2 + 16 * p) : piece_holding(w, total / 2 + 2 * (i / 32));
    }
    // Two bytes of a block (b's low 16 bits) as the pairs of the k16 steps they feed: `low` their
    // low nibbles' values, `high` their high nibbles', times d.
    static __device__ __forceinline__ void pairs(unsigned b, float d, unsigned& low, unsigned& high) {
        if (NL) {
            // The four nibbles index the levels: a byte permute picks each from levels 0-7 and
            // one from 8-15 by its low three bits, and a third takes the first or the second by
            // its fourth bit. Byte n of v is nibble n's level plus 128.
            unsigned s = b & 0x7777u;
            unsigned first = __byte_perm(IQ4_BIASED(IQ4_LEVELS_0), IQ4_BIASED(IQ4_LEVELS_1), s);
            unsigned second = __byte_perm(IQ4_BIASED(IQ4_LEVELS_2), IQ4_BIASED(IQ4_LEVELS_3), s);
            unsigned v = __byte_perm(first, second, ((b >> 1) & 0x4444u) | 0x3210u);
            auto level = [&](int n) { return d * (byte_float(v, n) - 32896.f); };
            low = pack16<false>(level(0), level(2));
            high = pack16<false>(level(1), level(3));
            return;
        }
        // The low byte's nibbles moved up by 8, so every nibble lies at bit 8 or 12 and its 2^23
        // comes off in the FMA's addend (field_biased): one shift for four subtractions.
        const unsigned up = b << 8;
        const float d8 = d * 0x1p-8f, d12 = d * 0x1p-12f, c8 = -(d * 32776.f), c12 = -(d * 2056.f);
        low = pack16<false>(__fmaf_rn(d8, field_biased(up, 0xF00u), c8), __fmaf_rn(d8, field_biased(b, 0xF00u), c8));
        high = pack16<false>(__fmaf_rn(d12, field_biased(up, 0xF000u), c12), __fmaf_rn(d12, field_biased(b, 0xF000u), c12));
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        const __half* s = (const __half*)(row + 32 + ((total / 2 + 2 * (i / 32)) & 15));
#pragma unroll
        for (int b = 0; b < 2; b++) {  // k16 steps 2b (the low nibbles) and 2b + 1 (the high ones)
            float d = __half2float(s[b]);
            unsigned x, y;
            fragment_bytes(row + 16 * b, c, x, y);
            pairs(x, d, lo[2 * b], lo[2 * b + 1]);
            pairs(y, d, hi[2 * b], hi[2 * b + 1]);
        }
    }
};
template <> struct QuantChunk<4> : Nibble32Chunk<false> {};
template <> struct QuantChunk<7> : Nibble32Chunk<true> {};

// Q5_0: Q4_0's two blocks of nibbles, the piece holding their two scales and the piece holding
// their two words of fifth bits (bit j of a block's word: value j's), one piece of padding.
// d (q - 16) is exact in f32 (an f16 d times five bits), so any exact form gives load_weight's bits.
template <> struct QuantChunk<12> {
    static constexpr int PIECES = 4, STRIDE = 80;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        if (p < 2) return (const unsigned char*)w + i / 2 + 16 * p;
        if (p == 2) return piece_holding(w, total / 2 + total / 8 + 2 * (i / 32));
        return piece_holding(w, total / 2 + 4 * (i / 32));
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        const __half* s = (const __half*)(row + 32 + ((total / 2 + total / 8 + 2 * (i / 32)) & 15));
        const unsigned* h = (const unsigned*)(row + 48 + ((total / 2 + 4 * (i / 32)) & 15));
#pragma unroll
        for (int b = 0; b < 2; b++) {  // k16 steps 2b (values 0-15 of block b) and 2b + 1 (16-31)
            float d = __half2float(s[b]), offset = -16.f * d;
            unsigned bits = h[b];
            unsigned x, y;
            fragment_bytes(row + 16 * b, c, x, y);
            // Bytes v (values j, j + 1 low, j + 16, j + 17 high): the four values as two pairs.
            auto pairs = [&](unsigned v, int j, unsigned& low, unsigned& high) {
                auto value = [&](unsigned nibble, int at) {
                    return __fmaf_rn(d, (float)(int)(nibble | (((bits >> at) & 1u) << 4)), offset);
                };
                low = pack16<false>(value(v & 15u, j), value((v >> 8) & 15u, j + 1));
                high = pack16<false>(value((v >> 4) & 15u, j + 16), value((v >> 12) & 15u, j + 17));
            };
            pairs(x, 2 * c, lo[2 * b], lo[2 * b + 1]);
            pairs(y, 2 * c + 8, hi[2 * b], hi[2 * b + 1]);
        }
    }
};

template <> struct QuantChunk<5> {  // Q4_K: the 32 bytes of sub-blocks 2j (low nibbles) and 2j + 1 (high), then the super-block's header
    static constexpr int PIECES = 3, STRIDE = 48;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        unsigned long sb = i / 256;
        int j = (k0 % 256) / 64;
        return p < 2 ? (const void*)((const unsigned char*)w + sb * 128 + 32 * j + 16 * p)
                     : (const void*)((const unsigned char*)w + total / 2 + 16 * sb);
    }
    // q4k_header's d s and dmin m of sub-blocks s and s + 1 (s even), for an s known only at run
    // time: the two sub-blocks' bytes are neighbours, so each word's pair is taken at once,
    // without branches, and the 6-bit integers become floats as fields (field_value).
    static __device__ __forceinline__ void pair_scales(uint4 h, int s, float (&scale)[2], float (&offset)[2]) {
        float d = __half2float(__ushort_as_half((unsigned short)(h.x & 0xffff)));
        float dmin = __half2float(__ushort_as_half((unsigned short)(h.x >> 16)));
        int t = 8 * (s & 2);
        unsigned a = h.y >> t, b = h.z >> t, c = h.w >> t;
        unsigned sc = s < 4 ? a & 0x3F3Fu : (c & 0x0F0Fu) | ((a >> 2) & 0x3030u);
        unsigned m = s < 4 ? b & 0x3F3Fu : ((c >> 4) & 0x0F0Fu) | ((b >> 2) & 0x3030u);
        scale[0] = d * field_value(sc, 0xFFu);
        scale[1] = d * 0x1p-8f * field_value(sc, 0xFF00u);
        offset[0] = -(dmin * field_value(m, 0xFFu));
        offset[1] = -(dmin * 0x1p-8f * field_value(m, 0xFF00u));
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        // load_weight's fma(d s, q, -dmin m), with the nibble's place taken out of the scale.
        float scale[2], offset[2];
        pair_scales(*(const uint4*)(row + 32), 2 * ((k0 % 256) / 64), scale, offset);
#pragma unroll
        for (int b = 0; b < 2; b++) {
            unsigned x, y;
            fragment_bytes(row + 16 * b, c, x, y);
            // k16 step b: the low nibbles (sub-block 2j); step 2 + b: the high ones (2j + 1).
            auto pair = [&](unsigned v, int h) {
                float sc = scale[h], of = offset[h];
                return pack16<false>(__fmaf_rn(h ? sc * 0x1p-4f : sc, field_value(v, 0xFu << (4 * h)), of),
                                     __fmaf_rn(sc * (h ? 0x1p-12f : 0x1p-8f), field_value(v, 0xF00u << (4 * h)), of));
            };
            lo[b] = pair(x, 0);
            hi[b] = pair(y, 0);
            lo[2 + b] = pair(x, 1);
            hi[2 + b] = pair(y, 1);
        }
    }
};

template <> struct QuantChunk<11> {
    // Q5_K: Q4_K's chunk (the 32 bytes of nibbles, the header) and the super-block's 32 bytes of
    // fifth bits, whose byte l holds value l's of each sub-block (bit 2j: sub-block 2j's, the low
    // nibbles; bit 2j + 1: the high ones'), read at the same places as the nibbles' bytes.
    static constexpr int PIECES = 5, STRIDE = 80;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        unsigned long sb = i / 256;
        int j = (k0 % 256) / 64;
        const unsigned char* base = (const unsigned char*)w;
        if (p < 2) return base + sb * 128 + 32 * j + 16 * p;
        if (p == 2) return base + total / 2 + 16 * sb;
        return base + total / 2 + total / 16 + 32 * sb + 16 * (p - 3);
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        // load_weight's fma(d s, q, -dmin m), q the nibble and its fifth bit as one 5-bit field.
        int j = (k0 % 256) / 64;
        float scale[2], offset[2];
        QuantChunk<5>::pair_scales(*(const uint4*)(row + 32), 2 * j, scale, offset);
#pragma unroll
        for (int b = 0; b < 2; b++) {
            unsigned x, y, hx, hy;
            fragment_bytes(row + 16 * b, c, x, y);
            fragment_bytes(row + 48 + 16 * b, c, hx, hy);
            // k16 step b: sub-block 2j (low nibbles, bit 2j); step 2 + b: sub-block 2j + 1.
            auto pair = [&](unsigned v, unsigned f, int h) {
                unsigned q = ((v >> (4 * h)) & 0x0F0Fu) | (((f >> (2 * j + h)) & 0x0101u) << 4);
                return pack16<false>(__fmaf_rn(scale[h], field_value(q, 0x1Fu), offset[h]),
                                     __fmaf_rn(scale[h] * 0x1p-8f, field_value(q, 0x1F00u), offset[h]));
            };
            lo[b] = pair(x, hx, 0);
            hi[b] = pair(y, hy, 0);
            lo[2 + b] = pair(x, hx, 1);
            hi[2 + b] = pair(y, hy, 1);
        }
    }
};

template <> struct QuantChunk<6> {
    // Q6_K: a chunk is quarter h of half n of a super-block: value t's low four bits are nibble h of
    // ql byte 64n + t, its high two bits 2 (2h + t / 32) of qh byte 32n + t % 32, its scale
    // sc[8n + 4h + t / 16]. Pieces: the 64 ql bytes, the 32 qh bytes, the super-block's 16 scales,
    // and the piece holding its f16 d.
    static constexpr int PIECES = 8, STRIDE = 144;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        unsigned long sb = i / 256, blocks = total / 256;
        int n = (k0 % 256) / 128;
        const unsigned char* base = (const unsigned char*)w;
        if (p < 4) return base + sb * 192 + 64 * n + 16 * p;
        if (p < 6) return base + sb * 192 + 128 + 32 * n + 16 * (p - 4);
        if (p == 6) return base + blocks * 192 + 16 * sb;
        return piece_holding(w, blocks * 208 + 2 * sb);
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        unsigned long sb = i / 256, blocks = total / 256;
        int r = k0 % 256, n = r / 128, h = (r % 128) / 64;
        float d = __half2float(*(const __half*)(row + 112 + ((blocks * 208 + 2 * sb) & 15)));
        const signed char* sc = (const signed char*)(row + 96) + 8 * n + 4 * h;
        // Value e of a pair (byte e of the pieces): its low four bits at bit 4h + 8e of ql, its
        // high two at bit 4h + 2 (j / 2) + 8e of qh. Shifted to bit 4h + 4 + 8e, they join the low
        // ones in one 6-bit field q + 32 (both values of the pair in one lop3), and the value is
        // fma(scale, q + 32, -32 scale): one rounding, as scale times q would be.
        const unsigned lowBits = 0x0F0Fu << (4 * h);
        const float place = h ? 0x1p-4f : 1.f;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            unsigned ql, qlh, qh, qhh;
            fragment_bytes(row + 16 * j, c, ql, qlh);
            fragment_bytes(row + 64 + 16 * (j & 1), c, qh, qhh);
            float scale = d * sc[j], low = scale * place, offset = -32.f * scale;
            auto pair = [&](unsigned l, unsigned q) {
                unsigned v = (l & lowBits) | ((q << (4 - 2 * (j >> 1))) & (0x3030u << (4 * h)));
                return pack16<false>(__fmaf_rn(low, field_value(v, 0x3Fu << (4 * h)), offset),
                                     __fmaf_rn(low * 0x1p-8f, field_value(v, 0x3F00u << (4 * h)), offset));
            };
            lo[j] = pair(ql, qh);
            hi[j] = pair(qlh, qhh);
        }
    }
};

template <> struct QuantChunk<8> {
    // IQ4_XS: Q4_0's 16 bytes of indices per sub-block of 32 (two sub-blocks a chunk), then the
    // piece holding the super-block's 8-byte header (d and the sub-blocks' 6-bit scales).
    static constexpr int PIECES = 3, STRIDE = 48;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        return p < 2 ? (const void*)((const unsigned char*)w + i / 2 + 16 * p) : piece_holding(w, total / 2 + 8 * (i / 256));
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        uint2 h = *(const uint2*)(row + 32 + ((total / 2 + 8 * (i / 256)) & 15));
#pragma unroll
        for (int b = 0; b < 2; b++) {
            float d = iq4xs_scale(h, (k0 % 256) / 32 + b);
            unsigned x, y;
            fragment_bytes(row + 16 * b, c, x, y);
            Nibble32Chunk<true>::pairs(x, d, lo[2 * b], lo[2 * b + 1]);
            Nibble32Chunk<true>::pairs(y, d, hi[2 * b], hi[2 * b + 1]);
        }
    }
};

// Q3_K and Q2_K: a chunk is quarter-pair s' of half h of a super-block, value t of it 2-bit
// group s = 2s' + t / 32 of byte 32h + t % 32 of the low bits, sub-block j = 8h + 2s + (t % 32) / 16.
template <> struct QuantChunk<9> {
    // Q3_K: the 32 hmask bytes (the third bit: bit 4h + s), the 32 low-bit bytes, the two pieces
    // the super-block's 12 scale bytes may straddle, and the piece holding its f16 d.
    static constexpr int PIECES = 7, STRIDE = 112;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        unsigned long sb = i / 256, blocks = total / 256;
        int h = (k0 % 256) / 128;
        const unsigned char* v = (const unsigned char*)w + sb * 96;
        if (p < 2) return v + 16 * p;
        if (p < 4) return v + 32 + 32 * h + 16 * (p - 2);
        if (p < 6) return (const unsigned char*)piece_holding(w, blocks * 96 + 12 * sb) + 16 * (p - 4);
        return piece_holding(w, blocks * 108 + 2 * sb);
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        unsigned long sb = i / 256, blocks = total / 256;
        int r0 = k0 % 256, h = r0 / 128, s0 = 2 * ((r0 % 128) / 64);
        const unsigned char* sc = row + 64 + ((blocks * 96 + 12 * sb) & 15);  // 4-byte aligned
        float d = __half2float(*(const __half*)(row + 96 + ((blocks * 108 + 2 * sb) & 15)));
        // q3k_scale of the chunk's sub-blocks j0 .. j0 + 3 (j0 = 8h + 2s0, a multiple of 4), all
        // four at once: their low four bits are nibbles of four neighbouring bytes, their high two
        // bits the same pair of each of bytes 8-11. Byte n of v is sub-block j0 + n's scale + 32.
        const int j0 = 8 * h + 2 * s0;
        const unsigned low = *(const unsigned*)(sc + (j0 & 4)), high = *(const unsigned*)(sc + 8);
        const unsigned v = ((j0 < 8 ? low : low >> 4) & 0x0F0F0F0Fu) | (((high >> (2 * (j0 >> 2))) & 0x03030303u) << 4);
#pragma unroll
        for (int jj = 0; jj < 4; jj++) {
            int s = s0 + (jj >> 1);
            float scale = d * (byte_float(v, jj) - 32800.f);
            unsigned m, mh, q, qh;
            fragment_bytes(row + 16 * (jj & 1), c, m, mh);
            fragment_bytes(row + 32 + 16 * (jj & 1), c, q, qh);
            // Both values' three bits (q + 4) as fields at bits 0 and 8, and scale (q + 4) - 4 scale
            // rounded once, as scale q would be.
            float offset = -4.f * scale;
            auto pair = [&](unsigned qb, unsigned mb) {
                unsigned v = ((qb >> (2 * s)) & 0x0303u) | (((mb >> (4 * h + s)) & 0x0101u) << 2);
                return pack16<false>(__fmaf_rn(scale, field_value(v, 0x7u), offset), __fmaf_rn(scale * 0x1p-8f, field_value(v, 0x700u), offset));
            };
            lo[jj] = pair(q, m);
            hi[jj] = pair(qh, mh);
        }
    }
};

template <> struct QuantChunk<10> {
    // Q2_K: the 32 low-bit bytes, the super-block's 16 scale bytes (scale low nibble, min high),
    // and the piece holding its f16 d and dmin (rows five pieces apart: an odd count).
    static constexpr int PIECES = 4, STRIDE = 80;
    static __device__ __forceinline__ const void* piece(const void* w, unsigned long total, unsigned long i, int k0, int p) {
        unsigned long sb = i / 256, blocks = total / 256;
        int h = (k0 % 256) / 128;
        if (p < 2) return (const unsigned char*)w + sb * 64 + 32 * h + 16 * p;
        if (p == 2) return (const unsigned char*)w + blocks * 64 + 16 * sb;
        return piece_holding(w, blocks * 80 + 4 * sb);
    }
    static __device__ __forceinline__ void fragment(const unsigned char* row, unsigned long total, unsigned long i, int k0, int c,
                                                    unsigned (&lo)[4], unsigned (&hi)[4]) {
        unsigned long sb = i / 256, blocks = total / 256;
        int r0 = k0 % 256, h = r0 / 128, s0 = 2 * ((r0 % 128) / 64);
        const __half* dm = (const __half*)(row + 48 + ((blocks * 80 + 4 * sb) & 15));
        float d = __half2float(dm[0]), dmin = __half2float(dm[1]);
#pragma unroll
        for (int jj = 0; jj < 4; jj++) {
            int s = s0 + (jj >> 1), sm = row[32 + 8 * h + 2 * s + (jj & 1)];
            unsigned q, qh;
            fragment_bytes(row + 16 * (jj & 1), c, q, qh);
            // load_weight's fma(d sc, q, -dmin m), q as a field (bits 0 and 8 of the shifted pair).
            float scale = d * field_value((unsigned)sm, 0xFu), offset = -(dmin * (0x1p-4f * field_value((unsigned)sm, 0xF0u)));
            auto pair = [&](unsigned qb) {
                unsigned v = qb >> (2 * s);
                return pack16<false>(__fmaf_rn(scale, field_value(v, 0x3u), offset), __fmaf_rn(scale * 0x1p-8f, field_value(v, 0x300u), offset));
            };
            lo[jj] = pair(q);
            hi[jj] = pair(qh);
        }
    }
};

// The shared memory a block of quant_gemm takes: STAGES buffers of the activations (NT rows of
// 128 bytes) and the weights' bytes (rounded up to 1,024, so every activation tile starts
// 1024-aligned), and 1,024 bytes to align the first. CUDABackend.QuantGemmKernel.shared mirrors it.
template <int DT, int NT, int STAGES> __host__ __device__ constexpr int quant_gemm_shared() {
    return STAGES * (NT * 128 + (QG_ROWS * QuantChunk<DT>::STRIDE + 1023) / 1024 * 1024) + 1024;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PEREGRINE_CUDA_EMULATOR)
// Both quant_gemm forms' per-chunk work of a consuming thread. quant_gemm_fragments: its A
// fragments of the chunk whose weight rows lie at `weights` in shared memory (its rows r and
// r + 8, their first values at i0 and i1 of the matrix's `total`; column k0). Rows past the
// matrix were filled with zeros and decode to zeros or finite values that are never stored.
template <int DT>
__device__ __forceinline__ void quant_gemm_fragments(unsigned (&a)[4][4], const unsigned char* weights, int r, unsigned long total,
                                                     unsigned long i0, unsigned long i1, int k0, int c) {
    using Q = QuantChunk<DT>;
    unsigned lo0[4], hi0[4], lo1[4], hi1[4];
    Q::fragment(weights + r * Q::STRIDE, total, i0 + k0, k0, c, lo0, hi0);
    Q::fragment(weights + (r + 8) * Q::STRIDE, total, i1 + k0, k0, c, lo1, hi1);
#pragma unroll
    for (int j = 0; j < 4; j++) { a[j][0] = lo0[j]; a[j][1] = lo1[j]; a[j][2] = hi0[j]; a[j][3] = hi1[j]; }
}

// hold() on every accumulator, or every register of a chunk's A fragments.
template <int N> __device__ __forceinline__ void hold_all(float (&acc)[N][4]) {
#pragma unroll
    for (int i = 0; i < N; i++) { hold(acc[i][0]); hold(acc[i][1]); hold(acc[i][2]); hold(acc[i][3]); }
}
template <int N> __device__ __forceinline__ void hold_all(unsigned (&a)[N][4]) {
#pragma unroll
    for (int j = 0; j < N; j++) { hold(a[j][0]); hold(a[j][1]); hold(a[j][2]); hold(a[j][3]); }
}

// A chunk's products into acc: its four k16 steps of A fragments against the activations whose
// K-major descriptor is xs (a k16 step two 16-byte units further), committed as one wgmma group.
template <int NT>
__device__ __forceinline__ void quant_gemm_multiply(float (&acc)[NT / 8][4], unsigned (&a)[4][4], unsigned long long xs) {
    hold_all(acc);
    hold_all(a);
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < 4; j++) {
        if constexpr (NT == 128) wgmma_rs_bf16_n128(acc, a[j], xs + 2 * j, 1);
        else wgmma_rs_bf16_n256(acc, a[j], xs + 2 * j, 1);
    }
    wgmma_commit();
}
#endif

// A quant_gemm block's matrix (of up to three, by blockIdx.y: matrix 0's weight-row tiles, then
// 1's, then 2's), its tile of QG_ROWS weight rows from o0 and NT tokens from t0, and its slice of
// k: chunks c0 ..< c0 + chunks (all of them when gridDim.z is 1).
struct QuantGemmTile {
    const void* w;
    const float* bias;
    void* y;
    int n, t0, o0, c0, chunks;
    __device__ __forceinline__ QuantGemmTile(const void* w0, const float* b0, void* y0, int n0, const void* w1, const float* b1, void* y1,
                                             int n1, const void* w2, const float* b2, void* y2, int n2, int k, int NT) {
        int tile = blockIdx.y, tiles0 = (n0 + QG_ROWS - 1) / QG_ROWS, tiles1 = (n1 + QG_ROWS - 1) / QG_ROWS;
        w = w0;
        bias = b0;
        y = y0;
        n = n0;
        if (tile >= tiles0) {
            tile -= tiles0;
            bool second = tile < tiles1;
            if (!second) tile -= tiles1;
            w = second ? w1 : w2;
            bias = second ? b1 : b2;
            y = second ? y1 : y2;
            n = second ? n1 : n2;
        }
        t0 = blockIdx.x * NT;
        o0 = tile * QG_ROWS;
        c0 = (int)((long)(k / QG_K) * blockIdx.z / gridDim.z);
        chunks = (int)((long)(k / QG_K) * (blockIdx.z + 1) / gridDim.z) - c0;
    }
};

// A warpgroup's accumulators stored: (i, e) is weight row r + 8 (e >> 1), token 8i + 2c + (e & 1)
// of the tile. With accumulate the product is added to y first and the bias after, as cuBLAS's
// beta and add_bias do. Slices of k add theirs atomically (the host never splits a BF16 output).
// The output's mode is the block's, tested once, and a thread's rows and tokens are tested once
// each, so a value costs its add and its store (testing everything for each of a thread's 128
// values took 2,990 instructions a warp: BENCHMARKS.md).
template <int NT>
__device__ __forceinline__ void quant_gemm_store(const float (&acc)[NT / 8][4], const QuantGemmTile& g, int r, int c, int rows, int accumulate,
                                                 int halfOut) {
    const int o = g.o0 + r, t = g.t0 + 2 * c;  // the thread's rows o and o + 8, its tokens t + 8i and t + 8i + 1
    const bool in0 = o < g.n, in1 = o + 8 < g.n;
    const long n = g.n;
    // put(at, v, b) for each of the thread's values v in the matrix and the tokens (at: its place
    // in y; b: its row's bias).
    auto each = [&](float b0, float b1, auto put) {
#pragma unroll
        for (int i = 0; i < NT / 8; i++) {
            const int ti = t + 8 * i;
            const long at = ti * n + o;
            if (ti < rows) {
                if (in0) put(at, acc[i][0], b0);
                if (in1) put(at + 8, acc[i][2], b1);
            }
            if (ti + 1 < rows) {
                if (in0) put(at + n, acc[i][1], b0);
                if (in1) put(at + n + 8, acc[i][3], b1);
            }
        }
    };
    if (halfOut) {
        __nv_bfloat16* y = (__nv_bfloat16*)g.y;
        if (accumulate) each(0.f, 0.f, [&](long at, float v, float) { y[at] = __float2bfloat16_rn(v + __bfloat162float(y[at])); });
        else each(0.f, 0.f, [&](long at, float v, float) { y[at] = __float2bfloat16_rn(v); });
        return;
    }
    float* y = (float*)g.y;
    const bool bias = g.bias && (gridDim.z == 1 || blockIdx.z == 0);
    const float b0 = bias && in0 ? g.bias[o] : 0.f, b1 = bias && in1 ? g.bias[o + 8] : 0.f;
    if (gridDim.z > 1) {
        if (bias) each(b0, b1, [&](long at, float v, float b) { atomicAdd(y + at, v + b); });
        else each(b0, b1, [&](long at, float v, float) { atomicAdd(y + at, v); });
    } else if (accumulate) {
        if (bias) each(b0, b1, [&](long at, float v, float b) { y[at] = (v + y[at]) + b; });
        else each(b0, b1, [&](long at, float v, float) { y[at] = v + y[at]; });
    } else {
        if (bias) each(b0, b1, [&](long at, float v, float b) { y[at] = v + b; });
        else each(b0, b1, [&](long at, float v, float) { y[at] = v; });
    }
}

// quant_gemm_ws's stores: the two consuming warpgroups (256 threads) write their accumulators
// into shared memory, a token's 128 outputs in a row, and each thread hands one token's row to
// the copy engine: f32 outputs written (y = v, plus the bias), or added to y in L2 where the block
// adds (accumulate, or a slice of k: y += v, plus the bias in slice 0); BF16 outputs (HALF: the
// gating's gate and up) written, rounded once as quant_gemm_store rounds them. The values and
// their one rounding are quant_gemm_store's. A token's f32 row is 528 bytes apart from the next
// (a BF16 row 272), so a warp's stores of four tokens for eight rows fall in distinct banks.
// Storing from registers took the block's stores and the next block's first copies out of the
// tensor cores' time: 20% of a 2,048-token step's time went there (BENCHMARKS.md). Past the main
// loop every buffer is free once both warpgroups' products are complete (the barrier). The host's
// shapes fit it: a row of outputs a multiple of 16 bytes, y 16-byte aligned (quant_gemm_ws takes
// quant_gemm_store otherwise, and for an added-to or split BF16 output or an added-to output with
// a bias).
#define QG_STAGE_PITCH (QG_ROWS + 4)
#define QG_STAGE_PITCH_HALF (QG_ROWS + 8)
#if defined(__CUDA_ARCH_FEAT_SM90_ALL) || defined(PEREGRINE_CUDA_EMULATOR)
template <bool HALF> struct QuantGemmStaged { using T = float; };
template <> struct QuantGemmStaged<true> { using T = __nv_bfloat16; };
template <int NT, bool HALF>
__device__ __forceinline__ void quant_gemm_store_staged(const float (&acc)[NT / 8][4], const QuantGemmTile& g, int r, int c, int rows,
                                                        bool add, unsigned char* area) {
    using T = typename QuantGemmStaged<HALF>::T;
    constexpr int P = HALF ? QG_STAGE_PITCH_HALF : QG_STAGE_PITCH;
    T* stage = (T*)area;
    const bool bias = !HALF && g.bias && (gridDim.z == 1 || blockIdx.z == 0);
    const int o = g.o0 + r;
    named_barrier_sync(1, 256);
    auto put = [&](float b0, float b1, auto value) {
#pragma unroll
        for (int i = 0; i < NT / 8; i++) {
            T* at = stage + (2 * c + 8 * i) * P + r;
            at[0] = value(acc[i][0], b0);
            at[P] = value(acc[i][1], b0);
            at[8] = value(acc[i][2], b1);
            at[P + 8] = value(acc[i][3], b1);
        }
    };
    if constexpr (HALF) put(0.f, 0.f, [](float v, float) { return __float2bfloat16_rn(v); });
    else if (bias) put(o < g.n ? g.bias[o] : 0.f, o + 8 < g.n ? g.bias[o + 8] : 0.f, [](float v, float b) { return v + b; });
    else put(0.f, 0.f, [](float v, float) { return v; });
    fence_proxy_async();
    named_barrier_sync(1, 256);
    const int p = threadIdx.x, t = g.t0 + p;
    if (t >= rows) return;
    const unsigned bytes = (unsigned)sizeof(T) * (unsigned)min(QG_ROWS, g.n - g.o0);
    T* y = (T*)g.y + (long)t * g.n + g.o0;
    if constexpr (HALF) bulk_store(y, stage + p * P, bytes);
    else if (add) bulk_reduce_add(y, stage + p * P, bytes);
    else bulk_store(y, stage + p * P, bytes);
    bulk_commit();
    bulk_wait_read();
}
#endif

// Up to three products over the same activations in one launch (a layer's q, k and v; gate and
// up): matrix m's weights wm (nm rows; none when nm is 0), bias bm, output ym. Block row y takes
// the weight-row tiles of matrix 0, then of 1, then of 2, so the small matrices' tiles fill the
// GPU beside the large one's instead of in launches of their own.
template <int DT, int NT, int STAGES>
__device__ __forceinline__ void quant_gemm(const void* w0, const float* b0, void* y0, int n0, const void* w1, const float* b1, void* y1,
                                           int n1, const void* w2, const float* b2, void* y2, int n2, const unsigned short* x, int rows,
                                           int k, int accumulate, int halfOut) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    static_assert(STAGES >= 3, "a chunk is multiplied while the next is decoded and a third is copied");
    static_assert(NT == 128 || NT == 256, "one wgmma of 128 or 256 columns");
    static_assert(QG_THREADS == 256 && QG_ROWS == 128, "load's mapping: 8 threads an activation row, 2 a weight row");
    static_assert(quant_gemm_shared<DT, NT, STAGES>() <= 227 * 1024 - 12288, "within the backend's dynamic shared memory on Hopper");
    using Q = QuantChunk<DT>;
    constexpr int XB = NT * 128;
    constexpr int SB = XB + (QG_ROWS * Q::STRIDE + 1023) / 1024 * 1024;
    extern __shared__ __align__(16) unsigned char fa_shared[];
    unsigned char* base = fa_shared + ((1024 - (shared_address(fa_shared) & 1023)) & 1023);
    // A launch with less shared memory than the buffers take (the host's table of the kernels out
    // of step with QUANT_GEMM) would corrupt it silently: stop instead.
    if (dynamic_shared_bytes() < (unsigned)quant_gemm_shared<DT, NT, STAGES>()) __trap();
    const QuantGemmTile g(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, k, NT);
    const void* w = g.w;
    const int n = g.n, t0 = g.t0, o0 = g.o0, c0 = g.c0, chunks = g.chunks;
    const unsigned long total = (unsigned long)n * (unsigned)k;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
    const int r = 64 * (warp >> 2) + 16 * (warp & 3) + (lane >> 2);  // the thread's rows in the tile: r and r + 8
    gdc_wait();
    // Each thread copies the same pieces of every chunk, so their addresses are worked out once:
    // activation rows tA + 32m (m < NT / 32), 16-byte part pA of each (the rows' swizzle is
    // tA's, as 32m keeps a row's low three bits, and row tA + 32m lies 4,096 bytes after row
    // tA's place in the tile); and weight row oW, pieces (threadIdx.x & 1) + 2j (two threads a row).
    // Rows past the tokens or the matrix copy zeros (from addresses clamped into the last row,
    // never read): the first inA of a thread's activation rows are in, and its weight row if inW.
    const int tA = threadIdx.x >> 3, pA = threadIdx.x & 7, oW = threadIdx.x >> 1;
    const int inA = max(0, min(NT / 32, (rows - t0 - tA + 31) / 32));
    const unsigned char* xA = (const unsigned char*)(x + (long)min(t0 + tA, rows - 1) * k + 8 * pA);
    const unsigned strideA = 64u * (unsigned)k;  // bytes from row tA + 32m to tA + 32(m + 1)
    const int dA = tA * 128 + ((pA ^ (tA & 7)) << 4);
    const bool inW = o0 + oW < n;
    const unsigned long iW = (unsigned long)min(o0 + oW, n - 1) * (unsigned)k;
    // Chunk s's copies into buffer s % STAGES (none past the last chunk; no commit).
    auto load = [&](int s) {
        if (s >= chunks) return;
        unsigned char* xs = base + (s % STAGES) * SB;
        unsigned char* ws = xs + XB;
        int k0 = (c0 + s) * QG_K;
        const unsigned char* xk = xA + 2 * k0;
#pragma unroll
        for (int m = 0; m < NT / 32; m++) copy16_async(xs + dA + 4096 * m, xk + (m < inA ? m : 0) * strideA, m < inA);
#pragma unroll
        for (int j = 0; j < (Q::PIECES + 1) / 2; j++) {
            int piece = (threadIdx.x & 1) + 2 * j;
            if (piece < Q::PIECES) copy16_async(ws + oW * Q::STRIDE + 16 * piece, Q::piece(w, total, iW + k0, k0, piece), inW);
        }
    };
    // The thread's A fragments of chunk s (its buffer complete and visible).
    const unsigned long i0 = (unsigned long)min(o0 + r, n - 1) * (unsigned)k, i1 = (unsigned long)min(o0 + r + 8, n - 1) * (unsigned)k;
    auto decode = [&](unsigned (&a)[4][4], int s) {
        quant_gemm_fragments<DT>(a, base + (s % STAGES) * SB + XB, r, total, i0, i1, (c0 + s) * QG_K, c);
    };
    float acc[NT / 8][4];
#pragma unroll
    for (int i = 0; i < NT / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const unsigned long long xDesc = wgmma_desc(shared_address(base), 16, 1024);
    // Chunk s on the tensor cores from `cur`, and chunk s + 1 decoded into `next` meanwhile. Chunk
    // s's products stay in flight until the next step's wait, so the tensor cores go from one
    // chunk to the next without draining; the wait for all but the newest group here completes
    // chunk s - 1's, whose A registers (`next`) the decoding then overwrites. Before the wait for
    // chunk s + 1's copies, copy groups 0 ..< s + STAGES - 1 are committed (one a chunk, empty
    // past the last), so at most STAGES - 3 may still be in flight. The barrier after it also
    // follows every warpgroup's wait for chunk s - 1's products, whose buffer the copies of chunk
    // s + STAGES - 1 then refill.
    auto step = [&](int s, unsigned (&cur)[4][4], unsigned (&next)[4][4]) {
        // The descriptor's address field is the shared address / 16, below its 14 bits' end,
        // so the buffer's and the k16 step's offsets add to the first buffer's descriptor.
        quant_gemm_multiply<NT>(acc, cur, xDesc + (unsigned)(s % STAGES) * (SB >> 4));
        wgmma_wait<1>();
        hold_all(next);
        if (s + 1 < chunks) {
            copy_wait<STAGES - 3>();
            fence_proxy_async();
            __syncthreads();
            load(s + STAGES - 1);
            copy_commit();
            decode(next, s + 1);
        }
    };
    for (int s = 0; s < STAGES - 1; s++) {
        load(s);
        copy_commit();
    }
    copy_wait<STAGES - 2>();
    fence_proxy_async();
    __syncthreads();
    unsigned a0[4][4], a1[4][4];
    decode(a0, 0);
    for (int s = 0; s < chunks; s += 2) {
        step(s, a0, a1);
        if (s + 1 < chunks) step(s + 1, a1, a0);
    }
    wgmma_wait<0>();
    hold_all(acc);
    quant_gemm_store<NT>(acc, g, r, c, rows, accumulate, halfOut);
#endif
}

// The backend's kernels (CUDABackend.quantGemmKernels mirrors them), 256 threads: 128 tokens with
// two blocks a multiprocessor (128 registers a thread; quant_gemm_shared at four stages: 105 KB
// for Q8_0, Q2_K, Q5_K and Q5_0, 89 KB for Q4_0, IQ4_NL, IQ4_XS and Q4_K; Q6_K and Q3_K take three, 103
// and 91 KB), and 256 tokens (`_t256`) with one, four stages (Q8_0, Q2_K, Q5_K and Q5_0 169 KB, Q4_0,
// IQ4_NL, IQ4_XS and Q4_K 153 KB, Q3_K 185 KB, Q6_K 201 KB).
#define QUANT_GEMM(name, DT, NT, STAGES, MIN_BLOCKS)                                                                        \
    extern "C" __global__ void __launch_bounds__(QG_THREADS, MIN_BLOCKS)                                                    \
        name(const void* w0, const float* b0, void* y0, int n0, const void* w1, const float* b1, void* y1, int n1, const void* w2, \
             const float* b2, void* y2, int n2, const unsigned short* x, int rows, int k, int accumulate, int halfOut) {    \
        quant_gemm<DT, NT, STAGES>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, x, rows, k, accumulate, halfOut);        \
    }
QUANT_GEMM(quant_gemm_q8_0, 3, 128, 4, 2)
QUANT_GEMM(quant_gemm_q4_0, 4, 128, 4, 2)
QUANT_GEMM(quant_gemm_q4_K, 5, 128, 4, 2)
QUANT_GEMM(quant_gemm_q6_K, 6, 128, 3, 2)
QUANT_GEMM(quant_gemm_iq4_nl, 7, 128, 4, 2)
QUANT_GEMM(quant_gemm_iq4_xs, 8, 128, 4, 2)
QUANT_GEMM(quant_gemm_q3_K, 9, 128, 3, 2)
QUANT_GEMM(quant_gemm_q2_K, 10, 128, 4, 2)
QUANT_GEMM(quant_gemm_q5_K, 11, 128, 4, 2)
QUANT_GEMM(quant_gemm_q5_0, 12, 128, 4, 2)
QUANT_GEMM(quant_gemm_q8_0_t256, 3, 256, 4, 1)
QUANT_GEMM(quant_gemm_q4_0_t256, 4, 256, 4, 1)
QUANT_GEMM(quant_gemm_q4_K_t256, 5, 256, 4, 1)
QUANT_GEMM(quant_gemm_q6_K_t256, 6, 256, 4, 1)
QUANT_GEMM(quant_gemm_iq4_nl_t256, 7, 256, 4, 1)
QUANT_GEMM(quant_gemm_iq4_xs_t256, 8, 256, 4, 1)
QUANT_GEMM(quant_gemm_q3_K_t256, 9, 256, 4, 1)
QUANT_GEMM(quant_gemm_q2_K_t256, 10, 256, 4, 1)
QUANT_GEMM(quant_gemm_q5_K_t256, 11, 256, 4, 1)
QUANT_GEMM(quant_gemm_q5_0_t256, 12, 256, 4, 1)

// quant_gemm's warp-specialized form, for blocks of 256 tokens (CUDABackend.quantGemm takes it in
// place of the form above there): 384 threads, the third warpgroup copying and the first two
// decoding and multiplying 256 tokens. In the form above every warp copies, waits for its copies
// and meets all the others at a barrier each chunk, so a warpgroup that falls behind holds the
// other and the tensor cores idle (the profile: no eligible warp in 45-48% of cycles, the tensor
// cores about half busy). Here the copying warpgroup fills STAGES buffers ahead, binding each
// buffer's copies to its "full" mbarrier: each copying thread's weight pieces by
// cp.async.mbarrier.arrive.noinc (an arrival when that thread's copies have landed), the
// activations by one TMA copy (a tensor map of x, made for each launch by the host), whose bytes
// the barrier's phase also waits for (129 arrivals in all); each consuming warp waits for
// "full", decodes and multiplies, and once its products of a chunk are complete arrives on the
// buffer's "empty" mbarrier (8 arrivals, a warp each), which the copiers wait for before refilling
// it. The consuming warpgroups meet at no barrier: they are tied only through the buffers (one is
// refilled when all eight warps are done with it, so a warpgroup more than STAGES chunks behind
// would hold the other). The copiers need few registers and give theirs to the consumers
// (setmaxnreg: 40 against 232 a thread, of the 168 a launch of 384 threads starts with), whose 256
// tokens' accumulators take 128. The tile and the decoding (QuantChunk) are the form above's, and
// its outputs (f32, or BF16 for the gating) leave through shared memory and the copy engine
// (quant_gemm_store_staged), with the same bits as that form's stores; x itself is read only
// through xMap (the argument stays, so that both forms take the same ones before it). On an
// H100 it ran 4-9% faster than the form above, and the
// staged stores took a 2,048-token step's products from 0.77x to 0.89x the widening's speed
// (BENCHMARKS.md, which also has what leaving out the decoding or the products would gain). The
// TMA's copies, in place of 16 cp.async a copying thread, gained 5-7% on an H200 and 1.7-3.1% on
// an H100; the consumers now seldom wait for a buffer, and their decoding is what is left.
#define QGW_THREADS 384
// The form above's buffers at 256 tokens, and two mbarriers a buffer.
template <int DT, int STAGES> __host__ __device__ constexpr int quant_gemm_ws_shared() { return quant_gemm_shared<DT, 256, STAGES>() + 16 * STAGES; }

template <int DT, int STAGES>
__device__ __forceinline__ void quant_gemm_ws(const void* w0, const float* b0, void* y0, int n0, const void* w1, const float* b1, void* y1,
                                              int n1, const void* w2, const float* b2, void* y2, int n2, const unsigned short* x, int rows,
                                              int k, int accumulate, int halfOut, const TensorMap* xMap) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int NT = 256;
    static_assert(STAGES >= 2, "a chunk is copied while another is multiplied");
    static_assert(QG_ROWS == 128, "one copying thread a weight row, two consuming warpgroups of 64");
    static_assert(quant_gemm_ws_shared<DT, STAGES>() <= 227 * 1024 - 12288, "within the backend's dynamic shared memory on Hopper");
    using Q = QuantChunk<DT>;
    constexpr int XB = NT * 128;
    constexpr int SB = XB + (QG_ROWS * Q::STRIDE + 1023) / 1024 * 1024;
    static_assert(STAGES * SB >= NT * QG_STAGE_PITCH * 4, "the buffers hold the staged outputs");
    extern __shared__ __align__(16) unsigned char fa_shared[];
    unsigned char* base = fa_shared + ((1024 - (shared_address(fa_shared) & 1023)) & 1023);
    if (dynamic_shared_bytes() < (unsigned)quant_gemm_ws_shared<DT, STAGES>()) __trap();
    unsigned long long* full = (unsigned long long*)(base + STAGES * SB);
    unsigned long long* empty = full + STAGES;
    const QuantGemmTile g(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, k, NT);
    const unsigned long total = (unsigned long)g.n * (unsigned)k;
    if (threadIdx.x == 0) {
        for (int b = 0; b < STAGES; b++) {
            mbarrier_init(&full[b], 129);
            mbarrier_init(&empty[b], 8);
        }
        fence_mbarrier_init();
    }
    __syncthreads();
    gdc_wait();
    if (threadIdx.x >= 256) {
        registers_down<40>();
        // Copying thread p: all the pieces of weight row p (rows past the matrix copy zeros from
        // addresses clamped into the last row, as in the form above), and thread 0 the chunk's
        // activations, one TMA copy of 256 rows by 64 values (xMap's box: 128-byte rows with the
        // 128-byte swizzle, which is the layout wgmma reads here and the form above's copies
        // write; rows past the tokens come as zeros). Its arrival expects the box's bytes, so
        // "full" takes 129 arrivals.
        const int p = threadIdx.x - 256;
        const bool inW = g.o0 + p < g.n;
        const unsigned long iW = (unsigned long)min(g.o0 + p, g.n - 1) * (unsigned)k;
        for (int s = 0; s < g.chunks; s++) {
            const int b = s % STAGES;
            // The buffer's previous chunk (s - STAGES, its use s / STAGES - 1) multiplied.
            if (s >= STAGES) mbarrier_wait(&empty[b], (s / STAGES - 1) & 1);
            unsigned char* xs = base + b * SB;
            unsigned char* ws = xs + XB;
            const int k0 = (g.c0 + s) * QG_K;
            if (p == 0) {
                mbarrier_arrive_expect_tx(&full[b], XB);
                tma_load_2d(xs, xMap, k0, g.t0, &full[b]);
            }
#pragma unroll
            for (int piece = 0; piece < Q::PIECES; piece++)
                copy16_async(ws + p * Q::STRIDE + 16 * piece, Q::piece(g.w, total, iW + k0, k0, piece), inW);
            copy_arrive(&full[b]);
        }
        return;
    }
    registers_up<232>();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, c = lane & 3;
    const int r = 64 * (warp >> 2) + 16 * (warp & 3) + (lane >> 2);  // the thread's rows in the tile: r and r + 8
    const unsigned long i0 = (unsigned long)min(g.o0 + r, g.n - 1) * (unsigned)k, i1 = (unsigned long)min(g.o0 + r + 8, g.n - 1) * (unsigned)k;
    // Chunk s's A fragments, once its buffer is full. The activations, which wgmma reads (the
    // async proxy), came through the async proxy too (the TMA), so no proxy fence is needed; the
    // weights' copies are read by this thread's loads.
    auto decode = [&](unsigned (&a)[4][4], int s) {
        const int b = s % STAGES;
        mbarrier_wait(&full[b], (s / STAGES) & 1);
        quant_gemm_fragments<DT>(a, base + b * SB + XB, r, total, i0, i1, (g.c0 + s) * QG_K, c);
    };
    float acc[NT / 8][4];
#pragma unroll
    for (int i = 0; i < NT / 8; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    const unsigned long long xDesc = wgmma_desc(shared_address(base), 16, 1024);
    // Chunk s on the tensor cores from `cur`, chunk s + 1 decoded into `next` meanwhile (as in
    // the form above). The wait for all but the newest group completes chunk s - 1's products,
    // which read its buffer's activations (its weights were read when it was decoded): the warp
    // then frees that buffer.
    auto step = [&](int s, unsigned (&cur)[4][4], unsigned (&next)[4][4]) {
        quant_gemm_multiply<NT>(acc, cur, xDesc + (unsigned)(s % STAGES) * (SB >> 4));
        wgmma_wait<1>();
        hold_all(next);
        if (s > 0) {
            __syncwarp();
            if (lane == 0) mbarrier_arrive(&empty[(s - 1) % STAGES]);
        }
        if (s + 1 < g.chunks) decode(next, s + 1);
    };
    unsigned a0[4][4], a1[4][4];
    decode(a0, 0);
    for (int s = 0; s < g.chunks; s += 2) {
        step(s, a0, a1);
        if (s + 1 < g.chunks) step(s + 1, a1, a0);
    }
    wgmma_wait<0>();
    hold_all(acc);
    const bool split = gridDim.z > 1, aligned = ((unsigned long long)g.y & 15) == 0;
    if (halfOut && !accumulate && !split && g.n % 8 == 0 && aligned)
        quant_gemm_store_staged<NT, true>(acc, g, r, c, rows, false, base);
    else if (!halfOut && !(accumulate && !split && g.bias) && g.n % 4 == 0 && aligned)
        quant_gemm_store_staged<NT, false>(acc, g, r, c, rows, accumulate || split, base);
    else
        quant_gemm_store<NT>(acc, g, r, c, rows, accumulate, halfOut);
#endif
}

// The backend's warp-specialized kernels (CUDABackend.quantGemmKernels mirrors them), one block a
// multiprocessor: five buffers (quant_gemm_ws_shared: 211 KB for Q8_0, Q2_K, Q5_K and Q5_0, 191 KB for Q4_0,
// IQ4_NL, IQ4_XS and Q4_K), four for Q6_K and Q3_K (201 and 185 KB).
#define QUANT_GEMM_WS(name, DT, STAGES)                                                                                      \
    extern "C" __global__ void __launch_bounds__(QGW_THREADS, 1)                                                            \
        name(const void* w0, const float* b0, void* y0, int n0, const void* w1, const float* b1, void* y1, int n1, const void* w2, \
             const float* b2, void* y2, int n2, const unsigned short* x, int rows, int k, int accumulate, int halfOut,        \
             const GRID_CONSTANT TensorMap xMap) {                                                                       \
        quant_gemm_ws<DT, STAGES>(w0, b0, y0, n0, w1, b1, y1, n1, w2, b2, y2, n2, x, rows, k, accumulate, halfOut, &xMap);  \
    }
QUANT_GEMM_WS(quant_gemm_q8_0_ws, 3, 5)
QUANT_GEMM_WS(quant_gemm_q4_0_ws, 4, 5)
QUANT_GEMM_WS(quant_gemm_q4_K_ws, 5, 5)
QUANT_GEMM_WS(quant_gemm_q6_K_ws, 6, 4)
QUANT_GEMM_WS(quant_gemm_iq4_nl_ws, 7, 5)
QUANT_GEMM_WS(quant_gemm_iq4_xs_ws, 8, 5)
QUANT_GEMM_WS(quant_gemm_q3_K_ws, 9, 4)
QUANT_GEMM_WS(quant_gemm_q2_K_ws, 10, 5)
QUANT_GEMM_WS(quant_gemm_q5_K_ws, 11, 5)
QUANT_GEMM_WS(quant_gemm_q5_0_ws, 12, 5)

// out[t, :] += Σ weight · y[place of the route, :] over row t's k routes, in order of expert
// index (the sum first, then added: as a separate add would). Without `place` (the matvec
// kernels' expert mode, when moe_down does not take the down weights' type) route q's output is
// row q of y, and reads[e] counts each route's expert.
// Block (t, c) takes columns [c x 256, (c + 1) x 256) of row t, so a decode step's few rows
// still spread over the GPU.
extern "C" __global__ void __launch_bounds__(256) moe_combine(const float* routes, const int* place, int k, const float* y, float* out,
                                                              int d, int* reads) {
    gdc_wait();
    __shared__ int order[MOE_MAX_USED], chosen[MOE_MAX_USED];
    int t = blockIdx.x;
    const float* r = routes + (long)t * 2 * k;
    // The row's experts staged first: sorting them where they lie took a trip to memory a step.
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        chosen[j] = __float_as_int(r[2 * j + 1]);
        if (reads && blockIdx.y == 0) atomicAdd(&reads[chosen[j]], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int j = 0; j < k; j++) {
            int i = j;
            while (i > 0 && chosen[order[i - 1]] > chosen[j]) { order[i] = order[i - 1]; i--; }
            order[i] = j;
        }
    }
    __syncthreads();
    for (int i = blockIdx.y * 256 + threadIdx.x; i < min(d, (int)(blockIdx.y + 1) * 256); i += blockDim.x) {
        float s = 0;
        for (int j = 0; j < k; j++) {
            int q = t * k + order[j];
            s += routes[2 * q] * y[(long)(place ? place[q] : q) * d + i];
        }
        out[(long)t * d + i] += s;
    }
}

// A decode step's down products of the chosen experts and their weighted sum, in one launch
// (the matvec kernels' expert mode for down, then moe_combine, would be two): warp o of block
// (c, t) takes output o of row t, c x 8 + its warp, over all of the row's `used` routes, the
// routes' rows of down laid end to end as one row of used x units units. So a lane's loads
// (B units at a time, all issued before any is used) go to whichever route they fall in, and
// a short row (Qwen3-MoE's 768 values: 12 Q6_K units, 24 Q4_K ones) keeps every lane busy,
// where a warp per route and output kept 12 or 24 of its 32 lanes busy for one round of loads.
// Each unit's product is weighted by its route's weight as it is added, and the warp's sum is
// added to the residual: the same terms as down then moe_combine, added in another (fixed)
// order. Block (0, t) counts each route's read. Units: 8 values of the 16-bit types (x read in
// f32 from `x`), 32 of Q8_0, Q4_0 and IQ4_NL (as block_words reads them), 32 of Q4_K and 64 of
// Q6_K (q4k_unit, q6k_unit), against the 8-bit copy of x (xq, xs) for the quantized ones.
template <int DT> struct DownUnit { uint4 a, b, c; };

template <int DT>
__device__ __forceinline__ void down_unit_load(const void* w, long total, int o, int k, int i, DownUnit<DT>& u) {
    if (DT <= 2) {
        u.a = __ldcs((const uint4*)w + (long)o * (k / 8) + i);
    } else if (DT == 3) {
        const uint4* q = (const uint4*)((const signed char*)w + (long)o * k + 32 * i);
        u.a = __ldcs(q);
        u.b = __ldcs(q + 1);
    } else if (DT == 4 || DT == 7) {
        u.a = __ldcs((const uint4*)w + (long)o * (k / 32) + i);
    } else if (DT == 5) {
        u.a = __ldcs((const uint4*)w + (long)o * (k / 32) + i);
        u.b = ((const uint4*)((const unsigned char*)w + total / 2))[(long)o * (k / 256) + i / 8];
    } else {
        const unsigned char* v = (const unsigned char*)w + ((long)o * (k / 256) + i / 4) * 192;
        int half = (i % 4) / 2, lh = i % 2;
        u.a = __ldcs((const uint4*)(v + half * 64 + 16 * lh));
        u.b = __ldcs((const uint4*)(v + half * 64 + 32 + 16 * lh));
        u.c = __ldcs((const uint4*)(v + 128 + half * 32 + 16 * lh));
    }
}

template <int DT>
__device__ __forceinline__ float down_unit_dot(const void* w, long total, int o, int k, int i, const DownUnit<DT>& u,
                                               const float* x, const signed char* xq, const float* xs) {
    if (DT <= 2) {
        float4 a = *(const float4*)(x + 8 * i), b = *(const float4*)(x + 8 * i + 4);
        float f[8];
        if (DT == 2) {
            const __nv_bfloat162* p = (const __nv_bfloat162*)&u.a;
#pragma unroll
            for (int j = 0; j < 4; j++) { float2 t = __bfloat1622float2(p[j]); f[2 * j] = t.x; f[2 * j + 1] = t.y; }
        } else {
            const __half2* p = (const __half2*)&u.a;
#pragma unroll
            for (int j = 0; j < 4; j++) { float2 t = __half22float2(p[j]); f[2 * j] = t.x; f[2 * j + 1] = t.y; }
        }
        return f[0] * a.x + f[1] * a.y + f[2] * a.z + f[3] * a.w + f[4] * b.x + f[5] * b.y + f[6] * b.z + f[7] * b.w;
    } else if (DT == 5) {
        return q4k_unit(u.a, u.b, i, q4k_x(xq, xs, i));
    } else if (DT == 6) {
        const long blocks = total / 256, sb = (long)o * (k / 256) + i / 4;
        const signed char* sc = (const signed char*)w + blocks * 192 + sb * 16 + (i % 4) / 2 * 8 + i % 2;
        return q6k_unit(u.a, u.b, u.c, sc, ((const __half*)((const unsigned char*)w + blocks * 208))[sb], q6k_x(xq, xs, i));
    } else {
        int wq[8];
        words_of(u.a, u.b, DT, wq);
        long b = (long)o * (k / 32) + i;
        return __half2float(quant_scales(w, DT, total)[b]) * xs[i] * (float)dot32(wq, xq + 32 * i);
    }
}

template <int DT, int B>
__device__ __forceinline__ void moe_down_body(const unsigned long long* table, int n, int k, const float* routes, int used,
                                              const float* x, const signed char* xq, const float* xs, float* residual, int* reads) {
    __shared__ const void* expertRows[MOE_MAX_USED];
    __shared__ float routeWeight[MOE_MAX_USED];
    gdc_wait();
    const int t = blockIdx.y, lane = threadIdx.x & 31, o = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    for (int j = threadIdx.x; j < used; j += blockDim.x) {
        int e = __float_as_int(routes[2 * (t * used + j) + 1]);
        expertRows[j] = (const void*)table[e];
        routeWeight[j] = routes[2 * (t * used + j)];
        if (reads && blockIdx.x == 0) atomicAdd(&reads[e], 1);
    }
    __syncthreads();
    if (o >= n) return;
    constexpr int V = DT <= 2 ? 8 : DT == 6 ? 64 : 32;  // values a unit
    const int units = k / V, pairs = units * used;
    const long total = (long)n * k;
    float acc = 0;
    for (int p0 = lane; p0 < pairs; p0 += 32 * B) {
        DownUnit<DT> u[B];
#pragma unroll
        for (int b = 0; b < B; b++) {
            int p = p0 + 32 * b;
            if (p < pairs) down_unit_load<DT>(expertRows[p / units], total, o, k, p % units, u[b]);
        }
#pragma unroll
        for (int b = 0; b < B; b++) {
            int p = p0 + 32 * b;
            if (p >= pairs) break;
            int j = p / units, i = p % units;
            long xrow = (long)t * used + j;
            acc += routeWeight[j] * down_unit_dot<DT>(expertRows[j], total, o, k, i, u[b], x ? x + xrow * k : nullptr,
                                                      xq ? xq + xrow * k : nullptr, xs ? xs + xrow * (k / 32) : nullptr);
        }
    }
    acc = warp_sum(acc);
    if (lane == 0) residual[(long)t * n + o] += acc;
}

#define MOE_DOWN(name, DT, B)                                                                                                \
    extern "C" __global__ void __launch_bounds__(256) name(const unsigned long long* table, int n, int k, const float* routes, \
                                                           int used, const float* x, const signed char* xq, const float* xs,  \
                                                           float* residual, int* reads) {                                   \
        moe_down_body<DT, B>(table, n, k, routes, used, x, xq, xs, residual, reads);                                         \
    }
MOE_DOWN(moe_down_f16, 1, 8)
MOE_DOWN(moe_down_bf16, 2, 8)
MOE_DOWN(moe_down_q8_0, 3, 4)
MOE_DOWN(moe_down_q4_0, 4, 8)
MOE_DOWN(moe_down_q4_K, 5, 6)
MOE_DOWN(moe_down_q6_K, 6, 4)
MOE_DOWN(moe_down_iq4_nl, 7, 8)

// residual[t, :] += sigmoid(gate[t]) * y[t, :] (a shared expert under its own gate).
extern "C" __global__ void add_sigmoid_gated(const float* y, const float* gate, float* residual, int dim, long n) {
    gdc_wait();
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) residual[i] += y[i] / (1.f + __expf(-gate[i / dim]));
}
