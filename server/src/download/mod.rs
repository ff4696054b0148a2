//! `vlm-server download`: fetch a model snapshot from the Hugging Face Hub into a directory.
//!
//! Idempotent by design (the operator runs it as a Job that may be retried or re-created): a
//! `.complete` marker naming the same repo and revision ends the run at once, finished files are
//! kept, and partial ones resume. The marker is written last, atomically, so its presence proves
//! every file arrived whole and verified.

mod fetch;
pub mod glob;
pub mod hub;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use fetch::Fetcher;
pub use fetch::incomplete_path;
use hub::{RemoteFile, RepoInfo};

pub const DEFAULT_REPO: &str = "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16";
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
pub const MARKER: &str = ".complete";
/// What a serving checkpoint needs; skips e.g. images in the model card and `.bin` duplicates.
pub const DEFAULT_INCLUDE: [&str; 7] = [
    "*.json",
    "*.safetensors",
    "tokenizer*",
    "*.jinja",
    "*.py",
    "*.txt",
    "*.md",
];

#[derive(clap::Args, Debug, Clone)]
pub struct DownloadArgs {
    /// Hub repository.
    #[arg(long, default_value = DEFAULT_REPO)]
    pub repo: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Target directory (created if missing).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Hub base URL.
    #[arg(long, env = "HF_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Environment variable holding the access token (gated or private repos).
    #[arg(long, default_value = "HF_TOKEN")]
    pub token_env: String,
    /// Glob of repo files to fetch; repeatable (default: the files a checkpoint needs).
    #[arg(long = "include", default_values_t = DEFAULT_INCLUDE.map(String::from))]
    pub include: Vec<String>,
    /// Files downloaded at the same time.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub parallel: u16,
    /// Retries per request on 5xx, 429 and connection errors.
    #[arg(long, default_value_t = 8)]
    pub retries: u32,
}

/// Everything one download needs; `DownloadArgs` resolved (token read from the environment).
#[derive(Debug, Clone)]
pub struct Options {
    pub repo: String,
    pub revision: String,
    pub dir: PathBuf,
    pub endpoint: String,
    pub token: Option<String>,
    pub include: Vec<String>,
    pub parallel: usize,
    pub retries: u32,
    /// First retry delay; doubles per attempt (capped at 32×).
    pub backoff: Duration,
}

impl Options {
    pub fn new(repo: &str, revision: &str, dir: impl Into<PathBuf>, endpoint: &str) -> Self {
        Self {
            repo: repo.into(),
            revision: revision.into(),
            dir: dir.into(),
            endpoint: endpoint.into(),
            token: None,
            include: DEFAULT_INCLUDE.map(String::from).to_vec(),
            parallel: 4,
            retries: 8,
            backoff: Duration::from_secs(1),
        }
    }
}

impl From<DownloadArgs> for Options {
    fn from(args: DownloadArgs) -> Self {
        let token = std::env::var(&args.token_env)
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        Self {
            token,
            include: args.include,
            parallel: usize::from(args.parallel),
            retries: args.retries,
            ..Self::new(&args.repo, &args.revision, args.dir, &args.endpoint)
        }
    }
}

/// The `.complete` marker: which snapshot the directory holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub repo: String,
    pub revision: String,
    pub commit: String,
    pub files: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The marker matched: nothing was fetched.
    AlreadyComplete(Marker),
    Downloaded {
        marker: Marker,
        bytes: u64,
    },
}

/// The CLI entry point.
pub async fn run(args: DownloadArgs) -> Result<()> {
    let opts = Options::from(args);
    match download(&opts).await? {
        Outcome::AlreadyComplete(m) => {
            tracing::info!(repo = %m.repo, revision = %m.revision, commit = %m.commit, "already complete");
        }
        Outcome::Downloaded { marker, bytes } => {
            tracing::info!(repo = %marker.repo, commit = %marker.commit, files = marker.files, bytes, "download complete");
        }
    }
    Ok(())
}

pub async fn download(opts: &Options) -> Result<Outcome> {
    let marker_path = opts.dir.join(MARKER);
    match read_marker(&marker_path).await {
        Some(m) if m.repo == opts.repo && m.revision == opts.revision => {
            return Ok(Outcome::AlreadyComplete(m));
        }
        Some(m) => {
            // Another snapshot: drop its proof before touching files, so a crash cannot leave a
            // marker that vouches for a mix.
            tracing::info!(old_repo = %m.repo, old_revision = %m.revision, "replacing a different snapshot");
            tokio::fs::remove_file(&marker_path)
                .await
                .with_context(|| format!("removing {}", marker_path.display()))?;
        }
        None => {}
    }
    tokio::fs::create_dir_all(&opts.dir)
        .await
        .with_context(|| format!("creating {}", opts.dir.display()))?;

    let client = reqwest::Client::builder()
        .user_agent(concat!("vlm-server/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(30))
        // Per read, not per request: a 5 GB shard may take many minutes.
        .read_timeout(Duration::from_secs(120))
        .build()
        .context("building the HTTP client")?;
    let info = list(&client, opts).await?;
    let files = select(&info, &opts.include)?;
    if files.is_empty() {
        bail!(
            "{}@{}: no files match {:?}",
            opts.repo,
            opts.revision,
            opts.include
        );
    }
    let total: u64 = files.iter().filter_map(|f| f.size).sum();
    tracing::info!(repo = %opts.repo, revision = %opts.revision, commit = %info.sha, files = files.len(), total_bytes = total, "downloading");

    let started = Instant::now();
    let fetcher = Fetcher {
        client: &client,
        token: opts.token.as_deref(),
        retries: opts.retries,
        backoff: opts.backoff,
    };
    let bytes: u64 = futures::stream::iter(files.iter())
        .map(|file| {
            let url = hub::resolve_url(&opts.endpoint, &opts.repo, &info.sha, &file.path);
            let dest = opts.dir.join(&file.path);
            let fetcher = &fetcher;
            async move { fetcher.fetch(&url, file, &dest).await }
        })
        .buffer_unordered(opts.parallel.max(1))
        .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
        .await?;

    let marker = Marker {
        repo: opts.repo.clone(),
        revision: opts.revision.clone(),
        commit: info.sha.clone(),
        files: files.len(),
    };
    write_marker(&marker_path, &marker).await?;
    tracing::info!(
        bytes,
        elapsed_s = started.elapsed().as_secs(),
        "all files verified"
    );
    Ok(Outcome::Downloaded { marker, bytes })
}

/// The repo listing, retried like file downloads on transient errors.
async fn list(client: &reqwest::Client, opts: &Options) -> Result<RepoInfo> {
    let url = hub::info_url(&opts.endpoint, &opts.repo, &opts.revision);
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let mut request = client.get(&url);
        if let Some(token) = &opts.token {
            request = request.bearer_auth(token);
        }
        let transient = match request.send().await {
            Ok(r) if r.status().is_success() => {
                return r
                    .json::<RepoInfo>()
                    .await
                    .with_context(|| format!("decoding the listing from {url}"));
            }
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                anyhow::anyhow!("GET {url}: {}", r.status())
            }
            Ok(r) => bail!(
                "GET {url}: {} (wrong repo or revision, or a gated repo without a token?)",
                r.status()
            ),
            Err(e) => anyhow::Error::new(e).context(format!("GET {url}")),
        };
        if attempt > opts.retries {
            return Err(transient.context(format!("giving up after {attempt} attempts")));
        }
        let delay = opts.backoff.saturating_mul(1 << (attempt - 1).min(5));
        tracing::warn!(attempt, ?delay, "retrying the listing: {transient:#}");
        tokio::time::sleep(delay).await;
    }
}

/// The listed files that match `include`, checked to stay inside the target directory.
pub fn select(info: &RepoInfo, include: &[String]) -> Result<Vec<RemoteFile>> {
    let mut files = Vec::new();
    for sibling in &info.siblings {
        if !glob::matches_any(include, &sibling.rfilename) {
            continue;
        }
        hub::check_relative(&sibling.rfilename)?;
        if sibling.rfilename == MARKER || sibling.rfilename.ends_with(".incomplete") {
            bail!(
                "refusing the repo file name {:?}: reserved",
                sibling.rfilename
            );
        }
        files.push(RemoteFile::from(sibling));
    }
    Ok(files)
}

pub async fn read_marker(path: &Path) -> Option<Marker> {
    let bytes = tokio::fs::read(path).await.ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Temp file, fsync, rename: readers see either no marker or a whole one.
async fn write_marker(path: &Path, marker: &Marker) -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let tmp = path.with_extension("complete.tmp");
    let json = serde_json::to_vec_pretty(marker).context("serializing the marker")?;
    let mut f = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&json)
        .await
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .await
        .with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("renaming {} into place", tmp.display()))?;
    // Persist the rename itself (best effort: not every filesystem lets a directory be synced).
    if let Some(dir) = path.parent()
        && let Ok(d) = tokio::fs::File::open(dir).await
    {
        let _ = d.sync_all().await;
    }
    Ok(())
}
