//! Antialiased bicubic resize, matching PyTorch's
//! `F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=True)`
//! on an f32 tensor (CPU kernel, `UpSampleKernel.cpp`).
//!
//! Separable: the width (contiguous) axis first, then the height axis; an axis
//! whose size does not change is skipped, as torch does. The kernel is PIL's
//! cubic with a = -0.5; when shrinking, its support is stretched by the scale.
//! Each output pixel's weights are normalized to sum to 1. No clamping or
//! rounding: outputs may leave [0, 255] slightly (ringing).

use std::thread;

use image::RgbImage;

/// PIL / torch antialias cubic kernel (Keys, a = -0.5), in f32 as torch computes it.
fn cubic_aa(x: f32) -> f32 {
    const A: f32 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A
    } else {
        0.0
    }
}

/// The taps of one resampled axis: output `i` reads inputs
/// `start[i] .. start[i] + len[i]` with weights `weights[i * stride ..]`.
struct AxisTaps {
    start: Vec<usize>,
    len: Vec<usize>,
    weights: Vec<f32>,
    stride: usize,
}

impl AxisTaps {
    /// Reproduces torch's `_compute_indices_min_size_weights_aa` for float
    /// inputs, including where it rounds through f32 and where it works in f64
    /// (that decides the tap ranges at exact half-pixel boundaries).
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f32 / out_size as f32;
        let (support, invscale) = if scale >= 1.0 {
            ((2.0 * scale as f64) as f32, (1.0 / scale as f64) as f32)
        } else {
            (2.0f32, 1.0f32)
        };
        let stride = support.ceil() as usize * 2 + 1;
        let mut taps = AxisTaps {
            start: Vec::with_capacity(out_size),
            len: Vec::with_capacity(out_size),
            weights: vec![0.0; out_size * stride],
            stride,
        };
        for i in 0..out_size {
            let center = (scale as f64 * (i as f64 + 0.5)) as f32;
            // `as i64` truncates toward zero, like C++'s static_cast.
            let xmin = (((center - support) as f64 + 0.5) as i64).max(0);
            let xmax = (((center + support) as f64 + 0.5) as i64).min(in_size as i64);
            let xsize = (xmax - xmin).clamp(0, stride as i64) as usize;
            let w = &mut taps.weights[i * stride..i * stride + xsize];
            let mut total = 0.0f32;
            for (j, wj) in w.iter_mut().enumerate() {
                let d = (j as i64 + xmin) as f32 - center;
                *wj = cubic_aa(((d as f64 + 0.5) * invscale as f64) as f32);
                total += *wj;
            }
            if total != 0.0 {
                w.iter_mut().for_each(|wj| *wj /= total);
            }
            taps.start.push(xmin as usize);
            taps.len.push(xsize);
        }
        taps
    }

    fn taps(&self, i: usize) -> (usize, &[f32]) {
        let w = &self.weights[i * self.stride..i * self.stride + self.len[i]];
        (self.start[i], w)
    }
}

/// One channel `[h, in_w]` → `[h, out_w]`; `row(y, buf)` writes input row `y`
/// as f32. Rows go in blocks of `ROWS` so each tap step updates independent
/// accumulators: one output's sum keeps torch's order, the blocking only adds
/// instruction-level parallelism (2-3× faster).
fn resize_rows(
    h: usize,
    in_w: usize,
    out_w: usize,
    taps: &AxisTaps,
    row: &impl Fn(usize, &mut [f32]),
) -> Vec<f32> {
    const ROWS: usize = 8;
    let mut dst = vec![0.0f32; h * out_w];
    let mut block = vec![0.0f32; ROWS * in_w];
    for (b, dst_blk) in dst.chunks_mut(ROWS * out_w).enumerate() {
        let rows = dst_blk.len() / out_w;
        for (r, buf) in block.chunks_exact_mut(in_w).take(rows).enumerate() {
            row(b * ROWS + r, buf);
        }
        if rows < ROWS {
            for (s, d) in block
                .chunks_exact(in_w)
                .zip(dst_blk.chunks_exact_mut(out_w))
            {
                resize_row(s, d, taps);
            }
            continue;
        }
        for x in 0..out_w {
            let (start, w) = taps.taps(x);
            let mut acc = [0.0f32; ROWS];
            for (r, a) in acc.iter_mut().enumerate() {
                *a = block[r * in_w + start] * w[0];
            }
            for (j, wj) in w.iter().enumerate().skip(1) {
                for (r, a) in acc.iter_mut().enumerate() {
                    *a += block[r * in_w + start + j] * wj;
                }
            }
            for (r, a) in acc.iter().enumerate() {
                dst_blk[r * out_w + x] = *a;
            }
        }
    }
    dst
}

fn resize_row(src_row: &[f32], dst_row: &mut [f32], taps: &AxisTaps) {
    for (x, out) in dst_row.iter_mut().enumerate() {
        let (start, w) = taps.taps(x);
        let s = &src_row[start..start + w.len()];
        // Same summation order as torch: first tap, then the rest in order.
        let mut acc = s[0] * w[0];
        for (v, wj) in s.iter().zip(w).skip(1) {
            acc += v * wj;
        }
        *out = acc;
    }
}

/// One channel `[in_h, w]` → `[out_h, w]`, accumulated row by row so the inner
/// loop runs over contiguous memory.
fn resize_cols(src: &[f32], in_h: usize, w: usize, out_h: usize, taps: &AxisTaps) -> Vec<f32> {
    debug_assert_eq!(src.len(), in_h * w);
    let mut dst = vec![0.0f32; out_h * w];
    for (y, dst_row) in dst.chunks_exact_mut(w).enumerate() {
        let (start, wts) = taps.taps(y);
        let first = &src[start * w..(start + 1) * w];
        dst_row
            .iter_mut()
            .zip(first)
            .for_each(|(d, s)| *d = s * wts[0]);
        for (j, wj) in wts.iter().enumerate().skip(1) {
            let row = &src[(start + j) * w..(start + j + 1) * w];
            dst_row.iter_mut().zip(row).for_each(|(d, s)| *d += s * wj);
        }
    }
    dst
}

/// Resizes `channels` planes of `(in_h, in_w)` to `[channels, out_h, out_w]`;
/// `row(c, y, buf)` writes row `y` of channel `c` as f32, so the source can
/// be any layout and is never copied whole (a 50 Mpx upload stays u8).
fn resize_channels(
    channels: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
    row: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let w_taps = (in_w != out_w).then(|| AxisTaps::new(in_w, out_w));
    let h_taps = (in_h != out_h).then(|| AxisTaps::new(in_h, out_h));
    let one = |c: usize| {
        let row = |y: usize, buf: &mut [f32]| row(c, y, buf);
        // Width first, then height, as torch; an unchanged axis is skipped.
        let wide = match &w_taps {
            Some(t) => resize_rows(in_h, in_w, out_w, t, &row),
            None => {
                let mut plane = vec![0.0f32; in_h * in_w];
                for (y, buf) in plane.chunks_exact_mut(in_w).enumerate() {
                    row(y, buf);
                }
                plane
            }
        };
        match &h_taps {
            Some(t) => resize_cols(&wide, in_h, out_w, out_h, t),
            None => wide,
        }
    };
    // Channels are independent: resize them on separate threads when it pays.
    let planes: Vec<Vec<f32>> = if channels > 1 && (in_h * in_w).max(out_h * out_w) >= 256 * 256 {
        thread::scope(|s| {
            let handles: Vec<_> = (0..channels).map(|c| s.spawn(move || one(c))).collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("resize worker panicked"))
                .collect()
        })
    } else {
        (0..channels).map(one).collect()
    };
    planes.concat()
}

/// Resizes a planar `[channels, in_h, in_w]` f32 image to `[channels, out_h, out_w]`.
///
/// Panics if `src.len() != channels * in_h * in_w` or a size is zero: callers
/// pass buffers they built themselves.
pub fn resize_bicubic_antialias(
    src: &[f32],
    channels: usize,
    (in_h, in_w): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<f32> {
    assert_eq!(
        src.len(),
        channels * in_h * in_w,
        "resize: buffer is not [C, H, W]"
    );
    assert!(
        in_h > 0 && in_w > 0 && out_h > 0 && out_w > 0,
        "resize: empty size"
    );
    resize_channels(channels, (in_h, in_w), (out_h, out_w), |c, y, buf| {
        let at = (c * in_h + y) * in_w;
        buf.copy_from_slice(&src[at..at + in_w]);
    })
}

/// Resizes an RGB8 image to planar `[3, out_h, out_w]` f32 in 0..255, exactly
/// as [`resize_bicubic_antialias`] on the image converted to f32 (u8 → f32 is
/// exact), without materializing that conversion.
pub fn resize_rgb8_bicubic_antialias(image: &RgbImage, (out_h, out_w): (usize, usize)) -> Vec<f32> {
    let (w, h) = (image.width() as usize, image.height() as usize);
    assert!(
        w > 0 && h > 0 && out_h > 0 && out_w > 0,
        "resize: empty size"
    );
    let raw = image.as_raw();
    resize_channels(3, (h, w), (out_h, out_w), |c, y, buf| {
        let px = &raw[y * w * 3..(y + 1) * w * 3];
        for (b, p) in buf.iter_mut().zip(px.chunks_exact(3)) {
            *b = p[c] as f32;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_values() {
        assert_eq!(cubic_aa(0.0), 1.0);
        assert_eq!(cubic_aa(1.0), 0.0);
        assert_eq!(cubic_aa(2.0), 0.0);
        assert!((cubic_aa(0.5) - 0.5625).abs() < 1e-7);
        assert!((cubic_aa(1.5) + 0.0625).abs() < 1e-7);
    }

    #[test]
    fn weights_sum_to_one_and_stay_in_range() {
        for (i, o) in [
            (100, 37),
            (37, 100),
            (512, 512 * 3),
            (1080, 512),
            (7, 1),
            (1, 5),
        ] {
            let t = AxisTaps::new(i, o);
            for k in 0..o {
                let (start, w) = t.taps(k);
                assert!(start + w.len() <= i && !w.is_empty(), "{i}->{o} out {k}");
                let s: f32 = w.iter().sum();
                assert!((s - 1.0).abs() < 1e-5, "{i}->{o} out {k}: sum {s}");
            }
        }
    }

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![77.0f32; 3 * 45 * 61];
        for out in [(20, 30), (90, 122), (45, 13), (128, 61)] {
            let dst = resize_bicubic_antialias(&src, 3, (45, 61), out);
            assert_eq!(dst.len(), 3 * out.0 * out.1);
            assert!(dst.iter().all(|v| (v - 77.0).abs() < 1e-3));
        }
    }

    #[test]
    fn rgb8_matches_planar_f32() {
        let img = RgbImage::from_fn(300, 230, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        let mut planar = vec![0.0f32; 3 * 300 * 230];
        for (x, y, p) in img.enumerate_pixels() {
            for c in 0..3 {
                planar[(c * 230 + y as usize) * 300 + x as usize] = p[c] as f32;
            }
        }
        // Covers down- and up-scaling, a skipped axis, and the threaded path.
        for out in [(512, 512), (64, 300), (230, 97), (700, 1200)] {
            let a = resize_rgb8_bicubic_antialias(&img, out);
            let b = resize_bicubic_antialias(&planar, 3, (230, 300), out);
            assert_eq!(a, b, "{out:?}");
        }
    }

    #[test]
    fn identity_when_size_unchanged() {
        let src: Vec<f32> = (0..2 * 9 * 11).map(|i| i as f32).collect();
        assert_eq!(resize_bicubic_antialias(&src, 2, (9, 11), (9, 11)), src);
    }

    /// Integer 2× downscale of a 1-D ramp: PIL-style weights are symmetric, so
    /// interior outputs are the mean of the two centre inputs.
    #[test]
    fn ramp_downscale_interior_is_exact() {
        let w = 64;
        let src: Vec<f32> = (0..w).map(|x| x as f32).collect();
        let dst = resize_bicubic_antialias(&src, 1, (1, w), (1, w / 2));
        for (x, v) in dst.iter().enumerate().skip(2).take(w / 2 - 4) {
            assert!((v - (2 * x) as f32 - 0.5).abs() < 1e-4, "x {x}: {v}");
        }
    }

    /// Hand-computed torch values for a 4 → 2 downscale (scale 2, support 4):
    /// output 0 has centre 1.0 and taps x = 0..3 at distances
    /// (x + 0.5 - 1) / 2 = -0.25, 0.25, 0.75, 1.25.
    #[test]
    fn matches_hand_computed_weights() {
        let t = AxisTaps::new(4, 2);
        let (start, w) = t.taps(0);
        assert_eq!(start, 0);
        let raw = [
            cubic_aa(0.25),
            cubic_aa(0.25),
            cubic_aa(0.75),
            cubic_aa(1.25),
        ];
        let total: f32 = raw.iter().sum();
        assert_eq!(w.len(), 4);
        for (a, b) in w.iter().zip(raw) {
            assert!((a - b / total).abs() < 1e-7);
        }
    }
}
