//! Multi-head scaled-dot-product attention (`kernels/attention.cu`). Forward: output and per-row
//! log-sum-exp; backward: Δ = rowsum(dO ∘ O), then the probabilities recomputed from the
//! log-sum-exp. Deterministic, and never an `Lq × Lk` buffer per sample and head.
//!
//! - Head dimensions up to 128: fused flash-style kernels (bound 32, 64 or 128, per-lane register
//!   accumulators) with an online softmax over key tiles, dq over query tiles, dk / dv over key
//!   tiles.
//! - Wider heads, up to [`MAX_HEAD_DIM`] = 1024 and any value (the U-Net's single heads of 512
//!   and 768 channels): per head, chunks of query rows of every sample run as batched cuBLAS
//!   GEMMs on tensor cores with row-wise kernels between them: S = scale · q kᵀ (f32), P =
//!   softmax(S) and the log-sum-exp, o = P v; backward S again, dP = dO vᵀ, P and dS = P ∘ (dP − Δ),
//!   dq = scale · dS k, dk (+)= scale · dSᵀ q, dv (+)= Pᵀ dO, chunks summed in order (in f32 for
//!   bf16 storage when there are several). A fused kernel cannot keep a wide head's accumulator
//!   rows in registers (FlashAttention stops at 256 channels) and ran on CUDA cores; this keeps
//!   the products on tensor cores. The scratch is N · rows · Lk scores (f32, two buffers in the
//!   backward, plus P and dS of the storage dtype), with the rows per chunk chosen so that it
//!   stays under [`DEFAULT_MAX_SCRATCH`] ([`Attention::with_max_scratch`]; at least one row).
//!
//! Layouts as `ops::attention`: q [N, Lq, H·D], k [N, Lk, H·D], v [N, Lk, H·Dv],
//! o [N, Lq, H·Dv]; the log-sum-exp is f32 [N, H, Lq].

use super::elementwise::{cast, suffix};
use super::kernels::ATTENTION;
use super::{dim, grid_extent, grid_stride_blocks, Arg, Gemm, Gpu, Launch, Math};
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
/// The largest head dimension of the tiled (register-accumulator) kernels; wider heads run as
/// GEMMs.
pub const MAX_TILED_HEAD_DIM: usize = 128;
/// [`Attention::bound`] of a plan that runs as GEMMs.
pub const WIDE: usize = MAX_HEAD_DIM;
/// The default bound on a wide plan's score scratch (bytes): 128 MiB.
pub const DEFAULT_MAX_SCRATCH: usize = 128 << 20;
/// `ATT_WARPS` of kernels/attention.cu: warps per block.
const WARPS: usize = 4;
/// `ATT_FWD_ROWS`: queries per warp in the forward.
const FWD_ROWS: usize = 4;
/// Warps per block of the row-wise kernels of wide plans.
const ROW_WARPS: usize = 8;

/// `AttnRows` of kernels/attention.cu: one chunk of score rows.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnRows {
    rows: i32,
    rq: i32,
    q0: i32,
    lk: i32,
    ld: i32,
    h: i32,
    heads: i32,
    lq: i32,
}

/// An attention launch plan: `softmax(scale · q kᵀ) v` per sample and head.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub dtype: DType,
    pub geom: AttnGeom,
    /// The kernels' head-dimension bound: 32, 64 or 128, the smallest ≥ max(D, Dv), for the
    /// tiled kernels; [`WIDE`] (= [`MAX_HEAD_DIM`]) when max(D, Dv) > 128 (GEMMs).
    pub bound: usize,
    /// Wide plans: the bound on the score scratch in bytes.
    max_scratch: usize,
    /// Wide plans: the arithmetic of f32 GEMMs (`Math::F32`, or TF32 tensor cores).
    math: Math,
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
        let plan = Attention {
            dtype,
            geom,
            bound,
            max_scratch: DEFAULT_MAX_SCRATCH,
            math: Math::F32,
        };
        // Every index the kernels form is a u64, but the channel widths and row counts must fit the
        // kernels' int parameters too.
        dim(heads * widest, "channels")?;
        if plan.is_wide() {
            // One query row of every sample: the smallest chunk, whose scores the row kernels
            // index with an int; the GEMMs' strides and sizes fit too.
            dim(
                n * plan.score_ld(),
                "scores of one query row of every sample",
            )?;
        } else {
            plan.grid(lq.div_ceil(WARPS * FWD_ROWS))?;
            plan.grid(lq.div_ceil(WARPS * plan.bwd_rows()))?;
            plan.grid(lk.div_ceil(WARPS * plan.bwd_rows()))?;
        }
        Ok(plan)
    }

    /// The same plan with a wide plan's score scratch bounded by `bytes` (at least one query row
    /// of every sample is used): more, smaller chunks of query rows for a smaller bound. No
    /// effect on plans of heads up to 128 channels.
    pub fn with_max_scratch(mut self, bytes: usize) -> Self {
        self.max_scratch = bytes;
        self
    }

    /// Wide plans on f32 storage: their GEMMs on TF32 tensor cores (`Math::Tf32`, as a model's
    /// TF32 mode asks) or in IEEE f32 (`Math::F32`, the default). The fused kernels of heads up to
    /// 128 channels, and bf16 storage, are unaffected.
    pub fn with_math(mut self, math: Math) -> Self {
        self.math = math;
        self
    }

    /// Wide plans: the row stride of the score buffers (Lk rounded up to 8: 16-byte aligned bf16
    /// rows for the tensor cores).
    fn score_ld(&self) -> usize {
        (self.geom.lk as usize).next_multiple_of(8)
    }

    /// Wide plans: query rows per chunk, so that `n · rows` score rows of `bytes_per_score` bytes
    /// per score stay under the scratch bound (at least 1, at most Lq, and n · rows · ld an int).
    fn query_chunk(&self, bytes_per_score: usize) -> usize {
        let (n, lq) = (self.geom.n as usize, self.geom.lq as usize);
        let per_row = n * self.score_ld();
        (self.max_scratch / (per_row * bytes_per_score))
            .min(i32::MAX as usize / per_row)
            .clamp(1, lq)
    }

    /// Wide plans: how many chunks of query rows the forward and the backward run.
    pub fn chunk_counts(&self) -> [usize; 2] {
        if !self.is_wide() {
            return [1, 1];
        }
        let lq = self.geom.lq as usize;
        [self.fwd_score_bytes(), self.bwd_score_bytes()].map(|b| lq.div_ceil(self.query_chunk(b)))
    }

    /// Bytes per score of the forward's scratch: S (f32) and P.
    fn fwd_score_bytes(&self) -> usize {
        4 + self.dtype.size_in_bytes()
    }

    /// Bytes per score of the backward's scratch: S and dP (f32), P and dS.
    fn bwd_score_bytes(&self) -> usize {
        8 + 2 * self.dtype.size_in_bytes()
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

    /// Whether the plan runs as GEMMs (max(D, Dv) > 128).
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

    fn grid(&self, tiles: usize) -> Result<[u32; 3]> {
        let what = "attention";
        Ok([
            grid_extent(tiles, 0, what)?,
            grid_extent(self.geom.h as usize, 1, what)?,
            grid_extent(self.geom.n as usize, 2, what)?,
        ])
    }

    fn tiled(&self, what: &str, rows: usize, per_block: usize, args: Vec<Arg>) -> Result<Launch> {
        Ok(Launch {
            module: &ATTENTION,
            entry: format!("attention_{what}_d{}_{}", self.bound, suffix(self.dtype)),
            grid: self.grid(rows.div_ceil(per_block))?,
            block: [(32 * WARPS) as u32, 1, 1],
            shared_bytes: 0,
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
        if self.is_wide() {
            return self.forward_gemm(g, [q, k, v], o, lse);
        }
        let args = vec![
            Arg::Ptr(q),
            Arg::Ptr(k),
            Arg::Ptr(v),
            Arg::Ptr(o),
            Arg::Ptr(lse),
            Arg::pod(&self.geom),
        ];
        g.launch(&self.tiled("forward", self.geom.lq as usize, WARPS * FWD_ROWS, args)?)
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
        if self.is_wide() {
            return self.backward_gemm(g, [q, k, v], [lse, dp], d_out, [dq, dk, dv]);
        }
        let rows = WARPS * self.bwd_rows();
        let mut args = common.to_vec();
        args.extend([Arg::Ptr(dq), Arg::pod(&self.geom)]);
        g.launch(&self.tiled("backward_dq", self.geom.lq as usize, rows, args)?)?;
        let mut args = common.to_vec();
        args.extend([Arg::Ptr(dk), Arg::Ptr(dv), Arg::pod(&self.geom)]);
        g.launch(&self.tiled("backward_dkv", self.geom.lk as usize, rows, args)?)
    }
    /// Wide plans: the GEMM `alpha · op(A) op(B) (+ beta C)` of this plan's operands, batched over
    /// the samples with per-sample strides (elements).
    #[allow(clippy::too_many_arguments)]
    unsafe fn batched(
        &self,
        g: &impl Gpu,
        [m, n, k]: [usize; 3],
        (a, lda, trans_a, stride_a): (u64, usize, bool, usize),
        (b, ldb, trans_b, stride_b): (u64, usize, bool, usize),
        (c, ldc, stride_c, c_dtype): (u64, usize, usize, DType),
        alpha: f32,
        beta: f32,
    ) -> Result<()> {
        g.gemm_batched(
            &Gemm {
                m,
                n,
                k,
                a,
                lda,
                trans_a,
                b,
                ldb,
                trans_b,
                c,
                ldc,
                alpha,
                beta,
                dtype: self.dtype,
                c_dtype,
                math: self.math,
            },
            self.geom.n as usize,
            [stride_a, stride_b, stride_c],
        )
    }

    /// Wide plans: a row-wise kernel over the `n · rq` score rows of the chunk at query row `q0`.
    unsafe fn rows_launch(
        &self,
        g: &impl Gpu,
        what: &str,
        h: usize,
        q0: usize,
        rq: usize,
        mut args: Vec<Arg>,
    ) -> Result<()> {
        let geo = &self.geom;
        let c = AttnRows {
            rows: geo.n * rq as i32,
            rq: rq as i32,
            q0: q0 as i32,
            lk: geo.lk,
            ld: self.score_ld() as i32,
            h: h as i32,
            heads: geo.h,
            lq: geo.lq,
        };
        args.push(Arg::pod(&c));
        let rows = c.rows as usize;
        let cap = (g.multiprocessors().max(1) as usize) * 8;
        g.launch(&Launch {
            module: &ATTENTION,
            entry: format!("attention_{what}_rows_{}", suffix(self.dtype)),
            grid: [rows.div_ceil(ROW_WARPS).clamp(1, cap) as u32, 1, 1],
            block: [(32 * ROW_WARPS) as u32, 1, 1],
            shared_bytes: 0,
            args,
        })
    }

    /// Wide plans: S = scale · q kᵀ for query rows [q0, q0 + rq) of head h of every sample, into
    /// `s` (f32, rows of [`Self::score_ld`], sample-major).
    unsafe fn scores(
        &self,
        g: &impl Gpu,
        [q, k]: [u64; 2],
        s: u64,
        h: usize,
        q0: usize,
        rq: usize,
    ) -> Result<()> {
        let [_, lq, lk, heads, d, _] = self.sizes();
        let (es, ld) = (self.dtype.size_in_bytes() as u64, self.score_ld());
        let hd = heads * d;
        self.batched(
            g,
            [rq, lk, d],
            (q + ((q0 * hd + h * d) as u64) * es, hd, false, lq * hd),
            (k + ((h * d) as u64) * es, hd, true, lk * hd),
            (s, ld, rq * ld, DType::F32),
            self.geom.scale,
            0.0,
        )
    }

    /// The forward of a wide plan (see the module docs).
    unsafe fn forward_gemm(
        &self,
        g: &impl Gpu,
        [q, k, v]: [u64; 3],
        o: u64,
        lse: u64,
    ) -> Result<()> {
        let [n, lq, lk, heads, _, dv] = self.sizes();
        let (es, ld) = (self.dtype.size_in_bytes(), self.score_ld());
        let chunk = self.query_chunk(self.fwd_score_bytes());
        let s_buf = g.alloc(n * chunk * ld * 4)?;
        let p_buf = g.alloc(n * chunk * ld * es)?;
        let (s, p) = (g.ptr(&s_buf), g.ptr(&p_buf));
        let hdv = heads * dv;
        for h in 0..heads {
            for q0 in (0..lq).step_by(chunk) {
                let rq = chunk.min(lq - q0);
                self.scores(g, [q, k], s, h, q0, rq)?;
                let args = vec![Arg::Ptr(s), Arg::Ptr(p), Arg::Ptr(lse)];
                self.rows_launch(g, "softmax", h, q0, rq, args)?;
                self.batched(
                    g,
                    [rq, dv, lk],
                    (p, ld, false, rq * ld),
                    (v + (h * dv * es) as u64, hdv, false, lk * hdv),
                    (
                        o + ((q0 * hdv + h * dv) * es) as u64,
                        hdv,
                        lq * hdv,
                        self.dtype,
                    ),
                    1.0,
                    0.0,
                )?;
            }
        }
        Ok(())
    }

    /// The backward of a wide plan (see the module docs); Δ is at `delta`.
    unsafe fn backward_gemm(
        &self,
        g: &impl Gpu,
        [q, k, v]: [u64; 3],
        [lse, delta]: [u64; 2],
        d_out: u64,
        [dq, dk, dv]: [u64; 3],
    ) -> Result<()> {
        let [n, lq, lk, heads, d, dvw] = self.sizes();
        let (es, ld) = (self.dtype.size_in_bytes(), self.score_ld());
        let chunk = self.query_chunk(self.bwd_score_bytes());
        let chunks = lq.div_ceil(chunk);
        let scores = n * chunk * ld;
        let (s_buf, dp_buf) = (g.alloc(scores * 4)?, g.alloc(scores * 4)?);
        let (p_buf, ds_buf) = (g.alloc(scores * es)?, g.alloc(scores * es)?);
        let (s, dp, p, ds) = (g.ptr(&s_buf), g.ptr(&dp_buf), g.ptr(&p_buf), g.ptr(&ds_buf));
        // dk and dv sum over the chunks: in place for f32 storage or one chunk, else in f32
        // buffers rounded to bf16 once at the end.
        let sums = if chunks > 1 && self.dtype != DType::F32 {
            Some((g.alloc(self.k_len() * 4)?, g.alloc(self.v_len() * 4)?))
        } else {
            None
        };
        let (dk_t, dv_t, acc_dtype) = match &sums {
            Some((a, b)) => (g.ptr(a), g.ptr(b), DType::F32),
            None => (dk, dv, self.dtype),
        };
        let aes = acc_dtype.size_in_bytes();
        let (hd, hdv) = (heads * d, heads * dvw);
        let scale = self.geom.scale;
        for h in 0..heads {
            for (i, q0) in (0..lq).step_by(chunk).enumerate() {
                let rq = chunk.min(lq - q0);
                let beta = if i == 0 { 0.0 } else { 1.0 };
                let q_c = q + ((q0 * hd + h * d) * es) as u64;
                let do_c = d_out + ((q0 * hdv + h * dvw) * es) as u64;
                self.scores(g, [q, k], s, h, q0, rq)?;
                // dP = dO vᵀ.
                self.batched(
                    g,
                    [rq, lk, dvw],
                    (do_c, hdv, false, lq * hdv),
                    (v + (h * dvw * es) as u64, hdv, true, lk * hdv),
                    (dp, ld, rq * ld, DType::F32),
                    1.0,
                    0.0,
                )?;
                let args = vec![
                    Arg::Ptr(s),
                    Arg::Ptr(dp),
                    Arg::Ptr(lse),
                    Arg::Ptr(delta),
                    Arg::Ptr(p),
                    Arg::Ptr(ds),
                ];
                self.rows_launch(g, "ds", h, q0, rq, args)?;
                // dq = scale · dS k.
                self.batched(
                    g,
                    [rq, d, lk],
                    (ds, ld, false, rq * ld),
                    (k + (h * d * es) as u64, hd, false, lk * hd),
                    (
                        dq + ((q0 * hd + h * d) * es) as u64,
                        hd,
                        lq * hd,
                        self.dtype,
                    ),
                    scale,
                    0.0,
                )?;
                // dk (+)= scale · dSᵀ q.
                self.batched(
                    g,
                    [lk, d, rq],
                    (ds, ld, true, rq * ld),
                    (q_c, hd, false, lq * hd),
                    (dk_t + (h * d * aes) as u64, hd, lk * hd, acc_dtype),
                    scale,
                    beta,
                )?;
                // dv (+)= Pᵀ dO.
                self.batched(
                    g,
                    [lk, dvw, rq],
                    (p, ld, true, rq * ld),
                    (do_c, hdv, false, lq * hdv),
                    (dv_t + (h * dvw * aes) as u64, hdv, lk * hdv, acc_dtype),
                    1.0,
                    beta,
                )?;
            }
        }
        if sums.is_some() {
            cast(g, DType::F32, self.dtype, dk_t, dk, self.k_len())?;
            cast(g, DType::F32, self.dtype, dv_t, dv, self.v_len())?;
        }
        Ok(())
    }
}
