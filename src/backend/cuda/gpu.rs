//! `backend::gpu::Gpu` for a CUDA device: the launch layer's launches become `cuLaunchKernel` on
//! the device's stream, its buffers come from the caching allocator.

use super::device::CudaDevice;
use super::{driver_error, guard, CudaStorage};
use crate::backend::gpu::{Gpu, Launch};
use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::driver::result as cu;
use cudarc::driver::sys::CUfunction_attribute_enum;
use std::ffi::c_void;
use std::sync::Arc;

/// Dynamic shared memory a launch may use without opting in (the CUDA default limit).
const DEFAULT_SHARED_LIMIT: u32 = 48 * 1024;

impl Gpu for Arc<CudaDevice> {
    type Buf = CudaStorage;

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
                unsafe { cu::memcpy_htod_async(out.device_ptr(), bytes, self.stream().cu_stream()) }
                    .map_err(|e| driver_error(&format!("copying {} bytes to the GPU", bytes.len()), e))?;
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
                .map_err(|e| driver_error(&format!("copying {} bytes from the GPU", out.len()), e))?;
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
                        &format!("{}: allowing {} bytes of shared memory", l.entry, l.shared_bytes),
                        e,
                    )
                })?;
            }
            let mut params: Vec<*mut c_void> = l.args.iter().map(|a| a.as_param()).collect();
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
            })
        })
    }

    fn multiprocessors(&self) -> u32 {
        self.sm_count()
    }
}
