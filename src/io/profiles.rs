//! Profile tables in pycytominer layout: `Metadata_*` columns (kept as strings) beside numeric
//! feature columns (f64, row-major), as aggregation produces them and sphering, Harmony and the
//! metrics consume them. Readers and writers for CSV, Parquet and `.npy` live here too.

use super::npz::{decode_npy, encode_npy, NpyArray};
use super::write_atomic;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// A table of `n_rows()` profiles: metadata columns (strings) and `n_features()` feature columns.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profiles {
    /// Metadata column names (pycytominer: `Metadata_Plate`, `Metadata_Well`, ...).
    pub meta_names: Vec<String>,
    /// `meta[column][row]`.
    pub meta: Vec<Vec<String>>,
    pub feature_names: Vec<String>,
    /// `n_rows() × n_features()` row-major.
    pub data: Vec<f64>,
}

impl Profiles {
    /// Checks that the parts agree (column lengths, data length, unique names).
    pub fn new(
        meta_names: Vec<String>,
        meta: Vec<Vec<String>>,
        feature_names: Vec<String>,
        data: Vec<f64>,
    ) -> Result<Self> {
        let p = Profiles {
            meta_names,
            meta,
            feature_names,
            data,
        };
        p.validate()?;
        Ok(p)
    }

    pub fn validate(&self) -> Result<()> {
        if self.meta_names.len() != self.meta.len() {
            return Err(Error::Shape(format!(
                "profiles: {} metadata names but {} metadata columns",
                self.meta_names.len(),
                self.meta.len()
            )));
        }
        let d = self.feature_names.len();
        let n = if d == 0 {
            self.meta.first().map_or(0, |c| c.len())
        } else {
            if !self.data.len().is_multiple_of(d) {
                return Err(Error::Shape(format!(
                    "profiles: {} values is not a multiple of {d} features",
                    self.data.len()
                )));
            }
            self.data.len() / d
        };
        if d == 0 && !self.data.is_empty() {
            return Err(Error::Shape("profiles: values but no feature names".into()));
        }
        for (name, col) in self.meta_names.iter().zip(&self.meta) {
            if col.len() != n {
                return Err(Error::Shape(format!(
                    "profiles: metadata column {name:?} has {} rows, features have {n}",
                    col.len()
                )));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for name in self.meta_names.iter().chain(&self.feature_names) {
            if !seen.insert(name.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "profiles: column {name:?} appears twice"
                )));
            }
        }
        Ok(())
    }

    pub fn n_rows(&self) -> usize {
        match self.feature_names.len() {
            0 => self.meta.first().map_or(0, |c| c.len()),
            d => self.data.len() / d,
        }
    }

    pub fn n_features(&self) -> usize {
        self.feature_names.len()
    }

    pub fn row(&self, i: usize) -> &[f64] {
        let d = self.n_features();
        &self.data[i * d..(i + 1) * d]
    }

    /// A metadata column by name, or an error naming it and the columns there are.
    pub fn meta_column(&self, name: &str) -> Result<&[String]> {
        self.meta_names
            .iter()
            .position(|m| m == name)
            .map(|i| self.meta[i].as_slice())
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "profiles: no metadata column {name:?} (metadata columns: {})",
                    self.meta_names.join(", ")
                ))
            })
    }

    /// The rows `rows` (in that order) as a new table.
    pub fn select_rows(&self, rows: &[usize]) -> Profiles {
        let d = self.n_features();
        let mut data = Vec::with_capacity(rows.len() * d);
        for &r in rows {
            data.extend_from_slice(self.row(r));
        }
        Profiles {
            meta_names: self.meta_names.clone(),
            meta: self
                .meta
                .iter()
                .map(|c| rows.iter().map(|&r| c[r].clone()).collect())
                .collect(),
            feature_names: self.feature_names.clone(),
            data,
        }
    }
}

/// Splits an annotation cell into labels: `|`-separated, each trimmed, empty ones dropped
/// (`"a|b"` → `["a", "b"]`, `""` → `[]`).
pub fn split_labels(cell: &str) -> Vec<String> {
    cell.split('|')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

// ---- reading and writing ------------------------------------------------------------------------

/// File formats of a profile table, chosen by the path's extension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableFormat {
    /// `.csv` (comma) or `.tsv` (tab), pycytominer layout.
    Csv { delimiter: u8, gzip: bool },
    /// `.parquet` / `.pq`.
    Parquet,
    /// `.npy`: the feature matrix only (metadata in a CSV beside it when asked).
    Npy,
}

impl TableFormat {
    /// `.csv`, `.tsv`, `.csv.gz`, `.tsv.gz`, `.parquet`, `.pq` or `.npy` (case-insensitive).
    pub fn from_path(path: &Path) -> Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let (base, gzip) = match name.strip_suffix(".gz") {
            Some(b) => (b, true),
            None => (name.as_str(), false),
        };
        let fmt = if base.ends_with(".csv") {
            TableFormat::Csv {
                delimiter: b',',
                gzip,
            }
        } else if base.ends_with(".tsv") {
            TableFormat::Csv {
                delimiter: b'\t',
                gzip,
            }
        } else if !gzip && (base.ends_with(".parquet") || base.ends_with(".pq")) {
            TableFormat::Parquet
        } else if !gzip && base.ends_with(".npy") {
            TableFormat::Npy
        } else {
            return Err(Error::InvalidArgument(format!(
                "{}: unknown profile table format (expected .csv, .tsv, .csv.gz, .tsv.gz, .parquet, .pq or .npy)",
                path.display()
            )));
        };
        Ok(fmt)
    }
}

/// How to read a profile table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReadOptions {
    /// The metadata columns by name (all others are features); None = every column whose name
    /// starts with `Metadata_` (pycytominer's convention).
    pub metadata_columns: Option<Vec<String>>,
    /// `.npy` only: a CSV (or TSV) whose columns are the rows' metadata, one row per matrix row.
    pub npy_metadata: Option<PathBuf>,
}

/// How to write a profile table.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WriteOptions {
    /// `.npy` only: store float32 (default float64).
    pub npy_f32: bool,
    /// `.npy` only: also write the metadata columns to this CSV (or TSV).
    pub npy_metadata: Option<PathBuf>,
}

/// Prefix of pycytominer's metadata columns.
pub const METADATA_PREFIX: &str = "Metadata_";

/// Reads a profile table; the format follows the extension (`TableFormat::from_path`).
///
/// - CSV/TSV: a header line; empty cells and pandas' NA spellings (`NaN`, `nan`, `NA`, `N/A`,
///   `NULL`, `null`, `None`, `<NA>`, ...) in feature columns read as NaN, `inf`/`-inf` as ±∞; any other
///   text in a feature column is an error naming the file, line and column. A column with an empty
///   name (the index `DataFrame.to_csv` writes by default) is skipped.
/// - Parquet (as pandas/pyarrow write it): INT32/INT64 (signed or unsigned), FLOAT, DOUBLE,
///   BOOLEAN and UTF-8 BYTE_ARRAY columns, plain or dictionary-encoded (pandas categoricals),
///   snappy-compressed (pandas' default) or uncompressed; other codecs are an error.
///   Nulls read as NaN in feature columns and "" in metadata columns; numbers in metadata columns
///   become their decimal text. Nested, repeated, date/time and decimal columns are rejected
///   naming the column; pandas index columns (`__index_level_0__`, ...) are skipped.
/// - `.npy`: a 2-D float or integer matrix; features are named `feature_0`, `feature_1`, ...;
///   metadata come from `opts.npy_metadata` when given.
pub fn read_profiles(path: &Path, opts: &ReadOptions) -> Result<Profiles> {
    match TableFormat::from_path(path)? {
        TableFormat::Csv { delimiter, gzip } => {
            let bytes = read_bytes(path)?;
            let bytes = if gzip { gunzip(&bytes, path)? } else { bytes };
            parse_profiles_csv(&bytes, delimiter, path, opts)
        }
        TableFormat::Parquet => read_profiles_parquet(path, opts),
        TableFormat::Npy => read_profiles_npy(path, opts),
    }
}

/// Writes a profile table atomically; the format follows the extension.
///
/// - CSV/TSV: metadata columns, then feature columns; NaN as an empty cell (as pandas writes it),
///   numbers in the shortest text that reads back to the same f64.
/// - Parquet: metadata as UTF-8 BYTE_ARRAY (dictionary-encoded), features as DOUBLE, all
///   REQUIRED, snappy-compressed; pandas/pyarrow read it as object and float64 columns.
/// - `.npy`: the feature matrix (float64, or float32 with `opts.npy_f32`); the metadata go to
///   `opts.npy_metadata` when given, else they are not written.
pub fn write_profiles(path: &Path, p: &Profiles, opts: &WriteOptions) -> Result<()> {
    p.validate()?;
    match TableFormat::from_path(path)? {
        TableFormat::Csv { delimiter, gzip } => {
            let bytes = encode_profiles_csv(p, delimiter)?;
            let bytes = if gzip { gzip_bytes(&bytes)? } else { bytes };
            write_atomic(path, &bytes)
        }
        TableFormat::Parquet => write_atomic(path, &encode_profiles_parquet(p)?),
        TableFormat::Npy => {
            let (n, d) = (p.n_rows(), p.n_features());
            let arr = if opts.npy_f32 {
                NpyArray::F32 {
                    shape: vec![n, d],
                    data: p.data.iter().map(|&v| v as f32).collect(),
                }
            } else {
                NpyArray::F64 {
                    shape: vec![n, d],
                    data: p.data.clone(),
                }
            };
            if let Some(meta_path) = &opts.npy_metadata {
                let meta_only = Profiles {
                    meta_names: p.meta_names.clone(),
                    meta: p.meta.clone(),
                    feature_names: Vec::new(),
                    data: Vec::new(),
                };
                let delimiter = match TableFormat::from_path(meta_path)? {
                    TableFormat::Csv {
                        delimiter,
                        gzip: false,
                    } => delimiter,
                    _ => {
                        return Err(Error::InvalidArgument(format!(
                            "npy metadata file {} must be a .csv or .tsv",
                            meta_path.display()
                        )))
                    }
                };
                write_atomic(meta_path, &encode_profiles_csv(&meta_only, delimiter)?)?;
            }
            write_atomic(path, &encode_npy(&arr)?)
        }
    }
}

fn read_bytes(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))
}

fn gunzip(bytes: &[u8], path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(bytes)
        .read_to_end(&mut out)
        .map_err(|e| Error::Format(format!("{}: not a valid gzip file: {e}", path.display())))?;
    Ok(out)
}

fn gzip_bytes(bytes: &[u8]) -> Result<Vec<u8>> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    enc.write_all(bytes)
        .and_then(|_| enc.finish())
        .map_err(|e| Error::Internal(format!("gzip writer: {e}")))
}

/// Which of `names` are metadata: the named ones (each must exist), else the `Metadata_` ones.
fn metadata_mask(names: &[String], opts: &ReadOptions, source: &Path) -> Result<Vec<bool>> {
    match &opts.metadata_columns {
        None => Ok(names
            .iter()
            .map(|n| n.starts_with(METADATA_PREFIX))
            .collect()),
        Some(list) => {
            let missing: Vec<String> = list
                .iter()
                .filter(|m| !names.contains(m))
                .map(|m| format!("{m:?}"))
                .collect();
            if !missing.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "{}: no metadata column {} (columns: {})",
                    source.display(),
                    missing.join(", "),
                    names.join(", ")
                )));
            }
            Ok(names.iter().map(|n| list.contains(n)).collect())
        }
    }
}

/// pandas `read_csv`'s default NA spellings (its `STR_NA_VALUES`).
fn is_na_text(t: &str) -> bool {
    matches!(
        t,
        "" | "NaN"
            | "nan"
            | "-NaN"
            | "-nan"
            | "NA"
            | "N/A"
            | "n/a"
            | "NULL"
            | "null"
            | "None"
            | "<NA>"
            | "#N/A"
            | "#N/A N/A"
            | "#NA"
            | "-1.#IND"
            | "-1.#QNAN"
            | "1.#IND"
            | "1.#QNAN"
    )
}

/// Parses a CSV (`delimiter` `b','`) or TSV (`b'\t'`) profile table; `source` names it in errors.
pub fn parse_profiles_csv(
    bytes: &[u8],
    delimiter: u8,
    source: &Path,
    opts: &ReadOptions,
) -> Result<Profiles> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes);
    let src = source.display();
    let bad = |e: csv::Error| Error::Format(format!("{src}: {e}"));
    let header: Vec<String> = rdr
        .headers()
        .map_err(bad)?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if header.iter().all(|h| h.is_empty()) {
        return Err(Error::Format(format!("{src}: no header line")));
    }
    // Columns kept (an unnamed column is pandas' index).
    let kept: Vec<usize> = (0..header.len())
        .filter(|&i| !header[i].is_empty())
        .collect();
    let names: Vec<String> = kept.iter().map(|&i| header[i].clone()).collect();
    let is_meta = metadata_mask(&names, opts, source)?;
    let (mut meta_names, mut meta_cols, mut feature_names, mut feat_cols) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (k, &i) in kept.iter().enumerate() {
        if is_meta[k] {
            meta_names.push(names[k].clone());
            meta_cols.push(i);
        } else {
            feature_names.push(names[k].clone());
            feat_cols.push(i);
        }
    }
    let mut meta: Vec<Vec<String>> = vec![Vec::new(); meta_cols.len()];
    let mut data = Vec::new();
    let mut rec = csv::ByteRecord::new();
    while rdr.read_byte_record(&mut rec).map_err(bad)? {
        let line = rec.position().map_or(0, |p| p.line());
        for (k, &i) in meta_cols.iter().enumerate() {
            let v = std::str::from_utf8(&rec[i]).map_err(|_| {
                Error::Format(format!(
                    "{src} line {line}: column {:?} is not valid UTF-8",
                    header[i]
                ))
            })?;
            meta[k].push(v.to_string());
        }
        for &i in &feat_cols {
            data.push(parse_number(&rec[i]).ok_or_else(|| {
                Error::Format(format!(
                    "{src} line {line}: feature column {:?} holds {:?}, not a number (name it as a metadata column if it is one)",
                    header[i],
                    String::from_utf8_lossy(&rec[i])
                ))
            })?);
        }
    }
    Profiles::new(meta_names, meta, feature_names, data)
        .map_err(|e| Error::Format(format!("{src}: {e}")))
}

fn parse_number(cell: &[u8]) -> Option<f64> {
    let t = std::str::from_utf8(cell).ok()?.trim();
    if is_na_text(t) {
        return Some(f64::NAN);
    }
    t.parse::<f64>().ok()
}

/// Shortest text that parses back to `v` (NaN as "" like pandas; exponent form outside
/// 1e-4..1e16 so tiny and huge values stay short).
pub fn format_number(v: f64) -> String {
    if v.is_nan() {
        String::new()
    } else if v == 0.0 || v.is_infinite() || (1e-4..1e16).contains(&v.abs()) {
        format!("{v}")
    } else {
        format!("{v:e}")
    }
}

/// The table as CSV (`b','`) or TSV (`b'\t'`) bytes: metadata columns, then features.
pub fn encode_profiles_csv(p: &Profiles, delimiter: u8) -> Result<Vec<u8>> {
    p.validate()?;
    let mut w = csv::WriterBuilder::new()
        .delimiter(delimiter)
        .from_writer(Vec::new());
    let err = |e: csv::Error| Error::Internal(format!("CSV writer: {e}"));
    w.write_record(p.meta_names.iter().chain(&p.feature_names))
        .map_err(err)?;
    let mut rec = csv::ByteRecord::new();
    for i in 0..p.n_rows() {
        rec.clear();
        for col in &p.meta {
            rec.push_field(col[i].as_bytes());
        }
        for &v in p.row(i) {
            rec.push_field(format_number(v).as_bytes());
        }
        w.write_byte_record(&rec).map_err(err)?;
    }
    w.into_inner()
        .map_err(|e| Error::Internal(format!("CSV writer: {e}")))
}

fn read_profiles_npy(path: &Path, opts: &ReadOptions) -> Result<Profiles> {
    let arr = decode_npy(&read_bytes(path)?, &path.display().to_string())?;
    let (shape, data): (Vec<usize>, Vec<f64>) = match arr {
        NpyArray::F32 { shape, data } => (shape, data.into_iter().map(f64::from).collect()),
        NpyArray::F64 { shape, data } => (shape, data),
        NpyArray::I64 { shape, data } => (shape, data.into_iter().map(|v| v as f64).collect()),
        NpyArray::Str { shape, .. } | NpyArray::Other { shape, .. } => {
            return Err(Error::DType(format!(
                "{}: expected a numeric matrix, got a non-numeric array of shape {shape:?}",
                path.display()
            )))
        }
    };
    if shape.len() != 2 {
        return Err(Error::Shape(format!(
            "{}: expected a 2-D (rows, features) matrix, got shape {shape:?}",
            path.display()
        )));
    }
    let (n, d) = (shape[0], shape[1]);
    let (meta_names, meta) = match &opts.npy_metadata {
        None => (Vec::new(), Vec::new()),
        Some(mp) => {
            let TableFormat::Csv { delimiter, gzip } = TableFormat::from_path(mp)? else {
                return Err(Error::InvalidArgument(format!(
                    "npy metadata file {} must be a .csv, .tsv or their .gz",
                    mp.display()
                )));
            };
            let bytes = read_bytes(mp)?;
            let bytes = if gzip { gunzip(&bytes, mp)? } else { bytes };
            let t = parse_metadata_csv(&bytes, delimiter, mp)?;
            let rows = t.meta.first().map_or(0, |c| c.len());
            if !t.meta.is_empty() && rows != n {
                return Err(Error::Shape(format!(
                    "{} has {rows} rows but the matrix {} has {n}",
                    mp.display(),
                    path.display()
                )));
            }
            (t.meta_names, t.meta)
        }
    };
    Profiles::new(
        meta_names,
        meta,
        (0..d).map(|j| format!("feature_{j}")).collect(),
        data,
    )
}

/// A CSV read with every column as metadata (strings).
fn parse_metadata_csv(bytes: &[u8], delimiter: u8, source: &Path) -> Result<Profiles> {
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(true)
        .from_reader(bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes));
    let bad = |e: csv::Error| Error::Format(format!("{}: {e}", source.display()));
    let names: Vec<String> = rdr
        .headers()
        .map_err(bad)?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    let opts = ReadOptions {
        metadata_columns: Some(names.iter().filter(|n| !n.is_empty()).cloned().collect()),
        npy_metadata: None,
    };
    parse_profiles_csv(bytes, delimiter, source, &opts)
}

// ---- parquet ------------------------------------------------------------------------------------

/// Rows per parquet row group: about 64 MiB of feature data.
fn parquet_group_rows(d: usize) -> usize {
    ((64usize << 20) / (8 * d.max(1))).clamp(1024, 1 << 20)
}

/// The table as a parquet file (see `write_profiles`).
pub fn encode_profiles_parquet(p: &Profiles) -> Result<Vec<u8>> {
    use parquet::basic::{Compression, LogicalType, Repetition, Type as Physical};
    use parquet::data_type::{ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::{ColumnPath, Type};
    use std::sync::Arc;

    p.validate()?;
    let perr = |e: parquet::errors::ParquetError| Error::Internal(format!("parquet writer: {e}"));
    let mut fields = Vec::with_capacity(p.meta_names.len() + p.feature_names.len());
    for name in &p.meta_names {
        fields.push(Arc::new(
            Type::primitive_type_builder(name, Physical::BYTE_ARRAY)
                .with_repetition(Repetition::REQUIRED)
                .with_logical_type(Some(LogicalType::String))
                .build()
                .map_err(perr)?,
        ));
    }
    for name in &p.feature_names {
        fields.push(Arc::new(
            Type::primitive_type_builder(name, Physical::DOUBLE)
                .with_repetition(Repetition::REQUIRED)
                .build()
                .map_err(perr)?,
        ));
    }
    let schema = Arc::new(
        Type::group_type_builder("schema")
            .with_fields(fields)
            .build()
            .map_err(perr)?,
    );
    let mut props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_dictionary_enabled(false)
        .set_created_by(format!("phenocore {}", env!("CARGO_PKG_VERSION")));
    for name in &p.meta_names {
        props = props.set_column_dictionary_enabled(ColumnPath::new(vec![name.clone()]), true);
    }
    let mut w =
        SerializedFileWriter::new(Vec::new(), schema, Arc::new(props.build())).map_err(perr)?;
    let (n, d) = (p.n_rows(), p.n_features());
    let step = parquet_group_rows(d);
    let mut col = Vec::with_capacity(step.min(n));
    let mut start = 0;
    while start < n || (n == 0 && start == 0) {
        let end = (start + step).min(n);
        let mut rg = w.next_row_group().map_err(perr)?;
        let mut k = 0;
        while let Some(mut cw) = rg.next_column().map_err(perr)? {
            if k < p.meta.len() {
                let vals: Vec<ByteArray> = p.meta[k][start..end]
                    .iter()
                    .map(|s| ByteArray::from(s.as_str()))
                    .collect();
                cw.typed::<ByteArrayType>()
                    .write_batch(&vals, None, None)
                    .map_err(perr)?;
            } else {
                let j = k - p.meta.len();
                col.clear();
                col.extend((start..end).map(|i| p.data[i * d + j]));
                cw.typed::<DoubleType>()
                    .write_batch(&col, None, None)
                    .map_err(perr)?;
            }
            cw.close().map_err(perr)?;
            k += 1;
        }
        rg.close().map_err(perr)?;
        if n == 0 {
            break;
        }
        start = end;
    }
    w.into_inner().map_err(perr)
}

/// One decoded parquet column.
enum ParquetColumn {
    Numbers(Vec<f64>),
    Strings(Vec<String>),
}

/// Reads a parquet profile table (see `read_profiles`).
pub fn read_profiles_parquet(path: &Path, opts: &ReadOptions) -> Result<Profiles> {
    // A malformed file can make the parquet crate panic; report it as a format error.
    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_parquet_inner(path, opts)
    }));
    match res {
        Ok(r) => r,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(Error::Format(format!(
                "{}: malformed parquet file (the reader failed: {msg})",
                path.display()
            )))
        }
    }
}

fn read_parquet_inner(path: &Path, opts: &ReadOptions) -> Result<Profiles> {
    use parquet::basic::{LogicalType, Type as Physical};
    use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
    use parquet::data_type::DataType;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    let src = path.display();
    let file =
        std::fs::File::open(path).map_err(|e| Error::Io(format!("cannot read {src}: {e}")))?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| Error::Format(format!("{src}: not a readable parquet file: {e}")))?;
    let perr = |e: parquet::errors::ParquetError| Error::Format(format!("{src}: {e}"));
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let n = usize::try_from(meta.file_metadata().num_rows())
        .map_err(|_| Error::Format(format!("{src}: negative row count")))?;

    // Leaf columns: only top-level, non-repeated ones are table columns.
    let mut cols = Vec::new();
    for (i, c) in schema.columns().iter().enumerate() {
        let name = c.path().string();
        if c.path().parts().len() != 1 || c.max_rep_level() > 0 {
            return Err(Error::Unsupported(format!(
                "{src}: column {name:?} is nested or repeated; only flat tables are read"
            )));
        }
        if name.starts_with("__index_level_") {
            continue;
        }
        if let Some(lt) = c.logical_type_ref() {
            if !matches!(
                lt,
                LogicalType::String | LogicalType::Integer(_) | LogicalType::Enum
            ) {
                return Err(Error::Unsupported(format!(
                    "{src}: column {name:?} has logical type {lt:?}; numbers and strings only"
                )));
            }
        }
        match c.physical_type() {
            Physical::INT96 | Physical::FIXED_LEN_BYTE_ARRAY => {
                return Err(Error::Unsupported(format!(
                    "{src}: column {name:?} has physical type {}; numbers and strings only",
                    c.physical_type()
                )))
            }
            _ => {}
        }
        cols.push((i, name));
    }
    let names: Vec<String> = cols.iter().map(|(_, n)| n.clone()).collect();
    if let Some(dup) = names
        .iter()
        .enumerate()
        .find(|(i, n)| names[..*i].contains(n))
    {
        return Err(Error::Format(format!(
            "{src}: column {:?} appears twice",
            dup.1
        )));
    }
    let is_meta = metadata_mask(&names, opts, path)?;

    fn drain<T: DataType>(
        r: &mut ColumnReaderImpl<T>,
        rows: usize,
        nullable: bool,
    ) -> parquet::errors::Result<(Vec<T::T>, Vec<i16>)> {
        let (mut vals, mut defs) = (Vec::with_capacity(rows), Vec::new());
        let mut read = 0;
        while read < rows {
            let want = (rows - read).min(1 << 16);
            let (recs, _, _) =
                r.read_records(want, nullable.then_some(&mut defs), None, &mut vals)?;
            if recs == 0 {
                break;
            }
            read += recs;
        }
        Ok((vals, defs))
    }

    let mut out: Vec<ParquetColumn> = cols
        .iter()
        .enumerate()
        .map(|(k, _)| {
            if is_meta[k] {
                ParquetColumn::Strings(Vec::with_capacity(n))
            } else {
                ParquetColumn::Numbers(Vec::with_capacity(n))
            }
        })
        .collect();
    for g in 0..reader.num_row_groups() {
        let rg = reader.get_row_group(g).map_err(perr)?;
        let rows = usize::try_from(rg.metadata().num_rows()).unwrap_or(0);
        for (k, &(ci, ref name)) in cols.iter().enumerate() {
            let desc = schema.column(ci);
            let nullable = desc.max_def_level() > 0;
            let max_def = desc.max_def_level();
            let unsigned = matches!(
                desc.logical_type_ref(),
                Some(LogicalType::Integer(t)) if !t.is_signed
            );
            // Values as f64 or as text, then spread over the rows by the definition levels.
            enum Vals {
                Num(Vec<f64>),
                Text(Vec<String>),
            }
            let (vals, defs) = match rg.get_column_reader(ci).map_err(perr)? {
                ColumnReader::BoolColumnReader(mut r) => {
                    let (v, d) = drain(&mut r, rows, nullable).map_err(perr)?;
                    (
                        if is_meta[k] {
                            Vals::Text(
                                v.iter()
                                    .map(|&b| if b { "True" } else { "False" }.to_string())
                                    .collect(),
                            )
                        } else {
                            Vals::Num(v.iter().map(|&b| b as u8 as f64).collect())
                        },
                        d,
                    )
                }
                ColumnReader::Int32ColumnReader(mut r) => {
                    let (v, d) = drain(&mut r, rows, nullable).map_err(perr)?;
                    let v: Vec<i64> = if unsigned {
                        v.iter().map(|&x| x as u32 as i64).collect()
                    } else {
                        v.iter().map(|&x| x as i64).collect()
                    };
                    (
                        if is_meta[k] {
                            Vals::Text(v.iter().map(|x| x.to_string()).collect())
                        } else {
                            Vals::Num(v.iter().map(|&x| x as f64).collect())
                        },
                        d,
                    )
                }
                ColumnReader::Int64ColumnReader(mut r) => {
                    let (v, d) = drain(&mut r, rows, nullable).map_err(perr)?;
                    (
                        match (is_meta[k], unsigned) {
                            (true, true) => {
                                Vals::Text(v.iter().map(|&x| (x as u64).to_string()).collect())
                            }
                            (true, false) => Vals::Text(v.iter().map(|x| x.to_string()).collect()),
                            (false, true) => {
                                Vals::Num(v.iter().map(|&x| x as u64 as f64).collect())
                            }
                            (false, false) => Vals::Num(v.iter().map(|&x| x as f64).collect()),
                        },
                        d,
                    )
                }
                ColumnReader::FloatColumnReader(mut r) => {
                    let (v, d) = drain(&mut r, rows, nullable).map_err(perr)?;
                    (
                        if is_meta[k] {
                            Vals::Text(v.iter().map(|&x| format_number(x as f64)).collect())
                        } else {
                            Vals::Num(v.iter().map(|&x| x as f64).collect())
                        },
                        d,
                    )
                }
                ColumnReader::DoubleColumnReader(mut r) => {
                    let (v, d) = drain(&mut r, rows, nullable).map_err(perr)?;
                    (
                        if is_meta[k] {
                            Vals::Text(v.iter().map(|&x| format_number(x)).collect())
                        } else {
                            Vals::Num(v)
                        },
                        d,
                    )
                }
                ColumnReader::ByteArrayColumnReader(mut r) => {
                    if !is_meta[k] {
                        return Err(Error::Format(format!(
                            "{src}: feature column {name:?} holds strings (name it as a metadata column if it is one)"
                        )));
                    }
                    let (v, d) = drain(&mut r, rows, nullable).map_err(perr)?;
                    let text = v
                        .iter()
                        .map(|b| {
                            std::str::from_utf8(b.data())
                                .map(str::to_string)
                                .map_err(|_| {
                                    Error::Format(format!(
                                        "{src}: column {name:?} holds bytes that are not UTF-8"
                                    ))
                                })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (Vals::Text(text), d)
                }
                _ => {
                    return Err(Error::Unsupported(format!(
                        "{src}: column {name:?}: unsupported physical type"
                    )))
                }
            };
            let count = match &vals {
                Vals::Num(v) => v.len(),
                Vals::Text(v) => v.len(),
            };
            let present: Option<Vec<bool>> =
                nullable.then(|| defs.iter().map(|&l| l == max_def).collect());
            let got_rows = present.as_ref().map_or(count, |p| p.len());
            let got_vals = present
                .as_ref()
                .map_or(count, |p| p.iter().filter(|&&b| b).count());
            if got_rows != rows || got_vals != count {
                return Err(Error::Format(format!(
                    "{src}: column {name:?} in row group {g} has {got_rows} rows, expected {rows}"
                )));
            }
            match (&mut out[k], vals) {
                (ParquetColumn::Numbers(o), Vals::Num(v)) => match &present {
                    None => o.extend(v),
                    Some(p) => {
                        let mut it = v.into_iter();
                        o.extend(p.iter().map(|&b| {
                            if b {
                                it.next().unwrap_or(f64::NAN)
                            } else {
                                f64::NAN
                            }
                        }));
                    }
                },
                (ParquetColumn::Strings(o), Vals::Text(v)) => match &present {
                    None => o.extend(v),
                    Some(p) => {
                        let mut it = v.into_iter();
                        o.extend(p.iter().map(|&b| {
                            if b {
                                it.next().unwrap_or_default()
                            } else {
                                String::new()
                            }
                        }));
                    }
                },
                _ => {
                    return Err(Error::Internal(format!(
                        "{src}: column {name:?} decoded as the wrong kind"
                    )))
                }
            }
        }
    }
    let (mut meta_names, mut meta, mut feature_names, mut feats) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (k, col) in out.into_iter().enumerate() {
        match col {
            ParquetColumn::Strings(v) => {
                meta_names.push(names[k].clone());
                meta.push(v);
            }
            ParquetColumn::Numbers(v) => {
                feature_names.push(names[k].clone());
                feats.push(v);
            }
        }
    }
    let d = feats.len();
    let mut data = vec![0.0; n * d];
    for (j, col) in feats.iter().enumerate() {
        if col.len() != n {
            return Err(Error::Format(format!(
                "{src}: column {:?} has {} rows, the file says {n}",
                feature_names[j],
                col.len()
            )));
        }
        for (i, &v) in col.iter().enumerate() {
            data[i * d + j] = v;
        }
    }
    Profiles::new(meta_names, meta, feature_names, data)
        .map_err(|e| Error::Format(format!("{src}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csv(text: &str, opts: &ReadOptions) -> Result<Profiles> {
        parse_profiles_csv(text.as_bytes(), b',', Path::new("t.csv"), opts)
    }

    #[test]
    fn formats_by_extension() {
        let f = |p: &str| TableFormat::from_path(Path::new(p));
        assert_eq!(
            f("a/B.CSV").unwrap(),
            TableFormat::Csv {
                delimiter: b',',
                gzip: false
            }
        );
        assert_eq!(
            f("b.tsv.gz").unwrap(),
            TableFormat::Csv {
                delimiter: b'\t',
                gzip: true
            }
        );
        assert_eq!(f("c.parquet").unwrap(), TableFormat::Parquet);
        assert_eq!(f("c.pq").unwrap(), TableFormat::Parquet);
        assert_eq!(f("d.npy").unwrap(), TableFormat::Npy);
        let e = f("e.xlsx").unwrap_err().to_string();
        assert!(e.contains("e.xlsx") && e.contains(".parquet"), "{e}");
        assert!(f("f.parquet.gz").is_err());
    }

    #[test]
    fn csv_na_spellings_index_column_and_explicit_metadata() {
        let t = ",Metadata_Plate,Cells_A,Plate_Note,Cells_B\n\
                 0,P1,1.5,x,\n\
                 1,P2,NaN,y,-inf\n\
                 2,P3, 2e-3 ,z,<NA>\n";
        let e = csv(t, &ReadOptions::default()).unwrap_err().to_string();
        assert!(
            e.contains("line 2") && e.contains("Plate_Note") && e.contains("\"x\""),
            "{e}"
        );
        let opts = ReadOptions {
            metadata_columns: Some(vec!["Metadata_Plate".into(), "Plate_Note".into()]),
            npy_metadata: None,
        };
        let p = csv(t, &opts).unwrap();
        assert_eq!(p.meta_names, ["Metadata_Plate", "Plate_Note"]);
        assert_eq!(p.feature_names, ["Cells_A", "Cells_B"]);
        assert_eq!(p.meta[1], ["x", "y", "z"]);
        assert_eq!(p.row(0)[0], 1.5);
        assert!(p.row(0)[1].is_nan() && p.row(1)[0].is_nan() && p.row(2)[1].is_nan());
        assert_eq!(p.row(1)[1], f64::NEG_INFINITY);
        assert_eq!(p.row(2)[0], 2e-3);
        let missing = ReadOptions {
            metadata_columns: Some(vec!["Metadata_Nope".into()]),
            npy_metadata: None,
        };
        assert!(csv(t, &missing)
            .unwrap_err()
            .to_string()
            .contains("Metadata_Nope"));
        assert!(csv("A,A\n1,2\n", &ReadOptions::default()).is_err());
        assert!(csv("Metadata_X,F\nq,1\nr\n", &ReadOptions::default()).is_err());
        // Header only: a table with no rows.
        let p = csv("Metadata_X,F\n", &ReadOptions::default()).unwrap();
        assert_eq!((p.n_rows(), p.n_features()), (0, 1));
    }

    #[test]
    fn numbers_print_short_and_read_back_exactly() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..2000 {
            let v = f64::from_bits(rng.gen::<u64>());
            if v.is_nan() {
                continue;
            }
            let t = format_number(v);
            assert_eq!(
                t.parse::<f64>().unwrap().to_bits(),
                v.to_bits(),
                "{v:e} → {t}"
            );
        }
        assert_eq!(format_number(0.1), "0.1");
        assert_eq!(format_number(1e-300), "1e-300");
        assert_eq!(format_number(f64::NAN), "");
        assert_eq!(format_number(-0.0), "-0");
    }

    #[test]
    fn parquet_round_trip_empty_tables_and_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profiles::new(
            vec!["Metadata_A".into()],
            vec![vec!["x".into(), "".into(), "ü".into()]],
            vec!["f".into(), "g".into()],
            vec![1.0, f64::NAN, -0.0, 2.5, f64::INFINITY, 1e-310],
        )
        .unwrap();
        let path = dir.path().join("t.parquet");
        write_profiles(&path, &p, &WriteOptions::default()).unwrap();
        let back = read_profiles(&path, &ReadOptions::default()).unwrap();
        assert_eq!(
            (&back.meta_names, &back.meta, &back.feature_names),
            (&p.meta_names, &p.meta, &p.feature_names)
        );
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&back.data), bits(&p.data));

        let empty = p.select_rows(&[]);
        for name in ["e.parquet", "e.csv"] {
            let path = dir.path().join(name);
            write_profiles(&path, &empty, &WriteOptions::default()).unwrap();
            let back = read_profiles(&path, &ReadOptions::default()).unwrap();
            assert_eq!(back, empty, "{name}");
        }

        let bad = dir.path().join("bad.parquet");
        std::fs::write(&bad, b"PAR1 this is not parquet PAR1").unwrap();
        let e = read_profiles(&bad, &ReadOptions::default()).unwrap_err();
        assert!(
            matches!(&e, Error::Format(m) if m.contains("bad.parquet")),
            "{e}"
        );
        let e =
            read_profiles(&dir.path().join("missing.csv"), &ReadOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Io(_)));
    }

    #[test]
    fn npy_holds_features_and_optionally_metadata_beside() {
        let dir = tempfile::tempdir().unwrap();
        let p = Profiles::new(
            vec!["Metadata_A".into()],
            vec![vec!["1".into(), "2".into()]],
            vec!["f".into(), "g".into(), "h".into()],
            vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        )
        .unwrap();
        let path = dir.path().join("x.npy");
        let wo = WriteOptions {
            npy_f32: true,
            npy_metadata: None,
        };
        write_profiles(&path, &p, &wo).unwrap();
        let back = read_profiles(&path, &ReadOptions::default()).unwrap();
        assert!(back.meta_names.is_empty());
        assert_eq!(
            back.data,
            p.data.iter().map(|&v| v as f32 as f64).collect::<Vec<_>>()
        );
        // A side file with the wrong row count is an error naming both files.
        let side = dir.path().join("m.csv");
        std::fs::write(&side, "Metadata_A\n1\n2\n3\n").unwrap();
        let e = read_profiles(
            &path,
            &ReadOptions {
                metadata_columns: None,
                npy_metadata: Some(side),
            },
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("m.csv") && e.contains("x.npy"), "{e}");
        // A 1-D array is not a table.
        let one = dir.path().join("one.npy");
        std::fs::write(
            &one,
            encode_npy(&NpyArray::F64 {
                shape: vec![3],
                data: vec![1.0; 3],
            })
            .unwrap(),
        )
        .unwrap();
        assert!(matches!(
            read_profiles(&one, &ReadOptions::default()),
            Err(Error::Shape(_))
        ));
    }
}
