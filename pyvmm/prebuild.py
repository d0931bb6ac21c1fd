"""Build what a wheel carries prebuilt: the shim and every test guest, into
the PREBUILT_DIR of the pyvmm this runs from (pyvmm/toolchain.py looks
there first), so that an installed wheel needs no gcc.

setup.py runs it on the tree it is packaging, with gcc; a checkout never
does (it builds on first use, into the cache).
"""
from __future__ import annotations

from pathlib import Path

from pyvmm import toolchain
from pyvmm.guests import testguests
from pyvmm.xen_abi.shim.build import build_shim


def prebuild() -> Path:
    """Fill toolchain.PREBUILT_DIR; returns it."""
    toolchain.PREBUILT_DIR.mkdir(parents=True, exist_ok=True)
    with toolchain.exporting(toolchain.PREBUILT_DIR):
        build_shim()
        for name in testguests.names():
            testguests.build_testguest(name)
    return toolchain.PREBUILT_DIR
