//! The Hugging Face Hub HTTP API: the file listing of a repo at a revision, and file URLs.
//!
//! `GET {endpoint}/api/models/{repo}/revision/{revision}?blobs=true` answers the resolved
//! commit `sha` and `siblings[]` with `rfilename`, `size` and, for LFS files, `lfs.sha256` and
//! `lfs.size` (what `huggingface_hub.HfApi.model_info(files_metadata=True)` asks for).

use anyhow::{Result, bail};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct RepoInfo {
    /// The commit the revision resolved to; files are fetched at this commit so a branch that
    /// moves mid-download cannot mix two snapshots.
    pub sha: String,
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub lfs: Option<Lfs>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Lfs {
    pub sha256: String,
    pub size: u64,
}

/// One file to fetch, with what the download must be checked against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    pub path: String,
    pub size: Option<u64>,
    /// Lowercase hex sha256 (LFS files only; the Hub gives git blob ids for the others).
    pub sha256: Option<String>,
}

impl From<&Sibling> for RemoteFile {
    fn from(s: &Sibling) -> Self {
        match &s.lfs {
            Some(lfs) => Self {
                path: s.rfilename.clone(),
                size: Some(lfs.size),
                sha256: Some(lfs.sha256.to_ascii_lowercase()),
            },
            None => Self {
                path: s.rfilename.clone(),
                size: s.size,
                sha256: None,
            },
        }
    }
}

pub fn info_url(endpoint: &str, repo: &str, revision: &str) -> String {
    format!(
        "{}/api/models/{}/revision/{}?blobs=true",
        endpoint.trim_end_matches('/'),
        encode_path(repo),
        encode_segment(revision)
    )
}

pub fn resolve_url(endpoint: &str, repo: &str, commit: &str, path: &str) -> String {
    format!(
        "{}/{}/resolve/{}/{}",
        endpoint.trim_end_matches('/'),
        encode_path(repo),
        encode_segment(commit),
        encode_path(path)
    )
}

/// Rejects repo paths that would land outside the target directory (a hostile or broken
/// listing must not write to `../etc`).
pub fn check_relative(path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.contains('\0')
        || path
            .split('/')
            .any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        bail!("refusing the repo file name {path:?}: not a plain relative path");
    }
    Ok(())
}

/// Percent-encodes each `/`-separated segment, keeping the slashes.
fn encode_path(path: &str) -> String {
    path.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// Percent-encodes everything but RFC 3986 unreserved characters (`refs/pr/1` → `refs%2Fpr%2F1`).
fn encode_segment(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_encode_revision_and_path_segments() {
        assert_eq!(
            info_url("https://hub/", "nvidia/M", "refs/pr/1"),
            "https://hub/api/models/nvidia/M/revision/refs%2Fpr%2F1?blobs=true"
        );
        assert_eq!(
            resolve_url("https://hub", "nvidia/M", "abc", "sub dir/a+b.json"),
            "https://hub/nvidia/M/resolve/abc/sub%20dir/a%2Bb.json"
        );
    }

    #[test]
    fn only_plain_relative_paths_are_accepted() {
        assert!(check_relative("a/b.json").is_ok());
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a\\b",
        ] {
            assert!(check_relative(bad).is_err(), "{bad}");
        }
    }
}
