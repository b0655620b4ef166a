//! AdamW as torch.optim.AdamW (single-tensor path, `foreach=False`, not capturable).
//!
//! Per parameter, its own step count t (torch keeps one per parameter) is incremented, then per
//! element in f32 with torch's CPU operation order (scalars computed in f64, rounded to f32):
//! ```text
//! w     = w · (1 − lr·wd)                                 if wd ≠ 0 and the param decays
//! m     = lerp(m, g, 1 − β1)   = fma(1−β1, g−m, m)   (torch's |weight| < 0.5 branch,
//!                               else fma(−β1, g−m, g))
//! v     = fma((1−β2)·g, g, v·β2)                          (mul_ then addcmul_)
//! v̂max  = max(v̂max, v)                                    (amsgrad; NaN propagates)
//! denom = sqrt(v or v̂max) / sqrt(1 − β2^t) + eps
//! w     = (−lr/(1 − β1^t) · m) / denom + w                (addcdiv_)
//! ```
//! Bit-identical to torch on tests/optim.rs's small fixture. torch's CPU `sqrt` is not always
//! correctly rounded (25 of 3000 uniform samples), so where a denominator differs by one ulp the
//! update does too: on a 3000-element run 7 of 9000 weights differ, by ≤ 1 ulp of max(|w|, lr).

use super::{chunk_len, run_items, state_step, Optimizer, OptimizerState, ParamView, Registry};
use crate::error::{Error, Result};

/// torch.optim.AdamW's options; `Default` is torch's defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWOptions {
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
}

impl Default for AdamWOptions {
    fn default() -> Self {
        AdamWOptions {
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            amsgrad: false,
        }
    }
}

/// Per-parameter moments.
#[derive(Clone, Debug, Default)]
struct Moments {
    step: u64,
    exp_avg: Vec<f32>,
    exp_avg_sq: Vec<f32>,
    /// Empty without amsgrad.
    max_exp_avg_sq: Vec<f32>,
}

/// AdamW (decoupled weight decay), torch semantics.
#[derive(Clone, Debug)]
pub struct AdamW {
    opts: AdamWOptions,
    registry: Registry,
    moments: Vec<Moments>,
    steps: u64,
}

const KIND: &str = "adamw";

impl AdamW {
    /// Checks the options as torch.optim.Adam's constructor does.
    pub fn new(opts: AdamWOptions) -> Result<AdamW> {
        let (b1, b2) = opts.betas;
        if !(opts.eps.is_finite() && opts.eps >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "adamw: eps must be finite and >= 0, got {}",
                opts.eps
            )));
        }
        for (i, b) in [(0, b1), (1, b2)] {
            if !((0.0..1.0).contains(&b)) {
                return Err(Error::InvalidArgument(format!(
                    "adamw: betas.{i} must be in [0, 1), got {b}"
                )));
            }
        }
        if !(opts.weight_decay.is_finite() && opts.weight_decay >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "adamw: weight_decay must be finite and >= 0, got {}",
                opts.weight_decay
            )));
        }
        Ok(AdamW {
            opts,
            registry: Registry::default(),
            moments: Vec::new(),
            steps: 0,
        })
    }

    pub fn options(&self) -> &AdamWOptions {
        &self.opts
    }
}

/// The f32 scalars of one parameter's update, rounded as torch rounds them.
#[derive(Clone, Copy)]
struct Coef {
    decay_factor: f32,
    lerp_weight: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

impl Coef {
    fn new(o: &AdamWOptions, lr: f64, step: u64) -> Coef {
        let (b1, b2) = o.betas;
        let t = step as f64;
        let bias_correction1 = 1.0 - b1.powf(t);
        let bias_correction2 = 1.0 - b2.powf(t);
        Coef {
            decay_factor: (1.0 - lr * o.weight_decay) as f32,
            lerp_weight: (1.0 - b1) as f32,
            beta2: b2 as f32,
            one_minus_beta2: (1.0 - b2) as f32,
            bias_correction2_sqrt: bias_correction2.sqrt() as f32,
            eps: o.eps as f32,
            neg_step_size: (-(lr / bias_correction1)) as f32,
        }
    }
}

struct Item<'a> {
    w: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    vmax: &'a mut [f32],
    coef: Coef,
    decay: bool,
}

impl Optimizer for AdamW {
    fn step(&mut self, params: &mut [ParamView<'_>], lr: f64) -> Result<()> {
        let slots = self.registry.resolve(KIND, params, lr)?;
        let amsgrad = self.opts.amsgrad;
        let lens = &self.registry.lens;
        if self.moments.len() != lens.len() {
            self.moments = lens
                .iter()
                .map(|&n| Moments {
                    step: 0,
                    exp_avg: vec![0.0; n],
                    exp_avg_sq: vec![0.0; n],
                    max_exp_avg_sq: if amsgrad { vec![0.0; n] } else { Vec::new() },
                })
                .collect();
        }
        let total: usize = params.iter().map(|p| p.value.len()).sum();
        let chunk = chunk_len(total);
        let o = self.opts;
        let mut of_slot: Vec<Option<&mut Moments>> = self.moments.iter_mut().map(Some).collect();
        let mut items = Vec::new();
        for (p, &i) in params.iter_mut().zip(&slots) {
            let st = of_slot[i]
                .take()
                .ok_or_else(|| Error::Internal(format!("adamw: slot of {:?} taken", p.name)))?;
            st.step += 1;
            let coef = Coef::new(&o, lr, st.step);
            let decay = p.weight_decay && o.weight_decay != 0.0;
            let vmax: &mut [f32] = if amsgrad {
                &mut st.max_exp_avg_sq
            } else {
                &mut []
            };
            let mut vmax_chunks = vmax.chunks_mut(chunk);
            let parts = p
                .value
                .chunks_mut(chunk)
                .zip(p.grad.chunks(chunk))
                .zip(st.exp_avg.chunks_mut(chunk))
                .zip(st.exp_avg_sq.chunks_mut(chunk));
            for (((w, g), m), v) in parts {
                let vmax = if amsgrad {
                    vmax_chunks.next().unwrap_or_default()
                } else {
                    &mut []
                };
                items.push(Item {
                    w,
                    g,
                    m,
                    v,
                    vmax,
                    coef,
                    decay,
                });
            }
        }
        run_items(items, total, |it| {
            update(it.w, it.g, it.m, it.v, it.vmax, &it.coef, amsgrad, it.decay)
        });
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    /// Tensors "exp_avg/<name>", "exp_avg_sq/<name>" (and "max_exp_avg_sq/<name>" with amsgrad)
    /// per parameter in registration order; scalars "step" (completed `step` calls) and
    /// "step/<name>" (the parameter's own step count, torch's `state[p]["step"]`).
    fn state(&self) -> OptimizerState {
        let mut s = OptimizerState {
            tensors: Vec::new(),
            scalars: vec![("step".to_string(), self.steps as f64)],
        };
        for (name, m) in self.registry.names.iter().zip(&self.moments) {
            s.tensors
                .push((format!("exp_avg/{name}"), m.exp_avg.clone()));
            s.tensors
                .push((format!("exp_avg_sq/{name}"), m.exp_avg_sq.clone()));
            if self.opts.amsgrad {
                s.tensors
                    .push((format!("max_exp_avg_sq/{name}"), m.max_exp_avg_sq.clone()));
            }
            s.scalars.push((format!("step/{name}"), m.step as f64));
        }
        s
    }

    fn load_state(&mut self, s: &OptimizerState) -> Result<()> {
        let steps = state_step(KIND, s, "step")?;
        let amsgrad = self.opts.amsgrad;
        let mut registry = Registry::default();
        let mut moments = Vec::new();
        for (key, v) in &s.tensors {
            if let Some(name) = key.strip_prefix("exp_avg/") {
                registry.insert(name, v.len())?;
                let get = |prefix: &str| -> Result<Vec<f32>> {
                    let k = format!("{prefix}/{name}");
                    let t = s.tensor(&k).ok_or_else(|| {
                        Error::MissingKey(format!("adamw state: no tensor {k:?}"))
                    })?;
                    if t.len() != v.len() {
                        return Err(Error::Shape(format!(
                            "adamw state: {k:?} has {} elements but {key:?} has {}",
                            t.len(),
                            v.len()
                        )));
                    }
                    Ok(t.to_vec())
                };
                moments.push(Moments {
                    step: state_step(KIND, s, &format!("step/{name}"))?,
                    exp_avg: v.clone(),
                    exp_avg_sq: get("exp_avg_sq")?,
                    max_exp_avg_sq: if amsgrad {
                        get("max_exp_avg_sq")?
                    } else {
                        Vec::new()
                    },
                });
            } else {
                let known = key
                    .strip_prefix("exp_avg_sq/")
                    .or_else(|| key.strip_prefix("max_exp_avg_sq/").filter(|_| amsgrad));
                if known.is_none_or(|name| s.tensor(&format!("exp_avg/{name}")).is_none()) {
                    return Err(Error::InvalidArgument(format!(
                        "adamw state: unexpected tensor {key:?}{}",
                        if key.starts_with("max_exp_avg_sq/") {
                            " (this optimizer has amsgrad off)"
                        } else {
                            ""
                        }
                    )));
                }
            }
        }
        for (key, _) in &s.scalars {
            let ok = key == "step"
                || key
                    .strip_prefix("step/")
                    .is_some_and(|name| registry.index.contains_key(name));
            if !ok {
                return Err(Error::InvalidArgument(format!(
                    "adamw state: unexpected scalar {key:?}"
                )));
            }
        }
        if steps > 0 && moments.is_empty() {
            return Err(Error::MissingKey(format!(
                "adamw state: step = {steps} but no exp_avg/<param> tensors"
            )));
        }
        self.registry = registry;
        self.moments = moments;
        self.steps = steps;
        Ok(())
    }

    fn kind(&self) -> &'static str {
        KIND
    }
}

#[allow(clippy::too_many_arguments)]
#[multiversion::multiversion(targets("x86_64+avx512f+avx512vl+avx2+fma", "x86_64+avx2+fma"))]
fn update(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    vmax: &mut [f32],
    c: &Coef,
    amsgrad: bool,
    decay: bool,
) {
    let small = c.lerp_weight.abs() < 0.5;
    match (amsgrad, decay, small) {
        (false, false, false) => kernel::<false, false, false>(w, g, m, v, vmax, c),
        (false, false, true) => kernel::<false, false, true>(w, g, m, v, vmax, c),
        (false, true, false) => kernel::<false, true, false>(w, g, m, v, vmax, c),
        (false, true, true) => kernel::<false, true, true>(w, g, m, v, vmax, c),
        (true, false, false) => kernel::<true, false, false>(w, g, m, v, vmax, c),
        (true, false, true) => kernel::<true, false, true>(w, g, m, v, vmax, c),
        (true, true, false) => kernel::<true, true, false>(w, g, m, v, vmax, c),
        (true, true, true) => kernel::<true, true, true>(w, g, m, v, vmax, c),
    }
}

#[inline(always)]
fn adam_element<const AMS: bool, const DECAY: bool, const SMALL: bool>(
    w: &mut f32,
    g: f32,
    m: &mut f32,
    v: &mut f32,
    vmax: &mut f32,
    c: &Coef,
) {
    if DECAY {
        *w *= c.decay_factor;
    }
    let diff = g - *m;
    *m = if SMALL {
        c.lerp_weight.mul_add(diff, *m)
    } else {
        (c.lerp_weight - 1.0).mul_add(diff, g)
    };
    *v = (c.one_minus_beta2 * g).mul_add(g, *v * c.beta2);
    let second = if AMS {
        let keep = *vmax >= *v || vmax.is_nan();
        if !keep {
            *vmax = *v;
        }
        *vmax
    } else {
        *v
    };
    let denom = second.sqrt() / c.bias_correction2_sqrt + c.eps;
    *w += c.neg_step_size * *m / denom;
}

#[inline(always)]
fn kernel<const AMS: bool, const DECAY: bool, const SMALL: bool>(
    w: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    vmax: &mut [f32],
    c: &Coef,
) {
    let parts = w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
    if AMS {
        for ((((w, &g), m), v), vm) in parts.zip(vmax.iter_mut()) {
            adam_element::<AMS, DECAY, SMALL>(w, g, m, v, vm, c);
        }
    } else {
        let mut unused = 0.0f32;
        for (((w, &g), m), v) in parts {
            adam_element::<AMS, DECAY, SMALL>(w, g, m, v, &mut unused, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_like_torch() {
        let d = AdamWOptions::default();
        let bad = [
            AdamWOptions {
                betas: (1.0, 0.999),
                ..d
            },
            AdamWOptions {
                betas: (0.9, -0.1),
                ..d
            },
            AdamWOptions { eps: -1e-8, ..d },
            AdamWOptions {
                weight_decay: -0.1,
                ..d
            },
            AdamWOptions {
                betas: (f64::NAN, 0.999),
                ..d
            },
        ];
        for o in bad {
            assert!(
                matches!(AdamW::new(o), Err(Error::InvalidArgument(_))),
                "{o:?}"
            );
        }
    }

    /// Closed form of the first step: m̂ = g, v̂ = g², so w ← w(1 − lr·wd) − lr·g/(|g| + eps).
    #[test]
    fn first_step_closed_form() {
        let mut opt = AdamW::new(AdamWOptions {
            eps: 0.0,
            ..Default::default()
        })
        .unwrap();
        let mut w = vec![1.0f32, -2.0, 0.5];
        let g = [0.3f32, -7.0, 1e-3];
        let mut p = [ParamView {
            name: "w",
            value: &mut w,
            grad: &g,
            weight_decay: true,
        }];
        opt.step(&mut p, 0.1).unwrap();
        let expect = [1.0 * 0.999 - 0.1, -2.0 * 0.999 + 0.1, 0.5 * 0.999 - 0.1];
        for (a, e) in w.iter().zip(expect) {
            assert!((*a as f64 - e).abs() < 1e-6, "{a} vs {e}");
        }
    }
}
