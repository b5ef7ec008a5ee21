"""Timestep ranges and DeMe's probabilistic sampling (docs/method.md §2, Eq. 6). Which ranges a run uses —
equal, explicit or found from the gradients — is :func:`deme.ranges.config_ranges`; the helpers here are pure."""

from __future__ import annotations

import numpy as np
import torch


def timestep_ranges(num_timesteps: int, num_ranges: int) -> list[tuple[int, int]]:
    """The N equal contiguous ranges ``[(i−1)T/N, iT/N)``, i = 1..N, as half-open ``(low, high)`` pairs."""
    if num_ranges < 1 or num_timesteps % num_ranges:
        raise ValueError(f"N={num_ranges} ranges must divide T={num_timesteps} timesteps; "
                         f"choose N among the divisors of T")
    width = num_timesteps // num_ranges
    return [(i * width, (i + 1) * width) for i in range(num_ranges)]


def check_range_bounds(bounds, num_timesteps: int, num_ranges: int | None = None) -> tuple[int, ...]:
    """``bounds`` as a tuple of ints if they are N+1 range boundaries ``0 = b_0 < b_1 < … < b_N = T`` (range i is
    ``[b_i, b_{i+1})``; N = ``num_ranges`` when given); else ``ValueError`` saying what is wrong and what to give."""
    what = (f"range_bounds must be 'equal', 'gradient' or N+1 integer boundaries 0 = b_0 < b_1 < … < b_N = "
            f"T={num_timesteps}")
    if isinstance(bounds, (str, bytes)) or not hasattr(bounds, "__len__"):
        raise ValueError(f"{what}, got {bounds!r}")
    if not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in bounds):
        raise ValueError(f"{what}; got non-integer boundaries {list(bounds)!r}")
    b = tuple(int(x) for x in bounds)
    if len(b) < 2 or b[0] != 0 or b[-1] != num_timesteps:
        raise ValueError(f"{what}: they must start at 0 and end at T={num_timesteps} to cover [0, T), got {list(b)}")
    bad = [i for i in range(len(b) - 1) if b[i] >= b[i + 1]]
    if bad:
        raise ValueError(f"{what}: they must be strictly increasing (every range non-empty), got {list(b)} "
                         f"(b_{bad[0]} = {b[bad[0]]} >= b_{bad[0] + 1} = {b[bad[0] + 1]})")
    if num_ranges is not None and len(b) != num_ranges + 1:
        raise ValueError(f"range_bounds {list(b)} give {len(b) - 1} ranges but num_ranges={num_ranges}: give "
                         f"{num_ranges + 1} boundaries, or set num_ranges={len(b) - 1}")
    return b


def ranges_from_bounds(bounds) -> list[tuple[int, int]]:
    """The half-open ranges ``(b_i, b_{i+1})`` between consecutive boundaries."""
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def which_range(t: torch.Tensor, ranges: list[tuple[int, int]]) -> torch.Tensor:
    """Index of the range of ``ranges`` (contiguous, from 0) holding each timestep of ``t``: the number of inner
    boundaries at or below ``t``. For equal ranges this is ``t // (T/N)``."""
    inner = torch.tensor([hi for _, hi in ranges[:-1]], dtype=t.dtype, device=t.device)
    return torch.bucketize(t.contiguous(), inner, right=True)


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


def sampling_check(num_timesteps: int, ranges: int | list[tuple[int, int]], range_index: int, p_global: float,
                   batch: int, mode: str = "antithetic", num_batches: int = 2000,
                   seed: int = 0) -> tuple[torch.Tensor, float, float]:
    """Draw ``num_batches`` micro-batches of :func:`sample_timesteps` for range ``range_index`` of ``ranges`` (the
    run's ``(low, high)`` ranges, :func:`deme.ranges.config_ranges`, or N for N equal ranges) and return
    ``(draws, fraction inside the range, its expectation 1 − p + p·(high − low)/T)`` — 1 − p + p/N for equal
    ranges: the probabilistic sampling of Eq. 6 as training sees it."""
    ranges = timestep_ranges(num_timesteps, ranges) if isinstance(ranges, int) else list(ranges)
    interval = ranges[range_index]
    g = torch.Generator().manual_seed(seed)
    draws = torch.cat([sample_timesteps(batch, interval, num_timesteps, p_global, mode, g)
                       for _ in range(num_batches)])
    inside = ((draws >= interval[0]) & (draws < interval[1])).float().mean().item()
    return draws, inside, 1 - p_global + p_global * (interval[1] - interval[0]) / num_timesteps


def stratified_timesteps(n: int, t_range: tuple[int, int]) -> torch.Tensor:
    """``n`` timesteps spread evenly over ``[lo, hi)``: image j gets ``lo + ⌊(j + ½)(hi − lo)/n⌋``.

    The timesteps of :func:`deme.heldout.heldout_loss` (a deterministic estimate of the loss over the range)."""
    lo, hi = int(t_range[0]), int(t_range[1])
    if not 0 <= lo < hi:
        raise ValueError(f"t_range must be (lo, hi) with 0 <= lo < hi, got {t_range}")
    return (lo + ((torch.arange(n) + 0.5) * (hi - lo) / n).long()).clamp(max=hi - 1)
