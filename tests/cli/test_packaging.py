"""pyproject.toml lists the installed packages by hand (the source folders
are mapped into one pyvmm namespace); a folder missing from that list works
in an editable checkout and breaks a real install."""
from __future__ import annotations

import fnmatch
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


def _folder(cfg, package: str):
    """The source folder of an installed package (the longest mapped prefix)."""
    parts = package.split(".")
    for n in range(len(parts), 0, -1):
        src = cfg["package-dir"].get(".".join(parts[:n]))
        if src is not None:
            return REPO.joinpath(src, *parts[n:])
    raise AssertionError(f"{package} has no package-dir")


def test_every_file_of_a_package_folder_is_installed():
    """What gcc reads (C, assembly, headers, linker scripts) ships as package
    data: a file no glob names is missing from a wheel, whose build of the
    prebuilt shim and test guests then fails, or from a plain install."""
    cfg = _setuptools()
    folders = {_folder(cfg, p): p for p in cfg["packages"]}
    unshipped = []
    for folder, package in folders.items():
        for f in folder.rglob("*"):
            if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts:
                continue
            owner = next(d for d in f.parents if d in folders)      # the nearest package folder
            if owner != folder:
                continue
            rel = f.relative_to(folder).as_posix()
            if not any(fnmatch.fnmatch(rel, g) for g in cfg["package-data"].get(package, ())):
                unshipped.append(f"{package}: {rel}")
    assert unshipped == [], "add globs for these to [tool.setuptools.package-data]"
