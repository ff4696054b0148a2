//! Launch shapes of the CUDA kernels, chosen on the host from the problem sizes. Plain
//! arithmetic, kept out of the `cuda` module so CPU builds test it too.

/// Variant of `ssm_update_v{V}_n{NI}_*` (ssm_update.cu): each lane of a warp covers NI
/// groups of V consecutive state elements of a row, so NI · 32 · V >= N.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UpdatePlan {
    pub(crate) v: usize,
    pub(crate) ni: usize,
}

impl UpdatePlan {
    /// `pool_offset`: the pool's first element (float4 rows need it 16-byte aligned).
    /// None when N exceeds the instantiated NI (N > 128 · V).
    pub(crate) fn new(n: usize, pool_offset: usize) -> Option<Self> {
        let v = if n.is_multiple_of(4) && pool_offset.is_multiple_of(4) {
            4
        } else {
            1
        };
        let ni = match n.div_ceil(32 * v) {
            0 | 1 => 1,
            2 => 2,
            3 | 4 => 4,
            _ => return None,
        };
        Some(UpdatePlan { v, ni })
    }
}

/// Thread layout of `ssd_scan_e{E}` (ssd_scan.cu): E state elements per thread, S = N / E
/// lanes per state row, R rows of one head per block (blockDim = R · S), TCH tokens staged
/// in shared memory per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ScanPlan {
    pub(crate) e: usize,
    pub(crate) s: usize,
    pub(crate) r: usize,
    pub(crate) tch: usize,
}

impl ScanPlan {
    const MAX_THREADS: usize = 256;
    /// Static limit of dynamic shared memory without an opt-in attribute.
    const MAX_SMEM: usize = 48 * 1024;
    const MAX_TCH: usize = 64;

    /// None when no instantiated E fits: S = N / E must be a power of two <= 32 (the lanes
    /// of a row form an aligned group inside one warp).
    #[cfg(test)]
    pub(crate) fn new(p: usize, n: usize) -> Option<Self> {
        Self::with_e(p, n, None)
    }

    /// The plan with E = `prefer` when that is an instantiated E that fits, else the first
    /// that fits in the order 16, 32, 8, 4, 2, 1. E = 16 first: at the full size (N = 128,
    /// L = 3300 on an H100) it ran 2.81 ms against 3.16 ms for E = 32 and 4.20 ms for E = 8
    /// (kernel_check): twice the blocks of E = 32, so one wave fills the GPU, and half the
    /// serial chain of the y reduction per thread.
    pub(crate) fn with_e(p: usize, n: usize, prefer: Option<usize>) -> Option<Self> {
        const ES: [usize; 6] = [16, 32, 8, 4, 2, 1];
        let fits = |e: usize| n.is_multiple_of(e) && (n / e).is_power_of_two() && n / e <= 32;
        let e = prefer
            .filter(|e| ES.contains(e) && fits(*e))
            .or_else(|| ES.into_iter().find(|&e| fits(e)))?;
        let s = n / e;
        // Rows per block: the largest divisor of P that keeps the block within MAX_THREADS.
        let r = (1..=p)
            .rev()
            .find(|&r| p.is_multiple_of(r) && r * s <= Self::MAX_THREADS)?;
        let tch = (Self::MAX_SMEM / (4 * Self::floats_per_token(e, s, r))).min(Self::MAX_TCH);
        (tch > 0).then_some(ScanPlan { e, s, r, tch })
    }

    /// Shared memory per staged token, as ssd_scan.cu lays it out: B and C rows in padded
    /// segments (E + 4 floats when E % 4 == 0, else E + 1), dt·x and y for R rows, exp(dt·a).
    fn floats_per_token(e: usize, s: usize, r: usize) -> usize {
        let seg = if e.is_multiple_of(4) { e + 4 } else { e + 1 };
        2 * s * seg + 2 * r + 1
    }

    pub(crate) fn smem_bytes(&self) -> usize {
        4 * self.tch * Self::floats_per_token(self.e, self.s, self.r)
    }
}
