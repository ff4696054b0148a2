//! Borrowing tensor data for the kernels: storage locks, aliasing checks, CPU row views.

use candle_core::{CpuStorage, DType, Layout, Result, Storage, StorageRef, Tensor, bail};
use half::bf16;

/// Identity of a tensor's storage allocation (views of one buffer share it). Taken under a
/// short read lock: the storage lives in a heap `RwLock` that never moves.
pub(crate) fn storage_id(t: &Tensor) -> usize {
    let (guard, _) = t.storage_and_layout();
    std::ptr::from_ref::<Storage>(&guard) as usize
}

/// Errors when an input shares storage with the pool written in place: the op would read
/// while candle holds the pool's write lock (a deadlock), and the result would be undefined.
pub(crate) fn ensure_not_aliased(name: &str, pool: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    let pool_id = storage_id(pool);
    if inputs.iter().any(|t| storage_id(t) == pool_id) {
        bail!("{name}: an input shares storage with the state pool");
    }
    Ok(())
}

/// All devices equal to the first tensor's.
pub(crate) fn ensure_same_device(name: &str, ts: &[&Tensor]) -> Result<()> {
    if let Some((first, rest)) = ts.split_first()
        && let Some(t) = rest
            .iter()
            .find(|t| !t.device().same_device(first.device()))
    {
        bail!(
            "{name}: tensors on different devices ({:?} and {:?})",
            first.device().location(),
            t.device().location()
        );
    }
    Ok(())
}

pub(crate) fn ensure_dtype(name: &str, what: &str, t: &Tensor, allowed: &[DType]) -> Result<()> {
    if !allowed.contains(&t.dtype()) {
        bail!(
            "{name}: {what} has dtype {:?}, expected one of {allowed:?}",
            t.dtype()
        );
    }
    Ok(())
}

pub(crate) fn ensure_dims(name: &str, what: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        bail!("{name}: {what} has shape {:?}, expected {want:?}", t.dims());
    }
    Ok(())
}

/// `t` itself when its innermost dimension has unit stride (rows may be strided, as for a
/// column slice), otherwise a contiguous copy. The kernels index `row * stride + col`.
pub(crate) fn unit_inner(t: &Tensor) -> Result<Tensor> {
    let unit = match (t.dims().last(), t.stride().last()) {
        (Some(&n), Some(&s)) => s == 1 || n <= 1,
        _ => true,
    };
    // Outer strides must also be uniform per dimension, which candle layouts always are.
    if unit { Ok(t.clone()) } else { t.contiguous() }
}

/// Read locks on several tensors' storages, one lock per distinct storage (parking_lot read
/// locks are not re-entrant when a writer queues in between).
pub(crate) struct Locked<'a> {
    tensors: Vec<&'a Tensor>,
    guard_of: Vec<usize>,
    guards: Vec<StorageRef<'a>>,
}

impl<'a> Locked<'a> {
    pub(crate) fn new(tensors: &[&'a Tensor]) -> Self {
        let ids: Vec<usize> = tensors.iter().map(|t| storage_id(t)).collect();
        let (mut guards, mut guard_ids, mut guard_of) = (Vec::new(), Vec::new(), Vec::new());
        for (t, id) in tensors.iter().zip(ids) {
            match guard_ids.iter().position(|&g| g == id) {
                Some(k) => guard_of.push(k),
                None => {
                    guards.push(t.storage_and_layout().0);
                    guard_ids.push(id);
                    guard_of.push(guards.len() - 1);
                }
            }
        }
        Locked {
            tensors: tensors.to_vec(),
            guard_of,
            guards,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Storage and layout of the i-th tensor.
    pub(crate) fn get(&self, i: usize) -> (&Storage, &'a Layout) {
        (&self.guards[self.guard_of[i]], self.tensors[i].layout())
    }
}

/// A 2-D row-major view whose rows may be strided: element (r, c) is `data[start + r *
/// stride + c]`.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'a, T> {
    data: &'a [T],
    start: usize,
    stride: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

impl<'a, T> Rows<'a, T> {
    /// `rows` rows of `cols` elements, row r at `data[start + r·stride..]`.
    /// Panics if the last row ends past `data`.
    pub(crate) fn new(
        data: &'a [T],
        start: usize,
        stride: usize,
        rows: usize,
        cols: usize,
    ) -> Self {
        assert!(
            rows == 0 || start + (rows - 1) * stride + cols <= data.len(),
            "row view exceeds its data"
        );
        Rows {
            data,
            start,
            stride,
            rows,
            cols,
        }
    }

    pub(crate) fn row(&self, r: usize) -> &'a [T] {
        let s = self.start + r * self.stride;
        &self.data[s..s + self.cols]
    }
}

/// A row view of f32 or bf16 data.
#[derive(Clone, Copy)]
pub(crate) enum AnyRows<'a> {
    F32(Rows<'a, f32>),
    BF16(Rows<'a, bf16>),
}

fn rows_of<'a, T>(data: &'a [T], layout: &Layout) -> Result<Rows<'a, T>> {
    let (rows, cols) = match layout.dims() {
        [r, c] => (*r, *c),
        d => bail!("expected a 2-D tensor, got shape {d:?}"),
    };
    let stride = layout.stride();
    if cols > 1 && stride[1] != 1 {
        bail!("expected unit column stride, got strides {stride:?}");
    }
    let v = Rows {
        data,
        start: layout.start_offset(),
        stride: stride[0],
        rows,
        cols,
    };
    if rows > 0 && v.start + (rows - 1) * v.stride + cols > data.len() {
        bail!("row view {:?} exceeds its storage", layout.dims());
    }
    Ok(v)
}

pub(crate) fn cpu_rows_f32<'a>(s: &'a Storage, l: &Layout) -> Result<Rows<'a, f32>> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => rows_of(v, l),
        _ => bail!("expected CPU f32 data"),
    }
}

pub(crate) fn cpu_rows_any<'a>(s: &'a Storage, l: &Layout) -> Result<AnyRows<'a>> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(AnyRows::F32(rows_of(v, l)?)),
        Storage::Cpu(CpuStorage::BF16(v)) => Ok(AnyRows::BF16(rows_of(v, l)?)),
        _ => bail!("expected CPU f32 or bf16 data"),
    }
}

/// The elements of a contiguous CPU f32 tensor.
pub(crate) fn cpu_f32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("expected contiguous CPU f32 data"),
    }
}

pub(crate) fn cpu_u32<'a>(s: &'a Storage, l: &Layout) -> Result<&'a [u32]> {
    match (s, l.contiguous_offsets()) {
        (Storage::Cpu(CpuStorage::U32(v)), Some((a, b))) => Ok(&v[a..b]),
        _ => bail!("expected contiguous CPU u32 data"),
    }
}

/// The elements of the contiguous CPU f32 pool written in place.
pub(crate) fn cpu_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => bail!("expected a contiguous CPU f32 pool"),
    }
}

/// Borrowed f32 data of a contiguous CPU tensor.
pub(crate) struct CpuF32<'a> {
    guard: candle_core::StorageRef<'a>,
    start: usize,
    len: usize,
}

impl<'a> CpuF32<'a> {
    pub(crate) fn new(t: &'a Tensor) -> Result<Self> {
        if !t.is_contiguous() {
            candle_core::bail!("expected a contiguous tensor, got {:?}", t.layout());
        }
        let (guard, layout) = t.storage_and_layout();
        Ok(CpuF32 {
            start: layout.start_offset(),
            len: t.elem_count(),
            guard,
        })
    }

    pub(crate) fn slice(&self) -> Result<&[f32]> {
        match &*self.guard {
            candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => {
                Ok(&v[self.start..self.start + self.len])
            }
            _ => candle_core::bail!("expected CPU f32 data"),
        }
    }
}
