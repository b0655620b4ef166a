"""copairs-mode mAP with permutation p-values: phenocore vs copairs, side by side on the same data.

    cargo build --release
    python benches/map_copairs.py --n 5000 --null-size 10000           # both, 5,000 profiles x 672
    python benches/map_copairs.py --n 10000 --null-size 1000           # issue [profiling] item 11
    python benches/map_copairs.py --n 100000 --null-size 1000 --only phenocore   # memory stays bounded

Data: `--n` treatment profiles x `--d` features (float64) drawn around MoA centroids; MoA class sizes
follow a heavy-tailed (Zipf-like) distribution from 2 to ~100 members, `--unlabelled` of the profiles
have no annotation (negatives in every library, never queries), one label per profile (copairs'
regular API: positives share the label, negatives differ). Both compute, for every profile, copairs'
AP (ties in favour of positives) and its p-value against `--null-size` random rankings per
(#positives, library size), plus Benjamini-Hochberg q-values (copairs' AP + p_values; statsmodels
for BH). Each contender runs in its own subprocess; its peak RSS (VmHWM) is restarted after the data are made,
so it is the peak during the contender's call (the process's RSS with the data is printed too); copairs'
null cache goes to a fresh temporary HOME so it never reuses a previous run. Prints times, the ratio,
peak RSS and the largest AP difference (must be <= 1e-12) and p-value agreement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_data(n: int, d: int, unlabelled: float, seed: int):
    rng = np.random.default_rng(seed)
    sizes = []
    while sum(sizes) < n * (1 - unlabelled):
        sizes.append(int(min(100, 2 + rng.zipf(1.8))))
    labels = []
    for c, s in enumerate(sizes):
        labels += [f"moa{c}"] * s
    labels = labels[: int(n * (1 - unlabelled))]
    labels += [""] * (n - len(labels))
    labels = np.array(labels, dtype=object)
    rng.shuffle(labels)
    centers = {lab: rng.normal(0, 1, d) for lab in sorted(set(labels)) if lab}  # sorted: set order varies per process
    signal = np.stack([centers[lab] if lab else np.zeros(d) for lab in labels])
    x = 0.35 * signal + rng.normal(0, 1, (n, d))
    return x, [str(s) for s in labels]


def status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> bool:
    """Restarts VmHWM at the current RSS (Linux clear_refs 5), so the peak is the contender's, not the
    data generation's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_phenocore(x, labels, null_size, seed, threads):
    sys.path.insert(0, str(ROOT / "bindings" / "python"))
    import phenocore

    phenocore.set_num_threads(threads)
    t = time.perf_counter()
    r = phenocore.metrics.mean_average_precision(x, labels, "copairs", null_size=null_size, seed=seed)
    seconds = time.perf_counter() - t
    return seconds, r.per_query, r.p_values, r.q_values, phenocore.__version__


def run_copairs(x, labels, null_size, seed):
    os.environ["HOME"] = tempfile.mkdtemp()  # copairs caches nulls under ~/.copairs
    import copairs
    import pandas as pd
    from copairs.map import average_precision
    from copairs.map.average_precision import p_values
    from statsmodels.stats.multitest import multipletests

    meta = pd.DataFrame({"label": [s if s else f"__none{i}" for i, s in enumerate(labels)]})
    t = time.perf_counter()
    ap = average_precision(meta, x, pos_sameby=["label"], pos_diffby=[], neg_sameby=[], neg_diffby=["label"],
                           progress_bar=False)
    t_ap = time.perf_counter() - t
    p = p_values(ap, null_size=null_size, seed=seed, progress_bar=False).astype(np.float64)
    ok = ~np.isnan(p)
    q = np.full_like(p, np.nan)
    q[ok] = multipletests(p[ok], method="fdr_bh")[1]
    seconds = time.perf_counter() - t
    version = getattr(copairs, "__version__", None)
    if version is None:
        from importlib.metadata import version as v

        version = v("copairs")
    return seconds, ap["average_precision"].to_numpy(np.float64), p, q, f"{version} (AP part {t_ap:.1f} s)"


def child(args):
    x, labels = make_data(args.n, args.d, args.unlabelled, args.seed)
    import gc

    gc.collect()
    data_mib = status_mib("VmRSS")
    reset = reset_peak_rss()
    if args.child == "phenocore":
        seconds, ap, p, q, version = run_phenocore(x, labels, args.null_size, args.seed, args.threads)
    else:
        seconds, ap, p, q, version = run_copairs(x, labels, args.null_size, args.seed)
    out = Path(args.out)
    np.savez(out.with_suffix(".npz"), ap=ap, p=p, q=q)
    out.write_text(json.dumps({"seconds": seconds, "rss_mib": status_mib("VmHWM"), "data_mib": data_mib,
                               "peak_reset": reset, "version": version}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--d", type=int, default=672)
    ap.add_argument("--null-size", type=int, default=10000)
    ap.add_argument("--unlabelled", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", choices=["phenocore", "copairs"])
    ap.add_argument("--child", choices=["phenocore", "copairs"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)

    x, labels = make_data(args.n, args.d, args.unlabelled, args.seed)
    counts = Counter(labels)
    queries = sum(1 for s in labels if s and counts[s] > 1)
    print(f"{args.n} profiles x {args.d} features, {len(set(labels)) - 1} MoAs, "
          f"{sum(1 for s in labels if not s)} unannotated, null_size {args.null_size}, seed {args.seed}, "
          f"{args.threads} threads; {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}, {queries} queries")
    results = {}
    tmp = Path(tempfile.mkdtemp())
    for who in [w for w in ("phenocore", "copairs") if args.only in (None, w)]:
        out = tmp / f"{who}.json"
        cmd = [sys.executable, __file__, "--child", who, "--out", str(out), "--n", str(args.n), "--d", str(args.d),
               "--null-size", str(args.null_size), "--unlabelled", str(args.unlabelled), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
        done = subprocess.run(cmd, env=env)
        if done.returncode != 0:
            print(f"{who}: failed (exit {done.returncode}; out of memory?)")
            continue
        info = json.loads(out.read_text())
        arrays = np.load(out.with_suffix(".npz"))
        results[who] = (info, arrays)
        since = "during the call" if info["peak_reset"] else "incl. data generation"
        print(f"{who:>9} {info['version']}: {info['seconds']:.2f} s, peak RSS {info['rss_mib']:.0f} MiB {since} "
              f"(process with the data before the call: {info['data_mib']:.0f} MiB)")
    if len(results) == 2:
        (a, pa), (b, pb) = results["phenocore"], results["copairs"]
        print(f"speed-up phenocore / copairs: x {b['seconds'] / a['seconds']:.1f}; peak RSS x "
              f"{a['rss_mib'] / b['rss_mib']:.2f}")
        ok = ~np.isnan(pb["ap"])
        assert np.array_equal(ok, ~np.isnan(pa["ap"])), "different query sets"
        diff = np.abs(pa["ap"][ok] - pb["ap"][ok])
        print(f"AP: max |phenocore - copairs| = {diff.max():.1e} over {ok.sum()} queries "
              f"({np.sum(diff > 1e-12)} above 1e-12); mAP {pa['ap'][ok].mean():.6f} vs {pb['ap'][ok].mean():.6f}")
        # Two independent nulls (different RNGs): the difference of two binomial estimates has variance
        # 2 p (1 - p) / null_size. Every query with the same number of positives shares one null, so
        # the check is per configuration.
        p, q = pa["p"][ok], pb["p"][ok]
        pbar = (p + q) / 2
        tol = 4 * np.sqrt(2 * pbar * (1 - pbar) / args.null_size) + 1 / args.null_size
        npos = np.array([counts[s] - 1 for s in labels])[ok]
        bad = set(npos[np.abs(p - q) > tol])
        print(f"p-values: {np.sum(np.abs(p - q) <= tol)} / {ok.sum()} queries within 4 sd of the difference of "
              f"two Monte-Carlo estimates + 1/null_size ({len(bad)} of {len(set(npos))} null configurations "
              f"outside); max |diff| {np.abs(p - q).max():.2e}; q < 0.05: {np.sum(pa['q'][ok] < 0.05)} vs "
              f"{np.sum(pb['q'][ok] < 0.05)}")
        if diff.max() > 1e-12:
            sys.exit(1)


if __name__ == "__main__":
    main()
