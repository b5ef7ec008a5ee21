"""Comparison tables: mean ± std over seeds and deltas, checked by hand; the paper's numbers stay separate."""

import pandas as pd
import pytest

from deme.compare import PAPER_TABLE1, PAPER_TABLE2, format_table, summarize


def test_summarize_means_stds_and_deltas_by_hand():
    df = pd.DataFrame({"model": ["Before finetuning"] * 3 + ["DeMe (after merge)"] * 3,
                       "fid": [10.0, 12.0, 14.0, 8.0, 9.0, 10.0]})
    t = summarize(df, ["fid"])
    assert t.loc["Before finetuning", "fid"] == pytest.approx(12.0)
    assert t.loc["Before finetuning", "fid std"] == pytest.approx(2.0)          # sample std of 10, 12, 14
    assert t.loc["DeMe (after merge)", "fid"] == pytest.approx(9.0)
    assert t.loc["DeMe (after merge)", "fid std"] == pytest.approx(1.0)
    assert t.loc["DeMe (after merge)", "fid Δ"] == pytest.approx(-3.0)
    assert list(t.index) == ["Before finetuning", "DeMe (after merge)"]        # row order kept
    s = format_table(t, ["fid"], digits={"fid": 1})
    assert s.loc["DeMe (after merge)", "fid"] == "9.0 ± 1.0 (-3.0)"


def test_paper_tables_match_paper_md():
    # PAPER.md §6, spot checks of the transcription
    t1 = PAPER_TABLE1.set_index("model")
    assert t1.loc["DeMe (after merge)", "LSUN-Church FID"] == 7.27
    assert t1.loc["ANT-UW", "CIFAR-10 FID"] == 4.21
    t2 = PAPER_TABLE2.set_index("model")
    assert t2.loc["DeMe (after merge)", "COCO CLIP"] == 30.11
    assert t2.loc["P2", "ImageNet FID"] == 26.92
    assert len(t1) == len(t2) == 9


def test_run_comparison_scores_each_model_on_the_evaluation_device(tmp_path, monkeypatch):
    """Models load on the CPU and are moved to ``device`` before sampling (the GPU by default where there is
    one); results are cached per model and seed, so a second call samples nothing."""
    import torch
    from deme import compare, metrics
    from deme.config import get_profile
    seen = []
    monkeypatch.setattr(metrics, "reference_statistics", lambda *a, **k: None)
    monkeypatch.setattr(metrics, "ensure_classifier", lambda *a, **k: None)
    monkeypatch.setattr(metrics, "load_clip", lambda *a, **k: None)
    monkeypatch.setattr(compare, "evaluate_model", lambda model, cfg, seed, *a, **k:
                        seen.append((next(model.parameters()).device.type, seed)) or {"seed": seed, "uncond_fid": 1.0,
                                                                                        "cond_fid": 2.0})
    cfg = get_profile("smoke")
    df = compare.run_comparison(cfg, [0, 1], 4, out_dir=tmp_path, progress=False, device="meta",
                                models={"a": lambda: torch.nn.Linear(2, 2)})
    assert seen == [("meta", 0), ("meta", 1)] and list(df.uncond_fid) == [1.0, 1.0]
    compare.run_comparison(cfg, [0, 1], 4, out_dir=tmp_path, progress=False, device="meta",
                           models={"a": lambda: torch.nn.Linear(2, 2)})
    assert len(seen) == 2
