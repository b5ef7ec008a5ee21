"""The held-out denoising loss, paired: the quantity DeMe optimises, measured so that models can be compared.

Every model sees the same held-out images, the same noise and the same timesteps (image j of a set of n gets
t_j = ⌊(j + ½)·T/n⌋, so the ranges are covered evenly), in float32; the loss of each image is kept, and a model
is compared with a reference (the model before finetuning) through the per-image differences:

    Δ% = 100 · mean_j(ℓ_j − ℓ_j^ref) / mean_j(ℓ_j^ref),

with a 95% interval from the delta method for a ratio of means (z_j = d_j − Δ·ℓ_j^ref, SE = sd(z)/√n/mean(ℓ^ref)).
Sharing images, noise and timesteps removes most of the variance the models have in common, so differences of
a tenth of a percent are resolved on a few thousand images, in seconds per model on a CPU.

Two conditions for class-conditional models: ``unconditional`` (the null label: the path the unconditional
samples of Table 1 take) and ``conditional`` (the true label). The test split is divided once
(:func:`deme.data.heldout_split`): ``validation`` images choose things (merge weights, budgets), ``evaluation`` images
judge them.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd
import torch
from scipy import stats

from .config import Config, repo_root
from .data import LoaderBatches, get_dataset, heldout_batch, heldout_split, training_batches
from .losses import per_sample_mse
from .metrics import _default_device
from .models import conditioning_kwargs, make_scheduler
from .progress import tqdm
from .ranges import config_ranges
from .runs import atomic_write
from .timesteps import stratified_timesteps

CONDITIONS = ("unconditional", "conditional")


def draw_inputs(n: int, shape: tuple[int, ...], t_range: tuple[int, int], seed: int = 0, draw: int = 0) \
        -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and timesteps of one draw over ``n`` images: ``(noise (n, *shape), t (n,))``.

    Draw 0: noise from ``seed``, image j at the stratified timestep t_j = lo + ⌊(j + ½)(hi − lo)/n⌋. Draw d > 0:
    noise from ``seed + 10007·d`` and the same stratified timesteps in a seeded random order, so every draw still
    covers the range evenly while each image meets other noise at another timestep. Averaging an image's loss
    over draws lowers the estimator's noise without changing what is estimated."""
    noise = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed + 10_007 * draw))
    t = stratified_timesteps(n, t_range)
    if draw:
        t = t[torch.randperm(n, generator=torch.Generator().manual_seed(7_919 * draw + seed))]
    return noise, t


@torch.no_grad()
def heldout_losses(model, cfg: Config, images: torch.Tensor, cond: torch.Tensor | dict | None, seed: int = 0,
                   t_range: tuple[int, int] | None = None, batch_size: int | None = None,
                   draw: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image ε-MSE of ``model`` on ``images`` with fixed noise (from ``seed``) and stratified timesteps.

    Image j gets t = lo + ⌊(j + ½)(hi − lo)/n⌋ over ``t_range`` (default [0, T)); ``draw`` > 0 gives other
    noise and a permutation of those timesteps (:func:`draw_inputs`). ``cond``: class labels used
    as given (the null token for the unconditional loss), a dict of per-image model inputs (e.g.
    ``{"encoder_hidden_states": ...}``), or None. float32, eval mode (the model's mode is restored); ``batch_size``
    (default ``cfg.heldout_batch_size``) images per forward. Returns (losses (n,), timesteps (n,)) on the CPU.
    """
    t_range = t_range or (0, cfg.num_train_timesteps)
    batch_size = batch_size or cfg.heldout_batch_size
    noise, t = draw_inputs(len(images), tuple(images.shape[1:]), t_range, seed, draw)
    sched = make_scheduler(cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    cond = conditioning_kwargs(cond)
    losses = []
    for i in range(0, len(images), batch_size):
        s = slice(i, i + batch_size)
        x0, eps, tt = images[s].to(device), noise[s].to(device), t[s].to(device)
        kw = {k: v[s].to(device) for k, v in cond.items()}
        with torch.autocast(device.type, enabled=False):
            pred = model(sched.add_noise(x0, eps, tt), tt, **kw).sample
        losses.append(per_sample_mse(pred, eps).cpu())
    model.train(was_training)
    return torch.cat(losses), t


def heldout_loss(model, cfg: Config, images: torch.Tensor, labels: torch.Tensor | dict | None, seed: int = 0,
                 ranges: list[tuple[int, int]] | None = None, batch_size: int | None = None,
                 t_range: tuple[int, int] | None = None) -> dict[str, float]:
    """The mean of :func:`heldout_losses`: ``{"loss": ...}``, plus ``range_k`` (the loss restricted to each of
    ``ranges``, default the run's, :func:`deme.ranges.config_ranges`; ``()``: none) when ``t_range`` is the whole
    [0, T)."""
    T = cfg.num_train_timesteps
    per, t = heldout_losses(model, cfg, images, labels, seed, t_range, batch_size)
    out = {"loss": per.mean().item()}
    if tuple(t_range or (0, T)) == (0, T):
        for k, (lo, hi) in enumerate(config_ranges(cfg) if ranges is None else ranges):
            out[f"range_{k}"] = per[(t >= lo) & (t < hi)].mean().item()
    return out


def fixed_sample(cfg: Config, start: int, stop: int, seed: int = 4321, device: str | torch.device | None = None,
                 chunk: int = 200):
    """Items ``start … stop−1`` of a fixed, seeded order of held-out data, for datasets without an in-memory
    test split: the dataset's ``test_set`` where it has one (CIFAR-10's test split), else its training data
    (LSUN, text-to-image). Centre crops, no flip, no caption dropout, the same in every process. Loaded and
    encoded ``chunk`` at a time (the text-to-image VAE never sees thousands of 512-px images in one batch).
    Returns ``(x0, labels)`` — images and class labels (−1: none) — or, for text-to-image,
    ``(latents, {"encoder_hidden_states": caption embeddings, "empty": the empty caption's embedding})``.

    For LSUN and text-to-image these are training images (their loaders have no test split, and a finetuning
    run of the paper's length sees every training image many times), so a held-out loss there measures fit,
    not generalisation. Validation (choices) and evaluation (judging) always use disjoint items of the order."""
    fixed = cfg.replace(label_dropout=0.0, center_crop=True, random_flip=False)
    if stop <= start:
        raise ValueError(f"empty sample [{start}, {stop})")
    step = math.gcd(start, chunk) if start else min(chunk, stop)   # batches of `step` tile [start, stop)
    test_set = get_dataset(cfg).test_set
    batches = (LoaderBatches(test_set(fixed), step, seed, num_workers=0) if test_set is not None
               else training_batches(fixed, step, seed, device=device))
    if getattr(batches, "per_epoch", 1) * step < stop:
        raise ValueError(f"{cfg.dataset}: {stop} held-out items requested (validation_size + evaluation_size), "
                         f"but one pass over the data gives {batches.per_epoch * step}; lower them")
    xs, conds = [], []
    for j in range(start // step, -(-stop // step)):
        x, c = batches.batch(j)
        xs.append(x.cpu())
        conds.append(c)
    lo = start - (start // step) * step
    x = torch.cat(xs)[lo:lo + stop - start]
    if isinstance(conds[0], dict):
        emb = torch.cat([c["encoder_hidden_states"].cpu() for c in conds])[lo:lo + stop - start]
        empty = batches.encoders.encode_text([""]).float().cpu()
        return x, {"encoder_hidden_states": emb, "empty": empty.expand(len(x), *empty.shape[1:])}
    return x, torch.cat([c.cpu() for c in conds])[lo:lo + stop - start]


def heldout_inputs(cfg: Config, n: int, seed: int = 4321, device: str | torch.device | None = None):
    """A fixed batch for the merge search's held-out loss: ``(x0, cond)`` for :func:`deme.heldout.heldout_loss`.

    In-memory datasets: ``n`` validation images of the test split with the null label (the unconditional loss
    the paper's DDPMs are trained on). Others: the first ``n`` items of :func:`fixed_sample` — images with
    the null label (or none), or latents with their caption embeddings (the frozen encoders run on ``device``).
    """
    if get_dataset(cfg).in_memory:
        x, y = heldout_batch(cfg, n)
        return x, (torch.full_like(y, cfg.num_classes) if cfg.num_classes else None)
    x, cond = fixed_sample(cfg, 0, n, seed, device=device)
    if isinstance(cond, dict):
        return x, {"encoder_hidden_states": cond["encoder_hidden_states"]}
    return x, (torch.full_like(cond, cfg.num_classes) if cfg.num_classes else None)


def validation_inputs(cfg: Config, device: str | torch.device | None = None):
    """The inputs ``(x0, cond)`` that choose merge weights (the coordinate search, the learned weights), for
    :func:`heldout_losses`: the validation part of the test split (never the images the evaluation judges with).
    Class-conditional models see both paths equally: even images with the null label (what unconditional
    sampling uses), odd ones with their label. Other profiles: :func:`heldout_inputs` (``cfg.validation_size``
    inputs)."""
    if get_dataset(cfg).in_memory:
        x, y = heldout_split(cfg, "validation")
        if cfg.num_classes:
            y = torch.where(torch.arange(len(y)) % 2 == 0, torch.full_like(y, cfg.num_classes), y)
        return x, (y if cfg.num_classes else None)
    return heldout_inputs(cfg, cfg.validation_size, device=device)


def split_inputs(cfg: Config, part: str = "evaluation", device: str | torch.device | None = None):
    """The images of ``part`` of the held-out data and the model inputs of each condition: ``(x0, {condition:
    inputs})`` for :func:`paired_losses`. In-memory datasets: the test split (:func:`deme.data.heldout_split`),
    conditions of :func:`condition_inputs`. Others: :func:`fixed_sample` — ``validation`` its first
    ``cfg.validation_size`` items (the merge search's, :func:`heldout_inputs`), ``evaluation`` the next
    ``cfg.evaluation_size``, ``all`` both; text-to-image conditions are the empty caption (``unconditional``:
    the branch classifier-free guidance starts from) and the image's caption (``conditional``)."""
    if get_dataset(cfg).in_memory:
        images, labels = heldout_split(cfg, part)
        return images, condition_inputs(cfg, labels)
    v, e = cfg.validation_size, cfg.evaluation_size
    bounds = {"validation": (0, v), "evaluation": (v, v + e), "all": (0, v + e)}
    if part not in bounds:
        raise ValueError(f"part must be one of {', '.join(bounds)}, got {part!r}")
    x, cond = fixed_sample(cfg, *bounds[part], device=device)
    if isinstance(cond, dict):
        return x, {"unconditional": cond["empty"], "conditional": cond["encoder_hidden_states"]}
    return x, condition_inputs(cfg, cond)


def per_image(losses: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """Per-image means of losses of shape (n,) or (draws, n) over the draws where ``mask`` holds; images with
    no such draw are dropped. (n,) with no mask is returned as is."""
    x = np.atleast_2d(np.asarray(losses, np.float64))
    m = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.atleast_2d(mask), x.shape)
    count = m.sum(0)
    return (np.where(m, x, 0.0).sum(0) / np.maximum(count, 1))[count > 0]


def relative_difference(losses: np.ndarray, reference: np.ndarray, level: float = 0.95,
                        mask: np.ndarray | None = None) -> tuple[float, float, float]:
    """Δ% = 100·mean(losses − reference)/mean(reference) of paired per-image losses, with its ``level``
    interval (delta method for a ratio of means, t quantile): returns (Δ%, low, high). Losses of several
    draws per image, shape (draws, n), are first averaged per image over the draws where ``mask`` holds
    (:func:`per_image`), so the interval is over images, the unit that was sampled."""
    losses, reference = per_image(losses, mask), per_image(reference, mask)
    d, r = losses - reference, reference
    n, rbar = len(d), r.mean()
    ratio = d.mean() / rbar
    se = np.std(d - ratio * r, ddof=1) / np.sqrt(n) / rbar if n > 1 else float("nan")
    half = stats.t.ppf(0.5 + level / 2, max(n - 1, 1)) * se
    return 100 * ratio, 100 * (ratio - half), 100 * (ratio + half)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of every tensor of ``model``'s state dict: caches keyed by it never serve a retrained model."""
    return state_fingerprint([model.state_dict()])


def state_fingerprint(states, extra: str = "") -> str:
    """A short hash of every tensor of the state dicts ``states``, in order, and of the text ``extra`` (e.g. the
    settings of a computation cached under it)."""
    h = hashlib.sha1()
    for state in states:
        for k, v in sorted(state.items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(extra.encode())
    return h.hexdigest()[:16]


def condition_inputs(cfg: Config, labels: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """The model inputs of each condition: the null label (``unconditional``) and, for class-conditional
    profiles, the true label (``conditional``). Unconditional models: ``{"unconditional": None}``."""
    if not cfg.num_classes:
        return {"unconditional": None}
    return {"unconditional": torch.full_like(labels, cfg.num_classes), "conditional": labels}


def paired_losses(models: Mapping[str, Callable[[], torch.nn.Module]], cfg: Config, part: str = "evaluation",
                  seed: int = 0, cache_dir: Path | None = None, device: str | torch.device | None = None,
                  progress: bool = True, draws: int | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Per-image held-out losses of every model (``name → loader``) on the ``part`` of the held-out data
    (:func:`split_inputs`: the test split, or a fixed sample of the training data), for every condition, all
    on the same images, noise (``seed``) and timesteps. Cached per model fingerprint and draw
    under ``cache_dir`` (default runs/<profile>/heldout). Returns ``{name: {condition: losses, "t": t}}``, arrays
    of shape (n,) for one draw, (draws, n) for ``draws`` > 1 independent noise/timestep draws (default
    ``cfg.heldout_draws``; :func:`draw_inputs`; :func:`heldout_table` averages them per image)."""
    draws = cfg.heldout_draws if draws is None else draws
    device = torch.device(device) if device is not None else _default_device()
    cache_dir = cache_dir or repo_root() / "runs" / cfg.profile / "heldout"
    cache_dir.mkdir(parents=True, exist_ok=True)
    images, inputs = split_inputs(cfg, part, device=device)   # text-to-image: encoded on the device
    # a fixed sample's evaluation items start after the validation ones: their offset is part of what they are
    at = "" if get_dataset(cfg).in_memory else f"_at{cfg.validation_size if part == 'evaluation' else 0}"
    out = {}
    for name, load in tqdm(models.items(), disable=not progress, desc="held-out loss", mininterval=30):
        model = load().to(device)
        key = f"{model_fingerprint(model)}_{part}{at}_{len(images)}_seed{seed}"
        per_draw = []
        for d in range(draws):
            path = cache_dir / (key + (f"_draw{d}" if d else "") + ".npz")
            if path.exists():
                per_draw.append(dict(np.load(path)))
                continue
            res = {}
            for c, cond in inputs.items():
                per, t = heldout_losses(model, cfg, images, cond, seed, draw=d)
                res[c], res["t"] = per.numpy(), t.numpy()
            atomic_write(path, lambda tmp: np.savez(tmp, **res))
            per_draw.append(res)
        out[name] = per_draw[0] if draws == 1 else {k: np.stack([r[k] for r in per_draw]) for k in per_draw[0]}
        del model
    return out


def heldout_table(losses: Mapping[str, Mapping[str, np.ndarray]], cfg: Config, reference: str = "Before finetuning",
                  ranges: list[tuple[int, int]] | None = None) -> pd.DataFrame:
    """The paired comparison of :func:`paired_losses`: one row per model, range (``all`` = [0, T), then
    ``0 … N−1`` of ``ranges``, default the run's, :func:`deme.ranges.config_ranges`) and condition, with columns
    ``model, range, condition, loss, delta_pct, ci95_low, ci95_high`` (Δ% against ``reference`` with its 95%
    interval; the reference's own rows have Δ = 0)."""
    T = cfg.num_train_timesteps
    ref = losses[reference]
    parts = config_ranges(cfg) if ranges is None else ranges
    bounds = [("all", (0, T))] + [(str(k), b) for k, b in enumerate(parts)]
    rows = []
    for name, res in losses.items():
        for rng, (lo, hi) in bounds:
            m = (res["t"] >= lo) & (res["t"] < hi)
            for c in (c for c in CONDITIONS if c in res):
                d, low, high = relative_difference(res[c], ref[c], mask=m)
                rows.append({"model": name, "range": rng, "condition": c, "loss": float(per_image(res[c], m).mean()),
                             "delta_pct": d, "ci95_low": low, "ci95_high": high})
    return pd.DataFrame(rows)


def verdict(low: float, high: float, lower_is_better: bool = True) -> str:
    """``better`` / ``worse`` when the interval [low, high] of a difference excludes 0, else ``not resolved``."""
    if low > 0:
        return "worse" if lower_is_better else "better"
    if high < 0:
        return "better" if lower_is_better else "worse"
    return "not resolved"


def format_heldout(table: pd.DataFrame, condition: str = "unconditional", digits: int = 2,
                   reference: str = "Before finetuning") -> pd.DataFrame:
    """A readable pivot of :func:`heldout_table`: one row per model, one column per range, cells
    ``Δ% [low, high]`` against the reference."""
    t = table[table.condition == condition]
    cell = ["reference" if m == reference else f"{d:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"
            for m, d, lo, hi in zip(t.model, t.delta_pct, t.ci95_low, t.ci95_high)]
    out = t.assign(cell=cell).pivot(index="model", columns="range", values="cell")
    cols = ["all"] + sorted((c for c in out.columns if c != "all"), key=int)
    out = out.loc[list(dict.fromkeys(t.model)), cols]
    out.columns = ["all t"] + [f"range {c}" for c in cols[1:]]
    out.index.name = None
    return out
