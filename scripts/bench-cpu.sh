#!/usr/bin/env bash
# Side-by-side CPU benchmark of EfficientNet-B0 block6a_activation features: phenocore, PyTorch eager
# and ONNX Runtime (benches/effnet_cpu.py). Builds libphenocore (release), then runs the script with
# $BENCH_PYTHON; without it, with .venv-bench/bin/python, creating that venv and installing the peers
# into it when missing (PyTorch is a ~3 GB download; the CPU-only wheel index keeps it smaller, set
# BENCH_TORCH_INDEX="" to use PyPI's default wheels). Arguments go to the script:
#   scripts/bench-cpu.sh                          # batch 64, 2 threads, 5 timed runs
#   scripts/bench-cpu.sh --threads 8 --json out.json
#   BENCH_PYTHON=/path/to/venv/bin/python scripts/bench-cpu.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

cargo build --release

py="${BENCH_PYTHON:-}"
if [ -z "$py" ]; then
    venv="$root/.venv-bench"
    py="$venv/bin/python"
    if [ ! -x "$py" ]; then
        "${PYTHON:-python3}" -m venv "$venv"
        printf '*\n' > "$venv/.gitignore"  # keeps the venv out of git status
    fi
    if ! "$py" -c "import numpy, torch, torchvision, onnx, onnxruntime, onnxscript, safetensors" 2>/dev/null; then
        pip=("$py" -m pip install --quiet --disable-pip-version-check)
        torch_index="${BENCH_TORCH_INDEX-https://download.pytorch.org/whl/cpu}"
        if [ -n "$torch_index" ]; then
            "${pip[@]}" --index-url "$torch_index" torch torchvision
        fi
        "${pip[@]}" numpy torch torchvision onnx onnxruntime onnxscript safetensors
    fi
fi

# The script loads this checkout's bindings, which find target/release by themselves; point them at
# the library explicitly only when cargo builds elsewhere.
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
fi

"$py" benches/effnet_cpu.py "$@"
