//! Checking an OpenAI chat request and turning it into an `engine::ChatRequest`.
//! Every error names the offending parameter.

use std::sync::Arc;

use super::config::ApiConfig;
use super::error::ApiError;
use super::images::{ImageSource, parse_image_url};
use super::protocol::{self, ChatCompletionRequest, MessageContent, RequestMessage, StopField};
use crate::engine::{ChatMessage, ChatRequest, ContentPart, ModelInfo, Role, SamplingParams};

/// OpenAI's limit on stop sequences.
const MAX_STOP_SEQUENCES: usize = 4;

/// A request that passed validation.
#[derive(Debug)]
pub struct ValidChat {
    pub request: ChatRequest,
    /// The model name to report back (the served name, even for an alias).
    pub model: String,
    pub stream: bool,
    pub include_usage: bool,
    pub images: usize,
    /// Remote image URLs to fetch, with where their bytes go:
    /// (message index, part index, url).
    pub remote_images: Vec<(usize, usize, String)>,
}

pub fn validate(
    body: ChatCompletionRequest,
    config: &ApiConfig,
    info: &ModelInfo,
) -> Result<ValidChat, ApiError> {
    if let Some(model) = body.model.as_deref()
        && !config.serves(model)
    {
        return Err(ApiError::model_not_found(model, &config.served_model_name));
    }
    match body.n {
        None | Some(1) => {}
        Some(n) => {
            return Err(ApiError::invalid(
                format!("n = {n} is not supported; only n = 1"),
                "n",
            ));
        }
    }
    let mut remote_images = Vec::new();
    let messages = convert_messages(&body.messages, config, &mut remote_images)?;
    let images = messages
        .iter()
        .flat_map(|m| &m.parts)
        .filter(|p| matches!(p, ContentPart::Image(_)))
        .count();
    if images > config.max_images_per_request {
        return Err(ApiError::invalid(
            format!(
                "The request has {images} images; at most {} are allowed per request",
                config.max_images_per_request
            ),
            "messages",
        ));
    }
    let stream = body.stream.unwrap_or(false);
    let include_usage = body
        .stream_options
        .as_ref()
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let request = ChatRequest {
        messages,
        sampling: sampling(&body)?,
        max_tokens: max_tokens(&body, config, info)?,
        stop: stop_strings(body.stop)?,
        max_tiles: max_tiles(body.max_tiles, info)?,
        ignore_eos: body.ignore_eos.unwrap_or(false),
    };
    Ok(ValidChat {
        request,
        model: config.served_model_name.clone(),
        stream,
        include_usage,
        images,
        remote_images,
    })
}

fn convert_messages(
    messages: &[RequestMessage],
    config: &ApiConfig,
    remote: &mut Vec<(usize, usize, String)>,
) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid("messages must not be empty", "messages"));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, message)| convert_message(i, message, config, remote))
        .collect()
}

fn convert_message(
    i: usize,
    message: &RequestMessage,
    config: &ApiConfig,
    remote: &mut Vec<(usize, usize, String)>,
) -> Result<ChatMessage, ApiError> {
    let role = match message.role.as_str() {
        "system" | "developer" => Role::System,
        "user" => Role::User,
        "assistant" => Role::Assistant,
        "tool" | "function" => {
            return Err(ApiError::invalid(
                format!(
                    "'{}' messages are not supported: this server does not call tools",
                    message.role
                ),
                format!("messages[{i}].role"),
            ));
        }
        other => {
            return Err(ApiError::invalid(
                format!("Unknown role '{other}': expected system, user or assistant"),
                format!("messages[{i}].role"),
            ));
        }
    };
    let parts = match &message.content {
        None if role == Role::Assistant => Vec::new(),
        None => {
            return Err(ApiError::invalid(
                "content is required",
                format!("messages[{i}].content"),
            ));
        }
        Some(MessageContent::Text(text)) => vec![ContentPart::Text(text.clone())],
        Some(MessageContent::Parts(parts)) => parts
            .iter()
            .enumerate()
            .map(|(j, part)| convert_part(i, j, part, role, config, remote))
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok(ChatMessage { role, parts })
}

/// A remote image becomes an empty placeholder, filled in after fetching.
fn convert_part(
    i: usize,
    j: usize,
    part: &protocol::ContentPart,
    role: Role,
    config: &ApiConfig,
    remote: &mut Vec<(usize, usize, String)>,
) -> Result<ContentPart, ApiError> {
    let param = format!("messages[{i}].content[{j}]");
    match part.kind.as_str() {
        "text" => match &part.text {
            Some(text) => Ok(ContentPart::Text(text.clone())),
            None => Err(ApiError::invalid(
                "a text part needs a 'text' string",
                format!("{param}.text"),
            )),
        },
        "image_url" => {
            let param = format!("{param}.image_url");
            if role != Role::User {
                return Err(ApiError::invalid(
                    "images are only supported in user messages",
                    param,
                ));
            }
            let Some(image_url) = &part.image_url else {
                return Err(ApiError::invalid(
                    "an image_url part needs an 'image_url' object with a 'url'",
                    param,
                ));
            };
            match parse_image_url(image_url.url(), config.allow_remote_images, &param)? {
                ImageSource::Inline(bytes) => Ok(ContentPart::Image(Arc::new(bytes))),
                ImageSource::Remote(url) => {
                    remote.push((i, j, url));
                    Ok(ContentPart::Image(Arc::new(Vec::new())))
                }
            }
        }
        other => Err(ApiError::invalid(
            format!("Unsupported content part type '{other}': expected 'text' or 'image_url'"),
            format!("{param}.type"),
        )),
    }
}

fn sampling(body: &ChatCompletionRequest) -> Result<SamplingParams, ApiError> {
    // OpenAI's defaults; temperature 0 means greedy.
    let temperature = body.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            format!("temperature = {temperature} is out of range [0, 2]"),
            "temperature",
        ));
    }
    let top_p = body.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::invalid(
            format!("top_p = {top_p} is out of range (0, 1]"),
            "top_p",
        ));
    }
    let top_k = match body.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
        Some(k) => {
            return Err(ApiError::invalid(
                format!("top_k = {k} is invalid: use -1 or 0 to disable, or a positive count"),
                "top_k",
            ));
        }
    };
    Ok(SamplingParams {
        temperature: temperature as f32,
        top_p: top_p as f32,
        top_k,
        // Negative seeds are valid in OpenAI's API; keep their bits.
        seed: body.seed.map(|s| s as u64),
    })
}

/// `max_completion_tokens` wins over the older `max_tokens`. Values over the
/// context length are clamped, not refused; when absent, the configured
/// default (normally "no limit") lets the engine stop at the end of context.
fn max_tokens(
    body: &ChatCompletionRequest,
    config: &ApiConfig,
    info: &ModelInfo,
) -> Result<usize, ApiError> {
    let (value, param) = match (body.max_completion_tokens, body.max_tokens) {
        (Some(v), _) => (Some(v), "max_completion_tokens"),
        (None, v) => (v, "max_tokens"),
    };
    let requested = match value {
        None => config.default_max_tokens,
        Some(v) if v >= 1 => usize::try_from(v).unwrap_or(usize::MAX),
        Some(v) => {
            return Err(ApiError::invalid(
                format!("{param} = {v} must be at least 1"),
                param,
            ));
        }
    };
    Ok(requested.min(info.max_model_len.max(1)))
}

fn stop_strings(stop: Option<StopField>) -> Result<Vec<String>, ApiError> {
    let stops = match stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s],
        Some(StopField::Many(list)) => list,
    };
    if stops.len() > MAX_STOP_SEQUENCES {
        return Err(ApiError::invalid(
            format!(
                "{} stop sequences given; at most {MAX_STOP_SEQUENCES} are allowed",
                stops.len()
            ),
            "stop",
        ));
    }
    Ok(stops.into_iter().filter(|s| !s.is_empty()).collect())
}

fn max_tiles(value: Option<i64>, info: &ModelInfo) -> Result<Option<usize>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 && (v as u64) <= info.max_tiles as u64 => Ok(Some(v as usize)),
        Some(v) => Err(ApiError::invalid(
            format!("max_tiles = {v} is out of range [1, {}]", info.max_tiles),
            "max_tiles",
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn info() -> ModelInfo {
        ModelInfo {
            max_model_len: 8192,
            max_tiles: 12,
        }
    }

    fn check(body: serde_json::Value) -> Result<ValidChat, ApiError> {
        let body: ChatCompletionRequest = serde_json::from_value(body).expect("parses");
        validate(body, &ApiConfig::default(), &info())
    }

    fn nv_ingest_body() -> serde_json::Value {
        json!({
            "model": "nvidia/nemotron-nano-12b-v2-vl",
            "messages": [
                {"role": "system", "content": "/no_think"},
                {"role": "user", "content": [
                    {"type": "text", "text": "Caption the content of this image:"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
                ]}
            ],
            "max_tokens": 512, "temperature": 1.0, "top_p": 1.0, "stream": false
        })
    }

    #[test]
    fn nv_ingest_request_becomes_an_engine_request() {
        let valid = check(nv_ingest_body()).unwrap();
        let r = &valid.request;
        assert_eq!(r.messages.len(), 2);
        assert_eq!(r.messages[0].role, Role::System);
        assert!(
            matches!(&r.messages[1].parts[1], ContentPart::Image(b) if b.starts_with(b"\x89PNG"))
        );
        assert_eq!(r.max_tokens, 512);
        assert_eq!(r.sampling.temperature, 1.0);
        assert_eq!((valid.stream, valid.images), (false, 1));
    }

    #[test]
    fn defaults_and_clamps() {
        let valid = check(json!({"messages": [{"role": "developer", "content": "hi"}]})).unwrap();
        assert_eq!(valid.request.messages[0].role, Role::System);
        assert_eq!(valid.request.max_tokens, 8192);
        let valid = check(json!({"messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 10, "max_completion_tokens": 99999, "top_k": -1, "seed": -1,
            "stop": "END"}))
        .unwrap();
        assert_eq!(valid.request.max_tokens, 8192);
        assert_eq!(valid.request.sampling.top_k, 0);
        assert_eq!(valid.request.sampling.seed, Some(u64::MAX));
        assert_eq!(valid.request.stop, vec!["END".to_string()]);
    }

    #[test]
    fn errors_name_the_parameter() {
        let user = json!({"role": "user", "content": "hi"});
        for (body, status, param) in [
            (json!({"messages": []}), 400, "messages"),
            (json!({"messages": [user], "n": 2}), 400, "n"),
            (json!({"messages": [user], "model": "gpt-4o"}), 404, "model"),
            (
                json!({"messages": [user], "temperature": 2.5}),
                400,
                "temperature",
            ),
            (json!({"messages": [user], "top_p": 0.0}), 400, "top_p"),
            (json!({"messages": [user], "top_k": -2}), 400, "top_k"),
            (
                json!({"messages": [user], "max_tokens": 0}),
                400,
                "max_tokens",
            ),
            (
                json!({"messages": [user], "stop": ["a", "b", "c", "d", "e"]}),
                400,
                "stop",
            ),
            (
                json!({"messages": [user], "max_tiles": 13}),
                400,
                "max_tiles",
            ),
            (
                json!({"messages": [{"role": "tool", "content": "x"}]}),
                400,
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user"}]}),
                400,
                "messages[0].content",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}),
                400,
                "messages[0].content[0].type",
            ),
            (
                json!({"messages": [{"role": "system", "content": [
                    {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]}]}),
                400,
                "messages[0].content[0].image_url",
            ),
        ] {
            let err = check(body.clone()).unwrap_err();
            assert_eq!(err.status, status, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}");
        }
    }

    #[test]
    fn too_many_images() {
        let image = json!({"type": "image_url", "image_url": "data:image/png;base64,AAAA"});
        let body =
            json!({"messages": [{"role": "user", "content": [image, image, image, image, image]}]});
        let err = check(body).unwrap_err();
        assert_eq!(
            (err.status.as_u16(), err.param.as_deref()),
            (400, Some("messages"))
        );
        assert!(err.message.contains("5 images"), "{}", err.message);
    }
}
