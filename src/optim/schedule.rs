//! Learning-rate schedules as pure functions of the step (or epoch) index, with the values of
//! torch.optim.lr_scheduler.
//!
//! Convention: `lr_at(t)` is the learning rate in effect for step t = 0, 1, … — the value of
//! `optimizer.param_groups[0]["lr"]` when `optimizer.step()` runs for the (t+1)-th time, with
//! `scheduler.step()` called after every `optimizer.step()`.
//!
//! Warm-up (`warmup_steps = W > 0`) is torch's
//! `SequentialLR([LinearLR(start_factor=f, end_factor=1, total_iters=W), S], milestones=[W])`:
//! ```text
//! t <  W:  base_lr · (f + (1 − f)·t / W)
//! t >= W:  S's value at t − W     (SequentialLR restarts S at the milestone)
//! ```
//! The schedules use torch's closed forms (`_get_closed_form_lr`), with u = t − W:
//! - `Constant`: base_lr (torch: LambdaLR(lambda _: 1));
//! - `Step`: base_lr · γ^⌊u / step_size⌋ (StepLR);
//! - `MultiStep`: base_lr · γ^(number of milestones ≤ u, repeats counted) (MultiStepLR);
//! - `Cosine`: η_min + (base_lr − η_min)(1 + cos(π u / T_max)) / 2, periodic past T_max as torch
//!   (CosineAnnealingLR);
//! - `Exponential`: base_lr · γ^u (ExponentialLR).
//!
//! torch's `scheduler.step()` itself updates the lr recursively (multiplicative factors), so its
//! values differ from these closed forms by rounding only (relative 5e-15 over 30 steps in
//! tests/optim.rs).

use crate::error::{Error, Result};

/// The schedule after warm-up.
#[derive(Clone, Debug, PartialEq)]
pub enum Schedule {
    Constant,
    Step { step_size: u64, gamma: f64 },
    MultiStep { milestones: Vec<u64>, gamma: f64 },
    Cosine { t_max: u64, eta_min: f64 },
    Exponential { gamma: f64 },
}

/// Base learning rate, optional linear warm-up, then a schedule.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    pub base_lr: f64,
    pub schedule: Schedule,
    /// 0 = no warm-up.
    pub warmup_steps: u64,
    /// Factor of base_lr at t = 0 when warming up, in (0, 1] (torch LinearLR's start_factor).
    pub warmup_start_factor: f64,
}

impl LrSchedule {
    /// A schedule without warm-up.
    pub fn new(base_lr: f64, schedule: Schedule) -> LrSchedule {
        LrSchedule {
            base_lr,
            schedule,
            warmup_steps: 0,
            warmup_start_factor: 1.0,
        }
    }

    /// Checks the parameters as torch's schedulers do (plus finiteness); `lr_at` of an invalid
    /// schedule may be NaN, which `Optimizer::step` rejects.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("lr schedule: {what}")));
        if !(self.base_lr.is_finite() && self.base_lr >= 0.0) {
            return bad(format!(
                "base_lr must be finite and >= 0, got {}",
                self.base_lr
            ));
        }
        let f = self.warmup_start_factor;
        if self.warmup_steps > 0 && !(f > 0.0 && f <= 1.0) {
            return bad(format!("warmup_start_factor must be in (0, 1], got {f}"));
        }
        match &self.schedule {
            Schedule::Constant => Ok(()),
            Schedule::Step { step_size, gamma } => {
                if *step_size == 0 {
                    bad("Step: step_size must be >= 1".into())
                } else {
                    check_gamma("Step", *gamma)
                }
            }
            Schedule::MultiStep { gamma, .. } => check_gamma("MultiStep", *gamma),
            Schedule::Cosine { t_max, eta_min } => {
                if *t_max == 0 {
                    bad("Cosine: t_max must be >= 1".into())
                } else if !eta_min.is_finite() {
                    bad(format!("Cosine: eta_min must be finite, got {eta_min}"))
                } else {
                    Ok(())
                }
            }
            Schedule::Exponential { gamma } => check_gamma("Exponential", *gamma),
        }
    }

    /// The learning rate for step t (0-based); see the module documentation for the convention.
    pub fn lr_at(&self, t: u64) -> f64 {
        let base = self.base_lr;
        let w = self.warmup_steps;
        if t < w {
            let f = self.warmup_start_factor;
            return base * (f + (1.0 - f) * t as f64 / w as f64);
        }
        let u = t - w;
        match &self.schedule {
            Schedule::Constant => base,
            Schedule::Step { step_size, gamma } => match u.checked_div(*step_size) {
                Some(k) => base * gamma.powf(k as f64),
                None => f64::NAN,
            },
            Schedule::MultiStep { milestones, gamma } => {
                let passed = milestones.iter().filter(|&&m| m <= u).count();
                base * gamma.powf(passed as f64)
            }
            Schedule::Cosine { t_max, eta_min } => {
                let cos = (std::f64::consts::PI * u as f64 / *t_max as f64).cos();
                eta_min + (base - eta_min) * (1.0 + cos) / 2.0
            }
            Schedule::Exponential { gamma } => base * gamma.powf(u as f64),
        }
    }
}

fn check_gamma(what: &str, gamma: f64) -> Result<()> {
    if gamma.is_finite() && gamma >= 0.0 {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "lr schedule: {what}: gamma must be finite and >= 0, got {gamma}"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_reaches_base_then_hands_over() {
        let s = LrSchedule {
            base_lr: 0.4,
            schedule: Schedule::Exponential { gamma: 0.5 },
            warmup_steps: 4,
            warmup_start_factor: 0.25,
        };
        let lrs: Vec<f64> = (0..7).map(|t| s.lr_at(t)).collect();
        let expect = [0.1, 0.175, 0.25, 0.325, 0.4, 0.2, 0.1];
        for (a, e) in lrs.iter().zip(expect) {
            assert!((a - e).abs() < 1e-15, "{lrs:?}");
        }
        assert!(s.validate().is_ok());
    }

    #[test]
    fn invalid_schedules_are_named() {
        let cases = [
            (
                LrSchedule::new(
                    0.1,
                    Schedule::Step {
                        step_size: 0,
                        gamma: 0.1,
                    },
                ),
                "step_size",
            ),
            (
                LrSchedule::new(
                    0.1,
                    Schedule::Cosine {
                        t_max: 0,
                        eta_min: 0.0,
                    },
                ),
                "t_max",
            ),
            (LrSchedule::new(-0.1, Schedule::Constant), "base_lr"),
            (
                LrSchedule::new(0.1, Schedule::Exponential { gamma: f64::NAN }),
                "gamma",
            ),
            (
                LrSchedule {
                    warmup_steps: 3,
                    warmup_start_factor: 0.0,
                    ..LrSchedule::new(0.1, Schedule::Constant)
                },
                "warmup_start_factor",
            ),
        ];
        for (s, culprit) in cases {
            match s.validate() {
                Err(Error::InvalidArgument(m)) => assert!(m.contains(culprit), "{m}"),
                other => panic!("{s:?}: {other:?}"),
            }
        }
        let step0 = LrSchedule::new(
            0.1,
            Schedule::Step {
                step_size: 0,
                gamma: 0.1,
            },
        );
        assert!(step0.lr_at(3).is_nan());
    }
}
