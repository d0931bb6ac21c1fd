"""xl config files (pyvmm/xlcfg.py) against random input: whatever the
text, load() returns a GuestConfig or raises UserError with one line;
nothing else escapes (no IndexError, RecursionError, UnicodeError...)."""
from __future__ import annotations

import pytest

import hypothesis  # noqa: E402  (the test extra has it)

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pyvmm.errors import UserError  # noqa: E402
from pyvmm.xlcfg import SUPPORTED_KEYS, GuestConfig, Source, load, load_text, parse  # noqa: E402

# no example database: nothing written into the checkout
FUZZ = settings(max_examples=200, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    (d / "vmlinuz").write_bytes(b"kernel")
    with open(d / "disk.img", "wb") as f:
        f.truncate(1 << 20)
    return d


def load_or_user_error(text: str, overrides=()) -> GuestConfig | None:
    try:
        return load_text(text, "fuzz.cfg", overrides)
    except UserError as e:
        message = str(e)
        assert len(message.splitlines()) == 1, message
        return None


def quote(s: str) -> str:
    """s as an xl string literal."""
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


# characters that matter to the grammar and to the spec parsers, and some that do not
_GRAMMAR = st.text(st.sampled_from(list("abckmxz019_.=+-[],;#'\"\\ \t\n\r:/%") + ["\0", "é", "\x7f"]),
                   max_size=80)
_SPEC = st.text(st.sampled_from(list("abcdefgimnoprstvwxyz0123456789:,=/. -_%") + ["\t", "\n"]),
                max_size=60)


@FUZZ
@given(st.text(max_size=200))
def test_any_text(text):
    load_or_user_error(text)


@FUZZ
@given(_GRAMMAR)
def test_grammar_soup(text):
    try:
        parse(text, Source("fuzz.cfg", True))
    except UserError as e:
        assert len(str(e).splitlines()) == 1, str(e)


@FUZZ
@given(_GRAMMAR, st.lists(_GRAMMAR, max_size=3))
def test_overrides(text, overrides):
    load_or_user_error(text, overrides)


@FUZZ
@given(st.text(st.characters(blacklist_characters="\0"), max_size=40))
def test_strings_read_back(s):
    assert parse(f"a = {quote(s)}", Source("fuzz.cfg", True))["a"].value.text == s


_ATOM = st.one_of(st.integers(-5, 1 << 20).map(str), st.integers(0, 4096).map(hex),
                  st.text(max_size=20).filter(lambda s: "\0" not in s).map(quote))
_VALUE = st.recursive(_ATOM, lambda inner: st.lists(inner, max_size=4).map(
    lambda items: "[ " + ", ".join(items) + " ]"), max_leaves=8)
# values near what each key takes, so that random configs also get past the
# first check and into the later ones ({dir} is where the files are)
_LIKELY = {
    "name": ['"g2"', '"bad name"', "42"],
    "type": ['"pv"', '"hvm"', '"p"'],
    "builder": ['"generic"', '"hvm"'],
    "kernel": ['"{dir}/vmlinuz"', '"nope"', '"{dir}"'],
    "ramdisk": ['"{dir}/vmlinuz"', '""'],
    "cmdline": ['"console=hvc0"', '""'],
    "root": ['"/dev/xvda"'],
    "extra": ['"quiet"', '" more"'],
    "memory": ["512", "0x100", "16", "8", '"256"', "0777", "65536", "65537"],
    "maxmem": ["512", "256"],
    "vcpus": ["1", "0", "2"],
    "maxvcpus": ["1", "0", "2"],
    "on_poweroff": ['"destroy"', '"restart"'],
    "on_reboot": ['"restart"', '"destroy"', '"preserve"'],
    "on_crash": ['"destroy"', '"coredump-restart"', '"x"'],
    "uuid": ['"3f2504e0-4f89-11d3-9a0c-0305e82c3301"', '"3f2504e0"'],
    "disk": ['[ "{dir}/disk.img,,xvda" ]', '[ "{dir}/disk.img,,xvdb,ro" ]', '[ ]',
             '[ "vdev=xvdc, target={dir}/disk.img" ]'],
    "vif": ['[ "" ]', '[ "bridge=br0", "mac=00:16:3e:00:00:01" ]', '[ "vifname=v0" ]',
            '[ "rate=10Mb/s@20ms" ]', '[ "rate=0B/s" ]'],
    "cpu_weight": ["256", "0", "70000"],
    "cap": ["0", "50", "-1", "100000"],
    "kernal": ['"x"'],
}
_ASSIGNMENT = st.sampled_from(sorted(_LIKELY)).flatmap(lambda key: st.tuples(
    st.just(key), st.sampled_from(["=", "=", "=", "+="]),
    st.one_of(st.sampled_from(_LIKELY[key]), st.sampled_from(_LIKELY[key]), _VALUE)))


def test_every_key_is_fuzzed():
    assert SUPPORTED_KEYS <= set(_LIKELY)


@FUZZ
@given(st.lists(_ASSIGNMENT, max_size=8))
def test_random_settings(files, assignments):
    text = f'name = "g"\nkernel = "{files / "vmlinuz"}"\n'
    text += "\n".join(f"{k} {op} {v}" for k, op, v in assignments).replace("{dir}", str(files))
    g = load_or_user_error(text)
    if g is not None:
        assert g.kernel.is_absolute() and g.memory_bytes >= 16 << 20


@FUZZ
@given(st.lists(_SPEC, min_size=1, max_size=3))
def test_random_disk_specs(files, specs):
    text = f'name = "g"\nkernel = "{files / "vmlinuz"}"\ndisk = [ {", ".join(map(quote, specs))} ]'
    load_or_user_error(text)


@FUZZ
@given(st.lists(st.lists(st.one_of(_SPEC, st.sampled_from(
    [f"target={'{img}'}", "vdev=xvda", "vdev=xvdb", "raw", "xvda", "ro", "phy:", "file:",
     "cdrom", "format=raw", "access=rw"])), max_size=6), min_size=1, max_size=3))
def test_disk_spec_pieces(files, pieces):
    specs = [",".join(p).replace("{img}", str(files / "disk.img")) for p in pieces]
    text = f'name = "g"\nkernel = "{files / "vmlinuz"}"\ndisk = [ {", ".join(map(quote, specs))} ]'
    g = load_or_user_error(text)
    if g is not None:
        assert [d.vdev for d in g.disks] == [f"xvd{'abcdefghijklmnop'[i]}" for i in range(len(g.disks))]


@FUZZ
@given(st.lists(st.lists(st.one_of(_SPEC, st.sampled_from(
    ["mac=00:16:3e:00:00:01", "mac=01:00:00:00:00:00", "bridge=br0", "vifname=v0", "model=e1000",
     "type=vif", "ip=1.2.3.4", "script=x", "trusted", ""])), max_size=5), min_size=1, max_size=3))
def test_random_vif_specs(files, pieces):
    specs = [",".join(p) for p in pieces]
    text = f'name = "g"\nkernel = "{files / "vmlinuz"}"\nvif = [ {", ".join(map(quote, specs))} ]'
    g = load_or_user_error(text)
    if g is not None:
        assert len(g.vifs) == len(specs) and len({v.mac for v in g.vifs}) == len(specs)


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_any_bytes_in_a_file(files, data):
    path = files / "bytes.cfg"
    path.write_bytes(data)
    try:
        load(path)
    except UserError as e:
        assert len(str(e).splitlines()) == 1, str(e)
