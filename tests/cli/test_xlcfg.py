"""xl config files (pyvmm/xlcfg.py): the grammar as xl reads it, and every
mistake as one line that names the file, the line and the key."""
from __future__ import annotations

import pytest

from pyvmm.errors import UserError
from pyvmm.xlcfg import Atom, Source, ValueList, parse

FILE = Source("guest.cfg", True)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert "\n" not in message and message.strip() == message, message
    return message


def values(text: str) -> dict:
    """Each key's value as plain Python: str for atoms, list for lists."""
    def plain(v):
        return v.text if isinstance(v, Atom) else [plain(i) for i in v.items]
    return {k: plain(s.value) for k, s in parse(text, FILE).items()}


# ---------------------------------------------------------------- grammar
def test_strings_numbers_and_lists():
    got = values('''# a comment
name = "web"    # trailing comment
kernel='/boot/vmlinuz'
memory = 512; vcpus = 1
maxmem=0x200
disk = [ 'a.img,raw,xvda,rw',
         "b.img,,xvdb",   # a comment inside a list
       ]
vif = []
nested = [ [1, 2], ["x"] ]
''')
    assert got == {"name": "web", "kernel": "/boot/vmlinuz", "memory": "512", "vcpus": "1",
                   "maxmem": "0x200", "disk": ["a.img,raw,xvda,rw", "b.img,,xvdb"], "vif": [],
                   "nested": [["1", "2"], ["x"]]}


def test_list_newlines_where_xl_allows_them():
    assert values("disk = [\n\n'a'\n,\n'b'\n,\n]")["disk"] == ["a", "b"]
    assert values("disk = [\n]")["disk"] == []


def test_escapes_xl_decodes():
    assert values(r'''a = "q\"q\'\\ \a\b\f\n\r\t\v" ''')["a"] == "q\"q'\\ \a\b\f\n\r\t\v"
    assert values(r"""a = 'it\'s' """)["a"] == "it's"
    assert values("""a = "it's" ; b = 'say "hi"'""") == {"a": "it's", "b": 'say "hi"'}


def test_the_last_assignment_wins():
    assert values("memory = 256\nmemory = 512")["memory"] == "512"


def test_plus_equals_joins_strings_and_lists():
    got = values('extra = "console=hvc0"\nextra += " quiet"\ndisk = ["a"]\ndisk += ["b", "c"]')
    assert got == {"extra": "console=hvc0 quiet", "disk": ["a", "b", "c"]}
    assert values('extra += "x"')["extra"] == "x"


def test_settings_remember_where_they_were_set():
    s = parse('name = "a"\n\ndisk = [\n "x",\n "y" ]', FILE)
    assert s["name"].where == "guest.cfg:1" and s["disk"].where == "guest.cfg:3"
    assert [i.line for i in s["disk"].value.items] == [4, 5]
    assert isinstance(s["disk"].value, ValueList)


def test_last_line_needs_no_newline_and_comment_at_eof():
    assert values('name = "a"') == {"name": "a"}
    assert values('name = "a"\n# the end') == {"name": "a"}


@pytest.mark.parametrize("text, line, fragments", [
    ('name = "web', 1, ["unterminated string"]),
    ("name = 'web\n'", 1, ["unterminated string"]),
    ('a = 1\ndisk = [ "a",\n "b"\n', 4, ["disk", "list opened on line 2 is not closed"]),
    ('disk = [ "a" "b" ]', 1, ["expected ',' or ']'"]),
    ('disk = [ , ]', 1, ["expected a value"]),
    ("memory = 512M", 1, ["'512M'", "no unit", "MiB"]),
    ("memory = 512m", 1, ["'512m'", "no unit"]),
    ("memory = 512 256", 1, ["memory", "after the value"]),
    ('Name = "web"', 1, ["'Name'", "lower-case", "'name'"]),
    ("memory = 3.5", 1, ["'.'", "not Python"]),
    ("memory = 256 * 2", 1, ["'*'", "not Python"]),
    ('kernel = /boot/vmlinuz', 1, ["'/'", "strings need quotes"]),
    ('name = "a"\r\n', 1, ["DOS line endings"]),
    ('a = 1\nname = "\\x41"', 2, ["\\x", "write the character itself"]),
    ('name = "\\101"', 1, ["\\1", "octal"]),
    ('name = "\\q"', 1, ["unknown escape '\\q'"]),
    ('name = "a\\\nb"', 1, ["unterminated string"]),
    ("name", 1, ["expected '=' after 'name'"]),
    ("name =", 1, ["name: expected a value"]),
    ("name = \n'a'", 1, ["name: expected a value"]),
    ('= "a"', 1, ["expected a key"]),
    ('"a"', 1, ["expected a key"]),
    ("a = [1]\na += 'x'", 2, ["cannot add", "guest.cfg:1"]),
    ("a = " + "[" * 40 + "]" * 40, 1, ["nested more than"]),
    ('name = "a\0"', 1, ["NUL"]),
])
def test_syntax_errors_name_the_line(text, line, fragments):
    message = one_line_error(parse, text, FILE)
    assert message.startswith(f"guest.cfg:{line}: "), message
    for f in fragments:
        assert f in message, (f, message)


def test_an_override_has_no_line_number():
    source = Source("command line 'memory=512M'", False)
    message = one_line_error(parse, "memory=512M", source)
    assert message.startswith("command line 'memory=512M': "), message
