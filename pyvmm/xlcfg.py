"""xl domain configuration files (xl.cfg(5)): the grammar.

An xl config is `key = value` statements, one a line or separated by ';'.
A value is a "string" or 'string', a number, or a [list] of values that may
span lines and end with a comma; '#' starts a comment, and `key += value`
appends to an earlier string or list.  This module reads that grammar as
Xen's libxlu does (its flex lexer and bison parser), so a file xl accepts
reads the same here; it never evaluates the text as Python.

Where we part from libxlu: its \\x escapes always fail and its octal escapes
drop the character, so both are refused with a line that says so; and a
comment may end the file without a newline (libxlu wants one).
"""
from __future__ import annotations

from dataclasses import dataclass

from pyvmm.errors import UserError

#: Lists nested deeper than this are refused (no xl key nests more than one
#: level); it keeps the recursive parser well away from Python's stack limit.
MAX_NESTING = 16

# The escapes libxlu's dequote() decodes correctly.
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "a": "\a", "b": "\b", "f": "\f",
            "n": "\n", "r": "\r", "t": "\t", "v": "\v"}
_IDENT_START = frozenset("abcdefghijklmnopqrstuvwxyz")
_IDENT_REST = _IDENT_START | frozenset("._0123456789")
_DIGITS = frozenset("0123456789")
_NUMBER_REST = _DIGITS | frozenset("abcdefx")   # libxlu: [0-9][0-9a-fx]*
_NOT_PYTHON = ("; an xl config is not Python: values are \"strings\", whole numbers "
               "or [lists], and strings need quotes")


@dataclass(frozen=True)
class Source:
    """Where settings come from: the config file, or one KEY=VALUE override."""
    label: str          # 'guest.cfg', or "command line 'memory=512'"
    has_lines: bool     # a file has line numbers worth printing; an override is one line

    def where(self, line: int) -> str:
        return f"{self.label}:{line}" if self.has_lines else self.label


@dataclass(frozen=True)
class Atom:
    """A string or a number: libxlu keeps both as text and converts on use."""
    text: str
    line: int
    quoted: bool        # written as a "string", not a bare number


@dataclass(frozen=True)
class ValueList:
    items: tuple        # of Atom and ValueList
    line: int


@dataclass(frozen=True)
class Setting:
    key: str
    value: Atom | ValueList
    appended: bool      # the last assignment was `+=` (libxlu refuses that for numbers)
    line: int
    source: Source

    @property
    def where(self) -> str:
        return self.source.where(self.line)


@dataclass(frozen=True)
class _Token:
    kind: str           # IDENT NUMBER STRING NL EOF , [ ] = += ;
    text: str
    line: int


def _describe(tok: _Token) -> str:
    if tok.kind == "NL":
        return "the end of the line"
    if tok.kind == "EOF":
        return "the end of the file"
    if tok.kind == "STRING":
        return f"the string {tok.text!r}"
    return repr(tok.text)


def _tokens(text: str, source: Source) -> list[_Token]:
    """libxlu_cfg_l.l, rule for rule."""
    out: list[_Token] = []
    line, i, n = 1, 0, len(text)
    number_end = -1     # where the last number ended: letters right after it are a unit

    def fail(message: str) -> UserError:
        return UserError(f"{source.where(line)}: {message}")

    while i < n:
        c = text[i]
        if c in " \t":
            i += 1
        elif c == "\n":
            out.append(_Token("NL", "\n", line))
            line += 1
            i += 1
        elif c == "#":
            # a comment runs to the end of the line; libxlu wants a newline
            # after it even at the end of the file, we do not
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif (c.isalpha() or c == "_") and i == number_end:
            j = i
            while j < n and text[j].isalnum():
                j += 1
            raise fail(f"{out[-1].text + text[i:j]!r}: a number takes no unit or letters "
                       f"(memory and maxmem are in MiB)")
        elif c in _IDENT_START:
            j = i + 1
            while j < n and text[j] in _IDENT_REST:
                j += 1
            out.append(_Token("IDENT", text[i:j], line))
            i = j
        elif c in _DIGITS:
            j = i + 1
            while j < n and text[j] in _NUMBER_REST:
                j += 1
            out.append(_Token("NUMBER", text[i:j], line))
            i = number_end = j
        elif c in "'\"":
            i = _string(text, i, line, out, fail)
        elif text.startswith("+=", i):
            out.append(_Token("+=", "+=", line))
            i += 2
        elif c in ",[]=;":
            out.append(_Token(c, c, line))
            i += 1
        elif c == "\r":
            raise fail("carriage return: the file has DOS line endings; "
                       "convert it (dos2unix or sed -i 's/\\r$//')")
        elif c == "\0":
            raise fail("NUL byte: this is not a text file")
        elif c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] in "._"):
                j += 1
            word = text[i:j]
            raise fail(f"unexpected {word!r}: keys are lower-case letters, digits, '_' and '.'"
                       f" (e.g. {word.lower()!r}), and strings need quotes")
        else:
            raise fail(f"unexpected {c!r}{_NOT_PYTHON}")
    out.append(_Token("EOF", "", line))
    return out


def _string(text: str, i: int, line: int, out: list, fail) -> int:
    """A quoted string from text[i]; returns the index after its closing quote."""
    quote, j, n, chars = text[i], i + 1, len(text), []
    while True:
        if j >= n or text[j] == "\n":
            raise fail(f"unterminated string: close it with {quote} on the same line")
        c = text[j]
        if c == quote:
            out.append(_Token("STRING", "".join(chars), line))
            return j + 1
        if c == "\\":
            nc = text[j + 1] if j + 1 < n else ""
            if nc in _ESCAPES:
                chars.append(_ESCAPES[nc])
            elif nc == "x" or nc.isdigit():
                raise fail(f"escape '\\{nc}' in a string: xl does not decode numeric escapes "
                           f"(it refuses \\x and drops octal ones); write the character itself")
            elif nc in ("", "\n"):
                raise fail("unterminated string: a backslash cannot continue it onto the next line")
            else:
                raise fail(f"unknown escape '\\{nc}' in a string: xl knows \\\" \\' \\\\ "
                           f"\\a \\b \\f \\n \\r \\t \\v; write '\\\\' for a backslash")
            j += 2
        elif c == "\0":
            raise fail("NUL byte in a string: this is not a text file")
        else:
            chars.append(c)
            j += 1


class _Parser:
    """libxlu_cfg_y.y: statements end at a newline or ';'; inside [ ] a
    newline may follow '[', any value and any comma."""

    def __init__(self, tokens: list[_Token], source: Source, settings: dict[str, Setting]):
        self.toks, self.pos, self.source, self.settings = tokens, 0, source, settings

    def fail(self, tok: _Token, message: str) -> UserError:
        return UserError(f"{self.source.where(tok.line)}: {message}")

    def peek(self) -> _Token:
        return self.toks[self.pos]

    def take(self) -> _Token:
        tok = self.toks[self.pos]
        if tok.kind != "EOF":
            self.pos += 1
        return tok

    def skip_newlines(self) -> None:
        while self.peek().kind == "NL":
            self.take()

    def statements(self) -> None:
        while True:
            tok = self.take()
            if tok.kind == "EOF":
                return
            if tok.kind in ("NL", ";"):
                continue
            if tok.kind != "IDENT":
                raise self.fail(tok, f"expected a key (e.g. memory = 512), found {_describe(tok)}")
            op = self.take()
            if op.kind not in ("=", "+="):
                raise self.fail(op, f"expected '=' after {tok.text!r}, found {_describe(op)}")
            value = self.value(tok.text, 0)
            end = self.peek()
            if end.kind not in ("NL", ";", "EOF"):
                raise self.fail(end, f"{tok.text}: unexpected {_describe(end)} after the value; "
                                     f"one value per key, several in a [list]")
            self.store(tok, op.kind == "+=", value)

    def value(self, key: str, depth: int) -> Atom | ValueList:
        tok = self.take()
        if tok.kind in ("STRING", "NUMBER"):
            return Atom(tok.text, tok.line, tok.kind == "STRING")
        if tok.kind != "[":
            raise self.fail(tok, f"{key}: expected a value (\"string\", number or [list]), "
                                 f"found {_describe(tok)}")
        if depth >= MAX_NESTING:
            raise self.fail(tok, f"{key}: lists nested more than {MAX_NESTING} deep")
        items = []
        self.skip_newlines()
        while self.peek().kind != "]":
            if self.peek().kind == "EOF":
                raise self.fail(self.peek(), f"{key}: the list opened on line {tok.line} "
                                             f"is not closed: add ']'")
            items.append(self.value(key, depth + 1))
            self.skip_newlines()
            sep = self.peek()
            if sep.kind == ",":
                self.take()
                self.skip_newlines()
            elif sep.kind == "EOF":
                raise self.fail(sep, f"{key}: the list opened on line {tok.line} is not closed: add ']'")
            elif sep.kind != "]":
                raise self.fail(sep, f"{key}: expected ',' or ']' in the list opened on line "
                                     f"{tok.line}, found {_describe(sep)}")
        self.take()
        return ValueList(tuple(items), tok.line)

    def store(self, key_tok: _Token, appended: bool, value: Atom | ValueList) -> None:
        key = key_tok.text
        prev = self.settings.get(key)
        if appended and prev is not None:
            # libxlu: `+=` joins strings and lists with the key's latest value
            if isinstance(prev.value, Atom) and isinstance(value, Atom):
                value = Atom(prev.value.text + value.text, value.line, True)
            elif isinstance(prev.value, ValueList) and isinstance(value, ValueList):
                value = ValueList(prev.value.items + value.items, value.line)
            else:
                raise self.fail(key_tok, f"{key} += ...: cannot add a list to a single value "
                                         f"or a single value to a list ({key} was set at {prev.where})")
        # the latest assignment wins, as in xl: that is how overrides work
        self.settings[key] = Setting(key, value, appended, value.line, self.source)


def parse(text: str, source: Source, settings: dict[str, Setting] | None = None) -> dict[str, Setting]:
    """The settings in `text`, added to `settings` (later ones replace earlier)."""
    settings = {} if settings is None else settings
    _Parser(_tokens(text, source), source, settings).statements()
    return settings

