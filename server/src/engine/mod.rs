//! The engine: owns the model, turns chat requests into generated tokens.
//!
//! The HTTP layer (`crate::api`) talks to the engine only through the
//! [`Engine`] trait and the plain types below, so the API can be tested
//! against a fake engine and the engine against the model without HTTP.

pub mod budget;
pub mod generate;
pub mod local;
pub mod prepare;
pub mod sampling;
pub mod scheduler;
pub mod stop;

use std::sync::Arc;

use tokio::sync::mpsc;

pub use sampling::SamplingParams;

/// Who said a message, as in the OpenAI chat API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One part of a message's content, in the order the client sent it.
#[derive(Debug, Clone)]
pub enum ContentPart {
    Text(String),
    /// Encoded image bytes (PNG, JPEG or WebP), already base64-decoded.
    Image(Arc<Vec<u8>>),
}

#[derive(Debug, Clone)]
pub struct ChatMessage {
    pub role: Role,
    pub parts: Vec<ContentPart>,
}

/// A validated request, ready for the engine.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    pub sampling: SamplingParams,
    /// Upper bound on generated tokens (already clamped by the API to the context).
    pub max_tokens: usize,
    /// Extra stop strings; generation ends before the first match.
    pub stop: Vec<String>,
    /// Per-request cap on tiles per image (1..=max), `None` = the server default.
    pub max_tiles: Option<usize>,
    /// Keep generating past EOS tokens (vLLM's `ignore_eos`; benchmarks).
    pub ignore_eos: bool,
}

/// Why generation ended (OpenAI `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An EOS token or a stop string.
    Stop,
    /// `max_tokens` or the context length reached.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// What the engine streams back for one request.
#[derive(Debug, Clone)]
pub enum GenerationEvent {
    /// Newly decoded text (may be empty while a multi-byte char is incomplete).
    Delta(String),
    /// Generation ended; the last event of a stream.
    Finished { reason: FinishReason, usage: Usage },
    /// Generation failed after it was admitted; the last event of a stream.
    Failed(EngineError),
}

/// Errors the engine reports. The API maps each kind to an HTTP status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// The request cannot be served as sent (bad image, prompt too long...): 400.
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    /// The queue is full: 429 with Retry-After.
    #[error("the server is at capacity; retry later")]
    Overloaded,
    /// The model is not loaded yet or is shutting down: 503.
    #[error("{0}")]
    Unavailable(String),
    /// A bug or a device failure: 500.
    #[error("{0}")]
    Internal(String),
}

impl EngineError {
    pub fn invalid(message: impl Into<String>, param: Option<&str>) -> Self {
        EngineError::InvalidRequest {
            message: message.into(),
            param: param.map(str::to_owned),
        }
    }
}

/// Static facts about the loaded model the API needs for validation and metadata.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Maximum total tokens (prompt + completion) per sequence.
    pub max_model_len: usize,
    /// Largest tiles-per-image the server allows.
    pub max_tiles: usize,
}

/// A running generation: events arrive on `events`; dropping the receiver
/// cancels the request and frees its resources.
pub struct Generation {
    pub events: mpsc::Receiver<GenerationEvent>,
}

pub trait Engine: Send + Sync + 'static {
    fn info(&self) -> ModelInfo;

    /// True once the model is loaded and warmed up.
    fn is_ready(&self) -> bool;

    /// Validate, preprocess and enqueue a request. Errors here (bad input,
    /// full queue) happen before any token is produced.
    fn submit(
        &self,
        request: ChatRequest,
    ) -> impl std::future::Future<Output = Result<Generation, EngineError>> + Send;
}
