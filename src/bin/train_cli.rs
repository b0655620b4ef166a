//! `phenocore train` and `phenocore bench-train`.

use clap::Args;
use phenocore::models::efficientnet::{EfficientNetConfig, Padding, TrainableEfficientNet};
use phenocore::train::{Trainer, TrainerOptions};
use phenocore::Result;
use rand::{Rng, SeedableRng};
use std::time::Instant;

#[derive(Args)]
pub struct BenchTrainArgs {
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 490)]
    pub classes: usize,
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    #[arg(long, default_value_t = 5)]
    pub channels: usize,
    #[arg(long, default_value_t = 5)]
    pub steps: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
}

fn vm_hwm_mib() -> f64 {
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

/// SGD training steps of EfficientNet-B0 on random crops (the side of benches/train_step.py);
/// prints one JSON line: crops/s, per-step seconds, peak RSS.
pub fn cmd_bench_train(a: BenchTrainArgs) -> Result<()> {
    phenocore::threads::set_num_threads(a.threads)?;
    let cfg = EfficientNetConfig {
        in_channels: a.channels,
        num_classes: a.classes,
        padding: Padding::Symmetric,
        bn_eps: 1e-5,
    };
    let model = TrainableEfficientNet::<f32>::new(cfg, 1)?;
    let opts = TrainerOptions {
        batch_size: a.batch,
        ..Default::default()
    };
    let mut trainer = Trainer::new(model, opts)?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
    let per = a.channels * a.size * a.size;
    let crops: Vec<f32> = (0..a.batch * per).map(|_| rng.gen::<f32>()).collect();
    let labels: Vec<u32> = (0..a.batch)
        .map(|_| rng.gen_range(0..a.classes as u32))
        .collect();
    let mut times = Vec::new();
    let mut losses = Vec::new();
    phenocore::threads::install(|| -> Result<()> {
        for i in 0..a.warmup + a.steps {
            let t = Instant::now();
            let l = trainer.step(&crops, a.batch, a.size, a.size, &labels)?;
            let dt = t.elapsed().as_secs_f64();
            if i >= a.warmup {
                times.push(dt);
                losses.push(l);
            }
            eprintln!("step {i}: {dt:.3} s, loss {l:.4}");
        }
        Ok(())
    })?;
    let total: f64 = times.iter().sum();
    let cps = (a.batch * times.len()) as f64 / total.max(1e-12);
    println!(
        "{{\"side\": \"phenocore\", \"crops_per_s\": {cps:.3}, \"step_s\": {times:?}, \"losses\": {losses:?}, \"peak_rss_mib\": {:.1}, \"threads\": {}}}",
        vm_hwm_mib(),
        phenocore::threads::num_threads()
    );
    Ok(())
}
