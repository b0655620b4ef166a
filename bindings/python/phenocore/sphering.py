"""Sphering (whitening against negative controls, REFERENCE §5) and the treatment effect (§6).

    sp = phenocore.Sphering.fit(controls, lam=1e-3, method="ZCA")     # controls: (n, d)
    sphered = sp.transform(profiles)                                  # (N, d) float64
    sp.save("sphering.safetensors"); sp = phenocore.Sphering.load("sphering.safetensors")

    fx = phenocore.treatment_effect(sphered, plates, treatments, controls="DMSO")
    fx.top, fx.middle, fx.bottom                                      # treatment names
"""

from __future__ import annotations

import ctypes
import os
import weakref
from ctypes import POINTER, Structure, c_char_p, c_double, c_int, c_int32, c_size_t, c_uint8, c_void_p
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np

from . import _lib
from ._arrays import c_strings, f64_ptr, matrix_f64
from ._errors import PhenoError, Status, check
from ._lib import lib

__all__ = ["Sphering", "treatment_effect", "TreatmentEffects", "METHODS", "REGULARIZATIONS"]

METHODS = ("ZCA", "PCA", "ZCA-cor", "PCA-cor")
REGULARIZATIONS = ("eigenvalue", "pycytominer")
PathLike = Union[str, "os.PathLike[str]"]


class PhenoSphereOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("method", c_int), ("lambda_", c_double), ("regularization", c_int)]


class PhenoEffectOptions(Structure):
    _fields_ = [("struct_size", c_size_t), ("ddof", c_size_t), ("fraction", c_double)]


_c_double_p = POINTER(c_double)
_strings = POINTER(c_char_p)

_lib.register(
    {
        "pheno_sphere_default_options": (PhenoSphereOptions, []),
        "pheno_sphering_fit": (
            c_int,
            [_c_double_p, c_size_t, c_size_t, _strings, POINTER(PhenoSphereOptions), POINTER(c_void_p)],
        ),
        "pheno_sphering_transform": (
            c_int,
            [c_void_p, _c_double_p, c_size_t, c_size_t, _strings, _c_double_p, c_size_t],
        ),
        "pheno_sphering_save": (c_int, [c_void_p, c_char_p]),
        "pheno_sphering_load": (c_int, [c_char_p, POINTER(c_void_p)]),
        "pheno_sphering_info": (
            c_int,
            [c_void_p, POINTER(c_size_t), POINTER(c_int), _c_double_p, POINTER(c_int), POINTER(c_size_t)],
        ),
        "pheno_sphering_plate": (c_int, [c_void_p, c_size_t, POINTER(c_char_p)]),
        "pheno_sphering_parameters": (
            c_int,
            [c_void_p, c_char_p, c_size_t, _c_double_p, _c_double_p, _c_double_p, _c_double_p, POINTER(c_size_t)],
        ),
        "pheno_sphering_free": (None, [c_void_p]),
        "pheno_effect_default_options": (PhenoEffectOptions, []),
        "pheno_treatment_effect": (
            c_int,
            [
                _c_double_p, c_size_t, c_size_t, _strings, _strings, POINTER(c_uint8), POINTER(PhenoEffectOptions),
                _c_double_p, _c_double_p, _c_double_p, POINTER(c_int32), c_size_t,
            ],
        ),
    }
)


def _method_code(method: str) -> int:
    norm = str(method).strip().lower().replace("_", "-")
    for i, m in enumerate(METHODS):
        if m.lower() == norm:
            return i
    raise PhenoError(Status.INVALID_ARGUMENT, f"unknown sphering method {method!r}; expected one of {METHODS}")


def _regularization_code(regularization: str) -> int:
    norm = str(regularization).strip().lower()
    if norm not in REGULARIZATIONS:
        raise PhenoError(
            Status.INVALID_ARGUMENT,
            f"unknown regularization {regularization!r}; expected one of {REGULARIZATIONS}",
        )
    return REGULARIZATIONS.index(norm)


def _labels(what: str, labels: Any, n: int):
    items = list(labels)
    if len(items) != n:
        raise PhenoError(Status.SHAPE, f"{what} has {len(items)} entries for {n} rows")
    return c_strings(what, [s if isinstance(s, (str, bytes)) else str(s) for s in items])


class Sphering:
    """A fitted sphering transform (pooled or per plate): sphered = Q ((x - mean) / scale).

    Methods "ZCA" (default; the paper's Q = U (Δ + λ)^(-1/2) Uᵀ), "PCA", "ZCA-cor", "PCA-cor".
    `regularization="eigenvalue"` adds λ to the eigenvalues of the controls' covariance (divisor n);
    `"pycytominer"` reproduces pycytominer's Spherize (λ is its epsilon, added to the singular values of
    the centred controls, default 1e-6 there). Immutable: threads may share one.
    """

    def __init__(self, handle: int):
        self._handle: Optional[int] = handle
        self._finalizer = weakref.finalize(self, lib().pheno_sphering_free, c_void_p(handle))
        d, method, lam, reg, n_plates = c_size_t(), c_int(), c_double(), c_int(), c_size_t()
        check(
            lib().pheno_sphering_info(
                self._ptr, ctypes.byref(d), ctypes.byref(method), ctypes.byref(lam), ctypes.byref(reg),
                ctypes.byref(n_plates),
            )
        )
        self._d, self._method, self._lam = d.value, METHODS[method.value], lam.value
        self._regularization = REGULARIZATIONS[reg.value]
        plates = []
        for i in range(n_plates.value):
            name = c_char_p()
            check(lib().pheno_sphering_plate(self._ptr, i, ctypes.byref(name)))
            plates.append((name.value or b"").decode("utf-8"))
        self._plates = plates or None

    @classmethod
    def fit(
        cls,
        controls: Any,
        lam: float = 1e-3,
        method: str = "ZCA",
        *,
        regularization: str = "eigenvalue",
        plates: Optional[Sequence[str]] = None,
    ) -> "Sphering":
        """Fits on control profiles (n, d). `plates` (one name per row) fits one transform per plate."""
        x = matrix_f64("controls", controls)
        n, d = x.shape
        opts = lib().pheno_sphere_default_options()
        opts.method = _method_code(method)
        opts.lambda_ = float(lam)
        opts.regularization = _regularization_code(regularization)
        labels = None if plates is None else _labels("plates", plates, n)
        handle = c_void_p()
        check(lib().pheno_sphering_fit(f64_ptr(x), n, d, labels, ctypes.byref(opts), ctypes.byref(handle)))
        return cls(handle.value)

    @classmethod
    def load(cls, path: PathLike) -> "Sphering":
        """Loads a sphering saved by `save` (or `phenocore sphere`)."""
        handle = c_void_p()
        check(lib().pheno_sphering_load(os.fsencode(os.fspath(path)), ctypes.byref(handle)))
        return cls(handle.value)

    def save(self, path: PathLike) -> None:
        """Writes float64 safetensors (mean, matrix, eigenvalues, scale; method and λ in the metadata)."""
        check(lib().pheno_sphering_save(self._ptr, os.fsencode(os.fspath(path))))

    def transform(self, x: Any, plates: Optional[Sequence[str]] = None) -> np.ndarray:
        """Sphered copy of profiles (N, d) as float64; `plates` is required for a per-plate fit."""
        a = matrix_f64("profiles", x)
        n, d = a.shape
        labels = None if plates is None else _labels("plates", plates, n)
        out = np.empty((n, d), dtype=np.float64)
        check(lib().pheno_sphering_transform(self._ptr, f64_ptr(a), n, d, labels, f64_ptr(out), out.size))
        return out

    def parameters(self, plate: Optional[str] = None) -> Dict[str, Any]:
        """mean, scale (ones unless -cor), matrix (d, d), eigenvalues (decreasing) and n_controls of the
        pooled fit or of `plate`."""
        d = self._d
        mean, scale, eig = (np.empty(d) for _ in range(3))
        matrix = np.empty((d, d))
        n_controls = c_size_t()
        name = None if plate is None else str(plate).encode("utf-8")
        check(
            lib().pheno_sphering_parameters(
                self._ptr, name, d, f64_ptr(mean), f64_ptr(scale), f64_ptr(matrix), f64_ptr(eig),
                ctypes.byref(n_controls),
            )
        )
        return {"mean": mean, "scale": scale, "matrix": matrix, "eigenvalues": eig, "n_controls": n_controls.value}

    # ---- properties ------------------------------------------------------------------------------

    @property
    def n_features(self) -> int:
        return self._d

    @property
    def method(self) -> str:
        return self._method

    @property
    def lam(self) -> float:
        return self._lam

    @property
    def regularization(self) -> str:
        return self._regularization

    @property
    def plates(self) -> Optional[List[str]]:
        """Plate names of a per-plate fit (sorted), None when pooled."""
        return None if self._plates is None else list(self._plates)

    @property
    def mean(self) -> np.ndarray:
        return self.parameters()["mean"]

    @property
    def scale(self) -> np.ndarray:
        return self.parameters()["scale"]

    @property
    def matrix(self) -> np.ndarray:
        return self.parameters()["matrix"]

    @property
    def eigenvalues(self) -> np.ndarray:
        return self.parameters()["eigenvalues"]

    def close(self) -> None:
        """Frees the transform now; later calls on it raise PhenoError."""
        self._finalizer()
        self._handle = None

    def __enter__(self) -> "Sphering":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        scope = "pooled" if self._plates is None else f"{len(self._plates)} plates"
        state = "" if self._handle is not None else ", closed"
        return (
            f"Sphering(method={self._method!r}, lam={self._lam:g}, regularization={self._regularization!r}, "
            f"n_features={self._d}, {scope}{state})"
        )

    @property
    def _ptr(self) -> c_void_p:
        if self._handle is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "the sphering was closed")
        return c_void_p(self._handle)


TIERS = {-1: "", 0: "bottom", 1: "middle", 2: "top"}


@dataclass
class TreatmentEffects:
    """Result of `treatment_effect`: per treatment (sorted by name) and per well."""

    treatments: List[str]
    effect: np.ndarray
    n_wells: np.ndarray
    tier: List[str]  # "bottom", "middle", "top" or ""
    distance: np.ndarray  # per well: Euclidean distance to the plate's median control
    z: np.ndarray  # per well: z-score against the plate's control distances

    def _group(self, name: str) -> List[str]:
        rows = [i for i, t in enumerate(self.tier) if t == name]
        rows.sort(key=lambda i: (self.effect[i], self.treatments[i]))
        return [self.treatments[i] for i in rows]

    @property
    def bottom(self) -> List[str]:
        return self._group("bottom")

    @property
    def middle(self) -> List[str]:
        return self._group("middle")

    @property
    def top(self) -> List[str]:
        return self._group("top")


def treatment_effect(
    profiles: Any,
    plates: Sequence[str],
    treatments: Sequence[str],
    controls: Any,
    *,
    ddof: int = 1,
    fraction: float = 0.2,
) -> TreatmentEffects:
    """Treatment effect (REFERENCE §6) of (sphered) well profiles (n, d): distance of every well to its
    plate's median control, z-scored by the control wells' distances (mean, sd with `ddof`), averaged over
    each treatment's wells; treatments ranked and split into bottom / middle / top `fraction`.
    `controls` is a boolean array (one per well) or the treatment name of the control wells ("DMSO")."""
    x = matrix_f64("profiles", profiles)
    n, d = x.shape
    treat = [t if isinstance(t, str) else str(t) for t in treatments]
    if isinstance(controls, (str, bytes)):
        value = controls.decode("utf-8") if isinstance(controls, bytes) else controls
        flags = np.array([t == value for t in treat], dtype=np.uint8)
    else:
        flags = np.asarray(controls).astype(bool).astype(np.uint8)
    if flags.shape != (n,):
        raise PhenoError(Status.SHAPE, f"controls has shape {flags.shape}; expected ({n},)")
    if isinstance(ddof, bool) or not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise PhenoError(Status.INVALID_ARGUMENT, f"ddof must be an integer >= 0, got {ddof!r}")
    plate_arr = _labels("plates", plates, n)
    treat_arr = _labels("treatments", treat, n)
    opts = lib().pheno_effect_default_options()
    opts.ddof = int(ddof)
    opts.fraction = float(fraction)
    distance, z, effect = (np.empty(n) for _ in range(3))
    tier = np.empty(n, dtype=np.int32)
    check(
        lib().pheno_treatment_effect(
            f64_ptr(x), n, d, plate_arr, treat_arr, flags.ctypes.data_as(POINTER(c_uint8)), ctypes.byref(opts),
            f64_ptr(distance), f64_ptr(z), f64_ptr(effect), tier.ctypes.data_as(POINTER(c_int32)), n,
        )
    )
    first: Dict[str, int] = {}
    counts: Dict[str, int] = {}
    for i in range(n):
        if not flags[i]:
            first.setdefault(treat[i], i)
            counts[treat[i]] = counts.get(treat[i], 0) + 1
    names = sorted(first)
    return TreatmentEffects(
        treatments=names,
        effect=np.array([effect[first[t]] for t in names]),
        n_wells=np.array([counts[t] for t in names], dtype=np.int64),
        tier=[TIERS[int(tier[first[t]])] for t in names],
        distance=distance,
        z=z,
    )
