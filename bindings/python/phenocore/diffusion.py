"""The latent-diffusion U-Net: MONAI `DiffusionModelUNet` with confounder tables and null embeddings
(REFERENCE §10) over the C ABI (`pheno_unet_*`).

    cfg = {"in_channels": 8, "out_channels": 8, "channels": [256, 512, 768],
           "attention_levels": [False, True, True], "num_head_channels": [0, 512, 768],
           "with_conditioning": True, "cross_attention_dim": 512,
           "confounders": {"source": 3, "batch": 10, "well": 384}, "null_embeddings": True}
    unet = phenocore.DiffusionUNet.new(cfg, seed=0)            # or .load("unet.safetensors", config=cfg)
    v = unet.forward(latents, timesteps, context=emb,          # (N, 8, H, W), (N,), (N, L, 512)
                     confounders={"source": src, "batch": batch, "well": well})
    v_null = unet.forward(latents, timesteps, context_null=True,
                          confounders={"source": None, "batch": None, "well": None})
"""

from __future__ import annotations

import ctypes
import json
import os
import weakref
from ctypes import POINTER, c_char, c_char_p, c_double, c_int32, c_int64, c_size_t, c_uint8, c_uint64, c_void_p
from typing import Any, Dict, Mapping, Optional, Union

import numpy as np

from ._arrays import as_f32, f32_ptr
from ._errors import PhenoError, Status, check
from ._lib import c_float_p, lib, register

PathLike = Union[str, "os.PathLike[str]"]
PhenoUNet_p = c_void_p
_i64_p = POINTER(c_int64)

register(
    {
        "pheno_unet_new": (c_int32, [c_char_p, c_uint64, POINTER(PhenoUNet_p)]),
        "pheno_unet_load": (c_int32, [c_char_p, c_char_p, POINTER(PhenoUNet_p)]),
        "pheno_unet_save": (c_int32, [PhenoUNet_p, c_char_p]),
        "pheno_unet_free": (None, [PhenoUNet_p]),
        "pheno_unet_num_parameters": (c_int32, [PhenoUNet_p, POINTER(c_size_t)]),
        "pheno_unet_config_json": (c_int32, [PhenoUNet_p, POINTER(c_char), c_size_t, POINTER(c_size_t)]),
        "pheno_unet_forward": (
            c_int32,
            [
                PhenoUNet_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, POINTER(c_double),
                c_float_p, c_size_t, POINTER(c_uint8), _i64_p, _i64_p, c_float_p, c_size_t,
            ],
        ),
    }
)


def _config_json(config: Any) -> bytes:
    if isinstance(config, (str, bytes)):
        return config.encode() if isinstance(config, str) else config
    if not isinstance(config, Mapping):
        raise PhenoError(
            Status.INVALID_ARGUMENT,
            f"config must be a dict of MONAI DiffusionModelUNet arguments (or its JSON text), got {type(config)}",
        )

    def default(v):
        if isinstance(v, np.integer):
            return int(v)
        if isinstance(v, np.floating):
            return float(v)
        if isinstance(v, np.bool_):
            return bool(v)
        return list(v)

    return json.dumps(dict(config), default=default).encode()


def _seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**64:
        raise PhenoError(Status.INVALID_ARGUMENT, f"seed must be an integer in [0, 2^64), got {seed!r}")
    return int(seed)


def _index_array(what: str, values: Any, n: int, allow_null: bool) -> np.ndarray:
    """`n` int64 indices from an array-like; None entries (and None for all) -> -1 where allowed."""
    if values is None:
        if not allow_null:
            raise PhenoError(Status.INVALID_ARGUMENT, f"{what} is None")
        return np.full(n, -1, dtype=np.int64)
    if np.isscalar(values):
        values = [values] * n
    raw = np.asarray(values, dtype=object if allow_null else None)
    if raw.ndim != 1 or raw.shape[0] != n:
        raise PhenoError(Status.SHAPE, f"{what} must hold one index per sample ({n}), got shape {raw.shape}")
    out = np.empty(n, dtype=np.int64)
    for i, v in enumerate(raw.tolist()):
        if v is None and allow_null:
            out[i] = -1
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) and not (
            isinstance(v, float) and float(v).is_integer()
        ):
            raise PhenoError(Status.INVALID_ARGUMENT, f"{what}[{i}] = {v!r} is not an integer index")
        out[i] = int(v)
    return out


class DiffusionUNet:
    """MONAI `DiffusionModelUNet` (2-D) in float32 on the CPU, plus one embedding table per confounder
    (summed into the time embedding) and, with `null_embeddings`, null rows and a learned null context
    for classifier-free guidance.

    `config` is a dict of MONAI's argument names (`in_channels`, `out_channels`, `channels`,
    `attention_levels`, `num_res_blocks`, `num_head_channels`, `norm_num_groups`, `norm_eps`,
    `resblock_updown`, `with_conditioning`, `cross_attention_dim`, `transformer_num_layers`,
    `num_class_embeds`; absent ones take MONAI's defaults) plus `confounders` ({name: number of values},
    in order, or [[name, n], ...]) and `null_embeddings`. Weights are safetensors under MONAI's key
    names (older MONAI GenerativeModels names are mapped on load). Immutable: several threads may run
    `forward` on one U-Net at once.
    """

    def __init__(self, handle: int):
        self._handle: Optional[int] = handle
        self._finalizer = weakref.finalize(self, lib().pheno_unet_free, PhenoUNet_p(handle))
        need = c_size_t()
        check(lib().pheno_unet_config_json(self._ptr, None, 0, ctypes.byref(need)))
        buf = ctypes.create_string_buffer(need.value)
        check(lib().pheno_unet_config_json(self._ptr, buf, need.value, None))
        config = json.loads(buf.value.decode())
        config["confounders"] = {name: n for name, n in config["confounders"]}
        self._config: Dict[str, Any] = config
        count = c_size_t()
        check(lib().pheno_unet_num_parameters(self._ptr, ctypes.byref(count)))
        self._num_parameters = count.value

    @classmethod
    def load(cls, path: PathLike, config: Any) -> "DiffusionUNet":
        """Loads MONAI-named safetensors weights for `config`. A key missing, unexpected or of another
        shape than `config` needs raises PhenoError naming the first such key."""
        handle = PhenoUNet_p()
        check(lib().pheno_unet_load(os.fsencode(os.fspath(path)), _config_json(config), ctypes.byref(handle)))
        return cls(handle.value)

    @classmethod
    def new(cls, config: Any, seed: int = 0) -> "DiffusionUNet":
        """torch's default initialisation as MONAI builds the model (its zero-initialised layers zero),
        deterministic in `seed`."""
        handle = PhenoUNet_p()
        check(lib().pheno_unet_new(_config_json(config), _seed(seed), ctypes.byref(handle)))
        return cls(handle.value)

    def save(self, path: PathLike) -> None:
        """Writes MONAI-named float32 safetensors (atomically)."""
        check(lib().pheno_unet_save(self._ptr, os.fsencode(os.fspath(path))))

    @property
    def config(self) -> Dict[str, Any]:
        """The full configuration (every key; MONAI's defaults filled in; per-level values as lists)."""
        return json.loads(json.dumps(self._config))

    @property
    def num_parameters(self) -> int:
        return self._num_parameters

    @property
    def confounder_names(self) -> list:
        return list(self._config["confounders"])

    def close(self) -> None:
        self._finalizer()
        self._handle = None

    def __enter__(self) -> "DiffusionUNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        c = self._config
        return (
            f"DiffusionUNet(channels={c['channels']}, in_channels={c['in_channels']}, "
            f"cross_attention_dim={c['cross_attention_dim']}, confounders={c['confounders']}, "
            f"parameters={self._num_parameters})"
        )

    @property
    def _ptr(self) -> PhenoUNet_p:
        if self._handle is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "the DiffusionUNet was closed")
        return PhenoUNet_p(self._handle)

    def _confounders(self, confounders: Any, n: int) -> Optional[np.ndarray]:
        if confounders is None:
            return None
        names = self.confounder_names
        if isinstance(confounders, Mapping):
            unknown = [k for k in confounders if k not in names]
            if unknown:
                raise PhenoError(
                    Status.INVALID_ARGUMENT, f"unknown confounder(s) {unknown}; the model has {names}"
                )
            missing = [k for k in names if k not in confounders]
            if missing:
                raise PhenoError(
                    Status.INVALID_ARGUMENT,
                    f"confounder(s) {missing} not given (pass None for the null value); the model has {names}",
                )
            cols = [_index_array(f"confounders[{k!r}]", confounders[k], n, True) for k in names]
            return np.ascontiguousarray(np.stack(cols, axis=1)) if cols else np.empty((n, 0), np.int64)
        a = np.asarray(confounders)
        if a.dtype == object:
            a = np.where(a == None, -1, a)  # noqa: E711 (elementwise)
        if a.ndim != 2 or a.shape != (n, len(names)):
            raise PhenoError(
                Status.SHAPE,
                f"confounders must be an (N, K) = ({n}, {len(names)}) index array ({names}) or a dict, got shape {a.shape}",
            )
        if not (np.issubdtype(a.dtype, np.integer) or (a.dtype == object)):
            if not np.all(np.isfinite(a)) or not np.all(a == np.round(a)):
                raise PhenoError(Status.INVALID_ARGUMENT, "confounders must be integer indices (-1 = null)")
        return np.ascontiguousarray(a.astype(np.int64))

    def forward(
        self,
        x: Any,
        timesteps: Any,
        context: Any = None,
        class_labels: Any = None,
        confounders: Any = None,
        context_null: Any = None,
    ) -> np.ndarray:
        """The model's output (N, out_channels, H, W) for latents `x` (N, in_channels, H, W) at
        `timesteps` (N values or one for all; integer or fractional).

        context: (N, L, cross_attention_dim) compound embeddings (models with conditioning).
        class_labels: (N,) indices into MONAI's single class table (models with num_class_embeds).
        confounders: {name: N indices} (None / -1 entries, or None for the whole column, = the null
            value) or an (N, K) index array in the config's order (-1 = null).
        context_null: (N,) booleans or one for all: use the learned null context for those samples
            (classifier-free guidance; needs null_embeddings). With every sample null, context may be
            None.
        """
        x = as_f32(x)
        if x.ndim != 4:
            raise PhenoError(Status.SHAPE, f"x must be a 4-D (N, C, H, W) array, got shape {x.shape}")
        n, c, h, w = x.shape
        t = np.asarray(timesteps, dtype=np.float64)
        if t.ndim == 0:
            t = np.full(n, float(t))
        t = np.ascontiguousarray(t)
        if t.shape != (n,):
            raise PhenoError(Status.SHAPE, f"timesteps must hold {n} values (one per sample), got shape {t.shape}")
        ctx_ptr, ctx_len = None, 0
        if context is not None:
            ctx = as_f32(context)
            if ctx.ndim != 3 or ctx.shape[0] != n:
                raise PhenoError(
                    Status.SHAPE, f"context must be a 3-D (N={n}, L, cross_attention_dim) array, got shape {ctx.shape}"
                )
            dim = self._config["cross_attention_dim"]
            if dim is not None and ctx.shape[2] != dim:
                raise PhenoError(
                    Status.SHAPE, f"context has {ctx.shape[2]} features per token; the config's cross_attention_dim is {dim}"
                )
            ctx_ptr, ctx_len = f32_ptr(ctx), ctx.shape[1]
        null_ptr = None
        if context_null is not None:
            flags = np.asarray(context_null)
            if flags.ndim == 0:
                flags = np.full(n, bool(flags))
            if flags.shape != (n,):
                raise PhenoError(Status.SHAPE, f"context_null must hold {n} flags, got shape {flags.shape}")
            flags = np.ascontiguousarray(flags.astype(bool).astype(np.uint8))
            null_ptr = flags.ctypes.data_as(POINTER(c_uint8))
        labels_ptr = None
        if class_labels is not None:
            labels = _index_array("class_labels", class_labels, n, False)
            labels_ptr = labels.ctypes.data_as(_i64_p)
        conf = self._confounders(confounders, n)
        conf_ptr = conf.ctypes.data_as(_i64_p) if conf is not None else None
        out = np.empty((n, self._config["out_channels"], h, w), dtype=np.float32)
        check(
            lib().pheno_unet_forward(
                self._ptr, f32_ptr(x), n, c, h, w, t.ctypes.data_as(POINTER(c_double)), ctx_ptr, ctx_len,
                null_ptr, labels_ptr, conf_ptr, f32_ptr(out), out.size,
            )
        )
        return out

    __call__ = forward
