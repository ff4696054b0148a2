use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::sync::watch;
use tracing::info;

use vlm_operator::controller::{self, Options};
use vlm_operator::crd::VlmCaptioner;
use vlm_operator::http::{HttpState, router};
use vlm_operator::metrics::{DURATION, DURATION_BUCKETS, Metrics};
use vlm_operator::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "vlm-operator",
    version,
    about = "Kubernetes operator for VlmCaptioner resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the controller (in-cluster, or with a kubeconfig).
    Run(RunArgs),
    /// Print the CustomResourceDefinition as YAML.
    Crd,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kubeconfig file; default: $KUBECONFIG or ~/.kube/config, else the in-cluster service account.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context; default: the current context.
    #[arg(long)]
    context: Option<String>,
    /// Watch only this namespace; default: all namespaces.
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the /healthz, /readyz and /metrics server.
    #[arg(long, env = "HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Captioners reconciled at the same time (0 = unbounded).
    #[arg(long, default_value_t = 4)]
    concurrency: u16,
    /// Log format.
    #[arg(long, value_enum, env = "LOG_FORMAT", default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Crd => {
            print!(
                "{}",
                VlmCaptioner::crd_yaml().context("serializing the CRD")?
            );
            Ok(())
        }
        Command::Run(args) => run(args).await,
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_format);
    let prometheus = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(DURATION.into()), DURATION_BUCKETS)?
        .install_recorder()
        .context("installing the Prometheus recorder")?;
    Metrics::describe();

    let client = client(&args).await?;
    let ready = Arc::new(AtomicBool::new(false));

    // One signal stops both the controller and the HTTP server.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        info!("shutdown signal received");
        let _ = stop_tx.send(true);
    });

    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("binding {}", args.http_addr))?;
    info!(addr = %args.http_addr, "serving /healthz, /readyz, /metrics");
    let app = router(HttpState {
        prometheus,
        ready: ready.clone(),
    });
    let http = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );

    let opts = Options {
        namespace: args.namespace,
        concurrency: args.concurrency,
        instance: std::env::var("POD_NAME").ok(),
    };
    controller::run(client, opts, ready, stopped(stop_rx)).await;
    http.await
        .context("HTTP server task")?
        .context("HTTP server")?;
    Ok(())
}

async fn client(args: &RunArgs) -> anyhow::Result<Client> {
    let config = if args.kubeconfig.is_some() || args.context.is_some() {
        let kubeconfig = match &args.kubeconfig {
            Some(path) => Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?,
            None => Kubeconfig::read().context("reading kubeconfig")?,
        };
        let options = KubeConfigOptions {
            context: args.context.clone(),
            ..KubeConfigOptions::default()
        };
        Config::from_custom_kubeconfig(kubeconfig, &options)
            .await
            .context("loading kubeconfig")?
    } else {
        Config::infer()
            .await
            .context("no kubeconfig and no in-cluster service account")?
    };
    Client::try_from(config).context("building the Kubernetes client")
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
