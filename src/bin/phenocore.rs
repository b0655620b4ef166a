//! `phenocore`: the command line over the library.
//! - `phenocore profile …`: single-cell CNN features of a DeepProfiler-style dataset (per-site npz).
//! - `phenocore aggregate …`: per-cell features → site / well / treatment profiles.
//! - `phenocore sphere …`: batch correction fitted on negative controls (ZCA, PCA, ZCA-cor, PCA-cor).
//! - `phenocore evaluate …`: mAP, folds of enrichment, replicate reproducibility; a sphering λ sweep.
//! - `phenocore demo …`: synthetic Cell Painting plates → a seeded model → profiles → aggregate →
//!   sphere → evaluate, end to end.

mod diffusion_cli;
mod train_cli;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use phenocore::io::plot::{Histogram, LineChart, Series};
use phenocore::io::profiles::{read_profiles, write_profiles, Profiles, ReadOptions, WriteOptions};
use phenocore::metrics::enrichment::{folds_of_enrichment, EnrichmentOptions, EnrichmentResult};
use phenocore::metrics::retrieval::{
    mean_average_precision, replicate_reproducibility, MapMethod, MapOptions, MapResult,
    ReplicateOptions, ReplicateResult,
};
use phenocore::metrics::similarity::CosineSimilarity;
use phenocore::metrics::Labels;
use phenocore::models::efficientnet::{EfficientNet, EfficientNetConfig, Padding};
use phenocore::profiling::aggregate::{
    aggregate_cells, aggregate_npz_dir, AggregateOptions, Cells,
};
use phenocore::profiling::crops::Normalization;
use phenocore::profiling::profile::{
    profile, ProfileEvent, ProfileOptions, ProfileSummary, DEFAULT_LAYER,
};
use phenocore::profiling::sphere::{
    lambda_sweep, ControlSelector, ProfileSphering, Regularization, SphereMethod, SphereOptions,
};
use phenocore::profiling::synthetic::{write_dataset, SyntheticConfig};
use phenocore::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "phenocore",
    version,
    about = "Cell Painting images to phenotypic profiles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Profile every site of a dataset: features/{plate}/{well}_{site}.npz (resumable).
    Profile(Box<ProfileArgs>),
    /// Aggregate per-cell features (a `profile` output folder or a per-cell table) to site, well
    /// and treatment profiles: sites.*, wells.*, treatments.* in the output folder.
    Aggregate(AggregateArgs),
    /// Fit sphering on negative controls and apply it (or apply a saved transform).
    Sphere(SphereArgs),
    /// Score profiles: mAP, folds of enrichment, replicate reproducibility; optionally per λ of a
    /// sphering sweep (the CP-CNN paper's Fig. 6B).
    Evaluate(EvaluateArgs),
    /// Make synthetic Cell Painting plates and a seeded model, then profile, aggregate, sphere and
    /// evaluate them end to end.
    Demo(DemoArgs),
    /// Train the Cell Painting CNN on labelled single-cell crops (weakly supervised: classes =
    /// treatments) from a JSON config; resumable.
    Train(train_cli::TrainArgs),
    /// Time SGD training steps of EfficientNet-B0 on random crops (JSON line; used by
    /// benches/train_step.py).
    BenchTrain(train_cli::BenchTrainArgs),
    /// Time the LDM paper's diffusion U-Net forward and forward + backward on random latents
    /// (JSON line; used by benches/unet.py).
    BenchUnet(diffusion_cli::BenchUnetArgs),
    /// The confounder-aware latent diffusion model: `train` on VAE latents with conditions,
    /// `sample` latents (and, with a VAE, 5-channel 16-bit TIFF images) for a compound under given
    /// confounders.
    #[command(subcommand)]
    Diffusion(diffusion_cli::DiffusionCommand),
}

#[derive(Args)]
struct AggregateArgs {
    /// A `phenocore profile` output folder (per-site .npz files) or a per-cell table (.csv, .tsv,
    /// .csv.gz, .parquet) with Metadata_* columns.
    #[arg(long)]
    input: PathBuf,
    /// Output folder: sites.EXT, wells.EXT and (with a treatment column) treatments.EXT.
    #[arg(long)]
    output: PathBuf,
    /// Output format: parquet, csv or tsv.
    #[arg(long, default_value = "parquet")]
    format: String,
    /// Operations: paper (site median, well mean, treatment mean), mean or median.
    #[arg(long, default_value = "paper")]
    preset: String,
    #[arg(long, default_value = "Metadata_Plate")]
    plate_column: String,
    #[arg(long, default_value = "Metadata_Well")]
    well_column: String,
    /// Site column; "" = every cell of a well is one site.
    #[arg(long, default_value = "Metadata_Site")]
    site_column: String,
    /// Treatment column; "" = stop at wells.
    #[arg(long, default_value = "Metadata_Treatment")]
    treatment_column: String,
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct SphereArgs {
    /// Profile table (.csv, .tsv, .csv.gz, .parquet).
    #[arg(long)]
    input: PathBuf,
    /// Output table (format from the extension).
    #[arg(long)]
    output: PathBuf,
    /// Negative controls: COLUMN=VALUE[,VALUE...] (e.g. Metadata_Control=1).
    #[arg(long)]
    controls: Option<String>,
    /// ZCA, PCA, ZCA-cor or PCA-cor.
    #[arg(long, default_value = "ZCA")]
    method: String,
    /// λ added to the covariance eigenvalues (REFERENCE §5; ε on singular values with
    /// --regularization pycytominer).
    #[arg(long, default_value_t = 1e-3)]
    lambda: f64,
    /// eigenvalue (the CP-CNN paper) or pycytominer.
    #[arg(long, default_value = "eigenvalue")]
    regularization: String,
    /// Fit one transform per plate of this column instead of pooling the controls.
    #[arg(long)]
    per_plate: Option<String>,
    /// Save the fitted transform (safetensors).
    #[arg(long)]
    save_transform: Option<PathBuf>,
    /// Apply a saved transform instead of fitting.
    #[arg(long, conflicts_with_all = ["controls", "save_transform", "per_plate"])]
    transform: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct EvaluateArgs {
    /// Profile table (.csv, .tsv, .csv.gz, .parquet).
    #[arg(long)]
    input: PathBuf,
    /// Annotation column; cells hold `|`-separated labels (MoA, pathway, treatment for replicate
    /// retrieval). Rows with an empty cell are never queries but stay in the library.
    #[arg(long)]
    labels: String,
    /// Rows matching COLUMN=VALUE[,VALUE...] get no label (e.g. negative controls): library only.
    #[arg(long)]
    unlabel: Option<String>,
    /// mAP: interpolated (the CP-CNN paper), deepprofiler (DeepProfilerExperiments exactly) or
    /// copairs (with permutation p-values when --null-size > 0).
    #[arg(long, default_value = "interpolated")]
    method: String,
    #[arg(long, default_value_t = 0)]
    null_size: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Percentile of each query's similarities for folds of enrichment.
    #[arg(long, default_value_t = 99.0)]
    percentile: f64,
    /// Replicate groups for replicate reproducibility (a metadata column).
    #[arg(long)]
    replicates: Option<String>,
    /// Per-query results (CSV).
    #[arg(long)]
    per_query: Option<PathBuf>,
    /// Sphering λ sweep: comma-separated λs; needs --controls. Prints mAP and enrichment per λ.
    #[arg(long, value_delimiter = ',')]
    sweep: Option<Vec<f64>>,
    /// Negative controls for the sweep: COLUMN=VALUE[,VALUE...].
    #[arg(long)]
    controls: Option<String>,
    /// Sphering method of the sweep.
    #[arg(long, default_value = "ZCA")]
    sphere_method: String,
    /// Sweep with one transform per plate of this column.
    #[arg(long)]
    per_plate: Option<String>,
    /// SVG chart: the λ sweep (with --sweep) or the histogram of per-query AP.
    #[arg(long)]
    plot: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct ProfileArgs {
    /// Metadata CSV: Metadata_Plate, Metadata_Well, Metadata_Site and one image-path column per channel.
    #[arg(long)]
    metadata: PathBuf,
    /// Root the image paths of the metadata are relative to.
    #[arg(long)]
    images: PathBuf,
    /// Locations root: {locations}/{plate}/{well}-{site}-Nuclei.csv.
    #[arg(long)]
    locations: PathBuf,
    /// Output root: {output}/{plate}/{well}_{site}.npz.
    #[arg(long)]
    output: PathBuf,
    /// EfficientNet-B0 weights (safetensors, torchvision names).
    #[arg(long)]
    weights: PathBuf,
    /// Convolution padding: symmetric (torchvision) or tf_same (Keras / DeepProfiler weights).
    #[arg(long, default_value = "symmetric")]
    padding: String,
    /// BN epsilon [default: 1e-5 with symmetric, 1e-3 with tf_same].
    #[arg(long)]
    bn_eps: Option<f32>,
    /// Feature layers, comma-separated; their features are written side by side.
    #[arg(long, value_delimiter = ',', default_value = DEFAULT_LAYER)]
    layers: Vec<String>,
    /// Crop side in pixels.
    #[arg(long, default_value_t = 128)]
    box_size: usize,
    /// Per-crop normalisation: deepprofiler_legacy, minmax or none.
    #[arg(long, default_value = "deepprofiler_legacy")]
    normalize: String,
    /// Channel columns in model input order [default: DNA,RNA,ER,AGP,Mito, else detected].
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<String>>,
    /// Object name of the location files and columns.
    #[arg(long, default_value = "Nuclei")]
    locations_object: String,
    /// A site without a locations file gets 0 cells instead of stopping the run.
    #[arg(long)]
    allow_missing_locations: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Worker threads (0 = all cores).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Crops per model batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

#[derive(Args)]
struct DemoArgs {
    /// Directory for the images, metadata, model and features.
    #[arg(long, default_value = "phenocore-demo")]
    output: PathBuf,
    /// Seed of the synthetic plates and of the model's random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// A tiny plate set (2 plates, 3 treatments, 6 sites) for a quick check.
    #[arg(long)]
    small: bool,
    /// Training epochs of the Cell Painting CNN on the synthetic plates (0 = skip training and
    /// profile with the random initialisation only).
    #[arg(long, default_value_t = 5)]
    epochs: u64,
    #[command(flatten)]
    run: RunArgs,
}

fn bar(len: u64, template: &str) -> ProgressBar {
    let style =
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar());
    ProgressBar::new(len).with_style(style.progress_chars("=> "))
}

/// A note above the bar, or on stderr when the bar is hidden (not a terminal).
fn say(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

fn set_threads(n: usize) -> Result<()> {
    phenocore::threads::set_num_threads(n)
}

/// Runs the profiler with a progress bar over cells and prints nothing else.
fn run_profile(model: &EfficientNet, opts: &ProfileOptions) -> Result<ProfileSummary> {
    let pb = bar(
        0,
        "{spinner} profiling [{bar:30}] {pos}/{len} cells  {per_sec}  eta {eta}  {msg}",
    );
    let mut to_do = 0;
    let summary = profile(model, opts, &mut |ev| {
        match ev {
            ProfileEvent::Planned {
                sites,
                to_do: n,
                cells,
                ..
            } => {
                to_do = *n;
                pb.set_length(*cells as u64);
                if sites > n {
                    say(
                        &pb,
                        format!(
                            "{} of {sites} sites already profiled: skipping them",
                            sites - n
                        ),
                    );
                }
            }
            ProfileEvent::SiteStarted { index, site } => {
                pb.set_message(format!("site {}/{to_do} {}", index + 1, site.label()))
            }
            ProfileEvent::Cells { done, .. } => pb.set_position(*done as u64),
            ProfileEvent::SiteFinished { site, cells: 0, .. } => say(
                &pb,
                format!("{}: no cells; wrote a file with 0 rows", site.label()),
            ),
            ProfileEvent::SiteFinished { .. } => {}
        }
        true
    });
    pb.finish_and_clear();
    summary
}

fn print_summary(s: &ProfileSummary, output: &Path) {
    println!(
        "sites:        {} ({} profiled, {} already done, {} with no cells)",
        s.sites,
        s.profiled,
        s.skipped,
        s.empty.len()
    );
    println!("cells:        {}", s.cells);
    println!("feature dim:  {} ({})", s.feature_dim, s.layers.join(", "));
    println!("channels:     {}", s.channels.join(", "));
    println!(
        "throughput:   {:.1} crops/s ({:.1} s)",
        s.crops_per_second(),
        s.seconds
    );
    println!("output:       {}", output.display());
}

fn cmd_profile(a: ProfileArgs) -> Result<()> {
    set_threads(a.run.threads)?;
    let padding = Padding::parse(&a.padding)?;
    let bn_eps = a.bn_eps.unwrap_or(match padding {
        Padding::TfSame => 1e-3,
        Padding::Symmetric => 1e-5,
    });
    if !(bn_eps.is_finite() && bn_eps > 0.0) {
        return Err(Error::InvalidArgument(format!(
            "--bn-eps {bn_eps} must be a positive number"
        )));
    }
    let mut opts = ProfileOptions::new(&a.metadata, &a.images, &a.locations, &a.output);
    opts.normalization = Normalization::parse(&a.normalize)?;
    opts.layers = a
        .layers
        .iter()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect();
    opts.channels = a
        .channels
        .map(|c| c.iter().map(|s| s.trim().to_string()).collect());
    opts.box_size = a.box_size;
    opts.batch_size = a.run.batch_size;
    opts.locations_object = a.locations_object;
    opts.allow_missing_locations = a.allow_missing_locations;
    let model = EfficientNet::load(&a.weights, padding, bn_eps)
        .map_err(|e| prefix(e, &format!("weights {}", a.weights.display())))?;
    let s = run_profile(&model, &opts)?;
    print_summary(&s, &opts.output);
    Ok(())
}

/// Adds context to an error message, keeping its kind.
fn prefix(e: Error, what: &str) -> Error {
    match e {
        Error::Format(m) => Error::Format(format!("{what}: {m}")),
        Error::MissingKey(m) => Error::MissingKey(format!("{what}: {m}")),
        Error::Shape(m) => Error::Shape(format!("{what}: {m}")),
        Error::DType(m) => Error::DType(format!("{what}: {m}")),
        other => other,
    }
}

fn cmd_demo(a: DemoArgs) -> Result<()> {
    set_threads(a.run.threads)?;
    let cfg = SyntheticConfig {
        seed: a.seed,
        ..if a.small {
            SyntheticConfig::small()
        } else {
            SyntheticConfig::default()
        }
    };
    let root = &a.output;
    std::fs::create_dir_all(root)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", root.display())))?;
    // Features of an earlier demo with other settings would be skipped as "done": refuse instead.
    let stamp = root.join("demo.txt");
    let stamp_text = format!("seed={} small={} epochs={}\n", a.seed, a.small, a.epochs);
    match std::fs::read_to_string(&stamp) {
        Ok(old) if old != stamp_text => {
            return Err(Error::InvalidArgument(format!(
                "{} holds a demo made with {}; choose another --output or the same settings",
                root.display(),
                old.trim()
            )))
        }
        _ => phenocore::io::write_atomic(&stamp, stamp_text.as_bytes())?,
    }

    let sites = phenocore::profiling::synthetic::layout(&cfg)?.len() as u64;
    let pb = bar(
        sites,
        "{spinner} writing plates [{bar:30}] {pos}/{len} sites  eta {eta}",
    );
    let data = write_dataset(&cfg, root, &mut |done, _| {
        pb.set_position(done as u64);
        true
    });
    pb.finish_and_clear();
    let data = data?;
    println!(
        "synthetic plates: {} plates, {} wells, {} sites, {} cells, {}×{} px, 5 channels (DNA, RNA, ER, AGP, Mito), seed {}",
        data.plates, data.wells, data.sites, data.cells, cfg.image_size, cfg.image_size, cfg.seed
    );
    for t in &data.treatments {
        println!("  {:<14} {}", t.name(), t.description());
    }

    // 1. Weakly supervised training on the plates' single-cell crops (classes = treatments).
    let trained = if a.epochs > 0 {
        let tcfg = phenocore::train::config::TrainConfig {
            source: phenocore::train::config::DataSource::Images {
                metadata: data.metadata.clone(),
                images: data.images.clone(),
                locations: data.locations.clone(),
                channels: None,
                object: "Nuclei".into(),
                box_size: 128,
                normalization: Normalization::DeepProfilerLegacy,
            },
            label_field: "Metadata_Treatment".into(),
            initialization: None,
            padding: Padding::Symmetric,
            bn_eps: 1e-5,
            // REFERENCE §2 hyper-parameters with two changes for a 5-epoch run: no augmentations
            // (they regularise the paper's 30-epoch runs; on these plates 5 epochs gave validation
            // accuracy 0.68–0.93 with them, 0.97–1.00 without) and a cosine learning-rate decay
            // (with a constant rate the last epoch's accuracy swung between 0.43 and 0.97 across
            // numerically different but equivalent runs; cosine: 0.97 on seed 0, 0.99 on seed 1).
            options: phenocore::train::TrainerOptions {
                epochs: a.epochs,
                batch_size: 32,
                seed: a.seed,
                augmentation: phenocore::train::augment::Augmentation::none(),
                schedule: phenocore::optim::Schedule::Cosine {
                    t_max: a.epochs,
                    eta_min: 0.0,
                },
                ..Default::default()
            },
            split: phenocore::train::config::SplitKind::Cells {
                train_fraction: 0.6,
            },
            output: root.join("training"),
        };
        let mut o = train_cli::run_training(&tcfg, false, false)?;
        if let Some(v) = o.reports.last().and_then(|r| r.validation.as_ref()) {
            println!(
                "trained:      {} epochs, validation (leave-cells-out, 40 % of every well): accuracy {:.4}, macro-F1 {:.4} over {} classes",
                a.epochs,
                v.accuracy,
                v.macro_f1,
                o.classes.len()
            );
        }
        Some(o.trainer.inference_model()?)
    } else {
        None
    };

    // 2. Profiles from the random initialisation and from the trained model, through the same
    //    path as `phenocore profile --weights …`, each aggregated, sphered and evaluated.
    let config = EfficientNetConfig {
        in_channels: 5,
        num_classes: cfg.treatments.len(),
        padding: Padding::Symmetric,
        bn_eps: 1e-5,
    };
    let weights = root.join("model_random.safetensors");
    EfficientNet::new(config.clone(), a.seed)?.save(&weights)?;
    println!(
        "random model: EfficientNet-B0, torchvision initialisation (seed {}) -> {}",
        a.seed,
        weights.display()
    );
    let model = EfficientNet::load(&weights, config.padding, config.bn_eps)?;
    let mut opts = ProfileOptions::new(
        &data.metadata,
        &data.images,
        &data.locations,
        &root.join("features_random"),
    );
    opts.batch_size = a.run.batch_size;
    let s = run_profile(&model, &opts)?;
    print_summary(&s, &opts.output);
    let random = demo_profiles(root, &opts.output, "random")?;
    if let Some(model) = trained {
        let w = root.join("model_trained.safetensors");
        model.save(&w)?;
        println!("trained model -> {}", w.display());
        opts.output = root.join("features_trained");
        let s = run_profile(&model, &opts)?;
        print_summary(&s, &opts.output);
        let trained = demo_profiles(root, &opts.output, "trained")?;
        println!(
            "well-level mAP after sphering: random initialisation {:.4} -> trained {:.4} (before sphering {:.4} -> {:.4})",
            random.1, trained.1, random.0, trained.0
        );
    }
    Ok(())
}

/// The demo after profiling: aggregate → sphere → evaluate, printing mAP before and after sphering.
/// Returns (mAP before sphering, best mAP after).
fn demo_profiles(root: &Path, features: &Path, label: &str) -> Result<(f64, f64)> {
    let agg = aggregate_npz_dir(features, &AggregateOptions::default(), &mut |_, _| true)?;
    let profiles = root.join("profiles").join(label);
    std::fs::create_dir_all(&profiles)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", profiles.display())))?;
    let wells = agg.wells;
    write_profiles(
        &profiles.join("wells.parquet"),
        &wells,
        &WriteOptions::default(),
    )?;
    if let Some(t) = &agg.treatments {
        write_profiles(
            &profiles.join("treatments.parquet"),
            t,
            &WriteOptions::default(),
        )?;
    }
    println!(
        "aggregated:   {} cells -> {} sites -> {} wells -> {} treatments (site median, well mean, treatment mean) -> {}",
        agg.cells,
        agg.sites.n_rows(),
        wells.n_rows(),
        agg.treatments.as_ref().map_or(0, |t| t.n_rows()),
        profiles.display()
    );
    // Replicate retrieval at well level: a treated well's positives are the other wells of its
    // treatment; DMSO wells are never queries but stay in every library as negatives.
    let controls = ControlSelector::meta("Metadata_Control", "1");
    let labels = row_labels(&wells, "Metadata_Treatment", Some(&controls))?;
    let map_opts = MapOptions::default();
    let enr_opts = EnrichmentOptions::default();
    let before = score(&wells, &labels, &map_opts, &enr_opts, None)?;
    // λ relative to the controls' mean feature variance: the demo model's random weights give
    // features of a tiny scale, where an absolute λ of 1e-3 would leave the profiles unwhitened.
    let ctrl = controls.rows(&wells)?;
    let d = wells.n_features();
    let mut var = 0.0;
    for j in 0..d {
        let col: Vec<f64> = ctrl.iter().map(|&r| wells.row(r)[j]).collect();
        let m = col.iter().sum::<f64>() / col.len() as f64;
        var += col.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / col.len() as f64;
    }
    let scale = var / d as f64;
    let rel = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0];
    let lambdas: Vec<f64> = rel.iter().map(|r| r * scale).collect();
    let mut enr = Vec::new();
    let curve = lambda_sweep(
        &wells,
        &controls,
        None,
        &SphereOptions::default(),
        &lambdas,
        &mut |sphered| {
            let s = score(sphered, &labels, &map_opts, &enr_opts, None)?;
            enr.push(s.enrichment.mean_odds_ratio);
            Ok(s.map.mean)
        },
    )?;
    println!(
        "evaluation:   {} wells, {} queries (treated wells; DMSO wells are library only), cosine similarity, interpolated mAP",
        wells.n_rows(),
        before.map.n_queries
    );
    println!(
        "  before sphering                   mAP {:.4}   folds of enrichment {:.2}",
        before.map.mean, before.enrichment.mean_odds_ratio
    );
    for ((r, (l, m)), e) in rel.iter().zip(&curve).zip(&enr) {
        println!("  ZCA, λ = {r:<6} x var ({l:.1e})  mAP {m:.4}   folds of enrichment {e:.2}");
    }
    let best = curve
        .iter()
        .enumerate()
        .filter(|(_, c)| c.1.is_finite())
        .max_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let fit = ProfileSphering::fit(
        &wells,
        &controls,
        None,
        &SphereOptions {
            lambda: lambdas[best],
            ..SphereOptions::default()
        },
    )?;
    fit.save(&profiles.join("sphering.safetensors"))?;
    write_profiles(
        &profiles.join("wells_sphered.parquet"),
        &fit.transform_profiles(&wells)?,
        &WriteOptions::default(),
    )?;
    LineChart {
        title: "demo: well-level mAP after ZCA sphering".into(),
        x_label: "λ".into(),
        y_label: "mAP (interpolated)".into(),
        x_log: true,
        series: vec![Series {
            name: "ZCA".into(),
            points: curve.clone(),
        }],
    }
    .save(&profiles.join("lambda_sweep.svg"))?;
    println!(
        "{label} model: mAP before sphering {:.4} -> after sphering {:.4} (ZCA, λ = {:.1e}, the best of the sweep); sphered wells, transform and the λ-sweep chart in {}",
        before.map.mean,
        curve[best].1,
        lambdas[best],
        profiles.display()
    );
    Ok((before.map.mean, curve[best].1))
}

// ---- aggregate / sphere / evaluate ---------------------------------------------------------------

fn cmd_aggregate(a: AggregateArgs) -> Result<()> {
    set_threads(a.threads)?;
    let ext = match a.format.to_ascii_lowercase().as_str() {
        "parquet" => "parquet",
        "csv" => "csv",
        "tsv" => "tsv",
        other => {
            return Err(Error::InvalidArgument(format!(
                "--format {other:?}: expected parquet, csv or tsv"
            )))
        }
    };
    let mut opts = AggregateOptions::preset(&a.preset)?;
    opts.plate = a.plate_column;
    opts.well = a.well_column;
    opts.site = Some(a.site_column).filter(|s| !s.is_empty());
    opts.treatment = Some(a.treatment_column).filter(|s| !s.is_empty());
    let agg = if a.input.is_dir() {
        let pb = bar(
            0,
            "{spinner} aggregating [{bar:30}] {pos}/{len} sites  eta {eta}",
        );
        let r = aggregate_npz_dir(&a.input, &opts, &mut |done, total| {
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            true
        });
        pb.finish_and_clear();
        r?
    } else {
        let cells = read_profiles(&a.input, &ReadOptions::default())?;
        aggregate_cells(
            &Cells {
                features: &cells.data,
                n_features: cells.n_features(),
                feature_names: &cells.feature_names,
                meta_names: &cells.meta_names,
                meta: &cells.meta,
            },
            &opts,
        )?
    };
    std::fs::create_dir_all(&a.output)
        .map_err(|e| Error::Io(format!("cannot create {}: {e}", a.output.display())))?;
    println!(
        "cells: {} ({} dropped for NaN/inf), preset {} (site {}, well {}, treatment {})",
        agg.cells,
        agg.dropped_cells,
        a.preset,
        opts.site_op.name(),
        opts.well_op.name(),
        opts.treatment_op.name()
    );
    for g in &agg.empty {
        eprintln!("warning: left out {}", g.label());
    }
    let mut levels = vec![("sites", &agg.sites), ("wells", &agg.wells)];
    if let Some(t) = &agg.treatments {
        levels.push(("treatments", t));
    }
    for (name, p) in levels {
        let path = a.output.join(format!("{name}.{ext}"));
        write_profiles(&path, p, &WriteOptions::default())?;
        println!(
            "{name:<11} {:>7} profiles x {} features -> {}",
            p.n_rows(),
            p.n_features(),
            path.display()
        );
    }
    Ok(())
}

/// `COLUMN=VALUE[,VALUE...]` → a control selector.
fn parse_selector(s: &str, flag: &str) -> Result<ControlSelector> {
    let (col, vals) = s.split_once('=').ok_or_else(|| {
        Error::InvalidArgument(format!("{flag} {s:?}: expected COLUMN=VALUE[,VALUE...]"))
    })?;
    let values: Vec<String> = vals.split(',').map(|v| v.trim().to_string()).collect();
    if col.trim().is_empty() || values.iter().all(|v| v.is_empty()) {
        return Err(Error::InvalidArgument(format!(
            "{flag} {s:?}: expected COLUMN=VALUE[,VALUE...]"
        )));
    }
    Ok(ControlSelector::Meta {
        column: col.trim().to_string(),
        values,
    })
}

fn sphere_options(method: &str, lambda: f64, regularization: &str) -> Result<SphereOptions> {
    let o = SphereOptions {
        method: method.parse::<SphereMethod>()?,
        lambda,
        regularization: regularization.parse::<Regularization>()?,
    };
    o.validate()?;
    Ok(o)
}

fn cmd_sphere(a: SphereArgs) -> Result<()> {
    set_threads(a.threads)?;
    let p = read_profiles(&a.input, &ReadOptions::default())?;
    let fit = if let Some(t) = &a.transform {
        ProfileSphering::load(t)?
    } else {
        let controls = a.controls.as_deref().ok_or_else(|| {
            Error::InvalidArgument(
                "sphere: name the negative controls with --controls COLUMN=VALUE (or apply a saved --transform)".into(),
            )
        })?;
        let sel = parse_selector(controls, "--controls")?;
        let opts = sphere_options(&a.method, a.lambda, &a.regularization)?;
        let n_controls = sel.rows(&p)?.len();
        let fit = ProfileSphering::fit(&p, &sel, a.per_plate.as_deref(), &opts)?;
        println!(
            "fitted {} (λ = {:e}, {} regularisation) on {n_controls} control profiles{}",
            opts.method,
            opts.lambda,
            opts.regularization,
            a.per_plate
                .as_deref()
                .map(|c| format!(", one transform per {c}"))
                .unwrap_or_else(|| ", pooled".into())
        );
        if let Some(path) = &a.save_transform {
            fit.save(path)?;
            println!("transform -> {}", path.display());
        }
        fit
    };
    let out = fit.transform_profiles(&p)?;
    write_profiles(&a.output, &out, &WriteOptions::default())?;
    println!(
        "{} profiles x {} features -> {}",
        out.n_rows(),
        out.n_features(),
        a.output.display()
    );
    Ok(())
}

/// Labels per row from `column` (`|`-separated), with rows matching `unlabel` cleared.
fn row_labels(p: &Profiles, column: &str, unlabel: Option<&ControlSelector>) -> Result<Labels> {
    let mut cells: Vec<String> = p.meta_column(column)?.to_vec();
    if let Some(sel) = unlabel {
        for (c, clear) in cells.iter_mut().zip(sel.mask(p)?) {
            if clear {
                c.clear();
            }
        }
    }
    Ok(Labels::from_joined(&cells))
}

/// The scores `evaluate` reports for one table.
struct Scores {
    map: MapResult,
    enrichment: EnrichmentResult,
    replicate: Option<ReplicateResult>,
}

fn score(
    p: &Profiles,
    labels: &Labels,
    map_opts: &MapOptions,
    enr_opts: &EnrichmentOptions,
    replicates: Option<&str>,
) -> Result<Scores> {
    let sim = CosineSimilarity::new(&p.data, p.n_rows(), p.n_features())?;
    let map = mean_average_precision(&sim, labels, map_opts, None)?;
    let enrichment = folds_of_enrichment(&sim, labels, enr_opts, None)?;
    let replicate = match replicates {
        Some(col) => Some(replicate_reproducibility(
            &sim,
            p.meta_column(col)?,
            &ReplicateOptions::default(),
            None,
        )?),
        None => None,
    };
    Ok(Scores {
        map,
        enrichment,
        replicate,
    })
}

fn map_options(method: &str, null_size: usize, seed: u64) -> Result<MapOptions> {
    let method = match method.to_ascii_lowercase().as_str() {
        "interpolated" => MapMethod::Interpolated,
        "deepprofiler" => MapMethod::DeepProfiler,
        "copairs" => MapMethod::Copairs,
        other => {
            return Err(Error::InvalidArgument(format!(
                "--method {other:?}: expected interpolated, deepprofiler or copairs"
            )))
        }
    };
    if null_size > 0 && method != MapMethod::Copairs {
        return Err(Error::InvalidArgument(
            "--null-size needs --method copairs (p-values are defined for copairs' AP)".into(),
        ));
    }
    Ok(MapOptions {
        method,
        null_size,
        seed,
        ..MapOptions::default()
    })
}

fn write_per_query(path: &Path, p: &Profiles, labels_col: &str, s: &Scores) -> Result<()> {
    let mut names: Vec<String> = p.meta_names.clone();
    let mut meta: Vec<Vec<String>> = p.meta.clone();
    let mut push = |name: &str, v: Vec<String>| {
        names.push(name.to_string());
        meta.push(v);
    };
    let f = |v: f64| {
        if v.is_nan() {
            String::new()
        } else {
            format!("{v}")
        }
    };
    push(
        "Metadata_is_query",
        s.map
            .per_query
            .iter()
            .map(|v| (!v.is_nan() as u8).to_string())
            .collect(),
    );
    push(
        "Metadata_n_positives",
        s.map.n_positives.iter().map(|v| v.to_string()).collect(),
    );
    push(
        "Metadata_average_precision",
        s.map.per_query.iter().map(|&v| f(v)).collect(),
    );
    if let Some(pv) = &s.map.p_values {
        push("Metadata_p_value", pv.iter().map(|&v| f(v)).collect());
    }
    if let Some(q) = &s.map.q_values {
        push("Metadata_q_value", q.iter().map(|&v| f(v)).collect());
    }
    push(
        "Metadata_enrichment_odds_ratio",
        s.enrichment.odds_ratio.iter().map(|&v| f(v)).collect(),
    );
    push(
        "Metadata_enrichment_p_value",
        s.enrichment.p_value.iter().map(|&v| f(v)).collect(),
    );
    let _ = labels_col;
    let table = Profiles::new(names, meta, vec![], vec![])?;
    write_profiles(path, &table, &WriteOptions::default())
}

fn print_scores(what: &str, s: &Scores, percentile: f64) {
    let mut line = format!(
        "{what:<22} mAP {:.4}  ({} queries)   folds of enrichment (top {}%) {:.2}",
        s.map.mean,
        s.map.n_queries,
        100.0 - percentile,
        s.enrichment.mean_odds_ratio
    );
    if let Some(q) = &s.map.q_values {
        let sig = q.iter().filter(|v| **v < 0.05).count();
        line += &format!("   q < 0.05: {sig}/{}", s.map.n_queries);
    }
    if let Some(r) = &s.replicate {
        line += &format!("   replicate reproducibility {:.3}", r.fraction);
    }
    println!("{line}");
}

fn cmd_evaluate(a: EvaluateArgs) -> Result<()> {
    set_threads(a.threads)?;
    let p = read_profiles(&a.input, &ReadOptions::default())?;
    let unlabel = a
        .unlabel
        .as_deref()
        .map(|s| parse_selector(s, "--unlabel"))
        .transpose()?;
    let labels = row_labels(&p, &a.labels, unlabel.as_ref())?;
    let map_opts = map_options(&a.method, a.null_size, a.seed)?;
    let enr_opts = EnrichmentOptions {
        percentile: a.percentile,
        ..EnrichmentOptions::default()
    };
    println!(
        "{}: {} profiles x {} features, labels from {} ({} distinct), mAP method {}",
        a.input.display(),
        p.n_rows(),
        p.n_features(),
        a.labels,
        labels.names.len(),
        a.method
    );
    let s = score(&p, &labels, &map_opts, &enr_opts, a.replicates.as_deref())?;
    print_scores("profiles as given", &s, a.percentile);
    if let Some(path) = &a.per_query {
        write_per_query(path, &p, &a.labels, &s)?;
        println!("per-query results -> {}", path.display());
    }
    let Some(lambdas) = &a.sweep else {
        if let Some(path) = &a.plot {
            Histogram {
                title: format!("AP per query ({})", a.method),
                x_label: "average precision".into(),
                values: s.map.per_query.clone(),
                bins: 20,
                lo: 0.0,
                hi: 1.0,
            }
            .save(path)?;
            println!("plot -> {}", path.display());
        }
        return Ok(());
    };
    let controls = a.controls.as_deref().ok_or_else(|| {
        Error::InvalidArgument(
            "--sweep needs --controls COLUMN=VALUE (the negative controls)".into(),
        )
    })?;
    let sel = parse_selector(controls, "--controls")?;
    let base = sphere_options(&a.sphere_method, 0.0, "eigenvalue")?;
    let mut rows: Vec<(f64, f64)> = Vec::new();
    let curve = lambda_sweep(
        &p,
        &sel,
        a.per_plate.as_deref(),
        &base,
        lambdas,
        &mut |sphered| {
            let s = score(
                sphered,
                &labels,
                &map_opts,
                &enr_opts,
                a.replicates.as_deref(),
            )?;
            rows.push((s.map.mean, s.enrichment.mean_odds_ratio));
            Ok(s.map.mean)
        },
    )?;
    println!("{:>10}  {:>8}  {:>10}", "lambda", "mAP", "enrichment");
    for ((l, m), (_, e)) in curve.iter().zip(&rows) {
        println!("{l:>10.0e}  {m:>8.4}  {e:>10.2}");
    }
    if let Some(best) = curve
        .iter()
        .filter(|c| c.1.is_finite())
        .max_by(|a, b| a.1.total_cmp(&b.1))
    {
        println!("best λ = {:e} (mAP {:.4})", best.0, best.1);
    }
    if let Some(path) = &a.plot {
        LineChart {
            title: format!("mAP after {} sphering vs λ", base.method),
            x_label: "λ".into(),
            y_label: format!("mAP ({})", a.method),
            x_log: curve.iter().all(|c| c.0 > 0.0),
            series: vec![Series {
                name: format!("{}", base.method),
                points: curve.clone(),
            }],
        }
        .save(path)?;
        println!("plot -> {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (a bug in phenocore): {info}")
    }));
    let cli = Cli::parse();
    let res = std::panic::catch_unwind(move || match cli.command {
        Command::Profile(a) => cmd_profile(*a),
        Command::Aggregate(a) => cmd_aggregate(a),
        Command::Sphere(a) => cmd_sphere(a),
        Command::Evaluate(a) => cmd_evaluate(a),
        Command::Demo(a) => cmd_demo(a),
        Command::Train(a) => train_cli::cmd_train(a),
        Command::BenchTrain(a) => train_cli::cmd_bench_train(a),
        Command::BenchUnet(a) => diffusion_cli::cmd_bench_unet(a),
        Command::Diffusion(c) => diffusion_cli::cmd_diffusion(c),
    });
    match res {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
        Err(_) => ExitCode::from(70),
    }
}
