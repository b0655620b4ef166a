"""Profile tables (pycytominer layout: `Metadata_*` columns + feature columns) and aggregation of single
cells into site, well and treatment profiles (the CP-CNN paper's chain: site median, well mean, treatment
mean).

    p = phenocore.aggregate(cells, {"Metadata_Plate": plates, "Metadata_Well": wells,
                                    "Metadata_Site": sites, "Metadata_Treatment": treatments})
    p.features, p.metadata["Metadata_Treatment"], p.to_pandas()
    phenocore.write_profiles("treatments.parquet", p)
    q = phenocore.read_profiles("treatments.parquet")
"""

from __future__ import annotations

import ctypes
import os
from ctypes import POINTER, Structure, c_char_p, c_double, c_float, c_int, c_int32, c_size_t, c_void_p
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _lib
from ._arrays import c_strings
from ._errors import PhenoError, Status, check
from ._lib import PhenoProgressFn, PhenoStatus

__all__ = ["Profiles", "aggregate", "aggregate_npz", "read_profiles", "write_profiles"]

PhenoProfiles_p = c_void_p
_c_char_pp = POINTER(c_char_p)

_REDUCE = {"median": 0, "mean": 1}
_LEVEL = {"site": 0, "well": 1, "treatment": 2}
_NAN = {"drop": 0, "per_feature": 1}
_PRESETS = {"paper": ("median", "mean", "mean"), "mean": ("mean",) * 3, "median": ("median",) * 3}


class PhenoProfilesIoOptions(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("metadata_columns", _c_char_pp),
        ("n_metadata_columns", c_size_t),
        ("npy_metadata_path", c_char_p),
        ("npy_float32", c_int32),
    ]


class PhenoAggregateOptions(Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("site_op", c_int),
        ("well_op", c_int),
        ("treatment_op", c_int),
        ("level", c_int),
        ("nan_policy", c_int),
        ("fail_on_empty", c_int32),
        ("counts", c_int32),
        ("plate_column", c_char_p),
        ("well_column", c_char_p),
        ("site_column", c_char_p),
        ("treatment_column", c_char_p),
        ("progress", PhenoProgressFn),
        ("user_data", c_void_p),
    ]


_SIZE_P = POINTER(c_size_t)
_BUF = [c_char_p, c_size_t, _SIZE_P]

_lib.register(
    {
        "pheno_profiles_io_default_options": (PhenoProfilesIoOptions, []),
        "pheno_profiles_read": (PhenoStatus, [c_char_p, POINTER(PhenoProfilesIoOptions), POINTER(PhenoProfiles_p)]),
        "pheno_profiles_write": (PhenoStatus, [PhenoProfiles_p, c_char_p, POINTER(PhenoProfilesIoOptions)]),
        "pheno_profiles_new": (
            PhenoStatus,
            [POINTER(c_double), c_size_t, c_size_t, c_void_p, c_void_p, c_size_t, c_void_p, POINTER(PhenoProfiles_p)],
        ),
        "pheno_profiles_info": (PhenoStatus, [PhenoProfiles_p, _SIZE_P, _SIZE_P, _SIZE_P]),
        "pheno_profiles_data": (PhenoStatus, [PhenoProfiles_p, POINTER(c_double), c_size_t]),
        "pheno_profiles_feature_names": (PhenoStatus, [PhenoProfiles_p, *_BUF]),
        "pheno_profiles_meta_name": (PhenoStatus, [PhenoProfiles_p, c_size_t, *_BUF]),
        "pheno_profiles_meta_column": (PhenoStatus, [PhenoProfiles_p, c_size_t, *_BUF]),
        "pheno_profiles_empty_groups": (PhenoStatus, [PhenoProfiles_p, _SIZE_P]),
        "pheno_profiles_empty_group": (PhenoStatus, [PhenoProfiles_p, c_size_t, *_BUF]),
        "pheno_profiles_free": (None, [PhenoProfiles_p]),
        "pheno_aggregate_default_options": (PhenoAggregateOptions, []),
        "pheno_aggregate": (
            PhenoStatus,
            [POINTER(c_float), c_size_t, c_size_t, c_void_p, c_void_p, c_size_t, c_void_p,
             POINTER(PhenoAggregateOptions), POINTER(PhenoProfiles_p)],
        ),
        "pheno_aggregate_f64": (
            PhenoStatus,
            [POINTER(c_double), c_size_t, c_size_t, c_void_p, c_void_p, c_size_t, c_void_p,
             POINTER(PhenoAggregateOptions), POINTER(PhenoProfiles_p)],
        ),
        "pheno_aggregate_npz_dir": (
            PhenoStatus, [c_char_p, POINTER(PhenoAggregateOptions), POINTER(PhenoProfiles_p)],
        ),
    }
)


class Profiles:
    """A profile table: `metadata` (dict column → list of str, in column order), `features` (N, D)
    float64, `feature_names` (D str). `empty` lists the groups aggregation left out (no usable cells)."""

    def __init__(
        self,
        metadata: Mapping[str, Sequence[Any]],
        features: Any,
        feature_names: Optional[Sequence[str]] = None,
        empty: Optional[List[str]] = None,
    ):
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise PhenoError(Status.SHAPE, f"features must be a 2-D (N, D) array, got shape {x.shape}")
        n, d = x.shape
        names = [f"feature_{j}" for j in range(d)] if feature_names is None else [str(f) for f in feature_names]
        if len(names) != d:
            raise PhenoError(Status.SHAPE, f"{len(names)} feature names for {d} features")
        meta = {}
        for k, v in dict(metadata).items():
            col = _strings(str(k), v)
            if len(col) != n:
                raise PhenoError(Status.SHAPE, f"metadata column {k!r} has {len(col)} values for {n} rows")
            meta[str(k)] = col
        self.metadata: Dict[str, List[str]] = meta
        self.features: np.ndarray = x
        self.feature_names: List[str] = names
        self.empty: List[str] = list(empty or [])

    def __len__(self) -> int:
        return self.features.shape[0]

    def __repr__(self) -> str:
        n, d = self.features.shape
        return f"Profiles({n} rows, {d} features, metadata {list(self.metadata)})"

    def to_pandas(self):
        """A pandas DataFrame: metadata columns, then feature columns (requires pandas)."""
        import pandas as pd

        df = pd.DataFrame(self.metadata)
        feats = pd.DataFrame(self.features, columns=self.feature_names, index=df.index if len(df.columns) else None)
        return pd.concat([df, feats], axis=1) if len(df.columns) else feats

    @classmethod
    def from_pandas(cls, df, metadata_columns: Optional[Sequence[str]] = None) -> "Profiles":
        """Splits a DataFrame: `metadata_columns`, or every column starting with "Metadata_", are
        metadata; the others are features."""
        cols = [str(c) for c in df.columns]
        meta_cols = [c for c in cols if c.startswith("Metadata_")] if metadata_columns is None else list(metadata_columns)
        missing = [c for c in meta_cols if c not in cols]
        if missing:
            raise PhenoError(Status.INVALID_ARGUMENT, f"no metadata column {missing} (columns: {cols})")
        feat_cols = [c for c in df.columns if str(c) not in meta_cols]
        x = df[feat_cols].to_numpy(dtype=np.float64) if feat_cols else np.empty((len(df), 0))
        return cls({c: df[c].tolist() for c in meta_cols}, x, [str(c) for c in feat_cols])


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, (float, np.floating)) and np.isnan(v))


def _strings(what: str, values: Any) -> List[str]:
    """A column as a list of str: bytes decoded, None/NaN as ""."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "U":
        return values.reshape(-1).tolist()
    if hasattr(values, "tolist") and not isinstance(values, list):
        values = values.tolist()
    out = []
    for v in values:
        if isinstance(v, bytes):
            out.append(v.decode("utf-8"))
        elif _is_missing(v):
            out.append("")
        else:
            out.append(str(v))
    return out


class _StringBlock:
    """A `const char *const *` array of m columns × n rows (column by column) built from the distinct
    values only, so millions of repeated metadata values cost one encoded buffer each."""

    def __init__(self, what: str, columns: List[Tuple[str, List[str]]], n: int):
        self._buffers = []
        parts = []
        for name, col in columns:
            arr = np.asarray(col, dtype=object)
            uniq, inverse = np.unique(arr.astype(str), return_inverse=True) if n else (np.array([]), np.array([], int))
            addrs = np.empty(len(uniq), dtype=np.uintp)
            for k, u in enumerate(uniq.tolist()):
                b = u.encode("utf-8")
                if b"\0" in b:
                    raise PhenoError(Status.INVALID_ARGUMENT, f"{what} column {name!r} holds a NUL character")
                buf = ctypes.create_string_buffer(b)
                self._buffers.append(buf)
                addrs[k] = ctypes.addressof(buf)
            parts.append(addrs[np.asarray(inverse).reshape(-1)])
        self.pointers = np.ascontiguousarray(np.concatenate(parts) if parts else np.zeros(1, dtype=np.uintp))

    @property
    def ptr(self):
        return ctypes.c_void_p(self.pointers.ctypes.data)


def _metadata_columns(metadata: Any, n: int) -> List[Tuple[str, List[str]]]:
    if metadata is None:
        return []
    if hasattr(metadata, "columns") and hasattr(metadata, "__getitem__"):  # pandas DataFrame
        items = [(str(c), metadata[c]) for c in metadata.columns]
    elif isinstance(metadata, Mapping):
        items = [(str(k), v) for k, v in metadata.items()]
    else:
        raise PhenoError(
            Status.INVALID_ARGUMENT,
            f"metadata must be a dict of column -> values or a pandas DataFrame, got {type(metadata).__name__}",
        )
    out = []
    for name, values in items:
        col = _strings(name, values)
        if len(col) != n:
            raise PhenoError(Status.SHAPE, f"metadata column {name!r} has {len(col)} values for {n} rows")
        out.append((name, col))
    return out


def _take(handle: int) -> Profiles:
    """Copies a PhenoProfiles into Python objects and frees it."""
    lib = _lib.lib()
    try:
        n, d, m = c_size_t(), c_size_t(), c_size_t()
        check(lib.pheno_profiles_info(handle, ctypes.byref(n), ctypes.byref(d), ctypes.byref(m)))
        n, d, m = n.value, d.value, m.value
        x = np.empty((n, d), dtype=np.float64)
        check(lib.pheno_profiles_data(handle, x.ctypes.data_as(POINTER(c_double)), x.size))
        names = _split(_bytes(lambda b, l, nd: lib.pheno_profiles_feature_names(handle, b, l, nd)))
        meta = {}
        for c in range(m):
            name = _bytes(lambda b, l, nd: lib.pheno_profiles_meta_name(handle, c, b, l, nd))[:-1].decode("utf-8")
            meta[name] = _split(_bytes(lambda b, l, nd: lib.pheno_profiles_meta_column(handle, c, b, l, nd)))
        k = c_size_t()
        check(lib.pheno_profiles_empty_groups(handle, ctypes.byref(k)))
        empty = [
            _bytes(lambda b, l, nd: lib.pheno_profiles_empty_group(handle, i, b, l, nd))[:-1].decode("utf-8")
            for i in range(k.value)
        ]
    finally:
        lib.pheno_profiles_free(handle)
    p = Profiles.__new__(Profiles)
    p.metadata, p.features, p.feature_names, p.empty = meta, x, names, empty
    return p


def _bytes(call: Callable) -> bytes:
    need = c_size_t(0)
    check(call(None, 0, ctypes.byref(need)))
    if need.value == 0:
        return b""
    buf = ctypes.create_string_buffer(need.value)
    check(call(buf, need.value, ctypes.byref(need)))
    return buf.raw[: need.value]


def _split(raw: bytes) -> List[str]:
    """NUL-terminated strings one after another → list of str."""
    return [s.decode("utf-8") for s in raw.split(b"\0")[:-1]] if raw else []


def _handle(profiles: Profiles) -> int:
    """A new PhenoProfiles holding a copy of `profiles`."""
    x = np.ascontiguousarray(profiles.features, dtype=np.float64)
    n, d = x.shape
    cols = list(profiles.metadata.items())
    names = c_strings("feature_names", profiles.feature_names)
    meta_names = c_strings("metadata names", [k for k, _ in cols])
    block = _StringBlock("metadata", cols, n)
    out = PhenoProfiles_p()
    check(
        _lib.lib().pheno_profiles_new(
            x.ctypes.data_as(POINTER(c_double)), n, d, ctypes.cast(names, c_void_p),
            ctypes.cast(meta_names, c_void_p), len(cols), block.ptr, ctypes.byref(out),
        )
    )
    return out.value


def _io_options(metadata_columns=None, npy_metadata=None, npy_float32=False):
    opts = _lib.lib().pheno_profiles_io_default_options()
    keep = []
    if metadata_columns is not None:
        cols = [str(c) for c in metadata_columns]
        arr = c_strings("metadata_columns", cols)
        keep.append(arr)
        opts.metadata_columns = ctypes.cast(arr, _c_char_pp)
        opts.n_metadata_columns = len(cols)
    if npy_metadata is not None:
        path = os.fsencode(npy_metadata)
        keep.append(path)
        opts.npy_metadata_path = path
    opts.npy_float32 = 1 if npy_float32 else 0
    return opts, keep


def read_profiles(
    path: "os.PathLike[str] | str",
    *,
    metadata_columns: Optional[Sequence[str]] = None,
    npy_metadata: "Optional[os.PathLike[str] | str]" = None,
) -> Profiles:
    """Reads a profile table: `.csv`, `.tsv` (optionally `.gz`), `.parquet` (as pandas writes it) or `.npy`
    (a feature matrix; metadata from the CSV `npy_metadata`). Columns named in `metadata_columns`, or
    else those starting with "Metadata_", are metadata (strings); the others are features (float64, empty
    cells and nulls as NaN)."""
    opts, keep = _io_options(metadata_columns, npy_metadata)
    out = PhenoProfiles_p()
    check(_lib.lib().pheno_profiles_read(os.fsencode(path), ctypes.byref(opts), ctypes.byref(out)))
    del keep
    return _take(out.value)


def write_profiles(
    path: "os.PathLike[str] | str",
    profiles: Any,
    *,
    npy_float32: bool = False,
    npy_metadata: "Optional[os.PathLike[str] | str]" = None,
) -> None:
    """Writes `profiles` (a `Profiles` or a pandas DataFrame in pycytominer layout) atomically; the
    format follows the extension as in `read_profiles`. `.npy` holds the features only (float64, or
    float32 with `npy_float32`); their metadata go to the CSV `npy_metadata` when given."""
    if not isinstance(profiles, Profiles):
        if hasattr(profiles, "columns"):
            profiles = Profiles.from_pandas(profiles)
        else:
            raise PhenoError(
                Status.INVALID_ARGUMENT, f"profiles must be a Profiles or a pandas DataFrame, got {type(profiles).__name__}"
            )
    handle = _handle(profiles)
    try:
        opts, keep = _io_options(None, npy_metadata, npy_float32)
        check(_lib.lib().pheno_profiles_write(handle, os.fsencode(path), ctypes.byref(opts)))
        del keep
    finally:
        _lib.lib().pheno_profiles_free(handle)


def _aggregate_options(
    preset, site_op, well_op, treatment_op, level, nan, on_empty, counts, plate, well, site, treatment
):
    if preset not in _PRESETS:
        raise PhenoError(Status.INVALID_ARGUMENT, f"unknown preset {preset!r}; expected one of {list(_PRESETS)}")
    ops = list(_PRESETS[preset])
    for i, (what, op) in enumerate([("site_op", site_op), ("well_op", well_op), ("treatment_op", treatment_op)]):
        if op is not None:
            if op not in _REDUCE:
                raise PhenoError(Status.INVALID_ARGUMENT, f"{what} must be 'median' or 'mean', got {op!r}")
            ops[i] = op
    if level not in _LEVEL:
        raise PhenoError(Status.INVALID_ARGUMENT, f"level must be 'site', 'well' or 'treatment', got {level!r}")
    if nan not in _NAN:
        raise PhenoError(Status.INVALID_ARGUMENT, f"nan must be 'drop' or 'per_feature', got {nan!r}")
    if on_empty not in ("report", "error"):
        raise PhenoError(Status.INVALID_ARGUMENT, f"on_empty must be 'report' or 'error', got {on_empty!r}")
    opts = _lib.lib().pheno_aggregate_default_options()
    opts.site_op, opts.well_op, opts.treatment_op = (_REDUCE[o] for o in ops)
    opts.level = _LEVEL[level]
    opts.nan_policy = _NAN[nan]
    opts.fail_on_empty = 1 if on_empty == "error" else 0
    opts.counts = 1 if counts else 0
    keep = [s.encode("utf-8") for s in (plate, well, site or "", treatment or "")]
    opts.plate_column, opts.well_column, opts.site_column, opts.treatment_column = keep
    return opts, keep


def aggregate(
    features: Any,
    metadata: Any = None,
    *,
    feature_names: Optional[Sequence[str]] = None,
    level: Optional[str] = None,
    preset: str = "paper",
    site_op: Optional[str] = None,
    well_op: Optional[str] = None,
    treatment_op: Optional[str] = None,
    plate: str = "Metadata_Plate",
    well: str = "Metadata_Well",
    site: Optional[str] = "Metadata_Site",
    treatment: Optional[str] = "Metadata_Treatment",
    nan: str = "drop",
    on_empty: str = "report",
    counts: bool = True,
) -> Profiles:
    """Aggregates single cells into site, well or treatment profiles (REFERENCE §4).

    `features`: (N, D) cell features (float32 is used as is, anything else as float64); or a pandas
    DataFrame in pycytominer layout when `metadata` is None. `metadata`: dict column → N values, or a
    DataFrame; it must hold the `plate`, `well`, `site` (None: a well's cells form one site) and, for
    treatment profiles, `treatment` columns. `preset` "paper" (site median → well mean → treatment mean),
    "mean" or "median"; `site_op` / `well_op` / `treatment_op` override it. `level` defaults to
    "treatment" when the treatment column is present, else "well". `nan="drop"` drops cells holding NaN
    (the paper); "per_feature" skips NaN per feature (pandas / pycytominer). A site whose cells are all
    dropped has no profile: it is listed in `.empty` (`on_empty="error"` raises instead). The result keeps
    the key columns, every metadata column constant within each group, and Metadata_Object_Count /
    Metadata_Site_Count / Metadata_Well_Count (`counts=False` leaves them out)."""
    if metadata is None and hasattr(features, "columns"):
        table = Profiles.from_pandas(features)
        metadata, features, feature_names = table.metadata, table.features, table.feature_names
    x = np.asarray(features)
    if x.ndim != 2:
        raise PhenoError(Status.SHAPE, f"features must be a 2-D (N, D) array, got shape {x.shape}")
    if x.dtype.kind not in "biuf":
        raise PhenoError(Status.DTYPE, f"features must hold real numbers, got dtype {x.dtype}")
    single = x.dtype == np.float32
    x = np.require(x, dtype=np.float32 if single else np.float64, requirements=("C_CONTIGUOUS", "ALIGNED"))
    n, d = x.shape
    cols = _metadata_columns(metadata, n)
    names_present = {name for name, _ in cols}
    if treatment is not None and treatment not in names_present and level != "treatment":
        treatment = None
    if level is None:
        level = "treatment" if treatment is not None else "well"
    opts, keep = _aggregate_options(
        preset, site_op, well_op, treatment_op, level, nan, on_empty, counts, plate, well, site, treatment
    )
    fnames = None
    if feature_names is not None:
        fnames = c_strings("feature_names", [str(f) for f in feature_names])
        if len(feature_names) != d:
            raise PhenoError(Status.SHAPE, f"{len(feature_names)} feature names for {d} features")
    meta_names = c_strings("metadata names", [k for k, _ in cols])
    block = _StringBlock("metadata", cols, n)
    out = PhenoProfiles_p()
    fn = _lib.lib().pheno_aggregate if single else _lib.lib().pheno_aggregate_f64
    ptr = x.ctypes.data_as(POINTER(c_float if single else c_double))
    check(
        fn(
            ptr, n, d, None if fnames is None else ctypes.cast(fnames, c_void_p), ctypes.cast(meta_names, c_void_p),
            len(cols), block.ptr, ctypes.byref(opts), ctypes.byref(out),
        )
    )
    del keep
    return _take(out.value)


def aggregate_npz(
    directory: "os.PathLike[str] | str",
    *,
    level: str = "treatment",
    preset: str = "paper",
    site_op: Optional[str] = None,
    well_op: Optional[str] = None,
    treatment_op: Optional[str] = None,
    plate: str = "Metadata_Plate",
    well: str = "Metadata_Well",
    site: Optional[str] = "Metadata_Site",
    treatment: Optional[str] = "Metadata_Treatment",
    nan: str = "drop",
    on_empty: str = "report",
    counts: bool = True,
    progress: Optional[Callable[[int, int], Any]] = None,
) -> Profiles:
    """Aggregates the per-site `.npz` files of a `phenocore profile` output folder, one site file per
    worker thread in memory at a time. Options as `aggregate` (pass `treatment=None, level="well"` when
    the sites have no treatment entry). `progress(done, total)` is called with site files done; returning
    False cancels (PhenoError CANCELLED)."""
    opts, keep = _aggregate_options(
        preset, site_op, well_op, treatment_op, level, nan, on_empty, counts, plate, well, site, treatment
    )
    error: List[BaseException] = []
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

        keep.append(PhenoProgressFn(on_progress))
        opts.progress = keep[-1]
    out = PhenoProfiles_p()
    status = _lib.lib().pheno_aggregate_npz_dir(os.fsencode(directory), ctypes.byref(opts), ctypes.byref(out))
    if error:
        if out.value:
            _lib.lib().pheno_profiles_free(out.value)
        raise error[0]
    check(status)
    del keep
    return _take(out.value)
