//! Profile tables and aggregation over the C ABI: the `PhenoProfiles` handle (read, write, build
//! from arrays, query, copy out, free) and `pheno_aggregate*` (REFERENCE §4).
//!
//! Strings come out sqlite-style: the caller passes a buffer and its length and gets the bytes
//! needed (with the terminating NUL) through `out_needed`; a NULL buffer with length 0 only asks
//! for the length.

use super::boundary::{
    c_path, c_str, c_str_array, checked_len, guard, null, reference, slice, slice_mut, write_out,
};
use super::options::{PhenoProgressFn, Prefix};
use crate::error::{Error, PhenoStatus, Result};
use crate::io::profiles::{read_profiles, write_profiles, Profiles, ReadOptions, WriteOptions};
use crate::profiling::aggregate::{
    aggregate_cells, aggregate_npz_dir, AggregateOptions, Aggregated, Cells, EmptyPolicy,
    FeatureValue, Level, NanPolicy, Reduce,
};
use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};
use std::path::PathBuf;

/// A profile table: `n_rows` profiles, each with metadata (strings, e.g. `Metadata_Plate`) and
/// `n_features` feature values (double).
///
/// Thread safety: immutable after creation, so any number of threads may call functions on one
/// table at the same time. `pheno_profiles_free` must be called exactly once, after every other
/// call on the table has returned.
pub struct PhenoProfiles {
    table: Profiles,
    /// For tables made by `pheno_aggregate*`: the groups left out for having no usable rows.
    empty: Vec<String>,
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<PhenoProfiles>();
};

/// Options for `pheno_profiles_read` / `pheno_profiles_write`. Initialise with
/// `pheno_profiles_io_default_options()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoProfilesIoOptions {
    /// `sizeof(PhenoProfilesIoOptions)`; set by `pheno_profiles_io_default_options()`.
    pub struct_size: usize,
    /// Reading: the names of the metadata columns (all others are features). NULL with
    /// `n_metadata_columns` 0 (default) = every column whose name starts with "Metadata_".
    pub metadata_columns: *const *const c_char,
    pub n_metadata_columns: usize,
    /// `.npy` only: a CSV/TSV beside the matrix holding the metadata columns, read with the matrix
    /// or written with it. NULL (default) = none.
    pub npy_metadata_path: *const c_char,
    /// Writing `.npy`: non-zero stores float32, 0 (default) float64.
    pub npy_float32: i32,
}

/// Default I/O options: `Metadata_*` columns are metadata; no `.npy` side file; float64 `.npy`.
#[no_mangle]
pub extern "C" fn pheno_profiles_io_default_options() -> PhenoProfilesIoOptions {
    PhenoProfilesIoOptions {
        struct_size: size_of::<PhenoProfilesIoOptions>(),
        metadata_columns: std::ptr::null(),
        n_metadata_columns: 0,
        npy_metadata_path: std::ptr::null(),
        npy_float32: 0,
    }
}

/// How the rows of a group become one profile.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoReduce {
    PHENO_REDUCE_MEDIAN = 0,
    PHENO_REDUCE_MEAN = 1,
}

/// Level of the profiles `pheno_aggregate*` returns.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoAggregateLevel {
    PHENO_LEVEL_SITE = 0,
    PHENO_LEVEL_WELL = 1,
    PHENO_LEVEL_TREATMENT = 2,
}

/// What a NaN in the cell features does.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoNanPolicy {
    /// A cell holding any NaN or infinity is dropped (REFERENCE §4; default).
    PHENO_NAN_DROP_ROWS = 0,
    /// pandas / pycytominer: each feature skips its own NaN values.
    PHENO_NAN_PER_FEATURE = 1,
}

/// Options for `pheno_aggregate*`. Initialise with `pheno_aggregate_default_options()`; the
/// defaults are the paper's chain (site median, well mean, treatment mean).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoAggregateOptions {
    /// `sizeof(PhenoAggregateOptions)`; set by `pheno_aggregate_default_options()`.
    pub struct_size: usize,
    /// Cells → site (default median).
    pub site_op: PhenoReduce,
    /// Sites → well (default mean).
    pub well_op: PhenoReduce,
    /// Wells → treatment (default mean).
    pub treatment_op: PhenoReduce,
    /// Which profiles to return (default PHENO_LEVEL_TREATMENT).
    pub level: PhenoAggregateLevel,
    /// Default PHENO_NAN_DROP_ROWS.
    pub nan_policy: PhenoNanPolicy,
    /// 0 (default): a site (well, treatment) with no usable cells is left out and listed by
    /// `pheno_profiles_empty_group`; non-zero: it is PHENO_ERR_INVALID_ARGUMENT naming it.
    pub fail_on_empty: i32,
    /// Non-zero (default): add Metadata_Object_Count / Metadata_Site_Count / Metadata_Well_Count.
    pub counts: i32,
    /// Key columns; NULL = "Metadata_Plate", "Metadata_Well".
    pub plate_column: *const c_char,
    pub well_column: *const c_char,
    /// NULL = "Metadata_Site"; "" = no site column (the cells of a well form one site).
    pub site_column: *const c_char,
    /// NULL = "Metadata_Treatment"; "" = none (then `level` must not be TREATMENT). Only used
    /// for treatment profiles; below that level it is carried like any other column.
    pub treatment_column: *const c_char,
    /// `pheno_aggregate_npz_dir` only: called with (site files done, total) after every few sites;
    /// may be NULL. Return non-zero to cancel (PHENO_ERR_CANCELLED). Runs on the calling thread.
    pub progress: PhenoProgressFn,
    /// Passed unchanged to `progress`.
    pub user_data: *mut c_void,
}

/// Default aggregation options: the paper's chain, treatment profiles, NaN cells dropped, empty
/// groups left out, count columns, pycytominer's key column names.
#[no_mangle]
pub extern "C" fn pheno_aggregate_default_options() -> PhenoAggregateOptions {
    PhenoAggregateOptions {
        struct_size: size_of::<PhenoAggregateOptions>(),
        site_op: PhenoReduce::PHENO_REDUCE_MEDIAN,
        well_op: PhenoReduce::PHENO_REDUCE_MEAN,
        treatment_op: PhenoReduce::PHENO_REDUCE_MEAN,
        level: PhenoAggregateLevel::PHENO_LEVEL_TREATMENT,
        nan_policy: PhenoNanPolicy::PHENO_NAN_DROP_ROWS,
        fail_on_empty: 0,
        counts: 1,
        plate_column: std::ptr::null(),
        well_column: std::ptr::null(),
        site_column: std::ptr::null(),
        treatment_column: std::ptr::null(),
        progress: None,
        user_data: std::ptr::null_mut(),
    }
}

/// # Safety
/// `p` is NULL or points to a `PhenoProfilesIoOptions` of at least `p->struct_size` bytes whose
/// pointers are valid as documented there.
unsafe fn io_opts(p: *const PhenoProfilesIoOptions) -> Result<(ReadOptions, WriteOptions)> {
    let (mut r, mut w) = (ReadOptions::default(), WriteOptions::default());
    let Some(pre) = Prefix::new(p, "opts", "pheno_profiles_io_default_options")? else {
        return Ok((r, w));
    };
    let cols = pre
        .field::<*const *const c_char>(offset_of!(PhenoProfilesIoOptions, metadata_columns))
        .unwrap_or(std::ptr::null());
    let n = pre
        .field::<usize>(offset_of!(PhenoProfilesIoOptions, n_metadata_columns))
        .unwrap_or(0);
    if n > 0 || !cols.is_null() {
        if cols.is_null() {
            return Err(null("opts->metadata_columns"));
        }
        r.metadata_columns = Some(
            c_str_array(cols, n, "opts->metadata_columns")?
                .into_iter()
                .map(str::to_string)
                .collect(),
        );
    }
    if let Some(mp) =
        pre.field::<*const c_char>(offset_of!(PhenoProfilesIoOptions, npy_metadata_path))
    {
        if !mp.is_null() {
            let path: PathBuf = c_path(mp, "opts->npy_metadata_path")?.to_path_buf();
            r.npy_metadata = Some(path.clone());
            w.npy_metadata = Some(path);
        }
    }
    if let Some(f) = pre.field::<i32>(offset_of!(PhenoProfilesIoOptions, npy_float32)) {
        w.npy_f32 = f != 0;
    }
    Ok((r, w))
}

/// Effective aggregation options.
struct AggOpts {
    opts: AggregateOptions,
    level: Level,
    progress: PhenoProgressFn,
    user_data: *mut c_void,
}

/// # Safety
/// `p` is NULL or points to a `PhenoAggregateOptions` of at least `p->struct_size` bytes whose
/// string pointers are NULL or NUL-terminated.
unsafe fn agg_opts(p: *const PhenoAggregateOptions) -> Result<AggOpts> {
    let mut o = AggOpts {
        opts: AggregateOptions::default(),
        level: Level::Treatment,
        progress: None,
        user_data: std::ptr::null_mut(),
    };
    let Some(pre) = Prefix::new(p, "opts", "pheno_aggregate_default_options")? else {
        return Ok(o);
    };
    let reduce = |off: usize, what: &str| -> Result<Option<Reduce>> {
        match pre.field::<i32>(off) {
            None => Ok(None),
            Some(0) => Ok(Some(Reduce::Median)),
            Some(1) => Ok(Some(Reduce::Mean)),
            Some(v) => Err(Error::InvalidArgument(format!(
                "opts->{what} is {v}; expected PHENO_REDUCE_MEDIAN (0) or PHENO_REDUCE_MEAN (1)"
            ))),
        }
    };
    if let Some(r) = reduce(offset_of!(PhenoAggregateOptions, site_op), "site_op")? {
        o.opts.site_op = r;
    }
    if let Some(r) = reduce(offset_of!(PhenoAggregateOptions, well_op), "well_op")? {
        o.opts.well_op = r;
    }
    if let Some(r) = reduce(
        offset_of!(PhenoAggregateOptions, treatment_op),
        "treatment_op",
    )? {
        o.opts.treatment_op = r;
    }
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoAggregateOptions, level)) {
        o.level = match v {
            0 => Level::Site,
            1 => Level::Well,
            2 => Level::Treatment,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "opts->level is {v}; expected 0, 1 or 2 (PHENO_LEVEL_*)"
                )))
            }
        };
    }
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoAggregateOptions, nan_policy)) {
        o.opts.nan = match v {
            0 => NanPolicy::DropRows,
            1 => NanPolicy::PerFeature,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "opts->nan_policy is {v}; expected 0 or 1 (PHENO_NAN_*)"
                )))
            }
        };
    }
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoAggregateOptions, fail_on_empty)) {
        o.opts.on_empty = if v != 0 {
            EmptyPolicy::Error
        } else {
            EmptyPolicy::Report
        };
    }
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoAggregateOptions, counts)) {
        o.opts.counts = v != 0;
    }
    let column = |off: usize, what: &str| -> Result<Option<String>> {
        match pre.field::<*const c_char>(off) {
            Some(s) if !s.is_null() => Ok(Some(c_str(s, &format!("opts->{what}"))?.to_string())),
            _ => Ok(None),
        }
    };
    if let Some(c) = column(
        offset_of!(PhenoAggregateOptions, plate_column),
        "plate_column",
    )? {
        o.opts.plate = c;
    }
    if let Some(c) = column(
        offset_of!(PhenoAggregateOptions, well_column),
        "well_column",
    )? {
        o.opts.well = c;
    }
    if let Some(c) = column(
        offset_of!(PhenoAggregateOptions, site_column),
        "site_column",
    )? {
        o.opts.site = (!c.is_empty()).then_some(c);
    }
    if let Some(c) = column(
        offset_of!(PhenoAggregateOptions, treatment_column),
        "treatment_column",
    )? {
        o.opts.treatment = (!c.is_empty()).then_some(c);
    }
    if let Some(f) = pre.field::<PhenoProgressFn>(offset_of!(PhenoAggregateOptions, progress)) {
        o.progress = f;
    }
    if let Some(u) = pre.field::<*mut c_void>(offset_of!(PhenoAggregateOptions, user_data)) {
        o.user_data = u;
    }
    if o.level == Level::Treatment && o.opts.treatment.is_none() {
        return Err(Error::InvalidArgument(
            "opts->level is PHENO_LEVEL_TREATMENT but opts->treatment_column is \"\"".into(),
        ));
    }
    if o.level != Level::Treatment {
        // Not needed: the chain stops below it (the column is still carried where constant).
        o.opts.treatment = None;
    }
    Ok(o)
}

/// # Safety
/// `out` is NULL or valid for a write.
unsafe fn publish(
    out: *mut *mut PhenoProfiles,
    make: impl FnOnce() -> Result<PhenoProfiles>,
) -> Result<()> {
    super::boundary::publish_handle(out, "out_profiles", make)
}

/// # Safety
/// `p` is NULL or a live table from this library.
unsafe fn table<'a>(p: *const PhenoProfiles) -> Result<&'a PhenoProfiles> {
    reference(p, "profiles")
}

/// Copies `text` and a NUL into `buf` (see the module doc); `what` names it in errors.
///
/// # Safety
/// `buf` is NULL or points to `buf_len` writable bytes; `out_needed` is NULL or valid for a write.
unsafe fn copy_text(
    text: &[u8],
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
    what: &str,
) -> Result<()> {
    let need = text.len() + 1;
    if !out_needed.is_null() {
        write_out(out_needed, need, "out_needed")?;
    }
    if buf.is_null() && buf_len == 0 {
        return Ok(());
    }
    if buf_len < need {
        return Err(Error::Shape(format!(
            "buf_len is {buf_len} but {what} needs {need} bytes (with the terminating NUL)"
        )));
    }
    let out = slice_mut(buf as *mut u8, need, "buf")?;
    out[..text.len()].copy_from_slice(text);
    out[text.len()] = 0;
    Ok(())
}

fn no_nul<'a>(s: &'a str, what: &dyn Fn() -> String) -> Result<&'a str> {
    if s.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{} holds a NUL character and cannot cross the C ABI",
            what()
        )));
    }
    Ok(s)
}

/// Strings one after another, each followed by a NUL.
fn joined<'a>(items: impl Iterator<Item = (&'a str, String)>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (s, what) in items {
        no_nul(s, &|| what.clone())?;
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }
    Ok(out)
}

/// Reads a profile table from `path`; the format follows the extension: `.csv`, `.tsv` (optionally
/// `.gz`), `.parquet` / `.pq` (as pandas writes it), `.npy` (a 2-D feature matrix; metadata from
/// `opts->npy_metadata_path`). `opts` may be NULL. On success `*out_profiles` owns a new table
/// (free it with `pheno_profiles_free`); on failure it is set to NULL.
///
/// # Safety
/// `path` is a NUL-terminated string; `opts` is NULL or initialised by
/// `pheno_profiles_io_default_options()`; `out_profiles` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_read(
    path: *const c_char,
    opts: *const PhenoProfilesIoOptions,
    out_profiles: *mut *mut PhenoProfiles,
) -> PhenoStatus {
    guard("pheno_profiles_read", || {
        publish(out_profiles, || {
            let path = c_path(path, "path")?;
            let (r, _) = io_opts(opts)?;
            Ok(PhenoProfiles {
                table: read_profiles(path, &r)?,
                empty: Vec::new(),
            })
        })
    })
}

/// Writes `profiles` to `path` atomically (a temp file renamed over `path`); the format follows
/// the extension as in `pheno_profiles_read`. CSV: metadata columns then features, NaN as an
/// empty cell; Parquet: metadata as UTF-8 strings, features as DOUBLE, snappy; `.npy`: the
/// feature matrix (float64, or float32 with `opts->npy_float32`), metadata to
/// `opts->npy_metadata_path` when set. `opts` may be NULL.
///
/// # Safety
/// `profiles` is a live table; `path` a NUL-terminated string; `opts` as in `pheno_profiles_read`.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_write(
    profiles: *const PhenoProfiles,
    path: *const c_char,
    opts: *const PhenoProfilesIoOptions,
) -> PhenoStatus {
    guard("pheno_profiles_write", || {
        let t = table(profiles)?;
        let path = c_path(path, "path")?;
        let (_, w) = io_opts(opts)?;
        write_profiles(path, &t.table, &w)
    })
}

/// Builds a table from `x` (n × d doubles, row-major), `feature_names` (d strings; NULL =
/// "feature_0", "feature_1", ...), and `n_meta` metadata columns named by `meta_names` whose
/// values are `meta_values` (n_meta × n strings, **column by column**: the value of column c at
/// row r is `meta_values[c * n + r]`). Names must be unique.
///
/// # Safety
/// `x` points to n * d doubles; `feature_names` is NULL or points to d strings; `meta_names` to
/// n_meta strings and `meta_values` to n_meta * n strings (each NUL-terminated; either array may
/// be NULL when n_meta is 0); `out_profiles` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_new(
    x: *const f64,
    n: usize,
    d: usize,
    feature_names: *const *const c_char,
    meta_names: *const *const c_char,
    n_meta: usize,
    meta_values: *const *const c_char,
    out_profiles: *mut *mut PhenoProfiles,
) -> PhenoStatus {
    guard("pheno_profiles_new", || {
        publish(out_profiles, || {
            let len = checked_len::<f64>(&[n, d], "x")?;
            let data = slice(x, len, "x")?.to_vec();
            let features = if feature_names.is_null() {
                (0..d).map(|j| format!("feature_{j}")).collect()
            } else {
                c_str_array(feature_names, d, "feature_names")?
                    .into_iter()
                    .map(str::to_string)
                    .collect()
            };
            let (names, meta) = meta_arrays(meta_names, n_meta, meta_values, n)?;
            let table = Profiles::new(
                names.into_iter().map(str::to_string).collect(),
                meta.into_iter()
                    .map(|c| c.into_iter().map(str::to_string).collect())
                    .collect(),
                features,
                data,
            )?;
            // With no features the row count comes from the metadata; it must still be n.
            if table.n_rows() != n {
                return Err(Error::Shape(format!(
                    "n is {n} but the metadata columns have {} rows",
                    table.n_rows()
                )));
            }
            Ok(PhenoProfiles {
                table,
                empty: Vec::new(),
            })
        })
    })
}

/// The metadata arrays of `pheno_profiles_new` / `pheno_aggregate`, column by column.
///
/// # Safety
/// As `pheno_profiles_new`.
unsafe fn meta_arrays<'a>(
    meta_names: *const *const c_char,
    n_meta: usize,
    meta_values: *const *const c_char,
    n: usize,
) -> Result<(Vec<&'a str>, Vec<Vec<&'a str>>)> {
    let names = c_str_array(meta_names, n_meta, "meta_names")?;
    let total = checked_len::<*const c_char>(&[n_meta, n], "meta_values")?;
    let ptrs = slice(meta_values, total, "meta_values")?;
    let mut cols = Vec::with_capacity(n_meta);
    for (c, name) in names.iter().enumerate() {
        let col = ptrs[c * n..(c + 1) * n]
            .iter()
            .enumerate()
            .map(|(r, &s)| {
                if s.is_null() {
                    return Err(Error::NullPointer(format!(
                        "meta_values[{}] (column {name:?}, row {r}) is NULL",
                        c * n + r
                    )));
                }
                c_str(
                    s,
                    &format!("meta_values[{}] (column {name:?}, row {r})", c * n + r),
                )
            })
            .collect::<Result<Vec<&str>>>()?;
        cols.push(col);
    }
    Ok((names, cols))
}

/// Rows, features and metadata columns of a table; any out-pointer may be NULL to skip it.
///
/// # Safety
/// `profiles` is a live table; each out-pointer is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_info(
    profiles: *const PhenoProfiles,
    out_n_rows: *mut usize,
    out_n_features: *mut usize,
    out_n_meta_columns: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_info", || {
        let t = &table(profiles)?.table;
        for (p, v, what) in [
            (out_n_rows, t.n_rows(), "out_n_rows"),
            (out_n_features, t.n_features(), "out_n_features"),
            (out_n_meta_columns, t.meta_names.len(), "out_n_meta_columns"),
        ] {
            if !p.is_null() {
                write_out(p, v, what)?;
            }
        }
        Ok(())
    })
}

/// Copies the feature values (n_rows × n_features doubles, row-major) into `out`
/// (`out_len` >= n_rows * n_features).
///
/// # Safety
/// `profiles` is a live table; `out` points to `out_len` writable doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_data(
    profiles: *const PhenoProfiles,
    out: *mut f64,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_profiles_data", || {
        let t = &table(profiles)?.table;
        let need = t.data.len();
        if out_len < need {
            return Err(Error::Shape(format!(
                "out_len is {out_len}; {} x {} values need {need}",
                t.n_rows(),
                t.n_features()
            )));
        }
        slice_mut(out, need, "out")?.copy_from_slice(&t.data);
        Ok(())
    })
}

fn index_error(what: &str, i: usize, n: usize) -> Error {
    Error::InvalidArgument(format!("{what} {i} is out of range (the table has {n})"))
}

/// Name of feature column `j` into `buf` (module doc: sqlite-style copy).
///
/// # Safety
/// `profiles` is a live table; `buf` is NULL or points to `buf_len` writable bytes;
/// `out_needed` is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_feature_name(
    profiles: *const PhenoProfiles,
    j: usize,
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_feature_name", || {
        let t = &table(profiles)?.table;
        let name = t
            .feature_names
            .get(j)
            .ok_or_else(|| index_error("feature", j, t.n_features()))?;
        let name = no_nul(name, &|| format!("feature name {j}"))?;
        copy_text(name.as_bytes(), buf, buf_len, out_needed, "the name")
    })
}

/// All feature names into `buf`, each followed by a NUL (module doc: sqlite-style copy;
/// `*out_needed` is the total length).
///
/// # Safety
/// As `pheno_profiles_feature_name`.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_feature_names(
    profiles: *const PhenoProfiles,
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_feature_names", || {
        let t = &table(profiles)?.table;
        let bytes = joined(
            t.feature_names
                .iter()
                .enumerate()
                .map(|(j, s)| (s.as_str(), format!("feature name {j}"))),
        )?;
        copy_bytes(&bytes, buf, buf_len, out_needed, "the feature names")
    })
}

/// Copies `bytes` as they are (they end with a NUL already, or are empty).
///
/// # Safety
/// As `copy_text`.
unsafe fn copy_bytes(
    bytes: &[u8],
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
    what: &str,
) -> Result<()> {
    if !out_needed.is_null() {
        write_out(out_needed, bytes.len(), "out_needed")?;
    }
    if buf.is_null() && buf_len == 0 {
        return Ok(());
    }
    if buf_len < bytes.len() {
        return Err(Error::Shape(format!(
            "buf_len is {buf_len} but {what} need {} bytes",
            bytes.len()
        )));
    }
    slice_mut(buf as *mut u8, bytes.len(), "buf")?.copy_from_slice(bytes);
    Ok(())
}

/// Name of metadata column `c` into `buf` (module doc: sqlite-style copy).
///
/// # Safety
/// As `pheno_profiles_feature_name`.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_meta_name(
    profiles: *const PhenoProfiles,
    c: usize,
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_meta_name", || {
        let t = &table(profiles)?.table;
        let name = t
            .meta_names
            .get(c)
            .ok_or_else(|| index_error("metadata column", c, t.meta_names.len()))?;
        let name = no_nul(name, &|| format!("metadata column name {c}"))?;
        copy_text(name.as_bytes(), buf, buf_len, out_needed, "the name")
    })
}

/// Index of the metadata column named `name`; PHENO_ERR_INVALID_ARGUMENT (listing the columns)
/// when there is none.
///
/// # Safety
/// `profiles` is a live table; `name` a NUL-terminated string; `out_index` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_meta_index(
    profiles: *const PhenoProfiles,
    name: *const c_char,
    out_index: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_meta_index", || {
        let t = &table(profiles)?.table;
        let name = c_str(name, "name")?;
        if out_index.is_null() {
            return Err(null("out_index"));
        }
        t.meta_column(name)?;
        let i = t.meta_names.iter().position(|m| m == name).unwrap_or(0);
        write_out(out_index, i, "out_index")
    })
}

/// Value of metadata column `c` at row `row` into `buf` (module doc: sqlite-style copy).
///
/// # Safety
/// As `pheno_profiles_feature_name`.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_meta_value(
    profiles: *const PhenoProfiles,
    c: usize,
    row: usize,
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_meta_value", || {
        let t = &table(profiles)?.table;
        let col = t
            .meta
            .get(c)
            .ok_or_else(|| index_error("metadata column", c, t.meta.len()))?;
        let v = col
            .get(row)
            .ok_or_else(|| index_error("row", row, col.len()))?;
        let v = no_nul(v, &|| {
            format!("metadata column {:?} at row {row}", t.meta_names[c])
        })?;
        copy_text(v.as_bytes(), buf, buf_len, out_needed, "the value")
    })
}

/// Every value of metadata column `c` into `buf`, row after row, each followed by a NUL (module
/// doc: sqlite-style copy; `*out_needed` is the total length).
///
/// # Safety
/// As `pheno_profiles_feature_name`.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_meta_column(
    profiles: *const PhenoProfiles,
    c: usize,
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_meta_column", || {
        let t = &table(profiles)?.table;
        let col = t
            .meta
            .get(c)
            .ok_or_else(|| index_error("metadata column", c, t.meta.len()))?;
        let name = &t.meta_names[c];
        let bytes = joined(
            col.iter()
                .enumerate()
                .map(|(r, s)| (s.as_str(), format!("metadata column {name:?} at row {r}"))),
        )?;
        copy_bytes(&bytes, buf, buf_len, out_needed, "the values")
    })
}

/// Number of groups `pheno_aggregate*` left out of this table's level and the ones below it for
/// having no usable cells (0 for tables not made by aggregation).
///
/// # Safety
/// `profiles` is a live table; `out_count` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_empty_groups(
    profiles: *const PhenoProfiles,
    out_count: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_empty_groups", || {
        let t = table(profiles)?;
        write_out(out_count, t.empty.len(), "out_count")
    })
}

/// Description of left-out group `i` (e.g. "site Metadata_Plate=P1, Metadata_Well=A01,
/// Metadata_Site=3 (12 cells, all with NaN)") into `buf` (module doc: sqlite-style copy).
///
/// # Safety
/// As `pheno_profiles_feature_name`.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_empty_group(
    profiles: *const PhenoProfiles,
    i: usize,
    buf: *mut c_char,
    buf_len: usize,
    out_needed: *mut usize,
) -> PhenoStatus {
    guard("pheno_profiles_empty_group", || {
        let t = table(profiles)?;
        let s = t
            .empty
            .get(i)
            .ok_or_else(|| index_error("empty group", i, t.empty.len()))?;
        let s = no_nul(s, &|| format!("empty group {i}"))?;
        copy_text(s.as_bytes(), buf, buf_len, out_needed, "the description")
    })
}

/// Releases a table. NULL is accepted and ignored.
///
/// # Safety
/// `profiles` is NULL or a live table not used after this call.
#[no_mangle]
pub unsafe extern "C" fn pheno_profiles_free(profiles: *mut PhenoProfiles) {
    if profiles.is_null() {
        return;
    }
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        drop(Box::from_raw(profiles));
    }));
}

fn level_table(agg: Aggregated, level: Level) -> Result<PhenoProfiles> {
    let empty: Vec<String> = agg
        .empty
        .iter()
        .filter(|e| match level {
            Level::Site => e.level == Level::Site,
            Level::Well => e.level != Level::Treatment,
            Level::Treatment => true,
        })
        .map(|e| e.label())
        .collect();
    let table = agg
        .into_level(level)
        .ok_or_else(|| Error::Internal("aggregation made no treatment level".into()))?;
    Ok(PhenoProfiles { table, empty })
}

/// # Safety
/// As `pheno_aggregate`, with `x` pointing to n * d values of `T`.
#[allow(clippy::too_many_arguments)]
unsafe fn aggregate_arrays<T: FeatureValue>(
    x: *const T,
    n: usize,
    d: usize,
    feature_names: *const *const c_char,
    meta_names: *const *const c_char,
    n_meta: usize,
    meta_values: *const *const c_char,
    opts: *const PhenoAggregateOptions,
    out_profiles: *mut *mut PhenoProfiles,
) -> Result<()> {
    publish(out_profiles, || {
        let o = agg_opts(opts)?;
        if d == 0 {
            return Err(Error::InvalidArgument("d is 0".into()));
        }
        let len = checked_len::<T>(&[n, d], "x")?;
        let x = slice(x, len, "x")?;
        let features: Vec<String> = if feature_names.is_null() {
            Vec::new()
        } else {
            c_str_array(feature_names, d, "feature_names")?
                .into_iter()
                .map(str::to_string)
                .collect()
        };
        let (names, meta) = meta_arrays(meta_names, n_meta, meta_values, n)?;
        let agg = aggregate_cells(
            &Cells {
                features: x,
                n_features: d,
                feature_names: &features,
                meta_names: &names,
                meta: &meta,
            },
            &o.opts,
        )?;
        level_table(agg, o.level)
    })
}

/// Aggregates single cells into site, well or treatment profiles (REFERENCE §4; `opts->level`).
/// `x` holds n × d cell features (float32, row-major); `feature_names` d names (NULL =
/// "feature_0", ...); `n_meta` metadata columns named `meta_names` with values `meta_values`
/// (n_meta × n strings, column by column: column c, row r at `meta_values[c * n + r]`), which must
/// include the key columns of `opts`. The table keeps the key columns, the metadata columns
/// constant within each group, and count columns. Groups come out sorted by key. A site whose
/// cells all hold NaN has no profile; see `pheno_profiles_empty_group`. `opts` may be NULL
/// (the paper's chain to treatments). On success `*out_profiles` owns a new table; on failure it
/// is set to NULL.
///
/// # Safety
/// `x` points to n * d floats; string arrays as in `pheno_profiles_new`; `opts` is NULL or
/// initialised by `pheno_aggregate_default_options()`; `out_profiles` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_aggregate(
    x: *const f32,
    n: usize,
    d: usize,
    feature_names: *const *const c_char,
    meta_names: *const *const c_char,
    n_meta: usize,
    meta_values: *const *const c_char,
    opts: *const PhenoAggregateOptions,
    out_profiles: *mut *mut PhenoProfiles,
) -> PhenoStatus {
    guard("pheno_aggregate", || {
        aggregate_arrays(
            x,
            n,
            d,
            feature_names,
            meta_names,
            n_meta,
            meta_values,
            opts,
            out_profiles,
        )
    })
}

/// As `pheno_aggregate` with double cell features (e.g. CellProfiler measurements).
///
/// # Safety
/// As `pheno_aggregate`, with `x` pointing to n * d doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_aggregate_f64(
    x: *const f64,
    n: usize,
    d: usize,
    feature_names: *const *const c_char,
    meta_names: *const *const c_char,
    n_meta: usize,
    meta_values: *const *const c_char,
    opts: *const PhenoAggregateOptions,
    out_profiles: *mut *mut PhenoProfiles,
) -> PhenoStatus {
    guard("pheno_aggregate_f64", || {
        aggregate_arrays(
            x,
            n,
            d,
            feature_names,
            meta_names,
            n_meta,
            meta_values,
            opts,
            out_profiles,
        )
    })
}

/// Aggregates the per-site `.npz` files under `dir` (a `phenocore profile` output folder,
/// `{plate}/{well}_{site}.npz`), streaming: each worker thread holds one site file at a time, so
/// memory does not grow with the number of cells. Keys and carried metadata come from each
/// file's `Metadata_*` entries (plate/well/site fall back to the path). `opts->progress` is
/// called with the site files done and their total. Otherwise as `pheno_aggregate`.
///
/// # Safety
/// `dir` is a NUL-terminated string; `opts` is NULL or initialised by
/// `pheno_aggregate_default_options()` (its callback must not unwind); `out_profiles` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_aggregate_npz_dir(
    dir: *const c_char,
    opts: *const PhenoAggregateOptions,
    out_profiles: *mut *mut PhenoProfiles,
) -> PhenoStatus {
    guard("pheno_aggregate_npz_dir", || {
        publish(out_profiles, || {
            let dir = c_path(dir, "dir")?;
            let o = agg_opts(opts)?;
            let mut report = |done: usize, total: usize| -> bool {
                match o.progress {
                    // SAFETY: the caller promised a valid callback taking its own user_data.
                    Some(f) => f(done, total, o.user_data) == 0,
                    None => true,
                }
            };
            let agg = aggregate_npz_dir(dir, &o.opts, &mut report)?;
            level_table(agg, o.level)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::{CStr, CString};

    fn cstrings(v: &[&str]) -> (Vec<CString>, Vec<*const c_char>) {
        let owned: Vec<CString> = v.iter().map(|s| CString::new(*s).unwrap()).collect();
        let ptrs = owned.iter().map(|s| s.as_ptr()).collect();
        (owned, ptrs)
    }

    unsafe fn text(f: impl Fn(*mut c_char, usize, *mut usize) -> PhenoStatus) -> String {
        let mut need = 0usize;
        assert_eq!(f(std::ptr::null_mut(), 0, &mut need), PhenoStatus::PHENO_OK);
        let mut small = vec![0 as c_char; need - 1];
        if need > 1 {
            assert_eq!(
                f(small.as_mut_ptr(), small.len(), &mut need),
                PhenoStatus::PHENO_ERR_SHAPE
            );
        }
        let mut buf = vec![0 as c_char; need];
        assert_eq!(f(buf.as_mut_ptr(), need, &mut need), PhenoStatus::PHENO_OK);
        CStr::from_ptr(buf.as_ptr()).to_str().unwrap().to_string()
    }

    #[test]
    fn aggregate_from_arrays_and_read_back_through_accessors() {
        unsafe {
            // 2 wells x 2 sites; one cell with NaN.
            let x: [f32; 12] = [
                1.0,
                10.0,
                3.0,
                30.0,
                5.0,
                50.0,
                f32::NAN,
                0.0,
                2.0,
                20.0,
                4.0,
                40.0,
            ];
            let (_n1, names) = cstrings(&["Metadata_Plate", "Metadata_Well", "Metadata_Site"]);
            let (_n2, values) = cstrings(&[
                "P", "P", "P", "P", "P", "P", // plate
                "A01", "A01", "A01", "B01", "B01", "B01", // well
                "1", "1", "2", "1", "1", "2", // site
            ]);
            let mut o = pheno_aggregate_default_options();
            o.level = PhenoAggregateLevel::PHENO_LEVEL_WELL;
            let empty_c = CString::new("").unwrap();
            o.treatment_column = empty_c.as_ptr();
            let mut p: *mut PhenoProfiles = std::ptr::null_mut();
            let st = pheno_aggregate(
                x.as_ptr(),
                6,
                2,
                std::ptr::null(),
                names.as_ptr(),
                3,
                values.as_ptr(),
                &o,
                &mut p,
            );
            assert_eq!(st, PhenoStatus::PHENO_OK);
            let (mut n, mut d, mut m) = (0, 0, 0);
            assert_eq!(
                pheno_profiles_info(p, &mut n, &mut d, &mut m),
                PhenoStatus::PHENO_OK
            );
            assert_eq!((n, d, m), (2, 2, 4));
            let mut data = [0.0f64; 4];
            assert_eq!(
                pheno_profiles_data(p, data.as_mut_ptr(), 4),
                PhenoStatus::PHENO_OK
            );
            // A01: sites median(1,3)=2 and 5 → 3.5; B01: site 1 has only the cell 2 (NaN row
            // dropped) and site 2 has 4 → 3.
            assert_eq!(data, [3.5, 35.0, 3.0, 30.0]);
            assert_eq!(
                pheno_profiles_data(p, data.as_mut_ptr(), 3),
                PhenoStatus::PHENO_ERR_SHAPE
            );
            let name = text(|b, l, nd| pheno_profiles_meta_name(p, 1, b, l, nd));
            assert_eq!(name, "Metadata_Well");
            let v = text(|b, l, nd| pheno_profiles_meta_value(p, 1, 1, b, l, nd));
            assert_eq!(v, "B01");
            assert_eq!(
                text(|b, l, nd| pheno_profiles_feature_name(p, 1, b, l, nd)),
                "feature_1"
            );
            let mut need = 0;
            pheno_profiles_meta_column(p, 1, std::ptr::null_mut(), 0, &mut need);
            let mut buf = vec![0u8; need];
            assert_eq!(
                pheno_profiles_meta_column(p, 1, buf.as_mut_ptr() as *mut c_char, need, &mut need),
                PhenoStatus::PHENO_OK
            );
            assert_eq!(buf, b"A01\0B01\0");
            let wanted = CString::new("Metadata_Well").unwrap();
            let mut idx = 9;
            assert_eq!(
                pheno_profiles_meta_index(p, wanted.as_ptr(), &mut idx),
                PhenoStatus::PHENO_OK
            );
            assert_eq!(idx, 1);
            let nope = CString::new("Metadata_Nope").unwrap();
            assert_eq!(
                pheno_profiles_meta_index(p, nope.as_ptr(), &mut idx),
                PhenoStatus::PHENO_ERR_INVALID_ARGUMENT
            );
            assert_eq!(
                pheno_profiles_meta_value(p, 9, 0, std::ptr::null_mut(), 0, &mut need),
                PhenoStatus::PHENO_ERR_INVALID_ARGUMENT
            );
            let mut count = 9;
            pheno_profiles_empty_groups(p, &mut count);
            assert_eq!(count, 0);
            pheno_profiles_free(p);
            pheno_profiles_free(std::ptr::null_mut());

            // Treatment level without a treatment column, and bad enums, are errors.
            o.level = PhenoAggregateLevel::PHENO_LEVEL_TREATMENT;
            let st = pheno_aggregate(
                x.as_ptr(),
                6,
                2,
                std::ptr::null(),
                names.as_ptr(),
                3,
                values.as_ptr(),
                &o,
                &mut p,
            );
            assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
            assert!(p.is_null());
            let mut raw = pheno_aggregate_default_options();
            (std::ptr::addr_of_mut!(raw.site_op) as *mut i32).write(5);
            assert!(agg_opts(&raw).is_err());
            // An older caller's shorter struct: fields past struct_size keep their defaults.
            let mut old = pheno_aggregate_default_options();
            old.site_op = PhenoReduce::PHENO_REDUCE_MEAN;
            old.level = PhenoAggregateLevel::PHENO_LEVEL_SITE;
            old.struct_size = offset_of!(PhenoAggregateOptions, well_op);
            let r = agg_opts(&old).unwrap();
            assert_eq!((r.opts.site_op, r.level), (Reduce::Mean, Level::Treatment));
            old.struct_size = size_of::<PhenoAggregateOptions>() + 8;
            assert!(agg_opts(&old).is_err());
            // A NULL metadata value names its column and row.
            let mut vals = values.clone();
            vals[7] = std::ptr::null();
            let o = pheno_aggregate_default_options();
            let st = pheno_aggregate(
                x.as_ptr(),
                6,
                2,
                std::ptr::null(),
                names.as_ptr(),
                3,
                vals.as_ptr(),
                &o,
                &mut p,
            );
            assert_eq!(st, PhenoStatus::PHENO_ERR_NULL_POINTER);
            let msg = CStr::from_ptr(super::super::status::pheno_last_error())
                .to_string_lossy()
                .to_string();
            assert!(
                msg.contains("Metadata_Well") && msg.contains("row 1"),
                "{msg}"
            );
        }
    }

    #[test]
    fn new_write_read_round_trip() {
        unsafe {
            let dir = tempfile::tempdir().unwrap();
            let x = [1.0, 2.0, 3.0, f64::NAN];
            let (_f, feats) = cstrings(&["a", "b"]);
            let (_m, names) = cstrings(&["Metadata_X"]);
            let (_v, values) = cstrings(&["u", "v"]);
            let mut p: *mut PhenoProfiles = std::ptr::null_mut();
            assert_eq!(
                pheno_profiles_new(
                    x.as_ptr(),
                    2,
                    2,
                    feats.as_ptr(),
                    names.as_ptr(),
                    1,
                    values.as_ptr(),
                    &mut p
                ),
                PhenoStatus::PHENO_OK
            );
            for ext in ["csv", "parquet"] {
                let path =
                    CString::new(dir.path().join(format!("t.{ext}")).to_str().unwrap()).unwrap();
                assert_eq!(
                    pheno_profiles_write(p, path.as_ptr(), std::ptr::null()),
                    PhenoStatus::PHENO_OK
                );
                let mut q: *mut PhenoProfiles = std::ptr::null_mut();
                assert_eq!(
                    pheno_profiles_read(path.as_ptr(), std::ptr::null(), &mut q),
                    PhenoStatus::PHENO_OK
                );
                let (a, b) = (&(*p).table, &(*q).table);
                assert_eq!((&a.meta, &a.feature_names), (&b.meta, &b.feature_names));
                assert!(b.data[3].is_nan() && a.data[..3] == b.data[..3]);
                pheno_profiles_free(q);
            }
            let mut need = 0;
            pheno_profiles_feature_names(p, std::ptr::null_mut(), 0, &mut need);
            assert_eq!(need, 4);
            pheno_profiles_free(p);
            // n rows claimed, but neither features nor metadata to hold them.
            let st = pheno_profiles_new(
                std::ptr::null(),
                3,
                0,
                std::ptr::null(),
                std::ptr::null(),
                0,
                std::ptr::null(),
                &mut p,
            );
            assert_eq!(st, PhenoStatus::PHENO_ERR_SHAPE);
            assert!(p.is_null());
        }
    }
}
