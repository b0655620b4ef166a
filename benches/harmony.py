"""Harmony side by side: phenocore vs harmonypy 2.1.0, in one process, interleaved rounds.

    python benches/harmony.py                                   # 100,000 cells x 30 PCs, 8 batches
    python benches/harmony.py --cells 20000 --dim 50 --batches 24 --columns 2
    python benches/harmony.py --threads 2 --reps 3 --iterations 5

Synthetic PCs: 12 cell types (centres N(0, 3²)), each batch shifts all its cells (N(0, 1)), unit noise;
with `--columns 2` a second batch column (donors) adds its own shift. Both run with harmonypy's
defaults except that `--iterations` fixes the number of Harmony iterations (epsilon_harmony < 0 turns
the convergence stop off, so both do the same work). Timings: median wall time of `--reps`
interleaved rounds after one untimed warm-up of each, with the ratio harmonypy / phenocore; the
agreement line gives the correlation of the two corrected embeddings and their max difference
relative to the data's scale (the random initialisations differ, so they agree in distribution, not
bit for bit). Thread counts: harmonypy's `ncores` and phenocore.set_num_threads.
"""

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=30, help="PCs")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--columns", type=int, default=1, choices=[1, 2], help="batch columns")
    p.add_argument("--iterations", type=int, default=5, help="Harmony iterations (fixed)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    return p.parse_args()


def main():
    args = parse()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bindings" / "python"))
    import phenocore

    phenocore.set_num_threads(args.threads)
    try:
        import harmonypy
    except ImportError:
        harmonypy = None
        print("harmonypy is not installed: timing phenocore alone")
    logging.getLogger("harmonypy").setLevel(logging.WARNING)

    rng = np.random.default_rng(0)
    n, d = args.cells, args.dim
    types = rng.integers(0, 12, n)
    batch = rng.integers(0, args.batches, n)
    x = rng.normal(0, 3, (12, d))[types] + rng.normal(0, 1, (args.batches, d))[batch] + rng.normal(0, 1, (n, d))
    columns = {"plate": np.array([f"plate{b}" for b in batch])}
    if args.columns == 2:
        donor = rng.integers(0, 4, n)
        x += rng.normal(0, 0.7, (4, d))[donor]
        columns["donor"] = np.array([f"donor{q}" for q in donor])
    common = dict(max_iter_harmony=args.iterations, epsilon_harmony=-1.0)
    k = min(round(n / 30), 100)
    print(
        f"Harmony: {n} cells x {d} PCs, {len(columns)} batch column(s) ({args.batches} plates), K = {k}, "
        f"{args.iterations} iterations, {args.threads} threads"
    )

    def ours():
        return phenocore.harmony(x, columns if len(columns) > 1 else columns["plate"], **common)

    def theirs():
        h = harmonypy.run_harmony(x, columns, list(columns), verbose=False, ncores=args.threads, **common)
        return h.Z_corr

    contenders = [("phenocore", ours)] + ([("harmonypy 2.1.0", theirs)] if harmonypy else [])
    outputs = {name: fn() for name, fn in contenders}  # warm-up
    times = {name: [] for name, _ in contenders}
    for _ in range(args.reps):
        for name, fn in contenders:
            t0 = time.perf_counter()
            outputs[name] = fn()
            times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["phenocore"])
    for name, _ in contenders:
        t = statistics.median(times[name])
        print(f"  {name:16s} {t:8.3f} s  (min {min(times[name]):.3f}, max {max(times[name]):.3f})  {t / base:5.2f}x phenocore")
    if harmonypy:
        a, b = outputs["phenocore"], outputs["harmonypy 2.1.0"]
        r = np.corrcoef(a.ravel(), b.ravel())[0, 1]
        diff = np.abs(a - b).max() / np.abs(b).max()
        print(f"  agreement: r = {r:.6f}, max |difference| = {diff:.2e} of max |Z|")
        print(f"  speed-up vs harmonypy: {statistics.median(times['harmonypy 2.1.0']) / base:.2f}x")


if __name__ == "__main__":
    main()
