//! Normalisation (`kernels/norm.cu`), channel-last: batch norm over the rows of x [M, C] (training
//! and eval mode, optional fused SiLU and residual), group norm over x [N, P, C] (optional fused
//! SiLU) and layer norm over the last axis, each with backward. The semantics are those of
//! `ops::norm::batch_norm` and `ops::groupnorm::{group_norm, layer_norm}`: biased variance for the
//! normalisation, ε inside the square root, the running variance unbiased (M / (M − 1)) when the
//! config says so.
//!
//! Storage of x, y, dy, dx and the residual is f32 or bf16; γ, β, the saved statistics (mean and
//! 1/√(σ² + ε)), the running statistics and the parameter gradients are f32. Every reduction is a
//! fixed-order two-stage one (per-split partials, then a combine): results do not vary from run to
//! run on a device. Batch-norm statistics merge per-split (count, mean, M2) with Chan's formula
//! (each thread's own values as sums shifted by its first value), so a large mean relative to σ
//! or millions of rows cost no accuracy.

use super::elementwise::suffix;
use super::kernels::NORM;
use super::{dim, grid_extent, grid_stride_blocks, Arg, Gpu, Launch, BLOCK};
use crate::error::{Error, Result};
use crate::ops::norm::{Act, BatchNormConfig};
use crate::tensor::DType;

/// `NR` of kernels/norm.cu: row groups of the combine blocks (32 × NR threads).
const NR: u32 = 8;
/// `COL_THREADS` of kernels/norm.cu: threads of the stage-1 column blocks.
const COL_THREADS: u32 = 256;
/// Splits cover at most this many rows (at least 8 threads per channel: at most 256 rows per
/// thread), so the f32 sums of one thread stay short whatever M is.
const MAX_ROWS_PER_SPLIT: usize = 2048;
/// ... and at least this many, when more splits would only add combine work.
const MIN_ROWS_PER_SPLIT: usize = 64;

/// The kernels' `NormGeom`: x is [n, p, c]; statistics per (sample, group of cg channels).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct NormGeom {
    pub n: i32,
    pub p: i32,
    pub c: i32,
    pub g: i32,
    pub cg: i32,
    pub rows_per_split: i32,
    pub splits: i32,
    pub silu: i32,
    /// Channels per stage-1 column block: min(c, 32).
    pub tile: i32,
}

fn check_dtype(dtype: DType, what: &str) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::BF16) {
        return Err(Error::InvalidArgument(format!(
            "{what} on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
        )));
    }
    Ok(())
}

fn check_eps(eps: f64, what: &str) -> Result<f32> {
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "{what}: eps must be finite and ≥ 0, got {eps}"
        )));
    }
    Ok(eps as f32)
}

/// What batch and group norm share: x [n, p, c], `groups` groups of consecutive channels.
#[derive(Clone, Copy, Debug)]
struct Grouped {
    dtype: DType,
    geom: NormGeom,
    eps: f32,
    /// Fixed rows per split (tests, tuning); `None`: chosen from the device.
    rows_per_split: Option<usize>,
}

impl Grouped {
    fn new(
        what: &str,
        dtype: DType,
        [n, p, c]: [usize; 3],
        groups: usize,
        eps: f64,
        act: Act,
    ) -> Result<Self> {
        check_dtype(dtype, what)?;
        if [n, p, c].contains(&0) {
            return Err(Error::Shape(format!(
                "{what} on CUDA: empty input {n}×{p}×{c}"
            )));
        }
        if groups == 0 || c % groups != 0 {
            return Err(Error::InvalidArgument(format!(
                "{what} on CUDA: {c} channels are not divisible into {groups} groups"
            )));
        }
        if n.checked_mul(p).map_or(true, |r| r > i32::MAX as usize) {
            return Err(Error::InvalidArgument(format!(
                "{what} on CUDA: {n}×{p} rows are too many for the kernels (at most {})",
                i32::MAX
            )));
        }
        grid_extent(n, 2, what)?;
        let eps = check_eps(eps, what)?;
        Ok(Grouped {
            dtype,
            geom: NormGeom {
                n: dim(n, "samples")?,
                p: dim(p, "rows per sample")?,
                c: dim(c, "channels")?,
                g: dim(groups, "groups")?,
                cg: dim(c / groups, "channels per group")?,
                rows_per_split: 0,
                splits: 0,
                silu: (act == Act::Silu) as i32,
                tile: dim(c.min(32), "channels")?,
            },
            eps,
            rows_per_split: None,
        })
    }

    fn x_len(&self) -> usize {
        self.geom.n as usize * self.geom.p as usize * self.geom.c as usize
    }

    fn stats_len(&self) -> usize {
        self.geom.n as usize * self.geom.g as usize
    }

    /// Stage-1 blocks across the channels (tiles of min(c, 32) channels).
    fn channel_blocks(&self) -> usize {
        (self.geom.c as usize).div_ceil(self.geom.tile as usize)
    }

    /// The geometry with the split of each sample's rows filled in.
    fn split_geom(&self, g: &impl Gpu) -> Result<NormGeom> {
        let p = self.geom.p as usize;
        let per = match self.rows_per_split {
            Some(r) => r.max(p.div_ceil(65535)),
            None => {
                // About four column blocks per multiprocessor, each over MIN..=MAX rows.
                let blocks = self.channel_blocks() * self.geom.n as usize;
                let want = (4 * g.multiprocessors() as usize).div_ceil(blocks);
                let splits = want
                    .min(p.div_ceil(MIN_ROWS_PER_SPLIT))
                    .max(p.div_ceil(MAX_ROWS_PER_SPLIT))
                    .clamp(1, 65535);
                p.div_ceil(splits)
            }
        };
        let splits = p.div_ceil(per);
        let mut geom = self.geom;
        geom.rows_per_split = dim(per, "rows per split")?;
        geom.splits = grid_extent(splits, 1, "normalisation splits")? as i32;
        Ok(geom)
    }

    fn entry(&self, what: &str) -> String {
        format!("{what}_{}", suffix(self.dtype))
    }

    /// A column-reduction launch: stage 1 (`tiled`: blocks of `tile` channels × 256 / tile rows)
    /// or a combine (32 channels × NR).
    fn column_launch(
        &self,
        entry: String,
        tiled: bool,
        grid_y: usize,
        grid_z: usize,
        args: Vec<Arg>,
    ) -> Result<Launch> {
        let blocks = if tiled {
            self.channel_blocks()
        } else {
            (self.geom.c as usize).div_ceil(32)
        };
        Ok(Launch {
            module: &NORM,
            entry,
            grid: [
                grid_extent(blocks, 0, "normalisation")?,
                grid_extent(grid_y, 1, "normalisation")?,
                grid_extent(grid_z, 2, "normalisation")?,
            ],
            block: [if tiled { COL_THREADS } else { 32 * NR }, 1, 1],
            shared_bytes: 0,
            args,
        })
    }

    fn stride_launch(g: &impl Gpu, entry: String, items: usize, args: Vec<Arg>) -> Launch {
        Launch {
            module: &NORM,
            entry,
            grid: [grid_stride_blocks(g, items), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args,
        }
    }

    /// Statistics: mean and invstd [n·g]; the running update when `running` is given.
    unsafe fn stats(
        &self,
        g: &impl Gpu,
        x: u64,
        mean: u64,
        invstd: u64,
        running: Option<(u64, u64, f32, bool)>,
    ) -> Result<()> {
        let geom = self.split_geom(g)?;
        let (n, c, splits) = (geom.n as usize, geom.c as usize, geom.splits as usize);
        let pm = g.alloc(n * splits * c * 4)?;
        let pq = g.alloc(n * splits * c * 4)?;
        let cm = g.alloc(n * c * 4)?;
        let cq = g.alloc(n * c * 4)?;
        let (pm, pq, cm, cq) = (g.ptr(&pm), g.ptr(&pq), g.ptr(&cm), g.ptr(&cq));
        g.launch(&self.column_launch(
            self.entry("norm_stats_partial"),
            true,
            splits,
            n,
            vec![Arg::Ptr(x), Arg::Ptr(pm), Arg::Ptr(pq), Arg::pod(&geom)],
        )?)?;
        g.launch(&self.column_launch(
            "norm_stats_combine".into(),
            false,
            n,
            1,
            vec![
                Arg::Ptr(pm),
                Arg::Ptr(pq),
                Arg::Ptr(cm),
                Arg::Ptr(cq),
                Arg::pod(&geom),
            ],
        )?)?;
        let (rm, rv, momentum, unbiased) = running.unwrap_or((0, 0, 0.0, false));
        g.launch(&Self::stride_launch(
            g,
            "norm_stats_finalize".into(),
            self.stats_len(),
            vec![
                Arg::Ptr(cm),
                Arg::Ptr(cq),
                Arg::Ptr(mean),
                Arg::Ptr(invstd),
                Arg::Ptr(rm),
                Arg::Ptr(rv),
                Arg::pod(&geom),
                Arg::F32(self.eps),
                Arg::F32(momentum),
                Arg::I32(unbiased as i32),
            ],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn apply(
        &self,
        g: &impl Gpu,
        x: u64,
        gamma: u64,
        beta: u64,
        mean: u64,
        invstd: u64,
        residual: u64,
        y: u64,
    ) -> Result<()> {
        g.launch(&Self::stride_launch(
            g,
            self.entry("norm_apply"),
            self.x_len(),
            vec![
                Arg::Ptr(x),
                Arg::Ptr(gamma),
                Arg::Ptr(beta),
                Arg::Ptr(mean),
                Arg::Ptr(invstd),
                Arg::Ptr(residual),
                Arg::Ptr(y),
                Arg::pod(&self.geom),
            ],
        ))
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn backward(
        &self,
        g: &impl Gpu,
        training: bool,
        x: u64,
        dy: u64,
        gamma: u64,
        beta: u64,
        mean: u64,
        invstd: u64,
        dx: u64,
        dgamma: u64,
        dbeta: u64,
        accumulate: bool,
    ) -> Result<()> {
        let geom = self.split_geom(g)?;
        let (n, c, splits) = (geom.n as usize, geom.c as usize, geom.splits as usize);
        let p1 = g.alloc(n * splits * c * 4)?;
        let p2 = g.alloc(n * splits * c * 4)?;
        let sdz = g.alloc(n * c * 4)?;
        let sdzx = g.alloc(n * c * 4)?;
        let k1 = g.alloc(self.stats_len() * 4)?;
        let k2 = g.alloc(self.stats_len() * 4)?;
        let (p1, p2, sdz, sdzx, k1, k2) = (
            g.ptr(&p1),
            g.ptr(&p2),
            g.ptr(&sdz),
            g.ptr(&sdzx),
            g.ptr(&k1),
            g.ptr(&k2),
        );
        g.launch(&self.column_launch(
            self.entry("norm_backward_partial"),
            true,
            splits,
            n,
            vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(gamma),
                Arg::Ptr(beta),
                Arg::Ptr(mean),
                Arg::Ptr(invstd),
                Arg::Ptr(p1),
                Arg::Ptr(p2),
                Arg::pod(&geom),
            ],
        )?)?;
        g.launch(&self.column_launch(
            "norm_sum_splits".into(),
            false,
            n,
            1,
            vec![
                Arg::Ptr(p1),
                Arg::Ptr(p2),
                Arg::Ptr(sdz),
                Arg::Ptr(sdzx),
                Arg::I32(geom.c),
                Arg::I32(geom.splits),
                Arg::I32(0),
            ],
        )?)?;
        g.launch(&Self::stride_launch(
            g,
            "norm_backward_finalize".into(),
            c.max(self.stats_len()),
            vec![
                Arg::Ptr(sdz),
                Arg::Ptr(sdzx),
                Arg::Ptr(gamma),
                Arg::Ptr(dgamma),
                Arg::Ptr(dbeta),
                Arg::Ptr(k1),
                Arg::Ptr(k2),
                Arg::pod(&geom),
                Arg::I32(training as i32),
                Arg::I32(accumulate as i32),
            ],
        ))?;
        g.launch(&Self::stride_launch(
            g,
            self.entry("norm_backward_dx"),
            self.x_len(),
            vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(gamma),
                Arg::Ptr(beta),
                Arg::Ptr(mean),
                Arg::Ptr(invstd),
                Arg::Ptr(k1),
                Arg::Ptr(k2),
                Arg::Ptr(dx),
                Arg::pod(&self.geom),
            ],
        ))
    }
}

/// Batch normalisation of x [m, c] (NHWC viewed as rows of channels), statistics per channel:
/// y = act(γ·(x − μ)/√(σ² + ε) + β) (+ residual).
#[derive(Clone, Copy, Debug)]
pub struct BatchNorm {
    inner: Grouped,
    momentum: f32,
    unbiased_running_var: bool,
}

impl BatchNorm {
    /// Checks the support (f32 or bf16 storage) and the sizes. Training mode needs m ≥ 2 (checked
    /// by the training launchers, as the CPU op does).
    pub fn new(dtype: DType, m: usize, c: usize, act: Act, cfg: &BatchNormConfig) -> Result<Self> {
        if !cfg.momentum.is_finite() {
            return Err(Error::InvalidArgument(format!(
                "batch norm: momentum must be finite, got {}",
                cfg.momentum
            )));
        }
        Ok(BatchNorm {
            inner: Grouped::new("batch norm", dtype, [1, m, c], c.max(1), cfg.eps, act)?,
            momentum: cfg.momentum as f32,
            unbiased_running_var: cfg.unbiased_running_var,
        })
    }

    /// Fixes the rows per split of the reductions (default: chosen from the device's size).
    pub fn with_rows_per_split(mut self, rows: usize) -> Result<Self> {
        if rows == 0 {
            return Err(Error::InvalidArgument(
                "batch norm: 0 rows per split".into(),
            ));
        }
        self.inner.rows_per_split = Some(rows);
        Ok(self)
    }

    /// Elements of x, y, dy, dx and the residual.
    pub fn x_len(&self) -> usize {
        self.inner.x_len()
    }

    /// f32 values of γ, β, dγ, dβ, the saved mean / invstd and the running statistics (C).
    pub fn channels(&self) -> usize {
        self.inner.geom.c as usize
    }

    fn check_training(&self) -> Result<()> {
        if self.inner.geom.p < 2 {
            return Err(Error::InvalidArgument(format!(
                "batch norm in training mode needs more than one value per channel, got {} rows",
                self.inner.geom.p
            )));
        }
        Ok(())
    }

    /// Training forward: batch statistics saved as `save_mean`, `save_invstd` (1/√(σ² + ε)),
    /// running statistics updated in place, y = act(γ·x̂ + β) (+ residual, after the activation).
    ///
    /// # Safety
    /// x, y and residual (when given) address `x_len` elements of `dtype`; gamma, beta, save_mean,
    /// save_invstd, running_mean, running_var `channels` f32 each; y is distinct from x.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_train(
        &self,
        g: &impl Gpu,
        x: u64,
        gamma: u64,
        beta: u64,
        residual: Option<u64>,
        y: u64,
        save_mean: u64,
        save_invstd: u64,
        running_mean: u64,
        running_var: u64,
    ) -> Result<()> {
        self.check_training()?;
        self.inner.stats(
            g,
            x,
            save_mean,
            save_invstd,
            Some((
                running_mean,
                running_var,
                self.momentum,
                self.unbiased_running_var,
            )),
        )?;
        self.inner.apply(
            g,
            x,
            gamma,
            beta,
            save_mean,
            save_invstd,
            residual.unwrap_or(0),
            y,
        )
    }

    /// Eval forward from the running statistics; writes 1/√(running_var + ε) to `save_invstd`
    /// (with `running_mean`, what [`BatchNorm::backward`] takes in eval mode).
    ///
    /// # Safety
    /// As [`BatchNorm::forward_train`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_eval(
        &self,
        g: &impl Gpu,
        x: u64,
        gamma: u64,
        beta: u64,
        residual: Option<u64>,
        y: u64,
        running_mean: u64,
        running_var: u64,
        save_invstd: u64,
    ) -> Result<()> {
        let c = self.channels();
        g.launch(&Grouped::stride_launch(
            g,
            "batch_norm_eval_invstd".into(),
            c,
            vec![
                Arg::Ptr(running_var),
                Arg::Ptr(save_invstd),
                Arg::I32(self.inner.geom.c),
                Arg::F32(self.inner.eps),
            ],
        ))?;
        self.inner.apply(
            g,
            x,
            gamma,
            beta,
            running_mean,
            save_invstd,
            residual.unwrap_or(0),
            y,
        )
    }

    /// Backward: dx (overwritten), dγ and dβ (f32, added to their contents when `accumulate`).
    /// `mean` / `invstd` are what the forward saved (eval mode: the running mean and the invstd
    /// [`BatchNorm::forward_eval`] wrote). With SiLU the pre-activation is recomputed from x. The
    /// residual's gradient is dy itself.
    ///
    /// # Safety
    /// x, dy, dx address `x_len` elements of `dtype` (dx distinct from x and dy); gamma, beta,
    /// mean, invstd, dgamma, dbeta `channels` f32 each.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward(
        &self,
        g: &impl Gpu,
        training: bool,
        x: u64,
        dy: u64,
        gamma: u64,
        beta: u64,
        mean: u64,
        invstd: u64,
        dx: u64,
        dgamma: u64,
        dbeta: u64,
        accumulate: bool,
    ) -> Result<()> {
        if training {
            self.check_training()?;
        }
        self.inner.backward(
            g, training, x, dy, gamma, beta, mean, invstd, dx, dgamma, dbeta, accumulate,
        )
    }
}

/// Group normalisation of x [n, p, c] (p positions per sample), `groups` groups of consecutive
/// channels: y = act(γ·(x − μ_{n,g})/√(σ²_{n,g} + ε) + β).
#[derive(Clone, Copy, Debug)]
pub struct GroupNorm {
    inner: Grouped,
}

impl GroupNorm {
    /// Checks the support (f32 or bf16 storage; c divisible by groups; n ≤ 65535) and the sizes.
    pub fn new(
        dtype: DType,
        [n, p, c]: [usize; 3],
        groups: usize,
        eps: f64,
        act: Act,
    ) -> Result<Self> {
        Ok(GroupNorm {
            inner: Grouped::new("group norm", dtype, [n, p, c], groups, eps, act)?,
        })
    }

    /// Fixes the rows per split of the reductions (default: chosen from the device's size).
    pub fn with_rows_per_split(mut self, rows: usize) -> Result<Self> {
        if rows == 0 {
            return Err(Error::InvalidArgument(
                "group norm: 0 rows per split".into(),
            ));
        }
        self.inner.rows_per_split = Some(rows);
        Ok(self)
    }

    /// Elements of x, y, dy, dx.
    pub fn x_len(&self) -> usize {
        self.inner.x_len()
    }

    /// f32 values of the saved mean / invstd (n·groups).
    pub fn stats_len(&self) -> usize {
        self.inner.stats_len()
    }

    /// f32 values of γ, β, dγ, dβ (c).
    pub fn channels(&self) -> usize {
        self.inner.geom.c as usize
    }

    /// Forward, saving per-(sample, group) mean and invstd ([n, groups]).
    ///
    /// # Safety
    /// x, y address `x_len` elements of `dtype` (distinct); gamma, beta `channels` f32; mean,
    /// invstd `stats_len` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        &self,
        g: &impl Gpu,
        x: u64,
        gamma: u64,
        beta: u64,
        y: u64,
        mean: u64,
        invstd: u64,
    ) -> Result<()> {
        self.inner.stats(g, x, mean, invstd, None)?;
        self.inner.apply(g, x, gamma, beta, mean, invstd, 0, y)
    }

    /// Backward: dx (overwritten), dγ and dβ (added to when `accumulate`).
    ///
    /// # Safety
    /// x, dy, dx address `x_len` elements of `dtype` (dx distinct); gamma, beta, dgamma, dbeta
    /// `channels` f32; mean, invstd `stats_len` f32 as the forward saved them.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward(
        &self,
        g: &impl Gpu,
        x: u64,
        dy: u64,
        gamma: u64,
        beta: u64,
        mean: u64,
        invstd: u64,
        dx: u64,
        dgamma: u64,
        dbeta: u64,
        accumulate: bool,
    ) -> Result<()> {
        self.inner.backward(
            g, true, x, dy, gamma, beta, mean, invstd, dx, dgamma, dbeta, accumulate,
        )
    }
}

/// Layer normalisation over the last axis of x [rows, c]: y = γ·(x − μ_row)/√(σ²_row + ε) + β.
#[derive(Clone, Copy, Debug)]
pub struct LayerNorm {
    pub dtype: DType,
    rows: i32,
    c: i32,
    eps: f32,
    rows_per_split: Option<usize>,
}

/// Rows (one warp each) per layer-norm block.
const LN_WARPS: u32 = BLOCK / 32;

impl LayerNorm {
    /// Checks the support (f32 or bf16 storage) and the sizes.
    pub fn new(dtype: DType, rows: usize, c: usize, eps: f64) -> Result<Self> {
        check_dtype(dtype, "layer norm")?;
        if rows == 0 || c == 0 {
            return Err(Error::Shape(format!(
                "layer norm on CUDA: empty input {rows}×{c}"
            )));
        }
        Ok(LayerNorm {
            dtype,
            rows: dim(rows, "rows")?,
            c: dim(c, "channels")?,
            eps: check_eps(eps, "layer norm")?,
            rows_per_split: None,
        })
    }

    /// Fixes the rows per split of the parameter-gradient reduction.
    pub fn with_rows_per_split(mut self, rows: usize) -> Result<Self> {
        if rows == 0 {
            return Err(Error::InvalidArgument(
                "layer norm: 0 rows per split".into(),
            ));
        }
        self.rows_per_split = Some(rows);
        Ok(self)
    }

    /// Elements of x, y, dy, dx.
    pub fn x_len(&self) -> usize {
        self.rows as usize * self.c as usize
    }

    /// f32 values of the saved mean / invstd (one per row).
    pub fn rows(&self) -> usize {
        self.rows as usize
    }

    /// f32 values of γ, β, dγ, dβ.
    pub fn channels(&self) -> usize {
        self.c as usize
    }

    fn row_launch(&self, g: &impl Gpu, what: &str, args: Vec<Arg>) -> Launch {
        let cap = (g.multiprocessors().max(1) * super::BLOCKS_PER_SM) as usize;
        Launch {
            module: &NORM,
            entry: format!("{what}_{}", suffix(self.dtype)),
            grid: [
                (self.rows().div_ceil(LN_WARPS as usize)).clamp(1, cap) as u32,
                1,
                1,
            ],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args,
        }
    }

    /// Forward, saving mean and invstd per row.
    ///
    /// # Safety
    /// x, y address `x_len` elements of `dtype` (distinct); gamma, beta `channels` f32; mean,
    /// invstd `rows` f32.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward(
        &self,
        g: &impl Gpu,
        x: u64,
        gamma: u64,
        beta: u64,
        y: u64,
        mean: u64,
        invstd: u64,
    ) -> Result<()> {
        g.launch(&self.row_launch(
            g,
            "layer_norm_forward",
            vec![
                Arg::Ptr(x),
                Arg::Ptr(gamma),
                Arg::Ptr(beta),
                Arg::Ptr(y),
                Arg::Ptr(mean),
                Arg::Ptr(invstd),
                Arg::I32(self.rows),
                Arg::I32(self.c),
                Arg::F32(self.eps),
            ],
        ))
    }

    /// Backward: dx (overwritten), dγ and dβ (added to when `accumulate`).
    ///
    /// # Safety
    /// x, dy, dx address `x_len` elements of `dtype` (dx distinct); gamma, dgamma, dbeta
    /// `channels` f32; mean, invstd `rows` f32 as the forward saved them.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward(
        &self,
        g: &impl Gpu,
        x: u64,
        dy: u64,
        gamma: u64,
        mean: u64,
        invstd: u64,
        dx: u64,
        dgamma: u64,
        dbeta: u64,
        accumulate: bool,
    ) -> Result<()> {
        g.launch(&self.row_launch(
            g,
            "layer_norm_backward_dx",
            vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(gamma),
                Arg::Ptr(mean),
                Arg::Ptr(invstd),
                Arg::Ptr(dx),
                Arg::I32(self.rows),
                Arg::I32(self.c),
            ],
        ))?;
        let rows = self.rows();
        let channel_blocks = self.channels().div_ceil(32);
        let per = match self.rows_per_split {
            Some(r) => r.max(rows.div_ceil(65535)),
            None => {
                let want = (4 * g.multiprocessors() as usize).div_ceil(channel_blocks);
                let splits = want
                    .min(rows.div_ceil(MIN_ROWS_PER_SPLIT))
                    .max(rows.div_ceil(MAX_ROWS_PER_SPLIT))
                    .clamp(1, 65535);
                rows.div_ceil(splits)
            }
        };
        let splits = rows.div_ceil(per);
        let p1 = g.alloc(splits * self.channels() * 4)?;
        let p2 = g.alloc(splits * self.channels() * 4)?;
        let (p1, p2) = (g.ptr(&p1), g.ptr(&p2));
        let grid = [
            grid_extent(channel_blocks, 0, "layer norm parameter gradients")?,
            grid_extent(splits, 1, "layer norm parameter gradients")?,
            1,
        ];
        g.launch(&Launch {
            module: &NORM,
            entry: format!("layer_norm_backward_params_{}", suffix(self.dtype)),
            grid,
            block: [32 * NR, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(mean),
                Arg::Ptr(invstd),
                Arg::Ptr(p1),
                Arg::Ptr(p2),
                Arg::I32(self.rows),
                Arg::I32(self.c),
                Arg::I32(dim(per, "rows per split")?),
            ],
        })?;
        g.launch(&Launch {
            module: &NORM,
            entry: "norm_sum_splits".into(),
            grid: [grid[0], 1, 1],
            block: [32 * NR, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(p1),
                Arg::Ptr(p2),
                Arg::Ptr(dbeta),
                Arg::Ptr(dgamma),
                Arg::I32(self.c),
                Arg::I32(splits as i32),
                Arg::I32(accumulate as i32),
            ],
        })
    }
}
