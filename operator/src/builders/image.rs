//! Which vlm-server image a captioner runs: its own `spec.image`, else the operator's default
//! (`--default-server-image` / `VLM_DEFAULT_SERVER_IMAGE`, set by the chart), else the built-in.
//! The CRD has no schema default for the image, so upgrading the operator moves captioners that
//! did not pin one.

use std::sync::OnceLock;

use crate::crd::VlmCaptioner;

pub const BUILTIN_SERVER_IMAGE: &str = concat!("vlm-server:", env!("CARGO_PKG_VERSION"));

static DEFAULT_SERVER_IMAGE: OnceLock<String> = OnceLock::new();

/// Sets the operator-wide default once, at startup; later calls are ignored.
pub fn set_default_server_image(image: &str) {
    let image = image.trim();
    if !image.is_empty() {
        let _ = DEFAULT_SERVER_IMAGE.set(image.to_string());
    }
}

pub fn default_server_image() -> &'static str {
    DEFAULT_SERVER_IMAGE
        .get()
        .map(String::as_str)
        .unwrap_or(BUILTIN_SERVER_IMAGE)
}

pub fn server_image(c: &VlmCaptioner) -> String {
    resolve(
        c.spec.image.repository.as_deref(),
        c.spec.image.tag.as_deref(),
        default_server_image(),
    )
}

/// `repository:tag`, each part falling back to `default` (a `repo:tag` or `repo@digest`).
pub fn resolve(repository: Option<&str>, tag: Option<&str>, default: &str) -> String {
    match (repository, tag) {
        (Some(r), Some(t)) => format!("{r}:{t}"),
        (Some(r), None) => format!("{r}:{}", env!("CARGO_PKG_VERSION")),
        (None, Some(t)) => format!("{}:{t}", repository_of(default)),
        (None, None) => default.to_string(),
    }
}

/// `registry:5000/vlm-server:1.2@sha256:..` → `registry:5000/vlm-server`.
fn repository_of(image: &str) -> &str {
    let image = image.split('@').next().unwrap_or(image);
    match image.rfind(':') {
        Some(i) if !image[i..].contains('/') => &image[..i],
        _ => image,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parts_override_the_default() {
        let d = "registry:5000/team/vlm-server:0.9";
        assert_eq!(resolve(None, None, d), d);
        assert_eq!(resolve(Some("r/x"), Some("1"), d), "r/x:1");
        assert_eq!(
            resolve(None, Some("1.0"), d),
            "registry:5000/team/vlm-server:1.0"
        );
        assert_eq!(
            resolve(None, Some("1.0"), "registry:5000/vlm-server@sha256:ab"),
            "registry:5000/vlm-server:1.0"
        );
        assert_eq!(
            resolve(None, Some("2"), "registry:5000/vlm"),
            "registry:5000/vlm:2"
        );
        assert_eq!(
            resolve(Some("r/x"), None, d),
            concat!("r/x:", env!("CARGO_PKG_VERSION"))
        );
    }
}
