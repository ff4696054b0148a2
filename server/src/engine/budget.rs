//! Admission by memory: what a sequence's state costs, from the model config, and how
//! much memory the states may take.
//!
//! A NemotronH sequence holds a fixed-size Mamba state per Mamba layer (conv
//! window plus an f32 SSM state, about 149 MB at full size) and a KV cache
//! that grows by 24 KiB per token in BF16 (6 attention layers). The Mamba
//! states live in a pool allocated once: [`pool_slots`] sizes it from the
//! budget, and whatever the pool leaves of the budget is room for KV caches.
//! The scheduler reserves `per_token × (prompt + max_tokens)` of that room at
//! admission (the cache never grows past it), so a running sequence can never
//! run out of memory; requests that do not fit wait in the queue instead of
//! failing.

use candle_core::Device;

use crate::model::config::{LayerKind, NemotronHConfig};

/// The share of the device memory left free after loading the weights that the
/// states may use when no budget is given. The rest is for activations: at full
/// size a vision batch of 52 tiles alone needs several GB.
pub const DEVICE_STATE_FRACTION: f64 = 0.8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateCost {
    /// Bytes every sequence needs whatever its length (Mamba states: one pool slot).
    pub fixed: usize,
    /// KV-cache bytes per token.
    pub per_token: usize,
}

impl StateCost {
    /// `kv_bytes`: bytes per KV element (2 for BF16, 4 for f32). Mamba states
    /// are kept in f32 (the conv window too, as this implementation does).
    pub fn of(cfg: &NemotronHConfig, kv_bytes: usize) -> Self {
        let count = |kind: LayerKind| cfg.layers.iter().filter(|&&k| k == kind).count();
        let conv = (cfg.conv_kernel - 1) * cfg.mamba_conv_dim();
        let ssm = cfg.mamba_num_heads * cfg.mamba_head_dim * cfg.ssm_state_size;
        StateCost {
            fixed: count(LayerKind::Mamba) * (conv + ssm) * 4,
            per_token: count(LayerKind::Attention)
                * 2
                * cfg.num_kv_heads()
                * cfg.attn_head_dim()
                * kv_bytes,
        }
    }

    /// Bytes to reserve for a sequence of at most `tokens` tokens.
    pub fn for_tokens(&self, tokens: usize) -> usize {
        self.fixed + self.per_token * tokens
    }

    /// KV-cache bytes of a sequence of at most `tokens` tokens.
    pub fn kv_for_tokens(&self, tokens: usize) -> usize {
        self.per_token * tokens
    }
}

/// Slots of the Mamba state pool: `max_num_seqs`, fewer when the budget cannot hold that
/// many fixed states (at least one, so a request always runs).
pub fn pool_slots(max_num_seqs: usize, budget: Option<usize>, cost: StateCost) -> usize {
    let fit = budget.map_or(usize::MAX, |b| b / cost.fixed.max(1));
    max_num_seqs.min(fit).max(1)
}

/// The state budget when none is given: a share of the device memory that is free now
/// (after the weights are loaded) on CUDA; `None` (no byte limit) on CPU.
pub fn device_state_budget(device: &Device) -> Option<usize> {
    device_free_memory(device).map(|free| (free as f64 * DEVICE_STATE_FRACTION) as usize)
}

/// Free device memory in bytes (CUDA only).
#[cfg(feature = "cuda")]
pub fn device_free_memory(device: &Device) -> Option<usize> {
    let cuda = device.as_cuda_device().ok()?;
    // Binds the device's context to this thread before asking the driver.
    match cuda.cuda_stream().context().mem_get_info() {
        Ok((free, _total)) => Some(free),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the free device memory");
            None
        }
    }
}

/// Free device memory in bytes (CUDA only).
#[cfg(not(feature = "cuda"))]
pub fn device_free_memory(_device: &Device) -> Option<usize> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::VlConfig;

    /// The full-size numbers of model.md §2.4 and §2.6.
    #[test]
    fn full_size_model_costs_match_the_spec() {
        let config = r#"{
            "llm_config": {
                "hidden_size": 5120, "num_hidden_layers": 62, "vocab_size": 131072,
                "hybrid_override_pattern": "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-",
                "num_attention_heads": 40, "num_key_value_heads": 8, "head_dim": 128,
                "intermediate_size": 20480, "mamba_num_heads": 128, "mamba_head_dim": 80,
                "ssm_state_size": 128, "n_groups": 8, "conv_kernel": 4
            },
            "vision_config": {}, "force_image_size": 512, "img_context_token_id": 131072,
            "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5]
        }"#;
        let cfg = VlConfig::from_json_str(config).unwrap().llm_config;
        let cost = StateCost::of(&cfg, 2);
        // 6 attention layers × K and V × 8 heads × 128 × 2 bytes.
        assert_eq!(cost.per_token, 24_576);
        // 28 Mamba layers × (3 × 12288 conv + 128 × 80 × 128 SSM) × 4 bytes ≈ 151 MB.
        assert_eq!(cost.fixed, 28 * (3 * 12_288 + 1_310_720) * 4);
        assert_eq!(cost.for_tokens(10), cost.fixed + 245_760);
    }

    #[test]
    fn the_pool_takes_what_the_budget_allows_up_to_max_num_seqs() {
        let cost = StateCost {
            fixed: 100,
            per_token: 2,
        };
        assert_eq!(pool_slots(16, None, cost), 16);
        assert_eq!(pool_slots(16, Some(10_000), cost), 16);
        assert_eq!(pool_slots(16, Some(550), cost), 5);
        assert_eq!(
            pool_slots(16, Some(50), cost),
            1,
            "one sequence always runs"
        );
        assert_eq!(cost.kv_for_tokens(7), 14);
    }

    #[test]
    fn cpu_has_no_device_budget() {
        assert_eq!(device_state_budget(&Device::Cpu), None);
    }
}
