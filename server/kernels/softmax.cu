// Attention probabilities from raw scores in one pass per row: p = softmax(scale · s) over
// the keys a row may see, in f32, written in the scores' dtype. It replaces the scale, the
// casts to and from f32, an additive mask built on the host (a host-to-device copy, which
// waits for the GPU) and the softmax: five launches, each a full pass over
// heads × queries × keys values.
// Rows are (head, query) pairs, query-major within a head: row r is query q = r % len, which
// (when causal) sees keys j <= offset + q; the others get probability 0. Not causal: every
// key. s, p: [R, L] contiguous. grid (min(R, 65535)), block THREADS; a block loops over rows.
#include "common.cuh"

constexpr int THREADS = 256;

// Block-wide reduction of one value per thread (max or sum) through shared memory.
template <bool MAX>
__device__ __forceinline__ float block_reduce(float v, float* partial) {
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = MAX ? fmaxf(v, o) : v + o;
    }
    __syncthreads();  // partial may still be read from the previous reduction
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    float r = partial[0];
#pragma unroll
    for (int k = 1; k < THREADS / 32; ++k) r = MAX ? fmaxf(r, partial[k]) : r + partial[k];
    return r;
}

template <typename T>
__device__ void scaled_softmax(const T* s, T* p, int R, int L, float scale, int len,
                               int offset, int causal) {
    __shared__ float partial[THREADS / 32];
    for (int row = blockIdx.x; row < R; row += gridDim.x) {
        const T* sr = s + (int64_t)row * L;
        T* pr = p + (int64_t)row * L;
        const int seen = causal ? min(L, offset + row % len + 1) : L;
        float m = -INFINITY;
        for (int j = threadIdx.x; j < seen; j += THREADS) m = fmaxf(m, to_f32(sr[j]) * scale);
        m = block_reduce<true>(m, partial);
        float sum = 0.0f;
        for (int j = threadIdx.x; j < seen; j += THREADS) sum += expf(to_f32(sr[j]) * scale - m);
        const float inv = 1.0f / block_reduce<false>(sum, partial);
        for (int j = threadIdx.x; j < L; j += THREADS) {
            store(pr + j, j < seen ? expf(to_f32(sr[j]) * scale - m) * inv : 0.0f);
        }
    }
}

#define SCALED_SOFTMAX_KERNEL(T, SUFFIX)                                                       \
    extern "C" __global__ void __launch_bounds__(THREADS) scaled_softmax_##SUFFIX(             \
        const T* s, T* p, int R, int L, float scale, int len, int offset, int causal) {        \
        scaled_softmax<T>(s, p, R, L, scale, len, offset, causal);                             \
    }

SCALED_SOFTMAX_KERNEL(float, f32)
SCALED_SOFTMAX_KERNEL(__nv_bfloat16, bf16)
