//! Single-cell crops from a field-of-view image (REFERENCE.md §1 "Single-cell crops").
//!
//! **Centre convention.** Pixel (col i, row j) has its centre at (x = i, y = j), as in CellProfiler's
//! `Location_Center_X/Y` (0-based). A fractional centre (cx, cy) is rounded to the nearest pixel,
//! c = floor(cx + 0.5), and the B × B box covers columns c − B/2 … c − B/2 + B − 1 (for odd B,
//! c − (B−1)/2 …); rows alike. Pixels of the box outside the image are 0 (DeepProfiler's
//! `crop_and_resize` extrapolation value). No resizing and no mask: the cell is kept in context.
//!
//! **Normalisation**, per crop and channel, on the box including its zero padding:
//! - `DeepProfilerLegacy`: (x − min) / max (DeepProfiler before 2024-08, used for the published
//!   model); a channel whose max is 0 gives 0 rather than dividing by zero.
//! - `MinMax`: (x − min) / (max − min + 1e-6) (DeepProfiler after 2024-08).
//! - `None`: raw values as float32.

use crate::error::{Error, Result};
use crate::tensor::Tensor;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Normalization {
    DeepProfilerLegacy,
    MinMax,
    None,
}

impl Normalization {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "deepprofiler_legacy" => Ok(Self::DeepProfilerLegacy),
            "minmax" => Ok(Self::MinMax),
            "none" => Ok(Self::None),
            _ => Err(Error::InvalidArgument(format!(
                "unknown normalisation {s:?}: expected deepprofiler_legacy, minmax or none"
            ))),
        }
    }
}

/// DeepProfiler's epsilon in the min-max form.
pub const MINMAX_EPS: f32 = 1e-6;

/// A planar (C, H, W) image in one of the pixel types microscopes write.
#[derive(Clone, Copy, Debug)]
pub enum ImageData<'a> {
    U8(&'a [u8]),
    U16(&'a [u16]),
    F32(&'a [f32]),
}

impl ImageData<'_> {
    fn len(&self) -> usize {
        match self {
            ImageData::U8(v) => v.len(),
            ImageData::U16(v) => v.len(),
            ImageData::F32(v) => v.len(),
        }
    }

    #[inline(always)]
    fn get(&self, i: usize) -> f32 {
        match self {
            ImageData::U8(v) => v[i] as f32,
            ImageData::U16(v) => v[i] as f32,
            ImageData::F32(v) => v[i],
        }
    }
}

/// A field image: `channels` planes of `height` × `width`, row-major.
#[derive(Clone, Copy, Debug)]
pub struct Image<'a> {
    pub data: ImageData<'a>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

impl<'a> Image<'a> {
    pub fn new(data: ImageData<'a>, channels: usize, height: usize, width: usize) -> Result<Self> {
        if channels == 0 || height == 0 || width == 0 {
            return Err(Error::Shape(format!(
                "image shape ({channels}, {height}, {width}) has a zero dimension"
            )));
        }
        let need = channels
            .checked_mul(height)
            .and_then(|v| v.checked_mul(width))
            .ok_or_else(|| Error::Shape("image dimensions overflow".into()))?;
        if data.len() != need {
            return Err(Error::Shape(format!(
                "image ({channels}, {height}, {width}) needs {need} pixels, the buffer has {}",
                data.len()
            )));
        }
        if let ImageData::F32(v) = data {
            if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                let (c, r) = (i / (height * width), i % (height * width));
                return Err(Error::NonFinite(format!(
                    "image pixel (channel {c}, row {}, col {}) is {}",
                    r / width,
                    r % width,
                    v[i]
                )));
            }
        }
        Ok(Image {
            data,
            channels,
            height,
            width,
        })
    }
}

/// Crops a `box_size` box around each centre (x, y): returns (N, C, B, B) float32.
/// Centres must be finite; a centre may lie outside the image (its crop is then mostly zeros).
pub fn crop_cells(
    image: &Image,
    centers: &[[f32; 2]],
    box_size: usize,
    norm: Normalization,
) -> Result<Tensor> {
    let mut out = vec![0f32; centers.len() * image.channels * box_size * box_size];
    crop_cells_into(image, centers, box_size, norm, &mut out)?;
    Tensor::from_f32(&[centers.len(), image.channels, box_size, box_size], out)
}

/// As `crop_cells`, writing into `out` (len N·C·B·B).
pub fn crop_cells_into(
    image: &Image,
    centers: &[[f32; 2]],
    box_size: usize,
    norm: Normalization,
    out: &mut [f32],
) -> Result<()> {
    if box_size == 0 || box_size > 4096 {
        return Err(Error::InvalidArgument(format!(
            "box size {box_size} must be in 1..=4096"
        )));
    }
    let plane = box_size * box_size;
    let per_cell = image.channels * plane;
    if out.len() != centers.len() * per_cell {
        return Err(Error::Shape(format!(
            "crop output needs {} floats for {} cells, got {}",
            centers.len() * per_cell,
            centers.len(),
            out.len()
        )));
    }
    for (i, c) in centers.iter().enumerate() {
        if !c[0].is_finite() || !c[1].is_finite() || c[0].abs() > 1e9 || c[1].abs() > 1e9 {
            return Err(Error::InvalidArgument(format!(
                "centre {i} ({}, {}) is not a finite coordinate",
                c[0], c[1]
            )));
        }
    }
    use rayon::prelude::*;
    let half = (box_size / 2) as i64;
    let (h, w) = (image.height as i64, image.width as i64);
    crate::threads::install(|| {
        out.par_chunks_mut(per_cell)
            .zip(centers.par_iter())
            .for_each(|(cell, c)| {
                let x0 = (c[0] + 0.5).floor() as i64
                    - if box_size % 2 == 0 {
                        half
                    } else {
                        (box_size as i64 - 1) / 2
                    };
                let y0 = (c[1] + 0.5).floor() as i64
                    - if box_size % 2 == 0 {
                        half
                    } else {
                        (box_size as i64 - 1) / 2
                    };
                for (ch, dst) in cell.chunks_exact_mut(plane).enumerate() {
                    dst.fill(0.0);
                    let base = ch * image.height * image.width;
                    for r in 0..box_size as i64 {
                        let y = y0 + r;
                        if y < 0 || y >= h {
                            continue;
                        }
                        let xs = x0.max(0);
                        let xe = (x0 + box_size as i64).min(w);
                        if xs >= xe {
                            continue;
                        }
                        let row = &mut dst[(r as usize) * box_size..(r as usize + 1) * box_size];
                        let src = base + (y * w) as usize;
                        for x in xs..xe {
                            row[(x - x0) as usize] = image.data.get(src + x as usize);
                        }
                    }
                    normalize_plane(dst, norm);
                }
            });
    });
    Ok(())
}

fn normalize_plane(p: &mut [f32], norm: Normalization) {
    if norm == Normalization::None {
        return;
    }
    let (mut lo, mut hi) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in p.iter() {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let (shift, scale) = match norm {
        Normalization::DeepProfilerLegacy => (lo, if hi != 0.0 { 1.0 / hi } else { 0.0 }),
        Normalization::MinMax => (lo, 1.0 / (hi - lo + MINMAX_EPS)),
        Normalization::None => unreachable!(),
    };
    for v in p.iter_mut() {
        *v = (*v - shift) * scale;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(c: usize, h: usize, w: usize) -> Vec<u16> {
        (0..c * h * w).map(|i| (i % 65535) as u16 + 1).collect()
    }

    #[test]
    fn interior_crop_copies_pixels() {
        let (c, h, w) = (2, 20, 30);
        let px = ramp(c, h, w);
        let img = Image::new(ImageData::U16(&px), c, h, w).unwrap();
        let t = crop_cells(&img, &[[10.4, 9.6]], 4, Normalization::None).unwrap();
        assert_eq!(t.shape(), &[1, 2, 4, 4]);
        let v = t.as_f32().unwrap();
        // centre rounds to (10, 10); box columns 8..12, rows 8..12.
        for ch in 0..2 {
            for r in 0..4 {
                for q in 0..4 {
                    let src = px[ch * h * w + (8 + r) * w + 8 + q] as f32;
                    assert_eq!(v[ch * 16 + r * 4 + q], src);
                }
            }
        }
    }

    #[test]
    fn outside_is_zero_and_legacy_norm() {
        let px = vec![10u8; 8 * 8];
        let img = Image::new(ImageData::U8(&px), 1, 8, 8).unwrap();
        let t = crop_cells(&img, &[[0.0, 0.0]], 4, Normalization::DeepProfilerLegacy).unwrap();
        let v = t.as_f32().unwrap();
        // rows/cols -2,-1 are outside → 0; inside value 10 → (10-0)/10 = 1.
        assert_eq!(&v[0..4], &[0.0, 0.0, 0.0, 0.0]);
        assert_eq!(&v[8..12], &[0.0, 0.0, 1.0, 1.0]);
        let m = crop_cells(&img, &[[0.0, 0.0]], 4, Normalization::MinMax).unwrap();
        assert!((m.as_f32().unwrap()[10] - 10.0 / (10.0 + MINMAX_EPS)).abs() < 1e-6);
        // entirely outside: all zero, no NaN.
        let far = crop_cells(
            &img,
            &[[100.0, -50.0]],
            4,
            Normalization::DeepProfilerLegacy,
        )
        .unwrap();
        assert!(far.as_f32().unwrap().iter().all(|&x| x == 0.0));
    }

    #[test]
    fn bad_inputs_are_errors() {
        let px = vec![0f32; 2 * 4 * 4];
        assert!(Image::new(ImageData::F32(&px), 2, 4, 5).is_err());
        let mut bad = px.clone();
        bad[17] = f32::NAN;
        let e = Image::new(ImageData::F32(&bad), 2, 4, 4).unwrap_err();
        assert!(e.to_string().contains("channel 1"), "{e}");
        let img = Image::new(ImageData::F32(&px), 2, 4, 4).unwrap();
        assert!(crop_cells(&img, &[[f32::NAN, 1.0]], 4, Normalization::None).is_err());
        assert!(crop_cells(&img, &[[1.0, 1.0]], 0, Normalization::None).is_err());
        assert_eq!(
            crop_cells(&img, &[], 4, Normalization::None)
                .unwrap()
                .shape(),
            &[0, 2, 4, 4]
        );
    }
}
