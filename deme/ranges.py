"""The timestep ranges of a run (docs/method.md §2.4): every place that needs them — training's timestep sampling,
the ensemble, the held-out tables, the landscapes, the plots — takes them from :func:`config_ranges`.

``Config.range_bounds`` says which:

* ``"equal"`` (default, the paper): the N equal ranges ``[iT/N, (i+1)T/N)``;
* N+1 boundaries ``(0, b_1, …, b_{N−1}, T)``, strictly increasing: range i is ``[b_i, b_{i+1})``;
* ``"gradient"``: the N contiguous ranges whose timesteps' loss gradients agree best on the base model
  (:func:`segment_similarity` of notebook 02's similarity matrix). They are found once by
  :func:`deme.analysis.find_gradient_ranges` (``python -m deme ranges``) and recorded at
  :func:`gradient_record_path`; a DeMe run trains on the recorded list, and its manifest and folder carry that
  list (:func:`resolved`), so a run's identity says which ranges it trained on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .config import Config, repo_root
from .errors import SettingsError
from .timesteps import check_range_bounds, ranges_from_bounds, timestep_ranges

# ---------------------------------------------------------------------------------------------------------
# Contiguous segmentation of a similarity matrix
# ---------------------------------------------------------------------------------------------------------

def _block_sums(sim: np.ndarray) -> np.ndarray:
    """``P`` with ``P[a, b]`` = the sum of ``sim[:a, :b]``: a block's sum in four look-ups."""
    P = np.zeros((len(sim) + 1, len(sim) + 1))
    P[1:, 1:] = sim.cumsum(0).cumsum(1)
    return P


def coherence(sim: np.ndarray, edges) -> list[float]:
    """Per segment ``[e_i, e_{i+1})`` of the grid, the mean of ``sim`` over all its pairs (diagonal included): for
    a cosine matrix of gradients, ‖mean unit gradient‖² of the segment — 1 when its gradients all agree (NaN for
    a segment without grid points)."""
    sim = np.asarray(sim, dtype=np.float64)
    return [float(sim[a:b, a:b].mean()) if b > a else float("nan") for a, b in zip(edges[:-1], edges[1:])]


def segment_similarity(sim, num_segments: int) -> list[int]:
    """The optimal split of the K grid points of a similarity matrix into ``num_segments`` contiguous segments:
    the edges ``0 = e_0 < e_1 < … < e_n = K`` maximising ``Σ_s (1/m_s) Σ_{i,j ∈ s} sim[i, j]`` (m_s points in s).

    For a cosine matrix of unit gradients u_i this minimises ``Σ_s Σ_{i∈s} ‖u_i − ū_s‖² = Σ_s m_s (1 − ‖ū_s‖²)``,
    the part of each range's gradients that cancels in their mean: k-means on the gradient directions with
    contiguous clusters (interval clustering). Exact dynamic programming, O(n·K²); ties go to the earliest edge.
    """
    sim = np.asarray(sim, dtype=np.float64)
    K = len(sim)
    if sim.ndim != 2 or sim.shape != (K, K) or not np.allclose(sim, sim.T):
        raise ValueError(f"expected a symmetric square similarity matrix, got shape {sim.shape}")
    if not 1 <= num_segments <= K:
        raise ValueError(f"cannot split {K} grid points into {num_segments} contiguous segments")
    P = _block_sums(sim)
    best = np.full((num_segments + 1, K + 1), -np.inf)
    arg = np.zeros((num_segments + 1, K + 1), dtype=np.int64)
    best[0, 0] = 0.0
    for c in range(1, num_segments + 1):
        for b in range(c, K + 1):
            a = np.arange(c - 1, b)
            gain = (P[b, b] - P[a, b] - P[b, a] + P[a, a]) / (b - a)
            cand = best[c - 1, a] + gain
            m = int(np.argmax(cand))
            best[c, b], arg[c, b] = cand[m], a[m]
    edges = [K]
    for c in range(num_segments, 0, -1):
        edges.append(int(arg[c, edges[-1]]))
    return edges[::-1]


def grid_bounds(edges, num_points: int, num_timesteps: int) -> tuple[int, ...]:
    """Timestep boundaries of grid segments: grid point k is the centre of the bin ``[kT/K, (k+1)T/K)``
    (:func:`deme.analysis.timestep_grid`), so edge e becomes ``⌊e·T/K⌋``."""
    return tuple(int(e) * num_timesteps // num_points for e in edges)


# ---------------------------------------------------------------------------------------------------------
# The ranges of a Config
# ---------------------------------------------------------------------------------------------------------

GRADIENT_RECORD_KEY = ("pretrained", "analysis_sizes", "num_train_timesteps", "beta_schedule", "beta_start",
                       "beta_end")
"""What, beside the profile and N, decides the "gradient" ranges: the base model (the profile's, or ``pretrained``),
the analysis' sizes and the noise schedule. Their hash names the record."""


def gradient_record_path(cfg: Config) -> Path:
    """Where the "gradient" ranges of ``cfg`` are recorded: runs/<profile>/ranges/gradient_N<n>_<key>.json, the key a
    hash of :data:`GRADIENT_RECORD_KEY` (delete the file to find them again, e.g. after retraining the base)."""
    fields = json.dumps({k: getattr(cfg, k) for k in GRADIENT_RECORD_KEY}, sort_keys=True)
    key = hashlib.sha1(fields.encode()).hexdigest()[:10]
    return repo_root() / "runs" / cfg.profile / "ranges" / f"gradient_N{cfg.num_ranges}_{key}.json"


def range_bounds(cfg: Config) -> tuple[int, ...]:
    """The N+1 boundaries ``0 = b_0 < … < b_N = T`` of ``cfg``'s ranges (``cfg.range_bounds``: equal, explicit,
    or the recorded "gradient" ones). A "gradient" config without its record stops with what to run."""
    T, N = cfg.num_train_timesteps, cfg.num_ranges
    if cfg.range_bounds == "equal":
        return tuple([lo for lo, _ in timestep_ranges(T, N)] + [T])
    if cfg.range_bounds != "gradient":
        return check_range_bounds(cfg.range_bounds, T, N)
    path = gradient_record_path(cfg)
    if not path.exists():
        raise SettingsError(f"range_bounds='gradient' of {cfg.profile!r} with N={N} has no record ({path} is "
                            f"missing): find them first with `python -m deme ranges --profile {cfg.profile} "
                            f"--num-ranges {N}` (deme.analysis.find_gradient_ranges)")
    return check_range_bounds(json.loads(path.read_text())["range_bounds"], T, N)


def config_ranges(cfg: Config) -> list[tuple[int, int]]:
    """The N half-open timestep ranges ``(low, high)`` of ``cfg``, range 0 (low noise) first: THE ranges of a run."""
    return ranges_from_bounds(range_bounds(cfg))


def resolved(cfg: Config) -> Config:
    """``cfg`` with ``range_bounds="gradient"`` replaced by its recorded boundaries (other values as they are): what a
    DeMe run trains on and is named by."""
    return cfg.replace(range_bounds=range_bounds(cfg)) if cfg.range_bounds == "gradient" else cfg
