#!/usr/bin/env bash
# Builds libphenocore (release, the cdylib that `cargo test --release` builds), installs the Python bindings into .venv (created if missing) and runs
# their tests. Idempotent; exits non-zero when any step fails. Extra arguments go to pytest.
#   scripts/test-python.sh            # all of bindings/python/tests
#   scripts/test-python.sh -k crops   # a subset
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

# The library `cargo test --release` builds (target/release/deps/libphenocore.so; a small test
# target makes cargo build it) rather than `cargo build --release`: cargo test resolves dependency
# features together with the dev-dependencies, so after the Rust tests this is already up to date,
# where a `cargo build` would rebuild the dependencies and the library for another feature set.
cargo test --release --no-run --test header_fresh

venv="$root/.venv"
if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
fi
py="$venv/bin/python"
"$py" -m pip install --quiet --disable-pip-version-check numpy pytest h5py
"$py" -m pip install --quiet --disable-pip-version-check -e bindings/python

# The package would find target/release/libphenocore.so (a `cargo build --release`) by itself; point
# it at the library just built.
case "$(uname -s)" in
    Darwin) lib=libphenocore.dylib ;;
    *) lib=libphenocore.so ;;
esac
target="$(cargo metadata --format-version 1 --no-deps | "$py" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
export PHENOCORE_LIB="$target/release/deps/$lib"
[[ -f "$PHENOCORE_LIB" ]] || { echo "missing $PHENOCORE_LIB" >&2; exit 1; }

"$py" -m pytest bindings/python/tests -q "$@"
