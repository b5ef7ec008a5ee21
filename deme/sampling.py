"""Sampling: DDIM (eta 0), batched and seeded, unconditional or class-conditional with classifier-free guidance,
for a single model, a merged model or the timestep-wise ensemble ("DeMe before merge").

Sample ``i`` of a call depends only on (seed, i) — never on the batch size — so two models sampled with the
same seed start from the same noise and their images can be compared side by side.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from .config import Config
from .data import get_dataset
from .models import make_scheduler
from .pipeline import ddim_denoise, route_by_timestep
from .progress import tqdm
from .sd import PAPER_PROMPTS, generate
from .timesteps import check_range_bounds, timestep_ranges


class TimestepEnsemble(nn.Module):
    """DeMe before merge: at timestep t, the expert whose range holds t predicts the noise.

    Same FLOPs per step as one model, N× the storage. ``experts[i]`` covers ``ranges[i]`` — the run's ranges
    (:func:`deme.ranges.config_ranges`; :func:`deme.stages.load_ensemble` passes them) — by default the equal
    ``[i·T/N, (i+1)·T/N)``. :class:`deme.pipeline.TimestepExperts` is the same routing
    (:func:`deme.pipeline.route_by_timestep`) as a diffusers model, for export.
    """

    def __init__(self, experts: list[nn.Module], num_train_timesteps: int = 1000,
                 ranges: list[tuple[int, int]] | None = None):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.num_train_timesteps = num_train_timesteps
        self.ranges = timestep_ranges(num_train_timesteps, len(experts)) if ranges is None else \
            [(int(lo), int(hi)) for lo, hi in ranges]
        if any(a[1] != b[0] for a, b in zip(self.ranges, self.ranges[1:])):
            raise ValueError(f"the ensemble's ranges {self.ranges} are not contiguous")
        check_range_bounds([lo for lo, _ in self.ranges] + [self.ranges[-1][1]], num_train_timesteps, len(experts))
        self.config = experts[0].config

    @property
    def dtype(self):
        return next(self.parameters()).dtype

    @property
    def device(self):
        return next(self.parameters()).device

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True, **kw):
        out = route_by_timestep(self.experts, self.ranges, sample, timestep, class_labels, **kw)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def initial_noise(n: int, shape: tuple[int, ...], seed: int, rows: range | None = None) -> torch.Tensor:
    """The starting noise of samples 0..n−1 for ``seed``: ``torch.randn((n, *shape))`` from a CPU generator
    seeded with ``seed`` (float32, independent of batching and device).

    ``rows``: only those samples (one process's share, :meth:`deme.distributed.Processes.share`), equal to
    ``initial_noise(n, shape, seed)[rows]`` without holding the other rows. torch's CPU normal fill draws one
    uniform per value, in order, and turns each block of 16 into normals (Box–Muller); a draw whose size is
    not a multiple of 16 redraws its last 16 values. So the block-aligned part of the stream that holds
    ``rows`` is drawn after discarding the uniforms before it (≈1–10 ns per skipped value), with the same
    tail rule when it reaches the end. Checked against the whole draw in the tests.
    """
    rows = range(n) if rows is None else rows
    return torch.cat(list(noise_chunks(n, shape, seed, max(len(rows), 1), rows))) if len(rows) else \
        torch.empty((0, *shape))


def noise_chunks(n: int, shape: tuple[int, ...], seed: int, chunk: int, rows: range | None = None
                 ) -> Iterator[torch.Tensor]:
    """:func:`initial_noise` of ``rows`` (default all ``n``) in pieces of ``chunk`` samples, drawn one after another
    from one generator (a piece is drawn in whole 16-value blocks and its spare values carried to the next): the
    same numbers as the whole draw, holding one piece at a time."""
    rows = range(n) if rows is None else rows
    if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
        raise ValueError(f"rows must be a contiguous range within 0..{n}, got {rows}")
    d = math.prod(shape)
    total = n * d
    if total < 16:                                   # drawn value by value: no blocks
        whole = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed))
        yield from (whole[s:s + chunk].clone() for s in range(rows.start, rows.stop, chunk))
        return
    pos = rows.start * d // 16 * 16                  # the block that holds the first value
    if total % 16 and pos > total - 16:              # inside the redrawn tail: draw the whole tail, as the whole
        pos = (total - 16) // 16 * 16
    g = torch.Generator().manual_seed(seed)
    skip, buf = pos, torch.empty(min(pos, 1 << 22))
    while skip:                                      # discard the uniforms of the rows before
        k = min(skip, len(buf))
        buf[:k].uniform_(generator=g)
        skip -= k
    drawn = torch.empty(0)                           # values pos .. pos + len(drawn) of the whole draw
    for s in range(rows.start, rows.stop, chunk):
        e = min(s + chunk, rows.stop)
        if pos + len(drawn) < e * d:
            upto = -(-e * d // 16) * 16
            upto = total if total % 16 and upto > total - 16 else upto   # the tail with the last piece
            drawn = torch.cat([drawn, torch.randn(upto - pos - len(drawn), generator=g)])
        yield drawn[s * d - pos:e * d - pos].view(e - s, *shape).clone()
        drawn, pos = drawn[e * d - pos:], e * d


@torch.no_grad()
def ddim_sample(model: nn.Module, cfg: Config, n: int, *, labels: torch.Tensor | list[int] | int | None = None,
                guidance_scale: float | None = None, steps: int | None = None, seed: int = 0,
                batch_size: int | None = None, device: str | torch.device | None = None, autocast: bool = False,
                progress: bool = False, rows: range | None = None) -> torch.Tensor:
    """Draw ``n`` images in [−1, 1] with DDIM (eta 0, ``steps`` steps, default ``cfg.sample_steps``).

    ``labels``: None → unconditional (the null class token for class-conditional models); an int or a
    sequence → class-conditional, with classifier-free guidance ``ε_u + s(ε_c − ε_u)`` when
    ``guidance_scale`` (default ``cfg.guidance_scale``) ≠ 1. ``autocast=True`` runs the UNet in bf16 — faster
    on GPUs and on CPUs with AMX, ~15× slower on CPUs without native bf16 (measured on a 2-core AVX2 EPYC),
    and it hides small weight differences (a merge of base + 0.25·τ rounds 41% of its conv/linear weights
    to the base's bf16 values), so every comparison here samples in float32 (the default).
    ``rows``: only those samples of the ``n`` (one process's share, see :mod:`deme.distributed`; ``labels``
    still name all ``n``), the same images as rows ``rows`` of the whole call. ``batch_size`` (default
    ``cfg.sample_batch_size``) images go through the UNet at once.
    Returns a float32 CPU tensor (n, C, H, W), (len(rows), C, H, W) with ``rows``; :func:`ddim_batches` gives
    the same images batch by batch, never holding all of them.
    """
    out = list(ddim_batches(model, cfg, n, labels=labels, guidance_scale=guidance_scale, steps=steps, seed=seed,
                            batch_size=batch_size, device=device, autocast=autocast, progress=progress, rows=rows))
    return torch.cat(out) if out else torch.empty((0, cfg.channels, cfg.image_size, cfg.image_size))


def _labels(cfg: Config, n: int, labels, guidance_scale: float | None) -> tuple[torch.Tensor | None, float]:
    """The class labels of all ``n`` samples (the null token when ``labels`` is None; None for unconditional
    models) and the guidance scale."""
    null = cfg.num_classes
    if labels is None:
        return (torch.full((n,), null, dtype=torch.long) if null else None), 1.0
    if not null:
        raise ValueError("class labels given for an unconditional profile")
    y = torch.as_tensor(labels, dtype=torch.long)
    y = y.expand(n).clone() if y.ndim == 0 else y
    if len(y) != n:
        raise ValueError(f"{len(y)} labels for {n} samples")
    return y, cfg.guidance_scale if guidance_scale is None else guidance_scale


@torch.no_grad()
def ddim_batches(model: nn.Module, cfg: Config, n: int, *, labels: torch.Tensor | list[int] | int | None = None,
                 guidance_scale: float | None = None, steps: int | None = None, seed: int = 0,
                 batch_size: int | None = None, device: str | torch.device | None = None, autocast: bool = False,
                 progress: bool = False, rows: range | None = None) -> Iterator[torch.Tensor]:
    """:func:`ddim_sample`'s images (same arguments) one batch at a time, float32 on the CPU: each batch's noise is
    drawn when it starts (:func:`noise_chunks`), so host memory holds one batch whatever ``n`` (50K samples at
    256 px would be 39 GB per copy)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    steps = steps or cfg.sample_steps
    batch_size = batch_size or cfg.sample_batch_size
    rows = range(n) if rows is None else rows
    y_all, guidance = _labels(cfg, n, labels, guidance_scale)
    sched = make_scheduler(cfg, "ddim")
    sched.set_timesteps(steps)
    was_training = model.training
    model.eval()
    noise = noise_chunks(n, (cfg.channels, cfg.image_size, cfg.image_size), seed, batch_size, rows)
    try:
        for i, x in zip(tqdm(range(rows.start, rows.stop, batch_size), disable=not progress, desc="sampling"), noise):
            y = y_all[i:i + len(x)].to(device) if y_all is not None else None
            x = ddim_denoise(model, sched, x.to(device), y, cfg.num_classes, guidance, autocast)
            yield x.clamp(-1, 1).cpu()
    finally:
        model.train(was_training)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[−1, 1] (N, C, H, W) → uint8 (N, H, W, C)."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_images(images: torch.Tensor, folder: str | Path, prefix: str = "") -> list[Path]:
    """Write each image as a PNG (``<prefix>00000.png`` …) and return the paths."""
    from PIL import Image
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images)):
        p = folder / f"{prefix}{i:05d}.png"
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(p)
        paths.append(p)
    return paths


def image_grid(images: torch.Tensor, nrow: int = 10, pad: int = 1) -> np.ndarray:
    """A grid of images in [−1, 1] as a uint8 array (H, W) or (H, W, 3), for plt.imshow / saving."""
    from torchvision.utils import make_grid
    g = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=pad, pad_value=1.0)
    arr = (g.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return arr[..., 0] if images.shape[1] == 1 else arr


def gallery_samples(cfg: Config, models: dict[str, nn.Module], seed: int = 0, per_prompt: int = 4,
                    conditional: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
    """Side-by-side samples of several models from the same starting noise: ``(images per model, row labels)``.

    Text-to-image profiles: the paper's Fig. 5 prompts (:data:`deme.sd.PAPER_PROMPTS`), ``per_prompt`` images
    each (:func:`deme.sd.generate`, guidance ``cfg.guidance_scale``). Class-conditional profiles with
    ``conditional``: one "prompt" per class ("a photo of a sneaker", ...), ``per_prompt`` images each;
    otherwise ``per_prompt`` rows of unconditional samples. Images are uint8 (n, H, W, C)."""
    spec = get_dataset(cfg)
    if spec.text_to_image:
        prompts = [p for p in PAPER_PROMPTS for _ in range(per_prompt)]
        return ({k: np.asarray(generate(m, prompts, base=cfg.pretrained, guidance_scale=cfg.guidance_scale,
                                        steps=cfg.sample_steps, seed=seed, batch_size=cfg.sample_batch_size))
                 for k, m in models.items()},
                [p[:40] + "…" for p in PAPER_PROMPTS])
    if conditional and cfg.num_classes:
        labels = torch.arange(len(spec.class_names)).repeat_interleave(per_prompt)
        rows = [spec.class_prompt(n) for n in spec.class_names]
    else:
        labels, rows = None, [f"sample row {i}" for i in range(per_prompt)]
    n = len(labels) if labels is not None else per_prompt * 8
    return {k: to_uint8(ddim_sample(m, cfg, n, labels=labels, seed=seed)) for k, m in models.items()}, rows


def pixel_differences(images: dict[str, np.ndarray], reference: str) -> pd.DataFrame:
    """How far each model's samples are from ``reference``'s, pixel by pixel, for samples from the same starting
    noise (:func:`gallery_samples`): per model the mean, 99th percentile and maximum of |Δ| on the 0–255 scale and
    the share of pixels that differ by more than 2 grey levels (visible on a screen)."""
    ref = np.asarray(images[reference], np.float64)
    rows = {}
    for name, x in images.items():
        if name == reference:
            continue
        d = np.abs(np.asarray(x, np.float64) - ref)
        rows[name] = {"mean |Δ|": d.mean(), "99th percentile |Δ|": np.percentile(d, 99), "max |Δ|": d.max(),
                      "pixels with |Δ| > 2 (%)": 100.0 * (d > 2).mean()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis(f"vs {reference}")
