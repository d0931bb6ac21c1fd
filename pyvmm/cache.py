"""Where pyvmm keeps what it downloads and builds: ``$PYVMM_CACHE`` or
``~/.cache/pyvmm``.  A leaf module: every layer may use it, it uses none."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("PYVMM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pyvmm"


def cache_dir(name: str) -> Path:
    """A named subdirectory of the cache, created on first use."""
    d = cache_root() / name
    d.mkdir(parents=True, exist_ok=True)
    return d
