"""Merging in parameter space (docs/method.md §3, Eq. 8) and its alternatives.

Task vector of range i: τ_i = θ_i − θ over every floating-point tensor (projections included: the base gets
identity projections, so τ = W_i − I); integer buffers are skipped. Task arithmetic:
θ_merged = θ + Σ_i w_i τ_i (weights need not sum to 1). Alternatives: uniform averaging, TIES
(Yadav et al. 2023: trim, elect sign, disjoint mean), DARE (Yu et al. 2024: drop and rescale) and task arithmetic
with weights learned on the validation images (:mod:`deme.learned`, per range or per range and block).
"""

from __future__ import annotations

import copy
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from .config import Config
from .errors import MergeMismatchError
from .learned import cached_merge_weights
from .progress import tqdm
from .registry import add_entry

StateDict = Mapping[str, torch.Tensor]


def check_compatible(base: StateDict, experts: Sequence[StateDict]) -> None:
    """Raise :class:`MergeMismatchError` naming the first key or shape that differs between checkpoints."""
    for i, sd in enumerate(experts):
        missing = [k for k in base if k not in sd]
        extra = [k for k in sd if k not in base]
        if missing or extra:
            k = (missing or extra)[0]
            where = "missing from" if missing else "not in the base but in"
            raise MergeMismatchError(f"key {k!r} is {where} expert {i}; experts must share the base model's "
                                     "architecture (same config, same projection setting)")
        for k, v in base.items():
            if sd[k].shape != v.shape:
                raise MergeMismatchError(f"key {k!r}: shape {tuple(sd[k].shape)} in expert {i} vs "
                                         f"{tuple(v.shape)} in the base")


def task_vectors(base: StateDict, experts: Sequence[StateDict]) -> list[dict[str, torch.Tensor]]:
    """τ_i = θ_i − θ for every floating-point tensor (float32, for inspection and TIES/DARE)."""
    check_compatible(base, experts)
    return [{k: sd[k].to(v.device).float() - v.float() for k, v in base.items() if v.is_floating_point()}
            for sd in experts]


def apply_task_vector(base: StateDict, delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """θ + δ for floating-point tensors (cast back to each tensor's dtype); other tensors copied from θ."""
    return {k: (v.double() + delta[k].double()).to(v.dtype) if k in delta else v.clone() for k, v in base.items()}


def task_arithmetic(base: StateDict, experts: Sequence[StateDict],
                    weights: Sequence[float] | Callable[[str], Sequence[float]]) -> dict[str, torch.Tensor]:
    """Eq. 8: θ_merged = θ + Σ_i w_i τ_i, computed tensor by tensor in float64 and cast back, so that w = 0
    gives θ and w = e_i gives θ_i bit for bit. Integer buffers are copied from θ. ``weights``: one per expert,
    or a function of a tensor's name giving them (a layer-wise merge, e.g. :meth:`deme.learned.LearnedWeights.of`)."""
    weights_of = weights if callable(weights) else (lambda key: weights)
    if not callable(weights) and len(weights) != len(experts):
        raise ValueError(f"{len(weights)} weights for {len(experts)} experts")
    check_compatible(base, experts)
    out = {}
    for k, v in base.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.double()
        for w, sd in zip(weights_of(k), experts, strict=True):
            if w:
                acc = acc + w * (sd[k].to(v.device).double() - v.double())
        out[k] = acc.to(v.dtype)
    return out


def uniform_average(base: StateDict, experts: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """Plain averaging of the experts = task arithmetic with w_i = 1/N."""
    return task_arithmetic(base, experts, [1.0 / len(experts)] * len(experts))


def ties(base: StateDict, experts: Sequence[StateDict], density: float = 0.2, scale: float = 1.0) \
        -> dict[str, torch.Tensor]:
    """TIES-merging: keep the top-``density`` fraction of each task vector by magnitude (per tensor), elect
    each entry's sign as the sign of the sum of the trimmed values, average the trimmed values that agree
    with it (disjoint mean), and add ``scale`` times the result to θ."""
    taus = task_vectors(base, experts)
    delta = {}
    for k in taus[0]:
        stacked = torch.stack([tau[k] for tau in taus])             # (N, ...)
        flat = stacked.reshape(len(taus), -1)
        keep = max(1, int(round(density * flat.shape[1])))
        thresh = flat.abs().topk(keep, dim=1).values[:, -1:]           # per expert
        trimmed = torch.where(flat.abs() >= thresh, flat, torch.zeros_like(flat))
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        count = agree.sum(0).clamp(min=1)
        merged = (trimmed * agree).sum(0) / count
        delta[k] = scale * merged.reshape(stacked.shape[1:])
    return apply_task_vector(base, delta)


def dare(base: StateDict, experts: Sequence[StateDict], weights: Sequence[float], drop: float = 0.5,
         seed: int = 0) -> dict[str, torch.Tensor]:
    """DARE: drop each task-vector entry with probability ``drop``, rescale survivors by 1/(1 − drop), then
    task arithmetic with ``weights``. Seeded: the same seed drops the same entries."""
    if not 0 <= drop < 1:
        raise ValueError(f"drop must lie in [0, 1), got {drop}")
    g = torch.Generator().manual_seed(seed)
    taus = task_vectors(base, experts)
    sparse = []
    for tau in taus:
        out = {}
        for k in sorted(tau):
            keep = (torch.rand(tau[k].shape, generator=g) >= drop).float().to(tau[k].device)   # CPU stream
            out[k] = tau[k] * keep / (1 - drop)
        sparse.append(out)
    delta = {k: sum(w * tau[k].double() for w, tau in zip(weights, sparse)) for k in sparse[0]}
    return apply_task_vector(base, delta)


# ---------------------------------------------------------------------------------------------------------
# The merge-method registry: one entry per method; the ablations' merge-method table reads it
# ---------------------------------------------------------------------------------------------------------

PAPER_MERGE_WEIGHTS = (0.1, 0.1, 0.2, 0.5)
"""The only merge weights the paper gives (LSUN-Church, N = 4, low → high noise; docs/method.md §3)."""


@dataclass(frozen=True)
class MergeData:
    """What a method that fits its weights on held-out data gets beside the state dicts: the profile ``cfg`` (it
    fits on its validation images, :func:`deme.heldout.validation_inputs`), a ``template`` module of the experts'
    architecture (an expert) and ``cache_dir``, where its fits are kept (None: fitted at every call)."""

    cfg: Config
    template: nn.Module
    cache_dir: Path | None = None


@dataclass(frozen=True)
class MergeMethod:
    """A way to combine N experts with the base: ``merge(base, experts)`` → state dict, with the method's
    settings fixed in the entry (so its ``label`` says exactly what was merged). A ``fitted`` method chooses on
    held-out data: ``merge(base, experts, data)`` with a :class:`MergeData`. Call the entry itself, which passes
    ``data`` to the methods that take it. ``num_experts``: the only N the method is defined for (None: any);
    the merge-method table leaves it out for other N (:meth:`applies`)."""

    name: str
    label: str
    source: str
    merge: Callable[..., dict[str, torch.Tensor]]
    fitted: bool = False
    num_experts: int | None = None

    def applies(self, num_experts: int) -> bool:
        return self.num_experts in (None, num_experts)

    def __call__(self, base: StateDict, experts: Sequence[StateDict], data: MergeData | None = None) \
            -> dict[str, torch.Tensor]:
        if not self.fitted:
            return self.merge(base, experts)
        if data is None:
            raise ValueError(f"merge method {self.name!r} fits its weights on validation images: pass "
                             "data=MergeData(cfg, template)")
        return self.merge(base, experts, data)


def learned_merge(base: StateDict, experts: Sequence[StateDict], data: MergeData, layerwise: bool = False) \
        -> dict[str, torch.Tensor]:
    """Task arithmetic with weights learned on the validation images of ``data.cfg`` by gradient descent
    (:func:`deme.learned.cached_merge_weights`; per range, or per range and block group with ``layerwise``)."""
    check_compatible(base, experts)
    fit = cached_merge_weights(data.template, base, experts, data.cfg, layerwise=layerwise, cache_dir=data.cache_dir)
    return task_arithmetic(base, experts, fit.of)


LEARNED = {"learned": False, "learned-layerwise": True}
"""The merge methods whose weights are fitted by gradient descent (:mod:`deme.learned`): name → layer-wise."""


MERGE_METHODS: dict[str, MergeMethod] = {m.name: m for m in (
    MergeMethod("uniform", "uniform average (w = 1/N)", "task arithmetic with equal weights",
                uniform_average),
    MergeMethod("paper", "task arithmetic, paper weights (0.1, 0.1, 0.2, 0.5)",
                "the authors' released code (LSUN-Church, N = 4)",
                lambda base, experts: task_arithmetic(base, experts, PAPER_MERGE_WEIGHTS), num_experts=4),
    MergeMethod("ties", "TIES (density 0.2)", "Yadav et al., NeurIPS 2023",
                lambda base, experts: ties(base, experts, density=0.2)),
    MergeMethod("dare", "DARE (drop 0.5, w = 1/N)", "Yu et al., ICML 2024",
                lambda base, experts: dare(base, experts, [1.0 / len(experts)] * len(experts), drop=0.5, seed=0)),
    *(MergeMethod(name, f"task arithmetic, learned w (per range{' × block' if layerwise else ''})",
                  f"AdaMerging (Yang et al., ICLR 2024), {'layer-wise by block' if layerwise else 'task-wise'}, "
                  "on the validation held-out loss", functools.partial(learned_merge, layerwise=layerwise),
                  fitted=True) for name, layerwise in LEARNED.items()),
)}
"""Merge methods compared beside DeMe's searched task arithmetic (whose weights come from notebook 04)."""


def register_merge_method(method: MergeMethod) -> MergeMethod:
    """Add a merge method; the merge-method comparison of notebook 06 scores it from then on."""
    return add_entry(MERGE_METHODS, method, "merge method")


def merged_model(template: nn.Module, state: StateDict) -> nn.Module:
    """A copy of ``template`` (e.g. an expert: same class, projections included) holding ``state``."""
    model = copy.deepcopy(template)
    model.load_state_dict(state)
    return model


def weight_grid(num_experts: int, values: Iterable[float]) -> list[tuple[float, ...]]:
    """All weightings with each w_i in ``values`` (the paper's grid search)."""
    return list(itertools.product(tuple(values), repeat=num_experts))


def grid_search(candidates: Sequence[tuple[float, ...]], score: Callable[[tuple[float, ...]], float],
                progress: bool = False) -> list[tuple[tuple[float, ...], float]]:
    """Score every candidate weighting (lower is better) and return ``(weights, score)`` sorted best first."""
    results = [(tuple(w), float(score(tuple(w)))) for w in tqdm(candidates, disable=not progress, desc="grid")]
    return sorted(results, key=lambda r: r[1])


def task_vector_norms(base: StateDict, experts: Sequence[StateDict]):
    """How far each expert moved: ‖τ_i‖₂ over every floating-point tensor, max |τ_i|, and ‖W_i − I‖ of its
    channel projections (0 without them), one row per range."""
    rows = []
    for i, tau in enumerate(task_vectors(base, experts)):
        flat = torch.cat([v.flatten() for v in tau.values()])
        proj = [v.flatten() for k, v in tau.items() if "channel_projection" in k]
        rows.append({"range": i, "‖τ‖": flat.norm().item(), "max |τ|": flat.abs().max().item(),
                     "‖W − I‖ (projections)": torch.cat(proj).norm().item() if proj else 0.0})
    return pd.DataFrame(rows).set_index("range")
