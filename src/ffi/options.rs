//! Option structs. Each begins with `size_t struct_size`: a caller built against an older, smaller
//! struct gets defaults for the fields it does not know; a `struct_size` larger than this library's
//! struct is an error (the header is newer than the library). Fields are read one by one from raw
//! memory, so an out-of-range enum value from C is an error, not undefined behaviour.

use crate::error::{Error, Result};
use crate::models::efficientnet::Padding;
use crate::profiling::crops::Normalization;
use std::ffi::c_void;
use std::mem::{offset_of, size_of};

/// Convolution padding convention of an EfficientNet.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoPadding {
    /// torchvision: (k - 1) / 2 on every side (models trained in PyTorch).
    PHENO_PADDING_SYMMETRIC = 0,
    /// TensorFlow "SAME", extra row/column at the bottom/right (Keras / DeepProfiler weights).
    PHENO_PADDING_TF_SAME = 1,
}

/// Options for loading or creating an EfficientNet. Initialise with
/// `pheno_effnet_default_options()`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoEffnetOptions {
    /// `sizeof(PhenoEffnetOptions)`; set by `pheno_effnet_default_options()`.
    pub struct_size: usize,
    /// Padding convention (default symmetric).
    pub padding: PhenoPadding,
    /// Batch-norm epsilon: 1e-5 for torchvision weights (default), 1e-3 for Keras weights.
    pub bn_eps: f32,
    /// -1 = CPU (default); >= 0 = CUDA device ordinal: features (`pheno_effnet_features`,
    /// `pheno_effnet_features_from_image`) run on that GPU, class logits stay on the CPU. Needs a
    /// phenocore built with the `cuda` feature (else PHENO_ERR_UNSUPPORTED) and a usable driver
    /// and device (else PHENO_ERR_NO_DEVICE).
    pub device: i32,
}

/// Called after each batch with the number of cells done so far and the total. Return 0 to
/// continue, non-zero to cancel (the call then returns PHENO_ERR_CANCELLED). Runs on the thread
/// that made the call. It must not unwind (no C++ exception or longjmp may leave it) and must not
/// free the model it reports on.
pub type PhenoProgressFn =
    Option<unsafe extern "C" fn(done: usize, total: usize, user_data: *mut c_void) -> i32>;

/// Options for feature extraction. Initialise with `pheno_feature_default_options()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoFeatureOptions {
    /// `sizeof(PhenoFeatureOptions)`; set by `pheno_feature_default_options()`.
    pub struct_size: usize,
    /// Cells per forward pass; 0 = library default (64). Peak memory grows with it.
    pub batch_size: usize,
    /// Progress callback; may be NULL.
    pub progress: PhenoProgressFn,
    /// Passed unchanged to `progress`.
    pub user_data: *mut c_void,
}

/// Pixel type of a field image.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoPixelType {
    PHENO_PIXEL_U8 = 0,
    PHENO_PIXEL_U16 = 1,
    PHENO_PIXEL_F32 = 2,
}

/// Per-crop, per-channel intensity normalisation.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoNormalization {
    /// (x - min) / max, DeepProfiler before 2024-08 (the published Cell Painting CNN); default.
    PHENO_NORM_DEEPPROFILER_LEGACY = 0,
    /// (x - min) / (max - min + 1e-6), DeepProfiler after 2024-08.
    PHENO_NORM_MINMAX = 1,
    /// Raw pixel values as float.
    PHENO_NORM_NONE = 2,
}

/// Options for cropping cells. Initialise with `pheno_crop_default_options()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoCropOptions {
    /// `sizeof(PhenoCropOptions)`; set by `pheno_crop_default_options()`.
    pub struct_size: usize,
    /// Side of the square box around each centre, in pixels (default 128, at most 4096).
    pub box_size: usize,
    /// Normalisation (default DeepProfiler legacy).
    pub normalization: PhenoNormalization,
}

/// Default EfficientNet options: symmetric padding, bn_eps 1e-5, CPU.
#[no_mangle]
pub extern "C" fn pheno_effnet_default_options() -> PhenoEffnetOptions {
    PhenoEffnetOptions {
        struct_size: size_of::<PhenoEffnetOptions>(),
        padding: PhenoPadding::PHENO_PADDING_SYMMETRIC,
        bn_eps: 1e-5,
        device: -1,
    }
}

/// Default feature options: batch size 64, no progress callback.
#[no_mangle]
pub extern "C" fn pheno_feature_default_options() -> PhenoFeatureOptions {
    PhenoFeatureOptions {
        struct_size: size_of::<PhenoFeatureOptions>(),
        batch_size: DEFAULT_BATCH,
        progress: None,
        user_data: std::ptr::null_mut(),
    }
}

/// Default crop options: 128-pixel box, DeepProfiler legacy normalisation.
#[no_mangle]
pub extern "C" fn pheno_crop_default_options() -> PhenoCropOptions {
    PhenoCropOptions {
        struct_size: size_of::<PhenoCropOptions>(),
        box_size: 128,
        normalization: PhenoNormalization::PHENO_NORM_DEEPPROFILER_LEGACY,
    }
}

pub(crate) const DEFAULT_BATCH: usize = 64;

/// Reads the caller's struct field by field within its `struct_size`.
pub(crate) struct Prefix {
    base: *const u8,
    size: usize,
}

impl Prefix {
    /// # Safety
    /// `p`, if not NULL, must point to at least `p->struct_size` readable bytes.
    pub(crate) unsafe fn new<T>(
        p: *const T,
        what: &str,
        default_fn: &str,
    ) -> Result<Option<Prefix>> {
        if p.is_null() {
            return Ok(None);
        }
        let size = (p as *const usize).read_unaligned();
        if size < size_of::<usize>() {
            return Err(Error::InvalidArgument(format!(
                "{what}->struct_size is {size}; initialise the struct with {default_fn}()"
            )));
        }
        if size > size_of::<T>() {
            return Err(Error::InvalidArgument(format!(
                "{what}->struct_size is {size} but this library's struct has {} bytes (header newer than the library?)",
                size_of::<T>()
            )));
        }
        Ok(Some(Prefix {
            base: p as *const u8,
            size,
        }))
    }

    /// The field at `offset` if it lies wholly within `struct_size`.
    ///
    /// # Safety
    /// `F` must be valid for any bit pattern of its size (integers, floats, pointers, Option<fn>).
    pub(crate) unsafe fn field<F: Copy>(&self, offset: usize) -> Option<F> {
        (offset + size_of::<F>() <= self.size)
            .then(|| (self.base.add(offset) as *const F).read_unaligned())
    }
}

/// Effective EfficientNet options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct EffnetOpts {
    pub padding: Padding,
    pub bn_eps: f32,
    /// The CUDA device ordinal for features, if any.
    pub device: Option<usize>,
}

/// # Safety
/// `p` is NULL or points to a `PhenoEffnetOptions` of at least `p->struct_size` bytes.
pub(crate) unsafe fn effnet_opts(p: *const PhenoEffnetOptions) -> Result<EffnetOpts> {
    let d = pheno_effnet_default_options();
    let mut o = EffnetOpts {
        padding: Padding::Symmetric,
        bn_eps: d.bn_eps,
        device: None,
    };
    let Some(pre) = Prefix::new(p, "opts", "pheno_effnet_default_options")? else {
        return Ok(o);
    };
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoEffnetOptions, padding)) {
        o.padding = match v {
            0 => Padding::Symmetric,
            1 => Padding::TfSame,
            _ => return Err(Error::InvalidArgument(format!("opts->padding is {v}; expected PHENO_PADDING_SYMMETRIC (0) or PHENO_PADDING_TF_SAME (1)"))),
        };
    }
    if let Some(v) = pre.field::<f32>(offset_of!(PhenoEffnetOptions, bn_eps)) {
        if !(v.is_finite() && v > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "opts->bn_eps is {v}; expected a positive finite number"
            )));
        }
        o.bn_eps = v;
    }
    if let Some(device) = pre.field::<i32>(offset_of!(PhenoEffnetOptions, device)) {
        if device < -1 {
            return Err(Error::InvalidArgument(format!(
                "opts->device is {device}; expected -1 (CPU) or a CUDA ordinal >= 0"
            )));
        }
        if device >= 0 {
            if !cfg!(feature = "cuda") {
                return Err(Error::Unsupported(format!(
                    "opts->device is {device} (CUDA) but this phenocore was built without the \
                     `cuda` feature; use device = -1 (CPU)"
                )));
            }
            o.device = Some(device as usize);
        }
    }
    Ok(o)
}

/// Effective feature options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FeatureOpts {
    pub batch: usize,
    pub progress: PhenoProgressFn,
    pub user_data: *mut c_void,
}

impl FeatureOpts {
    /// Reports progress; false when the callback asked to cancel.
    pub fn report(&self, done: usize, total: usize) -> bool {
        match self.progress {
            // SAFETY: the caller promised a valid callback taking its own user_data.
            Some(f) => unsafe { f(done, total, self.user_data) == 0 },
            None => true,
        }
    }
}

/// # Safety
/// `p` is NULL or points to a `PhenoFeatureOptions` of at least `p->struct_size` bytes.
pub(crate) unsafe fn feature_opts(p: *const PhenoFeatureOptions) -> Result<FeatureOpts> {
    let mut o = FeatureOpts {
        batch: DEFAULT_BATCH,
        progress: None,
        user_data: std::ptr::null_mut(),
    };
    let Some(pre) = Prefix::new(p, "opts", "pheno_feature_default_options")? else {
        return Ok(o);
    };
    if let Some(b) = pre.field::<usize>(offset_of!(PhenoFeatureOptions, batch_size)) {
        o.batch = if b == 0 { DEFAULT_BATCH } else { b };
    }
    if let Some(f) = pre.field::<PhenoProgressFn>(offset_of!(PhenoFeatureOptions, progress)) {
        o.progress = f;
    }
    if let Some(u) = pre.field::<*mut c_void>(offset_of!(PhenoFeatureOptions, user_data)) {
        o.user_data = u;
    }
    Ok(o)
}

/// Effective crop options.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CropOpts {
    pub box_size: usize,
    pub norm: Normalization,
}

/// # Safety
/// `p` is NULL or points to a `PhenoCropOptions` of at least `p->struct_size` bytes.
pub(crate) unsafe fn crop_opts(p: *const PhenoCropOptions, what: &str) -> Result<CropOpts> {
    let d = pheno_crop_default_options();
    let mut o = CropOpts {
        box_size: d.box_size,
        norm: Normalization::DeepProfilerLegacy,
    };
    let Some(pre) = Prefix::new(p, what, "pheno_crop_default_options")? else {
        return Ok(o);
    };
    if let Some(b) = pre.field::<usize>(offset_of!(PhenoCropOptions, box_size)) {
        o.box_size = b;
    }
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoCropOptions, normalization)) {
        o.norm = match v {
            0 => Normalization::DeepProfilerLegacy,
            1 => Normalization::MinMax,
            2 => Normalization::None,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "{what}->normalization is {v}; expected 0, 1 or 2 (PHENO_NORM_*)"
                )))
            }
        };
    }
    Ok(o)
}

/// Pixel type from the raw value in a `PhenoImage`.
pub(crate) fn pixel_type(v: i32) -> Result<PhenoPixelType> {
    match v {
        0 => Ok(PhenoPixelType::PHENO_PIXEL_U8),
        1 => Ok(PhenoPixelType::PHENO_PIXEL_U16),
        2 => Ok(PhenoPixelType::PHENO_PIXEL_F32),
        _ => Err(Error::InvalidArgument(format!(
            "image->pixel_type is {v}; expected 0, 1 or 2 (PHENO_PIXEL_*)"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaller_struct_reads_prefix_and_larger_is_rejected() {
        let mut o = pheno_crop_default_options();
        o.box_size = 32;
        o.normalization = PhenoNormalization::PHENO_NORM_NONE;
        // An older caller that only knew struct_size and box_size.
        o.struct_size = offset_of!(PhenoCropOptions, normalization);
        let r = unsafe { crop_opts(&o, "opts") }.unwrap();
        assert_eq!(
            (r.box_size, r.norm),
            (32, Normalization::DeepProfilerLegacy)
        );
        o.struct_size = size_of::<PhenoCropOptions>();
        let r = unsafe { crop_opts(&o, "opts") }.unwrap();
        assert_eq!((r.box_size, r.norm), (32, Normalization::None));
        o.struct_size = size_of::<PhenoCropOptions>() + 8;
        assert!(matches!(
            unsafe { crop_opts(&o, "opts") },
            Err(Error::InvalidArgument(_))
        ));
        o.struct_size = 0;
        let e = unsafe { crop_opts(&o, "opts") }.unwrap_err();
        assert!(e.to_string().contains("pheno_crop_default_options"), "{e}");
    }

    #[test]
    fn out_of_range_enums_and_bad_numbers_are_errors() {
        let mut raw = pheno_effnet_default_options();
        // Write 7 into the padding field without making an invalid Rust enum value.
        unsafe { (std::ptr::addr_of_mut!(raw.padding) as *mut i32).write(7) };
        let e = unsafe { effnet_opts(&raw) }.unwrap_err();
        assert!(e.to_string().contains("opts->padding is 7"), "{e}");
        let mut o = pheno_effnet_default_options();
        o.bn_eps = f32::NAN;
        assert!(matches!(
            unsafe { effnet_opts(&o) },
            Err(Error::InvalidArgument(_))
        ));
        o.bn_eps = 1e-3;
        o.padding = PhenoPadding::PHENO_PADDING_TF_SAME;
        let r = unsafe { effnet_opts(&o) }.unwrap();
        assert_eq!((r.padding, r.bn_eps), (Padding::TfSame, 1e-3));
        o.device = 0;
        // A CUDA ordinal: taken with the `cuda` feature (the device is opened with the model),
        // unsupported without it.
        match unsafe { effnet_opts(&o) } {
            Ok(r) if cfg!(feature = "cuda") => assert_eq!(r.device, Some(0)),
            Err(Error::Unsupported(m)) if !cfg!(feature = "cuda") => {
                assert!(m.contains("cuda"), "{m}")
            }
            other => panic!("device 0: unexpected {other:?}"),
        }
        o.device = -2;
        assert!(matches!(
            unsafe { effnet_opts(&o) },
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn feature_defaults_and_zero_batch() {
        let mut o = pheno_feature_default_options();
        o.batch_size = 0;
        let r = unsafe { feature_opts(&o) }.unwrap();
        assert_eq!(r.batch, 64);
        assert!(r.progress.is_none());
        let r = unsafe { feature_opts(std::ptr::null()) }.unwrap();
        assert_eq!(r.batch, DEFAULT_BATCH);
    }
}
