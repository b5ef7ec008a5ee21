"""Ablation variants (notebook 06): equal budgets, their own run folders, and the paired statistics."""


import numpy as np
import pandas as pd
import pytest

from deme import ablation as AB
from deme.config import get_profile
from deme.runs import run_dir, variant_tag
from deme.train import train


def _folders(variants):
    return {k: run_dir(v.replace(range_index=0) if v.method == "deme" else v) for k, v in variants.items()}


def test_every_variant_trains_the_same_total_budget():
    cfg = get_profile("fmnist")
    budget = cfg.num_ranges * cfg.steps_per_range
    variants = {**AB.table3_variants(cfg, 8), **AB.sweep_variants(cfg, "N"), **AB.sweep_variants(cfg, "p")}
    for name, v in variants.items():
        total = v.num_ranges * v.steps_per_range      # a baseline trains N×K steps on one model
        assert total == budget, name


def test_budget_study_pairs_standard_and_deme_at_a_quarter_half_and_all_of_the_budget():
    cfg = get_profile("fmnist")                     # K = 2400 steps per range
    assert AB.study_budgets(cfg) == (600, 1200, 2400)
    runs = AB.budget_variants(cfg)
    assert list(runs) == [f"K={k}, {m}" for k in (600, 1200, 2400) for m in ("standard", "DeMe")]
    for k in (600, 1200, 2400):
        std, deme = runs[f"K={k}, standard"], runs[f"K={k}, DeMe"]
        assert (std.method, deme.method) == ("standard", "deme")
        assert std.steps_per_range == deme.steps_per_range == k   # standard: N×k steps on one model
    assert list(AB.budget_variants(cfg, [5])) == ["K=5, standard", "K=5, DeMe"]


def test_table3_rows_switch_exactly_the_ablated_techniques():
    cfg = get_profile("fmnist")
    rows = AB.table3_variants(cfg, 8)
    assert list(rows) == ["N=1, nothing", "N=1, +CP", "N=8, +PS", "N=8, +PS +CL", "N=8, +PS +CL +CP"]
    assert rows["N=1, nothing"].method == "standard"
    flags = [(v.num_ranges, v.consistency_weight > 0, v.projection) for v in list(rows.values())[1:]]
    assert flags == [(1, False, True), (8, False, False), (8, True, False), (8, True, True)]
    assert all(v.p_global == cfg.p_global for v in rows.values())


def test_variants_get_their_own_folders_and_the_profile_run_keeps_its_own():
    cfg = get_profile("fmnist")
    assert variant_tag(cfg) == "" and run_dir(cfg.replace(range_index=1)).parts[-3:] == ("deme", "N4", "range_1")
    variants = {**AB.table3_variants(cfg), **{f"s{k}": v for k, v in AB.sweep_variants(cfg, "N").items()},
                **{f"s{k}": v for k, v in AB.sweep_variants(cfg, "p").items()}}
    folders = _folders(variants)
    same_as_profile = [k for k, d in folders.items() if d == run_dir(cfg.replace(range_index=0))]
    assert sorted(same_as_profile) == ["N=4, +PS +CL +CP", "sN=4", "sp=0.3"]   # the full recipe at the profile's N, p
    assert folders["N=1, nothing"] == run_dir(cfg.replace(method="standard"))
    distinct = {d for k, d in folders.items() if k not in ("sN=4", "sp=0.3")}
    assert len(distinct) == len(folders) - 2
    assert "p_global=0.1" in str(folders["sp=0.1"]) and "projection=false" in str(folders["N=4, +PS"])


def test_a_variant_run_does_not_touch_the_profile_run(tmp_path):
    cfg = get_profile("smoke", steps_per_range=2, checkpoint_every=1, log_every=1, heldout_every=0)
    base = str(train(cfg.replace(method="pretrain", pretrain_steps=2), tmp_path / "base_run", progress=False) / "model")
    main = run_dir(cfg.replace(range_index=0), root=tmp_path)
    variant = cfg.replace(range_index=0, p_global=1.0)
    other = run_dir(variant, root=tmp_path)
    assert other != main
    train(cfg.replace(range_index=0), main, base=base, progress=False)
    before = (main / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    train(variant, other, base=base, progress=False)
    assert (other / "model" / "config.json").exists()
    assert (main / "model" / "diffusion_pytorch_model.safetensors").read_bytes() == before


def _rows_and_losses():
    # variant a: one model (fills merge and ensemble); b: merge + ensemble; per-image losses on 4 images
    from deme.heldout import heldout_table
    cfg = get_profile("smoke")
    t = np.array([100, 300, 600, 900])
    ref = np.array([1.0, 2.0, 3.0, 4.0])
    losses = {"Before finetuning": {"unconditional": ref, "t": t}, "A": {"unconditional": 1.5 * ref, "t": t},
              "B merge": {"unconditional": 1.2 * ref, "t": t}, "B ens": {"unconditional": ref + 0.1, "t": t}}
    table = heldout_table(losses, cfg)
    kinds = pd.DataFrame([("a", "model", "A"), ("b", "merge", "B merge"), ("b", "ensemble", "B ens")],
                         columns=["variant", "kind", "model"])
    return kinds.merge(table, on="model"), losses


def test_step_effects_are_paired_differences_between_consecutive_variants():
    rows, losses = _rows_and_losses()
    eff = AB.step_effects(rows, losses, "merge").iloc[0]
    # b merge = 1.2 ref, a = 1.5 ref: every image -20 % -> exactly -20 with a zero-width interval
    assert (eff["from"], eff["to"]) == ("a", "b")
    assert eff.delta_pct == pytest.approx(-20.0) and eff.ci95_low == pytest.approx(-20.0) and eff.verdict == "better"
    ens = AB.step_effects(rows, losses, "ensemble").iloc[0]
    # ensemble: ref + 0.1 against 1.5 ref: mean difference (0.1*4 - 0.5*10)/4 = -1.15 over mean 15/4
    assert ens.delta_pct == pytest.approx(100 * -1.15 / 3.75)
    both = AB.step_table(rows, losses)           # claim (e)'s table: one row per kind and condition
    assert list(zip(both.kind, both.condition)) == [("merge", "unconditional"), ("ensemble", "unconditional")]
    assert both.delta_pct.tolist() == pytest.approx([-20.0, 100 * -1.15 / 3.75])


def test_variant_summary_fills_both_columns_for_a_single_model():
    rows, _ = _rows_and_losses()
    s = AB.variant_summary(rows)
    assert list(s.index) == ["a", "b"]
    assert s.loc["a", "merged (w = 1/N)"] == s.loc["a", "ensemble"] == "+50.000 [+50.000, +50.000]"
    assert s.loc["b", "merged (w = 1/N)"] == "+20.000 [+20.000, +20.000]"


def test_table3_layout_adds_true_label_columns_only_where_there_are_labels():
    rows, _ = _rows_and_losses()
    table, caption = AB.table3(rows, get_profile("smoke"))           # null label only
    assert list(table.columns) == ["merged (w = 1/N)", "ensemble"] and "Table 3 analog (smoke)" in caption
    cond = rows.assign(condition="conditional", delta_pct=rows.delta_pct * 2)
    both, _ = AB.table3(pd.concat([rows, cond]), get_profile("smoke"))
    assert list(both.columns) == ["merged (w = 1/N)", "ensemble", "merged (w = 1/N), true label",
                                  "ensemble, true label"]
    assert both.loc["a", "ensemble, true label"].startswith("+100.000")


def test_records_written_before_a_field_existed_still_match():
    """Adding a Config field with a default must not invalidate finished runs or stage records; changing a
    training field must; evaluation fields never do."""
    import json

    from deme.config import normalized, training_identity
    cfg = get_profile("fmnist", range_index=0)
    stored = json.loads(cfg.to_json())
    for new_field in ("center_crop", "data_dir", "check_images", "gradient_checkpointing"):
        del stored[new_field]
    assert training_identity(stored) == cfg.training_identity()
    assert normalized(stored) == normalized(cfg.to_dict())
    assert training_identity({**stored, "p_global": 0.5}) != cfg.training_identity()
    assert training_identity({**stored, "fid_samples": 7}) == cfg.training_identity()


def test_parallel_variant_training_matches_one_process(tmp_path, monkeypatch):
    """Two runs trained by two worker processes give the weights of the same runs trained in this process."""
    import shutil

    import torch

    from deme.models import load_unet
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))          # this process's root and its workers'
    cfg = get_profile("smoke", steps_per_range=2, checkpoint_every=2, log_every=1, heldout_every=0)
    base_run = train(cfg.replace(method="pretrain", pretrain_steps=2), tmp_path / "runs" / "smoke" / "base",
                     progress=False)
    assert (base_run / "model" / "config.json").exists()
    variants = {"a": cfg.replace(consistency_weight=0.0)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)     # as each worker: CPU kernels may sum in another order with other thread counts
    try:
        serial = AB.train_variants(variants)
    finally:
        torch.set_num_threads(threads)
    weights = [load_unet(run_dir(variants["a"].replace(range_index=i)) / "model").state_dict() for i in range(2)]
    for i in range(2):
        shutil.rmtree(run_dir(variants["a"].replace(range_index=i)))
    parallel = AB.train_variants(variants, jobs=2)
    assert list(serial["trained now"]) == list(parallel["trained now"]) == [2]
    for i in range(2):
        again = load_unet(run_dir(variants["a"].replace(range_index=i)) / "model").state_dict()
        for k, v in weights[i].items():
            assert torch.equal(v, again[k]), k


def test_fields_removed_from_config_do_not_invalidate_finished_runs():
    import json

    from deme.config import training_identity
    cfg = get_profile("smoke", range_index=0)
    stored = {**json.loads(cfg.to_json()), "eval_seeds": [0, 1], "num_eval_samples": 64}   # fields of older versions
    assert training_identity(stored) == cfg.training_identity()
