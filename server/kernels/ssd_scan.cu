// Prefill SSD of one sequence (model.md §2.5 step 7), computed as the recurrence of step 6
// token by token: S_t = exp(dt_t a) S_{t-1} + dt_t x_t (x) B_t,  y_t = S_t C_t  (no D skip).
//
// Why a sequential scan rather than the chunked (matmul) form: the state of one head is P x N
// (80 x 128) floats, so H * P * N / E threads (E state elements each, in registers) give
// plenty of parallelism for one sequence (1280 warps at full size) with no inter-chunk pass.
// Each state element costs 3 FP32 ops per token (mul, fma, fma for y): 3 * L * H * P * N =
// 13 G ops for L = 3300, about 0.4 ms at the H100's FP32 rate, small next to the prefill
// GEMMs of the same tokens (~80 TFLOP). The chunked form would move that work to tensor cores
// but needs 5 stages; this one is one kernel whose numerics are the decode kernel's.
//
// Layout: a block owns one head h and R rows p of it; each row is split into S = N / E
// segments held by S adjacent lanes (so y_t's reduction is log2(S) xor-shuffles). B_t and C_t
// of the head's group, dt_t x_t and exp(dt_t a) for TCH tokens are staged in shared memory,
// cooperatively and coalesced; a warp reads each B/C segment as a broadcast (its lanes cover
// few segments), and segments are padded so different segments fall in different banks.
// y of the chunk is staged too and written back coalesced.
// grid (P / R, H), block R * S threads, dynamic shared memory TCH * (2 S SEG + 2 R + 1) floats.
#include "common.cuh"

template <int E>
__device__ void ssd_scan(const float* x, int64_t x_s0, int64_t x_s1, const float* dt,
                         int64_t dt_s0, const float* a, const float* bm, int64_t b_s0,
                         int64_t b_s1, const float* cm, int64_t c_s0, int64_t c_s1,
                         const float* state_in, float* y, float* state_out, int L, int H,
                         int P, int N, int G, int R, int TCH) {
    // Padded segment length (the host computes the same for the smem size).
    constexpr int SEG = E % 4 == 0 ? E + 4 : E + 1;
    extern __shared__ float smem[];
    const int S = N / E;
    const int SP = S * SEG;  // one token's padded B (or C) row
    float* bs = smem;              // [TCH][SP]
    float* cs = bs + TCH * SP;     // [TCH][SP]
    float* xs = cs + TCH * SP;     // [TCH][R]  dt_t x_t
    float* ys = xs + TCH * R;      // [TCH][R]
    float* das = ys + TCH * R;     // [TCH]     exp(dt_t a)

    const int h = blockIdx.y, p0 = blockIdx.x * R;
    const int g = h / (H / G);
    const int tid = threadIdx.x, nthreads = blockDim.x;
    const int r = tid / S, seg = tid % S;
    const unsigned mask = warp_mask(tid, nthreads);
    const float ah = a[h];

    float s[E];
    const float* s_in = state_in + ((int64_t)h * P + p0 + r) * N + seg * E;
#pragma unroll
    for (int j = 0; j < E; ++j) s[j] = s_in[j];

    for (int t0 = 0; t0 < L; t0 += TCH) {
        const int tc = min(TCH, L - t0);
        __syncthreads();  // the previous chunk's smem is consumed
        for (int i = tid; i < tc * N; i += nthreads) {
            const int t = i / N, n = i % N;
            const int k = t * SP + (n / E) * SEG + n % E;
            bs[k] = bm[(int64_t)(t0 + t) * b_s0 + (int64_t)g * b_s1 + n];
            cs[k] = cm[(int64_t)(t0 + t) * c_s0 + (int64_t)g * c_s1 + n];
        }
        for (int i = tid; i < tc * R; i += nthreads) {
            const int t = i / R, rr = i % R;
            const float dtv = dt[(int64_t)(t0 + t) * dt_s0 + h];
            xs[i] = dtv * x[(int64_t)(t0 + t) * x_s0 + (int64_t)h * x_s1 + p0 + rr];
        }
        for (int t = tid; t < tc; t += nthreads) das[t] = expf(dt[(int64_t)(t0 + t) * dt_s0 + h] * ah);
        __syncthreads();

        for (int t = 0; t < tc; ++t) {
            const float da = das[t], dtx = xs[t * R + r];
            const float* bp = bs + t * SP + seg * SEG;
            const float* cp = cs + t * SP + seg * SEG;
            float acc = 0.0f;
            if constexpr (E % 4 == 0) {
#pragma unroll
                for (int j = 0; j < E; j += 4) {
                    const float4 b4 = *reinterpret_cast<const float4*>(bp + j);
                    const float4 c4 = *reinterpret_cast<const float4*>(cp + j);
                    s[j] = da * s[j] + dtx * b4.x;
                    s[j + 1] = da * s[j + 1] + dtx * b4.y;
                    s[j + 2] = da * s[j + 2] + dtx * b4.z;
                    s[j + 3] = da * s[j + 3] + dtx * b4.w;
                    acc += s[j] * c4.x;
                    acc += s[j + 1] * c4.y;
                    acc += s[j + 2] * c4.z;
                    acc += s[j + 3] * c4.w;
                }
            } else {
#pragma unroll
                for (int j = 0; j < E; ++j) {
                    s[j] = da * s[j] + dtx * bp[j];
                    acc += s[j] * cp[j];
                }
            }
            acc = warp_sum(acc, mask, S);
            if (seg == 0) ys[t * R + r] = acc;
        }
        __syncthreads();
        for (int i = tid; i < tc * R; i += nthreads) {
            const int t = i / R, rr = i % R;
            y[((int64_t)(t0 + t) * H + h) * P + p0 + rr] = ys[i];
        }
    }
    float* s_out = state_out + ((int64_t)h * P + p0 + r) * N + seg * E;
#pragma unroll
    for (int j = 0; j < E; ++j) s_out[j] = s[j];
}

#define SSD_SCAN_KERNEL(E)                                                                     \
    extern "C" __global__ void ssd_scan_e##E(                                                  \
        const float* x, int64_t x_s0, int64_t x_s1, const float* dt, int64_t dt_s0,            \
        const float* a, const float* bm, int64_t b_s0, int64_t b_s1, const float* cm,          \
        int64_t c_s0, int64_t c_s1, const float* state_in, float* y, float* state_out, int L,  \
        int H, int P, int N, int G, int R, int TCH) {                                          \
        ssd_scan<E>(x, x_s0, x_s1, dt, dt_s0, a, bm, b_s0, b_s1, cm, c_s0, c_s1, state_in, y,  \
                    state_out, L, H, P, N, G, R, TCH);                                         \
    }

SSD_SCAN_KERNEL(32)
SSD_SCAN_KERNEL(16)
SSD_SCAN_KERNEL(8)
SSD_SCAN_KERNEL(4)
SSD_SCAN_KERNEL(2)
SSD_SCAN_KERNEL(1)
