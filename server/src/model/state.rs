//! Per-sequence recurrent state of NemotronH: Mamba conv + SSM states and attention KV caches.
//!
//! Design: each sequence owns plain per-layer buffers rather than slots in a shared paged
//! pool. Only 6 of 62 layers keep a KV cache (24 KiB/token in BF16) while the Mamba state has
//! a fixed size per sequence, so fragmentation is small; per-sequence buffers keep the forward
//! pass simple and let the scheduler add/drop sequences freely. A paged KV pool (and a slot
//! pool for the Mamba states, for batched CUDA kernels) can replace these without changing
//! `NemotronH::forward`'s contract.

use candle_core::{DType, Device, Result, Tensor};

/// Mamba2 layer state.
#[derive(Debug, Clone)]
pub struct MambaState {
    /// The last K−1 pre-conv `xBC` inputs, oldest first: [K−1, conv_dim] f32 (token-major,
    /// the layout of the in_proj output, so the conv is K row-shifted multiply-adds).
    pub conv: Tensor,
    /// SSM state [heads, head_dim, state] f32.
    pub ssm: Tensor,
}

impl MambaState {
    pub fn zeros(
        conv_kernel: usize,
        conv_dim: usize,
        heads: usize,
        head_dim: usize,
        state: usize,
        dev: &Device,
    ) -> Result<Self> {
        Ok(MambaState {
            conv: Tensor::zeros((conv_kernel - 1, conv_dim), DType::F32, dev)?,
            ssm: Tensor::zeros((heads, head_dim, state), DType::F32, dev)?,
        })
    }

    /// The conv state as [conv_dim, K−1] (vLLM's layout, used by the golden fixtures).
    pub fn conv_channels_major(&self) -> Result<Tensor> {
        self.conv.t()?.contiguous()
    }
}

/// Growable K/V buffers of one attention layer: [kv_heads, capacity, head_dim], of which the
/// first `len` positions are valid. Appends write in place; the capacity doubles when full.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `k`, `v` [kv_heads, n, head_dim]; returns the valid K, V [kv_heads, len, head_dim].
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kv_heads, n, head_dim) = k.dims3()?;
        let cap = self.k.as_ref().map(|t| t.dim(1)).transpose()?.unwrap_or(0);
        let need = self.len + n;
        if need > cap {
            let new_cap = need.max(2 * cap).max(16);
            let grow = |old: &Option<Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((kv_heads, new_cap, head_dim), k.dtype(), k.device())?;
                if let Some(old) = old
                    && self.len > 0
                {
                    buf.slice_set(&old.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                Ok(buf)
            };
            self.k = Some(grow(&self.k)?);
            self.v = Some(grow(&self.v)?);
        }
        let (kb, vb) = match (&self.k, &self.v) {
            (Some(kb), Some(vb)) => (kb, vb),
            _ => candle_core::bail!("kv cache buffers missing"),
        };
        kb.slice_set(&k.contiguous()?, 1, self.len)?;
        vb.slice_set(&v.contiguous()?, 1, self.len)?;
        self.len = need;
        Ok((kb.narrow(1, 0, need)?, vb.narrow(1, 0, need)?))
    }
}

/// Concatenate along dim 0 without copying a lone tensor.
pub(crate) fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    match parts.len() {
        0 => candle_core::bail!("cat_rows: nothing to concatenate"),
        1 => Ok(parts.swap_remove(0)),
        _ => Tensor::cat(&parts, 0),
    }
}

/// One layer's state.
#[derive(Debug, Clone)]
pub enum LayerState {
    Mamba(MambaState),
    Attention(KvCache),
    /// MLP layers keep nothing.
    None,
}

/// Everything a sequence carries between forward calls. Create with `NemotronH::new_state`.
#[derive(Debug, Clone)]
pub struct SequenceState {
    pub layers: Vec<LayerState>,
    /// Tokens processed so far.
    pub len: usize,
}

impl SequenceState {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn mamba(&self, layer: usize) -> Option<&MambaState> {
        match self.layers.get(layer) {
            Some(LayerState::Mamba(m)) => Some(m),
            _ => None,
        }
    }

    pub fn kv_cache(&self, layer: usize) -> Option<&KvCache> {
        match self.layers.get(layer) {
            Some(LayerState::Attention(c)) => Some(c),
            _ => None,
        }
    }
}
