//! Stochastic gradient descent as torch.optim.SGD (single-tensor path, `foreach=False`).
//!
//! Per element, in f32 with torch's CPU operation order (its vectorised `add(.., alpha)` is one
//! fused multiply-add, `fma(other, alpha, self)`; scalars are rounded to f32 first):
//! ```text
//! g   = maximize ? −grad : grad
//! g   = fma(w, wd, g)                         if weight_decay ≠ 0 and the param decays
//! buf = g  (its first step)  |  fma(g, 1 − dampening, buf·momentum)     if momentum ≠ 0
//! d   = nesterov ? fma(buf, momentum, g) : buf    (d = g without momentum)
//! w   = fma(d, −lr, w)
//! ```

use super::{chunk_len, run_items, state_step, Optimizer, OptimizerState, ParamView, Registry};
use crate::error::{Error, Result};

/// torch.optim.SGD's options; `Default` is torch's defaults (plain SGD).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SgdOptions {
    pub momentum: f64,
    pub dampening: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub maximize: bool,
}

/// SGD with optional momentum / Nesterov / dampening / L2 weight decay, torch semantics.
#[derive(Clone, Debug)]
pub struct Sgd {
    opts: SgdOptions,
    registry: Registry,
    /// Momentum buffer per registered parameter (`None` until its first step; unused without
    /// momentum).
    bufs: Vec<Option<Vec<f32>>>,
    steps: u64,
}

const KIND: &str = "sgd";
const BUF_PREFIX: &str = "momentum_buffer/";

impl Sgd {
    /// Checks the options as torch.optim.SGD's constructor does.
    pub fn new(opts: SgdOptions) -> Result<Sgd> {
        let SgdOptions {
            momentum,
            dampening,
            nesterov,
            weight_decay,
            ..
        } = opts;
        if !(momentum.is_finite() && momentum >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "sgd: momentum must be finite and >= 0, got {momentum}"
            )));
        }
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "sgd: weight_decay must be finite and >= 0, got {weight_decay}"
            )));
        }
        if !dampening.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "sgd: dampening must be finite, got {dampening}"
            )));
        }
        if nesterov && (momentum <= 0.0 || dampening != 0.0) {
            return Err(Error::InvalidArgument(format!(
                "sgd: Nesterov momentum requires a momentum and zero dampening \
                 (momentum {momentum}, dampening {dampening})"
            )));
        }
        Ok(Sgd {
            opts,
            registry: Registry::default(),
            bufs: Vec::new(),
            steps: 0,
        })
    }

    pub fn options(&self) -> &SgdOptions {
        &self.opts
    }
}

/// The f32 scalars of one step, rounded as torch rounds them.
#[derive(Clone, Copy)]
struct Coef {
    sign: f32,
    wd: f32,
    momentum: f32,
    one_minus_dampening: f32,
    neg_lr: f32,
}

struct Item<'a> {
    w: &'a mut [f32],
    g: &'a [f32],
    buf: &'a mut [f32],
    first: bool,
    decay: bool,
}

impl Optimizer for Sgd {
    fn step(&mut self, params: &mut [ParamView<'_>], lr: f64) -> Result<()> {
        let slots = self.registry.resolve(KIND, params, lr)?;
        self.bufs.resize(self.registry.names.len(), None);
        let o = self.opts;
        let with_momentum = o.momentum != 0.0;
        let coef = Coef {
            sign: if o.maximize { -1.0 } else { 1.0 },
            wd: o.weight_decay as f32,
            momentum: o.momentum as f32,
            one_minus_dampening: (1.0 - o.dampening) as f32,
            neg_lr: (-lr) as f32,
        };
        let total: usize = params.iter().map(|p| p.value.len()).sum();
        let chunk = chunk_len(total);
        let mut firsts = vec![false; slots.len()];
        if with_momentum {
            for (&i, first) in slots.iter().zip(firsts.iter_mut()) {
                if self.bufs[i].is_none() {
                    self.bufs[i] = Some(vec![0.0; self.registry.lens[i]]);
                    *first = true;
                }
            }
        }
        let mut buf_of: Vec<Option<&mut Vec<f32>>> =
            self.bufs.iter_mut().map(|b| b.as_mut()).collect();
        let mut items = Vec::new();
        for ((p, &i), &first) in params.iter_mut().zip(&slots).zip(&firsts) {
            let decay = p.weight_decay && o.weight_decay != 0.0;
            let buf: &mut [f32] = match buf_of[i].take() {
                Some(b) => b,
                None if !with_momentum => &mut [],
                None => {
                    return Err(Error::Internal(format!(
                        "sgd: no momentum buffer for {:?}",
                        p.name
                    )))
                }
            };
            let (w, g): (&mut [f32], &[f32]) = (&mut *p.value, p.grad);
            if !with_momentum {
                for (w, g) in w.chunks_mut(chunk).zip(g.chunks(chunk)) {
                    items.push(Item {
                        w,
                        g,
                        buf: &mut [],
                        first,
                        decay,
                    });
                }
            } else {
                for ((w, g), buf) in w
                    .chunks_mut(chunk)
                    .zip(g.chunks(chunk))
                    .zip(buf.chunks_mut(chunk))
                {
                    items.push(Item {
                        w,
                        g,
                        buf,
                        first,
                        decay,
                    });
                }
            }
        }
        let nesterov = o.nesterov;
        run_items(items, total, |it| {
            update(
                it.w,
                it.g,
                it.buf,
                &coef,
                with_momentum,
                nesterov,
                it.first,
                it.decay,
            )
        });
        self.steps += 1;
        Ok(())
    }

    fn steps(&self) -> u64 {
        self.steps
    }

    fn state(&self) -> OptimizerState {
        let tensors = self
            .registry
            .names
            .iter()
            .zip(&self.bufs)
            .filter_map(|(n, b)| b.as_ref().map(|b| (format!("{BUF_PREFIX}{n}"), b.clone())))
            .collect();
        OptimizerState {
            tensors,
            scalars: vec![("step".to_string(), self.steps as f64)],
        }
    }

    /// Accepts a state from `state()` of an SGD with the same momentum setting: "step" and, with
    /// momentum, one "momentum_buffer/<name>" per parameter (which also fixes the parameters'
    /// names and lengths). Without momentum the parameters are registered again by the next step.
    fn load_state(&mut self, s: &OptimizerState) -> Result<()> {
        let steps = state_step(KIND, s, "step")?;
        if let Some((name, _)) = s.scalars.iter().find(|(n, _)| n != "step") {
            return Err(Error::InvalidArgument(format!(
                "sgd state: unknown scalar {name:?}"
            )));
        }
        let mut registry = Registry::default();
        let mut bufs = Vec::with_capacity(s.tensors.len());
        for (key, v) in &s.tensors {
            let name = key.strip_prefix(BUF_PREFIX).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "sgd state: unknown tensor {key:?} (expected {BUF_PREFIX}<param>)"
                ))
            })?;
            registry.insert(name, v.len())?;
            bufs.push(Some(v.clone()));
        }
        let with_momentum = self.opts.momentum != 0.0;
        if !with_momentum && !bufs.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "sgd state: has momentum buffers ({}) but this optimizer has momentum 0",
                s.tensors[0].0
            )));
        }
        if with_momentum && steps > 0 && bufs.is_empty() {
            return Err(Error::MissingKey(format!(
                "sgd state: step = {steps} but no {BUF_PREFIX}<param> tensors (momentum {})",
                self.opts.momentum
            )));
        }
        self.registry = registry;
        self.bufs = bufs;
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
    buf: &mut [f32],
    c: &Coef,
    momentum: bool,
    nesterov: bool,
    first: bool,
    decay: bool,
) {
    macro_rules! go {
        ($($m:literal $n:literal $f:literal $d:literal),*) => {
            match (momentum, nesterov, first, decay) {
                $(($m, $n, $f, $d) => kernel::<$m, $n, $f, $d>(w, g, buf, c),)*
            }
        };
    }
    go!(
        false false false false, false false false true, false false true false, false false true true,
        false true false false, false true false true, false true true false, false true true true,
        true false false false, true false false true, true false true false, true false true true,
        true true false false, true true false true, true true true false, true true true true
    )
}

#[inline(always)]
fn kernel<const MOM: bool, const NEST: bool, const FIRST: bool, const DECAY: bool>(
    w: &mut [f32],
    g: &[f32],
    buf: &mut [f32],
    c: &Coef,
) {
    if MOM {
        for ((w, &g), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
            let mut g = g * c.sign;
            if DECAY {
                g = w.mul_add(c.wd, g);
            }
            *b = if FIRST {
                g
            } else {
                g.mul_add(c.one_minus_dampening, *b * c.momentum)
            };
            let d = if NEST { b.mul_add(c.momentum, g) } else { *b };
            *w = d.mul_add(c.neg_lr, *w);
        }
    } else {
        for (w, &g) in w.iter_mut().zip(g) {
            let mut g = g * c.sign;
            if DECAY {
                g = w.mul_add(c.wd, g);
            }
            *w = g.mul_add(c.neg_lr, *w);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(name: &'a str, w: &'a mut [f32], g: &'a [f32]) -> ParamView<'a> {
        ParamView {
            name,
            value: w,
            grad: g,
            weight_decay: true,
        }
    }

    #[test]
    fn options_are_checked_like_torch() {
        let bad = [
            SgdOptions {
                momentum: -0.1,
                ..Default::default()
            },
            SgdOptions {
                weight_decay: -1e-4,
                ..Default::default()
            },
            SgdOptions {
                nesterov: true,
                ..Default::default()
            },
            SgdOptions {
                nesterov: true,
                momentum: 0.9,
                dampening: 0.1,
                ..Default::default()
            },
            SgdOptions {
                momentum: f64::NAN,
                ..Default::default()
            },
        ];
        for o in bad {
            assert!(
                matches!(Sgd::new(o), Err(Error::InvalidArgument(_))),
                "{o:?}"
            );
        }
        let nesterov = SgdOptions {
            nesterov: true,
            momentum: 0.9,
            ..Default::default()
        };
        assert!(Sgd::new(nesterov).is_ok());
    }

    /// Closed form: with constant gradient g and momentum μ (no dampening) the buffer after k
    /// steps is g(1 + μ + … + μ^(k−1)); values chosen exact in f32.
    #[test]
    fn momentum_closed_form() {
        let mut sgd = Sgd::new(SgdOptions {
            momentum: 0.5,
            ..Default::default()
        })
        .unwrap();
        let mut w = vec![0.0f32; 3];
        let g = [1.0f32, -2.0, 4.0];
        let mut expected = [0.0f32; 3];
        let mut buf = 0.0f32;
        for _ in 0..4 {
            sgd.step(&mut [view("w", &mut w, &g)], 0.25).unwrap();
            buf = if buf == 0.0 { 1.0 } else { 0.5 * buf + 1.0 };
            for (e, gi) in expected.iter_mut().zip(g) {
                *e -= 0.25 * buf * gi;
            }
        }
        assert_eq!(w, expected);
        assert_eq!(sgd.steps(), 4);
    }

    /// A large parameter (chunked, parallel) updates to the same bits as the same values passed
    /// as many small parameters.
    #[test]
    fn chunking_does_not_change_bits() {
        let n: usize = 300_001;
        let opts = SgdOptions {
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-3,
            ..Default::default()
        };
        let w0: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3 - 0.5)
            .collect();
        let g: Vec<f32> = (0..n)
            .map(|i| ((i * 104729) % 997) as f32 * 1e-3 - 0.4)
            .collect();
        let mut big = Sgd::new(opts).unwrap();
        let mut wb = w0.clone();
        let mut ws = w0.clone();
        let mut small = Sgd::new(opts).unwrap();
        for _ in 0..3 {
            big.step(&mut [view("w", &mut wb, &g)], 0.1).unwrap();
            let mut views: Vec<ParamView> = Vec::new();
            let names: Vec<String> = (0..(n + 9999) / 10000).map(|k| format!("w{k}")).collect();
            for ((name, w), g) in names.iter().zip(ws.chunks_mut(10000)).zip(g.chunks(10000)) {
                views.push(view(name, w, g));
            }
            small.step(&mut views, 0.1).unwrap();
        }
        assert!(wb.iter().zip(&ws).all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
