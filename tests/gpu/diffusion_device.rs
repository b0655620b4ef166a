//! `DiffusionTrainer` with its steps on a device against the CPU trainer: the same draws, so the
//! losses, weights and EMA weights must agree; checkpoints move between the two. Shared by the
//! emulation (`tests/gpu_emu.rs`) and a GPU (`tests/cuda_ops.rs`).

#![allow(dead_code)]

use phenocore::diffusion::train::{DiffusionTrainOptions, DiffusionTrainer};
use phenocore::diffusion::unet::{Conditioning, Confounder, DiffusionUNet, UNetConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const H: usize = 8;
pub const W: usize = 8;
const N: usize = 4;
const CTX: usize = 4;

pub fn config() -> UNetConfig {
    UNetConfig {
        in_channels: 2,
        out_channels: 2,
        num_res_blocks: vec![1, 1],
        channels: vec![8, 16],
        attention_levels: vec![false, true],
        norm_num_groups: 4,
        norm_eps: 1e-6,
        resblock_updown: false,
        num_head_channels: vec![8, 16],
        with_conditioning: true,
        transformer_num_layers: 1,
        cross_attention_dim: Some(CTX),
        num_class_embeds: None,
        confounders: vec![Confounder {
            name: "batch".into(),
            num_values: 3,
        }],
        null_embeddings: true,
    }
}

/// A model whose zero-initialised layers (MONAI's output conv, conv2, proj_out) are perturbed, so
/// every parameter gets a gradient from the first step.
pub fn model() -> DiffusionUNet<f32> {
    let mut m = DiffusionUNet::<f32>::new(config(), 3).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(4);
    let p = m.params_mut();
    for i in 0..p.len() {
        for v in p.value_mut(i).iter_mut() {
            *v += r.gen_range(-0.05f32..0.05);
        }
    }
    m
}

/// AdamW with clipping that bites, EMA and condition dropout. eps = 1e-3 (not 1e-8): AdamW's
/// first update is g / (|g| + eps), a sign for |g| ≫ eps, and for gradients near 0 two
/// implementations whose gradients differ by rounding can get opposite signs; with eps 1e-3 the
/// update is smooth in g, so the comparison measures the gradients, not sign flips.
pub fn options() -> DiffusionTrainOptions {
    DiffusionTrainOptions {
        lr: 1e-3,
        eps: 1e-3,
        clip_grad_norm: Some(0.05),
        ema_decay: Some(0.9),
        cond_dropout: 0.5,
        seed: 21,
        ..Default::default()
    }
}

pub struct Batch {
    latents: Vec<f32>,
    ctx: Vec<f32>,
    ks: Vec<usize>,
}

impl Batch {
    pub fn new(seed: u64) -> Batch {
        let mut r = ChaCha8Rng::seed_from_u64(seed);
        Batch {
            latents: (0..N * 2 * H * W)
                .map(|_| r.gen_range(-1.0f32..1.0))
                .collect(),
            ctx: (0..N * CTX).map(|_| r.gen_range(-1.0f32..1.0)).collect(),
            ks: (0..N).map(|i| i % 3).collect(),
        }
    }
    pub fn step(&self, t: &mut DiffusionTrainer) -> f32 {
        let cond = Conditioning {
            context: Some(&self.ctx),
            context_len: 1,
            confounders: Some(&self.ks),
            ..Default::default()
        };
        t.step(&self.latents, N, H, W, &cond).unwrap()
    }
}

fn weights(m: &DiffusionUNet<f32>) -> Vec<f32> {
    m.params()
        .iter()
        .flat_map(|(_, _, _, v)| v.to_vec())
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

/// 3 steps on `dev` and on the CPU: losses within 1e-5 relative, weights and EMA weights within
/// 1e-5 of how far training moved them.
pub fn matches_cpu(dev: &mut DiffusionTrainer, cpu: &mut DiffusionTrainer) {
    assert!(dev.on_device() && !cpu.on_device());
    let w0 = weights(cpu.model().unwrap());
    for s in 0..3 {
        let b = Batch::new(100 + s);
        let (ld, lc) = (b.step(dev), b.step(cpu));
        let rel = ((ld - lc) / lc).abs();
        eprintln!("step {s}: device loss {ld}, cpu loss {lc}, relative {rel:.2e}");
        assert!(
            rel <= 1e-5,
            "step {s}: loss {ld} on the device, {lc} on the CPU"
        );
        assert_eq!(dev.last_dropped(), cpu.last_dropped());
        assert_eq!(dev.last_timesteps(), cpu.last_timesteps());
    }
    let (wd, wc) = (weights(dev.model().unwrap()), weights(cpu.model().unwrap()));
    let moved = max_diff(&wc, &w0);
    let err = max_diff(&wd, &wc);
    eprintln!("weights: moved {moved:.3e}, device − cpu {err:.3e}");
    assert!(moved > 1e-3, "training did not move the weights ({moved})");
    assert!(err <= 1e-5 * moved.max(1.0), "weights differ by {err}");
    let ed = weights(dev.ema_model().unwrap().unwrap());
    let ec = weights(cpu.ema_model().unwrap().unwrap());
    let eerr = max_diff(&ed, &ec);
    eprintln!("EMA weights: device − cpu {eerr:.3e}");
    assert!(
        eerr <= 1e-5 * moved.max(1.0),
        "EMA weights differ by {eerr}"
    );
    assert!(max_diff(&ed, &wd) > 0.0, "the EMA is not the weights");
    assert_eq!(dev.steps(), 3);
}

/// A device trainer's checkpoint resumes on the device bit for bit, and on the CPU closely.
pub fn checkpoint_resumes(
    make_dev: &dyn Fn() -> DiffusionTrainer,
    make_cpu: &dyn Fn() -> DiffusionTrainer,
) {
    let dir = std::env::temp_dir().join(format!("phenocore_ddev_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ckpt.safetensors");
    let mut a = make_dev();
    for s in 0..2 {
        Batch::new(200 + s).step(&mut a);
    }
    a.save_checkpoint(&path).unwrap();
    let last = Batch::new(202);
    let la = last.step(&mut a);
    let wa = weights(a.model().unwrap());

    let mut b = make_dev();
    b.load_checkpoint(&path).unwrap();
    assert_eq!(b.steps(), 2);
    let lb = last.step(&mut b);
    assert_eq!(
        la.to_bits(),
        lb.to_bits(),
        "device resume: loss {la} vs {lb}"
    );
    assert_eq!(
        wa,
        weights(b.model().unwrap()),
        "device resume is not exact"
    );

    let mut c = make_cpu();
    c.load_checkpoint(&path).unwrap();
    let lc = last.step(&mut c);
    let rel = ((la - lc) / la).abs();
    let err = max_diff(&wa, &weights(c.model().unwrap()));
    eprintln!("CPU resume from the device checkpoint: loss relative {rel:.2e}, weights {err:.2e}");
    assert!(
        rel <= 1e-5 && err <= 1e-5,
        "CPU resume: loss {la} vs {lc}, weights {err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
