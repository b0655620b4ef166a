//! Shape, pooling, squeeze-excite and elementwise-backward kernels (`kernels/shape.cu`): SiLU and
//! sigmoid backward, add, global average pooling, the squeeze-excite multiply and its gradients,
//! the per-sample broadcast add, nearest 2× upsampling, concatenation on the last axis, embedding
//! gather / scatter-add and a deterministic f32 sum. Storage f32 or bf16, arithmetic f32; every
//! reduction is fixed-order (no float atomics), so results repeat bit for bit on one device.
//!
//! Vectorised entry points (16-byte packs) are picked per launch when the addresses are 16-byte
//! aligned and the packs stay inside a row; pure copies move the widest word (16 … 2 bytes) that
//! divides every row, offset and address. Callers never need to align anything.

use super::elementwise::suffix;
use super::kernels::SHAPE;
use super::{dim, grid_extent, grid_stride_blocks, Arg, Gpu, Launch, BLOCK};
use crate::error::{Error, Result};
use crate::tensor::DType;

fn check_dtype(dtype: DType, what: &str) -> Result<()> {
    if matches!(dtype, DType::F32 | DType::BF16) {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "{what} on CUDA: dtype {dtype:?} is not supported (f32 or bf16)"
        )))
    }
}

/// Elements per 16-byte pack.
fn vec_width(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

fn aligned16(ptrs: &[u64]) -> bool {
    ptrs.iter().all(|p| p.is_multiple_of(16))
}

/// `name_vec_<dtype>` or `name_<dtype>`.
fn entry(name: &str, vec: bool, dtype: DType) -> String {
    format!("{name}_{}{}", if vec { "vec_" } else { "" }, suffix(dtype))
}

/// The widest copy word (16, 8, 4 or 2 bytes) dividing every byte count / address in `multiples`.
fn word(multiples: &[u64], what: &str) -> Result<u64> {
    [16u64, 8, 4, 2]
        .into_iter()
        .find(|w| multiples.iter().all(|m| m % w == 0))
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{what} on CUDA: an address or row is not 2-byte aligned ({multiples:?})"
            ))
        })
}

/// A grid-stride launch of `BLOCK` threads over `items` work items.
fn stride_launch(g: &impl Gpu, entry: String, items: usize, args: Vec<Arg>) -> Launch {
    Launch {
        module: &SHAPE,
        entry,
        grid: [grid_stride_blocks(g, items), 1, 1],
        block: [BLOCK, 1, 1],
        shared_bytes: 0,
        args,
    }
}

// ------------------------------------------------------------------------------------------------
// Elementwise.

/// Which activation [`activation_backward`] differentiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActivationGrad {
    /// dx = dy · σ(x) (1 + x (1 − σ(x))).
    Silu,
    /// dx = dy · σ(x) (1 − σ(x)).
    Sigmoid,
}

/// dx = dy · f′(x) over `n` elements of `dtype` (f32 or bf16).
///
/// # Safety
/// `x`, `dy`, `dx` address `n` elements of `dtype` each; `dx` may be `dy` (in place), otherwise
/// it overlaps neither input.
pub unsafe fn activation_backward(
    g: &impl Gpu,
    op: ActivationGrad,
    dtype: DType,
    x: u64,
    dy: u64,
    dx: u64,
    n: usize,
) -> Result<()> {
    let name = match op {
        ActivationGrad::Silu => "silu_backward",
        ActivationGrad::Sigmoid => "sigmoid_backward",
    };
    binary(g, name, dtype, x, dy, dx, n)
}

/// y = a + b over `n` elements of `dtype` (f32 or bf16).
///
/// # Safety
/// `a`, `b`, `y` address `n` elements of `dtype` each; `y` may be `a` or `b` (in-place
/// accumulation), otherwise it overlaps neither.
pub unsafe fn add(g: &impl Gpu, dtype: DType, a: u64, b: u64, y: u64, n: usize) -> Result<()> {
    binary(g, "add", dtype, a, b, y, n)
}

#[allow(clippy::too_many_arguments)]
unsafe fn binary(
    g: &impl Gpu,
    name: &str,
    dtype: DType,
    a: u64,
    b: u64,
    y: u64,
    n: usize,
) -> Result<()> {
    check_dtype(dtype, name)?;
    if n == 0 {
        return Ok(());
    }
    let vec = aligned16(&[a, b, y]);
    let items = if vec { n.div_ceil(vec_width(dtype)) } else { n };
    g.launch(&stride_launch(
        g,
        entry(name, vec, dtype),
        items,
        vec![Arg::Ptr(a), Arg::Ptr(b), Arg::Ptr(y), Arg::U64(n as u64)],
    ))
}

// ------------------------------------------------------------------------------------------------
// Per-sample ops over x [N, P, C] and vectors [N, C].

/// `SampleGeom` of kernels/shape.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct SampleGeom {
    total: u64,
    per: u64,
    c: i32,
    k: f32,
}

/// `RedGeom` of kernels/shape.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
struct RedGeom {
    n: i32,
    p: i32,
    c: i32,
    per_split: i32,
    k: f32,
    accumulate: i32,
}

/// Position rows per reduction block (`RED_ROWS` of kernels/shape.cu) and the fewest positions a
/// reduction split takes.
const RED_ROWS: u32 = 8;
const MIN_SPLIT_POSITIONS: usize = 64;

/// A per-sample tensor x [n, p, c] (p: the product of the middle axes) with its per-sample
/// vectors [n, c]: global average pooling, the squeeze-excite multiply (`scale_channels`) and the
/// per-sample broadcast add, forward and backward.
#[derive(Clone, Copy, Debug)]
pub struct SampleChannels {
    pub dtype: DType,
    pub n: usize,
    pub p: usize,
    pub c: usize,
}

impl SampleChannels {
    /// Checks the dtype (f32 or bf16) and the sizes (all non-zero, each below 2³¹).
    pub fn new(dtype: DType, [n, p, c]: [usize; 3]) -> Result<Self> {
        check_dtype(dtype, "per-sample channel op")?;
        if [n, p, c].contains(&0) {
            return Err(Error::Shape(format!(
                "per-sample channel op on CUDA: empty shape [N, P, C] = [{n}, {p}, {c}]"
            )));
        }
        dim(n, "batch")?;
        // The reductions' int position arithmetic (up to p + per_split + RED_ROWS ≤ 2p + RED_ROWS)
        // stays below 2³¹.
        let max_p = (i32::MAX as usize - RED_ROWS as usize) / 2;
        if p > max_p {
            return Err(Error::InvalidArgument(format!(
                "per-sample channel op on CUDA: {p} positions per sample (at most {max_p})"
            )));
        }
        dim(c, "channels")?;
        grid_extent(n, 2, "per-sample reduction (batch)")?;
        Ok(SampleChannels { dtype, n, p, c })
    }

    /// From the shape [N, …, C] (rank ≥ 2) of x.
    pub fn from_shape(dtype: DType, shape: &[usize]) -> Result<Self> {
        if shape.len() < 2 {
            return Err(Error::Shape(format!(
                "per-sample channel op on CUDA: needs [N, …, C], got {shape:?}"
            )));
        }
        let p = shape[1..shape.len() - 1].iter().product();
        Self::new(dtype, [shape[0], p, shape[shape.len() - 1]])
    }

    /// Elements of x: n · p · c.
    pub fn len(&self) -> usize {
        self.n * self.p * self.c
    }

    /// Never true: the plan rejects empty shapes.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Elements of a per-sample vector: n · c.
    pub fn pooled_len(&self) -> usize {
        self.n * self.c
    }

    fn inv_p(&self) -> f32 {
        (1.0 / self.p as f64) as f32
    }

    /// One per-sample map launch; `ptrs` are every pointer it touches (for the vector choice).
    unsafe fn per_sample(
        &self,
        g: &impl Gpu,
        name: &str,
        ptrs: &[u64],
        k: f32,
        extra: &[Arg],
    ) -> Result<()> {
        let v = vec_width(self.dtype);
        let vec = self.c.is_multiple_of(v) && aligned16(ptrs);
        let total = self.len();
        let geo = SampleGeom {
            total: total as u64,
            per: (self.p * self.c) as u64,
            c: self.c as i32,
            k,
        };
        let mut args: Vec<Arg> = ptrs.iter().map(|&p| Arg::Ptr(p)).collect();
        args.push(Arg::pod(&geo));
        args.extend_from_slice(extra);
        let items = if vec { total / v } else { total };
        g.launch(&stride_launch(g, entry(name, vec, self.dtype), items, args))
    }

    /// y[n, p, c] = x[n, p, c] + e[n, c].
    ///
    /// # Safety
    /// x and y address `len` elements of `dtype`, e `pooled_len`; y may be x (in place),
    /// otherwise it overlaps neither input.
    pub unsafe fn add_per_sample(&self, g: &impl Gpu, x: u64, e: u64, y: u64) -> Result<()> {
        self.per_sample(g, "add_per_sample", &[x, e, y], 1.0, &[])
    }

    /// de[n, c] (+)= Σ_p dy[n, p, c] (the gradient of `add_per_sample`'s e; x's is dy itself).
    ///
    /// # Safety
    /// dy addresses `len` elements of `dtype`, de `pooled_len` (distinct).
    pub unsafe fn add_per_sample_backward_e(
        &self,
        g: &impl Gpu,
        dy: u64,
        de: u64,
        accumulate: bool,
    ) -> Result<()> {
        self.reduce(g, dy, None, de, 1.0, accumulate)
    }

    /// y[n, p, c] = x[n, p, c] · s[n, c] (the squeeze-excite multiply).
    ///
    /// # Safety
    /// x and y address `len` elements of `dtype`, s `pooled_len`; y may be x (in place),
    /// otherwise it overlaps neither input.
    pub unsafe fn scale_channels(&self, g: &impl Gpu, x: u64, s: u64, y: u64) -> Result<()> {
        self.per_sample(g, "scale_channels", &[x, s, y], 1.0, &[])
    }

    /// dx = dy · s[n, c] (x's gradient of `scale_channels`).
    ///
    /// # Safety
    /// As [`Self::scale_channels`] with (dy, s, dx).
    pub unsafe fn scale_channels_backward_x(
        &self,
        g: &impl Gpu,
        dy: u64,
        s: u64,
        dx: u64,
    ) -> Result<()> {
        self.scale_channels(g, dy, s, dx)
    }

    /// ds[n, c] (+)= Σ_p dy[n, p, c] · x[n, p, c] (s's gradient of `scale_channels`).
    ///
    /// # Safety
    /// dy and x address `len` elements of `dtype`, ds `pooled_len` (distinct from both).
    pub unsafe fn scale_channels_backward_s(
        &self,
        g: &impl Gpu,
        dy: u64,
        x: u64,
        ds: u64,
        accumulate: bool,
    ) -> Result<()> {
        self.reduce(g, dy, Some(x), ds, 1.0, accumulate)
    }

    /// dx = dy · s[n, c] + dpooled[n, c] / P: the squeeze-excite input's whole gradient in one pass
    /// when x feeds both the multiply and the pool (`global_avg_pool(x)` → … → s; y = x · s),
    /// dpooled being the pool output's gradient.
    ///
    /// # Safety
    /// dy and dx address `len` elements of `dtype`, s and dpooled `pooled_len`; dx may be dy
    /// (in place), otherwise it overlaps no input.
    pub unsafe fn scale_channels_backward_x_pooled(
        &self,
        g: &impl Gpu,
        dy: u64,
        s: u64,
        dpooled: u64,
        dx: u64,
    ) -> Result<()> {
        self.per_sample(
            g,
            "scale_channels_backward_pooled",
            &[dy, s, dpooled, dx],
            self.inv_p(),
            &[],
        )
    }

    /// y[n, c] = (1 / P) Σ_p x[n, p, c].
    ///
    /// # Safety
    /// x addresses `len` elements of `dtype`, y `pooled_len` (distinct).
    pub unsafe fn global_avg_pool(&self, g: &impl Gpu, x: u64, y: u64) -> Result<()> {
        self.reduce(g, x, None, y, self.inv_p(), false)
    }

    /// dx[n, p, c] (+)= dy[n, c] / P.
    ///
    /// # Safety
    /// dy addresses `pooled_len` elements of `dtype`, dx `len` (distinct).
    pub unsafe fn global_avg_pool_backward(
        &self,
        g: &impl Gpu,
        dy: u64,
        dx: u64,
        accumulate: bool,
    ) -> Result<()> {
        self.per_sample(
            g,
            "global_avg_pool_backward",
            &[dy, dx],
            self.inv_p(),
            &[Arg::I32(accumulate as i32)],
        )
    }

    /// How many position splits a reduction uses: about four blocks per multiprocessor, each
    /// split over at least `MIN_SPLIT_POSITIONS` positions.
    pub fn reduction_splits(&self, g: &impl Gpu) -> usize {
        let blocks = self.c.div_ceil(32) * self.n;
        let want = (4 * g.multiprocessors() as usize).div_ceil(blocks);
        let splits = want.clamp(1, self.p.div_ceil(MIN_SPLIT_POSITIONS).clamp(1, 65535));
        self.p.div_ceil(self.p.div_ceil(splits))
    }

    /// out[n, c] (+)= k · Σ_p a[n, p, c] (· b[n, p, c]).
    unsafe fn reduce(
        &self,
        g: &impl Gpu,
        a: u64,
        b: Option<u64>,
        out: u64,
        k: f32,
        accumulate: bool,
    ) -> Result<()> {
        let splits = self.reduction_splits(g);
        let per_split = self.p.div_ceil(splits);
        let geo = RedGeom {
            n: self.n as i32,
            p: self.p as i32,
            c: self.c as i32,
            per_split: per_split as i32,
            k,
            accumulate: accumulate as i32,
        };
        let partial = if splits > 1 {
            Some(g.alloc(splits * self.pooled_len() * 4)?)
        } else {
            None
        };
        let pp = partial.as_ref().map_or(0, |b| g.ptr(b));
        let mut args = vec![Arg::Ptr(a)];
        args.extend(b.map(Arg::Ptr));
        args.extend([Arg::Ptr(out), Arg::Ptr(pp), Arg::pod(&geo)]);
        let what = "per-sample position reduction";
        g.launch(&Launch {
            module: &SHAPE,
            entry: entry(
                if b.is_some() {
                    "position_dot"
                } else {
                    "position_sum"
                },
                false,
                self.dtype,
            ),
            grid: [
                grid_extent(self.c.div_ceil(32), 0, what)?,
                grid_extent(splits, 1, what)?,
                grid_extent(self.n, 2, what)?,
            ],
            block: [32 * RED_ROWS, 1, 1],
            shared_bytes: 0,
            args,
        })?;
        if splits > 1 {
            g.launch(&stride_launch(
                g,
                entry("position_reduce", false, self.dtype),
                self.pooled_len(),
                vec![
                    Arg::Ptr(pp),
                    Arg::Ptr(out),
                    Arg::pod(&geo),
                    Arg::I32(splits as i32),
                ],
            ))?;
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Nearest 2× upsampling.

/// Nearest-neighbour 2× upsampling of NHWC maps: [n, h, w, c] → [n, 2h, 2w, c].
#[derive(Clone, Copy, Debug)]
pub struct Upsample2x {
    pub dtype: DType,
    pub shape: [usize; 4],
}

impl Upsample2x {
    /// Checks the dtype (f32 or bf16) and that the shape is non-empty.
    pub fn new(dtype: DType, shape: [usize; 4]) -> Result<Self> {
        check_dtype(dtype, "upsample_nearest2x")?;
        if shape.contains(&0) {
            return Err(Error::Shape(format!(
                "upsample_nearest2x on CUDA: empty input {shape:?}"
            )));
        }
        Ok(Upsample2x { dtype, shape })
    }

    pub fn input_len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn output_len(&self) -> usize {
        4 * self.input_len()
    }

    /// y = upsample(x).
    ///
    /// # Safety
    /// x and y address `input_len` / `output_len` elements of `dtype` (distinct).
    pub unsafe fn forward(&self, g: &impl Gpu, x: u64, y: u64) -> Result<()> {
        let [n, h, w, c] = self.shape;
        let row = (c * self.dtype.size_in_bytes()) as u64;
        let wd = word(&[row, x, y], "upsample_nearest2x")?;
        let cw = row / wd;
        g.launch(&stride_launch(
            g,
            format!("upsample2x_forward_w{wd}"),
            n * h * w * cw as usize,
            vec![
                Arg::Ptr(x),
                Arg::Ptr(y),
                Arg::U64((n * h) as u64),
                Arg::U64(w as u64),
                Arg::U64(cw),
            ],
        ))
    }

    /// dx[n, y, x, c] = Σ of dy over the 2 × 2 block it was copied to (overwrites dx).
    ///
    /// # Safety
    /// dy and dx address `output_len` / `input_len` elements of `dtype` (distinct).
    pub unsafe fn backward(&self, g: &impl Gpu, dy: u64, dx: u64) -> Result<()> {
        let [n, h, w, c] = self.shape;
        let v = vec_width(self.dtype);
        let vec = c.is_multiple_of(v) && aligned16(&[dy, dx]);
        let items = if vec {
            self.input_len() / v
        } else {
            self.input_len()
        };
        g.launch(&stride_launch(
            g,
            entry("upsample2x_backward", vec, self.dtype),
            items,
            vec![
                Arg::Ptr(dy),
                Arg::Ptr(dx),
                Arg::U64((n * h) as u64),
                Arg::U64(w as u64),
                Arg::U64(c as u64),
            ],
        ))
    }
}

// ------------------------------------------------------------------------------------------------
// Concatenation on the last axis.

/// Concatenation on the last axis of inputs [rows, widths[i]] → [rows, Σ widths].
#[derive(Clone, Debug)]
pub struct ConcatLast {
    pub dtype: DType,
    pub rows: usize,
    pub widths: Vec<usize>,
}

impl ConcatLast {
    /// Checks the dtype (f32 or bf16), that there is at least one input, rows > 0 and a non-empty
    /// output row (inputs of width 0 are allowed and skipped).
    pub fn new(dtype: DType, rows: usize, widths: &[usize]) -> Result<Self> {
        check_dtype(dtype, "concat_last")?;
        if widths.is_empty() {
            return Err(Error::InvalidArgument(
                "concat_last on CUDA: needs at least one input".into(),
            ));
        }
        if rows == 0 || widths.iter().sum::<usize>() == 0 {
            return Err(Error::Shape(format!(
                "concat_last on CUDA: empty concatenation of {rows} rows, widths {widths:?}"
            )));
        }
        Ok(ConcatLast {
            dtype,
            rows,
            widths: widths.to_vec(),
        })
    }

    /// Width of the output rows.
    pub fn total(&self) -> usize {
        self.widths.iter().sum()
    }

    pub fn output_len(&self) -> usize {
        self.rows * self.total()
    }

    /// Elements of input `i`.
    pub fn input_len(&self, i: usize) -> usize {
        self.rows * self.widths[i]
    }

    /// Copies `rows` rows of `width` elements from `src` (row stride `src_stride`) to `dst` (row
    /// stride `dst_stride`), in the widest word that fits.
    unsafe fn copy(
        &self,
        g: &impl Gpu,
        src: u64,
        dst: u64,
        width: usize,
        src_stride: usize,
        dst_stride: usize,
    ) -> Result<()> {
        let es = self.dtype.size_in_bytes() as u64;
        let (wb, sb, db) = (
            width as u64 * es,
            src_stride as u64 * es,
            dst_stride as u64 * es,
        );
        let wd = word(&[wb, sb, db, src, dst], "concat_last")?;
        g.launch(&stride_launch(
            g,
            format!("copy_rows_w{wd}"),
            self.rows * (wb / wd) as usize,
            vec![
                Arg::Ptr(src),
                Arg::Ptr(dst),
                Arg::U64(self.rows as u64),
                Arg::U64(wb / wd),
                Arg::U64(sb / wd),
                Arg::U64(db / wd),
            ],
        ))
    }

    fn offsets(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let mut at = 0;
        self.widths.iter().enumerate().map(move |(i, &w)| {
            let o = at;
            at += w;
            (i, o, w)
        })
    }

    fn check_count(&self, got: usize) -> Result<()> {
        if got != self.widths.len() {
            return Err(Error::InvalidArgument(format!(
                "concat_last on CUDA: {got} buffers for {} inputs",
                self.widths.len()
            )));
        }
        Ok(())
    }

    /// y = concat(xs) (one copy launch per non-empty input).
    ///
    /// # Safety
    /// xs[i] addresses `input_len(i)` elements of `dtype`, y `output_len` (distinct from each).
    pub unsafe fn forward(&self, g: &impl Gpu, xs: &[u64], y: u64) -> Result<()> {
        self.check_count(xs.len())?;
        let es = self.dtype.size_in_bytes() as u64;
        for (i, at, w) in self.offsets().filter(|t| t.2 > 0) {
            self.copy(g, xs[i], y + at as u64 * es, w, w, self.total())?;
        }
        Ok(())
    }

    /// dxs[i] = the columns of dy input i came from (overwritten); `None` skips an input.
    ///
    /// # Safety
    /// dy addresses `output_len` elements of `dtype`, each given dxs[i] `input_len(i)` (distinct).
    pub unsafe fn backward(&self, g: &impl Gpu, dy: u64, dxs: &[Option<u64>]) -> Result<()> {
        self.check_count(dxs.len())?;
        let es = self.dtype.size_in_bytes() as u64;
        for (i, at, w) in self.offsets().filter(|t| t.2 > 0) {
            if let Some(dx) = dxs[i] {
                self.copy(g, dy + at as u64 * es, dx, w, self.total(), w)?;
            }
        }
        Ok(())
    }
}

// ------------------------------------------------------------------------------------------------
// Embedding.

/// Rows `indices` of a table [vocab, d] → [indices.len(), d], and the scatter-add of the gradient
/// into an f32 table gradient. The indices are checked and grouped by row on the host at plan
/// time (the backward's deterministic order); the launchers upload what they need per call.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub dtype: DType,
    pub vocab: usize,
    pub d: usize,
    idx: Vec<i32>,
    /// Row v's positions are `order[starts[v] .. starts[v + 1]]`, increasing.
    starts: Vec<i32>,
    order: Vec<i32>,
}

impl Embedding {
    /// Checks the dtype (f32 or bf16), the table (non-empty, below 2³¹ rows) and every index.
    pub fn new(dtype: DType, vocab: usize, d: usize, indices: &[usize]) -> Result<Self> {
        check_dtype(dtype, "embedding")?;
        if vocab == 0 || d == 0 {
            return Err(Error::Shape(format!(
                "embedding on CUDA: empty table [{vocab}, {d}]"
            )));
        }
        dim(vocab, "embedding rows")?;
        dim(indices.len(), "embedding indices")?;
        if let Some((pos, &bad)) = indices.iter().enumerate().find(|(_, &i)| i >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "embedding on CUDA: index {bad} (position {pos}) is out of range for a table of {vocab} rows"
            )));
        }
        let mut starts = vec![0i32; vocab + 1];
        for &i in indices {
            starts[i + 1] += 1;
        }
        for v in 0..vocab {
            starts[v + 1] += starts[v];
        }
        let mut next: Vec<i32> = starts[..vocab].to_vec();
        let mut order = vec![0i32; indices.len()];
        for (l, &i) in indices.iter().enumerate() {
            order[next[i] as usize] = l as i32;
            next[i] += 1;
        }
        Ok(Embedding {
            dtype,
            vocab,
            d,
            idx: indices.iter().map(|&i| i as i32).collect(),
            starts,
            order,
        })
    }

    pub fn table_len(&self) -> usize {
        self.vocab * self.d
    }

    pub fn output_len(&self) -> usize {
        self.idx.len() * self.d
    }

    /// out = table[indices] (uploads the indices, 4 bytes each).
    ///
    /// # Safety
    /// table and out address `table_len` / `output_len` elements of `dtype` (distinct).
    pub unsafe fn forward(&self, g: &impl Gpu, table: u64, out: u64) -> Result<()> {
        if self.idx.is_empty() {
            return Ok(());
        }
        let idx = g.upload_slice(&self.idx)?;
        let row = (self.d * self.dtype.size_in_bytes()) as u64;
        let wd = word(&[row, table, out], "embedding")?;
        let dw = row / wd;
        g.launch(&stride_launch(
            g,
            format!("embedding_forward_w{wd}"),
            self.idx.len() * dw as usize,
            vec![
                Arg::Ptr(table),
                Arg::Ptr(g.ptr(&idx)),
                Arg::Ptr(out),
                Arg::U64(self.idx.len() as u64),
                Arg::I32(self.vocab as i32),
                Arg::U64(dw),
            ],
        ))
    }

    /// dtable (f32, [vocab, d]) (+)= the scatter of dy [indices.len(), d]: each row adds its
    /// positions' gradient rows in index order (deterministic, no atomics). Uploads the row
    /// grouping, 4 · (vocab + 1 + indices.len()) bytes.
    ///
    /// # Safety
    /// dy addresses `output_len` elements of `dtype`, dtable `table_len` f32 (distinct).
    pub unsafe fn backward(
        &self,
        g: &impl Gpu,
        dy: u64,
        dtable: u64,
        accumulate: bool,
    ) -> Result<()> {
        let starts = g.upload_slice(&self.starts)?;
        // One dummy entry keeps the upload non-empty when there are no indices.
        let order = if self.order.is_empty() {
            g.upload_slice(&[0i32])?
        } else {
            g.upload_slice(&self.order)?
        };
        g.launch(&stride_launch(
            g,
            entry("embedding_backward", false, self.dtype),
            self.table_len(),
            vec![
                Arg::Ptr(dy),
                Arg::Ptr(g.ptr(&starts)),
                Arg::Ptr(g.ptr(&order)),
                Arg::Ptr(dtable),
                Arg::I32(self.vocab as i32),
                Arg::U64(self.d as u64),
                Arg::I32(accumulate as i32),
            ],
        ))
    }
}

// ------------------------------------------------------------------------------------------------
// Deterministic sum.

/// Threads per block of the sum kernels (`SUM_BLOCK` of kernels/shape.cu).
const SUM_BLOCK: u32 = 256;
/// Values per first-stage block (32 per thread) and the most first-stage blocks.
const SUM_PER_BLOCK: usize = 8192;
const SUM_MAX_BLOCKS: usize = 1024;

/// out (f32 scalar) (+)= scale · Σ x[i] over `n` f32 values, in two fixed-order stages whose
/// shape depends on `n` alone: the same bits on every GPU.
///
/// # Safety
/// x addresses `n` f32, out one f32 outside x.
pub unsafe fn sum_f32(
    g: &impl Gpu,
    x: u64,
    n: usize,
    out: u64,
    scale: f32,
    accumulate: bool,
) -> Result<()> {
    let blocks = if n == 0 {
        0
    } else {
        n.div_ceil(SUM_PER_BLOCK).clamp(1, SUM_MAX_BLOCKS)
    };
    let partial = g.alloc(blocks.max(1) * 4)?;
    let pp = g.ptr(&partial);
    if blocks > 0 {
        let vec = aligned16(&[x]);
        g.launch(&Launch {
            module: &SHAPE,
            entry: entry("sum_partial", vec, DType::F32),
            grid: [blocks as u32, 1, 1],
            block: [SUM_BLOCK, 1, 1],
            shared_bytes: 0,
            args: vec![Arg::Ptr(x), Arg::U64(n as u64), Arg::Ptr(pp)],
        })?;
    }
    g.launch(&Launch {
        module: &SHAPE,
        entry: "sum_final_f32".into(),
        grid: [1, 1, 1],
        block: [SUM_BLOCK, 1, 1],
        shared_bytes: 0,
        args: vec![
            Arg::Ptr(pp),
            Arg::I32(blocks as i32),
            Arg::Ptr(out),
            Arg::F32(scale),
            Arg::I32(accumulate as i32),
        ],
    })
}
