//! The chat-endpoint probe: a real nv-ingest-shaped captioning request to the Service, run by a
//! task per captioner so the reconcile only reads the last result.
//!
//! The kubelet can only GET; this POST proves the whole path nv-ingest uses (Service, auth, image
//! decoding, generation). A task triggers a reconcile only when the outcome changes, so a healthy
//! captioner costs one request per interval and no API writes.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::reflector::ObjectRef;
use serde_json::{Value, json};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::crd::VlmCaptioner;

/// A 64x64 PNG (a red square crossed by a blue line): small, but a real image to caption.
pub const PROBE_PNG_BASE64: &str = "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAABJUlEQVR42tXPbarEIBBE0VrJ+z2LePtndjUTGAghH6Y1ttZtFLW7QI7+/t/L+mBLPwDXoGWjDfodXIPWG9Sg7YNo0O6NM+jYYhl02gUZdDWgGFSYIQwqj/0Nuk2YGxQJORsUzNkaFI96GlSVXg3v1ytp5QIGGNIByx+phhGAVMMgQJ5hHCDJMBSQYRgN6G6YAOhrmAPoaJgG6GWYCehimAx4bpgPeGiwADwxuACaDUaANoMXoMFgB6g1OAKqDKaAuMEXEDRYAyIGd8CtAQAoGxiAggEDuDKQAKcGGOBo4AF2BiRga6ACmg3VgNRqMHgBGgx2gFqDI6DKYAqIG3wBQYM1IGJwB9waAICygQEoGDCAKwMJcGqAAY4GHmBnQAK2BipgNXwBtWSP1i/NgUcAAAAASUVORK5CYII=";
/// Enough tokens to prove generation works, few enough to keep the probe cheap.
pub const PROBE_MAX_TOKENS: u32 = 8;
/// Captions in the status are cut to this many characters.
pub const SAMPLE_CHARS: usize = 80;
/// A task whose captioner has not been reconciled for this long stops (the captioner is gone:
/// every captioner is reconciled at least every resync period).
const STALE_AFTER: Duration = Duration::from_secs(15 * 60);

/// One probe request, fully resolved by the reconcile.
#[derive(Clone, PartialEq, Eq)]
pub struct ProbeTarget {
    pub url: String,
    pub bearer: Option<String>,
    pub body: String,
    pub interval: Duration,
    pub timeout: Duration,
}

impl std::fmt::Debug for ProbeTarget {
    // Never log the bearer token.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProbeTarget")
            .field("url", &self.url)
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The request body nv-ingest sends (nv-ingest-contract §4), with a small `max_tokens`.
pub fn request_body(c: &VlmCaptioner) -> Value {
    let mut messages = Vec::new();
    let system = &c.spec.captioning.system_prompt;
    if !system.is_empty() {
        messages.push(json!({"role": "system", "content": system}));
    }
    messages.push(json!({"role": "user", "content": [
        {"type": "text", "text": c.spec.captioning.prompt},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{PROBE_PNG_BASE64}")}},
    ]}));
    json!({
        "model": c.spec.served_model_name,
        "messages": messages,
        "max_tokens": PROBE_MAX_TOKENS,
        "temperature": 1.0,
        "top_p": 1.0,
        "stream": false,
    })
}

/// The HTTP call, behind a trait so tests can fake it. Returns the caption, or why not.
pub trait ChatClient: Send + Sync + 'static {
    fn post(&self, target: &ProbeTarget) -> BoxFuture<'static, Result<String, String>>;
}

/// How a probe ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Succeeded,
    Failed,
    TimedOut,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub latency: Duration,
    pub caption: Option<String>,
    pub message: Option<String>,
    pub last_success: Option<Time>,
}

impl Outcome {
    /// What a reconcile needs to hear about: the verdict and its message, not the latency.
    fn material(&self) -> (&Verdict, &Option<String>) {
        (&self.verdict, &self.message)
    }
}

struct Entry {
    /// A task is probing this captioner.
    running: bool,
    /// Tells this entry's task from one left over by an earlier entry for the same key.
    epoch: u64,
    target: Option<ProbeTarget>,
    last: Option<Outcome>,
    seen: Instant,
    wake: Arc<Notify>,
}

impl Entry {
    fn new() -> Self {
        Self {
            running: false,
            epoch: NEXT_EPOCH.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            target: None,
            last: None,
            seen: Instant::now(),
            wake: Arc::new(Notify::new()),
        }
    }
}

static NEXT_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Probe tasks and their last outcomes, keyed by captioner; shared through the `Context`.
pub struct Prober {
    client: Arc<dyn ChatClient>,
    permits: Arc<Semaphore>,
    entries: Arc<Mutex<HashMap<ObjectRef<VlmCaptioner>, Entry>>>,
    trigger: mpsc::UnboundedSender<ObjectRef<VlmCaptioner>>,
    triggers: Mutex<Option<mpsc::UnboundedReceiver<ObjectRef<VlmCaptioner>>>>,
}

impl Prober {
    /// `concurrency` bounds the probes in flight across all captioners.
    pub fn new(client: Arc<dyn ChatClient>, concurrency: usize) -> Self {
        let (trigger, rx) = mpsc::unbounded_channel();
        Self {
            client,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            entries: Arc::default(),
            trigger,
            triggers: Mutex::new(Some(rx)),
        }
    }

    /// The captioners whose probe outcome changed; the controller takes it once.
    pub fn take_triggers(&self) -> Option<mpsc::UnboundedReceiver<ObjectRef<VlmCaptioner>>> {
        lock(&self.triggers).take()
    }

    /// Records what to probe (`None`: nothing, e.g. no ready replica) and returns the last
    /// outcome. Starts the captioner's task on first use; a changed target is probed at once.
    pub fn observe(
        &self,
        key: ObjectRef<VlmCaptioner>,
        target: Option<ProbeTarget>,
    ) -> Option<Outcome> {
        let mut entries = lock(&self.entries);
        let entry = entries.entry(key.clone()).or_insert_with(Entry::new);
        let spawn = !entry.running && target.is_some();
        entry.running |= spawn;
        entry.seen = Instant::now();
        let changed = target.is_some() && entry.target != target;
        entry.target = target;
        let last = entry.last.clone();
        let epoch = entry.epoch;
        if changed && !spawn {
            entry.wake.notify_one();
        }
        drop(entries);
        if spawn {
            tokio::spawn(self.task(key, epoch));
        }
        last
    }

    /// Stops the captioner's task and drops its outcome (the captioner is being deleted).
    pub fn forget(&self, key: &ObjectRef<VlmCaptioner>) {
        if let Some(e) = lock(&self.entries).remove(key) {
            e.wake.notify_one();
        }
    }

    /// Seeds an outcome, as if a probe had just ended (tests, and nothing else).
    pub fn record(&self, key: ObjectRef<VlmCaptioner>, outcome: Outcome) {
        let mut entries = lock(&self.entries);
        entries.entry(key).or_insert_with(Entry::new).last = Some(outcome);
    }

    fn task(
        &self,
        key: ObjectRef<VlmCaptioner>,
        epoch: u64,
    ) -> impl Future<Output = ()> + Send + 'static {
        let (client, permits, entries, trigger) = (
            self.client.clone(),
            self.permits.clone(),
            self.entries.clone(),
            self.trigger.clone(),
        );
        async move {
            loop {
                let (target, wake, prev_success) = {
                    let map = lock(&entries);
                    let Some(e) = map.get(&key).filter(|e| e.epoch == epoch) else {
                        return;
                    };
                    if e.seen.elapsed() > STALE_AFTER {
                        drop(map);
                        lock(&entries).remove(&key);
                        return;
                    }
                    let prev = e.last.as_ref().and_then(|o| o.last_success.clone());
                    (e.target.clone(), e.wake.clone(), prev)
                };
                let mut interval = Duration::from_secs(60);
                if let Some(t) = target {
                    interval = t.interval;
                    let Ok(permit) = permits.acquire().await else {
                        return;
                    };
                    let outcome = run(client.as_ref(), &t, prev_success).await;
                    drop(permit);
                    let mut map = lock(&entries);
                    let Some(e) = map.get_mut(&key).filter(|e| e.epoch == epoch) else {
                        return;
                    };
                    // A result for a target replaced meanwhile is stale: probe the new one.
                    if e.target.as_ref() == Some(&t) {
                        let changed =
                            e.last.as_ref().map(Outcome::material) != Some(outcome.material());
                        e.last = Some(outcome);
                        if changed {
                            let _ = trigger.send(key.clone());
                        }
                    } else {
                        continue;
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(interval + jitter(interval)) => {}
                    _ = wake.notified() => {}
                }
            }
        }
    }
}

/// One probe, bounded by the target's timeout.
pub async fn run(
    client: &dyn ChatClient,
    target: &ProbeTarget,
    prev_success: Option<Time>,
) -> Outcome {
    let start = Instant::now();
    let result = tokio::time::timeout(target.timeout, client.post(target)).await;
    let latency = start.elapsed();
    match result {
        Ok(Ok(caption)) => Outcome {
            verdict: Verdict::Succeeded,
            latency,
            caption: Some(truncate(&caption, SAMPLE_CHARS)),
            message: None,
            last_success: Some(crate::reconcile::now()),
        },
        Ok(Err(why)) => Outcome {
            verdict: Verdict::Failed,
            latency,
            caption: None,
            message: Some(truncate(&why, 200)),
            last_success: prev_success,
        },
        Err(_) => Outcome {
            verdict: Verdict::TimedOut,
            latency,
            caption: None,
            message: Some(format!("no answer within {}s", target.timeout.as_secs())),
            last_success: prev_success,
        },
    }
}

/// Up to a tenth of the interval, so many captioners do not probe in lockstep.
fn jitter(interval: Duration) -> Duration {
    let max = (interval.as_millis() / 10).max(1) as u64;
    Duration::from_millis(RandomState::new().hash_one(Instant::now()) % max)
}

pub fn truncate(s: &str, max: usize) -> String {
    let s = s.trim();
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The real client: HTTP/1 over hyper, as nv-ingest's `requests.post` does.
pub struct HyperChatClient {
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        http_body_util::Full<hyper::body::Bytes>,
    >,
}

impl Default for HyperChatClient {
    fn default() -> Self {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build_http();
        Self { client }
    }
}

impl ChatClient for HyperChatClient {
    fn post(&self, target: &ProbeTarget) -> BoxFuture<'static, Result<String, String>> {
        let client = self.client.clone();
        let mut req = http::Request::post(&target.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json");
        if let Some(key) = &target.bearer {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {key}"));
        }
        let req = req.body(http_body_util::Full::new(hyper::body::Bytes::from(
            target.body.clone(),
        )));
        Box::pin(async move {
            use http_body_util::BodyExt;
            let req = req.map_err(|e| format!("bad request: {e}"))?;
            let res = client.request(req).await.map_err(|e| {
                let mut msg = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    msg = format!("{msg}: {s}");
                    src = s.source();
                }
                msg
            })?;
            let status = res.status();
            let body = res
                .into_body()
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            parse_answer(status, &body)
        })
    }
}

/// The caption in an OpenAI chat-completions answer, or a short reason.
pub fn parse_answer(status: http::StatusCode, body: &[u8]) -> Result<String, String> {
    if !status.is_success() {
        let text = String::from_utf8_lossy(body);
        return Err(format!(
            "HTTP {}: {}",
            status.as_u16(),
            truncate(&text, 120)
        ));
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("answer is not JSON: {e}"))?;
    v["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| "answer has no choices[0].message.content".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::captioner;

    #[test]
    fn body_is_what_nv_ingest_sends() {
        let b = request_body(&captioner());
        assert_eq!(b["model"], "nvidia/nemotron-nano-12b-v2-vl");
        assert_eq!(
            b["messages"][0],
            json!({"role": "system", "content": "/no_think"})
        );
        let user = &b["messages"][1]["content"];
        assert_eq!(user[0]["text"], "Caption the content of this image:");
        let url = user[1]["image_url"]["url"].as_str().unwrap();
        assert!(url.starts_with("data:image/png;base64,iVBORw0KGgo"));
        assert_eq!(b["max_tokens"], 8);
        assert_eq!(b["stream"], false);
        let mut c = captioner();
        c.spec.captioning.system_prompt.clear();
        assert_eq!(request_body(&c)["messages"][0]["role"], "user");
    }

    #[test]
    fn answers_are_parsed() {
        let ok = br#"{"choices":[{"message":{"role":"assistant","content":"A red square"}}]}"#;
        assert_eq!(
            parse_answer(http::StatusCode::OK, ok).unwrap(),
            "A red square"
        );
        let e = parse_answer(http::StatusCode::UNAUTHORIZED, b"bad key").unwrap_err();
        assert_eq!(e, "HTTP 401: bad key");
        assert!(parse_answer(http::StatusCode::OK, b"{}").is_err());
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(truncate(" ab ", 3), "ab");
    }

    #[test]
    fn jitter_stays_under_a_tenth() {
        for _ in 0..100 {
            assert!(jitter(Duration::from_secs(60)) < Duration::from_secs(6));
        }
    }
}
