//! Small CSV tables (metadata and location files) read whole into memory, with lookups whose
//! errors name the file, the column and the line. `.tsv` files are tab-separated; a UTF-8 BOM and
//! spaces around header names are ignored.

use super::write_atomic;
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq)]
pub struct Table {
    /// Where the table came from (for messages).
    pub source: PathBuf,
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    /// Index of a column, or an error naming the column, the file and the columns it has.
    pub fn column(&self, name: &str) -> Result<usize> {
        self.headers.iter().position(|h| h == name).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: no column {name:?} (columns: {})",
                self.source.display(),
                self.headers.join(", ")
            ))
        })
    }

    pub fn has_column(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h == name)
    }

    /// Indices of all `names`; the error lists every missing one.
    pub fn columns(&self, names: &[&str]) -> Result<Vec<usize>> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !self.has_column(n))
            .collect();
        if !missing.is_empty() {
            let what = if missing.len() == 1 {
                "column"
            } else {
                "columns"
            };
            return Err(Error::InvalidArgument(format!(
                "{}: missing {what} {} (columns: {})",
                self.source.display(),
                missing
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.headers.join(", ")
            )));
        }
        names.iter().map(|n| self.column(n)).collect()
    }

    /// Line number in the file of data row `row` (header is line 1).
    pub fn line_of(&self, row: usize) -> usize {
        row + 2
    }

    /// Parses column `col` of every row as f32; the error names file, line, column and text.
    pub fn f32_column(&self, col: usize) -> Result<Vec<f32>> {
        self.rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let txt = r[col].trim();
                txt.parse::<f32>().map_err(|_| {
                    Error::Format(format!(
                        "{} line {}: column {:?} holds {txt:?}, not a number",
                        self.source.display(),
                        self.line_of(i),
                        self.headers[col]
                    ))
                })
            })
            .collect()
    }
}

fn delimiter_for(path: &Path) -> u8 {
    match path.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("tsv") => b'\t',
        _ => b',',
    }
}

/// Reads a CSV (or TSV) file with a header line. Every row must have as many fields as the header.
pub fn read_csv(path: &Path) -> Result<Table> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
    parse_csv(&bytes, path)
}

/// Parses CSV bytes; `source` names them in errors.
pub fn parse_csv(bytes: &[u8], source: &Path) -> Result<Table> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(delimiter_for(source))
        .has_headers(true)
        .from_reader(bytes);
    let bad = |e: csv::Error| Error::Format(format!("{}: {e}", source.display()));
    let headers: Vec<String> = rdr
        .headers()
        .map_err(bad)?
        .iter()
        .map(|h| h.trim().to_string())
        .collect();
    if headers.is_empty() || headers.iter().all(|h| h.is_empty()) {
        return Err(Error::Format(format!(
            "{}: no header line",
            source.display()
        )));
    }
    if let Some(dup) = headers
        .iter()
        .enumerate()
        .find(|(i, h)| !h.is_empty() && headers[..*i].contains(h))
    {
        return Err(Error::Format(format!(
            "{}: column {:?} appears twice",
            source.display(),
            dup.1
        )));
    }
    let mut rows = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(bad)?;
        rows.push(rec.iter().map(str::to_string).collect());
    }
    Ok(Table {
        source: source.to_path_buf(),
        headers,
        rows,
    })
}

/// Encodes a table as CSV text.
pub fn encode_csv(headers: &[&str], rows: &[Vec<String>]) -> Result<Vec<u8>> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| Error::Internal(format!("CSV writer: {e}"));
    w.write_record(headers).map_err(err)?;
    for (i, r) in rows.iter().enumerate() {
        if r.len() != headers.len() {
            return Err(Error::Shape(format!(
                "CSV row {i} has {} fields, the header {}",
                r.len(),
                headers.len()
            )));
        }
        w.write_record(r).map_err(err)?;
    }
    w.into_inner()
        .map_err(|e| Error::Internal(format!("CSV writer: {e}")))
}

/// Writes a CSV file atomically.
pub fn write_csv(path: &Path, headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    write_atomic(path, &encode_csv(headers, rows)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_lookups() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.csv");
        let rows = vec![
            vec!["1.5".to_string(), "a,b".into()],
            vec!["-2".into(), "\"q\"".into()],
        ];
        write_csv(&p, &["X", "Name"], &rows).unwrap();
        let t = read_csv(&p).unwrap();
        assert_eq!(t.headers, vec!["X", "Name"]);
        assert_eq!(t.rows, rows);
        assert_eq!(
            t.f32_column(t.column("X").unwrap()).unwrap(),
            vec![1.5, -2.0]
        );
        let e = t.columns(&["X", "Y", "Z"]).unwrap_err().to_string();
        assert!(
            e.contains("\"Y\"") && e.contains("\"Z\"") && e.contains("t.csv"),
            "{e}"
        );
        let e = t.f32_column(1).unwrap_err().to_string();
        assert!(e.contains("line 2") && e.contains("Name"), "{e}");
    }

    #[test]
    fn bom_tsv_and_ragged_rows() {
        let t = parse_csv(b"\xEF\xBB\xBFA\t B\n1\t2\n", Path::new("x.tsv")).unwrap();
        assert_eq!(t.headers, vec!["A", "B"]);
        assert_eq!(t.rows, vec![vec!["1".to_string(), "2".into()]]);
        let e = parse_csv(b"A,B\n1,2\n3\n", Path::new("r.csv"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("r.csv"), "{e}");
        assert!(parse_csv(b"A,A\n1,2\n", Path::new("d.csv")).is_err());
        assert!(parse_csv(b"", Path::new("e.csv")).is_err());
    }
}
