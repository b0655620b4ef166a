//! The [`Trainer`](super::Trainer)'s steps on a GPU: the model, its gradients, the BN statistics
//! and the optimizer state resident on the device ([`GpuEfficientNetTrainer`]), validation
//! through the inference model on the same device ([`GpuEfficientNet`]'s logits), and the state moved to and from the host's copy for checkpoints.
//!
//! The trainer holds it as a trait object, so any [`Gpu`] drives it: a CUDA device (the `cuda`
//! feature, `TrainerOptions::device`) or, in the tests, the CPU emulation of the kernels.

use super::trainer::argmax;
use crate::backend::gpu::Gpu;
use crate::error::Result;
use crate::models::efficientnet::{
    EfficientNet, GpuEfficientNet, GpuEfficientNetTrainer, GpuTrainOptions, Regularisation,
    TrainableEfficientNet,
};
use crate::optim::OptimizerState;
use crate::tensor::Tensor;
use rand_chacha::ChaCha8Rng;
use std::ops::Deref;

/// What the trainer asks of a device.
pub(crate) trait DeviceTrainer: Send {
    /// One optimizer step at `lr`: (loss, crops whose training-mode logits put their label first).
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
        reg: &Regularisation,
        rng: &mut ChaCha8Rng,
        lr: f64,
    ) -> Result<(f64, usize)>;
    /// Copies the device's parameters and running statistics into `model`; returns the
    /// optimizer state in the CPU optimizers' format.
    fn pull(&self, model: &mut TrainableEfficientNet<f32>) -> Result<OptimizerState>;
    /// Replaces the device's parameters, statistics, optimizer state and step count.
    fn push(&mut self, model: &TrainableEfficientNet<f32>, opt: &OptimizerState) -> Result<()>;
    /// Eval-mode logits [n, classes] of `net` (the inference model of the current weights) for
    /// crops (N, C, H, W), `batch` crops at a time.
    fn logits(
        &self,
        net: &EfficientNet,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        batch: usize,
    ) -> Result<Vec<f32>>;
}

/// A device handle (`D`: an owned CUDA device, or `&'static` emulation) and the trainer on it.
pub(crate) struct OnDevice<G: Gpu, D: Deref<Target = G>> {
    dev: D,
    t: GpuEfficientNetTrainer<G>,
}

impl<G: Gpu, D: Deref<Target = G>> OnDevice<G, D> {
    pub(crate) fn new(
        dev: D,
        model: &TrainableEfficientNet<f32>,
        opts: GpuTrainOptions,
    ) -> Result<Self> {
        let t = GpuEfficientNetTrainer::new(&*dev, model, opts)?;
        Ok(OnDevice { dev, t })
    }
}

impl<G, D> DeviceTrainer for OnDevice<G, D>
where
    G: Gpu,
    D: Deref<Target = G> + Send,
    GpuEfficientNetTrainer<G>: Send,
{
    fn step(
        &mut self,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
        reg: &Regularisation,
        rng: &mut ChaCha8Rng,
        lr: f64,
    ) -> Result<(f64, usize)> {
        self.t.set_lr(lr)?;
        let (loss, logits) = self
            .t
            .step_with_logits(&*self.dev, crops, n, h, w, labels, reg, rng)?;
        let k = self.t.config().num_classes;
        let correct = logits
            .chunks_exact(k)
            .zip(labels)
            .filter(|(row, &y)| argmax(row) == y as usize)
            .count();
        Ok((loss as f64, correct))
    }

    fn pull(&self, model: &mut TrainableEfficientNet<f32>) -> Result<OptimizerState> {
        *model = self.t.to_trainable(&*self.dev)?;
        self.t.optimizer_state(&*self.dev)
    }

    fn push(&mut self, model: &TrainableEfficientNet<f32>, opt: &OptimizerState) -> Result<()> {
        self.t.load_state(&*self.dev, model, opt)
    }

    fn logits(
        &self,
        net: &EfficientNet,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        batch: usize,
    ) -> Result<Vec<f32>> {
        let g = &*self.dev;
        let c = net.config().in_channels;
        let gm = GpuEfficientNet::new(g, net)?;
        let x = Tensor::from_f32(&[n, c, h, w], crops.to_vec())?;
        // Eval mode (dropout is the identity), pipelined in batches.
        let z = gm.features_batched(g, &x, "logits", batch.max(1))?;
        Ok(z.as_f32()?.to_vec())
    }
}
