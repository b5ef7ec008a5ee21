"""The training objectives, one registry: every method's name, table name, paper row, loss weighting and
objective kind. The config's method list, the CLI choices, the comparison tables and the tests read it, so a
new weighting is one entry here (and its test).

Weights multiply the per-sample ε-MSE (mean over C, H, W); SNR(t) = ᾱ_t / (1 − ᾱ_t) (docs/method.md §5). They are
used exactly as the formulas give them (no normalisation: with linear betas the SNR+1 and Trun-SNR weights
reach ~2.5e4 at t = 999; the paper does not say whether it normalised them, and the grad-norm clip of the
recipe bounds the update size either way).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .registry import add_entry

Weight = Callable[[torch.Tensor, Any], torch.Tensor]
"""``weight(snr_t, hp)``: the per-sample weight from SNR(t); ``hp`` has the Config's baseline fields
(``min_snr_gamma``, ``p2_k``, ``p2_gamma``)."""


@dataclass(frozen=True)
class Method:
    """One training objective.

    ``objective``: which loop objective trains it — ``weighted`` (uniform t, ``weight`` on the ε-MSE),
    ``deme`` (one range, probabilistic sampling, consistency loss), ``pretrain``, ``ant-uw``, ``ant-nash``.
    ``baseline``: an equal-budget baseline of Tables 1–2 (N×K steps on all timesteps); ``default``: trained
    and compared by the default reproduction (the others with ``--full``)."""

    name: str
    display: str
    paper_row: str | None = None
    source: str = ""
    objective: str = "weighted"
    weight: Weight | None = None
    baseline: bool = False
    default: bool = False


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("pretrain", "Pretraining", objective="pretrain", source="the embedded default's base model"),
    Method("deme", "DeMe", objective="deme", source="Ma et al., CVPR 2025"),
    Method("standard", "Standard (uniform)", source="plain ε-MSE on all timesteps", baseline=True, default=True,
           weight=lambda s, hp: torch.ones_like(s)),
    Method("snr+1", "SNR+1", "SNR+1", "Salimans & Ho 2022", baseline=True,
           weight=lambda s, hp: 1 + 1 / s),
    Method("trunc-snr", "Trun-SNR", "Trun-SNR", "Salimans & Ho 2022", baseline=True,
           weight=lambda s, hp: torch.clamp(1 / s, min=1.0)),
    Method("min-snr", "Min-SNR-γ", "Min-SNR-γ", "Hang et al., ICCV 2023", baseline=True,
           weight=lambda s, hp: torch.clamp(hp.min_snr_gamma / s, max=1.0)),
    Method("p2", "P2", "P2", "Choi et al., CVPR 2022", baseline=True,
           weight=lambda s, hp: 1 / (hp.p2_k + s) ** hp.p2_gamma),
    Method("ant-uw", "ANT-UW", "ANT-UW", "Go et al., NeurIPS 2023", objective="ant-uw", baseline=True),
    Method("ant-nash", "ANT-NashMTL", "ANT-NashMTL", "Go et al., NeurIPS 2023", objective="ant-nash", baseline=True),
)}


def baselines(default_only: bool = False) -> tuple[str, ...]:
    """The equal-budget baselines in table order (``default_only``: those the default reproduction runs)."""
    return tuple(m.name for m in METHODS.values() if m.baseline and (m.default or not default_only))


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def register_method(method: Method) -> Method:
    """Add ``method`` to the registry (e.g. a new weighting from a notebook or a plug-in module); the config's
    validation, the CLI choices, the baselines and the tables see it from then on."""
    return add_entry(METHODS, method, "method")
