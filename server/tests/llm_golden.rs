//! Golden test of the NemotronH LLM (prefill logits, Mamba states after prefill, greedy
//! decode with the cached path) against the Python reference on the tiny checkpoint.
//!
//! Fixtures: `assets/tiny/` and `tests/golden/golden.json` (`cases[]` with `name`,
//! `input_ids` (image-expanded), `greedy_ids`, `image_files`) + `tests/golden/tensors.safetensors`
//! (f32 `logits.<case>` [seq, vocab], `mamba_state.<case>.layer<i>` [H, P, N],
//! `conv_state.<case>.layer<i>` [conv_dim, K−1], `projector.<image>` [tiles, tokens, hidden]).
//! Image cases use the golden projector outputs as image embeddings, so only the LLM is
//! under test here.
//!
//! Relative error := max|ours − golden| / max|golden| over the whole tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::Value;
use vlm_server::engine::FinishReason;
use vlm_server::engine::generate::{GenerateParams, StepControl, generate, generate_from_ids};
use vlm_server::model::checkpoint::Checkpoint;
use vlm_server::model::config::CheckpointConfig;
use vlm_server::model::nemotron_h::{LogitsFor, NemotronH};

#[path = "support/device.rs"]
mod device;
use device::test_device;

const MAX_REL_LOGITS: f32 = 1e-4;
const MAX_REL_STATE: f32 = 1e-4;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rel_err(ours: &Tensor, golden: &Tensor) -> f32 {
    assert_eq!(ours.dims(), golden.dims(), "shape mismatch");
    let diff = (ours - golden)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap();
    let scale = golden.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap().max(f32::MIN_POSITIVE)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("id list")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

/// Prompt embeddings: text embeddings with the rows at `<image>` positions replaced, in order,
/// by the golden projector outputs of the case's images (`projector.<stem>` [tiles, tokens, hidden]).
fn prompt_embeds(
    model: &NemotronH,
    input_ids: &[u32],
    image_files: &[Value],
    context_id: u32,
    tensors: &HashMap<String, Tensor>,
) -> Tensor {
    let text = model
        .embed(&Tensor::new(input_ids, &test_device()).unwrap())
        .unwrap();
    if image_files.is_empty() {
        return text;
    }
    let hidden = text.dim(1).unwrap();
    let images: Vec<Tensor> = image_files
        .iter()
        .map(|f| {
            let stem = Path::new(f.as_str().expect("image file"))
                .file_stem()
                .and_then(|s| s.to_str())
                .expect("image stem");
            tensors[&format!("projector.{stem}")]
                .reshape(((), hidden))
                .unwrap()
        })
        .collect();
    let images = Tensor::cat(&images, 0).unwrap();
    let n_text = input_ids.len();
    let mut next_image = 0;
    let idx: Vec<u32> = input_ids
        .iter()
        .enumerate()
        .map(|(t, &id)| {
            if id == context_id {
                next_image += 1;
                (n_text + next_image - 1) as u32
            } else {
                t as u32
            }
        })
        .collect();
    assert_eq!(
        next_image,
        images.dim(0).unwrap(),
        "<image> count != image rows"
    );
    Tensor::cat(&[text, images], 0)
        .unwrap()
        .index_select(&Tensor::new(idx.as_slice(), &test_device()).unwrap(), 0)
        .unwrap()
}

/// All cases, the image ones with the golden projector outputs spliced in (so this checks
/// the LLM alone; the vision path has its own golden test).
#[test]
fn llm_matches_reference_on_all_cases() {
    let golden_dir = dir().join("tests/golden");
    let golden: Value = serde_json::from_str(
        &std::fs::read_to_string(golden_dir.join("golden.json")).expect("tests/golden/golden.json"),
    )
    .expect("golden.json is JSON");
    let tensors =
        candle_core::safetensors::load(golden_dir.join("tensors.safetensors"), &test_device())
            .expect("tests/golden/tensors.safetensors");

    let model_dir = dir().join("assets/tiny");
    let cfg = CheckpointConfig::load(&model_dir).expect("tiny config");
    let ckpt = Checkpoint::open(&model_dir).expect("tiny checkpoint");
    let model =
        NemotronH::load(&ckpt, &cfg.model.llm_config, DType::F32, &test_device()).expect("load");
    let context_id = cfg.model.img_context_token_id;

    let mut checked = 0;
    for case in golden["cases"].as_array().expect("cases") {
        let name = case["name"].as_str().expect("case name");
        let input_ids = ids(&case["input_ids"]);
        let greedy = ids(&case["greedy_ids"]);
        let no_images = Vec::new();
        let image_files = case["image_files"].as_array().unwrap_or(&no_images);
        let embeds = prompt_embeds(&model, &input_ids, image_files, context_id, &tensors);

        // Prefill: full logits and the per-layer Mamba states.
        let pool = model.new_pool(1).unwrap();
        let mut state = pool.acquire(None).unwrap().unwrap();
        let logits = model
            .forward(
                &embeds,
                &[input_ids.len()],
                &pool,
                &mut [&mut state],
                LogitsFor::AllTokens,
            )
            .unwrap();
        if let Some(want) = tensors.get(&format!("logits.{name}")) {
            let e = rel_err(&logits, want);
            println!(
                "{name}: prefill logits [{}, {}] max rel err {e:.3e}",
                want.dim(0).unwrap(),
                want.dim(1).unwrap()
            );
            assert!(e <= MAX_REL_LOGITS, "{name}: logits rel err {e:.3e}");
        } else {
            let want = &tensors[&format!("logits_tail.{name}")];
            let (l, n) = (logits.dim(0).unwrap(), want.dim(0).unwrap());
            let e = rel_err(&logits.narrow(0, l - n, n).unwrap(), want);
            println!("{name}: prefill logits tail max rel err {e:.3e}");
            assert!(e <= MAX_REL_LOGITS, "{name}: logits tail rel err {e:.3e}");
        }
        let mut worst_state: f32 = 0.0;
        for i in 0..cfg.model.llm_config.layers.len() {
            let Some(ms) = pool.mamba_state(i, &state).unwrap() else {
                continue;
            };
            if let Some(want) = tensors.get(&format!("mamba_state.{name}.layer{i}")) {
                worst_state = worst_state.max(rel_err(&ms.ssm, want));
            }
            if let Some(want) = tensors.get(&format!("conv_state.{name}.layer{i}")) {
                worst_state = worst_state.max(rel_err(&ms.conv_channels_major().unwrap(), want));
            }
        }
        println!("{name}: mamba ssm/conv states max rel err {worst_state:.3e}");
        assert!(
            worst_state <= MAX_REL_STATE,
            "{name}: state rel err {worst_state:.3e}"
        );

        // Greedy, prefill + cached decode, EOS ignored.
        let params = GenerateParams {
            max_tokens: greedy.len(),
            ignore_eos: true,
            eos_token_ids: cfg.eos_token_ids.clone(),
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let out = generate(&model, &embeds, &params, |id, _| {
            streamed.push(id);
            StepControl::Continue
        })
        .unwrap();
        assert_eq!(out.tokens, greedy, "{name}: greedy tokens differ");
        assert_eq!(streamed, greedy);
        assert_eq!(out.finish_reason, FinishReason::Length);
        assert_eq!(out.prompt_tokens, input_ids.len());
        assert_eq!(out.completion_tokens, greedy.len());
        if image_files.is_empty() {
            // The token-id convenience gives the same tokens.
            let out2 = generate_from_ids(&model, &input_ids, &params, |_, _| StepControl::Continue)
                .unwrap();
            assert_eq!(out2.tokens, greedy);
        }
        println!("{name}: {} greedy tokens identical", greedy.len());
        checked += 1;
    }
    assert!(checked > 0, "no case in golden.json");
}

#[test]
fn generation_stops_on_eos_and_cancel() {
    let model_dir = dir().join("assets/tiny");
    let cfg = CheckpointConfig::load(&model_dir).unwrap();
    let model = NemotronH::load(
        &Checkpoint::open(&model_dir).unwrap(),
        &cfg.model.llm_config,
        DType::F32,
        &test_device(),
    )
    .unwrap();
    let prompt = [10u32, 11, 500, 600, 700];
    // Find the greedy continuation, then declare its 3rd token an EOS id.
    let base = GenerateParams {
        max_tokens: 6,
        ..Default::default()
    };
    let all = generate_from_ids(&model, &prompt, &base, |_, _| StepControl::Continue).unwrap();
    assert_eq!(all.tokens.len(), 6);
    let eos = all.tokens[2];
    let first = all.tokens.iter().position(|&t| t == eos).unwrap();
    let params = GenerateParams {
        eos_token_ids: vec![eos],
        ..base.clone()
    };
    let out = generate_from_ids(&model, &prompt, &params, |_, _| StepControl::Continue).unwrap();
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.tokens, all.tokens[..=first]);
    // Cancel after two tokens.
    let out = generate_from_ids(&model, &prompt, &base, |_, i| {
        if i == 1 {
            StepControl::Cancel
        } else {
            StepControl::Continue
        }
    })
    .unwrap();
    assert!(out.cancelled);
    assert_eq!(out.tokens.len(), 2);
    // Seeded sampling is reproducible.
    let sampled = GenerateParams {
        sampling: vlm_server::engine::SamplingParams {
            temperature: 1.0,
            top_p: 0.9,
            top_k: 50,
            seed: Some(42),
        },
        ..base
    };
    let a = generate_from_ids(&model, &prompt, &sampled, |_, _| StepControl::Continue).unwrap();
    let b = generate_from_ids(&model, &prompt, &sampled, |_, _| StepControl::Continue).unwrap();
    assert_eq!(a.tokens, b.tokens);
}
