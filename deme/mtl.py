"""The ANT baselines (Go et al., NeurIPS 2023, "Addressing Negative Transfer in Diffusion Models") as objectives
of the one training loop (:func:`deme.train.train`), docs/method.md §5.

Denoising at different timesteps is treated as multi-task learning over ``k = cfg.ant_clusters`` *timestep
clusters*:

* **Clusters.** ANT groups timesteps by *interval clustering* (contiguous intervals chosen by a dynamic program
  on a per-timestep cost). Here the default is ``k`` equal contiguous clusters of ``[0, T)``
  (:func:`cluster_bounds`): this is exactly the optimum of interval clustering on the timestep index itself
  (1-D k-means on ``0..T−1`` has equal-sized intervals as its unique optimum when ``k`` divides ``T``; the
  tests check it with :func:`interval_clusters`). Other clusterings (e.g. on log-SNR,
  ``interval_clusters(log_snr, k)``) can be passed as ``bounds=`` to the objectives.
* **Batch split.** Sample ``j`` of a micro-batch draws its timestep uniformly from cluster ``j mod k``
  (:func:`cluster_timesteps`), so every cluster is present in every micro-batch of at least ``k`` images.
  ``L_i`` is the mean ε-MSE of cluster ``i``'s samples (:func:`cluster_losses`); which cluster a sample belongs
  to is read off its timestep, not its position.
* **ANT-UW** (:class:`UncertaintyWeightingObjective`, Kendall et al. 2018): ``L = Σ_i ½(e^{−s_i} L_i + s_i)``
  with learnable log-variances ``s_i`` initialised at 0. They are the objective's ``extra_parameters`` and are
  trained by the loop's AdamW together with the model (same lr, betas and weight decay). For fixed ``L_i`` the
  minimiser is ``s_i = log L_i``. Two consequences worth knowing when reading results: at ``s = 0`` the loss is
  ``½ Σ_i L_i`` (a sum over clusters, ≈ k/2 times the mean ε-MSE), and with the finetuning lr (5e-5) Adam
  moves each ``s_i`` by at most ~lr per step, i.e. ≲ 0.06 over 1200 steps, so UW stays close to equal weights
  on short schedules.
* **ANT-NashMTL** (:class:`NashMTLObjective`, Navon et al., ICML 2022): every ``cfg.nash_every`` optimizer
  steps (at the first micro-batch of such a step) the per-cluster gradients ``g_i = ∇_θ L_i`` of the model
  parameters are computed, and ``α > 0`` solving ``(GᵀG) α = 1/α`` is found (:func:`solve_nash`); α is kept
  between refreshes and the loss is ``Σ_i α_i L_i``. At a refresh the resulting update ``d = Gα`` satisfies
  ``g_iᵀ d = 1/α_i`` and ``‖d‖² = αᵀGᵀGα = k``: its scale is fixed by the bargaining solution, not by the
  gradients' scale (the loop's grad-norm clip then applies as usual). A refresh costs k extra backward passes
  (``torch.autograd.grad(..., retain_graph=True)``) and holds k gradient copies at once.

Solving the Nash system: ``(GᵀG)α = 1/α`` is the stationarity condition of the convex function
``f(α) = ½ αᵀ(GᵀG)α − Σ_i log α_i`` on ``α > 0`` (strictly convex when GᵀG ≻ 0). ``f`` is a quadratic plus a
log-barrier, hence self-concordant, so damped Newton — step ``1/(1+λ)`` while the Newton decrement ``λ ≥ ¼``,
full steps after — stays inside ``α > 0`` and converges globally, quadratically at the end. It runs in float64
on the k×k Gram matrix rescaled to the gradients' correlation matrix (``α = Dβ`` with ``D = diag(GᵀG)^{-1/2}``
turns the system into ``Cβ = 1/β``, ``C = D GᵀG D``, so gradient norms spread over many orders of magnitude
cost nothing), with a 1e-12 ridge on C as a guard against singular Gram matrices. A cluster whose gradient is
exactly zero has no finite Nash weight: it is left out of the solve and given the largest weight of the
others.

Devices: the UW log-variances are created on ``device`` (default: the device of ``alphas_cumprod``). When the
loop hands the objective the CPU ``alphas_cumprod`` but trains on a GPU, the log-variances are moved to the
GPU at the first :meth:`combine` of a fresh run (before the optimizer holds any state for them); on a resumed
run (optimizer state already on the CPU) they stay on the CPU and enter the loss through a differentiable copy.
Both are correct; passing the device ``alphas_cumprod`` avoids the second, slower path.

Several processes (DDP): the per-cluster losses seen by ``s`` and the per-cluster gradients of the Nash solve
are averaged over processes, so ``s`` and ``α`` stay identical on every process.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .config import Config
from .objectives import Objective

__all__ = [
    "cluster_bounds", "interval_clusters", "cluster_index", "cluster_timesteps", "cluster_losses",
    "uw_loss", "solve_nash", "nash_residual", "cluster_gradient_gram",
    "ANTObjective", "UncertaintyWeightingObjective", "NashMTLObjective", "make_ant_objective",
]

Bounds = list[tuple[int, int]]


# ---------------------------------------------------------------------------------------------------------
# Timestep clusters
# ---------------------------------------------------------------------------------------------------------

def cluster_bounds(num_timesteps: int, num_clusters: int) -> Bounds:
    """``k`` equal contiguous clusters of ``[0, T)`` as half-open ``(low, high)`` pairs (the default clustering).

    Cluster ``i`` is ``[⌊iT/k⌋, ⌊(i+1)T/k⌋)``; when ``k`` does not divide ``T`` the sizes differ by at most one.
    """
    if not 1 <= num_clusters <= num_timesteps:
        raise ValueError(f"ant_clusters={num_clusters} must lie in 1..T={num_timesteps}")
    edges = [i * num_timesteps // num_clusters for i in range(num_clusters + 1)]
    return [(edges[i], edges[i + 1]) for i in range(num_clusters)]


def interval_clusters(values: Sequence[float] | np.ndarray | torch.Tensor, num_clusters: int) -> Bounds:
    """Interval clustering, squared-deviation variant: split ``0..T−1`` into ``k`` contiguous intervals minimising
    the total within-interval sum of squared deviations of ``values[t]`` from the interval mean (dynamic
    programming, O(k·T²)). ANT clusters timesteps into contiguous intervals in this way; its own cost functions
    (timestep-, SNR- or gradient-based) are not reproduced here beyond what ``values`` expresses.

    ``values`` is a per-timestep feature, e.g. ``log SNR(t)``; on ``values = t`` the optimum is the equal
    split of :func:`cluster_bounds`.
    """
    v = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64)
    T, k = len(v), num_clusters
    if not 1 <= k <= T:
        raise ValueError(f"cannot split {T} timesteps into {k} intervals")
    s1 = np.concatenate([[0.0], np.cumsum(v)])
    s2 = np.concatenate([[0.0], np.cumsum(v * v)])

    def sse(i: np.ndarray, j: int) -> np.ndarray:   # cost of [i, j) for an array of starts i < j
        n = j - i
        return (s2[j] - s2[i]) - (s1[j] - s1[i]) ** 2 / n

    best = np.full((k + 1, T + 1), np.inf)
    arg = np.zeros((k + 1, T + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, T + 1):
            i = np.arange(c - 1, j)
            cand = best[c - 1, i] + sse(i, j)
            m = int(np.argmin(cand))
            best[c, j], arg[c, j] = cand[m], i[m]
    bounds, j = [], T
    for c in range(k, 0, -1):
        i = int(arg[c, j])
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def _check_bounds(bounds: Bounds, num_timesteps: int) -> Bounds:
    bounds = [(int(lo), int(hi)) for lo, hi in bounds]
    ok = bounds and bounds[0][0] == 0 and bounds[-1][1] == num_timesteps and all(
        lo < hi for lo, hi in bounds) and all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    if not ok:
        raise ValueError(f"cluster bounds {bounds} are not non-empty contiguous intervals covering "
                         f"[0, {num_timesteps})")
    return bounds


@functools.lru_cache(maxsize=32)
def _inner_edges(bounds: tuple[tuple[int, int], ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([hi for _, hi in bounds[:-1]], dtype=torch.long, device=device)


def cluster_index(t: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """The cluster holding each timestep of ``t`` (contiguous ``bounds``; same device as ``t``)."""
    inner = _inner_edges(tuple((int(lo), int(hi)) for lo, hi in bounds), t.device)
    return torch.bucketize(t.long(), inner, right=True)


def cluster_timesteps(batch: int, bounds: Bounds, generator: torch.Generator | None = None) -> torch.Tensor:
    """``batch`` timesteps (CPU, int64): sample ``j`` uniform in cluster ``j mod k``."""
    k = len(bounds)
    c = torch.arange(batch) % k
    lo = torch.tensor([b[0] for b in bounds])[c]
    width = torch.tensor([b[1] - b[0] for b in bounds])[c]
    u = torch.rand(batch, generator=generator, dtype=torch.float64)
    return lo + torch.minimum((u * width).long(), width - 1)


def cluster_losses(eps_mse: torch.Tensor, t: torch.Tensor, bounds: Bounds) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, present)``: ``L_i`` = mean of ``eps_mse`` over the samples whose timestep lies in cluster ``i``
    (0 for an empty cluster, differentiable), ``present_i`` = whether cluster ``i`` had any sample."""
    onehot = nn.functional.one_hot(cluster_index(t.to(eps_mse.device), bounds), len(bounds)).to(eps_mse.dtype)
    counts = onehot.sum(0)          # a matmul rather than index_add: deterministic on GPUs, no host sync
    return (eps_mse @ onehot) / counts.clamp(min=1), counts > 0


# ---------------------------------------------------------------------------------------------------------
# Uncertainty weighting and the Nash bargaining solution
# ---------------------------------------------------------------------------------------------------------

def uw_loss(cluster_loss: torch.Tensor, log_vars: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ_i ½(e^{−s_i} L_i + s_i)`` over the present clusters (all when ``present`` is None)."""
    terms = 0.5 * (torch.exp(-log_vars) * cluster_loss + log_vars)
    if present is not None:
        terms = terms * present.to(terms.dtype)
    return terms.sum()


def nash_residual(gram: np.ndarray | torch.Tensor, alpha: np.ndarray | torch.Tensor) -> float:
    """Relative residual ``‖(GᵀG)α − 1/α‖ / ‖1/α‖`` of the Nash system."""
    M = np.asarray(gram, dtype=np.float64)
    a = np.asarray(alpha, dtype=np.float64)
    return float(np.linalg.norm(M @ a - 1 / a) / np.linalg.norm(1 / a))


def solve_nash(gram: np.ndarray | torch.Tensor, *, tol: float = 1e-11, max_iter: int = 200,
               ridge: float = 1e-12) -> np.ndarray:
    """The α > 0 with ``(GᵀG) α = 1/α`` for the Gram matrix ``M = GᵀG`` of the task gradients (k×k, PSD, with a
    positive diagonal).

    With ``D = diag(M)^{-1/2}`` and ``α = Dβ`` the system becomes ``Cβ = 1/β`` for the correlation matrix
    ``C = DMD`` (unit diagonal), which removes the gradients' scales (orthogonal gradients give β = 1, i.e.
    ``α_i = 1/‖g_i‖``). ``Cβ = 1/β`` is solved by damped Newton on ``f(β) = ½βᵀCβ − Σ log β_i`` (convex,
    self-concordant; see the module docstring) with a ``ridge`` on C's diagonal as a guard against singular C.
    Raises ``ValueError`` for a non-finite Gram matrix or a non-positive diagonal; warns when the relative
    residual of the returned α exceeds 1e-6 (degenerate gradients, e.g. two exactly opposite ones, have no
    Nash solution: the ridge then keeps α finite but large).
    """
    M = np.array(gram, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] or M.shape[0] == 0:
        raise ValueError(f"the Gram matrix must be square and non-empty, got shape {M.shape}")
    if not np.isfinite(M).all():
        raise ValueError("the Gram matrix of the task gradients is not finite")
    M = 0.5 * (M + M.T)
    diag = np.diag(M)
    if not (diag > 0).all():
        raise ValueError("a task gradient is zero: its Nash weight is undefined (leave the task out)")
    d = 1.0 / np.sqrt(diag)
    C = d[:, None] * M * d[None, :]
    C[np.diag_indices_from(C)] = 1.0 + ridge
    beta = 1.0 / np.sqrt(np.abs(C).sum(1))   # exact for orthogonal and for identical gradients
    for _ in range(max_iter):
        inv = 1.0 / beta
        grad = C @ beta - inv
        H = C + np.diag(inv * inv)            # positive definite for any PSD C
        try:
            step = np.linalg.solve(H, grad)
        except np.linalg.LinAlgError:
            step = np.linalg.lstsq(H, grad, rcond=None)[0]
        lam = math.sqrt(max(float(grad @ step), 0.0))    # Newton decrement
        if lam <= tol:
            break
        # |step_i| / β_i ≤ λ (H ≥ diag(1/β²)), so both step sizes keep β > 0
        beta = beta - (step if lam < 0.25 else step / (1.0 + lam))
        beta = np.maximum(beta, 1e-300)   # guard against round-off only
    alpha = d * beta
    res = nash_residual(M, alpha)
    if not res < 1e-6:
        warnings.warn(f"Nash-MTL solve: relative residual {res:.2e} (degenerate task gradients?)", RuntimeWarning)
    return alpha


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _mean_over_processes(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over the processes of the default group (``x`` itself on one process); no gradient."""
    world = _world_size()
    if world == 1:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / world


def cluster_gradient_gram(cluster_loss: torch.Tensor, tasks: Sequence[int], params: Sequence[torch.Tensor]
                          ) -> np.ndarray:
    """The Gram matrix ``GᵀG`` (float64, len(tasks)²) of the gradients ``∇_params cluster_loss[i]``, i in tasks.

    Uses ``torch.autograd.grad(..., retain_graph=True)`` (the graph stays usable for the loop's backward) and
    averages each gradient over processes when running distributed.
    """
    grads = []
    for i in tasks:
        g = torch.autograd.grad(cluster_loss[i], params, retain_graph=True, allow_unused=True)
        grads.append([None if gi is None else _mean_over_processes(gi) for gi in g])
    m = len(tasks)
    device = cluster_loss.device
    gram = torch.zeros(m, m, dtype=torch.float64, device=device)
    for j, p in enumerate(params):
        rows = [g[j] for g in grads]
        if all(r is None for r in rows):
            continue
        X = torch.stack([torch.zeros(p.numel(), dtype=torch.float64, device=device) if r is None
                         else r.detach().reshape(-1).double() for r in rows])
        gram += X @ X.T
    return gram.cpu().numpy()


# ---------------------------------------------------------------------------------------------------------
# Objectives
# ---------------------------------------------------------------------------------------------------------

class ANTObjective(Objective):
    """Clustered timesteps (sample ``j`` in cluster ``j mod k``); subclasses combine the per-cluster losses."""

    def __init__(self, cfg: Config, alphas_cumprod: torch.Tensor, *, bounds: Bounds | None = None,
                 device: torch.device | str | None = None):
        super().__init__(cfg, alphas_cumprod)
        T, k = cfg.num_train_timesteps, cfg.ant_clusters
        self.bounds = _check_bounds(bounds, T) if bounds is not None else cluster_bounds(T, k)
        self.num_clusters = len(self.bounds)
        if cfg.batch_size < self.num_clusters:
            raise ValueError(f"{cfg.method}: the micro-batch ({cfg.batch_size} images) must hold at least one "
                             f"sample per timestep cluster ({self.num_clusters}); raise batch_size or lower "
                             "ant_clusters")
        self.device = torch.device(device) if device is not None else alphas_cumprod.device
        self.extra_parameters = []

    def timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return cluster_timesteps(batch, self.bounds, generator)

    def cluster_losses(self, eps_mse: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cluster_losses(eps_mse, t, self.bounds)

    def _check_state_bounds(self, state: dict) -> None:
        saved = state.get("bounds")
        if saved is not None and [tuple(b) for b in saved] != self.bounds:
            raise ValueError(f"the checkpoint's timestep clusters {saved} differ from this run's {self.bounds}")


class UncertaintyWeightingObjective(ANTObjective):
    """ANT-UW: ``Σ_i ½(e^{−s_i} L_i + s_i)``, ``s`` = :attr:`log_vars` (learnable, from 0)."""

    def __init__(self, cfg: Config, alphas_cumprod: torch.Tensor, **kw):
        super().__init__(cfg, alphas_cumprod, **kw)
        self.log_vars = nn.Parameter(torch.zeros(self.num_clusters, device=self.device))
        self.extra_parameters = [self.log_vars]
        self._optimizer_may_hold_state = False   # set by load_state_dict (a resumed run)

    def _log_vars_on(self, device: torch.device) -> torch.Tensor:
        s = self.log_vars
        if s.device == device:
            return s
        if not self._optimizer_may_hold_state and s.grad is None:
            s.data = s.data.to(device)    # fresh run: the optimizer has no state for s yet, so move the leaf
            return s
        return s.to(device)               # keep leaf + optimizer state where they are; differentiable copy

    def combine(self, eps_mse, t, step, shared_params):
        L, present = self.cluster_losses(eps_mse, t)
        if _world_size() > 1:   # s sees the loss averaged over processes; the model its local gradient
            L = L - L.detach() + _mean_over_processes(L)
        return uw_loss(L, self._log_vars_on(eps_mse.device), present)

    def state_dict(self) -> dict:
        return {"log_vars": self.log_vars.detach().cpu().clone(), "bounds": list(self.bounds)}

    def load_state_dict(self, state: dict) -> None:
        self._check_state_bounds(state)
        s = state["log_vars"]
        if s.shape != self.log_vars.shape:
            raise ValueError(f"checkpoint has {len(s)} UW log-variances, this run {self.num_clusters} clusters")
        with torch.no_grad():
            self.log_vars.copy_(s.to(self.log_vars.device, self.log_vars.dtype))
        self._optimizer_may_hold_state = True


class NashMTLObjective(ANTObjective):
    """ANT-NashMTL: ``Σ_i α_i L_i`` with α (:attr:`alpha`, float64 on the CPU) re-solved from the per-cluster
    gradients every ``cfg.nash_every`` optimizer steps, at the step's first micro-batch."""

    def __init__(self, cfg: Config, alphas_cumprod: torch.Tensor, **kw):
        super().__init__(cfg, alphas_cumprod, **kw)
        if cfg.nash_every < 1:
            raise ValueError(f"nash_every must be ≥ 1, got {cfg.nash_every}")
        self.alpha = torch.ones(self.num_clusters, dtype=torch.float64)
        self.last_refresh = -1          # optimizer step of the last solve (-1: never)
        self.last_gram: np.ndarray | None = None   # diagnostics: the Gram matrix of the last solve
        self._alpha_dev: torch.Tensor | None = None

    def refresh(self, cluster_loss: torch.Tensor, present: torch.Tensor, shared_params) -> None:
        """Re-solve α from the gradients of the present clusters' losses w.r.t. ``shared_params``."""
        own = {id(p) for p in self.extra_parameters}
        params = [p for p in shared_params if p.requires_grad and id(p) not in own]
        tasks = [int(i) for i in torch.nonzero(present.cpu()).flatten()]
        if not tasks:
            return
        gram = cluster_gradient_gram(cluster_loss, tasks, params)
        self.last_gram = gram
        if not np.isfinite(gram).all():
            warnings.warn("Nash-MTL: non-finite per-cluster gradients; keeping the previous weights", RuntimeWarning)
            return
        diag = np.diag(gram)
        keep = [n for n in range(len(tasks)) if diag[n] > 0]
        if not keep:
            return
        solved = solve_nash(gram[np.ix_(keep, keep)])
        alpha = torch.full((self.num_clusters,), float(solved.max()), dtype=torch.float64)
        alpha[[tasks[n] for n in keep]] = torch.from_numpy(solved)
        self.alpha, self._alpha_dev = alpha, None

    def combine(self, eps_mse, t, step, shared_params):
        L, present = self.cluster_losses(eps_mse, t)
        if step % self.cfg.nash_every == 0 and step != self.last_refresh:
            self.refresh(L, present, shared_params)
            self.last_refresh = step
        a = self._alpha_dev
        if a is None or a.device != eps_mse.device or a.dtype != eps_mse.dtype:
            self._alpha_dev = self.alpha.to(eps_mse.device, eps_mse.dtype)
        return (self._alpha_dev * L).sum()   # L_i = 0 for an absent cluster

    def state_dict(self) -> dict:
        return {"alpha": self.alpha.clone(), "last_refresh": self.last_refresh, "bounds": list(self.bounds)}

    def load_state_dict(self, state: dict) -> None:
        self._check_state_bounds(state)
        alpha = state["alpha"]
        if alpha.shape != self.alpha.shape:
            raise ValueError(f"checkpoint has {len(alpha)} Nash weights, this run {self.num_clusters} clusters")
        self.alpha = alpha.detach().to("cpu", torch.float64).clone()
        self.last_refresh = int(state["last_refresh"])
        self._alpha_dev = None


def make_ant_objective(cfg: Config, alphas_cumprod: torch.Tensor, *, bounds: Bounds | None = None,
                       device: torch.device | str | None = None) -> ANTObjective:
    """The objective of ``cfg.method`` (``ant-uw`` or ``ant-nash``) for :func:`deme.train.train`."""
    if cfg.method == "ant-uw":
        return UncertaintyWeightingObjective(cfg, alphas_cumprod, bounds=bounds, device=device)
    if cfg.method == "ant-nash":
        return NashMTLObjective(cfg, alphas_cumprod, bounds=bounds, device=device)
    raise ValueError(f"method {cfg.method!r} is not an ANT baseline (use 'ant-uw' or 'ant-nash')")
