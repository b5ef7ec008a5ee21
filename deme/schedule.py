"""The pretraining's learning-rate schedule, and when a longer pretraining may resume a shorter one.

One schedule function for the loop (:func:`lr_factor`, used by :func:`deme.train.build_optimizer` and by
:func:`deme.premise.proportions` for the final lr) and the resume rule that follows from it (:func:`continues`).
"""

from __future__ import annotations

import math

from .config import Config, training_identity


def lr_factor(cfg: Config, step: int, steps: int) -> float:
    """The learning rate at optimizer step ``step`` of ``steps``, as a fraction of the peak: 1 (constant,
    docs/method.md §4 and the DDPM pretraining recipe); for pretraining with ``pretrain_cooldown`` = (start, end,
    floor) 1 until ``start``, linear to ``floor`` at ``end``, then ``floor``; for pretraining with
    ``pretrain_warmup`` > 0 a linear warmup then a cosine decay to 10% of the peak."""
    if cfg.method != "pretrain":
        return 1.0
    if cfg.pretrain_warmup:
        warm = min(1.0, (step + 1) / cfg.pretrain_warmup)
        return warm * (0.55 + 0.45 * math.cos(math.pi * min(1.0, step / max(steps, 1))))
    if cfg.pretrain_cooldown:
        start, end, floor = cfg.pretrain_cooldown
        return 1.0 - (1.0 - floor) * min(1.0, max(0.0, (step - start) / max(end - start, 1)))
    return 1.0


def continues(stored: dict, cfg: Config) -> bool:
    """Whether a run of ``cfg`` may resume from a checkpoint written under the config ``stored``: the same
    training config, or a longer pretraining whose learning rate equals the shorter run's at every step it took
    (a constant lr, or a ``pretrain_cooldown`` that starts after them; not warmup + cosine, which depends on the
    length): then the first steps of the longer run are the shorter run's steps, so extending a base until it
    converges is resuming it."""
    mine, theirs = cfg.training_identity(), training_identity(stored)
    if mine == theirs:
        return True
    done = theirs.get("pretrain_steps", 0)
    if cfg.method != "pretrain" or done > cfg.pretrain_steps:
        return False
    schedule = {"pretrain_steps", "pretrain_cooldown"}
    if {k: v for k, v in theirs.items() if k not in schedule} != {k: v for k, v in mine.items() if k not in schedule}:
        return False
    before = Config.from_dict({**cfg.to_dict(), **{k: stored.get(k) for k in schedule}})
    return all(lr_factor(before, s, done) == lr_factor(cfg, s, cfg.pretrain_steps) for s in range(done))
