"""Independent float32 reference for NemotronH_Nano_VL_V2 checkpoints (used by
make_golden.py and bench_reference.py). Everything follows docs/spec model.md.

What comes from where:
  * LLM: transformers' own NemotronH (`NemotronHForCausalLM`, eager attention, the
    pure-torch Mamba2 path). Checkpoint names `language_model.backbone.*` are mapped to
    transformers' `model.*`, `language_model.lm_head.weight` to `lm_head.weight`.
    Deviation handled: transformers clamps dt at `time_step_min` (it builds
    `time_step_limit = (time_step_min, inf)`, ignoring the config's time_step_limit); the
    spec (= vLLM) does not clamp. After construction we set every mixer's
    `time_step_limit` to the config's (0, inf), which makes that clamp a no-op
    (softplus is > 0). Everything else in the eager path matches model.md §2 (grouped gated
    RMSNorm with group_size = d_inner / n_groups, norm after gating, no RoPE, relu² MLP,
    fp32 softmax); checked by reading modeling_nemotron_h.py of the pinned version.
  * Vision: transformers' `RadioModel` (models/radio). It matches model.md §3: patches
    flattened (c, yy, xx); CPE = bilinear align_corners=False to (max(h,w),)*2 then top-left
    crop; pos-embed added before the prefix tokens are prepended; pre-LN blocks with exact
    GELU, LayerNorm eps 1e-6, no final norm; `features` drops the prefix tokens. The fused
    timm `attn.qkv` is split row-wise into q/k/v. Normalization is done outside the model
    (as the HF remote code does with `make_preprocessor_external()`).
  * Pixel shuffle and projector: transformers' NemotronH Omni implementations
    (`NemotronH_Omni_Reasoning_V3.pixel_shuffle`, `..MultiModalProjector` = RMSNorm eps 1e-5
    -> Linear -> relu² -> Linear); the shuffle is additionally asserted against the explicit
    formula of model.md §4.1.
  * Tiling / resize / normalization (model.md §5.1, vLLM behaviour) and prompt splicing
    (§5.2) are transcribed here; the prompt is rendered with the checkpoint's chat template
    through transformers' `apply_chat_template` (jinja2).
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from transformers import NemotronHConfig, NemotronHForCausalLM, PreTrainedTokenizerFast
from transformers.models.nemotron_h_omni.modeling_nemotron_h_omni import (
    NemotronH_Omni_Reasoning_V3,
    NemotronH_Omni_Reasoning_V3MultiModalProjector,
)
from transformers.models.radio import RadioConfig, RadioModel


def load_state(model_dir: Path) -> dict:
    """All tensors of the sharded checkpoint, upcast to float32 (ints kept)."""
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    state = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(model_dir / shard), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                state[name] = t.float() if t.is_floating_point() else t
    return state


class Reference:
    def __init__(self, model_dir, threads=None):
        self.dir = Path(model_dir)
        self.cfg = json.loads((self.dir / "config.json").read_text())
        self.tok = PreTrainedTokenizerFast.from_pretrained(str(self.dir))
        state = load_state(self.dir)
        self.state = state
        self.tile = int(self.cfg["force_image_size"])
        self.ctx_id = int(self.cfg["img_context_token_id"])
        assert self.tok.convert_tokens_to_ids(self.cfg["img_context_token"]) == self.ctx_id
        self.llm = self._build_llm(state)
        self.vit, self.num_prefix = self._build_vit(state)
        self.proj = self._build_projector(state)
        self.mean = torch.tensor(self.cfg["norm_mean"]).view(3, 1, 1)
        self.std = torch.tensor(self.cfg["norm_std"]).view(3, 1, 1)
        self.patch = self.vit.config.patch_size
        self.tokens_per_tile = (self.tile // self.patch) ** 2 // 4

    # ---- model construction -----------------------------------------------------------

    def _build_llm(self, state):
        lc = dict(self.cfg["llm_config"])
        for k in ("architectures", "torch_dtype", "transformers_version"):
            lc.pop(k, None)
        lc["time_step_limit"] = tuple(lc["time_step_limit"])
        config = NemotronHConfig(**lc)
        config._attn_implementation = "eager"
        model = NemotronHForCausalLM(config).float().eval()
        mapped = {}
        for name, t in state.items():
            if name.startswith("language_model.backbone."):
                mapped["model." + name[len("language_model.backbone."):]] = t
            elif name == "language_model.lm_head.weight":
                mapped["lm_head.weight"] = t
        model.load_state_dict(mapped, strict=True)
        # transformers clamps dt at time_step_min; the spec (vLLM) uses the config's
        # time_step_limit (0, inf), i.e. no clamp. Override the mixers' limit after construction
        # (time_step_min itself is also used by the weight init, which rejects 0).
        for layer in model.model.layers:
            if hasattr(layer.mixer, "time_step_limit"):
                layer.mixer.time_step_limit = tuple(float(v) for v in lc["time_step_limit"])
        return model

    def _build_vit(self, state):
        vc = self.cfg["vision_config"]
        pre = "vision_model.radio_model.model."
        emb = state[pre + "patch_generator.embedder.weight"]
        pos = state[pre + "patch_generator.pos_embed"]
        cls = state[pre + "patch_generator.cls_token.token"]
        hidden, patch_dim = emb.shape
        patch = int(round((patch_dim // 3) ** 0.5))
        grid = int(round(pos.shape[1] ** 0.5))
        n_blocks = 1 + max(int(k[len(pre + "blocks."):].split(".")[0]) for k in state if k.startswith(pre + "blocks."))
        mlp = state[pre + "blocks.0.mlp.fc1.weight"].shape[0]
        num_prefix = cls.shape[0]
        config = RadioConfig(
            hidden_size=hidden, num_hidden_layers=n_blocks, num_attention_heads=vc["num_attention_heads"],
            mlp_ratio=mlp / hidden, hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True,
            patch_size=patch, image_size=self.tile, max_img_size=grid * patch,
            # only their sum (the prefix-token count) matters for the patch features
            num_cls_tokens=2, num_registers=num_prefix - 2,
            norm_mean=self.cfg["norm_mean"], norm_std=self.cfg["norm_std"],
        )
        config._attn_implementation = "eager"
        model = RadioModel(config).float().eval()
        model.make_preprocessor_external()  # we normalize in preprocessing, like the HF remote code
        m = {
            "embeddings.patch_projection.weight": emb,
            "embeddings.position_embedding": pos,
            "embeddings.cls_register_token": cls,
        }
        for k in range(n_blocks):
            s, d = f"{pre}blocks.{k}.", f"encoder.layer.{k}."
            for n in ("norm1", "norm2"):
                m[d + n + ".weight"] = state[s + n + ".weight"]
                m[d + n + ".bias"] = state[s + n + ".bias"]
            qw = state[s + "attn.qkv.weight"].chunk(3, dim=0)  # rows [q | k | v]
            qb = state[s + "attn.qkv.bias"].chunk(3, dim=0)
            for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
                m[d + f"attention.{n}.weight"] = qw[j]
                m[d + f"attention.{n}.bias"] = qb[j]
            m[d + "attention.o_proj.weight"] = state[s + "attn.proj.weight"]
            m[d + "attention.o_proj.bias"] = state[s + "attn.proj.bias"]
            for n in ("fc1", "fc2"):
                m[d + f"mlp.{n}.weight"] = state[s + f"mlp.{n}.weight"]
                m[d + f"mlp.{n}.bias"] = state[s + f"mlp.{n}.bias"]
            # C-RADIO has no layer scale: identity
            m[d + "layer_scale1.lambda1"] = torch.ones(hidden)
            m[d + "layer_scale2.lambda1"] = torch.ones(hidden)
        m["summary_idxs"] = torch.tensor(config.summary_idxs)
        model.load_state_dict(m, strict=True)
        return model, num_prefix

    def _build_projector(self, state):
        w1 = state["mlp1.1.weight"]
        w3 = state["mlp1.3.weight"]
        proj = NemotronH_Omni_Reasoning_V3MultiModalProjector(w1.shape[1], w1.shape[0], w3.shape[0], eps=1e-5)
        proj.load_state_dict({
            "layer_norm.weight": state["mlp1.0.weight"],
            "linear_1.weight": w1,
            "linear_2.weight": w3,
        }, strict=True)
        return proj.float().eval()

    # ---- preprocessing (model.md §5.1) ---------------------------------------------------

    @staticmethod
    def find_grid(width, height, tile, max_num=12, min_num=1):
        """InternVL dynamic_preprocess ratio choice: (cols, rows)."""
        ratios = sorted(
            {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
             if min_num <= i * j <= max_num},
            key=lambda r: r[0] * r[1],
        )
        aspect = width / height
        best, best_diff = (1, 1), float("inf")
        area = width * height
        for r in ratios:
            diff = abs(aspect - r[0] / r[1])
            if diff < best_diff:
                best, best_diff = r, diff
            elif diff == best_diff and area > 0.5 * tile * tile * r[0] * r[1]:
                best = r
        return best

    def _resize(self, img_u8: torch.Tensor, w: int, h: int) -> torch.Tensor:
        # vLLM: antialiased bicubic on the uint8 image as float (0..255); no clamp.
        return F.interpolate(img_u8[None].float(), size=(h, w), mode="bicubic", align_corners=False,
                             antialias=True)[0]

    def load_image(self, path) -> Image.Image:
        return Image.open(path).convert("RGB")

    def tiles(self, image: Image.Image, max_num=12):
        """Normalized tiles [n, 3, S, S] (row-major, thumbnail last) and the grid."""
        S = self.tile
        w, h = image.size
        cols, rows = self.find_grid(w, h, S, max_num)
        u8 = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
        big = self._resize(u8, S * cols, S * rows)
        out = [big[:, r * S:(r + 1) * S, c * S:(c + 1) * S] for r in range(rows) for c in range(cols)]
        if cols * rows > 1 and self.cfg.get("use_thumbnail", True):
            out.append(self._resize(u8, S, S))
        x = torch.stack(out) / 255.0
        x = (x - self.mean) / self.std
        return x.contiguous(), (cols, rows)

    # ---- vision path ----------------------------------------------------------------------

    @torch.no_grad()
    def vision_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """[n, patches, vit_hidden] after dropping the prefix tokens."""
        out = self.vit(tiles)
        assert self.vit.config.num_summary_tokens == self.num_prefix
        return out.features

    @torch.no_grad()
    def project(self, feats: torch.Tensor) -> torch.Tensor:
        n, p, c = feats.shape
        side = int(round(p ** 0.5))
        grid = feats.reshape(n, side, side, c)
        shuffled = NemotronH_Omni_Reasoning_V3.pixel_shuffle(None, grid, scale_factor=0.5)
        # Explicit model.md §4.1 formula as a cross-check of the transformers implementation.
        expect = torch.cat([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]], -1)
        assert torch.equal(shuffled, expect)
        return self.proj(shuffled.reshape(n, -1, 4 * c))

    # ---- prompt ---------------------------------------------------------------------------

    def render(self, messages) -> str:
        """Chat template with OpenAI image parts turned into {"type": "image"} (model.md §11.1)."""
        conv = []
        for m in messages:
            c = m["content"]
            if isinstance(c, list):
                c = [{"type": "image"} if part["type"] in ("image", "image_url") else part for part in c]
            conv.append({"role": m["role"], "content": c})
        return self.tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)

    def expand(self, prompt: str, tiles_per_image) -> str:
        """Each <image> placeholder -> <img> + <image> * (tokens_per_tile * n_tiles) + </img>."""
        ctx, start, end = self.cfg["img_context_token"], self.cfg["img_start_token"], self.cfg["img_end_token"]
        parts = prompt.split(ctx)
        assert len(parts) - 1 == len(tiles_per_image), "placeholder count != image count"
        out = parts[0]
        for n, rest in zip(tiles_per_image, parts[1:]):
            out += start + ctx * (self.tokens_per_tile * n) + end + rest
        return out

    def encode(self, text: str):
        return self.tok(text, add_special_tokens=False)["input_ids"]

    # ---- LLM --------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, ids, image_embeds=None) -> torch.Tensor:
        ids_t = torch.tensor([ids])
        emb = self.llm.model.embeddings(ids_t)
        mask = ids_t[0] == self.ctx_id
        n = int(mask.sum())
        if image_embeds is None:
            assert n == 0
        else:
            assert n == image_embeds.shape[0], (n, image_embeds.shape)
            emb[0, mask] = image_embeds
        return emb

    @torch.no_grad()
    def logits(self, emb: torch.Tensor) -> torch.Tensor:
        return self.llm(inputs_embeds=emb, use_cache=False).logits[0]

    @torch.no_grad()
    def greedy_nocache(self, ids, image_embeds, steps):
        """Greedy decode, re-running the full forward on the growing sequence each step,
        ignoring EOS (an independent check of any cached decode path)."""
        emb = self.embed(ids, image_embeds)
        out = []
        for _ in range(steps):
            nxt = int(self.logits(emb)[-1].argmax())
            out.append(nxt)
            emb = torch.cat([emb, self.llm.model.embeddings(torch.tensor([[nxt]]))], dim=1)
        return out


# ---- independent transcriptions used as self-checks of the transformers reference ---------


@torch.no_grad()
def vit_direct(ref: Reference, tiles: torch.Tensor) -> torch.Tensor:
    """model.md §3 written out directly from the checkpoint tensors."""
    st, pre = ref.state, "vision_model.radio_model.model."
    n, _, H, W = tiles.shape
    ps = ref.patch
    h, w = H // ps, W // ps
    # patches flattened (c, yy, xx), row-major over the patch grid
    x = tiles.reshape(n, 3, h, ps, w, ps).permute(0, 2, 4, 1, 3, 5).reshape(n, h * w, 3 * ps * ps)
    x = x @ st[pre + "patch_generator.embedder.weight"].T
    pos = st[pre + "patch_generator.pos_embed"]
    G, D = int(round(pos.shape[1] ** 0.5)), pos.shape[2]
    pos = pos.reshape(1, G, G, D).permute(0, 3, 1, 2)
    m = max(h, w)
    pos = F.interpolate(pos, size=(m, m), mode="bilinear", align_corners=False)[:, :, :h, :w]
    x = x + pos.flatten(2).transpose(1, 2)
    cls = st[pre + "patch_generator.cls_token.token"]
    x = torch.cat([cls.expand(n, -1, -1), x], 1)
    heads = ref.cfg["vision_config"]["num_attention_heads"]
    k = 0
    while f"{pre}blocks.{k}.norm1.weight" in st:
        b = f"{pre}blocks.{k}."
        y = F.layer_norm(x, (D,), st[b + "norm1.weight"], st[b + "norm1.bias"], 1e-6)
        qkv = (y @ st[b + "attn.qkv.weight"].T + st[b + "attn.qkv.bias"]).reshape(n, -1, 3, heads, D // heads)
        q, kk, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ kk.transpose(-1, -2) * (D // heads) ** -0.5, -1) @ v
        a = a.transpose(1, 2).reshape(n, -1, D)
        x = x + a @ st[b + "attn.proj.weight"].T + st[b + "attn.proj.bias"]
        y = F.layer_norm(x, (D,), st[b + "norm2.weight"], st[b + "norm2.bias"], 1e-6)
        y = F.gelu(y @ st[b + "mlp.fc1.weight"].T + st[b + "mlp.fc1.bias"])
        x = x + y @ st[b + "mlp.fc2.weight"].T + st[b + "mlp.fc2.bias"]
        k += 1
    return x[:, cls.shape[0]:]


@torch.no_grad()
def mamba_recurrent(ref: Reference, layer_idx: int, x_norm: torch.Tensor):
    """model.md §2.5 step-by-step recurrence (no chunking, no clamp) for one Mamba mixer.
    x_norm: [seq, hidden] (the block's normalized input). Returns (out [seq, hidden], state)."""
    st = ref.state
    pre = f"language_model.backbone.layers.{layer_idx}.mixer."
    c = ref.cfg["llm_config"]
    Hh, P, N, G, K = c["mamba_num_heads"], c["mamba_head_dim"], c["ssm_state_size"], c["n_groups"], c["conv_kernel"]
    di = Hh * P
    proj = x_norm @ st[pre + "in_proj.weight"].T
    z, xbc, dt_raw = proj[:, :di], proj[:, di:di + di + 2 * G * N], proj[:, -Hh:]
    T = xbc.shape[0]
    wconv = st[pre + "conv1d.weight"][:, 0, :]  # [conv_dim, K]
    padded = torch.cat([torch.zeros(K - 1, xbc.shape[1]), xbc], 0)
    conv = torch.stack([(padded[t:t + K].T * wconv).sum(-1) for t in range(T)]) + st[pre + "conv1d.bias"]
    conv = F.silu(conv)
    xs, B, C = conv[:, :di].reshape(T, Hh, P), conv[:, di:di + G * N].reshape(T, G, N), conv[:, di + G * N:].reshape(T, G, N)
    dt = F.softplus(dt_raw + st[pre + "dt_bias"])
    A = -torch.exp(st[pre + "A_log"])
    S = torch.zeros(Hh, P, N)
    ys = []
    for t in range(T):
        g = torch.arange(Hh) // (Hh // G)
        S = torch.exp(dt[t] * A)[:, None, None] * S + (dt[t][:, None, None] * xs[t][:, :, None] * B[t][g][:, None, :])
        ys.append((S * C[t][g][:, None, :]).sum(-1) + st[pre + "D"][:, None] * xs[t])
    y = torch.stack(ys).reshape(T, di)
    gated = y * F.silu(z)
    gg = gated.reshape(T, G, di // G)
    gg = gg * torch.rsqrt(gg.pow(2).mean(-1, keepdim=True) + c["layer_norm_epsilon"])
    out = (gg.reshape(T, di) * st[pre + "norm.weight"]) @ st[pre + "out_proj.weight"].T
    return out, S
