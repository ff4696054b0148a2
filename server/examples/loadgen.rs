//! Load generator for a running vlm-server (or the NIM it replaces): N
//! concurrent clients send nv-ingest-shaped caption requests (a generated PNG,
//! base64) for D seconds or M requests, then a table of latency percentiles,
//! throughput and status counts is printed.
//!
//! ```text
//! cargo run --release -p vlm-server --example loadgen -- \
//!     --url http://127.0.0.1:8000/v1/chat/completions -c 16 -d 60
//! ```

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(about = "Concurrent caption-request load against an OpenAI chat endpoint")]
struct Args {
    /// The chat completions URL, used verbatim (as nv-ingest does).
    #[arg(long, default_value = "http://127.0.0.1:8000/v1/chat/completions")]
    url: String,
    /// Concurrent clients.
    #[arg(short, long, default_value_t = 16)]
    concurrency: usize,
    /// Run for this many seconds (default 30 unless --requests is given).
    #[arg(short, long)]
    duration: Option<f64>,
    /// Stop after this many requests in total.
    #[arg(short = 'n', long)]
    requests: Option<usize>,
    #[arg(long, default_value = "nvidia/nemotron-nano-12b-v2-vl")]
    model: String,
    /// Bearer token; nv-ingest sends "ngcapikey" by default. Empty: no header.
    #[arg(long, default_value = "ngcapikey")]
    api_key: String,
    /// Generated image size, WIDTHxHEIGHT.
    #[arg(long, default_value = "1024x768", value_parser = parse_size)]
    image_size: (u32, u32),
    /// Distinct images, sent round-robin.
    #[arg(long, default_value_t = 8)]
    images: usize,
    #[arg(long, default_value = "Caption the content of this image:")]
    prompt: String,
    /// "/no_think" as nv-ingest sends; "/think" to exercise reasoning.
    #[arg(long, default_value = "/no_think")]
    system_prompt: String,
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    #[arg(long, default_value_t = 1.0)]
    temperature: f64,
    /// Ask the server to ignore EOS so every answer is max_tokens long
    /// (vLLM's extension; vlm-server supports it).
    #[arg(long)]
    ignore_eos: bool,
    /// Use SSE streaming and also report time to first token.
    #[arg(long)]
    stream: bool,
    /// Reuse connections (nv-ingest opens a new one per request).
    #[arg(long)]
    keep_alive: bool,
    /// Per-request timeout in seconds (nv-ingest: 120).
    #[arg(long, default_value_t = 120.0)]
    timeout: f64,
}

fn parse_size(s: &str) -> Result<(u32, u32), String> {
    let (w, h) = s
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("'{s}': expected WIDTHxHEIGHT"))?;
    let parse = |v: &str| v.trim().parse::<u32>().ok().filter(|&n| n > 0);
    match (parse(w), parse(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(format!("'{s}': expected positive WIDTHxHEIGHT")),
    }
}

/// A photo-like PNG: smooth gradients plus noise, so it compresses like a
/// real page image rather than to nothing.
fn make_png(width: u32, height: u32, seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let noise = (state & 0x1f) as u8;
        let r = ((x * 255 / width.max(1)) as u8).wrapping_add(noise);
        let g = ((y * 255 / height.max(1)) as u8).wrapping_add(noise / 2);
        let b = (((x + y + seed) % 256) as u8) ^ noise;
        image::Rgb([r, g, b])
    });
    let mut out = Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("PNG encoding to memory cannot fail");
    out.into_inner()
}

fn body(args: &Args, image_b64: &str) -> String {
    let mut messages = Vec::new();
    if !args.system_prompt.is_empty() {
        messages.push(json!({"role": "system", "content": args.system_prompt}));
    }
    messages.push(json!({"role": "user", "content": [
        {"type": "text", "text": args.prompt},
        {"type": "image_url", "image_url": {"url": format!("data:image/png;base64,{image_b64}")}}
    ]}));
    let mut body = json!({
        "model": args.model,
        "messages": messages,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": 1.0,
        "stream": args.stream,
    });
    if args.ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    body.to_string()
}

/// What one request came to.
struct Sample {
    outcome: String,
    latency: Duration,
    ttft: Option<Duration>,
    completion_tokens: u64,
}

async fn one_request(client: &reqwest::Client, args: &Args, body: String) -> Sample {
    let started = Instant::now();
    let mut request = client
        .post(&args.url)
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .body(body);
    if !args.api_key.is_empty() {
        request = request.bearer_auth(&args.api_key);
    }
    let sample = |outcome: String, ttft, tokens| Sample {
        outcome,
        latency: started.elapsed(),
        ttft,
        completion_tokens: tokens,
    };
    let response = match request.send().await {
        Ok(response) => response,
        Err(err) => return sample(error_kind(&err), None, 0),
    };
    let status = response.status().as_u16();
    if status != 200 {
        let _ = response.bytes().await;
        return sample(status.to_string(), None, 0);
    }
    if args.stream {
        let mut ttft = None;
        let mut bytes = response.bytes_stream();
        let mut text = String::new();
        while let Some(chunk) = bytes.next().await {
            match chunk {
                Ok(chunk) => {
                    text.push_str(&String::from_utf8_lossy(&chunk));
                    if ttft.is_none()
                        && text.contains("\"content\":\"")
                        && text.contains("\"delta\"")
                    {
                        ttft = Some(started.elapsed());
                    }
                }
                Err(err) => return sample(error_kind(&err), ttft, 0),
            }
        }
        let outcome = if text.contains("data: [DONE]") {
            "200"
        } else {
            "200 (no [DONE])"
        };
        let tokens = text.matches("\"content\":\"").count().saturating_sub(1) as u64;
        return sample(outcome.into(), ttft, tokens);
    }
    match response.json::<Value>().await {
        Ok(body) => {
            let choices = body["choices"].as_array().map_or(0, Vec::len);
            let content_ok = body["choices"][0]["message"]["content"].is_string();
            let tokens = body["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            let outcome = if choices == 1 && content_ok {
                "200".to_owned()
            } else {
                "200 (bad body)".to_owned()
            };
            sample(outcome, None, tokens)
        }
        Err(err) => sample(format!("200 ({})", error_kind(&err)), None, 0),
    }
}

fn error_kind(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "timeout".into()
    } else if err.is_connect() {
        "connect error".into()
    } else if err.is_decode() {
        "decode error".into()
    } else {
        "transport error".into()
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn print_latency_row(name: &str, mut values: Vec<Duration>) {
    if values.is_empty() {
        return;
    }
    values.sort();
    let mean = values.iter().sum::<Duration>() / values.len() as u32;
    println!(
        "| {name:<12} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} | {:>8.3} |",
        percentile(&values, 50.0).as_secs_f64(),
        percentile(&values, 90.0).as_secs_f64(),
        percentile(&values, 99.0).as_secs_f64(),
        values.last().copied().unwrap_or_default().as_secs_f64(),
        mean.as_secs_f64(),
    );
}

#[tokio::main]
async fn main() {
    let args = Arc::new(Args::parse());
    let (w, h) = args.image_size;
    let images: Arc<Vec<String>> = Arc::new(
        (0..args.images.max(1))
            .map(|i| base64::engine::general_purpose::STANDARD.encode(make_png(w, h, i as u32)))
            .collect(),
    );
    let b64_len = images[0].len();
    let duration = match (args.duration, args.requests) {
        (Some(d), _) => Some(Duration::from_secs_f64(d)),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(30)),
    };
    let mut builder = reqwest::Client::builder().timeout(Duration::from_secs_f64(args.timeout));
    if !args.keep_alive {
        builder = builder.pool_max_idle_per_host(0);
    }
    let client = builder.build().expect("an HTTP client");
    println!(
        "{} clients → {} ({}; image {w}x{h}, {b64_len} base64 chars; stream={})",
        args.concurrency,
        args.url,
        match (duration, args.requests) {
            (Some(d), Some(n)) => format!("{:.0} s or {n} requests", d.as_secs_f64()),
            (Some(d), None) => format!("{:.0} s", d.as_secs_f64()),
            (None, Some(n)) => format!("{n} requests"),
            (None, None) => unreachable!("a default duration is set"),
        },
        args.stream
    );

    let started = Instant::now();
    let issued = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..args.concurrency.max(1))
        .map(|_| {
            let (args, client, images, issued) = (
                Arc::clone(&args),
                client.clone(),
                Arc::clone(&images),
                Arc::clone(&issued),
            );
            tokio::spawn(async move {
                let mut samples = Vec::new();
                loop {
                    if duration.is_some_and(|d| started.elapsed() >= d) {
                        break;
                    }
                    let n = issued.fetch_add(1, Ordering::SeqCst);
                    if args.requests.is_some_and(|max| n >= max) {
                        break;
                    }
                    let body = body(&args, &images[n % images.len()]);
                    samples.push(one_request(&client, &args, body).await);
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for worker in workers {
        samples.extend(worker.await.expect("worker task"));
    }
    let elapsed = started.elapsed();

    let ok: Vec<&Sample> = samples.iter().filter(|s| s.outcome == "200").collect();
    let mut statuses: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &samples {
        *statuses.entry(s.outcome.as_str()).or_default() += 1;
    }
    let tokens: u64 = ok.iter().map(|s| s.completion_tokens).sum();
    println!();
    println!("| requests | ok | elapsed (s) | requests/s | ok/s | completion tokens/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} | {} | {:.1} | {:.2} | {:.2} | {:.1} |",
        samples.len(),
        ok.len(),
        elapsed.as_secs_f64(),
        samples.len() as f64 / elapsed.as_secs_f64(),
        ok.len() as f64 / elapsed.as_secs_f64(),
        tokens as f64 / elapsed.as_secs_f64(),
    );
    println!();
    println!("| latency (s)  |      p50 |      p90 |      p99 |      max |     mean |");
    println!("|--------------|---------:|---------:|---------:|---------:|---------:|");
    print_latency_row("ok requests", ok.iter().map(|s| s.latency).collect());
    print_latency_row("all requests", samples.iter().map(|s| s.latency).collect());
    print_latency_row("first token", ok.iter().filter_map(|s| s.ttft).collect());
    println!();
    println!("| status | count |");
    println!("|---|---:|");
    for (status, count) in statuses {
        println!("| {status} | {count} |");
    }
}
