"""The figures of deme.plots on tiny inputs: labelled axes, legends beside (not over) the data, plain titles,
colour bars with few digits, whiskers and error bars defined, no literal underscores, text readable when
the PNG is shown 800 px wide, one theme that does not leak into the caller's settings."""

import re

import matplotlib
import numpy as np
import pandas as pd
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from deme import plots  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _texts(fig):
    """Every visible, non-empty text of the drawn figure (titles, labels, tick labels, legends, colour bars)."""
    fig.canvas.draw()
    return [t for t in fig.findobj(matplotlib.text.Text) if t.get_visible() and t.get_text().strip()]


def _data_axes(fig):
    return [ax for ax in fig.axes if ax.lines or ax.patches or ax.collections or ax.images]


def _legends(fig):
    return [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)


def _overlap(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def check_figure(fig, min_px: float = 8.0, width_px: int = 800):
    """The checks every figure of this module must pass."""
    texts = _texts(fig)
    for t in texts:   # no literal underscores outside mathtext ($…$)
        plain = re.sub(r"\$[^$]*\$", "", t.get_text())
        assert "_" not in plain, t.get_text()
    # readable: the smallest text, in pixels, when the saved (tight) figure is shown width_px wide
    width_in = fig.get_tightbbox(fig.canvas.get_renderer()).width
    smallest = min(t.get_fontsize() for t in texts)
    assert smallest / 72 * width_px / width_in >= min_px, (smallest, width_in)
    # legends lie beside the data, not on it
    renderer = fig.canvas.get_renderer()
    for leg in _legends(fig):
        box = leg.get_window_extent(renderer)
        for ax in _data_axes(fig):
            if ax.get_label() == "<colorbar>":
                continue
            assert not _overlap(box, ax.get_window_extent(renderer)), (leg.get_texts()[0].get_text(), ax.get_title())


def _labels(ax):
    return ax.get_xlabel().strip(), ax.get_ylabel().strip()


# -- helpers ------------------------------------------------------------------------------------------------

def test_math_label_and_block_titles():
    assert plots.math_label("θ_0 (low noise)") == r"$\theta_{0}$ (low noise)"
    assert plots.math_label("τ_{12} and θ_i − θ") == r"$\tau_{12}$ and $\theta_{i}$ − θ"
    assert plots.math_label("no symbols_here") == "no symbols_here"
    assert [plots.block_title(n) for n in ("down_blocks.1", "mid_block", "up_blocks.0", "conv_norm_out")] == \
        ["down block 1", "middle block", "up block 0", "output norm"]
    assert plots.theme._sci_scale([3e-5, -8.1e-5]) == (pytest.approx(1e5), r" ($\times 10^{-5}$)")
    assert plots.theme._sci_scale([0.5, 20.0]) == (1.0, "")


def test_the_theme_applies_inside_and_does_not_leak():
    before = dict(plt.rcParams)
    fig = plots.plot_base_convergence(pd.DataFrame({"step": [1, 2, 3, 4], "loss": [1.0, 0.5, 0.4, 0.35],
                                                    "heldout_loss": [1.1, np.nan, 0.45, 0.44]}))
    assert not fig.axes[0].spines["top"].get_visible()             # the theme: no top/right spines
    assert fig.axes[0].title.get_fontsize() == plots.THEME["axes.titlesize"]
    assert dict(plt.rcParams) == before                            # the caller's settings are untouched


# -- Fig. 6a ------------------------------------------------------------------------------------------------

def test_task_vector_plane_shows_change_against_theta_with_short_colour_bar_ticks():
    coords = np.linspace(-0.5, 1.5, 5)                               # contains 0
    a, b = np.meshgrid(coords, coords, indexing="ij")
    loss = 0.0329 + 1e-5 * ((a - 0.7) ** 2 + (b - 1.2) ** 2)         # 5-digit losses, tiny differences
    fig = plots.plot_task_vector_plane(loss, coords, merge_point=(0.75, 0.5),
                                       labels=("θ_0 (low noise)", "θ_3 (high noise)"))   # the notebook's call
    check_figure(fig)
    ax, cbar = fig.axes[0], fig.axes[1]
    x, y = _labels(ax)
    assert r"$\theta_{0}$" in x and "low noise" in x and r"$\theta_{3}$" in y
    assert "%" in cbar.get_ylabel() and "θ" in cbar.get_ylabel()
    ticks = [t.get_text().replace("−", "-") for t in cbar.get_yticklabels() if t.get_text()]
    assert "0" in ticks and len(ticks) >= 3
    assert all(len(re.sub(r"[^0-9]", "", t).lstrip("0")) <= 2 for t in ticks), ticks   # ≤ 2 significant digits
    values = [float(t) for t in ticks]
    rel = 100 * (loss / loss[1, 1] - 1)                              # (0, 0) is index 1 of the grid
    assert max(values) <= np.abs(rel).max() * 1.001 and min(values) >= -np.abs(rel).max() * 1.001
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[0] == r"$\theta$ (pretrained)" and any("merge weights (0.75, 0.5)" in t for t in legend)
    assert any(t.startswith("lowest grid point (0.5, 1)") for t in legend), legend   # grid point nearest (0.7, 1.2)


# -- Fig. 6b ------------------------------------------------------------------------------------------------

def _stats(scale=1e-5):
    rows = []
    for l in ("conv_in", "down_blocks.0", "mid_block", "up_blocks.0"):
        for r in range(3):
            s = scale * (1 + r)
            rows.append({"layer": l, "range": r, "range_label": f"range {r} (t ∈ [{r}, {r + 1}))", "n": 10,
                         "q5": -2 * s, "q25": -s, "q50": 0.0, "q75": s, "q95": 2 * s})
    return pd.DataFrame(rows)


def test_task_vector_boxes_state_whiskers_scale_and_spread():
    fig = plots.plot_task_vector_boxes(_stats())
    check_figure(fig)
    ax = fig.axes[0]
    assert "5th to 95th percentile" in ax.get_title() and "25th to 75th" in ax.get_title()
    assert r"$\tau_i = \theta_i - \theta$" in ax.get_ylabel() and r"10^{-5}" in ax.get_ylabel()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["input conv", "down block 0", "middle block", "up block 0"]
    assert max(abs(v) for v in ax.get_ylim()) < 10                  # values shown in units of 1e-5
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    # spread = q95 − q5 = 4·scale·(1 + r) → 4, 8, 12 in units of 1e-5
    assert [t.split("spread ")[1] for t in legend] == ["4", "8", "12"]
    # the old call without the parameter counts still works (equal weights)
    check_figure(plots.plot_task_vector_boxes(_stats().drop(columns="n"), whiskers=("q25", "q75")))


# -- Fig. 2 -------------------------------------------------------------------------------------------------

def test_activation_changes_summary_and_histograms_are_labelled():
    rng = np.random.default_rng(0)
    changes = {n: {"per_position": rng.random(50) + 1, "per_channel": rng.random(16) * 3,
                   "per_position_shuffled": rng.random(50) + 1, "per_channel_shuffled": rng.random(16) + 1}
               for n in ("down_blocks.0", "mid_block", "up_blocks.1")}
    fig = plots.plot_activation_changes(changes)
    check_figure(fig)
    summary = fig.axes[0]
    assert "CV" in summary.get_ylabel() and "channel" in summary.get_title()
    assert [t.get_text() for t in summary.get_xticklabels()] == ["down block 0", "middle block", "up block 1"]
    from deme.analysis import activation_change_summary
    s = activation_change_summary(changes)
    heights = [p.get_height() for p in summary.patches]
    assert heights[:3] == pytest.approx(list(s.cv_ratio)) and heights[3:] == pytest.approx(list(s.cv_ratio_shuffled))
    panels = fig.axes[1:]
    assert len(panels) == 3 and all(ax.get_xlabel() for ax in panels) and panels[0].get_ylabel() == "density"
    assert fig.legends and "per channel" in fig.legends[0].get_texts()[0].get_text()
    # a block without the shuffled reference (older analyses) still draws
    check_figure(plots.plot_activation_changes({"mid_block": {"per_position": rng.random(20),
                                                              "per_channel": rng.random(8)}}))


# -- base model (notebook 01) -------------------------------------------------------------------------------

def test_base_convergence_marks_the_last_fifth_and_its_change():
    steps = np.arange(100, 1100, 100)
    log = pd.DataFrame({"step": steps, "loss": 1 / steps, "heldout_loss": 2 / steps})
    fig = plots.plot_base_convergence(log, steps=1000)
    check_figure(fig)
    left, right = fig.axes
    assert all(_labels(ax)[0] == "optimizer step" and "log scale" in _labels(ax)[1] for ax in (left, right))
    change = 100 * (2 / 1000 / (2 / 800) - 1)                       # held-out loss from step 800 to 1000
    assert f"{change:+.2f}%" in right.get_title() and "last 20%" in right.get_title()
    labels = [t.get_text() for t in right.get_yticklabels() if t.get_text()]
    assert labels and all(re.fullmatch(r"[0-9.]+", t) for t in labels), labels   # plain numbers, not 2×10⁻³


def test_base_samples_name_each_class_row():
    import torch
    cond, uncond = torch.rand(3 * 4, 1, 8, 8) * 2 - 1, torch.rand(6, 1, 8, 8) * 2 - 1
    fig = plots.plot_base_samples(cond, uncond, ["T-shirt", "trouser", "bag"], per_class=4)
    check_figure(fig)
    left, right = fig.axes
    assert [t.get_text() for t in left.get_yticklabels()] == ["T-shirt", "trouser", "bag"]
    assert "one row per class" in left.get_title() and "unconditional" in right.get_title()
    assert left.images[0].get_array().shape[0] == right.images[0].get_array().shape[0]   # same row height
    assert right.images[0].get_array().shape[1] == 2 * 9 + 1                              # 6 samples: 3 rows × 2
    with pytest.raises(ValueError, match="nothing to show"):
        plots.plot_base_samples()


# -- sensitivity (notebook 06, full) ------------------------------------------------------------------------

def test_sensitivity_plots_each_kind_against_the_swept_value_with_intervals():
    rows = []
    for v in (1, 2, 4, 8):
        for kind in (["model"] if v == 1 else ["merge", "ensemble"]):
            for cond in ("unconditional", "conditional"):
                for r in ("all", "0"):
                    d = -0.1 * v if kind != "ensemble" else -0.05 * v
                    rows.append({"variant": f"N={v}", "kind": kind, "model": f"{kind}{v}", "range": r,
                                 "condition": cond, "loss": 1.0, "delta_pct": d, "ci95_low": d - 0.1,
                                 "ci95_high": d + 0.1})
    fig = plots.plot_sensitivity(pd.DataFrame(rows), default=4)
    check_figure(fig)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8"]
    assert "N" in ax.get_xlabel() and "%" in ax.get_ylabel()
    merged = ax.lines[0]
    assert merged.get_ydata() == pytest.approx([-0.1, -0.2, -0.4, -0.8])   # N=1's single model on both lines
    leg = fig.legends[0]
    assert "95% CI" in leg.get_title().get_text()
    assert [t.get_text() for t in leg.get_texts()] == ["merged (w = 1/N)", "ensemble (before merge)",
                                                       "the profile's N = 4"]
    assert len(fig.axes) == 2 and "conditional" in fig.axes[1].get_title()


def test_capacity_map_has_a_line_per_base_over_the_budgets_with_intervals():
    """One line per base — two of the same size (another pretraining) are two lines."""
    rows = [{"setting": f"{base}-{b}", "base": base, "parameters": n, "steps_per_range": b,
             "budget_pct": 5.0 * b / 600, "model": m, "condition": c, "delta_pct": -0.1 * b / 600,
             "ci95_low": -0.1 * b / 600 - 0.05, "ci95_high": -0.1 * b / 600 + 0.05}
            for n, base in ((18_000, "a"), (18_000, "b"), (71_000, "c")) for b in (300, 600, 1200)
            for c in ("unconditional", "conditional")
            for m in ("ensemble - standard", "ensemble", "merged (w = 1/N)", "standard")]
    fig = plots.plot_capacity(pd.DataFrame(rows))
    check_figure(fig, width_px=1000)
    ax = fig.axes[0]
    assert len(ax.lines) >= 3 and ax.get_xscale() == "log" and "%" in ax.get_xlabel() and "%" in ax.get_ylabel()
    assert "standard" in ax.get_title() and "base" in fig.axes[1].get_title()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["18K parameters (a)", "18K parameters (b)",
                                                                  "71K parameters (c)"]


def test_gallery_difference_panels_sit_under_their_samples():
    """Each difference panel is as wide as the sample panel above it and starts at the same x (the colour bar
    used to shrink the last one and shift it right); the difference scale is symmetric about 0."""
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 255, (4, 8, 8))
    fig = plots.plot_sample_rows({"base": imgs, "a": imgs + 3, "b": imgs - 5}, "base", ["row 0", "row 1"])
    fig.canvas.draw()
    axes = np.array(fig.axes[:6]).reshape(2, 3)
    for j in (1, 2):
        top, bottom = axes[0, j].get_window_extent(), axes[1, j].get_window_extent()
        assert abs(top.x0 - bottom.x0) < 2 and abs(top.width - bottom.width) < 2, j
    lo, hi = axes[1, 1].images[0].get_clim()
    assert lo == -hi and hi >= 5


def test_gallery_colour_scale_is_not_set_by_one_pixel_and_no_panel_is_empty():
    """One pixel moved by 200 grey levels among thousands moved by 2: the difference maps saturate at the
    99.5th percentile of |difference| (≈ 2), not at 200, and say so on the colour bar; the cell under the
    reference holds the distribution of |difference| per model (one histogram each), not an empty frame."""
    rng = np.random.default_rng(0)
    imgs = rng.uniform(0, 200, (60, 16, 16))
    moved = imgs + 2.0
    moved[0, 0, 0] += 200
    fig = plots.plot_sample_rows({"base": imgs, "moved": moved}, "base")
    fig.canvas.draw()
    axes = np.array(fig.axes[:4]).reshape(2, 2)
    lo, hi = axes[1, 1].images[0].get_clim()
    assert lo == -hi and 1.0 <= hi < 3.0
    under_reference = axes[1, 0]
    assert under_reference.axison and len(under_reference.patches) == 1          # one step histogram per model
    assert "moved: mean 2." in under_reference.get_legend().get_texts()[0].get_text()
    assert "99.5th percentile" in fig.axes[-1].get_ylabel()


def test_merge_search_says_how_many_candidates_it_shows():
    """36 searched weightings, the best 12 drawn: the title says "the best 12 of 36" (the named ones are always
    drawn, outside the count)."""
    import pandas as pd
    k = np.arange(36)
    cands = pd.DataFrame({"weights": [(float(i),) for i in k], "kind": ["coordinate search"] * 36,
                          "loss": 1 + k / 100, "delta_pct": k / 10 - 1, "ci95_low": k / 10 - 1.5,
                          "ci95_high": k / 10 - 0.5})
    cands = pd.concat([cands, pd.DataFrame({"weights": [(0.0,)], "kind": ["base (reference)"], "loss": [1.2],
                                            "delta_pct": [0.0], "ci95_low": [0.0], "ci95_high": [0.0]})],
                      ignore_index=True)
    fig = plots.plot_merge_search(cands, top=12)
    assert "the best 12 of 36 searched weightings" in fig.axes[0].get_title()
    assert len(fig.axes[0].get_yticklabels()) == 13
