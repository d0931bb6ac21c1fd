"""xl config files (pyvmm/xlcfg.py): the grammar as xl reads it, and every
mistake as one line that names the file, the line and the key."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from pyvmm.backends.netback import default_mac
from pyvmm.cli import MIN_MEMORY
from pyvmm.errors import UserError
from pyvmm.xlcfg import (XL_DEFAULT_BRIDGE, XL_DEFAULT_MEMORY_MIB, Atom, DiskSpec, GuestConfig,
                         Source, ValueList, VifSpec, load, load_text, parse)

FILE = Source("guest.cfg", True)


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and message.strip() == message, message
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


# ---------------------------------------------------------------- guests
@pytest.fixture
def guest_dir(tmp_path, monkeypatch):
    """A directory with a kernel, an initrd and two disk images, as the cwd."""
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd.img").write_bytes(b"initrd")
    for disk in ("root.img", "data.img"):
        with open(tmp_path / disk, "wb") as f:
            f.truncate(1 << 20)
    monkeypatch.chdir(tmp_path)
    return tmp_path


BASE = 'name = "web"\nkernel = "vmlinuz"\n'


def config(directory, text: str, name: str = "guest.cfg") -> Path:
    """The config file, named from the cwd as a user would (messages show it so)."""
    path = directory / name
    path.write_text(text)
    return Path(os.path.relpath(path))


def load_error(path, overrides=()) -> str:
    return one_line_error(load, path, overrides)


def test_a_realistic_config(guest_dir):
    path = config(guest_dir, """\
# /etc/xen/web.cfg
name    = "web"
type    = "pv"
kernel  = "vmlinuz"
ramdisk = "initrd.img"
root    = "/dev/xvda ro"
extra   = "console=hvc0 noreplace-smp"
memory  = 512
maxmem  = 512
vcpus   = 1
uuid    = "3F2504E0-4F89-11D3-9A0C-0305E82C3301"
on_poweroff = "destroy"
on_reboot   = "restart"
on_crash    = "destroy"
disk = [ 'format=raw, vdev=xvdb, access=ro, target=data.img',
         'root.img,raw,xvda,rw',
       ]
vif  = [ 'mac=00:16:3E:74:3d:76, bridge=xenbr1' ]
""")
    g = load(path)
    assert g == GuestConfig(
        name="web",
        kernel=guest_dir / "vmlinuz",
        ramdisk=guest_dir / "initrd.img",
        cmdline="root=/dev/xvda ro console=hvc0 noreplace-smp",
        memory_bytes=512 << 20,
        disks=(DiskSpec(guest_dir / "root.img", "xvda", False),
               DiskSpec(guest_dir / "data.img", "xvdb", True)),
        vifs=(VifSpec("00:16:3e:74:3d:76", "xenbr1", None),),
        on_poweroff="destroy", on_reboot="restart", on_crash="destroy",
        uuid="3f2504e0-4f89-11d3-9a0c-0305e82c3301",
        source_path=path,
    )
    assert [d.index for d in g.disks] == [0, 1]
    assert g.on_reboot_flag == "restart"


def test_xl_defaults(guest_dir):
    g = load(config(guest_dir, BASE + "vif = [ '' ]"))
    assert g.memory_bytes == XL_DEFAULT_MEMORY_MIB << 20
    assert (g.on_poweroff, g.on_reboot, g.on_crash) == ("destroy", "restart", "destroy")
    assert g.cmdline is None and g.ramdisk is None and g.uuid is None and g.disks == ()
    (vif,) = g.vifs
    assert vif.bridge == XL_DEFAULT_BRIDGE and vif.vifname is None
    # pyvmm's stable address for the guest, as --net gives without mac=
    assert vif.mac == default_mac("web", 0)


def test_vif_rate_as_xl_reads_it(guest_dir):
    g = load(config(guest_dir, BASE + 'vif = [ "rate=10MB/s", "rate=80Mb/s@20ms", "" ]'))
    assert [v.rate for v in g.vifs] == [10_000_000, 10_000_000, None]


def test_scheduling_keys_as_xl_reads_them(guest_dir):
    g = load(config(guest_dir, BASE + "cpu_weight = 512\ncap = 50"))
    assert (g.cpu_weight, g.cap) == (512, 50)
    assert (load(config(guest_dir, BASE)).cpu_weight, load(config(guest_dir, BASE)).cap) == (None, None)


def test_memory_defaults_to_maxmem(guest_dir):
    assert load(config(guest_dir, BASE + "maxmem = 128")).memory_bytes == 128 << 20


def test_numbers_as_xl_reads_them(guest_dir):
    for text in ("memory = 0x100", "memory = 0400", 'memory = "256"', 'memory = " +256"'):
        assert load(config(guest_dir, BASE + text)).memory_bytes == 256 << 20, text


def test_on_reboot_destroy_is_on_reboot_exit(guest_dir):
    g = load(config(guest_dir, BASE + 'on_reboot = "destroy"'))
    assert g.on_reboot == "destroy" and g.on_reboot_flag == "exit"


def test_cmdline_wins_over_root_and_extra_with_a_warning(guest_dir):
    g = load(config(guest_dir, BASE + 'cmdline = "console=hvc0"\nroot = "/dev/xvda"'))
    assert g.cmdline == "console=hvc0"
    (warning,) = g.warnings
    assert warning.startswith("guest.cfg:3: ") and "root and extra are ignored" in warning


@pytest.mark.parametrize("text, cmdline", [
    ('root = "/dev/xvda1"', "root=/dev/xvda1"),
    ('extra = "quiet"', "quiet"),
    ('root = "/dev/xvda1"\nextra = "quiet"', "root=/dev/xvda1 quiet"),
    ('cmdline = ""', ""),
])
def test_the_command_line_as_xl_builds_it(guest_dir, text, cmdline):
    assert load(config(guest_dir, BASE + text)).cmdline == cmdline


def test_relative_paths_are_from_the_current_directory_as_in_xl(guest_dir, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("configs")
    path = config(elsewhere, BASE + 'ramdisk = "initrd.img"\ndisk = [ "root.img,,xvda" ]')
    g = load(path)      # the cwd is guest_dir, which holds the files
    assert g.kernel == guest_dir / "vmlinuz" and g.kernel.is_absolute()
    assert g.disks[0].path == guest_dir / "root.img"
    os.chdir(elsewhere)
    assert "kernel 'vmlinuz' does not exist" in load_error(path)


def test_overrides_apply_after_the_file(guest_dir):
    path = config(guest_dir, BASE + 'memory = 256\ndisk = [ "root.img,,xvda" ]')
    g = load(path, ["memory=1024", 'disk+=["data.img,,xvdb,ro"]', "name='db'; vcpus=1"])
    assert g.memory_bytes == 1024 << 20 and g.name == "db"
    assert [d.vdev for d in g.disks] == ["xvda", "xvdb"]


def test_a_bad_override_names_itself(guest_dir):
    path = config(guest_dir, BASE)
    assert load_error(path, ["memory=8"]).startswith("command line 'memory=8': memory = 8")
    assert "KEY=VALUE" in load_error(path, ["memory"])
    assert "strings need quotes" in load_error(path, ["kernel=/boot/vmlinuz"])


def test_disks_are_ordered_by_vdev(guest_dir):
    g = load(config(guest_dir, BASE + 'disk = [ "data.img,,xvdb", "root.img,,xvda" ]'))
    assert [(d.path.name, d.vdev) for d in g.disks] == [("root.img", "xvda"), ("data.img", "xvdb")]


@pytest.mark.parametrize("spec, readonly", [
    ("root.img,,xvda", False),
    ("root.img,raw,xvda,rw", False),
    ("root.img,raw,xvda,w", False),
    ("root.img,raw,xvda,ro", True),
    ("root.img,raw,xvda,r", True),
    ("format=raw, vdev=xvda, access=ro, target=root.img", True),
    ("vdev=xvda,target=root.img", False),
    ("root.img,,xvda,,", False),
    ("  root.img, raw, xvda, ro", True),
    ("phy:root.img,xvda,w", False),                     # xend's syntax, still read by xl
    ("file:root.img,xvda,r", True),
    ("tap:aio:root.img,xvda,w", False),
    ("raw:root.img,xvda,w", False),
    ("root.img,,xvda:disk,ro", True),
    ("root.img,,xvda,direct-io-safe,discard,trusted,devtype=disk", False),
])
def test_disk_specs(guest_dir, spec, readonly):
    (disk,) = load(config(guest_dir, BASE + f"disk = [ {spec!r} ]")).disks
    assert disk == DiskSpec(guest_dir / "root.img", "xvda", readonly)


def test_target_takes_the_rest_of_the_spec(guest_dir):
    (guest_dir / "a,b=c.img").write_bytes(b"x" * 512)
    (disk,) = load(config(guest_dir, BASE + 'disk = [ "vdev=xvda, target=a,b=c.img" ]')).disks
    assert disk.path == guest_dir / "a,b=c.img"


@pytest.mark.parametrize("spec, fragments", [
    ("root.img,qcow2,xvdb,rw", ["format qcow2 is not supported", "qemu-img convert -O raw"]),
    ("qcow2:root.img,xvda,w", ["format qcow2"]),
    ("root.img,vmdk,xvda", ["unknown format 'vmdk'"]),
    ("root.img", ["no vdev"]),
    ("format=raw,vdev=xvda", ["no target"]),
    ("root.img,,xvda,rx", ["unknown access 'rx'"]),
    ("root.img,,xvda,rw,ro", ["too many positional parameters"]),
    ("root.img,,xvda,cdrom", ["no CD-ROM", "root.img,raw,xvda,ro".replace("root.img", "PATH")]),
    ("root.img,,xvda,devtype=cdrom", ["no CD-ROM"]),
    (",xvdc:cdrom,r", ["no CD-ROM"]),
    ("root.img,,xvda,devtype=floppy", ["unknown devtype"]),
    ("script=iscsi,root.img,,xvda", ["script", "runs no block scripts"]),
    ("nbd:host:1234,xvda,w", ["block-nbd"]),
    ("root.img,,xvda,backend=dd", ["no driver domain"]),
    ("root.img,,xvda,backendtype=qdisk", ["backendtype"]),
    ("root.img,,xvda,specification=virtio", ["specification=virtio"]),
    ("root.img,,xvda,no-discard", ["no-discard"]),
    ("root.img,,xvda,colo", ["COLO"]),
    ("root.img,,xvda,cache=none", ["unknown parameter 'cache=none'"]),
    ("vdev=xvda,vdev=xvdb,root.img", ["vdev given twice"]),
    ("root.img,,xvda,target=data.img", ["target given twice"]),
    ("c:/disk.img,,xvda", ["unknown prefix 'c:'"]),
    ("root.img,,hda", ["hda", "xvd"]),
    ("root.img,,sdb1", ["sdb1", "xvd"]),
    ("root.img,,xvda2", ["partition"]),
    ("root.img,,xvdq", ["at most 16"]),
    ("root.img,,xvdaa", ["at most 16"]),
    ("root.img,,disk0", ["not a disk name"]),
    ("missing.img,,xvda", ["'missing.img' does not exist", "truncate -s 1G missing.img"]),
    (".,,xvda", ["is a directory"]),
    ("root.img ,,xvda", ["'root.img ' does not exist"]),    # xl keeps the space, and so do we
])
def test_malformed_disk_specs(guest_dir, spec, fragments):
    message = load_error(config(guest_dir, BASE + f"disk = [\n  'data.img,,xvdb',\n  {spec!r} ]"))
    assert message.startswith(f"guest.cfg:5: disk[1] {spec!r}: "), message
    for f in fragments:
        assert f in message, (f, message)


def test_the_example_from_the_issue(guest_dir):
    message = load_error(config(guest_dir, BASE + "disk = [ 'root.img,,xvda', 'foo,qcow2,xvdb,rw' ]"))
    assert message == ("guest.cfg:3: disk[1] 'foo,qcow2,xvdb,rw': format qcow2 is not supported; "
                       "convert it to raw (qemu-img convert -O raw IMAGE IMAGE.raw)")


def test_duplicate_vdev(guest_dir):
    message = load_error(config(guest_dir, BASE + "disk = [ 'root.img,,xvda', 'data.img,,xvda' ]"))
    assert "disk[1] 'data.img,,xvda': vdev xvda is also disk[0]'s" in message


@pytest.mark.parametrize("vdevs, fragment", [
    (["xvdb"], "disk[0] is xvdb but there is no xvda"),
    (["xvda", "xvdc"], "disk[1] is xvdc but there is no xvdb"),
])
def test_vdev_gaps_are_refused(guest_dir, vdevs, fragment):
    disks = ", ".join(f"'root.img,,{v},ro'" for v in vdevs)
    message = load_error(config(guest_dir, BASE + f"disk = [ {disks} ]"))
    assert message.startswith("guest.cfg:3: ") and fragment in message, message


@pytest.mark.parametrize("spec, vif", [
    ("mac=00:16:3E:00:00:01", VifSpec("00:16:3e:00:00:01", "xenbr0", None)),
    ("bridge=br0,vifname=web.0", VifSpec(default_mac("web", 0), "br0", "web.0")),
    ("  mac=02:00:00:00:00:01, bridge=br0", VifSpec("02:00:00:00:00:01", "br0", None)),
    # empty items are skipped, the last of a repeated key counts, as in xl
    ("type=vif,,trusted,mac=00:16:3e:00:00:01,mac=00:16:3e:00:00:02",
     VifSpec("00:16:3e:00:00:02", "xenbr0", None)),
])
def test_vif_specs(guest_dir, spec, vif):
    assert load(config(guest_dir, BASE + f"vif = [ {spec!r} ]")).vifs == (vif,)


def test_vif_model_is_ignored_with_a_warning(guest_dir):
    g = load(config(guest_dir, BASE + "vif = [ 'model=e1000,bridge=br0' ]"))
    assert g.vifs[0].bridge == "br0"
    (warning,) = g.warnings
    assert "model=" in warning and "HVM" in warning


@pytest.mark.parametrize("spec, fragments", [
    ("mac=01:16:3e:00:00:01", ["multicast"]),
    ("mac=00:16:3e:00:00", ["bad MAC address"]),
    ("mac=00:16:3e:00:00:0g", ["bad MAC address"]),
    ("mac=00:00:00:00:00:00", ["all zeros"]),
    ("mac=00:16:3e:00:00:01 ,bridge=br0", ["bad MAC address"]),    # xl keeps the space too
    ("script=vif-route", ["script= is not supported", "runs no hotplug scripts"]),
    ("backend=netdom", ["backend="]),
    ("ip=10.0.0.2", ["ip=", "filter"]),
    ("rate=10Mbit", ["rate='10Mbit'", "rate=10MB/s"]),
    ("rate=0MB/s", ["no rate at all"]),
    ("type=ioemu", ["type=ioemu"]),
    ("bridge=br0,foo=1", ["'foo=' is not a vif setting"]),
    ("bridge", ["'bridge' is not a vif setting"]),
    ("untrusted", ["untrusted"]),
    ("vifname=" + "v" * 16, ["not an interface name"]),
    ("vifname=tap%d", ["not an interface name"]),
    ("bridge=br 0", ["not an interface name"]),
    ("bridge=", ["not an interface name"]),
])
def test_malformed_vif_specs(guest_dir, spec, fragments):
    message = load_error(config(guest_dir, BASE + f"vif = [ {spec!r} ]"))
    assert message.startswith(f"guest.cfg:3: vif[0] {spec!r}: "), message
    for f in fragments:
        assert f in message, (f, message)


def test_two_vifs_cannot_share_a_mac_or_a_name(guest_dir):
    same_mac = "vif = [ 'mac=00:16:3e:00:00:01', 'mac=00:16:3E:00:00:01' ]"
    assert "is also vif[0]'s" in load_error(config(guest_dir, BASE + same_mac))
    same_name = "vif = [ 'vifname=web0', 'vifname=web0' ]"
    assert "vifname web0 is also vif[0]'s" in load_error(config(guest_dir, BASE + same_name))


def test_too_many_vifs(guest_dir):
    from pyvmm.cli import MAX_NICS
    vifs = ", ".join("''" for _ in range(MAX_NICS + 1))
    assert f"at most {MAX_NICS}" in load_error(config(guest_dir, BASE + f"vif = [ {vifs} ]"))


@pytest.mark.parametrize("text, fragments", [
    ('kernel = "vmlinuz"', ["guest.cfg: no name"]),
    ('name = "web"', ["guest.cfg: no kernel", 'kernel = "/path/to/vmlinuz"']),
    ('name = "web"\nkernel = "nope"', ["guest.cfg:2: kernel 'nope' does not exist"]),
    ('name = "web"\nkernel = "."', ["guest.cfg:2: kernel '.' is a directory"]),
    ('name = "web"\nkernel = ""', ["guest.cfg:2: kernel is empty"]),
    ('name = "web"\nkernel = ["vmlinuz"]', ["guest.cfg:2: kernel takes a single value"]),
    (BASE + 'ramdisk = "nope.img"', ["guest.cfg:3: ramdisk 'nope.img' does not exist"]),
    ('name = "a b"\nkernel = "vmlinuz"', ["guest.cfg:1: name 'a b'"]),
    (BASE + "memory = 8", ["guest.cfg:3: memory = 8 (MiB) is too small", f"at least {MIN_MEMORY >> 20}"]),
    (BASE + "maxmem = 8", ["guest.cfg:3: maxmem = 8 (MiB) is too small"]),
    (BASE + "memory = 1048576", ["is more than pyvmm supports"]),
    (BASE + "memory = 512\nmaxmem = 1024", ["guest.cfg:4: maxmem = 1024 with memory = 512",
                                             "cannot boot a guest below its maximum"]),
    (BASE + "memory = 512\nmaxmem = 256", ["maxmem = 256 is less than memory = 512"]),
    (BASE + "memory = 08", ["not a whole number", "octal"]),
    (BASE + 'memory = "lots"', ["memory = 'lots' is not a whole number"]),
    (BASE + "memory = 99999999999999999999", ["not a whole number"]),
    (BASE + "memory = 256\nmemory += 256", ["guest.cfg:4: memory += ...", "use '='"]),
    (BASE + "vcpus = 9", ["guest.cfg:3: vcpus = 9: pyvmm gives a guest 1 to 8 vCPUs"]),
    (BASE + "vcpus = 4\nmaxvcpus = 2", ["guest.cfg:4: maxvcpus = 2 is less than vcpus = 4", "remove it"]),
    (BASE + 'vcpus = "-1"', ["vcpus = -1: pyvmm gives a guest 1 to 8 vCPUs"]),
    (BASE + 'type = "hvm"', ["guest.cfg:3: type = 'hvm': pyvmm runs PV guests only"]),
    (BASE + 'type = "pvh"', ["PV guests only"]),
    (BASE + 'type = "xen"', ["not a type xl knows"]),
    (BASE + 'builder = "hvm"', ["PV guests only"]),
    (BASE + 'on_crash = "restart"', ["on_crash = 'restart' is not supported by pyvmm",
                                     "pyvmm can do 'destroy'"]),
    (BASE + 'on_crash = "preserve"', ["not supported by pyvmm"]),
    (BASE + 'on_poweroff = "restart"', ["on_poweroff = 'restart'"]),
    (BASE + 'on_reboot = "rename-restart"', ["pyvmm can do 'restart' or 'destroy'"]),
    (BASE + 'on_reboot = "reboot"', ["'reboot' is not an xl action"]),
    (BASE + 'uuid = "not-a-uuid"', ["uuid 'not-a-uuid' is not a UUID"]),
    (BASE + 'cmdline = "' + "x" * 1024 + '"', ["1024 bytes", "1023"]),
    (BASE + 'disk = "root.img,,xvda"', ["disk takes a list"]),
    (BASE + 'disk = [ ["root.img,,xvda"] ]', ["disk[0] is a list"]),
    (BASE + "kernal = 'x'", ["guest.cfg:3: 'kernal' is not a key xl knows", "did you mean 'kernel'?"]),
    (BASE + "hostname = 'x'", ["'hostname' is not a key xl knows", "remove it"]),
    (BASE + 'vnc = 1\nsdl = 0\npool = "p"', ["guest.cfg:3: 'vnc' is not supported by pyvmm",
                                             "graphical console", "2 more", "sdl, pool"]),
    (BASE + 'bootloader = "pygrub"', ["'bootloader' is not supported", "set kernel ="]),
    (BASE + "cpu_weight = 0", ["guest.cfg:3: cpu_weight = 0 is out of range", "1 to 65535"]),
    (BASE + 'cap = "-5"', ["guest.cfg:3: cap = -5 is out of range", "percentage of one CPU"]),
    (BASE + "period = 10", ["guest.cfg:3: 'period' is not supported by pyvmm: remove it"]),
])
def test_bad_configs(guest_dir, text, fragments):
    message = load_error(config(guest_dir, text))
    for f in fragments:
        assert f in message, (f, message)


def test_config_file_problems(guest_dir):
    assert "config file 'nope.cfg' does not exist" in load_error("nope.cfg")
    assert "is a directory" in load_error(guest_dir)
    (guest_dir / "binary.cfg").write_bytes(b'name = "a"\n\xff\xfe')
    assert load_error("binary.cfg") == "binary.cfg:2: not UTF-8 text: is this an xl config file?"
    with open(guest_dir / "huge.cfg", "wb") as f:
        f.truncate(2 << 20)
    assert "not an xl config" in load_error("huge.cfg")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_config(guest_dir):
    path = config(guest_dir, BASE)
    path.chmod(0)
    assert "is not readable" in load_error(path)


def test_load_text_names_its_label(guest_dir):
    message = one_line_error(load_text, 'name = "web"', "<stdin>")
    assert message.startswith("<stdin>: no kernel")


def test_vcpus_and_maxvcpus(guest_dir):
    """xl.cfg: vcpus online at boot, maxvcpus the most (default: vcpus); 0 is one."""
    assert (load(config(guest_dir, BASE)).vcpus, load(config(guest_dir, BASE)).maxvcpus) == (1, 1)
    g = load(config(guest_dir, BASE + "vcpus = 2"))
    assert (g.vcpus, g.maxvcpus) == (2, 2)
    g = load(config(guest_dir, BASE + "vcpus = 2\nmaxvcpus = 4"))
    assert (g.vcpus, g.maxvcpus) == (2, 4)
    g = load(config(guest_dir, BASE + "vcpus = 0"))
    assert (g.vcpus, g.maxvcpus) == (1, 1)
