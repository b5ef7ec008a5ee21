"""Learned merge weights (deme.learned, docs/method.md §3.1): toys with known optima, the criterion shared with the
coordinate search, w = 0 giving the base, and the registry path notebook 06's merge-method table takes."""

import json

import pytest
import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn
from torch.func import functional_call

from deme import ablation as AB
from deme import learned as L
from deme import merge as M
from deme.config import get_profile
from deme.heldout import heldout_losses, validation_inputs
from deme.models import build_unet, with_projections

CFG = get_profile("smoke")


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))


class ToyDenoiser(nn.Module):
    """ε̂ = a·x_t on channel 0 and c·x_t on channel 1, with a in ``down_blocks.0`` and c in ``up_blocks.0``: the
    loss is a quadratic in each, minimised by the least-squares slope of ε on x_t."""

    def __init__(self, a: float = 0.0, c: float = 0.0):
        super().__init__()
        self.down_blocks, self.up_blocks = nn.ModuleList([Scale()]), nn.ModuleList([Scale()])
        with torch.no_grad():
            self.down_blocks[0].weight.fill_(a)
            self.up_blocks[0].weight.fill_(c)

    def forward(self, x, t):
        return UNet2DOutput(sample=torch.stack([self.down_blocks[0].weight * x[:, 0],
                                                self.up_blocks[0].weight * x[:, 1]], 1))


def _toy_data(n=400):
    """Two-channel images and the least-squares slopes (a*, c*) of ε on x_t under the fit's own noise and timesteps
    (computed here from the scheduler's closed form, not by the code under test)."""
    from deme.heldout import draw_inputs
    from deme.models import make_scheduler
    images = torch.rand((n, 2, 4, 4), generator=torch.Generator().manual_seed(3)) * 2 - 1
    noise, t = draw_inputs(n, (2, 4, 4), (0, CFG.num_train_timesteps))
    abar = make_scheduler(CFG).alphas_cumprod[t].view(-1, 1, 1)
    x_t = abar.sqrt() * images.transpose(0, 1) + (1 - abar).sqrt() * noise.transpose(0, 1)   # (2, n, 4, 4)
    eps = noise.transpose(0, 1)
    slopes = [(x_t[c] * eps[c]).sum() / x_t[c].pow(2).sum() for c in (0, 1)]
    return images, [s.item() for s in slopes]


def _fit(base, experts, images, **kw):
    sds = [e.state_dict() for e in experts]
    return L.fit_merge_weights(base, base.state_dict(), sds, CFG, images, None, device="cpu", **kw)


def test_block_groups_of_a_unets_parameters():
    assert L.block_group("down_blocks.1.resnets.0.conv1.weight") == "down_blocks.1"
    assert L.block_group("up_blocks.0.channel_projection.weight") == "up_blocks.0"
    assert L.block_group("mid_block.attentions.0.to_q.weight") == "mid_block"
    assert L.block_group("conv_in.weight") == "conv_in" and L.block_group("time_embedding.linear_1.bias") == \
        "time_embedding"
    unet = with_projections(build_unet(CFG))
    groups = dict.fromkeys(map(L.block_group, unet.state_dict()))
    assert list(groups) == ["conv_in", "time_embedding", "class_embedding", "down_blocks.0", "down_blocks.1",
                            "up_blocks.0", "up_blocks.1", "mid_block", "conv_norm_out", "conv_out"]


def test_learned_weights_recover_the_one_expert_that_lowers_the_loss():
    """Expert 0 moves both slopes to their optimum, experts 1 and 2 move them the wrong way: θ(w) = (w_0 − w_1 −
    ½w_2)·(a*, c*), whose only minimum in [0, 1]³ is w = (1, 0, 0). From 1/3 each, expert 0's weight goes up to 1,
    the others' to exactly 0 (clamped), and the loss falls to the least-squares optimum."""
    images, (a, c) = _toy_data()
    base = ToyDenoiser()
    experts = [ToyDenoiser(a, c), ToyDenoiser(-a, -c), ToyDenoiser(-a / 2, -c / 2)]
    fit = _fit(base, experts, images, steps=60, lr=0.05)
    w = fit.weights["all"]
    assert w[0] == pytest.approx(1.0, abs=0.02) and w[1] == 0.0 and w[2] == 0.0, w
    assert fit.losses[0] > min(fit.losses) and fit.steps == 60 and len(fit.losses) == 61 and fit.seconds > 0
    with torch.no_grad():
        best = heldout_losses(ToyDenoiser(a, c), CFG, images, None)[0].mean().item()
    assert min(fit.losses) == pytest.approx(best, rel=1e-4)


def test_layerwise_weights_take_each_block_from_the_expert_that_is_right_there():
    """Expert 0 is right in down_blocks.0 and wrong in up_blocks.0, expert 1 the reverse: one weight per range
    cannot tell them apart (w_0 − w_1 scales one block's slope up and the other's down, so it stays near 0; the
    two channels' optima differ a little), one per range and block takes each block from its right expert:
    down (1, 0), up (0, 1)."""
    images, (a, c) = _toy_data()
    base, experts = ToyDenoiser(), [ToyDenoiser(a, -c), ToyDenoiser(-a, c)]
    per_range = _fit(base, experts, images, steps=40, lr=0.05)
    layerwise = _fit(base, experts, images, steps=40, lr=0.05, layerwise=True)
    assert per_range.weights["all"][0] == pytest.approx(per_range.weights["all"][1], abs=0.05)
    down, up = layerwise.weights["down_blocks.0"], layerwise.weights["up_blocks.0"]
    assert down[0] == pytest.approx(1, abs=0.02) and down[1] == 0 and up[0] == 0 and up[1] == pytest.approx(1, abs=0.02)
    assert min(layerwise.losses) < 0.99 * min(per_range.losses)
    # the merged state dict takes each tensor's weights from its block
    merged = M.task_arithmetic(base.state_dict(), [e.state_dict() for e in experts], layerwise.of)
    assert merged["down_blocks.0.weight"].item() == pytest.approx(down[0] * a - down[1] * a)
    assert merged["up_blocks.0.weight"].item() == pytest.approx(-up[0] * c + up[1] * c)


def _unets(n=2):
    """A base and n experts of the smoke architecture, projections included: independently initialised models."""
    torch.manual_seed(0)
    base, *experts = (with_projections(build_unet(CFG)).eval() for _ in range(n + 1))
    return base, experts


def test_weights_zero_give_the_base_model_exactly():
    base, experts = _unets()
    b = base.state_dict()
    floats = {k: v for k, v in b.items() if v.is_floating_point()}
    taus = {k: torch.stack([e.state_dict()[k] - v for e in experts]) for k, v in floats.items()}
    params = L.merged_tensors(floats, taus, torch.zeros(1, 2), dict.fromkeys(floats, 0))
    assert all(torch.equal(params[k], v) for k, v in floats.items())
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 300, 600, 999]), torch.tensor([0, 3, 10, 10])
    with torch.no_grad():
        out = functional_call(experts[0], {**b, **params}, (x, t), {"class_labels": y}).sample
        assert torch.equal(out, base(x, t, class_labels=y).sample)
    zero = L.LearnedWeights({"all": (0.0, 0.0)}, [], 0.0, 0, "cpu")
    merged = M.task_arithmetic(b, [e.state_dict() for e in experts], zero.of)
    assert all(torch.equal(merged[k], v) for k, v in b.items())


def test_the_fit_scores_the_coordinate_searchs_criterion():
    """Before any step the fit's loss is the held-out loss of the uniform merge on the validation inputs, as
    deme.heldout.heldout_losses (the coordinate search's score) computes it."""
    base, experts = _unets()
    x, cond = validation_inputs(CFG)
    sds = [e.state_dict() for e in experts]
    fit = L.fit_merge_weights(experts[0], base.state_dict(), sds, CFG, x, cond, steps=0, device="cpu")
    uniform = M.merged_model(experts[0], M.task_arithmetic(base.state_dict(), sds, [0.5, 0.5]))
    assert fit.losses[0] == pytest.approx(heldout_losses(uniform, CFG, x, cond)[0].mean().item(), rel=1e-5)
    assert fit.weights == {"all": (0.5, 0.5)} and len(fit.losses) == 1


def test_learned_methods_are_registered_and_merged_through_the_same_path(monkeypatch, tmp_path):
    """notebook 06's path (deme.ablation.merge_models): the learned entries are registry entries that take the
    validation data; a second call finds the fit kept under the merge folder instead of fitting again."""
    base, experts = _unets()
    cfg = CFG.replace(merge_learn_steps=2)
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    monkeypatch.setattr(AB, "load_experts", lambda c: experts)
    monkeypatch.setattr(AB, "load_base", lambda c, projection: base)
    assert {"learned", "learned-layerwise"} <= set(M.MERGE_METHODS)
    fits = []
    real_fit = L.fit_merge_weights
    monkeypatch.setattr(L, "fit_merge_weights", lambda *a, **k: fits.append(k["layerwise"]) or real_fit(*a, **k))
    merged = AB.merge_models(cfg, ["learned", "learned-layerwise"])
    assert list(merged) == [M.MERGE_METHODS["learned"].label, M.MERGE_METHODS["learned-layerwise"].label]
    assert fits == [False, True]
    kept = sorted(p.name for p in tmp_path.rglob("learned*.json"))
    assert len(kept) == 2 and sum(k.startswith("learned_layerwise_") for k in kept) == 1
    record = json.loads(next(tmp_path.rglob("learned_[0-9a-f]*.json")).read_text())
    w = record["weights"]["all"]
    sds = [e.state_dict() for e in experts]
    want = M.task_arithmetic(base.state_dict(), sds, w)
    assert all(torch.equal(v, want[k]) for k, v in merged[M.MERGE_METHODS["learned"].label].state_dict().items())
    AB.merge_models(cfg, ["learned"])
    assert fits == [False, True]                                             # kept: not fitted again
    with pytest.raises(ValueError, match="fits its weights"):
        M.MERGE_METHODS["learned"](base.state_dict(), sds)


def test_merge_costs_put_the_learned_fits_beside_the_coordinate_search(monkeypatch, tmp_path):
    from deme.runs import merge_dir, write_json
    from deme.stages import merge_costs
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    write_json(merge_dir(CFG) / "weights.json", {"weights": [0.5, 0.5], "seconds": 12.5, "evaluations": 9,
                                                 "device": "cpu"})
    fit = L.LearnedWeights({"all": (0.2, 0.9)}, [1.0, 0.9, 0.8], 30.0, 2, "cpu")
    table = merge_costs(CFG, {"learned": fit}).set_index("method")
    assert table.loc["coordinate search (04)", "seconds"] == 12.5 and table.loc["coordinate search (04)",
                                                                                  "forward passes"] == 9
    assert table.loc["learned", "seconds"] == 30.0 and table.loc["learned", "forward passes"] == 3
    assert table.loc["learned", "backward passes"] == 2


def test_the_paper_weights_are_a_merge_method_for_four_ranges_only(monkeypatch):
    """The paper's w = (0.1, 0.1, 0.2, 0.5) as a registry entry: θ + Σ w_i τ_i computed here by hand; the
    merge-method table lists it for N = 4 and leaves it out for the smoke profile's N = 2."""
    torch.manual_seed(0)
    base = {"a": torch.randn(3), "step": torch.tensor(7)}
    experts = [{"a": torch.randn(3), "step": torch.tensor(7)} for _ in range(4)]
    merged = M.MERGE_METHODS["paper"](base, experts)
    want = base["a"].double() + sum(w * (e["a"].double() - base["a"].double())
                                     for w, e in zip((0.1, 0.1, 0.2, 0.5), experts))
    assert torch.allclose(merged["a"].double(), want, atol=1e-6) and merged["step"] == 7
    assert M.MERGE_METHODS["paper"].applies(4) and not M.MERGE_METHODS["paper"].applies(2)
    assert "paper" in AB._applicable(CFG.replace(num_ranges=4)) and "paper" not in AB._applicable(CFG)


def _fake_losses(scale):
    """paired_losses standing in: per-image losses of every model as ``scale[name]`` × a fixed vector."""
    import numpy as np

    def fake(models, cfg, part, progress=False):
        t = np.array([100, 300, 600, 900] * 50)
        base = np.linspace(1.0, 2.0, len(t))
        return {name: {"unconditional": base * scale.get(name, 1.0), "t": t} for name in models}
    return fake


def test_learned_merges_are_compared_pairwise_with_searched_and_uniform(monkeypatch):
    """learned_merge_pairs: every learned row against each reference, Δ% = 100·(ratio − 1) when one model's
    per-image losses are another's times a constant (an exact answer, the interval collapses onto it)."""
    searched, uniform = AB.SEARCHED, M.MERGE_METHODS["uniform"].label
    learned, layerwise = (M.MERGE_METHODS[m].label for m in M.LEARNED)
    scale = {searched: 1.0, uniform: 1.02, learned: 0.99, layerwise: 0.98}
    monkeypatch.setattr(AB, "paired_losses", _fake_losses(scale))
    monkeypatch.setattr(AB, "merge_models", lambda cfg, methods: {m: None for m in methods})
    table = AB.learned_merge_pairs(CFG)
    assert set(table.reference) == {searched, uniform} and set(table.model) == {learned, layerwise}
    rows = table[(table["range"] == "all")].set_index(["model", "reference"])
    for (model, ref), row in rows.iterrows():
        want = 100 * (scale[model] / scale[ref] - 1)
        assert row.delta_pct == pytest.approx(want, abs=1e-9)
        assert row.ci95_low == pytest.approx(want, abs=1e-6) and row.ci95_high == pytest.approx(want, abs=1e-6)


def test_the_merge_methods_command_fits_scores_and_writes_its_tables(monkeypatch, tmp_path, capsys):
    """`python -m deme merge-methods`: the learned fits (their cost beside the search's), notebook 06's
    merge-method table and the learned-vs-searched/uniform table, written beside the figures."""
    import pandas as pd

    from deme import stages
    from deme.cli import main
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    fits = []

    def fake_fit(cfg, layerwise=False, **kw):
        fits.append(layerwise)
        return L.LearnedWeights({"all": (0.5, 0.5)}, [1.0], 3.0, 1, "cpu", layerwise)
    learned = M.MERGE_METHODS["learned"].label
    monkeypatch.setattr(stages, "learned_merge_weights", fake_fit)
    monkeypatch.setattr(AB, "paired_losses", _fake_losses({learned: 0.99}))
    monkeypatch.setattr(AB, "merge_models", lambda cfg, methods: {m: None for m in methods})
    monkeypatch.setattr(AB, "load_base", lambda cfg, projection: None)
    monkeypatch.setattr(AB, "load_ensemble", lambda cfg: None)
    main(["merge-methods", "--profile", "smoke"])
    assert fits == [False, True]
    figures = tmp_path / "runs" / "smoke" / "figures"
    table = pd.read_csv(figures / "merge_methods_smoke.csv")
    assert {learned, AB.SEARCHED, "ensemble (before merge)"} <= set(table.model)
    assert {"ci95_low", "ci95_high"} <= set(table.columns)
    row = table[(table.model == learned) & (table["range"] == "all")].iloc[0]
    assert row.delta_pct == pytest.approx(-1.0)
    assert set(pd.read_csv(figures / "merge_learned_smoke.csv").reference) == {AB.SEARCHED,
                                                                               M.MERGE_METHODS["uniform"].label}
    costs = pd.read_csv(figures / "merge_costs_smoke.csv")
    assert list(costs.method) == [learned, M.MERGE_METHODS["learned-layerwise"].label]
    assert "learned w (per range × block)" in capsys.readouterr().out


def test_notebook_04s_fits_are_the_ones_the_merge_method_table_merges_with(monkeypatch, tmp_path):
    """stages.learned_merge_fits (notebook 04) keeps both fits where deme.ablation.merge_models (notebook 06)
    finds them: 06 fits nothing again and merges with 04's weights."""
    from deme import stages
    base, experts = _unets()
    cfg = CFG.replace(merge_learn_steps=1)
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    for module in (stages, AB):
        monkeypatch.setattr(module, "load_experts", lambda c: experts)
        monkeypatch.setattr(module, "load_base", lambda c, projection: base)
    fits = stages.learned_merge_fits(cfg, device="cpu", progress=False)
    assert list(fits) == [M.MERGE_METHODS[m].label for m in M.LEARNED]
    assert [f.layerwise for f in fits.values()] == list(M.LEARNED.values())
    monkeypatch.setattr(L, "fit_merge_weights", lambda *a, **k: pytest.fail("fitted again"))
    merged = AB.merge_models(cfg, list(M.LEARNED))
    sds = [e.state_dict() for e in experts]
    for label, fit in fits.items():
        want = M.task_arithmetic(base.state_dict(), sds, fit.of)
        assert all(torch.equal(v, want[k]) for k, v in merged[label].state_dict().items())
