#!/usr/bin/env bash
# Builds libphenocore (release), installs the Python bindings into .venv (created if missing) and runs
# their tests. Idempotent; exits non-zero when any step fails. Extra arguments go to pytest.
#   scripts/test-python.sh            # all of bindings/python/tests
#   scripts/test-python.sh -k crops   # a subset
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cargo build --release

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check numpy pytest h5py
"$py" -m pip install --quiet --disable-pip-version-check -e bindings/python

# The package finds the library in this checkout's target/release by itself; point it there
# explicitly only when cargo builds elsewhere.
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    case "$(uname -s)" in
        Darwin) lib=libphenocore.dylib ;;
        *) lib=libphenocore.so ;;
    esac
    case "$CARGO_TARGET_DIR" in
        /*) target="$CARGO_TARGET_DIR" ;;
        *) target="$root/$CARGO_TARGET_DIR" ;;
    esac
    export PHENOCORE_LIB="$target/release/$lib"
else
    unset PHENOCORE_LIB
fi

"$py" -m pytest bindings/python/tests -q "$@"
