"""Benchmark (c): sampling throughput (DDIM steps × images / s) and FID feature extraction (images / s).
Not part of the test suite.

    python benchmarks/bench_sampling.py --model fmnist --n 256            # CPU
    python benchmarks/bench_sampling.py --model cifar10 --n 1024          # GPU
"""
import argparse
import json
import time

import torch
from bench_train_step import CIFAR10_DDPM
from diffusers import UNet2DModel

from deme.config import get_profile
from deme.models import build_unet
from deme.sampling import ddim_sample


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["cifar10", "fmnist"], default="fmnist")
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--inception-n", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed rounds of each Inception layout (median)")
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
    from deme.metrics import InceptionFeatureExtractor, inception_features
    x = torch.rand(a.inception_n, 3 if a.model == "cifar10" else 1, cfg.image_size, cfg.image_size) * 2 - 1
    extractors = {layout: InceptionFeatureExtractor(device=device, channels_last=layout == "channels_last")
                  for layout in ("nchw", "channels_last")}
    variants = [("nchw", 32), ("channels_last", 32), ("channels_last", 8)] if device == "cpu" else \
        [("nchw", 250), ("channels_last", 250)]
    times, feats = {v: [] for v in variants}, {}
    for rep in range(a.repeats + 1):               # alternated; the first round is a warm-up
        for v in variants:
            t0 = time.perf_counter()
            feats[v] = inception_features(x, batch_size=v[1], extractor=extractors[v[0]])
            if rep:
                times[v].append(time.perf_counter() - t0)
    median = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
    for v in variants:
        print(json.dumps({"bench": "inception_features", "layout": v[0], "batch": v[1], "device": dev,
                          "n": a.inception_n, "images_per_s": round(a.inception_n / median[v], 2),
                          "ratio_vs_first": round(median[variants[0]] / median[v], 2),
                          "max_abs_diff_vs_first": float(abs(feats[v] - feats[variants[0]]).max())}), flush=True)


if __name__ == "__main__":
    main()
