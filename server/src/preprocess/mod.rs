//! Image preprocessing: encoded bytes → RGB8 → dynamic tiles, normalized.
//!
//! `decode_image` validates and decodes a client's image; `tile_image` turns
//! it into `[n_tiles, 3, S, S]` f32 tiles (InternVL dynamic tiling, model.md
//! §5.1) ready for the RADIO encoder.

mod decode;
mod resize;
mod tiling;

pub use decode::{ImageFormat, ImageLimits, decode_image};
pub use image::RgbImage;
pub use resize::{resize_bicubic_antialias, resize_rgb8_bicubic_antialias};
pub use tiling::{Tiles, TilingConfig, find_grid, tile_image};

/// Why an image was rejected. The messages go back to the client as a 400 body,
/// so each one says what to change.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    #[error("image data is empty")]
    Empty,

    #[error(
        "unsupported image format{}: supported formats are PNG, JPEG and WebP",
        detected.map(|d| format!(" ({d})")).unwrap_or_default()
    )]
    UnsupportedFormat { detected: Option<&'static str> },

    #[error(
        "{format} image is {width}x{height} = {} pixels, over the limit of {max_pixels} pixels",
        *width as u64 * *height as u64
    )]
    TooLarge {
        format: ImageFormat,
        width: u32,
        height: u32,
        max_pixels: u64,
    },

    #[error("{format} image is {width}x{height}; both sides must be at least {min_side} pixels")]
    TooSmall {
        format: ImageFormat,
        width: u32,
        height: u32,
        min_side: u32,
    },

    #[error("could not decode {format} image (corrupt or truncated data): {reason}")]
    Corrupt { format: ImageFormat, reason: String },

    #[error("invalid tiling configuration: {0}")]
    InvalidConfig(String),
}
