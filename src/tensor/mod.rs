//! Tensor: a shape, a dtype and storage on a device. Row-major, contiguous.

mod dtype;
pub use dtype::{DType, Device};

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Where and how the elements live.
#[derive(Debug, Clone)]
pub enum Storage {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    #[cfg(feature = "cuda")]
    Cuda(crate::backend::cuda::CudaStorage),
}

#[derive(Debug, Clone)]
pub struct Tensor {
    shape: Vec<usize>,
    storage: Storage,
}

/// True when no element is NaN or ±Inf. x − x is 0 for finite x and NaN otherwise; 16 lane-wise
/// sums vectorise (a single running sum would not: float addition is not reassociated).
#[allow(clippy::eq_op)] // x − x is the point: 0 for finite x, NaN otherwise
pub fn all_finite_f32(v: &[f32]) -> bool {
    let mut acc = [0f32; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            acc[j] += c[j] - c[j];
        }
    }
    acc.iter().all(|&a| a == 0.0) && chunks.remainder().iter().all(|x| x.is_finite())
}

pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl Tensor {
    /// Wraps `storage` with `shape`, checking the element count.
    pub fn new(shape: &[usize], storage: Storage) -> Result<Self> {
        let len = match &storage {
            Storage::F32(v) => v.len(),
            Storage::F64(v) => v.len(),
            Storage::F16(v) => v.len(),
            Storage::BF16(v) => v.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        };
        if len != numel(shape) {
            return Err(Error::Shape(format!(
                "shape {shape:?} holds {} elements but the data has {len}",
                numel(shape)
            )));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage,
        })
    }

    pub fn from_f32(shape: &[usize], data: Vec<f32>) -> Result<Self> {
        Self::new(shape, Storage::F32(data))
    }

    pub fn from_f64(shape: &[usize], data: Vec<f64>) -> Result<Self> {
        Self::new(shape, Storage::F64(data))
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Self {
        let n = numel(shape);
        let storage = match dtype {
            DType::F32 => Storage::F32(vec![0.0; n]),
            DType::F64 => Storage::F64(vec![0.0; n]),
            DType::F16 => Storage::F16(vec![f16::ZERO; n]),
            DType::BF16 => Storage::BF16(vec![bf16::ZERO; n]),
        };
        Tensor {
            shape: shape.to_vec(),
            storage,
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn into_storage(self) -> Storage {
        self.storage
    }

    pub fn dtype(&self) -> DType {
        match &self.storage {
            Storage::F32(_) => DType::F32,
            Storage::F64(_) => DType::F64,
            Storage::F16(_) => DType::F16,
            Storage::BF16(_) => DType::BF16,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.dtype(),
        }
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
            _ => Device::Cpu,
        }
    }

    /// Same elements, new shape.
    pub fn reshape(self, shape: &[usize]) -> Result<Self> {
        if numel(shape) != self.numel() {
            return Err(Error::shape_mismatch("reshape", shape, &self.shape));
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            storage: self.storage,
        })
    }

    pub fn as_f32(&self) -> Result<&[f32]> {
        match &self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::DType(format!(
                "expected a float32 CPU tensor, got {:?} on {:?}",
                self.dtype(),
                self.device()
            ))),
        }
    }

    pub fn as_f32_mut(&mut self) -> Result<&mut [f32]> {
        let (dt, dev) = (self.dtype(), self.device());
        match &mut self.storage {
            Storage::F32(v) => Ok(v),
            _ => Err(Error::DType(format!(
                "expected a float32 CPU tensor, got {dt:?} on {dev:?}"
            ))),
        }
    }

    pub fn as_f64(&self) -> Result<&[f64]> {
        match &self.storage {
            Storage::F64(v) => Ok(v),
            _ => Err(Error::DType(format!(
                "expected a float64 CPU tensor, got {:?} on {:?}",
                self.dtype(),
                self.device()
            ))),
        }
    }

    /// Converts a CPU tensor to `dtype` (f16/bf16 round to nearest even).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        let as_f64: Vec<f64> = match &self.storage {
            Storage::F32(v) => v.iter().map(|&x| x as f64).collect(),
            Storage::F64(v) => v.clone(),
            Storage::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            Storage::BF16(v) => v.iter().map(|x| x.to_f64()).collect(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => {
                return Err(Error::Unsupported(
                    "dtype conversion of a CUDA tensor: copy it to the CPU first".into(),
                ))
            }
        };
        let storage = match dtype {
            DType::F32 => Storage::F32(as_f64.iter().map(|&x| x as f32).collect()),
            DType::F64 => Storage::F64(as_f64),
            DType::F16 => Storage::F16(as_f64.iter().map(|&x| f16::from_f64(x)).collect()),
            DType::BF16 => Storage::BF16(as_f64.iter().map(|&x| bf16::from_f64(x)).collect()),
        };
        Ok(Tensor {
            shape: self.shape.clone(),
            storage,
        })
    }

    /// Copies the tensor to `device`. CUDA devices need the `cuda` feature and a driver.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        if device == self.device() {
            return Ok(self.clone());
        }
        match device {
            Device::Cpu => {
                #[cfg(feature = "cuda")]
                if let Storage::Cuda(s) = &self.storage {
                    return Ok(Tensor {
                        shape: self.shape.clone(),
                        storage: s.to_cpu()?,
                    });
                }
                Err(Error::Internal("unreachable device copy".into()))
            }
            Device::Cuda(_ordinal) => {
                #[cfg(feature = "cuda")]
                {
                    let s = crate::backend::cuda::CudaStorage::from_cpu(&self.storage, _ordinal)?;
                    Ok(Tensor {
                        shape: self.shape.clone(),
                        storage: Storage::Cuda(s),
                    })
                }
                #[cfg(not(feature = "cuda"))]
                Err(Error::NoDevice(
                    "this build of phenocore has no CUDA support (feature `cuda`)".into(),
                ))
            }
        }
    }

    /// Errors naming the first NaN/Inf element, if any.
    pub fn check_finite(&self, what: &str) -> Result<()> {
        let bad = match &self.storage {
            Storage::F32(v) if all_finite_f32(v) => None,
            Storage::F32(v) => v.iter().position(|x| !x.is_finite()),
            Storage::F64(v) => v.iter().position(|x| !x.is_finite()),
            Storage::F16(v) => v.iter().position(|x| !x.is_finite()),
            Storage::BF16(v) => v.iter().position(|x| !x.is_finite()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        };
        match bad {
            Some(i) => Err(Error::NonFinite(format!(
                "{what} has a NaN or Inf at flat index {i}"
            ))),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_checked() {
        assert!(Tensor::from_f32(&[2, 3], vec![0.0; 5]).is_err());
        let t = Tensor::from_f32(&[2, 3], vec![1.5; 6]).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(t.device(), Device::Cpu);
        assert!(t.clone().reshape(&[4]).is_err());
        assert_eq!(t.reshape(&[3, 2]).unwrap().shape(), &[3, 2]);
    }

    #[test]
    fn dtype_round_trip() {
        let t = Tensor::from_f32(&[4], vec![1.0, -2.5, 0.333_333_34, 1e4]).unwrap();
        let h = t
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let back = h.as_f32().unwrap();
        // bf16 keeps 8 significant bits: relative error ≤ 2^-8.
        for (a, b) in t.as_f32().unwrap().iter().zip(back) {
            assert!((a - b).abs() <= a.abs() * 2f32.powi(-8), "{a} vs {b}");
        }
        let f = t
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert_eq!(f.as_f64().unwrap()[1], -2.5);
    }

    #[test]
    fn non_finite_named() {
        let t = Tensor::from_f32(&[3], vec![0.0, f32::NAN, 1.0]).unwrap();
        let e = t.check_finite("crops").unwrap_err();
        assert!(e.to_string().contains("index 1"));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, 15, 16, 40, 49] {
                let mut v = vec![1e30f32; 50];
                v[at] = bad;
                assert!(!all_finite_f32(&v), "{bad} at {at}");
                let e = Tensor::from_f32(&[50], v)
                    .unwrap()
                    .check_finite("x")
                    .unwrap_err();
                assert!(e.to_string().contains(&format!("index {at}")));
            }
        }
        assert!(all_finite_f32(&[f32::MAX; 50]));
    }
}
