//! What the HTTP layer needs to know: names it answers to, keys, limits.

use std::fmt;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The NIM's model name; nv-ingest sends it by default.
pub const DEFAULT_SERVED_MODEL_NAME: &str = "nvidia/nemotron-nano-12b-v2-vl";
/// nv-ingest re-encodes images as PNG and may send several MB (contract §5).
pub const DEFAULT_MAX_BODY_BYTES: usize = 32 * 1024 * 1024;
pub const DEFAULT_MAX_IMAGES_PER_REQUEST: usize = 4;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

#[derive(Clone)]
pub struct ApiConfig {
    /// The `model` id clients must send and `/v1/models` reports.
    pub served_model_name: String,
    /// Other accepted `model` values.
    pub aliases: Vec<String>,
    /// Bearer keys; empty means every request is accepted.
    pub api_keys: ApiKeys,
    /// Largest accepted request body (413 above).
    pub max_body_bytes: usize,
    pub max_images_per_request: usize,
    /// Chat requests admitted at once at the HTTP layer (queued + running);
    /// more get 429 before their body is read.
    pub max_in_flight: usize,
    /// `max_tokens` when the client sends none: the engine clamps it to the
    /// context left after the prompt, which only it knows.
    pub default_max_tokens: usize,
    /// Accept `http(s)://` image URLs (refused with 400 when false).
    pub allow_remote_images: bool,
    /// Seconds clients are told to wait on 429 and 503.
    pub retry_after_secs: u64,
    /// `version` in `/v1/metadata`.
    pub version: String,
    /// `modelInfo[0].modelUrl` in `/v1/metadata`.
    pub model_url: String,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            served_model_name: DEFAULT_SERVED_MODEL_NAME.to_owned(),
            aliases: Vec::new(),
            api_keys: ApiKeys::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_images_per_request: DEFAULT_MAX_IMAGES_PER_REQUEST,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            default_max_tokens: usize::MAX,
            allow_remote_images: false,
            retry_after_secs: 1,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            model_url: String::new(),
        }
    }
}

impl ApiConfig {
    /// True if `model` names this server's model.
    pub fn serves(&self, model: &str) -> bool {
        model == self.served_model_name || self.aliases.iter().any(|a| a == model)
    }
}

impl fmt::Debug for ApiConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiConfig")
            .field("served_model_name", &self.served_model_name)
            .field("aliases", &self.aliases)
            .field("api_keys", &self.api_keys)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_images_per_request", &self.max_images_per_request)
            .field("max_in_flight", &self.max_in_flight)
            .field("default_max_tokens", &self.default_max_tokens)
            .field("allow_remote_images", &self.allow_remote_images)
            .field("retry_after_secs", &self.retry_after_secs)
            .field("version", &self.version)
            .field("model_url", &self.model_url)
            .finish()
    }
}

/// Accepted bearer keys, kept only as SHA-256 digests so that comparing equal
/// length values in constant time leaks neither content nor length, and the
/// keys themselves cannot end up in a log.
#[derive(Clone, Default)]
pub struct ApiKeys {
    digests: Vec<[u8; 32]>,
}

impl ApiKeys {
    /// Empty and whitespace-only keys are dropped: an empty list means no auth.
    pub fn new<I, S>(keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let digests = keys
            .into_iter()
            .filter(|k| !k.as_ref().trim().is_empty())
            .map(|k| digest(k.as_ref().trim()))
            .collect();
        ApiKeys { digests }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Constant time in the token and in which key matches.
    pub fn accepts(&self, token: &str) -> bool {
        let candidate = digest(token);
        self.digests
            .iter()
            .fold(subtle::Choice::from(0), |found, key| {
                found | key.ct_eq(&candidate)
            })
            .into()
    }
}

impl fmt::Debug for ApiKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ApiKeys({} redacted)", self.digests.len())
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = ApiKeys::new(["alpha", " beta "]);
        assert_eq!(keys.len(), 2);
        assert!(keys.accepts("alpha"));
        assert!(keys.accepts("beta"));
        assert!(!keys.accepts("alph"));
        assert!(!keys.accepts("alphaa"));
        assert!(!keys.accepts(""));
    }

    #[test]
    fn blank_keys_mean_no_auth() {
        assert!(ApiKeys::new(["", "  "]).is_empty());
        assert!(ApiKeys::new(Vec::<String>::new()).is_empty());
    }

    #[test]
    fn debug_never_shows_keys() {
        let config = ApiConfig {
            api_keys: ApiKeys::new(["s3cret-key"]),
            ..ApiConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("1 redacted"), "{shown}");
    }

    #[test]
    fn aliases_are_served() {
        let config = ApiConfig {
            aliases: vec!["vlm".into()],
            ..ApiConfig::default()
        };
        assert!(config.serves(DEFAULT_SERVED_MODEL_NAME));
        assert!(config.serves("vlm"));
        assert!(!config.serves("gpt-4o"));
    }
}
