//! Request preparation, done before a request is queued so that bad input is
//! refused at once: decode and tile images, render the chat template,
//! tokenize with image placeholders expanded, and check the context budget.

use std::sync::Arc;

use crate::engine::{ChatRequest, ContentPart, EngineError, SamplingParams};
use crate::preprocess::{
    ImageLimits, PreprocessError, Tiles, TilingConfig, decode_image, tile_image,
};
use crate::prompt::{ChatTemplate, PromptTokenizer};

/// Everything the model needs to run one request.
#[derive(Debug)]
pub struct PreparedRequest {
    pub prompt_ids: Vec<u32>,
    /// One entry per image, in prompt order.
    pub images: Vec<Tiles>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl PreparedRequest {
    pub fn num_tiles(&self) -> usize {
        self.images.iter().map(|t| t.num_tiles).sum()
    }
}

pub struct Preparer {
    pub tokenizer: Arc<PromptTokenizer>,
    pub template: ChatTemplate,
    pub tiling: TilingConfig,
    pub limits: ImageLimits,
    /// LLM embeddings per tile after pixel shuffle (256 for the real model).
    pub tokens_per_tile: usize,
    pub max_model_len: usize,
}

impl Preparer {
    pub fn prepare(&self, request: &ChatRequest) -> Result<PreparedRequest, EngineError> {
        let tiling = match request.max_tiles {
            Some(n) => self
                .tiling
                .with_max_tiles(n.clamp(1, self.tiling.max_tiles)),
            None => self.tiling.clone(),
        };
        let mut images = Vec::new();
        for (m, message) in request.messages.iter().enumerate() {
            for (p, part) in message.parts.iter().enumerate() {
                if let ContentPart::Image(bytes) = part {
                    let param = format!("messages[{m}].content[{p}]");
                    let invalid =
                        |e: PreprocessError| EngineError::invalid(e.to_string(), Some(&param));
                    let image = decode_image(bytes, &self.limits).map_err(invalid)?;
                    images.push(tile_image(&image, &tiling).map_err(invalid)?);
                }
            }
        }
        let rendered = self
            .template
            .render(&request.messages)
            .map_err(|e| EngineError::invalid(e.to_string(), Some("messages")))?;
        let tokens_per_image: Vec<usize> = images
            .iter()
            .map(|t| t.num_tiles * self.tokens_per_tile)
            .collect();
        let prompt_ids = self
            .tokenizer
            .encode_with_images(&rendered, &tokens_per_image)
            .map_err(|e| EngineError::invalid(e.to_string(), Some("messages")))?;
        if prompt_ids.len() >= self.max_model_len {
            return Err(EngineError::invalid(
                format!(
                    "the prompt is {} tokens but the context holds {} (prompt plus at least one generated token)",
                    prompt_ids.len(),
                    self.max_model_len
                ),
                Some("messages"),
            ));
        }
        let max_tokens = request
            .max_tokens
            .min(self.max_model_len - prompt_ids.len())
            .max(1);
        Ok(PreparedRequest {
            prompt_ids,
            images,
            max_tokens,
            sampling: request.sampling.clone(),
            stop: request.stop.clone(),
            ignore_eos: request.ignore_eos,
        })
    }
}
