"""Paired differences between models that sampled from the same initial noise: row j of every model's sample
features comes from the same starting noise, so the noise the models share cancels in their differences.

* :func:`t_interval` — mean and t interval of paired per-item differences (alignment, held-out losses);
* :func:`fid_bootstrap`, :func:`paired_difference`, :func:`paired_fid` — FID differences with a paired
  bootstrap over samples (every resample draws the same rows for every model; one bootstrap serves every pair);
* :func:`paired_kid` — KID differences with a t interval over blocks of paired rows.
"""

from __future__ import annotations

import numpy as np
from scipy import stats


def t_interval(d: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the paired differences ``d`` and its ``level`` t-interval: (mean, low, high)."""
    d = np.asarray(d, np.float64)
    m = d.mean()
    if len(d) < 2:
        return float(m), float("nan"), float("nan")
    half = stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d))
    return float(m), float(m - half), float(m + half)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative rounding clipped)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _trace_sqrt(k: np.ndarray) -> float:
    """Σ √λ over the eigenvalues of the symmetric positive semi-definite ``k`` (negative rounding clipped)."""
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((k + k.T) / 2), 0, None)).sum())


class _FrechetBootstrap:
    """FID of one feature set F (n × d) against fixed reference statistics (μr, Σr), for the full set and for
    bootstrap resamples of its rows given as ``counts`` (how often each row is drawn; all ones: the full set).
    A resample's mean and covariance Σa come from count-weighted sums of the rows, and tr (Σa Σr)^½ is Σ √λ of
    the d × d matrix Σr^½ Σa Σr^½: memory n·d + d², time n·d² + d³ per resample, whatever n. (Where n ≤ d,
    :class:`_GramBootstrap` is cheaper; it is also less exact where n ≫ d: √ of its n − d rounding-level
    eigenvalues.)"""

    def __init__(self, features: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray):
        self.f = np.asarray(features, np.float64)
        self.root_r = _psd_sqrt(np.asarray(sigma_r, np.float64))
        self.mu_r, self.tr_r = np.asarray(mu_r, np.float64), float(np.trace(sigma_r))

    def fid(self, counts: np.ndarray | None = None) -> float:
        c = np.ones(len(self.f)) if counts is None else np.asarray(counts, np.float64)
        n = c.sum()
        mu = c @ self.f / n
        sigma_a = ((self.f * c[:, None]).T @ self.f - n * np.outer(mu, mu)) / (n - 1)
        diff = mu - self.mu_r
        return float(diff @ diff + np.trace(sigma_a) + self.tr_r
                     - 2 * _trace_sqrt(self.root_r @ sigma_a @ self.root_r))


class _GramBootstrap:
    """:class:`_FrechetBootstrap` in its n × n form, for n ≤ d: with G = F Σr Fᵀ precomputed, a resample's
    tr (Σa Σr)^½ is Σ √λ of H G[idx, idx] H / (n − 1) (idx: the drawn rows; H centres; the n × n form of
    :func:`deme.metrics._fid_low_rank`)."""

    def __init__(self, features: np.ndarray, mu_r: np.ndarray, sigma_r: np.ndarray):
        self.f = np.asarray(features, np.float64)
        self.gram = self.f @ np.asarray(sigma_r, np.float64) @ self.f.T
        self.sq = (self.f ** 2).sum(1)
        self.mu_r, self.tr_r = np.asarray(mu_r, np.float64), float(np.trace(sigma_r))

    def fid(self, counts: np.ndarray | None = None) -> float:
        idx = np.arange(len(self.f)) if counts is None else np.repeat(np.arange(len(self.f)), counts)
        n = len(idx)
        mu = self.f[idx].mean(0)
        g = self.gram[np.ix_(idx, idx)]
        rm = g.mean(1)
        k = (g - rm[:, None] - rm[None, :] + rm.mean()) / (n - 1)
        tr_a = (self.sq[idx].sum() - n * mu @ mu) / (n - 1)
        diff = mu - self.mu_r
        return float(diff @ diff + tr_a + self.tr_r - 2 * _trace_sqrt(k))


def _bootstrap_for(features: np.ndarray, mu_r: np.ndarray,
                   sigma_r: np.ndarray) -> _FrechetBootstrap | _GramBootstrap:
    """The cheaper form for ``features`` (n × d): n × n where n ≤ d (as :func:`deme.metrics.fid_from_features`),
    else d × d (above 2,048 Inception samples)."""
    n, d = np.shape(features)
    return (_GramBootstrap if n <= d else _FrechetBootstrap)(features, mu_r, sigma_r)


def fid_bootstrap(features: dict[str, np.ndarray], mu_r: np.ndarray, sigma_r: np.ndarray,
                  num_bootstrap: int = 200, seed: int = 0) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """FID of each model's features against (μr, Σr), and of ``num_bootstrap`` resamples of their rows, the
    same rows for every model (row j of every model comes from the same initial noise). Returns
    ``(full, draws)``: ``{name: FID}`` and ``{name: array of resampled FIDs}``; any two models' paired
    difference is read from these (:func:`paired_fid`), so the eigendecompositions are done once per model.
    Memory per model: n·d, plus n² where n ≤ d (:func:`_bootstrap_for`)."""
    n = {len(f) for f in features.values()}
    if len(n) != 1:
        raise ValueError(f"paired FID needs the same number of samples for every model, got {sorted(n)}")
    n = n.pop()
    boots = {k: _bootstrap_for(f, mu_r, sigma_r) for k, f in features.items()}
    full = {k: b.fid() for k, b in boots.items()}
    rng = np.random.default_rng(seed)
    draws = {k: np.empty(num_bootstrap) for k in boots}
    for i in range(num_bootstrap):
        counts = np.bincount(rng.integers(0, n, n), minlength=n)
        for k, b in boots.items():
            draws[k][i] = b.fid(counts)
    return full, draws


def paired_difference(full: dict[str, float], draws: dict[str, np.ndarray], name: str, reference: str,
                      level: float = 0.95) -> dict[str, float]:
    """``name`` against ``reference`` from :func:`fid_bootstrap`'s output: ``{"value", "delta", "low", "high"}``
    (percentile interval of the resampled differences)."""
    d = draws[name] - draws[reference]
    lo, hi = np.quantile(d, [0.5 - level / 2, 0.5 + level / 2]) if name != reference else (0.0, 0.0)
    return {"value": full[name], "delta": full[name] - full[reference], "low": float(lo), "high": float(hi)}


def paired_fid(features: dict[str, np.ndarray], mu_r: np.ndarray, sigma_r: np.ndarray, reference: str,
               num_bootstrap: int = 200, seed: int = 0, level: float = 0.95) -> dict[str, dict[str, float]]:
    """FID of each model's features (rows paired across models: row j of every model comes from the same
    initial noise) against (μr, Σr), and its difference to ``reference`` with a paired bootstrap interval:
    every resample draws the same rows for every model, so noise the models share cancels. Returns
    ``{name: {"value", "delta", "low", "high"}}`` (percentile interval of the resampled differences)."""
    full, draws = fid_bootstrap(features, mu_r, sigma_r, num_bootstrap, seed)
    return {k: paired_difference(full, draws, k, reference, level) for k in features}


def _poly_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1) ** 3


def paired_kid(features: dict[str, np.ndarray], reference_features: np.ndarray, reference: str,
               blocks: int = 10, level: float = 0.95) -> dict[str, dict[str, float]]:
    """KID (unbiased MMD², clean-fid's cubic kernel) of each model's features against all
    ``reference_features``, and its difference to ``reference``. The interval comes from ``blocks`` disjoint
    blocks of paired rows (each block's difference is an unbiased estimate of the same quantity; t-interval
    over blocks, conservative for the whole-set value it is centred on). The real-real term is common to all
    models and cancels in the differences."""
    r = np.asarray(reference_features, np.float64)
    n = min(len(f) for f in features.values())
    blocks = max(2, min(blocks, n // 20))   # blocks of ≥ 20 samples where there are enough (≥ 2 per block always)
    k_rr = _poly_kernel(r, r)
    rr = (k_rr.sum() - np.trace(k_rr)) / (len(r) * (len(r) - 1))

    def parts(f):   # per block: within-model pair mean and model-real mean
        f = np.asarray(f, np.float64)
        k_aa, k_ar = _poly_kernel(f, f), _poly_kernel(f, r)
        whole = (k_aa.sum() - np.trace(k_aa)) / (len(f) * (len(f) - 1)) - 2 * k_ar.mean()
        per = []
        for b in np.array_split(np.arange(len(f)), blocks):
            kb = k_aa[np.ix_(b, b)]
            per.append((kb.sum() - np.trace(kb)) / (len(b) * (len(b) - 1)) - 2 * k_ar[b].mean())
        return whole, np.asarray(per)

    p = {k: parts(f) for k, f in features.items()}
    out = {}
    for k, (whole, per) in p.items():
        delta = whole - p[reference][0]
        _, lo, hi = t_interval(per - p[reference][1], level)
        half = (hi - lo) / 2 if k != reference else 0.0
        out[k] = {"value": float(whole + rr), "delta": float(delta), "low": float(delta - half),
                  "high": float(delta + half)}
    return out
