"""Throughput of the laptop-sized MNIST UNet against diffusers' UNet2DModel, in one run.

Both models see the same batches; we time a forward pass (inference) and a training step
(forward, L_simple-style MSE, backward, AdamW), interleaving the two models round by round
so that both see the same machine load. The laptop UNet runs twice, in the default (NCHW) order
and channels-last (what `Checkpoint.build_model` hands the samplers).
Run: `.venv/bin/python benchmarks/bench_unet.py`.
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from common import time_call, write_results
from ddpm_core.config import MNIST_SMALL_MODEL, replace
from ddpm_core.denoisers import build_model, count_parameters
from ddpm_core.profiles import get_profile
from ddpm_core.runtime import resolve_device


def diffusers_reference() -> UNet2DModel:
    """diffusers' small UNet2DModel: (32, 64, 64), 2 layers per block, attention at 7x7 (1.62M)."""
    return UNet2DModel(
        sample_size=28, in_channels=1, out_channels=1, block_out_channels=(32, 64, 64), layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def forward_fn(model, x, t, is_diffusers):
    def run():
        with torch.inference_mode():
            out = model(x, t)
            return out.sample if is_diffusers else out
    return run


def train_step_fn(model, x, t, is_diffusers):
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4)
    target = torch.randn_like(x)

    def run():
        out = model(x, t)
        loss = F.mse_loss(out.sample if is_diffusers else out, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per round")
    args = parser.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    models = {
        "ddpm_core laptop profile": build_model(get_profile("laptop").model),
        # the same UNet, its weights in the order Checkpoint.build_model gives the samplers
        "ddpm_core laptop, channels-last": build_model(get_profile("laptop").model).to(memory_format=torch.channels_last),
        "ddpm_core 2.73M (first laptop guess)": build_model(MNIST_SMALL_MODEL),
        # the same layout as the diffusers model below, to compare implementations layer for layer
        "ddpm_core (32,64,64)x2": build_model(replace(MNIST_SMALL_MODEL, channel_mults=(1, 2, 2), num_res_blocks=2)),
        "diffusers": diffusers_reference(),
    }
    x = torch.randn(args.batch, 1, 28, 28, device=device)
    t = torch.randint(0, 1000, (args.batch,), device=device)
    rates = {(name, kind): [] for name in models for kind in ("forward", "train")}
    for name, model in models.items():
        model.to(device)
    for _ in range(args.rounds):
        for name, model in models.items():
            is_diffusers = name == "diffusers"
            model.eval()
            rates[name, "forward"].append(args.batch / time_call(forward_fn(model, x, t, is_diffusers), args.repeats))
            model.train()
            rates[name, "train"].append(args.batch / time_call(train_step_fn(model, x, t, is_diffusers), args.repeats))
    rows = []
    for name, model in models.items():
        row = {
            "model": name, "parameters": count_parameters(model), "batch": args.batch,
            "forward_images_per_s": round(statistics.median(rates[name, "forward"]), 1),
            "train_images_per_s": round(statistics.median(rates[name, "train"]), 1),
        }
        rows.append(row)
        print(f"{name:34s} {row['parameters'] / 1e6:5.2f}M params, batch {args.batch}: "
              f"forward {row['forward_images_per_s']:7.1f} img/s, train {row['train_images_per_s']:6.1f} img/s")
    *ours, theirs = rows
    for row in ours:
        print(f"{row['model']} / diffusers: forward x{row['forward_images_per_s'] / theirs['forward_images_per_s']:.2f}, "
              f"train x{row['train_images_per_s'] / theirs['train_images_per_s']:.2f}")
    print("results in", write_results("unet_throughput", {"device": str(device), "rows": rows}))


if __name__ == "__main__":
    main()
