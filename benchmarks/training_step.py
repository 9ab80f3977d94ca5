"""Training-step time of both stages' networks: memory layouts and precisions as ratios to the baseline.

    python benchmarks/training_step.py                  # 2 threads, 30 timed steps per case
    python benchmarks/training_step.py --threads 1 --steps 50

One optimizer step (forward, loss, backward, AdamW) on 20x20x16 windows at batch sizes 20 and
30, for the stage-1 U-Net (DiceCE) and the stage-2 CNN (cross-entropy), each case timed in this
one run: contiguous fp32 (the baseline), channels-last 3D fp32 (`runtime.channels_last`, the
default) and channels-last with bf16 autocast (`trainer.precision=bf16-mixed`). The target:
channels-last at least 1.3x the baseline for the U-Net on a CPU.
"""

from __future__ import annotations

import argparse
import time

import torch
from monai.losses import DiceCELoss

from cmb.models.discriminator import DouCNN
from cmb.models.unet import UNet3D

CASES = (("contiguous fp32", False, False), ("channels-last fp32", True, False), ("channels-last bf16-mixed", True, True))


def step_seconds(stage: str, batch_size: int, channels_last: bool, bf16: bool, steps: int) -> float:
    """Mean seconds of one training step (after 3 warm-up steps)."""
    torch.manual_seed(0)
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    x = torch.randn(batch_size, 1, 20, 20, 16).contiguous(memory_format=fmt)
    if stage == "unet":
        net, loss_fn = UNet3D(in_channels=1, out_channels=1, channels=[8, 16]), DiceCELoss(sigmoid=True, batch=True)
        target = (torch.rand(batch_size, 1, 20, 20, 16) > 0.9).float()
    else:
        net, loss_fn = DouCNN(in_channels=1, conv_channels=[32, 64], fc=[500, 100], dropout=0.3), torch.nn.CrossEntropyLoss()
        target = torch.randint(0, 2, (batch_size,))
    net = net.to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), 1e-3)

    def one() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(x)
        loss_fn(out.float(), target).backward()
        opt.step()
        opt.zero_grad()

    for _ in range(3):
        one()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return (time.perf_counter() - t) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} steps per case")
    print("| network, batch | " + " | ".join(name for name, _, _ in CASES) + " |")
    print("|---|" + "---|" * len(CASES))
    for stage in ("unet", "cnn"):
        for batch_size in (20, 30):
            times = [step_seconds(stage, batch_size, cl, bf16, args.steps) for _, cl, bf16 in CASES]
            cells = [f"{times[0] * 1000:.0f} ms"] + [f"{t * 1000:.0f} ms ({times[0] / t:.2f}x)" for t in times[1:]]
            print(f"| {stage}, {batch_size} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
