//! Harmony batch integration over the C ABI (`profiling::harmony`).

use super::boundary::{c_str_array, checked_len, guard, slice, slice_mut, write_out};
use super::options::{PhenoProgressFn, Prefix};
use crate::error::{Error, PhenoStatus, Result};
use crate::profiling::harmony::{harmony, HarmonyOptions};
use std::ffi::{c_char, c_void};
use std::mem::{offset_of, size_of};

/// Options for `pheno_harmony`. Initialise with `pheno_harmony_default_options()` (harmonypy
/// 2.1.0's `run_harmony` defaults), then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoHarmonyOptions {
    /// `sizeof(PhenoHarmonyOptions)`; set by `pheno_harmony_default_options()`.
    pub struct_size: usize,
    /// Diversity penalty θ of every batch (default 2).
    pub theta: f64,
    /// Ridge penalty λ of every batch coefficient; negative (default -1, harmonypy's `lamb=None`)
    /// = estimated per cluster and batch as `alpha` · E(b, k).
    pub lambda: f64,
    /// Scale of the estimated λ (default 0.2).
    pub alpha: f64,
    /// Soft-clustering bandwidth σ (default 0.1).
    pub sigma: f64,
    /// Number of clusters; 0 (default) = min(round(n / 30), 100).
    pub nclust: usize,
    /// Over-correction protection τ; 0 (default) = off.
    pub tau: f64,
    /// Fraction of the cells reassigned per block (default 0.05).
    pub block_size: f64,
    /// Maximum Harmony iterations (default 10).
    pub max_iter_harmony: usize,
    /// Maximum k-means passes per iteration (default 4).
    pub max_iter_kmeans: usize,
    /// Relative objective change that ends the k-means passes (default 1e-3).
    pub epsilon_cluster: f64,
    /// Relative objective decrease that ends the iterations (default 1e-2).
    pub epsilon_harmony: f64,
    /// Minimum mean assignment of a batch to a cluster for it to be corrected there (default 1e-5).
    pub batch_prop_cutoff: f64,
    /// Seed of the initial centroids and the update order (default 0).
    pub seed: u64,
    /// Called after each iteration with (iterations done, max_iter_harmony); may be NULL.
    pub progress: PhenoProgressFn,
    /// Passed unchanged to `progress`.
    pub user_data: *mut c_void,
}

/// Default Harmony options (harmonypy 2.1.0): theta 2, lambda estimated (-1) with alpha 0.2,
/// sigma 0.1, nclust auto (0), tau 0, block_size 0.05, max_iter_harmony 10, max_iter_kmeans 4,
/// epsilon_cluster 1e-3, epsilon_harmony 1e-2, batch_prop_cutoff 1e-5, seed 0, no progress callback.
#[no_mangle]
pub extern "C" fn pheno_harmony_default_options() -> PhenoHarmonyOptions {
    let d = HarmonyOptions::default();
    PhenoHarmonyOptions {
        struct_size: size_of::<PhenoHarmonyOptions>(),
        theta: d.theta,
        lambda: -1.0,
        alpha: d.alpha,
        sigma: d.sigma,
        nclust: 0,
        tau: d.tau,
        block_size: d.block_size,
        max_iter_harmony: d.max_iter_harmony,
        max_iter_kmeans: d.max_iter_kmeans,
        epsilon_cluster: d.epsilon_cluster,
        epsilon_harmony: d.epsilon_harmony,
        batch_prop_cutoff: d.batch_prop_cutoff,
        seed: d.seed,
        progress: None,
        user_data: std::ptr::null_mut(),
    }
}

/// λ from the C field: negative = estimated (`None`); NaN stays a value, for the range check.
fn fixed_lambda(v: f64) -> Option<f64> {
    if v < 0.0 {
        None
    } else {
        Some(v)
    }
}

/// Effective options: the library's, and the callback.
struct Opts {
    harmony: HarmonyOptions,
    progress: PhenoProgressFn,
    user_data: *mut c_void,
}

/// # Safety
/// `p` is NULL or points to a `PhenoHarmonyOptions` of at least `p->struct_size` bytes.
unsafe fn harmony_opts(p: *const PhenoHarmonyOptions) -> Result<Opts> {
    let mut o = Opts {
        harmony: HarmonyOptions::default(),
        progress: None,
        user_data: std::ptr::null_mut(),
    };
    let Some(pre) = Prefix::new(p, "opts", "pheno_harmony_default_options")? else {
        return Ok(o);
    };
    let h = &mut o.harmony;
    macro_rules! read {
        ($field:ident, $ty:ty, |$v:ident| $set:expr) => {
            if let Some($v) = pre.field::<$ty>(offset_of!(PhenoHarmonyOptions, $field)) {
                $set;
            }
        };
    }
    read!(theta, f64, |v| h.theta = v);
    read!(lambda, f64, |v| h.lambda = fixed_lambda(v));
    read!(alpha, f64, |v| h.alpha = v);
    read!(sigma, f64, |v| h.sigma = v);
    read!(nclust, usize, |v| h.nclust = (v > 0).then_some(v));
    read!(tau, f64, |v| h.tau = v);
    read!(block_size, f64, |v| h.block_size = v);
    read!(max_iter_harmony, usize, |v| h.max_iter_harmony = v);
    read!(max_iter_kmeans, usize, |v| h.max_iter_kmeans = v);
    read!(epsilon_cluster, f64, |v| h.epsilon_cluster = v);
    read!(epsilon_harmony, f64, |v| h.epsilon_harmony = v);
    read!(batch_prop_cutoff, f64, |v| h.batch_prop_cutoff = v);
    read!(seed, u64, |v| h.seed = v);
    read!(progress, PhenoProgressFn, |v| o.progress = v);
    read!(user_data, *mut c_void, |v| o.user_data = v);
    Ok(o)
}

/// Harmony batch integration (Korsunsky et al. 2019) with harmonypy 2.1.0's algorithm: corrects
/// the `n` x `d` row-major embedding `x` (double; cells x PCs) for the batch columns in `batches`
/// and writes the corrected embedding (harmonypy's `Z_corr`, double, n x d) to `out`
/// (`out_len` >= n * d, else PHENO_ERR_SHAPE).
///
/// `batches` holds `n_batch_columns` x `n` NUL-terminated labels, column after column: the label
/// of cell i in column c is `batches[c * n + i]`. Each distinct non-empty string of a column is one
/// batch (`|` is not special); an empty label is an error. Several columns are corrected at once
/// (harmonypy's `vars_use` with several variables).
///
/// `opts` may be NULL (defaults). The run is deterministic for `opts->seed` and the same for any
/// thread count; its random draws are not harmonypy's, so results agree with harmonypy's in
/// distribution (on well-separated data to ~1e-4 of the data's scale), not bit for bit.
/// `iterations` (Harmony iterations run) and `converged` (1 if the objective converged before
/// max_iter_harmony, else 0) may be NULL. Returns PHENO_ERR_NON_FINITE for NaN/Inf in `x` (naming
/// the row and column), PHENO_ERR_INVALID_ARGUMENT for bad options or labels, PHENO_ERR_CANCELLED
/// when `progress` asks to stop (nothing is written to `out` then). Thread-safe; `progress` runs
/// on the calling thread.
///
/// # Safety
/// `x` points to n * d doubles, `batches` to n_batch_columns * n NUL-terminated strings, `opts` is
/// NULL or initialised by `pheno_harmony_default_options()`, `out` points to `out_len` doubles,
/// `iterations` and `converged` are NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn pheno_harmony(
    x: *const f64,
    n: usize,
    d: usize,
    batches: *const *const c_char,
    n_batch_columns: usize,
    opts: *const PhenoHarmonyOptions,
    out: *mut f64,
    out_len: usize,
    iterations: *mut usize,
    converged: *mut i32,
) -> PhenoStatus {
    guard("pheno_harmony", || {
        let len = checked_len::<f64>(&[n, d], "x")?;
        let x = slice(x, len, "x")?;
        if n_batch_columns == 0 {
            return Err(Error::InvalidArgument(
                "n_batch_columns is 0; give at least one batch column".into(),
            ));
        }
        let labels = c_str_array(
            batches,
            checked_len::<*const c_char>(&[n_batch_columns, n], "batches")?,
            "batches",
        )?;
        let columns: Vec<&[&str]> = labels.chunks(n.max(1)).collect();
        let o = harmony_opts(opts)?;
        if out_len < len {
            return Err(Error::Shape(format!(
                "out_len is {out_len} but the corrected embedding needs n * d = {len}"
            )));
        }
        let out = slice_mut(out, len, "out")?;
        let (progress, user_data) = (o.progress, o.user_data);
        let mut report = |done: usize, total: usize| match progress {
            // SAFETY: the caller promised a valid callback taking its own user_data.
            Some(f) => unsafe { f(done, total, user_data) == 0 },
            None => true,
        };
        let res = harmony(x, n, d, &columns, &o.harmony, Some(&mut report))?;
        out.copy_from_slice(&res.corrected);
        if !iterations.is_null() {
            write_out(iterations, res.iterations, "iterations")?;
        }
        if !converged.is_null() {
            write_out(converged, res.converged as i32, "converged")?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ffi::pheno_last_error;
    use std::ffi::{CStr, CString};

    fn data(n: usize, d: usize) -> (Vec<f64>, Vec<CString>) {
        let x = (0..n * d)
            .map(|i| {
                ((i * 7919) % 101) as f64 / 25.0 + if (i / d).is_multiple_of(2) { 2.0 } else { 0.0 }
            })
            .collect();
        let labels = (0..n)
            .map(|i| CString::new(format!("plate{}", i % 3)).unwrap())
            .collect();
        (x, labels)
    }

    fn last_error() -> String {
        unsafe { CStr::from_ptr(pheno_last_error()) }
            .to_string_lossy()
            .into_owned()
    }

    #[test]
    fn matches_the_rust_api_and_checks_arguments() {
        let (n, d) = (90, 3);
        let (x, labels) = data(n, d);
        let ptrs: Vec<*const c_char> = labels.iter().map(|s| s.as_ptr()).collect();
        let mut o = pheno_harmony_default_options();
        o.seed = 5;
        o.lambda = 1.0;
        let mut out = vec![0.0; n * d];
        let (mut iterations, mut converged) = (0usize, -1i32);
        let st = unsafe {
            pheno_harmony(
                x.as_ptr(),
                n,
                d,
                ptrs.as_ptr(),
                1,
                &o,
                out.as_mut_ptr(),
                out.len(),
                &mut iterations,
                &mut converged,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK, "{}", last_error());
        let strings: Vec<&str> = labels.iter().map(|s| s.to_str().unwrap()).collect();
        let opts = HarmonyOptions {
            seed: 5,
            lambda: Some(1.0),
            ..Default::default()
        };
        let expected = harmony(&x, n, d, &[strings], &opts, None).unwrap();
        assert_eq!(out, expected.corrected);
        assert_eq!(
            (iterations, converged),
            (expected.iterations, expected.converged as i32)
        );

        // A caller built against a struct that ends before `seed` gets the default seed.
        let mut short = o;
        short.struct_size = offset_of!(PhenoHarmonyOptions, seed);
        let mut out2 = vec![0.0; n * d];
        let st = unsafe {
            pheno_harmony(
                x.as_ptr(),
                n,
                d,
                ptrs.as_ptr(),
                1,
                &short,
                out2.as_mut_ptr(),
                out2.len(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        let opts0 = HarmonyOptions {
            lambda: Some(1.0),
            ..Default::default()
        };
        let strings: Vec<&str> = labels.iter().map(|s| s.to_str().unwrap()).collect();
        let seed0 = harmony(&x, n, d, &[strings], &opts0, None).unwrap();
        assert_eq!(out2, seed0.corrected);

        let call = |x: *const f64, batches: *const *const c_char, out_len: usize| unsafe {
            pheno_harmony(
                x,
                n,
                d,
                batches,
                1,
                std::ptr::null(),
                out.clone().as_mut_ptr(),
                out_len,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(
            call(x.as_ptr(), ptrs.as_ptr(), n * d - 1),
            PhenoStatus::PHENO_ERR_SHAPE
        );
        assert!(last_error().contains("out_len"));
        assert_eq!(
            call(std::ptr::null(), ptrs.as_ptr(), n * d),
            PhenoStatus::PHENO_ERR_NULL_POINTER
        );
        assert_eq!(
            call(x.as_ptr(), std::ptr::null(), n * d),
            PhenoStatus::PHENO_ERR_NULL_POINTER
        );
        let mut bad = x.clone();
        bad[4] = f64::NAN;
        assert_eq!(
            call(bad.as_ptr(), ptrs.as_ptr(), n * d),
            PhenoStatus::PHENO_ERR_NON_FINITE
        );
        assert!(last_error().contains("row 1, column 1"), "{}", last_error());
        let mut too_big = o;
        too_big.struct_size = size_of::<PhenoHarmonyOptions>() + 8;
        let st = unsafe {
            pheno_harmony(
                x.as_ptr(),
                n,
                d,
                ptrs.as_ptr(),
                1,
                &too_big,
                out.as_mut_ptr(),
                out.len(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
    }

    #[test]
    fn two_columns_are_read_column_after_column() {
        let (n, d) = (60, 2);
        let (x, plates) = data(n, d);
        let donors: Vec<CString> = (0..n)
            .map(|i| CString::new(format!("d{}", i % 2)).unwrap())
            .collect();
        let ptrs: Vec<*const c_char> = plates.iter().chain(&donors).map(|s| s.as_ptr()).collect();
        let mut out = vec![0.0; n * d];
        let st = unsafe {
            pheno_harmony(
                x.as_ptr(),
                n,
                d,
                ptrs.as_ptr(),
                2,
                std::ptr::null(),
                out.as_mut_ptr(),
                out.len(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK, "{}", last_error());
        let col = |v: &[CString]| -> Vec<String> {
            v.iter().map(|s| s.to_str().unwrap().to_string()).collect()
        };
        let expected = harmony(
            &x,
            n,
            d,
            &[col(&plates), col(&donors)],
            &HarmonyOptions::default(),
            None,
        )
        .unwrap();
        assert_eq!(out, expected.corrected);
    }
}
