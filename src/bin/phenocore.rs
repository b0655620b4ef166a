//! `phenocore`: the command line over the library.
//! - `phenocore profile …`: single-cell CNN features of a DeepProfiler-style dataset (per-site npz).
//! - `phenocore demo …`: synthetic Cell Painting plates → a seeded model → profiles, end to end.

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use phenocore::models::efficientnet::{EfficientNet, EfficientNetConfig, Padding};
use phenocore::profiling::crops::Normalization;
use phenocore::profiling::profile::{
    profile, ProfileEvent, ProfileOptions, ProfileSummary, DEFAULT_LAYER,
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
    /// Make synthetic Cell Painting plates and a seeded model, then profile them end to end.
    Demo(DemoArgs),
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
    let stamp_text = format!("seed={} small={}\n", a.seed, a.small);
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

    let config = EfficientNetConfig {
        in_channels: 5,
        num_classes: cfg.treatments.len(),
        padding: Padding::Symmetric,
        bn_eps: 1e-5,
    };
    let weights = root.join("model.safetensors");
    EfficientNet::new(config.clone(), a.seed)?.save(&weights)?;
    println!(
        "model: EfficientNet-B0 with random weights (seed {}): no pretrained weights are available offline, \
         so these features exercise the pipeline, not biology. Saved to {}",
        a.seed,
        weights.display()
    );
    // Profile through the same path as `phenocore profile --weights model.safetensors`.
    let model = EfficientNet::load(&weights, config.padding, config.bn_eps)?;
    let mut opts = ProfileOptions::new(
        &data.metadata,
        &data.images,
        &data.locations,
        &root.join("features"),
    );
    opts.batch_size = a.run.batch_size;
    let s = run_profile(&model, &opts)?;
    print_summary(&s, &opts.output);
    Ok(())
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal error (a bug in phenocore): {info}")
    }));
    let cli = Cli::parse();
    let res = std::panic::catch_unwind(move || match cli.command {
        Command::Profile(a) => cmd_profile(*a),
        Command::Demo(a) => cmd_demo(a),
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
