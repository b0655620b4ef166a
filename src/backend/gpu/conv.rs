//! Dense k × k convolutions (`kernels/conv.cu` + GEMMs), forward and backward, matching
//! `ops::conv::conv2d_pad`: activations NHWC x [n, h, w, cin], torch OIHW weights
//! w [cout, cin, k, k], bias [cout], output y [n, oh, ow, cout] with
//! oh = (h + top + bottom − k) / stride + 1 (likewise ow).
//!
//! The GEMMs use the weights tap-major, wt [cout, k·k, cin] (`conv_weight_to_taps`, once per
//! pass; a row-major [cout, kdim = k²·cin] matrix), so that each row of cols is k² contiguous runs
//! of cin channels of x: im2col is a straight copy in 16-byte units where the channel count
//! allows, and col2im reads dcols in order. The output rows r = (s·oh + oy)·ow + ox form the
//! GEMM's m axis:
//! - forward: `im2col_taps` writes cols [rows, kdim], y = cols · wtᵀ, then y += b per channel
//!   (`shape::SampleChannels::add_per_sample`);
//! - input gradient: dcols = dy · wt, then `col2im_taps` gathers each dx element's taps in a fixed
//!   order (deterministic, no atomics);
//! - weight gradient: dwt = dyᵀ · cols (cols rebuilt from x) in f32, then `conv_weight_from_taps`
//!   writes dw in OIHW order (rounded once for bf16);
//! - bias gradient: a fixed-order column sum of dy (`SampleChannels::add_per_sample_backward_e`).
//!
//! 1 × 1 convolutions need no weight reordering (one tap), and 1 × 1 stride-1 unpadded ones skip
//! im2col too: x already is [rows, cin].
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

use super::depthwise::sum_partials;
use super::elementwise::{cast, suffix};
use super::kernels::CONV;
use super::shape::SampleChannels;
use super::{dim, grid_stride_blocks, Arg, Gemm, Gpu, Launch, Math, BLOCK};
use crate::error::{Error, Result};
use crate::ops::conv::Pad2d;
use crate::tensor::DType;

/// The default bound on the cols workspace (bytes): 64 MiB.
pub const DEFAULT_MAX_WORKSPACE: usize = 64 << 20;

/// Split-K weight gradients: each slice sums at least this many rows.
const MIN_SPLIT_ROWS: usize = 1024;
/// Split-K weight gradients: at most this many slices (f32 partial sums of the whole gradient).
const MAX_SPLITS: usize = 64;

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
    units: i32,
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
    /// Weight-gradient split-K slices, when fixed by [`Conv2d::with_weight_grad_splits`].
    wgrad_splits: Option<usize>,
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
    /// Checks the support (dtype f32 or bf16, k ≥ 1, stride ≥ 1), that the output is not empty,
    /// and that every size fits the kernels' `int`s (one output row's cols included).
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
        // A chunk holds at least one output row of cols, indexed with 32 bits.
        product(&[ow, kdim], "one output row's im2col elements ow·cin·k²")?;
        let rows = product(&[n, oh, ow], "output rows n·oh·ow")?;
        product(&[n, h], "input rows n·h")?;
        product(&[n, h, w, cin], "input elements")?;
        product(&[rows, cout], "output elements")?;
        product(&[cout, kdim], "weight elements")?;
        // The bias add and bias gradient run as one sample of `rows` positions.
        SampleChannels::new(dtype, [1, rows, cout])?;
        Ok(Conv2d {
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
            wgrad_splits: None,
        })
    }

    /// The same plan with the weight-gradient GEMMs split over `slices` slices of their rows
    /// (at most one per row) instead of the automatic choice: tests reach the split-K path with
    /// small shapes this way.
    pub fn with_weight_grad_splits(mut self, slices: usize) -> Self {
        self.wgrad_splits = Some(slices.max(1));
        self
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

    fn chunks(&self) -> Vec<Chunk> {
        let per_sample = self.oh * self.ow;
        // Bounded by the workspace and by the kernels' 32-bit index over a chunk's cols.
        let max_rows = (self.max_workspace / (self.kdim() * self.esize()))
            .min(i32::MAX as usize / self.kdim())
            .max(1);
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

    fn geom(&self, c: &Chunk, units: usize) -> ConvGeom {
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
            units: units as i32,
            q0: c.q0 as i32,
            nq: c.nq as i32,
            accumulate: c.partial as i32,
        }
    }

    /// cols [c.rows, kdim] = im2col of chunk `c` of x (tap-major columns), copied in the widest
    /// units (16, 8, 4 or 2 bytes) that divide a pixel's bytes and the alignment of x (cols is a
    /// fresh 256-byte aligned workspace).
    unsafe fn im2col(&self, g: &impl Gpu, x: u64, cols: u64, c: &Chunk) -> Result<()> {
        let pixel = self.cin * self.esize();
        let unit = [16usize, 8, 4, 2]
            .into_iter()
            .find(|&u| pixel.is_multiple_of(u) && x.is_multiple_of(u as u64))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "conv on CUDA: x at {x:#x} is not aligned to its {:?} elements",
                    self.dtype
                ))
            })?;
        let units = pixel / unit;
        let items = c.rows * self.k * self.k * units;
        g.launch(&Launch {
            module: &CONV,
            entry: format!("im2col_taps_b{unit}"),
            grid: [grid_stride_blocks(g, items), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![Arg::Ptr(x), Arg::Ptr(cols), Arg::pod(&self.geom(c, units))],
        })
    }

    /// dx rows [c.q0, c.q0 + c.nq) (+)= the gather of dcols [c.rows, kdim] (f32 for either
    /// storage): four channels per thread (float4 loads) when cin is a multiple of 4 and dx is
    /// aligned to four elements.
    unsafe fn col2im(&self, g: &impl Gpu, dcols: u64, dx: u64, c: &Chunk) -> Result<()> {
        let v = if self.cin.is_multiple_of(4) && dx.is_multiple_of((4 * self.esize()) as u64) {
            4
        } else {
            1
        };
        let items = c.nq * self.w * (self.cin / v);
        let base = match self.dtype {
            DType::BF16 => "col2im_taps_f32_bf16",
            _ => "col2im_taps_f32",
        };
        g.launch(&Launch {
            module: &CONV,
            entry: if v == 4 {
                format!("{base}_v4")
            } else {
                base.into()
            },
            grid: [grid_stride_blocks(g, items), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![Arg::Ptr(dcols), Arg::Ptr(dx), Arg::pod(&self.geom(c, 0))],
        })
    }

    /// The weights as the GEMMs use them: w itself for one tap, else a tap-major copy
    /// wt [cout, k², cin] in a new buffer (returned to keep it alive).
    unsafe fn weight_taps<G: Gpu>(&self, g: &G, w: u64) -> Result<(u64, Option<G::Buf>)> {
        let kk = self.k * self.k;
        if kk == 1 {
            return Ok((w, None));
        }
        let len = self.weight_len();
        let buf = g.alloc(len * self.esize())?;
        let wt = g.ptr(&buf);
        g.launch(&Launch {
            module: &CONV,
            entry: format!("conv_weight_to_taps_{}", suffix(self.dtype)),
            grid: [grid_stride_blocks(g, len), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(w),
                Arg::Ptr(wt),
                Arg::I32(self.cin as i32),
                Arg::I32(kk as i32),
                Arg::I32(len as i32),
            ],
        })?;
        Ok((wt, Some(buf)))
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
            let (wt, _wt_buf) = self.weight_taps(g, w)?;
            let ws = g.alloc(self.workspace_bytes())?;
            let cols = g.ptr(&ws);
            for c in &chunks {
                self.im2col(g, x, cols, c)?;
                self.gemm(
                    g,
                    [c.rows, cout, kdim],
                    (cols, kdim, false),
                    (wt, kdim, true),
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
        let (wt, _wt_buf) = self.weight_taps(g, w)?;
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
                (wt, kdim, false),
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
            return self.weight_grad_gemm(
                g,
                [cout, kdim, self.rows()],
                [dy, x],
                (dw, dw_dtype, false),
                math,
            );
        }
        let chunks = self.chunks();
        let ws = g.alloc(self.workspace_bytes())?;
        let cols = g.ptr(&ws);
        // The chunks' products accumulate (beta = 1) in f32: straight into dw when it is f32 or
        // there is one chunk, else in an f32 sum rounded to bf16 once at the end. With several
        // taps the sum is tap-major and always f32, reordered (and rounded) into dw at the end.
        let len = self.weight_len();
        let taps = self.k * self.k > 1;
        let direct = !taps && (dw_dtype == DType::F32 || chunks.len() == 1);
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
            self.weight_grad_gemm(
                g,
                [cout, kdim, c.rows],
                [self.row_ptr(dy, c.row0, cout), cols],
                (target, c_dtype, i > 0),
                math,
            )?;
        }
        if taps {
            g.launch(&Launch {
                module: &CONV,
                entry: match dw_dtype {
                    DType::BF16 => "conv_weight_from_taps_f32_bf16".into(),
                    _ => "conv_weight_from_taps_f32".into(),
                },
                grid: [grid_stride_blocks(g, len), 1, 1],
                block: [BLOCK, 1, 1],
                shared_bytes: 0,
                args: vec![
                    Arg::Ptr(target),
                    Arg::Ptr(dw),
                    Arg::I32(self.cin as i32),
                    Arg::I32((self.k * self.k) as i32),
                    Arg::I32(len as i32),
                ],
            })?;
        } else if sum.is_some() {
            cast(g, DType::F32, dw_dtype, target, dw, len)?;
        }
        Ok(())
    }

    /// Split-K slices of a weight-gradient GEMM with an m × n output summed over k rows: more
    /// than one when the output has too few 128 × 128 tiles to fill the device (on an H200 an
    /// 8 × 2304 output over 13,824 rows took 1.8 ms per chunk in one GEMM), each slice at least
    /// [`MIN_SPLIT_ROWS`] rows.
    fn weight_grad_splits(&self, g: &impl Gpu, [m, n, k]: [usize; 3]) -> usize {
        if let Some(s) = self.wgrad_splits {
            return s.clamp(1, k.max(1));
        }
        let tiles = m.div_ceil(128) * n.div_ceil(128);
        let sms = g.multiprocessors().max(1) as usize;
        if tiles >= sms {
            return 1;
        }
        (2 * sms)
            .div_ceil(tiles)
            .min(k / MIN_SPLIT_ROWS)
            .clamp(1, MAX_SPLITS)
    }

    /// c [m, n] (+)= aᵀ b over k rows: a = dy rows [k, m], b = cols (or x) rows [k, n], c of
    /// `c_dtype` added to when `accumulate`. With f32 c and a small output, split-K: the rows in
    /// slices (a batched GEMM into f32 partials), then the partials summed in slice order
    /// ([`sum_partials`]): deterministic.
    unsafe fn weight_grad_gemm(
        &self,
        g: &impl Gpu,
        [m, n, k]: [usize; 3],
        [a, b]: [u64; 2],
        (c, c_dtype, accumulate): (u64, DType, bool),
        math: Math,
    ) -> Result<()> {
        let splits = if c_dtype == DType::F32 {
            self.weight_grad_splits(g, [m, n, k])
        } else {
            1
        };
        if splits <= 1 {
            return self.gemm_to(
                g,
                [m, n, k],
                (a, m, true),
                (b, n, false),
                (c, n, if accumulate { 1.0 } else { 0.0 }),
                c_dtype,
                math,
            );
        }
        let slice = k.div_ceil(splits);
        let (full, rem) = (k / slice, k % slice);
        let parts = full + usize::from(rem > 0);
        let len = m * n;
        let buf = g.alloc(parts * len * 4)?;
        let p = g.ptr(&buf);
        let es = self.esize();
        g.gemm_batched(
            &Gemm {
                m,
                n,
                k: slice,
                a,
                lda: m,
                trans_a: true,
                b,
                ldb: n,
                trans_b: false,
                c: p,
                ldc: n,
                alpha: 1.0,
                beta: 0.0,
                dtype: self.dtype,
                c_dtype: DType::F32,
                math,
            },
            full,
            [slice * m, slice * n, len],
        )?;
        if rem > 0 {
            let done = full * slice;
            self.gemm_to(
                g,
                [m, n, rem],
                (a + (done * m * es) as u64, m, true),
                (b + (done * n * es) as u64, n, false),
                (p + (full * len * 4) as u64, n, 0.0),
                DType::F32,
                math,
            )?;
        }
        sum_partials(g, p, c, len, parts, accumulate)
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
