//! Named parameters (trainable tensors with gradient accumulators) and buffers (BN running stats).

use super::{Buf, Float};
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// What a tensor is, which decides weight decay defaults and whether it trains.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamKind {
    /// Convolution / linear kernels (the "kernels" REFERENCE §2 applies L2 to).
    Weight,
    /// Biases and BN γ / β.
    Bias,
    /// Non-trainable state (BN running mean / var): saved and loaded, never given a gradient.
    Buffer,
}

struct Entry<T: Float> {
    name: String,
    shape: Vec<usize>,
    kind: ParamKind,
    value: Arc<Buf<T>>,
    /// The accumulated gradient. Empty for a trainable tensor means all zeros: [`Params::zero_grad`]
    /// returned its storage to the buffer pool, and the next backward moves the tape's gradient
    /// buffer in instead of adding it (as torch's `zero_grad(set_to_none=True)` does). Readers see
    /// zeros. Buffers never have one.
    grad: Vec<T>,
}

impl<T: Float> Entry<T> {
    /// A trainable tensor whose gradient holds no storage (all zeros).
    fn grad_zero(&self) -> bool {
        self.kind != ParamKind::Buffer && self.grad.len() != self.value.len()
    }
}

/// Parameters and buffers in insertion (forward) order, looked up by name.
pub struct Params<T: Float> {
    entries: Vec<Entry<T>>,
    by_name: HashMap<String, usize>,
    /// Zeros at least as long as the largest trainable tensor, made on the first read of a zero
    /// gradient through [`Params::grad`] (calloc'd: untouched pages cost no memory).
    zeros: OnceLock<Vec<T>>,
}

impl<T: Float> Default for Params<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Float> Params<T> {
    pub fn new() -> Self {
        Params {
            entries: Vec::new(),
            by_name: HashMap::new(),
            zeros: OnceLock::new(),
        }
    }

    /// Adds a tensor; returns its index.
    pub fn add(
        &mut self,
        name: &str,
        shape: &[usize],
        value: Vec<T>,
        kind: ParamKind,
    ) -> Result<usize> {
        if value.len() != shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "parameter {name:?} of shape {shape:?} given {} values",
                value.len()
            )));
        }
        if self.by_name.contains_key(name) {
            return Err(Error::InvalidArgument(format!(
                "parameter {name:?} added twice"
            )));
        }
        let i = self.entries.len();
        if self.zeros.get().is_some_and(|z| z.len() < value.len()) {
            self.zeros = OnceLock::new();
        }
        self.entries.push(Entry {
            name: name.to_string(),
            shape: shape.to_vec(),
            kind,
            value: Arc::new(Buf::from(value)),
            grad: Vec::new(),
        });
        self.by_name.insert(name.to_string(), i);
        Ok(i)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn index(&self, name: &str) -> Result<usize> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| Error::MissingKey(format!("no parameter named {name:?}")))
    }

    pub fn name(&self, i: usize) -> &str {
        &self.entries[i].name
    }
    pub fn shape(&self, i: usize) -> &[usize] {
        &self.entries[i].shape
    }
    pub fn kind(&self, i: usize) -> ParamKind {
        self.entries[i].kind
    }
    pub fn value(&self, i: usize) -> &[T] {
        &self.entries[i].value
    }
    /// Mutable value (copies only if a tape still holds it).
    pub fn value_mut(&mut self, i: usize) -> &mut Vec<T> {
        &mut **Arc::make_mut(&mut self.entries[i].value)
    }
    /// Two different tensors' values, mutably (e.g. BN running mean and variance).
    pub fn pair_mut(&mut self, i: usize, j: usize) -> (&mut [T], &mut [T]) {
        assert_ne!(i, j, "pair_mut of one tensor");
        let (lo, hi) = (i.min(j), i.max(j));
        let (a, b) = self.entries.split_at_mut(hi);
        let (x, y) = (
            Arc::make_mut(&mut a[lo].value).as_mut_slice(),
            Arc::make_mut(&mut b[0].value).as_mut_slice(),
        );
        if i < j {
            (x, y)
        } else {
            (y, x)
        }
    }
    /// The gradient (zeros after [`Params::zero_grad`] until a backward adds one; empty for buffers).
    pub fn grad(&self, i: usize) -> &[T] {
        let e = &self.entries[i];
        if e.grad_zero() {
            let n = e.value.len();
            let z = self.zeros.get_or_init(|| {
                let max = self
                    .entries
                    .iter()
                    .map(|e| e.value.len())
                    .max()
                    .unwrap_or(0);
                vec![T::ZERO; max]
            });
            return &z[..n];
        }
        &e.grad
    }
    pub fn grad_mut(&mut self, i: usize) -> &mut [T] {
        Self::materialise(&mut self.entries[i]);
        &mut self.entries[i].grad
    }

    /// Gives a zero gradient real storage (pooled, zeroed in parallel).
    fn materialise(e: &mut Entry<T>) {
        if e.grad_zero() {
            e.grad = Buf::zeros(e.value.len()).into_vec();
        }
    }
    pub fn trainable(&self, i: usize) -> bool {
        self.entries[i].kind != ParamKind::Buffer
    }

    /// Value and gradient of every trainable tensor, for the optimiser: (name, kind, value, grad).
    pub fn trainable_mut(&mut self) -> Vec<(&str, ParamKind, &mut Vec<T>, &[T])> {
        self.entries.iter_mut().for_each(Self::materialise);
        self.entries
            .iter_mut()
            .filter(|e| e.kind != ParamKind::Buffer)
            .map(|e| {
                (
                    e.name.as_str(),
                    e.kind,
                    &mut **Arc::make_mut(&mut e.value),
                    e.grad.as_slice(),
                )
            })
            .collect()
    }

    /// Sets every gradient to zero. The storage goes back to the buffer pool (no memory traffic);
    /// the next backward moves its gradient buffers in.
    pub fn zero_grad(&mut self) {
        for e in &mut self.entries {
            if e.kind != ParamKind::Buffer && !e.grad_zero() {
                Buf::recycle(std::mem::take(&mut e.grad));
            }
        }
    }

    /// Mutable gradient buffers of every trainable tensor (for clipping).
    pub fn grads_mut(&mut self) -> Vec<&mut [T]> {
        self.entries.iter_mut().for_each(Self::materialise);
        self.entries
            .iter_mut()
            .filter(|e| e.kind != ParamKind::Buffer)
            .map(|e| e.grad.as_mut_slice())
            .collect()
    }

    pub(super) fn leaf_parts(&self, i: usize) -> (Arc<Buf<T>>, Vec<usize>, bool) {
        let e = &self.entries[i];
        (
            e.value.clone(),
            e.shape.clone(),
            e.kind != ParamKind::Buffer,
        )
    }

    /// Adds a backward's gradient of tensor `i` (moved in when the gradient is zero).
    pub(super) fn add_grad(&mut self, i: usize, g: Buf<T>) -> Result<()> {
        let e = &mut self.entries[i];
        if e.kind == ParamKind::Buffer || e.value.len() != g.len() {
            return Err(Error::Internal(format!(
                "gradient of {:?} has {} values, expected {}",
                e.name,
                g.len(),
                e.value.len()
            )));
        }
        if e.grad_zero() {
            e.grad = g.into_vec();
        } else {
            super::add_into(&mut e.grad, &g);
        }
        Ok(())
    }

    /// Iterates (name, shape, kind, value).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[usize], ParamKind, &[T])> {
        self.entries.iter().map(|e| {
            (
                e.name.as_str(),
                e.shape.as_slice(),
                e.kind,
                e.value.as_slice(),
            )
        })
    }
}
