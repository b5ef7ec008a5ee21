"""Benchmark (c): sampling throughput (DDIM steps × images / s) and FID feature extraction (images / s).
Not part of the test suite.

    python benchmarks/bench_sampling.py --model fmnist --n 256            # CPU
    python benchmarks/bench_sampling.py --model cifar10 --n 1024          # GPU
"""
import argparse
import json
import time

import torch
from diffusers import UNet2DModel

from deme.config import get_profile
from deme.metrics import inception_features
from deme.models import build_unet
from deme.sampling import ddim_sample

from bench_train_step import CIFAR10_DDPM


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["cifar10", "fmnist"], default="fmnist")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inception-n", type=int, default=64)
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    if a.model == "cifar10":
        cfg = get_profile("cifar10")
        model = UNet2DModel(**CIFAR10_DDPM).to(device)
    else:
        cfg = get_profile("fmnist")
        model = build_unet(cfg).to(device)
    for autocast in (False, True):
        ddim_sample(model, cfg, min(a.n, 16), steps=2, autocast=autocast)          # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ddim_sample(model, cfg, a.n, steps=a.steps, batch_size=a.n, autocast=autocast)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(json.dumps({"bench": "ddim", "model": a.model, "device": dev, "bf16_autocast": autocast,
                          "n": a.n, "steps": a.steps, "step_images_per_s": round(a.n * a.steps / dt, 1)}), flush=True)
    if not a.inception_n:
        return
    x = torch.rand(a.inception_n, 3 if a.model == "cifar10" else 1, cfg.image_size, cfg.image_size) * 2 - 1
    inception_features(x[:8])                                                         # warm-up / load
    t0 = time.perf_counter()
    inception_features(x)
    dt = time.perf_counter() - t0
    print(json.dumps({"bench": "inception_features", "device": dev, "n": a.inception_n,
                      "images_per_s": round(a.inception_n / dt, 2)}), flush=True)


if __name__ == "__main__":
    main()
