"""How the side-by-side bench scripts start phenocore's Rust bench programs.

By default `cargo bench --features cuda --bench NAME -- ARGS` from the repository root. With
`PHENOCORE_BENCH_BIN_DIR` set, the prebuilt program `$PHENOCORE_BENCH_BIN_DIR/NAME` is run with ARGS
instead: for a GPU machine with PyTorch but no Rust toolchain (`scripts/gpu-run.sh` stages them).
"""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def command(name: str, args: list) -> list:
    args = [str(a) for a in args]
    bin_dir = os.environ.get("PHENOCORE_BENCH_BIN_DIR")
    if bin_dir:
        return [str(Path(bin_dir) / name)] + args
    return ["cargo", "bench", "--features", "cuda", "--bench", name, "--"] + args
