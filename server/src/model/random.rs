//! Random weights in the checkpoint layout (model.md §8), for measuring the full-size model
//! where no checkpoint is at hand (`examples/bench_full.rs`). [`RandomWeights`] is a
//! [`VarBuilder`] backend: each tensor is drawn on the target device when a loader asks for
//! it, so the model builds exactly as from safetensors, with the same names and shapes.
//!
//! Values: N(0, 0.02) rounded to BF16 (like a BF16 checkpoint) for matrices and embeddings;
//! ones for norm weights, zeros for biases, and Mamba2's usual init for `A_log`, `dt_bias`
//! and `D`, so activations stay finite through all layers. Timings do not depend on them.

use std::collections::BTreeMap;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

use super::config::{LayerKind, VlConfig};

/// Standard deviation of the random matrices.
pub const WEIGHT_STD: f32 = 0.02;

/// RADIO dimensions a checkpoint's tensors would tell (model.md §3), read from `vision_config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisionShape {
    pub hidden: usize,
    pub layers: usize,
    pub mlp: usize,
    /// cls + register tokens.
    pub prefix: usize,
    pub patch: usize,
    /// Side of the position-embedding grid (max_resolution / patch).
    pub pos_grid: usize,
}

impl VisionShape {
    /// From `vision_config.{hidden_size, num_hidden_layers, intermediate_size,
    /// num_prefix_tokens, patch_size, max_resolution}` (falling back to `vit_hidden_size`).
    pub fn from_config(cfg: &VlConfig) -> anyhow::Result<Self> {
        let vc = &cfg.vision_config;
        let field = |key: &str| -> anyhow::Result<usize> {
            vc.get(key)
                .and_then(serde_json::Value::as_u64)
                .map(|v| v as usize)
                .with_context(|| format!("vision_config.{key} is missing or not an integer"))
        };
        let hidden = field("hidden_size").or_else(|e| cfg.vit_hidden_size.ok_or(e))?;
        let patch = field("patch_size").or_else(|e| cfg.patch_size.ok_or(e))?;
        let max_resolution = field("max_resolution")?;
        if patch == 0 || !max_resolution.is_multiple_of(patch) {
            bail!(
                "vision_config.max_resolution {max_resolution} is not a multiple of patch {patch}"
            );
        }
        Ok(VisionShape {
            hidden,
            layers: field("num_hidden_layers")?,
            mlp: field("intermediate_size")?,
            prefix: field("num_prefix_tokens")?,
            patch,
            pos_grid: max_resolution / patch,
        })
    }
}

/// Name → shape of every tensor the loaders read, in the VL checkpoint's layout.
pub fn checkpoint_layout(cfg: &VlConfig, vision: &VisionShape) -> BTreeMap<String, Vec<usize>> {
    let llm = &cfg.llm_config;
    let h = llm.hidden_size;
    let vocab = llm.vocab_size.unwrap_or(131_072);
    let mut w = BTreeMap::new();
    let mut put = |name: String, shape: &[usize]| {
        w.insert(name, shape.to_vec());
    };
    let lm = "language_model.backbone";
    put(format!("{lm}.embeddings.weight"), &[vocab, h]);
    let (heads, di, cd) = (
        llm.mamba_num_heads,
        llm.mamba_d_inner(),
        llm.mamba_conv_dim(),
    );
    let (q, kv) = (
        llm.num_attention_heads * llm.attn_head_dim(),
        llm.num_kv_heads() * llm.attn_head_dim(),
    );
    for (i, kind) in llm.layers.iter().enumerate() {
        let l = format!("{lm}.layers.{i}");
        put(format!("{l}.norm.weight"), &[h]);
        let m = format!("{l}.mixer");
        match kind {
            LayerKind::Mamba => {
                put(format!("{m}.in_proj.weight"), &[di + cd + heads, h]);
                put(format!("{m}.conv1d.weight"), &[cd, 1, llm.conv_kernel]);
                if llm.use_conv_bias {
                    put(format!("{m}.conv1d.bias"), &[cd]);
                }
                for n in ["A_log", "D", "dt_bias"] {
                    put(format!("{m}.{n}"), &[heads]);
                }
                put(format!("{m}.norm.weight"), &[di]);
                put(format!("{m}.out_proj.weight"), &[h, di]);
            }
            LayerKind::Attention => {
                put(format!("{m}.q_proj.weight"), &[q, h]);
                put(format!("{m}.k_proj.weight"), &[kv, h]);
                put(format!("{m}.v_proj.weight"), &[kv, h]);
                put(format!("{m}.o_proj.weight"), &[h, q]);
            }
            LayerKind::Mlp => {
                put(format!("{m}.up_proj.weight"), &[llm.intermediate_size, h]);
                put(format!("{m}.down_proj.weight"), &[h, llm.intermediate_size]);
            }
        }
    }
    put(format!("{lm}.norm_f.weight"), &[h]);
    put("language_model.lm_head.weight".into(), &[vocab, h]);

    let v = "vision_model.radio_model.model";
    let d = vision.hidden;
    let p = vision.patch;
    put(
        format!("{v}.patch_generator.embedder.weight"),
        &[d, 3 * p * p],
    );
    put(
        format!("{v}.patch_generator.pos_embed"),
        &[1, vision.pos_grid * vision.pos_grid, d],
    );
    put(
        format!("{v}.patch_generator.cls_token.token"),
        &[vision.prefix, d],
    );
    for k in 0..vision.layers {
        let b = format!("{v}.blocks.{k}");
        for n in ["norm1", "norm2"] {
            put(format!("{b}.{n}.weight"), &[d]);
            put(format!("{b}.{n}.bias"), &[d]);
        }
        put(format!("{b}.attn.qkv.weight"), &[3 * d, d]);
        put(format!("{b}.attn.qkv.bias"), &[3 * d]);
        put(format!("{b}.attn.proj.weight"), &[d, d]);
        put(format!("{b}.attn.proj.bias"), &[d]);
        put(format!("{b}.mlp.fc1.weight"), &[vision.mlp, d]);
        put(format!("{b}.mlp.fc1.bias"), &[vision.mlp]);
        put(format!("{b}.mlp.fc2.weight"), &[d, vision.mlp]);
        put(format!("{b}.mlp.fc2.bias"), &[d]);
    }

    let r = (1.0 / cfg.downsample_ratio).round() as usize;
    let shuffled = d * r * r;
    let mid = cfg.projector_hidden_size.unwrap_or(4 * h);
    put("mlp1.0.weight".into(), &[shuffled]);
    put("mlp1.1.weight".into(), &[mid, shuffled]);
    put("mlp1.3.weight".into(), &[h, mid]);
    w
}

/// How a tensor is filled, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Normal,
    Ones,
    Zeros,
    /// log(A), A ~ U[1, 16] (Mamba2 init).
    ALog,
    /// softplus⁻¹(dt), dt log-uniform in [1e-3, 0.1] (Mamba2 init).
    DtBias,
}

fn fill_for(name: &str) -> Fill {
    let last = name.rsplit('.').next().unwrap_or(name);
    match last {
        "A_log" => Fill::ALog,
        "dt_bias" => Fill::DtBias,
        "D" => Fill::Ones,
        "bias" => Fill::Zeros,
        "weight" if name.contains("norm") || name == "mlp1.0.weight" => Fill::Ones,
        _ => Fill::Normal,
    }
}

/// N(0, std) of `shape`, F32, on `dev`. On CPU (dry runs) the values cycle through one
/// block of 2²⁰ normals: drawing billions one by one would take minutes there.
fn normal(shape: &Shape, std: f32, dev: &Device) -> Result<Tensor> {
    const BLOCK: usize = 1 << 20;
    let n = shape.elem_count();
    if !dev.is_cpu() || n <= BLOCK {
        return Tensor::randn(0f32, std, shape, dev);
    }
    let block = Tensor::randn(0f32, std, BLOCK, dev)?;
    block
        .repeat(n.div_ceil(BLOCK))?
        .narrow(0, 0, n)?
        .reshape(shape)
}

/// Random tensors for the names and shapes of a layout (see [`checkpoint_layout`]).
pub struct RandomWeights {
    shapes: BTreeMap<String, Vec<usize>>,
    std: f32,
}

impl RandomWeights {
    pub fn new(shapes: BTreeMap<String, Vec<usize>>) -> Self {
        RandomWeights {
            shapes,
            std: WEIGHT_STD,
        }
    }

    pub fn shapes(&self) -> &BTreeMap<String, Vec<usize>> {
        &self.shapes
    }

    /// Elements of the tensors whose names start with `prefix`.
    pub fn elem_count(&self, prefix: &str) -> usize {
        self.shapes
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// A VarBuilder drawing tensors on `device`, converted to `dtype`.
    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    fn draw(&self, name: &str, shape: &Shape, dtype: DType, dev: &Device) -> Result<Tensor> {
        let t = match fill_for(name) {
            Fill::Ones => return Tensor::ones(shape, dtype, dev),
            Fill::Zeros => return Tensor::zeros(shape, dtype, dev),
            // Stored BF16, like the checkpoint: the model sees BF16-representable values.
            Fill::Normal => normal(shape, self.std, dev)?.to_dtype(DType::BF16)?,
            Fill::ALog => ((Tensor::rand(0f32, 1f32, shape, dev)? * 15.0)? + 1.0)?.log()?,
            Fill::DtBias => {
                let (lo, hi) = (1e-3f64.ln(), 0.1f64.ln());
                let dt = ((Tensor::rand(0f32, 1f32, shape, dev)? * (hi - lo))? + lo)?.exp()?;
                // softplus⁻¹(dt) = dt + log(1 − exp(−dt))
                (&dt + (1.0 - dt.neg()?.exp()?)?.log()?)?
            }
        };
        t.to_dtype(dtype)
    }
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        match self.shapes.get(name) {
            Some(dims) if dims.as_slice() == s.dims() => self.draw(name, &s, dtype, dev),
            Some(dims) => candle_core::bail!(
                "random weights: `{name}` has shape {dims:?} in the layout, the loader asks for {:?}",
                s.dims()
            ),
            None => candle_core::bail!("random weights: `{name}` is not in the layout"),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        match self.shapes.get(name) {
            Some(dims) => self.draw(name, &Shape::from_dims(dims), dtype, dev),
            None => candle_core::bail!("random weights: `{name}` is not in the layout"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::CheckpointConfig;
    use crate::model::vlm::NemotronVl;
    use std::path::Path;

    fn tiny_config() -> CheckpointConfig {
        CheckpointConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny")).unwrap()
    }

    /// The layout lists exactly the tiny checkpoint's tensors (less the buffers inference
    /// ignores), with their shapes.
    #[test]
    fn layout_matches_the_tiny_checkpoint() {
        let cfg = tiny_config();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
        let ckpt = crate::model::checkpoint::Checkpoint::open(&dir).unwrap();
        let vision = VisionShape::from_config(&cfg.model).unwrap();
        let layout = checkpoint_layout(&cfg.model, &vision);
        let mut names = ckpt.tensor_names();
        names.retain(|n| !n.contains("input_conditioner") && !n.ends_with("summary_idxs"));
        names.sort();
        assert_eq!(names, layout.keys().cloned().collect::<Vec<_>>());
        for n in &names {
            assert_eq!(ckpt.tensor_shape(n).as_ref(), layout.get(n), "{n}");
        }
    }

    #[test]
    fn random_model_builds_and_stays_finite() {
        let cfg = tiny_config();
        let vision = VisionShape::from_config(&cfg.model).unwrap();
        let weights = RandomWeights::new(checkpoint_layout(&cfg.model, &vision));
        let vb = weights.into_var_builder(DType::F32, &Device::Cpu);
        let model = NemotronVl::from_var_builder(cfg, vb).unwrap();
        let s = model.tile_size();
        let tiles = Tensor::randn(0f32, 1f32, (2, 3, s, s), &Device::Cpu).unwrap();
        let images = model.encode_images(&tiles).unwrap();
        let ctx = model.image_context_id();
        let mut ids = vec![10u32, 11, 500];
        ids.extend(std::iter::repeat_n(ctx, 2 * model.tokens_per_tile()));
        ids.extend([600u32, 700]);
        let embeds = model.embed_prompt(&ids, Some(&images)).unwrap();
        let pool = model.llm.new_pool(1).unwrap();
        let mut state = pool.acquire(None).unwrap().unwrap();
        let logits = model
            .llm
            .forward(
                &embeds,
                &[ids.len()],
                &pool,
                &mut [&mut state],
                crate::model::nemotron_h::LogitsFor::LastToken,
            )
            .unwrap();
        let v: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
        assert!(v.iter().any(|&x| x != v[0]), "logits are all equal");
    }

    #[test]
    fn fills_by_name() {
        assert_eq!(fill_for("a.mixer.A_log"), Fill::ALog);
        assert_eq!(fill_for("a.mixer.norm.weight"), Fill::Ones);
        assert_eq!(fill_for("v.blocks.0.norm1.bias"), Fill::Zeros);
        assert_eq!(fill_for("mlp1.0.weight"), Fill::Ones);
        assert_eq!(fill_for("mlp1.1.weight"), Fill::Normal);
        let a = RandomWeights::new(BTreeMap::new());
        let dt = a
            .draw("x.dt_bias", &Shape::from(1000), DType::F32, &Device::Cpu)
            .unwrap();
        // softplus(dt_bias) lands back in [1e-3, 0.1].
        let sp: Vec<f32> = (dt.exp().unwrap() + 1.0)
            .unwrap()
            .log()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(sp.iter().all(|&x| (0.99e-3..=0.101).contains(&x)), "{sp:?}");
    }
}
