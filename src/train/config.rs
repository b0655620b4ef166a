//! `phenocore train --config FILE`: a JSON file with DeepProfiler-like sections, every key checked
//! (an unknown key is an error naming its full path, so a typo never silently falls back to a
//! default). Relative paths are relative to the config file's folder.
//!
//! ```json
//! {
//!   "dataset": {
//!     "metadata": {"path": "metadata.csv", "label_field": "Metadata_Treatment"},
//!     "images": {"root": "images", "channels": ["DNA", "RNA", "ER", "AGP", "Mito"]},
//!     "locations": {"root": "locations", "object": "Nuclei", "box_size": 128,
//!                   "normalization": "deepprofiler_legacy"}
//!   },
//!   "train": {
//!     "model": {"initialization": "random", "padding": "symmetric", "bn_eps": 1e-5, "epochs": 30,
//!               "params": {"learning_rate": 0.005, "batch_size": 32, "optimizer": "sgd",
//!                          "momentum": 0.9, "nesterov": true, "weight_decay": 1e-5,
//!                          "decay": "all", "label_smoothing": 0.0, "dropout": 0.2,
//!                          "drop_connect_rate": 0.2, "bn_momentum": 0.1,
//!                          "clip_grad_norm": null, "warmup_epochs": 0},
//!               "lr_schedule": {"name": "constant"}},
//!     "partition": {"split": "cells", "train_fraction": 0.6, "validation_plates": []},
//!     "sampling": {"workers": 2, "prefetch": 2, "augment": true},
//!     "seed": 0
//!   },
//!   "output": {"dir": "training"}
//! }
//! ```
//! Instead of `images` + `locations`, `dataset.crops` = `{"path": "crops.npy", "labels": "labels.csv"}`
//! takes exported single-cell crops: an (N, C, H, W) float32 `.npy` and a CSV with one row per crop
//! holding `label_field` (and optionally `Metadata_Plate` / `Metadata_Well` for the splits).
//! `initialization` is `"random"` (torchvision's init) or a torchvision-format safetensors file
//! (e.g. ImageNet weights: the stem is expanded to the channels, the classifier made fresh).
//!
//! The paper's alternative training schemes (REFERENCE §2), both off unless present:
//! `train.model.domain_adversarial` = `{"domains": 3, "lambda": 1.0, "lambda_schedule":
//! "constant" | "ganin", "weight": 1.0, "hidden": [1024, 512, 128]}` (plates as domains: crop i's
//! domain is the index of its plate among the sorted plate names; `domains` must cover them) and
//! `train.model.mil` = `{"bag_size": 16, "min_treated": 4, "max_treated": 12,
//! "control_classes": [0], "attention_dim": 128}` (`control_classes` are class indices, i.e.
//! positions in the sorted class list written to classes.txt; `batch_size` then counts bags).

use super::augment::Augmentation;
use super::domain::{DomainAdversarial, GrlLambda};
use super::mil::MilOptions;
use super::split::{leave_cells_out, leave_plates_out};
use super::trainer::{Dataset, DecayScope, OptimizerKind, TrainerOptions};
use crate::error::{Error, Result};
use crate::io::table::read_csv;
use crate::models::efficientnet::Padding;
use crate::optim::Schedule;
use crate::profiling::crops::{crop_cells_into, Image, ImageData, Normalization};
use crate::profiling::profile::{load_site_images, plan, ProfileOptions};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub enum DataSource {
    Images {
        metadata: PathBuf,
        images: PathBuf,
        locations: PathBuf,
        channels: Option<Vec<String>>,
        object: String,
        box_size: usize,
        normalization: Normalization,
    },
    Crops {
        crops: PathBuf,
        labels: PathBuf,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub enum SplitKind {
    None,
    Cells { train_fraction: f64 },
    Plates { validation_plates: Vec<String> },
}

#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub source: DataSource,
    pub label_field: String,
    pub initialization: Option<PathBuf>,
    pub padding: Padding,
    pub bn_eps: f32,
    pub options: TrainerOptions,
    pub split: SplitKind,
    pub output: PathBuf,
}

/// Reads keys of one JSON object, remembering which were used; `finish` errors on the rest.
struct Section<'a> {
    path: String,
    map: &'a Map<String, Value>,
    used: Vec<&'static str>,
}

impl<'a> Section<'a> {
    fn new(path: &str, v: &'a Value) -> Result<Self> {
        let map = v
            .as_object()
            .ok_or_else(|| Error::InvalidArgument(format!("config: {path} must be an object")))?;
        Ok(Section {
            path: path.to_string(),
            map,
            used: Vec::new(),
        })
    }
    fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.path)
        }
    }
    fn get(&mut self, k: &'static str) -> Option<&'a Value> {
        self.used.push(k);
        self.map.get(k).filter(|v| !v.is_null())
    }
    fn sub(&mut self, k: &'static str) -> Result<Option<Section<'a>>> {
        let p = self.key(k);
        self.get(k).map(|v| Section::new(&p, v)).transpose()
    }
    fn err(&self, k: &str, want: &str) -> Error {
        Error::InvalidArgument(format!("config: {} must be {want}", self.key(k)))
    }
    fn f64(&mut self, k: &'static str, default: f64) -> Result<f64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err(k, "a number")),
        }
    }
    fn opt_f64(&mut self, k: &'static str) -> Result<Option<f64>> {
        self.get(k)
            .map(|v| v.as_f64().ok_or_else(|| self.err(k, "a number or null")))
            .transpose()
    }
    fn u64(&mut self, k: &'static str, default: u64) -> Result<u64> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| self.err(k, "a non-negative integer")),
        }
    }
    fn bool(&mut self, k: &'static str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err(k, "true or false")),
        }
    }
    fn str(&mut self, k: &'static str) -> Result<Option<String>> {
        self.get(k)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.err(k, "a string"))
            })
            .transpose()
    }
    fn strings(&mut self, k: &'static str) -> Result<Option<Vec<String>>> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let arr = v
            .as_array()
            .ok_or_else(|| self.err(k, "a list of strings"))?;
        arr.iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .or_else(|| x.as_i64().map(|i| i.to_string()))
                    .ok_or_else(|| self.err(k, "a list of strings"))
            })
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    fn usizes(&mut self, k: &'static str) -> Result<Option<Vec<usize>>> {
        let Some(v) = self.get(k) else {
            return Ok(None);
        };
        let err = || self.err(k, "a list of non-negative integers");
        v.as_array()
            .ok_or_else(err)?
            .iter()
            .map(|x| x.as_u64().map(|u| u as usize).ok_or_else(err))
            .collect::<Result<Vec<_>>>()
            .map(Some)
    }
    /// Unknown keys → error naming every one with its full path.
    fn finish(self, unknown: &mut Vec<String>) {
        for k in self.map.keys() {
            if !self.used.contains(&k.as_str()) {
                unknown.push(self.key(k));
            }
        }
    }
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Io(format!("cannot read config {}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::parse(&text, base).map_err(|e| prefix(e, &format!("{}: ", path.display())))
    }

    /// Parses a config; relative paths are joined to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<Self> {
        let root: Value = serde_json::from_str(text)
            .map_err(|e| Error::Format(format!("config is not valid JSON: {e}")))?;
        let rel = |p: String| -> PathBuf {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                base.join(p)
            }
        };
        let mut unknown = Vec::new();
        let mut top = Section::new("", &root)?;
        let mut ds = top
            .sub("dataset")?
            .ok_or_else(|| Error::InvalidArgument("config: missing section \"dataset\"".into()))?;
        let mut md = ds.sub("metadata")?;
        let label_field = match md.as_mut() {
            Some(m) => m.str("label_field")?,
            None => None,
        }
        .unwrap_or_else(|| "Metadata_Treatment".to_string());
        let md_path = match md.as_mut() {
            Some(m) => m.str("path")?,
            None => None,
        };
        let crops = ds.sub("crops")?;
        let images = ds.sub("images")?;
        let locations = ds.sub("locations")?;
        let source = if let Some(mut c) = crops {
            let p = c
                .str("path")?
                .ok_or_else(|| c.err("path", "the .npy file of crops"))?;
            let l = c
                .str("labels")?
                .ok_or_else(|| c.err("labels", "a CSV with one row per crop"))?;
            c.finish(&mut unknown);
            DataSource::Crops {
                crops: rel(p),
                labels: rel(l),
            }
        } else {
            let (mut im, mut lo) = match (images, locations) {
                (Some(i), Some(l)) => (i, l),
                _ => {
                    return Err(Error::InvalidArgument(
                        "config: dataset needs \"images\" and \"locations\" (or \"crops\")".into(),
                    ))
                }
            };
            let metadata = md_path.ok_or_else(|| {
                Error::InvalidArgument("config: dataset.metadata.path is required".into())
            })?;
            let images = im
                .str("root")?
                .ok_or_else(|| im.err("root", "the images folder"))?;
            let channels = im.strings("channels")?;
            im.finish(&mut unknown);
            let locations = lo
                .str("root")?
                .ok_or_else(|| lo.err("root", "the locations folder"))?;
            let object = lo.str("object")?.unwrap_or_else(|| "Nuclei".into());
            let box_size = lo.u64("box_size", 128)? as usize;
            let normalization = Normalization::parse(
                &lo.str("normalization")?
                    .unwrap_or_else(|| "deepprofiler_legacy".into()),
            )?;
            lo.finish(&mut unknown);
            DataSource::Images {
                metadata: rel(metadata),
                images: rel(images),
                locations: rel(locations),
                channels,
                object,
                box_size,
                normalization,
            }
        };
        if let Some(m) = md {
            m.finish(&mut unknown);
        }
        ds.finish(&mut unknown);

        let mut o = TrainerOptions::default();
        let (mut initialization, mut padding, mut bn_eps) = (None, Padding::Symmetric, 1e-5f32);
        let mut split = SplitKind::Cells {
            train_fraction: 0.6,
        };
        if let Some(mut tr) = top.sub("train")? {
            o.seed = tr.u64("seed", 0)?;
            if let Some(mut m) = tr.sub("model")? {
                initialization = match m.str("initialization")?.as_deref() {
                    None | Some("random") => None,
                    Some(p) => Some(rel(p.to_string())),
                };
                if let Some(p) = m.str("padding")? {
                    padding = Padding::parse(&p)?;
                }
                bn_eps = m.f64("bn_eps", 1e-5)? as f32;
                o.epochs = m.u64("epochs", o.epochs)?;
                if let Some(mut p) = m.sub("params")? {
                    o.lr = p.f64("learning_rate", o.lr)?;
                    o.batch_size = p.u64("batch_size", o.batch_size as u64)? as usize;
                    o.optimizer = match p.str("optimizer")?.as_deref() {
                        None | Some("sgd") => OptimizerKind::Sgd,
                        Some("adamw") => OptimizerKind::AdamW,
                        Some(x) => {
                            return Err(Error::InvalidArgument(format!(
                                "config: train.model.params.optimizer {x:?} is not sgd or adamw"
                            )))
                        }
                    };
                    o.momentum = p.f64("momentum", o.momentum)?;
                    o.nesterov = p.bool("nesterov", o.nesterov)?;
                    o.weight_decay = p.f64("weight_decay", o.weight_decay)?;
                    o.decay_scope = match p.str("decay")?.as_deref() {
                        None | Some("all") => DecayScope::All,
                        Some("kernels") => DecayScope::Kernels,
                        Some(x) => {
                            return Err(Error::InvalidArgument(format!(
                                "config: train.model.params.decay {x:?} is not all or kernels"
                            )))
                        }
                    };
                    o.label_smoothing = p.f64("label_smoothing", o.label_smoothing)?;
                    o.regularisation.dropout = p.f64("dropout", o.regularisation.dropout)?;
                    o.regularisation.drop_connect_rate =
                        p.f64("drop_connect_rate", o.regularisation.drop_connect_rate)?;
                    o.regularisation.bn_momentum =
                        p.f64("bn_momentum", o.regularisation.bn_momentum)?;
                    o.clip_grad_norm = p.opt_f64("clip_grad_norm")?;
                    o.warmup_epochs = p.u64("warmup_epochs", 0)?;
                    o.betas.0 = p.f64("beta1", o.betas.0)?;
                    o.betas.1 = p.f64("beta2", o.betas.1)?;
                    p.finish(&mut unknown);
                }
                if let Some(mut d) = m.sub("domain_adversarial")? {
                    let def = DomainAdversarial::default();
                    let lam = d.f64("lambda", 1.0)?;
                    let lambda = match d.str("lambda_schedule")?.as_deref() {
                        None | Some("constant") => GrlLambda::Constant(lam),
                        Some("ganin") => GrlLambda::Ganin { max: lam },
                        Some(x) => {
                            return Err(Error::InvalidArgument(format!(
                                "config: train.model.domain_adversarial.lambda_schedule {x:?} is not constant or ganin"
                            )))
                        }
                    };
                    o.domain_adversarial = Some(DomainAdversarial {
                        domains: d.u64("domains", 0)? as usize,
                        lambda,
                        weight: d.f64("weight", def.weight)?,
                        hidden: d.usizes("hidden")?.unwrap_or(def.hidden),
                    });
                    d.finish(&mut unknown);
                }
                if let Some(mut g) = m.sub("mil")? {
                    let def = MilOptions::default();
                    o.mil = Some(MilOptions {
                        bag_size: g.u64("bag_size", def.bag_size as u64)? as usize,
                        min_treated: g.u64("min_treated", def.min_treated as u64)? as usize,
                        max_treated: g.u64("max_treated", def.max_treated as u64)? as usize,
                        control_classes: g
                            .usizes("control_classes")?
                            .unwrap_or_default()
                            .into_iter()
                            .map(|c| c as u32)
                            .collect(),
                        attention_dim: g.u64("attention_dim", def.attention_dim as u64)? as usize,
                    });
                    g.finish(&mut unknown);
                }
                if let Some(mut s) = m.sub("lr_schedule")? {
                    o.schedule = match s.str("name")?.as_deref() {
                        None | Some("constant") => Schedule::Constant,
                        Some("step") => Schedule::Step {
                            step_size: s.u64("step_size", 10)?,
                            gamma: s.f64("gamma", 0.1)?,
                        },
                        Some("cosine") => Schedule::Cosine {
                            t_max: s.u64("t_max", o.epochs)?,
                            eta_min: s.f64("eta_min", 0.0)?,
                        },
                        Some("exponential") => Schedule::Exponential {
                            gamma: s.f64("gamma", 0.95)?,
                        },
                        Some(x) => {
                            return Err(Error::InvalidArgument(format!(
                                "config: train.model.lr_schedule.name {x:?} is not constant, step, cosine or exponential"
                            )))
                        }
                    };
                    s.finish(&mut unknown);
                }
                m.finish(&mut unknown);
            }
            if let Some(mut p) = tr.sub("partition")? {
                split = match p.str("split")?.as_deref() {
                    None | Some("cells") => SplitKind::Cells {
                        train_fraction: p.f64("train_fraction", 0.6)?,
                    },
                    Some("plates") => SplitKind::Plates {
                        validation_plates: p.strings("validation_plates")?.unwrap_or_default(),
                    },
                    Some("none") => SplitKind::None,
                    Some(x) => {
                        return Err(Error::InvalidArgument(format!(
                            "config: train.partition.split {x:?} is not cells, plates or none"
                        )))
                    }
                };
                p.finish(&mut unknown);
            }
            if let Some(mut s) = tr.sub("sampling")? {
                o.workers = s.u64("workers", o.workers as u64)? as usize;
                o.prefetch = s.u64("prefetch", o.prefetch as u64)? as usize;
                if !s.bool("augment", true)? {
                    o.augmentation = Augmentation::none();
                }
                s.finish(&mut unknown);
            }
            tr.finish(&mut unknown);
        }
        let output = match top.sub("output")? {
            Some(mut out) => {
                let d = out.str("dir")?.unwrap_or_else(|| "training".into());
                out.finish(&mut unknown);
                rel(d)
            }
            None => base.join("training"),
        };
        top.finish(&mut unknown);
        if !unknown.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "config: unknown key{} {}",
                if unknown.len() > 1 { "s" } else { "" },
                unknown.join(", ")
            )));
        }
        o.validate()?;
        Ok(TrainConfig {
            source,
            label_field,
            initialization,
            padding,
            bn_eps,
            options: o,
            split,
            output,
        })
    }
}

fn prefix(e: Error, p: &str) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{p}{m}")),
        Error::Format(m) => Error::Format(format!("{p}{m}")),
        other => other,
    }
}

/// A loaded training set: crops, class names (sorted), and each crop's plate and well names.
pub struct LoadedData {
    pub dataset: Dataset,
    pub classes: Vec<String>,
    pub plates: Vec<String>,
    pub wells: Vec<String>,
}

/// Loads the crops the config names (images + locations are cropped as `profile` crops them).
/// With `domain_adversarial`, every crop's domain label is its plate's index among the sorted
/// plate names.
pub fn load_data(
    cfg: &TrainConfig,
    progress: &mut (dyn FnMut(usize, usize) + Send),
) -> Result<LoadedData> {
    let mut data = load_crops(cfg, progress)?;
    if cfg.options.domain_adversarial.is_some() {
        let (_, domains) = index_labels(&data.plates);
        if domains.len() != data.dataset.n {
            return Err(Error::Internal(format!(
                "{} plate names for {} crops",
                domains.len(),
                data.dataset.n
            )));
        }
        data.dataset.domains = Some(domains);
    }
    Ok(data)
}

fn load_crops(
    cfg: &TrainConfig,
    progress: &mut (dyn FnMut(usize, usize) + Send),
) -> Result<LoadedData> {
    match &cfg.source {
        DataSource::Images {
            metadata,
            images,
            locations,
            channels,
            object,
            box_size,
            normalization,
        } => {
            let mut po = ProfileOptions::new(
                metadata,
                images,
                locations,
                &cfg.output.join(".no-features"),
            );
            po.channels = channels.clone();
            po.locations_object = object.clone();
            po.box_size = *box_size;
            let p = plan(&po)?;
            let c = p.channels.len();
            let per = c * box_size * box_size;
            // Sites are decoded and cropped in parallel (each worker holds one site's images).
            use rayon::prelude::*;
            let total = p.sites.len();
            let done = std::sync::atomic::AtomicUsize::new(0);
            let progress = std::sync::Mutex::new(progress);
            let per_site: Vec<Result<(Vec<f32>, usize, String)>> = crate::threads::install(|| {
                p.sites
                    .par_iter()
                    .map(|site| {
                        let label = site
                            .metadata
                            .iter()
                            .find(|(key, _)| key == &cfg.label_field)
                            .map(|(_, v)| v.trim().to_string())
                            .ok_or_else(|| {
                                Error::MissingKey(format!(
                                    "{}: no column {:?} (dataset.metadata.label_field)",
                                    metadata.display(),
                                    cfg.label_field
                                ))
                            })?;
                        let mut out = vec![0f32; site.centers.len() * per];
                        if !site.centers.is_empty() {
                            let (px, h, w) = load_site_images(&site.images)?;
                            let image = match &px {
                                crate::io::image::Pixels::U8(v) => {
                                    Image::new(ImageData::U8(v), c, h, w)?
                                }
                                crate::io::image::Pixels::U16(v) => {
                                    Image::new(ImageData::U16(v), c, h, w)?
                                }
                                crate::io::image::Pixels::F32(v) => {
                                    Image::new(ImageData::F32(v), c, h, w)?
                                }
                            };
                            crop_cells_into(
                                &image,
                                &site.centers,
                                *box_size,
                                *normalization,
                                &mut out,
                            )?;
                        }
                        let k = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        if let Ok(mut f) = progress.lock() {
                            (*f)(k, total);
                        }
                        Ok((out, site.centers.len(), label))
                    })
                    .collect()
            });
            let mut names = Vec::new();
            let (mut data, mut plates, mut wells) = (Vec::new(), Vec::new(), Vec::new());
            for (site, r) in p.sites.iter().zip(per_site) {
                let (crops, n, label) = r?;
                data.extend_from_slice(&crops);
                for _ in 0..n {
                    names.push(label.clone());
                    plates.push(site.plate.clone());
                    wells.push(format!("{}/{}", site.plate, site.well));
                }
            }
            let (classes, labels) = index_labels(&names);
            Ok(LoadedData {
                dataset: Dataset::new(data, c, *box_size, *box_size, labels)?,
                classes,
                plates,
                wells,
            })
        }
        DataSource::Crops { crops, labels } => {
            let bytes = std::fs::read(crops)
                .map_err(|e| Error::Io(format!("cannot read {}: {e}", crops.display())))?;
            let arr = crate::io::npz::decode_npy(&bytes, &crops.display().to_string())?;
            let s = arr.shape().to_vec();
            if s.len() != 4 {
                return Err(Error::Shape(format!(
                    "{}: crops must be (N, C, H, W), got shape {s:?}",
                    crops.display()
                )));
            }
            let data = match arr {
                crate::io::npz::NpyArray::F32 { data, .. } => data,
                crate::io::npz::NpyArray::F64 { data, .. } => {
                    data.into_iter().map(|v| v as f32).collect()
                }
                _ => {
                    return Err(Error::DType(format!(
                        "{}: crops must be float32 or float64",
                        crops.display()
                    )))
                }
            };
            let table = read_csv(labels)?;
            let col = table.column(&cfg.label_field)?;
            if table.rows.len() != s[0] {
                return Err(Error::Shape(format!(
                    "{} has {} rows for {} crops in {}",
                    labels.display(),
                    table.rows.len(),
                    s[0],
                    crops.display()
                )));
            }
            let names: Vec<String> = table
                .rows
                .iter()
                .map(|r| r[col].trim().to_string())
                .collect();
            let pick = |name: &str| -> Vec<String> {
                match table.column(name) {
                    Ok(c) => table.rows.iter().map(|r| r[c].trim().to_string()).collect(),
                    Err(_) => vec![String::new(); table.rows.len()],
                }
            };
            let plates = pick("Metadata_Plate");
            let wells: Vec<String> = plates
                .iter()
                .zip(pick("Metadata_Well"))
                .map(|(p, w)| format!("{p}/{w}"))
                .collect();
            let (classes, lab) = index_labels(&names);
            progress(1, 1);
            Ok(LoadedData {
                dataset: Dataset::new(data, s[1], s[2], s[3], lab)?,
                classes,
                plates,
                wells,
            })
        }
    }
}

/// Sorted distinct names and each item's index among them.
fn index_labels(names: &[String]) -> (Vec<String>, Vec<u32>) {
    let mut set: BTreeMap<&str, u32> = names.iter().map(|n| (n.as_str(), 0)).collect();
    for (i, v) in set.values_mut().enumerate() {
        *v = i as u32;
    }
    let labels = names.iter().map(|n| set[n.as_str()]).collect();
    (set.keys().map(|k| k.to_string()).collect(), labels)
}

/// Train / validation indices for the configured split (seeded by the training seed).
pub fn split_indices(cfg: &TrainConfig, data: &LoadedData) -> Result<(Vec<usize>, Vec<usize>)> {
    let ids = |names: &[String]| -> Vec<u32> {
        let mut map: BTreeMap<&str, u32> = BTreeMap::new();
        names
            .iter()
            .map(|n| {
                let next = map.len() as u32;
                *map.entry(n.as_str()).or_insert(next)
            })
            .collect()
    };
    match &cfg.split {
        SplitKind::None => Ok(((0..data.dataset.n).collect(), Vec::new())),
        SplitKind::Cells { train_fraction } => {
            let mut rng = super::prefetch::epoch_rng(cfg.options.seed, u64::MAX - 1);
            let s = leave_cells_out(&ids(&data.wells), *train_fraction, &mut rng)?;
            Ok((s.train, s.val))
        }
        SplitKind::Plates { validation_plates } => {
            let plate_ids = ids(&data.plates);
            let mut val = Vec::new();
            for p in validation_plates {
                let i = data.plates.iter().position(|x| x == p).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "config: validation plate {p:?} is not in the dataset"
                    ))
                })?;
                val.push(plate_ids[i]);
            }
            let s = leave_plates_out(&plate_ids, &data.dataset.labels, &ids(&data.wells), &val)?;
            Ok((s.split.train, s.split.val))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"{"dataset": {"crops": {"path": "c.npy", "labels": "l.csv"}},
        "train": {"model": MODEL}}"#;

    fn parse(model: &str) -> Result<TrainConfig> {
        TrainConfig::parse(&BASE.replace("MODEL", model), Path::new("/tmp"))
    }

    #[test]
    fn domain_adversarial_and_mil_sections() {
        let c = parse(
            r#"{"domain_adversarial": {"domains": 5, "lambda": 0.5, "lambda_schedule": "ganin",
                 "weight": 0.3, "hidden": [64, 32]},
                "mil": {"bag_size": 8, "min_treated": 2, "max_treated": 6,
                        "control_classes": [0, 3], "attention_dim": 16}}"#,
        )
        .unwrap();
        assert_eq!(
            c.options.domain_adversarial,
            Some(DomainAdversarial {
                domains: 5,
                lambda: GrlLambda::Ganin { max: 0.5 },
                weight: 0.3,
                hidden: vec![64, 32],
            })
        );
        assert_eq!(
            c.options.mil,
            Some(MilOptions {
                bag_size: 8,
                min_treated: 2,
                max_treated: 6,
                control_classes: vec![0, 3],
                attention_dim: 16,
            })
        );
        // Defaults: the paper's head and bags.
        let c = parse(r#"{"domain_adversarial": {"domains": 2}, "mil": {"control_classes": [1]}}"#)
            .unwrap();
        let d = c.options.domain_adversarial.unwrap();
        assert_eq!(
            (d.hidden, d.lambda, d.weight),
            (vec![1024, 512, 128], GrlLambda::Constant(1.0), 1.0)
        );
        assert_eq!(c.options.mil.unwrap().bag_size, 16);
        assert_eq!(parse("{}").unwrap().options.mil, None);
        // Errors name the key.
        let e = parse(r#"{"mil": {"control_classes": [1], "bagsize": 3}}"#).unwrap_err();
        assert!(e.to_string().contains("train.model.mil.bagsize"), "{e}");
        let e = parse(r#"{"mil": {}}"#).unwrap_err();
        assert!(e.to_string().contains("control_classes is empty"), "{e}");
        let e = parse(r#"{"domain_adversarial": {}}"#).unwrap_err();
        assert!(e.to_string().contains("domains must be at least 2"), "{e}");
        let e =
            parse(r#"{"domain_adversarial": {"domains": 2, "lambda_schedule": "x"}}"#).unwrap_err();
        assert!(e.to_string().contains("lambda_schedule"), "{e}");
        let e = parse(r#"{"mil": {"control_classes": ["DMSO"]}}"#).unwrap_err();
        assert!(
            e.to_string().contains("train.model.mil.control_classes"),
            "{e}"
        );
    }
}
