"""Benchmark (a)/(b): images/s and peak memory of one DeMe range-finetuning step — student forward+backward,
teacher forward, optimizer step, EMA update — ours against a reference loop written the way the authors'
recipe runs (fp16 autocast with a GradScaler, eager, separate teacher forward, unfused AdamW, a host sync
every step). Not part of the test suite.

    python benchmarks/bench_train_step.py --model cifar10 --batch 128            # (a), on a GPU
    python benchmarks/bench_train_step.py --model fmnist --batch 64 --steps 20   # (b), on the CPU

Prints one line per variant and the ratio against the reference, all from the same run.
"""

import argparse
import contextlib
import copy
import json
import time

import torch
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel

from deme.config import get_profile
from deme.models import build_unet, with_projections
from deme.objectives import DeMeObjective
from deme.train import maybe_compile, step_loss

# google/ddpm-cifar10-32's UNet config (35.7M parameters), built from the config with random weights
CIFAR10_DDPM = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                    block_out_channels=(128, 256, 256, 256),
                    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)


def make_models(name: str):
    if name == "cifar10":
        cfg = get_profile("cifar10", range_index=1)
        teacher = UNet2DModel(**CIFAR10_DDPM)
    else:
        cfg = get_profile("fmnist", range_index=1)
        teacher = build_unet(cfg)
    return cfg, teacher


def run(variant: str, cfg, teacher_cpu, batch: int, steps: int, warmup: int, device: str, compile_: bool,
        mode: str | None = None, profile_ops: int = 0):
    torch.manual_seed(0)
    student = with_projections(copy.deepcopy(teacher_cpu)).to(device).train()
    teacher = copy.deepcopy(teacher_cpu).to(device).eval().requires_grad_(False)
    cuda = device.startswith("cuda")
    reference = variant == "reference"
    if not reference and cuda:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8,
                            foreach=False if reference else None, fused=(not reference and cuda) or None)
    ema = EMAModel(student.parameters(), decay=0.9999, use_ema_warmup=True, foreach=not reference)
    ema.to(device)
    alphas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - alphas, 0).float().to(device)
    objective = DeMeObjective(cfg, alphas_cumprod)
    if reference:
        dtype = torch.float16 if cuda else None
        scaler = torch.amp.GradScaler("cuda") if cuda else None
    else:
        dtype = torch.bfloat16 if (cuda or device == "cpu") else None
        scaler = None
    autocast = (lambda: torch.autocast(device.split(":")[0], dtype=dtype)) if dtype else contextlib.nullcontext
    s_fwd = maybe_compile(student, compile_ and not reference, mode)
    t_fwd = maybe_compile(teacher, compile_ and not reference, mode)
    c = cfg.channels if cfg.profile != "cifar10" else 3
    size = cfg.image_size
    g = torch.Generator(device).manual_seed(0)
    x0 = torch.randn(batch, c, size, size, device=device, generator=g).clamp(-1, 1)
    kw = {"class_labels": torch.randint(0, 11, (batch,), device=device, generator=g)} if cfg.num_classes else {}
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        noise = torch.randn(x0.shape, device=device, generator=g)
        t = objective.timesteps(batch, torch.Generator().manual_seed(i)).to(device)
        loss, _, _ = step_loss(s_fwd, t_fwd, x0, noise, t, kw, alphas_cumprod, objective, i, params, 1.0, autocast)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=not reference)
            opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(student.parameters())
        if reference:
            loss.item()            # the per-step host sync of a loop that logs every step
        if cuda:
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    if profile_ops:   # where the time of a few more steps goes: the top ops by self device (or CPU) time
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            for i in range(3):
                noise = torch.randn(x0.shape, device=device, generator=g)
                t = objective.timesteps(batch, torch.Generator().manual_seed(i)).to(device)
                loss, _, _ = step_loss(s_fwd, t_fwd, x0, noise, t, kw, alphas_cumprod, objective, i, params, 1.0,
                                       autocast)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                ema.step(student.parameters())
            if cuda:
                torch.cuda.synchronize()
        key = "self_device_time_total" if cuda else "self_cpu_time_total"
        for ev in sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:profile_ops]:
            print(json.dumps({"bench": "train_step_profile", "variant": variant, "op": ev.key[:80],
                              "calls_per_step": ev.count // 3, "ms_per_step": round(getattr(ev, key) / 3e3, 3)}))
        print(json.dumps({"bench": "train_step_profile", "variant": variant, "cpu_total_ms_per_step":
                          round(sum(e.self_cpu_time_total for e in prof.key_averages()) / 3e3, 2)}))
    ips = batch * len(times) / sum(times)
    peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    return ips, peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["cifar10", "fmnist"], default="fmnist")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--compile", action="store_true", help="add an 'ours+compile' variant")
    p.add_argument("--compile-modes", nargs="*", default=["default"],
                   help="torch.compile modes of the compiled variants (e.g. default reduce-overhead)")
    p.add_argument("--profile-ops", type=int, default=0, help="print the top ops of 'ours' (eager) per step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    cfg, teacher = make_models(a.model)
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    variants = ["reference", "ours"] + ([f"ours+compile[{m}]" for m in a.compile_modes] if a.compile else [])
    results = {}
    for v in variants:
        mode = v[v.index("[") + 1:-1] if "[" in v else None
        ips, peak = run(v.split("+")[0], cfg, teacher, a.batch, a.steps, a.warmup, a.device, mode is not None,
                        None if mode == "default" else mode, a.profile_ops if v == "ours" else 0)
        results[v] = ips
        print(json.dumps({"bench": "train_step", "model": a.model, "variant": v, "device": dev, "batch": a.batch,
                          "images_per_s": round(ips, 1), "peak_mem_gib": peak,
                          "ratio_vs_reference": round(ips / results["reference"], 2)}), flush=True)


if __name__ == "__main__":
    main()
