//! `vlm-server serve` flags (vLLM-style names) and their translation into an
//! [`ApiConfig`]. `main` parses [`ServeArgs`], calls [`ServeArgs::validate`]
//! and [`ServeArgs::api_config`], and hands the model flags to the engine.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, ValueEnum};

use crate::model::linear::CpuMatmul;

use super::config::{
    ApiConfig, ApiKeys, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_IMAGES_PER_REQUEST,
    DEFAULT_SERVED_MODEL_NAME,
};

/// Env var holding a comma-separated list of API keys.
pub const API_KEYS_ENV: &str = "VLM_API_KEYS";
/// The model's own ceiling on tiles per image.
pub const MAX_TILES_LIMIT: usize = 12;

#[derive(Clone, Args)]
pub struct ServeArgs {
    /// Checkpoint directory (config.json, safetensors, tokenizer).
    #[arg(value_name = "MODEL_DIR")]
    pub model_dir: PathBuf,

    /// Model id clients send and /v1/models reports.
    #[arg(long, default_value = DEFAULT_SERVED_MODEL_NAME)]
    pub served_model_name: String,

    /// Another accepted model id (repeatable).
    #[arg(long = "alias", value_name = "NAME")]
    pub aliases: Vec<String>,

    #[arg(long, default_value = "0.0.0.0")]
    pub host: IpAddr,

    #[arg(long, default_value_t = 8000)]
    pub port: u16,

    /// Key clients must send as 'Authorization: Bearer <key>' (repeatable).
    /// Keys are also read from VLM_API_KEYS (comma-separated). No keys: no auth.
    #[arg(long = "api-key", value_name = "KEY")]
    pub api_keys: Vec<String>,

    /// Comma-separated keys; only meant to come from VLM_API_KEYS.
    #[arg(
        long = "api-keys",
        env = API_KEYS_ENV,
        value_delimiter = ',',
        hide = true,
        hide_env_values = true
    )]
    pub api_keys_list: Vec<String>,

    /// Read one API key from the environment variable NAME (repeatable);
    /// a missing or empty variable is an error, never "no auth".
    #[arg(long = "api-key-env", value_name = "NAME")]
    pub api_key_envs: Vec<String>,

    /// Sequences generated at once.
    #[arg(long, default_value_t = 16, value_parser = parse_positive)]
    pub max_num_seqs: usize,

    /// Context length (prompt + completion); default: the checkpoint's.
    #[arg(long, value_parser = parse_positive)]
    pub max_model_len: Option<usize>,

    /// Largest number of tiles per image (1..=12).
    #[arg(long, default_value_t = MAX_TILES_LIMIT, value_parser = parse_tiles)]
    pub max_tiles: usize,

    #[arg(long, default_value_t = DEFAULT_MAX_IMAGES_PER_REQUEST, value_parser = parse_positive)]
    pub max_images_per_request: usize,

    /// Largest request body: bytes, or with a KiB/MiB/GiB (or K/M/G) suffix.
    #[arg(long, default_value_t = DEFAULT_MAX_BODY_BYTES, value_parser = parse_bytes)]
    pub max_body_bytes: usize,

    /// Requests waiting for a sequence slot before new ones get 429.
    #[arg(long, default_value_t = 128)]
    pub max_queue: usize,

    /// Memory for sequence state, e.g. 20GiB: the Mamba state pool (allocated
    /// at start, up to --max-num-seqs slots) plus KV caches; a request is
    /// admitted only when its whole context fits, else it waits. Default: on
    /// CUDA 80% of the memory free after loading the weights, on CPU no limit.
    #[arg(long, value_parser = parse_bytes)]
    pub state_memory: Option<usize>,

    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    pub dtype: Dtype,

    /// Precision of the activations in CPU matmuls with BF16 weights.
    #[arg(long, value_enum, env = "VLM_CPU_MATMUL", default_value_t = CpuMatmulArg::Auto)]
    pub cpu_matmul: CpuMatmulArg,

    #[arg(long, value_enum, default_value_t = DeviceKind::default())]
    pub device: DeviceKind,

    /// Also accept http(s) image URLs, fetched by the server (5 s to connect,
    /// 20 s in all, at most 3 redirects, at most --max-body-bytes). Off by
    /// default: it lets clients make the server open URLs of their choosing.
    /// data: URLs always work.
    #[arg(long)]
    pub allow_remote_images: bool,

    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    /// bf16 on CUDA, f32 on CPU.
    Auto,
    F32,
    Bf16,
    F16,
}

/// `--cpu-matmul`: how CPU matmuls treat the activations when the weights are BF16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CpuMatmulArg {
    /// bf16 when the CPU has AVX-512 BF16 dot products, else f32.
    Auto,
    /// f32 activations: the exact products of f32 weights (what the golden tests check).
    F32,
    /// Activations rounded to bf16, as a BF16 GPU GEMM rounds its inputs, f32 sums:
    /// about twice the matmul speed with AVX-512 BF16.
    Bf16,
}

impl CpuMatmulArg {
    pub fn resolve(self) -> CpuMatmul {
        match self {
            CpuMatmulArg::Auto => CpuMatmul::auto(),
            CpuMatmulArg::F32 => CpuMatmul::F32,
            CpuMatmulArg::Bf16 => CpuMatmul::Bf16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl Default for DeviceKind {
    fn default() -> Self {
        if cfg!(feature = "cuda") {
            DeviceKind::Cuda
        } else {
            DeviceKind::Cpu
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ServeArgsError {
    #[error("--api-key-env {0}: the environment variable is not set")]
    KeyEnvMissing(String),
    #[error("--api-key-env {0}: the environment variable is empty")]
    KeyEnvEmpty(String),
    #[error("{flag}: {message}")]
    Invalid { flag: &'static str, message: String },
}

impl ServeArgs {
    /// Checks clap cannot express per flag.
    pub fn validate(&self) -> Result<(), ServeArgsError> {
        let invalid = |flag, message: &str| {
            Err(ServeArgsError::Invalid {
                flag,
                message: message.to_owned(),
            })
        };
        if self.served_model_name.trim().is_empty() {
            return invalid("--served-model-name", "must not be empty");
        }
        if self.aliases.iter().any(|a| a.trim().is_empty()) {
            return invalid("--alias", "must not be empty");
        }
        if self.api_key_envs.iter().any(|n| n.trim().is_empty()) {
            return invalid("--api-key-env", "needs a variable name");
        }
        if self.device == DeviceKind::Cuda && !cfg!(feature = "cuda") {
            return invalid(
                "--device",
                "cuda requested but this binary was built without the 'cuda' feature",
            );
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> SocketAddr {
        SocketAddr::new(self.host, self.port)
    }

    /// Every configured key: `--api-key`, VLM_API_KEYS, and each `--api-key-env`
    /// variable (read through `env`). Blank entries are dropped, so an empty
    /// VLM_API_KEYS means no auth.
    pub fn resolve_api_keys(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Vec<String>, ServeArgsError> {
        let mut keys: Vec<String> = self
            .api_keys
            .iter()
            .chain(&self.api_keys_list)
            .map(|k| k.trim().to_owned())
            .filter(|k| !k.is_empty())
            .collect();
        for name in &self.api_key_envs {
            let value = env(name).ok_or_else(|| ServeArgsError::KeyEnvMissing(name.clone()))?;
            let value = value.trim();
            if value.is_empty() {
                return Err(ServeArgsError::KeyEnvEmpty(name.clone()));
            }
            keys.push(value.to_owned());
        }
        Ok(keys)
    }

    /// The HTTP layer's configuration, keys read from the process environment.
    pub fn api_config(&self) -> Result<ApiConfig, ServeArgsError> {
        self.api_config_with_env(|name| std::env::var(name).ok())
    }

    pub fn api_config_with_env(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ApiConfig, ServeArgsError> {
        self.validate()?;
        let keys = self.resolve_api_keys(env)?;
        Ok(ApiConfig {
            served_model_name: self.served_model_name.trim().to_owned(),
            aliases: self.aliases.iter().map(|a| a.trim().to_owned()).collect(),
            api_keys: ApiKeys::new(keys),
            max_body_bytes: self.max_body_bytes,
            max_images_per_request: self.max_images_per_request,
            // Whatever the engine can hold (running + queued) may wait at the
            // HTTP layer; beyond that, 429 before reading the body.
            max_in_flight: self.max_num_seqs.saturating_add(self.max_queue),
            allow_remote_images: self.allow_remote_images,
            ..ApiConfig::default()
        })
    }
}

impl fmt::Debug for ServeArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redacted = |n: usize| format!("[{n} redacted]");
        f.debug_struct("ServeArgs")
            .field("model_dir", &self.model_dir)
            .field("served_model_name", &self.served_model_name)
            .field("aliases", &self.aliases)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("api_keys", &redacted(self.api_keys.len()))
            .field("api_keys_list", &redacted(self.api_keys_list.len()))
            .field("api_key_envs", &self.api_key_envs)
            .field("max_num_seqs", &self.max_num_seqs)
            .field("max_model_len", &self.max_model_len)
            .field("max_tiles", &self.max_tiles)
            .field("max_images_per_request", &self.max_images_per_request)
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_queue", &self.max_queue)
            .field("state_memory", &self.state_memory)
            .field("dtype", &self.dtype)
            .field("device", &self.device)
            .field("allow_remote_images", &self.allow_remote_images)
            .field("log_format", &self.log_format)
            .finish()
    }
}

fn parse_positive(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{s}' is not a positive integer")),
    }
}

fn parse_tiles(s: &str) -> Result<usize, String> {
    let n = parse_positive(s)?;
    if n > MAX_TILES_LIMIT {
        return Err(format!(
            "{n} is over the model's limit of {MAX_TILES_LIMIT} tiles"
        ));
    }
    Ok(n)
}

/// `33554432`, `32MiB`, `32M`, `512KiB`, `1GiB` (binary units).
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let multiplier: usize = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("'{s}': unknown unit (use bytes, KiB, MiB or GiB)")),
    };
    let n: usize = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size in bytes"))?;
    match n.checked_mul(multiplier) {
        Some(0) => Err("must be at least 1 byte".to_owned()),
        Some(bytes) => Ok(bytes),
        None => Err(format!("'{s}' is too large")),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn parse(args: &[&str]) -> Result<ServeArgs, clap::Error> {
        Cli::try_parse_from(["vlm-server", "/models/nano"].iter().chain(args)).map(|c| c.serve)
    }

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn defaults_match_the_nim() {
        let args = parse(&[]).unwrap();
        assert_eq!(args.served_model_name, "nvidia/nemotron-nano-12b-v2-vl");
        assert_eq!(args.listen_addr().to_string(), "0.0.0.0:8000");
        assert_eq!(args.max_tiles, 12);
        assert_eq!(args.max_images_per_request, 4);
        assert_eq!(args.max_body_bytes, 32 << 20);
        assert_eq!(
            (args.dtype, args.log_format),
            (Dtype::Auto, LogFormat::Text)
        );
        assert!(!args.allow_remote_images);
        let config = args.api_config_with_env(no_env).unwrap();
        assert!(config.api_keys.is_empty());
        assert_eq!(config.max_in_flight, 16 + 128);
    }

    #[test]
    fn flags_are_parsed() {
        let args = parse(&[
            "--served-model-name",
            "vlm",
            "--alias",
            "a",
            "--alias",
            "b",
            "--host",
            "127.0.0.1",
            "--port",
            "9000",
            "--max-num-seqs",
            "4",
            "--max-model-len",
            "16384",
            "--max-tiles",
            "6",
            "--max-images-per-request",
            "2",
            "--max-body-bytes",
            "8MiB",
            "--max-queue",
            "0",
            "--dtype",
            "bf16",
            "--device",
            "cpu",
            "--allow-remote-images",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(args.aliases, ["a", "b"]);
        assert_eq!(args.listen_addr().to_string(), "127.0.0.1:9000");
        assert_eq!(
            (args.max_num_seqs, args.max_model_len, args.max_tiles),
            (4, Some(16384), 6)
        );
        assert_eq!((args.max_body_bytes, args.max_queue), (8 << 20, 0));
        assert_eq!(
            (args.dtype, args.log_format),
            (Dtype::Bf16, LogFormat::Json)
        );
        let config = args.api_config_with_env(no_env).unwrap();
        assert!(config.serves("b") && config.allow_remote_images);
        assert_eq!(config.max_images_per_request, 2);
    }

    #[test]
    fn bad_values_are_refused_with_reasons() {
        for (args, needle) in [
            (&["--max-tiles", "13"][..], "over the model's limit"),
            (&["--max-tiles", "0"], "at least 1"),
            (&["--max-num-seqs", "0"], "at least 1"),
            (&["--max-body-bytes", "12XB"], "unknown unit"),
            (&["--max-body-bytes", "0"], "at least 1 byte"),
            (&["--port", "70000"], "70000"),
            (&["--dtype", "f64"], "f64"),
            (&["--host", "not-an-ip"], "not-an-ip"),
        ] {
            let err = parse(args).err().unwrap().to_string();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        let args = parse(&["--served-model-name", " "]).unwrap();
        assert!(
            args.validate()
                .unwrap_err()
                .to_string()
                .contains("--served-model-name")
        );
    }

    #[test]
    fn keys_from_flags_list_and_named_env_vars() {
        let mut args = parse(&["--api-key", "k1", "--api-key-env", "OPERATOR_KEY"]).unwrap();
        args.api_keys_list = vec!["k2".into(), " ".into(), "k3".into()];
        let env = |name: &str| (name == "OPERATOR_KEY").then(|| " k4\n".to_owned());
        assert_eq!(
            args.resolve_api_keys(env).unwrap(),
            ["k1", "k2", "k3", "k4"]
        );
        let config = args.api_config_with_env(env).unwrap();
        assert!(config.api_keys.accepts("k4") && !config.api_keys.accepts("k5"));
    }

    #[test]
    fn empty_key_list_means_no_auth() {
        let mut args = parse(&[]).unwrap();
        args.api_keys_list = vec![String::new()];
        assert!(
            args.api_config_with_env(no_env)
                .unwrap()
                .api_keys
                .is_empty()
        );
    }

    #[test]
    fn named_key_env_must_exist_and_be_non_empty() {
        let args = parse(&["--api-key-env", "K"]).unwrap();
        assert_eq!(
            args.resolve_api_keys(no_env).unwrap_err(),
            ServeArgsError::KeyEnvMissing("K".into())
        );
        assert_eq!(
            args.resolve_api_keys(|_| Some("  ".into())).unwrap_err(),
            ServeArgsError::KeyEnvEmpty("K".into())
        );
    }

    #[test]
    fn debug_redacts_keys() {
        let mut args = parse(&["--api-key", "hunter2-secret"]).unwrap();
        args.api_keys_list = vec!["list-secret".into()];
        let shown = format!("{args:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("list-secret"),
            "{shown}"
        );
        assert!(shown.contains("[1 redacted]"), "{shown}");
        let config = args.api_config_with_env(no_env).unwrap();
        assert!(!format!("{config:?}").contains("secret"));
    }

    #[test]
    fn byte_sizes() {
        assert_eq!(parse_bytes("33554432"), Ok(32 << 20));
        assert_eq!(parse_bytes("32M"), Ok(32 << 20));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1gib"), Ok(1 << 30));
        assert!(parse_bytes("MiB").is_err());
    }
}
