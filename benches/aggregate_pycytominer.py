"""Aggregation side by side: phenocore vs pycytominer's `aggregate` (pandas groupby), in one process.

    python benches/aggregate_pycytominer.py                      # 200,000 cells x 672, 800 sites
    python benches/aggregate_pycytominer.py --cells 2000000 --sites 8000 --threads 2 --reps 3
    python benches/aggregate_pycytominer.py --npz                # also the streaming path over site files

Both contenders compute the same thing from the same float32 cells (standard normal, fixed seed, ~1 % of
the cells with a NaN): site medians with NaN cells dropped (`site`), and the paper's chain to well means
(`well`: pycytominer's aggregate median by plate/well/site, then mean by plate/well). pycytominer gets a
pandas DataFrame that is already built (its construction is not timed) with NaN rows already dropped;
phenocore gets the numpy array and a dict of metadata columns (the time to hand the metadata strings to
the library is included). Timings: median of `--reps` runs after one untimed warm-up; GB/s is the size of
the float32 feature matrix over the time. The table also gives the max relative difference of the
profiles. `--npz` writes the cells as per-site `.npz` files (`phenocore profile`'s layout, via numpy) and
times `phenocore.aggregate_npz` on them: that path is bound by inflating the deflate-compressed files.
Threads are set through OMP/MKL/OPENBLAS/RAYON_NUM_THREADS and phenocore.set_num_threads. A missing peer
(pycytominer, pandas) is skipped with a note.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=200_000)
    p.add_argument("--sites", type=int, default=800, help="sites (9 per well, wells on plates of 384)")
    p.add_argument("--dim", type=int, default=672)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--npz", action="store_true", help="also time the streaming path over .npz site files")
    return p.parse_args()


def timed(fn, reps):
    fn()  # warm-up
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times), out


def rel_diff(a, b):
    import numpy as np

    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-6)))


def main():
    args = parse()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bindings" / "python"))
    import phenocore

    phenocore.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    n, d = args.cells, args.dim
    x = rng.standard_normal((n, d), dtype=np.float32)
    x[rng.random(n) < 0.01, 0] = np.nan
    site = np.sort(rng.integers(0, args.sites, n))
    well = site // 9
    meta = {
        "Metadata_Plate": (well // 384).astype(str),
        "Metadata_Well": well.astype(str),
        "Metadata_Site": (site % 9).astype(str),
    }
    gb = x.nbytes / 1e9
    print(f"{n} cells x {d} float32 ({gb:.2f} GB), {args.sites} sites, {args.threads} threads, median of {args.reps}")
    rows = []

    feats = [f"Cells_f{j}" for j in range(d)]

    def ours(level):
        return phenocore.aggregate(x, meta, feature_names=feats, level=level, treatment=None)

    results = {}
    for level in ("site", "well"):
        med, lo, hi, out = timed(lambda: ours(level), args.reps)
        results[level] = out
        rows.append((f"phenocore {level}", med, lo, hi, ""))

    try:
        import pandas as pd
        import pycytominer
    except ImportError as e:
        print(f"(pycytominer/pandas not installed, skipped: {e})")
        pd = None
    if pd is not None:
        df = pd.concat([pd.DataFrame(meta), pd.DataFrame(x, columns=feats)], axis=1)
        clean = df.dropna(subset=feats)
        keys_s = ["Metadata_Plate", "Metadata_Well", "Metadata_Site"]

        def peer(level):
            s = pycytominer.aggregate(clean, strata=keys_s, features=feats, operation="median")
            if level == "site":
                return s
            return pycytominer.aggregate(s, strata=keys_s[:2], features=feats, operation="mean")

        for level in ("site", "well"):
            med, lo, hi, out = timed(lambda: peer(level), args.reps)
            # Align by keys: the same groups, compared value by value.
            keys = keys_s[: 3 if level == "site" else 2]
            merged = out.merge(results[level].to_pandas(), on=keys, suffixes=("", "_pc"))
            assert len(merged) == len(out) == len(results[level]), "different groups"
            diff = rel_diff(merged[[f + "_pc" for f in feats]].to_numpy(), merged[feats].to_numpy())
            rows.append((f"pycytominer {level}", med, lo, hi, f"max rel diff {diff:.1e}"))

    if args.npz:
        with tempfile.TemporaryDirectory() as tmp:
            for s in np.unique(site):
                idx = np.flatnonzero(site == s)
                p = Path(tmp) / f"P{well[idx[0]] // 384}" / f"{well[idx[0]]}_{s % 9}.npz"
                p.parent.mkdir(parents=True, exist_ok=True)
                kv = [f"{k}={v[idx[0]]}" for k, v in meta.items()]
                np.savez_compressed(p, features=x[idx], locations=np.zeros((len(idx), 2), np.float32), metadata=np.array(kv))
            med, lo, hi, out = timed(lambda: phenocore.aggregate_npz(tmp, level="well", treatment=None), args.reps)
            rows.append(("phenocore npz well", med, lo, hi, f"max rel diff vs in-memory {rel_diff(out.features, results['well'].features):.1e}"))

    print(f"{'contender':<24}{'median s':>10}{'min s':>9}{'max s':>9}{'GB/s':>8}  note")
    for name, med, lo, hi, note in rows:
        print(f"{name:<24}{med:>10.3f}{lo:>9.3f}{hi:>9.3f}{gb / med:>8.2f}  {note}")
    base = {r[0]: r[1] for r in rows}
    for level in ("site", "well"):
        if f"pycytominer {level}" in base:
            print(f"{level}: phenocore {base[f'pycytominer {level}'] / base[f'phenocore {level}']:.1f}x faster than pycytominer")


if __name__ == "__main__":
    main()
