//! Pixel shuffle (ps_version v2) and the `mlp1` projector, model.md §4:
//! ViT patch features → LLM-space embeddings, `tokens_per_tile` per tile.

use candle_core::{D, DType, Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::linear::{Activation, Linear};

/// The checkpoint prefix of the weights [`Projector::load`] expects.
pub const PROJECTOR_PREFIX: &str = "mlp1";

/// Merges each r×r block of patch features into one token, r = 1/downsample_ratio:
/// `[n, h·w, c]` (row-major h×w grid) → `[n, (h/r)·(w/r), r·r·c]` with
///
/// `out[i, j] = concat_{di, dj} F[r·i + di, r·j + dj]` (di outer, dj inner),
///
/// which is what InternVL's v2 view/permute sequence computes; for r = 2:
/// `concat(F[2i,2j], F[2i,2j+1], F[2i+1,2j], F[2i+1,2j+1])`.
pub fn pixel_shuffle(x: &Tensor, (h, w): (usize, usize), downsample_ratio: f64) -> Result<Tensor> {
    let (n, l, c) = x.dims3()?;
    let r = (1.0 / downsample_ratio).round() as usize;
    if r == 0 || ((r as f64) * downsample_ratio - 1.0).abs() > 1e-6 {
        bail!("pixel_shuffle: downsample_ratio {downsample_ratio} is not 1/r for an integer r");
    }
    if l != h * w || !h.is_multiple_of(r) || !w.is_multiple_of(r) {
        bail!("pixel_shuffle: {l} tokens are not a {h}x{w} grid divisible by {r}");
    }
    // [n, h/r, di, w/r, dj, c] → [n, h/r, w/r, di, dj, c]
    x.reshape((n, h / r, r, w / r, r, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((n, (h / r) * (w / r), r * r * c))
}

/// `mlp1`: RMSNorm (eps 1e-5, in f32) → Linear → ReLU² → Linear, no biases.
pub struct Projector {
    norm_weight: Tensor,
    eps: f64,
    fc1: Linear,
    fc2: Linear,
}

impl Projector {
    /// Loads `mlp1.0.weight`, `mlp1.1.weight`, `mlp1.3.weight` from `vb`
    /// pointing at [`PROJECTOR_PREFIX`]; sizes come from the tensors.
    pub fn load(vb: VarBuilder) -> Result<Self> {
        let w1 = vb.get_unchecked("1.weight")?; // [mid, in]
        let w3 = vb.get_unchecked("3.weight")?; // [out, mid]
        let ((mid, input), (out, mid3)) = (w1.dims2()?, w3.dims2()?);
        if mid != mid3 {
            bail!(
                "mlp1.1.weight {:?} and mlp1.3.weight {:?} do not chain",
                w1.dims(),
                w3.dims()
            );
        }
        Ok(Projector {
            norm_weight: vb.get(input, "0.weight")?,
            eps: 1e-5,
            fc1: Linear::new(input, mid, false, vb.pp("1"))?,
            fc2: Linear::new(mid, out, false, vb.pp("3"))?,
        })
    }

    /// Input width (r·r·vit_hidden).
    pub fn input_size(&self) -> usize {
        self.norm_weight.dims1().unwrap_or(0)
    }

    /// `[n, tokens, in]` → `[n, tokens, llm_hidden]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.device().with_context(|| {
            let h = self
                .fc1
                .forward_act_bf16_out(&self.norm(x)?, Activation::Relu2)?;
            self.fc2.forward(&h)
        })
    }

    /// RMSNorm as HF: normalize in f32, cast back, then scale.
    fn norm(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = self.norm_weight.dtype();
        if dtype == DType::F32 && x.dtype() == DType::F32 {
            // One fused pass (f32 throughout, so the cast is a no-op).
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.norm_weight, self.eps as f32);
        }
        let xf = x.to_dtype(DType::F32)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        xf.broadcast_div(&rms)?
            .to_dtype(dtype)?
            .broadcast_mul(&self.norm_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    /// The reshape/permute against the explicit formula, for r = 2 and r = 3,
    /// non-square grids included.
    #[test]
    fn pixel_shuffle_matches_formula() -> Result<()> {
        for (h, w, r, c) in [
            (4usize, 4usize, 2usize, 3usize),
            (4, 6, 2, 2),
            (6, 3, 3, 2),
            (32, 32, 2, 5),
        ] {
            let n = 2;
            let data: Vec<f32> = (0..n * h * w * c).map(|i| i as f32).collect();
            let x = Tensor::from_vec(data.clone(), (n, h * w, c), &Device::Cpu)?;
            let y = pixel_shuffle(&x, (h, w), 1.0 / r as f64)?;
            assert_eq!(y.dims(), &[n, (h / r) * (w / r), r * r * c]);
            let y: Vec<Vec<Vec<f32>>> = y.to_vec3()?;
            let f = |b: usize, row: usize, col: usize| &data[((b * h + row) * w + col) * c..][..c];
            for (b, tokens) in y.iter().enumerate() {
                for (t, token) in tokens.iter().enumerate() {
                    let (i, j) = (t / (w / r), t % (w / r));
                    let want: Vec<f32> = (0..r)
                        .flat_map(|di| (0..r).map(move |dj| (di, dj)))
                        .flat_map(|(di, dj)| f(b, r * i + di, r * j + dj).to_vec())
                        .collect();
                    assert_eq!(token, &want, "h{h} w{w} r{r} ({i},{j})");
                }
            }
        }
        Ok(())
    }

    /// r = 2 spelled out as in model.md §4.1.
    #[test]
    fn pixel_shuffle_v2_order() -> Result<()> {
        // 2×2 grid of 1-wide features F[r, c] = 10r + c.
        let x = Tensor::new(&[[[0f32], [1.], [10.], [11.]]], &Device::Cpu)?;
        let y: Vec<Vec<Vec<f32>>> = pixel_shuffle(&x, (2, 2), 0.5)?.to_vec3()?;
        assert_eq!(y, vec![vec![vec![0., 1., 10., 11.]]]);
        assert!(pixel_shuffle(&x, (2, 2), 0.3).is_err());
        assert!(pixel_shuffle(&x, (1, 4), 0.5).is_err());
        Ok(())
    }

    #[test]
    fn projector_matches_reference_math() -> Result<()> {
        let dev = Device::Cpu;
        let (input, mid, out) = (4usize, 6usize, 3usize);
        let v = |n: usize, k: f32| -> Vec<f32> { (0..n).map(|i| (i as f32 * k).sin()).collect() };
        let mut ts = HashMap::new();
        ts.insert(
            "0.weight".to_string(),
            Tensor::from_vec(v(input, 0.7), input, &dev)?,
        );
        ts.insert(
            "1.weight".to_string(),
            Tensor::from_vec(v(mid * input, 1.3), (mid, input), &dev)?,
        );
        ts.insert(
            "3.weight".to_string(),
            Tensor::from_vec(v(out * mid, 0.4), (out, mid), &dev)?,
        );
        let proj = Projector::load(VarBuilder::from_tensors(ts.clone(), DType::F32, &dev))?;
        let x = Tensor::from_vec(v(2 * input, 2.1), (1, 2, input), &dev)?;
        let got: Vec<Vec<f32>> = proj.forward(&x)?.squeeze(0)?.to_vec2()?;

        let (g, w1, w3) = (v(input, 0.7), v(mid * input, 1.3), v(out * mid, 0.4));
        let xs = v(2 * input, 2.1);
        for (t, row) in xs.chunks(input).enumerate() {
            let ms = row.iter().map(|a| a * a).sum::<f32>() / input as f32;
            let nrm: Vec<f32> = row
                .iter()
                .zip(&g)
                .map(|(a, gi)| a / (ms + 1e-5).sqrt() * gi)
                .collect();
            let hid: Vec<f32> = (0..mid)
                .map(|m| {
                    (0..input)
                        .map(|k| w1[m * input + k] * nrm[k])
                        .sum::<f32>()
                        .max(0.0)
                        .powi(2)
                })
                .collect();
            for o in 0..out {
                let want: f32 = (0..mid).map(|m| w3[o * mid + m] * hid[m]).sum();
                assert!(
                    (got[t][o] - want).abs() < 1e-5,
                    "token {t} out {o}: {} vs {want}",
                    got[t][o]
                );
            }
        }
        Ok(())
    }
}
