"""Figures of the analyses (matplotlib + seaborn): Fig. 1a (gradient conflict), Fig. 2 (activation change),
Fig. 4 (loss landscapes per range), Fig. 6a (task-vector plane), Fig. 6b (task-vector box plots), the base
model's convergence and samples, the comparisons and the sensitivity sweeps.

Each ``plot_*`` function takes the output of the matching :mod:`deme.analysis` (or :mod:`deme.ablation`,
:mod:`deme.heldout`) function and returns the matplotlib figure, drawn in one style (:data:`THEME`, applied
while the figure is built; :func:`apply_theme` applies it to a notebook's own plots); :func:`save_figure`
writes it as PNG and PDF into :func:`deme.config.figures_dir`. Figures are sized for the README: about 8.5
inches wide at 150 dpi, so text stays at least ~9 px high when the PNG is shown 800 px wide.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from .analysis import activation_change_summary
from .config import Config, figures_dir
from .stages import last_fraction_change
from .weightspace import grid_coords, task_vector_spread

THEME = {
    "font.size": 9.5, "axes.titlesize": 10, "axes.labelsize": 9.5, "figure.titlesize": 11,
    "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "legend.fontsize": 8.5, "legend.title_fontsize": 8.5,
    "axes.spines.top": False, "axes.spines.right": False, "legend.frameon": False,
    "axes.formatter.use_mathtext": True, "axes.formatter.limits": (-3, 4), "mathtext.default": "regular",
    "grid.alpha": 0.3, "grid.linewidth": 0.6, "image.interpolation": "nearest",
    "figure.dpi": 100, "savefig.dpi": 150,
}
"""The one style of every figure: font sizes that stay readable at the README's width, no top/right spines,
frameless legends, mathtext for symbols (θ₀ rather than a literal ``θ_0``), powers of ten in the axis labels."""

README_WIDTH_IN = 8.5   # the width figures are designed for (inches; 1,275 px at 150 dpi, shown ~800 px wide)


def apply_theme() -> None:
    """Use :data:`THEME` for every later figure of this session (e.g. a notebook's own quick plots)."""
    import matplotlib.pyplot as plt
    plt.rcParams.update(THEME)


def themed(fn):
    """Build the figure of ``fn`` under :data:`THEME` without changing the caller's matplotlib settings."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import matplotlib.pyplot as plt
        with plt.rc_context(THEME):
            return fn(*args, **kwargs)
    return wrapper


_GREEK = {"θ": r"\theta", "τ": r"\tau", "ε": r"\epsilon", "λ": r"\lambda"}


def math_label(text: str) -> str:
    """Symbols with subscripts written plainly (``θ_0``, ``τ_{12}``, ``θ_i``) as mathtext (``$\\theta_{0}$``), so
    figures never show a literal underscore; other text is left as it is."""
    def sub(m):
        body = m.group(2).strip("{}")
        return f"${_GREEK.get(m.group(1), m.group(1))}_{{{body}}}$"
    return re.sub(r"([θτελ])_(\{[^}]*\}|\w+)", sub, text)


def block_title(name: str) -> str:
    """A UNet block name in words: ``down_blocks.1`` → ``down block 1``, ``mid_block`` → ``middle block``."""
    parts = name.split(".")
    words = {"down_blocks": "down block", "up_blocks": "up block", "mid_block": "middle block",
             "conv_in": "input conv", "conv_out": "output conv", "conv_norm_out": "output norm",
             "time_embedding": "time embedding", "class_embedding": "class embedding"}
    head = words.get(parts[0], parts[0].replace("_", " "))
    return " ".join([head] + parts[1:])


def _sci_scale(values) -> tuple[float, str]:
    """(factor, label suffix) that bring ``values`` to about 1-1000: (1e5, " (×10⁻⁵)") for values ~1e-5."""
    v = np.abs(np.asarray(values, dtype=float))
    v = v[np.isfinite(v) & (v > 0)]
    if not len(v):
        return 1.0, ""
    e = int(np.floor(np.log10(v.max())))
    if -2 <= e <= 3:
        return 1.0, ""
    return 10.0 ** -e, f" ($\\times 10^{{{e}}}$)"


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
    s.axhline(1, color="k", lw=0.8, ls=":")
    s.set_xticks(x, [block_title(n) for n in names], fontsize=8)
    s.set_ylabel("CV per channel ÷\nCV per position")
    s.set_ylim(0, 1.3 * float(np.nanmax(summary.loc[names].select_dtypes("number").filter(like="cv_ratio").values)))
    s.set_title("spread of the change per channel ÷ per position (CV = std/mean; > 1: organised by channel)",
                fontsize=9.5, pad=22)
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


@themed
def plot_base_convergence(log, steps: int | None = None, fraction: float = 0.2):
    """The base model's pretraining (notebook 02): training loss and held-out loss (all t) against the
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


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2, 3, 5 × 10^k labelled as plain numbers (0.03, 0.1, 0.2) instead of 3×10⁻²."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _grid_image(images, ncol: int, pad: int = 1) -> np.ndarray:
    """(n, C, H, W) tensors in [−1, 1] or (n, H, W[, C]) arrays in [0, 255] → one grid image in [0, 1] with
    ``ncol`` images per row and white padding."""
    import torch
    v = images.detach().cpu().float().numpy() if isinstance(images, torch.Tensor) else np.asarray(images, float)
    if v.ndim == 4 and v.shape[1] in (1, 3) and v.shape[-1] not in (1, 3):
        v = np.transpose((v.clip(-1, 1) + 1) / 2, (0, 2, 3, 1))
    elif v.max() > 1.5:
        v = v / 255
    if v.ndim == 3:
        v = v[..., None]
    n, h, w, c = v.shape
    nrow = int(np.ceil(n / ncol))
    out = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c))
    for i in range(n):
        r, q = divmod(i, ncol)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = v[i]
    return out[..., 0] if c == 1 else out


@themed
def plot_base_samples(conditional=None, unconditional=None, class_names: Sequence[str] | None = (),
                      per_class: int = 10):
    """Samples of the base model (notebook 02): the class-conditional grid with one row per class, named at
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
    from .heldout import verdict
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


@themed
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
    first = grid(arrays[reference])
    panel_h = 3.2                                                   # inches; panels as wide as the grids need
    panel_w = min(4.0, panel_h * first.shape[1] / first.shape[0])
    margin = 1.8 if row_labels is not None else 0.3
    fig, axes = plt.subplots(2, len(names), figsize=((panel_w + 0.35) * len(names) + margin + 1.1, 2 * panel_h + 0.9),
                             squeeze=False, layout="constrained")
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
        fig.colorbar(im, ax=list(axes[:, -1]), shrink=0.5, label="pixel difference (0–255 scale)")   # beside the
        # whole last column: the difference panels keep the width and position of the samples above them
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
