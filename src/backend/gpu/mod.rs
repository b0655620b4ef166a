//! The launch layer of the hand-written kernels in `kernels/`: for each op, which entry point runs
//! with which grid, block, shared memory and arguments. Written once against the [`Gpu`] trait, it
//! drives a CUDA device (`backend::cuda`, feature `cuda`) and, in the tests, a CPU emulation of
//! the same kernels (`tests/gpu/`), so launch geometry and kernel logic are checked against the CPU
//! backend on every CI run, with or without a GPU.
//!
//! Functions here take raw device addresses (`u64`) and are `unsafe`: the caller guarantees each
//! address points at a live buffer of the documented size and dtype. Typed, checked wrappers live
//! in the backends.

pub mod attention;
pub mod conv;
pub mod crop;
pub mod depthwise;
pub mod elementwise;
pub mod geglu;
pub mod kernels;
pub mod loss;
pub mod norm;
pub mod optim;
pub mod sampler;
pub mod shape;

use crate::error::{Error, Result};
use crate::tensor::DType;
use kernels::KernelModule;

/// One kernel argument, as the kernel declares it (pointers are device addresses).
#[derive(Clone, Debug, PartialEq)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    U32(u32),
    U64(u64),
    F32(f32),
    F64(f64),
    /// A struct passed by value (its bytes, in 8-byte words so the host copy is aligned).
    Struct(Vec<u64>),
}

impl Arg {
    /// A `#[repr(C)]` struct argument, laid out as the kernel's C struct.
    pub fn pod<T: bytemuck::Pod>(v: &T) -> Arg {
        let bytes = bytemuck::bytes_of(v);
        let mut words = vec![0u64; bytes.len().div_ceil(8)];
        bytemuck::cast_slice_mut::<u64, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        Arg::Struct(words)
    }

    /// Where the argument's bytes are, as `cuLaunchKernel`'s `kernelParams` wants them.
    pub fn as_param(&self) -> *mut std::ffi::c_void {
        let p: *const std::ffi::c_void = match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as _,
            Arg::I32(v) => v as *const i32 as _,
            Arg::U32(v) => v as *const u32 as _,
            Arg::F32(v) => v as *const f32 as _,
            Arg::F64(v) => v as *const f64 as _,
            Arg::Struct(w) => w.as_ptr() as _,
        };
        p as *mut _
    }
}

/// A kernel launch: entry point, geometry and arguments.
#[derive(Clone, Debug)]
pub struct Launch {
    pub module: &'static KernelModule,
    pub entry: String,
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub shared_bytes: u32,
    pub args: Vec<Arg>,
}

/// A device that runs the kernels: a CUDA GPU, or the tests' CPU emulation.
pub trait Gpu {
    /// Device memory, released on drop.
    type Buf;
    /// A point in a stream's work (a CUDA event).
    type Event;
    /// Captured work to replay (a CUDA graph).
    type Graph;
    /// `bytes` of uninitialised device memory, 256-byte aligned.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;
    /// The device address of a buffer.
    fn ptr(&self, buf: &Self::Buf) -> u64;
    /// A new buffer holding `bytes`.
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf>;
    /// Copies the first `out.len()` bytes of `buf` to the host, after all queued work.
    fn download(&self, buf: &Self::Buf, out: &mut [u8]) -> Result<()>;
    /// Sets `bytes` bytes at `ptr` to zero (in stream order).
    ///
    /// # Safety
    /// `ptr .. ptr + bytes` must lie inside one live buffer of this device.
    unsafe fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()>;
    /// Queues a kernel.
    ///
    /// # Safety
    /// `l.args` must match the entry point's parameters one for one in type, and every pointer must
    /// address a live buffer large enough for every index the kernel computes from those arguments.
    unsafe fn launch(&self, l: &Launch) -> Result<()>;
    /// Copies `bytes` bytes from `src` to `dst` on the device (in stream order).
    ///
    /// # Safety
    /// Both ranges lie inside live buffers of this device and do not overlap.
    unsafe fn copy(&self, src: u64, dst: u64, bytes: usize) -> Result<()>;
    /// Waits until every queued operation has finished.
    fn synchronize(&self) -> Result<()>;
    /// Queues a GEMM (cuBLAS on a GPU).
    ///
    /// # Safety
    /// The pointers address live buffers holding the matrices `g` describes (see [`Gemm`]).
    unsafe fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Queues `batch` GEMMs of `g`'s shape (cuBLAS's strided batched GEMM on a GPU): the i-th
    /// multiplies at `g.a + i·strides[0]`, `g.b + i·strides[1]` into `g.c + i·strides[2]`, strides
    /// in elements of the operands' dtypes (`dtype` for A and B, `c_dtype` for C). The default
    /// queues them one by one.
    ///
    /// # Safety
    /// As [`Gpu::gemm`] for each of the `batch` GEMMs; the C matrices do not overlap.
    unsafe fn gemm_batched(&self, g: &Gemm, batch: usize, strides: [usize; 3]) -> Result<()> {
        check_batch(g, batch, strides)?;
        let (es, ces) = (
            g.dtype.size_in_bytes() as u64,
            g.c_dtype.size_in_bytes() as u64,
        );
        for i in 0..batch as u64 {
            self.gemm(&Gemm {
                a: g.a + i * strides[0] as u64 * es,
                b: g.b + i * strides[1] as u64 * es,
                c: g.c + i * strides[2] as u64 * ces,
                ..*g
            })?;
        }
        Ok(())
    }
    /// Streaming multiprocessors: sizes grid-stride launches.
    fn multiprocessors(&self) -> u32;

    /// Marks the work queued so far on the compute stream (every launch, GEMM and copy above).
    fn record(&self) -> Result<Self::Event>;
    /// Work queued on the compute stream from now on waits until `e` has completed.
    fn wait(&self, e: &Self::Event) -> Result<()>;
    /// Copies `bytes` to `dst` on the copy stream, once `after` (if any) has completed, and returns
    /// the copy's event. `bytes` may be reused when this returns: on CUDA they are staged through
    /// pinned host memory and the copy overlaps the compute stream's work. Nothing orders the copy
    /// before later compute: [`Gpu::wait`] on the returned event before reading `dst` (or dropping
    /// its buffer).
    ///
    /// # Safety
    /// `dst .. dst + bytes.len()` lies inside one live buffer of this device, and no queued work
    /// that is not ordered before `after` reads or writes it.
    unsafe fn upload_async(
        &self,
        bytes: &[u8],
        dst: u64,
        after: Option<&Self::Event>,
    ) -> Result<Self::Event>;
    /// Copies `out.len()` bytes at `src` to the host once `after` has completed, on the copy
    /// stream, so compute queued after `after` keeps the device busy meanwhile; returns when `out`
    /// holds them.
    ///
    /// # Safety
    /// `src .. src + out.len()` lies inside one live buffer of this device, and no work queued
    /// after `after` writes it before this returns.
    unsafe fn download_after(&self, src: u64, out: &mut [u8], after: &Self::Event) -> Result<()>;

    /// Records the launches, GEMMs, zeroings and device copies `f` queues, without running them,
    /// as a graph that [`Gpu::replay`] runs again with the same arguments (fixed-shape inference
    /// without per-launch host cost). Buffers `f` allocates stay the graph's until it is dropped
    /// and must all be released by the end of `f`; inputs and outputs are buffers allocated
    /// before the capture. Host copies and synchronisation inside `f` are errors.
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Self::Graph>;
    /// Queues the captured work once more.
    ///
    /// # Safety
    /// Every buffer allocated before the capture that the graph uses is still live.
    unsafe fn replay(&self, graph: &Self::Graph) -> Result<()>;

    /// Uploads a slice of plain values.
    fn upload_slice<T: bytemuck::Pod>(&self, v: &[T]) -> Result<Self::Buf> {
        self.upload(bytemuck::cast_slice(v))
    }
    /// Downloads `n` plain values from the start of `buf`.
    fn download_vec<T: bytemuck::Pod + Default>(
        &self,
        buf: &Self::Buf,
        n: usize,
    ) -> Result<Vec<T>> {
        let mut out = vec![T::default(); n];
        self.download(buf, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }
}

/// How a GEMM multiplies f32 inputs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Math {
    /// IEEE f32 products and sums.
    F32,
    /// TF32 tensor cores (10-bit mantissa products, f32 sums); bf16 inputs always use tensor cores.
    Tf32,
}

/// Row-major `C = alpha · op(A) · op(B) + beta · C`: op(A) is m × k, op(B) k × n, C m × n.
/// A is stored m × k with row stride `lda` (k × m when `trans_a`), B k × n with `ldb` (n × k when
/// `trans_b`), C with `ldc`. A and B hold `dtype` (F32 or BF16; sums in f32), C holds `c_dtype`:
/// `dtype`, or F32 with BF16 A and B (the f32 weight gradients of mixed-precision training).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub trans_a: bool,
    pub b: u64,
    pub ldb: usize,
    pub trans_b: bool,
    pub c: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
    pub dtype: DType,
    pub c_dtype: DType,
    pub math: Math,
}

impl Gemm {
    /// Checks the dtype, the leading dimensions and that every size fits cuBLAS's `int`.
    pub fn check(&self) -> Result<()> {
        if !matches!(self.dtype, DType::F32 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "GEMM on CUDA: dtype {:?} is not supported (f32 or bf16)",
                self.dtype
            )));
        }
        if !(self.c_dtype == self.dtype
            || (self.dtype == DType::BF16 && self.c_dtype == DType::F32))
        {
            return Err(Error::InvalidArgument(format!(
                "GEMM on CUDA: output dtype {:?} with {:?} inputs is not supported (the inputs' \
                 dtype, or f32 with bf16 inputs)",
                self.c_dtype, self.dtype
            )));
        }
        let (a_cols, b_cols) = (
            if self.trans_a { self.m } else { self.k },
            if self.trans_b { self.k } else { self.n },
        );
        for (ld, cols, what) in [
            (self.lda, a_cols, "lda"),
            (self.ldb, b_cols, "ldb"),
            (self.ldc, self.n, "ldc"),
        ] {
            if ld < cols.max(1) {
                return Err(Error::Shape(format!(
                    "GEMM: {what} = {ld} is less than the row length {cols}"
                )));
            }
            dim(ld, what)?;
        }
        dim(self.m, "GEMM m")?;
        dim(self.n, "GEMM n")?;
        dim(self.k, "GEMM k")?;
        Ok(())
    }
}

/// Checks a batched GEMM's count (fits cuBLAS's `int`) and strides (C's at least one C matrix,
/// so the outputs do not overlap; every offset fits an `i64`), and the GEMM itself.
pub fn check_batch(g: &Gemm, batch: usize, strides: [usize; 3]) -> Result<()> {
    g.check()?;
    dim(batch, "GEMM batch count")?;
    if batch > 1 && g.m > 0 && g.n > 0 && strides[2] < (g.m - 1) * g.ldc + g.n {
        return Err(Error::InvalidArgument(format!(
            "batched GEMM: C stride {} is less than one {}×{} C matrix (ldc {}): the outputs overlap",
            strides[2], g.m, g.n, g.ldc
        )));
    }
    for s in strides {
        s.checked_mul(batch)
            .filter(|&v| v <= i64::MAX as usize / 2)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "batched GEMM: stride {s} × batch {batch} overflows"
                ))
            })?;
    }
    Ok(())
}

/// Threads per block of the grid-stride (elementwise-style) kernels.
pub const BLOCK: u32 = 256;
/// Grid-stride kernels launch at most this many blocks per multiprocessor.
pub const BLOCKS_PER_SM: u32 = 8;

/// Blocks for a grid-stride loop over `items` work items, `BLOCK` threads each.
pub fn grid_stride_blocks(g: &impl Gpu, items: usize) -> u32 {
    let cap = g.multiprocessors().max(1).saturating_mul(BLOCKS_PER_SM) as usize;
    items.div_ceil(BLOCK as usize).clamp(1, cap) as u32
}

/// A dimension as the kernels' `int` parameters take it.
pub fn dim(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| {
        Error::InvalidArgument(format!(
            "{what} = {v} is too large for the CUDA kernels (at most {})",
            i32::MAX
        ))
    })
}

/// A grid extent, checked against CUDA's limits (x < 2³¹, y and z ≤ 65535).
pub fn grid_extent(v: usize, axis: usize, what: &str) -> Result<u32> {
    let max = if axis == 0 { i32::MAX as usize } else { 65535 };
    if v == 0 || v > max {
        return Err(Error::InvalidArgument(format!(
            "{what}: {v} blocks on grid axis {axis} (must be 1..={max})"
        )));
    }
    Ok(v as u32)
}
