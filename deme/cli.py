"""Command line: ``python -m deme reproduce|rehearse|train|compare|premise|ranges|merge-methods|export|profiles|
readme|colab``.

    python -m deme reproduce --profile fmnist          # the main job: every notebook that exists, in order
    python -m deme reproduce --profile fmnist --force   # redo stages whose outputs exist
    python -m deme train --profile fmnist --range 2     # one training job (see deme.train)
    python -m deme rehearse --profile church            # a paper profile end to end on CPU stand-ins (deme.rehearse)
    accelerate launch -m deme compare --profile cifar10  # 05's samples and scores, sharded over the processes
    python -m deme premise fmnist-xs fmnist-xxs --jobs 2   # the miniature's premise on candidate settings
    python -m deme premise fmnist:steps_per_range=2400 --add   # one more setting beside the committed ones
    python -m deme ranges --profile fmnist               # the "gradient" timestep ranges of the base model
    python -m deme ranges --profile fmnist --compare --jobs 2   # equal vs gradient ranges at equal budget
    python -m deme merge-methods --profile fmnist       # learned merge weights, then 06's merge-method table
    python -m deme export --profile fmnist --out pipe   # the range experts as one diffusers pipeline
    python -m deme colab --repository https://github.com/OWNER/NAME   # Colab badges and set-up cells (deme.colab)

A project error (a missing base model or dataset, an unknown profile, a setting out of range) ends with one line
on stderr — the message and what to do — and exit status 1; add --debug to a command (or set DEME_DEBUG=1) to
see its traceback.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .config import get_profile, profile_names, repo_root
from .errors import checked_settings, reported

# Each command imports its own module when it runs (the one exception to "imports at the top", checked by
# tests/test_code_shape.py): `reproduce` only starts notebook kernels and needs neither diffusers nor the
# training code, so it starts in ~4 s instead of the ~13 s of importing every command's module.


def compare_command(a) -> None:
    """``python -m deme compare``: :func:`deme.compare.collect_sample_outputs` (or, for a text-to-image profile,
    :func:`deme.compare.run_text_to_image_comparison` on the prompt sets given) of notebook 05's models,
    with its defaults, so that the notebook then finds every model's outputs in the cache."""
    from . import compare as C
    from .data import is_text_to_image
    from .distributed import current_processes
    from .methods import baselines
    cfg = checked_settings(get_profile, a.profile)
    procs = current_processes()
    models = C.comparison_models(cfg, baselines(default_only=not a.full))
    if is_text_to_image(cfg):
        sets = C.text_to_image_prompt_sets(cfg, coco_captions=a.coco_captions, coco_images=a.coco_images,
                                           parti=a.parti, imagenet_classes=a.imagenet_classes,
                                           imagenet_images=a.imagenet_images, n_coco=a.n_coco, seed=a.seed,
                                           processes=procs)   # reference images: each process writes its share
        table = C.run_text_to_image_comparison(cfg, sets, seed=a.seed, models=models, processes=procs)
        if procs.is_main:
            print(table.to_string())
        return
    n, steps = a.n or cfg.fid_samples, a.steps or cfg.sample_steps
    out = C.collect_sample_outputs(cfg, n, steps, a.seed, models, cond_inception=a.cond_inception, processes=procs)
    if procs.is_main:
        print(f"{len(out)} models × {n} samples (DDIM-{steps}, seed {a.seed}) in runs/{cfg.profile}/compare on "
              f"{procs.world} process(es)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m deme`` parser: one subcommand per entry of :data:`COMMANDS`, each with ``--debug``."""
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
                   help="all seven baselines in 03 and 05, Table 3 and the budget study in 06")
    r.add_argument("--sweeps", action="store_true", help="06's sensitivity sweeps over N and p (7 more trainings)")
    r.add_argument("--keep-going", action="store_true", help="after a failed stage, run the remaining ones")
    h = sub.add_parser("rehearse", help="run a paper profile's whole pipeline offline on CPU-sized stand-ins")
    h.add_argument("--profile", required=True, choices=["cifar10", "church", "bedroom", "sd14"])
    h.add_argument("--root", default=None, help="where the stand-ins and runs go (default: a temporary folder, "
                                                  "removed afterwards unless --keep)")
    h.add_argument("--keep", action="store_true", help="keep the temporary root")
    h.add_argument("--jobs", type=int, default=2, help="training stages run at once (one thread each)")
    h.add_argument("--full", action="store_true", help="rehearse reproduce --full --sweeps (all baselines, Table 3, "
                   "the budget study, the sweeps)")
    h.add_argument("--memory", action="store_true", help="instead: each stage's peak GPU memory (traced on the meta "
                   "device) and host RAM (formula) against the profile's budget (deme.memory); exit 1 if one fails")
    h.add_argument("--budget", action="store_true", help="instead: each stage's disk (arithmetic) and H100 time "
                   "(FLOPs counted on the meta device at an assumed throughput; deme.budget)")
    h.add_argument("--write", action="store_true", help="with --memory or --budget: also rewrite its table in "
                   "docs/paper_scale.md")
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
    m = sub.add_parser("premise", help="train and judge candidate miniatures on the validation images: do the "
                       "unmerged experts beat the base and equal-budget finetuning? (deme.premise)")
    m.add_argument("settings", nargs="+", help="PROFILE or PROFILE:KEY=VALUE,... (e.g. fmnist-xs:lr=1e-4)")
    m.add_argument("--jobs", type=int, default=1, help="training runs at once (one thread each)")
    m.add_argument("--draws", type=int, default=None,
                   help="noise/timestep draws per judged image (default: each setting's heldout_draws)")
    m.add_argument("--name", default="premise_fmnist", help="table name under figures/ (CSV, Markdown, LaTeX)")
    m.add_argument("--add", action="store_true", help="judge these beside the settings kept in the committed table")
    m.add_argument("--capacity", action="store_true", help="instead: the capacity x budget map of the settings on "
                   "the evaluation images (figures/capacity_fmnist.csv)")
    rg = sub.add_parser("ranges", help="find the base model's \"gradient\" timestep ranges (range_bounds=gradient) "
                       "and record them; --compare: equal vs gradient ranges at equal budget (deme.ablation)")
    rg.add_argument("--profile", default=None)
    rg.add_argument("--num-ranges", type=int, default=None, help="N (default: the profile's)")
    rg.add_argument("--compare", action="store_true", help="train both, judge them on the held-out loss and write "
                   "the table beside the figures")
    rg.add_argument("--jobs", type=int, default=1, help="training runs at once (one thread each)")
    rg.add_argument("--part", default="evaluation", choices=["validation", "evaluation"])
    rg.add_argument("--name", default="ranges_fmnist", help="table name under figures/ (CSV)")
    w = sub.add_parser("merge-methods", help="learn the merge weights on the validation images (per range, per "
                       "range x block), then score every merge method on the evaluation images: figures/"
                       "merge_methods_<profile>.csv (notebook 06's table), merge_learned_<profile>.csv (learned vs "
                       "searched, uniform, paper weights) and merge_costs_<profile>.csv")
    w.add_argument("--profile", default=None)
    e = sub.add_parser("export", help="save the trained range experts (or the merged model) as a diffusers pipeline")
    e.add_argument("--profile", default=None)
    e.add_argument("--out", required=True, help="the pipeline folder to write")
    e.add_argument("--merged", action="store_true", help="the merged model of notebook 04 instead of the experts")
    sub.add_parser("profiles", help="list the profiles")
    sub.add_parser("readme", help="rewrite the README's generated result blocks from the tables in figures/ "
                   "(deme.readme)")
    g = sub.add_parser("colab", help="stamp the notebooks and the README with 'Open in Colab' badges and the Colab "
                       "set-up cell, for the repository's public URL")
    g.add_argument("--repository", required=True, help="https://github.com/OWNER/NAME")
    g.add_argument("--branch", default="main")
    for command in sub.choices.values():
        command.add_argument("--debug", action="store_true", help="show the traceback of a project error")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "train":
        from .train import main as train_main
        return train_main(argv[1:])
    a = build_parser().parse_args(argv)
    with reported(f"python -m deme {a.cmd}", debug=a.debug):
        COMMANDS[a.cmd](a)


def reproduce_command(a) -> None:
    from .reproduce import reproduce
    checked_settings(get_profile, a.profile)
    out = reproduce(a.profile, force=a.force, only=a.only, update_notebooks=False if a.no_update_notebooks else None,
                    jobs=a.jobs, full=a.full, keep_going=a.keep_going, sweeps=a.sweeps)
    if any(r.get("failed") for r in out):
        raise SystemExit(1)


def rehearse_command(a) -> None:
    if a.budget or a.memory:
        from .budget import budget_table, format_budget
        from .memory import check_fits, format_table, memory_table, write_block
        cfg = get_profile(a.profile)
        rows = memory_table(cfg) if a.memory else budget_table(cfg)
        text = format_table(cfg, rows) if a.memory else format_budget(cfg, rows)
        print(text)
        if a.write:
            write_block(cfg, text, "memory" if a.memory else "budget")
        if a.memory and check_fits(cfg, rows):
            raise SystemExit("does not fit: " + "; ".join(check_fits(cfg, rows)))
        return
    from .rehearse import rehearse
    root = Path(a.root) if a.root else Path(tempfile.mkdtemp(prefix=f"deme_rehearse_{a.profile}_"))
    try:
        rec = rehearse(a.profile, root, jobs=a.jobs, full=a.full)
    finally:
        if not a.root and not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    if rec["returncode"] or None in rec["stage_seconds"].values():
        raise SystemExit(1)


def premise_command(a) -> None:
    from .premise import capacity_table, parse_setting, premise_table, save_premise
    from .readme import update_readme
    from .runs import read_table
    settings = [checked_settings(parse_setting, s) for s in a.settings]
    if a.capacity:
        from .plots import plot_capacity, save_figure
        from .runs import save_table
        keep = read_table(settings[0], "capacity_fmnist") if a.add else None
        table = capacity_table(settings, jobs=a.jobs, draws=a.draws, progress=True, keep=keep)
        save_table(table, settings[0], "capacity_fmnist")
        save_figure(plot_capacity(table), settings[0], "capacity_fmnist")
        print(table.to_string())
        return
    keep = read_table(settings[0], a.name) if a.add else None
    table = premise_table(settings, jobs=a.jobs, draws=a.draws, progress=True, keep=keep)
    settings = [parse_setting(s) for s in dict.fromkeys(table.setting)]   # the proportions: every setting judged
    print(save_premise(table, settings, a.name).to_string())
    if a.name == "premise_fmnist" and update_readme():
        print("README.md: its generated blocks rewritten from figures/")


def readme_command(a) -> None:
    from .readme import update_readme
    print("README.md " + ("rewritten from figures/" if update_readme() else "already matches figures/"))


def ranges_command(a) -> None:
    from .ablation import compare_ranges
    from .analysis import find_gradient_ranges
    over = {} if a.num_ranges is None else {"num_ranges": a.num_ranges}
    cfg = checked_settings(get_profile, a.profile, range_bounds="gradient", **over)
    if a.compare:
        print(compare_ranges(cfg, jobs=a.jobs, part=a.part, name=a.name, progress=True).to_string())
        return
    rec = find_gradient_ranges(cfg, progress=True)
    print(f"{cfg.profile}, N={cfg.num_ranges}: gradient ranges {rec['range_bounds']} (coherence "
          f"{[round(c, 3) for c in rec['coherence']]}; equal ranges: {[round(c, 3) for c in rec['equal_coherence']]})")


def merge_methods_command(a) -> None:
    from .ablation import learned_merge_pairs, merge_method_heldout
    from .heldout import format_heldout
    from .runs import save_table
    from .stages import learned_merge_fits, merge_costs
    cfg = checked_settings(get_profile, a.profile)
    costs = merge_costs(cfg, learned_merge_fits(cfg))
    table, pairs = merge_method_heldout(cfg, progress=True), learned_merge_pairs(cfg)
    for name, t in ((f"merge_methods_{cfg.profile}", table), (f"merge_learned_{cfg.profile}", pairs),
                    (f"merge_costs_{cfg.profile}", costs)):
        save_table(t, cfg, name)
    print(costs.to_string(index=False), format_heldout(table).to_string(), sep="\n\n")


def export_command(a) -> None:
    from .export import export_run
    cfg = checked_settings(get_profile, a.profile)
    out = export_run(cfg, a.out, merged=a.merged)
    print(f"{out}: load it with diffusers.DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)")


def profiles_command(a) -> None:
    for name in profile_names():
        c = get_profile(name)
        print(f"{name:8s} {c.dataset:13s} {c.image_size:4d}px  {c.pretrained or 'base model trained here'}")


def colab_command(a) -> None:
    from .colab import stamp
    try:
        changed = stamp(repo_root(), a.repository, a.branch)
    except ValueError as e:
        raise SystemExit(str(e))
    print(f"stamped {len(changed)} files for {a.repository} ({a.branch}); commit them and push")


COMMANDS = {"reproduce": reproduce_command, "rehearse": rehearse_command, "compare": compare_command,
            "premise": premise_command, "ranges": ranges_command, "merge-methods": merge_methods_command,
            "export": export_command, "profiles": profiles_command, "readme": readme_command, "colab": colab_command}
