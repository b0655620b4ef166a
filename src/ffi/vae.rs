//! The VAE handle (diffusers `AutoencoderKL`, REFERENCE §10): load / new / save / free, encode (mean
//! and logvar), sample, decode, and the LDM paper's multi-channel group scheme. Arrays are NCHW f32.

use super::boundary::{
    c_path, c_str, checked_len, guard, null, reference, slice, slice_mut, write_out,
};
use crate::diffusion::vae::{AutoencoderKL, AutoencoderKLConfig, Nchw};
use crate::error::{Error, PhenoStatus, Result};
use rand::SeedableRng;
use std::ffi::c_char;

/// A diffusers AutoencoderKL (f32, CPU).
///
/// Thread safety: immutable after creation, so any number of threads may call functions on one
/// VAE at the same time. `pheno_vae_free` must be called exactly once, after every other call on it
/// has returned.
pub struct PhenoVae {
    vae: AutoencoderKL<f32>,
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<PhenoVae>();
};

/// Largest number of channel groups `pheno_vae_encode_groups` accepts.
const MAX_GROUPS: usize = 1024;

unsafe fn config(config_json: *const c_char) -> Result<AutoencoderKLConfig> {
    if config_json.is_null() {
        return Ok(AutoencoderKLConfig::sdxl());
    }
    AutoencoderKLConfig::from_json(c_str(config_json, "config_json")?)
}

unsafe fn vae_ref<'a>(vae: *const PhenoVae) -> Result<&'a AutoencoderKL<f32>> {
    Ok(&reference(vae, "vae")?.vae)
}

/// The NCHW input array `x` of `dims`, checked and copied.
unsafe fn input(x: *const f32, dims: [usize; 4], what: &str) -> Result<Nchw<f32>> {
    let len = checked_len::<f32>(&dims, what)?;
    if x.is_null() {
        return Err(null(what));
    }
    Nchw::new(dims, slice(x, len, what)?.to_vec())
}

/// Copies `a` into the caller's buffer `out` of `out_len` floats (which must be exactly `a`'s size).
unsafe fn output(a: &Nchw<f32>, out: *mut f32, out_len: usize, what: &str) -> Result<()> {
    if out.is_null() {
        return Err(null(what));
    }
    if out_len != a.data.len() {
        return Err(Error::Shape(format!(
            "{what} holds {out_len} floats, the result {:?} needs {}",
            a.shape,
            a.data.len()
        )));
    }
    slice_mut(out, out_len, what)?.copy_from_slice(&a.data);
    Ok(())
}

unsafe fn groups(
    groups: *const usize,
    num_groups: usize,
    group_size: usize,
) -> Result<Vec<Vec<usize>>> {
    if !(1..=MAX_GROUPS).contains(&num_groups) {
        return Err(Error::InvalidArgument(format!(
            "num_groups is {num_groups}; expected 1..={MAX_GROUPS}"
        )));
    }
    let flat = slice(
        groups,
        checked_len::<usize>(&[num_groups, group_size], "groups")?,
        "groups",
    )?;
    Ok(flat.chunks(group_size).map(|g| g.to_vec()).collect())
}

/// Loads diffusers safetensors weights (`diffusion_pytorch_model.safetensors`, f32/f16/bf16) for the
/// config `config_json` (a diffusers `config.json` text, or a JSON object with some of its keys, the
/// others taking their SDXL values; NULL = the SDXL VAE). A weight missing or of another shape than the
/// config needs is an error naming it. On success `*out_vae` owns a new VAE (free it with
/// `pheno_vae_free`); on failure it is set to NULL.
///
/// # Safety
/// `path` is a NUL-terminated string; `config_json` is NULL or NUL-terminated; `out_vae` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_load(
    path: *const c_char,
    config_json: *const c_char,
    out_vae: *mut *mut PhenoVae,
) -> PhenoStatus {
    guard("pheno_vae_load", || {
        super::boundary::publish_handle(out_vae, "out_vae", || {
            let path = c_path(path, "path")?;
            Ok(PhenoVae {
                vae: AutoencoderKL::load(config(config_json)?, path)?,
            })
        })
    })
}

/// A VAE with torch's default initialisation, deterministic in `seed`; `config_json` as
/// `pheno_vae_load`.
///
/// # Safety
/// As `pheno_vae_load`.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_new(
    config_json: *const c_char,
    seed: u64,
    out_vae: *mut *mut PhenoVae,
) -> PhenoStatus {
    guard("pheno_vae_new", || {
        super::boundary::publish_handle(out_vae, "out_vae", || {
            Ok(PhenoVae {
                vae: AutoencoderKL::new(config(config_json)?, seed)?,
            })
        })
    })
}

/// Writes the weights as diffusers-named f32 safetensors to `path` (atomically).
///
/// # Safety
/// `vae` is a live VAE; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_save(vae: *const PhenoVae, path: *const c_char) -> PhenoStatus {
    guard("pheno_vae_save", || {
        let vae = vae_ref(vae)?;
        vae.save(c_path(path, "path")?)
    })
}

/// Frees a VAE; NULL is a no-op.
///
/// # Safety
/// `vae` is NULL or a live VAE from this library, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_free(vae: *mut PhenoVae) {
    if !vae.is_null() {
        drop(Box::from_raw(vae));
    }
}

/// The VAE's image channels in / out, latent channels, spatial down-scaling factor
/// (2^(levels − 1), 8 for SDXL) and scaling factor. Every out-pointer may be NULL (not written).
///
/// # Safety
/// `vae` is a live VAE; each out-pointer is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_info(
    vae: *const PhenoVae,
    out_in_channels: *mut usize,
    out_out_channels: *mut usize,
    out_latent_channels: *mut usize,
    out_downscale: *mut usize,
    out_scaling_factor: *mut f64,
) -> PhenoStatus {
    guard("pheno_vae_info", || {
        let c = vae_ref(vae)?.config();
        for (p, v, what) in [
            (out_in_channels, c.in_channels, "out_in_channels"),
            (out_out_channels, c.out_channels, "out_out_channels"),
            (
                out_latent_channels,
                c.latent_channels,
                "out_latent_channels",
            ),
            (out_downscale, c.downscale(), "out_downscale"),
        ] {
            if !p.is_null() {
                write_out(p, v, what)?;
            }
        }
        if !out_scaling_factor.is_null() {
            write_out(out_scaling_factor, c.scaling_factor, "out_scaling_factor")?;
        }
        Ok(())
    })
}

/// Encodes images `x` [n, c, h, w] (NCHW, range [−1, 1]) into the latent Gaussian's mean and logvar
/// (clamped to [−30, 20]), each [n, latent_channels, h / f, w / f] of `out_len` floats. `out_logvar`
/// may be NULL.
///
/// # Safety
/// `vae` is a live VAE; `x` points to n·c·h·w floats; `out_mean` (and a non-NULL `out_logvar`) to
/// `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_encode(
    vae: *const PhenoVae,
    x: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    out_mean: *mut f32,
    out_logvar: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_vae_encode", || {
        let vae = vae_ref(vae)?;
        let x = input(x, [n, c, h, w], "x")?;
        let (mean, logvar) = vae.encode(&x)?;
        output(&mean, out_mean, out_len, "out_mean")?;
        if !out_logvar.is_null() {
            output(&logvar, out_logvar, out_len, "out_logvar")?;
        }
        Ok(())
    })
}

/// A draw mean + exp(logvar / 2)·ε of `len` values, ε standard normal from a ChaCha8 stream
/// seeded with `seed`.
///
/// # Safety
/// `mean`, `logvar` point to `len` floats, `out` to `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_sample(
    mean: *const f32,
    logvar: *const f32,
    len: usize,
    seed: u64,
    out: *mut f32,
) -> PhenoStatus {
    guard("pheno_vae_sample", || {
        let m = input(mean, [1, 1, 1, len], "mean")?;
        let lv = input(logvar, [1, 1, 1, len], "logvar")?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let s = AutoencoderKL::<f32>::sample(&m, &lv, &mut rng)?;
        output(&s, out, len, "out")
    })
}

/// Decodes latents `z` [n, c, h, w] in the VAE's own scale (diffusion latents divided by the scaling
/// factor) into images [n, out_channels, h·f, w·f] of `out_len` floats.
///
/// # Safety
/// `vae` is a live VAE; `z` points to n·c·h·w floats; `out` to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_decode(
    vae: *const PhenoVae,
    z: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_vae_decode", || {
        let vae = vae_ref(vae)?;
        let z = input(z, [n, c, h, w], "z")?;
        output(&vae.decode(&z)?, out, out_len, "out")
    })
}

/// The LDM paper's multi-channel encoding: `groups` holds `num_groups` rows of `in_channels` image
/// channel indices (e.g. {0,1,2, 2,3,4}); each group of `x` [n, c, h, w] is encoded and the latents
/// are concatenated and scaled: out [n, num_groups·latent_channels, h / f, w / f] of `out_len` floats.
/// `sample` = 0: the posterior means; otherwise draws seeded with `seed`.
///
/// # Safety
/// `vae` is a live VAE; `x` points to n·c·h·w floats; `groups` to num_groups·in_channels indices;
/// `out` to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_encode_groups(
    vae: *const PhenoVae,
    x: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    groups_flat: *const usize,
    num_groups: usize,
    sample: i32,
    seed: u64,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_vae_encode_groups", || {
        let vae = vae_ref(vae)?;
        let g = groups(groups_flat, num_groups, vae.config().in_channels)?;
        let x = input(x, [n, c, h, w], "x")?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let rng: Option<&mut dyn rand::RngCore> = if sample != 0 { Some(&mut rng) } else { None };
        output(&vae.encode5(&x, &g, rng)?, out, out_len, "out")
    })
}

/// Inverse of `pheno_vae_encode_groups`: latents [n, num_groups·latent_channels, h, w] → images
/// [n, C, h·f, w·f] (C = largest channel index + 1) of `out_len` floats; a channel in several groups
/// is the mean of its reconstructions.
///
/// # Safety
/// `vae` is a live VAE; `latents` points to n·c·h·w floats; `groups` to num_groups·out_channels
/// indices; `out` to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_vae_decode_groups(
    vae: *const PhenoVae,
    latents: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    groups_flat: *const usize,
    num_groups: usize,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_vae_decode_groups", || {
        let vae = vae_ref(vae)?;
        let g = groups(groups_flat, num_groups, vae.config().out_channels)?;
        let z = input(latents, [n, c, h, w], "latents")?;
        output(&vae.decode5(&z, &g)?, out, out_len, "out")
    })
}
