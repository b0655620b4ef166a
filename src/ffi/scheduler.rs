//! The diffusion noise scheduler handle (REFERENCE §10): β / ᾱ schedules, the forward process
//! (`add_noise`, `get_velocity`) and DDPM / DDIM sampler steps, as diffusers and MONAI compute them.

use super::boundary::{checked_len, guard, null, publish_handle, reference, slice, slice_mut};
use super::options::Prefix;
use crate::diffusion::scheduler::{
    BetaSchedule, PredictionType, SamplerKind, Scheduler, SchedulerConfig,
};
use crate::error::{Error, PhenoStatus, Result};
use std::mem::{offset_of, size_of};

/// Sampler run by `pheno_scheduler_step`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoSamplerKind {
    /// Ancestral DDPM, fixed-small posterior variance (default).
    PHENO_SAMPLER_DDPM = 0,
    /// DDIM with noise weight `eta`.
    PHENO_SAMPLER_DDIM = 1,
}

/// β schedule over the training timesteps.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoBetaSchedule {
    /// β = linspace(beta_start, beta_end, T) (MONAI "linear_beta").
    PHENO_BETA_LINEAR = 0,
    /// β = linspace(√beta_start, √beta_end, T)² (MONAI "scaled_linear_beta"; default).
    PHENO_BETA_SCALED_LINEAR = 1,
    /// Nichol & Dhariwal cosine ᾱ, s = 0.008, β ≤ 0.999 (MONAI "cosine"); ignores beta_start/end.
    PHENO_BETA_COSINE = 2,
}

/// What the denoising model predicts.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoPredictionType {
    /// The noise ε.
    PHENO_PREDICT_EPSILON = 0,
    /// v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (default).
    PHENO_PREDICT_V = 1,
    /// x0.
    PHENO_PREDICT_SAMPLE = 2,
}

/// Options of a scheduler. Initialise with `pheno_scheduler_default_options()` (REFERENCE §10),
/// then change fields. Booleans are 0 / non-zero.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoSchedulerOptions {
    /// `sizeof(PhenoSchedulerOptions)`; set by `pheno_scheduler_default_options()`.
    pub struct_size: usize,
    /// Default DDPM.
    pub kind: PhenoSamplerKind,
    /// T, training timesteps (default 1000).
    pub num_train_timesteps: usize,
    /// Default scaled linear.
    pub schedule: PhenoBetaSchedule,
    /// Default 0.0015 and 0.0205 (LDM paper); each in (0, 1).
    pub beta_start: f64,
    pub beta_end: f64,
    /// Default v-prediction.
    pub prediction_type: PhenoPredictionType,
    /// Clamp the predicted x0 to ±clip_sample_range (default 0: off, right for latents).
    pub clip_sample: i32,
    /// Default 1.0.
    pub clip_sample_range: f64,
    /// DDIM: ᾱ before the first timestep is 1 (default 1) or ᾱ₀ (0).
    pub set_alpha_to_one: i32,
    /// DDIM noise weight in [0, 1] (default 0: deterministic).
    pub eta: f64,
    /// Seed of the noise drawn by `pheno_scheduler_step` and `pheno_scheduler_noise` (default 0).
    pub seed: u64,
}

/// A noise schedule with its inference timesteps and seeded noise generator.
///
/// Thread safety: functions taking `const PhenoScheduler *` (add_noise, get_velocity, timesteps,
/// schedule) may run concurrently with each other; `pheno_scheduler_set_timesteps`, `_step` and
/// `_noise` need exclusive access. `pheno_scheduler_free` must be called exactly once, after every
/// other call on it has returned.
pub struct PhenoScheduler {
    inner: Scheduler,
}

/// Default options (REFERENCE §10): DDPM, T = 1000, scaled linear β 0.0015 → 0.0205,
/// v-prediction, no clipping, set_alpha_to_one, eta 0, seed 0.
#[no_mangle]
pub extern "C" fn pheno_scheduler_default_options() -> PhenoSchedulerOptions {
    let d = SchedulerConfig::default();
    PhenoSchedulerOptions {
        struct_size: size_of::<PhenoSchedulerOptions>(),
        kind: PhenoSamplerKind::PHENO_SAMPLER_DDPM,
        num_train_timesteps: d.num_train_timesteps,
        schedule: PhenoBetaSchedule::PHENO_BETA_SCALED_LINEAR,
        beta_start: d.beta_start,
        beta_end: d.beta_end,
        prediction_type: PhenoPredictionType::PHENO_PREDICT_V,
        clip_sample: d.clip_sample as i32,
        clip_sample_range: d.clip_sample_range,
        set_alpha_to_one: d.set_alpha_to_one as i32,
        eta: d.eta,
        seed: 0,
    }
}

/// Reads the caller's options (NULL = defaults) within its `struct_size`.
///
/// # Safety
/// `p` is NULL or points to a `PhenoSchedulerOptions` of at least `p->struct_size` bytes.
unsafe fn scheduler_opts(p: *const PhenoSchedulerOptions) -> Result<(SchedulerConfig, u64)> {
    let mut c = SchedulerConfig::default();
    let mut seed = 0u64;
    let Some(pre) = Prefix::new(p, "opts", "pheno_scheduler_default_options")? else {
        return Ok((c, seed));
    };
    macro_rules! field {
        ($f:ident, $t:ty) => {
            pre.field::<$t>(offset_of!(PhenoSchedulerOptions, $f))
        };
    }
    if let Some(v) = field!(kind, i32) {
        c.kind = match v {
            0 => SamplerKind::Ddpm,
            1 => SamplerKind::Ddim,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "opts->kind is {v}; expected PHENO_SAMPLER_DDPM (0) or PHENO_SAMPLER_DDIM (1)"
                )))
            }
        };
    }
    if let Some(v) = field!(num_train_timesteps, usize) {
        c.num_train_timesteps = v;
    }
    if let Some(v) = field!(schedule, i32) {
        c.schedule = match v {
            0 => BetaSchedule::Linear,
            1 => BetaSchedule::ScaledLinear,
            2 => BetaSchedule::Cosine,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "opts->schedule is {v}; expected 0, 1 or 2 (PHENO_BETA_*)"
                )))
            }
        };
    }
    if let Some(v) = field!(beta_start, f64) {
        c.beta_start = v;
    }
    if let Some(v) = field!(beta_end, f64) {
        c.beta_end = v;
    }
    if let Some(v) = field!(prediction_type, i32) {
        c.prediction_type = match v {
            0 => PredictionType::Epsilon,
            1 => PredictionType::VPrediction,
            2 => PredictionType::Sample,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "opts->prediction_type is {v}; expected 0, 1 or 2 (PHENO_PREDICT_*)"
                )))
            }
        };
    }
    if let Some(v) = field!(clip_sample, i32) {
        c.clip_sample = v != 0;
    }
    if let Some(v) = field!(clip_sample_range, f64) {
        c.clip_sample_range = v;
    }
    if let Some(v) = field!(set_alpha_to_one, i32) {
        c.set_alpha_to_one = v != 0;
    }
    if let Some(v) = field!(eta, f64) {
        c.eta = v;
    }
    if let Some(v) = field!(seed, u64) {
        seed = v;
    }
    Ok((c, seed))
}

/// A scheduler from `opts` (NULL = defaults). Errors name the offending option (INVALID_ARGUMENT).
/// On success `*out_scheduler` owns a new scheduler (free it with `pheno_scheduler_free`); on
/// failure it is set to NULL.
///
/// # Safety
/// `opts` is NULL or initialised by `pheno_scheduler_default_options()`; `out_scheduler` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_new(
    opts: *const PhenoSchedulerOptions,
    out_scheduler: *mut *mut PhenoScheduler,
) -> PhenoStatus {
    guard("pheno_scheduler_new", || {
        publish_handle(out_scheduler, "out_scheduler", || {
            let (config, seed) = scheduler_opts(opts)?;
            Ok(PhenoScheduler {
                inner: Scheduler::new(config, seed)?,
            })
        })
    })
}

/// Sets `num_inference_steps` timesteps, `arange(n) · (T / n)` (integer division) in descending
/// order (diffusers' "leading" spacing). n must be in 1..=T. Required before `pheno_scheduler_step`.
///
/// # Safety
/// `scheduler` is a live scheduler not used by another call during this one.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_set_timesteps(
    scheduler: *mut PhenoScheduler,
    num_inference_steps: usize,
) -> PhenoStatus {
    guard("pheno_scheduler_set_timesteps", || {
        let s = scheduler.as_mut().ok_or_else(|| null("scheduler"))?;
        s.inner.set_timesteps(num_inference_steps)
    })
}

/// Copies the inference timesteps (descending) into `out` (room for `out_len` values) and writes
/// their count to `*out_count` (0 before `pheno_scheduler_set_timesteps`). Pass `out` = NULL and
/// `out_len` = 0 to query the count; a smaller non-zero `out_len` is a SHAPE error.
///
/// # Safety
/// `scheduler` is a live scheduler; `out` is NULL or points to `out_len` writable values;
/// `out_count` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_timesteps(
    scheduler: *const PhenoScheduler,
    out: *mut i64,
    out_len: usize,
    out_count: *mut usize,
) -> PhenoStatus {
    guard("pheno_scheduler_timesteps", || {
        let s = reference(scheduler, "scheduler")?;
        if out_count.is_null() {
            return Err(null("out_count"));
        }
        let ts = s.inner.timesteps();
        out_count.write_unaligned(ts.len());
        if out_len == 0 {
            return Ok(());
        }
        if out_len < ts.len() {
            return Err(Error::Shape(format!(
                "out_len is {out_len} but there are {} timesteps",
                ts.len()
            )));
        }
        let o = slice_mut(out, ts.len(), "out")?;
        for (o, &t) in o.iter_mut().zip(ts) {
            *o = t as i64;
        }
        Ok(())
    })
}

/// Copies β_t and ᾱ_t (t = 0..T, float64) into `out_betas` and `out_alphas_cumprod`, each with
/// room for `len` values; `len` must equal num_train_timesteps. Either pointer may be NULL.
///
/// # Safety
/// `scheduler` is a live scheduler; non-NULL outputs point to `len` writable doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_schedule(
    scheduler: *const PhenoScheduler,
    out_betas: *mut f64,
    out_alphas_cumprod: *mut f64,
    len: usize,
) -> PhenoStatus {
    guard("pheno_scheduler_schedule", || {
        let s = reference(scheduler, "scheduler")?;
        let t = s.inner.num_train_timesteps();
        if len != t {
            return Err(Error::Shape(format!(
                "len is {len} but num_train_timesteps is {t}"
            )));
        }
        for (p, src, what) in [
            (out_betas, s.inner.betas(), "out_betas"),
            (
                out_alphas_cumprod,
                s.inner.alphas_cumprod(),
                "out_alphas_cumprod",
            ),
        ] {
            if !p.is_null() {
                slice_mut(p, t, what)?.copy_from_slice(src);
            }
        }
        Ok(())
    })
}

type PerSample = fn(&Scheduler, &[f32], &[f32], &[usize], &mut [f32]) -> Result<()>;

/// Shared body of add_noise / get_velocity: `n` samples of `sample_len` floats each.
#[allow(clippy::too_many_arguments)]
unsafe fn per_sample(
    scheduler: *const PhenoScheduler,
    x: *const f32,
    x_name: &str,
    noise: *const f32,
    timesteps: *const i64,
    n: usize,
    sample_len: usize,
    out: *mut f32,
    out_len: usize,
    f: PerSample,
) -> Result<()> {
    let s = reference(scheduler, "scheduler")?;
    let len = checked_len::<f32>(&[n, sample_len], "n × sample_len")?;
    if out_len != len {
        return Err(Error::Shape(format!(
            "out_len is {out_len} but n × sample_len is {len}"
        )));
    }
    if len > 0 {
        if x.is_null() {
            return Err(null(x_name));
        }
        if noise.is_null() {
            return Err(null("noise"));
        }
        if out.is_null() {
            return Err(null("out"));
        }
    }
    let x = slice(x, len, x_name)?;
    let noise = slice(noise, len, "noise")?;
    let ts = timestep_list(slice(timesteps, n, "timesteps")?)?;
    let out = slice_mut(out, len, "out")?;
    f(&s.inner, x, noise, &ts, out)
}

fn timestep_list(ts: &[i64]) -> Result<Vec<usize>> {
    ts.iter()
        .enumerate()
        .map(|(i, &t)| {
            usize::try_from(t).map_err(|_| {
                Error::InvalidArgument(format!("timesteps[{i}] is {t}; expected a timestep >= 0"))
            })
        })
        .collect()
}

/// Forward process: out = √ᾱ_t·x0 + √(1−ᾱ_t)·noise for `n` samples of `sample_len` floats,
/// sample i at `timesteps[i]`. `out` holds `out_len` = n·sample_len floats. Errors: a timestep
/// outside 0..T (INVALID_ARGUMENT naming it), a non-finite input (NON_FINITE naming the element).
///
/// # Safety
/// `scheduler` is a live scheduler; `x0`, `noise` point to n·sample_len floats, `timesteps` to n
/// values, `out` to `out_len` writable floats (it may not alias the inputs).
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_add_noise(
    scheduler: *const PhenoScheduler,
    x0: *const f32,
    noise: *const f32,
    timesteps: *const i64,
    n: usize,
    sample_len: usize,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_scheduler_add_noise", || {
        per_sample(
            scheduler,
            x0,
            "x0",
            noise,
            timesteps,
            n,
            sample_len,
            out,
            out_len,
            Scheduler::add_noise_into,
        )
    })
}

/// Velocity (the v-prediction target): out = √ᾱ_t·noise − √(1−ᾱ_t)·x0; arguments as
/// `pheno_scheduler_add_noise`.
///
/// # Safety
/// As `pheno_scheduler_add_noise`.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_get_velocity(
    scheduler: *const PhenoScheduler,
    x0: *const f32,
    noise: *const f32,
    timesteps: *const i64,
    n: usize,
    sample_len: usize,
    out: *mut f32,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_scheduler_get_velocity", || {
        per_sample(
            scheduler,
            x0,
            "x0",
            noise,
            timesteps,
            n,
            sample_len,
            out,
            out_len,
            Scheduler::get_velocity_into,
        )
    })
}

/// One DDPM or DDIM step from `timestep` on `sample` (x_t, `len` floats) given the model's
/// prediction `model_output` (`len` floats): writes x_prev to `out_prev_sample` and the predicted
/// x0 to `out_pred_original_sample` (may be NULL), each `len` floats. The previous timestep is
/// `timestep − T / num_inference_steps`. `noise` (`len` standard-normal floats) is the variance
/// noise; NULL draws it from the scheduler's seeded generator (DDPM when timestep > 0, DDIM when
/// eta > 0). Errors: before `pheno_scheduler_set_timesteps`, timestep outside 0..T
/// (INVALID_ARGUMENT), a non-finite input (NON_FINITE naming it).
///
/// # Safety
/// `scheduler` is a live scheduler not used by another call during this one; the arrays hold
/// `len` floats (outputs writable, not aliasing the inputs).
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_step(
    scheduler: *mut PhenoScheduler,
    model_output: *const f32,
    timestep: i64,
    sample: *const f32,
    noise: *const f32,
    len: usize,
    out_prev_sample: *mut f32,
    out_pred_original_sample: *mut f32,
) -> PhenoStatus {
    guard("pheno_scheduler_step", || {
        let s = scheduler.as_mut().ok_or_else(|| null("scheduler"))?;
        checked_len::<f32>(&[len], "len")?;
        if len > 0 {
            for (p, what) in [(model_output, "model_output"), (sample, "sample")] {
                if p.is_null() {
                    return Err(null(what));
                }
            }
            if out_prev_sample.is_null() {
                return Err(null("out_prev_sample"));
            }
        }
        let t = usize::try_from(timestep).map_err(|_| {
            Error::InvalidArgument(format!("timestep is {timestep}; expected >= 0"))
        })?;
        let mo = slice(model_output, len, "model_output")?;
        let x = slice(sample, len, "sample")?;
        let z = if noise.is_null() {
            None
        } else {
            Some(slice(noise, len, "noise")?)
        };
        let prev = slice_mut(out_prev_sample, len, "out_prev_sample")?;
        if out_pred_original_sample.is_null() {
            let mut x0 = vec![0.0f32; len];
            s.inner.step_into(mo, t, x, z, prev, &mut x0)
        } else {
            let x0 = slice_mut(out_pred_original_sample, len, "out_pred_original_sample")?;
            s.inner.step_into(mo, t, x, z, prev, x0)
        }
    })
}

/// Writes `len` standard-normal floats from the scheduler's seeded generator to `out` (the initial
/// x_T of sampling).
///
/// # Safety
/// `scheduler` is a live scheduler not used by another call during this one; `out` points to
/// `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_noise(
    scheduler: *mut PhenoScheduler,
    out: *mut f32,
    len: usize,
) -> PhenoStatus {
    guard("pheno_scheduler_noise", || {
        let s = scheduler.as_mut().ok_or_else(|| null("scheduler"))?;
        if len > 0 && out.is_null() {
            return Err(null("out"));
        }
        let o = slice_mut(out, len, "out")?;
        o.copy_from_slice(&s.inner.noise(len));
        Ok(())
    })
}

/// Restarts the scheduler's noise generator from `seed`.
///
/// # Safety
/// `scheduler` is a live scheduler not used by another call during this one.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_reseed(
    scheduler: *mut PhenoScheduler,
    seed: u64,
) -> PhenoStatus {
    guard("pheno_scheduler_reseed", || {
        let s = scheduler.as_mut().ok_or_else(|| null("scheduler"))?;
        s.inner.reseed(seed);
        Ok(())
    })
}

/// Classifier-free guidance: out = uncond + scale·(cond − uncond), `len` floats each. Thread-safe.
///
/// # Safety
/// `uncond`, `cond` point to `len` floats, `out` to `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn pheno_guidance(
    uncond: *const f32,
    cond: *const f32,
    len: usize,
    scale: f64,
    out: *mut f32,
) -> PhenoStatus {
    guard("pheno_guidance", || {
        if len > 0 {
            for (p, what) in [(uncond, "uncond"), (cond, "cond")] {
                if p.is_null() {
                    return Err(null(what));
                }
            }
            if out.is_null() {
                return Err(null("out"));
            }
        }
        let g = crate::diffusion::scheduler::guide(
            slice(uncond, len, "uncond")?,
            slice(cond, len, "cond")?,
            scale,
        )?;
        slice_mut(out, len, "out")?.copy_from_slice(&g);
        Ok(())
    })
}

/// Releases a scheduler. Accepts NULL.
///
/// # Safety
/// `scheduler` is NULL or a live scheduler not used by any other call, now or later.
#[no_mangle]
pub unsafe extern "C" fn pheno_scheduler_free(scheduler: *mut PhenoScheduler) {
    if !scheduler.is_null() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            drop(Box::from_raw(scheduler))
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last_error() -> String {
        unsafe { CStr::from_ptr(super::super::pheno_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn round_trip_through_the_abi() {
        unsafe {
            let mut o = pheno_scheduler_default_options();
            o.kind = PhenoSamplerKind::PHENO_SAMPLER_DDIM;
            let mut s: *mut PhenoScheduler = std::ptr::null_mut();
            assert_eq!(pheno_scheduler_new(&o, &mut s), PhenoStatus::PHENO_OK);
            let mut count = 99usize;
            assert_eq!(
                pheno_scheduler_timesteps(s, std::ptr::null_mut(), 0, &mut count),
                PhenoStatus::PHENO_OK
            );
            assert_eq!(count, 0);
            let (x0, eps) = ([0.5f32, -0.25, 1.0, 0.0], [1.0f32, 0.5, -1.0, 2.0]);
            let t = [500i64, 20];
            let mut xt = [0f32; 4];
            let mut v = [0f32; 4];
            assert_eq!(
                pheno_scheduler_add_noise(
                    s,
                    x0.as_ptr(),
                    eps.as_ptr(),
                    t.as_ptr(),
                    2,
                    2,
                    xt.as_mut_ptr(),
                    4
                ),
                PhenoStatus::PHENO_OK
            );
            assert_eq!(
                pheno_scheduler_get_velocity(
                    s,
                    x0.as_ptr(),
                    eps.as_ptr(),
                    t.as_ptr(),
                    2,
                    2,
                    v.as_mut_ptr(),
                    4
                ),
                PhenoStatus::PHENO_OK
            );
            let ab = (*s).inner.alphas_cumprod()[500];
            assert!((xt[0] as f64 - (ab.sqrt() * 0.5 + (1.0 - ab).sqrt())).abs() < 1e-6);
            let mut prev = [0f32; 2];
            let st = pheno_scheduler_step(
                s,
                v.as_ptr(),
                500,
                xt.as_ptr(),
                std::ptr::null(),
                2,
                prev.as_mut_ptr(),
                std::ptr::null_mut(),
            );
            assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
            assert!(last_error().contains("set_timesteps"), "{}", last_error());
            assert_eq!(pheno_scheduler_set_timesteps(s, 50), PhenoStatus::PHENO_OK);
            let mut ts = [0i64; 50];
            assert_eq!(
                pheno_scheduler_timesteps(s, ts.as_mut_ptr(), 50, &mut count),
                PhenoStatus::PHENO_OK
            );
            assert_eq!((count, ts[0], ts[49]), (50, 980, 0));
            let mut x0_hat = [0f32; 2];
            let st = pheno_scheduler_step(
                s,
                v.as_ptr(),
                500,
                xt.as_ptr(),
                std::ptr::null(),
                2,
                prev.as_mut_ptr(),
                x0_hat.as_mut_ptr(),
            );
            assert_eq!(st, PhenoStatus::PHENO_OK);
            assert!((x0_hat[0] - 0.5).abs() < 1e-6 && (x0_hat[1] + 0.25).abs() < 1e-6);
            let st = pheno_scheduler_add_noise(
                s,
                x0.as_ptr(),
                eps.as_ptr(),
                [0i64, -3].as_ptr(),
                2,
                2,
                xt.as_mut_ptr(),
                4,
            );
            assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
            assert!(
                last_error().contains("timesteps[1] is -3"),
                "{}",
                last_error()
            );
            let st = pheno_scheduler_add_noise(
                s,
                x0.as_ptr(),
                eps.as_ptr(),
                t.as_ptr(),
                2,
                2,
                xt.as_mut_ptr(),
                3,
            );
            assert_eq!(st, PhenoStatus::PHENO_ERR_SHAPE);
            let mut betas = vec![0f64; 1000];
            assert_eq!(
                pheno_scheduler_schedule(s, betas.as_mut_ptr(), std::ptr::null_mut(), 1000),
                PhenoStatus::PHENO_OK
            );
            assert!((betas[0] - 0.0015).abs() < 1e-15);
            pheno_scheduler_free(s);
            pheno_scheduler_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn bad_options_are_named_and_leave_null() {
        unsafe {
            let mut o = pheno_scheduler_default_options();
            (std::ptr::addr_of_mut!(o.schedule) as *mut i32).write(9);
            let mut s: *mut PhenoScheduler = 8 as *mut PhenoScheduler;
            assert_eq!(
                pheno_scheduler_new(&o, &mut s),
                PhenoStatus::PHENO_ERR_INVALID_ARGUMENT
            );
            assert!(s.is_null());
            assert!(
                last_error().contains("opts->schedule is 9"),
                "{}",
                last_error()
            );
            let mut o = pheno_scheduler_default_options();
            o.eta = 2.0;
            assert_eq!(
                pheno_scheduler_new(&o, &mut s),
                PhenoStatus::PHENO_ERR_INVALID_ARGUMENT
            );
            assert!(last_error().contains("eta is 2"), "{}", last_error());
            // An older caller's shorter struct: the fields it lacks keep their defaults.
            let mut o = pheno_scheduler_default_options();
            o.kind = PhenoSamplerKind::PHENO_SAMPLER_DDIM;
            o.eta = 2.0;
            o.struct_size = offset_of!(PhenoSchedulerOptions, num_train_timesteps);
            assert_eq!(pheno_scheduler_new(&o, &mut s), PhenoStatus::PHENO_OK);
            assert_eq!((*s).inner.config().kind, SamplerKind::Ddim);
            assert_eq!((*s).inner.config().eta, 0.0);
            pheno_scheduler_free(s);
        }
    }
}
