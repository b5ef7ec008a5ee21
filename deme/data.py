"""Datasets: one registry of dataset descriptions (:data:`DATASETS`) and their loaders. Every loader returns
images in [-1, 1] (N, C, H, W) and integer labels (or -1 when unlabelled).

A description (:class:`DatasetSpec`) says what every other module needs to know about a dataset — its kind
(in memory, a torch loader, or image-caption pairs for a latent text-to-image model), class names, split sizes,
loader, alignment classifier, sample-quality criterion and gallery prompts — so a new profile on a new dataset
is one description here (or :func:`register_dataset`) plus one profile in :mod:`deme.config`.

Small datasets (sklearn digits, Fashion-MNIST) are held in memory as one tensor and batched by
:class:`TensorBatches`, whose batch at optimizer step ``s`` depends only on (seed, s): a resumed run sees
exactly the batches the uninterrupted run would have seen. Large datasets (CIFAR-10, LSUN) go through a
torch ``DataLoader``.
"""

from __future__ import annotations

import contextlib
import gzip
import itertools
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .config import Config, repo_root
from .errors import DataMissingError
from .registry import add_entry
from .sd import text_image_batches

if os.name == "posix":      # download_once's lock; elsewhere (Windows) it runs unlocked
    import fcntl
else:
    fcntl = None

FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"   # Debian's dataset-fashion-mnist
FMNIST_CLASSES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle boot")
DIGITS_CLASSES = tuple(str(i) for i in range(10))


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_fmnist() -> Path | None:
    for d in (os.environ.get("DEME_FMNIST_DIR", ""), FMNIST_SYSTEM_DIR):   # the variable read at each call
        if d and (Path(d) / "train-images-idx3-ubyte.gz").exists():
            return Path(d)
    return None


def load_fmnist_raw(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as uint8 arrays (N, 28, 28) and labels (N,).

    Looks in ``$DEME_FMNIST_DIR`` and /usr/share/datasets/fashion-mnist (Debian package
    ``dataset-fashion-mnist``); when online, falls back to a torchvision download into ``$DEME_DATA`` (default
    ``runs/data`` under the repository root, whatever the working directory — notebooks run in notebooks/) by one
    process: concurrent ones (the jobs of ``reproduce --jobs``, a launch's ranks) wait and read it complete
    (:func:`download_once`).
    """
    prefix = {"train": "train", "test": "t10k"}[split]
    root = _find_fmnist()
    if root is None:
        if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("DEME_OFFLINE") == "1":
            raise DataMissingError(_FMNIST_HELP)
        try:
            root = download_once(data_root(), "FashionMNIST", _download_fmnist, _fmnist_complete) / "raw"
        except Exception as e:  # no network, no files
            raise DataMissingError(_FMNIST_HELP + f"\n(torchvision download failed: {e})") from e
    return (_read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte")),
            _read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte")).astype(np.int64))


FMNIST_FILES = tuple(f"{p}-{kind}-ubyte" for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))
"""Fashion-MNIST's four IDX files (gzipped: ``.gz``), as the Debian package and torchvision's download hold them."""


def _idx_file(folder: Path, name: str) -> Path:
    """``folder/name.gz`` where it exists (the Debian package), else ``folder/name`` (torchvision's extraction)."""
    return folder / f"{name}.gz" if (folder / f"{name}.gz").is_file() else folder / name


def _download_fmnist(into: Path) -> None:
    """Download Fashion-MNIST into ``into`` (torchvision: all four files, extracted, in ``into/FashionMNIST/raw``)."""
    from torchvision.datasets import FashionMNIST
    FashionMNIST(str(into), train=True, download=True)


def _fmnist_complete(folder: Path) -> bool:
    """Whether ``folder`` (``FashionMNIST``) holds the four extracted IDX files."""
    return all((folder / "raw" / name).is_file() for name in FMNIST_FILES)


def data_root() -> Path:
    """Where downloaded datasets go: ``$DEME_DATA``, default ``runs/data`` under the repository root."""
    return Path(os.environ.get("DEME_DATA") or repo_root() / "runs" / "data")


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


def load_digits_raw(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """sklearn's digits (1797 images, 8x8, values 0..16) as uint8 arrays and labels, split 80/20 by a fixed
    permutation (seed 0): 1437 train, 360 test images."""
    from sklearn.datasets import load_digits  # scikit-learn: only this dataset needs it
    d = load_digits()
    images = (d.images / 16.0 * 255).round().astype(np.uint8)   # values 0..16 -> 0..255
    labels = d.target.astype(np.int64)
    idx = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    idx = idx[:cut] if split == "train" else idx[cut:]
    return images[idx], labels[idx]


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


class _EveryNthBatch(torch.utils.data.Sampler):
    """Every ``stride``-th batch of ``batches`` (a batch sampler), from position ``start`` on: the batches one
    process of ``stride`` reads, without loading the ones in between."""

    def __init__(self, batches: torch.utils.data.BatchSampler, start: int, stride: int):
        self.batches, self.start, self.stride = batches, start, stride

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.start, None, self.stride)

    def __len__(self) -> int:
        return max(0, -(-(len(self.batches) - self.start) // self.stride))


class LoaderBatches:
    """Batches from a torch ``DataLoader`` over a map-style dataset, re-shuffled (seeded) each epoch.

    Batch ``index`` is batch ``index % per_epoch`` of the loader of epoch ``index // per_epoch`` (its order
    seeded by (seed, epoch)). Indices read at a constant stride (process r of W reads r, r + W, r + 2W, …) come
    from one loader per epoch whose sampler yields only those batches; any other jump (start, resume, a new
    epoch, a new stride) builds the loader anew, positioned at the index.
    """

    def __init__(self, dataset, batch_size: int, seed: int, num_workers: int):
        self.dataset, self.batch_size, self.seed, self.num_workers = dataset, batch_size, seed, num_workers
        self.per_epoch = len(dataset) // batch_size
        self._iter: Iterator | None = None
        self._last: int | None = None
        self._stride = 1

    def _loader(self, epoch: int, start: int, stride: int) -> torch.utils.data.DataLoader:
        """The loader of batches ``start``, ``start + stride``, … of ``epoch``."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(self.dataset, generator=g),
                                                self.batch_size, drop_last=True)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=_EveryNthBatch(batches, start, stride),
                                           generator=g, num_workers=self.num_workers,
                                           pin_memory=torch.cuda.is_available(), persistent_workers=False)

    def _continues(self, index: int) -> bool:
        """Whether ``index`` is the next batch of the current loader (the last index plus the stride, same epoch)."""
        return (self._last is not None and index == self._last + self._stride
                and index // self.per_epoch == self._last // self.per_epoch)

    def batch(self, index: int):
        if not self._continues(index):
            if self._last is not None and index > self._last:
                self._stride = index - self._last   # the step between this process's indices
            epoch, pos = divmod(index, self.per_epoch)
            self._iter = iter(self._loader(epoch, pos, self._stride))
        item = next(self._iter)
        self._last = index
        images, labels = item if isinstance(item, (tuple, list)) else (item, None)
        if labels is None:
            labels = torch.full((len(images),), -1, dtype=torch.long)
        return images, labels


def _image_transform(size: int, center_crop: bool = False):
    from torchvision import transforms
    # docs/method.md §4: resize + random crop, no flip, normalise to [-1, 1]. Centre crops (cfg.center_crop) for
    # held-out images: the same pixels in every process, so paired losses cached by one run stay paired with the next.
    crop = transforms.CenterCrop(size) if center_crop else transforms.RandomCrop(size)
    return transforms.Compose([transforms.Resize(size), crop, transforms.ToTensor(),
                               transforms.Normalize([0.5], [0.5])])


class HubImages(torch.utils.data.Dataset):
    """The images of a Hugging Face dataset ``ds`` (column ``key``) through ``transform``, unlabelled (−1). Defined
    at module level so that it pickles: DataLoader workers started by spawn (Python ≥ 3.14's default, macOS,
    Windows) receive the dataset pickled."""

    def __init__(self, ds, key: str, transform: Callable):
        self.ds, self.key, self.transform = ds, key, transform

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i):
        return self.transform(self.ds[i][self.key].convert("RGB")), -1


def _hf_image_dataset(name: str, size: int, center_crop: bool = False) -> HubImages:
    """LSUN church/bedroom through Hugging Face ``datasets`` (needs internet or a local HF cache)."""
    try:
        import datasets
        ds = datasets.load_dataset(name, split="train")
    except Exception as e:
        raise DataMissingError(
            f"could not load the Hugging Face dataset {name!r} ({type(e).__name__}: {e}). It needs internet, or "
            "a local copy in the HF cache; set HF_DATASETS_OFFLINE=0 and HF_HUB_OFFLINE=0 on a machine online.") \
            from e
    key = "image" if "image" in ds.column_names else ds.column_names[0]
    return HubImages(ds, key, _image_transform(size, center_crop))


CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
"""The batch files of each split in CIFAR-10's python download layout (``cifar-10-batches-py``)."""


class CIFAR10Images(torch.utils.data.Dataset):
    """CIFAR-10 images of ``split`` from the python download layout (``<root>/cifar-10-batches-py/``: training
    ``data_batch_1…5``, test ``test_batch``; pickled dicts whose ``data`` rows are 3072 uint8 values,
    channel-major, with ``labels``), read directly — torchvision's ``CIFAR10`` also insists on the archive's md5
    sums, which a copy re-pickled or written by another tool does not have. Items: (image in [−1, 1] through
    :func:`_image_transform`, label)."""

    def __init__(self, root: str | os.PathLike, size: int, center_crop: bool = False, split: str = "train"):
        folder = Path(root) / "cifar-10-batches-py"
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        batches = [folder / name for name in CIFAR10_FILES[split]]
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


def download_once(root: Path, folder: str, download: Callable[[Path], None],
                  complete: Callable[[Path], bool] = Path.is_dir) -> Path:
    """``root/folder``, downloaded first unless ``complete(root/folder)``: ``download(tmp)`` fills a new temporary
    folder beside it, whose ``folder`` then replaces ``root/folder`` whole (an incomplete one, e.g. left by an
    interrupted download, is removed first). Every process that calls this for the same ``root`` (the jobs of one
    machine, the ranks of a launch) takes an exclusive lock first: one downloads, the others wait and find the
    folder complete. A process that only looks at ``root/folder`` sees it complete or not at all."""
    root.mkdir(parents=True, exist_ok=True)
    target = root / folder
    with _exclusive(root / f".{folder}.lock"):
        if not complete(target):
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder}.", dir=root))
            try:
                download(tmp)
                shutil.rmtree(target, ignore_errors=True)
                os.replace(tmp / folder, target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive lock on the file ``path`` (created) held for the block, by one process or thread at a time;
    unlocked where there is no ``fcntl`` (Windows)."""
    with open(path, "a") as f:
        if fcntl is not None:
            fcntl.flock(f, fcntl.LOCK_EX)
        yield                   # closing the file releases the lock


def _download_cifar10(into: Path) -> None:
    """Download and extract CIFAR-10's python archive into ``into`` (torchvision: ``into/cifar-10-batches-py``)."""
    from torchvision.datasets import CIFAR10
    CIFAR10(str(into), train=True, download=True)


def _cifar10_complete(folder: Path) -> bool:
    """Whether ``folder`` (``cifar-10-batches-py``) holds every batch of both splits."""
    return all((folder / name).is_file() for names in CIFAR10_FILES.values() for name in names)


def cifar10_dataset(size: int, center_crop: bool = False, split: str = "train") -> CIFAR10Images:
    """CIFAR-10's ``split`` (train: 50K, test: 10K images) under ``$DEME_DATA`` (default runs/data under the
    repository root); downloaded there by torchvision first (:func:`download_once`: one process downloads,
    concurrent ones wait) when it is missing and the hub is not offline."""
    root = data_root()
    if not _cifar10_complete(root / "cifar-10-batches-py") and os.environ.get("HF_HUB_OFFLINE") != "1":
        try:
            download_once(root, "cifar-10-batches-py", _download_cifar10, _cifar10_complete)
        except Exception as e:
            raise DataMissingError(f"CIFAR-10 not found under {root} and could not be downloaded ({e}); set "
                                   "DEME_DATA to a folder holding cifar-10-batches-py") from e
    return CIFAR10Images(root, size, center_crop, split)


def _cifar10_train_set(cfg: Config):
    return cifar10_dataset(cfg.image_size, cfg.center_crop)


def _cifar10_test_set(cfg: Config):
    return cifar10_dataset(cfg.image_size, cfg.center_crop, "test")


def _lsun_train_set(hub_id: str) -> Callable[[Config], torch.utils.data.Dataset]:
    """LSUN through Hugging Face ``datasets``: ``hub_id``, or ``$DEME_LSUN_ID`` when set."""
    return lambda cfg: _hf_image_dataset(os.environ.get("DEME_LSUN_ID", hub_id), cfg.image_size,
                                         cfg.center_crop)


# ---------------------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------------------

KINDS = ("tensor", "loader", "text-to-image")
QUALITY_CRITERIA = ("classifier-fd", "inception-fid", "fid@256")


@dataclass(frozen=True)
class DatasetSpec:
    """The description of one dataset.

    ``kind``: ``tensor`` (held in memory, a train and a test split: ``arrays(split)`` gives uint8 images
    (N, H, W[, C]) and int64 labels, resized to the profile's size on loading), ``loader`` (a training set
    only, ``train_set(cfg)`` a map-style torch dataset of (image in [-1, 1], label) pairs read through a
    ``DataLoader``; ``test_set(cfg)`` the same for a split training never sees, where the dataset has one —
    the held-out images of :func:`deme.heldout.fixed_sample`) or ``text-to-image`` (image-caption pairs encoded
    to latents and caption embeddings by :func:`deme.sd.text_image_batches`). ``split_sizes``: images per split
    where known (caps the reference statistics). ``classifier_epochs``: epochs of the project's alignment classifier
    (:func:`deme.classifier.train_classifier`; None: no classifier — class alignment is then not scored);
    ``classifier_flip``: random horizontal flips when training it (clothes are left-right symmetric, digits
    are not). ``quality``: the sample-quality criterion of :func:`deme.stages.sample_quality_fn` — one of
    :data:`QUALITY_CRITERIA`. ``prompt``: the gallery's "prompt" for a class (``{name}``, ``{a}`` = a/an)."""

    name: str
    display: str
    kind: str
    source: str = ""
    class_names: tuple[str, ...] = ()
    split_sizes: Mapping[str, int] = field(default_factory=dict)
    arrays: Callable[[str], tuple[np.ndarray, np.ndarray]] | None = None
    train_set: Callable[[Config], torch.utils.data.Dataset] | None = None
    test_set: Callable[[Config], torch.utils.data.Dataset] | None = None
    classifier_epochs: int | None = None
    classifier_flip: bool = False
    quality: str = "inception-fid"
    prompt: str = "a photo of {a} {name}"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"dataset {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.quality not in QUALITY_CRITERIA:
            raise ValueError(f"dataset {self.name!r}: quality must be one of {', '.join(QUALITY_CRITERIA)}, "
                             f"got {self.quality!r}")
        if (self.kind == "tensor") != (self.arrays is not None) or (self.kind == "loader") != (self.train_set
                                                                                              is not None):
            raise ValueError(f"dataset {self.name!r}: a tensor dataset gives arrays, a loader dataset train_set "
                             "(and no other kind gives either)")
        if self.test_set is not None and self.kind != "loader":
            raise ValueError(f"dataset {self.name!r}: test_set is for loader datasets (a tensor dataset's test "
                             "split comes from arrays('test'))")
        if self.classifier_epochs is not None and self.kind != "tensor":
            raise ValueError(f"dataset {self.name!r}: the alignment classifier trains on in-memory datasets only")

    @property
    def in_memory(self) -> bool:
        """Held in memory with a test split (:func:`load_tensor_dataset`, :func:`heldout_split`)."""
        return self.kind == "tensor"

    @property
    def has_classifier(self) -> bool:
        """Class alignment is scored with the project's classifier (``classifier_epochs`` set)."""
        return self.classifier_epochs is not None

    @property
    def text_to_image(self) -> bool:
        """Trains a latent text-to-image model (Stable Diffusion) through :mod:`deme.sd`."""
        return self.kind == "text-to-image"

    def class_prompt(self, name: str) -> str:
        """The gallery's "prompt" for class ``name``: "a photo of a sneaker", "a photo of the digit 3"."""
        return self.prompt.format(name=name, a="an" if name[0].lower() in "aeiou" else "a")


DATASETS: dict[str, DatasetSpec] = {d.name: d for d in (
    DatasetSpec("digits", "sklearn digits", "tensor", "sklearn.datasets.load_digits (8x8, 1797 images)",
                class_names=DIGITS_CLASSES, split_sizes={"train": 1437, "test": 360}, arrays=load_digits_raw,
                classifier_epochs=20, quality="classifier-fd", prompt="a photo of the digit {name}"),
    DatasetSpec("fmnist", "Fashion-MNIST", "tensor", "Xiao et al. 2017; Debian package dataset-fashion-mnist",
                class_names=FMNIST_CLASSES, split_sizes={"train": 60_000, "test": 10_000}, arrays=load_fmnist_raw,
                classifier_epochs=8, classifier_flip=True, quality="classifier-fd"),
    DatasetSpec("cifar10", "CIFAR-10", "loader", "torchvision CIFAR10 (python download layout)",
                split_sizes={"train": 50_000, "test": 10_000}, train_set=_cifar10_train_set,
                test_set=_cifar10_test_set),
    DatasetSpec("lsun-church", "LSUN Church", "loader", "hub dataset tglcourse/lsun_church_train (LSUN "
                "church_outdoor's 126,227 training images, split by the hub dataset; training reads its train split)",
                split_sizes={"train": 119_915, "test": 6_312},
                train_set=_lsun_train_set("tglcourse/lsun_church_train")),
    DatasetSpec("lsun-bedroom", "LSUN Bedroom", "loader", "hub dataset pcuenq/lsun-bedrooms",
                train_set=_lsun_train_set("pcuenq/lsun-bedrooms")),
    DatasetSpec("laion", "LAION image-caption pairs", "text-to-image",
                "an image-caption folder or hub dataset (cfg.data_dir / $DEME_SD_DATA)", quality="fid@256"),
    DatasetSpec("imagefolder", "image-caption folder", "text-to-image",
                "imagefolder + metadata.jsonl (cfg.data_dir / $DEME_SD_DATA)", quality="fid@256"),
)}


def get_dataset(cfg_or_name: Config | str) -> DatasetSpec:
    """The description of a dataset, by name or of a profile's ``cfg.dataset``; an unknown name stops with the
    registered ones."""
    name = cfg_or_name if isinstance(cfg_or_name, str) else cfg_or_name.dataset
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(DATASETS)} "
                         "(add one with deme.data.register_dataset)")
    return DATASETS[name]


def register_dataset(spec: DatasetSpec) -> DatasetSpec:
    """Add ``spec`` to the registry (e.g. from a notebook or a plug-in module); a profile with
    ``dataset=spec.name`` then trains, merges and is evaluated on it."""
    return add_entry(DATASETS, spec, "dataset")


def is_text_to_image(cfg: Config) -> bool:
    """Whether ``cfg`` trains a latent text-to-image model (Stable Diffusion) through :mod:`deme.sd`."""
    return get_dataset(cfg).text_to_image


def class_names(cfg: Config) -> tuple[str, ...]:
    """The class names of ``cfg.dataset`` (``()`` when it has none)."""
    return get_dataset(cfg).class_names


# ---------------------------------------------------------------------------------------------------------
# Loading through the registry
# ---------------------------------------------------------------------------------------------------------

def load_tensor_dataset(cfg: Config, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """An in-memory dataset's ``split`` at the profile's size: images in [-1, 1] (N, C, H, W) and labels."""
    spec = get_dataset(cfg)
    if not spec.in_memory:
        raise ValueError(f"{cfg.dataset!r} is not an in-memory dataset")
    images, labels = spec.arrays(split)
    return _to_model_range(images, cfg.image_size), torch.from_numpy(labels)


def training_batches(cfg: Config, batch_size: int, seed: int, device=None):
    """The training batches of ``cfg.dataset``: an object whose ``batch(index)`` returns ``(x0, cond)`` —
    images in [−1, 1] and class labels (−1: none), or, for latent text-to-image models, latents and a dict
    of model keyword arguments (``encoder_hidden_states``) built by :mod:`deme.sd` on ``device``."""
    spec = get_dataset(cfg)
    if spec.text_to_image:
        return text_image_batches(cfg, batch_size, seed, device=device)
    if spec.in_memory:
        images, labels = load_tensor_dataset(cfg, "train")
        return TensorBatches(images, labels, batch_size, seed)
    return LoaderBatches(spec.train_set(cfg), batch_size, seed, cfg.num_workers)


def heldout_split(cfg: Config, part: str = "evaluation") -> tuple[torch.Tensor, torch.Tensor]:
    """The test split divided once by a fixed permutation (seed 1234): ``validation`` = its first
    ``cfg.validation_size`` images (for every choice: merge weights, budgets), ``evaluation`` = the rest (for
    judging), ``all`` = the whole split. In-memory datasets only (fmnist, digits)."""
    if not get_dataset(cfg).in_memory:
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
    if get_dataset(cfg).in_memory:
        images, labels = heldout_split(cfg, "validation")
        if n > len(images):
            raise ValueError(f"{n} held-out images requested; the validation part has {len(images)} "
                             "(raise validation_size)")
        return images[:n], labels[:n]
    batches = training_batches(cfg, n, seed)
    return batches.batch(0)
