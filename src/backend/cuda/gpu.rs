//! `backend::gpu::Gpu` for a CUDA device: the launch layer's launches become `cuLaunchKernel` on
//! the device's stream, its buffers come from the caching allocator.

use super::device::{CudaDevice, StagingSlot, STAGING_SLOTS};
use super::{driver_error, guard, CudaStorage};
use crate::backend::gpu::{check_batch, Gemm, Gpu, Launch, Math};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublas as blas;
use cudarc::driver::result as cu;
use cudarc::driver::sys::{
    CUevent_flags, CUfunction_attribute_enum, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use cudarc::driver::{CudaEvent, CudaGraph, CudaStream};
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::Arc;
use std::sync::Mutex;

/// Dynamic shared memory a launch may use without opting in (the CUDA default limit).
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;
/// The cuBLAS handle's own workspace.
const CUBLAS_WORKSPACE: usize = 32 << 20;

impl Gpu for Arc<CudaDevice> {
    type Buf = CudaStorage;
    type Event = CudaEvent;
    type Graph = CudaGraphRun;

    fn alloc(&self, bytes: usize) -> Result<CudaStorage> {
        // Stored as f32 words: the buffer is raw bytes to the launch layer.
        CudaStorage::uninit(self, DType::F32, bytes.div_ceil(4).max(1))
    }

    fn ptr(&self, buf: &CudaStorage) -> u64 {
        buf.device_ptr()
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaStorage> {
        guard("copy to the GPU", || {
            let out = self.alloc(bytes.len())?;
            if !bytes.is_empty() {
                self.bind()?;
                // SAFETY: the block holds at least bytes.len() bytes; `bytes` stays borrowed until
                // the synchronize below has completed the copy.
                unsafe {
                    cu::memcpy_htod_async(out.device_ptr(), bytes, self.stream().cu_stream())
                }
                .map_err(|e| {
                    driver_error(&format!("copying {} bytes to the GPU", bytes.len()), e)
                })?;
                self.synchronize()?;
            }
            Ok(out)
        })
    }

    fn download(&self, buf: &CudaStorage, out: &mut [u8]) -> Result<()> {
        if out.len() > buf.len() * buf.dtype().size_in_bytes() {
            return Err(Error::InvalidArgument(format!(
                "download of {} bytes from a {}-byte buffer",
                out.len(),
                buf.len() * buf.dtype().size_in_bytes()
            )));
        }
        guard("copy from the GPU", || {
            if out.is_empty() {
                return Ok(());
            }
            self.bind()?;
            // SAFETY: checked above that the block holds out.len() bytes; `out` is not touched
            // until the synchronize below has completed the copy.
            unsafe { cu::memcpy_dtoh_async(out, buf.device_ptr(), self.stream().cu_stream()) }
                .map_err(|e| {
                    driver_error(&format!("copying {} bytes from the GPU", out.len()), e)
                })?;
            self.synchronize()
        })
    }

    unsafe fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        guard("memset on the GPU", || {
            self.bind()?;
            // SAFETY: the caller guarantees ptr .. ptr + bytes lies in one live buffer.
            unsafe { cu::memset_d8_async(ptr, 0, bytes, self.stream().cu_stream()) }
                .map_err(|e| driver_error(&format!("zeroing {bytes} bytes on the GPU"), e))
        })
    }

    unsafe fn copy(&self, src: u64, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        guard("device-to-device copy", || {
            self.bind()?;
            // SAFETY: the caller guarantees both ranges lie in live buffers and do not overlap.
            unsafe { cu::memcpy_dtod_async(dst, src, bytes, self.stream().cu_stream()) }
                .map_err(|e| driver_error(&format!("copying {bytes} bytes on the GPU"), e))
        })
    }

    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }

    unsafe fn launch(&self, l: &Launch) -> Result<()> {
        let func = self.function(l.module, &l.entry)?;
        guard(&l.entry, || {
            self.bind()?;
            if l.shared_bytes > DEFAULT_SHARED_LIMIT {
                func.set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    l.shared_bytes as i32,
                )
                .map_err(|e| {
                    driver_error(
                        &format!(
                            "{}: allowing {} bytes of shared memory",
                            l.entry, l.shared_bytes
                        ),
                        e,
                    )
                })?;
            }
            let mut params: Vec<*mut c_void> = l.args.iter().map(|a| a.as_param()).collect();
            let timing = super::profile::start(self);
            // SAFETY: the caller guarantees the arguments match the entry point's parameters and
            // address live buffers of the sizes the kernel indexes; `params` points into `l.args`,
            // which outlives this call (cuLaunchKernel copies the values before returning).
            unsafe {
                cu::launch_kernel(
                    func.cu_function(),
                    (l.grid[0], l.grid[1], l.grid[2]),
                    (l.block[0], l.block[1], l.block[2]),
                    l.shared_bytes,
                    self.stream().cu_stream(),
                    &mut params,
                )
            }
            .map_err(|e| {
                driver_error(
                    &format!(
                        "launching {} (grid {:?}, block {:?}, {} bytes shared)",
                        l.entry, l.grid, l.block, l.shared_bytes
                    ),
                    e,
                )
            })?;
            super::profile::finish(self, timing, || l.entry.to_string());
            Ok(())
        })
    }

    unsafe fn gemm(&self, g: &Gemm) -> Result<()> {
        gemm_strided(self, g, 1, [0; 3])
    }

    unsafe fn gemm_batched(&self, g: &Gemm, batch: usize, strides: [usize; 3]) -> Result<()> {
        check_batch(g, batch, strides)?;
        gemm_strided(self, g, batch, strides)
    }

    fn multiprocessors(&self) -> u32 {
        self.sm_count()
    }

    fn record(&self) -> Result<CudaEvent> {
        record_on(self, self.stream())
    }

    fn wait(&self, e: &CudaEvent) -> Result<()> {
        guard("stream wait", || {
            self.stream()
                .wait(e)
                .map_err(|err| driver_error("making the compute stream wait for an event", err))
        })
    }

    unsafe fn upload_async(
        &self,
        bytes: &[u8],
        dst: u64,
        after: Option<&CudaEvent>,
    ) -> Result<CudaEvent> {
        guard("staged copy to the GPU", || {
            self.bind()?;
            let copy = self.copy_stream();
            let mut staging = self.staging.lock().unwrap_or_else(|e| e.into_inner());
            if staging.slots.len() < STAGING_SLOTS {
                let slot = pinned_slot(self, bytes.len())?;
                staging.slots.push(slot);
            }
            let i = staging.next % staging.slots.len();
            staging.next = staging.next.wrapping_add(1);
            let slot = &mut staging.slots[i];
            // The slot's previous copy must have left it before the host overwrites it.
            if let Some(done) = slot.done.take() {
                done.synchronize()
                    .map_err(|e| driver_error("waiting for a staging buffer", e))?;
            }
            if slot.host.len() < bytes.len() {
                *slot = pinned_slot(self, bytes.len())?;
            }
            let host = slot
                .host
                .as_mut_slice()
                .map_err(|e| driver_error("mapping a staging buffer", e))?;
            host[..bytes.len()].copy_from_slice(bytes);
            if let Some(a) = after {
                copy.wait(a)
                    .map_err(|e| driver_error("making the copy stream wait for an event", e))?;
            }
            if !bytes.is_empty() {
                // SAFETY: the caller guarantees dst holds bytes.len() bytes and that nothing
                // unordered with `after` touches them; the pinned slot stays untouched until the
                // event recorded below has completed (checked above before each reuse).
                unsafe { cu::memcpy_htod_async(dst, &host[..bytes.len()], copy.cu_stream()) }
                    .map_err(|e| {
                        driver_error(&format!("copying {} bytes to the GPU", bytes.len()), e)
                    })?;
            }
            slot.done = Some(record_on(self, copy)?);
            record_on(self, copy)
        })
    }

    unsafe fn download_after(&self, src: u64, out: &mut [u8], after: &CudaEvent) -> Result<()> {
        guard("copy from the GPU", || {
            self.bind()?;
            let copy = self.copy_stream();
            copy.wait(after)
                .map_err(|e| driver_error("making the copy stream wait for an event", e))?;
            if !out.is_empty() {
                // SAFETY: the caller guarantees src holds out.len() bytes, unwritten until this
                // returns; `out` is not touched until the synchronize below.
                unsafe { cu::memcpy_dtoh_async(out, src, copy.cu_stream()) }.map_err(|e| {
                    driver_error(&format!("copying {} bytes from the GPU", out.len()), e)
                })?;
            }
            copy.synchronize()
                .map_err(|e| driver_error("waiting for a copy from the GPU", e))
        })
    }

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraphRun> {
        // Other threads' stream work waits until the capture has ended.
        let _exclusive = super::capture_gate::capture();
        guard("capturing a CUDA graph", || capture_on(self, f))
    }

    unsafe fn replay(&self, graph: &CudaGraphRun) -> Result<()> {
        guard("replaying a CUDA graph", || {
            let g = graph
                .graph
                .as_ref()
                .ok_or_else(|| Error::Internal("a released CUDA graph".into()))?;
            if !Arc::ptr_eq(&graph.dev, self) {
                return Err(Error::InvalidArgument(format!(
                    "a graph captured on CUDA device {} replayed on device {}",
                    graph.dev.ordinal(),
                    self.ordinal()
                )));
            }
            g.launch()
                .map_err(|e| driver_error("launching a CUDA graph", e))
        })
    }
}

/// `batch` GEMMs (one when `batch` is 1: cublasGemmEx; else cublasGemmStridedBatchedEx), the i-th
/// on A + i·strides[0], B + i·strides[1], C + i·strides[2] (elements of their dtypes).
///
/// # Safety
/// As [`Gpu::gemm_batched`].
unsafe fn gemm_strided(
    dev: &Arc<CudaDevice>,
    g: &Gemm,
    batch: usize,
    strides: [usize; 3],
) -> Result<()> {
    g.check()?;
    if g.m == 0 || g.n == 0 || batch == 0 {
        return Ok(());
    }
    let handle = cublas_handle(dev)?;
    let name = if batch == 1 {
        "cublasGemmEx"
    } else {
        "cublasGemmStridedBatchedEx"
    };
    guard(name, || {
        dev.bind()?;
        use blas::sys::{
            cublasComputeType_t as Compute, cublasGemmAlgo_t, cublasOperation_t as Op,
            cudaDataType as Ty,
        };
        let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
        let cuda_ty = |d: DType| {
            if d == DType::BF16 {
                Ty::CUDA_R_16BF
            } else {
                Ty::CUDA_R_32F
            }
        };
        // bf16 A and B with an f32 C is one of cublasGemmEx's supported type combinations.
        let (ty, c_ty) = (cuda_ty(g.dtype), cuda_ty(g.c_dtype));
        let compute = match (g.dtype, g.math) {
            (DType::F32, Math::F32) => Compute::CUBLAS_COMPUTE_32F,
            (DType::F32, Math::Tf32) => Compute::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => Compute::CUBLAS_COMPUTE_32F,
        };
        let (alpha, beta) = (g.alpha, g.beta);
        let timing = super::profile::start(dev);
        // Row-major C = op(A)·op(B) is column-major Cᵀ = op(B)ᵀ·op(A)ᵀ: B's rows are the first
        // operand's columns, so cuBLAS gets (n, m, k) with B first and A second.
        // SAFETY: the caller guarantees the buffers; check() and check_batch() bounded every size
        // by i32::MAX (strides by i64); alpha and beta are host f32 (the handle's default pointer
        // mode), matching the f32 compute type.
        let r = unsafe {
            let alpha = &alpha as *const f32 as *const c_void;
            let beta = &beta as *const f32 as *const c_void;
            let (a, b, c) = (
                g.a as *const c_void,
                g.b as *const c_void,
                g.c as *mut c_void,
            );
            let (m, n, k) = (g.n as i32, g.m as i32, g.k as i32);
            let (lda, ldb, ldc) = (g.ldb as i32, g.lda as i32, g.ldc as i32);
            let algo = cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT;
            if batch == 1 {
                blas::result::gemm_ex(
                    handle.0,
                    op(g.trans_b),
                    op(g.trans_a),
                    m,
                    n,
                    k,
                    alpha,
                    b,
                    ty,
                    lda,
                    a,
                    ty,
                    ldb,
                    beta,
                    c,
                    c_ty,
                    ldc,
                    compute,
                    algo,
                )
            } else {
                blas::result::gemm_strided_batched_ex(
                    handle.0,
                    op(g.trans_b),
                    op(g.trans_a),
                    m,
                    n,
                    k,
                    alpha,
                    b,
                    ty,
                    lda,
                    strides[1] as i64,
                    a,
                    ty,
                    ldb,
                    strides[0] as i64,
                    beta,
                    c,
                    c_ty,
                    ldc,
                    strides[2] as i64,
                    batch as i32,
                    compute,
                    algo,
                )
            }
        };
        r.map_err(|e| {
            Error::Cuda(format!(
                "{name} {}×{}×{} ×{batch} ({:?} -> {:?}): {e:?}",
                g.m, g.n, g.k, g.dtype, g.c_dtype
            ))
        })?;
        super::profile::finish(dev, timing, || {
            format!(
                "{name} {:?}->{:?} {:?} m{} n{} k{} batch{batch}",
                g.dtype, g.c_dtype, g.math, g.m, g.n, g.k
            )
        });
        Ok(())
    })
}

/// A captured CUDA graph and the device blocks its kernels use (back to the cache on drop).
pub struct CudaGraphRun {
    graph: Option<CudaGraph>,
    blocks: Vec<(u64, usize)>,
    dev: Arc<CudaDevice>,
}

impl Drop for CudaGraphRun {
    fn drop(&mut self) {
        // A replay may still be running: the blocks return to the cache once the stream is idle
        // (if it cannot be waited for, they are leaked rather than handed out under a kernel).
        if self.dev.synchronize().is_ok() {
            self.graph.take();
            self.dev.release_owned(&self.blocks);
        }
    }
}

/// Ends a capture and the allocator's private pool however `capture` leaves (error or panic).
struct CaptureScope<'a> {
    dev: &'a Arc<CudaDevice>,
    capturing: bool,
}

impl CaptureScope<'_> {
    /// Ends the stream capture (once): the instantiated graph, if any.
    fn end(&mut self) -> Result<Option<CudaGraph>> {
        if !std::mem::replace(&mut self.capturing, false) {
            return Ok(None);
        }
        self.dev
            .stream()
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| driver_error("ending a CUDA graph capture", e))
    }
}

impl Drop for CaptureScope<'_> {
    fn drop(&mut self) {
        let _ = self.end();
        let (idle, _) = self.dev.end_private();
        self.dev.release_owned(&idle);
    }
}

fn capture_on(dev: &Arc<CudaDevice>, f: &mut dyn FnMut() -> Result<()>) -> Result<CudaGraphRun> {
    dev.bind()?;
    // cuBLAS must not allocate its workspace inside a capture: give the handle one now.
    cublas_handle(dev)?;
    dev.begin_private()?;
    let mut scope = CaptureScope {
        dev,
        capturing: false,
    };
    // Relaxed: a cache miss inside the capture may still call cuMemAlloc (not captured).
    dev.stream()
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| driver_error("beginning a CUDA graph capture", e))?;
    scope.capturing = true;
    let run = f();
    let graph = scope.end();
    run?;
    let graph =
        graph?.ok_or_else(|| Error::Cuda("the CUDA graph capture recorded nothing".into()))?;
    let (blocks, live) = dev.end_private();
    if live != 0 {
        dev.release_owned(&blocks);
        return Err(Error::InvalidArgument(format!(
            "{live} device buffer(s) allocated during the graph capture outlived it; allocate \
             inputs and outputs before capturing"
        )));
    }
    drop(scope);
    Ok(CudaGraphRun {
        graph: Some(graph),
        blocks,
        dev: dev.clone(),
    })
}

fn record_on(dev: &CudaDevice, stream: &CudaStream) -> Result<CudaEvent> {
    guard("recording an event", || {
        dev.bind()?;
        stream
            .record_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING))
            .map_err(|e| driver_error("recording an event", e))
    })
}

/// A pinned host buffer of at least `bytes` (rounded up to 1 MiB so slightly larger batches reuse it).
fn pinned_slot(dev: &CudaDevice, bytes: usize) -> Result<StagingSlot> {
    let len = bytes.max(1).div_ceil(1 << 20) << 20;
    // SAFETY: the memory is only written (by upload_async) before it is read by a copy.
    let host = unsafe { dev.context().alloc_pinned::<u8>(len) }.map_err(|e| match e.0 {
        cudarc::driver::sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            Error::OutOfMemory(format!("{len} bytes of pinned host memory for staging"))
        }
        _ => driver_error(&format!("allocating {len} bytes of pinned host memory"), e),
    })?;
    Ok(StagingSlot { host, done: None })
}

/// A cuBLAS handle bound to a device's stream (one per device, created on first use, kept).
#[derive(Clone, Copy)]
struct Handle(blas::sys::cublasHandle_t);
// SAFETY: a cuBLAS handle may be used from any thread as long as calls do not overlap; every use
// here happens inside the device's single-stream ordering under the `HANDLES` lookup.
unsafe impl Send for Handle {}

fn cublas_handle(dev: &Arc<CudaDevice>) -> Result<Handle> {
    static HANDLES: Mutex<BTreeMap<usize, Handle>> = Mutex::new(BTreeMap::new());
    let mut handles = HANDLES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(h) = handles.get(&dev.ordinal()) {
        return Ok(*h);
    }
    // SAFETY: only tries dlopen on the candidate library names.
    if !unsafe { blas::sys::is_culib_present() } {
        return Err(Error::NoDevice(
            "libcublas could not be loaded: install the CUDA cuBLAS library (e.g. the nvidia-cublas wheel) \
             and put its lib directory on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let h = guard("creating a cuBLAS handle", || {
        dev.bind()?;
        let h = blas::result::create_handle().map_err(|e| {
            Error::Cuda(format!(
                "cublasCreate on CUDA device {}: {e:?}",
                dev.ordinal()
            ))
        })?;
        // SAFETY: h is a fresh handle; the stream belongs to the same context and outlives the
        // handle (both live as long as the process-wide device).
        unsafe { blas::result::set_stream(h, dev.stream().cu_stream() as _) }
            .map_err(|e| Error::Cuda(format!("cublasSetStream: {e:?}")))?;
        // A workspace of its own (32 MiB, NVIDIA's suggestion for Hopper), so cuBLAS never
        // allocates while a CUDA graph is being captured. Lives as long as the handle (the process).
        // SAFETY: the context is current; the block is only ever used by this handle.
        let ws = unsafe { cu::malloc_sync(CUBLAS_WORKSPACE) }
            .map_err(|e| driver_error("allocating the cuBLAS workspace", e))?;
        // SAFETY: h is live; ws holds CUBLAS_WORKSPACE bytes for as long as h exists.
        let st =
            unsafe { blas::sys::cublasSetWorkspace_v2(h, ws as *mut c_void, CUBLAS_WORKSPACE) };
        if st != blas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::Cuda(format!("cublasSetWorkspace: {st:?}")));
        }
        Ok(Handle(h))
    })?;
    handles.insert(dev.ordinal(), h);
    Ok(h)
}
