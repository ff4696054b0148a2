//! NemotronH MLP mixer: `down(relu(up(x))²)`, no gate (model.md §2.3).

use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::NemotronHConfig;
use super::linear::Linear;

#[derive(Debug, Clone)]
pub struct Mlp {
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub fn new(cfg: &NemotronHConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            up_proj: Linear::new(h, i, cfg.mlp_bias, vb.pp("up_proj"))?,
            down_proj: Linear::new(i, h, cfg.mlp_bias, vb.pp("down_proj"))?,
        })
    }

    /// `x`: [T, hidden] -> [T, hidden].
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.up_proj.forward(x)?;
        let h = if h.device().is_cpu() && h.dtype() == DType::F32 && h.is_contiguous() {
            // The up_proj output is a fresh buffer: square-ReLU it in place, one pass.
            h.inplace_op1(&Relu2)?;
            h
        } else {
            h.relu()?.sqr()?
        };
        self.down_proj.forward(&h)
    }
}

/// In-place `x = relu(x)²` on contiguous CPU f32 data.
struct Relu2;

impl InplaceOp1 for Relu2 {
    fn name(&self) -> &'static str {
        "relu2"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let CpuStorage::F32(v) = storage else {
            candle_core::bail!("relu2: expected f32 data");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("relu2: expected a contiguous tensor");
        };
        v[start..end].iter_mut().for_each(|x| {
            let r = x.max(0.0);
            *x = r * r;
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn relu2_in_place_matches_ops() -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (3, 5), &Device::Cpu)?;
        let want = x.relu()?.sqr()?;
        let y = x.copy()?;
        y.inplace_op1(&Relu2)?;
        let err = (y - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(err == 0.0);
        Ok(())
    }
}
