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


def no_gcc(monkeypatch, tmp_path) -> None:
    """gcc, ld, objcopy and nm are nowhere on PATH from here on."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))


def test_a_prebuilt_result_of_the_same_sources_is_used_first_and_needs_no_gcc(monkeypatch, tmp_path):
    prebuilt = tmp_path / "prebuilt"
    monkeypatch.setattr(toolchain, "PREBUILT_DIR", prebuilt)
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "wheel-build-cache"))
    with toolchain.exporting(prebuilt):          # what the wheel build does
        made = build_start(5)
    assert made.dir.parent == tmp_path / "wheel-build-cache"
    (shipped_dir,) = prebuilt.iterdir()
    assert shipped_dir.name.startswith("test-toolchain-")
    assert (shipped_dir / toolchain.BUILT_WITH_NAME).read_text().strip() == toolchain.gcc_version()

    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    assert build_start(5).dir == shipped_dir     # before the cache and gcc, even with gcc at hand
    no_gcc(monkeypatch, tmp_path)
    shipped = build_start(5)
    assert shipped.dir == shipped_dir
    assert shipped.flat == made.flat and shipped.symbols == made.symbols
    assert not (tmp_path / "cache").exists()     # nothing was built


def test_other_sources_than_the_prebuilt_ones_are_built_with_gcc(monkeypatch, tmp_path):
    prebuilt = tmp_path / "prebuilt"
    monkeypatch.setattr(toolchain, "PREBUILT_DIR", prebuilt)
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    with toolchain.exporting(prebuilt):
        build_start(5)
    other = build_start(6)                       # a define differs: its key too
    assert other.dir.parent == tmp_path / "cache"
    assert other.flat[:5] == b"\xb8\x06\x00\x00\x00"
    # the cache key, unlike the prebuilt one, has gcc's version in it
    monkeypatch.setattr(toolchain, "gcc_version", lambda: "gcc (another) 99.1")
    assert build_start(6).dir != other.dir
    assert build_start(5).dir.parent == prebuilt


def test_no_gcc_and_nothing_prebuilt_is_one_line_saying_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(toolchain, "PREBUILT_DIR", tmp_path / "no-such-dir")   # a checkout
    monkeypatch.setenv("PYVMM_CACHE", str(tmp_path / "cache"))
    no_gcc(monkeypatch, tmp_path)
    with pytest.raises(toolchain.ToolchainError) as e:
        build_start(7)
    assert str(e.value) == ("building test-toolchain needs 'gcc' on PATH and this pyvmm has no prebuilt copy "
                            "of it: install gcc and binutils (Debian: apt-get install gcc), or install pyvmm "
                            "from a wheel (shim and test guests prebuilt)")
    # an installed wheel: its prebuilt results are all there is, so only gcc helps
    (tmp_path / "prebuilt").mkdir()
    monkeypatch.setattr(toolchain, "PREBUILT_DIR", tmp_path / "prebuilt")
    with pytest.raises(toolchain.ToolchainError, match=r"apt-get install gcc\)$"):
        build_start(7)
    assert not (tmp_path / "cache").exists()
