"""Timestep ranges (deme.ranges, docs/method.md §2.4) against known answers: the segmentation finds planted blocks and
the brute-force optimum; "equal" is exactly the paper's ranges; explicit boundaries reach the timestep sampler, the
ensemble and the held-out tables; bad boundaries stop with what is wrong; "gradient" ranges are read from their
record, name the runs that train on them and are found again identically from the record's own matrix."""

import itertools
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from deme import ablation as AB
from deme import analysis as A
from deme import stages
from deme.config import PROFILES, Config, get_profile, parse_assignments, training_identity
from deme.errors import SettingsError
from deme.heldout import heldout_table
from deme.models import build_unet, make_scheduler
from deme.objectives import DeMeObjective
from deme.ranges import (
    coherence,
    config_ranges,
    gradient_record_path,
    grid_bounds,
    range_bounds,
    resolved,
    segment_similarity,
)
from deme.runs import run_dir
from deme.sampling import TimestepEnsemble
from deme.timesteps import sampling_check, timestep_ranges

torch.set_num_threads(1)
BOUNDS = (0, 100, 400, 700, 1000)


def _planted(sizes, noise=0.05, seed=0):
    """A cosine matrix of unit vectors in len(sizes) blocks: each block's vectors are one direction plus noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(sizes), 64))
    u = np.concatenate([c + noise * rng.normal(size=(n, 64)) for c, n in zip(centres, sizes)])
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    return u @ u.T


def _objective(sim, edges):
    return sum(sim[a:b, a:b].sum() / (b - a) for a, b in zip(edges[:-1], edges[1:]))


# ------------------------------------------------------------------------------------------- segmentation

def test_segmentation_recovers_planted_contiguous_blocks():
    sim = _planted((5, 12, 3, 20))
    assert segment_similarity(sim, 4) == [0, 5, 17, 20, 40]
    assert grid_bounds([0, 5, 17, 20, 40], 40, 1000) == (0, 125, 425, 500, 1000)
    # a hand-made block matrix: 1 inside the blocks, −0.3 across them
    hand = np.full((10, 10), -0.3)
    for a, b in ((0, 2), (2, 7), (7, 10)):
        hand[a:b, a:b] = 1.0
    assert segment_similarity(hand, 3) == [0, 2, 7, 10]
    assert coherence(hand, [0, 2, 7, 10]) == [1.0, 1.0, 1.0]
    assert coherence(hand, [0, 5, 10])[0] == pytest.approx((4 + 9 - 2 * 6 * 0.3) / 25)   # 2×2 and 3×3 ones, cross


def test_segmentation_is_the_brute_force_optimum():
    rng = np.random.default_rng(3)
    u = rng.normal(size=(9, 5))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    sim = u @ u.T
    for n in (1, 2, 3, 4):
        every = [[0, *inner, 9] for inner in itertools.combinations(range(1, 9), n - 1)]
        best = max(every, key=lambda e: _objective(sim, e))
        assert segment_similarity(sim, n) == best
    assert segment_similarity(sim, 9) == list(range(10))


def test_segmentation_rejects_what_it_cannot_split():
    with pytest.raises(ValueError, match="cannot split 3 grid points into 4"):
        segment_similarity(np.eye(3), 4)
    with pytest.raises(ValueError, match="symmetric square"):
        segment_similarity(np.arange(6.0).reshape(2, 3), 1)


# ----------------------------------------------------------------------------------------------- equal

def test_equal_ranges_are_todays_ranges_and_keep_every_run_identity():
    for name, cfg in PROFILES.items():
        assert cfg.range_bounds == "equal", name
        T, N = cfg.num_train_timesteps, cfg.num_ranges
        assert config_ranges(cfg) == timestep_ranges(T, N) == [(i * T // N, (i + 1) * T // N) for i in range(N)]
    cfg = get_profile("fmnist", range_index=2)
    assert config_ranges(cfg) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert run_dir(cfg).parts[-4:] == ("fmnist", "deme", "N4", "range_2")
    old = {k: v for k, v in json.loads(cfg.to_json()).items() if k != "range_bounds"}   # a manifest from before
    assert training_identity(old) == cfg.training_identity()


# ----------------------------------------------------------------------------------- explicit boundaries

def test_explicit_boundaries_reach_the_timestep_sampler():
    cfg = get_profile("smoke", num_ranges=4, range_bounds=list(BOUNDS), range_index=1, p_global=0.0)
    assert cfg.range_bounds == BOUNDS and config_ranges(cfg)[1] == (100, 400)
    alphas = make_scheduler(cfg).alphas_cumprod
    g = torch.Generator().manual_seed(0)
    for mode in ("antithetic", "iid"):
        obj = DeMeObjective(cfg.replace(sampling=mode), alphas)
        t = torch.cat([obj.timesteps(16, g) for _ in range(200)])
        assert t.min() >= 100 and t.max() < 400 and t.min() < 110 and t.max() > 390
    # with p = 0.3 a global draw lands in [100, 400) with probability 0.3: inside 1 − p + p·0.3
    _, inside, expected = sampling_check(1000, config_ranges(cfg), 1, 0.3, 16, "iid", num_batches=500)
    assert expected == pytest.approx(0.79) and abs(inside - expected) < 0.03


class _Const(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value
        self.w = nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace()

    def forward(self, x, t, **kw):
        return SimpleNamespace(sample=torch.full_like(x, float(self.value)))


def test_the_ensemble_picks_the_expert_whose_explicit_range_holds_t(monkeypatch):
    cfg = get_profile("smoke", num_ranges=4, range_bounds=BOUNDS)
    monkeypatch.setattr(stages, "load_experts", lambda c, device="cpu": [_Const(i) for i in range(c.num_ranges)])
    ens = stages.load_ensemble(cfg)
    t = torch.tensor([0, 99, 100, 399, 400, 699, 700, 999])
    assert ens(torch.zeros(8, 1, 2, 2), t).sample[:, 0, 0, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # equal ranges: the expert of t is t // (T/N), as before the boundaries could be chosen
    equal = stages.load_ensemble(cfg.replace(range_bounds="equal"))
    t = torch.arange(1000)
    assert torch.equal(equal(torch.zeros(1000, 1, 1, 1), t).sample.flatten().long(), t // 250)
    with pytest.raises(ValueError, match="not contiguous"):
        TimestepEnsemble([_Const(0), _Const(1)], 1000, [(0, 400), (500, 1000)])
    with pytest.raises(ValueError, match="give 3 boundaries"):
        TimestepEnsemble([_Const(0), _Const(1)], 1000, [(0, 400), (400, 700), (700, 1000)])


def test_heldout_tables_break_the_loss_down_by_the_explicit_ranges():
    cfg = get_profile("smoke", num_ranges=4, range_bounds=BOUNDS)
    t = np.arange(1000)
    rng = np.random.default_rng(0)
    ref = {"unconditional": 1 + rng.random(1000), "t": t}
    other = {"unconditional": ref["unconditional"] * np.where((t >= 100) & (t < 400), 0.9, 1.0), "t": t}
    table = heldout_table({"Before finetuning": ref, "m": other}, cfg).set_index(["model", "range"])
    assert list(table.loc["m"].index) == ["all", "0", "1", "2", "3"]
    assert table.loc[("m", "1"), "delta_pct"] == pytest.approx(-10.0)
    assert table.loc[("m", "1"), "loss"] == pytest.approx(other["unconditional"][100:400].mean())
    for r in ("0", "2", "3"):
        assert table.loc[("m", r), "delta_pct"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("bounds, message", [
    ([0, 500, 1000], "give 2 ranges but num_ranges=4: give 5 boundaries"),
    ([0, 100, 100, 700, 1000], "strictly increasing"),
    ([0, 400, 100, 700, 1000], "strictly increasing"),
    ([50, 100, 400, 700, 1000], "start at 0 and end at T=1000"),
    ([0, 100, 400, 700, 1200], "start at 0 and end at T=1000"),
    ([0, 100.5, 400, 700, 1000], "non-integer"),
    ("quantile", "'equal', 'gradient' or N\\+1 integer boundaries"),
])
def test_bad_boundaries_stop_with_what_is_wrong(bounds, message):
    with pytest.raises(ValueError, match=message):
        get_profile("smoke", num_ranges=4, range_bounds=bounds)


def test_only_equal_ranges_need_n_to_divide_t_and_the_cli_parses_boundaries():
    with pytest.raises(ValueError, match="do not divide T=1000"):
        get_profile("smoke", num_ranges=3)
    cfg = get_profile("smoke", num_ranges=3, range_bounds=[0, 300, 600, 1000], range_index=2)
    assert config_ranges(cfg)[2] == (600, 1000)
    assert parse_assignments(["range_bounds=[0,300,600,1000]"]) == {"range_bounds": (0, 300, 600, 1000)}
    assert parse_assignments(["range_bounds=gradient"]) == {"range_bounds": "gradient"}
    assert Config.from_dict(json.loads(cfg.to_json())).range_bounds == (0, 300, 600, 1000)
    # at another N, explicit boundaries give way to equal ranges (ablation sweeps over N)
    cfg = cfg.replace(range_index=None)
    assert AB.at_budget(cfg, 2).range_bounds == "equal" and AB.at_budget(cfg, 3).range_bounds == cfg.range_bounds


# ------------------------------------------------------------------------------------------- "gradient"

def _record(cfg, bounds):
    path = gradient_record_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"range_bounds": list(bounds)}))
    return path


def test_gradient_ranges_come_from_their_record_and_name_the_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    cfg = get_profile("smoke", range_bounds="gradient", range_index=1)
    with pytest.raises(SettingsError, match="python -m deme ranges --profile smoke --num-ranges 2"):
        config_ranges(cfg)
    _record(cfg, (0, 300, 1000))
    assert range_bounds(cfg) == (0, 300, 1000) and config_ranges(cfg) == [(0, 300), (300, 1000)]
    pinned = resolved(cfg)
    assert pinned.range_bounds == (0, 300, 1000) and resolved(pinned) == pinned
    assert run_dir(cfg) == run_dir(pinned) and run_dir(cfg).parent.name == "N2__range_bounds=[0,300,1000]"
    # baselines never read the ranges: one baseline serves every choice of DeMe's ranges
    std = cfg.replace(method="standard", range_index=None)
    assert run_dir(std) == run_dir(std.replace(range_bounds="equal")) == tmp_path / "runs" / "smoke" / "standard"
    assert gradient_record_path(cfg.replace(num_ranges=4)) != gradient_record_path(cfg)


def test_find_gradient_ranges_records_the_optimal_split_of_its_own_matrix(tmp_path, monkeypatch):
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    cfg = get_profile("smoke", range_bounds="gradient", num_ranges=3)
    torch.manual_seed(0)
    build_unet(cfg).save_pretrained(tmp_path / "base")
    monkeypatch.setattr(A, "ensure_base_model", lambda c: str(tmp_path / "base"))
    rec = A.find_gradient_ranges(cfg, device="cpu")
    sim, k = np.array(rec["similarity"]), A.analysis_sizes(cfg)["num_timesteps_grid"]
    assert sim.shape == (k, k) and rec["timesteps"] == A.timestep_grid(1000, k).tolist()
    assert rec["grid_edges"] == segment_similarity(sim, 3)
    assert tuple(rec["range_bounds"]) == grid_bounds(rec["grid_edges"], k, 1000) == range_bounds(cfg)
    assert rec["coherence"] == pytest.approx(coherence(sim, rec["grid_edges"]))
    # found once: a second call reads the record, and so does every run
    monkeypatch.setattr(A, "gradient_similarity", lambda *a, **kw: pytest.fail("computed twice"))
    assert A.find_gradient_ranges(cfg) == rec
    assert config_ranges(cfg) == list(zip(rec["range_bounds"][:-1], rec["range_bounds"][1:]))


def test_ranges_table_sets_each_variant_against_the_first_on_the_same_images():
    rng = np.random.default_rng(1)
    base = 1 + rng.random(400)
    losses = {"Before finetuning": {"unconditional": base, "t": np.arange(400)},
              "eq merge": {"unconditional": base * 0.98, "t": np.arange(400)},
              "gr merge": {"unconditional": base * 0.97, "t": np.arange(400)}}
    rows = pd.DataFrame([{"variant": v, "kind": "merge", "model": m, "range": "all", "condition": "unconditional",
                          "delta_pct": d, "ci95_low": d - 0.1, "ci95_high": d + 0.1}
                         for v, m, d in (("equal", "eq merge", -2.0), ("gradient", "gr merge", -3.0))])
    variants = {"equal": None, "gradient": None}
    table = AB.ranges_table(rows, losses, variants).set_index("comparison")
    assert table.loc["gradient vs equal", "delta_pct"] == pytest.approx(100 * (0.97 - 0.98) / 0.98)
    assert table.loc["gradient vs equal", "verdict"] == "better"    # a constant ratio: a zero-width interval
    assert table.loc["equal vs before finetuning", "delta_pct"] == -2.0


def test_compare_ranges_trains_both_choices_at_equal_budget_and_writes_the_table(tmp_path, monkeypatch):
    """The wiring of compare_ranges, with training and scoring stood in for: "gradient" is found, pinned and
    trained as its list beside "equal", at the same N and K; the table lands beside the figures."""
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    cfg = get_profile("smoke")
    monkeypatch.setattr(AB, "find_gradient_ranges", lambda c: _record(c, (0, 300, 1000)))
    trained = {}
    monkeypatch.setattr(AB, "train_variants", lambda variants, jobs=1: trained.update(variants))
    rng = np.random.default_rng(2)
    base = 1 + rng.random(200)
    losses = {"Before finetuning": {"unconditional": base, "t": np.arange(200)},
              "eq": {"unconditional": base * (0.99 + 0.001 * rng.random(200)), "t": np.arange(200)},
              "gr": {"unconditional": base * (0.97 + 0.001 * rng.random(200)), "t": np.arange(200)}}

    def scored(c, variants, part, progress=False):
        keys = dict(zip(variants, ("eq", "gr")))
        return pd.DataFrame([{"variant": v, "kind": "ensemble", "model": keys[v], "range": "all",
                              "condition": "unconditional", "delta_pct": -1.0, "ci95_low": -1.1, "ci95_high": -0.9}
                             for v in variants]), losses
    monkeypatch.setattr(AB, "variant_heldout", scored)
    table = AB.compare_ranges(cfg, name="ranges_test")
    assert list(trained) == ["equal ranges [0, 500, 1000]", "gradient ranges [0, 300, 1000]"]
    assert [v.range_bounds for v in trained.values()] == ["equal", (0, 300, 1000)]
    assert {(v.num_ranges, v.steps_per_range) for v in trained.values()} == {(cfg.num_ranges, cfg.steps_per_range)}
    written = pd.read_csv(tmp_path / "runs" / "smoke" / "figures" / "ranges_test.csv")
    row = written[written.comparison == "gradient ranges [0, 300, 1000] vs equal ranges [0, 500, 1000]"].iloc[0]
    assert row.verdict == "better" and row.part == "evaluation" and row.budget_steps == 2 * cfg.steps_per_range
    assert len(table) == len(written) == 3


def test_the_committed_ranges_comparison_was_made_at_the_embedded_defaults_budget():
    """``ranges --compare`` is a named command, not a stage of ``make reproduce``: when the profile's budget
    changes, its committed table must be remade (the README's "Beyond the paper" block reads it)."""
    cfg = get_profile("fmnist")
    table = pd.read_csv(Path(__file__).resolve().parents[1] / "figures" / "ranges_fmnist.csv")
    assert (table.budget_steps == cfg.num_ranges * cfg.steps_per_range).all()
