"""Benchmark: scoring models (DDIM sampling + Inception features + FID/KID, as notebooks 05/06 do) on a
multi-core CPU — one evaluation after another with all torch threads, against evaluations side by side in
Python threads with one torch thread each (sampling, resizing and Inception release the GIL). Not part of
the test suite. Prints one JSON line per variant (same tasks, same run) and the largest FID difference.
Measured on the 2-core CPU (benchmarks/results/cpu_2026-11-27.jsonl): 1.07× (90.5 s → 84.7 s for 4 × 200
samples, DDIM-50), FIDs equal to 1.3e-7 — too little to pay for threads in the library: notebooks 05/06
score one model at a time with both threads.

    python benchmarks/bench_eval_parallel.py --n 200 --steps 50 --tasks 4
"""
import argparse
import copy
import json
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from deme.compare import evaluate_model
from deme.config import get_profile
from deme.metrics import reference_statistics
from deme.models import load_unet
from deme.stages import base_model_path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--tasks", type=int, default=4, help="evaluations (model copies × seeds)")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    cfg = get_profile("fmnist")
    reference = reference_statistics(cfg, "train", n=cfg.fid_reference_size)
    base = load_unet(base_model_path(cfg))
    tasks = [(copy.deepcopy(base), seed) for seed in range(a.tasks)]
    threads = torch.get_num_threads()
    evaluate_model(base, cfg, 0, 8, reference, steps=2, conditional=False)          # warm-up / load Inception

    t0 = time.perf_counter()
    seq = [evaluate_model(m, cfg, s, a.n, reference, steps=a.steps, conditional=False) for m, s in tasks]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    with ThreadPoolExecutor(a.jobs) as pool:
        par = list(pool.map(lambda t: evaluate_model(t[0], cfg, t[1], a.n, reference, steps=a.steps,
                                                     conditional=False), tasks))
    torch.set_num_threads(threads)
    t_par = time.perf_counter() - t0
    diff = max(abs(x["uncond_fid"] - y["uncond_fid"]) for x, y in zip(seq, par))
    base_line = {"bench": "eval_parallel", "device": f"CPU, {threads} threads", "tasks": a.tasks, "n": a.n,
                 "steps": a.steps}
    print(json.dumps({**base_line, "variant": f"sequential, {threads} torch threads", "seconds": round(t_seq, 1),
                      "ratio": 1.0}))
    print(json.dumps({**base_line, "variant": f"{a.jobs} Python threads × 1 torch thread", "seconds": round(t_par, 1),
                      "ratio": round(t_seq / t_par, 2), "max_abs_fid_difference": diff}))


if __name__ == "__main__":
    main()
