//! Softmax cross-entropy, mean over the batch (`kernels/loss.cu`), as `ops::loss`: targets from
//! labels with label smoothing (`softmax_cross_entropy`) or given distributions
//! (`soft_target_cross_entropy`). Logits f32 or bf16 [N, K]; the loss, the saved per-row
//! log-sum-exp and the upstream gradient are f32. Deterministic (fixed-order mean, no atomics).

use super::elementwise::suffix;
use super::kernels::LOSS;
use super::{dim, grid_stride_blocks, Arg, Gpu, Launch, BLOCK};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// `LOSS_MEAN_THREADS` of kernels/loss.cu.
const MEAN_THREADS: u32 = 256;

/// A cross-entropy over logits [n, k].
#[derive(Clone, Copy, Debug)]
pub struct CrossEntropy {
    pub dtype: DType,
    pub n: usize,
    pub k: usize,
    /// ε of the label-smoothed targets (the label entry points only).
    pub label_smoothing: f32,
}

impl CrossEntropy {
    /// Checks the support (f32 or bf16 logits), the sizes (n, k ≥ 1) and ε ∈ [0, 1].
    pub fn new(dtype: DType, n: usize, k: usize, label_smoothing: f64) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "cross-entropy on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
            )));
        }
        if n == 0 || k == 0 {
            return Err(Error::Shape(format!(
                "cross-entropy on CUDA: logits must be a non-empty [N, K], got [{n}, {k}]"
            )));
        }
        if !(0.0..=1.0).contains(&label_smoothing) {
            return Err(Error::InvalidArgument(format!(
                "cross-entropy on CUDA: label_smoothing must be in [0, 1], got {label_smoothing}"
            )));
        }
        dim(n, "batch")?;
        dim(k, "classes")?;
        n.checked_mul(k).ok_or_else(|| {
            Error::InvalidArgument(format!("cross-entropy on CUDA: [{n}, {k}] logits overflow"))
        })?;
        Ok(CrossEntropy {
            dtype,
            n,
            k,
            label_smoothing: label_smoothing as f32,
        })
    }

    /// Elements of the logits (and of their gradient).
    pub fn logits_len(&self) -> usize {
        self.n * self.k
    }

    /// f32 values of the saved log-sum-exp (one per row).
    pub fn lse_len(&self) -> usize {
        self.n
    }

    fn sizes(&self) -> [Arg; 2] {
        [Arg::I32(self.n as i32), Arg::I32(self.k as i32)]
    }

    unsafe fn forward(
        &self,
        g: &impl Gpu,
        entry: &str,
        z: u64,
        target: u64,
        lse: u64,
        loss: u64,
    ) -> Result<()> {
        let rows = g.alloc(self.n * 4)?;
        let rp = g.ptr(&rows);
        let mut args = vec![Arg::Ptr(z), Arg::Ptr(target), Arg::Ptr(rp), Arg::Ptr(lse)];
        args.extend(self.sizes());
        if entry == "ce" {
            args.push(Arg::F32(self.label_smoothing));
        }
        // One warp per row.
        g.launch(&Launch {
            module: &LOSS,
            entry: format!("loss_{entry}_forward_{}", suffix(self.dtype)),
            grid: [grid_stride_blocks(g, self.n * 32), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args,
        })?;
        g.launch(&Launch {
            module: &LOSS,
            entry: "loss_mean".into(),
            grid: [1, 1, 1],
            block: [MEAN_THREADS, 1, 1],
            shared_bytes: 0,
            args: vec![Arg::Ptr(rp), Arg::Ptr(loss), Arg::I32(self.n as i32)],
        })
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn backward(
        &self,
        g: &impl Gpu,
        entry: &str,
        z: u64,
        target: u64,
        lse: u64,
        dloss: u64,
        dz: u64,
    ) -> Result<()> {
        let mut args = vec![
            Arg::Ptr(z),
            Arg::Ptr(target),
            Arg::Ptr(lse),
            Arg::Ptr(dloss),
            Arg::Ptr(dz),
        ];
        args.extend(self.sizes());
        if entry == "ce" {
            args.push(Arg::F32(self.label_smoothing));
        }
        g.launch(&Launch {
            module: &LOSS,
            entry: format!("loss_{entry}_backward_{}", suffix(self.dtype)),
            grid: [grid_stride_blocks(g, self.logits_len()), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args,
        })
    }

    /// loss[0] (f32) = mean over rows of −Σ_k q_k log softmax(z)_k, q the label-smoothed one-hot of
    /// the row's label; lse (f32 [n]) keeps each row's log-sum-exp for the backward. A label ≥ k
    /// makes the loss NaN. Allocates an f32 scratch of n row losses.
    ///
    /// # Safety
    /// logits address `logits_len` elements of `dtype`, labels n u32, lse n f32, loss one f32; the
    /// outputs are distinct from each other and from the inputs.
    pub unsafe fn forward_labels(
        &self,
        g: &impl Gpu,
        logits: u64,
        labels: u64,
        lse: u64,
        loss: u64,
    ) -> Result<()> {
        self.forward(g, "ce", logits, labels, lse, loss)
    }

    /// dlogits = (softmax(z) − q) · dloss[0] / n (overwritten), from the forward's lse.
    ///
    /// # Safety
    /// logits and dlogits address `logits_len` elements of `dtype` (distinct), labels n u32, lse n
    /// f32 as [`Self::forward_labels`] left them, dloss one f32.
    pub unsafe fn backward_labels(
        &self,
        g: &impl Gpu,
        logits: u64,
        labels: u64,
        lse: u64,
        dloss: u64,
        dlogits: u64,
    ) -> Result<()> {
        self.backward(g, "ce", logits, labels, lse, dloss, dlogits)
    }

    /// As [`Self::forward_labels`] with given targets (f32 [n, k], rows of non-negative weights
    /// summing to 1; not checked here). `label_smoothing` is unused.
    ///
    /// # Safety
    /// As [`Self::forward_labels`], targets addressing `logits_len` f32.
    pub unsafe fn forward_soft(
        &self,
        g: &impl Gpu,
        logits: u64,
        targets: u64,
        lse: u64,
        loss: u64,
    ) -> Result<()> {
        self.forward(g, "soft", logits, targets, lse, loss)
    }

    /// As [`Self::backward_labels`] with given targets.
    ///
    /// # Safety
    /// As [`Self::backward_labels`], targets addressing `logits_len` f32.
    pub unsafe fn backward_soft(
        &self,
        g: &impl Gpu,
        logits: u64,
        targets: u64,
        lse: u64,
        dloss: u64,
        dlogits: u64,
    ) -> Result<()> {
        self.backward(g, "soft", logits, targets, lse, dloss, dlogits)
    }
}

/// `MSE_THREADS` of kernels/loss.cu.
const MSE_THREADS: u32 = 256;
/// Elements per f64 partial sum of [`mse`].
const MSE_CHUNK: usize = 8192;

/// Mean squared error of f32 `y` against `t` (`len` values each), forward and backward in one
/// pass, as `ops::shape::mse_loss` with an upstream gradient of 1: `dy = (2 / len)·(y − t)` (the
/// CPU's product, bit for bit) and `loss[0] = Σ (y − t)² / len` (f32, summed in f64 in a fixed
/// order: deterministic). Allocates one f64 per 8192 values.
///
/// # Safety
/// `y`, `t` and `dy` address `len` f32 each (`dy` distinct from both), `loss` one f32.
pub unsafe fn mse(g: &impl Gpu, y: u64, t: u64, dy: u64, loss: u64, len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::Shape(
            "MSE on CUDA: the prediction has no values".into(),
        ));
    }
    let chunks = len.div_ceil(MSE_CHUNK);
    let partial = g.alloc(chunks * 8)?;
    let pp = g.ptr(&partial);
    let cap = (g.multiprocessors().max(1) as usize) * super::BLOCKS_PER_SM as usize;
    g.launch(&Launch {
        module: &LOSS,
        entry: "mse_partial_f32".into(),
        grid: [chunks.clamp(1, cap) as u32, 1, 1],
        block: [MSE_THREADS, 1, 1],
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(y),
            Arg::Ptr(t),
            Arg::Ptr(dy),
            Arg::F32((2.0 / len as f64) as f32),
            Arg::U64(len as u64),
            Arg::I32(MSE_CHUNK as i32),
            Arg::Ptr(pp),
        ],
    })?;
    g.launch(&Launch {
        module: &LOSS,
        entry: "mse_finish".into(),
        grid: [1, 1, 1],
        block: [MSE_THREADS, 1, 1],
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(pp),
            Arg::U64(chunks as u64),
            Arg::F64(len as f64),
            Arg::Ptr(loss),
        ],
    })
}
