//! Domain-adversarial training with a gradient reversal layer (Ganin & Lempitsky 2015; CP-CNN paper
//! Methods, "Gradient reversal layer"; REFERENCE §2 alternatives).
//!
//! The paper: "the addition of a classifier branch for domain classification and gradient reversal
//! layer. The branch for domain classification consisted of three dense layers (of sizes 1024, 512
//! and 128) and the softmax function for class prediction", plates as domains. It names neither the
//! activations nor where the branch attaches. Chosen here: the branch takes the globally pooled
//! 1280-d features (the profile features, before dropout and the treatment classifier), through
//! GRL(λ) → Dense 1024 → ReLU → Dense 512 → ReLU → Dense 128 → ReLU → Dense n_domains → softmax
//! cross-entropy (Ganin & Lempitsky's domain classifier uses ReLU hidden layers). The total loss is
//! `treatment CE + weight · domain CE`; the GRL multiplies the domain gradient reaching the trunk by
//! −λ, so the head learns to tell plates apart while the trunk learns to hide them.
//!
//! λ: constant (default 1.0, what a plain GRL layer does and what a host stepping batch by batch
//! can reproduce), or Ganin's schedule λ = max · (2 / (1 + exp(−10 p)) − 1) over training progress
//! p ∈ [0, 1] (p = (epochs done + fraction of the current epoch) / epochs in `fit`; epochs done /
//! epochs in a bare step).
//!
//! The head's tensors `domain_head.{i}.weight` [out, in] / `domain_head.{i}.bias` [out] (i = 0..3)
//! live in the model's parameter set after the EfficientNet ones: optimised, weight-decayed and
//! checkpointed with them, never exported (`state_dict`, the inference model). They are drawn as
//! torch.nn.Linear does (U(−1/√in, 1/√in) for weight and bias) from the trainer's seed.

use crate::autograd::{ParamKind, Tape, Var};
use crate::error::{Error, Result};
use crate::models::efficientnet::TrainableEfficientNet;
use crate::ops::adversarial::{gradient_reversal, relu};
use crate::ops::elementwise::linear;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// λ of the gradient reversal layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GrlLambda {
    /// λ throughout.
    Constant(f64),
    /// Ganin & Lempitsky: λ = max · (2 / (1 + exp(−10 p)) − 1), p the training progress in [0, 1].
    Ganin { max: f64 },
}

impl GrlLambda {
    pub fn at(&self, progress: f64) -> f64 {
        match *self {
            GrlLambda::Constant(l) => l,
            GrlLambda::Ganin { max } => {
                let p = progress.clamp(0.0, 1.0);
                max * (2.0 / (1.0 + (-10.0 * p).exp()) - 1.0)
            }
        }
    }
}

/// The domain-adversarial branch of a training run.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainAdversarial {
    /// Number of domains (plates); domain labels are 0..domains.
    pub domains: usize,
    pub lambda: GrlLambda,
    /// Weight of the domain cross-entropy in the total loss.
    pub weight: f64,
    /// Hidden dense layers (CP-CNN paper: 1024, 512, 128), each followed by ReLU.
    pub hidden: Vec<usize>,
}

impl Default for DomainAdversarial {
    /// λ = 1 constant, weight 1, hidden [1024, 512, 128]; `domains` must be set (0 is rejected).
    fn default() -> Self {
        DomainAdversarial {
            domains: 0,
            lambda: GrlLambda::Constant(1.0),
            weight: 1.0,
            hidden: vec![1024, 512, 128],
        }
    }
}

impl DomainAdversarial {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.domains < 2 {
            return bad(format!(
                "domain_adversarial.domains must be at least 2 (the number of plates), got {}",
                self.domains
            ));
        }
        let lam = match self.lambda {
            GrlLambda::Constant(l) | GrlLambda::Ganin { max: l } => l,
        };
        if !(lam.is_finite() && lam >= 0.0) {
            return bad(format!(
                "domain_adversarial.lambda must be a finite number >= 0, got {lam}"
            ));
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return bad(format!(
                "domain_adversarial.weight must be a finite number >= 0, got {}",
                self.weight
            ));
        }
        if let Some(i) = self.hidden.iter().position(|&h| h == 0 || h > 1 << 16) {
            return bad(format!(
                "domain_adversarial.hidden[{i}] is {}; expected 1..=65536",
                self.hidden[i]
            ));
        }
        Ok(())
    }

    /// Checks domain labels (one per crop) against `domains`; the error names the crop.
    pub fn check_labels(&self, domains: &[u32]) -> Result<()> {
        if let Some((i, &d)) = domains
            .iter()
            .enumerate()
            .find(|(_, &d)| d as usize >= self.domains)
        {
            return Err(Error::InvalidArgument(format!(
                "domain label {d} of crop {i} is out of range: domain_adversarial has {} domains (0..={})",
                self.domains,
                self.domains - 1
            )));
        }
        Ok(())
    }
}

/// Parameter indices (weight, bias) of the head's dense layers in the model's parameter set.
#[derive(Clone, Debug)]
pub(crate) struct DomainHead {
    layers: Vec<(usize, usize)>,
}

/// Draws a torch.nn.Linear-initialised dense layer `prefix.weight` / `prefix.bias` into `model`.
pub(crate) fn add_dense(
    model: &mut TrainableEfficientNet<f32>,
    prefix: &str,
    inp: usize,
    out: usize,
    bias: bool,
    rng: &mut ChaCha8Rng,
) -> Result<(usize, Option<usize>)> {
    let bound = 1.0 / (inp as f64).sqrt();
    let w: Vec<f32> = (0..out * inp)
        .map(|_| rng.gen_range(-bound..bound) as f32)
        .collect();
    let wi = model.add_head_param(
        &format!("{prefix}.weight"),
        &[out, inp],
        w,
        ParamKind::Weight,
    )?;
    let bi = if bias {
        let b: Vec<f32> = (0..out)
            .map(|_| rng.gen_range(-bound..bound) as f32)
            .collect();
        Some(model.add_head_param(&format!("{prefix}.bias"), &[out], b, ParamKind::Bias)?)
    } else {
        None
    };
    Ok((wi, bi))
}

/// Width of the pooled features (the classifier's input).
pub(crate) fn feature_dim(model: &TrainableEfficientNet<f32>) -> Result<usize> {
    let p = model.params();
    let i = p.index("classifier.1.weight")?;
    Ok(p.shape(i)[1])
}

impl DomainHead {
    /// Adds the head's tensors to `model` (drawn from `seed`).
    pub(crate) fn attach(
        model: &mut TrainableEfficientNet<f32>,
        o: &DomainAdversarial,
        seed: u64,
    ) -> Result<Self> {
        o.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xD0_4A1E_AD5E_0000);
        let mut inp = feature_dim(model)?;
        let mut layers = Vec::new();
        for (i, &out) in o.hidden.iter().chain([&o.domains]).enumerate() {
            let (w, b) = add_dense(model, &format!("domain_head.{i}"), inp, out, true, &mut rng)?;
            layers.push((w, b.unwrap_or(w)));
            inp = out;
        }
        Ok(DomainHead { layers })
    }

    /// Domain logits [N, domains] of pooled features [N, D] through GRL(λ) and the dense layers.
    pub(crate) fn forward(
        &self,
        tape: &mut Tape<f32>,
        model: &TrainableEfficientNet<f32>,
        features: &Var,
        lambda: f64,
    ) -> Result<Var> {
        let mut x = gradient_reversal(tape, features, lambda)?;
        let last = self.layers.len() - 1;
        for (i, &(w, b)) in self.layers.iter().enumerate() {
            let (wv, bv) = (tape.param(model.params(), w), tape.param(model.params(), b));
            let y = linear(tape, &x, &wv, Some(&bv))?;
            x = if i < last { relu(tape, &y) } else { y };
        }
        Ok(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ganin_schedule_closed_form() {
        let g = GrlLambda::Ganin { max: 1.0 };
        assert_eq!(g.at(0.0), 0.0);
        assert!((g.at(1.0) - (2.0 / (1.0 + (-10f64).exp()) - 1.0)).abs() < 1e-15);
        assert!((g.at(0.5) - 0.986_614_298_151_430_3).abs() < 1e-12);
        assert_eq!(GrlLambda::Constant(0.3).at(0.9), 0.3);
        let o = DomainAdversarial {
            domains: 3,
            ..Default::default()
        };
        o.validate().unwrap();
        let e = o.check_labels(&[0, 2, 3]).unwrap_err().to_string();
        assert!(e.contains("domain label 3 of crop 2"), "{e}");
        assert!(DomainAdversarial::default().validate().is_err());
    }

    #[test]
    fn reversal_flips_the_sign_of_the_domain_gradient_reaching_the_features() {
        use crate::models::efficientnet::{EfficientNetConfig, Padding};
        let cfg = EfficientNetConfig {
            in_channels: 5,
            num_classes: 3,
            padding: Padding::Symmetric,
            bn_eps: 1e-5,
        };
        let mut model = TrainableEfficientNet::<f32>::new(cfg, 1).unwrap();
        let o = DomainAdversarial {
            domains: 2,
            hidden: vec![16, 8],
            ..Default::default()
        };
        let head = DomainHead::attach(&mut model, &o, 3).unwrap();
        assert_eq!(model.params().len(), model.num_base_params() + 6);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let feats: Vec<f32> = (0..4 * 1280).map(|_| rng.gen_range(-1.0..1.0)).collect();
        // (gradient reaching the features, gradient of the head's first weight)
        let run = |model: &mut TrainableEfficientNet<f32>, lambda: f64| -> (Vec<f32>, Vec<f32>) {
            model.params_mut().zero_grad();
            let mut tape = Tape::<f32>::new(true);
            let x = tape.input(&[4, 1280], feats.clone(), true).unwrap();
            let z = head.forward(&mut tape, model, &x, lambda).unwrap();
            let l =
                crate::ops::loss::softmax_cross_entropy(&mut tape, &z, &[0, 1, 1, 0], 0.0).unwrap();
            let g = tape
                .backward_with(&l, vec![1.0], model.params_mut())
                .unwrap();
            let dx = g.get(&x).unwrap().to_vec();
            let i = model.params().index("domain_head.0.weight").unwrap();
            (dx, model.params().grad(i).to_vec())
        };
        let (plain, wp) = run(&mut model, -1.0); // λ = −1: the un-reversed gradient
        let (rev, wr) = run(&mut model, 1.0);
        let (half, _) = run(&mut model, 0.5);
        let (zero, wz) = run(&mut model, 0.0);
        assert!(plain.iter().any(|&v| v.abs() > 1e-6));
        for i in 0..plain.len() {
            assert_eq!(rev[i], -plain[i]);
            assert_eq!(half[i], -0.5 * plain[i]);
            assert_eq!(zero[i], 0.0);
        }
        // The head itself learns to classify domains whatever λ: its gradients are unchanged.
        assert_eq!(wp, wr);
        assert_eq!(wp, wz);
        assert!(wp.iter().any(|&v| v != 0.0));
    }
}
