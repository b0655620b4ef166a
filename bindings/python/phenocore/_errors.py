"""PhenoError and the pinned status codes (src/error.rs `PhenoStatus`)."""

from __future__ import annotations

import enum
from typing import Union


class Status(enum.IntEnum):
    """The C ABI's `PhenoStatus` values, without the `PHENO_` / `PHENO_ERR_` prefix."""

    OK = 0
    INVALID_ARGUMENT = 1
    NULL_POINTER = 2
    SHAPE = 3
    DTYPE = 4
    IO = 5
    FORMAT = 6
    MISSING_KEY = 7
    UNKNOWN_LAYER = 8
    NON_FINITE = 9
    NO_DEVICE = 10
    OUT_OF_MEMORY = 11
    CUDA = 12
    CANCELLED = 13
    UNSUPPORTED = 14
    INTERNAL = 15


class PhenoError(Exception):
    """A phenocore call failed. `status` is a `Status` (an int with a `.name`; a plain int for codes
    newer than this package), `message` the library's detailed message from `pheno_last_error()`."""

    def __init__(self, status: Union[Status, int], message: str):
        try:
            status = Status(status)
        except ValueError:
            status = int(status)
        self.status = status
        self.message = message
        name = status.name if isinstance(status, Status) else f"status {status}"
        super().__init__(f"{name}: {message}" if message else name)


def check(status: int) -> None:
    """Raises PhenoError with the library's message unless `status` is PHENO_OK."""
    if status == Status.OK:
        return
    from ._lib import lib

    raw = lib().pheno_last_error()
    message = raw.decode("utf-8", "replace") if raw else ""
    if not message:
        text = lib().pheno_status_str(status)
        message = text.decode("utf-8", "replace") if text else ""
    raise PhenoError(status, message)
