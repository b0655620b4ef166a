"""Single-cell crops from a field image (src/profiling/crops.rs documents the convention)."""

from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from ._arrays import centers_array, f32_ptr, image_struct
from ._errors import PhenoError, Status, check
from ._lib import PHENO_NORM_DEEPPROFILER_LEGACY, PHENO_NORM_MINMAX, PHENO_NORM_NONE, PhenoCropOptions, lib

NORMALIZATIONS = {
    "deepprofiler_legacy": PHENO_NORM_DEEPPROFILER_LEGACY,
    "minmax": PHENO_NORM_MINMAX,
    "none": PHENO_NORM_NONE,
}


def crop_options(box_size: int, normalize: str) -> PhenoCropOptions:
    if normalize not in NORMALIZATIONS:
        raise PhenoError(
            Status.INVALID_ARGUMENT,
            f"unknown normalize {normalize!r}: expected one of {', '.join(map(repr, NORMALIZATIONS))}",
        )
    if isinstance(box_size, bool) or not isinstance(box_size, (int, np.integer)) or box_size < 1:
        raise PhenoError(Status.INVALID_ARGUMENT, f"box_size must be a positive integer, got {box_size!r}")
    opts = lib().pheno_crop_default_options()
    opts.box_size = int(box_size)
    opts.normalization = NORMALIZATIONS[normalize]
    return opts


def crop_cells(image: Any, centers: Any, box_size: int = 128, normalize: str = "deepprofiler_legacy") -> np.ndarray:
    """Crops a `box_size` square around each centre.

    image: (C, H, W) or (H, W) uint8 / uint16 / float32 array (other numeric types are converted to float32).
    centers: (N, 2) pixel coordinates (x = column, y = row), 0-based; rounded with floor(v + 0.5); the box
    spans c - box_size // 2 ... ; pixels outside the image are 0.
    normalize: per crop and channel, "deepprofiler_legacy" (x - min) / max, "minmax"
    (x - min) / (max - min + 1e-6), or "none".
    Returns (N, C, box_size, box_size) float32.
    """
    opts = crop_options(box_size, normalize)
    img, _pixels = image_struct(image)  # _pixels owns the buffer img points into
    ctr = centers_array(centers)
    n = ctr.shape[0]
    out = np.empty((n, img.channels, opts.box_size, opts.box_size), dtype=np.float32)
    check(lib().pheno_crop_cells(ctypes.byref(img), f32_ptr(ctr), n, ctypes.byref(opts), f32_ptr(out), out.size))
    return out
