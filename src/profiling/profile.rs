//! Profiling a DeepProfiler-style dataset: every site (field of view) of a metadata table →
//! single-cell CNN features in `{output}/{plate}/{well}_{site}.npz` (DeepProfiler writes
//! `features/{plate}/{well}_{site}.npz`; the format is `io::npz::SiteFeatures`).
//!
//! Inputs, as DeepProfiler lays them out:
//! - a metadata CSV with `Metadata_Plate`, `Metadata_Well`, `Metadata_Site` and one column per
//!   channel holding the image path relative to the image root (absolute paths are used as is).
//!   Channel columns are the caller's list, else DeepProfiler's `DNA, RNA, ER, AGP, Mito` when all
//!   are present, else every column whose values all end in `.tif`, `.tiff` or `.png` (in CSV order);
//! - locations `{locations}/{plate}/{well}-{site}-{object}.csv` with `{object}_Location_Center_X/Y`
//!   (object `Nuclei` by default).
//!
//! The run is resumable: a site whose output file exists is skipped, and outputs are written
//! atomically, so a stopped run leaves only whole files. Everything checkable without the model
//! (columns, duplicate sites, unsafe names, locations, image files present) is checked before the
//! first site is profiled. Crops are made and run in batches of `batch_size`, so memory stays
//! bounded by the batch, not the site. A site with no cells gets a file with 0 rows.

use crate::error::{Error, Result};
use crate::io::image::{read_gray, GrayImage, Pixels};
use crate::io::npz::{write_site, SiteFeatures};
use crate::io::table::{read_csv, Table};
use crate::models::efficientnet::EfficientNet;
use crate::profiling::crops::{crop_cells, Image, Normalization};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// DeepProfiler's channel columns (Cell Painting order).
pub const DEFAULT_CHANNELS: [&str; 5] = ["DNA", "RNA", "ER", "AGP", "Mito"];
/// DeepProfiler's profiling layer (REFERENCE §1 "Feature layer").
pub const DEFAULT_LAYER: &str = "block6a_activation";

#[derive(Clone, Debug, PartialEq)]
pub struct ProfileOptions {
    pub metadata: PathBuf,
    pub images: PathBuf,
    pub locations: PathBuf,
    pub output: PathBuf,
    /// Channel columns in model input order; None = DeepProfiler's five or detected (module doc).
    pub channels: Option<Vec<String>>,
    /// Layers whose mean-pooled features are written side by side.
    pub layers: Vec<String>,
    pub box_size: usize,
    pub normalization: Normalization,
    /// Crops made and run through the model at once.
    pub batch_size: usize,
    /// Object name in location file names and columns (`Nuclei`).
    pub locations_object: String,
    /// Treat a missing locations file as a site without cells instead of an error.
    pub allow_missing_locations: bool,
}

impl ProfileOptions {
    /// DeepProfiler's defaults: block6a_activation, 128-px boxes, legacy normalisation, batch 64.
    pub fn new(metadata: &Path, images: &Path, locations: &Path, output: &Path) -> Self {
        ProfileOptions {
            metadata: metadata.to_path_buf(),
            images: images.to_path_buf(),
            locations: locations.to_path_buf(),
            output: output.to_path_buf(),
            channels: None,
            layers: vec![DEFAULT_LAYER.to_string()],
            box_size: 128,
            normalization: Normalization::DeepProfilerLegacy,
            batch_size: 64,
            locations_object: "Nuclei".to_string(),
            allow_missing_locations: false,
        }
    }
}

/// One site to profile.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteJob {
    pub plate: String,
    pub well: String,
    pub site: String,
    /// Line of the metadata file (header = 1).
    pub line: usize,
    /// One image per channel, in channel order.
    pub images: Vec<PathBuf>,
    pub locations_file: PathBuf,
    pub output: PathBuf,
    /// The metadata row as key/value pairs.
    pub metadata: Vec<(String, String)>,
    /// The output exists already (the site will be skipped).
    pub done: bool,
    /// Nucleus centres (x, y); read at planning for sites still to do, empty for done ones.
    pub centers: Vec<[f32; 2]>,
    /// The locations file was missing (only with `allow_missing_locations`).
    pub missing_locations: bool,
}

impl SiteJob {
    pub fn label(&self) -> String {
        format!("{}/{}_{}", self.plate, self.well, self.site)
    }
}

/// The checked work list of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub channels: Vec<String>,
    pub sites: Vec<SiteJob>,
}

impl Plan {
    pub fn to_do(&self) -> usize {
        self.sites.iter().filter(|s| !s.done).count()
    }
    pub fn cells_to_do(&self) -> usize {
        self.sites
            .iter()
            .filter(|s| !s.done)
            .map(|s| s.centers.len())
            .sum()
    }
}

fn has_image_ext(v: &str) -> bool {
    let l = v.trim().to_ascii_lowercase();
    [".tif", ".tiff", ".png"].iter().any(|e| l.ends_with(e))
}

fn pick_channels(table: &Table, requested: Option<&[String]>) -> Result<Vec<String>> {
    if let Some(ch) = requested {
        if ch.is_empty() {
            return Err(Error::InvalidArgument("the channel list is empty".into()));
        }
        let names: Vec<&str> = ch.iter().map(String::as_str).collect();
        table.columns(&names)?;
        return Ok(ch.to_vec());
    }
    if DEFAULT_CHANNELS.iter().all(|c| table.has_column(c)) {
        return Ok(DEFAULT_CHANNELS.iter().map(|c| c.to_string()).collect());
    }
    let detected: Vec<String> = table
        .headers
        .iter()
        .enumerate()
        .filter(|(i, h)| {
            !h.starts_with("Metadata_")
                && !table.rows.is_empty()
                && table.rows.iter().all(|r| has_image_ext(&r[*i]))
        })
        .map(|(_, h)| h.clone())
        .collect();
    if detected.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no channel columns: expected {} or columns of .tif/.png paths (name them with --channels)",
            table.source.display(),
            DEFAULT_CHANNELS.join(", ")
        )));
    }
    Ok(detected)
}

fn check_name(table: &Table, row: usize, col: &str, v: &str) -> Result<()> {
    if v.is_empty() || v == "." || v == ".." || v.contains(['/', '\\', '\0']) {
        return Err(Error::InvalidArgument(format!(
            "{} line {}: {col} {v:?} cannot name an output file (empty, '.', '..' or holds a path separator)",
            table.source.display(),
            table.line_of(row)
        )));
    }
    Ok(())
}

/// Reads `{object}_Location_Center_X/Y` from a locations CSV.
pub fn read_locations(path: &Path, object: &str) -> Result<Vec<[f32; 2]>> {
    let t = read_csv(path)?;
    let (xn, yn) = (
        format!("{object}_Location_Center_X"),
        format!("{object}_Location_Center_Y"),
    );
    let cols = t.columns(&[&xn, &yn])?;
    let xs = t.f32_column(cols[0])?;
    let ys = t.f32_column(cols[1])?;
    for (i, (x, y)) in xs.iter().zip(&ys).enumerate() {
        if !x.is_finite() || !y.is_finite() {
            return Err(Error::NonFinite(format!(
                "{} line {}: centre ({x}, {y}) is not finite",
                path.display(),
                t.line_of(i)
            )));
        }
    }
    Ok(xs.into_iter().zip(ys).map(|(x, y)| [x, y]).collect())
}

/// Reads the metadata table and checks everything that can be checked without the model.
pub fn plan(opts: &ProfileOptions) -> Result<Plan> {
    let table = read_csv(&opts.metadata)?;
    let keys = table.columns(&["Metadata_Plate", "Metadata_Well", "Metadata_Site"])?;
    let channels = pick_channels(&table, opts.channels.as_deref())?;
    let ch_cols = table.columns(&channels.iter().map(String::as_str).collect::<Vec<_>>())?;
    if !opts.locations.is_dir() {
        return Err(Error::Io(format!(
            "locations directory {} does not exist",
            opts.locations.display()
        )));
    }
    // Names and duplicates first, so a bad table fails before any file is looked at.
    let mut seen = std::collections::HashMap::new();
    for (i, row) in table.rows.iter().enumerate() {
        let (plate, well, site) = (
            row[keys[0]].trim(),
            row[keys[1]].trim(),
            row[keys[2]].trim(),
        );
        check_name(&table, i, "Metadata_Plate", plate)?;
        check_name(&table, i, "Metadata_Well", well)?;
        check_name(&table, i, "Metadata_Site", site)?;
        if let Some(prev) = seen.insert((plate, well, site), i) {
            return Err(Error::InvalidArgument(format!(
                "{}: lines {} and {} both describe plate {plate}, well {well}, site {site}",
                table.source.display(),
                table.line_of(prev),
                table.line_of(i)
            )));
        }
    }
    let mut sites = Vec::with_capacity(table.rows.len());
    for (i, row) in table.rows.iter().enumerate() {
        let (plate, well, site) = (
            row[keys[0]].trim(),
            row[keys[1]].trim(),
            row[keys[2]].trim(),
        );
        let images: Vec<PathBuf> = ch_cols
            .iter()
            .map(|&c| opts.images.join(row[c].trim()))
            .collect();
        let output = opts.output.join(plate).join(format!("{well}_{site}.npz"));
        let locations_file = opts
            .locations
            .join(plate)
            .join(format!("{well}-{site}-{}.csv", opts.locations_object));
        let done = output.is_file();
        let (mut centers, mut missing_locations) = (Vec::new(), false);
        if !done {
            for (k, p) in images.iter().enumerate() {
                if !p.is_file() {
                    return Err(Error::Io(format!(
                        "image file {} does not exist ({} line {}, column {})",
                        p.display(),
                        table.source.display(),
                        table.line_of(i),
                        channels[k]
                    )));
                }
            }
            if locations_file.is_file() {
                centers = read_locations(&locations_file, &opts.locations_object)?;
            } else if opts.allow_missing_locations {
                missing_locations = true;
            } else {
                return Err(Error::Io(format!(
                    "locations file {} does not exist (site {plate}/{well}_{site}; pass allow-missing-locations to treat it as 0 cells)",
                    locations_file.display()
                )));
            }
        }
        let metadata = table
            .headers
            .iter()
            .zip(row)
            .filter(|(h, _)| !h.is_empty())
            .map(|(h, v)| (h.replace('=', "_"), v.clone()))
            .collect();
        sites.push(SiteJob {
            plate: plate.to_string(),
            well: well.to_string(),
            site: site.to_string(),
            line: table.line_of(i),
            images,
            locations_file,
            output,
            metadata,
            done,
            centers,
            missing_locations,
        });
    }
    if sites.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no sites (the table has no rows)",
            opts.metadata.display()
        )));
    }
    Ok(Plan { channels, sites })
}

/// Loads and stacks the channel images of a site: planar (C, H, W) pixels, height, width. All channels must
/// share a size; mixed 8/16-bit channels are widened to 16 bits, any float channel makes all float.
pub fn load_site_images(paths: &[PathBuf]) -> Result<(Pixels, usize, usize)> {
    let imgs: Vec<GrayImage> = paths.iter().map(|p| read_gray(p)).collect::<Result<_>>()?;
    let (w, h) = (imgs[0].width, imgs[0].height);
    for (k, im) in imgs.iter().enumerate() {
        if (im.width, im.height) != (w, h) {
            return Err(Error::Shape(format!(
                "image {} is {}×{} but {} is {w}×{h}; all channels of a site must have one size",
                paths[k].display(),
                im.width,
                im.height,
                paths[0].display()
            )));
        }
    }
    let any = |f: fn(&Pixels) -> bool| imgs.iter().any(|i| f(&i.pixels));
    let px = if any(|p| matches!(p, Pixels::F32(_))) {
        let mut v = Vec::with_capacity(imgs.len() * w * h);
        for im in &imgs {
            match &im.pixels {
                Pixels::U8(p) => v.extend(p.iter().map(|&x| x as f32)),
                Pixels::U16(p) => v.extend(p.iter().map(|&x| x as f32)),
                Pixels::F32(p) => v.extend_from_slice(p),
            }
        }
        Pixels::F32(v)
    } else if any(|p| matches!(p, Pixels::U16(_))) {
        let mut v = Vec::with_capacity(imgs.len() * w * h);
        for im in &imgs {
            match &im.pixels {
                Pixels::U8(p) => v.extend(p.iter().map(|&x| x as u16)),
                Pixels::U16(p) => v.extend_from_slice(p),
                Pixels::F32(_) => unreachable!("float handled above"),
            }
        }
        Pixels::U16(v)
    } else {
        let mut v = Vec::with_capacity(imgs.len() * w * h);
        for im in &imgs {
            if let Pixels::U8(p) = &im.pixels {
                v.extend_from_slice(p);
            }
        }
        Pixels::U8(v)
    };
    Ok((px, h, w))
}

/// What a run reports as it goes. The callback returns false to cancel (→ `Error::Cancelled`).
#[derive(Debug)]
pub enum ProfileEvent<'a> {
    /// The plan is checked: `to_do` of `sites` sites with `cells` cells will be profiled.
    Planned {
        sites: usize,
        to_do: usize,
        cells: usize,
        channels: &'a [String],
    },
    /// A site starts (`index` counts sites still to do, from 0).
    SiteStarted { index: usize, site: &'a SiteJob },
    /// Crops done over the whole run, of the total.
    Cells { done: usize, total: usize },
    /// A site's file is written; `cells` may be 0 (then the file has 0 rows).
    SiteFinished {
        index: usize,
        site: &'a SiteJob,
        cells: usize,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct ProfileSummary {
    pub sites: usize,
    pub profiled: usize,
    /// Sites whose output existed before the run.
    pub skipped: usize,
    /// Labels (`plate/well_site`) of the profiled sites with no cells.
    pub empty: Vec<String>,
    pub cells: usize,
    pub feature_dim: usize,
    pub layers: Vec<String>,
    pub channels: Vec<String>,
    /// Wall time of the profiling (after planning), seconds.
    pub seconds: f64,
}

impl ProfileSummary {
    pub fn crops_per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.cells as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// Profiles every site of `opts` not profiled yet with `model`.
pub fn profile(
    model: &EfficientNet,
    opts: &ProfileOptions,
    on_event: &mut dyn FnMut(&ProfileEvent) -> bool,
) -> Result<ProfileSummary> {
    if opts.layers.is_empty() {
        return Err(Error::InvalidArgument("no feature layer requested".into()));
    }
    if opts.batch_size == 0 {
        return Err(Error::InvalidArgument(
            "batch size must be at least 1".into(),
        ));
    }
    if opts.box_size == 0 || opts.box_size > 4096 {
        return Err(Error::InvalidArgument(format!(
            "box size {} must be in 1..=4096",
            opts.box_size
        )));
    }
    let mut dims = Vec::with_capacity(opts.layers.len());
    for l in &opts.layers {
        let d = model.layer_dim(l)?;
        dims.push(if d == 0 {
            model.config().num_classes
        } else {
            d
        });
    }
    let dim: usize = dims.iter().sum();
    let plan = plan(opts)?;
    if plan.channels.len() != model.config().in_channels {
        return Err(Error::InvalidArgument(format!(
            "the model takes {} input channels but the data has {} ({})",
            model.config().in_channels,
            plan.channels.len(),
            plan.channels.join(", ")
        )));
    }
    let total_cells = plan.cells_to_do();
    let to_do = plan.to_do();
    if !on_event(&ProfileEvent::Planned {
        sites: plan.sites.len(),
        to_do,
        cells: total_cells,
        channels: &plan.channels,
    }) {
        return Err(Error::Cancelled);
    }
    let layers: Vec<&str> = opts.layers.iter().map(String::as_str).collect();
    let extra = [
        (
            "phenocore_layers".to_string(),
            opts.layers
                .iter()
                .zip(&dims)
                .map(|(l, d)| format!("{l}:{d}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        ("phenocore_box_size".to_string(), opts.box_size.to_string()),
        (
            "phenocore_normalization".to_string(),
            normalization_name(opts.normalization).to_string(),
        ),
        ("phenocore_channels".to_string(), plan.channels.join(",")),
        (
            "phenocore_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ];
    check_existing_outputs(&plan, &extra)?;
    let start = Instant::now();
    let (mut done_cells, mut index, mut empty) = (0usize, 0usize, Vec::new());
    for site in plan.sites.iter().filter(|s| !s.done) {
        if !on_event(&ProfileEvent::SiteStarted { index, site }) {
            return Err(Error::Cancelled);
        }
        let n = site.centers.len();
        let mut features = Vec::with_capacity(n * dim);
        if n > 0 {
            let (px, h, w) = load_site_images(&site.images)?;
            let image = Image::new(px.as_image_data(), plan.channels.len(), h, w)
                .map_err(|e| Error::Format(format!("site {}: {e}", site.label())))?;
            for chunk in site.centers.chunks(opts.batch_size) {
                let crops = crop_cells(&image, chunk, opts.box_size, opts.normalization)?;
                let base = done_cells;
                let mut cancelled = false;
                let outs =
                    model.features_with_progress(&crops, &layers, opts.batch_size, &mut |d, _| {
                        let keep = on_event(&ProfileEvent::Cells {
                            done: base + d,
                            total: total_cells,
                        });
                        cancelled |= !keep;
                        keep
                    });
                let outs = match outs {
                    Err(_) if cancelled => return Err(Error::Cancelled),
                    r => r?,
                };
                append_rows(&mut features, &outs, &dims, chunk.len())?;
                done_cells += chunk.len();
            }
        }
        let mut metadata = site.metadata.clone();
        metadata.extend(extra.iter().cloned());
        if site.missing_locations {
            metadata.push((
                "phenocore_note".into(),
                format!("no locations file {}", site.locations_file.display()),
            ));
        }
        let out = SiteFeatures {
            cells: n,
            dim,
            features,
            locations: site.centers.clone(),
            metadata,
        };
        if let Some(dir) = site.output.parent() {
            std::fs::create_dir_all(dir).map_err(|e| {
                Error::Io(format!("cannot create directory {}: {e}", dir.display()))
            })?;
        }
        write_site(&site.output, &out)?;
        if n == 0 {
            empty.push(site.label());
        }
        if !on_event(&ProfileEvent::SiteFinished {
            index,
            site,
            cells: n,
        }) {
            return Err(Error::Cancelled);
        }
        index += 1;
    }
    Ok(ProfileSummary {
        sites: plan.sites.len(),
        profiled: to_do,
        skipped: plan.sites.len() - to_do,
        empty,
        cells: done_cells,
        feature_dim: dim,
        layers: opts.layers.clone(),
        channels: plan.channels,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The name `Normalization::parse` accepts.
pub fn normalization_name(n: Normalization) -> &'static str {
    match n {
        Normalization::DeepProfilerLegacy => "deepprofiler_legacy",
        Normalization::MinMax => "minmax",
        Normalization::None => "none",
    }
}

/// A resumed run must not mix settings: the first existing output (when phenocore wrote it) must
/// have been made with the same layers, box size, normalisation and channels.
fn check_existing_outputs(plan: &Plan, settings: &[(String, String)]) -> Result<()> {
    let Some(site) = plan.sites.iter().find(|s| s.done) else {
        return Ok(());
    };
    let old = crate::io::npz::read_site(&site.output)?;
    for (k, v) in settings.iter().filter(|(k, _)| k != "phenocore_version") {
        if let Some(was) = old.metadata_value(k) {
            if was != v {
                return Err(Error::InvalidArgument(format!(
                    "{} was made with {k}={was}, this run uses {v}: finish it with the same settings or use another output directory",
                    site.output.display()
                )));
            }
        }
    }
    Ok(())
}

/// Appends `n` rows made of each layer's (n, D_l) output side by side.
fn append_rows(
    dst: &mut Vec<f32>,
    outs: &[crate::tensor::Tensor],
    dims: &[usize],
    n: usize,
) -> Result<()> {
    let mut parts = Vec::with_capacity(outs.len());
    for (t, &d) in outs.iter().zip(dims) {
        if t.shape() != [n, d] {
            return Err(Error::shape_mismatch("layer features", &[n, d], t.shape()));
        }
        parts.push(t.as_f32()?);
    }
    for r in 0..n {
        for (p, &d) in parts.iter().zip(dims) {
            dst.extend_from_slice(&p[r * d..(r + 1) * d]);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::table::write_csv;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    fn fixture(dir: &Path) -> ProfileOptions {
        let img = crate::io::image::encode_tiff_u16(8, 8, &[7u16; 64]).unwrap();
        for c in DEFAULT_CHANNELS {
            std::fs::create_dir_all(dir.join("img/P1")).unwrap();
            std::fs::write(dir.join(format!("img/P1/A01_1_{c}.tif")), &img).unwrap();
        }
        let mut row = vec!["P1".to_string(), "A01".into(), "1".into()];
        row.extend(DEFAULT_CHANNELS.iter().map(|c| format!("P1/A01_1_{c}.tif")));
        let mut headers = vec!["Metadata_Plate", "Metadata_Well", "Metadata_Site"];
        headers.extend(DEFAULT_CHANNELS);
        write_csv(&dir.join("meta.csv"), &headers, &[row]).unwrap();
        write(
            &dir.join("loc/P1/A01-1-Nuclei.csv"),
            "Nuclei_Location_Center_X,Nuclei_Location_Center_Y\n3,4.5\n1,2\n",
        );
        ProfileOptions::new(
            &dir.join("meta.csv"),
            &dir.join("img"),
            &dir.join("loc"),
            &dir.join("out"),
        )
    }

    #[test]
    fn plan_reads_sites_and_locations() {
        let d = tempfile::tempdir().unwrap();
        let opts = fixture(d.path());
        let p = plan(&opts).unwrap();
        assert_eq!(p.channels, DEFAULT_CHANNELS);
        assert_eq!(p.sites.len(), 1);
        let s = &p.sites[0];
        assert_eq!(
            (s.plate.as_str(), s.well.as_str(), s.site.as_str(), s.line),
            ("P1", "A01", "1", 2)
        );
        assert_eq!(s.centers, vec![[3.0, 4.5], [1.0, 2.0]]);
        assert_eq!(s.output, d.path().join("out/P1/A01_1.npz"));
        assert!(!s.done);
        let (px, h, w) = load_site_images(&s.images).unwrap();
        assert_eq!((h, w), (8, 8));
        assert!(matches!(px, Pixels::U16(ref v) if v.len() == 5 * 64 && v.iter().all(|&x| x == 7)));
        // An existing output marks the site done and skips its checks.
        write(&s.output, "x");
        std::fs::remove_file(d.path().join("loc/P1/A01-1-Nuclei.csv")).unwrap();
        assert!(plan(&opts).unwrap().sites[0].done);
    }

    #[test]
    fn plan_errors_name_the_culprit() {
        let d = tempfile::tempdir().unwrap();
        let opts = fixture(d.path());
        std::fs::remove_file(d.path().join("img/P1/A01_1_ER.tif")).unwrap();
        let e = plan(&opts).unwrap_err().to_string();
        assert!(e.contains("A01_1_ER.tif") && e.contains("column ER"), "{e}");

        let mut o2 = opts.clone();
        o2.channels = Some(vec!["DNA".into(), "Actin".into()]);
        let e = plan(&o2).unwrap_err().to_string();
        assert!(e.contains("\"Actin\""), "{e}");

        write(
            &d.path().join("bad.csv"),
            "Metadata_Plate,Metadata_Site,DNA\nP1,1,x.tif\n",
        );
        let o3 = ProfileOptions {
            metadata: d.path().join("bad.csv"),
            ..opts.clone()
        };
        let e = plan(&o3).unwrap_err().to_string();
        assert!(e.contains("Metadata_Well"), "{e}");

        write(
            &d.path().join("dup.csv"),
            "Metadata_Plate,Metadata_Well,Metadata_Site,DNA\nP1,A01,1,a.tif\nP1,A01,1,b.tif\n",
        );
        let e = plan(&ProfileOptions {
            metadata: d.path().join("dup.csv"),
            ..opts.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("lines 2 and 3"), "{e}");

        write(
            &d.path().join("evil.csv"),
            "Metadata_Plate,Metadata_Well,Metadata_Site,DNA\n../x,A01,1,a.tif\n",
        );
        let e = plan(&ProfileOptions {
            metadata: d.path().join("evil.csv"),
            ..opts.clone()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("Metadata_Plate") && e.contains("line 2"), "{e}");

        write(
            &d.path().join("loc/P1/A01-1-Nuclei.csv"),
            "Nuclei_Location_Center_X,Nuclei_Location_Center_Y\n3,nan\n",
        );
        std::fs::write(
            d.path().join("img/P1/A01_1_ER.tif"),
            crate::io::image::encode_tiff_u16(8, 8, &[0; 64]).unwrap(),
        )
        .unwrap();
        let e = plan(&opts).unwrap_err().to_string();
        assert!(
            e.contains("A01-1-Nuclei.csv") && e.contains("line 2"),
            "{e}"
        );

        std::fs::remove_file(d.path().join("loc/P1/A01-1-Nuclei.csv")).unwrap();
        assert!(plan(&opts)
            .unwrap_err()
            .to_string()
            .contains("A01-1-Nuclei.csv"));
        let p = plan(&ProfileOptions {
            allow_missing_locations: true,
            ..opts
        })
        .unwrap();
        assert!(p.sites[0].missing_locations && p.sites[0].centers.is_empty());
    }

    #[test]
    fn profile_cancels_writes_and_resumes() {
        let d = tempfile::tempdir().unwrap();
        let mut opts = fixture(d.path());
        opts.box_size = 32;
        opts.layers = vec![DEFAULT_LAYER.into(), "stem_activation".into()];
        let cfg = crate::models::efficientnet::EfficientNetConfig {
            num_classes: 2,
            ..Default::default()
        };
        let model = EfficientNet::new(cfg, 1).unwrap();
        let out = d.path().join("out/P1/A01_1.npz");
        // Cancelling at the first crop progress leaves no output.
        let mut seen_cells = false;
        let r = profile(&model, &opts, &mut |ev| {
            seen_cells |= matches!(ev, ProfileEvent::Cells { .. });
            !matches!(ev, ProfileEvent::Cells { .. })
        });
        assert!(seen_cells);
        assert_eq!(r.unwrap_err(), Error::Cancelled);
        assert!(!out.exists());

        let mut events = Vec::new();
        let s = profile(&model, &opts, &mut |ev| {
            events.push(
                format!("{ev:?}")
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
            true
        })
        .unwrap();
        assert_eq!(
            (s.sites, s.profiled, s.skipped, s.cells, s.feature_dim),
            (1, 1, 0, 2, 672 + 32)
        );
        assert_eq!(events.first().map(String::as_str), Some("Planned"));
        assert_eq!(events.last().map(String::as_str), Some("SiteFinished"));
        let f = crate::io::npz::read_site(&out).unwrap();
        assert_eq!((f.cells, f.dim), (2, 704));
        assert_eq!(f.locations, vec![[3.0, 4.5], [1.0, 2.0]]);
        assert_eq!(
            f.metadata_value("phenocore_layers"),
            Some("block6a_activation:672,stem_activation:32")
        );
        // Same features as the model gives directly, layers side by side.
        let px = vec![7u16; 5 * 64];
        let img = Image::new(crate::profiling::crops::ImageData::U16(&px), 5, 8, 8).unwrap();
        let crops = crop_cells(&img, &f.locations, 32, opts.normalization).unwrap();
        let want = model
            .features(&crops, &[DEFAULT_LAYER, "stem_activation"])
            .unwrap();
        let (a, b) = (want[0].as_f32().unwrap(), want[1].as_f32().unwrap());
        assert_eq!(&f.features[..672], &a[..672]);
        assert_eq!(&f.features[672..704], &b[..32]);
        assert_eq!(&f.features[704..704 + 672], &a[672..]);

        let s = profile(&model, &opts, &mut |_| true).unwrap();
        assert_eq!((s.profiled, s.skipped, s.cells), (0, 1, 0));
        opts.box_size = 48;
        let e = profile(&model, &opts, &mut |_| true)
            .unwrap_err()
            .to_string();
        assert!(e.contains("phenocore_box_size=32"), "{e}");
    }

    #[test]
    fn channels_are_detected_from_paths() {
        let t = crate::io::table::parse_csv(
            b"Metadata_Plate,Metadata_Well,Metadata_Site,Hoechst,Phalloidin,Metadata_Note\nP,A,1,a.TIF,b.png,c.tif\n",
            Path::new("m.csv"),
        )
        .unwrap();
        assert_eq!(
            pick_channels(&t, None).unwrap(),
            vec!["Hoechst", "Phalloidin"]
        );
        let none =
            crate::io::table::parse_csv(b"Metadata_Plate,X\nP,1\n", Path::new("m.csv")).unwrap();
        assert!(pick_channels(&none, None)
            .unwrap_err()
            .to_string()
            .contains("no channel columns"));
    }

    #[test]
    fn mixed_depths_widen_and_sizes_must_match() {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.png");
        let b = d.path().join("b.tif");
        crate::io::image::write_png_u8(&a, 2, 2, &[1, 2, 3, 4]).unwrap();
        crate::io::image::write_tiff_u16(&b, 2, 2, &[1000, 2000, 3000, 4000]).unwrap();
        let (px, h, w) = load_site_images(&[a.clone(), b.clone()]).unwrap();
        assert_eq!((h, w), (2, 2));
        assert!(matches!(px, Pixels::U16(ref v) if v == &[1, 2, 3, 4, 1000, 2000, 3000, 4000]));
        let c = d.path().join("c.tif");
        crate::io::image::write_tiff_u16(&c, 3, 2, &[0; 6]).unwrap();
        let e = load_site_images(&[a, c]).unwrap_err().to_string();
        assert!(e.contains("c.tif") && e.contains("3×2"), "{e}");
    }

    #[test]
    fn rows_are_layers_side_by_side() {
        let a = crate::tensor::Tensor::from_f32(&[2, 2], vec![1., 2., 3., 4.]).unwrap();
        let b = crate::tensor::Tensor::from_f32(&[2, 1], vec![9., 8.]).unwrap();
        let mut v = Vec::new();
        append_rows(&mut v, &[a.clone(), b], &[2, 1], 2).unwrap();
        assert_eq!(v, vec![1., 2., 9., 3., 4., 8.]);
        assert!(append_rows(&mut v, &[a], &[3], 2).is_err());
    }
}
