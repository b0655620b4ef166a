#!/usr/bin/env python3
"""Side-by-side CPU throughput of EfficientNet-B0 feature extraction: phenocore, PyTorch eager and
ONNX Runtime on the same crops, weights and thread count.

    python benches/effnet_cpu.py [--batch 64] [--threads 2] [--reps 5] [--warmup 1] [--json out.json]

Every contender computes the same tensor: `block6a_activation` (torchvision `features.6.0.block.1`,
block 6a's depthwise conv + BN + SiLU) mean-pooled over space, (N, 672). phenocore stops its pass after
that layer; torch runs a module truncated at the same point (features[0:6], then
features[6][0].block[0:2], then the mean), and ONNX Runtime runs that truncated module exported to ONNX.
Each contender runs in its own child process, so its peak RSS is its own; a contender whose package
is missing is skipped with a note. Weights: a fresh phenocore model's tensors redrawn with order-1
values and BN statistics (as in bindings/python/tests/conftest.py; a freshly initialised model's deep
activations are ~1e-11, too small to compare), saved as torchvision-named safetensors and loaded by
all three; the features of the first warm-up run are compared (max|a - b| / max|b|).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("phenocore", "torch", "onnxruntime")
TRUNCATED_LAYERS = {"block6a_activation", "features.6.0.block.1"}  # layers torch/ORT can be cut at
IN_CHANNELS, CROP, NUM_CLASSES = 5, 128, 490  # Cell Painting CNN: 5 channels, 128 px crops, 490 classes
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")


# ---- shared helpers ----------------------------------------------------------------------------------


def make_crops(batch: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((batch, IN_CHANNELS, CROP, CROP), dtype=np.float32)


def peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def import_phenocore():
    bindings = str(ROOT / "bindings" / "python")
    if bindings not in sys.path:
        sys.path.insert(0, bindings)  # this checkout's bindings, which find its target/release library
    import phenocore

    try:
        phenocore.library_version()  # loads the library
    except phenocore.LibraryNotFoundError as e:
        raise ImportError(f"libphenocore not built or not found ({e})") from e
    return phenocore


def torch_trunk(weights: Path):
    """torchvision EfficientNet-B0 with a 5-channel stem, loaded from `weights`, cut after block 6a's
    depthwise conv + BN + SiLU and mean-pooled: the tensor phenocore calls block6a_activation."""
    import torchvision
    from safetensors.torch import load_file
    from torch import nn

    full = torchvision.models.efficientnet_b0(num_classes=NUM_CLASSES)
    full.features[0][0] = nn.Conv2d(IN_CHANNELS, 32, kernel_size=3, stride=2, padding=1, bias=False)
    full.load_state_dict(load_file(str(weights)))

    class Trunk(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = full.features[0:6]
            self.block6a = full.features[6][0].block[0:2]

        def forward(self, x):
            return self.block6a(self.stages(x)).mean(dim=(2, 3))

    return Trunk().eval()


def write_safetensors(path: Path, tensors) -> None:
    header, blobs, offset = {}, [], 0
    for key, value in tensors.items():
        blob = np.ascontiguousarray(value, dtype="<f4").tobytes()
        header[key] = {"dtype": "F32", "shape": list(np.shape(value)), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_safetensors_f32(path: Path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] != "F32":
            raise ValueError(f"{path}: {key} has dtype {info['dtype']}, expected F32")
        begin, end = info["data_offsets"]
        out[key] = np.frombuffer(data[begin:end], dtype="<f4").reshape(info["shape"])
    return out


def randomised(state, rng):
    """Order-1 activations at every depth: He-scaled convs on the true fan-in (SE convs halved),
    non-trivial BN affine and running statistics (bindings/python/tests/conftest.py)."""
    out = {}
    for key, value in state.items():
        shape = value.shape
        prefix, _, kind = key.rpartition(".")
        if prefix + ".running_var" in state:
            out[key] = {
                "weight": lambda: rng.uniform(0.5, 1.5, shape),
                "bias": lambda: rng.uniform(-0.3, 0.3, shape),
                "running_mean": lambda: rng.normal(0, 0.2, shape),
                "running_var": lambda: rng.uniform(0.5, 2.0, shape),
            }[kind]()
        elif kind == "weight" and value.ndim == 4:
            se = ".fc1" in key or ".fc2" in key
            out[key] = rng.normal(0, np.sqrt(2.0 / np.prod(shape[1:])) * (0.5 if se else 1.0), shape)
        elif kind == "weight" and value.ndim == 2:
            out[key] = rng.normal(0, 1 / np.sqrt(shape[1]), shape)
        elif kind == "bias":
            out[key] = rng.uniform(-0.3, 0.3, shape)
        else:
            out[key] = value
    return out


# ---- child processes: one contender each -------------------------------------------------------------


def run_phenocore(args, crops):
    pc = import_phenocore()
    pc.set_num_threads(args.threads)
    model = pc.EfficientNet.load(args.weights)
    version = pc.library_version()
    return version, lambda: model.features(crops, args.layer, batch_size=args.batch)


def run_torch(args, crops):
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    trunk = torch_trunk(Path(args.weights))
    x = torch.from_numpy(crops)
    if args.torch_channels_last:
        trunk, x = trunk.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode():
            return trunk(x).numpy()

    return torch.__version__, step


def run_onnxruntime(args, crops):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.no_spin:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(args.onnx, opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return ort.__version__, lambda: session.run(None, {name: crops})[0]


RUNNERS = {"phenocore": run_phenocore, "torch": run_torch, "onnxruntime": run_onnxruntime}


def child(args) -> int:
    out = Path(args.out)
    crops = make_crops(args.batch, args.seed)
    try:
        version, step = RUNNERS[args.child](args, crops)
    except ImportError as e:
        (out / f"{args.child}.json").write_text(json.dumps({"skipped": f"not installed: {e}"}))
        return 0
    rss_loaded = peak_rss_mib()
    features = None
    for i in range(args.warmup):
        f = step()
        if i == 0:
            features = np.asarray(f, dtype=np.float32)
    times = []
    for _ in range(args.reps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    np.save(out / f"{args.child}.npy", features)
    result = {
        "version": version,
        "times_s": times,
        "rss_loaded_mib": rss_loaded,
        "rss_peak_mib": peak_rss_mib(),
        "feature_shape": list(features.shape),
    }
    (out / f"{args.child}.json").write_text(json.dumps(result))
    return 0


def export_onnx(args) -> int:
    """Exports the truncated torch module (opset 17, dynamic batch) in its own process, so neither the
    parent nor the ONNX Runtime child carries torch in its memory."""
    import torch

    trunk = torch_trunk(Path(args.weights))
    x = torch.from_numpy(make_crops(2, args.seed))
    names = {"input_names": ["crops"], "output_names": ["features"]}
    try:  # the TorchScript exporter writes opset 17 exactly; the torch.export one starts at 18
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                trunk, (x,), args.onnx, opset_version=17, dynamo=False,
                dynamic_axes={"crops": {0: "batch"}, "features": {0: "batch"}}, **names,
            )
    except Exception as e:  # noqa: BLE001 - fall back to the torch.export exporter
        print(f"TorchScript ONNX export failed ({e}); using the torch.export exporter", file=sys.stderr)
        torch.onnx.export(
            trunk, (x,), args.onnx, opset_version=17, dynamo=True,
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **names,
        )
    return 0


# ---- parent ------------------------------------------------------------------------------------------


def spawn(mode, name, args, tmp: Path):
    env = dict(os.environ)
    env.update({k: str(args.threads) for k in THREAD_ENV})
    if args.no_spin:
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # torch's OpenMP pool sleeps instead of spinning at barriers
    cmd = [
        sys.executable, str(Path(__file__).resolve()), mode, name,
        "--batch", str(args.batch), "--threads", str(args.threads), "--reps", str(args.reps),
        "--warmup", str(args.warmup), "--layer", args.layer, "--seed", str(args.seed),
        "--weights", str(tmp / "weights.safetensors"), "--onnx", str(tmp / "trunk.onnx"), "--out", str(tmp),
        *(["--torch-channels-last"] if args.torch_channels_last else []),
        *(["--no-spin"] if args.no_spin else []),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def make_weights(path: Path, seed: int) -> str:
    """Writes the randomised weights; the template (key names and shapes) comes from phenocore's own
    `save`, or torchvision's state dict when phenocore is not available."""
    try:
        pc = import_phenocore()
        template = path.with_suffix(".template.safetensors")
        pc.EfficientNet.new(IN_CHANNELS, num_classes=NUM_CLASSES, seed=seed).save(template)
        state, source = read_safetensors_f32(template), "phenocore"
        template.unlink()
    except Exception:  # noqa: BLE001 - phenocore missing or unbuilt; the torch template names the same keys
        import torchvision  # an ImportError here means nothing can run
        from torch import nn

        full = torchvision.models.efficientnet_b0(num_classes=NUM_CLASSES)
        full.features[0][0] = nn.Conv2d(IN_CHANNELS, 32, kernel_size=3, stride=2, padding=1, bias=False)
        state = {k: v.numpy() for k, v in full.state_dict().items() if v.is_floating_point()}
        source = "torchvision"
    write_safetensors(path, randomised(state, np.random.default_rng(seed)))
    return source


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b.astype(np.float64)).max())


def summarise(name, raw, batch):
    times = sorted(raw["times_s"])
    med = statistics.median(times)
    return {
        "contender": name,
        "version": raw["version"],
        "median_s": med,
        "crops_per_s_median": batch / med,
        "crops_per_s_min": batch / times[-1],
        "crops_per_s_max": batch / times[0],
        "rss_peak_mib": raw["rss_peak_mib"],
        "rss_loaded_mib": raw["rss_loaded_mib"],
        "times_s": raw["times_s"],
    }


def parent(args) -> int:
    load_before = os.getloadavg()
    results, notes, failed = {}, {}, False
    with tempfile.TemporaryDirectory(prefix="effnet_cpu_") as tmp_name:
        tmp = Path(tmp_name)
        try:
            weights_from = make_weights(tmp / "weights.safetensors", args.seed)
        except ImportError as e:
            print(f"neither phenocore nor torch is available ({e}); nothing to benchmark", file=sys.stderr)
            return 1
        truncatable = args.layer in TRUNCATED_LAYERS
        raws, exported = {}, False
        # Rounds alternate the contenders' order, so a slow spell of a shared machine is spread
        # over all of them instead of landing on one; timings of all rounds are pooled.
        for rnd in range(args.rounds):
            order = list(args.only) if rnd % 2 == 0 else list(reversed(args.only))
            for name in order:
                if name in notes:
                    continue
                if name != "phenocore" and not truncatable:
                    notes[name] = f"skipped: only block6a_activation is truncated for torch/ORT, not {args.layer!r}"
                    continue
                if name == "onnxruntime" and not exported:
                    export = spawn("--_export", "onnx", args, tmp)
                    if export.returncode != 0 or not (tmp / "trunk.onnx").is_file():
                        last = (export.stderr.strip().splitlines() or ["no output"])[-1]
                        notes[name] = f"skipped: ONNX export failed (needs torch, onnx): {last}"
                        continue
                    exported = True
                print(f"round {rnd + 1}/{args.rounds}: running {name} ...", file=sys.stderr, flush=True)
                proc = spawn("--_child", name, args, tmp)
                record = tmp / f"{name}.json"
                if proc.returncode != 0 or not record.is_file():
                    failed = True
                    notes[name] = f"FAILED (exit {proc.returncode}): " + " | ".join(proc.stderr.strip().splitlines()[-3:])
                    continue
                raw = json.loads(record.read_text())
                record.unlink()
                if "skipped" in raw:
                    notes[name] = "skipped: " + raw["skipped"]
                    continue
                if name in raws:
                    raws[name]["times_s"] += raw["times_s"]
                    raws[name]["rss_peak_mib"] = max(raws[name]["rss_peak_mib"], raw["rss_peak_mib"])
                else:
                    raws[name] = raw
                    raws[name]["features_array"] = np.load(tmp / f"{name}.npy")
        for name, raw in raws.items():
            if name in notes:
                continue
            results[name] = summarise(name, raw, args.batch)
            results[name]["features"] = raw["features_array"]
    load_after = os.getloadavg()

    print()
    print(
        f"EfficientNet-B0 {args.layer}, batch {args.batch} x {IN_CHANNELS}x{CROP}x{CROP} float32, "
        f"{args.threads} thread(s), {args.rounds} round(s) x ({args.warmup} warm-up + {args.reps} timed runs)"
        + (", torch in channels_last" if args.torch_channels_last else "")
        + (", no spin-waiting" if args.no_spin else "")
    )
    print(f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); load average before "
          f"{load_before[0]:.2f}, after {load_after[0]:.2f}")
    busy = load_before[0] + args.threads > (os.cpu_count() or 1) + 0.5
    if busy and args.threads > 1 and not args.no_spin:
        print(
            f"WARNING: the machine is busy (load {load_before[0]:.1f} + {args.threads} threads > "
            f"{os.cpu_count()} cores): torch's and ORT's spin-waiting thread pools slow down far more "
            "than phenocore's under contention; rerun with --no-spin (or on an idle machine)"
        )
    print()
    header = (
        f"{'contender':<13}{'version':<16}{'crops/s med':>12}{'min':>9}{'max':>9}{'s/batch':>9}"
        f"{'peak RSS MiB':>14}{'after load':>12}"
    )
    print(header)
    print("-" * len(header))
    for name in args.only:
        if name in results:
            r = results[name]
            print(
                f"{name:<13}{r['version'][:15]:<16}{r['crops_per_s_median']:>12.1f}"
                f"{r['crops_per_s_min']:>9.1f}{r['crops_per_s_max']:>9.1f}{r['median_s']:>9.3f}"
                f"{r['rss_peak_mib']:>14.0f}{r['rss_loaded_mib']:>12.0f}"
            )
        else:
            print(f"{name:<13}{notes.get(name, 'not run')}")
    print("('after load': peak RSS once the interpreter, libraries, weights and input were loaded)")

    ratios = {}
    if "phenocore" in results:
        print()
        for other, label in (("onnxruntime", "phenocore/ORT"), ("torch", "phenocore/torch")):
            if other in results:
                speed = results["phenocore"]["crops_per_s_median"] / results[other]["crops_per_s_median"]
                rss = results["phenocore"]["rss_peak_mib"] / results[other]["rss_peak_mib"]
                ratios[label] = {"throughput": speed, "peak_rss": rss}
                print(f"{label:<16} throughput x{speed:.2f}   peak RSS x{rss:.2f}")

    agreement = {}
    pairs = [("phenocore", "torch"), ("onnxruntime", "torch"), ("phenocore", "onnxruntime")]
    present = [(a, b) for a, b in pairs if a in results and b in results]
    if present:
        print()
        print(f"agreement on the features (weights from {weights_from}, redrawn; max|a-b|/max|b|):")
        for a, b in present:
            fa, fb = results[a]["features"], results[b]["features"]
            if fa.shape != fb.shape:
                agreement[f"{a}_vs_{b}"] = None
                failed = True
                print(f"  {a} vs {b}: shapes differ {fa.shape} vs {fb.shape}")
                continue
            agreement[f"{a}_vs_{b}"] = rel_diff(fa, fb)
            print(f"  {a:<11} vs {b:<11} {agreement[f'{a}_vs_{b}']:.2e}  (max|b| = {np.abs(fb).max():.3g})")
    if args.json:
        report = {
            "config": {
                "layer": args.layer, "batch": args.batch, "threads": args.threads, "reps": args.reps,
                "warmup": args.warmup, "seed": args.seed, "torch_channels_last": args.torch_channels_last,
                "no_spin": args.no_spin,
                "input": [args.batch, IN_CHANNELS, CROP, CROP],
            },
            "machine": {"cpu": cpu_name(), "logical_cores": os.cpu_count(), "python": platform.python_version(),
                        "loadavg_before": load_before, "loadavg_after": load_after},
            "results": {k: {kk: vv for kk, vv in v.items() if kk != "features"} for k, v in results.items()},
            "notes": notes,
            "ratios": ratios,
            "agreement": agreement,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 1 if failed else 0


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="crops per pass (default 64)")
    p.add_argument("--threads", type=int, default=2, help="threads for every contender (default 2)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all contenders, order alternating (default 3)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs, at least 1 (default 2)")
    p.add_argument("--layer", default="block6a_activation", help="feature layer (torch/ORT: block6a_activation only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the crops and weights (default 0)")
    p.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated subset of " + ",".join(CONTENDERS))
    p.add_argument(
        "--torch-channels-last", action="store_true",
        help="run torch in channels_last (NHWC) memory format instead of its default NCHW",
    )
    p.add_argument(
        "--no-spin", action="store_true",
        help="torch (OMP_WAIT_POLICY=PASSIVE) and ORT (allow_spinning=0) threads sleep instead of spinning; "
        "use on a machine busy with other work, where spinning pools collapse",
    )
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--_child", dest="child", choices=CONTENDERS, help=argparse.SUPPRESS)
    p.add_argument("--_export", dest="export", choices=["onnx"], help=argparse.SUPPRESS)
    for hidden in ("--weights", "--onnx", "--out"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "threads", "reps", "warmup", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in args.only if c not in CONTENDERS]
    if unknown:
        p.error(f"--only: unknown contender(s) {', '.join(unknown)}; expected {', '.join(CONTENDERS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        return child(args)
    if args.export:
        return export_onnx(args)
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
