//! EfficientNet-B0 for training: unfolded parameters (torchvision names) on the autograd tape,
//! BN in training mode with running statistics, dropout before the classifier and drop-connect
//! (stochastic depth, rate `drop_connect_rate · block / 16`) on the residual branches.
//! Generic over the scalar (f32 to train, f64 for gradient checks).

use super::config::{EfficientNetConfig, BLOCKS};
use super::weights::{self, block_keys, StateDict};
use super::EfficientNet;
use crate::autograd::{Float, ParamKind, Params, Tape, Var};
use crate::error::{Error, Result};
use crate::ops::norm::{Act, BatchNormConfig, Running};
use crate::ops::{conv, elementwise as ew};
use crate::tensor::Tensor;
use rand::Rng;

/// Regularisers and BN convention of a training run (0 disables a regulariser).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Regularisation {
    /// Dropout before the classifier (torchvision / Keras: 0.2).
    pub dropout: f64,
    /// Largest drop-connect rate (block b of 16 uses rate · b / 16; torchvision / Keras: 0.2).
    pub drop_connect_rate: f64,
    /// BN running-statistics momentum, torch convention (0.1; Keras 0.99 = 0.01 here).
    pub bn_momentum: f64,
}

impl Default for Regularisation {
    fn default() -> Self {
        Regularisation {
            dropout: 0.2,
            drop_connect_rate: 0.2,
            bn_momentum: 0.1,
        }
    }
}

/// Parameter indices of one conv + BN pair.
#[derive(Clone, Copy)]
struct ConvBn {
    w: usize,
    gamma: usize,
    beta: usize,
    mean: usize,
    var: usize,
}

struct BlockIdx {
    expand: Option<ConvBn>,
    dw: ConvBn,
    se1_w: usize,
    se1_b: usize,
    se2_w: usize,
    se2_b: usize,
    project: ConvBn,
}

pub struct TrainableEfficientNet<T: Float> {
    config: EfficientNetConfig,
    params: Params<T>,
    stem: ConvBn,
    blocks: Vec<BlockIdx>,
    top: ConvBn,
    cls_w: usize,
    cls_b: usize,
    /// Parameters `0..base_len` are EfficientNet-B0's; later ones are training-only heads
    /// (domain-adversarial branch, MIL attention) added with [`Self::add_head_param`].
    base_len: usize,
}

impl<T: Float> TrainableEfficientNet<T> {
    /// torchvision's initialisation (see [`EfficientNet::new`]).
    pub fn new(config: EfficientNetConfig, seed: u64) -> Result<Self> {
        let state = weights::init_state_dict(&config, seed);
        Self::from_state_dict(&state, config)
    }

    /// From torchvision-named f32 tensors (validated against `config`'s shapes).
    pub fn from_state_dict(state: &StateDict, config: EfficientNetConfig) -> Result<Self> {
        weights::validate(state, &config)?;
        let mut params = Params::new();
        for (name, shape) in weights::expected_shapes(&config) {
            let data: Vec<T> = state[&name]
                .as_f32()?
                .iter()
                .map(|&v| T::from_f64(v as f64))
                .collect();
            let kind = if name.ends_with("running_mean") || name.ends_with("running_var") {
                ParamKind::Buffer
            } else if shape.len() >= 2 {
                ParamKind::Weight
            } else {
                ParamKind::Bias
            };
            params.add(&name, &shape, data, kind)?;
        }
        let cb = |p: &Params<T>, conv: &str, bn: &str| -> Result<ConvBn> {
            Ok(ConvBn {
                w: p.index(conv)?,
                gamma: p.index(&format!("{bn}.weight"))?,
                beta: p.index(&format!("{bn}.bias"))?,
                mean: p.index(&format!("{bn}.running_mean"))?,
                var: p.index(&format!("{bn}.running_var"))?,
            })
        };
        let stem = cb(&params, "features.0.0.weight", "features.0.1")?;
        let mut blocks = Vec::new();
        for spec in &BLOCKS {
            let k = block_keys(spec);
            let pair = |p: &str| cb(&params, &format!("{p}.0.weight"), &format!("{p}.1"));
            blocks.push(BlockIdx {
                expand: k.expand.as_deref().map(pair).transpose()?,
                dw: pair(&k.dw)?,
                se1_w: params.index(&format!("{}.fc1.weight", k.se))?,
                se1_b: params.index(&format!("{}.fc1.bias", k.se))?,
                se2_w: params.index(&format!("{}.fc2.weight", k.se))?,
                se2_b: params.index(&format!("{}.fc2.bias", k.se))?,
                project: pair(&k.project)?,
            });
        }
        let top = cb(&params, "features.8.0.weight", "features.8.1")?;
        Ok(TrainableEfficientNet {
            config,
            stem,
            blocks,
            top,
            cls_w: params.index("classifier.1.weight")?,
            cls_b: params.index("classifier.1.bias")?,
            base_len: params.len(),
            params,
        })
    }

    /// ImageNet (or any torchvision-format) initialisation for a new task: the stem is expanded to
    /// `config.in_channels` (channel i = source channel i % source channels, REFERENCE §1) and, when
    /// the source classifier does not have `config.num_classes` outputs, a fresh classifier is drawn
    /// with torchvision's initialisation from `seed`. Every other tensor must match EfficientNet-B0.
    pub fn from_pretrained(
        state: &StateDict,
        config: EfficientNetConfig,
        seed: u64,
    ) -> Result<Self> {
        let mut s = state.clone();
        s.retain(|k, _| !k.ends_with("num_batches_tracked"));
        let stem_in = s
            .get("features.0.0.weight")
            .map(|t| t.shape().get(1).copied().unwrap_or(0))
            .ok_or_else(|| {
                Error::MissingKey("missing key \"features.0.0.weight\" (stem convolution)".into())
            })?;
        if stem_in != config.in_channels {
            weights::expand_stem_channels(&mut s, config.in_channels)?;
        }
        let classes = s.get("classifier.1.weight").map(|t| t.shape()[0]);
        if classes != Some(config.num_classes) {
            let fresh = weights::init_state_dict(&config, seed);
            for k in ["classifier.1.weight", "classifier.1.bias"] {
                s.insert(k.to_string(), fresh[k].clone());
            }
        }
        Self::from_state_dict(&s, config)
    }

    pub fn config(&self) -> &EfficientNetConfig {
        &self.config
    }
    pub fn params(&self) -> &Params<T> {
        &self.params
    }
    pub fn params_mut(&mut self) -> &mut Params<T> {
        &mut self.params
    }

    /// Adds a training-only head parameter (e.g. `domain_head.0.weight`): optimised and
    /// checkpointed with the rest ([`Self::full_state_dict`]) but not part of [`Self::state_dict`]
    /// nor of the inference model. Returns its index in [`Self::params`].
    pub fn add_head_param(
        &mut self,
        name: &str,
        shape: &[usize],
        value: Vec<T>,
        kind: ParamKind,
    ) -> Result<usize> {
        if self.params.index(name).is_ok() {
            return Err(Error::InvalidArgument(format!(
                "head parameter {name:?} already exists"
            )));
        }
        self.params.add(name, shape, value, kind)
    }

    /// Number of EfficientNet-B0 tensors (parameters `0..n`); heads follow.
    pub fn num_base_params(&self) -> usize {
        self.base_len
    }

    /// Every EfficientNet parameter and buffer as f32 tensors with torchvision names (training-only
    /// heads excluded).
    pub fn state_dict(&self) -> Result<StateDict> {
        self.collect_state(self.base_len)
    }

    /// [`Self::state_dict`] plus the training-only heads (what checkpoints hold).
    pub fn full_state_dict(&self) -> Result<StateDict> {
        self.collect_state(self.params.len())
    }

    fn collect_state(&self, upto: usize) -> Result<StateDict> {
        let mut s = StateDict::new();
        for (name, shape, _, v) in self.params.iter().take(upto) {
            let data = v.iter().map(|x| x.to_f64() as f32).collect();
            s.insert(name.to_string(), Tensor::from_f32(shape, data)?);
        }
        Ok(s)
    }

    /// The inference model (BN folded) with the current weights.
    pub fn to_inference(&self) -> Result<EfficientNet> {
        EfficientNet::from_state_dict(self.state_dict()?, self.config.padding, self.config.bn_eps)
    }

    fn bn_cfg(&self, reg: &Regularisation) -> BatchNormConfig {
        BatchNormConfig {
            eps: self.config.bn_eps as f64,
            momentum: reg.bn_momentum,
            unbiased_running_var: true,
        }
    }

    fn conv_bn(
        &mut self,
        tape: &mut Tape<T>,
        x: &Var,
        cb: ConvBn,
        act: Act,
        bn: &BatchNormConfig,
        conv_fn: impl FnOnce(&mut Tape<T>, &Var, &Var) -> Result<Var>,
    ) -> Result<Var> {
        let w = tape.param(&self.params, cb.w);
        let y = conv_fn(tape, x, &w)?;
        let g = tape.param(&self.params, cb.gamma);
        let b = tape.param(&self.params, cb.beta);
        let (mean, var) = self.params.pair_mut(cb.mean, cb.var);
        let z = crate::ops::norm::batch_norm(tape, &y, &g, &b, Running { mean, var }, bn, act)?;
        tape.release(&y);
        Ok(z)
    }

    /// Logits [N, classes] for crops `x` (N, C, H, W row-major). In a training tape BN uses batch
    /// statistics (and updates the running ones) and dropout / drop-connect draw from `rng`.
    pub fn forward(
        &mut self,
        tape: &mut Tape<T>,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
        reg: &Regularisation,
        rng: &mut impl Rng,
    ) -> Result<Var> {
        let pooled = self.forward_features(tape, x, n, h, w, reg, rng)?;
        self.classify(tape, &pooled, reg, rng)
    }

    /// [`Self::forward`] returning the globally pooled features [N, 1280] as well as the logits
    /// (the same ops and draws from `rng` as `forward`).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with_features(
        &mut self,
        tape: &mut Tape<T>,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
        reg: &Regularisation,
        rng: &mut impl Rng,
    ) -> Result<(Var, Var)> {
        let pooled = self.forward_features(tape, x, n, h, w, reg, rng)?;
        let logits = self.classify(tape, &pooled, reg, rng)?;
        Ok((pooled, logits))
    }

    /// The classifier head on pooled features [N, 1280] (or attention-pooled bags): dropout
    /// (training tape) then the linear layer `classifier.1`.
    pub fn classify(
        &mut self,
        tape: &mut Tape<T>,
        features: &Var,
        reg: &Regularisation,
        rng: &mut impl Rng,
    ) -> Result<Var> {
        let dropped = ew::dropout(tape, features, reg.dropout, rng)?;
        let (cw, cb) = (
            tape.param(&self.params, self.cls_w),
            tape.param(&self.params, self.cls_b),
        );
        ew::linear(tape, &dropped, &cw, Some(&cb))
    }

    /// Globally average-pooled features [N, 1280] of the convolutional trunk (before dropout and
    /// the classifier).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_features(
        &mut self,
        tape: &mut Tape<T>,
        x: &[T],
        n: usize,
        h: usize,
        w: usize,
        reg: &Regularisation,
        rng: &mut impl Rng,
    ) -> Result<Var> {
        let c = self.config.in_channels;
        if x.len() != n * c * h * w || n == 0 {
            return Err(Error::Shape(format!(
                "crops must be (N, {c}, H, W) with N > 0: got {} values for N={n}, H={h}, W={w}",
                x.len()
            )));
        }
        if let Some(i) = {
            use rayon::prelude::*;
            x.par_iter().position_first(|v| !v.is_finite())
        } {
            return Err(Error::NonFinite(format!(
                "crop {} contains a non-finite value",
                i / (c * h * w)
            )));
        }
        // NCHW → NHWC.
        let mut nhwc = crate::autograd::Buf::<T>::alloc(x.len());
        {
            use rayon::prelude::*;
            nhwc.par_chunks_mut(c * h * w)
                .zip(x.par_chunks(c * h * w))
                .for_each(|(dst, src)| {
                    for (ch, plane) in src.chunks_exact(h * w).enumerate() {
                        for (p, &v) in plane.iter().enumerate() {
                            dst[p * c + ch] = v;
                        }
                    }
                });
        }
        let bn = self.bn_cfg(reg);
        let pad = self.config.padding;
        let input = tape.input_buf(&[n, h, w, c], nhwc, false)?;
        let stem = self.stem;
        let mut cur = self.conv_bn(tape, &input, stem, Act::Silu, &bn, |t, x, w| {
            conv::conv2d(t, x, w, 2, pad)
        })?;
        tape.release(&input);
        let nblocks = BLOCKS.len();
        for (bi, spec) in BLOCKS.iter().enumerate() {
            let idx = &self.blocks[bi];
            let (expand, dw, project) = (idx.expand, idx.dw, idx.project);
            let se = (idx.se1_w, idx.se1_b, idx.se2_w, idx.se2_b);
            let block_in = cur.clone();
            let mut h_act = cur.clone();
            if let Some(e) = expand {
                h_act = self.conv_bn(tape, &h_act, e, Act::Silu, &bn, |t, x, w| {
                    conv::pointwise(t, x, w)
                })?;
            }
            let d = self.conv_bn(tape, &h_act, dw, Act::Silu, &bn, |t, x, w| {
                conv::depthwise(t, x, w, spec.stride, pad)
            })?;
            if expand.is_some() {
                tape.release(&h_act);
            }
            // Squeeze-excite.
            let pooled = ew::global_avg_pool(tape, &d)?;
            let (w1, b1, w2, b2) = (
                tape.param(&self.params, se.0),
                tape.param(&self.params, se.1),
                tape.param(&self.params, se.2),
                tape.param(&self.params, se.3),
            );
            let a = ew::linear(tape, &pooled, &w1, Some(&b1))?;
            let a2 = ew::silu(tape, &a);
            let s = ew::linear(tape, &a2, &w2, Some(&b2))?;
            let s2 = ew::sigmoid(tape, &s);
            let excited = ew::scale_channels(tape, &d, &s2)?;
            for v in [&pooled, &a, &a2, &s, &s2, &d] {
                tape.release(v);
            }
            let p = self.conv_bn(tape, &excited, project, Act::None, &bn, |t, x, w| {
                conv::pointwise(t, x, w)
            })?;
            tape.release(&excited);
            cur = if spec.residual() {
                let rate = reg.drop_connect_rate * bi as f64 / nblocks as f64;
                let kept = ew::drop_connect(tape, &p, rate, rng)?;
                let out = ew::add(tape, &kept, &block_in)?;
                tape.release(&p);
                tape.release(&kept);
                out
            } else {
                p
            };
            tape.release(&block_in);
        }
        let top = self.top;
        let t = self.conv_bn(tape, &cur, top, Act::Silu, &bn, |t, x, w| {
            conv::pointwise(t, x, w)
        })?;
        tape.release(&cur);
        let pooled = ew::global_avg_pool(tape, &t)?;
        tape.release(&t);
        Ok(pooled)
    }
}
