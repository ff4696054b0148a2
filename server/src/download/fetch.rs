//! One file: download into `<path>.incomplete`, resume it with `Range`, check size and sha256,
//! then rename into place. Transient failures (5xx, 429, connection and body errors) are
//! retried with exponential backoff and keep the partial file; the rest fail at once.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures::StreamExt;
use reqwest::StatusCode;
use reqwest::header::{CONTENT_RANGE, RANGE};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use super::hub::RemoteFile;

/// Log a progress line every this many bytes of one file.
const PROGRESS_EVERY: u64 = 1 << 30;

pub struct Fetcher<'a> {
    pub client: &'a reqwest::Client,
    pub token: Option<&'a str>,
    pub retries: u32,
    pub backoff: Duration,
}

/// An attempt's failure: worth another try, or not.
enum Failure {
    Transient(anyhow::Error),
    Fatal(anyhow::Error),
}

impl Fetcher<'_> {
    /// Downloads `file` from `url` to `dest` unless `dest` is already there with the right size.
    /// Returns the bytes transferred.
    pub async fn fetch(&self, url: &str, file: &RemoteFile, dest: &Path) -> Result<u64> {
        if self.already_there(file, dest).await? {
            tracing::info!(file = %file.path, "already present and verified");
            return Ok(0);
        }
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let part = incomplete_path(dest);
        let mut transferred = 0;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(url, file, &part, &mut transferred).await {
                Ok(()) => break,
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Transient(e)) if attempt <= self.retries => {
                    let delay = self.backoff.saturating_mul(1 << (attempt - 1).min(5));
                    tracing::warn!(file = %file.path, attempt, ?delay, "retrying: {e:#}");
                    tokio::time::sleep(delay).await;
                }
                Err(Failure::Transient(e)) => {
                    return Err(
                        e.context(format!("{}: giving up after {attempt} attempts", file.path))
                    );
                }
            }
        }
        verify(file, &part).await?;
        tokio::fs::rename(&part, dest)
            .await
            .with_context(|| format!("renaming {} into place", part.display()))?;
        tracing::info!(file = %file.path, bytes = file.size, "downloaded");
        Ok(transferred)
    }

    /// A final file may be from an earlier snapshot (a new revision often keeps every size), so
    /// only an LFS file whose sha256 matches is kept; small non-LFS files are fetched again.
    async fn already_there(&self, file: &RemoteFile, dest: &Path) -> Result<bool> {
        let Ok(meta) = tokio::fs::metadata(dest).await else {
            return Ok(false);
        };
        let (Some(expected), Some(size)) = (&file.sha256, file.size) else {
            return Ok(false);
        };
        if meta.len() != size {
            return Ok(false);
        }
        let path = dest.to_path_buf();
        let actual = tokio::task::spawn_blocking(move || sha256_file(&path))
            .await
            .context("hashing task")??;
        Ok(&actual == expected)
    }

    async fn attempt(
        &self,
        url: &str,
        file: &RemoteFile,
        part: &Path,
        transferred: &mut u64,
    ) -> Result<(), Failure> {
        let mut offset = tokio::fs::metadata(part)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        if file.size.is_some_and(|size| offset > size) {
            offset = 0; // longer than the file can be: start over
        }
        if offset > 0 && file.size == Some(offset) {
            return Ok(()); // complete already; `verify` decides
        }
        let mut request = self.client.get(url);
        if let Some(token) = self.token {
            request = request.bearer_auth(token);
        }
        if offset > 0 {
            request = request.header(RANGE, format!("bytes={offset}-"));
        }
        let response = request
            .send()
            .await
            .map_err(|e| Failure::Transient(anyhow!(e).context(format!("GET {url}"))))?;
        let status = response.status();
        let append = match status {
            StatusCode::PARTIAL_CONTENT if content_range_start(&response) == Some(offset) => true,
            StatusCode::PARTIAL_CONTENT => {
                remove(part).await;
                return Err(Failure::Transient(anyhow!(
                    "GET {url}: unexpected Content-Range"
                )));
            }
            // A server (or redirect target) that ignores Range sends the whole file.
            s if s.is_success() => false,
            StatusCode::RANGE_NOT_SATISFIABLE => {
                remove(part).await;
                return Err(Failure::Transient(anyhow!(
                    "GET {url}: range not satisfiable; restarting"
                )));
            }
            s if s.is_server_error()
                || s == StatusCode::TOO_MANY_REQUESTS
                || s == StatusCode::REQUEST_TIMEOUT =>
            {
                return Err(Failure::Transient(anyhow!("GET {url}: {s}")));
            }
            s => {
                let hint = match s {
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                        " (gated or private repo: is the token set and has its access been granted?)"
                    }
                    _ => "",
                };
                return Err(Failure::Fatal(anyhow!("GET {url}: {s}{hint}")));
            }
        };
        if offset > 0 && append {
            tracing::info!(file = %file.path, offset, "resuming");
        }
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(part)
            .await
            .map_err(|e| fatal_io(e, part))?;
        let mut written = if append { offset } else { 0 };
        let mut next_log = (written / PROGRESS_EVERY + 1) * PROGRESS_EVERY;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| Failure::Transient(anyhow!(e).context(format!("reading {url}"))))?;
            out.write_all(&chunk).await.map_err(|e| fatal_io(e, part))?;
            written += chunk.len() as u64;
            *transferred += chunk.len() as u64;
            if written >= next_log {
                tracing::info!(file = %file.path, written, total = file.size, "progress");
                next_log += PROGRESS_EVERY;
            }
        }
        out.flush().await.map_err(|e| fatal_io(e, part))?;
        out.sync_all().await.map_err(|e| fatal_io(e, part))?;
        if file.size.is_some_and(|size| written < size) {
            return Err(Failure::Transient(anyhow!(
                "GET {url}: body ended at {written} of {:?} bytes",
                file.size
            )));
        }
        Ok(())
    }
}

pub fn incomplete_path(dest: &Path) -> PathBuf {
    let mut name = dest.as_os_str().to_owned();
    name.push(".incomplete");
    PathBuf::from(name)
}

/// Size and (for LFS files) sha256 of the finished `part`; a mismatch deletes it.
async fn verify(file: &RemoteFile, part: &Path) -> Result<()> {
    let len = tokio::fs::metadata(part)
        .await
        .with_context(|| format!("reading {}", part.display()))?
        .len();
    if let Some(size) = file.size
        && len != size
    {
        remove(part).await;
        anyhow::bail!("{}: size {len}, expected {size}", file.path);
    }
    let Some(expected) = &file.sha256 else {
        return Ok(());
    };
    let path = part.to_path_buf();
    let actual = tokio::task::spawn_blocking(move || sha256_file(&path))
        .await
        .context("hashing task")??;
    if &actual != expected {
        remove(part).await;
        anyhow::bail!(
            "{}: sha256 mismatch: got {actual}, expected {expected}",
            file.path
        );
    }
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn content_range_start(response: &reqwest::Response) -> Option<u64> {
    // `bytes 100-199/200`
    let value = response.headers().get(CONTENT_RANGE)?.to_str().ok()?;
    let range = value.strip_prefix("bytes ")?;
    range.split('-').next()?.trim().parse().ok()
}

fn fatal_io(e: std::io::Error, path: &Path) -> Failure {
    Failure::Fatal(anyhow!(e).context(format!("writing {}", path.display())))
}

async fn remove(path: &Path) {
    if let Err(e) = tokio::fs::remove_file(path).await
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %path.display(), "removing: {e}");
    }
}
