"""The latent-diffusion VAE: diffusers `AutoencoderKL` (REFERENCE §10) over the C ABI (`pheno_vae_*`).

    vae = phenocore.AutoencoderKL.load("diffusion_pytorch_model.safetensors")   # SDXL config
    mean = vae.encode(images)                 # (N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8)
    images = vae.decode(mean)                 # the VAE's own latent scale
    lat = vae.encode5(cell_painting)          # (N, 5, H, W) -> (N, 8, H/8, W/8) * scaling_factor
    recon = vae.decode5(lat)                  # -> (N, 5, H, W), channel 2 the mean of its 2 decodings
"""

from __future__ import annotations

import ctypes
import json
import os
import weakref
from ctypes import POINTER, c_char_p, c_double, c_int32, c_size_t, c_uint64, c_void_p
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from ._arrays import as_f32, f32_ptr
from ._errors import PhenoError, Status, check
from ._lib import c_float_p, lib, register

PathLike = Union[str, "os.PathLike[str]"]
LDM_GROUPS: Tuple[Tuple[int, ...], ...] = ((0, 1, 2), (2, 3, 4))

PhenoVae_p = c_void_p
_size_p = POINTER(c_size_t)
_usize_p = POINTER(c_size_t)

register(
    {
        "pheno_vae_load": (c_int32, [c_char_p, c_char_p, POINTER(PhenoVae_p)]),
        "pheno_vae_new": (c_int32, [c_char_p, c_uint64, POINTER(PhenoVae_p)]),
        "pheno_vae_save": (c_int32, [PhenoVae_p, c_char_p]),
        "pheno_vae_free": (None, [PhenoVae_p]),
        "pheno_vae_info": (c_int32, [PhenoVae_p, _size_p, _size_p, _size_p, _size_p, POINTER(c_double)]),
        "pheno_vae_encode": (
            c_int32,
            [PhenoVae_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, c_float_p, c_float_p, c_size_t],
        ),
        "pheno_vae_sample": (c_int32, [c_float_p, c_float_p, c_size_t, c_uint64, c_float_p]),
        "pheno_vae_decode": (
            c_int32,
            [PhenoVae_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, c_float_p, c_size_t],
        ),
        "pheno_vae_encode_groups": (
            c_int32,
            [
                PhenoVae_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t,
                _usize_p, c_size_t, c_int32, c_uint64, c_float_p, c_size_t,
            ],
        ),
        "pheno_vae_decode_groups": (
            c_int32,
            [
                PhenoVae_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t,
                _usize_p, c_size_t, c_float_p, c_size_t,
            ],
        ),
    }
)


def _config_json(config: Optional[Dict[str, Any]]) -> Optional[bytes]:
    if config is None:
        return None
    if not isinstance(config, dict):
        raise PhenoError(Status.INVALID_ARGUMENT, f"config must be a dict of diffusers config keys, got {type(config)}")
    return json.dumps(config, default=list).encode()


def _nchw(what: str, a: Any) -> np.ndarray:
    a = as_f32(a)
    if a.ndim != 4:
        raise PhenoError(Status.SHAPE, f"{what} must be a 4-D (N, C, H, W) array, got shape {a.shape}")
    return a


def _groups(groups: Sequence[Sequence[int]]) -> Tuple[np.ndarray, int]:
    try:
        rows = [[int(c) for c in g] for g in groups]
    except TypeError as e:
        raise PhenoError(Status.INVALID_ARGUMENT, f"groups must be a sequence of channel index sequences: {e}")
    if not rows or len({len(r) for r in rows}) != 1 or any(c < 0 for r in rows for c in r):
        raise PhenoError(Status.INVALID_ARGUMENT, f"groups must be equal-length lists of channel indices >= 0, got {groups!r}")
    flat = np.ascontiguousarray(np.array(rows, dtype=np.uintp).ravel())
    return flat, len(rows)


def _seed(seed: Optional[int]) -> int:
    if seed is None:
        return int.from_bytes(os.urandom(8), "little")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise PhenoError(Status.INVALID_ARGUMENT, f"seed must be an integer in [0, 2^64), got {seed!r}")
    return int(seed)


class AutoencoderKL:
    """diffusers `AutoencoderKL` in float32 on the CPU (the SDXL VAE by default).

    `config` is a dict of diffusers config keys (`block_out_channels`, `layers_per_block`,
    `latent_channels`, `norm_num_groups`, `scaling_factor`, ...; a diffusers `config.json` loaded with
    `json.load` works); keys not given take their SDXL values. Arrays are NCHW float32. Immutable:
    several threads may use one VAE at once.
    """

    def __init__(self, handle: int):
        self._handle: Optional[int] = handle
        self._finalizer = weakref.finalize(self, lib().pheno_vae_free, PhenoVae_p(handle))
        ins, outs, lat, down, sf = c_size_t(), c_size_t(), c_size_t(), c_size_t(), c_double()
        check(
            lib().pheno_vae_info(
                self._ptr, ctypes.byref(ins), ctypes.byref(outs), ctypes.byref(lat), ctypes.byref(down), ctypes.byref(sf)
            )
        )
        self.in_channels, self.out_channels = ins.value, outs.value
        self.latent_channels, self.downscale, self.scaling_factor = lat.value, down.value, sf.value

    @classmethod
    def load(cls, path: PathLike, config: Optional[Dict[str, Any]] = None) -> "AutoencoderKL":
        """Loads diffusers-named safetensors weights (f32/f16/bf16). A weight missing, unexpected or of
        another shape than `config` needs raises PhenoError naming it."""
        handle = PhenoVae_p()
        check(lib().pheno_vae_load(os.fsencode(os.fspath(path)), _config_json(config), ctypes.byref(handle)))
        return cls(handle.value)

    @classmethod
    def new(cls, config: Optional[Dict[str, Any]] = None, seed: int = 0) -> "AutoencoderKL":
        """torch's default initialisation, deterministic in `seed`."""
        handle = PhenoVae_p()
        check(lib().pheno_vae_new(_config_json(config), _seed(seed), ctypes.byref(handle)))
        return cls(handle.value)

    def save(self, path: PathLike) -> None:
        """Writes diffusers-named float32 safetensors (atomically)."""
        check(lib().pheno_vae_save(self._ptr, os.fsencode(os.fspath(path))))

    def close(self) -> None:
        self._finalizer()
        self._handle = None

    def __enter__(self) -> "AutoencoderKL":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def _ptr(self) -> PhenoVae_p:
        if self._handle is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "the AutoencoderKL was closed")
        return PhenoVae_p(self._handle)

    def _latent_shape(self, x: np.ndarray, channels: int) -> Tuple[int, int, int, int]:
        n, _, h, w = x.shape
        f = self.downscale
        return (n, channels, h // f, w // f)

    def encode_moments(self, x: Any) -> Tuple[np.ndarray, np.ndarray]:
        """(mean, logvar) of the latent Gaussian for images `x` (N, in_channels, H, W) in [-1, 1];
        logvar clamped to [-30, 20] as diffusers."""
        x = _nchw("x", x)
        mean = np.empty(self._latent_shape(x, self.latent_channels), dtype=np.float32)
        logvar = np.empty_like(mean)
        check(lib().pheno_vae_encode(self._ptr, f32_ptr(x), *x.shape, f32_ptr(mean), f32_ptr(logvar), mean.size))
        return mean, logvar

    def encode(self, x: Any, sample: bool = False, seed: Optional[int] = None) -> np.ndarray:
        """Latents (N, latent_channels, H/f, W/f) in the VAE's own scale: the posterior mean, or with
        `sample=True` a draw mean + exp(logvar/2)·ε (seeded with `seed`, random when None)."""
        mean, logvar = self.encode_moments(x)
        if not sample:
            return mean
        out = np.empty_like(mean)
        check(lib().pheno_vae_sample(f32_ptr(mean), f32_ptr(logvar), mean.size, _seed(seed), f32_ptr(out)))
        return out

    def decode(self, z: Any) -> np.ndarray:
        """Images (N, out_channels, h·f, w·f) from latents (N, latent_channels, h, w) in the VAE's own
        scale (divide diffusion latents by `scaling_factor` first)."""
        z = _nchw("z", z)
        n, _, h, w = z.shape
        f = self.downscale
        out = np.empty((n, self.out_channels, h * f, w * f), dtype=np.float32)
        check(lib().pheno_vae_decode(self._ptr, f32_ptr(z), *z.shape, f32_ptr(out), out.size))
        return out

    def encode5(
        self,
        x: Any,
        groups: Sequence[Sequence[int]] = LDM_GROUPS,
        sample: bool = False,
        seed: Optional[int] = None,
    ) -> np.ndarray:
        """The LDM paper's multi-channel scheme: each channel group of `x` (N, C, H, W) is encoded and
        the latents concatenated and multiplied by `scaling_factor` -> (N, len(groups)·latent_channels,
        H/f, W/f), ready for the diffusion model."""
        x = _nchw("x", x)
        flat, k = _groups(groups)
        out = np.empty(self._latent_shape(x, k * self.latent_channels), dtype=np.float32)
        check(
            lib().pheno_vae_encode_groups(
                self._ptr, f32_ptr(x), *x.shape, flat.ctypes.data_as(_usize_p), k,
                1 if sample else 0, _seed(seed) if sample else 0, f32_ptr(out), out.size,
            )
        )
        return out

    def decode5(self, latents: Any, groups: Sequence[Sequence[int]] = LDM_GROUPS) -> np.ndarray:
        """Inverse of `encode5`: (N, len(groups)·latent_channels, h, w) -> (N, C, h·f, w·f), C = the
        largest channel index + 1; a channel in several groups is the mean of its reconstructions."""
        z = _nchw("latents", latents)
        flat, k = _groups(groups)
        n, _, h, w = z.shape
        f = self.downscale
        c = int(flat.max()) + 1
        out = np.empty((n, c, h * f, w * f), dtype=np.float32)
        check(
            lib().pheno_vae_decode_groups(
                self._ptr, f32_ptr(z), *z.shape, flat.ctypes.data_as(_usize_p), k, f32_ptr(out), out.size
            )
        )
        return out
