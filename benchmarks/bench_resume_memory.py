"""Host memory of resuming a training run from its checkpoint: the peak resident set of one process while it
loads a checkpoint of a few hundred MB and restores model, EMA, optimizer and lr schedule as
``deme.train.train`` does — the old read (``torch.load`` of the whole file into private memory, the state kept
alive for the rest of the run) against :func:`deme.train.load_checkpoint` (memory-mapped, released after the
restore). Each variant runs in a fresh process; a sampling thread reads /proc/self/status every millisecond
(Linux only). Anonymous memory is each process's own; file-backed pages of a mapped checkpoint sit in the
page cache, shared by every process of a node that maps the same file, and are reclaimable. Not part of the
test suite.

    python benchmarks/bench_resume_memory.py                 # builds /tmp/deme_resume_bench/step_0000001.pt

Measured (benchmarks/results/cpu_2026-11-30_resume_memory.jsonl; 1,221 MiB checkpoint = model, EMA and two
AdamW moments of 305 MiB each): the whole read grows the anonymous memory by 1,529 MiB at its peak and keeps
1,290 MiB of it for the rest of the run; the mapped read by 307 MiB at its peak (the EMA's copy, which
replaces the EMA built before) and 68 MiB after the restore, its 976 MiB of file pages being page cache.
On the CPU the AdamW moments turn private page by page at the first step; on a GPU they are copied to the
device and the file pages stay shared by all processes of the node.
"""
import argparse
import gc
import json
import subprocess
import sys
import threading
import time
from pathlib import Path


def status() -> dict[str, int]:
    """RssAnon, RssFile, VmRSS and VmHWM of this process in MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
            out[key] = int(val.split()[0]) // 1024
    return out


def build(channels: tuple[int, ...]):
    """The student, its EMA and AdamW as the loop builds them (a UNet2DModel of the given widths)."""
    import torch
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                        block_out_channels=channels, down_block_types=("DownBlock2D",) * len(channels),
                        up_block_types=("UpBlock2D",) * len(channels), norm_num_groups=32)
    ema = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=False, foreach=True,
                   model_cls=type(model), model_config=model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    return model, ema, optimizer, lr_sched


def write_checkpoint(path: Path, channels: tuple[int, ...]) -> None:
    import torch

    from deme.train import _atomic_save
    model, ema, optimizer, lr_sched = build(channels)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()                       # AdamW state (exp_avg, exp_avg_sq) for every parameter
    ema.step(model.parameters())
    state = {"step": 1, "config": {}, "model": model.state_dict(), "ema": ema.state_dict(),
             "optimizer": optimizer.state_dict(), "lr_scheduler": lr_sched.state_dict(), "objective": {}}
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(state, path)


def measure(path: Path, mode: str, channels: tuple[int, ...]) -> dict:
    """One resume in this process: ``mode`` "whole" (the old read) or "mapped" (deme.train.load_checkpoint)."""
    import torch

    from deme.train import load_checkpoint
    model, ema, optimizer, lr_sched = build(channels)
    gc.collect()
    base = status()
    peak = dict(base)
    running = True

    def sample():
        while running:
            for k, v in status().items():
                peak[k] = max(peak[k], v)
            time.sleep(0.001)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    t0 = time.perf_counter()
    if mode == "whole":
        state = torch.load(path, map_location="cpu", weights_only=False)
    else:
        state = load_checkpoint(path)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    lr_sched.load_state_dict(state["lr_scheduler"])
    seconds = time.perf_counter() - t0
    if mode == "mapped":
        del state                          # deme.train releases the mapped state after the restore
    gc.collect()
    time.sleep(0.05)
    after = status()
    running = False
    thread.join()
    return {"mode": mode, "seconds": round(seconds, 2), "baseline_anon_mib": base["RssAnon"],
            "peak_anon_mib": peak["RssAnon"], "peak_anon_growth_mib": peak["RssAnon"] - base["RssAnon"],
            "peak_file_mib": peak["RssFile"], "peak_rss_mib": peak["VmRSS"], "vm_hwm_mib": after["VmHWM"],
            "anon_after_restore_mib": after["RssAnon"],
            "anon_growth_after_restore_mib": after["RssAnon"] - base["RssAnon"]}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--dir", default="/tmp/deme_resume_bench")
    p.add_argument("--channels", default="128,256,384,512",
                   help="UNet block widths (default: 80M parameters, a 1.2 GB checkpoint)")
    p.add_argument("--mode", choices=["whole", "mapped"], help="(internal) measure one variant in this process")
    a = p.parse_args()
    channels = tuple(int(c) for c in a.channels.split(","))
    path = Path(a.dir) / "step_0000001.pt"
    if a.mode:
        print(json.dumps(measure(path, a.mode, channels)))
        return
    if not path.is_file():
        write_checkpoint(path, channels)
    size = path.stat().st_size / 2**20
    print(f"checkpoint {path}: {size:.0f} MiB")
    for mode in ("whole", "mapped"):
        r = subprocess.run([sys.executable, __file__, "--dir", a.dir, "--channels", a.channels, "--mode", mode],
                           capture_output=True, text=True, check=True)
        rec = json.loads(r.stdout.strip().splitlines()[-1])
        rec["checkpoint_mib"] = round(size)
        print(json.dumps(rec))


if __name__ == "__main__":
    main()
