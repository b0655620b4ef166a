//! Classification metrics, statistics and the subprofile protocol against the fixtures of
//! tests/fixtures/make_stats_fixture.py (scikit-learn 1.9.1, scipy 1.17.1, statsmodels 0.15, and an
//! independent numpy + sklearn transcription of the prediction protocol).

use phenocore::io::npz::{read_npz, NpyArray};
use phenocore::metrics::classification::*;
use phenocore::metrics::stats::*;
use phenocore::metrics::subprofile::*;
use phenocore::metrics::Labels;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn load(name: &str) -> BTreeMap<String, NpyArray> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/stats/{name}.npz"));
    read_npz(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f64s<'a>(z: &'a BTreeMap<String, NpyArray>, key: &str) -> &'a [f64] {
    match z.get(key) {
        Some(NpyArray::F64 { data, .. }) => data,
        other => panic!("{key}: expected f64, got {other:?}"),
    }
}

fn i64s<'a>(z: &'a BTreeMap<String, NpyArray>, key: &str) -> &'a [i64] {
    match z.get(key) {
        Some(NpyArray::I64 { data, .. }) => data,
        other => panic!("{key}: expected integers, got {other:?}"),
    }
}

fn strs<'a>(z: &'a BTreeMap<String, NpyArray>, key: &str) -> &'a [String] {
    match z.get(key) {
        Some(NpyArray::Str { data, .. }) => data,
        other => panic!("{key}: expected strings, got {other:?}"),
    }
}

fn bools(v: &[i64]) -> Vec<bool> {
    v.iter().map(|&x| x != 0).collect()
}

/// Max |a − b| treating NaN == NaN; panics on a NaN mismatch.
fn max_diff(what: &str, a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let mut m = 0f64;
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.is_nan(), y.is_nan(), "{what}[{i}]: {x} vs {y}");
        if !x.is_nan() {
            m = m.max((x - y).abs());
        }
    }
    m
}

#[test]
fn binary_ap_and_roc_auc_match_sklearn() {
    let z = load("classification");
    let (s, t, off) = (
        f64s(&z, "bin_scores"),
        bools(i64s(&z, "bin_truth")),
        i64s(&z, "bin_offsets"),
    );
    let (mut ap, mut auc) = (Vec::new(), Vec::new());
    for w in off.windows(2) {
        let (a, b) = (w[0] as usize, w[1] as usize);
        ap.push(average_precision_score(&s[a..b], &t[a..b]).unwrap());
        auc.push(roc_auc_score(&s[a..b], &t[a..b]).unwrap());
    }
    let (e_ap, e_auc) = (
        max_diff("ap", &ap, f64s(&z, "bin_ap")),
        max_diff("auc", &auc, f64s(&z, "bin_auc")),
    );
    eprintln!("binary: max |AP − sklearn| {e_ap:.1e}, max |AUC − sklearn| {e_auc:.1e}");
    assert!(e_ap <= 1e-12 && e_auc <= 1e-12);

    let (a, b) = (off[1] as usize, off[2] as usize);
    let pr = precision_recall_curve(&s[a..b], &t[a..b]).unwrap();
    assert!(max_diff("precision", &pr.precision, f64s(&z, "pr_precision")) <= 1e-15);
    assert_eq!(pr.recall, f64s(&z, "pr_recall"));
    assert_eq!(pr.thresholds, f64s(&z, "pr_thresholds"));
    let roc = roc_curve(&s[a..b], &t[a..b], true).unwrap();
    assert!(max_diff("fpr", &roc.fpr, f64s(&z, "roc_fpr")) <= 1e-15);
    assert!(max_diff("tpr", &roc.tpr, f64s(&z, "roc_tpr")) <= 1e-15);
    assert_eq!(roc.thresholds, f64s(&z, "roc_thresholds"));
}

#[test]
fn multilabel_averages_match_sklearn() {
    let z = load("classification");
    let s = f64s(&z, "ml_scores");
    let l = z["ml_scores"].shape()[1];
    for (truth_key, prefix, averages) in [
        (
            "ml_truth",
            "ml",
            &["macro", "micro", "weighted", "samples"][..],
        ),
        ("ml1_truth", "ml1", &["macro", "weighted"][..]),
    ] {
        let t = bools(i64s(&z, truth_key));
        for avg in averages {
            let a = Average::parse(avg).unwrap();
            let ap = average_precision_multilabel(s, &t, l, a).unwrap();
            let auc = roc_auc_multilabel(s, &t, l, a).unwrap();
            let d_ap = max_diff(avg, &[ap], f64s(&z, &format!("{prefix}_ap_{avg}")));
            let d_auc = max_diff(avg, &[auc], f64s(&z, &format!("{prefix}_auc_{avg}")));
            assert!(
                d_ap <= 1e-12 && d_auc <= 1e-12,
                "{prefix} {avg}: {d_ap} {d_auc}"
            );
        }
        let ap = average_precision_per_label(s, &t, l).unwrap();
        let auc = roc_auc_per_label(s, &t, l).unwrap();
        assert!(max_diff("ap none", &ap, f64s(&z, &format!("{prefix}_ap_none"))) <= 1e-12);
        assert!(max_diff("auc none", &auc, f64s(&z, &format!("{prefix}_auc_none"))) <= 1e-12);
    }
}

#[test]
fn distributions_match_scipy() {
    let z = load("stats");
    let (q, k, df) = (f64s(&z, "sr_q"), f64s(&z, "sr_k"), f64s(&z, "sr_df"));
    let sf: Vec<f64> = (0..q.len())
        .map(|i| studentized_range_sf(q[i], k[i], df[i]))
        .collect();
    let e_sf = max_diff("studentized_range.sf", &sf, f64s(&z, "sr_sf"));
    let (pk, pdf, pp) = (f64s(&z, "ppf_k"), f64s(&z, "ppf_df"), f64s(&z, "ppf_p"));
    let ppf: Vec<f64> = (0..pk.len())
        .map(|i| studentized_range_ppf(pp[i], pk[i], pdf[i]))
        .collect();
    let e_ppf = max_diff("studentized_range.ppf", &ppf, f64s(&z, "ppf_q"));
    let (x, d1, d2) = (f64s(&z, "f_x"), f64s(&z, "f_d1"), f64s(&z, "f_d2"));
    let fsf: Vec<f64> = (0..x.len()).map(|i| f_sf(x[i], d1[i], d2[i])).collect();
    let e_f = max_diff("f.sf", &fsf, f64s(&z, "f_sf"));
    eprintln!(
        "studentized range sf: max diff {e_sf:.1e} over {} points; ppf {e_ppf:.1e}; F sf {e_f:.1e}",
        q.len()
    );
    assert!(e_sf <= 1e-9, "{e_sf}");
    assert!(e_ppf <= 1e-7, "{e_ppf}");
    assert!(e_f <= 1e-13, "{e_f}");
}

#[test]
fn anova_and_tukey_match_scipy_and_statsmodels() {
    let z = load("stats");
    let layouts = i64s(&z, "n_layouts")[0];
    let (mut e_anova, mut e_p, mut e_ci, mut e_sm) = (0f64, 0f64, 0f64, 0f64);
    for c in 0..layouts {
        let values = f64s(&z, &format!("g{c}_values"));
        let sizes = i64s(&z, &format!("g{c}_sizes"));
        let mut groups = Vec::new();
        let mut at = 0;
        for &m in sizes {
            groups.push(&values[at..at + m as usize]);
            at += m as usize;
        }
        let a = anova_oneway(&groups).unwrap();
        let want = f64s(&z, &format!("g{c}_anova"));
        e_anova = e_anova
            .max(((a.f - want[0]) / want[0]).abs())
            .max((a.p_value - want[1]).abs());
        let t = tukey_hsd(&groups).unwrap();
        assert!(
            max_diff(
                "statistic",
                &t.statistic,
                f64s(&z, &format!("g{c}_tukey_statistic"))
            ) < 1e-14
        );
        e_p = e_p.max(max_diff(
            "pvalue",
            &t.p_value,
            f64s(&z, &format!("g{c}_tukey_pvalue")),
        ));
        let (low, high) = t.confidence_interval(0.95).unwrap();
        e_ci = e_ci
            .max(max_diff("low", &low, f64s(&z, &format!("g{c}_tukey_low"))))
            .max(max_diff(
                "high",
                &high,
                f64s(&z, &format!("g{c}_tukey_high")),
            ));

        let names: Vec<String> = (0..sizes.len()).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let cmp = compare_methods(&refs, &groups, 0.05).unwrap();
        let md: Vec<f64> = cmp.pairs.iter().map(|p| p.mean_diff).collect();
        let pa: Vec<f64> = cmp.pairs.iter().map(|p| p.p_adj).collect();
        let lo: Vec<f64> = cmp.pairs.iter().map(|p| p.lower).collect();
        let hi: Vec<f64> = cmp.pairs.iter().map(|p| p.upper).collect();
        assert!(max_diff("meandiff", &md, f64s(&z, &format!("g{c}_sm_meandiff"))) < 1e-12);
        e_sm = e_sm
            .max(max_diff("p-adj", &pa, f64s(&z, &format!("g{c}_sm_padj"))))
            .max(max_diff("lower", &lo, f64s(&z, &format!("g{c}_sm_lower"))))
            .max(max_diff("upper", &hi, f64s(&z, &format!("g{c}_sm_upper"))));
        assert_eq!(cmp.anova, a);
    }
    eprintln!(
        "ANOVA: max rel |F| / abs |p| diff {e_anova:.1e}; Tukey p {e_p:.1e}, CI {e_ci:.1e}; statsmodels {e_sm:.1e}"
    );
    assert!(e_anova <= 1e-12 && e_p <= 1e-9 && e_ci <= 1e-8 && e_sm <= 1e-8);
}

#[test]
fn subprofile_and_biosimilarity_match_numpy() {
    let z = load("subprofile");
    let g = f64s(&z, "group");
    let (n, d) = (z["group"].shape()[0], z["group"].shape()[1]);
    for t in [85, 60] {
        let s = reference_subprofile(g, n, d, t as f64 / 100.0).unwrap();
        let mask = i64s(&z, &format!("group_mask_{t}"));
        let want: Vec<usize> = (0..d).filter(|&j| mask[j] != 0).collect();
        assert_eq!(s.features, want, "threshold {t}");
        let med = f64s(&z, &format!("group_median_{t}"));
        let want_v: Vec<f64> = want.iter().map(|&j| med[j]).collect();
        assert_eq!(s.values, want_v);
    }
    let keep: Vec<usize> = {
        let m = i64s(&z, "group_mask_60");
        (0..d).filter(|&j| m[j] != 0).collect()
    };
    let (u, v) = (f64s(&z, "bs_u"), f64s(&z, "bs_v"));
    for (form, key) in [
        (BiosimilarityForm::Pearson, "bs_pearson"),
        (BiosimilarityForm::Pahl, "bs_pahl"),
    ] {
        let got = [
            biosimilarity(u, v, Some(&keep), form).unwrap(),
            biosimilarity(u, v, None, form).unwrap(),
        ];
        assert!(max_diff(key, &got, f64s(&z, key)) < 1e-12, "{key}: {got:?}");
    }
}

/// The reference strings of the fixture (fold × compound, "a|b" = reference for a and b) as
/// `references[fold][label]` in the order of `labels`.
fn references(refs: &[String], n: usize, labels: &[String]) -> References {
    refs.chunks(n)
        .map(|fold| {
            labels
                .iter()
                .map(|l| {
                    (0..n)
                        .filter(|&i| fold[i].split('|').any(|x| x == l))
                        .collect()
                })
                .collect()
        })
        .collect()
}

#[test]
fn prediction_protocol_matches_independent_numpy_sklearn() {
    let z = load("subprofile");
    let profiles = f64s(&z, "profiles");
    let (n, d) = (z["profiles"].shape()[0], z["profiles"].shape()[1]);
    let seen = bools(i64s(&z, "seen"));
    let mut worst = 0f64;
    for (case, label_key, single) in [("moa", "labels", true), ("target", "target_labels", false)] {
        let labels = Labels::from_joined(strs(&z, label_key));
        let e = eligible(&labels, 10, single);
        assert_eq!(
            e.labels,
            strs(&z, &format!("{case}_kept")),
            "{case}: kept labels"
        );
        let refs = references(strs(&z, &format!("{case}_refs")), n, &e.labels);
        for (form, name) in [
            (BiosimilarityForm::Pearson, "pearson"),
            (BiosimilarityForm::Pahl, "pahl"),
        ] {
            let opts = PredictionOptions {
                form,
                single_label: single,
                ..Default::default()
            };
            let p = moa_prediction_with_references(
                profiles,
                n,
                d,
                &labels,
                Some(&seen),
                refs.clone(),
                &opts,
            )
            .unwrap();
            let want = f64s(&z, &format!("{case}_{name}_metrics"));
            assert_eq!(want.len(), p.folds.len() * 19);
            for (f, fold) in p.folds.iter().enumerate() {
                let row = &want[f * 19..(f + 1) * 19];
                assert_eq!(fold.n_references as f64, row[0], "{case} {name} fold {f}");
                for (s, m) in [fold.all, fold.seen, fold.unseen].iter().enumerate() {
                    let w = &row[1 + 6 * s..7 + 6 * s];
                    assert_eq!(
                        (m.n_queries as f64, m.n_labels_scored as f64),
                        (w[0], w[1]),
                        "{case} {name} fold {f} subset {s}"
                    );
                    let got = [m.map, m.ap_macro, m.roc_auc_macro, m.top1_accuracy];
                    let diff =
                        max_diff(&format!("{case} {name} fold {f} subset {s}"), &got, &w[2..]);
                    if diff > 1e-12 {
                        eprintln!(
                            "{case} {name} fold {f} subset {s}: {got:?} vs {:?}",
                            &w[2..]
                        );
                    }
                    worst = worst.max(diff);
                }
            }
        }
    }
    eprintln!("prediction protocol: max diff vs numpy/sklearn {worst:.1e}");
    assert!(worst <= 1e-12);
}

#[test]
fn seeded_protocol_follows_the_papers_counts() {
    let z = load("subprofile");
    let profiles = f64s(&z, "profiles");
    let (n, d) = (z["profiles"].shape()[0], z["profiles"].shape()[1]);
    let labels = Labels::from_joined(strs(&z, "labels"));
    let opts = PredictionOptions {
        seed: 3,
        ..Default::default()
    };
    let p = moa_prediction(profiles, n, d, &labels, None, &opts).unwrap();
    let again = moa_prediction(profiles, n, d, &labels, None, &opts).unwrap();
    // (Debug text: NaN metrics of the empty unseen subsets compare unequal with ==.)
    assert_eq!(format!("{p:?}"), format!("{again:?}"), "seeded runs repeat");
    let other = moa_prediction(
        profiles,
        n,
        d,
        &labels,
        None,
        &PredictionOptions { seed: 4, ..opts },
    )
    .unwrap();
    assert_ne!(p.references, other.references);
    assert_eq!(p.folds.len(), 10);
    let n_labels = p.eligible.labels.len();
    for (fold, refs) in p.folds.iter().zip(&p.references) {
        // Single-label compounds: 5 distinct references per label, none shared.
        assert_eq!(fold.n_references, 5 * n_labels);
        assert!(refs.iter().all(|r| r.len() == 5));
        assert_eq!(
            fold.all.n_queries,
            p.eligible.compounds.len() - 5 * n_labels
        );
        assert_eq!(fold.unseen.n_queries, 0);
        assert_eq!(fold.seen, fold.all);
        assert!(fold.all.roc_auc_macro > 0.5 && fold.all.map > 1.0 / n_labels as f64);
    }
    // Too few compounds for a reference set, and unknown shapes, are errors.
    assert!(moa_prediction(
        profiles,
        n,
        d,
        &labels,
        None,
        &PredictionOptions {
            n_reference: 11,
            ..opts
        }
    )
    .is_err());
    assert!(moa_prediction(&profiles[..d], n, d, &labels, None, &opts).is_err());
    assert!(moa_prediction(profiles, n, d, &labels, Some(&[true]), &opts).is_err());
}
