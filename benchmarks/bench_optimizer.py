"""AdamW implementations on the fmnist model's parameters (the student, projections included): milliseconds
per optimizer step of torch's single-tensor loop (what ``deme.train`` uses on the CPU), ``foreach`` and
``fused``, and how far each one's parameters end from the single-tensor loop's after the same steps. Not part
of the test suite.

    python benchmarks/bench_optimizer.py --steps 50
"""
import argparse
import copy
import json
import time

import torch

from deme.config import get_profile
from deme.models import build_unet, with_projections


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="alternated rounds per variant (median)")
    a = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    model = with_projections(build_unet(get_profile("fmnist"))).to(device)
    variants = {"single": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True)}
    times, final = {v: [] for v in variants}, {}
    for _ in range(a.repeats):
        for name, kw in variants.items():
            params = list(copy.deepcopy(model).parameters())
            g = torch.Generator(device).manual_seed(0)
            for q in params:
                q.grad = torch.randn(q.shape, generator=g, device=device) * 1e-3
            opt = torch.optim.AdamW(params, lr=5e-5, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8, **kw)
            opt.step()                                            # state allocation outside the timing
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(a.steps):
                opt.step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append((time.perf_counter() - t0) / a.steps)
            final[name] = torch.cat([q.detach().flatten() for q in params])
    ms = {v: 1e3 * sorted(t)[len(t) // 2] for v, t in times.items()}
    for v in variants:
        print(json.dumps({"bench": "adamw_step", "variant": v, "device": dev,
                          "parameters": sum(q.numel() for q in model.parameters()), "ms_per_step": round(ms[v], 2),
                          "ratio_vs_single": round(ms["single"] / ms[v], 2),
                          "max_abs_diff_vs_single": float((final[v] - final["single"]).abs().max())}), flush=True)


if __name__ == "__main__":
    main()
