//! Validated image decoding: PNG / JPEG / WebP → RGB8.

use std::fmt;
use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};

use super::PreprocessError;

/// The encoded formats the server accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Png,
    Jpeg,
    WebP,
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Png => "PNG",
            ImageFormat::Jpeg => "JPEG",
            ImageFormat::WebP => "WebP",
        })
    }
}

impl ImageFormat {
    /// Sniffs the format from the leading magic bytes. `Err` carries the name
    /// of a recognised but unsupported format, if any.
    pub fn detect(bytes: &[u8]) -> Result<Self, Option<&'static str>> {
        if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            return Ok(ImageFormat::Png);
        }
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            return Ok(ImageFormat::Jpeg);
        }
        if bytes.len() >= 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            return Ok(ImageFormat::WebP);
        }
        Err(unsupported_format_name(bytes))
    }

    fn to_image_format(self) -> image::ImageFormat {
        match self {
            ImageFormat::Png => image::ImageFormat::Png,
            ImageFormat::Jpeg => image::ImageFormat::Jpeg,
            ImageFormat::WebP => image::ImageFormat::WebP,
        }
    }
}

/// Names common formats we do not decode, for a more helpful error.
fn unsupported_format_name(bytes: &[u8]) -> Option<&'static str> {
    let ftyp_brand = |brands: &[&[u8]]| {
        bytes.len() >= 12 && &bytes[4..8] == b"ftyp" && brands.iter().any(|b| &bytes[8..12] == *b)
    };
    if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
        Some("GIF")
    } else if bytes.starts_with(b"BM") {
        Some("BMP")
    } else if bytes.starts_with(b"II*\0") || bytes.starts_with(b"MM\0*") {
        Some("TIFF")
    } else if ftyp_brand(&[b"avif", b"avis"]) {
        Some("AVIF")
    } else if ftyp_brand(&[b"heic", b"heix", b"mif1", b"msf1"]) {
        Some("HEIC/HEIF")
    } else if bytes.starts_with(b"%PDF") {
        Some("PDF")
    } else if bytes.starts_with(b"<svg") || bytes.starts_with(b"<?xml") {
        Some("SVG/XML")
    } else {
        None
    }
}

/// Size limits checked against the header before any pixel is decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted `width * height` (decompression-bomb guard).
    pub max_pixels: u64,
    /// Smallest accepted side (the model card's minimum is 32×32).
    pub min_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_pixels: 50_000_000,
            min_side: 32,
        }
    }
}

/// Decodes a PNG, JPEG or WebP image to RGB8. Alpha is dropped (not blended,
/// as PIL's `convert("RGB")`), grayscale is expanded; EXIF orientation is not
/// applied (PIL's `Image.open` does not either).
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, PreprocessError> {
    if bytes.is_empty() {
        return Err(PreprocessError::Empty);
    }
    let format = ImageFormat::detect(bytes)
        .map_err(|detected| PreprocessError::UnsupportedFormat { detected })?;
    let corrupt = |e: image::ImageError| PreprocessError::Corrupt {
        format,
        reason: e.to_string(),
    };

    // Decoded buffers are at most 8 bytes per pixel (RGBA16); allow some slack
    // for decoder scratch on top of that.
    let mut decode_limits = Limits::default();
    decode_limits.max_alloc = Some(limits.max_pixels.saturating_mul(8).saturating_add(64 << 20));

    // PNG states its size at a fixed offset: check it before the decoder reads
    // any further (it scans up to the first data chunk).
    if let Some((width, height)) = png_header_dimensions(bytes) {
        check_dimensions(format, width, height, limits)?;
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format.to_image_format());
    reader.limits(decode_limits.clone());
    // Constructing the decoder parses the headers only, no pixel data.
    let mut decoder = reader.into_decoder().map_err(corrupt)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(format, width, height, limits)?;
    decode_limits.max_image_width = Some(width);
    decode_limits.max_image_height = Some(height);
    decoder.set_limits(decode_limits).map_err(corrupt)?;

    let image = DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    Ok(match image {
        DynamicImage::ImageRgb8(rgb) => rgb,
        other => other.to_rgb8(),
    })
}

/// Width and height from a PNG's IHDR chunk, which must come first.
fn png_header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    if bytes.len() < 24 || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    Some((be(16), be(20)))
}

fn check_dimensions(
    format: ImageFormat,
    width: u32,
    height: u32,
    limits: &ImageLimits,
) -> Result<(), PreprocessError> {
    if width as u64 * height as u64 > limits.max_pixels {
        return Err(PreprocessError::TooLarge {
            format,
            width,
            height,
            max_pixels: limits.max_pixels,
        });
    }
    if width < limits.min_side || height < limits.min_side {
        return Err(PreprocessError::TooSmall {
            format,
            width,
            height,
            min_side: limits.min_side,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, codecs::png::PngEncoder};

    fn png_bytes(width: u32, height: u32, color: image::ExtendedColorType, data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        PngEncoder::new(&mut out)
            .write_image(data, width, height, color)
            .unwrap();
        out
    }

    fn gradient_rgb(width: u32, height: u32) -> Vec<u8> {
        (0..width * height * 3)
            .map(|i| (i * 7 % 251) as u8)
            .collect()
    }

    #[test]
    fn decodes_rgb_png_exactly() {
        let data = gradient_rgb(40, 33);
        let bytes = png_bytes(40, 33, image::ExtendedColorType::Rgb8, &data);
        let img = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (40, 33));
        assert_eq!(img.as_raw(), &data);
    }

    #[test]
    fn drops_alpha_without_blending() {
        let rgba: Vec<u8> = (0..32 * 32)
            .flat_map(|i| [10, 20, (i % 256) as u8, 0])
            .collect();
        let bytes = png_bytes(32, 32, image::ExtendedColorType::Rgba8, &rgba);
        let img = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(img.get_pixel(5, 0).0, [10, 20, 5]);
    }

    #[test]
    fn expands_grayscale() {
        let gray: Vec<u8> = (0..32 * 32).map(|i| (i % 256) as u8).collect();
        let bytes = png_bytes(32, 32, image::ExtendedColorType::L8, &gray);
        let img = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(img.get_pixel(7, 0).0, [7, 7, 7]);
    }

    #[test]
    fn decodes_jpeg() {
        let data = gradient_rgb(48, 40);
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, 95)
            .write_image(&data, 48, 40, image::ExtendedColorType::Rgb8)
            .unwrap();
        let img = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(img.dimensions(), (48, 40));
    }

    #[test]
    fn decodes_lossless_webp() {
        let data = gradient_rgb(33, 35);
        let mut bytes = Vec::new();
        image::codecs::webp::WebPEncoder::new_lossless(&mut bytes)
            .write_image(&data, 33, 35, image::ExtendedColorType::Rgb8)
            .unwrap();
        let img = decode_image(&bytes, &ImageLimits::default()).unwrap();
        assert_eq!(img.as_raw(), &data);
    }

    #[test]
    fn empty_input() {
        let err = decode_image(&[], &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, PreprocessError::Empty), "{err}");
    }

    #[test]
    fn unsupported_formats_are_named() {
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        let err = decode_image(gif, &ImageLimits::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "unsupported image format (GIF): supported formats are PNG, JPEG and WebP"
        );
        let bmp = b"BM\x3a\x00\x00\x00\x00\x00\x00\x00\x36\x00\x00\x00";
        let err = decode_image(bmp, &ImageLimits::default()).unwrap_err();
        assert!(err.to_string().contains("(BMP)"), "{err}");
        let err = decode_image(b"hello world", &ImageLimits::default()).unwrap_err();
        assert!(matches!(
            err,
            PreprocessError::UnsupportedFormat { detected: None }
        ));
    }

    #[test]
    fn rejects_tiny_images() {
        let bytes = png_bytes(
            10,
            10,
            image::ExtendedColorType::Rgb8,
            &gradient_rgb(10, 10),
        );
        let err = decode_image(&bytes, &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::TooSmall {
                    width: 10,
                    height: 10,
                    ..
                }
            ),
            "{err}"
        );
        let bytes = png_bytes(
            100,
            31,
            image::ExtendedColorType::Rgb8,
            &gradient_rgb(100, 31),
        );
        assert!(decode_image(&bytes, &ImageLimits::default()).is_err());
    }

    #[test]
    fn corrupt_and_truncated_png() {
        let bytes = png_bytes(
            64,
            64,
            image::ExtendedColorType::Rgb8,
            &gradient_rgb(64, 64),
        );
        for cut in [8, 20, 40, bytes.len() / 2, bytes.len() - 13] {
            let err = decode_image(&bytes[..cut], &ImageLimits::default()).unwrap_err();
            assert!(
                matches!(err, PreprocessError::Corrupt { .. }),
                "cut {cut}: {err}"
            );
        }
        let mut garbled = bytes.clone();
        for b in garbled.iter_mut().skip(60).take(40) {
            *b ^= 0x5A;
        }
        let err = decode_image(&garbled, &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, PreprocessError::Corrupt { .. }), "{err}");
    }

    /// A valid PNG header claiming 100000×100000, with no pixel data.
    fn bomb_png() -> Vec<u8> {
        let mut ihdr = Vec::new();
        ihdr.extend_from_slice(b"IHDR");
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&100_000u32.to_be_bytes());
        ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        out.extend_from_slice(&13u32.to_be_bytes());
        out.extend_from_slice(&ihdr);
        out.extend_from_slice(&crc32(&ihdr).to_be_bytes());
        out
    }

    fn crc32(data: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in data {
            crc ^= b as u32;
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }

    #[test]
    fn rejects_decompression_bomb_from_header() {
        let err = decode_image(&bomb_png(), &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::TooLarge {
                    width: 100_000,
                    height: 100_000,
                    ..
                }
            ),
            "{err}"
        );
        // The decoder path: a JPEG whose SOF0 claims 65000x65000.
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90)
            .write_image(
                &gradient_rgb(48, 40),
                48,
                40,
                image::ExtendedColorType::Rgb8,
            )
            .unwrap();
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        jpeg[sof + 5..sof + 9].copy_from_slice(&[0xFD, 0xE8, 0xFD, 0xE8]);
        let err = decode_image(&jpeg, &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(
                err,
                PreprocessError::TooLarge {
                    width: 65000,
                    height: 65000,
                    ..
                }
            ),
            "{err}"
        );
        let small = ImageLimits {
            max_pixels: 1000,
            min_side: 32,
        };
        let bytes = png_bytes(
            40,
            40,
            image::ExtendedColorType::Rgb8,
            &gradient_rgb(40, 40),
        );
        assert!(matches!(
            decode_image(&bytes, &small).unwrap_err(),
            PreprocessError::TooLarge { .. }
        ));
    }
}
