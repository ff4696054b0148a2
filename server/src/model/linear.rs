//! Linear layer (`y = x Wᵀ + b`) with a CPU path that keeps BF16 weights and fuses the
//! epilogue.
//!
//! On CPU the model computes in f32 (candle has no BF16 CPU matmul), but the checkpoint is
//! BF16, so every f32 weight is exactly a BF16 value. When that holds the layer keeps only
//! the BF16 copy (half the memory of f32) and computes with f32 accumulation:
//! - few rows (decode): a BF16-weight × f32-activation matrix-vector product that streams
//!   the weight once (memory-bound: half the bytes of f32);
//! - many rows (prefill, vision): blocks of weight rows are widened to f32 (exact) into a
//!   reused scratch and multiplied with `gemm`.
//!
//! In the BF16 mode ([`CpuMatmul::Bf16`]) on a CPU with AVX-512 BF16, the weight is instead
//! packed once for [`bf16_gemm`] and the activations are rounded to BF16 at every size; a
//! layer whose output only feeds another one can write it in BF16 directly
//! ([`Linear::forward_act_bf16_out`]).
//!
//! The products are the same as with f32 weights; only the summation order differs. Bias,
//! activation (ReLU², exact-erf GELU) or a residual add are applied in the same call instead
//! of as separate tensor ops. `VLM_CPU_BF16_WEIGHTS=0` keeps f32 weights; debug builds keep
//! them unless it is `1` (the unoptimized kernels would only slow the tests down).

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use candle_core::{CpuStorage, D, DType, Module, Result, Shape, Storage, Tensor};
use candle_nn::VarBuilder;
use half::bf16;

use super::bf16_gemm::{self, PackedA, PackedB};
use super::bf16_tiles;
pub use super::cpu_math::Activation;
use super::cpu_math::{bf16_to_f32, bias_act_rows};
use crate::kernels;

/// Rows that go through the BF16 register tiles (AVX-512) when the CPU has them. A single
/// row is bound by memory, where the matrix-vector path below streams the weights faster.
const TILES_MIN_ROWS: usize = 2;
const TILES_MAX_ROWS: usize = 64;
/// Else up to this many rows go through the BF16 matrix-vector path.
const GEMV_MAX_ROWS: usize = 16;
/// Activation rows the matrix-vector kernel handles per pass over a weight row.
const GEMV_GROUP: usize = 4;
/// Most weights widened to f32 at a time per thread on the gemm path (1 MiB: L2-sized).
const WIDEN_FLOATS: usize = 1 << 18;

/// Precision of the activations in CPU matmuls whose weights are BF16 (a BF16 checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuMatmul {
    /// Activations stay f32: the products of f32 weights. The golden tests' mode.
    #[default]
    F32,
    /// Activations are rounded to BF16 first, as a BF16 GPU GEMM rounds its inputs; the
    /// BF16 × BF16 products are exact in f32 and summed in f32. On CPUs with AVX-512 BF16
    /// this runs twice the multiply-adds per instruction of f32.
    Bf16,
}

impl CpuMatmul {
    /// The mode of the layers this thread builds: its own ([`CpuMatmul::set_for_thread`]),
    /// else `VLM_CPU_MATMUL` (`f32`, `bf16` or `auto`), else f32.
    pub fn current() -> CpuMatmul {
        THREAD_MODE
            .get()
            .unwrap_or_else(|| match std::env::var("VLM_CPU_MATMUL").as_deref() {
                Ok("bf16") => CpuMatmul::Bf16,
                Ok("auto") => CpuMatmul::auto(),
                _ => CpuMatmul::F32,
            })
    }

    /// Use `mode` for the layers this thread builds from now on (the engine sets it on its
    /// model thread before loading; a test on its own thread).
    pub fn set_for_thread(mode: CpuMatmul) {
        THREAD_MODE.set(Some(mode));
    }

    /// BF16 where this CPU has the BF16 dot-product instructions, else f32.
    pub fn auto() -> CpuMatmul {
        if Self::bf16_native() {
            CpuMatmul::Bf16
        } else {
            CpuMatmul::F32
        }
    }

    /// Whether this CPU has the BF16 dot-product instructions (else BF16 mode rounds the
    /// activations and multiplies on the f32 paths: the same products, slower).
    pub fn bf16_native() -> bool {
        bf16_gemm::available()
    }
}

thread_local! {
    /// This thread's [`CpuMatmul`], when set.
    static THREAD_MODE: Cell<Option<CpuMatmul>> = const { Cell::new(None) };
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
    /// The CPU matmul mode of the thread that built the layer (the model's loader), kept
    /// here because the forward pass runs on candle's worker threads.
    matmul: CpuMatmul,
}

#[derive(Debug, Clone)]
enum Weight {
    /// [out, in]: the model dtype, or BF16 on CPU when the f32 weight is exactly BF16.
    Tensor(Tensor),
    /// BF16 weights in BF16 mode on a CPU with the BF16 dot products: packed once for
    /// [`bf16_gemm`] (the [out, in] tensor is dropped, so the memory stays one copy).
    Packed(Arc<PackedB>),
}

/// What happens to `x Wᵀ + b` before it is returned.
#[derive(Clone, Copy)]
enum Epilogue<'a> {
    Act(Activation),
    /// `residual + x Wᵀ + b`.
    Add(&'a Tensor),
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        let weight = load_compact(&vb, "weight", Some((out_dim, in_dim).into()))?;
        Self::build(weight, bias)
    }

    /// Wrap an existing weight (e.g. tied embeddings), [out, in].
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_weight_with(weight, bias, bf16_weights_enabled())
    }

    fn from_weight_with(weight: Tensor, bias: Option<Tensor>, bf16_ok: bool) -> Result<Self> {
        let weight = match bf16_ok {
            true => exact_bf16(&weight)?.unwrap_or(weight),
            false => weight,
        };
        Self::build(weight, bias)
    }

    /// The layer in the current thread's [`CpuMatmul`] mode, packing BF16 CPU weights when
    /// that mode runs on [`bf16_gemm`].
    fn build(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let matmul = CpuMatmul::current();
        let packable = matmul == CpuMatmul::Bf16
            && bf16_gemm::available()
            && weight.device().is_cpu()
            && weight.dtype() == DType::BF16
            && weight.rank() == 2;
        let weight = if packable {
            let (n, k) = weight.dims2()?;
            let w = weight.contiguous()?;
            let (s, l) = w.storage_and_layout();
            let Storage::Cpu(CpuStorage::BF16(v)) = &*s else {
                candle_core::bail!("linear: BF16 weight without BF16 CPU storage");
            };
            let packed = PackedB::from_weight_rows(&v[l.start_offset()..][..n * k], n, k);
            Weight::Packed(Arc::new(packed))
        } else {
            Weight::Tensor(weight)
        };
        Ok(Linear {
            weight,
            bias,
            matmul,
        })
    }

    /// [out, in].
    fn dims(&self) -> Result<(usize, usize)> {
        match &self.weight {
            Weight::Tensor(w) => w.dims2(),
            Weight::Packed(p) => Ok((p.n(), p.k())),
        }
    }

    /// `act(x Wᵀ + b)`; `x`: [..., in] -> [..., out].
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        self.run(x, Epilogue::Act(act))
    }

    /// [`Linear::forward_act`] for a layer whose output only feeds another linear layer:
    /// with packed BF16 weights the output is BF16, rounded as the next layer would round
    /// it (the same products, half the bytes written, no rounding pass there). Otherwise
    /// the same f32 output as `forward_act`.
    pub fn forward_act_bf16_out(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        match &self.weight {
            Weight::Packed(p) => self.forward_packed(p, x, Epilogue::Act(act), true),
            Weight::Tensor(_) => self.forward_act(x, act),
        }
    }

    /// `residual + x Wᵀ + b` (the residual has the output's shape).
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.run(x, Epilogue::Add(residual))
    }

    fn run(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let weight = match &self.weight {
            Weight::Packed(p) => return self.forward_packed(p, x, epilogue, false),
            Weight::Tensor(w) => w,
        };
        if self.cpu_path_applies(weight, x, epilogue) {
            return self.forward_cpu(x, epilogue);
        }
        let w = weight.to_dtype(x.dtype())?;
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        let decode = x.device().is_cuda() && rows == 1;
        let x2 = decode.then(|| x.reshape((rows, ()))).transpose()?;
        let y = match x2 {
            // Decode: a weight-streaming kernel instead of cuBLAS (see kernels::gemv).
            Some(x2) if kernels::gemv_applies(&x2, &w) => {
                let mut dims = x.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = w.dim(0)?;
                }
                kernels::gemv(&x2, &w)?.reshape(dims)?
            }
            _ => match x.dims() {
                [b, t, _] => x
                    .reshape((b * t, ()))?
                    .matmul(&w.t()?)?
                    .reshape((*b, *t, ()))?,
                _ => x.broadcast_matmul(&w.t()?)?,
            },
        };
        let plain = self.bias.is_none() && matches!(epilogue, Epilogue::Act(Activation::Identity));
        if y.device().is_cuda() && kernels::fused_enabled() && !plain {
            // One pass over the output instead of one per op (candle's broadcast add alone
            // ran at a fifth of the memory bandwidth on the vision encoder's activations).
            let (act, residual) = match epilogue {
                Epilogue::Act(a) => (a, None),
                Epilogue::Add(r) => (
                    Activation::Identity,
                    Some(r.reshape(((), r.dim(D::Minus1)?))?),
                ),
            };
            let n = y.dim(D::Minus1)?;
            let out = kernels::bias_act(
                &y.reshape(((), n))?,
                self.bias.as_ref(),
                act,
                residual.as_ref(),
            )?;
            return out.reshape(y.shape());
        }
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match epilogue {
            Epilogue::Act(Activation::Identity) => Ok(y),
            Epilogue::Act(Activation::Relu2) => y.relu()?.sqr(),
            Epilogue::Act(Activation::GeluErf) => y.gelu_erf(),
            Epilogue::Add(r) => r + y,
        }
    }

    fn cpu_path_applies(&self, weight: &Tensor, x: &Tensor, epilogue: Epilogue) -> bool {
        let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
        f32_cpu(x)
            && weight.device().is_cpu()
            && matches!(weight.dtype(), DType::F32 | DType::BF16)
            && self.bias.as_ref().is_none_or(f32_cpu)
            && match epilogue {
                Epilogue::Add(r) => f32_cpu(r),
                Epilogue::Act(_) => true,
            }
    }

    /// The output dims `[..., n]` and the row count of an input `[..., k]`.
    fn out_dims(&self, x: &Tensor) -> Result<(Vec<usize>, usize)> {
        let (n, k) = self.dims()?;
        let (&kx, lead) = x
            .dims()
            .split_last()
            .ok_or_else(|| candle_core::Error::Msg("linear: scalar input".into()))?;
        if kx != k {
            candle_core::bail!("linear: input width {kx} does not match weight [{n}, {k}]");
        }
        let mut out_dims = lead.to_vec();
        out_dims.push(n);
        Ok((out_dims, lead.iter().product()))
    }

    /// The packed BF16 kernel: `x` f32 (rounded here) or BF16 on CPU; the output f32, or
    /// BF16 with `bf16_out`.
    fn forward_packed(
        &self,
        p: &PackedB,
        x: &Tensor,
        epilogue: Epilogue,
        bf16_out: bool,
    ) -> Result<Tensor> {
        let (out_dims, m) = self.out_dims(x)?;
        let (n, k) = (p.n(), p.k());
        if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::BF16) {
            return self.forward_packed(p, &x.to_dtype(DType::F32)?, epilogue, bf16_out);
        }
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32)?.contiguous();
        let (act, residual) = match epilogue {
            Epilogue::Act(a) => (a, None),
            Epilogue::Add(r) => {
                if r.dims() != out_dims.as_slice() {
                    candle_core::bail!("linear: residual {:?} is not {out_dims:?}", r.dims());
                }
                (Activation::Identity, Some(f32_of(r)?))
            }
        };
        let bias = self.bias.as_ref().map(f32_of).transpose()?;
        let x = x.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let a = match &*xs {
            Storage::Cpu(CpuStorage::F32(v)) => {
                PackedA::from_f32(&v[xl.start_offset()..][..m * k], k, m, k, true)
            }
            Storage::Cpu(CpuStorage::BF16(v)) => {
                PackedA::from_bf16(&v[xl.start_offset()..][..m * k], m, k)
            }
            _ => candle_core::bail!("linear: expected CPU f32 or bf16 input"),
        };
        let bias_guard = bias.as_ref().map(|b| b.storage_and_layout());
        let res_guard = residual.as_ref().map(|r| r.storage_and_layout());
        let epilogue = bf16_gemm::Epilogue {
            bias: match &bias_guard {
                Some((bs, bl)) => Some(&cpu_f32(bs)?[bl.start_offset()..][..n]),
                None => None,
            },
            act,
            residual: match &res_guard {
                Some((rs, rl)) => Some(&cpu_f32(rs)?[rl.start_offset()..][..m * n]),
                None => None,
            },
        };
        if bf16_out {
            let out: Vec<bf16> = bf16_gemm::matmul(&a, p, epilogue);
            Tensor::from_vec(out, out_dims, x.device())
        } else {
            let out: Vec<f32> = bf16_gemm::matmul(&a, p, epilogue);
            Tensor::from_vec(out, out_dims, x.device())
        }
    }

    fn forward_cpu(&self, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
        let (n, k) = self.dims()?;
        let (out_dims, m) = self.out_dims(x)?;
        // The residual, which the products are added to.
        let residual = match epilogue {
            Epilogue::Add(r) => {
                if r.dims() != out_dims.as_slice() {
                    candle_core::bail!("linear: residual {:?} is not {out_dims:?}", r.dims());
                }
                Some(r.contiguous()?)
            }
            Epilogue::Act(_) => None,
        };
        let x = x.contiguous()?;
        let out = {
            let (xs, xl) = x.storage_and_layout();
            let xv = &cpu_f32(&xs)?[xl.start_offset()..][..m * k];
            let act = match epilogue {
                Epilogue::Act(a) => a,
                Epilogue::Add(_) => Activation::Identity,
            };
            let bias = self.bias.as_ref().map(|b| b.contiguous()).transpose()?;
            let guard = bias.as_ref().map(|b| b.storage_and_layout());
            let bv = match &guard {
                Some((bs, bl)) => Some(&cpu_f32(bs)?[bl.start_offset()..][..n]),
                None => None,
            };
            match &self.weight {
                Weight::Packed(_) => {
                    candle_core::bail!("linear: packed weights take forward_packed")
                }
                Weight::Tensor(weight) => {
                    if !weight.is_contiguous() {
                        candle_core::bail!("linear: weight is not contiguous");
                    }
                    let (ws, wl) = weight.storage_and_layout();
                    let off = wl.start_offset();
                    let w = match &*ws {
                        Storage::Cpu(CpuStorage::F32(v)) => Weights::F32(&v[off..off + n * k]),
                        Storage::Cpu(CpuStorage::BF16(v)) => Weights::Bf16(&v[off..off + n * k]),
                        _ => candle_core::bail!("linear: weight is not a CPU f32/bf16 tensor"),
                    };
                    let accumulate = residual.is_some();
                    let mut out = match residual {
                        Some(r) => r.flatten_all()?.to_vec1::<f32>()?,
                        None => vec![0f32; m * n],
                    };
                    linear_into(xv, m, k, w, n, bv, act, &mut out, accumulate, self.matmul);
                    out
                }
            }
        };
        Tensor::from_vec(out, out_dims, x.device())
    }
}

impl Module for Linear {
    /// `x`: [..., in] -> [..., out].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }
}

/// Loads `name` (shape-checked when `shape` is given) in the VarBuilder's dtype, except on
/// CPU in f32 with BF16 weights enabled, where a tensor whose values are all exactly BF16
/// (a BF16 checkpoint) is returned as BF16: half the memory, same values.
pub(crate) fn load_compact(vb: &VarBuilder, name: &str, shape: Option<Shape>) -> Result<Tensor> {
    let get = |dtype: DType| match &shape {
        Some(s) => vb.get_with_hints_dtype(s.clone(), name, Default::default(), dtype),
        None => vb.get_unchecked_dtype(name, dtype),
    };
    if !(vb.device().is_cpu() && vb.dtype() == DType::F32 && bf16_weights_enabled()) {
        return get(vb.dtype());
    }
    // The kept BF16 copy is loaded first, the f32 one only to check it: allocated last and
    // freed first, it leaves no hole under the weights that stay.
    let wb = get(DType::BF16)?;
    let w = get(DType::F32)?;
    Ok(if same_values(&w, &wb)? { wb } else { w })
}

fn bf16_weights_enabled() -> bool {
    match std::env::var("VLM_CPU_BF16_WEIGHTS") {
        Ok(v) => v != "0",
        Err(_) => !cfg!(debug_assertions),
    }
}

/// The BF16 copy of a CPU f32 weight whose values are all exactly BF16 (low 16 bits zero),
/// else None.
fn exact_bf16(w: &Tensor) -> Result<Option<Tensor>> {
    if !w.device().is_cpu() || w.dtype() != DType::F32 {
        return Ok(None);
    }
    let wb = w.to_dtype(DType::BF16)?;
    Ok(same_values(w, &wb)?.then_some(wb))
}

/// Whether CPU tensors `w` (f32) and `wb` (bf16) hold the same values, bit for bit.
fn same_values(w: &Tensor, wb: &Tensor) -> Result<bool> {
    if w.dims() != wb.dims() || !w.is_contiguous() || !wb.is_contiguous() {
        return Ok(false);
    }
    let (s, l) = w.storage_and_layout();
    let (sb, lb) = wb.storage_and_layout();
    let n = w.elem_count();
    let (Storage::Cpu(CpuStorage::F32(v)), Storage::Cpu(CpuStorage::BF16(vb))) = (&*s, &*sb) else {
        return Ok(false);
    };
    let (v, vb) = (&v[l.start_offset()..][..n], &vb[lb.start_offset()..][..n]);
    Ok(v.iter()
        .zip(vb)
        .all(|(x, y)| x.to_bits() == (y.to_bits() as u32) << 16))
}

fn cpu_f32(s: &Storage) -> Result<&[f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => candle_core::bail!("linear: expected CPU f32 data"),
    }
}

#[derive(Clone, Copy)]
enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

thread_local! {
    /// Widened weight rows for the gemm path, per pool thread, reused across calls.
    static WIDE: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `out` [m, n] = act(x [m, k] · w [n, k]ᵀ + bias), or with `accumulate`:
/// `out += x · wᵀ + bias` (then `act` is the identity).
#[allow(clippy::too_many_arguments)]
fn linear_into(
    x: &[f32],
    m: usize,
    k: usize,
    w: Weights,
    n: usize,
    bias: Option<&[f32]>,
    act: Activation,
    out: &mut [f32],
    accumulate: bool,
    mode: CpuMatmul,
) {
    if m == 0 || n == 0 {
        return;
    }
    if let Weights::Bf16(_) = w
        && mode == CpuMatmul::Bf16
    {
        // Without AVX-512 BF16 (else the weights are packed): the same products from the
        // rounded activations on the f32 paths.
        let xr: Vec<f32> = x[..m * k]
            .iter()
            .map(|v| bf16::from_f32(*v).to_f32())
            .collect();
        linear_into(&xr, m, k, w, n, bias, act, out, accumulate, CpuMatmul::F32);
        return;
    }
    if let Weights::Bf16(wv) = w
        && (TILES_MIN_ROWS..=TILES_MAX_ROWS).contains(&m)
        && bf16_tiles::available()
    {
        bf16_tiles::matmul(x, m, k, wv, n, out, accumulate);
        if bias.is_some() || act != Activation::Identity {
            bias_act_rows(out, bias, act);
        }
        return;
    }
    if let Weights::Bf16(wv) = w
        && m <= GEMV_MAX_ROWS
    {
        gemv_bf16(x, m, k, wv, n, out, accumulate);
        if bias.is_some() || act != Activation::Identity {
            bias_act_rows(out, bias, act);
        }
        return;
    }
    // Blocks of output columns (weight rows), each small enough for its widened weights to
    // stay in L2 and at least four per thread (the pool hands them out one by one, so a
    // thread descheduled on a busy machine does not hold up the rest). Each block is one
    // single-threaded gemm plus its epilogue while the block is hot: one pool round-trip
    // per layer, and no second thread pool (gemm's rayon) spinning against this one.
    let threads = candle_core::utils::barrier_pool().n_workers() + 1;
    let most = (WIDEN_FLOATS / k.max(1)).max(16);
    let blocks = n.div_ceil(most).max(4 * threads).min(n.div_ceil(16));
    let nb = n.div_ceil(blocks).next_multiple_of(16).min(n);
    let blocks = n.div_ceil(nb);
    let dst = OutPtr(out.as_mut_ptr());
    par_ranges(blocks, m * n * k, |items| {
        WIDE.with_borrow_mut(|wide| {
            for b in items {
                let (n0, n1) = (b * nb, ((b + 1) * nb).min(n));
                let wb: &[f32] = match w {
                    Weights::F32(v) => &v[n0 * k..n1 * k],
                    Weights::Bf16(v) => {
                        wide.resize(nb * k, 0.0);
                        bf16_to_f32(&v[n0 * k..n1 * k], &mut wide[..(n1 - n0) * k]);
                        &wide[..(n1 - n0) * k]
                    }
                };
                // SAFETY: x holds m·k floats, wb (n1 − n0)·k; dst [m, n] row-major, and this
                // block alone writes its columns n0..n1.
                unsafe {
                    gemm::gemm(
                        m,
                        n1 - n0,
                        k,
                        dst.at(n0),
                        1,
                        n as isize,
                        accumulate,
                        x.as_ptr(),
                        1,
                        k as isize,
                        wb.as_ptr(),
                        k as isize,
                        1,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    )
                };
                if bias.is_some() || act != Activation::Identity {
                    let bias = bias.map(|b| &b[n0..n1]);
                    for r in 0..m {
                        // SAFETY: row r, columns n0..n1 of dst: this block's own elements.
                        let row =
                            unsafe { std::slice::from_raw_parts_mut(dst.at(r * n + n0), n1 - n0) };
                        bias_act_rows(row, bias, act);
                    }
                }
            }
        })
    });
}

/// Run `f` over `0..n` split across candle's CPU worker pool, or inline when the work is
/// too small for a pool round-trip to pay off (`work` ≈ scalar operations in total).
pub(crate) fn par_ranges(n: usize, work: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
    const MIN_PARALLEL_WORK: usize = 1 << 16;
    if n < 2 || work < MIN_PARALLEL_WORK {
        f(0..n)
    } else {
        candle_core::utils::barrier_pool().execute_chunked(n, f)
    }
}

/// Raw pointer the worker threads write disjoint output elements through.
#[derive(Clone, Copy)]
pub(crate) struct OutPtr(pub(crate) *mut f32);
// SAFETY: every output element is written by exactly one worker (disjoint row ranges).
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method (not `.0`) so closures capture the whole Sync wrapper, not the raw field.
    pub(crate) fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// `out` [m, n] (+)= `x` [m, k] f32 · `w` [n, k] bf16 ᵀ: each weight row is read once and
/// dotted with up to [`GEMV_GROUP`] activation rows at a time.
fn gemv_bf16(
    x: &[f32],
    m: usize,
    k: usize,
    w: &[bf16],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    let out = OutPtr(out.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    par_ranges(n, n * k * m, |rows| {
        let mut dots = [0f32; GEMV_GROUP];
        for o in rows {
            let row = &w[o * k..(o + 1) * k];
            for t0 in (0..m).step_by(GEMV_GROUP) {
                let g = GEMV_GROUP.min(m - t0);
                let xg = &x[t0 * k..(t0 + g) * k];
                #[cfg(target_arch = "x86_64")]
                if avx2 {
                    // SAFETY: AVX2 and FMA were detected at run time; g <= GEMV_GROUP and
                    // xg holds g rows of k values.
                    unsafe { avx2::dot_rows(row, xg, k, g, &mut dots) };
                } else {
                    for (ti, d) in dots[..g].iter_mut().enumerate() {
                        *d = dot_bf16(row, &xg[ti * k..(ti + 1) * k]);
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                for (ti, d) in dots[..g].iter_mut().enumerate() {
                    *d = dot_bf16(row, &xg[ti * k..(ti + 1) * k]);
                }
                for (ti, d) in dots[..g].iter().enumerate() {
                    // SAFETY: o < n and t0 + ti < m; each (t, o) is written by this worker only.
                    unsafe {
                        let y = out.at((t0 + ti) * n + o);
                        *y = if accumulate { *y + d } else { *d };
                    }
                }
            }
        }
    });
}

/// Σ w[i]·x[i] with 16 independent f32 accumulators (vectorizes; bf16 → f32 is a shift).
#[inline]
fn dot_bf16(w: &[bf16], x: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let wc = w.chunks_exact(L);
    let xc = x.chunks_exact(L);
    let (wr, xr) = (wc.remainder(), xc.remainder());
    for (wc, xc) in wc.zip(xc) {
        for j in 0..L {
            acc[j] += f32::from_bits((wc[j].to_bits() as u32) << 16) * xc[j];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for (a, b) in wr.iter().zip(xr) {
        sum += a.to_f32() * b;
    }
    sum
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// `dots[t] = Σ_i w[i]·x[t·k + i]` for `t < rows`: one pass over the bf16 weight row,
    /// widened to f32 with a shift, two FMA chains per activation row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `rows <= dots.len()`, `x.len() >= rows * k`,
    /// `w.len() >= k`.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_rows(w: &[bf16], x: &[f32], k: usize, rows: usize, dots: &mut [f32]) {
        const MAX: usize = super::GEMV_GROUP;
        let mut acc0 = [_mm256_setzero_ps(); MAX];
        let mut acc1 = [_mm256_setzero_ps(); MAX];
        let wp = w.as_ptr() as *const u16;
        let xp = x.as_ptr();
        let mut i = 0;
        // SAFETY (all loads): i + 16 <= k, so every access is inside w[..k] and x[t*k..(t+1)*k].
        unsafe {
            while i + 16 <= k {
                let w0 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(wp.add(i) as *const __m128i),
                )));
                let w1 = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(
                    _mm_loadu_si128(wp.add(i + 8) as *const __m128i),
                )));
                for t in 0..rows.min(MAX) {
                    let xr = xp.add(t * k + i);
                    acc0[t] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc0[t]);
                    acc1[t] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), acc1[t]);
                }
                i += 16;
            }
            for t in 0..rows.min(MAX) {
                let v = _mm256_add_ps(acc0[t], acc1[t]);
                let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
                let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
                let mut d = _mm_cvtss_f32(s);
                for (j, wj) in w[i..k].iter().enumerate() {
                    d += wj.to_f32() * *xp.add(t * k + i + j);
                }
                dots[t] = d;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    impl Linear {
        fn tensor_dtype(&self) -> Option<DType> {
            match &self.weight {
                Weight::Tensor(w) => Some(w.dtype()),
                Weight::Packed(_) => None,
            }
        }
    }

    /// [out, in] of the layer tests: odd sizes, a wide and a long layer.
    const SHAPES: [(usize, usize); 3] = [(37, 77), (300, 40), (5, 1100)];

    /// A random f32 weight [n, k] whose values are exactly BF16 (as in a BF16 checkpoint),
    /// and a bias [n].
    fn bf16_exact_layer(n: usize, k: usize) -> Result<(Tensor, Tensor)> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        Ok((w, Tensor::randn(0f32, 1.0, n, &dev)?))
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Every CPU path (bf16 matrix-vector, bf16 widened gemm, f32 gemm) and epilogue against
    /// candle's own ops on the same f32 values.
    #[test]
    fn cpu_paths_match_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (n, k) in SHAPES {
            let (w, b) = bf16_exact_layer(n, k)?;
            let bf = Linear::from_weight_with(w.clone(), Some(b.clone()), true)?;
            assert_eq!(bf.tensor_dtype(), Some(DType::BF16));
            let f = Linear::from_weight_with(w.clone(), Some(b.clone()), false)?;
            assert_eq!(f.tensor_dtype(), Some(DType::F32));
            for t in [1usize, 3, 4, 5, 16, 17, 70] {
                let x = Tensor::randn(0f32, 1.0, (t, k), &dev)?;
                let lin = x.matmul(&w.t()?)?.broadcast_add(&b)?;
                let res = Tensor::randn(0f32, 1.0, (t, n), &dev)?;
                let cases = [
                    (Epilogue::Act(Activation::Identity), lin.clone()),
                    (Epilogue::Act(Activation::Relu2), lin.relu()?.sqr()?),
                    (Epilogue::Act(Activation::GeluErf), lin.gelu_erf()?),
                    (Epilogue::Add(&res), (&res + &lin)?),
                ];
                for (epi, want) in cases {
                    let scale = want
                        .abs()?
                        .flatten_all()?
                        .max(0)?
                        .to_scalar::<f32>()?
                        .max(1.0);
                    for layer in [&bf, &f] {
                        let err = max_abs_diff(&layer.run(&x, epi)?, &want)? / scale;
                        assert!(err < 1e-5, "n={n} k={k} t={t} rel err {err}");
                    }
                }
            }
            // Rank-3 input keeps its leading dims.
            let x = Tensor::randn(0f32, 1.0, (2, 3, k), &dev)?;
            let y = bf.forward(&x)?;
            assert_eq!(y.dims(), &[2, 3, n]);
            let want = f.forward(&x.reshape((6, k))?)?.reshape((2, 3, n))?;
            assert!(max_abs_diff(&y, &want)? < 1e-3);
        }
        // Not representable in bf16: stays f32.
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        assert_eq!(
            Linear::from_weight_with(w, None, true)?.tensor_dtype(),
            Some(DType::F32)
        );
        Ok(())
    }

    /// BF16 mode: every row count (one row, the tiles, prefill sizes, k tails) gives the f32
    /// products of the BF16-rounded activations, bias and activation included; f32 weights
    /// ignore the mode.
    #[test]
    fn bf16_mode_multiplies_rounded_activations() -> Result<()> {
        let dev = Device::Cpu;
        for (n, k) in SHAPES {
            let (w, b) = bf16_exact_layer(n, k)?;
            CpuMatmul::set_for_thread(CpuMatmul::Bf16);
            let layer = Linear::from_weight_with(w.clone(), Some(b.clone()), true)?;
            let plain = Linear::from_weight_with(w.clone(), Some(b.clone()), false)?;
            CpuMatmul::set_for_thread(CpuMatmul::F32);
            for t in [1usize, 2, 5, 16, 70, 130] {
                let x = Tensor::randn(0f32, 1.0, (t, k), &dev)?;
                let rounded = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
                let want = rounded.matmul(&w.t()?)?.broadcast_add(&b)?.relu()?.sqr()?;
                let exact = x.matmul(&w.t()?)?.broadcast_add(&b)?.relu()?.sqr()?;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                let y = layer.forward_act(&x, Activation::Relu2)?;
                let err = max_abs_diff(&y, &want)? / scale;
                assert!(
                    err < 1e-5,
                    "n={n} k={k} t={t}: rel err {err} against rounded inputs"
                );
                // The rounding is visible: BF16 mode is not the f32 product.
                let off = max_abs_diff(&y, &exact)? / scale;
                assert!(
                    off > 1e-4,
                    "n={n} k={k} t={t}: BF16 mode matched f32 ({off})"
                );
                let yf = plain.forward_act(&x, Activation::Relu2)?;
                assert!(
                    max_abs_diff(&yf, &exact)? / scale < 1e-5,
                    "f32 weights stay f32"
                );
            }
        }
        Ok(())
    }

    /// BF16 mode: a layer's BF16 output feeds the next layer with the same products as its
    /// f32 output (which the next layer rounds the same way), bit for bit; odd widths take
    /// the copying path of the BF16 input.
    #[test]
    fn bf16_output_feeds_the_next_layer_unchanged() -> Result<()> {
        if !bf16_gemm::available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return Ok(());
        }
        let dev = Device::Cpu;
        for (mid, k) in [(64usize, 40usize), (37, 77)] {
            CpuMatmul::set_for_thread(CpuMatmul::Bf16);
            let bf16_weight = |n, k| Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(DType::BF16);
            let up = Linear::from_weight(bf16_weight(mid, k)?, None)?;
            let down = Linear::from_weight(bf16_weight(9, mid)?, None)?;
            CpuMatmul::set_for_thread(CpuMatmul::F32);
            let x = Tensor::randn(0f32, 1.0, (13, k), &dev)?;
            let h = up.forward_act_bf16_out(&x, Activation::GeluErf)?;
            assert_eq!(h.dtype(), DType::BF16);
            let hf = up.forward_act(&x, Activation::GeluErf)?;
            assert_eq!(
                max_abs_diff(
                    &h.to_dtype(DType::F32)?,
                    &hf.to_dtype(DType::BF16)?.to_dtype(DType::F32)?
                )?,
                0.0
            );
            let (y, yf) = (down.forward(&h)?, down.forward(&hf)?);
            assert_eq!(max_abs_diff(&y, &yf)?, 0.0, "mid={mid}");
        }
        Ok(())
    }
}
