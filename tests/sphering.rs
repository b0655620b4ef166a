//! Sphering (REFERENCE §5) and treatment effect (§6) against the fixtures of
//! tests/fixtures/make_sphering_fixture.py (pycytominer 1.7.1 Spherize and an independent numpy
//! implementation), plus the closed-form invariants and the error paths.

use phenocore::io::npz::{read_npz, NpyArray};
use phenocore::io::profiles::Profiles;
use phenocore::profiling::effect::{treatment_effect, EffectOptions, Tier};
use phenocore::profiling::sphere::{
    lambda_sweep, ControlSelector, ProfileSphering, Regularization, SphereMethod, SphereOptions,
    Sphering,
};
use phenocore::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn fixture(name: &str) -> BTreeMap<String, NpyArray> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/sphering")
        .join(name);
    read_npz(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f64s(map: &BTreeMap<String, NpyArray>, key: &str) -> (Vec<usize>, Vec<f64>) {
    match map.get(key) {
        Some(NpyArray::F64 { shape, data }) => (shape.clone(), data.clone()),
        other => panic!("fixture array {key:?} is not f64: {other:?}"),
    }
}

fn ints(map: &BTreeMap<String, NpyArray>, key: &str) -> Vec<i64> {
    match map.get(key) {
        Some(NpyArray::I64 { data, .. }) => data.clone(),
        other => panic!("fixture array {key:?} is not integer: {other:?}"),
    }
}

fn strings(map: &BTreeMap<String, NpyArray>, key: &str) -> Vec<String> {
    match map.get(key) {
        Some(NpyArray::Str { data, .. }) => data.clone(),
        other => panic!("fixture array {key:?} is not strings: {other:?}"),
    }
}

/// max |ours − ref| / max |ref| over the first `cols` columns of n × d matrices.
fn rel_diff(ours: &[f64], reference: &[f64], d: usize, cols: usize) -> f64 {
    assert_eq!(ours.len(), reference.len());
    let (mut diff, mut scale) = (0.0f64, 0.0f64);
    for (a, b) in ours.chunks(d).zip(reference.chunks(d)) {
        for j in 0..cols {
            assert!(a[j].is_finite(), "non-finite output");
            diff = diff.max((a[j] - b[j]).abs());
            scale = scale.max(b[j].abs());
        }
    }
    assert!(scale > 0.0, "degenerate reference");
    diff / scale
}

fn opts(method: SphereMethod, lambda: f64, regularization: Regularization) -> SphereOptions {
    SphereOptions {
        method,
        lambda,
        regularization,
    }
}

#[test]
fn matches_pycytominer_spherize_on_centred_data() {
    let mut worst = 0.0f64;
    for case in ["tall", "wide"] {
        let f = fixture(&format!("sphere_{case}.npz"));
        let (xs, x) = f64s(&f, "X");
        let (ts, t) = f64s(&f, "T");
        let (n, d) = (xs[0], xs[1]);
        let pca_valid = ints(&f, "pca_valid")[0] as usize;
        for method in SphereMethod::ALL {
            for (eps, key) in [(1e-6, "1e-06"), (0.5, "0.5")] {
                let s = Sphering::fit(&x, n, d, &opts(method, eps, Regularization::Pycytominer))
                    .unwrap();
                let ours = s.transform(&t, ts[0]).unwrap();
                let (_, want) = f64s(&f, &format!("pyc_{}_{key}", method.name()));
                let cols = if method.is_zca() { d } else { pca_valid };
                let r = rel_diff(&ours, &want, d, cols);
                eprintln!("pycytominer {case} {method} eps {eps}: max rel diff {r:.2e}");
                assert!(r < 1e-9, "{case} {method} eps {eps}: {r:.3e}");
                worst = worst.max(r);
            }
        }
    }
    eprintln!("worst relative difference vs pycytominer: {worst:.2e}");
}

#[test]
fn matches_numpy_reference_of_the_lambda_formula() {
    let mut worst = 0.0f64;
    for case in ["tall", "wide"] {
        let f = fixture(&format!("sphere_{case}.npz"));
        let (xs, x) = f64s(&f, "X");
        let (ts, t) = f64s(&f, "T");
        let (n, d) = (xs[0], xs[1]);
        let pca_valid = ints(&f, "pca_valid")[0] as usize;
        for method in SphereMethod::ALL {
            for (lam, key) in [(1e-3, "0.001"), (0.1, "0.1")] {
                let s = Sphering::fit(&x, n, d, &opts(method, lam, Regularization::Eigenvalue))
                    .unwrap();
                let (_, delta) = f64s(
                    &f,
                    if method.is_cor() {
                        "ref_eig_cor"
                    } else {
                        "ref_eig_cov"
                    },
                );
                for (a, b) in s.eigenvalues().iter().zip(&delta) {
                    assert!((a - b.max(0.0)).abs() <= 1e-10 * delta[0], "{a} vs {b}");
                }
                let ours = s.transform(&t, ts[0]).unwrap();
                let (_, want) = f64s(&f, &format!("ref_{}_{key}", method.name()));
                let cols = if method.is_zca() { d } else { pca_valid };
                let r = rel_diff(&ours, &want, d, cols);
                eprintln!("numpy {case} {method} lambda {lam}: max rel diff {r:.2e}");
                assert!(r < 1e-9, "{case} {method} lambda {lam}: {r:.3e}");
                worst = worst.max(r);
            }
        }
    }
    eprintln!("worst relative difference vs numpy: {worst:.2e}");
}

fn random_controls(n: usize, d: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mix: Vec<f64> = (0..d * d)
        .map(|_| rng.sample::<f64, _>(StandardNormal))
        .collect();
    let mut x = vec![0.0; n * d];
    for i in 0..n {
        let z: Vec<f64> = (0..d)
            .map(|_| rng.sample::<f64, _>(StandardNormal))
            .collect();
        for j in 0..d {
            x[i * d + j] = 3.0 * j as f64 + (0..d).map(|k| z[k] * mix[k * d + j]).sum::<f64>();
        }
    }
    x
}

/// Covariance (divisor n) of an n × d matrix.
fn covariance(x: &[f64], n: usize, d: usize) -> Vec<f64> {
    let mut mean = vec![0.0; d];
    for row in x.chunks(d) {
        for j in 0..d {
            mean[j] += row[j] / n as f64;
        }
    }
    let mut c = vec![0.0; d * d];
    for row in x.chunks(d) {
        for i in 0..d {
            for j in 0..d {
                c[i * d + j] += (row[i] - mean[i]) * (row[j] - mean[j]) / n as f64;
            }
        }
    }
    c
}

#[test]
fn whitened_controls_have_covariance_eigenvalues_delta_over_delta_plus_lambda() {
    let (n, d, lam) = (300, 10, 0.5);
    let x = random_controls(n, d, 7);
    for method in SphereMethod::ALL {
        let s = Sphering::fit(&x, n, d, &opts(method, lam, Regularization::Eigenvalue)).unwrap();
        let y = s.transform(&x, n).unwrap();
        let c = covariance(&y, n, d);
        let delta = s.eigenvalues();
        let q = s.matrix();
        if method.is_zca() {
            // ZCA: cov(Qx) = U diag(Δ/(Δ+λ)) Uᵀ, and Q is symmetric. Check cov · Q = Q · diag
            // through its trace and Frobenius norm (eigenvalue sums), and symmetry exactly.
            for i in 0..d {
                for j in 0..d {
                    assert_eq!(q[i * d + j], q[j * d + i], "{method}: Q not symmetric");
                }
            }
            let want_trace: f64 = delta.iter().map(|e| e / (e + lam)).sum();
            let want_frob: f64 = delta.iter().map(|e| (e / (e + lam)).powi(2)).sum();
            let trace: f64 = (0..d).map(|i| c[i * d + i]).sum();
            let frob: f64 = c.iter().map(|v| v * v).sum();
            assert!(
                (trace - want_trace).abs() < 1e-10,
                "{method}: trace {trace} vs {want_trace}"
            );
            assert!(
                (frob - want_frob).abs() < 1e-10,
                "{method}: {frob} vs {want_frob}"
            );
        } else {
            // PCA: cov(Qx) is diagonal with Δ/(Δ+λ) in decreasing order; rows of Q orthogonal.
            for i in 0..d {
                for j in 0..d {
                    let want = if i == j {
                        delta[i] / (delta[i] + lam)
                    } else {
                        0.0
                    };
                    assert!(
                        (c[i * d + j] - want).abs() < 1e-10,
                        "{method}: cov[{i},{j}]"
                    );
                    let dot: f64 = (0..d).map(|k| q[i * d + k] * q[j * d + k]).sum();
                    let want = if i == j { 1.0 / (delta[i] + lam) } else { 0.0 };
                    assert!(
                        (dot - want).abs() < 1e-10,
                        "{method}: Q rows {i},{j}: {dot}"
                    );
                }
                // Sign convention: the largest-magnitude entry of every row is positive.
                let row = &q[i * d..(i + 1) * d];
                let big = row
                    .iter()
                    .fold(0.0f64, |m, v| if v.abs() > m.abs() { *v } else { m });
                assert!(big > 0.0);
            }
            assert!(delta.windows(2).all(|w| w[0] >= w[1]));
        }
        if method.is_cor() {
            // The correlation matrix has unit diagonal: Δ sums to d.
            assert!((delta.iter().sum::<f64>() - d as f64).abs() < 1e-10);
        }
    }
    // λ = 0 whitens exactly: identity covariance.
    let s = Sphering::fit(
        &x,
        n,
        d,
        &opts(SphereMethod::Zca, 0.0, Regularization::Eigenvalue),
    )
    .unwrap();
    let c = covariance(&s.transform(&x, n).unwrap(), n, d);
    for i in 0..d {
        for j in 0..d {
            let want = if i == j { 1.0 } else { 0.0 };
            assert!((c[i * d + j] - want).abs() < 1e-10);
        }
    }
}

#[test]
fn constant_feature_is_finite_with_lambda_and_an_error_without() {
    let (n, d) = (50, 6);
    let mut x = random_controls(n, d, 3);
    for i in 0..n {
        x[i * d + 2] = 7.25;
    }
    let t: Vec<f64> = (0..3 * d).map(|i| i as f64).collect();
    for method in SphereMethod::ALL {
        for reg in [Regularization::Eigenvalue, Regularization::Pycytominer] {
            let s = Sphering::fit(&x, n, d, &opts(method, 1e-2, reg)).unwrap();
            let y = s.transform(&t, 3).unwrap();
            assert!(y.iter().all(|v| v.is_finite()), "{method} {reg}");
        }
        // Eigenvalue mode: the constant feature's deviation is scaled by λ^(-1/2) exactly
        // (ZCA: it is its own eigenvector).
        let s = Sphering::fit(&x, n, d, &opts(method, 0.04, Regularization::Eigenvalue)).unwrap();
        if method == SphereMethod::Zca {
            let y = s.transform(&t[..d], 1).unwrap();
            let z = s.transform(&x[..d], 1).unwrap();
            assert!(((y[2] - z[2]) - (t[2] - 7.25) / 0.2).abs() < 1e-9);
        }
        let err =
            Sphering::fit(&x, n, d, &opts(method, 0.0, Regularization::Eigenvalue)).unwrap_err();
        assert!(
            matches!(&err, Error::InvalidArgument(m) if m.contains("singular") && m.contains("column 2")),
            "{err}"
        );
    }
    // Through a profile table the error names the feature.
    let p = table(&x, n, d, &[("Metadata_Plate", vec!["A"; n])]);
    let err = Sphering::fit_profiles(
        &p,
        &ControlSelector::Rows((0..n).collect()),
        &opts(SphereMethod::Zca, 0.0, Regularization::Eigenvalue),
    )
    .unwrap_err();
    assert!(err.to_string().contains("\"f2\""), "{err}");
}

#[test]
fn fewer_controls_than_features() {
    let (n, d) = (8, 20);
    let x = random_controls(n, d, 11);
    let err = Sphering::fit(
        &x,
        n,
        d,
        &opts(SphereMethod::Zca, 0.0, Regularization::Eigenvalue),
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("more controls than features"),
        "{err}"
    );
    let s = Sphering::fit(
        &x,
        n,
        d,
        &opts(SphereMethod::Pca, 1e-3, Regularization::Eigenvalue),
    )
    .unwrap();
    // rank n - 1: the rest of Δ is 0 and gets weight λ^(-1/2).
    assert!(s.eigenvalues()[n - 2] > 1e-3);
    assert!(s.eigenvalues()[n - 1..].iter().all(|&e| e < 1e-10));
    assert!(s.transform(&x, n).unwrap().iter().all(|v| v.is_finite()));
}

#[test]
fn bad_input_is_an_error_naming_it() {
    let (n, d) = (10, 3);
    let mut x = random_controls(n, d, 5);
    let o = SphereOptions::default();
    assert!(matches!(
        Sphering::fit(&x[..d], 1, d, &o),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        Sphering::fit(&x[..5], 2, d, &o),
        Err(Error::Shape(_))
    ));
    let bad = SphereOptions { lambda: -1.0, ..o };
    assert!(matches!(
        Sphering::fit(&x, n, d, &bad),
        Err(Error::InvalidArgument(_))
    ));
    let s = Sphering::fit(&x, n, d, &o).unwrap();
    x[4 * d + 1] = f64::NAN;
    let err = s.transform(&x, n).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite(m) if m.contains("row 4, column 1")),
        "{err}"
    );
    let err = Sphering::fit(&x, n, d, &o).unwrap_err();
    assert!(
        matches!(&err, Error::NonFinite(m) if m.contains("controls")),
        "{err}"
    );
    assert!("zca_cor".parse::<SphereMethod>().unwrap() == SphereMethod::ZcaCor);
    assert!(matches!(
        "ica".parse::<SphereMethod>(),
        Err(Error::InvalidArgument(_))
    ));
}

fn table(x: &[f64], n: usize, d: usize, meta: &[(&str, Vec<&str>)]) -> Profiles {
    Profiles::new(
        meta.iter().map(|(k, _)| k.to_string()).collect(),
        meta.iter()
            .map(|(_, v)| {
                assert_eq!(v.len(), n);
                v.iter().map(|s| s.to_string()).collect()
            })
            .collect(),
        (0..d).map(|j| format!("f{j}")).collect(),
        x.to_vec(),
    )
    .unwrap()
}

/// Two plates with different offsets; every third well a control.
fn two_plates(n: usize, d: usize) -> Profiles {
    let mut x = random_controls(n, d, 21);
    let mut plate = Vec::new();
    let mut kind = Vec::new();
    for i in 0..n {
        let p = if i % 2 == 0 { "P1" } else { "P2" };
        if p == "P2" {
            for j in 0..d {
                x[i * d + j] += 5.0 + j as f64;
            }
        }
        plate.push(p);
        kind.push(if i % 3 == 0 { "negcon" } else { "trt" });
    }
    table(
        &x,
        n,
        d,
        &[("Metadata_Plate", plate), ("Metadata_control_type", kind)],
    )
}

#[test]
fn per_plate_fits_equal_separate_fits_and_survive_save_load() {
    let (n, d) = (240, 7);
    let p = two_plates(n, d);
    let ctl = ControlSelector::meta("Metadata_control_type", "negcon");
    let o = opts(
        SphereOptions::default().method,
        1e-2,
        Regularization::Eigenvalue,
    );
    let sp = ProfileSphering::fit_per_plate(&p, "Metadata_Plate", &ctl, &o).unwrap();
    let out = sp.transform_profiles(&p).unwrap();
    let plates = p.meta_column("Metadata_Plate").unwrap().to_vec();
    for plate in ["P1", "P2"] {
        let ctl_rows: Vec<usize> = (0..n)
            .filter(|&i| plates[i] == plate && i % 3 == 0)
            .collect();
        let rows: Vec<usize> = (0..n).filter(|&i| plates[i] == plate).collect();
        let sub = p.select_rows(&ctl_rows);
        let alone = Sphering::fit(&sub.data, ctl_rows.len(), d, &o).unwrap();
        assert_eq!(sp.get(Some(plate)).unwrap(), &alone);
        let want = alone
            .transform(&p.select_rows(&rows).data, rows.len())
            .unwrap();
        let got = out.select_rows(&rows).data;
        assert_eq!(got, want);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("per_plate.safetensors");
    sp.save(&path).unwrap();
    let back = ProfileSphering::load(&path).unwrap();
    assert_eq!(back, sp);
    assert!(matches!(Sphering::load(&path), Err(Error::Format(_))));

    let pooled = ProfileSphering::fit(&p, &ctl, None, &o).unwrap();
    pooled.save(&path).unwrap();
    let ProfileSphering::Pooled(s) = &pooled else {
        panic!("pooled fit is per plate")
    };
    assert_eq!(&Sphering::load(&path).unwrap(), s);
    assert_eq!(ProfileSphering::load(&path).unwrap(), pooled);

    // A -cor fit keeps its scale through the file; garbage is a format error.
    let cor = Sphering::fit_profiles(
        &p,
        &ctl,
        &opts(SphereMethod::PcaCor, 0.3, Regularization::Pycytominer),
    )
    .unwrap();
    let back = Sphering::from_bytes(&cor.to_bytes().unwrap()).unwrap();
    assert_eq!(back, cor);
    assert_eq!(back.lambda(), 0.3);
    assert!(back.scale().is_some());
    assert!(matches!(
        Sphering::from_bytes(b"not a file"),
        Err(Error::Format(_))
    ));
    let names = cor.transform_profiles(&p).unwrap().feature_names;
    assert_eq!(names[0], "PC1");

    // A plate without controls cannot be fitted; a plate not fitted cannot be transformed.
    let only_p1 = ControlSelector::Rows((0..n).filter(|&i| i % 2 == 0 && i % 3 == 0).collect());
    let err = ProfileSphering::fit_per_plate(&p, "Metadata_Plate", &only_p1, &o).unwrap_err();
    assert!(err.to_string().contains("\"P2\""), "{err}");
}

#[test]
fn lambda_sweep_reuses_the_decomposition_exactly() {
    let (n, d) = (120, 5);
    let p = two_plates(n, d);
    let ctl = ControlSelector::meta("Metadata_control_type", "negcon");
    let base = SphereOptions::default();
    let lambdas = [0.0, 1e-3, 1e-1, 10.0];
    let mut calls = 0;
    let mut metric = |s: &Profiles| -> phenocore::Result<f64> {
        calls += 1;
        Ok(s.data.iter().map(|v| v * v).sum::<f64>())
    };
    let curve = lambda_sweep(
        &p,
        &ctl,
        Some("Metadata_Plate"),
        &base,
        &lambdas,
        &mut metric,
    )
    .unwrap();
    assert_eq!(calls, lambdas.len());
    for (&(lam, value), &want_lam) in curve.iter().zip(&lambdas) {
        assert_eq!(lam, want_lam);
        let o = SphereOptions {
            lambda: lam,
            ..base
        };
        let s = ProfileSphering::fit(&p, &ctl, Some("Metadata_Plate"), &o).unwrap();
        let want: f64 = s
            .transform_profiles(&p)
            .unwrap()
            .data
            .iter()
            .map(|v| v * v)
            .sum();
        assert_eq!(value, want);
    }
    // Larger λ shrinks the sphered profiles.
    assert!(curve.windows(2).all(|w| w[1].1 < w[0].1));
}

#[test]
fn treatment_effect_matches_numpy_reference() {
    let f = fixture("effect.npz");
    let (xs, x) = f64s(&f, "X");
    let (n, d) = (xs[0], xs[1]);
    let plate = strings(&f, "plate");
    let treatment = strings(&f, "treatment");
    let control = ints(&f, "control");
    let p = Profiles::new(
        vec!["Metadata_Plate".into(), "Metadata_Treatment".into()],
        vec![plate, treatment],
        (0..d).map(|j| format!("f{j}")).collect(),
        x,
    )
    .unwrap();
    assert_eq!(p.n_rows(), n);
    let controls = ControlSelector::meta("Metadata_Treatment", "DMSO");
    let r = treatment_effect(
        &p,
        "Metadata_Plate",
        "Metadata_Treatment",
        &controls,
        &EffectOptions::default(),
    )
    .unwrap();
    let (_, dist) = f64s(&f, "distance");
    let (_, z) = f64s(&f, "z");
    for i in 0..n {
        assert!((r.distance[i] - dist[i]).abs() < 1e-12, "distance {i}");
        assert!((r.z[i] - z[i]).abs() < 1e-12, "z {i}");
        assert_eq!(control[i] == 1, p.meta[1][i] == "DMSO");
    }
    let names = strings(&f, "names");
    let (_, effect) = f64s(&f, "effect");
    let tier = ints(&f, "tier");
    assert_eq!(r.treatments.len(), names.len());
    let mut worst = 0.0f64;
    for (k, t) in r.treatments.iter().enumerate() {
        assert_eq!(t.treatment, names[k]);
        worst = worst.max((t.effect - effect[k]).abs());
        let want = match tier[k] {
            0 => Tier::Bottom,
            1 => Tier::Middle,
            2 => Tier::Top,
            _ => Tier::Unselected,
        };
        assert_eq!(t.tier, want, "{}", t.treatment);
    }
    assert!(worst < 1e-12, "effect max abs diff {worst:.2e}");
    assert_eq!(r.tier(Tier::Top).len(), 3);
}
