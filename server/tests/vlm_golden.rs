//! The whole pipeline against the transformers reference (server/tests/golden):
//! chat template → image tiling → tokenization with image expansion → RADIO →
//! pixel shuffle → mlp1 → splicing → NemotronH prefill logits → greedy decode.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde_json::Value;
use vlm_server::engine::generate::{GenerateParams, StepControl, generate};
use vlm_server::engine::prepare::Preparer;
use vlm_server::engine::{ChatMessage, ChatRequest, ContentPart, Role, SamplingParams};
use vlm_server::model::config::parse_json_lenient;
use vlm_server::model::linear::CpuMatmul;
use vlm_server::model::nemotron_h::LogitsFor;
use vlm_server::model::vlm::NemotronVl;
use vlm_server::preprocess::{ImageLimits, TilingConfig};
use vlm_server::prompt::{ChatTemplate, ImageTokens, PromptTokenizer};

#[path = "support/device.rs"]
mod device;
use device::test_device;

/// Largest relative error of the logits with BF16 matmul inputs (measured: see the test).
const BF16_LOGITS_TOLERANCE: f32 = 5e-2;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn golden_dir() -> PathBuf {
    repo().join("server/tests/golden")
}

struct Fixture {
    golden: Value,
    tensors: std::collections::HashMap<String, Tensor>,
    model: NemotronVl,
    preparer: Preparer,
}

fn fixture() -> Fixture {
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir().join("golden.json")).expect("golden.json"),
    )
    .expect("golden.json parses");
    let tensors =
        candle_core::safetensors::load(golden_dir().join("tensors.safetensors"), &test_device())
            .expect("tensors.safetensors");
    let model_dir = repo().join(golden["model"].as_str().unwrap());
    let model = NemotronVl::load(&model_dir, DType::F32, &test_device()).expect("tiny model loads");
    let cfg = &model.config.model;
    let tokens = ImageTokens {
        context: cfg.img_context_token.clone(),
        start: cfg.img_start_token.clone(),
        end: cfg.img_end_token.clone(),
    };
    let tokenizer = PromptTokenizer::load(&model_dir, tokens, Some(cfg.img_context_token_id))
        .expect("tokenizer loads");
    let config_json: Value =
        parse_json_lenient(&std::fs::read_to_string(model_dir.join("config.json")).unwrap())
            .unwrap();
    let max_tiles = golden["max_num_tiles"].as_u64().unwrap() as usize;
    let preparer = Preparer {
        tokenizer: Arc::new(tokenizer),
        template: ChatTemplate::load(&model_dir).expect("template loads"),
        tiling: TilingConfig::from_config_json(&config_json, max_tiles).unwrap(),
        limits: ImageLimits::default(),
        tokens_per_tile: model.tokens_per_tile(),
        max_model_len: 4096,
    };
    Fixture {
        golden,
        tensors,
        model,
        preparer,
    }
}

/// OpenAI-style golden messages → engine messages, images read from `file:` URLs.
fn messages(case: &Value) -> Vec<ChatMessage> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role = match m["role"].as_str().unwrap() {
                "system" => Role::System,
                "user" => Role::User,
                "assistant" => Role::Assistant,
                other => panic!("role {other}"),
            };
            let parts = match &m["content"] {
                Value::String(s) => vec![ContentPart::Text(s.clone())],
                Value::Array(parts) => parts
                    .iter()
                    .map(|p| match p["type"].as_str().unwrap() {
                        "text" => ContentPart::Text(p["text"].as_str().unwrap().to_owned()),
                        "image_url" => {
                            let url = p["image_url"]["url"].as_str().unwrap();
                            let file = url.strip_prefix("file:").unwrap();
                            ContentPart::Image(Arc::new(
                                std::fs::read(golden_dir().join(file)).unwrap(),
                            ))
                        }
                        other => panic!("part {other}"),
                    })
                    .collect(),
                other => panic!("content {other}"),
            };
            ChatMessage { role, parts }
        })
        .collect()
}

fn max_rel_error(actual: &Tensor, expected: &Tensor) -> f32 {
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = expected
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Template, tokenization, vision and prefill of one golden case, each checked against
/// the reference where it is exact; returns the prompt embeddings and every position's
/// logits.
fn prefill_case(f: &Fixture, case: &Value) -> (Tensor, Tensor) {
    let name = case["name"].as_str().unwrap();
    let request = ChatRequest {
        messages: messages(case),
        sampling: SamplingParams::default(),
        max_tokens: 32,
        stop: Vec::new(),
        max_tiles: None,
        ignore_eos: false,
    };

    // Template and tokenization.
    let rendered = f.preparer.template.render(&request.messages).unwrap();
    assert_eq!(
        rendered,
        case["prompt_text"].as_str().unwrap(),
        "{name}: prompt text"
    );
    let prepared = f.preparer.prepare(&request).unwrap();
    assert_eq!(
        prepared.prompt_ids,
        ids(&case["input_ids"]),
        "{name}: input ids"
    );

    // Vision from our own tiles, spliced into the prompt.
    let image_embeds = if prepared.images.is_empty() {
        None
    } else {
        let tiles: Vec<Tensor> = prepared
            .images
            .iter()
            .map(|t| t.to_tensor(&test_device(), DType::F32).unwrap())
            .collect();
        Some(
            f.model
                .encode_images(&Tensor::cat(&tiles, 0).unwrap())
                .unwrap(),
        )
    };
    let embeds = f
        .model
        .embed_prompt(&prepared.prompt_ids, image_embeds.as_ref())
        .unwrap();

    // Prefill logits at every position.
    let pool = f.model.llm.new_pool(1).unwrap();
    let mut state = pool.acquire(None).unwrap().unwrap();
    let logits = f
        .model
        .llm
        .forward(
            &embeds,
            &[prepared.prompt_ids.len()],
            &pool,
            &mut [&mut state],
            LogitsFor::AllTokens,
        )
        .unwrap();
    (embeds, logits)
}

#[test]
fn every_case_matches_the_reference_end_to_end() {
    let f = fixture();
    for case in f.golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (embeds, logits) = prefill_case(&f, case);
        let expected = &f.tensors[case["logits_tensor"].as_str().unwrap()];
        let err = max_rel_error(&logits, expected);
        println!("{name}: prefill logits max relative error {err:.2e}");
        assert!(err <= 1e-4, "{name}: logits relative error {err}");

        // Greedy decode with the cache (the reference re-ran the full prompt each step).
        let params = GenerateParams {
            max_tokens: ids(&case["greedy_ids"]).len(),
            ignore_eos: true,
            ..GenerateParams::default()
        };
        let out = generate(&f.model.llm, &embeds, &params, |_, _| StepControl::Continue).unwrap();
        assert_eq!(out.tokens, ids(&case["greedy_ids"]), "{name}: greedy ids");
        let text = f.preparer.tokenizer.decode(&out.tokens).unwrap();
        assert_eq!(
            text,
            case["greedy_text"].as_str().unwrap(),
            "{name}: greedy text"
        );
    }
}

/// BF16 matmul inputs (the server's default on CPUs with AVX-512 BF16) stay within BF16
/// rounding of the f32 reference, vision included, and the greedy continuation keeps
/// the reference's first tokens.
#[test]
fn bf16_matmuls_stay_within_bf16_rounding_of_the_reference() {
    CpuMatmul::set_for_thread(CpuMatmul::Bf16);
    let f = fixture();
    for case in f.golden["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let (embeds, logits) = prefill_case(&f, case);
        let expected = &f.tensors[case["logits_tensor"].as_str().unwrap()];
        let err = max_rel_error(&logits, expected);
        println!("{name}: BF16 matmuls, prefill logits max relative error {err:.2e}");
        assert!(
            err <= BF16_LOGITS_TOLERANCE,
            "{name}: logits relative error {err}"
        );
        // On CUDA the mode does not apply; on CPU the rounding must show.
        if test_device().is_cpu() {
            assert!(err > 1e-4, "{name}: BF16 mode matched f32 ({err:.2e})");
        }
        let params = GenerateParams {
            max_tokens: 4,
            ignore_eos: true,
            ..GenerateParams::default()
        };
        let out = generate(&f.model.llm, &embeds, &params, |_, _| StepControl::Continue).unwrap();
        let want = ids(&case["greedy_ids"]);
        assert_eq!(out.tokens[..], want[..4], "{name}: first greedy ids");
    }
}
