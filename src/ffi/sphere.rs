//! Sphering (REFERENCE §5) and treatment effect (§6) over the C ABI: the `PhenoSphering` handle
//! (fit, transform, save, load, query, free) and `pheno_treatment_effect`.

use super::boundary::{
    c_path, c_str, c_str_array, checked_len, guard, null, reference, slice, slice_mut, write_out,
};
use crate::error::{Error, PhenoStatus, Result};
use crate::profiling::effect::{treatment_effect_matrix, EffectOptions, Tier};
use crate::profiling::sphere::{
    ProfileSphering, Regularization, SphereMethod, SphereOptions, Sphering,
};
use std::ffi::{c_char, CString};
use std::mem::{offset_of, size_of};

/// Sphering method (pycytominer's names).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoSphereMethod {
    /// Q = U W Uᵀ, the paper's sphering (default).
    PHENO_SPHERE_ZCA = 0,
    /// Q = W Uᵀ: output column k is principal component k (decreasing eigenvalue).
    PHENO_SPHERE_PCA = 1,
    /// ZCA on features standardised by the controls' sd (the correlation matrix).
    PHENO_SPHERE_ZCA_COR = 2,
    /// PCA on the correlation matrix.
    PHENO_SPHERE_PCA_COR = 3,
}

/// How `lambda` regularises the whitening weights W.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoSphereRegularization {
    /// W = (Δ + λ)^(-1/2) on the eigenvalues Δ of the controls' covariance (divisor n),
    /// REFERENCE §5 (default).
    PHENO_SPHERE_REG_EIGENVALUE = 0,
    /// pycytominer Spherize: W = sqrt(n - 1) / (s + λ) on the singular values s of the centred
    /// controls (λ is pycytominer's epsilon, default there 1e-6).
    PHENO_SPHERE_REG_PYCYTOMINER = 1,
}

/// Options for `pheno_sphering_fit`. Initialise with `pheno_sphere_default_options()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoSphereOptions {
    /// `sizeof(PhenoSphereOptions)`; set by `pheno_sphere_default_options()`.
    pub struct_size: usize,
    /// Default PHENO_SPHERE_ZCA.
    pub method: PhenoSphereMethod,
    /// λ (or pycytominer's epsilon), finite and >= 0; default 1e-3. λ = 0 with a singular
    /// covariance (constant features, fewer controls than features) is PHENO_ERR_INVALID_ARGUMENT.
    pub lambda: f64,
    /// Default PHENO_SPHERE_REG_EIGENVALUE.
    pub regularization: PhenoSphereRegularization,
}

/// Default sphering options: ZCA, λ = 1e-3, eigenvalue regularisation.
#[no_mangle]
pub extern "C" fn pheno_sphere_default_options() -> PhenoSphereOptions {
    PhenoSphereOptions {
        struct_size: size_of::<PhenoSphereOptions>(),
        method: PhenoSphereMethod::PHENO_SPHERE_ZCA,
        lambda: 1e-3,
        regularization: PhenoSphereRegularization::PHENO_SPHERE_REG_EIGENVALUE,
    }
}

/// Group of a treatment after ranking by effect, as written by `pheno_treatment_effect`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PhenoEffectTier {
    /// Control well, or a treatment in none of the three groups.
    PHENO_TIER_NONE = -1,
    PHENO_TIER_BOTTOM = 0,
    PHENO_TIER_MIDDLE = 1,
    PHENO_TIER_TOP = 2,
}

/// Options for `pheno_treatment_effect`. Initialise with `pheno_effect_default_options()`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PhenoEffectOptions {
    /// `sizeof(PhenoEffectOptions)`; set by `pheno_effect_default_options()`.
    pub struct_size: usize,
    /// Delta degrees of freedom of the sd of the control wells' distances (default 1).
    pub ddof: usize,
    /// Share of treatments in each of the bottom / middle / top groups, 0..=1/3 (default 0.2).
    pub fraction: f64,
}

/// Default treatment-effect options: ddof 1, fraction 0.2.
#[no_mangle]
pub extern "C" fn pheno_effect_default_options() -> PhenoEffectOptions {
    let d = EffectOptions::default();
    PhenoEffectOptions {
        struct_size: size_of::<PhenoEffectOptions>(),
        ddof: d.ddof,
        fraction: d.fraction,
    }
}

/// Reads the fields of a caller's option struct that lie within its `struct_size`.
struct Prefix {
    base: *const u8,
    size: usize,
}

impl Prefix {
    /// # Safety
    /// `p`, if not NULL, must point to at least `p->struct_size` readable bytes.
    unsafe fn new<T>(p: *const T, default_fn: &str) -> Result<Option<Prefix>> {
        if p.is_null() {
            return Ok(None);
        }
        let size = (p as *const usize).read_unaligned();
        if size < size_of::<usize>() || size > size_of::<T>() {
            return Err(Error::InvalidArgument(format!(
                "opts->struct_size is {size}; expected {} (initialise the struct with {default_fn}())",
                size_of::<T>()
            )));
        }
        Ok(Some(Prefix {
            base: p as *const u8,
            size,
        }))
    }

    /// # Safety
    /// `F` must be valid for any bit pattern of its size.
    unsafe fn field<F: Copy>(&self, offset: usize) -> Option<F> {
        (offset + size_of::<F>() <= self.size)
            .then(|| (self.base.add(offset) as *const F).read_unaligned())
    }
}

/// # Safety
/// `p` is NULL or points to a `PhenoSphereOptions` of at least `p->struct_size` bytes.
unsafe fn sphere_opts(p: *const PhenoSphereOptions) -> Result<SphereOptions> {
    let mut o = SphereOptions::default();
    let Some(pre) = Prefix::new(p, "pheno_sphere_default_options")? else {
        return Ok(o);
    };
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoSphereOptions, method)) {
        o.method = *SphereMethod::ALL
            .get(v as usize)
            .filter(|_| v >= 0)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                "opts->method is {v}; expected 0..=3 (PHENO_SPHERE_ZCA, _PCA, _ZCA_COR, _PCA_COR)"
            ))
            })?;
    }
    if let Some(v) = pre.field::<f64>(offset_of!(PhenoSphereOptions, lambda)) {
        o.lambda = v;
    }
    if let Some(v) = pre.field::<i32>(offset_of!(PhenoSphereOptions, regularization)) {
        o.regularization = match v {
            0 => Regularization::Eigenvalue,
            1 => Regularization::Pycytominer,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "opts->regularization is {v}; expected 0 (PHENO_SPHERE_REG_EIGENVALUE) or 1 \
                     (PHENO_SPHERE_REG_PYCYTOMINER)"
                )))
            }
        };
    }
    o.validate()
        .map_err(|e| Error::InvalidArgument(format!("opts->{e}")))?;
    Ok(o)
}

/// # Safety
/// `p` is NULL or points to a `PhenoEffectOptions` of at least `p->struct_size` bytes.
unsafe fn effect_opts(p: *const PhenoEffectOptions) -> Result<EffectOptions> {
    let mut o = EffectOptions::default();
    let Some(pre) = Prefix::new(p, "pheno_effect_default_options")? else {
        return Ok(o);
    };
    if let Some(v) = pre.field::<usize>(offset_of!(PhenoEffectOptions, ddof)) {
        o.ddof = v;
    }
    if let Some(v) = pre.field::<f64>(offset_of!(PhenoEffectOptions, fraction)) {
        o.fraction = v;
    }
    Ok(o)
}

/// A fitted sphering transform, pooled or per plate.
///
/// Thread safety: immutable after creation, so any number of threads may use one handle at the
/// same time. `pheno_sphering_free` must be called exactly once, after every other call on the
/// handle has returned.
pub struct PhenoSphering {
    inner: ProfileSphering,
    /// Plate names as C strings (empty for a pooled fit), alive as long as the handle.
    plate_names: Vec<CString>,
}

impl PhenoSphering {
    fn new(inner: ProfileSphering) -> Result<PhenoSphering> {
        let plate_names = match &inner {
            ProfileSphering::Pooled(_) => Vec::new(),
            ProfileSphering::PerPlate { fits, .. } => fits
                .keys()
                .map(|p| {
                    CString::new(p.as_str()).map_err(|_| {
                        Error::InvalidArgument(format!("plate name {p:?} contains a NUL byte"))
                    })
                })
                .collect::<Result<_>>()?,
        };
        Ok(PhenoSphering { inner, plate_names })
    }
}

const _: fn() = || {
    fn shareable<T: Send + Sync>() {}
    shareable::<PhenoSphering>();
};

/// # Safety
/// `out` is NULL or valid for a write.
unsafe fn publish(
    out: *mut *mut PhenoSphering,
    make: impl FnOnce() -> Result<ProfileSphering>,
) -> Result<()> {
    super::boundary::publish_handle(out, "out_sphering", || PhenoSphering::new(make()?))
}

/// # Safety
/// `plates` is NULL or points to `n` NUL-terminated strings.
unsafe fn plate_labels<'a>(plates: *const *const c_char, n: usize) -> Result<Option<Vec<&'a str>>> {
    if plates.is_null() {
        return Ok(None);
    }
    c_str_array(plates, n, "plates").map(Some)
}

/// Fits a sphering on `n` control profiles of `d` features (`controls`: n x d row-major
/// **double**, finite, n >= 2 per fit). `plates` NULL fits one pooled transform; otherwise it
/// holds one plate name per row and one transform is fitted per plate. `opts` may be NULL
/// (defaults). On success `*out_sphering` owns a new handle (free it with
/// `pheno_sphering_free`); on failure it is set to NULL.
///
/// # Safety
/// `controls` points to n * d doubles; `plates` is NULL or points to n NUL-terminated strings;
/// `opts` is NULL or initialised by `pheno_sphere_default_options()`; `out_sphering` is valid
/// for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_fit(
    controls: *const f64,
    n: usize,
    d: usize,
    plates: *const *const c_char,
    opts: *const PhenoSphereOptions,
    out_sphering: *mut *mut PhenoSphering,
) -> PhenoStatus {
    guard("pheno_sphering_fit", || {
        publish(out_sphering, || {
            let len = checked_len::<f64>(&[n, d], "controls")?;
            if controls.is_null() {
                return Err(null("controls"));
            }
            let x = slice(controls, len, "controls")?;
            let o = sphere_opts(opts)?;
            let plates = plate_labels(plates, n)?;
            ProfileSphering::fit_matrix(x, n, d, plates.as_deref(), &o)
        })
    })
}

/// Sphers `n` profiles of `d` features (`x`: n x d row-major **double**) into `out`
/// (`out_len` >= n * d doubles). `plates` (one name per row) is required for a per-plate fit
/// and ignored (may be NULL) for a pooled one; a plate without a fit is
/// PHENO_ERR_INVALID_ARGUMENT. `x` and `out` may be the same buffer.
///
/// # Safety
/// `sphering` is a live handle; `x` points to n * d doubles; `plates` is NULL or points to n
/// NUL-terminated strings; `out` points to `out_len` writable doubles.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_transform(
    sphering: *const PhenoSphering,
    x: *const f64,
    n: usize,
    d: usize,
    plates: *const *const c_char,
    out: *mut f64,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_sphering_transform", || {
        let s = &reference(sphering, "sphering")?.inner;
        if d != s.n_features() {
            return Err(Error::Shape(format!(
                "d is {d}; the sphering was fitted on {} features",
                s.n_features()
            )));
        }
        let len = checked_len::<f64>(&[n, d], "x")?;
        if len > 0 && x.is_null() {
            return Err(null("x"));
        }
        if out_len < len {
            return Err(Error::Shape(format!(
                "out_len is {out_len}; {n} x {d} profiles need {len}"
            )));
        }
        if len > 0 && out.is_null() {
            return Err(null("out"));
        }
        let plates = plate_labels(plates, n)?;
        let bytes = len * size_of::<f64>();
        let (xa, oa) = (x as usize, out as usize);
        if len > 0 && xa < oa + bytes && oa < xa + bytes {
            // Overlapping buffers (in place): read a copy of the input.
            let input = slice(x, len, "x")?.to_vec();
            s.transform_into(&input, n, plates.as_deref(), slice_mut(out, len, "out")?)
        } else {
            let input = slice(x, len, "x")?;
            s.transform_into(input, n, plates.as_deref(), slice_mut(out, len, "out")?)
        }
    })
}

/// Writes the sphering as safetensors (float64 `mean`, `matrix`, `eigenvalues`, optional `scale`;
/// method, λ and regularisation in the metadata) to `path`, atomically.
///
/// # Safety
/// `sphering` is a live handle; `path` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_save(
    sphering: *const PhenoSphering,
    path: *const c_char,
) -> PhenoStatus {
    guard("pheno_sphering_save", || {
        let s = &reference(sphering, "sphering")?.inner;
        s.save(c_path(path, "path")?)
    })
}

/// Loads a sphering written by `pheno_sphering_save` (or `phenocore sphere --save`). On success
/// `*out_sphering` owns a new handle; on failure it is set to NULL.
///
/// # Safety
/// `path` is a NUL-terminated string; `out_sphering` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_load(
    path: *const c_char,
    out_sphering: *mut *mut PhenoSphering,
) -> PhenoStatus {
    guard("pheno_sphering_load", || {
        publish(out_sphering, || {
            ProfileSphering::load(c_path(path, "path")?)
        })
    })
}

/// Describes a sphering: features d, method, λ, regularisation and number of plates (0 for a
/// pooled fit). Any out-pointer may be NULL to skip it.
///
/// # Safety
/// `sphering` is a live handle; each out-pointer is NULL or valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_info(
    sphering: *const PhenoSphering,
    out_d: *mut usize,
    out_method: *mut PhenoSphereMethod,
    out_lambda: *mut f64,
    out_regularization: *mut PhenoSphereRegularization,
    out_n_plates: *mut usize,
) -> PhenoStatus {
    guard("pheno_sphering_info", || {
        let h = reference(sphering, "sphering")?;
        let o = h.inner.options();
        if !out_d.is_null() {
            write_out(out_d, h.inner.n_features(), "out_d")?;
        }
        if !out_method.is_null() {
            let m = match o.method {
                SphereMethod::Zca => PhenoSphereMethod::PHENO_SPHERE_ZCA,
                SphereMethod::Pca => PhenoSphereMethod::PHENO_SPHERE_PCA,
                SphereMethod::ZcaCor => PhenoSphereMethod::PHENO_SPHERE_ZCA_COR,
                SphereMethod::PcaCor => PhenoSphereMethod::PHENO_SPHERE_PCA_COR,
            };
            write_out(out_method, m, "out_method")?;
        }
        if !out_lambda.is_null() {
            write_out(out_lambda, o.lambda, "out_lambda")?;
        }
        if !out_regularization.is_null() {
            let r = match o.regularization {
                Regularization::Eigenvalue => {
                    PhenoSphereRegularization::PHENO_SPHERE_REG_EIGENVALUE
                }
                Regularization::Pycytominer => {
                    PhenoSphereRegularization::PHENO_SPHERE_REG_PYCYTOMINER
                }
            };
            write_out(out_regularization, r, "out_regularization")?;
        }
        if !out_n_plates.is_null() {
            write_out(out_n_plates, h.plate_names.len(), "out_n_plates")?;
        }
        Ok(())
    })
}

/// Name of plate `index` (0-based, in sorted order) of a per-plate sphering. `*out_name` stays
/// valid until the handle is freed.
///
/// # Safety
/// `sphering` is a live handle; `out_name` is valid for a write.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_plate(
    sphering: *const PhenoSphering,
    index: usize,
    out_name: *mut *const c_char,
) -> PhenoStatus {
    guard("pheno_sphering_plate", || {
        let h = reference(sphering, "sphering")?;
        if out_name.is_null() {
            return Err(null("out_name"));
        }
        let name = h.plate_names.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "index is {index}; the sphering has {} plates",
                h.plate_names.len()
            ))
        })?;
        write_out(out_name, name.as_ptr(), "out_name")
    })
}

/// Copies the fitted parameters of the pooled fit (`plate` NULL) or of one plate: `out_mean`
/// (d), `out_scale` (d; the controls' sd for the -cor methods, all 1 otherwise), `out_matrix`
/// (d x d row-major; sphered = matrix · ((x − mean) / scale)), `out_eigenvalues` (d, decreasing)
/// and `out_n_controls`. `d` must equal the fit's feature count. Any out-pointer may be NULL.
///
/// # Safety
/// `sphering` is a live handle; `plate` is NULL or a NUL-terminated string; each non-NULL
/// buffer holds the number of doubles stated above.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_parameters(
    sphering: *const PhenoSphering,
    plate: *const c_char,
    d: usize,
    out_mean: *mut f64,
    out_scale: *mut f64,
    out_matrix: *mut f64,
    out_eigenvalues: *mut f64,
    out_n_controls: *mut usize,
) -> PhenoStatus {
    guard("pheno_sphering_parameters", || {
        let h = reference(sphering, "sphering")?;
        let plate = if plate.is_null() {
            None
        } else {
            Some(c_str(plate, "plate")?)
        };
        let s: &Sphering = h.inner.get(plate)?;
        if d != s.n_features() {
            return Err(Error::Shape(format!(
                "d is {d}; the sphering has {} features",
                s.n_features()
            )));
        }
        let ones;
        let scale = match s.scale() {
            Some(v) => v,
            None => {
                ones = vec![1.0; d];
                &ones
            }
        };
        let dd = checked_len::<f64>(&[d, d], "out_matrix")?;
        for (p, src, len, what) in [
            (out_mean, s.mean(), d, "out_mean"),
            (out_scale, scale, d, "out_scale"),
            (out_matrix, s.matrix(), dd, "out_matrix"),
            (out_eigenvalues, s.eigenvalues(), d, "out_eigenvalues"),
        ] {
            if !p.is_null() {
                slice_mut(p, len, what)?.copy_from_slice(src);
            }
        }
        if !out_n_controls.is_null() {
            write_out(out_n_controls, s.n_controls(), "out_n_controls")?;
        }
        Ok(())
    })
}

/// Frees a sphering; NULL is a no-op.
///
/// # Safety
/// `sphering` is NULL or a handle from this library not yet freed, with no call on it in flight.
#[no_mangle]
pub unsafe extern "C" fn pheno_sphering_free(sphering: *mut PhenoSphering) {
    if !sphering.is_null() {
        drop(Box::from_raw(sphering));
    }
}

/// Treatment effect (REFERENCE §6) of `n` (sphered) well profiles of `d` features (`x`: n x d
/// row-major **double**, finite): per plate, the Euclidean distance of every well to the plate's
/// median control profile, z-scored with the mean and sd (`ddof`) of the control wells' own
/// distances; a treatment's effect is the mean z over its non-control wells. `plates` and
/// `treatments` hold one string per well, `is_control` one flag per well (non-zero = control;
/// every plate needs >= 3 controls). Treatments are ranked by ascending effect (ties by name);
/// with N treatments and k = floor(fraction * N + 0.5), bottom = ranks [0, k), top =
/// [N - k, N), middle = [floor((N - k) / 2), floor((N - k) / 2) + k).
///
/// Outputs, one value per well, each NULL to skip, each holding `out_len` >= n values:
/// `out_distance`, `out_z` (control wells included), `out_effect` (the effect of the well's
/// treatment; NaN for control wells) and `out_tier` (the treatment's group; PHENO_TIER_NONE for
/// control wells). `opts` may be NULL (ddof 1, fraction 0.2). Thread-safe.
///
/// # Safety
/// `x` points to n * d doubles; `plates` and `treatments` to n NUL-terminated strings;
/// `is_control` to n bytes; each non-NULL output to `out_len` writable values.
#[no_mangle]
pub unsafe extern "C" fn pheno_treatment_effect(
    x: *const f64,
    n: usize,
    d: usize,
    plates: *const *const c_char,
    treatments: *const *const c_char,
    is_control: *const u8,
    opts: *const PhenoEffectOptions,
    out_distance: *mut f64,
    out_z: *mut f64,
    out_effect: *mut f64,
    out_tier: *mut PhenoEffectTier,
    out_len: usize,
) -> PhenoStatus {
    guard("pheno_treatment_effect", || {
        let len = checked_len::<f64>(&[n, d], "x")?;
        if len > 0 && x.is_null() {
            return Err(null("x"));
        }
        let x = slice(x, len, "x")?;
        if n > 0 && (plates.is_null() || treatments.is_null() || is_control.is_null()) {
            return Err(null(if plates.is_null() {
                "plates"
            } else if treatments.is_null() {
                "treatments"
            } else {
                "is_control"
            }));
        }
        let plates = c_str_array(plates, n, "plates")?;
        let treatments = c_str_array(treatments, n, "treatments")?;
        let control: Vec<bool> = slice(is_control, n, "is_control")?
            .iter()
            .map(|&c| c != 0)
            .collect();
        let o = effect_opts(opts)?;
        let wants = [
            out_distance.is_null(),
            out_z.is_null(),
            out_effect.is_null(),
            out_tier.is_null(),
        ];
        if wants.iter().any(|&skip| !skip) && out_len < n {
            return Err(Error::Shape(format!(
                "out_len is {out_len}; {n} wells need {n}"
            )));
        }
        let r = treatment_effect_matrix(x, n, d, &plates, &treatments, &control, &o)?;
        if !out_distance.is_null() {
            slice_mut(out_distance, n, "out_distance")?.copy_from_slice(&r.distance);
        }
        if !out_z.is_null() {
            slice_mut(out_z, n, "out_z")?.copy_from_slice(&r.z);
        }
        if !out_effect.is_null() || !out_tier.is_null() {
            let index = |t: &str| {
                r.treatments
                    .binary_search_by(|e| e.treatment.as_str().cmp(t))
                    .ok()
            };
            let per_well: Vec<Option<usize>> = (0..n)
                .map(|i| {
                    if control[i] {
                        None
                    } else {
                        index(treatments[i])
                    }
                })
                .collect();
            if !out_effect.is_null() {
                let out = slice_mut(out_effect, n, "out_effect")?;
                for (o, w) in out.iter_mut().zip(&per_well) {
                    *o = w.map_or(f64::NAN, |k| r.treatments[k].effect);
                }
            }
            if !out_tier.is_null() {
                let out = slice_mut(out_tier, n, "out_tier")?;
                for (o, w) in out.iter_mut().zip(&per_well) {
                    let tier = match w.map(|k| r.treatments[k].tier) {
                        Some(Tier::Bottom) => PhenoEffectTier::PHENO_TIER_BOTTOM,
                        Some(Tier::Middle) => PhenoEffectTier::PHENO_TIER_MIDDLE,
                        Some(Tier::Top) => PhenoEffectTier::PHENO_TIER_TOP,
                        Some(Tier::Unselected) | None => PhenoEffectTier::PHENO_TIER_NONE,
                    };
                    *o = tier;
                }
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controls(n: usize, d: usize) -> Vec<f64> {
        (0..n * d)
            .map(|i| ((i * 7919) % 101) as f64 / 10.0 + (i % d) as f64)
            .collect()
    }

    #[test]
    fn fit_transform_save_load_round_trip() {
        let (n, d) = (40, 4);
        let x = controls(n, d);
        let mut o = pheno_sphere_default_options();
        o.method = PhenoSphereMethod::PHENO_SPHERE_PCA_COR;
        o.lambda = 0.25;
        let mut h = std::ptr::null_mut();
        let st = unsafe { pheno_sphering_fit(x.as_ptr(), n, d, std::ptr::null(), &o, &mut h) };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        let mut out = vec![0.0; n * d];
        let st = unsafe {
            pheno_sphering_transform(
                h,
                x.as_ptr(),
                n,
                d,
                std::ptr::null(),
                out.as_mut_ptr(),
                out.len(),
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        let want = Sphering::fit(
            &x,
            n,
            d,
            &SphereOptions {
                method: SphereMethod::PcaCor,
                lambda: 0.25,
                regularization: Regularization::Eigenvalue,
            },
        )
        .unwrap()
        .transform(&x, n)
        .unwrap();
        assert_eq!(out, want);
        // In place.
        let mut inplace = x.clone();
        let p = inplace.as_mut_ptr();
        let st = unsafe { pheno_sphering_transform(h, p, n, d, std::ptr::null(), p, n * d) };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        assert_eq!(inplace, want);
        // Too small an output buffer.
        let st = unsafe {
            pheno_sphering_transform(h, x.as_ptr(), n, d, std::ptr::null(), out.as_mut_ptr(), 3)
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_SHAPE);

        let dir = tempfile::tempdir().unwrap();
        let path = CString::new(dir.path().join("s.safetensors").to_str().unwrap()).unwrap();
        assert_eq!(
            unsafe { pheno_sphering_save(h, path.as_ptr()) },
            PhenoStatus::PHENO_OK
        );
        let mut back = std::ptr::null_mut();
        assert_eq!(
            unsafe { pheno_sphering_load(path.as_ptr(), &mut back) },
            PhenoStatus::PHENO_OK
        );
        let (mut dd, mut m, mut lam, mut plates) =
            (0usize, PhenoSphereMethod::PHENO_SPHERE_ZCA, 0.0f64, 9usize);
        let st = unsafe {
            pheno_sphering_info(
                back,
                &mut dd,
                &mut m,
                &mut lam,
                std::ptr::null_mut(),
                &mut plates,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        assert_eq!(
            (dd, m, lam, plates),
            (4, PhenoSphereMethod::PHENO_SPHERE_PCA_COR, 0.25, 0)
        );
        let mut mean = vec![0.0; d];
        let mut nc = 0usize;
        let st = unsafe {
            pheno_sphering_parameters(
                back,
                std::ptr::null(),
                d,
                mean.as_mut_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut nc,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        assert_eq!(nc, n);
        assert!((mean[1] - x.chunks(d).map(|r| r[1]).sum::<f64>() / n as f64).abs() < 1e-12);
        unsafe {
            pheno_sphering_free(h);
            pheno_sphering_free(back);
            pheno_sphering_free(std::ptr::null_mut());
        }
    }

    #[test]
    fn bad_options_and_null_pointers_are_errors() {
        let x = controls(10, 2);
        let mut h = std::ptr::null_mut();
        let mut o = pheno_sphere_default_options();
        o.lambda = f64::NAN;
        let st = unsafe { pheno_sphering_fit(x.as_ptr(), 10, 2, std::ptr::null(), &o, &mut h) };
        assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
        assert!(h.is_null());
        let mut raw = pheno_sphere_default_options();
        unsafe { (std::ptr::addr_of_mut!(raw.method) as *mut i32).write(9) };
        let st = unsafe { pheno_sphering_fit(x.as_ptr(), 10, 2, std::ptr::null(), &raw, &mut h) };
        assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
        let st = unsafe {
            pheno_sphering_fit(
                std::ptr::null(),
                10,
                2,
                std::ptr::null(),
                std::ptr::null(),
                &mut h,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_NULL_POINTER);
        // An older, shorter struct: the lambda field it does not have keeps its default.
        let mut short = pheno_sphere_default_options();
        short.lambda = -5.0;
        short.struct_size = offset_of!(PhenoSphereOptions, lambda);
        let st = unsafe { pheno_sphering_fit(x.as_ptr(), 10, 2, std::ptr::null(), &short, &mut h) };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        unsafe { pheno_sphering_free(h) };
    }

    #[test]
    fn per_plate_fit_needs_plates_to_transform() {
        let (n, d) = (24, 2);
        let x = controls(n, d);
        let names: Vec<CString> = (0..n)
            .map(|i| CString::new(if i % 2 == 0 { "A" } else { "B" }).unwrap())
            .collect();
        let ptrs: Vec<*const c_char> = names.iter().map(|s| s.as_ptr()).collect();
        let mut h = std::ptr::null_mut();
        let st = unsafe {
            pheno_sphering_fit(x.as_ptr(), n, d, ptrs.as_ptr(), std::ptr::null(), &mut h)
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        let mut out = vec![0.0; n * d];
        let st = unsafe {
            pheno_sphering_transform(
                h,
                x.as_ptr(),
                n,
                d,
                std::ptr::null(),
                out.as_mut_ptr(),
                n * d,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_INVALID_ARGUMENT);
        let st = unsafe {
            pheno_sphering_transform(h, x.as_ptr(), n, d, ptrs.as_ptr(), out.as_mut_ptr(), n * d)
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        let mut name = std::ptr::null();
        assert_eq!(
            unsafe { pheno_sphering_plate(h, 1, &mut name) },
            PhenoStatus::PHENO_OK
        );
        assert_eq!(
            unsafe { std::ffi::CStr::from_ptr(name) }.to_str().unwrap(),
            "B"
        );
        assert_eq!(
            unsafe { pheno_sphering_plate(h, 2, &mut name) },
            PhenoStatus::PHENO_ERR_INVALID_ARGUMENT
        );
        unsafe { pheno_sphering_free(h) };
    }

    #[test]
    fn treatment_effect_fills_per_well_outputs() {
        // One plate: controls at distance 0, 1, 1 from their median (0), then t0 at 10, t1 at 20.
        let x = [0.0, 1.0, -1.0, 10.0, 20.0, 20.0];
        let names = ["c", "c", "c", "t0", "t1", "t1"].map(|s| CString::new(s).unwrap());
        let treat: Vec<*const c_char> = names.iter().map(|s| s.as_ptr()).collect();
        let plate = CString::new("p").unwrap();
        let plates = [plate.as_ptr(); 6];
        let ctl = [1u8, 1, 1, 0, 0, 0];
        let mut o = pheno_effect_default_options();
        o.fraction = 1.0 / 3.0; // N = 2: k = 1, bottom t0, top t1
        let (mut z, mut effect) = (vec![0.0; 6], vec![0.0; 6]);
        let mut tier = vec![PhenoEffectTier::PHENO_TIER_MIDDLE; 6];
        let st = unsafe {
            pheno_treatment_effect(
                x.as_ptr(),
                6,
                1,
                plates.as_ptr(),
                treat.as_ptr(),
                ctl.as_ptr(),
                &o,
                std::ptr::null_mut(),
                z.as_mut_ptr(),
                effect.as_mut_ptr(),
                tier.as_mut_ptr(),
                6,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_OK);
        let sd = (1.0f64 / 3.0).sqrt();
        assert!((z[3] - (10.0 - 2.0 / 3.0) / sd).abs() < 1e-12);
        assert!(effect[0].is_nan() && effect[4] == effect[5]);
        assert!((effect[4] - (20.0 - 2.0 / 3.0) / sd).abs() < 1e-12);
        use PhenoEffectTier::*;
        assert_eq!(
            tier,
            [
                PHENO_TIER_NONE,
                PHENO_TIER_NONE,
                PHENO_TIER_NONE,
                PHENO_TIER_BOTTOM,
                PHENO_TIER_TOP,
                PHENO_TIER_TOP
            ]
        );
        let st = unsafe {
            pheno_treatment_effect(
                x.as_ptr(),
                6,
                1,
                plates.as_ptr(),
                treat.as_ptr(),
                ctl.as_ptr(),
                &o,
                std::ptr::null_mut(),
                z.as_mut_ptr(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                5,
            )
        };
        assert_eq!(st, PhenoStatus::PHENO_ERR_SHAPE);
    }
}
