//! RMSNorm (model.md §2.2) and the grouped gated RMSNorm of the Mamba mixer (§2.5.8).

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;

use crate::kernels;

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
        let x = match delta {
            Some(d) => (x + d)?,
            None => x.clone(),
        };
        let h = self.forward(&x)?;
        Ok((x, h))
    }

    /// `x`: [..., size] in the model dtype.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
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
}
