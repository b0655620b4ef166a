//! Reverse-mode automatic differentiation: a tape of recorded ops, parameters and their gradients.
//!
//! Ownership:
//! - [`Params`] owns every trainable tensor (value + gradient accumulator, torchvision-style names)
//!   and every non-trainable buffer (BN running statistics). Values are `Arc`-shared so the tape can
//!   keep them for backward without copying; after the tape is gone the optimiser updates them in
//!   place (`Arc::make_mut` never copies then).
//! - A [`Tape`] lives for one forward + backward. Ops append a node holding exactly what their
//!   backward needs (saved activations as `Arc`s). `Tape::backward` drops the tape's own references
//!   first, then runs the nodes newest-first and drops each node — and with it its saved activations —
//!   right after it ran, so memory falls as backward proceeds.
//! - Gradients of intermediate values live in [`Grads`] only until the op that consumes them ran.
//!
//! Everything is generic over [`Float`] (f32 for training, f64 for finite-difference checks).

mod float;
mod params;
pub mod pool;

pub use float::Float;
pub use params::{ParamKind, Params};
pub use pool::Buf;

use crate::error::{Error, Result};
use std::sync::Arc;

/// A value recorded on a tape: an id and its shape. Cheap to clone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Var {
    id: usize,
    shape: Vec<usize>,
}

impl Var {
    pub fn id(&self) -> usize {
        self.id
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

type Backward<T> = Box<dyn FnOnce(&mut Grads<T>) -> Result<()> + Send>;

/// The tape of one forward pass.
/// Per-op timing of tapes (`PHENOCORE_TAPE_PROFILE=1`, or `=shapes` for one row per op and output
/// shape): forward time = time since the previous recorded op on this thread, backward time per
/// node; a table on stderr after each backward.
mod profile {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    use std::time::Instant;

    pub fn enabled() -> bool {
        static ON: OnceLock<bool> = OnceLock::new();
        *ON.get_or_init(|| std::env::var_os("PHENOCORE_TAPE_PROFILE").is_some_and(|v| v != "0"))
    }

    /// The table row of an op: its name, with the output shape under `=shapes`.
    pub fn key(name: &'static str, shape: &[usize]) -> String {
        static SHAPES: OnceLock<bool> = OnceLock::new();
        if *SHAPES.get_or_init(|| {
            std::env::var_os("PHENOCORE_TAPE_PROFILE").is_some_and(|v| v == "shapes")
        }) {
            format!("{name} {shape:?}")
        } else {
            name.to_string()
        }
    }

    /// "phenocore::ops::conv::conv2d_pad<f32>::{{closure}}" → "ops::conv::conv2d_pad".
    pub fn op_name(closure: &'static str) -> &'static str {
        let s = closure.strip_prefix("phenocore::").unwrap_or(closure);
        let end = s.find(['<', '{']).unwrap_or(s.len());
        s[..end].trim_end_matches("::")
    }

    #[derive(Default)]
    struct Stat {
        count: usize,
        fwd: f64,
        bwd: f64,
    }

    /// Time of the last recorded op, and the stats per op.
    type Table = Mutex<(Option<Instant>, HashMap<String, Stat>)>;

    fn table() -> &'static Table {
        static T: OnceLock<Table> = OnceLock::new();
        T.get_or_init(|| Mutex::new((None, HashMap::new())))
    }

    pub fn forward_op(name: String) {
        let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let dt = t.0.map_or(0.0, |p| (now - p).as_secs_f64());
        t.0 = Some(now);
        let e = t.1.entry(name).or_default();
        e.count += 1;
        e.fwd += dt;
    }

    pub fn backward_op(name: &str, dt: f64) {
        let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = t.1.get_mut(name) {
            e.bwd += dt;
        }
    }

    pub fn report() {
        if !enabled() {
            return;
        }
        let mut t = table().lock().unwrap_or_else(|e| e.into_inner());
        let mut rows: Vec<_> = t.1.drain().collect();
        t.0 = None;
        rows.sort_by(|a, b| (b.1.fwd + b.1.bwd).total_cmp(&(a.1.fwd + a.1.bwd)));
        let (f, b) = rows
            .iter()
            .fold((0.0, 0.0), |(f, b), r| (f + r.1.fwd, b + r.1.bwd));
        eprintln!("tape profile: forward {f:.3} s, backward {b:.3} s");
        for (name, s) in rows {
            eprintln!(
                "  {name:<64} {:>5} ops  fwd {:>7.3} s  bwd {:>7.3} s",
                s.count, s.fwd, s.bwd
            );
        }
    }
}

pub struct Tape<T: Float> {
    values: Vec<Option<Arc<Buf<T>>>>,
    requires_grad: Vec<bool>,
    /// Leaf vars that are parameters: (var id, parameter index).
    param_leaves: Vec<(usize, usize)>,
    nodes: Vec<Backward<T>>,
    training: bool,
    /// false: a no-grad tape (parameters enter as constants, ops record no backward or saved values).
    grad: bool,
}

impl<T: Float> Tape<T> {
    /// A new tape; `training` selects train-mode behaviour of BN / dropout / drop-connect.
    pub fn new(training: bool) -> Self {
        Tape {
            values: Vec::new(),
            requires_grad: Vec::new(),
            param_leaves: Vec::new(),
            nodes: Vec::new(),
            training,
            grad: true,
        }
    }

    /// A tape for inference: eval-mode behaviour and no gradients — parameters enter as constants,
    /// so ops record no backward and keep no saved activations (values can be released as the
    /// forward goes).
    pub fn no_grad() -> Self {
        let mut t = Self::new(false);
        t.grad = false;
        t
    }

    pub fn training(&self) -> bool {
        self.training
    }

    /// Whether this tape records gradients (false for [`Tape::no_grad`]).
    pub fn records_grad(&self) -> bool {
        self.grad
    }

    /// Records an input (no gradient unless `requires_grad`).
    pub fn input(&mut self, shape: &[usize], data: Vec<T>, requires_grad: bool) -> Result<Var> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "input of shape {shape:?} needs {} values, got {}",
                shape.iter().product::<usize>(),
                data.len()
            )));
        }
        self.input_buf(shape, Buf::from(data), requires_grad)
    }

    /// [`Tape::input`] of a pooled buffer (its storage returns to the pool when released).
    pub fn input_buf(&mut self, shape: &[usize], data: Buf<T>, requires_grad: bool) -> Result<Var> {
        if data.len() != shape.iter().product::<usize>() {
            return Err(Error::Shape(format!(
                "input of shape {shape:?} needs {} values, got {}",
                shape.iter().product::<usize>(),
                data.len()
            )));
        }
        Ok(self.leaf(shape, Arc::new(data), requires_grad && self.grad))
    }

    /// Records parameter `index` of `params` as a leaf whose gradient flows into `params`.
    pub fn param(&mut self, params: &Params<T>, index: usize) -> Var {
        let (value, shape, trainable) = params.leaf_parts(index);
        let trainable = trainable && self.grad;
        let v = self.leaf(&shape, value, trainable);
        if trainable {
            self.param_leaves.push((v.id, index));
        }
        v
    }

    /// Records parameter `name` (see [`Tape::param`]).
    pub fn param_named(&mut self, params: &Params<T>, name: &str) -> Result<Var> {
        let i = params.index(name)?;
        Ok(self.param(params, i))
    }

    fn leaf(&mut self, shape: &[usize], value: Arc<Buf<T>>, requires_grad: bool) -> Var {
        let id = self.values.len();
        self.values.push(Some(value));
        self.requires_grad.push(requires_grad);
        Var {
            id,
            shape: shape.to_vec(),
        }
    }

    /// The value of `v` (shared). Panics only on a var of another tape (a programming error).
    pub fn value(&self, v: &Var) -> Arc<Buf<T>> {
        self.values[v.id]
            .clone()
            .unwrap_or_else(|| panic!("value of var {} was released", v.id))
    }

    /// Borrowed value of `v`.
    pub fn data(&self, v: &Var) -> &[T] {
        self.values[v.id]
            .as_deref()
            .unwrap_or_else(|| panic!("value of var {} was released", v.id))
    }

    pub fn requires_grad(&self, v: &Var) -> bool {
        self.requires_grad[v.id]
    }

    /// Records the output of an op. `backward` is called with the gradient store during
    /// `Tape::backward` if any input requires a gradient; it must take the output's gradient with
    /// `Grads::take(out_id)` and accumulate the inputs' gradients.
    pub fn push(
        &mut self,
        shape: &[usize],
        data: impl Into<Buf<T>>,
        inputs_require_grad: bool,
        backward: impl FnOnce(usize, &mut Grads<T>) -> Result<()> + Send + 'static,
    ) -> Var {
        let data = data.into();
        debug_assert_eq!(data.len(), shape.iter().product::<usize>());
        let v = self.leaf(shape, Arc::new(data), inputs_require_grad);
        if inputs_require_grad {
            let id = v.id;
            if profile::enabled() {
                let name = profile::op_name(std::any::type_name_of_val(&backward));
                let name = profile::key(name, shape);
                profile::forward_op(name.clone());
                self.nodes.push(Box::new(move |g| {
                    let t = std::time::Instant::now();
                    let r = backward(id, g);
                    profile::backward_op(&name, t.elapsed().as_secs_f64());
                    r
                }));
            } else {
                self.nodes.push(Box::new(move |g| backward(id, g)));
            }
        }
        v
    }

    /// Releases the tape's own reference to `v`'s value (ops that saved it keep theirs).
    pub fn release(&mut self, v: &Var) {
        self.values[v.id] = None;
    }

    /// Number of recorded backward nodes.
    pub fn num_nodes(&self) -> usize {
        self.nodes.len()
    }

    /// Back-propagates from the scalar `loss` (gradient 1) and adds parameter gradients into
    /// `params`. Consumes the tape.
    pub fn backward(self, loss: &Var, params: &mut Params<T>) -> Result<()> {
        let seed = vec![T::ONE; loss.numel()];
        self.backward_with(loss, seed, params).map(|_| ())
    }

    /// Back-propagates `grad` (same shape as `out`) and returns the gradients of the leaves that
    /// required one and are not parameters (by var id), after adding parameter gradients into `params`.
    pub fn backward_with(
        self,
        out: &Var,
        grad: Vec<T>,
        params: &mut Params<T>,
    ) -> Result<Grads<T>> {
        if grad.len() != out.numel() {
            return Err(Error::Shape(format!(
                "output gradient has {} values, the output {:?} has {}",
                grad.len(),
                out.shape,
                out.numel()
            )));
        }
        let Tape {
            values,
            requires_grad,
            param_leaves,
            mut nodes,
            ..
        } = self;
        drop(values);
        let mut grads = Grads {
            slots: (0..requires_grad.len()).map(|_| None).collect(),
            requires: requires_grad,
        };
        if grads.requires[out.id] {
            grads.slots[out.id] = Some(Buf::from(grad));
        }
        while let Some(node) = nodes.pop() {
            node(&mut grads)?;
        }
        for (id, index) in param_leaves {
            if let Some(g) = grads.slots[id].take() {
                params.add_grad(index, g)?;
            }
        }
        profile::report();
        Ok(grads)
    }
}

/// Elements per parallel task when gradients are summed.
const ADD_CHUNK: usize = 1 << 15;

/// acc += g, elementwise, across the pool.
pub(crate) fn add_into<T: Float>(acc: &mut [T], g: &[T]) {
    use rayon::prelude::*;
    acc.par_chunks_mut(ADD_CHUNK)
        .zip(g.par_chunks(ADD_CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += *b));
}

/// Gradients of the values of one tape, by var id, during backward.
pub struct Grads<T: Float> {
    slots: Vec<Option<Buf<T>>>,
    requires: Vec<bool>,
}

impl<T: Float> Grads<T> {
    /// Takes the gradient of var `id` (None when nothing downstream produced one).
    pub fn take(&mut self, id: usize) -> Option<Buf<T>> {
        self.slots[id].take()
    }

    /// Whether var `id` needs a gradient.
    pub fn wants(&self, id: usize) -> bool {
        self.requires[id]
    }

    /// The gradient of `v` after backward (leaves), if one was produced.
    pub fn get(&self, v: &Var) -> Option<&[T]> {
        self.slots[v.id].as_deref().map(|v| v.as_slice())
    }

    /// Adds `g` into var `id`'s gradient (moves it in when there is none yet). No-op when `id`
    /// does not require a gradient.
    pub fn add(&mut self, id: usize, g: impl Into<Buf<T>>) {
        if !self.requires[id] {
            return;
        }
        let g = g.into();
        match &mut self.slots[id] {
            Some(acc) => {
                debug_assert_eq!(acc.len(), g.len());
                add_into(acc, &g);
            }
            slot => *slot = Some(g),
        }
    }

    /// As [`Grads::accumulate`], but a new buffer's contents are unspecified: `f` must overwrite
    /// every element when `fresh`.
    pub fn accumulate_uninit(
        &mut self,
        id: usize,
        len: usize,
        f: impl FnOnce(&mut [T], bool),
    ) -> bool {
        self.with_slot(id, len, Buf::alloc, f)
    }

    /// Runs `f` on var `id`'s gradient buffer of length `len` (zeros when new) so an op can
    /// accumulate into it in place; returns false (and does nothing) if `id` needs no gradient.
    /// `f` gets `fresh = true` when the buffer was just created (all zeros) — ops may overwrite.
    pub fn accumulate(&mut self, id: usize, len: usize, f: impl FnOnce(&mut [T], bool)) -> bool {
        self.with_slot(id, len, Buf::zeros, f)
    }

    fn with_slot(
        &mut self,
        id: usize,
        len: usize,
        new: fn(usize) -> Buf<T>,
        f: impl FnOnce(&mut [T], bool),
    ) -> bool {
        if !self.requires[id] {
            return false;
        }
        let slot = &mut self.slots[id];
        let fresh = slot.is_none();
        let buf = slot.get_or_insert_with(|| new(len));
        debug_assert_eq!(buf.len(), len);
        f(buf, fresh);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_reach_parameters_and_accumulate() {
        // y = p * x (elementwise, p a parameter), used twice: loss = sum(y) + sum(y) -> dp = 2x.
        let mut params = Params::<f64>::new();
        params
            .add("p", &[3], vec![1.0, 2.0, 3.0], ParamKind::Weight)
            .unwrap();
        let mut tape = Tape::<f64>::new(true);
        let x = tape.input(&[3], vec![4.0, 5.0, 6.0], false).unwrap();
        let p = tape.param(&params, 0);
        let (xv, pv) = (tape.value(&x), tape.value(&p));
        let y: Vec<f64> = xv.iter().zip(pv.iter()).map(|(a, b)| a * b).collect();
        let (pid, xs) = (p.id(), xv.clone());
        let yv = tape.push(&[3], y, true, move |out, g| {
            if let Some(dy) = g.take(out) {
                let dp: Vec<f64> = dy.iter().zip(xs.iter()).map(|(d, x)| d * x).collect();
                g.add(pid, dp);
            }
            Ok(())
        });
        let yid = yv.id();
        let s = tape.push(&[1], vec![0.0], true, move |out, g| {
            if let Some(d) = g.take(out) {
                g.add(yid, vec![2.0 * d[0]; 3]);
            }
            Ok(())
        });
        tape.backward(&s, &mut params).unwrap();
        assert_eq!(params.grad(0), &[8.0, 10.0, 12.0]);
    }

    /// One backward of loss = Σ p·x into `params`.
    fn backward_once(params: &mut Params<f64>, x: [f64; 3]) {
        let mut tape = Tape::<f64>::new(true);
        let p = tape.param(params, 0);
        let pid = p.id();
        let y = tape.push(&[1], vec![0.0], true, move |out, g| {
            if let Some(d) = g.take(out) {
                g.add(pid, x.iter().map(|v| v * d[0]).collect::<Vec<_>>());
            }
            Ok(())
        });
        tape.backward(&y, params).unwrap();
    }

    #[test]
    fn zero_grad_reads_zeros_and_backwards_accumulate() {
        let mut params = Params::<f64>::new();
        params
            .add("p", &[3], vec![1.0; 3], ParamKind::Weight)
            .unwrap();
        params
            .add("q", &[5], vec![1.0; 5], ParamKind::Weight)
            .unwrap();
        params
            .add("bn", &[2], vec![0.0; 2], ParamKind::Buffer)
            .unwrap();
        // Before any backward: zeros of the right length (buffers have none).
        assert_eq!(params.grad(0), &[0.0; 3]);
        assert_eq!(params.grad(1), &[0.0; 5]);
        assert!(params.grad(2).is_empty());
        backward_once(&mut params, [1.0, 2.0, 3.0]);
        assert_eq!(params.grad(0), &[1.0, 2.0, 3.0]);
        assert_eq!(params.grad(1), &[0.0; 5]); // got no gradient
                                               // A second backward without zero_grad adds.
        backward_once(&mut params, [1.0, 1.0, 1.0]);
        assert_eq!(params.grad(0), &[2.0, 3.0, 4.0]);
        params.zero_grad();
        assert_eq!(params.grad(0), &[0.0; 3]);
        backward_once(&mut params, [5.0, 6.0, 7.0]);
        assert_eq!(params.grad(0), &[5.0, 6.0, 7.0]);
        // Mutable access after zero_grad gives real zeros that later backwards add to.
        params.zero_grad();
        params.grad_mut(0).copy_from_slice(&[1.0, 1.0, 1.0]);
        backward_once(&mut params, [1.0, 2.0, 3.0]);
        assert_eq!(params.grad(0), &[2.0, 3.0, 4.0]);
        params.zero_grad();
        let g = params.grads_mut();
        assert_eq!(g.len(), 2);
        assert!(g.iter().all(|g| g.iter().all(|&v| v == 0.0)));
    }
}
