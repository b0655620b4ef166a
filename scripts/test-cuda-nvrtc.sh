#!/usr/bin/env bash
# CUDA checks that need no GPU: builds with `--features cuda` and compiles every kernels/*.cu with
# NVRTC to sm_80 and sm_90 cubin, failing on compile errors, warnings and register spills
# (tests/nvrtc_check.rs). NVRTC comes from the nvidia-cuda-nvrtc wheel, installed into
# .venv-cuda (created on first use; later runs reuse it).
#
#   scripts/test-cuda-nvrtc.sh          # the CI check
#   scripts/test-cuda-nvrtc.sh --gpu    # also the #[ignore]d GPU tests (needs a GPU and its driver)
#
# Environment: PHENO_CUDA_VENV (venv path), PHENO_NVRTC_SPEC (pip requirement; default matches
# the cuda-13000 bindings; a CUDA 12 driver needs e.g. "nvidia-cuda-nvrtc-cu12==12.9.*").
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${PHENO_CUDA_VENV:-$root/.venv-cuda}"
spec="${PHENO_NVRTC_SPEC:-nvidia-cuda-nvrtc==13.0.*}"
gpu=0
for arg in "$@"; do
    case "$arg" in
        --gpu) gpu=1 ;;
        *) echo "usage: $0 [--gpu]" >&2; exit 2 ;;
    esac
done

python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    echo "== creating $venv"
    "$python" -m venv "$venv"
fi
# The marker records what was installed, so a changed spec reinstalls and an unchanged one is a no-op.
marker="$venv/.pheno-nvrtc-spec"
if [ "$(cat "$marker" 2>/dev/null)" != "$spec" ]; then
    echo "== pip install $spec"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$spec"
    echo "$spec" > "$marker"
fi

libdir="$("$venv/bin/python" - <<'EOF'
import glob, os, sysconfig
hits = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "**", "libnvrtc.so*"), recursive=True))
print(os.path.dirname(hits[0]) if hits else "")
EOF
)"
if [ -z "$libdir" ]; then
    echo "error: no libnvrtc.so* found in $venv after installing $spec" >&2
    exit 1
fi
echo "== NVRTC from $libdir"
export LD_LIBRARY_PATH="$libdir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# `cargo test --no-run` builds the library and the CLI binary with --features cuda, the same code as
# `cargo build --release --features cuda`, but with the dependency features `cargo test` resolves
# (dev-dependencies included), so the test runs below reuse it instead of rebuilding everything.
echo "== build with --features cuda (library, CLI, NVRTC check)"
cargo test --release --features cuda --no-run --test nvrtc_check

echo "== NVRTC check (sm_80, sm_90)"
cargo test --release --features cuda --test nvrtc_check -- --include-ignored
echo "== cargo test --features cuda --lib backend::cuda (allocator, graph pool, error mapping; no GPU needed)"
cargo test --release --features cuda --lib backend::cuda

if [ "$gpu" = 1 ]; then
    echo "== GPU tests"
    cargo test --release --features cuda --test cuda_ops -- --include-ignored
    cargo test --release --features cuda --test cuda_parity -- --include-ignored
fi
echo "== CUDA checks passed"
