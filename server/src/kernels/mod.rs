//! Mamba2 mixer kernels (model.md §2.5) on per-layer state pools, device-agnostic: each op
//! runs the CUDA kernel (`server/kernels/*.cu`, `--features cuda`) when its tensors are on a
//! GPU, else the CPU twin in [`cpu`] (same math, f32 accumulation).
//!
//! State layout per Mamba layer: a conv pool [slots, K−1, C] f32 (row j of a slot is the j-th
//! oldest pre-conv xBC input, C = conv_dim) and an SSM pool [slots, H, P, N] f32. A batch
//! names its sequences by slot ids, a [B] u32 tensor on the same device. The decode ops update
//! the pools in place and touch only the named slots; slot ids of one batch must be distinct.
//! The CPU twins reject out-of-range or repeated ids; the CUDA kernels cannot report errors
//! without a device sync, so there an id ≥ slots marks a padding row (NaN output, no state
//! touched) and repeated ids are undefined.
//!
//! Inputs named "strided rows ok" may be column slices of a wider matrix (unit column stride,
//! any row stride); anything else with a non-unit innermost stride is copied first.

mod access;
pub(crate) use access::{AnyRows, CpuF32, Rows};
pub(crate) mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
// Launch shapes: used by the CUDA path, unit-tested everywhere.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod plan;
pub mod reference;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::{CpuStorage, DType, Device, InplaceOp1, Layout, Result, Tensor, bail};

use crate::model::linear::Activation;

use access::{
    Locked, cpu_f32, cpu_f32_mut, cpu_rows_any, cpu_rows_f32, cpu_u32, ensure_dims, ensure_dtype,
    ensure_not_aliased, ensure_same_device, unit_inner,
};

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// Fill freshly allocated outputs with NaN before the kernels write them, so an element a
/// kernel forgets to write shows up in checks (costs a fill per output; off by default).
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

pub(crate) fn poison_outputs() -> bool {
    POISON_OUTPUTS.load(Ordering::Relaxed)
}

const F32_BF16: &[DType] = &[DType::F32, DType::BF16];

/// Decode conv for B sequences × 1 token.
/// `pool` [slots, K−1, C] f32 (contiguous) is shifted by one token in place for the given
/// slots; `xbc` [B, C] f32/bf16 (strided rows ok); `slots` [B] u32; `w` [K, C] f32 (row k
/// multiplies input t−(K−1)+k); `bias` [C] f32. Returns SiLU(conv + bias) [B, C] f32.
pub fn conv1d_update(
    pool: &Tensor,
    xbc: &Tensor,
    slots: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    const NAME: &str = "conv1d_update";
    let (num_slots, km1, c) = pool_dims3(NAME, pool)?;
    let (k, b) = (km1 + 1, xbc.dims2()?.0);
    if k < 2 {
        bail!("{NAME}: the pool keeps no conv state (K−1 = 0)");
    }
    ensure_dims(NAME, "xbc", xbc, &[b, c])?;
    ensure_dtype(NAME, "xbc", xbc, F32_BF16)?;
    check_slots_tensor(NAME, slots, b)?;
    ensure_dims(NAME, "w", w, &[k, c])?;
    ensure_dtype(NAME, "w", w, &[DType::F32])?;
    check_bias(NAME, bias, c)?;
    let mut all = vec![pool, xbc, slots, w];
    all.extend(bias);
    ensure_same_device(NAME, &all)?;
    let (xbc, slots, w) = (unit_inner(xbc)?, slots.contiguous()?, w.contiguous()?);
    let bias = bias.map(Tensor::contiguous).transpose()?;
    let mut inputs = vec![&xbc, &slots, &w];
    inputs.extend(bias.as_ref());
    ensure_not_aliased(NAME, pool, &inputs)?;
    if b == 0 {
        return Tensor::zeros((0, c), DType::F32, pool.device());
    }
    let op = ConvUpdateOp {
        inputs,
        num_slots,
        out: Stash::default(),
    };
    pool.inplace_op1(&op)?;
    op.out.take(NAME)
}

/// Decode SSM step for B sequences × 1 token.
/// `pool` [slots, H, P, N] f32 (contiguous), updated in place for the given slots; `x`
/// [B, H·P], `b`/`c` [B, G·N] f32 (strided rows ok); `dt_raw` [B, H] f32/bf16 (strided rows
/// ok); `dt_bias`, `a` (= −exp(A_log)), `d`: H values f32. dt = clamp(softplus(dt_raw +
/// dt_bias), lo, hi) (hi may be +inf); head h uses group h / (H/G).
/// S ← exp(dt·a)·S + dt·x⊗B;  y = S·C + d·x. Returns y [B, H·P] f32.
#[allow(clippy::too_many_arguments)]
pub fn selective_state_update(
    pool: &Tensor,
    x: &Tensor,
    b: &Tensor,
    c: &Tensor,
    dt_raw: &Tensor,
    dt_bias: &Tensor,
    a: &Tensor,
    d: &Tensor,
    dt_limit: (f32, f32),
    slots: &Tensor,
) -> Result<Tensor> {
    const NAME: &str = "selective_state_update";
    let (num_slots, h, p, n) = match pool.dims() {
        &[s, h, p, n] => (s, h, p, n),
        d => bail!("{NAME}: pool has shape {d:?}, expected [slots, H, P, N]"),
    };
    ensure_pool(NAME, pool)?;
    let (bsz, gn) = b.dims2()?;
    if n == 0 || gn == 0 || !gn.is_multiple_of(n) || !h.is_multiple_of(gn / n) {
        bail!("{NAME}: B has {gn} columns, not a group count dividing H = {h} times N = {n}");
    }
    let groups = gn / n;
    ensure_dims(NAME, "x", x, &[bsz, h * p])?;
    ensure_dims(NAME, "C", c, &[bsz, gn])?;
    ensure_dims(NAME, "dt_raw", dt_raw, &[bsz, h])?;
    for (what, t) in [("x", x), ("B", b), ("C", c)] {
        ensure_dtype(NAME, what, t, &[DType::F32])?;
    }
    ensure_dtype(NAME, "dt_raw", dt_raw, F32_BF16)?;
    for (what, t) in [("dt_bias", dt_bias), ("A", a), ("D", d)] {
        ensure_dtype(NAME, what, t, &[DType::F32])?;
        if t.elem_count() != h {
            bail!("{NAME}: {what} has shape {:?}, expected [{h}]", t.dims());
        }
    }
    let (lo, hi) = dt_limit;
    if lo.is_nan() || hi.is_nan() || lo > hi {
        bail!("{NAME}: bad dt_limit {dt_limit:?}");
    }
    check_slots_tensor(NAME, slots, bsz)?;
    ensure_same_device(NAME, &[pool, x, b, c, dt_raw, dt_bias, a, d, slots])?;
    let (x, b, c, dt_raw) = (
        unit_inner(x)?,
        unit_inner(b)?,
        unit_inner(c)?,
        unit_inner(dt_raw)?,
    );
    let flat = |t: &Tensor| t.flatten_all()?.contiguous();
    let (dt_bias, a, d) = (flat(dt_bias)?, flat(a)?, flat(d)?);
    let slots = slots.contiguous()?;
    let inputs = vec![&x, &b, &c, &dt_raw, &dt_bias, &a, &d, &slots];
    ensure_not_aliased(NAME, pool, &inputs)?;
    if bsz == 0 {
        return Tensor::zeros((0, h * p), DType::F32, pool.device());
    }
    let op = SsmUpdateOp {
        inputs,
        num_slots,
        dims: cpu::SsmDims {
            heads: h,
            head_dim: p,
            state: n,
            groups,
        },
        dt_limit,
        out: Stash::default(),
    };
    pool.inplace_op1(&op)?;
    op.out.take(NAME)
}

/// Grouped gated RMSNorm: `y` [T, D] f32, `z` [T, D] f32/bf16 (both strided rows ok), `w` [D]
/// f32. g = y·silu(z); out = g / sqrt(mean_group(g²) + eps) · w per group of `group_size`
/// consecutive channels. Returns [T, D] f32.
pub fn gated_rms_norm(
    y: &Tensor,
    z: &Tensor,
    w: &Tensor,
    group_size: usize,
    eps: f32,
) -> Result<Tensor> {
    const NAME: &str = "gated_rms_norm";
    let (t, dm) = y.dims2()?;
    if group_size == 0 || !dm.is_multiple_of(group_size) {
        bail!("{NAME}: width {dm} is not a multiple of group size {group_size}");
    }
    ensure_dtype(NAME, "y", y, &[DType::F32])?;
    ensure_dims(NAME, "z", z, &[t, dm])?;
    ensure_dtype(NAME, "z", z, F32_BF16)?;
    ensure_dims(NAME, "w", w, &[dm])?;
    ensure_dtype(NAME, "w", w, &[DType::F32])?;
    ensure_same_device(NAME, &[y, z, w])?;
    let (y, z, w) = (unit_inner(y)?, unit_inner(z)?, w.contiguous()?);
    if t == 0 {
        return Tensor::zeros((0, dm), DType::F32, y.device());
    }
    let locked = Locked::new(&[&y, &z, &w]);
    match y.device() {
        Device::Cpu => {
            let (ys, yl) = locked.get(0);
            let (zs, zl) = locked.get(1);
            let (ws, wl) = locked.get(2);
            let out = cpu::gated_rms_norm(
                cpu_rows_f32(ys, yl)?,
                cpu_rows_any(zs, zl)?,
                cpu_f32(ws, wl)?,
                group_size,
                eps,
            );
            Tensor::from_vec(out, (t, dm), &Device::Cpu)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::gated_rms_norm(&locked, (t, dm), group_size, eps),
        dev => unsupported(NAME, dev),
    }
}

/// Whether the model uses the fused GPU kernels ([`add_rms_norm`], [`bias_act`],
/// [`scaled_softmax`]) in place of candle op sequences; `VLM_CUDA_FUSED=0` turns them off
/// (kept to measure what they gain).
pub fn fused_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VLM_CUDA_FUSED").as_deref() != Ok("0"))
}

/// `VLM_SSD_SCAN_E`: the state elements per thread of the CUDA prefill scan (32, 16, 8, ...;
/// see `ssd_scan.cu`), to compare the variants; unset or invalid: the default plan.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn scan_e_override() -> Option<usize> {
    std::env::var("VLM_SSD_SCAN_E").ok()?.parse().ok()
}

/// Most activation rows [`gemv`] takes.
pub const GEMV_MAX_ROWS: usize = 4;

/// Whether the model multiplies through [`gemv`]: a CUDA BF16 `x` of one row [1, K] and a
/// weight [N, K] with K a multiple of 8, unless `VLM_CUDA_GEMV=0` (kept to measure it against
/// cuBLAS). One row only: on an H100 (kernel_check, the seven decode shapes of the full
/// model) the kernel was faster than cuBLAS on five at one row (by up to 14%, the MLP's up
/// projection) and within 2% on the other two; at four rows cuBLAS was faster on four of
/// the seven, by 4 to 16%.
pub fn gemv_applies(x: &Tensor, w: &Tensor) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("VLM_CUDA_GEMV").as_deref() != Ok("0"));
    on && x.device().is_cuda()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && matches!((x.dims(), w.dims()), ([1, k], [_, kw]) if k == kw && k.is_multiple_of(8))
}

/// `x Wᵀ` for a few activation rows: `x` [M, K], `w` [N, K] (the [out, in] layout), BF16,
/// f32 accumulation, one rounding. On the GPU a weight-streaming kernel (decode matmuls read
/// every weight once); elsewhere candle's matmul.
pub fn gemv(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    const NAME: &str = "gemv";
    let (m, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    if kw != k {
        bail!("{NAME}: x has {k} columns, the weight {kw}");
    }
    ensure_dtype(NAME, "x", x, &[DType::BF16])?;
    ensure_dtype(NAME, "w", w, &[DType::BF16])?;
    ensure_same_device(NAME, &[x, w])?;
    match x.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if (1..=GEMV_MAX_ROWS).contains(&m) && k.is_multiple_of(8) => {
            let (x, w) = (x.contiguous()?, w.contiguous()?);
            cuda::gemv(&Locked::new(&[&x, &w]), (m, n, k))
        }
        // f32 here: candle's CPU matmul has no BF16 kernel.
        _ => x
            .to_dtype(DType::F32)?
            .matmul(&w.to_dtype(DType::F32)?.t()?)?
            .to_dtype(DType::BF16)?
            .reshape((m, n)),
    }
}

/// A linear layer's epilogue in one pass: `act(y + bias) + residual`, rounded to `y`'s dtype
/// after each stage as the separate ops are. `y` [R, N] f32/bf16, `bias` [N], `residual`
/// [R, N], all of one dtype.
pub fn bias_act(
    y: &Tensor,
    bias: Option<&Tensor>,
    act: Activation,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    const NAME: &str = "bias_act";
    let (r, n) = y.dims2()?;
    ensure_dtype(NAME, "y", y, F32_BF16)?;
    let mut all = vec![y];
    if let Some(b) = bias {
        ensure_dims(NAME, "bias", b, &[n])?;
        ensure_dtype(NAME, "bias", b, &[y.dtype()])?;
        all.push(b);
    }
    if let Some(res) = residual {
        ensure_dims(NAME, "residual", res, &[r, n])?;
        ensure_dtype(NAME, "residual", res, &[y.dtype()])?;
        all.push(res);
    }
    ensure_same_device(NAME, &all)?;
    match y.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if r > 0 && n > 0 => {
            let y = y.contiguous()?;
            let bias = bias.map(Tensor::contiguous).transpose()?;
            let residual = residual.map(Tensor::contiguous).transpose()?;
            let mut ts = vec![&y];
            ts.extend(bias.as_ref());
            ts.extend(residual.as_ref());
            let code = match act {
                Activation::Identity => 0,
                Activation::Relu2 => 1,
                Activation::GeluErf => 2,
            };
            cuda::bias_act(&Locked::new(&ts), (r, n), bias.is_some(), code)
        }
        _ => {
            let y = match bias {
                Some(b) => y.broadcast_add(b)?,
                None => y.clone(),
            };
            let y = match act {
                Activation::Identity => y,
                Activation::Relu2 => y.relu()?.sqr()?,
                Activation::GeluErf => y.gelu_erf()?,
            };
            match residual {
                Some(res) => res + y,
                None => Ok(y),
            }
        }
    }
}

/// Attention probabilities from raw scores `s` [R, L] (f32/bf16): softmax over each row of
/// `scale · s`, computed in f32 and returned in `s`'s dtype. Rows are (head, query) pairs,
/// query-major within a head; with `causal = Some((len, offset))` row r is query
/// `r % len` of a chunk whose first query sits at position `offset`, and it sees keys
/// `j <= offset + r % len` (the rest get 0).
pub fn scaled_softmax(s: &Tensor, scale: f32, causal: Option<(usize, usize)>) -> Result<Tensor> {
    const NAME: &str = "scaled_softmax";
    let (r, l) = s.dims2()?;
    ensure_dtype(NAME, "scores", s, F32_BF16)?;
    if let Some((len, offset)) = causal
        && (len == 0 || offset + len > l || !r.is_multiple_of(len))
    {
        bail!("{NAME}: causal chunk of {len} queries at {offset} does not fit [{r}, {l}] scores");
    }
    match s.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if r > 0 && l > 0 => {
            let s = s.contiguous()?;
            let (len, offset, causal) = match causal {
                Some((len, offset)) => (len, offset, true),
                None => (1, 0, false),
            };
            cuda::scaled_softmax(&Locked::new(&[&s]), (r, l), scale, (len, offset, causal))
        }
        _ => {
            let x = (s.to_dtype(DType::F32)? * scale as f64)?;
            let x = match causal {
                Some((len, offset)) => {
                    let mask: Vec<f32> = (0..r)
                        .flat_map(|row| {
                            let seen = offset + row % len + 1;
                            (0..l).map(move |j| if j < seen { 0.0 } else { f32::NEG_INFINITY })
                        })
                        .collect();
                    (x + Tensor::from_vec(mask, (r, l), s.device())?)?
                }
                None => x,
            };
            candle_nn::ops::softmax_last_dim(&x)?.to_dtype(s.dtype())
        }
    }
}

/// Widest row the fused kernel holds in registers (add_rms_norm.cu: 1024 threads × 8); wider
/// rows take the separate ops.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const ADD_RMS_NORM_MAX_DIM: usize = 8192;

/// The residual add between two blocks fused with the next block's RMSNorm: `x` [T, D] and
/// `delta` [T, D] (None: no add), `w` [D], all of one dtype (f32 or bf16). Returns
/// (x' = x + delta, h = w · round(x' · rsqrt(mean(x'²) + eps))) with the roundings of the
/// separate ops (the sum and the normalized value in the dtype; the mean in f32). On the GPU
/// this is one launch instead of five (add, two casts, norm, weight); elsewhere it is those
/// ops.
pub fn add_rms_norm(
    x: &Tensor,
    delta: Option<&Tensor>,
    w: &Tensor,
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    const NAME: &str = "add_rms_norm";
    let (t, dm) = x.dims2()?;
    ensure_dtype(NAME, "x", x, F32_BF16)?;
    ensure_dims(NAME, "w", w, &[dm])?;
    ensure_dtype(NAME, "w", w, &[x.dtype()])?;
    if let Some(d) = delta {
        ensure_dims(NAME, "delta", d, &[t, dm])?;
        ensure_dtype(NAME, "delta", d, &[x.dtype()])?;
        ensure_same_device(NAME, &[x, d, w])?;
    } else {
        ensure_same_device(NAME, &[x, w])?;
    }
    match x.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) if t > 0 && dm <= ADD_RMS_NORM_MAX_DIM => {
            let (x, w) = (x.contiguous()?, w.contiguous()?);
            let d = delta.map(Tensor::contiguous).transpose()?;
            let mut ts = vec![&x, &w];
            ts.extend(d.as_ref());
            cuda::add_rms_norm(&Locked::new(&ts), (t, dm), eps)
        }
        _ => {
            let x = match delta {
                Some(d) => (x + d)?,
                None => x.clone(),
            };
            let ones = Tensor::ones(dm, DType::F32, x.device())?;
            let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &ones, eps)?;
            let h = normed.to_dtype(x.dtype())?.broadcast_mul(w)?;
            Ok((x, h))
        }
    }
}

/// Prefill conv of one sequence: `x` [L, C] f32/bf16 (strided rows ok), `state` [K−1, C] f32
/// (the inputs before x, oldest first), `w` [K, C], `bias` [C] f32.
/// Returns (SiLU(conv + bias) [L, C] f32, new state [K−1, C] f32 = the last K−1 rows of
/// [state; x]).
pub fn conv1d_prefill(
    x: &Tensor,
    state: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const NAME: &str = "conv1d_prefill";
    let (l, c) = x.dims2()?;
    let (k, cw) = w.dims2()?;
    if k < 2 || cw != c {
        bail!("{NAME}: w has shape {:?}, expected [K >= 2, {c}]", w.dims());
    }
    ensure_dtype(NAME, "x", x, F32_BF16)?;
    ensure_dtype(NAME, "w", w, &[DType::F32])?;
    ensure_dims(NAME, "state", state, &[k - 1, c])?;
    ensure_dtype(NAME, "state", state, &[DType::F32])?;
    check_bias(NAME, bias, c)?;
    let mut all = vec![x, state, w];
    all.extend(bias);
    ensure_same_device(NAME, &all)?;
    let (x, state, w) = (unit_inner(x)?, state.contiguous()?, w.contiguous()?);
    let bias = bias.map(Tensor::contiguous).transpose()?;
    if l == 0 {
        return Ok((
            Tensor::zeros((0, c), DType::F32, x.device())?,
            state.copy()?,
        ));
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && !cuda::CONV_WIDTHS.contains(&k) {
        // Widths without a kernel instance: K shifted multiply-adds in candle ops.
        let x = x.to_dtype(DType::F32)?;
        let (y, st) = crate::model::mamba2::causal_conv1d(&x, &state, &w, bias.as_ref())?;
        return Ok((candle_nn::ops::silu(&y)?, st));
    }
    let mut inputs = vec![&x, &state, &w];
    inputs.extend(bias.as_ref());
    let locked = Locked::new(&inputs);
    match x.device() {
        Device::Cpu => {
            let (xs, xl) = locked.get(0);
            let (ss, sl) = locked.get(1);
            let (ws, wl) = locked.get(2);
            let bias = match bias {
                Some(_) => {
                    let (bs, bl) = locked.get(3);
                    Some(cpu_f32(bs, bl)?)
                }
                None => None,
            };
            let (out, new_state) = cpu::conv1d_prefill(
                cpu_rows_any(xs, xl)?,
                cpu_f32(ss, sl)?,
                cpu_f32(ws, wl)?,
                bias,
            );
            Ok((
                Tensor::from_vec(out, (l, c), &Device::Cpu)?,
                Tensor::from_vec(new_state, (k - 1, c), &Device::Cpu)?,
            ))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => cuda::conv1d_prefill(&locked, l, c, k),
        dev => unsupported(NAME, dev),
    }
}

/// Prefill SSD of one sequence: `x` [L, H, P] f32, `dt` [L, H] f32 (softplus'ed and clamped),
/// `a` [H] f32 (= −exp(A_log)), `b`/`c` [L, G, N] f32, `state` [H, P, N] f32 (initial),
/// `chunk` the SSD chunk length (for the candle-op fallback on CUDA shapes the kernel does
/// not cover). Returns (y [L, H, P] without the D skip, final state [H, P, N]). Same math as
/// [`crate::model::mamba2::ssd_chunked`]; CPU runs it as a token scan.
pub fn ssd_scan(
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    state: &Tensor,
    chunk: usize,
) -> Result<(Tensor, Tensor)> {
    const NAME: &str = "ssd_scan";
    let (l, h, p) = x.dims3()?;
    let (lb, g, n) = b.dims3()?;
    if lb != l || g == 0 || !h.is_multiple_of(g) {
        bail!(
            "{NAME}: B has shape {:?}, expected [{l}, G dividing {h}, N]",
            b.dims()
        );
    }
    if chunk == 0 {
        bail!("{NAME}: chunk must be positive");
    }
    ensure_dims(NAME, "C", c, &[l, g, n])?;
    ensure_dims(NAME, "dt", dt, &[l, h])?;
    ensure_dims(NAME, "state", state, &[h, p, n])?;
    for (what, t) in [
        ("x", x),
        ("dt", dt),
        ("A", a),
        ("B", b),
        ("C", c),
        ("state", state),
    ] {
        ensure_dtype(NAME, what, t, &[DType::F32])?;
    }
    if a.elem_count() != h {
        bail!("{NAME}: A has shape {:?}, expected [{h}]", a.dims());
    }
    ensure_same_device(NAME, &[x, dt, a, b, c, state])?;
    let a = a.flatten_all()?;
    if l == 0 {
        return Ok((
            Tensor::zeros((0, h, p), DType::F32, x.device())?,
            state.copy()?,
        ));
    }
    #[cfg(feature = "cuda")]
    if x.device().is_cuda()
        && let Some(plan) = plan::ScanPlan::with_e(p, n, scan_e_override())
    {
        let (x, dt, b, c) = (
            unit_inner(x)?,
            unit_inner(dt)?,
            unit_inner(b)?,
            unit_inner(c)?,
        );
        let (a, state) = (a.contiguous()?, state.contiguous()?);
        let locked = Locked::new(&[&x, &dt, &a, &b, &c, &state]);
        return cuda::ssd_scan(&locked, plan, (l, h, p, g, n));
    }
    if x.device().is_cpu() {
        let (x, dt, b, c) = (
            x.contiguous()?,
            dt.contiguous()?,
            b.contiguous()?,
            c.contiguous()?,
        );
        let (a, state) = (a.contiguous()?, state.contiguous()?);
        let locked = Locked::new(&[&x, &dt, &a, &b, &c, &state]);
        let f32_of = |i| {
            let (s, l) = locked.get(i);
            cpu_f32(s, l)
        };
        let (y, new_state) = cpu::ssd_scan(
            f32_of(0)?,
            f32_of(1)?,
            f32_of(2)?,
            f32_of(3)?,
            f32_of(4)?,
            f32_of(5)?,
            (l, h, p, g, n),
        );
        return Ok((
            Tensor::from_vec(y, (l, h, p), &Device::Cpu)?,
            Tensor::from_vec(new_state, (h, p, n), &Device::Cpu)?,
        ));
    }
    // CUDA shapes the kernel does not cover: the chunked SSD in candle ops.
    crate::model::mamba2::ssd_chunked_for(x, b, c, dt, &a, state, chunk)
}

fn unsupported<T>(name: &str, dev: &Device) -> Result<T> {
    bail!(
        "{name}: no kernel for device {:?} in this build",
        dev.location()
    )
}

fn ensure_pool(name: &str, pool: &Tensor) -> Result<()> {
    ensure_dtype(name, "pool", pool, &[DType::F32])?;
    if !pool.is_contiguous() {
        bail!("{name}: the state pool must be contiguous");
    }
    Ok(())
}

fn pool_dims3(name: &str, pool: &Tensor) -> Result<(usize, usize, usize)> {
    ensure_pool(name, pool)?;
    match pool.dims() {
        &[s, k, c] => Ok((s, k, c)),
        d => bail!("{name}: pool has shape {d:?}, expected [slots, K-1, C]"),
    }
}

fn check_slots_tensor(name: &str, slots: &Tensor, b: usize) -> Result<()> {
    ensure_dims(name, "slots", slots, &[b])?;
    ensure_dtype(name, "slots", slots, &[DType::U32])
}

fn check_bias(name: &str, bias: Option<&Tensor>, c: usize) -> Result<()> {
    if let Some(bias) = bias {
        ensure_dims(name, "bias", bias, &[c])?;
        ensure_dtype(name, "bias", bias, &[DType::F32])?;
    }
    Ok(())
}

/// The output tensor an in-place op produces alongside its pool update.
#[derive(Default)]
struct Stash(Mutex<Option<Tensor>>);

impl Stash {
    fn set(&self, t: Tensor) -> Result<()> {
        *self
            .0
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned output lock"))? = Some(t);
        Ok(())
    }

    fn take(&self, name: &str) -> Result<Tensor> {
        self.0
            .lock()
            .map_err(|_| candle_core::Error::msg("poisoned output lock"))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::msg(format!("{name}: the kernel produced no output"))
            })
    }
}

/// [`conv1d_update`] as an in-place op on the conv pool.
/// `inputs`: xbc, slots, w, then bias when present.
struct ConvUpdateOp<'a> {
    inputs: Vec<&'a Tensor>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    num_slots: usize,
    out: Stash,
}

impl InplaceOp1 for ConvUpdateOp<'_> {
    fn name(&self) -> &'static str {
        "conv1d_update"
    }

    fn cpu_fwd(&self, pool: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let pool = cpu_f32_mut(pool, layout)?;
        let locked = Locked::new(&self.inputs);
        let (xs, xl) = locked.get(0);
        let (ss, sl) = locked.get(1);
        let (ws, wl) = locked.get(2);
        let bias = match locked.len() {
            4 => {
                let (bs, bl) = locked.get(3);
                Some(cpu_f32(bs, bl)?)
            }
            _ => None,
        };
        let xbc = cpu_rows_any(xs, xl)?;
        let (b, c) = (xl.dims()[0], xl.dims()[1]);
        let out = cpu::conv1d_update(pool, cpu_u32(ss, sl)?, xbc, cpu_f32(ws, wl)?, bias)?;
        self.out.set(Tensor::from_vec(out, (b, c), &Device::Cpu)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, pool: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        let locked = Locked::new(&self.inputs);
        let out = cuda::conv1d_update(pool, layout, &locked, self.num_slots)?;
        self.out.set(out)
    }
}

/// [`selective_state_update`] as an in-place op on the SSM pool.
/// `inputs`: x, B, C, dt_raw, dt_bias, A, D, slots.
struct SsmUpdateOp<'a> {
    inputs: Vec<&'a Tensor>,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    num_slots: usize,
    dims: cpu::SsmDims,
    dt_limit: (f32, f32),
    out: Stash,
}

impl InplaceOp1 for SsmUpdateOp<'_> {
    fn name(&self) -> &'static str {
        "selective_state_update"
    }

    fn cpu_fwd(&self, pool: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let pool = cpu_f32_mut(pool, layout)?;
        let locked = Locked::new(&self.inputs);
        let rows = |i: usize| {
            let (s, l) = locked.get(i);
            cpu_rows_f32(s, l)
        };
        let flat = |i: usize| {
            let (s, l) = locked.get(i);
            cpu_f32(s, l)
        };
        let (dts, dtl) = locked.get(3);
        let (ss, sl) = locked.get(7);
        let prm = cpu::SsmParams {
            dt_bias: flat(4)?,
            a: flat(5)?,
            d: flat(6)?,
            dt_limit: self.dt_limit,
        };
        let slots = cpu_u32(ss, sl)?;
        let y = cpu::selective_state_update(
            pool,
            slots,
            (rows(0)?, rows(1)?, rows(2)?),
            cpu_rows_any(dts, dtl)?,
            &prm,
            self.dims,
        )?;
        let shape = (slots.len(), self.dims.heads * self.dims.head_dim);
        self.out.set(Tensor::from_vec(y, shape, &Device::Cpu)?)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, pool: &mut candle_core::CudaStorage, layout: &Layout) -> Result<()> {
        let locked = Locked::new(&self.inputs);
        let y = cuda::selective_state_update(
            pool,
            layout,
            &locked,
            self.num_slots,
            self.dims,
            self.dt_limit,
        )?;
        self.out.set(y)
    }
}

#[cfg(test)]
mod tests;
