#!/usr/bin/env python3
"""The reference for server/examples/bench_full.rs: the same full-size model (random BF16
weights, shapes from scripts/full-size-config.json) built with stock transformers
(NemotronHForCausalLM + RadioModel, SDPA attention; transformers' own Mamba2 path, which uses
the mamba_ssm / causal_conv1d kernels only where they are installed) and timed the same way:

  * TTFT, n tiles: random pixel tiles on the device -> RADIO -> pixel shuffle -> mlp1 ->
    splice into the prompt embeddings -> prefill (cache on) -> first greedy id read back.
    Prompt = text_tokens/2 ids, <img>, 256*n image tokens, </img>, the rest of the text ids.
  * decode, batch b: b sequences prefilled with decode_context ids each, 4*warmup untimed
    greedy steps, then `runs` timed runs of `decode_steps` steps; every step reads the ids back.
    tokens/s = b * steps / median(run seconds).
  * vision: `vision_batch` tiles through RADIO (and RADIO + projector); tiles/s from the median.

    python3 scripts/bench_reference_gpu.py --device cuda --json ref.json
    # CPU dry run (float32):
    python3 scripts/bench_reference_gpu.py --device cpu --pattern 'M*-' --vision-layers 1 --vocab 4096 \\
        --tiles 1 --batch 1,2 --decode-steps 2 --decode-context 16 --vision-batch 1 --runs 1

Measurements past --time-budget seconds are skipped (and say so), so a slow reference cannot
hold up the rest of a GPU check. Prints a table; --json writes every number.
"""

import argparse
import inspect
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the GPU machine has no network

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from transformers import NemotronHConfig, NemotronHForCausalLM  # noqa: E402
from transformers.models.radio import RadioConfig, RadioModel  # noqa: E402

CONFIG = Path(__file__).resolve().parent / "full-size-config.json"


class Projector(nn.Module):
    """mlp1 (model.md §4.2): RMSNorm (in float32, eps 1e-5) -> Linear -> relu² -> Linear."""

    def __init__(self, d_in, d_mid, d_out):
        super().__init__()
        self.norm_weight = nn.Parameter(torch.ones(d_in))
        self.fc1 = nn.Linear(d_in, d_mid, bias=False)
        self.fc2 = nn.Linear(d_mid, d_out, bias=False)

    def forward(self, x):
        xf = x.float()
        x = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * self.norm_weight
        return self.fc2(torch.relu(self.fc1(x)).square())


def pixel_shuffle(feats):
    """[n, side², c] -> [n, (side/2)², 4c], model.md §4.1 (ps_version v2)."""
    n, p, c = feats.shape
    side = int(round(p**0.5))
    g = feats.reshape(n, side, side, c)
    out = torch.cat([g[:, 0::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 0::2], g[:, 1::2, 1::2]], -1)
    return out.reshape(n, -1, 4 * c)


def load_config(args):
    cfg = json.loads(CONFIG.read_text())  # Python's json reads the bare Infinity
    lc = {k: v for k, v in cfg["llm_config"].items() if k not in ("architectures", "torch_dtype", "model_type")}
    if args.pattern:
        lc["hybrid_override_pattern"] = args.pattern
    elif args.layers:
        lc["hybrid_override_pattern"] = lc["hybrid_override_pattern"][: args.layers]
    lc["num_hidden_layers"] = len(lc["hybrid_override_pattern"])
    if args.vocab:
        lc["vocab_size"] = args.vocab
    lc["time_step_limit"] = tuple(lc["time_step_limit"])
    vc = cfg["vision_config"]
    if args.vision_layers:
        vc["num_hidden_layers"] = args.vision_layers
    return cfg, lc, vc


def build(args, device, dtype):
    cfg, lc, vc = load_config(args)
    llm_config = NemotronHConfig(**lc)
    llm_config._attn_implementation = "sdpa"
    prefix = vc["num_prefix_tokens"]
    vit_config = RadioConfig(
        hidden_size=vc["hidden_size"], num_hidden_layers=vc["num_hidden_layers"], num_attention_heads=16,
        mlp_ratio=vc["intermediate_size"] / vc["hidden_size"], hidden_act="gelu", layer_norm_eps=1e-6,
        qkv_bias=True, patch_size=vc["patch_size"], image_size=cfg["force_image_size"],
        max_img_size=vc["max_resolution"], num_cls_tokens=2, num_registers=prefix - 2,
    )
    vit_config._attn_implementation = "sdpa"
    h = lc["hidden_size"]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and initialised) in `dtype` on `device`
    try:
        with torch.device(device), torch.no_grad():
            llm = NemotronHForCausalLM(llm_config).eval()
            vit = RadioModel(vit_config).eval()
            vit.make_preprocessor_external()  # tiles come normalised, as from the processor
            proj = Projector(4 * vc["hidden_size"], cfg["projector_hidden_size"], h).eval()
            for p in proj.parameters():
                if p.dim() == 2:
                    p.normal_(0, 0.02)
    finally:
        torch.set_default_dtype(old)
    return cfg, llm, vit, proj


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median(xs):
    return statistics.median(xs)


class CacheApi:
    """transformers 5.17 passes the cache as `past_key_values`, later 5.x as `cache`."""

    def __init__(self):
        self.kw = "cache" if "cache" in inspect.signature(NemotronHForCausalLM.forward).parameters else "past_key_values"

    def step(self, llm, cache, **kw):
        if cache is not None:
            kw[self.kw] = cache
        out = llm(use_cache=True, logits_to_keep=1, **kw)
        new = getattr(out, "cache", None)
        return out.logits[:, -1], (new if new is not None else out.past_key_values)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", choices=["bf16", "f32"], help="default: bf16 on cuda, f32 on cpu")
    ap.add_argument("--layers", type=int, help="keep the first N layers of the pattern (dry runs)")
    ap.add_argument("--pattern", help="layer pattern instead of the config's, e.g. 'M*-' (dry runs; "
                    "transformers' cache needs an attention layer)")
    ap.add_argument("--vision-layers", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--tiles", default="1,13")
    ap.add_argument("--text-tokens", type=int, default=40)
    ap.add_argument("--batch", default="1,16")
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=300)
    ap.add_argument("--vision-batch", type=int, default=13)
    ap.add_argument("--prefill-piece", type=int, default=128, help="tokens per forward when prefilling the decode context")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--time-budget", type=float, default=170.0, help="seconds; later measurements are skipped")
    ap.add_argument("--json")
    args = ap.parse_args()

    start = time.perf_counter()
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype or ("bf16" if device.type == "cuda" else "f32")]
    torch.manual_seed(0)
    cfg, llm, vit, proj = build(args, device, dtype)
    sync(device)
    build_s = time.perf_counter() - start
    n_params = sum(p.numel() for m in (llm, vit, proj) for p in m.parameters())
    vocab = llm.config.vocab_size
    hidden = llm.config.hidden_size
    ctx_id = int(cfg["img_context_token_id"])
    tile = int(cfg["force_image_size"])
    per_tile = (tile // vit.config.patch_size) ** 2 // 4
    api = CacheApi()
    gen = torch.Generator().manual_seed(0x5EED)
    print(f"reference: torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
          f"{device} {dtype}; LLM {len(llm.config.layers_block_type)} layers, vocab {vocab}; "
          f"RADIO {vit.config.num_hidden_layers} blocks; {n_params / 1e9:.2f} B params; built in {build_s:.1f} s",
          flush=True)

    result = {"setup": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                        "device": str(device), "dtype": str(dtype), "params": n_params, "build_s": build_s,
                        "runs": args.runs, "warmup": args.warmup, "cache_kwarg": api.kw}}
    rows = []

    def record(key, what, value, detail, data):
        print(f"  {what}: {value} {detail}", flush=True)
        rows.append((what, value, detail))
        result[key] = data
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    def over_budget(key, what):
        if time.perf_counter() - start > args.time_budget:
            record(key, what, "skipped", f"(past --time-budget {args.time_budget:.0f} s)", {"skipped": True})
            return True
        return False

    def guarded(key, what, measure):
        """Run one measurement; out of device memory is recorded, and the next one runs."""
        if over_budget(key, what):
            return
        try:
            measure()
        except torch.OutOfMemoryError as e:
            record(key, what, "OOM", f"({str(e).splitlines()[0][:120]})", {"oom": True})
        if device.type == "cuda":
            torch.cuda.empty_cache()

    def ids(n):
        return torch.randint(1000, vocab, (n,), generator=gen)

    def decode(b):
        prompt = ids(b * args.decode_context).view(b, args.decode_context).to(device)
        # Prefilled in pieces: transformers' pure-torch chunk scan materialises
        # [b, chunks, 128, 128, heads, state] float32 products (51 GB for 16 x 300 tokens).
        cache = None
        for piece in prompt.split(args.prefill_piece, dim=1):
            logits, cache = api.step(llm, cache, input_ids=piece)
        nxt = logits.argmax(-1).tolist()

        def step(nxt, cache):
            logits, cache = api.step(llm, cache, input_ids=torch.tensor(nxt, device=device).view(b, 1))
            return logits.argmax(-1).tolist(), cache

        for _ in range(4 * args.warmup):
            nxt, cache = step(nxt, cache)
        times = []
        for _ in range(args.runs):
            t = time.perf_counter()
            for _ in range(args.decode_steps):
                nxt, cache = step(nxt, cache)
            times.append(time.perf_counter() - t)
        per_step = median(times) / args.decode_steps
        record(f"decode_b{b}", f"decode batch {b}", f"{b / per_step:.1f} tok/s",
               f"({args.runs} x {args.decode_steps} steps) step {per_step * 1e3:.2f} ms",
               {"tok_s": b / per_step, "step_ms": per_step * 1e3, "runs_s": times, "steps": args.decode_steps})

    def ttft(n):
        pixels = torch.randn(n, 3, tile, tile, generator=gen).to(device=device, dtype=dtype)
        head = args.text_tokens // 2
        prompt = torch.cat([ids(head + 1), torch.full((n * per_tile,), ctx_id), ids(1 + args.text_tokens - head)])
        prompt = prompt.to(device)
        mask = prompt == ctx_id

        def once():
            t = time.perf_counter()
            images = proj(pixel_shuffle(vit(pixels).features)).reshape(-1, hidden)
            sync(device)
            vision_s = time.perf_counter() - t
            emb = llm.model.embeddings(prompt[None])
            emb[0, mask] = images.to(emb.dtype)
            logits, _ = api.step(llm, None, inputs_embeds=emb)
            logits.argmax(-1).tolist()
            return time.perf_counter() - t, vision_s

        for _ in range(args.warmup):
            once()
        total, vision = zip(*[once() for _ in range(args.runs)])
        t, v = median(total), median(vision)
        record(f"ttft_{n}", f"TTFT {n} tile{'s' if n > 1 else ''}", f"{t * 1e3:.1f} ms",
               f"({len(prompt)} prompt tokens; vision+projector {v * 1e3:.1f} ms)",
               {"ms": t * 1e3, "vision_ms": v * 1e3, "prompt_tokens": len(prompt), "runs_s": list(total)})

    def vision(key, what, n, with_projector):
        pixels = torch.randn(n, 3, tile, tile, generator=gen).to(device=device, dtype=dtype)

        def once():
            t = time.perf_counter()
            out = vit(pixels).features
            if with_projector:
                out = proj(pixel_shuffle(out))
            out.flatten()[0].item()  # read one value back: the work is done when it arrives
            return time.perf_counter() - t

        for _ in range(args.warmup):
            once()
        times = [once() for _ in range(args.runs)]
        t = median(times)
        record(key, what, f"{n / t:.1f} tiles/s", f"({t * 1e3:.1f} ms per batch)",
               {"tiles_s": n / t, "batch": n, "ms": t * 1e3, "runs_s": times})

    with torch.no_grad():
        for b in [int(x) for x in args.batch.split(",")]:
            guarded(f"decode_b{b}", f"decode batch {b}", lambda: decode(b))
        for n in [int(x) for x in args.tiles.split(",")]:
            guarded(f"ttft_{n}", f"TTFT {n} tile{'s' if n > 1 else ''}", lambda: ttft(n))
        n = args.vision_batch
        guarded("vision", f"RADIO, {n} tiles", lambda: vision("vision", f"RADIO, {n} tiles", n, False))
        guarded("vision_projector", f"RADIO+projector, {n} tiles",
                lambda: vision("vision_projector", f"RADIO+projector, {n} tiles", n, True))

    if device.type == "cuda":
        result["setup"]["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print()
    w = [max(len(r[i]) for r in rows + [("measurement", "median", "detail")]) for i in range(3)]
    for r in [("measurement", "median", "detail")] + rows:
        print("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
    print(f"total {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
