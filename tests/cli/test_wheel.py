"""The wheel: built from this checkout (with gcc), installed into a fresh
venv and run where no compiler can be found.  It carries the shim and the
test guests prebuilt, so a test guest boots with gcc, ld, objcopy and nm off
PATH and an empty pyvmm cache, and so does the default guest (`pyvmm
--default-guest`, issue 12's acceptance), its Debian downloads taken from
the cache.

The wheels of the dependencies (and of the build requirements) come from a
wheelhouse kept in the pyvmm cache: filled from PyPI on first use (or when
pyproject.toml asks for something it lacks), used offline afterwards.
Binary wheels only: installing pyvmm must need no compiler anywhere."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from pyvmm.cache import cache_dir
from pyvmm.errors import ExitStatus
from pyvmm.guests import testguests
from pyvmm.toolchain import TOOLS
from repo import REPO

PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
# what the build needs besides the package folders (pyproject.toml's package-dir)
BUILD_FILES = ("pyproject.toml", "setup.py", "README.md")


def _run(cmd, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kw)


def _wheelhouse(requirements: list[str]):
    """A folder with binary wheels for `requirements`: offline if it has them."""
    house = cache_dir("wheelhouse")
    fetch = [*PIP, "download", "--quiet", "--only-binary=:all:", "--dest", house, *requirements]
    if _run([*fetch, "--no-index", "--find-links", house]).returncode:
        online = _run(fetch)
        assert online.returncode == 0, f"cannot fetch the wheels of {requirements} from PyPI:\n{online.stderr}"
    return house


def _source_copy(dest):
    """The files a wheel is built from, away from the checkout: the build
    writes build/ and *.egg-info next to them."""
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    for name in BUILD_FILES:
        shutil.copy2(REPO / name, dest / name)
    for folder in set(cfg["package-dir"].values()):
        shutil.copytree(REPO / folder, dest / folder, ignore=shutil.ignore_patterns("__pycache__"))


@pytest.mark.slow
def test_the_wheel_boots_a_test_guest_and_the_default_guest_without_gcc(tmp_path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    house = _wheelhouse(project["build-system"]["requires"] + project["project"]["dependencies"])

    src = tmp_path / "src"
    src.mkdir()
    _source_copy(src)
    built = _run([*PIP, "wheel", "--quiet", "--no-deps", "--no-index", "--find-links", house,
                  "--wheel-dir", tmp_path / "dist", src])
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("pyvmm-*.whl")
    shipped = zipfile.ZipFile(wheel).namelist()
    for name in ["shim", *(f"testguests/{n}" for n in testguests.names())]:
        assert [f for f in shipped if f.startswith(f"pyvmm/prebuilt/{name}-") and f.endswith("/symbols.json")], \
            f"the wheel has no prebuilt {name}"

    # from here on: no compiler on PATH, a new venv, an empty cache
    no_tools = tmp_path / "bin"
    no_tools.mkdir()
    assert all(shutil.which(tool, path=str(no_tools)) is None for tool in TOOLS)
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(PATH=str(no_tools), PYVMM_CACHE=str(cache))
    venv = tmp_path / "venv"
    made = _run([sys.executable, "-m", "venv", "--without-pip", venv])
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    # this pip installs into the venv (pip --python: pip >= 22.3), as the venv's own would
    installed = _run([*PIP, "--python", python, "install", "--quiet", "--no-index", "--find-links", house,
                      "--only-binary=:all:", wheel], env=env, cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    # -I: nothing from the checkout, the user's site or PYTHON* variables
    where = _run([python, "-I", "-c", "import json, pyvmm, pyvmm.toolchain as t; "
                  "from pyvmm.guests.testguests import build_testguest as b; "
                  "print(json.dumps([pyvmm.__file__, str(t.PREBUILT_DIR), str(b('hello'))]))"],
                 env=env, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    package, prebuilt, hello = json.loads(where.stdout)
    assert package.startswith(str(venv) + "/"), package
    assert hello.startswith(prebuilt + "/testguests/hello-"), hello

    boot = _run([python, "-I", "-m", "pyvmm", "--xen-pv", hello, "--memory", "32M"], env=env, cwd=tmp_path)
    assert boot.returncode == ExitStatus.POWEROFF, boot.stdout + boot.stderr
    assert "TESTGUEST hello: PASS" in boot.stdout
    assert not cache.exists() or not any(cache.rglob("*")), "something was built, not taken from the wheel"

    # the README's guest, still without a compiler: Debian's kernel and the
    # initramfs come from the download cache (built here by the checkout,
    # as `make run` would have), the shim from the wheel
    from pyvmm.cache import cache_root
    from pyvmm.guests.default import DEFAULT_CMDLINE, POWEROFF_PARAM, build_default_guest

    build_default_guest(progress=False)
    cache.mkdir(exist_ok=True)
    for sub in ("debian", "guests"):
        (cache / sub).symlink_to(cache_root() / sub)
    boot = _run([python, "-I", "-m", "pyvmm", "--default-guest", "--cmdline", f"{DEFAULT_CMDLINE} {POWEROFF_PARAM}"],
                env=env, cwd=tmp_path, timeout=900)
    assert boot.returncode == ExitStatus.POWEROFF, boot.stdout[-2000:] + boot.stderr[-2000:]
    assert "pyvmm default guest ready" in boot.stdout
    assert not [p for p in cache.iterdir() if p.name not in ("debian", "guests")], \
        f"built without a compiler? {sorted(p.name for p in cache.iterdir())}"
