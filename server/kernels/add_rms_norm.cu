// The residual add between NemotronH blocks fused with the next block's RMSNorm (model.md
// §2.2), for decode steps where every launch counts:
//   x' = x + d            (rounded to the model dtype, as the separate add would)
//   h  = w · round(x' · rsqrt(mean(x'²) + eps))   (normalized in f32, rounded to the model
//                          dtype, then times the weight: transformers' two roundings)
// One block per row, d may be null (the first block: a plain norm). At decode a row is the
// whole launch (one SM), so its latency is the cost: each thread issues the loads of its
// PER elements at once and keeps the sums in registers between the two passes. Rows of up
// to THREADS · PER elements (the host checks). grid (T), block THREADS.
#include "common.cuh"

constexpr int THREADS = 1024;
constexpr int PER = 8;

template <typename T>
__device__ void add_rms_norm(const T* x, const T* d, const T* w, T* x_out, T* h, int D,
                             float eps) {
    __shared__ float partial[THREADS / 32];
    const int64_t row = (int64_t)blockIdx.x * D;
    const int tid = threadIdx.x;
    float s[PER];
    float ss = 0.0f;
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * THREADS;
        s[k] = 0.0f;
        if (i < D) {
            s[k] = to_f32(x[row + i]);
            if (d != nullptr) s[k] = round_to(s[k] + to_f32(d[row + i]), T{});
        }
    }
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * THREADS;
        if (i < D) store(x_out + row + i, s[k]);
        ss += s[k] * s[k];
    }
    const float inv = rsqrtf(block_sum<THREADS>(ss, partial) / D + eps);
#pragma unroll
    for (int k = 0; k < PER; ++k) {
        const int i = tid + k * THREADS;
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
