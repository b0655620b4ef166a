"""How the side-by-side bench scripts start phenocore's Rust bench programs.

By default `cargo bench --features cuda --bench NAME -- ARGS` from the repository root. With
`PHENOCORE_BENCH_BIN_DIR` set, the prebuilt program `$PHENOCORE_BENCH_BIN_DIR/NAME` is run with ARGS
instead: for a GPU machine with PyTorch but no Rust toolchain (`scripts/gpu-run.sh` stages them).

With `PHENOCORE_CUDA_PROFILE=1` the Rust programs time every kernel (src/backend/cuda/profile.rs)
and print a table of GPU time by kernel on stderr, which `run` passes on.
"""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(name: str, args: list) -> list:
    args = [str(a) for a in args]
    bin_dir = os.environ.get("PHENOCORE_BENCH_BIN_DIR")
    if bin_dir:
        return [str(Path(bin_dir) / name)] + args
    return ["cargo", "bench", "--features", "cuda", "--bench", name, "--"] + args


def run(name: str, args: list) -> subprocess.CompletedProcess:
    """Runs the bench program `name` from the repository root, its output captured."""
    res = subprocess.run(command(name, args), cwd=ROOT, capture_output=True, text=True)
    if res.returncode == 0 and os.environ.get("PHENOCORE_CUDA_PROFILE", "0") not in ("", "0"):
        sys.stderr.write(f"-- {name} {' '.join(str(a) for a in args)}\n{res.stderr}")
    return res
