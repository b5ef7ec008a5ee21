"""The notebooks, executed headlessly with papermill under the smoke profile, in the order `make reproduce` runs
them; a second run skips every stage; a bad range stops notebook 03 with a clear error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(root: Path) -> dict:
    env = dict(os.environ, DEME_ROOT=str(root), DEME_PROFILE="smoke", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    return env


def _run(args, root, **kw):
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(root), capture_output=True, text=True, **kw)


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("deme_root")
    proc = _run(["-m", "deme", "reproduce", "--profile", "smoke", "--no-update-notebooks", "--jobs", "2"], root,
                timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc.stdout


def test_reproduce_runs_every_notebook_in_order(smoke_root):
    root, stdout = smoke_root
    from deme.cli import stages
    from deme.config import get_profile
    names = [s[0] for s in stages(get_profile("smoke"))]
    assert names[:2] == ["02_base_model", "01_gradient_conflict"] or names[0] == "02_base_model"
    for name in names:
        assert (root / "runs" / "smoke" / "notebooks" / f"{name}.ipynb").exists(), name
        rec = json.loads((root / "runs" / "smoke" / "stages" / f"{name}.json").read_text())
        assert rec["seconds"] > 0 and rec["parallel_jobs"] == (2 if name.startswith("03_") else 1)
    # the stages' outputs: ranges, merged model, its weights
    for i in range(2):
        assert (root / "runs" / "smoke" / "deme" / "N2" / f"range_{i}" / "model" / "config.json").exists()
    merged = root / "runs" / "smoke" / "merge" / "N2"
    assert (merged / "model" / "config.json").exists()
    w = json.loads((merged / "weights.json").read_text())["weights"]
    assert len(w) == 2 and any(w)
    figs = root / "runs" / "smoke" / "figures"
    assert (figs / "merge_samples_smoke.png").exists()
    # notebook 06: Table 3 with the five rows, merge methods, Figs. 2 and 6
    import pandas as pd
    t3 = pd.read_csv(figs / "table3_smoke.csv", index_col=0)
    assert list(t3.index) == ["N=1, nothing", "N=1, +CP", "N=2, +PS", "N=2, +PS +CL", "N=2, +PS +CL +CP"]
    assert t3["merge"].notna().all() and t3["ensemble"].notna().all() and (t3.seeds == 2).all()
    assert len(pd.read_csv(figs / "merge_methods_smoke.csv")) == 5
    for f in ("fig2_activation_change_smoke.png", "fig6a_task_vector_plane_smoke.png", "fig6b_task_vector_boxes_smoke.png"):
        assert (figs / f).exists(), f


def test_ablation_full_sweeps_run_headlessly(smoke_root, tmp_path):
    """`papermill 06_ablation.ipynb -p full True`: the N and p sweeps train, score, and write their tables, and
    the run is recorded as a full one."""
    root, _ = smoke_root
    proc = _run(["-m", "papermill", str(REPO / "notebooks" / "06_ablation.ipynb"), str(tmp_path / "out.ipynb"),
                 "-p", "full", "True", "--cwd", str(REPO / "notebooks")], root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import pandas as pd
    figs = root / "runs" / "smoke" / "figures"
    for what, rows in (("N", ["N=1", "N=2", "N=4", "N=8"]), ("p", ["p=0", "p=0.1", "p=0.3", "p=0.5", "p=1"])):
        tab = pd.read_csv(figs / f"sensitivity_{what}_smoke.csv", index_col=0)
        assert list(tab.index) == rows and tab["merge"].notna().all() and (tab.seeds == 2).all()
    p1 = pd.read_csv(figs / "sensitivity_p_smoke.csv", index_col=0).loc["p=1"]
    assert p1["merge"] == pytest.approx(p1["ensemble"], abs=1e-6)   # p = 1: identical range models
    assert (figs / "sensitivity_smoke.png").exists()
    last = json.loads((figs / "ablation_runs_smoke.jsonl").read_text().splitlines()[-1])
    assert last["full"] is True and "sweep scoring" in last["seconds"]


def test_a_second_reproduce_skips_every_stage(smoke_root):
    root, _ = smoke_root
    proc = _run(["-m", "deme", "reproduce", "--profile", "smoke", "--no-update-notebooks"], root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[")]
    assert lines and all("skipped" in l for l in lines), proc.stdout


def test_papermill_range_out_of_bounds_stops_with_a_clear_error(smoke_root, tmp_path):
    root, _ = smoke_root
    proc = _run(["-m", "papermill", str(REPO / "notebooks" / "03_train.ipynb"), str(tmp_path / "out.ipynb"),
                 "-p", "range", "7", "--cwd", str(REPO / "notebooks")], root, timeout=300)
    assert proc.returncode != 0
    assert "range_index=7 is outside 0..1" in proc.stdout + proc.stderr


def test_unknown_profile_on_the_command_line(tmp_path):
    proc = _run(["-m", "deme", "reproduce", "--profile", "nope"], tmp_path, timeout=120)
    assert proc.returncode != 0 and "valid profiles: smoke, fmnist" in proc.stderr


def test_reproduce_full_and_jobs_reach_notebook_06_and_jobs_do_not_invalidate_records():
    """--full and --jobs reach notebook 06's parameters; a record made with other jobs is still up to date."""
    from deme.cli import _source_hash, _up_to_date, stages
    from deme.config import get_profile
    cfg = get_profile("smoke")
    p06 = {name: params for name, _, params in stages(cfg, full=True, jobs=3)}["06_ablation"]
    assert p06 == {"profile": "smoke", "full": True, "jobs": 3}
    assert {name: params for name, _, params in stages(cfg)}["06_ablation"] == {"profile": "smoke"}
    rec = {"source": _source_hash("06_ablation.ipynb"), "params": {"profile": "smoke", "full": True, "jobs": 2},
           "config": cfg.to_dict()}
    assert _up_to_date(rec, cfg, "06_ablation.ipynb", p06)
    assert not _up_to_date(rec, cfg, "06_ablation.ipynb", {"profile": "smoke", "jobs": 3})   # full differs


def test_reproduce_keep_going_runs_the_stages_after_a_failure(tmp_path, monkeypatch):
    """With keep_going a failing notebook is reported, gets no record, and the next stage still runs;
    without it the failure stops the run."""
    import nbformat
    from deme import cli
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for name, code in (("02_base_model", "raise RuntimeError('planted failure')"),
                       ("01_gradient_conflict", f"open({str(tmp_path / 'ran.txt')!r}, 'w').write('ok')")):
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                               "display_name": "Python 3"}})
        nb.cells = [nbformat.v4.new_code_cell("profile = None", metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(code)]
        nbformat.write(nb, nbs / f"{name}.ipynb")
    monkeypatch.setattr(cli, "NOTEBOOKS", nbs)
    monkeypatch.setattr(cli, "ROOT", tmp_path)
    out = cli.reproduce("smoke", update_notebooks=False, keep_going=True)
    assert [r["stage"] for r in out] == ["02_base_model", "01_gradient_conflict"]
    assert "planted failure" in out[0]["failed"] and not out[1].get("failed")
    assert (tmp_path / "ran.txt").read_text() == "ok"
    stages_dir = tmp_path / "runs" / "smoke" / "stages"
    assert not (stages_dir / "02_base_model.json").exists() and (stages_dir / "01_gradient_conflict.json").exists()
    (tmp_path / "ran.txt").unlink()
    with pytest.raises(Exception, match="planted failure"):
        cli.reproduce("smoke", update_notebooks=False)
    assert not (tmp_path / "ran.txt").exists()
