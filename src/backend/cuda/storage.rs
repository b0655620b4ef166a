//! `CudaStorage`: a tensor's elements in device memory, from the caching allocator.

use super::device::{device, CudaDevice};
use super::{driver_error, guard};
use crate::error::{Error, Result};
use crate::tensor::{DType, Storage};
use cudarc::driver::result as cu;
use half::{bf16, f16};
use std::sync::Arc;

/// A block from the device's caching allocator, given back when the last owner drops it.
struct DeviceBuffer {
    ptr: u64,
    bucket: usize,
    device: Arc<CudaDevice>,
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        self.device.release(self.ptr, self.bucket);
    }
}

/// `len` elements of `dtype` on one CUDA device. Clones share the buffer: ops never write their
/// inputs, they return new storage.
#[derive(Clone)]
pub struct CudaStorage {
    buf: Arc<DeviceBuffer>,
    len: usize,
    dtype: DType,
}

impl std::fmt::Debug for CudaStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CudaStorage({} × {:?} on {:?})",
            self.len, self.dtype, self.buf.device
        )
    }
}

impl CudaStorage {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn ordinal(&self) -> usize {
        self.buf.device.ordinal()
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.buf.device
    }

    /// The device address of element 0 (16-byte aligned), for kernel arguments.
    pub(crate) fn device_ptr(&self) -> u64 {
        self.buf.ptr
    }

    /// Uninitialised storage for `len` elements; the caller must write all of it before it is read.
    pub(crate) fn uninit(device: &Arc<CudaDevice>, dtype: DType, len: usize) -> Result<Self> {
        let bytes = len.checked_mul(dtype.size_in_bytes()).ok_or_else(|| {
            Error::OutOfMemory(format!(
                "{len} elements of {dtype:?} overflow the address space"
            ))
        })?;
        let (ptr, bucket) = device.alloc(bytes)?;
        Ok(CudaStorage {
            buf: Arc::new(DeviceBuffer {
                ptr,
                bucket,
                device: device.clone(),
            }),
            len,
            dtype,
        })
    }

    /// Copies CPU storage to device `ordinal` (device-to-device through the host for now).
    pub fn from_cpu(storage: &Storage, ordinal: usize) -> Result<Self> {
        let bytes: &[u8] = match storage {
            Storage::F32(v) => bytemuck::cast_slice(v),
            Storage::F64(v) => bytemuck::cast_slice(v),
            Storage::F16(v) => bytemuck::cast_slice(v),
            Storage::BF16(v) => bytemuck::cast_slice(v),
            Storage::Cuda(s) if s.ordinal() == ordinal => return Ok(s.clone()),
            Storage::Cuda(s) => return Self::from_cpu(&s.to_cpu()?, ordinal),
        };
        let dtype = match storage {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::F16(_) => DType::F16,
            _ => DType::BF16,
        };
        let dev = device(ordinal)?;
        guard("copy to the GPU", || {
            let out = Self::uninit(&dev, dtype, bytes.len() / dtype.size_in_bytes())?;
            if !bytes.is_empty() {
                dev.bind()?;
                // SAFETY: the destination block holds at least bytes.len() bytes (uninit sized it from
                // the same length); `bytes` stays borrowed until the synchronize below completes the copy.
                unsafe { cu::memcpy_htod_async(out.device_ptr(), bytes, dev.stream().cu_stream()) }
                    .map_err(|e| {
                        driver_error(
                            &format!("copying {} bytes to CUDA device {ordinal}", bytes.len()),
                            e,
                        )
                    })?;
                dev.synchronize()?;
            }
            Ok(out)
        })
    }

    /// Copies the elements back to host memory (waits for queued work on the device).
    pub fn to_cpu(&self) -> Result<Storage> {
        guard("copy from the GPU", || {
            let n = self.len;
            Ok(match self.dtype {
                DType::F32 => Storage::F32(self.download(vec![0f32; n])?),
                DType::F64 => Storage::F64(self.download(vec![0f64; n])?),
                DType::F16 => Storage::F16(self.download(vec![f16::ZERO; n])?),
                DType::BF16 => Storage::BF16(self.download(vec![bf16::ZERO; n])?),
            })
        })
    }

    fn download<T: bytemuck::Pod>(&self, mut host: Vec<T>) -> Result<Vec<T>> {
        let dev = self.device();
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut host);
        if bytes.is_empty() {
            return Ok(host);
        }
        dev.bind()?;
        // SAFETY: `host` has exactly len elements of the stored dtype, so bytes.len() ≤ the block;
        // it is not touched again until the synchronize below has completed the copy.
        unsafe { cu::memcpy_dtoh_async(bytes, self.device_ptr(), dev.stream().cu_stream()) }
            .map_err(|e| {
                driver_error(
                    &format!(
                        "copying {} bytes from CUDA device {}",
                        bytes.len(),
                        dev.ordinal()
                    ),
                    e,
                )
            })?;
        dev.synchronize()?;
        Ok(host)
    }
}
