//! Golden tests of the vision path (tiling → RADIO → pixel shuffle → mlp1)
//! against reference tensors produced with the Python implementation on the
//! tiny checkpoint in `assets/tiny/`.
//!
//! Fixtures: `tests/golden/golden.json` (`images[]` with `file`, `width`,
//! `height`, `grid` [cols, rows], `num_tiles`), `tests/golden/images/*`, and
//! `tests/golden/tensors.safetensors` (f32 `tiles.<stem>` [n, 3, S, S],
//! `vision.<stem>` [n, patches, vit_hidden], `projector.<stem>` [n, tokens, llm_hidden]).

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use serde_json::Value;
use vlm_server::model::projector::{PROJECTOR_PREFIX, Projector, pixel_shuffle};
use vlm_server::model::radio::{RADIO_PREFIX, RadioConfig, RadioEncoder};
use vlm_server::preprocess::{
    ImageLimits, PreprocessError, TilingConfig, decode_image, tile_image,
};

#[path = "support/device.rs"]
mod device;
use device::test_device;

const TILE_MAX_ABS: f32 = 1e-3;
const MODEL_MAX_REL: f32 = 1e-4;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read fixture {}: {e}", path.display()));
    serde_json::from_str(&python_json_to_strict(&text))
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Python's `json.dump` writes `Infinity`, `-Infinity` and `NaN` (config.json's
/// `time_step_limit`); none of the fields read here use them, so map them to null.
fn python_json_to_strict(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            in_string = escaped || c != '"';
            escaped = !escaped && c == '\\';
        } else if c == '"' {
            in_string = true;
        } else if let Some(token) = ["-Infinity", "Infinity", "NaN"]
            .iter()
            .find(|t| rest.starts_with(**t))
        {
            out.push_str("null");
            rest = &rest[token.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

struct GoldenImage {
    file: String,
    stem: String,
    width: u32,
    height: u32,
    grid: (usize, usize),
    num_tiles: usize,
}

struct Fixtures {
    config: Value,
    images: Vec<GoldenImage>,
    tensors: HashMap<String, Tensor>,
    max_tiles: usize,
}

fn fixtures() -> Fixtures {
    let golden_dir = manifest_dir().join("tests/golden");
    let golden = read_json(&golden_dir.join("golden.json"));
    let images = golden["images"]
        .as_array()
        .expect("golden.json: `images` is not an array")
        .iter()
        .map(|img| {
            let file = img["file"]
                .as_str()
                .expect("golden.json: image without `file`");
            let grid = img["grid"]
                .as_array()
                .expect("golden.json: image without `grid`");
            GoldenImage {
                file: file.to_string(),
                stem: Path::new(file)
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .expect("image file name")
                    .to_string(),
                width: img["width"].as_u64().expect("width") as u32,
                height: img["height"].as_u64().expect("height") as u32,
                grid: (
                    grid[0].as_u64().expect("grid cols") as usize,
                    grid[1].as_u64().expect("grid rows") as usize,
                ),
                num_tiles: img["num_tiles"].as_u64().expect("num_tiles") as usize,
            }
        })
        .collect::<Vec<_>>();
    assert!(!images.is_empty(), "golden.json lists no images");
    let tensors =
        candle_core::safetensors::load(golden_dir.join("tensors.safetensors"), &test_device())
            .expect("load tests/golden/tensors.safetensors");
    let max_tiles = golden
        .get("max_tiles")
        .and_then(Value::as_u64)
        .unwrap_or(12) as usize;
    Fixtures {
        config: read_json(&manifest_dir().join("assets/tiny/config.json")),
        images,
        tensors,
        max_tiles,
    }
}

impl Fixtures {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("tensors.safetensors has no `{name}`"))
    }

    fn tiling(&self) -> TilingConfig {
        TilingConfig::from_config_json(&self.config, self.max_tiles).expect("tiling config")
    }

    fn image_path(&self, img: &GoldenImage) -> PathBuf {
        let dir = manifest_dir().join("tests/golden");
        let direct = dir.join(&img.file);
        if direct.exists() {
            direct
        } else {
            dir.join("images").join(&img.file)
        }
    }
}

/// The tiny checkpoint's shards, from its index.
fn tiny_var_builder() -> VarBuilder<'static> {
    let dir = manifest_dir().join("assets/tiny");
    let index = read_json(&dir.join("model.safetensors.index.json"));
    let shards: BTreeSet<String> = index["weight_map"]
        .as_object()
        .expect("index: `weight_map` is not an object")
        .values()
        .map(|v| v.as_str().expect("index: shard name").to_string())
        .collect();
    let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
    // SAFETY: the fixture files are not modified while the test runs.
    unsafe { VarBuilder::from_mmaped_safetensors(&paths, DType::F32, &test_device()) }
        .expect("mmap tiny checkpoint shards")
}

struct VisionModel {
    radio: RadioEncoder,
    projector: Projector,
    downsample_ratio: f64,
}

fn tiny_model(config: &Value) -> VisionModel {
    let vb = tiny_var_builder();
    let radio_cfg =
        RadioConfig::from_vision_config(&config["vision_config"]).expect("radio config");
    let tile = config["force_image_size"]
        .as_u64()
        .expect("force_image_size") as usize;
    VisionModel {
        radio: RadioEncoder::load(&radio_cfg, vb.pp(RADIO_PREFIX), &[tile]).expect("load RADIO"),
        projector: Projector::load(vb.pp(PROJECTOR_PREFIX)).expect("load mlp1"),
        downsample_ratio: config["downsample_ratio"]
            .as_f64()
            .expect("downsample_ratio"),
    }
}

impl VisionModel {
    /// `[n, 3, S, S]` → (ViT features `[n, patches, hidden]`, embeddings `[n, tokens, llm]`).
    fn run(&self, tiles: &Tensor) -> (Tensor, Tensor) {
        let features = self.radio.forward(tiles).expect("RADIO forward");
        let (_, _, h, w) = tiles.dims4().unwrap();
        let p = self.radio.patch_size();
        let shuffled =
            pixel_shuffle(&features, (h / p, w / p), self.downsample_ratio).expect("pixel shuffle");
        let embeddings = self.projector.forward(&shuffled).expect("mlp1 forward");
        (features, embeddings)
    }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max|a − b| / max|b|
fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    max_abs_diff(a, b) / scale.max(f32::MIN_POSITIVE)
}

/// JPEG decoders differ (ours: zune-jpeg via `image`; the reference: PIL's
/// libjpeg-turbo), so JPEG tiles are held to a mean bound only.
fn is_lossy(img: &GoldenImage) -> bool {
    let ext = Path::new(&img.file)
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("");
    matches!(ext.to_ascii_lowercase().as_str(), "jpg" | "jpeg")
}

const JPEG_TILE_MEAN_ABS: f32 = 0.01;

fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .mean_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn tiling_matches_golden() {
    let fx = fixtures();
    let cfg = fx.tiling();
    let (mut worst, mut worst_lossy_mean) = (0.0f32, 0.0f32);
    for img in &fx.images {
        let bytes = std::fs::read(fx.image_path(img)).expect("read golden image");
        let rgb = decode_image(&bytes, &ImageLimits::default()).expect("decode golden image");
        assert_eq!(
            rgb.dimensions(),
            (img.width, img.height),
            "{}: size",
            img.file
        );
        let tiles = tile_image(&rgb, &cfg).expect("tile");
        assert_eq!(tiles.grid, img.grid, "{}: grid", img.file);
        assert_eq!(tiles.num_tiles, img.num_tiles, "{}: num_tiles", img.file);
        let ours = tiles.to_tensor(&test_device(), DType::F32).unwrap();
        let golden = fx.tensor(&format!("tiles.{}", img.stem));
        let (max, mean) = (max_abs_diff(&ours, golden), mean_abs_diff(&ours, golden));
        eprintln!(
            "{}: {}x{} grid {:?} tiles {} max|Δ| {max:.3e} mean|Δ| {mean:.3e}",
            img.file, img.width, img.height, img.grid, img.num_tiles
        );
        if is_lossy(img) {
            worst_lossy_mean = worst_lossy_mean.max(mean);
        } else {
            worst = worst.max(max);
        }
    }
    eprintln!(
        "tiles: worst max abs error {worst:.3e} (limit {TILE_MAX_ABS:.0e}), JPEG worst mean {worst_lossy_mean:.3e}"
    );
    assert!(
        worst <= TILE_MAX_ABS,
        "tiles differ from golden by {worst:.3e}"
    );
    assert!(
        worst_lossy_mean <= JPEG_TILE_MEAN_ABS,
        "JPEG tiles differ from golden by {worst_lossy_mean:.3e} on average"
    );
}

#[test]
fn vision_and_projector_match_golden_on_golden_tiles() {
    let fx = fixtures();
    let model = tiny_model(&fx.config);
    let (mut worst_vit, mut worst_proj) = (0.0f32, 0.0f32);
    for img in &fx.images {
        let tiles = fx.tensor(&format!("tiles.{}", img.stem));
        let (features, embeddings) = model.run(tiles);
        let vit = max_rel_diff(&features, fx.tensor(&format!("vision.{}", img.stem)));
        let proj = max_rel_diff(&embeddings, fx.tensor(&format!("projector.{}", img.stem)));
        eprintln!(
            "{}: vision rel {vit:.3e}, projector rel {proj:.3e}",
            img.file
        );
        worst_vit = worst_vit.max(vit);
        worst_proj = worst_proj.max(proj);
    }
    eprintln!(
        "golden tiles: worst rel error vision {worst_vit:.3e}, projector {worst_proj:.3e} (limit {MODEL_MAX_REL:.0e})"
    );
    assert!(
        worst_vit <= MODEL_MAX_REL,
        "vision features off by {worst_vit:.3e}"
    );
    assert!(
        worst_proj <= MODEL_MAX_REL,
        "projector outputs off by {worst_proj:.3e}"
    );
}

/// From the image file through our own decode and tiling. PNG/WebP decode
/// exactly, so they meet the model bound; JPEG decoders differ (see `is_lossy`),
/// so JPEG gets a loose bound and the number is reported.
#[test]
fn end_to_end_from_image_files() {
    let fx = fixtures();
    let cfg = fx.tiling();
    let model = tiny_model(&fx.config);
    let (mut worst, mut worst_lossy) = (0.0f32, 0.0f32);
    for img in &fx.images {
        let bytes = std::fs::read(fx.image_path(img)).expect("read golden image");
        let rgb = decode_image(&bytes, &ImageLimits::default()).expect("decode");
        let tiles = tile_image(&rgb, &cfg)
            .expect("tile")
            .to_tensor(&test_device(), DType::F32)
            .unwrap();
        let (features, embeddings) = model.run(&tiles);
        let vit = max_rel_diff(&features, fx.tensor(&format!("vision.{}", img.stem)));
        let proj = max_rel_diff(&embeddings, fx.tensor(&format!("projector.{}", img.stem)));
        eprintln!(
            "{} end to end: vision rel {vit:.3e}, projector rel {proj:.3e}",
            img.file
        );
        if is_lossy(img) {
            worst_lossy = worst_lossy.max(vit).max(proj);
        } else {
            worst = worst.max(vit).max(proj);
        }
    }
    eprintln!("end to end: worst rel error {worst:.3e} (lossless), {worst_lossy:.3e} (JPEG)");
    assert!(
        worst <= MODEL_MAX_REL,
        "end-to-end outputs off by {worst:.3e}"
    );
    assert!(
        worst_lossy <= 0.1,
        "JPEG end-to-end outputs off by {worst_lossy:.3e}"
    );
}

/// Bad client input gives a clear error, never a panic.
#[test]
fn bad_inputs_are_clear_errors() {
    let limits = ImageLimits::default();
    let mut png = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let mut tiny = Vec::new();
    image::RgbImage::from_pixel(10, 10, image::Rgb([1, 2, 3]))
        .write_to(
            &mut std::io::Cursor::new(&mut tiny),
            image::ImageFormat::Png,
        )
        .unwrap();
    // Keep the real signature + IHDR, then claim 100000×100000 (IHDR CRC is not checked first).
    let mut bomb = png[..33].to_vec();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let mut corrupt = png.clone();
    corrupt[40..80].iter_mut().for_each(|b| *b = !*b);

    type Expected = fn(&PreprocessError) -> bool;
    let cases: Vec<(&str, &[u8], Expected)> = vec![
        ("empty", &[], |e| matches!(e, PreprocessError::Empty)),
        ("gif", b"GIF89a\x01\x00\x01\x00\x80\x00\x00", |e| {
            matches!(
                e,
                PreprocessError::UnsupportedFormat {
                    detected: Some("GIF")
                }
            )
        }),
        ("bmp", b"BM\x46\x00\x00\x00\x00\x00\x00\x00\x36\x00", |e| {
            matches!(
                e,
                PreprocessError::UnsupportedFormat {
                    detected: Some("BMP")
                }
            )
        }),
        ("truncated png", &png[..png.len() / 2], |e| {
            matches!(e, PreprocessError::Corrupt { .. })
        }),
        ("corrupt png", &corrupt, |e| {
            matches!(e, PreprocessError::Corrupt { .. })
        }),
        ("10x10", &tiny, |e| {
            matches!(e, PreprocessError::TooSmall { .. })
        }),
        ("100000x100000 header", &bomb, |e| {
            matches!(
                e,
                PreprocessError::TooLarge {
                    width: 100_000,
                    height: 100_000,
                    ..
                }
            )
        }),
    ];
    for (name, bytes, expected) in cases {
        let err = decode_image(bytes, &limits).expect_err(name);
        eprintln!("{name}: {err}");
        assert!(expected(&err), "{name}: unexpected error {err:?}");
    }
}
