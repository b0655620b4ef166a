//! Noise schedules and the DDPM / DDIM samplers (REFERENCE §10), computing what diffusers 0.42
//! `DDPMScheduler` / `DDIMScheduler` and MONAI 1.6 `DDPMScheduler` / `DDIMScheduler` compute.
//!
//! Tensors are f32 in and out; β, ᾱ and every per-step coefficient are f64, and each element is
//! combined in f64 before rounding (the peers compute in f32: their ᾱ differs from the exact
//! cumulative product by up to ~1e-6 relative, their float32 cosine β₀ by ~1e-3).
//!
//! Where MONAI and diffusers differ, this follows diffusers:
//! - `set_timesteps(n)`: diffusers' default "leading" spacing, `arange(n) · (T // n)` reversed
//!   (MONAI 1.6 uses `linspace(T − 1, 0, n).round()`, which its own DDIM step, `prev = t − T // n`,
//!   does not land on).
//! - DDPM with n < T steps: diffusers' posterior from t to the previous inference timestep
//!   (β_t → 1 − ᾱ_t / ᾱ_prev); MONAI always uses t − 1. With n = T both are the same.
//! - The cosine schedule is MONAI's `cosine` (= diffusers' `squaredcos_cap_v2`): ᾱ(x) =
//!   cos²((x/T + s)/(1 + s) · π/2), β = clip(1 − ᾱ(t+1)/ᾱ(t), 0, 0.999), s = 0.008.
//!
//! Defaults are the LDM paper's (REFERENCE §10): scaled linear β 0.0015 → 0.0205 over T = 1000,
//! v-prediction, no x0 clipping (MONAI's default `clip_sample = True` is wrong for latents), DDIM
//! with `set_alpha_to_one`.

use crate::error::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

/// Most training timesteps accepted (a schedule of f64 pairs stays under 32 MB).
pub const MAX_TRAIN_TIMESTEPS: usize = 1 << 21;

/// β schedule (MONAI names; the diffusers names parse too).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BetaSchedule {
    /// β = linspace(beta_start, beta_end, T) (MONAI `linear_beta`, diffusers `linear`).
    Linear,
    /// β = linspace(√beta_start, √beta_end, T)² (MONAI `scaled_linear_beta`, diffusers `scaled_linear`).
    ScaledLinear,
    /// Nichol & Dhariwal 2021 cosine ᾱ, s = 0.008 (MONAI `cosine`, diffusers `squaredcos_cap_v2`);
    /// ignores beta_start / beta_end.
    Cosine,
}

impl BetaSchedule {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "linear_beta" | "linear" => Ok(Self::Linear),
            "scaled_linear_beta" | "scaled_linear" => Ok(Self::ScaledLinear),
            "cosine" | "squaredcos_cap_v2" => Ok(Self::Cosine),
            _ => Err(Error::InvalidArgument(format!(
                "schedule {s:?}: expected \"linear_beta\", \"scaled_linear_beta\" or \"cosine\""
            ))),
        }
    }
}

/// What the denoising model predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PredictionType {
    /// The noise ε.
    Epsilon,
    /// v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022).
    VPrediction,
    /// x0 itself.
    Sample,
}

impl PredictionType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::VPrediction),
            "sample" => Ok(Self::Sample),
            _ => Err(Error::InvalidArgument(format!(
                "prediction_type {s:?}: expected \"epsilon\", \"v_prediction\" or \"sample\""
            ))),
        }
    }
}

/// Sampler run by `Scheduler::step`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerKind {
    /// Ancestral DDPM with the fixed-small posterior variance (clamped ≥ 1e-20).
    Ddpm,
    /// DDIM with stochasticity `eta` (0 = deterministic).
    Ddim,
}

impl SamplerKind {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ddpm" => Ok(Self::Ddpm),
            "ddim" => Ok(Self::Ddim),
            _ => Err(Error::InvalidArgument(format!(
                "kind {s:?}: expected \"ddpm\" or \"ddim\""
            ))),
        }
    }
}

/// Scheduler settings (MONAI argument names).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SchedulerConfig {
    pub kind: SamplerKind,
    pub num_train_timesteps: usize,
    pub schedule: BetaSchedule,
    pub beta_start: f64,
    pub beta_end: f64,
    pub prediction_type: PredictionType,
    /// Clamp the predicted x0 to ±`clip_sample_range` (default off: latents are not in [−1, 1]).
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DDIM: ᾱ before the first timestep is 1 (true, default) or ᾱ₀.
    pub set_alpha_to_one: bool,
    /// DDIM noise weight in [0, 1]: 0 = deterministic DDIM (default), 1 = DDPM-like variance.
    pub eta: f64,
}

impl Default for SchedulerConfig {
    /// REFERENCE §10: DDPM, T = 1000, scaled linear 0.0015 → 0.0205, v-prediction, no clipping.
    fn default() -> Self {
        Self {
            kind: SamplerKind::Ddpm,
            num_train_timesteps: 1000,
            schedule: BetaSchedule::ScaledLinear,
            beta_start: 0.0015,
            beta_end: 0.0205,
            prediction_type: PredictionType::VPrediction,
            clip_sample: false,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            eta: 0.0,
        }
    }
}

/// Result of one sampler step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepOutput {
    /// x_{t_prev}.
    pub prev_sample: Vec<f32>,
    /// The model's estimate of x0 at this step (after clipping when enabled).
    pub pred_original_sample: Vec<f32>,
}

/// β / ᾱ schedule, inference timesteps and the seeded RNG of the sampler noise.
///
/// `step`, `noise` and `set_timesteps` take `&mut self` (the RNG advances); `add_noise`,
/// `get_velocity` and `target` take `&self` and may run on several threads at once.
#[derive(Clone, Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    betas: Vec<f64>,
    alphas_cumprod: Vec<f64>,
    timesteps: Vec<usize>,
    step_ratio: Option<usize>,
    rng: ChaCha8Rng,
}

/// β_t for `schedule` over `t` timesteps (f64).
pub fn betas(schedule: BetaSchedule, t: usize, beta_start: f64, beta_end: f64) -> Vec<f64> {
    let frac = |i: usize| {
        if t > 1 {
            i as f64 / (t - 1) as f64
        } else {
            0.0
        }
    };
    match schedule {
        BetaSchedule::Linear => (0..t)
            .map(|i| beta_start + (beta_end - beta_start) * frac(i))
            .collect(),
        BetaSchedule::ScaledLinear => {
            let (a, b) = (beta_start.sqrt(), beta_end.sqrt());
            (0..t)
                .map(|i| {
                    let r = a + (b - a) * frac(i);
                    r * r
                })
                .collect()
        }
        BetaSchedule::Cosine => {
            // MONAI `_cosine_beta` (Nichol & Dhariwal 2021, eq. 17): s = 8e-3, β capped at 0.999.
            let s = 8e-3;
            let abar = |i: usize| {
                let x = (i as f64 / t as f64 + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2;
                x.cos().powi(2)
            };
            (0..t)
                .map(|i| (1.0 - abar(i + 1) / abar(i)).clamp(0.0, 0.999))
                .collect()
        }
    }
}

impl Scheduler {
    /// A scheduler; `seed` seeds the noise of `step` and `noise`.
    pub fn new(config: SchedulerConfig, seed: u64) -> Result<Self> {
        let t = config.num_train_timesteps;
        if t == 0 || t > MAX_TRAIN_TIMESTEPS {
            return Err(Error::InvalidArgument(format!(
                "num_train_timesteps is {t}; expected 1..={MAX_TRAIN_TIMESTEPS}"
            )));
        }
        if config.schedule != BetaSchedule::Cosine {
            for (name, v) in [
                ("beta_start", config.beta_start),
                ("beta_end", config.beta_end),
            ] {
                if !(v.is_finite() && v > 0.0 && v < 1.0) {
                    return Err(Error::InvalidArgument(format!(
                        "{name} is {v}; expected a number in (0, 1)"
                    )));
                }
            }
        }
        if !(config.clip_sample_range.is_finite() && config.clip_sample_range > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "clip_sample_range is {}; expected a positive finite number",
                config.clip_sample_range
            )));
        }
        check_eta(config.eta)?;
        let betas = betas(config.schedule, t, config.beta_start, config.beta_end);
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        if let Some(i) = alphas_cumprod.iter().position(|&a| !(a > 0.0 && a < 1.0)) {
            return Err(Error::InvalidArgument(format!(
                "the schedule gives alphas_cumprod[{i}] = {} (β = {}); every ᾱ must lie in (0, 1)",
                alphas_cumprod[i], betas[i]
            )));
        }
        Ok(Self {
            config,
            betas,
            alphas_cumprod,
            timesteps: Vec::new(),
            step_ratio: None,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.config.num_train_timesteps
    }

    /// β_t, t = 0..T.
    pub fn betas(&self) -> &[f64] {
        &self.betas
    }

    /// ᾱ_t = Π_{s≤t} (1 − β_s), t = 0..T.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Restarts the noise RNG from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.rng = ChaCha8Rng::seed_from_u64(seed);
    }

    /// Sets DDIM's eta (in [0, 1]).
    pub fn set_eta(&mut self, eta: f64) -> Result<()> {
        check_eta(eta)?;
        self.config.eta = eta;
        Ok(())
    }

    /// `len` standard-normal f32 values from the scheduler's RNG (the initial x_T of sampling).
    pub fn noise(&mut self, len: usize) -> Vec<f32> {
        (0..len).map(|_| self.rng.sample(StandardNormal)).collect()
    }

    /// Inference timesteps `arange(n) · (T // n)` reversed (diffusers "leading" spacing).
    pub fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        if n == 0 || n > t {
            return Err(Error::InvalidArgument(format!(
                "num_inference_steps is {n}; expected 1..=num_train_timesteps ({t})"
            )));
        }
        let ratio = t / n;
        self.timesteps = (0..n).rev().map(|i| i * ratio).collect();
        self.step_ratio = Some(ratio);
        Ok(())
    }

    /// Timesteps set by `set_timesteps`, descending (empty before).
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// The timestep that `step` from `t` moves to (None past the start of the chain), once
    /// `set_timesteps` has run.
    pub fn prev_timestep(&self, t: usize) -> Option<usize> {
        self.step_ratio.and_then(|r| t.checked_sub(r))
    }

    fn abar(&self, t: usize, what: &str) -> Result<f64> {
        self.alphas_cumprod.get(t).copied().ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what} is {t}; expected a timestep in 0..{}",
                self.config.num_train_timesteps
            ))
        })
    }

    /// Per-sample (a_i, b_i) for out = a_i·x + b_i·y over `n = timesteps.len()` samples.
    #[allow(clippy::too_many_arguments)]
    fn per_sample(
        &self,
        name: &str,
        xn: &str,
        x: &[f32],
        y: &[f32],
        timesteps: &[usize],
        coef: impl Fn(f64) -> (f64, f64),
        out: &mut [f32],
    ) -> Result<()> {
        let yn = "noise";
        let per = sample_len(name, x.len(), timesteps.len(), xn)?;
        if y.len() != x.len() {
            return Err(Error::Shape(format!(
                "{name}: {yn} has {} values but {xn} has {}",
                y.len(),
                x.len()
            )));
        }
        if out.len() != x.len() {
            return Err(Error::Shape(format!(
                "{name}: output has {} values but {xn} has {}",
                out.len(),
                x.len()
            )));
        }
        check_finite(name, xn, x)?;
        check_finite(name, yn, y)?;
        let coefs = timesteps
            .iter()
            .enumerate()
            .map(|(i, &t)| Ok(coef(self.abar(t, &format!("{name}: timesteps[{i}]"))?)))
            .collect::<Result<Vec<_>>>()?;
        if per == 0 {
            return Ok(());
        }
        for (((o, xs), ys), &(a, b)) in out
            .chunks_mut(per)
            .zip(x.chunks(per))
            .zip(y.chunks(per))
            .zip(&coefs)
        {
            lincomb(a, xs, b, ys, o);
        }
        Ok(())
    }

    /// x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, sample i at `timesteps[i]`; `x0` and `noise` hold
    /// `timesteps.len()` samples of equal size.
    pub fn add_noise_into(
        &self,
        x0: &[f32],
        noise: &[f32],
        timesteps: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        self.per_sample(
            "add_noise",
            "x0",
            x0,
            noise,
            timesteps,
            |ab| (ab.sqrt(), (1.0 - ab).sqrt()),
            out,
        )
    }

    pub fn add_noise(&self, x0: &[f32], noise: &[f32], timesteps: &[usize]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; x0.len()];
        self.add_noise_into(x0, noise, timesteps, &mut out)?;
        Ok(out)
    }

    /// v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 per sample (diffusers / MONAI `get_velocity(sample, noise, t)`).
    pub fn get_velocity_into(
        &self,
        x0: &[f32],
        noise: &[f32],
        timesteps: &[usize],
        out: &mut [f32],
    ) -> Result<()> {
        self.per_sample(
            "get_velocity",
            "sample",
            x0,
            noise,
            timesteps,
            |ab| (-(1.0 - ab).sqrt(), ab.sqrt()),
            out,
        )
    }

    pub fn get_velocity(&self, x0: &[f32], noise: &[f32], timesteps: &[usize]) -> Result<Vec<f32>> {
        let mut out = vec![0.0; x0.len()];
        self.get_velocity_into(x0, noise, timesteps, &mut out)?;
        Ok(out)
    }

    /// The training target of the prediction type: ε, v or x0.
    pub fn target(&self, x0: &[f32], noise: &[f32], timesteps: &[usize]) -> Result<Vec<f32>> {
        match self.config.prediction_type {
            PredictionType::VPrediction => self.get_velocity(x0, noise, timesteps),
            PredictionType::Epsilon | PredictionType::Sample => {
                // Same checks as add_noise (lengths, timesteps, finiteness).
                let mut scratch = vec![0.0; x0.len()];
                self.add_noise_into(x0, noise, timesteps, &mut scratch)?;
                Ok(if self.config.prediction_type == PredictionType::Epsilon {
                    noise.to_vec()
                } else {
                    x0.to_vec()
                })
            }
        }
    }

    /// The coefficients of the step from timestep `t` (see [`StepCoefficients`]): what
    /// [`Self::step_into`] applies to every value, for a device sampler to apply the same.
    /// Requires `set_timesteps`.
    pub fn step_coefficients(&self, t: usize) -> Result<StepCoefficients> {
        let Some(ratio) = self.step_ratio else {
            return Err(Error::InvalidArgument(
                "step: set_timesteps has not been called".into(),
            ));
        };
        self.step_coefficients_at(t, ratio)
    }

    fn step_coefficients_at(&self, t: usize, ratio: usize) -> Result<StepCoefficients> {
        let ab_t = self.abar(t, "step: timestep")?;
        let prev = t.checked_sub(ratio);
        let c = &self.config;
        let ab_prev = match (prev, c.kind) {
            (Some(p), _) => self.alphas_cumprod[p],
            (None, SamplerKind::Ddim) if !c.set_alpha_to_one => self.alphas_cumprod[0],
            (None, _) => 1.0,
        };
        let (sa, sb) = (ab_t.sqrt(), (1.0 - ab_t).sqrt());
        // x0 = p·model_output + q·sample; ε = r·model_output + s·sample.
        let (p, q, r, s) = match c.prediction_type {
            PredictionType::Epsilon => (-sb / sa, 1.0 / sa, 1.0, 0.0),
            PredictionType::VPrediction => (-sb, sa, sa, sb),
            PredictionType::Sample => (1.0, 0.0, -sa / sb, 1.0 / sb),
        };
        let clip = c.clip_sample.then_some(c.clip_sample_range);
        // x_prev = u·x0 + w·ε_or_x_t + std·z, where the second term is ε (DDIM) or x_t (DDPM).
        let (u, w, std, eps_term) = match c.kind {
            SamplerKind::Ddpm => {
                // diffusers DDPMScheduler.step: posterior q(x_prev | x_t, x0) with the effective
                // β_t = 1 − ᾱ_t/ᾱ_prev (Ho et al. 2020, eq. 7); fixed-small variance ≥ 1e-20.
                let alpha_t = ab_t / ab_prev;
                let beta_t = 1.0 - alpha_t;
                let u = ab_prev.sqrt() * beta_t / (1.0 - ab_t);
                let w = alpha_t.sqrt() * (1.0 - ab_prev) / (1.0 - ab_t);
                let var = ((1.0 - ab_prev) / (1.0 - ab_t) * beta_t).max(1e-20);
                (u, w, if t > 0 { var.sqrt() } else { 0.0 }, false)
            }
            SamplerKind::Ddim => {
                // Song et al. 2021, eq. 12 and 16.
                let var = (1.0 - ab_prev) / (1.0 - ab_t) * (1.0 - ab_t / ab_prev);
                let std = c.eta * var.sqrt();
                let dir = (1.0 - ab_prev - std * std).max(0.0).sqrt();
                (ab_prev.sqrt(), dir, std, true)
            }
        };
        let adds_noise = match c.kind {
            SamplerKind::Ddpm => t > 0,
            SamplerKind::Ddim => c.eta > 0.0,
        };
        Ok(StepCoefficients {
            p,
            q,
            r,
            s,
            u,
            w,
            std,
            clip,
            eps_term,
            adds_noise,
        })
    }

    /// One sampler step from timestep `t` (see `step_into`).
    pub fn step(
        &mut self,
        model_output: &[f32],
        t: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
    ) -> Result<StepOutput> {
        let mut prev_sample = vec![0.0; sample.len()];
        let mut pred_original_sample = vec![0.0; sample.len()];
        self.step_into(
            model_output,
            t,
            sample,
            noise,
            &mut prev_sample,
            &mut pred_original_sample,
        )?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }

    /// One DDPM or DDIM step from timestep `t` to `prev_timestep(t)` on `sample` (x_t) given the
    /// model's prediction: writes x_prev and the predicted x0. `noise` (same length) is the
    /// standard-normal variance noise; None draws it from the scheduler's RNG (only when the step
    /// adds noise: DDPM with t > 0, DDIM with eta > 0). Requires `set_timesteps`.
    pub fn step_into(
        &mut self,
        model_output: &[f32],
        t: usize,
        sample: &[f32],
        noise: Option<&[f32]>,
        out_prev: &mut [f32],
        out_x0: &mut [f32],
    ) -> Result<()> {
        let Some(ratio) = self.step_ratio else {
            return Err(Error::InvalidArgument(
                "step: set_timesteps has not been called".into(),
            ));
        };
        let n = sample.len();
        for (what, len) in [
            ("model_output", model_output.len()),
            ("prev_sample output", out_prev.len()),
            ("pred_original_sample output", out_x0.len()),
        ] {
            if len != n {
                return Err(Error::Shape(format!(
                    "step: {what} has {len} values but sample has {n}"
                )));
            }
        }
        if let Some(z) = noise {
            if z.len() != n {
                return Err(Error::Shape(format!(
                    "step: noise has {} values but sample has {n}",
                    z.len()
                )));
            }
            check_finite("step", "noise", z)?;
        }
        check_finite("step", "model_output", model_output)?;
        check_finite("step", "sample", sample)?;
        let StepCoefficients {
            p,
            q,
            r,
            s,
            u,
            w,
            std,
            clip,
            eps_term,
            adds_noise,
        } = self.step_coefficients_at(t, ratio)?;
        let drawn;
        let z: Option<&[f32]> = match noise {
            Some(z) if adds_noise => Some(z),
            None if adds_noise => {
                drawn = self.noise(n);
                Some(&drawn)
            }
            _ => None,
        };
        for i in 0..n {
            let (m, x) = (model_output[i] as f64, sample[i] as f64);
            let mut x0 = p * m + q * x;
            if let Some(r) = clip {
                x0 = x0.clamp(-r, r);
            }
            let second = if eps_term { r * m + s * x } else { x };
            let mut xp = u * x0 + w * second;
            if let Some(z) = z {
                xp += std * z[i] as f64;
            }
            out_x0[i] = x0 as f32;
            out_prev[i] = xp as f32;
        }
        Ok(())
    }
}

/// One sampler step as coefficients, per value (m the model output, x the sample, z the noise):
/// x0 = p·m + q·x, clamped to ±`clip`; x_prev = u·x0 + w·(r·m + s·x if `eps_term`, else x) +
/// std·z, the noise term only when `adds_noise`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepCoefficients {
    pub p: f64,
    pub q: f64,
    pub r: f64,
    pub s: f64,
    pub u: f64,
    pub w: f64,
    pub std: f64,
    pub clip: Option<f64>,
    pub eps_term: bool,
    pub adds_noise: bool,
}

/// Classifier-free guidance: uncond + scale·(cond − uncond).
pub fn guide(uncond: &[f32], cond: &[f32], scale: f64) -> Result<Vec<f32>> {
    if uncond.len() != cond.len() {
        return Err(Error::Shape(format!(
            "guide: cond has {} values but uncond has {}",
            cond.len(),
            uncond.len()
        )));
    }
    if !scale.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "guide: scale is {scale}; expected a finite number"
        )));
    }
    check_finite("guide", "uncond", uncond)?;
    check_finite("guide", "cond", cond)?;
    let mut out = vec![0.0; uncond.len()];
    lincomb(1.0 - scale, uncond, scale, cond, &mut out);
    Ok(out)
}

fn check_eta(eta: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&eta) {
        return Err(Error::InvalidArgument(format!(
            "eta is {eta}; expected a number in [0, 1]"
        )));
    }
    Ok(())
}

/// Values per sample when `len` values hold `n` equal samples.
fn sample_len(name: &str, len: usize, n: usize, what: &str) -> Result<usize> {
    if n == 0 {
        return if len == 0 {
            Ok(0)
        } else {
            Err(Error::Shape(format!(
                "{name}: no timesteps for {len} values of {what}"
            )))
        };
    }
    if !len.is_multiple_of(n) {
        return Err(Error::Shape(format!(
            "{name}: {what} has {len} values, not a whole number of samples for {n} timesteps"
        )));
    }
    Ok(len / n)
}

/// Error naming the first non-finite element of `v`.
pub(crate) fn check_finite(name: &str, what: &str, v: &[f32]) -> Result<()> {
    if crate::tensor::all_finite_f32(v) {
        return Ok(());
    }
    match v.iter().position(|x| !x.is_finite()) {
        Some(i) => Err(Error::NonFinite(format!("{name}: {what}[{i}] is {}", v[i]))),
        None => Ok(()),
    }
}

/// out = a·x + b·y, each element in f64.
fn lincomb(a: f64, x: &[f32], b: f64, y: &[f32], out: &mut [f32]) {
    for ((o, &xv), &yv) in out.iter_mut().zip(x).zip(y) {
        *o = (a * xv as f64 + b * yv as f64) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: SamplerKind, pred: PredictionType) -> Scheduler {
        let cfg = SchedulerConfig {
            kind,
            prediction_type: pred,
            ..Default::default()
        };
        Scheduler::new(cfg, 0).unwrap()
    }

    #[test]
    fn scaled_linear_matches_the_closed_form() {
        let s = sched(SamplerKind::Ddpm, PredictionType::VPrediction);
        let b = s.betas();
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 0.0015).abs() < 1e-15 && (b[999] - 0.0205).abs() < 1e-15);
        let r = 0.0015f64.sqrt() + (0.0205f64.sqrt() - 0.0015f64.sqrt()) * 500.0 / 999.0;
        assert!((b[500] - r * r).abs() < 1e-15);
        let prod: f64 = b[..10].iter().map(|x| 1.0 - x).product();
        assert!((s.alphas_cumprod()[9] - prod).abs() < 1e-15);
    }

    #[test]
    fn timesteps_are_leading_and_step_needs_them() {
        let mut s = sched(SamplerKind::Ddim, PredictionType::VPrediction);
        let e = s.step(&[0.0; 4], 10, &[0.0; 4], None).unwrap_err();
        assert!(e.to_string().contains("set_timesteps"), "{e}");
        s.set_timesteps(30).unwrap();
        assert_eq!(s.timesteps().len(), 30);
        assert_eq!((s.timesteps()[0], s.timesteps()[29]), (957, 0));
        assert_eq!(s.prev_timestep(957), Some(924));
        assert_eq!(s.prev_timestep(0), None);
        assert!(s.set_timesteps(1001).is_err());
        assert!(s.set_timesteps(0).is_err());
    }

    #[test]
    fn ddim_eta0_inverts_add_noise_with_the_true_velocity() {
        // With the exact v, DDIM (eta 0) lands exactly on add_noise(x0, ε, t_prev).
        let mut s = sched(SamplerKind::Ddim, PredictionType::VPrediction);
        s.set_timesteps(50).unwrap();
        let x0: Vec<f32> = (0..12).map(|i| (i as f32 * 0.37).sin()).collect();
        let eps: Vec<f32> = (0..12).map(|i| (i as f32 * 1.3).cos()).collect();
        let xt = s.add_noise(&x0, &eps, &[500]).unwrap();
        let v = s.get_velocity(&x0, &eps, &[500]).unwrap();
        let out = s.step(&v, 500, &xt, None).unwrap();
        let expect = s.add_noise(&x0, &eps, &[480]).unwrap();
        for i in 0..12 {
            assert!((out.pred_original_sample[i] - x0[i]).abs() < 2e-6);
            assert!((out.prev_sample[i] - expect[i]).abs() < 2e-6);
        }
    }

    #[test]
    fn bad_inputs_name_the_culprit() {
        let mut s = sched(SamplerKind::Ddpm, PredictionType::Epsilon);
        let e = s.add_noise(&[0.0; 6], &[0.0; 6], &[0, 1000]).unwrap_err();
        assert!(e.to_string().contains("timesteps[1] is 1000"), "{e}");
        let e = s.add_noise(&[0.0; 6], &[0.0; 6], &[0; 4]).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");
        let e = s.get_velocity(&[0.0; 6], &[0.0; 5], &[0; 2]).unwrap_err();
        assert!(e.to_string().contains("noise has 5"), "{e}");
        let e = s.add_noise(&[0.0, f32::NAN], &[0.0; 2], &[3]).unwrap_err();
        assert!(
            matches!(&e, Error::NonFinite(m) if m.contains("x0[1] is NaN")),
            "{e}"
        );
        s.set_timesteps(10).unwrap();
        let e = s
            .step(&[0.0, f32::INFINITY], 900, &[0.0; 2], None)
            .unwrap_err();
        assert!(e.to_string().contains("model_output[1] is inf"), "{e}");
        let e = s.step(&[0.0; 2], 1000, &[0.0; 2], None).unwrap_err();
        assert!(e.to_string().contains("timestep is 1000"), "{e}");
        let e = s.step(&[0.0; 2], 900, &[0.0; 3], None).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");
        let e = guide(&[0.0; 2], &[0.0; 3], 7.5).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");
        let cfg = SchedulerConfig {
            beta_start: 0.0,
            ..Default::default()
        };
        assert!(Scheduler::new(cfg, 0).is_err());
        let cfg = SchedulerConfig {
            eta: 1.5,
            ..Default::default()
        };
        assert!(Scheduler::new(cfg, 0).is_err());
    }

    #[test]
    fn seeded_noise_is_reproducible() {
        let run = |seed| {
            let mut s = sched(SamplerKind::Ddpm, PredictionType::VPrediction);
            s.reseed(seed);
            s.set_timesteps(1000).unwrap();
            s.step(&[0.1; 8], 500, &[0.2; 8], None).unwrap().prev_sample
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn guidance_is_uncond_plus_scale_times_difference() {
        let g = guide(&[1.0, 2.0], &[3.0, 1.0], 7.5).unwrap();
        assert_eq!(g, vec![1.0 + 7.5 * 2.0, 2.0 - 7.5]);
    }
}
