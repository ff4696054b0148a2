//! `vlm-server`: `serve` the OpenAI/NIM API, or `caption` images from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device};
use clap::{Parser, Subcommand};
use vlm_server::api::cli::{CpuMatmulArg, DeviceKind, Dtype, LogFormat, ServeArgs};
use vlm_server::api::{self, Metrics};
use vlm_server::engine::local::{EngineOptions, LocalEngine};
use vlm_server::engine::{
    ChatMessage, ChatRequest, ContentPart, Engine, GenerationEvent, Role, SamplingParams,
};
use vlm_server::model::linear::CpuMatmul;
use vlm_server::preprocess::ImageLimits;

#[derive(Parser)]
#[command(
    name = "vlm-server",
    version,
    about = "OpenAI/NIM-compatible server for Nemotron Nano 12B v2 VL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the OpenAI/NIM REST API.
    Serve(Box<ServeArgs>),
    /// Caption images and print the result (no HTTP).
    Caption(CaptionArgs),
    /// Download a checkpoint from the Hugging Face Hub into a directory.
    Download(vlm_server::download::DownloadArgs),
}

#[derive(clap::Args)]
struct CaptionArgs {
    /// Checkpoint directory.
    #[arg(long = "model", value_name = "DIR")]
    model_dir: PathBuf,
    /// Image files (PNG, JPEG, WebP), all in one prompt.
    #[arg(required = true)]
    images: Vec<PathBuf>,
    #[arg(long, default_value = "Caption the content of this image:")]
    prompt: String,
    #[arg(long, default_value = "/no_think")]
    system_prompt: String,
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, value_enum, default_value_t = DeviceKind::default())]
    device: DeviceKind,
    #[arg(long, value_enum, default_value_t = Dtype::Auto)]
    dtype: Dtype,
    /// Precision of the activations in CPU matmuls with BF16 weights.
    #[arg(long, value_enum, env = "VLM_CPU_MATMUL", default_value_t = CpuMatmulArg::Auto)]
    cpu_matmul: CpuMatmulArg,
}

fn main() -> ExitCode {
    vlm_server::memory::tune_allocator();
    let cli = Cli::parse();
    let log_format = match &cli.command {
        Command::Serve(args) => args.log_format,
        Command::Caption(_) | Command::Download(_) => LogFormat::Text,
    };
    init_tracing(log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => serve(*args).await,
            Command::Caption(args) => caption(args).await,
            Command::Download(args) => vlm_server::download::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn device_and_dtype(device: DeviceKind, dtype: Dtype) -> Result<(Device, DType)> {
    let device = match device {
        DeviceKind::Cpu => Device::Cpu,
        DeviceKind::Cuda => vlm_server::device::cuda(0).context("opening CUDA device 0")?,
    };
    let dtype = match (dtype, device.is_cpu()) {
        (Dtype::Auto, true) | (Dtype::F32, _) => DType::F32,
        (Dtype::Auto, false) | (Dtype::Bf16, _) => DType::BF16,
        (Dtype::F16, _) => DType::F16,
    };
    if device.is_cpu() && dtype != DType::F32 {
        bail!(
            "--dtype {dtype:?} is not supported on CPU (the CPU path keeps activations in f32); \
             use f32, and --cpu-matmul bf16 for BF16 matmul inputs"
        );
    }
    Ok((device, dtype))
}

/// The CPU matmul precision `choice` stands for on this machine, logged when it matters.
fn cpu_matmul(choice: CpuMatmulArg, device: DeviceKind) -> CpuMatmul {
    let mode = choice.resolve();
    if device == DeviceKind::Cpu {
        let native = CpuMatmul::bf16_native();
        tracing::info!(?mode, avx512_bf16 = native, "CPU matmul activations");
    }
    mode
}

/// Engine options for a model directory on a device; callers adjust the limits.
fn engine_options(
    model_dir: PathBuf,
    device_kind: DeviceKind,
    dtype: Dtype,
    matmul: CpuMatmulArg,
) -> Result<EngineOptions> {
    let (device, dtype) = device_and_dtype(device_kind, dtype)?;
    Ok(EngineOptions {
        model_dir,
        device,
        dtype,
        cpu_matmul: cpu_matmul(matmul, device_kind),
        max_num_seqs: 1,
        max_queue: 1,
        max_model_len: None,
        max_tiles: 12,
        prefill_chunk: 512,
        image_limits: ImageLimits::default(),
        state_memory: None,
    })
}

async fn serve(args: ServeArgs) -> Result<()> {
    let api_config = args.api_config()?;
    let options = EngineOptions {
        max_num_seqs: args.max_num_seqs,
        max_queue: args.max_queue,
        max_model_len: args.max_model_len,
        max_tiles: args.max_tiles,
        state_memory: args.state_memory,
        ..engine_options(
            args.model_dir.clone(),
            args.device,
            args.dtype,
            args.cpu_matmul,
        )?
    };
    let metrics = Metrics::new();
    if metrics.install_global().is_err() {
        tracing::warn!("a metrics recorder was already installed; engine gauges go there");
    }
    let (engine, load_failed) = LocalEngine::start(options)?;
    let router = api::router(Arc::clone(&engine), api_config, metrics);
    let addr = args.listen_addr();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    tracing::info!(%addr, model = %args.model_dir.display(), "listening; loading the model");
    let shutdown = async {
        shutdown_signal().await;
    };
    tokio::select! {
        served = api::serve(listener, router, shutdown) => served.context("HTTP server"),
        Ok(error) = load_failed => Err(error),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}

async fn caption(args: CaptionArgs) -> Result<()> {
    let options = engine_options(
        args.model_dir.clone(),
        args.device,
        args.dtype,
        args.cpu_matmul,
    )?;
    let (engine, mut load_failed) = LocalEngine::start(options)?;
    while !engine.is_ready() {
        if let Ok(e) = load_failed.try_recv() {
            return Err(e);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut parts = Vec::new();
    for path in &args.images {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        parts.push(ContentPart::Image(Arc::new(bytes)));
    }
    parts.push(ContentPart::Text(args.prompt));
    let mut messages = Vec::new();
    if !args.system_prompt.is_empty() {
        messages.push(ChatMessage {
            role: Role::System,
            parts: vec![ContentPart::Text(args.system_prompt)],
        });
    }
    messages.push(ChatMessage {
        role: Role::User,
        parts,
    });
    let request = ChatRequest {
        messages,
        sampling: SamplingParams {
            temperature: args.temperature,
            seed: args.seed,
            ..SamplingParams::default()
        },
        max_tokens: args.max_tokens,
        stop: Vec::new(),
        max_tiles: None,
        ignore_eos: false,
    };
    let mut generation = engine.submit(request).await?;
    let mut caption = String::new();
    while let Some(event) = generation.events.recv().await {
        match event {
            GenerationEvent::Delta(text) => caption.push_str(&text),
            GenerationEvent::Finished { reason, usage } => {
                println!("{caption}");
                tracing::info!(
                    finish_reason = reason.as_str(),
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    "done"
                );
                return Ok(());
            }
            GenerationEvent::Failed(e) => bail!(e),
        }
    }
    bail!("the engine stopped before finishing")
}
