//! RMSNorm (model.md §2.2), the grouped gated RMSNorm of the Mamba mixer (§2.5.8) and the
//! vision blocks' LayerNorm. On CPU in f32 the row kernels of [`super::cpu_math`] run on the
//! same worker pool as the matmuls: candle's norm ops run on its rayon pool, whose threads
//! then compete with the matmul pool's spinning workers for the cores.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use super::cpu_math::{layer_norm_row, rms_norm_row};
use super::linear::{OutPtr, par_ranges};
use crate::kernels::{self, CpuF32};

/// `y = w * (x_f32 * rsqrt(mean(x_f32²) + eps)).to(dtype)`.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    /// Unit weight in f32, used when the model dtype is not f32 (normalize in f32 first).
    ones: Option<Tensor>,
    eps: f32,
}

impl RmsNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(size, "weight")?;
        let ones = if weight.dtype() == DType::F32 {
            None
        } else {
            Some(Tensor::ones(size, DType::F32, weight.device())?)
        };
        Ok(RmsNorm {
            weight,
            ones,
            eps: eps as f32,
        })
    }

    /// `x + delta` (when given) and this norm of the sum: the residual stream between two
    /// blocks. On the GPU one fused kernel ([`kernels::add_rms_norm`], unless
    /// [`kernels::fused_enabled`] says no); elsewhere the separate ops. `x`, `delta`: [T, size].
    pub fn add_forward(&self, x: &Tensor, delta: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
        if x.device().is_cuda() && kernels::fused_enabled() {
            return kernels::add_rms_norm(x, delta, &self.weight, self.eps);
        }
        if let Some(d) = delta
            && f32_cpu(x)
            && f32_cpu(d)
            && f32_cpu(&self.weight)
            && x.dims() == d.dims()
        {
            // One pass per row: the sum, then its norm while the row is in cache.
            let (w, eps) = (CpuF32::new(&self.weight)?, self.eps);
            let w = w.slice()?;
            let (xc, dc) = (x.contiguous()?, d.contiguous()?);
            let (xv, dv) = (CpuF32::new(&xc)?, CpuF32::new(&dc)?);
            let (xs, ds) = (xv.slice()?, dv.slice()?);
            let mut sum = vec![0f32; xs.len()];
            let sp = OutPtr(sum.as_mut_ptr());
            let h = map_rows(x, w.len(), |r, out| {
                let cols = r * w.len()..(r + 1) * w.len();
                // SAFETY: row r of `sum` is written by this worker only.
                let s = unsafe { std::slice::from_raw_parts_mut(sp.at(cols.start), w.len()) };
                for ((s, x), d) in s.iter_mut().zip(&xs[cols.clone()]).zip(&ds[cols]) {
                    *s = x + d;
                }
                rms_norm_row(s, w, eps, out);
            })?;
            return Ok((Tensor::from_vec(sum, x.shape(), x.device())?, h));
        }
        let x = match delta {
            Some(d) => (x + d)?,
            None => x.clone(),
        };
        let h = self.forward(&x)?;
        Ok((x, h))
    }

    /// `x`: [..., size] in the model dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if f32_cpu(x) && f32_cpu(&self.weight) {
            let (w, eps) = (CpuF32::new(&self.weight)?, self.eps);
            let w = w.slice()?;
            let xc = x.contiguous()?;
            let xv = CpuF32::new(&xc)?;
            let xs = xv.slice()?;
            let n = w.len();
            return map_rows(x, n, |r, out| {
                rms_norm_row(&xs[r * n..(r + 1) * n], w, eps, out)
            });
        }
        match &self.ones {
            // f32 model: one fused op (it accumulates in f32).
            None => candle_nn::ops::rms_norm(x, &self.weight, self.eps),
            Some(ones) => {
                let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, ones, self.eps)?;
                normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight)
            }
        }
    }
}

/// LayerNorm over the last dim, with weight and bias (the ViT blocks').
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(LayerNorm {
            weight: vb.get(size, "weight")?,
            bias: vb.get(size, "bias")?,
            eps: eps as f32,
        })
    }

    /// `x`: [..., size].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !(f32_cpu(x) && f32_cpu(&self.weight) && f32_cpu(&self.bias)) {
            return candle_nn::ops::layer_norm(
                &x.contiguous()?,
                &self.weight,
                &self.bias,
                self.eps,
            );
        }
        let (w, b) = (CpuF32::new(&self.weight)?, CpuF32::new(&self.bias)?);
        let (w, b, eps) = (w.slice()?, b.slice()?, self.eps);
        let xc = x.contiguous()?;
        let xv = CpuF32::new(&xc)?;
        let xs = xv.slice()?;
        let n = w.len();
        map_rows(x, n, |r, out| {
            layer_norm_row(&xs[r * n..(r + 1) * n], w, b, eps, out)
        })
    }
}

fn f32_cpu(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// A new f32 CPU tensor of `x`'s shape whose row r (of `width`) is written by `f(r, row)`;
/// rows run in parallel on the matmuls' worker pool.
fn map_rows(x: &Tensor, width: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Result<Tensor> {
    if x.dims().last() != Some(&width) {
        candle_core::bail!("norm: input {:?} does not end in {width}", x.dims());
    }
    let rows = x.elem_count() / width.max(1);
    let mut out = vec![0f32; x.elem_count()];
    let op = OutPtr(out.as_mut_ptr());
    par_ranges(rows, rows * width * 4, |rs| {
        for r in rs {
            // SAFETY: row r of `out` is written by this worker only.
            f(r, unsafe {
                std::slice::from_raw_parts_mut(op.at(r * width), width)
            });
        }
    });
    Tensor::from_vec(out, x.shape(), x.device())
}

/// Zamba2/Mixer2 gated RMSNorm: `g = y * silu(z)`, RMS-normalized per group of
/// `group_size` channels (norm after the gate), times the weight. Computed in f32.
#[derive(Debug, Clone)]
pub struct GatedRmsNorm {
    /// [d] f32.
    weight: Tensor,
    /// [group_size] f32 ones: the fused rms_norm op wants a weight over its last dim.
    ones: Tensor,
    group_size: usize,
    eps: f32,
}

impl GatedRmsNorm {
    pub fn new(size: usize, group_size: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        if group_size == 0 || !size.is_multiple_of(group_size) {
            candle_core::bail!(
                "gated norm: size {size} is not a multiple of group size {group_size}"
            );
        }
        let weight = vb.get(size, "weight")?.to_dtype(DType::F32)?;
        let ones = Tensor::ones(group_size, DType::F32, weight.device())?;
        Ok(GatedRmsNorm {
            weight,
            ones,
            group_size,
            eps: eps as f32,
        })
    }

    pub(crate) fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub(crate) fn group_size(&self) -> usize {
        self.group_size
    }

    pub(crate) fn eps(&self) -> f32 {
        self.eps
    }

    /// `y`: [T, d] f32, `z`: [T, d] any float dtype. Returns [T, d] f32.
    pub fn forward(&self, y: &Tensor, z: &Tensor) -> Result<Tensor> {
        let (t, d) = y.dims2()?;
        let g = (y * candle_nn::ops::silu(&z.to_dtype(DType::F32)?)?)?;
        // [T, d] -> [T * groups, group_size] -> normalize -> [T, d]
        let g = g.reshape((t * d / self.group_size, self.group_size))?;
        let g = candle_nn::ops::rms_norm(&g, &self.ones, self.eps)?.reshape((t, d))?;
        g.broadcast_mul(&self.weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    #[test]
    fn gated_norm_matches_formula() -> Result<()> {
        let dev = Device::Cpu;
        let (t, d, gs) = (3, 8, 4);
        let w = Tensor::randn(0f32, 1.0, d, &dev)?;
        let vb = VarBuilder::from_tensors(
            HashMap::from([("weight".to_string(), w.clone())]),
            DType::F32,
            &dev,
        );
        let norm = GatedRmsNorm::new(d, gs, 1e-5, vb)?;
        let y = Tensor::randn(0f32, 1.0, (t, d), &dev)?;
        let z = Tensor::randn(0f32, 1.0, (t, d), &dev)?;
        let got = norm.forward(&y, &z)?.to_vec2::<f32>()?;
        let (yv, zv, wv) = (
            y.to_vec2::<f32>()?,
            z.to_vec2::<f32>()?,
            w.to_vec1::<f32>()?,
        );
        for r in 0..t {
            for grp in 0..d / gs {
                let g: Vec<f32> = (grp * gs..(grp + 1) * gs)
                    .map(|c| yv[r][c] * zv[r][c] / (1.0 + (-zv[r][c]).exp()))
                    .collect();
                let ms = g.iter().map(|v| v * v).sum::<f32>() / gs as f32;
                for (k, c) in (grp * gs..(grp + 1) * gs).enumerate() {
                    let want = wv[c] * g[k] / (ms + 1e-5).sqrt();
                    assert!((got[r][c] - want).abs() < 1e-5, "{} vs {want}", got[r][c]);
                }
            }
        }
        Ok(())
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// The CPU row kernels against candle's ops: RMSNorm with and without the residual add
    /// (rows of 37 columns: a vector and a tail), and the LayerNorm.
    #[test]
    fn cpu_kernels_match_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (t, d) = (70, 37);
        let w = Tensor::randn(0f32, 1.0, d, &dev)?;
        let b = Tensor::randn(0f32, 1.0, d, &dev)?;
        let vb = VarBuilder::from_tensors(
            HashMap::from([
                ("weight".to_string(), w.clone()),
                ("bias".to_string(), b.clone()),
            ]),
            DType::F32,
            &dev,
        );
        // An offset mean, where a one-pass variance loses digits.
        let x = (Tensor::randn(0f32, 1.0, (2, t, d), &dev)? + 3.0)?;
        let delta = Tensor::randn(0f32, 1.0, (2, t, d), &dev)?;

        let rms = RmsNorm::new(d, 1e-5, vb.clone())?;
        let (sum, h) = rms.add_forward(&x, Some(&delta))?;
        let want_sum = (&x + &delta)?;
        assert_eq!(max_abs(&sum, &want_sum)?, 0.0);
        let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-5)?;
        assert!(max_abs(&h, &want)? < 1e-5);
        let want = candle_nn::ops::rms_norm(&x, &w, 1e-5)?;
        assert!(max_abs(&rms.forward(&x)?, &want)? < 1e-5);

        let ln = LayerNorm::new(d, 1e-6, vb)?;
        let want = candle_nn::ops::layer_norm(&x, &w, &b, 1e-6)?;
        assert!(max_abs(&ln.forward(&x)?, &want)? < 1e-4);
        // A strided input is made contiguous first.
        let xt = x.transpose(0, 1)?;
        let want = candle_nn::ops::layer_norm(&xt.contiguous()?, &w, &b, 1e-6)?;
        assert!(max_abs(&ln.forward(&xt)?, &want)? < 1e-4);
        Ok(())
    }
}
