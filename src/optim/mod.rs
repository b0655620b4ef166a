//! Optimisers (SGD as torch.optim.SGD, AdamW as torch.optim.AdamW), learning-rate schedules and
//! gradient clipping, all with torch's semantics and f32 operation order (see each file).
//!
//! An optimiser sees parameters as named flat f32 slices (`ParamView`). The first `step` registers
//! every name and its length; later steps may pass any subset of them (a parameter without a
//! gradient this step is simply left out, as torch skips `p.grad is None`), but never a new name or
//! a changed length.

mod adamw;
mod clip;
mod schedule;
mod sgd;

pub use adamw::{AdamW, AdamWOptions};
pub use clip::{clip_grad_norm, clip_grad_value};
pub use schedule::{LrSchedule, Schedule};
pub use sgd::{Sgd, SgdOptions};

use crate::error::{Error, Result};
use std::collections::HashMap;

/// One parameter tensor as the optimiser sees it (f32 master weights).
pub struct ParamView<'a> {
    pub name: &'a str,
    pub value: &'a mut [f32],
    pub grad: &'a [f32],
    /// Whether the optimiser's weight decay applies to this parameter (torch: its param group's
    /// `weight_decay`, or 0).
    pub weight_decay: bool,
}

pub trait Optimizer: Send {
    /// Updates every parameter in place from its gradient at learning rate `lr`. Shapes are fixed
    /// after the first call (a param whose length changes, or a name seen for the first time after
    /// step 1, is an Error::Shape / InvalidArgument naming it).
    fn step(&mut self, params: &mut [ParamView<'_>], lr: f64) -> Result<()>;
    /// Number of completed steps.
    fn steps(&self) -> u64;
    /// Full state for checkpoints: named f32 tensors plus scalars ("step"); round-trips exactly
    /// through `load_state`.
    fn state(&self) -> OptimizerState;
    fn load_state(&mut self, s: &OptimizerState) -> Result<()>;
    /// "sgd" | "adamw"
    fn kind(&self) -> &'static str;
}

/// Checkpointable optimiser state: named f32 tensors and named scalars.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptimizerState {
    pub tensors: Vec<(String, Vec<f32>)>,
    pub scalars: Vec<(String, f64)>,
}

impl OptimizerState {
    pub fn tensor(&self, name: &str) -> Option<&[f32]> {
        self.tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }

    pub fn scalar(&self, name: &str) -> Option<f64> {
        self.scalars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| *v)
    }
}

/// Total parameter count above which an update runs on the thread pool.
const PARALLEL_MIN_ELEMS: usize = 1 << 16;
/// Elements per parallel work item (a multiple of every SIMD width).
const CHUNK: usize = 1 << 14;

/// Names and lengths of the registered parameters, in registration order.
#[derive(Clone, Debug, Default)]
struct Registry {
    names: Vec<String>,
    lens: Vec<usize>,
    index: HashMap<String, usize>,
}

impl Registry {
    fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    fn insert(&mut self, name: &str, len: usize) -> Result<usize> {
        if self.index.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "optimizer: parameter {name:?} is registered twice"
            )));
        }
        let i = self.names.len();
        self.names.push(name.to_string());
        self.lens.push(len);
        self.index.insert(name.to_string(), i);
        Ok(i)
    }

    /// Checks one step's parameters and returns each one's registry slot. On the first step
    /// (empty registry) the parameters are registered in the order given.
    fn resolve(&mut self, kind: &str, params: &[ParamView<'_>], lr: f64) -> Result<Vec<usize>> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "{kind}: learning rate must be finite and >= 0, got {lr}"
            )));
        }
        for p in params {
            if p.value.len() != p.grad.len() {
                return Err(Error::Shape(format!(
                    "{kind}: parameter {:?} has {} values but its gradient has {}",
                    p.name,
                    p.value.len(),
                    p.grad.len()
                )));
            }
        }
        if self.is_empty() {
            let mut fresh = Registry::default();
            for p in params {
                fresh.insert(p.name, p.value.len())?;
            }
            *self = fresh;
            return Ok((0..params.len()).collect());
        }
        let mut seen = vec![false; self.names.len()];
        params
            .iter()
            .map(|p| {
                let i = *self.index.get(p.name).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{kind}: parameter {:?} was not passed to the first step (known: {} parameters)",
                        p.name,
                        self.names.len()
                    ))
                })?;
                if std::mem::replace(&mut seen[i], true) {
                    return Err(Error::InvalidArgument(format!(
                        "{kind}: parameter {:?} passed twice in one step",
                        p.name
                    )));
                }
                if p.value.len() != self.lens[i] {
                    return Err(Error::Shape(format!(
                        "{kind}: parameter {:?} has {} elements, but had {} when registered",
                        p.name,
                        p.value.len(),
                        self.lens[i]
                    )));
                }
                Ok(i)
            })
            .collect()
    }
}

/// Reads the "step" scalar of a state as a step count.
fn state_step(kind: &str, s: &OptimizerState, key: &str) -> Result<u64> {
    let v = s
        .scalar(key)
        .ok_or_else(|| Error::MissingKey(format!("{kind} state: no scalar {key:?}")))?;
    if !(v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53)) {
        return Err(Error::InvalidArgument(format!(
            "{kind} state: scalar {key:?} must be a non-negative integer, got {v}"
        )));
    }
    Ok(v as u64)
}

/// Splits `len` elements into the work items of one update: whole when small, CHUNK pieces
/// otherwise. Element-wise updates give the same bits whichever split is used.
fn chunk_len(total: usize) -> usize {
    if total >= PARALLEL_MIN_ELEMS {
        CHUNK
    } else {
        usize::MAX
    }
}

/// Runs `f` over `items`, on the thread pool when the update is large.
fn run_items<T: Send>(items: Vec<T>, total: usize, f: impl Fn(T) + Sync + Send) {
    use rayon::prelude::*;
    if total >= PARALLEL_MIN_ELEMS && crate::threads::num_threads() > 1 {
        crate::threads::install(|| items.into_par_iter().for_each(&f));
    } else {
        items.into_iter().for_each(f);
    }
}
