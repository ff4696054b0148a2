// Decode matmuls as a weight stream: y[m, n] = Σ_k x[m, k] · W[n, k] for 1 to MAX_M
// activation rows, W [N, K] bf16 row-major (the checkpoint's [out, in] layout), f32
// accumulation, y rounded to bf16 once (as cuBLAS does). At decode a matmul is one read
// of W, so what counts is bytes in flight: each lane issues UNROLL × ROWS 16-byte loads of
// W before it multiplies any of them. (cuBLAS's kernels for the MLP shapes read W at about
// 2.5 TB/s of the ~3.0 TB/s an H100 copies at; see scripts/gpu-check.sh --steps profile.)
// One warp per ROWS consecutive output rows; lane l reads elements [8l, 8l + 8) of every
// 256-element stretch of a row. Requires K % 8 == 0 and 16-byte aligned rows.
// grid (ceil(N / (WARPS · ROWS))), block WARPS · 32; template M = activation rows.
#include "common.cuh"

constexpr int WARPS = 8;
constexpr int ROWS = 2;
constexpr int UNROLL = 4;

__device__ __forceinline__ float lo_f32(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float hi_f32(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
    float s = lo_f32(a.x) * lo_f32(b.x);
    s = fmaf(hi_f32(a.x), hi_f32(b.x), s);
    s = fmaf(lo_f32(a.y), lo_f32(b.y), s);
    s = fmaf(hi_f32(a.y), hi_f32(b.y), s);
    s = fmaf(lo_f32(a.z), lo_f32(b.z), s);
    s = fmaf(hi_f32(a.z), hi_f32(b.z), s);
    s = fmaf(lo_f32(a.w), lo_f32(b.w), s);
    s = fmaf(hi_f32(a.w), hi_f32(b.w), s);
    return s;
}

template <int M>
__device__ void gemv(const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int N,
                     int K) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int n0 = (blockIdx.x * WARPS + warp) * ROWS;
    if (n0 >= N) return;
    const int rows = min(ROWS, N - n0);
    float acc[ROWS][M];
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;
    const uint4 zero = make_uint4(0, 0, 0, 0);
    for (int base = lane * 8; base < K; base += 256 * UNROLL) {
        uint4 wv[UNROLL][ROWS];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = base + u * 256;
#pragma unroll
            for (int r = 0; r < ROWS; ++r) {
                wv[u][r] = (k < K && r < rows)
                    ? __ldg(reinterpret_cast<const uint4*>(w + (int64_t)(n0 + r) * K + k))
                    : zero;
            }
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int k = base + u * 256;
            if (k >= K) break;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (int64_t)m * K + k));
#pragma unroll
                for (int r = 0; r < ROWS; ++r) acc[r][m] += dot8(wv[u][r], xv);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) {
            const float v = warp_sum(acc[r][m], 0xffffffffu, 32);
            if (lane == 0 && r < rows) y[(int64_t)m * N + n0 + r] = __float2bfloat16(v);
        }
}

#define GEMV_KERNEL(M)                                                                         \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) gemv_bf16_m##M(                   \
        const __nv_bfloat16* x, const __nv_bfloat16* w, __nv_bfloat16* y, int N, int K) {      \
        gemv<M>(x, w, y, N, K);                                                                \
    }

GEMV_KERNEL(1)
GEMV_KERNEL(2)
GEMV_KERNEL(3)
GEMV_KERNEL(4)
