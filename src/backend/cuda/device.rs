//! CUDA devices: driver probe, one context + stream + module cache + allocator per device ordinal.

use super::alloc::{AllocStats, CachingAllocator, RawMemory};
use super::nvrtc::{self, Arch, KernelModule};
use super::{catch_panic, driver_error, guard};
use crate::error::{Error, Result};
use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{result as cu, CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock};

/// One GPU: its context, the stream every phenocore op on it runs on, compiled modules, memory.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    arch: Arch,
    sm_count: u32,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Host ↔ device copies that overlap the compute stream (`Gpu::upload_async`, `download_after`).
    copy_stream: Arc<CudaStream>,
    /// Pinned host buffers `upload_async` stages through, used round-robin.
    pub(crate) staging: Mutex<Staging>,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    functions: Mutex<HashMap<(&'static str, String), CudaFunction>>,
    alloc: CachingAllocator,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cuda:{} ({}, sm_{}, {} SMs)",
            self.ordinal, self.name, self.arch, self.sm_count
        )
    }
}

/// Errors with `Error::NoDevice` unless the driver library (libcuda.so.1) can be loaded. Probed once
/// per process, before any cudarc call: cudarc panics when a library is missing.
pub fn ensure_driver() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: is_culib_present only tries dlopen on the candidate library names.
    if *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() }) {
        Ok(())
    } else {
        Err(Error::NoDevice(
            "no CUDA driver: libcuda.so.1 could not be loaded; install the NVIDIA driver or use the CPU".into(),
        ))
    }
}

/// Number of visible CUDA devices; `Error::NoDevice` when there is no usable driver.
pub fn device_count() -> Result<usize> {
    ensure_driver()?;
    catch_panic(|| {
        cu::init().map_err(|e| driver_error("initialising the CUDA driver", e))?;
        let n = cu::device::get_count().map_err(|e| driver_error("counting CUDA devices", e))?;
        Ok(n.max(0) as usize)
    })
    .unwrap_or_else(|msg| {
        Err(Error::NoDevice(format!(
            "the CUDA driver could not be used: {msg}"
        )))
    })
}

/// The device `ordinal`, opened on first use and cached for the life of the process.
pub fn device(ordinal: usize) -> Result<Arc<CudaDevice>> {
    static DEVICES: Mutex<BTreeMap<usize, Arc<CudaDevice>>> = Mutex::new(BTreeMap::new());
    let mut devices = DEVICES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(d) = devices.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Arc::new(CudaDevice::open(ordinal)?);
    devices.insert(ordinal, d.clone());
    Ok(d)
}

impl CudaDevice {
    fn open(ordinal: usize) -> Result<Self> {
        let count = device_count()?;
        if ordinal >= count {
            let visible = std::env::var("CUDA_VISIBLE_DEVICES")
                .map(|v| format!(" (CUDA_VISIBLE_DEVICES={v:?})"));
            return Err(Error::NoDevice(format!(
                "CUDA device {ordinal} requested but {count} device(s) are visible{}",
                visible.unwrap_or_default()
            )));
        }
        nvrtc::ensure_nvrtc()?;
        catch_panic(|| {
            let what = format!("opening CUDA device {ordinal}");
            let ctx = CudaContext::new(ordinal).map_err(|e| driver_error(&what, e))?;
            let (major, minor) = ctx
                .compute_capability()
                .map_err(|e| driver_error(&what, e))?;
            let sm_count = ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(|e| driver_error(&what, e))?;
            let name = ctx.name().map_err(|e| driver_error(&what, e))?;
            let stream = ctx.new_stream().map_err(|e| driver_error(&what, e))?;
            let copy_stream = ctx.new_stream().map_err(|e| driver_error(&what, e))?;
            Ok(CudaDevice {
                ordinal,
                name,
                arch: (major * 10 + minor) as Arch,
                sm_count: sm_count.max(1) as u32,
                ctx,
                stream,
                copy_stream,
                staging: Mutex::default(),
                modules: Mutex::default(),
                functions: Mutex::default(),
                alloc: CachingAllocator::default(),
            })
        })
        .unwrap_or_else(|msg| {
            Err(Error::NoDevice(format!(
                "CUDA device {ordinal} could not be opened: {msg}"
            )))
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Compute capability as major·10 + minor; kernels are compiled for exactly this.
    /// Streaming multiprocessors on the device.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    pub fn arch(&self) -> Arch {
        self.arch
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The stream of `Gpu::upload_async` / `download_after` copies.
    pub fn copy_stream(&self) -> &Arc<CudaStream> {
        &self.copy_stream
    }

    pub(crate) fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Makes this device's context current on the calling thread (needed before raw driver calls).
    pub(crate) fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| driver_error(&format!("binding CUDA device {}", self.ordinal), e))
    }

    /// Waits for all work queued on this device's stream.
    pub fn synchronize(&self) -> Result<()> {
        guard("synchronize", || {
            self.stream
                .synchronize()
                .map_err(|e| driver_error(&format!("waiting for CUDA device {}", self.ordinal), e))
        })
    }

    /// Kernel `entry` of `module`, compiled for this device on first use.
    pub fn function(&self, module: &'static KernelModule, entry: &str) -> Result<CudaFunction> {
        let key = (module.name, entry.to_string());
        if let Some(f) = self
            .functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(f.clone());
        }
        let m = self.module(module)?;
        let f = guard("loading a kernel", || {
            m.load_function(entry).map_err(|e| {
                driver_error(&format!("kernel {entry} of kernels/{}.cu", module.name), e)
            })
        })?;
        self.functions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, f.clone());
        Ok(f)
    }

    fn module(&self, module: &'static KernelModule) -> Result<Arc<CudaModule>> {
        let mut modules = self.modules.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = modules.get(module.name) {
            return Ok(m.clone());
        }
        let cubin = nvrtc::cubin(module, self.arch)?;
        let m = guard("loading a module", || {
            self.ctx
                .load_module(cudarc::nvrtc::Ptx::from_binary(cubin.to_vec()))
                .map_err(|e| {
                    driver_error(
                        &format!(
                            "loading kernels/{}.cu (sm_{}) on CUDA device {}",
                            module.name, self.arch, self.ordinal
                        ),
                        e,
                    )
                })
        })?;
        modules.insert(module.name, m.clone());
        Ok(m)
    }

    /// A block of at least `bytes` from the caching allocator: (device pointer, bucket size).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<(u64, usize)> {
        self.alloc.alloc(self, bytes)
    }

    pub(crate) fn release(&self, ptr: u64, bucket: usize) {
        self.alloc.release(ptr, bucket)
    }

    /// See `CachingAllocator::begin_private` (CUDA graph capture).
    pub(crate) fn begin_private(&self) -> Result<()> {
        self.alloc.begin_private()
    }

    /// See `CachingAllocator::end_private`.
    pub(crate) fn end_private(&self) -> (Vec<(u64, usize)>, usize) {
        self.alloc.end_private()
    }

    /// Gives a dropped graph's blocks back to the cache.
    pub(crate) fn release_owned(&self, blocks: &[(u64, usize)]) {
        self.alloc.release_owned(blocks)
    }

    pub fn alloc_stats(&self) -> AllocStats {
        self.alloc.stats()
    }

    /// Returns the allocator's cached blocks to the driver (e.g. before handing the GPU to another library).
    pub fn empty_cache(&self) -> Result<()> {
        guard("emptying the CUDA cache", || self.alloc.empty_cache(self))
    }
}

impl RawMemory for CudaDevice {
    fn malloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: the context is current; the block is only handed out as uninitialised memory that
        // the caller fills (upload or kernel output) before anything reads it.
        unsafe { cu::malloc_sync(bytes) }.map_err(|e| {
            driver_error(
                &format!(
                    "allocating {bytes} bytes on CUDA device {} ({})",
                    self.ordinal, self.name
                ),
                e,
            )
        })
    }

    fn free(&self, ptr: u64) -> Result<()> {
        self.bind()?;
        // SAFETY: ptr came from malloc above and sits on a free list only, so nothing references it;
        // the allocator synchronized the stream first, so no queued kernel uses it.
        unsafe { cu::free_sync(ptr) }.map_err(|e| {
            driver_error(
                &format!("freeing memory on CUDA device {}", self.ordinal),
                e,
            )
        })
    }

    fn synchronize(&self) -> Result<()> {
        for s in [&self.stream, &self.copy_stream] {
            s.synchronize().map_err(|e| {
                driver_error(&format!("waiting for CUDA device {}", self.ordinal), e)
            })?;
        }
        Ok(())
    }
}

/// Pinned host buffers for staged uploads: slot i is free once its last copy's event has completed.
#[derive(Default)]
pub(crate) struct Staging {
    pub(crate) slots: Vec<StagingSlot>,
    pub(crate) next: usize,
}

pub(crate) struct StagingSlot {
    pub(crate) host: cudarc::driver::PinnedHostSlice<u8>,
    /// The last copy out of `host`.
    pub(crate) done: Option<cudarc::driver::CudaEvent>,
}

/// Uploads in flight at once (double buffering: one being copied while the next is filled).
pub(crate) const STAGING_SLOTS: usize = 2;
