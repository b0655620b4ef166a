#!/usr/bin/env python3
"""Side-by-side CPU training-step throughput of EfficientNet-B0: phenocore vs PyTorch eager.

    python benches/train_step.py [--batch 64] [--classes 490] [--size 128] [--channels 5]
                                 [--threads 2] [--steps 5] [--warmup 1]
                                 [--skip-torch] [--skip-phenocore] [--phenocore-bin PATH] [--json out.json]

The workload (the issue's performance target): one SGD training step on a batch of `--batch`
uniform random crops `--channels` × `--size` × `--size` (float32, fixed seed) with random labels over
`--classes` classes: forward in training mode (batch-statistics BN, classifier dropout 0.2, stochastic
depth 0.2 as torchvision's defaults), cross-entropy (mean, no label smoothing), backward, and
SGD(lr 0.005, momentum 0.9, Nesterov, weight decay 1e-5) on every parameter.

Each side runs in its own fresh child process, one after the other, so its peak RSS is its own:
- **torch**: `python benches/train_step.py --worker torch ...`: torchvision `efficientnet_b0(num_classes=C)`
  with its default initialisation and the stem replaced by a `channels`-input conv, float32, NCHW,
  `model.train()`, `torch.set_num_threads(T)`, `torch.set_num_interop_threads(1)`;
  each step is `zero_grad(set_to_none=True)`, forward, `F.cross_entropy`, backward, `opt.step()`.
- **phenocore**: `target/release/phenocore bench-train --batch N --classes C --size S --channels CH
  --steps S --warmup W --threads T` (or `--phenocore-bin`).
Both children get `OMP_NUM_THREADS`, `MKL_NUM_THREADS`, `OPENBLAS_NUM_THREADS` and `RAYON_NUM_THREADS`
set to T, make `--warmup` untimed steps and then `--steps` timed ones, and print one JSON line last:
`{"crops_per_s": ..., "step_s": [...], "peak_rss_mib": ...}` where crops_per_s = batch · steps / Σ step_s
and peak_rss_mib is the process's own VmHWM (/proc/self/status) read at the end (the torch worker also
reports `setup_rss_mib`, the RSS once torch, the model and the batch were loaded, and the losses).

The table gives crops/s, the median and the min–max seconds per step and the peak RSS of each side,
then the phenocore/torch ratios (throughput: > 1 means phenocore is faster; RSS: < 1 means it uses
less). If the phenocore binary is missing or fails, its stderr is printed and the torch side is still
reported; the exit status is non-zero when a side that was asked for failed.

Busy machines: torch's OpenMP pool spin-waits between parallel regions and collapses when the
machine has fewer free cores than threads; the script warns when the load average plus the thread
count exceeds the core count, and `--no-spin` sets `OMP_WAIT_POLICY=PASSIVE` for both children.
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
LR, MOMENTUM, WEIGHT_DECAY = 0.005, 0.9, 1e-5
SEED = 20241121


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--classes", type=int, default=490)
    p.add_argument("--size", type=int, default=128, help="crop side in pixels")
    p.add_argument("--channels", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-phenocore", action="store_true")
    p.add_argument("--phenocore-bin", default=str(ROOT / "target" / "release" / "phenocore"))
    p.add_argument("--no-spin", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for both children")
    p.add_argument("--json", help="also write config, machine and results to this file")
    p.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "classes", "size", "channels", "threads", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


def vm_kib(field: str) -> float | None:
    """A `VmXXX:` line of /proc/self/status in KiB (Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    hwm = vm_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


# ---- the torch child -----------------------------------------------------------------------------------


def torch_worker(args) -> None:
    import numpy as np
    import torch
    import torch.nn.functional as F
    import torchvision
    from torch import nn

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(SEED)  # initialisation, dropout and stochastic-depth masks
    model = torchvision.models.efficientnet_b0(num_classes=args.classes)  # dropout 0.2, stochastic depth 0.2
    model.features[0][0] = nn.Conv2d(args.channels, 32, kernel_size=3, stride=2, padding=1, bias=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    rng = np.random.default_rng(SEED)
    x = torch.from_numpy(rng.random((args.batch, args.channels, args.size, args.size), dtype=np.float32))
    y = torch.from_numpy(rng.integers(0, args.classes, args.batch))
    setup_rss = (vm_kib("VmRSS") or 0.0) / 1024

    step_s, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if i >= args.warmup:
            step_s.append(dt)
        print(f"torch step {i + 1}/{args.warmup + args.steps}: {dt:.3f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    result = {
        "crops_per_s": args.batch * len(step_s) / sum(step_s),
        "step_s": step_s,
        "peak_rss_mib": peak_rss_mib(),
        "setup_rss_mib": setup_rss,
        "loss": losses,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
    }
    print(json.dumps(result), flush=True)


# ---- the parent ------------------------------------------------------------------------------------------


def child_env(args) -> dict:
    env = dict(os.environ)
    for var in THREAD_ENV:
        env[var] = str(args.threads)
    if args.no_spin:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def run_child(side: str, cmd: list, args) -> dict:
    """Runs one side in a fresh process; returns its JSON result, or {"error": ...}."""
    print(f"[{side}] {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        # stderr (progress lines) is printed after the child ends; stdout is parsed for the last JSON line.
        proc = subprocess.run(cmd, env=child_env(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except OSError as e:
        return {"error": f"could not start {cmd[0]}: {e}"}
    wall = time.perf_counter() - t0
    if proc.returncode == 0 and proc.stderr.strip():  # a failure's stderr is printed after the table
        print(f"[{side}] stderr:\n" + "\n".join("    " + line for line in proc.stderr.rstrip().splitlines()), flush=True)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "stderr": proc.stderr, "stdout": proc.stdout}
    for line in reversed(proc.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                result = json.loads(line)
            except json.JSONDecodeError:
                break
            missing = [k for k in ("crops_per_s", "step_s", "peak_rss_mib") if k not in result]
            if missing:
                return {"error": f"result line lacks {missing}: {line}"}
            result["wall_s"] = wall
            return result
    return {"error": "no JSON result line on stdout", "stdout": proc.stdout}


def fmt_row(side: str, r: dict) -> str:
    if "error" in r:
        return f"{side:10s}  {'failed: ' + r['error']}"
    steps = r["step_s"] or [float("nan")]
    med = statistics.median(steps)
    setup = f"{r['setup_rss_mib']:10.0f}" if "setup_rss_mib" in r else f"{'-':>10s}"
    return f"{side:10s} {r['crops_per_s']:9.2f} {med:9.3f} {min(steps):7.3f}–{max(steps):<7.3f} {r['peak_rss_mib']:10.0f} {setup}"


def main() -> int:
    args = parse()
    if args.worker == "torch":
        torch_worker(args)
        return 0

    ncpu = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    print(
        f"EfficientNet-B0 SGD training step: batch {args.batch}, {args.channels}×{args.size}×{args.size} crops, "
        f"{args.classes} classes, {args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps; "
        f"{ncpu} CPUs, load {load:.2f}",
        flush=True,
    )
    if args.threads > 1 and load + args.threads > ncpu and not args.no_spin:
        print(f"warning: load {load:.1f} + {args.threads} threads > {ncpu} cores: spinning thread pools may collapse (try --no-spin)")

    shared = ["--batch", str(args.batch), "--classes", str(args.classes), "--size", str(args.size)]
    shared += ["--channels", str(args.channels), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    shared += ["--threads", str(args.threads)]
    results = {}
    if not args.skip_phenocore:
        binary = Path(args.phenocore_bin)
        if not binary.is_file():
            results["phenocore"] = {"error": f"{binary} not found (cargo build --release)"}
            print(f"[phenocore] {results['phenocore']['error']}")
        else:
            results["phenocore"] = run_child("phenocore", [str(binary), "bench-train", *shared], args)
    if not args.skip_torch:
        results["torch"] = run_child("torch", [sys.executable, str(Path(__file__).resolve()), "--worker", "torch", *shared], args)

    print()
    print(f"{'side':10s} {'crops/s':>9s} {'s/step':>9s} {'min–max s/step':>15s} {'peak MiB':>10s} {'setup MiB':>10s}")
    for side, r in results.items():
        print(fmt_row(side, r))
    pc, th = results.get("phenocore", {}), results.get("torch", {})
    ratios = {}
    if pc and th and "error" not in pc and "error" not in th:
        ratios = {
            "crops_per_s": pc["crops_per_s"] / th["crops_per_s"],
            "peak_rss": pc["peak_rss_mib"] / th["peak_rss_mib"],
        }
        print(
            f"phenocore/torch: throughput {ratios['crops_per_s']:.2f}× (> 1: phenocore faster), "
            f"peak RSS {ratios['peak_rss']:.2f}× (< 1: phenocore smaller)"
        )
    for side, r in results.items():
        if "error" in r and r.get("stderr"):
            print(f"\n[{side}] failed ({r['error']}); its stderr:\n{r['stderr'].rstrip()}")

    if args.json:
        out = {
            "config": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
            "machine": {"cpus": ncpu, "load_1min": load, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
            "results": results,
            "ratios_phenocore_over_torch": ratios,
        }
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
