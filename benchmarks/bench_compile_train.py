"""torch.compile inside the real training loop (deme.train.train), against the same run in eager mode.

    python benchmarks/bench_compile_train.py --steps 300 --modes eager default reduce-overhead   # GPU

Trains range 0 of the fmnist profile for ``--steps`` optimizer steps once per mode (a fresh run folder each,
same seed), and prints one JSON line per mode: total wall time (compilation included), time to the first
logged interval, the steady rate (images/s over the logged intervals after the first), the final logged loss
and its difference from the eager run. The ratio is the steady rate over eager's from the same invocation.
"""
import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from deme.config import get_profile
from deme.stages import ensure_base_model
from deme.train import device_name, train

p = argparse.ArgumentParser()
p.add_argument("--profile", default="fmnist")
p.add_argument("--steps", type=int, default=300)
p.add_argument("--log-every", type=int, default=25)
p.add_argument("--modes", nargs="+", default=["eager", "default"],
               help="eager, or torch.compile modes: default, reduce-overhead, max-autotune-no-cudagraphs")
a = p.parse_args()

cfg = get_profile(a.profile, method="deme", range_index=0, steps_per_range=a.steps, log_every=a.log_every,
                  checkpoint_every=a.steps, heldout_every=0)
base = ensure_base_model(cfg)
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
eager = None
with tempfile.TemporaryDirectory() as tmp:
    for mode in a.modes:
        c = cfg.replace(compile=mode != "eager", compile_mode=None if mode in ("eager", "default") else mode)
        t0 = time.time()
        out = train(c, Path(tmp) / mode, base=str(base), progress=False, force=True)
        total = time.time() - t0
        with open(out / "loss.csv") as f:
            rows = list(csv.DictReader(f))
        steady = [float(r["images_per_s"]) for r in rows[1:]]
        first_s = a.log_every * cfg.device_batch / float(rows[0]["images_per_s"])
        line = {"mode": mode, "device": device_name(dev), "steps": a.steps, "batch": cfg.device_batch,
                "total_s": round(total, 1), "first_interval_s": round(first_s, 1),
                "steady_images_per_s": round(sum(steady) / len(steady), 1) if steady else None,
                "final_loss": float(rows[-1]["loss"])}
        if eager is None and mode == "eager":
            eager = line
        if eager is not None and line["steady_images_per_s"] and eager["steady_images_per_s"]:
            line["ratio_vs_eager"] = round(line["steady_images_per_s"] / eager["steady_images_per_s"], 2)
            line["final_loss_minus_eager"] = line["final_loss"] - eager["final_loss"]
        print(json.dumps(line), flush=True)
