"""pyvmm/toolchain.py: cached gcc/ld builds and the errors a failed one gives."""
from __future__ import annotations

import pytest

from pyvmm import toolchain

START = ".globl _start\n_start:\n  movl $VALUE, %eax\n  hlt\n"


def build_start(value: int) -> toolchain.Built:
    return toolchain.build("test-toolchain", [toolchain.Source("start.S", START)],
                           defines={"VALUE": value}, link=toolchain.Link(address=0x10000, entry="_start"),
                           flat=["-j", ".text"])


def test_build_links_at_the_address_and_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    built = build_start(5)
    assert built.symbols["_start"] == 0x10000
    assert built.flat[:5] == b"\xb8\x05\x00\x00\x00"      # movl $5, %eax
    assert built.dir.parent == tmp_path and built.dir.name.startswith("test-toolchain-")
    assert build_start(5).dir == built.dir                  # same inputs: the cached result
    assert build_start(6).dir != built.dir                  # a define is part of the key
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no work dirs left


def test_a_failing_tool_is_named_with_its_stderr(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    with pytest.raises(toolchain.ToolchainError, match=r"(?s)gcc failed building broken.*no_such_insn"):
        toolchain.build("broken", [toolchain.Source("bad.S", "no_such_insn %eax\n")])
    assert not list(tmp_path.iterdir())


def test_a_missing_tool_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path))
    monkeypatch.setattr(toolchain.shutil, "which", lambda tool: None if tool == "objcopy" else "/usr/bin/" + tool)
    with pytest.raises(toolchain.ToolchainError, match="needs 'objcopy' on PATH"):
        build_start(7)
