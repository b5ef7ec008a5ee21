"""Comparison tables: mean ± std over seeds and deltas, checked by hand; the paper's numbers stay separate."""

import numpy as np
import pandas as pd
import pytest

from deme.compare import PAPER_TABLE1, PAPER_TABLE2, claims, format_paired, text_to_image_table
from deme.config import get_profile


def test_format_paired_shows_value_delta_and_interval_with_kid_scaled():
    t = pd.DataFrame({"model": ["Before finetuning", "m"] * 2, "metric": ["fid"] * 2 + ["kid"] * 2,
                      "value": [10.0, 9.5, 0.002, 0.0015], "delta": [0.0, -0.5, 0.0, -0.0005],
                      "ci95_low": [0.0, -0.8, 0.0, -0.0009], "ci95_high": [0.0, -0.2, 0.0, -0.0001]})
    f = format_paired(t, ["fid", "kid"])
    assert f.loc["m", "FID"] == "9.50 (-0.50 [-0.80, -0.20])"
    assert f.loc["m", "KID ×10³"] == "1.50 (-0.50 [-0.90, -0.10])"
    assert f.loc["Before finetuning", "FID"] == "10.00 (reference)"


def test_claims_are_paired_per_image_means_over_the_draws():
    """Two draws per image: the merged model is 2% worse than the base in draw 0 and 2% better in draw 1; the
    claim compares per-image means over the draws (by hand below), and records the draws on held-out rows."""
    rng = np.random.default_rng(0)
    base = rng.random((2, 50)) + 0.5
    t = np.tile(np.arange(50) * 20, (2, 1))
    merged = base * np.array([[1.02], [0.98]])
    losses = {"Before finetuning": {"unconditional": base, "t": t},
              "DeMe (after merge)": {"unconditional": merged, "t": t},
              "DeMe (before merge)": {"unconditional": base * 1.01, "t": t}}
    rows = claims(losses, None, get_profile("smoke"), [])
    b = rows[rows.claim == "(b) merged vs before finetuning"].iloc[0]
    assert b.delta == pytest.approx(100 * (merged.mean(0).mean() / base.mean(0).mean() - 1))
    e = rows[rows.claim == "ensemble vs before finetuning"].iloc[0]
    assert e.delta == pytest.approx(1.0) and e.ci95_low == pytest.approx(1.0) and e.verdict == "worse"
    assert list(rows.draws) == [2] * len(rows)
    one = claims({k: {"unconditional": v["unconditional"][0], "t": t[0]} for k, v in losses.items()}, None,
                 get_profile("smoke"), [])
    assert list(one.draws) == [1] * len(one)
    assert one.iloc[0].delta == pytest.approx(2.0)        # draw 0 alone: merged is 1.02 x base on every image


def test_text_to_image_table_keeps_scores_that_were_not_computed():
    """Offline, every CLIP score is None and PartiPrompts has no FID: the columns stay (empty), rows keep the
    scoring order. (pivot_table's default dropped both columns: the sd14 rehearsal's Table 2 CSV lacked CLIP.)"""
    rows = [{"model": m, "prompts": p, "fid_256": None if p == "PartiPrompts" else f, "clip": None, "n": 4}
            for m, f in [("Before finetuning", 30.0), ("DeMe (after merge)", 29.0)]
            for p in ["MS-COCO", "ImageNet", "PartiPrompts"]]
    t = text_to_image_table(pd.DataFrame(rows))
    assert list(t.index) == ["Before finetuning", "DeMe (after merge)"]
    assert {(v, p) for v in ("fid_256", "clip") for p in ("MS-COCO", "ImageNet", "PartiPrompts")} == set(t.columns)
    assert t.loc["DeMe (after merge)", ("fid_256", "ImageNet")] == 29.0
    assert t["clip"].isna().all().all() and t[("fid_256", "PartiPrompts")].isna().all()


def test_paper_tables_match_paper_md():
    # docs/method.md §6, spot checks of the transcription
    t1 = PAPER_TABLE1.set_index("model")
    assert t1.loc["DeMe (after merge)", "LSUN-Church FID"] == 7.27
    assert t1.loc["ANT-UW", "CIFAR-10 FID"] == 4.21
    t2 = PAPER_TABLE2.set_index("model")
    assert t2.loc["DeMe (after merge)", "COCO CLIP"] == 30.11
    assert t2.loc["P2", "ImageNet FID"] == 26.92
    assert len(t1) == len(t2) == 9


def test_sample_outputs_are_collected_on_the_evaluation_device_and_cached_by_weights(tmp_path, monkeypatch):
    """Models are moved to ``device`` before sampling (the GPU by default where there is one); outputs are
    cached by the weights' fingerprint, so a second call, or the same weights under another name, sample nothing."""
    import copy

    import numpy as np
    import torch

    from deme import compare
    from deme.config import get_profile
    seen = []
    monkeypatch.setattr(compare, "ensure_classifier", lambda *a, **k: None)

    def fake(model, cfg, seed, n, *a, **k):
        seen.append((next(model.parameters()).device.type, seed))
        return {"uncond_inception": np.ones((n, 3)), "cond_labels": np.arange(n), "cond_inception": np.ones((n, 3))}
    monkeypatch.setattr(compare, "sample_outputs", fake)
    cfg = get_profile("smoke")
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2)
    out = compare.collect_sample_outputs(cfg, 4, seed=1, out_dir=tmp_path, progress=False, device="meta",
                                         models={"a": lambda: copy.deepcopy(lin)})
    assert seen == [("meta", 1)] and out["a"]["uncond_inception"].shape == (4, 3)
    compare.collect_sample_outputs(cfg, 4, seed=1, out_dir=tmp_path, progress=False, device="meta",
                                   models={"renamed": lambda: copy.deepcopy(lin)})
    assert len(seen) == 1


def test_tables_and_run_logs_are_saved_beside_the_figures(tmp_path, monkeypatch):
    """deme.runs.save_table: numbers in CSV (read back equal, no index column unless asked), the formatted
    table in Markdown and LaTeX under its caption; append_run_log adds one stamped JSON line per call."""
    import json

    from deme.config import get_profile
    from deme.runs import append_run_log, save_table
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    cfg = get_profile("smoke")
    t = pd.DataFrame({"model": ["a", "b"], "fid": [1.25, 0.1 + 0.2]})
    shown = pd.DataFrame({"FID": ["1.25", "0.30"]}, index=["a", "b"])
    paths = save_table(t, cfg, "tab_smoke", shown, "Table X: a caption")
    figs = tmp_path / "runs" / "smoke" / "figures"
    assert paths == [figs / "tab_smoke.csv", figs / "tab_smoke.md", figs / "tab_smoke.tex"]
    pd.testing.assert_frame_equal(pd.read_csv(paths[0]), t)   # exact floats
    md = paths[1].read_text()
    assert md.startswith("Table X: a caption\n\n|") and "FID |" in md and "| a  |  1.25 |" in md
    assert "\\caption{Table X: a caption}" in paths[2].read_text() and "0.30" in paths[2].read_text()
    assert [p.name for p in figs.iterdir() if p.suffix == ".tmp"] == []
    m = pd.DataFrame([[1.0, 0.5], [0.5, 1.0]], index=[10, 20], columns=[10, 20])
    assert save_table(m, cfg, "matrix_smoke", index=True) == [figs / "matrix_smoke.csv"]
    assert pd.read_csv(figs / "matrix_smoke.csv", index_col=0).values.tolist() == m.values.tolist()
    append_run_log(cfg, "log_smoke", {"seconds": {"total": 1.5}})
    line = append_run_log(cfg, "log_smoke", {"seconds": {"total": 2.5}})
    lines = [json.loads(x) for x in (figs / "log_smoke.jsonl").read_text().splitlines()]
    assert [x["seconds"]["total"] for x in lines] == [1.5, 2.5] and lines[-1] == line
    assert {"device", "commit", "finished"} <= set(line) and "threads" in line["device"]
    assert line["versions"]["pandas"] == pd.__version__ and line["versions"]["numpy"] == np.__version__


def test_delta_panels_keep_conditional_metrics_apart_and_leave_out_the_reference():
    from deme.compare import delta_panels
    t = pd.DataFrame({"model": ["Before finetuning", "m"] * 3, "metric": ["fid"] * 2 + ["cond_fid"] * 2
                      + ["alignment"] * 2, "value": [10.0, 9.0, 12.0, 11.0, 80.0, 81.0],
                      "delta": [0.0, -1.0, 0.0, -1.0, 0.0, 1.0], "ci95_low": [0.0, -2.0, 0.0, -3.0, 0.0, 0.5],
                      "ci95_high": [0.0, -0.5, 0.0, 1.0, 0.0, 1.5]})
    panels, lower = delta_panels(t)
    assert list(panels) == ["FID", "FID, class-conditional", "alignment %"]
    assert lower == {"FID": True, "FID, class-conditional": True, "alignment %": False}
    assert all(list(p.model) == ["m"] for p in panels.values())
    assert panels["FID, class-conditional"][["delta", "low", "high"]].values.tolist() == [[-1.0, -3.0, 1.0]]


def test_delta_panels_show_kid_in_the_units_its_title_names():
    """KID's panel is titled "KID ×10³", so its differences are the raw ones times 1000 (the axis read as
    titled, no ×10⁻⁴ offset)."""
    from deme.compare import delta_panels
    t = pd.DataFrame({"model": ["Before finetuning", "m"], "metric": ["kid", "kid"], "value": [0.002, 0.0018],
                      "delta": [0.0, -2e-4], "ci95_low": [0.0, -3e-4], "ci95_high": [0.0, -1e-4]})
    panels, _ = delta_panels(t)
    assert list(panels) == ["KID ×10³"]
    np.testing.assert_allclose(panels["KID ×10³"][["delta", "low", "high"]].values, [[-0.2, -0.3, -0.1]])


def _write_many(path, value):
    from deme.runs import atomic_write
    for _ in range(40):
        atomic_write(path, lambda tmp: np.savez(tmp, x=np.full(200_000, value)))


def test_atomic_writes_of_one_file_by_two_processes_never_mix(tmp_path):
    """deme.runs.atomic_write: two processes writing the same cache entry at once (a notebook run by hand beside
    `reproduce`) each write their own temporary file, so the file read afterwards is one writer's whole array; a
    writer that fails leaves the previous file and no temporary file behind."""
    import multiprocessing

    from deme.runs import atomic_write
    path = tmp_path / "cache.npz"
    procs = [multiprocessing.get_context("fork").Process(target=_write_many, args=(path, v)) for v in (1.0, 2.0)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    assert [p.exitcode for p in procs] == [0, 0]
    x = np.load(path)["x"]
    assert len(x) == 200_000 and len(set(x.tolist())) == 1 and x[0] in (1.0, 2.0)

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert np.load(path)["x"][0] in (1.0, 2.0) and [p.name for p in tmp_path.iterdir()] == ["cache.npz"]
