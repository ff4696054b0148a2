//! Admission by memory: what a sequence's state costs, from the model config.
//!
//! A NemotronH sequence holds a fixed-size Mamba state per Mamba layer (conv
//! window plus an f32 SSM state, about 149 MB at full size) and a KV cache
//! that grows by 24 KiB per token in BF16 (6 attention layers). The scheduler
//! reserves `fixed + per_token × (prompt + max_tokens)` at admission, so a
//! running sequence can never run out of room; requests that do not fit wait
//! in the queue instead of failing.

use crate::model::config::{LayerKind, NemotronHConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateCost {
    /// Bytes every sequence needs whatever its length (Mamba states).
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
}
