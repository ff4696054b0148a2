// The residual add between NemotronH blocks fused with the next block's RMSNorm (model.md
// §2.2), for decode steps where every launch counts:
//   x' = x + d            (rounded to the model dtype, as the separate add would)
//   h  = w · round(x' · rsqrt(mean(x'²) + eps))   (normalized in f32, rounded to the model
//                          dtype, then times the weight: transformers' two roundings)
// One block per row; each thread re-reads the elements it wrote itself, so the second pass
// needs no barrier beyond the reduction's. d may be null (the first block: a plain norm).
// grid (T), block THREADS. At decode a row is the whole launch (one SM), so its latency is
// the cost: rows of up to REG_THREADS·PER elements use `add_rms_norm_reg_*`, which issues
// all its loads at once and keeps the sums in registers between the passes.
#include "common.cuh"

constexpr int THREADS = 512;

template <typename T>
__device__ void add_rms_norm(const T* x, const T* d, const T* w, T* x_out, T* h, int D,
                             float eps) {
    __shared__ float partial[THREADS / 32];
    const int64_t row = (int64_t)blockIdx.x * D;
    const int tid = threadIdx.x;
    float ss = 0.0f;
    for (int i = tid; i < D; i += THREADS) {
        float s = to_f32(x[row + i]);
        if (d != nullptr) s = round_to(s + to_f32(d[row + i]), T{});
        store(x_out + row + i, s);
        ss += s * s;
    }
    ss = warp_sum(ss, 0xffffffffu, 32);
    if ((tid & 31) == 0) partial[tid >> 5] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < THREADS / 32; ++k) total += partial[k];
    const float inv = rsqrtf(total / D + eps);
    for (int i = tid; i < D; i += THREADS) {
        const float n = round_to(to_f32(x_out[row + i]) * inv, T{});
        store(h + row + i, n * to_f32(w[i]));
    }
}

constexpr int REG_THREADS = 1024;
constexpr int PER = 8;

template <typename T>
__device__ void add_rms_norm_reg(const T* x, const T* d, const T* w, T* x_out, T* h, int D,
                                 float eps) {
    __shared__ float partial[REG_THREADS / 32];
    const int64_t row = (int64_t)blockIdx.x * D;
    const int tid = threadIdx.x;
    float s[PER];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * REG_THREADS;
        s[k] = 0.0f;
        if (i < D) {
            s[k] = to_f32(x[row + i]);
            if (d != nullptr) s[k] = round_to(s[k] + to_f32(d[row + i]), T{});
        }
    }
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * REG_THREADS;
        if (i < D) store(x_out + row + i, s[k]);
        ss += s[k] * s[k];
    }
    ss = warp_sum(ss, 0xffffffffu, 32);
    if ((tid & 31) == 0) partial[tid >> 5] = ss;
    __syncthreads();
    float total = 0.0f;
#pragma unroll
    for (int k = 0; k < REG_THREADS / 32; ++k) total += partial[k];
    const float inv = rsqrtf(total / D + eps);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * REG_THREADS;
        if (i < D) store(h + row + i, round_to(s[k] * inv, T{}) * to_f32(w[i]));
    }
}

#define ADD_RMS_NORM_KERNEL(T, SUFFIX)                                                         \
    extern "C" __global__ void __launch_bounds__(THREADS) add_rms_norm_##SUFFIX(               \
        const T* x, const T* d, const T* w, T* x_out, T* h, int D, float eps) {                \
        add_rms_norm<T>(x, d, w, x_out, h, D, eps);                                            \
    }

ADD_RMS_NORM_KERNEL(float, f32)
ADD_RMS_NORM_KERNEL(__nv_bfloat16, bf16)

#define ADD_RMS_NORM_REG_KERNEL(T, SUFFIX)                                                     \
    extern "C" __global__ void __launch_bounds__(REG_THREADS) add_rms_norm_reg_##SUFFIX(       \
        const T* x, const T* d, const T* w, T* x_out, T* h, int D, float eps) {                \
        add_rms_norm_reg<T>(x, d, w, x_out, h, D, eps);                                        \
    }

ADD_RMS_NORM_REG_KERNEL(float, f32)
ADD_RMS_NORM_REG_KERNEL(__nv_bfloat16, bf16)
