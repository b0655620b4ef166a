//! Depthwise convolution (`kernels/depthwise.cu`), NHWC: forward, input gradient, weight gradient.

use super::elementwise::suffix;
use super::kernels::DEPTHWISE;
use super::{dim, grid_extent, grid_stride_blocks, Arg, Gpu, Launch, BLOCK};
use crate::error::{Error, Result};
use crate::tensor::DType;

/// The geometry of one depthwise convolution, as the kernels' `DwGeom` struct.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct DwGeom {
    pub n: i32,
    pub h: i32,
    pub w: i32,
    pub c: i32,
    pub oh: i32,
    pub ow: i32,
    pub stride: i32,
    pub pad_top: i32,
    pub pad_left: i32,
}

/// A depthwise convolution: x [n, h, w, c] ⊛ w [c, k, k] → y [n, oh, ow, c].
#[derive(Clone, Copy, Debug)]
pub struct Depthwise {
    pub dtype: DType,
    pub k: usize,
    pub geom: DwGeom,
}

impl Depthwise {
    /// Checks the kernel support (k ∈ {3, 5}; f32 or bf16 storage) and the sizes.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dtype: DType,
        [n, h, w, c]: [usize; 4],
        k: usize,
        stride: usize,
        pad_top: usize,
        pad_left: usize,
        [oh, ow]: [usize; 2],
    ) -> Result<Self> {
        if !matches!(k, 3 | 5) {
            return Err(Error::InvalidArgument(format!(
                "depthwise conv on CUDA: kernel size {k} is not supported (3 or 5)"
            )));
        }
        if !matches!(dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "depthwise conv on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
            )));
        }
        if stride == 0 || [n, h, w, c, oh, ow].contains(&0) {
            return Err(Error::Shape(format!(
                "depthwise conv on CUDA: empty geometry {n}×{h}×{w}×{c} → {oh}×{ow}, stride {stride}"
            )));
        }
        let geom = DwGeom {
            n: dim(n, "batch")?,
            h: dim(h, "height")?,
            w: dim(w, "width")?,
            c: dim(c, "channels")?,
            oh: dim(oh, "output height")?,
            ow: dim(ow, "output width")?,
            stride: dim(stride, "stride")?,
            pad_top: dim(pad_top, "padding")?,
            pad_left: dim(pad_left, "padding")?,
        };
        // The weight gradient indexes output positions with 32 bits.
        dim(
            n.saturating_mul(oh).saturating_mul(ow),
            "output positions n·oh·ow",
        )?;
        Ok(Depthwise { dtype, k, geom })
    }

    pub fn input_len(&self) -> usize {
        let g = &self.geom;
        g.n as usize * g.h as usize * g.w as usize * g.c as usize
    }

    pub fn output_len(&self) -> usize {
        let g = &self.geom;
        g.n as usize * g.oh as usize * g.ow as usize * g.c as usize
    }

    pub fn weight_len(&self) -> usize {
        self.geom.c as usize * self.k * self.k
    }

    fn entry(&self, what: &str) -> String {
        format!("depthwise_{what}_k{}_{}", self.k, suffix(self.dtype))
    }

    /// The weights tap-major, wt [k·k, c], in a new buffer (the forward and input-gradient
    /// kernels load V channels of one tap at once).
    unsafe fn weight_taps<G: Gpu>(&self, g: &G, w: u64) -> Result<G::Buf> {
        let (c, kk) = (self.geom.c as usize, self.k * self.k);
        let buf = g.alloc(self.weight_len() * self.dtype.size_in_bytes())?;
        g.launch(&Launch {
            module: &DEPTHWISE,
            entry: format!("depthwise_weight_taps_{}", suffix(self.dtype)),
            grid: [grid_stride_blocks(g, c * kk), 1, 1],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(w),
                Arg::Ptr(g.ptr(&buf)),
                Arg::I32(c as i32),
                Arg::I32(kk as i32),
            ],
        })?;
        Ok(buf)
    }

    /// Channels per thread: 16 / element size (one 16-byte access per tap) when the channel
    /// count is a multiple of it and every address in `ptrs` is 16-byte aligned, else 1.
    fn vector(&self, ptrs: &[u64]) -> usize {
        let v = 16 / self.dtype.size_in_bytes();
        if (self.geom.c as usize).is_multiple_of(v) && ptrs.iter().all(|p| p.is_multiple_of(16)) {
            v
        } else {
            1
        }
    }

    /// A grid-stride launch over `pixels` × channel groups of `v` channels.
    fn per_pixel(
        &self,
        g: &impl Gpu,
        what: &str,
        pixels: usize,
        v: usize,
        args: Vec<Arg>,
    ) -> Launch {
        let entry = self.entry(what);
        Launch {
            module: &DEPTHWISE,
            entry: if v > 1 { format!("{entry}_v") } else { entry },
            grid: [
                grid_stride_blocks(g, pixels * (self.geom.c as usize / v)),
                1,
                1,
            ],
            block: [BLOCK, 1, 1],
            shared_bytes: 0,
            args,
        }
    }

    /// y = x ⊛ w.
    ///
    /// # Safety
    /// x, w, y address `input_len`, `weight_len`, `output_len` elements of `dtype`; y is distinct.
    pub unsafe fn forward(&self, g: &impl Gpu, x: u64, w: u64, y: u64) -> Result<()> {
        self.forward_bias_act(g, x, w, None, false, y)
    }

    /// y = act(x ⊛ w + b) in one pass: b per channel (none: no bias), act SiLU when `silu`.
    ///
    /// # Safety
    /// As [`Self::forward`]; b (if any) addresses `c` elements of `dtype`.
    pub unsafe fn forward_bias_act(
        &self,
        g: &impl Gpu,
        x: u64,
        w: u64,
        b: Option<u64>,
        silu: bool,
        y: u64,
    ) -> Result<()> {
        let wt = self.weight_taps(g, w)?;
        let b = b.unwrap_or(0);
        let v = self.vector(&[x, y, b]);
        let geo = &self.geom;
        let pixels = geo.n as usize * geo.oh as usize * geo.ow as usize;
        let args = vec![
            Arg::Ptr(x),
            Arg::Ptr(g.ptr(&wt)),
            Arg::Ptr(b),
            Arg::Ptr(y),
            Arg::pod(&self.geom),
            Arg::I32(silu as i32),
        ];
        g.launch(&self.per_pixel(g, "forward", pixels, v, args))
    }

    /// dx = ∂L/∂x from dy (overwrites dx).
    ///
    /// # Safety
    /// dy, w, dx address `output_len`, `weight_len`, `input_len` elements of `dtype`; dx is distinct.
    pub unsafe fn backward_x(&self, g: &impl Gpu, dy: u64, w: u64, dx: u64) -> Result<()> {
        let wt = self.weight_taps(g, w)?;
        let v = self.vector(&[dy, dx]);
        let geo = &self.geom;
        let pixels = geo.n as usize * geo.h as usize * geo.w as usize;
        let args = vec![
            Arg::Ptr(dy),
            Arg::Ptr(g.ptr(&wt)),
            Arg::Ptr(dx),
            Arg::pod(&self.geom),
        ];
        g.launch(&self.per_pixel(g, "backward_x", pixels, v, args))
    }

    /// dw (f32, [c, k, k]) = ∂L/∂w, added to dw's contents when `accumulate`.
    ///
    /// # Safety
    /// x and dy address `input_len` / `output_len` elements of `dtype`; dw `weight_len` f32.
    pub unsafe fn backward_w(
        &self,
        g: &impl Gpu,
        x: u64,
        dy: u64,
        dw: u64,
        accumulate: bool,
    ) -> Result<()> {
        let geo = &self.geom;
        let positions = geo.n as usize * geo.oh as usize * geo.ow as usize;
        let channel_blocks = (geo.c as usize).div_ceil(32);
        // About four blocks per multiprocessor, each over at least 256 positions.
        let want = (4 * g.multiprocessors() as usize).div_ceil(channel_blocks);
        let splits = want.clamp(1, positions.div_ceil(256).clamp(1, 65535));
        let per_split = positions.div_ceil(splits);
        let splits = positions.div_ceil(per_split);
        let len = self.weight_len();
        let partial = g.alloc(splits * len * 4)?;
        let pp = g.ptr(&partial);
        g.launch(&Launch {
            module: &DEPTHWISE,
            entry: self.entry("backward_w"),
            grid: [
                grid_extent(channel_blocks, 0, "depthwise weight gradient")?,
                grid_extent(splits, 1, "depthwise weight gradient")?,
                1,
            ],
            block: [32 * DW_ROWS, 1, 1],
            shared_bytes: 0,
            args: vec![
                Arg::Ptr(x),
                Arg::Ptr(dy),
                Arg::Ptr(pp),
                Arg::pod(&self.geom),
                Arg::I32(dim(per_split, "positions per split")?),
            ],
        })?;
        sum_partials(g, pp, dw, len, splits, accumulate)
    }
}

/// `DW_ROWS` of kernels/depthwise.cu: position groups per weight-gradient block.
const DW_ROWS: u32 = 8;

/// dst[i] (+)= Σ_s partial[s·len + i] over `parts` f32 partial sums, added in order s = 0, 1, …
/// (`depthwise_backward_w_reduce`): the deterministic second stage of split reductions (the
/// depthwise and the split-K convolution weight gradients). Adds to dst when `accumulate`.
///
/// # Safety
/// `partial` addresses `parts · len` f32, `dst` `len` f32 (distinct).
pub(super) unsafe fn sum_partials(
    g: &impl Gpu,
    partial: u64,
    dst: u64,
    len: usize,
    parts: usize,
    accumulate: bool,
) -> Result<()> {
    g.launch(&Launch {
        module: &DEPTHWISE,
        entry: "depthwise_backward_w_reduce".into(),
        grid: [grid_stride_blocks(g, len), 1, 1],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(partial),
            Arg::Ptr(dst),
            Arg::U64(len as u64),
            Arg::I32(dim(parts, "partial sums")?),
            Arg::I32(accumulate as i32),
        ],
    })
}
