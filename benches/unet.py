#!/usr/bin/env python3
"""Side-by-side CPU timing of the LDM paper's diffusion U-Net: phenocore vs MONAI/PyTorch eager.

    python benches/unet.py [--batch 2] [--size 48] [--context-len 1] [--threads 2] [--iters 3]
                           [--warmup 2] [--mode both|forward|train] [--skip-torch] [--skip-phenocore]
                           [--phenocore-bin PATH] [--json out.json]

The model (REFERENCE §10, issue 5 item 8): MONAI `DiffusionModelUNet(spatial_dims=2, in_channels=8,
out_channels=8, num_res_blocks=2, channels=(256, 512, 768), attention_levels=(False, True, True),
num_head_channels=(0, 512, 768), with_conditioning=True, cross_attention_dim=512,
norm_num_groups=32)`: 256.3 M parameters, one head per attention block. Input: `--batch` random
latents 8 × `--size` × `--size`, timesteps 100 + 400·i, a random context of `--context-len`
tokens × 512 (the compound embedding).

- forward: inference (torch: `model.eval()` under `torch.no_grad()`; phenocore: `DiffusionUNet::predict`,
  a no-grad tape);
- train: forward in training mode + MSE against a random target + backward (gradients of every
  parameter; no optimiser step) — torch: `zero_grad(set_to_none=True)`, forward, `F.mse_loss`,
  `backward()`; phenocore: the tape forward, `mse_loss`, `Tape::backward`.

Each side and each mode runs in its own child process (its peak RSS is its own, per mode): torch
via `--worker torch`, phenocore via `target/release/phenocore bench-unet` (or `--phenocore-bin`). Both get
OMP/MKL/OPENBLAS/RAYON thread counts = `--threads`, make `--warmup` untimed iterations and then
`--iters` timed ones, and print one JSON line. Two warm-up iterations by default: phenocore's
steady state starts at the third training step (parameters hold the first step's gradients until
the second step's `zero_grad` hands them back to the buffer pool). The table gives seconds per sample (median of the
per-iteration times / batch) and peak RSS, then phenocore's speed-up (torch time / phenocore time,
> 1 = phenocore faster) and RSS ratio (< 1 = phenocore uses less).
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
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--context-len", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mode", default="both", choices=["both", "forward", "train"])
    p.add_argument("--skip-torch", action="store_true")
    p.add_argument("--skip-phenocore", action="store_true")
    p.add_argument("--phenocore-bin", default=str(ROOT / "target" / "release" / "phenocore"))
    p.add_argument("--json")
    p.add_argument("--worker", choices=["torch"], help=argparse.SUPPRESS)
    return p.parse_args(argv)


def vm_hwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def torch_worker(a):
    import torch
    import torch.nn.functional as F
    from monai.networks.nets import DiffusionModelUNet

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(7)
    model = DiffusionModelUNet(
        spatial_dims=2, in_channels=8, out_channels=8, num_res_blocks=2, channels=(256, 512, 768),
        attention_levels=(False, True, True), num_head_channels=(0, 512, 768), with_conditioning=True,
        cross_attention_dim=512, norm_num_groups=32,
    )
    n, s = a.batch, a.size
    x = torch.randn(n, 8, s, s)
    ctx = torch.randn(n, a.context_len, 512)
    target = torch.randn(n, 8, s, s)
    ts = torch.tensor([100 + 400 * i for i in range(n)], dtype=torch.long)
    fwd, train = [], []
    for i in range(a.warmup + a.iters):
        if a.mode in ("both", "forward"):
            model.eval()
            t = time.perf_counter()
            with torch.no_grad():
                y = model(x, ts, context=ctx)
            dt = time.perf_counter() - t
            print(f"forward {i}: {dt:.3f} s", file=sys.stderr)
            if i >= a.warmup:
                fwd.append(dt)
        if a.mode in ("both", "train"):
            model.train()
            t = time.perf_counter()
            model.zero_grad(set_to_none=True)
            y = model(x, ts, context=ctx)
            loss = F.mse_loss(y, target)
            loss.backward()
            dt = time.perf_counter() - t
            print(f"forward+backward {i}: {dt:.3f} s (loss {loss.item():.5f})", file=sys.stderr)
            if i >= a.warmup:
                train.append(dt)
    print(json.dumps({"side": "torch", "forward_s": fwd, "train_s": train, "batch": n,
                      "peak_rss_mib": vm_hwm_mib(), "threads": torch.get_num_threads(),
                      "parameters": sum(p.numel() for p in model.parameters()), "torch": torch.__version__}))


def child(cmd, threads):
    env = dict(os.environ)
    for k in THREAD_ENV:
        env[k] = str(threads)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    a = parse(argv)
    if a.worker == "torch":
        torch_worker(a)
        return 0
    load = os.getloadavg()[0]
    if load + a.threads > (os.cpu_count() or 1) + 0.5:
        print(f"warning: load average {load:.2f} with {a.threads} threads on {os.cpu_count()} cores: "
              "timings will be inflated", file=sys.stderr)
    modes = ["forward", "train"] if a.mode == "both" else [a.mode]
    res, failed = {}, False
    sides = [s for s, skip in (("phenocore", a.skip_phenocore), ("torch", a.skip_torch)) if not skip]
    for side in sides:
        merged = {"forward_s": [], "train_s": [], "batch": a.batch, "peak_rss_mib": {}}
        for mode in modes:
            common = ["--batch", str(a.batch), "--size", str(a.size), "--context-len", str(a.context_len),
                      "--iters", str(a.iters), "--warmup", str(a.warmup), "--mode", mode, "--threads", str(a.threads)]
            cmd = ([a.phenocore_bin, "bench-unet", *common] if side == "phenocore"
                   else [sys.executable, __file__, "--worker", "torch", *common])
            r = child(cmd, a.threads)
            if r is None:
                merged = None
                break
            key = "forward_s" if mode == "forward" else "train_s"
            merged[key] = r[key]
            merged["peak_rss_mib"][mode] = r["peak_rss_mib"]
        res[side] = merged
        failed |= merged is None
    print(f"LDM U-Net (256/512/768, cross-attention 512), batch {a.batch}, 8 x {a.size} x {a.size}, "
          f"{a.threads} threads, {a.iters} timed iterations")
    print(f"{'side':<10} {'forward s/sample':>17} {'fwd+bwd s/sample':>17} {'RSS fwd MiB':>12} {'RSS train MiB':>14}")
    med = {}
    nan = float("nan")
    for side, r in res.items():
        if r is None:
            print(f"{side:<10} failed")
            continue
        f = statistics.median(r["forward_s"]) / r["batch"] if r["forward_s"] else nan
        t = statistics.median(r["train_s"]) / r["batch"] if r["train_s"] else nan
        rf, rt = r["peak_rss_mib"].get("forward", nan), r["peak_rss_mib"].get("train", nan)
        med[side] = (f, t, rf, rt)
        print(f"{side:<10} {f:>17.3f} {t:>17.3f} {rf:>12.0f} {rt:>14.0f}")
    if "phenocore" in med and "torch" in med:
        p, t = med["phenocore"], med["torch"]
        print(f"speed-up (torch / phenocore): forward {t[0] / p[0]:.2f}x, forward+backward {t[1] / p[1]:.2f}x; "
              f"peak RSS ratio forward {p[2] / t[2]:.2f}, forward+backward {p[3] / t[3]:.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
