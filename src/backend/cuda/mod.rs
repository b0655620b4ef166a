//! CUDA backend (feature `cuda`): device contexts, NVRTC-compiled kernels from `kernels/`, a caching
//! allocator and the launches behind `ops`.
//!
//! cudarc loads libcuda and libnvrtc at run time and panics when one is missing, so every entry
//! point probes the libraries first (`device::ensure_driver`, `nvrtc::ensure_nvrtc`) and runs its
//! cudarc calls inside `guard`: a machine without a driver gets `Error::NoDevice`, never a panic.

mod alloc;
mod device;
mod gpu;
pub mod nvrtc;
pub mod ops;
mod storage;

pub use alloc::{bucket_size, AllocStats};
pub use device::{device, device_count, ensure_driver, CudaDevice};
pub use gpu::CudaGraphRun;
pub use storage::CudaStorage;

use crate::error::{Error, Result};
use cudarc::driver::sys::CUresult;
use cudarc::driver::DriverError;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Runs `f`, turning a panic (cudarc's reaction to a missing library or symbol) into its message.
fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Runs a block of cudarc calls; a panic inside becomes `Error::Cuda` naming `what`.
fn guard<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_panic(f).unwrap_or_else(|msg| {
        Err(Error::Cuda(format!(
            "{what}: the CUDA library panicked: {msg}"
        )))
    })
}

/// Maps a driver error onto the library's error kinds.
fn driver_error(what: &str, e: DriverError) -> Error {
    // The code's name needs no library call; the description asks the driver, so only when loaded.
    let detail = match ensure_driver() {
        Ok(()) => e
            .error_string()
            .map(|s| format!(" ({})", s.to_string_lossy()))
            .unwrap_or_default(),
        Err(_) => String::new(),
    };
    let msg = format!("{what}: {:?}{detail}", e.0);
    match e.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(msg),
        CUresult::CUDA_ERROR_NO_DEVICE
        | CUresult::CUDA_ERROR_INVALID_DEVICE
        | CUresult::CUDA_ERROR_NOT_INITIALIZED
        | CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE
        | CUresult::CUDA_ERROR_SYSTEM_NOT_READY
        | CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE => Error::NoDevice(msg),
        _ => Error::Cuda(msg),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<CudaStorage>();
        send_sync::<CudaDevice>();
    }

    #[test]
    fn panics_become_errors() {
        let e = guard("test launch", || -> Result<()> {
            panic!("Unable to dynamically load the \"cuda\" shared library")
        });
        match e {
            Err(Error::Cuda(m)) => assert!(
                m.contains("test launch") && m.contains("\"cuda\" shared library"),
                "{m}"
            ),
            other => panic!("expected Error::Cuda, got {other:?}"),
        }
        assert_eq!(guard("fine", || Ok(7)), Ok(7));
    }

    #[test]
    fn driver_errors_map_to_kinds() {
        let oom = driver_error("alloc", DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        assert!(
            matches!(&oom, Error::OutOfMemory(m) if m.starts_with("alloc: CUDA_ERROR_OUT_OF_MEMORY")),
            "{oom:?}"
        );
        let none = driver_error("init", DriverError(CUresult::CUDA_ERROR_NO_DEVICE));
        assert!(matches!(none, Error::NoDevice(_)), "{none:?}");
        let launch = driver_error("launch", DriverError(CUresult::CUDA_ERROR_LAUNCH_FAILED));
        assert!(matches!(launch, Error::Cuda(_)), "{launch:?}");
    }
}
