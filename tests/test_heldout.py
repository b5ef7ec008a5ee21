"""Paired evaluation: held-out loss differences, paired FID/KID, the validation/evaluation split and the merge
search on validation images — checked against hand-derived values and invariants."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from deme.config import get_profile
from deme.data import heldout_batch, heldout_split
from deme.heldout import (
    heldout_losses,
    heldout_table,
    model_fingerprint,
    paired_losses,
    relative_difference,
    split_inputs,
    verdict,
)
from deme.metrics import feature_statistics, kid_from_features
from deme.models import build_unet
from deme.paired import paired_fid, paired_kid

CFG = get_profile("smoke")


def test_relative_difference_by_hand():
    # d = [1, 2], mean 1.5; reference mean 1.5 -> +100 %; z = d - 1.0 * r = 0 -> a zero-width interval
    d, lo, hi = relative_difference(np.array([2.0, 4.0]), np.array([1.0, 2.0]))
    assert d == pytest.approx(100.0) and lo == pytest.approx(100.0) and hi == pytest.approx(100.0)
    # reference constant 1: the interval is the t-interval of the differences, in % of 1
    x = np.array([1.1, 0.9, 1.3, 1.0])
    d, lo, hi = relative_difference(x, np.ones(4))
    sd = np.std(x - 1, ddof=1)
    assert d == pytest.approx(7.5)
    assert hi - d == pytest.approx(100 * 3.182446305 * sd / 2, rel=1e-6)   # t_{0.975, 3} = 3.1824...
    assert verdict(0.1, 0.3) == "worse" and verdict(-0.3, -0.1) == "better" and verdict(-0.1, 0.1) == "not resolved"
    assert verdict(0.1, 0.3, lower_is_better=False) == "better"


def test_heldout_split_parts_are_disjoint_and_cover_the_split():
    val, _ = heldout_split(CFG, "validation")
    ev, _ = heldout_split(CFG, "evaluation")
    every, _ = heldout_split(CFG, "all")
    assert len(val) == CFG.validation_size and len(val) + len(ev) == len(every)
    rows = lambda x: {tuple(r) for r in x.flatten(1).tolist()}
    assert not rows(val) & rows(ev)
    x, _ = heldout_batch(CFG, 16)                     # the merge search's and training's held-out batch
    assert torch.equal(x, val[:16])                   # comes from the validation part only
    with pytest.raises(ValueError, match="validation_size"):
        heldout_split(CFG.replace(validation_size=10_000), "validation")


def test_heldout_losses_match_a_hand_computation_with_diffusers_scheduler():
    torch.manual_seed(0)
    model = build_unet(CFG).eval()
    x, y = heldout_batch(CFG, 8)
    per, t = heldout_losses(model, CFG, x, y, seed=3, batch_size=3)
    assert t.tolist() == [int((j + 0.5) * 1000 / 8) for j in range(8)]      # stratified over [0, T)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    s = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    a = s.alphas_cumprod[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        pred = model(a.sqrt() * x + (1 - a).sqrt() * eps, t, class_labels=y).sample
    torch.testing.assert_close(per, ((pred - eps) ** 2).mean((1, 2, 3)), rtol=1e-5, atol=1e-7)


def test_heldout_table_scaled_losses_give_exact_percentages():
    """A model whose every per-image loss is 1.1× the reference's is +10 % with a zero-width interval, in every
    range and condition; the reference itself is 0."""
    rng = np.random.default_rng(0)
    t = np.arange(8) * 125 + 3
    ref = {"unconditional": rng.random(8) + 0.1, "conditional": rng.random(8) + 0.1, "t": t}
    other = {"unconditional": 1.1 * ref["unconditional"], "conditional": 1.1 * ref["conditional"], "t": t}
    table = heldout_table({"Before finetuning": ref, "m": other}, CFG.replace(num_ranges=2))
    assert set(table["range"]) == {"all", "0", "1"} and set(table.condition) == {"unconditional", "conditional"}
    m = table[table.model == "m"]
    np.testing.assert_allclose(m.delta_pct, 10.0)
    np.testing.assert_allclose(m.ci95_low, 10.0)
    np.testing.assert_allclose(m.ci95_high, 10.0)
    r0 = m[(m["range"] == "0") & (m.condition == "unconditional")].iloc[0]
    assert r0.loss == pytest.approx(1.1 * ref["unconditional"][:4].mean())   # t < 500: the first four images
    assert (table[table.model == "Before finetuning"].delta_pct == 0).all()


def test_paired_losses_cache_by_weights_not_by_name(tmp_path):
    torch.manual_seed(0)
    a = build_unet(CFG)
    b = build_unet(CFG)
    out = paired_losses({"Before finetuning": lambda: a, "same weights": lambda: a, "other": lambda: b}, CFG,
                        cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(out["same weights"]["unconditional"], out["Before finetuning"]["unconditional"])
    assert not np.array_equal(out["other"]["conditional"], out["Before finetuning"]["conditional"])
    assert len(list(tmp_path.glob("*.npz"))) == 2 * CFG.heldout_draws and model_fingerprint(a) != model_fingerprint(b)
    again = paired_losses({"renamed": lambda: b}, CFG, cache_dir=tmp_path, progress=False)   # served from cache
    np.testing.assert_array_equal(again["renamed"]["conditional"], out["other"]["conditional"])


def test_paired_losses_average_the_profiles_draws_and_each_draw_is_heldout_losses_own(tmp_path):
    """Every judged image meets ``cfg.heldout_draws`` independent noise/timestep draws: one row per draw, each equal
    to :func:`heldout_losses` of that draw; the table's Δ% is over per-image means (identical draws would give
    the one-draw numbers)."""
    torch.manual_seed(0)
    a, b = build_unet(CFG), build_unet(CFG)
    cfg = CFG.replace(heldout_draws=3)
    out = paired_losses({"Before finetuning": lambda: a, "b": lambda: b}, cfg, cache_dir=tmp_path, progress=False)
    n = out["b"]["t"].shape[-1]
    assert out["b"]["unconditional"].shape == out["b"]["t"].shape == (3, n)
    images, inputs = split_inputs(cfg, "evaluation")
    for d in range(3):
        per, t = heldout_losses(b, cfg, images, inputs["conditional"], 0, draw=d)
        np.testing.assert_allclose(out["b"]["conditional"][d], per.numpy(), rtol=1e-6)
        np.testing.assert_array_equal(out["b"]["t"][d], t.numpy())
    assert not np.array_equal(out["b"]["t"][0], out["b"]["t"][1])
    row = heldout_table(out, cfg).query("model == 'b' and range == 'all' and condition == 'unconditional'").iloc[0]
    mean_b, mean_a = out["b"]["unconditional"].mean(0), out["Before finetuning"]["unconditional"].mean(0)
    assert row.delta_pct == pytest.approx(100 * (mean_b.mean() / mean_a.mean() - 1))
    with pytest.raises(ValueError, match="heldout_draws"):
        CFG.replace(heldout_draws=0)


def test_paired_fid_matches_the_frechet_formula_and_a_mean_shift_is_exact():
    rng = np.random.default_rng(1)
    real = rng.normal(size=(400, 16))
    mu, sigma = feature_statistics(real)
    a = rng.normal(size=(60, 16)) * 1.2 + 0.3
    shift = np.full(16, 0.05)
    res = paired_fid({"ref": a, "shifted": a + shift}, mu, sigma, "ref", num_bootstrap=30)
    # against fixed statistics the whole-set value is the Fréchet distance of a's Gaussian fit
    from deme.metrics import fid_from_statistics
    assert res["ref"]["value"] == pytest.approx(fid_from_statistics(*feature_statistics(a), mu, sigma), rel=1e-6)
    # adding a constant leaves every covariance unchanged: the difference is exactly the mean term, in
    # every bootstrap resample too, so the interval collapses onto it
    m = a.mean(0)
    exact = ((m + shift - mu) ** 2).sum() - ((m - mu) ** 2).sum()
    assert res["shifted"]["delta"] == pytest.approx(exact, rel=1e-6)
    assert res["shifted"]["low"] <= exact + 1e-9 and res["shifted"]["high"] >= exact - 1e-9
    assert res["ref"]["delta"] == 0 and res["ref"]["low"] == res["ref"]["high"] == 0
    with pytest.raises(ValueError, match="same number"):
        paired_fid({"ref": a, "short": a[:10]}, mu, sigma, "ref")


def test_a_bootstrap_shared_by_several_pairs_gives_each_pair_its_own_interval():
    """compare.claims scores every pair from one bootstrap over all models: a pair's numbers must be those of
    a bootstrap over that pair alone (the resampled rows depend only on n and the seed, not on the models)."""
    from deme.paired import fid_bootstrap, paired_difference
    rng = np.random.default_rng(3)
    mu, sigma = feature_statistics(rng.normal(size=(300, 8)))
    feats = {k: rng.normal(size=(40, 8)) * s + s / 4 for k, s in (("a", 1.0), ("b", 1.3), ("c", 0.8))}
    full, draws = fid_bootstrap(feats, mu, sigma, num_bootstrap=25)
    for x, y in (("b", "a"), ("c", "b")):
        alone = paired_fid({x: feats[x], y: feats[y]}, mu, sigma, y, num_bootstrap=25)[x]
        assert paired_difference(full, draws, x, y) == pytest.approx(alone, rel=1e-12)


def test_paired_kid_equals_clean_fid_kid_on_whole_sets():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(50, 8))
    a, b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8)) + 0.4
    res = paired_kid({"a": a, "b": b}, real, "a", blocks=5)
    # with as many samples as reference features (and subsets of that size) clean-fid's KID is the
    # unbiased MMD² of the whole sets
    assert res["a"]["value"] == pytest.approx(kid_from_features(a, real, max_subset_size=50)[0], rel=1e-9)
    assert res["b"]["value"] == pytest.approx(kid_from_features(b, real, max_subset_size=50)[0], rel=1e-9)
    assert res["b"]["delta"] == pytest.approx(res["b"]["value"] - res["a"]["value"], rel=1e-9)
    assert res["b"]["low"] < res["b"]["delta"] < res["b"]["high"]


def test_merge_search_scores_the_base_at_zero_and_picks_the_lowest_validation_loss():
    """w = 0 is the base exactly; experts equal to the base make every candidate tie; the chosen weights
    are the lowest-loss row of the table, whose losses are computed on the validation images only."""
    from deme.models import with_projections
    from deme.stages import search_merge_weights, validation_inputs
    torch.manual_seed(0)
    base = with_projections(build_unet(CFG)).eval()
    expert = with_projections(build_unet(CFG)).eval()
    cfg = CFG.replace(merge_grid=(0.0, 1.0))
    res = search_merge_weights(cfg, base=base, experts=[expert, base], progress=False)
    x, cond = validation_inputs(cfg)
    assert len(x) == cfg.validation_size and (cond[::2] == cfg.num_classes).all()
    base_loss = heldout_losses(base, cfg, x, cond)[0].mean().item()
    row = res.candidates[res.candidates.weights == (0.0, 0.0)].iloc[0]
    assert row.loss == pytest.approx(base_loss, rel=1e-6) and row.delta_pct == 0
    assert res.weights == tuple(res.candidates.weights.iloc[0])
    assert res.candidates.loss.iloc[0] == res.candidates.loss.min()
    # the second expert is the base: its weight cannot change the loss, so rows differing only there tie
    loss = dict(zip(res.candidates.weights, res.candidates.loss))   # (1, 1) is the plain sum, (1, 0) a
    assert loss[(1.0, 0.0)] == pytest.approx(loss[(1.0, 1.0)], rel=1e-6)  # coordinate step from w = 0
