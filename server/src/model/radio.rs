//! RADIO ViT (C-RADIOv2-H), model.md §3: patch embedding + CPE position
//! embeddings + prefix (cls/register) tokens + pre-LN timm blocks. Returns the
//! patch tokens only.
//!
//! Weights live under `vision_model.radio_model.model.`; every dimension the
//! tensors determine is read from their shapes. Only the head count comes
//! from the config.

use std::collections::HashMap;
use std::sync::RwLock;

use candle_core::{CpuStorage, DType, Device, Module, Result, Storage, Tensor, bail};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::bf16_gemm::{self, PackedA, PackedB};
use super::cpu_math::{SCORES, gemm_rows, softmax_in_place};
use super::linear::{Activation, CpuMatmul, Linear, OutPtr, load_compact, par_ranges};
use super::norm::LayerNorm;
use crate::kernels;

/// The checkpoint prefix of the weights [`RadioEncoder::load`] expects its
/// `VarBuilder` to point at.
pub const RADIO_PREFIX: &str = "vision_model.radio_model.model";

/// What the tensor shapes cannot tell.
#[derive(Debug, Clone, PartialEq)]
pub struct RadioConfig {
    pub num_heads: usize,
    /// LayerNorm epsilon (timm ViT: 1e-6).
    pub layer_norm_eps: f64,
}

/// Heads of the timm ViT families RADIO is built on, by model-name prefix.
const TIMM_HEADS: &[(&str, usize)] = &[
    ("vit_tiny", 3),
    ("vit_small", 6),
    ("vit_base", 12),
    ("vit_large", 16),
    ("vit_huge", 16),
    ("vit_giant", 16),
    ("vit_gigantic", 16),
];

impl RadioConfig {
    /// From the raw `vision_config` object of config.json: an explicit
    /// `num_attention_heads` (top level or in `args`) wins, else the timm
    /// model name in `args.model` (e.g. `vit_huge_patch16_224` → 16).
    pub fn from_vision_config(vision_config: &Value) -> Result<Self> {
        let args = vision_config.get("args");
        let lookup = |key: &str| {
            vision_config
                .get(key)
                .filter(|v| !v.is_null())
                .or_else(|| args.and_then(|a| a.get(key)).filter(|v| !v.is_null()))
        };
        let num_heads = match lookup("num_attention_heads").or_else(|| lookup("num_heads")) {
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => n as usize,
                _ => bail!("vision_config.num_attention_heads is not a positive integer: {v}"),
            },
            None => {
                let name = lookup("model")
                    .or_else(|| lookup("model_name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| {
                        candle_core::Error::Msg(
                            "vision_config has neither `num_attention_heads` nor a timm model \
                             name in `args.model`; cannot tell the RADIO head count"
                                .into(),
                        )
                    })?;
                // Longest prefix first: "vit_gigantic" before "vit_giant".
                let mut families = TIMM_HEADS.to_vec();
                families.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
                match families.iter().find(|(p, _)| name.starts_with(p)) {
                    Some(&(_, heads)) => heads,
                    None => bail!(
                        "vision_config model `{name}` is not a known timm ViT; \
                         set vision_config.num_attention_heads"
                    ),
                }
            }
        };
        let layer_norm_eps = lookup("layer_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6);
        Ok(RadioConfig {
            num_heads,
            layer_norm_eps,
        })
    }
}

struct Attention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    head_dim: usize,
    /// BF16 products for QKᵀ and PV on CPU (the layers' [`CpuMatmul`] mode, where the CPU
    /// has the BF16 dot products).
    bf16: bool,
}

impl Attention {
    fn new(hidden: usize, num_heads: usize, vb: VarBuilder) -> Result<Self> {
        if !hidden.is_multiple_of(num_heads) {
            bail!("RADIO hidden size {hidden} is not divisible by {num_heads} heads");
        }
        Ok(Attention {
            qkv: Linear::new(hidden, 3 * hidden, true, vb.pp("qkv"))?,
            proj: Linear::new(hidden, hidden, true, vb.pp("proj"))?,
            num_heads,
            head_dim: hidden / num_heads,
            bf16: CpuMatmul::current() == CpuMatmul::Bf16 && bf16_gemm::available(),
        })
    }

    /// `residual + proj(attention(x))`, bidirectional within each tile: `[n, L, hidden]`.
    fn forward_add(&self, x: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let (n, l, hidden) = x.dims3()?;
        // qkv rows are q | k | v, each head-major.
        let qkv = self.qkv.forward(x)?; // [n, L, 3·hidden]
        let scale = (self.head_dim as f64).powf(-0.5);
        let (storage, layout) = qkv.storage_and_layout();
        let out =
            if let (Storage::Cpu(CpuStorage::F32(data)), true) = (&*storage, qkv.is_contiguous()) {
                let data = &data[layout.start_offset()..][..n * l * 3 * hidden];
                let dims = (n, l, self.num_heads, self.head_dim);
                let out = match self.bf16 {
                    true => attention_cpu_bf16(data, dims, scale as f32),
                    false => attention_cpu(data, n, l, self.num_heads, self.head_dim, scale as f32),
                };
                Tensor::from_vec(out, (n, l, hidden), qkv.device())?
            } else {
                drop(storage);
                // [n, L, 3, heads, hd] → [3, n, heads, L, hd].
                let qkv = qkv
                    .reshape((n, l, 3, self.num_heads, self.head_dim))?
                    .permute((2, 0, 3, 1, 4))?;
                let k = qkv.get(1)?.contiguous()?;
                let v = qkv.get(2)?.contiguous()?;
                let attn = if qkv.device().is_cuda() && kernels::fused_enabled() {
                    // The scale inside the softmax kernel: no pass over q, one over the scores.
                    let raw = qkv.get(0)?.contiguous()?.matmul(&k.t()?)?; // [n, heads, L, L]
                    let rows = n * self.num_heads * l;
                    kernels::scaled_softmax(&raw.reshape((rows, l))?, scale as f32, None)?
                        .reshape((n, self.num_heads, l, l))?
                } else {
                    let q = (qkv.get(0)?.contiguous()? * scale)?;
                    candle_nn::ops::softmax_last_dim(&q.matmul(&k.t()?)?)? // [n, heads, L, L]
                };
                attn.matmul(&v)?.transpose(1, 2)?.reshape((n, l, hidden))?
            };
        self.proj.forward_add(&out, residual)
    }
}

/// Query rows per attention work item: bounds the per-thread score scratch (~400 KB for a
/// 1032-token tile, within L2).
const QUERY_BLOCK: usize = 96;

/// Softmax attention straight from the fused qkv rows `[n, L, 3·heads·hd]` (no q/k/v
/// copies): work items are (tile, head, query block), each two single-threaded gemms with
/// the softmax in between, on candle's CPU pool. Returns `[n, L, heads·hd]`.
fn attention_cpu(qkv: &[f32], n: usize, l: usize, heads: usize, hd: usize, scale: f32) -> Vec<f32> {
    let hidden = heads * hd;
    let row = 3 * hidden;
    assert_eq!(qkv.len(), n * l * row);
    for_query_blocks((n, l, heads, hd), |b, s, o| {
        let base = b.tile * l * row + b.head * hd;
        let (q, k, v) = (
            &qkv[base + b.r0 * row..],
            &qkv[base + hidden..],
            &qkv[base + 2 * hidden..],
        );
        // SAFETY (both gemms): every operand lies inside `qkv` (tile < n, head < heads,
        // r0 + rows <= l), `s` holds rows·l floats, and `o` is this item's own output block.
        unsafe {
            // s [rows, L] = scale · q [rows, hd] · kᵀ [hd, L]
            let (sp, dims) = (s.as_mut_ptr(), (b.rows, l, hd));
            gemm_rows(dims, sp, l, q.as_ptr(), row, k.as_ptr(), (1, row), scale);
        }
        for r in s.chunks_exact_mut(l) {
            softmax_in_place(r, 1.0);
        }
        // out [rows, hd] = s [rows, L] · v [L, hd]
        let (dims, vs) = ((b.rows, hd, l), (row, 1));
        unsafe { gemm_rows(dims, o, hidden, s.as_ptr(), l, v.as_ptr(), vs, 1.0) };
    })
}

/// One attention work item: query rows `r0..r0 + rows` of head `head` of tile `tile`.
#[derive(Clone, Copy)]
struct QueryBlock {
    tile: usize,
    head: usize,
    r0: usize,
    rows: usize,
}

/// Runs `item` for every (tile, head, query block) on candle's CPU pool, with the thread's
/// score scratch (rows·L floats) and a pointer to the block's output: rows r0.., columns
/// head·hd.. of tile `tile` of the returned `[n, L, heads·hd]`, rows heads·hd apart.
/// Items write only their own output block.
fn for_query_blocks(
    (n, l, heads, hd): (usize, usize, usize, usize),
    item: impl Fn(QueryBlock, &mut [f32], *mut f32) + Sync,
) -> Vec<f32> {
    let hidden = heads * hd;
    let blocks = l.div_ceil(QUERY_BLOCK);
    let qb = l.div_ceil(blocks);
    let mut out = vec![0f32; n * l * hidden];
    let dst = OutPtr(out.as_mut_ptr());
    par_ranges(n * heads * blocks, n * heads * l * l * hd, |items| {
        SCORES.with_borrow_mut(|s| {
            s.resize(qb * l, 0.0);
            for i in items {
                let (unit, r0) = (i / blocks, (i % blocks) * qb);
                let b = QueryBlock {
                    tile: unit / heads,
                    head: unit % heads,
                    r0,
                    rows: qb.min(l - r0),
                };
                let o = dst.at((b.tile * l + r0) * hidden + b.head * hd);
                item(b, &mut s[..b.rows * l], o);
            }
        })
    });
    out
}

/// Pre-LN timm block: `x += attn(norm1(x)); x += fc2(gelu(fc1(norm2(x))))`.
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn new(hidden: usize, mlp: usize, cfg: &RadioConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Block {
            norm1: LayerNorm::new(hidden, cfg.layer_norm_eps, vb.pp("norm1"))?,
            attn: Attention::new(hidden, cfg.num_heads, vb.pp("attn"))?,
            norm2: LayerNorm::new(hidden, cfg.layer_norm_eps, vb.pp("norm2"))?,
            fc1: Linear::new(hidden, mlp, true, vb.pp("mlp.fc1"))?,
            fc2: Linear::new(mlp, hidden, true, vb.pp("mlp.fc2"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Bias, GELU and the residual adds happen inside the linear layers.
        let x = self.attn.forward_add(&self.norm1.forward(x)?, x)?;
        let h = self
            .fc1
            .forward_act_bf16_out(&self.norm2.forward(&x)?, Activation::GeluErf)?;
        self.fc2.forward_add(&h, &x)
    }
}

/// The RADIO vision encoder.
pub struct RadioEncoder {
    embedder: Linear,
    /// `[G·G, hidden]`, the checkpoint's position grid, row-major (kept as stored when
    /// that is BF16: it is only read to build `pos_cache`); None once released.
    pos_embed: Option<Tensor>,
    /// The compute dtype.
    dtype: DType,
    /// `[P, hidden]` cls + register tokens.
    prefix_tokens: Tensor,
    blocks: Vec<Block>,
    patch_size: usize,
    pos_grid: usize,
    hidden: usize,
    /// Interpolated position embeddings `[1, h·w, hidden]` by patch grid (h, w).
    pos_cache: RwLock<HashMap<(usize, usize), Tensor>>,
}

impl RadioEncoder {
    /// Loads from `vb` pointing at [`RADIO_PREFIX`], and precomputes the
    /// position embeddings for square tiles of each size in `tile_sizes` (px).
    pub fn load(cfg: &RadioConfig, vb: VarBuilder, tile_sizes: &[usize]) -> Result<Self> {
        let pg = vb.pp("patch_generator");
        let shape_of =
            |name: &str| -> Result<Vec<usize>> { Ok(pg.get_unchecked(name)?.dims().to_vec()) };

        let emb = shape_of("embedder.weight")?; // [hidden, 3·p·p]
        let (hidden, patch_dim) = match emb[..] {
            [h, d] => (h, d),
            _ => {
                bail!("patch_generator.embedder.weight has shape {emb:?}, expected [hidden, 3·p·p]")
            }
        };
        let patch_size = ((patch_dim / 3) as f64).sqrt().round() as usize;
        if 3 * patch_size * patch_size != patch_dim {
            bail!("patch_generator.embedder.weight width {patch_dim} is not 3·p·p");
        }
        let embedder = Linear::new(patch_dim, hidden, false, pg.pp("embedder"))?;

        let pos_embed = load_compact(&pg, "pos_embed", None)?;
        let pos = pos_embed.dims().to_vec(); // [1, G·G, hidden]
        let pos_grid = match pos[..] {
            [1, gg, h] if h == hidden => (gg as f64).sqrt().round() as usize,
            _ => bail!("patch_generator.pos_embed has shape {pos:?}, expected [1, G·G, {hidden}]"),
        };
        if pos_grid * pos_grid != pos[1] {
            bail!(
                "patch_generator.pos_embed has {} positions, not a square grid",
                pos[1]
            );
        }
        let pos_embed = pos_embed.squeeze(0)?;

        let prefix = shape_of("cls_token.token")?; // [P, hidden]
        let num_prefix = match prefix[..] {
            [p, h] if h == hidden => p,
            _ => bail!(
                "patch_generator.cls_token.token has shape {prefix:?}, expected [P, {hidden}]"
            ),
        };
        let prefix_tokens = pg.get((num_prefix, hidden), "cls_token.token")?;

        let mut blocks = Vec::new();
        while vb.contains_tensor(&format!("blocks.{}.norm1.weight", blocks.len())) {
            let bvb = vb.pp(format!("blocks.{}", blocks.len()));
            let mlp = bvb.get_unchecked("mlp.fc1.weight")?.dim(0)?;
            blocks.push(Block::new(hidden, mlp, cfg, bvb)?);
        }
        if blocks.is_empty() {
            bail!("no RADIO blocks found under `{}.blocks.0`", vb.prefix());
        }

        let encoder = RadioEncoder {
            embedder,
            pos_embed: Some(pos_embed),
            dtype: pg.dtype(),
            prefix_tokens,
            blocks,
            patch_size,
            pos_grid,
            hidden,
            pos_cache: RwLock::new(HashMap::new()),
        };
        for &s in tile_sizes {
            encoder.pos_embed_for(s / patch_size, s / patch_size)?;
        }
        Ok(encoder)
    }

    /// Drop the position grid once the embeddings of every tile size the caller will use
    /// are cached (from `load`'s `tile_sizes`): the grid is stored at the maximum
    /// resolution (2048 px: 24 MiB at the mid size, 40 MiB at full size) but one tile
    /// size needs only its interpolated window. Other sizes are refused afterwards.
    pub fn release_position_grid(&mut self) {
        self.pos_embed = None;
    }

    pub fn patch_size(&self) -> usize {
        self.patch_size
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    pub fn num_prefix_tokens(&self) -> usize {
        self.prefix_tokens.dim(0).unwrap_or(0)
    }

    pub fn num_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// `[n, 3, H, W]` normalized tiles → `[n, (H/p)·(W/p), hidden]` patch features
    /// (prefix tokens dropped). Tiles never attend to each other.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        // On CPU: inside candle's warm pool, where gemm finds its worker threads.
        pixels.device().with_context(|| self.forward_inner(pixels))
    }

    fn forward_inner(&self, pixels: &Tensor) -> Result<Tensor> {
        let (n, c, height, width) = pixels.dims4()?;
        let p = self.patch_size;
        if c != 3
            || height == 0
            || width == 0
            || !height.is_multiple_of(p)
            || !width.is_multiple_of(p)
        {
            bail!(
                "RADIO input {:?} is not [n, 3, H, W] with H, W multiples of {p}",
                pixels.dims()
            );
        }
        let (h, w) = (height / p, width / p);
        let dtype = self.dtype;

        // im2patches: [n, 3, h·p, w·p] → [n, h·w, 3·p·p], features in (c, yy, xx) order.
        let patches = pixels
            .to_dtype(dtype)?
            .reshape((n, 3, h, p, w, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((n, h * w, 3 * p * p))?;
        let x = self
            .embedder
            .forward(&patches)?
            .broadcast_add(&self.pos_embed_for(h, w)?)?;

        let num_prefix = self.num_prefix_tokens();
        let prefix = self
            .prefix_tokens
            .unsqueeze(0)?
            .broadcast_as((n, num_prefix, self.hidden))?;
        let mut x = Tensor::cat(&[&prefix, &x], 1)?; // [n, P + h·w, hidden]
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        x.narrow(1, num_prefix, h * w)
    }

    /// Position embeddings `[1, h·w, hidden]` for an h×w patch grid, cached.
    fn pos_embed_for(&self, h: usize, w: usize) -> Result<Tensor> {
        if let Some(t) = self
            .pos_cache
            .read()
            .ok()
            .and_then(|c| c.get(&(h, w)).cloned())
        {
            return Ok(t);
        }
        let Some(pos_embed) = &self.pos_embed else {
            let cached: Vec<_> = self
                .pos_cache
                .read()
                .map(|c| c.keys().copied().collect())
                .unwrap_or_default();
            bail!(
                "RADIO: no position embeddings for a {h}×{w} patch grid (this encoder keeps \
                 only {cached:?})"
            );
        };
        let (g, hidden) = (self.pos_grid, self.hidden);
        // Read the grid where it is, in its stored dtype: converting all of it to f32 would
        // briefly take more memory than the whole vision encoder's weights.
        let grid = pos_embed.to_device(&Device::Cpu)?.contiguous()?;
        let data = {
            let (storage, layout) = grid.storage_and_layout();
            let n = g * g * hidden;
            match &*storage {
                Storage::Cpu(CpuStorage::F32(v)) => {
                    cpe_position_embeddings(&v[layout.start_offset()..][..n], g, hidden, h, w)
                }
                Storage::Cpu(CpuStorage::BF16(v)) => {
                    cpe_position_embeddings(&v[layout.start_offset()..][..n], g, hidden, h, w)
                }
                _ => {
                    drop(storage);
                    let v: Vec<f32> = grid.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                    cpe_position_embeddings(&v, g, hidden, h, w)
                }
            }
        };
        let t = Tensor::from_vec(data, (1, h * w, self.hidden), &Device::Cpu)?
            .to_dtype(self.dtype)?
            .to_device(pos_embed.device())?;
        if let Ok(mut cache) = self.pos_cache.write() {
            cache.insert((h, w), t.clone());
        }
        Ok(t)
    }
}

/// RADIO's CPE at inference: bilinearly resize the G×G grid (channels last,
/// `[G·G, hidden]`) to m×m with m = max(h, w), as torch
/// `F.interpolate(mode="bilinear", align_corners=False)` does, then keep the
/// top-left h×w window. Returns `[h·w, hidden]` row-major.
fn cpe_position_embeddings<T: Copy>(
    grid: &[T],
    g: usize,
    hidden: usize,
    h: usize,
    w: usize,
) -> Vec<f32>
where
    f32: From<T>,
{
    let m = h.max(w);
    let taps = bilinear_taps(g, m);
    let mut out = vec![0.0f32; h * w * hidden];
    for y in 0..h {
        let (y0, y1, ly0, ly1) = taps[y];
        for x in 0..w {
            let (x0, x1, lx0, lx1) = taps[x];
            let row =
                |yy: usize, xx: usize| &grid[(yy * g + xx) * hidden..(yy * g + xx + 1) * hidden];
            let (a, b, c, d) = (row(y0, x0), row(y0, x1), row(y1, x0), row(y1, x1));
            let dst = &mut out[(y * w + x) * hidden..(y * w + x + 1) * hidden];
            for k in 0..hidden {
                // torch's order: height weights outside, width weights inside.
                let (a, b, c, d) = (
                    f32::from(a[k]),
                    f32::from(b[k]),
                    f32::from(c[k]),
                    f32::from(d[k]),
                );
                dst[k] = ly0 * (lx0 * a + lx1 * b) + ly1 * (lx0 * c + lx1 * d);
            }
        }
    }
    out
}

/// Per output index: (i0, i1, λ0, λ1) of torch's linear interpolation with
/// align_corners=False (source index clamped at 0, computed in f32).
fn bilinear_taps(in_size: usize, out_size: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(in_size - 1);
            let i1 = (i0 + 1).min(in_size - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// [`attention_cpu`] with BF16 operands ([`bf16_gemm`]), as a BF16 GPU attention rounds
/// them: q, k and v rounded to BF16, f32 scores, the softmax numerators rounded to BF16 for
/// PV and the f32 row sums applied after it. Each (tile, head)'s keys and values are packed
/// once, then work items are (tile, head, query block). `dims` = (tiles, L, heads, head dim).
fn attention_cpu_bf16(
    qkv: &[f32],
    (n, l, heads, hd): (usize, usize, usize, usize),
    scale: f32,
) -> Vec<f32> {
    let hidden = heads * hd;
    let row = 3 * hidden;
    assert_eq!(qkv.len(), n * l * row);
    let base = |tile: usize, head: usize| tile * l * row + head * hd;
    let packed: Vec<(PackedB, PackedB)> = par_map(n * heads, n * heads * l * hd, |u| {
        let b = base(u / heads, u % heads);
        (
            PackedB::from_f32_rows(&qkv[b + hidden..], row, l, hd),
            PackedB::from_f32_cols(&qkv[b + 2 * hidden..], row, l, hd),
        )
    });
    for_query_blocks((n, l, heads, hd), |b, s, o| {
        let (k, v) = &packed[b.tile * heads + b.head];
        let q_rows = &qkv[base(b.tile, b.head) + b.r0 * row..];
        let q = PackedA::from_f32(q_rows, row, b.rows, hd, false);
        // SAFETY (both products): the CPU has the BF16 dot products (`bf16` is only set
        // then); `s` holds rows·l floats; `o` is this item's own output block.
        unsafe { bf16_gemm::gemm(&q, k, s.as_mut_ptr(), l) };
        let mut sums = [0f32; QUERY_BLOCK];
        let p = PackedA::softmax_numerators(s, b.rows, l, scale, &mut sums);
        unsafe { bf16_gemm::gemm(&p, v, o, hidden) };
        for (r, sum) in sums[..b.rows].iter().enumerate() {
            let inv = 1.0 / sum;
            // SAFETY: row r of this item's output block, `hd` floats.
            let row = unsafe { std::slice::from_raw_parts_mut(o.add(r * hidden), hd) };
            row.iter_mut().for_each(|x| *x *= inv);
        }
    })
}

/// `f(0..n)` in parallel on candle's CPU pool (inline when `work` is small), in order.
fn par_map<T: Send>(n: usize, work: usize, f: impl Fn(usize) -> T + Sync) -> Vec<T> {
    let slots: Vec<std::sync::Mutex<Option<T>>> = (0..n).map(|_| Default::default()).collect();
    par_ranges(n, work, |items| {
        for i in items {
            *slots[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(f(i));
        }
    });
    slots
        .into_iter()
        .map(|s| {
            s.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item ran")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn heads_from_config() {
        let explicit = json!({"args": {"model": "vit_huge_patch16_224", "num_attention_heads": 4}});
        assert_eq!(
            RadioConfig::from_vision_config(&explicit)
                .unwrap()
                .num_heads,
            4
        );
        let top = json!({"num_attention_heads": 2});
        assert_eq!(RadioConfig::from_vision_config(&top).unwrap().num_heads, 2);
        for (name, heads) in [
            ("vit_huge_patch16_224", 16),
            ("vit_large_patch16_224", 16),
            ("vit_base_patch16_224", 12),
            ("vit_small_patch14_dinov2", 6),
            ("vit_gigantic_patch14_224", 16),
        ] {
            let cfg = json!({"args": {"model": name}});
            assert_eq!(
                RadioConfig::from_vision_config(&cfg).unwrap().num_heads,
                heads,
                "{name}"
            );
        }
        let cfg =
            RadioConfig::from_vision_config(&json!({"args": {"model": "vit_huge_patch16_224"}}));
        assert_eq!(cfg.unwrap().layer_norm_eps, 1e-6);
        let err = RadioConfig::from_vision_config(&json!({"args": {}})).unwrap_err();
        assert!(err.to_string().contains("head count"), "{err}");
        let err =
            RadioConfig::from_vision_config(&json!({"args": {"model": "resnet50"}})).unwrap_err();
        assert!(err.to_string().contains("resnet50"), "{err}");
    }

    /// 128 → 32 (the real model's 512-px tiles): scale 4, every output is the
    /// mean of source cells 4o+1 and 4o+2 on each axis.
    #[test]
    fn bilinear_downsample_matches_torch_formula() {
        let taps = bilinear_taps(128, 32);
        for (o, &(i0, i1, l0, l1)) in taps.iter().enumerate() {
            assert_eq!((i0, i1), (4 * o + 1, 4 * o + 2));
            assert_eq!((l0, l1), (0.5, 0.5));
        }
        // Upsampling 2 → 4: src = 0.5·(o + 0.5) − 0.5 = −0.25 (clamped to 0), 0.25, 0.75, 1.25.
        let taps = bilinear_taps(2, 4);
        assert_eq!(taps[0], (0, 1, 1.0, 0.0));
        assert_eq!(taps[1], (0, 1, 0.75, 0.25));
        assert_eq!(taps[2], (0, 1, 0.25, 0.75));
        assert_eq!(taps[3], (1, 1, 0.75, 0.25));
        // Same size is the identity.
        let taps = bilinear_taps(8, 8);
        assert!(
            taps.iter()
                .enumerate()
                .all(|(o, t)| t.0 == o && t.2 == 1.0 && t.3 == 0.0)
        );
    }

    #[test]
    fn cpe_crops_top_left_of_square_resize() {
        // G = 4, hidden 1, value = 10·row + col.
        let grid: Vec<f32> = (0..16).map(|i| (10 * (i / 4) + i % 4) as f32).collect();
        let full = cpe_position_embeddings(&grid, 4, 1, 2, 2); // m = 2: scale 2
        // Output (y, x) samples rows/cols 2y+0.5 → mean of 2y and 2y+1.
        assert_eq!(full, vec![5.5, 7.5, 25.5, 27.5]);
        let wide = cpe_position_embeddings(&grid, 4, 1, 1, 2); // m = 2, keep row 0
        assert_eq!(wide, vec![5.5, 7.5]);
    }

    /// Random fused qkv rows `[n, L, 3·heads·hd]` for the attention tests, and the same as
    /// the flat data the CPU attention takes.
    fn random_qkv(n: usize, l: usize, hidden: usize) -> Result<(Tensor, Vec<f32>)> {
        let qkv = Tensor::randn(0f32, 1.0, (n, l, 3 * hidden), &Device::Cpu)?;
        let data = qkv.flatten_all()?.to_vec1()?;
        Ok((qkv, data))
    }

    /// The tensor-op formula: softmax(scale · q·kᵀ) [n, heads, L, L] and v [n, heads, L, hd].
    fn formula_probs(qkv: &Tensor, heads: usize, hd: usize) -> Result<(Tensor, Tensor)> {
        let (n, l, _) = qkv.dims3()?;
        let qkv = qkv
            .reshape((n, l, 3, heads, hd))?
            .permute((2, 0, 3, 1, 4))?;
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scale = (hd as f64).powf(-0.5);
        let p = candle_nn::ops::softmax_last_dim(&(q.matmul(&k.t()?)? * scale)?)?;
        Ok((p, v))
    }

    /// p · v back in `[n, L, heads·hd]`.
    fn formula_out(p: &Tensor, v: &Tensor) -> Result<Tensor> {
        let (n, heads, l, hd) = v.dims4()?;
        p.matmul(v)?.transpose(1, 2)?.reshape((n, l, heads * hd))
    }

    /// The fused CPU attention against the plain tensor-op formula, with several query
    /// blocks per head (L > QUERY_BLOCK) and two tiles.
    #[test]
    fn cpu_attention_matches_tensor_ops() -> Result<()> {
        let (n, l, heads, hd) = (2usize, QUERY_BLOCK + 37, 3usize, 8usize);
        let hidden = heads * hd;
        let (qkv, data) = random_qkv(n, l, hidden)?;
        let scale = (hd as f32).powf(-0.5);
        let got = attention_cpu(&data, n, l, heads, hd, scale);
        let got = Tensor::from_vec(got, (n, l, hidden), &Device::Cpu)?;
        let (p, v) = formula_probs(&qkv, heads, hd)?;
        let want = formula_out(&p, &v)?;
        let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-5, "max abs error {err}");
        Ok(())
    }

    /// The BF16 CPU attention against the tensor-op formula on BF16-rounded q, k, v and
    /// softmax numerators, with several query blocks, partial key and value panels, two
    /// tiles.
    #[test]
    fn bf16_attention_matches_rounded_formula() -> Result<()> {
        if !bf16_gemm::available() {
            eprintln!("skipped: no AVX-512 BF16 on this CPU");
            return Ok(());
        }
        let (n, l, heads, hd) = (2usize, QUERY_BLOCK + 37, 3usize, 20usize);
        let hidden = heads * hd;
        let (qkv, data) = random_qkv(n, l, hidden)?;
        let scale = (hd as f32).powf(-0.5);
        let got = attention_cpu_bf16(&data, (n, l, heads, hd), scale);
        let got = Tensor::from_vec(got, (n, l, hidden), &Device::Cpu)?;

        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        let (p, v) = formula_probs(&round(&qkv)?, heads, hd)?;
        // As flash attention rounds: the numerators exp(s − max) to BF16 for PV, the f32
        // row sums (of the unrounded numerators) applied after.
        let max = p.max_keepdim(3)?;
        let numerators = p.broadcast_div(&max)?;
        let sums = numerators.sum_keepdim(3)?;
        let want = round(&numerators)?.matmul(&v)?.broadcast_div(&sums)?;
        let want = want.transpose(1, 2)?.reshape((n, l, hidden))?;
        let exact = formula_out(&p, &v)?;
        let mean_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.mean_all()?.to_scalar::<f32>()
        };
        // A probability whose f32 value here and in the formula straddles a BF16 rounding
        // boundary differs by one BF16 step: rare, so the mean error stays at f32 level.
        let err = mean_diff(&got, &want)?;
        let off = mean_diff(&got, &exact)?;
        assert!(err < 1e-6, "mean abs error {err} against rounded operands");
        assert!(
            off > 20.0 * err,
            "the probabilities were not rounded ({off})"
        );
        Ok(())
    }

    #[test]
    fn encoder_can_be_shared_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RadioEncoder>();
    }

    /// A random tiny model: output shape, prefix dropping, and tile independence.
    #[test]
    fn forward_shapes_and_tile_independence() -> Result<()> {
        let dev = Device::Cpu;
        let (hidden, p, g, prefix, mlp) = (8usize, 2usize, 4usize, 3usize, 16usize);
        let mut ts = HashMap::new();
        let r = |shape: &[usize], seed: u64| -> Result<Tensor> {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|i| (((i as u64 + 1) * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5)
                .collect();
            Tensor::from_vec(v, shape, &dev)
        };
        ts.insert(
            "patch_generator.embedder.weight".into(),
            r(&[hidden, 3 * p * p], 1)?,
        );
        ts.insert(
            "patch_generator.pos_embed".into(),
            r(&[1, g * g, hidden], 2)?,
        );
        ts.insert(
            "patch_generator.cls_token.token".into(),
            r(&[prefix, hidden], 3)?,
        );
        for b in 0..2 {
            let pre = format!("blocks.{b}.");
            for (name, shape) in [
                ("norm1.weight", vec![hidden]),
                ("norm1.bias", vec![hidden]),
                ("norm2.weight", vec![hidden]),
                ("norm2.bias", vec![hidden]),
                ("attn.qkv.weight", vec![3 * hidden, hidden]),
                ("attn.qkv.bias", vec![3 * hidden]),
                ("attn.proj.weight", vec![hidden, hidden]),
                ("attn.proj.bias", vec![hidden]),
                ("mlp.fc1.weight", vec![mlp, hidden]),
                ("mlp.fc1.bias", vec![mlp]),
                ("mlp.fc2.weight", vec![hidden, mlp]),
                ("mlp.fc2.bias", vec![hidden]),
            ] {
                ts.insert(format!("{pre}{name}"), r(&shape, 10 + b as u64)?);
            }
        }
        let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
        let cfg = RadioConfig {
            num_heads: 2,
            layer_norm_eps: 1e-6,
        };
        let enc = RadioEncoder::load(&cfg, vb, &[4])?;
        assert_eq!(
            (enc.patch_size(), enc.num_prefix_tokens(), enc.num_blocks()),
            (p, prefix, 2)
        );

        let tiles = r(&[2, 3, 4, 4], 7)?;
        let out = enc.forward(&tiles)?;
        assert_eq!(out.dims(), &[2, 4, hidden]);
        let single = enc.forward(&tiles.narrow(0, 1, 1)?)?;
        let diff = (out.narrow(0, 1, 1)? - single)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-5, "tile 1 depends on tile 0: {diff}");
        // Non-square grid: 2×3 patches.
        assert_eq!(enc.forward(&r(&[1, 3, 4, 6], 8)?)?.dims(), &[1, 6, hidden]);
        // Without the grid: the cached sizes still run, the same; others are refused.
        let mut enc = enc;
        enc.release_position_grid();
        let again = enc.forward(&tiles)?;
        assert_eq!((again - out)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        assert!(enc.forward(&r(&[1, 3, 8, 8], 8)?).is_err());
        Ok(())
    }
}
