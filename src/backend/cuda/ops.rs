//! Launches of the `kernels/` entry points on `CudaStorage`; `crate::ops` calls these for CUDA tensors.

use super::nvrtc::{self, KernelModule};
use super::{driver_error, guard, CudaStorage};
use crate::error::Result;
use crate::tensor::DType;
use cudarc::driver::PushKernelArg;

/// y = x · sigmoid(x), elementwise (f16/bf16 computed in f32).
pub fn silu(x: &CudaStorage) -> Result<CudaStorage> {
    elementwise(x, &nvrtc::UNARY, "silu", &[])
}

/// y = 1 / (1 + exp(−x)), elementwise (f16/bf16 computed in f32).
pub fn sigmoid(x: &CudaStorage) -> Result<CudaStorage> {
    elementwise(x, &nvrtc::UNARY, "sigmoid", &[])
}

/// y = x · mul + add, elementwise (in f32 for f32/f16/bf16, in f64 for f64).
pub fn affine(x: &CudaStorage, mul: f64, add: f64) -> Result<CudaStorage> {
    elementwise(x, &nvrtc::AFFINE, "affine", &[mul, add])
}

/// The suffix of a dtype's entry point (`silu_f32`, `silu_bf16`, …), as `FOR_EACH_DTYPE` names them.
fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
    }
}

/// Launches `<op>_<dtype>(const T* x, T* y, u64 n, double scalars...)` built on `map_unary`.
fn elementwise(
    x: &CudaStorage,
    module: &'static KernelModule,
    op: &str,
    scalars: &[f64],
) -> Result<CudaStorage> {
    let dev = x.device();
    let entry = format!("{op}_{}", suffix(x.dtype()));
    let func = dev.function(module, &entry)?;
    guard(&entry, || {
        let y = CudaStorage::uninit(dev, x.dtype(), x.len())?;
        if x.is_empty() {
            return Ok(y);
        }
        let (xp, yp, n) = (x.device_ptr(), y.device_ptr(), x.len() as u64);
        // map_unary gives each thread one 16-byte pack per grid-stride step.
        let cfg = dev.launch_config(x.len().div_ceil(16 / x.dtype().size_in_bytes()));
        let stream = dev.stream();
        let mut args = stream.launch_builder(&func);
        args.arg(&xp).arg(&yp).arg(&n);
        for s in scalars {
            args.arg(s);
        }
        // SAFETY: the entry point's parameters are (const T*, T*, u64, then `scalars.len()` doubles)
        // — see UNARY_KERNEL / AFFINE_KERNEL — and we push exactly those. x and y each hold n
        // elements of T = x.dtype() in distinct 256-byte aligned blocks (y is fresh, so no overlap,
        // as __restrict__ requires); the grid-stride loops touch indices < n only. Both buffers
        // outlive the kernel: a dropped block is reused only by later work on this same stream.
        unsafe { args.launch(cfg) }
            .map_err(|e| driver_error(&format!("launching {entry} on {} elements", x.len()), e))?;
        Ok(y)
    })
}
