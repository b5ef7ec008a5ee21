"""Training objectives: the ε-MSE, DeMe's consistency loss (Eq. 4–5) and the SNR weightings of the baselines
(docs/method.md §5).

The weightings themselves live in the method registry (:mod:`deme.methods`), one entry per method.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .methods import get_method


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖² averaged over all but the batch dimension, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def loss_weight(method: str, snr_t: torch.Tensor, *, min_snr_gamma: float = 5.0, p2_k: float = 1.0,
                p2_gamma: float = 1.0) -> torch.Tensor:
    """Per-sample weight of the ε-MSE for ``method`` (its registry entry in :mod:`deme.methods`; 1 for methods
    without a weighting): ``standard`` 1; ``snr+1`` 1 + 1/SNR; ``trunc-snr`` max(1, 1/SNR); ``min-snr``
    min(1, γ/SNR); ``p2`` 1/(k + SNR)^γ."""
    weight = get_method(method).weight
    if weight is None:
        return torch.ones_like(snr_t)
    return weight(snr_t, SimpleNamespace(min_snr_gamma=min_snr_gamma, p2_k=p2_k, p2_gamma=p2_gamma))


def consistency_loss(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    """Eq. 5's second term, ‖ε_θ(x_t, t) − ε_θi(x_t, t)‖², per sample (teacher detached)."""
    return per_sample_mse(student_eps, teacher_eps.detach())
