#!/usr/bin/env python3
"""Write golden fixtures for the Rust port from the independent float32 reference.

    python scripts/make_golden.py --model server/assets/tiny --out server/tests/golden

Produces, under --out:
  images/            test images (PNG, one JPEG, one WebP; RGBA and grayscale included)
  golden.json        images (grid, tile count), prompt cases (messages, rendered prompt,
                     expanded input_ids, 32 greedy ids + text), tolerances
  tensors.safetensors  float32: tiles.<stem>, vision.<stem>, projector.<stem>,
                     logits.<case>, mamba_state.<case>.layer<i>, conv_state.<case>.layer<i>

Greedy ids are computed without any cache (full forward on the growing sequence each
step) and ignore EOS. See nemotron_ref.py for what the reference is.
All paths written into files are relative (the model path relative to the repo root,
image paths relative to golden.json).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nemotron_ref import Reference, mamba_recurrent, vit_direct  # noqa: E402

GREEDY_STEPS = 32
REPO_ROOT = Path(__file__).resolve().parent.parent

# (file name, width, height, mode). Sizes chosen for a 64 px tile: 1 tile, 2x2+thumb, 2x1,
# 1x3, 4x3 (=12, the max) + thumb, an upscaled small image, tie-break cases, RGBA, grayscale.
IMAGES = [
    ("grad_64x64.png", 64, 64, "RGB"),
    ("shapes_128x128.png", 128, 128, "RGB"),
    ("wide_200x100.png", 200, 100, "RGB"),
    ("tall_60x180.png", 60, 180, "RGB"),
    ("grid_128x96.png", 128, 96, "RGB"),
    ("small_40x40.png", 40, 40, "RGB"),
    ("alpha_96x64.png", 96, 64, "RGBA"),
    ("gray_100x50.png", 100, 50, "L"),
    ("photo_120x72.jpg", 120, 72, "RGB"),
    ("web_70x140.webp", 70, 140, "RGB"),
]


def draw_image(name, w, h, mode, seed):
    """Structured content (gradients, shapes, stripes, a little noise) so that resize
    kernels that differ show up in the tile tensors."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 255 * xx / max(w - 1, 1)
    g = 255 * yy / max(h - 1, 1)
    b = 127.5 + 127.5 * np.sin(xx / 3.0 + yy / 5.0)
    arr = np.stack([r, g, b], -1)
    arr += rng.normal(0, 6, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    d.rectangle([w // 8, h // 8, w // 2, h // 2], fill=(220, 30, 40), outline=(0, 0, 0))
    d.ellipse([w // 2, h // 3, w - 2, h - 2], fill=(20, 40, 200))
    d.line([0, h - 1, w - 1, 0], fill=(255, 255, 255), width=2)
    for x in range(0, w, 7):  # high-frequency stripes exercise the antialias filter
        d.line([x, 0, x, h // 6], fill=(0, 0, 0))
    if mode == "RGBA":
        alpha = (255 * (0.25 + 0.75 * xx / max(w - 1, 1))).astype(np.uint8)
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(alpha, "L"))
    elif mode == "L":
        img = img.convert("L")
    return img


def write_images(out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    for k, (name, w, h, mode) in enumerate(IMAGES):
        img = draw_image(name, w, h, mode, seed=1000 + k)
        path = out_dir / name
        if name.endswith(".jpg"):
            img.save(path, quality=90)
        elif name.endswith(".webp"):
            img.save(path, lossless=True)
        else:
            img.save(path, optimize=False)


def img(name):
    return {"type": "image_url", "image_url": {"url": f"file:images/{name}"}}


CASES = [
    {
        "name": "text",
        "messages": [{"role": "user", "content": (
            "Describe the chart, read the table, and summarize the document. The quick brown fox "
            "jumps over the lazy dog while the committee approved the budget on Monday, and the "
            "engineers start building the bridges tomorrow morning in light rain."
        )}],
    },
    {
        # nv-ingest caption request shape
        "name": "one_image",
        "messages": [
            {"role": "system", "content": "/no_think"},
            {"role": "user", "content": [{"type": "text", "text": "Caption the content of this image:"},
                                          img("grid_128x96.png")]},
        ],
    },
    {
        "name": "two_images",
        "messages": [
            {"role": "user", "content": [img("wide_200x100.png"), img("tall_60x180.png"),
                                          {"type": "text", "text": "Compare these two images."}]},
        ],
    },
    {
        # /no_think in system, /think in the user turn: the last flag wins -> reasoning on
        "name": "think",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant. /no_think"},
            {"role": "user", "content": [img("shapes_128x128.png"),
                                          {"type": "text", "text": "What is in this picture? /think"}]},
        ],
    },
    {
        # history: assistant turns keep only the text after </think>
        "name": "multi_turn",
        "messages": [
            {"role": "system", "content": "You read receipts. /no_think"},
            {"role": "user", "content": "What is the total amount?"},
            {"role": "assistant", "content": "<think>\nadd the numbers\n</think>\nThe total is 12."},
            {"role": "user", "content": [img("gray_100x50.png"), {"type": "text", "text": "And this one?"}]},
        ],
    },
]

# Suggested comparison tolerances for an f32 Rust implementation (max abs difference).
TOLERANCES = {
    "note": ("max |rust - golden| for an f32 implementation (bf16 weights upcast to f32). Compare each stage "
             "on the golden input of that stage (vision on tiles.*, projector on vision.*) so errors do not "
             "compound; tiles allow for resize-kernel differences (values are normalized, ~1/255/0.27 per level)"),
    "tiles_abs": 2e-2,
    "tiles_mean_abs": 2e-3,
    "vision_abs": 1e-3,
    "projector_abs": 1e-3,
    "logits_abs": 2e-3,
    "mamba_state_abs": 1e-4,
    "conv_state_abs": 1e-5,
    "greedy": "exact ids",
}


def image_files(messages):
    files = []
    for m in messages:
        if isinstance(m["content"], list):
            for part in m["content"]:
                if part["type"] == "image_url":
                    files.append(part["image_url"]["url"][len("file:"):])
    return files


@torch.no_grad()
def mamba_states(ref: Reference, emb: torch.Tensor):
    """Final SSM state per Mamba layer (from transformers' cache after a prefill) and the
    conv state = last K-1 pre-conv xBC inputs (captured from in_proj, model.md §2.6)."""
    llm = ref.llm
    cfg = llm.config
    d_inner = cfg.mamba_num_heads * cfg.mamba_head_dim
    conv_dim = d_inner + 2 * cfg.n_groups * cfg.ssm_state_size
    K = cfg.conv_kernel
    captured, hooks = {}, []
    for i, layer in enumerate(llm.model.layers):
        if layer.block_type == "linear_attention":
            def hook(_m, _inp, out, i=i):
                captured[i] = out[0, :, d_inner:d_inner + conv_dim]  # [seq, conv_dim]
            hooks.append(layer.mixer.in_proj.register_forward_hook(hook))
    out = llm(inputs_embeds=emb, use_cache=True)
    for h in hooks:
        h.remove()
    res = {}
    for i, xbc in captured.items():
        seq = xbc.shape[0]
        pad = torch.zeros(max(0, K - 1 - seq), conv_dim)
        conv = torch.cat([pad, xbc[-(K - 1):]], 0).T.contiguous()  # [conv_dim, K-1]
        ssm = out.cache.get_recurrent_state(i)[0].float()  # [heads, head_dim, state]
        # transformers keeps a K-wide window; its last K-1 columns must equal ours
        hf_conv = out.cache.get_conv_state(i)[0].float()
        assert torch.allclose(hf_conv[:, -(K - 1):], conv, atol=1e-6), "conv state mismatch"
        res[i] = (ssm.contiguous(), conv)
    return res, out


@torch.no_grad()
def check_mamba(ref: Reference, emb: torch.Tensor, states):
    """Self-check: transformers' chunked SSD (first Mamba layer) == plain recurrence of
    model.md §2.5, both for the mixer output and the final state."""
    i = min(states)
    layer = ref.llm.model.layers[i]
    got = {}
    h1 = layer.norm.register_forward_hook(lambda _m, _i, o: got.__setitem__("x", o[0]))
    h2 = layer.mixer.register_forward_hook(lambda _m, _i, o: got.__setitem__("y", o[0]))
    ref.llm(inputs_embeds=emb, use_cache=False)
    h1.remove()
    h2.remove()
    out, S = mamba_recurrent(ref, i, got["x"])
    assert torch.allclose(out, got["y"], atol=1e-4, rtol=1e-4), (out - got["y"]).abs().max()
    assert torch.allclose(S, states[i][0], atol=1e-4, rtol=1e-4), (S - states[i][0]).abs().max()


@torch.no_grad()
def cached_greedy(ref: Reference, emb: torch.Tensor, steps: int):
    """Greedy with transformers' cache; only used to cross-check the no-cache golden ids."""
    out = ref.llm(inputs_embeds=emb, use_cache=True)
    cache, ids = out.cache, []
    nxt = int(out.logits[0, -1].argmax())
    for _ in range(steps):
        ids.append(nxt)
        out = ref.llm(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
        cache = out.cache
        nxt = int(out.logits[0, -1].argmax())
    return ids


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint dir (relative to the repo root)")
    ap.add_argument("--out", required=True, help="golden output dir")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)

    out = Path(args.out)
    write_images(out / "images")
    ref = Reference(args.model)
    tensors = {}

    # Images: tiles -> ViT features -> pixel shuffle + mlp1
    images_meta, proj_by_file = [], {}
    for name, w, h, _mode in IMAGES:
        stem = Path(name).stem
        pil = ref.load_image(out / "images" / name)
        tiles, (cols, rows) = ref.tiles(pil)
        feats = ref.vision_features(tiles)
        proj = ref.project(feats)
        # self-check: transformers' RadioModel == direct transcription of model.md §3
        assert torch.allclose(vit_direct(ref, tiles), feats, atol=1e-4), f"vision self-check failed for {name}"
        tensors[f"tiles.{stem}"] = tiles
        tensors[f"vision.{stem}"] = feats
        tensors[f"projector.{stem}"] = proj
        proj_by_file[f"images/{name}"] = proj
        images_meta.append({"file": f"images/{name}", "width": w, "height": h, "grid": [cols, rows],
                            "num_tiles": tiles.shape[0], "tokens": tiles.shape[0] * ref.tokens_per_tile})

    cases = []
    for case in CASES:
        files = image_files(case["messages"])
        prompt = ref.render(case["messages"])
        n_tiles = [proj_by_file[f].shape[0] for f in files]
        ids = ref.encode(ref.expand(prompt, n_tiles))
        embeds = torch.cat([proj_by_file[f].reshape(-1, proj_by_file[f].shape[-1]) for f in files]) if files else None
        emb = ref.embed(ids, embeds)
        logits = ref.logits(emb)
        greedy = ref.greedy_nocache(ids, embeds, GREEDY_STEPS)
        # sanity: transformers' own cached decode agrees with the no-cache golden ids
        cached = cached_greedy(ref, emb, GREEDY_STEPS)
        if cached != greedy:
            print(f"warning: cached greedy differs for {case['name']}: {cached}", file=sys.stderr)
        tensors[f"logits.{case['name']}"] = logits
        states, _ = mamba_states(ref, emb)
        check_mamba(ref, emb, states)
        for i, (ssm, conv) in states.items():
            tensors[f"mamba_state.{case['name']}.layer{i}"] = ssm
            tensors[f"conv_state.{case['name']}.layer{i}"] = conv
        cases.append({
            "name": case["name"],
            "messages": case["messages"],
            "prompt_text": prompt,
            "image_files": files,
            "input_ids": ids,
            "num_input_ids": len(ids),
            "greedy_ids": greedy,
            "greedy_text": ref.tok.decode(greedy, skip_special_tokens=True),
            "logits_tensor": f"logits.{case['name']}",
        })
        print(f"{case['name']}: {len(ids)} ids, greedy {greedy[:8]}...", file=sys.stderr)

    mamba_layers = [i for i, c in enumerate(ref.cfg["llm_config"]["hybrid_override_pattern"]) if c == "M"]
    golden = {
        # relative to the repo root, never an absolute local path
        "model": os.path.relpath(os.path.abspath(args.model), REPO_ROOT),
        "generator": "scripts/make_golden.py (see scripts/nemotron_ref.py for the reference)",
        "dtype": "float32",
        "tokens_per_tile": ref.tokens_per_tile,
        "tile_size": ref.tile,
        "img_context_token_id": ref.ctx_id,
        "img_start_token_id": ref.tok.convert_tokens_to_ids(ref.cfg["img_start_token"]),
        "img_end_token_id": ref.tok.convert_tokens_to_ids(ref.cfg["img_end_token"]),
        "max_num_tiles": 12,
        "greedy_steps": GREEDY_STEPS,
        "greedy_note": "no cache (full forward each step), EOS ignored; greedy_text decoded with skip_special_tokens",
        "mamba_layers": mamba_layers,
        "state_note": ("mamba_state.<case>.layer<i>: final SSM state [heads, head_dim, state] after prefill of "
                       "the case's input_ids; conv_state.<case>.layer<i>: [conv_dim, K-1] last K-1 pre-conv "
                       "xBC inputs (oldest first), zero-padded on the left if the prompt is shorter"),
        "images": images_meta,
        "cases": cases,
        "tolerances": TOLERANCES,
    }
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    save_file({k: v.float().contiguous() for k, v in sorted(tensors.items())}, str(out / "tensors.safetensors"),
              metadata={"format": "pt"})
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": os.fspath(out), "bytes": total, "cases": len(cases), "images": len(images_meta)}))


if __name__ == "__main__":
    main()
