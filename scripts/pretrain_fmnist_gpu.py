"""Pretrain the embedded default's base model within a wall-clock budget (used on a lent H100).

    python scripts/pretrain_fmnist_gpu.py --budget-s 420 --out /tmp/fmnist_base

Measures the optimizer-step rate of the fmnist pretraining config first, then sets ``pretrain_steps`` so the
run (warmup + cosine schedule, EMA) fits the budget, and trains with the one loop of ``deme.train``.
The result is what notebook 01 would produce on a CPU in many hours; the manifest records the device.
"""
import argparse
import json
import time

import torch

from deme.config import get_profile
from deme.models import build_unet
from deme.train import train

p = argparse.ArgumentParser()
p.add_argument("--budget-s", type=float, default=420)
p.add_argument("--batch", type=int, default=1024)
p.add_argument("--lr", type=float, default=1e-3)
p.add_argument("--out", default="/tmp/fmnist_base")
a = p.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
cfg = get_profile("fmnist", method="pretrain", pretrain_batch_size=a.batch, pretrain_lr=a.lr,
                  pretrain_warmup=1000, log_every=100, checkpoint_every=2000, heldout_size=2048)
model = build_unet(cfg).to(device)
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(a.batch, 1, 16, 16, device=device)
t = torch.randint(0, 1000, (a.batch,), device=device)
y = torch.randint(0, 11, (a.batch,), device=device)
for i in range(40):
    if i == 10:
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.time()
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = model(x, t, class_labels=y).sample.float().pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
if device == "cuda":
    torch.cuda.synchronize()
rate = 30 / (time.time() - t0)
steps = max(200, int(rate * a.budget_s * 0.75))   # 25% headroom for data, EMA, logging, held-out evals
steps = steps // 100 * 100
print(json.dumps({"device": device, "steps_per_s_model_only": rate, "pretrain_steps": steps}), flush=True)
cfg = cfg.replace(pretrain_steps=steps, heldout_every=max(100, steps // 40 // 100 * 100))
del model, opt
t0 = time.time()
out = train(cfg, a.out, progress=False)
print(json.dumps({"out": str(out), "wall_s": time.time() - t0}), flush=True)
