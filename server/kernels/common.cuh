// Helpers shared by the Mamba2 kernels. Math matches the CPU twins in src/kernels/cpu.rs.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

// A value as the model dtype holds it (T{} picks the overload), and a store in that dtype:
// the fused kernels round where the separate ops they replace would.
__device__ __forceinline__ float round_to(float v, float) { return v; }
__device__ __forceinline__ float round_to(float v, __nv_bfloat16) {
    return __bfloat162float(__float2bfloat16(v));
}
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__nv_bfloat16* p, float v) { *p = __float2bfloat16(v); }

__device__ __forceinline__ float silu(float v) { return v / (1.0f + expf(-v)); }

// softplus(v) = max(v, 0) + log1p(exp(-|v|)): no overflow for large |v|.
__device__ __forceinline__ float softplus(float v) {
    return fmaxf(v, 0.0f) + log1pf(expf(-fabsf(v)));
}

__device__ __forceinline__ float warp_sum(float v, unsigned mask, int width) {
    for (int off = width / 2; off > 0; off >>= 1) v += __shfl_xor_sync(mask, v, off);
    return v;
}

// Sum of one value per thread over a block of THREADS threads (a multiple of 32), through
// `partial` (THREADS / 32 floats of shared memory); every thread gets the total.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* partial) {
    v = warp_sum(v, 0xffffffffu, 32);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < THREADS / 32; ++k) total += partial[k];
    return total;
}

// Lanes of this thread's warp that exist in a block of `threads` threads (the last warp may
// be partial); shuffles must name only those.
__device__ __forceinline__ unsigned warp_mask(int tid, int threads) {
    int n = min(32, threads - (tid & ~31));
    return n == 32 ? 0xffffffffu : ((1u << n) - 1u);
}
