//! `POST /v1/chat/completions`: validate, submit to the engine, answer with
//! one JSON completion or an SSE stream of chunks.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::extract::ApiJson;
use super::metrics::Metrics;
use super::protocol::{
    ChatCompletionRequest, ChatCompletionResponse, Choice, ResponseMessage, UsageBody,
};
use super::reasoning::split_reasoning;
use super::validate::validate;
use super::{AppState, images, stream};
use crate::engine::{Engine, EngineError, Generation, GenerationEvent};
use crate::prompt::reasoning::reasoning_enabled;

pub async fn chat_completions<E: Engine>(
    State(state): State<AppState<E>>,
    ApiJson(body): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    if !state.engine.is_ready() {
        return Err(ApiError::unavailable(
            "The model is still loading; retry later",
            state.config.retry_after_secs,
        ));
    }
    let mut chat = validate(body, &state.config, &state.engine.info())?;
    images::fetch_remote(&mut chat, &state.config).await?;
    let reasoning = reasoning_enabled(&chat.request.messages);
    state.metrics.request_admitted(chat.images);
    let started = Instant::now();
    let generation = state
        .engine
        .submit(chat.request)
        .await
        .map_err(|err| ApiError::from_engine(err, state.config.retry_after_secs))?;
    let progress = Progress {
        generation,
        metrics: state.metrics.clone(),
        retry_after_secs: state.config.retry_after_secs,
        started,
        saw_token: false,
        done: false,
    };
    let meta = CompletionMeta {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: chat.model,
    };
    if chat.stream {
        stream::respond(progress, meta, reasoning, chat.include_usage).await
    } else {
        complete(progress, meta, reasoning)
            .await
            .map(|r| Json(r).into_response())
    }
}

/// What every response and chunk of one completion shares.
pub struct CompletionMeta {
    pub id: String,
    pub created: u64,
    pub model: String,
}

async fn complete(
    mut progress: Progress,
    meta: CompletionMeta,
    reasoning: bool,
) -> Result<ChatCompletionResponse, ApiError> {
    let mut text = String::new();
    let (reason, usage) = loop {
        match progress.next().await {
            Some(GenerationEvent::Delta(delta)) => text.push_str(&delta),
            Some(GenerationEvent::Finished { reason, usage }) => break (reason, usage),
            Some(GenerationEvent::Failed(err)) => return Err(progress.error(err)),
            None => return Err(Progress::ended_early()),
        }
    };
    // Content is always a string, possibly empty (EOS at once, or max_tokens
    // spent while reasoning): never null, which nv-ingest would store as None.
    let (reasoning_content, content) = split_reasoning(&text, reasoning);
    Ok(ChatCompletionResponse {
        id: meta.id,
        object: "chat.completion",
        created: meta.created,
        model: meta.model,
        choices: vec![Choice {
            index: 0,
            message: ResponseMessage {
                role: "assistant",
                content,
                reasoning_content,
            },
            logprobs: None,
            finish_reason: reason.as_str(),
        }],
        usage: UsageBody::from(usage),
    })
}

/// A running generation and its timing. Dropping it (the client went away and
/// hyper dropped the handler future or the SSE stream) drops the engine's
/// receiver, which cancels the generation.
pub struct Progress {
    generation: Generation,
    metrics: Metrics,
    retry_after_secs: u64,
    started: Instant,
    saw_token: bool,
    done: bool,
}

impl Progress {
    pub async fn next(&mut self) -> Option<GenerationEvent> {
        let event = self.generation.events.recv().await;
        match &event {
            Some(GenerationEvent::Delta(delta)) if !self.saw_token && !delta.is_empty() => {
                self.saw_token = true;
                self.metrics.first_token(self.started.elapsed());
            }
            Some(GenerationEvent::Finished { usage, .. }) => {
                self.done = true;
                self.metrics.finished(*usage, self.started.elapsed());
            }
            Some(GenerationEvent::Failed(_)) | None => self.done = true,
            _ => {}
        }
        event
    }

    pub fn error(&self, err: EngineError) -> ApiError {
        ApiError::from_engine(err, self.retry_after_secs)
    }

    /// The engine closed the stream without a final event.
    pub fn ended_early() -> ApiError {
        ApiError::internal("the engine ended the generation without a result")
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if !self.done {
            tracing::debug!("client went away; cancelling its generation");
            self.metrics.client_disconnected();
        }
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
