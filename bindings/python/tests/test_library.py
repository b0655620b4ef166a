"""Library discovery, version, thread count, status codes."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import phenocore
from phenocore._lib import LibraryNotFoundError, find_library, lib, library_filename


def test_version_matches_cargo_toml():
    assert re.fullmatch(r"\d+\.\d+\.\d+", phenocore.__version__)
    number = lib().pheno_version_number()
    major, minor, patch = map(int, phenocore.__version__.split("."))
    assert number == major * 10000 + minor * 100 + patch
    # When the library is a cargo build, its crate version is the one in the enclosing Cargo.toml.
    path = Path(lib()._phenocore_path).resolve()
    for parent in path.parents:
        cargo = parent / "Cargo.toml"
        if cargo.is_file() and 'name = "phenocore"' in cargo.read_text():
            version = re.search(r'^version = "([^"]+)"', cargo.read_text(), re.M).group(1)
            assert phenocore.__version__ == version
            break


def test_find_library_order(tmp_path):
    name = library_filename()
    repo = tmp_path / "repo"
    pkg = repo / "bindings" / "python" / "phenocore"
    pkg.mkdir(parents=True)
    built = repo / "target" / "release" / name
    built.parent.mkdir(parents=True)
    built.write_bytes(b"")
    assert find_library(env={}, package_dir=pkg) == built
    beside = pkg / name
    beside.write_bytes(b"")
    assert find_library(env={}, package_dir=pkg) == beside
    explicit = tmp_path / "elsewhere.so"
    explicit.write_bytes(b"")
    assert find_library(env={"PHENOCORE_LIB": str(explicit)}, package_dir=pkg) == explicit


def test_find_library_errors_name_the_fix(tmp_path):
    with pytest.raises(LibraryNotFoundError, match="PHENOCORE_LIB='/no/such/libphenocore.so'"):
        find_library(env={"PHENOCORE_LIB": "/no/such/libphenocore.so"}, package_dir=tmp_path)
    with pytest.raises(LibraryNotFoundError) as e:
        find_library(env={}, package_dir=tmp_path)
    msg = str(e.value)
    assert "cargo build --release" in msg and "PHENOCORE_LIB" in msg and str(tmp_path) in msg


def _run_python(code, **env):
    full = dict(os.environ, **env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_env_var_selects_the_library():
    path = str(lib()._phenocore_path)
    r = _run_python("import phenocore, phenocore._lib as l; print(l.lib()._phenocore_path, phenocore.__version__)", PHENOCORE_LIB=path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [path, phenocore.__version__]


def test_missing_or_broken_library_fails_clearly(tmp_path):
    # import works without the library; the first call says what is wrong.
    r = _run_python("import phenocore; phenocore.set_num_threads(1)", PHENOCORE_LIB=str(tmp_path / "nope.so"))
    assert r.returncode != 0
    assert "LibraryNotFoundError" in r.stderr and "nope.so" in r.stderr and "does not name an existing file" in r.stderr
    garbage = tmp_path / library_filename()
    garbage.write_bytes(b"not a shared library")
    r = _run_python("import phenocore; phenocore.crop_cells([[1]], [[0, 0]])", PHENOCORE_LIB=str(garbage))
    assert r.returncode != 0
    assert "LibraryNotFoundError" in r.stderr and "cannot load" in r.stderr


def test_set_num_threads(model, crops):
    phenocore.set_num_threads(1)
    try:
        one = model.features(crops[:2])
    finally:
        phenocore.set_num_threads(0)
    all_cores = model.features(crops[:2])
    np.testing.assert_allclose(one, all_cores, rtol=1e-5, atol=1e-6)
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(phenocore.PhenoError) as e:
            phenocore.set_num_threads(bad)
        assert e.value.status == phenocore.Status.INVALID_ARGUMENT
        assert "thread count" in str(e.value)


def test_status_names_and_messages():
    e = phenocore.PhenoError(13, "cancelled by the progress callback")
    assert e.status == 13 and e.status.name == "CANCELLED" and e.status is phenocore.Status.CANCELLED
    assert str(e) == "CANCELLED: cancelled by the progress callback"
    future = phenocore.PhenoError(99, "")
    assert future.status == 99 and str(future) == "status 99"
    # Every pinned code of src/error.rs has its own static text in the library.
    texts = [lib().pheno_status_str(int(status)) for status in phenocore.Status]
    assert all(texts) and len(set(texts)) == len(phenocore.Status)
    assert b"cancel" in lib().pheno_status_str(phenocore.Status.CANCELLED).lower()
