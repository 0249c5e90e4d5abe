"""Locates planer's per-user cache (exported models, fixtures, latency profiles)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Returns (and creates) a folder under the planer cache.

    `PLANER_CACHE_DIR` overrides the location; otherwise `$XDG_CACHE_HOME/planer`
    or `~/.cache/planer`.
    """
    root = os.environ.get("PLANER_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "planer"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
