//! From chat messages to prompt token ids: the chat template, the tokenizer,
//! and the expansion of image placeholders into image-context tokens.

pub mod reasoning;
pub mod template;
pub mod tokenizer;

pub use template::{ChatTemplate, TemplateError};
pub use tokenizer::{ImageTokens, PromptTokenizer, StreamDecoder, TokenizerError};
