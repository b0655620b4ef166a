//! Multi-head scaled-dot-product attention (`kernels/attention.cu`), flash style: forward with an
//! online softmax (output and per-row log-sum-exp), backward recomputing the probabilities from the
//! log-sum-exp (Δ, then dq over query tiles, then dk / dv over key tiles). No `Lq × Lk` buffer;
//! deterministic. Head dimensions up to 128 run the tiled kernels (bound 32, 64 or 128, per-lane
//! register accumulators); wider heads, up to [`MAX_HEAD_DIM`] = 1024 and any value, run the
//! `_wide` kernels, which walk the channels in chunks of 64 and keep the block's accumulator rows
//! in dynamic shared memory (≤ 32 KiB, ≤ 44 KiB per block in all: no opt-in needed).
//! Layouts as `ops::attention`: q [N, Lq, H·D], k [N, Lk, H·D], v [N, Lk, H·Dv],
//! o [N, Lq, H·Dv]; the log-sum-exp is f32 [N, H, Lq].

use super::elementwise::suffix;
use super::kernels::ATTENTION;
use super::{dim, grid_extent, grid_stride_blocks, Arg, Gpu, Launch};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The geometry of one attention, as the kernels' `AttnGeom` struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct AttnGeom {
    pub n: i32,
    pub lq: i32,
    pub lk: i32,
    pub h: i32,
    pub d: i32,
    pub dv: i32,
    pub scale: f32,
}

/// The largest head dimension (D and Dv) the kernels support.
pub const MAX_HEAD_DIM: usize = 1024;
/// The largest head dimension of the tiled (register-accumulator) kernels; wider heads run the
/// `_wide` kernels.
pub const MAX_TILED_HEAD_DIM: usize = 128;
/// [`Attention::bound`] of a plan that runs the `_wide` kernels.
pub const WIDE: usize = MAX_HEAD_DIM;
/// `ATT_WARPS` of kernels/attention.cu: warps per block.
const WARPS: usize = 4;
/// `ATT_FWD_ROWS`: queries per warp in the forward.
const FWD_ROWS: usize = 4;
/// `ATW_BQ`: query rows per block of the wide forward and dq kernels.
const WIDE_QUERY_ROWS: usize = 8;
/// `ATW_BK`: key rows per block of the wide dk / dv kernel.
const WIDE_KEY_ROWS: usize = 4;

/// An attention launch plan: `softmax(scale · q kᵀ) v` per sample and head.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub dtype: DType,
    pub geom: AttnGeom,
    /// The kernels' head-dimension bound: 32, 64 or 128, the smallest ≥ max(D, Dv), for the
    /// tiled kernels; [`WIDE`] (= [`MAX_HEAD_DIM`]) when max(D, Dv) > 128 (the `_wide` kernels).
    pub bound: usize,
}

impl Attention {
    /// Checks the support (f32 or bf16 storage, D and Dv ≤ [`MAX_HEAD_DIM`], any value) and the sizes (all
    /// ≥ 1, `scale` finite; None = 1/√D).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dtype: DType,
        n: usize,
        lq: usize,
        lk: usize,
        heads: usize,
        d: usize,
        dv: usize,
        scale: Option<f64>,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "attention on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
            )));
        }
        if [n, lq, lk, heads, d, dv].contains(&0) {
            return Err(Error::Shape(format!(
                "attention on CUDA: empty geometry N {n}, Lq {lq}, Lk {lk}, heads {heads}, D {d}, Dv {dv}"
            )));
        }
        let widest = d.max(dv);
        if widest > MAX_HEAD_DIM {
            return Err(Error::InvalidArgument(format!(
                "attention on CUDA: head dimensions D {d}, Dv {dv} exceed the kernels' limit {MAX_HEAD_DIM}"
            )));
        }
        let scale = scale.unwrap_or(1.0 / (d as f64).sqrt());
        if !scale.is_finite() || !(scale as f32).is_finite() {
            return Err(Error::InvalidArgument(format!(
                "attention on CUDA: scale must be finite, got {scale}"
            )));
        }
        let bound = [32, 64, MAX_TILED_HEAD_DIM]
            .into_iter()
            .find(|&b| b >= widest)
            .unwrap_or(WIDE);
        let geom = AttnGeom {
            n: dim(n, "batch")?,
            lq: dim(lq, "query length")?,
            lk: dim(lk, "key length")?,
            h: dim(heads, "heads")?,
            d: dim(d, "head dimension")?,
            dv: dim(dv, "value head dimension")?,
            scale: scale as f32,
        };
        let plan = Attention { dtype, geom, bound };
        // Every index the kernels form is a u64, but the channel widths and row counts must fit the
        // kernels' int parameters too.
        dim(heads * widest, "channels")?;
        plan.grid(lq.div_ceil(plan.fwd_rows_per_block()))?;
        plan.grid(lq.div_ceil(plan.dq_rows_per_block()))?;
        plan.grid(lk.div_ceil(plan.dkv_rows_per_block()))?;
        Ok(plan)
    }

    fn sizes(&self) -> [usize; 6] {
        let g = &self.geom;
        [g.n, g.lq, g.lk, g.h, g.d, g.dv].map(|v| v as usize)
    }

    /// Elements of q (and of dq).
    pub fn q_len(&self) -> usize {
        let [n, lq, _, h, d, _] = self.sizes();
        n * lq * h * d
    }

    /// Elements of k (and of dk).
    pub fn k_len(&self) -> usize {
        let [n, _, lk, h, d, _] = self.sizes();
        n * lk * h * d
    }

    /// Elements of v (and of dv).
    pub fn v_len(&self) -> usize {
        let [n, _, lk, h, _, dv] = self.sizes();
        n * lk * h * dv
    }

    /// Elements of the output o (and of dO).
    pub fn out_len(&self) -> usize {
        let [n, lq, _, h, _, dv] = self.sizes();
        n * lq * h * dv
    }

    /// f32 values of the log-sum-exp [N, H, Lq].
    pub fn lse_len(&self) -> usize {
        let [n, lq, _, h, _, _] = self.sizes();
        n * h * lq
    }

    /// Whether the plan runs the `_wide` kernels (max(D, Dv) > 128).
    pub fn is_wide(&self) -> bool {
        self.bound == WIDE
    }

    /// `AttBwd<DB>::ROWS`: queries (dq) or keys (dk / dv) per warp in the tiled backward.
    fn bwd_rows(&self) -> usize {
        if self.bound >= 128 {
            2
        } else {
            4
        }
    }

    /// Query rows per block of the forward.
    fn fwd_rows_per_block(&self) -> usize {
        if self.is_wide() {
            WIDE_QUERY_ROWS
        } else {
            WARPS * FWD_ROWS
        }
    }

    /// Query rows per block of the dq kernel.
    fn dq_rows_per_block(&self) -> usize {
        if self.is_wide() {
            WIDE_QUERY_ROWS
        } else {
            WARPS * self.bwd_rows()
        }
    }

    /// Key rows per block of the dk / dv kernel.
    fn dkv_rows_per_block(&self) -> usize {
        if self.is_wide() {
            WIDE_KEY_ROWS
        } else {
            WARPS * self.bwd_rows()
        }
    }

    /// Dynamic shared memory of a launch: the wide kernels' f32 accumulator rows (`rows` × `width`
    /// channels; at most 8 × 1024 or 4 × 2048 f32 = 32 KiB), none for the tiled kernels.
    fn wide_shared(&self, rows: usize, width: usize) -> u32 {
        if self.is_wide() {
            (rows * width * 4) as u32
        } else {
            0
        }
    }

    fn grid(&self, tiles: usize) -> Result<[u32; 3]> {
        let what = "attention";
        Ok([
            grid_extent(tiles, 0, what)?,
            grid_extent(self.geom.h as usize, 1, what)?,
            grid_extent(self.geom.n as usize, 2, what)?,
        ])
    }

    fn tiled(
        &self,
        what: &str,
        rows: usize,
        per_block: usize,
        shared_bytes: u32,
        args: Vec<Arg>,
    ) -> Result<Launch> {
        let variant = if self.is_wide() {
            "wide".to_string()
        } else {
            format!("d{}", self.bound)
        };
        Ok(Launch {
            module: &ATTENTION,
            entry: format!("attention_{what}_{variant}_{}", suffix(self.dtype)),
            grid: self.grid(rows.div_ceil(per_block))?,
            block: [(32 * WARPS) as u32, 1, 1],
            shared_bytes,
            args,
        })
    }

    /// o = softmax(scale · q kᵀ) v, and lse = the log-sum-exp of each row of scale · q kᵀ.
    ///
    /// # Safety
    /// q, k, v, o address `q_len`, `k_len`, `v_len`, `out_len` elements of `dtype`, lse `lse_len`
    /// f32; o and lse are distinct from each other and from the inputs.
    pub unsafe fn forward(
        &self,
        g: &impl Gpu,
        q: u64,
        k: u64,
        v: u64,
        o: u64,
        lse: u64,
    ) -> Result<()> {
        let args = vec![
            Arg::Ptr(q),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(o),
            Arg::Ptr(lse),
            Arg::pod(&self.geom),
        ];
        let rows = self.fwd_rows_per_block();
        let shared = self.wide_shared(rows, self.geom.dv as usize);
        g.launch(&self.tiled("forward", self.geom.lq as usize, rows, shared, args)?)
    }

    /// dq, dk, dv (overwritten) from the upstream gradient d_out, the forward's o and lse.
    /// Allocates an f32 scratch of `lse_len` values (Δ) for the duration of the launches.
    ///
    /// # Safety
    /// q, k, v, o, d_out address `q_len`, `k_len`, `v_len`, `out_len`, `out_len` elements of
    /// `dtype` and lse `lse_len` f32, as [`Self::forward`] left them; dq, dk, dv address `q_len`,
    /// `k_len`, `v_len` elements of `dtype`, distinct from each other and from the inputs.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn backward(
        &self,
        g: &impl Gpu,
        [q, k, v]: [u64; 3],
        o: u64,
        lse: u64,
        d_out: u64,
        [dq, dk, dv]: [u64; 3],
    ) -> Result<()> {
        let delta = g.alloc(self.lse_len() * 4)?;
        let dp = g.ptr(&delta);
        // One warp per (sample, query, head) row of Δ.
        let warps_per_block = 8usize;
        g.launch(&Launch {
            module: &ATTENTION,
            entry: format!("attention_backward_delta_{}", suffix(self.dtype)),
            grid: [grid_stride_blocks(g, self.lse_len() * 32), 1, 1],
            block: [(32 * warps_per_block) as u32, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(o),
                Arg::Ptr(d_out),
                Arg::Ptr(dp),
                Arg::pod(&self.geom),
            ],
        })?;
        let common = [
            Arg::Ptr(q),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(d_out),
            Arg::Ptr(lse),
            Arg::Ptr(dp),
        ];
        let mut args = common.to_vec();
        args.extend([Arg::Ptr(dq), Arg::pod(&self.geom)]);
        let (d, dv_width) = (self.geom.d as usize, self.geom.dv as usize);
        let rows = self.dq_rows_per_block();
        let shared = self.wide_shared(rows, d);
        g.launch(&self.tiled("backward_dq", self.geom.lq as usize, rows, shared, args)?)?;
        let mut args = common.to_vec();
        args.extend([Arg::Ptr(dk), Arg::Ptr(dv), Arg::pod(&self.geom)]);
        let rows = self.dkv_rows_per_block();
        let shared = self.wide_shared(rows, d + dv_width);
        g.launch(&self.tiled("backward_dkv", self.geom.lk as usize, rows, shared, args)?)
    }
}
