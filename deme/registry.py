"""The one way entries join a registry (training methods, merge methods, datasets): a dict from name to a frozen
description, in table order, extended by ``register_*`` — e.g. from a notebook or a plug-in module."""

from __future__ import annotations

from typing import Protocol, TypeVar


class Named(Protocol):
    name: str


E = TypeVar("E", bound=Named)


def add_entry(registry: dict[str, E], entry: E, kind: str) -> E:
    """Add ``entry`` under ``entry.name``; a name already taken is refused (an entry is never replaced
    silently)."""
    if entry.name in registry:
        raise ValueError(f"a {kind} named {entry.name!r} is already registered")
    registry[entry.name] = entry
    return entry
