//! Checkpoint configuration: the top-level `config.json` (`NemotronH_Nano_VL_V2`),
//! its `llm_config` (NemotronH, model.md §2.1) and `generation_config.json`.
//!
//! Field names follow transformers' `configuration_nemotron_h.py` (5.x) and accept the
//! older remote-code / Megatron names as aliases (`mamba_n_groups`, `mamba_d_conv`,
//! `mamba_chunk_size`, `rms_norm_eps`, `hybrid_override_pattern` vs `layers_block_type`...).

use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Deserializer};

/// The kind of residual block at one layer index (model.md §2.1 pattern characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `M`: Mamba2 mixer.
    Mamba,
    /// `*`: self-attention (GQA, no positional encoding).
    Attention,
    /// `-`: relu² MLP.
    Mlp,
}

/// An id or a list of ids (`eos_token_id` is either in HF configs).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// `llm_config` of the VL checkpoint (transformers `NemotronHConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct NemotronHConfig {
    #[serde(default)]
    pub vocab_size: Option<usize>,
    pub hidden_size: usize,
    /// MLP hidden size.
    pub intermediate_size: usize,
    #[serde(default)]
    pub num_hidden_layers: Option<usize>,
    /// Legacy pattern string (`M` Mamba, `*` attention, `-` MLP).
    #[serde(default)]
    pub hybrid_override_pattern: Option<String>,
    /// transformers 5.x list form ("mamba"/"linear_attention", "attention"/"full_attention", "mlp").
    #[serde(default, alias = "layer_types")]
    pub layers_block_type: Option<Vec<String>>,

    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Older remote-code name; configs may carry both.
    #[serde(default)]
    pub attention_head_dim: Option<usize>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_relu2")]
    pub mlp_hidden_act: String,

    pub mamba_num_heads: usize,
    pub mamba_head_dim: usize,
    #[serde(alias = "mamba_d_state", alias = "mamba_state_dim")]
    pub ssm_state_size: usize,
    #[serde(default = "default_n_groups", alias = "mamba_n_groups")]
    pub n_groups: usize,
    #[serde(default = "default_conv_kernel", alias = "mamba_d_conv")]
    pub conv_kernel: usize,
    #[serde(default = "default_chunk_size", alias = "mamba_chunk_size")]
    pub chunk_size: usize,
    #[serde(default = "default_true", alias = "mamba_conv_bias")]
    pub use_conv_bias: bool,
    /// Bias on the Mamba in/out projections.
    #[serde(default, alias = "mamba_proj_bias")]
    pub use_bias: bool,
    #[serde(default = "default_silu")]
    pub mamba_hidden_act: String,
    /// dt is clamped to this range after softplus; (0, inf) means no clamp (model.md §11.5).
    #[serde(
        default = "default_time_step_limit",
        alias = "mamba_dt_limit",
        deserialize_with = "de_time_step_limit"
    )]
    pub time_step_limit: (f64, f64),

    #[serde(default = "default_eps", alias = "rms_norm_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,

    /// Resolved from the pattern fields by [`NemotronHConfig::validate`].
    #[serde(skip)]
    pub layers: Vec<LayerKind>,
}

fn default_relu2() -> String {
    "relu2".into()
}
fn default_silu() -> String {
    "silu".into()
}
fn default_true() -> bool {
    true
}
fn default_n_groups() -> usize {
    8
}
fn default_conv_kernel() -> usize {
    4
}
fn default_chunk_size() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-5
}
fn default_max_position_embeddings() -> usize {
    131072
}
fn default_time_step_limit() -> (f64, f64) {
    (0.0, f64::INFINITY)
}

/// A float that may have been written as a bare `Infinity`/`-Infinity`/`NaN` (rewritten to
/// strings by [`parse_json_lenient`]).
#[derive(Deserialize)]
#[serde(untagged)]
enum LenientF64 {
    Num(f64),
    Text(String),
}

impl LenientF64 {
    fn value<E: serde::de::Error>(self) -> std::result::Result<f64, E> {
        match self {
            LenientF64::Num(v) => Ok(v),
            LenientF64::Text(s) => match s.as_str() {
                "Infinity" | "inf" => Ok(f64::INFINITY),
                "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
                "NaN" | "nan" => Ok(f64::NAN),
                other => Err(E::custom(format!("expected a number, got {other:?}"))),
            },
        }
    }
}

fn de_time_step_limit<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<(f64, f64), D::Error> {
    let v: Vec<LenientF64> = Vec::deserialize(d)?;
    if v.len() != 2 {
        return Err(serde::de::Error::custom(format!(
            "expected [min, max], got {} values",
            v.len()
        )));
    }
    let mut it = v.into_iter();
    let lo = it.next().map(LenientF64::value).transpose()?.unwrap_or(0.0);
    let hi = it
        .next()
        .map(LenientF64::value)
        .transpose()?
        .unwrap_or(f64::INFINITY);
    Ok((lo, hi))
}

impl NemotronHConfig {
    /// Resolve the layer pattern and check the dimensions are consistent.
    pub fn validate(&mut self) -> Result<()> {
        let layers = match (&self.layers_block_type, &self.hybrid_override_pattern) {
            (Some(list), _) => list
                .iter()
                .enumerate()
                .map(|(i, s)| match s.as_str() {
                    "mamba" | "linear_attention" | "M" => Ok(LayerKind::Mamba),
                    "attention" | "full_attention" | "*" => Ok(LayerKind::Attention),
                    "mlp" | "-" => Ok(LayerKind::Mlp),
                    other => bail!("layers_block_type[{i}] = {other:?} is not supported (mamba, attention, mlp)"),
                })
                .collect::<Result<Vec<_>>>()?,
            (None, Some(pattern)) => pattern
                .chars()
                .enumerate()
                .map(|(i, c)| match c {
                    'M' => Ok(LayerKind::Mamba),
                    '*' => Ok(LayerKind::Attention),
                    '-' => Ok(LayerKind::Mlp),
                    other => bail!("hybrid_override_pattern[{i}] = {other:?} is not supported (M, *, -)"),
                })
                .collect::<Result<Vec<_>>>()?,
            (None, None) => {
                bail!("missing field `hybrid_override_pattern` (or `layers_block_type`)")
            }
        };
        if let Some(n) = self.num_hidden_layers
            && n != layers.len()
        {
            bail!(
                "num_hidden_layers = {n} but the layer pattern has {} entries",
                layers.len()
            );
        }
        if layers.is_empty() {
            bail!("the layer pattern is empty");
        }
        self.layers = layers;
        if self.mlp_hidden_act != "relu2" {
            bail!(
                "mlp_hidden_act = {:?} is not supported (relu2)",
                self.mlp_hidden_act
            );
        }
        if self.mamba_hidden_act != "silu" {
            bail!(
                "mamba_hidden_act = {:?} is not supported (silu)",
                self.mamba_hidden_act
            );
        }
        let kv = self.num_kv_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            bail!(
                "num_attention_heads = {} is not a multiple of num_key_value_heads = {kv}",
                self.num_attention_heads
            );
        }
        if self.n_groups == 0 || !self.mamba_num_heads.is_multiple_of(self.n_groups) {
            bail!(
                "mamba_num_heads = {} is not a multiple of n_groups = {}",
                self.mamba_num_heads,
                self.n_groups
            );
        }
        if self.conv_kernel == 0 || self.chunk_size == 0 {
            bail!("conv_kernel and chunk_size must be positive");
        }
        Ok(())
    }

    pub fn num_kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn attn_head_dim(&self) -> usize {
        self.head_dim
            .or(self.attention_head_dim)
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Mamba inner width = heads × head_dim (`expand` is not used, model.md §2.1).
    pub fn mamba_d_inner(&self) -> usize {
        self.mamba_num_heads * self.mamba_head_dim
    }

    /// Channels of the depthwise conv: x | B | C.
    pub fn mamba_conv_dim(&self) -> usize {
        self.mamba_d_inner() + 2 * self.n_groups * self.ssm_state_size
    }

    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(TokenIds::to_vec)
            .unwrap_or_default()
    }
}

fn default_image_token() -> String {
    "<image>".into()
}
fn default_img_start() -> String {
    "<img>".into()
}
fn default_img_end() -> String {
    "</img>".into()
}
fn default_downsample_ratio() -> f64 {
    0.5
}
fn default_ps_version() -> String {
    "v2".into()
}
fn default_max_num_tiles() -> usize {
    12
}

/// Top-level `config.json` of `NemotronH_Nano_VL_V2`.
#[derive(Debug, Clone, Deserialize)]
pub struct VlConfig {
    #[serde(alias = "text_config")]
    pub llm_config: NemotronHConfig,
    /// Raw; parsed by the vision encoder (`model::radio`).
    pub vision_config: serde_json::Value,
    pub force_image_size: usize,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "default_downsample_ratio")]
    pub downsample_ratio: f64,
    #[serde(default = "default_ps_version")]
    pub ps_version: String,
    #[serde(default)]
    pub projector_hidden_size: Option<usize>,
    #[serde(default)]
    pub vit_hidden_size: Option<usize>,
    pub img_context_token_id: u32,
    #[serde(default = "default_image_token")]
    pub img_context_token: String,
    #[serde(default = "default_img_start")]
    pub img_start_token: String,
    #[serde(default = "default_img_end")]
    pub img_end_token: String,
    #[serde(default)]
    pub video_context_token: Option<String>,
    pub norm_mean: [f32; 3],
    pub norm_std: [f32; 3],
    #[serde(default = "default_true")]
    pub use_thumbnail: bool,
    /// InternVL-style configs call it `max_dynamic_patch`.
    #[serde(default = "default_max_num_tiles", alias = "max_dynamic_patch")]
    pub max_num_tiles: usize,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub image_tag_type: Option<String>,
    #[serde(default)]
    pub video_pruning_rate: Option<f64>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

/// `generation_config.json` (optional file).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct GenerationConfig {
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
}

/// Everything read from a checkpoint directory's JSON files.
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    pub model: VlConfig,
    pub generation: Option<GenerationConfig>,
    /// Union of `llm_config.eos_token_id`, the top-level one and `generation_config.json`'s.
    pub eos_token_ids: Vec<u32>,
}

impl CheckpointConfig {
    /// Read `config.json` and, when present, `generation_config.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self> {
        let model = VlConfig::load(&dir.join("config.json"))?;
        let gen_path = dir.join("generation_config.json");
        let generation = if gen_path.exists() {
            Some(read_json_file::<GenerationConfig>(&gen_path)?)
        } else {
            None
        };
        let eos_token_ids = eos_union(&model, generation.as_ref());
        Ok(CheckpointConfig {
            model,
            generation,
            eos_token_ids,
        })
    }
}

/// Union of all EOS ids, in first-seen order.
pub fn eos_union(model: &VlConfig, generation: Option<&GenerationConfig>) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    let sources = [
        model.llm_config.eos_token_id.as_ref(),
        model.eos_token_id.as_ref(),
        generation.and_then(|g| g.eos_token_id.as_ref()),
    ];
    for ids in sources.into_iter().flatten() {
        for id in ids.to_vec() {
            if !out.contains(&id) {
                out.push(id);
            }
        }
    }
    out
}

impl VlConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let mut cfg: VlConfig = read_json_file(path)?;
        cfg.llm_config
            .validate()
            .with_context(|| format!("{}: llm_config", path.display()))?;
        Ok(cfg)
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let mut cfg: VlConfig = parse_json_lenient(text)?;
        cfg.llm_config.validate().context("llm_config")?;
        Ok(cfg)
    }
}

fn read_json_file<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    parse_json_lenient(&text).with_context(|| format!("invalid {}", path.display()))
}

/// Parse JSON that may contain Python's bare `NaN`, `Infinity` and `-Infinity`: outside
/// strings they are rewritten to the strings `"NaN"`, `"Infinity"`, `"-Infinity"`, which the
/// float fields that may hold them accept. Errors name the field path.
pub fn parse_json_lenient<T: serde::de::DeserializeOwned>(text: &str) -> Result<T> {
    let fixed = quote_non_finite(text);
    let de = &mut serde_json::Deserializer::from_str(&fixed);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        anyhow::anyhow!("at `{path}`: {}", e.into_inner())
    })
}

fn quote_non_finite(text: &str) -> String {
    const WORDS: [&str; 3] = ["-Infinity", "Infinity", "NaN"];
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            i += 1;
            continue;
        }
        if b == b'"' {
            in_string = true;
            i += 1;
            continue;
        }
        if let Some(w) = WORDS.iter().find(|w| text[i..].starts_with(**w)) {
            out.push_str(&text[copied..i]);
            out.push('"');
            out.push_str(w);
            out.push('"');
            i += w.len();
            copied = i;
            continue;
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(llm_extra: &str) -> String {
        format!(
            r#"{{
            "llm_config": {{
                "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                "num_key_value_heads": 2, "mamba_num_heads": 8, "mamba_head_dim": 8,
                "ssm_state_size": 16, "eos_token_id": 12 {llm_extra}
            }},
            "vision_config": {{"args": {{"note": "NaN inside a string stays"}}}},
            "force_image_size": 64, "img_context_token_id": 993,
            "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5]
        }}"#
        )
    }

    #[test]
    fn parses_pattern_and_infinity() {
        let cfg = VlConfig::from_json_str(&minimal(
            r#", "hybrid_override_pattern": "M-*", "time_step_limit": [0.0, Infinity]"#,
        ))
        .unwrap();
        let llm = &cfg.llm_config;
        assert_eq!(
            llm.layers,
            vec![LayerKind::Mamba, LayerKind::Mlp, LayerKind::Attention]
        );
        assert_eq!(llm.time_step_limit, (0.0, f64::INFINITY));
        assert_eq!(llm.conv_kernel, 4);
        assert_eq!(llm.chunk_size, 128);
        assert_eq!(cfg.max_num_tiles, 12);
        assert_eq!(
            cfg.vision_config["args"]["note"],
            "NaN inside a string stays"
        );
    }

    #[test]
    fn accepts_legacy_names_and_block_type_list() {
        let cfg = VlConfig::from_json_str(&minimal(
            r#", "layers_block_type": ["mamba", "attention", "mlp"], "mamba_n_groups": 2,
               "mamba_d_conv": 3, "mamba_chunk_size": 32, "rms_norm_eps": 1e-6,
               "mamba_dt_limit": [-Infinity, NaN]"#,
        ))
        .unwrap();
        let llm = &cfg.llm_config;
        assert_eq!(llm.n_groups, 2);
        assert_eq!(llm.conv_kernel, 3);
        assert_eq!(llm.chunk_size, 32);
        assert_eq!(llm.layer_norm_epsilon, 1e-6);
        assert_eq!(llm.time_step_limit.0, f64::NEG_INFINITY);
        assert!(llm.time_step_limit.1.is_nan());
        assert_eq!(llm.layers[1], LayerKind::Attention);
    }

    #[test]
    fn missing_field_is_named() {
        let text =
            minimal(r#", "hybrid_override_pattern": "M""#).replace("\"hidden_size\": 64,", "");
        let err = format!("{:#}", VlConfig::from_json_str(&text).unwrap_err());
        assert!(
            err.contains("llm_config") && err.contains("hidden_size"),
            "{err}"
        );
        let err = format!("{:#}", VlConfig::from_json_str(&minimal("")).unwrap_err());
        assert!(err.contains("hybrid_override_pattern"), "{err}");
    }

    #[test]
    fn eos_union_merges_int_and_list() {
        let cfg = VlConfig::from_json_str(&minimal(r#", "hybrid_override_pattern": "M""#)).unwrap();
        let gen_cfg: GenerationConfig = parse_json_lenient(r#"{"eos_token_id": [2, 12]}"#).unwrap();
        assert_eq!(eos_union(&cfg, Some(&gen_cfg)), vec![12, 2]);
        assert_eq!(eos_union(&cfg, None), vec![12]);
    }

    #[test]
    fn tiny_checkpoint_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
        let cfg = CheckpointConfig::load(&dir).unwrap();
        assert_eq!(cfg.model.llm_config.layers.len(), 10);
        assert_eq!(cfg.eos_token_ids, vec![12, 2]);
    }
}
