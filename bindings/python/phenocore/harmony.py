"""Harmony batch integration (Korsunsky et al. 2019) with harmonypy 2.1.0's algorithm and defaults.

    corrected = phenocore.harmony(pcs, plates)                             # (N, D) float64
    corrected = phenocore.harmony(pcs, {"plate": plates, "donor": donors})  # two batch columns
"""

from __future__ import annotations

import ctypes
from ctypes import POINTER, Structure, c_char_p, c_double, c_int32, c_size_t, c_uint64, c_void_p
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from . import _lib
from ._arrays import c_strings, f64_ptr, matrix_f64
from ._errors import PhenoError, Status, check
from ._lib import PhenoProgressFn, PhenoStatus

__all__ = ["harmony"]


class PhenoHarmonyOptions(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("theta", c_double),
        ("lambda_", c_double),
        ("alpha", c_double),
        ("sigma", c_double),
        ("nclust", c_size_t),
        ("tau", c_double),
        ("block_size", c_double),
        ("max_iter_harmony", c_size_t),
        ("max_iter_kmeans", c_size_t),
        ("epsilon_cluster", c_double),
        ("epsilon_harmony", c_double),
        ("batch_prop_cutoff", c_double),
        ("seed", c_uint64),
        ("progress", PhenoProgressFn),
        ("user_data", c_void_p),
    ]


_lib.register(
    {
        "pheno_harmony_default_options": (PhenoHarmonyOptions, []),
        "pheno_harmony": (
            PhenoStatus,
            [
                POINTER(c_double), c_size_t, c_size_t, POINTER(c_char_p), c_size_t,
                POINTER(PhenoHarmonyOptions), POINTER(c_double), c_size_t, POINTER(c_size_t), POINTER(c_int32),
            ],
        ),
    }
)

ProgressFn = Callable[[int, int], Any]


def harmony(
    pcs: Any,
    batch: Any,
    *,
    theta: float = 2.0,
    lamb: Optional[float] = None,
    sigma: float = 0.1,
    nclust: Optional[int] = None,
    tau: float = 0.0,
    block_size: float = 0.05,
    max_iter_harmony: int = 10,
    max_iter_kmeans: int = 4,
    epsilon_cluster: float = 1e-3,
    epsilon_harmony: float = 1e-2,
    alpha: float = 0.2,
    batch_prop_cutoff: float = 1e-5,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    return_info: bool = False,
) -> Union[np.ndarray, Tuple[np.ndarray, Dict[str, Any]]]:
    """Harmony-corrected (N, D) float64 embedding of `pcs` (N cells × D PCs), harmonypy's `Z_corr`.

    `batch`: one label per cell (a sequence or 1-D array), or several batch columns corrected at once
    (harmonypy's `vars_use` with several variables): a dict name → labels, a pandas DataFrame, or a
    list of label sequences. Labels are compared as strings; missing labels (None, NaN, "") are an
    error. Defaults are harmonypy 2.1.0's: `lamb=None` estimates the ridge penalty per cluster as
    `alpha` · E (harmonypy's default); a number fixes it. `nclust=None` = min(round(N / 30), 100).
    Deterministic for `seed`; the random draws are phenocore's own, so results match harmonypy's in
    distribution, not bit for bit. `progress(done, max_iter_harmony)` is called after each iteration;
    returning False cancels (PhenoError CANCELLED). With `return_info=True` returns
    `(corrected, {"iterations": int, "converged": bool})`.
    """
    x = matrix_f64("pcs", pcs)
    n, d = x.shape
    columns = _batch_columns(batch, n)
    flat = [label for column in columns for label in column]
    labels = c_strings("batch", flat)

    opts = _lib.lib().pheno_harmony_default_options()
    opts.theta = _number("theta", theta)
    opts.lambda_ = -1.0 if lamb is None else _number("lamb", lamb)
    if lamb is not None and not opts.lambda_ >= 0:
        raise PhenoError(Status.INVALID_ARGUMENT, f"lamb must be >= 0 or None (estimated), got {lamb!r}")
    opts.alpha = _number("alpha", alpha)
    opts.sigma = _number("sigma", sigma)
    opts.nclust = 0 if nclust is None else _count("nclust", nclust, minimum=1)
    opts.tau = _number("tau", tau)
    opts.block_size = _number("block_size", block_size)
    opts.max_iter_harmony = _count("max_iter_harmony", max_iter_harmony)
    opts.max_iter_kmeans = _count("max_iter_kmeans", max_iter_kmeans)
    opts.epsilon_cluster = _number("epsilon_cluster", epsilon_cluster)
    opts.epsilon_harmony = _number("epsilon_harmony", epsilon_harmony)
    opts.batch_prop_cutoff = _number("batch_prop_cutoff", batch_prop_cutoff)
    opts.seed = _count("seed", seed)
    if opts.seed != int(seed):
        raise PhenoError(Status.INVALID_ARGUMENT, f"seed must be below 2**64, got {seed!r}")

    error: List[BaseException] = []
    trampoline = None
    if progress is not None:
        if not callable(progress):
            raise PhenoError(Status.INVALID_ARGUMENT, f"progress must be callable, got {type(progress).__name__}")

        def on_progress(done: int, total: int, _user_data) -> int:
            if error:
                return 1
            try:
                return 1 if progress(done, total) is False else 0
            except BaseException as e:  # never let it unwind into C; re-raised below
                error.append(e)
                return 1

        trampoline = PhenoProgressFn(on_progress)
        opts.progress = trampoline

    out = np.empty((n, d), dtype=np.float64)
    iterations = c_size_t(0)
    converged = c_int32(0)
    status = _lib.lib().pheno_harmony(
        f64_ptr(x), n, d, labels, len(columns), ctypes.byref(opts), f64_ptr(out), out.size,
        ctypes.byref(iterations), ctypes.byref(converged),
    )
    if error:
        raise error[0]
    check(status)
    if return_info:
        return out, {"iterations": int(iterations.value), "converged": bool(converged.value)}
    return out


def _batch_columns(batch: Any, n: int) -> List[List[str]]:
    """The batch columns as lists of n strings each."""
    if hasattr(batch, "columns") and hasattr(batch, "__getitem__"):  # pandas DataFrame
        named = [(str(c), batch[c]) for c in batch.columns]
    elif isinstance(batch, dict):
        named = [(str(k), v) for k, v in batch.items()]
    else:
        arr = batch if isinstance(batch, np.ndarray) else None
        if arr is None and isinstance(batch, (list, tuple)) and batch and all(
            not isinstance(c, (str, bytes)) and hasattr(c, "__len__") for c in batch
        ):
            named = [(f"batch[{i}]", c) for i, c in enumerate(batch)]
        elif arr is not None and arr.ndim == 2:
            named = [(f"batch[{i}]", c) for i, c in enumerate(arr)]
        else:
            named = [("batch", batch)]
    if not named:
        raise PhenoError(Status.INVALID_ARGUMENT, "batch has no columns")
    columns = []
    for name, values in named:
        values = list(np.asarray(values, dtype=object).reshape(-1)) if not isinstance(values, list) else values
        if len(values) != n:
            raise PhenoError(Status.SHAPE, f"{name} has {len(values)} labels for {n} cells (rows of pcs)")
        column = []
        for i, v in enumerate(values):
            if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)) or v == "":
                raise PhenoError(Status.INVALID_ARGUMENT, f"{name}[{i}] is missing ({v!r}); label every cell")
            column.append(v.decode("utf-8") if isinstance(v, bytes) else str(v))
        columns.append(column)
    return columns


def _number(what: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what} must be a number, got {v!r}")
    return float(v)


def _count(what: str, v: Any, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what} must be an integer >= {minimum}, got {v!r}")
    return int(v)
