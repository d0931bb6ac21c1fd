"""pyproject.toml lists the installed packages by hand (the source folders
are mapped into one pyvmm namespace); a folder missing from that list works
in an editable checkout and breaks a real install."""
from __future__ import annotations

import tomllib

from repo import REPO


def _setuptools():
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_python_package_folder_is_installed():
    cfg = _setuptools()
    folders = set()
    for name, src in cfg["package-dir"].items():
        for init in (REPO / src).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / src)
            folders.add(".".join((name, *rel.parts)))
    # sub-folders of mapped folders may also be mapped themselves
    assert folders - set(cfg["packages"]) == set(), "add these to [tool.setuptools] packages"
    assert set(cfg["packages"]) - folders == set(), "these packages have no folder"
