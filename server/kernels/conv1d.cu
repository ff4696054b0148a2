// Causal depthwise conv1d + bias + SiLU over the xBC channels (model.md §2.5 step 2).
// Channels are independent, so one thread owns one channel: loads and stores are coalesced
// across a warp (token-major rows), and the K-tap window lives in registers (K is a template
// parameter, 2..=4 as in causal-conv1d). Weights are [K, C]: row k multiplies input t-(K-1)+k.
#include "common.cuh"

// Decode: one token for each of B sequences. pool [slots, K-1, C] is shifted in place.
// grid (ceil(C / blockDim.x), B). A slot id >= num_slots marks a padding row: its output is
// NaN and no state is touched.
template <typename T, int K>
__device__ void conv1d_update(float* pool, uint32_t num_slots, const uint32_t* slots,
                              const T* xbc, int64_t xbc_stride, const float* w,
                              const float* bias, float* out, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    const int b = blockIdx.y;
    if (c >= C) return;
    const uint32_t slot = slots[b];
    float* out_row = out + (int64_t)b * C;
    if (slot >= num_slots) {
        out_row[c] = __int_as_float(0x7fffffff);
        return;
    }
    float* st = pool + (int64_t)slot * (K - 1) * C + c;
    float win[K];
#pragma unroll
    for (int j = 0; j < K - 1; ++j) win[j] = st[(int64_t)j * C];
    win[K - 1] = to_f32(xbc[(int64_t)b * xbc_stride + c]);
    float acc = bias ? bias[c] : 0.0f;
#pragma unroll
    for (int j = 0; j < K; ++j) acc += w[(int64_t)j * C + c] * win[j];
#pragma unroll
    for (int j = 0; j < K - 1; ++j) st[(int64_t)j * C] = win[j + 1];
    out_row[c] = silu(acc);
}

// Prefill of one sequence: x [L, C] (row stride x_stride), state [K-1, C] (the inputs before
// x, oldest first). Writes out [L, C] and, from the last tile's blocks, new_state [K-1, C]
// (the last K-1 rows of [state; x]). grid (ceil(C / blockDim.x), ceil(L / TILE)).
constexpr int TILE = 32;

template <typename T, int K>
__device__ void conv1d_prefill(const T* x, int64_t x_stride, const float* state,
                               const float* w, const float* bias, float* out,
                               float* new_state, int L, int C) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int t0 = blockIdx.y * TILE;
    // Padded input row i of [state; x] (i in 0..K-1+L) for this channel.
    auto in = [&](int i) -> float {
        return i < K - 1 ? state[(int64_t)i * C + c]
                         : to_f32(x[(int64_t)(i - (K - 1)) * x_stride + c]);
    };
    float wk[K];
#pragma unroll
    for (int j = 0; j < K; ++j) wk[j] = w[(int64_t)j * C + c];
    const float b0 = bias ? bias[c] : 0.0f;
    // Output t uses padded rows t..t+K-1.
    float win[K];
#pragma unroll
    for (int j = 0; j < K - 1; ++j) win[j + 1] = in(t0 + j);
    const int t_end = min(t0 + TILE, L);
    for (int t = t0; t < t_end; ++t) {
#pragma unroll
        for (int j = 0; j < K - 1; ++j) win[j] = win[j + 1];
        win[K - 1] = in(t + K - 1);
        float acc = b0;
#pragma unroll
        for (int j = 0; j < K; ++j) acc += wk[j] * win[j];
        out[(int64_t)t * C + c] = silu(acc);
    }
    if (blockIdx.y == gridDim.y - 1) {
#pragma unroll
        for (int j = 0; j < K - 1; ++j) new_state[(int64_t)j * C + c] = in(L + j);
    }
}

#define CONV1D_KERNELS(TY, SUFFIX, K)                                                          \
    extern "C" __global__ void conv1d_update_k##K##_##SUFFIX(                                 \
        float* pool, uint32_t num_slots, const uint32_t* slots, const TY* xbc,                \
        int64_t xbc_stride, const float* w, const float* bias, float* out, int C) {           \
        conv1d_update<TY, K>(pool, num_slots, slots, xbc, xbc_stride, w, bias, out, C);       \
    }                                                                                          \
    extern "C" __global__ void conv1d_prefill_k##K##_##SUFFIX(                                \
        const TY* x, int64_t x_stride, const float* state, const float* w, const float* bias, \
        float* out, float* new_state, int L, int C) {                                          \
        conv1d_prefill<TY, K>(x, x_stride, state, w, bias, out, new_state, L, C);             \
    }

CONV1D_KERNELS(float, f32, 2)
CONV1D_KERNELS(float, f32, 3)
CONV1D_KERNELS(float, f32, 4)
CONV1D_KERNELS(__nv_bfloat16, bf16, 2)
CONV1D_KERNELS(__nv_bfloat16, bf16, 3)
CONV1D_KERNELS(__nv_bfloat16, bf16, 4)
