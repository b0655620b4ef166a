//! Shared by the EfficientNet fixture tests: reading tests/fixtures/effnet/ and comparing outputs.
#![allow(dead_code)] // each test binary uses its own subset

use phenocore::io::safetensors::{read_f32_tensors, TensorMap};
use phenocore::models::efficientnet::{EfficientNet, Padding};
use phenocore::Tensor;
use std::path::PathBuf;

pub fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/effnet")
}

/// The torchvision reference outputs (and the input) of the fixture.
pub fn expected() -> TensorMap {
    let path = fixture_dir().join("expected.safetensors");
    let bytes =
        std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    read_f32_tensors(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn get<'a>(map: &'a TensorMap, key: &str) -> &'a Tensor {
    map.get(key)
        .unwrap_or_else(|| panic!("fixture has no tensor {key:?}"))
}

/// The fixture's weights (f16 safetensors, torchvision names).
pub fn load(padding: Padding, bn_eps: f32) -> EfficientNet {
    let path = fixture_dir().join("weights_f16.safetensors");
    EfficientNet::load(&path, padding, bn_eps)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
}

pub fn values(t: &Tensor) -> &[f32] {
    t.as_f32().unwrap_or_else(|e| panic!("not f32: {e}"))
}

/// max |ours − ref| / max |ref|, after checking shapes, finiteness and a non-degenerate reference.
pub fn rel_err(what: &str, ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.shape(), reference.shape(), "{what}: shape");
    let (a, b) = (values(ours), values(reference));
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    assert!(
        scale > 1e-3,
        "{what}: reference is degenerate (max |ref| = {scale})"
    );
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!("{what}: max|ours − ref| / max|ref| = {:.2e}", err / scale);
    err / scale
}
