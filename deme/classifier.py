"""The project's small classifier: the embedded default's stand-in for the paper's CLIP score, and the feature
network of the classifier Fréchet distance the merge search ranks candidates by.

:func:`train_classifier` trains :class:`SmallCNN` (two conv stages and a two-layer head) on the dataset's train
split (seeded; random horizontal flips where the dataset's description allows them) and reports its test
accuracy; :func:`ensure_classifier` trains it once per profile and caches it under ``runs/``.

**Alignment** (:func:`alignment_score`): the accuracy, in %, with which the classifier recognises the prompted
class in class-conditional samples. :func:`classifier_features` gives its penultimate features (for the
classifier FD, :func:`deme.metrics.fid_from_features` on them).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .config import Config, repo_root
from .data import get_dataset, load_tensor_dataset
from .metrics import _default_device
from .progress import tqdm
from .runs import atomic_save, device_name


class SmallCNN(nn.Module):
    """Two conv stages (conv-BN-ReLU ×2, max-pool) and a two-layer head; input (N, C, S, S) in [−1, 1].

    For ``S = 16`` and ``width = 32``: ≈ 0.2 M parameters.
    """

    def __init__(self, image_size: int, channels: int = 1, num_classes: int = 10, width: int = 32,
                 hidden: int = 128, dropout: float = 0.3):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.hparams = dict(image_size=image_size, channels=channels, num_classes=num_classes, width=width,
                            hidden=hidden, dropout=dropout)

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(channels, width), *block(width, width), nn.MaxPool2d(2),
                                      *block(width, 2 * width), *block(2 * width, 2 * width), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(2 * width * (image_size // 4) ** 2, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def classifier_path(cfg: Config) -> Path:
    """The classifier checkpoint of a profile: ``data/<dataset>_classifier.pt`` for the embedded default's
    16x16 Fashion-MNIST (committed; every fmnist profile shares it), ``runs/<profile>/classifier.pt`` otherwise.
    Its provenance is the same path in .json."""
    if cfg.dataset == "fmnist" and cfg.image_size == 16:
        return repo_root() / "data" / f"{cfg.dataset}_classifier.pt"
    return repo_root() / "runs" / cfg.profile / "classifier.pt"


@torch.no_grad()
def classifier_features(classifier, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate-layer features of the project's classifier (its hidden layer, after ReLU)."""
    classifier.eval()
    dev = next(classifier.parameters()).device
    trunk = torch.nn.Sequential(classifier.features, *list(classifier.head)[:-1])
    return torch.cat([trunk(images[i:i + batch_size].to(dev)).cpu() for i in range(0, len(images), batch_size)])


@torch.no_grad()
def predict(classifier: nn.Module, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    """Predicted class indices (N,) for images (N, C, H, W) in [−1, 1]."""
    classifier.eval()
    dev = next(classifier.parameters()).device
    return torch.cat([classifier(images[i:i + batch_size].to(dev, torch.float32)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def _hflip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flip a random half of the batch horizontally (clothes are left-right symmetric; digits are not)."""
    m = torch.rand(len(x), generator=g) < 0.5
    return torch.where(m[:, None, None, None], x.flip(-1), x)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Temporarily run torch CPU ops on ``n`` threads (None: leave the setting alone)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def train_classifier(cfg: Config, out_path: str | os.PathLike | None = None, epochs: int | None = None,
                     seed: int = 0, *, batch_size: int = 128, lr: float = 2e-3, width: int = 32,
                     device: str | torch.device | None = None, threads: int | None = 1,
                     progress: bool = True) -> dict[str, Any]:
    """Train :class:`SmallCNN` on the train split of ``cfg.dataset`` (the images the diffusion model sees:
    ``deme.data.load_tensor_dataset``, [−1, 1], ``cfg.image_size``), evaluate on the test split, and save
    the checkpoint to ``out_path`` (default :func:`classifier_path`) with a .json provenance beside it.

    AdamW with a one-cycle schedule; random horizontal flips for Fashion-MNIST (±1 px shifts were tried
    and cost 0.9 points at 16 px), no augmentation for digits.
    On CPU training uses ``threads`` torch threads (default 1: the same seed then gives the same weights on
    any machine, and this small network gains little from more threads on a shared CPU; None keeps
    torch's setting). Returns the provenance: ``test_accuracy`` (%), epochs, seed, wall time, device, sizes.
    """
    spec = get_dataset(cfg)
    if not cfg.num_classes:
        raise ValueError(f"profile {cfg.profile!r} has no classes: the alignment classifier needs labels")
    out_path = Path(out_path) if out_path is not None else classifier_path(cfg)
    epochs = epochs or spec.classifier_epochs or 10
    device = torch.device(device) if device is not None else _default_device()
    x_train, y_train = load_tensor_dataset(cfg, "train")
    x_test, y_test = load_tensor_dataset(cfg, "test")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = SmallCNN(cfg.image_size, cfg.channels, cfg.num_classes, width=width).to(device)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    flip = spec.classifier_flip
    t0 = time.time()
    model.train()
    with _torch_threads(threads if device.type == "cpu" else None):
        for epoch in tqdm(range(epochs), disable=not progress, desc="classifier epochs"):
            perm = torch.randperm(len(x_train), generator=g)
            for i in range(steps_per_epoch):
                idx = perm[i * batch_size:(i + 1) * batch_size]
                x = (_hflip(x_train[idx], g) if flip else x_train[idx]).to(device)
                loss = nn.functional.cross_entropy(model(x), y_train[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        wall = time.time() - t0
        acc = 100.0 * (predict(model, x_test) == y_test).double().mean().item()
        n_threads = torch.get_num_threads()
    info = dict(dataset=cfg.dataset, image_size=cfg.image_size, profile=cfg.profile, test_accuracy=round(acc, 2),
                epochs=epochs, seed=seed, batch_size=batch_size, lr=lr, train_images=len(x_train),
                test_images=len(x_test), parameters=sum(p.numel() for p in model.parameters()),
                wall_time_s=round(wall, 1), device=str(device), device_name=device_name(device),
                cpu_count=os.cpu_count(), torch_threads=n_threads, torch=str(torch.__version__),
                architecture=model.hparams,
                purpose="alignment score: the embedded default's stand-in for the CLIP score",
                made_by=f"deme.classifier.train_classifier(get_profile({cfg.profile!r}), epochs={epochs}, seed={seed})")
    atomic_save(dict(hparams=model.hparams, state_dict={k: v.cpu() for k, v in model.state_dict().items()},
                     info=info), out_path)
    info["sha256"] = hashlib.sha256(out_path.read_bytes()).hexdigest()
    out_path.with_suffix(".json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_classifier(path: str | os.PathLike, device: str | torch.device | None = None) -> SmallCNN:
    """Load a classifier saved by :func:`train_classifier` (eval mode)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no classifier at {path}; train one with deme.classifier.train_classifier(cfg)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = SmallCNN(**ckpt["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    model.info = ckpt.get("info", {})
    return model.to(device or "cpu").eval()


def ensure_classifier(cfg: Config, device: str | torch.device | None = None) -> SmallCNN:
    """The profile's classifier: loaded from :func:`classifier_path`, trained first if it is missing."""
    path = classifier_path(cfg)
    if not path.is_file():
        train_classifier(cfg, path)
    return load_classifier(path, device)


def alignment_score(classifier: nn.Module, images: torch.Tensor | np.ndarray,
                    labels: torch.Tensor | Sequence[int] | int) -> float:
    """Classifier alignment, in %: how often the classifier recognises the prompted class in the images.

    The embedded default's stand-in for the paper's CLIP score (class-conditional samples, "prompts" =
    class labels). ``images``: float (N, C, H, W) in [−1, 1] (as sampled) or uint8 (N, H, W[, C]) at the
    classifier's resolution; ``labels``: the prompted class per image (or one int for all).
    """
    if isinstance(images, np.ndarray) or images.dtype == torch.uint8:
        x = torch.as_tensor(np.asarray(images))
        x = x[..., None] if x.ndim == 3 else x
        images = x.permute(0, 3, 1, 2).float() / 127.5 - 1
    hp = getattr(classifier, "hparams", None)
    if hp and tuple(images.shape[1:]) != (hp["channels"], hp["image_size"], hp["image_size"]):
        raise ValueError(f"images {tuple(images.shape[1:])} do not match the classifier's input "
                         f"({hp['channels']}, {hp['image_size']}, {hp['image_size']})")
    labels = torch.as_tensor(labels, dtype=torch.long)
    labels = labels.expand(len(images)) if labels.ndim == 0 else labels
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    return 100.0 * (predict(classifier, images) == labels.cpu()).double().mean().item()
