"""Merge weights learned by gradient descent on the held-out loss (docs/method.md §3.1).

The coordinate search (:func:`deme.stages.search_merge_weights`) picks w of θ(w) = θ + Σ_i w_i τ_i from a grid.
Here w is a continuous parameter, optimised by gradient descent on the *same* criterion: the mean held-out ε-MSE
of the validation images (:func:`deme.heldout.validation_inputs`) with the noise and stratified timesteps of
:func:`deme.heldout.heldout_losses` (seed 0, draw 0). That criterion is deterministic, so every step takes the
full validation set (in chunks whose gradients add up): the two methods optimise one number and differ only in
how they search. The merged model is never built: :func:`torch.func.functional_call` runs an expert's module on
the tensors θ(w), and autograd carries ∂L/∂θ(w) to ∂L/∂w_i = ⟨∂L/∂θ(w), τ_i⟩.

Two parameterisations, as AdaMerging's (Yang et al., ICLR 2024): one coefficient per range, or one per range and
block group (:func:`block_group`), so that an expert may change, say, the decoder but not the encoder.

Constraint: w ∈ [0, 1], by projection (clamped after every step), no penalty. w_i = 0 keeps the base's tensors
and w_i = 1 takes the expert's whole change; beyond 1 the merge extrapolates past anything trained, below 0 it
reverses what the expert learned — in both, the only evidence is a loss fitted on a few thousand images. The box
is also the coordinate search's grid range, so both choose from the same set. Clamping, unlike a sigmoid, reaches
0 and 1 exactly and starts exactly at uniform 1/N: an expert that does not help is switched off, not kept at a
small weight. Adam (its steps ≈ lr whatever the size of the tiny gradients) with the learning rate decaying
linearly to 0, so the iterate settles; the evaluated weights with the lowest loss are returned, the uniform start
among them, so the result never scores worse than uniform averaging on the validation images.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from .config import Config
from .heldout import draw_inputs, state_fingerprint, validation_inputs
from .losses import per_sample_mse
from .metrics import _default_device
from .models import conditioning_kwargs, make_scheduler
from .progress import tqdm
from .runs import write_json

StateDict = Mapping[str, torch.Tensor]


def block_group(key: str) -> str:
    """The block group of a parameter, for the layer-wise coefficients: ``down_blocks.i`` and ``up_blocks.i`` (its
    name's first two parts), else its first part (``conv_in``, ``time_embedding``, ``mid_block``, ``conv_out``…)."""
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


@dataclass
class LearnedWeights:
    """What :func:`fit_merge_weights` found: ``weights`` per block group (the single group ``"all"`` with one
    coefficient per range), the validation loss of every evaluated iterate (``losses``; index 0: the uniform
    start), the fit's wall time (``seconds``), its Adam ``steps`` (each a forward and backward pass over the
    validation images, plus one forward pass for the last iterate) and where it ran (``device``)."""

    weights: dict[str, tuple[float, ...]]
    losses: list[float]
    seconds: float
    steps: int
    device: str
    layerwise: bool = False

    def of(self, key: str) -> tuple[float, ...]:
        """The N coefficients of the tensor named ``key`` (for :func:`deme.merge.task_arithmetic`)."""
        return self.weights[block_group(key) if self.layerwise else "all"]

    @classmethod
    def from_dict(cls, record: dict) -> "LearnedWeights":
        return cls(**{**record, "weights": {g: tuple(w) for g, w in record["weights"].items()}})


def merged_tensors(theta: StateDict, taus: StateDict, w: torch.Tensor, row: Mapping[str, int]) \
        -> dict[str, torch.Tensor]:
    """θ(w) = θ + Σ_i w[row(k), i] τ_i[k] for every tensor k, differentiable in ``w`` (groups × N); ``taus[k]``
    stacks the N task vectors of tensor k. w = 0 returns θ's values exactly."""
    return {k: theta[k] + torch.tensordot(w[row[k]], taus[k], dims=1) for k in theta}


def _criterion(cfg: Config, images: torch.Tensor, cond):
    """The noisy inputs, noise, timesteps and model inputs of :func:`deme.heldout.heldout_losses` (seed 0, draw 0)."""
    noise, t = draw_inputs(len(images), tuple(images.shape[1:]), (0, cfg.num_train_timesteps))
    return make_scheduler(cfg).add_noise(images, noise, t), noise, t, conditioning_kwargs(cond)


def fit_merge_weights(template: nn.Module, base: StateDict, experts: Sequence[StateDict], cfg: Config,
                      images: torch.Tensor, cond, *, layerwise: bool = False, steps: int | None = None,
                      lr: float | None = None, batch_size: int = 500, device: str | torch.device | None = None,
                      progress: bool = False) -> LearnedWeights:
    """Merge weights w ∈ [0, 1] minimising the held-out ε-MSE of θ + Σ_i w_i τ_i on ``images``/``cond`` (the
    criterion of :func:`deme.heldout.heldout_losses`; the module docstring says why the box and the optimiser).

    ``template``: a module of the experts' architecture (run with :func:`torch.func.functional_call`; not
    changed). ``layerwise``: one coefficient per range and :func:`block_group` instead of one per range. Starts
    at w = 1/N; ``steps`` Adam steps (default ``cfg.merge_learn_steps``) at ``lr`` (``cfg.merge_learn_lr``)
    decaying linearly to 0, each on the whole set in chunks of ``batch_size``. float32 on ``device``."""
    steps = cfg.merge_learn_steps if steps is None else steps
    lr = cfg.merge_learn_lr if lr is None else lr
    device = torch.device(device) if device is not None else _default_device()
    started = time.time()
    floats = [k for k, v in base.items() if v.is_floating_point()]
    groups = list(dict.fromkeys(map(block_group, floats))) if layerwise else ["all"]
    row = {k: groups.index(block_group(k)) if layerwise else 0 for k in floats}
    theta = {k: base[k].to(device, torch.float32) for k in floats}
    taus = {k: torch.stack([e[k].to(device, torch.float32) - theta[k] for e in experts]) for k in floats}
    fixed = {k: v.to(device) for k, v in base.items() if k not in theta}
    model = copy.deepcopy(template).to(device).eval()
    noisy, noise, t, kw = _criterion(cfg, images, cond)
    n = len(images)
    w = torch.full((len(groups), len(experts)), 1.0 / len(experts), device=device, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / max(steps, 1))

    def loss(backward: bool) -> float:
        total = 0.0
        for i in range(0, n, batch_size):
            s = slice(i, i + batch_size)
            with torch.set_grad_enabled(backward), torch.autocast(device.type, enabled=False):
                inputs = (noisy[s].to(device), t[s].to(device))
                pred = functional_call(model, {**merged_tensors(theta, taus, w, row), **fixed}, inputs,
                                       {k: v[s].to(device) for k, v in kw.items()}).sample
                part = per_sample_mse(pred, noise[s].to(device)).sum() / n
            if backward:
                part.backward()
            total += part.item()
        return total

    losses, best = [], None
    for step in tqdm(range(steps + 1), disable=not progress, desc="learned merge weights", mininterval=30):
        opt.zero_grad(set_to_none=True)
        losses.append(loss(backward=step < steps))
        if best is None or losses[-1] < losses[best[0]]:
            best = (step, w.detach().cpu().clone())
        if step < steps:
            opt.step()
            decay.step()
            with torch.no_grad():
                w.clamp_(0.0, 1.0)
    weights = {g: tuple(float(v) for v in best[1][i]) for i, g in enumerate(groups)}
    return LearnedWeights(weights, losses, time.time() - started, steps, str(device), layerwise)


def cached_merge_weights(template: nn.Module, base: StateDict, experts: Sequence[StateDict], cfg: Config, *,
                         layerwise: bool = False, cache_dir: Path | None = None,
                         device: str | torch.device | None = None, progress: bool = False) -> LearnedWeights:
    """:func:`fit_merge_weights` on the validation images of ``cfg`` (:func:`deme.heldout.validation_inputs`),
    kept as JSON under ``cache_dir`` (None: not kept) by a fingerprint of the base, the experts, the validation
    inputs and the fit's settings: a retrained expert or another setting fits again; a hit keeps the first fit's
    wall time (its cost)."""
    x, cond = validation_inputs(cfg)
    inputs = {"x": x, **({"cond": cond} if torch.is_tensor(cond) else dict(cond or {}))}
    settings = json.dumps(dict(layerwise=layerwise, steps=cfg.merge_learn_steps, lr=cfg.merge_learn_lr), sort_keys=True)
    key = state_fingerprint([base, *experts, inputs], settings)
    path = Path(cache_dir) / f"learned{'_layerwise' if layerwise else ''}_{key}.json" if cache_dir else None
    if path is not None and path.exists():
        return LearnedWeights.from_dict(json.loads(path.read_text()))
    fit = fit_merge_weights(template, base, experts, cfg, x, cond, layerwise=layerwise, device=device,
                            progress=progress)
    if path is not None:
        write_json(path, dataclasses.asdict(fit))
    return fit
