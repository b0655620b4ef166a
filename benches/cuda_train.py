"""One EfficientNet-B0 training step on a CUDA GPU, side by side in one run: torchvision
`efficientnet_b0` (5-channel stem) under PyTorch eager fp32 and bf16 autocast against phenocore's
`GpuEfficientNetTrainer` (`benches/cuda_train.rs`: f32, TF32 GEMMs, and bf16 mixed precision
with f32 master weights): batch B of random
5 x 128 x 128 crops, random labels, training-mode forward (dropout 0.2, stochastic depth 0.2),
cross-entropy, backward, SGD (lr 0.005, momentum 0.9, Nesterov, weight decay 1e-5). Issue 6's
target: >= 1.3x PyTorch eager at batch 256 (phenocore bf16 against autocast bf16). Prints seconds per step, crops/s and the ratios.

    python benches/cuda_train.py [--batch 256] [--classes 490] [--steps 10]

Needs a CUDA GPU, torch + torchvision in the running Python, and cargo.
"""
import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import rust_bench  # noqa: E402


def torch_side(a, dtype):
    import torch
    import torch.nn.functional as F
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0(num_classes=a.classes)
    model.features[0][0] = torch.nn.Conv2d(5, 32, 3, 2, 1, bias=False)
    model = model.cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.005, momentum=0.9, nesterov=True, weight_decay=1e-5)
    x = torch.rand(a.batch, 5, 128, 128, device="cuda")
    y = torch.randint(0, a.classes, (a.batch,), device="cuda")
    auto = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")
    times = []
    for i in range(a.steps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(**auto):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        loss.item()
        if i > 0:
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--classes", type=int, default=490)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args()
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    print(f"GPU: {torch.cuda.get_device_name(0)}; batch {a.batch}; torch {torch.__version__}")
    rows = {f"torch eager {d}": torch_side(a, d) for d in ["fp32", "bf16"]}
    for mode in ["f32", "tf32", "bf16"]:
        res = rust_bench.run("cuda_train", [str(a.batch), str(a.classes), str(a.steps), mode])
        if res.returncode != 0:
            print(res.stdout, res.stderr, file=sys.stderr)
            return 1
        rows[f"phenocore {mode}"] = json.loads(res.stdout.strip().splitlines()[-1])["step_s"]
    for ref in ["torch eager fp32", "torch eager bf16"]:
        print(f"-- ratios against {ref} (> 1: phenocore faster)")
        for name, t in rows.items():
            print(f"{name:20s} {t:8.4f} s/step  {a.batch / t:9.1f} crops/s  x{rows[ref] / t:5.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
