"""Ablations at equal budget (notebook 06): the paper's Table 3, sensitivity to N and p, and merge methods.

Every variant is a :class:`~deme.config.Config` derived from the profile with :meth:`Config.replace`; its runs
live in their own folders (:func:`deme.train.run_dir` appends the changed fields), so a variant never touches
the profile's own runs. *Equal budget*: every variant trains N×K = the profile's ``num_ranges ×
steps_per_range`` optimizer steps in total (N' ranges get K' = N×K / N' steps each).

Each variant is scored as the paper's rows are: the merged model (task arithmetic) and the timestep-wise
ensemble ("before merge"), unconditional DDIM samples, FID/KID against the training set, mean ± std over
sampling seeds — through :func:`deme.compare.run_comparison`, whose per-model cache is shared with
notebook 05 for the models both notebooks score (the base, ``standard``, the profile's DeMe ensemble and its
searched merge).
"""

from __future__ import annotations

import time
from typing import Callable

import pandas as pd
import torch

from .config import Config

# The paper's Table 3 (PAPER.md §6): CIFAR-10, 100-step DDIM, FID ↓. N=8 there.
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
    """``cfg`` with ``num_ranges`` ranges at the same total budget: K' = ⌊N×K / N'⌋ steps per range."""
    return cfg.replace(num_ranges=num_ranges, steps_per_range=max(1, total_steps(cfg) // num_ranges))


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
    from .train import run_dir, train
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
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context
    from .train import run_dir
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
    return pd.DataFrame(list(rows.values()))


def _is_profile_run(cfg: Config, v: Config) -> bool:
    from .train import variant_tag
    return v.num_ranges == cfg.num_ranges and not variant_tag(v)


def variant_models(cfg: Config, variants: dict[str, Config]) -> list[tuple[str, str, str, Callable]]:
    """What to score for each variant: (variant, kind, cache name, loader) with kind ``merge`` (uniform task
    arithmetic, w_i = 1/N — the same rule for every variant; notebook 04's searched weights appear in the
    merge-method table) and ``ensemble``; a single model (N=1 or a baseline) is one row of kind ``model``,
    which is both its merge and its ensemble. Models that notebook 05 scores keep 05's names so the cache
    is shared."""
    from .models import load_unet
    from .sampling import TimestepEnsemble
    from .stages import load_experts
    from .train import run_dir, variant_tag
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
                    lambda v=v: merge_models(v, ("uniform",))["uniform average"]))
        out.append((name, "ensemble", ens_key,
                    lambda v=v: TimestepEnsemble(load_experts(v), v.num_train_timesteps)))
    return out


def merge_models(cfg: Config, methods=("searched", "uniform", "ties", "dare"), ties_density: float = 0.2,
                 dare_drop: float = 0.5, seed: int = 0) -> dict[str, torch.nn.Module]:
    """The range models of ``cfg`` merged by each method: task arithmetic with notebook 04's searched
    weights (the saved merged model), uniform averaging (w_i = 1/N), TIES (top ``ties_density`` by magnitude,
    elected sign, disjoint mean) and DARE (drop ``dare_drop``, rescale, uniform weights; seeded)."""
    from .merge import dare, merged_model, ties, uniform_average
    from .models import load_unet
    from .stages import load_base, load_experts, merge_dir
    experts = load_experts(cfg)
    base_sd, sds = load_base(cfg, projection=cfg.projection).state_dict(), [e.state_dict() for e in experts]
    n = len(sds)
    out = {}
    for m in methods:
        if m == "searched":
            d = merge_dir(cfg) / "model"
            if not (d / "config.json").exists():
                raise FileNotFoundError(f"no searched merge at {d}: run notebooks/04_merge.ipynb first")
            out["task arithmetic, searched (04)"] = load_unet(d)
        elif m == "uniform":
            out["uniform average"] = merged_model(experts[0], uniform_average(base_sd, sds))
        elif m == "ties":
            out[f"TIES (density {ties_density:g})"] = merged_model(experts[0], ties(base_sd, sds, ties_density))
        elif m == "dare":
            out[f"DARE (drop {dare_drop:g}, w=1/N)"] = merged_model(
                experts[0], dare(base_sd, sds, [1.0 / n] * n, drop=dare_drop, seed=seed))
        else:
            raise ValueError(f"unknown merge method {m!r}")
    return out


def merge_method_models(cfg: Config) -> list[tuple[str, str, Callable]]:
    """The merge-method comparison on the profile's own range models: (method, cache name, loader) for
    searched task arithmetic (notebook 04's model, shared with notebook 05), uniform averaging, TIES, DARE
    and the timestep-wise ensemble (shared with notebook 05)."""
    from .sampling import TimestepEnsemble
    from .stages import load_experts
    tag = f"ablation deme N{cfg.num_ranges}"
    def one(method):
        return lambda: next(iter(merge_models(cfg, (method,)).values()))
    return [("task arithmetic, searched (04)", "DeMe (after merge)", one("searched")),
            ("uniform average (w=1/N)", f"{tag} uniform merge", one("uniform")),
            ("TIES (density 0.2)", f"{tag} ties", one("ties")),
            ("DARE (drop 0.5, w=1/N)", f"{tag} dare", one("dare")),
            ("ensemble (before merge)", "DeMe (before merge)",
             lambda: TimestepEnsemble(load_experts(cfg), cfg.num_train_timesteps))]


def score_variants(cfg: Config, variants: dict[str, Config], seeds, n: int, steps: int | None = None,
                   progress: bool = False) -> pd.DataFrame:
    """Unconditional FID/KID of every model of :func:`variant_models`, one row per (variant, kind, seed)."""
    from .compare import run_comparison
    plan = variant_models(cfg, variants)
    df = run_comparison(cfg, seeds, n, steps, models={key: load for _, _, key, load in plan},
                        conditional=False, progress=progress)
    kinds = pd.DataFrame([(name, kind, key) for name, kind, key, _ in plan], columns=["variant", "kind", "model"])
    return kinds.merge(df, on="model")


def variant_table(scores: pd.DataFrame, metric: str = "uncond_fid", reference: float | None = None) -> pd.DataFrame:
    """One row per variant: mean and std over seeds of ``metric`` for the merge and the ensemble (a single
    model fills both), and, given the ``reference`` value (e.g. the model before finetuning), the change."""
    rows = []
    for name, g in scores.groupby("variant", sort=False):
        row = {"variant": name}
        for kind in ("merge", "ensemble"):
            sub = g[g.kind.isin([kind, "model"])][metric]
            row[f"{kind}"] = sub.mean()
            row[f"{kind} std"] = sub.std(ddof=1) if len(sub) > 1 else 0.0
            if reference is not None:
                row[f"{kind} Δ"] = sub.mean() - reference
        row["seeds"] = g.seed.nunique()
        rows.append(row)
    return pd.DataFrame(rows).set_index("variant")


def format_variant_table(table: pd.DataFrame, digits: int = 2) -> pd.DataFrame:
    """'mean ± std (Δ)' strings of :func:`variant_table` for Markdown / LaTeX."""
    out = pd.DataFrame(index=table.index)
    for kind in ("merge", "ensemble"):
        delta = table.get(f"{kind} Δ")
        out[f"FID, {'merged (w=1/N)' if kind == 'merge' else 'ensemble'}"] = [
            f"{m:.{digits}f} ± {s:.{digits}f}" + (f" ({d:+.{digits}f})" if delta is not None else "")
            for m, s, d in zip(table[kind], table[f"{kind} std"],
                               delta if delta is not None else [0] * len(table))]
    return out


def step_effects(scores: pd.DataFrame, kind: str = "merge", metric: str = "uncond_fid",
                 alpha: float = 0.05) -> pd.DataFrame:
    """What each added technique changes: for consecutive variants a → b (in ``scores``' order), the paired
    per-seed difference b − a of ``metric`` for ``kind`` (a single model stands for both kinds): mean, its
    standard error over the k seeds (std/√k), the paired t-test's two-sided p-value (k − 1 degrees of
    freedom) and whether p < ``alpha``. With 3 seeds a change must exceed ~4.3 standard errors to count."""
    import numpy as np
    from scipy import stats
    names = list(dict.fromkeys(scores["variant"]))
    per = {v: g[g.kind.isin([kind, "model"])].set_index("seed")[metric] for v, g in scores.groupby("variant")}
    rows = []
    for a, b in zip(names, names[1:]):
        d = (per[b] - per[a]).dropna()
        k, mean = len(d), float(d.mean())
        se = float(d.std(ddof=1) / np.sqrt(k)) if k > 1 else float("nan")
        if k < 2:
            p = float("nan")
        elif se == 0:
            p = 1.0 if mean == 0 else 0.0
        else:
            p = float(2 * stats.t.sf(abs(mean / se), k - 1))
        rows.append({"from": a, "to": b, "change": mean, "std error": se, "seeds": k, "p (paired t)": p,
                     f"p < {alpha:g}": bool(p < alpha)})
    return pd.DataFrame(rows)
