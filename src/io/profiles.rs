//! Profile tables in pycytominer layout: `Metadata_*` columns (kept as strings) beside numeric
//! feature columns (f64, row-major), as aggregation produces them and sphering, Harmony and the
//! metrics consume them. Readers and writers for CSV, Parquet and `.npy` live here too.

use crate::error::{Error, Result};

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
            if self.data.len() % d != 0 {
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
