//! The training loop of the Cell Painting CNN (REFERENCE §2): one step on a pushed batch, or `fit`
//! over an in-memory dataset with class-balanced epochs, augmentation on worker threads with
//! prefetch, validation after every epoch, best-model export and atomic, resumable checkpoints.

use super::augment::Augmentation;
use super::device::{DeviceTrainer, OnDevice};
use super::domain::{DomainAdversarial, DomainHead};
use super::mil::{mil_epoch, Bag, MilHead, MilOptions};
use super::prefetch::{batch_rng, epoch_rng, Prefetcher};
use super::sampler::{balanced_epoch, batches};
use super::validation::{evaluate, ClassReport};
use crate::autograd::{ParamKind, Tape};
use crate::backend::gpu::Gpu;
use crate::error::{Error, Result};
use crate::models::efficientnet::GpuEfficientNetTrainer;
use crate::models::efficientnet::{EfficientNet, Regularisation, TrainableEfficientNet};
use crate::ops::loss::softmax_cross_entropy;
use crate::optim::{
    clip_grad_norm, AdamW, AdamWOptions, LrSchedule, Optimizer, ParamView, Schedule, Sgd,
    SgdOptions,
};
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::Arc;

/// The arithmetic of a training step on a GPU (the CPU trains in f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compute {
    /// f32 storage and IEEE f32 GEMMs.
    #[default]
    F32,
    /// f32 storage, GEMMs on TF32 tensor cores.
    Tf32,
    /// bf16 mixed precision as torch's autocast trains (f32 master weights and optimizer state).
    Bf16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptimizerKind {
    Sgd,
    AdamW,
}

/// Which parameters weight decay applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayScope {
    /// Every parameter (torch.optim with one param group — what `weight_decay=` does in PyTorch).
    All,
    /// Convolution and linear kernels only (REFERENCE §2: "L2 1e-5 on kernels", Keras regularisers).
    Kernels,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainerOptions {
    pub optimizer: OptimizerKind,
    /// Base learning rate (REFERENCE §2: 0.005).
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    pub weight_decay: f64,
    pub decay_scope: DecayScope,
    /// AdamW betas / eps.
    pub betas: (f64, f64),
    pub eps: f64,
    pub label_smoothing: f64,
    /// Online label smoothing (Zhang et al. 2021; REFERENCE §2 alternatives): None = off.
    pub online_label_smoothing: Option<OnlineLabelSmoothing>,
    pub regularisation: Regularisation,
    /// Learning rate as a function of the epoch (`fit`) — `lr` is its base.
    pub schedule: Schedule,
    pub warmup_epochs: u64,
    /// Gradient clipping by total 2-norm (None = off).
    pub clip_grad_norm: Option<f64>,
    /// Augmentation in `fit` (and in `step` when `augment_in_step`).
    pub augmentation: Augmentation,
    pub augment_in_step: bool,
    pub batch_size: usize,
    pub epochs: u64,
    pub seed: u64,
    /// Worker threads decoding / augmenting batches in `fit`, and batches prepared ahead.
    pub workers: usize,
    pub prefetch: usize,
    /// Domain-adversarial branch with a gradient reversal layer, plates as domains (CP-CNN paper
    /// Methods; `super::domain`): None = off. Steps then need each crop's domain label
    /// ([`Trainer::step_with_domains`], [`Dataset::with_domains`]).
    pub domain_adversarial: Option<DomainAdversarial>,
    /// Attention-MIL bags (CP-CNN paper Methods; `super::mil`): None = off. `fit` then trains on
    /// bags (`batch_size` counts bags) and [`Trainer::step_bags`] takes bags.
    pub mil: Option<MilOptions>,
    /// None (default): train on the CPU. Some(ordinal): train on that CUDA device (the `cuda`
    /// feature): parameters, gradients, BN statistics and the optimizer state stay there, the
    /// host keeps a copy refreshed when it is read (`model`, `predict`, checkpoints). Online label
    /// smoothing, the domain-adversarial branch and MIL are CPU-only.
    pub device: Option<usize>,
    /// The arithmetic of the device's steps; anything but `F32` needs a device.
    pub compute: Compute,
}

impl Default for TrainerOptions {
    /// REFERENCE §2: SGD lr 0.005, momentum 0.9, Nesterov, weight decay 1e-5, batch 32, 30 epochs,
    /// dropout 0.2, drop-connect 0.2, the §2 augmentations.
    fn default() -> Self {
        TrainerOptions {
            optimizer: OptimizerKind::Sgd,
            lr: 0.005,
            momentum: 0.9,
            nesterov: true,
            weight_decay: 1e-5,
            decay_scope: DecayScope::All,
            betas: (0.9, 0.999),
            eps: 1e-8,
            label_smoothing: 0.0,
            online_label_smoothing: None,
            regularisation: Regularisation::default(),
            schedule: Schedule::Constant,
            warmup_epochs: 0,
            clip_grad_norm: None,
            augmentation: Augmentation::default(),
            augment_in_step: false,
            batch_size: 32,
            epochs: 30,
            seed: 0,
            workers: 1,
            prefetch: 2,
            domain_adversarial: None,
            mil: None,
            device: None,
            compute: Compute::F32,
        }
    }
}

/// Online label smoothing: the target of a crop of class y is α·hard(y) + (1 − α)·S[y], where
/// hard(y) is the (label-smoothed, `label_smoothing`) one-hot target and S[y] the mean predicted
/// distribution of the correctly classified crops of class y in the previous epoch (`fit`), starting
/// from 1 − `smoothing` on y and `smoothing` / (K − 1) elsewhere.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OnlineLabelSmoothing {
    pub alpha: f64,
    pub smoothing: f64,
}

impl Default for OnlineLabelSmoothing {
    /// REFERENCE §2: α = 0.03, smoothing 0.1.
    fn default() -> Self {
        OnlineLabelSmoothing {
            alpha: 0.03,
            smoothing: 0.1,
        }
    }
}

/// The soft-label statistics of online label smoothing.
#[derive(Clone, Debug, PartialEq)]
pub(super) struct OlsState {
    pub k: usize,
    /// Row y: the soft target of class y used now.
    pub supervise: Vec<f64>,
    /// Row y: Σ softmax of this epoch's correctly classified crops of class y.
    pub update: Vec<f64>,
    pub count: Vec<f64>,
}

impl OlsState {
    fn new(k: usize, smoothing: f64) -> Self {
        let mut supervise = vec![
            if k > 1 {
                smoothing / (k - 1) as f64
            } else {
                0.0
            };
            k * k
        ];
        for y in 0..k {
            supervise[y * k + y] = if k > 1 { 1.0 - smoothing } else { 1.0 };
        }
        OlsState {
            k,
            supervise,
            update: vec![0.0; k * k],
            count: vec![0.0; k],
        }
    }
    /// Ends an epoch: classes seen correctly classified take their mean prediction.
    pub fn end_epoch(&mut self) {
        let k = self.k;
        for y in 0..k {
            if self.count[y] > 0.0 {
                for j in 0..k {
                    self.supervise[y * k + j] = self.update[y * k + j] / self.count[y];
                }
            }
        }
        self.update.iter_mut().for_each(|v| *v = 0.0);
        self.count.iter_mut().for_each(|v| *v = 0.0);
    }
}

impl TrainerOptions {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if let Some(o) = &self.online_label_smoothing {
            if !(0.0..=1.0).contains(&o.alpha) || !(0.0..=1.0).contains(&o.smoothing) {
                return bad(format!(
                    "online label smoothing alpha and smoothing must be in [0, 1], got {} and {}",
                    o.alpha, o.smoothing
                ));
            }
        }
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("lr must be a finite number ≥ 0, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.label_smoothing) {
            return bad(format!(
                "label_smoothing must be in [0, 1], got {}",
                self.label_smoothing
            ));
        }
        let r = &self.regularisation;
        for (name, p) in [
            ("dropout", r.dropout),
            ("drop_connect_rate", r.drop_connect_rate),
            ("bn_momentum", r.bn_momentum),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1], got {p}"));
            }
        }
        if self.batch_size == 0 {
            return bad("batch_size must be positive".into());
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("clip_grad_norm must be positive, got {c}"));
            }
        }
        self.augmentation.validate()?;
        if let Some(d) = &self.domain_adversarial {
            d.validate()?;
        }
        if let Some(m) = &self.mil {
            m.validate(None)?;
        }
        self.lr_schedule().validate()
    }

    pub fn lr_schedule(&self) -> LrSchedule {
        LrSchedule {
            base_lr: self.lr,
            schedule: self.schedule.clone(),
            warmup_steps: self.warmup_epochs,
            warmup_start_factor: if self.warmup_epochs > 0 { 0.1 } else { 1.0 },
        }
    }

    fn build_optimizer(&self) -> Result<Box<dyn Optimizer>> {
        Ok(match self.optimizer {
            OptimizerKind::Sgd => Box::new(Sgd::new(SgdOptions {
                momentum: self.momentum,
                nesterov: self.nesterov,
                weight_decay: self.weight_decay,
                ..Default::default()
            })?),
            OptimizerKind::AdamW => Box::new(AdamW::new(AdamWOptions {
                betas: self.betas,
                eps: self.eps,
                weight_decay: self.weight_decay,
                amsgrad: false,
            })?),
        })
    }
}

/// Crops in memory: `data` (N, C, H, W) f32 row-major, one label per crop.
pub struct Dataset {
    pub data: Arc<Vec<f32>>,
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub labels: Vec<u32>,
    /// Domain label (plate index) of every crop, for the domain-adversarial branch.
    pub domains: Option<Vec<u32>>,
}

impl Dataset {
    pub fn new(data: Vec<f32>, c: usize, h: usize, w: usize, labels: Vec<u32>) -> Result<Self> {
        let per = c * h * w;
        if per == 0 || data.len() % per != 0 || data.len() / per != labels.len() {
            return Err(Error::Shape(format!(
                "dataset: {} values and {} labels do not make crops of {c} × {h} × {w}",
                data.len(),
                labels.len()
            )));
        }
        Ok(Dataset {
            n: labels.len(),
            data: Arc::new(data),
            c,
            h,
            w,
            labels,
            domains: None,
        })
    }

    /// Attaches one domain label (plate index, 0..domains) per crop.
    pub fn with_domains(mut self, domains: Vec<u32>) -> Result<Self> {
        if domains.len() != self.n {
            return Err(Error::Shape(format!(
                "dataset: {} domain labels for {} crops",
                domains.len(),
                self.n
            )));
        }
        self.domains = Some(domains);
        Ok(self)
    }

    /// Crop `i`: its C × H × W values.
    pub fn crop(&self, i: usize) -> &[f32] {
        let per = self.c * self.h * self.w;
        &self.data[i * per..(i + 1) * per]
    }
}

/// What `fit` reports per epoch.
#[derive(Clone, Debug)]
pub struct EpochReport {
    pub epoch: u64,
    pub lr: f64,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub steps: u64,
    pub validation: Option<ClassReport>,
}

/// Progress events of `fit`; the callback returns false to cancel.
pub enum Event<'a> {
    Step {
        epoch: u64,
        step: u64,
        steps_in_epoch: u64,
        loss: f64,
    },
    Epoch(&'a EpochReport),
}

pub struct Trainer {
    model: TrainableEfficientNet<f32>,
    opt: Box<dyn Optimizer>,
    opts: TrainerOptions,
    /// Optimiser steps taken.
    step: u64,
    /// Completed epochs of `fit`.
    epoch: u64,
    /// Randomness of `step` (dropout, drop-connect, augmentation when asked).
    rng: ChaCha8Rng,
    best: Option<(f64, u64)>,
    pub(super) ols: Option<OlsState>,
    domain_head: Option<DomainHead>,
    mil_head: Option<MilHead>,
    /// Training progress in [0, 1] of the current `fit` step (Ganin's λ schedule).
    progress: Option<f64>,
    /// (treatment loss, domain loss) of the last step.
    last_losses: (f64, Option<f64>),
    /// The steps' device (`TrainerOptions::device`, or [`Trainer::with_device`]): it holds the
    /// current weights and optimizer state; `model` and `opt` are the host's copy.
    device: Option<Box<dyn DeviceTrainer>>,
    /// The host copy is older than the device's state.
    stale: bool,
}

impl Trainer {
    /// A trainer of `model`. With `domain_adversarial` / `mil` set, their heads (`domain_head.*`,
    /// `mil_attention.*`) are added to the model's parameters, drawn from `opts.seed`.
    ///
    /// With `opts.device` set, the steps run on that CUDA device (an error without the `cuda`
    /// feature, `Error::NoDevice` without a usable GPU).
    pub fn new(model: TrainableEfficientNet<f32>, opts: TrainerOptions) -> Result<Self> {
        match opts.device {
            None => {
                if opts.compute != Compute::F32 {
                    return Err(Error::InvalidArgument(format!(
                        "compute {:?} runs on a GPU: set device (the CPU trains in f32)",
                        opts.compute
                    )));
                }
                Self::host(model, opts)
            }
            #[cfg(feature = "cuda")]
            Some(ordinal) => {
                let dev = crate::backend::cuda::device(ordinal)?;
                Self::with_device(model, opts, Box::new(dev))
            }
            #[cfg(not(feature = "cuda"))]
            Some(ordinal) => {
                opts.validate()?;
                Err(Error::Unsupported(format!(
                    "device {ordinal}: this phenocore was built without the `cuda` feature; \
                     train on the CPU (no device)"
                )))
            }
        }
    }

    /// A trainer whose steps run on `dev` (a [`Gpu`] handle: a CUDA device, or any other
    /// implementation), whatever `opts.device` says; `opts.compute` sets the arithmetic. The
    /// model, its gradients, BN statistics and the optimizer state live on the device; validation
    /// runs the inference model there. Online label smoothing, the domain-adversarial branch and
    /// MIL are refused (`Error::Unsupported`).
    pub fn with_device<G, D>(
        model: TrainableEfficientNet<f32>,
        opts: TrainerOptions,
        dev: D,
    ) -> Result<Self>
    where
        G: Gpu + 'static,
        D: std::ops::Deref<Target = G> + Send + 'static,
        GpuEfficientNetTrainer<G>: Send,
    {
        opts.validate()?;
        let gopts = crate::models::efficientnet::GpuTrainOptions::from_trainer(&opts)?;
        let mut t = Self::host(model, opts)?;
        t.device = Some(Box::new(OnDevice::new(dev, &t.model, gopts)?));
        Ok(t)
    }

    /// The CPU trainer (and the host half of a device's).
    fn host(mut model: TrainableEfficientNet<f32>, opts: TrainerOptions) -> Result<Self> {
        opts.validate()?;
        let domain_head = opts
            .domain_adversarial
            .as_ref()
            .map(|d| DomainHead::attach(&mut model, d, opts.seed))
            .transpose()?;
        let mil_head = opts
            .mil
            .as_ref()
            .map(|m| MilHead::attach(&mut model, m, opts.seed))
            .transpose()?;
        let opt = opts.build_optimizer()?;
        let rng = epoch_rng(opts.seed, u64::MAX);
        let ols = opts
            .online_label_smoothing
            .map(|o| OlsState::new(model.config().num_classes, o.smoothing));
        Ok(Trainer {
            ols,
            model,
            opt,
            opts,
            step: 0,
            epoch: 0,
            rng,
            best: None,
            domain_head,
            mil_head,
            progress: None,
            last_losses: (f64::NAN, None),
            device: None,
            stale: false,
        })
    }

    /// Whether the steps run on a device.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// Brings the host's copy of the model and optimizer state up to the device's (nothing to do
    /// on the CPU). Reading the model, predicting and checkpoints do it themselves.
    pub fn sync(&mut self) -> Result<()> {
        if !self.stale {
            return Ok(());
        }
        if let Some(d) = &self.device {
            let state = d.pull(&mut self.model)?;
            let mut opt = self.opts.build_optimizer()?;
            opt.load_state(&state)?;
            self.opt = opt;
        }
        self.stale = false;
        Ok(())
    }

    /// (treatment loss, domain loss when the domain branch ran) of the last successful step.
    pub fn last_losses(&self) -> (f64, Option<f64>) {
        self.last_losses
    }

    pub fn options(&self) -> &TrainerOptions {
        &self.opts
    }
    /// The model with the current weights (on a device: copied back first).
    pub fn model(&mut self) -> Result<&TrainableEfficientNet<f32>> {
        self.sync()?;
        Ok(&self.model)
    }

    /// The model's configuration.
    pub fn config(&self) -> &crate::models::efficientnet::EfficientNetConfig {
        self.model.config()
    }
    pub fn steps(&self) -> u64 {
        self.step
    }
    pub fn epochs_done(&self) -> u64 {
        self.epoch
    }
    /// The inference model (BN folded) with the current weights.
    pub fn inference_model(&mut self) -> Result<EfficientNet> {
        self.sync()?;
        self.model.to_inference()
    }

    fn check_labels(&self, labels: &[u32]) -> Result<()> {
        let k = self.model.config().num_classes;
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            return Err(Error::InvalidArgument(format!(
                "label {l} of crop {i} is out of range: the model has {k} classes (0..{})",
                k - 1
            )));
        }
        Ok(())
    }

    /// One optimiser step on a batch (N, C, H, W) with BN in training mode; returns the loss.
    /// Augments only when `augment_in_step`. A non-finite loss or gradient stops with
    /// `Error::NonFinite` naming the step, and leaves the weights unchanged.
    pub fn step(
        &mut self,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
    ) -> Result<f64> {
        if self.domain_head.is_some() {
            return Err(Error::InvalidArgument(
                "domain_adversarial is set: pass every crop's domain (plate) label with step_with_domains".into(),
            ));
        }
        if self.mil_head.is_some() {
            return Err(Error::InvalidArgument(
                "mil is set: pass bags of crops with step_bags".into(),
            ));
        }
        self.check_labels(labels)?;
        if labels.len() != n {
            return Err(Error::Shape(format!(
                "{} labels for {n} crops",
                labels.len()
            )));
        }
        let lr = self.opts.lr_schedule().lr_at(self.epoch);
        match self.augment_for_step(crops, n, h, w)? {
            Some(batch) => self.step_at(&batch, n, h, w, labels, lr).map(|(l, _)| l),
            None => self.step_at(crops, n, h, w, labels, lr).map(|(l, _)| l),
        }
    }

    /// The augmented copy of a pushed batch when `augment_in_step` asks for one.
    fn augment_for_step(
        &mut self,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Result<Option<Vec<f32>>> {
        if !(self.opts.augment_in_step && self.opts.augmentation != Augmentation::none()) {
            return Ok(None);
        }
        let c = self.model.config().in_channels;
        if crops.len() != n * c * h * w {
            return Err(Error::Shape(format!(
                "crops must be (N, {c}, H, W): got {} values for N={n}, H={h}, W={w}",
                crops.len()
            )));
        }
        let mut batch = crops.to_vec();
        let mut scratch = Vec::new();
        let mut rng = std::mem::replace(&mut self.rng, epoch_rng(0, 0));
        let r =
            self.opts
                .augmentation
                .augment_batch(&mut batch, n, c, h, w, &mut rng, &mut scratch);
        self.rng = rng;
        r?;
        Ok(Some(batch))
    }

    /// [`Trainer::step`] with the domain-adversarial branch: `domains` holds each crop's domain
    /// (plate) label, 0..`domain_adversarial.domains`. The loss returned is the total
    /// (treatment CE + weight · domain CE); [`Trainer::last_losses`] has both parts.
    #[allow(clippy::too_many_arguments)]
    pub fn step_with_domains(
        &mut self,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
        domains: &[u32],
    ) -> Result<f64> {
        let Some(d) = &self.opts.domain_adversarial else {
            return Err(Error::InvalidArgument(
                "step_with_domains: domain_adversarial is not set in the trainer options".into(),
            ));
        };
        if self.mil_head.is_some() {
            return Err(Error::InvalidArgument(
                "mil is set: pass bags of crops (and their domains) with step_bags".into(),
            ));
        }
        if labels.len() != n || domains.len() != n {
            return Err(Error::Shape(format!(
                "{} labels and {} domain labels for {n} crops",
                labels.len(),
                domains.len()
            )));
        }
        d.check_labels(domains)?;
        self.check_labels(labels)?;
        let lr = self.opts.lr_schedule().lr_at(self.epoch);
        match self.augment_for_step(crops, n, h, w)? {
            Some(batch) => self.step_core(&batch, n, h, w, labels, Some(domains), lr),
            None => self.step_core(crops, n, h, w, labels, Some(domains), lr),
        }
        .map(|(l, _)| l)
    }

    /// One step on `n_bags` attention-MIL bags: `crops` holds n_bags · bag_size crops (N, C, H, W),
    /// bag after bag; `bag_labels` one label per bag; `domains` (required exactly when
    /// `domain_adversarial` is set) one domain label per crop. Returns the loss.
    #[allow(clippy::too_many_arguments)]
    pub fn step_bags(
        &mut self,
        crops: &[f32],
        n_bags: usize,
        h: usize,
        w: usize,
        bag_labels: &[u32],
        domains: Option<&[u32]>,
    ) -> Result<f64> {
        let Some(m) = &self.mil_head else {
            return Err(Error::InvalidArgument(
                "step_bags: mil is not set in the trainer options".into(),
            ));
        };
        let n = n_bags * m.bag_size;
        if bag_labels.len() != n_bags {
            return Err(Error::Shape(format!(
                "{} bag labels for {n_bags} bags",
                bag_labels.len()
            )));
        }
        match (&self.opts.domain_adversarial, domains) {
            (Some(d), Some(ds)) => {
                if ds.len() != n {
                    return Err(Error::Shape(format!(
                        "{} domain labels for {n} crops ({n_bags} bags of {})",
                        ds.len(),
                        m.bag_size
                    )));
                }
                d.check_labels(ds)?;
            }
            (Some(_), None) => {
                return Err(Error::InvalidArgument(
                    "domain_adversarial is set: step_bags needs every crop's domain label".into(),
                ))
            }
            (None, Some(_)) => {
                return Err(Error::InvalidArgument(
                    "step_bags: domain labels given but domain_adversarial is not set".into(),
                ))
            }
            (None, None) => {}
        }
        self.check_labels(bag_labels)?;
        let lr = self.opts.lr_schedule().lr_at(self.epoch);
        match self.augment_for_step(crops, n, h, w)? {
            Some(batch) => self.step_core(&batch, n, h, w, bag_labels, domains, lr),
            None => self.step_core(crops, n, h, w, bag_labels, domains, lr),
        }
        .map(|(l, _)| l)
    }

    /// λ of the gradient reversal layer now.
    fn grl_lambda(&self) -> f64 {
        let p = self
            .progress
            .unwrap_or(self.epoch as f64 / self.opts.epochs.max(1) as f64);
        self.opts
            .domain_adversarial
            .as_ref()
            .map_or(0.0, |d| d.lambda.at(p))
    }

    /// Forward + backward + update; returns (loss, correct top-1 predictions).
    fn step_at(
        &mut self,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
        lr: f64,
    ) -> Result<(f64, usize)> {
        self.step_core(crops, n, h, w, labels, None, lr)
    }

    /// [`Self::step_at`] with the optional heads: the domain branch when `domains` is given, bags
    /// (`labels` one per bag) when MIL is set.
    #[allow(clippy::too_many_arguments)]
    fn step_core(
        &mut self,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
        domains: Option<&[u32]>,
        lr: f64,
    ) -> Result<(f64, usize)> {
        if let Some(d) = &mut self.device {
            // Heads and online label smoothing are refused when the device is attached.
            if domains.is_some() || self.mil_head.is_some() || self.ols.is_some() {
                return Err(Error::Internal(
                    "a device step with a CPU-only training option".into(),
                ));
            }
            let reg = self.opts.regularisation;
            self.stale = true;
            let (l, ok) = d.step(crops, n, h, w, labels, &reg, &mut self.rng, lr)?;
            self.step += 1;
            self.last_losses = (l, None);
            return Ok((l, ok));
        }
        let step_no = self.step + 1;
        let ols_before = self.ols.clone();
        let params = self.model.params_mut();
        params.zero_grad();
        let snapshot_buffers: Vec<(usize, Vec<f32>)> = (0..params.len())
            .filter(|&i| params.kind(i) == ParamKind::Buffer)
            .map(|i| (i, params.value(i).to_vec()))
            .collect();
        let mut tape = Tape::<f32>::new(true);
        let reg = self.opts.regularisation;
        let (logits, domain_loss) = if domains.is_none() && self.mil_head.is_none() {
            let logits = self
                .model
                .forward(&mut tape, crops, n, h, w, &reg, &mut self.rng)?;
            (logits, None)
        } else {
            let pooled =
                self.model
                    .forward_features(&mut tape, crops, n, h, w, &reg, &mut self.rng)?;
            let lambda = self.grl_lambda();
            let domain_loss = match (domains, &self.domain_head) {
                (Some(d), Some(head)) => {
                    let z = head.forward(&mut tape, &self.model, &pooled, lambda)?;
                    Some(softmax_cross_entropy(&mut tape, &z, d, 0.0)?)
                }
                (Some(_), None) => {
                    return Err(Error::Internal(
                        "domain labels without a domain head".into(),
                    ))
                }
                _ => None,
            };
            let features = match &self.mil_head {
                Some(m) => m.pool(&mut tape, &self.model, &pooled)?,
                None => pooled,
            };
            let logits = self
                .model
                .classify(&mut tape, &features, &reg, &mut self.rng)?;
            (logits, domain_loss)
        };
        let k = self.model.config().num_classes;
        if tape.data(&logits).len() != labels.len() * k {
            return Err(Error::Shape(format!(
                "{} labels for {} rows of logits",
                labels.len(),
                tape.data(&logits).len() / k
            )));
        }
        let correct = tape
            .data(&logits)
            .chunks_exact(k)
            .zip(labels)
            .filter(|(row, &y)| argmax(row) == y as usize)
            .count();
        let loss = match (&mut self.ols, self.opts.online_label_smoothing) {
            (Some(st), Some(o)) => {
                // Target α·hard + (1 − α)·S[y]; correct predictions feed next epoch's S.
                let eps = self.opts.label_smoothing;
                let z = tape.data(&logits);
                let mut q = vec![0f64; labels.len() * k];
                for (i, &y) in labels.iter().enumerate() {
                    let y = y as usize;
                    for j in 0..k {
                        let hard = if j == y { 1.0 - eps } else { 0.0 } + eps / k as f64;
                        q[i * k + j] = o.alpha * hard + (1.0 - o.alpha) * st.supervise[y * k + j];
                    }
                    let row = &z[i * k..(i + 1) * k];
                    if argmax(row) == y {
                        let mx = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
                        let e: Vec<f64> = row.iter().map(|&v| (v as f64 - mx).exp()).collect();
                        let se: f64 = e.iter().sum();
                        for j in 0..k {
                            st.update[y * k + j] += e[j] / se;
                        }
                        st.count[y] += 1.0;
                    }
                }
                crate::ops::loss::soft_target_cross_entropy(&mut tape, &logits, q)?
            }
            _ => softmax_cross_entropy(&mut tape, &logits, labels, self.opts.label_smoothing)?,
        };
        let class_lv = tape.data(&loss)[0] as f64;
        let (loss, domain_lv) = match &domain_loss {
            Some(dl) => {
                let weight = self
                    .opts
                    .domain_adversarial
                    .as_ref()
                    .map_or(0.0, |d| d.weight);
                let dv = tape.data(dl)[0] as f64;
                (
                    crate::ops::adversarial::add_scaled(&mut tape, &loss, dl, weight)?,
                    Some(dv),
                )
            }
            None => (loss, None),
        };
        let lv = tape.data(&loss)[0] as f64;
        let restore = |model: &mut TrainableEfficientNet<f32>| {
            let p = model.params_mut();
            for (i, v) in &snapshot_buffers {
                p.value_mut(*i).copy_from_slice(v);
            }
        };
        if !lv.is_finite() {
            drop(tape);
            restore(&mut self.model);
            self.ols = ols_before;
            return Err(Error::NonFinite(format!(
                "loss is {lv} at step {step_no}; the step was not applied (weights and BN statistics unchanged)"
            )));
        }
        tape.backward(&loss, self.model.params_mut())?;
        let params = self.model.params_mut();
        if let Some(max_norm) = self.opts.clip_grad_norm {
            let mut grads = params.grads_mut();
            clip_grad_norm(&mut grads, max_norm, 2.0, false)?;
        }
        let bad = (0..params.len())
            .filter(|&i| params.trainable(i))
            .find(|&i| params.grad(i).iter().any(|g| !g.is_finite()));
        if let Some(i) = bad {
            let name = params.name(i).to_string();
            restore(&mut self.model);
            self.ols = ols_before;
            return Err(Error::NonFinite(format!(
                "gradient of {name:?} is not finite at step {step_no}; the step was not applied"
            )));
        }
        let scope = self.opts.decay_scope;
        let mut views: Vec<ParamView> = params
            .trainable_mut()
            .into_iter()
            .map(|(name, kind, value, grad)| ParamView {
                name,
                value: value.as_mut_slice(),
                grad,
                weight_decay: scope == DecayScope::All || kind == ParamKind::Weight,
            })
            .collect();
        self.opt.step(&mut views, lr)?;
        self.step += 1;
        self.last_losses = (class_lv, domain_lv);
        Ok((lv, correct))
    }

    /// Logits of `crops` with BN in eval mode (running statistics), in batches.
    pub fn predict(&mut self, crops: &[f32], n: usize, h: usize, w: usize) -> Result<Vec<f32>> {
        let c = self.model.config().in_channels;
        let k = self.model.config().num_classes;
        let per = c * h * w;
        if crops.len() != n * per {
            return Err(Error::Shape(format!(
                "{} values are not {n} crops of {c} × {h} × {w}",
                crops.len()
            )));
        }
        let bs = self.opts.batch_size.max(1) * 2;
        if self.device.is_some() && n > 0 {
            self.sync()?;
            let net = self.model.to_inference()?;
            if let Some(d) = &self.device {
                return d.logits(&net, crops, n, h, w, bs);
            }
        }
        let mut out = Vec::with_capacity(n * k);
        let reg = self.opts.regularisation;
        let mut rng = epoch_rng(0, 0);
        for start in (0..n).step_by(bs) {
            let m = bs.min(n - start);
            let mut tape = Tape::<f32>::new(false);
            let logits = self.model.forward(
                &mut tape,
                &crops[start * per..(start + m) * per],
                m,
                h,
                w,
                &reg,
                &mut rng,
            )?;
            out.extend_from_slice(tape.data(&logits));
        }
        Ok(out)
    }

    /// Validation metrics (per class and macro precision / recall / F1, accuracy, top-1 and top-5).
    pub fn evaluate(&mut self, data: &Dataset, indices: &[usize]) -> Result<ClassReport> {
        let per = data.c * data.h * data.w;
        let mut crops = Vec::with_capacity(indices.len() * per);
        for &i in indices {
            crops.extend_from_slice(data.crop(i));
        }
        let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
        let logits = self.predict(&crops, indices.len(), data.h, data.w)?;
        let k = self.model.config().num_classes;
        let ks: Vec<usize> = [1, 5].into_iter().filter(|&t| t <= k).collect();
        evaluate(&logits, indices.len(), k, &labels, &ks)
    }

    /// Trains for the remaining epochs (`opts.epochs − epochs done`) on `train` indices of `data`
    /// with class-balanced epochs, augmented on worker threads, validating on `val` after every
    /// epoch. When `checkpoint` is given, the state is saved there (atomically) after every epoch
    /// and the best model by validation accuracy (or training loss without validation) is written
    /// to `best` as plain torchvision-named weights. `progress` returning false cancels: the
    /// last checkpoint stays valid and `Error::Cancelled` is returned.
    pub fn fit(
        &mut self,
        data: &Dataset,
        train: &[usize],
        val: &[usize],
        checkpoint: Option<&Path>,
        best: Option<&Path>,
        progress: &mut dyn FnMut(Event) -> bool,
    ) -> Result<Vec<EpochReport>> {
        let cfg = self.model.config().clone();
        if data.c != cfg.in_channels {
            return Err(Error::Shape(format!(
                "dataset crops have {} channels, the model takes {}",
                data.c, cfg.in_channels
            )));
        }
        if let Some(&i) = train.iter().chain(val).find(|&&i| i >= data.n) {
            return Err(Error::InvalidArgument(format!(
                "crop index {i} is out of range: the dataset has {} crops",
                data.n
            )));
        }
        self.check_labels(&data.labels)?;
        if let Some(d) = &self.opts.domain_adversarial {
            let doms = data.domains.as_ref().ok_or_else(|| {
                Error::InvalidArgument(
                    "domain_adversarial is set but the dataset has no domain labels (Dataset::with_domains)".into(),
                )
            })?;
            if doms.len() != data.n {
                return Err(Error::Shape(format!(
                    "dataset: {} domain labels for {} crops",
                    doms.len(),
                    data.n
                )));
            }
            d.check_labels(doms)?;
        }
        let domains = match &self.opts.domain_adversarial {
            Some(_) => data.domains.clone().map(Arc::new),
            None => None,
        };
        let train_labels: Vec<u32> = train.iter().map(|&i| data.labels[i]).collect();
        let mut reports = Vec::new();
        while self.epoch < self.opts.epochs {
            let epoch = self.epoch;
            let lr = self.opts.lr_schedule().lr_at(epoch);
            let mut erng = epoch_rng(self.opts.seed, epoch);
            let plan = match &self.opts.mil {
                None => Plan::Crops(Arc::new(
                    balanced_epoch(&train_labels, cfg.num_classes, &mut erng)?
                        .into_iter()
                        .map(|j| train[j])
                        .collect(),
                )),
                Some(m) => Plan::Bags(Arc::new(
                    mil_epoch(&train_labels, cfg.num_classes, m, &mut erng)?
                        .into_iter()
                        .map(|b| Bag {
                            label: b.label,
                            items: b.items.into_iter().map(|j| train[j]).collect(),
                        })
                        .collect(),
                )),
            };
            let nb = match &plan {
                Plan::Crops(order) => batches(order, self.opts.batch_size, false)?.len(),
                Plan::Bags(bags) => bags.len().div_ceil(self.opts.batch_size),
            };
            let (bs, seed, aug) = (
                self.opts.batch_size,
                self.opts.seed,
                self.opts.augmentation.clone(),
            );
            let (dc, dh, dw) = (data.c, data.h, data.w);
            let src = data.data.clone();
            let labels = Arc::new(data.labels.clone());
            let doms = domains.clone();
            let producer = move |b: usize| -> Result<Batch> {
                let (idx, batch_labels): (Vec<usize>, Vec<u32>) = match &plan {
                    Plan::Crops(ord) => {
                        let idx = ord[b * bs..((b + 1) * bs).min(ord.len())].to_vec();
                        let l = idx.iter().map(|&i| labels[i]).collect();
                        (idx, l)
                    }
                    Plan::Bags(bags) => {
                        let bb = &bags[b * bs..((b + 1) * bs).min(bags.len())];
                        (
                            bb.iter().flat_map(|g| g.items.iter().copied()).collect(),
                            bb.iter().map(|g| g.label).collect(),
                        )
                    }
                };
                let per = dc * dh * dw;
                let mut crops = Vec::with_capacity(idx.len() * per);
                for &i in &idx {
                    crops.extend_from_slice(&src[i * per..(i + 1) * per]);
                }
                let mut rng = batch_rng(seed, epoch, b as u64);
                let mut scratch = Vec::new();
                aug.augment_batch(&mut crops, idx.len(), dc, dh, dw, &mut rng, &mut scratch)?;
                let d = doms.as_ref().map(|d| idx.iter().map(|&i| d[i]).collect());
                Ok((crops, batch_labels, idx.len(), d))
            };
            let feed = Prefetcher::new(
                nb,
                self.opts.workers.max(1),
                self.opts.prefetch.max(1),
                producer,
            )?;
            // Dropout / drop-connect randomness of this epoch, independent of the data pipeline.
            self.rng = batch_rng(seed ^ 0x9E37_79B9_7F4A_7C15, epoch, u64::MAX);
            let (mut loss_sum, mut seen, mut correct) = (0f64, 0usize, 0usize);
            let epochs_total = self.opts.epochs.max(1) as f64;
            for (b, item) in feed.enumerate() {
                let (crops, labels, m, doms) = item?;
                self.progress = Some((epoch as f64 + b as f64 / nb.max(1) as f64) / epochs_total);
                let (l, ok) = self.step_core(&crops, m, dh, dw, &labels, doms.as_deref(), lr)?;
                let units = labels.len();
                loss_sum += l * units as f64;
                seen += units;
                correct += ok;
                if !progress(Event::Step {
                    epoch,
                    step: b as u64 + 1,
                    steps_in_epoch: nb as u64,
                    loss: l,
                }) {
                    return Err(Error::Cancelled);
                }
            }
            let validation = if val.is_empty() {
                None
            } else {
                Some(self.evaluate(data, val).map_err(|e| match e {
                    Error::NonFinite(m) => Error::NonFinite(format!(
                        "validation after epoch {} (step {}): {m}; the model in eval mode (BN running statistics) diverged — lower the learning rate",
                        epoch + 1,
                        self.step
                    )),
                    other => other,
                })?)
            };
            self.epoch += 1;
            if let Some(st) = &mut self.ols {
                st.end_epoch();
            }
            let report = EpochReport {
                epoch,
                lr,
                train_loss: loss_sum / seen.max(1) as f64,
                train_accuracy: correct as f64 / seen.max(1) as f64,
                steps: nb as u64,
                validation,
            };
            // Higher is better: validation accuracy, else −training loss.
            let score = report
                .validation
                .as_ref()
                .map(|v| v.accuracy)
                .unwrap_or(-report.train_loss);
            if self.best.is_none_or(|(s, _)| score > s) {
                self.best = Some((score, epoch));
                if let Some(p) = best {
                    self.inference_model()?.save(p)?;
                }
            }
            if let Some(p) = checkpoint {
                self.save_checkpoint(p)?;
            }
            let go_on = progress(Event::Epoch(&report));
            reports.push(report);
            if !go_on {
                return Err(Error::Cancelled);
            }
        }
        // The buffer pool keeps up to one step's activations; give them back after a run.
        crate::autograd::pool::trim();
        Ok(reports)
    }

    /// Writes weights (torchvision names), optimiser state, step / epoch counters, the step RNG and
    /// the options to `path` atomically (temp file + rename).
    pub fn save_checkpoint(&mut self, path: &Path) -> Result<()> {
        self.sync()?;
        super::checkpoint::save(self, path)
    }

    /// Restores a checkpoint written by `save_checkpoint`: the next step is exactly the one the
    /// saved run would have taken.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        // The host copy first: a failed load leaves it (and the device) as they were.
        self.sync()?;
        super::checkpoint::load(self, path)?;
        if let Some(d) = &mut self.device {
            // The device takes the loaded state; if it cannot, the host copy and counters hold
            // the checkpoint while the device still holds the old state: report it.
            let state = self.opt.state();
            d.push(&self.model, &state).map_err(|e| {
                Error::Internal(format!(
                    "the checkpoint was read but the device could not take it ({e}); the trainer's \
                     device state is the one before the load: create a new trainer"
                ))
            })?;
        }
        Ok(())
    }

    pub(super) fn ols_state(&self) -> Option<&OlsState> {
        self.ols.as_ref()
    }

    pub(super) fn set_ols_state(&mut self, supervise: Vec<f64>, update: Vec<f64>, count: Vec<f64>) {
        if let Some(st) = &mut self.ols {
            st.supervise = supervise;
            st.update = update;
            st.count = count;
        }
    }

    pub(super) fn fresh_optimizer(&self) -> Result<Box<dyn Optimizer>> {
        self.opts.build_optimizer()
    }

    pub(super) fn parts(
        &self,
    ) -> (
        &TrainableEfficientNet<f32>,
        &dyn Optimizer,
        u64,
        u64,
        &ChaCha8Rng,
        Option<(f64, u64)>,
    ) {
        (
            &self.model,
            self.opt.as_ref(),
            self.step,
            self.epoch,
            &self.rng,
            self.best,
        )
    }

    pub(super) fn parts_mut(
        &mut self,
    ) -> (
        &mut TrainableEfficientNet<f32>,
        &mut Box<dyn Optimizer>,
        &mut u64,
        &mut u64,
        &mut ChaCha8Rng,
        &mut Option<(f64, u64)>,
    ) {
        (
            &mut self.model,
            &mut self.opt,
            &mut self.step,
            &mut self.epoch,
            &mut self.rng,
            &mut self.best,
        )
    }
}

impl Drop for Trainer {
    /// Releases the buffers the recycling pool cached for this trainer's steps.
    fn drop(&mut self) {
        crate::autograd::pool::trim();
    }
}

/// The order of one epoch: crops (class-balanced) or attention-MIL bags.
#[derive(Clone)]
enum Plan {
    Crops(Arc<Vec<usize>>),
    Bags(Arc<Vec<Bag>>),
}

/// A prepared batch: crops, labels (per crop, or per bag), crop count, domain labels per crop.
type Batch = (Vec<f32>, Vec<u32>, usize, Option<Vec<u32>>);

/// The index of the largest value (the first of ties).
pub(super) fn argmax(row: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best
}
