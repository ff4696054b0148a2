//! The full-size Nemotron Nano 12B v2 VL on random weights (a measurement, not a test):
//! time to first token for image prompts, greedy decode tokens/s at several batch sizes and
//! vision tiles/s, each the median of several runs, with the decode floor set by memory
//! bandwidth printed beside the measured numbers. `scripts/bench_reference_gpu.py` measures
//! the same quantities the same way with transformers; `scripts/gpu-check.sh` runs both.
//!
//! The model is built from `scripts/full-size-config.json` (the real shapes, model.md) through
//! the crate's own loaders, with `model::random::RandomWeights` in place of the safetensors
//! files. Prompts are token ids and random pixel tiles (no tokenizer, no image decode): TTFT
//! covers vision + projector + prefill + the first token read back to the host.
//!
//!     # GPU (BF16)
//!     bench_full --device cuda --json bench.json
//!     # CPU dry run (F32): the real widths, fewer layers and smaller sizes
//!     bench_full --device cpu --pattern 'M*-' --vision-layers 1 --vocab 4096 --tiles 1 \
//!         --batch 1,2 --decode-steps 2 --decode-context 16 --vision-batch 1 --runs 1

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{D, DType, Device, Tensor};
use clap::Parser;
use serde_json::{Value, json};
use vlm_server::model::config::{CheckpointConfig, LayerKind, VlConfig, eos_union};
use vlm_server::model::nemotron_h::NemotronH;
use vlm_server::model::random::{RandomWeights, VisionShape, checkpoint_layout};
use vlm_server::model::vlm::NemotronVl;

const FULL_SIZE_CONFIG: &str = include_str!("../../scripts/full-size-config.json");

#[derive(Parser)]
struct Args {
    /// `cpu` (F32) or `cuda` (BF16, GPU 0).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// A config.json to use instead of the built-in full-size one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Keep only the first N LLM layers of the pattern (dry runs).
    #[arg(long)]
    layers: Option<usize>,
    /// A layer pattern instead of the config's, e.g. `M*-` (dry runs: one layer of each kind).
    #[arg(long, conflicts_with = "layers")]
    pattern: Option<String>,
    /// Keep only the first N RADIO blocks (dry runs).
    #[arg(long)]
    vision_layers: Option<usize>,
    /// Embedding / lm_head rows (dry runs; default: the config's vocab_size).
    #[arg(long)]
    vocab: Option<usize>,
    /// Image tiles of the TTFT prompts (256 image tokens each).
    #[arg(long, value_delimiter = ',', default_value = "1,13")]
    tiles: Vec<usize>,
    /// Text tokens around the image in the TTFT prompts (system + user text + generation prompt).
    #[arg(long, default_value_t = 40)]
    text_tokens: usize,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// Greedy steps per timed decode run.
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Prompt tokens prefilled into each sequence before decoding (≈ a 1-tile prompt).
    #[arg(long, default_value_t = 300)]
    decode_context: usize,
    /// Tiles per vision batch.
    #[arg(long, default_value_t = 13)]
    vision_batch: usize,
    /// Timed runs per measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Device memory bandwidth for the decode floor, TB/s (H100 SXM measured: ~3.0).
    #[arg(long, default_value_t = 3.0)]
    bandwidth_tbs: f64,
    /// Write the results as JSON here (rewritten after every measurement).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Profile one phase instead of measuring: warm it up, time how long the host takes to
    /// issue it against how long it takes to finish (median of --runs), then run it once
    /// more between cuProfilerStart/Stop, for `ncu --profile-from-start off`.
    #[arg(long, value_enum)]
    profile: Option<Phase>,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Phase {
    /// One greedy decode step of the first --batch size, at --decode-context.
    Decode,
    /// The LLM prefill of the first --tiles prompt (embeddings ready, no vision).
    Prefill,
    /// RADIO + projector on --vision-batch tiles.
    Vision,
}

/// Brackets the region `ncu --profile-from-start off` profiles (no-op without a profiler).
fn profiler(on: bool) -> Result<()> {
    #[cfg(feature = "cuda")]
    {
        // Looked up at run time: the link-time libcuda stub of the build machine lacks them.
        let name = if on {
            c"cuProfilerStart"
        } else {
            c"cuProfilerStop"
        };
        // SAFETY: dlopen/dlsym of the driver the process already loaded; the symbol is the
        // driver's `CUresult cuProfilerStart(void)` (or Stop), called on candle's current
        // context.
        let r = unsafe {
            let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
            let f = if lib.is_null() {
                std::ptr::null_mut()
            } else {
                libc::dlsym(lib, name.as_ptr())
            };
            if f.is_null() {
                bail!("{name:?} not found in libcuda.so.1");
            }
            let f: extern "C" fn() -> i32 = std::mem::transmute(f);
            f()
        };
        if r != 0 {
            bail!("{name:?} returned CUresult {r}");
        }
    }
    let _ = on;
    Ok(())
}

/// Everything that touches `NemotronH`'s per-sequence state API (which is being reworked
/// into a slot pool): fresh states for a batch of sequences and one forward pass over them.
mod batch_state {
    use candle_core::{Result, Tensor};
    use vlm_server::model::nemotron_h::{LogitsFor, NemotronH};
    use vlm_server::model::state::{SequenceState, StatePool};

    /// The sequences hold slots of a pool sized for them, as the scheduler's do.
    pub struct Batch {
        pool: StatePool,
        states: Vec<SequenceState>,
    }

    impl Batch {
        pub fn new(llm: &NemotronH, sequences: usize) -> Result<Self> {
            let pool = llm.new_pool(sequences)?;
            let states = (0..sequences)
                .map(|_| {
                    pool.acquire(None)?
                        .ok_or_else(|| candle_core::Error::Msg("state pool is full".into()))
                })
                .collect::<Result<_>>()?;
            Ok(Batch { pool, states })
        }

        /// `embeds`: the sequences' new tokens packed back to back (`seq_lens` each);
        /// returns the last-token logits [sequences, vocab] (f32).
        pub fn forward(
            &mut self,
            llm: &NemotronH,
            embeds: &Tensor,
            seq_lens: &[usize],
        ) -> Result<Tensor> {
            let mut refs: Vec<&mut SequenceState> = self.states.iter_mut().collect();
            llm.forward(
                embeds,
                seq_lens,
                &self.pool,
                &mut refs,
                LogitsFor::LastToken,
            )
        }
    }
}
use batch_state::Batch;

/// Deterministic token ids in [1000, vocab) (below 1000 are control tokens).
struct Ids(u64);

impl Ids {
    fn take(&mut self, n: usize, vocab: usize) -> Vec<u32> {
        (0..n)
            .map(|_| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (1000 + (self.0 >> 33) as usize % (vocab - 1000)) as u32
            })
            .collect()
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Greedy ids of last-token logits [n, vocab], read back to the host (a device sync).
fn greedy(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?)
}

/// The built-in (or given) config, cut to the dry-run sizes.
fn load_config(args: &Args) -> Result<CheckpointConfig> {
    let text = match &args.config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => FULL_SIZE_CONFIG.to_string(),
    };
    // Python's json.dump writes Infinity (time_step_limit); the crate's parser accepts it.
    let mut raw: Value = vlm_server::model::config::parse_json_lenient(&text)?;
    let llm = &mut raw["llm_config"];
    if let Some(pattern) = &args.pattern {
        llm["hybrid_override_pattern"] = json!(pattern);
        llm["num_hidden_layers"] = json!(pattern.len());
    }
    if let Some(n) = args.layers {
        let pattern = llm["hybrid_override_pattern"]
            .as_str()
            .context("llm_config.hybrid_override_pattern")?
            .to_string();
        if n == 0 || n > pattern.len() {
            bail!("--layers {n}: the pattern has {} layers", pattern.len());
        }
        llm["hybrid_override_pattern"] = json!(pattern[..n]);
        llm["num_hidden_layers"] = json!(n);
    }
    if let Some(v) = args.vocab {
        llm["vocab_size"] = json!(v);
    }
    if let Some(n) = args.vision_layers {
        raw["vision_config"]["num_hidden_layers"] = json!(n);
    }
    let model: VlConfig = VlConfig::from_json_str(&serde_json::to_string(&raw)?)?;
    let eos_token_ids = eos_union(&model, None);
    Ok(CheckpointConfig {
        model,
        generation: None,
        eos_token_ids,
    })
}

/// Bytes one decode step must move, besides the weights, per sequence at context `ctx`:
/// the f32 Mamba states read and written, and the KV cache read.
fn state_bytes_per_seq(llm: &NemotronH, ctx: usize, kv_dtype: DType) -> f64 {
    let c = llm.config();
    let mamba = c.layers.iter().filter(|k| **k == LayerKind::Mamba).count();
    let attn = c
        .layers
        .iter()
        .filter(|k| **k == LayerKind::Attention)
        .count();
    let ssm = c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size;
    let conv = (c.conv_kernel - 1) * c.mamba_conv_dim();
    let kv = 2 * c.num_kv_heads() * c.attn_head_dim();
    (mamba * (ssm + conv) * 4 * 2 + attn * ctx * kv * kv_dtype.size_in_bytes()) as f64
}

struct Report {
    rows: Vec<[String; 4]>,
    failures: usize,
    json: serde_json::Map<String, Value>,
    path: Option<PathBuf>,
}

impl Report {
    fn add(
        &mut self,
        what: String,
        value: String,
        runs: String,
        detail: String,
        key: &str,
        v: Value,
    ) {
        println!("  {what}: {value} ({runs}) {detail}");
        self.rows.push([what, value, runs, detail]);
        self.put(key, v);
    }

    /// Record a failed measurement (and go on with the next one).
    fn check(&mut self, result: Result<()>, what: &str, key: &str) {
        if let Err(e) = result {
            let msg = format!("{e:#}");
            println!("  {what}: FAILED: {msg}");
            self.rows
                .push([what.into(), "FAILED".into(), "-".into(), msg.clone()]);
            self.failures += 1;
            self.put(key, json!({ "error": msg }));
        }
    }

    /// Record `key` and rewrite the JSON file, so a run cut short keeps what it measured.
    fn put(&mut self, key: &str, v: Value) {
        self.json.insert(key.to_string(), v);
        if let Some(p) = &self.path {
            let text = serde_json::to_string_pretty(&Value::Object(self.json.clone())).unwrap();
            if let Err(e) = std::fs::write(p, text + "\n") {
                eprintln!("cannot write {}: {e}", p.display());
            }
        }
    }

    fn print_table(&self) {
        let widths: Vec<usize> = (0..4)
            .map(|i| self.rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
            .collect();
        let heads = ["measurement", "median", "runs", "detail"];
        let line = |cells: [&str; 4]| {
            let padded: Vec<String> = cells
                .iter()
                .zip(&widths)
                .map(|(c, w)| format!("{c:<w$}", w = (*w).max(11)))
                .collect();
            println!("| {} |", padded.join(" | "));
        };
        line(heads);
        for r in &self.rows {
            line([&r[0], &r[1], &r[2], &r[3]]);
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 || args.decode_steps == 0 {
        bail!("--runs and --decode-steps must be positive");
    }
    let device = match args.device.as_str() {
        "cpu" => Device::Cpu,
        "cuda" => {
            vlm_server::device::cuda(0).context("--device cuda (needs a --features cuda build)")?
        }
        other => bail!("--device {other}: expected cpu or cuda"),
    };
    // candle has no BF16 matmul on CPU; the GPU runs the checkpoint's BF16.
    let dtype = if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    };
    let config = load_config(&args)?;
    let vision_shape = VisionShape::from_config(&config.model)?;
    let weights = RandomWeights::new(checkpoint_layout(&config.model, &vision_shape));
    let all = weights.elem_count("") as f64;
    let llm_elems = weights.elem_count("language_model.") as f64;
    let emb_elems = weights.elem_count("language_model.backbone.embeddings.") as f64;
    let bytes = dtype.size_in_bytes() as f64;

    let t = Instant::now();
    let model = NemotronVl::from_var_builder(config, weights.into_var_builder(dtype, &device))?;
    device.synchronize()?;
    let build_s = t.elapsed().as_secs_f64();
    let llm = &model.llm;
    let vocab = llm.vocab_size();
    let kinds = &llm.config().layers;
    let count = |k: LayerKind| kinds.iter().filter(|x| **x == k).count();
    println!(
        "bench_full: {device:?} {dtype:?}; LLM {} layers ({} Mamba, {} attention, {} MLP), \
         vocab {vocab}; RADIO {} blocks; {:.2} B parameters = {:.1} GB; built in {build_s:.1} s",
        kinds.len(),
        count(LayerKind::Mamba),
        count(LayerKind::Attention),
        count(LayerKind::Mlp),
        vision_shape.layers,
        all / 1e9,
        all * bytes / 1e9,
    );

    let mut bench = Bench {
        report: Report {
            rows: Vec::new(),
            failures: 0,
            json: serde_json::Map::new(),
            path: args.json.clone(),
        },
        ids: Ids(0x5eed),
        bw: args.bandwidth_tbs * 1e12,
        // A decode step reads every LLM weight except the embedding table (a row per sequence).
        step_weight_bytes: (llm_elems - emb_elems) * bytes,
        model: &model,
        device: &device,
        dtype,
        args: &args,
    };
    bench.report.put(
        "setup",
        json!({
            "device": format!("{device:?}"), "dtype": format!("{dtype:?}"),
            "llm_layers": kinds.len(), "vision_layers": vision_shape.layers, "vocab": vocab,
            "params": all, "weight_bytes": all * bytes, "build_s": build_s,
            "runs": args.runs, "warmup": args.warmup, "bandwidth_tbs": args.bandwidth_tbs,
        }),
    );
    if let Some(phase) = args.profile {
        return bench.profile(phase);
    }
    // One failed measurement (say, an op missing on the GPU) is recorded, and the rest run.
    for &b in &args.batch {
        let r = bench.decode(b);
        bench
            .report
            .check(r, &format!("decode batch {b}"), &format!("decode_b{b}"));
    }
    for &n in &args.tiles {
        let r = bench.ttft(n);
        bench
            .report
            .check(r, &format!("TTFT {n} tiles"), &format!("ttft_{n}"));
    }
    for (key, what, projector) in [
        ("vision", "RADIO", false),
        ("vision_projector", "RADIO+projector", true),
    ] {
        let r = bench.vision(key, what, projector);
        bench.report.check(r, what, key);
    }

    let bw = bench.bw;
    let step_weight_bytes = bench.step_weight_bytes;
    let weights_floor = bw / step_weight_bytes;
    bench.report.put(
        "floor",
        json!({"step_weight_bytes": step_weight_bytes, "b1_tok_s": weights_floor,
               "all_weights_b1_tok_s": bw / (all * bytes)}),
    );
    println!();
    println!(
        "decode floor (batch 1, weights only): {:.1} GB of LLM weights per step (all but the \
         embedding table) / {} TB/s = {:.2} ms → {weights_floor:.0} tok/s; all {:.1} GB of \
         weights would give {:.0} tok/s",
        step_weight_bytes / 1e9,
        args.bandwidth_tbs,
        step_weight_bytes / bw * 1e3,
        all * bytes / 1e9,
        bw / (all * bytes),
    );
    bench.report.print_table();
    if bench.report.failures > 0 {
        bail!("{} measurement(s) failed", bench.report.failures);
    }
    Ok(())
}

struct Bench<'a> {
    model: &'a NemotronVl,
    device: &'a Device,
    dtype: DType,
    args: &'a Args,
    report: Report,
    ids: Ids,
    /// Memory bandwidth, bytes/s.
    bw: f64,
    step_weight_bytes: f64,
}

impl Bench<'_> {
    /// Greedy decode of `b` sequences, each prefilled with `decode_context` ids.
    fn decode(&mut self, b: usize) -> Result<()> {
        let (llm, args, device) = (&self.model.llm, self.args, self.device);
        let mut batch = Batch::new(llm, b)?;
        let prompt = self.ids.take(b * args.decode_context, llm.vocab_size());
        let embeds = llm.embed(&Tensor::new(prompt.as_slice(), device)?)?;
        let mut next = greedy(&batch.forward(llm, &embeds, &vec![args.decode_context; b])?)?;
        let ones = vec![1usize; b];
        let mut step = |next: &mut Vec<u32>| -> Result<()> {
            let e = llm.embed(&Tensor::new(next.as_slice(), device)?)?;
            *next = greedy(&batch.forward(llm, &e, &ones)?)?;
            Ok(())
        };
        for _ in 0..args.warmup * 4 {
            step(&mut next)?;
        }
        let mut times = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            for _ in 0..args.decode_steps {
                step(&mut next)?;
            }
            times.push(t.elapsed().as_secs_f64());
        }
        let per_step = median(times.clone()) / args.decode_steps as f64;
        let tok_s = b as f64 / per_step;
        let ctx = args.decode_context + (args.warmup * 4 + args.runs * args.decode_steps) / 2;
        let step_bytes =
            self.step_weight_bytes + b as f64 * state_bytes_per_seq(llm, ctx, self.dtype);
        let floor = b as f64 * self.bw / step_bytes;
        self.report.add(
            format!("decode batch {b}"),
            format!("{tok_s:.1} tok/s"),
            format!("{} × {} steps", args.runs, args.decode_steps),
            format!(
                "step {:.2} ms; floor {floor:.0} tok/s ({:.1} GB/step at {} TB/s) = {:.0}% of floor",
                per_step * 1e3,
                step_bytes / 1e9,
                args.bandwidth_tbs,
                100.0 * tok_s / floor
            ),
            &format!("decode_b{b}"),
            json!({"tok_s": tok_s, "step_ms": per_step * 1e3, "floor_tok_s": floor,
                   "step_bytes": step_bytes, "runs_s": times, "steps": args.decode_steps}),
        );
        Ok(())
    }

    /// Time to first token of a prompt with `n` image tiles: vision + projector + embed +
    /// prefill + the first greedy id read back.
    fn ttft(&mut self, n: usize) -> Result<()> {
        let (model, args, device) = (self.model, self.args, self.device);
        let (llm, vocab) = (&model.llm, model.llm.vocab_size());
        let tile = model.tile_size();
        let pixels = Tensor::randn(0f32, 1f32, (n, 3, tile, tile), device)?;
        let head = args.text_tokens / 2;
        let mut prompt = self.ids.take(head, vocab);
        prompt.extend(self.ids.take(1, vocab)); // <img>
        prompt.extend(std::iter::repeat_n(
            model.image_context_id(),
            n * model.tokens_per_tile(),
        ));
        prompt.extend(self.ids.take(1, vocab)); // </img>
        prompt.extend(self.ids.take(args.text_tokens - head, vocab));
        let once = || -> Result<(f64, f64)> {
            let t = Instant::now();
            let images = model.encode_images(&pixels)?;
            device.synchronize()?;
            let vision_s = t.elapsed().as_secs_f64();
            let embeds = model.embed_prompt(&prompt, Some(&images))?;
            let mut batch = Batch::new(llm, 1)?;
            greedy(&batch.forward(llm, &embeds, &[prompt.len()])?)?;
            Ok((t.elapsed().as_secs_f64(), vision_s))
        };
        for _ in 0..args.warmup {
            once()?;
        }
        let (mut total, mut vision) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            let (t, v) = once()?;
            total.push(t);
            vision.push(v);
        }
        let (t, v) = (median(total.clone()), median(vision));
        self.report.add(
            format!("TTFT {n} tile{}", if n == 1 { "" } else { "s" }),
            format!("{:.1} ms", t * 1e3),
            format!("{}", args.runs),
            format!(
                "{} prompt tokens; vision+projector {:.1} ms, embed+prefill+first token {:.1} ms",
                prompt.len(),
                v * 1e3,
                (t - v) * 1e3
            ),
            &format!("ttft_{n}"),
            json!({"ms": t * 1e3, "vision_ms": v * 1e3, "prompt_tokens": prompt.len(),
                   "runs_s": total}),
        );
        Ok(())
    }

    /// `--profile`: see [`Args::profile`].
    fn profile(&mut self, phase: Phase) -> Result<()> {
        let (model, args, device) = (self.model, self.args, self.device);
        let llm = &model.llm;
        let tile = model.tile_size();
        // Returns (host time to issue the phase, time until its result is on the host).
        let mut run: Box<dyn FnMut() -> Result<(f64, f64)>> = match phase {
            Phase::Decode => {
                let b = args.batch[0];
                let mut batch = Batch::new(llm, b)?;
                let prompt = self.ids.take(b * args.decode_context, llm.vocab_size());
                let embeds = llm.embed(&Tensor::new(prompt.as_slice(), device)?)?;
                let mut next =
                    greedy(&batch.forward(llm, &embeds, &vec![args.decode_context; b])?)?;
                let ones = vec![1usize; b];
                Box::new(move || {
                    let t = Instant::now();
                    let e = llm.embed(&Tensor::new(next.as_slice(), device)?)?;
                    let logits = batch.forward(llm, &e, &ones)?;
                    let issued = t.elapsed().as_secs_f64();
                    next = greedy(&logits)?;
                    Ok((issued, t.elapsed().as_secs_f64()))
                })
            }
            Phase::Prefill => {
                let n = args.tiles[0];
                let pixels = Tensor::randn(0f32, 1f32, (n, 3, tile, tile), device)?;
                let mut prompt = self.ids.take(args.text_tokens, llm.vocab_size());
                prompt.extend(std::iter::repeat_n(
                    model.image_context_id(),
                    n * model.tokens_per_tile(),
                ));
                let embeds = model.embed_prompt(&prompt, Some(&model.encode_images(&pixels)?))?;
                Box::new(move || {
                    let mut batch = Batch::new(llm, 1)?;
                    device.synchronize()?;
                    let t = Instant::now();
                    let logits = batch.forward(llm, &embeds, &[prompt.len()])?;
                    let issued = t.elapsed().as_secs_f64();
                    greedy(&logits)?;
                    Ok((issued, t.elapsed().as_secs_f64()))
                })
            }
            Phase::Vision => {
                let n = args.vision_batch;
                let pixels = Tensor::randn(0f32, 1f32, (n, 3, tile, tile), device)?;
                Box::new(move || {
                    let t = Instant::now();
                    let out = model.encode_images(&pixels)?;
                    let issued = t.elapsed().as_secs_f64();
                    out.flatten_all()?
                        .narrow(0, 0, 1)?
                        .to_dtype(DType::F32)?
                        .to_vec1::<f32>()?;
                    Ok((issued, t.elapsed().as_secs_f64()))
                })
            }
        };
        for _ in 0..args.warmup.max(1) {
            run()?;
        }
        let times = (0..args.runs).map(|_| run()).collect::<Result<Vec<_>>>()?;
        let issued = median(times.iter().map(|t| t.0).collect());
        let total = median(times.iter().map(|t| t.1).collect());
        println!(
            "profile {phase:?}: host issues it in {:.2} ms, done after {:.2} ms (medians of {})",
            issued * 1e3,
            total * 1e3,
            args.runs
        );
        self.report.put(
            "profile",
            json!({"phase": format!("{phase:?}"), "issue_ms": issued * 1e3,
                   "total_ms": total * 1e3, "runs": args.runs}),
        );
        device.synchronize()?;
        profiler(true)?;
        run()?;
        device.synchronize()?;
        profiler(false)
    }

    /// Tiles/s of RADIO (and the projector) on a batch of `vision_batch` tiles.
    fn vision(&mut self, key: &str, what: &str, projector: bool) -> Result<()> {
        let (model, args) = (self.model, self.args);
        let n = args.vision_batch;
        let tile = model.tile_size();
        let pixels =
            Tensor::randn(0f32, 1f32, (n, 3, tile, tile), self.device)?.to_dtype(self.dtype)?;
        let once = || -> Result<f64> {
            let t = Instant::now();
            let out = if projector {
                model.encode_images(&pixels)?
            } else {
                model.vision.forward(&pixels)?
            };
            // Read one value back: the work is done when it arrives.
            out.flatten_all()?
                .narrow(0, 0, 1)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            Ok(t.elapsed().as_secs_f64())
        };
        for _ in 0..args.warmup {
            once()?;
        }
        let times = (0..args.runs).map(|_| once()).collect::<Result<Vec<_>>>()?;
        let t = median(times.clone());
        self.report.add(
            format!("{what}, {n} tiles"),
            format!("{:.1} tiles/s", n as f64 / t),
            format!("{}", args.runs),
            format!("{:.1} ms per batch", t * 1e3),
            key,
            json!({"tiles_s": n as f64 / t, "batch": n, "ms": t * 1e3, "runs_s": times}),
        );
        Ok(())
    }
}
