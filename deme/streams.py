"""Work on a stream of batches as if on their concatenation, without holding it: 50,000 samples at 256 px are 39 GB
per copy, their Inception features 0.4 GB. :class:`Grouped` regroups the rows it is fed into groups of a fixed size
— the groups a function would see on the whole — so a streamed result equals the in-memory one number for number.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

Rows = torch.Tensor | np.ndarray


def _cat(parts: list[Rows]) -> Rows:
    return torch.cat(parts) if torch.is_tensor(parts[0]) else np.concatenate(parts)


class Grouped:
    """``fn`` applied to the rows fed to it in groups of exactly ``size`` rows (the last group, at :meth:`result`,
    may be shorter), in order, and its outputs concatenated: ``fn`` sees the groups it would see on the
    concatenation of everything fed, while at most one group plus one fed batch is held. ``empty``: the result
    when nothing was fed."""

    def __init__(self, fn: Callable[[Rows], Rows], size: int, empty: Rows | None = None):
        if size < 1:
            raise ValueError(f"group size must be positive, got {size}")
        self.fn, self.size, self.empty = fn, int(size), empty
        self.rest: Rows | None = None
        self.outputs: list[Rows] = []

    def feed(self, rows: Rows) -> None:
        buf = rows if self.rest is None or not len(self.rest) else _cat([self.rest, rows])
        i = 0
        while len(buf) - i >= self.size:
            self.outputs.append(self.fn(buf[i:i + self.size]))
            i += self.size
        self.rest = buf[i:]

    def result(self) -> Rows:
        if self.rest is not None and len(self.rest):
            self.outputs.append(self.fn(self.rest))
            self.rest = None
        return _cat(self.outputs) if self.outputs else self.empty


def fan_out(batches: Iterable[Rows], consumers: Mapping[str, Grouped]) -> dict[str, Any]:
    """Feed every batch of ``batches`` to each consumer, then ``{name: consumer.result()}``: several results of
    one stream (e.g. Inception features and classifier predictions of the same samples) in one pass."""
    for rows in batches:
        for c in consumers.values():
            c.feed(rows)
    return {k: c.result() for k, c in consumers.items()}
