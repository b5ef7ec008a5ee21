"""Analyses of the paper's motivation and diagnostics (docs/method.md §1): gradient conflict between timesteps
(Fig. 1a) and activation change under finetuning (Fig. 2). The weight-space analyses — loss landscapes per
timestep range (Fig. 4), the task-vector plane (Fig. 6a), task-vector statistics (Fig. 6b) — are in
:mod:`deme.weightspace`, on the same fixed batches.

Every loss here is the diffusion ε-MSE on a FIXED batch: fixed images, fixed noise drawn from ``seed`` exactly
as :func:`deme.heldout.heldout_loss` draws it (``torch.randn(images.shape, generator=manual_seed(seed))``, on
the CPU), and fixed, stratified timesteps — so two evaluations differ only through the weights, and a value at
the origin of a landscape equals the model's own loss on the same batch and noise.

Gradient conflict, the method (the paper does not give its procedure; this is ours)
    For each timestep ``t_k`` of a grid (``K`` bin centres over [0, T)), every image of the batch is noised
    to ``t_k`` with the same fixed noise, and ``g_k = ∇_θ mean_j ‖ε_j − ε_θ(x_{t_k,j}, t_k)‖²`` is taken with
    respect to ALL floating-point parameters of the UNet, flattened into one vector. The heat map is the
    matrix of cosines ``cos(g_k, g_l)``. Without ``projection_dim`` the K full gradients are kept (K·P floats:
    fine for small models). With ``projection_dim = d`` each gradient is projected as it is computed onto a
    fixed random Gaussian subspace, ``ĝ = R g / √d`` with ``R ∈ R^{d×P}`` of i.i.d. N(0, 1) entries, and the
    cosines are taken between the ``ĝ``. ``R`` is never materialised: its columns for parameter tensor ``j``
    are regenerated, chunk by chunk, from a generator seeded by ``(seed, j)``, so every gradient meets the
    same ``R`` and memory stays at one gradient plus a d×chunk block. By Johnson–Lindenstrauss the projected
    inner products concentrate: for unit vectors the cosine error has standard deviation about
    ``(1 − cos²)/√d`` (≈ 0.03 at d = 1024), so d of a few thousand suffices for a heat map. The price is P·d
    Gaussian draws per gradient: negligible on a GPU, a few seconds per million parameters at d = 256 on one
    CPU core — for small models the exact cosines are cheaper.

Models: diffusers ``UNet2DModel`` (unconditional or class-conditional, with or without DeMe's projections), or
any module called as ``model(x_t, t[, class_labels=...]).sample``, and text-conditioned UNets (Stable Diffusion):
their "labels" are caption embeddings, fed as ``encoder_hidden_states`` (:func:`deme.models.conditioning_kwargs`).
"""

from __future__ import annotations

import json
import time
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .config import Config, display_path, figures_dir, get_profile
from .data import get_dataset, load_tensor_dataset, training_batches
from .heldout import heldout_loss, model_fingerprint
from .losses import per_sample_mse
from .models import conditioning_kwargs, count_parameters, load_unet, make_scheduler
from .progress import tqdm
from .ranges import coherence, gradient_record_path, grid_bounds, segment_similarity
from .runs import device_name, git_commit, package_versions, write_json
from .stages import ensure_base_model

TensorDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------
# Fixed batches, fixed noise, stratified timesteps
# ---------------------------------------------------------------------------------------------------------

def fixed_noise(shape: Sequence[int], seed: int) -> torch.Tensor:
    """The fixed noise of an analysis batch: float32 N(0, 1) on the CPU from ``seed`` (as
    :func:`deme.heldout.heldout_loss` draws it)."""
    return torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))


def timestep_grid(num_train_timesteps: int, k: int) -> np.ndarray:
    """``k`` timesteps at the centres of ``k`` equal bins of [0, T): ``⌊(i + ½)·T/k⌋``, i = 0..k−1."""
    if not 1 <= k <= num_train_timesteps:
        raise ValueError(f"the grid needs 1 <= k <= T={num_train_timesteps} timesteps, got {k}")
    return ((np.arange(k) + 0.5) * num_train_timesteps / k).astype(np.int64)


def model_labels(cfg: Config, labels: torch.Tensor, conditional: bool = False) -> torch.Tensor | None:
    """The ``class_labels`` to feed a model of ``cfg`` for a batch with ``labels``: None for unconditional
    profiles; the labels themselves when ``conditional``; otherwise the null token ``num_classes`` for every
    image (the unconditional loss, as for the paper's unconditional DDPMs). Text-to-image profiles: the caption
    embeddings of :func:`analysis_batch` as they are (a float tensor: the captioned loss the model trains on)."""
    if labels is not None and labels.is_floating_point():
        return labels            # text-to-image: the caption embeddings (the conditioning the model trains on)
    if not cfg.num_classes:
        return None
    if conditional:
        return labels.long()
    return torch.full((len(labels),), cfg.num_classes, dtype=torch.long)


def analysis_batch(cfg: Config, n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of ``n`` real images and their labels (training split by default: the training loss is
    what the analyses probe). In-memory datasets are subsampled with a seeded permutation; the others take
    the first batch of the seeded training stream; for text-to-image profiles the "labels" are the captions'
    text embeddings (B, 77, D) and the images the VAE latents."""
    if get_dataset(cfg).in_memory:
        images, labels = load_tensor_dataset(cfg, split)
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
        return images[idx], labels[idx]
    x, cond = training_batches(cfg, n, seed).batch(0)
    if isinstance(cond, dict):   # text-to-image: (latents, caption embeddings)
        return x, cond["encoder_hidden_states"]
    return x, cond


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _forward(model: nn.Module, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    return model(xt, t, **conditioning_kwargs(labels)).sample


def fixed_batch_loss(model: nn.Module, cfg: Config, images: torch.Tensor, labels: torch.Tensor | None,
                     t_range: tuple[int, int] | None = None, seed: int = 0, batch_size: int | None = None) -> float:
    """The diffusion loss on a fixed batch: noise from ``seed``, timesteps stratified inside ``t_range``
    (default [0, T)) — :func:`deme.heldout.heldout_loss` restricted to ``t_range``, ``batch_size`` images per forward
    (default ``cfg.analysis_batch_size``)."""
    return heldout_loss(model, cfg, images, labels, seed, t_range=t_range,
                        batch_size=batch_size or cfg.analysis_batch_size, ranges=())["loss"]


# ---------------------------------------------------------------------------------------------------------
# Gradient conflict (Fig. 1a)
# ---------------------------------------------------------------------------------------------------------

def _projection_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


class GaussianSketch:
    """``x ↦ R x / √d`` for a fixed ``R ∈ R^{d×P}`` with i.i.d. N(0, 1) entries, applied to a vector given as
    a sequence of tensors (one per parameter), without ever holding R: the block of R for tensor ``j``,
    columns ``c..c+chunk``, is regenerated from a generator seeded by ``(seed, j)`` in a fixed order."""

    def __init__(self, dim: int, seed: int = 0, max_block: int = 1 << 22):
        if dim < 1:
            raise ValueError(f"projection_dim must be positive, got {dim}")
        self.dim, self.seed, self.max_block = int(dim), int(seed), int(max_block)

    def __call__(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        d = self.dim
        chunk = max(1, self.max_block // d)
        out = None
        for j, x in enumerate(tensors):
            flat = x.detach().reshape(-1).float()
            dev = flat.device
            out = torch.zeros(d, dtype=torch.float64, device=dev) if out is None else out
            g = torch.Generator(device=dev).manual_seed(_projection_seed(self.seed, j))
            for c in range(0, flat.numel(), chunk):
                part = flat[c:c + chunk]
                block = torch.randn(d, part.numel(), generator=g, device=dev)
                out += (block @ part).double()
        return (out / d ** 0.5).cpu()


def _batch_gradient(model: nn.Module, sched, params: list[torch.Tensor], images: torch.Tensor, eps_all: torch.Tensor,
                    labels: torch.Tensor | None, t: int, micro_batch: int) -> tuple[list[torch.Tensor], float]:
    """The gradient of the mean ε-MSE of all ``images`` noised to ``t`` with ``eps_all`` (accumulated over
    micro-batches), one tensor per parameter (zeros where a parameter got none), and that mean loss."""
    device, n = _device(model), len(images)
    for p in params:
        p.grad = None
    total = 0.0
    for i in range(0, n, micro_batch):
        sl = slice(i, i + micro_batch)
        x0, eps = images[sl].to(device), eps_all[sl].to(device)
        tt = torch.full((len(x0),), t, dtype=torch.long, device=device)
        y = labels[sl].to(device) if labels is not None else None
        loss = per_sample_mse(_forward(model, sched.add_noise(x0, eps, tt), tt, y), eps).sum() / n   # batch mean
        loss.backward()
        total += loss.item()
    return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params], total


def _dot64(rows: torch.Tensor, v: torch.Tensor, chunk: int = 1 << 20) -> np.ndarray:
    """``rows @ v`` in float64 (rows (m, P), v (P,), any float dtype), a ``chunk`` of columns at a time: float64
    products and sums without a float64 copy of ``rows``."""
    out = torch.zeros(len(rows), dtype=torch.float64)
    for c in range(0, v.numel(), chunk):
        out += rows[:, c:c + chunk].double() @ v[c:c + chunk].double()
    return out.numpy()


def _cosines(gram: np.ndarray) -> np.ndarray:
    """Cosines from a Gram matrix of inner products: exactly symmetric, unit diagonal, clipped to [−1, 1]."""
    norm = np.sqrt(np.clip(np.diag(gram), 1e-300, None))
    sim = gram / norm[:, None] / norm[None, :]
    sim = (sim + sim.T) / 2
    np.fill_diagonal(sim, 1.0)
    return np.clip(sim, -1.0, 1.0)


def held_gradients(cfg: Config, num_parameters: int, k: int) -> int:
    """How many full gradients (float32) :func:`gradient_similarity` holds in host memory at once: all ``k``, or for a
    profile that declares its host RAM (``cfg.host_memory_gib``) as many as fill a quarter of it (sd14's 40 full
    gradients of 860M parameters would take 137 GB)."""
    if cfg.host_memory_gib is None:
        return k
    return max(1, min(k, int(cfg.host_memory_gib * 2 ** 30 / 4 // (4 * num_parameters))))


def gradient_similarity(model: nn.Module, cfg: Config, images: torch.Tensor, labels: torch.Tensor | None,
                        timesteps: Sequence[int] | np.ndarray | int, seed: int = 0,
                        projection_dim: int | None = None, micro_batch: int | None = None, noise: str = "shared",
                        progress: bool = False, held: int | None = None) -> tuple[np.ndarray, dict]:
    """Cosine similarity between the loss gradients at different timesteps (paper Fig. 1a).

    For every ``t`` in ``timesteps`` (an int ``k`` means :func:`timestep_grid` with k points), the gradient
    of the mean ε-MSE of all ``images`` noised to ``t`` with the same fixed noise (seed ``seed``; with
    ``noise="per_timestep"`` a fixed but different draw for each grid point instead, seeded by its index) is taken
    w.r.t. all floating-point parameters of ``model`` (eval mode; parameters frozen by the caller are
    included and restored afterwards), accumulated over micro-batches of ``micro_batch`` images (default
    ``cfg.analysis_batch_size``). ``labels`` are fed as ``class_labels`` when not None (see
    :func:`model_labels`). With ``projection_dim`` the gradients are sketched by :class:`GaussianSketch`
    (Johnson–Lindenstrauss; see the module docstring), else the full gradients' inner products are taken in
    float64, ``held`` gradients held at a time (default :func:`held_gradients`): round r holds those of grid points
    r·held … (r+1)·held − 1 and recomputes the later ones to take their inner products with them — K gradients
    when all are held, about K²/(2·held) otherwise.

    Returns ``(sim, info)``: ``sim`` a symmetric (K, K) float64 array with unit diagonal; ``info`` holds
    ``timesteps``, ``loss`` (per t), ``grad_norm`` (exact, per t), ``top_parameter`` / ``top_share`` (per t:
    the parameter tensor holding the largest share of ‖g‖², and that share — a gradient dominated by one
    tensor, e.g. the output convolution, makes cosines swing with that tensor's sign), ``num_parameters``,
    ``projection_dim``, ``noise``, ``batch``, ``held``, ``seconds`` and ``method``.
    """
    ts = timestep_grid(cfg.num_train_timesteps, timesteps) if isinstance(timesteps, (int, np.integer)) \
        else np.asarray(timesteps, dtype=np.int64)
    if len(ts) < 2:
        raise ValueError("gradient_similarity needs at least two timesteps")
    if noise not in ("shared", "per_timestep"):
        raise ValueError(f"noise must be 'shared' or 'per_timestep', got {noise!r}")
    sched, micro_batch = make_scheduler(cfg), micro_batch or cfg.analysis_batch_size
    named = [(k, p) for k, p in model.named_parameters() if p.is_floating_point()]
    names, params = [k for k, _ in named], [p for _, p in named]
    flags, was, K = [p.requires_grad for p in params], model.training, len(ts)
    sketch = GaussianSketch(projection_dim, seed) if projection_dim else None
    held = K if sketch is not None else min(K, held or held_gradients(cfg, sum(p.numel() for p in params), K))
    gram, losses, norms, top = np.zeros((K, K)), [], [], []
    started = time.time()
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        for first in range(0, K, held):              # one round per block of held gradients
            block = None
            for k in tqdm(range(first, K), disable=not progress, desc=f"gradients (from {first})"):
                eps_all = fixed_noise(images.shape, seed if noise == "shared" else _projection_seed(seed, 10_000 + k))
                grads, total = _batch_gradient(model, sched, params, images, eps_all, labels, int(ts[k]), micro_batch)
                if first == 0:                       # the first round meets every grid point
                    sq = torch.stack([g.double().pow(2).sum() for g in grads]).cpu()
                    norms.append(float(sq.sum().sqrt()))
                    top.append((names[int(sq.argmax())], float(sq.max() / sq.sum().clamp_min(1e-300))))
                    losses.append(total)
                v = sketch(grads) if sketch is not None else torch.cat([g.detach().reshape(-1).float().cpu()
                                                                         for g in grads])
                if block is None:                    # this round's block of held gradients
                    block = torch.empty((min(held, K - first), v.numel()), dtype=v.dtype)
                if k < first + held:
                    block[k - first] = v
                m = min(k - first + 1, len(block))
                gram[k, first:first + m] = gram[first:first + m, k] = _dot64(block[:m], v)
    finally:
        for p, f in zip(params, flags):
            p.grad = None
            p.requires_grad_(f)
        model.train(was)
    info = {"timesteps": ts, "loss": np.array(losses), "grad_norm": np.array(norms),
            "num_parameters": sum(p.numel() for p in params), "projection_dim": projection_dim, "batch": len(images),
            "noise": noise, "top_parameter": [k for k, _ in top], "top_share": np.array([s for _, s in top]),
            "held": held, "seconds": time.time() - started,
            "method": ("cosine of full gradients" if sketch is None else
                       f"cosine of Gaussian sketches, d={projection_dim} (Johnson–Lindenstrauss)")}
    return _cosines(gram), info


def split_half_reliability(model: nn.Module, cfg: Config, images: torch.Tensor, labels: torch.Tensor | None,
                           timesteps: Sequence[int] | np.ndarray | int, seed: int = 0,
                           **kwargs) -> tuple[float, np.ndarray, np.ndarray]:
    """How much of Fig. 1a is the model and how much the draw: :func:`gradient_similarity` on two disjoint halves
    of ``images``, each with its own fixed noise (seeds ``seed`` and ``seed + 1``), and the Pearson correlation of
    their off-diagonal entries. Near 1: the matrix is a property of the model; low: of the images and noise that
    happened to be drawn (then use more images). Returns ``(r, sim_first_half, sim_second_half)``."""
    h = len(images) // 2
    if h < 1:
        raise ValueError("split_half_reliability needs at least two images")
    halves = [(slice(0, h), seed), (slice(h, 2 * h), seed + 1)]
    sims = [gradient_similarity(model, cfg, images[s], None if labels is None else labels[s], timesteps, seed=sd,
                                **kwargs)[0] for s, sd in halves]
    iu = np.triu_indices(len(sims[0]), 1)
    return float(np.corrcoef(sims[0][iu], sims[1][iu])[0, 1]), sims[0], sims[1]


# sizes of the analyses of notebooks 02 (Fig. 1a, 4) and 06 (Fig. 2, 6a): a few seconds for smoke, a few minutes
# on a CPU for the others; "rehearsal": the fewest points that still run every code path (deme.rehearse)
ANALYSIS_SIZES = {"smoke": dict(num_timesteps_grid=12, batch=16, check_timesteps=4, landscape_points=5,
                                landscape_batch=16, activation_batch=16, plane_points=5),
                  "default": dict(num_timesteps_grid=40, batch=64, check_timesteps=6, landscape_points=9,
                                  landscape_batch=32, activation_batch=64, plane_points=9),
                  "rehearsal": dict(num_timesteps_grid=4, batch=4, check_timesteps=2, landscape_points=3,
                                    landscape_batch=4, activation_batch=4, plane_points=5)}


def analysis_sizes(cfg: Config, **given: int | None) -> dict[str, int]:
    """The sizes of notebook 02's analyses: each ``given`` value that is not None, else the profile's entry of
    :data:`ANALYSIS_SIZES` that ``cfg.analysis_sizes`` names."""
    if cfg.analysis_sizes not in ANALYSIS_SIZES:
        raise ValueError(f"analysis_sizes={cfg.analysis_sizes!r} is not one of {sorted(ANALYSIS_SIZES)} "
                         "(deme.analysis.ANALYSIS_SIZES)")
    sizes = dict(ANALYSIS_SIZES[cfg.analysis_sizes])
    unknown = set(given) - set(sizes)
    if unknown:
        raise ValueError(f"unknown analysis sizes {sorted(unknown)}; valid: {sorted(sizes)}")
    sizes.update({k: int(v) for k, v in given.items() if v is not None})
    return sizes


class AnalysisInputs(NamedTuple):
    """What notebook 02's analyses share: the profile, its base model (eval mode, on the device), one fixed
    batch of training images, their labels, the labels fed to the model, and the analysis sizes."""
    cfg: Config
    model: nn.Module
    images: torch.Tensor
    labels: torch.Tensor
    model_labels: torch.Tensor | None
    sizes: dict[str, int]


def prepare(profile: str | None = None, *, conditional: bool = True, seed: int = 0, device: str | None = None,
            num_threads: int | None = None, **sizes: int | None) -> AnalysisInputs:
    """Notebook 02's set-up: the profile, its base model (pretrained first when missing,
    :func:`deme.stages.ensure_base_model`) on ``device`` (None: CUDA when available), the fixed batch of
    :func:`analysis_batch` and its :func:`model_labels`, and :func:`analysis_sizes` with ``sizes`` given;
    ``num_threads`` sets torch's CPU threads. Prints what it loaded."""
    if num_threads:
        torch.set_num_threads(num_threads)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_profile(profile)
    size = analysis_sizes(cfg, **sizes)
    base_path = ensure_base_model(cfg)
    model = load_unet(base_path).to(device).eval()
    images, labels = analysis_batch(cfg, size["batch"], seed=seed)
    print(f"profile={cfg.profile}  base model {display_path(base_path)}: {count_parameters(model) / 1e6:.2f}M "
          f"parameters, {cfg.image_size}x{cfg.image_size}, {device}; {size}; figures -> "
          f"{display_path(figures_dir(cfg))}")
    return AnalysisInputs(cfg, model, images, labels, model_labels(cfg, labels, conditional=conditional), size)


def conflict_panels(model: nn.Module, cfg: Config, images: torch.Tensor, labels: torch.Tensor, k: int,
                    conditional: bool = True, seed: int = 0, projection_dim: int | None = None
                    ) -> dict[str, tuple[np.ndarray, dict]]:
    """Fig. 1a's similarity matrices, ``{conditioning: (sim, info)}`` (:func:`gradient_similarity` on ``k``
    grid timesteps): the requested conditioning first and, for class-conditional models, the other one beside
    it (true labels, and the null label that unconditional samples take). Text-to-image models: one panel,
    the captions' embeddings (``labels`` from :func:`analysis_batch`)."""
    if labels is not None and labels.is_floating_point():
        return {"captions": gradient_similarity(model, cfg, images, labels, k, seed=seed,
                                                projection_dim=projection_dim, progress=False)}
    if not cfg.num_classes:
        return {"unconditional model": gradient_similarity(model, cfg, images, None, k, seed=seed,
                                                           projection_dim=projection_dim, progress=False)}
    names = {True: "true labels", False: "null label (unconditional)"}
    order = [conditional, not conditional]
    return {names[c]: gradient_similarity(model, cfg, images, model_labels(cfg, labels, conditional=c), k, seed=seed,
                                          projection_dim=projection_dim, progress=False) for c in order}


RANGE_SKETCH = (1 << 28, 4096)
"""(floats, d): the "gradient" ranges keep the K full gradients while K·P stays under ``floats`` (1 GiB of float32),
else Gaussian sketches of dimension d (cosine error ≈ 0.016)."""


def find_gradient_ranges(cfg: Config, device: str | None = None, progress: bool = False) -> dict:
    """The "gradient" timestep ranges of ``cfg`` (``range_bounds="gradient"``, docs/method.md §2.4): notebook 02's
    similarity matrix of the base model's loss gradients (the profile's analysis sizes, the fixed batch and noise of
    seed 0, the true labels or captions the model trains on) split into ``cfg.num_ranges`` contiguous segments
    (:func:`deme.ranges.segment_similarity`), their edges on the grid's bin edges.

    Found once and recorded at :func:`deme.ranges.gradient_record_path` — the boundaries, the matrix, the
    coherence of each segment beside that of the equal ranges, the base model and what computed it; later calls
    (and every run, :func:`deme.ranges.range_bounds`) read the record. Returns the record."""
    path = gradient_record_path(cfg)
    if path.exists():
        return json.loads(path.read_text())
    size, T, N = analysis_sizes(cfg), cfg.num_train_timesteps, cfg.num_ranges
    k = size["num_timesteps_grid"]
    if k < N:
        raise ValueError(f"{N} gradient ranges need at least {N} grid timesteps; the analysis sizes "
                         f"{cfg.analysis_sizes!r} have {k} (deme.analysis.ANALYSIS_SIZES)")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    base_path = ensure_base_model(cfg)
    model = load_unet(base_path).to(device).eval()
    images, labels = analysis_batch(cfg, size["batch"], seed=0)
    dim = None if count_parameters(model) * k <= RANGE_SKETCH[0] else RANGE_SKETCH[1]
    sim, info = gradient_similarity(model, cfg, images, model_labels(cfg, labels, conditional=True), k, seed=0,
                                    projection_dim=dim, progress=progress)
    edges = segment_similarity(sim, N)
    equal = [int(e) for e in np.searchsorted(info["timesteps"], [i * T // N for i in range(N + 1)])]
    record = {"range_bounds": list(grid_bounds(edges, k, T)), "num_ranges": N, "grid_edges": edges,
              "coherence": coherence(sim, edges), "equal_coherence": coherence(sim, equal),
              "timesteps": info["timesteps"].tolist(), "similarity": sim.tolist(), "method": info["method"],
              "base_model": display_path(base_path), "base_fingerprint": model_fingerprint(model),
              "batch": size["batch"], "seed": 0, "seconds": round(info["seconds"], 1),
              "device": device_name(torch.device(device), threads=True), "commit": git_commit(),
              "versions": package_versions()}
    write_json(path, record)
    return record


def format_similarity_summary(summary: Mapping, info: Mapping, num_train_timesteps: int) -> str:
    """:func:`similarity_summary` in a few lines of text (notebook 02)."""
    s, k = summary, len(info["timesteps"])
    return "\n".join([
        f"{info['method']}: {info['num_parameters']:,} parameters, {info['seconds']:.1f} s",
        f"adjacent grid points (Δt = {num_train_timesteps // k}): mean {s['adjacent_mean']:.3f}, "
        f"median {s['adjacent_median']:.3f}",
        f"pairs at least {s['distant_gap']} apart:  mean {s['distant_mean']:.3f}, median {s['distant_median']:.3f}",
        f"fraction of negative pairs: {s['negative_fraction']:.3f}   lowest: {s['min']:.3f}",
        f"mean over all pairs: {s['all_pairs_mean']:.3f}   over pairs inside {s['early_range']}: "
        f"{s['early_pairs_mean']:.3f} ({len(s['early_pairs'])} pairs)"])


SUMMARY_KEYS = ("adjacent_mean", "adjacent_median", "distant_mean", "distant_median", "negative_fraction", "min",
                "all_pairs_mean", "early_pairs_mean")


def similarity_table(panels: Mapping[str, tuple[np.ndarray, Mapping]], num_train_timesteps: int) -> pd.DataFrame:
    """The scalar summaries of :func:`similarity_summary`, one column per conditioning of ``panels``."""
    return pd.DataFrame({name: [similarity_summary(sim, info["timesteps"], num_train_timesteps)[key]
                                for key in SUMMARY_KEYS] for name, (sim, info) in panels.items()},
                        index=list(SUMMARY_KEYS))


def sketch_check(model: nn.Module, cfg: Config, images: torch.Tensor, labels: torch.Tensor | None,
                 timesteps: Sequence[int], projection_dim: int, seed: int = 0) -> str:
    """How far the Gaussian-sketch cosines (``projection_dim``) are from the exact ones on a few timesteps."""
    exact, _ = gradient_similarity(model, cfg, images, labels, timesteps, seed=seed)
    sketched, info = gradient_similarity(model, cfg, images, labels, timesteps, seed=seed,
                                         projection_dim=projection_dim)
    err = np.abs(sketched - exact)[np.triu_indices(len(timesteps), 1)]
    return (f"d={projection_dim}: |sketched − exact| max {err.max():.3f}, mean {err.mean():.3f} over {err.size} pairs "
            f"(JL scale 1/√d = {1 / np.sqrt(projection_dim):.3f}); {info['seconds']:.1f} s")


def upper_pairs(sim: np.ndarray, timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The off-diagonal pairs i < j of a similarity matrix: ``(values, t_i, t_j)``."""
    i, j = np.triu_indices(len(sim), k=1)
    ts = np.asarray(timesteps)
    return sim[i, j], ts[i], ts[j]


def similarity_summary(sim: np.ndarray, timesteps: Sequence[int], num_train_timesteps: int = 1000,
                       early_fraction: float = 0.25, distant_fraction: float = 0.5) -> dict:
    """Numbers and distributions behind Fig. 1a, over the pairs i < j of the grid.

    - ``adjacent_mean`` / ``adjacent_median``: over neighbouring grid points (|i − j| = 1);
    - ``distant_mean`` / ``distant_median``: over pairs at least ``distant_fraction``·T apart;
    - ``negative_fraction``: share of pairs with a negative cosine; ``min``: the lowest cosine;
    - ``all_pairs`` / ``early_pairs``: the values over all pairs and over pairs with both timesteps inside
      [0, ``early_fraction``·T) — the two histograms of Fig. 1a (right), with their means.
    """
    values, ti, tj = upper_pairs(sim, timesteps)
    gi, gj = np.triu_indices(len(sim), k=1)
    T = num_train_timesteps
    early = (ti < early_fraction * T) & (tj < early_fraction * T)
    distant = np.abs(ti - tj) >= distant_fraction * T
    adjacent = (gj - gi) == 1

    def mean(m):
        return float(values[m].mean()) if m.any() else float("nan")

    def median(m):
        return float(np.median(values[m])) if m.any() else float("nan")
    return {"adjacent_mean": mean(adjacent), "distant_mean": mean(distant),
            "adjacent_median": median(adjacent), "distant_median": median(distant),
            "negative_fraction": float((values < 0).mean()), "min": float(values.min()),
            "all_pairs_mean": float(values.mean()), "early_pairs_mean": mean(early),
            "all_pairs": values, "early_pairs": values[early],
            "early_range": (0, int(early_fraction * T)), "distant_gap": int(distant_fraction * T)}


# ---------------------------------------------------------------------------------------------------------
# Activation change under finetuning (Fig. 2)
# ---------------------------------------------------------------------------------------------------------

def unet_blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The down blocks, the mid block and the up blocks of a diffusers UNet, by name."""
    out = {f"down_blocks.{i}": b for i, b in enumerate(model.down_blocks)}
    if getattr(model, "mid_block", None) is not None:
        out["mid_block"] = model.mid_block
    out.update({f"up_blocks.{i}": b for i, b in enumerate(model.up_blocks)})
    return out


def block_activations(model: nn.Module, xt: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                      blocks: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Main-path outputs of the UNet's blocks for one forward pass (CPU float32).

    Down blocks return ``(hidden, skips)``: only ``hidden`` is kept. Hooks are registered after the model's
    own, so a projected model's activations are taken after its channel projection (what the next block
    sees)."""
    mods = unet_blocks(model)
    names = list(blocks) if blocks is not None else list(mods)
    acts: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(module, args, output, name=name):
            main = output[0] if isinstance(output, tuple) else output
            acts[name] = main.detach().float().cpu()
        handles.append(mods[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            _forward(model, xt, t, labels)
    finally:
        for h in handles:
            h.remove()
    return acts


def activation_changes(base: nn.Module, finetuned: nn.Module, cfg: Config, images: torch.Tensor,
                       labels: torch.Tensor | None, t: int | torch.Tensor, seed: int = 0,
                       blocks: Sequence[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """How finetuning changed each block's activations (paper Fig. 2).

    Both models see the same ``x_t`` (fixed noise from ``seed``; ``t`` an int or one timestep per image).
    For every block, ``D = A_finetuned − A_base`` of shape (B, C, H, W) and ``|D|`` is reduced two ways:

    - ``per_position``: mean over channels → one value per (image, h, w): B·H·W values;
    - ``per_channel``: mean over space → one value per (image, channel): B·C values.

    If finetuning acts channel by channel (the paper's claim, which motivates the channel-wise projection),
    the per-channel values spread widely (some channels move a lot, others not) while the per-position values
    are comparatively uniform; :func:`activation_change_summary` gives their coefficients of variation.
    The two reductions average different numbers of entries (C per position, H·W per channel), which alone
    changes their spread; ``*_shuffled`` are the same reductions after permuting each image's |D| entries at
    random (seeded), the reference with no channel or spatial structure.
    """
    sched = make_scheduler(cfg)
    noise = fixed_noise(images.shape, seed).to(images.device)   # drawn on the CPU, used where the images are
    tt = torch.full((len(images),), int(t), dtype=torch.long) if not torch.is_tensor(t) or t.ndim == 0 \
        else t.long()
    xt = sched.add_noise(images, noise, tt)
    acts, step = [], cfg.analysis_batch_size
    for m in (base, finetuned):
        was = m.training
        m.eval()
        dev = _device(m)
        try:                                 # cfg.analysis_batch_size images per forward
            parts = [block_activations(m, xt[i:i + step].to(dev), tt[i:i + step].to(dev),
                                       labels[i:i + step].to(dev) if labels is not None else None, blocks)
                     for i in range(0, len(xt), step)]
            acts.append({k: torch.cat([part[k] for part in parts]) for k in parts[0]})
        finally:
            m.train(was)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, a_base in acts[0].items():
        d = (acts[1][name] - a_base).abs()
        B = d.shape[0]
        perm = torch.stack([torch.randperm(d[0].numel(), generator=g) for _ in range(B)]).to(d.device)
        shuffled = torch.gather(d.reshape(B, -1), 1, perm).reshape(d.shape)
        out[name] = {"per_position": d.mean(dim=1).reshape(-1).cpu().numpy(),
                     "per_channel": d.mean(dim=(2, 3)).reshape(-1).cpu().numpy(),
                     "per_position_shuffled": shuffled.mean(dim=1).reshape(-1).cpu().numpy(),
                     "per_channel_shuffled": shuffled.mean(dim=(2, 3)).reshape(-1).cpu().numpy(),
                     "shape": tuple(d.shape)}
    return out


def activation_change_summary(changes: Mapping[str, Mapping[str, np.ndarray]]):
    """One row per block: mean and coefficient of variation (std/mean) of the per-position and per-channel
    change, ``cv_ratio`` = CV(per channel) / CV(per position), and ``cv_ratio_shuffled``, the same ratio for
    the structure-free reference (entries permuted). ``cv_ratio`` well above ``cv_ratio_shuffled``: the change
    is organised by channel more than by position."""
    def cv(v):
        v = np.asarray(v, dtype=np.float64)
        return float(v.std() / max(v.mean(), 1e-30))
    rows = []
    for name, c in changes.items():
        cv_pos, cv_ch = cv(c["per_position"]), cv(c["per_channel"])
        row = {"block": name, "mean_change": float(np.mean(c["per_position"])), "cv_per_position": cv_pos,
               "cv_per_channel": cv_ch, "cv_ratio": cv_ch / max(cv_pos, 1e-30)}
        if "per_channel_shuffled" in c:
            row["cv_ratio_shuffled"] = cv(c["per_channel_shuffled"]) / max(cv(c["per_position_shuffled"]), 1e-30)
        rows.append(row)
    return pd.DataFrame(rows)
