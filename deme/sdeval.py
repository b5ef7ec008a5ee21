"""Text-to-image evaluation as the paper's Table 2 (BK-SDM's protocol): FID at 256 px between generated images
and a reference image folder, and the CLIP score of images against their prompts.

:func:`fid_256` embeds both sets with the Inception network of :mod:`deme.metrics` after an aspect-preserving
resize and centre crop to 256 px (:func:`features_256`; the reference's features are cached);
:func:`prepare_reference_folder` writes the reference images for chosen captions, and
:func:`prepare_val2014_reference` all 40,504 val2014 images resized to 256 (the paper's protocol,
:data:`COCO_FID_REFERENCES`). :func:`evaluate` scores a folder of generated images both ways (CLIP: open_clip
ViT-g-14 through :func:`deme.metrics.clip_scores`; ``None`` without weights), sharded over processes.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from . import metrics  # through the module: tests replace metrics.inception_features by cheap stand-ins
from .config import Config
from .distributed import SINGLE, Processes
from .errors import CorruptImageError, DataMissingError
from .imagecaptions import IMAGE_EXTENSIONS, data_source, open_image_captions, resize_crop
from .progress import tqdm
from .runs import atomic_write
from .sd import TextImageBatches

log = logging.getLogger(__name__)


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of ``folder`` (recursively), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataMissingError(f"image folder {folder} not found")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise DataMissingError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    return files


def _image_chunks(source, size: int, chunk: int = 500) -> Iterator[np.ndarray]:
    """uint8 (n, size, size, 3) chunks of a folder / list of files / uint8 array, resized (shorter side) and
    centre-cropped to ``size``."""
    if isinstance(source, np.ndarray):
        for i in range(0, len(source), chunk):
            yield np.stack([resize_crop(Image.fromarray(a), size) for a in source[i:i + chunk]])
        return
    files = image_files(source) if isinstance(source, (str, os.PathLike)) else [Path(p) for p in source]
    for i in range(0, len(files), chunk):
        out = []
        for p in files[i:i + chunk]:
            try:
                with Image.open(p) as im:
                    out.append(resize_crop(im.convert("RGB"), size))
            except Exception as e:
                raise CorruptImageError(f"{p}: cannot be read as an image ({type(e).__name__}: {e})") from e
        yield np.stack(out)


def features_256(source, size: int = 256, *, cache: str | os.PathLike | None = None,
                 device: str | torch.device | None = None, progress: bool = False,
                 processes: Processes = SINGLE) -> np.ndarray:
    """Inception pool3 features (N, 2048) of images brought to ``size``×``size`` (shorter side resized,
    bicubic, centre crop) — the FID-at-256-px protocol — then embedded by :func:`deme.metrics.inception_features`
    (clean-fid resize to 299). ``source``: a folder, a list of files, or uint8 (N, H, W, 3). With ``cache``
    (an .npz path), features are saved there and reused. ``processes``: each embeds its share of the images,
    gathered in order (the main process reads and writes the cache)."""
    if cache is not None:
        cached = processes.broadcast(np.load(cache)["features"] if processes.is_main and Path(cache).is_file()
                                     else None)
        if cached is not None:
            return cached
    if isinstance(source, (str, os.PathLike)):
        source = image_files(source)
    rows = processes.share(len(source))
    part = source[rows.start:rows.stop]
    feats = [metrics.inception_features(c, device=device)
             for c in tqdm(_image_chunks(part, size) if len(part) else (), disable=not (progress and processes.is_main),
                           desc=f"Inception features at {size}px")]
    feats = processes.concat(np.concatenate(feats) if feats else np.empty((0, metrics.FEATURE_DIM), np.float32))
    if cache is not None and processes.is_main:
        atomic_write(cache, lambda tmp: np.savez(tmp, features=feats, size=size))
    return feats


def fid_256(samples, reference, size: int = 256, *, reference_cache: str | os.PathLike | None = None,
            device: str | torch.device | None = None, progress: bool = False,
            processes: Processes = SINGLE) -> float:
    """FID of ``samples`` against ``reference`` at ``size`` px (BK-SDM: 256), both as in :func:`features_256`
    (a folder, a list of files, uint8 images, or precomputed features (N, 2048)); the reference's features
    are cached at ``reference_cache`` when given. ``processes``: the features are computed in shares."""

    def feats(x, cache=None):
        if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == metrics.FEATURE_DIM:
            return x
        return features_256(x, size, cache=cache, device=device, progress=progress, processes=processes)
    if isinstance(reference, (str, os.PathLike)) and not Path(reference).exists():
        raise DataMissingError(f"reference image folder {reference} not found: provide the real images to compare "
                               "with (e.g. the MS-COCO val2014 images of the chosen captions, see "
                               "prepare_reference_folder)")
    return metrics.fid_from_features(feats(samples), feats(reference, reference_cache))


def _write_shared(jobs: list[tuple[Path, Path]], write: Callable[[Path, Path], None], processes: Processes,
                  progress: bool, desc: str) -> None:
    """``write(src, tmp)`` for each ``(src, dst)`` of ``jobs`` whose ``dst`` is missing, each file written atomically
    (:func:`deme.runs.atomic_write`); process r of W writes its share of the list (:meth:`Processes.share`), then
    waits until every ``dst`` exists by looking at the files — no collective, so a process-group timeout (NCCL's
    10 minutes) cannot stop the launch while the others are still writing."""
    mine = processes.share(len(jobs))
    for src, dst in tqdm(jobs[mine.start:mine.stop], disable=not (progress and processes.is_main), desc=desc):
        if not dst.is_file():
            atomic_write(dst, lambda tmp, src=src: write(src, tmp))
    missing, waited = [dst for _, dst in jobs], time.time()
    while missing := [dst for dst in missing if not dst.is_file()]:
        if time.time() - waited > 60:
            log.info("%s: waiting for the other processes' %d files (%s)", desc, len(missing), missing[0])
            waited = time.time()
        time.sleep(0.5)


def prepare_reference_folder(images_dir: str | os.PathLike, file_names: Sequence[str], out_dir: str | os.PathLike,
                             size: int = 256, progress: bool = False, processes: Processes = SINGLE) -> Path:
    """Write the reference images for FID at ``size`` px: each of ``file_names`` (e.g. the COCO file names from
    :func:`coco_captions`) read from ``images_dir``, resized (shorter side) and centre-cropped, saved as PNG.
    Existing outputs are kept; a missing source image stops with its name (in every process, before any writes).
    ``processes``: each writes its share and returns when all are written (:func:`_write_shared`)."""
    images_dir, out = Path(images_dir), Path(out_dir)
    jobs = [(images_dir / name, out / (Path(name).stem + ".png")) for name in file_names]
    absent = next((src for src, dst in jobs if not dst.is_file() and not src.is_file()), None)
    if absent is not None:
        raise DataMissingError(f"reference image {absent} not found: provide the MS-COCO images "
                               f"(e.g. val2014.zip from https://cocodataset.org/#download) in {images_dir}")

    def write(src: Path, tmp: Path) -> None:
        with Image.open(src) as im:
            Image.fromarray(resize_crop(im.convert("RGB"), size)).save(tmp)

    out.mkdir(parents=True, exist_ok=True)
    _write_shared(jobs, write, processes, progress, "reference images")
    return out


COCO_FID_REFERENCES = ("chosen", "bk-sdm")
"""The MS-COCO FID references: ``"chosen"`` — the val2014 images of the chosen captions, shorter side
resized to 256 and centre-cropped (:func:`prepare_reference_folder`); ``"bk-sdm"`` — the protocol of BK-SDM,
which the paper's Table 2 follows: all 40,504 val2014 images resized (squashed) to 256×256
(:func:`prepare_val2014_reference`). Their absolute FIDs are not comparable with each other; BK-SDM also
computes FID with pytorch-fid, where :func:`fid_256` uses clean-fid's resize, so even "bk-sdm" numbers can
differ slightly from published ones."""


def prepare_val2014_reference(images_dir: str | os.PathLike, out_dir: str | os.PathLike, size: int = 256,
                              progress: bool = False, processes: Processes = SINGLE) -> Path:
    """BK-SDM's FID reference (``"bk-sdm"`` in :data:`COCO_FID_REFERENCES`): every ``.jpg`` of ``images_dir``
    (the unpacked val2014.zip: 40,504 images) resized to ``size``×``size`` without keeping the aspect ratio
    (PIL bicubic, as ``img.resize((256, 256))`` in BK-SDM's ``change_img_size``), saved as PNG under
    ``out_dir``. Existing outputs are kept (resumable). ``processes``: each writes its share and returns when all
    are written (:func:`_write_shared`)."""
    images_dir, out = Path(images_dir), Path(out_dir)
    files = sorted(p for p in images_dir.glob("*") if p.suffix.lower() in (".jpg", ".jpeg")) \
        if images_dir.is_dir() else []
    if not files:
        raise DataMissingError(f"no val2014 .jpg images in {images_dir}: unpack val2014.zip from "
                               "https://cocodataset.org/#download (images.cocodataset.org/zips/val2014.zip) there")

    def write(src: Path, tmp: Path) -> None:
        with Image.open(src) as im:
            im.convert("RGB").resize((size, size), Image.BICUBIC).save(tmp)

    out.mkdir(parents=True, exist_ok=True)
    _write_shared([(src, out / (src.stem + ".png")) for src in files], write, processes, progress,
                  "val2014 reference images")
    return out


def evaluate(samples, prompts: Sequence[str], *, reference=None, size: int = 256,
             reference_cache: str | os.PathLike | None = None, clip_model: nn.Module | None = None,
             clip_preprocess=None, clip_tokenizer=None, clip_weights: str | os.PathLike | None = None,
             device: str | torch.device | None = None, chunk: int = 500, progress: bool = False,
             processes: Processes = SINGLE) -> dict[str, Any]:
    """Table 2's metrics for generated ``samples`` (folder, files, or uint8 (N, H, W, 3); sample ``i`` made
    for ``prompts[i]``): ``fid_256`` against ``reference`` (None: not computed) and ``clip`` — the CLIP score
    of :func:`deme.metrics.clip_score` (open_clip ViT-g-14 laion2b_s34b_b88k, or ``clip_model``), ``None``
    when no CLIP weights are available (render with :func:`deme.metrics.clip_column`): the mean of the
    per-pair scores (:func:`deme.metrics.clip_scores`). ``processes``: each process embeds and scores its
    share of the samples (and of the reference images), gathered in order; every process returns the result."""
    if isinstance(samples, (str, os.PathLike)):
        samples = image_files(samples)
    n = len(samples)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts for {n} samples")
    out: dict[str, Any] = {"n": n}
    out["fid_256"] = (fid_256(samples, reference, size, reference_cache=reference_cache, device=device,
                              progress=progress, processes=processes) if reference is not None else None)
    rows = processes.share(n)
    mine, available = [], True
    for i in tqdm(range(rows.start, rows.stop, chunk), disable=not (progress and processes.is_main),
                  desc="CLIP score"):
        part = samples[i:min(i + chunk, rows.stop)]
        if not isinstance(part, np.ndarray):
            part = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in part])
        s = metrics.clip_scores(part, list(prompts[i:i + len(part)]), weights_path=clip_weights, model=clip_model,
                        preprocess=clip_preprocess, tokenizer=clip_tokenizer, device=device)
        if s is None:
            available = False
            break
        mine.append(s)
    if all(processes.gather([available])):
        scores = processes.concat(np.concatenate(mine) if mine else np.empty(0, np.float32))
        out["clip"] = float(scores.mean(dtype=np.float64))
    else:
        out["clip"] = None
    return out


def reference_pairs_features(cfg: Config, n: int, seed: int, *, size: int = 256, chunk: int = 256,
                             device: str | torch.device | None = None) -> tuple[np.ndarray, list[str]]:
    """Inception features at ``size`` px (:func:`features_256`) of ``n`` real images of the profile's data and
    their captions: the pairs of batch 0 of :func:`text_image_batches` with ``seed``, centre-cropped to
    ``cfg.image_size``, no caption dropout (the pairs :func:`deme.heldout.heldout_inputs` uses).

    Streams: images are decoded and embedded ``chunk`` at a time, so host memory holds one chunk of pixels
    (256 × 512² × 3 bytes = 0.2 GB at SD's size), never all ``n``. Returns (features (n, 2048), captions)."""
    source = open_image_captions(data_source(cfg), check_images=cfg.check_images)
    pairs = TextImageBatches(source, None, n, seed, image_size=cfg.image_size, random_crop=False,
                             resize_filter=cfg.resize_filter)
    records = pairs.records(0)
    feats, captions = [], []
    for start in range(0, n, chunk):
        images = []
        for r in records[start:start + chunk]:
            image, caption = pairs._load(r)          # a corrupt image is replaced as in training batches
            images.append(resize_crop(image, cfg.image_size, resample=cfg.resize_filter))
            captions.append(caption)
        feats.append(features_256(np.stack(images), size, device=device))
    return np.concatenate(feats), captions
