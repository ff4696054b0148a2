// Mamba2 decode step (selective state update, model.md §2.5 step 6) on a slot pool:
//   dt = clamp(softplus(dt_raw + dt_bias), lo, hi);  S <- exp(dt a) S + dt x (x) B;  y = S C + D x
// State pool [slots, H, P, N] f32, updated in place.
//
// Design: the step is memory-bound (each state element is read and written once, with 3 flops),
// so the layout serves the loads: one warp owns one state row S[p, :] (N contiguous floats,
// with V = 4 a float4 per lane: 512 coalesced bytes per warp instruction for N = 128), B and
// C of the head's group sit in registers for all the block's rows, and the ROWS rows of a warp
// are loaded before any is used so several 16-byte loads per lane are in flight. y[p] is a warp
// shuffle reduction. grid (ceil(P / (WARPS * ROWS)), H, B), block 32 * WARPS.
#include "common.cuh"

constexpr int WARPS = 4;
constexpr int ROWS = 4;  // rows per warp

template <int V> struct Vec;
template <> struct Vec<1> {
    float v[1];
    __device__ __forceinline__ void load(const float* p) { v[0] = *p; }
    __device__ __forceinline__ void store(float* p) const { *p = v[0]; }
};
template <> struct Vec<4> {
    float v[4];
    __device__ __forceinline__ void load(const float* p) {
        float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    }
    __device__ __forceinline__ void store(float* p) const {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    }
};

// Lane `lane` covers n = (i * 32 + lane) * V + e for i < NI, e < V (n < N only).
// V = 4 needs N % 4 == 0 and a 16-byte aligned pool; NI = ceil(N / (32 V)).
template <typename TDT, int V, int NI>
__device__ void ssm_update(float* pool, uint32_t num_slots, const uint32_t* slots,
                           const float* x, int64_t x_stride, const float* bm, int64_t b_stride,
                           const float* cm, int64_t c_stride, const TDT* dt_raw,
                           int64_t dt_stride, const float* dt_bias, const float* a,
                           const float* d, float dt_lo, float dt_hi, float* y, int H, int P,
                           int N, int G) {
    const int h = blockIdx.y, bi = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int p_base = (blockIdx.x * WARPS + warp) * ROWS;
    float* y_row = y + (int64_t)bi * H * P + (int64_t)h * P;
    const uint32_t slot = slots[bi];
    if (slot >= num_slots) {  // padding row: NaN output, state untouched
        if (lane < ROWS && p_base + lane < P) y_row[p_base + lane] = __int_as_float(0x7fffffff);
        return;
    }
    const int g = h / (H / G);
    float dt = softplus(to_f32(dt_raw[(int64_t)bi * dt_stride + h]) + dt_bias[h]);
    dt = fminf(fmaxf(dt, dt_lo), dt_hi);
    const float da = expf(dt * a[h]);
    const float dskip = d[h];

    float bv[NI][V], cv[NI][V];
    const float* b_row = bm + (int64_t)bi * b_stride + (int64_t)g * N;
    const float* c_row = cm + (int64_t)bi * c_stride + (int64_t)g * N;
#pragma unroll
    for (int i = 0; i < NI; ++i)
#pragma unroll
        for (int e = 0; e < V; ++e) {
            const int n = (i * 32 + lane) * V + e;
            bv[i][e] = n < N ? b_row[n] : 0.0f;
            cv[i][e] = n < N ? c_row[n] : 0.0f;
        }

    float* s_head = pool + ((int64_t)slot * H + h) * P * N;
    const float* x_head = x + (int64_t)bi * x_stride + (int64_t)h * P;
    Vec<V> s[ROWS][NI];
    float xv[ROWS];
    // Issue every load of the warp's rows first.
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int p = p_base + r;
        xv[r] = p < P ? x_head[p] : 0.0f;
#pragma unroll
        for (int i = 0; i < NI; ++i) {
            const int n = (i * 32 + lane) * V;
            if (p < P && n < N) s[r][i].load(s_head + (int64_t)p * N + n);
        }
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int p = p_base + r;
        if (p >= P) break;  // warp-uniform
        const float dtx = dt * xv[r];
        float acc = 0.0f;
#pragma unroll
        for (int i = 0; i < NI; ++i) {
            const int n = (i * 32 + lane) * V;
            if (n < N) {
#pragma unroll
                for (int e = 0; e < V; ++e) {
                    const float v = da * s[r][i].v[e] + dtx * bv[i][e];
                    s[r][i].v[e] = v;
                    acc += v * cv[i][e];
                }
                s[r][i].store(s_head + (int64_t)p * N + n);
            }
        }
        acc = warp_sum(acc, 0xffffffffu, 32);
        if (lane == 0) y_row[p] = acc + dskip * xv[r];
    }
}

#define SSM_UPDATE_KERNEL(TY, SUFFIX, V, NI)                                                   \
    extern "C" __global__ void __launch_bounds__(32 * WARPS)                                   \
        ssm_update_v##V##_n##NI##_##SUFFIX(                                                    \
            float* pool, uint32_t num_slots, const uint32_t* slots, const float* x,            \
            int64_t x_stride, const float* bm, int64_t b_stride, const float* cm,              \
            int64_t c_stride, const TY* dt_raw, int64_t dt_stride, const float* dt_bias,       \
            const float* a, const float* d, float dt_lo, float dt_hi, float* y, int H, int P,  \
            int N, int G) {                                                                    \
        ssm_update<TY, V, NI>(pool, num_slots, slots, x, x_stride, bm, b_stride, cm, c_stride, \
                              dt_raw, dt_stride, dt_bias, a, d, dt_lo, dt_hi, y, H, P, N, G);  \
    }

#define SSM_UPDATE_DTYPES(V, NI)                  \
    SSM_UPDATE_KERNEL(float, f32, V, NI)          \
    SSM_UPDATE_KERNEL(__nv_bfloat16, bf16, V, NI)

SSM_UPDATE_DTYPES(4, 1)
SSM_UPDATE_DTYPES(4, 2)
SSM_UPDATE_DTYPES(4, 4)
SSM_UPDATE_DTYPES(1, 1)
SSM_UPDATE_DTYPES(1, 2)
SSM_UPDATE_DTYPES(1, 4)
