//! A scripted `Engine` for HTTP tests: no model, deterministic output, and a
//! record of what it was asked and whether its receivers went away.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc};
use vlm_server::engine::{
    ChatRequest, ContentPart, Engine, EngineError, FinishReason, Generation, GenerationEvent,
    ModelInfo, Role, Usage,
};
use vlm_server::prompt::reasoning::reasoning_enabled;

pub const MAX_MODEL_LEN: usize = 8192;
/// What the fake "reasons" before `</think>` when reasoning is on; the tag is
/// split across deltas on purpose.
pub const REASONING_DELTAS: [&str; 3] = ["Let me look", " at it.</th", "ink>\n\n"];

#[derive(Debug, Clone)]
pub enum Script {
    /// Answer `echo: <last user text> images=<n> bytes=<image bytes>` one
    /// word per delta, `delay` apart (after reasoning deltas if reasoning is on).
    Echo { delay: Duration },
    /// Refuse at submit.
    Refuse(EngineError),
    /// Admit, then fail before the first token.
    FailAfterAdmit(EngineError),
    /// One token per `delay` until the receiver is dropped.
    Endless { delay: Duration },
    /// Exactly these deltas, then `Finished` with `reason`.
    Deltas(Vec<String>, FinishReason),
    /// These deltas, then `Failed` (a device error mid-generation).
    DeltasThenFail(Vec<String>, EngineError),
}

pub struct FakeEngine {
    script: Script,
    ready: AtomicBool,
    pub submitted: Mutex<Vec<ChatRequest>>,
    outcomes: Arc<Outcomes>,
}

/// How generations ended; shared with the tasks that produce them.
#[derive(Default)]
struct Outcomes {
    cancelled: AtomicUsize,
    completed: AtomicUsize,
    changed: Notify,
}

impl Outcomes {
    fn record(&self, cancelled: bool) {
        let counter = if cancelled {
            &self.cancelled
        } else {
            &self.completed
        };
        counter.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }
}

impl FakeEngine {
    pub fn new(script: Script) -> Self {
        FakeEngine {
            script,
            ready: AtomicBool::new(true),
            submitted: Mutex::new(Vec::new()),
            outcomes: Arc::default(),
        }
    }

    pub fn echo() -> Self {
        Self::new(Script::Echo {
            delay: Duration::from_millis(1),
        })
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn last_request(&self) -> ChatRequest {
        self.submitted
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request was submitted")
    }

    /// Generations whose receiver was dropped before they finished.
    pub fn cancelled(&self) -> usize {
        self.outcomes.cancelled.load(Ordering::SeqCst)
    }

    /// Generations that sent their final event.
    pub fn completed(&self) -> usize {
        self.outcomes.completed.load(Ordering::SeqCst)
    }

    /// Wait until `n` generations saw their receiver dropped.
    pub async fn wait_cancelled(&self, n: usize, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                let changed = self.outcomes.changed.notified();
                if self.cancelled() >= n {
                    break;
                }
                changed.await;
            }
        })
        .await
        .is_ok()
    }
}

/// The reply the echo script produces for a request.
pub fn echo_answer(request: &ChatRequest) -> String {
    let text = request
        .messages
        .iter()
        .rev()
        .find(|m| m.role == Role::User)
        .map(|m| {
            m.parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text(t) => Some(t.as_str()),
                    ContentPart::Image(_) => None,
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    let images: Vec<usize> = request
        .messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter_map(|p| match p {
            ContentPart::Image(bytes) => Some(bytes.len()),
            ContentPart::Text(_) => None,
        })
        .collect();
    format!(
        "echo: {text} images={} bytes={}",
        images.len(),
        images.iter().sum::<usize>()
    )
}

/// Like the real engine's preprocessing: only PNG, JPEG and WebP bytes pass.
fn check_images(request: &ChatRequest) -> Result<(), EngineError> {
    for (m, message) in request.messages.iter().enumerate() {
        for (p, part) in message.parts.iter().enumerate() {
            if let ContentPart::Image(bytes) = part {
                let known = bytes.starts_with(b"\x89PNG\r\n\x1a\n")
                    || bytes.starts_with(&[0xff, 0xd8, 0xff])
                    || (bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP");
                if !known {
                    return Err(EngineError::invalid(
                        "unsupported image format: supported formats are PNG, JPEG and WebP",
                        Some(&format!("messages[{m}].content[{p}]")),
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Engine for FakeEngine {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            max_model_len: MAX_MODEL_LEN,
            max_tiles: 12,
        }
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    async fn submit(&self, request: ChatRequest) -> Result<Generation, EngineError> {
        self.submitted.lock().unwrap().push(request.clone());
        check_images(&request)?;
        let (deltas, delay, endless) = match &self.script {
            Script::Refuse(err) => return Err(err.clone()),
            Script::FailAfterAdmit(err) => {
                let (tx, rx) = mpsc::channel(1);
                let _ = tx.try_send(GenerationEvent::Failed(err.clone()));
                return Ok(Generation { events: rx });
            }
            Script::Echo { delay } => {
                let mut deltas: Vec<String> = Vec::new();
                if reasoning_enabled(&request.messages) {
                    deltas.extend(REASONING_DELTAS.iter().map(|s| s.to_string()));
                }
                let answer = echo_answer(&request);
                let words: Vec<&str> = answer.split(' ').collect();
                for (i, word) in words.iter().enumerate() {
                    let sep = if i + 1 < words.len() { " " } else { "" };
                    deltas.push(format!("{word}{sep}"));
                }
                (deltas, *delay, false)
            }
            Script::Endless { delay } => (Vec::new(), *delay, true),
            Script::Deltas(deltas, _) => (deltas.clone(), Duration::ZERO, false),
            Script::DeltasThenFail(deltas, err) => {
                let (tx, rx) = mpsc::channel(deltas.len() + 1);
                for delta in deltas {
                    let _ = tx.try_send(GenerationEvent::Delta(delta.clone()));
                }
                let _ = tx.try_send(GenerationEvent::Failed(err.clone()));
                return Ok(Generation { events: rx });
            }
        };
        let reason = match &self.script {
            Script::Deltas(_, reason) => *reason,
            _ => FinishReason::Stop,
        };
        let (tx, rx) = mpsc::channel(4);
        let generated = Generated {
            tx,
            deltas,
            delay,
            endless,
            reason,
            prompt_tokens: 100,
        };
        let outcomes = Arc::clone(&self.outcomes);
        tokio::spawn(async move { outcomes.record(generated.run().await) });
        Ok(Generation { events: rx })
    }
}

struct Generated {
    tx: mpsc::Sender<GenerationEvent>,
    deltas: Vec<String>,
    delay: Duration,
    endless: bool,
    reason: FinishReason,
    prompt_tokens: usize,
}

impl Generated {
    /// Returns true if the receiver went away before the end.
    async fn run(self) -> bool {
        let mut sent = 0;
        let mut deltas = self.deltas.into_iter();
        loop {
            let next = if self.endless {
                Some(format!("tok{sent} "))
            } else {
                deltas.next()
            };
            let Some(delta) = next else { break };
            if !self.delay.is_zero() {
                tokio::select! {
                    _ = self.tx.closed() => return true,
                    _ = tokio::time::sleep(self.delay) => {}
                }
            }
            if self.tx.send(GenerationEvent::Delta(delta)).await.is_err() {
                return true;
            }
            sent += 1;
        }
        let usage = Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: sent,
        };
        self.tx
            .send(GenerationEvent::Finished {
                reason: self.reason,
                usage,
            })
            .await
            .is_err()
    }
}
