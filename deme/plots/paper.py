"""The paper's analysis figures: Fig. 1a (gradient conflict), Fig. 4 (loss landscapes per range), Fig. 6a (the
task-vector plane), Fig. 6b (task-vector values per layer) and Fig. 2 (activation change)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ..analysis import activation_change_summary
from ..weightspace import grid_coords, task_vector_spread
from .theme import README_WIDTH_IN, _sci_scale, block_title, math_label, themed


@themed
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


@themed
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


@themed
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


@themed
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


@themed
def plot_task_vector_plane(loss: np.ndarray, coords, merge_point: tuple[float, float] | None = None,
                           labels: tuple[str, str] = ("θ_a", "θ_b"), levels: int = 20, ax=None,
                           upsample: int = 8):
    """Fig. 6a: the loss on the plane θ + a·τ_a + b·τ_b (τ_x = θ_x − θ) as its change against θ in percent,
    on a symmetric diverging scale (blue: lower than the pretrained model, red: higher), with θ (0, 0), θ_a
    (1, 0), θ_b (0, 1), the grid's lowest point and, when given, a merge point (w_a, w_b). ``labels`` name the
    two experts, e.g. ``("θ_0 (low noise)", "θ_3 (high noise)")`` (subscripts are set as math). The grid
    (which must contain 0) is interpolated (cubic, ``upsample``×) for smooth contours; markers sit on the
    computed points."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator
    from scipy.ndimage import zoom
    a, b = grid_coords(coords)
    ia, ib = int(np.argmin(np.abs(a))), int(np.argmin(np.abs(b)))
    loss = np.asarray(loss, dtype=float)
    ref = loss[ia, ib]
    pct = ref > 0                                                    # a loss: % change against θ
    rel = 100 * (loss / ref - 1) if pct else loss - ref              # (any other surface: the difference)
    unit = "%" if pct else ""
    vlim = max(float(np.abs(rel).max()), 1e-12)
    norm = Normalize(-vlim, vlim)
    own = ax is None
    fig, ax = plt.subplots(figsize=(6.2, 5.6), layout="constrained") if own else (ax.figure, ax)
    fine_a = np.linspace(a[0], a[-1], (len(a) - 1) * upsample + 1) if upsample > 1 and len(a) > 3 else a
    fine_b = np.linspace(b[0], b[-1], (len(b) - 1) * upsample + 1) if upsample > 1 and len(b) > 3 else b
    fine = zoom(rel, (len(fine_a) / len(a), len(fine_b) / len(b)), order=3) if fine_a is not a else rel
    lv = np.linspace(-vlim, vlim, levels + 1)
    cs = ax.contourf(fine_a, fine_b, np.clip(fine, -vlim, vlim).T, levels=lv, cmap="RdBu_r", norm=norm)
    ax.contour(fine_a, fine_b, fine.T, levels=lv, colors="k", linewidths=0.3, alpha=0.6)
    cb = fig.colorbar(cs, ax=ax, shrink=0.9)
    cb.set_label("loss change vs θ (pretrained), %" if pct else "loss − L(θ) (pretrained)")
    ticks = [v for v in MaxNLocator(6, symmetric=True).tick_values(-vlim, vlim) if abs(v) <= vlim * (1 + 1e-9)]
    cb.set_ticks(ticks, labels=["0" if abs(v) < vlim * 1e-6 else f"{v:+.2g}" for v in ticks])
    cb.minorticks_off()
    sym = [math_label(lab.split(" (")[0]) for lab in labels]
    desc = [lab[len(lab.split(" (")[0]):].strip() for lab in labels]
    ax.plot(0, 0, "o", color="w", mec="k", ms=8, label=r"$\theta$ (pretrained)")
    ax.plot(1, 0, "s", color="C1", mec="k", ms=8, label=math_label(labels[0]))
    ax.plot(0, 1, "^", color="C4", mec="k", ms=8, label=math_label(labels[1]))
    i, j = np.unravel_index(np.argmin(loss), loss.shape)
    ax.plot(a[i], b[j], "*", color="w", mec="k", ms=13,
            label=f"lowest grid point ({a[i]:.2g}, {b[j]:.2g}): {rel[i, j]:+.2g}{unit}")
    if merge_point is not None:
        ax.plot(*merge_point, "P", color="C2", mec="k", ms=10,
                label=f"merge weights ({merge_point[0]:.2g}, {merge_point[1]:.2g})")
    theta = r"$\theta$"
    ax.set_xlabel(f"a: weight of the task vector {sym[0]} − {theta} {desc[0]}".strip())
    ax.set_ylabel(f"b: weight of the task vector {sym[1]} − {theta} {desc[1]}".strip())
    ax.set_title(f"Loss on the plane of two task vectors\n(L({theta}) = {ref:.4g} on the analysis batch)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=8.5, handletextpad=0.4,
              columnspacing=1.2)
    if not own:
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


def _whisker_text(whiskers: tuple[str, str]) -> str:
    """``("q5", "q95")`` → ``"5th to 95th percentile"``; ``q0``/``q100`` are the minimum and maximum."""
    qs = [float(w.lstrip("q")) for w in whiskers]
    if all(0 < q < 100 for q in qs):
        return f"{qs[0]:g}th to {qs[1]:g}th percentile"
    name = lambda q: {0.0: "minimum", 100.0: "maximum"}.get(q, f"{q:g}th percentile")
    return f"{name(qs[0])} to {name(qs[1])}"


@themed
def plot_task_vector_boxes(stats, layers: Sequence[str] | None = None, whiskers: tuple[str, str] = ("q5", "q95"),
                           ax=None):
    """Fig. 6b: per-block box plots of the task-vector entries τ_i = θ_i − θ, one box per range, drawn from
    the statistics of :func:`deme.analysis.task_vector_stats` (box: quartiles, line: median, whiskers: 5th and
    95th percentiles by default; no outliers drawn — all stated in the figure). The legend gives each range's
    5–95% spread (parameter-weighted mean over blocks, :func:`deme.analysis.task_vector_spread`), the number
    the paper compares across ranges."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    layers = list(layers) if layers is not None else sorted(dict.fromkeys(stats["layer"]), key=unet_order)
    ranges = sorted(stats["range"].unique())
    cols = ["q25", "q50", "q75", *whiskers]
    scale, suffix = _sci_scale(stats[stats["layer"].isin(layers)][cols].to_numpy())
    own = ax is None
    fig, ax = plt.subplots(figsize=(README_WIDTH_IN, 4.6), layout="constrained") if own else (ax.figure, ax)
    width = 0.8 / len(ranges)
    spread = task_vector_spread(stats if "n" in stats else stats.assign(n=1))
    handles = []
    for r in ranges:
        sub = stats[stats["range"] == r].set_index("layer")
        boxes = [{"med": sub.at[l, "q50"] * scale, "q1": sub.at[l, "q25"] * scale, "q3": sub.at[l, "q75"] * scale,
                  "whislo": sub.at[l, whiskers[0]] * scale, "whishi": sub.at[l, whiskers[1]] * scale, "label": ""}
                 for l in layers]
        pos = np.arange(len(layers)) + (r - (len(ranges) - 1) / 2) * width
        ax.bxp(boxes, positions=pos, widths=width * 0.85, showfliers=False, patch_artist=True,
               boxprops={"facecolor": f"C{r}", "alpha": 0.75, "linewidth": 0.6},
               medianprops={"color": "k", "linewidth": 1.2}, whiskerprops={"linewidth": 0.8},
               capprops={"linewidth": 0.8})
        label = sub["range_label"].iloc[0] if "range_label" in sub else f"range {r}"
        handles.append(Patch(facecolor=f"C{r}", alpha=0.75, edgecolor="k", linewidth=0.6,
                             label=f"{label}: spread {spread[r] * scale:.3g}"))
    ax.set_xticks(np.arange(len(layers)), [block_title(l) for l in layers], rotation=35, ha="right",
                  rotation_mode="anchor")
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.axhline(0, color="k", lw=0.6)
    ax.grid(axis="y")
    ax.set_ylabel(r"task-vector entry $\tau_i = \theta_i - \theta$" + suffix)
    ax.set_title("Task vectors per block and timestep range\n"
                 f"box: 25th to 75th percentile, line: median, whiskers: {_whisker_text(whiskers)} of the "
                 "block's entries (no outliers drawn)", fontsize=9.5)
    ax.legend(handles=handles, title=f"range i: spread = 5th to 95th percentile{suffix}, mean over blocks "
              "weighted by their entries", loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2)
    if not own:
        fig.tight_layout()
    return fig


@themed
def plot_activation_changes(changes: Mapping[str, Mapping[str, np.ndarray]], bins: int = 40):
    """Fig. 2: how finetuning changed each block's activations (:func:`deme.analysis.activation_changes`).

    Top: for every block, the spread ratio CV(per channel) ÷ CV(per position) (CV = std/mean of |A_ft − A_base|
    reduced over space → one value per channel, or over channels → one value per position), beside the same
    ratio after shuffling the entries (the reference without channel or spatial structure); a ratio above its
    reference says the change is organised by channel. Below: the two distributions per block, each divided
    by its block mean so the spreads compare; one shared legend under the panels."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    names = list(changes)
    summary = activation_change_summary(changes).set_index("block")
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    mosaic = [["summary"] * cols] + [[names[r * cols + c] if r * cols + c < len(names) else "." for c in range(cols)]
                                     for r in range(rows)]
    fig, axd = plt.subplot_mosaic(mosaic, figsize=(README_WIDTH_IN, 2.2 + 2.0 * rows), layout="constrained",
                                  height_ratios=[1.25] + [1] * rows)
    s = axd["summary"]
    x = np.arange(len(names))
    s.bar(x - 0.2, summary.loc[names, "cv_ratio"], 0.4, color="C3", label="finetuned − base")
    if "cv_ratio_shuffled" in summary:
        s.bar(x + 0.2, summary.loc[names, "cv_ratio_shuffled"], 0.4, color="0.7",
              label="same entries shuffled (no structure)")
    s.set_xticks(x, [block_title(n) for n in names], fontsize=8)
    s.set_ylabel("spread per channel ÷\nspread per position\n(CV = std/mean)", fontsize=8)
    s.set_ylim(0, 1.3 * float(np.nanmax(summary.loc[names].select_dtypes("number").filter(like="cv_ratio").values)))
    s.set_title("organised by channel where the red bar stands above its grey reference", fontsize=9.5, pad=22)
    s.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False, borderaxespad=0.2)
    for k, name in enumerate(names):
        ax = axd[name]
        pos = np.asarray(changes[name]["per_position"], dtype=float)
        ch = np.asarray(changes[name]["per_channel"], dtype=float)
        pos_r, ch_r = pos / max(pos.mean(), 1e-30), ch / max(ch.mean(), 1e-30)
        hi = float(np.quantile(np.concatenate([pos_r, ch_r]), 0.995))
        edges = np.linspace(0, max(hi, 1e-6), bins + 1)
        ax.hist(ch_r, bins=edges, density=True, histtype="stepfilled", color="C3", alpha=0.25)
        ax.hist(ch_r, bins=edges, density=True, histtype="step", color="C3", lw=1.4)
        ax.hist(pos_r, bins=edges, density=True, histtype="step", color="C0", lw=1.4)
        ax.axvline(1, color="k", lw=0.6, ls=":")
        ax.set_title(f"{block_title(name)}\nCV {summary.at[name, 'cv_per_channel']:.2f} vs "
                     f"{summary.at[name, 'cv_per_position']:.2f}", fontsize=8.5)
        if k % cols == 0:
            ax.set_ylabel("density")
        if k + cols >= len(names):
            ax.set_xlabel("|ΔA| ÷ block mean")
    handles = [Line2D([], [], color="C3", lw=1.6, label="per channel (mean over space)"),
               Line2D([], [], color="C0", lw=1.6, label="per position (mean over channels)")]
    fig.legend(handles=handles, loc="outside lower center", ncol=2,
               title="|ΔA| = |activation after finetuning − before|, reduced to one value")
    return fig
