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
    assert rows["total"]["disk_gb"] == pytest.approx(sum(r["disk_gb"] for r in rows.values()
                                                         if r["stage"] != "total"))
    assert GB == 1e9


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
    assert "| total |" in text and "*estimated*" in text


def test_rehearse_budget_prints_the_table(capsys):
    main(["rehearse", "--profile", "cifar10", "--budget"])
    out = capsys.readouterr().out
    assert "**cifar10**" in out and "| training: 4 DeMe ranges |" in out and "H100 hours (est.)" in out
