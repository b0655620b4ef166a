//! Treatment effect (ATE proxy), REFERENCE §6, used to pick strong, medium and weak treatments.
//!
//! On (sphered) well profiles: (1) the median control profile of each plate (element-wise median,
//! the mean of the two middle values for an even count, as numpy); (2) the Euclidean distance of
//! every well to its plate's median control; (3) mean and sd of the control wells' own distances
//! per plate — sd with `ddof` = 1 by default (the sample sd: the DeepProfilerExperiments notebooks
//! do not show this computation, so the usual pandas default is used); (4) z = (distance − mean) / sd
//! with the plate's stats; (5) treatment effect = mean z over the treatment's non-control wells
//! (over all plates).
//!
//! Selection: treatments ranked by ascending effect (ties by name); with N treatments and
//! k = ⌊f·N + ½⌋ (f = `fraction`, 0.2), bottom = ranks 0..k, top = ranks N−k..N and middle = the k
//! ranks centred on the median: ⌊(N−k)/2⌋..⌊(N−k)/2⌋+k (0-based, end exclusive). f ≤ 1/3 keeps
//! the three groups disjoint whenever N ≥ 3k; for fewer treatments (rounding, e.g. N = 2, f = 1/3)
//! a rank already in the bottom or top group is not repeated in the middle one.

use super::sphere::{check_finite, ControlSelector};
use crate::error::{Error, Result};
use crate::io::profiles::Profiles;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EffectOptions {
    /// Delta degrees of freedom of the control distances' sd (default 1).
    pub ddof: usize,
    /// Share of the treatments in each of the bottom / middle / top groups, in [0, 1/3]
    /// (default 0.2).
    pub fraction: f64,
}

impl Default for EffectOptions {
    fn default() -> Self {
        EffectOptions {
            ddof: 1,
            fraction: 0.2,
        }
    }
}

/// Which selection group a treatment falls in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Tier {
    Bottom,
    Middle,
    Top,
    Unselected,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TreatmentEffect {
    pub treatment: String,
    /// Mean z-score over the treatment's wells.
    pub effect: f64,
    pub n_wells: usize,
    /// 0-based position in ascending (effect, name) order.
    pub rank: usize,
    pub tier: Tier,
}

/// A plate's control distances.
#[derive(Clone, Debug, PartialEq)]
pub struct PlateStats {
    pub plate: String,
    pub n_controls: usize,
    pub mean: f64,
    pub sd: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct EffectResult {
    /// One per treatment (non-control wells), sorted by name.
    pub treatments: Vec<TreatmentEffect>,
    /// Per input row: Euclidean distance to its plate's median control.
    pub distance: Vec<f64>,
    /// Per input row: z-score of the distance (control rows included).
    pub z: Vec<f64>,
    /// One per plate, sorted by name.
    pub plates: Vec<PlateStats>,
}

impl EffectResult {
    /// Treatments of `tier`, in ascending effect order.
    pub fn tier(&self, tier: Tier) -> Vec<&str> {
        let mut v: Vec<&TreatmentEffect> =
            self.treatments.iter().filter(|t| t.tier == tier).collect();
        v.sort_by_key(|t| t.rank);
        v.into_iter().map(|t| t.treatment.as_str()).collect()
    }

    /// The effect of `treatment`, if it has non-control wells.
    pub fn effect_of(&self, treatment: &str) -> Option<f64> {
        self.treatments
            .binary_search_by(|t| t.treatment.as_str().cmp(treatment))
            .ok()
            .map(|i| self.treatments[i].effect)
    }
}

/// Treatment effects of a profile table: plates and treatments from metadata columns, control
/// wells from `controls` (their treatment is not ranked).
pub fn treatment_effect(
    profiles: &Profiles,
    plate_column: &str,
    treatment_column: &str,
    controls: &ControlSelector,
    opts: &EffectOptions,
) -> Result<EffectResult> {
    let plates = profiles.meta_column(plate_column)?;
    let treatments = profiles.meta_column(treatment_column)?;
    let is_control = controls.mask(profiles)?;
    treatment_effect_matrix(
        &profiles.data,
        profiles.n_rows(),
        profiles.n_features(),
        plates,
        treatments,
        &is_control,
        opts,
    )
}

/// As [`treatment_effect`] on an n × d row-major matrix with one plate, treatment and control
/// flag per row.
pub fn treatment_effect_matrix<P: AsRef<str>, T: AsRef<str>>(
    x: &[f64],
    n: usize,
    d: usize,
    plates: &[P],
    treatments: &[T],
    is_control: &[bool],
    opts: &EffectOptions,
) -> Result<EffectResult> {
    if n.checked_mul(d) != Some(x.len()) {
        return Err(Error::Shape(format!(
            "treatment effect: {} values for {n} wells x {d} features",
            x.len()
        )));
    }
    for (what, len) in [
        ("plates", plates.len()),
        ("treatments", treatments.len()),
        ("control flags", is_control.len()),
    ] {
        if len != n {
            return Err(Error::Shape(format!(
                "treatment effect: {len} {what} for {n} wells"
            )));
        }
    }
    if !(opts.fraction.is_finite() && (0.0..=1.0 / 3.0).contains(&opts.fraction)) {
        return Err(Error::InvalidArgument(format!(
            "treatment effect fraction is {}; expected 0 <= fraction <= 1/3",
            opts.fraction
        )));
    }
    if d == 0 {
        return Err(Error::InvalidArgument(
            "treatment effect needs at least one feature".into(),
        ));
    }
    check_finite(x, d, "well profiles")?;

    let mut by_plate: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, p) in plates.iter().enumerate() {
        by_plate.entry(p.as_ref()).or_default().push(i);
    }
    let mut distance = vec![0.0; n];
    let mut z = vec![0.0; n];
    let mut stats = Vec::with_capacity(by_plate.len());
    for (plate, rows) in &by_plate {
        let ctrl: Vec<usize> = rows.iter().copied().filter(|&r| is_control[r]).collect();
        // Two controls are always equally far from their median, so 3 is the least that works.
        let need = 3.max(opts.ddof + 1);
        if ctrl.len() < need {
            return Err(Error::InvalidArgument(format!(
                "treatment effect: plate {plate:?} has {} control wells; the sd of their \
                 distances (ddof {}) needs at least {need}",
                ctrl.len(),
                opts.ddof,
            )));
        }
        let median = median_profile(x, d, &ctrl);
        for &r in rows {
            distance[r] = x[r * d..(r + 1) * d]
                .iter()
                .zip(&median)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f64>()
                .sqrt();
        }
        let m = ctrl.len() as f64;
        let mean = ctrl.iter().map(|&r| distance[r]).sum::<f64>() / m;
        let ss: f64 = ctrl.iter().map(|&r| (distance[r] - mean).powi(2)).sum();
        let sd = (ss / (m - opts.ddof as f64)).sqrt();
        if !(sd > 0.0 && sd.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "treatment effect: the control wells of plate {plate:?} are all equally far from \
                 their median (sd 0); z-scores are undefined"
            )));
        }
        for &r in rows {
            z[r] = (distance[r] - mean) / sd;
        }
        stats.push(PlateStats {
            plate: plate.to_string(),
            n_controls: ctrl.len(),
            mean,
            sd,
        });
    }

    let mut sums: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for i in (0..n).filter(|&i| !is_control[i]) {
        let e = sums.entry(treatments[i].as_ref()).or_insert((0.0, 0));
        e.0 += z[i];
        e.1 += 1;
    }
    let mut effects: Vec<TreatmentEffect> = sums
        .into_iter()
        .map(|(t, (s, c))| TreatmentEffect {
            treatment: t.to_string(),
            effect: s / c as f64,
            n_wells: c,
            rank: 0,
            tier: Tier::Unselected,
        })
        .collect();
    let mut order: Vec<usize> = (0..effects.len()).collect();
    order.sort_by(|&a, &b| {
        effects[a]
            .effect
            .total_cmp(&effects[b].effect)
            .then_with(|| effects[a].treatment.cmp(&effects[b].treatment))
    });
    let count = order.len();
    let k = (opts.fraction * count as f64 + 0.5).floor() as usize;
    let start = (count - k.min(count)) / 2;
    for (rank, &i) in order.iter().enumerate() {
        effects[i].rank = rank;
        effects[i].tier = if rank < k {
            Tier::Bottom
        } else if rank >= count - k {
            Tier::Top
        } else if (start..start + k).contains(&rank) {
            Tier::Middle
        } else {
            Tier::Unselected
        };
    }
    Ok(EffectResult {
        treatments: effects,
        distance,
        z,
        plates: stats,
    })
}

/// Element-wise median of the rows `rows` (numpy semantics for an even count).
fn median_profile(x: &[f64], d: usize, rows: &[usize]) -> Vec<f64> {
    let m = rows.len();
    let mut col = vec![0.0; m];
    (0..d)
        .map(|j| {
            for (c, &r) in col.iter_mut().zip(rows) {
                *c = x[r * d + j];
            }
            let (_, hi, _) = col.select_nth_unstable_by(m / 2, f64::total_cmp);
            let hi = *hi;
            if m % 2 == 1 {
                hi
            } else {
                let lo = col[..m / 2]
                    .iter()
                    .copied()
                    .fold(f64::NEG_INFINITY, f64::max);
                0.5 * (lo + hi)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_matches_numpy_for_odd_and_even_counts() {
        let x = [3.0, 10.0, 1.0, 40.0, 2.0, 20.0, 5.0, 30.0];
        assert_eq!(median_profile(&x, 2, &[0, 1, 2]), vec![2.0, 20.0]);
        assert_eq!(median_profile(&x, 2, &[0, 1, 2, 3]), vec![2.5, 25.0]);
    }

    #[test]
    fn selection_groups_follow_the_documented_ranks() {
        // One plate, 3 controls, 10 treatments with distinct, increasing distances.
        let d = 1;
        let mut x = vec![0.0, 1.0, -1.0];
        let mut plates = vec!["p"; 3];
        let mut treat: Vec<String> = vec!["ctl".into(); 3];
        let mut ctl = vec![true; 3];
        for i in 0..10 {
            x.push(10.0 + i as f64);
            plates.push("p");
            treat.push(format!("t{i}"));
            ctl.push(false);
        }
        let r = treatment_effect_matrix(
            &x,
            x.len(),
            d,
            &plates,
            &treat,
            &ctl,
            &EffectOptions::default(),
        )
        .unwrap();
        // N = 10, k = 2, middle starts at (10 - 2) / 2 = 4.
        assert_eq!(r.tier(Tier::Bottom), vec!["t0", "t1"]);
        assert_eq!(r.tier(Tier::Middle), vec!["t4", "t5"]);
        assert_eq!(r.tier(Tier::Top), vec!["t8", "t9"]);
        // Control distances 0, 1, 1: mean 2/3, sd (ddof 1) = 1/sqrt(3).
        let sd = (1.0f64 / 3.0).sqrt();
        assert!((r.plates[0].sd - sd).abs() < 1e-15);
        assert!((r.effect_of("t0").unwrap() - (10.0 - 2.0 / 3.0) / sd).abs() < 1e-12);
    }

    #[test]
    fn too_few_controls_and_bad_fraction_are_errors() {
        let x = [0.0, 1.0, 5.0];
        let r = treatment_effect_matrix(
            &x,
            3,
            1,
            &["p"; 3],
            &["c", "c", "t"],
            &[true, true, false],
            &EffectOptions::default(),
        );
        assert!(matches!(r, Err(Error::InvalidArgument(m)) if m.contains("\"p\" has 2 control")));
        let opts = EffectOptions {
            fraction: 0.5,
            ..Default::default()
        };
        let r = treatment_effect_matrix(&x, 3, 1, &["p"; 3], &["c"; 3], &[true; 3], &opts);
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
    }
}
