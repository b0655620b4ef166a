//! Drives the C entry points with fuzzer-chosen dimensions, lengths, option fields (raw enum
//! values and struct sizes included) and data. Every buffer really holds the length passed for it,
//! as a correct C caller's would; the library must answer with a status, never crash, never write
//! past the length it needs, and explain every failure in `pheno_last_error()`.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use phenocore::ffi::*;
use std::ffi::{c_void, CStr, CString};
use std::mem::{offset_of, size_of, MaybeUninit};
use std::sync::OnceLock;

/// Input channels of the shared model (made once: creating one per input would dominate).
const MODEL_C: usize = 3;
const MODEL_CLASSES: usize = 4;
const SENTINEL: f32 = -12345.0;

const LAYERS: [&str; 8] = [
    "block6a_activation",
    "top_activation",
    "stem_activation",
    "block2b_add",
    "features.3.1.block.2",
    "logits",
    "avg_pool",
    "block1a_project_bn",
];

#[derive(Arbitrary, Debug)]
struct ImageSpec {
    pixel_type: i32,
    channels: u8,
    height: u8,
    width: u8,
    bytes: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct CropSpec {
    struct_size_delta: i8,
    box_size: u8,
    normalization: i32,
}

#[derive(Arbitrary, Debug)]
struct FeatureSpec {
    struct_size_delta: i8,
    batch_size: u8,
    cancel_after: u8,
}

#[derive(Arbitrary, Debug)]
enum Layer {
    Known(u8),
    Raw(String),
}

#[derive(Arbitrary, Debug)]
enum Call {
    Status(i32),
    Crop {
        image: ImageSpec,
        centers: Vec<(f32, f32)>,
        opts: Option<CropSpec>,
        out_slack: i8,
    },
    Load {
        bytes: Vec<u8>,
        padding: i32,
        bn_eps: f32,
        device: i32,
        struct_size_delta: i8,
        with_opts: bool,
    },
    Features {
        n: u8,
        channels: u8,
        height: u8,
        width: u8,
        values: Vec<f32>,
        layers: Vec<Layer>,
        opts: Option<FeatureSpec>,
        slack: Vec<i8>,
    },
    Logits {
        n: u8,
        channels: u8,
        height: u8,
        width: u8,
        values: Vec<f32>,
        slack: i8,
    },
    FromImage {
        image: ImageSpec,
        centers: Vec<(f32, f32)>,
        crop: Option<CropSpec>,
        layers: Vec<Layer>,
        opts: Option<FeatureSpec>,
        slack: Vec<i8>,
    },
    LayerDim(Layer),
}

struct Model(*mut PhenoModel);
// SAFETY: a PhenoModel is immutable and documented as safe to share between threads.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

fn model() -> *const PhenoModel {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let mut m = std::ptr::null_mut();
            // SAFETY: valid out-pointer; NULL options mean defaults.
            let st =
                unsafe { pheno_effnet_new(MODEL_C, MODEL_CLASSES, 1, std::ptr::null(), &mut m) };
            assert_eq!(st, PhenoStatus::PHENO_OK);
            Model(m)
        })
        .0
}

fn last_error() -> String {
    // SAFETY: pheno_last_error never returns NULL and the text lives until our next call.
    unsafe { CStr::from_ptr(pheno_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A failed call must say why.
fn check(st: PhenoStatus, call: &str) -> bool {
    if st != PhenoStatus::PHENO_OK {
        let msg = last_error();
        assert!(
            !msg.is_empty(),
            "{call} failed with {st:?} and an empty last error"
        );
        assert_ne!(
            st,
            PhenoStatus::PHENO_ERR_INTERNAL,
            "{call}: internal error: {msg}"
        );
    }
    st == PhenoStatus::PHENO_OK
}

fn len_with_slack(need: usize, slack: i8) -> usize {
    // Keep buffers small: a huge `need` is only ever paired with a tiny buffer, which must fail.
    let need = need.min(1 << 22);
    need.saturating_add_signed(slack as isize)
}

/// Pixel storage with 4-byte alignment whatever the pixel type, plus a `PhenoImage` written field
/// by field (its pixel type may be any integer).
struct ImageBuf {
    storage: Vec<f32>,
    image: MaybeUninit<PhenoImage>,
}

fn image(spec: &ImageSpec) -> ImageBuf {
    let (c, h, w) = (
        spec.channels as usize % 8,
        spec.height as usize % 96,
        spec.width as usize % 96,
    );
    let elem = match spec.pixel_type {
        0 => 1,
        1 => 2,
        _ => 4,
    };
    let bytes = c * h * w * elem;
    let mut storage = vec![0f32; bytes.div_ceil(4)];
    {
        let raw: &mut [u8] = bytemuck_bytes(&mut storage);
        for (i, b) in raw.iter_mut().enumerate().take(bytes) {
            *b = spec
                .bytes
                .get(i % spec.bytes.len().max(1))
                .copied()
                .unwrap_or(0);
        }
    }
    let mut image = MaybeUninit::<PhenoImage>::zeroed();
    let base = image.as_mut_ptr() as *mut u8;
    // SAFETY: every write is inside the zeroed PhenoImage at its field's offset and type size.
    unsafe {
        (base.add(offset_of!(PhenoImage, data)) as *mut *const c_void)
            .write(storage.as_ptr() as *const c_void);
        (base.add(offset_of!(PhenoImage, pixel_type)) as *mut i32).write(spec.pixel_type);
        (base.add(offset_of!(PhenoImage, channels)) as *mut usize).write(c);
        (base.add(offset_of!(PhenoImage, height)) as *mut usize).write(h);
        (base.add(offset_of!(PhenoImage, width)) as *mut usize).write(w);
    }
    ImageBuf { storage, image }
}

fn bytemuck_bytes(v: &mut [f32]) -> &mut [u8] {
    // SAFETY: any f32 storage is valid as bytes, same length in bytes, alignment 1.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, v.len() * 4) }
}

/// Crop options as raw memory: struct_size and the normalisation may be anything.
fn crop_opts(spec: &CropSpec) -> MaybeUninit<PhenoCropOptions> {
    let mut o = MaybeUninit::<PhenoCropOptions>::zeroed();
    let base = o.as_mut_ptr() as *mut u8;
    let size =
        size_of::<PhenoCropOptions>().saturating_add_signed(spec.struct_size_delta as isize % 24);
    // SAFETY: writes at field offsets inside the zeroed struct.
    unsafe {
        (base.add(offset_of!(PhenoCropOptions, struct_size)) as *mut usize).write(size);
        (base.add(offset_of!(PhenoCropOptions, box_size)) as *mut usize)
            .write(spec.box_size as usize % 48);
        (base.add(offset_of!(PhenoCropOptions, normalization)) as *mut i32)
            .write(spec.normalization);
    }
    o
}

/// The box size the library will use: a struct too short to hold `box_size` gets the default.
fn effective_box(spec: &CropSpec) -> usize {
    let size =
        size_of::<PhenoCropOptions>().saturating_add_signed(spec.struct_size_delta as isize % 24);
    if size >= offset_of!(PhenoCropOptions, box_size) + size_of::<usize>() {
        spec.box_size as usize % 48
    } else {
        128
    }
}

/// Cancels once its budget (a u8 behind `user`) is spent. `user` is NULL when the options struct
/// was declared too short to hold `user_data`: the library then passes the default, NULL.
unsafe extern "C" fn progress(_done: usize, _total: usize, user: *mut c_void) -> i32 {
    let Some(left) = (user as *mut u8).as_mut() else {
        return 0;
    };
    if *left == 0 {
        return 1;
    }
    *left -= 1;
    0
}

fn feature_opts(spec: &FeatureSpec, budget: &mut u8) -> PhenoFeatureOptions {
    let mut o = pheno_feature_default_options();
    o.struct_size = o
        .struct_size
        .saturating_add_signed(spec.struct_size_delta as isize % 24);
    o.batch_size = spec.batch_size as usize % 5;
    *budget = spec.cancel_after;
    o.progress = Some(progress);
    o.user_data = budget as *mut u8 as *mut c_void;
    o
}

fn layer_names(layers: &[Layer]) -> Vec<CString> {
    layers
        .iter()
        .take(4)
        .map(|l| match l {
            Layer::Known(i) => CString::new(LAYERS[*i as usize % LAYERS.len()]).unwrap(),
            Layer::Raw(s) => CString::new(s.replace('\0', "")).unwrap(),
        })
        .collect()
}

/// Output buffers sized need + slack (each exactly as long as the length passed), sentinel-filled.
fn outputs(n: usize, names: &[CString], slack: &[i8]) -> (Vec<Vec<f32>>, Vec<usize>) {
    let mut bufs = Vec::new();
    let mut lens = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut dim = 0;
        // SAFETY: valid model, NUL-terminated name, valid out-pointer.
        let known = unsafe { pheno_effnet_layer_dim(model(), name.as_ptr(), &mut dim) }
            == PhenoStatus::PHENO_OK;
        let need = if known { n * dim } else { 8 };
        let len = len_with_slack(need, slack.get(i).copied().unwrap_or(0));
        bufs.push(vec![SENTINEL; len]);
        lens.push(len);
    }
    (bufs, lens)
}

/// After a successful call: the first n * dim floats are written and finite, the rest untouched.
fn check_outputs(n: usize, names: &[CString], bufs: &[Vec<f32>]) {
    for (name, buf) in names.iter().zip(bufs) {
        let mut dim = 0;
        // SAFETY: as above.
        unsafe { pheno_effnet_layer_dim(model(), name.as_ptr(), &mut dim) };
        let need = n * dim;
        assert!(
            buf[..need].iter().all(|v| v.is_finite() && *v != SENTINEL),
            "{name:?}: unwritten or non-finite"
        );
        assert!(
            buf[need..].iter().all(|v| *v == SENTINEL),
            "{name:?}: wrote past n x dim"
        );
    }
}

fn crops(
    n: u8,
    channels: u8,
    height: u8,
    width: u8,
    values: &[f32],
) -> (usize, usize, usize, usize, Vec<f32>) {
    let n = n as usize % 4;
    let c = if channels % 4 == 0 {
        MODEL_C
    } else {
        channels as usize % 6
    };
    let (h, w) = (height as usize % 40, width as usize % 40);
    let x = (0..n * c * h * w)
        .map(|i| values.get(i % values.len().max(1)).copied().unwrap_or(0.5))
        .collect();
    (n, c, h, w, x)
}

fn centers(c: &[(f32, f32)]) -> Vec<f32> {
    c.iter().take(6).flat_map(|&(x, y)| [x, y]).collect()
}

fuzz_target!(|call: Call| {
    match call {
        Call::Status(s) => {
            let p = pheno_status_str(PhenoStatusArg(s));
            assert!(!p.is_null());
        }
        Call::Crop {
            image: spec,
            centers: cs,
            opts,
            out_slack,
        } => {
            let img = image(&spec);
            let cs = centers(&cs);
            let n = cs.len() / 2;
            let o = opts.as_ref().map(crop_opts);
            let opts_ptr = o.as_ref().map_or(std::ptr::null(), |o| o.as_ptr());
            let box_size = opts.as_ref().map_or(128, effective_box);
            let channels = spec.channels as usize % 8;
            let need = n * channels * box_size * box_size;
            let len = len_with_slack(need, out_slack);
            let mut out = vec![SENTINEL; len];
            // SAFETY: every buffer holds the length passed for it.
            let st = unsafe {
                pheno_crop_cells(
                    img.image.as_ptr(),
                    cs.as_ptr(),
                    n,
                    opts_ptr,
                    out.as_mut_ptr(),
                    len,
                )
            };
            if check(st, "pheno_crop_cells") {
                assert!(len >= need);
                assert!(
                    out[need..].iter().all(|v| *v == SENTINEL),
                    "crop wrote past n x C x B x B"
                );
            }
            drop(img.storage);
        }
        Call::Load {
            bytes,
            padding,
            bn_eps,
            device,
            struct_size_delta,
            with_opts,
        } => {
            let mut o = MaybeUninit::<PhenoEffnetOptions>::zeroed();
            let base = o.as_mut_ptr() as *mut u8;
            let size = size_of::<PhenoEffnetOptions>()
                .saturating_add_signed(struct_size_delta as isize % 24);
            // SAFETY: writes at field offsets inside the zeroed struct.
            unsafe {
                (base.add(offset_of!(PhenoEffnetOptions, struct_size)) as *mut usize).write(size);
                (base.add(offset_of!(PhenoEffnetOptions, padding)) as *mut i32).write(padding);
                (base.add(offset_of!(PhenoEffnetOptions, bn_eps)) as *mut f32).write(bn_eps);
                (base.add(offset_of!(PhenoEffnetOptions, device)) as *mut i32).write(device);
            }
            let opts_ptr = if with_opts {
                o.as_ptr()
            } else {
                std::ptr::null()
            };
            let mut m = std::ptr::null_mut();
            // SAFETY: `bytes` holds bytes.len() bytes; valid out-pointer.
            let st = unsafe {
                pheno_effnet_load_from_memory(bytes.as_ptr(), bytes.len(), opts_ptr, &mut m)
            };
            if check(st, "pheno_effnet_load_from_memory") {
                assert!(!m.is_null());
                let (mut c, mut k) = (0, 0);
                // SAFETY: live model, valid out-pointers.
                assert_eq!(
                    unsafe { pheno_effnet_info(m, &mut c, &mut k) },
                    PhenoStatus::PHENO_OK
                );
                assert!(c >= 1 && k >= 1);
            } else {
                assert!(m.is_null(), "failed load left a handle");
            }
            // SAFETY: m is NULL or a live model used nowhere else.
            unsafe { pheno_effnet_free(m) };
        }
        Call::Features {
            n,
            channels,
            height,
            width,
            values,
            layers,
            opts,
            slack,
        } => {
            let (n, c, h, w, x) = crops(n, channels, height, width, &values);
            let names = layer_names(&layers);
            let ptrs: Vec<*const std::ffi::c_char> = names.iter().map(|s| s.as_ptr()).collect();
            let (mut bufs, lens) = outputs(n, &names, &slack);
            let outs: Vec<*mut f32> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
            let mut budget = 0u8;
            let fo = opts.as_ref().map(|s| feature_opts(s, &mut budget));
            let fo_ptr = fo.as_ref().map_or(std::ptr::null(), |o| o as *const _);
            // SAFETY: every buffer holds the length passed for it.
            let st = unsafe {
                pheno_effnet_features(
                    model(),
                    x.as_ptr(),
                    n,
                    c,
                    h,
                    w,
                    ptrs.as_ptr(),
                    ptrs.len(),
                    fo_ptr,
                    outs.as_ptr(),
                    lens.as_ptr(),
                )
            };
            if check(st, "pheno_effnet_features") {
                check_outputs(n, &names, &bufs);
            }
        }
        Call::Logits {
            n,
            channels,
            height,
            width,
            values,
            slack,
        } => {
            let (n, c, h, w, x) = crops(n, channels, height, width, &values);
            let need = n * MODEL_CLASSES;
            let len = len_with_slack(need, slack);
            let mut out = vec![SENTINEL; len];
            // SAFETY: every buffer holds the length passed for it.
            let st = unsafe {
                pheno_effnet_logits(model(), x.as_ptr(), n, c, h, w, out.as_mut_ptr(), len)
            };
            if check(st, "pheno_effnet_logits") {
                assert!(
                    out[..need].iter().all(|v| v.is_finite())
                        && out[need..].iter().all(|v| *v == SENTINEL)
                );
            }
        }
        Call::FromImage {
            image: spec,
            centers: cs,
            crop,
            layers,
            opts,
            slack,
        } => {
            let img = image(&spec);
            let cs = centers(&cs);
            let n = cs.len() / 2;
            let co = crop.as_ref().map(crop_opts);
            let co_ptr = co.as_ref().map_or(std::ptr::null(), |o| o.as_ptr());
            let names = layer_names(&layers);
            let ptrs: Vec<*const std::ffi::c_char> = names.iter().map(|s| s.as_ptr()).collect();
            let (mut bufs, lens) = outputs(n, &names, &slack);
            let outs: Vec<*mut f32> = bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
            let mut budget = 0u8;
            let fo = opts.as_ref().map(|s| feature_opts(s, &mut budget));
            let fo_ptr = fo.as_ref().map_or(std::ptr::null(), |o| o as *const _);
            // SAFETY: every buffer holds the length passed for it.
            let st = unsafe {
                pheno_effnet_features_from_image(
                    model(),
                    img.image.as_ptr(),
                    cs.as_ptr(),
                    n,
                    co_ptr,
                    ptrs.as_ptr(),
                    ptrs.len(),
                    fo_ptr,
                    outs.as_ptr(),
                    lens.as_ptr(),
                )
            };
            if check(st, "pheno_effnet_features_from_image") {
                check_outputs(n, &names, &bufs);
            }
            drop(img.storage);
        }
        Call::LayerDim(l) => {
            let name = layer_names(&[l]).remove(0);
            let mut d = 0;
            // SAFETY: valid model, NUL-terminated name, valid out-pointer.
            if check(
                unsafe { pheno_effnet_layer_dim(model(), name.as_ptr(), &mut d) },
                "pheno_effnet_layer_dim",
            ) {
                assert!(d >= 1);
            }
        }
    }
});
