//! SSE for `stream: true`: a role chunk, content (or reasoning) chunks, a
//! chunk with `finish_reason`, a usage chunk if asked, then `data: [DONE]`.

use std::convert::Infallible;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt, stream};

use super::chat::{CompletionMeta, Progress};
use super::error::ApiError;
use super::protocol::{ChatCompletionChunk, ChunkChoice, Delta, UsageBody};
use super::reasoning::{ReasoningSplitter, Split};
use crate::engine::GenerationEvent;

/// Waits for the first event before answering, so that a request the engine
/// rejects late (a bad image found while preprocessing) still gets a proper
/// status instead of a 200 carrying an error.
pub async fn respond(
    mut progress: Progress,
    meta: CompletionMeta,
    reasoning: bool,
    include_usage: bool,
) -> Result<Response, ApiError> {
    let first = match progress.next().await {
        Some(GenerationEvent::Failed(err)) => return Err(progress.error(err)),
        None => return Err(Progress::ended_early()),
        Some(event) => event,
    };
    let chunks = ChunkStream {
        progress,
        meta,
        splitter: ReasoningSplitter::new(reasoning),
        include_usage,
        first: Some(first),
        phase: Phase::Role,
    };
    Ok(Sse::new(chunks.into_stream())
        .keep_alive(KeepAlive::default())
        .into_response())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Role,
    Body,
    Done,
}

struct ChunkStream {
    progress: Progress,
    meta: CompletionMeta,
    splitter: ReasoningSplitter,
    include_usage: bool,
    /// The event `respond` already took off the channel.
    first: Option<GenerationEvent>,
    phase: Phase,
}

impl ChunkStream {
    fn into_stream(self) -> impl Stream<Item = Result<Event, Infallible>> + Send {
        stream::unfold(self, |mut chunks| async move {
            let events = chunks.step().await?;
            Some((stream::iter(events.into_iter().map(Ok)), chunks))
        })
        .flatten()
    }

    /// The next events to send; `None` once `[DONE]` went out.
    async fn step(&mut self) -> Option<Vec<Event>> {
        match self.phase {
            Phase::Done => None,
            Phase::Role => {
                self.phase = Phase::Body;
                let delta = Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                    ..Delta::default()
                };
                Some(vec![self.chunk(delta, None)])
            }
            Phase::Body => {
                let event = match self.first.take() {
                    Some(event) => Some(event),
                    None => self.progress.next().await,
                };
                Some(self.on_event(event))
            }
        }
    }

    fn on_event(&mut self, event: Option<GenerationEvent>) -> Vec<Event> {
        let mut events = Vec::new();
        match event {
            Some(GenerationEvent::Delta(text)) => {
                let split = self.splitter.push(&text);
                self.push_split(split, &mut events);
            }
            Some(GenerationEvent::Finished { reason, usage }) => {
                let split = self.splitter.finish();
                self.push_split(split, &mut events);
                events.push(self.chunk(Delta::default(), Some(reason.as_str())));
                if self.include_usage {
                    events.push(self.usage_chunk(UsageBody::from(usage)));
                }
                events.push(self.done());
            }
            Some(GenerationEvent::Failed(err)) => {
                let err = self.progress.error(err);
                events.push(error_event(&err));
                events.push(self.done());
            }
            None => {
                events.push(error_event(&Progress::ended_early()));
                events.push(self.done());
            }
        }
        events
    }

    fn push_split(&self, split: Split, events: &mut Vec<Event>) {
        if !split.reasoning.is_empty() {
            let delta = Delta {
                reasoning_content: Some(split.reasoning),
                ..Delta::default()
            };
            events.push(self.chunk(delta, None));
        }
        if !split.content.is_empty() {
            let delta = Delta {
                content: Some(split.content),
                ..Delta::default()
            };
            events.push(self.chunk(delta, None));
        }
    }

    fn chunk(&self, delta: Delta, finish_reason: Option<&'static str>) -> Event {
        json_event(&ChatCompletionChunk {
            id: &self.meta.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.meta.model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: None,
        })
    }

    fn usage_chunk(&self, usage: UsageBody) -> Event {
        json_event(&ChatCompletionChunk {
            id: &self.meta.id,
            object: "chat.completion.chunk",
            created: self.meta.created,
            model: &self.meta.model,
            choices: Vec::new(),
            usage: Some(usage),
        })
    }

    fn done(&mut self) -> Event {
        self.phase = Phase::Done;
        Event::default().data("[DONE]")
    }
}

/// Mid-stream errors follow vLLM: a `data: {"error": ...}` event, then `[DONE]`.
fn error_event(err: &ApiError) -> Event {
    json_event(&err.body())
}

fn json_event(value: &impl serde::Serialize) -> Event {
    match serde_json::to_string(value) {
        Ok(json) => Event::default().data(json),
        Err(err) => {
            tracing::error!(%err, "serializing an SSE chunk");
            Event::default().data(
                r#"{"error":{"message":"serializing a chunk failed","type":"server_error","param":null,"code":"internal_error"}}"#,
            )
        }
    }
}
