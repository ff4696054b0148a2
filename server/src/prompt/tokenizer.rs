//! The checkpoint's `tokenizer.json`, with image-placeholder expansion (model.md §5.2).

use std::path::Path;

use tokenizers::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("loading tokenizer.json: {0}")]
    Load(String),
    #[error("token {token:?} is not in tokenizer.json")]
    MissingToken { token: String },
    #[error("the config says {token:?} has id {config_id} but tokenizer.json gives {tokenizer_id}")]
    IdMismatch {
        token: String,
        config_id: u32,
        tokenizer_id: u32,
    },
    #[error("tokenizing the prompt: {0}")]
    Encode(String),
    #[error("decoding tokens: {0}")]
    Decode(String),
    #[error("the prompt has {placeholders} image placeholders but the request has {images} images")]
    ImageCount { placeholders: usize, images: usize },
}

/// The strings that wrap and stand for image embeddings in the prompt.
#[derive(Debug, Clone)]
pub struct ImageTokens {
    /// The placeholder the template emits and that embeddings replace (`<image>`).
    pub context: String,
    pub start: String,
    pub end: String,
}

impl Default for ImageTokens {
    fn default() -> Self {
        ImageTokens {
            context: "<image>".into(),
            start: "<img>".into(),
            end: "</img>".into(),
        }
    }
}

pub struct PromptTokenizer {
    inner: Tokenizer,
    image_tokens: ImageTokens,
    image_context_id: u32,
}

impl PromptTokenizer {
    /// Load `tokenizer.json` and check the image-context id against the config's.
    pub fn load(
        model_dir: &Path,
        image_tokens: ImageTokens,
        config_context_id: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let inner = Tokenizer::from_file(model_dir.join("tokenizer.json"))
            .map_err(|e| TokenizerError::Load(e.to_string()))?;
        let image_context_id = inner.token_to_id(&image_tokens.context).ok_or_else(|| {
            TokenizerError::MissingToken {
                token: image_tokens.context.clone(),
            }
        })?;
        if let Some(config_id) = config_context_id
            && config_id != image_context_id
        {
            return Err(TokenizerError::IdMismatch {
                token: image_tokens.context.clone(),
                config_id,
                tokenizer_id: image_context_id,
            });
        }
        for token in [&image_tokens.start, &image_tokens.end] {
            if inner.token_to_id(token).is_none() {
                return Err(TokenizerError::MissingToken {
                    token: token.clone(),
                });
            }
        }
        Ok(PromptTokenizer {
            inner,
            image_tokens,
            image_context_id,
        })
    }

    pub fn image_context_id(&self) -> u32 {
        self.image_context_id
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenize plain text without BOS/EOS (the prompt format has no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Expand each image placeholder of a rendered prompt into
    /// `<img>` + `<image>` × n + `</img>`, then tokenize the whole text.
    /// `tokens_per_image[k]` is the embedding count of the k-th image.
    pub fn encode_with_images(
        &self,
        rendered: &str,
        tokens_per_image: &[usize],
    ) -> Result<Vec<u32>, TokenizerError> {
        let pieces: Vec<&str> = rendered.split(self.image_tokens.context.as_str()).collect();
        let placeholders = pieces.len() - 1;
        if placeholders != tokens_per_image.len() {
            return Err(TokenizerError::ImageCount {
                placeholders,
                images: tokens_per_image.len(),
            });
        }
        let context = &self.image_tokens.context;
        let mut expanded = String::with_capacity(
            rendered.len() + tokens_per_image.iter().sum::<usize>() * context.len(),
        );
        for (k, piece) in pieces.iter().enumerate() {
            expanded.push_str(piece);
            if let Some(&n) = tokens_per_image.get(k) {
                expanded.push_str(&self.image_tokens.start);
                for _ in 0..n {
                    expanded.push_str(context);
                }
                expanded.push_str(&self.image_tokens.end);
            }
        }
        let ids = self.encode(&expanded)?;
        // The added-token split must keep every placeholder a single token.
        let found = ids
            .iter()
            .filter(|&&id| id == self.image_context_id)
            .count();
        let wanted: usize = tokens_per_image.iter().sum();
        if found != wanted {
            return Err(TokenizerError::Encode(format!(
                "expected {wanted} image-context tokens after expansion, found {found}"
            )));
        }
        Ok(ids)
    }

    /// Decode ids to text, skipping special tokens (as vLLM does).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, true)
            .map_err(|e| TokenizerError::Decode(e.to_string()))
    }
}

/// Incremental detokenizer (special tokens skipped), owning its ids so it can
/// live beside the tokenizer: each step decodes a short window and emits the
/// new suffix once it no longer ends in an unfinished character (the
/// prefix/read-offset scheme of Hugging Face's `DecodeStream`).
#[derive(Debug, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl StreamDecoder {
    pub fn push(&mut self, tokenizer: &PromptTokenizer, id: u32) -> Result<String, TokenizerError> {
        self.ids.push(id);
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        if text.len() <= prefix.len() || text.ends_with('\u{FFFD}') || !text.starts_with(&prefix) {
            return Ok(String::new());
        }
        self.prefix_offset = self.read_offset;
        self.read_offset = self.ids.len();
        Ok(text[prefix.len()..].to_owned())
    }

    /// The text still held back at the end of generation (an unfinished
    /// character decodes lossily, as a whole-sequence decode would).
    pub fn finish(&mut self, tokenizer: &PromptTokenizer) -> Result<String, TokenizerError> {
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let text = tokenizer.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text
            .strip_prefix(prefix.as_str())
            .unwrap_or_default()
            .to_owned())
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn tiny() -> PromptTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
        PromptTokenizer::load(&dir, ImageTokens::default(), None).unwrap()
    }

    #[test]
    fn streamed_text_equals_whole_decode() {
        let t = tiny();
        let ids = t
            .encode("Hello there, caption this: a chart of résumé data — 42%!")
            .unwrap();
        let mut d = StreamDecoder::default();
        let mut streamed: String = ids.iter().map(|&id| d.push(&t, id).unwrap()).collect();
        streamed.push_str(&d.finish(&t).unwrap());
        assert_eq!(streamed, t.decode(&ids).unwrap());
        // Byte-level tokens that split a character: held back, then flushed lossily.
        let golden = [84u32, 50, 236, 297, 230, 40, 200, 150, 230, 231];
        let mut d = StreamDecoder::default();
        let mut streamed: String = golden.iter().map(|&id| d.push(&t, id).unwrap()).collect();
        streamed.push_str(&d.finish(&t).unwrap());
        assert_eq!(streamed, t.decode(&golden).unwrap());
    }

    #[test]
    fn image_placeholders_expand_to_context_runs() {
        let t = tiny();
        let ids = t
            .encode_with_images("a <image>\nb <image>\n", &[3, 2])
            .unwrap();
        let ctx = t.image_context_id();
        assert_eq!(ids.iter().filter(|&&i| i == ctx).count(), 5);
        let start = t.token_id("<img>").unwrap();
        let end = t.token_id("</img>").unwrap();
        let first = ids.iter().position(|&i| i == start).unwrap();
        assert_eq!(&ids[first + 1..first + 4], &[ctx, ctx, ctx]);
        assert_eq!(ids[first + 4], end);
        let err = t.encode_with_images("one <image>", &[1, 1]).unwrap_err();
        assert!(matches!(
            err,
            TokenizerError::ImageCount {
                placeholders: 1,
                images: 2
            }
        ));
    }

    #[test]
    fn a_config_id_that_disagrees_with_the_tokenizer_is_refused() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny");
        let err = PromptTokenizer::load(&dir, ImageTokens::default(), Some(5))
            .err()
            .unwrap();
        assert!(err.to_string().contains("<image>"), "{err}");
    }
}
