"""Retrieval metrics on profiles with multi-label annotations (CP-CNN paper; REFERENCE §7).

    r = phenocore.metrics.mean_average_precision(profiles, moas)                 # paper's interpolated mAP
    r = phenocore.metrics.mean_average_precision(profiles, moas, method="copairs", null_size=10000, seed=0)
    r.mean, r.per_query, r.p_values, r.q_values, r.n_positives
    e = phenocore.metrics.folds_of_enrichment(profiles, moas, percentile=99)      # e.mean, e.odds_ratio, e.p_values

`profiles` is an (N, D) array (cosine similarity; computed in blocks, never N x N). `labels` holds one
entry per profile: a list of strings or a "|"-joined string ("" or [] = none). A query is a profile
sharing a label with at least one other; its library is every other profile; a hit shares a label.
Profiles without labels are never queries and stay in the libraries as negatives
(`unlabeled="drop"` leaves them out, as DeepProfilerExperiments evaluates annotated profiles only).
Per-query arrays have one entry per profile, NaN for profiles that are not queries.
"""

from __future__ import annotations

from ctypes import POINTER, Structure, byref, c_char_p, c_double, c_int, c_int32, c_size_t, c_uint64, c_void_p
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from . import _lib
from ._arrays import c_strings, f64_ptr, joined_labels, matrix_f64
from ._errors import PhenoError, Status, check
from ._lib import PhenoProgressFn, PhenoStatus

__all__ = [
    "mean_average_precision",
    "folds_of_enrichment",
    "precision_at_k",
    "recall_at_k",
    "replicate_reproducibility",
    "MapResult",
    "EnrichmentResult",
    "PooledEnrichmentResult",
    "AtKResult",
    "ReplicateResult",
]

_METHODS = {"interpolated": 0, "deepprofiler": 1, "copairs": 2}
_UNLABELED = {"negatives": 0, "drop": 1}
_ODDS = {"haldane": 0, "deepprofiler": 1, "keep": 2}


class PhenoRetrievalOptions(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("method", c_int),
        ("recall_points", c_size_t),
        ("sklearn_before_1_1", c_int32),
        ("min_positives", c_size_t),
        ("unlabeled", c_int),
        ("null_size", c_size_t),
        ("seed", c_uint64),
        ("enrichment_percentile", c_double),
        ("infinite_odds", c_int),
        ("replicate_percentile", c_double),
        ("block_rows", c_size_t),
        ("progress", PhenoProgressFn),
        ("user_data", c_void_p),
        ("copairs_float32", c_int32),
    ]


_d, _z, _o = POINTER(c_double), POINTER(c_size_t), POINTER(PhenoRetrievalOptions)
_head = [_d, c_size_t, c_size_t, POINTER(c_char_p), c_size_t]
_lib.register(
    {
        "pheno_retrieval_default_options": (PhenoRetrievalOptions, []),
        "pheno_mean_average_precision": (
            PhenoStatus,
            _head + [_o, _d, c_size_t, _d, c_size_t, _d, c_size_t, _z, c_size_t, _d, c_size_t, _z, _d],
        ),
        "pheno_folds_of_enrichment": (
            PhenoStatus,
            _head + [_o, _d, c_size_t, _d, c_size_t, _d, c_size_t, POINTER(c_uint64), c_size_t, _d],
        ),
        "pheno_folds_of_enrichment_pooled": (PhenoStatus, _head + [_o, _d, POINTER(c_uint64), _d, _d]),
        "pheno_precision_recall_at_k": (
            PhenoStatus,
            _head + [_z, c_size_t, _o, _d, c_size_t, _d, c_size_t, _d, c_size_t, _d, c_size_t],
        ),
        "pheno_replicate_reproducibility": (PhenoStatus, _head + [_o, _d, _d, POINTER(c_uint64)]),
    }
)

ProgressFn = Callable[[int, int], Any]


@dataclass
class MapResult:
    """`mean`: mAP over the queries; `per_query`: AP per profile (NaN for non-queries); `n_positives`:
    positives of every profile; `p_values` / `q_values`: copairs method with null_size > 0 (else None);
    `recall` / `precision`: interpolated and DeepProfiler methods, the mean interpolated precision over
    queries on the method's recall axis (else None)."""

    mean: float
    per_query: np.ndarray
    n_positives: np.ndarray
    p_values: Optional[np.ndarray] = None
    q_values: Optional[np.ndarray] = None
    recall: Optional[np.ndarray] = None
    precision: Optional[np.ndarray] = None

    @property
    def n_queries(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.per_query)))


@dataclass
class EnrichmentResult:
    """Per-query folds of enrichment: `mean` = mean odds ratio over queries; per profile
    `odds_ratio`, `p_values`, `thresholds` (NaN for non-queries) and `tables` (N, 2, 2):
    [[above & same, above & different], [at-or-below & same, at-or-below & different]]."""

    mean: float
    odds_ratio: np.ndarray
    p_values: np.ndarray
    thresholds: np.ndarray
    tables: np.ndarray


@dataclass
class PooledEnrichmentResult:
    """One threshold over all query-library pairs (cytominer-eval): `mean` is the pooled odds ratio
    (also `odds_ratio`), `table` the pooled 2 x 2 table."""

    mean: float
    odds_ratio: float
    p_value: float
    threshold: float
    table: np.ndarray


@dataclass
class AtKResult:
    """`mean`: mean over queries (a float for one k, an array over `k` for several); `per_query`: (N,)
    or (N, len(k)), NaN rows for non-queries."""

    k: Union[int, np.ndarray]
    mean: Union[float, np.ndarray]
    per_query: np.ndarray


@dataclass
class ReplicateResult:
    """`fraction` of replicate pairs more similar than `threshold`, the percentile of the
    non-replicate pairs' similarities."""

    fraction: float
    threshold: float
    n_replicate_pairs: int

    def __float__(self) -> float:
        return self.fraction


class _Call:
    """Profiles, labels and options of one call; keeps every ctypes object alive across it. An
    exception raised by the progress callback cancels the call and is re-raised by `finish`."""

    def __init__(self, profiles: Any, labels: Any, what: str, progress: Optional[ProgressFn], **options):
        self.x = matrix_f64("profiles", profiles)
        self.n, self.d = self.x.shape
        strings = joined_labels(what, labels) if what == "labels" else [_group(i, g) for i, g in enumerate(labels)]
        if len(strings) != self.n:
            raise PhenoError(Status.SHAPE, f"{what}: {len(strings)} entries for {self.n} profiles")
        self.labels = c_strings(what, strings)
        self.options = _lib.lib().pheno_retrieval_default_options()
        for key, value in options.items():
            setattr(self.options, key, value)
        self._progress, self._error, self._trampoline = progress, None, None
        if progress is not None:
            if not callable(progress):
                raise PhenoError(Status.INVALID_ARGUMENT, f"progress must be callable, got {type(progress).__name__}")
            self._trampoline = PhenoProgressFn(self._on_progress)
            self.options.progress = self._trampoline

    def head(self):
        return (f64_ptr(self.x), self.n, self.d, self.labels, self.n, byref(self.options))

    def _on_progress(self, done: int, total: int, _user_data) -> int:
        if self._error is not None:
            return 1
        try:
            return 1 if self._progress(done, total) is False else 0
        except BaseException as e:  # never let it unwind into C; re-raised by finish()
            self._error = e
            return 1

    def finish(self, status: int) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        check(status)


def _group(i: int, g: Any) -> str:
    if g is None:
        return ""
    if isinstance(g, bytes):
        return g.decode("utf-8")
    if isinstance(g, (str, int, np.integer)):
        return str(g)
    raise PhenoError(Status.INVALID_ARGUMENT, f"groups[{i}] must be a string, got {type(g).__name__}")


def _choice(what: str, value: str, table: dict) -> int:
    if value not in table:
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what}={value!r}: expected one of {', '.join(map(repr, table))}")
    return table[value]


def _count(what: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what} must be an integer >= 0, got {value!r}")
    return int(value)


def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


def mean_average_precision(
    profiles: Any,
    labels: Any,
    method: str = "interpolated",
    *,
    null_size: int = 0,
    seed: int = 0,
    recall_points: int = 0,
    min_positives: int = 0,
    unlabeled: str = "negatives",
    sklearn_before_1_1: bool = False,
    copairs_float32: bool = True,
    block_rows: int = 0,
    progress: Optional[ProgressFn] = None,
) -> MapResult:
    """Mean average precision of cosine-similarity retrieval.

    `method`:
    - "interpolated" (the CP-CNN paper): interpolated precision p(r) = max precision at recall >= r
      (tied similarities form one threshold), averaged over `recall_points` evenly spaced recall values
      in [0, 1] (0 = the number of profiles taking part);
    - "deepprofiler": DeepProfilerExperiments' `interpolated_precision_recall_curve` exactly (recall axis
      linspace(0, 1, N), scikit-learn `precision_recall_curve`, its running maximum and lag; queries need
      >= 2 positives as in its code; `sklearn_before_1_1=True` for the PR curve of scikit-learn < 1.1);
    - "copairs": copairs' AP (precision at each positive's rank, similarity ties in favour of positives;
      similarities compared in float32 as copairs 0.5.5 stores them, `copairs_float32=False` compares the
      float64 values); with `null_size` > 0, p-values from `null_size` random rankings per (positives, library size),
      (#null >= AP + 1) / (null_size + 1), seeded by `seed`, and Benjamini-Hochberg q-values.
    `min_positives` (0 = 2 for "deepprofiler", else 1) is the least number of positives of a query.
    `progress(done, total)` is called between blocks; returning False cancels (PhenoError CANCELLED).
    """
    call = _Call(
        profiles, labels, "labels", progress,
        method=_choice("method", method, _METHODS), null_size=_count("null_size", null_size),
        seed=_count("seed", seed), recall_points=_count("recall_points", recall_points),
        min_positives=_count("min_positives", min_positives), unlabeled=_choice("unlabeled", unlabeled, _UNLABELED),
        sklearn_before_1_1=int(bool(sklearn_before_1_1)), copairs_float32=int(bool(copairs_float32)),
        block_rows=_count("block_rows", block_rows),
    )
    n = call.n
    ap, p, q = _nan(n), _nan(n), _nan(n)
    npos = np.zeros(n, dtype=np.uintp)
    curve = _nan(max(recall_points, n, 1))  # the longest recall axis any method uses
    curve_points, mean = c_size_t(0), c_double(0.0)
    status = _lib.lib().pheno_mean_average_precision(
        *call.head(), f64_ptr(ap), n, f64_ptr(p), n, f64_ptr(q), n,
        npos.ctypes.data_as(POINTER(c_size_t)), n, f64_ptr(curve), curve.size, byref(curve_points), byref(mean),
    )
    call.finish(status)
    result = MapResult(mean=mean.value, per_query=ap, n_positives=npos.astype(np.int64))
    if method == "copairs" and null_size > 0:
        result.p_values, result.q_values = p, q
    r = curve_points.value
    if r:
        result.recall = np.linspace(0.0, 1.0, r)
        result.precision = curve[:r].copy()
    return result


def folds_of_enrichment(
    profiles: Any,
    labels: Any,
    percentile: float = 99,
    *,
    threshold: str = "per_query",
    infinite_odds: str = "haldane",
    min_positives: int = 0,
    unlabeled: str = "negatives",
    block_rows: int = 0,
    progress: Optional[ProgressFn] = None,
) -> Union[EnrichmentResult, PooledEnrichmentResult]:
    """Folds of enrichment (CP-CNN paper): per query, its library split at the `percentile` (numpy
    linear) of its similarities, crossed with same / different annotation; odds ratio and one-sided
    (greater) Fisher exact p-value; `mean` = mean odds ratio over queries.

    `threshold="global"` uses one percentile over all query-library pairs (cytominer-eval's
    `enrichment`) and returns a `PooledEnrichmentResult`. `infinite_odds`: "haldane" (default: a table
    whose odds ratio is infinite or undefined gets 0.5 added to every cell), "deepprofiler" (infinite
    becomes v22, as DeepProfilerExperiments), "keep" (scipy's inf / NaN). Finite odds ratios are scipy's.
    """
    call = _Call(
        profiles, labels, "labels", progress,
        enrichment_percentile=float(percentile), infinite_odds=_choice("infinite_odds", infinite_odds, _ODDS),
        min_positives=_count("min_positives", min_positives), unlabeled=_choice("unlabeled", unlabeled, _UNLABELED),
        block_rows=_count("block_rows", block_rows),
    )
    n = call.n
    if threshold == "global":
        t, o, p = c_double(0.0), c_double(0.0), c_double(0.0)
        table = np.zeros(4, dtype=np.uint64)
        status = _lib.lib().pheno_folds_of_enrichment_pooled(
            *call.head(), byref(t), table.ctypes.data_as(POINTER(c_uint64)), byref(o), byref(p)
        )
        call.finish(status)
        return PooledEnrichmentResult(mean=o.value, odds_ratio=o.value, p_value=p.value, threshold=t.value,
                                      table=table.astype(np.int64).reshape(2, 2))
    _choice("threshold", threshold, {"per_query": 0, "global": 1})
    odds, p, thr = _nan(n), _nan(n), _nan(n)
    tables = np.zeros(4 * n, dtype=np.uint64)
    mean = c_double(0.0)
    status = _lib.lib().pheno_folds_of_enrichment(
        *call.head(), f64_ptr(odds), n, f64_ptr(p), n, f64_ptr(thr), n,
        tables.ctypes.data_as(POINTER(c_uint64)), tables.size, byref(mean),
    )
    call.finish(status)
    return EnrichmentResult(mean=mean.value, odds_ratio=odds, p_values=p, thresholds=thr,
                            tables=tables.astype(np.int64).reshape(n, 2, 2))


def _at_k(profiles, labels, k, which, min_positives, unlabeled, block_rows, progress) -> AtKResult:
    single = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
    ks = np.atleast_1d(np.asarray(k))
    if ks.ndim != 1 or ks.size == 0 or ks.dtype.kind not in "iu" or (ks < 1).any():
        raise PhenoError(Status.INVALID_ARGUMENT, f"k must be a positive integer or a list of them, got {k!r}")
    ks = np.ascontiguousarray(ks, dtype=np.uintp)
    call = _Call(
        profiles, labels, "labels", progress,
        min_positives=_count("min_positives", min_positives), unlabeled=_choice("unlabeled", unlabeled, _UNLABELED),
        block_rows=_count("block_rows", block_rows),
    )
    n, m = call.n, ks.size
    per = np.full((n, m), np.nan)
    mean = np.full(m, np.nan)
    none = POINTER(c_double)()
    outs = (f64_ptr(per), per.size, none, 0, f64_ptr(mean), m, none, 0) if which == "precision" else \
        (none, 0, f64_ptr(per), per.size, none, 0, f64_ptr(mean), m)
    x, n_, d, labels_, n_labels, opts = call.head()
    status = _lib.lib().pheno_precision_recall_at_k(
        x, n_, d, labels_, n_labels, ks.ctypes.data_as(POINTER(c_size_t)), m, opts, *outs
    )
    call.finish(status)
    if single:
        return AtKResult(k=int(k), mean=float(mean[0]), per_query=per[:, 0].copy())
    return AtKResult(k=ks.astype(np.int64), mean=mean, per_query=per)


def precision_at_k(profiles: Any, labels: Any, k: Union[int, Sequence[int]], *, min_positives: int = 0,
                   unlabeled: str = "negatives", block_rows: int = 0,
                   progress: Optional[ProgressFn] = None) -> AtKResult:
    """precision@k per query: hits among its k most similar library profiles / k (similarity ties
    ordered by profile index); `k` an int or a list (each in 1..library size)."""
    return _at_k(profiles, labels, k, "precision", min_positives, unlabeled, block_rows, progress)


def recall_at_k(profiles: Any, labels: Any, k: Union[int, Sequence[int]], *, min_positives: int = 0,
                unlabeled: str = "negatives", block_rows: int = 0,
                progress: Optional[ProgressFn] = None) -> AtKResult:
    """recall@k per query: hits among its k most similar library profiles / its positives."""
    return _at_k(profiles, labels, k, "recall", min_positives, unlabeled, block_rows, progress)


def replicate_reproducibility(profiles: Any, groups: Any, percentile: float = 95, *, block_rows: int = 0,
                              progress: Optional[ProgressFn] = None) -> ReplicateResult:
    """Replicate reproducibility (cytominer-eval): over all pairs i < j, replicate pairs share a
    non-empty group (strings; "" or None = in no replicate pair); the fraction of replicate pairs whose
    cosine similarity exceeds the `percentile` (numpy linear) of the non-replicate pairs'."""
    call = _Call(profiles, list(groups), "groups", progress, replicate_percentile=float(percentile),
                 block_rows=_count("block_rows", block_rows))
    f, t, pairs = c_double(0.0), c_double(0.0), c_uint64(0)
    status = _lib.lib().pheno_replicate_reproducibility(*call.head(), byref(f), byref(t), byref(pairs))
    call.finish(status)
    return ReplicateResult(fraction=f.value, threshold=t.value, n_replicate_pairs=int(pairs.value))
