//! Elementwise activations (SiLU, sigmoid), forward, dispatched by device.

use crate::backend::cpu::activation as cpu;
use crate::error::{Error, Result};
use crate::tensor::{Storage, Tensor};

/// y = x · sigmoid(x).
pub fn silu(x: &Tensor) -> Result<Tensor> {
    match x.storage() {
        Storage::F32(v) => {
            let mut out = v.clone();
            cpu::silu_inplace(&mut out);
            Tensor::from_f32(x.shape(), out)
        }
        Storage::F64(v) => Tensor::from_f64(
            x.shape(),
            v.iter().map(|&t| t / (1.0 + (-t).exp())).collect(),
        ),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => Tensor::new(
            x.shape(),
            Storage::Cuda(crate::backend::cuda::ops::silu(s)?),
        ),
        _ => Err(Error::DType(format!(
            "silu: {:?} is storage-only; convert to f32 first",
            x.dtype()
        ))),
    }
}

/// y = 1 / (1 + exp(−x)).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    match x.storage() {
        Storage::F32(v) => {
            Tensor::from_f32(x.shape(), v.iter().map(|&t| cpu::sigmoid(t)).collect())
        }
        Storage::F64(v) => Tensor::from_f64(
            x.shape(),
            v.iter().map(|&t| 1.0 / (1.0 + (-t).exp())).collect(),
        ),
        #[cfg(feature = "cuda")]
        Storage::Cuda(s) => Tensor::new(
            x.shape(),
            Storage::Cuda(crate::backend::cuda::ops::sigmoid(s)?),
        ),
        _ => Err(Error::DType(format!(
            "sigmoid: {:?} is storage-only; convert to f32 first",
            x.dtype()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_closed_form() {
        let x = Tensor::from_f64(&[5], vec![-20.0, -1.0, 0.0, 1.0, 20.0]).unwrap();
        let y32 = silu(&x.to_dtype(crate::DType::F32).unwrap()).unwrap();
        let y64 = silu(&x).unwrap();
        let e = [
            -20.0 / (1.0 + 20f64.exp()),
            -1.0 / (1.0 + 1f64.exp()),
            0.0,
            1.0 / (1.0 + (-1f64).exp()),
            20.0 / (1.0 + (-20f64).exp()),
        ];
        for i in 0..5 {
            assert!((y64.as_f64().unwrap()[i] - e[i]).abs() < 1e-15);
            assert!((y32.as_f32().unwrap()[i] as f64 - e[i]).abs() < 1e-5 * (1.0 + e[i].abs()));
        }
    }
}
