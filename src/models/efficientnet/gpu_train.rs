//! One EfficientNet-B0 training step on a [`Gpu`]: the CPU step of [`TrainableEfficientNet`]
//! (`train.rs`) plus softmax cross-entropy with label smoothing and an SGD / AdamW update (as
//! `Trainer::step` does them), composed from the launch layer's kernels and GEMMs, in f32 (IEEE or
//! TF32 GEMMs) or in bf16 mixed precision (see [`GpuTrainOptions::compute`]).
//!
//! BN is NOT folded: every convolution is followed by batch norm in training mode (batch
//! statistics saved for the backward, running statistics updated in place on the device, SiLU
//! fused where the model has one). Stem: im2col of the NCHW crops + GEMM (its weight gradient is
//! dyᵀ · cols; the crops need no gradient). MBConv: expand GEMM + BN-SiLU, depthwise + BN-SiLU,
//! squeeze-excite (pool, two small GEMMs with bias, SiLU / sigmoid, channel scale), project GEMM +
//! BN, drop-connect (a per-sample mask) and the residual add. Head: top GEMM + BN-SiLU, global
//! pool, dropout (an elementwise mask), the linear classifier, the loss. The backward runs the same
//! ops in reverse; every parameter receives its gradient exactly once, so gradients are written
//! (not accumulated) and need no zeroing.
//!
//! The dropout and drop-connect masks are drawn on the host from the caller's `rng`, in the order
//! and with the draws of the CPU forward (`ops::elementwise::{drop_connect, dropout}`), and
//! uploaded, so a GPU step can be compared with a CPU one from the same seed.
//!
//! Parameters live in one f32 arena (master weights), their gradients in a second of the same
//! layout, BN running statistics in a third, the optimizer state in arenas of the parameters'
//! layout; tensors start at 256-byte boundaries (the optimizer's 4-wide path).

use super::config::{BlockSpec, EfficientNetConfig, Padding, BLOCKS, STEM_CH, TOP_CH};
use super::gpu::{depthwise_plan, stem_im2col};
use super::train::{Regularisation, TrainableEfficientNet};
use super::weights::{block_keys, StateDict};
use crate::autograd::ParamKind;
use crate::backend::gpu::depthwise::Depthwise;
use crate::backend::gpu::elementwise::{cast, unary, Unary};
use crate::backend::gpu::loss::CrossEntropy;
use crate::backend::gpu::norm::BatchNorm;
use crate::backend::gpu::optim::{
    AdamWPlan, AdamWTensorArgs, GradNormPlan, SgdPlan, SgdTensorArgs,
};
use crate::backend::gpu::shape::{activation_backward, add, ActivationGrad, SampleChannels};
use crate::backend::gpu::{Gemm, Gpu, Math};
use crate::error::{Error, Result};
use crate::ops::norm::{Act, BatchNormConfig};
use crate::optim::{AdamWOptions, OptimizerState, SgdOptions};
use crate::tensor::{DType, Tensor};
use crate::train::{Compute, DecayScope, OptimizerKind, TrainerOptions};
use rand::Rng;
use std::collections::HashMap;

const F32: DType = DType::F32;
/// Tensors start at multiples of this many f32 in their arena (256 bytes).
const ALIGN: usize = 64;

/// The optimizer of a GPU training run (torch semantics, as `crate::optim`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GpuOptimizer {
    Sgd(SgdOptions),
    AdamW(AdamWOptions),
}

/// What a GPU training step does beyond the model: loss, optimizer, learning rate, clipping.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GpuTrainOptions {
    pub optimizer: GpuOptimizer,
    /// Learning rate of the next step (a schedule sets it with [`GpuEfficientNetTrainer::set_lr`]).
    pub lr: f64,
    /// ε of the label-smoothed cross-entropy.
    pub label_smoothing: f64,
    /// Which parameters the weight decay applies to (as `Trainer`).
    pub decay_scope: DecayScope,
    /// Gradient clipping by the total 2-norm (None = off).
    pub clip_grad_norm: Option<f64>,
    /// GEMM arithmetic of f32 GEMMs: `Math::F32` (default) or TF32 tensor cores.
    pub math: Math,
    /// `DType::F32` (default), or `DType::BF16`: mixed precision as torch's autocast trains, with
    /// f32 master weights. Each step casts the parameters to a bf16 working copy that the
    /// convolutions read; the convolutions, batch norms (f32 statistics and affine), SiLU,
    /// depthwise, drop-connect and the residual stream store bf16 activations and gradients;
    /// the squeeze-excite MLP, the head from the global pool on (dropout, classifier, loss), every
    /// weight gradient (bf16 GEMM operands, f32 output), the optimizer and its state are f32.
    pub compute: DType,
}

impl GpuTrainOptions {
    /// The options of a CPU [`TrainerOptions`] at its base learning rate, with its `compute`
    /// (f32, TF32 GEMMs, or bf16 mixed precision). Online label smoothing, the domain-adversarial
    /// branch and attention MIL are not on the GPU path (an error); augmentation and the schedule
    /// stay the caller's.
    pub fn from_trainer(t: &TrainerOptions) -> Result<Self> {
        if t.online_label_smoothing.is_some() || t.domain_adversarial.is_some() || t.mil.is_some() {
            return Err(Error::Unsupported(
                "GPU training step: online label smoothing, domain_adversarial and mil are not \
                 implemented on the GPU path"
                    .into(),
            ));
        }
        Ok(GpuTrainOptions {
            optimizer: match t.optimizer {
                OptimizerKind::Sgd => GpuOptimizer::Sgd(SgdOptions {
                    momentum: t.momentum,
                    nesterov: t.nesterov,
                    weight_decay: t.weight_decay,
                    ..Default::default()
                }),
                OptimizerKind::AdamW => GpuOptimizer::AdamW(AdamWOptions {
                    betas: t.betas,
                    eps: t.eps,
                    weight_decay: t.weight_decay,
                    amsgrad: false,
                }),
            },
            lr: t.lr,
            label_smoothing: t.label_smoothing,
            decay_scope: t.decay_scope,
            clip_grad_norm: t.clip_grad_norm,
            math: match t.compute {
                Compute::Tf32 => Math::Tf32,
                Compute::F32 | Compute::Bf16 => Math::F32,
            },
            compute: match t.compute {
                Compute::Bf16 => DType::BF16,
                Compute::F32 | Compute::Tf32 => F32,
            },
        })
    }
}

/// A tensor's place in its arena, in f32 elements.
#[derive(Clone, Copy, Debug)]
struct Span {
    off: usize,
    len: usize,
}

#[derive(Clone, Copy, Debug)]
struct ConvBn {
    w: Span,
    gamma: Span,
    beta: Span,
    /// In the statistics arena.
    mean: Span,
    var: Span,
}

#[derive(Clone, Copy, Debug)]
struct Block {
    spec: BlockSpec,
    expand: Option<ConvBn>,
    dw: ConvBn,
    se1_w: Span,
    se1_b: Span,
    se2_w: Span,
    se2_b: Span,
    project: ConvBn,
}

/// One tensor of the model, in the model's parameter order.
#[derive(Clone, Debug)]
struct Entry {
    name: String,
    shape: Vec<usize>,
    kind: ParamKind,
    /// In the statistics arena for buffers, the parameter arena otherwise.
    span: Span,
}

enum OptPlan {
    Sgd(SgdPlan),
    AdamW(AdamWPlan, AdamWOptions),
}

/// EfficientNet-B0 training on one device: f32 master parameters, their gradients, BN running
/// statistics and the optimizer state, all resident.
pub struct GpuEfficientNetTrainer<G: Gpu> {
    config: EfficientNetConfig,
    opts: GpuTrainOptions,
    entries: Vec<Entry>,
    /// Indices into `entries` of the trainable tensors (the optimizer's order, as the CPU's).
    trainable: Vec<usize>,
    params: G::Buf,
    params_len: usize,
    /// The bf16 working copy of `params` (same layout), refreshed at each step (BF16 compute).
    wcast: Option<G::Buf>,
    grads: G::Buf,
    stats: G::Buf,
    stats_len: usize,
    /// SGD: [momentum buffers] (with momentum); AdamW: [exp_avg, exp_avg_sq(, max_exp_avg_sq)].
    state: Vec<G::Buf>,
    plan: OptPlan,
    norm: GradNormPlan,
    stem: ConvBn,
    blocks: Vec<Block>,
    top: ConvBn,
    cls_w: Span,
    cls_b: Span,
    steps: u64,
}

/// What the backward of a convolution (or depthwise) + BN needs: the BN input (the convolution's
/// output), the saved batch statistics and the plan.
struct BnSave<B> {
    x: B,
    mean: B,
    invstd: B,
    bn: BatchNorm,
}

/// What an MBConv block's backward needs.
struct BlockSave<B> {
    /// Expand convolution's BN save and output (the depthwise input).
    expand: Option<(BnSave<B>, B)>,
    dw_plan: Depthwise,
    dw: BnSave<B>,
    /// The depthwise BN-SiLU output (the squeeze-excite input).
    d: B,
    /// The squeeze-excite MLP (f32): pooled input, fc1 output, its SiLU, fc2 output.
    pooled: B,
    a: B,
    a2: B,
    s: B,
    /// The excitation sigmoid(s) in the activations' dtype (the channel scale).
    s2: B,
    excited: B,
    project: BnSave<B>,
    /// Drop-connect mask broadcast to [n, out_ch] (residual blocks with a rate > 0).
    mask: Option<B>,
    rows_in: usize,
    rows_out: usize,
    positions_out: usize,
}

fn align(v: usize) -> usize {
    v.div_ceil(ALIGN) * ALIGN
}

fn check_p(p: f64, what: &str) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::InvalidArgument(format!(
            "{what} probability must be in [0, 1], got {p}"
        )));
    }
    Ok(())
}

/// The mask `ops::elementwise::{dropout, drop_connect}` draws: `count` draws from `rng`, each 0
/// with probability p, else 1 / (1 − p).
fn draw_mask(rng: &mut impl Rng, count: usize, p: f64) -> Vec<f32> {
    let keep = (if p < 1.0 { 1.0 / (1.0 - p) } else { 0.0 }) as f32;
    (0..count)
        .map(|_| if rng.gen::<f64>() < p { 0.0 } else { keep })
        .collect()
}

impl<G: Gpu> GpuEfficientNetTrainer<G> {
    /// Uploads the model's parameters and running statistics and sets up the optimizer (state
    /// zeroed, as a fresh CPU optimizer's). Models with training-only heads are refused.
    pub fn new(g: &G, model: &TrainableEfficientNet<f32>, opts: GpuTrainOptions) -> Result<Self> {
        if model.params().len() != model.num_base_params() {
            return Err(Error::Unsupported(
                "GPU training step: training-only heads (domain-adversarial, MIL) are not \
                 implemented on the GPU path"
                    .into(),
            ));
        }
        check_lr(opts.lr)?;
        if !matches!(opts.compute, DType::F32 | DType::BF16) {
            return Err(Error::InvalidArgument(format!(
                "GPU training step: compute dtype {:?} is not supported (f32, or bf16 mixed \
                 precision)",
                opts.compute
            )));
        }
        if !(0.0..=1.0).contains(&opts.label_smoothing) {
            return Err(Error::InvalidArgument(format!(
                "label_smoothing must be in [0, 1], got {}",
                opts.label_smoothing
            )));
        }
        let config = model.config().clone();
        let mut entries = Vec::new();
        let (mut params_len, mut stats_len) = (0usize, 0usize);
        let mut host_params = Vec::new();
        let mut host_stats = Vec::new();
        for (name, shape, kind, v) in model.params().iter() {
            let (arena, len) = if kind == ParamKind::Buffer {
                (&mut host_stats, &mut stats_len)
            } else {
                (&mut host_params, &mut params_len)
            };
            let off = *len;
            *len = align(off + v.len());
            arena.resize(*len, 0f32);
            arena[off..off + v.len()].copy_from_slice(v);
            entries.push(Entry {
                name: name.to_string(),
                shape: shape.to_vec(),
                kind,
                span: Span { off, len: v.len() },
            });
        }
        let by_name: HashMap<&str, Span> =
            entries.iter().map(|e| (e.name.as_str(), e.span)).collect();
        let get = |k: &str| -> Result<Span> {
            by_name
                .get(k)
                .copied()
                .ok_or_else(|| Error::MissingKey(format!("missing key {k:?}")))
        };
        let conv_bn = |w: &str, bn: &str| -> Result<ConvBn> {
            Ok(ConvBn {
                w: get(w)?,
                gamma: get(&format!("{bn}.weight"))?,
                beta: get(&format!("{bn}.bias"))?,
                mean: get(&format!("{bn}.running_mean"))?,
                var: get(&format!("{bn}.running_var"))?,
            })
        };
        let pair = |p: &str| conv_bn(&format!("{p}.0.weight"), &format!("{p}.1"));
        let stem = conv_bn("features.0.0.weight", "features.0.1")?;
        let mut blocks = Vec::with_capacity(BLOCKS.len());
        for spec in BLOCKS {
            let k = block_keys(&spec);
            blocks.push(Block {
                spec,
                expand: k.expand.as_deref().map(pair).transpose()?,
                dw: pair(&k.dw)?,
                se1_w: get(&format!("{}.fc1.weight", k.se))?,
                se1_b: get(&format!("{}.fc1.bias", k.se))?,
                se2_w: get(&format!("{}.fc2.weight", k.se))?,
                se2_b: get(&format!("{}.fc2.bias", k.se))?,
                project: pair(&k.project)?,
            });
        }
        let top = conv_bn("features.8.0.weight", "features.8.1")?;
        let (cls_w, cls_b) = (get("classifier.1.weight")?, get("classifier.1.bias")?);
        let trainable: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].kind != ParamKind::Buffer)
            .collect();
        let lens: Vec<usize> = trainable.iter().map(|&i| entries[i].span.len).collect();
        let zeroed = |len: usize| -> Result<G::Buf> {
            let b = g.alloc(len.max(1) * 4)?;
            // SAFETY: b holds len f32.
            unsafe { g.memset_zero(g.ptr(&b), len * 4)? };
            Ok(b)
        };
        let (plan, state) = match opts.optimizer {
            GpuOptimizer::Sgd(o) => {
                let n = if o.momentum != 0.0 { 1 } else { 0 };
                (
                    OptPlan::Sgd(SgdPlan::new(o, F32, &lens)?),
                    (0..n)
                        .map(|_| zeroed(params_len))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
            GpuOptimizer::AdamW(o) => {
                let n = if o.amsgrad { 3 } else { 2 };
                (
                    OptPlan::AdamW(AdamWPlan::new(o, F32, &lens)?, o),
                    (0..n)
                        .map(|_| zeroed(params_len))
                        .collect::<Result<Vec<_>>>()?,
                )
            }
        };
        let norm = GradNormPlan::new(
            F32,
            &lens,
            opts.clip_grad_norm.unwrap_or(f64::INFINITY),
            2.0,
        )?;
        Ok(GpuEfficientNetTrainer {
            config,
            opts,
            trainable,
            params: g.upload_slice(&host_params)?,
            params_len,
            wcast: if opts.compute == DType::BF16 {
                Some(g.alloc(params_len.max(1) * 2)?)
            } else {
                None
            },
            grads: zeroed(params_len)?,
            stats: g.upload_slice(&host_stats)?,
            stats_len,
            entries,
            state,
            plan,
            norm,
            stem,
            blocks,
            top,
            cls_w,
            cls_b,
            steps: 0,
        })
    }

    pub fn config(&self) -> &EfficientNetConfig {
        &self.config
    }

    pub fn options(&self) -> &GpuTrainOptions {
        &self.opts
    }

    /// Sets the learning rate of the following steps.
    pub fn set_lr(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        self.opts.lr = lr;
        Ok(())
    }

    /// Optimizer steps applied so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Every parameter and running statistic as f32 tensors with torchvision names.
    pub fn state_dict(&self, g: &G) -> Result<StateDict> {
        let p: Vec<f32> = g.download_vec(&self.params, self.params_len)?;
        let s: Vec<f32> = g.download_vec(&self.stats, self.stats_len)?;
        let mut out = StateDict::new();
        for e in &self.entries {
            let src = if e.kind == ParamKind::Buffer { &s } else { &p };
            out.insert(
                e.name.clone(),
                Tensor::from_f32(&e.shape, src[e.span.off..e.span.off + e.span.len].to_vec())?,
            );
        }
        Ok(out)
    }

    /// The model with the device's current parameters and running statistics.
    pub fn to_trainable(&self, g: &G) -> Result<TrainableEfficientNet<f32>> {
        TrainableEfficientNet::from_state_dict(&self.state_dict(g)?, self.config.clone())
    }

    /// The gradients of the last step (before any clipping scale), one per trainable tensor in
    /// the model's order: (name, values). Zeros before the first step.
    pub fn gradients(&self, g: &G) -> Result<Vec<(String, Vec<f32>)>> {
        let v: Vec<f32> = g.download_vec(&self.grads, self.params_len)?;
        Ok(self
            .trainable
            .iter()
            .map(|&i| {
                let e = &self.entries[i];
                (
                    e.name.clone(),
                    v[e.span.off..e.span.off + e.span.len].to_vec(),
                )
            })
            .collect())
    }

    /// The names of the optimizer's state tensors, arena by arena (`self.state`'s order), in the
    /// CPU optimizers' checkpoint format (`crate::optim::{Sgd, AdamW}::state`).
    fn state_prefixes(&self) -> &'static [&'static str] {
        match (&self.plan, self.state.len()) {
            (OptPlan::Sgd(_), 0) => &[],
            (OptPlan::Sgd(_), _) => &["momentum_buffer/"],
            (OptPlan::AdamW(..), 2) => &["exp_avg/", "exp_avg_sq/"],
            (OptPlan::AdamW(..), _) => &["exp_avg/", "exp_avg_sq/", "max_exp_avg_sq/"],
        }
    }

    /// The optimizer state as the CPU optimizer of the same options holds it after the same steps
    /// (its `Optimizer::state`, the checkpoint format): "step", and per trainable tensor SGD's
    /// `momentum_buffer/<name>` (with momentum, after the first step) or AdamW's
    /// `exp_avg/<name>`, `exp_avg_sq/<name>` (and `max_exp_avg_sq/<name>`) and `step/<name>`.
    pub fn optimizer_state(&self, g: &G) -> Result<OptimizerState> {
        let mut out = OptimizerState {
            tensors: Vec::new(),
            scalars: vec![("step".to_string(), self.steps as f64)],
        };
        // Before the first step the CPU optimizers have registered nothing.
        if self.steps == 0 {
            return Ok(out);
        }
        let arenas: Vec<Vec<f32>> = self
            .state
            .iter()
            .map(|b| g.download_vec(b, self.params_len))
            .collect::<Result<_>>()?;
        let adamw = matches!(self.plan, OptPlan::AdamW(..));
        for &i in &self.trainable {
            let e = &self.entries[i];
            let r = e.span.off..e.span.off + e.span.len;
            for (prefix, a) in self.state_prefixes().iter().zip(&arenas) {
                out.tensors
                    .push((format!("{prefix}{}", e.name), a[r.clone()].to_vec()));
            }
            if adamw {
                out.scalars
                    .push((format!("step/{}", e.name), self.steps as f64));
            }
        }
        Ok(out)
    }

    /// Replaces the parameters, the running statistics, the optimizer state and the step count
    /// with a CPU trainer's (a checkpoint's): `model` has this trainer's configuration and tensors,
    /// `opt` is in the format of [`Self::optimizer_state`]. Everything is checked before anything
    /// changes; AdamW's per-tensor steps must all equal "step" (the device keeps one count).
    pub fn load_state(
        &mut self,
        g: &G,
        model: &TrainableEfficientNet<f32>,
        opt: &OptimizerState,
    ) -> Result<()> {
        let cfg = model.config();
        if cfg.in_channels != self.config.in_channels || cfg.num_classes != self.config.num_classes
        {
            return Err(Error::Shape(format!(
                "load_state: the model takes {} channels and has {} classes, this trainer {} and {}",
                cfg.in_channels,
                cfg.num_classes,
                self.config.in_channels,
                self.config.num_classes
            )));
        }
        let params = model.params();
        if params.len() != self.entries.len() {
            return Err(Error::Unsupported(format!(
                "load_state: the model has {} tensors, this trainer {} (training-only heads are \
                 not on the GPU path)",
                params.len(),
                self.entries.len()
            )));
        }
        let mut host_params = vec![0f32; self.params_len];
        let mut host_stats = vec![0f32; self.stats_len];
        for ((name, _, kind, v), e) in params.iter().zip(&self.entries) {
            if name != e.name || v.len() != e.span.len || kind != e.kind {
                return Err(Error::Shape(format!(
                    "load_state: model tensor {name:?} ({} values) where this trainer has {:?} \
                     ({} values)",
                    v.len(),
                    e.name,
                    e.span.len
                )));
            }
            let arena = if kind == ParamKind::Buffer {
                &mut host_stats
            } else {
                &mut host_params
            };
            arena[e.span.off..e.span.off + e.span.len].copy_from_slice(v);
        }
        let scalar = |k: &str| opt.scalars.iter().find(|(n, _)| n == k).map(|&(_, v)| v);
        let as_count = |k: &str, v: f64| -> Result<u64> {
            if v.is_finite() && v >= 0.0 && v.fract() == 0.0 && v < 2f64.powi(53) {
                Ok(v as u64)
            } else {
                Err(Error::InvalidArgument(format!(
                    "optimizer state: {k:?} is {v}, not a step count"
                )))
            }
        };
        let steps = as_count(
            "step",
            scalar("step")
                .ok_or_else(|| Error::MissingKey("optimizer state: no scalar \"step\"".into()))?,
        )?;
        let adamw = matches!(self.plan, OptPlan::AdamW(..));
        let prefixes = self.state_prefixes();
        let mut known = 0usize;
        let mut arenas: Vec<Vec<f32>> = vec![vec![0f32; self.params_len]; self.state.len()];
        let any_state = !opt.tensors.is_empty();
        for &i in &self.trainable {
            let e = &self.entries[i];
            for (prefix, a) in prefixes.iter().zip(arenas.iter_mut()) {
                let key = format!("{prefix}{}", e.name);
                match opt.tensor(&key) {
                    Some(t) if t.len() == e.span.len => {
                        a[e.span.off..e.span.off + e.span.len].copy_from_slice(t);
                        known += 1;
                    }
                    Some(t) => {
                        return Err(Error::Shape(format!(
                            "optimizer state: {key:?} has {} values, the parameter {}",
                            t.len(),
                            e.span.len
                        )))
                    }
                    // Nothing registered yet (before the first step): zeros, as a fresh one.
                    None if !any_state && steps == 0 => {}
                    None => {
                        return Err(Error::MissingKey(format!(
                            "optimizer state: no tensor {key:?} (step {steps})"
                        )))
                    }
                }
            }
            if adamw && any_state {
                let k = format!("step/{}", e.name);
                let v = scalar(&k).ok_or_else(|| {
                    Error::MissingKey(format!("optimizer state: no scalar {k:?}"))
                })?;
                if as_count(&k, v)? != steps {
                    return Err(Error::Unsupported(format!(
                        "optimizer state: {k:?} is {v} but \"step\" is {steps}; the GPU \
                         optimizer keeps one step count for every tensor"
                    )));
                }
            }
        }
        if known != opt.tensors.len() {
            let extra = opt
                .tensors
                .iter()
                .find(|(k, _)| {
                    !self.trainable.iter().any(|&i| {
                        prefixes
                            .iter()
                            .any(|p| *k == format!("{p}{}", self.entries[i].name))
                    })
                })
                .map_or("?", |(k, _)| k.as_str());
            return Err(Error::InvalidArgument(format!(
                "optimizer state: unknown tensor {extra:?} for this {} optimizer",
                if adamw { "adamw" } else { "sgd" }
            )));
        }
        let new_params = g.upload_slice(&host_params)?;
        let new_stats = g.upload_slice(&host_stats)?;
        let new_state = arenas
            .iter()
            .map(|a| g.upload_slice(a))
            .collect::<Result<Vec<_>>>()?;
        self.params = new_params;
        self.stats = new_stats;
        self.state = new_state;
        self.steps = steps;
        Ok(())
    }

    fn p(&self, g: &G, s: Span) -> u64 {
        g.ptr(&self.params) + 4 * s.off as u64
    }

    fn gr(&self, g: &G, s: Span) -> u64 {
        g.ptr(&self.grads) + 4 * s.off as u64
    }

    fn st(&self, g: &G, s: Span) -> u64 {
        g.ptr(&self.stats) + 4 * s.off as u64
    }

    /// The dtype of activations and of the weights the convolutions read.
    fn act(&self) -> DType {
        self.opts.compute
    }

    /// Bytes of `n` activations.
    fn ab(&self, n: usize) -> usize {
        n * self.act().size_in_bytes()
    }

    /// A convolution weight as the convolutions read it: the bf16 working copy, or the master.
    fn w(&self, g: &G, s: Span) -> u64 {
        match &self.wcast {
            Some(b) => g.ptr(b) + 2 * s.off as u64,
            None => self.p(g, s),
        }
    }

    /// Host f32 values uploaded as activations.
    fn upload_act(&self, g: &G, v: &[f32]) -> Result<G::Buf> {
        if self.act() == DType::BF16 {
            let h: Vec<u16> = v
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect();
            g.upload_slice(&h)
        } else {
            g.upload_slice(v)
        }
    }

    /// The `n` values of `x` as `to`: `x` itself when it already holds `to` (f32 compute: no copy),
    /// else a new buffer cast from `from`.
    ///
    /// # Safety
    /// `x` holds `n` elements of `from`.
    unsafe fn convert(&self, g: &G, from: DType, to: DType, x: G::Buf, n: usize) -> Result<G::Buf> {
        if from == to {
            return Ok(x);
        }
        let y = g.alloc(n.max(1) * to.size_in_bytes())?;
        cast(g, from, to, g.ptr(&x), g.ptr(&y), n)?;
        Ok(y)
    }

    /// One training step on crops (N, C, H, W) f32 with BN in training mode: forward, softmax
    /// cross-entropy (label smoothing from the options), backward, optimizer update at the
    /// options' learning rate; returns the loss. Dropout and drop-connect draw their masks from
    /// `rng` as the CPU forward does. A non-finite loss or gradient is `Error::NonFinite` and
    /// leaves the weights, the optimizer state and the BN statistics unchanged (as does any other
    /// error).
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        g: &G,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
        reg: &Regularisation,
        rng: &mut impl Rng,
    ) -> Result<f32> {
        self.step_with_logits(g, crops, n, h, w, labels, reg, rng)
            .map(|(l, _)| l)
    }

    /// [`Self::step`], also returning the step's logits [n, classes] (training mode: dropout
    /// applied), from which a training loop counts the correct predictions.
    #[allow(clippy::too_many_arguments)]
    pub fn step_with_logits(
        &mut self,
        g: &G,
        crops: &[f32],
        n: usize,
        h: usize,
        w: usize,
        labels: &[u32],
        reg: &Regularisation,
        rng: &mut impl Rng,
    ) -> Result<(f32, Vec<f32>)> {
        let c = self.config.in_channels;
        let k = self.config.num_classes;
        if n == 0 || h == 0 || w == 0 || crops.len() != n * c * h * w {
            return Err(Error::Shape(format!(
                "crops must be (N, {c}, H, W) with N, H, W > 0: got {} values for N={n}, H={h}, W={w}",
                crops.len()
            )));
        }
        if labels.len() != n {
            return Err(Error::Shape(format!(
                "{} labels for {n} crops",
                labels.len()
            )));
        }
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= k) {
            return Err(Error::InvalidArgument(format!(
                "label {l} of crop {i} is out of range: the model has {k} classes (0..{})",
                k - 1
            )));
        }
        if let Some(i) = crops.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite(format!(
                "crop {} contains a non-finite value",
                i / (c * h * w)
            )));
        }
        check_p(reg.dropout, "dropout")?;
        check_p(reg.drop_connect_rate, "drop-connect")?;
        // The masks, in the CPU forward's order: drop-connect per residual block, then dropout.
        let nblocks = BLOCKS.len();
        let dc_masks: Vec<Option<Vec<f32>>> = BLOCKS
            .iter()
            .enumerate()
            .map(|(bi, spec)| {
                let rate = reg.drop_connect_rate * bi as f64 / nblocks as f64;
                (spec.residual() && rate != 0.0).then(|| draw_mask(rng, n, rate))
            })
            .collect();
        let dropout_mask = (reg.dropout != 0.0).then(|| draw_mask(rng, n * TOP_CH, reg.dropout));
        let bn_cfg = BatchNormConfig {
            eps: self.config.bn_eps as f64,
            momentum: reg.bn_momentum,
            unbiased_running_var: true,
        };
        let step_no = self.steps + 1;
        // The running statistics as they were, restored if the step is not applied.
        let backup = g.alloc(self.stats_len.max(1) * 4)?;
        // SAFETY: both hold stats_len f32.
        unsafe { g.copy(g.ptr(&self.stats), g.ptr(&backup), self.stats_len * 4)? };
        let restore = |me: &Self| -> Result<()> {
            // SAFETY: as above.
            unsafe { g.copy(g.ptr(&backup), g.ptr(&me.stats), me.stats_len * 4) }
        };
        let out = (|| -> Result<(f32, f64, Vec<f32>)> {
            let (loss, logits) = self.forward_backward(
                g,
                crops,
                [n, h, w],
                labels,
                &bn_cfg,
                &dc_masks,
                dropout_mask.as_deref(),
            )?;
            let nrm = g.alloc(8)?;
            let coef = g.alloc(4)?;
            let grads = self.grad_ptrs(g);
            // SAFETY: every gradient span lies in the gradient arena; nrm one f64, coef one f32.
            unsafe { self.norm.norm(g, &grads, g.ptr(&nrm), g.ptr(&coef))? };
            let lv: Vec<f32> = g.download_vec(&loss, 1)?;
            let nv: Vec<f64> = g.download_vec(&nrm, 1)?;
            let z: Vec<f32> = g.download_vec(&logits, n * k)?;
            if lv[0].is_finite() && nv[0].is_finite() {
                self.update(g, self.opts.clip_grad_norm.map(|_| g.ptr(&coef)))?;
                g.synchronize()?;
            }
            Ok((lv[0], nv[0], z))
        })();
        let (lv, nv, logits) = match out {
            Ok(v) => v,
            Err(e) => {
                restore(self)?;
                return Err(e);
            }
        };
        if !lv.is_finite() {
            restore(self)?;
            return Err(Error::NonFinite(format!(
                "loss is {lv} at step {step_no}; the step was not applied (weights and BN statistics unchanged)"
            )));
        }
        if !nv.is_finite() {
            restore(self)?;
            let name = self
                .gradients(g)?
                .into_iter()
                .find(|(_, v)| v.iter().any(|x| !x.is_finite()))
                .map_or_else(|| "?".to_string(), |(n, _)| n);
            return Err(Error::NonFinite(format!(
                "gradient of {name:?} is not finite at step {step_no}; the step was not applied"
            )));
        }
        self.steps += 1;
        Ok((lv, logits))
    }

    fn grad_ptrs(&self, g: &G) -> Vec<u64> {
        self.trainable
            .iter()
            .map(|&i| self.gr(g, self.entries[i].span))
            .collect()
    }

    fn decays(&self, i: usize) -> bool {
        self.opts.decay_scope == DecayScope::All || self.entries[i].kind == ParamKind::Weight
    }

    /// The optimizer update from the gradient arena (scaled by the f32 at `grad_scale`).
    fn update(&self, g: &G, grad_scale: Option<u64>) -> Result<()> {
        let lr = self.opts.lr;
        let at = |b: &G::Buf, s: Span| g.ptr(b) + 4 * s.off as u64;
        match &self.plan {
            OptPlan::Sgd(plan) => {
                let tensors: Vec<SgdTensorArgs> = self
                    .trainable
                    .iter()
                    .map(|&i| {
                        let s = self.entries[i].span;
                        SgdTensorArgs {
                            param: self.p(g, s),
                            grad: self.gr(g, s),
                            momentum_buffer: self.state.first().map_or(0, |b| at(b, s)),
                            first_step: self.steps == 0,
                            weight_decay: self.decays(i),
                        }
                    })
                    .collect();
                // SAFETY: every span lies in its arena (parameters, gradients and momentum share
                // the layout); grad_scale is one f32.
                unsafe { plan.step(g, &tensors, lr, grad_scale) }
            }
            OptPlan::AdamW(plan, o) => {
                let tensors: Vec<AdamWTensorArgs> = self
                    .trainable
                    .iter()
                    .map(|&i| {
                        let s = self.entries[i].span;
                        AdamWTensorArgs {
                            param: self.p(g, s),
                            grad: self.gr(g, s),
                            exp_avg: at(&self.state[0], s),
                            exp_avg_sq: at(&self.state[1], s),
                            max_exp_avg_sq: if o.amsgrad { at(&self.state[2], s) } else { 0 },
                            step: self.steps + 1,
                            weight_decay: self.decays(i),
                        }
                    })
                    .collect();
                // SAFETY: as for SGD; the moment arenas share the parameters' layout.
                unsafe { plan.step(g, &tensors, lr, grad_scale) }
            }
        }
    }

    /// y [rows, out] = x [rows, inn] · wᵀ (w [out, inn]), all of `dt`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn mm_xwt(
        &self,
        g: &G,
        dt: DType,
        x: u64,
        w: u64,
        y: u64,
        [rows, inn, out]: [usize; 3],
    ) -> Result<()> {
        g.gemm(&Gemm {
            m: rows,
            n: out,
            k: inn,
            a: x,
            lda: inn,
            trans_a: false,
            b: w,
            ldb: inn,
            trans_b: true,
            c: y,
            ldc: out,
            alpha: 1.0,
            beta: 0.0,
            dtype: dt,
            c_dtype: dt,
            math: self.opts.math,
        })
    }

    /// dx [rows, inn] = dy [rows, out] · w [out, inn], all of `dt`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn mm_dyw(
        &self,
        g: &G,
        dt: DType,
        dy: u64,
        w: u64,
        dx: u64,
        [rows, inn, out]: [usize; 3],
    ) -> Result<()> {
        g.gemm(&Gemm {
            m: rows,
            n: inn,
            k: out,
            a: dy,
            lda: out,
            trans_a: false,
            b: w,
            ldb: inn,
            trans_b: false,
            c: dx,
            ldc: inn,
            alpha: 1.0,
            beta: 0.0,
            dtype: dt,
            c_dtype: dt,
            math: self.opts.math,
        })
    }

    /// dw [out, inn] (f32) = dy [rows, out]ᵀ · x [rows, inn] (dy and x of `dt`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn mm_dytx(
        &self,
        g: &G,
        dt: DType,
        dy: u64,
        x: u64,
        dw: u64,
        [rows, inn, out]: [usize; 3],
    ) -> Result<()> {
        g.gemm(&Gemm {
            m: out,
            n: inn,
            k: rows,
            a: dy,
            lda: out,
            trans_a: true,
            b: x,
            ldb: inn,
            trans_b: false,
            c: dw,
            ldc: inn,
            alpha: 1.0,
            beta: 0.0,
            dtype: dt,
            c_dtype: F32,
            math: self.opts.math,
        })
    }

    /// A linear layer with bias on [rows, inn] (f32 throughout): y = x · wᵀ + b.
    unsafe fn linear(
        &self,
        g: &G,
        x: u64,
        w: Span,
        b: Span,
        [rows, inn, out]: [usize; 3],
    ) -> Result<G::Buf> {
        let y = g.alloc(rows * out * 4)?;
        self.mm_xwt(g, F32, x, self.p(g, w), g.ptr(&y), [rows, inn, out])?;
        SampleChannels::new(F32, [1, rows, out])?.add_per_sample(
            g,
            g.ptr(&y),
            self.p(g, b),
            g.ptr(&y),
        )?;
        Ok(y)
    }

    /// A linear layer's backward (f32): dw, db written; returns dx [rows, inn].
    #[allow(clippy::too_many_arguments)]
    unsafe fn linear_backward(
        &self,
        g: &G,
        x: u64,
        dy: u64,
        w: Span,
        b: Span,
        dims: [usize; 3],
    ) -> Result<G::Buf> {
        let [rows, inn, out] = dims;
        self.mm_dytx(g, F32, dy, x, self.gr(g, w), dims)?;
        SampleChannels::new(F32, [1, rows, out])?.add_per_sample_backward_e(
            g,
            dy,
            self.gr(g, b),
            false,
        )?;
        let dx = g.alloc(rows * inn * 4)?;
        self.mm_dyw(g, F32, dy, self.p(g, w), g.ptr(&dx), dims)?;
        Ok(dx)
    }

    /// BN in training mode on x [rows, c] (x kept for the backward); returns the save and y.
    unsafe fn bn_forward(
        &self,
        g: &G,
        x: G::Buf,
        rows: usize,
        cb: &ConvBn,
        act: Act,
        cfg: &BatchNormConfig,
    ) -> Result<(BnSave<G::Buf>, G::Buf)> {
        let c = cb.gamma.len;
        let bn = BatchNorm::new(self.act(), rows, c, act, cfg)?;
        let y = g.alloc(self.ab(rows * c))?;
        let mean = g.alloc(c * 4)?;
        let invstd = g.alloc(c * 4)?;
        bn.forward_train(
            g,
            g.ptr(&x),
            self.p(g, cb.gamma),
            self.p(g, cb.beta),
            None,
            g.ptr(&y),
            g.ptr(&mean),
            g.ptr(&invstd),
            self.st(g, cb.mean),
            self.st(g, cb.var),
        )?;
        Ok((
            BnSave {
                x,
                mean,
                invstd,
                bn,
            },
            y,
        ))
    }

    /// A 1 × 1 convolution (GEMM) + BN on x [rows, inn].
    #[allow(clippy::too_many_arguments)]
    unsafe fn conv_bn_forward(
        &self,
        g: &G,
        x: u64,
        rows: usize,
        inn: usize,
        cb: &ConvBn,
        act: Act,
        cfg: &BatchNormConfig,
    ) -> Result<(BnSave<G::Buf>, G::Buf)> {
        let out = cb.gamma.len;
        let conv = g.alloc(self.ab(rows * out))?;
        self.mm_xwt(
            g,
            self.act(),
            x,
            self.w(g, cb.w),
            g.ptr(&conv),
            [rows, inn, out],
        )?;
        self.bn_forward(g, conv, rows, cb, act, cfg)
    }

    /// BN backward (dγ, dβ written): returns the gradient of the BN input.
    unsafe fn bn_backward(
        &self,
        g: &G,
        save: &BnSave<G::Buf>,
        cb: &ConvBn,
        dy: u64,
    ) -> Result<G::Buf> {
        let dx = g.alloc(self.ab(save.bn.x_len()))?;
        save.bn.backward(
            g,
            true,
            g.ptr(&save.x),
            dy,
            self.p(g, cb.gamma),
            self.p(g, cb.beta),
            g.ptr(&save.mean),
            g.ptr(&save.invstd),
            g.ptr(&dx),
            self.gr(g, cb.gamma),
            self.gr(g, cb.beta),
            false,
        )?;
        Ok(dx)
    }

    /// Forward and backward of one step: gradients written to the gradient arena, running
    /// statistics updated; returns the (device) loss.
    #[allow(clippy::too_many_arguments)]
    fn forward_backward(
        &self,
        g: &G,
        crops: &[f32],
        [n, h, w]: [usize; 3],
        labels: &[u32],
        bn_cfg: &BatchNormConfig,
        dc_masks: &[Option<Vec<f32>>],
        dropout_mask: Option<&[f32]>,
    ) -> Result<(G::Buf, G::Buf)> {
        let c = self.config.in_channels;
        let k = self.config.num_classes;
        let pad: Padding = self.config.padding;
        let at = self.act();
        let ptr = |b: &G::Buf| g.ptr(b);
        // SAFETY (whole body): every buffer is allocated here with the element count its plan or
        // GEMM reads and writes, of the dtype it reads and writes (activations `at`, the
        // squeeze-excite MLP and the head after the pool f32); parameter, working-copy, gradient
        // and statistics spans lie in their arenas with the lengths the plans were built from.
        unsafe {
            // The bf16 working copy of the weights (the whole arena; padding included).
            if let Some(wc) = &self.wcast {
                cast(
                    g,
                    F32,
                    DType::BF16,
                    ptr(&self.params),
                    ptr(wc),
                    self.params_len,
                )?;
            }
            // Stem: im2col + GEMM + BN-SiLU.
            let x32 = g.upload_slice(crops)?;
            let x = self.convert(g, F32, at, x32, crops.len())?;
            let (cols, oh, ow) = stem_im2col(g, at, ptr(&x), [n, c, h, w], pad)?;
            let rows = n * oh * ow;
            let kdim = c * 9;
            drop(x);
            let (stem_save, stem_y) =
                self.conv_bn_forward(g, ptr(&cols), rows, kdim, &self.stem, Act::Silu, bn_cfg)?;
            debug_assert_eq!(self.stem.gamma.len, STEM_CH);

            // MBConv blocks. acts[i] is block i's input (acts[0] the stem's output).
            let mut acts = vec![stem_y];
            let mut saves: Vec<BlockSave<G::Buf>> = Vec::with_capacity(self.blocks.len());
            let (mut hh, mut ww) = (oh, ow);
            for (blk, mask) in self.blocks.iter().zip(dc_masks) {
                let spec = &blk.spec;
                let (hid, se, cout) = (spec.hidden(), spec.se_width(), spec.out_ch);
                let rows_in = n * hh * ww;
                let xin = ptr(acts.last().expect("block input"));
                let expand = match &blk.expand {
                    Some(e) => Some(self.conv_bn_forward(
                        g,
                        xin,
                        rows_in,
                        spec.in_ch,
                        e,
                        Act::Silu,
                        bn_cfg,
                    )?),
                    None => None,
                };
                let hin = expand.as_ref().map_or(xin, |(_, y)| ptr(y));
                let (dw_plan, oh, ow) = depthwise_plan(at, pad, [n, hh, ww, hid], spec)?;
                let rows_out = n * oh * ow;
                let dwc = g.alloc(self.ab(dw_plan.output_len()))?;
                dw_plan.forward(g, hin, self.w(g, blk.dw.w), ptr(&dwc))?;
                let (dw_save, d) = self.bn_forward(g, dwc, rows_out, &blk.dw, Act::Silu, bn_cfg)?;
                // Squeeze-excite: pooled in the activations' dtype, the MLP in f32.
                let sc = SampleChannels::new(at, [n, oh * ow, hid])?;
                let pooled_a = g.alloc(self.ab(n * hid))?;
                sc.global_avg_pool(g, ptr(&d), ptr(&pooled_a))?;
                let pooled = self.convert(g, at, F32, pooled_a, n * hid)?;
                let a = self.linear(g, ptr(&pooled), blk.se1_w, blk.se1_b, [n, hid, se])?;
                let a2 = g.alloc(n * se * 4)?;
                unary(g, Unary::Silu, F32, ptr(&a), ptr(&a2), n * se)?;
                let s = self.linear(g, ptr(&a2), blk.se2_w, blk.se2_b, [n, se, hid])?;
                let s2_32 = g.alloc(n * hid * 4)?;
                unary(g, Unary::Sigmoid, F32, ptr(&s), ptr(&s2_32), n * hid)?;
                let s2 = self.convert(g, F32, at, s2_32, n * hid)?;
                let excited = g.alloc(self.ab(rows_out * hid))?;
                sc.scale_channels(g, ptr(&d), ptr(&s2), ptr(&excited))?;
                let (project, p) = self.conv_bn_forward(
                    g,
                    ptr(&excited),
                    rows_out,
                    hid,
                    &blk.project,
                    Act::None,
                    bn_cfg,
                )?;
                let mut mask_buf = None;
                if spec.residual() {
                    if let Some(m) = mask {
                        let wide: Vec<f32> = m
                            .iter()
                            .flat_map(|&v| std::iter::repeat_n(v, cout))
                            .collect();
                        let mb = self.upload_act(g, &wide)?;
                        SampleChannels::new(at, [n, oh * ow, cout])?.scale_channels(
                            g,
                            ptr(&p),
                            ptr(&mb),
                            ptr(&p),
                        )?;
                        mask_buf = Some(mb);
                    }
                    add(g, at, ptr(&p), xin, ptr(&p), rows_out * cout)?;
                }
                acts.push(p);
                saves.push(BlockSave {
                    expand,
                    dw_plan,
                    dw: dw_save,
                    d,
                    pooled,
                    a,
                    a2,
                    s,
                    s2,
                    excited,
                    project,
                    mask: mask_buf,
                    rows_in,
                    rows_out,
                    positions_out: oh * ow,
                });
                hh = oh;
                ww = ow;
            }

            // Head: top conv + BN-SiLU, pool, then f32: dropout, classifier, loss.
            let rows_top = n * hh * ww;
            let last_ch = BLOCKS[BLOCKS.len() - 1].out_ch;
            let last = acts.pop().expect("trunk output");
            let (top_save, t) = self.conv_bn_forward(
                g,
                ptr(&last),
                rows_top,
                last_ch,
                &self.top,
                Act::Silu,
                bn_cfg,
            )?;
            let top_sc = SampleChannels::new(at, [n, hh * ww, TOP_CH])?;
            let pooled_a = g.alloc(self.ab(n * TOP_CH))?;
            top_sc.global_avg_pool(g, ptr(&t), ptr(&pooled_a))?;
            drop(t);
            let pooled = self.convert(g, at, F32, pooled_a, n * TOP_CH)?;
            let feat_sc = SampleChannels::new(F32, [n, 1, TOP_CH])?;
            let dmask = match dropout_mask {
                Some(m) => Some(g.upload_slice(m)?),
                None => None,
            };
            let dropped = match &dmask {
                Some(m) => {
                    let d = g.alloc(n * TOP_CH * 4)?;
                    feat_sc.scale_channels(g, ptr(&pooled), ptr(m), ptr(&d))?;
                    drop(pooled);
                    d
                }
                None => pooled,
            };
            let logits = self.linear(g, ptr(&dropped), self.cls_w, self.cls_b, [n, TOP_CH, k])?;
            let ce = CrossEntropy::new(F32, n, k, self.opts.label_smoothing)?;
            let lab = g.upload_slice(labels)?;
            let lse = g.alloc(n * 4)?;
            let loss = g.alloc(4)?;
            ce.forward_labels(g, ptr(&logits), ptr(&lab), ptr(&lse), ptr(&loss))?;

            // Backward.
            let one = g.upload_slice(&[1f32])?;
            let dlogits = g.alloc(n * k * 4)?;
            ce.backward_labels(
                g,
                ptr(&logits),
                ptr(&lab),
                ptr(&lse),
                ptr(&one),
                ptr(&dlogits),
            )?;
            drop((lse, lab, one));
            let dfeat = self.linear_backward(
                g,
                ptr(&dropped),
                ptr(&dlogits),
                self.cls_w,
                self.cls_b,
                [n, TOP_CH, k],
            )?;
            drop((dlogits, dropped));
            if let Some(m) = &dmask {
                feat_sc.scale_channels(g, ptr(&dfeat), ptr(m), ptr(&dfeat))?;
            }
            let dfeat_a = self.convert(g, F32, at, dfeat, n * TOP_CH)?;
            let dt = g.alloc(self.ab(rows_top * TOP_CH))?;
            top_sc.global_avg_pool_backward(g, ptr(&dfeat_a), ptr(&dt), false)?;
            drop(dfeat_a);
            let dtc = self.bn_backward(g, &top_save, &self.top, ptr(&dt))?;
            drop((dt, top_save));
            let dims = [rows_top, last_ch, TOP_CH];
            self.mm_dytx(g, at, ptr(&dtc), ptr(&last), self.gr(g, self.top.w), dims)?;
            let mut dcur = g.alloc(self.ab(rows_top * last_ch))?;
            self.mm_dyw(g, at, ptr(&dtc), self.w(g, self.top.w), ptr(&dcur), dims)?;
            drop((dtc, last));

            for (blk, sv) in self.blocks.iter().zip(saves).rev() {
                let spec = &blk.spec;
                let (hid, se, cout) = (spec.hidden(), spec.se_width(), spec.out_ch);
                let block_in = acts.pop().expect("block input");
                let xin = ptr(&block_in);
                // Through drop-connect: the branch's gradient is dout · mask; the skip's dout.
                let dp = match &sv.mask {
                    Some(m) => {
                        let b = g.alloc(self.ab(sv.rows_out * cout))?;
                        SampleChannels::new(at, [n, sv.positions_out, cout])?.scale_channels(
                            g,
                            ptr(&dcur),
                            ptr(m),
                            ptr(&b),
                        )?;
                        Some(b)
                    }
                    None => None,
                };
                let dpc = self.bn_backward(
                    g,
                    &sv.project,
                    &blk.project,
                    dp.as_ref().map_or(ptr(&dcur), ptr),
                )?;
                drop(dp);
                let dims = [sv.rows_out, hid, cout];
                self.mm_dytx(
                    g,
                    at,
                    ptr(&dpc),
                    ptr(&sv.excited),
                    self.gr(g, blk.project.w),
                    dims,
                )?;
                let dexc = g.alloc(self.ab(sv.rows_out * hid))?;
                self.mm_dyw(g, at, ptr(&dpc), self.w(g, blk.project.w), ptr(&dexc), dims)?;
                drop(dpc);
                // Squeeze-excite: the scale's gradient in the activations' dtype, the MLP in f32.
                let sc = SampleChannels::new(at, [n, sv.positions_out, hid])?;
                let ds_a = g.alloc(self.ab(n * hid))?;
                sc.scale_channels_backward_s(g, ptr(&dexc), ptr(&sv.d), ptr(&ds_a), false)?;
                let ds = self.convert(g, at, F32, ds_a, n * hid)?;
                activation_backward(
                    g,
                    ActivationGrad::Sigmoid,
                    F32,
                    ptr(&sv.s),
                    ptr(&ds),
                    ptr(&ds),
                    n * hid,
                )?;
                let da = self.linear_backward(
                    g,
                    ptr(&sv.a2),
                    ptr(&ds),
                    blk.se2_w,
                    blk.se2_b,
                    [n, se, hid],
                )?;
                activation_backward(
                    g,
                    ActivationGrad::Silu,
                    F32,
                    ptr(&sv.a),
                    ptr(&da),
                    ptr(&da),
                    n * se,
                )?;
                let dpooled = self.linear_backward(
                    g,
                    ptr(&sv.pooled),
                    ptr(&da),
                    blk.se1_w,
                    blk.se1_b,
                    [n, hid, se],
                )?;
                let dpooled_a = self.convert(g, F32, at, dpooled, n * hid)?;
                // The depthwise output's whole gradient: through the multiply and the pool.
                sc.scale_channels_backward_x_pooled(
                    g,
                    ptr(&dexc),
                    ptr(&sv.s2),
                    ptr(&dpooled_a),
                    ptr(&dexc),
                )?;
                drop((ds, da, dpooled_a));
                let ddc = self.bn_backward(g, &sv.dw, &blk.dw, ptr(&dexc))?;
                drop(dexc);
                let hin = sv.expand.as_ref().map_or(xin, |(_, y)| ptr(y));
                sv.dw_plan
                    .backward_w(g, hin, ptr(&ddc), self.gr(g, blk.dw.w), false)?;
                let dh = g.alloc(self.ab(sv.dw_plan.input_len()))?;
                sv.dw_plan
                    .backward_x(g, ptr(&ddc), self.w(g, blk.dw.w), ptr(&dh))?;
                drop(ddc);
                let din = match (&blk.expand, &sv.expand) {
                    (Some(e), Some((esave, _))) => {
                        let dec = self.bn_backward(g, esave, e, ptr(&dh))?;
                        drop(dh);
                        let dims = [sv.rows_in, spec.in_ch, hid];
                        self.mm_dytx(g, at, ptr(&dec), xin, self.gr(g, e.w), dims)?;
                        let din = g.alloc(self.ab(sv.rows_in * spec.in_ch))?;
                        self.mm_dyw(g, at, ptr(&dec), self.w(g, e.w), ptr(&din), dims)?;
                        din
                    }
                    _ => dh,
                };
                if spec.residual() {
                    add(
                        g,
                        at,
                        ptr(&din),
                        ptr(&dcur),
                        ptr(&din),
                        sv.rows_in * spec.in_ch,
                    )?;
                }
                dcur = din;
                drop(block_in);
            }

            // Stem: weight gradient only.
            let dsc = self.bn_backward(g, &stem_save, &self.stem, ptr(&dcur))?;
            self.mm_dytx(
                g,
                at,
                ptr(&dsc),
                ptr(&cols),
                self.gr(g, self.stem.w),
                [rows, kdim, STEM_CH],
            )?;
            Ok((loss, logits))
        }
    }
}

fn check_lr(lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "learning rate must be finite and >= 0, got {lr}"
        )));
    }
    Ok(())
}
