//! The diffusion U-Net's training step on a [`Gpu`] (the device half of
//! [`DiffusionTrainer`](super::train::DiffusionTrainer) with `DiffusionTrainOptions::device`):
//! the parameters, their AdamW moments and the EMA weights stay on the device.
//!
//! The host draws each step's randomness exactly as the CPU trainer does (timesteps, condition
//! dropout, noise from the same ChaCha8 stream) and uploads x_t and the prediction target; the
//! device then runs, in stream order:
//! 1. the U-Net forward with its tape ([`GpuUNet::forward_backward_with`]), f32 or bf16 mixed
//!    precision;
//! 2. the MSE and its gradient in one pass (`kernels/loss.cu` `mse_partial_f32` / `mse_finish`:
//!    `dy = (2 / len)·(y − t)` as the CPU's product, the loss summed in f64 in a fixed order);
//! 3. the backward to every parameter gradient (f32; a parameter the pass did not reach has a
//!    zero gradient, as on the CPU);
//! 4. the global L2 gradient norm (deterministic, `GradNormPlan`) and its clip coefficient;
//! 5. — once the host has read the loss and the norm and found both finite — the fused
//!    multi-tensor AdamW step with the clip coefficient as its gradient scale (torch
//!    `clip_grad_norm_` then `AdamW.step`, the CPU's arithmetic bit for bit given equal gradients),
//!    the EMA update in one launch (`ema_update_f32`, the CPU's rounding), and the bf16 working
//!    copies recast.
//!
//! A non-finite loss or gradient stops before step 5: nothing on the device changes, and the
//! error says what the CPU trainer would say.

use super::gpu::GpuUNet;
use super::train::{ema_decay_at, DiffusionTrainOptions};
use super::unet::{Conditioning, DiffusionUNet};
use crate::backend::gpu::loss::mse;
use crate::backend::gpu::optim::{AdamWPlan, AdamWTensorArgs, EmaPlan, GradNormPlan};
use crate::backend::gpu::{Gpu, Math};
use crate::error::{Error, Result};
use crate::optim::{AdamWOptions, OptimizerState};
use crate::tensor::DType;
use crate::train::Compute;
use std::ops::Deref;

/// A [`DiffusionUNet`]'s training state on one device.
pub struct GpuDiffusionTrainer<G: Gpu> {
    unet: GpuUNet<G>,
    /// Every parameter's key, in the CPU model's order (the EMA's group).
    names: Vec<String>,
    /// Indices into `names` of the trainable parameters (the AdamW group, the CPU's order).
    trainable: Vec<usize>,
    lens: Vec<usize>,
    /// AdamW's moments per trainable parameter (f32, zero before the first step).
    exp_avg: Vec<G::Buf>,
    exp_avg_sq: Vec<G::Buf>,
    /// The EMA weights per parameter (None without EMA).
    ema: Option<Vec<G::Buf>>,
    adam: AdamWPlan,
    norm: GradNormPlan,
    ema_plan: EmaPlan,
    /// Zeros as long as the longest trainable parameter: the gradient of the parameters a pass
    /// does not reach (only read), made once.
    zeros: G::Buf,
    opts: DiffusionTrainOptions,
    steps: u64,
}

fn zeroed<G: Gpu>(g: &G, len: usize) -> Result<G::Buf> {
    let b = g.alloc(len.max(1) * 4)?;
    // SAFETY: b holds len f32.
    unsafe { g.memset_zero(g.ptr(&b), len * 4)? };
    Ok(b)
}

impl<G: Gpu> GpuDiffusionTrainer<G> {
    /// Uploads `unet` (and, with EMA, a copy of it as the EMA weights) and sets up AdamW with
    /// zeroed moments, as a fresh [`DiffusionTrainer`](super::train::DiffusionTrainer).
    pub fn new(
        g: &G,
        unet: &DiffusionUNet<f32>,
        opts: DiffusionTrainOptions,
        compute: Compute,
    ) -> Result<Self> {
        opts.validate()?;
        let mut gu = GpuUNet::new(g, unet)?;
        match compute {
            Compute::F32 => {}
            Compute::Tf32 => gu.math = Math::Tf32,
            Compute::Bf16 => gu.set_compute(g, DType::BF16)?,
        }
        let params = unet.params();
        let names: Vec<String> = (0..params.len())
            .map(|i| params.name(i).to_string())
            .collect();
        let lens: Vec<usize> = (0..params.len()).map(|i| params.value(i).len()).collect();
        let trainable: Vec<usize> = (0..params.len()).filter(|&i| params.trainable(i)).collect();
        let tlens: Vec<usize> = trainable.iter().map(|&i| lens[i]).collect();
        let adam = AdamWPlan::new(
            AdamWOptions {
                betas: opts.betas,
                eps: opts.eps,
                weight_decay: opts.weight_decay,
                amsgrad: false,
            },
            DType::F32,
            &tlens,
        )?;
        let norm = GradNormPlan::new(
            DType::F32,
            &tlens,
            opts.clip_grad_norm.unwrap_or(f64::INFINITY),
            2.0,
        )?;
        let exp_avg = tlens.iter().map(|&l| zeroed(g, l)).collect::<Result<_>>()?;
        let exp_avg_sq = tlens.iter().map(|&l| zeroed(g, l)).collect::<Result<_>>()?;
        let ema = match opts.ema_decay {
            Some(_) => Some(
                (0..params.len())
                    .map(|i| g.upload_slice(params.value(i)))
                    .collect::<Result<Vec<_>>>()?,
            ),
            None => None,
        };
        Ok(GpuDiffusionTrainer {
            unet: gu,
            names,
            trainable,
            ema_plan: EmaPlan::new(&lens)?,
            zeros: zeroed(g, tlens.iter().copied().max().unwrap_or(0))?,
            lens,
            exp_avg,
            exp_avg_sq,
            ema,
            adam,
            norm,
            opts,
            steps: 0,
        })
    }

    /// Completed steps.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The U-Net on the device (its current weights).
    pub fn unet(&self) -> &GpuUNet<G> {
        &self.unet
    }

    /// One step from the noised input and its target (NHWC f32 [n, h, w, in_channels], as the
    /// CPU trainer forms them from its draws) under the conditions after dropout: the loss (MSE
    /// before the update). `lr` is this step's learning rate. A non-finite loss or gradient is
    /// `Error::NonFinite` naming it, and changes nothing.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        g: &G,
        x_t: &[f32],
        target: &[f32],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
        lr: f64,
    ) -> Result<f32> {
        let step_no = self.steps + 1;
        let cfg = self.unet.config();
        let len = n * h * w * cfg.in_channels;
        if x_t.len() != len || target.len() != n * h * w * cfg.out_channels {
            return Err(Error::Shape(format!(
                "GPU diffusion step: x_t has {} values and the target {}, expected {n} × {h} × \
                 {w} × {} each",
                x_t.len(),
                target.len(),
                cfg.in_channels
            )));
        }
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "diffusion training: lr must be finite and >= 0, got {lr}"
            )));
        }
        let x = g.upload_slice(x_t)?;
        let t = g.upload_slice(target)?;
        let loss = g.alloc(4)?;
        let (_y, _dx, grads) =
            self.unet
                .forward_backward_with(g, x, n, h, w, timesteps, cond, |y| {
                    let dy = g.alloc(target.len() * 4)?;
                    // SAFETY: y, t and dy hold target.len() f32 (the output's shape), loss one.
                    unsafe {
                        mse(
                            g,
                            g.ptr(y),
                            g.ptr(&t),
                            g.ptr(&dy),
                            g.ptr(&loss),
                            target.len(),
                        )?
                    };
                    Ok(dy)
                })?;
        // Every trainable parameter's gradient; those the pass did not reach are zero.
        let masters = self.unet.param_ptrs(g, &self.names)?;
        let grad_ptrs: Vec<u64> = self
            .trainable
            .iter()
            .map(|&i| {
                grads
                    .get(&self.names[i])
                    .map_or(g.ptr(&self.zeros), |b| g.ptr(b))
            })
            .collect();
        let nrm = g.alloc(8)?;
        let coef = g.alloc(4)?;
        // SAFETY: each gradient holds its parameter's length of f32; nrm one f64, coef one f32.
        unsafe { self.norm.norm(g, &grad_ptrs, g.ptr(&nrm), g.ptr(&coef))? };
        let lv = g.download_vec::<f32>(&loss, 1)?[0];
        let nv = g.download_vec::<f64>(&nrm, 1)?[0];
        if !lv.is_finite() {
            return Err(Error::NonFinite(format!(
                "diffusion training: loss is {lv} at step {step_no}; the step was not applied \
                 (weights unchanged)"
            )));
        }
        if !nv.is_finite() {
            let mut name = "?".to_string();
            for (k, &i) in self.trainable.iter().enumerate() {
                if let Some(b) = grads.get(&self.names[i]) {
                    let v = g.download_vec::<f32>(b, self.lens[i])?;
                    if v.iter().any(|x| !x.is_finite()) {
                        name = self.names[self.trainable[k]].clone();
                        break;
                    }
                }
            }
            return Err(Error::NonFinite(format!(
                "diffusion training: gradient of {name:?} is not finite at step {step_no}; \
                 the step was not applied (weights unchanged)"
            )));
        }
        let tensors: Vec<AdamWTensorArgs> = self
            .trainable
            .iter()
            .enumerate()
            .map(|(k, &i)| AdamWTensorArgs {
                param: masters[i].0,
                grad: grad_ptrs[k],
                exp_avg: g.ptr(&self.exp_avg[k]),
                exp_avg_sq: g.ptr(&self.exp_avg_sq[k]),
                max_exp_avg_sq: 0,
                step: step_no,
                weight_decay: true,
            })
            .collect();
        let scale = self.opts.clip_grad_norm.map(|_| g.ptr(&coef));
        // SAFETY: every pointer addresses its tensor's length of f32 (masters, gradients and
        // moments of the same parameter); coef is one f32.
        unsafe { self.adam.step(g, &tensors, lr, scale)? };
        if let (Some(decay), Some(ema)) = (self.opts.ema_decay, &self.ema) {
            let omd = (1.0 - ema_decay_at(decay, step_no)) as f32;
            let e: Vec<u64> = ema.iter().map(|b| g.ptr(b)).collect();
            let p: Vec<u64> = masters.iter().map(|m| m.0).collect();
            // SAFETY: EMA and master of parameter i hold lens[i] f32 each.
            unsafe { self.ema_plan.update(g, &e, &p, omd)? };
        }
        self.unet.masters_changed(g)?;
        g.synchronize()?;
        self.steps = step_no;
        Ok(lv)
    }

    /// Copies the device's weights into `model` and its EMA weights into `ema` (when both have
    /// them); returns AdamW's state in the CPU optimizer's format (`Optimizer::state`).
    pub fn pull(
        &self,
        g: &G,
        model: &mut DiffusionUNet<f32>,
        ema: Option<&mut DiffusionUNet<f32>>,
    ) -> Result<OptimizerState> {
        self.unet.download_into(g, model)?;
        if let (Some(dst), Some(src)) = (ema, &self.ema) {
            let p = dst.params_mut();
            for (i, b) in src.iter().enumerate() {
                let v = g.download_vec::<f32>(b, self.lens[i])?;
                p.value_mut(i).copy_from_slice(&v);
            }
        }
        let mut out = OptimizerState {
            tensors: Vec::new(),
            scalars: vec![("step".to_string(), self.steps as f64)],
        };
        // Before the first step the CPU optimizer has registered nothing.
        if self.steps == 0 {
            return Ok(out);
        }
        for (k, &i) in self.trainable.iter().enumerate() {
            let name = &self.names[i];
            out.tensors.push((
                format!("exp_avg/{name}"),
                g.download_vec(&self.exp_avg[k], self.lens[i])?,
            ));
            out.tensors.push((
                format!("exp_avg_sq/{name}"),
                g.download_vec(&self.exp_avg_sq[k], self.lens[i])?,
            ));
            out.scalars
                .push((format!("step/{name}"), self.steps as f64));
        }
        Ok(out)
    }

    /// Replaces the device's weights, EMA weights, AdamW state and step count with the host's (a
    /// loaded checkpoint). Everything is checked and uploaded before anything is replaced.
    pub fn push(
        &mut self,
        g: &G,
        model: &DiffusionUNet<f32>,
        ema: Option<&DiffusionUNet<f32>>,
        opt: &OptimizerState,
        steps: u64,
    ) -> Result<()> {
        let mut m = Vec::with_capacity(self.trainable.len());
        let mut v = Vec::with_capacity(self.trainable.len());
        for &i in &self.trainable {
            let name = &self.names[i];
            for (prefix, out) in [("exp_avg/", &mut m), ("exp_avg_sq/", &mut v)] {
                let key = format!("{prefix}{name}");
                let buf = match opt.tensor(&key) {
                    Some(t) if t.len() == self.lens[i] => g.upload_slice(t)?,
                    Some(t) => {
                        return Err(Error::Shape(format!(
                            "optimizer state: {key:?} has {} values, the parameter {}",
                            t.len(),
                            self.lens[i]
                        )))
                    }
                    None if steps == 0 && opt.tensors.is_empty() => zeroed(g, self.lens[i])?,
                    None => {
                        return Err(Error::MissingKey(format!(
                            "optimizer state: no tensor {key:?} (step {steps})"
                        )))
                    }
                };
                out.push(buf);
            }
            if steps > 0 {
                let k = format!("step/{name}");
                let s = opt.scalars.iter().find(|(n, _)| *n == k).map(|&(_, s)| s);
                if s != Some(steps as f64) {
                    return Err(Error::Unsupported(format!(
                        "optimizer state: {k:?} is {s:?} but the trainer is at step {steps}; the \
                         GPU optimizer keeps one step count for every tensor"
                    )));
                }
            }
        }
        let new_ema = match (&self.ema, ema) {
            (Some(_), Some(e)) => {
                let p = e.params();
                if p.len() != self.names.len() {
                    return Err(Error::Shape(format!(
                        "EMA model has {} tensors, the trainer {}",
                        p.len(),
                        self.names.len()
                    )));
                }
                Some(
                    (0..p.len())
                        .map(|i| g.upload_slice(p.value(i)))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
            (None, None) => None,
            _ => {
                return Err(Error::InvalidArgument(
                    "push: the EMA weights must be given exactly when the trainer keeps them"
                        .into(),
                ))
            }
        };
        self.unet.upload_from(g, model)?;
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.ema = new_ema;
        self.steps = steps;
        Ok(())
    }
}

/// What [`DiffusionTrainer`](super::train::DiffusionTrainer) asks of its device.
pub(crate) trait DiffusionDevice: Send {
    #[allow(clippy::too_many_arguments)]
    fn step(
        &mut self,
        x_t: &[f32],
        target: &[f32],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
        lr: f64,
    ) -> Result<f32>;
    fn pull(
        &self,
        model: &mut DiffusionUNet<f32>,
        ema: Option<&mut DiffusionUNet<f32>>,
    ) -> Result<OptimizerState>;
    fn push(
        &mut self,
        model: &DiffusionUNet<f32>,
        ema: Option<&DiffusionUNet<f32>>,
        opt: &OptimizerState,
        steps: u64,
    ) -> Result<()>;
}

/// A device handle (an owned CUDA device, or `&'static` emulation) and the trainer on it.
pub(crate) struct OnDevice<G: Gpu, D: Deref<Target = G>> {
    pub(crate) dev: D,
    pub(crate) t: GpuDiffusionTrainer<G>,
}

impl<G, D> DiffusionDevice for OnDevice<G, D>
where
    G: Gpu,
    D: Deref<Target = G> + Send,
    GpuDiffusionTrainer<G>: Send,
{
    fn step(
        &mut self,
        x_t: &[f32],
        target: &[f32],
        n: usize,
        h: usize,
        w: usize,
        timesteps: &[f64],
        cond: &Conditioning<'_, f32>,
        lr: f64,
    ) -> Result<f32> {
        self.t
            .step(&*self.dev, x_t, target, n, h, w, timesteps, cond, lr)
    }

    fn pull(
        &self,
        model: &mut DiffusionUNet<f32>,
        ema: Option<&mut DiffusionUNet<f32>>,
    ) -> Result<OptimizerState> {
        self.t.pull(&*self.dev, model, ema)
    }

    fn push(
        &mut self,
        model: &DiffusionUNet<f32>,
        ema: Option<&DiffusionUNet<f32>>,
        opt: &OptimizerState,
        steps: u64,
    ) -> Result<()> {
        self.t.push(&*self.dev, model, ema, opt, steps)
    }
}
