//! Recurrent state of NemotronH sequences: a [`StatePool`] of Mamba states allocated once,
//! in which a sequence holds one slot from admission to finish, and per-sequence attention
//! KV caches.
//!
//! # Mamba states: one pool, one slot per sequence
//! Per Mamba layer the pool holds a conv window [slots, K−1, conv_dim] and an SSM state
//! [slots, heads, head_dim, state], both f32 (the SSM cache dtype of the checkpoint). A
//! [`SequenceState`] owns a [`Slot`] index into every layer's pool; the slot is zeroed when it
//! is handed out and goes back to the free list the moment the state is dropped (a finished
//! or cancelled request), so the pool never grows and never fragments.
//!
//! The conv window is token-major ([K−1, conv_dim] per slot) rather than vLLM's channel-major
//! [conv_dim, K−1]: each window row has the layout of one in_proj output row, so a decode step
//! shifts whole rows and appends the new row with contiguous copies on CPU, and on a GPU the
//! threads that own neighbouring channels touch neighbouring addresses (coalesced) instead of
//! addresses K−1 floats apart. The golden fixtures' layout is one transpose away
//! ([`MambaState::conv_channels_major`]).
//!
//! # KV caches: per-sequence growable buffers (design note)
//! Only 6 of the 62 layers keep a KV cache: 24 KiB per token in BF16 at full size, against a
//! fixed ~149 MB of Mamba state per sequence (the KV of ~6,300 tokens). A captioning request
//! (1–12 tiles of 256 tokens plus a short answer) holds less KV than Mamba state, so the pool
//! above is where fixed allocation pays off. The KV caches stay per-sequence buffers that
//! double from 16 positions up to a cap the scheduler sets to the tokens it reserved at
//! admission, so a sequence never holds more than its reservation and growth costs under one
//! extra copy per token. A paged KV pool would avoid that over-allocation and allow prefix
//! sharing, but it only pays with an attention kernel that reads the pages in place: with
//! candle ops every decode step would first gather all of a sequence's pages, copying its
//! whole cache each step. A paged pool can replace [`KvCache`] behind the same
//! `NemotronH::forward` contract once such a kernel exists.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};

use super::mamba2::MambaDims;

/// One sequence's Mamba state of one layer, outside the pool: what a prefill works on (copied
/// out of the slot and written back) and what tests inspect.
#[derive(Debug, Clone)]
pub struct MambaState {
    /// The last K−1 pre-conv `xBC` inputs, oldest first: [K−1, conv_dim] f32 (token-major,
    /// the layout of the in_proj output, so the conv is K row-shifted multiply-adds).
    pub conv: Tensor,
    /// SSM state [heads, head_dim, state] f32.
    pub ssm: Tensor,
}

impl MambaState {
    /// The conv state as [conv_dim, K−1] (vLLM's layout, used by the golden fixtures).
    pub fn conv_channels_major(&self) -> Result<Tensor> {
        self.conv.t()?.contiguous()
    }
}

/// The Mamba states of one layer for every slot.
#[derive(Debug, Clone)]
pub struct MambaPool {
    /// [slots, K−1, conv_dim] f32, token-major (see the module docs).
    pub conv: Tensor,
    /// [slots, heads, head_dim, state] f32.
    pub ssm: Tensor,
}

impl MambaPool {
    pub fn zeros(slots: usize, d: MambaDims, dev: &Device) -> Result<Self> {
        Ok(MambaPool {
            conv: Tensor::zeros((slots, d.conv_kernel - 1, d.conv_dim()), DType::F32, dev)?,
            ssm: Tensor::zeros((slots, d.heads, d.head_dim, d.state), DType::F32, dev)?,
        })
    }

    pub fn slots(&self) -> usize {
        self.ssm.dims()[0]
    }

    /// A copy of one slot's state (a copy, not a view: the slot changes in place).
    pub fn read(&self, slot: usize) -> Result<MambaState> {
        Ok(MambaState {
            conv: self.conv.get(slot)?.copy()?,
            ssm: self.ssm.get(slot)?.copy()?,
        })
    }

    /// Overwrite one slot's state.
    pub fn write(&self, slot: usize, state: &MambaState) -> Result<()> {
        self.conv
            .slice_set(&state.conv.contiguous()?.unsqueeze(0)?, 0, slot)?;
        self.ssm
            .slice_set(&state.ssm.contiguous()?.unsqueeze(0)?, 0, slot)
    }

    fn zero(&self, slot: usize) -> Result<()> {
        let zeros = |t: &Tensor| Tensor::zeros(&t.dims()[1..], DType::F32, t.device());
        self.write(
            slot,
            &MambaState {
                conv: zeros(&self.conv)?,
                ssm: zeros(&self.ssm)?,
            },
        )
    }
}

/// Growable K/V buffers of one attention layer: [kv_heads, capacity, head_dim], of which the
/// first `len` positions are valid. Appends write in place; the capacity doubles when full,
/// up to `limit` positions when one is set.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    limit: Option<usize>,
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache whose buffers never grow past `positions` (a sequence that needs more still
    /// gets exactly what it needs).
    pub fn with_limit(positions: usize) -> Self {
        KvCache {
            limit: Some(positions),
            ..Self::default()
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions the buffers hold room for.
    pub fn capacity(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[1])
    }

    /// Append `k`, `v` [kv_heads, n, head_dim]; returns the valid K, V [kv_heads, len, head_dim].
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kv_heads, n, head_dim) = k.dims3()?;
        let cap = self.capacity();
        let need = self.len + n;
        if need > cap {
            let grown = need.max(2 * cap).max(16);
            let new_cap = self.limit.map_or(grown, |l| grown.min(l.max(need)));
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

/// How many slots are handed out, shared by the pool, its slots and any observer.
#[derive(Debug)]
struct FreeSlots {
    free: Mutex<Vec<u32>>,
    capacity: usize,
    peak: AtomicUsize,
}

impl FreeSlots {
    fn free_list(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        // The list stays consistent even if a holder panicked: push/pop are single steps.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Slot usage of a [`StatePool`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotUsage {
    pub capacity: usize,
    pub in_use: usize,
    /// Most slots ever in use at once.
    pub peak: usize,
}

/// Reads a pool's [`SlotUsage`] from any thread.
#[derive(Debug, Clone)]
pub struct SlotMonitor(Arc<FreeSlots>);

impl SlotMonitor {
    pub fn usage(&self) -> SlotUsage {
        let free = self.0.free_list().len();
        SlotUsage {
            capacity: self.0.capacity,
            in_use: self.0.capacity - free,
            peak: self.0.peak.load(Ordering::Relaxed),
        }
    }
}

/// A sequence's index into the pool; returned to the free list when dropped.
#[derive(Debug)]
pub struct Slot {
    index: u32,
    owner: Arc<FreeSlots>,
}

impl Slot {
    pub fn index(&self) -> u32 {
        self.index
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.owner.free_list().push(self.index);
    }
}

#[derive(Debug, Clone)]
enum PoolLayer {
    Mamba(MambaPool),
    Attention,
    Stateless,
}

/// What a pool is built from: the kind of each model layer.
#[derive(Debug, Clone, Copy)]
pub enum LayerStateKind {
    Mamba(MambaDims),
    Attention,
    Stateless,
}

/// The Mamba states of up to `slots` sequences, allocated once (see the module docs).
#[derive(Debug)]
pub struct StatePool {
    layers: Vec<PoolLayer>,
    slots: Arc<FreeSlots>,
}

impl StatePool {
    /// Create with `NemotronH::new_pool`.
    pub fn new(layers: &[LayerStateKind], slots: usize, dev: &Device) -> Result<Self> {
        if slots == 0 || slots > u32::MAX as usize {
            candle_core::bail!("state pool: {slots} slots");
        }
        let layers = layers
            .iter()
            .map(|k| {
                Ok(match k {
                    LayerStateKind::Mamba(d) => PoolLayer::Mamba(MambaPool::zeros(slots, *d, dev)?),
                    LayerStateKind::Attention => PoolLayer::Attention,
                    LayerStateKind::Stateless => PoolLayer::Stateless,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(StatePool {
            layers,
            slots: Arc::new(FreeSlots {
                // Popped from the back: slot 0 first.
                free: Mutex::new((0..slots as u32).rev().collect()),
                capacity: slots,
                peak: AtomicUsize::new(0),
            }),
        })
    }

    pub fn capacity(&self) -> usize {
        self.slots.capacity
    }

    pub fn usage(&self) -> SlotUsage {
        self.monitor().usage()
    }

    pub fn monitor(&self) -> SlotMonitor {
        SlotMonitor(Arc::clone(&self.slots))
    }

    /// A fresh sequence in a zeroed slot, or `None` when every slot is taken. `kv_limit`
    /// caps each KV cache's buffers at that many positions (the tokens reserved for it).
    pub fn acquire(&self, kv_limit: Option<usize>) -> Result<Option<SequenceState>> {
        let index = {
            let mut free = self.slots.free_list();
            let Some(index) = free.pop() else {
                return Ok(None);
            };
            let in_use = self.slots.capacity - free.len();
            self.slots.peak.fetch_max(in_use, Ordering::Relaxed);
            index
        };
        // Owned from here on: an error below returns the slot.
        let slot = Slot {
            index,
            owner: Arc::clone(&self.slots),
        };
        for layer in &self.layers {
            if let PoolLayer::Mamba(m) = layer {
                m.zero(index as usize)?;
            }
        }
        let kv = self
            .layers
            .iter()
            .map(|l| match l {
                PoolLayer::Attention => {
                    Some(kv_limit.map_or_else(KvCache::new, KvCache::with_limit))
                }
                _ => None,
            })
            .collect();
        Ok(Some(SequenceState { slot, kv, len: 0 }))
    }

    /// Layer `layer`'s pool, if it is a Mamba layer.
    pub fn mamba(&self, layer: usize) -> Option<&MambaPool> {
        match self.layers.get(layer) {
            Some(PoolLayer::Mamba(m)) => Some(m),
            _ => None,
        }
    }

    /// A copy of a sequence's Mamba state of `layer` (`None`: not a Mamba layer).
    pub fn mamba_state(&self, layer: usize, seq: &SequenceState) -> Result<Option<MambaState>> {
        self.check(seq)?;
        self.mamba(layer)
            .map(|m| m.read(seq.slot.index as usize))
            .transpose()
    }

    /// A new sequence in another slot with a copy of `seq`'s state (tests, speculative use).
    pub fn fork(&self, seq: &SequenceState) -> Result<Option<SequenceState>> {
        self.check(seq)?;
        let Some(mut copy) = self.acquire(None)? else {
            return Ok(None);
        };
        for layer in &self.layers {
            if let PoolLayer::Mamba(m) = layer {
                m.write(copy.slot.index as usize, &m.read(seq.slot.index as usize)?)?;
            }
        }
        copy.kv = seq.kv.clone();
        copy.len = seq.len;
        Ok(Some(copy))
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Fails unless `seq`'s slot was handed out by this pool.
    pub fn check(&self, seq: &SequenceState) -> Result<()> {
        if !Arc::ptr_eq(&seq.slot.owner, &self.slots) {
            candle_core::bail!("a sequence state from another state pool");
        }
        Ok(())
    }
}

/// Everything a sequence carries between forward calls: its pool slot, its KV caches and
/// its length. Create with [`StatePool::acquire`]; dropping it frees the slot.
#[derive(Debug)]
pub struct SequenceState {
    slot: Slot,
    /// Per model layer: the KV cache of attention layers.
    kv: Vec<Option<KvCache>>,
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

    pub fn slot(&self) -> u32 {
        self.slot.index
    }

    pub fn kv_cache(&self, layer: usize) -> Option<&KvCache> {
        self.kv.get(layer).and_then(Option::as_ref)
    }

    pub(crate) fn kv_cache_mut(&mut self, layer: usize) -> Option<&mut KvCache> {
        self.kv.get_mut(layer).and_then(Option::as_mut)
    }

    pub(crate) fn num_layers(&self) -> usize {
        self.kv.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dims() -> MambaDims {
        MambaDims {
            heads: 2,
            head_dim: 3,
            state: 4,
            groups: 1,
            conv_kernel: 4,
            chunk: 8,
        }
    }

    fn pool(slots: usize) -> StatePool {
        let kinds = [
            LayerStateKind::Mamba(dims()),
            LayerStateKind::Attention,
            LayerStateKind::Stateless,
        ];
        StatePool::new(&kinds, slots, &Device::Cpu).unwrap()
    }

    fn abs_sum(t: &Tensor) -> f32 {
        t.abs().unwrap().sum_all().unwrap().to_scalar().unwrap()
    }

    #[test]
    fn slots_are_bounded_freed_on_drop_and_zeroed_on_reuse() -> Result<()> {
        let pool = pool(2);
        let a = pool.acquire(None)?.expect("slot");
        let b = pool.acquire(Some(10))?.expect("slot");
        assert_ne!(a.slot(), b.slot());
        assert!(pool.acquire(None)?.is_none(), "more sequences than slots");
        assert_eq!(
            pool.usage(),
            SlotUsage {
                capacity: 2,
                in_use: 2,
                peak: 2
            }
        );
        assert!(a.kv_cache(1).is_some() && a.kv_cache(0).is_none() && a.kv_cache(2).is_none());
        // Dirty b's slot, drop b: the slot is free at once and comes back zeroed.
        let m = pool.mamba(0).expect("mamba layer");
        let dirty = MambaState {
            conv: Tensor::ones((3, dims().conv_dim()), DType::F32, &Device::Cpu)?,
            ssm: Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu)?,
        };
        m.write(b.slot() as usize, &dirty)?;
        let (slot_b, monitor) = (b.slot(), pool.monitor());
        assert_eq!(abs_sum(&pool.mamba_state(0, &b)?.expect("state").ssm), 24.0);
        drop(b);
        assert_eq!(monitor.usage().in_use, 1);
        let c = pool.acquire(None)?.expect("slot");
        assert_eq!(c.slot(), slot_b, "the freed slot is reused");
        let st = pool.mamba_state(0, &c)?.expect("state");
        assert_eq!(abs_sum(&st.conv) + abs_sum(&st.ssm), 0.0);
        // a's slot was never touched.
        assert_eq!(abs_sum(&pool.mamba_state(0, &a)?.expect("state").ssm), 0.0);
        assert_eq!(monitor.usage().peak, 2);
        // A state from another pool is refused.
        let other = self::pool(1);
        assert!(other.mamba_state(0, &a).is_err());
        Ok(())
    }

    #[test]
    fn kv_cache_growth_stops_at_its_limit() -> Result<()> {
        let dev = Device::Cpu;
        let kv = |n| Tensor::ones((2, n, 4), DType::F32, &dev);
        let mut c = KvCache::with_limit(20);
        c.append(&kv(3)?, &kv(3)?)?;
        assert_eq!(c.capacity(), 16);
        c.append(&kv(14)?, &kv(14)?)?;
        assert_eq!(
            (c.len(), c.capacity()),
            (17, 20),
            "doubling capped at the limit"
        );
        let (k, _) = c.append(&kv(5)?, &kv(5)?)?;
        assert_eq!((c.len(), c.capacity(), k.dims()[1]), (22, 22, 22));
        let mut free = KvCache::new();
        free.append(&kv(17)?, &kv(17)?)?;
        assert_eq!(free.capacity(), 17);
        free.append(&kv(1)?, &kv(1)?)?;
        assert_eq!(free.capacity(), 34);
        Ok(())
    }
}
