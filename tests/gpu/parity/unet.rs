//! The diffusion U-Net on the GPU (`diffusion::gpu::GpuUNet`) against the CPU forward
//! (`DiffusionUNet<f64>`, the same parameters): a conditioned model (spatial transformers with
//! cross-attention, class and confounder embeddings, null context for some samples) and an
//! unconditioned one (spatial attention blocks, resampling residual blocks, null confounder values).

use super::*;
use phenocore::backend::gpu::Gpu;
use phenocore::diffusion::gpu::GpuUNet;
use phenocore::diffusion::unet::{Conditioning, Confounder, DiffusionUNet, UNetConfig, NULL};
use rand::{Rng, SeedableRng};

fn conditioned() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 3,
        num_res_blocks: vec![1, 1],
        channels: vec![32, 64],
        attention_levels: vec![false, true],
        norm_num_groups: 8,
        norm_eps: 1e-6,
        resblock_updown: false,
        num_head_channels: vec![32, 32],
        with_conditioning: true,
        transformer_num_layers: 1,
        cross_attention_dim: Some(16),
        num_class_embeds: Some(3),
        confounders: vec![
            Confounder {
                name: "source".into(),
                num_values: 3,
            },
            Confounder {
                name: "well".into(),
                num_values: 5,
            },
        ],
        null_embeddings: true,
    }
}

fn unconditioned() -> UNetConfig {
    UNetConfig {
        in_channels: 4,
        out_channels: 4,
        num_res_blocks: vec![1, 1, 1],
        channels: vec![32, 32, 64],
        attention_levels: vec![false, true, true],
        norm_num_groups: 16,
        norm_eps: 1e-5,
        resblock_updown: true,
        num_head_channels: vec![32, 16, 32],
        with_conditioning: false,
        transformer_num_layers: 1,
        cross_attention_dim: None,
        num_class_embeds: None,
        confounders: vec![Confounder {
            name: "batch".into(),
            num_values: 4,
        }],
        null_embeddings: true,
    }
}

/// A model whose every parameter is perturbed (MONAI zero-initialises conv2, proj_out and the
/// output conv; norms start at 1 / 0): nothing is the identity or zero, so the test can fail.
/// Returns the f32 model and the same parameters in f64.
fn models(cfg: UNetConfig, seed: u64) -> (DiffusionUNet<f32>, DiffusionUNet<f64>) {
    let mut m = DiffusionUNet::<f32>::new(cfg.clone(), seed).unwrap();
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed + 100);
    let p = m.params_mut();
    for i in 0..p.len() {
        let shape = p.shape(i).to_vec();
        let s = if shape.len() >= 2 {
            0.5 / (shape[1..].iter().product::<usize>() as f32).sqrt()
        } else {
            0.2
        };
        for v in p.value_mut(i).iter_mut() {
            *v += r.gen_range(-s..s);
        }
    }
    let m64 = DiffusionUNet::<f64>::from_state_dict(&m.state_dict().unwrap(), cfg).unwrap();
    (m, m64)
}

struct Case {
    what: &'static str,
    cfg: UNetConfig,
    timesteps: Vec<f64>,
    context_len: usize,
    with_context: bool,
    context_null: Option<Vec<bool>>,
    class_labels: Option<Vec<usize>>,
    confounders: Option<Vec<usize>>,
}

fn run_case<G: Gpu>(g: &G, c: &Case, seed: u64) {
    let (m32, m64) = models(c.cfg.clone(), seed);
    let gm = GpuUNet::new(g, &m32).unwrap();
    let (n, h, w) = (2, 8, 8);
    let cin = c.cfg.in_channels;
    let x = uniform(n * cin * h * w, seed + 1);
    let ctx32: Option<Vec<f32>> = match (c.with_context, c.cfg.cross_attention_dim) {
        (true, Some(d)) => Some(uniform(n * c.context_len * d, seed + 2)),
        _ => None,
    };
    let ctx64: Option<Vec<f64>> = ctx32.as_deref().map(f64s);
    let cond32 = Conditioning {
        context: ctx32.as_deref(),
        context_len: c.context_len,
        context_null: c.context_null.as_deref(),
        class_labels: c.class_labels.as_deref(),
        confounders: c.confounders.as_deref(),
    };
    let cond64 = Conditioning {
        context: ctx64.as_deref(),
        context_len: c.context_len,
        context_null: c.context_null.as_deref(),
        class_labels: c.class_labels.as_deref(),
        confounders: c.confounders.as_deref(),
    };
    let want = m64
        .predict(&f64s(&x), n, h, w, &c.timesteps, &cond64)
        .unwrap();
    let got = gm.predict(g, &x, n, h, w, &c.timesteps, &cond32).unwrap();
    let rel = assert_close(c.what, &f64s(&got), &want, F32_TOL);
    eprintln!("{}: relative error {rel:.2e}", c.what);
    // The output depends on the conditions: the null context / null confounders change it.
    let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(scale > 1e-3, "{}: output scale {scale}", c.what);

    // Rejected inputs (errors, not panics): wrong channel count, a batch of the wrong size for
    // the timesteps, out-of-range confounder indices.
    let bad = uniform(n * (cin + 1) * h * w, 3);
    assert!(gm.predict(g, &bad, n, h, w, &c.timesteps, &cond32).is_err());
    assert!(gm
        .predict(g, &x, n, h, w, &c.timesteps[..1], &cond32)
        .is_err());
    if let Some(idx) = &c.confounders {
        let wrong: Vec<usize> = idx.iter().map(|_| 1000).collect();
        let cond = Conditioning {
            confounders: Some(&wrong),
            ..cond32
        };
        assert!(gm.predict(g, &x, n, h, w, &c.timesteps, &cond).is_err());
    }
}

/// Whole-model forward on the GPU against the CPU forward in f64 (normwise ≤ 1e-5).
pub fn unet_forward_matches_cpu<G: Gpu>(g: &G) {
    let cases = [
        Case {
            what:
                "U-Net conditioned (transformer, cross-attention, class, confounders, null context)",
            cfg: conditioned(),
            timesteps: vec![17.0, 503.0],
            context_len: 2,
            with_context: true,
            context_null: Some(vec![false, true]),
            class_labels: Some(vec![2, 0]),
            confounders: Some(vec![1, NULL, NULL, 4]),
        },
        Case {
            what: "U-Net unconditioned (spatial attention, resblock up/down, null confounder)",
            cfg: unconditioned(),
            timesteps: vec![999.0, 0.0],
            context_len: 0,
            with_context: false,
            context_null: None,
            class_labels: None,
            confounders: Some(vec![NULL, 3]),
        },
    ];
    for (i, c) in cases.iter().enumerate() {
        run_case(g, c, 40 + i as u64);
    }
}

/// The conditioned model with every sample's context null and no context given (the CPU then
/// uses a one-token null context), and the unconditioned model's config rejecting a context.
pub fn unet_null_context_only<G: Gpu>(g: &G) {
    let c = Case {
        what: "U-Net conditioned, all-null context, none given",
        cfg: conditioned(),
        timesteps: vec![250.0, 251.0],
        context_len: 0,
        with_context: false,
        context_null: Some(vec![true, true]),
        class_labels: Some(vec![1, 1]),
        confounders: Some(vec![0, 0, 2, 3]),
    };
    run_case(g, &c, 60);
    let (m32, _) = models(unconditioned(), 61);
    let gm = GpuUNet::new(g, &m32).unwrap();
    let x = uniform(2 * 4 * 8 * 8, 62);
    let ctx = uniform(2 * 16, 63);
    let cond = Conditioning {
        context: Some(&ctx),
        context_len: 1,
        confounders: Some(&[0, 1]),
        ..Default::default()
    };
    assert!(
        gm.predict(g, &x, 2, 8, 8, &[1.0, 2.0], &cond).is_err(),
        "a context for a model without conditioning"
    );
}

/// Forward and backward on the GPU against the CPU tape (f64): the input gradient and every
/// parameter's gradient for a random upstream gradient, normwise per tensor ≤ 1e-5.
pub fn unet_backward_matches_cpu<G: Gpu>(g: &G) {
    use phenocore::autograd::Tape;
    let cases = [
        (
            conditioned(),
            Some(vec![true, false]),
            Some(vec![0usize, 2]),
            vec![NULL, 1, 2, NULL],
            70u64,
        ),
        (unconditioned(), None, None, vec![2, NULL], 71u64),
    ];
    for (cfg, null, labels, conf, seed) in cases {
        let (m32, mut m64) = models(cfg.clone(), seed);
        let gm = GpuUNet::new(g, &m32).unwrap();
        let (n, h, w) = (2, 8, 8);
        let (cin, cout) = (cfg.in_channels, cfg.out_channels);
        let x = uniform(n * h * w * cin, seed + 1);
        let dy = uniform(n * h * w * cout, seed + 2);
        let ctx32: Option<Vec<f32>> = cfg
            .cross_attention_dim
            .map(|d| uniform(n * 2 * d, seed + 3));
        let ctx64: Option<Vec<f64>> = ctx32.as_deref().map(f64s);
        let ts = [123.0, 7.0];
        let cond32 = Conditioning {
            context: ctx32.as_deref(),
            context_len: 2,
            context_null: null.as_deref(),
            class_labels: labels.as_deref(),
            confounders: Some(&conf),
        };
        let cond64 = Conditioning {
            context: ctx64.as_deref(),
            context_len: 2,
            context_null: null.as_deref(),
            class_labels: labels.as_deref(),
            confounders: Some(&conf),
        };
        assert!(
            gm.forward_backward(g, &x, n, h, w, &ts, &cond32, &dy[1..])
                .is_err(),
            "an upstream gradient of the wrong length"
        );
        let (y, grads) = gm
            .forward_backward(g, &x, n, h, w, &ts, &cond32, &dy)
            .unwrap();
        let mut tape = Tape::<f64>::new(true);
        let xv = tape.input(&[n, h, w, cin], f64s(&x), true).unwrap();
        let yv = m64.forward(&mut tape, &xv, &ts, &cond64).unwrap();
        let want_y = tape.data(&yv).to_vec();
        m64.params_mut().zero_grad();
        let cpu = tape
            .backward_with(&yv, f64s(&dy), m64.params_mut())
            .unwrap();
        let what = if cfg.with_conditioning {
            "conditioned"
        } else {
            "unconditioned"
        };
        assert_close(&format!("U-Net {what} output"), &f64s(&y), &want_y, F32_TOL);
        let rel = assert_close(
            &format!("U-Net {what} input gradient"),
            &f64s(&grads.input),
            cpu.get(&xv).unwrap(),
            F32_TOL,
        );
        eprintln!("U-Net {what}: input gradient relative error {rel:.2e}");
        let p = m64.params();
        let mut worst = (0f64, String::new());
        assert_eq!(grads.params.len(), p.len());
        for i in 0..p.len() {
            let name = p.name(i);
            let got = f64s(&grads.params[name]);
            let want = p.grad(i);
            let rel = if let Some(layer) = name.strip_suffix(".to_k.bias") {
                // Softmax is invariant to a key bias: its exact gradient is zero, both sides hold
                // rounding noise. Bounded by the layer's key-weight gradient scale instead.
                let wi = p.index(&format!("{layer}.to_k.weight")).unwrap();
                let scale = p.grad(wi).iter().fold(0f64, |m, v| m.max(v.abs()));
                let worst = got.iter().chain(want).fold(0f64, |m, v| m.max(v.abs()));
                assert!(
                    worst <= F32_TOL * scale,
                    "U-Net {what} d{name}: {worst:.3e} against a key-weight gradient scale {scale:.3e}"
                );
                worst / scale
            } else {
                assert_close(&format!("U-Net {what} d{name}"), &got, want, F32_TOL)
            };
            if rel >= worst.0 {
                worst = (rel, name.to_string());
            }
        }
        eprintln!(
            "U-Net {what}: {} parameter gradients, worst relative error {:.2e} ({})",
            p.len(),
            worst.0,
            worst.1
        );
        // The null context is used (and gets a gradient) only where a sample is null.
        if let Some(i) = (0..p.len()).find(|&i| p.name(i) == "null_context") {
            let nonzero = p.grad(i).iter().any(|v| *v != 0.0);
            assert_eq!(nonzero, null.is_some(), "null_context gradient");
        }
    }
}
