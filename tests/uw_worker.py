"""ANT-UW's log-variances under DDP, run by tests/test_paper_scale.py under ``torch.distributed.run --nproc_per_node 2``
(gloo on CPU) and once in the test's own process on both ranks' batches together.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/uw_worker.py OUT

Each process trains a DDP-wrapped linear "denoiser" with the UW objective for a few AdamW steps, the log-variances in
their own parameter group outside the DDP module, as deme.train.build_optimizer puts them; process r sees its own
batch (sample j in cluster j mod 5). Saves the log-variances and the weights each process ends with.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from deme.config import get_profile
from deme.mtl import cluster_timesteps, make_ant_objective

STEPS, BATCH = 4, 5


def batch(step: int, rank: int, bounds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Process ``rank``'s inputs, targets and timesteps at ``step`` (targets far from a fit: losses differ by cluster)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    t = cluster_timesteps(BATCH, bounds, g)
    x = torch.randn(BATCH, 4, generator=g)
    return x, x * (1 + t[:, None] / 200.0), t


def run(ranks: list[int], ddp: bool) -> dict:
    """Train on the batches of ``ranks`` (this process's own under DDP; all of them on one process)."""
    cfg = get_profile("smoke", method="ant-uw", batch_size=BATCH, ant_clusters=5)
    objective = make_ant_objective(cfg, torch.linspace(0.99, 0.01, 1000))
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    optimizer = torch.optim.AdamW([{"params": list(model.parameters())},
                                   {"params": objective.extra_parameters, "lr": cfg.ant_uw_lr, "weight_decay": 0.0}],
                                  lr=0.01, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    for step in range(STEPS):
        x, y, t = (torch.cat(v) for v in zip(*[batch(step, r, objective.bounds) for r in ranks]))
        loss = objective.combine(((net(x) - y) ** 2).mean(1), t, step, list(model.parameters()))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"log_vars": objective.log_vars.detach().clone(), "weight": model.weight.detach().clone()}


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.save(run([rank], ddp=True), Path(sys.argv[1]) / f"rank{rank}.pt")
    dist.destroy_process_group()
