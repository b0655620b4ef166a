"""Classification metrics with scikit-learn semantics, statistics for comparing methods, and reference
subprofiles / Biosimilarity with the LDM paper's MoA / target prediction protocol (REFERENCE §8).

    phenocore.metrics.average_precision_score(scores, truth)            # sklearn AP (1-D or (N, L))
    phenocore.metrics.roc_auc(scores, truth, average="macro")            # sklearn ROC-AUC
    phenocore.metrics.anova_oneway(a, b, c); phenocore.metrics.tukey_hsd(a, b, c)
    sp = phenocore.metrics.reference_subprofile(group_profiles)           # sp.mask, sp.values
    phenocore.metrics.biosimilarity(profiles, sp.values, sp.mask)         # Pearson over the subprofile
    r = phenocore.metrics.moa_prediction(profiles, moas, seen=seen)       # r.all.map, r.seen.roc_auc_macro, ...

Argument order is (scores, truth), unlike sklearn's (y_true, y_score). Tied scores are one threshold.
Without positives AP is 0; ROC-AUC with one class only is NaN (scikit-learn 1.9 warns and returns NaN).
"""

from __future__ import annotations

from ctypes import POINTER, Structure, byref, c_char_p, c_double, c_int, c_int32, c_size_t, c_uint8, c_uint64
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np

from . import _lib
from ._arrays import as_f64, c_strings, f64_ptr, joined_labels, matrix_f64
from ._errors import PhenoError, Status, check
from ._lib import PhenoStatus

__all__ = [
    "average_precision_score",
    "roc_auc",
    "anova_oneway",
    "tukey_hsd",
    "compare_methods",
    "reference_subprofile",
    "biosimilarity",
    "moa_prediction",
    "AnovaResult",
    "TukeyResult",
    "PairComparison",
    "Subprofile",
    "PredictionResult",
    "SubsetMetrics",
]

_AVERAGES = {"macro": 0, "micro": 1, "weighted": 2, "samples": 3, None: 4}
_FORMS = {"pearson": 0, "pahl": 1}


class _PhenoSubsetMetrics(Structure):
    _fields_ = [
        ("n_queries", c_size_t),
        ("n_labels_scored", c_size_t),
        ("map", c_double),
        ("ap_macro", c_double),
        ("roc_auc_macro", c_double),
        ("top1_accuracy", c_double),
    ]


class _PhenoFoldMetrics(Structure):
    _fields_ = [
        ("n_references", c_size_t),
        ("all", _PhenoSubsetMetrics),
        ("seen", _PhenoSubsetMetrics),
        ("unseen", _PhenoSubsetMetrics),
    ]


class _PhenoPredictionOptions(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("min_compounds", c_size_t),
        ("n_reference", c_size_t),
        ("n_folds", c_size_t),
        ("seed", c_uint64),
        ("threshold", c_double),
        ("form", c_int),
        ("single_label", c_int32),
    ]


_d, _z, _u8 = POINTER(c_double), POINTER(c_size_t), POINTER(c_uint8)
_metric = (PhenoStatus, [_d, _u8, c_size_t, c_size_t, c_int32, _d, c_size_t])
_lib.register(
    {
        "pheno_average_precision_score": _metric,
        "pheno_roc_auc_score": _metric,
        "pheno_anova_oneway": (PhenoStatus, [_d, _z, c_size_t, _d, _d]),
        "pheno_tukey_hsd": (PhenoStatus, [_d, _z, c_size_t, c_double, _d, _d, _d, _d, c_size_t]),
        "pheno_reference_subprofile": (PhenoStatus, [_d, c_size_t, c_size_t, c_double, _u8, _d, c_size_t, _z]),
        "pheno_biosimilarity": (PhenoStatus, [_d, c_size_t, c_size_t, _d, _u8, c_int32, _d, c_size_t]),
        "pheno_prediction_default_options": (_PhenoPredictionOptions, []),
        "pheno_moa_prediction": (
            PhenoStatus,
            [
                _d, c_size_t, c_size_t, POINTER(c_char_p), c_size_t, _u8, POINTER(c_char_p), c_size_t,
                POINTER(_PhenoPredictionOptions), POINTER(_PhenoFoldMetrics), c_size_t, _z, _z,
            ],
        ),
    }
)


def _u8_ptr(a: np.ndarray):
    return a.ctypes.data_as(_u8)


def _flags(what: str, a: Any, shape) -> np.ndarray:
    """0/1 uint8 array of `shape` from booleans or numbers (non-zero = true)."""
    arr = np.asarray(a)
    if arr.shape != tuple(shape):
        raise PhenoError(Status.SHAPE, f"{what} has shape {arr.shape}, expected {tuple(shape)}")
    if arr.dtype.kind not in "biuf":
        raise PhenoError(Status.DTYPE, f"{what} must hold booleans or numbers, got dtype {arr.dtype}")
    return np.ascontiguousarray(arr != 0, dtype=np.uint8)


def _metric_call(name: str, scores: Any, truth: Any, average: Optional[str]):
    s = np.asarray(scores)
    if s.ndim not in (1, 2):
        raise PhenoError(Status.SHAPE, f"scores must be 1-D (N,) or 2-D (N, L), got shape {s.shape}")
    if s.dtype.kind not in "biuf":
        raise PhenoError(Status.DTYPE, f"scores must hold real numbers, got dtype {s.dtype}")
    if average not in _AVERAGES:
        raise PhenoError(
            Status.INVALID_ARGUMENT, f"average {average!r}; expected 'macro', 'micro', 'weighted', 'samples' or None"
        )
    s = as_f64(s)
    t = _flags("truth", truth, s.shape)
    n, n_labels = (s.shape[0], 1) if s.ndim == 1 else s.shape
    count = n_labels if average is None and s.ndim == 2 else 1
    out = np.empty(count)
    check(
        getattr(_lib.lib(), name)(
            f64_ptr(s), _u8_ptr(t), n, n_labels, _AVERAGES[average if s.ndim == 2 else "macro"], f64_ptr(out), count
        )
    )
    return out if average is None and s.ndim == 2 else float(out[0])


def average_precision_score(scores: Any, truth: Any, average: Optional[str] = "macro"):
    """scikit-learn's `average_precision_score(truth, scores, average=...)`: Σ (R_n − R_{n−1}) P_n over
    the distinct scores. 1-D `scores`/`truth` give the binary AP (`average` ignored); (N, L) arrays a
    multi-label average ("macro", "micro", "weighted", "samples" — the LDM paper's mAP) or, with
    `average=None`, one AP per label. 0 for a label without positives."""
    return _metric_call("pheno_average_precision_score", scores, truth, average)


def roc_auc(scores: Any, truth: Any, average: Optional[str] = "macro"):
    """scikit-learn's `roc_auc_score(truth, scores, average=...)`: trapezoidal area under the ROC curve;
    1-D binary or (N, L) multi-label (macro = the LDM paper's eq. 7), `average=None` per label. NaN for a
    label with one class only (and for an average containing one)."""
    return _metric_call("pheno_roc_auc_score", scores, truth, average)


def _groups(groups: Sequence[Any], what: str):
    if len(groups) < 2:
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what}: at least 2 groups are needed, got {len(groups)}")
    arrays = []
    for i, g in enumerate(groups):
        a = np.asarray(g, dtype=np.float64).ravel() if np.ndim(g) <= 1 else None
        if a is None:
            raise PhenoError(Status.SHAPE, f"{what}: group {i} must be 1-D, got shape {np.shape(g)}")
        arrays.append(a)
    values = as_f64(np.concatenate(arrays)) if arrays else np.empty(0)
    sizes = np.array([len(a) for a in arrays], dtype=np.uintp)
    return values, sizes, arrays


@dataclass
class AnovaResult:
    """One-way ANOVA: F `statistic` and its `pvalue` (scipy.stats.f_oneway)."""

    statistic: float
    pvalue: float


def anova_oneway(*groups: Any) -> AnovaResult:
    """One-way ANOVA of two or more groups of values (scipy.stats.f_oneway): F = between-group mean
    square / within-group mean square, p from the F(k − 1, N − k) distribution."""
    values, sizes, _ = _groups(groups, "anova_oneway")
    f, p = c_double(), c_double()
    check(
        _lib.lib().pheno_anova_oneway(
            f64_ptr(values), sizes.ctypes.data_as(_z), len(sizes), byref(f), byref(p)
        )
    )
    return AnovaResult(f.value, p.value)


@dataclass
class TukeyResult:
    """Tukey HSD (scipy.stats.tukey_hsd): (k, k) matrices, `statistic[i, j]` = mean_i − mean_j,
    `pvalue` the adjusted p-values, `low` / `high` the simultaneous confidence interval at
    `confidence_level`."""

    statistic: np.ndarray
    pvalue: np.ndarray
    low: np.ndarray
    high: np.ndarray
    confidence_level: float


def tukey_hsd(*groups: Any, confidence_level: float = 0.95) -> TukeyResult:
    """Tukey's honestly significant difference test over all pairs of two or more groups (≥ 2 values
    each; Tukey–Kramer for unequal sizes), p-values from the studentized range distribution."""
    values, sizes, _ = _groups(groups, "tukey_hsd")
    k = len(sizes)
    stat, pval, low, high = (np.empty((k, k)) for _ in range(4))
    check(
        _lib.lib().pheno_tukey_hsd(
            f64_ptr(values), sizes.ctypes.data_as(_z), k, float(confidence_level),
            f64_ptr(stat), f64_ptr(pval), f64_ptr(low), f64_ptr(high), k * k,
        )
    )
    return TukeyResult(stat, pval, low, high, float(confidence_level))


@dataclass
class PairComparison:
    """One row of statsmodels' `pairwise_tukeyhsd` table: `meandiff` = mean(group2) − mean(group1)."""

    group1: str
    group2: str
    meandiff: float
    p_adj: float
    lower: float
    upper: float
    reject: bool


def compare_methods(results: Mapping[str, Sequence[float]], alpha: float = 0.05):
    """Compares methods by their per-fold values of one metric (e.g. `{"real": maps, "harmony": maps}`)
    as the LDM paper's Tables 1–2: returns (AnovaResult, list of PairComparison for pairs in input
    order, family-wise level `alpha`)."""
    if not 0 < alpha < 1:
        raise PhenoError(Status.INVALID_ARGUMENT, f"alpha {alpha}; expected 0 < alpha < 1")
    names = list(results)
    groups = [results[n] for n in names]
    anova = anova_oneway(*groups)
    t = tukey_hsd(*groups, confidence_level=1 - alpha)
    pairs = []
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            p = float(t.pvalue[i, j])
            pairs.append(
                PairComparison(
                    names[i], names[j], float(t.statistic[j, i]), p, float(t.low[j, i]), float(t.high[j, i]), p < alpha
                )
            )
    return anova, pairs


@dataclass
class Subprofile:
    """A reference subprofile: `mask` (D,) bool of the kept features, `values` (D,) their group
    medians (NaN where not kept)."""

    mask: np.ndarray
    values: np.ndarray

    @property
    def features(self) -> np.ndarray:
        return np.flatnonzero(self.mask)


def reference_subprofile(profiles: Any, threshold: float = 0.85) -> Subprofile:
    """The reference subprofile of a group of profiles (N, D): feature j is kept when
    max(#(x_j ≥ 0), #(x_j < 0)) / N ≥ `threshold` (zero counts as positive); its value is the group
    median (Pahl et al. 2023; LDM paper)."""
    x = matrix_f64("profiles", profiles)
    n, d = x.shape
    mask, values, count = np.empty(d, np.uint8), np.empty(d), c_size_t()
    check(
        _lib.lib().pheno_reference_subprofile(
            f64_ptr(x), n, d, float(threshold), _u8_ptr(mask), f64_ptr(values), d, byref(count)
        )
    )
    return Subprofile(mask.astype(bool), values)


def biosimilarity(u: Any, v: Any, features: Any = None, form: str = "pearson"):
    """Biosimilarity of profile(s) `u` ((D,) or (N, D)) to `v` (D,) over `features` (None = all, a (D,)
    bool mask such as `Subprofile.mask`, or feature indices): "pearson" = Pearson correlation (LDM paper
    eq. 3; NaN when undefined), "pahl" = Pahl et al.'s clipped ±25, negative/NaN → 0, percent rounded to
    0.1. Returns a float for 1-D `u`, else an (N,) array."""
    if form not in _FORMS:
        raise PhenoError(Status.INVALID_ARGUMENT, f"form {form!r}; expected 'pearson' or 'pahl'")
    single = np.ndim(u) == 1
    x = matrix_f64("u", np.atleast_2d(u))
    n, d = x.shape
    ref = as_f64(np.asarray(v, dtype=np.float64).ravel())
    if ref.shape != (d,):
        raise PhenoError(Status.SHAPE, f"v has {ref.size} values, u has {d} features")
    mask = None
    if features is not None:
        f = np.asarray(features)
        if f.dtype == bool:
            mask = _flags("features", f, (d,))
        else:
            if f.ndim != 1 or f.dtype.kind not in "iu":
                raise PhenoError(Status.INVALID_ARGUMENT, "features must be a bool mask or integer indices")
            if f.size and (f.min() < 0 or f.max() >= d):
                raise PhenoError(Status.INVALID_ARGUMENT, f"feature index out of range for {d} features")
            mask = np.zeros(d, np.uint8)
            mask[f] = 1
    out = np.empty(n)
    check(
        _lib.lib().pheno_biosimilarity(
            f64_ptr(x), n, d, f64_ptr(ref), None if mask is None else _u8_ptr(mask), _FORMS[form], f64_ptr(out), n
        )
    )
    return float(out[0]) if single else out


@dataclass
class SubsetMetrics:
    """Per-fold metrics (arrays over folds) for one subset of the queries: `map` (mean over queries of
    the AP of their label ranking; eq. 4–5), `roc_auc_macro` (eq. 7), `ap_macro`, `top1_accuracy`,
    `n_queries`, `n_labels_scored` (labels with positive and negative queries, which the macro averages
    use). NaN for folds where the subset is empty."""

    n_queries: np.ndarray
    n_labels_scored: np.ndarray
    map: np.ndarray
    ap_macro: np.ndarray
    roc_auc_macro: np.ndarray
    top1_accuracy: np.ndarray


@dataclass
class PredictionResult:
    """Result of `moa_prediction`: `n_labels` taking part, `n_references` per fold, and the metrics
    of all queries, the seen and the unseen ones."""

    n_labels: int
    n_references: np.ndarray
    all: SubsetMetrics
    seen: SubsetMetrics
    unseen: SubsetMetrics


def _subset(folds, name: str) -> SubsetMetrics:
    rows = [getattr(f, name) for f in folds]
    ints = lambda key: np.array([getattr(r, key) for r in rows], dtype=np.int64)  # noqa: E731
    flts = lambda key: np.array([getattr(r, key) for r in rows], dtype=np.float64)  # noqa: E731
    return SubsetMetrics(
        ints("n_queries"), ints("n_labels_scored"), flts("map"), flts("ap_macro"), flts("roc_auc_macro"),
        flts("top1_accuracy"),
    )


def moa_prediction(
    profiles: Any,
    labels: Any,
    seen: Any = None,
    references: Optional[Sequence[Sequence[Any]]] = None,
    min_compounds: int = 10,
    n_reference: int = 5,
    n_folds: int = 10,
    seed: int = 0,
    threshold: float = 0.85,
    form: str = "pearson",
    single_label: bool = True,
) -> PredictionResult:
    """MoA / target prediction by nearest reference subprofile (LDM paper protocol; every rule is in
    src/metrics/subprofile.rs): `profiles` (N, D) one per compound, `labels` one annotation per compound
    (list of strings or "a|b"), `seen` (N,) flags (compound seen by the generative model in training;
    None = all seen). Compounds with exactly one label (`single_label`; False for targets) and labels
    with ≥ `min_compounds` of them take part; per fold `n_reference` compounds per label build its
    reference subprofile and every other compound is a query scored by its Biosimilarity to each.
    `references`, when given, fixes the folds: per fold one entry per compound, the labels it is a
    reference for ("" / [] for none); else `n_folds` folds are drawn with `seed`."""
    if form not in _FORMS:
        raise PhenoError(Status.INVALID_ARGUMENT, f"form {form!r}; expected 'pearson' or 'pahl'")
    x = matrix_f64("profiles", profiles)
    n, d = x.shape
    strings = joined_labels("labels", labels)
    if len(strings) != n:
        raise PhenoError(Status.SHAPE, f"labels: {len(strings)} entries for {n} profiles")
    c_labels = c_strings("labels", strings)
    seen_arr = None if seen is None else _flags("seen", seen, (n,))
    opts = _lib.lib().pheno_prediction_default_options()
    opts.min_compounds, opts.n_reference, opts.n_folds = int(min_compounds), int(n_reference), int(n_folds)
    opts.seed, opts.threshold, opts.form = int(seed), float(threshold), _FORMS[form]
    opts.single_label = 1 if single_label else 0
    c_refs, n_ref_folds = None, 0
    if references is not None:
        cells: List[str] = []
        for f, fold in enumerate(references):
            fold_cells = joined_labels(f"references[{f}]", fold)
            if len(fold_cells) != n:
                raise PhenoError(Status.SHAPE, f"references[{f}]: {len(fold_cells)} entries for {n} profiles")
            cells += fold_cells
        n_ref_folds = len(references)
        c_refs = c_strings("references", cells)
    capacity = max(n_ref_folds if references is not None else int(n_folds), 1)
    folds = (_PhenoFoldMetrics * capacity)()
    n_out, n_labels = c_size_t(), c_size_t()
    check(
        _lib.lib().pheno_moa_prediction(
            f64_ptr(x), n, d, c_labels, n, None if seen_arr is None else _u8_ptr(seen_arr), c_refs, n_ref_folds,
            byref(opts), folds, capacity, byref(n_out), byref(n_labels),
        )
    )
    got = list(folds)[: n_out.value]
    return PredictionResult(
        int(n_labels.value),
        np.array([f.n_references for f in got], dtype=np.int64),
        _subset(got, "all"),
        _subset(got, "seen"),
        _subset(got, "unseen"),
    )
