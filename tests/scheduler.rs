//! Noise schedules and samplers against diffusers 0.42 (cross-checked with MONAI 1.6 in the script):
//! tests/fixtures/make_scheduler_fixture.py → tests/fixtures/scheduler/scheduler.npz.
//!
//! The peers compute in float32; phenocore's β / ᾱ are f64. Errors are max|ours − ref| / max|ref|
//! per array (per step for the samplers); the measured values are printed with --nocapture.

use phenocore::diffusion::scheduler::{
    guide, BetaSchedule, PredictionType, SamplerKind, Scheduler, SchedulerConfig,
};
use phenocore::io::npz::{read_npz, NpyArray};
use phenocore::Error;
use std::collections::BTreeMap;
use std::path::PathBuf;

const TOL: f64 = 1e-4;

fn fixture() -> BTreeMap<String, NpyArray> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/scheduler/scheduler.npz");
    read_npz(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn f32s<'a>(fx: &'a BTreeMap<String, NpyArray>, key: &str) -> &'a [f32] {
    match fx.get(key) {
        Some(NpyArray::F32 { data, .. }) => data,
        other => panic!("fixture array {key:?} is not f32: {other:?}"),
    }
}

fn f64s<'a>(fx: &'a BTreeMap<String, NpyArray>, key: &str) -> &'a [f64] {
    match fx.get(key) {
        Some(NpyArray::F64 { data, .. }) => data,
        other => panic!("fixture array {key:?} is not f64: {other:?}"),
    }
}

fn ints(fx: &BTreeMap<String, NpyArray>, key: &str) -> Vec<usize> {
    match fx.get(key) {
        Some(NpyArray::I64 { data, .. }) => data.iter().map(|&v| v as usize).collect(),
        other => panic!("fixture array {key:?} is not integer: {other:?}"),
    }
}

/// max|a − b| / max|b|.
fn rel(what: &str, a: impl IntoIterator<Item = f64>, b: impl IntoIterator<Item = f64>) -> f64 {
    let (mut err, mut scale, mut n) = (0f64, 0f64, 0usize);
    for (x, y) in a.into_iter().zip(b) {
        assert!(x.is_finite(), "{what}: non-finite output");
        err = err.max((x - y).abs());
        scale = scale.max(y.abs());
        n += 1;
    }
    assert!(n > 0 && scale > 0.0, "{what}: empty or zero reference");
    eprintln!("{what}: {:.2e}", err / scale);
    err / scale
}

fn config(kind: SamplerKind, schedule: &str, pred: PredictionType) -> SchedulerConfig {
    let (schedule, beta_start, beta_end) = match schedule {
        "linear" => (BetaSchedule::Linear, 1e-4, 2e-2),
        "scaled_linear" => (BetaSchedule::ScaledLinear, 0.0015, 0.0205),
        _ => (BetaSchedule::Cosine, 0.0015, 0.0205),
    };
    SchedulerConfig {
        kind,
        schedule,
        beta_start,
        beta_end,
        prediction_type: pred,
        ..SchedulerConfig::default()
    }
}

#[test]
fn schedules_match_diffusers() {
    let fx = fixture();
    for name in ["linear", "scaled_linear", "cosine"] {
        let s =
            Scheduler::new(config(SamplerKind::Ddpm, name, PredictionType::Epsilon), 0).unwrap();
        let betas = f32s(&fx, &format!("sched/{name}/betas"));
        let abar = f32s(&fx, &format!("sched/{name}/alphas_cumprod"));
        let abar64 = f64s(&fx, &format!("sched/{name}/alphas_cumprod_f64"));
        // β element-wise relative (each β matters on its own step).
        let e_beta = s
            .betas()
            .iter()
            .zip(betas)
            .map(|(a, &b)| (a - b as f64).abs() / (b as f64).abs())
            .fold(0.0, f64::max);
        eprintln!("{name} betas (element-wise): {e_beta:.2e}");
        assert!(e_beta <= 1e-6, "{name} betas {e_beta:.2e}");
        // ᾱ element-wise relative too: the last ᾱ of the cosine schedule is ~1e-8 of the first.
        let elem = |r: &[f64]| {
            s.alphas_cumprod()
                .iter()
                .zip(r)
                .map(|(a, b)| (a - b).abs() / b.abs())
                .fold(0.0, f64::max)
        };
        let e32 = elem(&abar.iter().map(|&v| v as f64).collect::<Vec<_>>());
        let e64 = elem(abar64);
        eprintln!("{name} alphas_cumprod vs diffusers f32 {e32:.2e}, vs f64 formula {e64:.2e}");
        assert!(e32 <= TOL, "{name} alphas_cumprod vs f32 {e32:.2e}");
        assert!(e64 <= 1e-12, "{name} alphas_cumprod vs f64 {e64:.2e}");
    }
}

#[test]
fn add_noise_and_velocity_match_diffusers_and_invert() {
    let fx = fixture();
    let s = Scheduler::new(SchedulerConfig::default(), 0).unwrap();
    let (x0, noise, t) = (f32s(&fx, "x0"), f32s(&fx, "noise"), ints(&fx, "t"));
    let xt = s.add_noise(x0, noise, &t).unwrap();
    let v = s.get_velocity(x0, noise, &t).unwrap();
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    assert!(rel("add_noise", wide(&xt), wide(f32s(&fx, "add_noise"))) <= TOL);
    assert!(rel("get_velocity", wide(&v), wide(f32s(&fx, "velocity"))) <= TOL);
    // Closed forms (REFERENCE §10): x0 = √ᾱ·x_t − √(1−ᾱ)·v, ε = √ᾱ·v + √(1−ᾱ)·x_t.
    let per = x0.len() / t.len();
    let (mut x0_back, mut eps_back) = (vec![], vec![]);
    for (i, &ti) in t.iter().enumerate() {
        let ab = s.alphas_cumprod()[ti];
        for j in i * per..(i + 1) * per {
            let (x, vv) = (xt[j] as f64, v[j] as f64);
            x0_back.push(ab.sqrt() * x - (1.0 - ab).sqrt() * vv);
            eps_back.push(ab.sqrt() * vv + (1.0 - ab).sqrt() * x);
        }
    }
    assert!(rel("x0 from (x_t, v)", x0_back, wide(x0)) <= 1e-6);
    assert!(rel("ε from (x_t, v)", eps_back, wide(noise)) <= 1e-6);
    // The training target of each prediction type.
    let mut c = SchedulerConfig::default();
    assert_eq!(s.target(x0, noise, &t).unwrap(), v);
    c.prediction_type = PredictionType::Epsilon;
    let e = Scheduler::new(c, 0).unwrap();
    assert_eq!(e.target(x0, noise, &t).unwrap(), noise);
}

#[test]
fn timesteps_match_diffusers() {
    let fx = fixture();
    let mut s = Scheduler::new(SchedulerConfig::default(), 0).unwrap();
    for n in [1, 7, 10, 30, 50, 1000] {
        s.set_timesteps(n).unwrap();
        assert_eq!(
            s.timesteps(),
            ints(&fx, &format!("timesteps/{n}")),
            "n = {n}"
        );
    }
}

#[test]
fn steps_match_diffusers() {
    let fx = fixture();
    let cases: [(&str, SamplerKind, PredictionType, f64, usize); 8] = [
        (
            "ddpm_v",
            SamplerKind::Ddpm,
            PredictionType::VPrediction,
            0.0,
            10,
        ),
        (
            "ddpm_eps",
            SamplerKind::Ddpm,
            PredictionType::Epsilon,
            0.0,
            10,
        ),
        (
            "ddpm_sample",
            SamplerKind::Ddpm,
            PredictionType::Sample,
            0.0,
            10,
        ),
        (
            "ddpm_full_v",
            SamplerKind::Ddpm,
            PredictionType::VPrediction,
            0.0,
            1000,
        ),
        (
            "ddim_v_eta0",
            SamplerKind::Ddim,
            PredictionType::VPrediction,
            0.0,
            10,
        ),
        (
            "ddim_eps_eta0",
            SamplerKind::Ddim,
            PredictionType::Epsilon,
            0.0,
            10,
        ),
        (
            "ddim_v_eta05",
            SamplerKind::Ddim,
            PredictionType::VPrediction,
            0.5,
            10,
        ),
        (
            "ddim_sample_eta05",
            SamplerKind::Ddim,
            PredictionType::Sample,
            0.5,
            10,
        ),
    ];
    let mut worst = 0f64;
    for (case, kind, pred, eta, n) in cases {
        let mut c = config(kind, "scaled_linear", pred);
        c.eta = eta;
        let mut s = Scheduler::new(c, 0).unwrap();
        s.set_timesteps(n).unwrap();
        let ts = ints(&fx, &format!("step/{case}/t"));
        let get = |k: &str| f32s(&fx, &format!("step/{case}/{k}"));
        let (mo, x, z) = (get("model_output"), get("sample"), get("noise"));
        let (prev, x0) = (get("prev_sample"), get("pred_original_sample"));
        let per = mo.len() / ts.len();
        for (k, &t) in ts.iter().enumerate() {
            let r = k * per..(k + 1) * per;
            let out = s
                .step(&mo[r.clone()], t, &x[r.clone()], Some(&z[r.clone()]))
                .unwrap();
            let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            let e0 = rel(
                &format!("{case} t={t} x0"),
                wide(&out.pred_original_sample),
                wide(&x0[r.clone()]),
            );
            let e1 = rel(
                &format!("{case} t={t} prev"),
                wide(&out.prev_sample),
                wide(&prev[r.clone()]),
            );
            worst = worst.max(e0).max(e1);
        }
    }
    eprintln!("worst step error {worst:.2e}");
    assert!(worst <= TOL, "worst step error {worst:.2e}");
}

#[test]
fn ddim_with_true_prediction_walks_the_forward_process() {
    // Invariant: fed the exact ε (any prediction type), DDIM with eta 0 maps add_noise(x0, ε, t)
    // to add_noise(x0, ε, t_prev) at every step, ending on x0.
    let x0: Vec<f32> = (0..24).map(|i| (i as f32 * 0.41).sin() * 0.8).collect();
    let eps: Vec<f32> = (0..24).map(|i| (i as f32 * 1.7 + 0.3).cos()).collect();
    for pred in [
        PredictionType::Epsilon,
        PredictionType::VPrediction,
        PredictionType::Sample,
    ] {
        let mut s = Scheduler::new(config(SamplerKind::Ddim, "cosine", pred), 0).unwrap();
        s.set_timesteps(20).unwrap();
        let ts = s.timesteps().to_vec();
        let mut x = s.add_noise(&x0, &eps, &[ts[0]]).unwrap();
        for &t in &ts {
            let model = match pred {
                PredictionType::Epsilon => eps.clone(),
                PredictionType::VPrediction => s.get_velocity(&x0, &eps, &[t]).unwrap(),
                PredictionType::Sample => x0.clone(),
            };
            x = s.step(&model, t, &x, None).unwrap().prev_sample;
        }
        let e = rel(
            &format!("{pred:?} DDIM chain end vs x0"),
            x.iter().map(|&v| v as f64),
            x0.iter().map(|&v| v as f64),
        );
        assert!(e <= 1e-4, "{pred:?}: {e:.2e}");
    }
}

#[test]
fn ddpm_noise_has_the_posterior_variance() {
    // Same inputs, noise z vs noise 0: the difference is √var·z with var = (1−ᾱ_prev)/(1−ᾱ_t)·β_t.
    let mut s = Scheduler::new(SchedulerConfig::default(), 0).unwrap();
    s.set_timesteps(1000).unwrap();
    let (mo, x) = (vec![0.3f32; 5], vec![-0.7f32; 5]);
    let z = [1.0f32, -2.0, 0.5, 0.0, 3.0];
    let a = s.step(&mo, 600, &x, Some(&z)).unwrap();
    let b = s.step(&mo, 600, &x, Some(&[0.0; 5])).unwrap();
    let ab = s.alphas_cumprod();
    let var = (1.0 - ab[599]) / (1.0 - ab[600]) * s.betas()[600];
    for i in 0..5 {
        let d = (a.prev_sample[i] - b.prev_sample[i]) as f64;
        assert!((d - var.sqrt() * z[i] as f64).abs() < 1e-6, "{i}: {d}");
    }
    // No noise at t = 0, and the RNG path is seeded.
    let c = s.step(&mo, 0, &x, None).unwrap();
    let d = s.step(&mo, 0, &x, Some(&z)).unwrap();
    assert_eq!(c, d);
}

#[test]
fn clipping_is_off_by_default_and_clamps_when_on() {
    let mut c = SchedulerConfig::default();
    let mut s = Scheduler::new(c, 0).unwrap();
    s.set_timesteps(10).unwrap();
    let big = vec![5.0f32; 3];
    let out = s.step(&big, 900, &big, None).unwrap();
    assert!(out.pred_original_sample.iter().any(|v| v.abs() > 1.0));
    c.clip_sample = true;
    let mut s = Scheduler::new(c, 0).unwrap();
    s.set_timesteps(10).unwrap();
    let out = s.step(&big, 900, &big, None).unwrap();
    assert!(out.pred_original_sample.iter().all(|v| v.abs() <= 1.0));
}

#[test]
fn guidance_and_bad_input() {
    let g = guide(&[0.5, -1.0], &[1.5, 1.0], 3.0).unwrap();
    assert_eq!(g, vec![0.5 + 3.0 * 1.0, -1.0 + 3.0 * 2.0]);
    assert_eq!(guide(&[0.5], &[1.5], 1.0).unwrap(), vec![1.5]);
    let e = guide(&[0.0, f32::NAN], &[0.0; 2], 2.0).unwrap_err();
    assert!(
        matches!(&e, Error::NonFinite(m) if m.contains("uncond[1]")),
        "{e}"
    );
    let mut s = Scheduler::new(SchedulerConfig::default(), 0).unwrap();
    let e = s.step(&[0.0], 5, &[0.0], None).unwrap_err();
    assert!(e.to_string().contains("set_timesteps"), "{e}");
    let e = s.set_timesteps(1001).unwrap_err();
    assert!(e.to_string().contains("1001"), "{e}");
    s.set_timesteps(50).unwrap();
    let e = s.step(&[0.0], 1000, &[0.0], None).unwrap_err();
    assert!(e.to_string().contains("1000"), "{e}");
    let e = s.step(&[0.0; 2], 20, &[0.0, f32::NAN], None).unwrap_err();
    assert!(
        matches!(&e, Error::NonFinite(m) if m.contains("sample[1]")),
        "{e}"
    );
    let e = s
        .step(&[0.0; 2], 20, &[0.0; 2], Some(&[f32::NAN, 0.0]))
        .unwrap_err();
    assert!(e.to_string().contains("noise[0]"), "{e}");
    let e = s
        .get_velocity(&[0.0; 4], &[0.0; 4], &[1, 2, 3])
        .unwrap_err();
    assert!(matches!(e, Error::Shape(_)), "{e}");
    assert!(BetaSchedule::parse("quadratic").is_err());
    assert_eq!(
        BetaSchedule::parse("squaredcos_cap_v2").unwrap(),
        BetaSchedule::Cosine
    );
}
