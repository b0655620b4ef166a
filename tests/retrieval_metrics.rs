//! Retrieval metrics against the peers' values in tests/fixtures/retrieval (made by
//! tests/fixtures/make_retrieval_fixture.py: copairs 0.5.5, scikit-learn, scipy, statsmodels, pandas,
//! and re-implementations of DeepProfilerExperiments' and cytominer-eval's code paths on them).

use phenocore::io::npz::{read_npz, NpyArray};
use phenocore::metrics::enrichment::{
    folds_of_enrichment, folds_of_enrichment_pooled, EnrichmentOptions, InfiniteOdds,
};
use phenocore::metrics::pvalues::{benjamini_hochberg, fisher_exact_greater, odds_ratio};
use phenocore::metrics::retrieval::{
    mean_average_precision, precision_recall_at_k, replicate_reproducibility, AtKOptions,
    MapMethod, MapOptions, ReplicateOptions, Unlabeled,
};
use phenocore::metrics::similarity::CosineSimilarity;
use phenocore::metrics::Labels;
use phenocore::Error;
use std::collections::BTreeMap;
use std::path::PathBuf;

struct Fixture {
    name: String,
    arrays: BTreeMap<String, NpyArray>,
}

impl Fixture {
    fn load(name: &str) -> Fixture {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/retrieval/{name}.npz"));
        let arrays = read_npz(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Fixture {
            name: name.into(),
            arrays,
        }
    }
    fn get(&self, key: &str) -> &NpyArray {
        self.arrays
            .get(key)
            .unwrap_or_else(|| panic!("{}: no array {key}", self.name))
    }
    fn f64s(&self, key: &str) -> Vec<f64> {
        match self.get(key) {
            NpyArray::F64 { data, .. } => data.clone(),
            NpyArray::I64 { data, .. } => data.iter().map(|&v| v as f64).collect(),
            other => panic!("{}: {key} is {other:?}", self.name),
        }
    }
    fn f64(&self, key: &str) -> f64 {
        self.f64s(key)[0]
    }
    fn i64s(&self, key: &str) -> Vec<i64> {
        match self.get(key) {
            NpyArray::I64 { data, .. } => data.clone(),
            other => panic!("{}: {key} is {other:?}", self.name),
        }
    }
    fn strings(&self, key: &str) -> Vec<String> {
        match self.get(key) {
            NpyArray::Str { data, .. } => data.clone(),
            other => panic!("{}: {key} is {other:?}", self.name),
        }
    }
    fn sim(&self) -> CosineSimilarity {
        let shape = self.get("x").shape().to_vec();
        CosineSimilarity::new(&self.f64s("x"), shape[0], shape[1]).unwrap()
    }
    fn labels(&self) -> Labels {
        Labels::from_joined(&self.strings("labels"))
    }
}

/// Same NaN pattern and max |a − b| ≤ tol; returns the max difference.
fn close(what: &str, ours: &[f64], theirs: &[f64], tol: f64) -> f64 {
    assert_eq!(ours.len(), theirs.len(), "{what}: length");
    let mut worst = 0.0f64;
    for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        if b.is_nan() || a.is_nan() {
            assert!(
                a.is_nan() && b.is_nan(),
                "{what}[{i}]: ours {a}, theirs {b}"
            );
        } else if b.is_infinite() {
            assert_eq!(a, b, "{what}[{i}]");
        } else {
            worst = worst.max((a - b).abs());
        }
    }
    assert!(worst <= tol, "{what}: max difference {worst:e} > {tol:e}");
    eprintln!("{what}: max |ours − peer| = {worst:.1e}");
    worst
}

fn bits(v: &[f64]) -> Vec<u64> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn nanmean(v: &[f64]) -> f64 {
    let ok: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    ok.iter().sum::<f64>() / ok.len() as f64
}

const MULTI: [&str; 2] = ["random_multi", "ties_multi"];

#[test]
fn deepprofiler_mode_reproduces_their_code() {
    for name in MULTI {
        let f = Fixture::load(name);
        let (sim, labels) = (f.sim(), f.labels());
        let opts = MapOptions {
            method: MapMethod::DeepProfiler,
            ..Default::default()
        };
        let r = mean_average_precision(&sim, &labels, &opts, None).unwrap();
        close(
            &format!("{name} dp AP"),
            &r.per_query,
            &f.f64s("dp_ap"),
            1e-12,
        );
        assert!((r.mean - nanmean(&f.f64s("dp_ap"))).abs() < 1e-12);
        let curve = r.curve.unwrap();
        close(
            &format!("{name} dp recall axis"),
            &curve.recall,
            &f.f64s("dp_recall"),
            0.0,
        );
        close(
            &format!("{name} dp curve"),
            &curve.precision,
            &f.f64s("dp_curve"),
            1e-12,
        );

        let legacy = MapOptions {
            sklearn_before_1_1: true,
            ..opts.clone()
        };
        let r = mean_average_precision(&sim, &labels, &legacy, None).unwrap();
        close(
            &format!("{name} dp legacy AP"),
            &r.per_query,
            &f.f64s("dp_legacy_ap"),
            1e-12,
        );

        let drop = MapOptions {
            unlabeled: Unlabeled::Drop,
            ..opts
        };
        let r = mean_average_precision(&sim, &labels, &drop, None).unwrap();
        close(
            &format!("{name} dp AP on annotated items"),
            &r.per_query,
            &f.f64s("dp_drop_ap"),
            1e-12,
        );
    }
}

#[test]
fn interpolated_mode_is_the_papers_definition() {
    for name in MULTI {
        let f = Fixture::load(name);
        let (sim, labels) = (f.sim(), f.labels());
        let opts = MapOptions {
            recall_points: f.f64("ip_points") as usize,
            ..Default::default()
        };
        let r = mean_average_precision(&sim, &labels, &opts, None).unwrap();
        close(
            &format!("{name} interpolated AP"),
            &r.per_query,
            &f.f64s("ip_ap"),
            1e-12,
        );
        let curve = r.curve.unwrap();
        close(
            &format!("{name} interpolated axis"),
            &curve.recall,
            &f.f64s("ip_recall"),
            0.0,
        );
        close(
            &format!("{name} interpolated curve"),
            &curve.precision,
            &f.f64s("ip_curve"),
            1e-12,
        );
        let r = mean_average_precision(&sim, &labels, &MapOptions::default(), None).unwrap();
        close(
            &format!("{name} interpolated AP, N points"),
            &r.per_query,
            &f.f64s("ip_default_ap"),
            1e-12,
        );
    }
}

#[test]
fn copairs_mode_formula_on_multilabel_data() {
    for name in MULTI {
        let f = Fixture::load(name);
        let (sim, labels) = (f.sim(), f.labels());
        let opts = MapOptions {
            method: MapMethod::Copairs,
            ..Default::default()
        };
        let r = mean_average_precision(&sim, &labels, &opts, None).unwrap();
        close(
            &format!("{name} copairs AP"),
            &r.per_query,
            &f.f64s("cp_ap"),
            1e-12,
        );
        let np: Vec<i64> = r.n_positives.iter().map(|&v| v as i64).collect();
        assert_eq!(np, f.i64s("n_positives"));
        assert!(r.p_values.is_none());
        let drop = MapOptions {
            unlabeled: Unlabeled::Drop,
            ..opts
        };
        let r = mean_average_precision(&sim, &labels, &drop, None).unwrap();
        close(
            &format!("{name} copairs AP, unannotated dropped"),
            &r.per_query,
            &f.f64s("cp_drop_ap"),
            1e-12,
        );
    }
}

#[test]
fn copairs_mode_matches_copairs() {
    for name in ["copairs_single", "ties_single"] {
        let f = Fixture::load(name);
        let (sim, labels) = (f.sim(), f.labels());
        let null_size = if name == "copairs_single" {
            f.f64("null_size") as usize
        } else {
            0
        };
        let opts = MapOptions {
            method: MapMethod::Copairs,
            null_size,
            seed: 5,
            ..Default::default()
        };
        let r = mean_average_precision(&sim, &labels, &opts, None).unwrap();
        close(
            &format!("{name} AP vs copairs"),
            &r.per_query,
            &f.f64s("peer_ap"),
            1e-12,
        );
        let peer_pos = f.i64s("peer_n_pos");
        for (i, &q) in r.per_query.iter().enumerate() {
            assert_eq!(r.n_positives[i] as i64, peer_pos[i], "n_pos[{i}]");
            if !q.is_nan() {
                assert_eq!(r.library_size as i64, f.i64s("peer_n_total")[i]);
            }
        }
        if null_size > 0 {
            // Different RNGs: agreement within 4 sd of the difference of two independent
            // Monte-Carlo estimates, 2 p (1 − p) / null_size.
            let ours = r.p_values.unwrap();
            let theirs = f.f64s("peer_p");
            let ns = null_size as f64;
            let mut worst = 0.0f64;
            for (i, (&a, &b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(a.is_nan(), b.is_nan(), "p[{i}]");
                if !b.is_nan() {
                    let pbar = (a + b) / 2.0;
                    let tol = 4.0 * (2.0 * pbar * (1.0 - pbar) / ns).sqrt() + 1.0 / ns;
                    assert!(
                        (a - b).abs() <= tol,
                        "p[{i}]: ours {a}, copairs {b}, tolerance {tol}"
                    );
                    worst = worst.max((a - b).abs() / tol);
                }
            }
            eprintln!("{name} p-values: worst |ours − copairs| / tolerance = {worst:.2}");
            let q = r.q_values.unwrap();
            close("q-values", &q, &benjamini_hochberg(&ours), 0.0);
            // Seeded: the same seed gives the same p-values, another seed others.
            let again = mean_average_precision(&sim, &labels, &opts, None).unwrap();
            assert_eq!(bits(&again.p_values.unwrap()), bits(&ours));
            let other = MapOptions { seed: 6, ..opts };
            assert_ne!(
                bits(
                    &mean_average_precision(&sim, &labels, &other, None)
                        .unwrap()
                        .p_values
                        .unwrap()
                ),
                bits(&ours)
            );
        }
    }
}

/// copairs stores similarities as float32: near-duplicates with different labels tie there (in
/// favour of positives). The default reproduces that; `copairs_float32: false` ranks the float64
/// similarities (the fixture's `cp_ap`), and the two differ on this data.
#[test]
fn copairs_float32_ranking() {
    let f = Fixture::load("copairs_f32");
    let (sim, labels) = (f.sim(), f.labels());
    let opts = MapOptions {
        method: MapMethod::Copairs,
        ..Default::default()
    };
    let r = mean_average_precision(&sim, &labels, &opts, None).unwrap();
    close(
        "AP with float32 similarities vs copairs",
        &r.per_query,
        &f.f64s("peer_ap"),
        1e-12,
    );
    let f64_opts = MapOptions {
        copairs_float32: false,
        ..opts
    };
    let r = mean_average_precision(&sim, &labels, &f64_opts, None).unwrap();
    close(
        "AP with float64 similarities",
        &r.per_query,
        &f.f64s("cp_ap"),
        1e-12,
    );
    let (a, b) = (f.f64s("peer_ap"), f.f64s("cp_ap"));
    assert!(
        a.iter()
            .zip(&b)
            .filter(|(x, y)| (*x - *y).abs() > 1e-3)
            .count()
            > 10
    );
}

#[test]
fn folds_of_enrichment_per_query() {
    for name in MULTI {
        let f = Fixture::load(name);
        let (sim, labels) = (f.sim(), f.labels());
        for pct in [99, 90] {
            let keep = EnrichmentOptions {
                percentile: pct as f64,
                infinite_odds: InfiniteOdds::Keep,
                ..Default::default()
            };
            let r = folds_of_enrichment(&sim, &labels, &keep, None).unwrap();
            close(
                &format!("{name} enrichment {pct} threshold"),
                &r.threshold,
                &f.f64s(&format!("enr{pct}_threshold")),
                1e-12,
            );
            let tables = f.i64s(&format!("enr{pct}_table"));
            for (i, t) in r.table.iter().enumerate() {
                if r.is_query[i] {
                    let flat = [t[0][0], t[0][1], t[1][0], t[1][1]].map(|v| v as i64);
                    assert_eq!(&flat[..], &tables[4 * i..4 * i + 4], "{name} table {i}");
                }
            }
            let scipy_or = f.f64s(&format!("enr{pct}_or"));
            close(
                &format!("{name} enrichment {pct} odds ratio (scipy's inf/NaN)"),
                &r.odds_ratio,
                &scipy_or,
                1e-12,
            );
            let p = f.f64s(&format!("enr{pct}_p"));
            for (i, (&a, &b)) in r.p_value.iter().zip(&p).enumerate() {
                assert!(
                    a.is_nan() && b.is_nan() || (a - b).abs() <= 1e-12 * b.max(1e-300) + 1e-15,
                    "{name} p[{i}]: {a} vs {b}"
                );
            }
            // DeepProfilerExperiments: infinite → v22; Haldane (default): finite everywhere.
            let dp = EnrichmentOptions {
                infinite_odds: InfiniteOdds::DeepProfiler,
                ..keep.clone()
            };
            let rd = folds_of_enrichment(&sim, &labels, &dp, None).unwrap();
            let hal = folds_of_enrichment(
                &sim,
                &labels,
                &EnrichmentOptions {
                    percentile: pct as f64,
                    ..Default::default()
                },
                None,
            )
            .unwrap();
            for (i, &or) in scipy_or.iter().enumerate() {
                if !r.is_query[i] {
                    continue;
                }
                let t = &r.table[i];
                let expect_dp = if or.is_infinite() { t[1][1] as f64 } else { or };
                assert!(
                    rd.odds_ratio[i] == expect_dp
                        || expect_dp.is_nan() && rd.odds_ratio[i].is_nan()
                );
                assert!(hal.odds_ratio[i].is_finite());
                if or.is_finite() {
                    assert_eq!(hal.odds_ratio[i], or);
                }
            }
            assert!(hal.mean_odds_ratio.is_finite());
        }
    }
}

#[test]
fn folds_of_enrichment_global_threshold() {
    for name in MULTI {
        let f = Fixture::load(name);
        let opts = EnrichmentOptions {
            infinite_odds: InfiniteOdds::Keep,
            ..Default::default()
        };
        let r = folds_of_enrichment_pooled(&f.sim(), &f.labels(), &opts, None).unwrap();
        assert!(
            (r.threshold - f.f64("pooled_threshold")).abs() < 1e-12,
            "{name}: {} vs {}",
            r.threshold,
            f.f64("pooled_threshold")
        );
        let t = f.i64s("pooled_table");
        assert_eq!(
            [r.table[0][0], r.table[0][1], r.table[1][0], r.table[1][1]]
                .map(|v| v as i64)
                .to_vec(),
            t
        );
        let (o, p) = (f.f64("pooled_or"), f.f64("pooled_p"));
        let same = r.odds_ratio == o
            || r.odds_ratio.is_nan() && o.is_nan()
            || (r.odds_ratio - o).abs() < 1e-12 * o;
        assert!(same, "{name}: odds ratio {} vs {o}", r.odds_ratio);
        assert!(
            (r.p_value - p).abs() <= 1e-12 * p + 1e-300,
            "{} vs {p}",
            r.p_value
        );
    }
}

#[test]
fn precision_and_recall_at_k() {
    for name in MULTI {
        let f = Fixture::load(name);
        let ks: Vec<usize> = f.i64s("pk_ks").iter().map(|&k| k as usize).collect();
        let r = precision_recall_at_k(&f.sim(), &f.labels(), &ks, &AtKOptions::default(), None)
            .unwrap();
        close(
            &format!("{name} precision@k"),
            &r.precision,
            &f.f64s("pk_precision"),
            1e-15,
        );
        close(
            &format!("{name} recall@k"),
            &r.recall,
            &f.f64s("pk_recall"),
            1e-15,
        );
        let p = f.f64s("pk_precision");
        for (c, &m) in r.mean_precision.iter().enumerate() {
            let col: Vec<f64> = (0..p.len() / ks.len())
                .map(|i| p[i * ks.len() + c])
                .collect();
            assert!((m - nanmean(&col)).abs() < 1e-12);
        }
    }
}

#[test]
fn replicate_reproducibility_matches_cytominer_eval() {
    for name in MULTI {
        let f = Fixture::load(name);
        let r = replicate_reproducibility(
            &f.sim(),
            &f.strings("groups"),
            &ReplicateOptions::default(),
            None,
        )
        .unwrap();
        assert!(
            (r.threshold - f.f64("rep_threshold")).abs() < 1e-12,
            "{name}: {} vs {}",
            r.threshold,
            f.f64("rep_threshold")
        );
        assert_eq!(r.fraction, f.f64("rep_fraction"), "{name}");
    }
}

/// scipy's hypergeometric tail (boost) loses digits on tables of ~10^9 to 10^10 (up to 2e-6
/// relative on the fixture's); the fixture also holds the tail summed in 40-digit arithmetic
/// (mpmath), which ours must match to 1e-12.
#[test]
fn fisher_exact_and_odds_ratio_match_scipy() {
    let f = Fixture::load("fisher");
    let t = f.i64s("tables");
    let (p, exact, o) = (f.f64s("p"), f.f64s("p_exact"), f.f64s("odds"));
    let (mut worst_exact, mut worst_scipy) = (0.0f64, 0.0f64);
    for i in 0..p.len() {
        let tab = [
            [t[4 * i] as u64, t[4 * i + 1] as u64],
            [t[4 * i + 2] as u64, t[4 * i + 3] as u64],
        ];
        let ours = fisher_exact_greater(&tab);
        let rel = |r: f64| {
            if r == 0.0 {
                ours.abs() / f64::MIN_POSITIVE
            } else {
                (ours - r).abs() / r
            }
        };
        assert!(
            rel(exact[i]) < 1e-12 || exact[i] < 1e-290 && ours < 1e-290,
            "{tab:?}: p {ours:e} vs exact {:e}",
            exact[i]
        );
        assert!(
            rel(p[i]) < 1e-5 || p[i] < 1e-290 && ours < 1e-290,
            "{tab:?}: p {ours:e} vs scipy {:e}",
            p[i]
        );
        if exact[i] > 1e-290 {
            worst_exact = worst_exact.max(rel(exact[i]));
            worst_scipy = worst_scipy.max(rel(p[i]));
        }
        let or = odds_ratio(&tab);
        assert!(
            or == o[i] || or.is_nan() && o[i].is_nan(),
            "table {tab:?}: odds {or} vs {}",
            o[i]
        );
    }
    eprintln!("fisher p: worst relative difference vs 40-digit sum {worst_exact:.1e}, vs scipy {worst_scipy:.1e}");
}

#[test]
fn benjamini_hochberg_matches_statsmodels() {
    let f = Fixture::load("bh");
    close(
        "BH q-values",
        &benjamini_hochberg(&f.f64s("p")),
        &f.f64s("q"),
        0.0,
    );
}

#[test]
fn results_do_not_depend_on_block_size_and_progress_can_cancel() {
    let f = Fixture::load("random_multi");
    let (sim, labels) = (f.sim(), f.labels());
    let base = MapOptions {
        method: MapMethod::Copairs,
        null_size: 300,
        seed: 1,
        ..Default::default()
    };
    let a = mean_average_precision(&sim, &labels, &base, None).unwrap();
    for block_rows in [1, 7, 64] {
        let b = mean_average_precision(
            &sim,
            &labels,
            &MapOptions {
                block_rows,
                ..base.clone()
            },
            None,
        )
        .unwrap();
        assert_eq!(bits(&a.per_query), bits(&b.per_query));
        assert_eq!(
            bits(a.p_values.as_ref().unwrap()),
            bits(b.p_values.as_ref().unwrap())
        );
    }
    let mut seen = Vec::new();
    let mut cb = |done: usize, total: usize| {
        seen.push((done, total));
        done < total / 2
    };
    let r = mean_average_precision(
        &sim,
        &labels,
        &MapOptions {
            block_rows: 2,
            ..base
        },
        Some(&mut cb),
    );
    assert_eq!(r.unwrap_err(), Error::Cancelled);
    assert!(
        seen.len() >= 2 && seen.windows(2).all(|w| w[0].0 < w[1].0),
        "{seen:?}"
    );
}

#[test]
fn bad_inputs_are_errors() {
    let f = Fixture::load("random_multi");
    let sim = f.sim();
    let short = Labels::from_joined(&["a", "a"]);
    assert!(matches!(
        mean_average_precision(&sim, &short, &MapOptions::default(), None),
        Err(Error::Shape(_))
    ));
    let mut x = f.f64s("x");
    x[13] = f64::INFINITY;
    let e = CosineSimilarity::new(&x, 70, 10).unwrap_err();
    assert!(
        matches!(&e, Error::NonFinite(m) if m.contains("row 1, feature 3")),
        "{e}"
    );
    let one = MapOptions {
        recall_points: 1,
        ..Default::default()
    };
    assert!(matches!(
        mean_average_precision(&sim, &f.labels(), &one, None),
        Err(Error::InvalidArgument(_))
    ));
    let pct = EnrichmentOptions {
        percentile: 101.0,
        ..Default::default()
    };
    assert!(matches!(
        folds_of_enrichment(&sim, &f.labels(), &pct, None),
        Err(Error::InvalidArgument(_))
    ));
    // No queries at all: mean is NaN, every per-query value NaN.
    let none = Labels::from_joined(&(0..70).map(|i| format!("l{i}")).collect::<Vec<_>>());
    let r = mean_average_precision(&sim, &none, &MapOptions::default(), None).unwrap();
    assert!(r.mean.is_nan() && r.per_query.iter().all(|v| v.is_nan()) && r.n_queries == 0);
}
