"""The six equal-budget baselines of docs/method.md §5: the SNR weightings (against diffusers' own ``compute_snr``) and
the ANT objectives of deme.mtl (clusters, uncertainty weighting, the Nash bargaining solution, training and
resuming through deme.train)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from deme.config import get_profile
from deme.losses import loss_weight, snr
from deme.models import make_scheduler
from deme.mtl import (
    NashMTLObjective,
    UncertaintyWeightingObjective,
    cluster_bounds,
    interval_clusters,
    make_ant_objective,
    solve_nash,
)

T = 1000
TS = torch.tensor([0, 1, 10, 250, 500, 999])


# ---------------------------------------------------------------------------------------------------------
# SNR weightings: deme.losses.loss_weight against docs/method.md §5 computed from diffusers' compute_snr
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddpm():
    return DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)


@pytest.mark.parametrize("method,kw,formula", [
    ("snr+1", {}, lambda s: 1 + 1 / s),
    ("trunc-snr", {}, lambda s: torch.maximum(torch.ones_like(s), 1 / s)),
    ("min-snr", {"min_snr_gamma": 5.0}, lambda s: torch.minimum(torch.ones_like(s), 5.0 / s)),
    ("p2", {"p2_k": 1.0, "p2_gamma": 1.0}, lambda s: 1 / (1 + s)),
    ("p2", {"p2_k": 1.0, "p2_gamma": 0.5}, lambda s: 1 / torch.sqrt(1 + s)),
])
def test_snr_weights_match_paper_formulas(ddpm, method, kw, formula):
    reference = formula(compute_snr(ddpm, TS).double())
    ours = loss_weight(method, snr(ddpm.alphas_cumprod, TS), **kw).double()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=0)


def test_snr_weights_regimes(ddpm):
    s = compute_snr(ddpm, TS)
    assert s[0] > 5 and s[-1] < 1e-4   # high SNR at t=0, ~4e-5 at t=999 (docs/method.md §5 note)
    w = loss_weight("trunc-snr", snr(ddpm.alphas_cumprod, TS))
    assert w[0] == 1 and w[-1] > 2e4
    w = loss_weight("min-snr", snr(ddpm.alphas_cumprod, TS))
    assert w[-1] == 1 and w[0] < 1
    for m in ("standard", "ant-uw", "ant-nash"):
        assert (loss_weight(m, s) == 1).all()


# ---------------------------------------------------------------------------------------------------------
# ANT timestep clusters
# ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_clusters_are_contiguous_and_cover(k):
    bounds = cluster_bounds(T, k)
    assert len(bounds) == k and bounds[0][0] == 0 and bounds[-1][1] == T
    assert all(bounds[i][1] == bounds[i + 1][0] for i in range(k - 1))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == T
    owners = [[i for i, (lo, hi) in enumerate(bounds) if lo <= t < hi] for t in range(T)]
    assert all(len(o) == 1 for o in owners)


def test_equal_clusters_are_the_interval_clustering_of_timesteps():
    # 1-D k-means over contiguous intervals of t = 0..T-1: equal sizes are optimal (n(n²-1)/12 is convex)
    assert interval_clusters(np.arange(T), 5) == [(0, 200), (200, 400), (400, 600), (600, 800), (800, 1000)]
    log_snr = np.log(compute_snr(DDPMScheduler(num_train_timesteps=T), torch.arange(T)).numpy())
    b = interval_clusters(log_snr, 5)
    assert b[0][0] == 0 and b[-1][1] == T and all(b[i][1] == b[i + 1][0] for i in range(4))


def test_ant_timesteps_sample_j_in_cluster_j_mod_k():
    cfg = get_profile("smoke", method="ant-uw", ant_clusters=5)
    obj = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    t = obj.timesteps(1000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.device.type == "cpu" and t.shape == (1000,)
    for j, tj in enumerate(t.tolist()):
        lo, hi = 200 * (j % 5), 200 * (j % 5 + 1)
        assert lo <= tj < hi
    for c in range(5):   # uniform inside the cluster: both ends reached
        tc = t[c::5]
        assert tc.min() < 200 * c + 10 and tc.max() >= 200 * (c + 1) - 10
    again = obj.timesteps(1000, torch.Generator().manual_seed(0))
    assert torch.equal(t, again)


def test_ant_needs_one_sample_per_cluster():
    cfg = get_profile("smoke", method="ant-nash", batch_size=4, ant_clusters=5)
    with pytest.raises(ValueError, match="at least one sample per timestep cluster"):
        make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)


# ---------------------------------------------------------------------------------------------------------
# ANT-UW
# ---------------------------------------------------------------------------------------------------------

def _uw_batch(obj, L):
    """eps-MSE values whose per-cluster means are exactly ``L`` (4 samples per cluster)."""
    k = len(L)
    t = obj.timesteps(4 * k, torch.Generator().manual_seed(1))
    j = torch.arange(4 * k)
    vals = torch.tensor(L, dtype=torch.float32)[j % k] * torch.where((j // k) % 2 == 0, 1.5, 0.5)
    return vals.requires_grad_(), t


def test_uw_value_gradient_and_minimiser():
    cfg = get_profile("smoke", method="ant-uw")
    obj = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    assert isinstance(obj, UncertaintyWeightingObjective)
    (s,) = obj.extra_parameters
    assert s.shape == (5,) and torch.equal(s.detach(), torch.zeros(5))
    L = [0.9, 0.3, 0.1, 0.05, 0.02]
    eps_mse, t = _uw_batch(obj, L)
    loss = obj.combine(eps_mse, t, 0, [s])
    assert loss.item() == pytest.approx(0.5 * sum(L), rel=1e-6)
    loss.backward()
    np.testing.assert_allclose(s.grad.numpy(), 0.5 * (1 - np.array(L)), rtol=1e-5)
    # d/dL_i: ½ e^{-s_i} / n_i per sample
    np.testing.assert_allclose(eps_mse.grad.numpy(), np.full(20, 0.5 / 4), rtol=1e-6)
    # gradient descent on s alone converges to the analytic minimiser s_i = log L_i
    opt = torch.optim.SGD([s], lr=1.0)
    for _ in range(200):
        opt.zero_grad()
        obj.combine(eps_mse.detach(), t, 0, [s]).backward()
        opt.step()
    np.testing.assert_allclose(s.detach().numpy(), np.log(L), atol=1e-5)


def test_uw_absent_cluster_leaves_its_variance_alone():
    cfg = get_profile("smoke", method="ant-uw")
    obj = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    t = torch.tensor([10, 20, 250, 260])          # clusters 0 and 1 only
    eps_mse = torch.tensor([1.0, 3.0, 0.5, 0.5], requires_grad=True)
    loss = obj.combine(eps_mse, t, 0, [])
    assert loss.item() == pytest.approx(0.5 * (2.0 + 0.5))
    loss.backward()
    np.testing.assert_allclose(obj.log_vars.grad.numpy(), [0.5 * (1 - 2.0), 0.5 * (1 - 0.5), 0, 0, 0], atol=1e-7)


def test_uw_state_round_trip():
    cfg = get_profile("smoke", method="ant-uw")
    a = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    with torch.no_grad():
        a.log_vars.copy_(torch.randn(5))
    b = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    param = b.extra_parameters[0]
    b.load_state_dict(a.state_dict())
    assert b.extra_parameters[0] is param   # loaded in place: the optimizer's reference stays valid
    assert torch.equal(param.detach(), a.log_vars.detach())


# ---------------------------------------------------------------------------------------------------------
# Nash-MTL
# ---------------------------------------------------------------------------------------------------------

def _rel_residual(M, a):
    return np.linalg.norm(M @ a - 1 / a) / np.linalg.norm(1 / a)


@pytest.mark.parametrize("k", [2, 4, 5])
def test_nash_solution_random_gradients(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        G = rng.normal(size=(50, k)) * rng.uniform(0.01, 100.0, size=k)   # very different gradient norms
        M = G.T @ G
        a = solve_nash(M)
        assert (a > 0).all() and _rel_residual(M, a) < 1e-3
        d = G @ a     # the bargaining direction: g_i·d = 1/α_i, ‖d‖² = k
        np.testing.assert_allclose(G.T @ d, 1 / a, rtol=1e-6)
        assert d @ d == pytest.approx(k, rel=1e-6)


def test_nash_solution_nearly_collinear():
    rng = np.random.default_rng(0)
    g = rng.normal(size=50)
    G = np.stack([g + 1e-3 * rng.normal(size=50) for _ in range(5)], axis=1)
    M = G.T @ G
    a = solve_nash(M)
    assert (a > 0).all() and _rel_residual(M, a) < 1e-3
    # identical gradients: (GᵀG)α = ‖g‖²(Σα)1 = 1/α  ⇒  α_i = 1/(√k ‖g‖)
    np.testing.assert_allclose(a, 1 / (np.sqrt(5) * np.linalg.norm(g)), rtol=1e-2)


def test_nash_solution_orthogonal():
    rng = np.random.default_rng(1)
    Q, _ = np.linalg.qr(rng.normal(size=(50, 5)))
    norms = np.array([1.0, 2.0, 3.0, 1e-3, 1e3])
    G = Q * norms
    np.testing.assert_allclose(solve_nash(G.T @ G), 1 / norms, rtol=1e-8)
    np.testing.assert_allclose(solve_nash(torch.tensor(G.T @ G)), 1 / norms, rtol=1e-8)


def _linear_problem(obj, seed):
    """Per-sample squared errors of a linear model and the hand-derived per-cluster gradients."""
    rng = np.random.default_rng(seed)
    n, d = 25, 8
    X, y = rng.normal(size=(n, d)), rng.normal(size=n)
    return X, y, obj.timesteps(n, torch.Generator().manual_seed(seed))


def test_nash_objective_refresh_and_hold():
    cfg = get_profile("smoke", method="ant-nash", nash_every=25)
    obj = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    assert isinstance(obj, NashMTLObjective) and obj.extra_parameters == []
    w0 = np.random.default_rng(9).normal(size=8)
    w = torch.nn.Parameter(torch.tensor(w0))
    X, y, t = _linear_problem(obj, 0)
    eps_mse = (torch.tensor(X) @ w - torch.tensor(y)) ** 2
    loss = obj.combine(eps_mse, t, 0, [w])
    # independent: cluster of sample j is j mod 5; g_i = (2/n_i) Σ_{j∈i} (x_j·w − y_j) x_j
    cl = np.arange(25) % 5
    r = X @ w0 - y
    G = np.stack([(2 * r[cl == i, None] * X[cl == i]).mean(0) for i in range(5)], axis=1)
    L = np.array([(r[cl == i] ** 2).mean() for i in range(5)])
    a = obj.alpha.numpy()
    assert (a > 0).all() and _rel_residual(G.T @ G, a) < 1e-6
    assert loss.item() == pytest.approx(float(a @ L), rel=1e-9)
    loss.backward()     # the graph is still usable after the per-cluster autograd.grad calls
    np.testing.assert_allclose(w.grad.numpy(), G @ a, rtol=1e-8)
    # a second micro-batch of the same step and the next steps keep α; step 25 re-solves
    X2, y2, t2 = _linear_problem(obj, 1)
    eps2 = (torch.tensor(X2) @ w - torch.tensor(y2)) ** 2
    for step in (0, 1, 24):
        obj.combine(eps2, t2, step, [w])
        assert np.array_equal(obj.alpha.numpy(), a) and obj.last_refresh == 0
    obj.combine(eps2, t2, 25, [w])
    assert obj.last_refresh == 25 and not np.allclose(obj.alpha.numpy(), a)


def test_nash_state_round_trip():
    cfg = get_profile("smoke", method="ant-nash", nash_every=25)
    a = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    a.alpha, a.last_refresh = torch.rand(5, dtype=torch.float64) + 0.1, 50
    b = make_ant_objective(cfg, make_scheduler(cfg).alphas_cumprod)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.alpha, a.alpha) and b.last_refresh == 50
    # between refreshes the loaded α weights the cluster losses
    t = torch.tensor([0, 200, 400, 600, 800])
    eps = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64, requires_grad=True)
    assert b.combine(eps, t, 51, []).item() == pytest.approx(float(a.alpha @ eps.detach()))
    c = make_ant_objective(cfg.replace(ant_clusters=4), make_scheduler(cfg).alphas_cumprod)
    with pytest.raises(ValueError):
        c.load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Through the training loop: a few steps, and an interrupted run resumes the objective state exactly
# ---------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from deme.models import build_unet
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("base") / "model"
    tiny = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                norm_num_groups=4)
    build_unet(get_profile("smoke", unet=tiny)).save_pretrained(path)
    return str(path)


@pytest.fixture
def one_thread():
    """The tiny runs are overhead-bound: one thread avoids oversubscribing a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _final_checkpoint(out):
    ckpts = sorted((out / "checkpoints").glob("step_*.pt"))
    return torch.load(ckpts[-1], map_location="cpu", weights_only=False)


@pytest.mark.parametrize("method,nash_every", [("ant-uw", 1), ("ant-nash", 1), ("ant-nash", 3)])
def test_ant_training_and_resume(method, nash_every, tiny_base, tmp_path, one_thread):
    from deme.train import train
    # 4 optimizer steps (N=2 ranges × K=2). With nash_every=3, Nash re-solves at steps 0 and 3, so step 2 of the
    # resumed run uses the α restored from the step-2 checkpoint.
    cfg = get_profile("smoke", method=method, steps_per_range=2, nash_every=nash_every, batch_size=5,
                      heldout_every=0)
    full = train(cfg, tmp_path / "full", base=tiny_base, progress=False)
    assert (full / "manifest.json").exists() and (full / "model" / "config.json").exists()
    ref = _final_checkpoint(full)
    assert ref["step"] == 4
    state = ref["objective"]
    if method == "ant-uw":
        s = state["log_vars"]
        assert s.shape == (5,) and torch.isfinite(s).all() and (s != 0).all()   # trained from 0
        # their own group at lr 0.025 (no weight decay): 4 Adam steps move them far more than the model's
        # lr 2e-4 could (at most 4 × 2e-4 = 8e-4 each)
        assert s.abs().max() > 0.02
        group = ref["optimizer"]["param_groups"][1]
        assert group["lr"] == 0.025 and group["weight_decay"] == 0
    else:
        assert state["last_refresh"] == 3 and (state["alpha"] > 0).all()

    part = tmp_path / "part"
    train(cfg, part, base=tiny_base, progress=False, max_steps=2)
    mid = _final_checkpoint(part)
    assert mid["step"] == 2 and not (part / "manifest.json").exists()
    if method == "ant-nash":
        assert mid["objective"]["last_refresh"] == (1 // nash_every) * nash_every
    train(cfg, part, base=tiny_base, progress=False)
    res = _final_checkpoint(part)
    assert res["step"] == 4
    assert res["objective"].keys() == state.keys()
    for key, val in state.items():
        if isinstance(val, torch.Tensor):
            assert torch.equal(res["objective"][key], val), key
        else:
            assert res["objective"][key] == val, key
    for name, p in ref["model"].items():
        torch.testing.assert_close(res["model"][name], p, rtol=0, atol=1e-6)
