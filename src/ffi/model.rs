//! The EfficientNet handle: create, load, save, query, free, and run on crops in batches.

use super::boundary::{c_path, c_str, checked_len, guard, null, reference, slice, write_out};
use super::options::{
    effnet_opts, feature_opts, EffnetOpts, FeatureOpts, PhenoEffnetOptions, PhenoFeatureOptions,
};
use crate::error::{Error, PhenoStatus, Result};
use crate::models::efficientnet::{EfficientNet, EfficientNetConfig};
use crate::tensor::{Storage, Tensor};
use std::ffi::c_char;
use std::ops::Range;

/// An EfficientNet-B0 (Cell Painting CNN) ready for inference on the CPU.
///
/// Thread safety: immutable after creation, so any number of threads may call functions on one
/// model at the same time. `pheno_effnet_free` must be called exactly once, after every other call
/// on the model has returned.
pub struct PhenoModel {
    net: EfficientNet,
    /// The inference weights on a CUDA device (`PhenoEffnetOptions::device` ≥ 0): features run
    /// there.
    #[cfg(feature = "cuda")]
    gpu: Option<GpuFeatures>,
}

/// A CUDA device and the model's inference weights on it.
#[cfg(feature = "cuda")]
struct GpuFeatures {
    dev: std::sync::Arc<crate::backend::cuda::CudaDevice>,
    model: crate::models::efficientnet::GpuEfficientNet<
        std::sync::Arc<crate::backend::cuda::CudaDevice>,
    >,
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<PhenoModel>();
};

impl PhenoModel {
    /// The model, on the device that `opts.device` names (the CPU for None).
    fn new(net: EfficientNet, opts: &EffnetOpts) -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            let gpu = match opts.device {
                Some(ordinal) => {
                    let dev = crate::backend::cuda::device(ordinal)?;
                    let model = crate::models::efficientnet::GpuEfficientNet::new(&dev, &net)?;
                    Some(GpuFeatures { dev, model })
                }
                None => None,
            };
            Ok(PhenoModel { net, gpu })
        }
        #[cfg(not(feature = "cuda"))]
        {
            // effnet_opts rejects a device without the `cuda` feature.
            debug_assert!(opts.device.is_none());
            Ok(PhenoModel { net })
        }
    }

    pub fn net(&self) -> &EfficientNet {
        &self.net
    }

    /// Mean-pooled features of `layers` for `crops`, on the model's device.
    pub(crate) fn features(&self, crops: &Tensor, layers: &[&str]) -> Result<Vec<Tensor>> {
        #[cfg(feature = "cuda")]
        if let Some(g) = &self.gpu {
            // One pass for every layer asked for.
            return g.model.features_multi(&g.dev, crops, layers);
        }
        self.net.features(crops, layers)
    }
}

/// Largest input channel count `pheno_effnet_new` accepts.
const MAX_IN_CHANNELS: usize = 4096;
/// Largest class count `pheno_effnet_new` accepts (the classifier alone is 1280 x classes floats).
const MAX_CLASSES: usize = 1 << 20;

/// # Safety
/// `out_model` is NULL or valid for a write.
unsafe fn publish(
    out_model: *mut *mut PhenoModel,
    make: impl FnOnce() -> Result<(EfficientNet, EffnetOpts)>,
) -> Result<()> {
    super::boundary::publish_handle(out_model, "out_model", || {
        let (net, opts) = make()?;
        PhenoModel::new(net, &opts)
    })
}

/// # Safety
/// `model` is NULL or a live model from this library.
unsafe fn model_ref<'a>(model: *const PhenoModel) -> Result<&'a EfficientNet> {
    Ok(&reference(model, "model")?.net)
}

/// Loads safetensors weights (torchvision names, f32/f16/bf16/f64) from `path`. In-channels and
/// classes come from the weight shapes. `opts` may be NULL (defaults). On success `*out_model`
/// owns a new model (free it with `pheno_effnet_free`); on failure it is set to NULL.
///
/// # Safety
/// `path` is a NUL-terminated string; `opts` is NULL or initialised by
/// `pheno_effnet_default_options()`; `out_model` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_load(
    path: *const c_char,
    opts: *const PhenoEffnetOptions,
    out_model: *mut *mut PhenoModel,
) -> PhenoStatus {
    guard("pheno_effnet_load", || {
        publish(out_model, || {
            let path = c_path(path, "path")?;
            let o = effnet_opts(opts)?;
            Ok((EfficientNet::load(path, o.padding, o.bn_eps)?, o))
        })
    })
}

/// As `pheno_effnet_load`, from the `len` bytes of a safetensors file in memory (not kept).
///
/// # Safety
/// `bytes` points to `len` readable bytes; other arguments as `pheno_effnet_load`.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_load_from_memory(
    bytes: *const u8,
    len: usize,
    opts: *const PhenoEffnetOptions,
    out_model: *mut *mut PhenoModel,
) -> PhenoStatus {
    guard("pheno_effnet_load_from_memory", || {
        publish(out_model, || {
            if bytes.is_null() {
                return Err(null("bytes"));
            }
            let bytes = slice(bytes, len, "bytes")?;
            let o = effnet_opts(opts)?;
            Ok((
                EfficientNet::from_safetensors_bytes(bytes, o.padding, o.bn_eps)?,
                o,
            ))
        })
    })
}

/// A freshly initialised model (torchvision's initialisation), deterministic in `seed`.
///
/// # Safety
/// As `pheno_effnet_load`.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_new(
    in_channels: usize,
    num_classes: usize,
    seed: u64,
    opts: *const PhenoEffnetOptions,
    out_model: *mut *mut PhenoModel,
) -> PhenoStatus {
    guard("pheno_effnet_new", || {
        publish(out_model, || {
            if !(1..=MAX_IN_CHANNELS).contains(&in_channels) {
                return Err(Error::InvalidArgument(format!(
                    "in_channels is {in_channels}; expected 1..={MAX_IN_CHANNELS}"
                )));
            }
            if !(1..=MAX_CLASSES).contains(&num_classes) {
                return Err(Error::InvalidArgument(format!(
                    "num_classes is {num_classes}; expected 1..={MAX_CLASSES}"
                )));
            }
            let o = effnet_opts(opts)?;
            let config = EfficientNetConfig {
                in_channels,
                num_classes,
                padding: o.padding,
                bn_eps: o.bn_eps,
            };
            Ok((EfficientNet::new(config, seed)?, o))
        })
    })
}

/// Writes the weights as safetensors (torchvision names, f32) to `path`, atomically: a temporary
/// file in the same folder is renamed over `path`, so a failure never leaves a truncated file.
///
/// # Safety
/// `model` is a live model; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_save(
    model: *const PhenoModel,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_effnet_save", || {
        let net = model_ref(model)?;
        let path = c_path(path, "path")?;
        net.save(path)
    })
}

/// Input channels and classifier classes of the model.
///
/// # Safety
/// `model` is a live model; both out-pointers are valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_info(
    model: *const PhenoModel,
    out_in_channels: *mut usize,
    out_num_classes: *mut usize,
) -> PhenoStatus {
    guard("pheno_effnet_info", || {
        let net = model_ref(model)?;
        if out_in_channels.is_null() {
            return Err(null("out_in_channels"));
        }
        if out_num_classes.is_null() {
            return Err(null("out_num_classes"));
        }
        write_out(out_in_channels, net.config().in_channels, "out_in_channels")?;
        write_out(out_num_classes, net.config().num_classes, "out_num_classes")
    })
}

/// Feature width of a named layer: channels, since features are mean-pooled over space.
fn layer_dim(net: &EfficientNet, name: &str) -> Result<usize> {
    net.layer_dim(name)
}

/// Width of the mean-pooled features of `layer` (Keras name such as "block6a_activation" or
/// "top_activation", or a torchvision path such as "features.6.0.block.1"); "logits" gives the
/// number of classes. Unknown names give PHENO_ERR_UNKNOWN_LAYER.
///
/// # Safety
/// `model` is a live model; `layer` a NUL-terminated string; `out_dim` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_layer_dim(
    model: *const PhenoModel,
    layer: *const c_char,
    out_dim: *mut usize,
) -> PhenoStatus {
    guard("pheno_effnet_layer_dim", || {
        let net = model_ref(model)?;
        let layer = c_str(layer, "layer")?;
        if out_dim.is_null() {
            return Err(null("out_dim"));
        }
        write_out(out_dim, layer_dim(net, layer)?, "out_dim")
    })
}

/// Releases a model. Accepts NULL.
///
/// # Safety
/// `model` is NULL or a live model not used by any other call, now or later.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_free(model: *mut PhenoModel) {
    if !model.is_null() {
        let _ =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| drop(Box::from_raw(model))));
    }
}

/// The caller's output buffers, one per requested layer, checked against `n` cells.
pub(crate) struct Outputs {
    names: Vec<String>,
    dims: Vec<usize>,
    bufs: Vec<*mut f32>,
}

impl Outputs {
    /// # Safety
    /// `layers` and `out` point to `n_layers` entries and `out_lens` to `n_layers` lengths;
    /// `out[i]` is writable for `out_lens[i]` floats.
    pub(crate) unsafe fn new(
        net: &EfficientNet,
        n: usize,
        layers: *const *const c_char,
        n_layers: usize,
        out: *const *mut f32,
        out_lens: *const usize,
    ) -> Result<Self> {
        if layers.is_null() {
            return Err(null("layers"));
        }
        if n_layers == 0 {
            return Err(Error::InvalidArgument(
                "n_layers is 0; request at least one layer".into(),
            ));
        }
        if out.is_null() {
            return Err(null("out"));
        }
        if out_lens.is_null() {
            return Err(null("out_lens"));
        }
        let layers = slice(layers, n_layers, "layers")?;
        let out = slice(out, n_layers, "out")?;
        let out_lens = slice(out_lens, n_layers, "out_lens")?;
        let mut o = Outputs {
            names: Vec::new(),
            dims: Vec::new(),
            bufs: Vec::new(),
        };
        for i in 0..n_layers {
            let name = c_str(layers[i], &format!("layers[{i}]"))?;
            let dim = layer_dim(net, name)?;
            let need = checked_len::<f32>(&[n, dim], &format!("out[{i}]"))?;
            if out_lens[i] < need {
                return Err(Error::Shape(format!(
                    "out_lens[{i}] is {} floats but layer {name:?} needs n x dim = {n} x {dim} = {need}",
                    out_lens[i]
                )));
            }
            if need > 0 && out[i].is_null() {
                return Err(null(&format!("out[{i}]")));
            }
            if (out[i] as usize) % std::mem::align_of::<f32>() != 0 {
                return Err(Error::InvalidArgument(format!(
                    "out[{i}] is not aligned to 4 bytes"
                )));
            }
            o.names.push(name.to_string());
            o.dims.push(dim);
            o.bufs.push(out[i]);
        }
        Ok(o)
    }

    /// Outputs for the logits only.
    fn logits(net: &EfficientNet, n: usize, out: *mut f32, out_len: usize) -> Result<Self> {
        let dim = net.config().num_classes;
        let need = checked_len::<f32>(&[n, dim], "out")?;
        if out_len < need {
            return Err(Error::Shape(format!(
                "out_len is {out_len} floats but the logits need n x num_classes = {n} x {dim} = {need}"
            )));
        }
        if need > 0 && out.is_null() {
            return Err(null("out"));
        }
        if (out as usize) % std::mem::align_of::<f32>() != 0 {
            return Err(Error::InvalidArgument(
                "out is not aligned to 4 bytes".into(),
            ));
        }
        Ok(Outputs {
            names: vec!["logits".into()],
            dims: vec![dim],
            bufs: vec![out],
        })
    }

    pub(crate) fn names(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }

    /// Copies the rows of cells `rows` for every layer into the caller's buffers.
    fn write(&self, rows: Range<usize>, feats: &[Tensor]) -> Result<()> {
        if feats.len() != self.bufs.len() {
            return Err(Error::Internal(format!(
                "{} layers requested, {} returned",
                self.bufs.len(),
                feats.len()
            )));
        }
        for (((f, &dim), &buf), name) in feats
            .iter()
            .zip(&self.dims)
            .zip(&self.bufs)
            .zip(&self.names)
        {
            let m = rows.len();
            if f.shape() != [m, dim] {
                return Err(Error::shape_mismatch("layer output", &[m, dim], f.shape()));
            }
            let src = f.as_f32()?;
            if let Some(i) = src.iter().position(|v| !v.is_finite()) {
                return Err(Error::NonFinite(format!(
                    "layer {name:?} of cell {} is {}: the crops overflow float32 inside the network (are they normalised?)",
                    rows.start + i / dim.max(1),
                    src[i]
                )));
            }
            // SAFETY: `buf` holds at least n * dim floats (checked in `new`), rows.end <= n, and
            // `src` is our own tensor, so the ranges cannot overlap.
            unsafe {
                std::ptr::copy_nonoverlapping(src.as_ptr(), buf.add(rows.start * dim), m * dim)
            };
        }
        Ok(())
    }
}

/// Runs the model over `n` cells of shape `cell` = (C, H, W) in batches of `opts.batch`: `fill`
/// writes the batch's cells into a reused buffer, `compute` maps the batch to per-layer tensors,
/// the rows go to `outs`, then progress is reported. Only one batch of crops exists at a time.
pub(crate) fn run_batches(
    n: usize,
    cell: [usize; 3],
    opts: &FeatureOpts,
    outs: &Outputs,
    mut fill: impl FnMut(Range<usize>, &mut [f32]) -> Result<()>,
    compute: impl Fn(&Tensor) -> Result<Vec<Tensor>>,
) -> Result<()> {
    let per_cell = checked_len::<f32>(&cell, "crop")?;
    let batch = opts.batch.max(1);
    let mut buf: Vec<f32> = Vec::new();
    let mut start = 0;
    while start < n {
        let end = start + batch.min(n - start);
        let len = checked_len::<f32>(&[end - start, per_cell], "batch")?;
        buf.clear();
        buf.try_reserve_exact(len).map_err(|_| {
            Error::OutOfMemory(format!(
                "a batch of {} crops needs {len} floats",
                end - start
            ))
        })?;
        buf.resize(len, 0.0);
        fill(start..end, &mut buf)?;
        let x = Tensor::from_f32(
            &[end - start, cell[0], cell[1], cell[2]],
            std::mem::take(&mut buf),
        )?;
        let feats = compute(&x)?;
        if let Storage::F32(v) = x.into_storage() {
            buf = v;
        }
        outs.write(start..end, &feats)?;
        if !opts.report(end, n) {
            return Err(Error::Cancelled);
        }
        start = end;
    }
    Ok(())
}

/// Checks crop dims (C, H, W) against the model.
pub(crate) fn check_cell(
    net: &EfficientNet,
    channels: usize,
    height: usize,
    width: usize,
    what: &str,
) -> Result<()> {
    if channels != net.config().in_channels {
        return Err(Error::Shape(format!(
            "{what} have {channels} channels but the model takes {}",
            net.config().in_channels
        )));
    }
    if height == 0 || width == 0 {
        return Err(Error::Shape(format!(
            "{what} are {height} x {width} pixels; both must be > 0"
        )));
    }
    Ok(())
}

/// The caller's crops, checked for length and finiteness.
///
/// # Safety
/// `crops` points to n * channels * height * width floats (or is NULL with n == 0).
unsafe fn crops_slice<'a>(crops: *const f32, dims: [usize; 4]) -> Result<&'a [f32]> {
    let len = checked_len::<f32>(&dims, "crops")?;
    let x = slice(crops, len, "crops")?;
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        let [_, c, h, w] = dims;
        return Err(Error::NonFinite(format!(
            "crops[{i}] (cell {}, channel {}, row {}, col {}) is {}",
            i / (c * h * w),
            i / (h * w) % c,
            i / w % h,
            i % w,
            x[i]
        )));
    }
    Ok(x)
}

/// Mean-pooled features of `n_layers` layers for `n` crops (n x channels x height x width
/// float32, row-major, normalised as the model expects). `out[i]` receives n x dim(layers[i])
/// floats (see `pheno_effnet_layer_dim`); `out_lens[i]` is its capacity in floats. `opts` may be
/// NULL. n == 0 writes nothing. On success every value written is finite (crops so large that the
/// network overflows give PHENO_ERR_NON_FINITE); on failure (including cancellation) the contents
/// of `out` are unspecified. Output buffers must not overlap each other or `crops`. Thread-safe
/// on one model.
///
/// # Safety
/// All pointers valid for the lengths described above.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_features(
    model: *const PhenoModel,
    crops: *const f32,
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    layers: *const *const c_char,
    n_layers: usize,
    opts: *const PhenoFeatureOptions,
    out: *const *mut f32,
    out_lens: *const usize,
) -> PhenoStatus {
    guard("pheno_effnet_features", || {
        let handle = reference(model, "model")?;
        let net = &handle.net;
        let x = crops_slice(crops, [n, channels, height, width])?;
        check_cell(net, channels, height, width, "crops")?;
        let opts = feature_opts(opts)?;
        let outs = Outputs::new(net, n, layers, n_layers, out, out_lens)?;
        let names = outs.names();
        let per = channels * height * width;
        run_batches(
            n,
            [channels, height, width],
            &opts,
            &outs,
            |r, buf| {
                buf.copy_from_slice(&x[r.start * per..r.end * per]);
                Ok(())
            },
            |t| handle.features(t, &names),
        )
    })
}

/// Class logits for `n` crops: `out` receives n x num_classes floats (`out_len` is its capacity).
/// Batches of 64. Same conventions as `pheno_effnet_features`. Thread-safe on one model.
///
/// # Safety
/// All pointers valid for the lengths described above.
#[no_mangle]
pub unsafe extern "C" fn pheno_effnet_logits(
    model: *const PhenoModel,
    crops: *const f32,
    n: usize,
    channels: usize,
    height: usize,
    width: usize,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_effnet_logits", || {
        let net = model_ref(model)?;
        let x = crops_slice(crops, [n, channels, height, width])?;
        check_cell(net, channels, height, width, "crops")?;
        let outs = Outputs::logits(net, n, out, out_len)?;
        let per = channels * height * width;
        let opts = feature_opts(std::ptr::null())?;
        run_batches(
            n,
            [channels, height, width],
            &opts,
            &outs,
            |r, buf| {
                buf.copy_from_slice(&x[r.start * per..r.end * per]);
                Ok(())
            },
            |t| Ok(vec![net.logits(t)?]),
        )
    })
}
