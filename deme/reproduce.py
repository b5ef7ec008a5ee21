"""The reproduction: every notebook of a profile executed in order by papermill (``python -m deme reproduce``).

:func:`stages` is the plan (docs/method.md §9, the data flow), :func:`reproduce` runs it — independent training
stages side by side, a stage skipped when its record matches the current config, notebook source and parameters — and
:func:`publish` copies an executed notebook into notebooks/ without machine paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import torch
from jupyter_client.manager import AsyncKernelManager
from traitlets.config import Config

from .colab import SETUP_TAG
from .config import FIGURES_ENV, figures_dir, get_profile, normalized, repo_root
from .methods import baselines
from .runs import device_name, git_commit, package_versions, write_json

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"   # the notebooks ship beside the package


# papermill parameters that change how fast a stage runs, not what it computes: not part of a stage's record
# comparison (a stage run with --jobs 2 is up to date for --jobs 8)
SPEED_PARAMS = ("jobs",)


def stages(cfg, full: bool = False, jobs: int = 1, sweeps: bool = False) -> list[tuple[str, str, dict]]:
    """(stage name, notebook, papermill parameters) in the order of docs/method.md §9 (the data flow), for the notebooks
    that exist: 01 base → 02 analysis → 03 training jobs (baselines, then one job per range) → 04 merge → 05 →
    06 → 07. The training jobs are independent; the baselines (N×K steps each) come first so that, run side
    by side, the short range jobs fill the end instead of one long baseline running alone. ``full`` adds the
    six weighted baselines (trained, and compared in 05), Table 3 and the budget study of 06; ``sweeps`` the
    sensitivity sweeps over N and p of 06 (the longest part); ``jobs`` > 1 is passed on to 06, which trains its
    variants that many at once."""
    p = {"profile": cfg.profile}
    pfull = {**p, **({"full": True} if full else {})}
    p06 = {**pfull, **({"sweeps": True} if sweeps else {}), **({"jobs": jobs} if jobs > 1 else {})}
    plan = [("01_base_model", "01_base_model.ipynb", p), ("02_gradient_conflict", "02_gradient_conflict.ipynb", p)]
    if (NOTEBOOKS / "05_compare.ipynb").exists():
        plan += [(f"03_train_{m}", "03_train.ipynb", {**p, "method": m})
                 for m in baselines(default_only=not full)]
    plan += [(f"03_train_range{i}", "03_train.ipynb", {**p, "range": i}) for i in range(cfg.num_ranges)]
    plan += [("04_merge", "04_merge.ipynb", p), ("05_compare", "05_compare.ipynb", pfull),
             ("06_ablation", "06_ablation.ipynb", p06), ("07_gallery", "07_gallery.ipynb", p)]
    return [s for s in plan if (NOTEBOOKS / s[1]).exists()]


class QuietShutdownKernelManager(AsyncKernelManager):
    """jupyter_client's kernel manager, less the interrupt it sends a kernel right before asking it to shut down.
    After a notebook has run there is nothing to interrupt; but a kernel that receives that SIGINT while it is
    still handling a message (as happens to kernels that end side by side under load) logs "[IPKernelApp] ERROR |
    KeyboardInterrupt caught in kernel." on the terminal of a run that went well. Interrupts at any other time
    (papermill's cell timeout, a user's ^C) are sent as before."""

    async def _async_interrupt_kernel(self) -> None:
        if self.shutting_down:
            return
        await super()._async_interrupt_kernel()


def kernel_config(folder: str | os.PathLike) -> Config:
    """The kernel's settings: it talks to papermill over Unix sockets in ``folder`` (its own, so kernels started
    side by side never share a socket) instead of TCP on localhost, so ipykernel does not print "Kernel is running
    over TCP without encryption" on the terminal once per stage. (CurveZMQ encryption silences it too, but a kernel
    died with it before kernel_info in a clean-clone CI run.) Windows has no Unix sockets: TCP there. The kernel is
    shut down without the interrupt that could make it log an error (:class:`QuietShutdownKernelManager`)."""
    quiet = {"NotebookClient": {"kernel_manager_class": QuietShutdownKernelManager}}
    if os.name == "nt":
        return Config(quiet)
    return Config({**quiet, "KernelManager": {"transport": "ipc", "ip": os.path.join(folder, "kernel")}})


def execute(notebook: Path, target: Path, params: dict, *, cwd: Path, progress_bar: bool = False) -> None:
    """Execute ``notebook`` into ``target`` with papermill (``params`` injected, kernel ``python3`` started in
    ``cwd`` with :func:`kernel_config` in a temporary folder of its own): the one place deme starts notebook
    kernels."""
    with tempfile.TemporaryDirectory(prefix="deme-kernel-") as sockets:
        pm.execute_notebook(str(notebook), str(target), parameters=params, cwd=str(cwd), progress_bar=progress_bar,
                            kernel_name="python3", config=kernel_config(sockets))


def publish(executed: Path, dest: Path) -> None:
    """Copy an executed notebook to ``dest`` without papermill's machine paths (input/output path)."""
    nb = nbformat.read(executed, as_version=4)
    for key in ("input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    nbformat.write(nb, dest)


def _source_hash(notebook: str) -> str:
    """The fingerprint of a notebook's code: its code cells but the Colab set-up cell (:mod:`deme.colab`: it
    does nothing outside Colab). Markdown and the Colab badge do not make finished stages stale."""
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    cells = [c for c in nb.cells if c.cell_type == "code" and SETUP_TAG not in c.metadata.get("tags", [])]
    return hashlib.sha256("\n".join(c.source for c in cells).encode()).hexdigest()[:16]


def _up_to_date(rec: dict, cfg, notebook: str, params: dict) -> bool:
    """Same config (fields added since the record count at their defaults) + same notebook source + same
    parameters → the stage is skipped."""
    def same(a: dict) -> dict:
        return {k: v for k, v in a.items() if k not in SPEED_PARAMS}
    return (rec.get("source") == _source_hash(notebook) and same(rec.get("params", {})) == same(params)
            and normalized(rec.get("config", {})) == normalized(cfg.to_dict()))


AFTER_BASE = ("02_", "03_")
"""Stages that need only the base model (01): the analyses of 02 and the training jobs of 03 (one range or one
baseline each). They are independent of each other and may run side by side — and beside 01 itself when the
profile's base model is a pretrained one (01 then only loads and shows it)."""

AFTER_MERGE = ("06_", "07_")
"""Stages that need only what 03 trained and 04 merged and run after 05: the ablation and the gallery. Each
writes its own tables and figures and reads nothing the other writes, so they may run side by side. Notebook
05 runs alone before them: its sampling and Inception passes use every core (on the 2-core CPU, DDIM sampling
1.83× and Inception features 1.65× faster with two threads than with the one a kernel gets beside another),
and 06 then reuses its held-out losses."""


def _group(name: str, cfg) -> str:
    """The parallel group of a stage: "after base", "after merge", or the stage's own name (runs alone)."""
    if name.startswith(AFTER_BASE) or (name.startswith("01_") and cfg.pretrained):
        return "after base"
    return "after merge" if name.startswith(AFTER_MERGE) else name


def _groups(plan, cfg) -> list[list[tuple[int, tuple[str, str, dict]]]]:
    """Consecutive stages of one parallel group (:func:`_group`) run side by side; numbered from 1."""
    groups, last = [], None
    for k, stage in enumerate(plan, 1):
        key = _group(stage[0], cfg)
        if groups and key == last:
            groups[-1].append((k, stage))
        else:
            groups.append([(k, stage)])
        last = key
    return groups


def _say(line: str) -> None:
    """Print one whole line (stages side by side print from their threads: one write per line, no interleaving)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _run_stage(k: int, n_stages: int, name: str, notebook: str, params: dict, *, cfg, out_dir: Path,
               rec_dir: Path, jobs: int, side_by_side: bool, keep_going: bool, update: bool) -> dict:
    """Execute one stage's notebook with papermill, write its record, publish it when ``update``."""
    _say(f"[{k}/{n_stages}] {name}: running {notebook} {params}")
    target = out_dir / f"{name}.ipynb"
    t0 = time.time()
    try:
        execute(NOTEBOOKS / notebook, target, params, cwd=NOTEBOOKS, progress_bar=not side_by_side)
    except Exception as e:
        if not keep_going:
            raise
        _say(f"[{k}/{n_stages}] {name}: FAILED after {time.time() - t0:.0f} s: {e}")
        return {"stage": name, "notebook": notebook, "params": params, "seconds": round(time.time() - t0, 1),
                "failed": f"{type(e).__name__}: {e}"[:4000]}
    rec = {"stage": name, "notebook": notebook, "params": params, "source": _source_hash(notebook),
           "config": json.loads(cfg.to_json()), "seconds": round(time.time() - t0, 1),
           "parallel_jobs": jobs if side_by_side else 1, "versions": package_versions(),
           "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(rec_dir / f"{name}.json", rec)
    _say(f"[{k}/{n_stages}] {name}: done in {rec['seconds']:.0f} s")
    if update and (notebook != "03_train.ipynb" or name == "03_train_range0"):
        publish(target, NOTEBOOKS / notebook)
    return rec


@contextmanager
def environment(name: str, value: str):
    """``$name`` set to ``value`` inside the block (for the kernels started there), restored afterwards."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def write_timing(records: list[dict], wall: float, cfg, jobs: int, full: bool = False) -> Path:
    """``figures/reproduce_time_<profile>.csv`` (``_full`` with ``full``) of a reproduction that ran every stage:
    each stage's seconds and the wall clock of the whole, with the machine, date, commit and ``jobs`` (the README's
    time block reads the default run's). Written to figures/ by every run, publishing or not: a default run leaves
    the checkout as committed, timings aside."""
    rows = [{"stage": r["stage"], "seconds": r["seconds"]} for r in records]
    rows.append({"stage": "total (wall clock)", "seconds": wall})
    table = pd.DataFrame(rows).assign(machine=device_name(torch.device("cpu")), date=time.strftime("%Y-%m-%d"),
                                      commit=git_commit(), jobs=jobs)
    folder = figures_dir(cfg) if cfg.profile == "smoke" else repo_root() / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"reproduce_time_{cfg.profile}{'_full' if full else ''}.csv"
    table.to_csv(path, index=False)
    return path


def reproduce(profile: str | None = None, force: bool = False, only: list[str] | None = None,
              update_notebooks: bool | None = None, jobs: int = 1, full: bool = False,
              keep_going: bool = False, sweeps: bool = False) -> list[dict]:
    """Execute the notebooks in order with papermill; executed copies go to runs/<profile>/notebooks/.

    A stage whose record (runs/<profile>/stages/<stage>.json) matches the current config, notebook and
    parameters is skipped unless ``force``. ``jobs`` > 1 runs up to that many independent stages at once — the
    analyses of 02, the N ranges and the baselines (:data:`AFTER_BASE`), then 06 and 07 (:data:`AFTER_MERGE`) —
    each kernel with one CPU thread (``OMP_NUM_THREADS=1``; on a 2-core CPU two
    one-thread jobs train ~1.6× faster together than one after another with two threads, and a kernel's
    imports, ~10 s of single-threaded work, leave the other core idle when run alone); notebook 06 gets the
    same ``jobs``. ``full`` adds the six weighted baselines (03, 05) and Table 3 and the budget study (06,
    ``-p full True``); ``sweeps`` 06's sensitivity sweeps over N and p (``-p sweeps True``).
    Publishing: the committed notebooks and figures of the embedded default are those of ``--full`` (the paper's
    tables need its baselines). So a ``full`` run of fmnist copies its executed notebooks over notebooks/ and writes
    figures/; any other fmnist run leaves both as committed and writes its figures and tables to
    runs/fmnist/figures (``$DEME_FIGURES_DIR``). ``update_notebooks`` True or False overrides the choice.

    A failing notebook stops the run, unless ``keep_going``: then the remaining stages still run (those that
    need the failed stage's outputs fail in turn), the failed ones get no record (the next run redoes them),
    and their records in the returned list carry ``failed`` with the error.
    """
    cfg = get_profile(profile)
    update = cfg.profile == "fmnist" and full if update_notebooks is None else update_notebooks
    if cfg.profile == "fmnist" and not update and not os.environ.get(FIGURES_ENV):
        with environment(FIGURES_ENV, str(repo_root() / "runs" / cfg.profile / "figures")):   # the kernels' too
            return reproduce(profile, force, only, update_notebooks, jobs, full, keep_going, sweeps)
    # the executed notebooks are read on GitHub and in Colab, where progress bars render as stray widgets or
    # stderr lines: the kernels run without them (tqdm reads TQDM_DISABLE), the stage lines below show progress
    os.environ.setdefault("TQDM_DISABLE", "1")
    out_dir = repo_root() / "runs" / cfg.profile / "notebooks"
    rec_dir = repo_root() / "runs" / cfg.profile / "stages"
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_dir.mkdir(parents=True, exist_ok=True)
    plan = stages(cfg, full=full, jobs=jobs, sweeps=sweeps)
    records = {}

    def run(k: int, name: str, notebook: str, params: dict, side_by_side: bool = False) -> dict:
        return _run_stage(k, len(plan), name, notebook, params, cfg=cfg, out_dir=out_dir, rec_dir=rec_dir,
                          jobs=jobs, side_by_side=side_by_side, keep_going=keep_going, update=update)

    started = time.time()
    for group in _groups(plan, cfg):
        todo = []
        for k, (name, notebook, params) in group:
            if only and not any(name.startswith(o) for o in only):
                continue
            rec_path = rec_dir / f"{name}.json"
            rec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
            if not force and rec and _up_to_date(rec, cfg, notebook, params):
                print(f"[{k}/{len(plan)}] {name}: up to date ({rec['seconds']:.0f} s when run), skipped", flush=True)
                records[name] = {**rec, "skipped": True}
            else:
                todo.append((k, name, notebook, params))
        if jobs > 1 and len(todo) > 1:
            with environment("OMP_NUM_THREADS", "1"), ThreadPoolExecutor(jobs) as pool:   # the kernels inherit it
                for rec in pool.map(lambda a: run(*a, side_by_side=True), todo):
                    records[rec["stage"]] = rec
        else:
            for args in todo:
                records[args[1]] = run(*args)
    out = [records[name] for name, _, _ in plan if name in records]
    ran = [r for r in out if not r.get("skipped")]
    print(f"reproduce {cfg.profile}: {len(out)} stages, {len(ran)} run this time in {time.time() - started:.0f} s "
          f"(wall clock; stage times summed: {sum(r['seconds'] for r in ran):.0f} s); executed notebooks in {out_dir}")
    failed = [r["stage"] for r in out if r.get("failed")]
    if len(ran) == len(plan) and not failed:
        write_timing(out, time.time() - started, cfg, jobs, full=full or sweeps)
    if failed:
        print(f"FAILED stages ({len(failed)}): {', '.join(failed)} — see their notebooks in {out_dir}")
    return out
