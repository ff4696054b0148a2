//! `vlm-server download` against a local Hub look-alike: listing, `resolve` with a redirect,
//! `Range` resumes, a transient 500, a wrong checksum, and the `.complete` marker.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use sha2::{Digest, Sha256};
use vlm_server::download::{self, MARKER, Marker, Options, Outcome, incomplete_path};

const REPO: &str = "nvidia/Tiny-VL";
const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const TOKEN: &str = "hf_test_token";

#[derive(Clone)]
struct File {
    body: Vec<u8>,
    lfs: bool,
    /// Overrides the advertised sha256 (a corrupt upload / tampered CDN).
    bad_sha: bool,
}

/// (path, Range header, Authorization header) of one request.
type Request = (String, Option<String>, Option<String>);

#[derive(Default)]
struct Hub {
    files: Vec<(String, File)>,
    /// Remaining 500s to answer per path before serving it.
    fail: Mutex<HashMap<String, u32>>,
    /// Paths served through a 302 to `/cdn/...`, as the Hub does for LFS files.
    redirect: Vec<String>,
    /// Every request: (path, Range header, Authorization header).
    log: Mutex<Vec<Request>>,
}

impl Hub {
    fn requests(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }
    fn record(&self, path: &str, headers: &HeaderMap) {
        let get = |h: header::HeaderName| {
            headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .map(String::from)
        };
        self.log.lock().unwrap().push((
            path.to_string(),
            get(header::RANGE),
            get(header::AUTHORIZATION),
        ));
    }
    fn file(&self, path: &str) -> Option<&File> {
        self.files.iter().find(|(p, _)| p == path).map(|(_, f)| f)
    }
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn info(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, rev)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.record(&format!("api/{org}/{name}/{rev}"), &headers);
    if format!("{org}/{name}") != REPO || rev != "main" {
        return StatusCode::NOT_FOUND.into_response();
    }
    let siblings: Vec<_> = hub
        .files
        .iter()
        .map(|(path, f)| {
            let mut s = serde_json::json!({
                "rfilename": path,
                "size": if f.lfs { 135 } else { f.body.len() },
                "blobId": "ffff",
            });
            if f.lfs {
                let sha = if f.bad_sha {
                    sha256(b"something else")
                } else {
                    sha256(&f.body)
                };
                s["lfs"] =
                    serde_json::json!({"sha256": sha, "size": f.body.len(), "pointerSize": 135});
            }
            s
        })
        .collect();
    axum::Json(serde_json::json!({"id": REPO, "sha": COMMIT, "siblings": siblings})).into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    UrlPath((org, name, commit, path)): UrlPath<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    hub.record(&path, &headers);
    assert_eq!(format!("{org}/{name}"), REPO);
    assert_eq!(commit, COMMIT, "files are fetched at the resolved commit");
    if hub.redirect.contains(&path) {
        return Redirect::to(&format!("/cdn/{path}")).into_response();
    }
    serve(&hub, &path, &headers)
}

async fn cdn(
    State(hub): State<Arc<Hub>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
) -> Response {
    hub.record(&format!("cdn/{path}"), &headers);
    serve(&hub, &path, &headers)
}

fn serve(hub: &Hub, path: &str, headers: &HeaderMap) -> Response {
    if let Some(n) = hub.fail.lock().unwrap().get_mut(path)
        && *n > 0
    {
        *n -= 1;
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    let Some(file) = hub.file(path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = file.body.len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    match start {
        Some(start) if start >= len => StatusCode::RANGE_NOT_SATISFIABLE.into_response(),
        Some(start) => (
            StatusCode::PARTIAL_CONTENT,
            [(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{len}", len - 1),
            )],
            file.body[start..].to_vec(),
        )
            .into_response(),
        None => file.body.clone().into_response(),
    }
}

async fn start(hub: Arc<Hub>) -> String {
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(info))
        .route("/{org}/{name}/resolve/{commit}/{*path}", get(resolve))
        .route("/cdn/{*path}", get(cdn))
        .with_state(hub);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// A deterministic "weights" body big enough to span several chunks.
fn weights() -> Vec<u8> {
    (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect()
}

fn hub() -> Hub {
    let file = |body: &[u8], lfs| File {
        body: body.to_vec(),
        lfs,
        bad_sha: false,
    };
    Hub {
        files: vec![
            (
                "config.json".into(),
                file(br#"{"model_type":"tiny"}"#, false),
            ),
            ("model.safetensors".into(), file(&weights(), true)),
            ("tokenizer.json".into(), file(b"{}", false)),
            ("sub/processor.py".into(), file(b"# code", false)),
            ("images/card.png".into(), file(b"\x89PNG", false)),
        ],
        redirect: vec!["model.safetensors".into()],
        ..Hub::default()
    }
}

fn options(endpoint: &str, dir: &Path) -> Options {
    Options {
        token: Some(TOKEN.into()),
        backoff: Duration::from_millis(5),
        retries: 3,
        ..Options::new(REPO, "main", dir, endpoint)
    }
}

fn incompletes(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.to_string_lossy().ends_with(".incomplete") {
                out.push(p.display().to_string());
            }
        }
    }
    out
}

#[tokio::test]
async fn downloads_the_matching_files_verifies_them_and_writes_the_marker() {
    let hub = Arc::new(hub());
    hub.fail
        .lock()
        .unwrap()
        .insert("model.safetensors".into(), 1);
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();

    let outcome = download::download(&options(&endpoint, dir.path()))
        .await
        .expect("download");

    let expected = Marker {
        repo: REPO.into(),
        revision: "main".into(),
        commit: COMMIT.into(),
        files: 4,
    };
    assert!(matches!(&outcome, Outcome::Downloaded { marker, .. } if *marker == expected));
    assert_eq!(
        std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        weights()
    );
    assert_eq!(
        std::fs::read(dir.path().join("config.json")).unwrap(),
        br#"{"model_type":"tiny"}"#
    );
    assert_eq!(
        std::fs::read(dir.path().join("sub/processor.py")).unwrap(),
        b"# code"
    );
    assert!(
        !dir.path().join("images/card.png").exists(),
        "not in the include globs"
    );
    assert!(incompletes(dir.path()).is_empty());
    let marker: Marker =
        serde_json::from_slice(&std::fs::read(dir.path().join(MARKER)).unwrap()).unwrap();
    assert_eq!(marker, expected);

    let requests = hub.requests();
    assert!(
        requests
            .iter()
            .all(|(_, _, auth)| auth.as_deref() == Some("Bearer hf_test_token")),
        "the token goes with every request (same host): {requests:?}"
    );
    let weights_requests: Vec<_> = requests
        .iter()
        .filter(|(p, _, _)| p.ends_with("model.safetensors"))
        .map(|(p, _, _)| p.as_str())
        .collect();
    assert_eq!(
        weights_requests,
        [
            "model.safetensors",
            "cdn/model.safetensors",
            "model.safetensors",
            "cdn/model.safetensors"
        ],
        "redirected, 500 once, retried"
    );
}

#[tokio::test]
async fn resumes_a_partial_file_with_a_range_request() {
    let hub = Arc::new(hub());
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();
    let half = weights().len() / 2;
    let part = incomplete_path(&dir.path().join("model.safetensors"));
    std::fs::write(&part, &weights()[..half]).unwrap();

    let outcome = download::download(&options(&endpoint, dir.path()))
        .await
        .expect("download");

    assert_eq!(
        std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        weights()
    );
    assert!(!part.exists());
    let range: Vec<_> = hub
        .requests()
        .into_iter()
        .filter(|(p, _, _)| p == "cdn/model.safetensors")
        .map(|(_, r, _)| r)
        .collect();
    assert_eq!(range, [Some(format!("bytes={half}-"))]);
    let Outcome::Downloaded { bytes, .. } = outcome else {
        panic!("expected a download")
    };
    let small = (br#"{"model_type":"tiny"}"#.len() + 2 + 6) as u64;
    assert_eq!(
        bytes,
        (weights().len() - half) as u64 + small,
        "only the rest was fetched"
    );
}

#[tokio::test]
async fn a_stale_partial_longer_than_the_file_restarts_from_zero() {
    let hub = Arc::new(hub());
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();
    let part = incomplete_path(&dir.path().join("model.safetensors"));
    std::fs::write(&part, vec![0u8; weights().len() + 10]).unwrap();

    download::download(&options(&endpoint, dir.path()))
        .await
        .expect("download");
    assert_eq!(
        std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        weights()
    );
}

#[tokio::test]
async fn a_checksum_mismatch_fails_and_leaves_no_file() {
    let mut h = hub();
    h.files[1].1.bad_sha = true;
    let hub = Arc::new(h);
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();

    let err = download::download(&options(&endpoint, dir.path()))
        .await
        .expect_err("a wrong sha256 must fail");

    assert!(format!("{err:#}").contains("sha256 mismatch"), "{err:#}");
    assert!(!dir.path().join("model.safetensors").exists());
    // (Other files cut short by the failure may stay `.incomplete`: they resume next time.)
    assert!(
        !incomplete_path(&dir.path().join("model.safetensors")).exists(),
        "the bad bytes are deleted"
    );
    assert!(!dir.path().join(MARKER).exists());
}

#[tokio::test]
async fn a_second_run_with_the_marker_does_nothing() {
    let hub = Arc::new(hub());
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();
    let opts = options(&endpoint, dir.path());
    download::download(&opts).await.expect("first run");
    let before = hub.requests().len();

    let outcome = download::download(&opts).await.expect("second run");

    assert!(matches!(outcome, Outcome::AlreadyComplete(_)));
    assert_eq!(hub.requests().len(), before, "no request at all");
}

#[tokio::test]
async fn a_marker_for_another_revision_is_replaced() {
    let hub = Arc::new(hub());
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();
    let old = Marker {
        repo: REPO.into(),
        revision: "v0".into(),
        commit: "old".into(),
        files: 1,
    };
    std::fs::write(dir.path().join(MARKER), serde_json::to_vec(&old).unwrap()).unwrap();
    // The old snapshot's files, the same sizes as the new ones: sizes prove nothing.
    std::fs::write(
        dir.path().join("model.safetensors"),
        vec![1u8; weights().len()],
    )
    .unwrap();
    std::fs::write(dir.path().join("config.json"), br#"{"model_type":"OLD!"}"#).unwrap();

    let outcome = download::download(&options(&endpoint, dir.path()))
        .await
        .expect("download");

    assert!(matches!(outcome, Outcome::Downloaded { .. }));
    assert_eq!(
        std::fs::read(dir.path().join("model.safetensors")).unwrap(),
        weights()
    );
    assert_eq!(
        std::fs::read(dir.path().join("config.json")).unwrap(),
        br#"{"model_type":"tiny"}"#
    );
    let marker: Marker =
        serde_json::from_slice(&std::fs::read(dir.path().join(MARKER)).unwrap()).unwrap();
    assert_eq!(marker.commit, COMMIT);
}

#[tokio::test]
async fn verified_files_from_an_interrupted_run_are_not_fetched_again() {
    let hub = Arc::new(hub());
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();
    // A crash after the weights were renamed into place, before the marker.
    std::fs::write(dir.path().join("model.safetensors"), weights()).unwrap();

    download::download(&options(&endpoint, dir.path()))
        .await
        .expect("download");

    assert!(
        !hub.requests()
            .iter()
            .any(|(p, _, _)| p.ends_with("model.safetensors")),
        "its sha256 matched"
    );
    assert!(dir.path().join(MARKER).exists());
}

#[tokio::test]
async fn an_unknown_repo_is_a_clear_error_without_retries() {
    let hub = Arc::new(hub());
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();
    let mut opts = options(&endpoint, dir.path());
    opts.repo = "nvidia/missing".into();

    let err = download::download(&opts).await.expect_err("404");

    assert!(format!("{err:#}").contains("404"), "{err:#}");
    assert_eq!(hub.requests().len(), 1);
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_the_retries() {
    let hub = Arc::new(hub());
    hub.fail.lock().unwrap().insert("config.json".into(), 100);
    let endpoint = start(hub.clone()).await;
    let dir = tempdir();

    let err = download::download(&options(&endpoint, dir.path()))
        .await
        .expect_err("500s");

    assert!(
        format!("{err:#}").contains("giving up after 4 attempts"),
        "{err:#}"
    );
    assert!(!dir.path().join(MARKER).exists());
}

/// A scratch directory removed on drop (no `tempfile` dependency for one helper).
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir() -> TempDir {
    let dir = std::env::temp_dir().join(format!("vlm-download-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}
