"""Sphering side by side: phenocore vs pycytominer's Spherize vs a numpy implementation, in one process.

    python benches/sphering.py                       # fit on 2,000 controls, transform 20,000 wells, d 672
    python benches/sphering.py --fit 20000 --transform 200000
    python benches/sphering.py --threads 2 --reps 3 --method ZCA

Every contender fits ZCA on the same controls (standard normal with a random mixing, fixed seed) and
transforms the same wells; timings are fit + transform, median of `--reps` runs after one untimed warm-up.
phenocore runs in pycytominer mode (epsilon 1e-6 on singular values) so that its output can be compared
with Spherize's: the table reports the max relative difference. The numpy contender is REFERENCE §5 with
eigh (Σ/n, λ = 1e-3) and is compared with phenocore's eigenvalue mode. Thread counts are set through
OMP/MKL/OPENBLAS/RAYON_NUM_THREADS before numpy loads and through phenocore.set_num_threads. A missing
peer (pycytominer, pandas) is skipped with a note.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fit", type=int, default=2000, help="control profiles to fit on")
    p.add_argument("--transform", type=int, default=20000, help="profiles to transform")
    p.add_argument("--dim", type=int, default=672, help="features")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--method", default="ZCA", choices=["ZCA", "PCA", "ZCA-cor", "PCA-cor"])
    return p.parse_args()


def timed(fn, reps):
    fn()  # warm-up
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def main():
    args = parse()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bindings" / "python"))
    import phenocore

    phenocore.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    d = args.dim
    mix = rng.normal(size=(d, d)) / np.sqrt(d) + np.eye(d)
    controls = rng.normal(size=(args.fit, d)) @ mix + 5.0
    wells = rng.normal(size=(args.transform, d)) @ mix + 5.0
    print(
        f"sphering {args.method}: fit {args.fit} x {d}, transform {args.transform} x {d}, "
        f"{args.threads} threads, median of {args.reps}"
    )

    rows = []

    def phenocore_run(reg, lam):
        return lambda: phenocore.Sphering.fit(controls, lam=lam, method=args.method, regularization=reg).transform(
            wells
        )

    pc = timed(phenocore_run("pycytominer", 1e-6), args.reps)
    rows.append(("phenocore (pycytominer mode)", pc))
    pc_eig = timed(phenocore_run("eigenvalue", 1e-3), args.reps)
    rows.append(("phenocore (eigenvalue mode)", pc_eig))

    notes = []
    try:
        import pandas as pd
        from pycytominer.operations.transform import Spherize

        cols = [f"f{j}" for j in range(d)]
        cdf, wdf = pd.DataFrame(controls, columns=cols), pd.DataFrame(wells, columns=cols)

        def pyc():
            return Spherize(epsilon=1e-6, method=args.method, return_numpy=True).fit(cdf).transform(wdf)

        py = timed(pyc, args.reps)
        rows.append(("pycytominer Spherize", py))
        ref = py[3]
        if args.method.startswith("PCA"):
            notes.append("PCA: component signs differ between implementations; agreement not compared")
        else:
            diff = np.abs(pc[3] - ref).max() / np.abs(ref).max()
            notes.append(f"phenocore vs pycytominer: max relative difference {diff:.2e}")
    except ImportError as e:
        notes.append(f"pycytominer skipped ({e})")

    def numpy_ref():
        mu = controls.mean(axis=0)
        xc = controls - mu
        scale = xc.std(axis=0) if args.method.endswith("-cor") else np.ones(d)
        xc = xc / scale
        delta, u = np.linalg.eigh(xc.T @ xc / len(xc))
        w = 1.0 / np.sqrt(np.clip(delta, 0, None) + 1e-3)
        q = (u * w) @ u.T if args.method.startswith("ZCA") else w[:, None] * u.T
        return ((wells - mu) / scale) @ q.T

    nr = timed(numpy_ref, args.reps)
    rows.append(("numpy (eigh, REFERENCE §5)", nr))
    if args.method.startswith("ZCA"):
        diff = np.abs(pc_eig[3] - nr[3]).max() / np.abs(nr[3]).max()
        notes.append(f"phenocore vs numpy: max relative difference {diff:.2e}")

    base = rows[0][1][0]
    print(f"{'contender':32s} {'median s':>9s} {'min s':>8s} {'max s':>8s} {'vs phenocore':>13s}")
    for name, (med, lo, hi, _) in rows:
        print(f"{name:32s} {med:9.3f} {lo:8.3f} {hi:8.3f} {med / base:12.1f}x")
    for n in notes:
        print(n)


if __name__ == "__main__":
    main()
