"""Extension points: a new training objective is one registry entry (deme.methods), and it flows through the
config, the CLI, training and the comparison tables."""

import pytest
import torch

from deme import methods
from deme.config import get_profile


@pytest.fixture
def toy_weighting(monkeypatch):
    """Register a toy baseline, "twice" (weight 2 on the ε-MSE), for this test only."""
    monkeypatch.setattr(methods, "REGISTRY", methods.REGISTRY)
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    return methods.register(methods.Method("twice", "Twice (toy)", baseline=True,
                                           weight=lambda s, hp: 2 * torch.ones_like(s)))


def test_a_registered_weighting_flows_through_config_training_and_tables(toy_weighting, tmp_path):
    from deme.cli import stages
    from deme.compare import comparison_models
    from deme.losses import loss_weight, snr
    from deme.models import make_scheduler
    from deme.objectives import Objective
    from deme.train import make_objective, train
    cfg = get_profile("smoke", method="twice", steps_per_range=1, heldout_every=0, checkpoint_every=2,
                      log_every=1)
    assert "03_train_twice" in {s[0] for s in stages(cfg, full=True)}            # the CLI's plan
    assert "03_train_twice" not in {s[0] for s in stages(cfg)}                   # not a default baseline
    assert "Twice (toy)" in comparison_models(cfg)                               # a row of the tables
    ac = make_scheduler(cfg).alphas_cumprod
    t = torch.tensor([1, 500, 999])
    assert torch.equal(loss_weight("twice", snr(ac, t)), torch.full((3,), 2.0))
    obj = make_objective(cfg, ac)
    assert type(obj) is Objective
    mse = torch.tensor([0.1, 0.2, 0.3])
    std = make_objective(cfg.replace(method="standard"), ac)
    assert obj.combine(mse, t, 0, []) == pytest.approx(2 * std.combine(mse, t, 0, []).item())
    base = train(get_profile("smoke", method="pretrain", pretrain_steps=2, heldout_every=0), tmp_path / "base",
                 progress=False) / "model"
    out = train(cfg, tmp_path / "twice", base=str(base), progress=False)
    assert (out / "model" / "config.json").exists()


def test_unknown_method_names_the_registered_ones():
    with pytest.raises(ValueError, match="choose one of pretrain, deme, standard"):
        get_profile("smoke", method="nope")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.Method("standard", "again"))


def test_a_registered_merge_method_is_merged_and_scored_by_the_merge_method_table(monkeypatch):
    import numpy as np
    from deme import ablation as AB, merge as M
    from deme.models import build_unet
    cfg = get_profile("smoke")
    torch.manual_seed(0)
    base, experts = build_unet(cfg), [build_unet(cfg), build_unet(cfg)]
    monkeypatch.setattr(AB, "load_experts", lambda c: experts)
    monkeypatch.setattr(AB, "load_base", lambda c, projection: base)
    monkeypatch.setitem(M.MERGE_METHODS, "first", M.MergeMethod("first", "first expert only", "a toy",
                                                                lambda b, e: dict(e[0])))
    merged = AB.merge_models(cfg, ["first"])["first expert only"]
    assert all(torch.equal(v, experts[0].state_dict()[k]) for k, v in merged.state_dict().items())
    seen = []

    def fake_losses(models, cfg, part, progress):
        seen.extend(models)
        t = np.array([100, 700])
        return {name: {"unconditional": np.array([1.0, 2.0]), "t": t} for name in models}
    monkeypatch.setattr(AB, "paired_losses", fake_losses)
    table = AB.merge_method_heldout(cfg)
    assert "first expert only" in seen and "TIES (density 0.2)" in seen and "first expert only" in set(table.model)
