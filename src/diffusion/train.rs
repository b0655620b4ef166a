//! Training and sampling of the latent diffusion U-Net (REFERENCE §10, issue 5 item 5).
//!
//! One training step on a batch of latents x0 pushed from the host (NCHW f32):
//! t ~ U{0, …, T−1} and ε ~ N(0, 1) per sample from the trainer's seeded ChaCha8 RNG,
//! x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, target v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (or ε / x0 for the other prediction
//! types), loss = MSE(U-Net(x_t, t, cond′), target) with cond′ the conditions after condition dropout
//! (classifier-free guidance training), backward, gradient clipping (torch `clip_grad_norm_`),
//! AdamW (torch semantics), then the EMA update.
//!
//! Per step the RNG draws, in this order: n timesteps, n uniforms for condition dropout (always
//! drawn, so that runs with different dropout probabilities see the same timesteps and noise), and
//! n·C·H·W normal values (NCHW order). A step that fails (bad input, non-finite loss or gradient)
//! leaves the weights, the EMA, the optimiser, the RNG and the step counter as they were.
//!
//! EMA: diffusers `EMAModel` with its defaults (`update_after_step = 0`, `use_ema_warmup = False`,
//! `min_decay = 0`): the k-th update (k = 1, 2, …) uses decay_k = 0 for k = 1 and
//! min(decay, (1 + s)/(10 + s)) with s = k − 1 after, and ema ← ema − (1 − decay_k)·(ema − w) in f32.
//! The warm-up keeps the average from being dominated by the random initial weights for the first
//! thousands of steps (with decay 0.9999 a plain EMA needs ~10⁴ steps to forget them); it is what
//! the diffusers / MONAI training scripts run, so EMA weights move both ways with the same meaning.
//!
//! Condition dropout: with probability `cond_dropout` a sample's conditions are all replaced by
//! their null values — the learned null context (models with cross-attention, when a context is
//! given) and the null row of every confounder table. MONAI's single `class_embedding` table has
//! no null row, so class labels are kept.
//!
//! Sampling ([`sample`]): x_T ~ N(0, 1) from the seed, then the DDPM or DDIM loop of
//! [`crate::diffusion::scheduler`] with the U-Net in no-grad mode; guidance scale s ≠ 1 runs the
//! conditional and the null-conditioned batch together (2N) and uses uncond + s·(cond − uncond).

use super::gpu_train::{DiffusionDevice, GpuDiffusionTrainer, OnDevice};
use super::scheduler::{guide, SamplerKind, Scheduler, SchedulerConfig};
use super::unet::{nchw_to_nhwc, Conditioning, DiffusionUNet, UNetConfig, NULL};
use crate::autograd::Tape;
use crate::backend::gpu::Gpu;
use crate::error::{Error, Result};
use crate::optim::{clip_grad_norm, AdamW, AdamWOptions, Optimizer, OptimizerState, ParamView};
use crate::train::Compute;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

const FORMAT: &str = "phenocore-diffusion-checkpoint-1";
const EMA_PREFIX: &str = "ema/";
const OPT_PREFIX: &str = "optimizer/";

/// Options of [`DiffusionTrainer`]; `Default` gives the values documented per field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DiffusionTrainOptions {
    /// AdamW learning rate (constant; see [`DiffusionTrainer::set_lr`]). Default 1e-4.
    pub lr: f64,
    /// AdamW betas. Default (0.9, 0.999).
    pub betas: (f64, f64),
    /// AdamW eps. Default 1e-8.
    pub eps: f64,
    /// AdamW decoupled weight decay, applied to every parameter (torch with one param group).
    /// Default 1e-2 (torch's default).
    pub weight_decay: f64,
    /// Max global L2 norm of the gradients (torch `clip_grad_norm_`); None = no clipping. Default 1.0.
    pub clip_grad_norm: Option<f64>,
    /// EMA decay (diffusers `EMAModel` warm-up, see the module docs); None = no EMA. Default 0.9999.
    pub ema_decay: Option<f64>,
    /// Probability that a sample's conditions are all replaced by their null values (classifier-free
    /// guidance training); needs a model with `null_embeddings` when > 0. Default 0.1.
    pub cond_dropout: f64,
    /// Noise schedule and prediction type (the sampler kind / eta fields are unused in training).
    /// Default: T = 1000, scaled linear 0.0015 → 0.0205, v-prediction.
    pub scheduler: SchedulerConfig,
    /// Seed of the timestep / dropout / noise RNG. Default 0.
    pub seed: u64,
    /// None (default): train on the CPU. Some(ordinal): the steps run on that CUDA device (the
    /// `cuda` feature; `Error::NoDevice` without a usable GPU), with the same draws.
    pub device: Option<usize>,
    /// The arithmetic of the device's steps (f32, TF32 GEMMs, or bf16 mixed precision with f32
    /// master weights); anything but `F32` needs a device. Default F32.
    pub compute: Compute,
}

impl Default for DiffusionTrainOptions {
    fn default() -> Self {
        DiffusionTrainOptions {
            lr: 1e-4,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 1e-2,
            clip_grad_norm: Some(1.0),
            ema_decay: Some(0.9999),
            cond_dropout: 0.1,
            scheduler: SchedulerConfig::default(),
            seed: 0,
            device: None,
            compute: Compute::F32,
        }
    }
}

impl DiffusionTrainOptions {
    /// Checks the options (the AdamW and scheduler settings are checked by their constructors).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("diffusion training: {m}")));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("lr must be finite and >= 0, got {}", self.lr));
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return bad(format!("clip_grad_norm must be positive, got {c}"));
            }
        }
        if let Some(d) = self.ema_decay {
            if !(0.0..=1.0).contains(&d) {
                return bad(format!("ema_decay must be in [0, 1], got {d}"));
            }
        }
        if !(0.0..=1.0).contains(&self.cond_dropout) {
            return bad(format!(
                "cond_dropout must be a probability in [0, 1], got {}",
                self.cond_dropout
            ));
        }
        if self.device.is_none() && self.compute != Compute::F32 {
            return bad(format!(
                "compute {:?} runs on a GPU: set device (the CPU trains in f32)",
                self.compute
            ));
        }
        Ok(())
    }

    fn adamw(&self) -> Result<AdamW> {
        AdamW::new(AdamWOptions {
            betas: self.betas,
            eps: self.eps,
            weight_decay: self.weight_decay,
            amsgrad: false,
        })
    }
}

/// Trains a [`DiffusionUNet`] on latent batches pushed from the host.
pub struct DiffusionTrainer {
    model: DiffusionUNet<f32>,
    ema: Option<DiffusionUNet<f32>>,
    opt: AdamW,
    opts: DiffusionTrainOptions,
    scheduler: Scheduler,
    rng: ChaCha8Rng,
    step: u64,
    last_dropped: Vec<bool>,
    last_timesteps: Vec<usize>,
    /// The steps' device (`DiffusionTrainOptions::device` or [`DiffusionTrainer::with_device`]):
    /// it holds the current weights, EMA and AdamW state; `model`, `ema` and `opt` are the
    /// host's copy.
    device: Option<Box<dyn DiffusionDevice>>,
    /// The host copy is older than the device's state.
    stale: bool,
}

/// One step's draws and the model inputs formed from them (the CPU and device paths share them).
struct Draws {
    rng: ChaCha8Rng,
    timesteps: Vec<usize>,
    dropped: Vec<bool>,
    /// x_t and the prediction target, NHWC.
    x_t: Vec<f32>,
    target: Vec<f32>,
    /// The context-null flags and the confounder indices after condition dropout (None: as given).
    null_flags: Option<Vec<bool>>,
    confounders: Option<Vec<usize>>,
}

/// diffusers `EMAModel.get_decay` (defaults) for the `k`-th update, k ≥ 1.
pub fn ema_decay_at(decay: f64, k: u64) -> f64 {
    let s = k.saturating_sub(1);
    if s == 0 {
        return 0.0;
    }
    let s = s as f64;
    ((1.0 + s) / (10.0 + s)).min(decay)
}

impl DiffusionTrainer {
    /// A trainer for `unet` (the EMA, when enabled, starts as a copy of its weights). With
    /// `options.device` set, the steps run on that CUDA device (an error without the `cuda`
    /// feature, `Error::NoDevice` without a usable GPU).
    pub fn new(unet: DiffusionUNet<f32>, options: DiffusionTrainOptions) -> Result<Self> {
        options.validate()?;
        match options.device {
            None => Self::host(unet, options),
            #[cfg(feature = "cuda")]
            Some(ordinal) => {
                let dev = crate::backend::cuda::device(ordinal)?;
                Self::with_device(unet, options, Box::new(dev))
            }
            #[cfg(not(feature = "cuda"))]
            Some(ordinal) => Err(Error::Unsupported(format!(
                "device {ordinal}: this phenocore was built without the `cuda` feature; train \
                 on the CPU (no device)"
            ))),
        }
    }

    /// A trainer whose steps run on `dev` (a [`Gpu`] handle: a CUDA device, or any other
    /// implementation), whatever `options.device` says; `options.compute` sets the arithmetic.
    /// The weights, AdamW moments and EMA weights live on the device; the draws are the CPU
    /// trainer's, so both see the same timesteps, noise and dropout.
    pub fn with_device<G, D>(
        unet: DiffusionUNet<f32>,
        options: DiffusionTrainOptions,
        dev: D,
    ) -> Result<Self>
    where
        G: Gpu + 'static,
        D: std::ops::Deref<Target = G> + Send + 'static,
        GpuDiffusionTrainer<G>: Send,
    {
        let mut host_opts = options;
        host_opts.compute = Compute::F32;
        host_opts.device = None;
        let mut t = Self::host(unet, host_opts)?;
        let dt = GpuDiffusionTrainer::new(&*dev, &t.model, options, options.compute)?;
        t.opts = options;
        t.device = Some(Box::new(OnDevice { dev, t: dt }));
        Ok(t)
    }

    /// The CPU trainer (and the host half of a device's).
    fn host(unet: DiffusionUNet<f32>, options: DiffusionTrainOptions) -> Result<Self> {
        options.validate()?;
        let cfg = unet.config();
        if cfg.out_channels != cfg.in_channels {
            return Err(Error::InvalidArgument(format!(
                "diffusion training: the U-Net predicts {} channels for {} input channels; \
                 out_channels must equal in_channels",
                cfg.out_channels, cfg.in_channels
            )));
        }
        if options.cond_dropout > 0.0 && !cfg.null_embeddings {
            return Err(Error::InvalidArgument(format!(
                "diffusion training: cond_dropout = {} needs a U-Net with null_embeddings \
                 (the null values replace the dropped conditions)",
                options.cond_dropout
            )));
        }
        let scheduler = Scheduler::new(options.scheduler, options.seed)?;
        let opt = options.adamw()?;
        let ema = match options.ema_decay {
            Some(_) => Some(copy_model(&unet)?),
            None => None,
        };
        Ok(DiffusionTrainer {
            model: unet,
            ema,
            opt,
            opts: options,
            scheduler,
            rng: ChaCha8Rng::seed_from_u64(options.seed),
            step: 0,
            last_dropped: Vec::new(),
            last_timesteps: Vec::new(),
            device: None,
            stale: false,
        })
    }

    /// Whether the steps run on a device.
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// Brings the host's copy of the weights, EMA and optimizer state up to the device's
    /// (nothing to do on the CPU). Reading the models and saving do it themselves.
    pub fn sync(&mut self) -> Result<()> {
        if !self.stale {
            return Ok(());
        }
        if let Some(d) = &self.device {
            let state = d.pull(&mut self.model, self.ema.as_mut())?;
            let mut opt = self.opts.adamw()?;
            opt.load_state(&state)?;
            self.opt = opt;
        }
        self.stale = false;
        Ok(())
    }

    /// The U-Net's configuration.
    pub fn config(&self) -> &UNetConfig {
        self.model.config()
    }

    pub fn options(&self) -> &DiffusionTrainOptions {
        &self.opts
    }
    /// The trained weights (on a device: copied back first).
    pub fn model(&mut self) -> Result<&DiffusionUNet<f32>> {
        self.sync()?;
        Ok(&self.model)
    }
    /// The EMA weights (None without `ema_decay`; on a device: copied back first).
    pub fn ema_model(&mut self) -> Result<Option<&DiffusionUNet<f32>>> {
        self.sync()?;
        Ok(self.ema.as_ref())
    }
    /// Completed steps.
    pub fn steps(&self) -> u64 {
        self.step
    }
    /// Changes the learning rate of the following steps (e.g. a warm-up driven by the caller).
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "diffusion training: lr must be finite and >= 0, got {lr}"
            )));
        }
        self.opts.lr = lr;
        Ok(())
    }
    /// Per sample of the last successful step: whether condition dropout nulled its conditions.
    pub fn last_dropped(&self) -> &[bool] {
        &self.last_dropped
    }
    /// Per sample of the last successful step: the training timestep drawn.
    pub fn last_timesteps(&self) -> &[usize] {
        &self.last_timesteps
    }

    /// One training step on `latents` (NCHW f32, `n` samples of in_channels × `h` × `w`) with their
    /// conditions; returns the loss (MSE before the update). Bad shapes / conditions are
    /// Shape / InvalidArgument errors, non-finite latents, loss or gradients `Error::NonFinite`
    /// naming the step; a failed step changes nothing.
    pub fn step(
        &mut self,
        latents: &[f32],
        n: usize,
        h: usize,
        w: usize,
        cond: &Conditioning<'_, f32>,
    ) -> Result<f32> {
        let step_no = self.step + 1;
        let cfg = self.model.config().clone();
        let c = cfg.in_channels;
        if latents.len() != n * c * h * w {
            return Err(Error::Shape(format!(
                "diffusion training step {step_no}: latents have {} values, expected \
                 N × C × H × W = {n} × {c} × {h} × {w}",
                latents.len()
            )));
        }
        self.model
            .check_inputs(n, c, h, w, &vec![0.0; n], cond)
            .map_err(|e| prefix_err(e, &format!("diffusion training step {step_no}")))?;
        if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "diffusion training step {step_no}: latent value {i} (sample {}) is {}",
                i / (c * h * w),
                latents[i]
            )));
        }

        let d = self.draw(latents, n, h, w, cond)?;
        let cond2 = Conditioning {
            context: cond.context,
            context_len: cond.context_len,
            context_null: d.null_flags.as_deref().or(cond.context_null),
            class_labels: cond.class_labels,
            confounders: d.confounders.as_deref().or(cond.confounders),
        };
        let tsf: Vec<f64> = d.timesteps.iter().map(|&t| t as f64).collect();
        let lv = match self.device.as_mut() {
            Some(dev) => {
                let lv = dev.step(&d.x_t, &d.target, n, h, w, &tsf, &cond2, self.opts.lr)?;
                self.stale = true;
                lv
            }
            None => self.cpu_step(&d, n, h, w, &tsf, &cond2, step_no)?,
        };
        self.rng = d.rng;
        self.step = step_no;
        self.last_dropped = d.dropped;
        self.last_timesteps = d.timesteps;
        Ok(lv)
    }

    /// This step's draws from a copy of the RNG (committed by the caller on success), in the
    /// order the module docs give, and the inputs formed from them.
    fn draw(
        &self,
        latents: &[f32],
        n: usize,
        h: usize,
        w: usize,
        cond: &Conditioning<'_, f32>,
    ) -> Result<Draws> {
        let cfg = self.model.config();
        let c = cfg.in_channels;
        let mut rng = self.rng.clone();
        let big_t = self.scheduler.num_train_timesteps();
        let timesteps: Vec<usize> = (0..n).map(|_| rng.gen_range(0..big_t)).collect();
        let p = self.opts.cond_dropout;
        let dropped: Vec<bool> = (0..n).map(|_| rng.gen::<f64>() < p).collect();
        let noise: Vec<f32> = (0..latents.len())
            .map(|_| rng.sample::<f32, _>(StandardNormal))
            .collect();
        let x_t = self.scheduler.add_noise(latents, &noise, &timesteps)?;
        let target = self.scheduler.target(latents, &noise, &timesteps)?;
        drop(noise);

        // Conditions after dropout.
        let any_drop = dropped.iter().any(|&d| d);
        let null_flags: Option<Vec<bool>> = if any_drop
            && cfg.with_conditioning
            && (cond.context.is_some() || cond.context_null.is_some())
        {
            Some(
                (0..n)
                    .map(|i| dropped[i] || cond.context_null.is_some_and(|f| f[i]))
                    .collect(),
            )
        } else {
            None
        };
        let kc = cfg.confounders.len();
        let confounders: Option<Vec<usize>> = match cond.confounders {
            Some(idx) if any_drop && kc > 0 => Some(
                idx.iter()
                    .enumerate()
                    .map(|(j, &v)| if dropped[j / kc] { NULL } else { v })
                    .collect(),
            ),
            _ => None,
        };
        Ok(Draws {
            rng,
            timesteps,
            dropped,
            x_t: nchw_to_nhwc(&x_t, n, c, h, w),
            target: nchw_to_nhwc(&target, n, c, h, w),
            null_flags,
            confounders,
        })
    }

    /// The step on the CPU: forward, MSE, backward, checks, clipping, AdamW, EMA.
    #[allow(clippy::too_many_arguments)]
    fn cpu_step(
        &mut self,
        d: &Draws,
        n: usize,
        h: usize,
        w: usize,
        tsf: &[f64],
        cond2: &Conditioning<'_, f32>,
        step_no: u64,
    ) -> Result<f32> {
        let c = self.model.config().in_channels;
        self.model.params_mut().zero_grad();
        let mut tape = Tape::<f32>::new(true);
        let x = tape.input(&[n, h, w, c], d.x_t.clone(), false)?;
        let y = self.model.forward(&mut tape, &x, tsf, cond2)?;
        let loss = crate::ops::shape::mse_loss(&mut tape, &y, &d.target)?;
        let lv = tape.data(&loss)[0];
        if !lv.is_finite() {
            return Err(Error::NonFinite(format!(
                "diffusion training: loss is {lv} at step {step_no}; the step was not applied \
                 (weights unchanged)"
            )));
        }
        tape.backward(&loss, self.model.params_mut())?;
        let params = self.model.params_mut();
        let bad = (0..params.len())
            .filter(|&i| params.trainable(i))
            .find(|&i| params.grad(i).iter().any(|g| !g.is_finite()));
        if let Some(i) = bad {
            let name = params.name(i).to_string();
            params.zero_grad();
            return Err(Error::NonFinite(format!(
                "diffusion training: gradient of {name:?} is not finite at step {step_no}; \
                 the step was not applied (weights unchanged)"
            )));
        }
        if let Some(max_norm) = self.opts.clip_grad_norm {
            let mut grads = params.grads_mut();
            clip_grad_norm(&mut grads, max_norm, 2.0, true)?;
        }
        let mut views: Vec<ParamView> = params
            .trainable_mut()
            .into_iter()
            .map(|(name, _, value, grad)| ParamView {
                name,
                value: value.as_mut_slice(),
                grad,
                weight_decay: true,
            })
            .collect();
        self.opt.step(&mut views, self.opts.lr)?;
        drop(views);

        if let (Some(decay), Some(ema)) = (self.opts.ema_decay, self.ema.as_mut()) {
            let dk = ema_decay_at(decay, step_no);
            let omd = (1.0 - dk) as f32;
            let src = self.model.params();
            let dst = ema.params_mut();
            for i in 0..src.len() {
                ema_update(dst.value_mut(i), src.value(i), omd);
            }
        }
        Ok(lv)
    }

    /// Writes the trained (`ema = false`) or EMA weights as a U-Net weights file (MONAI names,
    /// loadable by [`DiffusionUNet::load`]).
    pub fn save_weights(&mut self, path: &Path, ema: bool) -> Result<()> {
        self.sync()?;
        if ema {
            match &self.ema {
                Some(m) => m.save(path),
                None => Err(Error::InvalidArgument(
                    "save_weights: EMA weights requested but the trainer has ema_decay = None"
                        .into(),
                )),
            }
        } else {
            self.model.save(path)
        }
    }

    /// Writes a checkpoint (atomically): the weights under MONAI names, the EMA weights under
    /// `ema/`, the AdamW moments under `optimizer/`, and in the metadata the step, the optimiser's
    /// scalars and the RNG state. [`DiffusionTrainer::load_checkpoint`] resumes bit for bit.
    pub fn save_checkpoint(&mut self, path: &Path) -> Result<()> {
        self.sync()?;
        let ostate = self.opt.state();
        let mut meta = HashMap::new();
        meta.insert("format".to_string(), FORMAT.to_string());
        meta.insert("step".into(), self.step.to_string());
        meta.insert("optimizer".into(), self.opt.kind().to_string());
        let scalars: Vec<String> = ostate
            .scalars
            .iter()
            .map(|(k, v)| format!("{k}={}", f64_bits(*v)))
            .collect();
        meta.insert("optimizer_scalars".into(), scalars.join(";"));
        meta.insert("rng_seed".into(), hex(&self.rng.get_seed()));
        meta.insert("rng_stream".into(), self.rng.get_stream().to_string());
        meta.insert("rng_word_pos".into(), self.rng.get_word_pos().to_string());
        meta.insert("ema".into(), self.ema.is_some().to_string());
        let sc = &self.opts.scheduler;
        meta.insert(
            "scheduler".into(),
            format!(
                "T={};schedule={:?};beta_start={};beta_end={};prediction_type={:?}",
                sc.num_train_timesteps, sc.schedule, sc.beta_start, sc.beta_end, sc.prediction_type
            ),
        );

        let mut owned: Vec<(String, Vec<usize>, &[f32])> = Vec::new();
        for (name, shape, _, value) in self.model.params().iter() {
            owned.push((name.to_string(), shape.to_vec(), value));
        }
        if let Some(ema) = &self.ema {
            for (name, shape, _, value) in ema.params().iter() {
                owned.push((format!("{EMA_PREFIX}{name}"), shape.to_vec(), value));
            }
        }
        for (name, v) in &ostate.tensors {
            owned.push((format!("{OPT_PREFIX}{name}"), vec![v.len()], v));
        }
        let views = owned
            .iter()
            .map(|(n, s, d)| {
                TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(d))
                    .map(|v| (n.clone(), v))
                    .map_err(|e| Error::Internal(format!("checkpoint tensor {n:?}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let bytes = safetensors::serialize(views, &Some(meta))
            .map_err(|e| Error::Internal(format!("serialise checkpoint: {e}")))?;
        crate::io::write_atomic(path, &bytes)
    }

    /// Restores a checkpoint written by [`DiffusionTrainer::save_checkpoint`] for the same U-Net
    /// config. Everything is checked before anything changes; a mismatching tensor is an error
    /// naming it.
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<()> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Io(format!("cannot read checkpoint {}: {e}", path.display())))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| {
            Error::Format(format!("{} is not a safetensors file: {e}", path.display()))
        })?;
        let meta = header.metadata().clone().unwrap_or_default();
        let get = |k: &str| -> Result<&String> {
            meta.get(k).ok_or_else(|| {
                Error::Format(format!(
                    "{} is not a phenocore diffusion checkpoint (no {k:?} in its metadata)",
                    path.display()
                ))
            })
        };
        if get("format")? != FORMAT {
            return Err(Error::Format(format!(
                "{}: unknown checkpoint format {:?} (expected {FORMAT:?})",
                path.display(),
                get("format")?
            )));
        }
        let kind = get("optimizer")?;
        if kind != self.opt.kind() {
            return Err(Error::InvalidArgument(format!(
                "checkpoint was written by a {kind} optimiser, this trainer uses {}",
                self.opt.kind()
            )));
        }
        let step: u64 = get("step")?
            .parse()
            .map_err(|_| Error::Format("checkpoint: bad step".into()))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Format(format!("{}: {e}", path.display())))?;
        let f32s = |name: &str| -> Result<Vec<f32>> {
            let v = st.tensor(name).map_err(|_| {
                Error::MissingKey(format!(
                    "checkpoint {} has no tensor {name:?}",
                    path.display()
                ))
            })?;
            if v.dtype() != Dtype::F32 {
                return Err(Error::DType(format!(
                    "checkpoint tensor {name:?} is not f32"
                )));
            }
            Ok(v.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect())
        };
        let mut ostate = OptimizerState::default();
        let mut onames: Vec<&str> = st
            .names()
            .into_iter()
            .filter(|n| n.starts_with(OPT_PREFIX))
            .map(|s| s.as_str())
            .collect();
        onames.sort_unstable();
        for name in onames {
            let n = &name[OPT_PREFIX.len()..];
            ostate.tensors.push((n.to_string(), f32s(name)?));
        }
        for kv in get("optimizer_scalars")?
            .split(';')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| Error::Format(format!("checkpoint: bad optimizer scalar {kv:?}")))?;
            ostate.scalars.push((k.to_string(), parse_bits(v, k)?));
        }
        let seed: [u8; 32] = unhex(get("rng_seed")?)
            .and_then(|v| v.try_into().ok())
            .ok_or_else(|| Error::Format("checkpoint: bad rng_seed".into()))?;
        let stream: u64 = get("rng_stream")?
            .parse()
            .map_err(|_| Error::Format("checkpoint: bad rng_stream".into()))?;
        let word_pos: u128 = get("rng_word_pos")?
            .parse()
            .map_err(|_| Error::Format("checkpoint: bad rng_word_pos".into()))?;

        let read_model = |m: &DiffusionUNet<f32>, prefix: &str| -> Result<Vec<Vec<f32>>> {
            m.params()
                .iter()
                .map(|(name, shape, _, _)| {
                    let key = format!("{prefix}{name}");
                    let v = f32s(&key)?;
                    let want: usize = shape.iter().product();
                    if v.len() != want {
                        return Err(Error::Shape(format!(
                            "checkpoint tensor {key:?} has {} values, the U-Net needs shape {shape:?} \
                             — a checkpoint of another config?",
                            v.len()
                        )));
                    }
                    Ok(v)
                })
                .collect()
        };
        let weights = read_model(&self.model, "")?;
        let ema_weights = match &self.ema {
            Some(e) => Some(read_model(e, EMA_PREFIX)?),
            None => None,
        };
        let mut fresh = self.opts.adamw()?;
        fresh.load_state(&ostate)?;
        // Everything checked: commit.
        let p = self.model.params_mut();
        for (i, v) in weights.into_iter().enumerate() {
            p.value_mut(i).copy_from_slice(&v);
        }
        p.zero_grad();
        if let (Some(e), Some(ws)) = (self.ema.as_mut(), ema_weights) {
            let p = e.params_mut();
            for (i, v) in ws.into_iter().enumerate() {
                p.value_mut(i).copy_from_slice(&v);
            }
        }
        self.opt = fresh;
        self.step = step;
        let mut r = ChaCha8Rng::from_seed(seed);
        r.set_stream(stream);
        r.set_word_pos(word_pos);
        self.rng = r;
        self.last_dropped.clear();
        self.last_timesteps.clear();
        self.stale = false;
        if let Some(d) = self.device.as_mut() {
            // The device takes the loaded state; if it cannot, the host copy holds the checkpoint
            // while the device still holds the old state: report it.
            let ostate = self.opt.state();
            if let Err(e) = d.push(&self.model, self.ema.as_ref(), &ostate, self.step) {
                return Err(Error::Internal(format!(
                    "the checkpoint was read but the device could not take it ({e}); the \
                     trainer's device state is the one before the load: create a new trainer"
                )));
            }
        }
        Ok(())
    }
}

/// Sampling settings of [`sample`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SampleOptions {
    /// Schedule, prediction type (as trained), sampler `kind` (DDPM / DDIM) and DDIM `eta`.
    pub scheduler: SchedulerConfig,
    /// Number of inference steps (1..=T).
    pub steps: usize,
    /// Classifier-free guidance scale s: uncond + s·(cond − uncond); 1 = no guidance (one pass).
    pub guidance_scale: f64,
    /// Seed of x_T and of the sampler noise.
    pub seed: u64,
}

impl Default for SampleOptions {
    /// DDIM (eta 0), 50 steps, no guidance, seed 0, the training defaults of the schedule.
    fn default() -> Self {
        SampleOptions {
            scheduler: SchedulerConfig {
                kind: SamplerKind::Ddim,
                ..SchedulerConfig::default()
            },
            steps: 50,
            guidance_scale: 1.0,
            seed: 0,
        }
    }
}

/// Generates `n` latents (NCHW f32, out_channels × `h` × `w`) with `model` under `cond`: x_T ~ N(0, 1)
/// from the seed, then `steps` DDPM / DDIM steps, the U-Net in no-grad mode. With
/// `guidance_scale` ≠ 1 the conditional and the null-conditioned passes (context → the learned
/// null context, every confounder → its null value) run as one batch of 2N. `progress(done, total)`
/// is called after every step; returning false cancels (`Error::Cancelled`). Deterministic with
/// the seed.
pub fn sample(
    model: &DiffusionUNet<f32>,
    opts: &SampleOptions,
    cond: &Conditioning<'_, f32>,
    n: usize,
    h: usize,
    w: usize,
    mut progress: Option<&mut dyn FnMut(usize, usize) -> bool>,
) -> Result<Vec<f32>> {
    let cfg = model.config();
    let c = cfg.in_channels;
    let s = opts.guidance_scale;
    let guided = check_sample(cfg, opts)?;
    model.check_inputs(n, c, h, w, &vec![0.0; n], cond)?;
    let mut sched = Scheduler::new(opts.scheduler, opts.seed)?;
    sched.set_timesteps(opts.steps)?;
    let doubled = GuidedConditions::new(cfg, cond, n);
    let cond2 = doubled.get();

    let per = c * h * w;
    let mut x = sched.noise(n * per);
    let timesteps = sched.timesteps().to_vec();
    let total = timesteps.len();
    let mut prev = vec![0f32; n * per];
    let mut x0 = vec![0f32; n * per];
    for (k, &t) in timesteps.iter().enumerate() {
        let out = if guided {
            let xx = [&x[..], &x[..]].concat();
            let y = model.predict(&xx, 2 * n, h, w, &vec![t as f64; 2 * n], &cond2)?;
            guide(&y[n * per..], &y[..n * per], s)?
        } else {
            model.predict(&x, n, h, w, &vec![t as f64; n], cond)?
        };
        sched.step_into(&out, t, &x, None, &mut prev, &mut x0)?;
        std::mem::swap(&mut x, &mut prev);
        if let Some(cb) = progress.as_mut() {
            if !cb(k + 1, total) {
                return Err(Error::Cancelled);
            }
        }
    }
    Ok(x)
}

/// Checks the sampler settings against the model: whether the passes are guided (scale ≠ 1).
pub(crate) fn check_sample(cfg: &UNetConfig, opts: &SampleOptions) -> Result<bool> {
    let c = cfg.in_channels;
    if cfg.out_channels != c {
        return Err(Error::InvalidArgument(format!(
            "sample: the U-Net predicts {} channels for {c} input channels; out_channels must \
             equal in_channels",
            cfg.out_channels
        )));
    }
    let s = opts.guidance_scale;
    if !s.is_finite() {
        return Err(Error::InvalidArgument(format!(
            "sample: guidance_scale is {s}; expected a finite number"
        )));
    }
    let guided = s != 1.0;
    if guided && !cfg.null_embeddings {
        return Err(Error::InvalidArgument(format!(
            "sample: guidance_scale = {s} needs the null-conditioned pass, but the U-Net has no null \
             embeddings (null_embeddings = false); use guidance_scale = 1"
        )));
    }
    Ok(guided)
}

/// The conditions of the guided batch of 2N: [cond; null] (context → the learned null context,
/// every confounder → its null value).
pub(crate) struct GuidedConditions {
    context: Option<Vec<f32>>,
    context_len: usize,
    flags: Option<Vec<bool>>,
    labels: Option<Vec<usize>>,
    confounders: Option<Vec<usize>>,
}

impl GuidedConditions {
    pub(crate) fn new(cfg: &UNetConfig, cond: &Conditioning<'_, f32>, n: usize) -> Self {
        let kc = cfg.confounders.len();
        // The null pass replaces the context by the learned null context; without a context (and
        // no flags) neither pass has one and only the confounders are nulled.
        let nulls_ctx = cfg.with_conditioning
            && cfg.cross_attention_dim.is_some()
            && (cond.context.is_some() || cond.context_null.is_some());
        GuidedConditions {
            context: cond.context.map(|c| [c, c].concat()),
            context_len: cond.context_len,
            flags: nulls_ctx.then(|| {
                (0..2 * n)
                    .map(|i| i >= n || cond.context_null.is_some_and(|f| f[i]))
                    .collect()
            }),
            labels: cond.class_labels.map(|l| [l, l].concat()),
            confounders: cond.confounders.map(|idx| {
                idx.iter()
                    .copied()
                    .chain(std::iter::repeat_n(NULL, n * kc))
                    .collect()
            }),
        }
    }

    pub(crate) fn get(&self) -> Conditioning<'_, f32> {
        Conditioning {
            context: self.context.as_deref(),
            context_len: self.context_len,
            context_null: self.flags.as_deref(),
            class_labels: self.labels.as_deref(),
            confounders: self.confounders.as_deref(),
        }
    }
}

/// ema ← ema − omd·(ema − w), element-wise in f32 (diffusers `s_param.sub_(omd * (s_param - param))`);
/// large tensors in parallel chunks (same bits).
fn ema_update(ema: &mut [f32], w: &[f32], omd: f32) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let f = |(e, w): (&mut [f32], &[f32])| {
        for (e, &wi) in e.iter_mut().zip(w) {
            *e -= omd * (*e - wi);
        }
    };
    if ema.len() >= 4 * CHUNK && crate::threads::num_threads() > 1 {
        crate::threads::install(|| {
            ema.par_chunks_mut(CHUNK)
                .zip(w.par_chunks(CHUNK))
                .for_each(f)
        });
    } else {
        f((ema, w));
    }
}

fn copy_model(m: &DiffusionUNet<f32>) -> Result<DiffusionUNet<f32>> {
    DiffusionUNet::from_state_dict(&m.state_dict()?, m.config().clone())
}

fn prefix_err(e: Error, p: &str) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{p}: {m}")),
        Error::Shape(m) => Error::Shape(format!("{p}: {m}")),
        Error::NonFinite(m) => Error::NonFinite(format!("{p}: {m}")),
        other => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// f64 kept exactly: its bit pattern in hex.
fn f64_bits(v: f64) -> String {
    format!("{:016x}", v.to_bits())
}

fn parse_bits(s: &str, what: &str) -> Result<f64> {
    u64::from_str_radix(s, 16)
        .map(f64::from_bits)
        .map_err(|_| Error::Format(format!("checkpoint: bad {what} {s:?}")))
}
