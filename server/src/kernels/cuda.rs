//! Launches of the CUDA kernels in `server/kernels/*.cu` (PTX compiled by `build.rs`,
//! JIT-loaded once per device) on candle's stream, so they order with candle's own ops.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, result,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor, bail};
use half::bf16;

use super::access::Locked;
use super::cpu::SsmDims;
use super::plan::{ScanPlan, UpdatePlan};

const CONV1D_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/conv1d.ptx"));
const SSM_UPDATE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ssm_update.ptx"));
const SSD_SCAN_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/ssd_scan.ptx"));
const GATED_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gated_norm.ptx"));
const ADD_RMS_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/add_rms_norm.ptx"));
const EPILOGUE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/epilogue.ptx"));
const SOFTMAX_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/softmax.ptx"));
const GEMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv.ptx"));

/// Conv widths the conv kernels are instantiated for (as in causal-conv1d).
pub(crate) const CONV_WIDTHS: std::ops::RangeInclusive<usize> = 2..=4;

fn cuda_storage(s: &Storage) -> Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => bail!("expected CUDA data"),
    }
}

/// The i-th locked tensor's data from its first element.
fn view<'a, T: CudaDType>(locked: &'a Locked<'_>, i: usize) -> Result<CudaView<'a, T>> {
    let (s, l) = locked.get(i);
    Ok(cuda_storage(s)?
        .as_cuda_slice::<T>()?
        .slice(l.start_offset()..))
}

/// Row stride of the i-th locked tensor (dimension 0).
fn row_stride(locked: &Locked<'_>, i: usize) -> i64 {
    locked.get(i).1.stride()[0] as i64
}

/// f32 or bf16 input data; picks the kernel variant.
enum AnyView<'a> {
    F32(CudaView<'a, f32>),
    BF16(CudaView<'a, bf16>),
}

impl<'a> AnyView<'a> {
    fn new(locked: &'a Locked<'_>, i: usize) -> Result<Self> {
        let (s, _) = locked.get(i);
        match s.dtype() {
            candle_core::DType::F32 => Ok(AnyView::F32(view(locked, i)?)),
            candle_core::DType::BF16 => Ok(AnyView::BF16(view(locked, i)?)),
            dt => bail!("no kernel for {dt:?} inputs"),
        }
    }

    fn suffix(&self) -> &'static str {
        match self {
            AnyView::F32(_) => "f32",
            AnyView::BF16(_) => "bf16",
        }
    }

    fn arg<'b, 'c: 'b>(&'c self, args: &mut LaunchArgs<'b>) {
        match self {
            AnyView::F32(v) => args.arg(v),
            AnyView::BF16(v) => args.arg(v),
        };
    }
}

fn int(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::msg(format!("{what} = {v} exceeds i32")))
}

/// A grid dimension: x may be up to 2^31 − 1, y and z up to 65535.
fn grid_dim(v: usize, axis: &str) -> Result<u32> {
    let max = if axis == "x" {
        i32::MAX as usize
    } else {
        65535
    };
    if v == 0 || v > max {
        bail!("grid {axis} dimension {v} out of range 1..={max}");
    }
    Ok(v as u32)
}

/// An f32 output buffer; NaN bytes first when poisoning is on.
fn alloc_out(dev: &CudaDevice, n: usize) -> Result<CudaSlice<f32>> {
    alloc_typed(dev, n)
}

/// An output buffer of n `T` (f32 or bf16, where all-ones bytes are a NaN); NaN first when
/// poisoning is on.
fn alloc_typed<T: CudaDType + DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: every element is written by the kernel that receives it (or poisoned below).
    let out = unsafe { dev.alloc::<T>(n) }?;
    if super::poison_outputs() {
        let stream = dev.cuda_stream();
        let (ptr, _sync) = out.device_ptr(&stream);
        let bytes = n * std::mem::size_of::<T>();
        // SAFETY: `ptr` is a live allocation of `bytes` on this stream.
        unsafe { result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.w()?;
    }
    Ok(out)
}

fn wrap<T: CudaDType>(dev: &CudaDevice, s: CudaSlice<T>, shape: impl Into<Shape>) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}

fn cfg(grid: (u32, u32, u32), threads: u32, smem: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: grid,
        block_dim: (threads, 1, 1),
        shared_mem_bytes: smem,
    }
}

/// `locked`: xbc [B, C], slots [B], w [K, C], then bias [C] when present.
pub(crate) fn conv1d_update(
    pool: &mut CudaStorage,
    pool_l: &Layout,
    locked: &Locked<'_>,
    num_slots: usize,
) -> Result<Tensor> {
    const THREADS: usize = 256;
    let dev = pool.device.clone();
    let (b, c) = (locked.get(0).1.dims()[0], locked.get(0).1.dims()[1]);
    let k = locked.get(2).1.dims()[0];
    if !CONV_WIDTHS.contains(&k) {
        bail!("conv1d_update: the CUDA kernel supports K in {CONV_WIDTHS:?}, got {k}");
    }
    let (o1, o2) = pool_l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("conv1d_update: pool is not contiguous"))?;
    let xbc = AnyView::new(locked, 0)?;
    let slots = view::<u32>(locked, 1)?;
    let w = view::<f32>(locked, 2)?;
    let bias = (locked.len() > 3)
        .then(|| view::<f32>(locked, 3))
        .transpose()?;
    let f = dev.get_or_load_custom_func(
        &format!("conv1d_update_k{k}_{}", xbc.suffix()),
        "vlm_conv1d",
        CONV1D_PTX,
    )?;
    let mut out = alloc_out(&dev, b * c)?;
    {
        let mut pool_v = pool.as_cuda_slice_mut::<f32>()?.slice_mut(o1..o2);
        let (ns, xs, ci, null) = (
            u32::try_from(num_slots).map_err(candle_core::Error::wrap)?,
            row_stride(locked, 0),
            int(c, "C")?,
            0u64,
        );
        let mut args = f.builder();
        args.arg(&mut pool_v).arg(&ns).arg(&slots);
        xbc.arg(&mut args);
        args.arg(&xs).arg(&w);
        match &bias {
            Some(bv) => args.arg(bv),
            None => args.arg(&null),
        };
        args.arg(&mut out).arg(&ci);
        let grid = (grid_dim(c.div_ceil(THREADS), "x")?, grid_dim(b, "y")?, 1);
        // SAFETY: argument list matches `conv1d_update_k*` in conv1d.cu; sizes checked by the
        // caller (xbc [B, C] rows, w [K, C], bias [C], pool [slots, K-1, C]).
        unsafe { args.launch(cfg(grid, THREADS as u32, 0)) }.w()?;
    }
    Ok(wrap(&dev, out, (b, c)))
}

/// `locked`: x, B, C, dt_raw, dt_bias, A, D, slots (see `kernels::selective_state_update`).
pub(crate) fn selective_state_update(
    pool: &mut CudaStorage,
    pool_l: &Layout,
    locked: &Locked<'_>,
    num_slots: usize,
    dm: SsmDims,
    dt_limit: (f32, f32),
) -> Result<Tensor> {
    const WARPS: usize = 4;
    const ROWS: usize = 4;
    let dev = pool.device.clone();
    let (h, p, n, g) = (dm.heads, dm.head_dim, dm.state, dm.groups);
    let bsz = locked.get(0).1.dims()[0];
    let (o1, o2) = pool_l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::msg("selective_state_update: pool not contiguous"))?;
    let Some(plan) = UpdatePlan::new(n, o1) else {
        bail!("selective_state_update: the CUDA kernel supports N <= 512, got {n}");
    };
    let dt_raw = AnyView::new(locked, 3)?;
    let f = dev.get_or_load_custom_func(
        &format!("ssm_update_v{}_n{}_{}", plan.v, plan.ni, dt_raw.suffix()),
        "vlm_ssm_update",
        SSM_UPDATE_PTX,
    )?;
    let (x, bm, cm) = (
        view::<f32>(locked, 0)?,
        view::<f32>(locked, 1)?,
        view::<f32>(locked, 2)?,
    );
    let (dt_bias, a, d) = (
        view::<f32>(locked, 4)?,
        view::<f32>(locked, 5)?,
        view::<f32>(locked, 6)?,
    );
    let slots = view::<u32>(locked, 7)?;
    let mut y = alloc_out(&dev, bsz * h * p)?;
    {
        let mut pool_v = pool.as_cuda_slice_mut::<f32>()?.slice_mut(o1..o2);
        let ns = u32::try_from(num_slots).map_err(candle_core::Error::wrap)?;
        let (xs, bs, cs, dts) = (
            row_stride(locked, 0),
            row_stride(locked, 1),
            row_stride(locked, 2),
            row_stride(locked, 3),
        );
        let (hi, pi, nn, gi) = (int(h, "H")?, int(p, "P")?, int(n, "N")?, int(g, "G")?);
        let mut args = f.builder();
        args.arg(&mut pool_v).arg(&ns).arg(&slots);
        args.arg(&x).arg(&xs).arg(&bm).arg(&bs).arg(&cm).arg(&cs);
        dt_raw.arg(&mut args);
        args.arg(&dts).arg(&dt_bias).arg(&a).arg(&d);
        args.arg(&dt_limit.0).arg(&dt_limit.1).arg(&mut y);
        args.arg(&hi).arg(&pi).arg(&nn).arg(&gi);
        let grid = (
            grid_dim(p.div_ceil(WARPS * ROWS), "x")?,
            grid_dim(h, "y")?,
            grid_dim(bsz, "z")?,
        );
        // SAFETY: argument list matches `ssm_update_v*_n*` in ssm_update.cu; shapes checked by
        // the caller; NI * 32 * V >= N (UpdatePlan).
        unsafe { args.launch(cfg(grid, (32 * WARPS) as u32, 0)) }.w()?;
    }
    Ok(wrap(&dev, y, (bsz, h * p)))
}

/// `locked`: y [T, D], z [T, D], w [D].
pub(crate) fn gated_rms_norm(
    locked: &Locked<'_>,
    (t, dm): (usize, usize),
    group_size: usize,
    eps: f32,
) -> Result<Tensor> {
    const THREADS: u32 = 256;
    let y = view::<f32>(locked, 0)?;
    let z = AnyView::new(locked, 1)?;
    let w = view::<f32>(locked, 2)?;
    let dev = cuda_storage(locked.get(0).0)?.device.clone();
    let f = dev.get_or_load_custom_func(
        &format!("gated_norm_{}", z.suffix()),
        "vlm_gated_norm",
        GATED_NORM_PTX,
    )?;
    let mut out = alloc_out(&dev, t * dm)?;
    {
        let (ys, zs) = (row_stride(locked, 0), row_stride(locked, 1));
        let (di, gs) = (int(dm, "D")?, int(group_size, "group size")?);
        let mut args = f.builder();
        args.arg(&y).arg(&ys);
        z.arg(&mut args);
        args.arg(&zs)
            .arg(&w)
            .arg(&mut out)
            .arg(&di)
            .arg(&gs)
            .arg(&eps);
        let grid = (grid_dim(dm / group_size, "x")?, grid_dim(t, "y")?, 1);
        // SAFETY: argument list matches `gated_norm_*` in gated_norm.cu; shapes checked.
        unsafe { args.launch(cfg(grid, THREADS, 0)) }.w()?;
    }
    Ok(wrap(&dev, out, (t, dm)))
}

/// For kernels with one dtype throughout: `f::<f32>(args…, "f32")` or the BF16 twin, by the
/// dtype of the first locked tensor (the suffix names the kernel variant).
macro_rules! by_dtype {
    ($locked:expr, $f:ident($($arg:expr),*)) => {
        match $locked.get(0).0.dtype() {
            DType::F32 => $f::<f32>($($arg,)* "f32"),
            DType::BF16 => $f::<bf16>($($arg,)* "bf16"),
            dt => bail!("{}: no kernel for {dt:?}", stringify!($f)),
        }
    };
}

/// `locked`: x [T, D], w [D], then delta [T, D] when present; contiguous, one dtype.
pub(crate) fn add_rms_norm(
    locked: &Locked<'_>,
    (t, dm): (usize, usize),
    eps: f32,
) -> Result<(Tensor, Tensor)> {
    by_dtype!(locked, add_rms_norm_typed(locked, (t, dm), eps))
}

fn add_rms_norm_typed<T: CudaDType + DeviceRepr>(
    locked: &Locked<'_>,
    (t, dm): (usize, usize),
    eps: f32,
    suffix: &str,
) -> Result<(Tensor, Tensor)> {
    const THREADS: u32 = 1024; // as in add_rms_norm.cu
    let x = view::<T>(locked, 0)?;
    let w = view::<T>(locked, 1)?;
    let delta = (locked.len() > 2)
        .then(|| view::<T>(locked, 2))
        .transpose()?;
    let dev = cuda_storage(locked.get(0).0)?.device.clone();
    let f = dev.get_or_load_custom_func(
        &format!("add_rms_norm_{suffix}"),
        "vlm_add_rms_norm",
        ADD_RMS_NORM_PTX,
    )?;
    let mut x_out = alloc_typed::<T>(&dev, t * dm)?;
    let mut h = alloc_typed::<T>(&dev, t * dm)?;
    {
        let (di, null) = (int(dm, "D")?, 0u64);
        let mut args = f.builder();
        args.arg(&x);
        match &delta {
            Some(d) => args.arg(d),
            None => args.arg(&null),
        };
        args.arg(&w).arg(&mut x_out).arg(&mut h).arg(&di).arg(&eps);
        // SAFETY: argument list matches `add_rms_norm_*` in add_rms_norm.cu; shapes checked.
        unsafe { args.launch(cfg((grid_dim(t, "x")?, 1, 1), THREADS, 0)) }.w()?;
    }
    Ok((wrap(&dev, x_out, (t, dm)), wrap(&dev, h, (t, dm))))
}

/// `locked`: x [M, K], w [N, K], both contiguous BF16; K % 8 == 0, 1 <= M <= 4.
pub(crate) fn gemv(locked: &Locked<'_>, (m, n, k): (usize, usize, usize)) -> Result<Tensor> {
    const WARPS: usize = 8; // as in gemv.cu
    const ROWS: usize = 2;
    let x = view::<bf16>(locked, 0)?;
    let w = view::<bf16>(locked, 1)?;
    // 16-byte loads: the rows must start on 16-byte boundaries (allocations are 256-aligned).
    let aligned = |i: usize| locked.get(i).1.start_offset().is_multiple_of(8);
    if !aligned(0) || !aligned(1) {
        bail!("gemv: x or w does not start on a 16-byte boundary");
    }
    let dev = cuda_storage(locked.get(0).0)?.device.clone();
    let f = dev.get_or_load_custom_func(&format!("gemv_bf16_m{m}"), "vlm_gemv", GEMV_PTX)?;
    let mut y = alloc_typed::<bf16>(&dev, m * n)?;
    {
        let (ni, ki) = (int(n, "N")?, int(k, "K")?);
        let mut args = f.builder();
        args.arg(&x).arg(&w).arg(&mut y).arg(&ni).arg(&ki);
        let grid = (grid_dim(n.div_ceil(WARPS * ROWS), "x")?, 1, 1);
        // SAFETY: argument list matches `gemv_bf16_m*` in gemv.cu; shapes and alignment checked.
        unsafe { args.launch(cfg(grid, (WARPS * 32) as u32, 0)) }.w()?;
    }
    Ok(wrap(&dev, y, (m, n)))
}

/// `locked`: y [R, N], then bias [N] when `has_bias`, then residual [R, N] when present;
/// contiguous, one dtype. `act`: 0 identity, 1 ReLU², 2 GELU (epilogue.cu).
pub(crate) fn bias_act(
    locked: &Locked<'_>,
    (r, n): (usize, usize),
    has_bias: bool,
    act: i32,
) -> Result<Tensor> {
    by_dtype!(locked, bias_act_typed(locked, (r, n), has_bias, act))
}

fn bias_act_typed<T: CudaDType + DeviceRepr>(
    locked: &Locked<'_>,
    (r, n): (usize, usize),
    has_bias: bool,
    act: i32,
    suffix: &str,
) -> Result<Tensor> {
    const THREADS: usize = 256; // as in epilogue.cu, two columns per thread
    let y = view::<T>(locked, 0)?;
    let bias = has_bias.then(|| view::<T>(locked, 1)).transpose()?;
    let res_at = 1 + has_bias as usize;
    let residual = (locked.len() > res_at)
        .then(|| view::<T>(locked, res_at))
        .transpose()?;
    let dev = cuda_storage(locked.get(0).0)?.device.clone();
    let f =
        dev.get_or_load_custom_func(&format!("bias_act_{suffix}"), "vlm_epilogue", EPILOGUE_PTX)?;
    let mut out = alloc_typed::<T>(&dev, r * n)?;
    {
        let (ri, ni, null) = (int(r, "R")?, int(n, "N")?, 0u64);
        let mut args = f.builder();
        args.arg(&y);
        match &bias {
            Some(b) => args.arg(b),
            None => args.arg(&null),
        };
        match &residual {
            Some(res) => args.arg(res),
            None => args.arg(&null),
        };
        args.arg(&mut out).arg(&ri).arg(&ni).arg(&act);
        let grid = (
            grid_dim(n.div_ceil(2 * THREADS), "x")?,
            grid_dim(r.min(65535), "y")?,
            1,
        );
        // SAFETY: argument list matches `bias_act_*` in epilogue.cu; shapes checked.
        unsafe { args.launch(cfg(grid, THREADS as u32, 0)) }.w()?;
    }
    Ok(wrap(&dev, out, (r, n)))
}

/// `locked`: scores [R, L], contiguous. `(len, offset, causal)` as in softmax.cu.
pub(crate) fn scaled_softmax(
    locked: &Locked<'_>,
    (r, l): (usize, usize),
    scale: f32,
    causal: (usize, usize, bool),
) -> Result<Tensor> {
    by_dtype!(locked, scaled_softmax_typed(locked, (r, l), scale, causal))
}

fn scaled_softmax_typed<T: CudaDType + DeviceRepr>(
    locked: &Locked<'_>,
    (r, l): (usize, usize),
    scale: f32,
    (len, offset, causal): (usize, usize, bool),
    suffix: &str,
) -> Result<Tensor> {
    const THREADS: u32 = 256; // as in softmax.cu
    let s = view::<T>(locked, 0)?;
    let dev = cuda_storage(locked.get(0).0)?.device.clone();
    let f = dev.get_or_load_custom_func(
        &format!("scaled_softmax_{suffix}"),
        "vlm_softmax",
        SOFTMAX_PTX,
    )?;
    let mut p = alloc_typed::<T>(&dev, r * l)?;
    {
        let (ri, li) = (int(r, "R")?, int(l, "L")?);
        let (leni, offi, causali) = (int(len, "len")?, int(offset, "offset")?, causal as i32);
        let mut args = f.builder();
        args.arg(&s)
            .arg(&mut p)
            .arg(&ri)
            .arg(&li)
            .arg(&scale)
            .arg(&leni)
            .arg(&offi)
            .arg(&causali);
        // SAFETY: argument list matches `scaled_softmax_*` in softmax.cu; shapes checked.
        unsafe { args.launch(cfg((grid_dim(r.min(65535), "x")?, 1, 1), THREADS, 0)) }.w()?;
    }
    Ok(wrap(&dev, p, (r, l)))
}

/// `locked`: x [L, C], state [K-1, C], w [K, C], then bias [C] when present.
pub(crate) fn conv1d_prefill(
    locked: &Locked<'_>,
    l: usize,
    c: usize,
    k: usize,
) -> Result<(Tensor, Tensor)> {
    const THREADS: usize = 256;
    const TILE: usize = 32; // tokens per thread, as in conv1d.cu
    let x = AnyView::new(locked, 0)?;
    let state = view::<f32>(locked, 1)?;
    let w = view::<f32>(locked, 2)?;
    let bias = (locked.len() > 3)
        .then(|| view::<f32>(locked, 3))
        .transpose()?;
    let dev = cuda_storage(locked.get(0).0)?.device.clone();
    let f = dev.get_or_load_custom_func(
        &format!("conv1d_prefill_k{k}_{}", x.suffix()),
        "vlm_conv1d",
        CONV1D_PTX,
    )?;
    let mut out = alloc_out(&dev, l * c)?;
    let mut new_state = alloc_out(&dev, (k - 1) * c)?;
    {
        let (xs, li, ci, null) = (row_stride(locked, 0), int(l, "L")?, int(c, "C")?, 0u64);
        let mut args = f.builder();
        x.arg(&mut args);
        args.arg(&xs).arg(&state).arg(&w);
        match &bias {
            Some(bv) => args.arg(bv),
            None => args.arg(&null),
        };
        args.arg(&mut out).arg(&mut new_state).arg(&li).arg(&ci);
        let grid = (
            grid_dim(c.div_ceil(THREADS), "x")?,
            grid_dim(l.div_ceil(TILE), "y")?,
            1,
        );
        // SAFETY: argument list matches `conv1d_prefill_k*` in conv1d.cu; shapes checked.
        unsafe { args.launch(cfg(grid, THREADS as u32, 0)) }.w()?;
    }
    Ok((wrap(&dev, out, (l, c)), wrap(&dev, new_state, (k - 1, c))))
}

/// `locked`: x [L, H, P], dt [L, H], A [H], B [L, G, N], C [L, G, N], state [H, P, N].
pub(crate) fn ssd_scan(
    locked: &Locked<'_>,
    plan: ScanPlan,
    (l, h, p, g, n): (usize, usize, usize, usize, usize),
) -> Result<(Tensor, Tensor)> {
    let x = view::<f32>(locked, 0)?;
    let dt = view::<f32>(locked, 1)?;
    let a = view::<f32>(locked, 2)?;
    let (bm, cm) = (view::<f32>(locked, 3)?, view::<f32>(locked, 4)?);
    let state = view::<f32>(locked, 5)?;
    let dev = cuda_storage(locked.get(0).0)?.device.clone();
    let f = dev.get_or_load_custom_func(
        &format!("ssd_scan_e{}", plan.e),
        "vlm_ssd_scan",
        SSD_SCAN_PTX,
    )?;
    let mut y = alloc_out(&dev, l * h * p)?;
    let mut state_out = alloc_out(&dev, h * p * n)?;
    {
        let st = |i: usize, d: usize| locked.get(i).1.stride()[d] as i64;
        let (xs0, xs1, dts0) = (st(0, 0), st(0, 1), st(1, 0));
        let (bs0, bs1, cs0, cs1) = (st(3, 0), st(3, 1), st(4, 0), st(4, 1));
        let dims = [
            int(l, "L")?,
            int(h, "H")?,
            int(p, "P")?,
            int(n, "N")?,
            int(g, "G")?,
            int(plan.r, "R")?,
            int(plan.tch, "TCH")?,
        ];
        let mut args = f.builder();
        args.arg(&x).arg(&xs0).arg(&xs1).arg(&dt).arg(&dts0).arg(&a);
        args.arg(&bm)
            .arg(&bs0)
            .arg(&bs1)
            .arg(&cm)
            .arg(&cs0)
            .arg(&cs1);
        args.arg(&state).arg(&mut y).arg(&mut state_out);
        for v in &dims {
            args.arg(v);
        }
        let smem = plan.smem_bytes();
        let grid = (grid_dim(p / plan.r, "x")?, grid_dim(h, "y")?, 1);
        // SAFETY: argument list matches `ssd_scan_e*` in ssd_scan.cu; blockDim = R * S with S
        // = N / E, shared memory sized as the kernel lays it out (<= 48 KiB).
        unsafe { args.launch(cfg(grid, (plan.r * plan.s) as u32, smem as u32)) }.w()?;
    }
    Ok((wrap(&dev, y, (l, h, p)), wrap(&dev, state_out, (h, p, n))))
}
