//! `phenocore train` and `phenocore bench-train`.

use crate::bar;
use clap::Args;
use phenocore::models::efficientnet::{EfficientNetConfig, Padding, TrainableEfficientNet};
use phenocore::train::config::{load_data, split_indices, TrainConfig};
use phenocore::train::{Compute, Event, Trainer, TrainerOptions};
use phenocore::{Error, Result};
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
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Where the training steps run.
#[derive(Args, Clone, Copy, Debug)]
pub struct DeviceArgs {
    /// Train on this CUDA device (a build with the `cuda` feature); default: the CPU.
    #[arg(long)]
    pub device: Option<usize>,
    /// Arithmetic of the device's steps: f32, tf32 (tensor-core GEMMs) or bf16 (mixed precision,
    /// f32 master weights). The CPU trains in f32.
    #[arg(long, default_value = "f32", value_parser = parse_compute)]
    pub compute: Compute,
}

fn parse_compute(s: &str) -> std::result::Result<Compute, String> {
    match s {
        "f32" => Ok(Compute::F32),
        "tf32" => Ok(Compute::Tf32),
        "bf16" => Ok(Compute::Bf16),
        _ => Err(format!("{s:?}: expected f32, tf32 or bf16")),
    }
}

impl DeviceArgs {
    fn apply(&self, o: &mut TrainerOptions) {
        o.device = self.device;
        o.compute = self.compute;
    }
}

/// Peak resident memory of this process (VmHWM), MiB.
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
    let mut opts = TrainerOptions {
        batch_size: a.batch,
        ..Default::default()
    };
    a.device.apply(&mut opts);
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
        "{{\"side\": \"phenocore\", \"device\": {}, \"compute\": \"{:?}\", \"crops_per_s\": {cps:.3}, \"step_s\": {times:?}, \"losses\": {losses:?}, \"peak_rss_mib\": {:.1}, \"threads\": {}}}",
        a.device.device.map_or("null".to_string(), |d| d.to_string()),
        a.device.compute,
        vm_hwm_mib(),
        phenocore::threads::num_threads()
    );
    Ok(())
}

#[derive(Args)]
pub struct TrainArgs {
    /// JSON training config (DeepProfiler-like sections; see `phenocore::train::config`).
    #[arg(long)]
    pub config: std::path::PathBuf,
    /// Continue from OUTPUT/checkpoint.safetensors when it exists.
    #[arg(long)]
    pub resume: bool,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// Everything a finished run reports.
pub struct TrainOutcome {
    pub trainer: Trainer,
    pub classes: Vec<String>,
    pub reports: Vec<phenocore::train::EpochReport>,
}

/// Loads the data the config names, trains (resuming when asked and possible) and writes into the
/// output folder: checkpoint.safetensors (every epoch), best.safetensors (best validation
/// accuracy), model.safetensors (final weights), classes.txt, history.csv, validation.csv.
pub fn run_training(cfg: &TrainConfig, resume: bool, quiet: bool) -> Result<TrainOutcome> {
    let out = &cfg.output;
    std::fs::create_dir_all(out)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", out.display())))?;
    let pb = bar(0, "{spinner} loading crops [{bar:30}] {pos}/{len} sites");
    if quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let data = load_data(cfg, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    });
    pb.finish_and_clear();
    let data = data?;
    let (train, val) = split_indices(cfg, &data)?;
    let ds = &data.dataset;
    let mcfg = EfficientNetConfig {
        in_channels: ds.c,
        num_classes: data.classes.len(),
        padding: cfg.padding,
        bn_eps: cfg.bn_eps,
    };
    let model = match &cfg.initialization {
        None => TrainableEfficientNet::<f32>::new(mcfg, cfg.options.seed)?,
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| Error::Io(format!("cannot read {}: {e}", p.display())))?;
            let state = phenocore::io::safetensors::read_f32_tensors(&bytes)?;
            TrainableEfficientNet::from_pretrained(&state, mcfg, cfg.options.seed)?
        }
    };
    let mut trainer = Trainer::new(model, cfg.options.clone())?;
    let ck = out.join("checkpoint.safetensors");
    if resume && ck.exists() {
        trainer.load_checkpoint(&ck)?;
        if !quiet {
            println!(
                "resumed from {} at epoch {} (step {})",
                ck.display(),
                trainer.epochs_done(),
                trainer.steps()
            );
        }
    }
    let names = data.classes.join("\n") + "\n";
    phenocore::io::write_atomic(&out.join("classes.txt"), names.as_bytes())?;
    if !quiet {
        println!(
            "training: {} crops ({} train, {} validation), {} classes, {}×{}×{} crops, {} epochs, batch {}, lr {}",
            ds.n,
            train.len(),
            val.len(),
            data.classes.len(),
            ds.c,
            ds.h,
            ds.w,
            cfg.options.epochs,
            cfg.options.batch_size,
            cfg.options.lr
        );
    }
    let pb = bar(
        0,
        "{spinner} epoch {msg} [{bar:30}] {pos}/{len} steps  eta {eta}",
    );
    if quiet {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let reports = phenocore::threads::install(|| {
        trainer.fit(
            ds,
            &train,
            &val,
            Some(&ck),
            Some(&out.join("best.safetensors")),
            &mut |e| {
                match e {
                    Event::Step {
                        epoch,
                        step,
                        steps_in_epoch,
                        loss,
                    } => {
                        pb.set_length(steps_in_epoch);
                        pb.set_position(step);
                        pb.set_message(format!("{} loss {loss:.3}", epoch + 1));
                    }
                    Event::Epoch(r) => {
                        let v = r.validation.as_ref();
                        let line = format!(
                            "epoch {:>3}  lr {:.2e}  train loss {:.4}  train acc {:.3}  val acc {}  val macro-F1 {}",
                            r.epoch + 1,
                            r.lr,
                            r.train_loss,
                            r.train_accuracy,
                            v.map_or("-".into(), |v| format!("{:.3}", v.accuracy)),
                            v.map_or("-".into(), |v| format!("{:.3}", v.macro_f1)),
                        );
                        if !quiet {
                            pb.println(line);
                        }
                    }
                }
                true
            },
        )
    });
    pb.finish_and_clear();
    let reports = reports?;
    trainer
        .inference_model()?
        .save(&out.join("model.safetensors"))?;
    let mut hist =
        String::from("epoch,lr,train_loss,train_accuracy,val_accuracy,val_macro_f1,val_top5\n");
    for r in &reports {
        let v = r.validation.as_ref();
        let top5 = v
            .and_then(|v| v.top_k.iter().find(|(k, _)| *k == 5).map(|(_, a)| *a))
            .unwrap_or(f64::NAN);
        hist += &format!(
            "{},{},{},{},{},{},{}\n",
            r.epoch + 1,
            r.lr,
            r.train_loss,
            r.train_accuracy,
            v.map_or(f64::NAN, |v| v.accuracy),
            v.map_or(f64::NAN, |v| v.macro_f1),
            top5
        );
    }
    phenocore::io::write_atomic(&out.join("history.csv"), hist.as_bytes())?;
    if let Some(v) = reports.last().and_then(|r| r.validation.as_ref()) {
        let mut s = String::from("class,precision,recall,f1,support\n");
        for (c, st) in data.classes.iter().zip(&v.per_class) {
            s += &format!(
                "{c},{},{},{},{}\n",
                st.precision, st.recall, st.f1, st.support
            );
        }
        phenocore::io::write_atomic(&out.join("validation.csv"), s.as_bytes())?;
    }
    Ok(TrainOutcome {
        trainer,
        classes: data.classes,
        reports,
    })
}

pub fn cmd_train(a: TrainArgs) -> Result<()> {
    phenocore::threads::set_num_threads(a.threads)?;
    let mut cfg = TrainConfig::from_file(&a.config)?;
    a.device.apply(&mut cfg.options);
    let o = run_training(&cfg, a.resume, false)?;
    if let Some(v) = o.reports.last().and_then(|r| r.validation.as_ref()) {
        println!(
            "validation: accuracy {:.4}, macro-F1 {:.4}{}",
            v.accuracy,
            v.macro_f1,
            v.top_k
                .iter()
                .find(|(k, _)| *k == 5)
                .map_or(String::new(), |(_, a)| format!(", top-5 {a:.4}"))
        );
    }
    println!(
        "weights: {} (final), {} (best); checkpoint {}",
        cfg.output.join("model.safetensors").display(),
        cfg.output.join("best.safetensors").display(),
        cfg.output.join("checkpoint.safetensors").display()
    );
    Ok(())
}
