"""Disk and time per stage (deme.budget, issue 24 item 4): the disk arithmetic by hand, the FLOP counter against a
hand count, and docs/paper_scale.md holding exactly what the code prints."""

import pytest
import torch

from deme.budget import GB, budget_table, checkpoint_bytes, count_flops, format_budget, run_disk
from deme.cli import main
from deme.config import get_profile
from deme.memory import doc_block
from deme.rehearse import PAPER_PROFILES


def test_disk_arithmetic_by_hand():
    """cifar10: 35,746,307 parameters. A checkpoint holds student, EMA and two AdamW moments (4 x 4 B each); a run
    holds 2 kept + 1 being written and model/ (4 B each): 52 B per parameter. Four ranges: 208 B per parameter."""
    assert checkpoint_bytes(1000) == 16_000 and run_disk(1000) == 52_000
    rows = {r["stage"]: r for r in budget_table(get_profile("cifar10"))}
    assert rows["training: 4 DeMe ranges"]["disk_gb"] == pytest.approx(4 * 52 * 35_746_307 / 1e9)
    assert rows["training: standard baseline"]["disk_gb"] == pytest.approx(52 * 35_746_307 / 1e9)
    assert rows["merge search (04)"]["disk_gb"] == pytest.approx(4 * 35_746_307 / 1e9)
    assert rows["sampling (05)"]["disk_gb"] == pytest.approx(4 * 50_000 * 2048 * 4 / 1e9)   # features, float32
    default = [r for r in rows.values() if not r["stage"].startswith("total") and "--" not in r["stage"]]
    assert rows["total: reproduce"]["disk_gb"] == pytest.approx(sum(r["disk_gb"] for r in default))
    everything = [r for r in rows.values() if not r["stage"].startswith("total")]
    assert rows["total: reproduce --full --sweeps"]["pflop"] == pytest.approx(sum(r["pflop"] for r in everything))
    assert GB == 1e9


def test_training_rows_count_the_runs_each_flag_adds():
    """By hand, at N = 4 (cifar10): --full adds 6 baselines; Table 3 adds N=1 +CP (1 run), N +PS and N +PS +CL
    (4 each; N +PS +CL +CP is DeMe itself, N=1 nothing is `standard`): 9; the budget study K/4 and K/2 (K itself is
    the default runs) x (`standard` + 4 ranges): 10; --sweeps: N = 1, 2, 8 (1 + 2 + 8 runs; N = 4 is DeMe) and
    p = 0, 0.1, 0.5, 1 (4 x 4; p = 0.3 is DeMe): 27. The default plan's runs are reproduce's 03 stages."""
    from deme.reproduce import stages
    cfg = get_profile("cifar10")
    rows = {r["stage"]: r for r in budget_table(cfg)}
    runs = {stage: int(r["disk_how"].split()[0]) for stage, r in rows.items() if stage.startswith("training")}
    assert runs == {"training: 4 DeMe ranges": 4, "training: standard baseline": 1,
                    "training: 6 more baselines (--full)": 6, "training: Table 3 (06, --full)": 9,
                    "training: budget study (06, --full)": 10, "training: sensitivity sweeps (06, --sweeps)": 27}
    assert runs["training: 4 DeMe ranges"] + runs["training: standard baseline"] == sum(
        name.startswith("03_") for name, _, _ in stages(cfg))
    assert 6 + 5 == sum(name.startswith("03_") for name, _, _ in stages(cfg, full=True))
    per_image = rows["training: standard baseline"]["pflop"] / (80_000 * 64)    # fwd+bwd per image, PFLOP
    assert rows["training: budget study (06, --full)"]["pflop"] > 2 * (5_000 + 10_000) * 64 * per_image


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_flop_counter_matches_a_hand_count(device):
    """Conv 3->8, 3x3, on 16x16 (padding 1): 8*16*16 outputs x 27 multiply-adds = 55,296 MACs; linear 2048 -> 10:
    20,480 MACs; 2 FLOPs per MAC. Backward: the conv's weight gradient (its input needs none) = its forward; the
    linear's input and weight gradients = 2 x its forward."""
    torch.manual_seed(0)
    with torch.device(device):
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(2048, 10))
        x = torch.zeros(1, 3, 16, 16)
    conv, linear = 2 * 55_296, 2 * 20_480
    with torch.no_grad():
        assert count_flops(lambda: model(x)) == conv + linear
    assert count_flops(lambda: model(x).sum().backward()) == conv + linear + conv + 2 * linear


@pytest.mark.parametrize("name", PAPER_PROFILES)
def test_the_docs_hold_what_the_code_prints(name):
    cfg = get_profile(name)
    text = format_budget(cfg, budget_table(cfg))
    assert doc_block(name, "budget") == text, f"run: python -m deme rehearse --profile {name} --budget --write"
    assert "| total: reproduce |" in text and "*estimated*" in text


def test_rehearse_budget_prints_the_table(capsys):
    main(["rehearse", "--profile", "cifar10", "--budget"])
    out = capsys.readouterr().out
    assert "**cifar10**" in out and "| training: 4 DeMe ranges |" in out and "H100 hours (est.)" in out
