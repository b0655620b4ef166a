//! Aggregation of single-cell features into site, well and treatment profiles (REFERENCE §4):
//! cells → **median** per site (rows holding NaN or ±∞ dropped) → **mean** of sites per well →
//! **mean** of wells per treatment. The operation at each level is an option (presets "paper",
//! "mean", "median").
//!
//! Two entry points share one kernel, so they give bit-identical profiles:
//! - `aggregate_cells`: an in-memory f32 (or f64) cell matrix with its metadata columns;
//! - `aggregate_npz_dir` / `aggregate_npz_files`: the per-site `.npz` files `phenocore profile`
//!   writes, streamed one site file per worker thread at a time, so memory is bounded by a few
//!   sites whatever the total cell count.
//!
//! Groups come out sorted by their keys like pandas' `groupby` (a key column whose values are all
//! numbers sorts numerically, otherwise by text). The output tables keep the key columns, then
//! every other metadata column whose value is constant within each group (so control flags or MoA
//! annotations reach the treatment level), then counts (`Metadata_Object_Count`: cells used;
//! `Metadata_Site_Count`, `Metadata_Well_Count`) unless `counts` is off.
//!
//! A site whose cells all hold NaN (or that has no cells) has no profile: it is left out of its
//! well's mean and listed in `Aggregated::empty` (or is an error with `EmptyPolicy::Error`), never
//! a silent row of NaN. The same holds for a well or treatment all of whose sites are empty.
//!
//! Medians use `select_nth_unstable` per feature column (O(cells), no sort); the two middle values
//! of an even count are averaged in f64, and means use Kahan summation in f64 in row order, as
//! pandas' `groupby().median()` / `.mean()` do, so pycytominer's `aggregate` agrees to rounding.

use crate::error::{Error, Result};
use crate::io::npz::{read_site, SiteFeatures};
use crate::io::profiles::{Profiles, METADATA_PREFIX};
use rayon::prelude::*;
use std::cmp::Ordering;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Column added with the number of cells a profile averages.
pub const OBJECT_COUNT: &str = "Metadata_Object_Count";
/// Column added at the well and treatment levels with the number of (non-empty) sites.
pub const SITE_COUNT: &str = "Metadata_Site_Count";
/// Column added at the treatment level with the number of (non-empty) wells.
pub const WELL_COUNT: &str = "Metadata_Well_Count";

/// How the rows of one group become one profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduce {
    Median,
    Mean,
}

impl Reduce {
    /// `"median"` or `"mean"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "median" => Ok(Reduce::Median),
            "mean" => Ok(Reduce::Mean),
            _ => Err(Error::InvalidArgument(format!(
                "unknown aggregation operation {s:?}; expected \"median\" or \"mean\""
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Reduce::Median => "median",
            Reduce::Mean => "mean",
        }
    }
}

/// What a NaN in the features does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NanPolicy {
    /// A row holding any NaN or ±∞ is dropped (REFERENCE §4; default).
    DropRows,
    /// pandas / pycytominer: each feature skips its own NaN values (∞ kept); a feature with no
    /// values in a group is NaN there.
    PerFeature,
}

/// What a group with no usable rows does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EmptyPolicy {
    /// Leave it out and list it in `Aggregated::empty` (default).
    Report,
    /// Fail with an error naming it.
    Error,
}

/// Aggregation levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Site,
    Well,
    Treatment,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Site => "site",
            Level::Well => "well",
            Level::Treatment => "treatment",
        }
    }

    /// `"site"`, `"well"` or `"treatment"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "site" => Ok(Level::Site),
            "well" => Ok(Level::Well),
            "treatment" => Ok(Level::Treatment),
            _ => Err(Error::InvalidArgument(format!(
                "unknown aggregation level {s:?}; expected \"site\", \"well\" or \"treatment\""
            ))),
        }
    }
}

/// Names `AggregateOptions::preset` accepts.
pub const PRESETS: [&str; 3] = ["paper", "mean", "median"];

/// Options of the site → well → treatment chain. `Default` is the "paper" preset.
#[derive(Clone, Debug, PartialEq)]
pub struct AggregateOptions {
    pub plate: String,
    pub well: String,
    /// None: all cells of a well form one site.
    pub site: Option<String>,
    /// None: stop at wells.
    pub treatment: Option<String>,
    pub site_op: Reduce,
    pub well_op: Reduce,
    pub treatment_op: Reduce,
    pub nan: NanPolicy,
    pub on_empty: EmptyPolicy,
    /// Add `Metadata_Object_Count` / `Metadata_Site_Count` / `Metadata_Well_Count`.
    pub counts: bool,
    /// Metadata columns carried to the outputs (when constant within groups); None = all. For the
    /// npz entry points None means the site metadata keys starting with `Metadata_` plus the key
    /// columns (the other entries there are image paths and phenocore settings).
    pub metadata_columns: Option<Vec<String>>,
}

impl Default for AggregateOptions {
    fn default() -> Self {
        AggregateOptions {
            plate: "Metadata_Plate".into(),
            well: "Metadata_Well".into(),
            site: Some("Metadata_Site".into()),
            treatment: Some("Metadata_Treatment".into()),
            // REFERENCE §4 (CP-CNN paper): site median, well mean, treatment mean.
            site_op: Reduce::Median,
            well_op: Reduce::Mean,
            treatment_op: Reduce::Mean,
            nan: NanPolicy::DropRows,
            on_empty: EmptyPolicy::Report,
            counts: true,
            metadata_columns: None,
        }
    }
}

impl AggregateOptions {
    /// "paper" (median / mean / mean), "mean" (mean everywhere) or "median" (median everywhere);
    /// other fields at their defaults.
    pub fn preset(name: &str) -> Result<Self> {
        let mut o = AggregateOptions::default();
        o.set_preset(name)?;
        Ok(o)
    }

    /// Sets the three operations from a preset name, leaving the other fields as they are.
    pub fn set_preset(&mut self, name: &str) -> Result<()> {
        let (s, w, t) = match name.trim().to_ascii_lowercase().as_str() {
            "paper" => (Reduce::Median, Reduce::Mean, Reduce::Mean),
            "mean" => (Reduce::Mean, Reduce::Mean, Reduce::Mean),
            "median" => (Reduce::Median, Reduce::Median, Reduce::Median),
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown aggregation preset {name:?}; expected one of {}",
                    PRESETS.join(", ")
                )))
            }
        };
        (self.site_op, self.well_op, self.treatment_op) = (s, w, t);
        Ok(())
    }

    fn site_keys(&self) -> Vec<&str> {
        let mut k = vec![self.plate.as_str(), self.well.as_str()];
        if let Some(s) = &self.site {
            k.push(s);
        }
        k
    }

    fn check(&self) -> Result<()> {
        let mut names: Vec<&str> = self.site_keys();
        if let Some(t) = &self.treatment {
            names.push(t);
        }
        for (i, n) in names.iter().enumerate() {
            if n.is_empty() {
                return Err(Error::InvalidArgument(
                    "aggregation: a key column name is empty".into(),
                ));
            }
            if names[..i].contains(n) {
                return Err(Error::InvalidArgument(format!(
                    "aggregation: column {n:?} is named for two levels"
                )));
            }
        }
        Ok(())
    }
}

/// A group that got no profile: all its rows held NaN, or it had none.
#[derive(Clone, Debug, PartialEq)]
pub struct EmptyGroup {
    pub level: Level,
    /// (key column, value) pairs naming the group.
    pub key: Vec<(String, String)>,
    /// Input rows it had (cells for a site, site profiles for a well, ...), all unusable.
    pub rows: usize,
}

impl EmptyGroup {
    /// E.g. `site Metadata_Plate=P1, Metadata_Well=A01, Metadata_Site=3 (12 rows, all with NaN)`.
    pub fn label(&self) -> String {
        let key: Vec<String> = self.key.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let why = if self.rows == 0 {
            "no rows".to_string()
        } else if self.level == Level::Site {
            format!("{} cells, all with NaN", self.rows)
        } else {
            format!("{} rows, all empty or NaN", self.rows)
        };
        format!("{} {} ({why})", self.level.name(), key.join(", "))
    }
}

/// The profiles of every level.
#[derive(Clone, Debug, PartialEq)]
pub struct Aggregated {
    pub sites: Profiles,
    pub wells: Profiles,
    /// None when `AggregateOptions::treatment` is None.
    pub treatments: Option<Profiles>,
    /// Cells read.
    pub cells: usize,
    /// Cells dropped for holding NaN/∞ (`NanPolicy::DropRows`).
    pub dropped_cells: usize,
    /// Groups left out for having no usable rows.
    pub empty: Vec<EmptyGroup>,
}

impl Aggregated {
    pub fn level(&self, level: Level) -> Option<&Profiles> {
        match level {
            Level::Site => Some(&self.sites),
            Level::Well => Some(&self.wells),
            Level::Treatment => self.treatments.as_ref(),
        }
    }

    pub fn into_level(self, level: Level) -> Option<Profiles> {
        match level {
            Level::Site => Some(self.sites),
            Level::Well => Some(self.wells),
            Level::Treatment => self.treatments,
        }
    }
}

/// Feature values the kernel reduces (f32 cells, f64 profiles).
pub trait FeatureValue: Copy + Send + Sync + 'static {
    /// An unsigned integer ordered like `total_cmp` orders the values (medians select on it).
    type Key: Ord + Copy + Send + Sync + Default;
    fn to_f64(self) -> f64;
    fn is_nan(self) -> bool;
    fn is_finite(self) -> bool;
    fn key(self) -> Self::Key;
    fn from_key(k: Self::Key) -> Self;
}

impl FeatureValue for f32 {
    type Key = u32;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    fn is_finite(self) -> bool {
        f32::is_finite(self)
    }
    fn key(self) -> u32 {
        let b = self.to_bits();
        if b >> 31 == 1 {
            !b
        } else {
            b | 0x8000_0000
        }
    }
    fn from_key(k: u32) -> f32 {
        f32::from_bits(if k >> 31 == 1 { k & 0x7fff_ffff } else { !k })
    }
}

impl FeatureValue for f64 {
    type Key = u64;
    fn to_f64(self) -> f64 {
        self
    }
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    fn is_finite(self) -> bool {
        f64::is_finite(self)
    }
    fn key(self) -> u64 {
        let b = self.to_bits();
        if b >> 63 == 1 {
            !b
        } else {
            b | 0x8000_0000_0000_0000
        }
    }
    fn from_key(k: u64) -> f64 {
        f64::from_bits(if k >> 63 == 1 {
            k & 0x7fff_ffff_ffff_ffff
        } else {
            !k
        })
    }
}

/// Single cells in memory: a row-major `n × n_features` matrix and metadata columns of n values.
#[derive(Clone, Copy, Debug)]
pub struct Cells<'a, T, S> {
    pub features: &'a [T],
    pub n_features: usize,
    /// Empty = `feature_0`, `feature_1`, ...
    pub feature_names: &'a [String],
    pub meta_names: &'a [S],
    /// `meta[column][row]`.
    pub meta: &'a [Vec<S>],
}

// ---- the kernel ---------------------------------------------------------------------------------

/// Columns reduced together: the gather buffer of one block is `rows × COL_BLOCK` values.
const COL_BLOCK: usize = 64;
/// A group this large (rows × features) is split over threads by column blocks.
const PAR_GROUP_WORK: usize = 1 << 18;

fn row_ok<T: FeatureValue>(row: &[T]) -> bool {
    row.iter().all(|v| v.is_finite())
}

/// Median of the values whose keys are `v` (no NaN), averaging the two middle values of an even
/// count; NaN when empty.
fn median_in_place<T: FeatureValue>(v: &mut [T::Key]) -> f64 {
    let m = v.len();
    if m == 0 {
        return f64::NAN;
    }
    let k = m / 2;
    v.select_nth_unstable(k);
    let hi = T::from_key(v[k]).to_f64();
    if m % 2 == 1 {
        return hi;
    }
    let lo = v[..k]
        .iter()
        .copied()
        .max()
        .map_or(hi, |k| T::from_key(k).to_f64());
    (lo + hi) / 2.0
}

/// Reduces columns `j0..j0 + out.len()` of `rows` of `data` (row-major, `d` wide) into `out`.
fn reduce_block<T: FeatureValue>(
    data: &[T],
    d: usize,
    rows: &[u32],
    j0: usize,
    op: Reduce,
    nan: NanPolicy,
    out: &mut [f64],
) {
    let b = out.len();
    match op {
        Reduce::Mean => {
            // Kahan summation in row order, as pandas' group_mean.
            let mut sum = vec![0.0f64; b];
            let mut comp = vec![0.0f64; b];
            let mut count = vec![0usize; b];
            for &r in rows {
                let src = &data[r as usize * d + j0..r as usize * d + j0 + b];
                for j in 0..b {
                    let v = src[j];
                    if nan == NanPolicy::PerFeature && v.is_nan() {
                        continue;
                    }
                    let y = v.to_f64() - comp[j];
                    let t = sum[j] + y;
                    comp[j] = (t - sum[j]) - y;
                    sum[j] = t;
                    count[j] += 1;
                }
            }
            for j in 0..b {
                out[j] = if count[j] == 0 {
                    f64::NAN
                } else {
                    sum[j] / count[j] as f64
                };
            }
        }
        Reduce::Median => {
            let m = rows.len();
            // Column-major gather of the block as order keys, NaN left out: column j holds
            // count[j] keys at buf[j * m..].
            let mut buf: Vec<T::Key> = vec![T::Key::default(); m * b];
            let mut count = vec![m; b];
            if nan == NanPolicy::DropRows {
                // The rows are finite: a plain transpose.
                for (i, &r) in rows.iter().enumerate() {
                    let src = &data[r as usize * d + j0..r as usize * d + j0 + b];
                    for (j, &v) in src.iter().enumerate() {
                        buf[j * m + i] = v.key();
                    }
                }
            } else {
                count.fill(0);
                for &r in rows {
                    let src = &data[r as usize * d + j0..r as usize * d + j0 + b];
                    for (j, &v) in src.iter().enumerate() {
                        buf[j * m + count[j]] = v.key();
                        count[j] += !v.is_nan() as usize;
                    }
                }
            }
            for j in 0..b {
                out[j] = median_in_place::<T>(&mut buf[j * m..j * m + count[j]]);
            }
        }
    }
}

/// Reduces `rows` of `data` into `out` (`d` values). Returns the rows used (0 = empty group).
fn reduce_rows<T: FeatureValue>(
    data: &[T],
    d: usize,
    rows: &[u32],
    op: Reduce,
    nan: NanPolicy,
    out: &mut [f64],
) -> usize {
    let valid: Vec<u32>;
    let rows = match nan {
        NanPolicy::DropRows => {
            valid = rows
                .iter()
                .copied()
                .filter(|&r| row_ok(&data[r as usize * d..(r as usize + 1) * d]))
                .collect();
            &valid[..]
        }
        NanPolicy::PerFeature => rows,
    };
    if rows.is_empty() {
        out.fill(f64::NAN);
        return 0;
    }
    if rows.len() * d >= PAR_GROUP_WORK {
        out.par_chunks_mut(COL_BLOCK)
            .enumerate()
            .for_each(|(k, o)| reduce_block(data, d, rows, k * COL_BLOCK, op, nan, o));
    } else {
        for (k, o) in out.chunks_mut(COL_BLOCK).enumerate() {
            reduce_block(data, d, rows, k * COL_BLOCK, op, nan, o);
        }
    }
    rows.len()
}

// ---- grouping -----------------------------------------------------------------------------------

/// Rows grouped by key, groups in key order.
struct Groups {
    /// Distinct keys in output order (one value per key column).
    keys: Vec<Vec<String>>,
    /// Row indices, grouped: group g is `rows[offsets[g]..offsets[g + 1]]`, in input order.
    rows: Vec<u32>,
    offsets: Vec<usize>,
}

impl Groups {
    fn len(&self) -> usize {
        self.keys.len()
    }
    fn members(&self, g: usize) -> &[u32] {
        &self.rows[self.offsets[g]..self.offsets[g + 1]]
    }
}

/// Groups `n` rows by the key columns; empty key values are errors naming the column and row
/// (`row_name(i)` says what a row is).
fn group_rows<S: AsRef<str>>(
    n: usize,
    key_names: &[&str],
    key_cols: &[&[S]],
    row_name: &dyn Fn(usize) -> String,
) -> Result<Groups> {
    if n > u32::MAX as usize {
        return Err(Error::Shape(format!(
            "aggregation: {n} rows exceed the {} rows one call takes",
            u32::MAX
        )));
    }
    let mut ids: HashMap<Vec<&str>, u32> = HashMap::new();
    let mut firsts: Vec<Vec<&str>> = Vec::new();
    let mut gid = Vec::with_capacity(n);
    let mut key: Vec<&str> = Vec::with_capacity(key_cols.len());
    let mut prev: Option<u32> = None;
    for i in 0..n {
        key.clear();
        for (c, col) in key_cols.iter().enumerate() {
            let v = col[i].as_ref();
            if v.trim().is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "aggregation: metadata column {:?} is empty at {}",
                    key_names[c],
                    row_name(i)
                )));
            }
            key.push(v);
        }
        let id = match prev {
            Some(p) if firsts[p as usize] == key => p,
            _ => match ids.get(key.as_slice()) {
                Some(&id) => id,
                None => {
                    let id = firsts.len() as u32;
                    ids.insert(key.clone(), id);
                    firsts.push(key.clone());
                    id
                }
            },
        };
        prev = Some(id);
        gid.push(id);
    }
    // Key order: per column, numeric when every value is a number, else text.
    let numeric: Vec<bool> = (0..key_cols.len())
        .map(|c| {
            firsts
                .iter()
                .all(|k| k[c].trim().parse::<f64>().is_ok_and(|v| v.is_finite()))
        })
        .collect();
    let cmp = |a: &Vec<&str>, b: &Vec<&str>| -> Ordering {
        for c in 0..a.len() {
            let o = if numeric[c] {
                let x: f64 = a[c].trim().parse().unwrap_or(0.0);
                let y: f64 = b[c].trim().parse().unwrap_or(0.0);
                x.total_cmp(&y).then_with(|| a[c].cmp(b[c]))
            } else {
                a[c].cmp(b[c])
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    };
    let mut order: Vec<u32> = (0..firsts.len() as u32).collect();
    order.sort_by(|&a, &b| cmp(&firsts[a as usize], &firsts[b as usize]));
    let mut rank = vec![0u32; firsts.len()];
    for (r, &g) in order.iter().enumerate() {
        rank[g as usize] = r as u32;
    }
    let g = firsts.len();
    let mut offsets = vec![0usize; g + 1];
    for &id in &gid {
        offsets[rank[id as usize] as usize + 1] += 1;
    }
    for k in 0..g {
        offsets[k + 1] += offsets[k];
    }
    let mut fill = offsets.clone();
    let mut rows = vec![0u32; n];
    for (i, &id) in gid.iter().enumerate() {
        let r = rank[id as usize] as usize;
        rows[fill[r]] = i as u32;
        fill[r] += 1;
    }
    let keys = order
        .iter()
        .map(|&o| firsts[o as usize].iter().map(|s| s.to_string()).collect())
        .collect();
    Ok(Groups {
        keys,
        rows,
        offsets,
    })
}

/// None when `col` is constant within each of the groups listed in `which`, else the first group
/// where it is not and two of its rows that differ.
fn first_difference<S: AsRef<str> + Sync>(
    col: &[S],
    groups: &Groups,
    which: &[usize],
) -> Option<(usize, u32, u32)> {
    which.iter().find_map(|&g| {
        let m = groups.members(g);
        let first = m[0];
        m.iter()
            .find(|&&r| col[r as usize].as_ref() != col[first as usize].as_ref())
            .map(|&r| (g, first, r))
    })
}

/// One level's result before counts are added.
struct LevelResult {
    profiles: Profiles,
    /// For each output row, the group index in `groups`.
    kept: Vec<usize>,
    used: Vec<usize>,
    groups: Groups,
    empty: Vec<EmptyGroup>,
}

/// Groups `data` by `keys`, reduces every group, keeps constant metadata columns.
#[allow(clippy::too_many_arguments)]
fn reduce_level<T: FeatureValue, S: AsRef<str> + Sync>(
    data: &[T],
    d: usize,
    feature_names: &[String],
    meta_names: &[&str],
    meta: &[&[S]],
    keys: &[&str],
    carry: &dyn Fn(&str) -> bool,
    op: Reduce,
    nan: NanPolicy,
    level: Level,
    row_name: &dyn Fn(usize) -> String,
) -> Result<LevelResult> {
    let n = meta.first().map_or(0, |c| c.len());
    let key_idx: Vec<usize> = keys
        .iter()
        .map(|k| {
            meta_names.iter().position(|m| m == k).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "aggregation: no metadata column {k:?} for the {} level (metadata columns: {})",
                    level.name(),
                    meta_names.join(", ")
                ))
            })
        })
        .collect::<Result<_>>()?;
    let key_cols: Vec<&[S]> = key_idx.iter().map(|&i| meta[i]).collect();
    let groups = group_rows(n, keys, &key_cols, row_name)?;
    let g = groups.len();
    let mut out = vec![0.0f64; g * d];
    let mut used = vec![0usize; g];
    crate::threads::install(|| {
        out.par_chunks_mut(d.max(1))
            .zip(used.par_iter_mut())
            .enumerate()
            .for_each(|(k, (o, u))| {
                *u = reduce_rows(data, d, groups.members(k), op, nan, o);
            })
    });
    let kept: Vec<usize> = (0..g).filter(|&k| used[k] > 0).collect();
    let empty: Vec<EmptyGroup> = (0..g)
        .filter(|&k| used[k] == 0)
        .map(|k| EmptyGroup {
            level,
            key: keys
                .iter()
                .map(|s| s.to_string())
                .zip(groups.keys[k].iter().cloned())
                .collect(),
            rows: groups.members(k).len(),
        })
        .collect();
    // Metadata: keys, then constant carried columns in input order.
    let carried: Vec<usize> = (0..meta_names.len())
        .filter(|i| !key_idx.contains(i) && carry(meta_names[*i]))
        .collect();
    let constant: Vec<bool> = crate::threads::install(|| {
        carried
            .par_iter()
            .map(|&c| first_difference(meta[c], &groups, &kept).is_none())
            .collect()
    });
    let mut out_names: Vec<String> = keys.iter().map(|s| s.to_string()).collect();
    let mut out_meta: Vec<Vec<String>> = (0..keys.len())
        .map(|c| kept.iter().map(|&k| groups.keys[k][c].clone()).collect())
        .collect();
    for (&c, _) in carried.iter().zip(&constant).filter(|(_, &k)| k) {
        out_names.push(meta_names[c].to_string());
        out_meta.push(
            kept.iter()
                .map(|&k| meta[c][groups.members(k)[0] as usize].as_ref().to_string())
                .collect(),
        );
    }
    let mut data_out = Vec::with_capacity(kept.len() * d);
    for &k in &kept {
        data_out.extend_from_slice(&out[k * d..(k + 1) * d]);
    }
    let profiles = Profiles::new(out_names, out_meta, feature_names.to_vec(), data_out)?;
    Ok(LevelResult {
        profiles,
        used: kept.iter().map(|&k| used[k]).collect(),
        kept,
        groups,
        empty,
    })
}

/// pycytominer's `aggregate(population_df, strata, operation=op)`: one level of grouping of a
/// profile table. Returns the grouped table (keys, constant metadata columns, features; no count
/// columns), the rows used per output row, and the groups left out for having no usable rows
/// (tagged `Level::Site`, the level one grouping stands for).
pub fn aggregate_profiles(
    p: &Profiles,
    strata: &[&str],
    op: Reduce,
    nan: NanPolicy,
) -> Result<(Profiles, Vec<usize>, Vec<EmptyGroup>)> {
    p.validate()?;
    if strata.is_empty() {
        return Err(Error::InvalidArgument(
            "aggregation: no strata (group key columns) given".into(),
        ));
    }
    if p.n_features() == 0 {
        return Err(Error::InvalidArgument(
            "aggregation: the table has no feature columns".into(),
        ));
    }
    let names: Vec<&str> = p.meta_names.iter().map(String::as_str).collect();
    let meta: Vec<&[String]> = p.meta.iter().map(Vec::as_slice).collect();
    let r = reduce_level(
        &p.data,
        p.n_features(),
        &p.feature_names,
        &names,
        &meta,
        strata,
        &|_| true,
        op,
        nan,
        Level::Site,
        &|i| format!("row {i}"),
    )?;
    Ok((r.profiles, r.used, r.empty))
}

// ---- the chain ----------------------------------------------------------------------------------

fn is_count_column(name: &str) -> bool {
    matches!(name, OBJECT_COUNT | SITE_COUNT | WELL_COUNT)
}

fn push_count(p: &mut Profiles, name: &str, values: &[usize]) {
    p.meta_names.push(name.to_string());
    p.meta.push(values.iter().map(|v| v.to_string()).collect());
}

/// Site profiles (with per-site cell counts) → wells → treatments.
fn wells_and_treatments(
    sites: Profiles,
    site_cells: Vec<usize>,
    opts: &AggregateOptions,
    cells: usize,
    dropped_cells: usize,
    mut empty: Vec<EmptyGroup>,
    empty_site_treatments: Vec<Option<String>>,
) -> Result<Aggregated> {
    let check_empty = |e: &[EmptyGroup]| -> Result<()> {
        match (opts.on_empty, e.first()) {
            (EmptyPolicy::Error, Some(first)) => Err(Error::InvalidArgument(format!(
                "aggregation: {} has no profile{}",
                first.label(),
                if e.len() > 1 {
                    format!(" (and {} more empty groups)", e.len() - 1)
                } else {
                    String::new()
                }
            ))),
            _ => Ok(()),
        }
    };
    check_empty(&empty)?;
    let d = sites.n_features();
    let names: Vec<&str> = sites.meta_names.iter().map(String::as_str).collect();
    let meta: Vec<&[String]> = sites.meta.iter().map(Vec::as_slice).collect();
    let not_count = |c: &str| !is_count_column(c);
    let (plate, well) = (opts.plate.as_str(), opts.well.as_str());
    let well_keys = [plate, well];
    let site_label = |i: usize| {
        format!(
            "site {}",
            sites
                .meta_names
                .iter()
                .zip(&sites.meta)
                .take(well_keys.len() + opts.site.is_some() as usize)
                .map(|(k, c)| format!("{k}={}", c[i]))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    // Sites hold no NaN under DropRows (empty ones are gone), so the policy only matters for
    // PerFeature, where pandas skips NaN at every level.
    let w = reduce_level(
        &sites.data,
        d,
        &sites.feature_names,
        &names,
        &meta,
        &well_keys,
        &not_count,
        opts.well_op,
        opts.nan,
        Level::Well,
        &site_label,
    )?;
    empty.extend(w.empty.iter().cloned());
    check_empty(&w.empty)?;
    let mut wells = w.profiles;
    // Wells all of whose sites were empty never reach the well grouping: report them (and
    // treatments all of whose wells were lost) here.
    let have_well: std::collections::HashSet<(&str, &str)> = wells.meta[0]
        .iter()
        .zip(&wells.meta[1])
        .map(|(p, w)| (p.as_str(), w.as_str()))
        .collect();
    let mut lost_wells: Vec<(EmptyGroup, Option<String>)> = Vec::new();
    for (e, t) in empty.iter().zip(&empty_site_treatments) {
        let (p, w) = (e.key[0].1.as_str(), e.key[1].1.as_str());
        if have_well.contains(&(p, w)) {
            continue;
        }
        match lost_wells
            .iter_mut()
            .find(|(g, _)| g.key[0].1 == p && g.key[1].1 == w)
        {
            Some((g, _)) => g.rows += 1,
            None => lost_wells.push((
                EmptyGroup {
                    level: Level::Well,
                    key: vec![
                        (plate.to_string(), p.to_string()),
                        (well.to_string(), w.to_string()),
                    ],
                    rows: 1,
                },
                t.clone(),
            )),
        }
    }
    let lost: Vec<EmptyGroup> = lost_wells.iter().map(|(g, _)| g.clone()).collect();
    check_empty(&lost)?;
    empty.extend(lost);
    let well_sites: Vec<usize> = w.used.clone();
    let well_cells: Vec<usize> = w
        .kept
        .iter()
        .map(|&g| {
            w.groups
                .members(g)
                .iter()
                .map(|&r| site_cells[r as usize])
                .sum()
        })
        .collect();
    let treatments = match &opts.treatment {
        None => None,
        Some(t) => {
            // The treatment must be one per well, else its mean of wells is meaningless.
            if let Some(c) = names.iter().position(|n| n == t) {
                if let Some((g, a, b)) = first_difference(meta[c], &w.groups, &w.kept) {
                    return Err(Error::InvalidArgument(format!(
                        "aggregation: {t} differs within well {plate}={}, {well}={} ({:?} at {} but {:?} at {})",
                        w.groups.keys[g][0],
                        w.groups.keys[g][1],
                        meta[c][a as usize],
                        site_label(a as usize),
                        meta[c][b as usize],
                        site_label(b as usize)
                    )));
                }
            } else {
                return Err(Error::InvalidArgument(format!(
                    "aggregation: no metadata column {t:?} for the treatment level (metadata columns: {}); name the treatment column or aggregate to wells only",
                    sites.meta_names.iter().filter(|n| !is_count_column(n)).cloned().collect::<Vec<_>>().join(", ")
                )));
            }
            let wnames: Vec<&str> = wells.meta_names.iter().map(String::as_str).collect();
            let wmeta: Vec<&[String]> = wells.meta.iter().map(Vec::as_slice).collect();
            let well_label = |i: usize| {
                format!(
                    "well {plate}={}, {well}={}",
                    wells.meta[0][i], wells.meta[1][i]
                )
            };
            let tr = reduce_level(
                &wells.data,
                d,
                &wells.feature_names,
                &wnames,
                &wmeta,
                &[t.as_str()],
                &not_count,
                opts.treatment_op,
                opts.nan,
                Level::Treatment,
                &well_label,
            )?;
            empty.extend(tr.empty.iter().cloned());
            check_empty(&tr.empty)?;
            let mut p = tr.profiles;
            let mut lost: Vec<EmptyGroup> = Vec::new();
            for (_, tv) in &lost_wells {
                let Some(tv) = tv else { continue };
                if p.meta[0].contains(tv) {
                    continue;
                }
                match lost.iter_mut().find(|g| g.key[0].1 == *tv) {
                    Some(g) => g.rows += 1,
                    None => lost.push(EmptyGroup {
                        level: Level::Treatment,
                        key: vec![(t.clone(), tv.clone())],
                        rows: 1,
                    }),
                }
            }
            lost.sort_by(|a, b| a.key[0].1.cmp(&b.key[0].1));
            check_empty(&lost)?;
            empty.extend(lost);
            if opts.counts {
                let sum = |v: &[usize]| -> Vec<usize> {
                    tr.kept
                        .iter()
                        .map(|&g| tr.groups.members(g).iter().map(|&r| v[r as usize]).sum())
                        .collect()
                };
                push_count(&mut p, WELL_COUNT, &tr.used);
                push_count(&mut p, SITE_COUNT, &sum(&well_sites));
                push_count(&mut p, OBJECT_COUNT, &sum(&well_cells));
            }
            Some(p)
        }
    };
    let mut sites = sites;
    if opts.counts {
        push_count(&mut wells, SITE_COUNT, &well_sites);
        push_count(&mut wells, OBJECT_COUNT, &well_cells);
        push_count(&mut sites, OBJECT_COUNT, &site_cells);
    }
    Ok(Aggregated {
        sites,
        wells,
        treatments,
        cells,
        dropped_cells,
        empty,
    })
}

fn check_no_count_columns<S: AsRef<str>>(names: &[S], opts: &AggregateOptions) -> Result<()> {
    if let Some(c) = names.iter().find(|n| is_count_column(n.as_ref())) {
        if opts.counts {
            return Err(Error::InvalidArgument(format!(
                "aggregation: the input has a metadata column {:?}, which aggregation adds; rename it or turn counts off",
                c.as_ref()
            )));
        }
    }
    Ok(())
}

fn default_feature_names(d: usize) -> Vec<String> {
    (0..d).map(|j| format!("feature_{j}")).collect()
}

/// Cells in memory → site, well and treatment profiles (module doc).
pub fn aggregate_cells<T: FeatureValue, S: AsRef<str> + Sync>(
    cells: &Cells<'_, T, S>,
    opts: &AggregateOptions,
) -> Result<Aggregated> {
    opts.check()?;
    let d = cells.n_features;
    if d == 0 {
        return Err(Error::InvalidArgument(
            "aggregation: n_features is 0".into(),
        ));
    }
    if !cells.features.len().is_multiple_of(d) {
        return Err(Error::Shape(format!(
            "aggregation: {} feature values is not a multiple of {d} features",
            cells.features.len()
        )));
    }
    let n = cells.features.len() / d;
    if cells.meta_names.len() != cells.meta.len() {
        return Err(Error::Shape(format!(
            "aggregation: {} metadata names but {} metadata columns",
            cells.meta_names.len(),
            cells.meta.len()
        )));
    }
    for (name, col) in cells.meta_names.iter().zip(cells.meta) {
        if col.len() != n {
            return Err(Error::Shape(format!(
                "aggregation: metadata column {:?} has {} rows but the features have {n}",
                name.as_ref(),
                col.len()
            )));
        }
    }
    let feature_names = if cells.feature_names.is_empty() {
        default_feature_names(d)
    } else if cells.feature_names.len() != d {
        return Err(Error::Shape(format!(
            "aggregation: {} feature names for {d} features",
            cells.feature_names.len()
        )));
    } else {
        cells.feature_names.to_vec()
    };
    let names: Vec<&str> = cells.meta_names.iter().map(|s| s.as_ref()).collect();
    if let Some((i, dup)) = names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))
    {
        return Err(Error::InvalidArgument(format!(
            "aggregation: metadata column {dup:?} appears twice (index {i})"
        )));
    }
    check_no_count_columns(&names, opts)?;
    let meta: Vec<&[S]> = cells.meta.iter().map(Vec::as_slice).collect();
    let keys = opts.site_keys();
    let carry = |c: &str| {
        opts.metadata_columns
            .as_ref()
            .is_none_or(|l| l.iter().any(|x| x == c))
            || c == opts.treatment.as_deref().unwrap_or("")
    };
    let s = reduce_level(
        cells.features,
        d,
        &feature_names,
        &names,
        &meta,
        &keys,
        &carry,
        opts.site_op,
        opts.nan,
        Level::Site,
        &|i| format!("cell row {i}"),
    )?;
    let dropped = match opts.nan {
        NanPolicy::DropRows => s.groups.rows.len() - s.used.iter().sum::<usize>(),
        NanPolicy::PerFeature => 0,
    };
    let treat_col = opts
        .treatment
        .as_ref()
        .and_then(|t| names.iter().position(|n| n == t));
    let mut has_profile = vec![false; s.groups.len()];
    s.kept.iter().for_each(|&k| has_profile[k] = true);
    let empty_treatments = (0..s.groups.len())
        .filter(|&k| !has_profile[k])
        .map(|k| {
            treat_col.map(|c| {
                meta[c][s.groups.members(k)[0] as usize]
                    .as_ref()
                    .to_string()
            })
        })
        .collect();
    wells_and_treatments(
        s.profiles,
        s.used,
        opts,
        n,
        dropped,
        s.empty,
        empty_treatments,
    )
}

// ---- streaming over per-site npz files ----------------------------------------------------------

/// Every `*.npz` file under `dir` (recursively), sorted by path.
pub fn list_site_files(dir: &Path) -> Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        let rd = std::fs::read_dir(dir)
            .map_err(|e| Error::Io(format!("cannot list {}: {e}", dir.display())))?;
        for entry in rd {
            let entry =
                entry.map_err(|e| Error::Io(format!("cannot list {}: {e}", dir.display())))?;
            let p = entry.path();
            let ft = entry
                .file_type()
                .map_err(|e| Error::Io(format!("cannot stat {}: {e}", p.display())))?;
            if ft.is_dir() {
                walk(&p, out)?;
            } else if p.extension().is_some_and(|e| e == "npz") {
                out.push(p);
            }
        }
        Ok(())
    }
    if !dir.is_dir() {
        return Err(Error::Io(format!("{} is not a directory", dir.display())));
    }
    let mut out = Vec::new();
    walk(dir, &mut out)?;
    out.sort();
    Ok(out)
}

/// Feature names from a site's `phenocore_layers` entry (`layer:dim,...` → `layer_0`, ...), or
/// `feature_j`.
fn site_feature_names(site: &SiteFeatures) -> Vec<String> {
    if let Some(layers) = site.metadata_value("phenocore_layers") {
        let mut names = Vec::with_capacity(site.dim);
        for part in layers.split(',') {
            let Some((l, k)) = part.rsplit_once(':') else {
                return default_feature_names(site.dim);
            };
            let Ok(k) = k.trim().parse::<usize>() else {
                return default_feature_names(site.dim);
            };
            names.extend((0..k).map(|j| format!("{}_{j}", l.trim())));
        }
        if names.len() == site.dim {
            return names;
        }
    }
    default_feature_names(site.dim)
}

/// What one site file contributes.
struct SiteRow {
    file: usize,
    meta: Vec<(String, String)>,
    profile: Vec<f64>,
    cells: usize,
    used: usize,
    dim: usize,
    feature_names: Vec<String>,
}

fn reduce_site_file(path: &Path, file: usize, opts: &AggregateOptions) -> Result<SiteRow> {
    let site = read_site(path)?;
    let d = site.dim;
    let mut profile = vec![0.0; d];
    let rows: Vec<u32> = (0..site.cells as u32).collect();
    let used = if site.cells == 0 {
        0
    } else {
        reduce_rows(
            &site.features,
            d,
            &rows,
            opts.site_op,
            opts.nan,
            &mut profile,
        )
    };
    // Keys from the file's metadata, else from its path `{plate}/{well}_{site}.npz`.
    let mut meta: Vec<(String, String)> = Vec::new();
    let keep = |k: &str| match &opts.metadata_columns {
        Some(l) => l.iter().any(|x| x == k),
        None => k.starts_with(METADATA_PREFIX),
    };
    for (k, v) in &site.metadata {
        if (keep(k)
            || opts.site_keys().contains(&k.as_str())
            || opts.treatment.as_deref() == Some(k))
            && !meta.iter().any(|(m, _)| m == k)
        {
            meta.push((k.clone(), v.clone()));
        }
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let (well_from_path, site_from_path) = stem
        .rsplit_once('_')
        .map(|(w, s)| (w.to_string(), s.to_string()))
        .unwrap_or((stem.clone(), String::new()));
    let plate_from_path = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    let mut fallback = vec![
        (opts.plate.clone(), plate_from_path),
        (opts.well.clone(), well_from_path),
    ];
    if let Some(s) = &opts.site {
        fallback.push((s.clone(), site_from_path));
    }
    for (k, v) in fallback {
        if !meta.iter().any(|(m, _)| *m == k) {
            meta.push((k, v));
        }
    }
    if let Some(t) = &opts.treatment {
        if !meta.iter().any(|(m, _)| m == t) {
            return Err(Error::InvalidArgument(format!(
                "{}: the site metadata has no {t:?} entry (keys: {}); name the treatment column or aggregate to wells only",
                path.display(),
                site.metadata
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(SiteRow {
        file,
        meta,
        profile,
        cells: site.cells,
        used,
        dim: d,
        feature_names: site_feature_names(&site),
    })
}

/// `aggregate_npz_files` over every `*.npz` under `dir` (a `phenocore profile` output folder).
pub fn aggregate_npz_dir(
    dir: &Path,
    opts: &AggregateOptions,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Aggregated> {
    let files = list_site_files(dir)?;
    if files.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "{}: no .npz site files found",
            dir.display()
        )));
    }
    aggregate_npz_files(&files, opts, progress)
}

/// Aggregates per-site feature files (`io::npz::SiteFeatures`; one file = one site) into site,
/// well and treatment profiles. Each worker thread holds one site file at a time. Keys and carried
/// metadata come from each file's metadata entries (`Metadata_*` keys unless
/// `opts.metadata_columns` names them), plate/well/site falling back to the path
/// `{plate}/{well}_{site}.npz`. `progress(done, total)` is called on this thread after every few
/// sites with the number of files done; returning false cancels (`Error::Cancelled`).
pub fn aggregate_npz_files(
    files: &[PathBuf],
    opts: &AggregateOptions,
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<Aggregated> {
    opts.check()?;
    let total = files.len();
    if !progress(0, total) {
        return Err(Error::Cancelled);
    }
    let chunk = 4 * crate::threads::num_threads().max(1);
    let mut rows: Vec<SiteRow> = Vec::with_capacity(total);
    let mut done = 0;
    for (c, block) in files.chunks(chunk).enumerate() {
        let got: Vec<Result<SiteRow>> = crate::threads::install(|| {
            block
                .par_iter()
                .enumerate()
                .map(|(k, p)| reduce_site_file(p, c * chunk + k, opts))
                .collect()
        });
        for r in got {
            rows.push(r?);
        }
        done += block.len();
        if !progress(done, total) {
            return Err(Error::Cancelled);
        }
    }
    // One feature space for all files.
    let first = rows
        .iter()
        .find(|r| r.cells > 0)
        .or(rows.first())
        .ok_or_else(|| Error::InvalidArgument("aggregation: no site files".into()))?;
    let (d, feature_names, first_file) = (first.dim, first.feature_names.clone(), first.file);
    for r in &rows {
        if r.cells > 0 && (r.dim != d || r.feature_names != feature_names) {
            return Err(Error::Shape(format!(
                "{} has {} features ({}) but {} has {d} ({})",
                files[r.file].display(),
                r.dim,
                r.feature_names.first().map_or("", |s| s.as_str()),
                files[first_file].display(),
                feature_names.first().map_or("", |s| s.as_str()),
            )));
        }
    }
    if d == 0 {
        return Err(Error::InvalidArgument(
            "aggregation: the site files have 0 features".into(),
        ));
    }
    // Metadata columns: union of keys in file order; a site lacking one gets "".
    let mut meta_names: Vec<String> = opts.site_keys().iter().map(|s| s.to_string()).collect();
    for r in &rows {
        for (k, _) in &r.meta {
            if !meta_names.contains(k) {
                meta_names.push(k.clone());
            }
        }
    }
    check_no_count_columns(&meta_names, opts)?;
    let key_count = opts.site_keys().len();
    // Sites in key order, as the in-memory path orders them; duplicate keys are an error.
    let key_of = |r: &SiteRow| -> Vec<String> {
        meta_names[..key_count]
            .iter()
            .map(|k| {
                r.meta
                    .iter()
                    .find(|(m, _)| m == k)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            })
            .collect()
    };
    let keys: Vec<Vec<String>> = rows.iter().map(key_of).collect();
    let key_names: Vec<&str> = meta_names[..key_count].iter().map(String::as_str).collect();
    let key_cols: Vec<Vec<&str>> = (0..key_count)
        .map(|c| keys.iter().map(|k| k[c].as_str()).collect())
        .collect();
    let key_refs: Vec<&[&str]> = key_cols.iter().map(Vec::as_slice).collect();
    let groups = group_rows(rows.len(), &key_names, &key_refs, &|i| {
        files[rows[i].file].display().to_string()
    })?;
    for g in 0..groups.len() {
        let m = groups.members(g);
        if m.len() > 1 {
            return Err(Error::InvalidArgument(format!(
                "aggregation: {} and {} are the same site ({})",
                files[rows[m[0] as usize].file].display(),
                files[rows[m[1] as usize].file].display(),
                key_names
                    .iter()
                    .zip(&groups.keys[g])
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let cells: usize = rows.iter().map(|r| r.cells).sum();
    let mut empty = Vec::new();
    let mut empty_treatments = Vec::new();
    let mut order = Vec::with_capacity(rows.len());
    for g in 0..groups.len() {
        let i = groups.members(g)[0] as usize;
        if rows[i].used == 0 {
            empty.push(EmptyGroup {
                level: Level::Site,
                key: key_names
                    .iter()
                    .map(|s| s.to_string())
                    .zip(groups.keys[g].iter().cloned())
                    .collect(),
                rows: rows[i].cells,
            });
            empty_treatments.push(opts.treatment.as_ref().and_then(|t| {
                rows[i]
                    .meta
                    .iter()
                    .find(|(m, _)| m == t)
                    .map(|(_, v)| v.clone())
            }));
        } else {
            order.push(i);
        }
    }
    let mut meta: Vec<Vec<String>> = vec![Vec::with_capacity(order.len()); meta_names.len()];
    let mut data = Vec::with_capacity(order.len() * d);
    for &i in &order {
        for (c, name) in meta_names.iter().enumerate() {
            meta[c].push(
                rows[i]
                    .meta
                    .iter()
                    .find(|(m, _)| m == name)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default(),
            );
        }
        data.extend_from_slice(&rows[i].profile);
    }
    let site_cells: Vec<usize> = order.iter().map(|&i| rows[i].used).collect();
    let dropped = match opts.nan {
        NanPolicy::DropRows => cells - rows.iter().map(|r| r.used).sum::<usize>(),
        NanPolicy::PerFeature => 0,
    };
    let sites = Profiles::new(meta_names, meta, feature_names, data)?;
    wells_and_treatments(
        sites,
        site_cells,
        opts,
        cells,
        dropped,
        empty,
        empty_treatments,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cells<'a>(
        x: &'a [f32],
        d: usize,
        names: &'a [&'a str],
        meta: &'a [Vec<&'a str>],
    ) -> Cells<'a, f32, &'a str> {
        Cells {
            features: x,
            n_features: d,
            feature_names: &[],
            meta_names: names,
            meta,
        }
    }

    fn wells_only() -> AggregateOptions {
        AggregateOptions {
            treatment: None,
            counts: false,
            ..Default::default()
        }
    }

    fn med<T: FeatureValue>(v: &[T]) -> f64 {
        let mut keys: Vec<T::Key> = v.iter().map(|x| x.key()).collect();
        median_in_place::<T>(&mut keys)
    }

    #[test]
    fn medians_by_selection_match_closed_forms() {
        assert_eq!(med(&[3.0f32, 1.0, 2.0]), 2.0);
        assert_eq!(med(&[4.0f32, 1.0, 3.0, 2.0]), 2.5);
        assert_eq!(med(&[7.5f64]), 7.5);
        assert_eq!(med(&[-1.0f64, 1.0]), 0.0);
        assert!(med::<f64>(&[]).is_nan());
        // Even count with duplicated middles and an odd count with ties.
        assert_eq!(med(&[5.0f32, 1.0, 5.0, 9.0]), 5.0);
        assert_eq!(med(&[2.0f32, 2.0, 1.0, 2.0, 3.0]), 2.0);
        assert_eq!(med(&[-3.5f32, -1e-30, -7.0]), -3.5);
    }

    #[test]
    fn order_keys_sort_like_total_cmp_and_round_trip() {
        let v32 = [
            f32::NEG_INFINITY,
            -1e30,
            -1.5,
            -1e-40,
            -0.0,
            0.0,
            1e-40,
            2.0,
            1e30,
            f32::INFINITY,
        ];
        let v64 = [
            f64::NEG_INFINITY,
            -1e300,
            -1.5,
            -5e-324,
            -0.0,
            0.0,
            5e-324,
            2.0,
            1e300,
            f64::INFINITY,
        ];
        for w in v32.windows(2) {
            assert!(w[0].key() < w[1].key(), "{} {}", w[0], w[1]);
        }
        for w in v64.windows(2) {
            assert!(w[0].key() < w[1].key(), "{} {}", w[0], w[1]);
        }
        for v in v32 {
            assert_eq!(f32::from_key(v.key()).to_bits(), v.to_bits());
        }
        for v in v64 {
            assert_eq!(f64::from_key(v.key()).to_bits(), v.to_bits());
        }
    }

    #[test]
    fn nan_rows_are_dropped_or_skipped_per_feature() {
        let x = [1.0f32, 2.0, f32::NAN, 5.0, 3.0, 4.0, 10.0, f32::INFINITY];
        let rows = [0u32, 1, 2, 3];
        let mut out = [0.0; 2];
        let used = reduce_rows(&x, 2, &rows, Reduce::Median, NanPolicy::DropRows, &mut out);
        assert_eq!((used, out), (2, [2.0, 3.0]));
        let used = reduce_rows(&x, 2, &rows, Reduce::Mean, NanPolicy::DropRows, &mut out);
        assert_eq!((used, out), (2, [2.0, 3.0]));
        // pandas: NaN skipped per feature, ∞ kept.
        let used = reduce_rows(
            &x,
            2,
            &rows,
            Reduce::Median,
            NanPolicy::PerFeature,
            &mut out,
        );
        assert_eq!((used, out), (4, [3.0, 4.5]));
        let used = reduce_rows(&x, 2, &rows, Reduce::Mean, NanPolicy::PerFeature, &mut out);
        assert_eq!(used, 4);
        assert_eq!(out[0], 14.0 / 3.0);
        assert_eq!(out[1], f64::INFINITY);
        // All rows bad: empty, not a row of NaN passed on.
        let used = reduce_rows(
            &x[4..],
            2,
            &[1],
            Reduce::Median,
            NanPolicy::DropRows,
            &mut out,
        );
        assert_eq!(used, 0);
    }

    #[test]
    fn large_groups_split_over_column_blocks_agree_with_sorting() {
        use rand::{Rng, SeedableRng};
        let (m, d) = (700, 450); // m * d > PAR_GROUP_WORK
        assert!(m * d >= PAR_GROUP_WORK);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let x: Vec<f32> = (0..m * d).map(|_| rng.gen_range(-3.0..3.0)).collect();
        let rows: Vec<u32> = (0..m as u32).rev().collect();
        let mut med = vec![0.0; d];
        let mut mean = vec![0.0; d];
        reduce_rows(&x, d, &rows, Reduce::Median, NanPolicy::DropRows, &mut med);
        reduce_rows(&x, d, &rows, Reduce::Mean, NanPolicy::DropRows, &mut mean);
        for j in 0..d {
            let mut col: Vec<f64> = (0..m).map(|i| x[i * d + j] as f64).collect();
            col.sort_by(f64::total_cmp);
            assert_eq!(med[j], (col[m / 2 - 1] + col[m / 2]) / 2.0, "column {j}");
            let s: f64 = col.iter().sum::<f64>() / m as f64;
            assert!(
                (mean[j] - s).abs() <= 1e-12 * s.abs().max(1.0),
                "column {j}"
            );
        }
    }

    #[test]
    fn levels_keys_order_and_constant_columns() {
        // Two wells; sites named 10, 2, 1 must come out in numeric order.
        let x = [1.0f32, 3.0, 5.0, 7.0, 9.0, 11.0];
        let names = [
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Site",
            "Metadata_Treatment",
            "Metadata_Id",
        ];
        let meta = vec![
            vec!["P"; 6],
            vec!["B02", "B02", "A01", "A01", "A01", "A01"],
            vec!["10", "10", "2", "1", "1", "10"],
            vec!["t2", "t2", "t1", "t1", "t1", "t1"],
            vec!["a", "b", "c", "d", "e", "f"],
        ];
        let agg =
            aggregate_cells(&cells(&x, 1, &names, &meta), &AggregateOptions::default()).unwrap();
        assert_eq!(
            agg.sites.meta_column("Metadata_Well").unwrap(),
            ["A01", "A01", "A01", "B02"]
        );
        assert_eq!(
            agg.sites.meta_column("Metadata_Site").unwrap(),
            ["1", "2", "10", "10"]
        );
        assert_eq!(agg.sites.data, [8.0, 5.0, 11.0, 2.0]);
        assert_eq!(
            agg.sites.meta_column(OBJECT_COUNT).unwrap(),
            ["2", "1", "1", "2"]
        );
        assert!(agg.sites.meta_column("Metadata_Id").is_err());
        assert_eq!(
            agg.sites.meta_column("Metadata_Treatment").unwrap(),
            ["t1", "t1", "t1", "t2"]
        );
        assert_eq!(agg.wells.data, [8.0, 2.0]);
        assert_eq!(agg.wells.meta_column(SITE_COUNT).unwrap(), ["3", "1"]);
        let t = agg.treatments.unwrap();
        // Plate and well happen to be constant per treatment here, so they stay.
        assert_eq!(
            t.meta_names,
            [
                "Metadata_Treatment",
                "Metadata_Plate",
                "Metadata_Well",
                WELL_COUNT,
                SITE_COUNT,
                OBJECT_COUNT
            ]
        );
        assert_eq!(t.data, [8.0, 2.0]);
        assert_eq!(t.feature_names, ["feature_0"]);

        // No site column: each well's cells form one site; the median preset.
        let o = AggregateOptions {
            site: None,
            ..AggregateOptions::preset("median").unwrap()
        };
        let agg = aggregate_cells(&cells(&x, 1, &names, &meta), &o).unwrap();
        assert_eq!(agg.sites.data, [8.0, 2.0]);
        assert_eq!(
            agg.sites.meta_names[..2],
            ["Metadata_Plate", "Metadata_Well"]
        );
    }

    #[test]
    fn bad_metadata_is_an_error_naming_column_and_row() {
        let x = [1.0f32, 2.0, 3.0];
        let names = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"];
        let meta = vec![
            vec!["P", "P", "P"],
            vec!["A01", " ", "A01"],
            vec!["1", "1", "1"],
        ];
        let e = aggregate_cells(&cells(&x, 1, &names, &meta), &wells_only())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"Metadata_Well\"") && e.contains("cell row 1"),
            "{e}"
        );

        let short = vec![
            vec!["P", "P"],
            vec!["A01", "A01", "A01"],
            vec!["1", "1", "1"],
        ];
        let e = aggregate_cells(&cells(&x, 1, &names, &short), &wells_only()).unwrap_err();
        assert!(
            matches!(&e, Error::Shape(m) if m.contains("Metadata_Plate")),
            "{e}"
        );

        let e = aggregate_cells(&cells(&x, 1, &names[..2], &meta[..2]), &wells_only())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"Metadata_Site\"") && e.contains("Metadata_Plate, Metadata_Well"),
            "{e}"
        );

        let e = aggregate_cells(&cells(&x, 2, &names, &meta), &wells_only()).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "{e}");

        // A treatment that varies within a well.
        let names4 = [
            "Metadata_Plate",
            "Metadata_Well",
            "Metadata_Site",
            "Metadata_Treatment",
        ];
        let meta4 = vec![
            vec!["P"; 3],
            vec!["A01"; 3],
            vec!["1", "2", "2"],
            vec!["x", "y", "y"],
        ];
        let e = aggregate_cells(&cells(&x, 1, &names4, &meta4), &AggregateOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("Metadata_Treatment differs within well") && e.contains("\"x\""),
            "{e}"
        );
        // No treatment column at all.
        let e = aggregate_cells(
            &cells(&x, 1, &names, &meta4[..3]),
            &AggregateOptions::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("\"Metadata_Treatment\""), "{e}");

        // A count column in the input collides with the one aggregation adds.
        let names_c = ["Metadata_Plate", "Metadata_Well", OBJECT_COUNT];
        let e = aggregate_cells(
            &cells(&x, 1, &names_c, &meta4[..3]),
            &AggregateOptions {
                site: None,
                treatment: None,
                ..Default::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(OBJECT_COUNT), "{e}");

        assert!(AggregateOptions::preset("average").is_err());
        assert_eq!(Reduce::parse("Median").unwrap(), Reduce::Median);
        assert!(Reduce::parse("max").is_err());
        let same = AggregateOptions {
            well: "Metadata_Plate".into(),
            ..Default::default()
        };
        assert!(same.check().is_err());
    }

    #[test]
    fn aggregate_profiles_groups_one_level() {
        let p = Profiles::new(
            vec!["Metadata_Group".into(), "Metadata_Note".into()],
            vec![
                vec!["b".into(), "a".into(), "b".into()],
                vec!["x".into(), "y".into(), "x".into()],
            ],
            vec!["f".into(), "g".into()],
            vec![1.0, 2.0, 10.0, 20.0, 3.0, f64::NAN],
        )
        .unwrap();
        let (g, used, empty) =
            aggregate_profiles(&p, &["Metadata_Group"], Reduce::Mean, NanPolicy::PerFeature)
                .unwrap();
        assert_eq!(
            g.meta,
            vec![
                vec!["a".to_string(), "b".into()],
                vec!["y".into(), "x".into()]
            ]
        );
        assert_eq!(g.data, [10.0, 20.0, 2.0, 2.0]);
        assert_eq!(used, [1, 2]);
        assert!(empty.is_empty());
        let (g, used, _) =
            aggregate_profiles(&p, &["Metadata_Group"], Reduce::Mean, NanPolicy::DropRows).unwrap();
        assert_eq!((g.data, used), (vec![10.0, 20.0, 1.0, 2.0], vec![1, 1]));
        assert!(aggregate_profiles(&p, &[], Reduce::Mean, NanPolicy::DropRows).is_err());
        assert!(
            aggregate_profiles(&p, &["Metadata_Nope"], Reduce::Mean, NanPolicy::DropRows).is_err()
        );
    }
}
