"""Every training run of a full reproduction (`reproduce --full --sweeps`), run side by side, for a fixed time.

    python benchmarks/bench_reproduce_training.py --jobs 12 --limit 200     # GPU: all runs at once

The runs are those of the 03 stages (7 baselines, N ranges) and of notebook 06 with its sweeps (Table-3
variants, N and p sweeps; runs shared with 03 counted once). They train in ``--jobs`` worker processes,
longest first, into a scratch root (``DEME_ROOT``, default a temporary folder holding links to data/). Every
``--every`` seconds one JSON line reports the optimizer steps finished over all runs (from their loss logs);
at ``--limit`` the workers are stopped and a summary line gives the aggregate rate and the time the whole
training would take at that rate (an extrapolation: labelled as such), or the measured time if all runs
finished.
"""
import argparse
import csv
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# fresh runs; the committed base model, classifier and data stay readable
if __name__ == "__main__" and "DEME_ROOT" not in os.environ:
    scratch = Path(tempfile.mkdtemp(prefix="deme_bench_"))
    (scratch / "data").symlink_to(REPO / "data")
    os.environ["DEME_ROOT"] = str(scratch)
sys.path.insert(0, str(REPO))

from concurrent.futures import ProcessPoolExecutor  # noqa: E402
from multiprocessing import get_context  # noqa: E402

import torch  # noqa: E402

from deme import ablation as AB  # noqa: E402
from deme.config import get_profile  # noqa: E402
from deme.methods import baselines  # noqa: E402
from deme.stages import ensure_base_model  # noqa: E402
from deme.train import run_dir  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="fmnist")
    p.add_argument("--jobs", type=int, default=12)
    p.add_argument("--limit", type=float, default=200)
    p.add_argument("--every", type=float, default=10)
    a = p.parse_args()
    cfg = get_profile(a.profile)
    ensure_base_model(cfg)
    variants = {m: cfg.replace(method=m) for m in baselines()}
    variants["DeMe"] = cfg
    variants.update(AB.table3_variants(cfg))
    variants.update({f"sweep {k}": v for k, v in AB.sweep_variants(cfg, "N").items()})
    variants.update({f"sweep {k}": v for k, v in AB.sweep_variants(cfg, "p").items()})
    runs = {str(run_dir(c)): c for _, c in AB.variant_runs(variants)}   # runs shared by variants: once
    plan = sorted(runs.values(), key=lambda c: -AB.run_steps(c))
    total = sum(AB.run_steps(c) for c in plan)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(json.dumps({"device": dev, "runs": len(plan), "optimizer_steps": total, "jobs": a.jobs,
                      "batch": cfg.device_batch, "root": os.environ["DEME_ROOT"]}), flush=True)


    def steps_done() -> tuple[int, int]:
        n, finished = 0, 0
        for c in plan:
            d = run_dir(c)
            if (d / "manifest.json").exists():
                n, finished = n + AB.run_steps(c), finished + 1
            elif (d / "loss.csv").exists():
                with open(d / "loss.csv") as f:
                    rows = list(csv.DictReader(f))
                n += int(rows[-1]["step"]) if rows else 0
        return n, finished

    t0 = time.time()
    pool = ProcessPoolExecutor(a.jobs, mp_context=get_context("spawn"))
    futures = [pool.submit(AB._train_job, c, 1) for c in plan]
    done_all = threading.Event()
    errors = []

    def wait_all():
        try:
            for f in futures:
                f.result()
        except Exception as e:   # a run failed
            errors.append(f"{type(e).__name__}: {e}")
        done_all.set()
    threading.Thread(target=wait_all, daemon=True).start()
    while not done_all.wait(timeout=a.every) and time.time() - t0 < a.limit:
        n, fin = steps_done()
        print(json.dumps({"t_s": round(time.time() - t0), "steps": n, "runs_finished": fin}), flush=True)
    elapsed = time.time() - t0
    n, fin = steps_done()
    summary = {"device": dev, "jobs": a.jobs, "elapsed_s": round(elapsed, 1), "steps_done": n, "steps_total": total,
               "runs_finished": fin, "runs": len(plan),
               "aggregate_images_per_s": round(n * cfg.device_batch / elapsed, 1)}
    if errors:
        summary["error"] = errors[0]
    elif done_all.is_set():
        summary["measured_training_s"] = round(elapsed, 1)
    else:
        summary["extrapolated_training_s"] = round(total / max(n, 1) * elapsed, 1)
    for proc in list(pool._processes.values()):   # stop what still runs (at the limit, or after an error)
        proc.terminate()
    print(json.dumps(summary), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
