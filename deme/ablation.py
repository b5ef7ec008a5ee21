"""Ablations at equal budget (notebook 06): the paper's Table 3, sensitivity to N and p, and merge methods.

Every variant is a :class:`~deme.config.Config` derived from the profile with :meth:`Config.replace`; its runs
live in their own folders (:func:`deme.runs.run_dir` appends the changed fields), so a variant never touches
the profile's own runs. *Equal budget*: every variant trains N×K = the profile's ``num_ranges ×
steps_per_range`` optimizer steps in total (N' ranges get K' = N×K / N' steps each).

Each variant is scored as the paper's rows are — the merged model (task arithmetic, w = 1/N) and the
timestep-wise ensemble ("before merge") — by the paired held-out loss of :mod:`deme.heldout` against the
model before finetuning (and, in notebook 06's full run, by paired sample metrics); caches are keyed by the
weights, so models notebook 05 scored too are not scored twice.
"""

from __future__ import annotations

import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Callable

import pandas as pd
import torch

from .analysis import find_gradient_ranges
from .compare import merge_variants
from .config import Config
from .heldout import heldout_table, paired_losses, relative_difference, verdict
from .merge import LEARNED, MERGE_METHODS, MergeData, merged_model
from .models import load_unet
from .ranges import range_bounds, resolved
from .runs import merge_dir, run_dir, save_table, variant_tag
from .stages import load_base, load_ensemble, load_experts
from .train import train

# The paper's Table 3 (docs/method.md §6): CIFAR-10, 100-step DDIM, FID ↓. N=8 there.
PAPER_TABLE3 = pd.DataFrame({
    "variant": ["N=1, nothing", "N=1, +CP", "N=8, +PS", "N=8, +PS +CL", "N=8, +PS +CL +CP"],
    "CIFAR-10 FID (paper)": [4.40, 4.45, 4.32, 4.27, 3.87],
})

SWEEP_N = (1, 2, 4, 8)
SWEEP_P = (0.0, 0.1, 0.3, 0.5, 1.0)


def total_steps(cfg: Config) -> int:
    """The equal budget: N×K optimizer steps of the profile (what each baseline trains)."""
    return cfg.num_ranges * cfg.steps_per_range


def at_budget(cfg: Config, num_ranges: int) -> Config:
    """``cfg`` with ``num_ranges`` ranges at the same total budget: K' = ⌊N×K / N'⌋ steps per range. Explicit
    boundaries belong to the profile's N: with another N the ranges are equal ("gradient" ones are found anew)."""
    keep = isinstance(cfg.range_bounds, str) or num_ranges == cfg.num_ranges
    return cfg.replace(num_ranges=num_ranges, steps_per_range=max(1, total_steps(cfg) // num_ranges),
                       range_bounds=cfg.range_bounds if keep else "equal")


def table3_variants(cfg: Config, num_ranges: int | None = None) -> dict[str, Config]:
    """The rows of Table 3 at the profile's budget, with ``num_ranges`` (default: the profile's N; the paper
    uses N=8) for the decoupled rows. PS = probabilistic sampling with the profile's p, CL = consistency
    loss, CP = channel-wise projection.

    "N=1, nothing" is plain ε-MSE finetuning on all timesteps for N×K steps: the ``standard`` baseline
    (uniform t; DeMe with N=1 would pair timesteps antithetically, the only difference). At N=1 the sampling
    probability p has no effect (the range is [0, T)).
    """
    n = num_ranges or cfg.num_ranges
    one, many = at_budget(cfg, 1), at_budget(cfg, n)
    return {
        "N=1, nothing": cfg.replace(method="standard", range_index=None),
        "N=1, +CP": one.replace(consistency_weight=0.0, projection=True),
        f"N={n}, +PS": many.replace(consistency_weight=0.0, projection=False),
        f"N={n}, +PS +CL": many.replace(projection=False),
        f"N={n}, +PS +CL +CP": many.replace(projection=True),
    }


def sweep_variants(cfg: Config, what: str) -> dict[str, Config]:
    """The full recipe (PS + CL + CP) at the profile's budget for N ∈ {1, 2, 4, 8} (``what="N"``) or for
    p ∈ {0, 0.1, 0.3, 0.5, 1} at the profile's N (``what="p"``)."""
    if what == "N":
        return {f"N={n}": at_budget(cfg, n) for n in SWEEP_N}
    if what == "p":
        return {f"p={p:g}": cfg.replace(p_global=p) for p in SWEEP_P}
    raise ValueError(f"sweep over 'N' or 'p', got {what!r}")


def _train_job(cfg: Config, threads: int | None) -> tuple[str, float, bool]:
    """One training run (in a worker process when jobs run in parallel): (folder, seconds, trained now)."""
    if threads:
        torch.set_num_threads(threads)
    fresh = not (run_dir(cfg) / "manifest.json").exists()
    t0 = time.time()
    train(cfg, progress=False)
    return str(run_dir(cfg)), time.time() - t0, fresh


def run_steps(c: Config) -> int:
    """Optimizer steps of one run: K for a range of a DeMe variant, N×K for a one-model run."""
    return c.steps_per_range if c.method == "deme" else total_steps(c)


def variant_runs(variants: dict[str, Config]) -> list[tuple[str, Config]]:
    """(variant name, run config) for every training run of ``variants``: one per range of a DeMe variant,
    one for a one-model variant."""
    return [(name, v if v.method != "deme" else v.replace(range_index=i))
            for name, v in variants.items() for i in range(v.num_ranges if v.method == "deme" else 1)]


def train_variants(variants: dict[str, Config], jobs: int = 1) -> pd.DataFrame:
    """Train every run of every variant that is not finished yet (:func:`deme.train.train` skips finished
    runs and resumes interrupted ones). ``jobs`` > 1 trains that many runs at once in worker processes with
    one CPU thread each (independent jobs: ranges and variants). Returns one row per variant: runs, steps
    per run, runs trained now and their summed training seconds."""
    plan = variant_runs(variants)
    if jobs > 1:   # longest runs first, so that short ones fill the end instead of one long run alone
        order = sorted(range(len(plan)), key=lambda k: -run_steps(plan[k][1]))
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            done = dict(zip(order, pool.map(_train_job, [plan[k][1] for k in order], [1] * len(plan))))
        results = [done[k] for k in range(len(plan))]
    else:
        results = [_train_job(c, None) for _, c in plan]
    rows = {}
    for (name, c), (folder, sec, fresh) in zip(plan, results):
        r = rows.setdefault(name, {"variant": name, "runs": 0, "steps per run": run_steps(c), "trained now": 0,
                                   "seconds": 0.0,
                                   "folder": str(run_dir(c).parent if c.method == "deme" else run_dir(c))})
        r["runs"] += 1
        r["trained now"] += int(fresh)
        r["seconds"] = round(r["seconds"] + sec, 1)
    return pd.DataFrame(list(rows.values()),
                        columns=["variant", "runs", "steps per run", "trained now", "seconds", "folder"])


def _is_profile_run(cfg: Config, v: Config) -> bool:
    return v.num_ranges == cfg.num_ranges and not variant_tag(v)


def variant_models(cfg: Config, variants: dict[str, Config]) -> list[tuple[str, str, str, Callable]]:
    """What to score for each variant: (variant, kind, cache name, loader) with kind ``merge`` (uniform task
    arithmetic, w_i = 1/N — the same rule for every variant; notebook 04's searched weights appear in the
    merge-method table) and ``ensemble``; a single model (N=1 or a baseline) is one row of kind ``model``,
    which is both its merge and its ensemble. Models that notebook 05 scores keep 05's names so the cache
    is shared."""
    out = []
    for name, v in variants.items():
        if v.method != "deme":
            shared = v.method == "standard" and not variant_tag(v)
            key = "Standard (uniform)" if shared else f"ablation {v.method}{variant_tag(v)}"
            out.append((name, "model", key, lambda v=v: load_unet(run_dir(v) / "model")))
            continue
        tag = f"ablation deme N{v.num_ranges}{variant_tag(v, with_num_ranges=False)}"
        if v.num_ranges == 1:
            out.append((name, "model", tag, lambda v=v: load_experts(v)[0]))
            continue
        ens_key = "DeMe (before merge)" if _is_profile_run(cfg, v) else f"{tag} ensemble"
        out.append((name, "merge", f"{tag} uniform merge",
                    lambda v=v: merge_models(v, ("uniform",))[MERGE_METHODS["uniform"].label]))
        out.append((name, "ensemble", ens_key,
                    lambda v=v: load_ensemble(v)))
    return out


def merge_models(cfg: Config, methods=None) -> dict[str, torch.nn.Module]:
    """The range models of ``cfg`` merged by each method of :data:`deme.merge.MERGE_METHODS` (default: all
    of them that apply to its N), and ``"searched"``: task arithmetic with notebook 04's weights (its saved model).
    Keys: the methods' labels. Methods that fit on validation images keep their fits beside notebook 04's merge."""
    methods = _applicable(cfg) if methods is None else list(methods)
    experts = load_experts(cfg)
    base_sd, sds = load_base(cfg, projection=cfg.projection).state_dict(), [e.state_dict() for e in experts]
    data = MergeData(cfg, experts[0], merge_dir(cfg))
    out = {}
    for m in methods:
        if m == "searched":
            d = merge_dir(cfg) / "model"
            if not (d / "config.json").exists():
                raise FileNotFoundError(f"no searched merge at {d}: run notebooks/04_merge.ipynb first")
            out[SEARCHED] = load_unet(d)
        elif m in MERGE_METHODS:
            out[MERGE_METHODS[m].label] = merged_model(experts[0], MERGE_METHODS[m](base_sd, sds, data))
        else:
            raise ValueError(f"unknown merge method {m!r}; registered: searched, {', '.join(MERGE_METHODS)}")
    return out


SEARCHED = "task arithmetic, searched (04)"


def _applicable(cfg: Config) -> list[str]:
    return [name for name, m in MERGE_METHODS.items() if m.applies(cfg.num_ranges)]


def _merge_losses(cfg: Config, methods, part: str, progress: bool, extra=None) -> dict:
    """:func:`deme.heldout.paired_losses` of before finetuning, ``methods`` (names, "searched" included) merged
    by :func:`merge_models`, and the loaders ``extra``."""
    def one(method):
        return lambda: next(iter(merge_models(cfg, (method,)).values()))
    labels = {m: SEARCHED if m == "searched" else MERGE_METHODS[m].label for m in methods}
    models = {"Before finetuning": lambda: load_base(cfg, projection=False),
              **{labels[m]: one(m) for m in methods}, **(extra or {})}
    return paired_losses(models, cfg, part, progress=progress)


def merge_method_heldout(cfg: Config, part: str = "evaluation", progress: bool = False) -> pd.DataFrame:
    """The merge methods on the profile's own range models — task arithmetic with notebook 04's searched
    weights and every method of :data:`deme.merge.MERGE_METHODS` that applies to its N (uniform, the paper's
    weights, TIES, DARE, learned weights, ...) — and the ensemble, by paired held-out loss against before
    finetuning (:func:`deme.heldout.heldout_table` rows)."""
    extra = {"ensemble (before merge)": lambda: load_ensemble(cfg)}
    return heldout_table(_merge_losses(cfg, ["searched", *_applicable(cfg)], part, progress, extra), cfg)


def learned_merge_pairs(cfg: Config, part: str = "evaluation", progress: bool = False) -> pd.DataFrame:
    """The learned merges (:data:`deme.merge.LEARNED`) against each way of choosing task arithmetic's weights by
    hand or by search — notebook 04's searched weights, uniform 1/N and the paper's weights (N = 4) — on the same images
    (paired; the losses are those of :func:`merge_method_heldout`, cached): :func:`deme.heldout.heldout_table`
    rows of the learned models with a ``reference`` column."""
    references = ["searched", *(m for m in ("uniform", "paper") if MERGE_METHODS[m].applies(cfg.num_ranges))]
    losses = _merge_losses(cfg, [*references, *LEARNED], part, progress)
    learned = [MERGE_METHODS[m].label for m in LEARNED]
    tables = []
    for ref in references:
        label = SEARCHED if ref == "searched" else MERGE_METHODS[ref].label
        t = heldout_table(losses, cfg, reference=label)
        tables.append(t[t.model.isin(learned)].assign(reference=label))
    return pd.concat(tables, ignore_index=True)


def variant_heldout(cfg: Config, variants: dict[str, Config], part: str = "evaluation",
                    progress: bool = False) -> tuple[pd.DataFrame, dict]:
    """The paired held-out loss (:mod:`deme.heldout`) of every model of :func:`variant_models`, against the
    model before finetuning: :func:`deme.heldout.heldout_table` rows with the ``variant`` and ``kind``, and
    the per-image losses (for :func:`step_effects`)."""
    plan = variant_models(cfg, variants)
    models = {"Before finetuning": lambda: load_base(cfg, projection=False), **{key: load for _, _, key, load in plan}}
    losses = paired_losses(models, cfg, part, progress=progress)
    kinds = pd.DataFrame([(name, kind, key) for name, kind, key, _ in plan], columns=["variant", "kind", "model"])
    return kinds.merge(heldout_table(losses, cfg), on="model"), losses


def variant_summary(rows: pd.DataFrame, condition: str = "unconditional", rng: str = "all",
                    digits: int = 3) -> pd.DataFrame:
    """One row per variant, a column per kind (merged with w = 1/N, ensemble; a single model fills both):
    held-out Δ% against before finetuning with its 95% interval, for ``condition`` and range ``rng``."""
    t = rows[(rows.condition == condition) & (rows["range"] == rng)]
    out = {}
    for kind, label in (("merge", "merged (w = 1/N)"), ("ensemble", "ensemble")):
        sub = t[t.kind.isin([kind, "model"])].set_index("variant")
        out[label] = {v: f"{r.delta_pct:+.{digits}f} [{r.ci95_low:+.{digits}f}, {r.ci95_high:+.{digits}f}]"
                      for v, r in sub.iterrows()}
    return pd.DataFrame(out).loc[list(dict.fromkeys(t.variant))]


def table3(rows: pd.DataFrame, cfg: Config) -> tuple[pd.DataFrame, str]:
    """Table 3's layout from :func:`variant_heldout`'s rows — one row per variant, merged and ensemble columns
    for the null label, then for the true label where the profile has labels — and its caption."""
    tables = {c: variant_summary(rows, c) for c in dict.fromkeys(rows.condition)}
    both = tables["unconditional"]
    if "conditional" in tables:
        both = both.join(tables["conditional"].add_suffix(", true label"))
    caption = (f"Table 3 analog ({cfg.profile}): held-out ε-MSE over all t on the evaluation images, Δ% vs before "
               f"finetuning [95% CI]; budget {total_steps(cfg)} steps per variant; merged = task arithmetic, "
               "w = 1/N; columns: null label, then true label")
    return both, caption


def study_budgets(cfg: Config) -> tuple[int, ...]:
    """The budget study's default budgets K (optimizer steps per range): a quarter, half and all of the profile's."""
    K = cfg.steps_per_range
    return K // 4, K // 2, K


def budget_variants(cfg: Config, budgets=None) -> dict[str, Config]:
    """The budget study's runs: for each K in ``budgets`` (optimizer steps per range; default
    :func:`study_budgets`), ``standard`` for N×K steps and DeMe's N ranges for K steps each — the equal-budget
    pair at that budget."""
    out = {}
    for k in study_budgets(cfg) if budgets is None else budgets:
        out[f"K={k}, standard"] = cfg.replace(method="standard", range_index=None, steps_per_range=k)
        out[f"K={k}, DeMe"] = cfg.replace(method="deme", range_index=None, steps_per_range=k)
    return out


def budget_study(cfg: Config, budgets, part: str = "evaluation", progress: bool = False) -> pd.DataFrame:
    """Held-out Δ% against before finetuning, per budget K (steps per range; N×K per model): ``standard``,
    DeMe's ensemble and its uniform merge (w = 1/N, the rule Table 3 uses; no per-budget weight search, which
    would cost a search per budget). The runs must be trained (:func:`train_variants` of
    :func:`budget_variants`). Rows: :func:`deme.heldout.heldout_table` plus ``steps_per_range`` and ``kind``."""
    models, kinds = {"Before finetuning": lambda: load_base(cfg, projection=False)}, []
    for k in budgets:
        c = cfg.replace(steps_per_range=k)
        entries = {"standard": lambda c=c: load_unet(run_dir(c.replace(method="standard", range_index=None)) / "model"),
                   "DeMe ensemble": lambda c=c: load_ensemble(c),
                   "DeMe merge, uniform 1/N": merge_variants(c)["DeMe merge, uniform 1/N"]}
        for kind, load in entries.items():
            models[f"K={k} {kind}"] = load
            kinds.append((f"K={k} {kind}", k, kind))
    table = heldout_table(paired_losses(models, cfg, part, progress=progress), cfg)
    meta = pd.DataFrame(kinds, columns=["model", "steps_per_range", "kind"])
    return meta.merge(table, on="model")


def step_effects(rows: pd.DataFrame, losses: dict, kind: str = "merge", condition: str = "unconditional",
                 level: float = 0.95) -> pd.DataFrame:
    """What each added technique changes: for consecutive variants a → b (in ``rows``' order, from
    :func:`variant_heldout`), the paired held-out Δ% of b against a over all t — the same evaluation images,
    noise and timesteps — with its 95% interval and verdict. A single model stands for both kinds."""
    t = rows[(rows["range"] == "all") & (rows.condition == condition) & rows.kind.isin([kind, "model"])]
    key = dict(zip(t.variant, t.model))
    names = list(dict.fromkeys(t.variant))
    out = []
    for a, b in zip(names, names[1:]):
        d, lo, hi = relative_difference(losses[key[b]][condition], losses[key[a]][condition], level)
        out.append({"from": a, "to": b, "delta_pct": d, "ci95_low": lo, "ci95_high": hi,
                    "verdict": verdict(lo, hi)})
    return pd.DataFrame(out)


def step_table(rows: pd.DataFrame, losses: dict, kinds: tuple[str, ...] = ("merge", "ensemble")) -> pd.DataFrame:
    """Claim (e) of the paper: :func:`step_effects` for every kind (merged, ensemble) and every condition
    scored in ``rows``, in one long table (columns ``kind``, ``condition``, ``from``, ``to``, ``delta_pct``,
    ``ci95_low``, ``ci95_high``, ``verdict``)."""
    parts = [step_effects(rows, losses, k, c).assign(kind=k, condition=c)
             for k in kinds for c in dict.fromkeys(rows.condition)]
    out = pd.concat(parts, ignore_index=True)
    return out[["kind", "condition", "from", "to", "delta_pct", "ci95_low", "ci95_high", "verdict"]]


RANGE_CHOICES = ("equal", "gradient")
"""The ranges :func:`compare_ranges` sets against each other by default: the paper's and the data-driven ones."""


def range_variants(cfg: Config, choices=RANGE_CHOICES) -> dict[str, Config]:
    """DeMe with each choice of ranges (a ``Config.range_bounds`` value: "equal", "gradient" or N+1 boundaries),
    named by its boundaries, at the profile's budget: N ranges of K steps each whatever their widths, N×K steps
    in all. "gradient" ranges are found first (:func:`deme.analysis.find_gradient_ranges`) and pinned as a list."""
    out = {}
    for choice in choices:
        v = cfg.replace(method="deme", range_index=None, range_bounds=choice)
        if v.range_bounds == "gradient":
            find_gradient_ranges(v)
        label = v.range_bounds if isinstance(v.range_bounds, str) else "explicit"
        out[f"{label} ranges {list(range_bounds(v))}"] = resolved(v)
    return out


def ranges_table(rows: pd.DataFrame, losses: dict, variants: dict[str, Config]) -> pd.DataFrame:
    """From :func:`variant_heldout`'s rows and losses, over all t: each variant against before finetuning, and each
    later variant against the first (the same images, noise and timesteps: paired Δ% with its 95% interval), for
    the merged model (w = 1/N) and the ensemble, per condition. Columns ``comparison, kind, condition, delta_pct,
    ci95_low, ci95_high, verdict``."""
    t = rows[rows["range"] == "all"]
    out = [{"comparison": f"{r.variant} vs before finetuning", "kind": r.kind, "condition": r.condition,
            "delta_pct": r.delta_pct, "ci95_low": r.ci95_low, "ci95_high": r.ci95_high,
            "verdict": verdict(r.ci95_low, r.ci95_high)} for r in t.itertuples()]
    first, *others = list(variants)
    for kind in dict.fromkeys(t.kind):
        key = dict(zip(t.variant[t.kind == kind], t.model[t.kind == kind]))
        for c in dict.fromkeys(t.condition):
            for name in others:
                d, lo, hi = relative_difference(losses[key[name]][c], losses[key[first]][c])
                out.append({"comparison": f"{name} vs {first}", "kind": kind, "condition": c, "delta_pct": d,
                            "ci95_low": lo, "ci95_high": hi, "verdict": verdict(lo, hi)})
    return pd.DataFrame(out)


def compare_ranges(cfg: Config, choices=RANGE_CHOICES, part: str = "evaluation", jobs: int = 1,
                   name: str = "ranges_fmnist", progress: bool = False) -> pd.DataFrame:
    """Equal against data-driven ranges at equal budget (docs/method.md §2.4): train every run of
    :func:`range_variants` not trained yet (:func:`train_variants`, ``jobs`` at once), score the merged models
    (w = 1/N) and the ensembles on the ``part`` images by the paired held-out loss (:func:`variant_heldout`), and
    save :func:`ranges_table`, with the part and the budget, as ``<name>.csv`` beside the figures. Returns it."""
    variants = range_variants(cfg, choices)
    train_variants(variants, jobs=jobs)
    rows, losses = variant_heldout(cfg, variants, part, progress=progress)
    table = ranges_table(rows, losses, variants).assign(part=part, budget_steps=total_steps(cfg))
    save_table(table, cfg, name)
    return table
