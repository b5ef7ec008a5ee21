"""Progress bars: ``tqdm.auto.tqdm`` that also honours ``$TQDM_DISABLE`` when a caller passes ``disable=False``.

tqdm reads ``TQDM_DISABLE`` only for arguments the caller leaves at their default, and every loop here passes
``disable=not progress``, so the variable alone did not silence them. ``python -m deme reproduce`` sets it: the
executed notebooks are read on GitHub and in Colab, where a progress widget renders as a stray "0%| 0/8" line.
"""

from __future__ import annotations

import os

from tqdm.auto import tqdm as _tqdm


def tqdm(iterable=None, *, disable: bool = False, **kwargs):
    """``tqdm.auto.tqdm(iterable, **kwargs)``, off when ``disable`` or when ``$TQDM_DISABLE`` is set (not "",
    "0" or "false")."""
    off = os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false")
    return _tqdm(iterable, disable=disable or off, **kwargs)
