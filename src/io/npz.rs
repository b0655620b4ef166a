//! NumPy `.npy` arrays and `.npz` archives (a zip of `.npy` members, deflate-compressed like
//! `numpy.savez_compressed`), in and out.
//!
//! **Per-site feature files** (`SiteFeatures`) follow DeepProfiler's `features/{plate}/{well}_{site}.npz`
//! with three members:
//! - `features`: float32 (cells, D), row-major — with several layers, their features side by side in
//!   the order requested (the `phenocore_layers` metadata entry gives each layer's width);
//! - `locations`: float32 (cells, 2), columns x, y (the nucleus centres the crops were taken at);
//! - `metadata`: DeepProfiler pickles a pandas object here, which `numpy.load` refuses without
//!   `allow_pickle=True` (and which cannot be read safely outside Python). phenocore writes instead a
//!   1-D numpy **unicode array** (`<U{n}`) of `"key=value"` strings (split at the first `=`; keys hold
//!   no `=`), so `numpy.load(path)` works with the default `allow_pickle=False`:
//!   `dict(s.split("=", 1) for s in np.load(path)["metadata"])`.
//!
//! Checked by hand with numpy 2 (`/work/venv/bin/python`): a file from `write_site` loads with
//! `np.load` (allow_pickle=False), `features.dtype == float32`, shapes (N, D) / (N, 2) / (K,), and
//! the metadata strings come back intact (non-ASCII included); a file from `np.savez_compressed` with
//! float32/float64/unicode arrays reads back through `read_npz`.
//!
//! Reading accepts little- or big-endian `f4`, `f8`, `i1`–`i8`, `u1`–`u8` (u8 wraps above i64::MAX), `b1` and `U` arrays, C or
//! Fortran order (returned in C order); other dtypes (e.g. pickled object arrays in DeepProfiler
//! files) come back as `NpyArray::Other` so the numeric members stay readable.

use super::write_atomic;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::io::{Cursor, Read, Write};
use std::path::Path;

/// One array of an npz archive.
#[derive(Clone, Debug, PartialEq)]
pub enum NpyArray {
    F32 {
        shape: Vec<usize>,
        data: Vec<f32>,
    },
    F64 {
        shape: Vec<usize>,
        data: Vec<f64>,
    },
    /// Any integer or bool dtype, widened.
    I64 {
        shape: Vec<usize>,
        data: Vec<i64>,
    },
    /// Unicode strings (`<U{n}`), trailing NULs removed.
    Str {
        shape: Vec<usize>,
        data: Vec<String>,
    },
    /// A dtype this reader does not decode (its descr string as numpy wrote it).
    Other {
        shape: Vec<usize>,
        descr: String,
    },
}

impl NpyArray {
    pub fn shape(&self) -> &[usize] {
        match self {
            NpyArray::F32 { shape, .. }
            | NpyArray::F64 { shape, .. }
            | NpyArray::I64 { shape, .. }
            | NpyArray::Str { shape, .. }
            | NpyArray::Other { shape, .. } => shape,
        }
    }
}

/// Serialises one array as `.npy` (format 1.0, or 2.0 when the header outgrows 65535 bytes).
pub fn encode_npy(arr: &NpyArray) -> Result<Vec<u8>> {
    let (descr, width) = match arr {
        NpyArray::F32 { .. } => ("<f4".to_string(), 4),
        NpyArray::F64 { .. } => ("<f8".to_string(), 8),
        NpyArray::I64 { .. } => ("<i8".to_string(), 8),
        NpyArray::Str { data, .. } => {
            let n = data
                .iter()
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
                .max(1);
            (format!("<U{n}"), 4 * n)
        }
        NpyArray::Other { descr, .. } => {
            return Err(Error::Unsupported(format!(
                "cannot write npy dtype {descr}"
            )))
        }
    };
    let shape = arr.shape();
    let count: usize = shape.iter().product();
    let len = match arr {
        NpyArray::F32 { data, .. } => data.len(),
        NpyArray::F64 { data, .. } => data.len(),
        NpyArray::I64 { data, .. } => data.len(),
        NpyArray::Str { data, .. } => data.len(),
        NpyArray::Other { .. } => 0,
    };
    if len != count {
        return Err(Error::Shape(format!(
            "npy array of shape {shape:?} needs {count} elements, got {len}"
        )));
    }
    let shape_txt = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_txt}, }}");
    // numpy pads the header with spaces and a final newline so the data starts 64-byte aligned.
    let v2 = dict.len() + 1 + 10 > 65535;
    let prefix = if v2 { 12 } else { 10 };
    let hlen = (dict.len() + 1 + prefix).div_ceil(64) * 64 - prefix;
    let mut out = Vec::with_capacity(prefix + hlen + count * width);
    out.extend_from_slice(b"\x93NUMPY");
    if v2 {
        out.extend_from_slice(&[2, 0]);
        out.extend_from_slice(&(hlen as u32).to_le_bytes());
    } else {
        out.extend_from_slice(&[1, 0]);
        out.extend_from_slice(&(hlen as u16).to_le_bytes());
    }
    out.extend_from_slice(dict.as_bytes());
    out.resize(prefix + hlen - 1, b' ');
    out.push(b'\n');
    match arr {
        NpyArray::F32 { data, .. } => data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        NpyArray::F64 { data, .. } => data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        NpyArray::I64 { data, .. } => data
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        NpyArray::Str { data, .. } => {
            let n = width / 4;
            for s in data {
                let mut k = 0;
                for c in s.chars() {
                    out.extend_from_slice(&(c as u32).to_le_bytes());
                    k += 1;
                }
                out.resize(out.len() + 4 * (n - k), 0);
            }
        }
        NpyArray::Other { .. } => {}
    }
    Ok(out)
}

/// Parses one `.npy` blob; `what` names it in errors.
pub fn decode_npy(bytes: &[u8], what: &str) -> Result<NpyArray> {
    let bad = |m: &str| Error::Format(format!("{what}: {m}"));
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad("not an npy array (bad magic)"));
    }
    let (hlen, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(&format!("unsupported npy format version {v}"))),
    };
    let header = bytes
        .get(start..start + hlen)
        .ok_or_else(|| bad("truncated header"))?;
    let header = std::str::from_utf8(header).map_err(|_| bad("header is not text"))?;
    let descr = dict_value(header, "descr").ok_or_else(|| bad("header has no 'descr'"))?;
    let descr = descr
        .trim()
        .trim_matches(|c| c == '\'' || c == '"')
        .to_string();
    let fortran = dict_value(header, "fortran_order")
        .map(|v| v.trim() == "True")
        .unwrap_or(false);
    let shape_txt = dict_value(header, "shape").ok_or_else(|| bad("header has no 'shape'"))?;
    let shape: Vec<usize> = shape_txt
        .trim()
        .trim_start_matches('(')
        .trim_end_matches(')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_end_matches('L')
                .parse::<usize>()
                .map_err(|_| bad(&format!("bad shape {shape_txt}")))
        })
        .collect::<Result<_>>()?;
    let count = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| bad("shape overflows"))?;
    let data = &bytes[start + hlen..];

    let (order, kind, size) = parse_descr(&descr);
    let decoded = match (kind, size) {
        (Some(k), Some(sz)) if matches!(k, 'f' | 'i' | 'u' | 'b' | 'U') => {
            let elem = if k == 'U' { 4 * sz } else { sz };
            let need = count
                .checked_mul(elem)
                .ok_or_else(|| bad("size overflows"))?;
            if data.len() < need {
                return Err(bad(&format!(
                    "data truncated: shape {shape:?} of {descr} needs {need} bytes, found {}",
                    data.len()
                )));
            }
            let data = &data[..need];
            let be = order == '>';
            let rd = |c: &[u8]| -> u64 {
                let mut b = [0u8; 8];
                if be {
                    b[8 - c.len()..].copy_from_slice(c);
                    u64::from_be_bytes(b)
                } else {
                    b[..c.len()].copy_from_slice(c);
                    u64::from_le_bytes(b)
                }
            };
            match (k, sz) {
                ('f', 4) => Some(NpyArray::F32 {
                    shape: shape.clone(),
                    data: data
                        .chunks_exact(4)
                        .map(|c| f32::from_bits(rd(c) as u32))
                        .collect(),
                }),
                ('f', 8) => Some(NpyArray::F64 {
                    shape: shape.clone(),
                    data: data
                        .chunks_exact(8)
                        .map(|c| f64::from_bits(rd(c)))
                        .collect(),
                }),
                ('u' | 'b', 1 | 2 | 4 | 8) => Some(NpyArray::I64 {
                    shape: shape.clone(),
                    data: data.chunks_exact(sz).map(|c| rd(c) as i64).collect(),
                }),
                ('i', 1 | 2 | 4 | 8) => {
                    let bits = 64 - 8 * sz as u32;
                    Some(NpyArray::I64 {
                        shape: shape.clone(),
                        data: data
                            .chunks_exact(sz)
                            .map(|c| ((rd(c) << bits) as i64) >> bits)
                            .collect(),
                    })
                }
                ('U', n) => {
                    let mut strs = Vec::with_capacity(count);
                    for c in data.chunks_exact(4 * n.max(1)) {
                        let s: String = c
                            .chunks_exact(4)
                            .map(|u| rd(u) as u32)
                            .take_while(|&u| u != 0)
                            .map(|u| {
                                char::from_u32(u)
                                    .ok_or_else(|| bad(&format!("invalid code point {u:#x}")))
                            })
                            .collect::<Result<_>>()?;
                        strs.push(s);
                    }
                    if n == 0 {
                        strs = vec![String::new(); count];
                    }
                    Some(NpyArray::Str {
                        shape: shape.clone(),
                        data: strs,
                    })
                }
                _ => None,
            }
        }
        _ => None,
    };
    let arr = decoded.unwrap_or(NpyArray::Other {
        shape: shape.clone(),
        descr,
    });
    Ok(if fortran && shape.len() > 1 {
        to_c_order(arr)
    } else {
        arr
    })
}

fn parse_descr(d: &str) -> (char, Option<char>, Option<usize>) {
    let mut cs = d.chars();
    let first = cs.next().unwrap_or('?');
    let (order, rest) = if matches!(first, '<' | '>' | '|' | '=') {
        (first, cs.as_str())
    } else {
        ('=', d)
    };
    let mut rc = rest.chars();
    let kind = rc.next();
    let size = rc.as_str().parse::<usize>().ok();
    (
        if order == '=' && cfg!(target_endian = "big") {
            '>'
        } else {
            order
        },
        kind,
        size,
    )
}

/// Value text of `key` in a Python dict literal `{'descr': '<f4', 'shape': (3, 2), ...}`.
fn dict_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pat_a = format!("'{key}'");
    let pat_b = format!("\"{key}\"");
    let at = header.find(&pat_a).or_else(|| header.find(&pat_b))? + pat_a.len();
    let rest = header[at..].trim_start().strip_prefix(':')?.trim_start();
    let end = if rest.starts_with('(') {
        rest.find(')')? + 1
    } else if rest.starts_with('\'') || rest.starts_with('"') {
        let q = rest.as_bytes()[0] as char;
        rest[1..].find(q)? + 2
    } else {
        rest.find([',', '}']).unwrap_or(rest.len())
    };
    Some(&rest[..end])
}

fn to_c_order(arr: NpyArray) -> NpyArray {
    fn permute<T: Clone>(shape: &[usize], v: Vec<T>) -> Vec<T> {
        // Fortran index of C-order position.
        let n = shape.len();
        let mut out = Vec::with_capacity(v.len());
        let mut idx = vec![0usize; n];
        for _ in 0..v.len() {
            let mut f = 0;
            let mut stride = 1;
            for d in 0..n {
                f += idx[d] * stride;
                stride *= shape[d];
            }
            out.push(v[f].clone());
            for d in (0..n).rev() {
                idx[d] += 1;
                if idx[d] < shape[d] {
                    break;
                }
                idx[d] = 0;
            }
        }
        out
    }
    match arr {
        NpyArray::F32 { shape, data } => NpyArray::F32 {
            data: permute(&shape, data),
            shape,
        },
        NpyArray::F64 { shape, data } => NpyArray::F64 {
            data: permute(&shape, data),
            shape,
        },
        NpyArray::I64 { shape, data } => NpyArray::I64 {
            data: permute(&shape, data),
            shape,
        },
        NpyArray::Str { shape, data } => NpyArray::Str {
            data: permute(&shape, data),
            shape,
        },
        other => other,
    }
}

/// Encodes named arrays as an npz archive (members `{name}.npy`, deflated).
pub fn encode_npz(arrays: &[(&str, &NpyArray)]) -> Result<Vec<u8>> {
    let mut zw = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated)
        .large_file(true);
    let zerr = |e: zip::result::ZipError| Error::Internal(format!("zip writer: {e}"));
    for (name, arr) in arrays {
        zw.start_file(format!("{name}.npy"), opts).map_err(zerr)?;
        zw.write_all(&encode_npy(arr)?)
            .map_err(|e| Error::Internal(format!("zip writer: {e}")))?;
    }
    Ok(zw.finish().map_err(zerr)?.into_inner())
}

/// Writes named arrays as an npz file, atomically.
pub fn write_npz(path: &Path, arrays: &[(&str, &NpyArray)]) -> Result<()> {
    write_atomic(path, &encode_npz(arrays)?)
}

/// Reads every member of an npz file (names without `.npy`).
pub fn read_npz(path: &Path) -> Result<BTreeMap<String, NpyArray>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
    decode_npz(&bytes, &path.display().to_string())
}

/// Parses npz bytes; `what` names the archive in errors.
pub fn decode_npz(bytes: &[u8], what: &str) -> Result<BTreeMap<String, NpyArray>> {
    let mut za = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| Error::Format(format!("{what} is not an npz (zip) file: {e}")))?;
    let mut out = BTreeMap::new();
    for i in 0..za.len() {
        let mut f = za
            .by_index(i)
            .map_err(|e| Error::Format(format!("{what}: member {i}: {e}")))?;
        let name = f.name().to_string();
        let mut buf = Vec::with_capacity(f.size().min(1 << 30) as usize);
        f.read_to_end(&mut buf)
            .map_err(|e| Error::Format(format!("{what}: member {name}: {e}")))?;
        let arr = decode_npy(&buf, &format!("{what}: member {name}"))?;
        out.insert(name.strip_suffix(".npy").unwrap_or(&name).to_string(), arr);
    }
    Ok(out)
}

/// The features of one site (field of view), as DeepProfiler's per-site npz holds them.
#[derive(Clone, Debug, PartialEq)]
pub struct SiteFeatures {
    /// Cells (rows).
    pub cells: usize,
    /// Features per cell (columns).
    pub dim: usize,
    /// (cells, dim) row-major.
    pub features: Vec<f32>,
    /// Per cell (x, y).
    pub locations: Vec<[f32; 2]>,
    /// Ordered key/value pairs (plate, well, site, the metadata row, layers, …).
    pub metadata: Vec<(String, String)>,
}

impl SiteFeatures {
    pub fn metadata_value(&self, key: &str) -> Option<&str> {
        self.metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn check(&self) -> Result<()> {
        if self.features.len() != self.cells * self.dim || self.locations.len() != self.cells {
            return Err(Error::Shape(format!(
                "site features: {} cells × {} dims need {} values and {} locations, got {} and {}",
                self.cells,
                self.dim,
                self.cells * self.dim,
                self.cells,
                self.features.len(),
                self.locations.len()
            )));
        }
        if let Some((k, _)) = self
            .metadata
            .iter()
            .find(|(k, _)| k.contains('=') || k.is_empty())
        {
            return Err(Error::InvalidArgument(format!(
                "metadata key {k:?} must be non-empty and hold no '='"
            )));
        }
        Ok(())
    }
}

/// Writes `features`, `locations`, `metadata` (see the module doc) atomically.
pub fn write_site(path: &Path, site: &SiteFeatures) -> Result<()> {
    site.check()?;
    let features = NpyArray::F32 {
        shape: vec![site.cells, site.dim],
        data: site.features.clone(),
    };
    let locations = NpyArray::F32 {
        shape: vec![site.cells, 2],
        data: site.locations.iter().flatten().copied().collect(),
    };
    let metadata = NpyArray::Str {
        shape: vec![site.metadata.len()],
        data: site
            .metadata
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
    };
    write_npz(
        path,
        &[
            ("features", &features),
            ("locations", &locations),
            ("metadata", &metadata),
        ],
    )
}

/// Reads a per-site file written by `write_site` (or a DeepProfiler one: its pickled metadata is
/// skipped and `metadata` comes back empty).
pub fn read_site(path: &Path) -> Result<SiteFeatures> {
    let mut m = read_npz(path)?;
    let p = path.display();
    let (shape, features) = match m.remove("features") {
        Some(NpyArray::F32 { shape, data }) => (shape, data),
        Some(NpyArray::F64 { shape, data }) => {
            (shape, data.into_iter().map(|v| v as f32).collect())
        }
        Some(other) => {
            return Err(Error::Format(format!(
                "{p}: 'features' is not a float array (shape {:?})",
                other.shape()
            )))
        }
        None => return Err(Error::Format(format!("{p}: no 'features' array"))),
    };
    if shape.len() != 2 {
        return Err(Error::Format(format!(
            "{p}: 'features' has shape {shape:?}; expected (cells, D)"
        )));
    }
    let (cells, dim) = (shape[0], shape[1]);
    let locations = match m.remove("locations") {
        Some(NpyArray::F32 { shape, data }) if shape == [cells, 2] => {
            data.chunks_exact(2).map(|c| [c[0], c[1]]).collect()
        }
        Some(NpyArray::F64 { shape, data }) if shape == [cells, 2] => data
            .chunks_exact(2)
            .map(|c| [c[0] as f32, c[1] as f32])
            .collect(),
        Some(other) => {
            return Err(Error::Format(format!(
                "{p}: 'locations' has shape {:?}; expected ({cells}, 2) floats",
                other.shape()
            )))
        }
        None => return Err(Error::Format(format!("{p}: no 'locations' array"))),
    };
    let metadata = match m.remove("metadata") {
        Some(NpyArray::Str { data, .. }) => data
            .into_iter()
            .map(|s| match s.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (s, String::new()),
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(SiteFeatures {
        cells,
        dim,
        features,
        locations,
        metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn site(cells: usize, dim: usize) -> SiteFeatures {
        SiteFeatures {
            cells,
            dim,
            features: (0..cells * dim).map(|i| i as f32 * 0.5 - 3.0).collect(),
            locations: (0..cells)
                .map(|i| [i as f32 + 0.25, 100.0 - i as f32])
                .collect(),
            metadata: vec![
                ("Metadata_Plate".into(), "P1".into()),
                ("Metadata_Well".into(), "B03".into()),
                ("note".into(), "a=b, µm".into()),
            ],
        }
    }

    #[test]
    fn site_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        for (cells, dim) in [(3, 5), (0, 672)] {
            let p = dir.path().join(format!("s{cells}.npz"));
            let s = site(cells, dim);
            write_site(&p, &s).unwrap();
            assert_eq!(read_site(&p).unwrap(), s);
        }
        assert_eq!(site(1, 1).metadata_value("note"), Some("a=b, µm"));
    }

    #[test]
    fn npy_header_is_what_numpy_writes() {
        let a = NpyArray::F32 {
            shape: vec![3, 2],
            data: vec![0.0; 6],
        };
        let b = encode_npy(&a).unwrap();
        // numpy.save(np.zeros((3, 2), np.float32)) header, byte for byte (numpy ≥ 1.x, 64-byte aligned).
        let want = "{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }";
        assert_eq!(&b[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(&b[10..10 + want.len()], want.as_bytes());
        assert_eq!(b[10 + hlen - 1], b'\n');
        assert_eq!(b.len(), 10 + hlen + 24);
        let s = NpyArray::Str {
            shape: vec![2],
            data: vec!["ab".into(), "é".into()],
        };
        let e = encode_npy(&s).unwrap();
        assert!(std::str::from_utf8(&e[10..70])
            .unwrap()
            .contains("'descr': '<U2'"));
        assert_eq!(decode_npy(&e, "t").unwrap(), s);
    }

    #[test]
    fn reads_big_endian_fortran_and_ints() {
        // >f8, fortran order, shape (2, 3): column-major values 0..6 → C order [[0,2,4],[1,3,5]].
        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let dict = "{'descr': '>f8', 'fortran_order': True, 'shape': (2, 3), }";
        let hlen = (dict.len() + 11).div_ceil(64) * 64 - 10;
        b.extend_from_slice(&(hlen as u16).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        b.resize(10 + hlen - 1, b' ');
        b.push(b'\n');
        for v in 0..6 {
            b.extend_from_slice(&(v as f64).to_be_bytes());
        }
        assert_eq!(
            decode_npy(&b, "t").unwrap(),
            NpyArray::F64 {
                shape: vec![2, 3],
                data: vec![0., 2., 4., 1., 3., 5.]
            }
        );

        let mut b = b"\x93NUMPY\x01\x00".to_vec();
        let dict = "{'descr': '<i2', 'fortran_order': False, 'shape': (3,), }";
        b.extend_from_slice(&((dict.len() + 1) as u16).to_le_bytes());
        b.extend_from_slice(dict.as_bytes());
        b.push(b'\n');
        for v in [-2i16, 7, -32768] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        assert_eq!(
            decode_npy(&b, "t").unwrap(),
            NpyArray::I64 {
                shape: vec![3],
                data: vec![-2, 7, -32768]
            }
        );
        // Object arrays are reported, not decoded.
        let mut o = b"\x93NUMPY\x01\x00".to_vec();
        let dict = "{'descr': '|O', 'fortran_order': False, 'shape': (), }\n";
        o.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        o.extend_from_slice(dict.as_bytes());
        o.extend_from_slice(b"pickle...");
        assert_eq!(
            decode_npy(&o, "t").unwrap(),
            NpyArray::Other {
                shape: vec![],
                descr: "|O".into()
            }
        );
    }

    #[test]
    fn bad_files_are_errors_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.npz");
        std::fs::write(&p, b"PK\x03\x04garbage").unwrap();
        assert!(read_site(&p).unwrap_err().to_string().contains("bad.npz"));
        let q = dir.path().join("trunc.npz");
        let mut b = encode_npy(&NpyArray::F32 {
            shape: vec![4, 4],
            data: vec![1.0; 16],
        })
        .unwrap();
        b.truncate(b.len() - 4);
        std::fs::write(&q, encode_npz_raw(&[("features", &b)])).unwrap();
        let e = read_site(&q).unwrap_err().to_string();
        assert!(e.contains("trunc.npz") && e.contains("features"), "{e}");
        let mut s = site(2, 3);
        s.features.pop();
        assert!(write_site(&dir.path().join("x.npz"), &s).is_err());
    }

    /// `np.savez_compressed` output (numpy 2.4.6, zip64 headers) of
    /// features=arange(6,f4).reshape(3,2)/4, locations=[[1.5,2],[3,4],[5,6.25]] (f8),
    /// metadata=["a=1","µ=é"], fort=asfortranarray(arange(6,f4).reshape(2,3)),
    /// big=array([1,-2],">i4"), flags=[True,False].
    const NUMPY_NPZ_HEX: &str = concat!(
        "504b03042d00000008000000210089bf9c33ffffffffffffffff0c00140066656174757265732e6e7079010010009800",
        "00000000000056000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e9366a2aea3a09e965f545294",
        "98179f5f94920a12774bcc294e058a17672416a402f91ac63a0a469a3a0ab50a64032e063068b00312f60c0c0e40dc00",
        "c40bec01504b03042d000000080000002100b1aa66b8ffffffffffffffff0d0014006c6f636174696f6e732e6e707901",
        "001000b0000000000000005a000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e9366a1aea3a09e",
        "965f54529498179f5f94920a12774bcc294e058a17672416a402f91ac63a0a469a3a0ab50a64032e0630f8610fa1191c",
        "201407941680d222505ad20100504b03042d000000080000002100de0cd5b6ffffffffffffffff0c0014006d65746164",
        "6174612e6e707901001000980000000000000053000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a0",
        "6e136aacaea3a09e965f54529498179f5f94920a12774bcc294e058a17672416a402f91a463a9a3a0ab50a1400ae4406",
        "06065b203604e2ad50f64b200600504b03042d000000080000002100ce2ce0d3ffffffffffffffff08001400666f7274",
        "2e6e707901001000980000000000000056000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e9366",
        "a2aea3a09e965f54529498179f5f94920a120f292a4d050a17672416a402b91a463a0ac69a3a0ab50ae4032e06307070",
        "606068b007620710878161810300504b03042d00000008000000210059d4fa59ffffffffffffffff070014006269672e",
        "6e70790100100088000000000000004d000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a06e9769a2",
        "aea3a09e965f54529498179f5f94920a12774bcc294e058a17672416a402f91a463a9a3a0ab50a14002e060606c6ffff",
        "ffff0300504b03042d000000080000002100ee19bb5dffffffffffffffff09001400666c6167732e6e70790100100082",
        "0000000000000046000000000000009bec17ea1b10c9c850c650ad9e925a9c5ca46ea5a05e9364a8aea3a09e965f5452",
        "9498179f5f94920a12774bcc294e058a17672416a402f91a463a9a3a0ab50a14002e460600504b01022d032d00000008",
        "000000210089bf9c3356000000980000000c000000000000000000000080010000000066656174757265732e6e707950",
        "4b01022d032d000000080000002100b1aa66b85a000000b00000000d00000000000000000000008001940000006c6f63",
        "6174696f6e732e6e7079504b01022d032d000000080000002100de0cd5b653000000980000000c000000000000000000",
        "000080012d0100006d657461646174612e6e7079504b01022d032d000000080000002100ce2ce0d35600000098000000",
        "0800000000000000000000008001be010000666f72742e6e7079504b01022d032d00000008000000210059d4fa594d00",
        "00008800000007000000000000000000000080014e0200006269672e6e7079504b01022d032d000000080000002100ee",
        "19bb5d46000000820000000900000000000000000000008001d4020000666c6167732e6e7079504b0506000000000600",
        "060051010000550300000000",
    );

    #[test]
    fn reads_what_numpy_writes() {
        let bytes: Vec<u8> = (0..NUMPY_NPZ_HEX.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&NUMPY_NPZ_HEX[i..i + 2], 16).unwrap())
            .collect();
        let m = decode_npz(&bytes, "numpy.npz").unwrap();
        assert_eq!(
            m["features"],
            NpyArray::F32 {
                shape: vec![3, 2],
                data: vec![0.0, 0.25, 0.5, 0.75, 1.0, 1.25]
            }
        );
        assert_eq!(
            m["locations"],
            NpyArray::F64 {
                shape: vec![3, 2],
                data: vec![1.5, 2.0, 3.0, 4.0, 5.0, 6.25]
            }
        );
        assert_eq!(
            m["metadata"],
            NpyArray::Str {
                shape: vec![2],
                data: vec!["a=1".into(), "µ=é".into()]
            }
        );
        assert_eq!(
            m["fort"],
            NpyArray::F32 {
                shape: vec![2, 3],
                data: vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
            }
        );
        assert_eq!(
            m["big"],
            NpyArray::I64 {
                shape: vec![2],
                data: vec![1, -2]
            }
        );
        assert_eq!(
            m["flags"],
            NpyArray::I64 {
                shape: vec![2],
                data: vec![1, 0]
            }
        );
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("np.npz");
        std::fs::write(&p, &bytes).unwrap();
        let s = read_site(&p).unwrap();
        assert_eq!((s.cells, s.dim), (3, 2));
        assert_eq!(s.locations, vec![[1.5, 2.0], [3.0, 4.0], [5.0, 6.25]]);
        assert_eq!(s.metadata_value("µ"), Some("é"));
    }

    fn encode_npz_raw(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut zw = zip::ZipWriter::new(Cursor::new(Vec::new()));
        for (n, b) in members {
            zw.start_file(format!("{n}.npy"), zip::write::SimpleFileOptions::default())
                .unwrap();
            zw.write_all(b).unwrap();
        }
        zw.finish().unwrap().into_inner()
    }
}
