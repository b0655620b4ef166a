#!/usr/bin/env python3
"""Multi-head scaled-dot-product attention on the CPU: phenocore `ops::attention` vs PyTorch SDPA.

    python benches/attention.py [--n 2] [--l 576] [--lk L] [--c 512] [--heads 8] [--threads 2]
                                [--reps 7] [--rounds 3] [--skip-torch] [--skip-phenocore]

The workload (the U-Net's attention at 24 × 24 latents): q, k, v of shape [N, L, C] (uniform in
[-1, 1), float32; k, v of length `--lk`, default L), `--heads` heads of C / heads channels, scale
1/sqrt(D), no mask.
- **forward**: the output only (phenocore: inputs that need no gradient, so nothing is saved for
  backward; torch: `torch.no_grad()`).
- **forward+backward**: forward recording what backward needs, then the gradients of q, k and v for
  a random output gradient.
- **torch**: `F.scaled_dot_product_attention` on `x.view(N, L, H, D).transpose(1, 2)` (the layout
  change MONAI/diffusers make), the result transposed back to [N, L, C]; `torch.set_num_threads(T)`,
  `set_num_interop_threads(1)`. On the CPU torch picks its flash-attention kernel for this call.
- **phenocore**: the `bench_timing` test of tests/attention_ops.rs (ignored by default), built with
  `cargo test --release --no-run` once, its binary run with `ATTN_BENCH="N L LK C H REPS"`; it builds the tape, runs the op and
  (forward+backward) `Tape::backward_with` from Rust, copying the inputs in each repetition.
Every child gets OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS and RAYON_NUM_THREADS = T, makes
one untimed warm-up repetition, then `--reps` timed ones, and prints the median seconds as JSON.
The two sides alternate for `--rounds` rounds (each round a fresh process per side); the table gives the
best and the median of the per-round medians, and the torch / phenocore ratio of the best times
(> 1: phenocore faster). The best time is the least disturbed by other load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2)
    p.add_argument("--l", type=int, default=576)
    p.add_argument("--lk", type=int, default=None, help="key/value length (default: L, self-attention)")
    p.add_argument("--c", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-phenocore", action="store_true")
    p.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.lk is None:
        a.lk = a.l
    if a.c % a.heads:
        p.error("--c must be a multiple of --heads")
    return a


def torch_worker(a):
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    g = torch.Generator().manual_seed(0)
    n, l, lk, c, h = a.n, a.l, a.lk, a.c, a.heads
    q, k, v = (torch.rand(n, ln, c, generator=g) * 2 - 1 for ln in (l, lk, lk))
    grad = torch.rand(n, l, c, generator=g) * 2 - 1

    def heads(x):
        return x.view(x.shape[0], x.shape[1], h, c // h).transpose(1, 2)

    def attn(q, k, v):
        return F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(n, l, c)

    fwd, both = [], []
    for _ in range(a.reps + 1):
        t = time.perf_counter()
        with torch.no_grad():
            attn(q, k, v)
        fwd.append(time.perf_counter() - t)
        t = time.perf_counter()
        qq, kk, vv = (x.clone().requires_grad_(True) for x in (q, k, v))
        attn(qq, kk, vv).backward(grad)
        both.append(time.perf_counter() - t)
    print(json.dumps({"fwd_s": statistics.median(fwd[1:]), "fwd_bwd_s": statistics.median(both[1:]),
                      "torch": torch.__version__}))


def child_env(a):
    env = dict(os.environ)
    for k in THREAD_ENV:
        env[k] = str(a.threads)
    return env


def last_json(out: str):
    for line in reversed(out.splitlines()):
        if "{" in line and "fwd_s" in line:
            return json.loads(line[line.index("{"):line.rindex("}") + 1])
    raise RuntimeError("no JSON line in the child's output:\n" + out[-2000:])


def run_torch(a):
    cmd = [sys.executable, __file__, "--worker", "torch", "--n", str(a.n), "--l", str(a.l), "--lk", str(a.lk),
           "--c", str(a.c), "--heads", str(a.heads), "--threads", str(a.threads), "--reps", str(a.reps)]
    r = subprocess.run(cmd, env=child_env(a), capture_output=True, text=True, check=True)
    return last_json(r.stdout)


def build_phenocore():
    """Builds the test binary once (cargo test --release --no-run) and returns its path."""
    cmd = ["cargo", "test", "--release", "--test", "attention_ops", "--no-run", "--message-format=json"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True)
    for line in r.stdout.splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("target", {}).get("name") == "attention_ops" \
                and msg.get("executable"):
            return msg["executable"]
    raise RuntimeError("cargo did not report the attention_ops test executable")


def run_phenocore(a):
    env = child_env(a)
    env["ATTN_BENCH"] = f"{a.n} {a.l} {a.lk} {a.c} {a.heads} {a.reps}"
    cmd = [a.exe, "bench_timing", "--ignored", "--nocapture", "--test-threads", "1"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return last_json(r.stdout)


def main():
    a = parse()
    if a.worker == "torch":
        return torch_worker(a)
    if not a.skip_phenocore:
        a.exe = build_phenocore()
    try:
        load = os.getloadavg()[0]
        if load + a.threads > (os.cpu_count() or 1):
            print(f"warning: load average {load:.1f} + {a.threads} threads > {os.cpu_count()} cores: "
                  "timings will be noisy", file=sys.stderr)
    except OSError:
        pass
    sides = [s for s, skip in (("phenocore", a.skip_phenocore), ("torch", a.skip_torch)) if not skip]
    res = {s: [] for s in sides}
    for _ in range(a.rounds):
        for s in sides:
            res[s].append(run_phenocore(a) if s == "phenocore" else run_torch(a))
    print(f"attention N={a.n} L={a.l} Lk={a.lk} C={a.c} heads={a.heads} (D={a.c // a.heads}), "
          f"{a.threads} threads, {a.rounds} rounds x {a.reps} reps")
    best = {}
    for s in sides:
        for key, name in (("fwd_s", "forward"), ("fwd_bwd_s", "forward+backward")):
            t = [r[key] for r in res[s]]
            best[(s, key)] = min(t)
            print(f"  {s:9s} {name:17s} best {min(t) * 1e3:8.2f} ms   median {statistics.median(t) * 1e3:8.2f} ms")
    if len(sides) == 2:
        for key, name in (("fwd_s", "forward"), ("fwd_bwd_s", "forward+backward")):
            print(f"  torch / phenocore {name}: {best[('torch', key)] / best[('phenocore', key)]:.2f}x")


if __name__ == "__main__":
    main()
