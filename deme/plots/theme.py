"""The one style of every figure (:data:`THEME`), the helpers every figure uses (symbols as mathtext, block names
in words, axis scaling, log ticks, image grids) and :func:`save_figure`."""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
import torch

from ..config import Config, figures_dir

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


def _plain_log_ticks(axis) -> None:
    """Log-axis ticks at 1, 2, 3, 5 × 10^k labelled as plain numbers (0.03, 0.1, 0.2) instead of 3×10⁻²."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _grid_image(images, ncol: int, pad: int = 1) -> np.ndarray:
    """(n, C, H, W) tensors in [−1, 1] or (n, H, W[, C]) arrays in [0, 255] → one grid image in [0, 1] with
    ``ncol`` images per row and white padding."""
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
