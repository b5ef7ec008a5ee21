"""Extension points: a new training objective is one registry entry (deme.methods), and it flows through the
config, the CLI, training and the comparison tables."""

import pytest
import torch

from deme import methods
from deme.config import get_profile


@pytest.fixture
def toy_weighting(monkeypatch):
    """Register a toy baseline, "twice" (weight 2 on the ε-MSE), for this test only."""
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    return methods.register_method(methods.Method("twice", "Twice (toy)", baseline=True,
                                           weight=lambda s, hp: 2 * torch.ones_like(s)))


def test_a_registered_weighting_flows_through_config_training_and_tables(toy_weighting, tmp_path):
    from deme.compare import comparison_models
    from deme.losses import loss_weight, snr
    from deme.models import make_scheduler
    from deme.objectives import Objective
    from deme.reproduce import stages
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
        methods.register_method(methods.Method("standard", "again"))


def test_a_registered_merge_method_is_merged_and_scored_by_the_merge_method_table(monkeypatch):
    import numpy as np

    from deme import ablation as AB
    from deme import merge as M
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


def _bars(split: str):
    """A toy labelled dataset: 8x8 uint8 images, class k = a bright column k mod 8 (rows 0..3 for k < 8,
    rows 4..7 for k = 8, 9) on a dark background with seeded speckle; 200 train / 60 test images."""
    import numpy as np
    n, seed = (200, 0) if split == "train" else (60, 1)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n).astype(np.int64)
    images = rng.integers(0, 40, (n, 8, 8)).astype(np.uint8)
    for i, k in enumerate(labels):
        rows = slice(0, 4) if k < 8 else slice(4, 8)
        images[i, rows, k % 8] = 255
    return images, labels


@pytest.fixture
def toy_dataset(monkeypatch, tmp_path):
    """Register a toy dataset description, "bars", for this test only; everything written goes under tmp_path."""
    from deme import data
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    monkeypatch.setattr(data, "DATASETS", dict(data.DATASETS))
    names = tuple(f"bar {k}" for k in range(10))
    return data.register_dataset(data.DatasetSpec(
        "bars", "Bars (toy)", "tensor", "tests/test_registries.py", class_names=names,
        split_sizes={"train": 200, "test": 60}, arrays=_bars, classifier_epochs=1, quality="classifier-fd",
        prompt="a picture of {name}"))


def test_a_registered_dataset_flows_through_training_merging_and_evaluation(toy_dataset, tmp_path):
    import numpy as np

    from deme.data import heldout_split, training_batches
    from deme.heldout import paired_losses
    from deme.metrics import reference_size
    from deme.models import load_unet
    from deme.sampling import gallery_samples
    from deme.stages import merge_stage, sample_quality_fn, validation_inputs
    from deme.train import train
    cfg = get_profile("smoke", dataset="bars", steps_per_range=1, heldout_every=0, checkpoint_every=1,
                      log_every=1, validation_size=20, merge_grid=(0.0, 1.0))
    images, labels = _bars("train")
    by_hand = torch.from_numpy(images).float()[:, None] / 255 * 2 - 1      # [0, 255] -> [-1, 1], already 8 px
    x, y = training_batches(cfg, 16, seed=0).batch(0)                        # training sees the toy images
    match = (x[:, None] - by_hand[None]).abs().flatten(2).amax(2) < 1e-6     # (batch, dataset) equal pairs
    assert match.any(1).all() and all(int(labels[match[i].nonzero()[0, 0]]) == int(y[i]) for i in range(16))
    test_images, _ = _bars("test")
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(1234))
    val_x, _ = validation_inputs(cfg)                                       # the merge search's images
    assert torch.allclose(val_x, torch.from_numpy(test_images).float()[perm[:20], None] / 255 * 2 - 1, atol=1e-6)
    assert len(heldout_split(cfg, "evaluation")[0]) == 40 and reference_size(cfg, "test", 10_000) == 60

    base = train(cfg.replace(method="pretrain", pretrain_steps=2), tmp_path / "runs" / "smoke" / "base",
                 progress=False)
    for i in range(cfg.num_ranges):
        train(cfg.replace(method="deme", range_index=i), progress=False)
    res = merge_stage(cfg, rounds=1, progress=False)
    assert (res.folder / "model" / "config.json").exists() and "__dataset=bars" in res.folder.name
    merged = load_unet(res.folder / "model")

    score, criterion = sample_quality_fn(cfg, n=8, steps=2)                 # the toy's quality criterion
    assert criterion.startswith("classifier FD") and np.isfinite(score(merged))
    assert (tmp_path / "runs" / "smoke" / "classifier.pt").exists()
    losses = paired_losses({"base": lambda: load_unet(base / "model"), "merged": lambda: merged}, cfg,
                           cache_dir=tmp_path / "heldout", progress=False)
    assert losses["merged"]["unconditional"].shape == (cfg.heldout_draws, 40)   # the toy's evaluation part
    _, rows = gallery_samples(cfg.replace(sample_steps=2), {"merged": merged}, per_prompt=1)
    assert rows == [f"a picture of bar {k}" for k in range(10)]


def test_an_unknown_dataset_names_the_registered_ones():
    from deme.data import training_batches
    with pytest.raises(ValueError, match="registered datasets: digits, fmnist"):
        training_batches(get_profile("smoke", dataset="nope"), 4, 0)
