// The epilogue of a linear layer as one pass over its output, instead of one launch (and
// one full read and write) per op: out = act(y + bias) + residual, each stage rounded to the
// model dtype as the separate ops would round it. y, residual, out: [R, N] contiguous;
// bias [N] or null; residual null when absent. act: 0 identity, 1 ReLU², 2 exact-erf GELU.
// grid (ceil(N / (2·THREADS)), min(R, 65535)), block THREADS; each thread does two adjacent
// columns of rows blockIdx.y, blockIdx.y + gridDim.y, ...
#include "common.cuh"

constexpr int THREADS = 256;

template <typename T>
__device__ __forceinline__ float epilogue_one(float v, const T* bias, const T* residual,
                                              int64_t at, int col, int act) {
    if (bias != nullptr) v = round_to(v + to_f32(bias[col]), T{});
    if (act == 1) {
        const float r = fmaxf(v, 0.0f);
        v = round_to(r * r, T{});
    } else if (act == 2) {
        v = round_to(0.5f * v * (1.0f + erff(v * 0.70710678118654752f)), T{});
    }
    if (residual != nullptr) v = round_to(to_f32(residual[at]) + v, T{});
    return v;
}

template <typename T>
__device__ void bias_act(const T* y, const T* bias, const T* residual, T* out, int R, int N,
                         int act) {
    const int col = 2 * (blockIdx.x * THREADS + threadIdx.x);
    if (col >= N) return;
    for (int row = blockIdx.y; row < R; row += gridDim.y) {
        const int64_t at = (int64_t)row * N + col;
        store(out + at, epilogue_one(to_f32(y[at]), bias, residual, at, col, act));
        if (col + 1 < N) {
            store(out + at + 1, epilogue_one(to_f32(y[at + 1]), bias, residual, at + 1, col + 1, act));
        }
    }
}

#define BIAS_ACT_KERNEL(T, SUFFIX)                                                             \
    extern "C" __global__ void __launch_bounds__(THREADS) bias_act_##SUFFIX(                   \
        const T* y, const T* bias, const T* residual, T* out, int R, int N, int act) {         \
        bias_act<T>(y, bias, residual, out, R, N, act);                                        \
    }

BIAS_ACT_KERNEL(float, f32)
BIAS_ACT_KERNEL(__nv_bfloat16, bf16)
