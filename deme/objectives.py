"""The loop's objectives: how a method draws timesteps and turns per-sample ε-MSEs into the scalar loss.

:class:`Objective` serves every ``weighted`` method of :mod:`deme.methods` (uniform t, the method's weight on
the ε-MSE); DeMe's ranges and pretraining have their own; ANT-UW and ANT-NashMTL are in :mod:`deme.mtl`.
"""

from __future__ import annotations

import torch

from .config import Config
from .losses import loss_weight, snr
from .ranges import config_ranges
from .timesteps import antithetic, sample_timesteps


class Objective:
    """Uniform timesteps over [0, T) and the method's per-sample weight (the SNR baselines; ``standard``: 1)."""

    extra_parameters: list[torch.nn.Parameter] = []

    def __init__(self, cfg: Config, alphas_cumprod: torch.Tensor):
        self.cfg, self.alphas_cumprod = cfg, alphas_cumprod

    def timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.cfg.num_train_timesteps, (batch,), generator=generator)

    def combine(self, eps_mse: torch.Tensor, t: torch.Tensor, step: int, shared_params) -> torch.Tensor:
        w = loss_weight(self.cfg.method, snr(self.alphas_cumprod, t), min_snr_gamma=self.cfg.min_snr_gamma,
                        p2_k=self.cfg.p2_k, p2_gamma=self.cfg.p2_gamma)
        return (w * eps_mse).mean()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class DeMeObjective(Objective):
    """DeMe range i: probabilistic sampling (Eq. 6) and the plain ε-MSE (the consistency term is added by the
    loop, since it needs the teacher)."""

    def __init__(self, cfg: Config, alphas_cumprod: torch.Tensor):
        super().__init__(cfg, alphas_cumprod)
        if cfg.range_index is None:
            raise ValueError(f"method 'deme' needs a range index in 0..{cfg.num_ranges - 1}")
        self.interval = config_ranges(cfg)[cfg.range_index]

    def timesteps(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        c = self.cfg
        return sample_timesteps(batch, self.interval, c.num_train_timesteps, c.p_global, c.sampling, generator)

    def combine(self, eps_mse, t, step, shared_params):
        return eps_mse.mean()


class PretrainObjective(Objective):
    """Pretraining: antithetic uniform timesteps over [0, T), plain ε-MSE."""

    def timesteps(self, batch, generator):
        return antithetic(0, self.cfg.num_train_timesteps, batch, generator)

    def combine(self, eps_mse, t, step, shared_params):
        return eps_mse.mean()
