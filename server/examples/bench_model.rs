//! Model throughput on CPU, batch 1 (a measurement, not a test), defined exactly
//! as `scripts/bench_reference.py` defines it for the transformers reference:
//! prefill tokens/s = prompt tokens / median prefill time (vision included for
//! the image prompt), decode tokens/s = decode tokens / median decode time
//! (greedy, cached state); for the image prompt also the median time of the vision encoder
//! and projector alone. `scripts/bench_vs_reference.sh` runs both.
//!
//! cargo run --release -p vlm-server --example bench_model -- --model target/mid-checkpoint

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use vlm_server::engine::{ChatMessage, ContentPart, Role};
use vlm_server::model::config::parse_json_lenient;
use vlm_server::model::nemotron_h::LogitsFor;
use vlm_server::model::vlm::NemotronVl;
use vlm_server::preprocess::{RgbImage, TilingConfig, tile_image};
use vlm_server::prompt::{ChatTemplate, ImageTokens, PromptTokenizer};

const FILLER: &str = "The model reads images in tiles of equal size and writes a short answer in plain English. \
Describe the chart, read the table, and summarize the document. Mountains, rivers, forests, \
bridges, buildings, streets, cars, bicycles and trains. Yesterday the committee approved the \
budget; tomorrow the engineers start building. ";

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
}

struct Prompt {
    ids: Vec<u32>,
    tiles: Option<Tensor>,
}

fn build_prompt(
    model: &NemotronVl,
    tokenizer: &PromptTokenizer,
    template: &ChatTemplate,
    tiling: &TilingConfig,
    n_tokens: usize,
    with_image: bool,
) -> Prompt {
    let mut parts = vec![ContentPart::Text("@@".into())];
    if with_image {
        parts.insert(0, ContentPart::Image(Default::default()));
    }
    let rendered = template
        .render(&[
            ChatMessage {
                role: Role::System,
                parts: vec![ContentPart::Text("/no_think".into())],
            },
            ChatMessage {
                role: Role::User,
                parts,
            },
        ])
        .expect("template renders");
    let (head, tail) = rendered
        .split_once("@@")
        .expect("marker survives the template");
    let (head_ids, tiles) = if with_image {
        let s = model.tile_size() as u32;
        // A structured image exactly one tile in size.
        let image = RgbImage::from_fn(s, s, |x, y| {
            image::Rgb([
                (x * 255 / s) as u8,
                (y * 255 / s) as u8,
                ((x ^ y) & 0xff) as u8,
            ])
        });
        let tiles = tile_image(&image, tiling).expect("tiling");
        assert_eq!(tiles.num_tiles, 1);
        let ids = tokenizer
            .encode_with_images(head, &[model.tokens_per_tile()])
            .expect("encode");
        (
            ids,
            Some(tiles.to_tensor(&Device::Cpu, DType::F32).expect("tensor")),
        )
    } else {
        (tokenizer.encode(head).expect("encode"), None)
    };
    let tail_ids = tokenizer.encode(tail).expect("encode");
    let need = n_tokens
        .checked_sub(head_ids.len() + tail_ids.len())
        .expect("--prompt-tokens too small for this prompt");
    let mut filler = Vec::new();
    while filler.len() < need {
        filler.extend(tokenizer.encode(FILLER).expect("encode"));
    }
    filler.truncate(need);
    Prompt {
        ids: [head_ids, filler, tail_ids].concat(),
        tiles,
    }
}

/// (vision seconds, prefill seconds, decode seconds) for one run.
fn run_once(model: &NemotronVl, prompt: &Prompt, decode_tokens: usize) -> (f64, f64, f64) {
    let t0 = Instant::now();
    let images = prompt
        .tiles
        .as_ref()
        .map(|t| model.encode_images(t).expect("vision"));
    let t_vis = Instant::now();
    let embeds = model
        .embed_prompt(&prompt.ids, images.as_ref())
        .expect("embed");
    let pool = model.llm.new_pool(1).expect("state pool");
    let mut state = pool.acquire(None).expect("state").expect("a free slot");
    let logits = model
        .llm
        .forward(
            &embeds,
            &[prompt.ids.len()],
            &pool,
            &mut [&mut state],
            LogitsFor::LastToken,
        )
        .expect("prefill");
    let mut next = argmax(&logits);
    let t1 = Instant::now();
    for _ in 0..decode_tokens {
        let e = model
            .llm
            .embed(&Tensor::new(&[next], model.device()).expect("id"))
            .expect("embed");
        let logits = model
            .llm
            .forward(&e, &[1], &pool, &mut [&mut state], LogitsFor::LastToken)
            .expect("decode");
        next = argmax(&logits);
    }
    let t2 = Instant::now();
    (
        (t_vis - t0).as_secs_f64(),
        (t1 - t0).as_secs_f64(),
        (t2 - t1).as_secs_f64(),
    )
}

fn argmax(logits: &Tensor) -> u32 {
    logits
        .squeeze(0)
        .and_then(|l| l.argmax(0))
        .and_then(|i| i.to_scalar::<u32>())
        .expect("argmax")
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    vlm_server::memory::tune_allocator();
    let args = Args::parse();
    let model = NemotronVl::load(&args.model, DType::F32, &Device::Cpu).expect("model loads");
    let cfg = &model.config.model;
    let tokenizer = PromptTokenizer::load(
        &args.model,
        ImageTokens {
            context: cfg.img_context_token.clone(),
            start: cfg.img_start_token.clone(),
            end: cfg.img_end_token.clone(),
        },
        Some(cfg.img_context_token_id),
    )
    .expect("tokenizer");
    let template = ChatTemplate::load(&args.model).expect("template");
    let config_json: serde_json::Value =
        parse_json_lenient(&std::fs::read_to_string(args.model.join("config.json")).unwrap())
            .expect("config.json");
    let tiling = TilingConfig::from_config_json(&config_json, 12).expect("tiling config");
    let mut out = serde_json::Map::new();
    for (kind, with_image) in [("text", false), ("image", true)] {
        let prompt = build_prompt(
            &model,
            &tokenizer,
            &template,
            &tiling,
            args.prompt_tokens,
            with_image,
        );
        for _ in 0..args.warmup {
            run_once(&model, &prompt, args.decode_tokens.min(4));
        }
        let (mut vis, mut pre, mut dec) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.runs {
            let (v, p, d) = run_once(&model, &prompt, args.decode_tokens);
            vis.push(v);
            pre.push(p);
            dec.push(d);
        }
        let (v, p, d) = (median(vis), median(pre), median(dec));
        let mut result = serde_json::json!({
            "prompt_tokens": prompt.ids.len(),
            "prefill_s_median": p,
            "prefill_tokens_per_s": prompt.ids.len() as f64 / p,
            "decode_tokens": args.decode_tokens,
            "decode_s_median": d,
            "decode_tokens_per_s": args.decode_tokens as f64 / d,
        });
        if with_image {
            result["vision_s_median"] = v.into();
        }
        out.insert(kind.into(), result);
    }
    println!("{}", serde_json::Value::Object(out));
}
