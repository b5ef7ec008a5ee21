"""Image–caption data for text-to-image finetuning and the text-to-image evaluation prompts.

**Training data**: a local folder in Hugging Face ``imagefolder`` layout — images plus ``metadata.jsonl`` (or
``metadata.csv``) with ``file_name`` and ``text`` per image (:class:`ImageCaptionFolder`), given by
``cfg.data_dir`` or ``$DEME_SD_DATA``; or, online, a hub dataset id with columns ``image`` and ``text``
(:class:`HubImageCaptions`); :func:`open_image_captions` picks one. Every bad record (a caption without an image,
an image without a caption, a corrupt image, a malformed metadata line) is logged with its file name, counted in
a :class:`DataReport` and skipped; a missing metadata file stops with a message saying what to provide. The scan
of a large folder is indexed once (:func:`default_index_dir`) and shared by every process.

**Evaluation prompts** (BK-SDM's protocol, as the paper): MS-COCO val captions (:func:`coco_captions`,
:func:`coco_prompts`: one caption per image, 30K images), ImageNet class names (:func:`imagenet_prompts`) and
PartiPrompts (:func:`parti_prompts`).

What the model sees of these pairs (latents, text embeddings) is :mod:`deme.sd`'s.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from .config import Config, repo_root
from .distributed import SINGLE, Processes
from .errors import CorruptImageError, DataMissingError
from .runs import atomic_write

log = logging.getLogger("deme.imagecaptions")


SD_DATA_ENV = "DEME_SD_DATA"
"""Environment variable naming the image–caption data (folder or hub dataset id) when ``cfg.data_dir`` is unset."""

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# ---------------------------------------------------------------------------------------------------------
# Image–caption data: validation and reporting
# ---------------------------------------------------------------------------------------------------------

@dataclass
class DataReport:
    """What was found in an image–caption source: usable pairs and every bad record (file name, reason).

    Each bad record is logged (logger ``deme.sd``, WARNING) with its file name — the first ``log_limit``
    one by one, then a count every 1000 — and kept in ``bad``; nothing is dropped silently.
    """

    source: str
    usable: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)
    log_limit: int = 50
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, file_name: str, reason: str) -> None:
        with self._lock:
            self.bad.append((str(file_name), reason))
            n = len(self.bad)
        if n <= self.log_limit:
            log.warning("%s: skipping %s: %s", self.source, file_name, reason)
        elif n % 1000 == 0:
            log.warning("%s: %d bad records so far (see DataReport.bad)", self.source, n)

    @property
    def counts(self) -> dict[str, int]:
        """Bad records by kind (the reason up to its first colon)."""
        return dict(Counter(r.split(":")[0] for _, r in self.bad))

    def summary(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items())) or "none"
        return f"{self.source}: {self.usable} usable image-caption pairs; {len(self.bad)} bad records skipped ({kinds})"


NO_CAPTION = "image without a caption"
NOT_LISTED = "image without a caption: not listed in the metadata file"
MISSING_FILE = "caption without an image: file not found"
CORRUPT = "corrupt image"
MALFORMED = "malformed metadata record"


def _check_image(path: Path, full: bool) -> str | None:
    """None if ``path`` opens as an image (header only, or a full decode when ``full``), else the reason."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            if full:
                im.load()
            else:
                im.size  # header parsed by open
    except Exception as e:
        return f"{CORRUPT}: {type(e).__name__}: {e}"
    return None


SCAN_INDEX_VERSION = 1


def default_index_dir() -> Path:
    """Where :class:`ImageCaptionFolder` keeps its scan indexes: ``runs/cache/image_index`` of the project
    (``$DEME_ROOT``), or ``$DEME_INDEX_DIR``."""
    return Path(os.environ.get("DEME_INDEX_DIR") or repo_root() / "runs" / "cache" / "image_index")


def folder_listing_key(root: Path, *extra: Any, exclude: Path | None = None) -> str:
    """A digest of every file under ``root`` — relative path, size, modification time — and ``extra``: it
    changes when a file is added, removed, replaced or edited (the metadata file included). Costs one
    ``stat`` per file, no reads (``exclude``: a folder left out, e.g. an index kept inside ``root``)."""
    h = hashlib.sha256(json.dumps([SCAN_INDEX_VERSION, str(root.resolve()), *extra]).encode())
    skip = exclude.resolve() if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if skip is not None:
            dirnames[:] = [d for d in dirnames if Path(dirpath, d).resolve() != skip]
        for name in sorted(filenames):
            st = os.stat(os.path.join(dirpath, name))
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class ImageCaptionFolder:
    """Image–caption pairs of a local folder in Hugging Face ``imagefolder`` layout.

    The folder holds images (any depth) and ``metadata.jsonl`` — one JSON object per line with ``file_name``
    (path relative to the folder) and ``text`` (the caption) — or ``metadata.csv`` with the same columns; a
    ``train/`` subfolder holding them is accepted too. Validation at construction: a missing metadata file
    raises :class:`DataMissingError`; a record without a caption, a record whose image is missing, an image
    listed nowhere, a malformed line and (``check_images``: ``"header"`` — cheap, the default — or
    ``"full"`` decode, or ``"none"``) a corrupt image are reported in ``self.report`` and skipped. Images
    that only fail at full decode are reported and skipped when first loaded (:meth:`load`).

    The scan (one header read per image: minutes for BK-SDM's 212K images on network storage) is done once:
    its result is written to an index under ``index_dir`` (default :func:`default_index_dir`) named by
    :func:`folder_listing_key`, and a later start with the same files reads it instead. ``processes``
    (:mod:`deme.distributed`; every process of the launch must construct the folder): the main process scans
    and writes the index, the others wait for it and read it — or scan themselves where they cannot see it
    (no file system shared with the main process).
    """

    def __init__(self, root: str | os.PathLike, caption_column: str = "text", check_images: str = "header", *,
                 index_dir: str | os.PathLike | None = None, processes: Processes = SINGLE):
        if check_images not in ("header", "full", "none"):
            raise ValueError(f"check_images must be 'header', 'full' or 'none', got {check_images!r}")
        root = Path(root)
        if not root.is_dir():
            raise DataMissingError(f"image-caption folder {root} does not exist; set {SD_DATA_ENV} (or "
                                   "cfg.data_dir) to a folder of images with metadata.jsonl")
        meta = next((d / n for d in (root, root / "train") for n in ("metadata.jsonl", "metadata.csv")
                     if (d / n).is_file()), None)
        if meta is None:
            raise DataMissingError(
                f"{root}: no metadata.jsonl (or metadata.csv) with the captions. Provide {root / 'metadata.jsonl'}: "
                'one JSON object per line, {"file_name": "0001.png", "text": "a caption"}, file_name relative to '
                "the folder (Hugging Face imagefolder layout).")
        self.root, self.metadata, self.caption_column = meta.parent, meta, caption_column
        self.check_images = check_images
        self.report = DataReport(str(meta))
        self._bad: set[int] = set()
        scan = self._shared_scan(Path(index_dir) if index_dir is not None else default_index_dir(), processes)
        self.records: list[tuple[Path, str]] = [(self.root / name, caption) for name, caption in scan["records"]]
        for name, reason in scan["bad"]:
            self.report.add(name, reason)
        self.report.usable = len(self.records)
        if self.report.bad:
            log.warning(self.report.summary())
        if not self.records:
            raise DataMissingError(f"{meta}: no usable image-caption pairs ({self.report.summary()})")

    def scan(self) -> dict[str, list]:
        """Read the metadata and check the files: ``{"records": [(file name, caption)], "bad": [(name,
        reason)]}`` (file names relative to the folder, in metadata order)."""
        meta, caption_column = self.metadata, self.caption_column
        records, bad = [], []
        listed: set[Path] = set()
        for line_no, rec in self._read_metadata(meta):
            if rec is None:
                bad.append((f"{meta.name} line {line_no}", f"{MALFORMED}: not a JSON object"))
                continue
            name = rec.get("file_name")
            if not isinstance(name, str) or not name:
                bad.append((f"{meta.name} line {line_no}", f"{MALFORMED}: no file_name"))
                continue
            path = (self.root / name)
            listed.add(path.resolve())
            caption = rec.get(caption_column)
            if not isinstance(caption, str) or not caption.strip():
                bad.append((name, f"{NO_CAPTION}: no {caption_column!r} in {meta.name} line {line_no}"))
                continue
            if not path.is_file():
                bad.append((name, MISSING_FILE))
                continue
            if self.check_images != "none":
                problem = _check_image(path, full=self.check_images == "full")
                if problem:
                    bad.append((name, problem))
                    continue
            records.append((str(path.relative_to(self.root)), caption.strip()))
        for path in sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
            if path.resolve() not in listed:
                bad.append((str(path.relative_to(self.root)), NOT_LISTED))
        return {"records": records, "bad": bad}

    def _shared_scan(self, index_dir: Path, processes: Processes) -> dict[str, list]:
        """:meth:`scan`, done once: read from the index of the folder's current listing when there is one;
        else the main process scans and writes it (atomically) while the others wait and read it."""

        def read(path: Path) -> dict | None:
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) and data.get("key") == path.stem else None

        path = status = None
        if processes.is_main:
            key = folder_listing_key(self.root, self.caption_column, self.check_images, exclude=index_dir)
            path = index_dir / f"{key}.json"
            data = read(path)
            status = "ready" if data is not None else "scanning"
            if data is None:
                index_dir.mkdir(parents=True, exist_ok=True)
                path.with_suffix(".scanning").write_text(str(os.getpid()))   # others: the index is coming
        path, status = processes.broadcast((str(path), status) if processes.is_main else None)
        path = Path(path)
        claim = path.with_suffix(".scanning")
        if processes.is_main:
            if status == "ready":
                return data
            try:
                data = {"key": path.stem, "root": str(self.root), **self.scan()}
                atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8"))
            finally:
                claim.unlink(missing_ok=True)
            return data
        waited = time.time()
        while True:               # the main process scans; no collective here, so no process-group timeout
            data = read(path)
            if data is not None:
                return data
            if not claim.exists() and read(path) is None:   # not visible here, or the main process failed
                log.info("%s: the main process's scan index %s is not visible here; scanning", self.root, path)
                return self.scan()
            if time.time() - waited > 60:
                log.info("%s: waiting for the main process's scan (%s)", self.root, path)
                waited = time.time()
            time.sleep(0.2)

    def _read_metadata(self, meta: Path) -> Iterator[tuple[int, dict | None]]:
        if meta.suffix == ".csv":
            with open(meta, newline="", encoding="utf-8") as f:
                for i, row in enumerate(csv.DictReader(f), start=2):
                    yield i, dict(row)
            return
        with open(meta, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    rec = None
                yield i, rec if isinstance(rec, dict) else None

    def __len__(self) -> int:
        return len(self.records)

    def name(self, i: int) -> str:
        return str(self.records[i][0].relative_to(self.root))

    def load(self, i: int):
        """(PIL RGB image, caption) of record ``i``; raises :class:`CorruptImageError` (reported once) when the
        image cannot be decoded."""
        from PIL import Image
        path, caption = self.records[i]
        if i in self._bad:
            raise CorruptImageError(self.name(i))
        try:
            with Image.open(path) as im:
                return im.convert("RGB"), caption
        except Exception as e:
            self._bad.add(i)
            self.report.add(self.name(i), f"{CORRUPT}: {type(e).__name__}: {e}")
            raise CorruptImageError(self.name(i)) from e


class HubImageCaptions:
    """Image–caption pairs of a Hugging Face hub dataset (columns ``image`` and ``caption_column``; needs
    internet or the local datasets cache). Records without a caption are reported and skipped up front,
    images that fail to decode when first loaded."""

    def __init__(self, dataset_id: str, caption_column: str = "text", split: str = "train"):
        try:
            import datasets
            ds = datasets.load_dataset(dataset_id, split=split)
        except Exception as e:
            raise DataMissingError(
                f"could not load the hub dataset {dataset_id!r} ({type(e).__name__}: {str(e)[:300]}). It needs "
                f"internet (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) or a local copy; or set {SD_DATA_ENV} to a "
                "local folder of images with metadata.jsonl") from e
        if caption_column not in ds.column_names or "image" not in ds.column_names:
            raise DataMissingError(f"hub dataset {dataset_id!r} has columns {ds.column_names}; need 'image' and "
                                   f"{caption_column!r}")
        self.ds, self.report, self._bad = ds, DataReport(dataset_id), set()
        captions = ds[caption_column]
        self.rows, self.captions = [], []
        for i, c in enumerate(captions):
            if isinstance(c, str) and c.strip():
                self.rows.append(i)
                self.captions.append(c.strip())
            else:
                self.report.add(f"row {i}", f"{NO_CAPTION}: empty {caption_column!r}")
        self.report.usable = len(self.rows)
        if not self.rows:
            raise DataMissingError(f"{dataset_id}: no usable image-caption pairs ({self.report.summary()})")

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> str:
        return f"row {self.rows[i]}"

    def load(self, i: int):
        if i in self._bad:
            raise CorruptImageError(self.name(i))
        try:
            return self.ds[self.rows[i]]["image"].convert("RGB"), self.captions[i]
        except Exception as e:
            self._bad.add(i)
            self.report.add(self.name(i), f"{CORRUPT}: {type(e).__name__}: {e}")
            raise CorruptImageError(self.name(i)) from e


def data_source(cfg: Config) -> str:
    """Where the profile's image–caption pairs are: ``cfg.data_dir`` if set, else
    ``$DEME_SD_DATA``; a missing setting raises :class:`DataMissingError` saying what to provide."""
    src = cfg.data_dir or os.environ.get(SD_DATA_ENV)
    if not src:
        raise DataMissingError(
            f"no image-caption data for profile {cfg.profile!r}: set {SD_DATA_ENV} to a folder of images with "
            "metadata.jsonl (file_name, text per line; e.g. BK-SDM's LAION-Aesthetics V2 6.5+ 212K subset "
            "unpacked) or to a Hugging Face dataset id with 'image' and 'text' columns (online).")
    return src


def open_image_captions(source: str | os.PathLike, caption_column: str = "text", check_images: str = "header", *,
                        processes: Processes = SINGLE):
    """A local :class:`ImageCaptionFolder` when ``source`` is an existing path (or looks like a path), else a
    :class:`HubImageCaptions` for a hub dataset id ``owner/name``. ``processes``: a folder's scan is done by
    the main process and shared (:class:`ImageCaptionFolder`)."""
    s = str(source)
    path = Path(s).expanduser()
    is_hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", s) is not None
    if path.exists() or not is_hub_id:
        return ImageCaptionFolder(path, caption_column, check_images, processes=processes)
    return HubImageCaptions(s, caption_column)


# ---------------------------------------------------------------------------------------------------------
# Resizing and cropping the pairs' images (training batches, FID references)
# ---------------------------------------------------------------------------------------------------------

RESIZE_FILTERS = ("bicubic", "bilinear")


def resize_crop(image, size: int, fx: float | None = None, fy: float | None = None,
                resample: str = "bicubic") -> np.ndarray:
    """Resize the shorter side to ``size`` (``resample``: "bicubic" or "bilinear", PIL, antialiased) and crop
    ``size``×``size``: the crop's offset is the fraction ``fx``, ``fy`` ∈ [0, 1) of the free range (uniform),
    or the centre when None. Returns uint8 (size, size, 3)."""
    from PIL import Image
    if resample not in RESIZE_FILTERS:
        raise ValueError(f"resize filter must be one of {', '.join(RESIZE_FILTERS)}, got {resample!r}")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC if resample == "bicubic" else Image.BILINEAR)

    def offset(free: int, f: float | None) -> int:
        return free // 2 if f is None else min(free, int(f * (free + 1)))

    left, top = offset(nw - size, fx), offset(nh - size, fy)
    return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"))


# ---------------------------------------------------------------------------------------------------------
# Evaluation prompts
# ---------------------------------------------------------------------------------------------------------

_COCO_HELP = ("Provide the MS-COCO captions file captions_val2014.json (or captions_val2017.json) from "
              "annotations_trainval2014.zip at https://cocodataset.org/#download (images.cocodataset.org/"
              "annotations/annotations_trainval2014.zip) and pass its path.")


def coco_captions(path: str | os.PathLike, n: int = 30_000, seed: int = 0) -> list[tuple[int, str, str]]:
    """(image id, image file name, caption) for ``n`` MS-COCO images, one caption per image, both seeded.

    ``path``: captions_val2014.json / captions_val2017.json (``annotations``: caption + image_id; ``images``:
    id + file_name). The images are a seeded random subset of those with a caption (all, in a seeded order,
    when fewer than ``n`` — with a warning); each image's caption is drawn from its captions (ordered by
    annotation id) by the same seeded generator.
    """
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(f"MS-COCO captions file {path} not found. {_COCO_HELP}")
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO captions file (no 'annotations' list). {_COCO_HELP}")
    by_image: dict[int, list[tuple[int, str]]] = {}
    for k, a in enumerate(data["annotations"]):
        if isinstance(a.get("caption"), str) and a["caption"].strip() and "image_id" in a:
            by_image.setdefault(int(a["image_id"]), []).append((int(a.get("id", k)), a["caption"].strip()))
    files = {int(im["id"]): im.get("file_name", "") for im in data.get("images", [])}
    ids = sorted(by_image)
    if n > len(ids):
        warnings.warn(f"{path.name} has captions for {len(ids)} images, fewer than n={n}: using all of them",
                      stacklevel=2)
        n = len(ids)
    rng = np.random.default_rng(seed)
    chosen = [ids[i] for i in rng.permutation(len(ids))[:n]]
    out = []
    for image_id in chosen:
        caps = sorted(by_image[image_id])
        out.append((image_id, files.get(image_id, ""), caps[int(rng.integers(len(caps)))][1]))
    return out


def coco_prompts(path: str | os.PathLike, n: int = 30_000, seed: int = 0) -> list[str]:
    """``n`` MS-COCO val captions, one per image, seeded (see :func:`coco_captions`) — the zero-shot
    MS-COCO prompts of Table 2 (30K)."""
    return [c for _, _, c in coco_captions(path, n, seed)]


def parti_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts of PartiPrompts (column ``Prompt`` of PartiPrompts.tsv; 1,632 prompts)."""
    path = Path(path)
    if not path.is_file():
        raise DataMissingError(f"PartiPrompts file {path} not found. Provide PartiPrompts.tsv from "
                               "https://github.com/google-research/parti (PartiPrompts.tsv, tab-separated, "
                               "column 'Prompt') and pass its path.")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        if not reader.fieldnames or "Prompt" not in reader.fieldnames:
            raise ValueError(f"{path}: no 'Prompt' column (columns: {reader.fieldnames}); expected the "
                             "PartiPrompts TSV")
        return [row["Prompt"].strip() for row in reader if row.get("Prompt") and row["Prompt"].strip()]


def imagenet_prompts(classes: Iterable[str], template: str = "a photo of a {}") -> list[str]:
    """One prompt per class name: ``"a photo of a {class}"`` (names used as given, whitespace stripped)."""
    return [template.format(c.strip()) for c in classes]
