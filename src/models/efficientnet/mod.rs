//! EfficientNet-B0 as REFERENCE.md §1 defines it (torchvision `efficientnet_b0` layout, any input
//! channel count, `tf_same` or `symmetric` padding), inference with BN folded into the convolutions.
//!
//! API contract used by ffi/, the CLI and the bindings:
//! - `EfficientNet::new(config, seed)`, `EfficientNet::load(path, padding, bn_eps)`,
//!   `EfficientNet::from_safetensors_bytes(bytes, padding, bn_eps)`, `.save(path)`
//! - `.features(&crops, &layers) -> Vec<Tensor>` (each (N, D)), `.logits(&crops) -> Tensor` (N, classes)
//! - `.features_with_progress(&crops, &layers, batch, &mut progress)`; progress(done, total) → false cancels
//! - `.layer_dim(name)` → D of a named layer for a given input size.

mod config;
mod forward;
mod gpu;
mod gpu_train;
mod layers;
mod train;
mod weights;

pub use config::{EfficientNetConfig, Padding, Precision, BLOCKS};
pub use gpu::{FeatureGraph, GpuEfficientNet};
pub use gpu_train::{GpuEfficientNetTrainer, GpuOptimizer, GpuTrainOptions};
pub use layers::{LayerTap, TapPoint};
pub use train::{Regularisation, TrainableEfficientNet};
pub use weights::{expand_stem_channels, StateDict};

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::path::Path;

/// Progress callback: called with (crops done, crops total); returning false cancels.
pub type Progress<'a> = &'a mut dyn FnMut(usize, usize) -> bool;

pub struct EfficientNet {
    config: EfficientNetConfig,
    /// Unfolded parameters in torchvision naming (what `save` writes).
    state: StateDict,
    /// BN-folded inference weights, built once at load.
    folded: forward::Folded,
    precision: Precision,
}

impl EfficientNet {
    /// Fresh model with torchvision's initialisation (kaiming-normal fan-out convs, uniform(±1/√out)
    /// classifier, BN γ=1 β=0, running mean 0 var 1), deterministic in `seed`.
    pub fn new(config: EfficientNetConfig, seed: u64) -> Result<Self> {
        let state = weights::init_state_dict(&config, seed);
        Self::from_state_dict(state, config.padding, config.bn_eps)
    }

    /// Builds the model from torchvision-named parameters; in-channels and classes come from the shapes.
    pub fn from_state_dict(state: StateDict, padding: Padding, bn_eps: f32) -> Result<Self> {
        let config = weights::config_from_state_dict(&state, padding, bn_eps)?;
        weights::validate(&state, &config)?;
        let folded = forward::Folded::build(&state, &config)?;
        Ok(EfficientNet {
            config,
            state,
            folded,
            precision: Precision::F32,
        })
    }

    pub fn load(path: &Path, padding: Padding, bn_eps: f32) -> Result<Self> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        Self::from_safetensors_bytes(&bytes, padding, bn_eps)
    }

    pub fn from_safetensors_bytes(bytes: &[u8], padding: Padding, bn_eps: f32) -> Result<Self> {
        let state = crate::io::safetensors::read_f32_tensors(bytes)?;
        Self::from_state_dict(state, padding, bn_eps)
    }

    /// Writes the parameters as safetensors (torchvision names, f32), atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::safetensors::write_f32_tensors(path, &self.state)
    }

    /// Selects the GEMM arithmetic (default f32). `Bf16` packs bf16 weights once and fails with
    /// `Error::Unsupported` on CPUs without AVX512_BF16 (the model then stays as it was).
    pub fn set_precision(&mut self, precision: Precision) -> Result<()> {
        let on = precision == Precision::Bf16;
        let f = &mut self.folded;
        let mut convs: Vec<&mut crate::backend::cpu::pointwise_bf16::Pointwise> =
            vec![&mut f.stem, &mut f.top];
        for b in &mut f.blocks {
            convs.extend(b.expand.as_mut());
            convs.push(&mut b.project);
        }
        if on && !crate::backend::cpu::pointwise_bf16::bf16_supported() {
            return Err(Error::Unsupported(
                "bf16 precision needs a CPU with AVX512_BF16 (e.g. Intel Sapphire Rapids or AMD Zen 4); use f32".into(),
            ));
        }
        for c in convs {
            c.set_bf16(on)?;
        }
        self.precision = precision;
        Ok(())
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn config(&self) -> &EfficientNetConfig {
        &self.config
    }

    pub fn state_dict(&self) -> &StateDict {
        &self.state
    }

    /// Feature dimension of a named layer (channels; spatial dims are mean-pooled).
    pub fn layer_dim(&self, layer: &str) -> Result<usize> {
        let tap = layers::resolve(layer)?;
        Ok(if tap.point == TapPoint::Logits {
            self.config.num_classes
        } else {
            tap.channels()
        })
    }

    /// Mean-pooled features of each requested layer: one (N, D_layer) tensor per layer, in order.
    /// `crops` is (N, C, H, W) float32.
    pub fn features(&self, crops: &Tensor, layers: &[&str]) -> Result<Vec<Tensor>> {
        self.features_with_progress(crops, layers, 0, &mut |_, _| true)
    }

    /// As `features`, in batches of `batch` crops (0 = all at once), calling `progress` after each batch.
    pub fn features_with_progress(
        &self,
        crops: &Tensor,
        layers: &[&str],
        batch: usize,
        progress: Progress,
    ) -> Result<Vec<Tensor>> {
        let taps = layers
            .iter()
            .map(|l| layers::resolve(l))
            .collect::<Result<Vec<_>>>()?;
        if taps.is_empty() {
            return Err(Error::InvalidArgument("no layer requested".into()));
        }
        forward::run(&self.folded, &self.config, crops, &taps, batch, progress)
    }

    /// Class logits (N, num_classes) for (N, C, H, W) float32 crops.
    pub fn logits(&self, crops: &Tensor) -> Result<Tensor> {
        let tap = layers::LayerTap::logits();
        let mut out = forward::run(&self.folded, &self.config, crops, &[tap], 0, &mut |_, _| {
            true
        })?;
        Ok(out.remove(0))
    }
}
