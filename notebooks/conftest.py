"""``pytest --nbval-lax notebooks/``: every notebook executed top to bottom under the ``smoke`` profile in a
temporary root; the run fails on any cell that raises.

Why ``--nbval-lax`` and not ``--nbval``: the committed notebooks hold the outputs of the embedded default
(fmnist: its numbers, timings and figures), and a smoke run prints other numbers in every cell, so comparing
outputs cell by cell would fail everywhere; ``-lax`` executes every cell and checks only errors (and the
outputs of cells marked ``# NBVAL_CHECK_OUTPUT``, none so far).

What this file does, for nbval's items only:

* **papermill's injected parameters are skipped.** ``make reproduce`` executes the notebooks with papermill,
  which adds a cell tagged ``injected-parameters`` after the ``parameters`` cell (``profile = "fmnist"``, and
  e.g. notebook 06's ``budgets = [30, 75, 300]``); replayed by nbval it would switch the run back to fmnist
  sizes. Skipping exactly those cells leaves each notebook on its own defaults (``profile = None``: the
  profile comes from ``$DEME_PROFILE``, set to ``smoke`` here) — the cells a reader runs in Jupyter.
* **A temporary root.** ``DEME_ROOT`` (see :func:`deme.config.repo_root`) points the kernels at a new temporary
  folder (removed at the end; ``--deme-root DIR`` keeps the run in DIR instead), so nothing is written into
  the repository: the smoke base model, trainings, figures and tables all go there.
* **Stage order.** nbval runs the notebooks in file order (01, 02, ...), but 04-07 read the trainings of
  notebook 03, which the notebook runs once per range and baseline (``python -m deme reproduce`` passes
  ``-p range k`` / ``-p method m``). When any of 04-07 is collected, the same command makes them first:
  ``python -m deme reproduce --profile smoke --only 01 03`` into the temporary root (seconds per stage);
  nbval's own run of 01 and 03 then executes them once more with their defaults (range 0, which resumes
  from its finished checkpoint).
* The kernels run the Python that runs pytest (nbval's ``--nbval-current-env``), so they import the same
  ``deme``, unless ``--nbval-kernel-name`` names another kernel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

INJECTED = "injected-parameters"
NEED_TRAININGS = {"04_merge.ipynb", "05_compare.ipynb", "06_ablation.ipynb", "07_gallery.ipynb"}
OUTPUT_TIMEOUT_S = 120
SKIP_REASON = ("papermill's injected parameters of the committed (fmnist) run; the notebook's own defaults "
               "apply (profile from $DEME_PROFILE=smoke)")


def pytest_addoption(parser):
    parser.addoption("--deme-root", default=None,
                     help="folder for the smoke run of the notebooks (kept); default: a temporary folder, removed")


def pytest_configure(config):
    if not config.getoption("nbval_kernel_name", None) and hasattr(config.option, "nbval_current_env"):
        config.option.nbval_current_env = True


def _nbval_cells(items):
    return [i for i in items if type(i).__name__ == "IPyNbCell" and hasattr(i, "cell")]


def pytest_collection_modifyitems(session, config, items):
    cells = _nbval_cells(items)
    if not cells:
        return
    for item in cells:
        if INJECTED in item.cell.get("metadata", {}).get("tags", []):
            item.add_marker(pytest.mark.skip(reason=SKIP_REASON))
        # nbval waits 5 s for each output message after a cell finished and, past that, stops the kernel and
        # fails the rest of the notebook; on a busy CI machine a training cell's last messages can take longer
        item.output_timeout = max(getattr(item, "output_timeout", 5), OUTPUT_TIMEOUT_S)
    if config.option.collectonly:
        return
    keep = config.getoption("deme_root")
    root = Path(keep).resolve() if keep else Path(tempfile.mkdtemp(prefix="deme_nbval_"))
    root.mkdir(parents=True, exist_ok=True)
    if not keep:
        config._deme_nbval_tmp_root = root
    # read by the kernels nbval starts (they inherit this process's environment)
    os.environ.update(DEME_ROOT=str(root), DEME_PROFILE="smoke", HF_HUB_OFFLINE="1", MPLBACKEND="Agg",
                      TQDM_DISABLE="1")
    names = {Path(str(i.path)).name for i in cells}
    if names & NEED_TRAININGS:
        cmd = [sys.executable, "-m", "deme", "reproduce", "--profile", "smoke", "--only", "01", "03",
               "--no-update-notebooks", "--jobs", "2"]
        proc = subprocess.run(cmd, env=os.environ.copy(), capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.exit(f"the trainings the notebooks read could not be made ({' '.join(cmd[1:])}, "
                        f"DEME_ROOT={root}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}", returncode=1)


def pytest_unconfigure(config):
    root = getattr(config, "_deme_nbval_tmp_root", None)
    if root is not None:
        shutil.rmtree(root, ignore_errors=True)
