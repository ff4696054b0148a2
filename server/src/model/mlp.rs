//! NemotronH MLP mixer: `down(relu(up(x))²)`, no gate (model.md §2.3).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::NemotronHConfig;
use super::linear::{Activation, Linear};

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
        // ReLU² is applied as the up_proj output is written (one pass on CPU), in BF16 when
        // the CPU's BF16 kernel runs both layers.
        let h = self.up_proj.forward_act_bf16_out(x, Activation::Relu2)?;
        self.down_proj.forward(&h)
    }
}
