//! `phenocore bench-unet` (and the `diffusion` commands).

use clap::Args;
use phenocore::autograd::Tape;
use phenocore::diffusion::unet::{nchw_to_nhwc, Conditioning, DiffusionUNet, UNetConfig};
use phenocore::ops::shape::mse_loss;
use phenocore::Result;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use std::time::Instant;

#[derive(Args)]
pub struct BenchUnetArgs {
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Latent side (the paper: 48).
    #[arg(long, default_value_t = 48)]
    pub size: usize,
    /// Compound-embedding tokens per sample (cross-attention keys).
    #[arg(long, default_value_t = 1)]
    pub context_len: usize,
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// "forward", "train" (forward + backward) or "both".
    #[arg(long, default_value = "both")]
    pub mode: String,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

pub fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

/// The LDM paper's U-Net (256/512/768, attention at the two deepest levels, cross-attention 512) on
/// random 8 × S × S latents: forward (no-grad) and / or forward + backward of an MSE loss; prints
/// one JSON line with seconds per iteration and peak RSS (the side of benches/unet.py).
pub fn cmd_bench_unet(a: BenchUnetArgs) -> Result<()> {
    phenocore::threads::set_num_threads(a.threads)?;
    let mut cfg = UNetConfig::paper(1, 1, 1);
    cfg.confounders.clear();
    cfg.null_embeddings = false;
    let mut model = DiffusionUNet::<f32>::new(cfg, 1)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (n, s) = (a.batch, a.size);
    let mut randn = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect::<Vec<f32>>()
    };
    let x = randn(n * 8 * s * s);
    let ctx = randn(n * a.context_len * 512);
    let target = randn(n * 8 * s * s);
    let ts: Vec<f64> = (0..n).map(|i| (100 + 400 * i) as f64).collect();
    let cond = Conditioning {
        context: Some(&ctx),
        context_len: a.context_len,
        ..Default::default()
    };
    let (mut fwd, mut train) = (Vec::new(), Vec::new());
    let do_fwd = a.mode == "forward" || a.mode == "both";
    let do_train = a.mode == "train" || a.mode == "both";
    phenocore::threads::install(|| -> Result<()> {
        for i in 0..a.warmup + a.iters {
            if do_fwd {
                let t = Instant::now();
                let y = model.predict(&x, n, s, s, &ts, &cond)?;
                let dt = t.elapsed().as_secs_f64();
                std::hint::black_box(&y);
                eprintln!("forward {i}: {dt:.3} s");
                if i >= a.warmup {
                    fwd.push(dt);
                }
            }
            if do_train {
                let t = Instant::now();
                let mut tape = Tape::<f32>::new(true);
                let xv = tape.input(&[n, s, s, 8], nchw_to_nhwc(&x, n, 8, s, s), false)?;
                let y = model.forward(&mut tape, &xv, &ts, &cond)?;
                let loss = mse_loss(&mut tape, &y, &target)?;
                let l = tape.data(&loss)[0];
                model.params_mut().zero_grad();
                tape.backward(&loss, model.params_mut())?;
                let dt = t.elapsed().as_secs_f64();
                eprintln!("forward+backward {i}: {dt:.3} s (loss {l:.5})");
                if i >= a.warmup {
                    train.push(dt);
                }
            }
        }
        Ok(())
    })?;
    println!(
        "{{\"side\": \"phenocore\", \"forward_s\": {fwd:?}, \"train_s\": {train:?}, \"batch\": {n}, \"peak_rss_mib\": {:.1}, \"threads\": {}, \"parameters\": {}}}",
        vm_hwm_mib(),
        phenocore::threads::num_threads(),
        model.num_parameters()
    );
    Ok(())
}
