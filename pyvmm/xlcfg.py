"""xl domain configuration files (xl.cfg(5)) as guests pyvmm can launch.

    load("guest.cfg", ["memory=512"]) -> GuestConfig   (UserError: one line)

The grammar: `key = value` statements, one a line or separated by ';'.
A value is a "string" or 'string', a number, or a [list] of values that may
span lines and end with a comma; '#' starts a comment, and `key += value`
appends to an earlier string or list.  This module reads that grammar as
Xen's libxlu does (its flex lexer and bison parser), so a file xl accepts
reads the same here; it never evaluates the text as Python.

The keys: those of a PV guest pyvmm can run (SUPPORTED_KEYS), with xl's
meaning and defaults; disk and vif entries in xl's spec syntax.  Every
other key is refused with a line, where xl would ignore one it does not
know: a setting that silently does nothing misleads.  Paths are used as
given, a relative one from the current directory, as xl does (not from the
config file's directory); GuestConfig holds them absolute.

Where we part from libxlu: its \\x escapes always fail and its octal escapes
drop the character, so both are refused with a line that says so; and a
comment may end the file without a newline (libxlu wants one).
"""
from __future__ import annotations

import difflib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

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
            shown = f"'\\{nc}'" if nc.isprintable() else f"'\\' and {nc!r}"
            if nc in _ESCAPES:
                chars.append(_ESCAPES[nc])
            elif nc == "x" or (nc and nc in "0123456789"):
                raise fail(f"escape {shown} in a string: xl does not decode numeric escapes "
                           f"(it refuses \\x and drops octal ones); write the character itself")
            elif nc in ("", "\n"):
                raise fail("unterminated string: a backslash cannot continue it onto the next line")
            else:
                raise fail(f"unknown escape {shown} in a string: xl knows \\\" \\' \\\\ "
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


# ------------------------------------------------------------ the guest
# The top-level keys xl reads (tools/xl/xl_parse.c), so that a key pyvmm
# refuses is told apart from a typo: xl ignores unknown keys silently.
XL_KEYS = frozenset("""
acpi acpi_firmware acpi_laptop_slate acpi_s3 acpi_s4 altp2m altp2m_count altp2mhvm apic
arm_sci bios bios_path_override boot bootloader bootloader_args bootloader_restrict
bootloader_user builder cap channel cmdline cpu_weight cpuid cpus cpus_soft device_model
device_model_args device_model_override device_model_stubdomain_override
device_model_stubdomain_seclabel device_model_user device_model_version device_tree disk
display dm_restrict driver_domain dtdev e820_host extra extratime firmware firmware_override
gfx_passthru gic_version hap hdtype hpet hvm_pirq init_seclabel iomem ioports irqs kernel
keymap latency llc_colors localtime max_event_channels max_grant_frames max_grant_version
max_maptrack_frames maxmem maxvcpus mca_caps memory mmio_hole ms_vm_genid msr_relaxed name
nestedhvm nographic nomigrate nr_spis nx on_crash on_poweroff on_reboot on_soft_reset
on_watchdog oos opengl p9 pae passthrough pci pci_msitranslate pci_permissive pci_power_mgmt
pci_seize period pool pvcalls pvshim pvshim_cmdline pvshim_extra pvshim_path ramdisk rdm
rdm_mem_boundary root rtc_timeoffset sdl seclabel serial shadow_memory slice smbios
smbios_firmware soundhw spice spice_clipboard_sharing spice_image_compression
spice_streaming_video spiceagent_mouse spicedisable_ticketing spicehost spicepasswd spiceport
spicetls_port spiceusbredirection spicevdagent stdvga stubdomain_cmdline stubdomain_kernel
stubdomain_memory stubdomain_ramdisk sve tee timer_mode trap_unmapped_accesses tsc_mode type
usb usbctrl usbdev usbdevice usbversion uuid vcpus vdispl vendor_device vfb vga videoram vif
vif2 viridian virtio vkb vkb_device vmtrace_buf_kb vnc vncdisplay vnclisten vncpasswd
vncunused vncviewer vnuma vpmu vpt_align vsnd vtpm vuart xauthority xen_platform_pci
xen_platform_pci_bar_uc xend_suspend_evtchn_compat xenstore_feature_mask xenstore_quota
""".split())

# Every key pyvmm reads.  Nothing else is accepted, not even keys xl knows
# and pyvmm could skip: a setting that silently does nothing (a display, a
# CPU pool, a watchdog action) misleads more than a line that says so.
SUPPORTED_KEYS = frozenset("""
name type builder kernel ramdisk cmdline root extra memory maxmem vcpus maxvcpus
on_poweroff on_reboot on_crash uuid disk vif cpu_weight cap
""".split())

# Why some keys xl knows are refused, where "not supported" alone would not help.
_NO_DISPLAY = "it has no graphical console (the guest's console is hvc0 on pyvmm's terminal)"
_UNSUPPORTED_WHY = {
    "bootloader": "it boots the kernel directly; copy the guest's kernel and initrd out, "
                  "set kernel = and ramdisk = and remove bootloader",
    "firmware": "it boots the kernel directly; set kernel = (and ramdisk =) and remove firmware",
    "vfb": _NO_DISPLAY,
    "vnc": _NO_DISPLAY,
    "sdl": _NO_DISPLAY,
    "pci": "it passes no host devices through",
    "on_watchdog": "it has no watchdog",
    "on_soft_reset": "it has no soft reset",
}

#: xl's actions (on_poweroff, on_reboot, on_crash), xl.cfg(5) "Event Actions".
XL_ACTIONS = ("destroy", "restart", "rename-restart", "preserve", "coredump-destroy",
              "coredump-restart", "soft-reset")
#: What pyvmm can do, the first being xl's default.  pyvmm ends when the
#: guest powers off or crashes ("destroy": exit status 0 or 1); on reboot it
#: builds the guest again ("restart") or exits with status 3 ("destroy",
#: which is --on-reboot=exit).
ACTIONS = {
    "on_poweroff": ("destroy",),
    "on_reboot": ("restart", "destroy"),
    "on_crash": ("destroy",),
}
#: libxl's memory when the config gives neither memory nor maxmem (MiB).
XL_DEFAULT_MEMORY_MIB = 32
#: xl's bridge when a vif names none (xl.conf default_bridge).
XL_DEFAULT_BRIDGE = "xenbr0"

#: A config larger than this is not one (a typical one is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20

_XVD_LETTERS = "abcdefghijklmnop"   # xvda..xvdp: pyvmm's 16 disks (cli.MAX_DISKS)


@dataclass(frozen=True)
class DiskSpec:
    path: Path          # absolute: a relative target is taken from the current directory, as xl does
    vdev: str           # xvda, xvdb, ... : disks are sorted by vdev, with no gaps
    readonly: bool

    @property
    def index(self) -> int:
        """The disk's place among pyvmm's disks: xvda is 0."""
        return _XVD_LETTERS.index(self.vdev[3])


@dataclass(frozen=True)
class VifSpec:
    mac: str            # lower case; when the config gives none, pyvmm's stable one for the guest
    bridge: str         # the host bridge to add the guest's TAP to (xl's default: xenbr0)
    vifname: str | None  # the host TAP's name; None: the launcher picks one
    rate: int | None = None  # bytes/s the guest may send (xl's rate=), None: no limit


@dataclass(frozen=True)
class GuestConfig:
    """A guest as an xl config describes it, checked against what pyvmm can run.

    Left to the launcher: the command line when `cmdline` is None (xl would
    boot with an empty one), a TAP name when a vif has no `vifname`, and
    opening (and locking) the disks, which are only known to exist."""
    name: str
    kernel: Path        # absolute, readable
    ramdisk: Path | None
    cmdline: str | None  # None: the config sets none of cmdline, root, extra
    memory_bytes: int
    disks: tuple[DiskSpec, ...]
    vifs: tuple[VifSpec, ...]
    on_poweroff: str    # an xl action from ACTIONS
    on_reboot: str
    on_crash: str
    uuid: str | None
    source_path: Path
    warnings: tuple[str, ...] = ()  # one line each: settings xl itself would ignore
    cpu_weight: int | None = None   # xl's credit weight (pyvmm/limits.py); None: not set
    cap: int | None = None          # % of one CPU; None or 0: no cap
    vcpus: int = 1                  # online at boot
    maxvcpus: int = 1               # the most the guest may bring up (pyvmm vcpu-set)

    @property
    def on_reboot_flag(self) -> str:
        """on_reboot as pyvmm's --on-reboot says it."""
        return "restart" if self.on_reboot == "restart" else "exit"


def load(path: str | os.PathLike, overrides: Sequence[str] = ()) -> GuestConfig:
    """Read the xl config at `path`, then each KEY=VALUE of `overrides` (as
    `xl create FILE KEY=VALUE...` takes them: the value in the file's syntax,
    applied after the file).  A mistake raises UserError, one line."""
    label = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise UserError(f"config file {label!r} does not exist: check the path") from None
    except IsADirectoryError:
        raise UserError(f"config file {label!r} is a directory: give the file itself") from None
    except PermissionError:
        raise UserError(f"config file {label!r} is not readable: check its permissions") from None
    except OSError as e:
        raise UserError(f"config file {label!r}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"config file {label!r} is over {MAX_CONFIG_BYTES >> 10} KiB: "
                        f"not an xl config (is it a disk image or a kernel?)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        shown = label if label.isprintable() else repr(label)
        raise UserError(f"{shown}:{line}: not UTF-8 text: is this an xl config file?") from None
    return load_text(text, label, overrides, source_path=Path(path))


def load_text(text: str, label: str, overrides: Sequence[str] = (), *,
              source_path: Path | None = None) -> GuestConfig:
    """`load` of a config already read: `label` names it in messages."""
    source_path = Path(label) if source_path is None else source_path
    label = label if label.isprintable() else repr(label)   # each message is one line
    settings = parse(text, Source(label, True))
    for item in overrides:
        source = Source(f"command line {item!r}", False)
        key, eq, _ = item.partition("=")
        if not eq or not key.strip():
            raise UserError(f"{source.label}: an override is KEY=VALUE, e.g. memory=512 "
                            f"or 'kernel=\"/boot/vmlinuz\"'")
        parse(item, source, settings)
    return _Guest(settings, label).build(source_path)


class _SpecError(Exception):
    """What is wrong with one disk or vif spec (the caller says which)."""


class _Guest:
    """Settings to GuestConfig, key by key; the first mistake is the one line."""

    def __init__(self, settings: dict[str, Setting], label: str):
        self.s, self.label, self.warnings = settings, label, []

    def build(self, source_path: Path) -> GuestConfig:
        # cli imports this module: take its limits at call time, so either loads first
        from pyvmm import cli

        self.cli = cli
        self.check_keys()
        self.check_type()
        name = self.name()
        kernel = self.file("kernel", required=True)
        ramdisk = self.file("ramdisk")
        cmdline = self.cmdline()
        memory = self.memory()
        vcpus, maxvcpus = self.vcpus()
        cpu_weight, cap = self.scheduling()
        actions = {key: self.action(key) for key in ACTIONS}
        uuid = self.uuid()
        disks = self.disks()
        vifs = self.vifs(name)
        return GuestConfig(name=name, kernel=kernel, ramdisk=ramdisk, cmdline=cmdline,
                           memory_bytes=memory, disks=disks, vifs=vifs, uuid=uuid,
                           source_path=source_path, warnings=tuple(self.warnings), cpu_weight=cpu_weight,
                           cap=cap, vcpus=vcpus, maxvcpus=maxvcpus, **actions)

    # ---- reading one setting
    def atom(self, key: str) -> tuple[Setting, Atom] | None:
        s = self.s.get(key)
        if s is None:
            return None
        if isinstance(s.value, ValueList):
            raise UserError(f"{s.where}: {key} takes a single value, not a [list]")
        return s, s.value

    def string(self, key: str) -> tuple[Setting, str] | None:
        got = self.atom(key)
        return None if got is None else (got[0], got[1].text)

    def number(self, key: str) -> tuple[Setting, int] | None:
        got = self.atom(key)
        if got is None:
            return None
        s, atom = got
        if s.appended:
            raise UserError(f"{s.where}: {key} += ...: '+=' joins strings and lists, "
                            f"not numbers (xl refuses it too); use '='")
        value = _strtol(atom.text)
        if value is None:
            hint = " (a leading 0 makes it octal)" if re.match(r"\s*[+-]?0[0-9]", atom.text) else ""
            raise UserError(f"{s.where}: {key} = {atom.text!r} is not a whole number{hint}")
        return s, value

    def items(self, key: str) -> list[tuple[int, str, str]]:
        """A list of strings: (index, text, where) each."""
        s = self.s.get(key)
        if s is None:
            return []
        if isinstance(s.value, Atom):
            raise UserError(f"{s.where}: {key} takes a list, e.g. {key} = [ {s.value.text!r} ]")
        out = []
        for i, item in enumerate(s.value.items):
            where = s.source.where(item.line)
            if isinstance(item, ValueList):
                raise UserError(f"{where}: {key}[{i}] is a list; each entry is a string")
            out.append((i, item.text, where))
        return out

    # ---- the keys
    def check_keys(self) -> None:
        bad = [s for s in self.s.values() if s.key not in SUPPORTED_KEYS]
        if not bad:
            return
        s = bad[0]
        if s.key in XL_KEYS:
            why = _UNSUPPORTED_WHY.get(s.key)
            message = f"{s.key!r} is not supported by pyvmm: {why or 'remove it'}"
            if why and " remove " not in why:
                message += "; remove it"
        else:
            close = difflib.get_close_matches(s.key, sorted(SUPPORTED_KEYS), n=1, cutoff=0.7)
            fix = f"did you mean {close[0]!r}?" if close else "remove it"
            message = f"{s.key!r} is not a key xl knows (xl would ignore it); {fix}"
        more = ""
        if len(bad) > 1:
            more = f" (and {len(bad) - 1} more pyvmm does not take: {', '.join(b.key for b in bad[1:])})"
        raise UserError(f"{s.where}: {message}{more}")

    def check_type(self) -> None:
        got = self.string("type")
        if got is not None and got[1] != "pv":
            s, value = got
            if value in ("hvm", "pvh"):
                raise UserError(f"{s.where}: type = {value!r}: pyvmm runs PV guests only; "
                                f"set type = \"pv\" with a Xen PV kernel")
            raise UserError(f"{s.where}: type = {value!r} is not a type xl knows (pv, pvh, hvm); "
                            f"pyvmm runs \"pv\"")
        got = self.string("builder")
        if got is not None and got[1] != "generic":    # builder = "generic" is xl's old type = "pv"
            s, value = got
            if value == "hvm":
                raise UserError(f"{s.where}: builder = 'hvm': pyvmm runs PV guests only; "
                                f"remove builder and set type = \"pv\"")
            raise UserError(f"{s.where}: builder = {value!r} is not one xl knows (generic, hvm); "
                            f"remove builder (deprecated) and set type = \"pv\"")

    def name(self) -> str:
        got = self.string("name")
        if got is None:
            raise UserError(f"{self.label}: no name: add name = \"...\" (xl requires one too)")
        s, value = got
        if not self.cli.NAME_RE.match(value):
            raise UserError(f"{s.where}: name {value!r}: use letters, digits, '.', '_' or '-' "
                            f"(at most 64, starting with a letter or digit)")
        return value

    def file(self, key: str, required: bool = False) -> Path | None:
        got = self.string(key)
        if got is None:
            if required:
                raise UserError(f"{self.label}: no {key}: add {key} = \"/path/to/vmlinuz\", "
                                f"a Xen PV kernel (pyvmm boots it directly, with no bootloader)")
            return None
        s, value = got
        if not value:
            raise UserError(f"{s.where}: {key} is empty: give the file's path")
        try:
            # a relative path is from the current directory, as xl opens it
            return Path(os.path.abspath(self.cli._check_readable(value, key)))
        except UserError as e:
            raise UserError(f"{s.where}: {e}") from None

    def cmdline(self) -> str | None:
        from pyvmm.xen_abi.abi import MAX_GUEST_CMDLINE

        cmdline, root, extra = self.string("cmdline"), self.string("root"), self.string("extra")
        if cmdline is not None:
            s, result = cmdline
            if root is not None or extra is not None:
                self.warnings.append(f"{s.where}: cmdline is set, so root and extra are ignored "
                                     f"(as xl does)")
        elif root is not None:
            s, result = root[0], f"root={root[1]}" + (f" {extra[1]}" if extra is not None else "")
        elif extra is not None:
            s, result = extra
        else:
            return None
        if len(result.encode()) > MAX_GUEST_CMDLINE - 1:
            raise UserError(f"{s.where}: the kernel command line is {len(result.encode())} bytes, "
                            f"more than the {MAX_GUEST_CMDLINE - 1} a PV start_info can carry")
        return result

    def memory(self) -> int:
        memory, maxmem = self.number("memory"), self.number("maxmem")
        if memory is None:
            memory = maxmem     # libxl: memory defaults to maxmem, both to 32 MiB
        if memory is None:
            return XL_DEFAULT_MEMORY_MIB << 20
        s, mib = memory
        if mib < self.cli.MIN_MEMORY >> 20:
            raise UserError(f"{s.where}: {s.key} = {mib} (MiB) is too small: a PV guest needs "
                            f"at least {self.cli.MIN_MEMORY >> 20}; set {s.key} = {self.cli.MIN_MEMORY >> 20} "
                            f"or more")
        if mib > self.cli.MAX_MEMORY >> 20:
            raise UserError(f"{s.where}: {s.key} = {mib} (MiB) is more than pyvmm supports "
                            f"({self.cli.MAX_MEMORY >> 20})")
        if maxmem is not None and maxmem[1] != mib:
            ms, maxmib = maxmem
            if maxmib > mib:
                raise UserError(f"{ms.where}: maxmem = {maxmib} with memory = {mib}: pyvmm cannot boot a "
                                f"guest below its maximum yet (`pyvmm mem-set` lowers it once it runs); "
                                f"set maxmem = {mib} or remove maxmem")
            raise UserError(f"{ms.where}: maxmem = {maxmib} is less than memory = {mib} "
                            f"(xl.cfg requires maxmem >= memory); set maxmem = {mib} or remove it")
        return mib << 20

    def vcpus(self) -> tuple[int, int]:
        """vcpus (online at boot) and maxvcpus (default: vcpus), as xl.cfg;
        0 is xl's "the default", one vCPU."""
        from pyvmm.cli import MAX_VCPUS

        counts = {}
        for key in ("vcpus", "maxvcpus"):
            got = self.number(key)
            if got is None:
                continue
            s, count = got
            if not 0 <= count <= MAX_VCPUS:
                raise UserError(f"{s.where}: {key} = {count}: pyvmm gives a guest 1 to {MAX_VCPUS} vCPUs")
            counts[key] = (s, count or 1)
        vcpus = counts.get("vcpus", (None, 1))[1]
        if "maxvcpus" not in counts:
            return vcpus, vcpus
        s, most = counts["maxvcpus"]
        if most < vcpus:
            raise UserError(f"{s.where}: maxvcpus = {most} is less than vcpus = {vcpus}; "
                            f"set maxvcpus = {vcpus} or more, or remove it")
        return vcpus, most

    def scheduling(self) -> tuple[int | None, int | None]:
        """cpu_weight and cap, as the credit scheduler takes them (xl.cfg:
        weight 1..65535, cap a percentage of one CPU, 0 for none); pyvmm
        applies them through a cgroup (limits.py)."""
        from pyvmm.limits import MAX_WEIGHT

        out = []
        for key, lo, hi, fix in (("cpu_weight", 1, MAX_WEIGHT, f"1 to {MAX_WEIGHT} (256 is xl's default)"),
                                 ("cap", 0, 100 * (os.cpu_count() or 1), "0 (no cap) or a percentage of one CPU")):
            got = self.number(key)
            if got is not None and not lo <= got[1] <= hi:
                raise UserError(f"{got[0].where}: {key} = {got[1]} is out of range; give {fix}")
            out.append(None if got is None else got[1])
        return out[0], out[1]

    def action(self, key: str) -> str:
        can = ACTIONS[key]
        got = self.string(key)
        if got is None:
            return can[0]
        s, value = got
        if value in can:
            return value
        what = "is not supported by pyvmm" if value in XL_ACTIONS else \
            f"is not an xl action ({', '.join(XL_ACTIONS)})"
        raise UserError(f"{s.where}: {key} = {value!r} {what}; pyvmm can do "
                        f"{' or '.join(repr(a) for a in can)}")

    def uuid(self) -> str | None:
        got = self.string("uuid")
        if got is None:
            return None
        s, value = got
        if not _UUID_RE.fullmatch(value):
            raise UserError(f"{s.where}: uuid {value!r} is not a UUID: write "
                            f"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx in hex (uuidgen makes one)")
        return value.lower()

    def disks(self) -> tuple[DiskSpec, ...]:
        by_vdev: dict[str, tuple[int, DiskSpec]] = {}
        for i, spec, where in self.items("disk"):
            at = f"{where}: disk[{i}] {spec!r}"
            try:
                target, vdev, readonly = _disk_spec(spec)
            except _SpecError as e:
                raise UserError(f"{at}: {e}") from None
            if vdev in by_vdev:
                raise UserError(f"{at}: vdev {vdev} is also disk[{by_vdev[vdev][0]}]'s; "
                                f"give each disk its own (xvda, xvdb, ...)")
            if not os.path.exists(target):
                make = f" (truncate -s 1G {shlex.quote(target)})" if target.isprintable() else ""
                raise UserError(f"{at}: {target!r} does not exist: check the path, "
                                f"or create an image{make}")
            if os.path.isdir(target):
                raise UserError(f"{at}: {target!r} is a directory: give an image file or block device")
            by_vdev[vdev] = (i, DiskSpec(Path(os.path.abspath(target)), vdev, readonly))
        disks = sorted((d for _i, d in by_vdev.values()), key=lambda d: d.index)
        for index, disk in enumerate(disks):
            if disk.index != index:
                i = by_vdev[disk.vdev][0]
                s = self.s["disk"]
                raise UserError(f"{s.where}: disk[{i}] is {disk.vdev} but there is no "
                                f"xvd{_XVD_LETTERS[index]}: pyvmm attaches disks as xvda, xvdb, ... "
                                f"with no gaps; rename it xvd{_XVD_LETTERS[index]}")
        return tuple(disks)

    def vifs(self, guest_name: str) -> tuple[VifSpec, ...]:
        from pyvmm.backends.netback import NetError, default_mac, parse_mac

        items = self.items("vif")
        if len(items) > self.cli.MAX_NICS:
            s = self.s["vif"]
            raise UserError(f"{s.where}: {len(items)} vifs: pyvmm attaches at most {self.cli.MAX_NICS}")
        vifs: list[VifSpec] = []
        for i, spec, where in items:
            at = f"{where}: vif[{i}] {spec!r}"
            try:
                opts = _vif_spec(spec)
                mac = parse_mac(opts["mac"]) if "mac" in opts else default_mac(guest_name, i)
            except (_SpecError, NetError) as e:
                raise UserError(f"{at}: {e}") from None
            if mac == "00:00:00:00:00:00":
                raise UserError(f"{at}: MAC address {mac} is all zeros; give a real one, "
                                f"e.g. 00:16:3e:xx:xx:xx, or leave mac= out")
            for other_i, other in enumerate(vifs):
                if other.mac == mac:
                    raise UserError(f"{at}: MAC address {mac} is also vif[{other_i}]'s; give each its own")
                if opts.get("vifname") is not None and other.vifname == opts["vifname"]:
                    raise UserError(f"{at}: vifname {other.vifname} is also vif[{other_i}]'s")
            if "model" in opts:
                self.warnings.append(f"{at}: model= is for HVM guests; a PV guest ignores it (as xl does)")
            try:
                rate = _xl_rate(opts["rate"]) if "rate" in opts else None
            except _SpecError as e:
                raise UserError(f"{at}: {e}") from None
            vifs.append(VifSpec(mac, opts.get("bridge", XL_DEFAULT_BRIDGE), opts.get("vifname"), rate))
        return tuple(vifs)


_UUID_RE = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")


def _strtol(text: str) -> int | None:
    """C's strtol(text, &end, 0) that must use all of text, as libxlu reads
    numbers: leading blanks, a sign, 0x hex or 0 octal; None when it fails."""
    m = re.fullmatch(r"[ \t\n\v\f\r]*([+-]?)(0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)", text)
    if not m:
        return None
    digits = m.group(2)
    base = 16 if digits[:2] in ("0x", "0X") else 8 if digits.startswith("0") else 10
    value = int(digits, base) * (-1 if m.group(1) == "-" else 1)
    return value if -(1 << 63) <= value < (1 << 63) else None


# ------------------------------------------------------------ disk specs
# docs/man/xl-disk-configuration.5.pod.in, read as libxlu_disk_l.l does:
# comma-separated key=value, flags and positional target,format,vdev,access;
# `target=` swallows the rest of the spec, commas and all.
_DISK_KEYS = ("format", "access", "vdev", "devtype", "backend", "backendtype", "specification",
              "script", "colo-host", "colo-port", "colo-export", "active-disk", "hidden-disk",
              "grant_usage")
_DISK_FLAGS = ("cdrom", "direct-io-safe", "discard", "no-discard", "colo", "no-colo",
               "trusted", "untrusted")
_DISK_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed", "empty")
# Prefixes of the xend-era syntax ("phy:/dev/vg/lv,xvda,w"): a format, a
# block script, or nothing (ignored, as xl does).
_PREFIX_RE = re.compile(r"(raw|qcow2?|vhd|iscsi|e?nbd|drbd|tapdisk|tap2?|aio|ioemu|file|phy):")
_UNKNOWN_PREFIX_RE = re.compile(r"([a-z][a-z0-9]*):(?![a-z0-9])")


def _disk_spec(spec: str) -> tuple[str, str, bool]:
    """(target, vdev, readonly) of a disk spec pyvmm can serve; _SpecError if not."""
    d: dict = {"format": None, "cdrom": False, "readonly": False}
    old_syntax = access_given = False
    i, n = 0, len(spec)

    def save(what: str, value: str) -> None:
        if d.get(what):             # xl lets an empty value be given again
            raise _SpecError(f"{what} given twice")
        d[what] = value

    def set_format(value: str) -> None:
        value = value or "raw"
        if value not in _DISK_FORMATS:
            raise _SpecError(f"unknown format {value!r} (xl knows {', '.join(_DISK_FORMATS)})")
        if d["format"] not in (None, value):
            raise _SpecError("format given twice")
        d["format"] = value

    def set_access(value: str) -> None:
        if value not in ("r", "ro", "w", "rw", ""):
            raise _SpecError(f"unknown access {value!r}: use ro (or r) or rw (or w)")
        d["readonly"] = value in ("r", "ro")

    def vdev_and_devtype(value: str) -> bool:
        """The old 'xvdc:cdrom' form of a vdev."""
        if ":" not in value:
            return False
        vdev, _, devtype = value.rpartition(":")
        save("vdev", vdev)
        if devtype not in ("cdrom", "disk"):
            raise _SpecError(f"unknown device type {devtype!r} in {value!r}")
        d["cdrom"] = devtype == "cdrom"
        return True

    while i < n:
        while i < n and spec[i] in " \t\n":
            i += 1
        if i >= n:
            break
        rest = spec[i:]
        if rest.startswith("target="):
            save("target", rest[7:-1] if rest.endswith(",") else rest[7:])
            break
        m = _PREFIX_RE.match(rest)
        if m:
            prefix = m.group(1)
            old_syntax = True
            if prefix in ("raw", "qcow", "qcow2", "vhd"):
                set_format(prefix)
            elif prefix in ("iscsi", "nbd", "enbd", "drbd"):
                save("script", f"block-{prefix}")
            i += m.end()
            continue
        m = _UNKNOWN_PREFIX_RE.match(rest)
        if m:
            raise _SpecError(f"unknown prefix {m.group(1) + ':'!r} (xl knows phy: file: raw: "
                             f"and a few older ones); give the path alone")
        comma = rest.find(",")
        token = rest if comma < 0 else rest[:comma]
        i += len(token) + 1
        key, eq, value = token.partition("=")
        if eq and key in _DISK_KEYS:
            if key == "format":
                set_format(value)
            elif key == "access":
                set_access(value)
            elif key == "devtype":
                if value not in ("cdrom", "disk"):
                    raise _SpecError(f"unknown devtype {value!r} (xl knows disk and cdrom)")
                d["cdrom"] = value == "cdrom"
            else:
                save(key, value)
            continue
        if not eq and token in _DISK_FLAGS:
            d[token] = True
            continue
        if eq:
            raise _SpecError(f"unknown parameter {token!r}; xl knows "
                             f"{', '.join(k + '=' for k in ('target',) + _DISK_KEYS)}")
        # a positional parameter: target, then format, vdev and access
        if d.get("target") is None:
            d["target"] = token
        elif not old_syntax and d["format"] is None:
            if d["target"] == "" and vdev_and_devtype(token):
                d["format"] = "empty"       # xend's ",hdc:cdrom,r": an empty drive
            else:
                set_format(token)
        elif d.get("vdev") is None:
            if not vdev_and_devtype(token):
                save("vdev", token)
        elif not access_given:
            access_given = True
            set_access(token)
        else:
            raise _SpecError(f"too many positional parameters at {token!r}: the order is "
                             f"target,format,vdev,access")
    return _disk_checked(d)


def _disk_checked(d: dict) -> tuple[str, str, bool]:
    """What pyvmm's block back-end can serve, of what xl would accept."""
    vdev = d.get("vdev")
    if d["cdrom"]:
        as_vdev = vdev if vdev and re.fullmatch(r"xvd[a-p]", vdev) else "xvdb"
        raise _SpecError(f"pyvmm has no CD-ROM drives; attach the image as a read-only disk "
                         f"(PATH,raw,{as_vdev},ro)")
    if not vdev:
        raise _SpecError("no vdev: give the guest's name for it, e.g. PATH,raw,xvda,rw")
    if not d.get("target"):
        raise _SpecError("no target: give the image's path, e.g. /srv/guest.img,raw,xvda,rw")
    fmt = d["format"] or "raw"
    if fmt == "empty":
        raise _SpecError("format empty is an empty CD-ROM drive; pyvmm has no CD-ROM drives")
    if fmt != "raw":
        raise _SpecError(f"format {fmt} is not supported; convert it to raw "
                         f"(qemu-img convert -O raw IMAGE IMAGE.raw)")
    if d.get("script"):
        raise _SpecError(f"script {d['script']!r}: pyvmm opens the image itself and runs no "
                         f"block scripts; give a file or block device path")
    if d.get("backend"):
        raise _SpecError("backend=: pyvmm serves every disk itself, there is no driver domain; "
                         "remove it")
    if d.get("backendtype"):
        raise _SpecError("backendtype=: pyvmm serves every disk with its own back-end; remove it")
    if d.get("specification") not in (None, "", "xen"):
        raise _SpecError(f"specification={d['specification']!r}: pyvmm speaks only Xen's "
                         f"block protocol; remove it")
    if d.get("grant_usage"):
        raise _SpecError("grant_usage= is for virtio disks; pyvmm's are Xen PV disks; remove it")
    if d.get("no-discard"):
        raise _SpecError("no-discard: pyvmm always offers discard (it punches holes in image "
                         "files); remove it")
    if d.get("untrusted"):
        raise _SpecError("untrusted: pyvmm does not tell the front-end that; remove it")
    colo = [k for k in ("colo", "colo-host", "colo-port", "colo-export", "active-disk",
                        "hidden-disk") if d.get(k)]
    if colo:
        raise _SpecError(f"{colo[0]}: pyvmm has no COLO replication; remove it")
    # direct-io-safe, discard, trusted and devtype=disk ask for what pyvmm does anyway
    return d["target"], _vdev(vdev), d["readonly"]


def _vdev(vdev: str) -> str:
    if re.fullmatch(r"xvd[a-p]", vdev):
        return vdev
    if re.fullmatch(r"xvd[a-z]+", vdev):
        raise _SpecError(f"vdev {vdev}: pyvmm attaches at most 16 disks, xvda..xvdp")
    if re.fullmatch(r"xvd[a-z]+[0-9]+", vdev):
        raise _SpecError(f"vdev {vdev} is a partition: pyvmm attaches whole disks; give an "
                         f"image of the whole disk as xvd{vdev[3:].rstrip('0123456789')}")
    if re.fullmatch(r"(hd|sd)[a-z]+[0-9]*", vdev):
        raise _SpecError(f"vdev {vdev}: pyvmm presents disks as xvda, xvdb, ...; use an xvd name "
                         f"(and root=/dev/xvd... in the kernel command line)")
    raise _SpecError(f"vdev {vdev!r} is not a disk name pyvmm knows: use xvda, xvdb, ...")


# ------------------------------------------------------------ vif specs
# docs/man/xl-network-configuration.5.pod.in; xl splits on ',' (empty items
# skipped) and drops the spaces before each.
_VIF_REFUSED = {
    "script": "pyvmm adds the guest's TAP to the bridge itself and runs no hotplug scripts",
    "backend": "pyvmm is the back-end; there is no driver domain",
    "ip": "pyvmm does not filter the guest's traffic by address (xl's vif scripts do); "
          "filter on the host",
    "mtu": "pyvmm does not set a vif's MTU; set it on the bridge",
    "vlan": "pyvmm does not set up VLANs",
    "gatewaydev": "pyvmm does not route (vif-route); use a bridge",
    "netdev": "pyvmm does not route (vif-route); use a bridge",
    "devid": "pyvmm numbers vifs in order",
    "accel": "xl does not support it either",
    "forwarddev": "pyvmm has no COLO replication",
}
_IFNAME_BAD = frozenset("/:%") | frozenset(" \t\n\v\f\r")


def _vif_spec(spec: str) -> dict[str, str]:
    """mac, bridge, vifname (and model, to warn about) of a vif spec; _SpecError if pyvmm cannot."""
    opts: dict[str, str] = {}
    for item in spec.split(","):
        item = item.lstrip(" ")
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not eq:
            if item == "trusted":       # what the front-end assumes anyway
                continue
            if item == "untrusted":
                raise _SpecError("untrusted: pyvmm does not tell the front-end that; remove it")
            raise _SpecError(f"{item!r} is not a vif setting xl knows; use key=value "
                             f"(mac=, bridge=, vifname=)")
        if key in ("mac", "bridge", "vifname", "model", "rate"):
            opts[key] = value   # a repeated key: the last one counts, as in xl
        elif key == "type":
            if value != "vif":  # xl's other type, ioemu, is an HVM guest's emulated NIC
                raise _SpecError(f"type={value!r}: a PV guest's vif is type=vif; remove it")
        elif key in _VIF_REFUSED:
            raise _SpecError(f"{key}= is not supported: {_VIF_REFUSED[key]}; remove it")
        elif key.startswith("colo_"):
            raise _SpecError(f"{key + '='!r} is not supported: pyvmm has no COLO replication; remove it")
        else:
            raise _SpecError(f"{key + '='!r} is not a vif setting xl knows; pyvmm takes mac=, "
                             f"bridge=, vifname= and rate=")
    for key in ("bridge", "vifname"):
        if key in opts:
            _check_ifname(key, opts[key])
    return opts


_XL_RATE = re.compile(r"(\d+)(GB|MB|KB|B|Gb|Mb|Kb|b)/s(?:@(\d+)(ms|us|s)?)?")
_XL_RATE_UNITS = {"G": 10**9, "M": 10**6, "K": 10**3, "": 1}


def _xl_rate(value: str) -> int:
    """xl's vif rate=RATE/s[@INTERVAL] in bytes per second: decimal
    prefixes, B bytes and b bits, as libxlu reads it.  The interval (xl's
    credit period) is accepted; pyvmm's token bucket refills continuously."""
    m = _XL_RATE.fullmatch(value)
    if not m:
        raise _SpecError(f"rate={value!r}: write it as xl does, e.g. rate=10MB/s (bytes) or rate=100Mb/s (bits)")
    n = int(m.group(1)) * _XL_RATE_UNITS[m.group(2)[:-1]]
    n = n // 8 if m.group(2).endswith("b") else n
    if n <= 0:
        raise _SpecError(f"rate={value!r} is no rate at all; give a positive one or remove rate=")
    return n


def _check_ifname(key: str, name: str) -> None:
    """A Linux interface name (dev_valid_name); '%' too, which TUNSETIFF would expand."""
    if not name or len(name.encode()) > 15 or name in (".", "..") or _IFNAME_BAD & set(name) \
            or "\0" in name:
        raise _SpecError(f"{key} {name!r} is not an interface name: 1 to 15 characters, "
                         f"none of '/', ':', '%' or spaces")
