#!/usr/bin/env python3
"""Build a small random NemotronH_Nano_VL_V2 checkpoint in the real Hugging Face layout.

    python scripts/make_checkpoint.py --preset tiny --out server/assets/tiny [--seed 0]
    python scripts/make_checkpoint.py --preset mid  --out target/mid-checkpoint

Writes config.json, generation_config.json, preprocessor_config.json, tokenizer.json,
tokenizer_config.json (with the chat template), model.safetensors.index.json and two
safetensors shards. The weights are random; only the layout, names, dtypes and shapes
follow nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16 (docs/spec model.md §8).

What is known about the real files and what is assumed here
(sources: the public code index — SGLang's copy of the HF repo's configuration.py at
commit cb5a65ff, the HF repo's image_processing.py / processing.py copies, vLLM
nano_nemotron_vl.py; none of the real JSON files were readable):
  * config.json top level: `llm_config` (nemotron_h), `vision_config` (RADIO remote
    code: `args` dict with the timm `model` name, `register_multiple`, ...; plus
    `patch_size`, `max_resolution`, `preferred_resolution`, `version`), `force_image_size`,
    `patch_size`, `downsample_ratio`, `template`, `ps_version`, `image_tag_type`,
    `projector_hidden_size`, `vit_hidden_size`, `img_context_token(_id)`,
    `img_start_token`, `img_end_token`, `video_context_token`, `norm_mean`, `norm_std`,
    `use_thumbnail`, `video_pruning_rate`. These names are [V] (read by the config class).
  * `max_num_tiles` is NOT a config.json field: it is an argument of the image processor
    (`NemotronNanoVLV2ImageProcessor(image_size=512, max_num_tiles=12, use_thumbnail=True,
    ...)`), so it lives in preprocessor_config.json. We write it there (12).
  * The exact `auto_map` strings, the `vision_config.args` contents beyond `model` and
    `register_multiple`, and the presence of `num_attention_heads` in vision_config are
    assumptions. The tiny ViT has no timm name, so vision_config carries an explicit
    `num_attention_heads` (model.md §11.2).
  * dtypes: everything bfloat16 except A_log / D / dt_bias (float32; the real dtype is
    unknown) and the int64 `summary_idxs` buffer.
"""

import argparse
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# OpenAI-CLIP statistics (RADIO defaults; expected for the real config, model.md §3).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

PRESETS = {
    # Every layer type, more than one of each; chunk 16 so test prompts span several SSD chunks.
    "tiny": dict(
        hidden=64, pattern="M-M*-M-M*-", heads=4, kv_heads=2, head_dim=16, intermediate=128,
        mamba_heads=8, mamba_head_dim=8, state=16, groups=2, conv_kernel=4, chunk=16,
        vit_hidden=32, vit_layers=2, vit_heads=2, vit_mlp=128, patch=16, prefix=8,
        tile=64, pos_grid=8, proj_hidden=256, bpe_vocab=1000,
    ),
    # ~100M parameters with realistic tile geometry (512 px tile -> 1024 patches -> 256 tokens).
    "mid": dict(
        hidden=768, pattern="M-M*-M-M*-M-", heads=12, kv_heads=4, head_dim=64, intermediate=3072,
        mamba_heads=24, mamba_head_dim=64, state=64, groups=4, conv_kernel=4, chunk=128,
        vit_hidden=768, vit_layers=4, vit_heads=12, vit_mlp=3072, patch=16, prefix=8,
        tile=512, pos_grid=128, proj_hidden=3072, bpe_vocab=1000,
    ),
}

# ---------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------

# Ids 0..31 mirror the Nemotron-H control-token block: <unk>, <s>, </s>, <SPECIAL_3>..31,
# so <SPECIAL_10/11/12> get ids 10/11/12 as in the real model.
CONTROL_TOKENS = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, 32)]
THINK_TOKENS = ["<think>", "</think>"]
# Appended at the very end of the vocabulary, like the real model's new image tokens.
IMAGE_TOKENS = ["<img>", "</img>", "<image>"]

_CORPUS_SEED = """\
The quick brown fox jumps over the lazy dog. A picture is worth a thousand words.
Caption the content of this image: a red square, a blue circle and a green triangle on a
white background. Describe the chart, read the table, and summarize the document.
The model reads images in tiles of equal size and writes a short answer in plain English.
System User Assistant. Think step by step before you answer the question.
What is in this picture? Compare these two images and list the differences.
Invoices, receipts, forms, slides, screenshots, charts, diagrams and photographs are
common inputs. The text may contain numbers such as 12, 256, 512, 1024 and 2048.
Please extract every value from the table and return it as JSON with keys and values.
Weather report: sunny in the morning, cloudy in the afternoon, light rain at night.
Mountains, rivers, forests, bridges, buildings, streets, cars, bicycles and trains.
Kitchen recipe: mix flour, sugar, butter and eggs; bake for twenty minutes at high heat.
History, science, mathematics, geography, literature, music, painting and sculpture.
Yesterday the committee approved the budget; tomorrow the engineers start building.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April.
Orange, yellow, purple, black, brown, silver, golden, pink, gray and transparent objects.
"""


def _corpus():
    """Deterministic training text: a seed paragraph plus templated sentences."""
    subjects = ["the image", "this chart", "the document", "a photo", "the table", "the slide",
                "a diagram", "the screenshot", "the receipt", "the form"]
    verbs = ["shows", "contains", "describes", "lists", "compares", "highlights", "includes"]
    objects = ["three colored shapes", "a rising line", "the total amount", "two columns of numbers",
               "a person walking a dog", "the quarterly revenue", "a map of the city",
               "several handwritten notes", "a bar chart with labels", "a title and a footer"]
    lines = [_CORPUS_SEED] * 4
    for i, s in enumerate(subjects):
        for j, v in enumerate(verbs):
            o = objects[(i * 7 + j * 3) % len(objects)]
            lines.append(f"{s.capitalize()} {v} {o}. Question {i * 10 + j}: what does {s} {v[:-1]}?")
    return lines


def build_tokenizer(bpe_vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab,
        special_tokens=CONTROL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # <think>/</think> are ordinary added tokens (kept when decoding with skip_special_tokens).
    tok.add_tokens(THINK_TOKENS)
    tok.add_special_tokens(IMAGE_TOKENS)
    for i, t in enumerate(CONTROL_TOKENS):
        assert tok.token_to_id(t) == i, t
    return tok


# Chat template, model.md §6.1 + §11.1. Only plain Jinja features so that minijinja
# (+ minijinja-contrib pycompat) renders it identically on the Rust side.
# - reasoning is on unless "/no_think" appears in a system/user message; "/think" turns it back
#   on; the last message carrying a flag wins (within one message, /no_think wins);
# - the flags are removed from the text; content may be a string or a list of parts, where
#   image parts become "<image>\n" and text parts contribute their text;
# - a system block is always emitted (empty when there is no system message);
# - history assistant turns keep only the text after </think>.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(reasoning=true) -%}"
    "{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}"
    "{{- '<SPECIAL_10>System\\n\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set c = namespace(text='') -%}"
    "{%- if message['content'] is string -%}"
    "{%- set c.text = message['content'] -%}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}"
    "{%- set c.text = c.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}"
    "{%- set c.text = c.text + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' or message['role'] == 'user' -%}"
    "{%- if '/think' in c.text -%}{%- set ns.reasoning = true -%}{%- endif -%}"
    "{%- if '/no_think' in c.text -%}{%- set ns.reasoning = false -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- set clean = c.text.replace('/no_think', '').replace('/think', '').strip() -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- '<SPECIAL_10>System\\n' + clean + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}"
    "{{- '<SPECIAL_11>User\\n' + clean + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<SPECIAL_11>Assistant\\n' + (c.text.split('</think>')|last).strip() + '\\n<SPECIAL_12>\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<SPECIAL_11>User\\n<TOOL_RESPONSE>[' + c.text.strip() + ']</TOOL_RESPONSE>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<SPECIAL_11>Assistant\\n' -}}"
    "{%- if ns.reasoning -%}{{- '<think>\\n' -}}{%- else -%}{{- '<think></think>' -}}{%- endif -%}"
    "{%- endif -%}"
)


def tokenizer_config(tok: Tokenizer) -> dict:
    added = {}
    for tid, t in sorted(tok.get_added_tokens_decoder().items()):
        added[str(tid)] = {
            "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
            "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
        }
    return {
        "added_tokens_decoder": added,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<SPECIAL_12>",
        "unk_token": "<unk>",
        "pad_token": "<SPECIAL_12>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "chat_template": CHAT_TEMPLATE,
    }


# ---------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------


def make_config(p: dict, vocab_rows: int, tok: Tokenizer) -> dict:
    img_ctx_id = tok.token_to_id("<image>")
    llm = {
        "architectures": ["NemotronHForCausalLM"],
        "model_type": "nemotron_h",
        "vocab_size": vocab_rows,
        "hidden_size": p["hidden"],
        "num_hidden_layers": len(p["pattern"]),
        "hybrid_override_pattern": p["pattern"],
        "num_attention_heads": p["heads"],
        "num_key_value_heads": p["kv_heads"],
        "head_dim": p["head_dim"],
        "attention_head_dim": p["head_dim"],
        "intermediate_size": p["intermediate"],
        "mlp_hidden_act": "relu2",
        "mamba_num_heads": p["mamba_heads"],
        "mamba_head_dim": p["mamba_head_dim"],
        "ssm_state_size": p["state"],
        "n_groups": p["groups"],
        "conv_kernel": p["conv_kernel"],
        "expand": 2,
        "chunk_size": p["chunk"],
        "mamba_hidden_act": "silu",
        "use_conv_bias": True,
        "use_bias": False,
        "mlp_bias": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "layer_norm_epsilon": 1e-5,
        # json.dump writes float("inf") as the bare token Infinity (the Rust loader must accept it).
        "time_step_limit": [0.0, float("inf")],
        "time_step_min": 0.001,
        "time_step_max": 0.1,
        "time_step_floor": 1e-4,
        "mamba_ssm_cache_dtype": "float32",
        "bos_token_id": 1,
        "eos_token_id": 12,
        "pad_token_id": 0,
        "tie_word_embeddings": False,
        "residual_in_fp32": False,
        "rescale_prenorm_residual": True,
        "initializer_range": 0.02,
        "max_position_embeddings": 131072,
        "num_logits_to_keep": 1,
        "use_cache": True,
        "sliding_window": None,
        "torch_dtype": "bfloat16",
    }
    vision = {
        "model_type": "radio",
        "architectures": ["RADIOModel"],
        "auto_map": {
            "AutoConfig": "radio_model.RADIOConfig",
            "AutoModel": "radio_model.RADIOModel",
        },
        "args": {
            # The tiny/mid ViTs have no timm name; the real one is "vit_huge_patch16_224".
            "model": f"vit_custom_d{p['vit_hidden']}_l{p['vit_layers']}_h{p['vit_heads']}_patch{p['patch']}",
            "register_multiple": p["prefix"],
            "cpe_max_size": p["pos_grid"] * p["patch"],
            "cls_token_per_teacher": True,
            "teachers": [{"name": "teacher0"}],
            "input_size": p["tile"],
        },
        "num_attention_heads": p["vit_heads"],
        "hidden_size": p["vit_hidden"],
        "num_hidden_layers": p["vit_layers"],
        "intermediate_size": p["vit_mlp"],
        "num_prefix_tokens": p["prefix"],
        "layer_norm_eps": 1e-6,
        "hidden_act": "gelu",
        "patch_size": p["patch"],
        "max_resolution": p["pos_grid"] * p["patch"],
        "preferred_resolution": [p["tile"], p["tile"]],
        "version": "radio_v2.5-h",
        "adaptor_names": None,
        "vitdet_window_size": None,
        "torch_dtype": "bfloat16",
    }
    return {
        "architectures": ["NemotronH_Nano_VL_V2"],
        "model_type": "NemotronH_Nano_VL_V2",
        "auto_map": {
            "AutoConfig": "configuration.NemotronH_Nano_VL_V2_Config",
            "AutoModel": "modeling.NemotronH_Nano_VL_V2",
            "AutoModelForCausalLM": "modeling.NemotronH_Nano_VL_V2",
        },
        "llm_config": llm,
        "vision_config": vision,
        "force_image_size": p["tile"],
        "patch_size": p["patch"],
        "downsample_ratio": 0.5,
        "ps_version": "v2",
        "image_tag_type": "internvl",
        "template": "nemotron5-reasoning",
        "projector_hidden_size": p["proj_hidden"],
        "vit_hidden_size": p["vit_hidden"],
        "img_context_token": "<image>",
        "img_context_token_id": img_ctx_id,
        "img_start_token": "<img>",
        "img_end_token": "</img>",
        "video_context_token": "<video>",
        "video_pruning_rate": 0.0,
        "norm_mean": CLIP_MEAN,
        "norm_std": CLIP_STD,
        "use_thumbnail": True,
        "attn_implementation": "eager",
        "torch_dtype": "bfloat16",
        "transformers_version": "4.53.1",
    }


def preprocessor_config(p: dict) -> dict:
    return {
        "image_processor_type": "NemotronNanoVLV2ImageProcessor",
        "processor_class": "NemotronNanoVLV2Processor",
        "auto_map": {
            "AutoImageProcessor": "image_processing.NemotronNanoVLV2ImageProcessor",
            "AutoProcessor": "processing.NemotronNanoVLV2Processor",
        },
        "image_size": p["tile"],
        "patch_size": p["patch"],
        "downsample_ratio": 0.5,
        "max_num_tiles": 12,
        "use_thumbnail": True,
        "norm_mean": CLIP_MEAN,
        "norm_std": CLIP_STD,
        "do_rescale": True,
    }


# ---------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------


def make_weights(p: dict, vocab_rows: int, tokenizer_size: int, g: torch.Generator) -> dict:
    """Random weights scaled so that activations stay O(1) and greedy output varies."""

    def normal(*shape, std):
        return torch.randn(*shape, generator=g) * std

    def near_one(n, noise=0.1):
        return 1.0 + normal(n, std=noise)

    def linear(out_f, in_f, gain=1.0):
        return normal(out_f, in_f, std=gain / math.sqrt(in_f))

    w = {}
    H = p["hidden"]
    lm = "language_model.backbone."
    w[lm + "embeddings.weight"] = normal(vocab_rows, H, std=1.0)
    d_inner = p["mamba_heads"] * p["mamba_head_dim"]
    conv_dim = d_inner + 2 * p["groups"] * p["state"]
    for i, kind in enumerate(p["pattern"]):
        pre = f"{lm}layers.{i}."
        w[pre + "norm.weight"] = near_one(H)
        mx = pre + "mixer."
        if kind == "M":
            nh = p["mamba_heads"]
            w[mx + "in_proj.weight"] = linear(d_inner + conv_dim + nh, H)
            w[mx + "conv1d.weight"] = normal(conv_dim, 1, p["conv_kernel"], std=0.5)
            w[mx + "conv1d.bias"] = normal(conv_dim, std=0.1)
            # A in [1, 16] as in Mamba2 init; dt in [1e-3, 0.1] log-uniform, stored as softplus^-1.
            w[mx + "A_log"] = torch.log(1.0 + 15.0 * torch.rand(nh, generator=g))
            dt = torch.exp(torch.rand(nh, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            w[mx + "dt_bias"] = dt + torch.log(-torch.expm1(-dt))
            w[mx + "D"] = near_one(nh)
            w[mx + "norm.weight"] = near_one(d_inner)
            w[mx + "out_proj.weight"] = linear(H, d_inner, gain=0.7)
        elif kind == "*":
            hd = p["head_dim"]
            w[mx + "q_proj.weight"] = linear(p["heads"] * hd, H, gain=2.0)
            w[mx + "k_proj.weight"] = linear(p["kv_heads"] * hd, H, gain=2.0)
            w[mx + "v_proj.weight"] = linear(p["kv_heads"] * hd, H)
            w[mx + "o_proj.weight"] = linear(H, p["heads"] * hd, gain=0.7)
        elif kind == "-":
            w[mx + "up_proj.weight"] = linear(p["intermediate"], H)
            w[mx + "down_proj.weight"] = linear(H, p["intermediate"], gain=0.5)
        else:
            raise ValueError(kind)
    w[lm + "norm_f.weight"] = near_one(H)
    lm_head = linear(vocab_rows, H, gain=3.0)
    # Rows past the tokenizer (padding ids) get tiny weights so greedy never picks an id
    # that has no token; they stay present so the shapes differ from the tokenizer size.
    lm_head[tokenizer_size:] *= 0.01
    w["language_model.lm_head.weight"] = lm_head

    # RADIO ViT (timm-style names under vision_model.radio_model.model.)
    D, ps, G = p["vit_hidden"], p["patch"], p["pos_grid"]
    vm = "vision_model.radio_model.model."
    w[vm + "patch_generator.embedder.weight"] = linear(D, 3 * ps * ps)
    w[vm + "patch_generator.pos_embed"] = _smooth_pos_embed(G, D, g)
    w[vm + "patch_generator.cls_token.token"] = normal(p["prefix"], D, std=0.5)
    for k in range(p["vit_layers"]):
        b = f"{vm}blocks.{k}."
        for n in ("norm1", "norm2"):
            w[b + n + ".weight"] = near_one(D)
            w[b + n + ".bias"] = normal(D, std=0.05)
        w[b + "attn.qkv.weight"] = linear(3 * D, D, gain=1.5)
        w[b + "attn.qkv.bias"] = normal(3 * D, std=0.05)
        w[b + "attn.proj.weight"] = linear(D, D, gain=0.7)
        w[b + "attn.proj.bias"] = normal(D, std=0.05)
        w[b + "mlp.fc1.weight"] = linear(p["vit_mlp"], D)
        w[b + "mlp.fc1.bias"] = normal(p["vit_mlp"], std=0.05)
        w[b + "mlp.fc2.weight"] = linear(D, p["vit_mlp"], gain=0.7)
        w[b + "mlp.fc2.bias"] = normal(D, std=0.05)
    # Buffers present in the real file (ignored by inference).
    rm = "vision_model.radio_model."
    w[rm + "input_conditioner.norm_mean"] = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    w[rm + "input_conditioner.norm_std"] = torch.tensor(CLIP_STD).view(3, 1, 1)
    w[rm + "summary_idxs"] = torch.tensor([0, 1, 2], dtype=torch.int64)

    # Projector: RMSNorm(4*D) -> Linear -> relu^2 -> Linear(-> LLM hidden)
    w["mlp1.0.weight"] = near_one(4 * D)
    w["mlp1.1.weight"] = linear(p["proj_hidden"], 4 * D)
    w["mlp1.3.weight"] = linear(H, p["proj_hidden"], gain=0.8)

    keep_f32 = ("A_log", "D", "dt_bias")
    out = {}
    for name, t in w.items():
        if t.dtype == torch.int64 or name.rsplit(".", 1)[-1] in keep_f32:
            out[name] = t.contiguous()
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    return out


def _smooth_pos_embed(grid: int, dim: int, g: torch.Generator) -> torch.Tensor:
    """Position table with spatial structure (low-frequency + noise), so the CPE
    bilinear resampling produces values that differ visibly from a nearest pick."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, grid), torch.linspace(0, 1, grid), indexing="ij")
    freq = torch.rand(dim, 2, generator=g) * 6.0
    phase = torch.rand(dim, generator=g) * 6.283
    smooth = torch.sin(freq[:, 0, None, None] * yy * 3.14 + freq[:, 1, None, None] * xx * 3.14 + phase[:, None, None])
    table = 0.5 * smooth + 0.1 * torch.randn(dim, grid, grid, generator=g)
    return table.permute(1, 2, 0).reshape(1, grid * grid, dim)


def save_sharded(weights: dict, out: Path):
    """Two shards (LLM first half / rest) plus the HF index, in sorted name order."""
    names = sorted(weights)
    sizes = {n: weights[n].numel() * weights[n].element_size() for n in names}
    total = sum(sizes.values())
    shard1, acc = [], 0
    for n in names:
        if acc >= total / 2:
            break
        shard1.append(n)
        acc += sizes[n]
    shards = [shard1, [n for n in names if n not in set(shard1)]]
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: weights[n] for n in shard}, str(out / fname), metadata={"format": "pt"})
        for n in shard:
            weight_map[n] = fname
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", choices=sorted(PRESETS), required=True)
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    p = PRESETS[args.preset]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    tok = build_tokenizer(p["bpe_vocab"])
    # Embedding rows > tokenizer size (rounded up to 64): code must not assume equality.
    vocab_rows = (tok.get_vocab_size() + 8 + 63) // 64 * 64

    tok.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(tok))
    _write_json(out / "config.json", make_config(p, vocab_rows, tok))
    _write_json(out / "preprocessor_config.json", preprocessor_config(p))
    _write_json(out / "generation_config.json", {
        "_from_model_config": True,
        "bos_token_id": 1,
        "eos_token_id": [2, 12],
        "pad_token_id": 0,
        "transformers_version": "4.53.1",
    })

    g = torch.Generator().manual_seed(args.seed)
    weights = make_weights(p, vocab_rows, tok.get_vocab_size(), g)
    save_sharded(weights, out)
    n_params = sum(t.numel() for t in weights.values())
    print(json.dumps({"preset": args.preset, "out": os.fspath(out), "params": n_params,
                      "tokenizer_size": tok.get_vocab_size(), "vocab_rows": vocab_rows}))


def _write_json(path: Path, obj):
    # allow_nan: Python writes Infinity for time_step_limit, as the real HF config would.
    path.write_text(json.dumps(obj, indent=2, allow_nan=True) + "\n")


if __name__ == "__main__":
    main()
