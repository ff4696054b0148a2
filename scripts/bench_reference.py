#!/usr/bin/env python3
"""CPU throughput of the Python reference (transformers NemotronH + RadioModel), the
baseline for the Rust server's performance comparison.

    python scripts/make_checkpoint.py --preset mid --out target/mid-checkpoint
    python scripts/bench_reference.py --model target/mid-checkpoint --prompt-tokens 512 \
        --decode-tokens 64 --runs 5 [--threads N] [--mode text|image|both] [--dtype bfloat16]

--dtype bfloat16 runs every module in bfloat16 (transformers' own default for this
checkpoint, whose torch_dtype is bfloat16); float32 (the default) matches the golden tests.

Prints one JSON object. For each prompt kind:
  prefill_tokens_per_s = prompt_tokens / median(prefill seconds)   (one forward, no cache reuse;
                         for "image" the time includes tiling, the ViT and the projector)
  decode_tokens_per_s  = decode_tokens / median(decode seconds)     (greedy, transformers' cache,
                         one token per forward, batch 1)
The "image" prompt holds one image that is exactly one tile (force_image_size²) ->
tokens_per_tile image tokens + <img>/</img>, padded with text to --prompt-tokens.
Prompts are built directly as token ids (template header + filler text + generation prompt),
so their length is exact.
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import draw_image  # noqa: E402
from nemotron_ref import Reference  # noqa: E402

FILLER = (
    "The model reads images in tiles of equal size and writes a short answer in plain English. "
    "Describe the chart, read the table, and summarize the document. Mountains, rivers, forests, "
    "bridges, buildings, streets, cars, bicycles and trains. Yesterday the committee approved the "
    "budget; tomorrow the engineers start building. "
)


def build_prompt(ref: Reference, n_tokens: int, with_image: bool):
    """Exactly n_tokens ids: rendered template around a user message whose text is cut at
    the token level. Returns (ids, image_tiles or None)."""
    content = [{"type": "image"}, {"type": "text", "text": "@@"}] if with_image else "@@"
    prompt = ref.render([{"role": "system", "content": "/no_think"}, {"role": "user", "content": content}])
    head, tail = prompt.split("@@")
    tiles = None
    if with_image:
        img = draw_image("bench", ref.tile, ref.tile, "RGB", seed=7)
        tiles, grid = ref.tiles(img)
        assert tiles.shape[0] == 1, grid
        head = ref.expand(head, [1])
    head_ids, tail_ids = ref.encode(head), ref.encode(tail)
    need = n_tokens - len(head_ids) - len(tail_ids)
    if need < 0:
        raise SystemExit(f"--prompt-tokens must be >= {len(head_ids) + len(tail_ids)} for this prompt")
    filler = []
    while len(filler) < need:
        filler += ref.encode(FILLER)
    return head_ids + filler[:need] + tail_ids, tiles


@torch.no_grad()
def run_once(ref: Reference, ids, tiles, decode_tokens):
    t0 = time.perf_counter()
    embeds = None
    if tiles is not None:
        tiles = tiles.to(ref.llm.dtype)
        embeds = ref.project(ref.vision_features(tiles)).reshape(-1, ref.llm.config.hidden_size)
    t_vis = time.perf_counter()
    emb = ref.embed(ids, embeds)
    out = ref.llm(inputs_embeds=emb, use_cache=True)
    nxt = out.logits[0, -1].argmax().view(1, 1)
    t1 = time.perf_counter()
    cache = out.cache
    for _ in range(decode_tokens):
        out = ref.llm(input_ids=nxt, cache=cache, use_cache=True)
        cache = out.cache
        nxt = out.logits[0, -1].argmax().view(1, 1)
    t2 = time.perf_counter()
    return t_vis - t0, t1 - t0, t2 - t1


def bench(ref, kind, args):
    ids, tiles = build_prompt(ref, args.prompt_tokens, kind == "image")
    for _ in range(args.warmup):
        run_once(ref, ids, tiles, min(args.decode_tokens, 4))
    vis, pre, dec = [], [], []
    for _ in range(args.runs):
        v, p, d = run_once(ref, ids, tiles, args.decode_tokens)
        vis.append(v)
        pre.append(p)
        dec.append(d)
    res = {
        "prompt_tokens": len(ids),
        "prefill_s_median": statistics.median(pre),
        "prefill_tokens_per_s": len(ids) / statistics.median(pre),
        "decode_tokens": args.decode_tokens,
        "decode_s_median": statistics.median(dec),
        "decode_tokens_per_s": args.decode_tokens / statistics.median(dec),
        "prefill_s_all": pre,
        "decode_s_all": dec,
    }
    if kind == "image":
        res["image_tokens"] = ref.tokens_per_tile
        res["vision_s_median"] = statistics.median(vis)
        res["llm_prefill_tokens_per_s"] = len(ids) / (statistics.median(pre) - statistics.median(vis))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    ap.add_argument("--mode", choices=["text", "image", "both"], default="both")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    ref = Reference(args.model)
    dtype = getattr(torch, args.dtype)
    for module in (ref.llm, ref.vit, ref.proj):
        module.to(dtype)
    n_params = sum(p.numel() for m in (ref.llm, ref.vit, ref.proj) for p in m.parameters())
    result = {
        "reference": f"transformers NemotronHForCausalLM + RadioModel, {args.dtype}, CPU, batch 1",
        "model": args.model,
        "params": n_params,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "runs": args.runs,
    }
    kinds = ["text", "image"] if args.mode == "both" else [args.mode]
    for kind in kinds:
        result[kind] = bench(ref, kind, args)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
