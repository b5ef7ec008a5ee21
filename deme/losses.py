"""Training objectives: the ε-MSE, DeMe's consistency loss (Eq. 4–5) and the SNR weightings of the baselines
(PAPER.md §5).

Every weighting multiplies the per-sample ε-MSE (mean over C, H, W); SNR(t) = ᾱ_t / (1 − ᾱ_t).
Normalisation: none — the weights are used exactly as the formulas give them (with linear betas the SNR+1 and
Trun-SNR weights reach ~2.5e4 at t = 999; the paper does not say whether it normalised them, and the
grad-norm clip of the recipe bounds the update size either way).
"""

from __future__ import annotations

import torch


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖pred − target‖² averaged over all but the batch dimension, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """SNR(t) = ᾱ_t / (1 − ᾱ_t)."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def loss_weight(method: str, snr_t: torch.Tensor, *, min_snr_gamma: float = 5.0, p2_k: float = 1.0,
                p2_gamma: float = 1.0) -> torch.Tensor:
    """Per-sample weight of the ε-MSE for the SNR-based baselines (PAPER.md §5).

    ``standard``/``deme``: 1; ``snr+1``: 1 + 1/SNR; ``trunc-snr``: max(1, 1/SNR); ``min-snr``: min(1, γ/SNR);
    ``p2``: 1/(k + SNR)^γ.
    """
    if method in ("standard", "deme", "pretrain", "ant-uw", "ant-nash"):
        return torch.ones_like(snr_t)
    if method == "snr+1":
        return 1 + 1 / snr_t
    if method == "trunc-snr":
        return torch.clamp(1 / snr_t, min=1.0)
    if method == "min-snr":
        return torch.clamp(min_snr_gamma / snr_t, max=1.0)
    if method == "p2":
        return 1 / (p2_k + snr_t) ** p2_gamma
    raise ValueError(f"no loss weighting for method {method!r}")


def consistency_loss(student_eps: torch.Tensor, teacher_eps: torch.Tensor) -> torch.Tensor:
    """Eq. 5's second term, ‖ε_θ(x_t, t) − ε_θi(x_t, t)‖², per sample (teacher detached)."""
    return per_sample_mse(student_eps, teacher_eps.detach())
