use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use tokio::sync::watch;
use tracing::{info, warn};

use vlm_operator::builders;
use vlm_operator::controller::{self, Options};
use vlm_operator::crd::VlmCaptioner;
use vlm_operator::http::{HttpState, router};
use vlm_operator::leader::{self, LeaseLock};
use vlm_operator::metrics::{DURATION, DURATION_BUCKETS, LEADER, Metrics};
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
    /// Watch only these namespaces (repeatable, or comma-separated); default: all namespaces.
    #[arg(long = "namespace", env = "WATCH_NAMESPACES", value_delimiter = ',')]
    namespaces: Vec<String>,
    /// vlm-server image for captioners that do not set `spec.image`.
    #[arg(long, env = "VLM_DEFAULT_SERVER_IMAGE", default_value = builders::BUILTIN_SERVER_IMAGE)]
    default_server_image: String,
    /// Elect a leader on a Lease so that only one replica reconciles.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    leader_elect: bool,
    /// Namespace of the leader Lease; default: POD_NAMESPACE, else the client's namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    leader_election_namespace: Option<String>,
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

    builders::set_default_server_image(&args.default_server_image);
    info!(default_server_image = builders::default_server_image(), namespaces = ?args.namespaces, "starting");

    let client = client(&args).await?;
    let ready = Arc::new(AtomicBool::new(false));
    let leader = Arc::new(AtomicBool::new(false));

    // One signal stops both the controller and the HTTP server.
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx_http = stop_tx.clone();
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
        leader: leader.clone(),
    });
    let http = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );

    let instance = std::env::var("POD_NAME").ok();
    let opts = Options {
        namespaces: args.namespaces.clone(),
        concurrency: args.concurrency,
        instance: instance.clone(),
    };
    let result = if args.leader_elect {
        let ns = args
            .leader_election_namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_string());
        // Outside a pod: unique enough that two local runs do not both think they lead.
        let identity = instance.unwrap_or_else(|| {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default();
            format!("vlm-operator-{}-{nanos}", std::process::id())
        });
        let lock = LeaseLock::new(client.clone(), &ns, leader::LEASE_NAME, &identity);
        lead(lock, client, opts, ready, leader, stop_rx).await
    } else {
        leader.store(true, Ordering::Relaxed);
        metrics::gauge!(LEADER).set(1.0);
        controller::run(client, opts, ready, stopped(stop_rx)).await;
        Ok(())
    };
    // Stop the HTTP server too when leadership was lost (the stop signal may not have come).
    let _ = stop_tx_http.send(true);
    http.await
        .context("HTTP server task")?
        .context("HTTP server")?;
    result
}

/// Standby until the Lease is ours, then run the controller while renewing it. Losing the
/// Lease ends the process (as client-go does): a fresh start as standby is simpler and safer
/// than reusing caches a new leader may already have acted past.
async fn lead(
    lock: LeaseLock,
    client: Client,
    opts: Options,
    ready: Arc<AtomicBool>,
    leader: Arc<AtomicBool>,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    // A standby is ready: during a rolling update the new pod must become ready before the old
    // leader is stopped, or the rollout would wait on itself.
    ready.store(true, Ordering::Relaxed);
    info!(identity = %lock.identity(), "standby: waiting for the leader Lease");
    tokio::select! {
        () = lock.acquire() => {}
        () = stopped(stop_rx.clone()) => return Ok(()),
    }
    leader.store(true, Ordering::Relaxed);
    metrics::gauge!(LEADER).set(1.0);
    ready.store(false, Ordering::Relaxed);

    let (lost_tx, lost_rx) = watch::channel(false);
    let holder = lock.clone();
    let renew = tokio::spawn(async move {
        holder.hold().await;
        let _ = lost_tx.send(true);
    });
    let stop = {
        let (stop_rx, lost_rx) = (stop_rx.clone(), lost_rx.clone());
        async move {
            tokio::select! {
                () = stopped(stop_rx) => {}
                () = stopped(lost_rx) => {}
            }
        }
    };
    controller::run(client, opts, ready, stop).await;
    renew.abort();
    leader.store(false, Ordering::Relaxed);
    metrics::gauge!(LEADER).set(0.0);
    if *lost_rx.borrow() {
        anyhow::bail!("lost the leader Lease");
    }
    if let Err(e) = lock.release().await {
        warn!(error = %e, "could not release the leader Lease");
    }
    info!("released the leader Lease");
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
