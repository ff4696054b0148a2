//! Image URLs from a request → encoded image bytes for the engine.
//!
//! Only `data:` URLs are decoded here; the format (PNG/JPEG/WebP) is sniffed
//! from the bytes by the engine, so an odd or missing mime type is tolerated.
//! Remote `http(s)` URLs are refused unless the server allows them; then
//! [`remote`] fetches them.

use base64::Engine as _;
use base64::alphabet;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

use std::sync::Arc;

use super::config::ApiConfig;
use super::error::ApiError;
use super::remote;
use super::validate::ValidChat;
use crate::engine::ContentPart;

/// Standard alphabet, padding optional (some clients strip it).
const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Where an image comes from, once its URL is understood.
#[derive(Debug, PartialEq, Eq)]
pub enum ImageSource {
    Inline(Vec<u8>),
    Remote(String),
}

/// Parse one `image_url`; `param` names it in errors (`messages[1].content[1].image_url`).
pub fn parse_image_url(
    url: &str,
    allow_remote: bool,
    param: &str,
) -> Result<ImageSource, ApiError> {
    let url = url.trim();
    if let Some(rest) = strip_prefix_ignore_case(url, "data:") {
        return decode_data_url(rest, param).map(ImageSource::Inline);
    }
    if strip_prefix_ignore_case(url, "http://").is_some()
        || strip_prefix_ignore_case(url, "https://").is_some()
    {
        if allow_remote {
            return Ok(ImageSource::Remote(url.to_owned()));
        }
        return Err(ApiError::invalid(
            "Remote image URLs are not allowed on this server; send the image inline as \
             'data:image/png;base64,...'",
            param,
        ));
    }
    let shown: String = url.chars().take(32).collect();
    Err(ApiError::invalid(
        format!("Unsupported image URL '{shown}': expected 'data:image/<type>;base64,<data>'"),
        param,
    ))
}

/// Fill in the bytes of remote images (only present when the server allows
/// them), fetched concurrently; any failure fails the request with a 400 that
/// names the image.
pub async fn fetch_remote(chat: &mut ValidChat, config: &ApiConfig) -> Result<(), ApiError> {
    if chat.remote_images.is_empty() {
        return Ok(());
    }
    let fetches = chat.remote_images.iter().map(|(i, j, url)| async move {
        let param = format!("messages[{i}].content[{j}].image_url");
        remote::fetch_image(url, config.max_body_bytes)
            .await
            .map(|bytes| (*i, *j, bytes))
            .map_err(|e| ApiError::invalid(e.to_string(), param))
    });
    for (i, j, bytes) in futures::future::try_join_all(fetches).await? {
        let part = chat
            .request
            .messages
            .get_mut(i)
            .and_then(|m| m.parts.get_mut(j));
        match part {
            Some(ContentPart::Image(slot)) => *slot = Arc::new(bytes),
            _ => return Err(ApiError::internal("remote image placeholder missing")),
        }
    }
    chat.remote_images.clear();
    Ok(())
}

/// `rest` is what follows `data:`: `[<mime>][;params];base64,<payload>`.
fn decode_data_url(rest: &str, param: &str) -> Result<Vec<u8>, ApiError> {
    let Some((header, payload)) = rest.split_once(',') else {
        return Err(ApiError::invalid(
            "Malformed data URL: expected 'data:image/<type>;base64,<data>'",
            param,
        ));
    };
    let is_base64 = header
        .split(';')
        .skip(1)
        .any(|p| p.trim().eq_ignore_ascii_case("base64"));
    if !is_base64 {
        return Err(ApiError::invalid(
            "Only base64 data URLs are supported: expected 'data:image/<type>;base64,<data>'",
            param,
        ));
    }
    let bytes = decode_base64(payload)
        .ok_or_else(|| ApiError::invalid("Image data is not valid base64", param))?;
    if bytes.is_empty() {
        return Err(ApiError::invalid("Image data is empty", param));
    }
    Ok(bytes)
}

/// Accepts the standard and URL-safe alphabets, with or without padding, and
/// ignores line breaks and spaces (MIME-wrapped base64).
fn decode_base64(payload: &str) -> Option<Vec<u8>> {
    let compact: Vec<u8>;
    let payload = if payload.bytes().any(|b| b.is_ascii_whitespace()) {
        compact = payload
            .bytes()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        &compact[..]
    } else {
        payload.as_bytes()
    };
    STANDARD_LENIENT
        .decode(payload)
        .or_else(|_| URL_SAFE_LENIENT.decode(payload))
        .ok()
}

fn strip_prefix_ignore_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARAM: &str = "messages[1].content[1].image_url";

    fn inline(url: &str) -> Result<Vec<u8>, ApiError> {
        match parse_image_url(url, false, PARAM)? {
            ImageSource::Inline(bytes) => Ok(bytes),
            ImageSource::Remote(url) => panic!("unexpected remote {url}"),
        }
    }

    #[test]
    fn decodes_png_data_url() {
        assert_eq!(
            inline("data:image/png;base64,iVBORw0KGgo=").unwrap(),
            b"\x89PNG\r\n\x1a\n"
        );
    }

    #[test]
    fn tolerates_odd_mime_padding_and_whitespace() {
        let png = b"\x89PNG\r\n\x1a\n".to_vec();
        assert_eq!(inline("data:;base64,iVBORw0KGgo").unwrap(), png);
        assert_eq!(inline("DATA:image/jpg;BASE64,iVBOR\nw0KGgo=").unwrap(), png);
        assert_eq!(
            inline("data:application/octet-stream;base64,iVBORw0KGgo=").unwrap(),
            png
        );
        assert_eq!(
            inline("data:image/png;base64,-_8=").unwrap(),
            vec![0xfb, 0xff]
        );
    }

    #[test]
    fn rejects_bad_data_urls_naming_the_param() {
        for (url, needle) in [
            ("data:image/png;base64,not*base64!", "base64"),
            ("data:image/png;base64,", "empty"),
            ("data:image/png,rawbytes", "base64"),
            ("data:image/png;base64", "Malformed"),
            ("file:///etc/passwd", "Unsupported"),
            ("", "Unsupported"),
        ] {
            let err = inline(url).unwrap_err();
            assert_eq!(err.status, 400, "{url}");
            assert_eq!(err.param.as_deref(), Some(PARAM), "{url}");
            assert!(err.message.contains(needle), "{url}: {}", err.message);
        }
    }

    #[test]
    fn remote_urls_only_when_allowed() {
        let url = "https://example.com/cat.png";
        let err = parse_image_url(url, false, PARAM).unwrap_err();
        assert_eq!(err.status, 400);
        assert!(err.message.contains("Remote image URLs"));
        assert_eq!(
            parse_image_url(url, true, PARAM).unwrap(),
            ImageSource::Remote(url.into())
        );
    }
}
