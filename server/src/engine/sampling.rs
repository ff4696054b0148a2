//! Per-request sampling parameters and the token sampler.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How to pick the next token. `temperature == 0` means greedy.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    pub top_p: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: None,
        }
    }
}

impl SamplingParams {
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0 || self.top_k == 1
    }

    /// Reject values the sampler cannot honour; names the offending parameter.
    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        Ok(())
    }
}

/// Picks tokens from logits for one request. Seeded requests use their own `StdRng`, so the
/// same seed and logits give the same tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Scratch: (logit, id) candidates.
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_rng(&mut rand::rng()),
        };
        Sampler {
            params,
            rng,
            scratch: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.is_greedy() {
            return argmax(logits);
        }
        let inv_t = 1.0 / self.params.temperature;
        let cands = &mut self.scratch;
        cands.clear();
        cands.extend(
            logits
                .iter()
                .enumerate()
                .filter(|(_, v)| !v.is_nan())
                .map(|(i, &v)| (v * inv_t, i as u32)),
        );
        if cands.is_empty() {
            return argmax(logits);
        }
        let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = self.params.top_k;
        if k > 0 && k < cands.len() {
            cands.select_nth_unstable_by(k - 1, desc);
            cands.truncate(k);
        }
        cands.sort_unstable_by(desc);
        // Softmax over the survivors (stable: subtract the max).
        let max = cands[0].0;
        let mut probs: Vec<f32> = cands.iter().map(|(v, _)| (v - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        // Top-p: the smallest prefix (by descending probability) whose mass reaches top_p.
        let mut keep = probs.len();
        if self.params.top_p < 1.0 {
            let mut acc = 0.0;
            for (i, p) in probs.iter().enumerate() {
                acc += p;
                if acc >= self.params.top_p {
                    keep = i + 1;
                    break;
                }
            }
        }
        let mass: f32 = probs[..keep].iter().sum();
        let mut u = self.rng.random::<f32>() * mass;
        for (i, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return cands[i].1;
            }
            u -= p;
        }
        cands[keep - 1].1
    }
}

/// Index of the largest logit (the first one on ties; NaN never wins).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: Option<u64>) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            top_k,
            seed,
        }
    }

    const LOGITS: [f32; 6] = [0.1, 2.0, -1.0, 1.9, 0.5, f32::NEG_INFINITY];

    #[test]
    fn greedy_is_argmax_and_top_k_1_is_greedy() {
        assert_eq!(Sampler::new(params(0.0, 0, 1.0, None)).sample(&LOGITS), 1);
        let mut s = Sampler::new(params(5.0, 1, 1.0, None));
        for _ in 0..20 {
            assert_eq!(s.sample(&LOGITS), 1);
        }
        assert_eq!(argmax(&[f32::NAN, 1.0, 1.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens() {
        let run = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, Some(seed)));
            (0..50).map(|_| s.sample(&LOGITS)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        // top_k = 2: only ids 1 and 3.
        let mut s = Sampler::new(params(10.0, 2, 1.0, Some(1)));
        for _ in 0..200 {
            assert!(matches!(s.sample(&LOGITS), 1 | 3));
        }
        // p(1) ≈ 0.40, p(3) ≈ 0.37 at T = 1: top_p = 0.5 keeps exactly those two.
        let mut s = Sampler::new(params(1.0, 0, 0.5, Some(2)));
        let mut seen = [0usize; 6];
        for _ in 0..2000 {
            seen[s.sample(&LOGITS) as usize] += 1;
        }
        assert_eq!(seen[0] + seen[2] + seen[4] + seen[5], 0);
        assert!(seen[1] > 800 && seen[3] > 700, "{seen:?}");
        // top_p = 0.3 keeps only the top token.
        let mut s = Sampler::new(params(1.0, 0, 0.3, Some(3)));
        for _ in 0..50 {
            assert_eq!(s.sample(&LOGITS), 1);
        }
        // The never-possible id (−inf) is never drawn, even at high temperature.
        let mut s = Sampler::new(params(100.0, 0, 1.0, Some(4)));
        for _ in 0..500 {
            assert_ne!(s.sample(&LOGITS), 5);
        }
    }
}
