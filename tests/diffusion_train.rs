//! Diffusion training and sampling (issue 5 items 5 and 7): a tiny U-Net learns a conditional
//! mixture (the confounder selects the mean of the latents) and samples from it with and without
//! guidance; checkpoint resume is bit-exact; EMA matches a hand-computed update; condition dropout
//! feeds the null conditions; bad input errors name the culprit.

use phenocore::diffusion::scheduler::{SamplerKind, SchedulerConfig};
use phenocore::diffusion::train::{
    ema_decay_at, sample, DiffusionTrainOptions, DiffusionTrainer, SampleOptions,
};
use phenocore::diffusion::unet::{Conditioning, Confounder, DiffusionUNet, UNetConfig, NULL};
use phenocore::error::Error;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;

const C: usize = 2;

fn tiny(num_values: usize, ctx_dim: Option<usize>, null_embeddings: bool) -> UNetConfig {
    UNetConfig {
        in_channels: C,
        out_channels: C,
        num_res_blocks: vec![1, 1],
        channels: vec![8, 16],
        attention_levels: vec![false, false],
        norm_num_groups: 4,
        norm_eps: 1e-6,
        resblock_updown: false,
        num_head_channels: vec![8, 16],
        with_conditioning: ctx_dim.is_some(),
        transformer_num_layers: 1,
        cross_attention_dim: ctx_dim,
        num_class_embeds: None,
        confounders: vec![Confounder {
            name: "k".into(),
            num_values,
        }],
        null_embeddings,
    }
}

/// Mixture component means (constant images; both channels).
const MU: [f32; 3] = [-1.2, 0.0, 1.2];
const SIGMA: f32 = 0.1;

/// `n` latents (NCHW) whose component is `ks[i]`: μ_k + σ·N(0, 1).
fn mixture(rng: &mut ChaCha8Rng, ks: &[usize], h: usize, w: usize) -> Vec<f32> {
    let per = C * h * w;
    let mut x = Vec::with_capacity(ks.len() * per);
    for &k in ks {
        for _ in 0..per {
            let z: f32 = rng.sample(StandardNormal);
            x.push(MU[k] + SIGMA * z);
        }
    }
    x
}

fn conf(ks: &[usize]) -> Conditioning<'_, f32> {
    Conditioning {
        confounders: Some(ks),
        ..Default::default()
    }
}

fn weights(m: &DiffusionUNet<f32>) -> Vec<Vec<f32>> {
    m.params().iter().map(|(_, _, _, v)| v.to_vec()).collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("phenocore_dtrain_{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn learns_conditional_mixture_and_samples_it() {
    let (h, w) = (4, 4);
    let unet = DiffusionUNet::<f32>::new(tiny(3, None, true), 1).unwrap();
    let opts = DiffusionTrainOptions {
        lr: 3e-3,
        weight_decay: 0.0,
        ema_decay: None,
        cond_dropout: 0.15,
        seed: 7,
        ..Default::default()
    };
    let mut tr = DiffusionTrainer::new(unet, opts).unwrap();
    let mut data_rng = ChaCha8Rng::seed_from_u64(3);
    let per_k = 8;
    let ks: Vec<usize> = (0..3 * per_k).map(|i| i % 3).collect();
    let steps = 400;
    let mut losses = Vec::new();
    for _ in 0..steps {
        let x = mixture(&mut data_rng, &ks, h, w);
        losses.push(tr.step(&x, ks.len(), h, w, &conf(&ks)).unwrap());
    }
    let first: f32 = losses[..40].iter().sum::<f32>() / 40.0;
    let last: f32 = losses[steps - 40..].iter().sum::<f32>() / 40.0;
    eprintln!("loss: first 40 steps {first:.4}, last 40 {last:.4}");
    assert!(
        last < 0.6 * first,
        "loss did not decrease enough: {first} → {last}"
    );

    let n = 16;
    let runs = [
        (SamplerKind::Ddim, 25, 1.0),
        (SamplerKind::Ddim, 25, 2.0),
        (SamplerKind::Ddpm, 50, 1.5),
    ];
    let mut batch_means = vec![[0f64; 3]; runs.len()];
    for (gi, &(kind, steps, g)) in runs.iter().enumerate() {
        for k in 0..3 {
            let kk = vec![k; n];
            let so = SampleOptions {
                scheduler: SchedulerConfig {
                    kind,
                    ..Default::default()
                },
                steps,
                guidance_scale: g,
                seed: 100 + k as u64,
            };
            let x = sample(tr.model().unwrap(), &so, &conf(&kk), n, h, w, None).unwrap();
            let per = C * h * w;
            let means: Vec<f64> = x
                .chunks(per)
                .map(|s| s.iter().map(|&v| v as f64).sum::<f64>() / per as f64)
                .collect();
            let closest = means
                .iter()
                .filter(|&&m| {
                    let d = |j: usize| (m - MU[j] as f64).abs();
                    (0..3).all(|j| j == k || d(k) < d(j))
                })
                .count();
            let bm = means.iter().sum::<f64>() / n as f64;
            batch_means[gi][k] = bm;
            eprintln!(
                "{kind:?} {steps} steps, guidance {g}, k = {k}: batch mean {bm:.3} (μ = {}), \
                 {closest}/{n} closest to μ_k",
                MU[k]
            );
            assert!(
                closest as f64 >= 0.9 * n as f64,
                "{kind:?}, guidance {g}, k = {k}: only {closest}/{n} samples closest to μ_k; \
                 means {means:?}"
            );
            assert!(
                (bm - MU[k] as f64).abs() < 0.3,
                "{kind:?}, guidance {g}, k = {k}: batch mean {bm} vs μ_k = {}",
                MU[k]
            );
        }
    }
    // Conditioning genuinely steers: the components' sample means are ordered and apart.
    for bm in &batch_means {
        assert!(bm[1] - bm[0] > 0.8 && bm[2] - bm[1] > 0.8, "{bm:?}");
    }
    // The null-conditioned model alone (guidance 0; learned through condition dropout) samples the
    // marginal: a mixture over the components, not one of them.
    let n0 = 30;
    let any_k = vec![0usize; n0]; // ignored at guidance 0
    let so = SampleOptions {
        steps: 25,
        guidance_scale: 0.0,
        seed: 5,
        ..Default::default()
    };
    let x = sample(tr.model().unwrap(), &so, &conf(&any_k), n0, h, w, None).unwrap();
    let mut counts = [0usize; 3];
    for s in x.chunks(C * h * w) {
        let m = s.iter().map(|&v| v as f64).sum::<f64>() / s.len() as f64;
        let k = (0..3)
            .min_by(|&a, &b| {
                (m - MU[a] as f64)
                    .abs()
                    .partial_cmp(&(m - MU[b] as f64).abs())
                    .unwrap()
            })
            .unwrap();
        counts[k] += 1;
    }
    eprintln!("null-conditioned samples per nearest component: {counts:?}");
    assert!(
        counts.iter().filter(|&&c| c >= 3).count() >= 2,
        "null-conditioned samples do not spread over the components: {counts:?}"
    );
}

fn small_trainer(opts: DiffusionTrainOptions, ctx: Option<usize>, seed: u64) -> DiffusionTrainer {
    let unet = DiffusionUNet::<f32>::new(tiny(3, ctx, true), seed).unwrap();
    DiffusionTrainer::new(unet, opts).unwrap()
}

#[test]
fn checkpoint_resume_is_bit_exact() {
    let (h, w) = (4, 4);
    let opts = DiffusionTrainOptions {
        lr: 1e-3,
        ema_decay: Some(0.9),
        cond_dropout: 0.3,
        seed: 11,
        ..Default::default()
    };
    let ks = [0usize, 1, 2, 1];
    let ctx: Vec<f32> = (0..ks.len() * 4).map(|i| (i as f32 * 0.37).sin()).collect();
    let cond = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        confounders: Some(&ks),
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let batches: Vec<Vec<f32>> = (0..3).map(|_| mixture(&mut rng, &ks, h, w)).collect();
    let mut a = small_trainer(opts, Some(4), 1);
    // A checkpoint before the first step resumes too.
    let p0 = tmp("resume0.safetensors");
    a.save_checkpoint(&p0).unwrap();
    let mut a0 = small_trainer(DiffusionTrainOptions { seed: 998, ..opts }, Some(4), 3);
    a0.load_checkpoint(&p0).unwrap();
    a.step(&batches[0], 4, h, w, &cond).unwrap();
    a0.step(&batches[0], 4, h, w, &cond).unwrap();
    assert_eq!(weights(a.model().unwrap()), weights(a0.model().unwrap()));
    assert_eq!(
        weights(a.ema_model().unwrap().unwrap()),
        weights(a0.ema_model().unwrap().unwrap())
    );
    std::fs::remove_file(&p0).ok();
    a.step(&batches[1], 4, h, w, &cond).unwrap();
    let path = tmp("resume.safetensors");
    a.save_checkpoint(&path).unwrap();
    let la = a.step(&batches[2], 4, h, w, &cond).unwrap();

    // A trainer with other initial weights and another seed, resumed from the checkpoint.
    let mut b = small_trainer(DiffusionTrainOptions { seed: 999, ..opts }, Some(4), 2);
    assert_ne!(weights(a.model().unwrap()), weights(b.model().unwrap()));
    b.load_checkpoint(&path).unwrap();
    assert_eq!(b.steps(), 2);
    let lb = b.step(&batches[2], 4, h, w, &cond).unwrap();
    assert_eq!(la.to_bits(), lb.to_bits(), "resumed loss {lb} vs {la}");
    assert_eq!(a.last_timesteps(), b.last_timesteps());
    assert_eq!(a.last_dropped(), b.last_dropped());
    assert_eq!(weights(a.model().unwrap()), weights(b.model().unwrap()));
    assert_eq!(
        weights(a.ema_model().unwrap().unwrap()),
        weights(b.ema_model().unwrap().unwrap())
    );
    assert_eq!(b.steps(), 3);

    // No temporary file left next to the checkpoint.
    let dir = path.parent().unwrap();
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().to_string();
        assert!(!name.contains(".tmp"), "leftover temporary file {name}");
    }
    // Weights-only files load as U-Nets (MONAI names); the EMA file holds the EMA weights.
    let wp = tmp("ema_weights.safetensors");
    a.save_weights(&wp, true).unwrap();
    let ema = DiffusionUNet::<f32>::load(&wp, tiny(3, Some(4), true)).unwrap();
    assert_eq!(weights(&ema), weights(a.ema_model().unwrap().unwrap()));

    // A checkpoint of another config: error naming the tensor; the trainer is unchanged.
    let unet = DiffusionUNet::<f32>::new(tiny(5, Some(4), true), 1).unwrap();
    let mut other = DiffusionTrainer::new(unet, opts).unwrap();
    let before = weights(other.model().unwrap());
    match other.load_checkpoint(&path) {
        Err(Error::Shape(m)) => assert!(m.contains("confounder_embedding.k.weight"), "{m}"),
        r => panic!("expected a shape error, got {:?}", r.err()),
    }
    assert_eq!(weights(other.model().unwrap()), before);
    assert_eq!(other.steps(), 0);
    // Not a checkpoint.
    assert!(matches!(b.load_checkpoint(&wp), Err(Error::Format(_))));
    std::fs::remove_file(&path).ok();
    std::fs::remove_file(&wp).ok();
}

#[test]
fn ema_matches_hand_computed_update() {
    let (h, w) = (4, 4);
    let ks = [0usize, 2];
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let b1 = mixture(&mut rng, &ks, h, w);
    let b2 = mixture(&mut rng, &ks, h, w);
    for decay in [0.9999, 0.1] {
        let opts = DiffusionTrainOptions {
            lr: 1e-2,
            ema_decay: Some(decay),
            cond_dropout: 0.0,
            seed: 1,
            ..Default::default()
        };
        let mut tr = small_trainer(opts, None, 3);
        let w0 = weights(tr.model().unwrap());
        assert_eq!(weights(tr.ema_model().unwrap().unwrap()), w0);
        tr.step(&b1, 2, h, w, &conf(&ks)).unwrap();
        let w1 = weights(tr.model().unwrap());
        tr.step(&b2, 2, h, w, &conf(&ks)).unwrap();
        let w2 = weights(tr.model().unwrap());
        assert_ne!(w1, w2);
        // diffusers EMAModel: decay 0 at the first update, min(decay, 2/11) at the second.
        assert_eq!(ema_decay_at(decay, 1), 0.0);
        let d2 = if decay == 0.1 { 0.1 } else { 2.0 / 11.0 };
        assert_eq!(ema_decay_at(decay, 2), d2);
        assert_eq!(ema_decay_at(0.9999, 100_000), 0.9999);
        let upd = |e: &[Vec<f32>], wt: &[Vec<f32>], d: f64| -> Vec<Vec<f32>> {
            let omd = (1.0 - d) as f32;
            e.iter()
                .zip(wt)
                .map(|(e, wt)| e.iter().zip(wt).map(|(&e, &x)| e - omd * (e - x)).collect())
                .collect()
        };
        let e1 = upd(&w0, &w1, 0.0);
        let e2 = upd(&e1, &w2, d2);
        let got = weights(tr.ema_model().unwrap().unwrap());
        assert_eq!(got, e2, "decay {decay}");
        // And in plain arithmetic: e2 = d2·w1 + (1 − d2)·w2 (to f32 rounding).
        let mut worst = 0f64;
        for ((g, a), b) in got.iter().zip(&w1).zip(&w2) {
            for ((&g, &a), &b) in g.iter().zip(a).zip(b) {
                let want = d2 * a as f64 + (1.0 - d2) * b as f64;
                worst = worst.max((g as f64 - want).abs() / (1.0 + want.abs()));
            }
        }
        assert!(worst < 1e-6, "decay {decay}: worst {worst}");
    }
}

#[test]
fn cond_dropout_feeds_null_conditions() {
    let (h, w) = (4, 4);
    let n = 4;
    let ks = [0usize, 1, 2, 0];
    let nulls = [NULL; 4];
    let ctx: Vec<f32> = (0..n * 4).map(|i| (i as f32 * 0.71).cos()).collect();
    let all_null = [true; 4];
    let real = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        confounders: Some(&ks),
        ..Default::default()
    };
    let null = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        context_null: Some(&all_null),
        confounders: Some(&nulls),
        ..Default::default()
    };
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let batches: Vec<Vec<f32>> = (0..3).map(|_| mixture(&mut rng, &ks, h, w)).collect();
    let mk = |p: f64| {
        small_trainer(
            DiffusionTrainOptions {
                lr: 1e-2,
                cond_dropout: p,
                ema_decay: None,
                seed: 4,
                ..Default::default()
            },
            Some(4),
            8,
        )
    };
    // p = 1 on real conditions ≡ p = 0 on explicitly null conditions, bit for bit.
    let (mut a, mut b, mut c) = (mk(1.0), mk(0.0), mk(0.0));
    for (i, x) in batches.iter().enumerate() {
        let la = a.step(x, n, h, w, &real).unwrap();
        let lb = b.step(x, n, h, w, &null).unwrap();
        let lc = c.step(x, n, h, w, &real).unwrap();
        assert_eq!(la.to_bits(), lb.to_bits());
        // (MONAI's zero-initialised output conv, residual-block second convs and transformer
        // proj_out make the first two steps' losses independent of the conditions.)
        if i == 2 {
            assert_ne!(la.to_bits(), lc.to_bits(), "conditions made no difference");
        }
        assert_eq!(a.last_dropped(), &[true; 4]);
        assert_eq!(c.last_dropped(), &[false; 4]);
    }
    assert_eq!(weights(a.model().unwrap()), weights(b.model().unwrap()));
    assert_ne!(weights(a.model().unwrap()), weights(c.model().unwrap()));
    // p = 0.5: about half of the samples are dropped.
    let mut half = mk(0.5);
    let mut dropped = 0;
    let mut total = 0;
    for _ in 0..6 {
        let x = mixture(&mut rng, &ks, h, w);
        half.step(&x, n, h, w, &real).unwrap();
        dropped += half.last_dropped().iter().filter(|&&d| d).count();
        total += n;
    }
    assert!(
        (6..=18).contains(&dropped),
        "{dropped}/{total} dropped at p = 0.5"
    );
    // Dropout needs null embeddings.
    let unet = DiffusionUNet::<f32>::new(tiny(3, Some(4), false), 1).unwrap();
    match DiffusionTrainer::new(unet, DiffusionTrainOptions::default()) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("null_embeddings"), "{m}"),
        r => panic!("expected an error, got ok = {}", r.is_ok()),
    }
}

#[test]
fn sampling_is_deterministic_and_cancellable() {
    let (h, w) = (4, 4);
    let ks = [1usize, 2];
    let ctx: Vec<f32> = (0..8).map(|i| i as f32 * 0.1).collect();
    let cond = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        confounders: Some(&ks),
        ..Default::default()
    };
    // A few steps so that the zero-initialised output conv and the null embeddings matter.
    let mut tr = small_trainer(
        DiffusionTrainOptions {
            lr: 2e-2,
            cond_dropout: 0.5,
            ema_decay: None,
            seed: 3,
            ..Default::default()
        },
        Some(4),
        5,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for _ in 0..4 {
        let x = mixture(&mut rng, &ks, h, w);
        tr.step(&x, 2, h, w, &cond).unwrap();
    }
    let unet = tr.model().unwrap();
    for kind in [SamplerKind::Ddpm, SamplerKind::Ddim] {
        let so = SampleOptions {
            scheduler: SchedulerConfig {
                kind,
                eta: if kind == SamplerKind::Ddim { 0.5 } else { 0.0 },
                ..Default::default()
            },
            steps: 5,
            guidance_scale: 3.0,
            seed: 42,
        };
        let mut calls = Vec::new();
        let mut cb = |d: usize, t: usize| {
            calls.push((d, t));
            true
        };
        let a = sample(unet, &so, &cond, 2, h, w, Some(&mut cb)).unwrap();
        assert_eq!(calls, (1..=5).map(|d| (d, 5)).collect::<Vec<_>>());
        let b = sample(unet, &so, &cond, 2, h, w, None).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.len(), 2 * C * h * w);
        assert!(a.iter().all(|v| v.is_finite()));
        let c = sample(
            unet,
            &SampleOptions { seed: 43, ..so },
            &cond,
            2,
            h,
            w,
            None,
        )
        .unwrap();
        assert_ne!(a, c);
        // Guidance changes the result; scale 0 is the null-conditioned model alone.
        let g1 = sample(
            unet,
            &SampleOptions {
                guidance_scale: 1.0,
                ..so
            },
            &cond,
            2,
            h,
            w,
            None,
        )
        .unwrap();
        assert_ne!(a, g1);
        let nulls = [NULL; 2];
        let flags = [true; 2];
        let null_cond = Conditioning {
            context: Some(&ctx),
            context_len: 1,
            context_null: Some(&flags),
            confounders: Some(&nulls),
            ..Default::default()
        };
        let g0 = sample(
            unet,
            &SampleOptions {
                guidance_scale: 0.0,
                ..so
            },
            &cond,
            2,
            h,
            w,
            None,
        )
        .unwrap();
        let un = sample(
            unet,
            &SampleOptions {
                guidance_scale: 1.0,
                ..so
            },
            &null_cond,
            2,
            h,
            w,
            None,
        )
        .unwrap();
        let worst = g0
            .iter()
            .zip(&un)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-4,
            "{kind:?}: guidance 0 vs null conditions: {worst}"
        );
        // Cancel after the second step.
        let mut stop = |d: usize, _t: usize| d < 2;
        assert_eq!(
            sample(unet, &so, &cond, 2, h, w, Some(&mut stop)).err(),
            Some(Error::Cancelled)
        );
    }
}

#[test]
fn bad_input_is_rejected_and_changes_nothing() {
    let (h, w) = (4, 4);
    let ks = [0usize, 1];
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let x = mixture(&mut rng, &ks, h, w);
    let mut tr = small_trainer(
        DiffusionTrainOptions {
            ema_decay: Some(0.99),
            ..Default::default()
        },
        None,
        1,
    );
    let w0 = weights(tr.model().unwrap());
    let e0 = weights(tr.ema_model().unwrap().unwrap());

    // NaN latents.
    let mut bad = x.clone();
    bad[C * h * w + 3] = f32::NAN;
    match tr.step(&bad, 2, h, w, &conf(&ks)) {
        Err(Error::NonFinite(m)) => assert!(m.contains("sample 1") && m.contains("step 1"), "{m}"),
        r => panic!("NaN latents: {r:?}"),
    }
    // Finite latents whose loss overflows f32: non-finite loss naming the step.
    let huge = vec![1e30f32; x.len()];
    match tr.step(&huge, 2, h, w, &conf(&ks)) {
        Err(Error::NonFinite(m)) => assert!(m.contains("step 1"), "{m}"),
        r => panic!("huge latents: {r:?}"),
    }
    // Wrong shapes: value count, spatial size not a multiple of 2 (2 levels).
    assert!(matches!(
        tr.step(&x[1..], 2, h, w, &conf(&ks)),
        Err(Error::Shape(_))
    ));
    let odd = vec![0.5f32; 2 * C * 5 * 5];
    match tr.step(&odd, 2, 5, 5, &conf(&ks)) {
        Err(Error::Shape(m)) => assert!(m.contains("multiples of 2"), "{m}"),
        r => panic!("5 × 5: {r:?}"),
    }
    // Confounder out of range / missing / wrong count.
    match tr.step(&x, 2, h, w, &conf(&[0, 3])) {
        Err(Error::InvalidArgument(m)) => {
            assert!(m.contains("\"k\"") && m.contains("out of range"), "{m}")
        }
        r => panic!("out of range: {r:?}"),
    }
    assert!(matches!(
        tr.step(&x, 2, h, w, &Conditioning::default()),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        tr.step(&x, 2, h, w, &conf(&[0])),
        Err(Error::Shape(_))
    ));
    // Nothing changed: the next good step is the first.
    assert_eq!(tr.steps(), 0);
    assert_eq!(weights(tr.model().unwrap()), w0);
    assert_eq!(weights(tr.ema_model().unwrap().unwrap()), e0);
    let fresh_loss = small_trainer(
        DiffusionTrainOptions {
            ema_decay: Some(0.99),
            ..Default::default()
        },
        None,
        1,
    )
    .step(&x, 2, h, w, &conf(&ks))
    .unwrap();
    assert_eq!(
        tr.step(&x, 2, h, w, &conf(&ks)).unwrap().to_bits(),
        fresh_loss.to_bits()
    );

    // Guidance without null embeddings.
    let plain = DiffusionUNet::<f32>::new(tiny(3, None, false), 1).unwrap();
    let so = SampleOptions {
        steps: 3,
        guidance_scale: 2.0,
        ..Default::default()
    };
    match sample(&plain, &so, &conf(&ks), 2, h, w, None) {
        Err(Error::InvalidArgument(m)) => {
            assert!(
                m.contains("guidance_scale") && m.contains("null_embeddings"),
                "{m}"
            )
        }
        r => panic!("guidance without null embeddings: {:?}", r.err()),
    }
    // Without guidance it samples.
    assert!(sample(
        &plain,
        &SampleOptions {
            guidance_scale: 1.0,
            ..so
        },
        &conf(&ks),
        2,
        h,
        w,
        None
    )
    .is_ok());
    // Sampling: out-of-range confounder, bad steps, non-finite guidance.
    assert!(matches!(
        sample(tr.model().unwrap(), &so, &conf(&[0, 7]), 2, h, w, None),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        sample(
            tr.model().unwrap(),
            &SampleOptions { steps: 0, ..so },
            &conf(&ks),
            2,
            h,
            w,
            None
        ),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        sample(
            tr.model().unwrap(),
            &SampleOptions {
                guidance_scale: f64::NAN,
                ..so
            },
            &conf(&ks),
            2,
            h,
            w,
            None
        ),
        Err(Error::InvalidArgument(_))
    ));
    // Bad options.
    for o in [
        DiffusionTrainOptions {
            cond_dropout: 1.5,
            ..Default::default()
        },
        DiffusionTrainOptions {
            lr: f64::NAN,
            ..Default::default()
        },
        DiffusionTrainOptions {
            clip_grad_norm: Some(0.0),
            ..Default::default()
        },
    ] {
        let unet = DiffusionUNet::<f32>::new(tiny(3, None, true), 1).unwrap();
        assert!(matches!(
            DiffusionTrainer::new(unet, o),
            Err(Error::InvalidArgument(_))
        ));
    }
}

#[test]
fn trainer_is_send() {
    // The C ABI / Python bindings hand trainers across threads.
    fn send<T: Send>() {}
    send::<DiffusionTrainer>();
}
