"""The miniature's premise, tested before any claim, and its proportions beside the paper's.

DeMe's tables compare a merged model with a base that is *converged*, finetuned at a *lower noise temperature*
than the end of its pretraining, on a few percent of its pretraining images, with an EMA that forgets the
starting point. A CPU-sized stand-in shows the paper's phenomenon only if it keeps those proportions
(:func:`proportions`) and if the decoupled experts themselves help (:func:`premise_rows`), judged on the
validation images only, before anything is merged:

(i)   the timestep-wise ensemble of the N experts beats ``standard`` finetuning at equal total budget over all t;
(ii)  it beats the base over all t by at least :data:`MIN_GAIN_PCT` percent;
(iii) each expert beats the base on its own range,

each with a 95% interval that excludes 0 (paired held-out loss, :mod:`deme.heldout`, averaged per image over
``draws`` independent noise/timestep draws, default each setting's ``heldout_draws``), for the unconditional and
the conditional loss.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .ablation import merge_models, total_steps, train_variants
from .config import Config, get_profile, normalized, parse_assignments
from .heldout import CONDITIONS, paired_losses, relative_difference
from .merge import MERGE_METHODS
from .models import base_model_path, load_unet
from .ranges import config_ranges
from .runs import run_dir, save_table, variant_tag
from .schedule import lr_factor
from .stages import ensure_base_model, last_fraction_change, load_base, load_ensemble, load_experts
from .train import CONVERGENCE_SNAPSHOT

MIN_GAIN_PCT = 0.3
"""(ii): the least gain of the ensemble over the base, in percent of the base's held-out loss."""

CONVERGED_PCT = 0.3
"""A base is converged when its paired held-out loss moved by less than this (percent, interval inside ±) over
the last fifth of its pretraining."""

# The paper's CIFAR-10 DDPM (800K steps × 128 images, lr 2e-4 constant) and DeMe's finetuning (4 ranges × 20K
# steps × 64 images, lr 5e-5 constant, diffusers' warmup EMA started afresh).
PAPER = {"pretrain_images": 800_000 * 128, "finetune_images": 4 * 20_000 * 64,
         "pretrain_temperature": 2e-4 / 128, "finetune_temperature": 5e-5 / 64}


def theta_share(cfg: Config, steps: int) -> float:
    """The weight the EMA of a finetuning run of ``steps`` optimizer steps leaves on the weights it started from
    (the pretrained θ): Π_s d_s over its updates, with diffusers' decay rule (``EMAModel.get_decay``). With
    warmup the first update has decay 0 (the average restarts: share 0); without, :func:`deme.train.build_ema`
    starts the average at θ with a fixed decay (share ``decay**steps``)."""
    if cfg.ema_warmup:
        return 0.0
    return float(cfg.ema_max_decay) ** steps


def finetune_steps(cfg: Config, method: str = "deme") -> int:
    """Optimizer steps of one finetuned model: K for a DeMe range, N×K for a one-model baseline."""
    return cfg.steps_per_range if method == "deme" else total_steps(cfg)


def base_pretraining(cfg: Config) -> Config:
    """The config the profile's base model was pretrained with (its manifest), as a pretraining Config."""
    manifest = Path(base_model_path(cfg)).parent / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} is missing: the base model of {cfg.profile!r} has no pretraining record")
    fields = {f.name for f in dataclasses.fields(Config)}   # a record may carry fields Config no longer has
    stored = normalized(json.loads(manifest.read_text())["config"])
    return Config.from_dict({k: v for k, v in stored.items() if k in fields}).replace(method="pretrain")


def proportions(cfg: Config, pretraining: Config | None = None,
                convergence: tuple[float, float, float] | None = None) -> pd.DataFrame:
    """The four proportions that decide what finetuning can do, for ``cfg``'s finetuning of a base pretrained
    with ``pretraining`` (default: the pretraining fields of ``cfg``; :func:`base_pretraining` reads the real
    record) beside the paper's: columns ``quantity, paper, here`` (text) and ``paper_value, here_value``
    (numbers). ``convergence``: the base's (Δ%, low, high) over the last fifth of pretraining
    (:func:`convergence`), when measured."""
    pre = (pretraining or cfg).replace(method="pretrain")
    pre_images = pre.pretrain_steps * pre.pretrain_batch_size
    ft_images = total_steps(cfg) * cfg.device_batch
    final_lr = pre.pretrain_lr * lr_factor(pre, pre.pretrain_steps, pre.pretrain_steps)
    temp = (cfg.lr / cfg.device_batch) / (final_lr / pre.pretrain_batch_size)
    paper_temp = PAPER["finetune_temperature"] / PAPER["pretrain_temperature"]
    conv_text = "not measured" if convergence is None else "{:+.3f}% [{:+.3f}, {:+.3f}]".format(*convergence)
    rows = [
        ("base: held-out loss change over the last fifth of pretraining (%)", "converged (800K steps)", conv_text,
         np.nan, np.nan if convergence is None else convergence[0]),
        ("finetuning images per method / pretraining images (%)", "5.0% (4 × 20K × 64 / 800K × 128)",
         f"{100 * ft_images / pre_images:.1f}% ({cfg.num_ranges} × {cfg.steps_per_range} × {cfg.device_batch} / "
         f"{pre.pretrain_steps} × {pre.pretrain_batch_size})",
         100 * PAPER["finetune_images"] / PAPER["pretrain_images"], 100 * ft_images / pre_images),
        ("noise temperature: finetuning lr/batch ÷ pretraining's final lr/batch", f"{paper_temp:.2f}",
         f"{temp:.2f} ({cfg.lr:g}/{cfg.device_batch} ÷ {final_lr:g}/{pre.pretrain_batch_size})", paper_temp, temp),
        ("EMA: θ's share left in a DeMe range model", "0 (diffusers' warmup EMA, restarted)",
         f"{theta_share(cfg, finetune_steps(cfg)):.3f}", 0.0, theta_share(cfg, finetune_steps(cfg))),
        ("EMA: θ's share left in a one-model baseline", "0 (diffusers' warmup EMA, restarted)",
         f"{theta_share(cfg, finetune_steps(cfg, 'standard')):.3f}", 0.0,
         theta_share(cfg, finetune_steps(cfg, "standard"))),
    ]
    return pd.DataFrame(rows, columns=["quantity", "paper", "here", "paper_value", "here_value"])


def convergence(cfg: Config, base_dir: str | Path | None = None, part: str = "validation", draws: int | None = None,
                progress: bool = False) -> tuple[float, float, float]:
    """The base's paired held-out change (Δ%, low, high) from the EMA weights at 4/5 of its pretraining
    (``model_at_80pct/`` beside ``model/``, written by :func:`deme.train.train` for pretraining runs) to the
    final ones, on ``part`` of the held-out images, unconditional (the null label)."""
    base = Path(base_dir) if base_dir is not None else Path(base_model_path(cfg)).parent
    if not (base / CONVERGENCE_SNAPSHOT / "config.json").exists():
        raise FileNotFoundError(f"{base / CONVERGENCE_SNAPSHOT} is missing: the pretraining run keeps the EMA weights "
                                "at 4/5 of its steps there; re-run it with this version of deme")
    losses = paired_losses({"at 4/5": lambda: load_unet(base / CONVERGENCE_SNAPSHOT),
                            "final": lambda: load_unet(base / "model")}, cfg, part, progress=progress, draws=draws)
    return relative_difference(losses["final"]["unconditional"], losses["at 4/5"]["unconditional"])


def convergence_verdict(delta: float, low: float, high: float, tolerance: float = CONVERGED_PCT) -> str:
    """One sentence on a paired last-fifth change (Δ%, low, high): converged when the whole interval lies inside
    ±``tolerance``, still improving when it lies below −``tolerance``, otherwise not resolved at this tolerance."""
    measured = f"{delta:+.3f}% [{low:+.3f}, {high:+.3f}]"
    if -tolerance < low and high < tolerance:
        return f"converged: the held-out loss moved {measured} over the last fifth, inside ±{tolerance:g}%"
    if high < -tolerance:
        return f"not converged: the held-out loss still fell {measured} over the last fifth (beyond −{tolerance:g}%)"
    if low > tolerance:
        return f"not converged: the held-out loss rose {measured} over the last fifth (beyond +{tolerance:g}%)"
    return f"not resolved: the last fifth's change {measured} reaches past ±{tolerance:g}%"


def setting_name(cfg: Config) -> str:
    """A setting's name: the profile and the training fields it changes (:func:`deme.runs.variant_tag`)."""
    return cfg.profile + variant_tag(cfg).replace("__", ", ")


def train_setting(cfg: Config, jobs: int = 1) -> pd.DataFrame:
    """Train the N experts of ``cfg`` (the full DeMe recipe) and ``standard`` at the same total budget, after
    pretraining the base where the profile's is missing (:func:`deme.stages.ensure_base_model`)."""
    ensure_base_model(cfg)
    return train_variants({"DeMe": cfg.replace(method="deme", range_index=None),
                           "standard": cfg.replace(method="standard", range_index=None)}, jobs=jobs)


def premise_losses(cfg: Config, part: str = "validation", draws: int | None = None, progress: bool = False,
                   experts: bool = True) -> dict:
    """Paired per-image losses of the base, each expert (unless ``experts`` is False: the capacity map does not
    read them), their ensemble, ``standard`` and the uniform merge (:data:`MERGED`; the capacity map's, never the
    premise's) — all trained first (:func:`train_setting`)."""
    models = {"base": lambda: load_base(cfg, projection=False)}
    if experts:
        models |= {f"expert {i}": (lambda i=i: load_experts(cfg)[i]) for i in range(cfg.num_ranges)}
    models["ensemble"] = lambda: load_ensemble(cfg)
    models["standard"] = lambda: load_unet(run_dir(cfg.replace(method="standard", range_index=None)) / "model")
    models[MERGED] = lambda: merge_models(cfg, ("uniform",))[MERGE_METHODS["uniform"].label]
    return paired_losses(models, cfg, part, progress=progress, draws=draws)


def parameter_label(n: int) -> str:
    """A base's size as the capacity map names it: 18429 → "18K", 1621000 → "1.62M"."""
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


MERGED = "merged (w = 1/N)"
"""The merge the capacity map reports: task arithmetic with w_i = 1/N (Table 3's rule; no weight search)."""


def capacity_rows(cfg: Config, losses: dict) -> pd.DataFrame:
    """One point of the capacity × budget map from :func:`premise_losses` (on the evaluation images): the ensemble,
    the uniform merge and ``standard`` against the base, and the ensemble and the merge against ``standard``, over
    all t; with the base (its profile: one pretrained base each), the model's size and the finetuning budget (images
    per method, % of pretraining images)."""
    pairs = [("ensemble", "base"), (MERGED, "base"), ("standard", "base"), ("ensemble", "standard"),
             (MERGED, "standard")]
    size = sum(p.numel() for p in load_base(cfg, projection=False).parameters())
    budget = 100 * total_steps(cfg) * cfg.device_batch / (base_pretraining(cfg).pretrain_steps
                                                        * base_pretraining(cfg).pretrain_batch_size)
    rows = []
    for model, ref in pairs:
        for c in (c for c in CONDITIONS if c in losses[model]):
            d, lo, hi = relative_difference(losses[model][c], losses[ref][c])
            rows.append({"setting": setting_name(cfg), "base": cfg.profile, "parameters": size,
                         "steps_per_range": cfg.steps_per_range,
                         "budget_pct": budget, "model": model if ref == "base" else f"{model} - {ref}",
                         "condition": c, "delta_pct": d, "ci95_low": lo, "ci95_high": hi})
    return pd.DataFrame(rows)


def premise_rows(cfg: Config, losses: dict) -> pd.DataFrame:
    """The premise's comparisons from :func:`premise_losses`: each expert vs the base on its own range, the
    ensemble vs the base over all t, ``standard`` vs the base over all t and per range, and ``ensemble -
    standard`` (Δ% against ``standard``) over all t and per range; columns ``setting, model, range, condition,
    delta_pct, ci95_low, ci95_high``."""
    T, N = cfg.num_train_timesteps, cfg.num_ranges
    bounds = {"all": (0, T)} | {str(k): b for k, b in enumerate(config_ranges(cfg))}
    pairs = [(f"expert {i}", "base", str(i)) for i in range(N)]
    pairs += [("ensemble", "base", "all")]                 # per range, the ensemble is its expert (rows above)
    pairs += [("standard", "base", r) for r in bounds]
    pairs += [("ensemble", "standard", r) for r in bounds]
    rows = []
    for model, ref, rng in pairs:
        t = losses[model]["t"]
        mask = (t >= bounds[rng][0]) & (t < bounds[rng][1])
        for c in (c for c in CONDITIONS if c in losses[model]):
            d, lo, hi = relative_difference(losses[model][c], losses[ref][c], mask=mask)
            rows.append({"setting": setting_name(cfg), "model": model if ref == "base" else f"{model} - {ref}",
                         "range": rng, "condition": c, "delta_pct": d, "ci95_low": lo, "ci95_high": hi})
    return pd.DataFrame(rows)


def premise_checks(rows: pd.DataFrame, num_ranges: int) -> dict[str, bool]:
    """The three checks of the premise on one setting's :func:`premise_rows`, each for every condition:
    ``(i) ensemble < standard``, ``(ii) ensemble < base by ≥ 0.3%``, ``(iii) each expert < base on its range``
    (upper interval bound below 0, for (ii) below −0.3)."""
    def high(model: str, rng: str) -> pd.Series:
        return rows[(rows.model == model) & (rows.range == rng)].ci95_high
    experts = [high(f"expert {i}", str(i)) for i in range(num_ranges)]
    return {"(i) ensemble beats standard": bool((high("ensemble - standard", "all") < 0).all()),
            "(ii) ensemble beats base by ≥ 0.3%": bool((high("ensemble", "all") < -MIN_GAIN_PCT).all()),
            "(iii) each expert beats base on its range": bool(all((h < 0).all() for h in experts))}


def setting_checks(rows: pd.DataFrame, setting: str) -> dict[str, bool]:
    """:func:`premise_checks` of one ``setting`` of a premise table (its number of experts read from its rows)."""
    r = rows[rows.setting == setting]
    return premise_checks(r, _num_experts(r))


def converged_settings(rows: pd.DataFrame) -> list[str]:
    """The settings of a premise table whose base is converged (none when the table has no ``base_converged``)."""
    return list(rows[rows.base_converged].setting.unique()) if "base_converged" in rows else []


def _kept(keep: pd.DataFrame | None, settings: list[Config]) -> list[pd.DataFrame]:
    """The rows of a committed table to keep beside ``settings`` (those of the settings not judged anew), without
    the choice :func:`mark_chosen` makes again."""
    if keep is None:
        return []
    names = {setting_name(cfg) for cfg in settings}
    return [keep[~keep.setting.isin(names)].drop(columns="chosen", errors="ignore")]


def premise_table(settings: Iterable[Config], jobs: int = 1, draws: int | None = None,
                  progress: bool = False, keep: pd.DataFrame | None = None) -> pd.DataFrame:
    """Train and judge every setting on the validation images (:func:`premise_rows`), mark the settings that
    pass all three checks, measure each base's convergence (:func:`convergence`), and choose by :func:`mark_chosen`.
    Columns: ``setting, chosen, passes, base_converged, base_change_pct, model, range, condition, delta_pct,
    ci95_low, ci95_high``. ``keep``: rows of settings judged before (a committed table), chosen among with the new
    ones without training them again; a setting in both is judged anew."""
    settings = list(settings)
    tables = _kept(keep, settings)
    for cfg in settings:
        train_setting(cfg, jobs)
        rows = premise_rows(cfg, premise_losses(cfg, "validation", draws, progress))
        base = Path(base_model_path(cfg)).parent
        change = convergence(cfg, base) if (base / CONVERGENCE_SNAPSHOT / "config.json").exists() else None
        tables.append(rows.assign(passes=all(premise_checks(rows, cfg.num_ranges).values()),
                                  base_change_pct=change[0] if change else float("nan"),
                                  base_converged=bool(change) and convergence_verdict(*change).startswith("converged")))
    return mark_chosen(pd.concat(tables, ignore_index=True))


def capacity_table(settings: Iterable[Config], jobs: int = 1, draws: int | None = None,
                   progress: bool = False, keep: pd.DataFrame | None = None) -> pd.DataFrame:
    """The capacity × budget map: every setting trained (as :func:`premise_table` does) and judged on the
    *evaluation* images (:func:`capacity_rows`); it chooses nothing. ``keep``: cells measured before, kept unless
    a setting of ``settings`` measures them anew."""
    settings = list(settings)
    tables = _kept(keep, settings)
    for cfg in settings:
        train_setting(cfg, jobs)
        tables.append(capacity_rows(cfg, premise_losses(cfg, "evaluation", draws, progress, experts=False)))
    return pd.concat(tables, ignore_index=True)


def mark_chosen(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` of several settings (with their ``passes`` and, where measured, ``base_change_pct`` — the base's
    paired change over the last fifth of its pretraining — and ``base_converged``) with a ``chosen`` column: among
    the settings that pass, the one whose ensemble gains most over ``standard`` (unconditional, all t). Once any
    setting's base is converged, only settings on a converged base can be chosen — a still-improving base would
    credit continued pretraining to decoupling — so None is chosen when none of them passes. Only when no base is
    converged at all, the passing setting whose base is closest to it (smallest |change|) is chosen, then the
    largest gain. None when no setting passes."""
    rows = rows.reset_index(drop=True)
    if "base_converged" not in rows:
        rows = rows.assign(base_converged=False, base_change_pct=float("nan"))
    key = rows[(rows.model == "ensemble - standard") & (rows.range == "all") & (rows.condition == "unconditional")
               & rows.passes]
    if rows.base_converged.any():
        key = key[key.base_converged]
    elif key.base_change_pct.notna().any():
        key = key[key.base_change_pct.abs() == key.base_change_pct.abs().min()]
    chosen = key.loc[key.delta_pct.idxmin(), "setting"] if len(key) else None
    out = rows.assign(chosen=rows.setting == chosen)
    return out[["setting", "chosen", "passes", "base_converged", "base_change_pct", "model", "range", "condition",
                "delta_pct", "ci95_low", "ci95_high"]]


def spec(setting: str) -> str:
    """A setting's name as the premise command takes it: "fmnist, steps_per_range=300" → "fmnist:steps_per_range=300"
    (:func:`setting_name` ↔ :func:`parse_setting`); a command's spelling is left as it is."""
    profile, _, fields = setting.partition(", ")
    return profile + (":" + fields.replace(", ", ",") if fields else "")


def parse_setting(setting: str) -> Config:
    """``"fmnist-xs"`` or ``"fmnist-xs:lr=1e-4,steps_per_range=1200"``: a profile with field overrides
    (:func:`deme.config.parse_assignments`; a bad one raises ``ValueError``). A table's setting name
    (:func:`setting_name`, ``"fmnist-xs, lr=0.0001"``) reads the same way (:func:`spec`)."""
    name, _, rest = spec(setting).partition(":")
    return get_profile(name, **parse_assignments([item for item in rest.split(",") if item]))


def pretraining_record(base_dir: str | Path) -> dict:
    """The manifest of a pretraining run (its config, steps, images per step, device, time)."""
    return json.loads((Path(base_dir) / "manifest.json").read_text())


def proportions_table(settings: Iterable[Config], reference: str | None = "fmnist-1.6m") -> pd.DataFrame:
    """:func:`proportions` of every setting (its base's real pretraining record and, where the base kept its
    4/5 snapshot, its measured :func:`convergence`), and of the ``reference`` profile where its base is there,
    with a ``setting`` column."""
    cfgs = list(settings)
    if reference and reference not in {c.profile for c in cfgs}:
        ref = get_profile(reference)
        if (Path(base_model_path(ref)).parent / "manifest.json").exists():
            cfgs.insert(0, ref)
    tables = []
    for cfg in cfgs:
        base = Path(base_model_path(cfg)).parent
        conv = convergence(cfg) if (base / CONVERGENCE_SNAPSHOT / "config.json").exists() else None
        tables.append(proportions(cfg, base_pretraining(cfg), conv).assign(setting=setting_name(cfg)))
    out = pd.concat(tables, ignore_index=True)
    return out[["setting", "quantity", "paper", "here", "paper_value", "here_value"]]


def format_premise(rows: pd.DataFrame) -> pd.DataFrame:
    """A readable pivot of :func:`premise_table`: one row per setting, model and range, one column per condition,
    cells ``Δ% [low, high]`` (three decimals, so every interval's sign shows)."""
    cell = [f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in zip(rows.delta_pct, rows.ci95_low, rows.ci95_high)]
    out = rows.assign(cell=cell).pivot_table(index=["setting", "chosen", "passes", "model", "range"],
                                             columns="condition", values="cell", aggfunc="first", sort=False)
    out.columns.name = None
    return out.reset_index().set_index("setting")


def save_premise(rows: pd.DataFrame, settings: Iterable[Config], name: str = "premise_fmnist") -> pd.DataFrame:
    """Write ``<name>.csv/.md/.tex`` and ``proportions_fmnist.csv`` beside the figures; returns the formatted table."""
    cfgs = list(settings)
    formatted = format_premise(rows)
    caption = (f"The miniature's premise on the validation images: Δ% of held-out loss against the base (experts on "
               f"their own range), and ensemble − standard at equal budget; 95% intervals over images, "
               f"{MIN_GAIN_PCT}% the least gain asked of the ensemble.")
    save_table(rows, cfgs[0], name, formatted, caption)
    props = proportions_table(cfgs)
    save_table(props, cfgs[0], "proportions_fmnist")
    return formatted


def _interval(row) -> str:
    return f"{row.delta_pct:+.3f} [{row.ci95_low:+.3f}, {row.ci95_high:+.3f}]"


def _num_experts(rows: pd.DataFrame) -> int:
    """N of one setting's :func:`premise_rows` (one row per expert and condition)."""
    return int(rows.model.str.startswith("expert").sum() // max(rows.condition.nunique(), 1))


def readme_block(rows: pd.DataFrame, props: pd.DataFrame) -> str:
    """The README's premise section, from ``premise_fmnist.csv`` and ``proportions_fmnist.csv`` alone: the chosen
    setting's proportions beside the paper's and its three checks (unconditional and conditional Δ% with 95%
    intervals), then one line per setting tried with the checks it failed (every setting's table is in
    ``figures/premise_fmnist.md``). Without a chosen setting the tables show the settings on a converged base (the
    candidates :func:`mark_chosen` could have chosen), or every setting when no base is converged."""
    settings = list(dict.fromkeys(rows.setting))
    chosen = list(rows[rows.chosen].setting.unique())
    converged = converged_settings(rows)
    shown = chosen or converged or settings
    p = props[props.setting.isin(shown)]
    lines = ["| quantity | paper | " + " | ".join(dict.fromkeys(p.setting)) + " |",
             "|---" * (2 + p.setting.nunique()) + "|"]
    for q in dict.fromkeys(p.quantity):
        pq = p[p.quantity == q]
        lines.append(f"| {q} | {pq.paper.iloc[0]} | " + " | ".join(pq.here) + " |")
    lines += ["", "| setting | check | unconditional Δ% [95% CI] | conditional Δ% [95% CI] |", "|---|---|---|---|"]
    for s in shown:
        r = rows[rows.setting == s]
        n = _num_experts(r)
        checks = [("(i) ensemble − standard, all t", "ensemble - standard", ["all"]),
                  ("(ii) ensemble − base, all t", "ensemble", ["all"])]
        checks += [(f"(iii) expert {i} − base, range {i}", f"expert {i}", [str(i)]) for i in range(n)]
        for label, model, rng in checks:
            cells = [_interval(x) for x in r[(r.model == model) & r.range.isin(rng)].itertuples()]
            lines.append(f"| {s} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"{len(settings)} setting(s) tried on the validation images (`figures/premise_fmnist.md` has every "
              "one's table):"]
    for s in settings:
        r = rows[rows.setting == s]
        failed = [k.split(")")[0] + ")" for k, ok in setting_checks(rows, s).items() if not ok]
        change = r.base_change_pct.iloc[0] if "base_change_pct" in r else float("nan")
        base = "" if pd.isna(change) else f"; its base moved {change:+.2f}% over its last fifth"
        lines.append(f"- {s}: " + ("passes all three checks" if not failed else f"fails {', '.join(failed)}")
                     + base + (" — **chosen**" if s in chosen else ""))
    if chosen:
        lines += ["", ("Chosen among the passing settings on a converged base: the largest gain over `standard`."
                       if converged else "No base is converged: chosen is the passing setting whose base is closest "
                       "to it, then the largest gain over `standard`.")]
    elif converged:
        lines += ["", "None is chosen: no setting on a converged base passed all three checks, and a setting on a "
                      "still-improving base is not chosen once a converged base exists (its gains would include "
                      "continued pretraining)."]
    else:
        lines += ["", "None is chosen: no setting met the premise."]
    return "\n".join(lines)


def _schedule_words(pre: Config) -> str:
    """The pretraining lr schedule in words (:func:`deme.train.lr_factor`)."""
    if pre.pretrain_warmup:
        return f"with {pre.pretrain_warmup:,} warmup steps, then a cosine decay to 10%"
    if pre.pretrain_cooldown:
        start, end, floor = pre.pretrain_cooldown
        return (f"constant to step {start:,}, then linear to {floor * pre.pretrain_lr:g} at step {end:,} and "
                "constant there")
    return "constant"


def write_provenance(base_dir: str | Path, cfg: Config, command: str, conv: tuple[float, float, float],
                     note: str = "") -> Path:
    """``PROVENANCE.md`` of a committed base model, every number read from its manifest and log: the command,
    model size, pretraining recipe, device, time, and the convergence over the last fifth (paired, with its
    interval, on the validation images)."""
    base = Path(base_dir)
    man = pretraining_record(base)
    pre = base_pretraining(cfg)
    n_params = sum(p.numel() for p in load_unet(base / "model").parameters())
    l0, l1, change = last_fraction_change(pd.read_csv(base / "loss.csv"), man["steps"])
    rows = [("profile", f"`{cfg.profile}` (16×16 Fashion-MNIST, class-conditional, {pre.label_dropout:.0%} label "
                        "dropout)"),
            ("model", f"diffusers `UNet2DModel`, {n_params:,} parameters (`model/config.json`); EMA weights"),
            ("command", f"`{command}`"),
            ("recipe", f"{man['steps']:,} steps × {man['images_per_step']} images, AdamW lr {pre.pretrain_lr:g} "
                       f"{_schedule_words(pre)}, betas {tuple(pre.adam_betas)}, wd {pre.weight_decay:g}, grad clip "
                       f"{pre.max_grad_norm:g}; EMA {pre.ema_max_decay:g} with warmup (diffusers' rule)"),
            ("device", f"{man['device']}, torch {man['torch']}, mixed precision: {man['mixed_precision']}"),
            ("wall time", f"{man['wall_time_s_last_session'] / 60:.0f} min (last session)"),
            ("logged held-out loss, last fifth", f"{l0:.5f} → {l1:.5f} ({100 * change:+.2f}%; one fixed draw)"),
            ("convergence (paired)", "{:+.3f}% [{:+.3f}, {:+.3f}] from the EMA at 4/5 of the steps to the final "
                                     "one, validation images, {} draws".format(*conv, cfg.heldout_draws)),
            ("seed", str(man["seed"]))]
    text = (f"# Provenance of `{cfg.profile}`'s base model\n\n| | |\n|---|---|\n"
            + "".join(f"| {k} | {v} |\n" for k, v in rows)
            + (f"\n{note}\n" if note else "")
            + "\n`loss.csv` is the training log, `manifest.json` the run's manifest (`deme.train`), `model_at_80pct/` "
              "the EMA weights at 4/5 of the steps (the convergence check's reference).\n")
    path = base / "PROVENANCE.md"
    path.write_text(text)
    return path


