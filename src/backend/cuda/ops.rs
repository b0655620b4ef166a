//! Typed, checked launches on `CudaStorage`; `crate::ops` calls these for CUDA tensors. The launch
//! geometry and kernels are `backend::gpu`'s, shared with the tests' CPU emulation.

use super::CudaStorage;
use crate::backend::gpu::elementwise::{self as ew, Unary};
use crate::error::Result;

/// y = x · sigmoid(x), elementwise (f16/bf16 computed in f32).
pub fn silu(x: &CudaStorage) -> Result<CudaStorage> {
    unary(x, Unary::Silu)
}

/// y = 1 / (1 + exp(−x)), elementwise (f16/bf16 computed in f32).
pub fn sigmoid(x: &CudaStorage) -> Result<CudaStorage> {
    unary(x, Unary::Sigmoid)
}

/// y = x · mul + add, elementwise (in f32 for f32/f16/bf16, in f64 for f64).
pub fn affine(x: &CudaStorage, mul: f64, add: f64) -> Result<CudaStorage> {
    let dev = x.device();
    let y = CudaStorage::uninit(dev, x.dtype(), x.len())?;
    // SAFETY: x and y each hold x.len() elements of x.dtype(); y is a fresh block (no overlap).
    unsafe {
        ew::affine(
            dev,
            x.dtype(),
            x.device_ptr(),
            y.device_ptr(),
            x.len(),
            mul,
            add,
        )?
    };
    Ok(y)
}

fn unary(x: &CudaStorage, op: Unary) -> Result<CudaStorage> {
    let dev = x.device();
    let y = CudaStorage::uninit(dev, x.dtype(), x.len())?;
    // SAFETY: as in `affine`.
    unsafe { ew::unary(dev, op, x.dtype(), x.device_ptr(), y.device_ptr(), x.len())? };
    Ok(y)
}
