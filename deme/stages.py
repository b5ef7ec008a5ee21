"""The pipeline's stages as functions the notebooks call (DESIGN.md, data flow): base model → per-range
finetuning → merge. Each stage reads the previous one's outputs under runs/<profile>/ and skips work whose
outputs exist for the same config.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ROOT, Config
from .models import base_model_path, load_unet
from .train import heldout_loss, run_dir, train


def ensure_base_model(cfg: Config, allow_training: bool = True) -> str:
    """The path of the profile's pretrained base model, pretraining it first where the project owns it.

    Paper profiles: the hub id (loaded by :func:`deme.models.load_unet`). ``fmnist``: the committed
    checkpoint under data/ (pretrained by notebook 02 when missing — hours on a CPU). ``smoke``: trained in
    seconds under runs/smoke/base.
    """
    path = base_model_path(cfg)
    if cfg.pretrained or (Path(path) / "config.json").exists():
        return path
    if not allow_training:
        raise FileNotFoundError(f"no base model at {path}; run notebooks/02_base_model.ipynb first")
    out = train(cfg.replace(method="pretrain"), Path(path).parent)
    return str(out / "model")


def expert_dir(cfg: Config, range_index: int) -> Path:
    return run_dir(cfg.replace(method="deme", range_index=range_index))


def load_experts(cfg: Config, device: str | torch.device = "cpu") -> list[torch.nn.Module]:
    """The N finetuned range models of ``cfg`` (EMA weights), range 0 (low noise) first."""
    experts = []
    for i in range(cfg.num_ranges):
        d = expert_dir(cfg, i) / "model"
        if not (d / "config.json").exists():
            raise FileNotFoundError(f"range {i} of N={cfg.num_ranges} is not trained ({d} missing): run "
                                    f"`papermill notebooks/03_train.ipynb out.ipynb -p range {i}` "
                                    f"(or `python -m deme.train --profile {cfg.profile} --range {i}`)")
        experts.append(load_unet(d).to(device).eval())
    return experts


def load_base(cfg: Config, projection: bool, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The pretrained base θ, with identity projections when ``projection`` (the reference of the merge)."""
    return load_unet(ensure_base_model(cfg), projection=projection).to(device).eval()


def merge_dir(cfg: Config) -> Path:
    return ROOT / "runs" / cfg.profile / "merge" / f"N{cfg.num_ranges}"


def heldout_criterion(cfg: Config, images: torch.Tensor, labels: torch.Tensor | None):
    """A cheap merge criterion: the full-range held-out diffusion loss (fixed images, noise and timesteps)
    of a state dict loaded into a template model."""
    def score(model) -> float:
        return heldout_loss(model, cfg, images, labels)["loss"]
    return score


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)
