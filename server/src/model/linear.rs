//! Linear layer (`y = x Wᵀ + b`) with a CPU fast path for decode.
//!
//! On CPU the model runs in f32 (candle has no BF16 CPU matmul), so a decode step streams
//! 4 bytes per weight from memory. The checkpoint is BF16, so every f32 weight is exactly a
//! BF16 value: when that holds we keep an extra BF16 copy and, for few rows (decode), run a
//! BF16-weight × f32-activation matrix-vector product with f32 accumulation. That halves the
//! memory traffic of the memory-bound decode step without changing the math (the products
//! are exact; only the summation order differs). Prefill (many rows) keeps the f32 gemm.
//! On by default in optimized builds; `VLM_CPU_BF16_GEMV=0` turns it off (saves the +50%
//! memory of the copy), `=1` turns it on in debug builds (where the unoptimized kernel would
//! only slow the tests down).

use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor};
use candle_nn::VarBuilder;
use half::bf16;

/// At most this many rows go through the BF16 matrix-vector path.
const GEMV_MAX_ROWS: usize = 4;

#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// [out, in] BF16 copy of the weight (CPU + f32 model + exactly representable only).
    weight_bf16: Option<Tensor>,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let inner = candle_nn::linear_b(in_dim, out_dim, bias, vb)?;
        let weight_bf16 = Self::bf16_copy(inner.weight(), bf16_gemv_enabled())?;
        Ok(Linear { inner, weight_bf16 })
    }

    /// Wrap an existing weight (e.g. tied embeddings), [out, in].
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::from_weight_with(weight, bias, bf16_gemv_enabled())
    }

    fn from_weight_with(weight: Tensor, bias: Option<Tensor>, gemv: bool) -> Result<Self> {
        let weight_bf16 = Self::bf16_copy(&weight, gemv)?;
        Ok(Linear {
            inner: candle_nn::Linear::new(weight, bias),
            weight_bf16,
        })
    }

    fn bf16_copy(w: &Tensor, enabled: bool) -> Result<Option<Tensor>> {
        if !enabled || !matches!(w.device(), Device::Cpu) || w.dtype() != DType::F32 {
            return Ok(None);
        }
        let wb = w.to_dtype(DType::BF16)?.contiguous()?;
        // Only when lossless (a BF16 checkpoint loaded as f32).
        let exact = wb
            .to_dtype(DType::F32)?
            .ne(w)?
            .flatten_all()?
            .max(0)?
            .to_scalar::<u8>()?
            == 0;
        Ok(exact.then_some(wb))
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Linear {
    /// `x`: [T, in] -> [T, out].
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.weight_bf16 {
            Some(wb) if x.rank() == 2 && x.dim(0)? <= GEMV_MAX_ROWS && x.dtype() == DType::F32 => {
                let y = gemv_bf16(x, wb)?;
                match self.inner.bias() {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
            _ => self.inner.forward(x),
        }
    }
}

fn bf16_gemv_enabled() -> bool {
    match std::env::var("VLM_CPU_BF16_GEMV") {
        Ok(v) => v != "0",
        Err(_) => !cfg!(debug_assertions),
    }
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

/// `x` [T, K] f32 · `w` [N, K] bf16 (contiguous, CPU) ᵀ -> [T, N] f32.
fn gemv_bf16(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (t, k) = x.dims2()?;
    let (n, kw) = w.dims2()?;
    if k != kw {
        candle_core::bail!(
            "linear: input width {k} does not match weight {:?}",
            w.dims()
        );
    }
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?; // T*K floats: tiny next to the weight
    let (storage, layout) = w.storage_and_layout();
    let wv: &[bf16] = match &*storage {
        Storage::Cpu(CpuStorage::BF16(v)) => {
            &v[layout.start_offset()..layout.start_offset() + n * k]
        }
        _ => candle_core::bail!("linear: bf16 weight copy is not a CPU bf16 tensor"),
    };
    let mut y = vec![0f32; t * n];
    let out = OutPtr(y.as_mut_ptr());
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
    par_ranges(n, n * k * t, |rows| {
        let mut dots = [0f32; GEMV_MAX_ROWS];
        for o in rows {
            let row = &wv[o * k..(o + 1) * k];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 and FMA were detected at run time; t <= GEMV_MAX_ROWS and
                // xv holds t rows of k values.
                unsafe { avx2::dot_rows(row, &xv, k, t, &mut dots) };
                for (ti, d) in dots[..t].iter().enumerate() {
                    // SAFETY: o < n, ti < t; each (ti, o) is written once, by this worker only.
                    unsafe { *out.at(ti * n + o) = *d };
                }
                continue;
            }
            for ti in 0..t {
                dots[ti] = dot_bf16(row, &xv[ti * k..(ti + 1) * k]);
                // SAFETY: as above.
                unsafe { *out.at(ti * n + o) = dots[ti] };
            }
        }
    });
    drop(storage);
    Tensor::from_vec(y, (t, n), x.device())
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
        const MAX: usize = super::GEMV_MAX_ROWS;
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

    #[test]
    fn bf16_gemv_matches_f32_matmul() -> Result<()> {
        let dev = Device::Cpu;
        // Weights exactly representable in bf16, as in a bf16 checkpoint.
        let w = Tensor::randn(0f32, 1.0, (37, 77), &dev)?
            .to_dtype(DType::BF16)?
            .to_dtype(DType::F32)?;
        let b = Tensor::randn(0f32, 1.0, 37, &dev)?;
        let lin = Linear::from_weight_with(w.clone(), Some(b.clone()), true)?;
        assert!(lin.weight_bf16.is_some());
        for t in [1, 2, 3, 4, 5] {
            let x = Tensor::randn(0f32, 1.0, (t, 77), &dev)?;
            let want = x.matmul(&w.t()?)?.broadcast_add(&b)?;
            let got = lin.forward(&x)?;
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "t={t} err={err}");
        }
        // Not representable in bf16: no copy, plain f32 path.
        let w = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        assert!(
            Linear::from_weight_with(w, None, true)?
                .weight_bf16
                .is_none()
        );
        Ok(())
    }
}
