"""The notebooks under the smoke profile: every cell of every notebook executed by `pytest --nbval-lax notebooks/`
(as a user's CI runs them; notebooks/conftest.py first makes the trainings with `deme reproduce --only 01 03`),
their outputs checked; papermill's parameters (notebook 06 with `-p full True`, a bad range for notebook 03) and
the reproduction's records (a second run skips every stage). The whole `reproduce` sequence is rehearsed on the
paper profiles in tests/test_rehearse.py."""

import ast
import json
import os
import re
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
    proc = _run(["-m", "pytest", "-q", "--nbval-lax", "notebooks/", "--deme-root", str(root), "-p", "no:cacheprovider"],
                root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc.stdout


@pytest.mark.slow
def test_every_notebook_runs_under_nbval_and_writes_its_outputs(smoke_root):
    root, stdout = smoke_root
    from deme.config import get_profile
    from deme.reproduce import NOTEBOOKS, stages
    cells = sum(len([c for c in json.loads(p.read_text())["cells"] if c["cell_type"] == "code"])
                for p in NOTEBOOKS.glob("*.ipynb"))
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|error)", stdout.splitlines()[-1])}
    assert counts.get("passed", 0) + counts.get("skipped", 0) == cells and set(counts) <= {"passed", "skipped"}, \
        stdout[-2000:]                                   # one nbval item per code cell; skipped: injected parameters
    made = [s[0] for s in stages(get_profile("smoke")) if s[0].startswith(("01_", "03_"))]   # by the conftest
    for name in made:
        assert (root / "runs" / "smoke" / "notebooks" / f"{name}.ipynb").exists(), name
        rec = json.loads((root / "runs" / "smoke" / "stages" / f"{name}.json").read_text())
        assert rec["seconds"] > 0 and rec["parallel_jobs"] == (2 if name.startswith("03_") else 1)
    # the stages' outputs: ranges, merged model, its weights and the candidates the search scored
    import pandas as pd
    for i in range(2):
        assert (root / "runs" / "smoke" / "deme" / "N2" / f"range_{i}" / "model" / "config.json").exists()
    merged = root / "runs" / "smoke" / "merge" / "N2"
    assert (merged / "model" / "config.json").exists()
    w = json.loads((merged / "weights.json").read_text())["weights"]
    cands = pd.read_csv(merged / "candidates.csv")
    assert len(w) == 2 and cands.loss.iloc[0] == cands.loss.min()
    assert tuple(w) == ast.literal_eval(cands.weights.iloc[0])                # the chosen = the lowest loss
    assert cands.kind.str.startswith("base (reference)").any()   # the base is always scored beside the search
    figs = root / "runs" / "smoke" / "figures"
    for f in ("fig1a_gradient_conflict_smoke.png", "fig4_landscapes_smoke.png", "merge_samples_smoke.png",
              "merge_search_smoke.png", "heldout_loss_smoke.png", "compare_smoke.png",
              "gallery_smoke.png", "fig2_activation_change_smoke.png", "fig6a_task_vector_plane_smoke.png",
              "fig6b_task_vector_boxes_smoke.png"):
        assert (figs / f).exists(), f
    # notebook 05: the paired held-out table (every model, range all + each range, both conditions), samples
    ho = pd.read_csv(figs / "heldout_loss_smoke.csv")
    assert list(ho.columns) == ["model", "range", "condition", "loss", "delta_pct", "ci95_low", "ci95_high"]
    assert set(ho["range"].astype(str)) == {"all", "0", "1"} and set(ho.condition) == {"unconditional", "conditional"}
    assert {"Before finetuning", "Standard (uniform)", "DeMe (before merge)", "DeMe (after merge)"} <= set(ho.model)
    assert (ho[ho.model == "Before finetuning"].delta_pct == 0).all() and (ho.ci95_low <= ho.ci95_high).all()
    samples = pd.read_csv(figs / "samples_smoke.csv")
    assert {"fid", "kid", "alignment", "classifier_fd"} <= set(samples.metric) and (samples.n == 12).all()
    claims = pd.read_csv(figs / "claims_smoke.csv")
    assert set(claims.verdict) <= {"better", "worse", "not resolved"} and claims.claim.str.startswith("(b)").any()
    # notebook 06 (default run: no Table 3, which comes with full), merge methods
    assert not (figs / "table3_smoke.csv").exists()
    assert set(pd.read_csv(figs / "merge_methods_smoke.csv").model) >= {"TIES (density 0.2)", "ensemble (before merge)"}


@pytest.mark.slow
def test_ablation_full_runs_headlessly(smoke_root, tmp_path):
    """`papermill 06_ablation.ipynb -p full True -p sweeps True`: Table 3 (on with full), the budget study, the N
    and p sweeps and the sample metrics of Table 3 train, score and write their tables, and the run is recorded as
    a full one with sweeps."""
    root, _ = smoke_root
    proc = _run(["-m", "papermill", str(REPO / "notebooks" / "06_ablation.ipynb"), str(tmp_path / "out.ipynb"),
                 "-p", "full", "True", "-p", "sweeps", "True", "--cwd", str(REPO / "notebooks")], root, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import pandas as pd
    figs = root / "runs" / "smoke" / "figures"
    for what, rows in (("N", ["N=1", "N=2", "N=4", "N=8"]), ("p", ["p=0", "p=0.1", "p=0.3", "p=0.5", "p=1"])):
        tab = pd.read_csv(figs / f"sensitivity_{what}_smoke.csv")
        assert list(dict.fromkeys(tab.variant)) == rows and tab.delta_pct.notna().all()
    study = pd.read_csv(figs / "budget_study_smoke.csv")
    assert sorted(set(study.steps_per_range)) == [1, 2, 4]
    assert set(study.kind) == {"standard", "DeMe ensemble", "DeMe merge, uniform 1/N"}
    assert (figs / "budget_study_unconditional_smoke.png").exists()
    t3 = pd.read_csv(figs / "table3_smoke.csv")          # Table 3 with the five rows, and claim (e)'s steps
    assert list(dict.fromkeys(t3.variant)) == ["N=1, nothing", "N=1, +CP", "N=2, +PS", "N=2, +PS +CL",
                                               "N=2, +PS +CL +CP"]
    assert t3.delta_pct.notna().all()
    steps = pd.read_csv(figs / "table3_steps_smoke.csv")
    assert len(steps) == 4 * 2 * 2 and set(steps.verdict) <= {"better", "worse", "not resolved"}
    assert set(pd.read_csv(figs / "table3_samples_smoke.csv").metric) == {"fid", "kid"}
    last = json.loads((figs / "ablation_runs_smoke.jsonl").read_text().splitlines()[-1])
    assert last["full"] is True and last["sweeps"] is True
    assert "budget study" in last["seconds"] and "sweeps" in last["seconds"]


def test_a_second_reproduce_skips_every_stage(smoke_root):
    root, _ = smoke_root
    proc = _run(["-m", "deme", "reproduce", "--profile", "smoke", "--no-update-notebooks", "--only", "01", "03"],
                root, timeout=300)
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


def test_the_reproduce_command_does_not_import_diffusers(tmp_path):
    """`python -m deme reproduce` only starts notebook kernels: the command line imports the module of the
    command it runs, so neither diffusers nor the training loop is loaded (~4 s of start-up instead of ~13 s)."""
    code = ("import sys; from deme import cli, reproduce; "
            "print(sorted(m for m in ('diffusers', 'deme.train', 'deme.models', 'deme.compare') if m in sys.modules))")
    proc = _run(["-c", code], tmp_path, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]


def test_reproduce_full_and_jobs_reach_notebook_06_and_jobs_do_not_invalidate_records():
    """--full, --sweeps and --jobs reach notebook 06's parameters; a record made with other jobs is still up to date."""
    from deme.config import get_profile
    from deme.reproduce import _source_hash, _up_to_date, stages
    cfg = get_profile("smoke")
    plan = {name: params for name, _, params in stages(cfg, full=True, jobs=3)}
    p06 = plan["06_ablation"]
    assert p06 == {"profile": "smoke", "full": True, "jobs": 3} and plan["05_compare"]["full"] is True
    assert "03_train_ant-nash" in plan and "03_train_ant-nash" not in {s[0] for s in stages(cfg)}
    assert {name: params for name, _, params in stages(cfg)}["06_ablation"] == {"profile": "smoke"}
    swept = {name: params for name, _, params in stages(cfg, sweeps=True)}      # --sweeps alone: 06's sweeps only
    assert swept["06_ablation"] == {"profile": "smoke", "sweeps": True} and "full" not in swept["05_compare"]
    rec = {"source": _source_hash("06_ablation.ipynb"), "params": {"profile": "smoke", "full": True, "jobs": 2},
           "config": cfg.to_dict()}
    assert _up_to_date(rec, cfg, "06_ablation.ipynb", p06)
    assert not _up_to_date(rec, cfg, "06_ablation.ipynb", {"profile": "smoke", "jobs": 3})   # full differs


def test_reproduce_runs_side_by_side_only_stages_whose_inputs_exist():
    """With --jobs, 02 and the 03 trainings run side by side after 01 (beside it when the base model is a
    pretrained one, which 01 only shows), 06 and 07 side by side after 05; 01 (pretraining), 04 and 05 alone."""
    from deme.config import get_profile
    from deme.reproduce import _groups, stages
    for profile, first in (("smoke", [["01_base_model"]]), ("cifar10", [])):
        cfg = get_profile(profile)
        plan = stages(cfg)
        groups = [[stage[0] for _, stage in g] for g in _groups(plan, cfg)]
        trainings = [s[0] for s in plan if s[0].startswith("03_")]
        after_base = ([] if first else ["01_base_model"]) + ["02_gradient_conflict"] + trainings
        assert groups == first + [after_base, ["04_merge"], ["05_compare"], ["06_ablation", "07_gallery"]], profile
        assert [k for g in _groups(plan, cfg) for k, _ in g] == list(range(1, len(plan) + 1))


def test_only_the_full_run_of_the_embedded_default_publishes(tmp_path, monkeypatch):
    """fmnist's committed notebooks and figures are --full's (the paper's tables need its baselines): a default run
    leaves notebooks/ and figures/ as they are, timings aside (the README's Time block is the default run's), and
    its kernels write figures and tables to runs/fmnist/figures; a --full run publishes both. (Stages stubbed:
    what each would get — the publish flag and the figures folder its kernel inherits.)"""
    import os

    from deme import reproduce as R
    from deme.config import FIGURES_ENV, figures_dir
    seen = []

    def stage(k, n, name, notebook, params, *, cfg, update, **kw):
        seen.append((name, update, figures_dir(cfg)))
        return {"stage": name, "seconds": 1.0}
    monkeypatch.setattr(R, "_run_stage", stage)
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    monkeypatch.delenv(FIGURES_ENV, raising=False)
    R.reproduce("fmnist")
    assert seen and all(not update and folder == tmp_path / "runs" / "fmnist" / "figures" for _, update, folder in seen)
    assert (tmp_path / "figures" / "reproduce_time_fmnist.csv").exists() and FIGURES_ENV not in os.environ
    seen.clear()
    R.reproduce("fmnist", full=True, force=True)
    assert any(name == "03_train_p2" for name, _, _ in seen)
    assert all(update and folder == tmp_path / "figures" for _, update, folder in seen)
    assert (tmp_path / "figures" / "reproduce_time_fmnist_full.csv").exists()


def test_reproduce_keep_going_runs_the_stages_after_a_failure(tmp_path, monkeypatch):
    """With keep_going a failing notebook is reported, gets no record, and the next stage still runs;
    without it the failure stops the run."""
    import nbformat

    from deme import reproduce as R
    nbs = tmp_path / "nbs"
    nbs.mkdir()
    for name, code in (("01_base_model", "raise RuntimeError('planted failure')"),
                       ("02_gradient_conflict", f"open({str(tmp_path / 'ran.txt')!r}, 'w').write('ok')")):
        nb = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                               "display_name": "Python 3"}})
        nb.cells = [nbformat.v4.new_code_cell("profile = None", metadata={"tags": ["parameters"]}),
                    nbformat.v4.new_code_cell(code)]
        nbformat.write(nb, nbs / f"{name}.ipynb")
    monkeypatch.setattr(R, "NOTEBOOKS", nbs)
    monkeypatch.setenv("DEME_ROOT", str(tmp_path))
    out = R.reproduce("smoke", update_notebooks=False, keep_going=True)
    assert [r["stage"] for r in out] == ["01_base_model", "02_gradient_conflict"]
    assert "planted failure" in out[0]["failed"] and not out[1].get("failed")
    assert (tmp_path / "ran.txt").read_text() == "ok"
    stages_dir = tmp_path / "runs" / "smoke" / "stages"
    assert not (stages_dir / "01_base_model.json").exists() and (stages_dir / "02_gradient_conflict.json").exists()
    (tmp_path / "ran.txt").unlink()
    with pytest.raises(Exception, match="planted failure"):
        R.reproduce("smoke", update_notebooks=False)
    assert not (tmp_path / "ran.txt").exists()
