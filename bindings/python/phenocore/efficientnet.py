"""The Cell Painting CNN (EfficientNet-B0) over the C ABI."""

from __future__ import annotations

import ctypes
import os
import weakref
from ctypes import c_char_p, c_size_t
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ._arrays import centers_array, crops_array, f32_ptr, image_struct
from ._errors import PhenoError, Status, check
from ._lib import (
    PHENO_PADDING_SYMMETRIC,
    PHENO_PADDING_TF_SAME,
    PhenoModel_p,
    PhenoProgressFn,
    c_float_p,
    lib,
)
from .crops import crop_options

DEFAULT_LAYER = "block6a_activation"
PADDINGS = {"symmetric": PHENO_PADDING_SYMMETRIC, "tf_same": PHENO_PADDING_TF_SAME}

ProgressFn = Callable[[int, int], Any]
PathLike = Union[str, "os.PathLike[str]"]


class EfficientNet:
    """EfficientNet-B0 for Cell Painting crops (torchvision layout, any number of input channels).

    Make one with `EfficientNet.load(path)` (torchvision-named safetensors), `EfficientNet.from_bytes(data)`
    or `EfficientNet.new(...)`. The model is immutable: several threads may call it at once (the library
    releases the GIL while it computes). `close()` (or a `with` block) frees it early.
    """

    def __init__(self, handle: int, padding: str, bn_eps: float):
        self._handle: Optional[int] = handle
        self._finalizer = weakref.finalize(self, lib().pheno_effnet_free, PhenoModel_p(handle))
        self.padding = padding
        self.bn_eps = float(bn_eps)
        in_ch, classes = c_size_t(), c_size_t()
        check(lib().pheno_effnet_info(self._ptr, ctypes.byref(in_ch), ctypes.byref(classes)))
        self._in_channels, self._num_classes = in_ch.value, classes.value

    # ---- construction ----------------------------------------------------------------------------

    @classmethod
    def load(
        cls, path: PathLike, padding: str = "symmetric", bn_eps: float = 1e-5, device: Union[str, int] = "cpu"
    ) -> "EfficientNet":
        """Loads torchvision-named safetensors weights. `padding`: "symmetric" (torchvision) or
        "tf_same" (Keras / DeepProfiler, use with bn_eps=1e-3). `device`: "cpu", "cuda" or "cuda:N"."""
        opts = _effnet_options(padding, bn_eps, device)
        handle = PhenoModel_p()
        check(lib().pheno_effnet_load(os.fsencode(os.fspath(path)), ctypes.byref(opts), ctypes.byref(handle)))
        return cls(handle.value, padding, bn_eps)

    @classmethod
    def from_bytes(
        cls, data: bytes, padding: str = "symmetric", bn_eps: float = 1e-5, device: Union[str, int] = "cpu"
    ) -> "EfficientNet":
        """As `load`, from the bytes of a safetensors file."""
        opts = _effnet_options(padding, bn_eps, device)
        buf = np.frombuffer(memoryview(data), dtype=np.uint8)
        handle = PhenoModel_p()
        check(
            lib().pheno_effnet_load_from_memory(
                buf.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), buf.size, ctypes.byref(opts), ctypes.byref(handle)
            )
        )
        return cls(handle.value, padding, bn_eps)

    @classmethod
    def new(
        cls,
        in_channels: int = 5,
        *,
        num_classes: int,
        padding: str = "symmetric",
        bn_eps: float = 1e-5,
        seed: int = 0,
        device: Union[str, int] = "cpu",
    ) -> "EfficientNet":
        """A freshly initialised model (torchvision's initialisation), deterministic in `seed`."""
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("seed", seed)):
            _require_count(name, value, minimum=1 if name != "seed" else 0)
        opts = _effnet_options(padding, bn_eps, device)
        handle = PhenoModel_p()
        check(lib().pheno_effnet_new(in_channels, num_classes, seed, ctypes.byref(opts), ctypes.byref(handle)))
        return cls(handle.value, padding, bn_eps)

    def save(self, path: PathLike) -> None:
        """Writes the weights as torchvision-named float32 safetensors (atomically: temp file + rename)."""
        check(lib().pheno_effnet_save(self._ptr, os.fsencode(os.fspath(path))))

    def close(self) -> None:
        """Frees the model now; later calls on it raise PhenoError."""
        self._finalizer()
        self._handle = None

    def __enter__(self) -> "EfficientNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- properties ------------------------------------------------------------------------------

    @property
    def in_channels(self) -> int:
        return self._in_channels

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def layer_dim(self, layer: str) -> int:
        """Feature dimension of a named layer (Keras or torchvision name; "logits" → num_classes)."""
        dim = c_size_t()
        check(lib().pheno_effnet_layer_dim(self._ptr, _layer_bytes(layer), ctypes.byref(dim)))
        return dim.value

    def __repr__(self) -> str:
        state = "" if self._handle is not None else ", closed"
        return (
            f"EfficientNet(in_channels={self._in_channels}, num_classes={self._num_classes}, "
            f"padding={self.padding!r}, bn_eps={self.bn_eps:g}{state})"
        )

    # ---- inference -------------------------------------------------------------------------------

    def features(
        self,
        crops: Any,
        layer: str = DEFAULT_LAYER,
        *,
        layers: Optional[Sequence[str]] = None,
        batch_size: int = 64,
        progress: Optional[ProgressFn] = None,
    ) -> Union[np.ndarray, Dict[str, np.ndarray]]:
        """Mean-pooled features of (N, C, H, W) crops.

        With `layer` returns an (N, D) float32 array; with `layers=[...]` a dict name → (N, D) from one
        pass. C-contiguous float32 crops are read in place; other arrays are converted once.
        `progress(done, total)` is called after each batch of `batch_size` crops (0 = library default);
        returning False cancels (PhenoError with status CANCELLED).
        """
        names, single = _layer_list(layer, layers)
        x = crops_array(crops)
        n, c, h, w = x.shape
        outs = self._alloc_outputs(names, n)
        call = _FeatureCall(names, outs, batch_size, progress)
        call.finish(
            lib().pheno_effnet_features(
                self._ptr, f32_ptr(x), n, c, h, w, call.layers, len(names), call.options_ref, call.out_ptrs, call.out_lens
            )
        )
        return outs[0] if single else dict(zip(names, outs))

    def logits(self, crops: Any, *, batch_size: Optional[int] = None, progress: Optional[ProgressFn] = None) -> np.ndarray:
        """Class logits (N, num_classes) of (N, C, H, W) crops. Without `batch_size`/`progress` all crops
        go through in one call; with either, it runs like `features(crops, "logits", ...)`."""
        if batch_size is not None or progress is not None:
            return self.features(crops, "logits", batch_size=64 if batch_size is None else batch_size, progress=progress)
        x = crops_array(crops)
        n, c, h, w = x.shape
        out = np.empty((n, self._num_classes), dtype=np.float32)
        check(lib().pheno_effnet_logits(self._ptr, f32_ptr(x), n, c, h, w, f32_ptr(out), out.size))
        return out

    def features_from_image(
        self,
        image: Any,
        centers: Any,
        layer: str = DEFAULT_LAYER,
        *,
        layers: Optional[Sequence[str]] = None,
        box_size: int = 128,
        normalize: str = "deepprofiler_legacy",
        batch_size: int = 64,
        progress: Optional[ProgressFn] = None,
    ) -> Union[np.ndarray, Dict[str, np.ndarray]]:
        """Features of the cells at `centers` (N, 2) (x, y) of a field `image` (C, H, W): the same as
        `features(crop_cells(image, centers, box_size, normalize), ...)`, with the crops made inside the
        library a batch at a time (never all at once)."""
        names, single = _layer_list(layer, layers)
        crop_opts = crop_options(box_size, normalize)
        img, _pixels = image_struct(image)  # _pixels owns the buffer img points into
        ctr = centers_array(centers)
        n = ctr.shape[0]
        outs = self._alloc_outputs(names, n)
        call = _FeatureCall(names, outs, batch_size, progress)
        call.finish(
            lib().pheno_effnet_features_from_image(
                self._ptr,
                ctypes.byref(img),
                f32_ptr(ctr),
                n,
                ctypes.byref(crop_opts),
                call.layers,
                len(names),
                call.options_ref,
                call.out_ptrs,
                call.out_lens,
            )
        )
        return outs[0] if single else dict(zip(names, outs))

    # ---- internals -------------------------------------------------------------------------------

    @property
    def _ptr(self) -> PhenoModel_p:
        if self._handle is None:
            raise PhenoError(Status.INVALID_ARGUMENT, "the model was closed")
        return PhenoModel_p(self._handle)

    def _alloc_outputs(self, names: List[str], n: int) -> List[np.ndarray]:
        return [np.empty((n, self.layer_dim(name)), dtype=np.float32) for name in names]


class _FeatureCall:
    """C arguments of one features call: layer names, output pointers, options with the progress
    trampoline; the caller keeps this object alive across the C call, and with it every ctypes object
    the library points into. An exception raised by the Python callback cancels the call and is
    re-raised by `finish` once the library has returned."""

    def __init__(self, names: List[str], outs: List[np.ndarray], batch_size: int, progress: Optional[ProgressFn]):
        _require_count("batch_size", batch_size, minimum=0)
        k = len(names)
        self.layers = (c_char_p * k)(*[_layer_bytes(name) for name in names])
        self.out_ptrs = (c_float_p * k)(*[f32_ptr(o) for o in outs])
        self.out_lens = (c_size_t * k)(*[o.size for o in outs])
        self._outs = outs
        self.options = lib().pheno_feature_default_options()
        self.options.batch_size = int(batch_size)
        self._progress = progress
        self._error: Optional[BaseException] = None
        self._trampoline = None
        if progress is not None:
            if not callable(progress):
                raise PhenoError(Status.INVALID_ARGUMENT, f"progress must be callable, got {type(progress).__name__}")
            self._trampoline = PhenoProgressFn(self._on_progress)
            self.options.progress = self._trampoline
        self.options_ref = ctypes.byref(self.options)

    def _on_progress(self, done: int, total: int, _user_data) -> int:
        if self._error is not None:
            return 1
        try:
            return 1 if self._progress(done, total) is False else 0
        except BaseException as e:  # never let it unwind into C; re-raised by finish()
            self._error = e
            return 1

    def finish(self, status: int) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        check(status)


def _effnet_options(padding: str, bn_eps: float, device: Union[str, int]):
    if padding not in PADDINGS:
        raise PhenoError(
            Status.INVALID_ARGUMENT, f"unknown padding {padding!r}: expected 'symmetric' (torchvision) or 'tf_same' (Keras)"
        )
    eps = float(bn_eps)
    if not (eps > 0 and np.isfinite(eps)):
        raise PhenoError(Status.INVALID_ARGUMENT, f"bn_eps must be a positive finite number, got {bn_eps!r}")
    opts = lib().pheno_effnet_default_options()
    opts.padding = PADDINGS[padding]
    opts.bn_eps = eps
    opts.device = _device_ordinal(device)
    return opts


def _device_ordinal(device: Union[str, int]) -> int:
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool) and device >= -1:
        return int(device)
    if isinstance(device, str):
        if device == "cpu":
            return -1
        if device == "cuda":
            return 0
        if device.startswith("cuda:") and device[5:].isdigit():
            return int(device[5:])
    raise PhenoError(Status.INVALID_ARGUMENT, f"unknown device {device!r}: expected 'cpu', 'cuda' or 'cuda:N'")


def _layer_list(layer: str, layers: Optional[Sequence[str]]) -> Tuple[List[str], bool]:
    if layers is None:
        return [layer], True
    if isinstance(layers, (str, bytes)):
        raise PhenoError(Status.INVALID_ARGUMENT, f"layers must be a list of names, got the string {layers!r}")
    if layer != DEFAULT_LAYER:
        raise PhenoError(Status.INVALID_ARGUMENT, "give either layer=... or layers=[...], not both")
    names = list(layers)
    if not names:
        raise PhenoError(Status.INVALID_ARGUMENT, "layers is empty: name at least one layer")
    return names, False


def _layer_bytes(layer: str) -> bytes:
    if not isinstance(layer, str):
        raise PhenoError(Status.INVALID_ARGUMENT, f"layer names are strings, got {layer!r}")
    if "\0" in layer:
        raise PhenoError(Status.UNKNOWN_LAYER, f"layer name {layer!r} contains a NUL character")
    return layer.encode("utf-8")


def _require_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PhenoError(Status.INVALID_ARGUMENT, f"{name} must be an integer >= {minimum}, got {value!r}")
