//! Diffusion training and sampling over the C ABI (`diffusion::train`): a trainer handle that takes
//! latent batches pushed from the host (MSE on the prediction target, AdamW, gradient clipping, EMA,
//! condition dropout), atomic resumable checkpoints, and DDPM / DDIM sampling with classifier-free
//! guidance. Conditions are passed as in `pheno_unet_forward`.

use super::boundary::{
    c_path, checked_len, guard, null, publish_handle, slice, slice_mut, write_out,
};
use super::options::Prefix;
use super::unet::{conditions, unet_ref, PhenoUNet};
use crate::diffusion::scheduler::{BetaSchedule, PredictionType, SamplerKind, SchedulerConfig};
use crate::diffusion::train::{sample, DiffusionTrainOptions, DiffusionTrainer, SampleOptions};
use crate::diffusion::unet::DiffusionUNet;
use crate::error::{Error, PhenoStatus, Result};
use std::ffi::c_char;
use std::mem::{offset_of, size_of};

/// Options of `pheno_diffusion_trainer_new`; get the defaults from
/// `pheno_diffusion_trainer_default_options()` and change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoDiffusionTrainOptions {
    /// `sizeof(PhenoDiffusionTrainOptions)`.
    pub struct_size: usize,
    /// AdamW learning rate (default 1e-4), betas (0.9, 0.999), eps (1e-8), decoupled weight decay
    /// (1e-2).
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Max global gradient L2 norm (default 1.0); <= 0 = no clipping.
    pub clip_grad_norm: f64,
    /// EMA decay (default 0.9999, diffusers warm-up); < 0 = no EMA weights.
    pub ema_decay: f64,
    /// Probability that a sample's conditions all become their null values (default 0.1; needs
    /// null_embeddings when > 0).
    pub cond_dropout: f64,
    /// Noise schedule and prediction target (defaults: T = 1000, scaled linear 0.0015 → 0.0205,
    /// v-prediction). Values as `PhenoBetaSchedule` / `PhenoPredictionType`.
    pub num_train_timesteps: usize,
    pub schedule: i32,
    pub beta_start: f64,
    pub beta_end: f64,
    pub prediction_type: i32,
    /// Seed of the timestep / dropout / noise draws (default 0).
    pub seed: u64,
}

/// Options of `pheno_diffusion_sample`; defaults from `pheno_diffusion_sample_default_options()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoDiffusionSampleOptions {
    /// `sizeof(PhenoDiffusionSampleOptions)`.
    pub struct_size: usize,
    /// `PhenoSamplerKind`: DDPM (0) or DDIM (1, default) and DDIM's eta (default 0).
    pub kind: i32,
    pub eta: f64,
    /// The training schedule (must match the model's training; defaults as training's).
    pub num_train_timesteps: usize,
    pub schedule: i32,
    pub beta_start: f64,
    pub beta_end: f64,
    pub prediction_type: i32,
    /// Inference steps (default 50) and classifier-free guidance scale (default 1 = none).
    pub steps: usize,
    pub guidance_scale: f64,
    /// Seed of x_T and the sampler noise (default 0).
    pub seed: u64,
}

/// A diffusion trainer: the U-Net being trained, its EMA copy, AdamW state and RNG.
///
/// Thread safety: not thread-safe; one thread at a time (steps mutate it).
/// `pheno_diffusion_trainer_free` must be called exactly once.
pub struct PhenoDiffusionTrainer {
    trainer: DiffusionTrainer,
}

fn schedule(v: i32, what: &str) -> Result<BetaSchedule> {
    Ok(match v {
        0 => BetaSchedule::Linear,
        1 => BetaSchedule::ScaledLinear,
        2 => BetaSchedule::Cosine,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{what} is {v}; expected 0, 1 or 2 (PHENO_BETA_*)"
            )))
        }
    })
}

fn prediction(v: i32, what: &str) -> Result<PredictionType> {
    Ok(match v {
        0 => PredictionType::Epsilon,
        1 => PredictionType::VPrediction,
        2 => PredictionType::Sample,
        _ => {
            return Err(Error::InvalidArgument(format!(
                "{what} is {v}; expected 0, 1 or 2 (PHENO_PREDICT_*)"
            )))
        }
    })
}

fn schedule_code(s: BetaSchedule) -> i32 {
    match s {
        BetaSchedule::Linear => 0,
        BetaSchedule::ScaledLinear => 1,
        BetaSchedule::Cosine => 2,
    }
}

fn prediction_code(p: PredictionType) -> i32 {
    match p {
        PredictionType::Epsilon => 0,
        PredictionType::VPrediction => 1,
        PredictionType::Sample => 2,
    }
}

/// Default training options (REFERENCE §10; see the field docs).
#[no_mangle]
pub extern "C" fn pheno_diffusion_trainer_default_options() -> PhenoDiffusionTrainOptions {
    let d = DiffusionTrainOptions::default();
    PhenoDiffusionTrainOptions {
        struct_size: size_of::<PhenoDiffusionTrainOptions>(),
        lr: d.lr,
        beta1: d.betas.0,
        beta2: d.betas.1,
        eps: d.eps,
        weight_decay: d.weight_decay,
        clip_grad_norm: d.clip_grad_norm.unwrap_or(0.0),
        ema_decay: d.ema_decay.unwrap_or(-1.0),
        cond_dropout: d.cond_dropout,
        num_train_timesteps: d.scheduler.num_train_timesteps,
        schedule: schedule_code(d.scheduler.schedule),
        beta_start: d.scheduler.beta_start,
        beta_end: d.scheduler.beta_end,
        prediction_type: prediction_code(d.scheduler.prediction_type),
        seed: d.seed,
    }
}

/// Default sampling options: DDIM (eta 0), 50 steps, no guidance, seed 0, the training schedule's
/// defaults.
#[no_mangle]
pub extern "C" fn pheno_diffusion_sample_default_options() -> PhenoDiffusionSampleOptions {
    let d = SampleOptions::default();
    PhenoDiffusionSampleOptions {
        struct_size: size_of::<PhenoDiffusionSampleOptions>(),
        kind: match d.scheduler.kind {
            SamplerKind::Ddpm => 0,
            SamplerKind::Ddim => 1,
        },
        eta: d.scheduler.eta,
        num_train_timesteps: d.scheduler.num_train_timesteps,
        schedule: schedule_code(d.scheduler.schedule),
        beta_start: d.scheduler.beta_start,
        beta_end: d.scheduler.beta_end,
        prediction_type: prediction_code(d.scheduler.prediction_type),
        steps: d.steps,
        guidance_scale: d.guidance_scale,
        seed: d.seed,
    }
}

unsafe fn train_opts(p: *const PhenoDiffusionTrainOptions) -> Result<DiffusionTrainOptions> {
    let mut o = DiffusionTrainOptions::default();
    let Some(pre) = Prefix::new(p, "opts", "pheno_diffusion_trainer_default_options")? else {
        return Ok(o);
    };
    macro_rules! field {
        ($f:ident, $t:ty) => {
            pre.field::<$t>(offset_of!(PhenoDiffusionTrainOptions, $f))
        };
    }
    if let Some(v) = field!(lr, f64) {
        o.lr = v;
    }
    if let Some(v) = field!(beta1, f64) {
        o.betas.0 = v;
    }
    if let Some(v) = field!(beta2, f64) {
        o.betas.1 = v;
    }
    if let Some(v) = field!(eps, f64) {
        o.eps = v;
    }
    if let Some(v) = field!(weight_decay, f64) {
        o.weight_decay = v;
    }
    if let Some(v) = field!(clip_grad_norm, f64) {
        o.clip_grad_norm = (v > 0.0).then_some(v);
    }
    if let Some(v) = field!(ema_decay, f64) {
        o.ema_decay = (v >= 0.0).then_some(v);
    }
    if let Some(v) = field!(cond_dropout, f64) {
        o.cond_dropout = v;
    }
    if let Some(v) = field!(num_train_timesteps, usize) {
        o.scheduler.num_train_timesteps = v;
    }
    if let Some(v) = field!(schedule, i32) {
        o.scheduler.schedule = schedule(v, "opts->schedule")?;
    }
    if let Some(v) = field!(beta_start, f64) {
        o.scheduler.beta_start = v;
    }
    if let Some(v) = field!(beta_end, f64) {
        o.scheduler.beta_end = v;
    }
    if let Some(v) = field!(prediction_type, i32) {
        o.scheduler.prediction_type = prediction(v, "opts->prediction_type")?;
    }
    if let Some(v) = field!(seed, u64) {
        o.seed = v;
    }
    o.validate()?;
    Ok(o)
}

unsafe fn sample_opts(p: *const PhenoDiffusionSampleOptions) -> Result<SampleOptions> {
    let mut o = SampleOptions::default();
    let Some(pre) = Prefix::new(p, "opts", "pheno_diffusion_sample_default_options")? else {
        return Ok(o);
    };
    macro_rules! field {
        ($f:ident, $t:ty) => {
            pre.field::<$t>(offset_of!(PhenoDiffusionSampleOptions, $f))
        };
    }
    let sc: &mut SchedulerConfig = &mut o.scheduler;
    if let Some(v) = field!(kind, i32) {
        sc.kind = match v {
            0 => SamplerKind::Ddpm,
            1 => SamplerKind::Ddim,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "opts->kind is {v}; expected PHENO_SAMPLER_DDPM (0) or PHENO_SAMPLER_DDIM (1)"
                )))
            }
        };
    }
    if let Some(v) = field!(eta, f64) {
        sc.eta = v;
    }
    if let Some(v) = field!(num_train_timesteps, usize) {
        sc.num_train_timesteps = v;
    }
    if let Some(v) = field!(schedule, i32) {
        sc.schedule = schedule(v, "opts->schedule")?;
    }
    if let Some(v) = field!(beta_start, f64) {
        sc.beta_start = v;
    }
    if let Some(v) = field!(beta_end, f64) {
        sc.beta_end = v;
    }
    if let Some(v) = field!(prediction_type, i32) {
        sc.prediction_type = prediction(v, "opts->prediction_type")?;
    }
    if let Some(v) = field!(steps, usize) {
        o.steps = v;
    }
    if let Some(v) = field!(guidance_scale, f64) {
        o.guidance_scale = v;
    }
    if let Some(v) = field!(seed, u64) {
        o.seed = v;
    }
    Ok(o)
}

fn copy_unet(u: &DiffusionUNet<f32>) -> Result<DiffusionUNet<f32>> {
    DiffusionUNet::from_state_dict(&u.state_dict()?, u.config().clone())
}

unsafe fn trainer_mut<'a>(t: *mut PhenoDiffusionTrainer) -> Result<&'a mut DiffusionTrainer> {
    t.as_mut()
        .map(|t| &mut t.trainer)
        .ok_or_else(|| null("trainer"))
}

unsafe fn trainer_ref<'a>(t: *const PhenoDiffusionTrainer) -> Result<&'a DiffusionTrainer> {
    t.as_ref()
        .map(|t| &t.trainer)
        .ok_or_else(|| null("trainer"))
}

/// A trainer for a call that reads its weights (`*const` in the header). On a device the call
/// refreshes the host's copy of the weights, a cache: what the trainer holds does not change. Like
/// every trainer call it needs the trainer to itself (trainers are not thread-safe).
///
/// # Safety
/// As [`trainer_mut`]; `t` came from this library as a `*mut` (every trainer handle does).
unsafe fn trainer_reading<'a>(t: *const PhenoDiffusionTrainer) -> Result<&'a mut DiffusionTrainer> {
    trainer_mut(t as *mut PhenoDiffusionTrainer)
}

/// A trainer starting from a copy of `unet`'s weights (`unet` itself is not changed and may be
/// freed). `opts` NULL = defaults. On failure `*out_trainer` is set to NULL.
///
/// # Safety
/// `unet` is a live U-Net; `opts` is NULL or valid for `opts->struct_size` bytes; `out_trainer` is
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_trainer_new(
    unet: *const PhenoUNet,
    opts: *const PhenoDiffusionTrainOptions,
    out_trainer: *mut *mut PhenoDiffusionTrainer,
) -> PhenoStatus {
    guard("pheno_diffusion_trainer_new", || {
        publish_handle(out_trainer, "out_trainer", || {
            let model = copy_unet(unet_ref(unet)?)?;
            Ok(PhenoDiffusionTrainer {
                trainer: DiffusionTrainer::new(model, train_opts(opts)?)?,
            })
        })
    })
}

/// Frees a trainer; NULL is a no-op.
///
/// # Safety
/// `trainer` is NULL or a live trainer, not used afterwards.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_trainer_free(trainer: *mut PhenoDiffusionTrainer) {
    if !trainer.is_null() {
        drop(Box::from_raw(trainer));
    }
}

/// One training step on latents [n, c, h, w] (NCHW f32) with their conditions (as
/// `pheno_unet_forward`; NULL when unused): draws timesteps, noise and condition dropout from the
/// trainer's seeded RNG, minimises the MSE to the prediction target with AdamW (after gradient
/// clipping) and updates the EMA weights. `*out_loss` (if non-NULL) gets the loss before the update.
/// A failed step (bad shape or condition, non-finite latents, loss or gradients) changes nothing.
///
/// # Safety
/// `trainer` is a live trainer; array pointers as `pheno_unet_forward`; `out_loss` NULL or valid.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_trainer_step(
    trainer: *mut PhenoDiffusionTrainer,
    latents: *const f32,
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    context: *const f32,
    context_len: usize,
    context_null: *const u8,
    class_labels: *const i64,
    confounders: *const i64,
    out_loss: *mut f32,
) -> PhenoStatus {
    guard("pheno_diffusion_trainer_step", || {
        let t = trainer_mut(trainer)?;
        let cfg = t.config().clone();
        if c != cfg.in_channels {
            return Err(Error::Shape(format!(
                "latents have {c} channels, the U-Net config expects in_channels = {}",
                cfg.in_channels
            )));
        }
        let len = checked_len::<f32>(&[n, c, h, w], "latents")?;
        if latents.is_null() {
            return Err(null("latents"));
        }
        let x = slice(latents, len, "latents")?;
        let owned = conditions(
            &cfg,
            n,
            context,
            context_len,
            context_null,
            class_labels,
            confounders,
        )?;
        let loss = t.step(x, n, h, w, &owned.get())?;
        if !out_loss.is_null() {
            write_out(out_loss, loss, "out_loss")?;
        }
        Ok(())
    })
}

/// Number of successful steps so far (restored by `pheno_diffusion_trainer_load_checkpoint`).
///
/// # Safety
/// `trainer` is a live trainer; `out_steps` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_trainer_steps(
    trainer: *const PhenoDiffusionTrainer,
    out_steps: *mut u64,
) -> PhenoStatus {
    guard("pheno_diffusion_trainer_steps", || {
        let s = trainer_ref(trainer)?.steps();
        write_out(out_steps, s, "out_steps")
    })
}

/// Writes a resumable checkpoint (weights under MONAI names, EMA weights, AdamW state, step, RNG)
/// atomically to `path`.
///
/// # Safety
/// `trainer` is a live trainer; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_trainer_save_checkpoint(
    trainer: *const PhenoDiffusionTrainer,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_diffusion_trainer_save_checkpoint", || {
        trainer_reading(trainer)?.save_checkpoint(c_path(path, "path")?)
    })
}

/// Restores a checkpoint of `pheno_diffusion_trainer_save_checkpoint` for the same U-Net config;
/// training then continues bit for bit as if never interrupted. On error nothing changes.
///
/// # Safety
/// `trainer` is a live trainer; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_trainer_load_checkpoint(
    trainer: *mut PhenoDiffusionTrainer,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_diffusion_trainer_load_checkpoint", || {
        trainer_mut(trainer)?.load_checkpoint(c_path(path, "path")?)
    })
}

/// A new U-Net handle with the trained weights (`ema` non-zero: the EMA weights, an error when the
/// trainer keeps none). Free it with `pheno_unet_free`.
///
/// # Safety
/// `trainer` is a live trainer; `out_unet` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_trainer_unet(
    trainer: *const PhenoDiffusionTrainer,
    ema: i32,
    out_unet: *mut *mut PhenoUNet,
) -> PhenoStatus {
    guard("pheno_diffusion_trainer_unet", || {
        publish_handle(out_unet, "out_unet", || {
            let t = trainer_reading(trainer)?;
            let m = if ema != 0 {
                t.ema_model()?.ok_or_else(|| {
                    Error::InvalidArgument(
                        "ema requested but the trainer keeps no EMA weights (ema_decay < 0)".into(),
                    )
                })?
            } else {
                t.model()?
            };
            Ok(PhenoUNet {
                unet: copy_unet(m)?,
            })
        })
    })
}

/// Generates n latents [n, out_channels, h, w] into `out` (`out_len` floats) with `unet` under the
/// conditions (as `pheno_unet_forward`, NULL when unused): x_T ~ N(0, 1) from `opts->seed`, then
/// `opts->steps` DDPM / DDIM steps; with `guidance_scale` != 1 the conditional and the
/// null-conditioned passes are combined (needs null_embeddings). `opts` NULL = defaults.
///
/// # Safety
/// `unet` is a live U-Net; `opts` NULL or valid for `opts->struct_size` bytes; condition pointers as
/// `pheno_unet_forward`; `out` points to `out_len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_diffusion_sample(
    unet: *const PhenoUNet,
    opts: *const PhenoDiffusionSampleOptions,
    n: usize,
    h: usize,
    w: usize,
    context: *const f32,
    context_len: usize,
    context_null: *const u8,
    class_labels: *const i64,
    confounders: *const i64,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_diffusion_sample", || {
        let u = unet_ref(unet)?;
        let cfg = u.config();
        let o = sample_opts(opts)?;
        let need = checked_len::<f32>(&[n, cfg.out_channels, h, w], "out")?;
        if out.is_null() {
            return Err(null("out"));
        }
        if out_len != need {
            return Err(Error::Shape(format!(
                "out holds {out_len} floats; {n} × {} × {h} × {w} latents need {need}",
                cfg.out_channels
            )));
        }
        let owned = conditions(
            cfg,
            n,
            context,
            context_len,
            context_null,
            class_labels,
            confounders,
        )?;
        let y = sample(u, &o, &owned.get(), n, h, w, None)?;
        if y.len() != need {
            return Err(Error::Internal(format!(
                "sample returned {} values, expected {need}",
                y.len()
            )));
        }
        slice_mut(out, need, "out")?.copy_from_slice(&y);
        Ok(())
    })
}
