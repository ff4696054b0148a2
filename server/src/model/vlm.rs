//! The whole model, `NemotronH_Nano_VL_V2`: RADIO vision encoder → pixel
//! shuffle → `mlp1` projector → image embeddings spliced into the NemotronH
//! prompt embeddings at the image-context token positions (model.md §1, §5.2).

use std::path::Path;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::checkpoint::Checkpoint;
use super::config::CheckpointConfig;
use super::nemotron_h::{LLM_PREFIX, NemotronH};
use super::projector::{PROJECTOR_PREFIX, Projector, pixel_shuffle};
use super::radio::{RADIO_PREFIX, RadioConfig, RadioEncoder};

pub struct NemotronVl {
    pub config: CheckpointConfig,
    pub vision: RadioEncoder,
    pub projector: Projector,
    pub llm: NemotronH,
    tile_size: usize,
}

impl NemotronVl {
    /// Load a checkpoint directory (memory-mapped) onto `device`, computing in `dtype`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let config = CheckpointConfig::load(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_var_builder(config, ckpt.var_builder(dtype, device))
    }

    /// Build from any weight source laid out like the checkpoint (`vb` at its root, with
    /// the dtype and device to run in), e.g. [`super::random::RandomWeights`].
    pub fn from_var_builder(config: CheckpointConfig, vb: VarBuilder) -> Result<Self> {
        let cfg = &config.model;
        let tile_size = cfg.force_image_size;
        let vision_cfg = RadioConfig::from_vision_config(&cfg.vision_config)
            .context("config.json: vision_config")?;
        let mut vision = RadioEncoder::load(&vision_cfg, vb.pp(RADIO_PREFIX), &[tile_size])
            .context("loading the RADIO vision encoder")?;
        // Tiles are always `tile_size` square (preprocessing resizes to it).
        vision.release_position_grid();
        let projector =
            Projector::load(vb.pp(PROJECTOR_PREFIX)).context("loading the mlp1 projector")?;
        let llm = NemotronH::new(&cfg.llm_config, vb.pp(LLM_PREFIX))
            .context("loading the NemotronH language model")?;

        let model = NemotronVl {
            tile_size,
            vision,
            projector,
            llm,
            config,
        };
        model.check_shapes_chain()?;
        // Loading frees many weight-sized temporaries (dtype checks, conversions).
        crate::memory::release_free_memory();
        Ok(model)
    }

    /// The vision output, shuffled, must fit the projector, whose output must fit the LLM.
    fn check_shapes_chain(&self) -> Result<()> {
        let cfg = &self.config.model;
        let r = (1.0 / cfg.downsample_ratio).round() as usize;
        let shuffled = self.vision.hidden_size() * r * r;
        if shuffled != self.projector.input_size() {
            bail!(
                "vision width {} × {r}² = {shuffled} does not match mlp1 input {}",
                self.vision.hidden_size(),
                self.projector.input_size()
            );
        }
        if !self.grid_side().is_multiple_of(r) {
            bail!(
                "force_image_size {} gives a {}-patch grid, not divisible by {r}",
                self.tile_size,
                self.grid_side()
            );
        }
        if cfg.ps_version != "v2" {
            bail!(
                "config.json: ps_version {:?} is not supported (this model uses \"v2\")",
                cfg.ps_version
            );
        }
        Ok(())
    }

    fn grid_side(&self) -> usize {
        self.tile_size / self.vision.patch_size()
    }

    pub fn tile_size(&self) -> usize {
        self.tile_size
    }

    /// LLM embeddings per tile: (S/p)² · downsample_ratio² (256 for the real model).
    pub fn tokens_per_tile(&self) -> usize {
        let r = (1.0 / self.config.model.downsample_ratio).round() as usize;
        let side = self.grid_side() / r;
        side * side
    }

    pub fn image_context_id(&self) -> u32 {
        self.config.model.img_context_token_id
    }

    pub fn device(&self) -> &Device {
        self.llm.device()
    }

    /// Normalized tiles `[n, 3, S, S]` → image embeddings `[n · tokens_per_tile, llm_hidden]`,
    /// tile after tile in the order given.
    pub fn encode_images(&self, tiles: &Tensor) -> Result<Tensor> {
        let side = self.grid_side();
        let features = self.vision.forward(&tiles.to_dtype(self.llm.dtype())?)?; // [n, side², vit]
        let shuffled = pixel_shuffle(&features, (side, side), self.config.model.downsample_ratio)?;
        let embeds = self.projector.forward(&shuffled)?; // [n, tokens, hidden]
        let (n, tokens, hidden) = embeds.dims3()?;
        if self.device().is_cpu() {
            crate::memory::release_after_pass(features.dim(0)? * features.dim(1)?);
        }
        Ok(embeds.reshape((n * tokens, hidden))?)
    }

    /// Token embeddings of `ids` with the rows at image-context positions
    /// replaced, in order, by `image_embeds` `[k, hidden]` (k must equal the
    /// number of those positions).
    pub fn embed_prompt(&self, ids: &[u32], image_embeds: Option<&Tensor>) -> Result<Tensor> {
        let device = self.device();
        let context_id = self.image_context_id();
        let positions = ids.iter().filter(|&&id| id == context_id).count();
        let provided = match image_embeds {
            Some(e) => e.dim(0)?,
            None => 0,
        };
        if positions != provided {
            bail!(
                "the prompt has {positions} image-context tokens but {provided} image embeddings"
            );
        }
        let text = self.llm.embed(&Tensor::new(ids, device)?)?; // [T, hidden]
        let Some(images) = image_embeds else {
            return Ok(text);
        };
        // Gather rows from [text; images]: position t takes text row t, or
        // image row k for the k-th image-context position.
        let t = ids.len() as u32;
        let mut next_image = 0u32;
        let rows: Vec<u32> = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                if id == context_id {
                    next_image += 1;
                    t + next_image - 1
                } else {
                    i as u32
                }
            })
            .collect();
        let all = Tensor::cat(&[&text, &images.to_dtype(text.dtype())?], 0)?;
        Ok(all.index_select(&Tensor::new(rows.as_slice(), device)?, 0)?)
    }
}
