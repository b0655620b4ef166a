//! `phenocore bench-unet` (and the `diffusion` commands).

use crate::train_cli::vm_hwm_mib;
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
    /// "forward", "train" (forward + backward), "both", or "train-forward" (the training forward
    /// alone, on a tape that records gradients: for profiling).
    #[arg(long, default_value = "both")]
    pub mode: String,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
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
    let do_train = a.mode == "train" || a.mode == "both" || a.mode == "train-forward";
    let skip_backward = a.mode == "train-forward";
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
                let tf = t.elapsed().as_secs_f64();
                if skip_backward {
                    eprintln!("training forward {i}: {tf:.3} s");
                    continue;
                }
                model.params_mut().zero_grad();
                tape.backward(&loss, model.params_mut())?;
                let dt = t.elapsed().as_secs_f64();
                eprintln!(
                    "forward+backward {i}: {dt:.3} s (forward {tf:.3} s, backward {:.3} s; loss {l:.5})",
                    dt - tf
                );
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

// ---------------------------------------------------------------------------------------------
// `phenocore diffusion train` / `phenocore diffusion sample`
// ---------------------------------------------------------------------------------------------

use clap::Subcommand;
use phenocore::diffusion::scheduler::{BetaSchedule, PredictionType, SamplerKind, SchedulerConfig};
use phenocore::diffusion::train::{sample, DiffusionTrainOptions, DiffusionTrainer, SampleOptions};
use phenocore::diffusion::unet::NULL;
use phenocore::diffusion::vae::{AutoencoderKL, AutoencoderKLConfig, Nchw};
use phenocore::io::npz::{decode_npy, encode_npy, NpyArray};
use phenocore::io::table::{read_csv, write_csv};
use phenocore::io::write_atomic;
use phenocore::Error;
use rand::seq::SliceRandom;
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum DiffusionCommand {
    /// Train the confounder-aware U-Net on VAE latents (`.npy`, N × C × H × W float32) with
    /// per-sample conditions from a CSV (columns `compound` = row of `--compounds`, one column per
    /// confounder of the U-Net config, `class_label`; -1 or empty = null). Writes
    /// checkpoint.safetensors every epoch (atomic; `--resume` continues), unet.safetensors,
    /// unet_ema.safetensors, unet_config.json and history.csv in `--out`.
    Train(DiffusionTrainArgs),
    /// Sample latents for one compound under given confounder values (DDPM / DDIM, classifier-free
    /// guidance): latents.npy in `--out`; with `--vae`, the decoded images as 16-bit TIFF per
    /// channel ([-1, 1] mapped linearly to 0..65535) and images.npy.
    Sample(DiffusionSampleArgs),
}

#[derive(Args)]
pub struct SchedulerArgs {
    /// Noise schedule: scaled_linear_beta, linear_beta or cosine.
    #[arg(long, default_value = "scaled_linear_beta")]
    pub schedule: String,
    #[arg(long, default_value_t = 0.0015)]
    pub beta_start: f64,
    #[arg(long, default_value_t = 0.0205)]
    pub beta_end: f64,
    #[arg(long, default_value_t = 1000)]
    pub num_train_timesteps: usize,
    /// v_prediction, epsilon or sample.
    #[arg(long, default_value = "v_prediction")]
    pub prediction_type: String,
}

impl SchedulerArgs {
    fn config(&self, kind: SamplerKind, eta: f64) -> Result<SchedulerConfig> {
        Ok(SchedulerConfig {
            kind,
            num_train_timesteps: self.num_train_timesteps,
            schedule: BetaSchedule::parse(&self.schedule)?,
            beta_start: self.beta_start,
            beta_end: self.beta_end,
            prediction_type: PredictionType::parse(&self.prediction_type)?,
            eta,
            ..SchedulerConfig::default()
        })
    }
}

#[derive(Args)]
pub struct DiffusionTrainArgs {
    /// U-Net config (JSON with MONAI DiffusionModelUNet argument names + "confounders",
    /// "null_embeddings"). Optional with --resume (the run's unet_config.json is used).
    #[arg(long)]
    pub unet_config: Option<PathBuf>,
    /// Latents, N × C × H × W float32 `.npy`.
    #[arg(long)]
    pub latents: PathBuf,
    /// Per-latent conditions (CSV with N rows).
    #[arg(long)]
    pub conditions: Option<PathBuf>,
    /// Compound embeddings, M × D or M × L × D float32 `.npy` (the cross-attention context).
    #[arg(long)]
    pub compounds: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f64,
    /// Gradient clipping by global norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub clip_grad_norm: f64,
    /// EMA decay (0 = no EMA weights).
    #[arg(long, default_value_t = 0.9999)]
    pub ema_decay: f64,
    /// Probability of dropping a sample's conditions to null (classifier-free guidance training).
    #[arg(long, default_value_t = 0.1)]
    pub cond_dropout: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Start from these U-Net weights instead of a fresh initialisation.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Continue from `--out`/checkpoint.safetensors.
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    #[command(flatten)]
    pub device: crate::train_cli::DeviceArgs,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args)]
pub struct DiffusionSampleArgs {
    /// U-Net weights (safetensors, MONAI names).
    #[arg(long)]
    pub unet: PathBuf,
    #[arg(long)]
    pub unet_config: PathBuf,
    /// Compound embeddings (M × D or M × L × D float32 `.npy`).
    #[arg(long)]
    pub compounds: Option<PathBuf>,
    /// Row of `--compounds` to condition on (omitted: the null context).
    #[arg(long)]
    pub compound: Option<usize>,
    /// Confounder value, `name=index` or `name=null`; one per confounder of the U-Net.
    #[arg(long = "confounder")]
    pub confounders: Vec<String>,
    /// MONAI class label (models with num_class_embeds).
    #[arg(long)]
    pub class_label: Option<usize>,
    /// Number of samples.
    #[arg(long, default_value_t = 4)]
    pub n: usize,
    /// Latent side (the LDM paper: 48).
    #[arg(long, default_value_t = 48)]
    pub size: usize,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// ddim or ddpm.
    #[arg(long, default_value = "ddim")]
    pub sampler: String,
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Classifier-free guidance scale (1 = none).
    #[arg(long, default_value_t = 1.0)]
    pub guidance: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub scheduler: SchedulerArgs,
    /// AutoencoderKL weights (diffusers names) to decode the latents to images.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// diffusers config.json of the VAE (default: the SDXL config).
    #[arg(long)]
    pub vae_config: Option<PathBuf>,
    /// Channel groups of the 5-channel scheme, e.g. "0,1,2;2,3,4" (the LDM paper's).
    #[arg(long, default_value = "0,1,2;2,3,4")]
    pub groups: String,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long)]
    pub quiet: bool,
}

pub fn cmd_diffusion(c: DiffusionCommand) -> Result<()> {
    match c {
        DiffusionCommand::Train(a) => cmd_diffusion_train(a),
        DiffusionCommand::Sample(a) => cmd_diffusion_sample(a),
    }
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))
}

fn read_npy_f32(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
    match decode_npy(&bytes, &path.display().to_string())? {
        NpyArray::F32 { shape, data } => Ok((shape, data)),
        NpyArray::F64 { shape, data } => Ok((shape, data.iter().map(|&v| v as f32).collect())),
        other => Err(Error::DType(format!(
            "{}: expected a float32 array, got {:?} of shape {:?}",
            path.display(),
            match other {
                NpyArray::I64 { .. } => "integers".to_string(),
                NpyArray::Str { .. } => "strings".to_string(),
                NpyArray::Other { ref descr, .. } => descr.clone(),
                _ => String::new(),
            },
            other.shape()
        ))),
    }
}

/// Compound embeddings as (M, L, D).
fn read_compounds(path: &Path) -> Result<(usize, usize, usize, Vec<f32>)> {
    let (shape, data) = read_npy_f32(path)?;
    let (m, l, d) = match shape.as_slice() {
        &[m, d] => (m, 1, d),
        &[m, l, d] => (m, l, d),
        s => {
            return Err(Error::Shape(format!(
                "{}: compound embeddings must be M × D or M × L × D, got {s:?}",
                path.display()
            )))
        }
    };
    if let Some(i) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "{}: compound {} has a non-finite value",
            path.display(),
            i / (l * d).max(1)
        )));
    }
    Ok((m, l, d, data))
}

/// Parses an index cell: empty, "-1", "null", "nan" → None (null); else a non-negative integer.
fn parse_index(text: &str, what: &str) -> Result<Option<usize>> {
    let t = text.trim();
    if t.is_empty() || t == "-1" || t.eq_ignore_ascii_case("null") || t.eq_ignore_ascii_case("nan")
    {
        return Ok(None);
    }
    t.parse::<usize>().map(Some).map_err(|_| {
        Error::Format(format!(
            "{what}: {t:?} is not an index (a non-negative integer, or -1 / empty for null)"
        ))
    })
}

/// Per-sample conditions of a training set.
struct Conditions {
    /// Compound row per sample (None = null context).
    compound: Vec<Option<usize>>,
    /// [N, K] confounder indices (NULL for null).
    confounders: Vec<usize>,
    class_labels: Option<Vec<usize>>,
}

fn read_conditions(
    path: Option<&Path>,
    n: usize,
    cfg: &UNetConfig,
    num_compounds: Option<usize>,
) -> Result<Conditions> {
    let kc = cfg.confounders.len();
    let needs = cfg.with_conditioning || kc > 0 || cfg.num_class_embeds.is_some();
    let Some(path) = path else {
        if needs {
            return Err(Error::InvalidArgument(
                "the U-Net is conditioned (context / confounders / class labels): give --conditions"
                    .into(),
            ));
        }
        return Ok(Conditions {
            compound: vec![None; n],
            confounders: vec![],
            class_labels: None,
        });
    };
    let t = read_csv(path)?;
    if t.rows.len() != n {
        return Err(Error::Shape(format!(
            "{}: {} rows for {n} latents",
            path.display(),
            t.rows.len()
        )));
    }
    let mut compound = vec![None; n];
    if cfg.with_conditioning {
        let col = t.column("compound")?;
        let m = num_compounds.ok_or_else(|| {
            Error::InvalidArgument("the U-Net has cross-attention: give --compounds".into())
        })?;
        for (i, r) in t.rows.iter().enumerate() {
            let what = format!(
                "{} line {} column \"compound\"",
                path.display(),
                t.line_of(i)
            );
            compound[i] = parse_index(&r[col], &what)?;
            if let Some(v) = compound[i] {
                if v >= m {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: compound {v} is out of range ({m} embeddings)"
                    )));
                }
            }
        }
    }
    let mut confounders = vec![0usize; n * kc];
    for (k, cf) in cfg.confounders.iter().enumerate() {
        let col = t.column(&cf.name)?;
        for (i, r) in t.rows.iter().enumerate() {
            let what = format!(
                "{} line {} column {:?}",
                path.display(),
                t.line_of(i),
                cf.name
            );
            confounders[i * kc + k] = match parse_index(&r[col], &what)? {
                None => NULL,
                Some(v) if v >= cf.num_values => {
                    return Err(Error::InvalidArgument(format!(
                        "{what}: index {v} is out of range ({} values)",
                        cf.num_values
                    )))
                }
                Some(v) => v,
            };
        }
    }
    let class_labels = match cfg.num_class_embeds {
        None => None,
        Some(kmax) => {
            let col = t.column("class_label")?;
            let mut v = Vec::with_capacity(n);
            for (i, r) in t.rows.iter().enumerate() {
                let what = format!(
                    "{} line {} column \"class_label\"",
                    path.display(),
                    t.line_of(i)
                );
                match parse_index(&r[col], &what)? {
                    Some(x) if x < kmax => v.push(x),
                    other => {
                        return Err(Error::InvalidArgument(format!(
                            "{what}: class label {other:?} must be in 0..{kmax}"
                        )))
                    }
                }
            }
            Some(v)
        }
    };
    Ok(Conditions {
        compound,
        confounders,
        class_labels,
    })
}

fn cmd_diffusion_train(a: DiffusionTrainArgs) -> Result<()> {
    phenocore::threads::set_num_threads(a.threads)?;
    std::fs::create_dir_all(&a.out)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", a.out.display())))?;
    let cfg_path = a.out.join("unet_config.json");
    let cfg_text = match (&a.unet_config, a.resume) {
        (Some(p), _) => read_text(p)?,
        (None, true) => read_text(&cfg_path)?,
        (None, false) => {
            return Err(Error::InvalidArgument(
                "give --unet-config (or --resume)".into(),
            ))
        }
    };
    let cfg = UNetConfig::from_json(&cfg_text)?;
    let (lshape, latents) = read_npy_f32(&a.latents)?;
    let (n, c, h, w) = match lshape.as_slice() {
        &[n, c, h, w] => (n, c, h, w),
        s => {
            return Err(Error::Shape(format!(
                "{}: latents must be N × C × H × W, got {s:?}",
                a.latents.display()
            )))
        }
    };
    if c != cfg.in_channels {
        return Err(Error::Shape(format!(
            "{}: latents have {c} channels, the U-Net config expects in_channels = {}",
            a.latents.display(),
            cfg.in_channels
        )));
    }
    if let Some(i) = latents.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite(format!(
            "{}: latent {} has a non-finite value",
            a.latents.display(),
            i / (c * h * w)
        )));
    }
    let compounds = a.compounds.as_deref().map(read_compounds).transpose()?;
    if let (Some((_, _, d, _)), Some(cd)) = (&compounds, cfg.cross_attention_dim) {
        if *d != cd {
            return Err(Error::Shape(format!(
                "compound embeddings have {d} dimensions, the U-Net's cross_attention_dim is {cd}"
            )));
        }
    }
    let conds = read_conditions(
        a.conditions.as_deref(),
        n,
        &cfg,
        compounds.as_ref().map(|c| c.0),
    )?;
    if a.batch == 0 || a.batch > n {
        return Err(Error::InvalidArgument(format!(
            "--batch {} must be in 1..={n} (the number of latents)",
            a.batch
        )));
    }
    let opts = DiffusionTrainOptions {
        lr: a.lr,
        weight_decay: a.weight_decay,
        clip_grad_norm: (a.clip_grad_norm > 0.0).then_some(a.clip_grad_norm),
        ema_decay: (a.ema_decay > 0.0).then_some(a.ema_decay),
        cond_dropout: a.cond_dropout,
        scheduler: a.scheduler.config(SamplerKind::Ddpm, 0.0)?,
        seed: a.seed,
        device: a.device.device,
        compute: a.device.compute,
        ..DiffusionTrainOptions::default()
    };
    let unet = match &a.init {
        Some(p) => DiffusionUNet::<f32>::load(p, cfg.clone())?,
        None => DiffusionUNet::<f32>::new(cfg.clone(), a.seed)?,
    };
    let mut trainer = DiffusionTrainer::new(unet, opts)?;
    let ckpt = a.out.join("checkpoint.safetensors");
    let per_epoch = n / a.batch; // the remainder of each shuffled epoch is dropped
    let mut done_epochs = 0usize;
    if a.resume {
        trainer.load_checkpoint(&ckpt)?;
        let s = trainer.steps() as usize;
        if s % per_epoch != 0 {
            return Err(Error::InvalidArgument(format!(
                "{}: {s} steps is not a whole number of epochs of {per_epoch} batches — \
                 resume with the same --batch and latents",
                ckpt.display()
            )));
        }
        done_epochs = s / per_epoch;
    } else {
        write_atomic(&cfg_path, cfg_text.as_bytes())?;
    }
    let hist_path = a.out.join("history.csv");
    let mut history: Vec<Vec<String>> = if a.resume {
        read_csv(&hist_path).map(|t| t.rows).unwrap_or_default()
    } else {
        Vec::new()
    };
    let kc = cfg.confounders.len();
    let per = c * h * w;
    let pb = (!a.quiet).then(|| {
        crate::bar(
            ((a.epochs.saturating_sub(done_epochs)) * per_epoch) as u64,
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps {msg}",
        )
    });
    phenocore::threads::install(|| -> Result<()> {
        for epoch in done_epochs..a.epochs {
            let mut order: Vec<usize> = (0..n).collect();
            let mut rng =
                rand_chacha::ChaCha8Rng::seed_from_u64(a.seed ^ (0x9e37_79b9 * (epoch as u64 + 1)));
            order.shuffle(&mut rng);
            let mut total = 0f64;
            for b in 0..per_epoch {
                let idx = &order[b * a.batch..(b + 1) * a.batch];
                let mut x = Vec::with_capacity(idx.len() * per);
                for &i in idx {
                    x.extend_from_slice(&latents[i * per..(i + 1) * per]);
                }
                let (ctx, ctx_len, null): (Option<Vec<f32>>, usize, Vec<bool>) = match &compounds {
                    Some((_, l, d, emb)) if cfg.with_conditioning => {
                        let mut v = Vec::with_capacity(idx.len() * l * d);
                        let mut null = Vec::with_capacity(idx.len());
                        for &i in idx {
                            match conds.compound[i] {
                                Some(r) => {
                                    v.extend_from_slice(&emb[r * l * d..(r + 1) * l * d]);
                                    null.push(false);
                                }
                                None => {
                                    v.extend(std::iter::repeat(0f32).take(l * d));
                                    null.push(true);
                                }
                            }
                        }
                        (Some(v), *l, null)
                    }
                    _ => (None, 0, vec![]),
                };
                let conf: Vec<usize> = idx
                    .iter()
                    .flat_map(|&i| conds.confounders[i * kc..(i + 1) * kc].iter().copied())
                    .collect();
                let labels: Option<Vec<usize>> = conds
                    .class_labels
                    .as_ref()
                    .map(|l| idx.iter().map(|&i| l[i]).collect());
                let cond = Conditioning {
                    context: ctx.as_deref(),
                    context_len: ctx_len,
                    context_null: (null.iter().any(|&f| f)).then_some(null.as_slice()),
                    class_labels: labels.as_deref(),
                    confounders: (kc > 0).then_some(conf.as_slice()),
                };
                let loss = trainer.step(&x, idx.len(), h, w, &cond)?;
                total += loss as f64;
                if let Some(pb) = &pb {
                    pb.set_message(format!("epoch {} loss {loss:.5}", epoch + 1));
                    pb.inc(1);
                }
            }
            let mean = total / per_epoch as f64;
            history.push(vec![
                (epoch + 1).to_string(),
                trainer.steps().to_string(),
                format!("{mean:.6}"),
            ]);
            write_csv(&hist_path, &["epoch", "step", "mean_loss"], &history)?;
            trainer.save_checkpoint(&ckpt)?;
            if a.quiet {
                eprintln!("epoch {}: mean loss {mean:.6}", epoch + 1);
            }
        }
        Ok(())
    })?;
    if let Some(pb) = pb {
        pb.finish();
    }
    trainer.save_weights(&a.out.join("unet.safetensors"), false)?;
    if trainer.options().ema_decay.is_some() {
        trainer.save_weights(&a.out.join("unet_ema.safetensors"), true)?;
    }
    println!(
        "trained {} epochs ({} steps) on {n} latents; weights in {}",
        a.epochs,
        trainer.steps(),
        a.out.display()
    );
    Ok(())
}

fn parse_groups(s: &str) -> Result<Vec<Vec<usize>>> {
    s.split(';')
        .map(|g| {
            g.split(',')
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::InvalidArgument(format!(
                            "--groups {s:?}: {v:?} is not a channel index (e.g. \"0,1,2;2,3,4\")"
                        ))
                    })
                })
                .collect()
        })
        .collect()
}

fn cmd_diffusion_sample(a: DiffusionSampleArgs) -> Result<()> {
    phenocore::threads::set_num_threads(a.threads)?;
    let cfg = UNetConfig::from_json(&read_text(&a.unet_config)?)?;
    let model = DiffusionUNet::<f32>::load(&a.unet, cfg.clone())?;
    let n = a.n;
    if n == 0 {
        return Err(Error::InvalidArgument("--n must be positive".into()));
    }
    // Context: the chosen compound for every sample, or the null context.
    let (ctx, ctx_len, null) = match (cfg.cross_attention_dim, a.compound) {
        (None, Some(_)) => {
            return Err(Error::InvalidArgument(
                "--compound given but the U-Net has no cross-attention".into(),
            ))
        }
        (None, None) => (None, 0, None),
        (Some(d), Some(i)) => {
            let path = a.compounds.as_deref().ok_or_else(|| {
                Error::InvalidArgument("--compound needs --compounds (the embeddings file)".into())
            })?;
            let (m, l, dd, emb) = read_compounds(path)?;
            if dd != d {
                return Err(Error::Shape(format!(
                    "{}: embeddings have {dd} dimensions, the U-Net's cross_attention_dim is {d}",
                    path.display()
                )));
            }
            if i >= m {
                return Err(Error::InvalidArgument(format!(
                    "--compound {i} is out of range ({m} embeddings in {})",
                    path.display()
                )));
            }
            let one = &emb[i * l * d..(i + 1) * l * d];
            (Some(one.repeat(n)), l, None)
        }
        (Some(d), None) => (Some(vec![0f32; n * d]), 1, Some(vec![true; n])),
    };
    // Confounders by name.
    let kc = cfg.confounders.len();
    let mut values: Vec<Option<usize>> = vec![None; kc];
    let mut given = vec![false; kc];
    for spec in &a.confounders {
        let (name, val) = spec.split_once('=').ok_or_else(|| {
            Error::InvalidArgument(format!(
                "--confounder {spec:?}: expected name=index or name=null"
            ))
        })?;
        let k = cfg
            .confounders
            .iter()
            .position(|c| c.name == name.trim())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "--confounder {spec:?}: the U-Net has no confounder {:?} (it has: {})",
                    name.trim(),
                    cfg.confounders
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
        values[k] = parse_index(val, &format!("--confounder {spec:?}"))?;
        given[k] = true;
    }
    if let Some(k) = given.iter().position(|g| !g) {
        return Err(Error::InvalidArgument(format!(
            "give --confounder {}=INDEX (or ={}=null)",
            cfg.confounders[k].name, cfg.confounders[k].name
        )));
    }
    let conf: Vec<usize> = (0..n)
        .flat_map(|_| values.iter().map(|v| v.unwrap_or(NULL)))
        .collect();
    let labels = a.class_label.map(|l| vec![l; n]);
    let cond = Conditioning {
        context: ctx.as_deref(),
        context_len: ctx_len,
        context_null: null.as_deref(),
        class_labels: labels.as_deref(),
        confounders: (kc > 0).then_some(conf.as_slice()),
    };
    let opts = SampleOptions {
        scheduler: a.scheduler.config(SamplerKind::parse(&a.sampler)?, a.eta)?,
        steps: a.steps,
        guidance_scale: a.guidance,
        seed: a.seed,
    };
    std::fs::create_dir_all(&a.out)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", a.out.display())))?;
    let pb = (!a.quiet).then(|| {
        crate::bar(
            a.steps as u64,
            "{elapsed_precise} [{bar:40}] {pos}/{len} steps",
        )
    });
    let mut progress = |done: usize, _total: usize| -> bool {
        if let Some(pb) = &pb {
            pb.set_position(done as u64);
        }
        true
    };
    let latents = phenocore::threads::install(|| {
        sample(&model, &opts, &cond, n, a.size, a.size, Some(&mut progress))
    })?;
    if let Some(pb) = pb {
        pb.finish();
    }
    let c = cfg.out_channels;
    let arr = NpyArray::F32 {
        shape: vec![n, c, a.size, a.size],
        data: latents.clone(),
    };
    write_atomic(&a.out.join("latents.npy"), &encode_npy(&arr)?)?;
    let mut written = vec!["latents.npy".to_string()];
    if let Some(vae_path) = &a.vae {
        let vcfg = match &a.vae_config {
            Some(p) => AutoencoderKLConfig::from_json(&read_text(p)?)?,
            None => AutoencoderKLConfig::sdxl(),
        };
        let vae = AutoencoderKL::<f32>::load(vcfg, vae_path)?;
        let groups = parse_groups(&a.groups)?;
        let imgs = phenocore::threads::install(|| {
            vae.decode5(
                &Nchw {
                    shape: [n, c, a.size, a.size],
                    data: latents,
                },
                &groups,
            )
        })?;
        let [_, ic, ih, iw] = imgs.shape;
        write_atomic(
            &a.out.join("images.npy"),
            &encode_npy(&NpyArray::F32 {
                shape: imgs.shape.to_vec(),
                data: imgs.data.clone(),
            })?,
        )?;
        written.push("images.npy".into());
        for s in 0..n {
            for ch in 0..ic {
                let plane = &imgs.data[(s * ic + ch) * ih * iw..][..ih * iw];
                let px: Vec<u16> = plane
                    .iter()
                    .map(|&v| (((v.clamp(-1.0, 1.0) + 1.0) * 0.5) * 65535.0).round() as u16)
                    .collect();
                let name = format!("sample_{s:04}_ch{ch}.tiff");
                phenocore::io::image::write_tiff_u16(&a.out.join(&name), iw, ih, &px)?;
            }
        }
        written.push(format!("{} 16-bit TIFFs (sample_NNNN_chC.tiff)", n * ic));
    }
    println!("wrote {} in {}", written.join(", "), a.out.display());
    Ok(())
}
