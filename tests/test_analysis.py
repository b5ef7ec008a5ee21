"""deme.analysis against independent computations: hand-built conflicting gradients, exact vs sketched cosines,
landscape origins vs hand-computed losses, filter norms, hand-computed task-vector statistics, plane corners."""

import copy
import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from deme import analysis as A
from deme import weightspace as W
from deme.config import get_profile
from deme.models import build_unet, make_scheduler, with_projections

torch.set_num_threads(1)
CFG = get_profile("smoke")
T = CFG.num_train_timesteps


class SignModel(nn.Module):
    """ε̂(x, t) = s(t)·w with s = +1 for t < T/2 and −1 otherwise, w = 0: the ε-MSE gradient is
    −2 s(t)·mean_b ε_b/(C·H·W), so gradients at the two halves point in exactly opposite directions."""

    def __init__(self, shape=(1, 4, 4)):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(shape))

    def forward(self, x, t, **kw):
        s = torch.where(torch.as_tensor(t) < T // 2, 1.0, -1.0).reshape(-1, 1, 1, 1)
        return SimpleNamespace(sample=s * self.w + 0 * x)


class TinyNet(nn.Module):
    """A small time-conditioned conv net (a few hundred parameters) with diffusers' output convention."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.temb = nn.Linear(4, 6)
        self.conv2 = nn.Conv2d(6, 1, 3, padding=1)

    def forward(self, x, t, **kw):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1) / T
        emb = torch.stack([torch.sin(3 * t), torch.cos(3 * t), torch.sin(9 * t), torch.cos(9 * t)], 1)
        h = torch.nn.functional.silu(self.conv1(x) + self.temb(emb)[:, :, None, None])
        return SimpleNamespace(sample=self.conv2(h))


def smoke_unet(seed=0, projection=False):
    torch.manual_seed(seed)
    return build_unet(CFG, projection=projection).eval()


def batch(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, CFG.image_size, CFG.image_size, generator=g) * 2 - 1
    y = torch.randint(0, CFG.num_classes, (n,), generator=g)
    return x, y


def hand_loss(model, images, labels, t, seed):
    """The ε-MSE written out: x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε with ε from ``seed``."""
    eps = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    ac = make_scheduler(CFG).alphas_cumprod[t].reshape(-1, 1, 1, 1)
    xt = ac.sqrt() * images + (1 - ac).sqrt() * eps
    with torch.no_grad():
        out = model(xt, t, class_labels=labels).sample if labels is not None else model(xt, t).sample
    return ((out - eps) ** 2).mean().item()


# -- gradient similarity ------------------------------------------------------------------------------------

def test_similarity_matrix_is_symmetric_with_unit_diagonal():
    x, y = batch(4)
    sim, info = A.gradient_similarity(smoke_unet(), CFG, x, y, [10, 300, 600, 990], seed=0)
    assert sim.shape == (4, 4)
    np.testing.assert_array_equal(sim, sim.T)
    np.testing.assert_array_equal(np.diag(sim), np.ones(4))
    assert np.all(np.abs(sim) <= 1) and len(info["grad_norm"]) == 4 and np.all(info["grad_norm"] > 0)


def test_conflicting_timesteps_give_cosine_minus_one():
    x = torch.randn(5, 1, 4, 4)
    sim, _ = A.gradient_similarity(SignModel(), CFG, x, None, [100, 200, 700, 900], seed=3)
    expected = np.array([[1, 1, -1, -1], [1, 1, -1, -1], [-1, -1, 1, 1], [-1, -1, 1, 1]], float)
    np.testing.assert_allclose(sim, expected, atol=1e-6)
    s = A.similarity_summary(sim, [100, 200, 700, 900], T)
    assert s["negative_fraction"] == pytest.approx(4 / 6) and s["min"] == pytest.approx(-1, abs=1e-6)
    assert s["adjacent_mean"] == pytest.approx((1 - 1 + 1) / 3, abs=1e-6)
    # pairs >= 500 apart: (100,700),(100,900),(200,700),(200,900)
    assert s["distant_mean"] == pytest.approx(-1, abs=1e-6)
    np.testing.assert_allclose(s["early_pairs"], [1.0], atol=1e-6)  # only (100, 200) lies inside [0, 250)


def test_split_half_reliability_of_a_structure_that_does_not_depend_on_the_draw():
    # SignModel's gradients agree or conflict exactly by the half of [0, T) whatever the images and noise: both
    # halves give the same ±1 matrix, so their correlation is 1
    x = torch.randn(10, 1, 4, 4)
    r, a, b = A.split_half_reliability(SignModel(), CFG, x, None, [100, 200, 600, 700, 900], seed=3)
    np.testing.assert_allclose(a, b, atol=1e-6)
    assert r == pytest.approx(1.0, abs=1e-9)
    # a real (tiny) model: two symmetric matrices, a correlation in [-1, 1]
    xs, ys = batch(4)
    r, a, b = A.split_half_reliability(smoke_unet(), CFG, xs, ys, [10, 300, 600, 990])
    assert -1 <= r <= 1 and a.shape == b.shape == (4, 4) and not np.allclose(a, b)
    with pytest.raises(ValueError, match="two images"):
        A.split_half_reliability(SignModel(), CFG, x[:1], None, [100, 900])


def test_gradients_are_taken_wrt_all_parameters_and_flags_restored():
    net = TinyNet()
    net.conv1.requires_grad_(False)
    x = torch.randn(4, 1, 5, 5)
    _, info = A.gradient_similarity(net, CFG, x, None, [50, 500], seed=0)
    assert info["num_parameters"] == sum(p.numel() for p in net.parameters())
    assert not net.conv1.weight.requires_grad and net.conv2.weight.requires_grad
    assert all(p.grad is None for p in net.parameters())


def test_gaussian_sketch_preserves_cosines_within_jl_tolerance():
    x = torch.randn(6, 1, 5, 5)
    ts = [20, 150, 400, 700, 950]
    exact, _ = A.gradient_similarity(TinyNet(), CFG, x, None, ts, seed=1)
    d = 4096
    sk, info = A.gradient_similarity(TinyNet(), CFG, x, None, ts, seed=1, projection_dim=d)
    # JL: the cosine estimate has std about (1 − c²)/√d ≤ 1/64; allow 5 standard deviations
    assert np.abs(sk - exact).max() < 5 / math.sqrt(d)
    assert info["projection_dim"] == d and exact.min() < 0.9    # non-trivial geometry was checked


def test_gaussian_sketch_is_linear_deterministic_and_chunk_streamed():
    g = torch.Generator().manual_seed(0)
    a = [torch.randn(3, 50, generator=g), torch.randn(7, generator=g)]
    b = [torch.randn(3, 50, generator=g), torch.randn(7, generator=g)]
    sketch = A.GaussianSketch(64, seed=5, max_block=64 * 16)        # 16 columns per block: many chunks
    sa, sb = sketch(a), sketch(b)
    torch.testing.assert_close(sketch([u + v for u, v in zip(a, b)]), sa + sb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sketch(a), sa, rtol=0, atol=0)
    # the sketch is R x /√d with R the concatenation of the regenerated blocks: rebuild R column by column
    cols = torch.cat([sketch([torch.eye(157)[i, :150].reshape(3, 50), torch.eye(157)[i, 150:]]).unsqueeze(1)
                      for i in range(157)], 1)
    flat = torch.cat([t.reshape(-1) for t in a]).double()
    torch.testing.assert_close(cols @ flat, sa, rtol=1e-6, atol=1e-6)


def test_timestep_grid_and_stratification():
    np.testing.assert_array_equal(A.timestep_grid(1000, 4), [125, 375, 625, 875])
    from deme.timesteps import stratified_timesteps
    t = stratified_timesteps(8, (250, 500))
    assert t.min() >= 250 and t.max() < 500
    np.testing.assert_array_equal(t, [265, 296, 328, 359, 390, 421, 453, 484])


# -- landscapes ---------------------------------------------------------------------------------------------

def test_landscape_origin_equals_the_models_loss_computed_independently():
    from deme.train import heldout_loss
    model = smoke_unet(1)
    x, y = batch(8, seed=1)
    d1, d2 = W.filter_normalized_direction(model, 1), W.filter_normalized_direction(model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    coords = np.array([-0.2, 0.0, 0.2])
    z = W.loss_landscape_2d(model, CFG, x, y, d1, d2, coords, seed=7)
    assert z.shape == (3, 3)
    # full range: heldout_loss draws the same noise and stratified timesteps
    assert z[1, 1] == pytest.approx(heldout_loss(model, CFG, x, y, seed=7)["loss"], rel=1e-5)
    t_full = ((torch.arange(8) + 0.5) * T / 8).long()
    assert z[1, 1] == pytest.approx(hand_loss(model, x, y, t_full, 7), rel=1e-5)
    # a sub-range: timesteps lo + ⌊(j + ½)(hi − lo)/n⌋
    zr = W.loss_landscape_2d(model, CFG, x, y, d1, d2, (np.array([0.0, 0.3]), np.array([0.0])), (500, 750), seed=7)
    t_sub = 500 + ((torch.arange(8) + 0.5) * 250 / 8).long()
    assert zr[0, 0] == pytest.approx(hand_loss(model, x, y, t_sub, 7), rel=1e-5)
    # weights restored; a grid point equals the loss of θ + α d1 set by hand
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for k, p in moved.named_parameters():
            p.add_(0.3 * d1[k])
    assert zr[1, 0] == pytest.approx(hand_loss(moved, x, y, t_sub, 7), rel=1e-4)
    assert zr[1, 0] != zr[0, 0]                             # an untrained model: no basin to expect


def test_filter_normalized_direction_matches_filter_norms():
    model = smoke_unet(2, projection=True)
    d = W.filter_normalized_direction(model, seed=0)
    params = dict(model.named_parameters())
    assert set(d) == set(params)
    for k, p in params.items():
        w = p.detach()
        if w.dim() <= 1:
            assert torch.count_nonzero(d[k]) == 0, k
            continue
        torch.testing.assert_close(d[k].reshape(len(w), -1).norm(dim=1), w.reshape(len(w), -1).norm(dim=1),
                                   rtol=1e-5, atol=1e-6)
    assert not torch.equal(d["conv_in.weight"], params["conv_in.weight"].detach())   # random, not a copy
    d_w = W.filter_normalized_direction(model, seed=0, one_dim="weight")
    torch.testing.assert_close(d_w["conv_in.bias"], params["conv_in.bias"].detach())
    torch.testing.assert_close(d_w["conv_in.weight"], d["conv_in.weight"])            # same seed, same draw


def test_task_vector_plane_corners_equal_the_models_losses():
    base = smoke_unet(3)
    experts = []
    for s in (1, 2):
        e = with_projections(copy.deepcopy(base))
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for p in e.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        experts.append(e.eval())
    x, y = batch(6, seed=2)
    z = W.task_vector_plane_loss(base, experts[0], experts[1], CFG, x, y, np.array([0.0, 0.5, 1.0]), seed=4)
    t = ((torch.arange(6) + 0.5) * T / 6).long()
    assert z[0, 0] == pytest.approx(hand_loss(base, x, y, t, 4), rel=1e-5)
    assert z[2, 0] == pytest.approx(hand_loss(experts[0], x, y, t, 4), rel=1e-5)
    assert z[0, 2] == pytest.approx(hand_loss(experts[1], x, y, t, 4), rel=1e-5)
    mid = A.fixed_batch_loss(base, CFG, x, y, seed=4)
    assert z[0, 0] == pytest.approx(mid, rel=1e-6)


# -- activation changes -------------------------------------------------------------------------------------

def test_activation_changes_of_a_channel_scaled_block():
    base = smoke_unet(4)
    ft = with_projections(copy.deepcopy(base)).eval()
    C = ft.mid_block.channel_projection.weight.shape[0]
    delta = torch.linspace(0, 0.5, C)
    with torch.no_grad():
        ft.mid_block.channel_projection.weight.copy_(torch.diag(1 + delta))
    x, y = batch(3, seed=3)
    ch = A.activation_changes(base, ft, CFG, x, y, t=400, seed=0)
    assert list(ch)[:3] == ["down_blocks.0", "down_blocks.1", "mid_block"]
    for name in ("down_blocks.0", "down_blocks.1"):            # upstream of the change: nothing moves
        assert np.abs(ch[name]["per_channel"]).max() == 0 and np.abs(ch[name]["per_position"]).max() == 0
    # the mid block's change is δ_c·A_c: per channel = δ_c · mean_hw |A_c|, per position = mean_c δ_c |A_c|
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    xt = make_scheduler(CFG).add_noise(x, eps, torch.full((3,), 400))
    act = A.block_activations(base, xt, torch.full((3,), 400), y, ["mid_block"])["mid_block"]
    B, _, H, W = act.shape
    per_channel = (delta[None, :] * act.abs().mean(dim=(2, 3))).reshape(-1)
    per_position = (delta[None, :, None, None] * act.abs()).mean(1).reshape(-1)
    np.testing.assert_allclose(ch["mid_block"]["per_channel"], per_channel.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ch["mid_block"]["per_position"], per_position.numpy(), rtol=1e-4, atol=1e-6)
    assert ch["mid_block"]["per_channel"].size == B * C and ch["mid_block"]["per_position"].size == B * H * W
    summary = A.activation_change_summary({"mid_block": ch["mid_block"]})
    assert summary.loc[0, "cv_ratio"] > 1                  # channel-wise change shows as a wider per-channel spread
    assert summary.loc[0, "cv_ratio"] > summary.loc[0, "cv_ratio_shuffled"]   # ... than with no structure at all
    assert sorted(ch["mid_block"]["per_channel_shuffled"].round(5)) != sorted(per_channel.numpy().round(5))


# -- task-vector statistics ---------------------------------------------------------------------------------

def test_task_vector_stats_hand_computed():
    base = nn.Linear(2, 2)
    with torch.no_grad():
        base.weight.zero_()
        base.bias.zero_()
    e1, e2 = copy.deepcopy(base), copy.deepcopy(base)
    with torch.no_grad():
        e1.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        e1.bias.copy_(torch.tensor([-1.0, 1.0]))
        e2.weight.copy_(torch.tensor([[-2.0, 0.0], [0.0, 2.0]]))
    st = W.task_vector_stats(base, [e1, e2])
    r = st.set_index(["layer", "range"])
    w1 = r.loc[("weight", 0)]
    assert (w1.n, w1["mean"], w1.q0, w1.q100) == (4, 2.5, 1.0, 4.0)
    assert w1["std"] == pytest.approx(math.sqrt(1.25))
    assert w1.q25 == pytest.approx(1.75) and w1.q50 == pytest.approx(2.5)
    assert w1.abs_mean == pytest.approx(2.5) and w1.q5 == pytest.approx(1.15)      # 1 + 0.05·3
    b1 = r.loc[("bias", 0)]
    assert b1["mean"] == 0 and b1.abs_mean == 1 and b1.q0 == -1 and b1.q100 == 1
    w2 = r.loc[("weight", 1)]
    assert w2["mean"] == 0 and w2.abs_mean == 1 and w2.abs_max == 2 and w2.q50 == 0
    assert r.loc[("bias", 1)].abs_max == 0
    grouped = W.task_vector_stats(base, [e1], group=lambda k: "all")
    assert grouped.n.tolist() == [6] and grouped["mean"].iloc[0] == pytest.approx(10 / 6)


def test_task_vector_stats_counts_projections_from_identity():
    base = smoke_unet(5)
    ft = with_projections(copy.deepcopy(base))
    with torch.no_grad():
        ft.mid_block.channel_projection.weight.add_(0.5)
    st = W.task_vector_stats(base, [ft], group="block")
    mid = st.set_index("layer").loc["mid_block"]
    assert mid.abs_max == pytest.approx(0.5)
    assert st.set_index("layer").loc["conv_in"].abs_max == 0
    assert {"down_blocks.0", "mid_block", "up_blocks.1", "time_embedding"} <= set(st.layer)


# -- plots render -------------------------------------------------------------------------------------------

def test_plots_render(tmp_path, monkeypatch):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deme import plots
    sim = np.array([[1, 0.5, -0.2], [0.5, 1, 0.1], [-0.2, 0.1, 1.0]])
    s = A.similarity_summary(sim, [50, 150, 800], T)
    figs = [plots.plot_similarity_heatmap(sim, [50, 150, 800]), plots.plot_similarity_histograms(s)]
    z = {"[0, 1000)": np.arange(9.0).reshape(3, 3) + 1, "[0, 500)": np.ones((3, 3))}
    figs.append(plots.plot_landscapes(z, np.array([-1, 0, 1.0])))
    figs.append(plots.plot_task_vector_plane(np.arange(9.0).reshape(3, 3), np.array([0, 0.5, 1.0]), (0.3, 0.5)))
    figs.append(plots.plot_gradient_conflict({"a": (sim, [50, 150, 800]), "b": (-sim, [50, 150, 800])}, s, T, [500]))
    t = pd.DataFrame({"model": ["m1", "m2"], "delta": [-1.0, 0.5], "low": [-2.0, -0.5], "high": [-0.5, 1.5]})
    figs.append(plots.plot_paired_deltas({"FID": t, "alignment %": t}, lower_is_better={"alignment %": False}))
    ho = pd.DataFrame([{"model": m, "range": r, "condition": c, "delta_pct": d, "ci95_low": d - 1, "ci95_high": d + 1}
                       for m, d in (("Before finetuning", 0.0), ("x", -1.0)) for r in ("all", "0")
                       for c in ("unconditional", "conditional")])
    figs.append(plots.plot_heldout_by_range(ho))
    study = ho.assign(steps_per_range=[10, 10, 20, 20] * 2, kind=["a"] * 4 + ["b"] * 4)
    figs.append(plots.plot_budget_study(study))
    cands = pd.DataFrame({"weights": [(0.5, 0.0), (0.0, 0.0)], "kind": ["coordinate search", "base (reference)"],
                          "loss": [1.0, 1.1], "delta_pct": [-1.0, 0.0], "ci95_low": [-1.5, 0.0],
                          "ci95_high": [-0.5, 0.0]})
    figs.append(plots.plot_merge_search(cands))
    imgs = np.random.default_rng(1).integers(0, 255, (4, 8, 8, 1)).astype(np.uint8)
    figs.append(plots.plot_sample_rows({"base": imgs, "other": imgs[::-1]}, "base", ["row 0", "row 1"]))
    st = pd.DataFrame([{"layer": l, "range": r, "range_label": f"range {r}", "q5": -1, "q25": -.5, "q50": 0,
                        "q75": .5, "q95": 1} for l in ("a", "b") for r in (0, 1)])
    figs.append(plots.plot_task_vector_boxes(st))
    assert sorted(["up_blocks.10", "conv_out", "mid_block", "up_blocks.2", "conv_in"], key=plots.unet_order) == \
        ["conv_in", "mid_block", "up_blocks.2", "up_blocks.10", "conv_out"]
    rng = np.random.default_rng(0)
    figs.append(plots.plot_activation_changes({"mid_block": {"per_position": rng.random(20),
                                                             "per_channel": rng.random(8)}}))
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))             # figures_dir(smoke) = <root>/runs/smoke/figures
    paths = plots.save_figure(figs[0], CFG, "heat")
    assert all(p.parent == tmp_path / "runs" / "smoke" / "figures" for p in paths)
    assert all(p.exists() and p.stat().st_size > 0 for p in paths)
    assert W.landscape_summary(z, np.array([-1, 0, 1.0])).loc[0, "curvature_alpha"] == pytest.approx(0.0)
    plt.close("all")


def test_notebook_01_helpers_sizes_and_both_conditionings():
    assert A.analysis_sizes(CFG)["batch"] == A.ANALYSIS_SIZES["smoke"]["batch"]
    assert A.analysis_sizes(get_profile("fmnist"), batch=8)["batch"] == 8            # a given size wins
    assert A.analysis_sizes(get_profile("cifar10")) == A.ANALYSIS_SIZES["default"]
    with pytest.raises(ValueError, match="unknown analysis sizes"):
        A.analysis_sizes(CFG, batchsize=8)
    assert A.analysis_sizes(get_profile("cifar10").replace(analysis_sizes="smoke")) == A.ANALYSIS_SIZES["smoke"]
    assert all((s["plane_points"] - 1) % 4 == 0 for s in A.ANALYSIS_SIZES.values())   # Fig. 6a's grid has 0, 1
    with pytest.raises(ValueError, match="analysis_sizes='tiny' is not one of"):
        A.analysis_sizes(CFG.replace(analysis_sizes="tiny"))
    # SignModel ignores labels: both conditionings see the same exactly opposite gradients (cos ±1)
    images, labels = torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    cfg = CFG.replace(num_classes=10)
    panels = A.conflict_panels(SignModel(), cfg, images, labels, [100, 700], conditional=False)
    assert list(panels) == ["null label (unconditional)", "true labels"]
    for sim, _ in panels.values():
        np.testing.assert_allclose(sim, [[1, -1], [-1, 1]], atol=1e-6)
    assert list(A.conflict_panels(SignModel(), CFG.replace(num_classes=None), images, labels, [100, 700])) == \
        ["unconditional model"]
    table = A.similarity_table(panels, T)
    assert table.loc["min"].tolist() == pytest.approx([-1, -1]) and table.loc["negative_fraction"].tolist() == [1, 1]
