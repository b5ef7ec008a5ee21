"""Datasets. Every loader returns images in [-1, 1] (N, C, H, W) and integer labels (or -1 when unlabelled).

Small datasets (sklearn digits, Fashion-MNIST) are held in memory as one tensor and batched by
:class:`TensorBatches`, whose batch at optimizer step ``s`` depends only on (seed, s): a resumed run sees
exactly the batches the uninterrupted run would have seen. Large datasets (CIFAR-10, LSUN) go through a
torch ``DataLoader``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config

FMNIST_DIRS = (os.environ.get("DEME_FMNIST_DIR", ""), "/usr/share/datasets/fashion-mnist")
FMNIST_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")
DIGITS_CLASSES = tuple(str(i) for i in range(10))


class DataMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be fetched; the message says how to provide it."""


def class_names(cfg: Config) -> tuple[str, ...]:
    return {"fmnist": FMNIST_CLASSES, "digits": DIGITS_CLASSES}.get(cfg.dataset, ())


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_fmnist() -> Path | None:
    for d in FMNIST_DIRS:
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    return None


def load_fmnist_raw(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as uint8 arrays (N, 28, 28) and labels (N,).

    Looks in ``$DEME_FMNIST_DIR`` and /usr/share/datasets/fashion-mnist (Debian package
    ``dataset-fashion-mnist``); when online, falls back to a torchvision download into ``runs/data``.
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    root = _find_fmnist()
    if root is not None:
        return (_read_idx(root / f"{prefix}-images-idx3-ubyte.gz"),
                _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("DEME_OFFLINE") == "1":
        raise DataMissingError(_FMNIST_HELP)
    try:
        from torchvision.datasets import FashionMNIST
        ds = FashionMNIST("runs/data", train=split == "train", download=True)
    except Exception as e:  # no network, no files
        raise DataMissingError(_FMNIST_HELP + f"\n(torchvision download failed: {e})") from e
    return ds.data.numpy(), ds.targets.numpy().astype(np.int64)


_FMNIST_HELP = (
    "Fashion-MNIST not found. Install it with `sudo apt-get install -y dataset-fashion-mnist` (files land in "
    "/usr/share/datasets/fashion-mnist), or put train-/t10k-{images-idx3,labels-idx1}-ubyte.gz in a folder "
    "and set DEME_FMNIST_DIR to it, or run once with internet so torchvision can download it.")


def _to_model_range(images_uint8: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (N, H, W) or (N, H, W, C) -> float (N, C, size, size) in [-1, 1], antialiased resize."""
    x = torch.from_numpy(np.array(images_uint8, copy=True)).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


def load_tensor_dataset(cfg: Config, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """The in-memory datasets: ``fmnist`` (60K/10K) and ``digits`` (sklearn, 1797 images, 8x8)."""
    if cfg.dataset == "fmnist":
        images, labels = load_fmnist_raw(split)
        return _to_model_range(images, cfg.image_size), torch.from_numpy(labels)
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits
        d = load_digits()
        images = (d.images / 16.0 * 255).round().astype(np.uint8)   # values 0..16 -> 0..255
        labels = d.target.astype(np.int64)
        idx = np.random.default_rng(0).permutation(len(images))
        cut = int(0.8 * len(images))
        idx = idx[:cut] if split == "train" else idx[cut:]
        return _to_model_range(images[idx], cfg.image_size), torch.from_numpy(labels[idx])
    raise ValueError(f"{cfg.dataset!r} is not an in-memory dataset")


class TensorBatches:
    """Random batches of an in-memory dataset, a fresh seeded permutation per epoch.

    ``batch(step)`` is a pure function of (seed, step): resuming at any step reproduces the same data order.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int):
        if len(images) < batch_size:
            raise ValueError(f"batch size {batch_size} exceeds the dataset size {len(images)}")
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.per_epoch = len(images) // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perm, self._epoch = torch.randperm(len(self.images), generator=g), epoch
        idx = self._perm[pos * self.batch_size:(pos + 1) * self.batch_size]
        return self.images[idx], self.labels[idx]


class LoaderBatches:
    """Batches from a torch ``DataLoader`` over a map-style dataset, re-shuffled (seeded) each epoch.

    On resume the sampler skips to the right epoch; within an epoch the order is reproduced by the seeded
    generator and the first ``pos`` batches are skipped.
    """

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.per_epoch = len(dataset) // batch_size
        self._iter: Iterator | None = None
        self._next = None

    def _loader(self, epoch: int):
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, shuffle=True, generator=g,
                                           drop_last=True, num_workers=self.num_workers, pin_memory=True,
                                           persistent_workers=False)

    def batch(self, index: int):
        if self._next != index:   # (re)position: start of run, resume, or a new epoch
            epoch, pos = divmod(index, self.per_epoch)
            self._iter = iter(self._loader(epoch))
            for _ in range(pos):
                next(self._iter)
        try:
            item = next(self._iter)
        except StopIteration:
            self._iter = iter(self._loader(index // self.per_epoch))
            item = next(self._iter)
        self._next = index + 1
        if (index + 1) % self.per_epoch == 0:
            self._next = None
        images, labels = item if isinstance(item, (tuple, list)) else (item, None)
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        return images, labels


def _image_transform(size: int, center_crop: bool = False):
    from torchvision import transforms
    # PAPER.md §4: resize + random crop, no flip, normalise to [-1, 1]. Centre crops (cfg.center_crop) for held-out
    # images: the same pixels in every process, so paired losses cached by one run stay paired with the next.
    crop = transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size)
    return transforms.Compose([transforms.Resize(size), crop, transforms.ToTensor(),
                               transforms.Normalize([0.5], [0.5])])


def _hf_image_dataset(name: str, size: int, center_crop: bool = False):
    """LSUN church/bedroom through Hugging Face ``datasets`` (needs internet or a local HF cache)."""
    try:
        import datasets
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataMissingError(
            f"could not load the Hugging Face dataset {name!r} ({type(e).__name__}: {e}). It needs internet, or "
            "a local copy in the HF cache; set HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0 on a machine online.") \
            from e
    tf = _image_transform(size, center_crop)
    key = "image" if "image" in ds.column_names else ds.column_names[0]

    class _Wrapped(torch.utils.data.Dataset):
        def __len__(self):
            return len(ds)

        def __getitem__(self, i):
            return tf(ds[i][key].convert("RGB")), -1

    return _Wrapped()


class CIFAR10Images(torch.utils.data.Dataset):
    """CIFAR-10 training images from the python download layout (``<root>/cifar-10-batches-py/data_batch_1…5``:
    pickled dicts whose ``data`` rows are 3072 uint8 values, channel-major, with ``labels``), read directly —
    torchvision's ``CIFAR10`` also insists on the archive's md5 sums, which a copy re-pickled or written by
    another tool does not have. Items: (image in [−1, 1] through :func:`_image_transform`, label)."""

    def __init__(self, root: str | os.PathLike, size: int, center_crop: bool = False):
        import pickle
        folder = Path(root) / "cifar-10-batches-py"
        batches = [folder / f"data_batch_{i}" for i in range(1, 6)]
        missing = [p.name for p in batches if not p.is_file()]
        if missing:
            raise DataMissingError(f"CIFAR-10 not found: {folder} lacks {', '.join(missing)}; run once with "
                                   "internet (torchvision downloads it) or set DEME_DATA to a folder holding "
                                   "cifar-10-batches-py")
        data, labels = [], []
        for p in batches:
            with open(p, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            data.append(np.asarray(d["data"], np.uint8).reshape(-1, 3, 32, 32))
            labels += list(d["labels"])
        self.images = np.concatenate(data).transpose(0, 2, 3, 1)     # (N, 32, 32, 3)
        self.labels = np.asarray(labels, np.int64)
        self.transform = _image_transform(size, center_crop)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def cifar10_dataset(size: int, center_crop: bool = False) -> CIFAR10Images:
    """The CIFAR-10 training set under ``$DEME_DATA`` (default runs/data under the repository root); downloaded
    there by torchvision first when it is missing and the hub is not offline."""
    from .config import ROOT
    root = Path(os.environ.get("DEME_DATA") or ROOT / "runs" / "data")
    if not (root / "cifar-10-batches-py" / "data_batch_1").is_file() and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            from torchvision.datasets import CIFAR10
            CIFAR10(str(root), train=True, download=True)
        except Exception as e:
            raise DataMissingError(f"CIFAR-10 not found under {root} and could not be downloaded ({e}); set "
                                   "DEME_DATA to a folder holding cifar-10-batches-py") from e
    return CIFAR10Images(root, size, center_crop)


LSUN_HF_IDS = {"lsun-church": "tglcourse/lsun_church_train", "lsun-bedroom": "pcuenq/lsun-bedrooms"}


def training_batches(cfg: Config, batch_size: int, seed: int, device=None):
    """The training batches of ``cfg.dataset``: an object whose ``batch(index)`` returns ``(x0, cond)`` —
    images in [−1, 1] and class labels (−1: none), or, for latent text-to-image models, latents and a dict
    of model keyword arguments (``encoder_hidden_states``) built by :mod:`deme.sd` on ``device``."""
    if cfg.dataset in ("laion", "imagefolder"):
        from .sd import text_image_batches
        return text_image_batches(cfg, batch_size, seed, device=device)
    if cfg.dataset in ("fmnist", "digits"):
        images, labels = load_tensor_dataset(cfg, "train")
        return TensorBatches(images, labels, batch_size, seed)
    if cfg.dataset == "cifar10":
        return LoaderBatches(cifar10_dataset(cfg.image_size, cfg.center_crop), batch_size, seed, cfg.num_workers)
    if cfg.dataset in LSUN_HF_IDS:
        return LoaderBatches(_hf_image_dataset(os.environ.get("DEME_LSUN_ID", LSUN_HF_IDS[cfg.dataset]),
                                               cfg.image_size, cfg.center_crop), batch_size, seed, cfg.num_workers)
    raise ValueError(f"dataset {cfg.dataset!r} has no training loader here (Stable Diffusion: deme.sd)")


def heldout_split(cfg: Config, part: str = "evaluation") -> tuple[torch.Tensor, torch.Tensor]:
    """The test split divided once by a fixed permutation (seed 1234): ``validation`` = its first
    ``cfg.validation_size`` images (for every choice: merge weights, budgets), ``evaluation`` = the rest (for
    judging), ``all`` = the whole split. In-memory datasets only (fmnist, digits)."""
    if cfg.dataset not in ("fmnist", "digits"):
        raise ValueError(f"{cfg.dataset!r} has no in-memory test split; use heldout_batch")
    images, labels = load_tensor_dataset(cfg, "test")
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(1234))
    if not 0 < cfg.validation_size < len(images):
        raise ValueError(f"validation_size={cfg.validation_size} must lie in 1..{len(images) - 1} "
                         f"(the {cfg.dataset} test split has {len(images)} images)")
    parts = {"validation": idx[:cfg.validation_size], "evaluation": idx[cfg.validation_size:], "all": idx}
    if part not in parts:
        raise ValueError(f"part must be one of {', '.join(parts)}, got {part!r}")
    return images[parts[part]], labels[parts[part]]


def heldout_batch(cfg: Config, n: int, seed: int = 1234) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed held-out batch for convergence curves and the merge-weight search: the first ``n`` images of
    the validation part of the test split (in-memory datasets; never the evaluation part), else a batch of
    the training data."""
    if cfg.dataset in ("fmnist", "digits"):
        images, labels = heldout_split(cfg, "validation")
        if n > len(images):
            raise ValueError(f"{n} held-out images requested; the validation part has {len(images)} "
                             "(raise validation_size)")
        return images[:n], labels[:n]
    batches = training_batches(cfg, n, seed)
    return batches.batch(0)
