//! Inference forward pass (BN folded). Placeholder while the fast path is written.
use super::config::EfficientNetConfig;
use super::layers::LayerTap;
use super::weights::StateDict;
use super::Progress;
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub struct Folded;

impl Folded {
    pub fn build(_s: &StateDict, _c: &EfficientNetConfig) -> Result<Self> {
        Ok(Folded)
    }
}

pub fn run(_f: &Folded, _c: &EfficientNetConfig, _x: &Tensor, _t: &[LayerTap], _b: usize, _p: Progress) -> Result<Vec<Tensor>> {
    Err(Error::Internal("forward not yet written".into()))
}
