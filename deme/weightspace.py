"""Weight-space analyses (docs/method.md §1): loss landscapes of the base model per timestep range (Fig. 4),
the loss on the plane of two task vectors (Fig. 6a) and per-layer statistics of the task vectors τ_i = θ_i − θ
(Fig. 6b).

Every loss is the ε-MSE on a FIXED batch (fixed images, noise and stratified timesteps; see
:mod:`deme.analysis`), so two evaluations differ only through the weights and the value at a landscape's
origin equals the model's own loss on that batch.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .analysis import TensorDict, fixed_batch_loss
from .config import Config
from .learned import block_group
from .merge import check_compatible, task_arithmetic
from .progress import tqdm
from .ranges import config_ranges
from .timesteps import timestep_ranges

# ---------------------------------------------------------------------------------------------------------
# Loss landscapes (Fig. 4) and the task-vector plane (Fig. 6a)
# ---------------------------------------------------------------------------------------------------------

def filter_normalized_direction(model: nn.Module, seed: int = 0, one_dim: str = "zero") -> TensorDict:
    """A random direction in weight space, filter-normalised (Li et al., NeurIPS 2018).

    For every floating-point parameter with two or more dimensions (conv kernels (out, in, kh, kw), linear
    and embedding matrices, channel projections), a Gaussian tensor of the same shape is drawn and each
    filter — each slice along dim 0 — is rescaled to the Frobenius norm of the same filter of the weight:
    ``d_f ← d_f/‖d_f‖·‖θ_f‖``. One-dimensional parameters (biases, GroupNorm/LayerNorm scales and shifts):
    ``one_dim="zero"`` sets their direction to 0 (Li et al.'s "ignore biasbn", default), ``"weight"`` copies
    the weight itself (d = θ). Keys are ``named_parameters()`` names; tensors live on the CPU in float32.
    """
    if one_dim not in ("zero", "weight"):
        raise ValueError(f"one_dim must be 'zero' or 'weight', got {one_dim!r}")
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.named_parameters():
        if not p.is_floating_point():
            continue
        w = p.detach().float().cpu()
        if w.dim() <= 1:
            out[name] = torch.zeros_like(w) if one_dim == "zero" else w.clone()
            continue
        d = torch.randn(w.shape, generator=g)
        dn = d.reshape(len(d), -1).norm(dim=1).clamp_min(1e-12)
        wn = w.reshape(len(w), -1).norm(dim=1)
        out[name] = d * (wn / dn).reshape(-1, *([1] * (d.dim() - 1)))
    return out


class _Perturbed:
    """Context manager: set ``θ + Σ_k c_k d_k`` into a model's parameters (float64 sum, cast back), restore θ."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.params = dict(model.named_parameters())
        self.orig = {k: p.detach().clone() for k, p in self.params.items()}

    def set(self, coeffs: Sequence[float], directions: Sequence[Mapping[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                acc = self.orig[k].double()
                for c, d in zip(coeffs, directions):
                    if c and k in d:
                        acc = acc + float(c) * d[k].to(p.device).double()
                p.copy_(acc.to(p.dtype))

    def restore(self) -> None:
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.orig[k])

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def grid_coords(coords) -> tuple[np.ndarray, np.ndarray]:
    """The two axes of a 2-D grid: ``coords`` is one 1-D array used for both, or a pair ``(first, second)``."""
    if isinstance(coords, tuple) and len(coords) == 2 and np.ndim(coords[0]) == 1:
        return np.asarray(coords[0], float), np.asarray(coords[1], float)
    c = np.asarray(coords, float)
    return c, c


def loss_landscape_2d(model: nn.Module, cfg: Config, images: torch.Tensor, labels: torch.Tensor | None,
                      dir1: Mapping[str, torch.Tensor], dir2: Mapping[str, torch.Tensor], coords,
                      t_range: tuple[int, int] | None = None, seed: int = 0, batch_size: int | None = None,
                      progress: bool = False) -> np.ndarray:
    """The diffusion loss on the plane ``θ + α·d1 + β·d2`` (paper Fig. 4; Li et al. 2018).

    ``coords``: one array used for both α and β, or a pair ``(alphas, betas)``. The loss is
    :func:`fixed_batch_loss` (fixed noise from ``seed``, timesteps stratified inside ``t_range``, default
    [0, T)), so the value at α = β = 0 equals the model's own loss on the same batch and noise. The model's
    weights are restored afterwards. Returns an array of shape (len(alphas), len(betas)): ``out[i, j]`` at
    ``(alphas[i], betas[j])``.
    """
    alphas, betas = grid_coords(coords)
    out = np.empty((len(alphas), len(betas)))
    with _Perturbed(model) as pert:
        points = [(i, j) for i in range(len(alphas)) for j in range(len(betas))]
        for i, j in tqdm(points, disable=not progress, desc="landscape"):
            pert.set((alphas[i], betas[j]), (dir1, dir2))
            out[i, j] = fixed_batch_loss(model, cfg, images, labels, t_range, seed, batch_size)
    return out


def range_landscapes(model: nn.Module, cfg: Config, images: torch.Tensor, labels: torch.Tensor | None,
                     coords, num_ranges: int | None = None, seed: int = 0, direction_seeds: tuple[int, int] = (1, 2),
                     batch_size: int | None = None, progress: bool = False) -> dict[str, np.ndarray]:
    """Fig. 4: the landscape of ``model`` over the full range [0, T) and inside each of the N ranges, all on
    the same two filter-normalised directions (the run's ranges, :func:`deme.ranges.config_ranges`, or
    ``num_ranges`` equal ones when given). Keys ``"[0, T)"`` and ``"[lo, hi)"``, in that order."""
    d1 = filter_normalized_direction(model, direction_seeds[0])
    d2 = filter_normalized_direction(model, direction_seeds[1])
    T = cfg.num_train_timesteps
    ranges = [(0, T)] + (timestep_ranges(T, num_ranges) if num_ranges else config_ranges(cfg))
    return {f"[{lo}, {hi})": loss_landscape_2d(model, cfg, images, labels, d1, d2, coords, (lo, hi), seed,
                                               batch_size, progress) for lo, hi in ranges}


def landscape_summary(landscapes: Mapping[str, np.ndarray], coords):
    """One row per landscape: the loss at the origin, the grid's max and mean, ``max_ratio`` = max / origin,
    and the curvature at the origin along each direction by central differences with the grid points
    nearest to it, ``(L(h) + L(−h) − 2 L(0)) / h²`` (absolute, and relative to the loss at the origin)."""
    a, b = grid_coords(coords)
    ia, ib = int(np.argmin(np.abs(a))), int(np.argmin(np.abs(b)))
    rows = []
    for name, z in landscapes.items():
        z0 = float(z[ia, ib])
        row = {"range": name, "loss_at_origin": z0, "max": float(z.max()), "mean": float(z.mean()),
               "max_ratio": float(z.max() / z0) if z0 > 0 else float("nan")}
        for label, axis, c, i0 in (("alpha", 0, a, ia), ("beta", 1, b, ib)):
            if 0 < i0 < len(c) - 1:
                h = (c[i0 + 1] - c[i0 - 1]) / 2
                zp, zm = (z[i0 + 1, ib], z[i0 - 1, ib]) if axis == 0 else (z[ia, i0 + 1], z[ia, i0 - 1])
                curv = float((zp + zm - 2 * z0) / h ** 2)
            else:
                curv = float("nan")
            row[f"curvature_{label}"] = curv
            row[f"rel_curvature_{label}"] = curv / z0 if z0 > 0 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _reference_state(base_sd: Mapping[str, torch.Tensor], expert_sd: Mapping[str, torch.Tensor]) -> TensorDict:
    """The base state dict aligned to an expert's keys: channel projections the base lacks are the identity
    (the pretrained reference of the merge, τ = W_i − I); any other mismatch is left to the merge checks."""
    out = dict(base_sd)
    for k, v in expert_sd.items():
        if k not in out and k.endswith("channel_projection.weight"):
            out[k] = torch.eye(v.shape[0], dtype=v.dtype, device=v.device)
    return out


def task_vector_plane_loss(base: nn.Module, expert_a: nn.Module, expert_b: nn.Module, cfg: Config,
                           images: torch.Tensor, labels: torch.Tensor | None, coords,
                           t_range: tuple[int, int] | None = None, seed: int = 0, batch_size: int | None = None,
                           progress: bool = False) -> np.ndarray:
    """Fig. 6a: the training loss at ``θ + a·τ_a + b·τ_b`` over a grid, τ_x = θ_x − θ.

    ``coords``: one array for both a and b, or a pair ``(a_values, b_values)``. Weights are formed by
    :func:`deme.merge.task_arithmetic` (float64, so (0, 0) is θ and (1, 0) is θ_a bit for bit). The loss is
    :func:`fixed_batch_loss` (fixed noise, timesteps stratified inside ``t_range``, default [0, T)). A plain
    base is given identity projections when the experts carry them. Returns shape (len(a), len(b)).
    Points to mark: θ at (0, 0), θ_a at (1, 0), θ_b at (0, 1), a merge with weights (w_a, w_b) at (w_a, w_b).
    """
    a_vals, b_vals = grid_coords(coords)
    sd_a = {k: v.detach().cpu() for k, v in expert_a.state_dict().items()}
    sd_b = {k: v.detach().cpu() for k, v in expert_b.state_dict().items()}
    sd_0 = _reference_state({k: v.detach().cpu() for k, v in base.state_dict().items()}, sd_a)
    template = copy.deepcopy(expert_a)
    out = np.empty((len(a_vals), len(b_vals)))
    points = [(i, j) for i in range(len(a_vals)) for j in range(len(b_vals))]
    for i, j in tqdm(points, disable=not progress, desc="plane"):
        template.load_state_dict(task_arithmetic(sd_0, [sd_a, sd_b], [float(a_vals[i]), float(b_vals[j])]))
        out[i, j] = fixed_batch_loss(template, cfg, images, labels, t_range, seed, batch_size)
    return out


def plane_around_minimum(base: nn.Module, expert_a: nn.Module, expert_b: nn.Module, cfg: Config,
                         images: torch.Tensor, labels: torch.Tensor | None, coords, max_extensions: int = 2,
                         **kwargs) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray], bool]:
    """:func:`task_vector_plane_loss` on ``coords``, widened while its lowest point lies on the grid's edge: each
    time by half the grid's points beyond that edge (same spacing; only the new points are computed, every point
    with the same fixed batch), at most ``max_extensions`` times. Returns the loss, the axes ``(a, b)`` and
    whether the lowest point is inside the grid (False: the grid still cannot locate it)."""
    axes = list(grid_coords(coords))
    plane = task_vector_plane_loss(base, expert_a, expert_b, cfg, images, labels, tuple(axes), **kwargs)
    for extensions in range(max_extensions + 1):
        low = np.unravel_index(np.argmin(plane), plane.shape)
        edges = [(d, side) for d in (0, 1) for side in (-1, 1) if low[d] == (0 if side < 0 else len(axes[d]) - 1)]
        if not edges:
            return plane, tuple(axes), True
        if extensions == max_extensions:
            break
        for d, side in edges:                               # axis d (0: a, 1: b) grows beyond its low or high end
            axis = axes[d]
            k, step = max(1, (len(axis) - 1) // 2), axis[1] - axis[0]
            new = axis[0] - step * np.arange(k, 0, -1) if side < 0 else axis[-1] + step * np.arange(1, k + 1)
            part = task_vector_plane_loss(base, expert_a, expert_b, cfg, images, labels,
                                          (new, axes[1]) if d == 0 else (axes[0], new), **kwargs)
            pieces = [(new, part), (axis, plane)] if side < 0 else [(axis, plane), (new, part)]
            axes[d] = np.concatenate([x for x, _ in pieces])
            plane = np.concatenate([z for _, z in pieces], axis=d)
    return plane, tuple(axes), False


# ---------------------------------------------------------------------------------------------------------
# Task-vector statistics (Fig. 6b)
# ---------------------------------------------------------------------------------------------------------

QUANTILES = (0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0)


def task_vector_stats(base: nn.Module | Mapping[str, torch.Tensor],
                      experts: Sequence[nn.Module | Mapping[str, torch.Tensor]],
                      group: str | Callable[[str], str] = "parameter",
                      quantiles: Sequence[float] = QUANTILES, range_labels: Sequence[str] | None = None):
    """Fig. 6b: per-layer statistics of the task vectors τ_i = θ_i − θ, in long format.

    ``group``: ``"parameter"`` (one row per floating-point tensor and range), ``"block"``
    (:func:`block_group`) or a function of the parameter name. Channel projections the base lacks count from
    the identity. Columns: ``layer``, ``range`` (index i, 0 = low noise), ``range_label``, ``n``, ``mean``,
    ``std`` (population), ``abs_mean``, ``abs_max`` and one column ``q<percent>`` per quantile (numpy's
    linear interpolation; ``q0``/``q100`` are min and max) — enough for box plots drawn from statistics
    (:func:`deme.plots.plot_task_vector_boxes`).
    """
    as_sd = lambda m: {k: v.detach().cpu() for k, v in (m.state_dict() if isinstance(m, nn.Module) else m).items()}
    expert_sds = [as_sd(e) for e in experts]
    base_sd = _reference_state(as_sd(base), expert_sds[0])
    check_compatible(base_sd, expert_sds)
    key = {"parameter": lambda k: k, "block": block_group}.get(group, group) if isinstance(group, str) else group
    if not callable(key):
        raise ValueError(f"group must be 'parameter', 'block' or a function, got {group!r}")
    names = [k for k, v in base_sd.items() if v.is_floating_point()]
    groups: dict[str, list[str]] = {}
    for k in names:
        groups.setdefault(key(k), []).append(k)
    labels = list(range_labels) if range_labels is not None else [f"range {i}" for i in range(len(experts))]
    rows = []
    for i, sd in enumerate(expert_sds):
        for layer, keys in groups.items():
            v = np.concatenate([(sd[k].double() - base_sd[k].double()).reshape(-1).numpy() for k in keys])
            qs = np.quantile(v, quantiles)
            row = {"layer": layer, "range": i, "range_label": labels[i], "n": v.size, "mean": v.mean(),
                   "std": v.std(), "abs_mean": np.abs(v).mean(), "abs_max": np.abs(v).max()}
            row.update({f"q{100 * q:g}": float(x) for q, x in zip(quantiles, qs)})
            rows.append(row)
    return pd.DataFrame(rows)


def range_labels(cfg: Config) -> list[str]:
    """``"range i (t ∈ [lo, hi))"`` for each of the run's N ranges (:func:`deme.ranges.config_ranges`)."""
    return [f"range {i} (t ∈ [{lo}, {hi}))" for i, (lo, hi) in enumerate(config_ranges(cfg))]


def task_vector_spread(stats: pd.DataFrame) -> pd.Series:
    """The 5–95% spread of τ per range, averaged over blocks weighted by their parameter counts
    (:func:`task_vector_stats` rows), in range order."""
    spread = {r: float(np.average(g["q95"] - g["q5"], weights=g["n"])) for r, g in stats.groupby("range", sort=False)}
    return pd.Series(spread)

