//! Single-cell crops and their augmentation on the device (`kernels/crop.cu`), with the bits of
//! [`crate::profiling::crops::crop_cells`] and [`crate::train::augment::apply`].
//!
//! [`CropPlan`] cuts B × B boxes around cell centres out of a plate image already on the device
//! (u8, u16 or f32 planes [C, H, W]), zero outside the image, normalised per crop and channel as
//! the CPU does; [`AugmentPlan`] applies per-crop augmentation draws made on the host with the
//! CPU's RNG ([`crate::train::augment::Augmentation::draw`]). Both write `[N, C, B, B]`
//! (`crop_cells`'s layout) or `[N, B, B, C]` (the models' NHWC activations).
//!
//! Every augmentation step of `augment.rs` is implemented (crop window + bilinear resize, flip,
//! rot90, brightness, contrast). The contrast mean is a fixed-order f64 tree sum where the CPU sums
//! in sequence: the same bits whenever the f64 sum is exact (crop values ≥ 2⁻¹⁵ in magnitude and
//! at most 2¹⁴ pixels per plane guarantee it); otherwise the mean may differ by one f32 ulp.

use super::kernels::CROP;
use super::{dim, grid_extent, Arg, Gpu, Launch};
use crate::error::{Error, Result};
use crate::profiling::crops::Normalization;
use crate::train::augment::AugmentParams;

/// Threads per block (`CROP_THREADS` in kernels/crop.cu; the reductions assume exactly this).
const CROP_THREADS: u32 = 256;

/// The pixel type of a plate image's planes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PixelType {
    U8,
    U16,
    F32,
}

impl PixelType {
    pub fn size_in_bytes(self) -> usize {
        match self {
            PixelType::U8 => 1,
            PixelType::U16 => 2,
            PixelType::F32 => 4,
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            PixelType::U8 => "u8",
            PixelType::U16 => "u16",
            PixelType::F32 => "f32",
        }
    }
}

/// The layout of a batch of crops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CropLayout {
    /// [N, C, B, B], as `crop_cells` returns and the trainer takes.
    Nchw,
    /// [N, B, B, C], the models' activation layout.
    Nhwc,
}

impl CropLayout {
    fn code(self) -> i32 {
        match self {
            CropLayout::Nchw => 0,
            CropLayout::Nhwc => 1,
        }
    }
}

/// The kernel's `CropGeom`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct CropGeom {
    pub cells: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub box_size: i32,
    pub norm: i32,
    pub layout: i32,
    pub pad: i32,
}

/// Crops of `box_size` from a [C, H, W] image of `pixel` type.
#[derive(Clone, Copy, Debug)]
pub struct CropPlan {
    pub pixel: PixelType,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub box_size: usize,
    pub norm: Normalization,
    pub layout: CropLayout,
}

impl CropPlan {
    /// Checks the image shape (no zero dimension, sizes within the kernels' `int`s) and the box
    /// size (1..=4096, as `crop_cells_into`).
    pub fn new(
        pixel: PixelType,
        [channels, height, width]: [usize; 3],
        box_size: usize,
        norm: Normalization,
        layout: CropLayout,
    ) -> Result<Self> {
        if channels == 0 || height == 0 || width == 0 {
            return Err(Error::Shape(format!(
                "crops on CUDA: image shape ({channels}, {height}, {width}) has a zero dimension"
            )));
        }
        if box_size == 0 || box_size > 4096 {
            return Err(Error::InvalidArgument(format!(
                "crops on CUDA: box size {box_size} must be in 1..=4096"
            )));
        }
        dim(channels, "image channels")?;
        dim(height, "image height")?;
        dim(width, "image width")?;
        Ok(CropPlan {
            pixel,
            channels,
            height,
            width,
            box_size,
            norm,
            layout,
        })
    }

    /// Pixels of the image (C·H·W, of the pixel type).
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// f32 values per crop (C·B·B).
    pub fn crop_len(&self) -> usize {
        self.channels * self.box_size * self.box_size
    }

    /// f32 values of `cells` crops.
    pub fn output_len(&self, cells: usize) -> usize {
        cells * self.crop_len()
    }

    /// The box origin (x0, y0) of each centre, as `crop_cells_into` computes it (the centre rounded
    /// to the nearest pixel, c = ⌊x + 0.5⌋, minus ⌊B / 2⌋); a centre that is not finite or is
    /// beyond ±1e9 is an `InvalidArgument` naming it.
    pub fn origins(&self, centers: &[[f32; 2]]) -> Result<Vec<[i32; 2]>> {
        let half = (self.box_size / 2) as i64;
        centers
            .iter()
            .enumerate()
            .map(|(i, c)| {
                if !c[0].is_finite() || !c[1].is_finite() || c[0].abs() > 1e9 || c[1].abs() > 1e9 {
                    return Err(Error::InvalidArgument(format!(
                        "crops on CUDA: centre {i} ({}, {}) is not a finite coordinate",
                        c[0], c[1]
                    )));
                }
                let x0 = (c[0] + 0.5).floor() as i64 - half;
                let y0 = (c[1] + 0.5).floor() as i64 - half;
                Ok([x0 as i32, y0 as i32])
            })
            .collect()
    }

    /// Crops around `centers` (host values; see [`CropPlan::origins`]) into `out`.
    ///
    /// # Safety
    /// `image` addresses `image_len()` pixels of the pixel type (finite, for f32, as
    /// `Image::new` requires); `out` `output_len(centers.len())` f32.
    pub unsafe fn extract(
        &self,
        g: &impl Gpu,
        image: u64,
        centers: &[[f32; 2]],
        out: u64,
    ) -> Result<()> {
        let origins = self.origins(centers)?;
        if origins.is_empty() {
            return Ok(());
        }
        let buf = g.upload_slice(&origins)?;
        self.extract_at(g, image, g.ptr(&buf), origins.len(), out)
    }

    /// Crops at box origins already on the device (`cells` pairs of i32 (x0, y0), e.g. from
    /// [`CropPlan::origins`]) into `out`.
    ///
    /// # Safety
    /// As [`CropPlan::extract`]; `origins` addresses 2·`cells` i32.
    pub unsafe fn extract_at(
        &self,
        g: &impl Gpu,
        image: u64,
        origins: u64,
        cells: usize,
        out: u64,
    ) -> Result<()> {
        if cells == 0 {
            return Ok(());
        }
        let planes = cells
            .checked_mul(self.channels)
            .ok_or_else(|| Error::Shape(format!("crops on CUDA: {cells} cells overflow")))?;
        let geom = CropGeom {
            cells: dim(cells, "cells")?,
            c: self.channels as i32,
            h: self.height as i32,
            w: self.width as i32,
            box_size: self.box_size as i32,
            norm: match self.norm {
                Normalization::None => 0,
                Normalization::DeepProfilerLegacy => 1,
                Normalization::MinMax => 2,
            },
            layout: self.layout.code(),
            pad: 0,
        };
        g.launch(&Launch {
            module: &CROP,
            entry: format!("crop_extract_{}", self.pixel.suffix()),
            grid: [grid_extent(planes, 0, "crops on CUDA")?, 1, 1],
            block: [CROP_THREADS, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(image),
                Arg::Ptr(origins),
                Arg::Ptr(out),
                Arg::pod(&geom),
            ],
        })
    }
}

/// The kernel's `AugGeom`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AugGeom {
    pub n: i32,
    pub c: i32,
    pub h: i32,
    pub w: i32,
    pub layout: i32,
    pub pad: i32,
}

/// One crop's draws, as the kernel's `AugCrop` (`sh` = 0: no crop window).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AugCrop {
    pub y0: i32,
    pub x0: i32,
    pub sh: i32,
    pub sw: i32,
    pub flip: i32,
    pub rot_k: i32,
    pub illum: i32,
    pub pad: i32,
}

/// Augmentation of N crops [N, C, H, W] (f32) into a distinct buffer of the plan's layout.
#[derive(Clone, Copy, Debug)]
pub struct AugmentPlan {
    pub geom: AugGeom,
    pub layout: CropLayout,
}

impl AugmentPlan {
    pub fn new([n, c, h, w]: [usize; 4], layout: CropLayout) -> Result<Self> {
        if [n, c, h, w].contains(&0) {
            return Err(Error::Shape(format!(
                "augment on CUDA: crop batch ({n}, {c}, {h}, {w}) has a zero dimension"
            )));
        }
        n.checked_mul(c)
            .and_then(|v| v.checked_mul(h))
            .and_then(|v| v.checked_mul(w))
            .ok_or_else(|| {
                Error::Shape(format!("augment on CUDA: ({n}, {c}, {h}, {w}) overflows"))
            })?;
        let geom = AugGeom {
            n: dim(n, "crops")?,
            c: dim(c, "channels")?,
            h: dim(h, "crop height")?,
            w: dim(w, "crop width")?,
            layout: layout.code(),
            pad: 0,
        };
        dim(n * c, "crop planes")?;
        Ok(AugmentPlan { geom, layout })
    }

    /// f32 values of the input and of the output.
    pub fn len(&self) -> usize {
        let g = &self.geom;
        g.n as usize * g.c as usize * g.h as usize * g.w as usize
    }

    /// Never empty (checked by `new`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The kernel's table for `params` (one per crop), checked as `augment::apply` checks them.
    pub fn table(&self, params: &[AugmentParams]) -> Result<(Vec<AugCrop>, Vec<f32>, Vec<f32>)> {
        let (n, c, h, w) = (
            self.geom.n as usize,
            self.geom.c as usize,
            self.geom.h as usize,
            self.geom.w as usize,
        );
        if params.len() != n {
            return Err(Error::Shape(format!(
                "augment on CUDA: {} parameter sets for {n} crops",
                params.len()
            )));
        }
        let mut table = Vec::with_capacity(n);
        let mut brightness = vec![0f32; n * c];
        let mut contrast = vec![1f32; n * c];
        for (i, p) in params.iter().enumerate() {
            let (y0, x0, sh, sw) = p.crop.unwrap_or((0, 0, 0, 0));
            if p.crop.is_some() && (sh == 0 || sw == 0 || y0 + sh > h || x0 + sw > w) {
                return Err(Error::InvalidArgument(format!(
                    "augment on CUDA: crop {i}: window (y0={y0}, x0={x0}, {sh}×{sw}) outside the {h}×{w} crop"
                )));
            }
            if p.rot_k % 4 != 0 && h != w {
                return Err(Error::Shape(format!(
                    "augment on CUDA: crop {i}: rot90 needs square planes, got {h}×{w}"
                )));
            }
            for (name, v) in [("brightness", &p.brightness), ("contrast", &p.contrast)] {
                if !v.is_empty() && v.len() != c {
                    return Err(Error::InvalidArgument(format!(
                        "augment on CUDA: crop {i}: {} {name} values for {c} channels",
                        v.len()
                    )));
                }
            }
            brightness[i * c..(i + 1) * c]
                .iter_mut()
                .zip(&p.brightness)
                .for_each(|(d, s)| *d = *s);
            contrast[i * c..(i + 1) * c]
                .iter_mut()
                .zip(&p.contrast)
                .for_each(|(d, s)| *d = *s);
            table.push(AugCrop {
                y0: y0 as i32,
                x0: x0 as i32,
                sh: sh as i32,
                sw: sw as i32,
                flip: p.flip as i32,
                rot_k: (p.rot_k % 4) as i32,
                illum: (!p.brightness.is_empty() || !p.contrast.is_empty()) as i32,
                pad: 0,
            });
        }
        Ok((table, brightness, contrast))
    }

    /// `output` = the crops of `input` ([N, C, H, W] f32, as `crop_cells` / [`CropPlan`] with
    /// `Nchw` writes them) augmented with `params[i]` for crop i, in the plan's layout.
    ///
    /// # Safety
    /// `input` and `output` address `len()` f32 each, in distinct buffers.
    pub unsafe fn apply(
        &self,
        g: &impl Gpu,
        params: &[AugmentParams],
        input: u64,
        output: u64,
    ) -> Result<()> {
        let (table, brightness, contrast) = self.table(params)?;
        let mut bytes = bytemuck::cast_slice::<AugCrop, u8>(&table).to_vec();
        let b_off = bytes.len() as u64;
        bytes.extend_from_slice(bytemuck::cast_slice(&brightness));
        let c_off = bytes.len() as u64;
        bytes.extend_from_slice(bytemuck::cast_slice(&contrast));
        let buf = g.upload(&bytes)?;
        let p = g.ptr(&buf);
        let planes = self.geom.n as usize * self.geom.c as usize;
        g.launch(&Launch {
            module: &CROP,
            entry: "crop_augment".into(),
            grid: [grid_extent(planes, 0, "augment on CUDA")?, 1, 1],
            block: [CROP_THREADS, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(input),
                Arg::Ptr(p),
                Arg::Ptr(p + b_off),
                Arg::Ptr(p + c_off),
                Arg::Ptr(output),
                Arg::pod(&self.geom),
            ],
        })
    }
}
