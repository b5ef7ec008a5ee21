"""Benchmark: train the N range models together in one process (stacked parameters with torch.func.vmap, one
teacher forward over all N micro-batches) against N separate steps — does it pay? Not part of the test suite.

    python benchmarks/bench_joint_ranges.py --model fmnist --batch 64 --ranges 4          # CPU or GPU
    python benchmarks/bench_joint_ranges.py --model cifar10 --batch 128 --ranges 4        # GPU

Both variants do the same work per round: for each range i, student forward + backward on its own micro-batch
(timesteps from range i with probabilistic sampling), teacher forward (consistency loss), per-model gradient
clipping, an AdamW step and an EMA update. "separate": N models stepped one after another (our loop's path);
"joint": parameters stacked to (N, ...), one vmapped forward/backward, one teacher forward over N·B images, one
foreach AdamW and EMA over the stacked tensors. The first round's losses of both must agree (checked).
Prints one JSON line per variant and the ratio from the same run.
"""

import argparse
import contextlib
import copy
import json
import time

import torch
from bench_train_step import make_models
from torch.func import functional_call, stack_module_state, vmap

from deme.losses import consistency_loss, per_sample_mse
from deme.models import with_projections
from deme.timesteps import sample_timesteps, timestep_ranges


def batches(n_ranges, batch, c, size, num_classes, device, steps, seed=0):
    """Per round: x0, noise, t, labels of shape (N, B, ...), the same for both variants."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n_ranges, batch, c, size, size, generator=g).clamp(-1, 1)
    labels = torch.randint(0, (num_classes or 1) + 1, (n_ranges, batch), generator=g)
    ranges = timestep_ranges(1000, n_ranges)
    out = []
    for s in range(steps):
        noise = torch.randn(x0.shape, generator=g)
        t = torch.stack([sample_timesteps(batch, ranges[i], 1000, 0.3, "antithetic", g) for i in range(n_ranges)])
        out.append((noise.to(device), t.to(device)))
    return x0.to(device), labels.to(device), out


def noisy(x0, noise, t, ac):
    a = ac[t].view(*t.shape, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def run_separate(base, n, x0, labels, rounds, ac, autocast, device, cond):
    students = [with_projections(copy.deepcopy(base)).to(device).train() for _ in range(n)]
    teacher = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    cuda = device.startswith("cuda")
    opts = [torch.optim.AdamW(s.parameters(), lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6,
                              fused=cuda or None) for s in students]
    emas = [[p.detach().clone() for p in s.parameters()] for s in students]
    losses = []
    for noise, t in rounds:
        for i, (s, opt, ema) in enumerate(zip(students, opts, emas)):
            xt = noisy(x0[i], noise[i], t[i], ac)
            kw = {"class_labels": labels[i]} if cond else {}
            with autocast():
                eps = s(xt, t[i], **kw).sample
                with torch.no_grad():
                    eps_t = teacher(xt, t[i], **kw).sample
            loss = per_sample_mse(eps, noise[i]).mean() + consistency_loss(eps, eps_t).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(s.parameters(), 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in s.parameters()], 1 - 0.999)
            losses.append(loss.detach())
    return torch.stack(losses).view(len(rounds), n)


def run_joint(base, n, x0, labels, rounds, ac, autocast, device, cond):
    students = [with_projections(copy.deepcopy(base)).to(device) for _ in range(n)]
    teacher = copy.deepcopy(base).to(device).eval().requires_grad_(False)
    params, buffers = stack_module_state(students)
    template = copy.deepcopy(students[0]).to("meta")
    names = list(params)
    leaves = [params[k] for k in names]
    opt = torch.optim.AdamW(leaves, lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6,
                            fused=device.startswith("cuda") or None)
    ema = [p.detach().clone() for p in leaves]

    def one(p, b, xt, t, y):
        kw = {"class_labels": y} if cond else {}
        return functional_call(template, (p, b), (xt, t), kw).sample

    fwd = vmap(one, randomness="different")
    # fused attention kernels have no (CPU) or broken (cuDNN: "LSE is not correctly aligned") vmap support:
    # the joint variant uses the math attention backend
    from torch.nn.attention import SDPBackend, sdpa_kernel
    losses = []
    for noise, t in rounds:
        xt = noisy(x0, noise, t, ac)                                   # (N, B, C, H, W)
        with autocast(), sdpa_kernel(SDPBackend.MATH):
            eps = fwd(params, buffers, xt, t, labels)
            with torch.no_grad():
                kw = {"class_labels": labels.flatten()} if cond else {}
                eps_t = teacher(xt.flatten(0, 1), t.flatten(), **kw).sample.view_as(eps)
        per_range = (per_sample_mse(eps.flatten(0, 1), noise.flatten(0, 1)).view(n, -1).mean(1)
                     + consistency_loss(eps.flatten(0, 1), eps_t.flatten(0, 1)).view(n, -1).mean(1))
        with sdpa_kernel(SDPBackend.MATH):
            per_range.sum().backward()                                  # ranges are independent: sum = each
        with torch.no_grad():                                           # per-model clipping, as N separate clips
            norms = torch.stack([g.grad.pow(2).flatten(1).sum(1) for g in leaves]).sum(0).sqrt()
            coef = (1.0 / (norms + 1e-6)).clamp(max=1.0)
            for g in leaves:
                g.grad.mul_(coef.view(-1, *([1] * (g.grad.ndim - 1))))
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in leaves], 1 - 0.999)
        losses.append(per_range.detach())
    return torch.stack(losses)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["cifar10", "fmnist"], default="fmnist")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--ranges", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    cfg, base = make_models(a.model)
    dev = a.device
    cuda = dev.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    c = 3 if a.model == "cifar10" else cfg.channels
    x0, labels, rounds = batches(a.ranges, a.batch, c, cfg.image_size, cfg.num_classes, dev, a.warmup + a.steps)
    ac = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0).float().to(dev)
    bf16 = lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)
    cond = bool(cfg.num_classes) and a.model != "cifar10"
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    results, first = {}, {}
    # autocast does not reach convolutions under vmap (their batching rule runs them in fp32 while linear
    # layers still autocast, so dtypes clash): the joint variant runs in fp32 (TF32 on a GPU), and the
    # separate loop is measured both ways
    variants = (("separate, bf16 autocast (our loop)", run_separate, bf16),
                ("separate, fp32", run_separate, contextlib.nullcontext),
                ("joint (vmap), fp32", run_joint, contextlib.nullcontext))
    for variant, fn, autocast in variants:
        fn(base, a.ranges, x0, labels, rounds[:a.warmup], ac, autocast, dev, cond)        # warm-up (fresh models)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        losses = fn(base, a.ranges, x0, labels, rounds, ac, autocast, dev, cond)
        if cuda:
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        first[variant] = losses[0].float().cpu()
        ips = a.ranges * a.batch * len(rounds) / sec
        results[variant] = ips
        print(json.dumps({"bench": "joint_ranges", "model": a.model, "variant": variant, "device": name,
                          "ranges": a.ranges, "batch_per_range": a.batch, "images_per_s": round(ips, 1),
                          "ratio_vs_our_loop": round(ips / results[variants[0][0]], 2)}), flush=True)
    diff = (first[variants[2][0]] - first[variants[1][0]]).abs().max().item()
    print(json.dumps({"bench": "joint_ranges", "check": "first-round losses, joint vs separate (fp32)",
                      "max_abs_diff": diff, "losses": first[variants[1][0]].tolist()}), flush=True)


if __name__ == "__main__":
    main()
