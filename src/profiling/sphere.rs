//! Sphering (whitening) of profiles against negative controls, REFERENCE §5.
//!
//! Fit on control profiles X (n × d): μ = column mean, Σ = (X − μ)ᵀ(X − μ) / n = U Δ Uᵀ (faer
//! self-adjoint eigendecomposition, Δ sorted decreasing), then with per-component weights w:
//! - ZCA: Q = U diag(w) Uᵀ (symmetric; the paper's Q = U (Δ + λI)^(−1/2) Uᵀ),
//! - PCA: Q = diag(w) Uᵀ (row k is component k, in decreasing Δ; d output dimensions),
//! - ZCA-cor / PCA-cor: the same on the correlation matrix, i.e. every centred feature is first
//!   divided by the controls' sd (ddof 0, as pycytominer's `StandardScaler`).
//!
//! A profile t becomes t' = Q (t − μ) (divided element-wise by the sd first for the -cor methods).
//!
//! Weights, [`Regularization`]:
//! - `Eigenvalue` (REFERENCE §5, DeepProfilerExperiments): w_k = (Δ_k + λ)^(−1/2). A constant
//!   feature has Δ = 0 there and gets λ^(−1/2); with λ = 0 a singular Σ is an error.
//! - `Pycytominer` (pycytominer `Spherize`): with s_k = √(n Δ_k) the singular values of the centred
//!   controls, w_k = √(n − 1) / (s_k + ε), ε = `lambda`. Past the numerical rank r (e.g. n ≤ d, or a
//!   constant feature) s_k is replaced by s_(r−1), as pycytominer does for n ≤ d (for n > d it
//!   raises on a rank-deficient X; phenocore applies the same replacement instead).
//!   pycytominer 1.7.1 (the version the fixtures come from) takes the SVD of the centred (and for
//!   -cor standardised) controls; earlier versions took it of the raw input (its issue #747), which
//!   does not whiten. phenocore always centres.
//!
//! Sign convention (PCA rows and U): every eigenvector is flipped so that its entry of largest
//! magnitude (the first one on ties) is positive. Components of equal eigenvalue (and, for n ≤ d,
//! those of the null space) are an arbitrary orthonormal basis of their eigenspace.
//!
//! The numerical rank r counts eigenvalues above Δ_max · max(n, d) · 64 ε (the rounding floor of
//! forming Σ); it decides the λ = 0 error and the pycytominer replacement.

use crate::error::{Error, Result};
use crate::io::profiles::Profiles;
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Which whitening matrix to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SphereMethod {
    /// Q = U W Uᵀ (default; the paper's sphering).
    Zca,
    /// Q = W Uᵀ (output dimension k = principal component k).
    Pca,
    /// ZCA on the correlation matrix (features standardised by the controls' sd).
    ZcaCor,
    /// PCA on the correlation matrix.
    PcaCor,
}

impl SphereMethod {
    pub const ALL: [SphereMethod; 4] = [Self::Zca, Self::Pca, Self::ZcaCor, Self::PcaCor];

    /// pycytominer's spelling: "ZCA", "PCA", "ZCA-cor", "PCA-cor".
    pub fn name(self) -> &'static str {
        match self {
            Self::Zca => "ZCA",
            Self::Pca => "PCA",
            Self::ZcaCor => "ZCA-cor",
            Self::PcaCor => "PCA-cor",
        }
    }

    pub fn is_cor(self) -> bool {
        matches!(self, Self::ZcaCor | Self::PcaCor)
    }

    pub fn is_zca(self) -> bool {
        matches!(self, Self::Zca | Self::ZcaCor)
    }
}

impl fmt::Display for SphereMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SphereMethod {
    type Err = Error;
    /// Case-insensitive; `_` may stand for `-` ("zca_cor").
    fn from_str(s: &str) -> Result<Self> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        Self::ALL
            .into_iter()
            .find(|m| m.name().to_ascii_lowercase() == norm)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown sphering method {s:?}; expected ZCA, PCA, ZCA-cor or PCA-cor"
                ))
            })
    }
}

/// How `lambda` regularises the whitening weights (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Regularization {
    /// w = (Δ + λ)^(−1/2), REFERENCE §5 (default).
    Eigenvalue,
    /// w = √(n − 1) / (s + ε) on the singular values s of the centred controls, pycytominer.
    Pycytominer,
}

impl Regularization {
    pub fn name(self) -> &'static str {
        match self {
            Self::Eigenvalue => "eigenvalue",
            Self::Pycytominer => "pycytominer",
        }
    }
}

impl fmt::Display for Regularization {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Regularization {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "eigenvalue" | "lambda" => Ok(Self::Eigenvalue),
            "pycytominer" | "singular" => Ok(Self::Pycytominer),
            _ => Err(Error::InvalidArgument(format!(
                "unknown sphering regularization {s:?}; expected \"eigenvalue\" or \"pycytominer\""
            ))),
        }
    }
}

/// Method, λ (ε in pycytominer mode) and regularisation of a fit.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SphereOptions {
    pub method: SphereMethod,
    /// λ added to the eigenvalues (`Eigenvalue`) or ε added to the singular values
    /// (`Pycytominer`); finite and ≥ 0. REFERENCE §5: 1e-3 typical for CNN features, 1e-2 for
    /// CellProfiler features; pycytominer's default ε is 1e-6.
    pub lambda: f64,
    pub regularization: Regularization,
}

impl Default for SphereOptions {
    fn default() -> Self {
        SphereOptions {
            method: SphereMethod::Zca,
            lambda: 1e-3,
            regularization: Regularization::Eigenvalue,
        }
    }
}

impl SphereOptions {
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            return Err(Error::InvalidArgument(format!(
                "sphering lambda is {}; expected a finite number >= 0",
                self.lambda
            )));
        }
        Ok(())
    }
}

/// Which rows of a [`Profiles`] table are negative controls.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlSelector {
    /// Rows whose metadata column `column` equals one of `values` (e.g. `Metadata_control_type`
    /// = `negcon`, or `Metadata_Treatment` = `DMSO`).
    Meta { column: String, values: Vec<String> },
    /// These row indices.
    Rows(Vec<usize>),
}

impl ControlSelector {
    /// Rows whose `column` equals `value`.
    pub fn meta(column: &str, value: &str) -> Self {
        ControlSelector::Meta {
            column: column.to_string(),
            values: vec![value.to_string()],
        }
    }

    /// One flag per row; an error names a missing column or an out-of-range row.
    pub fn mask(&self, profiles: &Profiles) -> Result<Vec<bool>> {
        let n = profiles.n_rows();
        match self {
            ControlSelector::Meta { column, values } => {
                let col = profiles.meta_column(column)?;
                Ok(col.iter().map(|v| values.iter().any(|c| c == v)).collect())
            }
            ControlSelector::Rows(rows) => {
                let mut mask = vec![false; n];
                for &r in rows {
                    if r >= n {
                        return Err(Error::InvalidArgument(format!(
                            "control row {r} is out of range for {n} profiles"
                        )));
                    }
                    mask[r] = true;
                }
                Ok(mask)
            }
        }
    }

    /// The selected rows in table order; an error when there are none.
    pub fn rows(&self, profiles: &Profiles) -> Result<Vec<usize>> {
        let rows: Vec<usize> = self
            .mask(profiles)?
            .iter()
            .enumerate()
            .filter_map(|(i, &c)| c.then_some(i))
            .collect();
        if rows.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "no control profiles: {self} matches none of {} rows",
                profiles.n_rows()
            )));
        }
        Ok(rows)
    }
}

impl fmt::Display for ControlSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlSelector::Meta { column, values } => {
                write!(f, "{column} in {values:?}")
            }
            ControlSelector::Rows(r) => write!(f, "{} listed rows", r.len()),
        }
    }
}

/// First non-finite value of an n × d row-major matrix, as an error naming `what`.
pub(crate) fn check_finite(x: &[f64], d: usize, what: &str) -> Result<()> {
    if x.iter().all(|v| v.is_finite()) {
        return Ok(());
    }
    let i = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
    Err(Error::NonFinite(format!(
        "{what}: value {} at row {}, column {}",
        x[i],
        i / d.max(1),
        i % d.max(1)
    )))
}

fn check_matrix(x: &[f64], n: usize, d: usize, what: &str) -> Result<()> {
    match n.checked_mul(d) {
        Some(len) if len == x.len() => Ok(()),
        _ => Err(Error::Shape(format!(
            "{what}: {} values for {n} rows x {d} features",
            x.len()
        ))),
    }
}

/// Rows per centred block in the covariance pass and per parallel task in `transform`.
const FIT_BLOCK: usize = 2048;
const TRANSFORM_BLOCK: usize = 128;

/// Mean, optional scale and eigendecomposition of the controls' covariance (or correlation):
/// everything a fit needs before λ enters, so a λ sweep decomposes once.
#[derive(Clone, Debug)]
struct Basis {
    n: usize,
    d: usize,
    mean: Vec<f64>,
    scale: Option<Vec<f64>>,
    /// Δ, decreasing, clamped at 0.
    eigenvalues: Vec<f64>,
    /// U row-major: `vectors[i * d + k]` = entry i of eigenvector k.
    vectors: Vec<f64>,
    rank: usize,
    /// Feature columns constant over the controls.
    constant: Vec<usize>,
}

impl Basis {
    fn fit(x: &[f64], n: usize, d: usize, cor: bool) -> Result<Basis> {
        if d == 0 {
            return Err(Error::InvalidArgument(
                "sphering needs at least one feature".into(),
            ));
        }
        check_matrix(x, n, d, "controls")?;
        if n < 2 {
            return Err(Error::InvalidArgument(format!(
                "sphering needs at least 2 control profiles, got {n}"
            )));
        }
        check_finite(x, d, "controls")?;
        crate::threads::install(|| Self::fit_checked(x, n, d, cor))
    }

    fn fit_checked(x: &[f64], n: usize, d: usize, cor: bool) -> Result<Basis> {
        let mut sum = vec![0.0; d];
        let mut lo = x[..d].to_vec();
        let mut hi = lo.clone();
        for row in x.chunks_exact(d) {
            for j in 0..d {
                let v = row[j];
                sum[j] += v;
                lo[j] = lo[j].min(v);
                hi[j] = hi[j].max(v);
            }
        }
        let constant: Vec<usize> = (0..d).filter(|&j| lo[j] == hi[j]).collect();
        // A constant column gets its value as the exact mean, so its centred values are exactly 0.
        let mean: Vec<f64> = (0..d)
            .map(|j| {
                if lo[j] == hi[j] {
                    lo[j]
                } else {
                    sum[j] / n as f64
                }
            })
            .collect();

        let mut sigma = Mat::<f64>::zeros(d, d);
        let mut buf = vec![0.0; FIT_BLOCK.min(n) * d];
        for chunk in x.chunks(FIT_BLOCK * d) {
            let rows = chunk.len() / d;
            let c = &mut buf[..rows * d];
            for (dst, src) in c.chunks_exact_mut(d).zip(chunk.chunks_exact(d)) {
                for j in 0..d {
                    dst[j] = src[j] - mean[j];
                }
            }
            let a = MatRef::from_row_major_slice(c, rows, d);
            matmul(
                sigma.as_mut(),
                Accum::Add,
                a.transpose(),
                a,
                1.0 / n as f64,
                Par::rayon(0),
            );
        }
        let scale = cor.then(|| {
            let s: Vec<f64> = (0..d)
                .map(|j| {
                    let sd = sigma[(j, j)].sqrt();
                    // A constant feature stays centred but unscaled (its correlations are 0).
                    if sd > 0.0 && sd.is_finite() {
                        sd
                    } else {
                        1.0
                    }
                })
                .collect();
            for i in 0..d {
                for j in 0..d {
                    sigma[(i, j)] /= s[i] * s[j];
                }
            }
            s
        });

        let evd = sigma
            .as_ref()
            .self_adjoint_eigen(Side::Lower)
            .map_err(|e| {
                Error::Internal(format!(
                    "sphering: eigendecomposition of the {d} x {d} control covariance failed: {e:?}"
                ))
            })?;
        let s = evd.S().column_vector();
        let u = evd.U();
        let mut eigenvalues = vec![0.0; d];
        let mut vectors = vec![0.0; d * d];
        for k in 0..d {
            let src = d - 1 - k; // faer sorts increasing
            eigenvalues[k] = s[src].max(0.0);
            let mut best = 0;
            for i in 0..d {
                if u[(i, src)].abs() > u[(best, src)].abs() {
                    best = i;
                }
            }
            let sign = if u[(best, src)] < 0.0 { -1.0 } else { 1.0 };
            for i in 0..d {
                vectors[i * d + k] = sign * u[(i, src)];
            }
        }
        let tol = eigenvalues[0] * (n.max(d) as f64) * 64.0 * f64::EPSILON;
        let rank = eigenvalues.iter().filter(|&&e| e > tol).count();
        Ok(Basis {
            n,
            d,
            mean,
            scale,
            eigenvalues,
            vectors,
            rank,
            constant,
        })
    }

    fn sphering(&self, opts: &SphereOptions, names: Option<&[String]>) -> Result<Sphering> {
        opts.validate()?;
        let (n, d, lambda) = (self.n, self.d, opts.lambda);
        let weights: Vec<f64> = match opts.regularization {
            Regularization::Eigenvalue => {
                if lambda == 0.0 && self.rank < d {
                    return Err(self.singular_error(names));
                }
                self.eigenvalues
                    .iter()
                    .map(|&e| 1.0 / (e + lambda).sqrt())
                    .collect()
            }
            Regularization::Pycytominer => {
                if self.rank == 0 {
                    return Err(Error::InvalidArgument(format!(
                        "sphering: every feature is constant over the {n} controls"
                    )));
                }
                // pycytominer: W = V diag(√(n−1) / (s + ε)) [Vᵀ], s beyond the rank = s[r−1].
                let floor = (n as f64 * self.eigenvalues[self.rank - 1]).sqrt();
                let root = ((n - 1) as f64).sqrt();
                (0..d)
                    .map(|k| {
                        let s = if k < self.rank {
                            (n as f64 * self.eigenvalues[k]).sqrt()
                        } else {
                            floor
                        };
                        root / (s + lambda)
                    })
                    .collect()
            }
        };
        if let Some(k) = weights.iter().position(|w| !w.is_finite()) {
            return Err(Error::NonFinite(format!(
                "sphering weight of component {k} is {} (eigenvalue {}, lambda {lambda})",
                weights[k], self.eigenvalues[k]
            )));
        }
        let mut matrix = vec![0.0; d * d];
        if opts.method.is_zca() {
            let mut uw = self.vectors.clone();
            for row in uw.chunks_exact_mut(d) {
                for (v, w) in row.iter_mut().zip(&weights) {
                    *v *= w;
                }
            }
            let u = MatRef::from_row_major_slice(&self.vectors, d, d);
            let uw = MatRef::from_row_major_slice(&uw, d, d);
            let q = MatMut::from_row_major_slice_mut(&mut matrix, d, d);
            crate::threads::install(|| {
                matmul(q, Accum::Replace, uw, u.transpose(), 1.0, Par::rayon(0))
            });
            for i in 0..d {
                for j in 0..i {
                    let m = 0.5 * (matrix[i * d + j] + matrix[j * d + i]);
                    matrix[i * d + j] = m;
                    matrix[j * d + i] = m;
                }
            }
        } else {
            for k in 0..d {
                for i in 0..d {
                    matrix[k * d + i] = weights[k] * self.vectors[i * d + k];
                }
            }
        }
        Ok(Sphering {
            method: opts.method,
            regularization: opts.regularization,
            lambda,
            n_controls: n,
            mean: self.mean.clone(),
            scale: self.scale.clone(),
            matrix,
            eigenvalues: self.eigenvalues.clone(),
        })
    }

    fn singular_error(&self, names: Option<&[String]>) -> Error {
        let (n, d) = (self.n, self.d);
        let mut why = format!(
            "the controls' covariance is singular (numerical rank {} of {d} features, {n} controls",
            self.rank
        );
        if n <= d {
            why.push_str("; a rank above n - 1 needs more controls than features");
        }
        if !self.constant.is_empty() {
            let shown: Vec<String> = self
                .constant
                .iter()
                .take(8)
                .map(|&j| match names.and_then(|s| s.get(j)) {
                    Some(name) => format!("{name:?}"),
                    None => format!("column {j}"),
                })
                .collect();
            let more = self.constant.len().saturating_sub(shown.len());
            why.push_str(&format!("; constant features: {}", shown.join(", ")));
            if more > 0 {
                why.push_str(&format!(" and {more} more"));
            }
        }
        Error::InvalidArgument(format!(
            "sphering with lambda = 0: {why}); use lambda > 0 (e.g. 1e-3)"
        ))
    }
}

/// A fitted sphering transform: t' = Q ((t − μ) / scale).
#[derive(Clone, Debug, PartialEq)]
pub struct Sphering {
    method: SphereMethod,
    regularization: Regularization,
    lambda: f64,
    n_controls: usize,
    mean: Vec<f64>,
    scale: Option<Vec<f64>>,
    matrix: Vec<f64>,
    eigenvalues: Vec<f64>,
}

impl Sphering {
    /// Fits on `n` control profiles of `d` features (row-major `controls`, n ≥ 2, finite).
    pub fn fit(controls: &[f64], n: usize, d: usize, opts: &SphereOptions) -> Result<Sphering> {
        opts.validate()?;
        Basis::fit(controls, n, d, opts.method.is_cor())?.sphering(opts, None)
    }

    /// Fits on the control rows of a profile table (errors name constant features by name).
    pub fn fit_profiles(
        profiles: &Profiles,
        controls: &ControlSelector,
        opts: &SphereOptions,
    ) -> Result<Sphering> {
        opts.validate()?;
        let rows = controls.rows(profiles)?;
        let x = gather(profiles, &rows);
        let d = profiles.n_features();
        Basis::fit(&x, rows.len(), d, opts.method.is_cor())?
            .sphering(opts, Some(&profiles.feature_names))
    }

    pub fn method(&self) -> SphereMethod {
        self.method
    }
    pub fn regularization(&self) -> Regularization {
        self.regularization
    }
    pub fn lambda(&self) -> f64 {
        self.lambda
    }
    pub fn options(&self) -> SphereOptions {
        SphereOptions {
            method: self.method,
            lambda: self.lambda,
            regularization: self.regularization,
        }
    }
    /// Controls the fit saw.
    pub fn n_controls(&self) -> usize {
        self.n_controls
    }
    pub fn n_features(&self) -> usize {
        self.mean.len()
    }
    /// μ, the controls' column mean.
    pub fn mean(&self) -> &[f64] {
        &self.mean
    }
    /// The controls' sd (ddof 0; 1 for constant features) for the -cor methods, else `None`.
    pub fn scale(&self) -> Option<&[f64]> {
        self.scale.as_deref()
    }
    /// Q, d × d row-major.
    pub fn matrix(&self) -> &[f64] {
        &self.matrix
    }
    /// Δ, eigenvalues of the controls' covariance (correlation for -cor) with divisor n,
    /// decreasing.
    pub fn eigenvalues(&self) -> &[f64] {
        &self.eigenvalues
    }

    /// Sphered copies of `n` row-major profiles.
    pub fn transform(&self, x: &[f64], n: usize) -> Result<Vec<f64>> {
        let d = self.n_features();
        check_matrix(x, n, d, "profiles")?;
        let mut out = vec![0.0; x.len()];
        self.transform_into(x, n, &mut out)?;
        Ok(out)
    }

    /// Sphers `n` row-major profiles into `out` (n × d), in parallel row blocks (one GEMM each).
    pub fn transform_into(&self, x: &[f64], n: usize, out: &mut [f64]) -> Result<()> {
        let d = self.n_features();
        check_matrix(x, n, d, "profiles")?;
        if out.len() != x.len() {
            return Err(Error::Shape(format!(
                "sphering output: {} values for {n} rows x {d} features",
                out.len()
            )));
        }
        check_finite(x, d, "profiles")?;
        let q = MatRef::from_row_major_slice(&self.matrix, d, d);
        let (mean, scale) = (&self.mean, self.scale.as_deref());
        crate::threads::install(|| {
            out.par_chunks_mut(TRANSFORM_BLOCK * d)
                .zip(x.par_chunks(TRANSFORM_BLOCK * d))
                .for_each_init(Vec::new, |buf: &mut Vec<f64>, (o, xi)| {
                    let rows = xi.len() / d;
                    buf.clear();
                    buf.extend_from_slice(xi);
                    for row in buf.chunks_exact_mut(d) {
                        for j in 0..d {
                            row[j] -= mean[j];
                        }
                        if let Some(s) = scale {
                            for j in 0..d {
                                row[j] /= s[j];
                            }
                        }
                    }
                    let a = MatRef::from_row_major_slice(buf, rows, d);
                    let dst = MatMut::from_row_major_slice_mut(o, rows, d);
                    matmul(dst, Accum::Replace, a, q.transpose(), 1.0, Par::Seq);
                });
        });
        Ok(())
    }

    /// The sphered table: same metadata; features keep their names (ZCA) or become `PC1`…`PCd`
    /// (PCA, as pycytominer names them).
    pub fn transform_profiles(&self, profiles: &Profiles) -> Result<Profiles> {
        check_width(profiles, self.n_features())?;
        let data = self.transform(&profiles.data, profiles.n_rows())?;
        Ok(sphered_table(profiles, self.method, data))
    }

    /// safetensors bytes: F64 tensors `mean` [d], `matrix` [d, d], `eigenvalues` [d] and, for the
    /// -cor methods, `scale` [d]; metadata `format`, `method`, `lambda`, `regularization`,
    /// `n_controls`.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        self.push_tensors("", &mut tensors);
        let mut meta = base_metadata(&self.options());
        meta.insert("n_controls".into(), self.n_controls.to_string());
        serialize(tensors, meta)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Sphering> {
        let st = parse(bytes)?;
        let meta = &metadata(bytes)?;
        if meta.contains_key("plate_column") {
            return Err(Error::Format(
                "sphering file holds a per-plate fit; load it with ProfileSphering::load".into(),
            ));
        }
        let opts = read_options(meta)?;
        let n_controls = meta_usize(meta, "n_controls")?;
        Sphering::from_tensors(&st, "", opts, n_controls)
    }

    /// Writes `to_bytes()` atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, &self.to_bytes()?)
    }

    pub fn load(path: &Path) -> Result<Sphering> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        Sphering::from_bytes(&bytes).map_err(|e| prefix_path(e, path))
    }

    fn push_tensors(&self, prefix: &str, out: &mut Vec<(String, Vec<usize>, Vec<u8>)>) {
        let d = self.n_features();
        let mut push = |name: &str, shape: Vec<usize>, v: &[f64]| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            out.push((format!("{prefix}{name}"), shape, bytes));
        };
        push("mean", vec![d], &self.mean);
        push("matrix", vec![d, d], &self.matrix);
        push("eigenvalues", vec![d], &self.eigenvalues);
        if let Some(s) = &self.scale {
            push("scale", vec![d], s);
        }
    }

    fn from_tensors(
        st: &SafeTensors,
        prefix: &str,
        opts: SphereOptions,
        n_controls: usize,
    ) -> Result<Sphering> {
        let mean = read_f64(st, &format!("{prefix}mean"))?;
        let d = mean.len();
        let want = |name: &str, shape: &[usize]| -> Result<Vec<f64>> {
            let key = format!("{prefix}{name}");
            let v = read_f64(st, &key)?;
            let got = st
                .tensor(&key)
                .map(|t| t.shape().to_vec())
                .unwrap_or_default();
            if got != shape {
                return Err(Error::Format(format!(
                    "tensor {key:?} has shape {got:?}; expected {shape:?}"
                )));
            }
            Ok(v)
        };
        let matrix = want("matrix", &[d, d])?;
        let eigenvalues = want("eigenvalues", &[d])?;
        let scale = if opts.method.is_cor() {
            Some(want("scale", &[d])?)
        } else {
            None
        };
        if d == 0 {
            return Err(Error::Format("sphering file has 0 features".into()));
        }
        Ok(Sphering {
            method: opts.method,
            regularization: opts.regularization,
            lambda: opts.lambda,
            n_controls,
            mean,
            scale,
            matrix,
            eigenvalues,
        })
    }
}

/// A sphering for a profile table: one fit on the pooled controls, or one per plate.
#[derive(Clone, Debug, PartialEq)]
pub enum ProfileSphering {
    Pooled(Sphering),
    PerPlate {
        plate_column: String,
        /// Plate name → its fit.
        fits: BTreeMap<String, Sphering>,
    },
}

/// Bases before λ: pooled or per plate.
enum Bases {
    Pooled(Basis),
    PerPlate(String, BTreeMap<String, Basis>),
}

impl Bases {
    fn fit(
        profiles: &Profiles,
        controls: &ControlSelector,
        plate_column: Option<&str>,
        cor: bool,
    ) -> Result<Bases> {
        let d = profiles.n_features();
        let rows = controls.rows(profiles)?;
        let Some(col) = plate_column else {
            let x = gather(profiles, &rows);
            return Ok(Bases::Pooled(Basis::fit(&x, rows.len(), d, cor)?));
        };
        let plates = profiles.meta_column(col)?;
        let mut by_plate: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for p in plates {
            by_plate.entry(p.as_str()).or_default();
        }
        for &r in &rows {
            by_plate.entry(plates[r].as_str()).or_default().push(r);
        }
        let mut fits = BTreeMap::new();
        for (plate, rows) in by_plate {
            let x = gather(profiles, &rows);
            let basis = Basis::fit(&x, rows.len(), d, cor).map_err(|e| {
                with_context(e, &format!("plate {plate:?} ({col}; controls {controls})"))
            })?;
            fits.insert(plate.to_string(), basis);
        }
        Ok(Bases::PerPlate(col.to_string(), fits))
    }

    fn sphering(&self, opts: &SphereOptions, names: &[String]) -> Result<ProfileSphering> {
        Ok(match self {
            Bases::Pooled(b) => ProfileSphering::Pooled(b.sphering(opts, Some(names))?),
            Bases::PerPlate(col, bases) => ProfileSphering::PerPlate {
                plate_column: col.clone(),
                fits: bases
                    .iter()
                    .map(|(p, b)| {
                        b.sphering(opts, Some(names))
                            .map(|s| (p.clone(), s))
                            .map_err(|e| with_context(e, &format!("plate {p:?}")))
                    })
                    .collect::<Result<_>>()?,
            },
        })
    }
}

impl ProfileSphering {
    /// Fits on the controls of `profiles`: pooled when `plate_column` is `None`, else one fit per
    /// plate (every plate of the table needs ≥ 2 controls).
    pub fn fit(
        profiles: &Profiles,
        controls: &ControlSelector,
        plate_column: Option<&str>,
        opts: &SphereOptions,
    ) -> Result<ProfileSphering> {
        opts.validate()?;
        Bases::fit(profiles, controls, plate_column, opts.method.is_cor())?
            .sphering(opts, &profiles.feature_names)
    }

    /// One fit per plate of `plate_column`.
    pub fn fit_per_plate(
        profiles: &Profiles,
        plate_column: &str,
        controls: &ControlSelector,
        opts: &SphereOptions,
    ) -> Result<ProfileSphering> {
        Self::fit(profiles, controls, Some(plate_column), opts)
    }

    /// Fits on a control matrix (every row a control): pooled when `plates` is `None`, else per
    /// plate label.
    pub fn fit_matrix<S: AsRef<str>>(
        controls: &[f64],
        n: usize,
        d: usize,
        plates: Option<&[S]>,
        opts: &SphereOptions,
    ) -> Result<ProfileSphering> {
        opts.validate()?;
        check_matrix(controls, n, d, "controls")?;
        let Some(plates) = plates else {
            return Ok(ProfileSphering::Pooled(Sphering::fit(
                controls, n, d, opts,
            )?));
        };
        let groups = group_rows(plates, n, "plates")?;
        let mut fits = BTreeMap::new();
        for (plate, rows) in groups {
            let x = gather_rows(controls, d, &rows);
            let s = Sphering::fit(&x, rows.len(), d, opts)
                .map_err(|e| with_context(e, &format!("plate {plate:?}")))?;
            fits.insert(plate, s);
        }
        Ok(ProfileSphering::PerPlate {
            plate_column: String::new(),
            fits,
        })
    }

    pub fn n_features(&self) -> usize {
        self.fits().next().map_or(0, |(_, s)| s.n_features())
    }

    pub fn options(&self) -> SphereOptions {
        self.fits()
            .next()
            .map_or_else(SphereOptions::default, |(_, s)| s.options())
    }

    pub fn is_per_plate(&self) -> bool {
        matches!(self, ProfileSphering::PerPlate { .. })
    }

    /// The plate column of a per-plate fit ("" when fitted from labels, `None` when pooled).
    pub fn plate_column(&self) -> Option<&str> {
        match self {
            ProfileSphering::Pooled(_) => None,
            ProfileSphering::PerPlate { plate_column, .. } => Some(plate_column),
        }
    }

    /// `(plate, fit)` pairs in plate order; one `("", fit)` when pooled.
    pub fn fits(&self) -> Box<dyn Iterator<Item = (&str, &Sphering)> + '_> {
        match self {
            ProfileSphering::Pooled(s) => Box::new(std::iter::once(("", s))),
            ProfileSphering::PerPlate { fits, .. } => {
                Box::new(fits.iter().map(|(p, s)| (p.as_str(), s)))
            }
        }
    }

    /// The fit for `plate` (`None` = the pooled fit).
    pub fn get(&self, plate: Option<&str>) -> Result<&Sphering> {
        match (self, plate) {
            (ProfileSphering::Pooled(s), None) => Ok(s),
            (ProfileSphering::Pooled(_), Some(_)) => Err(Error::InvalidArgument(
                "sphering is pooled; it has no per-plate fits".into(),
            )),
            (ProfileSphering::PerPlate { .. }, None) => Err(Error::InvalidArgument(
                "sphering is per plate; name a plate".into(),
            )),
            (ProfileSphering::PerPlate { fits, .. }, Some(p)) => fits.get(p).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "no sphering fit for plate {p:?} (fitted plates: {})",
                    list_plates(fits)
                ))
            }),
        }
    }

    /// Sphers `n` row-major profiles into `out`; `plates` (one label per row) is required for a
    /// per-plate fit and ignored for a pooled one.
    pub fn transform_into<S: AsRef<str>>(
        &self,
        x: &[f64],
        n: usize,
        plates: Option<&[S]>,
        out: &mut [f64],
    ) -> Result<()> {
        let fits = match self {
            ProfileSphering::Pooled(s) => return s.transform_into(x, n, out),
            ProfileSphering::PerPlate { fits, .. } => fits,
        };
        let d = self.n_features();
        check_matrix(x, n, d, "profiles")?;
        if out.len() != x.len() {
            return Err(Error::Shape(format!(
                "sphering output: {} values for {n} rows x {d} features",
                out.len()
            )));
        }
        let plates = plates.ok_or_else(|| {
            Error::InvalidArgument("a per-plate sphering needs the plate of every row".into())
        })?;
        for (plate, rows) in group_rows(plates, n, "plates")? {
            let fit = fits.get(&plate).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "no sphering fit for plate {plate:?} (fitted plates: {})",
                    list_plates(fits)
                ))
            })?;
            let sub = fit
                .transform(&gather_rows(x, d, &rows), rows.len())
                .map_err(|e| with_context(e, &format!("plate {plate:?}")))?;
            for (k, &r) in rows.iter().enumerate() {
                out[r * d..(r + 1) * d].copy_from_slice(&sub[k * d..(k + 1) * d]);
            }
        }
        Ok(())
    }

    /// The sphered table (per-plate fits read the plate column they were fitted with).
    pub fn transform_profiles(&self, profiles: &Profiles) -> Result<Profiles> {
        let d = self.n_features();
        check_width(profiles, d)?;
        let n = profiles.n_rows();
        let mut data = vec![0.0; n * d];
        match self {
            ProfileSphering::Pooled(s) => s.transform_into(&profiles.data, n, &mut data)?,
            ProfileSphering::PerPlate { plate_column, .. } => {
                let plates = profiles.meta_column(plate_column)?;
                self.transform_into(&profiles.data, n, Some(plates), &mut data)?;
            }
        }
        Ok(sphered_table(profiles, self.options().method, data))
    }

    /// Pooled fits serialise as [`Sphering::to_bytes`]; per-plate fits hold tensors
    /// `plate{i}/mean` etc. with metadata `plate_column`, `plates` (count), `plate{i}` (name) and
    /// `n_controls{i}`.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let fits = match self {
            ProfileSphering::Pooled(s) => return s.to_bytes(),
            ProfileSphering::PerPlate { fits, .. } => fits,
        };
        let mut meta = base_metadata(&self.options());
        meta.insert(
            "plate_column".into(),
            self.plate_column().unwrap_or("").into(),
        );
        meta.insert("plates".into(), fits.len().to_string());
        let mut tensors = Vec::new();
        for (i, (plate, s)) in fits.iter().enumerate() {
            meta.insert(format!("plate{i}"), plate.clone());
            meta.insert(format!("n_controls{i}"), s.n_controls.to_string());
            s.push_tensors(&format!("plate{i}/"), &mut tensors);
        }
        serialize(tensors, meta)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<ProfileSphering> {
        let st = parse(bytes)?;
        let meta = &metadata(bytes)?;
        let opts = read_options(meta)?;
        let Some(col) = meta.get("plate_column") else {
            let n_controls = meta_usize(meta, "n_controls")?;
            return Ok(ProfileSphering::Pooled(Sphering::from_tensors(
                &st, "", opts, n_controls,
            )?));
        };
        let count = meta_usize(meta, "plates")?;
        let mut fits = BTreeMap::new();
        for i in 0..count {
            let plate = meta.get(&format!("plate{i}")).ok_or_else(|| {
                Error::Format(format!("sphering file lacks metadata \"plate{i}\""))
            })?;
            let n_controls = meta_usize(meta, &format!("n_controls{i}"))?;
            let s = Sphering::from_tensors(&st, &format!("plate{i}/"), opts, n_controls)?;
            if fits.insert(plate.clone(), s).is_some() {
                return Err(Error::Format(format!(
                    "sphering file names plate {plate:?} twice"
                )));
            }
        }
        let sp = ProfileSphering::PerPlate {
            plate_column: col.clone(),
            fits,
        };
        let d = sp.n_features();
        if count == 0 || sp.fits().any(|(_, s)| s.n_features() != d) {
            return Err(Error::Format(
                "per-plate sphering file has no plates or plates of different widths".into(),
            ));
        }
        Ok(sp)
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, &self.to_bytes()?)
    }

    pub fn load(path: &Path) -> Result<ProfileSphering> {
        let bytes = std::fs::read(path)
            .map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
        ProfileSphering::from_bytes(&bytes).map_err(|e| prefix_path(e, path))
    }
}

/// Fits on the controls (pooled or per plate) and sphers every row of `profiles`.
pub fn sphere_profiles(
    profiles: &Profiles,
    controls: &ControlSelector,
    plate_column: Option<&str>,
    opts: &SphereOptions,
) -> Result<Profiles> {
    ProfileSphering::fit(profiles, controls, plate_column, opts)?.transform_profiles(profiles)
}

/// The paper's Fig. 6B curve: for every λ in `lambdas` (ε in pycytominer mode), sphers
/// `profiles` with `base`'s method (pooled or per plate) and returns `(λ, metric(sphered))`.
/// The eigendecompositions are computed once and reused for every λ.
pub fn lambda_sweep(
    profiles: &Profiles,
    controls: &ControlSelector,
    plate_column: Option<&str>,
    base: &SphereOptions,
    lambdas: &[f64],
    metric: &mut dyn FnMut(&Profiles) -> Result<f64>,
) -> Result<Vec<(f64, f64)>> {
    for &l in lambdas {
        SphereOptions { lambda: l, ..*base }.validate()?;
    }
    let bases = Bases::fit(profiles, controls, plate_column, base.method.is_cor())?;
    let mut out = Vec::with_capacity(lambdas.len());
    for &lambda in lambdas {
        let opts = SphereOptions { lambda, ..*base };
        let sphered = bases
            .sphering(&opts, &profiles.feature_names)?
            .transform_profiles(profiles)?;
        out.push((lambda, metric(&sphered)?));
    }
    Ok(out)
}

// ---- helpers ------------------------------------------------------------------------------------

fn gather(profiles: &Profiles, rows: &[usize]) -> Vec<f64> {
    gather_rows(&profiles.data, profiles.n_features(), rows)
}

fn gather_rows(x: &[f64], d: usize, rows: &[usize]) -> Vec<f64> {
    let mut out = Vec::with_capacity(rows.len() * d);
    for &r in rows {
        out.extend_from_slice(&x[r * d..(r + 1) * d]);
    }
    out
}

/// Rows grouped by label, groups in label order.
fn group_rows<S: AsRef<str>>(
    labels: &[S],
    n: usize,
    what: &str,
) -> Result<BTreeMap<String, Vec<usize>>> {
    if labels.len() != n {
        return Err(Error::Shape(format!(
            "{what}: {} labels for {n} rows",
            labels.len()
        )));
    }
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, l) in labels.iter().enumerate() {
        groups.entry(l.as_ref().to_string()).or_default().push(i);
    }
    Ok(groups)
}

fn list_plates(fits: &BTreeMap<String, Sphering>) -> String {
    let names: Vec<String> = fits.keys().take(10).map(|p| format!("{p:?}")).collect();
    let more = fits.len().saturating_sub(names.len());
    if more > 0 {
        format!("{} and {more} more", names.join(", "))
    } else {
        names.join(", ")
    }
}

fn check_width(profiles: &Profiles, d: usize) -> Result<()> {
    if profiles.n_features() != d {
        return Err(Error::Shape(format!(
            "profiles have {} features; the sphering was fitted on {d}",
            profiles.n_features()
        )));
    }
    Ok(())
}

fn sphered_table(profiles: &Profiles, method: SphereMethod, data: Vec<f64>) -> Profiles {
    let feature_names = if method.is_zca() {
        profiles.feature_names.clone()
    } else {
        (1..=profiles.n_features())
            .map(|k| format!("PC{k}"))
            .collect()
    };
    Profiles {
        meta_names: profiles.meta_names.clone(),
        meta: profiles.meta.clone(),
        feature_names,
        data,
    }
}

fn with_context(e: Error, ctx: &str) -> Error {
    match e {
        Error::InvalidArgument(m) => Error::InvalidArgument(format!("{ctx}: {m}")),
        Error::Shape(m) => Error::Shape(format!("{ctx}: {m}")),
        Error::NonFinite(m) => Error::NonFinite(format!("{ctx}: {m}")),
        Error::Internal(m) => Error::Internal(format!("{ctx}: {m}")),
        other => other,
    }
}

fn prefix_path(e: Error, path: &Path) -> Error {
    match e {
        Error::Format(m) => Error::Format(format!("{}: {m}", path.display())),
        other => other,
    }
}

const FORMAT: &str = "phenocore.sphering/1";

fn base_metadata(opts: &SphereOptions) -> HashMap<String, String> {
    HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("method".to_string(), opts.method.name().to_string()),
        // Display of f64 is the shortest string that reads back to the same value.
        ("lambda".to_string(), opts.lambda.to_string()),
        (
            "regularization".to_string(),
            opts.regularization.name().to_string(),
        ),
    ])
}

fn serialize(
    tensors: Vec<(String, Vec<usize>, Vec<u8>)>,
    meta: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(Dtype::F64, shape.clone(), bytes)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {name:?}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, &Some(meta))
        .map_err(|e| Error::Internal(format!("serialise sphering: {e}")))
}

fn parse(bytes: &[u8]) -> Result<SafeTensors<'_>> {
    SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Format(format!("not a valid safetensors file: {e}")))
}

fn metadata(bytes: &[u8]) -> Result<HashMap<String, String>> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Format(format!("not a valid safetensors file: {e}")))?;
    meta.metadata().clone().ok_or_else(|| {
        Error::Format("safetensors file has no metadata; not a sphering file".into())
    })
}

fn meta_usize(meta: &HashMap<String, String>, key: &str) -> Result<usize> {
    meta.get(key)
        .ok_or_else(|| Error::Format(format!("sphering file lacks metadata {key:?}")))?
        .parse()
        .map_err(|_| Error::Format(format!("sphering metadata {key:?} is not a count")))
}

fn read_options(meta: &HashMap<String, String>) -> Result<SphereOptions> {
    match meta.get("format") {
        Some(f) if f == FORMAT => {}
        other => {
            return Err(Error::Format(format!(
                "not a phenocore sphering file (metadata format = {other:?}; expected {FORMAT:?})"
            )))
        }
    }
    let get = |key: &str| {
        meta.get(key)
            .ok_or_else(|| Error::Format(format!("sphering file lacks metadata {key:?}")))
    };
    let bad = |e: Error| Error::Format(e.to_string());
    let opts = SphereOptions {
        method: get("method")?.parse().map_err(bad)?,
        lambda: get("lambda")?
            .parse()
            .map_err(|_| Error::Format("sphering metadata \"lambda\" is not a number".into()))?,
        regularization: get("regularization")?.parse().map_err(bad)?,
    };
    opts.validate().map_err(bad)?;
    Ok(opts)
}

fn read_f64(st: &SafeTensors, name: &str) -> Result<Vec<f64>> {
    let t = st
        .tensor(name)
        .map_err(|_| Error::MissingKey(format!("sphering file lacks tensor {name:?}")))?;
    if t.dtype() != Dtype::F64 {
        return Err(Error::DType(format!(
            "tensor {name:?} has dtype {:?}; expected F64",
            t.dtype()
        )));
    }
    let v: Vec<f64> = t
        .data()
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    check_finite(&v, v.len(), &format!("tensor {name:?}"))
        .map_err(|e| Error::Format(e.to_string()))?;
    Ok(v)
}
