//! Field images and centres → crops, and → features without holding every crop at once.

use super::boundary::{checked_len, guard, null, slice, slice_mut};
use super::model::{check_cell, run_batches, Outputs, PhenoModel};
use super::options::{
    crop_opts, feature_opts, pixel_type, PhenoCropOptions, PhenoFeatureOptions, PhenoPixelType,
};
use crate::error::{Error, PhenoStatus, Result};
use crate::profiling::crops::{crop_cells_into, Image, ImageData};
use std::ffi::{c_char, c_void};
use std::mem::offset_of;

/// A field-of-view image: `channels` planes of `height` x `width` pixels, planar and row-major
/// (C x H x W), of type `pixel_type`. `data` must be aligned for that type. The library only
/// reads it, during the call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoImage {
    pub data: *const c_void,
    pub pixel_type: PhenoPixelType,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// Reads a `PhenoImage` field by field (its `pixel_type` may hold any integer).
///
/// # Safety
/// `p` is NULL or points to a `PhenoImage` whose `data` holds channels * height * width pixels.
unsafe fn image<'a>(p: *const PhenoImage) -> Result<Image<'a>> {
    if p.is_null() {
        return Err(null("image"));
    }
    let base = p as *const u8;
    let data = (base.add(offset_of!(PhenoImage, data)) as *const *const c_void).read_unaligned();
    let kind = (base.add(offset_of!(PhenoImage, pixel_type)) as *const i32).read_unaligned();
    let c = (base.add(offset_of!(PhenoImage, channels)) as *const usize).read_unaligned();
    let h = (base.add(offset_of!(PhenoImage, height)) as *const usize).read_unaligned();
    let w = (base.add(offset_of!(PhenoImage, width)) as *const usize).read_unaligned();
    if data.is_null() {
        return Err(null("image->data"));
    }
    let pixels = match pixel_type(kind)? {
        PhenoPixelType::PHENO_PIXEL_U8 => ImageData::U8(slice(
            data as *const u8,
            checked_len::<u8>(&[c, h, w], "image")?,
            "image->data",
        )?),
        PhenoPixelType::PHENO_PIXEL_U16 => ImageData::U16(slice(
            data as *const u16,
            checked_len::<u16>(&[c, h, w], "image")?,
            "image->data",
        )?),
        PhenoPixelType::PHENO_PIXEL_F32 => ImageData::F32(slice(
            data as *const f32,
            checked_len::<f32>(&[c, h, w], "image")?,
            "image->data",
        )?),
    };
    Image::new(pixels, c, h, w)
}

/// # Safety
/// `centers` points to n x 2 floats (or is NULL with n == 0).
unsafe fn centers_slice<'a>(centers: *const f32, n: usize) -> Result<&'a [[f32; 2]]> {
    checked_len::<f32>(&[n, 2], "centers")?;
    let c = slice(centers as *const [f32; 2], n, "centers")?;
    if let Some(i) = c
        .iter()
        .position(|p| !p[0].is_finite() || !p[1].is_finite())
    {
        return Err(Error::InvalidArgument(format!(
            "centers[{i}] = ({}, {}) is not finite",
            c[i][0], c[i][1]
        )));
    }
    Ok(c)
}

/// Crops a box_size x box_size box around each of the `n` centres (x, y) (n x 2 float32, pixel
/// coordinates, 0-based, pixel (col i, row j) centred at (i, j); fractional centres round to the
/// nearest pixel; box pixels outside the image are 0) and normalises each crop and channel.
/// `out` receives n x channels x box_size x box_size floats; `out_len` is its capacity in floats.
/// `opts` may be NULL (box 128, DeepProfiler legacy normalisation). n == 0 writes nothing.
/// Thread-safe.
///
/// # Safety
/// All pointers valid for the lengths described above.
#[no_mangle]
pub unsafe extern "C" fn pheno_crop_cells(
    image: *const PhenoImage,
    centers: *const f32,
    n: usize,
    opts: *const PhenoCropOptions,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_crop_cells", || {
        let img = self::image(image)?;
        let centers = centers_slice(centers, n)?;
        let o = crop_opts(opts, "opts")?;
        // Validates the box size without cropping anything.
        crop_cells_into(&img, &[], o.box_size, o.norm, &mut [])?;
        let need = checked_len::<f32>(&[n, img.channels, o.box_size, o.box_size], "out")?;
        if out_len < need {
            return Err(Error::Shape(format!(
                "out_len is {out_len} floats but {n} crops of {} x {} x {} need {need}",
                img.channels, o.box_size, o.box_size
            )));
        }
        let out = slice_mut(out, need, "out")?;
        crop_cells_into(&img, centers, o.box_size, o.norm, out)
    })
}

/// Features of the `n` cells at `centers` in a field image: crops them as `pheno_crop_cells` does
/// (`crop_opts` may be NULL) and runs them through the model as `pheno_effnet_features` does, one
/// batch of `opts->batch_size` crops at a time, so memory does not grow with `n`. The progress
/// callback counts cells over all batches. Outputs as in `pheno_effnet_features`. Thread-safe on
/// one model.
///
/// # Safety
/// All pointers valid for the lengths described above.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_features_from_image(
    model: *const PhenoModel,
    image: *const PhenoImage,
    centers: *const f32,
    n: usize,
    crop_opts: *const PhenoCropOptions,
    layers: *const *const c_char,
    n_layers: usize,
    opts: *const PhenoFeatureOptions,
    out: *const *mut f32,
    out_lens: *const usize,
) -> PhenoStatus {
    guard("pheno_effnet_features_from_image", || {
        let handle = model.as_ref().ok_or_else(|| null("model"))?;
        let net = handle.net();
        let img = self::image(image)?;
        let centers = centers_slice(centers, n)?;
        let co = super::options::crop_opts(crop_opts, "crop_opts")?;
        crop_cells_into(&img, &[], co.box_size, co.norm, &mut [])?;
        check_cell(
            net,
            img.channels,
            co.box_size,
            co.box_size,
            "the image's crops",
        )?;
        let opts = feature_opts(opts)?;
        let outs = Outputs::new(net, n, layers, n_layers, out, out_lens)?;
        let names = outs.names();
        run_batches(
            n,
            [img.channels, co.box_size, co.box_size],
            &opts,
            &outs,
            |r, buf| crop_cells_into(&img, &centers[r], co.box_size, co.norm, buf),
            |t| handle.features(t, &names),
        )
    })
}
