"""The project's errors, in one place. Each says what is missing or wrong and what to do about it; the
loaders, the merge and the image-caption reader raise them, notebooks let them through, and the command line
(:func:`reported`) ends on one of them with its message as one line on stderr and a non-zero exit status — no
traceback unless asked for (``--debug`` or ``DEME_DEBUG=1``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

DEBUG_ENV = "DEME_DEBUG"
"""Set to anything but "" or "0" to see the traceback of a project error on the command line (as ``--debug``)."""


class DataMissingError(FileNotFoundError):
    """A dataset is not on disk and cannot be fetched; the message says how to provide it."""


class WeightsMissingError(FileNotFoundError):
    """Pretrained weights are neither on disk nor reachable; the message says what to provide."""


class CorruptImageError(ValueError):
    """An image file that cannot be decoded."""


class MergeMismatchError(ValueError):
    """Checkpoints that cannot be merged: different keys or shapes."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class SettingsError(ValueError):
    """A profile, setting or command-line value that is not valid (an unknown profile, a range index out of
    bounds, ...); the message says which values are."""


PROJECT_ERRORS = (DataMissingError, WeightsMissingError, CorruptImageError, MergeMismatchError,
                  NonFiniteLossError, SettingsError)
"""The errors the command line reports as one line (:func:`reported`); any other exception keeps its traceback."""


T = TypeVar("T")


def checked_settings(make: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``make(*args, **kwargs)`` — a profile with its overrides, say — with the ``ValueError`` of its checks
    (an unknown profile, a range index out of bounds) raised as a :class:`SettingsError`."""
    try:
        return make(*args, **kwargs)
    except ValueError as e:
        raise SettingsError(str(e)) from e


def debug_requested(flag: bool = False) -> bool:
    """``flag`` (a command's ``--debug``) or ``$DEME_DEBUG`` set to anything but "" or "0"."""
    return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


@contextlib.contextmanager
def reported(prog: str, *, debug: bool = False) -> Iterator[None]:
    """Run a command-line entry point's body: a project error (:data:`PROJECT_ERRORS`) raised inside ends the
    process with one line on stderr, ``<prog>: error: <message>``, and exit status 1 (as argparse ends on a bad
    argument), unless :func:`debug_requested` (``debug`` is the command's ``--debug``), when it propagates with
    its traceback."""
    try:
        yield
    except PROJECT_ERRORS as e:
        if debug_requested(debug):
            raise
        hint = f" (see `{prog} --help`)" if isinstance(e, SettingsError) else ""
        message = " ".join(str(e).split())       # one line, whatever the message's layout
        raise SystemExit(f"{prog}: error: {message}{hint}") from None
