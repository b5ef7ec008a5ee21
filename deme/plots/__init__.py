"""Figures of the analyses (matplotlib + seaborn): Fig. 1a (gradient conflict), Fig. 2 (activation change),
Fig. 4 (loss landscapes per range), Fig. 6a (task-vector plane), Fig. 6b (task-vector box plots), the base
model's convergence and samples, the comparisons and the sensitivity sweeps.

Each ``plot_*`` function takes the output of the matching :mod:`deme.analysis` (or :mod:`deme.ablation`,
:mod:`deme.heldout`) function and returns the matplotlib figure, drawn in one style (:data:`THEME`, applied
while the figure is built; :func:`apply_theme` applies it to a notebook's own plots); :func:`save_figure`
writes it as PNG and PDF into :func:`deme.config.figures_dir`. Figures are sized for the README: about 8.5
inches wide at 150 dpi, so text stays at least ~9 px high when the PNG is shown 800 px wide.
"""

from .paper import (
    plot_activation_changes,
    plot_gradient_conflict,
    plot_landscapes,
    plot_similarity_heatmap,
    plot_similarity_histograms,
    plot_task_vector_boxes,
    plot_task_vector_plane,
    unet_order,
)
from .results import (
    VERDICT_COLOURS,
    plot_base_convergence,
    plot_base_samples,
    plot_budget_study,
    plot_capacity,
    plot_heldout_by_range,
    plot_merge_search,
    plot_paired_deltas,
    plot_sample_rows,
    plot_sensitivity,
    plot_timestep_draws,
    plot_training_log,
)
from .theme import README_WIDTH_IN, THEME, apply_theme, block_title, math_label, save_figure, themed

__all__ = [
    "apply_theme", "block_title", "math_label", "plot_activation_changes", "plot_base_convergence",
    "plot_base_samples", "plot_budget_study", "plot_capacity", "plot_gradient_conflict", "plot_heldout_by_range",
    "plot_landscapes",
    "plot_merge_search", "plot_paired_deltas", "plot_sample_rows", "plot_sensitivity", "plot_similarity_heatmap",
    "plot_similarity_histograms", "plot_task_vector_boxes", "plot_task_vector_plane", "plot_timestep_draws",
    "plot_training_log", "README_WIDTH_IN", "save_figure", "THEME", "themed", "unet_order", "VERDICT_COLOURS"
]
