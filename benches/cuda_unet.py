"""The LDM paper's diffusion U-Net on a CUDA GPU, side by side in one run: MONAI
`DiffusionModelUNet` under PyTorch eager (fp32, and bf16 autocast) against phenocore's GPU pass
(`benches/cuda_unet.rs`: f32, TF32 GEMMs, and bf16 mixed precision), same architecture, random weights and inputs:
forward + backward of every parameter at batch B on 8 x S x S latents (issue 6: batch 64, S 48,
target >= 1.2x PyTorch eager bf16) and 50-step DDIM sampling (target >= 1.3x); prints seconds,
samples/s and the ratios.

    python benches/cuda_unet.py [--batch 64] [--size 48] [--reps 5] [--steps 50]

Needs a CUDA GPU, torch + monai in the running Python, and cargo. The issue's comparison is
phenocore bf16 (bf16 activations, f32 master weights and gradients) against torch eager bf16
(autocast); every row's ratio is printed against torch eager bf16.
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
    from monai.networks.nets import DiffusionModelUNet

    torch.manual_seed(0)
    dev = "cuda"
    model = DiffusionModelUNet(
        spatial_dims=2, in_channels=8, out_channels=8, num_res_blocks=2, channels=(256, 512, 768),
        attention_levels=(False, True, True), num_head_channels=(0, 512, 768), with_conditioning=True,
        cross_attention_dim=512, norm_num_groups=32,
    ).to(dev)
    n, s = a.batch, a.size
    x = torch.randn(n, 8, s, s, device=dev)
    target = torch.randn(n, 8, s, s, device=dev)
    ctx = torch.randn(n, 1, 512, device=dev)
    ts = (100 + 400 * torch.arange(n, device=dev)) % 1000
    auto = dict(device_type="cuda", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(**auto):
            y = model(x, ts, context=ctx)
            loss = F.mse_loss(y.float(), target)
        loss.backward()

    model.train()
    times = []
    for i in range(a.reps + 1):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step()
        torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t)
    train = sorted(times)[len(times) // 2]

    # DDIM: the scheduler update is a handful of elementwise ops; the U-Net passes dominate.
    model.eval()
    m = a.batch
    xs = torch.randn(m, 8, s, s, device=dev)
    cs = torch.randn(m, 1, 512, device=dev)
    betas = torch.linspace(0.0015 ** 0.5, 0.0205 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    stepsz = 1000 // a.steps
    tsteps = list(range(0, 1000, stepsz))[::-1]

    def sample():
        z = xs.clone()
        with torch.no_grad(), torch.autocast(**auto):
            for t in tsteps:
                v = model(z, torch.full((m,), t, device=dev), context=cs).float()
                at = abar[t].item()
                ap = abar[t - stepsz].item() if t - stepsz >= 0 else 1.0
                x0 = at ** 0.5 * z - (1 - at) ** 0.5 * v
                eps = at ** 0.5 * v + (1 - at) ** 0.5 * z
                z = ap ** 0.5 * x0 + (1 - ap) ** 0.5 * eps
        return z

    sample()
    torch.cuda.synchronize()
    t = time.perf_counter()
    sample()
    torch.cuda.synchronize()
    return train, time.perf_counter() - t


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=50)
    a = p.parse_args()
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    print(f"GPU: {torch.cuda.get_device_name(0)}; batch {a.batch}, {a.size}x{a.size}; torch {torch.__version__}")
    rows = {}
    for dtype in ["fp32", "bf16"]:
        rows[f"torch eager {dtype}"] = torch_side(a, dtype)
    for mode in ["f32", "tf32", "bf16"]:
        res = rust_bench.run("cuda_unet", [str(a.batch), str(a.size), str(a.reps), str(a.steps), mode])
        if res.returncode != 0:
            print(res.stdout, res.stderr, file=sys.stderr)
            return 1
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows[f"phenocore {mode}"] = (r["train_s"], r["sample_s"])
    ref_train, ref_sample = rows["torch eager bf16"]
    for name, (tr, sm) in rows.items():
        print(f"{name:20s} fwd+bwd {tr:8.4f} s ({a.batch / tr:8.1f} samples/s, x{ref_train / tr:5.2f} vs eager bf16)"
              f"   DDIM {a.steps} steps {sm:8.3f} s (x{ref_sample / sm:5.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
