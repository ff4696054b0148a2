//! The JSON body extractor, whose rejections are OpenAI errors rather than
//! axum's plain-text ones.

use axum::body::Bytes;
use axum::extract::{FromRef, FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON body. Malformed JSON and wrong types are 400 naming the field
/// (`messages[1].content`); a body over the limit is 413. The content type is
/// not checked: some clients send JSON without it.
pub struct ApiJson<T>(pub T);

/// The body limit, to say it in the 413 message.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimit(pub usize);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
    BodyLimit: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(request, state)
            .await
            .map_err(|rejection| {
                if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::payload_too_large(BodyLimit::from_ref(state).0)
                } else {
                    ApiError::bad_request(format!("Could not read the request body: {rejection}"))
                }
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Request bodies are JSON objects (serde would also take a struct as an array).
fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first.is_some_and(|&b| b != b'{') {
        return Err(ApiError::bad_request("Request body must be a JSON object"));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if !inner.is_data() {
            ApiError::bad_request(format!("Request body is not valid JSON: {inner}"))
        } else if path == "." {
            ApiError::bad_request(format!("Invalid request body: {inner}"))
        } else {
            ApiError::invalid(format!("Invalid value for '{path}': {inner}"), path)
        }
    })?;
    deserializer
        .end()
        .map_err(|err| ApiError::bad_request(format!("Request body is not valid JSON: {err}")))?;
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        messages: Vec<String>,
    }

    #[test]
    fn errors_name_the_field_or_say_malformed() {
        let err = parse_json::<Body>(br#"{"messages": 5}"#).err().unwrap();
        assert_eq!(err.param.as_deref(), Some("messages"));
        let err = parse_json::<Body>(br#"{"messages": ["a", 1]}"#)
            .err()
            .unwrap();
        assert_eq!(err.param.as_deref(), Some("messages[1]"));
        let err = parse_json::<Body>(br#"{"messages": "#).err().unwrap();
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
        assert_eq!(err.param, None);
        let err = parse_json::<Body>(br#"{}"#).err().unwrap();
        assert!(
            err.message.contains("missing field `messages`"),
            "{}",
            err.message
        );
        assert!(parse_json::<Body>(br#"{"messages": []} x"#).is_err());
        assert!(parse_json::<Body>(br#"{"messages": [], "extra": 1}"#).is_ok());
        let err = parse_json::<Body>(br#" [["a"]]"#).err().unwrap();
        assert!(err.message.contains("JSON object"), "{}", err.message);
    }
}
