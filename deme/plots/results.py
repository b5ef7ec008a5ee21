"""Figures of the runs and the results: the base model's convergence and samples, training logs and timestep
draws, the paired comparisons (Δ against before finetuning with 95% intervals), the held-out loss by range, the
budget study, the sensitivity sweeps, the merge search and sample grids with their pixel differences."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from ..heldout import verdict
from ..premise import parameter_label
from ..stages import last_fraction_change
from .theme import README_WIDTH_IN, _grid_image, _plain_log_ticks, themed


@themed
def plot_base_convergence(log, steps: int | None = None, fraction: float = 0.2):
    """The base model's pretraining (notebook 01): training loss and held-out loss (all t) against the
    optimizer step on log scales with plain tick labels, the last ``fraction`` of the ``steps`` shaded and its
    relative change in the title (a converged base changes little there). ``log``: the run's ``loss.csv``
    (columns ``step``, ``loss``, ``heldout_loss``)."""
    import matplotlib.pyplot as plt
    steps = int(steps or log.step.max())
    held = log.dropna(subset=["heldout_loss"]) if "heldout_loss" in log else log.iloc[:0]
    panels = 2 if len(held) else 1
    fig, axes = plt.subplots(1, panels, figsize=(README_WIDTH_IN, 3.3), layout="constrained", squeeze=False)
    ax = axes[0, 0]
    ax.plot(log.step, log.loss, lw=1, color="C0")
    ax.set(xlabel="optimizer step", ylabel="training ε-MSE (log scale)", yscale="log",
           title="training loss (mean per logged interval)")
    if len(held):
        ax = axes[0, 1]
        ax.plot(held.step, held.heldout_loss, marker=".", ms=4, lw=1, color="C0")
        start = (1 - fraction) * steps
        ax.axvspan(start, steps, color="0.9", zorder=0)
        try:
            change = 100 * last_fraction_change(log, steps, fraction)[2]
        except ValueError:          # nothing logged in the last fraction
            change = np.nan
        ax.set(xlabel="optimizer step", ylabel="held-out ε-MSE (log scale)", yscale="log",
               title=f"held-out loss, all t (shaded: last {fraction:.0%}, {change:+.2f}%)")
    for ax in axes.flat:
        _plain_log_ticks(ax.yaxis)
        ax.grid(alpha=0.3, which="major")
    fig.suptitle("Pretraining the base model: convergence")
    return fig


@themed
def plot_base_samples(conditional=None, unconditional=None, class_names: Sequence[str] | None = (),
                      per_class: int = 10):
    """Samples of the base model (notebook 01): the class-conditional grid with one row per class, named at
    the left, and the unconditional samples (null label) beside it at the same row height."""
    import matplotlib.pyplot as plt
    panels = [(k, v) for k, v in (("conditional", conditional), ("unconditional", unconditional)) if v is not None]
    if not panels:
        raise ValueError("nothing to show: give conditional and/or unconditional samples")
    rows = int(np.ceil(len(conditional) / per_class)) if conditional is not None else 10
    grids = {}
    for kind, v in panels:
        ncol = per_class if kind == "conditional" else int(np.ceil(len(v) / rows))
        grids[kind] = _grid_image(v, ncol)
    widths = [g.shape[1] for g in grids.values()]
    fig, axes = plt.subplots(1, len(grids), figsize=(README_WIDTH_IN, 0.55 * rows + 1.2), squeeze=False,
                             layout="constrained", gridspec_kw={"width_ratios": widths})
    for ax, (kind, g) in zip(axes[0], grids.items()):
        ax.imshow(g, cmap="gray", vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        for sp in ax.spines.values():
            sp.set_visible(False)
        if kind == "conditional":
            ax.set_title("class-conditional: one row per class")
            if class_names is not None and len(class_names):
                h = (g.shape[0] - 1) / rows
                ax.set_yticks([(i + 0.5) * h for i in range(rows)], list(class_names)[:rows])
                ax.tick_params(axis="y", length=0)
        else:
            ax.set_title("unconditional (null label)")
    fig.suptitle("Samples of the base model (before finetuning)")
    return fig


_SWEEP_AXIS = {"N": "number of timestep ranges N (same total budget)",
               "p": "p: probability of drawing t from all of [0, T) (Eq. 6)"}


@themed
def plot_sensitivity(rows, what: str | None = None, conditions: Sequence[str] = ("unconditional", "conditional"),
                     rng: str = "all", default: float | None = None):
    """The sensitivity sweeps of notebook 06 (``AB.variant_heldout(cfg, AB.sweep_variants(cfg, what))``):
    held-out Δ% against before finetuning with 95% intervals (error bars) against N or p, one line per kind
    (merged with w = 1/N, ensemble before merging; a single model, N = 1, is both), one panel per
    condition, the profile's value (``default``) marked."""
    import matplotlib.pyplot as plt
    t = rows.copy()
    t["range"] = t["range"].astype(str)
    t = t[t["range"] == str(rng)]
    keys = t.variant.str.split("=", n=1)
    what = what or keys.str[0].iloc[0]
    t["x"] = keys.str[1].astype(float)
    conditions = [c for c in conditions if c in set(t.condition)]
    fig, axes = plt.subplots(1, len(conditions), figsize=(README_WIDTH_IN, 3.6), layout="constrained",
                             squeeze=False, sharey=True)
    names = {"merge": "merged (w = 1/N)", "ensemble": "ensemble (before merge)"}
    xs = sorted(set(t.x))
    span = (max(xs) - min(xs)) or 1.0
    for ax, cond in zip(axes[0], conditions):
        c = t[t.condition == cond]
        for k, (kind, label) in enumerate(names.items()):
            g = c[c.kind.isin([kind, "model"])].sort_values("x")
            if not len(g):
                continue
            off = (k - 0.5) * (0.04 if what == "N" else 0.015 * span)   # side by side, not on top of each other
            x = g.x * (1 + off) if what == "N" else g.x + off
            ax.errorbar(x, g.delta_pct, yerr=[g.delta_pct - g.ci95_low, g.ci95_high - g.delta_pct], marker="o",
                        ms=4, capsize=3, lw=1.2, color=f"C{k}", label=label)
        ax.axhline(0, color="k", lw=0.8)
        if default is not None:
            ax.axvline(default, color="0.5", ls="--", lw=0.8)
        if what == "N":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
        ax.minorticks_off()
        ax.set_xlabel(_SWEEP_AXIS.get(what, what))
        ax.set_title(f"{cond} ({'null label' if cond == 'unconditional' else 'true label'}), "
                     f"{'all t' if str(rng) == 'all' else 'range ' + str(rng)}")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("Δ held-out ε-MSE vs\nbefore finetuning (%)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if default is not None:
        from matplotlib.lines import Line2D
        handles.append(Line2D([], [], color="0.5", ls="--", lw=0.8))
        labels.append(f"the profile's {what} = {default:g}")
    fig.legend(handles, labels, loc="outside lower center", ncol=3,
               title="dot: paired difference; bar: 95% CI over images; below 0: better than before finetuning")
    fig.suptitle(f"Sensitivity to {what}")
    return fig


# ---------------------------------------------------------------------------------------------------------
# Paired comparisons: differences against the model before finetuning with their 95% intervals
# ---------------------------------------------------------------------------------------------------------

VERDICT_COLOURS = {"better": "#1a7f37", "worse": "#b42318", "not resolved": "0.45"}


def _verdict_colour(low: float, high: float, lower_is_better: bool = True) -> str:
    return VERDICT_COLOURS[verdict(low, high, lower_is_better)]


@themed
def plot_paired_deltas(panels: Mapping, xlabel: str = "Δ vs before finetuning",
                       lower_is_better: Mapping[str, bool] | None = None, width: float = 4.0):
    """A forest plot per panel: one row per model, the paired difference against the reference (dot) and
    its 95% interval (bar); green/red where the interval excludes 0 (better/worse), grey where it does not
    (not resolved). Each panel is a frame with ``model, delta, low, high`` (the reference row is left out)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    lower_is_better = lower_is_better or {}
    models = list(dict.fromkeys(m for t in panels.values() for m in t.model))
    fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 0.42 * len(models) + 1.4),
                             sharey=True, squeeze=False)
    for ax, (title, t) in zip(axes[0], panels.items()):
        lib = lower_is_better.get(title, True)
        t = t.set_index("model").reindex(models)
        y = np.arange(len(models))
        for yi, (_, r) in zip(y, t.iterrows()):
            if np.isnan(r.delta):
                continue
            c = _verdict_colour(r.low, r.high, lib)
            ax.plot([r.low, r.high], [yi, yi], color=c, lw=2.2, solid_capstyle="butt")
            ax.plot(r.delta, yi, "o", color=c, ms=5)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(y, models)
        ax.invert_yaxis()
        ax.set_title(title + (" (lower is better)" if lib else " (higher is better)"), fontsize=10)
        ax.set_xlabel(xlabel)
        ax.grid(axis="x", alpha=0.3)
    handles = [Line2D([], [], color=c, marker="o", lw=2, label=k + (" (95% CI excludes 0)" if k != "not resolved"
                                                                   else " (95% CI contains 0)"))
               for k, c in VERDICT_COLOURS.items()]
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


@themed
def plot_heldout_by_range(table, models: Sequence[str] | None = None, conditions=("unconditional", "conditional")):
    """Held-out Δ% against before finetuning per timestep range (``all`` = [0, T), then each range), one
    group of bars per range and one bar per model, with 95% intervals (:func:`deme.heldout.heldout_table`)."""
    import matplotlib.pyplot as plt
    models = list(models or [m for m in dict.fromkeys(table.model) if m != "Before finetuning"])
    conditions = [c for c in conditions if c in set(table.condition)]
    ranges = list(dict.fromkeys(table["range"]))
    fig, axes = plt.subplots(len(conditions), 1, figsize=(9, 3.2 * len(conditions)), squeeze=False, sharex=True)
    width = 0.8 / len(models)
    for ax, cond in zip(axes[:, 0], conditions):
        t = table[table.condition == cond].set_index(["model", "range"])
        for k, m in enumerate(models):
            x = np.arange(len(ranges)) + (k - (len(models) - 1) / 2) * width
            r = t.loc[[(m, g) for g in ranges]]
            ax.bar(x, r.delta_pct, width, color=f"C{k}", label=m)
            ax.errorbar(x, r.delta_pct, yerr=[r.delta_pct - r.ci95_low, r.ci95_high - r.delta_pct], fmt="none",
                        ecolor="k", elinewidth=0.8, capsize=2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_ylabel("Δ held-out ε-MSE (%)")
        ax.set_title(f"{cond} (null label)" if cond == "unconditional" else f"{cond} (true label)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[-1, 0].set_xticks(np.arange(len(ranges)), ["all t" if g == "all" else f"range {g}" for g in ranges])
    axes[0, 0].legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


@themed
def plot_budget_study(study, condition: str = "unconditional", rng: str = "all"):
    """Δ held-out loss against before finetuning vs the budget (optimizer steps per model, N×K), one line per
    method, with 95% intervals (:func:`deme.ablation.budget_study`)."""
    import matplotlib.pyplot as plt
    t = study[(study.condition == condition) & (study["range"] == rng)]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for k, (kind, g) in enumerate(t.groupby("kind", sort=False)):
        g = g.sort_values("steps_per_range")
        x = g.steps_per_range.to_numpy() * (1 + 0.02 * (k - 1.5))   # small offsets keep the bars apart
        ax.errorbar(x, g.delta_pct, yerr=[g.delta_pct - g.ci95_low, g.ci95_high - g.delta_pct], marker="o",
                    capsize=3, label=kind, color=f"C{k}")
    ax.axhline(0, color="k", lw=0.8, label="before finetuning")
    ax.set_xscale("log")
    ks = sorted(set(t.steps_per_range))
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.set(xlabel="budget: optimizer steps per range K (standard trains N×K)",
           ylabel="Δ held-out ε-MSE (%)",
           title=f"held-out loss vs budget ({condition}, {'all t' if rng == 'all' else 'range ' + rng})")
    ax.legend(fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


@themed
def plot_capacity(table, condition: str = "unconditional"):
    """The capacity × budget map (:func:`deme.premise.capacity_table`): one panel per comparison (ensemble −
    standard, ensemble, uniform merge and standard vs the base), Δ held-out loss (%) against the finetuning budget
    (% of pretraining images), one line per base (its size and profile), 95% intervals as bars."""
    import matplotlib.pyplot as plt
    t = table[table.condition == condition]
    from matplotlib.ticker import LogLocator
    panels = ["ensemble - standard", "ensemble", "merged (w = 1/N)", "standard"]
    fig, axes = plt.subplots(1, len(panels), figsize=(README_WIDTH_IN * 1.3, 3.2), sharex=True, squeeze=False)
    bases = sorted(set(zip(t.parameters, t.base)))
    for ax, model in zip(axes[0], panels):
        g = t[t.model == model]
        for k, (n, base) in enumerate(bases):
            h = g[(g.parameters == n) & (g.base == base)].sort_values("budget_pct")
            x = h.budget_pct.to_numpy() * (1 + 0.03 * (k - (len(bases) - 1) / 2))   # offsets keep the bars apart
            ax.errorbar(x, h.delta_pct, yerr=[h.delta_pct - h.ci95_low, h.ci95_high - h.delta_pct], marker="o",
                        ms=4, capsize=3, color=f"C{k}", label=f"{parameter_label(n)} parameters ({base})")
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xscale("log")
        _plain_log_ticks(ax.xaxis)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))   # 0.2, 0.5, 1, 2, 5, 10: room
        ax.set_title(model.replace(" - ", " − ") + ("" if " - " in model else " − base"), fontsize=10)
        ax.set_xlabel("finetuning images (% of pretraining)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"Δ held-out ε-MSE (%), {condition}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(bases), 4), fontsize=8, frameon=False,
               title="bars: 95% CI", title_fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


@themed
def plot_merge_search(candidates, top: int = 12):
    """The merge search (:func:`deme.stages.search_merge_weights`): validation held-out Δ% against the base
    with 95% intervals for the best ``top`` weightings and every named one (base, uniform, paper, sum, the
    search's result), named ones labelled; the chosen weighting (lowest loss) in bold."""
    import matplotlib.pyplot as plt
    t = candidates.copy()
    keep = t.index < top
    keep |= t.kind != "coordinate search"
    t = t[keep].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7, 0.34 * len(t) + 1.4))
    y = np.arange(len(t))
    for yi, r in t.iterrows():
        named = r.kind != "coordinate search"
        c = "C3" if yi == 0 else ("C0" if named else "0.55")
        ax.plot([r.ci95_low, r.ci95_high], [yi, yi], color=c, lw=2)
        ax.plot(r.delta_pct, yi, "o", color=c, ms=5)
    labels = [f"w = ({', '.join(f'{v:g}' for v in r.weights)})"
              + ("" if r.kind == "coordinate search" else f"  [{r.kind}]") for _, r in t.iterrows()]
    ax.set_yticks(y, labels, fontsize=8)
    ax.get_yticklabels()[0].set_fontweight("bold")
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    ax.set_xlabel("Δ validation held-out ε-MSE vs the base, % (dot; bar: 95% CI over images)")
    shown = int((t.kind == "coordinate search").sum())
    ax.set_title(f"merge-weight search: the best {shown} of {int((candidates.kind == 'coordinate search').sum())} "
                 "searched weightings and the named ones\n(chosen: first row, lowest validation loss)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


@themed
def plot_sample_rows(rows: Mapping[str, "np.ndarray"], reference: str, row_labels: Sequence[str] | None = None,
                     saturate: float = 99.5):
    """Image grids of several models that sampled from the same noise (``rows``: name → images (n, H, W[, C])
    in [0, 255] or [-1, 1] tensors), one panel per model; below each non-reference panel its per-pixel
    difference to ``reference`` (red brighter, blue darker) on one symmetric scale that saturates at the
    ``saturate``-th percentile of |difference| (so a few extreme pixels do not wash the maps out), and below the
    reference the distribution of |difference| per model."""
    import matplotlib.pyplot as plt
    arrays = {}
    for k, v in rows.items():
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if v.ndim == 4 and v.shape[1] in (1, 3):   # (n, C, H, W) in [-1, 1]
            v = np.transpose((v.clip(-1, 1) + 1) * 127.5, (0, 2, 3, 1))
        arrays[k] = np.asarray(v, np.float64).reshape(*v.shape[:3], -1)
    names = list(arrays)
    n = len(arrays[reference])
    ncol = int(np.ceil(np.sqrt(n))) if row_labels is None else n // len(row_labels)
    h = arrays[reference].shape[1]

    def grid(a, fill):   # thumbnails separated by one pixel of ``fill``
        c = a.shape[-1]
        nrow = int(np.ceil(n / ncol))
        out = np.full((nrow * (h + 1) - 1, ncol * (a.shape[2] + 1) - 1, c), fill)
        for i in range(n):
            r, q = divmod(i, ncol)
            out[r * (h + 1):r * (h + 1) + h, q * (a.shape[2] + 1):q * (a.shape[2] + 1) + a.shape[2]] = a[i]
        return out[..., 0] if c == 1 else out

    diffs = {k: (arrays[k] - arrays[reference]).mean(-1, keepdims=True) for k in names if k != reference}
    pooled = np.abs(np.concatenate([d.ravel() for d in diffs.values()])) if diffs else np.zeros(1)
    vmax = max(1.0, float(np.percentile(pooled, saturate)))
    first = grid(arrays[reference], 255.0)
    panel_h = 4.2                                                   # inches; panels as wide as the grids need
    panel_w = min(5.0, panel_h * first.shape[1] / first.shape[0])
    margin = 1.8 if row_labels is not None else 0.3
    nrows = 2 if diffs else 1
    fig, axes = plt.subplots(nrows, len(names), squeeze=False, layout="constrained",
                             figsize=((panel_w + 0.35) * len(names) + margin + 1.1, nrows * panel_h + 0.9))
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="0.8")
    for j, k in enumerate(names):
        g = grid(arrays[k], 255.0)
        axes[0, j].imshow(g / 255 if g.ndim == 3 else g, cmap="gray", vmin=0, vmax=255)
        axes[0, j].set_title(k, fontsize=9)
        if k in diffs:
            im = axes[1, j].imshow(grid(diffs[k], np.nan), cmap=cmap, vmin=-vmax, vmax=vmax)
            axes[1, j].set_title(f"{k}\nminus {reference}", fontsize=8)
        for a in axes[:, j]:
            if a.images:
                a.set_xticks([])
                a.set_yticks([])
    if row_labels is not None:
        axes[0, 0].set_yticks([(i + 0.5) * (h + 1) for i in range(len(row_labels))], row_labels, fontsize=7)
    if diffs:
        hist = axes[1, names.index(reference)]
        edges = np.linspace(0, max(float(np.abs(d).max()) for d in diffs.values()) + 1e-9, 41)
        for k, d in diffs.items():
            a = np.abs(d).ravel()
            hist.hist(a, bins=edges, histtype="step", lw=1.4, label=f"{k}: mean {a.mean():.2f}")
        hist.set_yscale("log")
        hist.set_xlabel("|pixel difference| to " + reference + " (0–255)", fontsize=8)
        hist.set_ylabel("pixels", fontsize=8)
        hist.legend(fontsize=7, frameon=False)
        hist.set_title("how far each model's samples moved", fontsize=8)
        fig.colorbar(im, ax=list(axes[:, -1]), shrink=0.5, extend="both",
                     label=f"pixel difference (0–255; colours saturate at ±{vmax:.0f}, the {saturate:g}th percentile)")
    return fig


@themed
def plot_training_log(log, title: str | None = None):
    """A training run's ``loss.csv``: ε-MSE and consistency loss (log scale; each point the mean over one
    logging interval) and throughput per optimizer step."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(1, 2, figsize=(10, 3))
    ax[0].plot(log.step, log.eps_mse, label="ε-MSE (Eq. 2)")
    if "consistency" in log and log.consistency.abs().sum() > 0:
        ax[0].plot(log.step, log.consistency, label="consistency loss (Eq. 5)")
    ax[0].set(xlabel="optimizer step", ylabel="training loss", yscale="log")
    ax[0].legend(frameon=False)
    ax[1].plot(log.step, log.images_per_s)
    ax[1].set(xlabel="optimizer step", ylabel="images / s", ylim=(0, None))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


@themed
def plot_timestep_draws(draws, interval: tuple[int, int], num_timesteps: int, p_global: float):
    """Histogram of the timesteps a DeMe range trains on (Eq. 6), its own range shaded."""
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 2.4))
    ax.hist(np.asarray(draws), bins=100, range=(0, num_timesteps), color="C0")
    for edge in interval:
        ax.axvline(edge, color="k", ls="--", lw=1)
    ax.set(xlabel="timestep t", ylabel="draws", xlim=(0, num_timesteps), ylim=(0, None))
    ax.set_title(f"timesteps drawn in training: own range [{interval[0]}, {interval[1]}) (dashed),\n"
                 f"with probability p = {p_global} a micro-batch is drawn from all of [0, {num_timesteps})", fontsize=9)
    fig.tight_layout()
    return fig
