"""Timestep ranges and DeMe's probabilistic sampling (docs/method.md §2, Eq. 6)."""

from __future__ import annotations

import torch


def timestep_ranges(num_timesteps: int, num_ranges: int) -> list[tuple[int, int]]:
    """The N equal contiguous ranges ``[(i−1)T/N, iT/N)``, i = 1..N, as half-open ``(low, high)`` pairs."""
    if num_ranges < 1 or num_timesteps % num_ranges:
        raise ValueError(f"N={num_ranges} ranges must divide T={num_timesteps} timesteps; "
                         f"choose N among the divisors of T")
    width = num_timesteps // num_ranges
    return [(i * width, (i + 1) * width) for i in range(num_ranges)]


def _uniform(low: int, high: int, n: int, generator, device) -> torch.Tensor:
    return torch.randint(low, high, (n,), generator=generator, device=device)


def antithetic(low: int, high: int, batch: int, generator=None, device=None) -> torch.Tensor:
    """``batch`` timesteps in ``[low, high)`` in mirrored pairs: draw ⌊B/2⌋+1 values ``t``, append their mirrors
    ``low + high − 1 − t``, keep the first ``B`` (the released code's antithetic sampling)."""
    half = _uniform(low, high, batch // 2 + 1, generator, device)
    return torch.cat([half, low + high - 1 - half])[:batch]


def sample_timesteps(batch: int, interval: tuple[int, int], num_timesteps: int, p_global: float,
                     mode: str = "antithetic", generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """Probabilistic sampling (Eq. 6): with probability ``p_global`` draw from ``[0, T)``, else from ``interval``.

    ``mode="antithetic"`` (default, as released): ONE Bernoulli draw for the whole micro-batch, then
    antithetic pairs mirrored inside the drawn interval. ``mode="iid"``: an independent Bernoulli and an
    independent uniform draw per sample.
    """
    low, high = interval
    if not 0 <= low < high <= num_timesteps:
        raise ValueError(f"interval {interval} is not inside [0, {num_timesteps})")
    if mode == "antithetic":
        go_global = torch.rand((), generator=generator, device=device).item() < p_global
        lo, hi = (0, num_timesteps) if go_global else (low, high)
        return antithetic(lo, hi, batch, generator, device)
    if mode == "iid":
        go_global = torch.rand(batch, generator=generator, device=device) < p_global
        t_range = _uniform(low, high, batch, generator, device)
        t_all = _uniform(0, num_timesteps, batch, generator, device)
        return torch.where(go_global, t_all, t_range)
    raise ValueError(f"unknown sampling mode {mode!r}; use 'antithetic' or 'iid'")


def sampling_check(num_timesteps: int, num_ranges: int, range_index: int, p_global: float, batch: int,
                   mode: str = "antithetic", num_batches: int = 2000,
                   seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Draw ``num_batches`` micro-batches of :func:`sample_timesteps` for one range and return
    ``(draws, fraction inside the range, its expectation 1 − p + p/N)``: the probabilistic sampling of Eq. 6
    as training sees it."""
    interval = timestep_ranges(num_timesteps, num_ranges)[range_index]
    g = torch.Generator().manual_seed(seed)
    draws = torch.cat([sample_timesteps(batch, interval, num_timesteps, p_global, mode, g)
                       for _ in range(num_batches)])
    inside = ((draws >= interval[0]) & (draws < interval[1])).float().mean().item()
    return draws, inside, 1 - p_global + p_global / num_ranges


def stratified_timesteps(n: int, t_range: tuple[int, int]) -> torch.Tensor:
    """``n`` timesteps spread evenly over ``[lo, hi)``: image j gets ``lo + ⌊(j + ½)(hi − lo)/n⌋``.

    The timesteps of :func:`deme.heldout.heldout_loss` (a deterministic estimate of the loss over the range)."""
    lo, hi = int(t_range[0]), int(t_range[1])
    if not 0 <= lo < hi:
        raise ValueError(f"t_range must be (lo, hi) with 0 <= lo < hi, got {t_range}")
    return (lo + ((torch.arange(n) + 0.5) * (hi - lo) / n).long()).clamp(max=hi - 1)
