//! InternVL dynamic tiling (model.md §5.1): pick a cols×rows grid by aspect
//! ratio, resize the image to (S·cols)×(S·rows), cut S×S tiles row-major,
//! append a whole-image thumbnail, normalize.

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use serde_json::Value;

use super::PreprocessError;
use super::resize::resize_rgb8_bicubic_antialias;

/// Tiling and normalization parameters (from the checkpoint's config.json).
#[derive(Debug, Clone, PartialEq)]
pub struct TilingConfig {
    /// Tile side S in pixels (`force_image_size`, 512 for this model).
    pub tile_size: usize,
    /// Upper bound on grid tiles, thumbnail not counted (vLLM default 12).
    pub max_tiles: usize,
    /// Append a whole-image S×S tile when the grid has more than one tile.
    pub use_thumbnail: bool,
    /// Per-channel mean and std applied to pixels scaled to [0, 1].
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl TilingConfig {
    /// Reads `force_image_size`, `use_thumbnail` (default true), `norm_mean`
    /// and `norm_std` from the top level of the checkpoint's config.json.
    pub fn from_config_json(config: &Value, max_tiles: usize) -> Result<Self, PreprocessError> {
        let missing = |field: &str| {
            PreprocessError::InvalidConfig(format!("config.json has no usable `{field}`"))
        };
        let tile_size = config
            .get("force_image_size")
            .and_then(Value::as_u64)
            .ok_or_else(|| missing("force_image_size"))? as usize;
        let use_thumbnail = match config.get("use_thumbnail") {
            None | Some(Value::Null) => true,
            Some(v) => v.as_bool().ok_or_else(|| missing("use_thumbnail"))?,
        };
        let triple = |field: &str| -> Result<[f32; 3], PreprocessError> {
            let values = config
                .get(field)
                .and_then(Value::as_array)
                .filter(|a| a.len() == 3)
                .ok_or_else(|| missing(field))?;
            let mut out = [0.0f32; 3];
            for (o, v) in out.iter_mut().zip(values) {
                *o = v.as_f64().ok_or_else(|| missing(field))? as f32;
            }
            Ok(out)
        };
        let cfg = TilingConfig {
            tile_size,
            max_tiles,
            use_thumbnail,
            mean: triple("norm_mean")?,
            std: triple("norm_std")?,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same config with a per-request tile cap.
    pub fn with_max_tiles(&self, max_tiles: usize) -> Self {
        TilingConfig {
            max_tiles,
            ..self.clone()
        }
    }

    fn validate(&self) -> Result<(), PreprocessError> {
        let bad = |m: String| Err(PreprocessError::InvalidConfig(m));
        if self.tile_size == 0 {
            return bad("tile_size must be positive".into());
        }
        if self.max_tiles == 0 {
            return bad("max_tiles must be at least 1".into());
        }
        if self.std.iter().any(|s| !s.is_finite() || *s == 0.0) {
            return bad(format!(
                "norm_std {:?} must be finite and non-zero",
                self.std
            ));
        }
        Ok(())
    }
}

/// The normalized tiles of one image.
#[derive(Debug, Clone)]
pub struct Tiles {
    /// `[num_tiles, 3, S, S]`, CHW per tile; grid tiles row-major, thumbnail last.
    pub pixels: Vec<f32>,
    /// Grid tiles plus the thumbnail, if any.
    pub num_tiles: usize,
    /// `(cols, rows)` of the grid.
    pub grid: (usize, usize),
    pub tile_size: usize,
}

impl Tiles {
    /// The tiles as a `[num_tiles, 3, S, S]` tensor.
    pub fn to_tensor(&self, device: &Device, dtype: DType) -> candle_core::Result<Tensor> {
        let s = self.tile_size;
        Tensor::from_slice(&self.pixels, (self.num_tiles, 3, s, s), &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    }
}

/// All `(cols, rows)` with `min_tiles <= cols*rows <= max_tiles`, by product.
fn target_ratios(min_tiles: usize, max_tiles: usize) -> Vec<(usize, usize)> {
    let mut ratios: Vec<(usize, usize)> = (1..=max_tiles)
        .flat_map(|i| (1..=max_tiles).map(move |j| (i, j)))
        .filter(|&(i, j)| (min_tiles..=max_tiles).contains(&(i * j)))
        .collect();
    // Stable: within one product, by cols. Ties in |aspect - i/j| between pairs
    // of equal product never decide the result (a smaller product wins first).
    ratios.sort_by_key(|&(i, j)| i * j);
    ratios
}

/// InternVL `find_closest_aspect_ratio`: returns `(cols, rows)`. On an exact
/// tie in aspect difference the later (larger) grid wins only if the image
/// has more than half the grid's pixel area.
pub fn find_grid(width: u32, height: u32, tile_size: usize, max_tiles: usize) -> (usize, usize) {
    let aspect = width as f64 / height as f64;
    let area = width as f64 * height as f64;
    let s2 = (tile_size * tile_size) as f64;
    let mut best = (1, 1);
    let mut best_diff = f64::INFINITY;
    for (i, j) in target_ratios(1, max_tiles) {
        let diff = (aspect - i as f64 / j as f64).abs();
        if diff < best_diff {
            best_diff = diff;
            best = (i, j);
        } else if diff == best_diff && area > 0.5 * s2 * (i * j) as f64 {
            best = (i, j);
        }
    }
    best
}

/// Tiles and normalizes an RGB image: grid tiles row-major, then the
/// thumbnail when the grid has more than one tile and `use_thumbnail` is set.
pub fn tile_image(image: &RgbImage, cfg: &TilingConfig) -> Result<Tiles, PreprocessError> {
    cfg.validate()?;
    let (width, height) = image.dimensions();
    if width == 0 || height == 0 {
        return Err(PreprocessError::InvalidConfig(format!(
            "cannot tile an empty {width}x{height} image"
        )));
    }
    let s = cfg.tile_size;
    let (cols, rows) = find_grid(width, height, s, cfg.max_tiles);

    let grid_tiles = cols * rows;
    let thumbnail = cfg.use_thumbnail && grid_tiles > 1;
    let num_tiles = grid_tiles + thumbnail as usize;
    let tile_len = 3 * s * s;
    let mut pixels = vec![0.0f32; num_tiles * tile_len];

    // [3, S·rows, S·cols] → tiles row-major: tile k is at (col k % cols, row k / cols).
    let (big_h, big_w) = (s * rows, s * cols);
    // vLLM resizes the un-normalized 0..255 pixels.
    let resized = resize_rgb8_bicubic_antialias(image, (big_h, big_w));
    for (k, tile) in pixels
        .chunks_exact_mut(tile_len)
        .take(grid_tiles)
        .enumerate()
    {
        let (col, row) = (k % cols, k / cols);
        for c in 0..3 {
            for y in 0..s {
                let src = c * big_h * big_w + (row * s + y) * big_w + col * s;
                let dst = (c * s + y) * s;
                tile[dst..dst + s].copy_from_slice(&resized[src..src + s]);
            }
        }
    }
    if thumbnail {
        let thumb = resize_rgb8_bicubic_antialias(image, (s, s));
        pixels[grid_tiles * tile_len..].copy_from_slice(&thumb);
    }

    // ((x / 255) - mean) / std, in f32 like vLLM.
    for tile in pixels.chunks_exact_mut(tile_len) {
        for (c, channel) in tile.chunks_exact_mut(s * s).enumerate() {
            let (mean, std) = (cfg.mean[c], cfg.std[c]);
            channel
                .iter_mut()
                .for_each(|v| *v = (*v / 255.0 - mean) / std);
        }
    }

    Ok(Tiles {
        pixels,
        num_tiles,
        grid: (cols, rows),
        tile_size: s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[allow(clippy::excessive_precision)] // the published OpenAI-CLIP values
    fn cfg(max_tiles: usize) -> TilingConfig {
        TilingConfig {
            tile_size: 512,
            max_tiles,
            use_thumbnail: true,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.26130258, 0.27577711],
        }
    }

    #[test]
    fn target_ratio_count() {
        // 35 pairs with 1 <= i*j <= 12 (model.md §5.1).
        assert_eq!(target_ratios(1, 12).len(), 35);
    }

    /// model.md §5.1 worked examples, S = 512, max 12.
    #[test]
    fn worked_examples() {
        let cases = [
            ((512, 512), (1, 1)),
            ((600, 600), (1, 1)),
            ((1024, 1024), (2, 2)),
            ((1280, 720), (2, 1)),
            ((1920, 1080), (4, 2)),
            ((640, 480), (4, 3)),
            ((1024, 768), (4, 3)),
            ((800, 1200), (2, 3)),
            ((2480, 3508), (2, 3)),
            ((3000, 2000), (3, 2)),
        ];
        for ((w, h), grid) in cases {
            assert_eq!(find_grid(w, h, 512, 12), grid, "{w}x{h}");
        }
    }

    #[test]
    fn tile_counts_and_thumbnail() {
        let cases = [
            ((512, 512), 1),
            ((1280, 720), 3),
            ((640, 480), 13),
            ((800, 1200), 7),
        ];
        let config = TilingConfig {
            tile_size: 32, // small tiles keep the test fast; grids only depend on aspect here
            ..cfg(12)
        };
        for ((w, h), n) in cases {
            let img = RgbImage::from_fn(w / 16, h / 16, |x, y| image::Rgb([x as u8, y as u8, 9]));
            let tiles = tile_image(&img, &config).unwrap();
            assert_eq!(tiles.num_tiles, n, "{w}x{h}");
            assert_eq!(tiles.pixels.len(), n * 3 * 32 * 32);
        }
    }

    #[test]
    fn max_tiles_one_gives_single_tile_without_thumbnail() {
        let img = RgbImage::from_fn(200, 90, |x, _| image::Rgb([x as u8, 0, 255]));
        let config = TilingConfig {
            tile_size: 64,
            ..cfg(1)
        };
        let tiles = tile_image(&img, &config).unwrap();
        assert_eq!((tiles.num_tiles, tiles.grid), (1, (1, 1)));
        assert_eq!(find_grid(4000, 1000, 512, 1), (1, 1));
    }

    #[test]
    fn normalizes_constant_image() {
        let img = RgbImage::from_pixel(100, 40, image::Rgb([255, 0, 128]));
        let config = TilingConfig {
            tile_size: 16,
            ..cfg(4)
        };
        let tiles = tile_image(&img, &config).unwrap();
        let plane = 16 * 16;
        for tile in tiles.pixels.chunks_exact(3 * plane) {
            for c in 0..3 {
                let raw = [255.0f32, 0.0, 128.0][c];
                let want = (raw / 255.0 - config.mean[c]) / config.std[c];
                assert!(
                    tile[c * plane..(c + 1) * plane]
                        .iter()
                        .all(|v| (v - want).abs() < 1e-4)
                );
            }
        }
    }

    /// When the image is exactly the grid size no resampling happens, so tiles
    /// are crops: checks the row-major tile order and CHW layout.
    #[test]
    fn tiles_are_row_major_crops() {
        let s = 8;
        let img = RgbImage::from_fn(2 * s as u32, s as u32, |x, y| {
            image::Rgb([x as u8, y as u8, 0])
        });
        let config = TilingConfig {
            tile_size: s,
            use_thumbnail: false,
            mean: [0.0; 3],
            std: [1.0 / 255.0; 3],
            ..cfg(12)
        };
        let tiles = tile_image(&img, &config).unwrap();
        assert_eq!((tiles.grid, tiles.num_tiles), ((2, 1), 2));
        let at =
            |k: usize, c: usize, y: usize, x: usize| tiles.pixels[((k * 3 + c) * s + y) * s + x];
        assert!((at(1, 0, 3, 2) - (s + 2) as f32).abs() < 1e-3); // x of tile 1 starts at s
        assert!((at(1, 1, 3, 2) - 3.0).abs() < 1e-3);
        assert!((at(0, 0, 5, 7) - 7.0).abs() < 1e-3);
        let t = tiles.to_tensor(&Device::Cpu, DType::F32).unwrap();
        assert_eq!(t.dims(), &[2, 3, s, s]);
    }

    #[test]
    fn reads_config_json() {
        let json: Value = serde_json::json!({
            "force_image_size": 512,
            "use_thumbnail": true,
            "norm_mean": [0.48145466, 0.4578275, 0.40821073],
            "norm_std": [0.26862954, 0.26130258, 0.27577711],
        });
        assert_eq!(TilingConfig::from_config_json(&json, 12).unwrap(), cfg(12));
        let err = TilingConfig::from_config_json(&serde_json::json!({}), 12).unwrap_err();
        assert!(err.to_string().contains("force_image_size"), "{err}");
    }
}
