//! safetensors in and out. Reading upcasts f16 / bf16 / f64 to f32; integer tensors named
//! `*num_batches_tracked` (torch BN bookkeeping) are skipped.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::Path;

pub type TensorMap = BTreeMap<String, Tensor>;

pub fn read_f32_tensors(bytes: &[u8]) -> Result<TensorMap> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Format(format!("not a valid safetensors file: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        if name.ends_with("num_batches_tracked") {
            continue;
        }
        let raw = view.data();
        let data: Vec<f32> = match view.dtype() {
            Dtype::F32 => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F64 => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])) as f32)
                .collect(),
            Dtype::F16 => raw
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => raw
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::DType(format!(
                    "tensor {name:?} has dtype {other:?}; expected a float type"
                )))
            }
        };
        let t = Tensor::from_f32(view.shape(), data)
            .map_err(|e| Error::Format(format!("tensor {name:?}: {e}")))?;
        out.insert(name, t);
    }
    Ok(out)
}

/// Serialises f32 CPU tensors to safetensors bytes.
pub fn to_bytes(tensors: &TensorMap) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let data = t
            .as_f32()
            .map_err(|e| Error::DType(format!("tensor {name:?}: {e}")))?;
        views.push((
            name.clone(),
            t.shape().to_vec(),
            bytemuck::cast_slice::<f32, u8>(data),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = views
        .iter()
        .map(|(n, s, d)| {
            safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), d)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {n:?}: {e}")))
        })
        .collect::<Result<_>>()?;
    safetensors::serialize(views, &None)
        .map_err(|e| Error::Internal(format!("serialise safetensors: {e}")))
}

/// Writes the tensors to `path` atomically (temp file in the same folder, then rename).
pub fn write_f32_tensors(path: &Path, tensors: &TensorMap) -> Result<()> {
    let bytes = to_bytes(tensors)?;
    crate::io::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_garbage() {
        let mut m = TensorMap::new();
        m.insert(
            "a.weight".into(),
            Tensor::from_f32(&[2, 3], (0..6).map(|i| i as f32 * 0.5).collect()).unwrap(),
        );
        m.insert("b".into(), Tensor::from_f32(&[1], vec![-3.0]).unwrap());
        let bytes = to_bytes(&m).unwrap();
        let back = read_f32_tensors(&bytes).unwrap();
        assert_eq!(
            back["a.weight"].as_f32().unwrap(),
            m["a.weight"].as_f32().unwrap()
        );
        assert_eq!(back["a.weight"].shape(), &[2, 3]);
        assert!(matches!(
            read_f32_tensors(b"garbage"),
            Err(Error::Format(_))
        ));
        assert!(matches!(
            read_f32_tensors(&bytes[..bytes.len() - 3]),
            Err(Error::Format(_))
        ));
    }
}
