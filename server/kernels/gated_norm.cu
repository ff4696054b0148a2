// Grouped gated RMSNorm of the Mamba mixer (model.md §2.5 step 8, norm after the gate):
//   g = y * silu(z);  out = g / sqrt(mean_group(g^2) + eps) * w
// One block per (group, token): the sum of squares is a block reduction; g is recomputed in
// the second pass (y and z are L1/L2-resident by then), so any group size works without
// shared-memory limits. grid (D / group_size, T), block 256.
#include "common.cuh"

constexpr int THREADS = 256;

template <typename TZ>
__device__ void gated_norm(const float* y, int64_t y_stride, const TZ* z, int64_t z_stride,
                           const float* w, float* out, int D, int gs, float eps) {
    __shared__ float partial[THREADS / 32];
    const int grp = blockIdx.x, t = blockIdx.y, tid = threadIdx.x;
    const float* yr = y + (int64_t)t * y_stride + (int64_t)grp * gs;
    const TZ* zr = z + (int64_t)t * z_stride + (int64_t)grp * gs;
    float ss = 0.0f;
    for (int i = tid; i < gs; i += THREADS) {
        const float g = yr[i] * silu(to_f32(zr[i]));
        ss += g * g;
    }
    const float inv = 1.0f / sqrtf(block_sum<THREADS>(ss, partial) / gs + eps);
    const float* wg = w + (int64_t)grp * gs;
    float* o = out + (int64_t)t * D + (int64_t)grp * gs;
    for (int i = tid; i < gs; i += THREADS) o[i] = yr[i] * silu(to_f32(zr[i])) * inv * wg[i];
}

#define GATED_NORM_KERNEL(TY, SUFFIX)                                                           \
    extern "C" __global__ void __launch_bounds__(THREADS) gated_norm_##SUFFIX(                 \
        const float* y, int64_t y_stride, const TY* z, int64_t z_stride, const float* w,        \
        float* out, int D, int gs, float eps) {                                                 \
        gated_norm<TY>(y, y_stride, z, z_stride, w, out, D, gs, eps);                           \
    }

GATED_NORM_KERNEL(float, f32)
GATED_NORM_KERNEL(__nv_bfloat16, bf16)
