// Peregrine's CUDA kernels, compiled at run time by NVRTC for the device's architecture.
// Activations are f32, row-major, one row per token; weights keep their stored type
// (0: f32, 1: f16, 2: bf16). The KV cache is f32, [slot, position, kvHeads, headDim].
#include <cuda_fp16.h>
#include <cuda_bf16.h>

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
    return v;
}

// Quantized weights: 3 = Q8_0 (34-byte blocks: f16 scale, 32 int8), 4 = Q4_0 (18-byte
// blocks: f16 scale, byte j holding value j low and j + 16 high, offset by 8).
__device__ __forceinline__ float load_weight(const void* w, int dtype, long i) {
    if (dtype == 2) return __bfloat162float(((const __nv_bfloat16*)w)[i]);
    if (dtype == 1) return __half2float(((const __half*)w)[i]);
    if (dtype == 3) {
        const unsigned char* b = (const unsigned char*)w + (i / 32) * 34;
        return __half2float(*(const __half*)b) * (float)(signed char)b[2 + i % 32];
    }
    if (dtype == 4) {
        const unsigned char* b = (const unsigned char*)w + (i / 32) * 18;
        int j = i % 32;
        int q = j < 16 ? (b[2 + j] & 15) : (b[2 + j - 16] >> 4);
        return __half2float(*(const __half*)b) * (float)(q - 8);
    }
    return ((const float*)w)[i];
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

extern "C" __global__ void embed_rows(const void* table, int dtype, const int* tokens, float* out, int dim) {
    int t = blockIdx.x;
    long base = (long)tokens[t] * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(long)t * dim + i] = load_weight(table, dtype, base + i);
}

// One block per row: out = x / rms(x) * w.
extern "C" __global__ void rms_norm(const float* x, const float* w, float* out, int dim, float eps) {
    const float* xr = x + (long)blockIdx.x * dim;
    float* o = out + (long)blockIdx.x * dim;
    __shared__ float partial[32];
    float s = 0;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += xr[i] * xr[i];
    s = warp_sum(s);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
        float v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0;
        v = warp_sum(v);
        if (threadIdx.x == 0) partial[0] = rsqrtf(v / dim + eps);
    }
    __syncthreads();
    float scale = partial[0];
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * scale * w[i];
}

// One block of a quantized row against nt tokens' activations rounded to 8 bits (xq: int8,
// xs: one scale per 32), by one lane: 4-byte integer dot products (dp4a), one float multiply
// per block. Blocks are 2-byte aligned, so the weight words are assembled from halves.
__device__ __forceinline__ void block_dot(const void* w, int dtype, long row, long block, const signed char* xq,
                                          const float* xs, int k, int t0, int nt, float* acc) {
    int wq[8];
    float d;
    if (dtype == 3) {
        const unsigned char* b = (const unsigned char*)w + (row / 32 + block) * 34;
        d = __half2float(*(const __half*)b);
        const unsigned short* q = (const unsigned short*)(b + 2);
#pragma unroll
        for (int j = 0; j < 8; j++) wq[j] = (int)((unsigned)q[2 * j] | ((unsigned)q[2 * j + 1] << 16));
    } else {
        const unsigned char* b = (const unsigned char*)w + (row / 32 + block) * 18;
        d = __half2float(*(const __half*)b);
        const unsigned short* q = (const unsigned short*)(b + 2);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            unsigned v = (unsigned)q[2 * j] | ((unsigned)q[2 * j + 1] << 16);
            // Values 4j..4j+3 are low nibbles, 16+4j.. the high ones; subtract the offset of 8 per byte.
            wq[j] = (int)__vsub4(v & 0x0F0F0F0F, 0x08080808);
            wq[j + 4] = (int)__vsub4((v >> 4) & 0x0F0F0F0F, 0x08080808);
        }
    }
    long base = block * 32;
    for (int t = 0; t < nt; t++) {
        const int4* xp = (const int4*)(xq + (long)(t0 + t) * k + base);
        int4 a = xp[0], c = xp[1];
        int sum = __dp4a(wq[0], a.x, 0);
        sum = __dp4a(wq[1], a.y, sum); sum = __dp4a(wq[2], a.z, sum); sum = __dp4a(wq[3], a.w, sum);
        sum = __dp4a(wq[4], c.x, sum); sum = __dp4a(wq[5], c.y, sum); sum = __dp4a(wq[6], c.z, sum); sum = __dp4a(wq[7], c.w, sum);
        acc[t] += d * xs[(long)(t0 + t) * (k / 32) + block] * (float)sum;
    }
}

// Activations rounded to 8 bits per 32 values (scale = max |x| / 127), one warp per block.
extern "C" __global__ void quantize_q8(const float* x, signed char* xq, float* xs, long blocks) {
    long b = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (b >= blocks) return;
    float v = x[b * 32 + lane];
    float amax = warp_max(fabsf(v));
    float d = amax / 127.f;
    xq[b * 32 + lane] = (signed char)(d > 0 ? __float2int_rn(v / d) : 0);
    if (lane == 0) xs[b] = d;
}

// acc[t] += dot(W[row, :], x[t0 + t, :]) for nt <= TOKENS tokens, by one warp: each lane
// reads 16 bytes of the row at a time, four loads in flight, so a decode step streams the
// weights once.
#define TOKENS 8
__device__ __forceinline__ void warp_row_dot(const void* w, int dtype, long row, const float* x, const signed char* xq,
                                             const float* xs, int k, int t0, int nt, int lane, float* acc) {
    if (dtype >= 3) {
        // A lane per 32-value block: neighbouring lanes read neighbouring blocks.
        for (long b = lane; b < k / 32; b += 32) block_dot(w, dtype, row, b, xq, xs, k, t0, nt, acc);
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
            float wv = load_weight(w, dtype, row + i);
            for (int t = 0; t < nt; t++) acc[t] += wv * x[(long)(t0 + t) * k + i];
        }
    }
    for (int t = 0; t < nt; t++) acc[t] = warp_sum(acc[t]);
}

// Products of up to three weights with the same input, one warp per output row (rows of
// matrix 0, then 1, then 2). mode 0: y = W x + b; 1: y += W x + b (the residual add fused);
// 2: gated, y0 = silu(W0 x + b0) * (W1 x + b1), one warp computing both rows.
extern "C" __global__ void matmul_rows(const void* w0, const float* b0, float* y0, int n0,
                                       const void* w1, const float* b1, float* y1, int n1,
                                       const void* w2, const float* b2, float* y2, int n2,
                                       int dtype, const float* x, const signed char* xq, const float* xs, int k, int tokens,
                                       int mode) {
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
        warp_row_dot(w, dtype, (long)o * k, x, xq, xs, k, t0, nt, lane, acc);
        if (mode == 2) {
            float up[TOKENS];
            for (int t = 0; t < TOKENS; t++) up[t] = 0;
            warp_row_dot(w1, dtype, (long)o * k, x, xq, xs, k, t0, nt, lane, up);
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

// A quantized matrix widened to BF16, for cuBLAS products over many tokens.
extern "C" __global__ void dequantize_bf16(const void* w, int dtype, __nv_bfloat16* out, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) out[i] = __float2bfloat16(load_weight(w, dtype, i));
}

// Activations to the weights' 16-bit type, for cuBLAS products.
extern "C" __global__ void to_half(const float* x, void* out, int dtype, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (dtype == 2) ((__nv_bfloat16*)out)[i] = __float2bfloat16(x[i]);
    else ((__half*)out)[i] = __float2half(x[i]);
}

extern "C" __global__ void add_bias(float* y, const float* bias, int outDim, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] += bias[i % outDim];
}

// One thread per rotated pair. Pair i is (i, i + d/2), or (2i, 2i + 1) when interleaved.
extern "C" __global__ void rope(float* x, const float* cosT, const float* sinT, int rows, int heads, int headDim, int interleaved) {
    int half = headDim / 2;
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

// RoPE on a token's query and key heads, and its rotated key and value rows written to the cache
// at (slot, position): one block per token.
extern "C" __global__ void rope_store_kv(float* q, const float* k, const float* v, float* kc, float* vc, const float* cosT,
                                         const float* sinT, const int* slots, const int* positions, int heads, int kvHeads,
                                         int headDim, long slotSize, int interleaved) {
    int t = blockIdx.x, half = headDim / 2, row = kvHeads * headDim;
    const float* c = cosT + (long)t * half;
    const float* s = sinT + (long)t * half;
    long at = (long)slots[t] * slotSize + (long)positions[t] * row;
    for (int idx = threadIdx.x; idx < (heads + kvHeads) * half; idx += blockDim.x) {
        int h = idx / half, i = idx % half;
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
            kc[at + kh * headDim + a] = u * c[i] - w * s[i];
            kc[at + kh * headDim + b] = w * c[i] + u * s[i];
        }
    }
    for (int i = threadIdx.x; i < row; i += blockDim.x) vc[at + i] = v[(long)t * row + i];
}

extern "C" __global__ void store_kv(const float* k, const float* v, float* kc, float* vc, const int* slots, const int* positions,
                                    int rowSize, long slotSize) {
    int t = blockIdx.x;
    long at = (long)slots[t] * slotSize + (long)positions[t] * rowSize;
    for (int i = threadIdx.x; i < rowSize; i += blockDim.x) {
        kc[at + i] = k[(long)t * rowSize + i];
        vc[at + i] = v[(long)t * rowSize + i];
    }
}

// Causal attention of one query head over its sequence, split across the sequence: block
// (token, head, split) handles positions [split * chunk, ...), keeping the maximum, the sum of
// exponentials and the weighted values; attention_merge combines the splits (flash-decoding).
// One warp per key in turn; the chunk's scores live in shared memory.
extern "C" __global__ void attention_split(const float* q, const float* kc, const float* vc, float* partial, float* stats,
                                           const int* slots, const int* positions, int heads, int kvHeads, int headDim,
                                           long slotSize, float scale, int window, int splits, int chunk) {
    int t = blockIdx.x, h = blockIdx.y, split = blockIdx.z;
    int pos = positions[t];
    int lo = window > 0 ? max(0, pos - window + 1) : 0;
    int start = lo + split * chunk, end = min(pos + 1, start + chunk);
    int kvh = h / (heads / kvHeads);
    int row = kvHeads * headDim;
    const float* qp = q + ((long)t * heads + h) * headDim;
    const float* kb = kc + (long)slots[t] * slotSize + kvh * headDim;
    const float* vb = vc + (long)slots[t] * slotSize + kvh * headDim;
    extern __shared__ float scores[];
    __shared__ float red[32];
    int warps = blockDim.x >> 5, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float* out = partial + (((long)t * heads + h) * splits + split) * headDim;
    float* st = stats + (((long)t * heads + h) * splits + split) * 2;
    if (start >= end) {
        for (int d = threadIdx.x; d < headDim; d += blockDim.x) out[d] = 0;
        if (threadIdx.x == 0) { st[0] = -__int_as_float(0x7f800000); st[1] = 0; }
        return;
    }
    int n = end - start;
    for (int j = warp; j < n; j += warps) {
        const float* kp = kb + (long)(start + j) * row;
        float s = 0;
        for (int d = lane; d < headDim; d += 32) s += qp[d] * kp[d];
        s = warp_sum(s);
        if (lane == 0) scores[j] = s * scale;
    }
    __syncthreads();
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, scores[j]);
    m = warp_max(m);
    if (lane == 0) red[warp] = m;
    __syncthreads();
    m = -__int_as_float(0x7f800000);
    for (int w = 0; w < warps; w++) m = fmaxf(m, red[w]);
    __syncthreads();
    float sum = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) { float e = __expf(scores[j] - m); scores[j] = e; sum += e; }
    sum = warp_sum(sum);
    if (lane == 0) red[warp] = sum;
    __syncthreads();
    sum = 0;
    for (int w = 0; w < warps; w++) sum += red[w];
    for (int d = threadIdx.x; d < headDim; d += blockDim.x) {
        float acc = 0;
        for (int j = 0; j < n; j++) acc += scores[j] * vb[(long)(start + j) * row + d];
        out[d] = acc;
    }
    if (threadIdx.x == 0) { st[0] = m; st[1] = sum; }
}

extern "C" __global__ void attention_merge(const float* partial, const float* stats, float* out, int heads, int headDim, int splits) {
    long th = (long)blockIdx.x * heads + blockIdx.y;
    const float* st = stats + th * splits * 2;
    float m = -__int_as_float(0x7f800000);
    for (int s = 0; s < splits; s++) m = fmaxf(m, st[2 * s]);
    float total = 0;
    for (int s = 0; s < splits; s++) if (st[2 * s + 1] > 0) total += st[2 * s + 1] * __expf(st[2 * s] - m);
    for (int d = threadIdx.x; d < headDim; d += blockDim.x) {
        float acc = 0;
        for (int s = 0; s < splits; s++) if (st[2 * s + 1] > 0) acc += partial[(th * splits + s) * headDim + d] * __expf(st[2 * s] - m);
        out[th * headDim + d] = acc / total;
    }
}

extern "C" __global__ void silu_mul(const float* g, const float* u, float* o, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) { float v = g[i]; o[i] = v / (1.f + __expf(-v)) * u[i]; }
}

extern "C" __global__ void add_inplace(float* x, const float* y, long n) {
    long i = (long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

extern "C" __global__ void gather_rows(const float* x, const int* rows, float* out, int dim) {
    int r = blockIdx.x;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) out[(long)r * dim + i] = x[(long)rows[r] * dim + i];
}
