//! The diffusion U-Net handle (MONAI `DiffusionModelUNet` + confounder tables, REFERENCE §10): new /
//! load / save / free, configuration, parameter count and forward. Arrays are NCHW f32; timesteps are
//! f64 (MONAI accepts integer or fractional timesteps; f64 holds both exactly); indices are i64 as
//! torch's, −1 meaning the null value of a confounder.
//!
//! Configurations are JSON objects with MONAI's argument names (`diffusion::config`), e.g.
//! `{"in_channels": 8, "out_channels": 8, "channels": [256, 512, 768], "attention_levels":
//! [false, true, true], "num_head_channels": [0, 512, 768], "with_conditioning": true,
//! "cross_attention_dim": 512, "confounders": {"source": 3, "batch": 10, "well": 384},
//! "null_embeddings": true}`; absent arguments take MONAI's defaults.

use super::boundary::{
    c_path, c_str, checked_len, guard, null, reference, slice, slice_mut, write_out,
};
use crate::diffusion::unet::{Conditioning, DiffusionUNet, UNetConfig, NULL};
use crate::error::{Error, PhenoStatus, Result};
use std::ffi::c_char;

/// A diffusion U-Net (f32, CPU).
///
/// Thread safety: immutable after creation except through `pheno_unet_free`, so any number of
/// threads may call `pheno_unet_forward` / `_save` / `_config_json` / `_num_parameters` on one U-Net
/// at the same time. `pheno_unet_free` must be called exactly once, after every other call on it
/// has returned.
pub struct PhenoUNet {
    pub(super) unet: DiffusionUNet<f32>,
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<PhenoUNet>();
};

unsafe fn config(config_json: *const c_char) -> Result<UNetConfig> {
    UNetConfig::from_json(c_str(config_json, "config_json")?)
}

pub(super) unsafe fn unet_ref<'a>(unet: *const PhenoUNet) -> Result<&'a DiffusionUNet<f32>> {
    Ok(&reference(unet, "unet")?.unet)
}

/// A U-Net with torch's default initialisation as MONAI builds it (MONAI's zero-initialised layers
/// zero; embeddings and the null context N(0, 1)), deterministic in `seed`. `config_json` is a JSON
/// object of MONAI `DiffusionModelUNet` arguments (module doc); an unknown key or an inconsistent
/// combination is an error naming it. On success `*out_unet` owns a new U-Net (free it with
/// `pheno_unet_free`); on failure it is set to NULL.
///
/// # Safety
/// `config_json` is a NUL-terminated string; `out_unet` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_unet_new(
    config_json: *const c_char,
    seed: u64,
    out_unet: *mut *mut PhenoUNet,
) -> PhenoStatus {
    guard("pheno_unet_new", || {
        super::boundary::publish_handle(out_unet, "out_unet", || {
            Ok(PhenoUNet {
                unet: DiffusionUNet::new(config(config_json)?, seed)?,
            })
        })
    })
}

/// Loads safetensors weights under current MONAI key names (older MONAI GenerativeModels names are
/// mapped) for the config `config_json`. A key missing, unexpected or of another shape than the
/// config needs is an error naming the first such key. On failure `*out_unet` is set to NULL.
///
/// # Safety
/// `path` and `config_json` are NUL-terminated strings; `out_unet` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_unet_load(
    path: *const c_char,
    config_json: *const c_char,
    out_unet: *mut *mut PhenoUNet,
) -> PhenoStatus {
    guard("pheno_unet_load", || {
        super::boundary::publish_handle(out_unet, "out_unet", || {
            let path = c_path(path, "path")?;
            Ok(PhenoUNet {
                unet: DiffusionUNet::load(path, config(config_json)?)?,
            })
        })
    })
}

/// Writes the weights as MONAI-named f32 safetensors to `path` (atomically: temp file + rename).
///
/// # Safety
/// `unet` is a live U-Net; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_unet_save(
    unet: *const PhenoUNet,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_unet_save", || {
        unet_ref(unet)?.save(c_path(path, "path")?)
    })
}

/// Frees a U-Net; NULL is a no-op.
///
/// # Safety
/// `unet` is NULL or a live U-Net from this library, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn pheno_unet_free(unet: *mut PhenoUNet) {
    if !unet.is_null() {
        drop(Box::from_raw(unet));
    }
}

/// The number of learned values (every parameter tensor's size summed, MONAI's
/// `sum(p.numel() for p in model.parameters())` plus the confounder tables and null context).
///
/// # Safety
/// `unet` is a live U-Net; `out_count` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_unet_num_parameters(
    unet: *const PhenoUNet,
    out_count: *mut usize,
) -> PhenoStatus {
    guard("pheno_unet_num_parameters", || {
        let n = unet_ref(unet)?.num_parameters();
        write_out(out_count, n, "out_count")
    })
}

/// The U-Net's full configuration as a JSON object (every key written, per-level values as lists,
/// confounders as `[name, n]` pairs in order), copied sqlite-style: `*out_needed` (if non-NULL)
/// receives the bytes needed including the terminating NUL; `buf` = NULL with `buf_len` = 0 only
/// asks for that length; a shorter `buf_len` is `PHENO_ERR_SHAPE`.
///
/// # Safety
/// `unet` is a live U-Net; `buf` is NULL or points to `buf_len` writable bytes; `out_needed` is
/// NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_unet_config_json(
    unet: *const PhenoUNet,
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
) -> PhenoStatus {
    guard("pheno_unet_config_json", || {
        let text = unet_ref(unet)?.config().to_json();
        let need = text.len() + 1;
        if !out_needed.is_null() {
            write_out(out_needed, need, "out_needed")?;
        }
        if buf.is_null() && buf_len == 0 {
            return Ok(());
        }
        if buf_len < need {
            return Err(Error::Shape(format!(
                "buf_len is {buf_len} but the config needs {need} bytes (with the terminating NUL)"
            )));
        }
        let out = slice_mut(buf as *mut u8, need, "buf")?;
        out[..text.len()].copy_from_slice(text.as_bytes());
        out[text.len()] = 0;
        Ok(())
    })
}

/// Non-negative i64 indices as usize; −1 → `NULL` where `allow_null`; anything else negative is an
/// error naming `what` and the position.
fn indices(v: &[i64], allow_null: bool, what: &str, k: usize) -> Result<Vec<usize>> {
    v.iter()
        .enumerate()
        .map(|(i, &x)| match x {
            -1 if allow_null => Ok(NULL),
            x if x >= 0 => usize::try_from(x).map_err(|_| {
                Error::InvalidArgument(format!("{what}[{i}] = {x} does not fit in usize"))
            }),
            x => Err(Error::InvalidArgument(format!(
                "{what}[{i}] (sample {}) is {x}; indices are >= 0{}",
                i / k.max(1),
                if allow_null {
                    " or -1 for the null value"
                } else {
                    ""
                }
            ))),
        })
        .collect()
}

/// Conditions read from C pointers (each NULL when unused), as `pheno_unet_forward` documents.
pub(super) struct Conditions<'a> {
    context: Option<&'a [f32]>,
    context_len: usize,
    context_null: Option<Vec<bool>>,
    class_labels: Option<Vec<usize>>,
    confounders: Option<Vec<usize>>,
}

impl Conditions<'_> {
    pub(super) fn get(&self) -> Conditioning<'_, f32> {
        Conditioning {
            context: self.context,
            context_len: self.context_len,
            context_null: self.context_null.as_deref(),
            class_labels: self.class_labels.as_deref(),
            confounders: self.confounders.as_deref(),
        }
    }
}

/// # Safety
/// Each non-NULL pointer points to the number of elements `pheno_unet_forward` documents.
pub(super) unsafe fn conditions<'a>(
    cfg: &UNetConfig,
    n: usize,
    context: *const f32,
    context_len: usize,
    context_null: *const u8,
    class_labels: *const i64,
    confounders: *const i64,
) -> Result<Conditions<'a>> {
    let context = if context.is_null() {
        None
    } else {
        let d = cfg.cross_attention_dim.unwrap_or(0);
        Some(slice(
            context,
            checked_len::<f32>(&[n, context_len, d], "context")?,
            "context",
        )?)
    };
    let context_null: Option<Vec<bool>> = if context_null.is_null() {
        None
    } else {
        Some(
            slice(context_null, n, "context_null")?
                .iter()
                .map(|&f| f != 0)
                .collect(),
        )
    };
    let class_labels = if class_labels.is_null() {
        None
    } else {
        Some(indices(
            slice(class_labels, n, "class_labels")?,
            false,
            "class_labels",
            1,
        )?)
    };
    let k = cfg.confounders.len();
    let confounders = if confounders.is_null() {
        None
    } else {
        let flat = slice(
            confounders,
            checked_len::<i64>(&[n, k], "confounders")?,
            "confounders",
        )?;
        Some(indices(flat, true, "confounders", k)?)
    };
    Ok(Conditions {
        context,
        context_len,
        context_null,
        class_labels,
        confounders,
    })
}

/// The model's prediction (noise, v or x₀, whatever it was trained for) for latents `x`
/// [n, c, h, w] (NCHW f32; c = in_channels, h and w multiples of 2^(levels − 1)) at `timesteps`
/// (n values, f64), written to `out` [n, out_channels, h, w] of `out_len` floats.
///
/// Conditions (each NULL when unused):
/// - `context` [n, context_len, cross_attention_dim] f32: the compound embeddings for
///   cross-attention (models with `with_conditioning`);
/// - `context_null` n bytes: non-zero = use the learned null context for that sample instead
///   (classifier-free guidance; needs `null_embeddings`); with `context` NULL every flag must be set;
/// - `class_labels` n i64: MONAI's single class table (models with `num_class_embeds`);
/// - `confounders` [n, K] i64, K = the config's number of confounders in its order: indices into
///   each table, −1 = the null value (needs `null_embeddings`).
///
/// Errors name the culprit: a latent shape the config cannot take, non-finite latents, context or
/// timesteps, an index out of range, a null condition on a model without null embeddings, a
/// condition the model does not have or lacks.
///
/// # Safety
/// `unet` is a live U-Net; `x` points to n·c·h·w floats, `timesteps` to n doubles; each non-NULL
/// condition pointer to the number of elements above; `out` to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_unet_forward(
    unet: *const PhenoUNet,
    x: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    timesteps: *const f64,
    context: *const f32,
    context_len: usize,
    context_null: *const u8,
    class_labels: *const i64,
    confounders: *const i64,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_unet_forward", || {
        let unet = unet_ref(unet)?;
        let cfg = unet.config();
        if c != cfg.in_channels {
            return Err(Error::Shape(format!(
                "x has {c} channels, the U-Net config expects in_channels = {}",
                cfg.in_channels
            )));
        }
        let len = checked_len::<f32>(&[n, c, h, w], "x")?;
        if x.is_null() {
            return Err(null("x"));
        }
        let x = slice(x, len, "x")?;
        if timesteps.is_null() {
            return Err(null("timesteps"));
        }
        let timesteps = slice(timesteps, n, "timesteps")?;
        let owned = conditions(
            cfg,
            n,
            context,
            context_len,
            context_null,
            class_labels,
            confounders,
        )?;
        let need = checked_len::<f32>(&[n, cfg.out_channels, h, w], "out")?;
        if out.is_null() {
            return Err(null("out"));
        }
        if out_len != need {
            return Err(Error::Shape(format!(
                "out holds {out_len} floats; the output {n} × {} × {h} × {w} needs {need}",
                cfg.out_channels
            )));
        }
        let cond = owned.get();
        let y = unet.predict(x, n, h, w, timesteps, &cond)?;
        if y.len() != need {
            return Err(Error::Internal(format!(
                "U-Net returned {} values, expected {need}",
                y.len()
            )));
        }
        slice_mut(out, need, "out")?.copy_from_slice(&y);
        Ok(())
    })
}
