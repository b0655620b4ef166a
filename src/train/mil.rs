//! Attention multiple-instance learning (CP-CNN paper Methods, "Multiple instance learning with
//! attention"; Ilse, Tomczak & Welling 2018; REFERENCE §2 alternatives).
//!
//! The paper's bags: "1) bag size is 16, 2) the bag is labeled as negative control class (DMSO or
//! EMPTY) if all cells in the bag come from negative control wells, 3) bags are labeled with a
//! treatment class when it contains examples of negative controls mixed with examples of the
//! corresponding treatment. 4) Treated bags have 4 to 12 examples (25-75%) belonging to the
//! treatment class and the rest are randomly sampled from negative controls"; "each epoch makes a
//! model pass over bags of all treatments in a balanced way. Bags are resampled at every epoch, and
//! for each treatment class we generate the same number of bags"; batches of 32 bags.
//!
//! Here ([`mil_epoch`]): every non-empty class gets the same number of bags B =
//! max(1, round(m / t̄)), m the median per-class crop count (as [`super::sampler::balanced_epoch`])
//! and t̄ = (min_treated + max_treated) / 2, so an epoch sees about m crops of every treatment. A
//! treated bag of class y holds t ~ U{min_treated..=max_treated} crops of y — the class's crops
//! spread evenly over its bags (each crop ⌊T/n⌋ or ⌈T/n⌉ times, T = Σ t) — and bag_size − t crops
//! drawn uniformly from the pooled control crops (without replacement within a bag when there are
//! enough). A control class's bags hold bag_size crops of that class only, labelled with it. Crops
//! are shuffled within each bag and bags across the epoch. Deterministic given the RNG.
//!
//! The model ([`MilHead`]): the pooled 1280-d features hᵢ of a bag's crops, plain (non-gated)
//! attention aᵢ = softmaxᵢ(wᵀ tanh(V hᵢ + c)) with V [L, 1280], c [L], w [1, L] (Ilse et al.'s
//! eq. 8; L = `attention_dim`, their 128), z = Σᵢ aᵢ hᵢ, then the model's own dropout + classifier
//! (`classifier.1`) on z. Reusing the classifier keeps the exported model a crop classifier (z is a
//! convex combination of crop features, so the same head applies to one crop); the attention
//! tensors `mil_attention.V.weight`, `mil_attention.V.bias`, `mil_attention.w.weight` train and are
//! checkpointed with the rest but are not exported.

use super::domain::{add_dense, feature_dim};
use super::sampler::{class_counts, median_count};
use crate::autograd::{Tape, Var};
use crate::error::{Error, Result};
use crate::models::efficientnet::TrainableEfficientNet;
use crate::ops::adversarial::tanh;
use crate::ops::elementwise::linear;
use crate::ops::mil::attention_pool;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Attention-MIL options.
#[derive(Clone, Debug, PartialEq)]
pub struct MilOptions {
    /// Crops per bag (paper: 16).
    pub bag_size: usize,
    /// Treated crops per treated bag, inclusive range (paper: 4..=12).
    pub min_treated: usize,
    pub max_treated: usize,
    /// Negative-control classes (e.g. DMSO, EMPTY): their crops fill treated bags and form the
    /// control bags. At least one is required.
    pub control_classes: Vec<u32>,
    /// Width L of the attention's hidden layer (Ilse et al.: 128).
    pub attention_dim: usize,
}

impl Default for MilOptions {
    fn default() -> Self {
        MilOptions {
            bag_size: 16,
            min_treated: 4,
            max_treated: 12,
            control_classes: Vec::new(),
            attention_dim: 128,
        }
    }
}

impl MilOptions {
    /// Checks the sizes, and the control classes against `num_classes` when given.
    pub fn validate(&self, num_classes: Option<usize>) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.bag_size == 0 {
            return bad("mil.bag_size must be positive".into());
        }
        if !(1 <= self.min_treated
            && self.min_treated <= self.max_treated
            && self.max_treated <= self.bag_size)
        {
            return bad(format!(
                "mil: need 1 <= min_treated ({}) <= max_treated ({}) <= bag_size ({})",
                self.min_treated, self.max_treated, self.bag_size
            ));
        }
        if self.attention_dim == 0 || self.attention_dim > 1 << 16 {
            return bad(format!(
                "mil.attention_dim is {}; expected 1..=65536",
                self.attention_dim
            ));
        }
        if self.control_classes.is_empty() {
            return bad(
                "mil.control_classes is empty: MIL bags need negative-control classes (e.g. DMSO)"
                    .into(),
            );
        }
        if let Some(k) = num_classes {
            if let Some(&c) = self.control_classes.iter().find(|&&c| c as usize >= k) {
                return bad(format!(
                    "mil.control_classes holds {c}, out of range: the model has {k} classes (0..={})",
                    k - 1
                ));
            }
        }
        Ok(())
    }
}

/// One bag: its label and the indices (into the labels given to [`mil_epoch`]) of its crops.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bag {
    pub label: u32,
    pub items: Vec<usize>,
}

/// `k` draws from `pool`, every item ⌊k/n⌋ or ⌈k/n⌉ times, shuffled.
fn spread(pool: &[usize], k: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let n = pool.len();
    let mut out = Vec::with_capacity(k);
    for _ in 0..k / n {
        out.extend_from_slice(pool);
    }
    out.extend(pool.choose_multiple(rng, k % n).copied());
    out.shuffle(rng);
    out
}

/// One epoch of bags (see the module doc). Errors: a label or control class out of range, no
/// control crop, no class with crops.
pub fn mil_epoch(
    labels: &[u32],
    num_classes: usize,
    opts: &MilOptions,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<Bag>> {
    opts.validate(Some(num_classes))?;
    let counts = class_counts(labels, num_classes)?;
    let mut by_class: Vec<Vec<usize>> = vec![Vec::new(); num_classes];
    for (i, &l) in labels.iter().enumerate() {
        by_class[l as usize].push(i);
    }
    let is_control = |c: usize| opts.control_classes.contains(&(c as u32));
    let controls: Vec<usize> = (0..num_classes)
        .filter(|&c| is_control(c))
        .flat_map(|c| by_class[c].iter().copied())
        .collect();
    if controls.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "MIL needs control crops: none of the control classes {:?} has a crop in the training set",
            opts.control_classes
        )));
    }
    let m = median_count(&counts)
        .ok_or_else(|| Error::InvalidArgument("MIL: every class is empty".into()))?;
    let mean_t = (opts.min_treated + opts.max_treated) as f64 / 2.0;
    let per_class = ((m as f64 / mean_t).round() as usize).max(1);
    let s = opts.bag_size;
    let mut bags = Vec::new();
    for (c, pool) in by_class.iter().enumerate() {
        if pool.is_empty() {
            continue;
        }
        if is_control(c) {
            let draws = spread(pool, per_class * s, rng);
            for chunk in draws.chunks_exact(s) {
                bags.push(Bag {
                    label: c as u32,
                    items: chunk.to_vec(),
                });
            }
            continue;
        }
        let ts: Vec<usize> = (0..per_class)
            .map(|_| rng.gen_range(opts.min_treated..=opts.max_treated))
            .collect();
        let treated = spread(pool, ts.iter().sum(), rng);
        let mut at = 0;
        for &t in &ts {
            let mut items = treated[at..at + t].to_vec();
            at += t;
            let need = s - t;
            if controls.len() >= need {
                items.extend(controls.choose_multiple(rng, need).copied());
            } else {
                items.extend((0..need).map(|_| controls[rng.gen_range(0..controls.len())]));
            }
            items.shuffle(rng);
            bags.push(Bag {
                label: c as u32,
                items,
            });
        }
    }
    bags.shuffle(rng);
    Ok(bags)
}

/// Parameter indices of the attention (V, c, w) in the model's parameter set.
#[derive(Clone, Debug)]
pub(crate) struct MilHead {
    v_w: usize,
    v_b: usize,
    w_w: usize,
    pub bag_size: usize,
}

impl MilHead {
    /// Adds `mil_attention.*` to `model`, drawn as torch.nn.Linear from `seed`.
    pub(crate) fn attach(
        model: &mut TrainableEfficientNet<f32>,
        o: &MilOptions,
        seed: u64,
    ) -> Result<Self> {
        o.validate(Some(model.config().num_classes))?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4D11_A77E_0000_0000);
        let d = feature_dim(model)?;
        let l = o.attention_dim;
        let (v_w, v_b) = add_dense(model, "mil_attention.V", d, l, true, &mut rng)?;
        let (w_w, _) = add_dense(model, "mil_attention.w", l, 1, false, &mut rng)?;
        Ok(MilHead {
            v_w,
            v_b: v_b.unwrap_or(v_w),
            w_w,
            bag_size: o.bag_size,
        })
    }

    /// Attention-pooled bag features [B, D] of crop features [B·S, D] (bags consecutive).
    pub(crate) fn pool(
        &self,
        tape: &mut Tape<f32>,
        model: &TrainableEfficientNet<f32>,
        features: &Var,
    ) -> Result<Var> {
        let p = model.params();
        let (vw, vb, ww) = (
            tape.param(p, self.v_w),
            tape.param(p, self.v_b),
            tape.param(p, self.w_w),
        );
        let u = linear(tape, features, &vw, Some(&vb))?;
        let t = tanh(tape, &u);
        let s = linear(tape, &t, &ww, None)?;
        attention_pool(tape, features, &s, self.bag_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bags_compose_as_the_paper_says_and_are_deterministic() {
        // 4 classes: 0 = DMSO (30 crops), 1 = 10, 2 = 3, 3 = 0 crops (empty, skipped).
        let mut labels = vec![0u32; 30];
        labels.extend(std::iter::repeat_n(1, 10));
        labels.extend(std::iter::repeat_n(2, 3));
        let o = MilOptions {
            control_classes: vec![0],
            ..Default::default()
        };
        let run = |seed| mil_epoch(&labels, 4, &o, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        let bags = run(5);
        assert_eq!(bags, run(5));
        assert_ne!(bags, run(6));
        // median of (30, 10, 3) = 10; round(10 / 8) = 1 bag per class.
        assert_eq!(bags.len(), 3);
        for b in &bags {
            assert_eq!(b.items.len(), 16);
            let own = b.items.iter().filter(|&&i| labels[i] == b.label).count();
            let ctrl = b.items.iter().filter(|&&i| labels[i] == 0).count();
            if b.label == 0 {
                assert_eq!(own, 16);
            } else {
                assert!((4..=12).contains(&own), "{own}");
                assert_eq!(own + ctrl, 16, "only the treatment and controls");
            }
        }
        // Larger set: many bags per class, all treated counts seen in 4..=12, balanced.
        let mut labels = vec![0u32; 200];
        labels.extend(std::iter::repeat_n(1, 160));
        labels.extend(std::iter::repeat_n(2, 80));
        let bags = mil_epoch(&labels, 3, &o, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let per: Vec<usize> = (0..3)
            .map(|c| bags.iter().filter(|b| b.label == c).count())
            .collect();
        assert_eq!(per, vec![20, 20, 20]); // median 160 / 8
        let mut seen = std::collections::BTreeSet::new();
        for b in bags.iter().filter(|b| b.label == 2) {
            let own = b.items.iter().filter(|&&i| labels[i] == 2).count();
            seen.insert(own);
            // Controls distinct within a bag (enough of them).
            let mut c: Vec<usize> = b
                .items
                .iter()
                .copied()
                .filter(|&i| labels[i] == 0)
                .collect();
            c.sort_unstable();
            c.dedup();
            assert_eq!(c.len(), 16 - own);
        }
        assert!(
            seen.len() >= 5 && seen.iter().all(|t| (4..=12).contains(t)),
            "{seen:?}"
        );
        // Class 2's 80 crops are spread evenly: each used ⌊T/80⌋ or ⌈T/80⌉ times.
        let mut uses = vec![0usize; labels.len()];
        bags.iter()
            .filter(|b| b.label == 2)
            .flat_map(|b| b.items.iter())
            .filter(|&&i| labels[i] == 2)
            .for_each(|&i| uses[i] += 1);
        let (lo, hi) = (
            uses[360..].iter().min().unwrap(),
            uses[360..].iter().max().unwrap(),
        );
        assert!(hi - lo <= 1, "{lo} {hi}");
    }

    #[test]
    fn bad_mil_input_names_the_problem() {
        let o = MilOptions {
            control_classes: vec![2],
            ..Default::default()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let e = mil_epoch(&[0, 1, 1], 3, &o, &mut rng)
            .unwrap_err()
            .to_string();
        assert!(e.contains("MIL needs control crops"), "{e}");
        let e = mil_epoch(&[0, 1], 2, &o, &mut rng).unwrap_err().to_string();
        assert!(e.contains("control_classes holds 2"), "{e}");
        let e = MilOptions::default()
            .validate(None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("control_classes is empty"), "{e}");
        let bad = MilOptions {
            min_treated: 13,
            control_classes: vec![0],
            ..Default::default()
        };
        assert!(bad
            .validate(None)
            .unwrap_err()
            .to_string()
            .contains("min_treated (13)"));
    }
}
