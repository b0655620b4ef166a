"""numpy ↔ C ABI conversions. C-contiguous aligned native float32 (or uint8/uint16 images) pass
through untouched and the library reads the numpy buffer directly; anything else is copied once."""

from __future__ import annotations

import ctypes
from typing import Any, Tuple

import numpy as np

from ._errors import PhenoError, Status
from ._lib import PHENO_PIXEL_F32, PHENO_PIXEL_U8, PHENO_PIXEL_U16, PhenoImage, c_float_p

_C_ALIGNED = ("C_CONTIGUOUS", "ALIGNED")


def as_f32(a: Any) -> np.ndarray:
    """`a` itself when it is already a C-contiguous aligned native float32 array, else a float32 copy."""
    return np.require(a, dtype=np.float32, requirements=_C_ALIGNED)


def f32_ptr(a: np.ndarray):
    return a.ctypes.data_as(c_float_p)


def as_f64(a: Any) -> np.ndarray:
    """`a` itself when it is already a C-contiguous aligned native float64 array, else a float64 copy."""
    return np.require(a, dtype=np.float64, requirements=_C_ALIGNED)


def f64_ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.POINTER(ctypes.c_double))


def matrix_f64(what: str, a: Any) -> np.ndarray:
    """A 2-D (N, D) float64 array (copied only when needed); errors name `what`."""
    a = np.asarray(a)
    if a.ndim != 2:
        raise PhenoError(Status.SHAPE, f"{what} must be a 2-D (N, D) array, got {a.ndim}-D with shape {a.shape}")
    _require_numeric(what, a)
    return as_f64(a)


def c_strings(what: str, items: Any):
    """A `const char *const *` array over `items` (str each; bytes kept as they are): returns the ctypes
    array, which owns the encoded strings for as long as it lives."""
    encoded = []
    for i, s in enumerate(items):
        if isinstance(s, bytes):
            encoded.append(s)
        elif isinstance(s, str):
            encoded.append(s.encode("utf-8"))
        else:
            raise PhenoError(Status.INVALID_ARGUMENT, f"{what}[{i}] must be a string, got {type(s).__name__}")
        if b"\0" in encoded[-1]:
            raise PhenoError(Status.INVALID_ARGUMENT, f"{what}[{i}] contains a NUL character")
    arr = (ctypes.c_char_p * max(len(encoded), 1))(*encoded)
    return arr


def joined_labels(what: str, labels: Any) -> list:
    """Labels per item as `|`-joined strings: accepts a list of strings ("a|b") or of lists of strings."""
    out = []
    for i, item in enumerate(labels):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (list, tuple, set, frozenset, np.ndarray)):
            parts = [str(x) for x in item]
            for p in parts:
                if "|" in p:
                    raise PhenoError(Status.INVALID_ARGUMENT, f"{what}[{i}]: label {p!r} contains '|'")
            out.append("|".join(sorted(parts) if isinstance(item, (set, frozenset)) else parts))
        elif item is None:
            out.append("")
        else:
            raise PhenoError(
                Status.INVALID_ARGUMENT, f"{what}[{i}] must be a string or a list of strings, got {type(item).__name__}"
            )
    return out


def crops_array(crops: Any) -> np.ndarray:
    """(N, C, H, W) float32 crops; a 3-D (C, H, W) array is not accepted (ambiguous with N)."""
    a = np.asarray(crops)
    if a.ndim != 4:
        raise PhenoError(
            Status.SHAPE, f"crops must be a 4-D (N, C, H, W) array, got {a.ndim}-D with shape {a.shape}"
        )
    _require_numeric("crops", a)
    return as_f32(a)


def centers_array(centers: Any) -> np.ndarray:
    a = np.asarray(centers)
    if a.ndim != 2 or a.shape[1] != 2:
        raise PhenoError(Status.SHAPE, f"centers must be an (N, 2) array of (x, y), got shape {a.shape}")
    _require_numeric("centers", a)
    return as_f32(a)


def image_struct(image: Any) -> Tuple[PhenoImage, np.ndarray]:
    """A PhenoImage over `image` (C, H, W) or (H, W); returns the struct and the array that owns the
    pixels (keep it alive while the struct is used). uint8, uint16 and float32 are passed as they are;
    other numeric types become float32."""
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[np.newaxis]
    if a.ndim != 3:
        raise PhenoError(
            Status.SHAPE, f"image must be a (C, H, W) or (H, W) array, got {a.ndim}-D with shape {a.shape}"
        )
    _require_numeric("image", a)
    if a.dtype.kind == "u" and a.dtype.itemsize == 1:
        a, pixel = np.require(a, dtype=np.uint8, requirements=_C_ALIGNED), PHENO_PIXEL_U8
    elif a.dtype.kind == "u" and a.dtype.itemsize == 2:
        a, pixel = np.require(a, dtype=np.uint16, requirements=_C_ALIGNED), PHENO_PIXEL_U16
    else:
        a, pixel = as_f32(a), PHENO_PIXEL_F32
    c, h, w = a.shape
    return PhenoImage(a.ctypes.data_as(ctypes.c_void_p), pixel, c, h, w), a


def _require_numeric(what: str, a: np.ndarray) -> None:
    if a.dtype.kind not in "biuf":
        raise PhenoError(Status.DTYPE, f"{what} must hold real numbers, got dtype {a.dtype}")
