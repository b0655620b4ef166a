"""phenocore: Cell Painting images to phenotypic profiles (Python bindings over the C ABI).

    import phenocore
    model = phenocore.EfficientNet.load("cpcnn.safetensors", padding="tf_same", bn_eps=1e-3)
    crops = phenocore.crop_cells(image, centers, box_size=128)     # (N, C, 128, 128) float32
    feats = model.features(crops)                                  # (N, 672) block6a_activation

The shared library is found through $PHENOCORE_LIB, beside this package, or in the target/release
folder of the phenocore repository this package sits in.
"""

from __future__ import annotations

from ._errors import PhenoError, Status, check as _check
from . import _lib
from ._lib import LibraryNotFoundError, find_library
from .crops import crop_cells
from .diffusion import DiffusionTrainer, DiffusionUNet
from .efficientnet import DEFAULT_LAYER, EfficientNet
from .harmony import harmony
from . import metrics
from .profiles import Profiles, aggregate, aggregate_npz, read_profiles, write_profiles
from .scheduler import Scheduler
from .sphering import Sphering, TreatmentEffects, treatment_effect
from .train import Trainer
from .vae import AutoencoderKL

__all__ = [
    "Profiles",
    "aggregate",
    "aggregate_npz",
    "read_profiles",
    "write_profiles",
    "EfficientNet",
    "Trainer",
    "Scheduler",
    "DiffusionUNet",
    "DiffusionTrainer",
    "AutoencoderKL",
    "metrics",
    "Sphering",
    "TreatmentEffects",
    "treatment_effect",
    "crop_cells",
    "harmony",
    "set_num_threads",
    "library_version",
    "PhenoError",
    "Status",
    "LibraryNotFoundError",
    "find_library",
    "DEFAULT_LAYER",
    "__version__",
]


def set_num_threads(n: int) -> None:
    """Threads the library computes with (0 = all cores)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise PhenoError(Status.INVALID_ARGUMENT, f"thread count must be an integer >= 0, got {n!r}")
    _check(_lib.lib().pheno_set_num_threads(n))


def library_version() -> str:
    """"MAJOR.MINOR.PATCH" of the loaded libphenocore (from `pheno_version_number`)."""
    number = int(_lib.lib().pheno_version_number())
    return f"{number // 10000}.{number // 100 % 100}.{number % 100}"


def __getattr__(name: str):
    # __version__ is read from the library on first use, so `import phenocore` works (and can report a
    # missing library clearly) before the library is loaded.
    if name == "__version__":
        return library_version()
    raise AttributeError(f"module 'phenocore' has no attribute {name!r}")
