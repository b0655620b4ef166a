"""Training the Cell Painting CNN (EfficientNet-B0, REFERENCE §2) over the C ABI (`pheno_trainer_*`)."""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import tempfile
import weakref
from ctypes import POINTER, c_char_p, c_double, c_float, c_int, c_int32, c_size_t, c_uint32, c_uint64, c_void_p
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from ._arrays import crops_array, f32_ptr
from ._errors import PhenoError, Status, check
from ._lib import PhenoEffnetOptions, PhenoModel_p, c_float_p, lib, register
from .efficientnet import EfficientNet, _device_ordinal, _effnet_options

PathLike = Union[str, "os.PathLike[str]"]

OPTIMIZERS = {"sgd": 0, "adamw": 1}
SCHEDULES = {"constant": 0, "step": 1, "multistep": 2, "cosine": 3, "exponential": 4}
SPLITS = {"none": 0, "cells": 1, "plates": 2}
COMPUTE = {"f32": 0, "tf32": 1, "bf16": 2}


class PhenoTrainerOptions(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("optimizer", c_int),
        ("lr", c_double),
        ("momentum", c_double),
        ("nesterov", c_int32),
        ("weight_decay", c_double),
        ("decay_kernels_only", c_int32),
        ("beta1", c_double),
        ("beta2", c_double),
        ("eps", c_double),
        ("label_smoothing", c_double),
        ("dropout", c_double),
        ("drop_connect_rate", c_double),
        ("bn_momentum", c_double),
        ("schedule", c_int),
        ("step_size", c_uint64),
        ("gamma", c_double),
        ("milestones", POINTER(c_uint64)),
        ("n_milestones", c_size_t),
        ("t_max", c_uint64),
        ("eta_min", c_double),
        ("warmup_epochs", c_uint64),
        ("clip_grad_norm", c_double),
        ("augment", c_int32),
        ("augment_in_step", c_int32),
        ("aug_crop_p", c_float),
        ("aug_crop_scale_min", c_float),
        ("aug_crop_scale_max", c_float),
        ("aug_flip", c_int32),
        ("aug_rot90", c_int32),
        ("aug_brightness", c_float),
        ("aug_contrast_min", c_float),
        ("aug_contrast_max", c_float),
        ("batch_size", c_size_t),
        ("epochs", c_uint64),
        ("seed", c_uint64),
        ("workers", c_size_t),
        ("prefetch", c_size_t),
        ("domain_count", c_size_t),
        ("domain_lambda", c_double),
        ("domain_lambda_schedule", c_int32),
        ("domain_weight", c_double),
        ("domain_hidden", POINTER(c_size_t)),
        ("n_domain_hidden", c_size_t),
        ("mil", c_int32),
        ("mil_bag_size", c_size_t),
        ("mil_min_treated", c_size_t),
        ("mil_max_treated", c_size_t),
        ("mil_control_classes", POINTER(c_uint32)),
        ("n_mil_control_classes", c_size_t),
        ("mil_attention_dim", c_size_t),
        ("device", c_int32),
        ("compute", c_int32),
    ]


class PhenoTrainProgress(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_size_t),
        ("epoch", c_uint64),
        ("step", c_uint64),
        ("steps_in_epoch", c_uint64),
        ("loss", c_double),
        ("is_epoch_end", c_int32),
        ("lr", c_double),
        ("train_loss", c_double),
        ("train_accuracy", c_double),
        ("val_accuracy", c_double),
        ("val_macro_f1", c_double),
        ("val_top5", c_double),
    ]


PhenoTrainProgressFn = ctypes.CFUNCTYPE(c_int32, POINTER(PhenoTrainProgress), c_void_p)
PhenoTrainer_p = c_void_p
_u32_p = POINTER(c_uint32)
_u64_p = POINTER(c_uint64)

register(
    {
        "pheno_trainer_default_options": (PhenoTrainerOptions, []),
        "pheno_trainer_new": (
            c_int,
            [POINTER(PhenoTrainerOptions), c_size_t, c_size_t, c_uint64, POINTER(PhenoEffnetOptions), POINTER(PhenoTrainer_p)],
        ),
        "pheno_trainer_new_from_weights": (
            c_int,
            [
                POINTER(PhenoTrainerOptions), c_char_p, c_size_t, c_size_t, c_uint64,
                POINTER(PhenoEffnetOptions), POINTER(PhenoTrainer_p),
            ],
        ),
        "pheno_trainer_step": (
            c_int,
            [PhenoTrainer_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, _u32_p, POINTER(c_double)],
        ),
        "pheno_trainer_step_domains": (
            c_int,
            [PhenoTrainer_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, _u32_p, _u32_p, POINTER(c_double)],
        ),
        "pheno_trainer_step_bags": (
            c_int,
            [PhenoTrainer_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, _u32_p, _u32_p, POINTER(c_double)],
        ),
        "pheno_trainer_add_crops_with_domains": (
            c_int,
            [PhenoTrainer_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, _u32_p, _u32_p, _u32_p, _u32_p],
        ),
        "pheno_trainer_predict": (
            c_int,
            [PhenoTrainer_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, c_float_p, c_size_t],
        ),
        "pheno_trainer_add_crops": (
            c_int,
            [PhenoTrainer_p, c_float_p, c_size_t, c_size_t, c_size_t, c_size_t, _u32_p, _u32_p, _u32_p],
        ),
        "pheno_trainer_num_crops": (c_int, [PhenoTrainer_p, POINTER(c_size_t)]),
        "pheno_trainer_clear_crops": (c_int, [PhenoTrainer_p]),
        "pheno_trainer_fit": (
            c_int,
            [
                PhenoTrainer_p, c_int32, c_double, _u32_p, c_size_t, c_uint64, c_char_p, c_char_p,
                PhenoTrainProgressFn, c_void_p,
            ],
        ),
        "pheno_trainer_save_weights": (c_int, [PhenoTrainer_p, c_char_p]),
        "pheno_trainer_save_checkpoint": (c_int, [PhenoTrainer_p, c_char_p]),
        "pheno_trainer_load_checkpoint": (c_int, [PhenoTrainer_p, c_char_p]),
        "pheno_trainer_to_model": (c_int, [PhenoTrainer_p, POINTER(PhenoModel_p)]),
        "pheno_trainer_steps": (c_int, [PhenoTrainer_p, _u64_p, _u64_p]),
        "pheno_trainer_free": (None, [PhenoTrainer_p]),
    }
)

ProgressFn = Callable[[Dict[str, Any]], Any]


class Trainer:
    """Trains EfficientNet-B0 on Cell Painting crops (REFERENCE §2 defaults: SGD lr 0.005, momentum
    0.9, Nesterov, weight decay 1e-5, dropout 0.2, drop-connect 0.2; 0 disables a regulariser).

    Start from `model` (a `phenocore.EfficientNet`, or a path to torchvision-named safetensors), from
    `weights` (torchvision-format safetensors such as ImageNet's: the stem is expanded to `in_channels`
    channels, i % 3, and the classifier is redrawn from `seed` unless it has `num_classes` outputs), or
    from torchvision's random initialisation (`seed`) when neither is given.

    `.step(crops, labels)` takes one optimiser step with BN in training mode (augmented only with
    `augment=True`); `.fit(crops, labels, ...)` runs class-balanced epochs with the §2 augmentations
    (`fit_augment=False` turns them off), validation and checkpoints. `threads` sets the library-wide
    thread count (`phenocore.set_num_threads`). A Trainer is not thread-safe: use it from one thread
    at a time.

    The paper's alternative schemes (REFERENCE §2), off by default:
    `domain_adversarial={"domains": n_plates, "lambda": 1.0, "lambda_schedule": "constant" | "ganin",
    "weight": 1.0, "hidden": (1024, 512, 128)}` adds a gradient-reversal domain branch (plates as
    domains): `.step(crops, labels, domains=...)` then needs each crop's domain, and `.fit` uses
    `domains=` (default: the `plates` ids). `mil={"bag_size": 16, "min_treated": 4, "max_treated": 12,
    "control_classes": [dmso_label], "attention_dim": 128}` trains on attention-MIL bags: `.fit` builds
    them (`batch_size` counts bags) and `.step_bags(crops, bag_labels)` takes (n_bags · bag_size, C, H, W)
    crops, bag after bag.

    `device="cuda"` (or "cuda:N") trains on that GPU (a library built with the `cuda` feature):
    weights, gradients, BN statistics and the optimizer state stay there, validation runs there;
    `compute="tf32"` or `"bf16"` (mixed precision, f32 master weights) sets the arithmetic of its
    steps. Not with `domain_adversarial` or `mil`.
    """

    def __init__(
        self,
        model: Any = None,
        *,
        in_channels: Optional[int] = None,
        num_classes: Optional[int] = None,
        weights: Optional[PathLike] = None,
        padding: Optional[str] = None,
        bn_eps: Optional[float] = None,
        seed: int = 0,
        optimizer: str = "sgd",
        lr: float = 0.005,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 1e-5,
        decay_kernels_only: bool = False,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        label_smoothing: float = 0.0,
        dropout: float = 0.2,
        drop_connect_rate: float = 0.2,
        bn_momentum: float = 0.1,
        augment: bool = False,
        fit_augment: bool = True,
        batch_size: int = 32,
        epochs: int = 30,
        schedule: str = "constant",
        step_size: int = 10,
        gamma: float = 0.1,
        milestones: Optional[Sequence[int]] = None,
        t_max: Optional[int] = None,
        eta_min: float = 0.0,
        warmup_epochs: int = 0,
        clip_grad_norm: Optional[float] = None,
        workers: int = 1,
        prefetch: int = 2,
        threads: Optional[int] = None,
        domain_adversarial: Optional[Dict[str, Any]] = None,
        mil: Optional[Dict[str, Any]] = None,
        device: Union[str, int] = "cpu",
        compute: str = "f32",
    ):
        self._handle: Optional[int] = None
        if model is not None and weights is not None:
            raise PhenoError(Status.INVALID_ARGUMENT, "give either model or weights, not both")
        if threads is not None:
            from . import set_num_threads

            set_num_threads(threads)
        opts = lib().pheno_trainer_default_options()
        if optimizer not in OPTIMIZERS:
            raise PhenoError(Status.INVALID_ARGUMENT, f"unknown optimizer {optimizer!r}: expected one of {list(OPTIMIZERS)}")
        if schedule not in SCHEDULES:
            raise PhenoError(Status.INVALID_ARGUMENT, f"unknown schedule {schedule!r}: expected one of {list(SCHEDULES)}")
        _count("batch_size", batch_size, 1)
        _count("epochs", epochs, 0)
        _count("seed", seed, 0)
        _count("workers", workers, 1)
        _count("prefetch", prefetch, 1)
        _count("warmup_epochs", warmup_epochs, 0)
        _count("step_size", step_size, 1)
        opts.optimizer = OPTIMIZERS[optimizer]
        opts.lr, opts.momentum, opts.nesterov = float(lr), float(momentum), int(bool(nesterov))
        opts.weight_decay, opts.decay_kernels_only = float(weight_decay), int(bool(decay_kernels_only))
        opts.beta1, opts.beta2 = (float(b) for b in betas)
        opts.eps, opts.label_smoothing = float(eps), float(label_smoothing)
        opts.dropout, opts.drop_connect_rate, opts.bn_momentum = float(dropout), float(drop_connect_rate), float(bn_momentum)
        opts.schedule, opts.step_size, opts.gamma = SCHEDULES[schedule], int(step_size), float(gamma)
        self._milestones = (c_uint64 * len(milestones or ()))(*[int(m) for m in (milestones or ())])
        opts.milestones = ctypes.cast(self._milestones, _u64_p)
        opts.n_milestones = len(self._milestones)
        opts.t_max = int(epochs if t_max is None else t_max) or 1
        opts.eta_min, opts.warmup_epochs = float(eta_min), int(warmup_epochs)
        opts.clip_grad_norm = 0.0 if clip_grad_norm is None else float(clip_grad_norm)
        if clip_grad_norm is not None and not opts.clip_grad_norm > 0:
            raise PhenoError(Status.INVALID_ARGUMENT, f"clip_grad_norm must be positive (or None), got {clip_grad_norm!r}")
        opts.augment, opts.augment_in_step = int(bool(fit_augment)), int(bool(augment))
        opts.batch_size, opts.epochs, opts.seed = int(batch_size), int(epochs), int(seed)
        opts.workers, opts.prefetch = int(workers), int(prefetch)
        if compute not in COMPUTE:
            raise PhenoError(Status.INVALID_ARGUMENT, f"unknown compute {compute!r}: expected one of {list(COMPUTE)}")
        opts.device, opts.compute = _device_ordinal(device), COMPUTE[compute]
        self._domain_hidden = (c_size_t * 0)()
        self._mil_controls = (c_uint32 * 0)()
        self.domain_adversarial = domain_adversarial is not None
        self.mil_bag_size: Optional[int] = None
        if domain_adversarial is not None:
            d = _keys("domain_adversarial", domain_adversarial, {"domains", "lambda", "lambda_schedule", "weight", "hidden"})
            if "domains" not in d:
                raise PhenoError(Status.INVALID_ARGUMENT, "domain_adversarial needs 'domains' (the number of plates)")
            _count("domain_adversarial['domains']", d["domains"], 2)
            sched = d.get("lambda_schedule", "constant")
            if sched not in ("constant", "ganin"):
                raise PhenoError(Status.INVALID_ARGUMENT, f"domain_adversarial['lambda_schedule'] must be 'constant' or 'ganin', got {sched!r}")
            hidden = list(d.get("hidden", (1024, 512, 128)))
            for v in hidden:
                _count("domain_adversarial['hidden'] entries", v, 1)
            self._domain_hidden = (c_size_t * len(hidden))(*[int(v) for v in hidden])
            opts.domain_count = int(d["domains"])
            opts.domain_lambda = float(d.get("lambda", 1.0))
            opts.domain_lambda_schedule = 1 if sched == "ganin" else 0
            opts.domain_weight = float(d.get("weight", 1.0))
            opts.domain_hidden = ctypes.cast(self._domain_hidden, POINTER(c_size_t))
            opts.n_domain_hidden = len(hidden)
        if mil is not None:
            m = _keys("mil", mil, {"bag_size", "min_treated", "max_treated", "control_classes", "attention_dim"})
            controls = list(m.get("control_classes", ()))
            for v in controls:
                _count("mil['control_classes'] entries", v, 0)
            self._mil_controls = (c_uint32 * len(controls))(*[int(v) for v in controls])
            opts.mil = 1
            for key in ("bag_size", "min_treated", "max_treated", "attention_dim"):
                if key in m:
                    _count(f"mil[{key!r}]", m[key], 1)
                    setattr(opts, "mil_" + key, int(m[key]))
            opts.mil_control_classes = ctypes.cast(self._mil_controls, _u32_p)
            opts.n_mil_control_classes = len(controls)
            self.mil_bag_size = int(opts.mil_bag_size)
        self._options = opts

        tmp = None
        if isinstance(model, EfficientNet):
            padding = model.padding if padding is None else padding
            bn_eps = model.bn_eps if bn_eps is None else bn_eps
            in_channels = model.in_channels if in_channels is None else in_channels
            num_classes = model.num_classes if num_classes is None else num_classes
            tmp = tempfile.TemporaryDirectory(prefix="phenocore-trainer-")
            weights = os.path.join(tmp.name, "model.safetensors")
            model.save(weights)
        elif model is not None:
            if not isinstance(model, (str, bytes, os.PathLike)):
                raise PhenoError(
                    Status.INVALID_ARGUMENT,
                    f"model must be a phenocore.EfficientNet or a safetensors path, got {type(model).__name__}",
                )
            weights = model
        padding = "symmetric" if padding is None else padding
        bn_eps = 1e-5 if bn_eps is None else bn_eps
        model_opts = _effnet_options(padding, bn_eps, "cpu")
        try:
            handle = PhenoTrainer_p()
            if weights is not None:
                if in_channels is None or num_classes is None:
                    stem_in, classes = _weights_shape(weights)
                    in_channels = stem_in if in_channels is None else in_channels
                    num_classes = classes if num_classes is None else num_classes
                _count("in_channels", in_channels, 1)
                _count("num_classes", num_classes, 1)
                check(
                    lib().pheno_trainer_new_from_weights(
                        ctypes.byref(opts), os.fsencode(os.fspath(weights)), int(in_channels), int(num_classes),
                        int(seed), ctypes.byref(model_opts), ctypes.byref(handle),
                    )
                )
            else:
                in_channels = 5 if in_channels is None else in_channels
                if num_classes is None:
                    raise PhenoError(Status.INVALID_ARGUMENT, "num_classes is required without model or weights")
                _count("in_channels", in_channels, 1)
                _count("num_classes", num_classes, 1)
                check(
                    lib().pheno_trainer_new(
                        ctypes.byref(opts), int(in_channels), int(num_classes), int(seed),
                        ctypes.byref(model_opts), ctypes.byref(handle),
                    )
                )
        finally:
            if tmp is not None:
                tmp.cleanup()
        self._handle = handle.value
        self._finalizer = weakref.finalize(self, lib().pheno_trainer_free, PhenoTrainer_p(handle.value))
        self.padding, self.bn_eps = padding, float(bn_eps)
        self.in_channels, self.num_classes = int(in_channels), int(num_classes)

    # ---- training --------------------------------------------------------------------------------

    def step(self, crops: Any, labels: Any, domains: Any = None) -> float:
        """One optimiser step on (N, C, H, W) crops with integer labels in [0, num_classes); returns the
        batch's loss (before the update). BN runs in training mode; crops are augmented only when the
        trainer was made with `augment=True`. With `domain_adversarial`, `domains` (each crop's domain /
        plate index) is required and the loss is treatment CE + weight · domain CE."""
        x = crops_array(crops)
        n, c, h, w = x.shape
        y = _labels(labels, n)
        loss = c_double()
        if domains is None:
            check(lib().pheno_trainer_step(self._ptr, f32_ptr(x), n, c, h, w, _u32(y), ctypes.byref(loss)))
        else:
            d = _ids("domains", domains, n)
            check(lib().pheno_trainer_step_domains(self._ptr, f32_ptr(x), n, c, h, w, _u32(y), _u32(d), ctypes.byref(loss)))
        return loss.value

    def step_bags(self, crops: Any, bag_labels: Any, domains: Any = None) -> float:
        """One step on attention-MIL bags (trainer made with `mil=`): `crops` is (n_bags · bag_size, C, H, W),
        bag after bag, `bag_labels` one label per bag, `domains` one per crop with `domain_adversarial`."""
        if self.mil_bag_size is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "step_bags needs a trainer made with mil=...")
        x = crops_array(crops)
        n, c, h, w = x.shape
        if n % self.mil_bag_size:
            raise PhenoError(Status.SHAPE, f"{n} crops do not make bags of {self.mil_bag_size}")
        nb = n // self.mil_bag_size
        y = _ids("bag_labels", bag_labels, nb)
        d = None if domains is None else _ids("domains", domains, n)
        loss = c_double()
        check(
            lib().pheno_trainer_step_bags(
                self._ptr, f32_ptr(x), nb, c, h, w, _u32(y), None if d is None else _u32(d), ctypes.byref(loss)
            )
        )
        return loss.value

    def fit(
        self,
        crops: Any,
        labels: Any,
        groups: Any = None,
        plates: Any = None,
        *,
        split: str = "cells",
        train_fraction: float = 0.6,
        val_plates: Optional[Sequence[int]] = None,
        epochs: Optional[int] = None,
        checkpoint: Optional[PathLike] = None,
        best: Optional[PathLike] = None,
        progress: Optional[ProgressFn] = None,
        domains: Any = None,
    ) -> List[Dict[str, Any]]:
        """Trains until `epochs` epochs are done in total (default: the trainer's `epochs`; a trainer
        restored from a checkpoint continues) on (N, C, H, W) crops with class-balanced epochs,
        augmentation and validation after every epoch. Returns one dict per epoch run (epoch, lr,
        steps, train_loss, train_accuracy, val_accuracy, val_macro_f1, val_top5; None when absent).

        `groups` (well id per crop) and `plates` (plate id per crop) drive the split: "cells"
        (leave-cells-out: `train_fraction` of every well trains; without groups, the crops of one
        label on one plate form a well), "plates" (crops on `val_plates` validate) or "none".
        `checkpoint` is rewritten (atomically) after every epoch, `best` gets the best weights so far.
        `progress(event)` gets a dict after every step (epoch, step, steps_in_epoch, loss) and every
        epoch (as returned, with "epoch_end": True); returning False cancels (PhenoError CANCELLED,
        with the reports so far in its `.reports`; the last checkpoint stays valid).
        With `domain_adversarial`, `domains` gives each crop's domain (default: its `plates` id); with
        `mil`, epochs are balanced attention-MIL bags."""
        if split not in SPLITS:
            raise PhenoError(Status.INVALID_ARGUMENT, f"unknown split {split!r}: expected one of {list(SPLITS)}")
        if epochs is not None:
            _count("epochs", epochs, 1)
        if progress is not None and not callable(progress):
            raise PhenoError(Status.INVALID_ARGUMENT, f"progress must be callable, got {type(progress).__name__}")
        x = crops_array(crops)
        n, c, h, w = x.shape
        y = _labels(labels, n)
        g = None if groups is None else _ids("groups", groups, n)
        p = None if plates is None else _ids("plates", plates, n)
        dm = None if domains is None else _ids("domains", domains, n)
        vp = np.ascontiguousarray(np.asarray([] if val_plates is None else list(val_plates), dtype=np.int64))
        if split == "plates" and vp.size == 0:
            raise PhenoError(Status.INVALID_ARGUMENT, 'split="plates" needs val_plates')
        if (vp < 0).any() or (vp > 0xFFFFFFFF).any():
            raise PhenoError(Status.INVALID_ARGUMENT, f"val_plates must be plate ids in [0, 2^32), got {vp.tolist()}")
        vp = vp.astype(np.uint32)
        reports: List[Dict[str, Any]] = []
        error: List[BaseException] = []

        def on_progress(ptr, _user) -> int:
            if error:
                return 1
            try:
                e = ptr.contents
                if e.is_epoch_end:
                    report = {
                        "epoch": int(e.epoch),
                        "lr": e.lr,
                        "steps": int(e.steps_in_epoch),
                        "train_loss": e.train_loss,
                        "train_accuracy": e.train_accuracy,
                        "val_accuracy": _none_if_nan(e.val_accuracy),
                        "val_macro_f1": _none_if_nan(e.val_macro_f1),
                        "val_top5": _none_if_nan(e.val_top5),
                    }
                    reports.append(report)
                    event = dict(report, epoch_end=True)
                else:
                    event = {
                        "epoch": int(e.epoch),
                        "step": int(e.step),
                        "steps_in_epoch": int(e.steps_in_epoch),
                        "loss": e.loss,
                        "epoch_end": False,
                    }
                if progress is not None and progress(event) is False:
                    return 1
                return 0
            except BaseException as ex:  # never unwind into C; re-raised below
                error.append(ex)
                return 1

        trampoline = PhenoTrainProgressFn(on_progress)
        ptr = self._ptr
        check(lib().pheno_trainer_clear_crops(ptr))
        try:
            if dm is None:
                check(
                    lib().pheno_trainer_add_crops(
                        ptr, f32_ptr(x), n, c, h, w, _u32(y), None if g is None else _u32(g), None if p is None else _u32(p)
                    )
                )
            else:
                check(
                    lib().pheno_trainer_add_crops_with_domains(
                        ptr, f32_ptr(x), n, c, h, w, _u32(y), None if g is None else _u32(g),
                        None if p is None else _u32(p), _u32(dm),
                    )
                )
            status = lib().pheno_trainer_fit(
                ptr, SPLITS[split], float(train_fraction), _u32(vp), vp.size, int(epochs or 0),
                _path(checkpoint), _path(best), trampoline, None,
            )
        finally:
            lib().pheno_trainer_clear_crops(ptr)
        if error:
            raise error[0]
        try:
            check(status)
        except PhenoError as ex:
            ex.reports = reports  # type: ignore[attr-defined]
            raise
        return reports

    def predict(self, crops: Any) -> np.ndarray:
        """Logits (N, num_classes) float32 of (N, C, H, W) crops, BN in eval mode."""
        x = crops_array(crops)
        n, c, h, w = x.shape
        out = np.empty((n, self.num_classes), dtype=np.float32)
        check(lib().pheno_trainer_predict(self._ptr, f32_ptr(x), n, c, h, w, f32_ptr(out), out.size))
        return out

    # ---- state -----------------------------------------------------------------------------------

    def save(self, path: PathLike) -> None:
        """Writes the weights and BN statistics as torchvision-named float32 safetensors (atomically),
        loadable with `phenocore.EfficientNet.load`."""
        check(lib().pheno_trainer_save_weights(self._ptr, os.fsencode(os.fspath(path))))

    def save_checkpoint(self, path: PathLike) -> None:
        """Writes weights, optimiser state, counters and RNG state (atomically) for exact resumption."""
        check(lib().pheno_trainer_save_checkpoint(self._ptr, os.fsencode(os.fspath(path))))

    def load_checkpoint(self, path: PathLike) -> None:
        """Restores a checkpoint: the next step is exactly the one the saved run would have taken."""
        check(lib().pheno_trainer_load_checkpoint(self._ptr, os.fsencode(os.fspath(path))))

    def model(self) -> EfficientNet:
        """The current weights as an inference `phenocore.EfficientNet` (independent of the trainer)."""
        handle = PhenoModel_p()
        check(lib().pheno_trainer_to_model(self._ptr, ctypes.byref(handle)))
        return EfficientNet(handle.value, self.padding, self.bn_eps)

    @property
    def steps(self) -> int:
        """Optimiser steps taken (restored by `load_checkpoint`)."""
        return self._counters()[0]

    @property
    def epochs_done(self) -> int:
        """Completed `fit` epochs (restored by `load_checkpoint`)."""
        return self._counters()[1]

    def close(self) -> None:
        """Frees the trainer now; later calls on it raise PhenoError."""
        if self._handle is not None:
            self._finalizer()
            self._handle = None

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "" if self._handle is not None else ", closed"
        return f"Trainer(in_channels={self.in_channels}, num_classes={self.num_classes}{state})"

    # ---- internals -------------------------------------------------------------------------------

    def _counters(self):
        s, e = c_uint64(), c_uint64()
        check(lib().pheno_trainer_steps(self._ptr, ctypes.byref(s), ctypes.byref(e)))
        return s.value, e.value

    @property
    def _ptr(self) -> PhenoTrainer_p:
        if self._handle is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "the trainer was closed")
        return PhenoTrainer_p(self._handle)


def _count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PhenoError(Status.INVALID_ARGUMENT, f"{name} must be an integer >= {minimum}, got {value!r}")


def _ids(what: str, values: Any, n: int) -> np.ndarray:
    a = np.asarray(values)
    if a.shape != (n,):
        raise PhenoError(Status.SHAPE, f"{what} must have one entry per crop ({n},), got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what} must be integers, got dtype {a.dtype}")
    bad = np.flatnonzero((a < 0) | (a > 0xFFFFFFFF)) if a.size else []
    if len(bad):
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what}[{bad[0]}] (crop {bad[0]}) is {a[bad[0]]}: expected 0..2^32-1")
    return np.ascontiguousarray(a, dtype=np.uint32)


def _keys(what: str, d: Any, allowed: set) -> Dict[str, Any]:
    if not isinstance(d, dict):
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what} must be a dict, got {type(d).__name__}")
    unknown = sorted(set(d) - allowed)
    if unknown:
        raise PhenoError(Status.INVALID_ARGUMENT, f"{what}: unknown key(s) {unknown}; expected some of {sorted(allowed)}")
    return d


def _labels(labels: Any, n: int) -> np.ndarray:
    return _ids("labels", labels, n)


def _u32(a: np.ndarray):
    return a.ctypes.data_as(_u32_p)


def _path(p: Optional[PathLike]) -> Optional[bytes]:
    return None if p is None else os.fsencode(os.fspath(p))


def _none_if_nan(v: float) -> Optional[float]:
    return None if math.isnan(v) else v


def _weights_shape(path: PathLike):
    """(stem input channels, classifier outputs) from a torchvision-named safetensors header."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        stem = header["features.0.0.weight"]["shape"][1]
        classes = header["classifier.1.weight"]["shape"][0]
    except OSError as e:
        raise PhenoError(Status.IO, f"cannot read {os.fspath(path)!r}: {e}") from e
    except (ValueError, KeyError, IndexError, TypeError, struct.error) as e:
        raise PhenoError(
            Status.FORMAT, f"{os.fspath(path)!r} is not torchvision-named EfficientNet safetensors ({e!r})"
        ) from e
    return int(stem), int(classes)
