"""The hypercall ownership table (xen_abi/hypervisor/hypercalls/table.py)
against what really handles each hypercall: the shim's C switches, the
Python dispatcher's handler map, and README.md's table."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pvfake import FakeDomain
from pyvmm.xen_abi.abi import Hypercall
from pyvmm.xen_abi.hypervisor.hypercalls.table import OWNERS, Owner, readme_rows

from repo import REPO
SHIM = REPO / "xen_abi" / "shim"
README = REPO / "README.md"
README_SECTION = "## Hypercalls: who handles each"

# Where the shim decides about a hypercall number: the hypercall switch, the
# events switch it falls through to, and the syscall entry (HYPERVISOR_iret).
SHIM_DISPATCH = ("shim.c:hypercall", "shim.c:events_or_python", "events.c:ev_hypercall",
                 "shim.c:shim_hypercall")


def c_function_body(path: Path, name: str) -> str:
    """The body of C function `name` in `path`, comments removed."""
    src = re.sub(r"/\*.*?\*/|//[^\n]*", "", path.read_text(), flags=re.S)
    m = re.search(rf"^[A-Za-z_][\w \t\*]*\b{name}\s*\([^)]*\)\s*\{{", src, re.M)
    if m is None:
        raise LookupError(f"no definition of {name}() in {path.name}")
    depth, start = 1, m.end()
    for i in range(start, len(src)):
        depth += {"{": 1, "}": -1}.get(src[i], 0)
        if depth == 0:
            return src[start:i]
    raise LookupError(f"unbalanced braces in {name}() of {path.name}")


def hypercalls_named_in(where: str) -> set:
    file, function = where.split(":")
    return {Hypercall[name] for name in re.findall(r"\bHC_(\w+)", c_function_body(SHIM / file, function))}


def test_every_hypercall_once_in_number_order():
    assert [e.hypercall for e in OWNERS] == sorted(Hypercall)


def test_split_and_unsupported_entries_say_why():
    for e in OWNERS:
        if e.owner in (Owner.SPLIT, Owner.UNSUPPORTED):
            assert e.note, e.hypercall.name


def test_shim_switches_take_exactly_the_shim_and_split_hypercalls():
    in_shim = set().union(*(hypercalls_named_in(w) for w in SHIM_DISPATCH))
    claimed = {e.hypercall for e in OWNERS if e.owner in (Owner.SHIM, Owner.SPLIT)}
    assert {h.name for h in in_shim} == {h.name for h in claimed}


@pytest.mark.parametrize("where", sorted({w for e in OWNERS for w in e.shim}))
def test_named_shim_functions_exist(where):
    file, function = where.split(":")
    c_function_body(SHIM / file, function)


def test_dispatcher_handles_exactly_the_python_and_split_hypercalls():
    dom = FakeDomain()
    try:
        handled = set(dom.dispatcher.handlers)
    finally:
        dom.close()
    assert handled == {e.hypercall for e in OWNERS if e.owner in (Owner.PYTHON, Owner.SPLIT)}


def test_readme_table_is_the_table():
    text = README.read_text()
    assert README_SECTION in text
    section = text.split(README_SECTION, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    assert rows == readme_rows(), \
        "README.md is out of date: paste `python -m pyvmm.xen_abi.hypervisor.hypercalls.table`"
