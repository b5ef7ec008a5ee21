"""Figures of the analyses (matplotlib + seaborn): Fig. 1a (gradient conflict), Fig. 2 (activation change),
Fig. 4 (loss landscapes per range), Fig. 6a (task-vector plane) and Fig. 6b (task-vector box plots).

Each ``plot_*`` function takes the output of the matching :mod:`deme.analysis` function and returns the
matplotlib figure; :func:`save_figure` writes it as PNG and PDF into :func:`deme.config.figures_dir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .analysis import activation_change_summary
from .config import Config, figures_dir
from .weightspace import grid_coords


def save_figure(fig, cfg: Config, name: str, dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``<figures_dir(cfg)>/<name>.png`` and ``.pdf``; returns the two paths."""
    d = figures_dir(cfg)
    paths = [d / f"{name}.png", d / f"{name}.pdf"]
    # no creation dates or software versions in the files: the same numbers give the same bytes,
    # so re-running a notebook leaves git clean
    fig.savefig(paths[0], dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    fig.savefig(paths[1], bbox_inches="tight", metadata={"CreationDate": None, "Producer": None,
                                                         "Creator": None})
    return paths


def plot_similarity_heatmap(sim: np.ndarray, timesteps: Sequence[int], ax=None, num_timesteps: int = 1000,
                            range_bounds: Sequence[int] = (), title: str = "cosine similarity of loss gradients",
                            colorbar: bool = True):
    """Fig. 1a (left): the K×K gradient-similarity matrix on the timestep axis [0, T) (each grid point a cell
    of width T/K), diverging colours centred at 0, round ticks and dashed lines at ``range_bounds`` (DeMe's
    range boundaries)."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.2, 4.6))
    im = ax.imshow(sim, cmap="RdBu_r", vmin=-1, vmax=1, origin="upper", interpolation="nearest",
                   extent=(0, num_timesteps, num_timesteps, 0))
    ticks = np.linspace(0, num_timesteps, 5)
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    for b in range_bounds:
        ax.axvline(b, color="k", ls="--", lw=0.8)
        ax.axhline(b, color="k", ls="--", lw=0.8)
    ax.set(xlabel="timestep t", ylabel="timestep t", title=title)
    if colorbar:
        fig.colorbar(im, ax=ax, shrink=0.85, label="cosine similarity")
    return fig


def plot_similarity_histograms(summary: Mapping, ax=None, bins: int = 40):
    """Fig. 1a (right): distributions of the pairwise similarity over all pairs vs pairs inside [0, T/4), as
    outlines (no blended fills), means marked."""
    import matplotlib.pyplot as plt
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5, 3.6))
    lo, hi = summary["early_range"]
    edges = np.linspace(-1, 1, bins + 1)
    sets = [("all pairs", summary["all_pairs"], summary["all_pairs_mean"], "C0"),
            (f"pairs inside [{lo}, {hi})", summary["early_pairs"], summary["early_pairs_mean"], "C3")]
    for name, values, mean, c in sets:
        if len(values):
            ax.hist(values, bins=edges, density=True, histtype="step", lw=2, color=c, label=f"{name} (mean {mean:.2f})")
            ax.axvline(mean, color=c, ls=":", lw=1.2)
    ax.axvline(0, color="k", lw=0.8)
    ax.set(xlabel="cosine similarity of the two timesteps' gradients", ylabel="density (per unit similarity)",
           title="distribution over timestep pairs (dotted: means)")
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    return fig


def plot_gradient_conflict(panels: Mapping[str, tuple[np.ndarray, Sequence[int]]], summary: Mapping,
                           num_timesteps: int = 1000, range_bounds: Sequence[int] = ()):
    """Fig. 1a: one heat map per conditioning (e.g. true labels and the null label) and the histograms of the
    first, on one shared colour scale."""
    import matplotlib.pyplot as plt
    n = len(panels)
    fig, axes = plt.subplots(1, n + 1, figsize=(4.4 * n + 5.2, 4.4), layout="constrained",
                             gridspec_kw={"width_ratios": [1] * n + [1.2]})
    for k, (ax, (name, (sim, ts))) in enumerate(zip(axes, panels.items())):
        plot_similarity_heatmap(sim, ts, ax=ax, num_timesteps=num_timesteps, range_bounds=range_bounds,
                                title=name, colorbar=k == n - 1)
    plot_similarity_histograms(summary, ax=axes[-1])
    return fig


def plot_landscapes(landscapes: Mapping[str, np.ndarray], coords, upsample: int = 8):
    """Fig. 4: the loss around θ per timestep range (the full range first) as L/L(θ) on ONE shared
    logarithmic colour scale, so a range that rises 1,000-fold looks steeper than one that rises 10-fold.
    The grid is interpolated (cubic, ``upsample``×) for smooth contours; θ is the star."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm
    from scipy.ndimage import zoom
    a, b = grid_coords(coords)
    ia, ib = int(np.argmin(np.abs(a))), int(np.argmin(np.abs(b)))
    ratios = {name: np.clip(z / z[ia, ib], 1e-3, None) for name, z in landscapes.items()}
    vmax = max(r.max() for r in ratios.values())
    norm = LogNorm(vmin=min(1.0, min(r.min() for r in ratios.values())), vmax=vmax)
    levels = np.geomspace(norm.vmin, vmax, 16)
    n = len(ratios)
    ncol = min(n, 3)
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.6 * ncol + 1.2, 3.4 * nrow), squeeze=False, layout="constrained")
    fine_a, fine_b = np.linspace(a[0], a[-1], len(a) * upsample), np.linspace(b[0], b[-1], len(b) * upsample)
    for ax, (name, r) in zip(axes.flat, ratios.items()):
        fine = np.exp(zoom(np.log(r), upsample, order=3))
        cs = ax.contourf(fine_b, fine_a, np.clip(fine, norm.vmin, vmax), levels=levels, norm=norm, cmap="viridis")
        ax.contour(fine_b, fine_a, fine, levels=levels, colors="k", linewidths=0.3)
        ax.plot([b[ib]], [a[ia]], "r*", ms=9)
        ax.set_title(f"t ∈ {name}: L(θ) = {landscapes[name][ia, ib]:.3g}, max ×{r.max():.3g}", fontsize=9)
        ax.set_xlabel("β (direction 2)")
        ax.set_ylabel("α (direction 1)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    cb = fig.colorbar(cs, ax=axes, shrink=0.8, label="L / L(θ) (log scale, shared by all panels)")
    ticks = [v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if norm.vmin <= v <= vmax]
    cb.set_ticks(ticks, labels=[f"{v:g}" for v in ticks])
    cb.minorticks_off()
    return fig


def plot_task_vector_plane(loss: np.ndarray, coords, merge_point: tuple[float, float] | None = None,
                           labels: tuple[str, str] = ("θ_a", "θ_b"), levels: int = 20, ax=None):
    """Fig. 6a: training loss on the plane θ + a·τ_a + b·τ_b, with θ (0, 0), θ_a (1, 0), θ_b (0, 1), the grid's
    best point and, when given, a merge point (w_a, w_b)."""
    import matplotlib.pyplot as plt
    a, b = grid_coords(coords)
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.2, 4.4))
    cs = ax.contourf(a, b, loss.T, levels=levels, cmap="viridis")   # x = a, y = b
    ax.contour(a, b, loss.T, levels=levels, colors="k", linewidths=0.3)
    fig.colorbar(cs, ax=ax, label="training loss")
    ax.plot(0, 0, "wo", mec="k", ms=8, label="θ (pretrained)")
    ax.plot(1, 0, "s", color="C1", mec="k", ms=8, label=labels[0])
    ax.plot(0, 1, "^", color="C3", mec="k", ms=8, label=labels[1])
    i, j = np.unravel_index(np.argmin(loss), loss.shape)
    ax.plot(a[i], b[j], "w*", mec="k", ms=12, label=f"grid minimum ({a[i]:.2g}, {b[j]:.2g})")
    if merge_point is not None:
        ax.plot(*merge_point, "P", color="C2", mec="k", ms=10,
                label=f"merge ({merge_point[0]:.2g}, {merge_point[1]:.2g})")
    ax.set(xlabel=f"a (along τ of {labels[0]})", ylabel=f"b (along τ of {labels[1]})",
           title="loss on the plane of two task vectors")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


_ORDER = ("conv_in", "time_embedding", "class_embedding", "down_blocks", "mid_block", "up_blocks", "conv_norm_out",
          "conv_out")


def unet_order(name: str) -> tuple:
    """Sort key placing layer names in the order data flows through a UNet (input → down → mid → up → output),
    numeric indices numerically; unknown names last, alphabetically."""
    parts = name.split(".")
    head = _ORDER.index(parts[0]) if parts[0] in _ORDER else len(_ORDER)
    return (head, tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts[1:]), name)


def plot_task_vector_boxes(stats, layers: Sequence[str] | None = None, whiskers: tuple[str, str] = ("q5", "q95"),
                           ax=None):
    """Fig. 6b: per-layer box plots of task-vector values, one box per range, drawn from the statistics of
    :func:`deme.analysis.task_vector_stats` (box: quartiles, line: median, whiskers: 5th–95th percentiles
    by default; outliers not drawn)."""
    import matplotlib.pyplot as plt
    layers = list(layers) if layers is not None else sorted(dict.fromkeys(stats["layer"]), key=unet_order)
    ranges = sorted(stats["range"].unique())
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(max(6, 0.9 * len(layers) + 2), 4))
    width = 0.8 / len(ranges)
    handles = []
    for r in ranges:
        sub = stats[stats["range"] == r].set_index("layer")
        boxes = [{"med": sub.at[l, "q50"], "q1": sub.at[l, "q25"], "q3": sub.at[l, "q75"],
                  "whislo": sub.at[l, whiskers[0]], "whishi": sub.at[l, whiskers[1]], "label": ""} for l in layers]
        pos = np.arange(len(layers)) + (r - (len(ranges) - 1) / 2) * width
        art = ax.bxp(boxes, positions=pos, widths=width * 0.9, showfliers=False, patch_artist=True)
        for patch in art["boxes"]:
            patch.set_facecolor(f"C{r}")
            patch.set_alpha(0.7)
        handles.append((art["boxes"][0], sub["range_label"].iloc[0]))
    ax.set_xticks(np.arange(len(layers)))
    ax.set_xticklabels(layers, rotation=45, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set(ylabel="task-vector value θ_i − θ", title="task vectors per layer and range")
    ax.legend(*zip(*handles), fontsize=8)
    fig.tight_layout()
    return fig


def plot_activation_changes(changes: Mapping[str, Mapping[str, np.ndarray]], bins: int = 40):
    """Fig. 2: for each block, histograms of |A_ft − A_base| reduced over channels (one value per position)
    and over space (one value per channel), each divided by its block mean so the spreads compare."""
    import matplotlib.pyplot as plt
    names = list(changes)
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pos = np.asarray(changes[name]["per_position"])
        ch = np.asarray(changes[name]["per_channel"])
        pos_r, ch_r = pos / max(pos.mean(), 1e-30), ch / max(ch.mean(), 1e-30)
        hi = float(np.quantile(np.concatenate([pos_r, ch_r]), 0.995))
        edges = np.linspace(0, max(hi, 1e-6), bins + 1)
        ax.hist(pos_r, bins=edges, density=True, alpha=0.55, color="C0",
                label=f"over channels → per position (CV {pos.std() / max(pos.mean(), 1e-30):.2f})")
        ax.hist(ch_r, bins=edges, density=True, alpha=0.55, color="C3",
                label=f"over space → per channel (CV {ch.std() / max(ch.mean(), 1e-30):.2f})")
        title = name
        if "per_channel_shuffled" in changes[name]:
            row = activation_change_summary({name: changes[name]}).iloc[0]
            title += f"\nCV ratio {row.cv_ratio:.2f} (entries shuffled: {row.cv_ratio_shuffled:.2f})"
        ax.set_title(title, fontsize=8)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    for ax in axes[-1]:
        ax.set_xlabel("|ΔA| / mean")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# Paired comparisons: differences against the model before finetuning with their 95% intervals
# ---------------------------------------------------------------------------------------------------------

VERDICT_COLOURS = {"better": "#1a7f37", "worse": "#b42318", "not resolved": "0.45"}


def _verdict_colour(low: float, high: float, lower_is_better: bool = True) -> str:
    from .heldout import verdict
    return VERDICT_COLOURS[verdict(low, high, lower_is_better)]


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
    ax.set_title("merge-weight search (chosen: first row, lowest loss)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_sample_rows(rows: Mapping[str, "np.ndarray"], reference: str, row_labels: Sequence[str] | None = None):
    """Image grids of several models that sampled from the same noise (``rows``: name → images (n, H, W[, C])
    in [0, 255] or [-1, 1] tensors), one panel per model, and below each non-reference panel the per-pixel
    difference to ``reference`` on one symmetric colour scale (red brighter, blue darker)."""
    import matplotlib.pyplot as plt
    import torch
    arrays = {}
    for k, v in rows.items():
        v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        if v.ndim == 4 and v.shape[1] in (1, 3):   # (n, C, H, W) in [-1, 1]
            v = np.transpose((v.clip(-1, 1) + 1) * 127.5, (0, 2, 3, 1))
        arrays[k] = np.asarray(v, np.float64)
    names = list(arrays)
    n = len(arrays[reference])
    ncol = int(np.ceil(np.sqrt(n))) if row_labels is None else n // len(row_labels)

    def grid(a):
        h, w = a.shape[1:3]
        c = a.shape[3] if a.ndim == 4 else 1
        a = a.reshape(n, h, w, c)
        nrow = int(np.ceil(n / ncol))
        out = np.zeros((nrow * h, ncol * w, c))
        for i in range(n):
            out[(i // ncol) * h:(i // ncol + 1) * h, (i % ncol) * w:(i % ncol + 1) * w] = a[i]
        return out[..., 0] if c == 1 else out

    diffs = {k: arrays[k] - arrays[reference] for k in names if k != reference}
    vmax = max([np.abs(d).max() for d in diffs.values()] + [1.0])
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names) + 1.6, 7.0), squeeze=False, layout="constrained")
    for j, k in enumerate(names):
        g = grid(arrays[k])
        axes[0, j].imshow(g / 255 if g.ndim == 3 else g, cmap="gray", vmin=0, vmax=255)
        axes[0, j].set_title(k, fontsize=9)
        if k in diffs:
            d = grid(diffs[k])
            im = axes[1, j].imshow(d.mean(-1) if d.ndim == 3 else d, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            axes[1, j].set_title(f"{k}\nminus {reference}", fontsize=8)
        else:
            axes[1, j].axis("off")
        for a in axes[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    if row_labels is not None:
        h = arrays[reference].shape[1]
        axes[0, 0].set_yticks([(i + 0.5) * h for i in range(len(row_labels))], row_labels, fontsize=7)
    if diffs:
        fig.colorbar(im, ax=axes[1, -1], shrink=0.9, label="pixel difference (0–255 scale)")
    return fig


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


def plot_base_convergence(log, steps: int, fraction: float = 0.2):
    """Pretraining of the embedded base model: training loss per logged step and the held-out loss, the last
    ``fraction`` of the run shaded (a converged base changes little there)."""
    import matplotlib.pyplot as plt
    held = log.dropna(subset=["heldout_loss"])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.2), layout="constrained")
    ax[0].plot(log.step, log.loss, lw=0.8)
    ax[0].set(xlabel="optimizer step", ylabel="training loss (ε-MSE)", yscale="log", title="training loss")
    ax[1].plot(held.step, held.heldout_loss, marker=".", lw=1)
    ax[1].axvspan((1 - fraction) * steps, steps, color="0.9", label=f"last {fraction:.0%} of the run")
    ax[1].set(xlabel="optimizer step", ylabel="held-out loss (ε-MSE, all t)", yscale="log",
              title="held-out loss (fixed test images, noise and t)")
    ax[1].legend(frameon=False, loc="upper right")
    return fig


def plot_base_samples(conditional, unconditional, class_names: Sequence[str] = (), per_class: int = 10):
    """Samples of the base model: one row per class (labelled) beside a grid of unconditional samples."""
    import matplotlib.pyplot as plt
    from .sampling import image_grid
    panels = [("class-conditional (one row per class)", conditional)] if conditional is not None else []
    panels.append(("unconditional (null label)", unconditional))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5.6), layout="constrained", squeeze=False)
    for ax, (title, images) in zip(axes[0], panels):
        grid = image_grid(images, per_class)
        ax.imshow(grid, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title)
        ax.set_xticks([])
        rows = -(-len(images) // per_class)
        if class_names and images is conditional:
            step = grid.shape[0] / rows
            ax.set_yticks([(i + 0.5) * step for i in range(rows)], list(class_names)[:rows], fontsize=8)
            ax.tick_params(length=0)
        else:
            ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    return fig
