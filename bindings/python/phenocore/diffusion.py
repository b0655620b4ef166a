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
from .scheduler import KINDS, PREDICTIONS, SCHEDULES, _choice

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
        dim = self._config["cross_attention_dim"]
        if context is not None and dim is not None and np.ndim(context) == 3 and np.shape(context)[2] != dim:
            raise PhenoError(
                Status.SHAPE, f"context has {np.shape(context)[2]} features per token; the config's cross_attention_dim is {dim}"
            )
        cond, _keep = self._conditions(n, context, class_labels, confounders, context_null)
        out = np.empty((n, self._config["out_channels"], h, w), dtype=np.float32)
        check(
            lib().pheno_unet_forward(
                self._ptr, f32_ptr(x), n, c, h, w, t.ctypes.data_as(POINTER(c_double)), *cond,
                f32_ptr(out), out.size,
            )
        )
        return out

    __call__ = forward

    def _conditions(self, n, context, class_labels, confounders, context_null):
        """ctypes arguments (context, context_len, context_null, class_labels, confounders) and the
        arrays that must stay alive during the call."""
        keep = []
        ctx_ptr, ctx_len = None, 0
        if context is not None:
            ctx = as_f32(context)
            if ctx.ndim != 3 or ctx.shape[0] != n:
                raise PhenoError(
                    Status.SHAPE, f"context must be a 3-D (N={n}, L, cross_attention_dim) array, got shape {ctx.shape}"
                )
            keep.append(ctx)
            ctx_ptr, ctx_len = f32_ptr(ctx), ctx.shape[1]
        null_ptr = None
        if context_null is not None:
            flags = np.asarray(context_null)
            if flags.ndim == 0:
                flags = np.full(n, bool(flags))
            if flags.shape != (n,):
                raise PhenoError(Status.SHAPE, f"context_null must hold {n} flags, got shape {flags.shape}")
            flags = np.ascontiguousarray(flags.astype(bool).astype(np.uint8))
            keep.append(flags)
            null_ptr = flags.ctypes.data_as(POINTER(c_uint8))
        labels_ptr = None
        if class_labels is not None:
            labels = _index_array("class_labels", class_labels, n, False)
            keep.append(labels)
            labels_ptr = labels.ctypes.data_as(_i64_p)
        conf = self._confounders(confounders, n)
        conf_ptr = None
        if conf is not None:
            keep.append(conf)
            conf_ptr = conf.ctypes.data_as(_i64_p)
        return (ctx_ptr, ctx_len, null_ptr, labels_ptr, conf_ptr), keep

    def sample(
        self,
        n: int,
        height: int,
        width: int,
        context: Any = None,
        class_labels: Any = None,
        confounders: Any = None,
        context_null: Any = None,
        steps: int = 50,
        guidance_scale: float = 1.0,
        kind: str = "ddim",
        eta: float = 0.0,
        seed: int = 0,
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0205,
        prediction_type: str = "v_prediction",
    ) -> np.ndarray:
        """`n` latents (n, out_channels, height, width): x_T ~ N(0, 1) from `seed`, then `steps` DDPM /
        DDIM steps of the schedule the model was trained with; `guidance_scale` != 1 mixes in the
        null-conditioned prediction (classifier-free guidance; needs null_embeddings). Conditions as
        `forward`."""
        opts = PhenoDiffusionSampleOptions()
        opts.struct_size = ctypes.sizeof(PhenoDiffusionSampleOptions)
        opts.kind = _choice("kind", kind, KINDS)
        opts.eta = float(eta)
        opts.num_train_timesteps = int(num_train_timesteps)
        opts.schedule = _choice("schedule", schedule, SCHEDULES)
        opts.beta_start, opts.beta_end = float(beta_start), float(beta_end)
        opts.prediction_type = _choice("prediction_type", prediction_type, PREDICTIONS)
        opts.steps = int(steps)
        opts.guidance_scale = float(guidance_scale)
        opts.seed = _seed(seed)
        cond, _keep = self._conditions(n, context, class_labels, confounders, context_null)
        out = np.empty((n, self._config["out_channels"], height, width), dtype=np.float32)
        check(lib().pheno_diffusion_sample(self._ptr, ctypes.byref(opts), n, height, width, *cond, f32_ptr(out), out.size))
        return out


class PhenoDiffusionTrainOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("lr", c_double),
        ("beta1", c_double),
        ("beta2", c_double),
        ("eps", c_double),
        ("weight_decay", c_double),
        ("clip_grad_norm", c_double),
        ("ema_decay", c_double),
        ("cond_dropout", c_double),
        ("num_train_timesteps", c_size_t),
        ("schedule", c_int32),
        ("beta_start", c_double),
        ("beta_end", c_double),
        ("prediction_type", c_int32),
        ("seed", c_uint64),
    ]


class PhenoDiffusionSampleOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("kind", c_int32),
        ("eta", c_double),
        ("num_train_timesteps", c_size_t),
        ("schedule", c_int32),
        ("beta_start", c_double),
        ("beta_end", c_double),
        ("prediction_type", c_int32),
        ("steps", c_size_t),
        ("guidance_scale", c_double),
        ("seed", c_uint64),
    ]


PhenoDiffusionTrainer_p = c_void_p

register(
    {
        "pheno_diffusion_trainer_default_options": (PhenoDiffusionTrainOptions, []),
        "pheno_diffusion_sample_default_options": (PhenoDiffusionSampleOptions, []),
        "pheno_diffusion_trainer_new": (
            c_int32, [PhenoUNet_p, POINTER(PhenoDiffusionTrainOptions), POINTER(PhenoDiffusionTrainer_p)]
        ),
        "pheno_diffusion_trainer_free": (None, [PhenoDiffusionTrainer_p]),
        "pheno_diffusion_trainer_step": (
            c_int32,
            [
                PhenoDiffusionTrainer_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, c_float_p, c_size_t,
                POINTER(c_uint8), _i64_p, _i64_p, c_float_p,
            ],
        ),
        "pheno_diffusion_trainer_steps": (c_int32, [PhenoDiffusionTrainer_p, POINTER(c_uint64)]),
        "pheno_diffusion_trainer_save_checkpoint": (c_int32, [PhenoDiffusionTrainer_p, c_char_p]),
        "pheno_diffusion_trainer_load_checkpoint": (c_int32, [PhenoDiffusionTrainer_p, c_char_p]),
        "pheno_diffusion_trainer_unet": (c_int32, [PhenoDiffusionTrainer_p, c_int32, POINTER(PhenoUNet_p)]),
        "pheno_diffusion_sample": (
            c_int32,
            [
                PhenoUNet_p, POINTER(PhenoDiffusionSampleOptions), c_size_t, c_size_t, c_size_t, c_float_p, c_size_t,
                POINTER(c_uint8), _i64_p, _i64_p, c_float_p, c_size_t,
            ],
        ),
    }
)


class DiffusionTrainer:
    """Trains a copy of a `DiffusionUNet` on latent batches pushed from Python: MSE on the prediction
    target (v by default) at seeded random timesteps, AdamW, gradient clipping, EMA weights, condition
    dropout to the null embeddings for classifier-free guidance. Checkpoints are atomic and resume
    bit for bit. Not thread-safe.

        trainer = phenocore.DiffusionTrainer(unet, lr=1e-4, cond_dropout=0.1, seed=0)
        loss = trainer.step(latents, context=emb, confounders={"source": s, "batch": b, "well": w})
        trainer.save_checkpoint("ckpt.safetensors")
        ema = trainer.unet(ema=True)               # a DiffusionUNet for forward / sample / save
    """

    def __init__(
        self,
        unet: DiffusionUNet,
        lr: float = 1e-4,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        clip_grad_norm: Optional[float] = 1.0,
        ema_decay: Optional[float] = 0.9999,
        cond_dropout: float = 0.1,
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0205,
        prediction_type: str = "v_prediction",
        seed: int = 0,
    ):
        if not isinstance(unet, DiffusionUNet):
            raise PhenoError(Status.INVALID_ARGUMENT, f"unet must be a phenocore.DiffusionUNet, got {type(unet)}")
        o = lib().pheno_diffusion_trainer_default_options()
        o.lr = float(lr)
        o.beta1, o.beta2 = (float(b) for b in betas)
        o.eps, o.weight_decay = float(eps), float(weight_decay)
        o.clip_grad_norm = 0.0 if clip_grad_norm is None else float(clip_grad_norm)
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise PhenoError(Status.INVALID_ARGUMENT, f"clip_grad_norm must be positive or None, got {clip_grad_norm}")
        o.ema_decay = -1.0 if ema_decay is None else float(ema_decay)
        if ema_decay is not None and not 0 <= ema_decay <= 1:
            raise PhenoError(Status.INVALID_ARGUMENT, f"ema_decay must be in [0, 1] or None, got {ema_decay}")
        o.cond_dropout = float(cond_dropout)
        o.num_train_timesteps = int(num_train_timesteps)
        o.schedule = _choice("schedule", schedule, SCHEDULES)
        o.beta_start, o.beta_end = float(beta_start), float(beta_end)
        o.prediction_type = _choice("prediction_type", prediction_type, PREDICTIONS)
        o.seed = _seed(seed)
        self._unet = unet  # for the config and the conditions' conversion
        self._has_ema = ema_decay is not None
        handle = PhenoDiffusionTrainer_p()
        check(lib().pheno_diffusion_trainer_new(unet._ptr, ctypes.byref(o), ctypes.byref(handle)))
        self._handle: Optional[int] = handle.value
        self._finalizer = weakref.finalize(self, lib().pheno_diffusion_trainer_free, PhenoDiffusionTrainer_p(handle.value))

    @property
    def _ptr(self) -> PhenoDiffusionTrainer_p:
        if self._handle is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "the DiffusionTrainer was closed")
        return PhenoDiffusionTrainer_p(self._handle)

    def close(self) -> None:
        self._finalizer()
        self._handle = None

    def step(self, latents: Any, context: Any = None, class_labels: Any = None, confounders: Any = None,
             context_null: Any = None) -> float:
        """One training step on latents (N, in_channels, H, W) and their conditions (as
        `DiffusionUNet.forward`); returns the loss before the update. A failed step changes nothing."""
        x = as_f32(latents)
        if x.ndim != 4:
            raise PhenoError(Status.SHAPE, f"latents must be a 4-D (N, C, H, W) array, got shape {x.shape}")
        n = x.shape[0]
        cond, _keep = self._unet._conditions(n, context, class_labels, confounders, context_null)
        loss = ctypes.c_float()
        check(lib().pheno_diffusion_trainer_step(self._ptr, f32_ptr(x), *x.shape, *cond, ctypes.byref(loss)))
        return float(loss.value)

    @property
    def steps(self) -> int:
        v = c_uint64()
        check(lib().pheno_diffusion_trainer_steps(self._ptr, ctypes.byref(v)))
        return int(v.value)

    def save_checkpoint(self, path: PathLike) -> None:
        check(lib().pheno_diffusion_trainer_save_checkpoint(self._ptr, os.fsencode(os.fspath(path))))

    def load_checkpoint(self, path: PathLike) -> None:
        check(lib().pheno_diffusion_trainer_load_checkpoint(self._ptr, os.fsencode(os.fspath(path))))

    def unet(self, ema: bool = False) -> DiffusionUNet:
        """A new DiffusionUNet with the current (or EMA) weights."""
        handle = PhenoUNet_p()
        check(lib().pheno_diffusion_trainer_unet(self._ptr, 1 if ema else 0, ctypes.byref(handle)))
        return DiffusionUNet(handle.value)
