//! Fetching `http(s)` image URLs, for servers started with `--allow-remote-images`.
//!
//! Off by default: a server that fetches URLs from requests can be pointed at
//! internal addresses. When on, every fetch is bounded in time, redirects and
//! size, so a slow or huge remote image fails one request with a clear 400
//! instead of tying up the server.

use std::sync::OnceLock;
use std::time::Duration;

use futures::StreamExt;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TOTAL_TIMEOUT: Duration = Duration::from_secs(20);
const MAX_REDIRECTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("Could not fetch the image URL: {0}")]
    Http(String),
    #[error("Fetching the image URL returned HTTP {0}")]
    Status(u16),
    #[error("The image at the URL is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error("The image at the URL is empty")]
    Empty,
}

fn client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(TOTAL_TIMEOUT)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .user_agent(concat!("vlm-server/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS client with default settings builds")
    })
}

/// GET `url` and return its body, at most `max_bytes` long.
pub async fn fetch_image(url: &str, max_bytes: usize) -> Result<Vec<u8>, FetchError> {
    // Errors name the cause without the URL: it may carry credentials.
    let http = |e: reqwest::Error| FetchError::Http(e.without_url().to_string());
    let response = client().get(url).send().await.map_err(http)?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::Status(status.as_u16()));
    }
    if response
        .content_length()
        .is_some_and(|n| n > max_bytes as u64)
    {
        return Err(FetchError::TooLarge(max_bytes));
    }
    let mut body = Vec::new();
    let mut chunks = response.bytes_stream();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.map_err(http)?;
        if body.len() + chunk.len() > max_bytes {
            return Err(FetchError::TooLarge(max_bytes));
        }
        body.extend_from_slice(&chunk);
    }
    if body.is_empty() {
        return Err(FetchError::Empty);
    }
    Ok(body)
}
