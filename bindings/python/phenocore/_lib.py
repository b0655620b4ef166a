"""Finding and loading libphenocore, and the ctypes declarations of its C ABI (include/phenocore.h)."""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from ctypes import POINTER, c_char_p, c_float, c_int, c_int32, c_size_t, c_uint8, c_uint32, c_uint64, c_void_p
from pathlib import Path
from typing import Mapping, Optional

ENV_VAR = "PHENOCORE_LIB"


def library_filename() -> str:
    """File name of the shared library on this platform."""
    if sys.platform == "win32":
        return "phenocore.dll"
    if sys.platform == "darwin":
        return "libphenocore.dylib"
    return "libphenocore.so"


class LibraryNotFoundError(OSError):
    """libphenocore could not be found or loaded."""


def find_library(env: Optional[Mapping[str, str]] = None, package_dir: Optional[Path] = None) -> Path:
    """Where libphenocore is: `$PHENOCORE_LIB`, else beside the package, else `target/release` of an
    enclosing cargo checkout (walking up from the package directory)."""
    env = os.environ if env is None else env
    package_dir = Path(__file__).resolve().parent if package_dir is None else Path(package_dir)
    name = library_filename()
    explicit = env.get(ENV_VAR)
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise LibraryNotFoundError(f"{ENV_VAR}={explicit!r} does not name an existing file")
        return path
    searched = [package_dir / name]
    if searched[0].is_file():
        return searched[0]
    for parent in [package_dir, *package_dir.parents]:
        candidate = parent / "target" / "release" / name
        searched.append(candidate)
        if candidate.is_file():
            return candidate
    raise LibraryNotFoundError(
        f"cannot find {name}: set {ENV_VAR} to its full path, build it with `cargo build --release` in the "
        f"phenocore repository, or install a package built with PHENOCORE_BUNDLE_LIB. Searched: "
        + ", ".join(str(p) for p in searched[:4])
        + (f" and {len(searched) - 4} more target/release folders" if len(searched) > 4 else "")
    )


# ---- C types ---------------------------------------------------------------------------------------

PhenoStatus = c_int
PHENO_PADDING_SYMMETRIC, PHENO_PADDING_TF_SAME = 0, 1
PHENO_PIXEL_U8, PHENO_PIXEL_U16, PHENO_PIXEL_F32 = 0, 1, 2
PHENO_NORM_DEEPPROFILER_LEGACY, PHENO_NORM_MINMAX, PHENO_NORM_NONE = 0, 1, 2

PhenoProgressFn = ctypes.CFUNCTYPE(c_int32, c_size_t, c_size_t, c_void_p)


class PhenoEffnetOptions(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("padding", c_int), ("bn_eps", c_float), ("device", c_int32)]


class PhenoFeatureOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("batch_size", c_size_t),
        ("progress", PhenoProgressFn),
        ("user_data", c_void_p),
    ]


class PhenoImage(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("pixel_type", c_int),
        ("channels", c_size_t),
        ("height", c_size_t),
        ("width", c_size_t),
    ]


class PhenoCropOptions(ctypes.Structure):
    _fields_ = [("struct_size", c_size_t), ("box_size", c_size_t), ("normalization", c_int)]


c_float_p = POINTER(c_float)
c_size_t_p = POINTER(c_size_t)
PhenoModel_p = c_void_p

_SIGNATURES = {
    "pheno_status_str": (c_char_p, [PhenoStatus]),
    "pheno_last_error": (c_char_p, []),
    "pheno_version_number": (c_uint32, []),
    "pheno_set_num_threads": (PhenoStatus, [c_size_t]),
    "pheno_effnet_default_options": (PhenoEffnetOptions, []),
    "pheno_effnet_load": (PhenoStatus, [c_char_p, POINTER(PhenoEffnetOptions), POINTER(PhenoModel_p)]),
    "pheno_effnet_load_from_memory": (
        PhenoStatus,
        [POINTER(c_uint8), c_size_t, POINTER(PhenoEffnetOptions), POINTER(PhenoModel_p)],
    ),
    "pheno_effnet_new": (
        PhenoStatus,
        [c_size_t, c_size_t, c_uint64, POINTER(PhenoEffnetOptions), POINTER(PhenoModel_p)],
    ),
    "pheno_effnet_save": (PhenoStatus, [PhenoModel_p, c_char_p]),
    "pheno_effnet_info": (PhenoStatus, [PhenoModel_p, c_size_t_p, c_size_t_p]),
    "pheno_effnet_layer_dim": (PhenoStatus, [PhenoModel_p, c_char_p, c_size_t_p]),
    "pheno_effnet_free": (None, [PhenoModel_p]),
    "pheno_feature_default_options": (PhenoFeatureOptions, []),
    "pheno_effnet_features": (
        PhenoStatus,
        [
            PhenoModel_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t,
            POINTER(c_char_p), c_size_t, POINTER(PhenoFeatureOptions), POINTER(c_float_p), c_size_t_p,
        ],
    ),
    "pheno_effnet_logits": (
        PhenoStatus,
        [PhenoModel_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, c_float_p, c_size_t],
    ),
    "pheno_crop_default_options": (PhenoCropOptions, []),
    "pheno_crop_cells": (
        PhenoStatus,
        [POINTER(PhenoImage), c_float_p, c_size_t, POINTER(PhenoCropOptions), c_float_p, c_size_t],
    ),
    "pheno_effnet_features_from_image": (
        PhenoStatus,
        [
            PhenoModel_p, POINTER(PhenoImage), c_float_p, c_size_t, POINTER(PhenoCropOptions),
            POINTER(c_char_p), c_size_t, POINTER(PhenoFeatureOptions), POINTER(c_float_p), c_size_t_p,
        ],
    ),
}

_lib: Optional[ctypes.CDLL] = None
_lib_lock = threading.Lock()


def register(signatures: dict) -> None:
    """Adds `{name: (restype, argtypes)}` declarations (each binding module registers its own at
    import); declared at once when the library is already loaded, else when it loads."""
    with _lib_lock:
        _SIGNATURES.update(signatures)
        if _lib is not None:
            _declare(_lib, signatures, getattr(_lib, "_phenocore_path", "libphenocore"))


def _declare(lib: ctypes.CDLL, signatures: dict, where) -> None:
    missing = [name for name in signatures if not hasattr(lib, name)]
    if missing:
        raise LibraryNotFoundError(
            f"{where} lacks {', '.join(missing)}: it is older than this package; rebuild it (cargo build --release)"
        )
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def load_library(path: Optional[os.PathLike] = None) -> ctypes.CDLL:
    """Loads libphenocore once (found with `find_library` unless `path` is given) and declares its functions."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        where = Path(path) if path is not None else find_library()
        try:
            lib = ctypes.CDLL(str(where))
        except OSError as e:
            raise LibraryNotFoundError(f"cannot load {where}: {e}") from e
        _declare(lib, _SIGNATURES, where)
        lib._phenocore_path = where  # type: ignore[attr-defined]
        _lib = lib
        return lib


def lib() -> ctypes.CDLL:
    return _lib if _lib is not None else load_library()
