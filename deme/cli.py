"""Command line: ``python -m deme reproduce|rehearse|train|compare|profiles``.

    python -m deme reproduce --profile fmnist          # the main job: every notebook that exists, in order
    python -m deme reproduce --profile fmnist --force   # redo stages whose outputs exist
    python -m deme train --profile fmnist --range 2     # one training job (see deme.train)
    python -m deme rehearse --profile church            # a paper profile end to end on CPU stand-ins (deme.rehearse)
    accelerate launch -m deme compare --profile cifar10  # 05's samples and scores, sharded over the processes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from .config import ROOT, get_profile, normalized, profile_names
from .methods import baselines
from .runs import write_json

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"   # the notebooks ship beside the package


# papermill parameters that change how fast a stage runs, not what it computes: not part of a stage's record
# comparison (a stage run with --jobs 2 is up to date for --jobs 8)
SPEED_PARAMS = ("jobs",)


def stages(cfg, full: bool = False, jobs: int = 1) -> list[tuple[str, str, dict]]:
    """(stage name, notebook, papermill parameters) in the order of DESIGN.md's data flow, for the notebooks
    that exist: 02 base → 01 analysis → 03 training jobs (baselines, then one job per range) → 04 merge → 05 →
    06 → 07. The training jobs are independent; the baselines (N×K steps each) come first so that, run side
    by side, the short range jobs fill the end instead of one long baseline running alone. ``full`` adds the
    six weighted baselines (trained, and compared in 05) and the budget study and sensitivity sweeps of 06;
    ``jobs`` > 1 is passed on to 06, which trains its variants that many at once."""
    p = {"profile": cfg.profile}
    pfull = {**p, **({"full": True} if full else {})}
    p06 = {**pfull, **({"jobs": jobs} if jobs > 1 else {})}
    plan = [("02_base_model", "02_base_model.ipynb", p), ("01_gradient_conflict", "01_gradient_conflict.ipynb", p)]
    if (NOTEBOOKS / "05_compare.ipynb").exists():
        plan += [(f"03_train_{m}", "03_train.ipynb", {**p, "method": m})
                 for m in baselines(default_only=not full)]
    plan += [(f"03_train_range{i}", "03_train.ipynb", {**p, "range": i}) for i in range(cfg.num_ranges)]
    plan += [("04_merge", "04_merge.ipynb", p), ("05_compare", "05_compare.ipynb", pfull),
             ("06_ablation", "06_ablation.ipynb", p06), ("07_gallery", "07_gallery.ipynb", p)]
    return [s for s in plan if (NOTEBOOKS / s[1]).exists()]


def publish(executed: Path, dest: Path) -> None:
    """Copy an executed notebook to ``dest`` without papermill's machine paths (input/output path)."""
    import nbformat
    nb = nbformat.read(executed, as_version=4)
    for key in ("input_path", "output_path"):
        nb.metadata.get("papermill", {}).pop(key, None)
    nbformat.write(nb, dest)


def _source_hash(notebook: str) -> str:
    import nbformat
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return hashlib.sha256("\n".join(c.source for c in nb.cells).encode()).hexdigest()[:16]


def _up_to_date(rec: dict, cfg, notebook: str, params: dict) -> bool:
    """Same config (fields added since the record count at their defaults) + same notebook source + same
    parameters → the stage is skipped."""
    def same(a: dict) -> dict:
        return {k: v for k, v in a.items() if k not in SPEED_PARAMS}
    return (rec.get("source") == _source_hash(notebook) and same(rec.get("params", {})) == same(params)
            and normalized(rec.get("config", {})) == normalized(cfg.to_dict()))


def _groups(plan):
    """Consecutive training stages (03_*) form one group: they are independent jobs (one range or one
    baseline each) and may run side by side; every other stage is a group of its own."""
    groups = []
    for k, stage in enumerate(plan, 1):
        if groups and stage[0].startswith("03_") and groups[-1][-1][1][0].startswith("03_"):
            groups[-1].append((k, stage))
        else:
            groups.append([(k, stage)])
    return groups


def reproduce(profile: str | None = None, force: bool = False, only: list[str] | None = None,
              update_notebooks: bool | None = None, jobs: int = 1, full: bool = False,
              keep_going: bool = False) -> list[dict]:
    """Execute the notebooks in order with papermill; executed copies go to runs/<profile>/notebooks/.

    A stage whose record (runs/<profile>/stages/<stage>.json) matches the current config, notebook and
    parameters is skipped unless ``force``. ``jobs`` > 1 runs up to that many independent training stages
    (the N ranges, the baselines) at once, each kernel with one CPU thread (``OMP_NUM_THREADS=1``; on a
    2-core CPU two one-thread jobs train ~1.6× faster together than one after another with two threads);
    notebook 06 gets the same ``jobs``. ``full`` runs notebook 06 with its sensitivity sweeps (``-p full True``).
    For the embedded default the executed copies also replace the notebooks in notebooks/ (so the committed
    notebooks show the fmnist outputs), unless ``update_notebooks=False``.

    A failing notebook stops the run, unless ``keep_going``: then the remaining stages still run (those that
    need the failed stage's outputs fail in turn), the failed ones get no record (the next run redoes them),
    and their records in the returned list carry ``failed`` with the error.
    """
    import os
    from concurrent.futures import ThreadPoolExecutor
    import papermill as pm
    cfg = get_profile(profile)
    update = cfg.profile == "fmnist" if update_notebooks is None else update_notebooks
    # the executed notebooks are read on GitHub and in Colab, where progress bars render as stray widgets or
    # stderr lines: the kernels run without them (tqdm reads TQDM_DISABLE), the stage lines below show progress
    os.environ.setdefault("TQDM_DISABLE", "1")
    out_dir = ROOT / "runs" / cfg.profile / "notebooks"
    rec_dir = ROOT / "runs" / cfg.profile / "stages"
    out_dir.mkdir(parents=True, exist_ok=True)
    rec_dir.mkdir(parents=True, exist_ok=True)
    plan = stages(cfg, full=full, jobs=jobs)
    records = {}

    def run(k: int, name: str, notebook: str, params: dict) -> dict:
        print(f"[{k}/{len(plan)}] {name}: running {notebook} {params}", flush=True)
        target = out_dir / f"{name}.ipynb"
        t0 = time.time()
        try:
            pm.execute_notebook(str(NOTEBOOKS / notebook), str(target), parameters=params, cwd=str(NOTEBOOKS),
                                progress_bar=jobs == 1, kernel_name="python3")
        except Exception as e:
            if not keep_going:
                raise
            print(f"[{k}/{len(plan)}] {name}: FAILED after {time.time() - t0:.0f} s: {e}", flush=True)
            return {"stage": name, "notebook": notebook, "params": params, "seconds": round(time.time() - t0, 1),
                    "failed": f"{type(e).__name__}: {e}"[:4000]}
        rec = {"stage": name, "notebook": notebook, "params": params, "source": _source_hash(notebook),
               "config": json.loads(cfg.to_json()), "seconds": round(time.time() - t0, 1),
               "parallel_jobs": jobs if name.startswith("03_") else 1,
               "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        write_json(rec_dir / f"{name}.json", rec)
        print(f"[{k}/{len(plan)}] {name}: done in {rec['seconds']:.0f} s", flush=True)
        if update and (notebook != "03_train.ipynb" or name == "03_train_range0"):
            publish(target, NOTEBOOKS / notebook)
        return rec

    started = time.time()
    for group in _groups(plan):
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
            old = os.environ.get("OMP_NUM_THREADS")
            os.environ["OMP_NUM_THREADS"] = "1"           # inherited by the kernels started below
            try:
                with ThreadPoolExecutor(jobs) as pool:
                    for rec in pool.map(lambda a: run(*a), todo):
                        records[rec["stage"]] = rec
            finally:
                if old is None:
                    os.environ.pop("OMP_NUM_THREADS", None)
                else:
                    os.environ["OMP_NUM_THREADS"] = old
        else:
            for args in todo:
                records[args[1]] = run(*args)
    out = [records[name] for name, _, _ in plan if name in records]
    ran = [r for r in out if not r.get("skipped")]
    print(f"reproduce {cfg.profile}: {len(out)} stages, {len(ran)} run this time in {time.time() - started:.0f} s "
          f"(wall clock; stage times summed: {sum(r['seconds'] for r in ran):.0f} s); executed notebooks in {out_dir}")
    failed = [r["stage"] for r in out if r.get("failed")]
    if failed:
        print(f"FAILED stages ({len(failed)}): {', '.join(failed)} — see their notebooks in {out_dir}")
    return out


def compare_command(a) -> None:
    """``python -m deme compare``: :func:`deme.compare.collect_sample_outputs` (or, for a text-to-image profile,
    :func:`deme.compare.run_text_to_image_comparison` on the prompt sets given) of notebook 05's models,
    with its defaults, so that the notebook then finds every model's outputs in the cache."""
    from . import compare as C
    from .distributed import current_processes
    from .data import is_text_to_image
    cfg = get_profile(a.profile)
    procs = current_processes()
    models = C.comparison_models(cfg, baselines(default_only=not a.full))
    if is_text_to_image(cfg):
        with procs.main_process_first():       # reference images written once
            sets = C.text_to_image_prompt_sets(cfg, coco_captions=a.coco_captions, coco_images=a.coco_images,
                                               parti=a.parti, imagenet_classes=a.imagenet_classes,
                                               imagenet_images=a.imagenet_images, n_coco=a.n_coco, seed=a.seed)
        table = C.run_text_to_image_comparison(cfg, sets, seed=a.seed, models=models, processes=procs)
        if procs.is_main:
            print(table.to_string())
        return
    n, steps = a.n or cfg.fid_samples, a.steps or cfg.sample_steps
    out = C.collect_sample_outputs(cfg, n, steps, a.seed, models, cond_inception=a.cond_inception, processes=procs)
    if procs.is_main:
        print(f"{len(out)} models × {n} samples (DDIM-{steps}, seed {a.seed}) in runs/{cfg.profile}/compare on "
              f"{procs.world} process(es)")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        from .train import main as train_main
        return train_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m deme", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("reproduce", help="execute the notebooks in order (papermill)")
    r.add_argument("--profile", default=None,
                   help=f"one of {', '.join(profile_names())} (default: $DEME_PROFILE or fmnist)")
    r.add_argument("--force", action="store_true", help="redo stages whose outputs exist")
    r.add_argument("--only", nargs="*", default=None, help="stage name prefixes, e.g. 03 04_merge")
    r.add_argument("--no-update-notebooks", action="store_true", help="do not copy executed notebooks into notebooks/")
    r.add_argument("--jobs", type=int, default=1, help="independent training stages run at once (one thread each)")
    r.add_argument("--full", action="store_true",
                   help="all seven baselines in 05, the budget study and sweeps over N and p in 06")
    r.add_argument("--keep-going", action="store_true", help="after a failed stage, run the remaining ones")
    h = sub.add_parser("rehearse", help="run a paper profile's whole pipeline offline on CPU-sized stand-ins")
    h.add_argument("--profile", required=True, choices=["cifar10", "church", "bedroom", "sd14"])
    h.add_argument("--root", default=None, help="where the stand-ins and runs go (default: a temporary folder, "
                                                  "removed afterwards unless --keep)")
    h.add_argument("--keep", action="store_true", help="keep the temporary root")
    h.add_argument("--jobs", type=int, default=2, help="training stages run at once (one thread each)")
    h.add_argument("--full", action="store_true", help="rehearse reproduce --full (all baselines, Table 3, sweeps)")
    sub.add_parser("train", help="one training job (python -m deme train --help)")
    c = sub.add_parser("compare", help="sample and score notebook 05's models into its cache; under `accelerate "
                       "launch` every process takes a share of the samples (the numbers of one process)")
    c.add_argument("--profile", default=None)
    c.add_argument("--n", type=int, default=None, help="samples per model (default: the profile's fid_samples)")
    c.add_argument("--steps", type=int, default=None, help="sampling steps (default: the profile's sample_steps)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--full", action="store_true", help="all seven baselines")
    c.add_argument("--cond-inception", action="store_true", help="Inception features of the conditional samples")
    for name in ("coco-captions", "coco-images", "parti", "imagenet-classes", "imagenet-images"):
        c.add_argument(f"--{name}", default=None, help="text-to-image prompt set file (see notebook 05)")
    c.add_argument("--n-coco", type=int, default=30_000)
    sub.add_parser("profiles", help="list the profiles")
    a = p.parse_args(argv)
    if a.cmd == "profiles":
        for name in profile_names():
            c = get_profile(name)
            print(f"{name:8s} {c.dataset:13s} {c.image_size:4d}px  {c.pretrained or 'base model trained here'}")
    elif a.cmd == "rehearse":
        import shutil
        import tempfile
        from .rehearse import rehearse
        root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix=f"deme_rehearse_{a.profile}_"))
        try:
            rec = rehearse(a.profile, root, jobs=a.jobs, full=a.full)
        finally:
            if not a.root and not a.keep:
                shutil.rmtree(root, ignore_errors=True)
        if rec["returncode"] or None in rec["stage_seconds"].values():
            raise SystemExit(1)
    elif a.cmd == "compare":
        compare_command(a)
    elif a.cmd == "reproduce":
        try:
            get_profile(a.profile)
        except ValueError as e:
            raise SystemExit(str(e))
        out = reproduce(a.profile, force=a.force, only=a.only,
                        update_notebooks=False if a.no_update_notebooks else None, jobs=a.jobs, full=a.full,
                        keep_going=a.keep_going)
        if any(r.get("failed") for r in out):
            raise SystemExit(1)
