//! Opening a safetensors checkpoint directory: `model.safetensors.index.json` (sharded) or a
//! single `model.safetensors`. The shards are memory-mapped (no copy of the file bytes);
//! tensors are converted to the target dtype/device as they are loaded through a
//! [`VarBuilder`], with errors that name the tensor and the checkpoint. Once a tensor is
//! copied out, its pages of the mapping are released (`MADV_DONTNEED`), so loading never
//! holds the file and the converted weights in memory at once.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

struct Inner {
    dir: PathBuf,
    shards: Vec<PathBuf>,
    maps: Vec<Mmap>,
    tensors: HashMap<String, Entry>,
}

/// Where a tensor lives: shard, dtype, shape and absolute byte range in the mapping.
struct Entry {
    shard: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

/// A memory-mapped checkpoint. Cheap to clone (shared mapping).
#[derive(Clone)]
pub struct Checkpoint {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("dir", &self.inner.dir)
            .field("shards", &self.inner.shards)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let shards: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .with_context(|| format!("cannot read {}", index_path.display()))?;
            let index: Index = serde_json::from_str(&text)
                .with_context(|| format!("invalid {}", index_path.display()))?;
            let files: BTreeSet<&String> = index.weight_map.values().collect();
            if files.is_empty() {
                bail!("{}: empty weight_map", index_path.display());
            }
            files.into_iter().map(|f| dir.join(f)).collect()
        } else {
            let single = dir.join("model.safetensors");
            if !single.exists() {
                bail!(
                    "{}: neither model.safetensors.index.json nor model.safetensors found",
                    dir.display()
                );
            }
            vec![single]
        };
        for shard in &shards {
            if !shard.exists() {
                bail!("checkpoint shard {} is missing", shard.display());
            }
        }
        let mut maps = Vec::with_capacity(shards.len());
        let mut tensors = HashMap::new();
        for (i, shard) in shards.iter().enumerate() {
            let file = std::fs::File::open(shard)
                .with_context(|| format!("cannot open {}", shard.display()))?;
            // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
            // them not being truncated or rewritten while the server runs.
            let map = unsafe { Mmap::map(&file) }
                .with_context(|| format!("cannot map {}", shard.display()))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .with_context(|| format!("{} is not a safetensors file", shard.display()))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                let entry = Entry {
                    shard: i,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    bytes: data_start + a..data_start + b,
                };
                tensors.insert(name, entry);
            }
            maps.push(map);
        }
        Ok(Checkpoint {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                shards,
                maps,
                tensors,
            }),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Names of all tensors in the checkpoint.
    pub fn tensor_names(&self) -> Vec<String> {
        self.inner.tensors.keys().cloned().collect()
    }

    /// Shape of a tensor as stored, without loading it.
    pub fn tensor_shape(&self, name: &str) -> Option<Vec<usize>> {
        self.inner.tensors.get(name).map(|e| e.shape.clone())
    }

    /// A VarBuilder that loads tensors onto `device`, converted to `dtype`.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }

    fn load(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let entry = self.inner.tensors.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` not found in checkpoint {}",
                self.inner.dir.display()
            ))
        })?;
        let map = &self.inner.maps[entry.shard];
        let tensor = stored_dtype(entry.dtype)
            .and_then(|stored| {
                let bytes = map.get(entry.bytes.clone()).ok_or_else(|| {
                    candle_core::Error::Msg("data offsets are outside the file".into())
                })?;
                Tensor::from_raw_buffer(bytes, stored, &entry.shape, dev)
            })
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "cannot load tensor `{name}` from checkpoint {}: {e}",
                    self.inner.dir.display()
                ))
            })?;
        // The bytes are copied out: drop their pages from this process (they stay in the page
        // cache; a page shared with a neighbour is simply read again if that one loads later).
        // SAFETY: DONTNEED on a read-only file mapping only discards clean pages; nothing holds
        // a reference into them past the copy above.
        let _ = unsafe {
            map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                entry.bytes.start,
                entry.bytes.len(),
            )
        };
        Ok(tensor)
    }
}

fn stored_dtype(dtype: Dtype) -> candle_core::Result<DType> {
    Ok(match dtype {
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        other => candle_core::bail!("unsupported stored dtype {other:?}"),
    })
}

impl SimpleBackend for Checkpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        // Check the shape from the header before converting anything.
        if let Some(entry) = self.inner.tensors.get(name)
            && entry.shape != s.dims()
        {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in checkpoint {} has shape {:?}, expected {:?}",
                self.inner.dir.display(),
                entry.shape,
                s.dims()
            )));
        }
        self.load(name, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Checkpoint {
        Checkpoint::open(&Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tiny")).unwrap()
    }

    #[test]
    fn loads_bf16_as_f32_and_names_bad_tensors() {
        let ckpt = tiny();
        let vb = ckpt.var_builder(DType::F32, &Device::Cpu);
        let norm = vb.get(64, "language_model.backbone.norm_f.weight").unwrap();
        assert_eq!(norm.dtype(), DType::F32);

        let err = vb
            .get((3, 3), "language_model.backbone.norm_f.weight")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("language_model.backbone.norm_f.weight")
                && err.contains("[64]")
                && err.contains("[3, 3]"),
            "{err}"
        );
        let err = vb
            .pp("language_model")
            .get(1, "no.such.tensor")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`language_model.no.such.tensor` not found"),
            "{err}"
        );
        assert!(ckpt.tensor_shape("language_model.lm_head.weight") == Some(vec![1024, 64]));
    }
}
