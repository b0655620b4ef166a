//! Dense k × k convolutions (`kernels/conv.cu` + GEMMs), forward and backward, matching
//! `ops::conv::conv2d_pad`: activations NHWC x [n, h, w, cin], torch OIHW weights
//! w [cout, cin, k, k] (used as the row-major matrix [cout, kdim = cin·k²]), bias [cout],
//! output y [n, oh, ow, cout] with oh = (h + top + bottom − k) / stride + 1 (likewise ow).
//!
//! The output rows r = (s·oh + oy)·ow + ox form the GEMM's m axis:
//! - forward: `im2col_nhwc` writes cols [rows, kdim] (OIHW column order, so w is used as is),
//!   y = cols · wᵀ, then y += b per channel (`shape::SampleChannels::add_per_sample`);
//! - input gradient: dcols = dy · w, then `col2im_nhwc` gathers each dx element's taps in a fixed
//!   order (deterministic, no atomics);
//! - weight gradient: dw = dyᵀ · cols (cols rebuilt from x);
//! - bias gradient: a fixed-order column sum of dy (`SampleChannels::add_per_sample_backward_e`).
//!
//! 1 × 1 stride-1 unpadded convolutions skip im2col: x already is [rows, cin].
//!
//! The cols workspace is bounded ([`DEFAULT_MAX_WORKSPACE`], [`Conv2d::with_max_workspace`]): the
//! rows are processed in chunks of whole samples, or, when one sample's cols exceed the bound, of
//! whole output rows of one sample (at least one output row per chunk, whatever the bound). The
//! weight gradient accumulates over chunks with GEMM beta = 1 into an f32 result (with bf16
//! storage: f32 GEMM output from bf16 operands, rounded to bf16 once at the end, or kept f32 by
//! [`Conv2d::backward_w_f32`] for f32 master gradients); the input gradient of sub-sample chunks
//! (which share input rows) is zeroed once and accumulated chunk by chunk in chunk order (with bf16
//! storage the few overlapping rows round to bf16 between chunks). With bf16 storage the input
//! gradient's dcols are f32 (twice [`Conv2d::workspace_bytes`]): the k² taps of each dx element are
//! summed unrounded and rounded once, as a direct convolution would.

use super::elementwise::{cast, suffix};
use super::kernels::CONV;
use super::shape::SampleChannels;
use super::{dim, grid_extent, grid_stride_blocks, Arg, Gemm, Gpu, Launch, Math, BLOCK};
use crate::error::{Error, Result};
use crate::ops::conv::Pad2d;
use crate::tensor::DType;

/// The default bound on the cols workspace (bytes): 64 MiB.
pub const DEFAULT_MAX_WORKSPACE: usize = 64 << 20;

/// Threads per `im2col_nhwc` block (its `KERNEL_BOUNDED`).
const IM2COL_THREADS: u32 = 256;
/// Elements an `im2col_nhwc` block aims to copy (several rows when a row's tile is short).
const IM2COL_ELEMS: usize = 1024;
/// Channels per `im2col_nhwc` tile (fewer for large kernels).
const IM2COL_MAX_CT: usize = 32;
/// The most shared memory an `im2col_nhwc` block uses for one row's tile (bytes, counted as f32).
const IM2COL_ROW_SMEM: usize = 16 << 10;

/// `ConvGeom` of kernels/conv.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
struct ConvGeom {
    n: i32,
    h: i32,
    w: i32,
    cin: i32,
    oh: i32,
    ow: i32,
    k: i32,
    stride: i32,
    pad_top: i32,
    pad_left: i32,
    kdim: i32,
    row0: i32,
    rows: i32,
    ct: i32,
    rb: i32,
    q0: i32,
    nq: i32,
    accumulate: i32,
}

/// One workspace chunk: output rows [row0, row0 + rows) and the input rows (s·h + iy)
/// [q0, q0 + nq) its taps reach.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    row0: usize,
    rows: usize,
    q0: usize,
    nq: usize,
    /// Sub-sample chunk: its input rows may be shared with its neighbours (dx accumulated).
    partial: bool,
}

/// A dense convolution plan: x [n, h, w, cin] ⊛ w [cout, cin, k, k] (+ b [cout]) → y [n, oh, ow, cout].
#[derive(Clone, Copy, Debug)]
pub struct Conv2d {
    dtype: DType,
    n: usize,
    h: usize,
    w: usize,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: Pad2d,
    oh: usize,
    ow: usize,
    max_workspace: usize,
}

fn product(v: &[usize], what: &str) -> Result<usize> {
    let p = v
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(|| Error::InvalidArgument(format!("conv on CUDA: {what} overflows")))?;
    dim(p, what)?;
    Ok(p)
}

impl Conv2d {
    /// Checks the support (dtype f32 or bf16, k ≥ 1 and k ≤ 64, stride ≥ 1), that the output is
    /// not empty, and that every size fits the kernels' `int`s.
    pub fn new(
        dtype: DType,
        [n, h, w, cin]: [usize; 4],
        cout: usize,
        k: usize,
        stride: usize,
        pad: Pad2d,
    ) -> Result<Self> {
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "conv on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
            )));
        }
        if k == 0 || stride == 0 {
            return Err(Error::InvalidArgument(format!(
                "conv on CUDA: kernel size {k} and stride {stride} must be positive"
            )));
        }
        if k * k * 4 > IM2COL_ROW_SMEM {
            return Err(Error::InvalidArgument(format!(
                "conv on CUDA: kernel size {k} is not supported (at most 64)"
            )));
        }
        if [n, h, w, cin, cout].contains(&0) {
            return Err(Error::Shape(format!(
                "conv on CUDA: empty shape [n, h, w, cin] = [{n}, {h}, {w}, {cin}], cout {cout}"
            )));
        }
        let (ph, pw) = (
            h.checked_add(pad.top)
                .and_then(|v| v.checked_add(pad.bottom)),
            w.checked_add(pad.left)
                .and_then(|v| v.checked_add(pad.right)),
        );
        let (ph, pw) = match (ph, pw) {
            (Some(ph), Some(pw)) => (
                dim(ph, "padded height")? as usize,
                dim(pw, "padded width")? as usize,
            ),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "conv on CUDA: padding {pad:?} overflows"
                )))
            }
        };
        if ph < k || pw < k {
            return Err(Error::Shape(format!(
                "conv on CUDA: a {k}×{k} stride-{stride} convolution of a {h}×{w} input padded by \
                 {pad:?} has no output"
            )));
        }
        let (oh, ow) = ((ph - k) / stride + 1, (pw - k) / stride + 1);
        dim(stride, "stride")?;
        dim(cout, "output channels")?;
        let kdim = product(&[cin, k, k], "cin·k²")?;
        let rows = product(&[n, oh, ow], "output rows n·oh·ow")?;
        product(&[n, h], "input rows n·h")?;
        product(&[n, h, w, cin], "input elements")?;
        product(&[rows, cout], "output elements")?;
        product(&[cout, kdim], "weight elements")?;
        // The bias add and bias gradient run as one sample of `rows` positions.
        SampleChannels::new(dtype, [1, rows, cout])?;
        let c = Conv2d {
            dtype,
            n,
            h,
            w,
            cin,
            cout,
            k,
            stride,
            pad,
            oh,
            ow,
            max_workspace: DEFAULT_MAX_WORKSPACE,
        };
        grid_extent(cin.div_ceil(c.tile_channels()), 1, "im2col channel tiles")?;
        Ok(c)
    }

    /// The same plan with the cols workspace bounded by `bytes` (at least one output row's cols
    /// are always used): more, smaller chunks for a smaller bound.
    pub fn with_max_workspace(mut self, bytes: usize) -> Self {
        self.max_workspace = bytes;
        self
    }

    /// Elements of x: n·h·w·cin.
    pub fn input_len(&self) -> usize {
        self.n * self.h * self.w * self.cin
    }

    /// Elements of y: n·oh·ow·cout.
    pub fn output_len(&self) -> usize {
        self.rows() * self.cout
    }

    /// Elements of w: cout·cin·k·k.
    pub fn weight_len(&self) -> usize {
        self.cout * self.kdim()
    }

    /// [oh, ow].
    pub fn out_hw(&self) -> [usize; 2] {
        [self.oh, self.ow]
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// True when the convolution is a plain GEMM (1 × 1, stride 1, no padding): no workspace.
    pub fn is_pointwise(&self) -> bool {
        self.k == 1
            && self.stride == 1
            && self.pad
                == Pad2d {
                    top: 0,
                    bottom: 0,
                    left: 0,
                    right: 0,
                }
    }

    /// How many workspace chunks each pass runs (0 for pointwise convolutions).
    pub fn chunk_count(&self) -> usize {
        if self.is_pointwise() {
            0
        } else {
            self.chunks().len()
        }
    }

    /// Bytes of the cols workspace each pass allocates (0 for pointwise convolutions).
    pub fn workspace_bytes(&self) -> usize {
        if self.is_pointwise() {
            return 0;
        }
        let rows = self.chunks().iter().map(|c| c.rows).max().unwrap_or(0);
        rows * self.kdim() * self.esize()
    }

    fn rows(&self) -> usize {
        self.n * self.oh * self.ow
    }

    fn kdim(&self) -> usize {
        self.cin * self.k * self.k
    }

    fn esize(&self) -> usize {
        self.dtype.size_in_bytes()
    }

    /// Channels per im2col tile.
    fn tile_channels(&self) -> usize {
        let kk = self.k * self.k;
        self.cin
            .min(IM2COL_MAX_CT)
            .min((IM2COL_ROW_SMEM / (4 * kk)).max(1))
    }

    fn chunks(&self) -> Vec<Chunk> {
        let per_sample = self.oh * self.ow;
        let max_rows = (self.max_workspace / (self.kdim() * self.esize())).max(1);
        let mut out = Vec::new();
        if max_rows >= per_sample {
            let spc = (max_rows / per_sample).min(self.n);
            for s0 in (0..self.n).step_by(spc) {
                let ns = spc.min(self.n - s0);
                out.push(Chunk {
                    row0: s0 * per_sample,
                    rows: ns * per_sample,
                    q0: s0 * self.h,
                    nq: ns * self.h,
                    partial: false,
                });
            }
        } else {
            let r = (max_rows / self.ow).clamp(1, self.oh);
            for s in 0..self.n {
                for a in (0..self.oh).step_by(r) {
                    let b = (a + r).min(self.oh);
                    // Input rows reached by output rows [a, b): [a·stride − top, (b − 1)·stride − top + k).
                    let lo = (a * self.stride).saturating_sub(self.pad.top);
                    let hi = ((b - 1) * self.stride + self.k)
                        .saturating_sub(self.pad.top)
                        .min(self.h);
                    out.push(Chunk {
                        row0: (s * self.oh + a) * self.ow,
                        rows: (b - a) * self.ow,
                        q0: s * self.h + lo,
                        nq: hi.saturating_sub(lo),
                        partial: true,
                    });
                }
            }
        }
        out
    }

    fn geom(&self, c: &Chunk) -> ConvGeom {
        let ct = self.tile_channels();
        ConvGeom {
            n: self.n as i32,
            h: self.h as i32,
            w: self.w as i32,
            cin: self.cin as i32,
            oh: self.oh as i32,
            ow: self.ow as i32,
            k: self.k as i32,
            stride: self.stride as i32,
            pad_top: self.pad.top as i32,
            pad_left: self.pad.left as i32,
            kdim: self.kdim() as i32,
            row0: c.row0 as i32,
            rows: c.rows as i32,
            ct: ct as i32,
            rb: (IM2COL_ELEMS / (ct * self.k * self.k)).max(1) as i32,
            q0: c.q0 as i32,
            nq: c.nq as i32,
            accumulate: c.partial as i32,
        }
    }

    /// cols [c.rows, kdim] = im2col of chunk `c` of x.
    unsafe fn im2col(&self, g: &impl Gpu, x: u64, cols: u64, c: &Chunk) -> Result<()> {
        let geo = self.geom(c);
        let (ct, rb) = (geo.ct as usize, geo.rb as usize);
        let what = "conv im2col";
        g.launch(&Launch {
            module: &CONV,
            entry: format!("im2col_nhwc_{}", suffix(self.dtype)),
            grid: [
                grid_extent(c.rows.div_ceil(rb), 0, what)?,
                grid_extent(self.cin.div_ceil(ct), 1, what)?,
                1,
            ],
            block: [IM2COL_THREADS, 1, 1],
            shared_bytes: (rb * ct * self.k * self.k * self.esize()) as u32,
            args: vec![Arg::Ptr(x), Arg::Ptr(cols), Arg::pod(&geo)],
        })
    }

    /// dx rows [c.q0, c.q0 + c.nq) (+)= the gather of dcols [c.rows, kdim] (f32 for either storage).
    unsafe fn col2im(&self, g: &impl Gpu, dcols: u64, dx: u64, c: &Chunk) -> Result<()> {
        let items = c.nq * self.w * self.cin;
        g.launch(&Launch {
            module: &CONV,
            // dcols are f32 for either storage (`backward_x`).
            entry: match self.dtype {
                DType::BF16 => "col2im_nhwc_f32_bf16".into(),
                d => format!("col2im_nhwc_{}", suffix(d)),
            },
            grid: [grid_stride_blocks(g, items), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![Arg::Ptr(dcols), Arg::Ptr(dx), Arg::pod(&self.geom(c))],
        })
    }

    /// A GEMM over this plan's dtype.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        &self,
        g: &impl Gpu,
        mnk: [usize; 3],
        a: (u64, usize, bool),
        b: (u64, usize, bool),
        c: (u64, usize, f32),
        math: Math,
    ) -> Result<()> {
        self.gemm_to(g, mnk, a, b, c, self.dtype, math)
    }

    /// A GEMM with operands of this plan's dtype and C of `c_dtype` (the dtype, or f32).
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_to(
        &self,
        g: &impl Gpu,
        [m, n, k]: [usize; 3],
        (a, lda, trans_a): (u64, usize, bool),
        (b, ldb, trans_b): (u64, usize, bool),
        (c, ldc, beta): (u64, usize, f32),
        c_dtype: DType,
        math: Math,
    ) -> Result<()> {
        g.gemm(&Gemm {
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
            alpha: 1.0,
            beta,
            dtype: self.dtype,
            c_dtype,
            math,
        })
    }

    /// Byte address of row `row` of a matrix with `cols` elements per row starting at `base`.
    fn row_ptr(&self, base: u64, row: usize, cols: usize) -> u64 {
        base + (row * cols * self.esize()) as u64
    }

    /// y = conv(x, w) (+ b per output channel); y is overwritten.
    ///
    /// # Safety
    /// x, w, y address `input_len`, `weight_len`, `output_len` elements of `dtype`, b (if any)
    /// `cout`; y overlaps none of them.
    pub unsafe fn forward(
        &self,
        g: &impl Gpu,
        x: u64,
        w: u64,
        b: Option<u64>,
        y: u64,
        math: Math,
    ) -> Result<()> {
        let (cout, kdim) = (self.cout, self.kdim());
        if self.is_pointwise() {
            self.gemm(
                g,
                [self.rows(), cout, kdim],
                (x, kdim, false),
                (w, kdim, true),
                (y, cout, 0.0),
                math,
            )?;
        } else {
            let chunks = self.chunks();
            let ws = g.alloc(self.workspace_bytes())?;
            let cols = g.ptr(&ws);
            for c in &chunks {
                self.im2col(g, x, cols, c)?;
                self.gemm(
                    g,
                    [c.rows, cout, kdim],
                    (cols, kdim, false),
                    (w, kdim, true),
                    (self.row_ptr(y, c.row0, cout), cout, 0.0),
                    math,
                )?;
            }
        }
        if let Some(b) = b {
            SampleChannels::new(self.dtype, [1, self.rows(), cout])?.add_per_sample(g, y, b, y)?;
        }
        Ok(())
    }

    /// dx = ∂L/∂x from dy; dx is overwritten.
    ///
    /// # Safety
    /// dy, w, dx address `output_len`, `weight_len`, `input_len` elements of `dtype`; dx overlaps
    /// neither input.
    pub unsafe fn backward_x(
        &self,
        g: &impl Gpu,
        dy: u64,
        w: u64,
        dx: u64,
        math: Math,
    ) -> Result<()> {
        let (cout, kdim) = (self.cout, self.kdim());
        if self.is_pointwise() {
            return self.gemm(
                g,
                [self.rows(), kdim, cout],
                (dy, cout, false),
                (w, kdim, false),
                (dx, kdim, 0.0),
                math,
            );
        }
        let chunks = self.chunks();
        if chunks.iter().any(|c| c.partial) {
            // Sub-sample chunks accumulate into shared input rows; rows no tap reaches stay 0.
            g.memset_zero(dx, self.input_len() * self.esize())?;
        }
        // dcols in f32 for bf16 storage (the GEMM's f32 output from bf16 operands).
        let dcols_dtype = DType::F32;
        let ws = g.alloc(self.workspace_bytes() / self.esize() * dcols_dtype.size_in_bytes())?;
        let dcols = g.ptr(&ws);
        for c in &chunks {
            if c.nq == 0 {
                continue;
            }
            self.gemm_to(
                g,
                [c.rows, kdim, cout],
                (self.row_ptr(dy, c.row0, cout), cout, false),
                (w, kdim, false),
                (dcols, kdim, 0.0),
                dcols_dtype,
                math,
            )?;
            self.col2im(g, dcols, dx, c)?;
        }
        Ok(())
    }

    /// dw = ∂L/∂w (OIHW) of the plan's dtype; dw is overwritten.
    ///
    /// # Safety
    /// x, dy, dw address `input_len`, `output_len`, `weight_len` elements of `dtype`; dw overlaps
    /// neither input.
    pub unsafe fn backward_w(
        &self,
        g: &impl Gpu,
        x: u64,
        dy: u64,
        dw: u64,
        math: Math,
    ) -> Result<()> {
        self.backward_w_as(g, x, dy, dw, self.dtype, math)
    }

    /// dw = ∂L/∂w (OIHW) in f32 whatever the storage (bf16 storage: f32 master-weight gradients,
    /// never rounded to bf16); dw is overwritten.
    ///
    /// # Safety
    /// x and dy address `input_len`, `output_len` elements of `dtype`, dw `weight_len` f32; dw
    /// overlaps neither input.
    pub unsafe fn backward_w_f32(
        &self,
        g: &impl Gpu,
        x: u64,
        dy: u64,
        dw: u64,
        math: Math,
    ) -> Result<()> {
        self.backward_w_as(g, x, dy, dw, DType::F32, math)
    }

    /// dw of `dw_dtype` (the plan's dtype, or f32).
    unsafe fn backward_w_as(
        &self,
        g: &impl Gpu,
        x: u64,
        dy: u64,
        dw: u64,
        dw_dtype: DType,
        math: Math,
    ) -> Result<()> {
        let (cout, kdim) = (self.cout, self.kdim());
        if self.is_pointwise() {
            return self.gemm_to(
                g,
                [cout, kdim, self.rows()],
                (dy, cout, true),
                (x, kdim, false),
                (dw, kdim, 0.0),
                dw_dtype,
                math,
            );
        }
        let chunks = self.chunks();
        let ws = g.alloc(self.workspace_bytes())?;
        let cols = g.ptr(&ws);
        // The chunks' products accumulate (beta = 1) in f32: straight into dw when it is f32 or
        // there is one chunk, else in an f32 sum rounded to bf16 once at the end.
        let len = self.weight_len();
        let direct = dw_dtype == DType::F32 || chunks.len() == 1;
        let sum = if direct {
            None
        } else {
            Some(g.alloc(len * 4)?)
        };
        let (target, c_dtype) = match &sum {
            Some(b) => (g.ptr(b), DType::F32),
            None => (dw, dw_dtype),
        };
        for (i, c) in chunks.iter().enumerate() {
            self.im2col(g, x, cols, c)?;
            self.gemm_to(
                g,
                [cout, kdim, c.rows],
                (self.row_ptr(dy, c.row0, cout), cout, true),
                (cols, kdim, false),
                (target, kdim, if i == 0 { 0.0 } else { 1.0 }),
                c_dtype,
                math,
            )?;
        }
        if sum.is_some() {
            cast(g, DType::F32, dw_dtype, target, dw, len)?;
        }
        Ok(())
    }

    /// db = Σ over n, oy, ox of dy (fixed-order reduction, repeatable bit for bit); db is
    /// overwritten.
    ///
    /// # Safety
    /// dy addresses `output_len` elements of `dtype`, db `cout` (distinct).
    pub unsafe fn backward_b(&self, g: &impl Gpu, dy: u64, db: u64) -> Result<()> {
        SampleChannels::new(self.dtype, [1, self.rows(), self.cout])?
            .add_per_sample_backward_e(g, dy, db, false)
    }
}
