"""Diffusion noise schedules and the DDPM / DDIM samplers (REFERENCE §10) over the C ABI
(`pheno_scheduler_*`), computing what diffusers' and MONAI's schedulers compute.

    sched = phenocore.Scheduler(kind="ddim")            # LDM paper defaults, v-prediction
    x_t = sched.add_noise(x0, noise, t)                   # training input
    target = sched.get_velocity(x0, noise, t)             # v target
    sched.set_timesteps(50)
    x = sched.noise(shape)
    for t in sched.timesteps:
        x, x0_hat = sched.step(model(x, t), t, x)
"""

from __future__ import annotations

import ctypes
import weakref
from ctypes import POINTER, c_double, c_int, c_int32, c_int64, c_size_t, c_uint64, c_void_p
from typing import Any, Optional, Tuple

import numpy as np

from ._arrays import as_f32, f32_ptr
from ._errors import PhenoError, Status, check
from ._lib import c_float_p, lib, register

KINDS = {"ddpm": 0, "ddim": 1}
SCHEDULES = {
    "linear_beta": 0, "linear": 0,
    "scaled_linear_beta": 1, "scaled_linear": 1,
    "cosine": 2, "squaredcos_cap_v2": 2,
}
PREDICTIONS = {"epsilon": 0, "v_prediction": 1, "sample": 2}


class PhenoSchedulerOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("kind", c_int),
        ("num_train_timesteps", c_size_t),
        ("schedule", c_int),
        ("beta_start", c_double),
        ("beta_end", c_double),
        ("prediction_type", c_int),
        ("clip_sample", c_int32),
        ("clip_sample_range", c_double),
        ("set_alpha_to_one", c_int32),
        ("eta", c_double),
        ("seed", c_uint64),
    ]


PhenoScheduler_p = c_void_p
_i64_p = POINTER(c_int64)
_f64_p = POINTER(c_double)

register(
    {
        "pheno_scheduler_default_options": (PhenoSchedulerOptions, []),
        "pheno_scheduler_new": (c_int, [POINTER(PhenoSchedulerOptions), POINTER(PhenoScheduler_p)]),
        "pheno_scheduler_set_timesteps": (c_int, [PhenoScheduler_p, c_size_t]),
        "pheno_scheduler_timesteps": (c_int, [PhenoScheduler_p, _i64_p, c_size_t, POINTER(c_size_t)]),
        "pheno_scheduler_schedule": (c_int, [PhenoScheduler_p, _f64_p, _f64_p, c_size_t]),
        "pheno_scheduler_add_noise": (
            c_int, [PhenoScheduler_p, c_float_p, c_float_p, _i64_p, c_size_t, c_size_t, c_float_p, c_size_t],
        ),
        "pheno_scheduler_get_velocity": (
            c_int, [PhenoScheduler_p, c_float_p, c_float_p, _i64_p, c_size_t, c_size_t, c_float_p, c_size_t],
        ),
        "pheno_scheduler_step": (
            c_int, [PhenoScheduler_p, c_float_p, c_int64, c_float_p, c_float_p, c_size_t, c_float_p, c_float_p],
        ),
        "pheno_scheduler_noise": (c_int, [PhenoScheduler_p, c_float_p, c_size_t]),
        "pheno_scheduler_reseed": (c_int, [PhenoScheduler_p, c_uint64]),
        "pheno_guidance": (c_int, [c_float_p, c_float_p, c_size_t, c_double, c_float_p]),
        "pheno_scheduler_free": (None, [PhenoScheduler_p]),
    }
)


def _choice(name: str, value: Any, table: dict) -> int:
    if not isinstance(value, str) or value not in table:
        raise PhenoError(
            Status.INVALID_ARGUMENT, f"{name} must be one of {', '.join(map(repr, table))}, got {value!r}"
        )
    return table[value]


def _int(name: str, value: Any) -> int:
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise PhenoError(Status.INVALID_ARGUMENT, f"{name} must be an integer, got {value!r}")
    return int(value)


def _f32(what: str, a: Any) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what} must be a numeric array, got dtype {a.dtype}")
    return as_f32(a)


def _same_shape(what: str, a: np.ndarray, ref_name: str, ref: np.ndarray) -> None:
    if a.shape != ref.shape:
        raise PhenoError(Status.SHAPE, f"{what} has shape {a.shape} but {ref_name} has shape {ref.shape}")


class Scheduler:
    """A noise schedule with DDPM or DDIM sampling, in MONAI's argument names (REFERENCE §10 defaults:
    scaled linear β 0.0015 → 0.0205 over 1000 steps, v-prediction, no x0 clipping, DDIM with
    set_alpha_to_one). `schedule` is "linear_beta", "scaled_linear_beta" or "cosine" (the diffusers
    names "linear", "scaled_linear", "squaredcos_cap_v2" work too). `eta` weights DDIM's noise (0 =
    deterministic). `seed` seeds the noise `step` draws when given none (None = a fresh random seed).

    Where MONAI and diffusers differ this follows diffusers: timesteps are `arange(n) · (T // n)`
    reversed, and DDPM with n < T steps uses the posterior between consecutive inference timesteps.
    Not thread-safe: use a Scheduler from one thread at a time.
    """

    def __init__(
        self,
        kind: str = "ddpm",
        num_train_timesteps: int = 1000,
        schedule: str = "scaled_linear_beta",
        beta_start: float = 0.0015,
        beta_end: float = 0.0205,
        prediction_type: str = "v_prediction",
        clip_sample: bool = False,
        eta: float = 0.0,
        seed: Optional[int] = None,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
    ):
        opts = lib().pheno_scheduler_default_options()
        opts.kind = _choice("kind", kind, KINDS)
        n_train = _int("num_train_timesteps", num_train_timesteps)
        if n_train < 1:
            raise PhenoError(Status.INVALID_ARGUMENT, f"num_train_timesteps must be >= 1, got {n_train}")
        opts.num_train_timesteps = n_train
        opts.schedule = _choice("schedule", schedule, SCHEDULES)
        opts.beta_start, opts.beta_end = float(beta_start), float(beta_end)
        opts.prediction_type = _choice("prediction_type", prediction_type, PREDICTIONS)
        opts.clip_sample = int(bool(clip_sample))
        opts.clip_sample_range = float(clip_sample_range)
        opts.set_alpha_to_one = int(bool(set_alpha_to_one))
        opts.eta = float(eta)
        if seed is None:
            seed = int(np.random.SeedSequence().entropy) % (1 << 64)
        opts.seed = _int("seed", seed) % (1 << 64)
        handle = PhenoScheduler_p()
        check(lib().pheno_scheduler_new(ctypes.byref(opts), ctypes.byref(handle)))
        self._handle: Optional[int] = handle.value
        self._finalizer = weakref.finalize(self, lib().pheno_scheduler_free, PhenoScheduler_p(handle.value))
        self.kind, self.schedule, self.prediction_type = kind, schedule, prediction_type
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        self.clip_sample, self.eta = bool(clip_sample), float(eta)
        self.num_inference_steps: Optional[int] = None
        betas = np.empty(self.num_train_timesteps, np.float64)
        abar = np.empty(self.num_train_timesteps, np.float64)
        check(lib().pheno_scheduler_schedule(
            self._ptr, betas.ctypes.data_as(_f64_p), abar.ctypes.data_as(_f64_p), self.num_train_timesteps
        ))
        betas.flags.writeable = False
        abar.flags.writeable = False
        self._betas, self._abar = betas, abar

    @property
    def betas(self) -> np.ndarray:
        """β_t, t = 0..T (float64, read-only)."""
        return self._betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ_t = Π (1 − β_s), t = 0..T (float64, read-only)."""
        return self._abar

    # ---- forward process -------------------------------------------------------------------------

    def _per_sample(self, fn, x0: Any, noise: Any, t: Any) -> np.ndarray:
        x0 = _f32("x0", x0)
        noise = _f32("noise", noise)
        _same_shape("noise", noise, "x0", x0)
        if x0.ndim == 0:
            raise PhenoError(Status.SHAPE, "x0 must have a leading sample axis, got a scalar")
        n = x0.shape[0]
        if hasattr(t, "detach"):
            t = t.detach().cpu().numpy()
        ts = np.asarray(t)
        if not np.issubdtype(ts.dtype, np.integer):
            raise PhenoError(Status.INVALID_ARGUMENT, f"timesteps must be integers, got dtype {ts.dtype}")
        if ts.ndim == 0:
            ts = np.full(n, int(ts), np.int64)
        ts = np.require(ts.reshape(-1), dtype=np.int64, requirements=("C_CONTIGUOUS", "ALIGNED"))
        if ts.shape[0] != n:
            raise PhenoError(Status.SHAPE, f"{ts.shape[0]} timesteps for {n} samples (x0 has shape {x0.shape})")
        per = int(np.prod(x0.shape[1:], dtype=np.int64))
        out = np.empty_like(x0)
        check(fn(self._ptr, f32_ptr(x0), f32_ptr(noise), ts.ctypes.data_as(_i64_p), n, per, f32_ptr(out), out.size))
        return out

    def add_noise(self, x0: Any, noise: Any, t: Any) -> np.ndarray:
        """x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·noise; `t` is one timestep per sample along x0's first axis (or one
        for all). float32, x0's shape."""
        return self._per_sample(lib().pheno_scheduler_add_noise, x0, noise, t)

    def get_velocity(self, x0: Any, noise: Any, t: Any) -> np.ndarray:
        """v = √ᾱ_t·noise − √(1−ᾱ_t)·x0 (the v-prediction target); arguments as `add_noise`."""
        return self._per_sample(lib().pheno_scheduler_get_velocity, x0, noise, t)

    # ---- sampling --------------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Inference timesteps `arange(n) · (T // n)`, descending; n in 1..T."""
        n = _int("num_inference_steps", num_inference_steps)
        if n < 0:
            raise PhenoError(Status.INVALID_ARGUMENT, f"num_inference_steps must be >= 1, got {n}")
        check(lib().pheno_scheduler_set_timesteps(self._ptr, n))
        self.num_inference_steps = n

    @property
    def timesteps(self) -> np.ndarray:
        """The inference timesteps (int64, descending; empty before `set_timesteps`)."""
        count = c_size_t()
        check(lib().pheno_scheduler_timesteps(self._ptr, None, 0, ctypes.byref(count)))
        out = np.empty(count.value, np.int64)
        if count.value:
            check(lib().pheno_scheduler_timesteps(self._ptr, out.ctypes.data_as(_i64_p), out.size, ctypes.byref(count)))
        return out

    def noise(self, shape: Any) -> np.ndarray:
        """Standard-normal float32 noise of `shape` from the scheduler's seeded generator (x_T)."""
        shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
        out = np.empty(shape, np.float32)
        check(lib().pheno_scheduler_noise(self._ptr, f32_ptr(out), out.size))
        return out

    def reseed(self, seed: int) -> None:
        """Restarts the scheduler's noise generator from `seed`."""
        check(lib().pheno_scheduler_reseed(self._ptr, _int("seed", seed) % (1 << 64)))

    def step(
        self, model_output: Any, t: Any, sample: Any, generator: Any = None, noise: Any = None
    ) -> Tuple[np.ndarray, np.ndarray]:
        """One DDPM / DDIM step from timestep `t`: returns (prev_sample, pred_original_sample), float32
        of `sample`'s shape. The variance noise is `noise` when given, else drawn from `generator` (a
        `numpy.random.Generator`, or a `torch.Generator`: then the same numbers as diffusers draws on
        the CPU), else from the scheduler's seeded generator."""
        mo = _f32("model_output", model_output)
        x = _f32("sample", sample)
        _same_shape("model_output", mo, "sample", x)
        tt = _int("timestep", t)
        if noise is not None and generator is not None:
            raise PhenoError(Status.INVALID_ARGUMENT, "pass either noise or generator, not both")
        if noise is None and generator is not None:
            noise = _draw(generator, x.shape)
        z = None
        if noise is not None:
            z = _f32("noise", noise)
            _same_shape("noise", z, "sample", x)
        prev = np.empty_like(x)
        x0 = np.empty_like(x)
        check(lib().pheno_scheduler_step(
            self._ptr, f32_ptr(mo), tt, f32_ptr(x), None if z is None else f32_ptr(z), x.size,
            f32_ptr(prev), f32_ptr(x0),
        ))
        return prev, x0

    # ---- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the scheduler now; later calls on it raise PhenoError."""
        if self._handle is not None:
            self._finalizer()
            self._handle = None

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self._handle is not None else ", closed"
        return (
            f"Scheduler(kind={self.kind!r}, num_train_timesteps={self.num_train_timesteps}, "
            f"schedule={self.schedule!r}, prediction_type={self.prediction_type!r}, eta={self.eta}{state})"
        )

    @property
    def _ptr(self) -> c_void_p:
        if self._handle is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "the scheduler was closed")
        return PhenoScheduler_p(self._handle)


def _draw(generator: Any, shape: Tuple[int, ...]) -> np.ndarray:
    if isinstance(generator, np.random.Generator):
        return generator.standard_normal(shape, dtype=np.float32)
    if type(generator).__module__.startswith("torch"):
        import torch  # only reached with a torch.Generator, so torch is installed

        return torch.randn(shape, generator=generator, dtype=torch.float32).numpy()
    raise PhenoError(
        Status.INVALID_ARGUMENT,
        f"generator must be a numpy.random.Generator or a torch.Generator, got {type(generator).__name__}",
    )


def guide(uncond: Any, cond: Any, scale: float) -> np.ndarray:
    """Classifier-free guidance: uncond + scale·(cond − uncond), float32."""
    u = _f32("uncond", uncond)
    c = _f32("cond", cond)
    _same_shape("cond", c, "uncond", u)
    out = np.empty_like(u)
    check(lib().pheno_guidance(f32_ptr(u), f32_ptr(c), u.size, float(scale), f32_ptr(out)))
    return out
